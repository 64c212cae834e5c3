"""Per-cell quantile binning of expression values: the value tokens of the scGPT-style transformer, as pure functions.

For one cell, with nz its non-zero values and n_bins (51 in scGPT and scLLM) the number of bins including 0:
  edges = quantile(nz, linspace(0, 1, n_bins - 1))       n_bins - 1 edges, from min(nz) to max(nz)
  left  = number of edges <= x                            np.digitize(x, edges)
  right = number of edges <  x                            np.digitize(x, edges, right=True)
  bin   = left                                             when no edge equals x (left == right)
        = uniform on right + 1 .. left                     when x equals edges (ties: spread at random)
Zeros stay 0; every non-zero value lands in 1..n_bins-1 (the minimum in 1, the maximum in n_bins-1 unless tied).
Same distribution as scGPT's `ceil(u * (right - left) + left)` with u ~ U[0, 1); the draws come from one seeded
generator over the whole matrix, so a seed fixes the result. Because the bins are per-cell quantiles, they do not
change under per-cell scaling or a monotone transform (normalize_total, log1p), ties aside.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from utils import ScbertError

__all__ = ["bin_cells", "bin_dtype", "cell_bins", "cell_edges", "looks_binned"]

# Share of cells whose largest value is n_bins - 1 above which integer input is taken to be binned already: per-cell
# binning puts each cell's maximum in the top bin (ties at the maximum aside), raw counts almost never do.
BINNED_TOP_SHARE = 0.5


def bin_dtype(n_bins: int) -> np.dtype:
    """The smallest signed integer type holding 0..n_bins-1 (int8 for the recipe's 51)."""
    return np.dtype(np.int8) if n_bins <= 128 else np.dtype(np.int16)


def cell_edges(nonzero: np.ndarray, n_bins: int) -> np.ndarray:
    """(n_bins - 1,) float64 quantile edges of one cell's non-zero values (numpy's linear interpolation)."""
    return np.quantile(np.asarray(nonzero, dtype=np.float64), np.linspace(0.0, 1.0, n_bins - 1))


def cell_bins(values: np.ndarray, edges: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Bins of one cell's non-zero `values` given its `edges` and uniform draws `u` in [0, 1) (one per value)."""
    values = np.asarray(values, dtype=np.float64)
    left = np.searchsorted(edges, values, side="right")  # edges <= x
    right = np.searchsorted(edges, values, side="left")  # edges < x
    # left - floor(u * (left - right)) is `left` without a tie and uniform on right+1..left with one.
    return left - np.floor(u * (left - right)).astype(np.int64)


def looks_binned(x: sp.spmatrix | np.ndarray, n_bins: int) -> bool:
    """True when `x` (cells x genes) already holds bins: whole numbers in 0..n_bins-1, with the top bin as most
    cells' maximum (what `bin_cells` writes; raw counts and log-normalised values do not look like this)."""
    x = sp.csr_matrix(x)
    data = x.data
    if data.size == 0 or data.min() < 0 or data.max() > n_bins - 1 or not np.all(data == np.round(data)):
        return False
    per_cell = np.diff(x.indptr)
    nonempty = per_cell > 0
    maxima = np.maximum.reduceat(data, x.indptr[:-1][nonempty])
    return bool(np.mean(maxima == n_bins - 1) > BINNED_TOP_SHARE)


def bin_cells(x: sp.spmatrix | np.ndarray, n_bins: int = 51, seed: int = 0,
              rng: np.random.Generator | None = None) -> tuple[sp.csr_matrix, np.ndarray]:
    """Per-cell quantile binning of `x` (cells x genes, non-negative, dense or sparse).

    Ties are spread with one uniform number per stored value, drawn in row order from `rng` (default: a new
    generator from `seed`); passing one generator to consecutive row blocks bins them as one matrix would be.

    Returns (bins, edges): bins is CSR of `bin_dtype(n_bins)` with the sparsity of `x` (0 stays 0, non-zeros in
    1..n_bins-1, sorted indices); edges is (cells, n_bins - 1) float32, row i the edges of cell i.
    Raises ScbertError for fewer than 2 bins, negative or non-finite values, a cell without non-zero values, or
    input that is already binned.
    """
    if n_bins < 2:
        raise ScbertError(f"--n_bins {n_bins} is too small: pass at least 2 (the recipe uses 51)")
    x = sp.csr_matrix(x, copy=True)
    x.eliminate_zeros()
    x.sort_indices()
    data = x.data
    if data.size and (not np.isfinite(data).all() or data.min() < 0):
        raise ScbertError("the values to bin hold negative or non-finite numbers: bin counts or log1p values")
    per_cell = np.diff(x.indptr)
    empty = np.flatnonzero(per_cell == 0)
    if empty.size:
        raise ScbertError(
            f"{empty.size} cell(s) (first: row {int(empty[0])}) have no non-zero value to bin: drop empty cells first "
            f"(scanpy's filter_cells(min_counts=1))"
        )
    if looks_binned(x, n_bins):
        raise ScbertError(
            f"the values are already bins (whole numbers 0..{n_bins - 1} with the top bin in most cells): pass counts "
            f"or normalised values, not a binned matrix"
        )
    u = (rng if rng is not None else np.random.default_rng(seed)).random(data.size)
    out = np.empty(data.size, dtype=bin_dtype(n_bins))
    edges = np.empty((x.shape[0], n_bins - 1), dtype=np.float32)
    for i in range(x.shape[0]):
        lo, hi = x.indptr[i], x.indptr[i + 1]
        cell_edge = cell_edges(data[lo:hi], n_bins)
        edges[i] = cell_edge
        out[lo:hi] = cell_bins(data[lo:hi], cell_edge, u[lo:hi])
    bins = sp.csr_matrix((out, x.indices.copy(), x.indptr.copy()), shape=x.shape)
    return bins, edges
