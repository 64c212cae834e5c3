"""The transformer benchmark's FLOP formula, which its percentages of the matmul rate rest on."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_transformer  # noqa: E402


def test_flop_formula_equals_torch_flop_counter():
    check = bench_transformer.flop_counter_check()
    assert check["analytic_forward"] == check["counted_forward"]
    assert check["analytic_step"] == check["counted_step"]


def test_recipe_step_is_about_three_times_71_mflop_per_token():
    # Per token forward at L = 1,201: 12 layers x (6d^2 + 2d^2 + 4d*ff + 4Ld) + decoders, about 71 MFLOP.
    flops = bench_transformer.step_flops(1, 1201, 512, 12, 512)
    assert flops["forward"] / 1201 / 1e6 == pytest.approx(71.0, rel=0.02)
    assert flops["step"] == pytest.approx(3 * flops["forward"], rel=1e-3)
