"""Which route each Performer block takes on the fast path, chosen in one call: `run_blocks(stack, x)`.

`SequentialSequence.forward` (performer_pytorch.py) calls it whenever the fast path is on; with it off
(`plain_attention()`), the blocks run as the plain maths written there. Per block, at every call:
- no gradient needed (grad disabled, or an input that does not require grad and no trainable parameter in the
  block, as for the frozen lower blocks when fine-tuning): no autograd at all; the chunked in-place
  `blocks_forward_no_grad` where the block supports it (consecutive such blocks in one call), else the plain modules
  under `torch.no_grad()`;
- otherwise autograd: the attention module (its FAVOR+ core is `FavorAttentionFunction`) and the feed-forward
  sublayer as the chunked `feed_forward_residual`, LayerNorm and the output projection as modules.
So fine-tuning code only sets `requires_grad` flags; nothing else to call.

`stack` is the `SequentialSequence`: its `layers` (pairs of pre-LayerNorm attention and feed-forward) and
`block_input_observers` (block index -> callback given that block's input; the no-grad route calls no block module,
so module hooks would not fire there).
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu_workers
from .fast_attention import BlockWeights, Workspace, blocks_forward_no_grad, compute_dtype
from .fast_feedforward import feed_forward_residual


def dropout_active(module: nn.Module) -> bool:
    return any(m.training and m.p > 0 for m in module.modules() if isinstance(m, nn.Dropout))


def block_needs_grad(x: torch.Tensor, attn: nn.Module, ff: nn.Module) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for m in (attn, ff) for p in m.parameters())


def feed_forward_supported(ff: nn.Module) -> bool:
    """Whether the chunked routes compute this feed-forward sublayer: exact GELU, no GLU, no active dropout."""
    feed_forward = ff.fn.fn
    return (not feed_forward.glu and isinstance(feed_forward.act, nn.GELU) and feed_forward.act.approximate == "none"
            and not dropout_active(ff))


def block_supported(attn: nn.Module, ff: nn.Module) -> bool:
    """Whether `blocks_forward_no_grad` computes this block (attention and feed-forward both supported)."""
    return attn.fn.fast_path_supported and not dropout_active(attn) and feed_forward_supported(ff)


def feed_forward(x: torch.Tensor, ff: nn.Module, chunk_size: int) -> torch.Tensor:
    """x + ff(x) on the autograd route: the chunked `feed_forward_residual` where supported."""
    if not feed_forward_supported(ff):
        return x + ff(x)
    w1, w2 = ff.fn.fn.w1, ff.fn.fn.w2
    return feed_forward_residual(x, ff.norm, w1.weight, w1.bias, w2.weight, w2.bias, chunk_size)


def no_grad_run_end(stack: nn.Module, index: int, x: torch.Tensor, chunk_size: int) -> int:
    """The end of the run of blocks from `index` that can go through `blocks_forward_no_grad` together: blocks that
    need no gradient (their input will not require grad), support the route, use the same chunk size, and whose
    input no observer wants to see."""
    stop = index + 1
    while stop < len(stack.layers) and stop not in stack.block_input_observers:
        attn, ff = stack.layers[stop]
        if torch.is_grad_enabled() and any(p.requires_grad for m in (attn, ff) for p in m.parameters()):
            break
        if not block_supported(attn, ff) or attn.fn.tokens_per_chunk(x) != chunk_size:
            break
        stop += 1
    return stop


def _observe(stack: nn.Module, index: int, x: torch.Tensor) -> None:
    observer = stack.block_input_observers.get(index)
    if observer is not None:
        observer(x)


def run_blocks(stack: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x through every block of `stack`, each on its route (module docstring); (batch, n, dim) in and out."""
    owned = False  # whether x is a tensor made here, which the no-grad route may update in place
    # Chunk buffers shared by the no-grad blocks of this call, one set per thread running chunk tasks: made at the
    # first such block (a call with none, e.g. pretraining, starts no threads).
    workspaces: list[Workspace] = []
    index = 0
    while index < len(stack.layers):
        attn, ff = stack.layers[index]
        _observe(stack, index, x)
        if block_needs_grad(x, attn, ff):
            x = x + attn(x)
            x = feed_forward(x, ff, attn.fn.tokens_per_chunk(x))
            owned = False
            index += 1
        elif block_supported(attn, ff):
            dtype, chunk_size = compute_dtype(x), attn.fn.tokens_per_chunk(x)  # both read autocast, still on here
            stop = no_grad_run_end(stack, index, x, chunk_size)
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                if not owned:
                    x = x.detach().clone(memory_format=torch.contiguous_format)
                    owned = True
                if not workspaces:
                    workspaces = [Workspace(x.device) for _ in range(cpu_workers.count(x.device))]
                weights = [BlockWeights.from_block(a, f, dtype) for a, f in stack.layers[index:stop]]
                x = blocks_forward_no_grad(x, weights, chunk_size, dtype, workspaces)
            index = stop
        else:
            with torch.no_grad():
                x = x + attn(x)
                x = x + ff(x)
            owned = True
            index += 1
    return x
