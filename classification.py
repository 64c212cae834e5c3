"""The classification core shared by fine-tuning and continual (staged) annotation.

- `ClassList`: the ordered, append-only class names of a head (index i is logit i; old indices never move).
- `read_labels`: class names and indices from an `obs` column, checked.
- `attach_head`, `grow_head`: a fresh cell-type head, or the same head with rows for new classes (old rows copied).
- `set_trainable`: what trains, through the model interface (`trainable_groups`, `head`; see models.py).
- `EarlyStopping`: the best validation score so far, as a stateful object the run loop saves and restores.
- `inverse_frequency_weights`, `classification_step`, `validation_step`: the loss and evaluation steps of a run.
Metrics live in metrics.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import parse_block_spec
from utils import ScbertError

__all__ = [
    "ClassList",
    "EarlyStopping",
    "attach_head",
    "classification_step",
    "describe_trainable",
    "grow_head",
    "inverse_frequency_weights",
    "last_linear",
    "parse_unfreeze",
    "read_labels",
    "set_trainable",
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
    biases) copied, the new ones freshly initialised as a new Linear would be. Old logits are unchanged."""
    if n_new < 0:
        raise ValueError(f"n_new must be >= 0, got {n_new}")
    head = model.head
    if head is None:
        raise ValueError("the model has no head to grow: call attach_head first")
    if n_new == 0:
        return model
    parent, attr, old = last_linear(head)
    new = nn.Linear(old.in_features, old.out_features + n_new, bias=old.bias is not None)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
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
