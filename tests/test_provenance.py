"""Face provenance (mmfast.testing.faces_run): every face of every op records that it ran, per
direction, eager and compiled; check_op and the backend-parametrised tests (tests/conftest.py)
fail when the face asked for is not the one that ran."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast import _provenance, dispatch, testing
from mmfast.reference import attention as ref_attention

OPS = ("attention", "cross_entropy", "linear_cross_entropy", "contrastive_loss", "concat_embed")


def _call(op, backend):
    """Runs ``op`` on small fresh inputs with ``backend`` and returns a scalar to backpropagate."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_()
    if op == "attention":
        return mmfast.ops.attention(r(1, 2, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8), backend=backend).square().sum()
    if op == "cross_entropy":
        return mmfast.ops.cross_entropy(r(6, 11), torch.randint(0, 11, (6,), generator=g), backend=backend)
    if op == "linear_cross_entropy":
        return mmfast.ops.linear_cross_entropy(r(6, 8), r(11, 8), torch.randint(0, 11, (6,), generator=g),
                                               backend=backend)
    if op == "contrastive_loss":
        return mmfast.ops.contrastive_loss(r(4, 8), r(4, 8), torch.tensor(10.0), backend=backend)
    out, _ = mmfast.ops.concat_embed([r(2, 3, 8), r(2, 4, 8)], ln_weight=r(8), ln_bias=r(8), backend=backend)
    return out.square().sum()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("op", OPS)
def test_every_face_records_forward_and_backward(op, backend):
    with testing.faces_run() as fwd:
        loss = _call(op, backend)
    assert fwd[(op, backend, "forward")] == 1, dict(fwd)
    with testing.faces_run() as bwd:
        loss.backward()
    both = fwd + bwd
    assert both[(op, backend, "backward")] == 1, dict(both)
    assert set(both) == {(op, backend, "forward"), (op, backend, "backward")}, dict(both)


@pytest.mark.parametrize("op", OPS)
def test_no_recorder_costs_nothing_on_the_reference_branch(op):
    """Outside faces_run() the reference branch returns the reference's own result (no counting
    ops, no copy) and records nothing anywhere."""
    assert not _provenance._active
    q = torch.randn(1, 1, 3, 8)
    out = ref_attention(q, q, q)
    assert _provenance.reference_ran("attention", out) is out
    pair = (out, None)
    assert _provenance.reference_ran("concat_embed", pair) is pair
    _call(op, "torch").backward()  # nothing open: nothing to count into, nothing breaks


def test_recorders_nest_and_count_separately():
    with testing.faces_run() as outer:
        _call("cross_entropy", "cpu")
        with testing.faces_run() as inner:
            _call("attention", "torch").backward()
    assert outer[("cross_entropy", "cpu", "forward")] == 1 and outer[("attention", "torch", "backward")] == 1
    assert ("cross_entropy", "cpu", "forward") not in inner and inner[("attention", "torch", "forward")] == 1
    assert not _provenance._active


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_compiled_code_counts_every_run(backend):
    """Custom-op bodies run at run time under torch.compile; the traced reference branch counts
    through its counting ops, inserted when compiled inside a recorder (dynamo guards on it)."""
    def f(q, k, v):
        return mmfast.ops.attention(q, k, v, causal=True, backend=backend).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, k, v = (torch.randn(1, 2, 6, 8, requires_grad=True) for _ in range(3))
    compiled(q, k, v).backward()  # compiled outside any recorder first
    with testing.faces_run() as ran:
        for _ in range(3):
            compiled(q, k, v).backward()
    assert ran == {("attention", backend, "forward"): 3, ("attention", backend, "backward"): 3}, dict(ran)


def _force_reference(monkeypatch):
    """A dispatch bug: every backend silently resolves to the torch reference."""
    real = dispatch.resolve
    monkeypatch.setattr(dispatch, "resolve", lambda op, backend, *a, **kw: (real(op, backend, *a, **kw), "torch")[1])


def test_check_op_fails_when_the_face_ran_the_reference(monkeypatch):
    x, t = torch.randn(9, 13), torch.randint(0, 13, (9,))
    run = lambda: testing.check_op(lambda x, t: mmfast.ops.cross_entropy(x, t, backend="cpu"), F.cross_entropy,
                                   [x, t], grad_inputs=[0], reduction=(13, 9), face=("cross_entropy", "cpu"),
                                   name="ce")
    run()  # the real face passes
    _force_reference(monkeypatch)
    with pytest.raises(AssertionError, match=r"face 'cpu' did not run forward.*cross_entropy/torch/forward"):
        run()  # the numbers still match: only provenance notices


def test_check_op_fails_when_only_the_backward_is_not_the_face(monkeypatch):
    """The face's forward runs, but its backward silently is the reference's."""
    A = importlib.import_module("mmfast.ops.attention")
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    run = lambda: testing.check_op(lambda q, k, v: mmfast.ops.attention(q, k, v, backend="cpu"), ref_attention,
                                   [q, k, v], grad_inputs=[0, 1, 2], reduction=(5, 8), face=("attention", "cpu"),
                                   name="attention")
    run()

    def reference_backward(backend, grad_out, q, k, v, out, lse, mask, seed, causal, scale, dropout_p):
        _provenance.record("attention", "torch", "backward")
        with torch.enable_grad():
            x = [t.detach().requires_grad_() for t in (q, k, v)]
            o = ref_attention(*x, key_padding_mask=mask, causal=causal, scale=scale)
            return torch.autograd.grad(o, x, grad_out)

    monkeypatch.setattr(A, "_run_backward", reference_backward)  # every path's way to the backward face
    with pytest.raises(AssertionError, match=r"face 'cpu' did not run backward.*attention/torch/backward"):
        run()


def test_backend_parametrised_tests_check_the_face(monkeypatch):
    """What tests/conftest.py asserts after every passing test that has a ``backend`` parameter."""
    with testing.faces_run() as ran:
        _call("concat_embed", "cpu").backward()
    testing.assert_face_ran(ran, None, "cpu", ("forward",))
    _force_reference(monkeypatch)
    with testing.faces_run() as ran:
        _call("concat_embed", "cpu").backward()
    with pytest.raises(AssertionError, match="face 'cpu' did not run forward"):
        testing.assert_face_ran(ran, None, "cpu", ("forward",))
