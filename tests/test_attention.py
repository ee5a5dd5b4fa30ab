"""mmfast.ops.attention: every face against the float64 reference by the correctness rule
(mmfast.testing), forward and all three gradients; dropout reproducibility and consistency of the
backward with the forward's mask; argument errors; opcheck; torch.compile.

On the CPU the Triton face runs in the interpreter, which is slow: it gets a designed subset that
covers every shape, every head dim, mask/causal on and off and both dtypes at least once; the CPU
face takes the full matrix. The GPU matrix (fp16/bf16, both GPU faces) runs under the cuda marker.
"""

import pytest
import torch

import mmfast
from mmfast import reference as R
from mmfast import testing
from mmfast.ops.attention import attention
from mmfast.reference.attention import attention_mask

SHAPES = [(1, 1), (7, 197), (40, 197), (197, 40), (113, 203), (577, 577)]


def make_inputs(B, H, Lq, Lk, D, dtype, device="cpu", mask=False, noncontig=False, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(L):
        if noncontig:  # a (B, L, H, D) tensor seen as (B, H, L, D), as projections produce it
            return torch.randn(B, L, H, D, generator=gen).to(dtype=dtype, device=device).transpose(1, 2)
        return torch.randn(B, H, L, D, generator=gen).to(dtype=dtype, device=device)

    q, k, v = rnd(Lq), rnd(Lk), rnd(Lk)
    m = None
    if mask:
        m = torch.rand(B, Lk, generator=gen) > 0.3  # ~30 % padding, not at the end only
        m[0, 0] = True
        if B > 1:
            m[-1] = False  # a batch row with every key padded: its rows must give zeros
        m = m.to(device)
    return q, k, v, m


def attention_reduction(q, k):
    """Reductions behind one output or gradient element: the scores' dot products over D, then the
    weighted sums over the keys (output, dq) or the queries (dk, dv)."""
    return (max(q.shape[2], k.shape[2]), q.shape[3])


def check(backend, B, H, Lq, Lk, D, dtype, mask, causal, device="cpu", noncontig=False, scale=None):
    q, k, v, m = make_inputs(B, H, Lq, Lk, D, dtype, device, mask, noncontig)
    if noncontig and Lq > 1 and H > 1:
        assert not q.is_contiguous()
    testing.check_op(
        lambda q, k, v, m: attention(q, k, v, key_padding_mask=m, causal=causal, scale=scale, backend=backend),
        lambda q, k, v, m: R.attention(q, k, v, key_padding_mask=m, causal=causal, scale=scale),
        [q, k, v, m], grad_inputs=[0, 1, 2], reduction=attention_reduction(q, k), face=("attention", backend),
        name=f"{backend} B{B} H{H} {Lq}x{Lk} D{D} {dtype} mask={mask} causal={causal}")


# ---------------------------------------------------------------------------------------------
# CPU face: the full matrix

@pytest.mark.parametrize("Lq,Lk", SHAPES)
@pytest.mark.parametrize("D", [32, 64, 80])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_face_fp32(Lq, Lk, D, mask, causal):
    H = 1 if Lq * Lk > 10_000 else 2  # keeps the long cases affordable
    check("cpu", 2, H, Lq, Lk, D, torch.float32, mask, causal, noncontig=(D == 64))


@pytest.mark.parametrize("Lq,Lk", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_face_half(Lq, Lk, dtype):
    check("cpu", 2, 1 if Lq * Lk > 10_000 else 2, Lq, Lk, 64, dtype, mask=True, causal=Lq != Lk)


def test_cpu_face_self_causal_equal_lengths_half():
    check("cpu", 2, 3, 113, 113, 32, torch.float16, mask=True, causal=True)


def test_cpu_face_gradcheck_float64():
    q, k, v, m = make_inputs(2, 1, 3, 5, 8, torch.float64, mask=True)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    for causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, k, v: attention(q, k, v, key_padding_mask=m, causal=causal, backend="cpu"), (q, k, v),
            fast_mode=True)


def test_auto_picks_cpu_face_on_cpu():
    assert mmfast.dispatch.resolve("attention", "auto", "cpu", torch.float32) == "cpu"


# ---------------------------------------------------------------------------------------------
# Triton face in the interpreter: a designed subset (every shape, D, dtype, mask/causal on+off)

TRITON_CASES = [
    # B, H, Lq, Lk, D, dtype, mask, causal, noncontig
    (1, 1, 1, 1, 32, torch.float32, False, False, False),
    (2, 1, 1, 1, 64, torch.float16, True, True, False),
    (2, 2, 7, 197, 80, torch.float32, True, False, False),
    (1, 2, 7, 197, 32, torch.float16, False, True, False),
    (2, 1, 40, 197, 64, torch.float32, True, True, True),
    (2, 2, 40, 197, 64, torch.float16, True, False, False),
    (1, 1, 197, 40, 32, torch.float32, False, True, False),  # Lq > Lk causal: fully masked rows
    (2, 1, 197, 40, 80, torch.float16, True, False, True),
    (1, 1, 113, 203, 64, torch.float32, True, True, False),
    (1, 1, 113, 203, 80, torch.float16, False, False, False),
    (1, 1, 113, 113, 32, torch.float16, True, True, False),
    (1, 1, 577, 577, 64, torch.float32, False, True, False),
    (1, 1, 577, 577, 32, torch.float16, True, False, False),
]


@pytest.mark.parametrize("B,H,Lq,Lk,D,dtype,mask,causal,noncontig", TRITON_CASES)
def test_triton_interpreter(B, H, Lq, Lk, D, dtype, mask, causal, noncontig):
    if torch.cuda.is_available():
        pytest.skip("interpreter subset; the GPU runs the full matrix below")
    check("triton", B, H, Lq, Lk, D, dtype, mask, causal, noncontig=noncontig)


def test_triton_custom_scale_and_fp32_tf32_flag_off():
    if torch.cuda.is_available():
        pytest.skip("interpreter test")
    assert not torch.backends.cuda.matmul.allow_tf32
    check("triton", 1, 2, 9, 33, 48, torch.float32, True, False, scale=0.3)


# ---------------------------------------------------------------------------------------------
# Dropout: reproducible, right keep fraction, and the backward uses the forward's mask

def _dropout_backends():
    return ["cpu"] + (["triton"] if not torch.cuda.is_available() else [])


@pytest.mark.parametrize("backend", _dropout_backends())
def test_dropout_reproducible(backend):
    q, k, v, m = make_inputs(2, 2, 20, 40, 32, torch.float32, mask=True)
    run = lambda s: (torch.manual_seed(s), attention(q, k, v, key_padding_mask=m, dropout_p=0.3, backend=backend))[1]
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    nodrop = attention(q, k, v, key_padding_mask=m, backend=backend)
    assert not torch.equal(a, nodrop)


@pytest.mark.parametrize("backend", _dropout_backends())
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_mask_statistics_and_backward_consistency(backend, causal):
    """With V = I (D = Lk) the op returns its dropped probability matrix A = P * keep / (1 - p).
    The keep mask depends on the seed and the position only, so the same seed with random V must
    give A @ V, and the gradients must be those of softmax(...) * keep / (1 - p) @ V."""
    B, H, Lq, Lk, p = 2, 2, 24, 40, 0.25
    q, k, v, m = make_inputs(B, H, Lq, Lk, Lk, torch.float32, mask=True)
    m[-1, :3] = True  # keep every row non-empty so all probabilities are > 0 where visible
    eye = torch.eye(Lk).expand(B, H, Lk, Lk).contiguous()
    torch.manual_seed(7)
    A = attention(q, k, eye, key_padding_mask=m, causal=causal, dropout_p=p, backend=backend)
    vis = attention_mask(m, causal, Lq, Lk, "cpu").expand(B, H, Lq, Lk)
    kept = (A != 0) & vis
    frac = kept.sum().item() / vis.sum().item()
    n = vis.sum().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(frac - (1 - p)) < 5 * sigma, f"keep fraction {frac:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    # kept entries carry the 1/(1-p) rescaling: A / P = 1/(1-p) exactly where kept
    P = R.attention(q.double(), k.double(), torch.eye(Lk, dtype=torch.float64).expand(B, H, Lk, Lk),
                    key_padding_mask=m, causal=causal)
    ratio = A.double()[kept] / P[kept]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1 / (1 - p)), rtol=1e-4, atol=0)
    keep = kept | ~vis  # invisible positions have P = 0: their keep value does not matter

    def ref(q, k, v, m):
        probs = R.attention(q, k, torch.eye(Lk, dtype=q.dtype).expand(B, H, Lk, Lk), key_padding_mask=m,
                            causal=causal)
        return (probs * keep.to(q.dtype) / (1 - p)) @ v

    def fn(q, k, v, m):
        torch.manual_seed(7)
        return attention(q, k, v, key_padding_mask=m, causal=causal, dropout_p=p, backend=backend)

    testing.check_op(fn, ref, [q, k, v, m], grad_inputs=[0, 1, 2], reduction=attention_reduction(q, k),
                     face=("attention", backend), name=f"{backend} dropout")


@pytest.mark.parametrize("backend", _dropout_backends())
def test_broadcast_grad_out_and_empty_batch(backend):
    """out.sum() hands the backward a zero-stride gradient; B = 0 gives empty results."""
    q, k, v, m = make_inputs(2, 2, 9, 21, 32, torch.float32, mask=True)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    g = torch.autograd.grad(attention(q, k, v, key_padding_mask=m, causal=True, backend=backend).sum(), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    r = torch.autograd.grad(R.attention(q64, k64, v64, key_padding_mask=m, causal=True).sum(), (q64, k64, v64))
    for a, b in zip(g, r):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
    e = torch.randn(0, 2, 5, 16, requires_grad=True)
    out = attention(e, e, e, backend=backend)
    assert out.shape == (0, 2, 5, 16)
    (ge,) = torch.autograd.grad(out.sum(), e)
    assert ge.shape == e.shape


@pytest.mark.parametrize("backend", _dropout_backends())
@pytest.mark.parametrize("D", [8, 16, 128])
def test_custom_scale_and_head_dims(backend, D):
    """The smallest, a small and the largest head dim the fused faces take, with a custom scale
    (masked, causal, Lq != Lk) and with the default one."""
    check(backend, 2, 2, 7, 19, D, torch.float32, True, True, scale=0.3)
    check(backend, 1, 2, 5, 9, D, torch.float32, False, False)


@pytest.mark.parametrize("backend", _dropout_backends())
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_key_padding_mask_views(backend, layout):
    """A key_padding_mask that is a strided view (every other column of a wider mask) or a batch
    broadcast (stride 0 along B) is read as the values it shows."""
    q, k, v, _ = make_inputs(3, 2, 6, 13, 16, torch.float32)
    gen = torch.Generator().manual_seed(21)
    if layout == "strided":
        m = (torch.rand(3, 2 * 13 + 1, generator=gen) > 0.4)[:, ::2][:, :13]
    else:
        m = (torch.rand(1, 13, generator=gen) > 0.4).expand(3, 13)
    m[0, 0] = True  # a view of fresh storage: setting one element does not change the layout
    assert not m.is_contiguous()
    testing.check_op(
        lambda q, k, v: attention(q, k, v, key_padding_mask=m, causal=True, backend=backend),
        lambda q, k, v: R.attention(q, k, v, key_padding_mask=m.contiguous(), causal=True),
        [q, k, v], grad_inputs=[0, 1, 2], reduction=attention_reduction(q, k), face=("attention", backend),
        name=f"{backend} {layout} mask")


@pytest.mark.parametrize("backend", _dropout_backends())
def test_no_keys_gives_zeros(backend):
    """Lk = 0: every query row has no key, so it returns zeros (and zero gradients), as a row whose
    keys are all masked does."""
    q = torch.randn(2, 2, 5, 16, requires_grad=True)
    k = torch.randn(2, 2, 0, 16, requires_grad=True)
    v = torch.randn(2, 2, 0, 16, requires_grad=True)
    with testing.poisoned_outputs():
        out = attention(q, k, v, backend=backend)
        assert out.shape == q.shape and torch.equal(out, torch.zeros_like(out))
        gq, gk, gv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(gq, torch.zeros_like(q)) and gk.shape == k.shape and gv.shape == v.shape


# ---------------------------------------------------------------------------------------------
# Argument errors name the argument

def _bad(**over):
    q, k, v, m = make_inputs(2, 2, 5, 9, 16, torch.float32, mask=True)
    args = dict(q=q, k=k, v=v, key_padding_mask=m)
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,pattern", [
    (dict(q=torch.randn(2, 5, 16)), ValueError, "'q' must be 4-D"),
    (dict(k=torch.randn(2, 2, 9, 16, dtype=torch.float16)), TypeError, "'k' has dtype"),
    (dict(v=torch.randn(2, 2, 8, 16)), ValueError, "'v' must have the shape of k"),
    (dict(k=torch.randn(2, 3, 9, 16)), ValueError, "'k' must have shape"),
    (dict(q=torch.randn(2, 2, 5, 12), k=torch.randn(2, 2, 9, 12), v=torch.randn(2, 2, 9, 12)), ValueError,
     "multiple of 8"),
    (dict(q=torch.randn(2, 2, 5, 136), k=torch.randn(2, 2, 9, 136), v=torch.randn(2, 2, 9, 136)), ValueError,
     "multiple of 8"),
    (dict(q=torch.randint(0, 3, (2, 2, 5, 16))), TypeError, "'q' must be floating point"),
    (dict(key_padding_mask=torch.ones(2, 9)), TypeError, "'key_padding_mask' must be a bool tensor"),
    (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "'key_padding_mask' must have shape"),
    (dict(key_padding_mask=torch.ones(2, 1, 1, 9, dtype=torch.bool)), ValueError, "'key_padding_mask' must have shape"),
])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.no_face_runs("the arguments are refused before any face runs")
def test_bad_inputs_name_the_argument(over, exc, pattern, backend):
    with pytest.raises(exc, match=pattern):
        attention(**_bad(**over), backend=backend)


def test_bad_dropout_device_and_backend():
    with pytest.raises(ValueError, match="'dropout_p'"):
        attention(**_bad(), dropout_p=1.0)
    with pytest.raises(ValueError, match="'dropout_p'"):
        attention(**_bad(), dropout_p=-0.1)
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        attention(**_bad(), backend="cuda")
    with pytest.raises(ValueError, match="'backend'"):
        attention(**_bad(), backend="flash")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="'k' is on"):
            attention(**_bad(k=torch.randn(2, 2, 9, 16, device="cuda")))
    else:
        with pytest.raises(ValueError, match="'key_padding_mask' is on"):
            attention(**_bad(key_padding_mask=torch.ones(2, 9, dtype=torch.bool, device="meta")))


def test_interpreter_refuses_bfloat16():
    q, k, v, m = make_inputs(1, 2, 5, 9, 16, torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16 tl.dot is broken"):
        attention(q, k, v, backend="triton")


def test_torch_backend_takes_any_head_dim():
    q, k, v, m = make_inputs(1, 2, 5, 9, 12, torch.float32, mask=True)
    out = attention(q, k, v, key_padding_mask=m, backend="torch")
    assert out.shape == (1, 2, 5, 12)


# ---------------------------------------------------------------------------------------------
# Custom-op plumbing

@pytest.mark.parametrize("backend", _dropout_backends())
def test_opcheck(backend):
    from mmfast.ops.attention import _attention_bwd_op, _attention_fwd_op

    q, k, v, m = make_inputs(2, 2, 5, 9, 16, torch.float32, mask=True)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    seed = torch.tensor([1234])
    for args in [(q, k, v, m, None, True, 0.25, 0.0, backend), (q, k, v, None, seed, False, 0.25, 0.2, backend)]:
        torch.library.opcheck(_attention_fwd_op, args)
    out, lse = _attention_fwd_op(q, k, v, m, None, True, 0.25, 0.0, backend)
    do = torch.randn_like(out)
    # the backward op has no autograd formula of its own (no double backward): plain tensors
    q, k, v = (x.detach() for x in (q, k, v))
    torch.library.opcheck(_attention_bwd_op, (do, q, k, v, out.detach(), lse, m, None, True, 0.25, 0.0, backend))


@pytest.mark.parametrize("backend", _dropout_backends())
def test_compile_fullgraph(backend):
    q, k, v, m = make_inputs(2, 2, 7, 19, 32, torch.float32, mask=True)
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def f(q, k, v, m):
        return (attention(q * 2, k, v, key_padding_mask=m, causal=True, backend=backend) + 1).square().sum()

    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, m)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref = f(q, k, v, m)
    ref_grads = torch.autograd.grad(ref, (q, k, v))
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)

    def g(q, k, v):  # dropout inside the graph: the seed is drawn from torch's generator
        return attention(q, k, v, dropout_p=0.5, backend=backend)

    compiled = torch.compile(g, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    a = compiled(q, k, v)
    torch.manual_seed(3)
    b = compiled(q, k, v)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# GPU: the full matrix in fp16/bf16 on both GPU faces

GPU_BACKENDS = ["triton", "cuda"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Lq,Lk", SHAPES)
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_matrix(monkeypatch, backend, dtype, Lq, Lk, D, mask, causal):
    # the heuristic configs here (timing candidates for ~200 buckets would take minutes); every
    # candidate is checked by test_gpu_triton_every_config_candidate
    monkeypatch.setenv("MMFAST_ATTN_AUTOTUNE", "0")
    check(backend, 2, 3, Lq, Lk, D, dtype, mask, causal, device="cuda", noncontig=(D == 64))


@pytest.mark.cuda
@pytest.mark.parametrize("Lq,Lk", [(40, 197), (577, 577)])
def test_gpu_triton_fp32(Lq, Lk):
    check("triton", 2, 3, Lq, Lk, 64, torch.float32, True, True, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_triton_dropout(causal):
    B, H, Lq, Lk, p = 2, 3, 40, 64, 0.2
    q, k, v, m = make_inputs(B, H, Lq, Lk, Lk, torch.float16, device="cuda", mask=True)
    m[-1, :3] = True
    eye = torch.eye(Lk, device="cuda", dtype=torch.float16).expand(B, H, Lk, Lk).contiguous()
    torch.manual_seed(11)
    A = attention(q, k, eye, key_padding_mask=m, causal=causal, dropout_p=p, backend="triton")
    torch.manual_seed(11)
    A2 = attention(q, k, eye, key_padding_mask=m, causal=causal, dropout_p=p, backend="triton")
    assert torch.equal(A, A2)
    vis = attention_mask(m, causal, Lq, Lk, "cuda").expand(B, H, Lq, Lk)
    kept = (A != 0) & vis
    frac = kept.sum().item() / vis.sum().item()
    assert abs(frac - (1 - p)) < 5 * (p * (1 - p) / vis.sum().item()) ** 0.5
    keep = (kept | ~vis).cpu()

    def ref(q, k, v, m):
        e = torch.eye(Lk, dtype=q.dtype, device=q.device).expand(B, H, Lk, Lk)
        probs = R.attention(q, k, e, key_padding_mask=m, causal=causal)
        return (probs * keep.to(dtype=q.dtype, device=q.device) / (1 - p)) @ v

    def fn(q, k, v, m):
        torch.manual_seed(11)
        return attention(q, k, v, key_padding_mask=m, causal=causal, dropout_p=p, backend="triton")

    testing.check_op(fn, ref, [q, k, v, m], grad_inputs=[0, 1, 2], reduction=attention_reduction(q, k),
                     face=("attention", "triton"), name="gpu dropout")


@pytest.mark.cuda
def test_gpu_auto_routes_dropout_to_triton():
    q, k, v, m = make_inputs(1, 2, 8, 16, 64, torch.float16, device="cuda", mask=True)
    assert mmfast.dispatch.resolve("attention", "auto", "cuda", torch.float16,
                                   (("cuda", "dropout is done by the Triton face"),)) == "triton"
    # the CUDA face has dropout now (issue #17): tests/test_attention_cuda.py checks it


@pytest.mark.cuda
def test_gpu_cuda_face_rejects_fp32():
    q, k, v, m = make_inputs(1, 2, 8, 16, 64, torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match="cuda supports dtypes"):
        attention(q, k, v, backend="cuda")


# ---------------------------------------------------------------------------------------------
# Triton launch configurations: every candidate the GPU autotuner may pick is correct, and the
# chooser keeps the fastest one that compiles

def _each_triton_config(monkeypatch, Lq, Lk, D, run_check):
    """Runs ``run_check()`` once per launch configuration the GPU autotuner may pick (forward and
    backward candidates in step), in the interpreter."""
    if torch.cuda.is_available():
        pytest.skip("interpreter test (the GPU matrix runs with the autotuner)")
    import mmfast.triton.attention as T

    n = max(len(T.fwd_configs(Lq, Lk, D)), len(T.bwd_configs(Lq, Lk, D)))
    for i in range(n):
        monkeypatch.setattr(T, "_choose", lambda key, cands, run, i=i: cands[min(i, len(cands) - 1)])
        run_check()


@pytest.mark.parametrize("Lq,Lk", [(40, 197), (113, 203)])
def test_triton_every_config_candidate(monkeypatch, Lq, Lk):
    _each_triton_config(monkeypatch, Lq, Lk, 64, lambda: check("triton", 1, 1, Lq, Lk, 64, torch.float16, True, True))


@pytest.mark.parametrize("Lq,Lk", [(16, 129), (16, 128), (17, 144), (65, 193)])
def test_triton_causal_bottom_right_on_block_edges_every_config(monkeypatch, Lq, Lk):
    """Causal with Lq != Lk puts the diagonal at key i + Lk - Lq: with Lk - Lq on or next to a
    multiple of the key block, a loop bound one block short drops the last visible keys of a row."""
    _each_triton_config(monkeypatch, Lq, Lk, 16, lambda: check("triton", 1, 1, Lq, Lk, 16, torch.float32, False, True))


def test_triton_config_chooser(monkeypatch):
    import triton.testing

    import mmfast.triton.attention as T

    monkeypatch.setattr(T, "_autotuning", lambda: True)
    monkeypatch.setattr(T, "_tuned", {})
    cost = {16: 3.0, 32: 1.0, 64: 2.0}
    ran = []

    def fake_bench(fn, warmup, rep):
        return fn()

    def run(cfg):
        ran.append(cfg["BLOCK_M"])
        if cfg["BLOCK_M"] == 128:
            raise RuntimeError("out of shared memory")
        return cost[cfg["BLOCK_M"]]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    cands = [{"BLOCK_M": m} for m in (16, 128, 32, 64)]
    assert T._choose(("k",), cands, run) == {"BLOCK_M": 32}
    assert T._choose(("k",), cands, run) == {"BLOCK_M": 32}  # cached: not timed again
    assert ran == [16, 128, 32, 64]


@pytest.mark.cuda
@pytest.mark.parametrize("Lq,Lk,D", [(40, 197, 64), (577, 577, 128), (197, 40, 80)])
def test_gpu_triton_every_config_candidate(monkeypatch, Lq, Lk, D):
    import mmfast.triton.attention as T

    bd = max(16, 1 << (D - 1).bit_length())
    n = max(len(T.fwd_configs(Lq, Lk, bd)), len(T.bwd_configs(Lq, Lk, bd)))
    for i in range(n):
        monkeypatch.setattr(T, "_choose", lambda key, cands, run, i=i: cands[min(i, len(cands) - 1)])
        check("triton", 2, 3, Lq, Lk, D, torch.bfloat16, True, True, device="cuda")


@pytest.mark.cuda
def test_gpu_triton_static_config_path():
    import mmfast.triton.attention as T

    assert not T._autotuning()  # user calls launch the static table's config; only MMFAST_TUNE=1 times
    check("triton", 4, 12, 40, 197, 64, torch.bfloat16, True, False, device="cuda")
    check("triton", 4, 12, 40, 197, 64, torch.bfloat16, True, False, device="cuda")
