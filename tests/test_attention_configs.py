"""Triton attention launch configs are static: a user call reads the table (or the heuristic
default) and never times anything; only the offline tuner (MMFAST_TUNE=1) does. On a GPU,
forward+backward capture into a CUDA graph (timing or synchronising inside would break capture),
and tensors on a GPU other than the current one launch on their own GPU."""

import json
import subprocess
import sys

import pytest
import torch

from mmfast.ops.attention import attention

T = pytest.importorskip("mmfast.triton.attention")


def _inputs(B=1, H=2, Lq=9, Lk=21, D=32, device="cpu", dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(0)
    mk = lambda L: torch.randn(B, H, L, D, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
    return mk(Lq), mk(Lk), mk(Lk)


@pytest.fixture
def bench_calls(monkeypatch):
    """Counts triton.testing.do_bench calls (a fake that times nothing)."""
    import triton.testing

    calls = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup=0, rep=0, **kw: calls.append(fn) or 1.0)
    monkeypatch.setattr(T, "_tuned", {})
    return calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test")
@pytest.mark.parametrize("tune", [None, "1"])
def test_no_benchmark_call_in_ops_attention(monkeypatch, bench_calls, tune):
    """As on a GPU (the Triton module is told it is not interpreting): without MMFAST_TUNE no
    do_bench call happens in forward+backward; with MMFAST_TUNE=1 (the offline tuner) it does,
    which shows the counter sees them."""
    from types import SimpleNamespace

    monkeypatch.setattr(T, "dispatch", SimpleNamespace(triton_interpreting=lambda: False))
    if tune:
        monkeypatch.setenv("MMFAST_TUNE", tune)
    else:
        monkeypatch.delenv("MMFAST_TUNE", raising=False)
    q, k, v = _inputs()
    for dropout_p in (0.0, 0.2):
        attention(q, k, v, causal=True, dropout_p=dropout_p, backend="triton").sum().backward()
    if tune:
        assert len(bench_calls) > 0
    else:
        assert bench_calls == []


def test_autotuning_only_under_mmfast_tune(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(T, "dispatch", SimpleNamespace(triton_interpreting=lambda: False))
    monkeypatch.delenv("MMFAST_TUNE", raising=False)
    assert not T._autotuning()
    monkeypatch.setenv("MMFAST_ATTN_AUTOTUNE", "1")  # the old on-the-fly switch does nothing now
    assert not T._autotuning()
    monkeypatch.setenv("MMFAST_TUNE", "1")
    assert T._autotuning()


def test_table_entry_is_what_a_call_launches(monkeypatch, tmp_path):
    """A table entry for (arch, key) is the first candidate, i.e. the launched config; other keys
    and architectures fall back to the heuristic default."""
    key = T.table_key(torch.bfloat16, 64, 64, False, True)
    fwd, bwd = T._cfg(64, 32, 4, 2), T._cfg(32, 32, 4, 1)
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"sm_90": {key: {"fwd": fwd, "bwd": bwd}}}))
    monkeypatch.setattr(T, "TABLE_PATH", path)
    T.config_table.cache_clear()
    try:
        assert T.fwd_configs(40, 197, 64, torch.bfloat16, False, True, "sm_90")[0] == fwd
        assert T.bwd_configs(40, 197, 64, torch.bfloat16, False, True, "sm_90")[0] == bwd
        default = T._default_fwd(torch.bfloat16, 64, 64, True)
        assert T.fwd_configs(40, 197, 64, torch.bfloat16, False, True, "sm_80")[0] == default
        assert T.fwd_configs(40, 197, 64, torch.bfloat16, False, True, None)[0] == default
        assert T.fwd_configs(40, 197, 64, torch.bfloat16, True, True, "sm_90")[0] == T._default_fwd(
            torch.bfloat16, 64, 64, True)
    finally:
        T.config_table.cache_clear()


def test_every_key_has_a_valid_config():
    """Each (dtype, D block, Lq bucket, causal, dropout) resolves to block sizes the kernels accept:
    powers of two >= 16 (tl.dot), BLOCK_N a multiple of 4 (one Philox call per 4 columns), BLOCK_M
    no larger than needed for the bucket."""
    for dtype in T.DTYPES:
        for bd in T.HEAD_DIM_BLOCKS:
            for lqb in T.LQ_BUCKETS:
                for causal in (False, True):
                    for dropout in (False, True):
                        for d in ("fwd", "bwd"):
                            c = T.static_config(d, "sm_90", dtype, bd, lqb, causal, dropout)
                            for b in ("BLOCK_M", "BLOCK_N"):
                                assert c[b] >= 16 and c[b] & (c[b] - 1) == 0, (d, c)
                            assert c["BLOCK_M"] <= max(lqb, 16) and c["num_warps"] in (4, 8), (d, c)
    assert [T.lq_bucket(n) for n in (1, 32, 33, 64, 65, 577)] == [32, 32, 64, 64, 128, 128]


def test_launches_convention_covers_the_dispatch_space():
    """launches() (what kernels-report compiles) lists every kernel for every dtype, D block, flag
    combination, each with the config a call gets."""
    kname = lambda kernel: getattr(kernel, "__name__", None) or kernel.fn.__name__  # jit or interpreted
    rows = list(T.launches("sm_90"))  # arguments on the meta device: also fine under the interpreter
    kinds = {(kname(r.kernel), r.dtype) for r in rows}
    for name in ("_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        for dt in ("float16", "bfloat16", "float32"):
            assert (name, dt) in kinds, (name, dt)
    fwd16 = [r for r in rows if r.dtype == "float16" and kname(r.kernel) == "_attn_fwd_kernel"]
    assert len(fwd16) == len(T.HEAD_DIM_BLOCKS) * len(T.LQ_BUCKETS) * 8
    assert any("dropout" in r.config and "mask" in r.config and "causal" in r.config for r in fwd16)


def test_tuner_refuses_without_gpu_or_flag():
    r = subprocess.run([sys.executable, "-m", "mmfast.tune"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
    assert r.returncode == 2 and "MMFAST_TUNE=1" in r.stderr


@pytest.mark.cuda
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_gpu_forward_backward_capture_into_cuda_graph(dropout_p):
    """Forward+backward of the Triton face inside torch.cuda.graph: no timing, no host sync. The
    replay (dropout off) equals an eager run; with dropout the replay runs and is finite."""
    q, k, v = _inputs(2, 4, 40, 197, 64, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(2, 197, dtype=torch.bool, device="cuda")
    mask[1, 150:] = False
    gout = torch.randn(2, 4, 40, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        out = attention(q, k, v, key_padding_mask=mask, dropout_p=dropout_p, backend="triton")
        out.backward(gout)
        return out

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up: compiles outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    for t in (q, k, v):
        t.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    g.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    if dropout_p == 0:
        captured = (out.clone(), q.grad.clone(), k.grad.clone(), v.grad.clone())
        for t in (q, k, v):
            t.grad = None
        eager = step()
        torch.testing.assert_close(captured[0], eager)
        for a, t in zip(captured[1:], (q, k, v)):
            torch.testing.assert_close(a, t.grad)


@pytest.mark.cuda
def test_gpu_launch_on_the_tensors_device():
    """Device guard: tensors on cuda:1 while cuda:0 is current give the same result as on cuda:0."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    q, k, v = _inputs(1, 2, 40, 64, 64, device="cuda:0", dtype=torch.float16, grad=False)
    ref = attention(q, k, v, backend="triton")
    with torch.cuda.device(0):
        out = attention(q.to("cuda:1"), k.to("cuda:1"), v.to("cuda:1"), backend="triton")
    torch.testing.assert_close(out.cpu(), ref.cpu())


def test_auto_sends_gpu_float32_to_the_reference_but_explicit_triton_stays(monkeypatch):
    """fp32 Triton attention on a GPU: backend='auto' resolves to the reference; backend='triton'
    is not blocked. (Resolved for device type "cuda" without a GPU, with MMFAST_TRUST_UNVERIFIED=1 so
    that safe auto would take the Triton face where nothing rules it out.)"""
    import mmfast.dispatch as dispatch
    from mmfast.ops.attention import _unsupported

    monkeypatch.setenv("MMFAST_TRUST_UNVERIFIED", "1")
    dispatch.refresh()
    try:
        auto = _unsupported("cuda", torch.float32, 64, "auto")
        assert dispatch.resolve("attention", "auto", "cuda", torch.float32, auto) == "torch"
        assert dispatch.resolve("attention", "auto", "cuda", torch.float32, ()) == "triton"
        assert dispatch.resolve("attention", "triton", "cuda", torch.float32,
                                _unsupported("cuda", torch.float32, 64, "triton")) == "triton"
        assert dispatch.resolve("attention", "auto", "cuda", torch.float16,
                                _unsupported("cuda", torch.float16, 64, "auto")) == "triton"
    finally:
        monkeypatch.delenv("MMFAST_TRUST_UNVERIFIED")
        dispatch.refresh()
