"""Annotation as CellTypist and scanpy users expect: the user's own counts with every cell kept, prob_match,
majority voting, plots, model cards, --prefix, --summary, --quiet."""

import hashlib
import struct
from collections import Counter
from datetime import datetime

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import annotate
import finetune
import plots
import predict
import preprocess
import voting
from models import load_model
from performer_pytorch import checkpoint_payload, load_checkpoint, save_checkpoint
from tests.test_finetune import args_for, write_dataset, write_pretrained
from tests.test_predict import CLASSES, GENES, query_values, tiny_model, write_query
from utils import ScbertError

SPARSE_CELLS = [3, 7]  # cells of the counts file with 2 expressed genes: under --min_genes 5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    ckpt = folder / "tiny_best.pth"
    save_checkpoint(checkpoint_payload(tiny_model(), genes=GENES, classes=CLASSES, epoch=3), str(ckpt))
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 60, size=(24, len(GENES))).astype(np.float32)
    counts[rng.random(counts.shape) < 0.4] = 0
    for i in SPARSE_CELLS:
        counts[i] = 0
        counts[i, [1, 4]] = [3, 8]
    obs = pd.DataFrame({"donor": [f"d{i % 3}" for i in range(24)], "n": np.arange(24) * 10,
                        "cluster": [str(i % 4) for i in range(24)]},
                       index=[f"bc{(i * 7) % 24:02d}" for i in range(24)])  # not in sorted order
    user = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=GENES))
    counts_path = folder / "counts.h5ad"
    user.write_h5ad(counts_path)
    clusters = pd.DataFrame({"cluster": [str(i % 3) for i in range(30)]})
    query = write_query(folder / "query.h5ad", query_values(), obs=clusters)
    return dict(folder=folder, ckpt=str(ckpt), counts=str(counts_path), user=user, query=query)


def predict_main(files, out, *extra, data=None):
    return predict.main(["--data_path", data or files["query"], "--model_path", files["ckpt"], "--out_path",
                         str(out), "--device", "cpu", *extra])


def png_size(path):
    """(width, height) from a PNG's header: the signature, then the IHDR chunk's two big-endian integers."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


# ---------------------------------------------------------------------------------------------------------------------
# The user's own counts
# ---------------------------------------------------------------------------------------------------------------------


def test_counts_come_back_with_every_cell_and_obs_column_in_order(files, tmp_path):
    result = predict_main(files, tmp_path / "out.h5ad", "--preprocess", "True", "--min_genes", "5",
                          data=files["counts"])
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    user = files["user"]
    assert list(written.obs_names) == list(user.obs_names)
    pd.testing.assert_frame_equal(written.obs[list(user.obs.columns)], user.obs)
    np.testing.assert_array_equal(written.X.toarray(), user.X.toarray())  # the user's counts, not the model input
    labels = written.obs["scbert_celltype"].astype(str).to_numpy()
    reasons = written.obs["scbert_unscored_reason"].to_numpy()
    unscored = np.zeros(user.n_obs, dtype=bool)
    unscored[SPARSE_CELLS] = True
    assert (labels[unscored] == "Unscored").all() and set(labels[~unscored]) <= set(CLASSES)
    assert all("2 of the model's 20 genes expressed, fewer than --min_genes 5" in r for r in reasons[unscored])
    assert (reasons[~unscored] == "").all()
    assert np.isnan(written.obs["scbert_confidence"].to_numpy()[unscored]).all()
    assert np.isnan(written.obsm["scbert_probabilities"][unscored]).all()
    assert np.isfinite(written.obsm["scbert_probabilities"][~unscored]).all()
    assert result.predictions.probs.shape == (user.n_obs - len(SPARSE_CELLS), len(CLASSES))
    table = pd.read_csv(tmp_path / "out.csv")
    assert list(table["cell_id"]) == list(user.obs_names) and list(table["scbert_celltype"]) == list(labels)


def test_counts_give_the_labels_of_preprocessing_first(files, tmp_path):
    prep = tmp_path / "prep.h5ad"
    preprocess.main(["--data_path", files["counts"], "--ref", files["ckpt"], "--out_path", str(prep),
                     "--min_genes", "5"])
    first = predict_main(files, tmp_path / "first.h5ad", "--novel_type", "True", data=str(prep))
    fly = predict_main(files, tmp_path / "fly.h5ad", "--novel_type", "True", "--preprocess", "True",
                       "--min_genes", "5", data=files["counts"])
    scored = (fly.adata.obs["scbert_unscored_reason"] == "").to_numpy()
    assert list(fly.adata.obs_names[scored]) == list(first.adata.obs_names)
    np.testing.assert_array_equal(fly.predictions.probs, first.predictions.probs)
    assert list(fly.adata.obs["scbert_celltype"][scored]) == list(first.adata.obs["scbert_celltype"])
    in_process = annotate.annotate(files["user"].copy(), files["ckpt"], novel_type=True, preprocess=True,
                                   min_genes=5)
    assert list(in_process.obs["scbert_celltype"]) == list(fly.adata.obs["scbert_celltype"])


def test_raw_counts_without_preprocess_say_how(files, tmp_path):
    with pytest.raises(ScbertError, match="raw counts.*--preprocess True"):
        predict_main(files, tmp_path / "x.h5ad", data=files["counts"])


# ---------------------------------------------------------------------------------------------------------------------
# prob_match and majority voting
# ---------------------------------------------------------------------------------------------------------------------


def test_prob_match_joins_every_class_above_the_threshold():
    probs = np.array([[0.45, 0.45, 0.10], [0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.34, 0.33, 0.33]], dtype=np.float32)
    labels = voting.prob_match_labels(probs, ["A", "B", "C"], 0.3)
    assert list(labels) == ["A|B", "A", "B|A", "A|B|C"]
    assert list(voting.prob_match_labels(probs, ["A", "B", "C"], 0.5)) == ["Unassigned", "A", "B", "Unassigned"]
    with pytest.raises(ScbertError, match="--p_thres"):
        voting.prob_match_labels(probs, ["A", "B", "C"], 0.0)


def test_prob_match_from_the_command_line(files, tmp_path):
    result = predict_main(files, tmp_path / "pm.h5ad", "--mode", "prob_match", "--p_thres", "0.3")
    probs = result.predictions.probs
    expected = []
    for row in probs:
        passing = sorted((j for j in range(3) if row[j] >= 0.3), key=lambda j: -row[j])
        expected.append("|".join(CLASSES[j] for j in passing) or "Unassigned")
    assert list(result.adata.obs["scbert_celltype"].astype(str)) == expected
    assert any("|" in label for label in expected)  # the data give some cell two types
    assert result.params["mode"] == "prob_match" and result.params["p_thres"] == 0.3


def test_majority_voting_by_hand():
    labels = ["A", "A", "B", "B", "B", "A", "C", "Unassigned"]
    clusters = ["1", "1", "1", "2", "2", "2", "2", np.nan]
    voted, table = voting.majority_vote(labels, clusters)
    assert list(voted) == ["A", "A", "A", "B", "B", "B", "B", "Unassigned"]  # no cluster: keeps its own label
    assert table.set_index("cluster")["share"].to_dict() == pytest.approx({"1": 2 / 3, "2": 2 / 4})
    voted, _ = voting.majority_vote(labels, clusters, min_prop=0.6)  # cluster 2's B holds only half of it
    assert list(voted) == ["A", "A", "A", "Unassigned", "Unassigned", "Unassigned", "Unassigned", "Unassigned"]
    voted, _ = voting.majority_vote(["B", "A"], ["x", "x"])  # a tie: the first label in sorted order
    assert list(voted) == ["A", "A"]
    voted, _ = voting.majority_vote(["A", "B", "B"], ["x", "x", "x"], voters=np.array([True, True, False]))
    assert list(voted) == ["A", "A", "A"]  # the non-voter follows its cluster's vote (A 1, B 1: sorted first)


def test_majority_voting_on_an_obs_column_and_min_prop(files, tmp_path):
    result = predict_main(files, tmp_path / "mv.h5ad", "--majority_voting", "True", "--over_clustering", "cluster")
    obs = result.adata.obs
    for cluster, cells in obs.groupby("cluster", observed=True):
        counts = Counter(cells["scbert_celltype"].astype(str))
        top = max(counts.values())
        winner = sorted(k for k, v in counts.items() if v == top)[0]
        assert set(cells["scbert_majority_voting"].astype(str)) == {winner}, cluster
    strict = predict_main(files, tmp_path / "mv1.h5ad", "--majority_voting", "True", "--over_clustering", "cluster",
                          "--min_prop", "1.0")
    mixed = [c for c, cells in obs.groupby("cluster", observed=True) if cells["scbert_celltype"].nunique() > 1]
    assert mixed and (strict.adata.obs.loc[obs["cluster"].isin(mixed), "scbert_majority_voting"]
                      == "Unassigned").all()
    table = pd.read_csv(tmp_path / "mv.csv")
    assert list(table["scbert_majority_voting"]) == list(obs["scbert_majority_voting"].astype(str))
    with pytest.raises(ScbertError, match="--over_clustering 'nope' is not a column"):
        predict_main(files, tmp_path / "bad.h5ad", "--majority_voting", "True", "--over_clustering", "nope")


def test_auto_over_clustering_and_plots(files, tmp_path):
    result = predict_main(files, tmp_path / "auto.h5ad", "--majority_voting", "True", "--plots", "True",
                          "--novel_type", "True", "--summary", "True")
    obs = result.adata.obs
    assert obs["scbert_over_clustering"].notna().all()
    for _, cells in obs.groupby("scbert_over_clustering", observed=True):  # one vote per Leiden cluster
        assert cells["scbert_majority_voting"].nunique() == 1
    record = result.adata.uns["scbert_predict"]["majority_voting"]
    assert record["resolution"] == voting.auto_resolution(30) == 5.0
    assert record["representation"] == "cell embeddings"  # --plots computed them for the UMAP
    assert result.adata.obsm["X_scbert_umap"].shape == (30, 2)
    expected = {"umap": plots.pixels(plots.UMAP_PANEL, panels=3), "dotplot": (1000, 500), "confidence": (600, 400)}
    assert expected["umap"] == (1500, 450)
    for kind, size in expected.items():
        assert png_size(result.paths[kind]) == size, kind
    summary = pd.read_csv(result.paths["summary"], index_col=0)
    counts = obs["scbert_celltype"].astype(str).value_counts()
    assert summary["n_cells"].to_dict() == counts.to_dict()
    assert summary["fraction"].sum() == pytest.approx(1.0, abs=1e-4)  # written with 6 significant digits
    colors = result.adata.uns["scbert_celltype_colors"]
    assert len(colors) == len(obs["scbert_celltype"].cat.categories) == 4 and colors[-1] == plots.GREY["Unassigned"]


def test_plots_use_the_users_umap(files, tmp_path):
    query = ad.read_h5ad(files["query"])
    query.obsm["X_umap"] = np.random.default_rng(0).normal(size=(query.n_obs, 2)).astype(np.float32)
    path = tmp_path / "with_umap.h5ad"
    query.write_h5ad(path)
    result = predict_main(files, tmp_path / "u.h5ad", "--plots", "True", data=str(path))
    assert "X_scbert_umap" not in result.adata.obsm and "X_scbert" not in result.adata.obsm
    assert png_size(result.paths["umap"]) == (1000, 450)  # label and confidence
    assert png_size(result.paths["dotplot"]) == (1000, 500)


# ---------------------------------------------------------------------------------------------------------------------
# Keys, quiet
# ---------------------------------------------------------------------------------------------------------------------


def test_prefix_and_quiet(files, tmp_path, capsys):
    capsys.readouterr()
    result = predict_main(files, tmp_path / "p.h5ad", "--prefix", "my_", "--quiet", "True", "--embeddings", "True")
    assert capsys.readouterr().err == ""
    adata = ad.read_h5ad(tmp_path / "p.h5ad")
    assert {"my_celltype", "my_confidence"} <= set(adata.obs.columns) and "scbert_celltype" not in adata.obs
    assert {"my_probabilities", "my_logits", "X_my"} <= set(adata.obsm)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(adata.obsm["my_logits"]), -1).numpy(),
                               result.predictions.probs, atol=1e-6)
    assert adata.uns["my_predict"]["params"]["prefix"] == "my_"
    with pytest.raises(ScbertError, match="--prefix"):
        predict_main(files, tmp_path / "q.h5ad", "--prefix", "1 bad")


# ---------------------------------------------------------------------------------------------------------------------
# Model cards
# ---------------------------------------------------------------------------------------------------------------------


def test_model_card_round_trips_and_prints(tmp_path, capsys):
    data = tmp_path / "train.h5ad"
    write_dataset(data, per_type=(12, 12, 12))
    genes = [f"G{i}" for i in range(40)]
    pretrained = write_pretrained(tmp_path / "pre.pth", genes)
    finetune.main(args_for(data, tmp_path / "ck", "--epoch", "1", "--model_name", "card", "--description",
                           "a tiny test model", model_path=pretrained))
    best = tmp_path / "ck" / "card_best.pth"
    payload = torch.load(best, weights_only=True)
    card = payload["model_card"]
    assert card["description"] == "a tiny test model" and card["model_type"] == "performer"
    assert [c["name"] for c in card["classes"]] == ["type0", "type1", "type2"]
    assert all(c["train_cells"] + c["valid_cells"] == 12 for c in card["classes"])
    assert sum(c["valid_cells"] for c in card["classes"]) == card["training_data"]["valid_cells"] > 0
    assert card["genes"] == {"count": 40, "sha256": hashlib.sha256("\n".join(genes).encode()).hexdigest()}
    assert card["validation"]["accuracy"] == pytest.approx(payload["metrics"]["accuracy"])
    assert card["pretrained_from"] == str(pretrained)
    model = load_model(load_checkpoint(str(best)), head="checkpoint")
    assert card["model_size"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert datetime.fromisoformat(card["created"]).tzinfo is not None
    capsys.readouterr()
    text = predict.main(["--show_model", str(best)])
    out = capsys.readouterr().out
    assert "a tiny test model" in out and text.strip() == out.strip()
    assert "type1: " in out and "40 (sha256" in out


def test_show_model_of_a_checkpoint_without_a_card(files, capsys):
    text = predict.main(["--show_model", files["ckpt"]])
    assert "no model card" in text and "B cell, NK, T cell" in text and "genes: 20" in text
    with pytest.raises(ScbertError, match="does not exist: check the path given to --show_model"):
        predict.main(["--show_model", files["ckpt"] + ".missing"])
