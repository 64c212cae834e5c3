"""Preprocessing throughput on a synthetic 100,000-cell x 33,000-gene sparse count matrix, and peak memory.

    python benchmarks/bench_preprocess.py                       # the full size (about 1 minute, about 4 GB)
    python benchmarks/bench_preprocess.py --cells 20000         # quicker

Compares, in the same run, `preprocess.align_to_reference` (one sparse product) with a plain per-gene loop
(look up each reference gene's column and copy it into a dense cells x reference matrix, the way the reference
code aligns). The loop is timed on two random subsamples of cells and extrapolated to the full size with a
straight line (said in the output); its dense output alone would not fit in memory at full size. Figures are
printed, nothing is asserted.

Synthetic data: gene names drawn from the NCBI table (current protein-coding and non-coding symbols, outdated
symbols, unknown names, shuffled), `--genes_per_cell` genes per cell chosen uniformly (duplicates merged), counts
geometric (1, 2, 3, ...). The reference is the shipped default list (20,598 protein-coding genes).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from genes import GeneTable, load_gene_table, read_reference_genes  # noqa: E402
from preprocess import align_to_reference, gene_column_map, preprocess_adata  # noqa: E402
from utils import run_cli  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Benchmark preprocess.py against a per-gene loop", add_help=add_help)
    parser.add_argument("--cells", type=int, default=100_000, help="cells in the synthetic matrix")
    parser.add_argument("--genes", type=int, default=33_000, help="genes (columns) in the synthetic matrix")
    parser.add_argument("--genes_per_cell", type=int, default=1_000, help="expressed genes per cell (10x PBMC-like)")
    parser.add_argument(
        "--baseline_cells", type=int, default=4_000, help="the loop is timed on this many and half as many cells"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def synthetic_gene_names(table: GeneTable, n_genes: int, rng: np.random.Generator) -> list[str]:
    """Mostly current symbols (60% protein-coding), 3% outdated symbols of protein-coding genes, 6% unknown names."""
    coding = table.protein_coding()
    other = sorted(s for s, t in table.gene_type.items() if t != "protein-coding")
    outdated = sorted(n for n, t in table.synonym_to_current.items() if len(t) == 1 and not table.is_current(n))
    n_old, n_unknown = int(0.03 * n_genes), int(0.06 * n_genes)
    n_coding = min(len(coding), int(0.6 * n_genes))
    n_other = n_genes - n_coding - n_old - n_unknown
    names = (
        list(rng.choice(coding, n_coding, replace=False))
        + list(rng.choice(other, n_other, replace=False))
        + list(rng.choice(outdated, n_old, replace=False))
        + [f"UNKNOWN-{i}" for i in range(n_unknown)]
    )
    rng.shuffle(names)
    return [str(n) for n in names]


def synthetic_counts(n_cells: int, n_genes: int, per_cell: int, rng: np.random.Generator) -> sp.csr_matrix:
    """(n_cells, n_genes) CSR float32 of integer counts, about `per_cell` non-zeros per row, built without loops."""
    indptr = np.arange(n_cells + 1, dtype=np.int64) * per_cell
    indices = rng.integers(0, n_genes, size=n_cells * per_cell, dtype=np.int32)
    data = rng.geometric(0.6, size=n_cells * per_cell).astype(np.float32)  # counts 1, 2, 3... (mean 1.7)
    x = sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))
    x.sum_duplicates()  # sorts each row and merges repeated genes
    return x


def per_gene_loop_align(x: sp.csr_matrix, col_to_ref: np.ndarray, n_ref: int) -> sp.csr_matrix:
    """Baseline: for each reference gene, find its column and copy it into a dense (cells, n_ref) matrix."""
    source_column = {}
    for i, j in enumerate(col_to_ref.tolist()):
        if j >= 0 and j not in source_column:
            source_column[j] = i
    x_csc = x.tocsc()
    dense = np.zeros((x.shape[0], n_ref), dtype=np.float32)
    for j in range(n_ref):
        i = source_column.get(j)
        if i is not None:
            dense[:, j] = x_csc[:, i].toarray().ravel()
    return sp.csr_matrix(dense)


def timed(fn, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process): CPU time stays honest on a busy shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def rate(cells: int, wall: float, cpu: float) -> str:
    return f"{wall:.2f}s wall / {cpu:.2f}s CPU = {cells / wall:,.0f} cells/s wall, {cells / cpu:,.0f} per CPU-second"


def rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matrix_gb(x: sp.csr_matrix) -> float:
    return (x.data.nbytes + x.indices.nbytes + x.indptr.nbytes) / 2**30


def baseline_alignment(x, col_to_ref, n_ref: int, args, rng) -> float:
    """The per-gene loop's CPU seconds for all `args.cells` cells, extrapolated from two subsamples (checked equal to
    the vectorised alignment on them)."""
    # Baseline on two subsamples: its time is a per-gene overhead plus a per-cell part, so fit t = a + b * cells
    # on CPU time and extrapolate (scaling one subsample linearly would overstate it). Ours on the same rows too.
    sizes = sorted({max(1, min(args.baseline_cells, args.cells) // 2), min(args.baseline_cells, args.cells)})
    loop_cpu = []
    for size in sizes:
        rows = np.sort(rng.choice(args.cells, size=size, replace=False))
        sub = x[rows]
        loop, l_wall, l_cpu = timed(per_gene_loop_align, sub, col_to_ref, n_ref)
        ours, o_wall, o_cpu = timed(align_to_reference, sub, col_to_ref, n_ref)
        assert abs(loop - ours).max() == 0, "baseline and vectorised alignment disagree"
        loop_cpu.append(l_cpu)
        print(
            f"per-gene loop alignment on {size:,} sampled cells: {l_wall:.2f}s wall / {l_cpu:.2f}s CPU "
            f"(vectorised on the same cells: {o_wall:.3f}s wall / {o_cpu:.3f}s CPU)"
        )
    if len(sizes) == 2:
        per_cell = max((loop_cpu[1] - loop_cpu[0]) / (sizes[1] - sizes[0]), 0.0)
        overhead = max(loop_cpu[1] - per_cell * sizes[1], 0.0)
    else:
        per_cell, overhead = loop_cpu[0] / sizes[0], 0.0
    loop_full = overhead + per_cell * args.cells
    print(
        f"per-gene loop alignment extrapolated to {args.cells:,} cells ({overhead:.2f}s + {per_cell * 1e3:.3f}ms "
        f"per cell, CPU): {loop_full:.0f}s CPU = {args.cells / loop_full:,.0f} cells per CPU-second; not run at full "
        f"size: its dense float32 output alone would need {args.cells * n_ref * 4 / 2**30:.1f} GiB"
    )
    return loop_full


def main(argv: Sequence[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    table = load_gene_table()
    reference = read_reference_genes(None)
    names = synthetic_gene_names(table, args.genes, rng)
    x, t_make, _ = timed(synthetic_counts, args.cells, args.genes, args.genes_per_cell, rng)
    adata = ad.AnnData(
        X=x, obs=pd.DataFrame(index=[f"cell{i}" for i in range(args.cells)]), var=pd.DataFrame(index=names)
    )
    print(
        f"synthetic input: {args.cells:,} cells x {args.genes:,} genes, {x.nnz:,} non-zeros "
        f"({matrix_gb(x):.2f} GiB as CSR), made in {t_make:.1f}s; reference: {len(reference):,} genes"
    )
    print(f"process peak RSS after building the input: {rss_gb():.2f} GiB")

    # Warm-up on a few cells (imports, lazily built case-insensitive indexes), so timings below are steady-state.
    preprocess_adata(adata[:200].copy(), reference, table=table, min_genes=0)

    # Vectorised, stage by stage (the same functions preprocess_adata calls), then the whole of preprocess_adata:
    # count check, revision, alignment, min_genes filter, normalise, log1p.
    (col_to_ref, counts, _), map_wall, map_cpu = timed(gene_column_map, names, reference, table, "first")
    aligned, align_wall, align_cpu = timed(align_to_reference, x, col_to_ref, len(reference))
    del aligned
    (out, summary), full_wall, full_cpu = timed(preprocess_adata, adata, reference, table=table)
    print(
        f"revision: {counts['genes_revised']:,} revised, {counts['genes_dropped']:,} dropped; reference coverage "
        f"{counts['coverage']:.1%}; {summary['cells_out']:,} cells out, {out.X.nnz:,} non-zeros"
    )
    print(f"gene map (revision of {args.genes:,} names + reference): {map_wall:.2f}s wall / {map_cpu:.2f}s CPU")
    print(f"vectorised alignment: {rate(args.cells, align_wall, align_cpu)}")
    print(
        f"vectorised preprocess_adata (check + revise + align + filter + normalise + log1p): "
        f"{rate(args.cells, full_wall, full_cpu)}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        _, write_wall, write_cpu = timed(out.write_h5ad, os.path.join(tmp, "out.h5ad"))
    print(f"plus writing the output .h5ad: {rate(args.cells, full_wall + write_wall, full_cpu + write_cpu)}")
    del out

    # Peak extra memory of preprocess_adata, beyond its input, from numpy/scipy array allocations.
    tracemalloc.start()
    result = preprocess_adata(adata, reference, table=table)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del result
    print(
        f"preprocess_adata peak extra memory (tracemalloc): {traced_peak / 2**30:.2f} GiB "
        f"(input {matrix_gb(x):.2f} GiB); process peak RSS so far: {rss_gb():.2f} GiB"
    )

    loop_full = baseline_alignment(x, col_to_ref, len(reference), args, rng)
    print(f"alignment speed-up, vectorised over the per-gene loop (CPU time): x{loop_full / align_cpu:.1f}")
    print(f"process peak RSS: {rss_gb():.2f} GiB")
    return {
        "cells_per_cpu_s": args.cells / full_cpu,
        "align_cells_per_cpu_s": args.cells / align_cpu,
        "loop_cells_per_cpu_s": args.cells / loop_full,
        "traced_peak_gib": traced_peak / 2**30,
    }


if __name__ == "__main__":
    run_cli(main)
