"""Annotate cells with a fine-tuned scBERT model, call novel types `Unassigned`, and write results people keep.

    python predict.py --data_path query.h5ad --model_path finetuned_best.pth --novel_type True --unassign_thres 0.5

The query is preprocess.py's output for the model's gene list (`preprocess.py --ref <checkpoint>`). This script is
the command line of `annotate.py` (the same labelling from a notebook: `annotate(adata, model_path, ...)`): cells are
labelled with the argmax class; with `--novel_type True` a cell whose top probability is below `--unassign_thres` is
`Unassigned` (SPEC section 5). Under `torchrun --nproc_per_node N predict.py ...` each rank predicts a shard of the
cells and rank 0 writes the files.

Files written (never over the input; an existing output only with `--overwrite True`):
- `<out>.h5ad` (default `<data stem>_scbert.h5ad` beside the input): the input plus the fields annotate.py lists
  (obs['scbert_celltype'], obs['scbert_confidence'], obsm['scbert_probabilities'], obsm['X_scbert'], uns).
- `<out>.csv`: cell_id, scbert_celltype, scbert_confidence, then prob_<class> for every class.
- with --label_key: `<out stem>_metrics.json` (accuracy, macro-F1, novel-type recall, per-class report) and
  `<out stem>_confusion.csv` (true labels x predicted labels, Unassigned included).
- with --attention type|cell: `<out stem>_attention.csv` (genes x predicted types: mean attention each gene receives
  in the chosen layer, plus all_cells), and with `cell` also `<out stem>_attention_cells.npy` (float32 cells x genes,
  rows in obs order, columns in var order). See performer_pytorch/interpret.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from annotate import (
    EMBEDDING_HELP,
    Annotator,
    AttentionSink,
    Predictions,
    annotation_params,
    check_model_flags,
    check_query,
    load_annotator,
    predict_cells,
    score_annotations,
    write_annotations,
)
from distributed import DistContext, cleanup_distributed, print0, setup_distributed
from metrics import format_metrics
from utils import ScbertError, atomic_write_bytes, atomic_write_h5ad, read_preprocessed, run_cli, str2bool


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Annotate the cells of a preprocessed .h5ad with a fine-tuned scBERT checkpoint; write an .h5ad "
        "and a CSV with labels, confidences and class probabilities.",
        add_help=add_help,
    )
    parser.add_argument("--data_path", required=True,
                        help="query .h5ad from preprocess.py --ref <checkpoint> (log2(1 + CP10K) over the model's "
                        "genes, in its order)")
    parser.add_argument("--model_path", required=True,
                        help="fine-tuned checkpoint (finetune.py's <model_name>_best.pth, or the reference's with "
                        "--label_dict); GPU checkpoints load on CPU")
    parser.add_argument("--novel_type", type=str2bool, default=False,
                        help="True: call cells whose top probability is below --unassign_thres 'Unassigned' "
                        "(novel types); False (default): always the argmax class")
    parser.add_argument("--unassign_thres", type=float, default=0.5,
                        help="top-probability threshold for --novel_type True, in [0, 1] (default: %(default)s, "
                        "as published)")
    parser.add_argument("--bin_num", type=int, default=None,
                        help="expression bins (published: 5); default: from the checkpoint, which it must match")
    parser.add_argument("--gene_num", type=int, default=None,
                        help="genes per cell (published: 16906); default: from the checkpoint, which it must match")
    parser.add_argument("--pos_embed", type=str2bool, default=None,
                        help="gene2vec positional embedding (published: True); default: from the checkpoint, "
                        "which it must match")
    parser.add_argument("--seed", type=int, default=2021, help="random seed (prediction is deterministic in eval "
                        "mode; kept for published commands) (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="cells per forward pass; results do not depend on it (default: %(default)s)")
    parser.add_argument("--out_path", default=None,
                        help="output .h5ad (default: <data stem>_scbert.h5ad beside the input); the CSV goes "
                        "beside it with the same name")
    parser.add_argument("--overwrite", type=str2bool, default=False,
                        help="replace existing output files (never the input) (default: %(default)s)")
    parser.add_argument("--label_dict", default=None,
                        help="class names for a reference checkpoint (its label_dict pickle, read safely), or a "
                        "text/JSON list; our checkpoints carry their classes")
    parser.add_argument("--label_key", default=None,
                        help="obs column with known cell types: also report accuracy, macro-F1, novel-type recall "
                        "and a confusion matrix")
    parser.add_argument("--embeddings", type=str2bool, default=False, help=EMBEDDING_HELP)
    parser.add_argument("--attention", choices=["none", "type", "cell"], default="none",
                        help="per-gene attention received (the paper's gene importance): 'type' writes the mean per "
                        "predicted type to <out stem>_attention.csv; 'cell' also writes every cell's to "
                        "<out stem>_attention_cells.npy (cells x genes float32) (default: %(default)s)")
    parser.add_argument("--attention_layer", type=int, default=-1,
                        help="Performer block whose attention is read; -1 is the last, as in the paper")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none",
                        help="bf16 autocast: about twice as fast on recent CPUs and GPUs; probabilities change in "
                        "the third decimal (default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA if visible), cpu, cuda or cuda:<index>; under torchrun each rank takes its "
                        "local GPU (default: %(default)s)")
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                        help="set by the legacy torch.distributed.launch; the LOCAL_RANK variable wins when present")
    parser.add_argument("--heads", type=int, default=None,
                        help="attention heads (published: 10); default: from the checkpoint (stored, or inferred from "
                        "the weights), which it must match")
    return parser


@dataclass
class PredictResult:
    """What main() produced: the output AnnData, the written paths by kind, the metrics (with --label_key)."""

    adata: Any
    paths: dict[str, str]
    predictions: Predictions
    metrics: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)


def output_paths(args: argparse.Namespace) -> dict[str, str]:
    """Every file this run will write, by kind; refuses the input as output and existing files without --overwrite."""
    data = os.path.abspath(args.data_path)
    stem_in = os.path.splitext(data)[0]
    out = os.path.abspath(args.out_path) if args.out_path else f"{stem_in}_scbert.h5ad"
    if not out.endswith(".h5ad"):
        raise ScbertError(f"--out_path {args.out_path!r} must end in .h5ad (the CSV is written beside it)")
    if out == data or (os.path.exists(out) and os.path.exists(data) and os.path.samefile(out, data)):
        raise ScbertError(f"--out_path {args.out_path!r} is the input file: choose another path, the input is kept")
    stem = out[: -len(".h5ad")]
    paths = {"h5ad": out, "csv": f"{stem}.csv"}
    if args.label_key:
        paths["metrics"] = f"{stem}_metrics.json"
        paths["confusion"] = f"{stem}_confusion.csv"
    if args.attention in ("type", "cell"):
        paths["attention"] = f"{stem}_attention.csv"
    if args.attention == "cell":
        paths["attention_cells"] = f"{stem}_attention_cells.npy"
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not args.overwrite:
        raise ScbertError(
            f"{existing[0]!r} already exists: pass --overwrite True to replace it, or choose another --out_path"
        )
    return paths


def _write_csv(frame: pd.DataFrame, path: str, **kwargs) -> None:
    atomic_write_bytes(path, frame.to_csv(**kwargs).encode("utf-8"))


def _load(args: argparse.Namespace) -> tuple[Annotator, Any]:
    """The model and the checked query."""
    annotator = load_annotator(args.model_path, label_dict=args.label_dict, heads=args.heads,
                               novel_type=args.novel_type)
    check_model_flags(annotator, gene_num=args.gene_num, bin_num=args.bin_num, pos_embed=args.pos_embed)
    depth = len(annotator.model.named_blocks())
    if args.attention != "none" and not -depth <= args.attention_layer < depth:
        raise ScbertError(f"--attention_layer {args.attention_layer} does not exist in a model of depth {depth}: pass "
                          f"a layer from {-depth} to {depth - 1} (-1 is the last, as in the paper)")
    fix = f"run preprocess.py --ref {args.model_path} on the raw data so it uses the model's genes in order"
    adata = read_preprocessed(args.data_path, genes=annotator.ckpt.genes, fix_genes=fix)
    check_query(adata, annotator, data_name=repr(args.data_path))
    if args.label_key is not None and args.label_key not in adata.obs:
        columns = ", ".join(map(str, list(adata.obs.columns)[:10])) or "none"
        raise ScbertError(f"--label_key {args.label_key!r} is not a column of obs in {args.data_path!r} "
                          f"(columns: {columns}): pass one of them or drop the flag")
    return annotator, adata


def _predict(args, ctx: DistContext, annotator: Annotator, adata, paths: dict[str, str]):
    sink = None
    if args.attention != "none":
        sink = AttentionSink(annotator.classes, adata.n_obs, adata.n_vars, novel_type=args.novel_type,
                             unassign_thres=args.unassign_thres, cells_path=paths.get("attention_cells"), ctx=ctx)
    print0(f"predicting {adata.n_obs} cells x {adata.n_vars} genes with {len(annotator.classes)} classes on "
           f"{ctx.device} x {ctx.world_size}", ctx=ctx, file=sys.stderr)
    try:
        predictions = predict_cells(
            annotator.model, adata.X, batch_size=args.batch_size, device=ctx.device, amp=args.amp,
            embeddings=args.embeddings, attention_layer=args.attention_layer if sink else None, on_attention=sink,
            progress=ctx.is_main, ctx=ctx,
        )
    except BaseException:
        if sink is not None:
            sink.discard()
        raise
    rate = adata.n_obs / max(predictions.seconds, 1e-9)
    print0(f"predicted {adata.n_obs} cells in {predictions.seconds:.1f} s ({rate:.1f} cells/s)", ctx=ctx,
           file=sys.stderr)
    return predictions, sink


def _write_outputs(args, adata, annotator: Annotator, predictions: Predictions, paths: dict[str, str]):
    """Rank 0: the metrics files (with --label_key), the CSV and the .h5ad; returns the metrics or None."""
    metrics = None
    if args.label_key is not None:
        metrics, confusion = score_annotations(adata, args.label_key, annotator.classes, novel_type=args.novel_type)
        atomic_write_bytes(paths["metrics"], (json.dumps(metrics, indent=2) + "\n").encode("utf-8"))
        _write_csv(confusion, paths["confusion"])
        print(format_metrics(metrics), file=sys.stderr)
        if confusion.shape[1] <= 12:
            print(confusion.to_string(), file=sys.stderr)
    labels = adata.obs["scbert_celltype"].astype(str).to_numpy()
    table = pd.DataFrame({"cell_id": adata.obs_names.astype(str), "scbert_celltype": labels,
                          "scbert_confidence": adata.obs["scbert_confidence"].to_numpy()})
    for i, name in enumerate(annotator.classes):
        table[f"prob_{name}"] = predictions.probs[:, i]
    _write_csv(table, paths["csv"], index=False, float_format="%.6g")
    atomic_write_h5ad(adata, paths["h5ad"])
    counts = pd.Series(labels).value_counts()
    summary = ", ".join(f"{name} {n}" for name, n in counts.head(8).items())
    print(f"labels: {summary}{', ...' if len(counts) > 8 else ''}", file=sys.stderr)
    print("wrote " + ", ".join(paths.values()), file=sys.stderr)
    return metrics


def main(argv: Sequence[str] | None = None) -> PredictResult:
    args = get_args_parser().parse_args(argv)
    if not 0.0 <= args.unassign_thres <= 1.0:
        raise ScbertError(f"--unassign_thres must be a probability in [0, 1], got {args.unassign_thres}")
    if args.batch_size < 1:
        raise ScbertError(f"--batch_size must be at least 1, got {args.batch_size}")
    paths = output_paths(args)
    ctx = setup_distributed(args, device=args.device)
    try:
        torch.manual_seed(args.seed)
        annotator, adata = _load(args)
        predictions, sink = _predict(args, ctx, annotator, adata, paths)
        params = annotation_params(
            annotator, data_path=os.path.abspath(args.data_path), novel_type=bool(args.novel_type),
            unassign_thres=float(args.unassign_thres), seed=int(args.seed), batch_size=int(args.batch_size),
            amp=args.amp, device=ctx.device, label_dict=args.label_dict, label_key=args.label_key,
            embeddings=args.embeddings, attention=args.attention,
            attention_layer=int(args.attention_layer) if args.attention != "none" else None)
        write_annotations(adata, predictions, annotator.classes, novel_type=args.novel_type,
                          unassign_thres=args.unassign_thres, params=params)
        if sink is not None:
            sink.finish(adata.var_names, paths["attention"], paths.get("attention_cells"))
        metrics = _write_outputs(args, adata, annotator, predictions, paths) if ctx.is_main else None
    finally:
        cleanup_distributed(ctx)
    return PredictResult(adata=adata, paths=paths, predictions=predictions, metrics=metrics,
                         params=adata.uns["scbert_predict"]["params"])


if __name__ == "__main__":
    run_cli(main)
