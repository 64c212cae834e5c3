"""Time and peak memory of building gene2vec embeddings (gene2vec.py) from co-expression.

Cases: scanpy's pbmc68k_reduced as integer counts (700 cells x 765 genes) and a synthetic sparse count matrix of
20,000 cells x 16,906 genes (~9% non-zeros) with planted co-expression modules. Each case runs in a fresh child
process so that its peak RSS (VmHWM, see peak_rss_mib) is its own; the child times each stage (read + log-normalise,
blockwise pair search, word2vec, alignment) and records the pair search's peak allocation with tracemalloc.

Baseline, measured in the same run: the naive search, dense `np.corrcoef` over all genes at once, on pbmc68k and on a
4,000-gene slice of the synthetic matrix (all 16,906 genes would need ~5 GB for the float64 copy and the matrix of
correlations), with the blockwise search on the same slice; both must find the same pairs.

    .venv/bin/python benchmarks/bench_gene2vec.py            # both cases, a few minutes on 2 cores
    .venv/bin/python benchmarks/bench_gene2vec.py --cells 2000 --genes 3000   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gene2vec  # noqa: E402
from genes import read_reference_genes  # noqa: E402


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this program's own address space. getrusage's
    ru_maxrss would be wrong here: it keeps the parent's peak across fork and exec, so every child would report at
    least the memory of the benchmark that started it.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def synthetic_counts(n_cells: int, n_genes: int, *, n_modules: int, module_size: int, seed: int = 0):
    """Poisson counts (cells, genes) with `n_modules` planted modules of `module_size` genes each.

    Every gene has a log-normal base rate (detection 1-40%, ~9% of entries non-zero overall); a module switches on in
    a random 10% of cells and adds a rate of 2 to its genes there, so its genes correlate (r ~ 0.5), as a cell-type
    programme does. Generated in chunks of cells, so memory stays near the size of the sparse result.
    Returns (CSR float32 counts, module of each gene or -1).
    """
    rng = np.random.default_rng(seed)
    base = np.exp(rng.normal(np.log(0.045), 0.9, size=n_genes)).clip(0.003, 0.5)
    modules = np.full(n_genes, -1)
    module_genes = rng.permutation(n_genes)[: n_modules * module_size]
    modules[module_genes] = np.repeat(np.arange(n_modules), module_size)
    active = rng.random((n_cells, n_modules)) < 0.10
    chunks = []
    for start in range(0, n_cells, 1000):
        stop = min(start + 1000, n_cells)
        rate = np.broadcast_to(base, (stop - start, n_genes)).copy()
        rate[:, module_genes] += 2.0 * active[start:stop][:, modules[module_genes]]
        rate *= rng.lognormal(0.0, 0.3, size=(stop - start, 1))  # cell size
        chunks.append(sp.csr_matrix(rng.poisson(rate).astype(np.float32)))
    return sp.vstack(chunks, format="csr"), modules


def write_h5ad(path: str, X: sp.csr_matrix, symbols) -> None:
    import anndata as ad

    adata = ad.AnnData(X=X)
    adata.var_names = list(symbols)
    adata.obs_names = [f"c{i}" for i in range(X.shape[0])]
    adata.write_h5ad(path)


# ---------------------------------------------------------------------------------------------------------------
# Child: one case, stage by stage


def cpu_seconds() -> float:
    """CPU time of this process, all threads (BLAS included): less affected than wall time by a busy machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Stage:
    """Adds the wall and CPU seconds of a `with` block to `timings[name]` and `cpu[name]`."""

    def __init__(self, name: str, timings: dict, cpu: dict):
        self.name, self.timings, self.cpu = name, timings, cpu

    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), cpu_seconds()

    def __exit__(self, *exc):
        self.timings[self.name] = time.perf_counter() - self.wall0
        self.cpu[self.name] = cpu_seconds() - self.cpu0


def run_case(path: str, ref: str | None, modules_path: str | None, block_size: int) -> dict:
    baseline_rss = peak_rss_mib()
    timings, cpu = {}, {}
    with Stage("read", timings, cpu):
        X, symbols, info = gene2vec.read_expression(path)

    tracemalloc.start()
    with Stage("pairs", timings, cpu):
        first, second, r, tested = gene2vec.correlated_gene_pairs(X, block_size=block_size)
    pair_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    pairs = [(symbols[i], symbols[j]) for i, j in zip(first.tolist(), second.tolist(), strict=True)]

    with Stage("word2vec", timings, cpu):
        n_genes = len({g for p in pairs for g in p})
        epochs = gene2vec.auto_epochs(len(pairs), n_genes)
        vectors = gene2vec.train_gene2vec(pairs, epochs=epochs)

    with Stage("align", timings, cpu):
        reference = read_reference_genes(ref)
        table, n_missing = gene2vec.align_to_reference(vectors, reference)

    quality = {}
    if modules_path:  # planted modules: cosine within vs between modules
        modules = dict(zip(symbols, np.load(modules_path).tolist(), strict=True))
        names = [g for g in vectors if modules[g] >= 0]
        M = np.stack([vectors[g] for g in names])
        M /= np.linalg.norm(M, axis=1, keepdims=True)
        cos = M @ M.T
        lab = np.array([modules[g] for g in names])
        same = (lab[:, None] == lab[None]) & ~np.eye(len(names), dtype=bool)
        quality = {"cos_within": float(cos[same].mean()), "cos_between": float(cos[lab[:, None] != lab[None]].mean())}
    else:  # real data: does the cosine of the vectors follow the genes' correlation?
        from scipy.stats import spearmanr

        index = {g: i for i, g in enumerate(symbols)}
        cols = [index[g] for g in vectors]
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.corrcoef(X[:, cols].toarray().T)
        M = np.stack(list(vectors.values()))
        M /= np.linalg.norm(M, axis=1, keepdims=True)
        upper = np.triu_indices(len(cols), 1)
        quality = {"spearman_cos_r": float(spearmanr((M @ M.T)[upper], corr[upper])[0])}
    return {
        "cells": info["cells"], "genes": info["genes"], "nnz_fraction": X.nnz / (X.shape[0] * X.shape[1]),
        "genes_tested": tested, "pairs": len(pairs), "genes_with_vector": len(vectors), "epochs": epochs,
        "reference": len(reference), "missing": n_missing, "table_shape": list(table.shape),
        "timings": timings, "cpu": cpu, "pair_search_tracemalloc_mib": pair_peak,
        "baseline_rss_mib": baseline_rss, "peak_rss_mib": peak_rss_mib(), **quality,
    }


def child(case: str, *args: str) -> dict:
    command = [sys.executable, __file__, "--child", case, *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# Baseline: dense np.corrcoef


def dense_baseline(X: sp.csr_matrix, block_size: int) -> dict:
    """Dense np.corrcoef of all genes vs the blockwise search on the same matrix: time, memory, same pairs."""
    X = gene2vec.log_normalise(X)
    tracemalloc.start()
    t0 = time.perf_counter()
    dense = X.toarray()
    expressed = (dense > 0).sum(axis=0)
    keep = np.flatnonzero((expressed >= gene2vec.DEFAULT_MIN_CELLS) & (dense.std(axis=0) > 0))
    corr = np.corrcoef(dense[:, keep].T)
    i, j = np.nonzero(np.triu(corr >= gene2vec.DEFAULT_THRESHOLD, k=1))
    dense_pairs = set(zip(keep[i].tolist(), keep[j].tolist(), strict=True))
    dense_s = time.perf_counter() - t0
    dense_mib = tracemalloc.get_traced_memory()[1] / 2**20
    del dense, corr
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    first, second, r, _ = gene2vec.correlated_gene_pairs(X, block_size=block_size, max_pairs=0)
    block_s = time.perf_counter() - t0
    block_mib = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    block_pairs = set(zip(first.tolist(), second.tolist(), strict=True))
    # float32 products may move a pair sitting exactly at the threshold: tolerate only those.
    differ = dense_pairs ^ block_pairs
    return {"shape": X.shape, "dense_s": dense_s, "dense_mib": dense_mib, "block_s": block_s, "block_mib": block_mib,
            "pairs": len(block_pairs), "pairs_differing": len(differ)}


# ---------------------------------------------------------------------------------------------------------------


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help)
    parser.add_argument("--cells", type=int, default=20_000, help="synthetic cells (default: 20000)")
    parser.add_argument("--genes", type=int, default=16_906, help="synthetic genes (default: 16906)")
    parser.add_argument("--modules", type=int, default=500, help="planted modules (default: 500)")
    parser.add_argument("--module_size", type=int, default=10, help="genes per module (default: 10)")
    parser.add_argument("--baseline_genes", type=int, default=4000,
                        help="genes of the synthetic slice the dense baseline runs on (default: 4000)")
    parser.add_argument("--block_size", type=int, default=gene2vec.DEFAULT_BLOCK_SIZE,
                        help="genes per block of the search (default: %(default)s)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.child:
        _case, path, ref, modules_path = args.child
        result = run_case(path, None if ref == "NONE" else ref, None if modules_path == "NONE" else modules_path,
                          args.block_size)
        print(json.dumps(result))
        return

    import preprocess

    print(f"gene2vec benchmark: {os.cpu_count()} CPUs, block_size {args.block_size}, defaults threshold "
          f"{gene2vec.DEFAULT_THRESHOLD}, min_cells {gene2vec.DEFAULT_MIN_CELLS}, dim 200, auto passes, 1 worker")
    rows = {}
    baselines = {}
    with tempfile.TemporaryDirectory() as tmp:
        pbmc = preprocess.load_pbmc68k_counts()
        pbmc_path = os.path.join(tmp, "pbmc68k_counts.h5ad")
        write_h5ad(pbmc_path, sp.csr_matrix(pbmc.X), pbmc.var_names)
        baselines["pbmc68k_reduced"] = dense_baseline(sp.csr_matrix(pbmc.X), args.block_size)
        rows["pbmc68k_reduced"] = child("pbmc", pbmc_path, "NONE", "NONE", "--block_size", str(args.block_size))

        t0 = time.perf_counter()
        symbols = read_reference_genes(None)[: args.genes]
        X, modules = synthetic_counts(args.cells, len(symbols), n_modules=args.modules, module_size=args.module_size)
        syn_path = os.path.join(tmp, "synthetic.h5ad")
        write_h5ad(syn_path, X, symbols)
        modules_path = os.path.join(tmp, "modules.npy")
        np.save(modules_path, modules)
        ref_path = os.path.join(tmp, "ref.txt")
        Path(ref_path).write_text("\n".join(symbols) + "\n")
        print(f"synthetic data: {X.shape[0]} x {X.shape[1]}, {X.nnz / (X.shape[0] * X.shape[1]):.1%} non-zero, "
              f"generated and written in {time.perf_counter() - t0:.0f} s")
        name = f"synthetic {X.shape[0]} x {X.shape[1]}"
        baselines[name] = dense_baseline(X[:, : args.baseline_genes], args.block_size)
        del X
        rows[name] = child("synthetic", syn_path, ref_path, modules_path, "--block_size", str(args.block_size))

    print()
    header = (f"{'case':<24} {'cells':>6} {'genes':>6} {'nnz':>5} {'pairs':>6} {'vectors':>7} {'passes':>6} "
              f"{'read s':>6} {'pairs s':>7} {'w2v s':>6} {'total s':>7} {'CPU s':>6} {'search MiB':>10} "
              f"{'peak RSS MiB':>12}")
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        t = row["timings"]
        print(f"{name:<24} {row['cells']:>6} {row['genes']:>6} {row['nnz_fraction']:>5.1%} {row['pairs']:>6} "
              f"{row['genes_with_vector']:>7} {row['epochs']:>6} {t['read']:>6.1f} {t['pairs']:>7.1f} "
              f"{t['word2vec']:>6.1f} {sum(t.values()):>7.1f} {sum(row['cpu'].values()):>6.1f} "
              f"{row['pair_search_tracemalloc_mib']:>10.0f} {row['peak_rss_mib']:>12.0f}")
    print("(seconds are wall time, CPU s all threads; search MiB: tracemalloc peak of the pair search; peak RSS: "
          f"whole child process, {rows['pbmc68k_reduced']['baseline_rss_mib']:.0f} MiB of it after imports; "
          f"pair search CPU s: " + ", ".join(f"{row['cpu']['pairs']:.1f}" for row in rows.values()) + ")")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other work slows wall time)")
    for name, row in rows.items():
        if "cos_within" in row:
            print(f"{name}: mean cosine within planted modules {row['cos_within']:.2f}, between "
                  f"{row['cos_between']:.2f}; {row['missing']} of {row['reference']} reference genes without a "
                  "vector (zero fallback)")
        else:
            print(f"{name}: Spearman(cosine of vectors, Pearson r of genes) {row['spearman_cos_r']:.2f}; "
                  f"{row['missing']} of {row['reference']} default reference genes without a vector")
    print()
    print("baseline: dense np.corrcoef of all genes at once vs the blockwise search, same matrix, same pairs")
    for name, b in baselines.items():
        print(f"{name:<24} {b['shape'][0]:>6} x {b['shape'][1]:<6} dense {b['dense_s']:6.1f} s "
              f"{b['dense_mib']:7.0f} MiB | blockwise {b['block_s']:6.1f} s {b['block_mib']:7.0f} MiB | "
              f"{b['pairs']} pairs, {b['pairs_differing']} differing")


if __name__ == "__main__":
    main()
