"""The published learning-rate schedule (SPEC section 6) and mixed precision.

- `build_scheduler(optimizer, lr)`: the one place the SPEC constants are written; stepped once per epoch.
- `CosineAnnealingWarmupRestarts` and the pure `cosine_warmup_restarts_lr`.
- `Amp` (`--amp`): none, bf16 autocast, or fp16 with a gradient scaler; a stateful object saved with the run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from utils import ScbertError

__all__ = ["Amp", "CosineAnnealingWarmupRestarts", "adam_eps", "build_scheduler", "cosine_warmup_restarts_lr"]

MIN_LR, WARMUP, FIRST_CYCLE, CYCLE_MULT, GAMMA = 1e-6, 5, 15, 2, 0.9  # SPEC section 6, pretraining and fine-tuning
MAX_LR = 1e-4  # the published --learning_rate, the schedule's first peak
SCHEDULE = dict(first_cycle_steps=FIRST_CYCLE, cycle_mult=CYCLE_MULT, max_lr=MAX_LR, min_lr=MIN_LR,
                warmup_steps=WARMUP, gamma=GAMMA)  # CosineAnnealingWarmupRestarts's defaults
TRANSFORMER_FP16_EPS = 1e-4  # scGPT's Adam eps under fp16 autocast (1e-8, torch's default, otherwise)


def adam_eps(args: Any) -> float:
    """Adam's eps for a run: 1e-4 for the transformer family under `--amp fp16` (the scGPT recipe, so that the
    second-moment denominator does not underflow in half precision), else torch's 1e-8 (scBERT's published runs)."""
    if getattr(args, "amp", "none") == "fp16" and getattr(args, "model_type", "performer") == "transformer":
        return TRANSFORMER_FP16_EPS
    return 1e-8


def build_scheduler(optimizer: torch.optim.Optimizer, learning_rate: float) -> CosineAnnealingWarmupRestarts:
    """The published schedule (SPEC section 6), stepped once per epoch: epoch 1 runs at min_lr 1e-6."""
    return CosineAnnealingWarmupRestarts(optimizer, first_cycle_steps=FIRST_CYCLE, cycle_mult=CYCLE_MULT,
                                         max_lr=learning_rate, min_lr=MIN_LR, warmup_steps=WARMUP, gamma=GAMMA)


# ---------------------------------------------------------------------------------------------------------------
# Learning-rate schedule (SPEC section 6)
# ---------------------------------------------------------------------------------------------------------------


def cosine_warmup_restarts_lr(step: int, **schedule: float) -> float:
    """Learning rate after `step` scheduler steps (step 0 = the first epoch); `schedule` overrides any of
    `CosineAnnealingWarmupRestarts`'s parameters (first_cycle_steps, cycle_mult, max_lr, min_lr, warmup_steps,
    gamma), whose defaults are the published ones.

    Each cycle: linear warm-up from min_lr to the cycle's max over `warmup_steps`, then a half cosine down towards
    min_lr over the rest of the cycle. After a cycle, its length becomes (length - warmup) * cycle_mult + warmup and
    the max is multiplied by gamma. With the defaults: cycles of 15, 25, 45, 85 steps.
    """
    unknown = set(schedule) - set(SCHEDULE)
    if unknown:
        raise TypeError(f"unknown schedule parameters {sorted(unknown)}: use {sorted(SCHEDULE)}")
    p = {**SCHEDULE, **schedule}
    first_cycle_steps, cycle_mult, max_lr = p["first_cycle_steps"], p["cycle_mult"], p["max_lr"]
    min_lr, warmup_steps, gamma = p["min_lr"], p["warmup_steps"], p["gamma"]
    cycle, position, length = 0, step, first_cycle_steps
    while position >= length:
        position -= length
        cycle += 1
        length = int((length - warmup_steps) * cycle_mult) + warmup_steps
    peak = max_lr * gamma**cycle
    if position < warmup_steps:
        return min_lr + (peak - min_lr) * position / warmup_steps
    progress = (position - warmup_steps) / (length - warmup_steps)
    return min_lr + (peak - min_lr) * (1 + math.cos(math.pi * progress)) / 2


class CosineAnnealingWarmupRestarts:
    """scBERT's schedule, stepped once per epoch: construction sets the first epoch's rate (min_lr), each `step()`
    moves to the next epoch. Values for lr 1e-4 are in SPEC section 6 (1e-6, 2.08e-5, ..., 1e-4 at epoch 6).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        first_cycle_steps: int = FIRST_CYCLE,
        cycle_mult: float = CYCLE_MULT,
        max_lr: float = MAX_LR,
        min_lr: float = MIN_LR,
        warmup_steps: int = WARMUP,
        gamma: float = GAMMA,
    ):
        if warmup_steps >= first_cycle_steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) must be below first_cycle_steps ({first_cycle_steps})")
        self.optimizer = optimizer
        self.params = dict(first_cycle_steps=first_cycle_steps, cycle_mult=cycle_mult, max_lr=max_lr,
                           min_lr=min_lr, warmup_steps=warmup_steps, gamma=gamma)
        self.last_epoch = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        return cosine_warmup_restarts_lr(step, **self.params)

    def _apply(self) -> None:
        lr = self.lr_at(self.last_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr for _ in self.optimizer.param_groups]

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, **self.params}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.params = {k: state.get(k, v) for k, v in self.params.items()}
        self.last_epoch = int(state["last_epoch"])
        self._apply()


# ---------------------------------------------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------------------------------------------


class Amp:
    """`--amp`: none; bf16 autocast (CPU or CUDA); fp16 autocast with a GradScaler (CUDA only).

    Use `with amp.autocast(): loss = ...`, then `amp.backward(loss)` and, on an optimiser step,
    `amp.step(optimizer, parameters, clip_norm)`.
    """

    def __init__(self, mode: str, device: torch.device):
        if mode not in {"none", "bf16", "fp16"}:
            raise ScbertError(f"--amp {mode!r} is not one of none, bf16, fp16")
        if mode == "fp16" and device.type != "cuda":
            raise ScbertError("--amp fp16 needs a CUDA GPU (float16 with a gradient scaler): use --amp bf16 on CPU")
        self.mode, self.device = mode, device
        self.scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mode == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.mode == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, parameters: Sequence[torch.Tensor], clip_norm: float | None):
        """Unscale, clip to `clip_norm`, step; returns the gradient norm before clipping.

        Without a scaler, a non-finite norm skips the step (the caller stops the run); with fp16's scaler, the
        scaler skips it and lowers its scale, as overflow is expected there now and then.
        """
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        norm = (torch.nn.utils.clip_grad_norm_(parameters, clip_norm) if clip_norm is not None
                else torch.tensor(0.0))
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        elif bool(torch.isfinite(norm)):
            optimizer.step()
        return norm

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
