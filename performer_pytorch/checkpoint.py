"""The one checkpoint reader and writer every script uses.

Reads (always with `weights_only=True`, so a checkpoint cannot run code):
- the reference's files: `{'model_state_dict': ..., 'epoch': ..., 'optimizer_state_dict': ...}` or a bare state dict;
- ours: the same keys plus `model_type` (the model family, see models.py), `config` (the family's keyword
  arguments), `head`, `genes`, `classes` and run state. Files without `model_type` (the reference's, and ours from
  before it was recorded) are Performer checkpoints: `model_type` reads as "performer".
State-dict keys lose `module.` (DistributedDataParallel) and `_orig_mod.` (torch.compile) prefixes. The architecture
comes from the stored config, else it is inferred from tensor shapes.

Writes atomically (temporary file in the same folder, then rename), so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ModelInputError
from .performer_pytorch import ClassificationHead, PerformerLM

FORMAT_VERSION = 1
DEFAULT_MODEL_TYPE = "performer"  # what a checkpoint without `model_type` holds (the reference's and older ones)
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ModelInputError):
    """A checkpoint file that cannot be read, or does not fit the model asked for."""


@dataclass
class Checkpoint:
    """What a checkpoint file holds, normalised.

    state_dict: model tensors, prefixes stripped. config: PerformerLM keyword arguments. head: {"type": "lm"},
    {"type": "classifier", "n_classes", "h_dim", "hidden", "seq_len", "dim", "dropout"[, "class_blocks"]} or None
    (no `to_out`); "class_blocks" only for a head grown over continual stages.
    genes: reference gene list or None (reference-format files carry none). classes: class names or None.
    payload: the whole loaded dict (epoch, optimiser state, ...). source: "scbert" (ours) or "reference".
    model_type: the model family that rebuilds these weights (`models.load_model` dispatches on it).
    """

    path: str
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    head: dict[str, Any] | None
    genes: list[str] | None = None
    classes: list[str] | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    source: str = "reference"
    model_type: str = DEFAULT_MODEL_TYPE


def read_checkpoint_file(path: str) -> dict[str, Any]:
    """torch.load with weights_only=True and errors a user can act on; always maps to CPU."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist: check the path")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path!r} holds Python objects that cannot be loaded safely (weights_only=True): re-save only its "
                "tensors and plain values, e.g. torch.save({'model_state_dict': model.state_dict()}, path)"
            ) from err
        raise CheckpointError(
            f"{path!r} is not a readable PyTorch checkpoint ({err}): pass a .pth file saved by torch.save"
        ) from err
    except Exception as err:  # torch.load raises many types on foreign or truncated files (IndexError, zip errors...)
        raise CheckpointError(
            f"{path!r} is not a readable PyTorch checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:120]}): "
            "pass a .pth file saved by torch.save, and re-copy it if it may be truncated"
        ) from err
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path!r} holds a {type(payload).__name__}, not a checkpoint dict: pass a .pth saved by "
                              "pretrain.py, finetune.py or the reference code")
    return payload


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove `module.` and `_orig_mod.` wherever they lead a key (wrappers can nest)."""
    clean = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        clean[key] = value
    return clean


def _state_dict_of(payload: dict[str, Any], path: str) -> dict[str, torch.Tensor]:
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(payload.get(key), dict):
            return strip_prefixes(payload[key])
    if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return strip_prefixes(payload)
    raise CheckpointError(
        f"{path!r} has no model weights (no 'model_state_dict' among its keys {sorted(payload)[:8]}): pass a model "
        "checkpoint, not an optimiser or data file"
    )


def infer_head(state_dict: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """The `to_out` head from its tensors: the LM's Linear, scBERT's classification head, or none."""
    if "to_out.fc3.weight" in state_dict:
        return {
            "type": "classifier",
            "seq_len": state_dict["to_out.fc1.weight"].shape[1],
            "dim": state_dict["to_out.conv1.weight"].shape[-1],
            "n_classes": state_dict["to_out.fc3.weight"].shape[0],
            "h_dim": state_dict["to_out.fc2.weight"].shape[0],
            "hidden": state_dict["to_out.fc1.weight"].shape[0],
            "dropout": 0.0,
        }
    if "to_out.weight" in state_dict:
        return {"type": "lm"}
    return None


def infer_config(
    state_dict: dict[str, torch.Tensor], *, heads: int | None = None, max_seq_len: int | None = None
) -> dict[str, Any]:
    """PerformerLM keyword arguments recovered from tensor shapes.

    dim_head and nb_features come from the projection matrix (nb_features, dim_head), so heads = inner / dim_head;
    a `heads` given by the user is checked against that. max_seq_len comes from the gene2vec table or the
    classification head; a model with neither needs `max_seq_len` from the caller (e.g. the gene list + 1).
    """
    try:
        num_tokens, dim = state_dict["token_emb.weight"].shape
        projection = state_dict["performer.net.layers.0.0.fn.fast_attention.projection_matrix"]
        inner = state_dict["performer.net.layers.0.0.fn.to_q.weight"].shape[0]
        ff_hidden = state_dict["performer.net.layers.0.1.fn.fn.w1.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(
            f"the weights lack {err.args[0]!r}, so they are not an scBERT Performer: pass an scBERT checkpoint"
        ) from err
    nb_features, dim_head = projection.shape
    depth = 1 + max(int(k.split(".")[3]) for k in state_dict if k.startswith("performer.net.layers."))
    inferred_heads = inner // dim_head
    if heads is not None and heads != inferred_heads:
        raise CheckpointError(
            f"heads={heads} does not fit the checkpoint, whose attention width {inner} with {dim_head} per head "
            f"means {inferred_heads} heads: leave heads unset or pass heads={inferred_heads}"
        )
    if "pos_emb.emb.weight" in state_dict:
        max_seq_len = state_dict["pos_emb.emb.weight"].shape[0]
    elif "to_out.fc1.weight" in state_dict:
        max_seq_len = state_dict["to_out.fc1.weight"].shape[1]
    if max_seq_len is None:
        raise CheckpointError(
            "the checkpoint has neither a gene2vec table nor a classification head, so its sequence length is unknown: "
            "pass the gene list it was trained on"
        )
    return dict(
        num_tokens=int(num_tokens),
        max_seq_len=int(max_seq_len),
        dim=int(dim),
        depth=int(depth),
        heads=int(inferred_heads),
        dim_head=int(dim_head),
        nb_features=int(nb_features),
        ff_mult=int(ff_hidden // dim),
        qkv_bias="performer.net.layers.0.0.fn.to_q.bias" in state_dict,
        attn_out_bias="performer.net.layers.0.0.fn.to_out.bias" in state_dict,
        g2v_position_emb="pos_emb.emb.weight" in state_dict,
    )


def load_checkpoint(path: str, *, heads: int | None = None) -> Checkpoint:
    """Read a checkpoint (ours or the reference's) into a `Checkpoint`; raises `CheckpointError` with the fix."""
    payload = read_checkpoint_file(path)
    state_dict = _state_dict_of(payload, path)
    genes = payload.get("genes")
    classes = payload.get("classes")
    if isinstance(payload.get("config"), dict):
        config = dict(payload["config"])
        head = payload.get("head", infer_head(state_dict))
        source = "scbert"
        if heads is not None and heads != config.get("heads"):
            raise CheckpointError(
                f"heads={heads} does not fit the checkpoint, which was trained with {config.get('heads')} heads: "
                "leave heads unset"
            )
    else:
        config = infer_config(state_dict, heads=heads, max_seq_len=len(genes) + 1 if genes else None)
        head = infer_head(state_dict)
        source = "reference"
    return Checkpoint(
        path=path,
        state_dict=state_dict,
        config=config,
        head=head,
        genes=list(genes) if genes is not None else None,
        classes=list(classes) if classes is not None else None,
        payload=payload,
        source=source,
        model_type=str(payload.get("model_type") or DEFAULT_MODEL_TYPE),
    )


def make_head(head: dict[str, Any] | None, config: dict[str, Any]) -> torch.nn.Module | None:
    """Build the `to_out` module a head description names."""
    if head is None:
        return None
    if head["type"] == "lm":
        return torch.nn.Linear(config["dim"], config["num_tokens"])
    if head["type"] == "classifier":
        return ClassificationHead(
            seq_len=head.get("seq_len", config["max_seq_len"]),
            dim=head.get("dim", config["dim"]),
            n_classes=head["n_classes"],
            h_dim=head.get("h_dim", 128),
            hidden=head.get("hidden", 512),
            dropout=head.get("dropout", 0.0),
            class_blocks=head.get("class_blocks"),
        )
    raise CheckpointError(f"unknown head type {head['type']!r} in the checkpoint: it was not written by this project")


def build_model(
    ckpt: Checkpoint, *, head: str = "checkpoint", model_cls: type[PerformerLM] = PerformerLM, **overrides: Any
) -> PerformerLM:
    """A PerformerLM (or the subclass `model_cls`, e.g. models.py's family class) holding the checkpoint's weights,
    loaded with strict=True.

    head: "checkpoint" keeps the checkpoint's own `to_out`; "none" drops it (the trunk, e.g. to attach a new
    classification head); "lm" requires the pretraining head. overrides: PerformerLM keyword arguments that do not
    change the weights' shapes (dropouts, feature_redraw_interval, ff_chunks).
    """
    config = {**ckpt.config, **overrides}
    state_dict = dict(ckpt.state_dict)
    if head == "checkpoint":
        head_config = ckpt.head
    elif head == "none":
        head_config = None
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("to_out.")}
    elif head == "lm":
        if ckpt.head is None or ckpt.head["type"] != "lm":
            raise CheckpointError(
                f"{ckpt.path!r} has no pretraining (LM) head: pass a pretrained checkpoint, not a fine-tuned one"
            )
        head_config = ckpt.head
    else:
        raise ValueError(f"head must be 'checkpoint', 'none' or 'lm', got {head!r}")
    if ckpt.model_type != DEFAULT_MODEL_TYPE:
        raise CheckpointError(
            f"{ckpt.path!r} holds a {ckpt.model_type!r} model, not a Performer: load it with models.load_model"
        )
    model = model_cls(**config, lm_head=False)
    model.to_out = make_head(head_config, config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise CheckpointError(
            f"the weights in {ckpt.path!r} do not fit the requested model ({detail}): check the model-size flags or "
            "use the checkpoint's own settings"
        ) from err
    return model


def checkpoint_payload(
    model: torch.nn.Module, *, genes: list[str] | None, classes: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    """The dict we save: the reference's `model_state_dict` plus what rebuilds and uses the model on its own."""
    core = getattr(model, "module", model)  # unwrap DistributedDataParallel
    core = getattr(core, "_orig_mod", core)  # unwrap torch.compile
    return {
        "model_state_dict": {k: v.detach().cpu() for k, v in core.state_dict().items()},
        "model_type": str(getattr(core, "model_type", DEFAULT_MODEL_TYPE)),
        "config": dict(core.config),
        "head": core.head_config,
        "genes": list(genes) if genes is not None else None,
        "classes": list(classes) if classes is not None else None,
        "scbert_format_version": FORMAT_VERSION,
        **({"redraw": core.redraw_state()} if hasattr(core, "redraw_state") else {}),
        **extra,
    }


def save_checkpoint(payload: dict[str, Any], path: str) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename over it: never a half-written checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
