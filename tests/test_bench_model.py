"""The model benchmark's arithmetic: the FLOP formula its percentages rest on, and how steps meet matmul rates."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_model  # noqa: E402


def test_flop_formula_equals_torch_flop_counter_for_every_mode():
    for row in bench_model.flop_counter_check():
        assert row["counted"] == row["analytic"], row["mode"]


def test_full_size_forward_is_about_the_published_312_gflop():
    # 307.5 G by the formula (which the test above checks against torch's counter at a tiny size).
    assert bench_model.model_flops(bench_model.FULL, "infer")["forward"] / 1e9 == pytest.approx(312, rel=0.02)


def _row(step_seconds, beside):
    return dict(
        size="demo",
        mode="infer",
        dtype="fp32",
        batch=2,
        path="fast",
        seconds=min(step_seconds),
        step_seconds=step_seconds,
        matmul_gflops_beside=beside,
        worker_matmul_gflops=100.0,
        peak_rss_mb=400.0,
    )


def test_each_step_is_paired_with_the_faster_rate_beside_it_and_the_median_taken():
    gflop = bench_model.model_flops(bench_model.DEMO, "infer")["total"] * 2 / 1e9
    # Three steps: achieved rates g/1, g/2, g/4; neighbouring rates 10|20, 20|5, 5|40 -> faster 20, 20, 40.
    row = bench_model.finish_row(_row([1.0, 2.0, 4.0], [10.0, 20.0, 5.0, 40.0]), {"fp32": 50.0})
    ratios = sorted([gflop / 1.0 / 20.0, gflop / 2.0 / 20.0, gflop / 4.0 / 40.0])
    assert row["fraction_of_rate_beside"] == pytest.approx(ratios[1])
    # The headline figure stays the fastest step over the larger of the run's and the worker's rate.
    assert row["fraction_of_matmul_rate"] == pytest.approx(gflop / 1.0 / 100.0)


def test_loop_measured_at_its_ends_uses_the_fastest_step_and_the_faster_end():
    gflop = bench_model.model_flops(bench_model.DEMO, "infer")["total"] * 2 / 1e9
    row = bench_model.finish_row(_row([0.5, 0.25, 0.3], [30.0, 60.0]), {"fp32": 50.0})
    assert row["fraction_of_rate_beside"] == pytest.approx(gflop / 0.25 / 60.0)


@pytest.mark.slow
def test_demo_run_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--sizes", "demo", "--modes", "infer", "--dtypes", "fp32", "--batch_sizes", "1", "--min_seconds", "0.05"]
    threads = torch.get_num_threads()
    try:
        rows = bench_model.main([*args, "--compare_plain", "False", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)  # the benchmark sets its own thread count
    printed = capsys.readouterr().out
    assert len(rows) == 1 and "error" not in rows[0], rows
    row = rows[0]
    assert row["cells_per_s"] > 0 and row["peak_rss_mb"] > 0
    assert 0 < row["fraction_of_matmul_rate"] < 2 and 0 < row["fraction_of_rate_beside"] < 2
    assert "% beside" in printed and "demo  infer" in printed
    saved = json.loads(out.read_text())
    assert saved["results"][0]["cells_per_s"] == pytest.approx(row["cells_per_s"])
    assert saved["matmul"]["fp32"]["gflops"] > 0


def test_unknown_mode_is_one_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_model.run_cli(bench_model.main, ["--modes", "inference"])
    assert exit_info.value.code != 0
    assert "unknown value" in capsys.readouterr().err
