"""Per-gene attention received, computed in linear memory, equals the column sums of the dense attention matrix."""

import numpy as np
import pytest
import torch

from performer_pytorch import ModelInputError, PerformerLM, softmax_kernel
from performer_pytorch.interpret import AttentionRecorder, GroupMeans, attention_received


def tiny_model(**kwargs):
    torch.manual_seed(0)
    config = dict(num_tokens=7, max_seq_len=33, dim=16, depth=3, heads=2, dim_head=8, nb_features=12)
    config.update(kwargs)
    return PerformerLM(**config, gene2vec=torch.randn(32, 16)).eval()


def dense_attention(model, tokens, layer):
    """The (batch, heads, n, n) matrix A = D^-1 q' k'^T built explicitly from the block's input.

    The block input is computed here by the published definition (x + attn(x), x + ff(x) per block), not by the
    model's block stack, so the check does not share code with the recorder.
    """
    layers = model.performer.net.layers
    block = layers[layer][0]
    with torch.no_grad():
        x = model.embed(tokens)
        for attn_block, ff_block in list(layers)[: layer % len(layers)]:
            x = x + attn_block(x)
            x = x + ff_block(x)
    attn = block.fn
    normed = block.norm(x)
    b, n, _ = normed.shape

    def heads(t):  # (b, n, h * d) -> (b, h, n, d)
        return t.view(b, n, attn.heads, attn.dim_head).transpose(1, 2)

    q, k, v = heads(attn.to_q(normed)), heads(attn.to_k(normed)), heads(attn.to_v(normed))
    projection = attn.fast_attention.projection_matrix
    q_feat = softmax_kernel(q, projection, is_query=True)
    k_feat = softmax_kernel(k, projection, is_query=False)
    scores = q_feat @ k_feat.transpose(-1, -2)  # (b, h, n, n): what linear attention never builds
    dense = scores / scores.sum(dim=-1, keepdim=True)
    with torch.no_grad():
        model_output = attn.fast_attention(q, k, v)
    return dense, dense @ v, model_output


@pytest.mark.parametrize("layer", [-1, 0, 1])
def test_linear_memory_scores_equal_dense_column_sums(layer):
    model = tiny_model()
    tokens = torch.randint(0, 6, (3, 33))
    dense, dense_out, model_out = dense_attention(model, tokens, layer)
    # The dense matrix is the attention the model applies: A v equals the layer's linear-attention output.
    assert torch.allclose(dense_out, model_out, rtol=1e-4, atol=1e-5)
    expected = dense.sum(dim=-2).mean(dim=1)  # (b, n): attention received per token, averaged over heads
    got = attention_received(model, tokens, layer=layer)
    assert got.shape == (3, 33)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    # Each row of A sums to one, so a cell's scores sum to its number of tokens.
    assert torch.allclose(got.sum(dim=1), torch.full((3,), 33.0), rtol=1e-4)


def test_layers_differ_and_recording_stops_after_the_block():
    model = tiny_model()
    tokens = torch.randint(0, 6, (2, 33))
    last, first = attention_received(model, tokens, layer=-1), attention_received(model, tokens, layer=0)
    assert not torch.allclose(last, first)
    recorder = AttentionRecorder(model, -1)
    with recorder, torch.no_grad():
        model(tokens[:1])
        model(tokens[1:])
    assert torch.allclose(recorder.pop(), last, atol=1e-6)
    with torch.no_grad():
        model(tokens)  # outside the block: nothing recorded
    with pytest.raises(RuntimeError, match="no forward pass"):
        recorder.pop()


def test_scores_do_not_depend_on_batch_mates_or_autocast():
    model = tiny_model()
    tokens = torch.randint(0, 6, (2, 33))
    alone = attention_received(model, tokens[:1])
    together = attention_received(model, tokens)[:1]
    assert torch.allclose(alone, together, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attention_received(model, tokens[:1])
    # Under autocast the chosen block's input is recomputed in float32: the same scores.
    assert low.dtype == torch.float32 and torch.allclose(low, alone, atol=1e-6)


def test_float32_recording_runs_each_block_once(monkeypatch):
    """The chosen block's input is taken from the model's own forward: recording the last layer adds no blocks."""
    import performer_pytorch.fast_route as route_module

    calls = []
    real = route_module.blocks_forward_no_grad

    def spy(x, weights, *args):
        calls.extend([1] * len(weights))
        return real(x, weights, *args)

    monkeypatch.setattr(route_module, "blocks_forward_no_grad", spy)
    model = tiny_model()
    tokens = torch.randint(0, 6, (2, 33))
    attention_received(model, tokens, layer=-1)
    assert len(calls) == 3, "depth 3: three blocks, none run again for the recorder"
    assert model.performer.net.block_input_observers == {}, "the observer is removed with the recorder"
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attention_received(model, tokens, layer=-1)
    assert len(calls) == 3 + 2, "under autocast the two blocks below are rerun in float32"


def test_missing_layer_is_refused_with_the_range():
    with pytest.raises(ModelInputError, match="from -3 to 2"):
        attention_received(tiny_model(), torch.zeros(1, 33, dtype=torch.long), layer=3)


def test_group_means():
    means = GroupMeans(["a", "b", "c"], 2)
    means.add(np.array([[1.0, 2.0], [3.0, 4.0]]), ["a", "b"])
    means.add(np.array([[3.0, 6.0]]), ["a"])
    out = means.means()
    assert np.allclose(out[:2], [[2.0, 4.0], [3.0, 4.0]]) and np.isnan(out[2]).all()
    assert means.counts.tolist() == [2, 1, 0]
