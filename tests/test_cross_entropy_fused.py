"""linear_cross_entropy and contrastive_loss against their eager definitions (float64 reference,
eager in the same dtype as baseline), for the cpu face (C++ CE kernel) and the Triton face
(interpreter on a CPU machine): reductions, ignore_index, label smoothing, bias, chunking, tiling,
edge cases, opcheck and torch.compile."""

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast import dispatch, testing

CE = __import__("mmfast.ops.cross_entropy", fromlist=["_"])
BACKENDS = testing.cpu_faces("linear_cross_entropy")  # raises when a face that should exist does not load
pytestmark = pytest.mark.skipif(not BACKENDS, reason="neither the C++ extension nor Triton is available")




def _lce_ref(h, W, t, b, **kw):
    return F.cross_entropy(F.linear(h, W, b), t, **kw)


def _lce_case(N, V, H, dtype, seed, ignore_frac=0.85):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=gen).to(dtype)
    W = (torch.randn(V, H, generator=gen) / H ** 0.5).to(dtype)
    b = torch.randn(V, generator=gen).to(dtype)
    t = torch.randint(0, V, (N,), generator=gen)
    t[torch.rand(N, generator=gen) < ignore_frac] = -100  # an MLM batch: most rows ignored
    if N > 1:
        t[0] = 3 % V  # at least one row counts
    return h, W, b, t


def lce_reduction(h, W):
    """Reductions behind one element: each logit's dot product over H, the log-sum-exp over the V
    classes, then the N rows (the loss's sum or mean; dW and db sum over rows whatever the reduction)."""
    return (h.shape[-1], W.shape[0], h.numel() // h.shape[-1])


def _check_lce(backend, h, W, b, t, eps, reduction, name):
    if b is None:
        testing.check_op(
            lambda h, W, t: mmfast.ops.linear_cross_entropy(h, W, t, label_smoothing=eps, reduction=reduction,
                                                            backend=backend),
            lambda h, W, t: _lce_ref(h, W, t, None, label_smoothing=eps, reduction=reduction),
            [h, W, t], grad_inputs=[0, 1], name=name, reduction=lce_reduction(h, W),
            face=("linear_cross_entropy", backend))
    else:
        testing.check_op(
            lambda h, W, t, b: mmfast.ops.linear_cross_entropy(h, W, t, b, label_smoothing=eps, reduction=reduction,
                                                               backend=backend),
            lambda h, W, t, b: _lce_ref(h, W, t, b, label_smoothing=eps, reduction=reduction),
            [h, W, t, b], grad_inputs=[0, 1, 3], name=name, reduction=lce_reduction(h, W),
            face=("linear_cross_entropy", backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,V", [(1, 7), (113, 1000), (197, 7)])
def test_linear_ce_rule(backend, dtype, N, V):
    h, W, b, t = _lce_case(N, V, 32, dtype, seed=N + V, ignore_frac=0.0 if N == 1 else 0.85)
    for reduction in ("mean", "sum", "none"):
        for eps, bias in ((0.0, b), (0.1, None)):
            _check_lce(backend, h, W, bias, t, eps, reduction, f"lce {backend} {N}x{V} {dtype} {reduction} {eps}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["row_strided", "column_strided"])
def test_linear_ce_strided_hidden_and_weight(backend, layout):
    """Hidden states (and the classifier weight) as views: rows of a wider buffer, or every other column."""
    h, W, b, t = _lce_case(23, 37, 2 * 16 + 3, torch.float32, seed=13, ignore_frac=0.3)
    view = (lambda x: x[:, :16]) if layout == "row_strided" else (lambda x: x[:, 1::2][:, :16])
    hv, Wv = view(h), view(W)
    assert not hv.is_contiguous() and not Wv.is_contiguous()
    for reduction in ("mean", "none"):
        _check_lce(backend, hv, Wv, b, t, 0.1, reduction, f"lce {backend} {layout} {reduction}")


@pytest.mark.parametrize("backend", ["cpu"])  # bf16 tl.dot is broken in the Triton interpreter (triton #11584)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_ce_and_contrastive_bf16_on_cpu(backend, reduction):
    """bfloat16 hidden states and features on the CPU face."""
    h, W, b, t = _lce_case(29, 53, 24, torch.bfloat16, seed=14, ignore_frac=0.3)
    _check_lce(backend, h, W, b, t, 0.0, reduction, f"lce {backend} bf16 {reduction}")
    i, tt, s = _feats(17, 24, torch.bfloat16, seed=15)
    _check_contrastive(backend, i, tt, s, 0.1, f"contrastive {backend} bf16")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_ce_bert_vocab(backend):
    h, W, b, t = _lce_case(113, 30522, 16, torch.float32, seed=11)
    _check_lce(backend, h, W, b, t, 0.1, "mean", f"lce {backend} 113x30522")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_ce_many_chunks(backend, dtype, monkeypatch):
    """Several chunks (dW/db accumulated across them, in float32 for float16) and 3-D hidden states."""
    monkeypatch.setattr(CE, "_chunk_rows", lambda V, device: 5)
    h, W, b, t = _lce_case(4 * 29, 61, 24, dtype, seed=12, ignore_frac=0.5)
    h3, t3 = h.reshape(4, 29, 24), t.reshape(4, 29)
    for reduction in ("mean", "none"):
        testing.check_op(
            lambda h, W, t, b: mmfast.ops.linear_cross_entropy(h, W, t, b, label_smoothing=0.05, reduction=reduction,
                                                               backend=backend),
            lambda h, W, t, b: _lce_ref(h.reshape(-1, 24), W, t.reshape(-1), b, label_smoothing=0.05,
                                        reduction=reduction).reshape(t.shape if reduction == "none" else ()),
            [h3, W, t3, b], grad_inputs=[0, 1, 3], name=f"lce chunks {dtype} {reduction}",
            reduction=lce_reduction(h3, W), face=("linear_cross_entropy", backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_ce_edge_cases(backend):
    h, W, b, t = _lce_case(9, 13, 8, torch.float32, seed=13)
    h.requires_grad_(True)
    W.requires_grad_(True)
    t_all = torch.full((9,), -100)
    for reduction in ("mean", "sum", "none"):
        out = mmfast.ops.linear_cross_entropy(h, W, t_all, b, reduction=reduction, backend=backend)
        torch.testing.assert_close(out, _lce_ref(h, W, t_all, b, reduction=reduction), equal_nan=True)
    gh, gW = torch.autograd.grad(mmfast.ops.linear_cross_entropy(h, W, t_all, reduction="sum", backend=backend), (h, W))
    assert not gh.any() and not gW.any()
    e = torch.randn(0, 8, requires_grad=True)
    out = mmfast.ops.linear_cross_entropy(e, W, torch.zeros(0, dtype=torch.long), reduction="sum", backend=backend)
    assert out.item() == 0.0
    with pytest.raises(RuntimeError, match="argument 'target'"):
        mmfast.ops.linear_cross_entropy(h, W, torch.full((9,), 13), backend=backend)
    with pytest.raises(ValueError, match="argument 'weight'"):
        mmfast.ops.linear_cross_entropy(h, W[:, :5], t, backend=backend)
    # no gradient wanted: loss only
    with torch.no_grad():
        out = mmfast.ops.linear_cross_entropy(h, W, t, b, backend=backend)
    torch.testing.assert_close(out, _lce_ref(h, W, t, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_ce_opcheck_and_compile(backend):
    h, W, b, t = _lce_case(11, 17, 8, torch.float32, seed=14, ignore_frac=0.3)
    h.requires_grad_(True)
    W.requires_grad_(True)
    b.requires_grad_(True)
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")  # the full set is slow
    for red in ("mean", "sum", "none"):
        torch.library.opcheck(CE._linear_cross_entropy_op, (h, W, t, b, -100, 0.1, red, True, backend),
                              **({} if red == "mean" else {"test_utils": quick}))
    torch.library.opcheck(CE._linear_cross_entropy_backward_op,
                          (h.detach(), W.detach(), t, None, torch.rand(11), -100, 0.0, backend), test_utils=quick)
    f = torch.compile(lambda h, W, t, b: mmfast.ops.linear_cross_entropy(h, W, t, b, backend=backend) * 2,
                      fullgraph=True, backend="aot_eager")
    loss = f(h, W, t, b)
    grads = torch.autograd.grad(loss, (h, W, b))
    ref = _lce_ref(h, W, t, b) * 2
    refg = torch.autograd.grad(ref, (h, W, b))
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, refg):
        torch.testing.assert_close(g, r)


# ---------------------------------------------------------------------------------------------
def _feats(N, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    i = F.normalize(torch.randn(N, D, generator=gen), dim=1).to(dtype)
    t = F.normalize(torch.randn(N, D, generator=gen), dim=1).to(dtype)
    s = torch.tensor(14.0 + torch.rand((), generator=gen).item()).to(dtype)
    return i, t, s


def _check_contrastive(backend, i, t, s, eps, name):
    testing.check_op(
        lambda i, t, s: mmfast.ops.contrastive_loss(i, t, s, label_smoothing=eps, backend=backend),
        lambda i, t, s: mmfast.reference.contrastive_loss(i, t, s, label_smoothing=eps),
        [i, t, s], grad_inputs=[0, 1, 2], name=name, reduction=(i.shape[1], i.shape[0], i.shape[0]),
        face=("contrastive_loss", backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N", [1, 7, 113])
def test_contrastive_rule(backend, dtype, N):
    i, t, s = _feats(N, 32, dtype, seed=N)
    for eps in (0.0, 0.1):
        _check_contrastive(backend, i, t, s, eps, f"contrastive {backend} N={N} {dtype} eps={eps}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_contrastive_tiled(backend, dtype, monkeypatch):
    """The tiled path (N >= 8192 in production) with small tiles: statistics across row tiles, the
    column log-sum-exp merged online, diagonals of off-origin tiles."""
    monkeypatch.setattr(CE, "_CONTRASTIVE_TILE_FROM", 64)
    monkeypatch.setattr(CE, "_CONTRASTIVE_TILE", 24)
    i, t, s = _feats(113, 16, dtype, seed=3)
    _check_contrastive(backend, i, t, s, 0.1, f"contrastive tiled {backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_contrastive_extreme_scale_opcheck_compile(backend):
    i, t, s = _feats(19, 8, torch.float32, seed=5)
    _check_contrastive(backend, i, t, torch.tensor(100.0), 0.0, "contrastive scale 100")  # CLIP's clamp
    for x in (i, t, s):
        x.requires_grad_(True)
    torch.library.opcheck(CE._contrastive_op, (i, t, s, 0.1, True, backend))
    f = torch.compile(lambda i, t, s: mmfast.ops.contrastive_loss(i, t, s.exp(), backend=backend),
                      fullgraph=True, backend="aot_eager")
    ls = torch.tensor(2.6, requires_grad=True)
    loss = f(i, t, ls)
    grads = torch.autograd.grad(loss, (i, t, ls))
    ref = mmfast.reference.contrastive_loss(i, t, ls.exp())
    refg = torch.autograd.grad(ref, (i, t, ls))
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, refg):
        torch.testing.assert_close(g, r)


def test_loss_modules():
    be = BACKENDS[0]
    h, W, b, t = _lce_case(10, 23, 8, torch.float32, seed=15, ignore_frac=0.3)
    m = mmfast.nn.LinearCrossEntropyLoss(label_smoothing=0.1, backend=be)
    torch.testing.assert_close(m(h, W, t, b), _lce_ref(h, W, t, b, label_smoothing=0.1))
    i, tt, s = _feats(6, 8, torch.float32, seed=16)
    torch.testing.assert_close(mmfast.nn.ContrastiveLoss(backend=be)(i, tt, s),
                               mmfast.reference.contrastive_loss(i, tt, s))
