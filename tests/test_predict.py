"""predict.py: reference-exact probabilities, novel-type calls, every output a user keeps, evaluation, input errors."""

import json
import pickle
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import annotate
import predict
from metrics import annotation_metrics
from models import ScbertPerformer
from performer_pytorch import ClassificationHead, checkpoint_payload, save_checkpoint
from performer_pytorch.interpret import attention_received
from tests.conftest import ROOT
from utils import PREPROCESS_UNS_KEY, ScbertError, tokenize

GENES = [f"G{i}" for i in range(20)]

CLASSES = ["B cell", "NK", "T cell"]
REF_CLASSES = ["alpha", "beta", "delta", "gamma", "epsilon"]


def tiny_model(n_classes=3, lm=False):
    torch.manual_seed(0)
    model = ScbertPerformer(num_tokens=7, max_seq_len=len(GENES) + 1, dim=16, depth=2, heads=2, dim_head=8,
                            gene2vec=torch.randn(len(GENES), 16), lm_head=lm)
    if not lm:
        model.to_out = ClassificationHead(seq_len=len(GENES) + 1, dim=16, n_classes=n_classes)
        with torch.no_grad():  # larger weights spread the probabilities, so thresholds bite and argmaxes differ
            for layer in (model.to_out.fc1, model.to_out.fc2):
                layer.weight.mul_(3.0)
            model.to_out.fc3.weight.mul_(10.0)
            model.to_out.fc3.bias.zero_()
    return model.eval()


def write_query(path, X, genes=GENES, obs=None, preprocessed=True):
    names = [f"cell{i}" for i in range(X.shape[0])]
    obs = pd.DataFrame(index=names) if obs is None else obs.set_axis(names)
    adata = ad.AnnData(X=sp.csr_matrix(X, dtype=np.float32), obs=obs)
    adata.var_names = list(genes)
    if preprocessed:
        adata.uns[PREPROCESS_UNS_KEY] = {"params": {"target_sum": 10000.0, "log_base": 2.0}}
    adata.write_h5ad(path)
    return str(path)


def query_values(n_cells=30, seed=0):
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.1, 6.5, size=(n_cells, len(GENES))).astype(np.float32)
    values[rng.random(values.shape) < 0.5] = 0.0
    return values


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny fine-tuned checkpoint of ours and a labelled query with a type the model never saw."""
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_model()
    ckpt = folder / "tiny_best.pth"
    save_checkpoint(checkpoint_payload(model, genes=GENES, classes=CLASSES, epoch=3), str(ckpt))
    values = query_values()
    truth = np.array((CLASSES + ["Kupffer"]) * 8)[:30].astype(object)
    truth[5] = np.nan  # an unlabelled cell: not scored
    query = write_query(folder / "query.h5ad", values, obs=pd.DataFrame({"celltype": truth}))
    return dict(folder=folder, ckpt=str(ckpt), query=query, model=model, values=values, truth=truth)


@pytest.fixture(scope="module")
def reference_files(reference, tmp_path_factory):
    """The reference's fine-tuned checkpoint, its label_dict pickle, and a query whose X gives the fixture's tokens."""
    folder = tmp_path_factory.mktemp("ref")
    ckpt = folder / "reference_best.pth"
    torch.save(reference["finetune_checkpoint"], ckpt)
    label_dict = folder / "label_dict"
    with open(label_dict, "wb") as fh:  # as the reference wrote it
        pickle.dump(np.unique(np.array(REF_CLASSES, dtype=object)), fh)
    tokens = reference["tokens"][:, :-1].numpy()  # (4, 100): drop the appended token, tokenize adds it back
    values = np.where(tokens > 0, tokens + 0.5, 0.0).astype(np.float32)
    query = write_query(folder / "ref_query.h5ad", values, genes=[f"RG{i}" for i in range(tokens.shape[1])])
    assert torch.equal(tokenize(values), reference["tokens"])
    return dict(folder=folder, ckpt=str(ckpt), label_dict=str(label_dict), query=query)


def run(tiny, tmp_path, *extra, name="out.h5ad"):
    return predict.main(["--data_path", tiny["query"], "--model_path", tiny["ckpt"],
                         "--out_path", str(tmp_path / name), "--device", "cpu", *extra])


# ---------------------------------------------------------------------------------------------------------------------
# The reference's checkpoint gives the reference's numbers
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 8])
def test_reference_checkpoint_probabilities_equal_softmax_of_reference_logits(reference, reference_files, tmp_path,
                                                                              batch_size, capsys):
    result = predict.main(["--data_path", reference_files["query"], "--model_path", reference_files["ckpt"],
                           "--label_dict", reference_files["label_dict"], "--batch_size", str(batch_size),
                           "--out_path", str(tmp_path / "pred.h5ad"), "--device", "cpu"])
    expected = torch.softmax(reference["expected_class_logits"].double(), dim=-1).numpy()
    np.testing.assert_allclose(result.predictions.probs, expected, atol=1e-5, rtol=0)
    classes = sorted(REF_CLASSES)  # np.unique order, as the reference's label_dict
    assert list(result.adata.obs["scbert_celltype"]) == [classes[i] for i in expected.argmax(axis=1)]
    assert result.params["checkpoint_format"] == "reference"
    assert "stores no gene list" in capsys.readouterr().err


def test_reference_checkpoint_without_label_dict_is_refused(reference_files, tmp_path):
    with pytest.raises(ScbertError, match="--label_dict"):
        predict.main(["--data_path", reference_files["query"], "--model_path", reference_files["ckpt"],
                      "--out_path", str(tmp_path / "x.h5ad")])


def test_label_dict_of_the_wrong_length_is_refused(reference_files, tmp_path):
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    with pytest.raises(ScbertError, match="3 classes but the model's head has 5"):
        predict.main(["--data_path", reference_files["query"], "--model_path", reference_files["ckpt"],
                      "--label_dict", str(tmp_path / "classes.txt"), "--out_path", str(tmp_path / "x.h5ad")])


def test_unsafe_label_dict_is_refused(reference_files, tmp_path):
    class Exploit:
        def __reduce__(self):
            return print, ("PAYLOAD-RAN",)

    (tmp_path / "label_dict").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ScbertError, match="refusing to load"):
        predict.main(["--data_path", reference_files["query"], "--model_path", reference_files["ckpt"],
                      "--label_dict", str(tmp_path / "label_dict"), "--out_path", str(tmp_path / "x.h5ad")])


def test_reference_checkpoint_checks_the_gene_count(reference_files, tmp_path):
    query = write_query(tmp_path / "q.h5ad", query_values(4))  # 20 genes, the model reads 100
    with pytest.raises(ScbertError, match="20 genes but the model reads 100"):
        predict.main(["--data_path", query, "--model_path", reference_files["ckpt"],
                      "--label_dict", reference_files["label_dict"], "--out_path", str(tmp_path / "x.h5ad")])


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


def test_every_output_field(tiny, tmp_path):
    result = run(tiny, tmp_path, "--novel_type", "True", "--unassign_thres", "0.6", "--embeddings", "True")
    assert set(result.paths) == {"h5ad", "csv", "summary"}  # the summary unless --summary False
    adata = ad.read_h5ad(tmp_path / "out.h5ad")
    probs = adata.obsm["scbert_probabilities"]
    assert probs.shape == (30, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert list(adata.uns["scbert_predict"]["classes"]) == CLASSES

    # Probabilities are the model's softmax, computed here independently.
    with torch.no_grad():
        logits = tiny["model"](tokenize(tiny["values"]))
    np.testing.assert_allclose(probs, torch.softmax(logits, -1).numpy(), atol=1e-5)

    celltype = adata.obs["scbert_celltype"]
    assert isinstance(celltype.dtype, pd.CategoricalDtype)
    assert list(celltype.cat.categories) == CLASSES + ["Unassigned"]
    top = probs.max(axis=1)
    np.testing.assert_allclose(adata.obs["scbert_confidence"], top)
    expected = np.where(top < 0.6, "Unassigned", np.array(CLASSES)[probs.argmax(axis=1)])
    assert list(celltype.astype(str)) == list(expected)
    assert 0 < (expected == "Unassigned").sum() < 30  # the threshold bites on some cells, not all

    params = adata.uns["scbert_predict"]["params"]
    assert params["novel_type"] and params["unassign_thres"] == 0.6 and params["gene_num"] == 20
    assert params["bin_num"] == 5 and params["checkpoint_format"] == "scbert"

    # Embeddings: mean final-norm encoding over each cell's expressed genes.
    emb = adata.obsm["X_scbert"]
    assert emb.shape == (30, 16)
    with torch.no_grad():
        enc = tiny["model"](tokenize(tiny["values"][:1]), return_encodings=True)[0, :-1]
    expressed = tiny["values"][0] >= 1.0  # token > 0
    np.testing.assert_allclose(emb[0], enc[torch.from_numpy(expressed)].mean(0).numpy(), atol=1e-5)

    # The input is untouched and its obs kept.
    assert list(adata.obs["celltype"].astype(str))[:3] == CLASSES
    assert "scbert_celltype" not in ad.read_h5ad(tiny["query"]).obs

    table = pd.read_csv(tmp_path / "out.csv")
    assert list(table.columns) == ["cell_id", "scbert_celltype", "scbert_confidence"] + [f"prob_{c}" for c in CLASSES]
    assert list(table["cell_id"]) == list(adata.obs_names)
    assert list(table["scbert_celltype"]) == list(expected)
    np.testing.assert_allclose(table[[f"prob_{c}" for c in CLASSES]].to_numpy(), probs, rtol=1e-5)


def test_default_output_path_is_beside_the_input_and_never_overwritten(tiny, tmp_path):
    query = write_query(tmp_path / "q.h5ad", tiny["values"][:4])
    result = predict.main(["--data_path", query, "--model_path", tiny["ckpt"], "--device", "cpu"])
    assert result.paths["h5ad"] == str(tmp_path / "q_scbert.h5ad")
    assert (tmp_path / "q_scbert.csv").exists()
    with pytest.raises(ScbertError, match="already exists.*--overwrite True"):
        predict.main(["--data_path", query, "--model_path", tiny["ckpt"]])
    predict.main(["--data_path", query, "--model_path", tiny["ckpt"], "--overwrite", "True", "--device", "cpu"])
    assert (tmp_path / "q_scbert_summary.csv").exists()
    lean = predict.main(["--data_path", query, "--model_path", tiny["ckpt"], "--device", "cpu", "--summary", "False",
                         "--out_path", str(tmp_path / "lean.h5ad")])
    assert set(lean.paths) == {"h5ad", "csv"} and not (tmp_path / "lean_summary.csv").exists()
    with pytest.raises(ScbertError, match="is the input file"):
        predict.main(["--data_path", query, "--model_path", tiny["ckpt"], "--out_path", query, "--overwrite", "True"])


def test_same_labels_and_probabilities_at_any_batch_size(tiny, tmp_path):
    one = run(tiny, tmp_path, "--batch_size", "1", name="b1.h5ad")
    eight = run(tiny, tmp_path, "--batch_size", "8", name="b8.h5ad")
    np.testing.assert_allclose(one.predictions.probs, eight.predictions.probs, atol=1e-6)
    assert list(one.adata.obs["scbert_celltype"]) == list(eight.adata.obs["scbert_celltype"])


def test_bf16_autocast_runs(tiny, tmp_path):
    result = run(tiny, tmp_path, "--amp", "bf16")
    np.testing.assert_allclose(result.predictions.probs.sum(axis=1), 1.0, atol=1e-5)
    exact = run(tiny, tmp_path, name="fp32.h5ad").predictions.probs
    assert np.abs(result.predictions.probs - exact).max() < 0.1


# ---------------------------------------------------------------------------------------------------------------------
# Novel types
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "novel_type, thres, all_unassigned",
    [("True", "1.0", True), ("False", "1.0", False), ("True", "0.0", False)],
    ids=["on-threshold-1", "False-means-off", "on-threshold-0"],
)
def test_novel_type_threshold(tiny, tmp_path, novel_type, thres, all_unassigned):
    result = run(tiny, tmp_path, "--novel_type", novel_type, "--unassign_thres", thres)
    labels = result.adata.obs["scbert_celltype"].astype(str)
    if all_unassigned:
        assert (labels == "Unassigned").all()
    else:
        assert not (labels == "Unassigned").any()
        assert list(labels) == list(np.array(CLASSES)[result.predictions.probs.argmax(axis=1)])
    assert ("Unassigned" in result.adata.obs["scbert_celltype"].cat.categories) == (novel_type == "True")


def test_novel_type_defaults_off_and_threshold_is_a_probability(tiny, tmp_path):
    result = run(tiny, tmp_path, "--unassign_thres", "1.0")
    assert not (result.adata.obs["scbert_celltype"] == "Unassigned").any()
    with pytest.raises(ScbertError, match=r"\[0, 1\]"):
        run(tiny, tmp_path, "--unassign_thres", "1.5", name="x.h5ad")


def test_assign_labels_is_strict_below_the_threshold():
    probs = np.array([[0.5, 0.3, 0.2], [0.49, 0.41, 0.1]], dtype=np.float32)
    labels, conf = annotate.assign_labels(probs, ["a", "b", "c"], novel_type=True, unassign_thres=0.5)
    assert list(labels) == ["a", "Unassigned"] and conf.tolist() == pytest.approx([0.5, 0.49])


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------


def test_evaluation_numbers_by_hand():
    truth = ["a", "a", "b", "b", "x", "x", "x", None]
    pred = ["a", "Unassigned", "b", "a", "Unassigned", "a", "Unassigned", "a"]
    metrics, confusion = annotation_metrics(truth, pred, ["a", "b", "c"], novel_type=True)
    assert metrics["n_cells"] == 7 and metrics["n_without_label"] == 1
    assert metrics["n_known"] == 4 and metrics["n_novel"] == 3 and metrics["novel_types"] == ["x"]
    assert metrics["accuracy"] == pytest.approx(2 / 4)
    # F1 over the known classes present: a: P 1/2 R 1/2 -> 1/2; b: P 1 R 1/2 -> 2/3.
    assert metrics["macro_f1"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert metrics["known_unassigned_rate"] == pytest.approx(1 / 4)
    assert metrics["novel_recall"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["b"]["recall"] == pytest.approx(0.5) and metrics["per_class"]["b"]["support"] == 2
    assert list(confusion.index) == ["a", "b", "x"]
    assert list(confusion.columns) == ["a", "b", "c", "Unassigned"]
    assert confusion.loc["x"].tolist() == [1, 0, 0, 2] and confusion.loc["b"].tolist() == [1, 1, 0, 0]
    assert int(confusion.to_numpy().sum()) == 7


def test_label_key_writes_metrics_and_confusion(tiny, tmp_path, capsys):
    result = run(tiny, tmp_path, "--novel_type", "True", "--label_key", "celltype")
    metrics = json.loads((tmp_path / "out_metrics.json").read_text())
    pred = result.adata.obs["scbert_celltype"].astype(str).to_numpy()
    truth = tiny["truth"]
    labelled = pd.notna(truth)
    known = labelled & np.isin(truth.astype(str), CLASSES)
    novel = labelled & ~known
    assert metrics["n_known"] == known.sum() and metrics["n_novel"] == novel.sum() == 7
    assert metrics["accuracy"] == pytest.approx(np.mean(pred[known] == truth[known]))
    assert metrics["novel_recall"] == pytest.approx(np.mean(pred[novel] == "Unassigned"))
    assert result.adata.uns["scbert_predict"]["metrics"]["accuracy"] == pytest.approx(metrics["accuracy"])
    confusion = pd.read_csv(tmp_path / "out_confusion.csv", index_col=0)
    assert list(confusion.columns) == CLASSES + ["Unassigned"] and "Kupffer" in confusion.index
    assert confusion.to_numpy().sum() == labelled.sum()
    err = capsys.readouterr().err
    assert "accuracy" in err and "novel types (Kupffer)" in err


# ---------------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------------


def test_attention_per_cell_and_per_type(tiny, tmp_path):
    result = run(tiny, tmp_path, "--attention", "cell")
    per_cell = np.load(tmp_path / "out_attention_cells.npy")
    assert per_cell.shape == (30, 20)
    expected = attention_received(tiny["model"], tokenize(tiny["values"]))[:, :-1].numpy()
    np.testing.assert_allclose(per_cell, expected, rtol=1e-4, atol=1e-6)
    table = pd.read_csv(tmp_path / "out_attention.csv", index_col="gene")
    assert list(table.index) == GENES
    labels = result.adata.obs["scbert_celltype"].astype(str).to_numpy()
    for name in set(labels):
        np.testing.assert_allclose(table[name], per_cell[labels == name].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(table["all_cells"], per_cell.mean(axis=0), rtol=1e-5)
    assert set(table.columns) == set(labels) | {"all_cells"}
    direct = annotate.predict_cells(tiny["model"], tiny["values"], batch_size=7, attention_layer=-1)
    np.testing.assert_allclose(direct.attention[:, :-1], per_cell, rtol=1e-5, atol=1e-7)
    with pytest.raises(ScbertError, match="--attention_layer 2 does not exist.*from -2 to 1"):
        run(tiny, tmp_path, "--attention", "type", "--attention_layer", "2", name="bad.h5ad")


# ---------------------------------------------------------------------------------------------------------------------
# Input errors
# ---------------------------------------------------------------------------------------------------------------------


def test_missing_checkpoint(tiny, tmp_path):
    with pytest.raises(ScbertError, match="does not exist"):
        predict.main(["--data_path", tiny["query"], "--model_path", str(tmp_path / "none.pth"),
                      "--out_path", str(tmp_path / "x.h5ad")])


def test_checkpoint_without_classification_head(tiny, tmp_path):
    path = tmp_path / "lm.pth"
    save_checkpoint(checkpoint_payload(tiny_model(lm=True), genes=GENES), str(path))
    with pytest.raises(ScbertError, match="fine-tune it with finetune.py first"):
        predict.main(["--data_path", tiny["query"], "--model_path", str(path), "--out_path", str(tmp_path / "x.h5ad")])


def test_genes_not_in_the_models_order(tiny, tmp_path):
    query = write_query(tmp_path / "q.h5ad", tiny["values"], genes=GENES[::-1])
    with pytest.raises(ScbertError, match=r"run preprocess.py --ref .*tiny_best.pth"):
        predict.main(["--data_path", query, "--model_path", tiny["ckpt"]])


def test_raw_counts(tiny, tmp_path):
    query = write_query(tmp_path / "q.h5ad", np.round(tiny["values"] * 20), preprocessed=False)
    with pytest.raises(ScbertError, match="raw counts"):
        predict.main(["--data_path", query, "--model_path", tiny["ckpt"]])


def test_label_key_not_in_obs(tiny, tmp_path):
    with pytest.raises(ScbertError, match="--label_key 'cell_type' is not a column.*celltype"):
        run(tiny, tmp_path, "--label_key", "cell_type")
    assert not (tmp_path / "out.h5ad").exists()


@pytest.mark.parametrize("flag, value, match", [("--gene_num", "16906", "--gene_num 16906"),
                                                ("--bin_num", "7", "--bin_num 7"),
                                                ("--pos_embed", "False", "--pos_embed False")])
def test_published_size_flags_must_match_the_checkpoint(tiny, tmp_path, flag, value, match):
    with pytest.raises(ScbertError, match=match):
        run(tiny, tmp_path, flag, value)
    run(tiny, tmp_path, "--gene_num", "20", "--bin_num", "5", "--pos_embed", "True", name="ok.h5ad")


def test_cli_exit_code_and_one_line_message(tiny, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), "--data_path", tiny["query"], "--model_path", tiny["ckpt"],
         "--label_key", "nope", "--out_path", str(tmp_path / "x.h5ad")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--label_key 'nope'" in lines[0] and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_checkpoint_predicts_on_cpu_and_gpu_agrees(tiny, tmp_path):
    path = tmp_path / "gpu.pth"
    payload = checkpoint_payload(tiny_model(), genes=GENES, classes=CLASSES)
    payload["model_state_dict"] = {k: v.cuda() for k, v in payload["model_state_dict"].items()}  # as saved on a GPU
    torch.save(payload, path)
    assert torch.load(path, weights_only=True)["model_state_dict"]["token_emb.weight"].is_cuda
    args = ["--data_path", tiny["query"], "--model_path", str(path)]
    cpu = predict.main([*args, "--device", "cpu", "--out_path", str(tmp_path / "cpu.h5ad")])
    gpu = predict.main([*args, "--device", "cuda", "--out_path", str(tmp_path / "gpu.h5ad")])
    np.testing.assert_allclose(cpu.predictions.probs, gpu.predictions.probs, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# The annotation API and prediction under torchrun
# ---------------------------------------------------------------------------------------------------------------------


def test_annotate_in_process_gives_the_labels_and_probabilities_of_predict_py(tiny, tmp_path):
    cli = run(tiny, tmp_path, "--novel_type", "True", "--unassign_thres", "0.5", "--embeddings", "True",
              "--label_key", "celltype")
    written = ad.read_h5ad(cli.paths["h5ad"])
    query = ad.read_h5ad(tiny["query"])
    returned = annotate.annotate(query, tiny["ckpt"], novel_type=True, unassign_thres=0.5, embeddings=True,
                                 label_key="celltype")
    assert returned is query  # in place, as scanpy's functions; copy=True leaves the input alone
    assert list(returned.obs["scbert_celltype"]) == list(written.obs["scbert_celltype"])
    assert list(returned.obs["scbert_celltype"].cat.categories) == CLASSES + ["Unassigned"]
    np.testing.assert_array_equal(returned.obsm["scbert_probabilities"], written.obsm["scbert_probabilities"])
    np.testing.assert_array_equal(returned.obsm["X_scbert"], written.obsm["X_scbert"])
    assert returned.uns["scbert_predict"]["metrics"] == pytest.approx(dict(written.uns["scbert_predict"]["metrics"]))
    untouched = ad.read_h5ad(tiny["query"])
    copied = annotate.annotate(untouched, tiny["ckpt"], copy=True)
    assert "scbert_celltype" not in untouched.obs and "scbert_celltype" in copied.obs
    with pytest.raises(ScbertError, match="raw counts"):
        annotate.annotate(ad.AnnData(X=np.full((3, len(GENES)), 40.0, dtype=np.float32),
                                     var=pd.DataFrame(index=GENES)), tiny["ckpt"])
    with pytest.raises(ScbertError, match="not the model's 20 genes in order"):
        annotate.annotate(ad.AnnData(X=np.zeros((3, len(GENES)), dtype=np.float32),
                                     var=pd.DataFrame(index=GENES[::-1])), tiny["ckpt"])


def test_two_processes_under_torchrun_write_what_one_process_writes(tiny, tmp_path):
    import os
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    extra = ["--novel_type", "True", "--embeddings", "True", "--attention", "cell", "--batch_size", "4",
             "--label_key", "celltype", "--majority_voting", "True"]
    one = run(tiny, tmp_path, *extra, name="one.h5ad")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": port}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "predict.py", "--data_path", tiny["query"], "--model_path", tiny["ckpt"], "--device", "cpu",
           "--out_path", str(tmp_path / "two.h5ad"), *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = ad.read_h5ad(tmp_path / "two.h5ad")
    assert list(two.obs["scbert_celltype"]) == list(one.adata.obs["scbert_celltype"])
    assert list(two.obs["scbert_majority_voting"]) == list(one.adata.obs["scbert_majority_voting"])
    np.testing.assert_allclose(two.obsm["scbert_probabilities"], one.predictions.probs, atol=1e-6)
    np.testing.assert_allclose(two.obsm["X_scbert"], one.adata.obsm["X_scbert"], atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "two_attention_cells.npy"),
                               np.load(tmp_path / "one_attention_cells.npy"), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pd.read_csv(tmp_path / "two_attention.csv", index_col=0).to_numpy(),
                               pd.read_csv(tmp_path / "one_attention.csv", index_col=0).to_numpy(), rtol=1e-5)
    assert (tmp_path / "two_metrics.json").read_text() == (tmp_path / "one_metrics.json").read_text()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
