"""Which genes a cell's prediction attends to: per-gene attention received, in memory linear in the genes.

The paper ranks genes by the attention they receive in the last Performer layer (Yang et al. 2022, "Model
interpretability"): with A the (tokens x tokens) attention matrix of a head, gene j receives sum_i A_ij, averaged over
heads. FAVOR+ never forms A; it factorises it as

    A_ij = q'_i . k'_j / D_i,    D_i = q'_i . sum_j k'_j      (q', k': random features of queries and keys)

so the column sums are  sum_i A_ij = k'_j . (sum_i q'_i / D_i):  one (features,) vector per head, then one dot
product per gene. Memory is O(tokens x features), never O(tokens^2) (16,907^2 x 10 heads would be 11 GiB per cell).

Each row of A sums to 1, so a cell's scores over all tokens sum to the number of tokens (genes + the appended one);
a score of 1 is the average. The features come from the layer's own modules (`PreLayerNorm.norm`, `SelfAttention.to_q`,
`to_k`, `split_heads`, `FastAttention.features`), in float32. Their input, the chosen block's input, is what the
model computed, handed over by the block stack (`block_input_observers`; the model's fast inference path does not
call the block modules one by one, so module hooks on a block would never fire there): the scores cost two feature
maps, not another forward. Under autocast the model's blocks ran in bf16/fp16, so the chosen block's input is instead
recomputed in float32 from the block stack's input (a forward pre-hook on `performer.net`) by the blocks below it,
about one more forward for the last layer: scores do not depend on --amp.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .errors import ModelInputError
from .performer_pytorch import softmax_kernel

__all__ = [
    "AttentionRecorder",
    "GroupMeans",
    "attention_layer",
    "attention_received",
    "column_sums_from_features",
    "layer_features",
]


def column_sums_from_features(q_features: torch.Tensor, k_features: torch.Tensor) -> torch.Tensor:
    """Column sums of the normalised FAVOR+ attention matrix, without forming it.

    q_features, k_features: (batch, heads, tokens, nb_features). Returns (batch, heads, tokens): entry j is
    sum_i A_ij with A_ij = q'_i . k'_j / (q'_i . sum_l k'_l).
    """
    denominator = torch.matmul(q_features, k_features.sum(dim=-2).unsqueeze(-1))  # (b, h, n, 1)
    query_weights = (q_features / denominator).sum(dim=-2)  # (b, h, m)
    return torch.matmul(k_features, query_weights.unsqueeze(-1)).squeeze(-1)  # (b, h, n)


def attention_layer(model: nn.Module, layer: int = -1) -> nn.Module:
    """The `PreLayerNorm(SelfAttention)` of block `layer` (negative counts from the end)."""
    layers = model.performer.net.layers
    if not -len(layers) <= layer < len(layers):
        raise ModelInputError(
            f"attention layer {layer} does not exist in a model of depth {len(layers)}: pass a layer from "
            f"{-len(layers)} to {len(layers) - 1} (-1 is the last, as in the paper)"
        )
    return layers[layer][0]


def layer_features(prenorm_attention: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features (q', k') of one block's attention for its input x.

    prenorm_attention: `performer.net.layers[i][0]` (LayerNorm, then SelfAttention); x: (batch, tokens, dim), the
    block's input before its LayerNorm. Returns q', k' of shape (batch, heads, tokens, nb_features).
    """
    attn = prenorm_attention.fn
    normed = prenorm_attention.norm(x)
    q = attn.split_heads(attn.to_q(normed))  # (b, h, n, d)
    k = attn.split_heads(attn.to_k(normed))
    fast = attn.fast_attention
    if hasattr(fast, "features"):
        return fast.features(q, is_query=True), fast.features(k, is_query=False)
    return (
        softmax_kernel(q, fast.projection_matrix, is_query=True),
        softmax_kernel(k, fast.projection_matrix, is_query=False),
    )


class AttentionRecorder:
    """While active (a context manager), each forward of `model` records per-gene attention received at `layer`.

    After a forward over a batch, `pop()` returns (batch, tokens) float32 scores: sum over query tokens of the
    attention each token receives, averaged over heads. Computed in float32 with autocast off (so the scores do not
    depend on --amp), features one cell at a time (so memory stays at one cell's (heads, tokens, features)).
    """

    def __init__(self, model: nn.Module, layer: int = -1):
        net = model.performer.net
        self.module = attention_layer(model, layer)
        self.layer = layer % len(net.layers)
        self.net = net
        # The blocks below the chosen one, as a block stack of the model's own class sharing its modules: running it
        # gives the chosen block's input by the same code the model runs.
        self.below = type(net)(nn.ModuleList(list(net.layers)[: self.layer]))
        self._recompute = False
        self._handle = None
        self._scores: list[torch.Tensor] = []

    def _scores_of(self, x: torch.Tensor) -> torch.Tensor:
        """(b, n) scores from the chosen block's input x (b, n, dim), in float32 with autocast off."""
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            per_cell = []
            for i in range(x.shape[0]):
                # One cell at a time: keys are stabilised per cell, so this is what the model computed.
                q_feat, k_feat = layer_features(self.module, x[i : i + 1].float())
                per_cell.append(column_sums_from_features(q_feat, k_feat).mean(dim=1))  # (1, n)
        return torch.cat(per_cell).float()

    def _hook(self, net: nn.Module, args: tuple) -> None:
        x = args[0]  # (b, n, dim): the block stack's input (token + gene2vec embeddings)
        self._recompute = torch.is_autocast_enabled(x.device.type)
        if self._recompute:
            with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
                x = self.below(x.float()) if self.layer > 0 else x.float()  # the chosen block's input, float32
            self._scores.append(self._scores_of(x))

    def _observe(self, x: torch.Tensor) -> None:
        if not self._recompute:
            self._scores.append(self._scores_of(x))

    def __enter__(self) -> AttentionRecorder:
        self._handle = self.net.register_forward_pre_hook(self._hook)
        self.net.block_input_observers[self.layer] = self._observe
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.net.block_input_observers.get(self.layer) == self._observe:
            del self.net.block_input_observers[self.layer]

    def pop(self) -> torch.Tensor:
        """Scores of the forward calls since the last pop, concatenated: (cells, tokens)."""
        if not self._scores:
            raise RuntimeError("no forward pass was recorded: run the model inside the `with` block first")
        scores, self._scores = torch.cat(self._scores), []
        return scores


@torch.inference_mode()
def attention_received(model: nn.Module, tokens: torch.Tensor, *, layer: int = -1) -> torch.Tensor:
    """(batch, tokens) int tokens -> (batch, tokens) attention received per token at `layer` (runs the model once)."""
    with AttentionRecorder(model, layer) as recorder:
        model(tokens, return_encodings=True)
    return recorder.pop()


class GroupMeans:
    """Running per-group means of row vectors (e.g. per predicted cell type), memory (groups x columns)."""

    def __init__(self, groups: Sequence[str], n_columns: int):
        self.groups = list(groups)
        self._index = {g: i for i, g in enumerate(self.groups)}
        self.sums = np.zeros((len(self.groups), n_columns), dtype=np.float64)
        self.counts = np.zeros(len(self.groups), dtype=np.int64)

    def add(self, rows: np.ndarray, labels: Sequence[str]) -> None:
        """rows: (cells, columns); labels: each cell's group."""
        index = np.fromiter((self._index[str(label)] for label in labels), dtype=np.int64, count=len(labels))
        rows = np.asarray(rows, dtype=np.float64)
        for group in np.unique(index):
            self.sums[group] += rows[index == group].sum(axis=0)
        self.counts += np.bincount(index, minlength=len(self.groups))

    def means(self) -> np.ndarray:
        """(groups, columns) means; NaN rows for groups no cell fell into."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sums / self.counts[:, None]
