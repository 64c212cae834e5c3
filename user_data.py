"""The user's own file as the annotation input: read any format, preprocess onto the model's genes on the fly, and
put the annotations back on every cell of the user's AnnData.

    python predict.py --data_path pbmc.h5ad --model_path finetune_best.pth --preprocess True

`--preprocess True` reads raw counts (an .h5ad with counts in X, a 'counts' layer or .raw; a 10x folder or .h5; a
.csv/.tsv table) with preprocess.py's reader, and runs preprocess.py's own steps (`preprocess.preprocess_adata`:
symbol revision, alignment onto the checkpoint's gene list in its order, log2(1 + CP10K)) with no cell removed.
Cells with fewer than `--min_genes` expressed model genes are not scored: they stay in the output, labelled
`Unscored`, with the reason in obs['<prefix>unscored_reason'] (empty for scored cells); their confidence and
probabilities are NaN. Everything the user's file held (X, layers, .raw, obs, obsm such as X_umap) is kept.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from utils import ScbertError

UNSCORED = "Unscored"


@dataclass
class Query:
    """What annotation works on. user: the AnnData results go into (every cell, in order); model_input: the scored
    cells as log2(1 + CP10K) over the model's genes (the same object as user when the input was preprocessed);
    rows: positions of model_input's cells in user; reasons: (user cells,) why a cell was not scored, "" if it was;
    summary: preprocess.py's summary when preprocessed here, else None; x: the checked matrix to predict on
    (CSR float32; default model_input.X), so the user's own X is never converted in place."""

    user: Any
    model_input: Any
    rows: np.ndarray
    reasons: np.ndarray
    summary: dict[str, Any] | None = None
    x: Any = None

    def __post_init__(self) -> None:
        if self.x is None:
            self.x = self.model_input.X

    @property
    def all_scored(self) -> bool:
        return self.model_input is self.user or len(self.rows) == self.user.n_obs


def preprocessed_query(adata, x=None) -> Query:
    """A query whose AnnData already is the model's input: every cell scored (x: its checked matrix)."""
    return Query(user=adata, model_input=adata, rows=np.arange(adata.n_obs),
                 reasons=np.full(adata.n_obs, "", dtype=object), x=x)


def read_user_file(path: str, *, transpose: bool = False):
    """The user's file as an AnnData (preprocess.py's reader: .h5ad, 10x folder or .h5, .csv/.tsv)."""
    from preprocess import read_input

    return read_input(path, transpose=transpose)


def prepare_query(user, genes: list[str], *, min_genes: int = 200, counts_from: str = "auto",
                  reference_name: str | None = None) -> Query:
    """Preprocess the counts of `user` onto `genes` (preprocess.preprocess_adata, keeping every cell), then set
    aside the cells with fewer than `min_genes` expressed model genes. `user` is not modified."""
    from preprocess import PreprocessWarning, preprocess_adata

    if min_genes < 0:
        raise ScbertError(f"--min_genes {min_genes} is negative: pass 0 to score every cell")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PreprocessWarning)
        out, summary = preprocess_adata(user, genes, counts_from=counts_from, min_genes=0,
                                        reference_name=reference_name)
    for warning in caught:
        if issubclass(warning.category, PreprocessWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
    expressed = np.diff(out.X.indptr)
    keep = expressed >= min_genes
    reasons = np.full(user.n_obs, "", dtype=object)
    for i in np.flatnonzero(~keep):
        reasons[i] = (f"{int(expressed[i])} of the model's {len(genes)} genes expressed, fewer than --min_genes "
                      f"{min_genes}")
    if not keep.any():
        raise ScbertError(f"no cell has at least {min_genes} expressed genes of the model's {len(genes)} (most: "
                          f"{int(expressed.max())}): lower --min_genes or check the gene names")
    rows = np.flatnonzero(keep)
    model_input = out if keep.all() else out[rows].copy()
    summary = {**summary, "cells_unscored": int((~keep).sum()), "min_genes": int(min_genes)}
    return Query(user=user, model_input=model_input, rows=rows, reasons=reasons, summary=summary)


def _spread_rows(values: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """(len(rows), ...) values -> (n, ...) float32 with NaN in the rows not given."""
    full = np.full((n, *values.shape[1:]), np.nan, dtype=np.float32)
    full[rows] = values
    return full


def transfer(query: Query, prefix: str, reason_key: str) -> None:
    """Copy the annotation fields (obs/obsm keys starting with `prefix` or 'X_<prefix>', uns keys starting with
    `prefix`) from model_input onto every cell of user; unscored cells get `Unscored` labels, NaN numbers and the
    reason column. Nothing to do when model_input is user."""
    user, src, rows = query.user, query.model_input, query.rows
    if src is user:
        return
    n = user.n_obs
    for key in [k for k in src.obs.columns if str(k).startswith(prefix)]:
        column = src.obs[key]
        if isinstance(column.dtype, pd.CategoricalDtype):
            values = np.full(n, UNSCORED, dtype=object)
            values[rows] = column.astype(str).to_numpy()
            categories = [*column.cat.categories, *([UNSCORED] if len(rows) < n else [])]
            user.obs[key] = pd.Categorical(values, categories=categories)
        else:
            user.obs[key] = _spread_rows(column.to_numpy(dtype=np.float32), rows, n)
    embedding = f"X_{prefix.rstrip('_')}"
    for key in [k for k in src.obsm if str(k).startswith((prefix, embedding))]:
        user.obsm[key] = _spread_rows(np.asarray(src.obsm[key]), rows, n)
    for key in [k for k in src.uns if str(k).startswith(prefix)]:
        user.uns[key] = src.uns[key]
    user.obs[reason_key] = pd.Series(query.reasons, index=user.obs_names, dtype=object).astype(str)
