"""Prediction at atlas scale: the query read in row blocks, blocks shared out to the ranks, rank 0 writing as they come.

    python predict.py --data_path corpus_shards/ --model_path finetuned_best.pth --novel_type True
    python predict.py --data_path query.h5ad --backed True --model_path finetuned_best.pth --label_key celltype
    torchrun --nproc_per_node 8 predict.py --data_path corpus_shards/ --model_path finetuned_best.pth

`predict.py` comes here when `--data_path` is a shard folder (`preprocess.py --out_format shards`) or with
`--backed True` (a preprocess.py `.h5ad` opened backed, so X stays on disk). Memory per process is one block of
`--block_cells` cells (its matrix, predictions and obs rows; rank 0 also keeps the predicted labels for
`--label_key`), whatever the number of cells (a backed .h5ad's obs table is in memory: anndata reads it whole); the
in-memory path (`annotation_files.read_query`) stays the one for small data and for everything that needs all cells
at once, which is refused here with one sentence: majority voting and plots (a neighbour graph of every cell),
embeddings and attention tables (cells x dim or genes), CANAL's novel-cell call (its threshold mixes the whole query),
preprocessing counts on the fly (preprocess them into shards first).

Blocks are predicted in rounds: in round r rank k takes block r * world_size + k, and the round's probabilities are
gathered, so rank 0 receives them in cell order and appends them to the outputs; labels are made exactly as on the
in-memory path (`annotate.assign_labels`, `voting.prob_match_labels`), so the two give the same CSV. Files (rank 0,
each written under a temporary name and renamed when complete; never over the input; existing ones only with
`--overwrite True`): `<stem>.csv` (cell_id, <prefix>celltype, <prefix>confidence, prob_<class>...),
`<stem>_summary.csv` (cells and share per predicted type), `<stem>_params.json` (what uns['<prefix>predict'] holds on
the in-memory path: settings, classes, metrics), with `--label_key` `<stem>_metrics.json` and `<stem>_confusion.csv`.
`<stem>` is `--out_path` without its `.csv`/`.h5ad` ending, by default `<data stem>_scbert` beside the input.

An interrupted run resumes: the CSV grows as `<stem>.csv.partial`, synced after every round, with the cells it holds
and its length in `<stem>.csv.partial.json` beside a fingerprint of the settings. The same command again cuts the
partial file back to its last complete round, counts its labels again and predicts only the cells after it (with
any number of ranks); other settings start from the beginning.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import voting
from annotate import Annotator, Refinement, assign_labels, check_model_flags, check_query, load_annotator, predict_cells
from distributed import DistContext, gather_tensors, reduce_sum
from metrics import annotation_metrics, format_metrics
from shards import is_shard_folder, open_corpus
from utils import ScbertError, atomic_write, check_expression, write_json

__all__ = ["BLOCK_CELLS", "is_streamed", "predict_streamed", "stream_paths"]

BLOCK_CELLS = 16384  # ~16k cells x ~1,000 non-zeros: tens of MB per block, hundreds of batches between gathers

# Flags that need every cell in memory at once: (flag, value that asks for it, why).
NEEDS_ALL_CELLS = (
    ("preprocess", True, "preprocessing counts here"),
    ("majority_voting", True, "majority voting (a neighbour graph of every cell)"),
    ("plots", True, "plots (a UMAP of every cell)"),
    ("embeddings", True, "embeddings (cells x dim in the output)"),
)


def is_streamed(args: argparse.Namespace) -> bool:
    """Whether predict.py reads this query in row blocks: a shard folder, or an .h5ad with --backed True."""
    return bool(getattr(args, "backed", False)) or is_shard_folder(args.data_path)


def _refuse_whole_query_flags(args: argparse.Namespace) -> None:
    source = "a shard folder" if is_shard_folder(args.data_path) else "--backed True"
    wanted = [(f"--{flag} True", why) for flag, value, why in NEEDS_ALL_CELLS if getattr(args, flag) == value]
    if args.attention != "none":
        wanted.append((f"--attention {args.attention}", "attention tables (cells x genes)"))
    if args.novel_type and args.novel_method == "canal":
        wanted.append(("--novel_method canal", "CANAL's novel-cell call (its threshold mixes the whole query)"))
    if wanted:
        flag, why = wanted[0]
        raise ScbertError(f"{flag} asks for {why}, which needs every cell in memory, but {source} is predicted in row "
                          f"blocks: drop {flag}, or pass a preprocess.py .h5ad without --backed")
    if args.block_cells < 1:
        raise ScbertError(f"--block_cells must be at least 1, got {args.block_cells}")


def stream_paths(args: argparse.Namespace) -> dict[str, str]:
    """The files a streamed prediction writes, by kind; refuses the input and existing files without --overwrite."""
    data = os.path.abspath(args.data_path).rstrip(os.sep)
    out = os.path.abspath(args.out_path) if args.out_path else f"{os.path.splitext(data)[0]}_scbert"
    stem = out[: -len(os.path.splitext(out)[1])] if out.endswith((".csv", ".h5ad")) else out
    paths = {"csv": f"{stem}.csv", "summary": f"{stem}_summary.csv", "params": f"{stem}_params.json"}
    if args.label_key:
        paths.update(metrics=f"{stem}_metrics.json", confusion=f"{stem}_confusion.csv")
    if data in paths.values():
        raise ScbertError(f"--out_path {args.out_path!r} would write over the input: choose another path")
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not args.overwrite:
        raise ScbertError(f"{existing[0]!r} already exists: pass --overwrite True to replace it, or choose another "
                          "--out_path")
    return paths


@dataclass
class BlockSource:
    """A query read a row block at a time: `rows(start, end)` -> CSR values, `cell_ids(start, end)` -> obs names,
    `labels(key)` -> one obs column for every cell (only rank 0 calls the last two), `columns` of obs."""

    name: str
    n_obs: int
    columns: list[str]
    rows: Callable[[int, int], Any]
    cell_ids: Callable[[int, int], pd.Index]
    labels: Callable[[str], np.ndarray]


def open_source(args: argparse.Namespace, annotator: Annotator) -> BlockSource:
    """The query as blocks of the model's input, its genes checked against the checkpoint's. A shard folder's obs
    is read a block at a time (a million cells' table is about 120 MB, which no rank holds); a backed .h5ad's obs is
    in memory (anndata reads it whole)."""
    transformer = annotator.ckpt.model_type == "transformer"
    name = repr(args.data_path)
    recipe = "--recipe scgpt " if transformer else ""
    if is_shard_folder(args.data_path):
        corpus = open_corpus(args.data_path, kind="scgpt" if transformer else "scbert")
        check_query(corpus, annotator, data_name=name)
        return BlockSource(name, corpus.n_obs, corpus.obs_columns(), lambda a, b: corpus.to_csr(range(a, b)),
                           lambda a, b: corpus.obs_rows(a, b, columns=[]).index,
                           lambda key: corpus.obs_rows(0, corpus.n_obs, columns=[key])[key].to_numpy())
    adata = _open_backed(args.data_path, recipe)
    check_query(adata, annotator, data_name=name)
    if transformer:
        from scgpt_preprocess import SCGPT_UNS_KEY

        if SCGPT_UNS_KEY not in adata.uns:
            raise ScbertError(f"{name} is not binned for the transformer (no uns[{SCGPT_UNS_KEY!r}]): run "
                              f"preprocess.py {recipe}on the raw counts first")

    def rows(a: int, b: int):
        block = adata.X[a:b]
        if transformer:
            import scipy.sparse as sp

            return sp.csr_matrix(block, dtype=np.float32)
        return check_expression(block, name=f"{name} (cells {a}..{b - 1})")

    return BlockSource(name, adata.n_obs, list(adata.obs.columns), rows, lambda a, b: adata.obs_names[a:b],
                       lambda key: adata.obs[key].to_numpy())


def _open_backed(path: str, recipe: str):
    import anndata as ad

    if not os.path.isfile(path):
        raise ScbertError(f"data file {path!r} does not exist: check --data_path")
    try:
        adata = ad.read_h5ad(path, backed="r")
    except Exception as err:  # h5py and anndata raise many types for foreign files
        raise ScbertError(f"could not open {path!r} as an .h5ad file ({type(err).__name__}): pass the output of "
                          f"preprocess.py {recipe}or a shard folder") from err
    if adata.n_obs == 0 or adata.n_vars == 0 or adata.X is None:
        raise ScbertError(f"{path!r} holds no expression matrix ({adata.n_obs} x {adata.n_vars}): check the input")
    if getattr(adata.X, "format", "csr") == "csc":
        raise ScbertError(f"{path!r} stores X by columns (CSC), so a block of rows means reading all of it: write it "
                          "by rows (adata.X = adata.X.tocsr()) or drop --backed")
    return adata


def _labels(probs: np.ndarray, classes: list[str], refine: Refinement) -> tuple[np.ndarray, np.ndarray]:
    if refine.mode == "prob_match":
        return voting.prob_match_labels(probs, classes, refine.p_thres), probs.max(axis=1).astype(np.float32)
    return assign_labels(probs, classes, novel_type=refine.novel_type, unassign_thres=refine.unassign_thres)


class _Writer:
    """Rank 0's running outputs: CSV rows appended round by round to `<csv>.partial`, durable after each round (its
    length and cell count in `<csv>.partial.json`, with the run's fingerprint), label counts, labels for metrics."""

    def __init__(self, csv_path: str, classes: list[str], refine: Refinement, source: BlockSource, fingerprint: str):
        self.csv_path, self.classes, self.refine, self.source = csv_path, classes, refine, source
        self.partial, self.progress = f"{csv_path}.partial", f"{csv_path}.partial.json"
        self.fingerprint = fingerprint
        self.counts: Counter[str] = Counter()
        self.predicted: list[np.ndarray] = []
        self.cells = 0
        self.fh = None

    def resume_point(self, say) -> int:
        """Cells already written by an interrupted run with the same settings (0 if none); the partial file is cut
        back to its last complete round and its labels counted again."""
        try:
            with open(self.progress, encoding="utf-8") as fh:
                done = json.load(fh)
        except (OSError, ValueError):
            done = None
        if (done is None or done.get("fingerprint") != self.fingerprint or not os.path.exists(self.partial)
                or os.path.getsize(self.partial) < int(done["bytes"])):
            if done is not None:
                say(f"{self.partial} was written with other settings (or is incomplete): predicting from the start")
            self.fh = open(self.partial, "w", encoding="utf-8", newline="")
            keys = self.refine.keys
            columns = ["cell_id", keys.label, keys.confidence, *(f"prob_{c}" for c in self.classes)]
            self.fh.write(pd.DataFrame(columns=columns).to_csv(index=False))
            return 0
        with open(self.partial, "r+b") as fh:
            fh.truncate(int(done["bytes"]))
        labels = pd.read_csv(self.partial, usecols=[self.refine.keys.label], dtype=str, keep_default_na=False)
        labels = labels[self.refine.keys.label].to_numpy(dtype=object)
        self.counts.update(labels)
        if self.refine.label_key:
            self.predicted.append(labels)
        self.cells = int(done["cells"])
        self.fh = open(self.partial, "a", encoding="utf-8", newline="")
        say(f"resuming: {self.cells} of {self.source.n_obs} cells were predicted by an interrupted run "
            f"({self.partial}); predicting the rest")
        return self.cells

    def add(self, first: int, probs: np.ndarray) -> None:
        labels, confidence = _labels(probs, self.classes, self.refine)
        self.counts.update(map(str, labels))
        if self.refine.label_key:
            self.predicted.append(labels)
        keys = self.refine.keys
        table = pd.DataFrame({"cell_id": self.source.cell_ids(first, first + len(probs)).astype(str),
                              keys.label: labels, keys.confidence: confidence})
        table = pd.concat([table, pd.DataFrame(probs, columns=[f"prob_{c}" for c in self.classes])], axis=1)
        self.fh.write(table.to_csv(index=False, header=False, float_format="%.6g"))
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.cells = first + len(probs)
        write_json(self.progress, {"fingerprint": self.fingerprint, "cells": self.cells, "bytes": self.fh.tell()})

    def finish(self) -> None:
        """The complete CSV moved into place; the progress record removed."""
        self.fh.close()
        os.replace(self.partial, self.csv_path)
        os.remove(self.progress)


def _fingerprint(record: dict[str, Any]) -> str:
    """What makes two runs write the same rows: the record's settings, less those that do not change them."""
    settings = {k: v for k, v in record["params"].items() if k not in ("device", "batch_size", "block_cells")}
    text = json.dumps({"params": settings, "classes": record["classes"]}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _round_robin(n_obs: int, block: int, ctx: DistContext, start: int = 0):
    """(round's first cell, this rank's (start, end) or None) per round, blocks from cell `start` on; every rank
    runs every round."""
    n_blocks = -(-(n_obs - start) // block)
    for r in range(-(-n_blocks // ctx.world_size)):
        mine = r * ctx.world_size + ctx.rank
        first = start + mine * block
        yield (start + r * ctx.world_size * block,
               (first, min(first + block, n_obs)) if mine < n_blocks else None)


def _predict_all(source: BlockSource, annotator: Annotator, args, ctx: DistContext, writer: _Writer | None,
                 progress: bool, start: int) -> float:
    """Every round: this rank's block predicted, all probabilities gathered; rank 0 hands them to the writer."""
    n_classes = len(annotator.classes)
    seconds = 0.0
    with tqdm(total=source.n_obs, initial=start, unit="cell", disable=not progress, file=sys.stderr) as bar:
        for first, rows in _round_robin(source.n_obs, args.block_cells, ctx, start):
            probs = torch.zeros((0, n_classes), dtype=torch.float32)
            if rows is not None:
                done = predict_cells(annotator.model, source.rows(*rows), batch_size=args.batch_size,
                                     device=ctx.device, amp=args.amp)
                probs, seconds = torch.from_numpy(done.probs), seconds + done.seconds
            everyone = gather_tensors(probs, ctx).numpy()
            if writer is not None:
                writer.add(first, everyone)
            bar.update(everyone.shape[0])
    return seconds


def predict_streamed(args: argparse.Namespace, refine: Refinement, ctx: DistContext, say,
                     params: Callable[[Annotator], dict[str, Any]]) -> tuple[dict[str, str], dict[str, Any]]:
    """predict.py for a shard folder or a backed .h5ad (see the module docstring). Returns (the paths written,
    what params.json holds); on ranks other than 0 nothing is written and the record has no metrics."""
    _refuse_whole_query_flags(args)
    paths = stream_paths(args)
    annotator = load_annotator(args.model_path, label_dict=args.label_dict, heads=args.heads,
                               novel_type=args.novel_type)
    check_model_flags(annotator, gene_num=args.gene_num, bin_num=args.bin_num, pos_embed=args.pos_embed)
    source = open_source(args, annotator)
    if args.label_key is not None and args.label_key not in source.columns:
        columns = ", ".join(map(str, source.columns[:10])) or "none"
        raise ScbertError(f"--label_key {args.label_key!r} is not a column of obs in {source.name} (columns: "
                          f"{columns}): pass one of them or drop the flag")
    record = {"params": {**params(annotator), **refine.params(), "streamed": True,
                         "block_cells": int(args.block_cells)},
              "classes": list(annotator.classes)}
    writer = None
    if ctx.is_main:
        writer = _Writer(paths["csv"], list(annotator.classes), refine, source, _fingerprint(record))
    start_cell = writer.resume_point(say) if writer is not None else 0
    start_cell = int(reduce_sum(torch.tensor([float(start_cell)]), ctx)[0])  # rank 0's number, on every rank
    say(f"predicting {source.n_obs - start_cell} cells in blocks of {args.block_cells} with "
        f"{len(annotator.classes)} classes on {ctx.device} x {ctx.world_size}")
    start = time.perf_counter()
    _predict_all(source, annotator, args, ctx, writer, progress=ctx.is_main and getattr(say, "progress", True),
                 start=start_cell)
    if writer is None:
        return paths, record
    writer.finish()
    wall, n = time.perf_counter() - start, source.n_obs - start_cell
    say(f"predicted {n} cells in {wall:.1f} s ({n / max(wall, 1e-9):.1f} cells/s)")
    _write_tables(writer, source, annotator, refine, paths, record, say)
    return paths, record


def _write_tables(writer: _Writer, source: BlockSource, annotator: Annotator, refine: Refinement,
                  paths: dict[str, str], record: dict[str, Any], say) -> None:
    counts = pd.Series(writer.counts, dtype=np.int64).sort_values(ascending=False, kind="stable")
    summary = pd.DataFrame({"n_cells": counts, "fraction": counts / max(source.n_obs, 1)})
    summary.index.name = refine.keys.label
    atomic_write(paths["summary"], lambda tmp: summary.to_csv(tmp, float_format="%.6g"))
    if refine.label_key:
        predicted = np.concatenate(writer.predicted)
        metrics, confusion = annotation_metrics(source.labels(refine.label_key), predicted,
                                                annotator.classes, novel_type=refine.novel_type)
        record["metrics"] = metrics
        write_json(paths["metrics"], metrics)
        atomic_write(paths["confusion"], lambda tmp: confusion.to_csv(tmp))
        say(format_metrics(metrics))
    write_json(paths["params"], record)
    head = ", ".join(f"{name} {n}" for name, n in counts.head(8).items())
    say(f"labels: {head}{', ...' if len(counts) > 8 else ''}")
    say("wrote " + ", ".join(paths.values()))
