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
import functools
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from classification import (
    EarlyStopping,
    attach_head,
    classification_step,
    describe_trainable,
    inverse_frequency_weights,
    parse_unfreeze,
    read_labels,
    set_trainable,
    validation_step,
)
from label_io import write_label_files
from metrics import classification_metrics
from models import load_model
from performer_pytorch import load_checkpoint
from performer_pytorch.checkpoint import read_checkpoint_file
from training import (
    BootstrapSampler,
    CellDataset,
    DistContext,
    Run,
    RunSettings,
    build_model_from_args,
    check_positive,
    cleanup_distributed,
    fit,
    get_common_parser,
    load_training_data,
    named_checkpoint_path,
    print0,
    resolve_log_path,
    resolve_resume,
    save_training_checkpoint,
    setup_distributed,
    split_indices,
    start_run,
)
from utils import ScbertError, atomic_write_bytes, run_cli, str2bool

VALID_SIZE = 0.2  # SPEC section 4: one stratified 80/20 split
GRAD_CLIP = 1e6  # SPEC section 4: the published fine-tuning clip (in effect none; pretraining clips at 100)


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


def build_criterion(args: argparse.Namespace, train_labels: np.ndarray, n_classes: int) -> nn.CrossEntropyLoss:
    """Cross-entropy, a mean over the batch, with `--class_weight` and `--label_smoothing`."""
    if not 0.0 <= args.label_smoothing < 1.0:
        raise ScbertError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    weight = inverse_frequency_weights(train_labels, n_classes) if args.class_weight == "inverse" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=args.label_smoothing)


# ---------------------------------------------------------------------------------------------------------------------
# Model: trunk, head, what trains
# ---------------------------------------------------------------------------------------------------------------------


def build_finetune_model(
    args: argparse.Namespace, genes: Sequence[str], classes: Sequence[str], *, resume_path: str | None = None
) -> nn.Module:
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
        model = load_model(ckpt, head="checkpoint")
    else:
        if not args.model_path:
            print("warning: no --model_path: fine-tuning from random weights (the 'no pretraining' ablation)",
                  file=sys.stderr)
        model = build_model_from_args(args, genes, checkpoint_path=args.model_path, head="none")
        trained_with = model.config.get("g2v_position_emb")
        if args.model_path and trained_with is not None and bool(args.pos_embed) != bool(trained_with):
            print(f"warning: --pos_embed {args.pos_embed} ignored: {args.model_path!r} was trained "
                  f"{'with' if trained_with else 'without'} gene2vec embeddings and its weights decide",
                  file=sys.stderr)
        attach_head(model, len(classes))
    set_trainable(model, parse_unfreeze(args.unfreeze_layers, len(model.named_blocks())))
    return model


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


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def _check_flags(args: argparse.Namespace) -> None:
    check_positive(args, "epoch", "batch_size", "grad_acc", "valid_every", "n_splits")
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
    best_path = named_checkpoint_path(args.ckpt_dir, args.model_name, "best")
    resume_path = resolve_resume(args)
    if resume_path is None and os.path.exists(best_path):
        raise ScbertError(
            f"{best_path!r} exists from an earlier run and a fresh run would overwrite it: pass another --model_name "
            "or --ckpt_dir, or move it away"
        )
    stopper = EarlyStopping(args.patience)
    state = {"early_stopping": stopper,
             "settings": RunSettings(repr(resume_path), unfreeze_layers=args.unfreeze_layers)}
    sampler = (BootstrapSampler(len(train_idx), rank=ctx.rank, world_size=ctx.world_size, seed=args.seed)
               if args.sampling == "bootstrap" else None)
    run = start_run(args, ctx, make_model=lambda: build_finetune_model(args, genes, classes, resume_path=resume_path),
                    genes=genes, train_set=CellDataset(adata.X, bin_num=args.bin_num, indices=train_idx,
                                                       labels=labels),
                    valid_set=CellDataset(adata.X, bin_num=args.bin_num, indices=valid_idx, labels=labels),
                    resume_path=resume_path, clip_norm=GRAD_CLIP, divide_by_grad_acc=args.loss_div_grad_acc,
                    classes=classes, state=state, sampler=sampler)
    keep = dict(ctx=ctx, genes=genes, classes=classes, labels=labels)
    best = stopper.best_metrics
    if best is not None and best["epoch"] == run.start_epoch - 1 and not _best_is_at(best_path, best["epoch"]):
        # Killed between the epoch checkpoint and the best one: the weights just restored are the best ones.
        save_best(args, model=run.model, metrics=best, **keep)
    _announce(run, stopper)

    def valid_summary(valid: dict[str, Any], epoch: int) -> dict[str, Any]:
        metrics = classification_metrics(valid["label"].numpy(), valid["pred"].numpy(), classes)
        improved = stopper.update(metrics["accuracy"], epoch, metrics)
        return {"valid_loss": valid["loss_sum"] / max(valid["cells"], 1), "valid_acc": metrics["accuracy"],
                "valid_macro_f1": metrics["macro_f1"], "valid_cells": int(valid["cells"]),
                "valid_time": valid["time"], "best": improved}

    def after_save(record: dict[str, Any]) -> None:
        if record.get("best"):
            save_best(args, model=run.model, metrics=stopper.best_metrics, **keep)

    def stop_reason() -> str | None:
        return f"no better validation accuracy for {args.patience} validations" if stopper.should_stop else None

    criterion = build_criterion(args, labels[train_idx], len(classes)).to(ctx.device)
    fit(run, classification_step(criterion), validation_step, train_summary=functools.partial(_train_summary,
        fold=fold), valid_summary=valid_summary, line=_epoch_line, stop_reason=stop_reason, after_save=after_save,
        keep_epoch_ckpts=args.keep_epoch_ckpts)
    if stopper.best_metrics is None:
        raise ScbertError(f"run {args.model_name!r} finished without a validation: lower --valid_every or raise "
                          "--epoch")
    _write_reports(args, ctx, stopper.best_metrics, best_path)
    return stopper.best_metrics


def _announce(run: Run, stopper: EarlyStopping) -> None:
    args, ctx = run.args, run.ctx
    if stopper.should_stop or run.start_epoch > args.epoch:
        why = "stopped early" if stopper.should_stop else "all epochs done"
        print0(f"run {args.model_name!r} is already complete ({why} after epoch {run.start_epoch - 1}): rewriting "
               "its metrics files; pass another --model_name to train again", ctx=ctx)
    else:
        print0(f"fine-tuning on {ctx.device} x {ctx.world_size}: {len(run.train_loader.dataset)} train / "
               f"{len(run.valid_loader.dataset)} valid cells, {describe_trainable(run.model)}, epochs "
               f"{run.start_epoch}..{args.epoch}", ctx=ctx)


def _train_summary(train: dict[str, Any], *, fold: int | None) -> dict[str, Any]:
    record = {"train_loss": train["loss"], "train_acc": train["correct"] / max(train["cells"], 1),
              "train_cells": int(train["cells"]), "cells_per_s": train["cells_per_s"], "train_time": train["time"]}
    if fold is not None:
        record["fold"] = fold
    return record


def _write_reports(args: argparse.Namespace, ctx: DistContext, best: dict[str, Any], best_path: str) -> None:
    name = args.model_name
    if ctx.is_main:
        write_json(os.path.join(args.ckpt_dir, f"{name}_metrics.json"), best)
        write_confusion_csv(best, os.path.join(args.ckpt_dir, f"{name}_confusion.csv"))
        plot_confusion(best, os.path.join(args.ckpt_dir, f"{name}_confusion.png"),
                       title=f"{name}: epoch {best['epoch']}, accuracy {best['accuracy']:.3f}, "
                             f"macro-F1 {best['macro_f1']:.3f}")
    print0(f"best epoch {best['epoch']}: validation accuracy {best['accuracy']:.4f}, macro-F1 "
           f"{best['macro_f1']:.4f}; model {os.path.abspath(best_path)}, metrics and confusion matrix "
           f"beside it, log {os.path.abspath(resolve_log_path(args))}", ctx=ctx)


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
