"""GPU checks of the cross-entropy family (CUDA C++ and Triton faces): bf16/fp16/fp32 against the
correctness rule, element offsets beyond 2^31 through a strided view, the device-side assert for
out-of-range targets (in a subprocess: a device assert poisons the CUDA context), the fused
losses, and CUDA-graph capture. All marked ``cuda``: skipped on machines without a GPU."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast import dispatch, testing

pytestmark = pytest.mark.cuda


def _faces(op="cross_entropy", dtype=torch.bfloat16):
    if not torch.cuda.is_available():
        return ["cuda", "triton"]  # collected only; skipped by conftest
    return [b for b in ("cuda", "triton") if dispatch.availability(op, b, "cuda", dtype) is None]


@pytest.mark.parametrize("backend", _faces())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N,C", [(1, 7), (113, 1000), (4096, 30522), (577, 197)])
def test_rule_gpu(backend, dtype, N, C):
    gen = torch.Generator().manual_seed(N + C)
    x = (torch.randn(N, C, generator=gen) * 3).to(dtype).cuda()
    t = torch.randint(0, C, (N,), generator=gen)
    t[torch.rand(N, generator=gen) < 0.3] = -100
    if N > 1:
        t[0] = 1
    t = t.cuda()
    w = (torch.rand(C, generator=gen) + 0.5).cuda()
    for reduction in ("mean", "none"):
        for eps, weight in ((0.0, None), (0.1, w)):
            testing.check_op(
                lambda x, t: mmfast.ops.cross_entropy(x, t, weight=weight, label_smoothing=eps, reduction=reduction,
                                                      backend=backend),
                lambda x, t: F.cross_entropy(x, t.to(x.device), weight=None if weight is None else
                                             weight.to(x.device, x.dtype), label_smoothing=eps, reduction=reduction),
                [x, t], grad_inputs=[0], name=f"{backend} {N}x{C} {dtype} {reduction} {eps}",
                reduction=(C,) if reduction == "none" else (C, N), face=("cross_entropy", backend))


@pytest.mark.parametrize("backend", _faces())
def test_int64_offsets_strided_view(backend):
    """N * row_stride and N * C beyond 2^31 elements: the logits are the first C columns of a wider
    buffer; only the last rows are compared (they live beyond the 2^31-element boundary)."""
    N, C, S = 70_400, 30_522, 32_768  # N*S = 2.3e9 > 2^31, N*C = 2.15e9 > 2^31
    base = torch.empty(N, S, dtype=torch.bfloat16, device="cuda")
    base.normal_()
    x = base[:, :C]
    t = torch.randint(0, C, (N,), device="cuda")
    loss = mmfast.ops.cross_entropy(x, t, reduction="none", backend=backend)
    tail = slice(N - 3, N)
    ref = F.cross_entropy(x[tail].double(), t[tail], reduction="none")
    torch.testing.assert_close(loss[tail].double(), ref, rtol=2e-2, atol=2e-2)
    xg = x.detach().requires_grad_(True)
    out = mmfast.ops.cross_entropy(xg, t, reduction="sum", backend=backend)
    (g,) = torch.autograd.grad(out, xg)
    xr = x[tail].double().requires_grad_(True)
    (gr,) = torch.autograd.grad(F.cross_entropy(xr, t[tail], reduction="sum"), xr)
    torch.testing.assert_close(g[tail].double(), gr, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("backend", _faces())
def test_out_of_range_target_device_assert(backend):
    code = textwrap.dedent(f"""
        import torch, mmfast
        x = torch.randn(8, 11, device="cuda")
        t = torch.randint(0, 11, (8,), device="cuda")
        t[5] = 11
        loss = mmfast.ops.cross_entropy(x, t, backend="{backend}")
        torch.cuda.synchronize()
        print("FINITE" if torch.isfinite(loss).item() else "NONFINITE")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "CUDA_LAUNCH_BLOCKING": "1"})
    assert r.returncode != 0, f"no error for an out-of-range target: {r.stdout}"
    assert "FINITE" not in r.stdout
    assert "assert" in r.stderr.lower() or "target" in r.stderr


@pytest.mark.parametrize("backend", _faces("linear_cross_entropy"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_ce_gpu(backend, dtype):
    gen = torch.Generator().manual_seed(7)
    N, H, V = 64 * 40, 768, 30522
    h = torch.randn(N, H, generator=gen).to(dtype).cuda()
    W = (torch.randn(V, H, generator=gen) / H ** 0.5).to(dtype).cuda()
    b = torch.randn(V, generator=gen).to(dtype).cuda()
    t = torch.randint(0, V, (N,), generator=gen)
    t[torch.rand(N, generator=gen) > 0.15] = -100
    t = t.cuda()
    testing.check_op(lambda h, W, t, b: mmfast.ops.linear_cross_entropy(h, W, t, b, backend=backend),
                     lambda h, W, t, b: F.cross_entropy(F.linear(h, W, b), t.to(h.device)),
                     [h, W, t, b], grad_inputs=[0, 1, 3], name=f"lce {backend} {dtype}", reduction=(H, V, N),
                     face=("linear_cross_entropy", backend))


@pytest.mark.parametrize("backend", _faces("contrastive_loss"))
@pytest.mark.parametrize("N", [4096, 8192])
def test_contrastive_gpu(backend, N):
    gen = torch.Generator().manual_seed(N)
    i = F.normalize(torch.randn(N, 512, generator=gen), dim=1).to(torch.bfloat16).cuda()
    t = F.normalize(torch.randn(N, 512, generator=gen), dim=1).to(torch.bfloat16).cuda()
    s = torch.tensor(14.3, device="cuda")
    testing.check_op(lambda i, t, s: mmfast.ops.contrastive_loss(i, t, s, label_smoothing=0.1, backend=backend),
                     lambda i, t, s: mmfast.reference.contrastive_loss(i, t, s.to(i.dtype), label_smoothing=0.1),
                     [i, t, s], grad_inputs=[0, 1, 2], name=f"contrastive {backend} N={N}",
                     reduction=(512, N, N), face=("contrastive_loss", backend))


@pytest.mark.parametrize("backend", _faces())
def test_cuda_graph_capture(backend):
    """No host synchronisation: cross_entropy and linear_cross_entropy (which skips its row
    compaction while capturing) can be captured in a CUDA graph and replayed."""
    x = torch.randn(256, 1000, device="cuda")
    t = torch.randint(0, 1000, (256,), device="cuda")
    t[::3] = -100
    h = torch.randn(256, 64, device="cuda")
    W = torch.randn(1000, 64, device="cuda") / 8
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (compiles the kernels) outside the capture
        mmfast.ops.cross_entropy(x, t, backend=backend)
        mmfast.ops.linear_cross_entropy(h, W, t, backend=backend)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        a = mmfast.ops.cross_entropy(x, t, backend=backend)
        b = mmfast.ops.linear_cross_entropy(h, W, t, backend=backend)
    x.normal_()
    h.normal_()
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(a, F.cross_entropy(x, t), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b, F.cross_entropy(h @ W.t(), t), rtol=1e-3, atol=1e-3)
