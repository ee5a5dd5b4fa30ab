"""Safe ``auto`` on a GPU: a face runs only where kernel_table.json records it verified for (op, arch,
dtype) and measured faster than the torch reference in the call's size bucket; otherwise the reference.
Tested on the CPU by pointing dispatch at a table written here and pretending the GPU is sm_90."""

import json
import subprocess
import sys

import pytest
import torch

import mmfast
from mmfast import dispatch

BF16 = torch.bfloat16
_b = dispatch.size_bucket


def _row(op="cross_entropy", backend="triton", dtype="bfloat16", verified=True, **speed):
    return {"op": op, "backend": backend, "arch": "sm_90", "dtype": dtype, "verified": verified,
            "speedup_vs_reference": speed}


@pytest.fixture
def table(tmp_path, monkeypatch):
    """Writes the given rows as kernel_table.json and makes dispatch read it on an 'sm_90 GPU'."""
    path = tmp_path / "kernel_table.json"
    monkeypatch.setattr(dispatch, "_TABLE_PATH", path)
    monkeypatch.setattr(dispatch, "_gpu_arch", lambda device_type: "sm_90" if device_type == "cuda" else None)
    monkeypatch.delenv("MMFAST_TRUST_UNVERIFIED", raising=False)
    has_cuda_kernel = {"on": False}
    real = dispatch._extension.has_kernel
    monkeypatch.setattr(dispatch._extension, "has_kernel",
                        lambda name, key: has_cuda_kernel["on"] if key == "CUDA" else real(name, key))

    def write(*rows, cuda_kernels=False):
        path.write_text(json.dumps({"description": "test", "verified": list(rows)}))
        has_cuda_kernel["on"] = cuda_kernels
        dispatch.refresh()

    yield write
    dispatch.refresh()  # drop what was cached from the test's table (the fixture undoes the patches first)


def test_empty_table_means_the_reference_everywhere(table):
    table()
    for op in dispatch.op_names():
        for dt in (torch.float16, BF16, torch.float32):
            assert dispatch.resolve(op, "auto", "cuda", dt) == "torch", (op, dt)
    backend, why = dispatch.explain("cross_entropy", "cuda", BF16)
    assert backend == "torch" and "never verified on sm_90/bfloat16" in why


def test_verified_and_faster_face_is_used_only_in_its_bucket(table):
    table(_row(medium=1.8, large=0.7))
    assert dispatch.resolve("cross_entropy", "auto", "cuda", BF16, bucket=_b(4096 * 4096)) == "triton"  # medium
    assert dispatch.resolve("cross_entropy", "auto", "cuda", BF16, bucket=_b(16384 * 30522)) == "torch"  # large: slower
    assert dispatch.resolve("cross_entropy", "auto", "cuda", BF16, bucket=_b(100)) == "torch"  # small: never timed
    # no size given: the face must win in every bucket that was measured
    assert dispatch.resolve("cross_entropy", "auto", "cuda", BF16) == "torch"
    _, why = dispatch.explain("cross_entropy", "cuda", BF16, bucket="large")
    assert "0.70x the reference for large inputs" in why
    # other dtypes and other archs were not verified
    assert dispatch.resolve("cross_entropy", "auto", "cuda", torch.float16, bucket=_b(4096 * 4096)) == "torch"


def test_failed_check_is_never_used_however_fast(table):
    table(_row(verified=False, medium=5.0, large=5.0))
    assert dispatch.resolve("cross_entropy", "auto", "cuda", BF16, bucket=_b(4096 * 4096)) == "torch"
    assert "failed the GPU check" in dispatch.explain("cross_entropy", "cuda", BF16, bucket="medium")[1]


def test_fastest_verified_face_wins(table):
    table(_row(backend="triton", large=1.5), _row(backend="cuda", large=2.5), cuda_kernels=True)
    assert dispatch.resolve("cross_entropy", "auto", "cuda", BF16, bucket=_b(1 << 30)) == "cuda"
    table(_row(backend="triton", large=3.0), _row(backend="cuda", large=2.5), cuda_kernels=True)
    assert dispatch.resolve("cross_entropy", "auto", "cuda", BF16, bucket=_b(1 << 30)) == "triton"
    # a verified CUDA row does not help if this build has no CUDA kernel for the op
    table(_row(backend="cuda", large=2.5), cuda_kernels=False)
    assert dispatch.resolve("cross_entropy", "auto", "cuda", BF16, bucket=_b(1 << 30)) == "torch"


def test_dtype_a_face_does_not_take_falls_back_but_explicit_raises(table):
    # attention's CUDA face takes fp16/bf16 only: a verified fp32 row cannot make auto use it
    table(_row(op="attention", backend="cuda", dtype="float32", large=9.0), cuda_kernels=True)
    assert dispatch.resolve("attention", "auto", "cuda", torch.float32, bucket=_b(1 << 30)) == "torch"
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable.*float32"):
        dispatch.resolve("attention", "cuda", "cuda", torch.float32)


def test_argument_limits_fall_back_under_auto(table):
    table(_row(op="attention", backend="triton", large=2.0))
    assert dispatch.resolve("attention", "auto", "cuda", BF16, bucket=_b(1 << 30)) == "triton"
    blocked = (("triton", "head dim 12 is not a multiple of 8"),)
    assert dispatch.resolve("attention", "auto", "cuda", BF16, blocked, bucket=_b(1 << 30)) == "torch"
    with pytest.raises(RuntimeError, match="head dim 12"):
        dispatch.resolve("attention", "triton", "cuda", BF16, blocked)


@pytest.fixture
def deterministic():
    """Sets torch.use_deterministic_algorithms for the test and restores it."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield lambda on, warn_only=False: torch.use_deterministic_algorithms(on, warn_only=warn_only)
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_deterministic_mode_keeps_auto_off_the_cuda_attention_face(table, deterministic):
    """The CUDA attention backward sums dQ with float atomics (the H200 check saw replays differ by
    1 ulp): under torch.use_deterministic_algorithms(True) auto takes the next face."""
    from mmfast.ops.attention import _unsupported

    table(_row(op="attention", backend="cuda", large=3.0), _row(op="attention", backend="triton", large=1.5),
          cuda_kernels=True)
    pick = lambda: dispatch.resolve("attention", "auto", "cuda", BF16, _unsupported("cuda", BF16, 64, "auto"),
                                    bucket=_b(1 << 30))
    assert pick() == "cuda"
    deterministic(True)
    assert pick() == "triton"
    deterministic(True, warn_only=True)  # non-deterministic kernels only warn: the faster face stays
    assert pick() == "cuda"
    deterministic(True)
    table(_row(op="attention", backend="cuda", large=3.0), cuda_kernels=True)
    backend, why = dispatch.explain("attention", "cuda", BF16, _unsupported("cuda", BF16, 64, "auto"), bucket="large")
    assert backend == "torch" and "float atomics" in why, why  # mmfast info says why
    assert _unsupported("cuda", BF16, 64, "cuda") == ()  # an explicit backend is not overridden...


def test_explicit_cuda_attention_backward_alerts_in_deterministic_mode(deterministic, monkeypatch):
    """...its backward raises as torch's own non-deterministic kernels do, before any kernel runs."""
    attention_op = sys.modules["mmfast.ops.attention"]  # the module (mmfast.ops.attention is the function)
    ran = []
    monkeypatch.setattr(attention_op, "_face", lambda backend: (None, lambda *a: ran.append(backend)))
    deterministic(True)
    with pytest.raises(RuntimeError, match="mmfast.attention backward with backend='cuda'"):
        attention_op._run_backward("cuda", None)
    assert ran == []
    attention_op._run_backward("triton", None)  # the Triton backward has no atomics
    deterministic(True, warn_only=True)
    with pytest.warns(UserWarning, match="float atomics"):
        attention_op._run_backward("cuda", None)
    deterministic(False)
    attention_op._run_backward("cuda", None)
    assert ran == ["triton", "cuda", "cuda"]


def test_attention_head_dim_the_faces_do_not_take_runs_the_reference_under_auto():
    q, k, v = (torch.randn(1, 2, L, 12) for L in (3, 5, 5))
    torch.testing.assert_close(mmfast.ops.attention(q, k, v), mmfast.reference.attention(q, k, v))
    with pytest.raises(ValueError, match="multiple of 8"):
        mmfast.ops.attention(q, k, v, backend="cpu")


def test_trust_unverified_restores_triton_first(table, monkeypatch):
    table()
    monkeypatch.setenv("MMFAST_TRUST_UNVERIFIED", "1")
    dispatch.refresh()
    backend, why = dispatch.explain("cross_entropy", "cuda", BF16)
    assert backend == "triton" and "MMFAST_TRUST_UNVERIFIED" in why
    # and the CUDA face goes first where the table has it verified and at least as fast as Triton
    table(_row(backend="cuda", large=2.0), _row(backend="triton", large=1.0), cuda_kernels=True)
    assert dispatch.resolve("cross_entropy", "auto", "cuda", BF16) == "cuda"


def test_cpu_auto_is_unchanged(table):
    table(_row(backend="triton", large=9.0))
    want = "cpu" if dispatch.availability("cross_entropy", "cpu", "cpu", torch.float32) is None else "torch"
    assert dispatch.resolve("cross_entropy", "auto", "cpu", torch.float32, bucket=_b(1 << 30)) == want


def test_resolve_stays_cached_and_a_compile_constant(table):
    table(_row(medium=1.8))
    dispatch.resolve("cross_entropy", "auto", "cuda", BF16, bucket=_b(5000 * 5000))
    hits = dispatch._explain.cache_info().hits
    dispatch.resolve("cross_entropy", "auto", "cuda", BF16, bucket=_b(5001 * 5000))  # same bucket: a cache hit
    assert dispatch._explain.cache_info().hits == hits + 1
    assert getattr(dispatch.resolve, "_dynamo_marked_constant", False) is True


def test_auto_under_compile_with_dynamic_shapes():
    """The size bucket is computed at the call site: a symbolic size becomes a guard, and resolve()
    stays a constant to torch.compile (no graph break under fullgraph)."""
    f = torch.compile(lambda x, t: mmfast.ops.cross_entropy(x, t), fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (5, 9, 2000):
        x, t = torch.randn(n, 700), torch.randint(0, 700, (n,))
        torch.testing.assert_close(f(x, t), torch.nn.functional.cross_entropy(x, t))


def test_info_says_what_auto_picks_and_why(table):
    table()
    info = mmfast.backends()
    for op, entry in info["ops"].items():
        assert set(entry["auto"]) == set(entry["auto_why"]), op
        assert all(entry["auto_why"].values()), op
    out = subprocess.run([sys.executable, "-m", "mmfast", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "auto     cpu/float32 -> " in out.stdout and ": " in out.stdout.split("auto     cpu/float32 -> ")[1]


def test_import_stays_light():
    """Safe auto reads its table lazily: `import mmfast` loads neither triton, dynamo nor transformers."""
    code = ("import sys, mmfast; heavy = [m for m in ('triton', 'torch._dynamo', 'transformers', 'timm') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


@pytest.mark.parametrize("Lq,Lk,causal,masked", [(7, 13, False, True), (13, 5, True, True), (9, 9, True, False),
                                                 (5, 11, True, False), (6, 6, False, False)])
def test_gpu_reference_sdpa_has_mmfast_semantics(Lq, Lk, causal, masked):
    """What auto falls back to on a GPU (SDPA) equals the eager reference: bottom-right causal, rows
    without keys give zeros and zero gradients. Float64 on the CPU, forward and gradients."""
    from mmfast.reference.attention import sdpa_attention

    g = torch.Generator().manual_seed(Lq * Lk)
    q, k, v = (torch.randn(2, 3, L, 16, generator=g, dtype=torch.float64, requires_grad=True) for L in (Lq, Lk, Lk))
    mask = None
    if masked:
        mask = torch.rand(2, Lk, generator=g) > 0.4
        mask[1] = False  # a sequence with no keys at all
    outs = [f(q, k, v, key_padding_mask=mask, causal=causal) for f in (sdpa_attention, mmfast.reference.attention)]
    torch.testing.assert_close(outs[0], outs[1])
    up = torch.randn(outs[0].shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(outs[0], (q, k, v), up), torch.autograd.grad(outs[1], (q, k, v), up)):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
def test_torch_backend_on_gpu_runs_sdpa():
    from mmfast.reference.attention import sdpa_attention

    q, k, v = (torch.randn(2, 4, L, 64, device="cuda", dtype=BF16) for L in (40, 197, 197))
    mask = torch.arange(197, device="cuda")[None] < torch.tensor([[197], [50]], device="cuda")
    assert torch.equal(mmfast.ops.attention(q, k, v, key_padding_mask=mask, backend="torch"),
                       sdpa_attention(q, k, v, key_padding_mask=mask))


def test_cpu_auto_takes_a_face_only_in_the_buckets_it_was_measured_faster():
    """contrastive_loss's cpu face measured slower than the reference below N = 8192 on the CPU:
    auto takes the reference there (and says why), the cpu face for tiled sizes, and an explicit
    backend="cpu" still runs the face."""
    import mmfast
    from mmfast import testing

    for bucket in ("small", "medium", None):
        be, why = dispatch.explain("contrastive_loss", "cpu", torch.float32, bucket=bucket)
        assert be == "torch" and "measured" in why, (bucket, be, why)
    assert dispatch.resolve("contrastive_loss", "auto", "cpu", torch.float32, bucket="large") == "cpu"
    img, txt = testing.randn(6, 8, seed=1), testing.randn(6, 8, seed=2)
    with testing.faces_run() as ran:
        mmfast.ops.contrastive_loss(img, txt, torch.tensor(2.0))
        mmfast.ops.contrastive_loss(img, txt, torch.tensor(2.0), backend="cpu")
    assert ran[("contrastive_loss", "torch", "forward")] == 1 and ran[("contrastive_loss", "cpu", "forward")] == 1
    # every other op keeps its cpu face in every bucket
    assert all(dispatch.resolve(op, "auto", "cpu", torch.float32, bucket="small") == "cpu"
               for op in ("cross_entropy", "concat_embed", "attention"))


@pytest.mark.parametrize("shape,face", [((16, 2), "torch"), ((8191, 2), "torch"), ((128, 1000), "torch"),
                                        ((2, 65535), "torch"), ((16384, 2), "cpu"), ((2, 65536), "cpu"),
                                        ((132, 1000), "cpu"), ((7, 30522), "cpu")])
def test_cpu_auto_runs_the_cross_entropy_reference_for_tiny_calls(shape, face):
    """Below N x C = 2^17 with N < 2^14 rows the fused CPU call's fixed cost outweighs its kernel
    (measured: cpu_auto_why): auto runs the reference there and the cpu face from either bound on,
    forward and backward; backend="cpu" runs the face at any size, and `mmfast info` lists both."""
    from mmfast import testing

    logits = testing.randn(*shape, seed=3).requires_grad_()
    target = torch.randint(0, shape[1], shape[:1])
    with testing.faces_run() as ran:
        mmfast.ops.cross_entropy(logits, target).backward()
    testing.assert_face_ran(ran, "cross_entropy", face)
    with testing.faces_run() as ran:
        mmfast.ops.cross_entropy(logits, target, backend="cpu").backward()
    testing.assert_face_ran(ran, "cross_entropy", "cpu")
    choices = dispatch.auto_choices("cross_entropy")
    assert choices["cpu/float32/reference-faster"][0] == "torch" and "2^17" in choices["cpu/float32/reference-faster"][1]
    assert choices["cpu/float32"][0] == choices["cpu/float32/small"][0] == "cpu"


@pytest.mark.parametrize("layer_norm,dropout_p,face", [(False, 0.0, "torch"), (True, 0.0, "cpu"), (False, 0.1, "cpu"),
                                                       (True, 0.1, "cpu")])
def test_cpu_auto_runs_the_concat_embed_reference_without_layer_norm_and_dropout(layer_norm, dropout_p, face):
    """Adds and a cat alone measured faster in eager (its backward passes feature gradients on as
    views): auto runs the reference for them on the CPU, the cpu face once LayerNorm or dropout is
    fused in; backend="cpu" runs the face either way."""
    from mmfast import testing

    feats = [testing.randn(2, L, 16, seed=L).requires_grad_() for L in (3, 5)]
    ln = dict(ln_weight=torch.ones(16), ln_bias=torch.zeros(16)) if layer_norm else {}
    for backend, expected in (("auto", face), ("cpu", "cpu")):
        with testing.faces_run() as ran:
            out, _ = mmfast.ops.concat_embed(feats, type_embeddings=torch.zeros(2, 16), dropout_p=dropout_p,
                                             backend=backend, **ln)
            out.sum().backward()
        testing.assert_face_ran(ran, "concat_embed", expected)
    why = dispatch.auto_choices("concat_embed")["cpu/float32/reference-faster"]
    assert why[0] == "torch" and "LayerNorm" in why[1]
