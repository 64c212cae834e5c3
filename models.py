"""Model families behind one interface, and the registry that builds them by name.

A family is an `nn.Module` class registered with `@register_model("<name>")`. Checkpoints record the name as
`model_type` (files without one, the reference's included, are "performer"), so `load_model(path)` rebuilds any
family, and the scripts, the classification core and the annotation API never reach into a family's insides.

What a family implements (the Performer's below is the worked example):

    model_type: str                         set by @register_model
    config: dict                            keyword arguments that rebuild the trunk: build_model(model_type, config)
    head_config: dict | None                what the attached head is, so a checkpoint can rebuild it
    vocab                                   a Vocab (see `Vocab`): owns the token arithmetic and makes batches
    vocab_for(config) -> Vocab              staticmethod: the vocabulary of a stored config (checks before building)
    make_batch(values) -> dict              (cells, genes) log-normalised values -> the family's batch of tensors
    encode(batch) -> (cells, tokens, dim)   the trunk's encodings
    pool(encodings, batch) -> (cells, dim)  the cell embedding (obsm['X_scbert'])
    named_blocks() -> [(name, module)]      the trunk's blocks in order (what --unfreeze_layers indexes)
    trainable_groups(spec) -> [module]      the trunk modules that train under an --unfreeze_layers spec
    attach_head(n_classes, **options)       a fresh cell-type head; returns the model
    head -> nn.Module | None                the attached head: head(encodings) -> logits (annotate.py encodes once for
                                            logits and embeddings); its last nn.Linear gives the class logits
    classify(batch, return_hidden=False)    (cells, n_classes) logits, or (logits, hidden): hidden is the input of
                                            the head's last Linear (continual learning's z)
    forward(batch, return_hidden=False)     what `model(batch)` computes with the attached head (the pretraining
                                            output with its pretraining head, logits with a cell-type head); training
                                            calls this, because DistributedDataParallel only syncs through forward
    from_checkpoint(ckpt, head=..., **overrides)  classmethod: the checkpoint's model, loaded strictly
    config_from_args(args) -> (config, options)   classmethod: the trunk from the shared command-line flags, with
                                            the family's own flag checks; build_model(model_type, config, **options,
                                            lm_head=<pretraining head wanted>) must then build it

A batch is a dict of tensors whose first dimension is cells; the keys are the family's ("tokens" for the
Performer). Datasets call `vocab.make_cell(values)` per cell, so the loaders stay family-agnostic.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from performer_pytorch import ClassificationHead, PerformerLM
from performer_pytorch.checkpoint import Checkpoint, load_checkpoint
from performer_pytorch.checkpoint import build_model as build_performer
from utils import ScbertError, tokenize

__all__ = [
    "MODEL_TYPES",
    "BinVocab",
    "ScbertPerformer",
    "Vocab",
    "build_model",
    "checkpoint_model_type",
    "load_model",
    "model_family",
    "parse_block_spec",
    "register_model",
]

MODEL_TYPES: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register a model family under `name` (the `model_type` its checkpoints record)."""

    def register(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MODEL_TYPES and MODEL_TYPES[name] is not cls:
            raise ValueError(f"model type {name!r} is already registered by {MODEL_TYPES[name].__name__}")
        cls.model_type = name
        MODEL_TYPES[name] = cls
        return cls

    return register


def model_family(model_type: str) -> type[nn.Module]:
    """The registered class of `model_type`; unknown names are refused with the known ones."""
    if model_type not in MODEL_TYPES:
        raise ScbertError(
            f"unknown model type {model_type!r}: this version knows {', '.join(sorted(MODEL_TYPES))}; update the "
            "code, or pass a checkpoint of one of those"
        )
    return MODEL_TYPES[model_type]


def build_model(model_type: str, config: dict[str, Any], **options: Any) -> nn.Module:
    """A new model of family `model_type` from its `config` (e.g. another model's `.config`), with fresh weights.

    options: constructor arguments that are not part of the config (the Performer's `gene2vec` table, `lm_head`).
    """
    return model_family(model_type)(**config, **options)


def load_model(checkpoint: Checkpoint | str, *, head: str = "checkpoint", **overrides: Any) -> nn.Module:
    """The model a checkpoint holds (any family, by its `model_type`), loaded with strict=True.

    head: "checkpoint" (its own head), "none" (the trunk only, to attach a new head) or "lm" (its pretraining head,
    required). overrides: constructor arguments that leave the weights' shapes alone (dropouts, ...).
    """
    ckpt = load_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    return model_family(ckpt.model_type).from_checkpoint(ckpt, head=head, **overrides)


def parse_block_spec(spec: str | Sequence[int], depth: int) -> list[int] | str:
    """`--unfreeze_layers` -> sorted non-negative block indices, or "all". Accepts "all", "none" or a comma list of
    indices (negative count from the end). Raises ScbertError for text or indices that do not fit `depth` blocks."""
    if not isinstance(spec, str):
        spec = ",".join(str(int(i)) for i in spec)
    text = spec.strip().lower()
    if text == "all":
        return "all"
    if text in {"none", ""}:
        return []
    try:
        raw = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ScbertError(
            f"--unfreeze_layers {spec!r} is not understood: pass block indices such as -2 or 0,-1, 'all' or 'none'"
        ) from None
    bad = [i for i in raw if not -depth <= i < depth]
    if bad:
        raise ScbertError(
            f"--unfreeze_layers {spec!r} names block {bad[0]} but the model has {depth} blocks (indices {-depth}.."
            f"{depth - 1}): pass indices in that range, 'all' or 'none'"
        )
    return sorted({i % depth for i in raw})


# ---------------------------------------------------------------------------------------------------------------------
# Vocabularies: what a cell becomes before the model sees it
# ---------------------------------------------------------------------------------------------------------------------


class Vocab(Protocol):
    """What a family's vocabulary provides (the loaders and the annotation API use only this)."""

    gene_num: int

    def make_cell(self, values: np.ndarray) -> dict[str, torch.Tensor]:
        """(genes,) float32 values of one cell -> the batch entries of that cell (no cells dimension)."""
        ...

    def make_batch(self, values: np.ndarray | sp.spmatrix) -> dict[str, torch.Tensor]:
        """(cells, genes) values -> a batch dict of tensors with cells first."""
        ...


@dataclass(frozen=True)
class BinVocab:
    """scBERT's tokens (SPEC section 1): bins 0..bin_num of log2(1 + CP10K), then one appended 0 token per cell.

    The token arithmetic lives here and nowhere else: num_tokens = bin_num + 2 (the bins and the mask/pad token
    bin_num + 1), seq_len = gene_num + 1 (the genes and the appended token).
    """

    bin_num: int
    gene_num: int

    @property
    def num_tokens(self) -> int:
        return self.bin_num + 2

    @property
    def seq_len(self) -> int:
        return self.gene_num + 1

    @property
    def mask_token(self) -> int:
        """The mask token, also the padding label pretraining ignores (the reference uses one id for both)."""
        return self.bin_num + 1

    pad_token = mask_token

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BinVocab:
        """The vocabulary of a Performer config (`num_tokens`, `max_seq_len`)."""
        return cls(bin_num=int(config["num_tokens"]) - 2, gene_num=int(config["max_seq_len"]) - 1)

    def config(self) -> dict[str, int]:
        """The Performer keyword arguments this vocabulary fixes."""
        return {"num_tokens": self.num_tokens, "max_seq_len": self.seq_len}

    def make_cell(self, values: np.ndarray) -> dict[str, torch.Tensor]:
        return {"tokens": tokenize(values, self.bin_num)}  # (genes + 1,)

    def make_batch(self, values: np.ndarray | sp.spmatrix) -> dict[str, torch.Tensor]:
        return {"tokens": tokenize(values, self.bin_num)}  # (cells, genes + 1)


# ---------------------------------------------------------------------------------------------------------------------
# The Performer family: scBERT
# ---------------------------------------------------------------------------------------------------------------------


def pool_expressed(encodings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean encoding over each cell's expressed genes (non-zero tokens; all genes for a cell expressing none).

    encodings: (cells, genes + 1, dim) after the final norm; tokens: (cells, genes + 1), the last one appended.
    Returns (cells, dim) float32. Why: most of a cell's tokens are zeros whose encodings are nearly the same in every
    cell, which would drown a plain mean.
    """
    genes = encodings[:, :-1].float()  # the appended token is no gene
    mask = (tokens[:, :-1] > 0).float()
    mask[mask.sum(dim=1) == 0] = 1.0
    return (genes * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True)


@register_model("performer")
class ScbertPerformer(PerformerLM):
    """scBERT's `PerformerLM` behind the family interface; parameter names, and so checkpoints, are unchanged.

    Batch: {"tokens": (cells, genes + 1) int64}. Head: `to_out`, the LM head Linear(dim, num_tokens) for
    pretraining or scBERT's `ClassificationHead` (a per-gene read-out of all token encodings, then an MLP).
    """

    model_type = "performer"
    HEAD_H_DIM = 128  # SPEC section 2: the head's Linear(512, 128)
    HEAD_HIDDEN = 512

    @property
    def vocab(self) -> BinVocab:
        return BinVocab.from_config(self.config)

    @staticmethod
    def vocab_for(config: dict[str, Any]) -> BinVocab:
        """The vocabulary of a stored config (to check data against a checkpoint before building its model)."""
        return BinVocab.from_config(config)

    def make_batch(self, values: np.ndarray | sp.spmatrix) -> dict[str, torch.Tensor]:
        return self.vocab.make_batch(values)

    @staticmethod
    def _tokens(batch: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        return batch["tokens"] if isinstance(batch, dict) else batch

    def forward(self, batch: dict[str, torch.Tensor] | torch.Tensor, return_encodings: bool = False,
                return_hidden: bool = False):
        """A batch dict (or its (cells, genes + 1) tokens) -> the head's output, the encodings with
        `return_encodings`, or (logits, hidden) with `return_hidden` (cell-type head only)."""
        encodings = super().forward(self._tokens(batch), return_encodings=True)
        if return_encodings or self.to_out is None:
            return encodings
        if return_hidden:
            if not isinstance(self.to_out, ClassificationHead):
                raise ValueError("return_hidden needs a cell-type head: call attach_head first")
            return self.to_out(encodings, return_hidden=True)
        return self.to_out(encodings)

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(cells, genes + 1, dim) encodings after the final norm."""
        return super().forward(self._tokens(batch), return_encodings=True)

    def pool(self, encodings: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(cells, dim) float32: the mean over expressed genes (`pool_expressed`)."""
        return pool_expressed(encodings, self._tokens(batch))

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"block{i}", layer) for i, layer in enumerate(self.performer.net.layers)]

    def trainable_groups(self, spec: str | Sequence[int] | list[int]) -> list[nn.Module]:
        """As published (SPEC section 4): the final `norm` plus the chosen blocks; "all": the whole trunk except the
        gene2vec table, which is never trained. The head is not included (the classification core adds it)."""
        parsed = parse_block_spec(spec, len(self.performer.net.layers)) if not isinstance(spec, list) else spec
        if parsed == "all":
            return [self.token_emb, self.performer, self.norm]
        layers = self.performer.net.layers
        return [self.norm, *(layers[i] for i in parsed)]

    @property
    def head(self) -> nn.Module | None:
        return self.to_out

    def attach_head(self, n_classes: int, *, h_dim: int = HEAD_H_DIM, hidden: int = HEAD_HIDDEN,
                    dropout: float = 0.0) -> ScbertPerformer:
        """Replace `to_out` by a freshly initialised scBERT classification head for `n_classes` (widths: the first
        hidden layer `hidden`, the penultimate `h_dim`; CANAL narrows them to 128 and 64)."""
        self.to_out = ClassificationHead(seq_len=self.config["max_seq_len"], dim=self.config["dim"],
                                         n_classes=int(n_classes), h_dim=h_dim, hidden=hidden, dropout=dropout)
        self.to_out.reset_gene_scorer()  # a scorer that starts alive whatever the encodings (see its docstring)
        return self

    def classify(self, batch: dict[str, torch.Tensor], return_hidden: bool = False):
        """(cells, n_classes) logits, or (logits, (cells, h_dim) hidden) with `return_hidden`."""
        if not isinstance(self.to_out, ClassificationHead):
            raise ValueError("this model has no cell-type head: call attach_head(n_classes) first")
        return self(batch, return_hidden=return_hidden)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, *, head: str = "checkpoint", **overrides: Any) -> ScbertPerformer:
        return build_performer(ckpt, head=head, model_cls=cls, **overrides)

    @classmethod
    def config_from_args(cls, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
        """(config, options) from the shared flags: sizes, the vocabulary, and the gene2vec table when used."""
        if args.pos_embed and not args.gene2vec_path:
            raise ScbertError(
                "--pos_embed True needs gene2vec rows: pass --gene2vec_path <.npy from gene2vec.py> (one row per gene "
                "of the data, width --dim), or --pos_embed False to train without them"
            )
        if args.gene2vec_path and args.pos_embed and not os.path.isfile(args.gene2vec_path):
            raise ScbertError(f"gene2vec file {args.gene2vec_path!r} does not exist: check --gene2vec_path")
        vocab = BinVocab(bin_num=args.bin_num, gene_num=args.gene_num)
        config = dict(**vocab.config(), dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim_head,
                      g2v_position_emb=bool(args.pos_embed))
        return config, {"gene2vec": args.gene2vec_path if args.pos_embed else None}


def checkpoint_model_type(path: str, requested: str | None = None) -> str:
    """The family a checkpoint holds; a `--model_type` the user gave (`requested`) must agree with it."""
    found = load_checkpoint(path).model_type
    if requested is not None and requested != found:
        raise ScbertError(f"--model_type {requested} does not match {path!r}, which holds a {found!r} model: drop "
                          f"--model_type (the checkpoint decides) or pass --model_type {found}")
    return found


# The scGPT-style transformer (transformer_model.py), registered here so `MODEL_TYPES` knows every family.
from transformer_model import TransformerModel  # noqa: E402

register_model("transformer")(TransformerModel)
