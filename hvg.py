"""seurat_v3 highly variable genes from per-batch sums, for counts read a block of rows at a time.

scanpy's `highly_variable_genes(flavor="seurat_v3", batch_key=...)` needs the whole count matrix; its statistics do
not. Per batch it uses the number of cells and each gene's sum and sum of squares (mean and unbiased variance), a
loess fit of log10 variance on log10 mean over the genes that vary, and then each gene's sum and sum of squares of
the counts clipped at `reg_std * sqrt(n) + mean`. So two passes over the rows give the same genes:

    sums = BatchSums(n_genes)
    for block, batches in blocks(): sums.add(block, batches)        # pass 1 (cells with counts only)
    fit = sums.fit(keep_genes, span)                                # loess per batch
    for block, batches in blocks(): fit.add_clipped(block, batches)  # pass 2
    chosen = fit.select(n_top_genes)                                # scanpy's ranking, in gene order

Counts are whole numbers, so the first pass's float64 sums are exact in any order, and the means and variances come
from scanpy's formulas on those same sums; the clipped sums can differ in the last bit from scanpy's (whose own order
depends on its thread count), which could move a gene only on a near-exact tie of normalised variance. Tested: the
same genes in the same order as scanpy's on real counts, with and without batches. Memory: three float64 arrays of
genes per batch.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from utils import ScbertError

__all__ = ["BatchSums", "ClippedFit"]


def _by_batch(block: sp.csr_matrix, batches: np.ndarray):
    """(batch name, its rows of the block) for each batch present in the block."""
    names, codes = np.unique(np.asarray(batches).astype(str), return_inverse=True)
    for k, name in enumerate(names):
        rows = np.flatnonzero(codes == k)
        yield str(name), block if rows.size == block.shape[0] else block[rows]


class BatchSums:
    """Pass 1: per batch, cells and each gene's sum and sum of squares (float64); also each gene's total."""

    def __init__(self, n_genes: int):
        self.n_genes = int(n_genes)
        self.cells: dict[str, int] = {}
        self.sums: dict[str, np.ndarray] = {}
        self.squares: dict[str, np.ndarray] = {}
        self.gene_totals = np.zeros(self.n_genes, dtype=np.float64)

    def add(self, block: sp.csr_matrix, batches: np.ndarray) -> None:
        """Rows of counts (cells x genes) and each row's batch name."""
        for name, rows in _by_batch(sp.csr_matrix(block), batches):
            if name not in self.cells:
                self.cells[name] = 0
                self.sums[name] = np.zeros(self.n_genes, dtype=np.float64)
                self.squares[name] = np.zeros(self.n_genes, dtype=np.float64)
            data = rows.data.astype(np.float64)
            self.cells[name] += rows.shape[0]
            sums = np.bincount(rows.indices, weights=data, minlength=self.n_genes)
            self.sums[name] += sums
            self.squares[name] += np.bincount(rows.indices, weights=data * data, minlength=self.n_genes)
            self.gene_totals += sums

    def fit(self, genes: np.ndarray, span: float) -> ClippedFit:
        """The loess fit of every batch over the genes `genes` (indices, ascending: those scanpy would see after
        `filter_genes`), as scanpy's seurat_v3 computes it."""
        from skmisc.loess import loess

        batches = sorted(self.cells)  # np.unique's order, as scanpy loops
        means, reg_std = [], []
        for name in batches:
            n = self.cells[name]
            mean = self.sums[name][genes] / n
            var = self.squares[name][genes] / n - (self.sums[name][genes] / n) ** 2
            if n != 1:
                var *= n / (n - 1)
            not_const = var > 0
            estimate = np.zeros(genes.size, dtype=np.float64)
            try:
                model = loess(np.log10(mean[not_const]), np.log10(var[not_const]), span=span, degree=2)
                model.fit()
            except (ValueError, ZeroDivisionError) as err:
                raise ScbertError(f"seurat_v3 highly variable genes failed in batch {name!r} ({err}); batches of one "
                                  "or two cells often cause this: drop them or pass a larger --hvg_span") from err
            estimate[not_const] = model.outputs.fitted_values
            means.append(mean)
            reg_std.append(np.sqrt(10**estimate))
        return ClippedFit(genes, batches, [self.cells[b] for b in batches], means, reg_std)


class ClippedFit:
    """Pass 2: per batch, the sums and sums of squares of the counts clipped at reg_std * sqrt(n) + mean; then
    scanpy's normalised variance, ranks and choice."""

    def __init__(self, genes: np.ndarray, batches: list[str], cells: list[int], means: list[np.ndarray],
                 reg_std: list[np.ndarray]):
        self.genes, self.batches, self.cells, self.means, self.reg_std = genes, batches, cells, means, reg_std
        self.column = np.full(int(genes.max()) + 1 if genes.size else 0, -1, dtype=np.int64)
        self.column[genes] = np.arange(genes.size)
        self.clip = {b: std * np.sqrt(n) + m for b, n, m, std in zip(batches, cells, means, reg_std, strict=True)}
        self.sums = {b: np.zeros(genes.size) for b in batches}
        self.squares = {b: np.zeros(genes.size) for b in batches}

    def add_clipped(self, block: sp.csr_matrix, batches: np.ndarray) -> None:
        for name, rows in _by_batch(sp.csr_matrix(block), batches):
            indices = rows.indices
            inside = indices < self.column.size
            columns = np.full(indices.size, -1, dtype=np.int64)
            columns[inside] = self.column[indices[inside]]
            kept = columns >= 0
            columns = columns[kept]
            element = np.minimum(rows.data[kept].astype(np.float64), self.clip[name][columns])
            self.sums[name] += np.bincount(columns, weights=element, minlength=self.genes.size)
            self.squares[name] += np.bincount(columns, weights=element * element, minlength=self.genes.size)

    def select(self, n_top_genes: int) -> np.ndarray:
        """Indices (into the full gene list, ascending) of the n_top_genes chosen as scanpy's seurat_v3 ranks them:
        by median rank over the batches where a gene is in the top n_top_genes, then by how many batches."""
        norm = []
        for b, n, mean, std in zip(self.batches, self.cells, self.means, self.reg_std, strict=True):
            norm.append(((1 / ((n - 1) * np.square(std))) * (
                (n * np.square(mean)) + self.squares[b] - 2 * self.sums[b] * mean)).reshape(1, -1))
        norm_vars = np.concatenate(norm, axis=0)
        ranked = np.argsort(np.argsort(-norm_vars, axis=1), axis=1).astype(np.float32)
        n_batches = np.sum((ranked < n_top_genes).astype(int), axis=0)
        ranked[ranked >= n_top_genes] = np.nan
        median = np.ma.median(np.ma.masked_invalid(ranked), axis=0).filled(np.nan)
        table = pd.DataFrame({"highly_variable_rank": median, "highly_variable_nbatches": n_batches})
        order = table.sort_values(["highly_variable_rank", "highly_variable_nbatches"], ascending=[True, False],
                                  na_position="last").index.to_numpy()
        return np.sort(self.genes[order[: int(n_top_genes)]])
