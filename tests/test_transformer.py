"""The scGPT-style transformer: tokens, masking, the padding mask, checkpoints, and learning on real PBMC counts."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from transformer_model import (
    CLS_VALUE,
    MASK_RATIOS,
    MASK_VALUE,
    PAD_VALUE,
    GeneVocab,
    TransformerModel,
    baseline_mses,
    constant_mse,
    load_transformer,
    mask_values,
    pretraining_losses,
    save_transformer,
)
from utils import ScbertError

TINY = dict(dim=32, depth=2, heads=4, ff_dim=32)


def tiny_model(vocab: GeneVocab, dropout: float = 0.0, seed: int = 0) -> TransformerModel:
    torch.manual_seed(seed)
    return TransformerModel(vocab=vocab, dropout=dropout, **TINY)


def random_bins(cells: int, genes: int, density: float, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = np.where(rng.random((cells, genes)) < density, rng.integers(1, 51, (cells, genes)), 0)
    dense[:, 0] = np.maximum(dense[:, 0], 1)  # no empty cell
    return sp.csr_matrix(dense.astype(np.int8))


def test_vocab_layout_and_round_trip():
    vocab = GeneVocab(["A", "B", "C"])
    assert vocab.to_list() == ["A", "B", "C", "<pad>", "<cls>"]
    assert (vocab.pad_id, vocab.cls_id, vocab.gene_num, len(vocab)) == (3, 4, 3, 5)
    assert GeneVocab.from_list(vocab.to_list()) == vocab
    with pytest.raises(ScbertError, match="does not end in"):
        GeneVocab.from_list(["A", "B", "<cls>", "<pad>"])
    with pytest.raises(ScbertError, match="appears twice"):
        GeneVocab(["A", "B", "A"])


def test_tokens_cls_first_non_zero_genes_in_order_padded():
    vocab = GeneVocab([f"g{i}" for i in range(6)])
    bins = sp.csr_matrix(np.array([[0, 3, 0, 7, 1, 0], [5, 0, 0, 0, 0, 0]], dtype=np.int8))
    batch = vocab.tokenize_cells(bins)
    assert batch["genes"].tolist() == [[7, 1, 3, 4], [7, 0, 6, 6]]
    assert batch["values"].tolist() == [[CLS_VALUE, 3, 7, 1], [CLS_VALUE, 5, PAD_VALUE, PAD_VALUE]]


def test_max_seq_len_subsamples_and_keeps_cls():
    vocab = GeneVocab([f"g{i}" for i in range(50)])
    bins = random_bins(8, 50, 0.9)
    full = vocab.tokenize_cells(bins)
    capped = vocab.tokenize_cells(bins, max_seq_len=11, generator=torch.Generator().manual_seed(0))
    assert capped["genes"].shape == (8, 11)
    assert (capped["genes"][:, 0] == vocab.cls_id).all() and (capped["values"][:, 0] == CLS_VALUE).all()
    for i in range(8):
        genes = capped["genes"][i, 1:]
        assert (genes[1:] > genes[:-1]).all()  # a subset, still in gene order
        assert set(genes.tolist()) <= set(full["genes"][i, 1:].tolist())
        expected = torch.as_tensor(bins[i].toarray()[0][genes.numpy()], dtype=torch.float32)
        assert (capped["values"][i, 1:] == expected).all()


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.75, 0.15, 1.0, MASK_RATIOS])
def test_masking_exact_count_never_cls_or_pads(ratio):
    vocab = GeneVocab([f"g{i}" for i in range(40)])
    rng = np.random.default_rng(1)
    dense = np.zeros((30, 40), dtype=np.int8)
    for i in range(30):  # 1..40 genes per cell: plenty of padding
        dense[i, rng.choice(40, i + 1 if i < 29 else 40, replace=False)] = rng.integers(1, 51, i + 1 if i < 29 else 40)
    batch = vocab.tokenize_cells(sp.csr_matrix(dense))
    masked, chosen, used = mask_values(batch, ratio, pad_id=vocab.pad_id, generator=torch.Generator().manual_seed(2))
    if isinstance(ratio, tuple):
        assert used in MASK_RATIOS
    n_genes = (batch["genes"] != vocab.pad_id).sum(dim=1) - 1
    assert chosen.sum(dim=1).tolist() == [int(np.floor(used * g + 1e-9)) for g in n_genes.tolist()]
    assert not chosen[:, 0].any()
    assert not (chosen & (batch["genes"] == vocab.pad_id)).any()
    assert (masked[chosen] == MASK_VALUE).all()
    assert (masked[~chosen] == batch["values"][~chosen]).all()


def test_masks_are_redrawn():
    vocab = GeneVocab([f"g{i}" for i in range(40)])
    batch = vocab.tokenize_cells(random_bins(4, 40, 0.5))
    gen = torch.Generator().manual_seed(0)
    first = mask_values(batch, 0.5, pad_id=vocab.pad_id, generator=gen)[1]
    second = mask_values(batch, 0.5, pad_id=vocab.pad_id, generator=gen)[1]
    assert (first.sum(1) == second.sum(1)).all() and (first != second).any()


def test_cell_output_independent_of_padding():
    vocab = GeneVocab([f"g{i}" for i in range(60)])
    dense = random_bins(5, 60, 0.5, seed=3).toarray()
    dense[0, 10:] = 0  # a short cell among long ones
    bins = sp.csr_matrix(dense)
    model = tiny_model(vocab).eval()
    with torch.no_grad():
        alone = vocab.tokenize_cells(bins[:1])
        together = vocab.tokenize_cells(bins)
        length = alone["genes"].shape[1]
        assert together["genes"].shape[1] > 3 * length
        a, b = model(alone), model(together)
        for key in ("expr", "mvc"):
            torch.testing.assert_close(a[key][0], b[key][0, :length], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a["cell"][0], b["cell"][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode(alone)[0], model.encode(together)[0, :length], rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip(tmp_path):
    vocab = GeneVocab([f"g{i}" for i in range(30)])
    model = tiny_model(vocab).attach_head(4).eval()
    batch = vocab.tokenize_cells(random_bins(6, 30, 0.4))
    path = str(tmp_path / "t.pth")
    save_transformer(path, model, vocab, epoch=3)
    loaded, vocab2, payload = load_transformer(path)
    loaded.eval()
    assert vocab2 == vocab and payload["epoch"] == 3 and payload["model_type"] == "transformer"
    with torch.no_grad():
        torch.testing.assert_close(loaded.classify(batch), model.classify(batch), rtol=0, atol=0)
        logits, hidden = loaded.classify(batch, return_hidden=True)
    assert logits.shape == (6, 4) and hidden.shape == (6, TINY["dim"])
    trunk, _, _ = load_transformer(path, head="none")
    assert trunk.head is None and isinstance(trunk(batch), dict)
    torch.save({"model_state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ScbertError, match="does not hold a transformer"):
        load_transformer(str(tmp_path / "other.pth"))


def test_tiny_model_beats_cell_mean_baseline_on_pbmc():
    """Real PBMC counts, the recipe's preprocessing, a tiny model for ~10 epochs: validation MSE well below the
    per-cell mean bin (and the constant mean, about 208 for bins spread evenly over 1..50)."""
    from preprocess import load_pbmc68k_counts
    from scgpt_preprocess import preprocess_scgpt

    counts = load_pbmc68k_counts()
    counts.obs["donor_id"] = np.random.default_rng(0).choice(list("abcd"), counts.n_obs)
    data = preprocess_scgpt(counts, n_hvg=200, hvg_batch_key="donor_id", n_bins=51)
    vocab = GeneVocab(data.var_names)
    rng = np.random.default_rng(0)
    order = rng.permutation(data.n_obs)
    valid, train = order[:100], order[100:]
    model = tiny_model(vocab)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        perm = rng.permutation(train)
        for start in range(0, len(perm), 32):
            batch = vocab.tokenize_cells(data.X[perm[start : start + 32]])
            masked, chosen, _ = mask_values(batch, 0.5, pad_id=vocab.pad_id, generator=gen)
            loss = pretraining_losses(model, batch, masked, chosen)["loss"]
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    model.eval()
    batch = vocab.tokenize_cells(data.X[valid])
    masked, chosen, _ = mask_values(batch, 0.5, pad_id=vocab.pad_id, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mse = float(pretraining_losses(model, batch, masked, chosen)["expr"])
    base = {k: float(v) for k, v in baseline_mses(batch, chosen, vocab.pad_id).items()}
    cell_mean = base["cell_mean_sse"] / base["n"]
    assert 180 < constant_mse(base) < 240 and cell_mean > 180
    assert mse < 0.8 * cell_mean, (mse, cell_mean)
