"""The scGPT / scLLM preprocessing recipe: raw counts -> HVG-restricted, per-cell binned values for the transformer.

Steps (scLLM's order):
1. `filter_genes(min_counts=1)`, then `filter_cells(min_counts=1)`;
2. highly variable genes, `flavor="seurat_v3"` on the counts with `batch_key` (one global set of `n_hvg`, ranked by
   the number of batches calling a gene variable; `span` 1.0 as scLLM ran, scanpy's default 0.3 reachable), kept;
   or, with `genes` (a checkpoint's vocabulary), those genes in that order instead (missing ones are zero);
3. cells left without counts over the kept genes are dropped (they have nothing to bin);
4. `normalize_total(target_sum=1e4)` then `log1p`, kept in `layers["X_log1p"]`;
5. per-cell quantile binning of those values into `n_bins` (`binning.bin_cells`), written to `X`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from binning import bin_cells, looks_binned
from utils import ScbertError

__all__ = ["NORMALISED_LAYER", "SCGPT_UNS_KEY", "preprocess_scgpt"]

SCGPT_UNS_KEY = "scgpt_preprocess"
NORMALISED_LAYER = "X_log1p"


def _count_problem(x: sp.csr_matrix) -> str | None:
    data = x.data
    if data.size == 0:
        return "no non-zero values"
    if not np.isfinite(data).all():
        return "NaN or infinite values"
    if data.min() < 0:
        return f"negative values (minimum {data.min():g})"
    if not np.all(data == np.round(data)):
        return "non-integer values (normalised data?)"
    return None


def _alignment(names: Sequence[str], genes: Sequence[str]) -> tuple[sp.csr_matrix, int]:
    """(input genes x `genes`) 0/1 matrix moving columns to `genes` order (missing genes zero, extra genes dropped,
    a repeated name keeps its first column), and how many of `genes` the input has."""
    position = {g: j for j, g in enumerate(genes)}
    source, target = [], []
    for i, name in enumerate(names):
        j = position.pop(str(name), None)
        if j is not None:
            source.append(i)
            target.append(j)
    mapping = sp.csr_matrix(
        (np.ones(len(source), dtype=np.float32), (source, target)), shape=(len(names), len(genes))
    )
    return mapping, len(source)


def _align(x: sp.csr_matrix, names: Sequence[str], genes: Sequence[str]) -> tuple[sp.csr_matrix, int]:
    """Columns of `x` moved to `genes` order (see `_alignment`); returns (matrix, found)."""
    mapping, found = _alignment(names, genes)
    return sp.csr_matrix(x @ mapping), found


def _checked_counts(adata: ad.AnnData, counts_layer: str | None, n_bins: int, genes, hvg_batch_key):
    """(CSR float32 counts, where they came from), refused with one sentence when they are not raw counts."""
    if SCGPT_UNS_KEY in adata.uns:
        raise ScbertError(
            f"the input is already binned (it has uns[{SCGPT_UNS_KEY!r}]): pass the raw counts it was made from"
        )
    matrix = adata.X if counts_layer is None else adata.layers.get(counts_layer)
    where = "X" if counts_layer is None else f"layer {counts_layer!r}"
    if matrix is None:
        raise ScbertError(f"the input has no matrix in {where}: pass raw counts")
    counts = sp.csr_matrix(matrix, dtype=np.float32)
    if looks_binned(counts, n_bins):
        raise ScbertError(
            f"{where} already holds bins (whole numbers 0..{n_bins - 1}, the top bin in most cells): pass the raw "
            f"counts it was made from"
        )
    problem = _count_problem(counts)
    if problem:
        raise ScbertError(f"{where} holds {problem}, so it is not raw counts: the scGPT recipe starts from raw counts")
    if genes is None and hvg_batch_key is not None and hvg_batch_key not in adata.obs.columns:
        raise ScbertError(
            f"--hvg_batch_key {hvg_batch_key!r} is not a column of obs (columns: {list(adata.obs.columns)}): name the "
            f"column that holds each cell's sample (donor_id for Census data), or pass --hvg_batch_key none"
        )
    if not 2 <= n_bins <= 128:
        raise ScbertError(f"--n_bins {n_bins} is outside 2..128: the recipe uses 51")
    return counts, where


def _hvg_genes(work: ad.AnnData, n_hvg: int, hvg_batch_key: str | None, span: float) -> ad.AnnData:
    """scanpy's seurat_v3 HVGs on the counts, subset in place; errors made one sentence."""
    import scanpy as sc

    if work.n_vars < n_hvg:
        raise ScbertError(
            f"only {work.n_vars} genes have counts, fewer than --n_hvg {n_hvg}: lower --n_hvg or pass more genes"
        )
    try:
        sc.pp.highly_variable_genes(
            work, n_top_genes=n_hvg, flavor="seurat_v3", batch_key=hvg_batch_key, span=span, subset=True
        )
    except ImportError as err:
        raise ScbertError(
            "highly variable genes with flavor seurat_v3 need the scikit-misc package: install requirements.txt"
        ) from err
    except (ValueError, ZeroDivisionError) as err:
        raise ScbertError(
            f"seurat_v3 highly variable genes failed ({err}); batches of one or two cells often cause this: drop "
            f"them or pass a larger --hvg_span"
        ) from err
    return work


def _vocabulary_genes(work: ad.AnnData, genes: Sequence[str]) -> tuple[ad.AnnData, int]:
    genes = [str(g) for g in genes]
    x, found = _align(work.X, work.var_names, genes)
    if found == 0:
        raise ScbertError(
            f"none of the input's {work.n_vars} genes is in the vocabulary of {len(genes)} genes "
            f"(e.g. {genes[:3]}): check that var_names hold gene symbols like the model's"
        )
    return ad.AnnData(X=x, obs=work.obs, var=pd.DataFrame(index=pd.Index(genes, dtype=object))), found


def _normalise(x, target_sum: float) -> sp.csr_matrix:
    """normalize_total(target_sum) then natural log1p, as CSR float32 (a copy)."""
    normed = sp.csr_matrix(x, dtype=np.float32, copy=True)
    totals = np.asarray(normed.sum(axis=1), dtype=np.float64).ravel()
    normed = sp.csr_matrix(sp.diags((target_sum / totals).astype(np.float32)) @ normed)
    normed.data = np.log1p(normed.data)
    return normed


def preprocess_scgpt(
    adata: ad.AnnData,
    *,
    n_hvg: int = 1200,
    hvg_batch_key: str | None = "donor_id",
    span: float = 1.0,
    n_bins: int = 51,
    target_sum: float = 1e4,
    seed: int = 0,
    genes: Sequence[str] | None = None,
    counts_layer: str | None = None,
) -> ad.AnnData:
    """Counts in `adata.X` (or `adata.layers[counts_layer]`) -> the transformer's input; `adata` is not modified.

    genes: a vocabulary's genes (from a transformer checkpoint): use them in their order instead of choosing HVGs.
    Returns a new AnnData: X = CSR int8 bins (0 for zeros, 1..n_bins-1 otherwise), layers["X_log1p"] = CSR float32
    log1p(CP10K), obs = the kept cells' obs, var = the kept genes (with scanpy's HVG columns when chosen here),
    uns["scgpt_preprocess"] = {"params": ..., "summary": {cells_in, cells_out, genes_in, genes_out, ...},
    "bin_edges": (cells_out, n_bins - 1) float32, row i the edges of cell i}.
    Raises ScbertError for binned or non-count input, a missing batch column, or fewer genes than n_hvg.
    """
    import scanpy as sc

    counts, where = _checked_counts(adata, counts_layer, n_bins, genes, hvg_batch_key)
    work = ad.AnnData(X=counts, obs=adata.obs.copy(), var=pd.DataFrame(index=adata.var_names.astype(str)))
    cells_in, genes_in = work.n_obs, work.n_vars
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        sc.pp.filter_genes(work, min_counts=1)
        sc.pp.filter_cells(work, min_counts=1)
    if genes is None:
        work = _hvg_genes(work, n_hvg, hvg_batch_key, span)
        gene_source, found = f"seurat_v3 HVGs, batch_key {hvg_batch_key}", work.n_vars
    else:
        work, found = _vocabulary_genes(work, genes)
        gene_source = f"vocabulary of {len(genes)} genes"
    cells_before = work.n_obs
    keep = np.flatnonzero(np.diff(sp.csr_matrix(work.X).indptr) > 0)
    if keep.size == 0:
        raise ScbertError("no cell has counts over the kept genes: check the gene names")
    work = work[keep].copy()
    normed = _normalise(work.X, target_sum)
    bins, edges = bin_cells(normed, n_bins=n_bins, seed=seed)

    out = ad.AnnData(X=bins, obs=work.obs.copy(), var=work.var.copy())
    out.layers[NORMALISED_LAYER] = normed
    out.uns[SCGPT_UNS_KEY] = {
        "params": _recipe_params(n_hvg=n_hvg if genes is None else 0, hvg_batch_key=hvg_batch_key, span=span,
                                 n_bins=n_bins, target_sum=target_sum, seed=seed, gene_source=gene_source,
                                 where=where),
        "summary": {"cells_in": int(cells_in), "cells_out": int(out.n_obs),
                    "cells_without_counts": int(cells_in - cells_before),
                    "cells_empty_over_genes": int(cells_before - out.n_obs), "genes_in": int(genes_in),
                    "genes_out": int(out.n_vars), "genes_found": int(found)},
        "bin_edges": edges,
    }
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Command line (`preprocess.py --recipe scgpt ...` lands here)
# ---------------------------------------------------------------------------------------------------------------------


def reference_genes(path: str) -> list[str]:
    """The genes of a transformer checkpoint's vocabulary (read with weights_only=True)."""
    from transformer_model import load_transformer

    return load_transformer(path)[1].genes


def get_args_parser(add_help: bool = True):
    import argparse

    from utils import str2bool

    parser = argparse.ArgumentParser(
        "scGPT recipe: raw counts -> HVG-restricted, per-cell binned values for the transformer", add_help=add_help
    )
    parser.add_argument("--recipe", default="scgpt", choices=["scgpt"], help="this recipe (from preprocess.py)")
    parser.add_argument("--data_path", required=True, nargs="+",
                        help="raw counts: .h5ad, 10x folder or .h5, or a table; several inputs or a folder of them "
                        "with --out_format shards (read in row blocks: scgpt_stream.py)")
    parser.add_argument("--out_path", default=None, help="output .h5ad (default: <input>_scgpt.h5ad)")
    parser.add_argument("--ref", default=None,
                        help="a transformer checkpoint: use its vocabulary's genes instead of choosing HVGs")
    parser.add_argument("--n_hvg", type=int, default=1200, help="highly variable genes to keep (scLLM: 1200)")
    parser.add_argument("--hvg_batch_key", default="donor_id",
                        help="obs column of each cell's sample for seurat_v3 HVGs ('none' for no batches)")
    parser.add_argument("--hvg_span", type=float, default=1.0,
                        help="loess span of seurat_v3 (scLLM ran 1.0; scanpy's default is 0.3)")
    parser.add_argument("--n_bins", type=int, default=51, help="bins including 0 (scGPT: 51)")
    parser.add_argument("--counts_layer", default=None, help="layer holding the counts (default: X)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random spreading of tied values")
    parser.add_argument("--overwrite", type=str2bool, default=False, help="replace an existing --out_path")
    parser.add_argument("--out_format", default="h5ad", choices=["h5ad", "shards"],
                        help="h5ad (one input, in memory), or shards: a folder of memory-mapped shards of the bins "
                        "(shards.py), the inputs read in row blocks, HVGs from per-batch sums over two passes "
                        "(scgpt_stream.py, hvg.py)")
    parser.add_argument("--cells_per_shard", type=int, default=65536, help="cells per shard of --out_format shards")
    parser.add_argument("--block_cells", type=int, default=16384,
                        help="with --out_format shards: cells read per block (memory grows with it, not with the "
                        "number of cells) (default: %(default)s)")
    return parser


def _recipe_params(*, n_hvg, hvg_batch_key, span, n_bins, target_sum, seed, gene_source, where) -> dict:
    return {"recipe": "scgpt", "n_hvg": int(n_hvg), "hvg_batch_key": hvg_batch_key or "", "hvg_span": float(span),
            "n_bins": int(n_bins), "target_sum": float(target_sum), "seed": int(seed), "genes": gene_source,
            "counts_from": where}


def write_scgpt_shards(out: ad.AnnData, folder: str, *, cells_per_shard: int, overwrite: bool = False) -> dict:
    """The recipe's bins (X) and obs as a shard folder of kind "scgpt"; parameters and summary in the manifest."""
    from shards import ShardWriter

    uns = out.uns[SCGPT_UNS_KEY]
    writer = ShardWriter(folder, out.var_names, kind="scgpt", params=dict(uns["params"]),
                         cells_per_shard=cells_per_shard)
    x = sp.csr_matrix(out.X)
    for start in range(0, out.n_obs, cells_per_shard):
        stop = min(start + cells_per_shard, out.n_obs)
        writer.add(x[start:stop], out.obs.iloc[start:stop])
    return writer.close({k: int(v) for k, v in uns["summary"].items()}, overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the recipe on one file and write the output; returns the summary."""
    import os

    from preprocess import check_out_path, check_positive_sizes, input_paths, read_input, write_h5ad_atomic

    args = get_args_parser().parse_args(argv)
    check_positive_sizes(args)
    shards = args.out_format == "shards"
    paths = input_paths(args.data_path)
    stem = os.path.splitext(os.path.normpath(args.data_path[0]))[0]
    out_path = args.out_path or (f"{stem}_scgpt_shards" if shards else f"{stem}_scgpt.h5ad")
    for path in args.data_path:
        check_out_path(path, out_path, args.overwrite, shards=shards)
    genes = reference_genes(args.ref) if args.ref else None
    batch_key = None if str(args.hvg_batch_key).lower() == "none" else args.hvg_batch_key
    if shards:
        from scgpt_stream import stream_scgpt

        summary = stream_scgpt(paths, out_path, n_hvg=args.n_hvg, hvg_batch_key=batch_key, span=args.hvg_span,
                               n_bins=args.n_bins, seed=args.seed, genes=genes, counts_layer=args.counts_layer,
                               block_cells=args.block_cells, cells_per_shard=args.cells_per_shard,
                               overwrite=args.overwrite)
        print(f"wrote {out_path}: {summary['cells_out']} cells x {summary['genes_out']} genes "
              f"({summary['genes_found']} found), bins 1..{args.n_bins - 1}")
        return summary
    if len(paths) > 1:
        raise ScbertError(f"--data_path names {len(paths)} inputs: the in-memory recipe takes one; pass "
                          "--out_format shards to preprocess them together in row blocks")
    adata = read_input(paths[0])
    out = preprocess_scgpt(adata, n_hvg=args.n_hvg, hvg_batch_key=batch_key, span=args.hvg_span, n_bins=args.n_bins,
                           seed=args.seed, genes=genes, counts_layer=args.counts_layer)
    out.uns[SCGPT_UNS_KEY]["params"]["input"] = os.path.abspath(paths[0])
    summary = dict(out.uns[SCGPT_UNS_KEY]["summary"])
    write_h5ad_atomic(out, out_path)
    print(f"wrote {out_path}: {out.n_obs} cells x {out.n_vars} genes ({summary['genes_found']} found), bins "
          f"1..{args.n_bins - 1} in X, log1p(CP10K) in layers[{NORMALISED_LAYER!r}]")
    return summary


def scgpt_source(argv: Sequence[str], source, out_path: str) -> dict:
    """Another module's counts (a `preprocess.CountSource`, e.g. census.py's query) through the recipe into a shard
    folder, with this recipe's flags `argv`; each pass reads the source again. Returns the summary."""
    from preprocess import check_positive_sizes
    from scgpt_stream import stream_scgpt

    args = get_args_parser().parse_args(["--data_path", source.name or "counts", "--out_path", out_path, *argv])
    check_positive_sizes(args)
    if args.out_format != "shards":
        raise ScbertError("a streamed source is written as shards: pass --out_format shards")
    batch_key = None if str(args.hvg_batch_key).lower() == "none" else args.hvg_batch_key
    summary = stream_scgpt([source], out_path, n_hvg=args.n_hvg, hvg_batch_key=batch_key, span=args.hvg_span,
                           n_bins=args.n_bins, seed=args.seed, genes=reference_genes(args.ref) if args.ref else None,
                           counts_layer=args.counts_layer, block_cells=args.block_cells,
                           cells_per_shard=args.cells_per_shard, overwrite=args.overwrite)
    print(f"wrote {out_path}: {summary['cells_out']} cells x {summary['genes_out']} genes, bins 1..{args.n_bins - 1}")
    return summary


if __name__ == "__main__":
    from utils import run_cli

    run_cli(main)


def read_binned(path: str, *, genes: Sequence[str] | None = None, fix_genes: str | None = None) -> ad.AnnData:
    """Read a `preprocess.py --recipe scgpt` output (X = bins) and check it; genes: the model's, in order.

    Raises ScbertError for a missing file, a file without uns['scgpt_preprocess'] (not binned by this recipe), or
    other genes than `genes`."""
    import os

    from utils import check_gene_order

    if not os.path.isfile(path):
        raise ScbertError(f"data file {path!r} does not exist: check --data_path")
    try:
        adata = ad.read_h5ad(path)
    except Exception as err:  # h5py and anndata raise many types for foreign files
        raise ScbertError(f"could not read {path!r} as an .h5ad file ({type(err).__name__}): pass the output of "
                          "preprocess.py --recipe scgpt") from err
    if SCGPT_UNS_KEY not in adata.uns:
        raise ScbertError(f"{path!r} is not binned for the transformer (no uns[{SCGPT_UNS_KEY!r}]): run preprocess.py "
                          "--recipe scgpt on the raw counts first")
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    if genes is not None:
        check_gene_order(adata.var_names, genes, data_name=repr(path),
                         fix=fix_genes or "run preprocess.py --recipe scgpt --ref <checkpoint> on the raw counts")
    return adata
