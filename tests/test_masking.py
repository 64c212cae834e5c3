"""Masking for pretraining (SPEC section 3), checked on hand-made token rows."""

import math

import torch

from masking import choose_positions, mask_tokens, masked_accuracy, most_common_bin, n_to_mask

PAD = MASK = 6


def _row(*tokens):
    return torch.tensor([list(tokens)], dtype=torch.long)


def test_only_nonzero_tokens_are_chosen_and_exactly_ceil_of_them():
    # 7 non-zero genes among zeros, then the appended 0 token: ceil(0.15 * 7) = 2 chosen.
    tokens = _row(0, 3, 0, 1, 5, 0, 2, 2, 0, 4, 1, 0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        chosen = choose_positions(tokens, 0.15, generator=generator)
        assert int(chosen.sum()) == 2
        assert bool((tokens[chosen] != 0).all())
        assert not bool(chosen[0, -1])  # the appended token is always 0, never a candidate


def test_count_is_exact_ceil_including_whole_products():
    generator = torch.Generator().manual_seed(1)
    for n in [0, 1, 6, 7, 20, 40, 100, 133]:
        tokens = torch.zeros(1, 150, dtype=torch.long)
        tokens[0, :n] = 1 + torch.arange(n) % 5
        chosen = choose_positions(tokens, 0.15, generator=generator)
        expected = {0: 0, 20: 3, 40: 6, 100: 15}.get(n, math.ceil(0.15 * n))
        assert int(chosen.sum()) == expected, n
    assert n_to_mask(torch.tensor([20, 60, 7]), 0.15).tolist() == [3, 9, 2]


def test_pad_and_mask_tokens_are_never_candidates():
    tokens = _row(6, 6, 6, 1, 6, 0)
    inputs, labels, chosen = mask_tokens(tokens, mask_prob=1.0, replace_prob=1.0)
    assert chosen.tolist() == [[False, False, False, True, False, False]]
    assert inputs.tolist() == [[6, 6, 6, MASK, 6, 0]]


def test_every_candidate_is_equally_likely():
    tokens = _row(*([1, 2, 3, 4, 5] * 4), 0)  # 20 candidates, 3 chosen each time
    generator = torch.Generator().manual_seed(2)
    counts = torch.zeros(21)
    for _ in range(2000):
        counts += choose_positions(tokens, 0.15, generator=generator)[0].float()
    frequency = counts[:20] / 2000
    assert counts[20] == 0
    assert torch.allclose(frequency, torch.full((20,), 3 / 20), atol=0.035)


def test_ninety_percent_replaced_ten_percent_unchanged_labels_and_ignore_index():
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 6, (400, 101), generator=generator)
    tokens[:, -1] = 0
    inputs, labels, chosen = mask_tokens(tokens, mask_prob=0.15, replace_prob=0.9, generator=generator)
    n_candidates = (tokens != 0).sum(dim=1)
    assert chosen.sum(dim=1).tolist() == [math.ceil(0.15 * int(n) - 1e-9) for n in n_candidates]
    replaced = (inputs == MASK) & chosen
    fraction = replaced.sum() / chosen.sum()
    assert 0.87 < float(fraction) < 0.93
    # Chosen but not replaced: left as they are, never a random token.
    kept = chosen & ~replaced
    assert torch.equal(inputs[kept], tokens[kept])
    assert torch.equal(inputs[~chosen], tokens[~chosen])
    # Labels: the original token where chosen, the ignore index elsewhere.
    assert torch.equal(labels[chosen], tokens[chosen])
    assert bool((labels[~chosen] == PAD).all())
    loss = torch.nn.functional.cross_entropy(torch.zeros(400, 7, 101), labels, ignore_index=PAD)
    assert math.isclose(float(loss), math.log(7), rel_tol=1e-6)


def test_most_common_bin_and_restricted_accuracy():
    tokens = torch.tensor([[0, 2, 2, 3, 0], [4, 1, 4, 1, 0], [0, 0, 0, 0, 0]])
    assert most_common_bin(tokens).tolist() == [2, 1, 1]  # ties go to the lower bin
    labels = torch.tensor([[6, 2, 6, 3, 6], [4, 6, 6, 6, 6], [6, 6, 6, 6, 6]])
    chosen = labels != 6
    logits = torch.zeros(3, 5, 7)
    logits[..., 0] = 10.0  # bin 0 and the mask token are never predicted
    logits[..., 6] = 10.0
    logits[0, 1, 2] = 1.0  # right
    logits[0, 3, 5] = 1.0  # wrong
    logits[1, 0, 4] = 1.0  # right
    correct, total = masked_accuracy(logits, labels, chosen)
    assert (int(correct), int(total)) == (2, 3)
