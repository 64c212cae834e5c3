"""Processes: distributed set-up, collectives, random state and rank-0 printing.

The same code runs as plain `python`, under `torchrun`, or under the legacy `python -m torch.distributed.launch`; on
CPU (gloo) or GPU (NCCL). Only a launcher's RANK and WORLD_SIZE make a run distributed; one process otherwise.

- `setup_distributed(args)` -> `DistContext` (rank, local_rank, world_size, device, distributed, is_main);
  `cleanup_distributed`, `barrier`, `reduce_sum`, `reduce_mean`, `gather_tensors`; `print0` prints on rank 0 only.
- `seed_everything(seed, rank)`: seed + rank for masking and dropout (SPEC section 7); `rng_state`,
  `set_rng_state`, `gather_rng_states` (every rank's state, saved in checkpoints so a resumed run continues exactly).
- `wrap_model` (DistributedDataParallel when distributed), `unwrap_model`.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from performer_pytorch.cpu_threads import configure_threads
from utils import ScbertError

__all__ = [
    "DistContext",
    "barrier",
    "cleanup_distributed",
    "gather_rng_states",
    "gather_tensors",
    "print0",
    "reduce_mean",
    "reduce_sum",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "setup_distributed",
    "unwrap_model",
    "wrap_model",
]


@dataclass
class DistContext:
    """Where this process stands: rank among world_size processes, its device, whether it prints and writes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    distributed: bool = False
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(name: str, local_rank: int) -> torch.device:
    """auto: CUDA when visible, else CPU; cuda: this process's local GPU; cuda:<index>: that GPU; cpu."""
    name = str(name)
    if name not in {"auto", "cpu", "cuda"} and not name.startswith("cuda:"):
        raise ScbertError(f"--device {name!r} is not understood: pass auto, cpu, cuda or cuda:<index>")
    if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ScbertError(f"--device {name} was asked for but PyTorch sees no CUDA GPU: pass --device cpu")
        index = int(name.split(":")[1]) if ":" in name else local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def setup_distributed(args: argparse.Namespace | None = None, device: str | None = None) -> DistContext:
    """Join the process group when a launcher started us, else run as one plain process.

    A launcher (torchrun, or `python -m torch.distributed.launch`, which in torch 2.x passes `--local-rank=N` and
    sets the variables too) sets RANK and WORLD_SIZE; LOCAL_RANK is read first, `--local_rank` second. The backend is
    NCCL on CUDA and gloo on CPU.
    """
    device_name = device or (getattr(args, "device", None) if args is not None else None) or "auto"
    env_local = os.environ.get("LOCAL_RANK")
    arg_local = getattr(args, "local_rank", None) if args is not None else None
    local_rank = int(env_local) if env_local is not None else int(arg_local or 0)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not launched:
        return DistContext(local_rank=local_rank, device=_pick_device(device_name, local_rank))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch_device = _pick_device(device_name, local_rank)
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": torch_device} if torch_device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device,
                       distributed=True, backend=backend)


def cleanup_distributed(ctx: DistContext) -> None:
    """Leave the process group (a no-op for one plain process).

    On a normal exit every rank first waits for the others: a gloo rank that tears its connections down while a peer
    is still in its last collective can abort that peer ("terminate called without an active exception", about one
    two-rank run in eight here). Called from a `finally` while an error propagates, it leaves at once: the other ranks
    may never reach a barrier, and torchrun stops them when this rank exits non-zero.
    """
    if ctx.distributed and dist.is_initialized():
        if sys.exc_info()[1] is None:
            barrier(ctx)
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (a no-op for one plain process)."""
    if ctx.distributed:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def reduce_sum(values: dict[str, float] | torch.Tensor, ctx: DistContext):
    """Sum numbers over ranks: a dict of floats/0-dim tensors -> dict of floats, or a tensor -> a tensor."""
    if isinstance(values, torch.Tensor):
        tensor = values.detach().to(ctx.device, torch.float64).clone()
        if ctx.distributed:
            dist.all_reduce(tensor)
        return tensor
    keys = sorted(values)
    if not keys:
        return {}
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    if ctx.distributed:
        dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist(), strict=True))


def reduce_mean(values: dict[str, float] | torch.Tensor, ctx: DistContext):
    """Mean over ranks of numbers (each rank weighs the same)."""
    summed = reduce_sum(values, ctx)
    if isinstance(summed, torch.Tensor):
        return summed / ctx.world_size
    return {k: v / ctx.world_size for k, v in summed.items()}


def gather_tensors(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all ranks (lengths may differ), in rank order; returned on CPU."""
    if not ctx.distributed:
        return tensor.detach().cpu()
    local = tensor.detach().to(ctx.device)
    length = torch.tensor([local.shape[0]], device=ctx.device)
    lengths = [torch.zeros_like(length) for _ in range(ctx.world_size)]
    dist.all_gather(lengths, length)
    longest = int(max(int(n) for n in lengths))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=ctx.device)
    padded[: local.shape[0]] = local
    parts = [torch.zeros_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)].cpu() for part, n in zip(parts, lengths, strict=True)])


def print0(*values: Any, ctx: DistContext | None = None, **kwargs: Any) -> None:
    """print() on rank 0 only (ctx None: read RANK from the environment); flushed so logs interleave sanely."""
    rank = ctx.rank if ctx is not None else int(os.environ.get("RANK", "0"))
    if rank == 0:
        kwargs.setdefault("flush", True)
        print(*values, **kwargs)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (CPU and CUDA) with seed + rank, so ranks mask and drop out differently."""
    value = int(seed) + int(rank)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def rng_state() -> dict[str, Any]:
    """This process's random states as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    return {
        "python": [list(item) if isinstance(item, tuple) else item for item in random.getstate()],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(ctx: DistContext) -> list[dict[str, Any]]:
    """Every rank's random state, on every rank (collective)."""
    mine = rng_state()
    if not ctx.distributed:
        return [mine]
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, mine)
    return states



def wrap_model(
    model: torch.nn.Module, ctx: DistContext, *, seed: int | None = None, **ddp_kwargs: Any
) -> torch.nn.Module:
    """Move to the device, set the CPU thread count for its size (`cpu_threads`); with `seed`, draw projection
    redraws from (seed, redraw count), the same on every rank; wrap in DistributedDataParallel when distributed (DDP
    kwargs passed through)."""
    model = model.to(ctx.device)
    if seed is not None and hasattr(model, "set_redraw_seed"):
        model.set_redraw_seed(seed)
    configure_threads(model, ctx.device)
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
