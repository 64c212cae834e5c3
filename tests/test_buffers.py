"""The step-to-step pool of large CPU tensors (performer_pytorch/buffers.py): reuse only what nothing refers to."""

import pytest
import torch

from performer_pytorch import buffers
from performer_pytorch.fast_attention import favor_self_attention
from performer_pytorch.performer_pytorch import gaussian_orthogonal_random_matrix

SHAPE = (4, 300, 256)  # 1.2 MB of float32: above buffers.MIN_BYTES


@pytest.fixture(autouse=True)
def empty_pool():
    buffers.release()
    yield
    buffers.release()


def test_a_tensor_nothing_refers_to_is_reused():
    first = buffers.take(SHAPE, torch.float32, torch.device("cpu"))
    pointer = first.data_ptr()
    second = buffers.take(SHAPE, torch.float32, torch.device("cpu"))
    assert second.data_ptr() != pointer, "the first tensor is still held by the caller"
    del first
    assert buffers.take(SHAPE, torch.float32, torch.device("cpu")).data_ptr() == pointer
    assert buffers.take(SHAPE, torch.float64, torch.device("cpu")).data_ptr() != pointer, "other dtype, other tensor"


def test_views_and_small_tensors():
    view = buffers.take(SHAPE, torch.float32, torch.device("cpu"))[1:3]  # a view keeps the storage in use
    assert buffers.take(SHAPE, torch.float32, torch.device("cpu")).data_ptr() != view.data_ptr()
    before = buffers.pooled_bytes()
    buffers.take((10, 10), torch.float32, torch.device("cpu"))
    assert buffers.pooled_bytes() == before, "small tensors are not pooled"
    buffers.release()
    assert buffers.pooled_bytes() == 0


def attention_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 2100, 8, requires_grad=True)  # saved [q; k; v] is 2 x 48 x 2100 floats, 0.8 MB; y 134 KB
    w_qkv = torch.randn(3 * 16, 8, requires_grad=True)
    w_out = torch.randn(8, 16, requires_grad=True)
    return x, w_qkv, w_out, gaussian_orthogonal_random_matrix(5, 4)


def test_saved_tensors_are_not_reused_while_a_retained_graph_holds_them(monkeypatch):
    """backward(retain_graph=True), another forward and backward, then the first graph's second backward: the
    second forward must not have written into tensors the first graph still needs."""
    monkeypatch.setattr(buffers, "MIN_BYTES", 1024)
    x, w_qkv, w_out, projection = attention_inputs()

    def run(inputs):
        return favor_self_attention(inputs, w_qkv, None, w_out, None, projection, 4, 512)

    first = run(x)
    (expected,) = torch.autograd.grad(first.sum(), x, retain_graph=True)
    assert buffers.pooled_bytes() > 0
    other = run(torch.randn_like(x).requires_grad_())
    other.sum().backward()
    (again,) = torch.autograd.grad(first.sum(), x)
    assert torch.equal(again, expected)


def test_training_steps_reuse_the_pooled_tensors(monkeypatch):
    monkeypatch.setattr(buffers, "MIN_BYTES", 1024)
    x, w_qkv, w_out, projection = attention_inputs()
    grads = []
    for _ in range(3):
        y = favor_self_attention(x, w_qkv, None, w_out, None, projection, 4, 512)
        (grad,) = torch.autograd.grad((y * y).sum(), x)
        grads.append(grad.clone())  # a copy: the returned gradient is itself a pooled tensor, held while referenced
        del y, grad
        if len(grads) == 1:
            pooled = buffers.pooled_bytes()
    assert buffers.pooled_bytes() == pooled, "steps 2 and 3 took the tensors step 1 made"
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[1], grads[2])
