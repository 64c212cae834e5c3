"""The transformer family through the user's scripts: pretrain.py --model_type transformer (and resume), then
finetune.py and predict.py from its checkpoints, the family coming from the checkpoint."""

import json

import anndata as ad
import numpy as np
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
                           "--label_key", "bulk_labels", "--embeddings", "True", "--out_path", str(out)])
    pred = ad.read_h5ad(out)
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


def test_transformer_data_must_be_binned(tmp_path):
    from preprocess import load_pbmc68k_counts

    raw = tmp_path / "raw.h5ad"
    load_pbmc68k_counts().write_h5ad(raw)
    with pytest.raises(ScbertError, match="--recipe scgpt"):
        pretrain.main(["--model_type", "transformer", "--data_path", str(raw), "--ckpt_dir", str(tmp_path), *TINY])
