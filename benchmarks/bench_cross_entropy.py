"""The softmax cross-entropy family vs eager PyTorch and Liger-Kernel (when installed):
forward and forward+backward, peak extra memory.

Cases (the issue's targets, bf16 on a GPU):
  cross_entropy          N=16384, V=30522 (BERT vocabulary)      target: >= 3x eager fwd+bwd, <= 0.4x memory
  linear_cross_entropy   MLM head: 64*40 tokens, 15 % masked, H=768, V=30522; eager = F.linear + CE
                         (what HF's BertLMPredictionHead decoder + loss does)   target: >= 3x, <= 0.2x memory
  contrastive_loss       N=4096, D=512 (CLIP)                     target: >= 2x eager
GB/s for cross_entropy counts the bytes that must move (read the logits once; with the gradient,
also write it once); TFLOP/s for the fused losses counts their matmuls (for linear_cross_entropy
only the non-ignored rows, which is all the work that is needed).

    pytest benchmarks/bench_cross_entropy.py --benchmark-json=out.json
"""

import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from harness import DEVICE, bench, check_rows, device_name, pick, rotate, rule_check, versions

import mmfast
from mmfast.reference import contrastive_loss as ref_contrastive

DTYPE = pick(gpu=[torch.bfloat16], smoke=[torch.float32])[0]
CE_SHAPES = pick(gpu=[(16384, 30522), (4096, 30522)], smoke=[(64, 1000)])
LCE_SHAPES = pick(gpu=[(64 * 40, 768, 30522)], smoke=[(2 * 40, 32, 1000)])
CON_SHAPES = pick(gpu=[(4096, 512), (16384, 512)], smoke=[(64, 32)])
IMPLS = ["eager", "liger", "mmfast-triton", "mmfast-cuda", "mmfast-cpu"]
MODES = ["fwd", "fwd+bwd"]


def _liger(name):
    try:
        if name == "ce":
            from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

            return LigerCrossEntropyLoss()
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss()
    except ImportError as e:
        raise ImportError(f"liger-kernel is not installed ({e})") from e


def _mmfast_backend(impl):
    return impl.split("-", 1)[1]


def _step(make_loss_fn, impl, sets, leaves_of, mode):
    try:
        loss_fn = make_loss_fn(impl)
    except ImportError as e:
        pytest.skip(f"unavailable here: {e}")
    nxt = rotate(sets)

    def fwd():
        args = nxt()
        with torch.no_grad():
            return loss_fn(*args)

    def fwd_bwd():
        args = nxt()
        return torch.autograd.grad(loss_fn(*args), leaves_of(args))

    return fwd if mode == "fwd" else fwd_bwd


# ---- cross_entropy -----------------------------------------------------------------------------
def _ce_fn(impl):
    if impl == "eager":
        return lambda x, t: F.cross_entropy(x, t)
    if impl == "liger":
        crit = _liger("ce")
        return lambda x, t: crit(x, t)
    be = _mmfast_backend(impl)
    return lambda x, t: mmfast.ops.cross_entropy(x, t, backend=be)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N,V", CE_SHAPES)
def test_cross_entropy(benchmark, N, V, impl, mode):
    n_sets = 1 if N * V * 2 > 50e6 else 4  # beyond L2 already with one set
    sets = []
    for i in range(n_sets):
        g = torch.Generator(device=DEVICE).manual_seed(i)
        x = torch.randn(N, V, generator=g, device=DEVICE, dtype=DTYPE).requires_grad_(mode != "fwd")
        t = torch.randint(0, V, (N,), generator=g, device=DEVICE)
        t[::7] = -100
        sets.append((x, t))
    leaves = lambda a: (a[0],)
    size = torch.finfo(DTYPE).bits // 8
    fn = _step(_ce_fn, impl, sets, leaves, mode)  # skips an impl that is unavailable here
    r = check_rows(N, 256)
    check = rule_check(_ce_fn(impl), lambda x, t: F.cross_entropy(x, t), [sets[0][0][:r], sets[0][1][:r]], impl=impl,
                       op="cross_entropy", grad=mode != "fwd", reduction=(V, r), name=f"N={r},V={V}")
    bench(benchmark, fn, check=check,
          eager=_step(_ce_fn, "eager", sets, leaves, mode), op="cross_entropy", impl=impl, mode=mode,
          case=f"N={N},V={V}", dtype=DTYPE, bytes_moved=N * V * size * (1 if mode == "fwd" else 2))


# ---- linear_cross_entropy ----------------------------------------------------------------------
def _lce_fn(impl):
    if impl == "eager":
        return lambda h, W, b, t: F.cross_entropy(F.linear(h, W, b), t)
    if impl == "liger":
        crit = _liger("lce")
        return lambda h, W, b, t: crit(W, h, t, b)
    be = _mmfast_backend(impl)
    return lambda h, W, b, t: mmfast.ops.linear_cross_entropy(h, W, t, b, backend=be)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N,H,V", LCE_SHAPES)
def test_linear_cross_entropy(benchmark, N, H, V, impl, mode):
    sets = []
    for i in range(2):
        g = torch.Generator(device=DEVICE).manual_seed(i)
        need = mode != "fwd"
        h = torch.randn(N, H, generator=g, device=DEVICE, dtype=DTYPE).requires_grad_(need)
        W = (torch.randn(V, H, generator=g, device=DEVICE, dtype=DTYPE) / H ** 0.5).requires_grad_(need)
        b = torch.randn(V, generator=g, device=DEVICE, dtype=DTYPE).requires_grad_(need)
        t = torch.randint(0, V, (N,), generator=g, device=DEVICE)
        t[torch.rand(N, generator=g, device=DEVICE) > 0.15] = -100  # MLM: 15 % of tokens count
        sets.append((h, W, b, t))
    n_valid = int((sets[0][3] != -100).sum())
    flops = 2 * n_valid * V * H * (1 if mode == "fwd" else 3)
    leaves = lambda a: a[:3]
    fn = _step(_lce_fn, impl, sets, leaves, mode)  # skips an impl that is unavailable here
    h, W, b, t = sets[0]
    rows = (t != -100).nonzero().squeeze(1)[:check_rows(N, 256)]  # labelled rows: an all-ignored slice is 0/0
    check = rule_check(_lce_fn(impl), lambda h, W, b, t: F.cross_entropy(F.linear(h, W, b), t),
                       [h[rows], W, b, t[rows]], impl=impl, op="linear_cross_entropy", grad=mode != "fwd",
                       reduction=(H, V, len(rows)), name=f"N={len(rows)},H={H},V={V}")
    bench(benchmark, fn, check=check,
          eager=_step(_lce_fn, "eager", sets, leaves, mode), op="linear_cross_entropy", impl=impl, mode=mode,
          case=f"N={N},H={H},V={V},masked=15%", dtype=DTYPE, flops=flops)


# ---- contrastive_loss --------------------------------------------------------------------------
def _con_fn(impl):
    if impl == "eager":
        return lambda i, t, s: ref_contrastive(i, t, s)
    if impl == "liger":
        raise ImportError("Liger-Kernel has no contrastive loss")
    be = _mmfast_backend(impl)
    return lambda i, t, s: mmfast.ops.contrastive_loss(i, t, s, backend=be)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N,D", CON_SHAPES)
def test_contrastive_loss(benchmark, N, D, impl, mode):
    sets = []
    for k in range(2):
        g = torch.Generator(device=DEVICE).manual_seed(k)
        need = mode != "fwd"
        i = F.normalize(torch.randn(N, D, generator=g, device=DEVICE), dim=1).to(DTYPE).requires_grad_(need)
        t = F.normalize(torch.randn(N, D, generator=g, device=DEVICE), dim=1).to(DTYPE).requires_grad_(need)
        s = torch.tensor(14.3, device=DEVICE, dtype=DTYPE).requires_grad_(need)
        sets.append((i, t, s))
    flops = 2 * N * N * D * (1 if mode == "fwd" else 3)
    leaves = lambda a: a
    fn = _step(_con_fn, impl, sets, leaves, mode)  # skips an impl that is unavailable here
    r = check_rows(N, 512)
    i, t, s = sets[0]
    check = rule_check(_con_fn(impl), ref_contrastive, [i[:r], t[:r], s], impl=impl, op="contrastive_loss",
                       grad=mode != "fwd", reduction=(D, r, r), name=f"N={r},D={D}")
    bench(benchmark, fn, check=check,
          eager=_step(_con_fn, "eager", sets, leaves, mode), op="contrastive_loss", impl=impl, mode=mode,
          case=f"N={N},D={D}", dtype=DTYPE, flops=flops)


# ---- the CPU target: C++ cross_entropy vs eager, N=4096, V=30522 float32, fwd+bwd ----------------
@pytest.mark.skipif(os.environ.get("MMFAST_BENCH_CPU_TARGET") != "1",
                    reason="opt-in (30 s): MMFAST_BENCH_CPU_TARGET=1")
def test_cross_entropy_cpu_target(benchmark):
    """The issue's CPU target (>= 1.5x eager). Interleaved repetitions in one process, median of 7,
    with the machine's default thread count; the logits are a leaf, so both sides also pay for
    creating the gradient tensor."""
    N, V = 4096, 30522
    x = torch.randn(N, V, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[::7] = -100
    runs = {"eager": lambda: torch.autograd.grad(F.cross_entropy(x, t), x),
            "mmfast-cpu": lambda: torch.autograd.grad(mmfast.ops.cross_entropy(x, t, backend="cpu"), x)}
    times = {k: [] for k in runs}
    for f in runs.values():
        f()
    for _ in range(7):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    benchmark.extra_info.update({"device": device_name(), **versions(), "op": "cross_entropy", "impl": "mmfast-cpu",
                                 "mode": "fwd+bwd", "case": f"N={N},V={V}", "dtype": "float32",
                                 "threads": torch.get_num_threads(), "median_ms": med["mmfast-cpu"],
                                 "eager_ms": med["eager"], "ratio_to_eager": med["eager"] / med["mmfast-cpu"]})
    benchmark.pedantic(runs["mmfast-cpu"], rounds=1, iterations=1)
