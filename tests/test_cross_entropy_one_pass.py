"""cross_entropy in one pass (issue #16 item 4): the forward computes only the loss; the backward
is one face-kernel call that writes the gradient already multiplied by the upstream gradient
(scalar or per row), so no N x C op runs besides it, whatever the upstream. Also: retain_graph,
the refusal of double backward, the version-counter guard on the saved logits, and the Triton
kernel's register-resident row (ONE_CHUNK) against its chunk loop."""

import importlib
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import mmfast
from mmfast import dispatch, testing
CE = importlib.import_module("mmfast.ops.cross_entropy")

BACKENDS = [b for b in ("cpu", "triton") if dispatch.availability("cross_entropy", b, "cpu", torch.float32) is None]
pytestmark = pytest.mark.skipif(not BACKENDS, reason="neither the C++ extension nor Triton is available")


class _BigOps(TorchDispatchMode):
    """Records every op that moves data (seen at the top level: a custom op's insides are not; views
    such as detach move nothing) with an output of at least ``numel`` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        if not func.is_view and any(isinstance(o, torch.Tensor) and o.numel() >= self.numel for o in outs):
            self.ops.append(str(func))
        return out


@pytest.fixture
def face_calls(monkeypatch):
    """Every call of a cross-entropy face kernel: (compute_grad, grad_scale copy or None)."""
    calls = []
    real = CE._face_forward

    def spy(backend):
        f = real(backend)

        def wrapped(logits, target, weight, ii, eps, compute_grad, grad_scale):
            calls.append((compute_grad, None if grad_scale is None else grad_scale.clone()))
            return f(logits, target, weight, ii, eps, compute_grad, grad_scale)
        return wrapped

    monkeypatch.setattr(CE, "_face_forward", spy)
    return calls


def _case(N=37, C=113, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=gen) * 3
    t = torch.randint(0, C, (N,), generator=gen)
    t[torch.rand(N, generator=gen) < 0.3] = -100
    w = torch.rand(C, generator=gen) + 0.5
    return x, t, w


def _reference_grad(x, t, w, eps, reduction, up):
    """(float64 gradient, float32 eager gradient) of sum(up * loss)."""
    out = []
    for dt in (torch.float64, torch.float32):
        xr = x.detach().to(dt).requires_grad_(True)
        loss = F.cross_entropy(xr, t, weight=w.to(dt), label_smoothing=eps, reduction=reduction)
        (g,) = torch.autograd.grad(loss, xr, up.to(dt))
        out.append(g)
    return out


def _forward_backward(backend, reduction, upstream):
    """Loss and gradient (weights, ignored rows, smoothing) with a unit or non-unit upstream, the
    data-moving N x C ops of the backward, checked against float64 under the rule."""
    x, t, w = _case()
    x.requires_grad_(True)
    loss = mmfast.ops.cross_entropy(x, t, weight=w, label_smoothing=0.1, reduction=reduction, backend=backend)
    N = x.shape[0]
    if reduction == "none":
        up = torch.ones(N) if upstream == "unit" else torch.rand(N) + 0.5
    else:
        up = torch.tensor(1.0) if upstream == "unit" else torch.tensor(2.5)
    with _BigOps(x.numel()) as mode:
        (g,) = torch.autograd.grad(loss, x, up)
    ref, eager = _reference_grad(x, t, w, 0.1, reduction, up)
    testing.assert_close(g, ref, eager, grad=True, name=f"{backend} {reduction} {upstream}")
    assert (g[t == -100] == 0).all()
    return t, w, up, mode.ops


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton unavailable")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("upstream", ["unit", "scalar"])
def test_gpu_faces_backward_is_one_kernel_pass_with_the_upstream_folded_in(reduction, upstream, face_calls):
    """The deferred gradient of the GPU faces (the Triton face runs here in the interpreter)."""
    t, w, up, ops = _forward_backward("triton", reduction, upstream)
    # the forward computed the loss only; one N x C op in the backward: the face kernel inside
    # the custom backward op (no scaling pass), with the upstream folded into its grad_scale
    assert ops == ["mmfast.cross_entropy_backward.default"], ops
    assert [c[0] for c in face_calls] == [False, True]
    valid = t != -100
    denom = w[t.clamp(min=0)][valid].sum() if reduction == "mean" else torch.tensor(1.0)
    torch.testing.assert_close(face_calls[1][1], (up.reshape(-1) / denom).float(), rtol=1e-6, atol=0)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="C++ extension unavailable")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("upstream", ["unit", "scalar"])
def test_cpu_face_gradient_in_forward_costs_no_pass_for_a_unit_upstream(reduction, upstream, face_calls):
    _, _, _, ops = _forward_backward("cpu", reduction, upstream)
    assert [c[0] for c in face_calls] == [True]  # the gradient came with the forward
    # a scalar 1.0: the saved gradient is the answer; otherwise one in-place scaling, no new N x C
    assert ops == ([] if upstream == "unit" and reduction != "none" else ["aten.mul_.Tensor"]), ops


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_backward_op(backend):
    x, t, w = _case(N=9, C=13, seed=7)
    for red in ("mean", "sum", "none"):
        up = torch.rand(9) + 0.5 if red == "none" else torch.tensor(2.5)
        torch.library.opcheck(CE._cross_entropy_backward_op, (up, x, t, w, -100, 0.1, red, backend),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_retain_graph_and_accumulation(backend):
    x, t, w = _case(seed=1)
    x.requires_grad_(True)
    for reduction in ("mean", "sum", "none"):
        x.grad = None
        loss = mmfast.ops.cross_entropy(x, t, weight=w, reduction=reduction, backend=backend)
        ups = [torch.rand_like(loss) + 0.5 for _ in range(3)]
        for u in ups[:-1]:
            loss.backward(u, retain_graph=True)
        loss.backward(ups[-1])
        ref, eager = _reference_grad(x, t, w, 0.0, reduction, sum(ups))
        testing.assert_close(x.grad, ref, eager, grad=True, name=f"{backend} {reduction} accumulated")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_targets_ignored_gives_a_zero_gradient(backend):
    x, t, w = _case(N=5, seed=2)
    t[:] = -100
    for reduction in ("mean", "sum", "none"):
        xx = x.clone().requires_grad_(True)
        loss = mmfast.ops.cross_entropy(xx, t, weight=w, reduction=reduction, backend=backend)
        ref = F.cross_entropy(x, t, weight=w, reduction=reduction)
        torch.testing.assert_close(loss, ref, equal_nan=True)  # mean: 0/0 = NaN, as torch
        loss.sum().backward()
        assert torch.equal(xx.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused_clearly(backend):
    x, t, _ = _case(N=6, C=9, seed=3)
    x.requires_grad_(True)
    loss = mmfast.ops.cross_entropy(x, t, backend=backend)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)  # first order still works
    ref = torch.autograd.grad(F.cross_entropy(x, t), x)[0]
    torch.testing.assert_close(g.detach(), ref)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_changed_in_place_after_the_loss_are_caught(backend):
    """The backward reads the saved logits: a later in-place change is an error, never a wrong
    gradient."""
    z = torch.randn(8, 17, requires_grad=True)
    t = torch.randint(0, 17, (8,))
    y = z * 2
    loss = mmfast.ops.cross_entropy(y, t, backend=backend)
    y.mul_(3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton unavailable")
@pytest.mark.parametrize("smooth,weighted", [(0.0, False), (0.1, True)])
def test_triton_register_row_matches_the_chunk_loop(monkeypatch, smooth, weighted):
    """The ONE_CHUNK path (row kept in registers) runs by default here and gives what the chunk
    loop gives (forced through a small class block)."""
    from mmfast.triton import cross_entropy as tce

    x, t, w = _case(N=21, C=300, seed=4)
    x = x.to(torch.float16)
    w = w if weighted else None
    launches = []
    real_cfg = tce._launch_config

    def cfg(N, C, compute_grad, sm):
        launches.append(real_cfg(N, C, compute_grad, sm))
        return launches[-1]

    def run():
        xx = x.clone().requires_grad_(True)
        loss = mmfast.ops.cross_entropy(xx, t, weight=w, label_smoothing=smooth, reduction="sum", backend="triton")
        loss.backward(torch.tensor(0.75))
        return loss, xx.grad

    monkeypatch.setattr(tce, "_launch_config", cfg)
    loss1, g1 = run()
    assert [l[3] for l in launches] == [False, True]  # forward: loss only; backward: one chunk
    monkeypatch.setattr(tce, "_launch_config", lambda N, C, cg, sm: (4, 64, 1, False))
    loss2, g2 = run()
    torch.testing.assert_close(loss1, loss2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=2e-3, atol=1e-6)
    ref, eager = _reference_grad(x, t, w if weighted else torch.ones(300), smooth, "sum", torch.tensor(0.75))
    testing.assert_close(g1, ref, eager.half(), grad=True, name="one chunk")


def test_gpu_launch_table_keeps_rows_on_chip_up_to_32768_classes():
    from mmfast.triton import cross_entropy as tce

    for C in (7, 1000, 2047, 2048, 5000, 16384, 30522, 32768, 50257, 128256):
        for smooth in (False, True):
            rows, block, warps, one = tce._gpu_launch_config(4096, C, True, smooth)
            assert rows * block <= 32768 and 4 <= warps <= 32
            assert not one or C <= block
            # label smoothing keeps the row on chip up to 8192 classes (Triton 3.6 spills at 16384)
            assert one == (C <= 8192 or (C <= 32768 and not smooth)), (C, smooth)
            assert tce._gpu_launch_config(4096, C, False, smooth)[3] is False or C < 2048


_SPILLS_SCRIPT = r"""
import os, re, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mmfast.triton import cross_entropy as m
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
sig = {"x_ptr": "*bf16", "x_stride": "i64", "g_ptr": "*bf16", "g_stride": "i64", "t_ptr": "*i64", "w_ptr": "*fp32",
       "loss_ptr": "*fp32", "scale_ptr": "*fp32", "scale_stride": "i32", "N": "i32", "C": "i32",
       "ignore_index": "i32", "eps": "fp32"}
for C, smooth, weight in ((30522, False, False), (8192, True, True)):
    rows, block, warps, one = m._gpu_launch_config(16384, C, True, smooth)
    c = dict(HAS_WEIGHT=weight, SMOOTH=smooth, HAS_SCALE=True, COMPUTE_GRAD=True, ROWS=rows, BLOCK=block, ONE_CHUNK=one)
    k = triton.compile(ASTSource(m._ce_kernel, {**sig, **{n: "constexpr" for n in c}}, constexprs=c),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    d = tempfile.mkdtemp()
    open(os.path.join(d, "k.ptx"), "w").write(k.asm["ptx"])
    r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", os.path.join(d, "k.ptx"), "-o", os.path.join(d, "k.o")],
                       capture_output=True, text=True, check=True)
    print(C, one, re.search(r"(\d+) bytes spill stores", r.stderr).group(1), re.search(r"Used (\d+) registers", r.stderr).group(1))
"""


def test_one_chunk_bert_vocab_compiles_for_sm90_without_spills():
    """The register-resident row at C = 30522 (bf16) and C = 8192 with weights and smoothing (the
    largest smoothed row kept on chip): compiled for sm_90 here (Triton's bundled ptxas), no spill bytes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SPILLS_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0 and ("cannot import name 'GPUTarget'" in r.stderr or "No such file" in r.stderr):
        pytest.skip(f"no offline Triton CUDA toolchain: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [l.split() for l in r.stdout.strip().splitlines()]
    assert [l[:2] for l in lines] == [["30522", "True"], ["8192", "True"]]
    assert all(l[2] == "0" for l in lines), r.stdout


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton unavailable")
def test_every_triton_launch_goes_through_the_device_guard(monkeypatch):
    from mmfast.triton import cross_entropy as tce

    entered = []
    real = tce._device_guard
    monkeypatch.setattr(tce, "_device_guard", lambda t: entered.append(t.device) or real(t))
    x, t, _ = _case(N=5, C=11, seed=8)
    x.requires_grad_(True)
    mmfast.ops.cross_entropy(x, t, backend="triton").backward()
    assert len(entered) == 2  # the loss kernel, then the gradient kernel
    img = torch.randn(4, 8, requires_grad=True)
    mmfast.ops.contrastive_loss(img, torch.randn(4, 8), torch.tensor(2.0), backend="triton").backward()
    assert len(entered) == 3  # + the contrastive gradient tile


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("C", [8000, 50257])
def test_gpu_deferred_gradient_register_row_and_chunk_loop(backend, C):
    """C = 8000: the row in registers (CUDA 64 values/thread, Triton ONE_CHUNK); C = 50257: the
    chunk loop of both faces. bf16, non-unit upstream (an AMP-style loss scale)."""
    gen = torch.Generator().manual_seed(C)
    x = (torch.randn(257, C, generator=gen) * 3).to(torch.bfloat16).cuda()
    t = torch.randint(0, C, (257,), generator=gen)
    t[::5] = -100
    t = t.cuda()
    testing.check_op(
        lambda x, t: mmfast.ops.cross_entropy(x, t, label_smoothing=0.1, backend=backend) * 1024.0,
        lambda x, t: F.cross_entropy(x, t.to(x.device), label_smoothing=0.1) * 1024.0,
        [x, t], grad_inputs=[0], name=f"{backend} 257x{C} bf16", face=("cross_entropy", backend), reduction=(C, 257))
