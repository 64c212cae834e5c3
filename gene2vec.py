"""Gene2vec embeddings for scBERT's gene embedding: build them from co-expression, or convert the published ones.

scBERT adds a frozen gene2vec row to each gene's token so the model knows which gene a token is (SPEC section 2);
the paper's `gene2vec_16906.npy` was never published. Gene2vec (Du et al., BMC Genomics 2019) is word2vec skip-gram
trained on pairs of strongly co-expressed genes, so this script rebuilds such a table from the user's own data:

    python gene2vec.py --data_path A.h5ad [B.h5ad ...] --ref REF --out_path gene2vec.npy

1. Each `.h5ad` (raw counts, log-normalised data, or `preprocess.py` output) is log-normalised if it holds counts
   (`normalize_total` to 1e4, then log2(1 + x)); raw inputs have their symbols revised like `preprocess.py` does.
2. In each file separately, Pearson correlation over cells is computed blockwise for genes expressed in at least
   `--min_cells` cells; pairs with r >= `--threshold` are kept (at most `--max_pairs` per file, the strongest).
3. The pairs of all files are pooled and skip-gram word2vec is trained on them with Gene2vec's settings (window 1,
   min_count 1, negative sampling, passes with the pairs reshuffled before each pass; by default as many passes
   as give the average gene about 1,000 updates, at least Gene2vec's 10).
   Besides, each gene's `--partners` (5) strongest positive correlations are kept whatever the threshold, so every
   gene expressed in `--min_cells` cells trains.
4. The vectors are put in the reference gene order; reference genes without a vector get the `--fallback` row
   (by default a distinct seeded random row, so every reference gene has its own identity).

Or convert the published Gene2vec text release (one gene symbol then its vector per line):

    python gene2vec.py --from_txt gene2vec_dim_200_iter_9.txt --ref REF --out_path gene2vec.npy

Written: `--out_path`, a float32 `.npy` of shape (n_reference_genes, dim) in reference order (what
`pretrain.py --gene2vec_path` reads), and with `--txt_path` every trained vector in word2vec text format (a header
line `n dim`, then `SYMBOL v1 ... vdim` per gene), which `--from_txt` reads back to align to another reference.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from genes import load_gene_table, read_reference_genes, revise_symbols
from utils import PREPROCESS_UNS_KEY, ScbertError, atomic_write_bytes, first_fractional, run_cli, str2bool

# Pearson r over log-normalised cells. Gene2vec kept only strongly co-expressed pairs of bulk samples; single-cell
# correlations are attenuated by sampling noise (dropouts), so a bulk-strict cut-off keeps almost nothing. r >= 0.3
# is ~8 null standard deviations (1/sqrt(cells)) at 700 cells; on pbmc68k_reduced it keeps the top 0.9% of gene pairs,
# cell-type programmes even at the margin (LCK-IL7R, IL2RG-CD3E, FCGR3A-FPR1), and its vectors follow the
# correlations better than those of 0.4 or 0.5, for a third of the genes instead of a sixth.
DEFAULT_THRESHOLD = 0.3
# A gene seen in a handful of cells can reach any correlation by chance (two genes in the same 3 doublets).
DEFAULT_MIN_CELLS = 10
# Genes per block of the correlation search: memory is about 2 * n_cells * block_size * 4 bytes plus the input.
DEFAULT_BLOCK_SIZE = 1024
# Strongest pairs kept per file: bounds memory and training time when a low threshold lets millions through.
DEFAULT_MAX_PAIRS = 1_000_000
# word2vec's down-sampling of frequent words. Gene2vec kept word2vec's 1e-3, which over the pooled pairs of 984
# datasets touches only hub genes; over the few thousand pairs of a few hundred genes that one dataset gives, every
# gene is above 1e-3 of the corpus, most updates are discarded and the vectors stay near random (pbmc68k_reduced).
DEFAULT_SAMPLE = 0.0
# Average pair updates per gene that --epochs 0 (auto) aims at: on pbmc68k_reduced the cosine of the vectors
# follows the correlation of the genes best (Spearman ~0.75) between ~1,000 and ~2,000; fewer leave vectors near
# their random start, many more let each gene memorise its own partners.
GENE_UPDATES = 1000
FALLBACKS = ("zero", "random")
# Every gene a distinct identity (issue 15): with the threshold alone, 70% of pbmc68k_reduced's genes got the zero
# row, so a token of CD79A and one of NKG7 in the same bin looked the same. Each expressed gene's 5 strongest
# partners put all 736 genes expressed in 10+ cells into training (243 with r >= 0.3 alone); the seeded random row
# gives the rest (genes seen in fewer cells, or absent) a distinct identity. Measured with
# benchmarks/bench_accuracy.py (README, "Gene identity"); the earlier defaults were 0 and zero.
DEFAULT_PARTNERS = 5
DEFAULT_FALLBACK = "random"
# Pairs per gensim training call at least (see train_gene2vec).
_MIN_CALL_PAIRS = 100_000


# ---------------------------------------------------------------------------------------------------------------
# Reading expression


def log_normalise(counts: sp.spmatrix | np.ndarray, *, copy: bool = True) -> sp.csr_matrix:
    """log2(1 + counts * 1e4 / total) per cell, as `preprocess.py` writes it; cells with no counts stay zero.

    counts: (cells, genes) raw counts; with `copy=False` a float32 CSR input is overwritten (saves one copy).
    Returns a float32 CSR matrix of the same shape.
    """
    from preprocess import normalize_log1p  # the project's one log-normalisation

    X = sp.csr_matrix(counts, dtype=np.float32, copy=copy)
    normalize_log1p(X, target_sum=1e4, log_base=2.0)
    X.eliminate_zeros()
    return X


def _first_occurrences(names: Sequence[str | None], preferred: Sequence[bool] | None = None) -> np.ndarray:
    """Positions of one occurrence of each non-None name, in input order: the first one, or the first `preferred`
    one where there is one (the column already named as the current symbol, as preprocess.py keeps)."""
    chosen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name is None:
            continue
        j = chosen.get(name)
        if j is None or (preferred is not None and preferred[i] and not preferred[j]):
            chosen[name] = i
    return np.asarray(sorted(chosen.values()), dtype=np.int64)


def read_expression(path: str, *, table=None) -> tuple[sp.csr_matrix, list[str], dict]:
    """Read one `.h5ad` as log-normalised expression over revised gene symbols.

    `preprocess.py` output (`uns["scbert_preprocess"]`) is used as it is: its genes are already revised reference
    symbols. Otherwise integer-valued X is taken for counts and log-normalised; non-integer, non-negative X is taken
    for log-normalised expression (Pearson r does not depend on the log base); and the symbols are revised against
    NCBI Gene (`genes.revise_symbols`), dropping unknown ones; of names revised to one symbol, the one already
    current wins, else the first (as preprocess.py).

    Returns (X float32 CSC (cells, genes), the layout the pair search reads, so it needs no copy of its own; gene
    symbols; info dict with `kind`, `cells`, `genes_in`, `genes`).
    """
    import anndata

    try:
        adata = anndata.read_h5ad(path)
    except Exception as err:  # h5py, OSError, KeyError...: all mean the same thing to the user
        raise ScbertError(f"cannot read {path} as an .h5ad file ({type(err).__name__}: {err}); "
                          "pass AnnData files of cells x genes") from err
    if adata.X is None or adata.n_obs == 0 or adata.n_vars == 0:
        raise ScbertError(f"{path} holds no expression matrix (X is empty); pass a file with cells x genes in X")
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    del adata.X  # where the line above converted (dense, float64), the original is freed now
    if not np.isfinite(X.data).all():
        raise ScbertError(f"{path} has NaN or infinite values in X; fix the input (or rerun preprocess.py on it)")
    names = [str(name) for name in adata.var_names]
    info = {"path": path, "cells": int(adata.n_obs), "genes_in": len(names)}
    if PREPROCESS_UNS_KEY in adata.uns:
        info["kind"] = "preprocessed"
        keep = _first_occurrences(names)
    else:
        data = X.data
        if data.size and float(data.min()) < 0:
            raise ScbertError(f"{path} has negative values in X (scaled data?); pass raw counts or the output of "
                              "preprocess.py")
        # All whole numbers means counts, however small (utils.looks_like_counts also wants values above 30, to
        # avoid calling small log values counts; log2(1 + CP10K) values are practically never all whole).
        if first_fractional(data) is None:
            info["kind"] = "counts"
            X = log_normalise(X, copy=False)  # X is this function's own (adata is dropped on return)
        else:
            info["kind"] = "log-normalised"
        revised, _report = revise_symbols(names, table)
        keep = _first_occurrences(revised, [new == name for new, name in zip(revised, names, strict=True)])
        names = [str(s) for s in revised]
    if keep.size == 0:
        raise ScbertError(f"no gene symbol of {path} is a known gene; pass a file whose var_names are gene symbols")
    X = X.tocsc()
    if keep.size < len(names):
        X = X[:, keep]
    symbols = [names[i] for i in keep]
    info["genes"] = len(symbols)
    return X, symbols, info


# ---------------------------------------------------------------------------------------------------------------
# Co-expressed pairs


def _column_moments(X: sp.csc_matrix, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per gene: number of cells with a non-zero value, mean and standard deviation over all cells (float64).

    Sums run in float64 over one block of columns at a time, so no copy of the whole matrix is made.
    """
    n_cells, n_genes = X.shape
    expressed = np.diff(X.indptr)
    sums = np.zeros(n_genes)
    sumsq = np.zeros(n_genes)
    for start in range(0, n_genes, block_size):
        stop = min(start + block_size, n_genes)
        lo, hi = X.indptr[start], X.indptr[stop]
        data = X.data[lo:hi].astype(np.float64)
        bounds = X.indptr[start : stop + 1] - lo
        cumsum = np.concatenate([[0.0], np.cumsum(data)])
        cumsq = np.concatenate([[0.0], np.cumsum(data * data)])
        sums[start:stop] = cumsum[bounds[1:]] - cumsum[bounds[:-1]]
        sumsq[start:stop] = cumsq[bounds[1:]] - cumsq[bounds[:-1]]
    mean = sums / n_cells
    var = np.maximum(sumsq / n_cells - mean * mean, 0.0)
    return expressed, mean, np.sqrt(var)


def _standardised_block(X: sp.csc_matrix, start: int, stop: int, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Columns start:stop of X as a dense (cells, stop - start) float32 block (x - mean) / (std * sqrt(cells)),
    whose Gram matrix is Pearson r. Filled straight from the CSC arrays (scipy's column indexing costs more than
    the products on blocks of a few hundred genes)."""
    lo, hi = X.indptr[start], X.indptr[stop]
    block = np.zeros((X.shape[0], stop - start), dtype=np.float32)
    columns = np.repeat(np.arange(stop - start), np.diff(X.indptr[start : stop + 1]))
    block[X.indices[lo:hi], columns] = X.data[lo:hi]
    block -= mean[start:stop].astype(np.float32)
    block *= (1.0 / scale[start:stop]).astype(np.float32)
    return block


def correlated_gene_pairs(
    X: sp.spmatrix | np.ndarray,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    min_cells: int = DEFAULT_MIN_CELLS,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    partners: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Gene pairs whose Pearson correlation over cells is at least `threshold`, as column indices of X.

    X: (cells, genes) log-normalised expression, sparse or dense. Only genes with a non-zero value in at least
    `min_cells` cells (and some variance) take part. Correlations are computed for one block of `block_size` genes
    against the following blocks at a time, with dense float32 products of standardised columns, so memory stays
    about 2 * cells * block_size * 4 bytes beyond X (and a CSC copy of X unless it is CSC float32 with every gene
    tested), whatever the number of genes. Only positive correlations count
    (co-expression). If more than `max_pairs` pairs pass (0: no cap), the strongest `max_pairs` are kept.
    partners k > 0: each tested gene's k strongest positive correlations are kept too, whatever the threshold (so
    every tested gene takes part in training, not only those in a strong programme).

    Returns (first, second, r, n_genes_tested): index arrays with first < second, sorted by (first, second), the
    float32 correlations, and how many genes passed the expression filter.
    """
    if not 0.0 < threshold <= 1.0:
        raise ScbertError(f"--threshold must be in (0, 1], got {threshold}")
    if block_size < 1:
        raise ScbertError(f"--block_size must be positive, got {block_size}")
    X = sp.csc_matrix(X, dtype=np.float32)
    X.eliminate_zeros()
    n_cells = X.shape[0]
    expressed, mean, std = _column_moments(X, block_size)
    tested = np.flatnonzero((expressed >= max(min_cells, 2)) & (std > 1e-8 * np.maximum(np.abs(mean), 1.0)))
    if tested.size < X.shape[1]:
        X = X[:, tested]  # (cells, tested genes): blocks are then contiguous column ranges
    mean, scale = mean[tested], std[tested] * np.sqrt(n_cells)
    cap = max_pairs if max_pairs > 0 else None

    firsts, seconds, values = [], [], []
    held = 0
    n_tested = tested.size
    top = _TopPartners(n_tested, partners) if partners > 0 else None
    starts = range(0, n_tested, block_size)
    for start in tqdm(starts, desc="co-expression", unit="block", disable=not progress, leave=False):
        stop = min(start + block_size, n_tested)
        block_a = _standardised_block(X, start, stop, mean, scale)
        for start_b in range(start, n_tested, block_size):
            stop_b = min(start_b + block_size, n_tested)
            block_b = block_a if start_b == start else _standardised_block(X, start_b, stop_b, mean, scale)
            r = block_a.T @ block_b  # (stop - start, stop_b - start_b) Pearson r
            if top is not None:
                top.update(r, start, start_b, diagonal=start_b == start)
            hits = r >= threshold
            if start_b == start:
                hits = np.triu(hits, k=1)
            rows, cols = np.nonzero(hits)
            if rows.size:
                firsts.append(tested[start + rows])
                seconds.append(tested[start_b + cols])
                values.append(r[rows, cols])
                held += rows.size
            # Prune as we go so that a low threshold cannot hold more than twice the cap in memory.
            if cap is not None and held > 2 * cap:
                firsts, seconds, values = _strongest(firsts, seconds, values, cap)
                held = cap
    first = np.concatenate(firsts) if firsts else np.zeros(0, dtype=np.int64)
    second = np.concatenate(seconds) if seconds else np.zeros(0, dtype=np.int64)
    r = np.concatenate(values) if values else np.zeros(0, dtype=np.float32)
    if cap is not None and first.size > cap:
        [first], [second], [r] = _strongest([first], [second], [r], cap)
    if top is not None:
        extra_first, extra_second, extra_r = top.pairs()
        first = np.concatenate([first, tested[extra_first]])
        second = np.concatenate([second, tested[extra_second]])
        r = np.concatenate([r, extra_r])
        _, unique = np.unique(first * np.int64(len(expressed)) + second, return_index=True)
        first, second, r = first[unique], second[unique], r[unique]
    order = np.lexsort((second, first))
    return first[order], second[order], r[order].astype(np.float32), int(n_tested)


class _TopPartners:
    """Each gene's k largest positive correlations seen so far, over the blocks of the pair search."""

    def __init__(self, n_genes: int, k: int):
        self.k = k
        self.r = np.full((n_genes, k), -np.inf, dtype=np.float32)
        self.j = np.full((n_genes, k), -1, dtype=np.int64)

    def _merge(self, rows: np.ndarray, r: np.ndarray, columns: np.ndarray) -> None:
        # rows: (a,) gene indices; r: (a, b) their correlations with the genes `columns` (b,)
        values = np.concatenate([self.r[rows], r], axis=1)
        index = np.concatenate([self.j[rows], np.broadcast_to(columns, r.shape)], axis=1)
        keep = np.argsort(-values, axis=1, kind="stable")[:, : self.k]
        self.r[rows] = np.take_along_axis(values, keep, axis=1)
        self.j[rows] = np.take_along_axis(index, keep, axis=1)

    def update(self, r: np.ndarray, start_a: int, start_b: int, *, diagonal: bool) -> None:
        """r: (a, b) correlations of genes start_a.. with genes start_b..; both directions are recorded."""
        rows_a = np.arange(start_a, start_a + r.shape[0])
        rows_b = np.arange(start_b, start_b + r.shape[1])
        if diagonal:
            r = r.copy()
            np.fill_diagonal(r, -np.inf)  # a gene is not its own partner
            self._merge(rows_a, r, rows_b)
        else:
            self._merge(rows_a, r, rows_b)
            self._merge(rows_b, r.T, rows_a)

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first, second, r) with first < second, positive correlations only (duplicates possible)."""
        genes = np.repeat(np.arange(self.r.shape[0]), self.k)
        partner, r = self.j.ravel(), self.r.ravel()
        ok = (partner >= 0) & (r > 0)
        genes, partner, r = genes[ok], partner[ok], r[ok]
        return np.minimum(genes, partner), np.maximum(genes, partner), r.astype(np.float32)


def _strongest(firsts: list, seconds: list, values: list, cap: int) -> tuple[list, list, list]:
    """Keep the `cap` pairs with the largest correlation (ties broken by position, so deterministically)."""
    first, second, r = np.concatenate(firsts), np.concatenate(seconds), np.concatenate(values)
    keep = np.sort(np.argsort(-r, kind="stable")[:cap])
    return [first[keep]], [second[keep]], [r[keep]]


def coexpression_pairs(
    X: sp.spmatrix | np.ndarray,
    genes: Sequence[str],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    min_cells: int = DEFAULT_MIN_CELLS,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    partners: int = 0,
) -> list[tuple[str, str]]:
    """Co-expressed gene pairs of one dataset as symbol pairs (see `correlated_gene_pairs` for the search).

    X: (cells, genes) log-normalised expression; genes: the symbol of each column of X.
    """
    if X.shape[1] != len(genes):
        raise ScbertError(f"X has {X.shape[1]} genes but {len(genes)} gene names were given")
    first, second, _r, _tested = correlated_gene_pairs(
        X, threshold=threshold, min_cells=min_cells, block_size=block_size, max_pairs=max_pairs, partners=partners
    )
    return [(genes[i], genes[j]) for i, j in zip(first.tolist(), second.tolist(), strict=True)]


# ---------------------------------------------------------------------------------------------------------------
# Training


class _ShuffledPairs:
    """The pairs in a given order, as gensim's restartable corpus of two-word sentences."""

    def __init__(self, pairs: Sequence[tuple[str, str]], order: np.ndarray):
        self.pairs = pairs
        self.order = order

    def __iter__(self):
        pairs = self.pairs
        for k in self.order.tolist():
            yield pairs[k]


def auto_epochs(n_pairs: int, n_genes: int) -> int:
    """Passes for `--epochs 0`: Gene2vec's 10, or more so that the average gene takes part in about
    `GENE_UPDATES` pair updates (each pair updates both its genes once per pass)."""
    return max(10, -(-GENE_UPDATES * n_genes // max(2 * n_pairs, 1)))


def train_gene2vec(
    pairs: Sequence[tuple[str, str]],
    *,
    dim: int = 200,
    epochs: int | None = None,
    seed: int = 2021,
    workers: int = 1,
    negative: int = 5,
    sample: float = DEFAULT_SAMPLE,
    alpha: float = 0.025,
    min_alpha: float = 1e-4,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Skip-gram word2vec on co-expressed pairs, with Gene2vec's settings: every pair is a two-word sentence,
    window 1, min_count 1, negative sampling (5 noise genes); passes over the pairs, reshuffled before each pass.

    epochs: passes; None or 0 for `auto_epochs` (Gene2vec's 10 passes were over the pairs of 984 datasets; one
    dataset gives thousands, and 10 passes over them leave near-random vectors). The learning rate falls linearly
    from `alpha` to `min_alpha` over all passes (Gene2vec restarted it each pass, an artefact of saving between
    passes).
    sample: word2vec's down-sampling of genes above this share of the corpus (see DEFAULT_SAMPLE).
    With `workers=1` the result depends only on the pairs and `seed` (gensim seeds its own generators; the shuffles
    come from `numpy.random.default_rng(seed)`); more workers are faster but not reproducible.

    Returns {symbol: float32 vector of length dim}, in gensim's vocabulary order (most frequent gene first).
    """
    from gensim.models import Word2Vec

    if len(pairs) == 0:
        raise ScbertError("no co-expressed gene pairs to train on; lower --threshold or --min_cells")
    if dim < 1 or workers < 1 or (epochs is not None and epochs < 0):
        raise ScbertError(f"--dim and --workers must be positive and --epochs 0 (auto) or positive, got {dim}, "
                          f"{workers} and {epochs}")
    model = Word2Vec(
        vector_size=dim, window=1, min_count=1, sg=1, hs=0, negative=negative, sample=sample,
        alpha=alpha, min_alpha=min_alpha, seed=seed, workers=workers,
    )
    model.build_vocab(_ShuffledPairs(pairs, np.arange(len(pairs))))
    if not epochs:
        epochs = auto_epochs(len(pairs), len(model.wv))
    rng = np.random.default_rng(seed)
    # Passes are grouped into gensim calls of at least _MIN_CALL_PAIRS pairs (each call costs milliseconds of thread
    # start-up, which dominates on a few hundred pairs); each pass within a call is still its own reshuffle, and the
    # learning rate falls linearly over all passes.
    per_call = max(1, -(-_MIN_CALL_PAIRS // len(pairs)))
    step = (alpha - min_alpha) / epochs
    bar = tqdm(total=epochs, desc="word2vec", unit="pass", disable=not progress, leave=False)
    done = 0
    while done < epochs:
        passes = min(per_call, epochs - done)
        order = np.concatenate([rng.permutation(len(pairs)) for _ in range(passes)])
        model.train(
            _ShuffledPairs(pairs, order), total_examples=order.size, epochs=1,
            start_alpha=alpha - step * done, end_alpha=alpha - step * (done + passes),
        )
        done += passes
        bar.update(passes)
    bar.close()
    return {key: np.array(model.wv[key], dtype=np.float32) for key in model.wv.index_to_key}


# ---------------------------------------------------------------------------------------------------------------
# Alignment, text format, conversion


def align_to_reference(
    vectors: Mapping[str, np.ndarray],
    reference_genes: Sequence[str],
    *,
    fallback: str = "zero",
    seed: int = 2021,
) -> tuple[np.ndarray, int]:
    """Rows of `vectors` in reference order, the `fallback` row for reference genes without a vector.

    fallback "zero" (default): the zero vector, the row scBERT gives its appended token, so such a gene carries no
    gene identity at all (the model sees only its expression bin), rather than a made-up one. "random": a draw from
    N(0, s^2), s the standard deviation of the known vectors' entries (seeded by `seed`): a distinct but meaningless
    identity per gene.

    Returns (float32 array (len(reference_genes), dim), number of reference genes that got the fallback).
    """
    if fallback not in FALLBACKS:
        raise ScbertError(f"--fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
    if not vectors:
        raise ScbertError("no gene vectors to align; check the input files")
    dim = len(next(iter(vectors.values())))
    table = np.zeros((len(reference_genes), dim), dtype=np.float32)
    found = np.zeros(len(reference_genes), dtype=bool)
    for i, gene in enumerate(reference_genes):
        vector = vectors.get(gene)
        if vector is not None:
            table[i] = vector
            found[i] = True
    if not found.any():
        raise ScbertError("none of the reference genes has a vector; check that --ref and the inputs use the same "
                          "species and gene symbols")
    n_missing = int((~found).sum())
    if fallback == "random" and n_missing:
        rng = np.random.default_rng(seed)
        table[~found] = rng.normal(0.0, float(table[found].std()), size=(n_missing, dim)).astype(np.float32)
    return table, n_missing


def read_text_vectors(path: str) -> dict[str, np.ndarray]:
    """Read gene vectors from text: a symbol then its numbers per line, separated by spaces or tabs.

    Reads the Gene2vec release (`SYMBOL<TAB>v1 v2 ... `) and the word2vec text format (the same after a header line
    `n_genes dim`). A symbol seen twice keeps its first vector. Returns {symbol: float32 vector} in file order.
    """
    vectors: dict[str, np.ndarray] = {}
    dim = None
    try:
        handle = open(path, encoding="utf-8", errors="replace")
    except OSError as err:
        raise ScbertError(f"cannot open {path} ({err}); pass the Gene2vec text file") from err
    with handle:
        for line_no, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                continue
            if line_no == 1 and len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                continue  # word2vec header: n_genes dim
            try:
                vector = np.asarray(parts[1:], dtype=np.float32)
            except ValueError as err:
                raise ScbertError(f"{path} line {line_no} is not a gene symbol followed by numbers; pass a text "
                                  "file with one gene and its vector per line") from err
            if dim is None:
                dim = vector.size
            if vector.size == 0 or vector.size != dim:
                raise ScbertError(f"{path} line {line_no} has {vector.size} numbers where earlier lines have {dim}; "
                                  "every line must hold a symbol and a vector of the same length")
            vectors.setdefault(parts[0], vector)
    if not vectors:
        raise ScbertError(f"{path} holds no gene vectors; pass the Gene2vec text file")
    return vectors


def text_vectors_bytes(vectors: Mapping[str, np.ndarray]) -> bytes:
    """word2vec text format: `n dim` then `SYMBOL v1 ... vdim` per line (9 significant digits: float32 exactly)."""
    names = list(vectors)
    matrix = np.stack([np.asarray(vectors[g], dtype=np.float32) for g in names]) if names else np.zeros((0, 0))
    rows = io.StringIO()
    np.savetxt(rows, matrix, fmt="%.9g", delimiter=" ")
    lines = rows.getvalue().splitlines()
    body = "".join(f"{name} {line}\n" for name, line in zip(names, lines, strict=True))
    return f"{matrix.shape[0]} {matrix.shape[1]}\n{body}".encode()


def revise_vector_symbols(vectors: Mapping[str, np.ndarray], *, table=None) -> tuple[dict[str, np.ndarray], dict]:
    """Rename vectors to current NCBI symbols (as `preprocess.py` revises var_names), dropping unknown symbols; of
    symbols that revise to the same gene, the one already current wins, else the first. Returns (vectors, report
    dict)."""
    names = list(vectors)
    revised, _report = revise_symbols(names, table)
    keep = _first_occurrences(revised, [new == name for new, name in zip(revised, names, strict=True)])
    out = {str(revised[i]): vectors[names[i]] for i in keep}
    unknown = sum(new is None for new in revised)
    report = {"genes_in": len(names), "genes_unknown": unknown, "genes_duplicated": len(names) - unknown - len(out),
              "genes_renamed": sum(new is not None and new != name for name, new in zip(names, revised, strict=True))}
    return out, report


def convert_text_release(
    path: str,
    reference_genes: Sequence[str],
    *,
    fallback: str = "zero",
    seed: int = 2021,
    table=None,
) -> tuple[np.ndarray, dict]:
    """The published Gene2vec text release (or any word2vec text file) as a table in reference order.

    Symbols are revised against NCBI Gene first, so old symbols in the 2019 release still find their gene.
    Returns (float32 array (len(reference_genes), dim), report dict: genes_in, genes_unknown, genes_duplicated,
    genes_renamed, reference_genes, reference_missing).
    """
    vectors, report = revise_vector_symbols(read_text_vectors(path), table=table)
    array, n_missing = align_to_reference(vectors, reference_genes, fallback=fallback, seed=seed)
    report.update(reference_genes=len(reference_genes), reference_missing=n_missing)
    return array, report


# ---------------------------------------------------------------------------------------------------------------
# Building from data


def build_from_data(
    paths: Sequence[str],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    min_cells: int = DEFAULT_MIN_CELLS,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    partners: int = 0,
    dim: int = 200,
    epochs: int | None = None,
    sample: float = DEFAULT_SAMPLE,
    seed: int = 2021,
    workers: int = 1,
    table=None,
    verbose: bool = True,
) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Read each file, find its co-expressed pairs separately, pool them and train gene2vec on the pool.

    Returns ({symbol: vector}, one info dict per file with cells, genes, genes_tested, pairs, seconds).
    """
    pooled: list[tuple[str, str]] = []
    infos = []
    for path in paths:
        t0 = time.perf_counter()
        X, symbols, info = read_expression(path, table=table)
        first, second, _r, tested = correlated_gene_pairs(
            X, threshold=threshold, min_cells=min_cells, block_size=block_size, max_pairs=max_pairs,
            partners=partners, progress=verbose,
        )
        del X
        pooled.extend((symbols[i], symbols[j]) for i, j in zip(first.tolist(), second.tolist(), strict=True))
        info.update(genes_tested=tested, pairs=int(first.size), seconds=round(time.perf_counter() - t0, 2))
        infos.append(info)
        if verbose:
            capped = " (capped at --max_pairs)" if max_pairs > 0 and first.size == max_pairs else ""
            kept = f"r >= {threshold}" + (f" or among a gene's {partners} strongest" if partners else "")
            print(f"{path}: {info['kind']}, {info['cells']} cells, {info['genes']} genes, {tested} expressed in "
                  f">= {min_cells} cells, {first.size} pairs with {kept}{capped} ({info['seconds']} s)")
    if not pooled:
        raise ScbertError(f"no gene pair reaches r >= {threshold} in any input; lower --threshold (or --min_cells)")
    t0 = time.perf_counter()
    n_genes = len({gene for pair in pooled for gene in pair})
    epochs = epochs or auto_epochs(len(pooled), n_genes)
    vectors = train_gene2vec(pooled, dim=dim, epochs=epochs, sample=sample, seed=seed, workers=workers,
                             progress=verbose)
    if verbose:
        print(f"word2vec: {len(pooled)} pairs of {n_genes} genes, dim {dim}, {epochs} passes "
              f"({time.perf_counter() - t0:.1f} s)")
    return vectors, infos


# ---------------------------------------------------------------------------------------------------------------
# Command line


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Build a gene2vec table for scBERT from co-expression in your data, or convert the published "
        "Gene2vec text release, in the order of a reference gene list.",
        add_help=add_help,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_path", nargs="+", metavar="H5AD",
                        help="one or more .h5ad files (raw counts, log-normalised, or preprocess.py output); pairs "
                        "are found in each file separately and pooled, as Gene2vec pooled datasets")
    source.add_argument("--from_txt", metavar="TXT",
                        help="convert this Gene2vec text release (a symbol then its vector per line; a word2vec "
                        "header line is allowed) instead of training")
    parser.add_argument("--ref", default=None,
                        help="reference gene list as in preprocess.py: panglao (the published checkpoint's genes), "
                        "a checkpoint, an .h5ad (its var_names) or a text file of symbols; default: the "
                        "protein-coding list in data/")
    parser.add_argument("--out_path", required=True,
                        help=".npy to write: float32 (n_reference_genes, dim) in reference order, for "
                        "pretrain.py --gene2vec_path")
    parser.add_argument("--txt_path", default=None,
                        help="also write every vector (all genes, revised symbols) in word2vec text format, which "
                        "--from_txt reads back to align to another reference")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="keep gene pairs with Pearson r >= this over log-normalised cells; lower it for small "
                        "or shallow data (default: %(default)s)")
    parser.add_argument("--min_cells", type=int, default=DEFAULT_MIN_CELLS,
                        help="only genes with a non-zero value in at least this many cells take part; rare genes "
                        "correlate by chance (default: %(default)s)")
    parser.add_argument("--block_size", type=int, default=DEFAULT_BLOCK_SIZE,
                        help="genes per block of the correlation search; memory is about 8 * cells * block_size "
                        "bytes beyond the data (default: %(default)s)")
    parser.add_argument("--max_pairs", type=int, default=DEFAULT_MAX_PAIRS,
                        help="keep at most this many pairs per file, the strongest; 0: no cap (default: %(default)s)")
    parser.add_argument("--partners", type=int, default=DEFAULT_PARTNERS,
                        help="also keep each expressed gene's this many strongest positive correlations, whatever "
                        "--threshold, so every gene expressed in --min_cells cells trains; 0: threshold only "
                        "(default: %(default)s)")
    parser.add_argument("--dim", type=int, default=200,
                        help="vector length; scBERT adds the vector to its 200-wide token embedding (default: 200)")
    parser.add_argument("--epochs", type=int, default=0,
                        help="word2vec passes over the pairs, reshuffled before each pass; 0: Gene2vec's 10, or more "
                        f"so that the average gene takes part in about {GENE_UPDATES} pair updates (default: 0)")
    parser.add_argument("--sample", type=float, default=DEFAULT_SAMPLE,
                        help="word2vec down-sampling of genes above this share of all pairs (Gene2vec: 1e-3, over "
                        "984 datasets); 0 keeps every update, which small corpora need (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="word2vec threads; only 1 gives the same vectors on every run (default: 1)")
    parser.add_argument("--fallback", choices=FALLBACKS, default=None,
                        help="row for reference genes without a vector: 'zero' (the row of scBERT's appended token: "
                        "no gene identity) or 'random' (seeded Gaussian with the spread of the known vectors: a "
                        f"distinct identity without meaning) (default: {DEFAULT_FALLBACK} when training from "
                        "--data_path, zero with --from_txt, as the published release is converted)")
    parser.add_argument("--seed", type=int, default=2021, help="seed for word2vec, the shuffles and the random "
                        "fallback (default: 2021)")
    parser.add_argument("--overwrite", type=str2bool, default=False,
                        help="replace existing output files (default: False)")
    return parser


def _check_paths(args: argparse.Namespace) -> None:
    """Fail before any work: missing inputs, an output name np.save would change, outputs that exist."""
    for path in args.data_path or [args.from_txt]:
        if not os.path.isfile(path):
            raise ScbertError(f"{path} does not exist; pass existing files to --data_path or --from_txt")
    if not args.out_path.endswith(".npy"):
        raise ScbertError(f"--out_path must end in .npy, got {args.out_path}")
    for path in (args.out_path, args.txt_path):
        if path is not None and os.path.exists(path) and not args.overwrite:
            raise ScbertError(f"{path} already exists; choose another path or pass --overwrite True")


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> np.ndarray:
    """Write the gene2vec table (and optionally the text vectors); returns the table."""
    args = get_args_parser().parse_args(argv)
    _check_paths(args)
    reference = read_reference_genes(args.ref)
    table = load_gene_table()
    if args.from_txt is not None:
        vectors, report = revise_vector_symbols(read_text_vectors(args.from_txt), table=table)
        print(f"{args.from_txt}: {report['genes_in']} vectors, {report['genes_renamed']} symbols revised, "
              f"{report['genes_unknown']} unknown and {report['genes_duplicated']} duplicated dropped")
    else:
        vectors, _infos = build_from_data(
            args.data_path, threshold=args.threshold, min_cells=args.min_cells, block_size=args.block_size,
            max_pairs=args.max_pairs, partners=args.partners, dim=args.dim, epochs=args.epochs, sample=args.sample,
            seed=args.seed, workers=args.workers, table=table,
        )
    fallback = args.fallback or ("zero" if args.from_txt is not None else DEFAULT_FALLBACK)
    array, n_missing = align_to_reference(vectors, reference, fallback=fallback, seed=args.seed)
    print(f"reference: {len(reference)} genes, {len(reference) - n_missing} with a vector, {n_missing} without "
          f"(given the {fallback} fallback)")
    if n_missing * 2 > len(reference):
        print("note: most reference genes have no vector; pool more datasets (--data_path A B ...) or lower "
              "--threshold / --min_cells to cover more of them")
    atomic_write_bytes(args.out_path, _npy_bytes(array))
    print(f"wrote {args.out_path}: float32 {array.shape}")
    if args.txt_path is not None:
        atomic_write_bytes(args.txt_path, text_vectors_bytes(vectors))
        print(f"wrote {args.txt_path}: {len(vectors)} vectors in word2vec text format")
    return array


if __name__ == "__main__":
    run_cli(main)
