"""The one run loop of pretraining and fine-tuning: shared flags, the model from flags, the epoch loops, `fit`.

A script declares its loss and its validation step; `fit` does the rest the same way for every kind of run, as plain
`python`, under `torchrun` or under the legacy `python -m torch.distributed.launch`, on CPU (gloo) or GPU (NCCL).

Public API, in the order a script uses it:

- `get_common_parser()`: the shared flags with the published defaults (a parent parser, `add_help=False`);
  `resolve_log_path(args)`, `check_positive(args, *flags)`.
- `build_model_from_args(args, genes, checkpoint_path=..., head=...)`, `check_model_flags`.
- `start_run(args, ctx, ...)` -> `Run`: the model built under the base seed, wrapped for DDP, Adam over what trains,
  the published schedule, AMP, loaders, extra stateful objects, all restored from the resume checkpoint if any.
- `fit(run, loss_fn, valid_fn, ...)`: the epoch skeleton (train, validate every N, schedule, save, log, early stop,
  resume), returning one record per epoch (also written as JSON lines).
- `train_one_epoch(...)` (raises `NonFiniteLossError`), `evaluate(...)`: one pass, training or evaluating.

The plumbing lives in its own modules: processes and random state in distributed.py, data and loaders in data.py,
the schedule and mixed precision in optim.py, checkpoints, resuming and logs in run_state.py. Their names are also
importable from here, so older `from training import ...` lines keep working.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from data import (  # noqa: F401 - re-exported
    BootstrapSampler,
    CellDataset,
    ShardSampler,
    batch_cells,
    build_loader,
    check_checkpoint_genes,
    check_gene_num,
    load_training_data,
    set_loader_epoch,
    split_indices,
    to_device,
)
from distributed import (  # noqa: F401 - re-exported
    DistContext,
    barrier,
    cleanup_distributed,
    gather_tensors,
    print0,
    reduce_mean,
    reduce_sum,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_distributed,
    unwrap_model,
    wrap_model,
)
from models import MODEL_TYPES, BinVocab, build_model, load_model, model_family
from optim import Amp, CosineAnnealingWarmupRestarts, adam_eps, build_scheduler, cosine_warmup_restarts_lr  # noqa: F401
from performer_pytorch import load_checkpoint
from performer_pytorch.checkpoint import DEFAULT_MODEL_TYPE
from run_state import (  # noqa: F401 - re-exported
    JsonlLogger,
    RunPosition,
    RunSettings,
    epoch_checkpoint_path,
    find_latest_checkpoint,
    named_checkpoint_path,
    remove_older_step_checkpoints,
    resolve_resume,
    restore_training_state,
    save_training_checkpoint,
    step_checkpoint_path,
)
from utils import ScbertError, str2bool

__all__ = [
    "NonFiniteLossError",
    "Run",
    "build_model_from_args",
    "check_model_flags",
    "check_positive",
    "evaluate",
    "fit",
    "get_common_parser",
    "resolve_log_path",
    "start_run",
    "train_one_epoch",
]


# ---------------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------------


def get_common_parser() -> argparse.ArgumentParser:
    """The flags pretrain.py and finetune.py share, with the published defaults (a parent parser: `add_help=False`).

    Each script adds its own flags and sets its own `--model_name` default with `parser.set_defaults(...)`.
    `--resume` defaults to None, meaning "automatic": continue from the last complete epoch checkpoint of this
    `--model_name` in `--ckpt_dir` when there is one (so rerunning the same command resumes), start fresh otherwise;
    see `resolve_resume`.
    """
    parser = argparse.ArgumentParser(add_help=False)
    data = parser.add_argument_group("data")
    data.add_argument("--data_path", type=str, default=None,
                      help="preprocessed .h5ad written by preprocess.py (CSR log2(1 + CP10K) over the model's genes), "
                           "or a shard folder from preprocess.py --out_format shards (memory-mapped: large corpora)")
    data.add_argument("--bin_num", type=int, default=5,
                      help="expression bins: token = min(floor(v), bin_num); the mask/pad token is bin_num + 1 "
                           "(published: 5 and 6)")
    data.add_argument("--gene_num", type=int, default=16906,
                      help="genes per cell; must equal the data's gene count (16906 for the published PanglaoDB list)")
    data.add_argument("--num_workers", type=int, default=0,
                      help="DataLoader worker processes per rank; tokenising is cheap, so 0-2 is usually enough")

    run = parser.add_argument_group("run")
    run.add_argument("--ckpt_dir", type=str, default="./ckpts/",
                     help="folder for <model_name>_<epoch>.pth checkpoints and the JSONL log")
    run.add_argument("--model_name", type=str, default=None,
                     help="prefix of checkpoint and log files; a different name starts a separate run")
    run.add_argument("--epoch", type=int, default=100, help="number of epochs (the published runs use 100)")
    run.add_argument("--seed", type=int, default=2021,
                     help="base seed: data splits use it on every rank, masking and dropout use seed + rank")
    run.add_argument("--batch_size", type=int, default=3,
                     help="cells per rank per step (3 fits a full-size model on one GPU); raise it for small models")
    run.add_argument("--learning_rate", type=float, default=1e-4,
                     help="peak learning rate of the warm-up/cosine schedule (the schedule starts at 1e-6)")
    run.add_argument("--grad_acc", type=int, default=60,
                     help="steps of gradient accumulation per optimiser step (effective batch = batch_size * "
                          "grad_acc * ranks); use 1-4 for small data")
    run.add_argument("--valid_every", type=int, default=1, help="validate every this many epochs")
    run.add_argument("--max_steps", type=int, default=None,
                     help="optimiser steps of the whole run (counted across resumes), overriding --epoch: the run "
                          "stops there, mid-epoch if need be, with a checkpoint; for corpora where an epoch is hours")
    run.add_argument("--save_every_steps", type=int, default=None,
                     help="also save <model_name>_epoch<E>_step<S>.pth every this many optimiser steps (only the "
                          "latest is kept), so a killed run resumes mid-epoch at the next unseen batch")
    run.add_argument("--resume", type=str2bool, default=None,
                     help="True: continue from the last complete epoch checkpoint of --model_name in --ckpt_dir; "
                          "False: start fresh (refused if such checkpoints exist, so none is overwritten); "
                          "default: resume when one exists, so rerunning the same command continues the run")
    run.add_argument("--log_path", type=str, default=None,
                     help="JSONL file, one line per epoch (default: <ckpt_dir>/<model_name>_log.jsonl)")

    model = parser.add_argument_group("model")
    model.add_argument("--model_type", choices=sorted(MODEL_TYPES), default=DEFAULT_MODEL_TYPE,
                       help="model family (models.py) when no checkpoint gives one: performer is scBERT's Performer")
    model.add_argument("--pos_embed", type=str2bool, default=True,
                       help="add gene2vec positional embeddings (True needs --gene2vec_path or a checkpoint that "
                            "holds the table)")
    model.add_argument("--gene2vec_path", type=str, default=None,
                       help=".npy of (gene_num, dim) gene2vec rows in the data's gene order (from gene2vec.py)")
    model.add_argument("--dim", type=int, default=200, help="embedding width (200 = gene2vec size in the paper)")
    model.add_argument("--depth", type=int, default=6, help="Performer blocks (6 in the paper)")
    model.add_argument("--heads", type=int, default=10, help="attention heads (10 in the paper)")
    model.add_argument("--dim_head", type=int, default=64,
                       help="width per attention head (64 in the paper); smaller values make tiny test models")

    system = parser.add_argument_group("system")
    system.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when available (NCCL between ranks), else CPU (gloo)")
    system.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                        help="mixed precision: bf16 autocast (CPU or GPU; about 2x faster on CPU) or fp16 with a "
                             "gradient scaler (GPU only)")
    system.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                        help="set by the legacy torch.distributed.launch; the LOCAL_RANK variable wins when present")
    return parser


def resolve_log_path(args: argparse.Namespace) -> str:
    """`--log_path`, or `<ckpt_dir>/<model_name>_log.jsonl` when not given."""
    return args.log_path or os.path.join(args.ckpt_dir, f"{args.model_name}_log.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def build_model_from_args(
    args: argparse.Namespace,
    genes: Sequence[str],
    *,
    checkpoint_path: str | None = None,
    head: str = "lm",
) -> torch.nn.Module:
    """The model of `--model_type` (default the Performer) from the flags, or from a starting checkpoint.

    From flags: the family's `config_from_args` (for the Performer: the vocabulary of --bin_num/--gene_num, the
    sizes, gene2vec from `--gene2vec_path` when `--pos_embed True`); head "lm" builds the pretraining head, "none"
    leaves it off. From a checkpoint: its family, stored architecture and weights (`models.load_model(head=...)`,
    head "lm", "none" or "checkpoint"); its gene list must equal `genes`.
    """
    check_gene_num(args.gene_num, len(genes), args.data_path or "the data")
    if checkpoint_path is not None:
        ckpt = load_checkpoint(checkpoint_path)
        vocab = model_family(ckpt.model_type).vocab_for(ckpt.config)
        check_checkpoint_genes(ckpt.genes, genes, checkpoint_path, n_positions=vocab.gene_num)
        if getattr(vocab, "bin_num", args.bin_num) != args.bin_num:
            raise ScbertError(
                f"{checkpoint_path!r} was trained with {vocab.bin_num} bins but --bin_num is {args.bin_num}: "
                f"pass --bin_num {vocab.bin_num}"
            )
        return load_model(ckpt, head=head)
    model_type = getattr(args, "model_type", DEFAULT_MODEL_TYPE)
    config, options = model_family(model_type).config_from_args(args)
    return build_model(model_type, config, **options, lm_head=head == "lm")  # lm_head: the family's pretraining head


def check_model_flags(args: argparse.Namespace, config: dict[str, Any], path: str) -> None:
    """The model-size flags must describe the checkpoint being resumed (rerunning the same command does)."""
    vocab = BinVocab(bin_num=args.bin_num, gene_num=args.gene_num)
    wanted = {"dim": args.dim, "depth": args.depth, "heads": args.heads, "dim_head": args.dim_head,
              "g2v_position_emb": args.pos_embed, **vocab.config()}
    flag = {"g2v_position_emb": "--pos_embed", "num_tokens": "--bin_num (+2)", "max_seq_len": "--gene_num (+1)"}
    differing = [k for k, v in wanted.items() if k in config and config[k] != v]
    if differing:
        detail = ", ".join(f"{flag.get(k, '--' + k)} {wanted[k]} vs {config[k]}" for k in differing)
        raise ScbertError(
            f"the flags differ from the run saved in {path!r} ({detail}): rerun with that run's flags to resume it, "
            "or pass another --model_name or --ckpt_dir to start a separate run"
        )


# ---------------------------------------------------------------------------------------------------------------
# Loops
# ---------------------------------------------------------------------------------------------------------------


class NonFiniteLossError(ScbertError):
    """The loss (or the gradient norm) became NaN or infinite: training stops, earlier checkpoints are kept."""


def _accumulate(totals: dict[str, Any], stats: dict[str, Any]) -> None:
    for key, value in stats.items():
        value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
        totals[key] = totals.get(key, 0.0) + value


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]],
    *,
    ctx: DistContext,
    epoch: int,
    grad_acc: int = 1,
    clip_norm: float | None = None,
    divide_by_grad_acc: bool = True,
    amp: Amp | None = None,
    last_good: str | None = None,
    desc: str = "train",
    start_batch: int = 0,
    on_step: Callable[[int], bool] | None = None,
) -> dict[str, float]:
    """One pass over `loader` with gradient accumulation; returns metrics summed/averaged over all ranks.

    loss_fn(model, batch) -> (loss, stats): batch is already on ctx.device and the call runs under autocast; loss is
    a scalar mean over the batch; stats are additive numbers (floats or 0-dim tensors), summed over steps and ranks.
    Every `grad_acc` micro-steps (and at the end of the epoch, for a partial accumulation) the gradients are
    all-reduced (DDP `no_sync()` on the other micro-steps), clipped to `clip_norm`, stepped and zeroed. With
    `divide_by_grad_acc`, each micro-step's loss is divided by grad_acc before backward.
    start_batch: micro-batches of this epoch trained before a mid-epoch resume (the loader's sampler already skips
    them), so accumulation boundaries fall where they did. on_step(batches done in the epoch) runs after every
    optimiser step (mid-epoch checkpoints) and returns True to end the epoch there (`--max_steps`).
    A non-finite loss or gradient norm raises `NonFiniteLossError` (on every rank together), naming the epoch and step
    and `last_good`, the checkpoint that is kept.
    Returns {"loss": mean loss per step, "cells": cells seen (all ranks), "steps", "time", "cells_per_s",
    **summed stats}.
    """
    from tqdm import tqdm

    amp = amp or Amp("none", ctx.device)
    grad_acc = max(1, int(grad_acc))
    parameters = [p for p in model.parameters() if p.requires_grad]
    model.train()
    optimizer.zero_grad(set_to_none=True)
    n_steps = start_batch + len(loader)  # micro-batches of the whole epoch
    totals: dict[str, Any] = {}
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    cells = done = 0
    bad_step: int | None = None
    start = time.perf_counter()
    bar = tqdm(total=n_steps, initial=start_batch, desc=f"epoch {epoch} {desc}", disable=not ctx.is_main,
               dynamic_ncols=True, mininterval=1.0, leave=False, file=sys.stderr)
    failure = _failure_message(epoch, last_good)
    try:
        for step, batch in enumerate(_epoch_batches(loader, resumed=start_batch > 0), start=start_batch):
            batch = to_device(batch, ctx.device)
            sync_now = (step + 1) % grad_acc == 0 or step + 1 == n_steps
            divisor = grad_acc if divide_by_grad_acc else None
            loss, stats, bad_step = _micro_step(model, batch, loss_fn, amp=amp, ctx=ctx, step=step, sync_now=sync_now,
                                                bad_step=bad_step, divisor=divisor, failure=failure)
            if sync_now:
                norm = amp.step(optimizer, parameters, clip_norm)
                optimizer.zero_grad(set_to_none=True)
                if amp.scaler is None and clip_norm is not None and not bool(torch.isfinite(norm)):
                    raise NonFiniteLossError(failure("the gradient norm", step + 1))
            cells += batch_cells(batch)
            done += 1
            loss_sum += loss.detach().double()
            _accumulate(totals, stats)
            if ctx.is_main:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", cells_s=f"{cells * ctx.world_size / elapsed:.1f}",
                                refresh=False)
                bar.update(1)
            if sync_now and on_step is not None and on_step(step + 1):
                break
    finally:
        bar.close()
    # The loop's own totals travel under names a loss_fn's stats cannot take.
    return _epoch_totals({"__loss": loss_sum, "__steps": done, "__cells": cells, **totals}, ctx,
                         time.perf_counter() - start)


def _failure_message(epoch: int, last_good: str | None) -> Callable[[str, int], str]:
    keep = f"; the last good checkpoint {last_good!r} is kept" if last_good else "; earlier checkpoints are kept"
    hint = "lower --learning_rate, or use --amp none if mixed precision is on"
    return lambda what, step: f"{what} became non-finite at epoch {epoch}, step {step}; the run stopped{keep}: {hint}"


def _epoch_batches(loader: DataLoader, *, resumed: bool):
    """The loader's iterator. Making it draws a base seed from torch's global generator; a run resumed mid-epoch has
    that generator restored from after the draw, so the draw is undone to keep masks and dropout on course."""
    if not resumed:
        return iter(loader)
    state = torch.get_rng_state()
    iterator = iter(loader)
    torch.set_rng_state(state)
    return iterator


def _micro_step(model, batch, loss_fn, *, amp: Amp, ctx: DistContext, step: int, sync_now: bool,
                bad_step: int | None, divisor: int | None, failure) -> tuple[torch.Tensor, dict[str, Any], int | None]:
    """Forward and backward of one micro-batch (DDP `no_sync()` unless gradients are all-reduced now)."""
    no_sync = ctx.distributed and not sync_now and hasattr(model, "no_sync")
    with model.no_sync() if no_sync else contextlib.nullcontext():
        with amp.autocast():
            loss, stats = loss_fn(model, batch)
        finite = bool(torch.isfinite(loss.detach()))
        bad_step = _first_bad_step(bad_step, finite, step, sync_now, ctx)
        if bad_step is not None and (sync_now or not ctx.distributed):
            raise NonFiniteLossError(failure("the training loss", bad_step))
        if finite:
            amp.backward(loss / divisor if divisor is not None else loss)
    return loss, stats, bad_step


def _first_bad_step(bad_step: int | None, finite: bool, step: int, sync_now: bool, ctx: DistContext) -> int | None:
    """The first micro-step (1-based) with a non-finite loss on any rank so far; ranks agree at each sync step,
    before the all-reducing backward, so every rank stops together instead of hanging."""
    if not finite and bad_step is None:
        bad_step = step + 1
    if sync_now and ctx.distributed:
        flag = torch.tensor([0 if bad_step is None else 1], device=ctx.device)
        dist.all_reduce(flag)
        if int(flag) and bad_step is None:
            bad_step = step + 1
    return bad_step


def _epoch_totals(local: dict[str, Any], ctx: DistContext, elapsed: float) -> dict[str, float]:
    summed = reduce_sum({k: float(v) for k, v in local.items()}, ctx)
    steps = max(summed.pop("__steps"), 1)
    out = {"loss": summed.pop("__loss") / steps, "cells": summed.pop("__cells"), "steps": steps / ctx.world_size,
           "time": elapsed}
    out["cells_per_s"] = out["cells"] / elapsed if elapsed > 0 else float("nan")
    out.update(summed)
    return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    step_fn: Callable[[torch.nn.Module, Any], dict[str, Any]],
    *,
    ctx: DistContext,
    amp: Amp | None = None,
    desc: str = "valid",
) -> dict[str, Any]:
    """Run `step_fn(model, batch)` over `loader` in eval mode without gradients, on the unwrapped model (so ranks may
    hold different numbers of batches), and combine what it returns over batches and ranks.

    step_fn returns a dict: numbers and 0-dim tensors are summed (over batches and ranks; floats returned);
    tensors with a batch dimension are concatenated (over batches, then gathered over ranks; CPU tensors returned).
    When an "index" tensor is among them, every gathered tensor is put in index order (e.g. dataset order).
    Also returns "cells" (all ranks) and "time".
    """
    from tqdm import tqdm

    amp = amp or Amp("none", ctx.device)
    core = unwrap_model(model)
    was_training = core.training
    core.eval()
    sums: dict[str, Any] = {}
    parts: dict[str, list[torch.Tensor]] = {}
    cells = 0
    start = time.perf_counter()
    try:
        for batch in tqdm(loader, desc=desc, disable=not ctx.is_main, dynamic_ncols=True, mininterval=1.0,
                          leave=False, file=sys.stderr):
            batch = to_device(batch, ctx.device)
            with amp.autocast():
                out = step_fn(core, batch)
            cells += batch_cells(batch)
            for key, value in out.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    parts.setdefault(key, []).append(value.detach())
                else:
                    _accumulate(sums, {key: value})
    finally:
        core.train(was_training)
    if ctx.distributed:
        # A rank may have seen no batch at all (fewer cells than ranks): agree on keys, shapes and dtypes first, so
        # every rank makes the same collective calls.
        mine = (sorted(sums), {k: (tuple(v[0].shape[1:]), str(v[0].dtype)) for k, v in parts.items()})
        everyone: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(everyone, mine)
        for keys, shapes in everyone:
            for key in keys:
                sums.setdefault(key, 0.0)
            for key, (shape, dtype) in shapes.items():
                if key not in parts:
                    parts[key] = [torch.empty((0, *shape), dtype=getattr(torch, dtype.removeprefix("torch.")),
                                              device=ctx.device)]
    summed = reduce_sum({"__cells": cells, **{k: float(v) for k, v in sums.items()}}, ctx)
    result: dict[str, Any] = dict(summed)
    result["cells"] = result.pop("__cells")
    for key in sorted(parts):
        result[key] = gather_tensors(torch.cat(parts[key]), ctx)
    if "index" in parts:
        order = torch.argsort(result["index"])
        for key in parts:
            result[key] = result[key][order]
    result["time"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------------------------------------
# One run: set-up and the epoch skeleton
# ---------------------------------------------------------------------------------------------------------------


def check_step_flags(args: argparse.Namespace) -> None:
    """--max_steps and --save_every_steps, when given, must be at least 1."""
    for flag in ("max_steps", "save_every_steps"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ScbertError(f"--{flag} must be at least 1 (or left out), got {value}")


def check_positive(args: argparse.Namespace, *flags: str) -> None:
    """Each named integer flag must be at least 1."""
    for flag in flags:
        if getattr(args, flag) < 1:
            raise ScbertError(f"--{flag} must be at least 1, got {getattr(args, flag)}")


@dataclass
class Run:
    """What one training run holds. `state` maps names to the extra stateful objects (state_dict/load_state_dict)
    saved with every epoch checkpoint and restored on resume, beside the model, optimiser, schedule and scaler."""

    args: argparse.Namespace
    ctx: DistContext
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: CosineAnnealingWarmupRestarts
    amp: Amp
    genes: list[str]
    train_loader: DataLoader
    valid_loader: DataLoader
    classes: list[str] | None = None
    state: dict[str, Any] = field(default_factory=dict)
    clip_norm: float | None = None
    divide_by_grad_acc: bool = True
    start_epoch: int = 1
    resumed_from: str | None = None

    @property
    def position(self) -> RunPosition:
        """Where the run stands (epoch, batch, optimiser step), saved with every checkpoint as "position"."""
        return self.state["position"]

    @property
    def core(self) -> torch.nn.Module:
        """The model inside any DDP wrapper (for `classify`, `encode`, saving)."""
        return unwrap_model(self.model)


def start_run(
    args: argparse.Namespace,
    ctx: DistContext,
    *,
    make_model: Callable[[], torch.nn.Module],
    genes: Sequence[str],
    train_set: Dataset,
    valid_set: Dataset,
    resume_path: str | None,
    clip_norm: float | None,
    divide_by_grad_acc: bool = True,
    classes: Sequence[str] | None = None,
    state: Mapping[str, Any] | None = None,
    sampler: Sampler | None = None,
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> Run:
    """Set a run up the same way for every script, and restore it from `resume_path` when given.

    `make_model()` runs under the base seed, so every rank and any number of ranks start from the same weights; then
    seed + rank (masking, dropout; SPEC section 7). Adam over the parameters that require grad, the published
    schedule (or `make_scheduler(optimizer)`, stepped once per epoch), `--amp`. Training loader: `sampler`, else a
    shuffling DistributedSampler; validation: every cell once.
    """
    check_step_flags(args)
    amp = Amp(args.amp, ctx.device)
    torch.manual_seed(args.seed)
    model = make_model()
    for dataset in (train_set, valid_set):
        if isinstance(dataset, CellDataset) and hasattr(model, "vocab"):
            dataset.vocab = model.vocab  # cells become the family's batch entries
    seed_everything(args.seed, ctx.rank)
    model = wrap_model(model, ctx, seed=args.seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                 eps=adam_eps(args),  # 1e-4: the transformer recipe under fp16
                                 amsgrad=bool(getattr(args, "amsgrad", False)))  # continual.py: CANAL's amsgrad
    scheduler = make_scheduler(optimizer) if make_scheduler else build_scheduler(optimizer, args.learning_rate)
    run = Run(args=args, ctx=ctx, model=model, optimizer=optimizer, scheduler=scheduler, amp=amp, genes=list(genes),
              classes=list(classes) if classes is not None else None,
              state={**(state or {}), "position": RunPosition(args.batch_size, ctx.world_size)}, clip_norm=clip_norm,
              divide_by_grad_acc=divide_by_grad_acc,
              train_loader=build_loader(train_set, batch_size=args.batch_size, ctx=ctx, train=True, seed=args.seed,
                                        num_workers=args.num_workers, sampler=sampler),
              valid_loader=build_loader(valid_set, batch_size=args.batch_size, ctx=ctx, train=False,
                                        num_workers=args.num_workers))
    if resume_path:
        payload = restore_training_state(resume_path, model=model, ctx=ctx, genes=genes, optimizer=optimizer,
                                         scheduler=run.scheduler, amp=amp, state=run.state)
        run.start_epoch, run.resumed_from = int(payload["epoch"]) + 1, resume_path
        where = (f"next epoch {run.start_epoch} from batch {run.position.batches + 1}" if run.position.mid_epoch
                 else f"next epoch {run.start_epoch}")
        print0(f"resuming from {resume_path} (epoch {payload['epoch']} complete, optimiser step "
               f"{run.position.step}); {where}", ctx=ctx)
    return run


def fit(
    run: Run,
    loss_fn: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]],
    valid_fn: Callable[[torch.nn.Module, Any], dict[str, Any]],
    *,
    train_summary: Callable[[dict[str, Any]], dict[str, Any]],
    valid_summary: Callable[[dict[str, Any], int], dict[str, Any]],
    line: Callable[[dict[str, Any]], str],
    stop_reason: Callable[[], str | None] = lambda: None,
    after_save: Callable[[dict[str, Any]], None] | None = None,
    keep_epoch_ckpts: bool = True,
) -> list[dict[str, Any]]:
    """Epochs `run.start_epoch..--epoch` (with `--max_steps`: until that many optimiser steps): train, validate every
    `--valid_every` (and at the last epoch), step the schedule, save `<model_name>_<epoch>.pth` with every stateful
    object, log a JSON line, print a line. `--save_every_steps K` also saves a mid-epoch checkpoint every K optimiser
    steps (`run_state.step_checkpoint_path`, only the latest kept); a run resumed from one continues at the next
    unseen batch. A run that reaches `--max_steps` mid-epoch saves such a checkpoint, validates and stops.

    loss_fn(model, batch) -> (loss, additive stats), called on the (possibly DDP-wrapped) model; valid_fn(model,
    batch) -> dict gathered by `evaluate`. train_summary(totals) and valid_summary(gathered, epoch) turn them into
    the record's fields. stop_reason() -> a message ends the run (checked before each epoch and after each save).
    after_save(record) runs once the epoch checkpoint is on disk (e.g. to write the best model). Without
    keep_epoch_ckpts only the latest epoch checkpoint, which resuming needs, is kept.
    """
    args, ctx, position = run.args, run.ctx, run.position
    logger = JsonlLogger(resolve_log_path(args), ctx)
    records: list[dict[str, Any]] = []
    last_good = (epoch_checkpoint_path(args.ckpt_dir, args.model_name, run.start_epoch - 1)
                 if run.start_epoch > 1 else None)
    max_steps = getattr(args, "max_steps", None)
    for epoch in itertools.count(run.start_epoch) if max_steps else range(run.start_epoch, args.epoch + 1):
        if stop_reason() or (max_steps and position.step >= max_steps):
            break
        start_batch = position.batches if position.mid_epoch and position.epoch == epoch else 0
        set_loader_epoch(run.train_loader, epoch, start=start_batch * args.batch_size)
        epoch_batches = start_batch + len(run.train_loader)
        record: dict[str, Any] = {"epoch": epoch, "lr": run.scheduler.get_last_lr()[0]}
        train = train_one_epoch(run.model, run.train_loader, run.optimizer, loss_fn, ctx=ctx, epoch=epoch,
                                grad_acc=args.grad_acc, clip_norm=run.clip_norm,
                                divide_by_grad_acc=run.divide_by_grad_acc, amp=run.amp, last_good=last_good,
                                start_batch=start_batch, on_step=_step_hook(run, epoch, epoch_batches))
        record.update(train_summary(train))
        stopped = position.batches < epoch_batches  # --max_steps reached mid-epoch (its checkpoint is saved)
        if (epoch % args.valid_every == 0 or epoch == args.epoch or stopped
                or (max_steps and position.step >= max_steps)):
            record.update(valid_summary(evaluate(run.model, run.valid_loader, valid_fn, ctx=ctx, amp=run.amp), epoch))
        record["step"] = position.step
        if stopped:
            if after_save is not None:
                after_save(record)  # the mid-epoch checkpoint of this step is on disk (see _step_hook)
            logger.log(record)
            records.append(record)
            print0(line(record) + f" | stopped after --max_steps {max_steps} at batch {position.batches}", ctx=ctx)
            break
        run.scheduler.step()
        position.epoch, position.batches, position.mid_epoch = epoch, 0, False
        # The epoch checkpoint first, then anything after_save writes: if the run is killed in between, the resumed
        # run finds this epoch complete with the same weights.
        path = epoch_checkpoint_path(args.ckpt_dir, args.model_name, epoch)
        _save(run, path, epoch, losses=train["loss"], metrics={k: v for k, v in record.items()
                                                              if isinstance(v, int | float)})
        if after_save is not None:
            after_save(record)
        if ctx.is_main and last_good and not keep_epoch_ckpts and os.path.exists(last_good):
            os.remove(last_good)  # the previous epoch of this same run; the new one is complete on disk
        last_good = path
        logger.log(record)
        records.append(record)
        print0(line(record), ctx=ctx)
        reason = stop_reason()
        if reason:
            print0(f"stopping: {reason}", ctx=ctx)
            break
    return records


def _save(run: Run, path: str, epoch: int, **extra: Any) -> None:
    """A checkpoint of the whole run state (every rank calls it); then older mid-epoch checkpoints are removed."""
    args = run.args
    save_training_checkpoint(path, model=run.model, ctx=run.ctx, genes=run.genes, epoch=epoch,
                             optimizer=run.optimizer, scheduler=run.scheduler, amp=run.amp, state=run.state,
                             classes=run.classes, args=args, **extra)
    if run.ctx.is_main:
        remove_older_step_checkpoints(args.ckpt_dir, args.model_name, path)


def _step_hook(run: Run, epoch: int, epoch_batches: int) -> Callable[[int], bool]:
    """What runs after each optimiser step: count it, save a mid-epoch checkpoint every --save_every_steps (and when
    --max_steps ends the run mid-epoch); True once --max_steps steps are done."""
    args, position = run.args, run.position
    every, max_steps = getattr(args, "save_every_steps", None), getattr(args, "max_steps", None)

    def on_step(batches: int) -> bool:
        position.epoch, position.batches, position.mid_epoch = epoch, batches, True
        position.step += 1
        reached = bool(max_steps) and position.step >= max_steps
        if batches < epoch_batches and ((every and position.step % every == 0) or reached):
            # Taken before any validation, so the saved random state is the one the next batch would use.
            path = step_checkpoint_path(args.ckpt_dir, args.model_name, epoch, position.step)
            _save(run, path, epoch - 1)  # "epoch": the last complete one, as in an epoch checkpoint
        return reached

    return on_step
