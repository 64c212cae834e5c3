"""Large CPU tensors of training steps, reused from one step to the next instead of freshly allocated.

Why: a full-size training step of the custom autograd Functions allocates gigabytes of whole-cell tensors (saved
[q; k; v], attention outputs, feed-forward pre-activations, gradients). glibc hands every allocation over 32 MB to the
OS and maps it afresh on the next step, and the first write to each new page is a page fault. Measured at full size,
batch 8, float32 fine-tuning: copies into such fresh tensors took 3.0 s of a 38 s step, against 0.2 s for the same
copies when the pages were already mapped.

`take(shape, dtype, device)` returns an uninitialised tensor like `torch.empty`. On the CPU it comes from a pool of
tensors this module made earlier: one of the same size and dtype that nothing else refers to any more (its storage
is held by the pool alone: the graph that saved it was freed or went through backward, and the caller dropped every
view of it), else a new one, which joins the pool. Reuse is decided by reference count, so a tensor still saved by a
graph (retain_graph=True, or a forward whose backward never ran) or still held by the caller is never handed out
twice. The pool keeps at most `MAX_BUFFERS` tensors, dropping the least recently used free ones; `release()` empties
it. Other devices (CUDA has its own caching allocator) and small tensors get `torch.empty`.
"""

from __future__ import annotations

import math
import threading

import torch

MAX_BUFFERS = 128  # a full-size pretraining step (depth 6, batch 2) makes 31 (measured)
MIN_BYTES = 1 << 20  # smaller tensors come from glibc's heap, which reuses them anyway

_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private API; without it the pool stays empty
_lock = threading.Lock()
_pool: list[torch.Tensor] = []  # flat tensors, least recently used first


def _is_free(buffer: torch.Tensor) -> bool:
    """Whether only the pool refers to buffer's storage (the pool's tensor and the temporary storage object)."""
    return _use_count(buffer.untyped_storage()._cdata) == 2


def take(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of `shape`, reusing a free pooled CPU tensor of the same size when there is one."""
    numel = math.prod(shape)
    if device.type != "cpu" or _use_count is None or numel * dtype.itemsize < MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    with _lock:
        for index, buffer in enumerate(_pool):
            if buffer.dtype == dtype and buffer.numel() == numel and _is_free(buffer):
                _pool.append(_pool.pop(index))  # most recently used last
                return buffer.view(shape)
        buffer = torch.empty(numel, dtype=dtype, device=device)
        if len(_pool) >= MAX_BUFFERS:
            free = [index for index, pooled in enumerate(_pool) if _is_free(pooled)]
            if not free:
                return buffer.view(shape)  # every pooled tensor is in use: this one is not pooled
            del _pool[free[0]]
        _pool.append(buffer)
        return buffer.view(shape)


def take_like(x: torch.Tensor) -> torch.Tensor:
    """`take` with x's shape, dtype and device (a contiguous tensor, like `torch.empty_like` of a contiguous x)."""
    return take(tuple(x.shape), x.dtype, x.device)


def release() -> None:
    """Drop the pool's references: memory no longer used elsewhere goes back to the allocator."""
    with _lock:
        _pool.clear()


def pooled_bytes() -> int:
    """Bytes held by the pool, in use or not."""
    with _lock:
        return sum(buffer.numel() * buffer.element_size() for buffer in _pool)
