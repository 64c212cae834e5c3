"""Label refinements that CellTypist users expect: probability match (`A|B`) and majority voting over clusters.

Pure functions on arrays, apart from `over_cluster`, which builds a neighbour graph and runs Leiden with scanpy.

- `prob_match_labels`: every class whose probability reaches `p_thres`, joined by "|" in decreasing probability
  (ties in class order); `Unassigned` when none does. scBERT's probabilities are a softmax and sum to 1, so two
  classes can both pass only when p_thres <= 0.5 (CellTypist's 0.5 default is for independent sigmoids: with it
  prob_match here is best match with `Unassigned` below 0.5).
- `majority_vote`: each over-cluster takes the most common label of its cells (ties: the label first in sorted
  order); a cluster whose top label holds less than `min_prop` of its voting cells is `Unassigned`.
- `over_cluster`: Leiden on a k-nearest-neighbour graph of a representation, at a resolution chosen by the number
  of cells (`auto_resolution`), as CellTypist over-clusters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from metrics import UNASSIGNED
from utils import ScbertError

MATCH_SEP = "|"
# (cells up to, Leiden resolution): more cells, finer over-clusters, so each stays small enough to be one type.
RESOLUTIONS = ((5_000, 5.0), (20_000, 10.0), (40_000, 15.0), (100_000, 20.0), (200_000, 25.0))
MAX_RESOLUTION = 30.0
N_NEIGHBORS = 15  # scanpy's default neighbourhood size
N_PCS = 50


def prob_match_labels(probs: np.ndarray, classes: Sequence[str], p_thres: float) -> np.ndarray:
    """probs (cells, classes) -> object array of labels: passing classes joined by "|" in decreasing probability
    (ties in class order), or `Unassigned` when no class reaches p_thres."""
    if not 0.0 < p_thres <= 1.0:
        raise ScbertError(f"--p_thres must be a probability in (0, 1], got {p_thres}")
    classes = [str(c) for c in classes]
    order = np.argsort(-probs, axis=1, kind="stable")  # per cell: classes by decreasing probability
    labels = np.empty(probs.shape[0], dtype=object)
    for i, (row, ranked) in enumerate(zip(probs, order, strict=True)):
        passing = [classes[j] for j in ranked if row[j] >= p_thres]
        labels[i] = MATCH_SEP.join(passing) if passing else UNASSIGNED
    return labels


def match_categories(labels: Sequence[str], classes: Sequence[str]) -> list[str]:
    """Categories for prob_match labels: the classes in order, the combinations that occur (sorted), Unassigned."""
    combos = sorted({str(x) for x in labels if MATCH_SEP in str(x)})
    return [str(c) for c in classes] + combos + [UNASSIGNED]


def majority_vote(labels: Sequence[str], clusters: Sequence, *, min_prop: float = 0.0,
                  voters: np.ndarray | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """The majority label of each cell's cluster.

    labels (cells,): per-cell labels; clusters (cells,): cluster of each cell (NaN: none, the cell keeps its label);
    voters (cells,) bool: cells that vote (default all); a cluster without voters keeps each cell's own label.
    Returns (voted labels (cells,) object, table: one row per cluster with its top label, the share of its voting
    cells holding it, its number of voting cells and the label it was given).
    """
    if not 0.0 <= min_prop <= 1.0:
        raise ScbertError(f"--min_prop must be a proportion in [0, 1], got {min_prop}")
    labels = np.asarray([str(x) for x in labels], dtype=object)
    clusters = pd.Series(list(clusters), dtype=object)
    if len(clusters) != len(labels):
        raise ScbertError(f"the over-clustering has {len(clusters)} values for {len(labels)} cells")
    voters = np.ones(len(labels), dtype=bool) if voters is None else np.asarray(voters, dtype=bool)
    has_cluster = clusters.notna().to_numpy()
    keys = clusters.astype(str).to_numpy()
    voted = labels.copy()
    rows = []
    for key in sorted(set(keys[has_cluster])):
        members = has_cluster & (keys == key)
        votes = pd.Series(labels[members & voters]).value_counts()
        if votes.empty:
            continue
        top_count = votes.max()
        top = sorted(votes.index[votes == top_count])[0]
        share = float(top_count / votes.sum())
        given = top if share >= min_prop else UNASSIGNED
        voted[members] = given
        rows.append({"cluster": key, "top_label": top, "share": share, "voting_cells": int(votes.sum()),
                     "label": given})
    table = pd.DataFrame(rows, columns=["cluster", "top_label", "share", "voting_cells", "label"])
    return voted, table


def auto_resolution(n_cells: int) -> float:
    """Leiden resolution for over-clustering `n_cells` cells (see RESOLUTIONS)."""
    for limit, resolution in RESOLUTIONS:
        if n_cells <= limit:
            return resolution
    return MAX_RESOLUTION


def neighbour_graph(rep: np.ndarray, *, seed: int = 0, pca: bool = False):
    """An AnnData over the rows of `rep` with scanpy's k-nearest-neighbour graph: on `rep` itself (an embedding),
    or with pca=True on its first principal components (expression)."""
    import anndata as ad
    import scanpy as sc

    graph = ad.AnnData(X=rep)
    n = rep.shape[0]
    if n < 3:
        raise ScbertError(f"over-clustering needs at least 3 cells, got {n}: pass --over_clustering KEY instead")
    if pca:
        n_comps = max(1, min(N_PCS, n - 1, rep.shape[1] - 1))
        sc.pp.pca(graph, n_comps=n_comps, random_state=seed)
        use_rep = "X_pca"
    else:
        graph.obsm["X_rep"] = np.asarray(rep, dtype=np.float32)
        use_rep = "X_rep"
    sc.pp.neighbors(graph, n_neighbors=min(N_NEIGHBORS, n - 1), use_rep=use_rep, random_state=seed)
    return graph


def over_cluster(graph, *, resolution: float | None = None, seed: int = 0) -> np.ndarray:
    """Leiden clusters (str, cells,) of an AnnData holding a neighbour graph (`neighbour_graph`)."""
    import scanpy as sc

    try:
        import igraph  # noqa: F401  (scanpy's Leiden flavour "igraph" needs it)
    except ImportError as err:
        raise ScbertError("--over_clustering auto runs Leiden, which needs the igraph package: install it (it is in "
                          "requirements.txt) or pass an obs column with --over_clustering KEY") from err
    resolution = auto_resolution(graph.n_obs) if resolution is None else resolution
    sc.tl.leiden(graph, resolution=resolution, flavor="igraph", n_iterations=2, directed=False,
                 random_state=seed, key_added="over_clustering")
    return graph.obs["over_clustering"].astype(str).to_numpy()
