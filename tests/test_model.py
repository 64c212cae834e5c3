"""The model reproduces the reference implementation and keeps the published checkpoint layout."""

import json

import numpy as np
import pytest
import torch

from performer_pytorch import ClassificationHead, ModelInputError, PerformerLM, build_model, load_checkpoint
from tests.conftest import LAYOUT


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def small_config(reference):
    cfg = reference["config"]
    return dict(
        num_tokens=cfg["num_tokens"],
        max_seq_len=cfg["max_seq_len"],
        dim=cfg["dim"],
        depth=cfg["depth"],
        heads=cfg["heads"],
    )


@pytest.fixture(scope="module")
def finetuned(reference, tmp_path_factory):
    """The reference's fine-tuned checkpoint, written to disk in its own format and read back by our reader."""
    path = tmp_path_factory.mktemp("ref") / "reference_best.pth"
    torch.save(reference["finetune_checkpoint"], path)
    model = build_model(load_checkpoint(str(path)))
    return model.eval()


@pytest.fixture(scope="module")
def pretrained(reference, reference_lm_state_dict):
    model = PerformerLM(**small_config(reference))
    model.load_state_dict(reference_lm_state_dict, strict=True)
    return model.eval()


@pytest.mark.parametrize("batched", [False, True], ids=["each-cell-alone", "four-cells-in-one-batch"])
def test_finetuned_class_logits_and_encodings_match_reference(reference, finetuned, batched):
    tokens = reference["tokens"]
    with torch.no_grad():
        if batched:
            logits, enc = finetuned(tokens), finetuned(tokens, return_encodings=True)
        else:
            logits = torch.cat([finetuned(tokens[i : i + 1]) for i in range(len(tokens))])
            enc = torch.cat([finetuned(tokens[i : i + 1], return_encodings=True) for i in range(len(tokens))])
    for i in range(len(tokens)):
        assert rel_err(logits[i], reference["expected_class_logits"][i]) < 1e-5
        assert rel_err(enc[i], reference["expected_encodings"][i]) < 1e-5


@pytest.mark.parametrize("batched", [False, True], ids=["each-cell-alone", "four-cells-in-one-batch"])
def test_pretrained_lm_logits_and_encodings_match_reference(reference, pretrained, batched):
    tokens = reference["tokens"]
    with torch.no_grad():
        if batched:
            logits, enc = pretrained(tokens), pretrained(tokens, return_encodings=True)
        else:
            logits = torch.cat([pretrained(tokens[i : i + 1]) for i in range(len(tokens))])
            enc = torch.cat([pretrained(tokens[i : i + 1], return_encodings=True) for i in range(len(tokens))])
    assert logits.shape == (4, 101, 7)
    for i in range(len(tokens)):
        assert rel_err(logits[i], reference["expected_lm_logits"][i]) < 1e-5
        assert rel_err(enc[i], reference["expected_encodings"][i]) < 1e-5


def test_reference_gene2vec_rows_are_float64_and_load(reference, finetuned):
    rows = reference["finetune_checkpoint"]["model_state_dict"]["pos_emb.emb.weight"]
    assert rows.dtype == torch.float64
    assert torch.allclose(finetuned.pos_emb.emb.weight.double(), rows, rtol=1e-6)


def test_a_cell_does_not_depend_on_its_batch_mates(reference, finetuned):
    """The key stabiliser is per cell, so adding a cell with very different tokens changes nothing."""
    tokens = reference["tokens"]
    loud = torch.full_like(tokens[:1], 5)
    with torch.no_grad():
        alone = finetuned(tokens[:1])
        together = finetuned(torch.cat([tokens[:1], loud]))[:1]
    assert torch.allclose(alone, together, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", ["pretrained_lm", "finetuned_11_classes"])
def test_full_size_state_dict_matches_published_layout(variant):
    layout = json.loads(LAYOUT.read_text())[variant]
    genes = 16906
    model = PerformerLM(
        num_tokens=7, max_seq_len=genes + 1, dim=200, depth=6, heads=10, gene2vec=np.zeros((genes, 200), np.float32)
    )
    if variant == "finetuned_11_classes":
        model.to_out = ClassificationHead(seq_len=genes + 1, dim=200, n_classes=11)
    state = model.state_dict()
    assert list(state) == list(layout)
    for key, (shape, dtype) in layout.items():
        assert list(state[key].shape) == shape, key
        expected = torch.float32 if key == "pos_emb.emb.weight" else getattr(torch, dtype)
        assert state[key].dtype == expected, key


def tiny_model(**kwargs):
    defaults = dict(num_tokens=7, max_seq_len=17, dim=16, depth=2, heads=2, dim_head=8)
    defaults.update(kwargs)
    if defaults.get("g2v_position_emb", True) and "gene2vec" not in defaults:
        defaults["gene2vec"] = torch.randn(defaults["max_seq_len"] - 1, defaults["dim"])
    return PerformerLM(**defaults)


def projections(model):
    return [fa.projection_matrix.clone() for fa in model.performer.fast_attentions()]


def test_projection_redraw_every_interval_training_calls_all_layers():
    torch.manual_seed(0)
    model = tiny_model(feature_redraw_interval=3).train()
    for layer in model.performer.net.layers:  # frozen layers are redrawn too
        layer.requires_grad_(False)
    tokens = torch.randint(0, 6, (2, 17))
    start = projections(model)
    for call in range(1, 4):
        model(tokens)
        assert int(model.performer.calls_since_last_redraw) == call
        assert all(torch.equal(a, b) for a, b in zip(start, projections(model), strict=True))
    model(tokens)  # the fourth call finds the counter at the interval: every layer redraws, the counter resets
    assert int(model.performer.calls_since_last_redraw) == 0
    assert all(not torch.equal(a, b) for a, b in zip(start, projections(model), strict=True))


def test_eval_mode_never_redraws_and_is_deterministic():
    model = tiny_model(feature_redraw_interval=1).eval()
    tokens = torch.randint(0, 6, (2, 17))
    with torch.no_grad():
        first = model(tokens)
        for _ in range(3):
            assert torch.equal(model(tokens), first)
    assert int(model.performer.calls_since_last_redraw) == 0


def test_fixed_projections_do_not_redraw_in_training_mode():
    model = tiny_model(feature_redraw_interval=1).train()
    model.fix_projections()
    start = projections(model)
    for _ in range(3):
        model(torch.randint(0, 6, (1, 17)))
    assert all(torch.equal(a, b) for a, b in zip(start, projections(model), strict=True))


def test_without_gene2vec_there_is_no_positional_term():
    """With g2v_position_emb=False the model is permutation-equivariant: it cannot tell genes apart by position."""
    torch.manual_seed(0)
    model = tiny_model(g2v_position_emb=False).eval()
    assert not any(k.startswith("pos_emb") for k in model.state_dict())
    tokens = torch.randint(0, 6, (1, 17))
    perm = torch.randperm(17)
    with torch.no_grad():
        enc = model(tokens, return_encodings=True)
        enc_perm = model(tokens[:, perm], return_encodings=True)
    assert torch.allclose(enc[:, perm], enc_perm, atol=1e-5)
    with_g2v = tiny_model().eval()
    with torch.no_grad():
        enc = with_g2v(tokens, return_encodings=True)
        enc_perm = with_g2v(tokens[:, perm], return_encodings=True)
    assert not torch.allclose(enc[:, perm], enc_perm, atol=1e-3)


def test_gene2vec_on_without_a_table_is_refused_with_the_fix():
    model = PerformerLM(num_tokens=7, max_seq_len=17, dim=16, depth=1, heads=2, dim_head=8)
    # In the package's own terms; the scripts check first and name --gene2vec_path (tests/test_training.py).
    with pytest.raises(ModelInputError, match="no table was given: pass gene2vec"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gene2vec_from_npy_path_and_wrong_shape(tmp_path):
    table = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
    np.save(tmp_path / "g2v.npy", table)
    model = tiny_model(gene2vec=str(tmp_path / "g2v.npy"))
    weight = model.pos_emb.emb.weight
    assert torch.allclose(weight[:16], torch.from_numpy(table)) and torch.all(weight[16] == 0)
    np.save(tmp_path / "bad.npy", table[:10])
    with pytest.raises(ModelInputError, match=r"shape \(10, 16\).*needs \(16, 16\)"):
        tiny_model(gene2vec=str(tmp_path / "bad.npy"))


def test_unsupported_published_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match="local_attn_heads"):
        tiny_model(local_attn_heads=1)
    with pytest.raises(ValueError, match="causal"):
        tiny_model(causal=True)


def test_generalized_attention_runs_and_differs_from_softmax_kernel():
    torch.manual_seed(0)
    soft = tiny_model().eval()
    gen = tiny_model(generalized_attention=True).eval()
    gen.load_state_dict(soft.state_dict())
    tokens = torch.randint(0, 6, (2, 17))
    with torch.no_grad():
        a, b = soft(tokens), gen(tokens)
    assert torch.isfinite(b).all() and not torch.allclose(a, b)


def test_classification_head_equals_the_reference_convolution():
    """The head computes its 1 x dim convolution as a linear map; it must equal Conv2d on (b, 1, n, dim)."""
    torch.manual_seed(0)
    head = ClassificationHead(seq_len=17, dim=16, n_classes=3)
    x = torch.randn(2, 17, 16)
    conv = torch.relu(head.conv1(x.unsqueeze(1))).flatten(1)
    assert torch.allclose(head.gene_scores(x), conv, atol=1e-6)
