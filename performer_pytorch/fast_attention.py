"""Fast FAVOR+ attention: the same numbers as the plain path in `performer_pytorch.py`, computed in token chunks.

Why: at full size a cell has n = 16,907 tokens, and the plain path materialises several (batch, heads, n, features)
tensors per layer (180 MB each for one cell). Allocating, page-faulting and streaming those through memory costs more
than the arithmetic. Here every large temporary is one chunk of tokens (a few MB, reused while it is still in cache).

Two routes, both tested against the plain path (tests/test_fast_path.py):

* `block_forward_no_grad`: a whole pre-LayerNorm block (attention + feed-forward) without autograd, for inference and
  for frozen blocks during fine-tuning. Per cell, pass A streams key chunks and accumulates the key/value summaries,
  pass B streams query chunks: attention, output projection, residual, feed-forward, residual, in place.
* `FavorAttentionFunction`: the attention core (q, k, v after projection -> output) as an autograd Function whose
  forward is chunked like pass A/B and saves only q, k, v, the output and small per-cell summaries; its backward
  recomputes the features chunk by chunk.

Notation (per cell and head): x' = x d^-1/4 (d = dim_head) and the projection P (m, d) is stored pre-scaled as
Ps = P d^-1/4, so s = Ps x; diag = |x|^2 d^-1/2 / 2; E = exp(s - diag - stabiliser); features phi = ratio (E + eps).
The output phi_q C / (phi_q . z), with C = sum_n phi_k,n v_n^T and z = sum_n phi_k,n, does not change when phi is
multiplied by a constant, so `ratio` is left out everywhere (it cancels exactly; only rounding differs).
The key stabiliser is the max of s over heads, tokens and features of each cell, known only after the last chunk:
the exp sums are kept relative to the running max and rescaled when it grows (as in streaming softmax); the eps
parts (eps sum v and eps n) do not depend on the stabiliser and are added at the end. The query stabiliser is the max
over features of each token, local to a chunk.

Layout: chunks are kept "transposed", (heads, features, tokens), so that every product is one contiguous batched
matmul over heads and the single (m, d) projection is shared by all heads and cells (never repeated per head).

`plain_attention()` switches all of this off (the plain path), e.g. to compare: `with plain_attention(): model(x)`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-4  # the softmax-kernel eps of SPEC section 2

# Tokens per chunk. On CPU the (heads, features, chunk) temporaries should stay in the 1-2 MB caches (measured on a
# 2-core AVX-512 machine: 256 tokens is best, 128 pays the per-op overhead, 1024 spills); on a GPU bigger is better.
CPU_CHUNK_TOKENS = 256
GPU_CHUNK_TOKENS = 8192

_fast_path_enabled = True


def fast_path_enabled() -> bool:
    """Whether the model uses the chunked fast paths (True unless inside `plain_attention()`)."""
    return _fast_path_enabled


@contextlib.contextmanager
def plain_attention() -> Iterator[None]:
    """Run the model on the plain path (the straightforward full-tensor maths) inside this block.

    The plain path is the readable definition the fast path is tested against; it is slower and needs far more
    memory at full size. Not thread-safe: it flips a module-level switch.
    """
    global _fast_path_enabled
    previous = _fast_path_enabled
    _fast_path_enabled = False
    try:
        yield
    finally:
        _fast_path_enabled = previous


def default_chunk_size(device: torch.device) -> int:
    return CPU_CHUNK_TOKENS if device.type == "cpu" else GPU_CHUNK_TOKENS


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for x's device, else x's own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums over tokens are kept in at least float32 (float64 stays float64, for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _mm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b (batched), without a temporary when the dtypes agree."""
    if a.dtype == acc.dtype:
        acc.baddbmm_(a, b)
    else:
        acc.add_(torch.bmm(a, b))


# ---------------------------------------------------------------------------------------------------------------------
# Pure maths on one chunk of one cell, layout (heads, ., tokens)
# ---------------------------------------------------------------------------------------------------------------------


def half_sq_norm(x_t: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    """diag of the softmax kernel: |x|^2 d^-1/2 / 2. x_t: (h, d, c) -> (h, 1, c) in acc_dtype."""
    dim_head = x_t.shape[1]
    x_acc = x_t.to(acc_dtype)
    return (x_acc * x_acc).sum(dim=1, keepdim=True) * (dim_head**-0.5 / 2.0)


def query_exp_features(q_t: torch.Tensor, ps: torch.Tensor, acc_dtype: torch.dtype, *, with_argmax: bool = False):
    """E_q = exp(s - diag - max_m s) for queries, the stabiliser per token.

    q_t: (h, d, c); ps: (m, d) pre-scaled projection. Returns E (h, m, c) in q_t's dtype and, with_argmax, the index
    (h, 1, c) of each token's max feature (the entry the stabiliser's gradient flows to).
    """
    s = torch.matmul(ps, q_t)  # (h, m, c)
    if with_argmax:
        stab, argmax = s.max(dim=1, keepdim=True)
    else:
        stab, argmax = s.amax(dim=1, keepdim=True), None
    s.sub_(half_sq_norm(q_t, acc_dtype) + stab).exp_()
    return s, argmax


def key_exp_features(k_t: torch.Tensor, ps: torch.Tensor, stabiliser: torch.Tensor, acc_dtype: torch.dtype):
    """E_k = exp(s - diag - stabiliser) for keys given the (scalar) stabiliser. k_t: (h, d, c) -> (h, m, c)."""
    s = torch.matmul(ps, k_t)
    return s.sub_(half_sq_norm(k_t, acc_dtype) + stabiliser).exp_()


class KeyValueSums:
    """Streaming key/value summaries of one cell: sum_n E_k,n v_n^T, sum_n E_k,n, sum_n v_n and the key stabiliser.

    The exp sums are relative to the running max of s and rescaled by exp(old - new) when a chunk raises it.
    With track_argmax, also remembers where the max is (head, feature, token), for the backward pass.
    """

    def __init__(self, heads: int, nb_features: int, dim_head: int, *, device, acc_dtype, track_argmax=False):
        kw = dict(device=device, dtype=acc_dtype)
        self.acc_dtype = acc_dtype
        self.exp_v = torch.zeros(heads, nb_features, dim_head, **kw)  # sum E v^T   (h, m, d)
        self.exp_sum = torch.zeros(heads, nb_features, 1, **kw)  # sum E           (h, m, 1)
        self.v_sum = torch.zeros(heads, dim_head, **kw)  # sum v                    (h, d)
        self.count = 0
        self.max = torch.full((), -math.inf, **kw)
        self.track_argmax = track_argmax
        self.argmax = torch.zeros(3, dtype=torch.long, device=device)  # (head, feature, token)

    def add_chunk(self, k_t: torch.Tensor, v_t: torch.Tensor, ps: torch.Tensor, start: int) -> None:
        """Fold in one key/value chunk. k_t, v_t: (h, d, c) for tokens start..start+c."""
        s = torch.matmul(ps, k_t)  # (h, m, c)
        if self.track_argmax:
            chunk_max, flat = s.view(-1).max(dim=0)
        else:
            chunk_max, flat = s.amax(), None
        chunk_max = chunk_max.to(self.acc_dtype)
        new_max = torch.maximum(self.max, chunk_max)
        if self.track_argmax:
            m, c = s.shape[1], s.shape[2]
            where = torch.stack([flat // (m * c), (flat // c) % m, flat % c + start])
            self.argmax = torch.where(chunk_max > self.max, where, self.argmax)
        # Rescale what was summed relative to the old max (exp(-inf) = 0 on the first chunk, when the sums are 0).
        rescale = torch.exp(self.max - new_max)
        self.exp_v.mul_(rescale)
        self.exp_sum.mul_(rescale)
        self.max = new_max
        s.sub_(half_sq_norm(k_t, self.acc_dtype) + new_max).exp_()  # E (h, m, c)
        _mm_into(self.exp_v, s, v_t.transpose(1, 2))
        self.exp_sum.add_(s.sum(dim=2, keepdim=True, dtype=self.acc_dtype))
        self.v_sum.add_(v_t.sum(dim=2, dtype=self.acc_dtype))
        self.count += k_t.shape[2]

    def context(self) -> torch.Tensor:
        """[C | z] (h, m, d + 1) in acc dtype: C = sum phi_k v^T and z = sum phi_k with phi_k = E + eps."""
        context = self.exp_v + EPS * self.v_sum.unsqueeze(1)
        normaliser = self.exp_sum + EPS * self.count
        return torch.cat([context, normaliser], dim=2)


def attend_chunk(q_t: torch.Tensor, cz: torch.Tensor, ps: torch.Tensor, acc_dtype: torch.dtype, *, with_argmax=False):
    """Linear attention of one query chunk against a cell's [C | z].

    q_t: (h, d, c); cz: (h, m, d + 1) in acc dtype. phi_q = E_q + eps, so phi_q [C | z] = E_q [C | z] + eps sum_m [C|z]
    and the eps part is one small vector instead of a pass over (h, m, c).
    Returns out (h, d, c) = phi_q C / (phi_q . z) in acc dtype, the denominator (h, 1, c) and, with_argmax, the
    query stabiliser's argmax (h, 1, c).
    """
    e_q, argmax = query_exp_features(q_t, ps, acc_dtype, with_argmax=with_argmax)
    weighted = torch.bmm(cz.transpose(1, 2).to(e_q.dtype), e_q).to(acc_dtype)  # (h, d + 1, c)
    weighted.add_(EPS * cz.sum(dim=1).unsqueeze(2))
    denominator = weighted[:, -1:]
    return weighted[:, :-1] / denominator, denominator, argmax


# ---------------------------------------------------------------------------------------------------------------------
# Whole blocks without autograd (inference, frozen blocks)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class BlockWeights:
    """One pre-LayerNorm block's weights, cast once to the compute dtype (LayerNorm stays in the input dtype)."""

    heads: int
    dim_head: int
    norm1: torch.nn.LayerNorm
    w_kv: torch.Tensor  # (2 h d, dim): k and v projections stacked, one matmul
    b_kv: torch.Tensor | None  # (2 h d, 1) biases (scBERT has none)
    w_q: torch.Tensor  # (h d, dim)
    b_q: torch.Tensor | None  # (h d, 1)
    w_out: torch.Tensor  # (dim, h d)
    b_out: torch.Tensor | None
    ps: torch.Tensor  # (m, d) projection pre-scaled by d^-1/4
    norm2: torch.nn.LayerNorm
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    @classmethod
    def from_block(cls, attn_block, ff_block, dtype: torch.dtype) -> BlockWeights:
        """attn_block: PreLayerNorm(SelfAttention); ff_block: PreLayerNorm(Chunk(FeedForward))."""
        attn, ff = attn_block.fn, ff_block.fn.fn

        def cast(t):
            return None if t is None else t.detach().to(dtype)

        def column(t):
            return None if t is None else cast(t).unsqueeze(1)

        b_kv = None if attn.to_k.bias is None else torch.cat([attn.to_k.bias, attn.to_v.bias])

        projection = attn.fast_attention.projection_matrix
        return cls(
            heads=attn.heads,
            dim_head=attn.dim_head,
            norm1=attn_block.norm,
            w_kv=cast(torch.cat([attn.to_k.weight, attn.to_v.weight])),
            b_kv=column(b_kv),
            w_q=cast(attn.to_q.weight),
            b_q=column(attn.to_q.bias),
            w_out=cast(attn.to_out.weight),
            b_out=cast(attn.to_out.bias),
            ps=cast(projection * attn.dim_head**-0.25),
            norm2=ff_block.norm,
            w1=cast(ff.w1.weight),
            b1=cast(ff.w1.bias),
            w2=cast(ff.w2.weight),
            b2=cast(ff.w2.bias),
        )


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (c, in) -> (c, out)."""
    return torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())


def _linear_t(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (c, in) -> (out, c): the transposed result, for the head-major (h, d, c) chunk layout."""
    return torch.addmm(bias, weight, x.t()) if bias is not None else torch.mm(weight, x.t())


@torch.no_grad()
def block_forward_no_grad(x: torch.Tensor, weights: BlockWeights, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """x <- x + attn(LN(x)); x <- x + ff(LN(x)), **in place** on x (batch, n, dim); returns x.

    Per cell: pass A over token chunks accumulates the key/value summaries; pass B over the same chunks attends,
    projects, adds the residual and runs the feed-forward block. Temporaries are chunk-sized.
    """
    w = weights
    h, d = w.heads, w.dim_head
    acc_dtype = accumulation_dtype(dtype)
    n = x.shape[1]
    for cell in x:  # (n, dim)
        sums = KeyValueSums(h, w.ps.shape[0], d, device=x.device, acc_dtype=acc_dtype)
        for start in range(0, n, chunk_size):
            normed = _layer_norm(cell[start : start + chunk_size], w.norm1).to(dtype)  # (c, dim)
            kv_t = _linear_t(normed, w.w_kv, w.b_kv)  # (2 h d, c): already head-major and transposed
            c = kv_t.shape[1]
            sums.add_chunk(kv_t[: h * d].view(h, d, c), kv_t[h * d :].view(h, d, c), w.ps, start)
        cz = sums.context()
        for start in range(0, n, chunk_size):
            part = cell[start : start + chunk_size]  # a view: updated in place
            normed = _layer_norm(part, w.norm1).to(dtype)
            q_t = _linear_t(normed, w.w_q, w.b_q)  # (h d, c)
            c = q_t.shape[1]
            out_t, _, _ = attend_chunk(q_t.view(h, d, c), cz, w.ps, acc_dtype)
            part.add_(_linear(out_t.view(h * d, c).t().to(dtype), w.w_out, w.b_out))
            hidden = F.gelu(_linear(_layer_norm(part, w.norm2).to(dtype), w.w1, w.b1))
            part.add_(_linear(hidden, w.w2, w.b2))
    return x


# ---------------------------------------------------------------------------------------------------------------------
# The attention core as an autograd Function (blocks that need gradients)
# ---------------------------------------------------------------------------------------------------------------------


def _heads_t(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(c, h d) token-major slice -> (h, d, c) view (no copy)."""
    c = x.shape[0]
    return x.t().view(heads, -1, c)


class FavorAttentionFunction(torch.autograd.Function):
    """FAVOR+ softmax-kernel attention, q, k, v (batch, n, h d) -> (batch, n, h d), chunked over tokens.

    Equal to `linear_attention(softmax_kernel(q), softmax_kernel(k), v)` of the plain path (per-cell key stabiliser)
    including the gradient through the stabilisers, which in the plain path flows to the argmax entries of s
    (autograd splits it among exact ties; here it goes to the first one).

    Saved for backward: q, k, v, the output, and per cell [C | z] (h, m, d + 1), the denominators (h, n), the key
    stabiliser and its location. Backward, per cell and head, with G = g / D and r = (g . out) / D:
        g_[C|z] = sum_n phi_q,n [G_n, -r_n]        g_phi_q,n = [C | z] [G_n; -r_n]
        g_phi_k,n = g_C v_n + g_z                  g_v,n = g_C^T phi_k,n
    and through E = exp(s - diag - stab): g_s = g_phi E; g_diag = g_stab = -sum g_s (over features for queries, over
    the whole cell for keys, added at the argmax); g_x = Ps^T g_s + g_diag d^-1/2 x.
    """

    @staticmethod
    def forward(ctx, q, k, v, projection, heads: int, chunk_size: int):
        dtype = compute_dtype(q)
        acc_dtype = accumulation_dtype(dtype)
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = (t.to(dtype) for t in (q, k, v))
            dim_head = q.shape[-1] // heads
            ps = (projection * dim_head**-0.25).to(dtype)
            b, n, _ = q.shape
            out = torch.empty_like(q)
            cz_all = torch.empty(b, heads, ps.shape[0], dim_head + 1, device=q.device, dtype=acc_dtype)
            den_all = torch.empty(b, heads, n, device=q.device, dtype=acc_dtype)
            key_max = torch.empty(b, device=q.device, dtype=acc_dtype)
            key_argmax = torch.empty(b, 3, device=q.device, dtype=torch.long)
            for i in range(b):
                sums = KeyValueSums(
                    heads, ps.shape[0], dim_head, device=q.device, acc_dtype=acc_dtype, track_argmax=True
                )
                for start in range(0, n, chunk_size):
                    stop = min(start + chunk_size, n)
                    sums.add_chunk(_heads_t(k[i, start:stop], heads), _heads_t(v[i, start:stop], heads), ps, start)
                cz = sums.context()
                for start in range(0, n, chunk_size):
                    stop = min(start + chunk_size, n)
                    out_t, den, _ = attend_chunk(_heads_t(q[i, start:stop], heads), cz, ps, acc_dtype)
                    out[i, start:stop] = out_t.reshape(heads * dim_head, -1).t()
                    den_all[i, :, start:stop] = den.squeeze(1)
                cz_all[i], key_max[i], key_argmax[i] = cz, sums.max, sums.argmax
        ctx.save_for_backward(q, k, v, out, projection, cz_all, den_all, key_max, key_argmax)
        ctx.heads, ctx.chunk_size, ctx.dtype = heads, chunk_size, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, projection, cz_all, den_all, key_max, key_argmax = ctx.saved_tensors
        heads, chunk_size, dtype = ctx.heads, ctx.chunk_size, ctx.dtype
        acc_dtype = accumulation_dtype(dtype)
        dim_head = q.shape[-1] // heads
        ps = (projection * dim_head**-0.25).to(dtype)
        ps_t = ps.t()
        b, n, _ = q.shape
        grad_out = grad_out.to(dtype)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        with torch.autocast(q.device.type, enabled=False):
            for i in range(b):
                cz = cz_all[i]
                # Pass over query chunks: g_q and the gradient of [C | z].
                grad_cz = torch.zeros_like(cz)
                grad_cz_eps = torch.zeros(heads, 1, dim_head + 1, device=q.device, dtype=acc_dtype)
                for start in range(0, n, chunk_size):
                    stop = min(start + chunk_size, n)
                    q_t = _heads_t(q[i, start:stop], heads)
                    g_t = _heads_t(grad_out[i, start:stop], heads).to(acc_dtype)
                    o_t = _heads_t(out[i, start:stop], heads).to(acc_dtype)
                    den = den_all[i, :, start:stop].unsqueeze(1)  # (h, 1, c)
                    g_over_d = g_t / den
                    r = (g_t * o_t).sum(dim=1, keepdim=True) / den
                    gr = torch.cat([g_over_d, -r], dim=1)  # (h, d + 1, c)
                    e_q, argmax = query_exp_features(q_t, ps, acc_dtype, with_argmax=True)
                    gr_c = gr.to(dtype)
                    _mm_into(grad_cz, e_q, gr_c.transpose(1, 2))
                    grad_cz_eps.add_(gr.sum(dim=2).unsqueeze(1))
                    g_s = torch.bmm(cz.to(dtype), gr_c).mul_(e_q)  # (h, m, c): g_phi_q E_q
                    grad_q[i, start:stop] = _features_input_grad(g_s, q_t, ps, ps_t, argmax, acc_dtype).t()
                grad_cz.add_(EPS * grad_cz_eps)
                grad_c, grad_z = grad_cz[:, :, :dim_head], grad_cz[:, :, dim_head:]  # (h, m, d), (h, m, 1)
                grad_c_x = grad_c.to(dtype)
                grad_c_eps = EPS * grad_c.sum(dim=1).unsqueeze(2)  # (h, d, 1)
                # Pass over key chunks: g_k, g_v and the gradient of the (whole-cell) key stabiliser.
                grad_max = torch.zeros((), device=q.device, dtype=acc_dtype)
                for start in range(0, n, chunk_size):
                    stop = min(start + chunk_size, n)
                    k_t = _heads_t(k[i, start:stop], heads)
                    v_t = _heads_t(v[i, start:stop], heads)
                    e_k = key_exp_features(k_t, ps, key_max[i], acc_dtype)  # (h, m, c)
                    grad_v_t = torch.bmm(grad_c_x.transpose(1, 2), e_k).to(acc_dtype).add_(grad_c_eps)
                    grad_v[i, start:stop] = grad_v_t.reshape(heads * dim_head, -1).t()
                    g_phi = torch.bmm(grad_c_x, v_t).to(acc_dtype).add_(grad_z)
                    g_s = g_phi.mul_(e_k).to(dtype)
                    grad_k_t, g_diag = _features_input_grad(g_s, k_t, ps, ps_t, None, acc_dtype, return_diag=True)
                    grad_max.add_(g_diag.sum())
                    grad_k[i, start:stop] = grad_k_t.t()
                head, feature, token = key_argmax[i].tolist()
                grad_k[i, token, head * dim_head : (head + 1) * dim_head] += (grad_max * ps[feature]).to(dtype)
        return grad_q, grad_k, grad_v, None, None, None


def _features_input_grad(g_s, x_t, ps, ps_t, argmax, acc_dtype, *, return_diag=False):
    """Gradient w.r.t. x of E = exp(Ps x - diag(x) - stab), given g_s = g_E * E (h, m, c).

    g_diag = g_stab = -sum_m g_s per token; g_x = Ps^T g_s + g_diag d^-1/2 x (+ g_stab Ps[argmax] when the stabiliser
    is the per-token max; for keys the caller adds the whole-cell stabiliser's gradient). Returns (h d, c) [, g_diag].
    """
    h, d, c = x_t.shape
    g_diag = -g_s.sum(dim=1, keepdim=True, dtype=acc_dtype)  # (h, 1, c)
    grad = torch.matmul(ps_t, g_s).to(acc_dtype)  # (h, d, c)
    grad.add_(g_diag * (d**-0.5) * x_t.to(acc_dtype))
    if argmax is not None:
        grad.add_(ps[argmax.squeeze(1)].transpose(1, 2).to(acc_dtype) * g_diag)
    grad = grad.view(h * d, c).to(x_t.dtype)
    return (grad, g_diag) if return_diag else grad
