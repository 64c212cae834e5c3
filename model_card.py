"""Model cards: what a fine-tuned checkpoint is, in plain data stored inside it, and the lines that print it.

    python predict.py --show_model ckpts/finetune_best.pth

finetune.py (and continual.py's stages, through `classification.train_classifier`) store a card under the
checkpoint key "model_card" (`CARD_KEY`): only str / int / float / bool / None, lists and dicts, so the file still
loads with `torch.load(..., weights_only=True)`. Fields:

    card_version      1
    description       --description, or a sentence naming the data and the number of classes
    model_type        the model family ("performer", "transformer"); model_size: parameters, depth, dim, heads
    classes           [{"name", "train_cells", "valid_cells"}] in the head's output order
    genes             {"count", "sha256"}: sha256 of the gene list joined by newlines (`genes_hash`), so two
                      checkpoints over the same reference genes in the same order have the same hash
    training_data     {"path" (a list for a continual stream), "label_key", "cells", "train_cells", "valid_cells"}
    validation        {"epoch", "accuracy", "macro_f1", "cells", "per_class_f1": {name: f1}}
    pretrained_from   the --model_path fine-tuning started from ("none" for random weights), and that checkpoint's
                      own card's pretrained_from when it has one (pretraining_source)
    created           UTC time the card was written (ISO 8601); project_version: the git commit of this code or
                      "unknown" outside a git checkout

Checkpoints written before cards (and the reference's) have none: `describe_checkpoint` prints what they do hold.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import os
import subprocess
from collections.abc import Sequence
from typing import Any

import numpy as np

CARD_KEY = "model_card"
CARD_VERSION = 1
ROOT = os.path.dirname(os.path.abspath(__file__))


def genes_hash(genes: Sequence[str]) -> str:
    """sha256 (hex) of the gene names joined by newlines: equal exactly when the lists and their order are."""
    return hashlib.sha256("\n".join(map(str, genes)).encode("utf-8")).hexdigest()


@functools.cache
def project_version() -> str:
    """The git commit (short) this code runs from, "+changes" when the checkout has uncommitted edits, or
    "unknown" (no git, or not a checkout)."""
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"git {commit}{'+changes' if dirty else ''}" if commit else "unknown"


def model_size(model) -> dict[str, Any]:
    """Parameter count and the family's main dimensions (those its config names)."""
    core = getattr(model, "module", model)
    config = dict(getattr(core, "config", {}) or {})
    size: dict[str, Any] = {"parameters": int(sum(p.numel() for p in core.parameters()))}
    for key in ("depth", "dim", "heads", "dim_head", "nlayers", "d_model", "nhead", "max_seq_len", "num_tokens"):
        if isinstance(config.get(key), int | float) and not isinstance(config.get(key), bool):
            size[key] = config[key]
    return size


@functools.cache
def _pretraining_source(model_path: str | None) -> tuple[str, str | None]:
    """(--model_path as given or "none", the pretraining source that checkpoint's own card names)."""
    if not model_path:
        return "none (random weights)", None
    from performer_pytorch.checkpoint import read_checkpoint_file
    from utils import ScbertError

    try:
        earlier = read_checkpoint_file(model_path).get(CARD_KEY) or {}
    except ScbertError:
        earlier = {}
    return os.path.abspath(model_path), earlier.get("pretrained_from") if isinstance(earlier, dict) else None


def build_card(*, args, model, genes: Sequence[str], classes: Sequence[str], labels: np.ndarray,
               train_idx: np.ndarray, valid_idx: np.ndarray, metrics: dict[str, Any]) -> dict[str, Any]:
    """The card of a classification run's best model. args: the run's flags (data_path, label_key, model_path,
    model_type, description read when present); labels: class index of every cell; metrics:
    `metrics.classification_metrics` of the validation cells plus "epoch"."""
    n = len(classes)
    train_counts = np.bincount(np.asarray(labels)[train_idx], minlength=n)
    valid_counts = np.bincount(np.asarray(labels)[valid_idx], minlength=n)
    data_path = getattr(args, "data_path", None)  # one file (finetune.py) or a stream of them (continual.py)
    data_paths = [os.path.abspath(str(p)) for p in ([data_path] if isinstance(data_path, str) else data_path or [])]
    names = ", ".join(os.path.basename(p) for p in data_paths) or "in-memory data"
    description = getattr(args, "description", None) or (
        f"{getattr(args, 'model_type', 'performer')} model fine-tuned on {names} to classify {n} cell types "
        f"(obs[{getattr(args, 'label_key', 'celltype')!r}])")
    pretrained_from, source = _pretraining_source(getattr(args, "model_path", None))
    per_class = metrics.get("per_class") or {}
    return {
        "card_version": CARD_VERSION,
        "description": str(description),
        "model_type": str(getattr(model, "model_type", getattr(args, "model_type", "performer"))),
        "model_size": model_size(model),
        "classes": [{"name": str(c), "train_cells": int(t), "valid_cells": int(v)}
                    for c, t, v in zip(classes, train_counts, valid_counts, strict=True)],
        "genes": {"count": len(genes), "sha256": genes_hash(genes)},
        "training_data": {"path": data_paths[0] if len(data_paths) == 1 else (data_paths or "in memory"),
                          "label_key": str(getattr(args, "label_key", "")), "cells": int(len(labels)),
                          "train_cells": int(len(train_idx)), "valid_cells": int(len(valid_idx))},
        "validation": {"epoch": int(metrics["epoch"]), "accuracy": float(metrics["accuracy"]),
                       "macro_f1": float(metrics["macro_f1"]), "cells": int(metrics.get("n_cells", len(valid_idx))),
                       "per_class_f1": {str(k): float(v["f1"]) for k, v in per_class.items() if "f1" in v}},
        "pretrained_from": pretrained_from,
        "pretraining_source": source or pretrained_from,
        "created": datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat(),
        "project_version": project_version(),
    }


def format_card(card: dict[str, Any]) -> str:
    """The card as readable lines."""
    size = card.get("model_size", {})
    dims = ", ".join(f"{k} {v}" for k, v in size.items() if k != "parameters")
    val = card.get("validation", {})
    data = card.get("training_data", {})
    lines = [
        f"description: {card.get('description', '')}",
        f"model: {card.get('model_type', '?')}, {size.get('parameters', 0):,} parameters ({dims})",
        f"genes: {card.get('genes', {}).get('count', '?')} (sha256 {card.get('genes', {}).get('sha256', '?')})",
        f"training data: {data.get('path', '?')} obs[{data.get('label_key', '?')!r}], {data.get('cells', '?')} "
        f"cells ({data.get('train_cells', '?')} train / {data.get('valid_cells', '?')} validation)",
        f"validation (epoch {val.get('epoch', '?')}): accuracy {val.get('accuracy', float('nan')):.4f}, macro-F1 "
        f"{val.get('macro_f1', float('nan')):.4f} over {val.get('cells', '?')} cells",
        f"pretrained from: {card.get('pretrained_from', '?')}"
        + (f" (pretraining source: {card['pretraining_source']})"
           if card.get("pretraining_source") not in (None, card.get("pretrained_from")) else ""),
        f"created: {card.get('created', '?')}; project version: {card.get('project_version', '?')}",
        f"classes ({len(card.get('classes', []))}): name, training cells, validation cells, validation F1",
    ]
    f1 = val.get("per_class_f1", {})
    for item in card.get("classes", []):
        score = f1.get(item["name"])
        lines.append(f"  {item['name']}: {item['train_cells']}, {item['valid_cells']}, "
                     f"{'n/a' if score is None else f'{score:.3f}'}")
    return "\n".join(lines)


def describe_checkpoint(path: str) -> str:
    """The card of the checkpoint at `path`, or, for one without a card, what it holds (format, family, size,
    genes, classes, epoch, stored metrics)."""
    from performer_pytorch import load_checkpoint
    from utils import ScbertError

    if not os.path.isfile(path):
        raise ScbertError(f"checkpoint {path!r} does not exist: check the path given to --show_model")
    ckpt = load_checkpoint(path)
    card = ckpt.payload.get(CARD_KEY)
    header = f"{os.path.abspath(path)} ({ckpt.source} format)"
    if isinstance(card, dict):
        return f"{header}\n{format_card(card)}"
    config = ckpt.config
    dims = ", ".join(f"{k} {config[k]}" for k in ("depth", "dim", "heads", "dim_head", "max_seq_len") if k in config)
    params = sum(int(t.numel()) for t in ckpt.state_dict.values())
    lines = [header, "no model card (written before cards, or not by finetune.py); what the file holds:",
             f"model: {ckpt.model_type}, {params:,} parameters ({dims})"]
    if ckpt.genes is not None:
        lines.append(f"genes: {len(ckpt.genes)} (sha256 {genes_hash(ckpt.genes)})")
    else:
        lines.append("genes: no gene list stored (a reference checkpoint: preprocess with --ref panglao)")
    head = ckpt.head or {}
    if ckpt.classes is not None:
        lines.append(f"classes ({len(ckpt.classes)}): {', '.join(map(str, ckpt.classes))}")
    elif head.get("type") == "classifier":
        lines.append(f"classes: {head.get('n_classes')} outputs, names not stored (pass --label_dict to predict.py)")
    else:
        lines.append(f"head: {head.get('type', 'none')}")
    if "epoch" in ckpt.payload:
        lines.append(f"epoch: {ckpt.payload['epoch']}")
    metrics = ckpt.payload.get("metrics")
    if isinstance(metrics, dict) and "accuracy" in metrics:
        lines.append(f"stored validation metrics: accuracy {metrics['accuracy']:.4f}, macro-F1 "
                     f"{metrics.get('macro_f1', float('nan')):.4f}")
    return "\n".join(lines)


def show_model(argv: Sequence[str]) -> str | None:
    """With --show_model PATH: the card of PATH (model_card.py), printed; None without the flag."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--show_model", default=None)
    path = pre.parse_known_args(argv)[0].show_model
    if path is None:
        return None
    text = describe_checkpoint(path)
    print(text)
    return text
