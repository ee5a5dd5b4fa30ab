"""concat_embed: every face against the float64 eager formula under the correctness rule (outputs
and all gradients), dropout, masks, bad inputs, opcheck, torch.compile.

The size matrix is a designed subset, not the full product: across CASES every M in {1, 2, 3},
L in {1, 7, 40, 113, 197, 577}, D in {64, 384, 768} and each optional part (type embeddings,
position tables with None entries, LayerNorm with/without bias) appears on and off. The C++ face
runs every case in fp32/fp16/bf16; the Triton interpreter (slow) every case in fp32 and a few in fp16.
"""

import os

import pytest
import torch

import mmfast
from mmfast import dispatch, testing
from mmfast.ops import concat_embed
from mmfast.ops.concat_embed import _concat_embed_backward_op, _concat_embed_op, dropout_keep_mask
from mmfast.reference import concat_embed as reference

HAS_EXT = "cpu" in testing.cpu_faces("concat_embed")  # raises when a face that should exist does not load
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="mmfast._C not built with concat_embed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def dev(backend):
    """Where ``backend`` runs: Triton takes CPU tensors only under the interpreter, so on a GPU machine
    the Triton cases of the CPU-side tests below run on the GPU."""
    return "cuda" if backend == "triton" and not dispatch.triton_interpreting() else "cpu"


def on(backend, ts):
    return [t.detach().to(dev(backend)).requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
            for t in ts]

# (M, L per modality, D, options, B); options: t = type embeddings, p = position tables (every
# second modality gets None), P = a table for every modality, l = LayerNorm weight, b = LN bias.
CASES = [
    (1, (1,), 64, "", 3),
    (2, (40, 197), 768, "tplb", 2),
    (3, (1, 7, 40), 384, "tp", 3),
    (2, (577, 1), 64, "lb", 2),
    (3, (197, 40, 7), 64, "tPl", 2),
    (1, (113,), 384, "Plb", 2),
    (2, (7, 577), 384, "tPlb", 1),
    (4, (3, 1, 5, 2), 64, "tPlb", 2),  # M = 4, the most modalities the op takes
]
# The interpreter runs one Python-level step per program: fewer, smaller cases, still covering
# every M, L and D value and each optional part on and off.
TRITON_CASES = [
    (1, (1,), 64, "", 3),
    (2, (40, 197), 768, "tplb", 1),
    (3, (1, 7, 40), 384, "tp", 2),
    (2, (577, 1), 64, "tPl", 1),
    (1, (113,), 384, "Plb", 1),
    (2, (3, 5), 64, "tPlb", 33),  # B > 32: several batch chunks, so the two-stage position reduction
]
_ids = lambda cases: [f"M{m}-L{'+'.join(map(str, ls))}-D{d}-{o or 'bare'}-B{b}" for m, ls, d, o, b in cases]
CASE_IDS, TRITON_IDS = _ids(CASES), _ids(TRITON_CASES)
TRITON_FP16 = [1, 2]  # TRITON_CASES indices also run in fp16 under the interpreter


def _exact_in(dtype, t):
    """Parameters representable exactly in ``dtype``: eager's low-precision run then sees the same
    parameters as the kernel (which keeps them in float32), so the baseline is pure arithmetic error."""
    return t.to(dtype).to(torch.float32)


def make_case(M, Ls, D, opts, B, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)
    feats = [rnd(B, L, D).to(dtype) for L in Ls]
    type_e = _exact_in(dtype, rnd(M + 1, D)) if "t" in opts else None
    pos = None
    if "p" in opts or "P" in opts:
        pos = [(_exact_in(dtype, rnd(L + 3, D)) if ("P" in opts or m % 2 == 0) else None) for m, L in enumerate(Ls)]
    w = _exact_in(dtype, 1 + 0.5 * rnd(D)) if "l" in opts else None
    b = _exact_in(dtype, rnd(D)) if "b" in opts else None
    flat = feats + ([type_e] if type_e is not None else []) + [p for p in (pos or []) if p is not None] \
        + [t for t in (w, b) if t is not None]
    flat = [t.to(device) for t in flat]

    def unpack(args):
        it = iter(args)
        fs = [next(it) for _ in range(M)]
        te = next(it) if type_e is not None else None
        ps = [next(it) if p is not None else None for p in pos] if pos is not None else None
        ww = next(it) if w is not None else None
        bb = next(it) if b is not None else None
        return fs, te, ps, ww, bb

    return flat, unpack


def run_rule(backend, case, dtype, device="cpu", eps=1e-5):
    M, Ls, D, opts, B = case
    flat, unpack = make_case(M, Ls, D, opts, B, dtype, device)

    def fused(*args):
        fs, te, ps, ww, bb = unpack(args)
        return concat_embed(fs, type_embeddings=te, pos_embeddings=ps, ln_weight=ww, ln_bias=bb, eps=eps,
                            backend=backend)[0]

    def eager(*args):  # the eager formula, parameters in the features' dtype
        fs, te, ps, ww, bb = unpack(args)
        cast = lambda t: None if t is None else t.to(fs[0].dtype)
        return reference(fs, type_embeddings=cast(te), pos_embeddings=None if ps is None else [cast(p) for p in ps],
                         ln_weight=cast(ww), ln_bias=cast(bb), eps=eps)[0]

    # LayerNorm reduces over D; the parameter gradients over the B x sum(L) tokens
    results = testing.check_op(fused, eager, flat, grad_inputs=list(range(len(flat))), name=f"concat_embed {backend}",
                               reduction=(D, B * sum(Ls)), face=("concat_embed", backend))
    n_grads = sum(1 for r in results if "grad" in r["name"])
    assert n_grads == len(flat), f"expected a checked gradient for all {len(flat)} inputs, got {n_grads}"
    return results


# --------------------------------------------------------------------------------------------- faces
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpu_face_rule(case, dtype):
    run_rule("cpu", case, dtype)


@pytest.mark.parametrize("case", TRITON_CASES, ids=TRITON_IDS)
def test_triton_face_rule_fp32(case):
    run_rule("triton", case, torch.float32, DEV)


@pytest.mark.parametrize("idx", TRITON_FP16, ids=[TRITON_IDS[i] for i in TRITON_FP16])
def test_triton_face_rule_fp16(idx):
    run_rule("triton", TRITON_CASES[idx], torch.float16, DEV)


@needs_ext
def test_cpu_face_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    f = [torch.randn(2, 2, 5, dtype=torch.float64, generator=gen, requires_grad=True),
         torch.randn(2, 1, 5, dtype=torch.float64, generator=gen, requires_grad=True)]
    te = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    p0 = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    fn = lambda f0, f1, te, p0, w, b: concat_embed([f0, f1], type_embeddings=te, pos_embeddings=[p0, None],
                                                   ln_weight=w, ln_bias=b, eps=1e-5, backend="cpu")[0]
    assert torch.autograd.gradcheck(fn, (*f, te, p0, w, b))


@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_parameter_grads_deterministic(backend):
    flat, unpack = make_case(2, (17, 7), 64, "tPlb", 3, torch.float32, dev(backend))
    flat = [t.requires_grad_() for t in flat]
    fs, te, ps, w, b = unpack(flat)
    out = concat_embed(fs, type_embeddings=te, pos_embeddings=ps, ln_weight=w, ln_bias=b, backend=backend)[0]
    g = torch.randn_like(out)
    g1 = torch.autograd.grad(out, flat, g, retain_graph=True)
    g2 = torch.autograd.grad(out, flat, g)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


@needs_ext
def test_cpu_and_triton_agree():
    flat, unpack = make_case(2, (7, 9), 64, "tplb", 3, torch.float32)
    fs, te, ps, w, b = unpack(flat)
    kw = dict(type_embeddings=te, pos_embeddings=ps, ln_weight=w, ln_bias=b)
    a = concat_embed(fs, backend="cpu", **kw)[0]
    fs_t, kw_t = on("triton", fs), {k: (on("triton", v) if isinstance(v, list) else on("triton", [v])[0])
                                    for k, v in kw.items()}
    c = concat_embed(fs_t, backend="triton", **kw_t)[0]
    torch.testing.assert_close(a, c.cpu(), rtol=1e-5, atol=1e-5)


def test_torch_backend_is_the_reference():
    flat, unpack = make_case(2, (3, 4), 16, "tplb", 2, torch.float32)
    fs, te, ps, w, b = unpack(flat)
    kw = dict(type_embeddings=te, pos_embeddings=ps, ln_weight=w, ln_bias=b, masks=[None, torch.ones(2, 4, dtype=torch.bool)])
    out, mask = concat_embed(fs, backend="torch", **kw)
    ro, rm = reference(fs, **kw)
    assert torch.equal(out, ro) and torch.equal(mask, rm)


def test_mixed_parameter_dtype_grads_flow_back():
    """Parameters in another dtype than the features are used in float32; their grads come back in
    their own dtype."""
    backend = "cpu" if HAS_EXT else "triton"
    f = [torch.randn(2, 3, 16, dtype=torch.float16, requires_grad=True)]
    te = torch.randn(1, 16, dtype=torch.bfloat16, requires_grad=True)
    out = concat_embed(f, type_embeddings=te, backend=backend)[0]
    assert out.dtype == torch.float16
    (g,) = torch.autograd.grad(out.float().sum(), [te])
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g.float(), torch.full((1, 16), 6.0))


# --------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
def test_masks_with_none_entries(backend):
    if backend == "cpu" and not HAS_EXT:
        pytest.skip("mmfast._C not built")
    B = 3
    fs = [testing.randn(B, L, 16, device=dev(backend)) for L in (4, 1, 5)]
    m0 = (torch.rand(B, 4) > 0.3).to(dev(backend))
    m2 = (torch.rand(B, 5) > 0.5).to(torch.int64).to(dev(backend))
    out, mask = concat_embed(fs, masks=[m0, None, m2], backend=backend)
    expected = torch.cat([m0, torch.ones(B, 1, dtype=torch.bool, device=m0.device), m2.bool()], dim=1)
    assert mask.dtype == torch.bool and torch.equal(mask, expected)
    assert out.shape == (B, 10, 16)
    assert concat_embed(fs, backend=backend)[1] is None
    assert torch.equal(concat_embed(fs, masks=[None, None, None], backend=backend)[1].cpu(),
                       torch.ones(B, 10, dtype=torch.bool))


# --------------------------------------------------------------------------------------------- dropout
def _dropout_case(backend, p, seed=7):
    gen = torch.Generator().manual_seed(11)
    fs = [torch.randn(2, L, 64, generator=gen).to(dev(backend)).requires_grad_() for L in (5, 3)]
    w = torch.randn(64, generator=gen).to(dev(backend))
    torch.manual_seed(seed)
    out, _ = concat_embed(fs, ln_weight=w, dropout_p=p, backend=backend)
    return fs, w, out


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_hashed_mask_and_backward_reuses_it(backend, p):
    if backend == "cpu" and not HAS_EXT:
        pytest.skip("mmfast._C not built")
    fs, w, out = _dropout_case(backend, p)
    torch.manual_seed(7)  # the op's seed is the first draw after seeding, on the inputs' device
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=out.device)
    keep = dropout_keep_mask(seed, out.shape, p, device=out.device)
    base = reference([f.detach().requires_grad_() for f in fs], ln_weight=w)[0]
    expected = torch.where(keep, base / (1 - p), torch.zeros((), device=out.device))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert abs(float((~keep).float().mean()) - p) < 0.05
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, fs, g)
    fs2 = [f.detach().requires_grad_() for f in fs]
    base2 = reference(fs2, ln_weight=w)[0]
    want = torch.autograd.grad(torch.where(keep, base2 / (1 - p), torch.zeros((), device=out.device)), fs2, g)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dropout_seed_reproducible(backend):
    if backend == "cpu" and not HAS_EXT:
        pytest.skip("mmfast._C not built")
    _, _, a = _dropout_case(backend, 0.3, seed=1)
    _, _, b = _dropout_case(backend, 0.3, seed=1)
    _, _, c = _dropout_case(backend, 0.3, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a == 0, c == 0)


@needs_ext
def test_dropout_same_mask_in_every_face():
    if dev("triton") != "cpu":
        pytest.skip("the faces run on different devices, whose generators draw different seeds; on a GPU "
                    "test_gpu_dropout_same_mask_as_cpu_hash compares every face with the hash instead")
    _, _, a = _dropout_case("cpu", 0.4)
    _, _, b = _dropout_case("triton", 0.4)
    assert torch.equal(a == 0, b == 0)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dropout_p_one_gives_zeros(backend):
    if backend == "cpu" and not HAS_EXT:
        pytest.skip("mmfast._C not built")
    fs, _, out = _dropout_case(backend, 1.0)
    assert torch.equal(out, torch.zeros_like(out))
    (g,) = torch.autograd.grad(out.sum(), fs[:1])
    assert torch.equal(g, torch.zeros_like(g))


# --------------------------------------------------------------------------------------------- bad inputs
def _bad(match, features=None, **kw):
    features = features if features is not None else [torch.randn(2, 3, 8), torch.randn(2, 5, 8)]
    with pytest.raises((ValueError, TypeError), match=match):
        concat_embed(features, **kw)


def test_bad_inputs_name_the_argument():
    f = lambda *s, **k: torch.randn(*s, **k)
    _bad(r"'features\[1\]'.*hidden size 4", [f(2, 3, 8), f(2, 5, 4)])
    _bad(r"'features\[1\]'.*batch size 3", [f(2, 3, 8), f(3, 5, 8)])
    _bad(r"'features\[1\]'.*dtype", [f(2, 3, 8), f(2, 5, 8, dtype=torch.float16)])
    _bad(r"'features\[0\]'.*3-D", [f(2, 8)])
    _bad(r"'features'.*1 to 4 modalities", [])
    _bad(r"'features'.*1 to 4 modalities", [f(1, 1, 8)] * 5)
    _bad(r"'features'.*list or tuple", f(2, 3, 8))
    _bad(r"'type_embeddings'.*1 rows.*2 modalities", type_embeddings=f(1, 8))
    _bad(r"'type_embeddings'.*shape", type_embeddings=f(2, 7))
    _bad(r"'pos_embeddings\[1\]'.*4 positions, shorter than the 5 tokens", pos_embeddings=[None, f(4, 8)])
    _bad(r"'pos_embeddings'.*2 entries", pos_embeddings=[f(9, 8)])
    _bad(r"'pos_embeddings\[0\]'.*shape", pos_embeddings=[f(9, 7), None])
    _bad(r"'ln_weight'.*\(8,\)", ln_weight=f(7))
    _bad(r"'ln_bias'.*\(8,\)", ln_weight=f(8), ln_bias=f(8, 1))
    _bad(r"'ln_bias'.*without ln_weight", ln_bias=f(8))
    _bad(r"'dropout_p'", dropout_p=1.5)
    _bad(r"'eps'", eps=0.0)
    _bad(r"'masks'.*2 entries", masks=[None])
    _bad(r"'masks\[1\]'.*shape \(2, 5\)", masks=[None, torch.ones(2, 4, dtype=torch.bool)])
    _bad(r"'masks\[0\]'.*bool or integer", masks=[torch.ones(2, 3), None])


@pytest.mark.cuda
def test_bad_device_mix_names_the_argument():
    _bad(r"'features\[1\]'.*device", [torch.randn(2, 3, 8), torch.randn(2, 5, 8, device="cuda")])
    _bad(r"'ln_weight'.*device", ln_weight=torch.randn(8, device="cuda"))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="'backend'"):
        concat_embed([torch.randn(1, 2, 8)], backend="nope")


@needs_ext
def test_cpp_checks_guard_direct_calls():
    op = torch.ops.mmfast_C.concat_embed_forward
    with pytest.raises(RuntimeError, match="argument 'pos_tables'"):
        op([torch.randn(2, 5, 8)], None, [torch.randn(3, 8)], [0], None, None, 1e-5, 0.0, None)
    with pytest.raises(RuntimeError, match="argument 'features'"):
        op([torch.randn(2, 5, 8), torch.randn(2, 5, 4)], None, [], [-1, -1], None, None, 1e-5, 0.0, None)


# --------------------------------------------------------------------------------------------- op plumbing
def _op_args(backend, dropout):
    gen = torch.Generator().manual_seed(5)
    fs = [torch.randn(2, 3, 16, generator=gen, requires_grad=True), torch.randn(2, 4, 16, generator=gen, requires_grad=True)]
    te = torch.randn(2, 16, generator=gen, requires_grad=True)
    p1 = torch.randn(6, 16, generator=gen, requires_grad=True)
    w = torch.randn(16, generator=gen, requires_grad=True)
    b = torch.randn(16, generator=gen, requires_grad=True)
    seed = torch.tensor([12345], dtype=torch.int64) if dropout else None
    return (fs, te, [p1], [-1, 0], w, b, 1e-5, 0.25 if dropout else 0.0, seed, backend)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dropout", [False, True])
def test_opcheck(backend, dropout):
    if backend == "cpu" and not HAS_EXT:
        pytest.skip("mmfast._C not built")
    args = tuple(on(backend, a) if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
                 else (on(backend, [a])[0] if isinstance(a, torch.Tensor) else a) for a in _op_args(backend, dropout))
    torch.library.opcheck(_concat_embed_op, args)
    fs, te, pos, idx, w, b, eps, p, seed, be = args
    with torch.no_grad():
        out, mean, rstd = _concat_embed_op(*args)
    go = torch.randn_like(out)
    torch.library.opcheck(_concat_embed_backward_op,
                          (go, [f.detach() for f in fs], te.detach(), [t.detach() for t in pos], idx, w.detach(),
                           b.detach(), mean, rstd, p, seed, be))


@needs_ext
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_compile_fullgraph(dropout_p):
    flat, unpack = make_case(2, (5, 7), 32, "tplb", 2, torch.float32)
    flat = [t.requires_grad_() for t in flat]

    def f(*args):
        fs, te, ps, w, b = unpack(args)
        out, mask = concat_embed(fs, type_embeddings=te, pos_embeddings=ps, ln_weight=w, ln_bias=b,
                                 dropout_p=dropout_p, masks=[None, torch.ones(2, 7, dtype=torch.bool)], backend="cpu")
        return out * 2, mask

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    out, mask = compiled(*flat)
    g = torch.autograd.grad(out, flat, torch.ones_like(out))
    torch.manual_seed(0)
    ro, rm = f(*flat)
    rg = torch.autograd.grad(ro, flat, torch.ones_like(ro))
    torch.testing.assert_close(out, ro)
    assert torch.equal(mask, rm)
    for a, c in zip(g, rg):
        torch.testing.assert_close(a, c)


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES + [(2, (40, 577), 768, "tPlb", 8), (4, (40, 197, 1, 9), 1024, "tplb", 4),
                                          (2, (30, 197), 770, "tPlb", 3),  # D % 8 != 0: scalar path
                                          (2, (5, 3), 768, "tPlb", 37)], ids=str)  # several batch chunks (both faces)
def test_gpu_faces_rule(backend, dtype, case):
    run_rule(backend, case, dtype, "cuda")


@pytest.mark.cuda
def test_gpu_wide_rows_go_to_triton():
    case = (1, (7,), 2048, "tplb", 2)
    run_rule("triton", case, torch.bfloat16, "cuda")
    f = [torch.randn(2, 7, 2048, device="cuda")]
    with pytest.raises(RuntimeError, match="hidden sizes up to 1024"):
        concat_embed(f, backend="cuda")
    torch.testing.assert_close(concat_embed(f)[0], reference(f)[0])


@pytest.mark.cuda
def test_gpu_vector_path_with_misaligned_view():
    """A feature view starting at an odd element offset must take the scalar path, not fault."""
    base = torch.randn(2 * 40 * 768 + 1, device="cuda", dtype=torch.bfloat16)
    f = base[1:].view(2, 40, 768)
    w = torch.randn(768, device="cuda")
    for backend in ("cuda", "triton"):
        out = concat_embed([f], ln_weight=w, eps=1e-5, backend=backend)[0]
        ref = reference([f.float()], ln_weight=w, eps=1e-5)[0]
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_gpu_dropout_same_mask_as_cpu_hash(p):
    gen = torch.Generator().manual_seed(3)
    fs = [torch.randn(4, L, 768, generator=gen).cuda() for L in (40, 197)]
    w = torch.randn(768, generator=gen).cuda()
    seed = torch.tensor([987654321987], dtype=torch.int64, device="cuda")
    keep = dropout_keep_mask(seed, (4, 237, 768), p)
    for backend in ("triton", "cuda"):
        out, _, _ = _concat_embed_op(fs, None, [], [-1, -1], w, None, 1e-5, p, seed, backend)
        assert torch.equal((out != 0).cpu(), keep), backend


@pytest.mark.cuda
def test_gpu_int64_offsets_large_batch():
    """B * L * D > 2^31: rows far into the output must land where the reference puts them."""
    B, L, D = 2800, 1000, 768  # 2.15e9 elements in bf16 (4.3 GB)
    f = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16)
    te = torch.randn(2, D, device="cuda")
    for backend in ("triton", "cuda"):
        out, _ = concat_embed([f[:, :1], f], type_embeddings=te, backend=backend)
        for b, t, src in [(B - 1, L, f[B - 1, L - 1]), (B - 1, 0, f[B - 1, 0]), (1234, 500, f[1234, 499])]:
            want = (src.float() + te[1 if t > 0 else 0]).to(torch.bfloat16)
            assert torch.equal(out[b, t], want), (backend, b, t)
        del out


# --------------------------------------------------------------------------------------------- Triton AOT
_AOT_SCRIPT = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mmfast.triton import concat_embed as ce

def sig(fn, ptrs, floats, consts, dt):
    return {n: "constexpr" if n in consts else ptrs[n].replace("T", dt) if n in ptrs else "fp32" if n in floats
            else "i32" for n in fn.arg_names}

target = GPUTarget("cuda", 90, 32)
for dt, drop in (("bf16", True), ("fp16", False), ("fp32", False)):
    c = dict(HAS_POS=True, HAS_TYPE=True, HAS_LN=True, HAS_BIAS=True, DROPOUT=drop, ROWS=4, BLOCK_D=1024)
    p = dict(F="*T", POS="*fp32", TYPE="*fp32", W="*fp32", BIAS="*fp32", OUT="*T", MEAN="*fp32", RSTD="*fp32",
             SEED="*i64")
    triton.compile(ASTSource(ce._fwd_kernel, sig(ce._fwd_kernel, p, {"eps", "scale"}, c, dt), constexprs=c),
                   target=target, options={"num_warps": 4})
    c = dict(HAS_POS=True, HAS_TYPE=True, HAS_LN=True, DROPOUT=drop, LT=2, BLOCK_D=1024)
    p = dict(GO="*T", F="*T", POS="*fp32", TYPE="*fp32", W="*fp32", MEAN="*fp32", RSTD="*fp32", SEED="*i64",
             GF="*T", PPOS="*fp32", PW="*fp32", PB="*fp32", PT="*fp32")
    triton.compile(ASTSource(ce._bwd_kernel, sig(ce._bwd_kernel, p, {"scale"}, c, dt), constexprs=c),
                   target=target, options={"num_warps": 4})
print("compiled")
'''


def test_triton_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not type-check like the compiler: build real sm_90 cubins (Triton's
    bundled ptxas; no GPU needed) for the kernels in their heaviest configurations."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0 and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip("Triton's NVIDIA backend (ptxas) is not available here")
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


@pytest.mark.skipif(not mmfast.backends()["extension"]["loaded"], reason="mmfast._C not built")
@pytest.mark.parametrize("case,arg", [("d_mismatch", "features"), ("short_pos", "pos_tables"),
                                      ("bias_only", "ln_bias"), ("type_rows", "type_emb"),
                                      ("param_dtype", "type_emb")])
def test_cpp_checks_reject_bad_input_naming_the_argument(case, arg):
    """The C++ ops validate on their own (csrc/concat_embed.cpp), for callers of torch.ops.mmfast_C."""
    from mmfast import _extension

    f = [torch.randn(2, 3, 8), torch.randn(2, 5, 8)]
    args = {
        "d_mismatch": ([f[0], torch.randn(2, 5, 16)], None, [], [-1, -1], None, None),
        "short_pos": (f, None, [torch.randn(4, 8)], [-1, 0], None, None),
        "bias_only": (f, None, [], [-1, -1], None, torch.randn(8)),
        "type_rows": (f, torch.randn(1, 8), [], [-1, -1], None, None),
        "param_dtype": (f, torch.randn(2, 8, dtype=torch.float64), [], [-1, -1], None, None),
    }[case]
    with pytest.raises(RuntimeError, match=f"argument '{arg}'"):
        _extension.op("concat_embed_forward")(*args, 1e-12, 0.0, None)
