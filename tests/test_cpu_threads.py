"""The C++ CPU faces split rows across OpenMP threads. The rest of the suite runs one intra-op
thread (conftest), so this module checks the multi-threaded paths: results with 4 threads must be
bitwise identical to 1 thread (rows are independent; parameter gradients are reduced in a fixed
order), outputs and gradients alike."""

import pytest
import torch

import mmfast

pytestmark = pytest.mark.skipif(not mmfast.backends()["extension"]["loaded"], reason="mmfast._C not built")


def _with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def test_cross_entropy_threads_bitwise_equal():
    x = torch.randn(257, 1003, dtype=torch.float32) * 3
    t = torch.randint(0, 1003, (257,))
    t[::7] = -100
    w = torch.rand(1003)

    def run():
        xx = x.clone().requires_grad_(True)
        loss = mmfast.ops.cross_entropy(xx, t, weight=w, label_smoothing=0.1, backend="cpu")
        (g,) = torch.autograd.grad(loss, xx)
        return loss.detach(), g

    l1, g1 = _with_threads(1, run)
    l4, g4 = _with_threads(4, run)
    assert torch.equal(l1, l4) and torch.equal(g1, g4)
    ref = torch.nn.functional.cross_entropy(x.double(), t, weight=w.double(), label_smoothing=0.1)
    assert abs(l4.item() - ref.item()) < 1e-4 * abs(ref.item())


def test_concat_embed_threads_bitwise_equal():
    B, D = 5, 64
    feats = [torch.randn(B, 7, D), torch.randn(B, 113, D)]
    tt, pos = torch.randn(2, D), torch.randn(120, D)
    w, b = torch.randn(D), torch.randn(D)
    up = torch.randn(B, 120, D)

    def run():
        ins = [t.clone().requires_grad_(True) for t in (*feats, tt, pos, w, b)]
        out, _ = mmfast.ops.concat_embed(ins[:2], type_embeddings=ins[2], pos_embeddings=[None, ins[3]],
                                         ln_weight=ins[4], ln_bias=ins[5], backend="cpu")
        grads = torch.autograd.grad(out, ins, up)
        return (out, *grads)

    one, four = _with_threads(1, run), _with_threads(4, run)
    for a, c in zip(one, four):
        assert torch.equal(a, c)
