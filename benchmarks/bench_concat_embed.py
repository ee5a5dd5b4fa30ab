"""concat_embed vs the eager formula and torch.compile of it: forward and forward+backward.

Case: ViLT-style merge of text and image tokens: two modalities (B, 40, D) and (B, L_img, D), a
position table per modality, type embeddings, LayerNorm with bias, optional dropout. GB/s is
against the bytes that must move: the forward reads the features once and writes the output once
(+ the small parameters); the backward reads the upstream gradient and, for the LayerNorm, the
features again, and writes the feature gradients once (+ parameter gradients).

    pytest benchmarks/bench_concat_embed.py --benchmark-json=out.json
"""

import pytest
import torch

from harness import DEVICE, SMOKE, bench, check_rows, pick, rotate, rule_check

from mmfast.ops import concat_embed
from mmfast.reference import concat_embed as reference

SHAPES = pick(gpu=[(64, (40, 197), 768), (64, (40, 577), 768)], smoke=[(2, (5, 7), 64)])
DTYPES = pick(gpu=[torch.bfloat16], smoke=[torch.float32])
DROPOUT = pick(gpu=[0.0, 0.1], smoke=[0.0, 0.1])
IMPLS = ["eager", "compile", "mmfast-triton", "mmfast-cuda", "mmfast-cpu"]
_compiled = {}


def _inputs(B, Ls, D, dtype, n_sets):
    sets = []
    for i in range(n_sets):
        g = torch.Generator(device=DEVICE).manual_seed(i)
        rnd = lambda *s, dt=dtype: torch.randn(*s, generator=g, device=DEVICE, dtype=dt)
        feats = [rnd(B, L, D).requires_grad_() for L in Ls]
        params = dict(type_embeddings=rnd(len(Ls), D, dt=torch.float32).requires_grad_(),
                      pos_embeddings=[rnd(L, D, dt=torch.float32).requires_grad_() for L in Ls],
                      ln_weight=(1 + 0.1 * rnd(D, dt=torch.float32)).requires_grad_(),
                      ln_bias=rnd(D, dt=torch.float32).requires_grad_())
        grad = rnd(B, sum(Ls), D)
        sets.append((feats, params, grad))
    return sets


def _eager_params(params, dtype):
    """The eager formula in the features' dtype (what a model would run), gradients flowing back."""
    return dict(type_embeddings=params["type_embeddings"].to(dtype),
                pos_embeddings=[p.to(dtype) for p in params["pos_embeddings"]],
                ln_weight=params["ln_weight"].to(dtype), ln_bias=params["ln_bias"].to(dtype))


def _runner(impl, dtype, p):
    if impl == "eager":
        return lambda feats, params: reference(feats, **_eager_params(params, dtype), dropout_p=p, eps=1e-12)[0]
    if impl == "compile":
        key = (dtype, p)
        if key not in _compiled:
            _compiled[key] = torch.compile(
                lambda feats, params: reference(feats, **_eager_params(params, dtype), dropout_p=p, eps=1e-12)[0])
        return _compiled[key]
    backend = impl.split("-", 1)[1]
    return lambda feats, params: concat_embed(feats, **params, dropout_p=p, eps=1e-12, backend=backend)[0]


def _step(run, sets, mode):
    nxt = rotate(sets)

    def fwd():
        feats, params, _ = nxt()
        with torch.no_grad():
            return run(feats, params)

    def fwd_bwd():
        feats, params, grad = nxt()
        out = run(feats, params)
        leaves = feats + [params["type_embeddings"], *params["pos_embeddings"], params["ln_weight"], params["ln_bias"]]
        return torch.autograd.grad(out, leaves, grad)

    return fwd if mode == "fwd" else fwd_bwd


def _check(impl, inputs, dtype, mode, name):
    """The rule on the case's first input set (leading batch rows), at dropout 0: the fused faces
    draw their dropout mask from a hash, not from the eager formula's generator (tests/
    test_concat_embed.py checks the dropped output against that mask)."""
    feats, params, _ = inputs
    M, n = len(feats), check_rows(feats[0].shape[0])
    flat = [f[:n] for f in feats] + [params["type_embeddings"], *params["pos_embeddings"], params["ln_weight"],
                                      params["ln_bias"]]

    def unflat(a):
        return list(a[:M]), dict(type_embeddings=a[M], pos_embeddings=list(a[M + 1:2 * M + 1]), ln_weight=a[2 * M + 1],
                                 ln_bias=a[2 * M + 2])

    run = _runner(impl, dtype, 0.0)

    def ref(*a):  # the eager formula with the parameters in the features' dtype (float64 for the reference)
        fs, ps = unflat(a)
        return reference(fs, **_eager_params(ps, fs[0].dtype), eps=1e-12)[0]

    return rule_check(lambda *a: run(*unflat(a)), ref, flat, impl=impl, op="concat_embed", grad=mode != "fwd",
                      reduction=(feats[0].shape[2], n * sum(f.shape[1] for f in feats)), name=name)


def _bytes(B, Ls, D, dtype, mode):
    n = B * sum(Ls) * D * torch.finfo(dtype).bits // 8
    params = 4 * D * (sum(Ls) + len(Ls) + 2)  # position tables, type rows, LayerNorm (float32)
    fwd = 2 * n + params
    return fwd if mode == "fwd" else fwd + 3 * n + 2 * params


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("p", DROPOUT)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-L{'+'.join(map(str, s[1]))}-D{s[2]}")
@pytest.mark.parametrize("impl", IMPLS)
def test_concat_embed(benchmark, impl, shape, dtype, p, mode):
    if impl == "mmfast-cpu" and DEVICE != "cpu":
        pytest.skip("the C++ CPU face runs on CPU tensors")
    if impl == "compile" and SMOKE:
        pytest.skip("torch.compile: timed on the GPU only (compiling dominates a smoke run)")
    B, Ls, D = shape
    sets = _inputs(B, Ls, D, dtype, 1 if SMOKE else 3)
    fn = _step(_runner(impl, dtype, p), sets, mode)
    eager = _step(_runner("eager", dtype, p), sets, mode)
    case = f"B={B},L={'+'.join(map(str, Ls))},D={D},p={p}"
    bench(benchmark, fn, op="concat_embed", impl=impl, mode=mode, case=case, dtype=dtype, eager=eager,
          check=_check(impl, sets[0], dtype, mode, f"B={check_rows(B)},L={'+'.join(map(str, Ls))},D={D}"),
          bytes_moved=_bytes(B, Ls, D, dtype, mode), samples=B)
