"""preprocess.py: every input format, exact numbers on hand-made counts, revision in context, and bad input."""

import gzip
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

import preprocess
from genes import load_gene_table
from preprocess import PreprocessWarning, normalize_log1p, preprocess_adata
from utils import PREPROCESS_UNS_KEY, ScbertError, read_preprocessed, run_cli

ROOT = Path(__file__).resolve().parents[1]

# Hand-made data: 4 cells x 6 genes. IGJ is JCHAIN's old symbol; XIST is a real gene missing from the reference;
# NOTAGENE is unknown; MS4A1 (reference) is missing from the data.
GENES = ["NKG7", "IGJ", "CD3E", "XIST", "NOTAGENE", "CD14"]
ENSEMBL = [
    "ENSG00000105374.1",
    "ENSG00000132465.12",
    "ENSG00000198851",
    "ENSG00000229807",
    "ENSG99999999999",
    "ENSG00000170458",
]
REF = ["CD3E", "JCHAIN", "MS4A1", "CD14", "NKG7"]
CELLS = ["c0", "c1", "c2", "c3"]
COUNTS = np.array(
    [
        [5, 0, 3, 7, 2, 1],  # reference genes: CD3E 3, CD14 1, NKG7 5 -> 3 genes, total 9
        [0, 10, 0, 1, 0, 0],  # JCHAIN 10 -> 1 gene
        [1, 1, 1, 0, 9, 1],  # CD3E, JCHAIN, CD14, NKG7 1 each -> 4 genes, total 4
        [0, 0, 0, 50, 50, 0],  # no reference gene
    ],
    dtype=np.int64,
)
# The same counts in reference order (CD3E, JCHAIN, MS4A1, CD14, NKG7).
ALIGNED = np.array([[3, 0, 0, 1, 5], [0, 10, 0, 0, 0], [1, 1, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=np.float64)


def expected(rows, base=2.0, target=1e4):
    block = ALIGNED[rows]
    return np.log1p(block / block.sum(1, keepdims=True) * target) / np.log(base)


@pytest.fixture(scope="module")
def table():
    return load_gene_table()


@pytest.fixture
def ref_file(tmp_path):
    path = tmp_path / "ref.txt"
    path.write_text("\n".join(REF) + "\n")
    return str(path)


# ------------------------------------------------------------------ writers for each input format


def write_h5ad(folder, layout="X"):
    """layout X: counts in X; layer: X normalised, counts in layers['counts']; raw: X log-normalised, counts in .raw."""
    path = folder / f"in_{layout}.h5ad"
    counts = sp.csr_matrix(COUNTS.astype(np.float32))
    obs = pd.DataFrame({"label": ["T", "B", "NK", "none"]}, index=CELLS)
    adata = ad.AnnData(counts.copy(), obs=obs, var=pd.DataFrame(index=GENES))
    if layout == "layer":
        adata.layers["counts"] = counts.copy()
        adata.X = sp.csr_matrix(np.log1p(COUNTS.astype(np.float32)))
    elif layout == "raw":
        adata.raw = adata.copy()
        adata.X = sp.csr_matrix(np.log1p(COUNTS.astype(np.float32)) + 0.5)
    adata.write_h5ad(path)
    return path


def write_10x_dir(folder, version=3):
    """Cell Ranger folder; v3 gets an antibody-capture feature that must be ignored."""
    path = folder / f"tenx_v{version}"
    path.mkdir()
    names, ids, matrix = list(GENES), list(ENSEMBL), COUNTS.T
    if version == 3:
        names.append("CD3_TotalSeqB")
        ids.append("CD3_TotalSeqB")
        matrix = np.vstack([matrix, [100, 100, 100, 100]])
    mtx = path / "matrix.mtx"
    scipy.io.mmwrite(str(mtx), sp.coo_matrix(matrix), field="integer")
    if version == 3:
        types = ["Gene Expression"] * len(GENES) + ["Antibody Capture"]
        features = "".join(f"{i}\t{n}\t{t}\n" for i, n, t in zip(ids, names, types, strict=True))
        with gzip.open(path / "features.tsv.gz", "wt") as fh:
            fh.write(features)
        with gzip.open(path / "barcodes.tsv.gz", "wt") as fh:
            fh.write("\n".join(CELLS) + "\n")
        with open(mtx, "rb") as src, gzip.open(path / "matrix.mtx.gz", "wb") as dst:
            dst.write(src.read())
        mtx.unlink()
    else:
        (path / "genes.tsv").write_text("".join(f"{i}\t{n}\n" for i, n in zip(ids, names, strict=True)))
        (path / "barcodes.tsv").write_text("\n".join(CELLS) + "\n")
    return path


def write_10x_h5(folder, version=3):
    """Cell Ranger .h5 in the v3 (matrix/features) or v2 (per-genome group) layout, built with h5py."""
    path = folder / f"tenx_v{version}.h5"
    csc = sp.csc_matrix(COUNTS.T.astype(np.int32))  # genes x cells, stored column (cell) by column
    with h5py.File(path, "w") as fh:
        group = fh.create_group("matrix" if version == 3 else "GRCh38")
        group["data"] = csc.data
        group["indices"] = csc.indices.astype(np.int64)
        group["indptr"] = csc.indptr.astype(np.int64)
        group["shape"] = np.array(csc.shape, dtype=np.int32)
        group["barcodes"] = np.array(CELLS, dtype="S")
        if version == 3:
            feats = group.create_group("features")
            feats["id"] = np.array(ENSEMBL, dtype="S")
            feats["name"] = np.array(GENES, dtype="S")
            feats["feature_type"] = np.array(["Gene Expression"] * len(GENES), dtype="S")
            feats["genome"] = np.array(["GRCh38"] * len(GENES), dtype="S")
            feats["_all_tag_keys"] = np.array([b"genome"])
        else:
            group["genes"] = np.array(ENSEMBL, dtype="S")
            group["gene_names"] = np.array(GENES, dtype="S")
    return path


def write_table(folder, sep=",", transpose=False):
    frame = pd.DataFrame(COUNTS, index=CELLS, columns=GENES)
    if transpose:
        frame = frame.T
    path = folder / f"table{'_t' if transpose else ''}.{'csv' if sep == ',' else 'tsv.gz'}"
    frame.to_csv(path, sep=sep)
    return path


FORMATS = {
    "h5ad_X": lambda d: (write_h5ad(d, "X"), []),
    "h5ad_layer": lambda d: (write_h5ad(d, "layer"), []),
    "h5ad_raw": lambda d: (write_h5ad(d, "raw"), []),
    "10x_v3_dir": lambda d: (write_10x_dir(d, 3), []),
    "10x_v2_dir": lambda d: (write_10x_dir(d, 2), []),
    "10x_v3_ensembl": lambda d: (write_10x_dir(d, 3), ["--var_column", "gene_ids"]),
    "10x_v3_h5": lambda d: (write_10x_h5(d, 3), []),
    "10x_v2_h5": lambda d: (write_10x_h5(d, 2), []),
    "csv": lambda d: (write_table(d, ","), []),
    "tsv_transposed": lambda d: (write_table(d, "\t", transpose=True), ["--transpose", "True"]),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_gives_the_exact_numbers(fmt, tmp_path, ref_file, capsys):
    path, extra = FORMATS[fmt](tmp_path)
    out = tmp_path / "out.h5ad"
    summary = preprocess.main(
        ["--data_path", str(path), "--ref", ref_file, "--out_path", str(out), "--min_genes", "2", *extra]
    )
    result = ad.read_h5ad(out)
    assert list(result.var_names) == REF
    assert list(result.obs_names) == ["c0", "c2"]  # c1 (1 reference gene) and c3 (none) fall under min_genes=2
    assert sp.isspmatrix_csr(result.X) and result.X.dtype == np.float32 and result.X.has_sorted_indices
    np.testing.assert_allclose(result.X.toarray(), expected([0, 2]), rtol=1e-6)
    assert result.X[:, 2].nnz == 0  # MS4A1 missing from the data: zero
    assert list(result.var["in_input"]) == [True, True, False, True, True]
    assert summary["genes_in"] == 6 and summary["reference_covered"] == 4 and summary["coverage"] == 0.8
    assert summary["genes_revised"] == (6 - 1 if fmt == "10x_v3_ensembl" else 1)  # IGJ -> JCHAIN (or all ids)
    assert summary["genes_dropped"] == 1 and summary["cells_removed"] == 2 and summary["cells_out"] == 2
    if fmt == "h5ad_X":
        assert list(result.obs["label"]) == ["T", "NK"]  # obs kept for the kept cells
    params = result.uns[PREPROCESS_UNS_KEY]["params"]
    assert params["target_sum"] == 1e4 and params["log_base"] == 2 and params["min_genes"] == 2
    assert params["counts_from"] == {"h5ad_layer": "layer:counts", "h5ad_raw": "raw"}.get(fmt, "X")
    assert "2022-Sep12" in params["revision"] and params["reference"] == ref_file
    assert result.uns[PREPROCESS_UNS_KEY]["summary"]["cells_removed"] == 2
    printed = capsys.readouterr().out
    assert "reference coverage: 4 of 5 genes (80.0%)" in printed and "cells: 4 in, 2 removed, 2 out" in printed


def test_our_10x_h5_fixture_matches_scanpy_reader(tmp_path):
    import scanpy as sc

    path = write_10x_h5(tmp_path, 3)
    ours, theirs = preprocess.read_10x_h5(str(path)), sc.read_10x_h5(str(path))
    assert list(ours.var_names) == list(theirs.var_names) and list(ours.obs_names) == list(theirs.obs_names)
    np.testing.assert_array_equal(ours.X.toarray(), theirs.X.toarray())


def test_output_passes_the_shared_input_check(tmp_path, ref_file):
    out = tmp_path / "out.h5ad"
    preprocess.main(
        ["--data_path", str(write_h5ad(tmp_path)), "--ref", ref_file, "--out_path", str(out)] + ["--min_genes", "1"]
    )
    adata = read_preprocessed(str(out), genes=REF)
    assert adata.n_obs == 3
    # preprocess.py writes CSR float32, and the check keeps that matrix: no second copy of X per rank at load.
    from utils import check_expression

    assert check_expression(adata.X, name="x") is adata.X
    assert check_expression(adata.X.astype(np.float64), name="x").dtype == np.float32


# ------------------------------------------------------------------ the numbers, in-process


def counts_adata(counts=COUNTS, genes=GENES):
    return ad.AnnData(sp.csr_matrix(np.asarray(counts, dtype=np.float32)), var=pd.DataFrame(index=genes))


def test_min_genes_is_counted_on_reference_genes(table):
    # c3 has 100 counts in 2 genes, none in the reference: removed even with min_genes=1.
    out, summary = preprocess_adata(counts_adata(), REF, table=table, min_genes=1)
    assert list(out.obs_names) == ["0", "1", "2"] and summary["cells_removed"] == 1
    np.testing.assert_allclose(out.X.toarray(), expected([0, 1, 2]), rtol=1e-6)
    out, summary = preprocess_adata(counts_adata(), REF, table=table, min_genes=4)
    assert list(out.obs_names) == ["2"] and summary["cells_removed"] == 3


def test_log_base_target_sum_and_switches(table):
    out, _ = preprocess_adata(counts_adata(), REF, table=table, min_genes=1, log_base=10.0, target_sum=100.0)
    np.testing.assert_allclose(out.X.toarray(), expected([0, 1, 2], base=10.0, target=100.0), rtol=1e-6)
    out, _ = preprocess_adata(counts_adata(), REF, table=table, min_genes=1, normalize=False, log1p=False)
    np.testing.assert_array_equal(out.X.toarray(), ALIGNED[:3])  # alignment alone
    params = out.uns[PREPROCESS_UNS_KEY]["params"]
    assert params["normalize"] is False and params["log1p"] is False


@pytest.mark.filterwarnings("ignore:Some cells have zero counts")
def test_normalisation_equals_scanpy():
    import scanpy as sc

    rng = np.random.default_rng(0)
    counts = sp.random(60, 40, density=0.3, format="csr", random_state=1, dtype=np.float32)
    counts.data = rng.integers(1, 500, counts.nnz).astype(np.float32)
    counts.data[counts.indptr[5] : counts.indptr[6]] = 0  # a cell of explicit zeros stays zero (no 0/0)
    theirs = ad.AnnData(counts.copy())
    sc.pp.normalize_total(theirs, target_sum=1e4)
    sc.pp.log1p(theirs, base=2)
    ours = normalize_log1p(counts.copy(), 1e4, 2.0)
    np.testing.assert_array_max_ulp(ours.toarray(), theirs.X.toarray(), maxulp=1)
    assert not ours[5].toarray().any()


def test_duplicates_first_or_sum(table):
    # JCHAIN and its old symbol IGJ are both present: the column named JCHAIN wins over IGJ's, which comes first,
    # with "first" and with "sum" alike (issue 15: the published code kept IGJ's column here). Among aliases only,
    # "first" keeps the first column and "sum" adds them (tests/test_gene_collisions.py).
    counts = np.array([[2, 3, 1, 4, 1], [1, 1, 1, 1, 1]])
    genes = ["IGJ", "CD3E", "JCHAIN", "NKG7", "CD14"]
    out, summary = preprocess_adata(
        counts_adata(counts, genes), REF, table=table, min_genes=0, normalize=False, log1p=False
    )
    np.testing.assert_array_equal(out.X.toarray(), [[3, 1, 0, 1, 4], [1, 1, 0, 1, 1]])
    assert summary["genes_duplicated"] == 1 and summary["genes_used"] == 4
    assert summary["genes_collisions"] == 1 and summary["genes_collisions_current_won"] == 1
    assert summary["collision_examples"] == "JCHAIN: kept JCHAIN over IGJ"
    out, summary = preprocess_adata(
        counts_adata(counts, genes), REF, table=table, min_genes=0, normalize=False, log1p=False, duplicates="sum"
    )
    np.testing.assert_array_equal(out.X.toarray(), [[3, 1, 0, 1, 4], [1, 1, 0, 1, 1]])
    assert summary["genes_duplicated"] == 1 and summary["genes_used"] == 4


@pytest.mark.parametrize("chunk_nnz", [1, 40, 1 << 23])  # row blocks of any size give the same matrix
def test_alignment_matches_a_plain_loop(chunk_nnz):
    rng = np.random.default_rng(3)
    x = sp.random(30, 25, density=0.4, format="csr", random_state=3, dtype=np.float32)
    x.data = np.round(x.data * 9)  # integer counts, some stored zeros
    col_to_ref = rng.integers(-1, 12, size=25)  # several columns share targets: they are added
    expected_dense = np.zeros((30, 12), dtype=np.float32)
    for i, j in enumerate(col_to_ref):
        if j >= 0:
            expected_dense[:, j] += x[:, i].toarray().ravel()
    out = preprocess.align_to_reference(x, col_to_ref, 12, chunk_nnz=chunk_nnz)
    np.testing.assert_array_equal(out.toarray(), expected_dense)
    assert out.has_canonical_format and out.dtype == np.float32 and (out.data != 0).all()


def test_outdated_symbols_in_the_reference_still_receive_the_data(table):
    # A published reference list may hold old symbols (IGJ); data in current symbols (JCHAIN) must still land there.
    out, summary = preprocess_adata(
        counts_adata([[4, 6]], ["JCHAIN", "CD3E"]),
        ["CD3E", "IGJ"],
        table=table,
        min_genes=0,
        normalize=False,
        log1p=False,
    )
    assert list(out.var_names) == ["CD3E", "IGJ"]
    np.testing.assert_array_equal(out.X.toarray(), [[6, 4]])
    assert summary["reference_revised"] == 1


def test_unknown_name_listed_verbatim_in_the_reference_is_kept(table):
    out, summary = preprocess_adata(
        counts_adata([[4, 6, 1]], ["MYNEWGENE", "CD3E", "OTHERNEW"]),
        ["CD3E", "MYNEWGENE"],
        table=table,
        min_genes=0,
        normalize=False,
        log1p=False,
    )
    np.testing.assert_array_equal(out.X.toarray(), [[6, 4]])
    assert summary["genes_verbatim"] == 1 and summary["genes_dropped"] == 1 and summary["genes_unknown"] == 2


def test_pbmc68k_counts_and_revision(table):
    adata = preprocess.load_pbmc68k_counts()
    assert adata.shape == (700, 765) and "bulk_labels" in adata.obs
    data = adata.X.data
    assert np.array_equal(data, np.round(data)) and data.min() >= 1
    # The recovered counts reproduce the dataset's own log-normalised values (3 decimals) from obs n_counts.
    import scanpy as sc

    source = sc.datasets.pbmc68k_reduced()
    back = sp.diags(1e4 / source.obs["n_counts"].to_numpy()) @ adata.X
    np.testing.assert_allclose(np.log1p(back.toarray()), source.raw.X.toarray(), atol=1.5e-3)

    ref = ["CD3E", "JCHAIN", "ATP5IF1", "MS4A1"]
    out, summary = preprocess_adata(adata, ref, table=table, min_genes=0, normalize=False, log1p=False)
    igj = adata.X[:, list(adata.var_names).index("IGJ")].toarray().ravel()
    np.testing.assert_array_equal(out.X[:, 1].toarray().ravel(), igj)  # IGJ's counts sit in the JCHAIN column
    assert summary["reference_covered"] == 4 and "IGJ->JCHAIN" in summary["revised_examples"]
    assert list(out.obs["bulk_labels"]) == list(adata.obs["bulk_labels"])


def test_low_coverage_and_case_insensitive_matches_warn(table):
    with pytest.warns(PreprocessWarning, match="only 1 of 5 reference genes"):
        preprocess_adata(counts_adata([[5, 0]], ["CD3E", "XIST"]), REF, table=table, min_genes=0)
    with pytest.warns(PreprocessWarning, match="case-insensitively"):
        _, summary = preprocess_adata(
            counts_adata([[5, 1, 2]], ["Cd3e", "Nkg7", "Cd14"]), REF, table=table, min_genes=0
        )
    assert summary["genes_case_matched"] == 3


def test_input_is_not_modified(table):
    adata = counts_adata()
    before = adata.X.copy()
    preprocess_adata(adata, REF, table=table, min_genes=1)
    assert (adata.X != before).nnz == 0 and list(adata.var_names) == GENES


def test_default_out_path():
    assert preprocess.default_out_path("x/pbmc.h5ad") == "x/pbmc_preprocessed.h5ad"
    assert (
        preprocess.default_out_path("x/filtered_feature_bc_matrix/") == "x/filtered_feature_bc_matrix_preprocessed.h5ad"
    )
    assert preprocess.default_out_path("t.csv.gz") == "t_preprocessed.h5ad"
    assert preprocess.default_out_path("m.h5") == "m_preprocessed.h5ad"


def test_default_output_path_and_reference(tmp_path, capsys):
    path = write_h5ad(tmp_path)
    preprocess.main(["--data_path", str(path), "--min_genes", "1"])
    out = ad.read_h5ad(tmp_path / "in_X_preprocessed.h5ad")
    assert out.n_vars == 20598 and out.uns[PREPROCESS_UNS_KEY]["params"]["reference"].startswith("default")
    assert "warning: only 4 of 20598 reference genes" in capsys.readouterr().err


# ------------------------------------------------------------------ bad input: exit code 2 and a message naming it


def cli_error(argv, capsys):
    """Run the CLI in-process; returns stderr after asserting exit code 2."""
    with pytest.raises(SystemExit) as exc:
        run_cli(preprocess.main, argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def h5ad_with(tmp_path, values, name="bad.h5ad"):
    path = tmp_path / name
    ad.AnnData(np.asarray(values, dtype=np.float32), var=pd.DataFrame(index=["CD3E", "NKG7"])).write_h5ad(path)
    return str(path)


@pytest.mark.parametrize(
    "values, message",
    [
        ([[1.5, 2.0], [0.0, 3.0]], "non-integer values (e.g. 1.5)"),
        ([[1.0, -2.0], [0.0, 3.0]], "negative values"),
        ([[np.nan, 2.0], [0.0, 3.0]], "NaN or infinite"),
        ([[np.inf, 2.0], [0.0, 3.0]], "NaN or infinite"),
    ],
)
def test_values_that_are_not_counts(values, message, tmp_path, ref_file, capsys):
    path = h5ad_with(tmp_path, values)
    err = cli_error(["--data_path", path, "--ref", ref_file, "--min_genes", "0"], capsys)
    assert message in err and "error:" in err
    assert not (tmp_path / "bad_preprocessed.h5ad").exists()


def test_allow_normalized_accepts_non_integer_values(tmp_path, ref_file):
    path = h5ad_with(tmp_path, [[1.5, 2.5], [0.5, 3.0]])
    summary = preprocess.main(
        ["--data_path", path, "--ref", ref_file, "--min_genes", "0", "--allow_normalized", "True"]
    )
    assert summary["cells_out"] == 2
    path = h5ad_with(tmp_path, [[-1.5, 2.5]], name="neg.h5ad")
    with pytest.raises(ScbertError, match="negative"):  # still refused: no count model makes negative values
        preprocess.main(["--data_path", path, "--ref", ref_file, "--min_genes", "0", "--allow_normalized", "True"])


def test_auto_names_each_candidate_when_no_counts_found(tmp_path, ref_file, capsys):
    adata = ad.AnnData(np.array([[0.5, 1.5]], dtype=np.float32), var=pd.DataFrame(index=["CD3E", "NKG7"]))
    adata.raw = adata.copy()
    adata.write_h5ad(tmp_path / "norm.h5ad")
    err = cli_error(["--data_path", str(tmp_path / "norm.h5ad"), "--ref", ref_file], capsys)
    assert "no raw counts found: X holds non-integer" in err and "raw holds non-integer" in err


def test_bad_files(tmp_path, ref_file, capsys):
    empty = tmp_path / "empty.h5ad"
    empty.write_bytes(b"")
    assert "is empty" in cli_error(["--data_path", str(empty), "--ref", ref_file], capsys)
    garbage = tmp_path / "garbage.h5ad"
    garbage.write_bytes(b"this is not hdf5 at all")
    assert "could not read" in cli_error(["--data_path", str(garbage), "--ref", ref_file], capsys)
    assert "does not exist" in cli_error(["--data_path", str(tmp_path / "nope.h5ad"), "--ref", ref_file], capsys)
    odd = tmp_path / "counts.xlsx"
    odd.write_bytes(b"x")
    assert "cannot tell the format" in cli_error(["--data_path", str(odd), "--ref", ref_file], capsys)
    garbage_h5 = tmp_path / "garbage.h5"
    garbage_h5.write_bytes(b"not hdf5")
    assert "10x Cell Ranger .h5" in cli_error(["--data_path", str(garbage_h5), "--ref", ref_file], capsys)


def test_bad_tables(tmp_path, ref_file, capsys):
    only_names = tmp_path / "names.csv"
    only_names.write_text("cell\nc0\nc1\n")
    assert "value columns" in cli_error(["--data_path", str(only_names), "--ref", ref_file], capsys)
    text = tmp_path / "text.csv"
    text.write_text("cell,CD3E,NKG7\nc0,1,abc\n")
    err = cli_error(["--data_path", str(text), "--ref", ref_file], capsys)
    assert "['NKG7'] hold non-numeric values" in err
    header_only = tmp_path / "blank.tsv"
    header_only.write_text("\n")
    assert "holds no table" in cli_error(["--data_path", str(header_only), "--ref", ref_file], capsys)


def test_missing_10x_file_and_bad_columns(tmp_path, ref_file, capsys):
    folder = write_10x_dir(tmp_path, 3)
    os.remove(folder / "barcodes.tsv.gz")
    assert "has no barcodes.tsv(.gz)" in cli_error(["--data_path", str(folder), "--ref", ref_file], capsys)
    path = str(write_h5ad(tmp_path))
    err = cli_error(["--data_path", path, "--ref", ref_file, "--var_column", "gene_ids"], capsys)
    assert "--var_column 'gene_ids' is not a column" in err
    err = cli_error(["--data_path", path, "--ref", ref_file, "--counts_from", "layer:counts"], capsys)
    assert "no layer 'counts'" in err


def test_nothing_matches_gives_a_species_hint(tmp_path, ref_file, capsys):
    mouse = ad.AnnData(
        np.ones((2, 2), dtype=np.float32), var=pd.DataFrame(index=["ENSMUSG00000000001", "ENSMUSG00000000003"])
    )
    mouse.write_h5ad(tmp_path / "mouse.h5ad")
    err = cli_error(["--data_path", str(tmp_path / "mouse.h5ad"), "--ref", ref_file], capsys)
    assert "none of the 2 input genes matches" in err and "not human" in err


def test_no_cell_left_after_min_genes(tmp_path, ref_file, capsys):
    err = cli_error(["--data_path", str(write_h5ad(tmp_path)), "--ref", ref_file, "--min_genes", "200"], capsys)
    assert "no cell has at least 200 expressed reference genes (most: 4)" in err


def test_output_path_rules(tmp_path, ref_file, capsys):
    path = write_h5ad(tmp_path)
    original = path.read_bytes()
    err = cli_error(
        ["--data_path", str(path), "--ref", ref_file, "--out_path", str(path), "--overwrite", "True"], capsys
    )
    assert "is the input file" in err and path.read_bytes() == original
    out = tmp_path / "out.h5ad"
    out.write_bytes(b"precious")
    err = cli_error(["--data_path", str(path), "--ref", ref_file, "--out_path", str(out)], capsys)
    assert "already exists; pass --overwrite True" in err and out.read_bytes() == b"precious"
    # A failing run with --overwrite True leaves the existing file alone too.
    bad = h5ad_with(tmp_path, [[1.5, 2.0]])
    cli_error(["--data_path", bad, "--ref", ref_file, "--out_path", str(out), "--overwrite", "True"], capsys)
    assert out.read_bytes() == b"precious"
    preprocess.main(
        ["--data_path", str(path), "--ref", ref_file, "--out_path", str(out), "--overwrite", "True", "--min_genes", "1"]
    )
    assert ad.read_h5ad(out).n_obs == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files left


def test_command_line_exit_code(tmp_path, ref_file):
    bad = h5ad_with(tmp_path, [[1.5, 2.0]])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "preprocess.py"), "--data_path", bad, "--ref", ref_file],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no raw counts found: X holds non-integer values (e.g. 1.5)")
    assert "Traceback" not in proc.stderr
