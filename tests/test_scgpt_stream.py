"""The scGPT recipe over row blocks into shards: the in-memory recipe's genes, bins and obs, from one input or
several; seurat_v3 HVGs from per-batch sums equal scanpy's."""

import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import preprocess
from hvg import BatchSums
from scgpt_preprocess import preprocess_scgpt
from scgpt_stream import stream_scgpt
from shards import ShardCorpus
from utils import ScbertError


@pytest.fixture(scope="module")
def counts():
    cells = preprocess.load_pbmc68k_counts()
    cells = cells[np.random.default_rng(1).permutation(cells.n_obs)[:240]].copy()
    cells.X = sp.csr_matrix(cells.X, dtype=np.float32)
    cells.obs["donor_id"] = np.random.default_rng(1).choice(list("abc"), cells.n_obs)
    return cells


def _write(adata, path):
    adata.write_h5ad(path)
    return str(path)


def _same(corpus: ShardCorpus, expected: ad.AnnData):
    assert corpus.genes == list(expected.var_names)
    assert (corpus.to_csr() != sp.csr_matrix(expected.X, dtype=np.float32)).nnz == 0
    assert list(corpus.obs.index) == list(expected.obs_names)
    assert list(corpus.obs["donor_id"]) == list(expected.obs["donor_id"])
    np.testing.assert_array_equal(corpus.obs["n_counts"].to_numpy(), expected.obs["n_counts"].to_numpy())


@pytest.mark.parametrize("batch_key, span", [("donor_id", 1.0), (None, 0.3)])
def test_hvgs_from_per_batch_sums_are_scanpys(counts, batch_key, span):
    import scanpy as sc

    work = counts.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.filter_genes(work, min_counts=1)
        sc.pp.highly_variable_genes(work, n_top_genes=100, flavor="seurat_v3", batch_key=batch_key, span=span,
                                    subset=True)
    batches = counts.obs[batch_key].to_numpy() if batch_key else np.zeros(counts.n_obs)
    sums = BatchSums(counts.n_vars)
    for start in range(0, counts.n_obs, 50):
        sums.add(counts.X[start:start + 50], batches[start:start + 50])
    fit = sums.fit(np.flatnonzero(sums.gene_totals > 0), span)
    for start in range(0, counts.n_obs, 50):
        fit.add_clipped(counts.X[start:start + 50], batches[start:start + 50])
    assert list(counts.var_names[fit.select(100)]) == list(work.var_names)


def test_one_input_in_blocks_gives_the_in_memory_recipe(counts, tmp_path):
    path = _write(counts, tmp_path / "counts.h5ad")  # CSR: read backed
    expected = preprocess_scgpt(counts, n_hvg=120, hvg_batch_key="donor_id", n_bins=21, seed=4)
    summary = stream_scgpt([path], str(tmp_path / "shards"), n_hvg=120, hvg_batch_key="donor_id", n_bins=21, seed=4,
                           block_cells=37, cells_per_shard=50)
    _same(ShardCorpus(str(tmp_path / "shards")), expected)
    want = expected.uns["scgpt_preprocess"]["summary"]
    assert {k: summary[k] for k in want} == want


def test_several_inputs_equal_their_concatenation_and_a_vocabulary_aligns_each(counts, tmp_path):
    halves = [_write(counts[:100].copy(), tmp_path / "a.h5ad"), _write(counts[100:].copy(), tmp_path / "b.h5ad")]
    expected = preprocess_scgpt(counts, n_hvg=120, hvg_batch_key="donor_id", n_bins=21)
    preprocess.main(["--recipe", "scgpt", "--data_path", *halves, "--n_hvg", "120", "--n_bins", "21",
                     "--out_format", "shards", "--block_cells", "64", "--out_path", str(tmp_path / "both")])
    corpus = ShardCorpus(str(tmp_path / "both"))
    _same(corpus, expected)
    assert list(corpus.obs["input"]) == ["a.h5ad"] * 100 + ["b.h5ad"] * 140

    vocabulary = [*list(expected.var_names[::-2]), "NOT_A_GENE"]  # another order, and a gene nobody has
    expected = preprocess_scgpt(counts, genes=vocabulary, n_bins=21)
    flipped = counts[100:].copy()
    flipped = flipped[:, flipped.var_names[::-1]].copy()  # the second input's genes in another order
    inputs = [halves[0], _write(flipped, tmp_path / "flipped.h5ad")]
    summary = stream_scgpt(inputs, str(tmp_path / "vocab"), genes=vocabulary, n_bins=21, block_cells=64)
    _same(ShardCorpus(str(tmp_path / "vocab")), expected)
    assert summary["genes_found"] == expected.uns["scgpt_preprocess"]["summary"]["genes_found"]

    with pytest.raises(ScbertError, match="other genes than .*--ref"):
        stream_scgpt(inputs, str(tmp_path / "x"), n_hvg=50)
    normalised = counts[:50].copy()
    normalised.X = normalised.X.multiply(0.5).tocsr()
    with pytest.raises(ScbertError, match="not raw counts"):
        stream_scgpt([_write(normalised, tmp_path / "norm.h5ad")], str(tmp_path / "y"), n_hvg=50)
    with pytest.raises(ScbertError, match="in-memory recipe takes one"):
        preprocess.main(["--recipe", "scgpt", "--data_path", *halves, "--out_path", str(tmp_path / "z.h5ad")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
