"""Metrics of a continual-annotation stream: every test set scored after every stage, for every method.

After stage t a model knows the classes seen so far. Each test set is scored on its cells of those classes
(accuracy, macro-F1); its cells of types not seen yet are held-out types, scored, when open-set predictions are
given, as novel recall (share called `Unassigned`), known accuracy (seen-type cells given their right label;
`Unassigned` counts as wrong) and their harmonic mean, the H-score (CANAL's evaluation). Across stages:

- average accuracy after stage t: the mean accuracy over the test sets scored at stage t;
- forgetting after stage t: for each test set scored at an earlier stage, its best accuracy at stages before t minus
  its accuracy at t (Chaudhry et al. 2018), averaged over those test sets (None at the first stage).

`StreamTable` holds the rows (method x stage x test set) and writes them as JSON, CSV and a PNG plot; `load` reads
an earlier call's JSON so a later call (stage 4 arriving a month later) extends the same table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from metrics import UNASSIGNED
from utils import ScbertError, atomic_write_bytes

__all__ = ["UNASSIGNED", "StreamTable", "h_score", "stage_scores"]

ROW_FIELDS = ["method", "stage", "test_set", "n_cells", "n_seen_cells", "accuracy", "macro_f1", "n_novel_cells",
              "novel_recall", "known_accuracy", "h_score"]
SUMMARY_FIELDS = ["method", "stage", "n_test_sets", "average_accuracy", "average_macro_f1", "forgetting",
                  "known_accuracy", "novel_recall", "h_score"]


def h_score(known_accuracy: float | None, novel_recall: float | None) -> float | None:
    """Harmonic mean of known accuracy and novel recall (0 when both are 0; None when either is missing)."""
    if known_accuracy is None or novel_recall is None:
        return None
    total = known_accuracy + novel_recall
    return 0.0 if total == 0 else 2 * known_accuracy * novel_recall / total


def _macro_f1(true: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> float:
    """Mean F1 over `classes`: each class's F1 from its true and predicted cells; a class with neither is skipped."""
    scores = []
    for name in classes:
        tp = int(np.sum((true == name) & (pred == name)))
        n_true, n_pred = int(np.sum(true == name)), int(np.sum(pred == name))
        if n_true + n_pred == 0:
            continue
        scores.append(2 * tp / (n_true + n_pred))
    return float(np.mean(scores)) if scores else float("nan")


def stage_scores(
    true_labels: Sequence,
    predicted: Sequence,
    seen_classes: Sequence[str],
    *,
    open_predicted: Sequence | None = None,
) -> dict[str, Any]:
    """One test set after one stage: closed-set scores over its seen-type cells, open-set scores over all cells.

    true_labels: (cells,) cell-type names. predicted: (cells,) the argmax class names (closed set). seen_classes:
    the classes the model knows at this stage. open_predicted: (cells,) names or `Unassigned` from the novel-cell
    call; with it and held-out-type cells present, novel recall, known accuracy and H-score are filled in.
    macro-F1 is over the seen classes that have a true or predicted cell in this test set.
    Returns plain numbers (None where a score has no cell to be computed on).
    """
    true, pred = np.asarray(true_labels, dtype=str), np.asarray(predicted, dtype=str)
    if true.shape != pred.shape:
        raise ValueError(f"{len(true)} true labels but {len(pred)} predictions")
    seen = np.isin(true, np.asarray(list(seen_classes), dtype=str))
    row: dict[str, Any] = {"n_cells": int(len(true)), "n_seen_cells": int(seen.sum()),
                           "n_novel_cells": int((~seen).sum()), "accuracy": None, "macro_f1": None,
                           "novel_recall": None, "known_accuracy": None, "h_score": None}
    if seen.any():
        row["accuracy"] = float(np.mean(true[seen] == pred[seen]))
        row["macro_f1"] = _macro_f1(true[seen], pred[seen], list(seen_classes))
    if open_predicted is not None:
        opened = np.asarray(open_predicted, dtype=str)
        if opened.shape != true.shape:
            raise ValueError(f"{len(true)} true labels but {len(opened)} open-set predictions")
        if seen.any():
            row["known_accuracy"] = float(np.mean(opened[seen] == true[seen]))
        if (~seen).any():
            row["novel_recall"] = float(np.mean(opened[~seen] == UNASSIGNED))
        row["h_score"] = h_score(row["known_accuracy"], row["novel_recall"])
    return row


def _pooled(rows: list[dict[str, Any]], field: str, weight: str) -> float | None:
    """Cell-weighted mean of `field` over the rows that have it."""
    kept = [(r[field], r[weight]) for r in rows if r.get(field) is not None and r.get(weight)]
    total = sum(w for _, w in kept)
    return float(sum(v * w for v, w in kept) / total) if total else None


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(kept)) if kept else None


class StreamTable:
    """Rows of (method, stage, test set) scores; summaries per (method, stage); JSON/CSV/PNG writers.

    Adding a row for a (method, stage, test set) already present replaces it (a resumed stage scores again).
    """

    def __init__(self, name: str, rows: list[dict[str, Any]] | None = None):
        self.name = name
        self.rows: list[dict[str, Any]] = list(rows or [])

    @classmethod
    def load(cls, path: str, name: str) -> StreamTable:
        """The table in `path` written by an earlier call, or an empty one when there is no such file."""
        if not os.path.exists(path):
            return cls(name)
        try:
            with open(path, encoding="utf-8") as fh:
                payload = json.load(fh)
            rows = payload["rows"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ScbertError(
                f"could not read the stream table {path!r} ({type(err).__name__}): move it away or pass another "
                "--model_name"
            ) from err
        return cls(name, rows)

    def add(self, method: str, stage: int, test_set: str, scores: dict[str, Any]) -> None:
        """Record `stage_scores(...)` of `test_set` after `stage` (1-based) for `method` (canal, sequential, ...)."""
        key = (str(method), int(stage), str(test_set))
        self.rows = [r for r in self.rows if (r["method"], int(r["stage"]), r["test_set"]) != key]
        self.rows.append({"method": key[0], "stage": key[1], "test_set": key[2],
                          **{k: scores.get(k) for k in ROW_FIELDS[3:]}})
        self.rows.sort(key=lambda r: (r["method"], int(r["stage"]), r["test_set"]))

    def methods(self) -> list[str]:
        return sorted({r["method"] for r in self.rows})

    def matrix(self, method: str, field: str = "accuracy") -> tuple[list[int], list[str], np.ndarray]:
        """(stages, test sets, (stages, test sets) array of `field`, NaN where not scored) for one method."""
        rows = [r for r in self.rows if r["method"] == method]
        stages = sorted({int(r["stage"]) for r in rows})
        tests = sorted({r["test_set"] for r in rows})
        values = np.full((len(stages), len(tests)), np.nan)
        for r in rows:
            if r[field] is not None:
                values[stages.index(int(r["stage"])), tests.index(r["test_set"])] = r[field]
        return stages, tests, values

    def summary(self) -> list[dict[str, Any]]:
        """Per method and stage: average accuracy and macro-F1 over the test sets scored, forgetting, and the open-set
        scores pooled over all test sets' cells (known accuracy over every seen-type cell, novel recall over every
        cell of a type not seen yet, their H-score), since a test set may hold only one of the two."""
        out = []
        for method in self.methods():
            stages, tests, acc = self.matrix(method, "accuracy")
            _, _, f1 = self.matrix(method, "macro_f1")
            for i, stage in enumerate(stages):
                scored = ~np.isnan(acc[i])
                drops = [float(np.nanmax(acc[:i, j]) - acc[i, j]) for j in range(len(tests))
                         if i > 0 and scored[j] and not np.all(np.isnan(acc[:i, j]))]
                rows = [r for r in self.rows if r["method"] == method and int(r["stage"]) == stage]
                known = _pooled(rows, "known_accuracy", "n_seen_cells")
                novel = _pooled(rows, "novel_recall", "n_novel_cells")
                out.append({"method": method, "stage": stage, "n_test_sets": int(scored.sum()),
                            "average_accuracy": _mean(list(acc[i][scored])),
                            "average_macro_f1": _mean(list(f1[i][~np.isnan(f1[i])])),
                            "forgetting": _mean(drops) if drops else None,
                            "known_accuracy": known, "novel_recall": novel, "h_score": h_score(known, novel)})
        return out

    def final(self, method: str) -> dict[str, Any] | None:
        """The summary of the method's last stage."""
        rows = [s for s in self.summary() if s["method"] == method]
        return rows[-1] if rows else None

    # -- writers (call on rank 0; each file atomically) ---------------------------------------------------------------

    def paths(self, folder: str) -> dict[str, str]:
        stem = os.path.join(folder, f"{self.name}_stream")
        return {"json": stem + ".json", "csv": stem + ".csv", "summary_csv": stem + "_summary.csv",
                "png": stem + ".png"}

    def write(self, folder: str) -> dict[str, str]:
        """Write `<name>_stream.json` (rows and summary), `_stream.csv` (rows), `_stream_summary.csv`, `_stream.png`."""
        paths = self.paths(folder)
        payload = {"name": self.name, "rows": self.rows, "summary": self.summary(),
                   "definitions": {"accuracy": "over the test set's cells of the classes seen so far",
                                   "forgetting": "mean over earlier-scored test sets of (best earlier accuracy - "
                                                 "accuracy now)",
                                   "h_score": "harmonic mean of known accuracy and novel recall"}}
        atomic_write_bytes(paths["json"], (json.dumps(payload, indent=2) + "\n").encode("utf-8"))
        atomic_write_bytes(paths["csv"], _csv_bytes(self.rows, ROW_FIELDS))
        atomic_write_bytes(paths["summary_csv"], _csv_bytes(payload["summary"], SUMMARY_FIELDS))
        self.plot(paths["png"])
        return paths

    def plot(self, path: str) -> None:
        """Accuracy of each test set across stages, one panel per method (matplotlib, Agg)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        methods = self.methods()
        fig, axes = plt.subplots(1, max(len(methods), 1), figsize=(4.2 * max(len(methods), 1), 3.4), squeeze=False)
        for ax, method in zip(axes[0], methods, strict=False):
            stages, tests, acc = self.matrix(method, "accuracy")
            for j, test in enumerate(tests):
                ax.plot(stages, acc[:, j], marker="o", label=test)
            ax.set_title(method)
            ax.set_xlabel("stage")
            ax.set_xticks(stages)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy (seen classes)")
        if methods:
            axes[0][-1].legend(fontsize=7, loc="lower left")
        fig.suptitle(f"{self.name}: accuracy per test set across stages")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(path, buf.getvalue())


def _csv_bytes(rows: list[dict[str, Any]], fields: list[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return buf.getvalue().encode("utf-8")
