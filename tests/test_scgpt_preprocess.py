"""The scGPT recipe on real PBMC counts: HVGs per donor, log1p layer, bins in X, and its one-sentence refusals."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from binning import bin_cells
from preprocess import load_pbmc68k_counts
from scgpt_preprocess import NORMALISED_LAYER, SCGPT_UNS_KEY, preprocess_scgpt
from utils import ScbertError


@pytest.fixture(scope="module")
def pbmc():
    adata = load_pbmc68k_counts()
    rng = np.random.default_rng(0)
    adata.obs["donor_id"] = rng.choice(["d1", "d2", "d3", "d4"], size=adata.n_obs)
    return adata


@pytest.fixture(scope="module")
def binned(pbmc):
    return preprocess_scgpt(pbmc, n_hvg=200, hvg_batch_key="donor_id", n_bins=51, seed=1)


def test_recipe_output(pbmc, binned):
    import scanpy as sc

    assert binned.n_vars == 200 and binned.X.dtype == np.int8
    assert binned.var["highly_variable"].all()
    # The same 200 genes scanpy picks itself with the recipe's settings.
    ref = pbmc.copy()
    sc.pp.filter_genes(ref, min_counts=1)
    sc.pp.filter_cells(ref, min_counts=1)
    sc.pp.highly_variable_genes(ref, n_top_genes=200, flavor="seurat_v3", batch_key="donor_id", span=1.0)
    assert set(binned.var_names) == set(ref.var_names[ref.var["highly_variable"]])
    # Layer: log1p(CP10K) over the kept genes, cells empty over them dropped.
    counts = sp.csr_matrix(pbmc[binned.obs_names, binned.var_names].X, dtype=np.float64)
    expected = sp.diags(1e4 / np.asarray(counts.sum(axis=1)).ravel()) @ counts
    np.testing.assert_allclose(binned.layers[NORMALISED_LAYER].toarray(), np.log1p(expected.toarray()), rtol=1e-5)
    # X: the layer's bins, same sparsity, 1..50 on non-zeros.
    bins = binned.X
    assert (bins.indptr == binned.layers[NORMALISED_LAYER].indptr).all()
    assert bins.data.min() == 1 and bins.data.max() == 50
    again, edges = bin_cells(binned.layers[NORMALISED_LAYER], n_bins=51, seed=1)
    assert (again.toarray() == bins.toarray()).all()
    record = binned.uns[SCGPT_UNS_KEY]
    np.testing.assert_array_equal(record["bin_edges"], edges)
    assert record["params"]["n_bins"] == 51 and record["params"]["hvg_batch_key"] == "donor_id"
    assert record["summary"]["cells_out"] == binned.n_obs <= pbmc.n_obs


def test_round_trip_through_h5ad(binned, tmp_path):
    path = tmp_path / "binned.h5ad"
    binned.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert (back.X.toarray() == binned.X.toarray()).all()
    assert back.uns[SCGPT_UNS_KEY]["bin_edges"].shape == (binned.n_obs, 50)


def test_vocabulary_genes_in_their_order(pbmc):
    genes = ["NOT_A_GENE", *list(pbmc.var_names[:40][::-1])]
    out = preprocess_scgpt(pbmc, genes=genes, n_bins=11)
    assert list(out.var_names) == genes
    assert out.X[:, 0].nnz == 0
    counts = np.asarray(pbmc[out.obs_names, genes[1:]].X.toarray())
    assert ((out.X[:, 1:].toarray() > 0) == (counts > 0)).all()


def test_missing_batch_column_refused(pbmc):
    with pytest.raises(ScbertError, match="'sample' is not a column of obs"):
        preprocess_scgpt(pbmc, n_hvg=200, hvg_batch_key="sample")


def test_too_few_genes_refused(pbmc):
    with pytest.raises(ScbertError, match="fewer than --n_hvg 1200"):
        preprocess_scgpt(pbmc, n_hvg=1200)


def test_binned_input_refused(binned):
    with pytest.raises(ScbertError, match="already binned"):
        preprocess_scgpt(binned, n_hvg=100)
    stripped = ad.AnnData(X=binned.X.astype(np.float32), obs=binned.obs)
    with pytest.raises(ScbertError, match="already holds bins"):
        preprocess_scgpt(stripped, n_hvg=100)


def test_normalised_input_refused(binned):
    logged = ad.AnnData(X=binned.layers[NORMALISED_LAYER], obs=binned.obs)
    with pytest.raises(ScbertError, match="not raw counts"):
        preprocess_scgpt(logged, n_hvg=100)


def test_preprocess_cli_recipe_scgpt_and_ref(pbmc, tmp_path):
    import preprocess
    from transformer_model import GeneVocab, TransformerModel, save_transformer

    raw = tmp_path / "raw.h5ad"
    pbmc.write_h5ad(raw)
    out = tmp_path / "binned.h5ad"
    summary = preprocess.main(["--data_path", str(raw), "--recipe", "scgpt", "--n_hvg", "150", "--hvg_batch_key",
                               "donor_id", "--n_bins", "21", "--out_path", str(out)])
    binned = ad.read_h5ad(out)
    assert binned.n_vars == 150 == summary["genes_out"] and binned.X.max() == 20
    assert binned.uns[SCGPT_UNS_KEY]["params"]["hvg_span"] == 1.0
    # --ref: a transformer checkpoint's genes, in its order.
    vocab = GeneVocab(list(binned.var_names[::-1]))
    ckpt = tmp_path / "t.pth"
    save_transformer(str(ckpt), TransformerModel(vocab=vocab, dim=8, depth=1, heads=2, ff_dim=8), vocab)
    mapped = tmp_path / "mapped.h5ad"
    preprocess.main(["--data_path", str(raw), "--recipe", "scgpt", "--ref", str(ckpt), "--out_path", str(mapped)])
    assert list(ad.read_h5ad(mapped).var_names) == vocab.genes
    with pytest.raises(ScbertError, match="already exists"):
        preprocess.main(["--data_path", str(raw), "--recipe", "scgpt", "--n_hvg", "150", "--out_path", str(out)])


def test_preprocess_cli_bad_input_exit_2(pbmc, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    raw = tmp_path / "raw.h5ad"
    pbmc.write_h5ad(raw)
    script = Path(__file__).resolve().parents[1] / "preprocess.py"
    for extra, words in ((["--hvg_batch_key", "sample"], "not a column of obs"), (["--n_hvg", "5000"], "--n_hvg")):
        proc = subprocess.run([sys.executable, str(script), "--data_path", str(raw), "--recipe", "scgpt",
                               "--out_path", str(tmp_path / "o.h5ad"), *extra], capture_output=True, text=True)
        assert proc.returncode == 2 and words in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
