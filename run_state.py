"""The files of a training run: epoch checkpoints, resuming, and the JSONL log.

A run's state is the model plus a mapping of named stateful objects (anything with `state_dict()` and
`load_state_dict()`: the optimiser, the schedule, the AMP scaler, early stopping, ...). Each is saved under
`<name>_state_dict` (so the reference's `optimizer_state_dict` and `scheduler_state_dict` keep their names) with every
rank's random state, and restored from there: a new kind of run adds an object, not a new checkpoint field.

- `epoch_checkpoint_path`, `named_checkpoint_path`, `step_checkpoint_path` (mid-epoch); `save_training_checkpoint`
  (called on every rank; rank 0 writes atomically); `find_latest_checkpoint`, `resolve_resume` (rank 0 decides,
  every rank must see the file), `restore_training_state`, `remove_older_step_checkpoints`.
- `RunPosition`: the epoch, batch and optimiser step a checkpoint was taken at (mid-epoch resume).
- `RunSettings`: settings a resumed run must share with the saved one (refuses a resume that changed them).
- `JsonlLogger`: one JSON line per epoch, rank 0 only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from data import check_checkpoint_genes
from distributed import DistContext, barrier, gather_rng_states, seed_everything, set_rng_state, unwrap_model
from models import model_family
from performer_pytorch import checkpoint_payload, load_checkpoint, save_checkpoint
from performer_pytorch.checkpoint import CheckpointError, read_checkpoint_file
from utils import ScbertError

__all__ = [
    "JsonlLogger",
    "RunPosition",
    "RunSettings",
    "epoch_checkpoint_path",
    "find_latest_checkpoint",
    "named_checkpoint_path",
    "refuse_fresh_over",
    "remove_older_step_checkpoints",
    "resolve_resume",
    "restore_training_state",
    "save_training_checkpoint",
    "step_checkpoint_path",
]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


def epoch_checkpoint_path(ckpt_dir: str, model_name: str, epoch: int) -> str:
    """`<ckpt_dir>/<model_name>_<epoch>.pth`, the reference's naming."""
    return os.path.join(ckpt_dir, f"{model_name}_{epoch}.pth")


def named_checkpoint_path(ckpt_dir: str, model_name: str, name: str) -> str:
    """`<ckpt_dir>/<model_name>_<name>.pth`, e.g. name "best" for fine-tuning's best model."""
    return os.path.join(ckpt_dir, f"{model_name}_{name}.pth")


def refuse_fresh_over(best_path: str, resume_path: str | None) -> None:
    """A fresh run (nothing to resume) must not overwrite the best model an earlier run left at `best_path`."""
    if resume_path is None and os.path.exists(best_path):
        raise ScbertError(f"{best_path!r} exists from an earlier run and a fresh run would overwrite it: pass another "
                          "--model_name or --ckpt_dir, or move it away")


def _plain_args(args: argparse.Namespace | dict | None) -> dict[str, Any]:
    items = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    return {k: v for k, v in items.items() if v is None or isinstance(v, str | int | float | bool)}


def _state_objects(optimizer: Any, scheduler: Any, amp: Any, state: Mapping[str, Any] | None) -> dict[str, Any]:
    objects = {"optimizer": optimizer, "scheduler": scheduler, "amp": amp, **(state or {})}
    return {name: obj for name, obj in objects.items() if obj is not None}


def save_training_checkpoint(
    path: str,
    *,
    model: torch.nn.Module,
    ctx: DistContext,
    genes: Sequence[str] | None,
    epoch: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    amp: Any = None,
    state: Mapping[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    args: argparse.Namespace | dict | None = None,
    losses: float | None = None,
    **extra: Any,
) -> None:
    """Save a checkpoint; call it on EVERY rank (it gathers each rank's random state), rank 0 writes atomically, then
    all wait at a barrier.

    Writes `path` holding the reference's keys (`epoch`, `model_state_dict`, `optimizer_state_dict`,
    `scheduler_state_dict`, `losses`), ours (`model_type`, `config`, `head`, `genes`, `classes`, `rng` (one entry
    per rank), `world_size`, `args`, `extra`) and `<name>_state_dict` for the optimiser, scheduler, `amp` and each
    named object of `state`.
    """
    rng = gather_rng_states(ctx)
    if ctx.is_main:
        states = {f"{name}_state_dict": obj.state_dict()
                  for name, obj in _state_objects(optimizer, scheduler, amp, state).items()}
        states.setdefault("optimizer_state_dict", None)
        states.setdefault("scheduler_state_dict", None)
        states.setdefault("amp_state_dict", {})
        payload = checkpoint_payload(
            model,
            genes=list(genes) if genes is not None else None,
            classes=list(classes) if classes is not None else None,
            epoch=int(epoch),
            losses=losses,
            rng=rng,
            world_size=ctx.world_size,
            args=_plain_args(args),
            **states,
            **extra,
        )
        save_checkpoint(payload, path)
    barrier(ctx)


class RunSettings:
    """Settings a resumed run must share with the run it continues (e.g. what trains): saved as a stateful object;
    restoring it from a run with other values raises ScbertError naming them."""

    def __init__(self, path_hint: str = "", **settings: Any):
        self.settings = settings
        self.path_hint = path_hint

    def state_dict(self) -> dict[str, Any]:
        return dict(self.settings)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        differing = sorted(k for k in self.settings if k in state and state[k] != self.settings[k])
        if differing:
            detail = ", ".join(f"--{k} {self.settings[k]} (that run: {state[k]})" for k in differing)
            raise ScbertError(
                f"cannot resume {self.path_hint or 'the run'} with {detail}: rerun with that run's settings, or pass "
                "another --model_name"
            )


_EPOCH_FILE = re.compile(r"^(?P<name>.+)_(?P<epoch>\d+)\.pth$")
_STEP_FILE = re.compile(r"^(?P<name>.+)_epoch(?P<epoch>\d+)_step(?P<step>\d+)\.pth$")


def step_checkpoint_path(ckpt_dir: str, model_name: str, epoch: int, step: int) -> str:
    """`<ckpt_dir>/<model_name>_epoch<epoch>_step<step>.pth`: a mid-epoch checkpoint (`--save_every_steps`) taken in
    epoch `epoch` (not complete) after `step` optimiser steps of the whole run."""
    return os.path.join(ckpt_dir, f"{model_name}_epoch{epoch}_step{step}.pth")


def _run_checkpoints(ckpt_dir: str, model_name: str) -> list[tuple[tuple[int, int, int], str]]:
    """(order key, path) of the run's epoch and mid-epoch checkpoints; the key sorts them in training order: epoch E
    complete is (E, 0, 0), a mid-epoch one of epoch E at step S is (E - 1, 1, S)."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        match = _EPOCH_FILE.match(name)
        if match and match.group("name") == model_name:
            found.append(((int(match.group("epoch")), 0, 0), os.path.join(ckpt_dir, name)))
            continue
        match = _STEP_FILE.match(name)
        if match and match.group("name") == model_name:
            key = (int(match.group("epoch")) - 1, 1, int(match.group("step")))
            found.append((key, os.path.join(ckpt_dir, name)))
    return sorted(found)


def find_latest_checkpoint(ckpt_dir: str, model_name: str) -> tuple[str, int] | None:
    """(path, complete epochs) of the latest checkpoint of `model_name` in ckpt_dir that reads as a checkpoint: the
    highest `<model_name>_<epoch>.pth`, or a mid-epoch `<model_name>_epoch<E>_step<S>.pth` written after it; None
    when there is none.

    Files that do not read (e.g. truncated by a copy) are skipped with a warning; our own writes are atomic, so a
    killed run never leaves one.
    """
    for key, path in reversed(_run_checkpoints(ckpt_dir, model_name)):
        try:
            read_checkpoint_file(path)
        except CheckpointError as err:
            print(f"warning: skipping unreadable checkpoint {path!r}: {err}", file=sys.stderr)
            continue
        return path, key[0]
    return None


def remove_older_step_checkpoints(ckpt_dir: str, model_name: str, newest: str) -> None:
    """Delete the run's mid-epoch checkpoints older than `newest` (complete on disk), so only the latest is kept."""
    keys = dict((path, key) for key, path in _run_checkpoints(ckpt_dir, model_name))
    limit = keys.get(newest)
    if limit is None:
        return
    for path, key in keys.items():
        if key[1] == 1 and key < limit and os.path.exists(path):
            os.remove(path)


def _decide_resume(args: argparse.Namespace) -> str | None:
    latest = find_latest_checkpoint(args.ckpt_dir, args.model_name)
    if args.resume is None:
        return latest[0] if latest else None
    if args.resume:
        if latest is None:
            raise ScbertError(
                f"--resume True but {args.ckpt_dir!r} holds no checkpoint {args.model_name}_<epoch>.pth: check "
                "--ckpt_dir and --model_name, or drop --resume to start a new run"
            )
        return latest[0]
    if latest is not None:
        raise ScbertError(
            f"--resume False but {latest[0]!r} exists and a fresh run would overwrite it: pass another "
            "--model_name or --ckpt_dir, move the old checkpoints away, or drop --resume to continue that run"
        )
    return None


def resolve_resume(args: argparse.Namespace) -> str | None:
    """The checkpoint to resume from under `--resume` (None/True/False), or None to start fresh.

    None (default): the latest checkpoint of `--model_name` (epoch or mid-epoch) when one exists. True: that
    checkpoint, an error if there is none. False: start fresh, an error if checkpoints of this name exist (they
    would be overwritten). Under a launcher, rank 0 decides and tells the others, so every rank resumes the same
    file or none; a rank that cannot read that file (a checkpoint folder not shared between nodes) stops every rank
    with one sentence instead of starting fresh while the others resume.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return _decide_resume(args)
    decision: list[Any] = [None, None]
    if dist.get_rank() == 0:
        try:
            decision = [_decide_resume(args), None]
        except ScbertError as err:
            decision = [None, str(err)]
    dist.broadcast_object_list(decision, src=0)
    path, error = decision
    if error:
        raise ScbertError(error)
    visible: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(visible, path is None or os.path.isfile(path))
    blind = [rank for rank, ok in enumerate(visible) if not ok]
    if blind:
        raise ScbertError(
            f"rank {blind[0]} cannot see {path!r}, the checkpoint rank 0 resumes from: put --ckpt_dir on storage "
            "that every node mounts at the same path (or copy the folder to each node) and rerun"
        )
    return path


class RunPosition:
    """Where the run stands, saved with every checkpoint: the epoch in progress, the micro-batches of it already
    trained (`batches`; 0 at an epoch's end), optimiser steps of the whole run (`step`) and whether the checkpoint
    was taken mid-epoch. A resumed run continues at the next unseen batch of that epoch."""

    def __init__(self, batch_size: int = 0, world_size: int = 1):
        self.epoch, self.batches, self.step, self.mid_epoch = 0, 0, 0, False
        self.batch_size, self.world_size = int(batch_size), int(world_size)

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "batches": self.batches, "step": self.step, "mid_epoch": self.mid_epoch}
        if self.mid_epoch:  # what the position means: batches of this size on this many ranks
            state.update(batch_size=self.batch_size, world_size=self.world_size)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mid_epoch = bool(state["mid_epoch"])
        saved = (int(state.get("batch_size", self.batch_size)), int(state.get("world_size", self.world_size)))
        if mid_epoch and saved != (self.batch_size, self.world_size):
            raise ScbertError(
                f"cannot resume mid-epoch with --batch_size {self.batch_size} on {self.world_size} processes: that "
                f"run used --batch_size {saved[0]} on {saved[1]}, so its position in the epoch means other cells; "
                "rerun with those, or pass another --model_name"
            )
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self.step, self.mid_epoch = int(state["step"]), mid_epoch


def restore_training_state(
    path: str,
    *,
    model: torch.nn.Module,
    ctx: DistContext,
    genes: Sequence[str] | None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    amp: Any = None,
    state: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Load a `save_training_checkpoint` file into the model (strict), the optimiser, scheduler, scaler and each
    named object of `state` (those the file holds), and this rank's random state. Checks that the checkpoint's genes
    equal `genes` and its architecture the model's.

    Returns the checkpoint's payload (use `payload["epoch"] + 1` as the first epoch to run).
    """
    ckpt = load_checkpoint(path)
    if genes is not None:
        n_positions = model_family(ckpt.model_type).vocab_for(ckpt.config).gene_num
        check_checkpoint_genes(ckpt.genes, genes, path, n_positions=n_positions)
    _load_model_state(path, ckpt, unwrap_model(model))
    payload = ckpt.payload
    core = unwrap_model(model)
    if hasattr(core, "load_redraw_state"):
        core.load_redraw_state(payload.get("redraw"))  # the next projection redraw is the one the run had next
    for name, obj in _state_objects(optimizer, scheduler, amp, state).items():
        if payload.get(f"{name}_state_dict"):
            obj.load_state_dict(payload[f"{name}_state_dict"])
    states = payload.get("rng") or []
    if len(states) == ctx.world_size:
        set_rng_state(states[ctx.rank])
    else:
        # A different number of ranks: no state belongs to this rank; a fresh, still distinct, seed per rank.
        seed = int(payload.get("args", {}).get("seed", 0) or 0)
        seed_everything(seed + 7919 * int(payload.get("epoch", 0)), ctx.rank)
    return payload


def _load_model_state(path: str, ckpt, core: torch.nn.Module) -> None:
    own = getattr(core, "config", None)
    if own is not None:
        differing = sorted(k for k in own if k in ckpt.config and ckpt.config[k] != own[k])
        if ckpt.model_type != getattr(core, "model_type", ckpt.model_type):
            differing.insert(0, "model_type")
        if differing:
            theirs = {**ckpt.config, "model_type": ckpt.model_type}
            mine = {**own, "model_type": getattr(core, "model_type", None)}
            detail = ", ".join(f"{k}: checkpoint {theirs[k]!r} vs now {mine[k]!r}" for k in differing)
            raise ScbertError(
                f"cannot resume from {path!r}: the model flags differ from that run ({detail}); rerun with that "
                "run's flags, or pass another --model_name to start a separate run"
            )
    try:
        core.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as err:
        raise ScbertError(
            f"cannot resume from {path!r}: its weights do not fit the model ({' '.join(str(err).split())[:200]}): "
            "rerun with that run's flags"
        ) from err


# ---------------------------------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------------------------------


class JsonlLogger:
    """Appends one JSON object per line to `path` (rank 0 only; other ranks do nothing)."""

    def __init__(self, path: str, ctx: DistContext):
        self.path, self.enabled = path, ctx.is_main
        if self.enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {}
        for key, value in record.items():
            if isinstance(value, torch.Tensor | np.floating):
                value = float(value)
            clean[key] = None if isinstance(value, float) and not math.isfinite(value) else value  # strict JSON
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
