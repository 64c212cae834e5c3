"""The one definition of each classification score, used by finetune.py, predict.py (annotate.py) and demo.py.

Labels may be class indices or names; every score that averages over classes takes the class set it averages over
explicitly (`labels`), so two callers asking for "macro-F1 over these classes" get the same number.

- `accuracy(y_true, y_pred)`; `macro_f1(y_true, y_pred, labels)`: the unweighted mean of per-class F1 over `labels`
  (a class never predicted nor present scores 0, as sklearn's zero_division=0);
- `per_class_report(y_true, y_pred, labels, names)`: precision, recall, F1 and support per class;
- `confusion(y_true, y_pred, rows, columns)`: counts, true labels x predicted labels;
- `novel_recall(predicted)`: the share of novel-type cells called `Unassigned`;
- `classification_metrics`: a validation's scores over all of a model's classes (fine-tuning, continual stages);
- `annotation_metrics`: a query's scores against known labels, with novel types (prediction, the demo).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from utils import atomic_write_bytes

UNASSIGNED = "Unassigned"

__all__ = [
    "UNASSIGNED",
    "accuracy",
    "annotation_metrics",
    "classification_metrics",
    "confusion",
    "format_metrics",
    "macro_f1",
    "novel_recall",
    "per_class_report",
    "plot_confusion",
    "write_confusion_csv",
]


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    """Share of cells whose prediction equals the truth (NaN for no cells)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def macro_f1(y_true: Sequence, y_pred: Sequence, labels: Sequence) -> float:
    """Unweighted mean over `labels` of each class's F1; predictions outside `labels` (e.g. `Unassigned`) count as
    misses of their true class."""
    from sklearn.metrics import f1_score

    return float(f1_score(np.asarray(y_true), np.asarray(y_pred), labels=list(labels), average="macro",
                          zero_division=0))


def per_class_report(
    y_true: Sequence, y_pred: Sequence, labels: Sequence, names: Sequence[str] | None = None
) -> dict[str, dict[str, float | int]]:
    """{name: {"precision", "recall", "f1", "support"}} for each class of `labels` (named by `names`, default the
    labels themselves), in that order."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(labels)
    names = [str(n) for n in (names if names is not None else labels)]
    precision, recall, f1, support = precision_recall_fscore_support(
        np.asarray(y_true), np.asarray(y_pred), labels=labels, zero_division=0
    )
    return {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(support[i])}
        for i, name in enumerate(names)
    }


def confusion(y_true: Sequence, y_pred: Sequence, rows: Sequence, columns: Sequence) -> np.ndarray:
    """(len(rows), len(columns)) int64 counts: cells of true label rows[i] predicted columns[j]; cells whose truth or
    prediction is in neither list are not counted."""
    row_of = {label: i for i, label in enumerate(rows)}
    col_of = {label: j for j, label in enumerate(columns)}
    counts = np.zeros((len(row_of), len(col_of)), dtype=np.int64)
    for t, p in zip(np.asarray(y_true).tolist(), np.asarray(y_pred).tolist(), strict=True):
        if t in row_of and p in col_of:
            counts[row_of[t], col_of[p]] += 1
    return counts


def novel_recall(predicted_for_novel: Sequence[str]) -> float:
    """Share of novel-type cells (types the model never saw) called `Unassigned` (SPEC section 8)."""
    predicted = np.asarray(predicted_for_novel, dtype=object)
    return float(np.mean(predicted == UNASSIGNED)) if len(predicted) else float("nan")


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Scores of class indices over all `classes` of a model: accuracy, macro-F1, per-class report, confusion (rows:
    true). Plain Python numbers, so the result goes into JSON and checkpoints as it is."""
    index = list(range(len(classes)))
    return {
        "n_cells": int(len(y_true)),
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred, index),
        "per_class": per_class_report(y_true, y_pred, index, names=classes),
        "classes": list(classes),
        "confusion_matrix": confusion(y_true, y_pred, index, index).tolist(),
    }


def annotation_metrics(
    true_labels: Sequence, predicted: Sequence[str], classes: Sequence[str], *, novel_type: bool
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Scores of predicted names against known labels.

    Known-type cells (true label among the model's classes) give accuracy, macro-F1 (over the known classes present
    in the labels; `Unassigned` counts as a miss) and the share wrongly unassigned; novel-type cells (any other label)
    give the novel-type recall. Cells without a label (NaN) are left out. Returns (metrics, confusion): confusion is a
    DataFrame of counts, true labels (known classes in class order, then novel types) x predicted labels (classes,
    then Unassigned when novel_type or when predicted).
    """
    true = pd.Series(list(true_labels), dtype=object)
    has_label = true.notna().to_numpy()
    true = true[has_label].astype(str).to_numpy()
    pred = np.asarray(list(predicted), dtype=object)[has_label].astype(str)
    class_list = [str(c) for c in classes]
    known = np.isin(true, class_list)
    present = [c for c in class_list if c in set(true[known])]
    novel_types = sorted(set(true[~known]))
    metrics: dict[str, Any] = {
        "n_cells": int(has_label.sum()), "n_without_label": int((~has_label).sum()), "n_known": int(known.sum()),
        "n_novel": int((~known).sum()), "novel_types": novel_types, "accuracy": None, "macro_f1": None,
        "known_unassigned_rate": None, "novel_recall": None, "per_class": {},
    }
    if known.any():
        t, p = true[known], pred[known]
        metrics["accuracy"] = accuracy(t, p)
        metrics["macro_f1"] = macro_f1(t, p, present)
        metrics["known_unassigned_rate"] = float(np.mean(p == UNASSIGNED))
        metrics["per_class"] = per_class_report(t, p, present)
    if (~known).any():
        metrics["novel_recall"] = novel_recall(pred[~known])
    columns = class_list + ([UNASSIGNED] if novel_type or UNASSIGNED in set(pred) else [])
    rows = present + novel_types
    table = pd.DataFrame(confusion(true, pred, rows, columns), index=pd.Index(rows, name="true"),
                         columns=pd.Index(columns, name="predicted"))
    return metrics, table


def format_metrics(metrics: dict[str, Any]) -> str:
    """A few lines for the terminal about `annotation_metrics`' result."""
    lines = []
    if metrics["n_known"]:
        lines.append(
            f"known types: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} over "
            f"{metrics['n_known']} cells; {metrics['known_unassigned_rate']:.1%} wrongly Unassigned"
        )
    if metrics["n_novel"]:
        names = ", ".join(metrics["novel_types"][:5]) + (", ..." if len(metrics["novel_types"]) > 5 else "")
        lines.append(
            f"novel types ({names}): {metrics['novel_recall']:.1%} of {metrics['n_novel']} cells called {UNASSIGNED}"
        )
    if metrics["n_without_label"]:
        lines.append(f"{metrics['n_without_label']} cells without a label were not scored")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Files of a confusion matrix
# ---------------------------------------------------------------------------------------------------------------------


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
