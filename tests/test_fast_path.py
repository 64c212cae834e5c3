"""The fast path (chunked, no-autograd blocks, custom autograd attention) computes what the plain path computes."""

import math

import pytest
import torch
import torch.nn.functional as F

import performer_pytorch.fast_route as route_module
import performer_pytorch.performer_pytorch as model_module
from performer_pytorch import (
    ClassificationHead,
    PerformerLM,
    build_model,
    fast_attention,
    load_checkpoint,
    plain_attention,
)
from performer_pytorch.fast_attention import FREE_ABOVE, favor_self_attention, feature_max, head_groups
from performer_pytorch.fast_feedforward import FeedForwardFunction
from performer_pytorch.performer_pytorch import gaussian_orthogonal_random_matrix, linear_attention, softmax_kernel


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def small_model(**kwargs) -> PerformerLM:
    config = dict(num_tokens=7, max_seq_len=61, dim=24, depth=3, heads=2, dim_head=8, nb_features=13)
    config.update(kwargs)
    torch.manual_seed(0)
    return PerformerLM(**config, gene2vec=torch.randn(config["max_seq_len"] - 1, config["dim"]))


def different_cells(n: int) -> torch.Tensor:
    """Three cells whose key stabilisers differ a lot: random bins, all top bins, mostly zeros."""
    torch.manual_seed(1)
    tokens = torch.randint(0, 6, (3, n))
    tokens[1] = 5
    tokens[2] = 0
    tokens[2, ::7] = 3
    return tokens


@pytest.mark.parametrize("chunk", [7, 16, 1000], ids=["chunk-7", "chunk-16", "one-chunk"])
def test_no_grad_fast_path_equals_plain_path(chunk):
    model = small_model().eval()
    model.set_chunk_size(chunk)
    tokens = different_cells(61)
    with torch.no_grad():
        fast = model(tokens)
        fast_encodings = model(tokens, return_encodings=True)
        with plain_attention():
            plain = torch.cat([model(tokens[i : i + 1]) for i in range(3)])  # one cell at a time
            plain_encodings = model(tokens, return_encodings=True)
    assert rel_err(fast, plain) < 1e-5
    assert rel_err(fast_encodings, plain_encodings) < 1e-5


def test_no_grad_path_leaves_the_callers_tensor_alone():
    model = small_model().eval()
    x = torch.randn(2, 61, 24)
    before = x.clone()
    with torch.no_grad():
        out = model.performer(x)
    assert torch.equal(x, before) and not torch.equal(out, x)


def plain_attention_layer(x, w_qkv, w_out, b_out, projection, heads):
    """The plain path's self-attention (batch, n, dim) -> (batch, n, dim), as SelfAttention computes it."""
    b, n, _ = x.shape
    q, k, v = (F.linear(x, w).view(b, n, heads, -1).transpose(1, 2) for w in w_qkv.chunk(3))
    out = linear_attention(
        softmax_kernel(q, projection, is_query=True), softmax_kernel(k, projection, is_query=False), v
    )
    return F.linear(out.transpose(1, 2).reshape(b, n, -1), w_out, b_out)


def layer_inputs(dtype, b=2, n=11, dim=6, heads=2, dim_head=4, nb_features=7):
    """x, W_qkv, W_out, b_out (all requiring grad) and a projection."""
    torch.manual_seed(2)
    inner = heads * dim_head
    x = torch.randn(b, n, dim, dtype=dtype, requires_grad=True)
    w_qkv = (torch.randn(3 * inner, dim, dtype=dtype) * dim**-0.5).requires_grad_()
    w_out = (torch.randn(dim, inner, dtype=dtype) * inner**-0.5).requires_grad_()
    b_out = torch.randn(dim, dtype=dtype, requires_grad=True)
    projection = gaussian_orthogonal_random_matrix(nb_features, dim_head).to(dtype)
    return x, w_qkv, w_out, b_out, projection


def test_attention_function_gradcheck_float64():
    x, w_qkv, w_out, b_out, projection = layer_inputs(torch.float64, n=7)
    assert torch.autograd.gradcheck(
        lambda *t: favor_self_attention(t[0], t[1], None, t[2], t[3], projection, 2, 3),
        (x, w_qkv, w_out, b_out),
        eps=1e-6,
        atol=1e-7,
        fast_mode=True,
    )


def assert_same_output_and_gradients(x, w_qkv, w_out, b_out, projection, chunk, tolerance):
    fast = favor_self_attention(x, w_qkv, None, w_out, b_out, projection, 2, chunk)
    plain = plain_attention_layer(x, w_qkv, w_out, b_out, projection, 2)
    assert rel_err(fast, plain) < tolerance
    weights = torch.randn_like(plain)
    inputs = (x, w_qkv, w_out, b_out)
    fast_grads = torch.autograd.grad((fast * weights).sum(), inputs)
    plain_grads = torch.autograd.grad((plain * weights).sum(), inputs)
    for fast_grad, plain_grad in zip(fast_grads, plain_grads, strict=True):
        assert rel_err(fast_grad, plain_grad) < tolerance


@pytest.mark.parametrize("chunk", [3, 11])
def test_attention_function_equals_plain_autograd_float64(chunk):
    assert_same_output_and_gradients(*layer_inputs(torch.float64), chunk, 1e-10)


def test_stabiliser_ties_share_the_gradient_like_autograd():
    """Exact ties at the stabilisers' max: two identical, dominant rows of the projection, so that for every token
    (query stabiliser) and every cell (key stabiliser) the max is reached twice. Autograd's amax shares the gradient
    equally between ties; so must the custom backward."""
    *inputs, projection = layer_inputs(torch.float64)
    projection[0] *= 3.0
    projection[1] = projection[0]
    assert_same_output_and_gradients(*inputs, projection, 4, 1e-10)


def largest_feature_log2(x, w_k, projection, heads=2) -> float:
    """max over tokens, heads and features of s = P k d^-1/4, in log2 units."""
    k = F.linear(x, w_k).unflatten(-1, (heads, -1))
    return (k @ projection.t() * k.shape[-1] ** -0.25 / math.log(2.0)).max().item()


def assert_float32_finite_and_close(x, w_qkv, w_out, b_out, projection, chunk):
    """The same float64 inputs in float32: finite (no overflow on the unstabilised route) and within 1e-5."""
    with torch.no_grad():
        expected = plain_attention_layer(x, w_qkv, w_out, b_out, projection, 2)
        inputs32 = [t.float() for t in (x, w_qkv, w_out, b_out, projection)]
        fast32 = favor_self_attention(inputs32[0], inputs32[1], None, *inputs32[2:], 2, chunk)
    assert torch.isfinite(fast32).all() and rel_err(fast32.double(), expected) < 1e-5


@pytest.mark.parametrize("loud", ["first-chunk", "later-chunk"])
def test_features_far_out_of_range_take_the_stabilised_route(loud):
    """The forward skips subtracting the stabilisers while s stays in a safe range (fast_attention.FREE_ABOVE). A
    chunk of large tokens, first or after small ones (the key reference then moves), puts s far outside it: float32
    would overflow to inf on the wrong route. Outputs (float32, float64) and gradients (float64) equal the plain path.
    """
    x, w_qkv, w_out, b_out, projection = layer_inputs(torch.float64, n=12)
    with torch.no_grad():
        x[:, slice(0, 3) if loud == "first-chunk" else slice(6, 9)] *= 60.0
    assert largest_feature_log2(x, w_qkv.chunk(3)[1], projection) > max(2 * FREE_ABOVE, 128)  # 2^128: float32 inf
    assert_same_output_and_gradients(x, w_qkv, w_out, b_out, projection, 3, 1e-10)
    assert_float32_finite_and_close(x, w_qkv, w_out, b_out, projection, 3)


@pytest.mark.parametrize("loud_head", [0, 1])
def test_head_groups_one_head_at_a_time_give_the_plain_paths_numbers(monkeypatch, loud_head):
    """On a CPU the forward goes through the heads of a chunk in groups (fast_attention.head_groups; at the test sizes
    all heads make one group). One head per group: the same outputs, also when one head's features are far out of
    range and the other's are not, so that the groups of a chunk take different routes, and (loud head 1) the key
    sums' reference moves between two groups of the same chunk."""
    monkeypatch.setattr(fast_attention, "CPU_GROUP_BYTES", 1)
    assert head_groups(2, 100, torch.device("cpu")) == [slice(0, 1), slice(1, 2)]
    model = small_model().eval()
    model.set_chunk_size(16)
    tokens = different_cells(61)
    with torch.no_grad():
        fast = model(tokens)
        with plain_attention():
            plain = model(tokens)
    assert rel_err(fast, plain) < 1e-5

    x, w_qkv, w_out, b_out, projection = layer_inputs(torch.float64, n=12)
    rows = [slice(4 * head, 4 * head + 4) for head in (loud_head, 1 - loud_head)]
    with torch.no_grad():
        w_qkv[rows[0]] *= 40.0  # the loud head's queries
        w_qkv[8:16][rows[0]] *= 40.0  # and keys
    loud, quiet = (largest_feature_log2(x, w_qkv[8:16][r], projection, heads=1) for r in rows)
    assert loud > max(2 * FREE_ABOVE, 128) and quiet < FREE_ABOVE
    assert_same_output_and_gradients(x, w_qkv, w_out, b_out, projection, 5, 1e-10)
    assert_float32_finite_and_close(x, w_qkv, w_out, b_out, projection, 5)


def test_float16_features_stay_stabilised():
    """float16 overflows above 2^16, so its features are always stabilised first: s up to 2^20 here."""
    x, w_qkv, w_out, b_out, projection = layer_inputs(torch.float64, n=12)
    with torch.no_grad():
        x *= 5.0
        assert largest_feature_log2(x, w_qkv.chunk(3)[1], projection) > 20
        expected = plain_attention_layer(x, w_qkv, w_out, b_out, projection, 2)
        half = [t.half() for t in (x, w_qkv, w_out, b_out, projection)]
        fast16 = favor_self_attention(half[0], half[1], None, *half[2:], 2, 5)
    # Unstabilised, 2^s overflows to inf here. float16 itself is coarse at these sizes: the plain path run in float16
    # is off by 17% (measured), the fast path by 2.4%.
    assert torch.isfinite(fast16).all() and rel_err(fast16.double(), expected) < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_feature_max_equals_amax(dtype):
    """The integer-bits max for half precision: mixed signs, all-negative rows, signed zeros, infinities."""
    torch.manual_seed(5)
    s = (torch.randn(3, 40, 9) * 50).to(dtype)
    s[0, :, 0] = -s[0, :, 0].abs() - 1  # a token whose features are all negative
    s[1, :, 1] = -0.0
    s[1, 3, 1] = 0.0
    s[2, :, 2] = -0.0
    s[2, 7, 3] = float("inf")
    s[0, 5, 4] = -float("inf")
    assert torch.equal(feature_max(s, dim=1), s.amax(dim=1, keepdim=True))
    assert torch.equal(feature_max(s), s.max())
    assert torch.equal(feature_max(-s.abs() - 1), (-s.abs() - 1).max())


def test_feed_forward_function_gradcheck_float64():
    """The chunked feed-forward sublayer x + W2 GELU(W1 LN(x) + b1) + b2 against autograd, all inputs."""
    torch.manual_seed(4)
    shapes = ((2, 9, 6), (6,), (6,), (12, 6), (12,), (6, 12), (6,))  # x, LayerNorm weight and bias, W1, b1, W2, b2
    inputs = tuple(torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in shapes)

    def fast(x, ln_w, ln_b, w1, b1, w2, b2):
        return FeedForwardFunction.apply(x, ln_w, ln_b, w1, b1, w2, b2, 1e-5, 4)

    def plain(x, ln_w, ln_b, w1, b1, w2, b2):
        return x + F.linear(F.gelu(F.linear(F.layer_norm(x, (6,), ln_w, ln_b, 1e-5), w1, b1)), w2, b2)

    assert torch.autograd.gradcheck(fast, inputs, eps=1e-6, atol=1e-7, fast_mode=True)
    weights = torch.randn(2, 9, 6, dtype=torch.float64)
    fast_grads = torch.autograd.grad((fast(*inputs) * weights).sum(), inputs)
    plain_grads = torch.autograd.grad((plain(*inputs) * weights).sum(), inputs)
    for fast_grad, plain_grad in zip(fast_grads, plain_grads, strict=True):
        assert rel_err(fast_grad, plain_grad) < 1e-10


def trainable_grads(model, tokens, weights):
    model.zero_grad(set_to_none=True)
    (model(tokens) * weights).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_training_step_gradients_equal_plain_path_float32():
    model = small_model().train()
    model.fix_projections()
    model.set_chunk_size(16)
    tokens = different_cells(61)
    with plain_attention():
        plain_out = model(tokens)
    weights = torch.randn_like(plain_out)
    fast = trainable_grads(model, tokens, weights)
    with plain_attention():
        plain = trainable_grads(model, tokens, weights)
    assert rel_err(model(tokens), plain_out) < 1e-5
    assert set(fast) == set(plain) and len(fast) == sum(p.requires_grad for p in model.parameters())
    for name in plain:
        assert rel_err(fast[name], plain[name]) < 1e-4, name


def test_frozen_blocks_run_without_autograd_when_fine_tuning(monkeypatch):
    """As finetune.py freezes: all but the last LayerNorm, the second-to-last block and the head."""
    model = small_model(depth=4, lm_head=False)
    model.to_out = ClassificationHead(seq_len=61, dim=24, n_classes=3, h_dim=8, hidden=16)
    model.train()
    model.fix_projections()
    model.set_chunk_size(16)
    model.requires_grad_(False)
    for module in (model.norm, model.performer.net.layers[-2], model.to_out):
        module.requires_grad_(True)
    calls = []
    real = route_module.blocks_forward_no_grad

    def spy(x, weights, *args):
        calls.extend([torch.is_grad_enabled()] * len(weights))
        return real(x, weights, *args)

    monkeypatch.setattr(route_module, "blocks_forward_no_grad", spy)
    tokens = different_cells(61)
    torch.manual_seed(3)
    weights = torch.randn(3, 3)
    fast = trainable_grads(model, tokens, weights)
    assert calls == [False, False], "blocks 0 and 1 take the no-grad route, blocks 2 and 3 need autograd"
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(fast) == expected
    assert all(name.startswith(("norm.", "to_out.", "performer.net.layers.2.")) for name in fast)
    calls.clear()
    with plain_attention():
        plain = trainable_grads(model, tokens, weights)
    assert calls == []
    for name in plain:
        assert rel_err(fast[name], plain[name]) < 1e-4, name


def test_default_chunks_hold_the_same_bytes_in_bf16(monkeypatch):
    """CPU chunks: 1,024 float32 tokens, 2,048 bfloat16 ones (autocast), on the no-grad and the autograd routes."""
    chunks = []
    real_block = route_module.blocks_forward_no_grad
    real_attention = model_module.favor_self_attention

    def block_spy(x, weights, chunk_size, *args):
        chunks.append(("no-grad", chunk_size))
        return real_block(x, weights, chunk_size, *args)

    def attention_spy(*args):
        chunks.append(("autograd", args[-1]))
        return real_attention(*args)

    monkeypatch.setattr(route_module, "blocks_forward_no_grad", block_spy)
    monkeypatch.setattr(model_module, "favor_self_attention", attention_spy)
    model = small_model(depth=1)
    tokens = different_cells(61)
    with torch.no_grad():
        model.eval()(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(tokens)
    model.train()(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens)
    assert chunks == [("no-grad", 1024), ("no-grad", 2048), ("autograd", 1024), ("autograd", 2048)]


def test_plain_attention_switch_restores_the_fast_path(monkeypatch):
    calls = []
    monkeypatch.setattr(route_module, "blocks_forward_no_grad", lambda x, *a: calls.append(1) or x)
    model = small_model(depth=1).eval()
    with torch.no_grad():
        with plain_attention():
            model(different_cells(61))
        assert calls == []
        model(different_cells(61))
    assert calls == [1]


@pytest.fixture(scope="module")
def finetuned(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "reference_best.pth"
    torch.save(reference["finetune_checkpoint"], path)
    return build_model(load_checkpoint(str(path))).eval()


@pytest.mark.parametrize("route", ["no-grad", "autograd"])
def test_bf16_autocast_predicts_the_same_classes_as_float32(reference, finetuned, route):
    tokens = reference["tokens"]
    expected = reference["expected_class_logits"].argmax(dim=1)
    with torch.set_grad_enabled(route == "autograd"):
        if route == "autograd":
            finetuned.requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = finetuned(tokens)
        assert torch.equal(logits.argmax(dim=1), expected)
        if route == "autograd":
            logits.float().sum().backward()
            grads = [p.grad for p in finetuned.parameters() if p.requires_grad]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            finetuned.requires_grad_(False)


def test_projection_biases_are_handled_on_both_routes():
    model = small_model(qkv_bias=True, depth=2)
    for block in model.performer.net.layers:
        for proj in (block[0].fn.to_q, block[0].fn.to_k, block[0].fn.to_v):
            torch.nn.init.normal_(proj.bias, std=0.5)
    model.set_chunk_size(16)
    tokens = different_cells(61)
    with torch.no_grad():
        fast = model.eval()(tokens)
        with plain_attention():
            plain = model(tokens)
    assert rel_err(fast, plain) < 1e-5
    model.train().fix_projections()
    weights = torch.randn_like(plain)
    fast_grads = trainable_grads(model, tokens, weights)
    with plain_attention():
        plain_grads = trainable_grads(model, tokens, weights)
    assert "performer.net.layers.0.0.fn.to_k.bias" in fast_grads
    for name in plain_grads:
        assert rel_err(fast_grads[name], plain_grads[name]) < 1e-4, name
