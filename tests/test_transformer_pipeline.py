"""The transformer family through the user's scripts: pretrain.py --model_type transformer (and resume), then
finetune.py and predict.py from its checkpoints, the family coming from the checkpoint."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import finetune
import predict
import pretrain
from utils import ScbertError

TINY = ["--dim", "32", "--depth", "2", "--heads", "4", "--max_seq_len", "64"]


@pytest.fixture(scope="module")
def binned_path(tmp_path_factory):
    from preprocess import load_pbmc68k_counts
    from scgpt_preprocess import preprocess_scgpt

    counts = load_pbmc68k_counts()
    counts = counts[np.random.default_rng(0).permutation(counts.n_obs)[:300]].copy()
    counts.obs["donor_id"] = np.random.default_rng(0).choice(list("abc"), counts.n_obs)
    path = tmp_path_factory.mktemp("tdata") / "binned.h5ad"
    preprocess_scgpt(counts, n_hvg=150, hvg_batch_key="donor_id").write_h5ad(path)
    return str(path)


def test_pretrain_finetune_predict(binned_path, tmp_path):
    ckpts = tmp_path / "ckpts"
    common = ["--model_type", "transformer", "--data_path", binned_path, "--ckpt_dir", str(ckpts), *TINY,
              "--learning_rate", "3e-3"]
    records = pretrain.main([*common, "--epoch", "1"])
    assert len(records) == 1 and records[0]["valid_cell_mean_mse"] > 100
    assert {"train_mse", "train_mvc_mse", "valid_mse", "valid_mvc_mse", "valid_constant_mse"} <= set(records[0])
    # Rerunning the same command with more epochs resumes at epoch 2 (recipe schedule: StepLR 0.9 per epoch).
    records = pretrain.main([*common, "--epoch", "2"])
    assert [r["epoch"] for r in records] == [2]
    assert records[0]["lr"] == pytest.approx(3e-3 * 0.9)
    log = [json.loads(line) for line in open(ckpts / "scgpt_pretrain_log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2]
    best = str(ckpts / "scgpt_pretrain_best.pth")

    # --model_type must agree with the checkpoint; without it, the checkpoint decides.
    with pytest.raises(ScbertError, match="does not match"):
        finetune.main(["--model_type", "performer", "--data_path", binned_path, "--model_path", best])
    ft_dir = tmp_path / "ft"
    results = finetune.main(["--data_path", binned_path, "--label_key", "bulk_labels", "--model_path", best,
                             "--epoch", "2", "--learning_rate", "1e-3", "--ckpt_dir", str(ft_dir),
                             "--model_name", "tft"])
    assert 0.0 <= results[0]["accuracy"] <= 1.0
    out = tmp_path / "pred.h5ad"
    result = predict.main(["--data_path", binned_path, "--model_path", str(ft_dir / "tft_best.pth"),
                           "--label_key", "bulk_labels", "--embeddings", "True", "--out_path", str(out),
                           "--majority_voting", "True", "--plots", "True"])
    pred = ad.read_h5ad(out)
    # CellTypist's refinement and the pictures work for this family too (t-test markers: it has no attention).
    assert set(pred.obs["scbert_majority_voting"].astype(str)) <= set(pred.obs["scbert_celltype"].astype(str)) | {
        "Unassigned"}
    for kind in ("umap", "dotplot", "confidence"):
        assert open(result.paths[kind], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    classes = sorted(set(pred.obs["bulk_labels"]))
    assert list(pred.obs["scbert_celltype"].cat.categories) == classes
    np.testing.assert_allclose(pred.obsm["scbert_probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    assert pred.obsm["X_scbert"].shape == (pred.n_obs, 32)
    assert pred.uns["scbert_predict"]["params"]["model_type"] == "transformer"
    assert result is not None
    # The annotation API gives predict.py's labels and probabilities on the same cells.
    from annotate import annotate

    again = annotate(ad.read_h5ad(binned_path), str(ft_dir / "tft_best.pth"))
    np.testing.assert_allclose(again.obsm["scbert_probabilities"], pred.obsm["scbert_probabilities"], atol=1e-6)
    assert (again.obs["scbert_celltype"].astype(str) == pred.obs["scbert_celltype"].astype(str)).all()
    # The same bins as a shard folder, predicted in row blocks, give the same CSV rows.
    from shards import ShardWriter

    binned = ad.read_h5ad(binned_path)
    writer = ShardWriter(str(tmp_path / "shards"), binned.var_names, kind="scgpt", cells_per_shard=128)
    writer.add(binned.X, binned.obs)
    writer.close()
    predict.main(["--data_path", str(tmp_path / "shards"), "--model_path", str(ft_dir / "tft_best.pth"),
                  "--block_cells", "100", "--out_path", str(tmp_path / "streamed.csv")])
    streamed, whole = pd.read_csv(tmp_path / "streamed.csv"), pd.read_csv(tmp_path / "pred.csv")
    assert list(streamed["scbert_celltype"]) == list(whole["scbert_celltype"])
    probs = [f"prob_{c}" for c in classes]
    np.testing.assert_allclose(streamed[probs].to_numpy(), whole[probs].to_numpy(), atol=1e-5)


def test_transformer_data_must_be_binned(tmp_path):
    from preprocess import load_pbmc68k_counts

    raw = tmp_path / "raw.h5ad"
    load_pbmc68k_counts().write_h5ad(raw)
    with pytest.raises(ScbertError, match="--recipe scgpt"):
        pretrain.main(["--model_type", "transformer", "--data_path", str(raw), "--ckpt_dir", str(tmp_path), *TINY])


def test_cosine_schedule_steps_with_the_optimiser_and_resumes():
    """--lr_schedule cosine (scGPT): linear warm-up then cosine decay, advanced by every optimiser step; a restored
    schedule continues where the saved one was."""
    import math

    import torch

    from transformer_pretrain import PerStepCosine, cosine_warmup_factor

    assert [cosine_warmup_factor(s, 4, 12) for s in (0, 2, 4)] == [0.0, 0.5, 1.0]
    assert cosine_warmup_factor(8, 4, 12) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine_warmup_factor(12, 4, 12) == 0.0 and cosine_warmup_factor(20, 4, 12) == 0.0

    def make():
        weight = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.SGD([weight], lr=2.0)
        return weight, optimizer, PerStepCosine(optimizer, warmup=4, total=12)

    weight, optimizer, schedule = make()
    seen = []
    for _ in range(6):
        weight.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()  # the run loop's per-epoch call changes nothing
        seen.append(optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([2.0 * cosine_warmup_factor(s, 4, 12) for s in range(1, 7)])
    _, optimizer2, schedule2 = make()
    schedule2.load_state_dict(schedule.state_dict())
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(seen[-1])
    with pytest.raises(ScbertError, match="--lr_schedule step"):
        schedule2.load_state_dict(torch.optim.lr_scheduler.StepLR(optimizer2, 1).state_dict())


def test_cosine_schedule_through_pretrain(binned_path, tmp_path):
    """pretrain.py --lr_schedule cosine --warmup 0.5: the rate each epoch starts at follows the per-step schedule over
    the run's optimiser steps (291 training cells in batches of 32: 10 steps per epoch, 20 in all, 10 of warm-up)."""
    from transformer_pretrain import cosine_warmup_factor

    records = pretrain.main(["--model_type", "transformer", "--data_path", binned_path, "--ckpt_dir", str(tmp_path),
                             *TINY, "--learning_rate", "1e-3", "--epoch", "2", "--lr_schedule", "cosine",
                             "--warmup", "0.5"])
    assert [r["lr"] for r in records] == pytest.approx([0.0, 1e-3 * cosine_warmup_factor(10, 10, 20)])
    assert records[1]["lr"] == pytest.approx(1e-3)


def test_adam_eps_follows_the_recipe():
    """Adam's eps is 1e-4 for the transformer family under fp16 autocast (scGPT), torch's 1e-8 otherwise."""
    from argparse import Namespace

    from optim import adam_eps

    assert adam_eps(Namespace(amp="fp16", model_type="transformer")) == 1e-4
    assert adam_eps(Namespace(amp="bf16", model_type="transformer")) == 1e-8
    assert adam_eps(Namespace(amp="fp16", model_type="performer")) == 1e-8
    assert adam_eps(Namespace(amp="none")) == 1e-8


def test_transformer_under_the_legacy_launcher(binned_path, tmp_path):
    """torch.distributed.launch (deprecated, still in torch 2.x; passes --local-rank=0) runs the transformer family's
    pretraining as it runs the Performer's: rank 0 logs one line per epoch and the checkpoint records one rank."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from performer_pytorch import load_checkpoint

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", "1", "--master_port", port,
           "pretrain.py", "--model_type", "transformer", "--data_path", binned_path, "--ckpt_dir", str(tmp_path),
           *TINY, "--epoch", "1", "--model_name", "legacy"]
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": port})
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = (tmp_path / "legacy_log.jsonl").read_text().splitlines()
    assert json.loads(line)["epoch"] == 1
    ckpt = load_checkpoint(str(tmp_path / "legacy_1.pth"))
    assert ckpt.model_type == "transformer" and ckpt.payload["world_size"] == 1
