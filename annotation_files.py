"""predict.py's files: the query its flags name (`read_query`), and what it writes, by kind: where the outputs go
and writing them (rank 0, atomically, never over the input).

| kind | path | when |
|---|---|---|
| h5ad | `--out_path` (default `<data stem>_scbert.h5ad` beside the input) | always: the user's AnnData, every cell |
| csv | `<out stem>.csv`: cell_id, label, confidence, [majority vote], [unscored reason], prob_<class>... | always |
| summary | `<out stem>_summary.csv`: cells and share per predicted type (and per majority vote) | --summary True |
| metrics, confusion | `<out stem>_metrics.json`, `<out stem>_confusion.csv` | with --label_key |
| attention, attention_cells | `<out stem>_attention.csv`, `_attention_cells.npy` (rows: scored cells) | --attention |
| umap, dotplot, confidence | `<out stem>_umap.png`, `_dotplot.png`, `_confidence.png` (plots.py) | --plots True |
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import pandas as pd

from annotate import Annotator, Refinement, check_model_flags, load_annotator, make_query
from user_data import Query, read_user_file
from utils import ScbertError, atomic_write_bytes, atomic_write_h5ad, read_preprocessed


def output_paths(data_path: str, out_path: str | None, *, label_key: str | None = None, attention: str = "none",
                 plots: bool = False, summary: bool = False, overwrite: bool = False) -> dict[str, str]:
    """Every file this run will write, by kind; refuses the input as output and existing files without overwrite."""
    data = os.path.abspath(data_path)
    stem_in = os.path.splitext(data.rstrip(os.sep))[0]
    out = os.path.abspath(out_path) if out_path else f"{stem_in}_scbert.h5ad"
    if not out.endswith(".h5ad"):
        raise ScbertError(f"--out_path {out_path!r} must end in .h5ad (the CSV is written beside it)")
    if out == data or (os.path.exists(out) and os.path.exists(data) and os.path.samefile(out, data)):
        raise ScbertError(f"--out_path {out_path!r} is the input file: choose another path, the input is kept")
    stem = out[: -len(".h5ad")]
    paths = {"h5ad": out, "csv": f"{stem}.csv"}
    if label_key:
        paths["metrics"] = f"{stem}_metrics.json"
        paths["confusion"] = f"{stem}_confusion.csv"
    if attention in ("type", "cell"):
        paths["attention"] = f"{stem}_attention.csv"
    if attention == "cell":
        paths["attention_cells"] = f"{stem}_attention_cells.npy"
    if summary:
        paths["summary"] = f"{stem}_summary.csv"
    if plots:
        paths.update(umap=f"{stem}_umap.png", dotplot=f"{stem}_dotplot.png", confidence=f"{stem}_confidence.png")
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise ScbertError(
            f"{existing[0]!r} already exists: pass --overwrite True to replace it, or choose another --out_path"
        )
    return paths


def write_csv(frame: pd.DataFrame, path: str, **kwargs) -> None:
    atomic_write_bytes(path, frame.to_csv(**kwargs).encode("utf-8"))


def cell_table(user, keys, classes: Sequence[str]) -> pd.DataFrame:
    """One row per cell of `user`: cell_id, label, confidence, [majority vote], [unscored reason], prob_<class>."""
    table = pd.DataFrame({"cell_id": user.obs_names.astype(str),
                          keys.label: user.obs[keys.label].astype(str).to_numpy(),
                          keys.confidence: user.obs[keys.confidence].to_numpy()})
    for key in (keys.majority, keys.reason):
        if key in user.obs:
            table[key] = user.obs[key].astype(str).to_numpy()
    probs = user.obsm[keys.probabilities]  # NaN rows for unscored cells
    for i, name in enumerate(classes):
        table[f"prob_{name}"] = probs[:, i]
    return table


def summary_table(user, keys) -> pd.DataFrame:
    """Cells and share of all cells per predicted type (and per majority vote), most frequent first."""
    labels = user.obs[keys.label].astype(str)
    counts = labels.value_counts()
    table = pd.DataFrame({"n_cells": counts, "fraction": counts / max(len(labels), 1)})
    if keys.majority in user.obs:
        votes = user.obs[keys.majority].astype(str).value_counts()
        table = table.join(pd.DataFrame({"n_cells_majority_voting": votes,
                                         "fraction_majority_voting": votes / max(len(labels), 1)}), how="outer")
        table = table.fillna(0).sort_values(["n_cells", "n_cells_majority_voting"], ascending=False)
        table[["n_cells", "n_cells_majority_voting"]] = table[["n_cells", "n_cells_majority_voting"]].astype(int)
    table.index.name = keys.label
    return table


def write_outputs(user, *, keys, classes: Sequence[str], paths: dict[str, str], metrics: dict | None,
                  confusion: pd.DataFrame | None, say=print) -> None:
    """Rank 0: the metrics files (with metrics), the CSV, the summary CSV (when in paths) and the .h5ad; `say`
    prints progress and the summary."""
    from metrics import format_metrics

    if metrics is not None:
        atomic_write_bytes(paths["metrics"], (json.dumps(metrics, indent=2) + "\n").encode("utf-8"))
        write_csv(confusion, paths["confusion"])
        say(format_metrics(metrics))
        if confusion.shape[1] <= 12:
            say(confusion.to_string())
    write_csv(cell_table(user, keys, classes), paths["csv"], index=False, float_format="%.6g")
    summary = summary_table(user, keys)
    if "summary" in paths:
        write_csv(summary, paths["summary"], float_format="%.6g")
    atomic_write_h5ad(user, paths["h5ad"])
    head = ", ".join(f"{name} {n}" for name, n in summary["n_cells"].head(8).items())
    say(f"labels: {head}{', ...' if len(summary) > 8 else ''}")
    say("wrote " + ", ".join(paths.values()))


def quiet_printer(quiet: bool, is_main: bool = True):
    """print to stderr on rank 0, or nothing with --quiet (errors and warnings still print)."""
    def say(*parts: Any) -> None:
        if is_main and not quiet:
            print(*parts, file=sys.stderr)

    say.progress = not quiet  # whether a progress bar may show
    return say


def read_query(args: argparse.Namespace) -> tuple[Annotator, Query]:
    """predict.py's model and checked query from its flags (the user's file preprocessed here with --preprocess
    True, else a preprocess.py output)."""
    annotator = load_annotator(args.model_path, label_dict=args.label_dict, heads=args.heads,
                               novel_type=args.novel_type)
    check_model_flags(annotator, gene_num=args.gene_num, bin_num=args.bin_num, pos_embed=args.pos_embed)
    depth = len(annotator.model.named_blocks())
    if args.attention != "none" and not -depth <= args.attention_layer < depth:
        raise ScbertError(f"--attention_layer {args.attention_layer} does not exist in a model of depth {depth}: pass "
                          f"a layer from {-depth} to {depth - 1} (-1 is the last, as in the paper)")
    transformer = annotator.ckpt.model_type == "transformer"
    if transformer and args.attention != "none":
        raise ScbertError("--attention reads the Performer's FAVOR+ factors; the transformer has none: drop it")
    fix = (f"run preprocess.py {'--recipe scgpt ' if transformer else ''}--ref {args.model_path} on the raw data so "
           "it uses the model's genes in order" + ("" if transformer else ", or pass counts with --preprocess True"))
    if args.preprocess:
        query = make_query(read_user_file(args.data_path, transpose=args.transpose), annotator, preprocess=True,
                           min_genes=args.min_genes, counts_from=args.counts_from)
    else:
        if transformer:  # bins from preprocess.py --recipe scgpt over its vocabulary
            from scgpt_preprocess import read_binned

            adata = read_binned(args.data_path, genes=annotator.ckpt.genes, fix_genes=fix)
        else:
            try:
                adata = read_preprocessed(args.data_path, genes=annotator.ckpt.genes, fix_genes=fix)
            except ScbertError as err:
                hint = "; or pass --preprocess True to preprocess it here" if "raw counts" in str(err) else ""
                raise ScbertError(f"{err}{hint}") from err
        query = make_query(adata, annotator, data_name=repr(args.data_path))
    if args.label_key is not None and args.label_key not in query.user.obs:
        columns = ", ".join(map(str, list(query.user.obs.columns)[:10])) or "none"
        raise ScbertError(f"--label_key {args.label_key!r} is not a column of obs in {args.data_path!r} "
                          f"(columns: {columns}): pass one of them or drop the flag")
    return annotator, query


def write_all(args, query: Query, annotator: Annotator, paths, refine: Refinement, metrics, confusion, say, *,
              attention: pd.DataFrame | None = None) -> None:
    """predict.py on rank 0: the plots (they may add the computed UMAP to the AnnData), the tables, the .h5ad."""
    keys = refine.keys
    if args.plots:
        from plots import write_plots

        prob_match = refine.mode == "prob_match"
        threshold = refine.p_thres if prob_match else (refine.unassign_thres if refine.novel_type else None)
        write_plots(query.user, query.model_input, keys=keys, paths=paths, threshold=threshold,
                    threshold_label="--p_thres" if prob_match else "--unassign_thres", attention=attention,
                    seed=args.seed)
    if query.summary is not None and query.summary.get("cells_unscored"):
        say(f"{query.summary['cells_unscored']} of {query.user.n_obs} cells have fewer than --min_genes "
            f"{args.min_genes} expressed model genes: labelled Unscored (obs[{keys.reason!r}] says why)")
    write_outputs(query.user, keys=keys, classes=annotator.classes, paths=paths, metrics=metrics,
                  confusion=confusion, say=say)
