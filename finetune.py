"""Fine-tune scBERT to classify cell types (SPEC section 4), with the reference's defects fixed.

The published command keeps working (same flags, same defaults):

    python finetune.py --data_path Zheng68K.h5ad --model_path panglao_pretrain.pth \\
        --epoch 100 --seed 2021 --batch_size 3 --learning_rate 1e-4 --grad_acc 60 --valid_every 1 --pos_embed True \\
        --ckpt_dir ./ckpts/ --model_name finetune

As published, by default: classes = the sorted unique names in `obs[--label_key]`; one stratified 80/20 split with
the base seed; the pretrained trunk frozen except its final `norm` and its second-to-last block, plus a new
classification head; cross-entropy, Adam, `CosineAnnealingWarmupRestarts` stepped once per epoch, gradient clip 1e6;
the best validation accuracy kept; stop after 10 validations without improvement.
Fixed: every cell once per epoch (the reference bootstrapped every epoch, validation included), the loss divided by
the accumulation steps, one writer (rank 0, atomic files), no pickles, plain `python`/`torchrun`/legacy launcher on
CPU or GPU. The reference's choices stay reachable: `--sampling bootstrap`, `--loss_div_grad_acc False`; others are
new: `--unfreeze_layers`, `--class_weight inverse`, `--label_smoothing`, `--n_splits` (k-fold cross-validation).
A small run on a laptop (a tiny pretrained model, e.g. from pretrain.py):

    python finetune.py --data_path train.h5ad --label_key celltype --model_path ckpts/tiny_5.pth \\
        --gene_num <genes> --batch_size 16 --grad_acc 1 --learning_rate 1e-3 --epoch 20 --model_name tiny_ft

Writes, in `--ckpt_dir` (rank 0 only, each file atomically; never over another run's files):
    <model_name>_best.pth            the best epoch's model: config, head, genes, classes, epoch and metrics, so
                                     predict.py needs nothing else
    <model_name>_label_dict.txt      class names, one per line, in class-index order (no pickle)
    <model_name>_label.npy           every cell's class index in data order (np.load, no pickle)
    <model_name>_metrics.json        the best epoch's validation accuracy, macro-F1, per-class precision/recall/F1/
                                     support and confusion matrix
    <model_name>_confusion.csv/.png  that confusion matrix (rows: true class, columns: predicted)
    <model_name>_<epoch>.pth         the latest epoch's full state (rerunning the same command resumes from it)
    <model_name>_log.jsonl           one JSON line per epoch (or --log_path)
With `--n_splits k` (k >= 2) each fold i = 1..k is such a run named `<model_name>_fold<i>`, and
`<model_name>_cv.json` holds every fold's best metrics with their mean and standard deviation.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from head_health import HeadWatch, handle_dead_head, start_head_alive
from label_io import write_label_files
from performer_pytorch import ClassificationHead, PerformerLM, build_model, load_checkpoint
from performer_pytorch.checkpoint import read_checkpoint_file
from training import (
    Amp,
    BootstrapSampler,
    CellDataset,
    CosineAnnealingWarmupRestarts,
    DistContext,
    JsonlLogger,
    build_loader,
    build_model_from_args,
    cleanup_distributed,
    epoch_checkpoint_path,
    evaluate,
    get_common_parser,
    load_training_data,
    named_checkpoint_path,
    print0,
    resolve_log_path,
    resolve_resume,
    restore_training_state,
    save_training_checkpoint,
    seed_everything,
    set_loader_epoch,
    setup_distributed,
    split_indices,
    train_one_epoch,
    wrap_model,
)
from utils import ScbertError, atomic_write_bytes, run_cli, str2bool

VALID_SIZE = 0.2  # SPEC section 4: one stratified 80/20 split
GRAD_CLIP = 1e6  # SPEC section 4: the published fine-tuning clip (in effect none; pretraining clips at 100)
HEAD_H_DIM = 128  # SPEC section 2: the head's Linear(512, 128)
MIN_LR, WARMUP, FIRST_CYCLE, CYCLE_MULT, GAMMA = 1e-6, 5, 15, 2, 0.9  # SPEC sections 4 and 6


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fine-tune scBERT on a labelled, preprocessed .h5ad to classify cell types.",
        parents=[get_common_parser()],
        add_help=add_help,
    )
    group = parser.add_argument_group("fine-tuning")
    group.add_argument("--model_path", type=str, default=None,
                       help="pretrained checkpoint (ours or the reference's panglao_pretrain.pth); its architecture "
                            "and gene list win over the size flags. Without it: random weights, the 'no "
                            "pretraining' ablation")
    group.add_argument("--label_key", type=str, default="celltype",
                       help="obs column holding the cell types (classes = its sorted unique values)")
    group.add_argument("--unfreeze_layers", type=str, default="-2",
                       help="Performer blocks that train besides the final norm and the head: comma-separated indices "
                            "(negative count from the end; published: -2), 'all' (the whole trunk except the "
                            "gene2vec table) or 'none' (norm and head only)")
    group.add_argument("--sampling", choices=["epoch", "bootstrap"], default="epoch",
                       help="epoch: every training cell once per epoch; bootstrap: each epoch draws as many cells "
                            "with replacement (the reference's sampling). Validation always sees each cell once")
    group.add_argument("--class_weight", choices=["none", "inverse"], default="none",
                       help="none (as published: the reference computed weights but never used them) or inverse: "
                            "cross-entropy weights 1/class frequency of the training cells, averaging 1 (helps "
                            "imbalanced data)")
    group.add_argument("--label_smoothing", type=float, default=0.0,
                       help="cross-entropy label smoothing in [0, 1) (0 as published)")
    group.add_argument("--n_splits", type=int, default=1,
                       help="1: one stratified 80/20 split (published); k >= 2: stratified k-fold cross-validation, "
                            "one run per fold, with a mean and spread summary in <model_name>_cv.json")
    group.add_argument("--patience", type=int, default=10,
                       help="stop after this many validations in a row without a better accuracy (0: never stop)")
    group.add_argument("--loss_div_grad_acc", type=str2bool, default=True,
                       help="divide the loss by --grad_acc so accumulated gradients average micro-batches; False "
                            "reproduces the reference, which summed them")
    group.add_argument("--keep_epoch_ckpts", type=str2bool, default=False,
                       help="keep every <model_name>_<epoch>.pth; by default only the latest, which resuming needs, "
                            "is kept (each holds the whole model and optimiser)")
    parser.set_defaults(model_name="finetune")
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# Labels, splits, class weights, loss
# ---------------------------------------------------------------------------------------------------------------------


def read_labels(obs, label_key: str, *, data_name: str = "the data") -> tuple[list[str], np.ndarray]:
    """Class names (sorted unique, as the reference's `np.unique`) and each cell's class index (int64, data order).

    obs: the AnnData `obs` frame. Raises ScbertError for a missing column (listing those there are), missing (NaN)
    labels, a single class, or a class with one cell (a stratified split cannot put it on both sides).
    """
    if label_key not in obs.columns:
        available = ", ".join(repr(str(c)) for c in obs.columns[:30]) or "none"
        raise ScbertError(
            f"{data_name} has no obs column {label_key!r} (its obs columns: {available}): pass the column holding "
            "the cell types with --label_key"
        )
    column = obs[label_key]
    missing = int(np.asarray(column.isna()).sum())
    if missing:
        raise ScbertError(
            f"{missing} of {len(column)} cells have no label (NaN) in obs[{label_key!r}]: remove those cells or give "
            "them a label before fine-tuning"
        )
    names = np.asarray(column.astype(str))
    classes, labels = np.unique(names, return_inverse=True)
    classes = [str(c) for c in classes]
    if len(classes) < 2:
        raise ScbertError(
            f"obs[{label_key!r}] holds one class only ({classes[0]!r}): a classifier needs at least two cell types"
        )
    counts = np.bincount(labels, minlength=len(classes))
    single = [classes[i] for i in np.flatnonzero(counts == 1)]
    if single:
        raise ScbertError(
            f"cell type {', '.join(map(repr, single[:10]))} in obs[{label_key!r}] has a single cell, which a "
            "stratified split cannot put in both training and validation: remove that cell or merge the type with a "
            "related one"
        )
    return classes, labels.astype(np.int64)


def make_splits(labels: np.ndarray, *, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) cell indices, each sorted: one stratified 80/20 split, or stratified k-fold.

    n_splits 1: `train_test_split(test_size=0.2, random_state=seed, stratify=labels)`, which gives exactly the
    reference's `StratifiedShuffleSplit(n_splits=1, test_size=0.2, random_state=seed)` split (it is that splitter
    inside), so published seeds give published splits. n_splits k >= 2: `StratifiedKFold(k, shuffle=True,
    random_state=seed)`. The same on every rank.
    """
    if n_splits < 1:
        raise ScbertError(f"--n_splits must be at least 1 (1 = one 80/20 split), got {n_splits}")
    counts = np.bincount(labels)
    if n_splits == 1:
        n_valid = math.ceil(VALID_SIZE * len(labels))
        if min(n_valid, len(labels) - n_valid) < len(counts):
            raise ScbertError(
                f"{len(labels)} cells are too few for an 80/20 split that holds each of the {len(counts)} cell "
                "types on both sides: use more cells or fewer cell types"
            )
        return [split_indices(len(labels), VALID_SIZE, seed, stratify=labels)]
    from sklearn.model_selection import StratifiedKFold

    if counts.min() < n_splits:
        raise ScbertError(
            f"the smallest cell type has {counts.min()} cells, fewer than the {n_splits} folds asked for, so some "
            "validation folds would miss it: lower --n_splits, or remove or merge the rare types"
        )
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [(np.sort(tr), np.sort(va)) for tr, va in folds.split(np.zeros((len(labels), 1)), labels)]


def inverse_frequency_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Weights proportional to 1 / (cells of the class), scaled to average 1 over classes: (n_classes,) float32.

    A class with no cell in `labels` gets weight 0 (it cannot occur in the loss anyway).
    """
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    weights *= n_classes / weights.sum()
    return torch.tensor(weights, dtype=torch.float32)


def build_criterion(args: argparse.Namespace, train_labels: np.ndarray, n_classes: int) -> nn.CrossEntropyLoss:
    """Cross-entropy, a mean over the batch, with `--class_weight` and `--label_smoothing`."""
    if not 0.0 <= args.label_smoothing < 1.0:
        raise ScbertError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    weight = inverse_frequency_weights(train_labels, n_classes) if args.class_weight == "inverse" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=args.label_smoothing)


def build_scheduler(optimizer: torch.optim.Optimizer, learning_rate: float) -> CosineAnnealingWarmupRestarts:
    """The published schedule (SPEC section 6), stepped once per epoch: epoch 1 runs at min_lr 1e-6."""
    return CosineAnnealingWarmupRestarts(optimizer, first_cycle_steps=FIRST_CYCLE, cycle_mult=CYCLE_MULT,
                                         max_lr=learning_rate, min_lr=MIN_LR, warmup_steps=WARMUP, gamma=GAMMA)


# ---------------------------------------------------------------------------------------------------------------------
# Model: trunk, head, what trains
# ---------------------------------------------------------------------------------------------------------------------


def parse_unfreeze(spec: str, depth: int) -> list[int] | str:
    """`--unfreeze_layers` -> sorted non-negative block indices, or "all". Accepts "all", "none" or a comma list of
    indices (negative count from the end). Raises ScbertError for text or indices that do not fit `depth` blocks."""
    text = str(spec).strip().lower()
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


def set_trainable(model: PerformerLM, unfreeze: list[int] | str) -> None:
    """requires_grad as published (SPEC section 4): everything frozen, then the final `norm`, the chosen blocks and
    the head (`to_out`) unfrozen. "all": the whole model except the gene2vec table, which is never trained."""
    for param in model.parameters():
        param.requires_grad_(False)
    if unfreeze == "all":
        for name, param in model.named_parameters():
            param.requires_grad_(not name.startswith("pos_emb."))
        return
    trainable = [model.norm, *(model.performer.net.layers[i] for i in unfreeze)]
    if model.to_out is not None:
        trainable.append(model.to_out)
    for module in trainable:
        for param in module.parameters():
            param.requires_grad_(True)


def attach_head(model: PerformerLM, n_classes: int) -> PerformerLM:
    """Replace `to_out` by a freshly initialised scBERT classification head for `n_classes` (dropout 0)."""
    config = model.config
    model.to_out = ClassificationHead(seq_len=config["max_seq_len"], dim=config["dim"], n_classes=n_classes,
                                      h_dim=HEAD_H_DIM, dropout=0.0)
    model.to_out.reset_gene_scorer()  # a scorer that starts alive whatever the encodings (see its docstring)
    return model


def build_finetune_model(
    args: argparse.Namespace, genes: Sequence[str], classes: Sequence[str], *, resume_path: str | None = None
) -> PerformerLM:
    """The model to fine-tune, with requires_grad set by `--unfreeze_layers`.

    Fresh: the trunk of `--model_path` (any head it had is dropped; genes checked by `build_model_from_args`), or
    random weights from the size flags with a warning; then a new head. Resuming: the architecture and head of the
    epoch checkpoint, whose classes must be these (its weights are loaded afterwards with the optimiser).
    """
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        if ckpt.classes is not None and list(ckpt.classes) != list(classes):
            raise ScbertError(
                f"cannot resume from {resume_path!r}: it was trained on classes {ckpt.classes[:8]} but the data hold "
                f"{list(classes)[:8]}: use the same data and --label_key, or another --model_name"
            )
        model = build_model(ckpt, head="checkpoint")
    else:
        if not args.model_path:
            print("warning: no --model_path: fine-tuning from random weights (the 'no pretraining' ablation)",
                  file=sys.stderr)
        model = build_model_from_args(args, genes, checkpoint_path=args.model_path, head="none")
        if args.model_path and bool(args.pos_embed) != bool(model.config.get("g2v_position_emb")):
            print(f"warning: --pos_embed {args.pos_embed} ignored: {args.model_path!r} was trained "
                  f"{'with' if model.pos_emb is not None else 'without'} gene2vec embeddings and its weights decide",
                  file=sys.stderr)
        attach_head(model, len(classes))
    set_trainable(model, parse_unfreeze(args.unfreeze_layers, model.config["depth"]))
    return model


def describe_trainable(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} of {sum(p.numel() for p in model.parameters()):,} parameters train"


# ---------------------------------------------------------------------------------------------------------------------
# Metrics and their files
# ---------------------------------------------------------------------------------------------------------------------


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (over all classes), per-class precision/recall/F1/support, confusion matrix (rows: true).

    Plain Python numbers, so the result goes into JSON and checkpoints as it is.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    index = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=index, zero_division=0)
    return {
        "n_cells": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=index, average="macro", zero_division=0)),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(classes)
        },
        "classes": list(classes),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=index).tolist(),
    }


def write_json(path: str, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode("utf-8"))


def _csv_cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(ch in text for ch in ',"\n') else text


def write_confusion_csv(metrics: dict[str, Any], path: str) -> None:
    """Confusion counts as CSV: a header of predicted classes, one row per true class."""
    classes, matrix = metrics["classes"], metrics["confusion_matrix"]
    lines = ["true \\ predicted," + ",".join(_csv_cell(c) for c in classes)]
    lines += [_csv_cell(name) + "," + ",".join(map(str, row)) for name, row in zip(classes, matrix, strict=True)]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))


def plot_confusion(metrics: dict[str, Any], path: str, *, title: str) -> None:
    """The confusion matrix as a PNG: colour = share of the true class, counts written in the cells (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = metrics["classes"]
    counts = np.asarray(metrics["confusion_matrix"], dtype=np.float64)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(classes) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if len(classes) <= 30:
        for i, j in zip(*np.nonzero(counts), strict=True):
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def summarise_folds(fold_metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation (numpy's, ddof 0) over folds of accuracy and macro-F1, with each fold's values."""
    summary: dict[str, Any] = {"n_splits": len(fold_metrics)}
    for key in ("accuracy", "macro_f1"):
        values = np.array([m[key] for m in fold_metrics], dtype=np.float64)
        summary[key] = {"mean": float(values.mean()), "std": float(values.std()), "values": values.tolist()}
    summary["folds"] = fold_metrics
    return summary


class EarlyStopping:
    """The best validation accuracy so far and how many validations in a row failed to beat it."""

    def __init__(self, patience: int):
        self.patience, self.best, self.best_epoch, self.bad = patience, -math.inf, 0, 0

    def update(self, accuracy: float, epoch: int) -> bool:
        """Record one validation; True when strictly better than every earlier one (as the reference)."""
        if accuracy > self.best:
            self.best, self.best_epoch, self.bad = accuracy, epoch, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad = float(state["best"]), int(state["best_epoch"]), int(state["bad"])


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def _check_flags(args: argparse.Namespace) -> None:
    for flag in ("epoch", "batch_size", "grad_acc", "valid_every", "n_splits"):
        if getattr(args, flag) < 1:
            raise ScbertError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.patience < 0:
        raise ScbertError(f"--patience must be 0 (never stop early) or more, got {args.patience}")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise ScbertError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")


def run_finetuning(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fine-tune as the flags say; returns the best validation metrics of each run (one, or one per fold).

    Every rank returns the same list. With k folds, rank 0 also writes `<model_name>_cv.json`.
    """
    _check_flags(args)
    ctx = setup_distributed(args)
    try:
        return _finetune(args, ctx)
    finally:
        cleanup_distributed(ctx)


def _finetune(args: argparse.Namespace, ctx: DistContext) -> list[dict[str, Any]]:
    start_genes = load_checkpoint(args.model_path).genes if args.model_path else None
    adata = load_training_data(args, genes=start_genes, genes_source=args.model_path)
    genes = [str(g) for g in adata.var_names]
    classes, labels = read_labels(adata.obs, args.label_key, data_name=repr(args.data_path))
    splits = make_splits(labels, n_splits=args.n_splits, seed=args.seed)
    counts = ", ".join(f"{name} {n}" for name, n in zip(classes, np.bincount(labels), strict=True))
    print0(f"{adata.n_obs} cells, {len(genes)} genes, {len(classes)} classes ({counts})", ctx=ctx)

    results = []
    for fold, (train_idx, valid_idx) in enumerate(splits, start=1):
        run_args = copy.copy(args)
        if len(splits) > 1:
            run_args.model_name = f"{args.model_name}_fold{fold}"  # a --log_path is shared; lines name the fold
            print0(f"--- fold {fold} of {len(splits)} ({run_args.model_name}) ---", ctx=ctx)
        best = finetune_split(run_args, ctx, adata=adata, genes=genes, classes=classes, labels=labels,
                              train_idx=train_idx, valid_idx=valid_idx, fold=fold if len(splits) > 1 else None)
        results.append(best)
    if len(splits) > 1:
        summary = summarise_folds(results)
        if ctx.is_main:
            path = os.path.join(args.ckpt_dir, f"{args.model_name}_cv.json")
            write_json(path, summary)
            print0(f"{len(splits)}-fold cross-validation: accuracy {summary['accuracy']['mean']:.4f} ± "
                   f"{summary['accuracy']['std']:.4f}, macro-F1 {summary['macro_f1']['mean']:.4f} ± "
                   f"{summary['macro_f1']['std']:.4f} (written to {path})", ctx=ctx)
    return results


def _train_step(criterion: nn.Module):
    def step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["tokens"])  # (cells, classes)
        loss = criterion(logits.float(), batch["label"])
        return loss, {"correct": (logits.detach().argmax(dim=-1) == batch["label"]).sum()}

    return step


def _valid_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    logits = model(batch["tokens"]).float()  # (cells, classes)
    return {"index": batch["index"], "label": batch["label"], "pred": logits.argmax(dim=-1),
            "loss_sum": F.cross_entropy(logits, batch["label"], reduction="sum")}


def save_best(args: argparse.Namespace, ctx: DistContext, *, model, genes, classes, labels, metrics) -> None:
    """`<model_name>_best.pth` (config, genes, classes, metrics) plus the label files and metrics JSON beside it."""
    best_path = named_checkpoint_path(args.ckpt_dir, args.model_name, "best")
    save_training_checkpoint(best_path, model=model, ctx=ctx, genes=genes, epoch=metrics["epoch"], classes=classes,
                             args=args, metrics=metrics)
    if ctx.is_main:
        write_label_files(args.ckpt_dir, classes, labels, prefix=f"{args.model_name}_")
        write_json(os.path.join(args.ckpt_dir, f"{args.model_name}_metrics.json"), metrics)


def _best_is_at(best_path: str, epoch: int) -> bool:
    """Whether the best checkpoint on disk is the one of `epoch` (it is missing or older after an interruption)."""
    if not os.path.exists(best_path):
        return False
    try:
        return int(read_checkpoint_file(best_path).get("epoch", -1)) == int(epoch)
    except ScbertError:
        return False


def finetune_split(
    args: argparse.Namespace,
    ctx: DistContext,
    *,
    adata,
    genes: list[str],
    classes: list[str],
    labels: np.ndarray,
    train_idx: np.ndarray,
    valid_idx: np.ndarray,
    fold: int | None = None,
) -> dict[str, Any]:
    """Train on `train_idx`, validate on `valid_idx`, keep the best epoch; returns its validation metrics."""
    ckpt_dir, name = args.ckpt_dir, args.model_name
    best_path = named_checkpoint_path(ckpt_dir, name, "best")
    resume_path = resolve_resume(args)
    if resume_path is None and os.path.exists(best_path):
        raise ScbertError(
            f"{best_path!r} exists from an earlier run and a fresh run would overwrite it: pass another --model_name "
            "or --ckpt_dir, or move it away"
        )
    amp = Amp(args.amp, ctx.device)
    # The same head and (random-trunk) weights on every rank and for any number of ranks; then seed + rank.
    torch.manual_seed(args.seed)
    model = build_finetune_model(args, genes, classes, resume_path=resume_path)
    seed_everything(args.seed, ctx.rank)
    model = wrap_model(model, ctx)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    scheduler = build_scheduler(optimizer, args.learning_rate)
    criterion = build_criterion(args, labels[train_idx], len(classes)).to(ctx.device)
    stopper = EarlyStopping(args.patience)
    best_metrics: dict[str, Any] | None = None
    stopped, start_epoch, revivals = False, 1, 0
    if resume_path:
        payload = restore_training_state(resume_path, model=model, ctx=ctx, genes=genes, optimizer=optimizer,
                                         scheduler=scheduler, amp=amp)
        state = payload.get("finetune_state") or {}
        if state.get("unfreeze_layers", args.unfreeze_layers) != args.unfreeze_layers:
            raise ScbertError(
                f"cannot resume from {resume_path!r} with --unfreeze_layers {args.unfreeze_layers}: that run trained "
                f"{state['unfreeze_layers']}; rerun with it, or pass another --model_name"
            )
        if state.get("early_stopping"):
            stopper.load_state_dict(state["early_stopping"])
        best_metrics, stopped = state.get("best_metrics"), bool(state.get("stopped"))
        revivals = int(state.get("head_revivals", 0))
        start_epoch = int(payload["epoch"]) + 1
        if best_metrics is not None and best_metrics["epoch"] == payload["epoch"] and not _best_is_at(
            best_path, payload["epoch"]
        ):
            # Killed between the epoch checkpoint and the best one: the weights just restored are the best ones.
            save_best(args, ctx, model=model, genes=genes, classes=classes, labels=labels, metrics=best_metrics)
        print0(f"resuming from {resume_path} (epoch {payload['epoch']} complete); next epoch {start_epoch}", ctx=ctx)

    x = adata.X
    train_set = CellDataset(x, bin_num=args.bin_num, indices=train_idx, labels=labels)
    valid_set = CellDataset(x, bin_num=args.bin_num, indices=valid_idx, labels=labels)
    sampler = (BootstrapSampler(len(train_set), rank=ctx.rank, world_size=ctx.world_size, seed=args.seed)
               if args.sampling == "bootstrap" else None)
    train_loader = build_loader(train_set, batch_size=args.batch_size, ctx=ctx, train=True, seed=args.seed,
                                num_workers=args.num_workers, sampler=sampler)
    valid_loader = build_loader(valid_set, batch_size=args.batch_size, ctx=ctx, train=False,
                                num_workers=args.num_workers)
    if resume_path is None:
        start_head_alive(model, train_set)  # every gene score starts positive (head_health.py)
    if stopped or start_epoch > args.epoch:
        print0(f"run {name!r} is already complete ({'stopped early' if stopped else 'all epochs done'} after epoch "
               f"{start_epoch - 1}): rewriting its metrics files; pass another --model_name to train again", ctx=ctx)
    else:
        print0(f"fine-tuning on {ctx.device} x {ctx.world_size}: {len(train_set)} train / {len(valid_set)} valid "
               f"cells, {describe_trainable(model)}, epochs {start_epoch}..{args.epoch}", ctx=ctx)

    logger = JsonlLogger(resolve_log_path(args), ctx)
    train_step = _train_step(criterion)
    last_good = epoch_checkpoint_path(ckpt_dir, name, start_epoch - 1) if start_epoch > 1 else None
    epoch = start_epoch
    while epoch <= args.epoch and not stopped:
        set_loader_epoch(train_loader, epoch)
        lr = scheduler.get_last_lr()[0]
        train = train_one_epoch(model, train_loader, optimizer, train_step, ctx=ctx, epoch=epoch,
                                grad_acc=args.grad_acc, clip_norm=GRAD_CLIP,
                                divide_by_grad_acc=args.loss_div_grad_acc, amp=amp, last_good=last_good)
        record: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": train["loss"],
                                  "train_acc": train["correct"] / max(train["cells"], 1),
                                  "train_cells": int(train["cells"]), "cells_per_s": train["cells_per_s"],
                                  "train_time": train["time"]}
        if fold is not None:
            record["fold"] = fold
        if epoch % args.valid_every == 0 or epoch == args.epoch:
            with HeadWatch(model) as watch:
                valid = evaluate(model, valid_loader, _valid_step, ctx=ctx, amp=amp)
            health = watch.result()
            metrics = classification_metrics(valid["label"].numpy(), valid["pred"].numpy(), classes)
            improved = not health.dead and stopper.update(metrics["accuracy"], epoch)  # never a constant model
            if health.dead:
                revivals = handle_dead_head(model, optimizer, health, epoch=epoch, revivals=revivals,
                                            log=lambda line: print0(line, ctx=ctx), dataset=train_set)
            record.update({"valid_loss": valid["loss_sum"] / max(valid["cells"], 1),
                           "valid_acc": metrics["accuracy"], "valid_macro_f1": metrics["macro_f1"],
                           "valid_cells": int(valid["cells"]), "valid_time": valid["time"], "best": improved,
                           "gene_scores_positive": health.positive_share, "head_dead": health.dead})
            if improved:
                best_metrics = {"epoch": epoch, **metrics}
            stopped = stopper.should_stop
        scheduler.step()
        # The epoch checkpoint first, the best one second: if the run is killed in between, the resumed run finds
        # this epoch complete and rewrites the best checkpoint from the same weights (see _restore_best).
        path = epoch_checkpoint_path(ckpt_dir, name, epoch)
        state = {"early_stopping": stopper.state_dict(), "best_metrics": best_metrics, "stopped": stopped,
                 "unfreeze_layers": args.unfreeze_layers, "head_revivals": revivals}
        save_training_checkpoint(path, model=model, ctx=ctx, genes=genes, epoch=epoch, optimizer=optimizer,
                                 scheduler=scheduler, amp=amp, classes=classes, args=args, losses=train["loss"],
                                 finetune_state=state)
        if best_metrics is not None and best_metrics["epoch"] == epoch:
            save_best(args, ctx, model=model, genes=genes, classes=classes, labels=labels, metrics=best_metrics)
        if ctx.is_main and last_good and not args.keep_epoch_ckpts and os.path.exists(last_good):
            os.remove(last_good)  # the previous epoch of this same run; the new one is complete on disk
        last_good = path
        logger.log(record)
        print0(_epoch_line(record), ctx=ctx)
        if stopped:
            print0(f"stopping: no better validation accuracy for {args.patience} validations", ctx=ctx)
        epoch += 1

    if best_metrics is None:
        raise ScbertError(f"run {name!r} finished without a validation: lower --valid_every or raise --epoch")
    if ctx.is_main:
        write_json(os.path.join(ckpt_dir, f"{name}_metrics.json"), best_metrics)
        write_confusion_csv(best_metrics, os.path.join(ckpt_dir, f"{name}_confusion.csv"))
        plot_confusion(best_metrics, os.path.join(ckpt_dir, f"{name}_confusion.png"),
                       title=f"{name}: epoch {best_metrics['epoch']}, accuracy {best_metrics['accuracy']:.3f}, "
                             f"macro-F1 {best_metrics['macro_f1']:.3f}")
    print0(f"best epoch {best_metrics['epoch']}: validation accuracy {best_metrics['accuracy']:.4f}, macro-F1 "
           f"{best_metrics['macro_f1']:.4f}; model {os.path.abspath(best_path)}, metrics and confusion matrix "
           f"beside it, log {os.path.abspath(resolve_log_path(args))}", ctx=ctx)
    return best_metrics


def _epoch_line(record: dict[str, Any]) -> str:
    line = (f"epoch {record['epoch']:3d} | lr {record['lr']:.2e} | train loss {record['train_loss']:.4f} "
            f"acc {record['train_acc']:.4f}")
    if "valid_acc" in record:
        line += (f" | valid loss {record['valid_loss']:.4f} acc {record['valid_acc']:.4f} macro-F1 "
                 f"{record['valid_macro_f1']:.4f}{' (best)' if record['best'] else ''}")
    return line + f" | {record['cells_per_s']:.1f} cells/s | {record['train_time']:.1f} s"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = get_args_parser().parse_args(argv)
    return run_finetuning(args)


if __name__ == "__main__":
    run_cli(main)
