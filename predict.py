"""Annotate cells with a fine-tuned scBERT model, call novel types `Unassigned`, and write results people keep.

    python predict.py --data_path query.h5ad --model_path finetuned_best.pth --novel_type True --unassign_thres 0.5
    python predict.py --data_path counts.h5ad --model_path finetuned_best.pth --preprocess True --plots True \
        --majority_voting True
    python predict.py --show_model finetuned_best.pth

The query is preprocess.py's output for the model's gene list (`preprocess.py --ref <checkpoint>`), or with
`--preprocess True` the user's own counts (.h5ad, 10x folder or .h5, csv/tsv), preprocessed on the fly onto the
checkpoint's genes with every cell kept (user_data.py). This script is the command line of `annotate.py` (the same
labelling from a notebook: `annotate(adata, model_path, ...)`): cells are labelled with the argmax class; with
`--novel_type True` a cell whose top probability is below `--unassign_thres` is `Unassigned` (SPEC section 5);
`--mode prob_match` and `--majority_voting True` refine labels as CellTypist does (voting.py). Under `torchrun
--nproc_per_node N predict.py ...` each rank predicts a shard of the cells and rank 0 writes the files.

Files written (never over the input; an existing output only with `--overwrite True`), listed in
annotation_files.py: `<out>.h5ad` (default `<data stem>_scbert.h5ad` beside the input: the user's AnnData, every
cell, plus the fields annotate.py lists), `<out>.csv` (cell_id, scbert_celltype, scbert_confidence, then
prob_<class> for every class), with --label_key the metrics JSON and confusion CSV, with --attention the attention
tables (performer_pytorch/interpret.py), `<out stem>_summary.csv` (unless --summary False), with --plots True three PNGs
(plots.py). A shard folder (preprocess.py --out_format shards) or `--backed True` is read in row blocks of
`--block_cells` cells, memory bounded by the block, with CSV outputs only (predict_stream.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import canal
from annotate import (
    EMBEDDING_HELP,
    MODES,
    NOVEL_METHODS,
    Annotator,
    Predictions,
    Refinement,
    annotation_params,
    canal_novel_cells,
    check_novel_method,
    finish_annotations,
    predict_query,
)
from annotation_files import output_paths, quiet_printer, read_query, write_all
from distributed import cleanup_distributed, setup_distributed
from model_card import show_model
from predict_stream import BLOCK_CELLS, is_streamed, predict_streamed
from utils import ScbertError, run_cli, str2bool


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Annotate the cells of a preprocessed .h5ad with a fine-tuned scBERT checkpoint; write an .h5ad "
        "and a CSV with labels, confidences and class probabilities.",
        add_help=add_help,
    )
    parser.add_argument("--data_path", required=True,
                        help="query .h5ad from preprocess.py --ref <checkpoint> (log2(1 + CP10K) over the model's "
                        "genes, in its order), or a shard folder from preprocess.py --ref <checkpoint> --out_format "
                        "shards (read in row blocks: predict_stream.py)")
    parser.add_argument("--model_path", required=True,
                        help="fine-tuned checkpoint (finetune.py's <model_name>_best.pth, or the reference's with "
                        "--label_dict); GPU checkpoints load on CPU")
    parser.add_argument("--novel_type", type=str2bool, default=False,
                        help="True: call cells whose top probability is below --unassign_thres 'Unassigned' "
                        "(novel types); False (default): always the argmax class")
    parser.add_argument("--unassign_thres", type=float, default=0.5,
                        help="top-probability threshold for --novel_type True, in [0, 1] (default: %(default)s, "
                        "as published)")
    parser.add_argument("--novel_method", choices=list(NOVEL_METHODS), default="threshold",
                        help="how --novel_type True calls novel cells: threshold (published: top probability below "
                        "--unassign_thres) or canal (CANAL: energy and confidence against a threshold set by virtual "
                        "outliers mixed from the query's cells; seeded by --seed; see canal.py)")
    parser.add_argument("--novel_temperature", type=float, default=canal.TEMPERATURE,
                        help="energy temperature of --novel_method canal (CANAL: %(default)s)")
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
    add_annotation_flags(parser)
    return parser


def add_annotation_flags(parser: argparse.ArgumentParser) -> None:
    """The flags CellTypist and scanpy users expect: own-file input, label refinement, plots, quiet output."""
    group = parser.add_argument_group("your own file, label refinement, pictures")
    group.add_argument("--preprocess", type=str2bool, default=False,
                       help="True: --data_path holds counts (.h5ad with counts in X, a 'counts' layer or .raw; a 10x "
                       "folder or .h5; csv/tsv), preprocessed here onto the checkpoint's genes as preprocess.py does; "
                       "the output is your AnnData with every cell (default: %(default)s: a preprocess.py output)")
    group.add_argument("--min_genes", type=int, default=200,
                       help="with --preprocess True: cells with fewer expressed model genes are not scored, labelled "
                       "Unscored with a reason column (published preprocessing: 200)")
    group.add_argument("--counts_from", default="auto",
                       help="with --preprocess True: auto (layer 'counts', else X, else .raw), X, raw or layer:NAME")
    group.add_argument("--transpose", type=str2bool, default=False,
                       help="with --preprocess True, tables only: True when genes are rows")
    group.add_argument("--prefix", default="scbert_",
                       help="start of every obs/obsm/uns key written, e.g. obs['<prefix>celltype'] (default: "
                       "%(default)s)")
    group.add_argument("--mode", choices=list(MODES), default="best_match",
                       help="best_match: the top class (Unassigned below --unassign_thres with --novel_type True); "
                       "prob_match: every class with probability >= --p_thres, joined 'A|B', Unassigned if none")
    group.add_argument("--p_thres", type=float, default=0.5,
                       help="--mode prob_match threshold; the probabilities sum to 1, so two classes can both pass "
                       "only at 0.5 or below (default: %(default)s)")
    group.add_argument("--majority_voting", type=str2bool, default=False,
                       help="True: each over-cluster takes the majority label of its cells, in "
                       "obs['<prefix>majority_voting'] (default: %(default)s)")
    group.add_argument("--over_clustering", default="auto",
                       help="obs column of over-clusters for --majority_voting, or auto: Leiden on a neighbour graph "
                       "(of the embeddings with --embeddings True, else of the expression's PCA), resolution by "
                       "number of cells (voting.py)")
    group.add_argument("--min_prop", type=float, default=0.0,
                       help="a cluster whose majority label holds less than this share of its cells is Unassigned "
                       "(default: %(default)s)")
    group.add_argument("--plots", type=str2bool, default=False,
                       help="True: UMAP (label, confidence, majority vote), dot plot of top genes per type and a "
                       "confidence histogram, PNGs beside the output; without obsm['X_umap'] the UMAP is computed "
                       "from cell embeddings, so they are computed too (default: %(default)s)")
    group.add_argument("--summary", type=str2bool, default=True,
                       help="write <out stem>_summary.csv, cells and share per predicted type (and per majority "
                       "vote); False: leave it out (default: %(default)s)")
    group.add_argument("--backed", type=str2bool, default=False,
                       help="True: read the .h5ad in row blocks (X stays on disk), as a shard folder always is; "
                       "writes the CSV, summary, params and metrics files, not an .h5ad (predict_stream.py) "
                       "(default: %(default)s)")
    group.add_argument("--block_cells", type=int, default=BLOCK_CELLS,
                       help="cells per row block of a shard folder or --backed True query; memory per process "
                       "grows with it, not with the number of cells (default: %(default)s)")
    group.add_argument("--quiet", type=str2bool, default=False,
                       help="True: print only warnings and errors, no progress bar (default: %(default)s)")
    group.add_argument("--show_model", metavar="PATH", default=None,
                       help="print the model card of a checkpoint (or what an older checkpoint holds) and exit")


@dataclass
class PredictResult:
    """What main() produced: the output AnnData (every cell of the user's), the written paths by kind, the
    predictions of the scored cells, the metrics (with --label_key). A streamed query (predict_stream.py) has no
    AnnData and no predictions in memory: its outputs are the files."""

    adata: Any
    paths: dict[str, str]
    predictions: Predictions | None
    metrics: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)


def _params(args: argparse.Namespace, annotator: Annotator, device) -> dict[str, Any]:
    return annotation_params(
        annotator, data_path=os.path.abspath(args.data_path), novel_type=bool(args.novel_type),
        unassign_thres=float(args.unassign_thres), seed=int(args.seed), batch_size=int(args.batch_size),
        novel_method=args.novel_method if args.novel_type else None, amp=args.amp, device=device,
        label_dict=args.label_dict, label_key=args.label_key, embeddings=args.embeddings, attention=args.attention,
        attention_layer=int(args.attention_layer) if args.attention != "none" else None,
        preprocess=bool(args.preprocess), min_genes=int(args.min_genes) if args.preprocess else None)


def _refinement(args: argparse.Namespace) -> Refinement:
    refine = Refinement(novel_type=bool(args.novel_type), unassign_thres=args.unassign_thres, mode=args.mode,
                        p_thres=args.p_thres, majority_voting=args.majority_voting,
                        over_clustering=args.over_clustering, min_prop=args.min_prop, prefix=args.prefix,
                        seed=args.seed, label_key=args.label_key)
    refine.check()
    if args.batch_size < 1:
        raise ScbertError(f"--batch_size must be at least 1, got {args.batch_size}")
    check_novel_method(args.novel_method, attention=args.attention if args.novel_type else "none")
    return refine


def main(argv: Sequence[str] | None = None) -> PredictResult | str:
    argv = sys.argv[1:] if argv is None else list(argv)
    card = show_model(argv)
    if card is not None:
        return card
    args = get_args_parser().parse_args(argv)
    refine = _refinement(args)
    if is_streamed(args):
        return _main_streamed(args, refine)
    paths = output_paths(args.data_path, args.out_path, label_key=args.label_key, attention=args.attention,
                         plots=args.plots, summary=args.summary, overwrite=args.overwrite)
    ctx = setup_distributed(args, device=args.device)
    say = quiet_printer(args.quiet, ctx.is_main)
    try:
        torch.manual_seed(args.seed)
        annotator, query = read_query(args)
        embeddings = bool(args.embeddings) or (args.plots and "X_umap" not in query.user.obsm)
        use_canal = bool(args.novel_type) and args.novel_method == "canal"
        attention = args.attention
        if args.plots and attention == "none" and annotator.ckpt.model_type != "transformer" and not use_canal:
            attention = "type"  # the dot plot's genes: attention per type, reduced in memory, no file
        predictions, sink = predict_query(
            annotator, query, ctx=ctx, batch_size=args.batch_size, amp=args.amp, embeddings=embeddings,
            attention=attention, attention_layer=args.attention_layer, novel_type=args.novel_type,
            unassign_thres=args.unassign_thres, cells_path=paths.get("attention_cells"), first_hidden=use_canal,
            say=say)
        novelty = None
        if use_canal:
            novelty = canal_novel_cells(annotator.model, predictions, temperature=args.novel_temperature,
                                        seed=args.seed)
            say(f"novel cells (CANAL): threshold {novelty.threshold:.4f}, {int(novelty.novel.sum())} of "
                f"{query.x.shape[0]} cells above it")
        metrics, confusion = finish_annotations(query, annotator, predictions, refine,
                                                _params(args, annotator, ctx.device), novelty=novelty)
        table = None
        if sink is not None:
            table = sink.finish(query.model_input.var_names, paths.get("attention"), paths.get("attention_cells"))
        if ctx.is_main:
            write_all(args, query, annotator, paths, refine, metrics, confusion, say, attention=table)
    finally:
        cleanup_distributed(ctx)
    return PredictResult(adata=query.user, paths=paths, predictions=predictions, metrics=metrics,
                         params=query.user.uns[refine.keys.uns]["params"])


def _main_streamed(args: argparse.Namespace, refine: Refinement) -> PredictResult:
    ctx = setup_distributed(args, device=args.device)
    try:
        paths, record = predict_streamed(args, refine, ctx, quiet_printer(args.quiet, ctx.is_main),
                                         params=lambda annotator: _params(args, annotator, ctx.device))
    finally:
        cleanup_distributed(ctx)
    return PredictResult(adata=None, paths=paths, predictions=None, metrics=record.get("metrics"),
                         params=record["params"])


if __name__ == "__main__":
    run_cli(main)
