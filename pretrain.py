"""Pretrain scBERT by masked expression-bin modelling (SPEC section 3).

Runs as plain `python pretrain.py ...`, under `torchrun --nproc_per_node N pretrain.py ...` or under the legacy
`python -m torch.distributed.launch`; on CPU (gloo) or GPU (NCCL). A small run that works on a laptop (scanpy's
pbmc68k_reduced preprocessed onto its own 737 genes, and a width-32 gene2vec table built from it by gene2vec.py):

    python pretrain.py --data_path pbmc_pp.h5ad --gene_num 737 --gene2vec_path pbmc_g2v.npy \
        --dim 32 --depth 2 --heads 4 --dim_head 16 --batch_size 16 --grad_acc 1 --learning_rate 2e-3 --epoch 12

takes about 10 s per epoch on one CPU thread and ends with a validation masked-bin accuracy of 0.63 against 0.55
for the most-common-bin baseline. The published run is the defaults with `--data_path <panglao .h5ad>
--gene2vec_path <16906-gene table>`, under `torchrun --nproc_per_node <GPUs>`.

Writes, in `--ckpt_dir`: `<model_name>_<epoch>.pth` after every epoch (the reference's keys plus config, genes,
optimiser, scheduler and random states; rerunning the same command resumes from the last one) and
`<model_name>_log.jsonl`, one JSON line per epoch with train/valid loss, masked-bin accuracy, the accuracy of
predicting each cell's most common non-zero bin (the baseline to beat), learning rate and throughput.

`--model_type transformer` pretrains the scGPT-style transformer instead (transformer_pretrain.py): data from
`preprocess.py --recipe scgpt`, the recipe's sizes and schedule unless the flags are given, `<model_name>_best.pth`
by validation expression MSE.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from masking import mask_tokens, masked_accuracy, most_common_bin
from performer_pytorch import load_checkpoint
from training import (
    CellDataset,
    build_model_from_args,
    check_model_flags,
    check_positive,
    cleanup_distributed,
    fit,
    get_common_parser,
    load_training_data,
    print0,
    resolve_log_path,
    resolve_resume,
    setup_distributed,
    split_indices,
    start_run,
)
from transformer_pretrain import add_transformer_flags, apply_recipe_defaults, pretrain_transformer
from utils import ScbertError, run_cli

VALID_SIZE = 0.05  # SPEC section 3: 5% of cells, train_test_split(test_size=0.05, random_state=seed)
GRAD_CLIP = 100.0  # SPEC section 3: gradient-norm clip 1e2


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pretrain scBERT by predicting masked expression bins of a preprocessed .h5ad.",
        parents=[get_common_parser()],
        add_help=add_help,
    )
    group = parser.add_argument_group("pretraining")
    group.add_argument("--mask_prob", type=float, default=0.15,
                       help="fraction of each cell's non-zero genes chosen for prediction (ceil(p * n) per cell)")
    group.add_argument("--replace_prob", type=float, default=0.9,
                       help="fraction of chosen genes replaced by the mask token; the rest are left as they are")
    group.add_argument("--model_path", type=str, default=None,
                       help="start from this checkpoint's weights and architecture (continued pretraining); the "
                            "model-size flags are then taken from the checkpoint")
    group.add_argument("--valid_cells", type=int, default=None,
                       help="validate on at most this many of the held-out cells, a fixed seeded subsample (the rest "
                            "stay held out), so validating a million-cell corpus takes minutes; default: all 5%%")
    add_transformer_flags(parser)
    parser.set_defaults(model_name="panglao_pretrain")
    return parser


def masked_lm_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    mask_prob: float,
    replace_prob: float,
    bin_num: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mask a batch, predict it; loss = cross-entropy averaged over the chosen positions (ignore_index = pad).

    batch["tokens"]: (cells, genes + 1). Returns (loss, {"correct", "masked", "baseline_correct", "loss_sum"}):
    masked-bin hits (bins 1..bin_num), chosen positions, hits of each cell's most common non-zero bin, and the loss
    summed over chosen positions.
    """
    pad = bin_num + 1
    tokens = batch["tokens"]
    inputs, labels, chosen = mask_tokens(tokens, mask_prob=mask_prob, replace_prob=replace_prob,
                                         mask_token_id=pad, pad_token_id=pad, generator=generator)
    logits = model(inputs)  # (cells, genes + 1, bin_num + 2)
    loss_sum = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=pad, reduction="sum")
    masked = chosen.sum()
    # A mean over chosen positions; a batch with none (cells without expressed genes) gives 0 instead of NaN.
    loss = loss_sum / masked.clamp(min=1)
    correct, _ = masked_accuracy(logits.detach(), labels, chosen, bin_num)
    baseline = most_common_bin(tokens, bin_num).unsqueeze(1)  # (cells, 1)
    baseline_correct = ((labels == baseline) & chosen).sum()
    return loss, {"correct": correct, "masked": masked, "baseline_correct": baseline_correct,
                  "loss_sum": loss_sum.detach()}


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def run_pretraining(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Pretrain as the flags say; returns the per-epoch records also written to the JSONL log (on every rank)."""
    if not 0 < args.mask_prob <= 1 or not 0 <= args.replace_prob <= 1:
        raise ScbertError("--mask_prob must be in (0, 1] and --replace_prob in [0, 1]: use e.g. 0.15 and 0.9")
    check_positive(args, "epoch", "batch_size", "grad_acc", "valid_every")
    ctx = setup_distributed(args)
    try:
        if args.model_type == "transformer":
            return pretrain_transformer(args, ctx)
        return _pretrain(args, ctx)
    finally:
        cleanup_distributed(ctx)


def _pretrain(args: argparse.Namespace, ctx) -> list[dict[str, Any]]:
    resume_path = resolve_resume(args)
    start_path = resume_path or args.model_path
    start_genes = load_checkpoint(start_path).genes if start_path else None
    adata = load_training_data(args, genes=start_genes, genes_source=start_path)
    genes = [str(g) for g in adata.var_names]

    def make_model():
        model = build_model_from_args(args, genes, checkpoint_path=start_path, head="lm")
        if resume_path and not args.model_path:
            check_model_flags(args, model.config, resume_path)
        return model

    train_idx, valid_idx = validation_subsample(*split_indices(adata.n_obs, VALID_SIZE, args.seed), args)
    train_set = CellDataset(adata.X, bin_num=args.bin_num, indices=train_idx)
    valid_set = CellDataset(adata.X, bin_num=args.bin_num, indices=valid_idx)
    run = start_run(args, ctx, make_model=make_model, genes=genes, train_set=train_set, valid_set=valid_set,
                    resume_path=resume_path, clip_norm=GRAD_CLIP)
    n_params = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    print0(f"pretraining on {ctx.device} x {ctx.world_size}: {len(train_set)} train / {len(valid_set)} valid cells, "
           f"{len(genes)} genes, {n_params:,} trainable parameters, " + (
               f"optimiser steps {run.position.step + 1}..{args.max_steps}" if args.max_steps
               else f"epochs {run.start_epoch}..{args.epoch}"), ctx=ctx)
    loss_options = dict(mask_prob=args.mask_prob, replace_prob=args.replace_prob, bin_num=args.bin_num)
    records = fit(run, functools.partial(masked_lm_loss, **loss_options), _valid_step(args, ctx, loss_options),
                  train_summary=_train_summary, valid_summary=_valid_summary, line=_epoch_line)
    print0(f"checkpoints in {os.path.abspath(args.ckpt_dir)}, log {os.path.abspath(resolve_log_path(args))}",
           ctx=ctx)
    return records


def validation_subsample(train_idx, valid_idx, args: argparse.Namespace):
    """(train, valid) with valid cut to `--valid_cells` cells drawn once from the seed (the same every epoch, rank
    and resume); the cells left out are not trained on either."""
    limit = getattr(args, "valid_cells", None)
    if limit is not None and limit < 1:
        raise ScbertError(f"--valid_cells must be at least 1 (or left out), got {limit}")
    if limit is None or len(valid_idx) <= limit:
        return train_idx, valid_idx
    return train_idx, np.sort(np.random.default_rng(args.seed).choice(valid_idx, limit, replace=False))


def _train_summary(train: dict[str, Any]) -> dict[str, Any]:
    return {"train_loss": train["loss"], "train_acc": _ratio(train["correct"], train["masked"]),
            "train_baseline_acc": _ratio(train["baseline_correct"], train["masked"]),
            "train_cells": int(train["cells"]), "cells_per_s": train["cells_per_s"], "train_time": train["time"]}


def _valid_summary(valid: dict[str, Any], epoch: int) -> dict[str, Any]:
    return {"valid_loss": _ratio(valid["loss_sum"], valid["masked"]),
            "valid_acc": _ratio(valid["correct"], valid["masked"]),
            "baseline_acc": _ratio(valid["baseline_correct"], valid["masked"]),
            "valid_cells": int(valid["cells"]), "valid_masked": int(valid["masked"]), "valid_time": valid["time"]}


def _valid_step(args: argparse.Namespace, ctx, loss_options: dict[str, Any]):
    # The same masks every epoch (a generator seeded per rank), so validation figures compare across epochs.
    generator = torch.Generator(device=ctx.device).manual_seed(args.seed + 1_000_003 * (ctx.rank + 1))

    def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        _, stats = masked_lm_loss(model, batch, generator=generator, **loss_options)
        return stats

    return step


def _epoch_line(record: dict[str, Any]) -> str:
    line = (f"epoch {record['epoch']:3d} | lr {record['lr']:.2e} | train loss {record['train_loss']:.4f} "
            f"masked acc {record['train_acc']:.4f}")
    if "valid_acc" in record:
        line += (f" | valid loss {record['valid_loss']:.4f} masked acc {record['valid_acc']:.4f} vs most-common-bin "
                 f"baseline {record['baseline_acc']:.4f}")
    return line + f" | {record['cells_per_s']:.1f} cells/s | {record['train_time']:.1f} s"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    if args.model_type == "transformer":
        apply_recipe_defaults(args, argv)  # the recipe's sizes and schedule unless given; the Performer keeps its own
    return run_pretraining(args)


if __name__ == "__main__":
    run_cli(main)
