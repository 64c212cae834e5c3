"""Fast FAVOR+ attention: the same numbers as the plain path in `performer_pytorch.py`, computed in token chunks.

Why: at full size a cell has n = 16,907 tokens, and the plain path materialises several (batch, heads, n, features)
tensors per layer (180 MB each for one cell). Allocating, page-faulting and streaming those through memory costs more
than the arithmetic. Here every large temporary is one chunk of tokens (a few MB), kept in a `Workspace` that is
reused for every chunk, cell and block, so nothing is handed back to the OS and page-faulted in again.

Two routes, both tested against the plain path (tests/test_fast_path.py):

* `blocks_forward_no_grad`: consecutive pre-LayerNorm blocks (attention + feed-forward) without autograd, for
  inference and for frozen blocks during fine-tuning. Per cell and block, pass A makes each key chunk's key/value
  summaries, merged in chunk order; pass B streams query chunks: attention, output projection, residual,
  feed-forward, residual, in place. The chunk tasks run on `cpu_workers` threads on a CPU with several threads.
* `favor_self_attention` (`FavorAttentionFunction`): the q, k, v projections and the attention as one autograd
  Function for blocks that need gradients; its forward is chunked like passes A/B and saves [q; k; v] and small
  per-cell summaries, its backward recomputes the features chunk by chunk. LayerNorm, the output projection and the
  feed-forward block stay ordinary autograd modules.

Notation (per cell and head): x' = x d^-1/4 (d = dim_head) and the projection P (m, d) is used pre-scaled as
Ps = P d^-1/4, so s = Ps x; diag = |x|^2 d^-1/2 / 2; E = exp(s - diag - stabiliser); features phi = ratio (E + eps).
E is computed as exp2 of the same quantities times log2(e) (the projection and diag pre-multiplied): the same
numbers within float32 rounding, and torch's exp2 is 3x faster than exp on this CPU (measured), which matters with
two (heads, features, tokens) exponentials per layer. Stabilisers are therefore kept in log2 units.
The output phi_q C / (phi_q . z), with C = sum_n phi_k,n v_n^T and z = sum_n phi_k,n, does not change when phi is
multiplied by a constant, so `ratio` is left out everywhere (it cancels exactly; only rounding differs).
The key stabiliser is the max of s over heads, tokens and features of each cell, known only after the last chunk;
the query stabiliser is the max over features of each token, local to a chunk. Forward passes do not subtract them
(nor diag) before the exponential: they compute 2^(s - r) for a reference r fixed before the pass (0 unless s is out
of range, see FREE_ABOVE) and apply 2^(r - diag - stabiliser), one factor per token, on the smaller side of the next
product, as [v | 1] (keys) or the (h, d + 1, c) product with [C | z] (queries). The key sums are rescaled when r
moves (as in streaming softmax) and by 2^(r - max) at the end; the eps parts (eps sum v and eps n) do not depend on
the stabiliser and are added at the end. Backward recomputes stabilised features (`query_exp_features`,
`key_exp_features`), whose max entries also carry the stabilisers' gradients.

Layout: chunks are kept "transposed", (heads, features, tokens), so that every product is one contiguous batched
matmul over heads (over groups of heads on a CPU, `head_groups`); the (m, d) projection is repeated per head once
per call, (h, m, d), for `bmm`.
bfloat16/float16 (autocast): matmuls run in the autocast dtype, sums over tokens, the context and the division in
float32, as the plain path under autocast does for its matmuls.

Tokens per chunk: `PerformerLM.set_chunk_size(n)` (default `default_chunk_size`, by device and dtype); results do
not depend on it beyond float rounding. Large whole-cell tensors of the autograd route come from `buffers.take`,
which reuses them from one training step to the next.

`plain_attention()` switches all of this off (the plain path), e.g. to compare: `with plain_attention(): model(x)`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import buffers, cpu_workers

EPS = 1e-4  # the softmax-kernel eps of SPEC section 2
LOG2E = 1.0 / math.log(2.0)
# Forward passes compute features as 2^(s - r) for a reference r chosen before the pass over the (h, m, c) tensor
# (r = 0 unless that is out of range) and apply the true stabiliser and diag as a factor per token on the smaller
# (h, d + 1, c) side: one pass over (h, m, c) fewer per chunk than subtracting them first. Safe while the max of s
# (log2 units) lies in [r - FREE_BELOW, r + FREE_ABOVE]: 2^(s - r) <= 2^60 cannot overflow, and what flushes to zero
# is below 2^-96 of the stabilised value (eps is 2^-13.3). Otherwise r is moved to the max (the stabilised path).
# float16 (max 65504 = 2^16) has no such room: there r is always the max, as in the stabilised formulas.
FREE_BELOW, FREE_ABOVE = 30.0, 60.0


def free_range(dtype: torch.dtype) -> tuple[float, float]:
    """(FREE_BELOW, FREE_ABOVE) for features computed in `dtype`; (0, 0) for float16."""
    return (0.0, 0.0) if dtype == torch.float16 else (FREE_BELOW, FREE_ABOVE)

# Tokens per chunk. Smaller chunks keep the (heads, features, chunk) temporaries in cache, bigger ones pay fewer
# per-op and thread-synchronisation costs (each elementwise op is one OpenMP parallel region; a full-size forward
# makes about 12,000 op calls at 1,024 tokens). Measured at full size on a 2-core AVX-512 machine with 2 threads:
# float32 1,024 tokens (2.26 s/cell; 256: 2.55 s, 2048: 2.36 s; on a busier day 2,048 won by 1.5%); bfloat16 2,048
# (faster than 1,024 in 10 of 10 interleaved runs, by 4%): the same bytes per chunk. With 1 thread 256-512 is best
# for float32. On a GPU bigger is better.
CPU_CHUNK_BYTES = 1024 * 4  # per token and feature: 1,024 float32 tokens, 2,048 bfloat16 ones
# Heads per group of the forward feature passes (head_groups): (group, features, chunk) at most this many bytes.
# 2.5 MiB is two heads at the default chunk sizes (1.09 MB per head in float32 and in bfloat16). Measured at full
# size against all heads at once (one process, alternating, median of 6-12 pairs): bf16 inference 2.4-3.7% faster
# with two heads, 1.5% with one, 2.9-3.0% with five; float32 6.1% with two, 3.1% with one, 1.2% with five.
CPU_GROUP_BYTES = 5 << 19
GPU_CHUNK_TOKENS = 8192

_fast_path_enabled = True


def head_groups(heads: int, bytes_per_head: int, device: torch.device) -> list[slice]:
    """Heads in groups whose (group, features, tokens) part of s takes at most CPU_GROUP_BYTES (at least one head
    each) on a CPU; one group of all heads elsewhere.

    Why: on a CPU the features of one chunk (10 heads x 266 x 2,048 tokens, 10.9 MB in bf16) do not stay in cache
    between the matmul that makes them, the max, the exp2 and the matmul that uses them; a group's part mostly does.
    Per group the key sums (`KeyValueSums.add_chunk`) and the query products (`attend_chunk`) give the same numbers
    as all heads at once, except where a stabiliser's range test now made per group picks the other (equal within
    rounding) formula.
    """
    if device.type != "cpu":
        return [slice(0, heads)]
    size = max(1, min(heads, CPU_GROUP_BYTES // max(1, bytes_per_head)))
    return [slice(start, min(start + size, heads)) for start in range(0, heads, size)]


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


def default_chunk_size(device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """Tokens per chunk for matmuls in `dtype` on `device` (see CPU_CHUNK_BYTES)."""
    return CPU_CHUNK_BYTES // dtype.itemsize if device.type == "cpu" else GPU_CHUNK_TOKENS


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for x's device, else x's own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums over tokens are kept in at least float32 (float64 stays float64, for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


class Workspace:
    """Chunk-sized buffers, allocated once and reused for every chunk, cell and block of one call.

    Why: a fresh multi-MB tensor per chunk is handed back to the OS by glibc and page-faulted in again on the next
    chunk (measured: it made the feature matmul 1.7x slower). `take` returns a contiguous view of a flat buffer, so a
    shorter last chunk gets a contiguous view too. Values are not preserved between `take`s of the same name.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get((name, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, device=self.device, dtype=dtype)
            self._buffers[(name, dtype)] = buffer
        return buffer[:numel].view(shape)

    def cast(self, name: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x in `dtype` (x itself when it already is); a contiguous copy in the buffer `name` otherwise."""
        if x.dtype == dtype:
            return x
        return self.take(name, tuple(x.shape), dtype).copy_(x)


# ---------------------------------------------------------------------------------------------------------------------
# Pure maths on one chunk of one cell, layout (heads, ., tokens). Chunk tensors live in a Workspace; elementwise
# updates of chunk tensors never mix dtypes (an in-place bf16 op with a float32 operand allocates a hidden temporary).
# ---------------------------------------------------------------------------------------------------------------------


def projections(projection: torch.Tensor, dtype: torch.dtype, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ps, Ps log2(e)) in dtype from the (m, d) projection: the first for gradients, the second for features.

    Both are repeated per head, (heads, m, d), once per call: `bmm` on a contiguous (h, m, d) operand is 15% faster
    than `matmul` broadcasting the (m, d) one, which also makes that (h, m, d) copy on every chunk (measured, bf16).
    """
    scaled = projection * projection.shape[1] ** -0.25

    def per_head(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).expand(heads, *t.shape).contiguous()

    return per_head(scaled), per_head(scaled * LOG2E)


def half_sq_norm_log2(x_t: torch.Tensor, ws: Workspace, acc_dtype: torch.dtype) -> torch.Tensor:
    """diag of the softmax kernel in log2 units: |x|^2 d^-1/2 / 2 log2(e). x_t: (h, d, c) -> (h, 1, c), acc dtype."""
    square = ws.take("square", tuple(x_t.shape), acc_dtype)
    if x_t.dtype == acc_dtype:
        torch.mul(x_t, x_t, out=square)
    else:
        square.copy_(x_t).mul_(square)
    return square.sum(dim=1, keepdim=True).mul_(x_t.shape[1] ** -0.5 / 2.0 * LOG2E)


def exp_features_(s: torch.Tensor, diag: torch.Tensor, stabiliser: torch.Tensor) -> torch.Tensor:
    """s <- 2^(s - diag - stabiliser) in place (log2 units); diag and stabiliser broadcast over (h, m, c)."""
    return s.sub_((diag + stabiliser).to(s.dtype)).exp2_()


def feature_max(s: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """max of s over `dim` (keepdim), or over all of it (dim=None): exactly `s.amax(dim, keepdim=True)`/`s.max()`.

    For bfloat16/float16 the max is taken over the bits as int16, 4.5x faster than amax for the per-token max and 2x
    for the whole (measured): sign-magnitude bits order like the floats they encode when they are non-negative and
    above every negative float. A max whose sign bit is set (all entries negative, or NaN with the sign bit) is taken
    again as floats; so are float32 and float64, whose float reductions are as fast as the integer ones.
    """
    if s.dtype in (torch.bfloat16, torch.float16):
        bits = s.view(torch.int16)
        best = bits.amax() if dim is None else bits.amax(dim=dim, keepdim=True)
        if not bool((best < 0).any()):
            return best.view(s.dtype)
    return s.max() if dim is None else s.amax(dim=dim, keepdim=True)


def query_exp_features(q_t: torch.Tensor, ps2: torch.Tensor, ws: Workspace, acc_dtype, *, with_max_mask=False):
    """E_q = exp(s - diag - max_m s), the stabiliser per token. q_t: (h, d, c); ps2: (h, m, d) Ps log2(e).

    Returns E (h, m, c) in q_t's dtype (the workspace's "features" buffer) and, with_max_mask, where the stabiliser's
    gradient goes: `MaxMask` of the maximal features of each token.
    """
    h, d, c = q_t.shape
    s = torch.bmm(ps2, q_t, out=ws.take("features", (h, ps2.shape[1], c), q_t.dtype))
    stabiliser = feature_max(s, dim=1)
    mask = MaxMask.of(s, stabiliser, ws, acc_dtype, dim=1) if with_max_mask else None
    return exp_features_(s, half_sq_norm_log2(q_t, ws, acc_dtype), stabiliser.to(acc_dtype)), mask


def key_exp_features(
    k_t: torch.Tensor, ps2: torch.Tensor, stabiliser: torch.Tensor, ws: Workspace, acc_dtype, *, with_max_mask=False
):
    """E_k given the cell's key stabiliser (a scalar, log2 units). k_t: (h, d, c); ps2: (h, m, d) -> (h, m, c)."""
    h, d, c = k_t.shape
    s = torch.bmm(ps2, k_t, out=ws.take("features", (h, ps2.shape[1], c), k_t.dtype))
    mask = MaxMask.of(s, stabiliser.to(s.dtype), ws, acc_dtype, dim=None) if with_max_mask else None
    return exp_features_(s, half_sq_norm_log2(k_t, ws, acc_dtype), stabiliser), mask


@dataclass
class MaxMask:
    """Where s equals its max (1.0) and how many entries tie, as autograd's amax backward uses them: the gradient
    of the max is shared equally by the tied entries. Float masks: comparisons into a bool tensor and arithmetic
    with it are 5-8x slower on CPU than into a float one (measured).

    is_max: (h, m, c) in s's dtype (a workspace view: use it before the next chunk); ties: per token (h, 1, c) for
    the query stabiliser (dim=1), or a scalar count over the chunk for the key stabiliser (dim=None)."""

    is_max: torch.Tensor
    ties: torch.Tensor

    @classmethod
    def of(cls, s: torch.Tensor, max_value: torch.Tensor, ws: Workspace, acc_dtype, *, dim: int | None) -> MaxMask:
        is_max = torch.eq(s, max_value, out=ws.take("is_max", tuple(s.shape), s.dtype))
        ties = is_max.sum(dtype=acc_dtype) if dim is None else is_max.sum(dim=dim, keepdim=True, dtype=acc_dtype)
        return cls(is_max, ties)


class KeyValueSums:
    """Streaming key/value summaries of one cell: sum_n E_k,n [v_n | 1]^T, sum_n v_n, and the key stabiliser.

    E_k,n = 2^(s_n - diag_n - max) = 2^(s_n - r) a_n 2^(r - max), with a_n = 2^-diag_n: the exp sums are kept
    relative to a reference r (log2 units, see FREE_ABOVE) and the per-token a_n scales [v_n | 1] (d + 1 rows, not
    m), so a chunk costs one pass over (h, m, c) for its max and one for exp2. r starts at 0 (at the first chunk's max
    if that is out of range) and moves to a chunk's max that exceeds it by more than FREE_ABOVE, rescaling the sums;
    the true stabiliser `max` (the max of s over the cell) is applied in `context`. z = sum E comes out of the same
    matmul as sum E v^T, from the row of a_n appended to a_n v.
    """

    def __init__(self, heads: int, nb_features: int, dim_head: int, *, ws: Workspace, acc_dtype: torch.dtype):
        kw = dict(device=ws.device, dtype=acc_dtype)
        self.ws, self.acc_dtype = ws, acc_dtype
        # [sum v E^T ; sum E], (h, d + 1, m): transposed because a matmul whose output is m x 65 runs at 70% of the
        # speed of this 65 x m one (measured, float32 and bfloat16).
        self.exp_sums = torch.zeros(heads, dim_head + 1, nb_features, **kw)
        self.v_sum = torch.zeros(heads, dim_head, **kw)  # (h, d)
        self.count = 0
        self.max = torch.full((), -math.inf, **kw)
        self.reference: float | None = None

    def add_chunk(self, k_t: torch.Tensor, v_t: torch.Tensor, ps2: torch.Tensor) -> None:
        """Fold in one chunk. k_t, v_t: (h, d, c); ps2: Ps log2(e). Heads go through in `head_groups`."""
        ws, acc_dtype = self.ws, self.acc_dtype
        h, d, c = k_t.shape
        m = ps2.shape[1]
        scale = torch.exp2(half_sq_norm_log2(k_t, ws, acc_dtype).neg_()).to(v_t.dtype)  # a_n (h, 1, c)
        v_scaled = ws.take("v_scaled", (h, d + 1, c), v_t.dtype)  # [a_n v_n ; a_n]
        torch.mul(v_t, scale, out=v_scaled[:, :d])
        v_scaled[:, d:].copy_(scale)
        below, above = free_range(k_t.dtype)
        for heads in head_groups(h, m * c * k_t.element_size(), k_t.device):
            s = torch.bmm(ps2[heads], k_t[heads], out=ws.take("features", (heads.stop - heads.start, m, c), k_t.dtype))
            group_max = feature_max(s).to(acc_dtype)
            self.max = torch.maximum(self.max, group_max)
            # Host-side tests (a sync on GPUs, where there is one group per chunk and chunks are few).
            top = float(group_max)
            if self.reference is None:
                self.reference = 0.0 if -below <= top <= above else top
            elif top > self.reference + above:
                self.exp_sums.mul_(2.0 ** (self.reference - top))
                self.reference = top
            if self.reference != 0.0:
                s.sub_(self.reference)
            s.exp2_()
            _mm_into(self.exp_sums[heads], v_scaled[heads], s.transpose(1, 2), ws)
        # Through a workspace cast: sum(dtype=) makes a fresh converted copy, 10x slower here (measured, bf16).
        self.v_sum.add_(ws.cast("v_acc", v_t, acc_dtype).sum(dim=2))
        self.count += c

    @classmethod
    def merged(cls, parts: Sequence[KeyValueSums]) -> KeyValueSums:
        """The summaries of a cell from those of its chunks, added in the order given (the first part is updated and
        returned)."""
        total = parts[0]
        for part in parts[1:]:
            total.absorb(part)
        return total

    def absorb(self, other: KeyValueSums) -> None:
        """Add the summaries of other tokens: the exp sums are brought to the larger of the two references first."""
        if other.reference is None:  # it saw no tokens
            return
        if self.reference is None:
            self.exp_sums, self.reference = other.exp_sums.clone(), other.reference
        else:
            top = max(self.reference, other.reference)
            if self.reference != top:
                self.exp_sums.mul_(2.0 ** (self.reference - top))
            self.exp_sums.add_(other.exp_sums, alpha=2.0 ** (other.reference - top))
            self.reference = top
        self.v_sum.add_(other.v_sum)
        self.count += other.count
        self.max = torch.maximum(self.max, other.max)

    def context(self) -> torch.Tensor:
        """[C | z]^T (h, d + 1, m) in acc dtype: C = sum phi_k v^T and z = sum phi_k, with phi_k = E + eps."""
        eps_part = torch.cat([self.v_sum, torch.full_like(self.v_sum[:, :1], float(self.count))], dim=1)
        exp_part = self.exp_sums * torch.exp2(self.reference - self.max)
        return exp_part.add_(EPS * eps_part.unsqueeze(2))


class CellContext:
    """What queries need from a cell's keys: [C | z] transposed in the compute dtype and its eps column sums."""

    def __init__(self, czt: torch.Tensor, dtype: torch.dtype):
        self.czt = czt  # [C | z]^T (h, d + 1, m), acc dtype
        self.czt_c = czt.to(dtype)  # in the compute dtype, for matmuls
        self.eps_sums = EPS * czt.sum(dim=2, keepdim=True)  # (h, d + 1, 1): phi_q = E_q + eps adds eps sum_m


def attend_chunk(q_t: torch.Tensor, context: CellContext, ps2: torch.Tensor, ws: Workspace, acc_dtype):
    """Linear attention of one query chunk against a cell's context.

    q_t: (h, d, c). phi_q [C | z] = E_q [C | z] + eps sum_m [C | z]: the eps part is one small vector instead of a
    pass over (h, m, c). E_q,n = 2^(s_n - diag_n - max_m s_n) = 2^s_n a_n: unless the per-token max is out of range
    (FREE_ABOVE), the features are 2^s and the factor a_n scales the (h, d + 1, c) product. Returns out (h, d, c) =
    phi_q C / (phi_q . z) and the denominator (h, 1, c), both in acc dtype and both workspace views (copy them before
    the next chunk).
    """
    h, d, c = q_t.shape
    m = ps2.shape[1]
    diag = half_sq_norm_log2(q_t, ws, acc_dtype)
    factor = ws.take("factor", (h, 1, c), acc_dtype)  # what the (h, d + 1, c) product is multiplied by
    weighted = ws.take("weighted", (h, d + 1, c), q_t.dtype)
    below, above = free_range(q_t.dtype)
    for heads in head_groups(h, m * c * q_t.element_size(), q_t.device):
        s = torch.bmm(ps2[heads], q_t[heads], out=ws.take("features", (heads.stop - heads.start, m, c), q_t.dtype))
        stabiliser = feature_max(s, dim=1).to(acc_dtype)  # (g, 1, c)
        low, high = torch.aminmax(stabiliser)
        if -below <= float(low) and float(high) <= above:  # a host-side test, as in KeyValueSums
            s.exp2_()
            torch.add(diag[heads], stabiliser, out=factor[heads]).neg_().exp2_()
        else:
            exp_features_(s, diag[heads], stabiliser)
            factor[heads].fill_(1.0)
        torch.bmm(context.czt_c[heads], s, out=weighted[heads])
    weighted = ws.cast("weighted_acc", weighted, acc_dtype).mul_(factor)
    weighted.add_(context.eps_sums)
    denominator = weighted[:, d:]
    out = torch.div(weighted[:, :d], denominator, out=ws.take("attended", (h, d, c), acc_dtype))
    return out, denominator


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
    ps2: torch.Tensor  # (h, m, d) projection pre-scaled by d^-1/4 log2(e), repeated per head
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
            ps2=projections(projection, dtype, attn.heads)[1],
            norm2=ff_block.norm,
            w1=cast(ff.w1.weight),
            b1=cast(ff.w1.bias),
            w2=cast(ff.w2.weight),
            b2=cast(ff.w2.bias),
        )


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """x (c, in) -> out (c, out_features)."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _linear_t(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """x (c, in) -> out (out_features, c): transposed, for the head-major (h, d, c) chunk layout."""
    if bias is None:
        return torch.mm(weight, x.t(), out=out)
    return torch.addmm(bias, weight, x.t(), out=out)


def blocks_forward_no_grad(
    x: torch.Tensor,
    weights: Sequence[BlockWeights],
    chunk_size: int,
    dtype: torch.dtype,
    workspaces: Sequence[Workspace] | None = None,
) -> torch.Tensor:
    """Consecutive blocks (x <- x + attn(LN(x)); x <- x + ff(LN(x)) each), **in place** on x (batch, n, dim).

    Per cell and block, pass A over token chunks makes each chunk's key/value summaries (`_key_chunk`), which are
    merged in chunk order (`KeyValueSums.merged`); pass B over the same chunks attends, projects, adds the residual
    and runs the feed-forward block (`_query_chunk`). Chunk j of the next block's pass A can start as soon as chunk j
    of this block's pass B is done. These chunk tasks run on `len(workspaces)` threads (`cpu_workers.run_graph`), one
    workspace of chunk buffers each: threads then work on different kinds of chunk tasks (or different cells) at the
    same time rather than the same op in lockstep. Every task computes the same numbers whichever thread runs it and
    in whatever order, so results do not depend on the number of threads.
    """
    workspaces = list(workspaces) if workspaces else [Workspace(x.device)]
    cells, n = x.shape[0], x.shape[1]
    if min(chunk_size, n) * x.shape[2] * weights[0].heads * weights[0].dim_head < cpu_workers.MIN_TASK_WORK:
        workspaces = workspaces[:1]  # small tasks: threads would cost more than they gain
    bounds = [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]
    depth = len(weights)
    chunk_sums: dict[tuple[int, int], list[KeyValueSums | None]] = {}
    contexts: dict[tuple[int, int], CellContext] = {}
    left: dict[tuple[str, int, int], int] = {}  # chunk tasks still to finish, per pass, cell and block

    # Priorities: one cell after another; within a cell, merges first, then pass A, then pass B.
    def key_task(cell: int, block: int, j: int) -> cpu_workers.Task:
        start, stop = bounds[j]
        fn = functools.partial(_key_chunk, x[cell, start:stop], weights[block], dtype)
        return (cell, 1, block, j), ("A", cell, block, j), fn

    def merge_task(cell: int, block: int) -> cpu_workers.Task:
        def fn(ws: Workspace) -> CellContext:
            return CellContext(KeyValueSums.merged(chunk_sums.pop((cell, block))).context(), dtype)

        return (cell, 0, block, 0), ("M", cell, block, 0), fn

    def query_task(cell: int, block: int, j: int) -> cpu_workers.Task:
        start, stop = bounds[j]
        fn = functools.partial(_query_chunk, x[cell, start:stop], weights[block], contexts[(cell, block)], dtype)
        return (cell, 2, block, j), ("B", cell, block, j), fn

    def on_done(key: tuple, result) -> list[cpu_workers.Task]:
        kind, cell, block, j = key
        if kind == "A":
            chunk_sums.setdefault((cell, block), [None] * len(bounds))[j] = result
            left[key[:3]] = left.get(key[:3], len(bounds)) - 1
            return [merge_task(cell, block)] if left[key[:3]] == 0 else []
        if kind == "M":
            contexts[(cell, block)] = result
            return [query_task(cell, block, j) for j in range(len(bounds))]
        left[key[:3]] = left.get(key[:3], len(bounds)) - 1
        if left[key[:3]] == 0:
            del contexts[(cell, block)]
        return [key_task(cell, block + 1, j)] if block + 1 < depth else []

    first = [key_task(cell, 0, j) for cell in range(cells) for j in range(len(bounds))]
    cpu_workers.run_graph(first, on_done, workspaces)
    return x


@torch.no_grad()  # grad mode is per thread: set here, as chunk tasks run on cpu_workers threads
def _key_chunk(tokens: torch.Tensor, w: BlockWeights, dtype: torch.dtype, ws: Workspace) -> KeyValueSums:
    """Pass A for one chunk of tokens (c, dim): its key/value summaries."""
    h, d, m = w.heads, w.dim_head, w.ps2.shape[1]
    sums = KeyValueSums(h, m, d, ws=ws, acc_dtype=accumulation_dtype(dtype))
    normed = _layer_norm(tokens, w.norm1).to(dtype)  # (c, dim)
    c = normed.shape[0]
    kv_t = _linear_t(normed, w.w_kv, w.b_kv, ws.take("projected", (2 * h * d, c), dtype))  # (2 h d, c)
    sums.add_chunk(kv_t[: h * d].view(h, d, c), kv_t[h * d :].view(h, d, c), w.ps2)
    return sums


@torch.no_grad()
def _query_chunk(part: torch.Tensor, w: BlockWeights, context: CellContext, dtype: torch.dtype, ws: Workspace) -> None:
    """Pass B for one chunk (c, dim), in place: attention, output projection, residual, feed-forward, residual."""
    h, d = w.heads, w.dim_head
    acc_dtype, dim = accumulation_dtype(dtype), part.shape[1]
    normed = _layer_norm(part, w.norm1).to(dtype)
    c = normed.shape[0]
    q_t = _linear_t(normed, w.w_q, w.b_q, ws.take("projected", (h * d, c), dtype))
    attended, _ = attend_chunk(q_t.view(h, d, c), context, w.ps2, ws, acc_dtype)
    attended = ws.cast("attended_c", attended, dtype).view(h * d, c)
    part.add_(_linear(attended.t(), w.w_out, w.b_out, ws.take("out", (c, dim), dtype)))
    normed = _layer_norm(part, w.norm2).to(dtype)
    hidden = _linear(normed, w.w1, w.b1, ws.take("hidden", (c, w.w1.shape[0]), dtype))
    torch.ops.aten.gelu_(hidden)  # in place: F.gelu would allocate a (c, 4 dim) tensor per chunk
    part.add_(_linear(hidden, w.w2, w.b2, ws.take("out", (c, dim), dtype)))


# ---------------------------------------------------------------------------------------------------------------------
# Projections and attention as an autograd Function (blocks that need gradients)
# ---------------------------------------------------------------------------------------------------------------------


def _chunks(n: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of the token chunks."""
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def favor_self_attention(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    b_qkv: torch.Tensor | None,
    w_out: torch.Tensor,
    b_out: torch.Tensor | None,
    projection: torch.Tensor,
    heads: int,
    chunk_size: int,
) -> torch.Tensor:
    """Self-attention with FAVOR+, chunked over tokens, differentiable (`FavorAttentionFunction`).

    x: (batch, n, dim) (the LayerNorm output); w_qkv: (3 h d, dim), the q, k and v weights stacked; b_qkv: (3 h d,)
    or None; w_out: (dim, h d) and b_out: (dim,) or None, the output projection; projection: (m, d).
    Returns (batch, n, dim), what `SelfAttention` returns (before its dropout)."""
    return FavorAttentionFunction.apply(x, w_qkv, b_qkv, w_out, b_out, projection, heads, chunk_size)


class FavorAttentionFunction(torch.autograd.Function):
    """x -> [q; k; v] = W_qkv x (+ b) -> FAVOR+ softmax-kernel attention -> W_out (+ b_out), chunked over tokens.

    Equal to the plain path's `linear_attention(softmax_kernel(q), softmax_kernel(k), v)` (per-cell key stabiliser),
    gradients included, also through the stabilisers, which autograd sends to the max entries of s (shared equally
    by exact ties). The projections are inside so that q, k, v and the attention output exist only head-major,
    (h d, n) per cell, computed and differentiated chunk by chunk: no transposed copies and no (batch, n, 3 h d) or
    (batch, n, h d) gradient tensors.

    Saved for backward: x, W_qkv, W_out, [q; k; v]^T, the attention output A^T (h d, n), and per cell [C | z]^T
    (h, d + 1, m), the denominators (h, n) and the key stabiliser. The output projection: g_A = W_out^T g_y,
    g_W_out += g_y^T A. Backward, per cell and head, with G = g / D and r = (g . out) / D:
        g_[C|z] = sum_n phi_q,n [G_n, -r_n]        g_phi_q,n = [C | z] [G_n; -r_n]
        g_phi_k,n = g_C v_n + g_z                  g_v,n = g_C^T phi_k,n
    and through E = exp(s - diag - stab): g_s = g_phi E; g_diag = g_stab = -sum g_s (over features for queries, over
    the whole cell for keys, added at the max entries); g_q,k = Ps^T g_s + g_diag d^-1/2 (q, k). Features are
    recomputed chunk by chunk (two extra (m, d) x (d, c) products per chunk instead of keeping (h, m, n) tensors).
    Then g_W += g_[q;k;v] x and g_x = g_[q;k;v]^T W, per chunk.
    """

    @staticmethod
    def forward(ctx, x, w_qkv, b_qkv, w_out, b_out, projection, heads: int, chunk_size: int):
        dtype = compute_dtype(x)
        acc_dtype = accumulation_dtype(dtype)
        ws = Workspace(x.device)
        with torch.autocast(x.device.type, enabled=False):
            w = w_qkv.detach().to(dtype)
            bias = None if b_qkv is None else b_qkv.detach().to(dtype).unsqueeze(1)
            wo = w_out.detach().to(dtype)
            bo = None if b_out is None else b_out.detach().to(dtype)
            b, n, dim = x.shape
            inner = w.shape[0] // 3
            d = inner // heads
            _, ps2 = projections(projection, dtype, heads)
            m = ps2.shape[1]
            kw = dict(device=x.device, dtype=acc_dtype)
            # Whole-cell tensors from the step-to-step pool (buffers.py): saved for backward, or returned.
            qkv_t = buffers.take((b, 3 * inner, n), dtype, x.device)
            attended_t = buffers.take((b, inner, n), dtype, x.device)  # A^T, head-major
            y = buffers.take((b, n, dim), dtype, x.device)
            czt_all = torch.empty(b, heads, d + 1, m, **kw)
            den_all = buffers.take((b, heads, n), acc_dtype, x.device)
            key_max = torch.empty(b, **kw)
            for i in range(b):
                sums = KeyValueSums(heads, m, d, ws=ws, acc_dtype=acc_dtype)
                for start, stop in _chunks(n, chunk_size):
                    x_chunk = x[i, start:stop].to(dtype)
                    kv = _linear_t(
                        x_chunk, w[inner:], _rows(bias, inner, None), ws.take("kv", (2 * inner, stop - start), dtype)
                    )
                    qkv_t[i, inner:, start:stop].copy_(kv)  # saved for backward
                    sums.add_chunk(kv[:inner].view(heads, d, -1), kv[inner:].view(heads, d, -1), ps2)
                context = CellContext(sums.context(), dtype)
                for start, stop in _chunks(n, chunk_size):
                    x_chunk = x[i, start:stop].to(dtype)
                    q = _linear_t(x_chunk, w[:inner], _rows(bias, 0, inner), ws.take("q", (inner, stop - start), dtype))
                    qkv_t[i, :inner, start:stop].copy_(q)
                    attended, den = attend_chunk(q.view(heads, d, -1), context, ps2, ws, acc_dtype)
                    attended = attended_t[i, :, start:stop].copy_(attended.view(inner, -1))
                    _linear(attended.t(), wo, bo, y[i, start:stop])
                    den_all[i, :, start:stop].copy_(den.squeeze(1))
                czt_all[i], key_max[i] = context.czt, sums.max
        ctx.save_for_backward(x, w, wo, qkv_t, attended_t, projection, czt_all, den_all, key_max)
        ctx.heads, ctx.chunk_size, ctx.dtype = heads, chunk_size, dtype
        ctx.param_dtype = w_qkv.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        # Longer than the project's ~80 lines on purpose: the query-chunk and key-chunk passes share each cell's
        # [C | z] gradient, the key-stabiliser bookkeeping and the workspace buffers; split, they would pass a dozen
        # tensors between helpers.
        x, w, wo, qkv_t, attended_t, projection, czt_all, den_all, key_max = ctx.saved_tensors
        heads, chunk_size, dtype = ctx.heads, ctx.chunk_size, ctx.dtype
        acc_dtype = accumulation_dtype(dtype)
        ws = Workspace(x.device)
        b, n, dim = x.shape
        inner = w.shape[0] // 3
        d = inner // heads
        ps, ps2 = projections(projection, dtype, heads)
        m = ps.shape[1]
        grad_y = grad_y.to(dtype).contiguous()
        need = ctx.needs_input_grad
        need_x, need_w, need_wo = need[0], need[1] or need[2], need[3] or need[4]
        grad_x = buffers.take_like(x)
        kw = dict(device=x.device, dtype=acc_dtype)
        grad_w, grad_b = torch.zeros(3 * inner, dim, **kw), torch.zeros(3 * inner, **kw)
        grad_wo, grad_bo = torch.zeros(dim, inner, **kw), torch.zeros(dim, **kw)
        with torch.autocast(x.device.type, enabled=False):
            for i in range(b):
                q_t, k_t, v_t = (t.view(heads, d, n) for t in qkv_t[i].split(inner))
                czt = czt_all[i]
                cz_c = czt.to(dtype).transpose(1, 2)  # [C | z] (h, m, d + 1)
                # Pass over query chunks: g_q, and the gradient of [C | z] (kept transposed, (h, d + 1, m)).
                grad_czt = torch.zeros_like(czt)
                grad_cz_eps = torch.zeros(heads, d + 1, 1, device=x.device, dtype=acc_dtype)
                for start, stop in _chunks(n, chunk_size):
                    c = stop - start
                    g_y, o_t = grad_y[i, start:stop], attended_t[i, :, start:stop]  # (c, dim), (h d, c)
                    if need_wo:
                        _mm_into(grad_wo, g_y.t(), o_t.t(), ws)  # (dim, c) @ (c, h d)
                        grad_bo.add_(g_y.sum(dim=0, dtype=acc_dtype))
                    g_t = torch.mm(wo.t(), g_y.t(), out=ws.take("g_attended", (inner, c), dtype)).view(heads, d, c)
                    o_t = o_t.view(heads, d, c)
                    den = den_all[i, :, start:stop].unsqueeze(1)  # (h, 1, c)
                    gr = ws.take("gr", (heads, d + 1, c), acc_dtype)  # [G; -r]
                    torch.div(g_t, den, out=gr[:, :d])
                    g_dot_out = torch.mul(g_t, o_t, out=ws.take("g_dot_out", (heads, d, c), acc_dtype))
                    torch.div(g_dot_out.sum(dim=1, keepdim=True), den, out=gr[:, d:]).neg_()
                    grad_cz_eps.add_(gr.sum(dim=2, keepdim=True))
                    gr_c = ws.cast("gr_c", gr, dtype)
                    q_chunk = q_t[:, :, start:stop]
                    e_q, max_mask = query_exp_features(q_chunk, ps2, ws, acc_dtype, with_max_mask=True)
                    _mm_into(grad_czt, gr_c, e_q.transpose(1, 2), ws)
                    g_s = torch.bmm(cz_c, gr_c, out=ws.take("grad_features", (heads, m, c), dtype)).mul_(e_q)
                    # The stabiliser's gradient, -sum_m g_s per token, goes to its max entries (before Ps^T).
                    g_diag = g_s.sum(dim=1, keepdim=True, dtype=acc_dtype).neg_()
                    g_s.addcmul_(max_mask.is_max, (g_diag / max_mask.ties).to(dtype))
                    grad_q = _features_input_grad(g_s, g_diag, q_chunk, ps, ws, acc_dtype)
                    grad_q = ws.cast("grad_q_c", grad_q, dtype).view(inner, c)
                    _projection_backward(
                        grad_q,
                        x[i, start:stop],
                        w[:inner],
                        ws,
                        grad_w=grad_w[:inner] if need_w else None,
                        grad_b=grad_b[:inner] if need_w else None,
                        grad_x=grad_x[i, start:stop] if need_x else None,
                        accumulate=False,
                    )
                grad_czt.add_(EPS * grad_cz_eps)
                grad_ct_x = grad_czt[:, :d].to(dtype)  # g_C^T (h, d, m)
                grad_z_x = grad_czt[:, d:].transpose(1, 2).to(dtype)  # g_z (h, m, 1)
                grad_c_eps = (EPS * grad_czt[:, :d].sum(dim=2, keepdim=True)).to(dtype)  # (h, d, 1): phi_k's eps
                # Pass over key chunks: g_k, g_v and the gradient of the (whole-cell) key stabiliser, which is only
                # known at the end: the entries holding the max are remembered and corrected afterwards.
                grad_max = torch.zeros((), device=x.device, dtype=acc_dtype)
                ties = torch.zeros((), device=x.device, dtype=acc_dtype)
                tied = []  # (head, feature, token) of the entries equal to the key stabiliser
                for start, stop in _chunks(n, chunk_size):
                    c = stop - start
                    k_chunk, v_chunk = k_t[:, :, start:stop], v_t[:, :, start:stop]
                    e_k, max_mask = key_exp_features(k_chunk, ps2, key_max[i], ws, acc_dtype, with_max_mask=True)
                    if bool(max_mask.ties > 0):
                        where = max_mask.is_max.nonzero()
                        where[:, 2] += start
                        tied.append(where)
                        ties += max_mask.ties
                    grad_kv = ws.take("grad_kv", (2 * inner, c), dtype)
                    grad_v = torch.bmm(grad_ct_x, e_k, out=grad_kv[inner:].view(heads, d, c))
                    grad_v.add_(grad_c_eps)
                    g_phi = torch.baddbmm(
                        grad_z_x, grad_ct_x.transpose(1, 2), v_chunk, out=ws.take("grad_features", (heads, m, c), dtype)
                    )
                    g_s = g_phi.mul_(e_k)
                    g_diag = g_s.sum(dim=1, keepdim=True, dtype=acc_dtype).neg_()
                    grad_max.add_(g_diag.sum())
                    grad_kv[:inner].copy_(_features_input_grad(g_s, g_diag, k_chunk, ps, ws, acc_dtype).view(inner, c))
                    _projection_backward(
                        grad_kv,
                        x[i, start:stop],
                        w[inner:],
                        ws,
                        grad_w=grad_w[inner:] if need_w else None,
                        grad_b=grad_b[inner:] if need_w else None,
                        grad_x=grad_x[i, start:stop] if need_x else None,
                        accumulate=True,
                    )
                if not tied:  # cannot happen with deterministic matmuls; then take the max of the recomputed s
                    tied, ties = [_locate_max(k_t, ps2, chunk_size)], 1.0
                for head, feature, token in torch.cat(tied).tolist():
                    # g_k[token, head] += g_max / ties * Ps[feature], pushed through the projection
                    rows = slice(inner + head * d, inner + (head + 1) * d)
                    grad_k = (grad_max / ties * ps[head, feature]).to(acc_dtype)  # (d,)
                    if need_w:
                        grad_w[rows].addr_(grad_k, x[i, token].to(acc_dtype))
                        grad_b[rows].add_(grad_k)
                    if need_x:
                        grad_x[i, token].add_((grad_k @ w[rows].to(acc_dtype)).to(grad_x.dtype))
        grads = [grad_w, grad_b, grad_wo, grad_bo]
        grads = [g.to(ctx.param_dtype) if need[k + 1] else None for k, g in enumerate(grads)]
        return (grad_x if need_x else None, *grads, None, None, None)


def _rows(bias: torch.Tensor | None, start: int, stop: int | None) -> torch.Tensor | None:
    return None if bias is None else bias[start:stop]


def _projection_backward(grad_t, x_chunk, w, ws: Workspace, *, grad_w, grad_b, grad_x, accumulate: bool) -> None:
    """Backward of y^T = W x^T (+ b) for one chunk: grad_t (out, c) in the compute dtype, x_chunk (c, dim).

    grad_w (out, dim) and grad_b (out,) accumulate (acc dtype); grad_x (c, dim) is written, or added to when
    `accumulate`. A None target is skipped (frozen weights, an input that needs no gradient)."""
    dtype = grad_t.dtype
    if grad_w is not None:
        _mm_into(grad_w, grad_t, x_chunk.to(dtype), ws)  # (out, c) @ (c, dim)
        grad_b.add_(grad_t.sum(dim=1, dtype=grad_b.dtype))
    if grad_x is not None:
        product = torch.mm(grad_t.t(), w, out=ws.take("grad_x_chunk", (x_chunk.shape[0], w.shape[1]), dtype))
        (grad_x.add_ if accumulate else grad_x.copy_)(product)


def _locate_max(k_t: torch.Tensor, ps2: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(1, 3) (head, feature, token) of the largest s = ps2 k over a cell; k_t: (h, d, n)."""
    best, where = -math.inf, None
    for start, stop in _chunks(k_t.shape[2], chunk_size):
        s = torch.matmul(ps2, k_t[:, :, start:stop])  # (h, m, c)
        value, flat = s.view(-1).max(dim=0)
        if float(value) > best:
            m, c = s.shape[1], s.shape[2]
            best, flat = float(value), int(flat)
            where = torch.tensor([[flat // (m * c), (flat // c) % m, flat % c + start]])
    return where


def _mm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ws: Workspace) -> None:
    """acc += a @ b (2-D or batched), without a fresh temporary."""
    batched = a.dim() == 3
    if a.dtype == acc.dtype:
        (acc.baddbmm_ if batched else acc.addmm_)(a, b)
    else:
        shape = (*a.shape[:-1], b.shape[-1])
        acc.add_((torch.bmm if batched else torch.mm)(a, b, out=ws.take("product", shape, a.dtype)))


def _features_input_grad(g_s, g_diag, x_t, ps, ws: Workspace, acc_dtype) -> torch.Tensor:
    """Gradient w.r.t. x (h, d, c) of E = exp(Ps x - diag(x) - stab): g_x = Ps^T g_s + g_diag d^-1/2 x.

    g_s = g_E * E (h, m, c) in the compute dtype, including the stabiliser's share; g_diag = -sum_m g_E * E (h, 1, c).
    Returns (h, d, c) in acc dtype (a workspace view).
    """
    h, d, c = x_t.shape
    grad = torch.bmm(ps.transpose(1, 2), g_s, out=ws.take("grad_x", (h, d, c), g_s.dtype))
    grad = ws.cast("grad_x_acc", grad, acc_dtype)
    return grad.addcmul_(ws.cast("x_acc", x_t, acc_dtype), g_diag * d**-0.5)
