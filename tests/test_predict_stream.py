"""predict.py on a query read in row blocks (a shard folder, a backed .h5ad): the in-memory path's labels and
probabilities, in cell order, from one process or two ranks; flags that need every cell refused in one sentence."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import predict
from performer_pytorch import checkpoint_payload, save_checkpoint
from shards import ShardWriter
from tests.conftest import ROOT
from tests.test_predict import CLASSES, GENES, query_values, tiny_model, write_query
from utils import ScbertError

N_CELLS = 30


@pytest.fixture(scope="module")
def query(tmp_path_factory):
    """A checkpoint, a labelled preprocessed .h5ad, the same cells as a shard folder (shards of 7 cells), and the
    in-memory prediction of the .h5ad."""
    folder = tmp_path_factory.mktemp("stream")
    ckpt = folder / "tiny_best.pth"
    save_checkpoint(checkpoint_payload(tiny_model(), genes=GENES, classes=CLASSES, epoch=3), str(ckpt))
    values = query_values(N_CELLS, seed=3)
    truth = pd.DataFrame({"celltype": np.array((CLASSES + ["Kupffer"]) * 8, dtype=object)[:N_CELLS]})
    h5ad = write_query(folder / "query.h5ad", values, obs=truth)
    writer = ShardWriter(str(folder / "shards"), GENES, kind="scbert", cells_per_shard=7)
    obs = truth.set_axis([f"cell{i}" for i in range(N_CELLS)])
    writer.add(values[:11], obs.iloc[:11])
    writer.add(values[11:], obs.iloc[11:])
    writer.close()
    flags = ["--novel_type", "True", "--label_key", "celltype", "--device", "cpu", "--batch_size", "4"]
    whole = predict.main(["--data_path", h5ad, "--model_path", str(ckpt), "--out_path", str(folder / "whole.h5ad"),
                          *flags])
    return dict(folder=folder, ckpt=str(ckpt), h5ad=h5ad, shards=str(folder / "shards"), flags=flags,
                whole=pd.read_csv(folder / "whole.csv"), whole_metrics=whole.metrics)


def _same_as_in_memory(query, csv_path):
    got = pd.read_csv(csv_path)
    assert list(got.columns) == list(query["whole"].columns)
    assert list(got["cell_id"]) == [f"cell{i}" for i in range(N_CELLS)]
    assert list(got["scbert_celltype"]) == list(query["whole"]["scbert_celltype"])
    np.testing.assert_allclose(got.iloc[:, 2:].to_numpy(), query["whole"].iloc[:, 2:].to_numpy(), atol=1e-5)


@pytest.mark.parametrize("source", ["shards", "backed"])
def test_row_blocks_give_the_in_memory_labels_probabilities_and_metrics(query, tmp_path, source):
    data = ["--data_path", query["shards"] if source == "shards" else query["h5ad"]]
    data += ["--backed", "True"] if source == "backed" else []
    result = predict.main([*data, "--model_path", query["ckpt"], "--out_path", str(tmp_path / "out.csv"),
                           "--block_cells", "4", *query["flags"]])
    assert result.adata is None and set(result.paths) == {"csv", "summary", "params", "metrics", "confusion"}
    _same_as_in_memory(query, tmp_path / "out.csv")
    assert result.metrics == query["whole_metrics"]
    assert json.loads((tmp_path / "out_metrics.json").read_text()) == query["whole_metrics"]
    summary = pd.read_csv(tmp_path / "out_summary.csv", index_col=0)
    assert summary["n_cells"].to_dict() == query["whole"]["scbert_celltype"].value_counts().to_dict()
    params = json.loads((tmp_path / "out_params.json").read_text())
    assert params["classes"] == CLASSES and params["params"]["block_cells"] == 4
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in result.paths.values())


def test_prob_match_and_the_default_output_name(query, tmp_path):
    result = predict.main(["--data_path", query["shards"], "--model_path", query["ckpt"], "--device", "cpu",
                           "--mode", "prob_match", "--p_thres", "0.3", "--block_cells", "8"])
    try:
        assert result.paths["csv"] == query["shards"] + "_scbert.csv"
        labels = pd.read_csv(result.paths["csv"])["scbert_celltype"]
        probs = query["whole"][[f"prob_{c}" for c in CLASSES]].to_numpy()
        expected = ["|".join(c for _, c in sorted(((-p, c) for p, c in zip(row, CLASSES, strict=True)
                                                    if p >= 0.3))) or "Unassigned" for row in probs]
        assert list(labels) == expected
        with pytest.raises(ScbertError, match="already exists"):
            predict.main(["--data_path", query["shards"], "--model_path", query["ckpt"], "--device", "cpu"])
    finally:
        for path in result.paths.values():
            os.remove(path)


def test_an_interrupted_prediction_resumes_at_its_last_complete_round(query, tmp_path, monkeypatch):
    import predict_stream

    real, calls = predict_stream.predict_cells, []

    def counting(model, x, **kwargs):
        calls.append(x.shape[0])
        if fail_after is not None and len(calls) > fail_after:
            raise RuntimeError("killed")
        return real(model, x, **kwargs)

    monkeypatch.setattr(predict_stream, "predict_cells", counting)
    argv = ["--data_path", query["shards"], "--model_path", query["ckpt"], "--out_path", str(tmp_path / "out.csv"),
            "--block_cells", "4", *query["flags"]]
    fail_after = 3  # three blocks (12 cells) written, the fourth one killed
    with pytest.raises(RuntimeError, match="killed"):
        predict.main(argv)
    assert not (tmp_path / "out.csv").exists()
    assert json.loads((tmp_path / "out.csv.partial.json").read_text())["cells"] == 12
    calls.clear()
    fail_after = None
    result = predict.main(argv)
    assert calls == [4, 4, 4, 4, 2]  # only the 18 cells left
    _same_as_in_memory(query, tmp_path / "out.csv")
    assert result.metrics == query["whole_metrics"]  # labels of the first run's cells counted again
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(os.path.basename(p) for p in result.paths.values())

    # Other settings than the interrupted run's: its rows are not reused.
    fail_after, calls[:] = 2, []
    with pytest.raises(RuntimeError, match="killed"):
        predict.main([*argv, "--overwrite", "True"])
    fail_after, calls[:] = None, []
    predict.main([*argv, "--overwrite", "True", "--unassign_thres", "0.9"])
    assert calls == [4] * 7 + [2]


@pytest.mark.parametrize("flag, value", [("--plots", "True"), ("--majority_voting", "True"), ("--attention", "type"),
                                         ("--embeddings", "True"), ("--preprocess", "True")])
def test_flags_that_need_every_cell_are_refused_in_one_sentence(query, tmp_path, flag, value):
    with pytest.raises(ScbertError, match=f"{flag} .*row blocks: drop {flag}"):
        predict.main(["--data_path", query["shards"], "--model_path", query["ckpt"], "--device", "cpu",
                      "--out_path", str(tmp_path / "x.csv"), flag, value])
    assert not list(tmp_path.iterdir())


def test_a_column_stored_matrix_is_refused_for_backed_reading(query, tmp_path):
    import anndata as ad
    import scipy.sparse as sp

    adata = ad.read_h5ad(query["h5ad"])
    adata.X = sp.csc_matrix(adata.X)
    adata.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(ScbertError, match="CSC.*tocsr"):
        predict.main(["--data_path", str(tmp_path / "csc.h5ad"), "--backed", "True", "--model_path", query["ckpt"],
                      "--device", "cpu"])


def test_genes_of_another_model_are_refused(query, tmp_path):
    other = tmp_path / "other.pth"
    save_checkpoint(checkpoint_payload(tiny_model(), genes=[f"X{i}" for i in range(len(GENES))], classes=CLASSES,
                                       epoch=1), str(other))
    with pytest.raises(ScbertError, match="genes"):
        predict.main(["--data_path", query["shards"], "--model_path", str(other), "--device", "cpu",
                      "--out_path", str(tmp_path / "x.csv")])


@pytest.mark.slow
def test_two_ranks_share_the_blocks_and_rank_0_writes_them_in_cell_order(query, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": port, "PYTHONWARNINGS": "ignore"}
    # 30 cells in blocks of 7: 5 blocks in 3 rounds, the last block of 2 cells; rank 1 takes blocks 1 and 3 and
    # has none in the last round (it still joins the gather).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "predict.py", "--data_path", query["shards"], "--model_path", query["ckpt"], "--block_cells", "7",
           "--out_path", str(tmp_path / "two.csv"), *query["flags"]]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_as_in_memory(query, tmp_path / "two.csv")
    assert json.loads((tmp_path / "two_metrics.json").read_text()) == query["whole_metrics"]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
