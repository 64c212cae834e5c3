"""The scGPT recipe over row blocks: several inputs (or one too large for memory) into a shard folder.

    python preprocess.py --recipe scgpt --data_path donors/ --out_format shards --out_path blood_scgpt_shards
    python preprocess.py --recipe scgpt --data_path a.h5ad b.h5ad --ref ckpts/scgpt_pretrain_best.pth \\
        --out_format shards --out_path labelled_shards

The same steps as `scgpt_preprocess.preprocess_scgpt` (its docstring), in passes over the inputs' row blocks
(`preprocess.open_counts`: a CSR `.h5ad` is read backed, other inputs one file at a time), so memory is one block
plus three float64 arrays of genes per HVG batch, whatever the number of cells:

1. (HVGs only) per batch, cells and each gene's sum and sum of squares, over the cells with counts (`hvg.BatchSums`);
2. (HVGs only) the loess fit per batch, then the clipped sums (`hvg.ClippedFit`) and scanpy's seurat_v3 choice;
3. each block restricted to the chosen genes (or aligned to a checkpoint's vocabulary), cells empty over them
   dropped, normalised, log1p'd and binned with one random generator carried from block to block, written to shards.

The shards equal those of the in-memory recipe on the inputs concatenated (tested: same genes in the same order,
same bins, same obs); with several inputs `obs['input']` names each cell's input. HVGs need the inputs to share
their gene list (a vocabulary, `--ref`, aligns any).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from binning import bin_cells, looks_binned
from hvg import BatchSums
from scgpt_preprocess import _alignment, _count_problem, _normalise, _recipe_params
from utils import ScbertError

__all__ = ["stream_scgpt"]


class _Inputs:
    """The inputs as row blocks of counts, read again for each pass, with their checks."""

    def __init__(self, paths: Sequence[str], counts_layer: str | None, block_cells: int, n_bins: int,
                 batch_key: str | None):
        self.paths, self.block_cells, self.n_bins, self.batch_key = list(paths), int(block_cells), n_bins, batch_key
        self.options = {"counts_from": "X" if counts_layer is None else f"layer:{counts_layer}",
                        "allow_normalized": False}
        self.where = "X" if counts_layer is None else f"layer {counts_layer!r}"

    def blocks(self) -> Iterator[tuple[int, object, int, sp.csr_matrix, np.ndarray]]:
        """(input index, its CountSource, first row, counts CSR float32, whether each row has counts). An input is a
        path (opened by `preprocess.open_counts` on each pass) or a `CountSource` (e.g. census.py's query)."""
        from preprocess import CountSource, input_name, open_counts

        for k, item in enumerate(self.paths):
            counts = item if isinstance(item, CountSource) else open_counts(item, self.options)
            path = input_name(item)
            if self.batch_key is not None and self.batch_key not in counts.obs.columns:
                raise ScbertError(
                    f"--hvg_batch_key {self.batch_key!r} is not a column of obs in {path} (columns: "
                    f"{list(counts.obs.columns)[:10]}): name the column that holds each cell's sample (donor_id for "
                    "Census data), or pass --hvg_batch_key none")
            for start in range(0, counts.n_obs, self.block_cells):
                stop = min(start + self.block_cells, counts.n_obs)
                x = sp.csr_matrix(counts.block(start, stop), dtype=np.float32)
                self._check(x, path, start, stop)
                yield k, counts, start, x, np.diff(x.indptr) > 0

    def _check(self, x: sp.csr_matrix, path: str, start: int, stop: int) -> None:
        problem = _count_problem(x) if x.nnz else None
        if problem:
            raise ScbertError(f"{self.where} of {path} holds {problem} in rows {start}..{stop - 1}, so it is not raw "
                              "counts: the scGPT recipe starts from raw counts")
        if start == 0 and looks_binned(x, self.n_bins):
            raise ScbertError(f"{self.where} of {path} already holds bins (whole numbers 0..{self.n_bins - 1}): pass "
                              "the raw counts it was made from")

    def name(self, k: int) -> str:
        from preprocess import input_name

        return input_name(self.paths[k])

    def batches(self, counts, start: int, n: int) -> np.ndarray:
        if self.batch_key is None:
            return np.zeros(n, dtype=object)
        return counts.obs[self.batch_key].iloc[start:start + n].astype(str).to_numpy()


def _choose_hvgs(inputs: _Inputs, n_hvg: int, span: float) -> tuple[list[str], np.ndarray, int]:
    """Passes 1 and 2: (the input's gene names, the chosen columns ascending, genes with counts)."""
    names: list[str] | None = None
    sums = None
    for k, counts, start, x, has in inputs.blocks():
        mine = [str(g) for g in counts.var.index]
        if names is None:
            names, sums = mine, BatchSums(len(mine))
        elif mine != names:
            raise ScbertError(f"{inputs.name(k)} has other genes than {inputs.name(0)}: highly variable genes need "
                              "one gene list; pass --ref <a transformer checkpoint> to align every input to its "
                              "vocabulary, or merge the inputs")
        sums.add(x[has], inputs.batches(counts, start, x.shape[0])[has])
    with_counts = np.flatnonzero(sums.gene_totals > 0)
    if with_counts.size < n_hvg:
        raise ScbertError(f"only {with_counts.size} genes have counts, fewer than --n_hvg {n_hvg}: lower --n_hvg or "
                          "pass more genes")
    fit = sums.fit(with_counts, span)
    for _, counts, start, x, has in inputs.blocks():
        fit.add_clipped(x[has], inputs.batches(counts, start, x.shape[0])[has])
    return names, fit.select(n_hvg), int(with_counts.size)


def stream_scgpt(paths: Sequence, folder: str, *, n_hvg: int = 1200, hvg_batch_key: str | None = "donor_id",
                 span: float = 1.0, n_bins: int = 51, target_sum: float = 1e4, seed: int = 0,
                 genes: Sequence[str] | None = None, counts_layer: str | None = None, block_cells: int = 16384,
                 cells_per_shard: int = 65536, overwrite: bool = False) -> dict:
    """Run the recipe over the inputs' row blocks (paths, or `preprocess.CountSource`s, each read once per pass)
    into the shard folder `folder`; returns the summary."""
    from shards import ShardWriter

    if not 2 <= n_bins <= 128:
        raise ScbertError(f"--n_bins {n_bins} is outside 2..128: the recipe uses 51")
    inputs = _Inputs(paths, counts_layer, block_cells, n_bins, hvg_batch_key if genes is None else None)
    if genes is None:
        names, chosen, genes_in_counts = _choose_hvgs(inputs, n_hvg, span)
        kept, gene_source = [names[j] for j in chosen], f"seurat_v3 HVGs, batch_key {hvg_batch_key}"
    else:
        kept, gene_source = [str(g) for g in genes], f"vocabulary of {len(genes)} genes"
    params = _recipe_params(n_hvg=n_hvg if genes is None else 0, hvg_batch_key=hvg_batch_key, span=span,
                            n_bins=n_bins, target_sum=target_sum, seed=seed, gene_source=gene_source,
                            where=inputs.where)
    from preprocess import input_name

    names = [input_name(p) for p in paths]
    params["input"] = names[0] if len(names) == 1 else str(names)
    writer = ShardWriter(folder, kept, kind="scgpt", params=params, cells_per_shard=cells_per_shard)
    try:
        summary = _bin_into(writer, inputs, kept, chosen if genes is None else None, target_sum, n_bins, seed)
    except BaseException:
        writer.abort()
        raise
    if genes is None:
        summary["genes_found"] = len(kept)
        summary["genes_with_counts"] = genes_in_counts
    writer.close(summary, overwrite=overwrite)
    return summary


def _bin_into(writer, inputs: _Inputs, kept: list[str], chosen: np.ndarray | None, target_sum: float, n_bins: int,
              seed: int) -> dict:
    """Pass 3: every block onto the kept genes, normalised and binned (one generator for all blocks), into writer."""
    rng = np.random.default_rng(seed)
    cells_in = without_counts = empty = 0
    genes_in, totals, mapping, current = 0, np.zeros(len(kept)), None, -1
    for k, counts, start, x, has in inputs.blocks():
        if k != current:
            current, genes_in = k, max(genes_in, counts.var.shape[0])
            if chosen is None:
                mapping, found = _alignment([str(g) for g in counts.var.index], kept)
                if found == 0:
                    raise ScbertError(f"none of the {counts.var.shape[0]} genes of {inputs.name(k)} is in the "
                                      f"vocabulary of {len(kept)} genes (e.g. {kept[:3]}): check that var_names hold "
                                      "gene symbols like the model's")
        cells_in += x.shape[0]
        without_counts += int((~has).sum())
        rows = np.flatnonzero(has)
        x = x[rows]
        cell_totals = np.asarray(x.sum(axis=1), dtype=np.float32).ravel()
        x = sp.csr_matrix(x[:, chosen]) if chosen is not None else sp.csr_matrix(x @ mapping)
        nonempty = np.diff(x.indptr) > 0
        empty += int((~nonempty).sum())
        if not nonempty.any():
            continue
        x = x[nonempty]
        totals += np.asarray(x.sum(axis=0)).ravel()
        bins, _ = bin_cells(_normalise(x, target_sum), n_bins=n_bins, rng=rng)
        obs = counts.obs.iloc[start + rows[nonempty]].copy()
        obs["n_counts"] = cell_totals[nonempty]
        if len(inputs.paths) > 1:
            obs["input"] = os.path.basename(os.path.normpath(inputs.name(k)))
        writer.add(bins, obs)
    cells_out = cells_in - without_counts - empty
    if cells_out == 0:
        raise ScbertError("no cell has counts over the kept genes: check the gene names")
    return {"cells_in": cells_in, "cells_out": cells_out, "cells_without_counts": without_counts,
            "cells_empty_over_genes": empty, "genes_in": genes_in, "genes_out": len(kept),
            "genes_found": int((totals > 0).sum())}
