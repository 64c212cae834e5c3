"""Fine-tune scBERT to classify cell types (SPEC section 4), with the reference's defects fixed.

The published command keeps working (same flags, same defaults):

    python finetune.py --data_path Zheng68K.h5ad --model_path panglao_pretrain.pth \\
        --epoch 100 --seed 2021 --batch_size 3 --learning_rate 1e-4 --grad_acc 60 --valid_every 1 --pos_embed True \\
        --ckpt_dir ./ckpts/ --model_name finetune

As published, by default: classes = the sorted unique names in `obs[--label_key]`; one stratified 80/20 split with
the base seed; the pretrained trunk frozen except its final `norm` and its second-to-last block, plus a new
classification head; cross-entropy, Adam, `CosineAnnealingWarmupRestarts` stepped once per epoch, gradient clip 1e6;
the best validation accuracy kept; stop after 10 validations without improvement.
Fixed: every cell once per epoch (the reference bootstrapped every epoch, validation included), the loss divided by
the accumulation steps, one writer (rank 0, atomic files), no pickles, plain `python`/`torchrun`/legacy launcher on
CPU or GPU. The reference's choices stay reachable: `--sampling bootstrap`, `--loss_div_grad_acc False`; others are
new: `--unfreeze_layers`, `--class_weight inverse`, `--label_smoothing`, `--n_splits` (k-fold cross-validation).
A small run on a laptop (a tiny pretrained model, e.g. from pretrain.py):

    python finetune.py --data_path train.h5ad --label_key celltype --model_path ckpts/tiny_5.pth \\
        --gene_num <genes> --batch_size 16 --grad_acc 1 --learning_rate 1e-3 --epoch 20 --model_name tiny_ft

Writes, in `--ckpt_dir` (rank 0 only, each file atomically; never over another run's files):
    <model_name>_best.pth            the best epoch's model: config, head, genes, classes, epoch and metrics, so
                                     predict.py needs nothing else
    <model_name>_label_dict.txt      class names, one per line, in class-index order (no pickle)
    <model_name>_label.npy           every cell's class index in data order (np.load, no pickle)
    <model_name>_metrics.json        the best epoch's validation accuracy, macro-F1, per-class precision/recall/F1/
                                     support and confusion matrix
    <model_name>_confusion.csv/.png  that confusion matrix (rows: true class, columns: predicted)
    <model_name>_<epoch>.pth         the latest epoch's full state (rerunning the same command resumes from it)
    <model_name>_log.jsonl           one JSON line per epoch (or --log_path)
With `--n_splits k` (k >= 2) each fold i = 1..k is such a run named `<model_name>_fold<i>`, and
`<model_name>_cv.json` holds every fold's best metrics with their mean and standard deviation.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from classification import (
    attach_head,
    classification_step,
    inverse_frequency_weights,
    make_splits,
    parse_unfreeze,
    read_labels,
    set_trainable,
    summarise_folds,
    train_classifier,
)
from models import checkpoint_model_type, load_model
from performer_pytorch import load_checkpoint
from training import (
    DistContext,
    build_model_from_args,
    check_positive,
    cleanup_distributed,
    get_common_parser,
    load_training_data,
    print0,
    setup_distributed,
)
from transformer_pretrain import FINETUNE_DEFAULTS, apply_recipe_defaults, given_flags, step_lr
from utils import ScbertError, run_cli, str2bool, write_json

GRAD_CLIP = 1e6  # SPEC section 4: the published fine-tuning clip (in effect none; pretraining clips at 100)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fine-tune scBERT on a labelled, preprocessed .h5ad to classify cell types.",
        parents=[get_common_parser()],
        add_help=add_help,
    )
    group = parser.add_argument_group("fine-tuning")
    group.add_argument("--model_path", type=str, default=None,
                       help="pretrained checkpoint (ours or the reference's panglao_pretrain.pth); its architecture "
                            "and gene list win over the size flags. Without it: random weights, the 'no "
                            "pretraining' ablation")
    group.add_argument("--label_key", type=str, default="celltype",
                       help="obs column holding the cell types (classes = its sorted unique values)")
    group.add_argument("--unfreeze_layers", type=str, default="-2",
                       help="Performer blocks that train besides the final norm and the head: comma-separated indices "
                            "(negative count from the end; published: -2), 'all' (the whole trunk except the "
                            "gene2vec table) or 'none' (norm and head only)")
    group.add_argument("--sampling", choices=["epoch", "bootstrap"], default="epoch",
                       help="epoch: every training cell once per epoch; bootstrap: each epoch draws as many cells "
                            "with replacement (the reference's sampling). Validation always sees each cell once")
    group.add_argument("--class_weight", choices=["none", "inverse"], default="none",
                       help="none (as published: the reference computed weights but never used them) or inverse: "
                            "cross-entropy weights 1/class frequency of the training cells, averaging 1 (helps "
                            "imbalanced data)")
    group.add_argument("--label_smoothing", type=float, default=0.0,
                       help="cross-entropy label smoothing in [0, 1) (0 as published)")
    group.add_argument("--n_splits", type=int, default=1,
                       help="1: one stratified 80/20 split (published); k >= 2: stratified k-fold cross-validation, "
                            "one run per fold, with a mean and spread summary in <model_name>_cv.json")
    group.add_argument("--patience", type=int, default=10,
                       help="stop after this many validations in a row without a better accuracy (0: never stop)")
    group.add_argument("--loss_div_grad_acc", type=str2bool, default=True,
                       help="divide the loss by --grad_acc so accumulated gradients average micro-batches; False "
                            "reproduces the reference, which summed them")
    group.add_argument("--keep_epoch_ckpts", type=str2bool, default=False,
                       help="keep every <model_name>_<epoch>.pth; by default only the latest, which resuming needs, "
                            "is kept (each holds the whole model and optimiser)")
    group.add_argument("--description", type=str, default=None,
                       help="one sentence for the model card stored in the best checkpoint (predict.py --show_model "
                            "prints it); default: the data file, label key and number of classes")
    parser.set_defaults(model_name="finetune")
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# Labels, splits, class weights, loss
# ---------------------------------------------------------------------------------------------------------------------


def build_criterion(args: argparse.Namespace, train_labels: np.ndarray, n_classes: int) -> nn.CrossEntropyLoss:
    """Cross-entropy, a mean over the batch, with `--class_weight` and `--label_smoothing`."""
    if not 0.0 <= args.label_smoothing < 1.0:
        raise ScbertError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    weight = inverse_frequency_weights(train_labels, n_classes) if args.class_weight == "inverse" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=args.label_smoothing)


# ---------------------------------------------------------------------------------------------------------------------
# Model: trunk, head, what trains
# ---------------------------------------------------------------------------------------------------------------------


def build_finetune_model(
    args: argparse.Namespace, genes: Sequence[str], classes: Sequence[str], resume_path: str | None = None
) -> nn.Module:
    """The model to fine-tune, with requires_grad set by `--unfreeze_layers`.

    Fresh: the trunk of `--model_path` (any head it had is dropped; genes checked by `build_model_from_args`), or
    random weights from the size flags with a warning; then a new head. Resuming: the architecture and head of the
    epoch checkpoint, whose classes must be these (its weights are loaded afterwards with the optimiser).
    """
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        if ckpt.classes is not None and list(ckpt.classes) != list(classes):
            raise ScbertError(
                f"cannot resume from {resume_path!r}: it was trained on classes {ckpt.classes[:8]} but the data hold "
                f"{list(classes)[:8]}: use the same data and --label_key, or another --model_name"
            )
        model = load_model(ckpt, head="checkpoint")
    else:
        if not args.model_path:
            print("warning: no --model_path: fine-tuning from random weights (the 'no pretraining' ablation)",
                  file=sys.stderr)
        model = build_model_from_args(args, genes, checkpoint_path=args.model_path, head="none")
        trained_with = model.config.get("g2v_position_emb")
        if args.model_path and trained_with is not None and bool(args.pos_embed) != bool(trained_with):
            print(f"warning: --pos_embed {args.pos_embed} ignored: {args.model_path!r} was trained "
                  f"{'with' if trained_with else 'without'} gene2vec embeddings and its weights decide",
                  file=sys.stderr)
        attach_head(model, len(classes))
    set_trainable(model, parse_unfreeze(args.unfreeze_layers, len(model.named_blocks())))
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def _check_flags(args: argparse.Namespace) -> None:
    check_positive(args, "epoch", "batch_size", "grad_acc", "valid_every", "n_splits")
    if args.patience < 0:
        raise ScbertError(f"--patience must be 0 (never stop early) or more, got {args.patience}")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise ScbertError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")


def run_finetuning(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fine-tune as the flags say; returns the best validation metrics of each run (one, or one per fold).

    Every rank returns the same list. With k folds, rank 0 also writes `<model_name>_cv.json`.
    """
    _check_flags(args)
    ctx = setup_distributed(args)
    try:
        return _finetune(args, ctx)
    finally:
        cleanup_distributed(ctx)


def _finetune(args: argparse.Namespace, ctx: DistContext) -> list[dict[str, Any]]:
    start_genes = load_checkpoint(args.model_path).genes if args.model_path else None
    adata = load_training_data(args, genes=start_genes, genes_source=args.model_path)
    genes = [str(g) for g in adata.var_names]
    classes, labels = read_labels(adata.obs, args.label_key, data_name=repr(args.data_path))
    splits = make_splits(labels, n_splits=args.n_splits, seed=args.seed)
    counts = ", ".join(f"{name} {n}" for name, n in zip(classes, np.bincount(labels), strict=True))
    print0(f"{adata.n_obs} cells, {len(genes)} genes, {len(classes)} classes ({counts})", ctx=ctx)

    results = []
    for fold, (train_idx, valid_idx) in enumerate(splits, start=1):
        run_args = copy.copy(args)
        if len(splits) > 1:
            run_args.model_name = f"{args.model_name}_fold{fold}"  # a --log_path is shared; lines name the fold
            print0(f"--- fold {fold} of {len(splits)} ({run_args.model_name}) ---", ctx=ctx)
        criterion = build_criterion(args, labels[train_idx], len(classes)).to(ctx.device)
        best = train_classifier(
            run_args, ctx, adata=adata, genes=genes, classes=classes, labels=labels, train_idx=train_idx,
            valid_idx=valid_idx, loss_fn=classification_step(criterion), clip_norm=GRAD_CLIP,
            make_model=functools.partial(build_finetune_model, args, genes, classes),
            settings={"unfreeze_layers": args.unfreeze_layers}, fold=fold if len(splits) > 1 else None,
            make_scheduler=step_lr if args.model_type == "transformer" else None)  # the recipe's StepLR 0.9
        results.append(best)
    if len(splits) > 1:
        summary = summarise_folds(results)
        if ctx.is_main:
            path = os.path.join(args.ckpt_dir, f"{args.model_name}_cv.json")
            write_json(path, summary)
            print0(f"{len(splits)}-fold cross-validation: accuracy {summary['accuracy']['mean']:.4f} ± "
                   f"{summary['accuracy']['std']:.4f}, macro-F1 {summary['macro_f1']['mean']:.4f} ± "
                   f"{summary['macro_f1']['std']:.4f} (written to {path})", ctx=ctx)
    return results


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    if args.model_path:  # the checkpoint decides the family; an explicit --model_type must agree
        given = given_flags(argv)
        args.model_type = checkpoint_model_type(args.model_path, args.model_type if "model_type" in given else None)
    if args.model_type == "transformer":
        apply_recipe_defaults(args, argv, FINETUNE_DEFAULTS)
    return run_finetuning(args)


if __name__ == "__main__":
    run_cli(main)
