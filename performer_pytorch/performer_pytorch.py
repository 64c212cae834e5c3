"""scBERT's Performer: expression-bin tokens plus gene2vec, FAVOR+ linear attention, an LM or a cell-type head.

The maths follows SPEC section 2 (Choromanski et al. 2021, "Rethinking attention with Performers"; Yang et al. 2022).
Module and parameter names mirror the published scBERT checkpoints so they load with `strict=True`:

    token_emb.weight                                  (num_tokens, dim)
    pos_emb.emb.weight                                (max_seq_len, dim)   gene2vec rows + one zero row
    performer.calls_since_last_redraw                 ()
    performer.net.layers.{i}.0.norm.{weight,bias}     pre-attention LayerNorm
    performer.net.layers.{i}.0.fn.fast_attention.projection_matrix   (nb_features, dim_head)
    performer.net.layers.{i}.0.fn.to_{q,k,v}.weight   (heads * dim_head, dim)
    performer.net.layers.{i}.0.fn.to_out.{weight,bias}
    performer.net.layers.{i}.1.norm.{weight,bias}     pre-feed-forward LayerNorm
    performer.net.layers.{i}.1.fn.fn.w{1,2}.{weight,bias}
    norm.{weight,bias}
    to_out.{weight,bias}  or  to_out.{conv1,fc1,fc2,fc3}.*   (LM head or ClassificationHead)

Pure functions (`gaussian_orthogonal_random_matrix`, `softmax_kernel`, `generalized_kernel`, `linear_attention`)
hold the maths; the modules hold state.

Two ways to compute the same numbers:
- the plain path (this file): full (batch, heads, tokens, features) tensors, the readable definition;
- the fast path (`fast_attention.py`, the default): the same maths in token chunks, frozen blocks and inference
  without autograd, and a custom autograd Function for the attention core of blocks that need gradients.
`with performer_pytorch.plain_attention(): ...` forces the plain path (to compare, or to debug).
Which route a block takes is decided per forward call, in one call to `fast_route.run_blocks`; outputs agree within
float32 rounding (tests/test_fast_path.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelInputError
from .fast_attention import compute_dtype, default_chunk_size, fast_path_enabled, favor_self_attention
from .fast_route import run_blocks

# ---------------------------------------------------------------------------------------------------------------------
# The maths: random features and linear attention
# ---------------------------------------------------------------------------------------------------------------------


def _orthogonal_block(size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A (size, size) matrix with orthonormal rows: Q^T from the QR decomposition of a Gaussian matrix."""
    gaussian = torch.randn(size, size, generator=generator)
    q, _ = torch.linalg.qr(gaussian, mode="reduced")
    return q.t()


def gaussian_orthogonal_random_matrix(
    nb_rows: int, nb_columns: int, *, scaling: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """FAVOR+ projection, (nb_rows, nb_columns): stacked orthogonal blocks, rows rescaled.

    scaling 0 gives each row the norm of a fresh Gaussian vector (so rows are marginally Gaussian, as the positive
    random features of the softmax kernel need); scaling 1 gives every row the norm sqrt(nb_columns).
    """
    blocks = [_orthogonal_block(nb_columns, generator) for _ in range(nb_rows // nb_columns)]
    remainder = nb_rows - len(blocks) * nb_columns
    if remainder > 0:
        blocks.append(_orthogonal_block(nb_columns, generator)[:remainder])
    matrix = torch.cat(blocks, dim=0)
    if scaling == 0:
        norms = torch.randn(nb_rows, nb_columns, generator=generator).norm(dim=1)
    elif scaling == 1:
        norms = torch.full((nb_rows,), math.sqrt(float(nb_columns)))
    else:
        raise ValueError(f"scaling must be 0 or 1, got {scaling}")
    return norms.unsqueeze(1) * matrix


def softmax_kernel(
    data: torch.Tensor, projection_matrix: torch.Tensor, *, is_query: bool, eps: float = 1e-4
) -> torch.Tensor:
    """Positive random features of the softmax kernel.

    data: (batch, heads, tokens, dim_head); projection_matrix: (nb_features, dim_head).
    Returns (batch, heads, tokens, nb_features): ratio * (exp(w.x' - |x'|^2 / 2 - stabiliser) + eps), x' = x d^-1/4.

    The stabiliser only guards exp against overflow, but because of `eps` it is not a pure constant factor, so it is
    part of the published numbers: for queries the max over features per token; for keys the max over heads, tokens
    and features of each cell (the reference took one max over the whole batch, which made a cell's output depend on
    its batch-mates; for one cell both agree).
    """
    dim_head = data.shape[-1]
    normalizer = dim_head**-0.25
    ratio = projection_matrix.shape[0] ** -0.5
    # (b, h, n, d) @ (d, m) -> (b, h, n, m): one matmul, no per-(b, h) copy of the projection.
    projected = torch.matmul(data * normalizer, projection_matrix.t().to(data.dtype))
    diag = (data * data).sum(dim=-1, keepdim=True) * (normalizer**2 / 2.0)
    if is_query:
        stabiliser = projected.amax(dim=-1, keepdim=True)
    else:
        stabiliser = projected.amax(dim=(1, 2, 3), keepdim=True)
    return ratio * (torch.exp(projected - diag - stabiliser) + eps)


def generalized_kernel(
    data: torch.Tensor,
    projection_matrix: torch.Tensor,
    *,
    kernel_fn: Callable[[torch.Tensor], torch.Tensor] = F.relu,
    eps: float = 1e-3,
) -> torch.Tensor:
    """Generalised-attention features: kernel_fn(w.x') + eps, x' = x d^-1/4; shapes as `softmax_kernel`."""
    normalizer = data.shape[-1] ** -0.25
    projected = torch.matmul(data * normalizer, projection_matrix.t().to(data.dtype))
    return kernel_fn(projected) + eps


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal linear attention D^-1 q' (k'^T v), with D = q' . sum_n k'_n.

    q, k: (batch, heads, tokens, nb_features) features; v: (batch, heads, tokens, dim_head).
    Returns (batch, heads, tokens, dim_head). Memory is linear in tokens: no (tokens x tokens) matrix.
    """
    k_sum = k.sum(dim=-2)  # (b, h, m)
    denominator = torch.matmul(q, k_sum.unsqueeze(-1))  # (b, h, n, 1)
    context = torch.matmul(k.transpose(-1, -2), v)  # (b, h, m, d)
    return torch.matmul(q, context) / denominator


# ---------------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------------


def redraw_generator_seed(seed: int, redraws: int) -> int:
    """The seed of a redraw's generator: a function of the run's seed and the number of redraws before it only (never
    the rank), mixed so that nearby (seed, count) pairs give unrelated streams."""
    return int(np.random.SeedSequence([int(seed) % 2**63, int(redraws)]).generate_state(1, dtype=np.uint64)[0] >> 1)


class FastAttention(nn.Module):
    """FAVOR+ attention over already projected q, k, v; holds the random projection as a buffer."""

    def __init__(
        self,
        dim_heads: int,
        nb_features: int | None = None,
        ortho_scaling: int = 0,
        generalized_attention: bool = False,
        kernel_fn: Callable[[torch.Tensor], torch.Tensor] = F.relu,
    ):
        super().__init__()
        self.dim_heads = dim_heads
        self.nb_features = nb_features if nb_features is not None else int(dim_heads * math.log(dim_heads))
        self.ortho_scaling = ortho_scaling
        self.generalized_attention = generalized_attention
        self.kernel_fn = kernel_fn
        self.register_buffer("projection_matrix", self._draw())

    def _draw(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return gaussian_orthogonal_random_matrix(
            self.nb_features, self.dim_heads, scaling=self.ortho_scaling, generator=generator
        )

    @torch.no_grad()
    def redraw_projection_matrix(self, generator: torch.Generator | None = None) -> None:
        """A new projection from `generator` (a CPU generator; None: torch's global RNG)."""
        self.projection_matrix.copy_(self._draw(generator).to(self.projection_matrix))

    def features(self, data: torch.Tensor, *, is_query: bool) -> torch.Tensor:
        if self.generalized_attention:
            return generalized_kernel(data, self.projection_matrix, kernel_fn=self.kernel_fn)
        return softmax_kernel(data, self.projection_matrix, is_query=is_query)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (batch, heads, tokens, dim_head) -> (batch, heads, tokens, dim_head)."""
        return linear_attention(self.features(q, is_query=True), self.features(k, is_query=False), v)


class SelfAttention(nn.Module):
    """Multi-head self-attention with FAVOR+; q/k/v projections without bias, output projection with bias."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int = 64,
        nb_features: int | None = None,
        generalized_attention: bool = False,
        kernel_fn: Callable[[torch.Tensor], torch.Tensor] = F.relu,
        dropout: float = 0.0,
        qkv_bias: bool = False,
        attn_out_bias: bool = True,
    ):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.fast_attention = FastAttention(
            dim_head, nb_features, generalized_attention=generalized_attention, kernel_fn=kernel_fn
        )
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim, bias=attn_out_bias)
        self.dropout = nn.Dropout(dropout)
        # Tokens per chunk on the fast path; None picks `fast_attention.default_chunk_size` for the device and dtype.
        self.chunk_size: int | None = None

    @property
    def fast_path_supported(self) -> bool:
        """The fast path implements the softmax kernel (scBERT's); generalized attention stays on the plain path."""
        return not self.fast_attention.generalized_attention

    def tokens_per_chunk(self, x: torch.Tensor) -> int:
        """Tokens per chunk for input x: the set size, else the default for x's device and compute dtype."""
        if self.chunk_size is not None:
            return self.chunk_size
        return default_chunk_size(x.device, compute_dtype(x))

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, heads * dim_head) -> (batch, heads, tokens, dim_head)."""
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, tokens, dim) -> (batch, tokens, dim)."""
        if fast_path_enabled() and self.fast_path_supported:
            return self.forward_fast(x)
        q, k, v = (self.split_heads(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.fast_attention(q, k, v)  # (b, h, n, d)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.dropout(self.to_out(out))


    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The fast path's autograd route: projections, attention and output projection in one chunked Function."""
        projections = (self.to_q, self.to_k, self.to_v)
        w_qkv = torch.cat([p.weight for p in projections])  # (3 h d, dim)
        b_qkv = None if self.to_q.bias is None else torch.cat([p.bias for p in projections])
        projection = self.fast_attention.projection_matrix
        chunk_size = self.tokens_per_chunk(x)
        w_out, b_out = self.to_out.weight, self.to_out.bias
        return self.dropout(favor_self_attention(x, w_qkv, b_qkv, w_out, b_out, projection, self.heads, chunk_size))


class FeedForward(nn.Module):
    """Linear(dim, mult * dim) -> GELU (or GEGLU) -> dropout -> Linear(mult * dim, dim)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, glu: bool = False):
        super().__init__()
        self.glu = glu
        self.w1 = nn.Linear(dim, dim * mult * (2 if glu else 1))
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.w2 = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.glu:
            hidden, gate = self.w1(x).chunk(2, dim=-1)
            hidden = self.act(hidden) * gate
        else:
            hidden = self.act(self.w1(x))
        return self.w2(self.dropout(hidden))


class Chunk(nn.Module):
    """Applies `fn` to `chunks` slices along `along_dim` (memory for the feed-forward); keeps the `fn.fn` key path."""

    def __init__(self, chunks: int, fn: nn.Module, along_dim: int = 1):
        super().__init__()
        self.chunks = chunks
        self.fn = fn
        self.along_dim = along_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunks <= 1:
            return self.fn(x)
        return torch.cat([self.fn(part) for part in x.chunk(self.chunks, dim=self.along_dim)], dim=self.along_dim)


class PreLayerNorm(nn.Module):
    """fn(LayerNorm(x)); the residual is added by the caller."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class SequentialSequence(nn.Module):
    """x <- x + attn(x); x <- x + ff(x), block after block (pre-LayerNorm residual blocks).

    With the fast path on (the default), `fast_route.run_blocks` runs the blocks, choosing each block's route (no
    autograd for frozen blocks and inference, chunked autograd functions otherwise); this class holds the plain maths.
    """

    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.layers = layers
        # Block index -> callback given that block's input (batch, n, dim) on every route, just before the block
        # runs (interpret.AttentionRecorder reads attention this way: the fast route calls no block module, so
        # module hooks on a block never fire there). The tensor may be updated in place afterwards: use it at once.
        self.block_input_observers: dict[int, Callable[[torch.Tensor], None]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fast_path_enabled():
            return run_blocks(self, x)
        for index, (attn, ff) in enumerate(self.layers):
            observer = self.block_input_observers.get(index)
            if observer is not None:
                observer(x)
            x = x + attn(x)
            x = x + ff(x)
        return x


class Performer(nn.Module):
    """The block stack plus the projection-redraw counter (a buffer, saved in checkpoints)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        *,
        dim_head: int = 64,
        nb_features: int | None = None,
        feature_redraw_interval: int | None = 1000,
        generalized_attention: bool = False,
        kernel_fn: Callable[[torch.Tensor], torch.Tensor] = F.relu,
        ff_mult: int = 4,
        ff_glu: bool = False,
        ff_chunks: int = 1,
        ff_dropout: float = 0.0,
        attn_dropout: float = 0.0,
        qkv_bias: bool = False,
        attn_out_bias: bool = True,
    ):
        super().__init__()
        layers = nn.ModuleList()
        for _ in range(depth):
            attn = SelfAttention(
                dim,
                heads=heads,
                dim_head=dim_head,
                nb_features=nb_features,
                generalized_attention=generalized_attention,
                kernel_fn=kernel_fn,
                dropout=attn_dropout,
                qkv_bias=qkv_bias,
                attn_out_bias=attn_out_bias,
            )
            ff = Chunk(ff_chunks, FeedForward(dim, mult=ff_mult, dropout=ff_dropout, glu=ff_glu), along_dim=1)
            layers.append(nn.ModuleList([PreLayerNorm(dim, attn), PreLayerNorm(dim, ff)]))
        self.net = SequentialSequence(layers)
        self.feature_redraw_interval = feature_redraw_interval
        self.redraw_enabled = True
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))
        # Where redraws draw from: None, torch's global RNG (as published); a seed, a generator seeded by
        # (seed, redraws so far), the same on every DDP rank (`set_redraw_seed`). Kept in checkpoints beside the
        # weights (`redraw_state`), not in the state dict, whose keys stay the published ones.
        self.redraw_seed: int | None = None
        self.redraws = 0

    def fast_attentions(self) -> list[FastAttention]:
        return [m for m in self.modules() if isinstance(m, FastAttention)]

    @torch.no_grad()
    def redraw_projections(self) -> None:
        """Draw a new projection for every layer (frozen ones too, as published) and reset the counter."""
        generator = None
        if self.redraw_seed is not None:
            generator = torch.Generator().manual_seed(redraw_generator_seed(self.redraw_seed, self.redraws))
        for fast_attention in self.fast_attentions():
            fast_attention.redraw_projection_matrix(generator)
        self.redraws += 1
        self.calls_since_last_redraw.zero_()

    @torch.no_grad()
    def check_redraw(self) -> None:
        """Count training calls; on the call that finds the counter at the interval, redraw instead of counting.

        Eval mode never redraws nor counts. With an interval of 1000, calls 1..1000 count up to 1000 and call 1001
        redraws (as the reference does).
        """
        if not self.training or not self.redraw_enabled or self.feature_redraw_interval is None:
            return
        if int(self.calls_since_last_redraw) >= self.feature_redraw_interval:
            self.redraw_projections()
            return
        self.calls_since_last_redraw += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_redraw()
        return self.net(x)


class Gene2VecPositionalEmbedding(nn.Module):
    """A frozen table, one gene2vec row per reference gene plus an all-zero row for the appended token.

    Added to the token embedding of position i (gene i). `loaded` tells whether real rows were given (from a file, an
    array or a checkpoint's state dict): a model whose table was never filled refuses to run.
    """

    def __init__(self, dim: int, max_seq_len: int, table: np.ndarray | torch.Tensor | str | None = None):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.emb = nn.Embedding(max_seq_len, dim)
        self.emb.weight.requires_grad_(False)
        with torch.no_grad():
            self.emb.weight.zero_()
        self.loaded = False
        if table is not None:
            self.set_table(table)

    def set_table(self, table: np.ndarray | torch.Tensor | str) -> None:
        """Fill from a `.npy` path or an array of (max_seq_len - 1, dim) gene rows (a zero row is appended), or
        of (max_seq_len, dim) rows whose last row is the appended token's."""
        if isinstance(table, str):
            try:
                table = np.load(table, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise ModelInputError(
                    f"could not read the gene2vec file {table!r} ({err}): pass a .npy array of shape (genes, dim)"
                ) from err
        rows = torch.as_tensor(np.asarray(table) if not isinstance(table, torch.Tensor) else table).float()
        n, dim = self.emb.weight.shape
        if rows.dim() == 2 and rows.shape == (n - 1, dim):
            rows = torch.cat([rows, torch.zeros(1, dim)], dim=0)
        if rows.shape != (n, dim):
            raise ModelInputError(
                f"the gene2vec table has shape {tuple(rows.shape)} but the model needs ({n - 1}, {dim}) "
                f"(one row per reference gene, embedding size dim): build it for this gene list with gene2vec.py"
            )
        if not torch.isfinite(rows).all():
            raise ModelInputError("the gene2vec table holds NaN or infinite values: rebuild it with gene2vec.py")
        with torch.no_grad():
            self.emb.weight.copy_(rows)
        self.loaded = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "emb.weight" in state_dict:
            self.loaded = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, n: int) -> torch.Tensor:
        """(n, dim) rows for positions 0..n-1."""
        if not self.loaded:
            raise ModelInputError(
                "the model uses gene2vec positional embeddings but no table was given: pass gene2vec (a .npy path or "
                "array from gene2vec.py), load a checkpoint that holds one, or build the model with "
                "g2v_position_emb=False"
            )
        return self.emb.weight[:n]


class BlockLinear(nn.Linear):
    """An nn.Linear whose output rows come in blocks (one per continual stage that added classes), each computed as its
    own matrix product; `blocks` sums to out_features. One block is exactly nn.Linear.

    Why: one product over more rows is not bit for bit the same as over the old rows (BLAS blocks the product by the
    number of rows and by memory alignment; differences of ~1e-6 seen on a CPU), so growing a head with a plain
    wider Linear would move the old classes' logits before any training. Each block is multiplied from a fresh,
    aligned copy of its rows, as when it was the whole layer. Parameters and state-dict keys are nn.Linear's.
    """

    def __init__(self, in_features: int, blocks: Sequence[int], *, bias: bool = True, device=None, dtype=None):
        blocks = tuple(int(b) for b in blocks)
        if not blocks or min(blocks) < 1:
            raise ValueError(f"blocks must be positive row counts, got {list(blocks)}")
        super().__init__(in_features, sum(blocks), bias=bias, device=device, dtype=dtype)
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        if len(self.blocks) == 1:
            return F.linear(x, self.weight, self.bias)
        outputs, start = [], 0
        for size in self.blocks:
            weight = self.weight[start : start + size].clone()  # (size, in_features), freshly allocated
            bias = self.bias[start : start + size].clone() if self.bias is not None else None
            outputs.append(F.linear(x, weight, bias))
            start += size
        return torch.cat(outputs, dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, blocks={self.blocks}, bias={self.bias is not None}"


class ClassificationHead(nn.Module):
    """scBERT's cell-type head (called `Identity` in the reference), attached as `PerformerLM.to_out`.

    Per gene: a 1 x dim convolution (a learned linear read-out of each gene's encoding) and ReLU, giving one value per
    gene; then an MLP over the seq_len values: Linear(seq_len, 512) -> ReLU -> dropout -> Linear(512, h_dim) -> ReLU
    -> dropout -> Linear(h_dim, n_classes). Input (batch, seq_len, dim) encodings; output (batch, n_classes) logits.
    class_blocks: a head grown over continual stages computes its last layer in these blocks of rows (`BlockLinear`),
    so a rebuilt model gives bit for bit the logits it was trained with; None: one plain Linear.
    """

    def __init__(
        self, *, seq_len: int, dim: int, n_classes: int, h_dim: int = 128, hidden: int = 512, dropout: float = 0.0,
        class_blocks: Sequence[int] | None = None,
    ):
        super().__init__()
        self.config = dict(seq_len=seq_len, dim=dim, n_classes=n_classes, h_dim=h_dim, hidden=hidden, dropout=dropout)
        if class_blocks is not None and len(class_blocks) > 1:
            if sum(class_blocks) != n_classes:
                raise ValueError(f"class_blocks {list(class_blocks)} do not add up to n_classes {n_classes}")
            self.config["class_blocks"] = [int(b) for b in class_blocks]
        self.conv1 = nn.Conv2d(1, 1, (1, dim))
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(seq_len, hidden)
        self.act1 = nn.ReLU()
        self.dropout1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, h_dim)
        self.act2 = nn.ReLU()
        self.dropout2 = nn.Dropout(dropout)
        self.fc3 = BlockLinear(h_dim, class_blocks) if "class_blocks" in self.config else nn.Linear(h_dim, n_classes)

    def reset_gene_scorer(self, encodings: torch.Tensor | None = None) -> None:
        """Start the per-gene scorer (conv1) alive: positive for every gene of the given cells.

        encodings: (cells, seq_len, dim) final-norm encodings of a few training cells (see
        `head_health.start_head_alive`). The weight is PyTorch's usual draw; the bias is then set so that the
        lowest score over those cells and genes is one spread (standard deviation) of the scores above 0, so the
        scores keep their spread and start inside ReLU's linear range. Without encodings: weight 0 and bias 1,
        every score 1 whatever the encodings (alive, but the scorer then learns its spread from zero, slowly).

        Why not PyTorch's draw alone: the encodings of a cell's genes share a large common component (most genes
        hold the same bin-0 token; in the demo the mean encoding has norm 6.2 against 4.5 for the spread around
        it), so a random w sets the sign of w.x + b for nearly every gene at once. Drawn negative, ReLU zeroes every
        score, no gradient ever reaches the scorer and the head predicts one class from the first step (the demo on
        seed 1: 0 of 48,128 scores of 64 training cells positive).
        """
        with torch.no_grad():
            if encodings is None:
                self.conv1.weight.zero_()
                self.conv1.bias.fill_(1.0)
                return
            self.conv1.reset_parameters()
            scores = F.linear(encodings.float(), self.conv1.weight.view(1, -1).float()).flatten()
            spread = float(scores.std()) if scores.numel() > 1 else 0.0
            self.conv1.bias.fill_(max(spread, 1e-3) - float(scores.min()))

    def gene_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq_len, dim) -> (batch, seq_len): the convolution, computed as the linear map it is."""
        weight = self.conv1.weight.view(1, -1)  # (1, dim)
        return self.act(F.linear(x, weight, self.conv1.bias).squeeze(-1))

    def forward(self, x: torch.Tensor, return_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(batch, seq_len, dim) -> (batch, n_classes) logits; with `return_hidden`, also the (batch, h_dim) input of
        the last Linear (the penultimate representation continual learning compares cells by)."""
        x = self.dropout1(self.act1(self.fc1(self.gene_scores(x))))
        hidden = self.dropout2(self.act2(self.fc2(x)))
        logits = self.fc3(hidden)
        return (logits, hidden) if return_hidden else logits


class PerformerLM(nn.Module):
    """scBERT: token embedding + gene2vec, a Performer, a final LayerNorm and `to_out` (LM head or cell-type head).

    Keyword arguments (names as in the published code):
        num_tokens: vocabulary size, bin_num + 2 (7: bins 0..5 and the mask/pad token 6).
        max_seq_len: tokens per cell, gene_num + 1 (16,907 for the published gene list).
        dim: embedding width (200, the gene2vec size). depth: blocks (6). heads: attention heads (10).
        dim_head: width per head (64; the attention inner width is heads * dim_head).
        local_attn_heads: must be 0 (scBERT uses global attention only).
        causal: must be False (scBERT's attention is bidirectional).
        nb_features: random features, default int(dim_head * ln(dim_head)) = 266.
        feature_redraw_interval: redraw every layer's projection after this many training calls (1000; None: never).
        generalized_attention / kernel_fn: ReLU-kernel attention instead of the softmax kernel (off in scBERT).
        ff_mult, ff_glu, ff_chunks: feed-forward width multiple (4), GEGLU (off), token chunks for memory (1).
        emb_dropout, ff_dropout, attn_dropout: dropouts (0 in scBERT).
        qkv_bias / attn_out_bias: biases of the q, k, v projections (False) and the output projection (True).
        g2v_position_emb: add the gene2vec table (True); False adds no positional term at all.
        gene2vec: the table, a `.npy` path or an array of (max_seq_len - 1, dim); may instead come from a state dict.
        lm_head: build the pretraining head Linear(dim, num_tokens) as `to_out` (True); False leaves `to_out` None.
    """

    def __init__(
        self,
        *,
        num_tokens: int,
        max_seq_len: int,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int = 64,
        local_attn_heads: int = 0,
        causal: bool = False,
        nb_features: int | None = None,
        feature_redraw_interval: int | None = 1000,
        generalized_attention: bool = False,
        kernel_fn: Callable[[torch.Tensor], torch.Tensor] = F.relu,
        ff_mult: int = 4,
        ff_glu: bool = False,
        ff_chunks: int = 1,
        emb_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        attn_dropout: float = 0.0,
        qkv_bias: bool = False,
        attn_out_bias: bool = True,
        g2v_position_emb: bool = True,
        gene2vec: np.ndarray | torch.Tensor | str | None = None,
        lm_head: bool = True,
    ):
        super().__init__()
        local = local_attn_heads if isinstance(local_attn_heads, int) else max(local_attn_heads)
        if local:
            raise ValueError("local_attn_heads > 0 is not supported: scBERT uses global FAVOR+ attention only")
        if causal:
            raise ValueError("causal=True is not supported: scBERT's attention is bidirectional")
        self.config = dict(
            num_tokens=num_tokens,
            max_seq_len=max_seq_len,
            dim=dim,
            depth=depth,
            heads=heads,
            dim_head=dim_head,
            nb_features=nb_features if nb_features is not None else int(dim_head * math.log(dim_head)),
            feature_redraw_interval=feature_redraw_interval,
            generalized_attention=generalized_attention,
            ff_mult=ff_mult,
            ff_glu=ff_glu,
            ff_chunks=ff_chunks,
            emb_dropout=emb_dropout,
            ff_dropout=ff_dropout,
            attn_dropout=attn_dropout,
            qkv_bias=qkv_bias,
            attn_out_bias=attn_out_bias,
            g2v_position_emb=g2v_position_emb,
        )
        self.max_seq_len = max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = Gene2VecPositionalEmbedding(dim, max_seq_len, gene2vec) if g2v_position_emb else None
        self.dropout = nn.Dropout(emb_dropout)
        self.performer = Performer(
            dim,
            depth,
            heads,
            dim_head=dim_head,
            nb_features=nb_features,
            feature_redraw_interval=feature_redraw_interval,
            generalized_attention=generalized_attention,
            kernel_fn=kernel_fn,
            ff_mult=ff_mult,
            ff_glu=ff_glu,
            ff_chunks=ff_chunks,
            ff_dropout=ff_dropout,
            attn_dropout=attn_dropout,
            qkv_bias=qkv_bias,
            attn_out_bias=attn_out_bias,
        )
        self.norm = nn.LayerNorm(dim)
        self.to_out: nn.Module | None = nn.Linear(dim, num_tokens) if lm_head else None

    @property
    def head_config(self) -> dict | None:
        """What `to_out` is, so a checkpoint can rebuild it: {"type": "lm"}, {"type": "classifier", ...} or None."""
        if self.to_out is None:
            return None
        if isinstance(self.to_out, ClassificationHead):
            return {"type": "classifier", **self.to_out.config}
        if isinstance(self.to_out, nn.Linear):
            return {"type": "lm"}
        return {"type": type(self.to_out).__name__}

    def set_chunk_size(self, tokens: int | None) -> None:
        """Tokens per chunk on the fast path (None: the default for the device and dtype, `default_chunk_size`).

        Only speed and memory depend on it, never the result (beyond float rounding)."""
        if tokens is not None and tokens < 1:
            raise ValueError(f"chunk size must be a positive number of tokens, got {tokens}")
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.chunk_size = tokens

    def set_redraw_seed(self, seed: int | None) -> None:
        """Draw every later projection redraw from a generator seeded by (seed, redraws so far), so all DDP ranks
        redraw the same projections (a rank's own RNG is seeded with seed + rank for masking and dropout); None
        goes back to torch's global RNG."""
        self.performer.redraw_seed = None if seed is None else int(seed)

    def redraw_state(self) -> dict:
        """{"seed", "count"}: what the next redraw draws from (saved in checkpoints, `load_redraw_state`)."""
        return {"seed": self.performer.redraw_seed, "count": int(self.performer.redraws)}

    def load_redraw_state(self, state: dict | None) -> None:
        """Continue the redraws of a saved run: its count (and its seed when this model has none set)."""
        if not state:
            return
        if self.performer.redraw_seed is None and state.get("seed") is not None:
            self.performer.redraw_seed = int(state["seed"])
        self.performer.redraws = int(state.get("count", 0))

    def fix_projections(self, fixed: bool = True) -> None:
        """Stop (or allow again) projection redraws in training mode; eval mode never redraws anyway."""
        self.performer.redraw_enabled = not fixed

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, n) int tokens -> (batch, n, dim) token embedding plus gene2vec rows."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, n), got shape {tuple(tokens.shape)}")
        n = tokens.shape[1]
        if n > self.max_seq_len:
            raise ValueError(f"{n} tokens per cell but the model was built for max_seq_len={self.max_seq_len}")
        x = self.token_emb(tokens)
        if self.pos_emb is not None:
            x = x + self.pos_emb(n).to(x.dtype)
        return self.dropout(x)

    def forward(self, tokens: torch.Tensor, return_encodings: bool = False) -> torch.Tensor:
        """(batch, n) tokens -> `to_out` output: (batch, n, num_tokens) LM logits or (batch, n_classes) class logits;
        with `return_encodings`, the (batch, n, dim) encodings after the final norm."""
        x = self.performer(self.embed(tokens))
        x = self.norm(x)
        if return_encodings or self.to_out is None:
            return x
        return self.to_out(x)
