"""Raw counts -> scBERT's input: revised gene symbols, aligned to the reference genes, log2(1 + CP10K).

    python preprocess.py --data_path pbmc.h5ad                 # default reference: NCBI protein-coding genes
    python preprocess.py --data_path filtered_feature_bc_matrix/ --ref panglao --out_path pbmc_pp.h5ad  # published

Steps (SPEC section 1), each vectorised on sparse matrices:
1. read counts: `.h5ad` (X, a layer, or `.raw`: `--counts_from`), a 10x folder (`matrix.mtx(.gz)`, `features.tsv(.gz)`
   or `genes.tsv(.gz)`, `barcodes.tsv(.gz)`), a 10x `.h5` (v2 or v3), or a `.csv`/`.tsv` table (cells as rows;
   `--transpose True` for genes as rows); values must be counts (finite, non-negative integers);
2. revise gene names to current NCBI symbols (`genes.revise_symbols`; Ensembl ids are mapped); unknown and
   ambiguous names are revised by the Ensembl id beside them (`--id_column`, found automatically) or dropped;
   several columns for one gene: the column already named as the current symbol wins, others keep the first
   column or are summed (`--duplicates`), and each collision is reported;
3. align to the reference gene order: missing genes are zero, extra genes dropped;
4. drop cells with fewer than `--min_genes` (200) expressed reference genes;
5. `normalize_total(target_sum=1e4)` then `log1p(base=2)`, equal to scanpy's.

The output `.h5ad` holds `X` (CSR float32, cells x reference genes), `obs` of the kept cells, `var` = the reference
genes in order (column `in_input`: whether the data had the gene) and `uns["scbert_preprocess"]` with `params` and
`summary` (see `preprocess_adata`), which later scripts check.

Atlas scale: `--data_path` takes several inputs or a folder of them, preprocessed one after another in row blocks
(`stream_preprocess`; a CSR `.h5ad` is read backed), and `--out_format shards` writes a folder of memory-mapped
shards (`shards.ShardWriter`) instead of one `.h5ad`:

    python preprocess.py --data_path samples/ --ref panglao --out_format shards --out_path atlas_shards
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import warnings
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from genes import (
    AMBIGUOUS,
    BY_ID,
    CASE,
    CURRENT,
    DEFAULT_REFERENCE,
    ENSEMBL,
    SYNONYM,
    UNKNOWN,
    GeneTable,
    detect_identifier_type,
    load_gene_table,
    read_reference_genes,
)
from utils import PREPROCESS_UNS_KEY, ScbertError, atomic_write_h5ad, first_fractional, run_cli, str2bool

# Below this share of reference genes found in the data, predictions rest on mostly-zero input: warn.
LOW_COVERAGE = 0.5
# Values are checked this many at a time, so the check of a 10^8-value matrix needs no full-size temporary.
CHECK_CHUNK = 1 << 24
TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz")
EXAMPLES = 8
# var columns searched, in this order, for Ensembl gene ids when --id_column is auto (10x readers write gene_ids).
ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_ids", "ensembl", "ensembl_gene_id", "gene_ensembl",
              "ensg", "feature_id", "id")


class PreprocessWarning(UserWarning):
    """Something the user should look at (low reference coverage, case-insensitive matches); the output is written."""


# ----------------------------------------------------------------------------------------------------------------
# Reading inputs
# ----------------------------------------------------------------------------------------------------------------


def _find_file(folder: str, stems: Sequence[str]) -> str | None:
    for stem in stems:
        for name in (stem, f"{stem}.gz"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def _read_tsv_columns(path: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE)
    except pd.errors.EmptyDataError as err:
        raise ScbertError(f"{path} is empty; a 10x folder needs non-empty features and barcodes files") from err


def _gene_expression_only(x: sp.csr_matrix, var: pd.DataFrame) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """Drop antibody-capture, CRISPR and other non-RNA features of 10x v3 files (when a type column says so)."""
    if "feature_types" not in var.columns:
        return x, var
    mask = (var["feature_types"] == "Gene Expression").to_numpy()
    if mask.all() or not mask.any():
        return x, var
    return x[:, np.flatnonzero(mask)], var.iloc[np.flatnonzero(mask)]


def _new_anndata(x, obs_names, var: pd.DataFrame) -> ad.AnnData:
    obs = pd.DataFrame(index=pd.Index([str(b) for b in obs_names], dtype=object))
    var = var.copy()
    var.index = pd.Index([str(g) for g in var.index], dtype=object)
    with warnings.catch_warnings():
        # Gene names may repeat in raw files (10x features, symbols); revision resolves them, so no warning here.
        warnings.filterwarnings("ignore", message=".*names are not unique.*")
        return ad.AnnData(X=x, obs=obs, var=var)


def read_10x_mtx(folder: str) -> ad.AnnData:
    """A 10x folder: `matrix.mtx(.gz)` (genes x cells), `features.tsv(.gz)` (v3) or `genes.tsv(.gz)` (v2), barcodes.

    Returns cells x genes with var_names = gene symbols and `var["gene_ids"]` = the first column (Ensembl ids).
    """
    import scipy.io

    matrix = _find_file(folder, ["matrix.mtx"])
    features = _find_file(folder, ["features.tsv", "genes.tsv"])
    barcodes = _find_file(folder, ["barcodes.tsv"])
    for path, what in (
        (matrix, "matrix.mtx(.gz)"),
        (features, "features.tsv(.gz) or genes.tsv(.gz)"),
        (barcodes, "barcodes.tsv(.gz)"),
    ):
        if path is None:
            raise ScbertError(f"10x folder {folder} has no {what}; pass a folder as written by Cell Ranger")
    try:
        x = sp.csr_matrix(scipy.io.mmread(matrix).T)
    except (ValueError, OSError, EOFError, IndexError) as err:
        raise ScbertError(f"could not read {matrix} as a Matrix Market file ({err}); is the file complete?") from err
    feat = _read_tsv_columns(features)
    cells = _read_tsv_columns(barcodes)[0].tolist()
    names = feat[1] if feat.shape[1] > 1 else feat[0]
    var = pd.DataFrame({"gene_ids": feat[0].to_numpy()}, index=names.to_numpy())
    if feat.shape[1] > 2:
        var["feature_types"] = feat[2].to_numpy()
    if x.shape != (len(cells), len(var)):
        raise ScbertError(
            f"{matrix} is {x.shape[1]} genes x {x.shape[0]} cells but {features} lists {len(var)} genes and "
            f"{barcodes} {len(cells)} barcodes; the three files must come from the same run"
        )
    x, var = _gene_expression_only(x, var)
    return _new_anndata(x, cells, var)


def _decode(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def read_10x_h5(path: str) -> ad.AnnData:
    """A Cell Ranger `.h5`: v3 (`matrix/` with `features/`) or v2 (one group per genome with `genes`, `gene_names`).

    Returns cells x genes with var_names = gene symbols and `var["gene_ids"]` = Ensembl ids.
    """
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            if "matrix" in fh:
                group = fh["matrix"]
                feats = group["features"]
                # Probe-based (Flex) files keep the gene's Ensembl id in `gene_id` and a probe id in `id`.
                ids = feats["gene_id"] if "gene_id" in feats else feats["id"]
                var = pd.DataFrame({"gene_ids": _decode(ids[:])}, index=_decode(feats["name"][:]))
                if "feature_type" in feats:
                    var["feature_types"] = _decode(feats["feature_type"][:])
            else:
                genomes = [k for k in fh.keys() if isinstance(fh[k], h5py.Group)]
                if len(genomes) != 1:
                    raise ScbertError(
                        f"{path} is not a 10x .h5 with one genome (groups: {list(fh.keys())}); "
                        f"pass a Cell Ranger filtered_feature_bc_matrix.h5"
                    )
                group = fh[genomes[0]]
                var = pd.DataFrame({"gene_ids": _decode(group["genes"][:])}, index=_decode(group["gene_names"][:]))
            n_genes, n_cells = (int(v) for v in group["shape"][:2])
            x = sp.csr_matrix((group["data"][:], group["indices"][:], group["indptr"][:]), shape=(n_cells, n_genes))
            cells = _decode(group["barcodes"][:])
    except ScbertError:
        raise
    except (OSError, KeyError, ValueError) as err:
        raise ScbertError(
            f"could not read {path} as a 10x Cell Ranger .h5 ({err}); pass a Cell Ranger .h5 file"
        ) from err
    if len(var) != n_genes or len(cells) != n_cells:
        raise ScbertError(
            f"{path} is inconsistent: shape {n_genes} x {n_cells} but {len(var)} genes and {len(cells)} barcodes; "
            f"pass an unmodified Cell Ranger .h5"
        )
    x, var = _gene_expression_only(x, var)
    return _new_anndata(x, cells, var)


def read_table(path: str, transpose: bool = False) -> ad.AnnData:
    """A `.csv`/`.tsv` (optionally `.gz`) count table: cells as rows, genes as columns (first column: cell names);
    `transpose=True` for genes as rows. Gene names are read from the header verbatim (no `.1` suffixes)."""
    sep = "," if ".csv" in os.path.basename(path).lower() else "\t"
    try:
        frame = pd.read_csv(path, sep=sep, index_col=0)
        header = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as err:
        raise ScbertError(f"{path} holds no table; pass a count table with a header row of names") from err
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as err:
        kind = "comma" if sep == "," else "tab"
        raise ScbertError(f"could not read {path} as a {kind}-separated table ({err}); check the file") from err
    if frame.shape[1] == 0 or frame.shape[0] == 0:
        raise ScbertError(
            f"{path} has {frame.shape[0]} rows and {frame.shape[1]} value columns after the first (name) column; "
            f"pass a table with cell names in the first column and one column per gene"
            + (" (genes as rows with --transpose True)" if transpose else "")
        )
    non_numeric = [str(c) for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if non_numeric:
        raise ScbertError(
            f"{path}: columns {non_numeric[:3]} hold non-numeric values; a count table has names in the first "
            f"column and numbers elsewhere" + ("" if transpose else " (genes as rows? pass --transpose True)")
        )
    names = [str(v) for v in header.iloc[0].tolist()]
    # pandas renames repeated column names (`GENE.1`); the header row read as data keeps them as written.
    columns = names[1:] if len(names) == frame.shape[1] + 1 else names if len(names) == frame.shape[1] else None
    if columns is not None:
        frame.columns = columns
    values = frame.to_numpy()
    if transpose:
        x, cells, genes = sp.csr_matrix(values.T), list(frame.columns), list(frame.index)
    else:
        x, cells, genes = sp.csr_matrix(values), list(frame.index), list(frame.columns)
    return _new_anndata(x, cells, pd.DataFrame(index=[str(g) for g in genes]))


def input_kind(path: str) -> str:
    """ "10x_dir", "h5ad", "10x_h5" or "table", from the path; a clear error for anything else."""
    if not os.path.exists(path):
        raise ScbertError(f"input {path} does not exist; pass an .h5ad, a 10x folder or .h5, or a .csv/.tsv table")
    if os.path.isdir(path):
        if _find_file(path, ["matrix.mtx"]) is None:
            raise ScbertError(f"folder {path} holds no matrix.mtx(.gz); pass a 10x folder, an .h5ad, .h5 or table")
        return "10x_dir"
    if os.path.getsize(path) == 0:
        raise ScbertError(f"input {path} is empty (0 bytes); pass a file holding counts")
    lower = path.lower()
    if lower.endswith(".h5ad"):
        return "h5ad"
    if lower.endswith((".h5", ".hdf5")):
        return "10x_h5"
    if lower.endswith(TABLE_SUFFIXES):
        return "table"
    if lower.endswith((".mtx", ".mtx.gz")):
        return "10x_dir"
    raise ScbertError(
        f"cannot tell the format of {path}; pass an .h5ad, a 10x folder (matrix.mtx), a 10x .h5, or a .csv/.tsv table"
    )


def read_input(path: str, transpose: bool = False) -> ad.AnnData:
    """Any supported input as an AnnData (counts not yet checked; `.h5ad` layers and `.raw` kept)."""
    kind = input_kind(path)
    if kind == "10x_dir":
        return read_10x_mtx(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    if kind == "10x_h5":
        return read_10x_h5(path)
    if kind == "table":
        return read_table(path, transpose=transpose)
    try:
        return ad.read_h5ad(path)
    except Exception as err:  # h5py/anndata raise many types for a file that is not a valid .h5ad
        raise ScbertError(
            f"could not read {path} as .h5ad ({type(err).__name__}: {err}); is the file complete?"
        ) from err


def load_pbmc68k_counts() -> ad.AnnData:
    """Integer counts of scanpy's bundled `pbmc68k_reduced` (700 cells, 765 genes, offline), `obs` kept.

    Its `.raw` holds ln(1 + counts * 1e4 / n_counts) rounded to 3 decimals, with `obs["n_counts"]` the cell's total
    before gene selection; so counts = expm1(raw) * n_counts / 1e4, within 0.1% of an integer (checked), rounded.
    Gene names are the dataset's 2017 symbols (e.g. `IGJ`, now `JCHAIN`). Cells have 183-409 genes of these 765,
    so a few fall under the default `min_genes=200`.
    """
    import scanpy as sc

    source = sc.datasets.pbmc68k_reduced()
    scaled = sp.csr_matrix(source.raw.X, dtype=np.float64)
    scaled.data = np.expm1(scaled.data)
    counts = sp.diags(source.obs["n_counts"].to_numpy(dtype=np.float64) / 1e4) @ scaled
    counts = sp.csr_matrix(counts)
    rounded = np.rint(counts.data)
    worst = float(np.max(np.abs(counts.data - rounded) / np.maximum(rounded, 1.0))) if counts.nnz else 0.0
    if worst > 1e-2 or (rounded < 1).any():
        raise ScbertError(
            f"scanpy's pbmc68k_reduced no longer holds recoverable counts (worst relative deviation {worst:.3g}); "
            f"pass your own counts instead"
        )
    x = sp.csr_matrix((rounded.astype(np.float32), counts.indices, counts.indptr), shape=counts.shape)
    return ad.AnnData(X=x, obs=source.obs.copy(), var=pd.DataFrame(index=source.raw.var_names.copy()))


# ----------------------------------------------------------------------------------------------------------------
# Choosing and checking counts
# ----------------------------------------------------------------------------------------------------------------


def count_problem(x, allow_normalized: bool = False) -> str | None:
    """Why `x` (dense or sparse) does not hold counts, or None: non-finite, negative or (unless allowed) non-integer."""
    values = x.data if sp.issparse(x) else np.asarray(x).ravel()
    if values.dtype.kind not in "biuf":
        return f"values of type {values.dtype}, not numbers"
    if values.dtype.kind in "biu":
        return f"negative values (minimum {values.min()})" if values.size and values.min() < 0 else None
    for start in range(0, values.size, CHECK_CHUNK):
        chunk = values[start : start + CHECK_CHUNK]
        if not np.isfinite(chunk).all():
            return "NaN or infinite values"
        if (chunk < 0).any():
            return f"negative values (e.g. {chunk[chunk < 0][0]:.4g}), as in scaled or centred data"
        if not allow_normalized:
            fractional = first_fractional(chunk)
            if fractional is not None:
                return f"non-integer values (e.g. {chunk[fractional]:.4g}), as in normalised data"
    return None


def select_counts(adata: ad.AnnData, counts_from: str = "auto", allow_normalized: bool = False):
    """The count matrix to use, its var table and where it came from.

    counts_from: "X", "raw", "layer:NAME", or "auto": the layer "counts" if it holds counts, else X if it does,
    else `.raw` if it does (in that order; the first that is finite, non-negative and integer).
    Returns (matrix cells x genes, var DataFrame, source name); raises ScbertError naming what each candidate held.
    """
    candidates = []
    if "counts" in adata.layers:
        candidates.append(("layer:counts", adata.layers["counts"], adata.var))
    candidates.append(("X", adata.X, adata.var))
    if adata.raw is not None:
        candidates.append(("raw", adata.raw.X, adata.raw.var))
    if counts_from == "auto":
        reasons = []
        for name, matrix, var in candidates:
            if matrix is None:
                continue
            problem = count_problem(matrix, allow_normalized=False)
            if problem is None:
                return matrix, var, name
            reasons.append(f"{name} holds {problem}")
        if allow_normalized:
            return adata.X, adata.var, "X"
        raise ScbertError(
            "no raw counts found: " + "; ".join(reasons) + ". Pass a file with raw counts (a 'counts' layer, .raw or "
            "X), or --allow_normalized True if you know the values are normalised counts"
        )
    if counts_from == "X":
        return adata.X, adata.var, "X"
    if counts_from == "raw":
        if adata.raw is None:
            raise ScbertError("--counts_from raw, but the input has no .raw; use --counts_from X or layer:NAME")
        return adata.raw.X, adata.raw.var, "raw"
    if counts_from.startswith("layer:"):
        layer = counts_from[len("layer:") :]
        if layer not in adata.layers:
            raise ScbertError(
                f"--counts_from {counts_from}, but the input has no layer {layer!r} (layers: {list(adata.layers)}); "
                f"use --counts_from auto, X or raw"
            )
        return adata.layers[layer], adata.var, counts_from
    raise ScbertError(f"--counts_from {counts_from!r} is not one of auto, X, raw, layer:NAME")


# ----------------------------------------------------------------------------------------------------------------
# Gene matching, alignment, filtering, normalisation (pure functions on arrays)
# ----------------------------------------------------------------------------------------------------------------


def _reference_index(reference: Sequence[str], table: GeneTable) -> tuple[dict[str, int], int, int]:
    """Revised reference name -> its position; also how many reference names were revised, and aliased (two
    reference names for one gene: the one spelled as the current symbol receives the data)."""
    ref_index: dict[str, int] = {}
    reference_revised = reference_aliased = 0
    for j, name in enumerate(reference):
        revised, status = table.classify(name)
        key = revised if revised is not None else name
        reference_revised += status in (SYNONYM, ENSEMBL, CASE)
        if key in ref_index:
            reference_aliased += 1
            if name == key:
                ref_index[key] = j
        else:
            ref_index[key] = j
    return ref_index, reference_revised, reference_aliased


def _group_columns(names: Sequence[str], ref_index: dict[str, int], table: GeneTable, ids: Sequence[str] | None):
    """Each input column's revision: (key -> its columns in input order, status per column, status counts,
    verbatim count, examples of revised / dropped / revised-by-id names)."""
    status_counts = dict.fromkeys((CURRENT, SYNONYM, ENSEMBL, CASE, AMBIGUOUS, UNKNOWN, BY_ID), 0)
    groups: dict[str, list[int]] = {}  # key -> input columns, in input order
    statuses: list[str] = []
    verbatim = 0
    revised_examples, dropped_examples, id_examples = [], [], []
    for i, name in enumerate(names):
        revised, status = table.classify(name)
        if revised is None and ids is not None:
            by_id = table.classify_id(ids[i])
            if by_id is not None:
                revised, status = by_id, BY_ID
                if len(id_examples) < EXAMPLES:
                    id_examples.append(f"{name} ({ids[i]})->{revised}")
        status_counts[status] += 1
        statuses.append(status)
        key = revised if revised is not None else name
        if revised is None:
            if key not in ref_index:
                if len(dropped_examples) < EXAMPLES:
                    dropped_examples.append(f"{name} ({status})")
                continue
            verbatim += 1
        elif status not in (CURRENT, BY_ID) and len(revised_examples) < EXAMPLES:
            revised_examples.append(f"{name}->{revised}")
        groups.setdefault(key, []).append(i)
    return groups, statuses, status_counts, verbatim, (revised_examples, dropped_examples, id_examples)


def _resolve_collisions(groups, statuses, names, ref_index, duplicates: str, col_to_ref: np.ndarray):
    """Fill col_to_ref from the groups: a column already named as the current symbol wins; among the others
    "first" keeps the first, "sum" all. Returns (duplicated, collisions, current_won, collision examples)."""
    duplicated = collisions = current_won = 0
    collision_examples = []
    for key, columns in groups.items():
        current = [i for i in columns if statuses[i] == CURRENT]
        candidates = current if current else columns
        kept = candidates if duplicates == "sum" else candidates[:1]
        j = ref_index.get(key)
        if j is not None:
            col_to_ref[kept] = j
        if len(columns) > 1:
            duplicated += len(columns) - 1
            collisions += 1
            current_won += bool(current) and len(current) < len(columns)
            if len(collision_examples) < EXAMPLES:
                lost = [names[i] for i in columns if i not in kept]
                collision_examples.append(
                    f"{key}: kept {' + '.join(str(names[i]) for i in kept)}"
                    + (f" over {', '.join(map(str, lost))}" if lost else " (summed)")
                )
    return duplicated, collisions, current_won, collision_examples


def gene_column_map(
    names: Sequence[str],
    reference: Sequence[str],
    table: GeneTable,
    duplicates: str = "first",
    ids: Sequence[str] | None = None,
) -> tuple[np.ndarray, dict, dict]:
    """Where each input gene column goes in the reference, after symbol revision.

    A name's key is its revised symbol. A name that cannot be revised (unknown or ambiguous) is revised by its
    Ensembl id when `ids` (one per name, e.g. a 10x file's `var["gene_ids"]`) maps it to one current gene (counted
    as `genes_revised_by_id`); otherwise it keeps its own text as key and is used only if the reference lists
    exactly that text (`genes_verbatim`). Reference names are revised the same way, so an outdated symbol in the
    reference (`IGJ`) still receives the data's `JCHAIN`.

    Several columns with one key (a collision): a column whose name already is the current symbol wins over every
    column revised to it, in any column order (pbmc3k's `HNRNPU` over `HNRNPU-AS1`, an alias of it); among the
    others, duplicates "first" keeps the first column (as the reference code does), "sum" adds them.

    Returns (col_to_ref: int64 (genes_in,), -1 where dropped; counts dict; examples dict of short strings).
    """
    if duplicates not in ("first", "sum"):
        raise ScbertError(f"--duplicates {duplicates!r} is not one of first, sum")
    if ids is not None and len(ids) != len(names):
        raise ScbertError(f"{len(ids)} Ensembl ids for {len(names)} gene names; the id column must have one per gene")
    ref_index, reference_revised, reference_aliased = _reference_index(reference, table)
    groups, statuses, status_counts, verbatim, (revised_examples, dropped_examples, id_examples) = _group_columns(
        names, ref_index, table, ids)
    col_to_ref = np.full(len(names), -1, dtype=np.int64)
    duplicated, collisions, current_won, collision_examples = _resolve_collisions(
        groups, statuses, names, ref_index, duplicates, col_to_ref)
    used = col_to_ref >= 0
    covered = np.unique(col_to_ref[used]).size
    unrevised = status_counts[AMBIGUOUS] + status_counts[UNKNOWN]
    counts = {
        "genes_in": len(names),
        "genes_current": status_counts[CURRENT],
        "genes_revised": status_counts[SYNONYM] + status_counts[ENSEMBL] + status_counts[CASE] + status_counts[BY_ID],
        "genes_ensembl_mapped": status_counts[ENSEMBL],
        "genes_revised_by_id": status_counts[BY_ID],
        "genes_case_matched": status_counts[CASE],
        "genes_ambiguous": status_counts[AMBIGUOUS],
        "genes_unknown": status_counts[UNKNOWN],
        "genes_verbatim": verbatim,
        "genes_dropped": unrevised - verbatim,
        "genes_duplicated": duplicated,
        "genes_collisions": collisions,
        "genes_collisions_current_won": current_won,
        "genes_used": int(used.sum()),
        "genes_not_in_reference": len(groups) - covered,
        "reference_genes": len(reference),
        "reference_revised": reference_revised,
        "reference_aliased": reference_aliased,
        "reference_covered": int(covered),
        "coverage": covered / len(reference) if len(reference) else 0.0,
    }
    examples = {"revised_examples": ", ".join(revised_examples), "dropped_examples": ", ".join(dropped_examples),
                "revised_by_id_examples": ", ".join(id_examples),
                "collision_examples": "; ".join(collision_examples)}
    return col_to_ref, counts, examples


def find_id_column(var: pd.DataFrame, id_column: str | None = "auto") -> str | None:
    """The var column of Ensembl gene ids used to revise names that cannot be revised: `id_column` itself, None
    for "none"/None, or for "auto" the first of ID_COLUMNS (any case) whose values are mostly Ensembl gene ids."""
    if id_column is None or str(id_column).lower() == "none":
        return None
    if id_column != "auto":
        if id_column not in var.columns:
            raise ScbertError(
                f"--id_column {id_column!r} is not a column of the input's var (columns: {list(var.columns)}); "
                "pass the column holding Ensembl gene ids, auto or none"
            )
        if detect_identifier_type(var[id_column].astype(str)) != "ensembl":
            raise ScbertError(
                f"--id_column {id_column!r} does not hold Ensembl gene ids (e.g. {list(var[id_column][:3])}); pass "
                "the column holding ids such as ENSG00000132465, auto or none"
            )
        return id_column
    by_lower = {str(c).lower(): c for c in var.columns}
    for candidate in ID_COLUMNS:
        column = by_lower.get(candidate)
        if column is not None and detect_identifier_type(var[column].astype(str)) == "ensembl":
            return column
    return None


def _align_block(block: sp.csr_matrix, source: np.ndarray, indptr_of_target) -> sp.csr_matrix:
    """One row block: to CSC, gather the used columns in reference order, merge equal targets, back to CSR."""
    gathered = block.tocsc()[:, source]  # (rows, n_used) CSC, columns in reference order
    indptr = indptr_of_target(np.diff(gathered.indptr))
    n_ref = indptr.size - 1
    return sp.csc_matrix((gathered.data, gathered.indices, indptr), shape=(block.shape[0], n_ref)).tocsr()


def align_to_reference(x, col_to_ref: np.ndarray, n_ref: int, chunk_nnz: int = 1 << 23) -> sp.csr_matrix:
    """Columns of `x` (cells x genes_in) moved to reference positions: (cells x n_ref) CSR float32, sorted indices.

    Reference genes with no column stay zero, dropped columns (-1) vanish, columns sharing a position are added
    (`--duplicates sum`). No per-row sorting: each block of rows goes to CSC (a counting sort), its used columns are
    gathered in reference order, equal targets merged by rewriting the column pointers, and back to CSR (rows come
    out sorted). Blocks of about `chunk_nnz` stored values keep the counting sorts in cache and the temporaries small.
    """
    x = sp.csr_matrix(x)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    used = np.flatnonzero(col_to_ref >= 0)
    order = np.argsort(col_to_ref[used], kind="stable")
    source, target = used[order], col_to_ref[used][order]  # (n_used,), target ascending

    def indptr_of_target(per_source: np.ndarray) -> np.ndarray:
        per_target = np.bincount(target, weights=per_source, minlength=n_ref).astype(np.int64)
        indptr = np.zeros(n_ref + 1, dtype=np.int64)
        np.cumsum(per_target, out=indptr[1:])
        return indptr

    pieces, start = [], 0
    while start < x.shape[0] or not pieces:
        stop = int(np.searchsorted(x.indptr, x.indptr[start] + chunk_nnz, side="right")) - 1
        stop = min(max(stop, start + 1), x.shape[0])
        lo, hi = x.indptr[start], x.indptr[stop]
        block = sp.csr_matrix(
            (x.data[lo:hi], x.indices[lo:hi], x.indptr[start : stop + 1] - lo), shape=(stop - start, x.shape[1])
        )
        pieces.append(_align_block(block, source, indptr_of_target))
        start = stop
    if len(pieces) == 1:
        out = pieces[0]
    else:
        offsets = np.cumsum([0] + [p.nnz for p in pieces])
        index_dtype = np.int32 if offsets[-1] < np.iinfo(np.int32).max else np.int64
        indptr = np.concatenate(
            [np.zeros(1, dtype=index_dtype)]
            + [(p.indptr[1:] + off).astype(index_dtype) for p, off in zip(pieces, offsets[:-1], strict=True)]
        )
        out = sp.csr_matrix(
            (
                np.concatenate([p.data for p in pieces]),
                np.concatenate([p.indices for p in pieces]).astype(index_dtype),
                indptr,
            ),
            shape=(x.shape[0], n_ref),
        )
        del pieces
    if np.unique(target).size < target.size:
        out.sum_duplicates()  # summed duplicates: entries of one (cell, gene) are adjacent after the transpose
    out.eliminate_zeros()
    return out


def normalize_log1p(x: sp.csr_matrix, target_sum: float | None = 1e4, log_base: float | None = 2.0) -> sp.csr_matrix:
    """In place on a CSR float32 matrix: scanpy's `normalize_total(target_sum)` then `log1p(base=log_base)`.

    Same arithmetic as scanpy (per-cell totals summed in float64, divided in float32; log1p, then division by
    ln(base)), so the results agree to the last bit or so. Cells with no counts stay zero. None skips a step.
    """
    if target_sum is not None:
        per_row = np.diff(x.indptr)
        nonempty = per_row > 0
        totals = np.zeros(x.shape[0], dtype=np.float64)
        if nonempty.any():
            totals[nonempty] = np.add.reduceat(x.data, x.indptr[:-1][nonempty], dtype=np.float64)
        factor = totals.astype(np.float32) / float(target_sum)
        factor[factor == 0] = 1.0  # a cell with no counts (explicit zeros only) stays zero, as in scanpy
        x.data /= np.repeat(factor, per_row)
    if log_base is not None:
        np.log1p(x.data, out=x.data)
        np.divide(x.data, np.log(log_base), out=x.data)
    return x


def _plain(value):
    """A value h5ad can store in uns (no numpy scalars, no None)."""
    if isinstance(value, np.generic):
        return value.item()
    return "" if value is None else value


def _check_options(reference_genes, min_genes, normalize, target_sum, log1p, log_base) -> None:
    if len(set(reference_genes)) != len(reference_genes):
        raise ScbertError("the reference gene list holds duplicates; a reference gene list must be unique")
    if not reference_genes:
        raise ScbertError("the reference gene list is empty; pass the reference's genes")
    if min_genes < 0:
        raise ScbertError(f"--min_genes {min_genes} is negative; pass 0 to keep every cell")
    if normalize and not target_sum > 0:
        raise ScbertError(f"--target_sum {target_sum} must be positive (or pass --normalize False)")
    if log1p and not (log_base > 0 and log_base != 1):
        raise ScbertError(f"--log_base {log_base} must be positive and not 1 (or pass --log1p False)")


def _checked_counts(adata: ad.AnnData, counts_from: str, allow_normalized: bool):
    """(matrix, var, source) of the counts, refused with one sentence when they are missing or not counts."""
    matrix, var, counts_source = select_counts(adata, counts_from, allow_normalized)
    if matrix is None:
        raise ScbertError(f"the input's {counts_source} holds no matrix; pass a file with counts (see --counts_from)")
    if adata.n_obs == 0 or matrix.shape[1] == 0:
        raise ScbertError(f"the input has {adata.n_obs} cells and {matrix.shape[1]} genes; pass a non-empty matrix")
    # "auto" without allow_normalized has already checked the matrix it chose.
    problem = None if counts_from == "auto" and not allow_normalized else count_problem(matrix, allow_normalized)
    if problem:
        raise ScbertError(
            f"{counts_source} holds {problem}, so it is not raw counts; pass raw counts (--counts_from X, raw or "
            f"layer:NAME)" + ("" if allow_normalized else ", or --allow_normalized True if normalised on purpose")
        )
    return matrix, var, counts_source


def _gene_names(var: pd.DataFrame, var_column: str | None) -> list[str]:
    if var_column is None:
        return [str(g) for g in var.index]
    if var_column in var.columns:
        return [str(g) for g in var[var_column]]
    raise ScbertError(
        f"--var_column {var_column!r} is not a column of the input's var (columns: {list(var.columns)}); "
        f"leave it out to use the var names"
    )


def map_input_genes(var: pd.DataFrame, reference_genes: Sequence[str], table: GeneTable, *,
                    var_column: str | None = None, id_column: str | None = "auto", duplicates: str = "first"):
    """Where each input column goes in the reference (`gene_column_map` on the var's names, with the Ensembl id
    column found by `find_id_column`). Returns (col_to_ref, summary with examples, identifier_type, id column or
    None); refuses an input none of whose genes is in the reference."""
    names = _gene_names(var, var_column)
    identifier_type = detect_identifier_type(names)
    # Names that are Ensembl ids already are revised by them; otherwise an id column can rescue unknown names.
    id_col = None if identifier_type == "ensembl" else find_id_column(var, id_column)
    ids = None if id_col is None else [str(v) for v in var[id_col]]
    col_to_ref, summary, examples = gene_column_map(names, reference_genes, table, duplicates, ids=ids)
    if summary["reference_covered"] == 0:
        hint = ""
        if identifier_type == "ensembl" and not any(str(n).startswith("ENSG") for n in names[:1000]):
            hint = " The Ensembl ids are not human (ENSG...); this table is for human data."
        raise ScbertError(
            f"none of the {len(names)} input genes matches the {len(reference_genes)} reference genes: input names "
            f"look like {identifier_type} ids (e.g. {names[:3]}), reference names like {reference_genes[:3]}.{hint} "
            f"Check the species (human), the identifier type (--var_column for another var column) and --ref"
        )
    summary.update(examples)
    return col_to_ref, summary, identifier_type, id_col


def process_block(matrix, col_to_ref: np.ndarray, n_ref: int, *, min_genes: int, target_sum: float | None,
                  log_base: float | None) -> tuple[sp.csr_matrix, np.ndarray]:
    """One block of count rows -> (kept cells x reference genes) CSR float32 normalised values, and the keep mask.

    Alignment, the --min_genes filter and normalisation are per cell, so blocks give the rows the whole matrix
    would (what streaming several inputs relies on)."""
    x = align_to_reference(matrix, col_to_ref, n_ref)
    keep = np.diff(x.indptr) >= min_genes
    if not keep.all():
        x = x[np.flatnonzero(keep)]
    normalize_log1p(x, target_sum, log_base)
    return x, keep


def _coverage_notes(summary: dict, n_ref: int) -> list[str]:
    """Warnings about the gene match (also emitted as PreprocessWarning)."""
    notes = []
    if summary["coverage"] < LOW_COVERAGE:
        notes.append(
            f"only {summary['reference_covered']} of {n_ref} reference genes "
            f"({summary['coverage']:.1%}) are in the data; the rest are zero, so predictions are unreliable; "
            f"check the species, identifier type and --ref"
        )
    matched = summary["genes_used"]
    if matched and summary["genes_case_matched"] * 2 > matched:
        notes.append(
            f"{summary['genes_case_matched']} gene names matched only case-insensitively (e.g. Cd3e -> CD3E); "
            f"if these are mouse genes, human gene symbols do not make them human data"
        )
    for note in notes:
        warnings.warn(note, PreprocessWarning, stacklevel=3)
    return notes


def preprocess_params(*, target_sum, normalize, log_base, log1p, min_genes, reference_name, n_ref, table,
                      duplicates, counts_source, var_column, id_column, allow_normalized) -> dict:
    """The parameters recorded in uns["scbert_preprocess"]["params"] (and in a shard manifest)."""
    params = {
        "target_sum": float(target_sum),
        "normalize": bool(normalize),
        "log_base": float(log_base),
        "log1p": bool(log1p),
        "min_genes": int(min_genes),
        "reference": reference_name or f"{n_ref} genes given in-process",
        "revision": table.source,
        "duplicates": duplicates,
        "counts_from": counts_source,
        "var_column": var_column or "",
        "id_column": "none" if id_column is None else str(id_column),
        "allow_normalized": bool(allow_normalized),
    }
    return {k: _plain(v) for k, v in params.items()}


def preprocess_adata(
    adata: ad.AnnData,
    reference_genes: Sequence[str] | None = None,
    *,
    table: GeneTable | None = None,
    counts_from: str = "auto",
    var_column: str | None = None,
    id_column: str | None = "auto",
    duplicates: str = "first",
    min_genes: int = 200,
    normalize: bool = True,
    target_sum: float = 1e4,
    log1p: bool = True,
    log_base: float = 2.0,
    allow_normalized: bool = False,
    reference_name: str | None = None,
) -> tuple[ad.AnnData, dict]:
    """Counts in `adata` -> scBERT's input over `reference_genes` (None: the shipped protein-coding list).

    counts_from: which matrix holds counts (see `select_counts`); var_column: the var column holding gene names
    (None: var_names), e.g. "gene_ids" for the Ensembl ids of a 10x file; id_column: the var column of Ensembl ids
    that revises names which cannot be revised ("auto": see `find_id_column`; None or "none": no such revision).
    Collisions (several columns for one gene) follow `gene_column_map`. `adata` is not modified.

    Returns (output, summary). output: X = CSR float32 (cells kept x reference genes), obs = the kept cells' obs,
    var = the reference genes in order with column `in_input` (bool), uns["scbert_preprocess"] = {"params": ...,
    "summary": ...}. summary (plain ints/floats/strings): genes_in, genes_current, genes_revised,
    genes_ensembl_mapped, genes_revised_by_id, genes_case_matched, genes_ambiguous, genes_unknown, genes_verbatim,
    genes_dropped, genes_duplicated, genes_collisions, genes_collisions_current_won, genes_used,
    genes_not_in_reference, reference_genes, reference_revised, reference_aliased,
    reference_covered, coverage, cells_in, cells_removed, cells_out, identifier_type, counts_source,
    id_column, revised_examples, revised_by_id_examples, dropped_examples, collision_examples (which column each
    collision kept), warnings. Emits PreprocessWarning for low coverage or mostly
    case-insensitive matches; raises ScbertError when the input is unusable.
    """
    if reference_genes is None:
        reference_genes = read_reference_genes(None)
        reference_name = reference_name or f"default: {os.path.basename(DEFAULT_REFERENCE)}"
    reference_genes = [str(g) for g in reference_genes]
    _check_options(reference_genes, min_genes, normalize, target_sum, log1p, log_base)
    table = load_gene_table() if table is None else table
    matrix, var, counts_source = _checked_counts(adata, counts_from, allow_normalized)
    col_to_ref, summary, identifier_type, id_col = map_input_genes(
        var, reference_genes, table, var_column=var_column, id_column=id_column, duplicates=duplicates)
    x, keep = process_block(matrix, col_to_ref, len(reference_genes), min_genes=min_genes,
                            target_sum=target_sum if normalize else None, log_base=log_base if log1p else None)
    if x.shape[0] == 0:
        most = int(np.diff(align_to_reference(matrix, col_to_ref, len(reference_genes)).indptr).max())
        raise ScbertError(
            f"no cell has at least {min_genes} expressed reference genes (most: {most}); "
            f"lower --min_genes or check the gene names and --ref"
        )
    notes = _coverage_notes(summary, len(reference_genes))
    summary.update(cells_in=int(adata.n_obs), cells_removed=int((~keep).sum()), cells_out=int(keep.sum()),
                   identifier_type=identifier_type, id_column=id_col or "", counts_source=counts_source,
                   warnings=" | ".join(notes))
    params = preprocess_params(target_sum=target_sum, normalize=normalize, log_base=log_base, log1p=log1p,
                               min_genes=min_genes, reference_name=reference_name, n_ref=len(reference_genes),
                               table=table, duplicates=duplicates, counts_source=counts_source,
                               var_column=var_column, id_column=id_column, allow_normalized=allow_normalized)
    var_out = pd.DataFrame(
        {"in_input": np.bincount(col_to_ref[col_to_ref >= 0], minlength=len(reference_genes)) > 0},
        index=pd.Index(reference_genes, dtype=object),
    )
    out = ad.AnnData(X=x, obs=adata.obs.iloc[np.flatnonzero(keep)].copy(), var=var_out)
    summary = {k: _plain(v) for k, v in summary.items()}
    out.uns[PREPROCESS_UNS_KEY] = {"params": params, "summary": dict(summary)}
    return out, summary


def format_summary(summary: dict) -> str:
    """The summary as a few readable lines."""
    s = summary
    lines = [
        f"genes in: {s['genes_in']} ({s['identifier_type']} ids); current {s['genes_current']}, revised "
        f"{s['genes_revised']} (Ensembl {s['genes_ensembl_mapped']}, case-insensitive {s['genes_case_matched']}), "
        f"dropped {s['genes_dropped']} (unknown {s['genes_unknown']}, ambiguous {s['genes_ambiguous']}), "
        f"kept verbatim {s['genes_verbatim']}, duplicated {s['genes_duplicated']}, not in reference "
        f"{s['genes_not_in_reference']}",
        f"revised by Ensembl id (var column {s['id_column']!r}): {s['genes_revised_by_id']} names that could not "
        "be revised" if s.get("id_column") else "no Ensembl-id column used for names that could not be revised",
        f"collisions (several columns for one gene): {s['genes_collisions']}, of which "
        f"{s['genes_collisions_current_won']} won by the column already named as the current symbol",
        f"reference coverage: {s['reference_covered']} of {s['reference_genes']} genes ({s['coverage']:.1%})",
        f"cells: {s['cells_in']} in, {s['cells_removed']} removed, {s['cells_out']} out",
    ]
    if s.get("revised_examples"):
        lines.append(f"revised e.g.: {s['revised_examples']}")
    if s.get("revised_by_id_examples"):
        lines.append(f"revised by id e.g.: {s['revised_by_id_examples']}")
    if s.get("collision_examples"):
        lines.append(f"collisions e.g.: {s['collision_examples']}")
    if s.get("dropped_examples"):
        lines.append(f"dropped e.g.: {s['dropped_examples']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Several inputs, in row blocks (streaming), into an .h5ad or a shard folder
# ----------------------------------------------------------------------------------------------------------------

# Rows per block when streaming: ~16k cells x ~2,000 counts is a few hundred MB of temporaries at most.
BLOCK_CELLS = 16384


def input_paths(data_paths: Sequence[str]) -> list[str]:
    """The inputs named by `--data_path`: each path itself, or for a folder that is not a 10x folder, the inputs
    inside it (10x folders and count files, sorted by name)."""
    paths = []
    for path in data_paths:
        if os.path.isdir(path) and _find_file(path, ["matrix.mtx"]) is None:
            inside = sorted(os.path.join(path, name) for name in os.listdir(path) if not name.startswith("."))
            found = [p for p in inside if (os.path.isdir(p) and _find_file(p, ["matrix.mtx"]) is not None)
                     or (os.path.isfile(p) and p.lower().endswith((".h5ad", ".h5", ".hdf5", *TABLE_SUFFIXES)))]
            if not found:
                raise ScbertError(f"folder {path} holds no 10x folder or count file; pass inputs such as 10x folders, "
                                  ".h5ad, .h5 or .csv/.tsv files")
            paths.extend(found)
        else:
            input_kind(path)
            paths.append(path)
    return paths


class H5adSink:
    """Collects preprocessed blocks into one AnnData (the in-memory output of several inputs)."""

    def __init__(self):
        self.blocks: list[sp.csr_matrix] = []
        self.obs: list[pd.DataFrame] = []

    def add(self, block: sp.csr_matrix, obs: pd.DataFrame) -> None:
        self.blocks.append(block)
        self.obs.append(obs)

    def adata(self, reference_genes: Sequence[str], in_input: np.ndarray) -> ad.AnnData:
        x = sp.vstack(self.blocks, format="csr") if len(self.blocks) > 1 else self.blocks[0]
        var = pd.DataFrame({"in_input": in_input}, index=pd.Index(reference_genes, dtype=object))
        return ad.AnnData(X=x.astype(np.float32), obs=pd.concat(self.obs), var=var)


class CountSource:
    """One input's counts for streaming: n_obs, obs, var, where they came from, and `block(start, stop)`, rows
    [start, stop) as CSR. `checked`: the whole matrix was already checked to hold counts (else each block is).
    Files are opened by `open_counts`; other sources (a Census query: census.py) build one themselves."""

    def __init__(self, n_obs: int, obs: pd.DataFrame, var: pd.DataFrame, source: str, block, checked: bool,
                 name: str | None = None):
        self.n_obs, self.obs, self.var, self.source, self.block, self.checked = n_obs, obs, var, source, block, checked
        self.name = name  # how the input is recorded (a path is its absolute path; e.g. "census:<uri>")


def _backed_counts(path: str, options: dict) -> CountSource | None:
    """X of an .h5ad opened backed (read from disk a block of rows at a time), when X is a CSR matrix of counts
    the flags point to; None to read the file into memory instead (another matrix holds the counts, or X is CSC)."""
    try:
        adata = ad.read_h5ad(path, backed="r")
    except Exception:  # the in-memory reader reports what is wrong with the file
        return None
    x = adata.X
    auto = options["counts_from"] == "auto"
    if x is None or getattr(x, "format", "csr") != "csr" or (auto and "counts" in adata.layers):
        return None
    if adata.n_obs == 0 or adata.n_vars == 0:
        return None

    def block(start: int, stop: int) -> sp.csr_matrix:
        return sp.csr_matrix(x[start:stop], dtype=np.float32)

    problem = count_problem(block(0, min(adata.n_obs, 1024)), options["allow_normalized"])
    if problem and auto:
        return None  # .raw may hold the counts: the in-memory path looks there
    if problem:
        raise ScbertError(f"X holds {problem}, so it is not raw counts; pass raw counts (--counts_from X, raw or "
                          "layer:NAME)" + ("" if options["allow_normalized"] else
                                           ", or --allow_normalized True if normalised on purpose"))
    return CountSource(adata.n_obs, adata.obs, adata.var, "X", block, checked=False)


def open_counts(path: str, options: dict, transpose: bool = False) -> CountSource:
    """The counts of one input: a CSR `.h5ad` backed (memory bounded by the block), anything else in memory."""
    if input_kind(path) == "h5ad" and options["counts_from"] in ("auto", "X"):
        backed = _backed_counts(path, options)
        if backed is not None:
            print(f"reading {path} (h5ad, backed: rows read from disk a block at a time)")
            return backed
    print(f"reading {path} ({input_kind(path)})")
    adata = read_input(path, transpose=transpose)
    matrix, var, source = _checked_counts(adata, options["counts_from"], options["allow_normalized"])
    matrix = sp.csr_matrix(matrix)
    return CountSource(adata.n_obs, adata.obs, var, source, lambda a, b: matrix[a:b], checked=True)


def _stream_one(counts: CountSource, reference_genes: list[str], table: GeneTable, sink, options: dict,
                block_cells: int, label: str | None) -> tuple[dict, np.ndarray]:
    """One input through gene mapping once and alignment/filter/normalisation per row block into `sink`."""
    col_to_ref, summary, identifier_type, id_col = map_input_genes(
        counts.var, reference_genes, table, var_column=options["var_column"], id_column=options["id_column"],
        duplicates=options["duplicates"])
    kept = 0
    for start in range(0, counts.n_obs, block_cells):
        stop = min(start + block_cells, counts.n_obs)
        matrix = counts.block(start, stop)
        problem = None if counts.checked else count_problem(matrix, options["allow_normalized"])
        if problem:
            raise ScbertError(f"{counts.source} holds {problem} in rows {start}..{stop - 1}, so it is not raw counts; "
                              "pass raw counts")
        x, keep = process_block(matrix, col_to_ref, len(reference_genes), min_genes=options["min_genes"],
                                target_sum=options["target_sum"], log_base=options["log_base"])
        obs = counts.obs.iloc[start:stop].iloc[np.flatnonzero(keep)].copy()
        if label is not None:
            obs["input"] = label
        if x.shape[0]:
            sink.add(x, obs)
        kept += int(keep.sum())
    summary.update(cells_in=int(counts.n_obs), cells_removed=int(counts.n_obs - kept), cells_out=kept,
                   identifier_type=identifier_type, id_column=id_col or "", counts_source=counts.source)
    summary["warnings"] = " | ".join(_coverage_notes(summary, len(reference_genes)))
    in_input = np.bincount(col_to_ref[col_to_ref >= 0], minlength=len(reference_genes)) > 0
    return {k: _plain(v) for k, v in summary.items()}, in_input


def input_name(path: str | CountSource) -> str:
    """How an input is recorded in the output's params and `obs['input']`: a path's absolute path, a source's name."""
    if isinstance(path, CountSource):
        return path.name or "counts"
    return os.path.abspath(path)


def stream_preprocess(paths: Sequence[str | CountSource], reference_genes: Sequence[str], sink, *, table: GeneTable,
                      transpose: bool = False, block_cells: int = BLOCK_CELLS, **options) -> tuple[dict, np.ndarray]:
    """Preprocess every input in turn, each in row blocks of `block_cells`, handing kept cells to `sink.add`.

    Memory is one block's counts and temporaries for a CSR `.h5ad` (read backed) or a `CountSource` that reads
    blocks (a Census query), else one input's counts (one 10x sample, one file) plus one block's temporaries, whatever
    the number of inputs. With several inputs, obs gets an
    `input` column (the input's file or folder name). options: those of `preprocess_adata` (counts_from,
    var_column, id_column, duplicates, min_genes, allow_normalized; target_sum and log_base None to skip a step).
    Returns (summary: per-input summaries under "inputs" and the cell totals, in_input: whether any input had each
    reference gene).
    """
    reference_genes = [str(g) for g in reference_genes]
    per_input, in_input = [], np.zeros(len(reference_genes), dtype=bool)
    for path in paths:
        counts = path if isinstance(path, CountSource) else open_counts(path, options, transpose)
        label = os.path.basename(os.path.normpath(input_name(path))) if len(paths) > 1 else None
        summary, found = _stream_one(counts, reference_genes, table, sink, options, block_cells, label)
        per_input.append({"input": input_name(path), **summary})
        in_input |= found
        del counts
    if sum(s["cells_out"] for s in per_input) == 0:
        raise ScbertError(f"no cell has at least {options['min_genes']} expressed reference genes in any input; "
                          "lower --min_genes or check the gene names and --ref")
    if len(per_input) == 1:
        return per_input[0], in_input
    totals = {k: sum(s[k] for s in per_input) for k in ("cells_in", "cells_removed", "cells_out")}
    return {**totals, "inputs": json.dumps(per_input)}, in_input


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def default_out_path(data_path: str, shards: bool = False) -> str:
    """`<input name without its format suffix>_preprocessed.h5ad` (with `shards`: `..._shards`, a folder), beside
    the input (a 10x folder: beside it)."""
    path = os.path.normpath(data_path)
    lower = path.lower()
    for suffix in (".h5ad", ".hdf5", ".h5", ".mtx.gz", ".mtx", *TABLE_SUFFIXES):
        if lower.endswith(suffix):
            path = path[: -len(suffix)]
            break
    return f"{path}_shards" if shards else f"{path}_preprocessed.h5ad"


def check_out_path(data_path: str, out_path: str, overwrite: bool, shards: bool = False) -> None:
    """Refuse an output that is the input, not an .h5ad (a shard folder: an .h5ad or an existing file), or
    (without overwrite) one that exists."""
    if shards:
        if out_path.lower().endswith(".h5ad") or os.path.isfile(out_path):
            raise ScbertError(f"--out_path {out_path} must be a folder name for --out_format shards (not a file or "
                              ".h5ad)")
        if os.path.realpath(out_path) == os.path.realpath(data_path):
            raise ScbertError(f"--out_path {out_path} is the input; choose another output path")
        if os.path.exists(out_path) and not overwrite:
            raise ScbertError(f"{out_path} already exists; pass --overwrite True to replace it or choose another "
                              "--out_path")
        return
    if not out_path.lower().endswith(".h5ad"):
        raise ScbertError(f"--out_path {out_path} must end in .h5ad")
    if os.path.realpath(out_path) == os.path.realpath(data_path) or (
        os.path.exists(out_path) and os.path.exists(data_path) and os.path.samefile(out_path, data_path)
    ):
        raise ScbertError(f"--out_path {out_path} is the input file; choose another output path")
    if os.path.isdir(out_path):
        raise ScbertError(f"--out_path {out_path} is a folder; pass a file name ending in .h5ad")
    if os.path.exists(out_path) and not overwrite:
        raise ScbertError(
            f"{out_path} already exists; pass --overwrite True to replace it or choose another --out_path"
        )


def write_h5ad_atomic(adata: ad.AnnData, path: str) -> None:
    """Write to a temporary file beside `path`, then rename (utils.atomic_write_h5ad, the project's one writer)."""
    atomic_write_h5ad(adata, path)


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """--out_format, --cells_per_shard, --block_cells."""
    parser.add_argument("--out_format", default="h5ad", choices=["h5ad", "shards"],
                        help="h5ad (in memory, for small data) or shards: a folder of memory-mapped, pre-tokenised "
                        "shards (shards.py) that pretrain.py and finetune.py read with memory per rank that does "
                        "not grow with the corpus")
    parser.add_argument("--cells_per_shard", type=int, default=65536, help="cells per shard of --out_format shards")
    parser.add_argument("--block_cells", type=int, default=BLOCK_CELLS,
                        help="cells aligned and normalised at a time when streaming (memory per block)")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "scBERT preprocessing: raw counts -> log2(1 + CP10K) over the reference genes", add_help=add_help
    )
    parser.add_argument(
        "--data_path",
        required=True,
        nargs="+",
        help="counts: .h5ad, 10x folder (matrix.mtx), 10x .h5, or .csv/.tsv (cells as rows); several paths, or a "
        "folder of such inputs (e.g. one 10x folder per sample), are preprocessed one after another in row blocks "
        "into one output whose obs column 'input' names each cell's input",
    )
    parser.add_argument(
        "--ref",
        default=None,
        help="reference genes: panglao (the published checkpoint's 16,906 genes in order, shipped in data/ and "
        "hash-checked), a checkpoint (.pth; a published one without a gene list means panglao), an .h5ad (its "
        "var_names, e.g. panglao_10000.h5ad) or a text file, one symbol per line; default: NCBI human "
        "protein-coding genes (data/)",
    )
    parser.add_argument("--out_path", default=None,
                        help="output .h5ad, or with --out_format shards a new folder (default: "
                        "<input>_preprocessed.h5ad or <input>_shards)")
    add_output_flags(parser)
    parser.add_argument(
        "--counts_from",
        default="auto",
        help="auto (layer 'counts', else X, else .raw: the first holding integer counts), X, raw, or layer:NAME",
    )
    parser.add_argument(
        "--var_column",
        default=None,
        help="var column holding gene names (default: var_names; e.g. gene_ids for a 10x file's Ensembl ids)",
    )
    parser.add_argument(
        "--id_column",
        default="auto",
        help="var column of Ensembl gene ids that revises names which cannot be revised (clone names such as "
        "RP11-206L10.9); auto: the first of gene_ids, gene_id, ensembl_id, ensembl, ... holding Ensembl ids; none: "
        "drop such names",
    )
    parser.add_argument("--transpose", type=str2bool, default=False, help="tables only: True when genes are rows")
    parser.add_argument(
        "--duplicates",
        default="first",
        choices=["first", "sum"],
        help="columns that revise to the same symbol: a column already named as the current symbol always wins; "
        "among the others keep the first column (as published) or sum them",
    )
    parser.add_argument(
        "--gene_info",
        default=None,
        help="NCBI Homo_sapiens.gene_info(.gz) to revise against instead of the shipped snapshot",
    )
    parser.add_argument(
        "--min_genes",
        type=int,
        default=200,
        help="drop cells with fewer expressed reference genes (published: 200; 0 keeps all)",
    )
    parser.add_argument("--normalize", type=str2bool, default=True, help="scale each cell to --target_sum counts")
    parser.add_argument("--target_sum", type=float, default=1e4, help="counts per cell after normalisation")
    parser.add_argument("--log1p", type=str2bool, default=True, help="apply log(1 + x) in base --log_base")
    parser.add_argument("--log_base", type=float, default=2.0, help="log base (published: 2)")
    parser.add_argument(
        "--allow_normalized",
        type=str2bool,
        default=False,
        help="accept non-integer values (already normalised data you pass on purpose; combine with "
        "--normalize False --log1p False if they are already log2(1 + CP10K))",
    )
    parser.add_argument("--overwrite", type=str2bool, default=False, help="replace an existing --out_path")
    parser.add_argument(
        "--recipe",
        default="scbert",
        choices=["scbert", "scgpt"],
        help="scbert (this page's steps) or scgpt: HVGs and per-cell bins for the transformer (scgpt_preprocess.py "
        "--help lists its flags: --n_hvg, --hvg_batch_key, --hvg_span, --n_bins, --ref <transformer checkpoint>)",
    )
    return parser


def _report_warnings(caught) -> None:
    for warning in caught:
        if issubclass(warning.category, PreprocessWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _options(args: argparse.Namespace) -> dict:
    return dict(counts_from=args.counts_from, var_column=args.var_column, id_column=args.id_column,
                duplicates=args.duplicates, min_genes=args.min_genes, allow_normalized=args.allow_normalized)


def _preprocess_one_file(args, data_path: str, out_path: str, reference, reference_name: str, table) -> dict:
    """One input, in memory, into one .h5ad (the published path)."""
    adata = read_input(data_path, transpose=args.transpose)
    print(f"read {adata.n_obs} cells x {adata.n_vars} genes; revising against {table.source.split(';')[0]}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PreprocessWarning)
        out, summary = preprocess_adata(adata, reference, table=table, **_options(args), normalize=args.normalize,
                                        target_sum=args.target_sum, log1p=args.log1p, log_base=args.log_base,
                                        reference_name=reference_name)
    _report_warnings(caught)
    out.uns[PREPROCESS_UNS_KEY]["params"]["input"] = os.path.abspath(data_path)
    write_h5ad_atomic(out, out_path)
    print(format_summary(summary))
    print(f"wrote {out_path}: {out.n_obs} cells x {out.n_vars} reference genes")
    return summary


def _preprocess_streaming(args, paths: list[str | CountSource], out_path: str, reference, reference_name: str,
                          table) -> dict:
    """Several inputs, or a shard folder: every input in row blocks (`stream_preprocess`)."""
    from shards import ShardWriter

    _check_options(reference, args.min_genes, args.normalize, args.target_sum, args.log1p, args.log_base)
    params = preprocess_params(target_sum=args.target_sum, normalize=args.normalize, log_base=args.log_base,
                               log1p=args.log1p, min_genes=args.min_genes, reference_name=reference_name,
                               n_ref=len(reference), table=table, duplicates=args.duplicates,
                               counts_source=args.counts_from, var_column=args.var_column, id_column=args.id_column,
                               allow_normalized=args.allow_normalized)
    params["input"] = json.dumps([input_name(p) for p in paths]) if len(paths) > 1 else input_name(paths[0])
    shards = args.out_format == "shards"
    sink = (ShardWriter(out_path, reference, kind="scbert", params=params, cells_per_shard=args.cells_per_shard)
            if shards else H5adSink())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PreprocessWarning)
            summary, in_input = stream_preprocess(
                paths, reference, sink, table=table, transpose=args.transpose, block_cells=args.block_cells,
                **_options(args), target_sum=args.target_sum if args.normalize else None,
                log_base=args.log_base if args.log1p else None)
    except BaseException:
        if shards:
            sink.abort()
        raise
    _report_warnings(caught)
    if shards:
        manifest = sink.close(summary, overwrite=args.overwrite)
        what = f"{manifest['n_cells']} cells in {len(manifest['shards'])} shards, {manifest['nnz']} stored values"
    else:
        out = sink.adata(reference, in_input)
        out.uns[PREPROCESS_UNS_KEY] = {"params": params, "summary": summary}
        write_h5ad_atomic(out, out_path)
        what = f"{out.n_obs} cells"
    print(format_summary(summary) if "genes_in" in summary else
          f"cells: {summary['cells_in']} in, {summary['cells_removed']} removed, {summary['cells_out']} out")
    print(f"wrote {out_path}: {what} x {len(reference)} reference genes")
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    """Preprocess the inputs; writes the output (.h5ad or shard folder) and prints the summary. Returns it."""
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--recipe", default="scbert")
    if recipe.parse_known_args(argv)[0].recipe == "scgpt":
        from scgpt_preprocess import main as scgpt_main

        return scgpt_main(argv)
    args = get_args_parser().parse_args(argv)
    check_positive_sizes(args)
    shards = args.out_format == "shards"
    paths = input_paths(args.data_path)
    out_path = args.out_path or default_out_path(args.data_path[0], shards=shards)
    for path in args.data_path:
        check_out_path(path, out_path, args.overwrite, shards=shards)
    reference, reference_name, table = _reference(args)
    what = input_kind(paths[0]) if len(paths) == 1 else f"{len(paths)} inputs"
    print(f"reading {', '.join(args.data_path)} ({what}); reference: {reference_name} ({len(reference)} genes)")
    if len(paths) == 1 and not shards:
        return _preprocess_one_file(args, paths[0], out_path, reference, reference_name, table)
    return _preprocess_streaming(args, paths, out_path, reference, reference_name, table)


def _reference(args: argparse.Namespace) -> tuple[list[str], str, GeneTable]:
    """The reference genes --ref names, how the output records them, and the gene table (--gene_info)."""
    reference = read_reference_genes(args.ref)
    reference_name = args.ref if args.ref else f"default: {os.path.basename(DEFAULT_REFERENCE)}"
    return reference, reference_name, load_gene_table(args.gene_info)


def preprocess_source(argv: Sequence[str], source: CountSource, out_path: str) -> dict:
    """Another module's counts (a `CountSource`, e.g. census.py's query) through preprocess.py's streaming path into
    `out_path`, with preprocess.py's flags `argv` (--ref, --min_genes, --out_format, --block_cells, ...; with
    --recipe scgpt the scGPT recipe's flags, into shards: scgpt_stream.py)."""
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--recipe", default="scbert")
    if recipe.parse_known_args(argv)[0].recipe == "scgpt":
        from scgpt_preprocess import scgpt_source

        return scgpt_source(argv, source, out_path)
    args = get_args_parser().parse_args(["--data_path", source.name or "counts", "--out_path", out_path, *argv])
    check_positive_sizes(args)
    reference, reference_name, table = _reference(args)
    print(f"reading {source.name}; reference: {reference_name} ({len(reference)} genes)")
    return _preprocess_streaming(args, [source], out_path, reference, reference_name, table)


def check_positive_sizes(args: argparse.Namespace) -> None:
    for flag in ("cells_per_shard", "block_cells"):
        if getattr(args, flag, 1) < 1:
            raise ScbertError(f"--{flag} must be at least 1, got {getattr(args, flag)}")


if __name__ == "__main__":
    run_cli(main)
