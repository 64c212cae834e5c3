"""gene2vec.py: co-expressed pairs, word2vec on planted gene modules, alignment to a reference, conversion, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import gene2vec
from genes import read_reference_genes
from utils import PREPROCESS_UNS_KEY, ScbertError

REPO = Path(__file__).resolve().parents[1]
N_MODULES, MODULE_SIZE, N_NOISE = 3, 8, 16


def planted_counts(n_cells: int = 300, seed: int = 0) -> tuple[np.ndarray, list[str], list[int]]:
    """Counts (cells, 40 genes): 3 modules of 8 genes switched on together in ~30% of cells, then 16 noise genes.

    Returns (counts, real gene symbols, module of each gene or -1 for noise genes).
    """
    rng = np.random.default_rng(seed)
    active = rng.random((n_cells, N_MODULES)) < 0.3
    rate = np.full((n_cells, N_MODULES * MODULE_SIZE + N_NOISE), 0.3)
    for m in range(N_MODULES):
        rate[:, m * MODULE_SIZE : (m + 1) * MODULE_SIZE] += 4.0 * active[:, [m]]
    rate *= rng.lognormal(0.0, 0.3, size=(n_cells, 1))  # cell size
    symbols = read_reference_genes(None)[100:500:10]  # 40 current symbols
    modules = [m for m in range(N_MODULES) for _ in range(MODULE_SIZE)] + [-1] * N_NOISE
    return rng.poisson(rate).astype(np.float32), symbols, modules


def write_h5ad(path: Path, X, symbols, uns: dict | None = None) -> str:
    adata = ad.AnnData(X=sp.csr_matrix(X, dtype=np.float32))
    adata.var_names = list(symbols)
    adata.obs_names = [f"cell{i}" for i in range(adata.n_obs)]
    if uns:
        adata.uns.update(uns)
    adata.write_h5ad(path)
    return str(path)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    counts, symbols, modules = planted_counts()
    path = write_h5ad(tmp_path_factory.mktemp("planted") / "counts.h5ad", counts, symbols)
    return path, counts, symbols, modules


def test_pair_search_equals_dense_correlation_in_any_block_size():
    counts, _symbols, _modules = planted_counts()
    dense = gene2vec.log_normalise(counts).toarray()
    dense[:, 30] = 0  # two noise genes take no part: one never expressed, one expressed in 3 cells only
    dense[3:, 31] = 0
    X = sp.csr_matrix(dense)
    with np.errstate(invalid="ignore"):
        r = np.corrcoef(dense.T)
    skip = (30, 31)
    expected = {(i, j) for i in range(40) for j in range(i + 1, 40) if r[i, j] >= 0.3 and i not in skip
                and j not in skip}
    for block_size in (1, 7, 64):
        first, second, values, tested = gene2vec.correlated_gene_pairs(
            X, threshold=0.3, min_cells=10, block_size=block_size
        )
        assert set(zip(first.tolist(), second.tolist(), strict=True)) == expected
        assert tested == 38
        np.testing.assert_allclose(values, r[first, second], atol=1e-5)
    assert len(expected) == 3 * MODULE_SIZE * (MODULE_SIZE - 1) // 2  # exactly the within-module pairs


def test_max_pairs_keeps_the_strongest():
    counts, _symbols, _modules = planted_counts()
    X = gene2vec.log_normalise(counts)
    first, second, r, _t = gene2vec.correlated_gene_pairs(X, threshold=0.3, max_pairs=0, block_size=4)
    strongest = {(first[k], second[k]) for k in np.argsort(-r)[:10]}
    # Block size 4 makes the search prune its running list several times along the way.
    first, second, _r, _t = gene2vec.correlated_gene_pairs(X, threshold=0.3, max_pairs=10, block_size=4)
    assert set(zip(first, second, strict=True)) == strongest


def test_planted_modules_are_closer_and_rows_follow_the_reference(planted, tmp_path):
    path, _counts, symbols, modules = planted
    # The reference: the data's genes shuffled, plus two genes the data do not have.
    order = np.random.default_rng(1).permutation(len(symbols))
    absent = ["CD3E", "JCHAIN"]
    reference = [symbols[i] for i in order] + absent
    ref_path = tmp_path / "ref.txt"
    ref_path.write_text("\n".join(reference) + "\n")
    out = tmp_path / "g2v.npy"
    txt = tmp_path / "g2v.txt"
    gene2vec.main(["--data_path", path, "--ref", str(ref_path), "--out_path", str(out), "--txt_path", str(txt),
                   "--dim", "16", "--partners", "0", "--fallback", "zero"])  # the threshold alone, zero fallback

    table = np.load(out)
    assert table.dtype == np.float32 and table.shape == (len(reference), 16)
    row = {gene: table[i] for i, gene in enumerate(reference)}
    within, between = [], []
    for a in range(N_MODULES * MODULE_SIZE):
        for b in range(a + 1, N_MODULES * MODULE_SIZE):
            (within if modules[a] == modules[b] else between).append(cosine(row[symbols[a]], row[symbols[b]]))
    assert min(within) > max(between)
    # Genes without a vector (absent from the data, or co-expressed with nothing) get the zero row.
    assert not table[-2:].any()
    assert not np.stack([row[symbols[i]] for i in range(N_MODULES * MODULE_SIZE, len(symbols))]).any()
    # The text file holds the trained vectors themselves, under the same symbols as the .npy rows.
    text = gene2vec.read_text_vectors(str(txt))
    assert set(text) == set(symbols[: N_MODULES * MODULE_SIZE])
    for gene, vector in text.items():
        np.testing.assert_array_equal(vector, row[gene])


def test_training_is_reproducible_with_a_seed_across_processes():
    counts, symbols, _modules = planted_counts()
    pairs = gene2vec.coexpression_pairs(gene2vec.log_normalise(counts), symbols)
    first = gene2vec.train_gene2vec(pairs, dim=8, seed=7)
    second = gene2vec.train_gene2vec(pairs, dim=8, seed=7)
    other = gene2vec.train_gene2vec(pairs, dim=8, seed=8)
    assert list(first) == list(second)
    assert all(np.array_equal(first[g], second[g]) for g in first)
    assert not all(np.array_equal(first[g], other[g]) for g in first)
    # Another interpreter with another string-hash seed gives the same vectors.
    code = (
        "import sys, numpy as np; sys.path.insert(0, '.'); import gene2vec\n"
        f"pairs = {pairs!r}\n"
        "v = gene2vec.train_gene2vec(pairs, dim=8, seed=7)\n"
        "sys.stdout.write(np.stack(list(v.values())).tobytes().hex())\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            check=True)
    assert bytes.fromhex(result.stdout) == np.stack(list(first.values())).tobytes()


def test_counts_log_normalised_and_preprocessed_inputs_give_the_same_pairs(planted, tmp_path):
    path, counts, symbols, _modules = planted
    logged = gene2vec.log_normalise(counts)
    log_path = write_h5ad(tmp_path / "log.h5ad", logged, symbols)
    pre_path = write_h5ad(tmp_path / "pre.h5ad", logged, symbols, uns={PREPROCESS_UNS_KEY: {"params": {}}})
    results = []
    for p, kind in ((path, "counts"), (log_path, "log-normalised"), (pre_path, "preprocessed")):
        X, genes, info = gene2vec.read_expression(p)
        assert info["kind"] == kind and genes == symbols
        results.append(gene2vec.coexpression_pairs(X, genes))
    assert results[0] == results[1] == results[2] and len(results[0]) == 84


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_raw_symbols_are_revised_and_duplicates_dropped(tmp_path):
    counts, symbols, _modules = planted_counts()
    raw = list(symbols)
    raw[0], raw[1], raw[2] = "IGJ", "not_a_gene", symbols[3]  # old symbol, unknown, duplicate of column 3
    _X, genes, info = gene2vec.read_expression(write_h5ad(tmp_path / "raw.h5ad", counts, raw))
    assert genes[0] == "JCHAIN" and "not_a_gene" not in genes and len(genes) == 38 == info["genes"]


def test_several_files_pool_their_pairs(planted):
    path, *_ = planted
    vectors, infos = gene2vec.build_from_data([path, path], dim=8, verbose=False)
    assert [info["pairs"] for info in infos] == [84, 84] and len(vectors) == N_MODULES * MODULE_SIZE


GENE2VEC_RELEASE = (  # the published layout: symbol, a tab, space-separated numbers with a trailing space
    "IGJ\t1.0 2.0 3.0 \n"  # an old symbol: revised to JCHAIN
    "CD3E\t0.5 -0.5 0.25 \n"
    "NOTAGENE1\t9 9 9 \n"  # unknown: dropped
    "CD3E\t7 7 7 \n"  # a symbol seen twice keeps its first vector
    "\n"
    "MS4A1\t-1 0 1e-3 \n"
)


def test_convert_published_text_release_aligns_by_revised_symbol(tmp_path):
    release = tmp_path / "gene2vec_dim_3.txt"
    release.write_text(GENE2VEC_RELEASE)
    reference = ["MS4A1", "GAPDH", "JCHAIN", "CD3E"]
    table, report = gene2vec.convert_text_release(str(release), reference)
    expected = np.array([[-1, 0, 1e-3], [0, 0, 0], [1, 2, 3], [0.5, -0.5, 0.25]], dtype=np.float32)
    np.testing.assert_array_equal(table, expected)
    assert report["reference_missing"] == 1 and report["genes_unknown"] == 1 and report["genes_renamed"] == 1
    # The random fallback fills only the missing row, the same way for the same seed.
    rand, _ = gene2vec.convert_text_release(str(release), reference, fallback="random", seed=3)
    again, _ = gene2vec.convert_text_release(str(release), reference, fallback="random", seed=3)
    np.testing.assert_array_equal(rand, again)
    assert np.all(rand[1] != 0)
    np.testing.assert_array_equal(np.delete(rand, 1, axis=0), np.delete(expected, 1, axis=0))


def test_cli_conversion_reads_word2vec_header_and_writes_npy(tmp_path):
    release = tmp_path / "w2v.txt"
    release.write_text("2 3\nCD3E 0.5 -0.5 0.25\nMS4A1 -1 0 0.001\n")
    ref = tmp_path / "ref.txt"
    ref.write_text("CD3E\nGAPDH\nMS4A1\n")
    out = tmp_path / "conv.npy"
    gene2vec.main(["--from_txt", str(release), "--ref", str(ref), "--out_path", str(out)])
    np.testing.assert_array_equal(np.load(out), np.array([[0.5, -0.5, 0.25], [0, 0, 0], [-1, 0, 1e-3]], np.float32))


def test_text_output_round_trips_through_conversion(tmp_path):
    vectors = {"CD3E": np.array([0.1, 1 / 3], np.float32), "MS4A1": np.array([-2.5e-7, 7.0], np.float32)}
    path = tmp_path / "v.txt"
    path.write_bytes(gene2vec.text_vectors_bytes(vectors))
    back = gene2vec.read_text_vectors(str(path))
    assert list(back) == list(vectors) and all(np.array_equal(back[g], vectors[g]) for g in vectors)


def test_errors_name_the_fix(planted, tmp_path):
    path, counts, symbols, _modules = planted
    ref = tmp_path / "ref.txt"
    ref.write_text("\n".join(symbols) + "\n")
    out = tmp_path / "g.npy"
    out.write_bytes(b"keep me")
    with pytest.raises(ScbertError, match="--overwrite True"):
        gene2vec.main(["--data_path", path, "--ref", str(ref), "--out_path", str(out)])
    assert out.read_bytes() == b"keep me"
    fresh = str(tmp_path / "new.npy")
    with pytest.raises(ScbertError, match="lower --threshold"):
        gene2vec.main(["--data_path", path, "--ref", str(ref), "--out_path", fresh, "--threshold", "0.99",
                      "--partners", "0"])
    other = tmp_path / "other.txt"
    other.write_text("GAPDH\nACTB\n")
    with pytest.raises(ScbertError, match="none of the reference genes"):
        gene2vec.main(["--data_path", path, "--ref", str(other), "--out_path", fresh, "--dim", "8"])
    not_h5ad = tmp_path / "x.h5ad"
    not_h5ad.write_text("not hdf5")
    with pytest.raises(ScbertError, match="cannot read"):
        gene2vec.read_expression(str(not_h5ad))
    scaled = write_h5ad(tmp_path / "scaled.h5ad", counts - counts.mean(axis=0), symbols)
    with pytest.raises(ScbertError, match="negative values"):
        gene2vec.read_expression(scaled)
    bad = tmp_path / "bad.txt"
    bad.write_text("CD3E\t0.1 0.2\nMS4A1\t0.1 zero\n")
    with pytest.raises(ScbertError, match="line 2"):
        gene2vec.read_text_vectors(str(bad))
    assert not os.path.exists(fresh)


def test_cli_error_is_one_line_and_exit_code_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "gene2vec.py", "--data_path", str(tmp_path / "missing.h5ad"), "--out_path",
         str(tmp_path / "g.npy")],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_by_default_every_reference_gene_gets_a_distinct_non_zero_row(planted, tmp_path):
    """Issue 15: the default (5 partners per gene, random fallback) leaves no gene without an identity: every
    expressed gene is trained (the noise genes too), absent ones get a seeded random row; modules still cluster."""
    path, _counts, symbols, modules = planted
    reference = list(symbols) + ["CD3E", "JCHAIN"]
    ref_path = tmp_path / "ref.txt"
    ref_path.write_text("\n".join(reference) + "\n")
    out, txt = tmp_path / "g2v.npy", tmp_path / "g2v.txt"
    gene2vec.main(["--data_path", path, "--ref", str(ref_path), "--out_path", str(out), "--txt_path", str(txt),
                   "--dim", "16"])
    table = np.load(out)
    assert np.abs(table).sum(axis=1).min() > 0
    assert np.unique(table, axis=0).shape[0] == len(reference)
    trained = gene2vec.read_text_vectors(str(txt))
    assert set(symbols) <= set(trained)  # all 40 genes are expressed in 10+ cells, noise genes included
    row = {gene: table[i] for i, gene in enumerate(reference)}
    within = [cosine(row[symbols[a]], row[symbols[b]]) for a in range(24) for b in range(a + 1, 24)
              if modules[a] == modules[b]]
    between = [cosine(row[symbols[a]], row[symbols[b]]) for a in range(24) for b in range(a + 1, 24)
               if modules[a] != modules[b]]
    assert np.mean(within) > np.mean(between) + 0.3


def test_partners_add_each_genes_strongest_correlations_in_any_block_size():
    counts, _symbols, _modules = planted_counts()
    dense = gene2vec.log_normalise(counts).toarray()
    r = np.corrcoef(dense.T)
    np.fill_diagonal(r, -np.inf)
    expected = {(i, j) for i in range(40) for j in range(i + 1, 40) if r[i, j] >= 0.3}
    for i in range(40):
        for j in np.argsort(-r[i])[:3]:
            if r[i, j] > 0:
                expected.add((min(i, j), max(i, int(j))))
    for block_size in (1, 7, 64):
        first, second, values, _ = gene2vec.correlated_gene_pairs(
            sp.csr_matrix(dense), threshold=0.3, min_cells=10, block_size=block_size, partners=3)
        assert set(zip(first.tolist(), second.tolist(), strict=True)) == expected
        np.testing.assert_allclose(values, r[first, second], atol=1e-5)
    assert {g for pair in expected for g in pair} == set(range(40))
