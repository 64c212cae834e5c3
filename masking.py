"""Masked expression-bin modelling, as pure functions (SPEC section 3).

Per cell, the candidates are the non-zero tokens (zeros, and the mask/pad token, are never masked). Exactly
ceil(mask_prob * n_candidates) of them are chosen uniformly without replacement; each chosen one is replaced by the
mask token with probability replace_prob and otherwise left as it is (no random tokens). Labels hold the original
token at chosen positions and the pad id (the cross-entropy's ignore_index) elsewhere.
"""

from __future__ import annotations

import torch

__all__ = ["choose_positions", "mask_tokens", "masked_accuracy", "most_common_bin", "n_to_mask"]


def n_to_mask(n_candidates: torch.Tensor, mask_prob: float) -> torch.Tensor:
    """ceil(mask_prob * n) per cell, as integers; exact at whole products (0.15 * 20 is 3, not 4 by float error)."""
    return torch.ceil(n_candidates.double() * mask_prob - 1e-9).clamp(min=0).long()


def choose_positions(
    tokens: torch.Tensor,
    mask_prob: float = 0.15,
    *,
    ignore_ids: tuple[int, ...] = (0, 6),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(cells, n) tokens -> (cells, n) bool: exactly ceil(mask_prob * candidates) chosen per cell, uniformly.

    Candidates are tokens not in `ignore_ids` (zero and the mask/pad token by default).
    """
    candidates = torch.ones_like(tokens, dtype=torch.bool)
    for token_id in ignore_ids:
        candidates &= tokens != token_id
    k = n_to_mask(candidates.sum(dim=1), mask_prob)  # (cells,)
    # A random score per position, below every candidate's for non-candidates; a position is chosen when its rank
    # among its cell's scores (0 = highest) is below k: a uniform draw of k candidates without replacement.
    scores = torch.rand(tokens.shape, device=tokens.device, generator=generator)
    scores = scores.masked_fill(~candidates, -1.0)
    order = scores.argsort(dim=1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(tokens.shape[1], device=tokens.device).expand_as(order))
    return (ranks < k.unsqueeze(1)) & candidates


def mask_tokens(
    tokens: torch.Tensor,
    *,
    mask_prob: float = 0.15,
    replace_prob: float = 0.9,
    mask_token_id: int = 6,
    pad_token_id: int = 6,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cells, n) int tokens -> (inputs, labels, chosen), all (cells, n).

    inputs: tokens with each chosen position set to `mask_token_id` with probability `replace_prob` (else unchanged).
    labels: the original token at chosen positions, `pad_token_id` elsewhere (the loss's ignore_index).
    chosen: bool, the positions the loss and accuracy are computed on.
    """
    chosen = choose_positions(tokens, mask_prob, ignore_ids=(0, pad_token_id, mask_token_id), generator=generator)
    replace = torch.rand(tokens.shape, device=tokens.device, generator=generator) < replace_prob
    inputs = tokens.masked_fill(chosen & replace, mask_token_id)
    labels = tokens.masked_fill(~chosen, pad_token_id)
    return inputs, labels, chosen


def most_common_bin(tokens: torch.Tensor, bin_num: int = 5) -> torch.Tensor:
    """(cells, n) unmasked tokens -> (cells,) each cell's most frequent non-zero bin in 1..bin_num (ties: the lower
    bin; a cell without non-zero bins gets 1). The trivial baseline the masked-bin accuracy is compared with."""
    counts = torch.stack([(tokens == b).sum(dim=1) for b in range(1, bin_num + 1)], dim=1)  # (cells, bin_num)
    return counts.argmax(dim=1) + 1


def masked_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, chosen: torch.Tensor, bin_num: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, total) over chosen positions, predicting only among bins 1..bin_num as the reference reports it.

    logits: (cells, n, num_tokens); labels and chosen: (cells, n). Returns two 0-dim int64 tensors.
    """
    predicted = logits[..., 1 : bin_num + 1].argmax(dim=-1) + 1
    return ((predicted == labels) & chosen).sum(), chosen.sum()
