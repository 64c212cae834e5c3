"""pretrain.py end to end on tiny synthetic data: learning beyond the baseline, launchers, kill and resume."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pretrain
import training
from performer_pytorch import PerformerLM, build_model, load_checkpoint
from tests.test_training import write_preprocessed
from utils import ScbertError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--gene_num", "48", "--dim", "16", "--depth", "1", "--heads", "2", "--dim_head", "8", "--batch_size", "8",
        "--grad_acc", "1", "--learning_rate", "5e-2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pretrain_data")
    write_preprocessed(folder / "cells.h5ad", n_cells=640, gene2vec_path=folder / "g2v.npy")
    return ["--data_path", str(folder / "cells.h5ad"), "--gene2vec_path", str(folder / "g2v.npy")]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """Two epochs in-process (with the legacy flag spelling a plain process must also accept)."""
    ckpt_dir = tmp_path_factory.mktemp("pretrain_run")
    records = pretrain.main([*data, *TINY, "--epoch", "2", "--ckpt_dir", str(ckpt_dir), "--model_name", "tiny",
                             "--local_rank", "0"])
    return records, ckpt_dir


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def test_masked_bin_accuracy_beats_the_most_common_bin_baseline(run, capsys):
    records, _ = run
    assert [r["epoch"] for r in records] == [1, 2]
    last = records[-1]
    assert last["valid_cells"] == 32  # every validation cell (5% of 640), not one
    assert last["valid_acc"] > last["baseline_acc"] + 0.2, last
    assert last["valid_loss"] < records[0]["valid_loss"]
    assert records[0]["lr"] == pytest.approx(1e-6) and last["lr"] == pytest.approx(1e-6 + (5e-2 - 1e-6) / 5)


def test_checkpoints_and_log_are_written_in_the_reference_naming(run, data):
    records, ckpt_dir = run
    ckpt = load_checkpoint(str(ckpt_dir / "tiny_2.pth"))
    assert ckpt.genes == [f"G{i}" for i in range(48)] and ckpt.head == {"type": "lm"}
    assert ckpt.payload["model_type"] == "performer" and ckpt.model_type == "performer"
    assert ckpt.payload["epoch"] == 2 and ckpt.payload["scheduler_state_dict"]["last_epoch"] == 2
    model = build_model(ckpt)
    # The reference's loader: torch.load(...)["model_state_dict"] into a model built from the same flags.
    reference_style = PerformerLM(num_tokens=7, max_seq_len=49, dim=16, depth=1, heads=2, dim_head=8)
    reference_style.load_state_dict(torch.load(ckpt_dir / "tiny_2.pth", weights_only=True)["model_state_dict"])
    tokens = torch.randint(0, 6, (2, 49))
    model.eval(), reference_style.eval()
    assert torch.equal(model(tokens), reference_style(tokens))
    lines = (ckpt_dir / "tiny_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["valid_acc"] for line in lines] == [r["valid_acc"] for r in records]


def test_a_finished_run_resumes_to_nothing_and_a_different_gene_list_is_refused(run, data, tmp_path, capsys):
    _, ckpt_dir = run
    args = [*data, *TINY, "--epoch", "2", "--ckpt_dir", str(ckpt_dir), "--model_name", "tiny"]
    assert pretrain.main(args) == []  # rerunning the same command: epochs 1-2 are done
    other = tmp_path / "other.h5ad"
    write_preprocessed(other, n_cells=40, genes=[f"H{i}" for i in range(48)])
    with pytest.raises(ScbertError, match=r"genes of .*other.h5ad.* not the model's 48 genes"):
        pretrain.main([*args, "--data_path", str(other), "--epoch", "3"])
    with pytest.raises(ScbertError, match="flags differ .*--dim 32 vs 16"):
        pretrain.main([*args, "--dim", "32", "--epoch", "3"])


def test_gene_num_must_match_the_data(data, tmp_path):
    with pytest.raises(ScbertError, match="--gene_num 16906 does not match .* 48 genes: pass --gene_num 48"):
        pretrain.main([*data, "--ckpt_dir", str(tmp_path)])


def test_cli_reports_bad_input_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "pretrain.py", "--data_path", str(tmp_path / "missing.h5ad")],
                            cwd=ROOT, capture_output=True, text=True, env=_env())
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: data file") and "Traceback" not in result.stderr


def _check_distributed_run(result, ckpt_dir, world_size):
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"cpu x {world_size}" in result.stdout
    assert result.stdout.count("epoch   1 |") == 1  # only rank 0 prints
    (line,) = (ckpt_dir / "d_log.jsonl").read_text().splitlines()  # only rank 0 logs
    record = json.loads(line)
    assert record["valid_cells"] == 32 and record["train_cells"] == 608
    assert load_checkpoint(str(ckpt_dir / "d_1.pth")).payload["world_size"] == world_size


def test_torchrun_two_processes_on_gloo(data, tmp_path):
    port = _free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               "pretrain.py", *data, *TINY, "--epoch", "1", "--ckpt_dir", str(tmp_path), "--model_name", "d",
               "--grad_acc", "3"]  # 38 steps per rank: no_sync() on most, a partial accumulation at the end
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**_env(), "MASTER_PORT": port},
                            timeout=300)
    _check_distributed_run(result, tmp_path, 2)


def test_legacy_launcher_and_its_local_rank_flag(data, tmp_path):
    # torch.distributed.launch (still present, deprecated, in torch 2.x) passes --local-rank=0 to the script.
    port = _free_port()
    command = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", "1", "--master_port", port,
               "pretrain.py", *data, *TINY, "--epoch", "1", "--ckpt_dir", str(tmp_path), "--model_name", "d"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**_env(), "MASTER_PORT": port},
                            timeout=300)
    _check_distributed_run(result, tmp_path, 1)


def test_killed_run_resumes_from_the_next_epoch_with_the_saved_optimiser_state(data, tmp_path, monkeypatch):
    killed, uninterrupted = tmp_path / "killed", tmp_path / "whole"
    args = [*data, *TINY, "--model_name", "k"]
    process = subprocess.Popen([sys.executable, "pretrain.py", *args, "--epoch", "50", "--ckpt_dir", str(killed)],
                               cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (killed / "k_1.pth").exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert (killed / "k_1.pth").exists()
    # No file under a final name is half-written: every checkpoint there loads.
    finals = sorted(killed.glob("*.pth"))
    for path in finals:
        load_checkpoint(str(path))
    done = max(int(p.stem.split("_")[1]) for p in finals)
    saved = torch.load(killed / f"k_{done}.pth", weights_only=True)["optimizer_state_dict"]

    restored = {}
    original = training.restore_training_state  # what start_run calls

    def spy(path, **kwargs):
        payload = original(path, **kwargs)
        state = kwargs["optimizer"].state_dict()["state"]  # live tensors: copy before training moves them on
        restored["path"] = path
        restored["state"] = {k: {name: v.clone() for name, v in s.items()} for k, s in state.items()}
        return payload

    monkeypatch.setattr(training, "restore_training_state", spy)
    # One thread here (tests/conftest.py) as in the killed process: the same arithmetic.
    resumed = pretrain.main([*args, "--epoch", str(done + 1), "--ckpt_dir", str(killed), "--resume", "True"])
    whole = pretrain.main([*args, "--epoch", str(done + 1), "--ckpt_dir", str(uninterrupted)])
    assert [r["epoch"] for r in resumed] == [done + 1]
    assert restored["path"].endswith(f"k_{done}.pth")
    for key, state in saved["state"].items():
        assert torch.equal(restored["state"][key]["exp_avg"], state["exp_avg"])
        assert torch.equal(restored["state"][key]["exp_avg_sq"], state["exp_avg_sq"])
    # The resumed epoch is the one an uninterrupted run trains: same shuffle, masks, schedule and optimiser.
    assert resumed[0]["lr"] == whole[-1]["lr"]
    assert resumed[0]["train_loss"] == pytest.approx(whole[-1]["train_loss"], rel=1e-4)
    a = torch.load(killed / f"k_{done + 1}.pth", weights_only=True)["model_state_dict"]
    b = torch.load(uninterrupted / f"k_{done + 1}.pth", weights_only=True)["model_state_dict"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-4), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_pretraining_on_gpu_with_mixed_precision(data, tmp_path, amp):
    records = pretrain.main([*data, *TINY, "--epoch", "2", "--ckpt_dir", str(tmp_path), "--model_name", "g",
                             "--device", "cuda", "--amp", amp])
    assert records[-1]["valid_acc"] > records[-1]["baseline_acc"]
    assert load_checkpoint(str(tmp_path / "g_2.pth")).config["dim"] == 16


def test_bf16_autocast_on_cpu_trains(data, tmp_path):
    records = pretrain.main([*data, *TINY, "--epoch", "1", "--ckpt_dir", str(tmp_path), "--model_name", "b",
                             "--amp", "bf16"])
    assert records[0]["train_cells"] == 608 and records[0]["valid_acc"] == records[0]["valid_acc"]  # not NaN
    assert training.find_latest_checkpoint(str(tmp_path), "b")[1] == 1
