"""The feed-forward residual sublayer, x + W2 GELU(W1 LayerNorm(x) + b1) + b2, as a chunked autograd Function.

Why: through plain autograd, a block's feed-forward allocates about ten (batch, n, 4 dim) or (batch, n, dim) tensors
per training step (at full size 54 MB per cell each for the hidden ones): fresh memory that the OS page-faults in on
every step, and full passes over it for GELU, its gradient and the residual adds. Here only the pre-activation h1
(batch, n, 4 dim) is saved; everything else is a chunk of tokens in a reused `Workspace`. Same numbers as the modules
(tests/test_fast_path.py); only used for blocks that need gradients (no dropout, exact GELU).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import buffers
from .fast_attention import Workspace, _chunks, _mm_into, accumulation_dtype, compute_dtype


def feed_forward_residual(x: torch.Tensor, norm: torch.nn.LayerNorm, w1, b1, w2, b2, chunk_size: int) -> torch.Tensor:
    """x (batch, n, dim) -> x + W2 GELU(W1 LN(x) + b1) + b2, differentiable w.r.t. x and all parameters."""
    return FeedForwardFunction.apply(x, norm.weight, norm.bias, w1, b1, w2, b2, norm.eps, chunk_size)


class FeedForwardFunction(torch.autograd.Function):
    """Saved: x, the LayerNorm statistics (batch, n, 1) and h1 = W1 LN(x) + b1 (batch, n, 4 dim, compute dtype).

    Backward per chunk, g = dL/dy: g_W2 += g^T GELU(h1); g_h1 = (g W2) GELU'(h1); g_W1 += g_h1^T LN(x);
    g_x = g + LayerNorm backward of g_h1 W1 (torch's own kernel)."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, w1, b1, w2, b2, eps: float, chunk_size: int):
        dtype = compute_dtype(x)
        ws = Workspace(x.device)
        with torch.autocast(x.device.type, enabled=False):
            w1c, b1c, w2c, b2c = (t.detach().to(dtype) for t in (w1, b1, w2, b2))
            b, n, dim = x.shape
            hidden = w1.shape[0]
            # Whole-cell tensors from the step-to-step pool (buffers.py): saved for backward, or returned.
            y = buffers.take_like(x)
            h1_all = buffers.take((b, n, hidden), dtype, x.device)
            mean_all = buffers.take((b, n, 1), accumulation_dtype(x.dtype), x.device)
            rstd_all = buffers.take((b, n, 1), accumulation_dtype(x.dtype), x.device)
            for i in range(b):
                for start, stop in _chunks(n, chunk_size):
                    x_chunk = x[i, start:stop]
                    normed, mean, rstd = torch.native_layer_norm(x_chunk, (dim,), ln_weight, ln_bias, eps)
                    mean_all[i, start:stop], rstd_all[i, start:stop] = mean, rstd
                    h1 = torch.addmm(b1c, normed.to(dtype), w1c.t(), out=h1_all[i, start:stop])
                    act = torch.ops.aten.gelu.out(h1, out=ws.take("act", tuple(h1.shape), dtype))
                    out = torch.addmm(b2c, act, w2c.t(), out=ws.take("out", (stop - start, dim), dtype))
                    torch.add(x_chunk, out, out=y[i, start:stop])
        ctx.save_for_backward(x, ln_weight, ln_bias, w1c, w2c, h1_all, mean_all, rstd_all)
        ctx.eps, ctx.chunk_size, ctx.dtype = eps, chunk_size, dtype
        ctx.param_dtypes = [t.dtype for t in (ln_weight, ln_bias, w1, b1, w2, b2)]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, ln_weight, ln_bias, w1c, w2c, h1_all, mean_all, rstd_all = ctx.saved_tensors
        dtype, chunk_size = ctx.dtype, ctx.chunk_size
        acc_dtype = accumulation_dtype(dtype)
        need = ctx.needs_input_grad
        need_ln, need_w1, need_w2 = need[1] or need[2], need[3] or need[4], need[5] or need[6]
        ws = Workspace(x.device)
        b, n, dim = x.shape
        hidden = w1c.shape[0]
        kw = dict(device=x.device, dtype=acc_dtype)
        grad_w1, grad_b1 = torch.zeros(hidden, dim, **kw), torch.zeros(hidden, **kw)
        grad_w2, grad_b2 = torch.zeros(dim, hidden, **kw), torch.zeros(dim, **kw)
        grad_lnw, grad_lnb = torch.zeros(dim, **kw), torch.zeros(dim, **kw)
        grad_x = buffers.take_like(x) if need[0] else None
        mask = [need[0], need_ln, need_ln]
        with torch.autocast(x.device.type, enabled=False):
            for i in range(b):
                for start, stop in _chunks(n, chunk_size):
                    c = stop - start
                    g = ws.cast("g", grad_y[i, start:stop], dtype)  # (c, dim)
                    h1 = h1_all[i, start:stop]
                    if need_w2:
                        act = torch.ops.aten.gelu.out(h1, out=ws.take("act", (c, hidden), dtype))
                        _mm_into(grad_w2, g.t(), act, ws)
                        grad_b2.add_(g.sum(dim=0, dtype=acc_dtype))
                    g_act = torch.mm(g, w2c, out=ws.take("g_act", (c, hidden), dtype))
                    g_h1 = torch.ops.aten.gelu_backward.grad_input(
                        g_act, h1, approximate="none", grad_input=ws.take("g_h1", (c, hidden), dtype)
                    )
                    x_chunk = x[i, start:stop]
                    mean, rstd = mean_all[i, start:stop], rstd_all[i, start:stop]
                    if need_w1:
                        normed = torch.native_layer_norm(x_chunk, (dim,), ln_weight, ln_bias, ctx.eps)[0]
                        _mm_into(grad_w1, g_h1.t(), normed.to(dtype), ws)
                        grad_b1.add_(g_h1.sum(dim=0, dtype=acc_dtype))
                    if need[0] or need_ln:
                        g_normed = torch.mm(g_h1, w1c, out=ws.take("g_normed", (c, dim), dtype)).to(x.dtype)
                        g_x, g_lnw, g_lnb = torch.ops.aten.native_layer_norm_backward(
                            g_normed, x_chunk, (dim,), mean, rstd, ln_weight, ln_bias, mask
                        )
                        if need[0]:
                            torch.add(grad_y[i, start:stop], g_x, out=grad_x[i, start:stop])
                        if need_ln:
                            grad_lnw.add_(g_lnw)
                            grad_lnb.add_(g_lnb)
        grads = [grad_lnw, grad_lnb, grad_w1, grad_b1, grad_w2, grad_b2]
        grads = [g.to(t) if need[k + 1] else None for k, (g, t) in enumerate(zip(grads, ctx.param_dtypes, strict=True))]
        return (grad_x, *grads, None, None)
