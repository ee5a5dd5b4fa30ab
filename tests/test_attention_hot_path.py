"""ops.attention's eager fast path: a plain eager call runs the face through an autograd.Function
(no torch.library custom-op dispatch, ~4x less Python per call: benchmarks/bench_attention_overhead.py);
anything else (a dispatch mode, torch.compile, tensor subclasses) still goes through the custom op.
Both paths give the same output and gradients."""

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

A = importlib.import_module("mmfast.ops.attention")


class _SeenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def _run(backend, q, k, v, m, mode=None):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if mode is None:
        out = A.attention(q, k, v, key_padding_mask=m, causal=True, backend=backend)
    else:
        with mode:
            out = A.attention(q, k, v, key_padding_mask=m, causal=True, backend=backend)
    out.backward(torch.ones_like(out))
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_eager_path_skips_the_custom_op_and_matches_it(monkeypatch, backend):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("interpreter test")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, L, 32, generator=g) for L in (9, 21, 21))
    m = torch.rand(2, 21, generator=g) > 0.3
    m[:, 0] = True
    calls = []
    real = A._attention_fwd_op
    monkeypatch.setattr(A, "_attention_fwd_op", lambda *a: calls.append(1) or real(*a))
    eager = _run(backend, q, k, v, m)
    assert calls == [], "a plain eager call went through the custom op"
    mode = _SeenOps()
    custom = _run(backend, q, k, v, m, mode)
    assert calls == [1] and "mmfast.attention_forward.default" in mode.ops
    for a, b in zip(eager, custom):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():  # no autograd at all when nothing needs a gradient
        out = A.attention(q, k, v, key_padding_mask=m, causal=True, backend=backend)
    assert out.grad_fn is None and calls == [1]
    torch.testing.assert_close(out, eager[0], rtol=0, atol=0)
