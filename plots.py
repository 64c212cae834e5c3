"""Pictures of an annotation, made with scanpy's plotting (matplotlib Agg backend), saved as PNG beside the outputs.

    python predict.py --data_path q.h5ad --model_path finetune_best.pth --novel_type True --plots True

- `<out stem>_umap.png`: UMAP coloured by predicted type, by confidence, and by majority vote (with majority
  voting): the user's own `obsm['X_umap']` when it covers every cell, else one computed here from the cell
  embeddings (`obsm['X_scbert']`) of the scored cells, stored in `obsm['X_scbert_umap']`;
- `<out stem>_dotplot.png`: scanpy's dot plot of the top genes per predicted type, over the model's input: for
  the Performer, the genes whose attention received in that type most exceeds their attention over all cells
  (predict.py reduces attention per type for the plot even without --attention), else (the transformer, CANAL's
  novel call) each type's top marker genes (scanpy's t-test of the type against the rest);
- `<out stem>_confidence.png`: histogram of the top class probabilities, with the threshold marked.

Each PNG has a fixed size in pixels (`UMAP_PANEL`, `DOTPLOT`, `HISTOGRAM` inches at `DPI`; the UMAP is one panel
wide per colour), so a layout that overflows is cropped rather than the file growing. Files are written
atomically (temporary file, then rename).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from utils import atomic_write_bytes

DPI = 100
UMAP_PANEL = (5.0, 4.5)  # inches per coloured panel
DOTPLOT = (10.0, 5.0)
HISTOGRAM = (6.0, 4.0)
TOP_GENES = 3  # genes per predicted type in the dot plot
GREY = {"Unassigned": "#c8c8c8", "Unscored": "#7f7f7f"}


def pixels(inches: tuple[float, float], panels: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of a PNG of `panels` panels of `inches` each, side by side."""
    return int(round(inches[0] * panels * DPI)), int(round(inches[1] * DPI))


def label_colors(categories: Sequence[str]) -> list[str]:
    """A colour per category for uns['<key>_colors']: scanpy's default palette in category order (so a type keeps
    its colour across queries of one model), grey for Unassigned and Unscored."""
    from scanpy.plotting.palettes import default_20, default_102

    palette = default_20 if len(categories) <= 20 else default_102
    colours, i = [], 0
    for name in categories:
        if name in GREY:
            colours.append(GREY[name])
        else:
            colours.append(palette[i % len(palette)])
            i += 1
    return colours


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    """The figure as a PNG of exactly its size (no tight bounding box), written atomically."""
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def umap_coordinates(user, *, embedding_key: str, umap_key: str, seed: int = 0) -> np.ndarray:
    """(cells, 2) UMAP of every cell: the user's X_umap when present, else computed from the embeddings of the
    scored cells (rows of NaN stay NaN and are not drawn) and stored in obsm[umap_key]."""
    import scanpy as sc

    from voting import neighbour_graph

    if "X_umap" in user.obsm and np.asarray(user.obsm["X_umap"]).shape[1] >= 2:
        return np.asarray(user.obsm["X_umap"])[:, :2]
    emb = np.asarray(user.obsm[embedding_key])
    scored = np.isfinite(emb).all(axis=1)
    graph = neighbour_graph(emb[scored], seed=seed)
    sc.tl.umap(graph, random_state=seed)
    coords = np.full((user.n_obs, 2), np.nan, dtype=np.float32)
    coords[scored] = graph.obsm["X_umap"]
    user.obsm[umap_key] = coords
    return coords


def plot_umap(user, coords: np.ndarray, colour_keys: Sequence[str], path: str) -> None:
    """One UMAP panel per obs key in colour_keys (categorical keys use uns['<key>_colors'])."""
    import anndata as ad
    import scanpy as sc

    plt = _pyplot()
    view = ad.AnnData(obs=user.obs[list(colour_keys)].copy(), obsm={"X_umap": np.asarray(coords, dtype=np.float32)})
    for key in colour_keys:
        if f"{key}_colors" in user.uns:
            view.uns[f"{key}_colors"] = list(user.uns[f"{key}_colors"])
    point_size = min(120_000 / max(user.n_obs, 1), 40.0)  # scanpy's size for large data, capped for small ones
    width, height = UMAP_PANEL
    fig, axes = plt.subplots(1, len(colour_keys), figsize=(width * len(colour_keys), height), layout="constrained",
                             squeeze=False)
    for ax, key in zip(axes[0], colour_keys, strict=True):
        categorical = isinstance(view.obs[key].dtype, pd.CategoricalDtype)
        sc.pl.umap(view, color=key, ax=ax, show=False, frameon=False, title=key, size=point_size,
                   legend_fontsize=7 if categorical else None, color_map="viridis")
    _save(fig, path)


def top_genes(model_input, label_key: str, attention: pd.DataFrame | None, n_top: int = TOP_GENES) -> list[str]:
    """The dot plot's genes: per predicted type, the n_top whose attention received most exceeds their mean over all
    cells (`attention`: genes x types plus all_cells, `AttentionSink.finish`), else the type's top t-test markers
    against the rest; in type order, no repeats."""
    import scanpy as sc

    groups = model_input.obs[label_key].astype(str)
    counts = groups.value_counts()
    chosen: list[str] = []
    if attention is not None:  # attention that sets the type apart: its mean over the type's cells minus all cells'
        for name in [c for c in attention.columns if c != "all_cells"]:
            excess = attention[name] - attention["all_cells"] if "all_cells" in attention else attention[name]
            chosen += list(excess.sort_values(ascending=False).index[:n_top])
    else:
        eligible = [g for g in model_input.obs[label_key].cat.categories if counts.get(str(g), 0) >= 2]
        if len(eligible) >= 2:
            work = model_input[groups.isin(eligible).to_numpy()].copy()
            work.obs[label_key] = work.obs[label_key].cat.remove_unused_categories()
            sc.tl.rank_genes_groups(work, label_key, method="t-test", n_genes=n_top, key_added="markers")
            names = work.uns["markers"]["names"]
            for group in names.dtype.names:
                chosen += [str(g) for g in names[group]]
        else:  # one type: its most expressed genes
            mean = np.asarray(model_input.X.mean(axis=0)).ravel()
            chosen = list(model_input.var_names[np.argsort(-mean)[: n_top * 3]])
    return list(dict.fromkeys(chosen))


def plot_dotplot(model_input, label_key: str, genes: Sequence[str], path: str) -> None:
    """scanpy's dot plot of `genes` (model input values) per predicted type (types with no cell left out)."""
    import scanpy as sc

    work = model_input[:, list(genes)].copy()
    work.obs[label_key] = work.obs[label_key].cat.remove_unused_categories()
    fig_obj = sc.pl.dotplot(work, var_names=list(genes), groupby=label_key, figsize=DOTPLOT, show=False,
                            return_fig=True, title="top genes per predicted type")
    fig_obj.make_figure()
    fig_obj.fig.subplots_adjust(left=0.25, bottom=0.18)  # room for long type names and gene names in a fixed size
    _save(fig_obj.fig, path)


def plot_confidence(confidence: np.ndarray, threshold: float | None, path: str, *, label: str) -> None:
    """Histogram of the top class probabilities of the scored cells, `threshold` as a dashed line."""
    plt = _pyplot()
    values = np.asarray(confidence, dtype=np.float64)
    values = values[np.isfinite(values)]
    fig, ax = plt.subplots(figsize=HISTOGRAM, layout="constrained")
    ax.hist(values, bins=np.linspace(0.0, 1.0, 41), color="#1f77b4")
    if threshold is not None:
        below = float(np.mean(values < threshold)) if values.size else 0.0
        ax.axvline(threshold, color="#d62728", linestyle="--", label=f"{label} {threshold:g} ({below:.1%} below)")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("top class probability")
    ax.set_ylabel("cells")
    ax.set_title(f"confidence of {values.size} scored cells")
    _save(fig, path)


def write_plots(user, model_input, *, keys, paths: dict[str, str], threshold: float | None, threshold_label: str,
                attention: pd.DataFrame | None = None, seed: int = 0) -> dict[str, Any]:
    """The three PNGs for an annotated AnnData (`keys`: annotate.Keys); returns {kind: path} of those written."""
    colour_keys = [keys.label, keys.confidence] + ([keys.majority] if keys.majority in user.obs else [])
    coords = umap_coordinates(user, embedding_key=keys.embedding, umap_key=keys.umap, seed=seed)
    plot_umap(user, coords, colour_keys, paths["umap"])
    genes = top_genes(model_input, keys.label, attention)
    plot_dotplot(model_input, keys.label, genes, paths["dotplot"])
    plot_confidence(user.obs[keys.confidence].to_numpy(), threshold, paths["confidence"], label=threshold_label)
    return {"umap": paths["umap"], "dotplot": paths["dotplot"], "confidence": paths["confidence"]}
