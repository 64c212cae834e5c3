"""stream_metrics.py: per stage x test set scores over the classes seen so far, average accuracy, forgetting, open-set
scores, and the JSON/CSV/PNG files that a later call extends."""

import csv
import json

import pytest

from stream_metrics import UNASSIGNED, StreamTable, h_score, stage_scores
from utils import ScbertError


def test_stage_scores_over_seen_classes_and_held_out_types():
    true = ["A", "A", "B", "C"]
    closed = ["A", "B", "B", "A"]
    opened = ["A", UNASSIGNED, "B", UNASSIGNED]
    row = stage_scores(true, closed, ["A", "B"], open_predicted=opened)
    assert row["n_seen_cells"] == 3 and row["n_novel_cells"] == 1
    assert row["accuracy"] == pytest.approx(2 / 3)  # the C cell is not scored: C is not seen yet
    assert row["macro_f1"] == pytest.approx(2 / 3)  # A: 2*1/(2+1), B: 2*1/(1+2)
    assert row["known_accuracy"] == pytest.approx(2 / 3)  # an Unassigned known cell counts as wrong
    assert row["novel_recall"] == 1.0
    assert row["h_score"] == pytest.approx(0.8)


def test_stage_scores_without_open_predictions_or_seen_cells():
    row = stage_scores(["C", "C"], ["A", "A"], ["A", "B"])
    assert row["accuracy"] is None and row["novel_recall"] is None and row["h_score"] is None
    assert h_score(0.0, 0.0) == 0.0 and h_score(None, 0.5) is None


def _table():
    table = StreamTable("stream")
    for stage, accs in {1: {"a": 0.9}, 2: {"a": 0.8, "b": 0.7}, 3: {"a": 0.85, "b": 0.5, "c": 0.9}}.items():
        for test, acc in accs.items():
            table.add("canal", stage, test, {"accuracy": acc, "macro_f1": acc - 0.1})
    return table


def test_average_accuracy_and_forgetting():
    summary = {row["stage"]: row for row in _table().summary()}
    assert summary[1]["forgetting"] is None
    assert summary[2]["forgetting"] == pytest.approx(0.1)  # a: 0.9 -> 0.8; b is new
    assert summary[3]["forgetting"] == pytest.approx((0.05 + 0.2) / 2)  # a: best 0.9 -> 0.85, b: 0.7 -> 0.5
    assert summary[3]["average_accuracy"] == pytest.approx(0.75)
    assert summary[3]["n_test_sets"] == 3


def test_open_set_scores_are_pooled_over_test_sets():
    """Per-stage test sets hold either seen or unseen types; the stage's H-score pools their cells."""
    table = StreamTable("stream")
    seen = stage_scores(["A"] * 3 + ["B"], ["A", "A", "B", "B"], ["A", "B"], open_predicted=["A", "A", "B", "B"])
    unseen = stage_scores(["C"] * 4, ["A"] * 4, ["A", "B"], open_predicted=[UNASSIGNED] * 3 + ["A"])
    table.add("canal", 1, "a", seen)
    table.add("canal", 1, "b", unseen)
    row = table.summary()[0]
    assert row["known_accuracy"] == pytest.approx(0.75) and row["novel_recall"] == pytest.approx(0.75)
    assert row["h_score"] == pytest.approx(0.75)
    assert row["average_accuracy"] == pytest.approx(0.75) and row["n_test_sets"] == 1


def test_files_are_written_and_a_later_call_extends_the_table(tmp_path):
    table = StreamTable("stream")
    table.add("canal", 1, "a", {"accuracy": 0.9})
    table.add("sequential", 1, "a", {"accuracy": 0.88})
    paths = table.write(str(tmp_path))
    later = StreamTable.load(paths["json"], "stream")
    later.add("canal", 2, "a", {"accuracy": 0.8})
    later.add("canal", 2, "b", {"accuracy": 0.7})
    later.add("canal", 2, "b", {"accuracy": 0.75})  # a resumed stage scores again: replaced, not duplicated
    later.write(str(tmp_path))
    payload = json.loads((tmp_path / "stream_stream.json").read_text())
    keys = [(r["method"], r["stage"], r["test_set"], r["accuracy"]) for r in payload["rows"]]
    assert keys == [("canal", 1, "a", 0.9), ("canal", 2, "a", 0.8), ("canal", 2, "b", 0.75),
                    ("sequential", 1, "a", 0.88)]
    with open(paths["csv"], newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    with open(paths["summary_csv"], newline="") as fh:
        final = [r for r in csv.DictReader(fh) if r["method"] == "canal" and r["stage"] == "2"][0]
    assert float(final["forgetting"]) == pytest.approx(0.1)
    assert (tmp_path / "stream_stream.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unreadable_table_is_refused(tmp_path):
    path = tmp_path / "stream_stream.json"
    path.write_text("{not json")
    with pytest.raises(ScbertError, match="could not read the stream table"):
        StreamTable.load(str(path), "stream")
