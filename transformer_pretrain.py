"""Value-regression pretraining of the transformer family: what `pretrain.py --model_type transformer` runs.

The recipe (scLLM-pretrain / scGPT): bins from `preprocess.py --recipe scgpt`; cells
of non-zero genes with `<cls>` first, capped at `--max_seq_len` 1201 by random subsampling; masks (value -1) redrawn
every epoch at `--mask_ratio` 0.5 (or one of 0.25/0.5/0.75 per batch with `--mask_ratio scgpt`), never on `<cls>` or
pads; loss = masked MSE of the expression decoder + masked MSE of the MVC decoder; Adam lr 1e-4, clip 1.0, StepLR
0.9 per epoch, batch 32, 6 epochs, 3% validation; `<model_name>_best.pth` = the best validation expression MSE. The
log line of each epoch carries both losses and the baselines: each cell's mean bin and the constant mean.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from transformer_model import MASK_RATIOS, GeneVocab, baseline_mses, constant_mse, mask_values, pretraining_losses
from utils import ScbertError

VALID_SIZE = 0.03  # scLLM: train_test_split(test_size=0.03)
GRAD_CLIP = 1.0
STEP_GAMMA = 0.9  # StepLR(step_size=1 epoch, gamma=0.9)
# The recipe's values of the shared flags, used when the family is transformer and the flag was not given.
RECIPE_DEFAULTS = dict(dim=512, depth=12, heads=8, batch_size=32, epoch=6, learning_rate=1e-4, grad_acc=1,
                       model_name="scgpt_pretrain")


def add_transformer_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("transformer family (--model_type transformer)")
    group.add_argument("--mask_ratio", default="0.5",
                       help="share of each cell's genes whose value is hidden: a number (scLLM: 0.5), or 'scgpt' to "
                            "draw 0.25, 0.5 or 0.75 per batch")
    group.add_argument("--max_seq_len", type=int, default=1201,
                       help="tokens per cell at most (<cls> + genes; longer cells are subsampled, <cls> kept)")
    group.add_argument("--ff_dim", type=int, default=None, help="feed-forward width (default: --dim, as the recipe)")
    group.add_argument("--dropout", type=float, default=0.2, help="dropout everywhere (recipe 0.2)")
    group.add_argument("--lr_schedule", choices=["step", "cosine"], default="step",
                       help="pretraining schedule: 'step' (scLLM: x0.9 after every epoch) or 'cosine' (scGPT: linear "
                            "warm-up, then cosine decay to 0 over the run, stepped after every optimiser step)")
    group.add_argument("--warmup", type=float, default=10000,
                       help="with --lr_schedule cosine: warm-up optimiser steps (scGPT: 10000), or below 1 a fraction "
                            "of the run's steps (for small runs)")


# Annotation fine-tuning (scGPT's tutorial): everything trains, batch 32, 10 epochs, lr 1e-4, StepLR 0.9 per epoch.
FINETUNE_DEFAULTS = dict(batch_size=32, epoch=10, learning_rate=1e-4, grad_acc=1, unfreeze_layers="all")


def given_flags(argv: Sequence[str]) -> set[str]:
    """Names of the flags present in argv (`--name value` or `--name=value`)."""
    return {a.split("=", 1)[0].lstrip("-") for a in argv if a.startswith("--")}


def step_lr(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.StepLR:
    """The recipe's schedule: the learning rate times 0.9 after every epoch (scLLM; scGPT's annotation tutorial)."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=STEP_GAMMA)


def cosine_warmup_factor(step: int, warmup: int, total: int) -> float:
    """scGPT's schedule as a multiple of the base lr after `step` optimiser steps: step / warmup during the warm-up,
    then 0.5 * (1 + cos(pi * progress)) with progress from 0 to 1 over the remaining steps (0 from `total` on)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


class PerStepCosine:
    """`--lr_schedule cosine`: a LambdaLR advanced by an optimiser post-step hook (every optimiser step, as scGPT),
    so the run loop's once-per-epoch `step()` is a no-op; state_dict/load_state_dict make resuming exact."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, warmup: int, total: int):
        self.warmup, self.total = warmup, total
        self.inner = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_warmup_factor(step, self.warmup, self.total))
        self._hook = optimizer.register_step_post_hook(lambda *_: self.inner.step())

    def step(self) -> None:  # the per-epoch call of the run loop: the hook already stepped
        return None

    def get_last_lr(self) -> list[float]:
        return self.inner.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "warmup": self.warmup, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "inner" not in state:
            raise ScbertError("the checkpoint's run used --lr_schedule step, not cosine: resume it with --lr_schedule "
                              "step, or pass another --model_name for a new run")
        self.inner.load_state_dict(state["inner"])
        for group, lr in zip(self.inner.optimizer.param_groups, self.inner.get_last_lr(), strict=True):
            group["lr"] = lr  # LambdaLR's load leaves the optimiser's rate as it was


def pretrain_scheduler(args: argparse.Namespace, n_train: int, ctx):
    """The `make_scheduler` of pretraining: StepLR 0.9 per epoch, or the cosine with warm-up over the run's optimiser
    steps (per rank: ceil(cells / ranks) cells in batches of --batch_size, one step per --grad_acc batches)."""
    if args.lr_schedule == "step":
        return step_lr
    batches = math.ceil(math.ceil(n_train / ctx.world_size) / args.batch_size)
    total = args.epoch * math.ceil(batches / max(1, args.grad_acc))
    if getattr(args, "max_steps", None):
        total = min(total, int(args.max_steps))  # --max_steps ends the run first
    if args.warmup <= 0:
        raise ScbertError(f"--warmup {args.warmup} must be positive: pass steps (scGPT: 10000) or a fraction below 1")
    warmup = int(round(args.warmup * total)) if args.warmup < 1 else int(args.warmup)
    if warmup >= total:
        from distributed import print0

        print0(f"note: --warmup {warmup} steps is not shorter than the run's {total} optimiser steps, so the learning "
               "rate only rises; pass a fraction such as --warmup 0.1 for a short run", ctx=ctx)
    return lambda optimizer: PerStepCosine(optimizer, warmup=warmup, total=total)


def apply_recipe_defaults(args: argparse.Namespace, argv: Sequence[str], defaults: dict | None = None) -> None:
    """Set the recipe's value of each shared flag the user did not pass (the Performer keeps its published ones)."""
    given = given_flags(argv)
    for name, value in (RECIPE_DEFAULTS if defaults is None else defaults).items():
        if name not in given:
            setattr(args, name, value)


def parse_mask_ratio(text: str) -> float | tuple[float, ...]:
    if str(text).strip().lower() == "scgpt":
        return MASK_RATIOS
    try:
        ratio = float(text)
    except ValueError:
        raise ScbertError(f"--mask_ratio {text!r} is not a number or 'scgpt': pass for example 0.5") from None
    if not 0.0 < ratio < 1.0:
        raise ScbertError(f"--mask_ratio {ratio} must be between 0 and 1: pass for example 0.5")
    return ratio


def regression_stats(model, batch: dict[str, torch.Tensor], ratio, pad_id: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mask, predict, and the additive stats of both losses and both baselines (sums over masked positions)."""
    masked, chosen, _ = mask_values(batch, ratio, pad_id=pad_id, generator=generator)
    losses = pretraining_losses(model, batch, masked, chosen)
    n = chosen.sum()
    base = baseline_mses(batch, chosen, pad_id)
    stats = {"expr_sse": losses["expr"].detach() * n, "mvc_sse": losses["mvc"].detach() * n, "masked": n,
             "cell_mean_sse": base["cell_mean_sse"], "sum": base["sum"], "sum_sq": base["sum_sq"]}
    return losses["loss"], stats


class BestValue:
    """The best validation expression MSE so far and its epoch (saved with every epoch checkpoint)."""

    def __init__(self):
        self.value, self.epoch = float("inf"), 0

    def update(self, value: float, epoch: int) -> bool:
        if value < self.value:
            self.value, self.epoch = float(value), int(epoch)
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.epoch = float(state["value"]), int(state["epoch"])


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summarise(totals: dict[str, Any], prefix: str) -> dict[str, Any]:
    n = float(totals["masked"])
    moments = {"n": n, "sum": float(totals["sum"]), "sum_sq": float(totals["sum_sq"])}
    return {f"{prefix}_mse": _ratio(float(totals["expr_sse"]), n),
            f"{prefix}_mvc_mse": _ratio(float(totals["mvc_sse"]), n),
            f"{prefix}_cell_mean_mse": _ratio(float(totals["cell_mean_sse"]), n),
            f"{prefix}_constant_mse": constant_mse(moments)}


def epoch_line(record: dict[str, Any]) -> str:
    line = (f"epoch {record['epoch']:3d} | lr {record['lr']:.2e} | train loss {record['train_loss']:.3f} "
            f"(mse {record['train_mse']:.2f} + mvc {record['train_mvc_mse']:.2f})")
    if "valid_mse" in record:
        line += (f" | valid mse {record['valid_mse']:.2f} mvc {record['valid_mvc_mse']:.2f} vs cell-mean "
                 f"{record['valid_cell_mean_mse']:.2f}, constant {record['valid_constant_mse']:.2f}")
    return line + f" | {record['cells_per_s']:.1f} cells/s | {record['train_time']:.1f} s"


def pretrain_transformer(args: argparse.Namespace, ctx) -> list[dict[str, Any]]:
    """The run; returns the per-epoch records (also in the JSONL log)."""
    from performer_pytorch import load_checkpoint
    from run_state import RunSettings, refuse_fresh_over
    from training import (
        CellDataset,
        build_model_from_args,
        fit,
        load_training_data,
        named_checkpoint_path,
        print0,
        resolve_resume,
        save_training_checkpoint,
        split_indices,
        start_run,
    )

    ratio = parse_mask_ratio(args.mask_ratio)
    if args.max_seq_len < 2:
        raise ScbertError(f"--max_seq_len {args.max_seq_len} leaves no room for genes: pass at least 2 (recipe 1201)")
    resume_path = resolve_resume(args)
    start_path = resume_path or args.model_path
    start = load_checkpoint(start_path) if start_path else None
    if start is not None and start.model_type != "transformer":
        raise ScbertError(f"{start_path!r} holds a {start.model_type!r} model but --model_type is transformer: pass "
                          "a transformer checkpoint, or --model_type " + start.model_type)
    adata = load_training_data(args, genes=start.genes if start else None, genes_source=start_path)
    genes = args.genes
    vocab = GeneVocab(genes)
    vocab.max_seq_len = args.max_seq_len
    best_path = named_checkpoint_path(args.ckpt_dir, args.model_name, "best")
    refuse_fresh_over(best_path, resume_path)
    from pretrain import validation_subsample
    train_idx, valid_idx = validation_subsample(*split_indices(adata.n_obs, VALID_SIZE, args.seed), args)
    best = BestValue()
    settings = RunSettings(repr(resume_path), dim=args.dim, depth=args.depth, heads=args.heads,
                           mask_ratio=str(args.mask_ratio), max_seq_len=args.max_seq_len,
                           lr_schedule=args.lr_schedule)
    def make_model():
        model = build_model_from_args(args, genes, checkpoint_path=start_path, head="lm")
        model.vocab.max_seq_len = args.max_seq_len  # start_run gives the datasets the model's vocabulary
        return model

    run = start_run(args, ctx, make_model=make_model,
                    genes=genes, train_set=CellDataset(adata.X, indices=train_idx, vocab=vocab),
                    valid_set=CellDataset(adata.X, indices=valid_idx, vocab=vocab), resume_path=resume_path,
                    clip_norm=GRAD_CLIP, state={"best": best, "settings": settings},
                    make_scheduler=pretrain_scheduler(args, len(train_idx), ctx))
    n_params = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    print0(f"pretraining the transformer on {ctx.device} x {ctx.world_size}: {len(train_idx)} train / "
           f"{len(valid_idx)} valid cells, {len(genes)} genes, {n_params:,} parameters, epochs "
           f"{run.start_epoch}..{args.epoch}", ctx=ctx)
    generator = torch.Generator(device="cpu").manual_seed(args.seed + 1_000_003 * (ctx.rank + 1))

    def loss_fn(model, batch):
        return regression_stats(model, batch, ratio, vocab.pad_id)

    def valid_fn(model, batch):
        return regression_stats(model, batch, ratio, vocab.pad_id, generator)[1]

    def train_summary(train: dict[str, Any]) -> dict[str, Any]:
        return {"train_loss": train["loss"], **summarise(train, "train"), "train_cells": int(train["cells"]),
                "cells_per_s": train["cells_per_s"], "train_time": train["time"]}

    def valid_summary(valid: dict[str, Any], epoch: int) -> dict[str, Any]:
        out = summarise(valid, "valid")
        return {**out, "valid_cells": int(valid["cells"]), "valid_time": valid["time"],
                "best": best.update(out["valid_mse"], epoch)}

    def after_save(record: dict[str, Any]) -> None:
        if record.get("best"):
            save_training_checkpoint(best_path, model=run.model, ctx=ctx, genes=genes, epoch=record["epoch"],
                                     args=args, metrics={k: v for k, v in record.items() if isinstance(v, float)})

    records = fit(run, loss_fn, valid_fn, train_summary=train_summary, valid_summary=valid_summary, line=epoch_line,
                  after_save=after_save)
    print0(f"best validation expression MSE {best.value:.3f} at epoch {best.epoch}: {os.path.abspath(best_path)}",
           ctx=ctx)
    return records
