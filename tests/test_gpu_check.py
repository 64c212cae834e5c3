"""benchmarks/gpu_check.py: the part a CPU can run (fast vs plain path, outputs and gradients) on a small size."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.mark.parametrize("amp", ["fp32", "bf16"])
def test_parity_of_fast_and_plain_paths_with_gradients(amp):
    row = gpu_check.parity(gpu_check.TINY, torch.device("cpu"), amp, batch=2)
    assert row["tokens"] == gpu_check.TINY["genes"] + 1 and row["same_grad_names"] and row["finite"]
    logits_limit, grad_limit = gpu_check.parity_limits(row)
    assert row["logits_rel"] < logits_limit and row["grad_rel"] < grad_limit, row
    assert gpu_check.parity_ok(row)
    if amp == "bf16":  # the limit comes from bf16's own rounding of the plain path, measured beside it
        assert row["logits_noise"] > gpu_check.FP32_LIMIT


def test_parity_sees_a_fast_path_that_differs(monkeypatch):
    import performer_pytorch.performer_pytorch as model_module

    real = model_module.favor_self_attention
    monkeypatch.setattr(model_module, "favor_self_attention", lambda *a, **k: real(*a, **k) * 1.01)
    row = gpu_check.parity(gpu_check.TINY, torch.device("cpu"), "fp32", batch=1)
    assert not gpu_check.parity_ok(row), row


def test_cpu_run_of_the_parity_part_writes_its_report(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    gpu_check.main(["--device", "cpu", "--size", "tiny", "--parts", "parity", "--json", str(out)])
    report = json.loads(out.read_text())
    assert [row["amp"] for row in report["parity"]] == ["fp32", "bf16"]
    assert all(row["ok"] for row in report["parity"])
    assert "parity fp32" in capsys.readouterr().out


def test_no_gpu_is_one_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.run_cli(gpu_check.main, [])
    assert exit_info.value.code == 2
    assert "no CUDA GPU" in capsys.readouterr().err
