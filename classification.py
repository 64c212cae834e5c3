"""The classification core shared by fine-tuning and continual (staged) annotation.

- `ClassList`: the ordered, append-only class names of a head (index i is logit i; old indices never move).
- `read_labels`: class names and indices from an `obs` column, checked.
- `attach_head`, `grow_head`: a fresh cell-type head, or the same head with rows for new classes (old rows copied).
- `set_trainable`: what trains, through the model interface (`trainable_groups`, `head`; see models.py).
- `EarlyStopping`: the best validation score so far, as a stateful object the run loop saves and restores.
- `inverse_frequency_weights`, `classification_step`, `validation_step`: the loss and evaluation steps of a run.
- `make_splits`, `summarise_folds`: the stratified 80/20 split or k folds, and a k-fold summary.
- `train_classifier`: one classification run on `training.fit` (best checkpoint, label files, metrics, confusion).
Metrics live in metrics.py.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data import BootstrapSampler, CellDataset, split_indices
from distributed import DistContext, print0
from head_health import HeadGuard
from label_io import write_label_files
from metrics import classification_metrics, plot_confusion, write_confusion_csv
from model_card import CARD_KEY, build_card
from models import parse_block_spec
from performer_pytorch import BlockLinear
from performer_pytorch.checkpoint import read_checkpoint_file
from run_state import RunSettings, named_checkpoint_path, refuse_fresh_over, resolve_resume, save_training_checkpoint
from training import Run, fit, resolve_log_path, start_run
from utils import ScbertError, write_json

__all__ = [
    "ClassList",
    "EarlyStopping",
    "attach_head",
    "classification_step",
    "describe_trainable",
    "grow_head",
    "inverse_frequency_weights",
    "last_linear",
    "make_splits",
    "parse_unfreeze",
    "read_labels",
    "set_trainable",
    "save_best",
    "summarise_folds",
    "train_classifier",
    "validation_step",
]

parse_unfreeze = parse_block_spec  # `--unfreeze_layers` text -> block indices or "all"


class ClassList(Sequence[str]):
    """Class names in head order: index i is the head's output i. Append-only: `extend` adds new names after the old
    ones (sorted among themselves), so an old class keeps its index and its head row when the head grows."""

    def __init__(self, names: Iterable[str] = ()):
        self._names: list[str] = []
        self._index: dict[str, int] = {}
        self.extend(names, sort=False)

    @classmethod
    def from_labels(cls, labels: Iterable[Any]) -> ClassList:
        """The sorted unique names of `labels` (the reference's `np.unique` order)."""
        return cls(sorted({str(x) for x in labels}))

    def extend(self, names: Iterable[str], *, sort: bool = True) -> list[str]:
        """Append the names not yet present (sorted, unless sort=False keeps their order); returns those added."""
        new = list(dict.fromkeys(str(n) for n in names if str(n) not in self._index))
        for name in sorted(new) if sort else new:
            self._index[name] = len(self._names)
            self._names.append(name)
        return sorted(new) if sort else new

    def index(self, name: str, *args: Any) -> int:  # type: ignore[override]
        try:
            return self._index[str(name)]
        except KeyError:
            raise ValueError(f"{name!r} is not a class") from None

    def encode(self, labels: Iterable[Any]) -> np.ndarray:
        """int64 class index of each label; a label that is no class raises ScbertError naming it."""
        labels = [str(x) for x in labels]
        unknown = sorted({x for x in labels if x not in self._index})
        if unknown:
            raise ScbertError(f"labels {unknown[:5]} are not among the model's classes: add them with extend()")
        return np.fromiter((self._index[x] for x in labels), dtype=np.int64, count=len(labels))

    def __getitem__(self, item):  # type: ignore[override]
        return self._names[item]

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, name: object) -> bool:
        return str(name) in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"ClassList({self._names!r})"

    def to_list(self) -> list[str]:
        return list(self._names)

    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self._names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._names, self._index = [], {}
        self.extend(state["names"], sort=False)


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


# ---------------------------------------------------------------------------------------------------------------------
# Heads and what trains
# ---------------------------------------------------------------------------------------------------------------------


def attach_head(model: nn.Module, n_classes: int, **head_options: Any) -> nn.Module:
    """A freshly initialised cell-type head for `n_classes` (the family's `attach_head`); returns the model."""
    return model.attach_head(n_classes, **head_options)


def last_linear(head: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """(parent module, attribute name, layer) of the last `nn.Linear` registered in `head`: the class logits."""
    found = None
    for name, module in head.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    if found is None:
        raise ValueError(f"the head {type(head).__name__} has no Linear layer to grow")
    name, layer = found
    parent_name, _, attr = name.rpartition(".")
    return head.get_submodule(parent_name) if parent_name else head, attr, layer


def grow_head(model: nn.Module, n_new: int) -> nn.Module:
    """Add `n_new` class outputs to the model's head: its last Linear gets n_new more rows, the old rows (weights and
    biases) copied bit for bit, the new ones freshly initialised as a new Linear would be (from torch's global
    generator). The grown layer is a `BlockLinear` computing each growth's rows as their own product, so the old
    classes' logits are bit-identical until training changes the weights; the head's config records the blocks, so
    a rebuilt checkpoint computes them the same way."""
    if n_new < 0:
        raise ValueError(f"n_new must be >= 0, got {n_new}")
    head = model.head
    if head is None:
        raise ValueError("the model has no head to grow: call attach_head first")
    if n_new == 0:
        return model
    parent, attr, old = last_linear(head)
    blocks = [*getattr(old, "blocks", [old.out_features]), n_new]
    new = BlockLinear(old.in_features, blocks, bias=old.bias is not None, device=old.weight.device,
                      dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight[: old.out_features] = old.weight
        if old.bias is not None:
            new.bias[: old.out_features] = old.bias
    new.weight.requires_grad_(old.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    setattr(parent, attr, new)
    config = getattr(head, "config", None)
    if isinstance(config, dict) and "n_classes" in config:
        config["n_classes"] = new.out_features  # so the checkpoint's head description rebuilds the grown head
        config["class_blocks"] = list(new.blocks)
    return model


def set_trainable(model: nn.Module, unfreeze: str | list[int]) -> None:
    """requires_grad as published (SPEC section 4): everything frozen, then the family's `trainable_groups(unfreeze)`
    and the head unfrozen. unfreeze: an `--unfreeze_layers` text, or what `parse_unfreeze` returned."""
    for param in model.parameters():
        param.requires_grad_(False)
    modules = list(model.trainable_groups(unfreeze))
    if model.head is not None:
        modules.append(model.head)
    for module in modules:
        for param in module.parameters():
            param.requires_grad_(True)


def describe_trainable(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} of {sum(p.numel() for p in model.parameters()):,} parameters train"


# ---------------------------------------------------------------------------------------------------------------------
# Early stopping, class weights, steps
# ---------------------------------------------------------------------------------------------------------------------


class EarlyStopping:
    """The best validation score so far (and that validation's metrics), and how many validations in a row failed
    to beat it. Stateful (state_dict/load_state_dict), so the run loop saves and restores it with the rest."""

    def __init__(self, patience: int):
        self.patience, self.best, self.best_epoch, self.bad = patience, -math.inf, 0, 0
        self.best_metrics: dict[str, Any] | None = None

    def update(self, score: float, epoch: int, metrics: dict[str, Any] | None = None) -> bool:
        """Record one validation; True when strictly better than every earlier one (as the reference)."""
        if score > self.best:
            self.best, self.best_epoch, self.bad = score, epoch, 0
            self.best_metrics = {"epoch": epoch, **metrics} if metrics is not None else None
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad": self.bad, "best_metrics": self.best_metrics}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad = float(state["best"]), int(state["best_epoch"]), int(state["bad"])
        self.best_metrics = state.get("best_metrics")


def inverse_frequency_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Weights proportional to 1 / (cells of the class), scaled to average 1 over classes: (n_classes,) float32.

    A class with no cell in `labels` gets weight 0 (it cannot occur in the loss anyway).
    """
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    weights *= n_classes / weights.sum()
    return torch.tensor(weights, dtype=torch.float32)


def classification_step(criterion: nn.Module):
    """The training loss_fn of a classification run: `criterion(logits, label)` and the correct-count stat.

    Calls `model(batch)` (not `classify`), so a DistributedDataParallel wrapper syncs the gradients."""

    def step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch)  # (cells, classes)
        loss = criterion(logits.float(), batch["label"])
        return loss, {"correct": (logits.detach().argmax(dim=-1) == batch["label"]).sum()}

    return step


def validation_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-batch outputs `evaluate` gathers: row index, label, predicted class and the summed cross-entropy."""
    logits = model.classify(batch).float()  # (cells, classes)
    return {"index": batch["index"], "label": batch["label"], "pred": logits.argmax(dim=-1),
            "loss_sum": F.cross_entropy(logits, batch["label"], reduction="sum")}


# ---------------------------------------------------------------------------------------------------------------------
# Splits and folds
# ---------------------------------------------------------------------------------------------------------------------

VALID_SIZE = 0.2  # SPEC section 4: one stratified 80/20 split


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


def summarise_folds(fold_metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation (numpy's, ddof 0) over folds of accuracy and macro-F1, with each fold's values."""
    summary: dict[str, Any] = {"n_splits": len(fold_metrics)}
    for key in ("accuracy", "macro_f1"):
        values = np.array([m[key] for m in fold_metrics], dtype=np.float64)
        summary[key] = {"mean": float(values.mean()), "std": float(values.std()), "values": values.tolist()}
    summary["folds"] = fold_metrics
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# A classification run: the shared skeleton of fine-tuning and continual stages
# ---------------------------------------------------------------------------------------------------------------------


def save_best(args: argparse.Namespace, ctx: DistContext, *, model, genes, classes, labels, metrics,
              split: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """`<model_name>_best.pth` (config, genes, classes, metrics and, given the (train, valid) split, its model card:
    model_card.py) plus the label files and metrics JSON beside it."""
    best_path = named_checkpoint_path(args.ckpt_dir, args.model_name, "best")
    card = {}
    if split is not None and ctx.is_main:  # only rank 0 writes
        card[CARD_KEY] = build_card(args=args, model=model, genes=genes, classes=classes, labels=labels,
                                    train_idx=split[0], valid_idx=split[1], metrics=metrics)
    save_training_checkpoint(best_path, model=model, ctx=ctx, genes=genes, epoch=metrics["epoch"], classes=classes,
                             args=args, metrics=metrics, **card)
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


def train_classifier(
    args: argparse.Namespace,
    ctx: DistContext,
    *,
    adata,
    genes: list[str],
    classes: list[str],
    labels: np.ndarray,
    train_idx: np.ndarray,
    valid_idx: np.ndarray,
    make_model: Callable[[str | None], nn.Module],
    loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]],
    clip_norm: float | None,
    settings: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
    fold: int | None = None,
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> dict[str, Any]:
    """One classification run (fine-tuning, or one continual stage): train on `train_idx`, validate on `valid_idx`
    by accuracy, keep the best epoch as `<model_name>_best.pth` with its label files and metrics; returns the best
    validation metrics (`metrics.classification_metrics` plus "epoch").

    make_model(resume_path) builds the model (any family with a cell-type head; weights of a resumed run are loaded
    after it). loss_fn(model, batch) -> (loss, {"correct": ...}) is the run's loss (`classification_step` for plain
    cross-entropy). settings: values a resumed run must share (`RunSettings`); state: more stateful objects to save.
    Reads the shared flags plus --patience, --sampling, --loss_div_grad_acc and --keep_epoch_ckpts.
    """
    best_path = named_checkpoint_path(args.ckpt_dir, args.model_name, "best")
    resume_path = resolve_resume(args)
    refuse_fresh_over(best_path, resume_path)
    stopper = EarlyStopping(args.patience)
    guard = HeadGuard()  # a head that starts alive; a dead one restarted, never kept as best (head_health.py)
    state = {"early_stopping": stopper, "settings": RunSettings(repr(resume_path), **(settings or {})),
             "head_guard": guard, **(state or {})}
    sampler = (BootstrapSampler(len(train_idx), rank=ctx.rank, world_size=ctx.world_size, seed=args.seed)
               if args.sampling == "bootstrap" else None)
    run = start_run(args, ctx, make_model=lambda: make_model(resume_path), genes=genes,
                    train_set=CellDataset(adata.X, indices=train_idx, labels=labels),
                    valid_set=CellDataset(adata.X, indices=valid_idx, labels=labels),
                    resume_path=resume_path, clip_norm=clip_norm, divide_by_grad_acc=args.loss_div_grad_acc,
                    classes=classes, state=state, sampler=sampler, make_scheduler=make_scheduler)
    guard.attach(run.model, run.optimizer, run.train_loader.dataset, fresh=run.resumed_from is None,
                 log=lambda line: print0(line, ctx=ctx))
    keep = dict(ctx=ctx, genes=genes, classes=classes, labels=labels, split=(train_idx, valid_idx))
    best = stopper.best_metrics
    if best is not None and best["epoch"] == run.start_epoch - 1 and not _best_is_at(best_path, best["epoch"]):
        # Killed between the epoch checkpoint and the best one: the weights just restored are the best ones.
        save_best(args, model=run.model, metrics=best, **keep)
    _announce(run, stopper)

    def valid_summary(valid: dict[str, Any], epoch: int) -> dict[str, Any]:
        metrics = classification_metrics(valid["label"].numpy(), valid["pred"].numpy(), classes)
        health = guard.check(epoch)
        improved = not health.dead and stopper.update(metrics["accuracy"], epoch, metrics)  # never a constant model
        return {"valid_loss": valid["loss_sum"] / max(valid["cells"], 1), "valid_acc": metrics["accuracy"],
                "valid_macro_f1": metrics["macro_f1"], "valid_cells": int(valid["cells"]),
                "valid_time": valid["time"], "best": improved, "gene_scores_positive": health.positive_share,
                "head_dead": health.dead}

    def after_save(record: dict[str, Any]) -> None:
        if record.get("best"):
            save_best(args, model=run.model, metrics=stopper.best_metrics, **keep)

    def stop_reason() -> str | None:
        return f"no better validation accuracy for {args.patience} validations" if stopper.should_stop else None

    try:
        fit(run, loss_fn, validation_step, train_summary=functools.partial(_train_summary, fold=fold),
            valid_summary=valid_summary, line=_epoch_line, stop_reason=stop_reason, after_save=after_save,
            keep_epoch_ckpts=args.keep_epoch_ckpts)
    finally:
        guard.close()
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
