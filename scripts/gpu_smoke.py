"""S2 of scripts/gpu_check.sh: every op x face (cuda, triton) x dtype on shapes of real fusion models,
through the public API with an explicit ``backend=``, forward and backward against float64 under the
rule of mmfast/testing.py (error <= 2x eager's in the same dtype, gradients 3x; outputs poisoned).

    python scripts/gpu_smoke.py FAMILY OUT.jsonl      FAMILY: attention | cross_entropy | concat_embed

One flushed JSON line per check: op, face, dtype, shape, direction, max_err, bound, passed, ms (plus
``skipped`` or ``error`` when it did not run). Directions: forward, backward, and for dropout:
dropout_repeatable (same seed, same output), dropout_fwd_bwd_mask (the backward drops exactly what
the forward dropped), dropout_contract (attention: the Philox mask of mmfast/reference/dropout.py),
cuda_graph (attention forward+backward captured and replayed). No pytest. GPU_CHECK_DRYRUN=1: CPU,
Triton interpreter, tiny shapes.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

from gpu_check import DRY, GPU_FACES, ROOT, SKIP_NO_GPU, Jsonl

sys.path.insert(0, str(ROOT / "benchmarks"))

if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import harness  # noqa: E402  (benchmarks/harness.py: the timer)
import mmfast  # noqa: E402
from mmfast import dispatch, testing  # noqa: E402
from mmfast import reference as ref  # noqa: E402
from mmfast.reference import dropout as ref_dropout  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FACES = GPU_FACES  # MMFAST_GPU_FACES; default cuda and triton
# The interpreter runs fp32 (and fp16 dot); bf16 tl.dot is garbage there (triton #11584).
DTYPES = (torch.float32,) if DRY else (torch.float16, torch.bfloat16, torch.float32)
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
P_DROP = 0.1
# Faces whose attention backward adds dQ with float atomics (csrc/cuda/attention.cu): not bitwise repeatable.
ATOMIC_DQ_FACES = ("cuda",)
_name = lambda dt: str(dt).replace("torch.", "")


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def rule(out: torch.Tensor, ref64: torch.Tensor, low: torch.Tensor, grad: bool) -> tuple[float, float, bool]:
    """(max error, the rule's bound, passed) without raising: the bound is what assert_close allows
    for this dtype, read by checking eager's own result against itself."""
    err = testing.max_abs_err(out, ref64)
    try:
        bound = testing.assert_close(low, ref64, low, grad=grad)["bound"]
    except AssertionError:  # eager itself has NaN where the reference has none
        bound = float("nan")
    try:
        testing.assert_close(out, ref64, low, grad=grad)
        return err, bound, True
    except AssertionError:
        return err, bound, False


class Checker:
    def __init__(self, out: Jsonl, op: str):
        self.w, self.op = out, op

    def skip_reason(self, face: str, dtype: torch.dtype) -> str | None:
        if DEV != "cuda" and face == "cuda":
            return SKIP_NO_GPU
        why = dispatch.availability(self.op, face, DEV, dtype)
        return None if why is None else f"skipped: {why}"

    def line(self, face, dtype, shape, direction, **kw):
        return self.w.write(op=self.op, face=face, dtype=_name(dtype), shape=shape, direction=direction, **kw)

    def guarded(self, face, dtype, shape, direction, fn):
        """Runs one check; an exception becomes a failed line naming it (the next check still runs)."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            self.line(face, dtype, shape, direction, passed=False, max_err=None, bound=None, ms=None,
                      error=f"{type(e).__name__}: {str(e)[:400]}", where=traceback.format_exc(limit=3)[-600:])

    def forward_backward(self, face, dtype, shape, fused, eager, inputs, grad_idx):
        """Rule check of ``fused`` (one output) against ``eager`` in float64, forward and backward."""
        why = self.skip_reason(face, dtype)
        if why:
            for direction in ("forward", "backward"):
                self.line(face, dtype, shape, direction, skipped=why)
            return

        def prep(conv):
            xs = [conv(x).detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs]
            for i in grad_idx:
                xs[i].requires_grad_(True)
            return xs

        to64 = lambda x: x.to(torch.float64) if x.is_floating_point() else x

        def run():
            kin = prep(lambda x: x)
            with testing.poisoned_outputs():
                out = fused(*kin)
            ms = harness.time_ms(lambda: fused(*kin), warmup=0, reps=1)
            rin, lin = prep(to64), prep(lambda x: x)
            r, lo = eager(*rin), eager(*lin)
            err, bound, ok = rule(out, r, lo, grad=False)
            self.line(face, dtype, shape, "forward", max_err=err, bound=bound, passed=ok, ms=ms)
            gen = torch.Generator().manual_seed(1)
            up = torch.randn(r.shape, generator=gen, dtype=torch.float64).to(DEV)
            backward = lambda: torch.autograd.grad(out, [kin[i] for i in grad_idx], up.to(out.dtype), retain_graph=True)
            with testing.poisoned_outputs():
                kg = backward()
            ms_b = harness.time_ms(backward, warmup=0, reps=1)
            rg = torch.autograd.grad(r, [rin[i] for i in grad_idx], up)
            lg = torch.autograd.grad(lo, [lin[i] for i in grad_idx], up.to(lo.dtype))
            checks = [(*rule(k, g64, gl, grad=True), i) for i, k, g64, gl in zip(grad_idx, kg, rg, lg)]
            failed = [ch for ch in checks if not ch[2]]
            e, b, _, i = failed[0] if failed else max(checks, key=lambda ch: ch[0] / ch[1] if ch[1] else 0.0)
            self.line(face, dtype, shape, "backward", max_err=e, bound=b, passed=not failed, ms=ms_b, worst_input=i)

        self.guarded(face, dtype, shape, "forward", run)


# --------------------------------------------------------------------------------------------- attention
ATTN_SHAPES = [  # (label, B, H, Lq, Lk, D, key mask, causal)
    ("B4 H12 40x197 D64 mask", 4, 12, 40, 197, 64, True, False),
    ("B1 H4 577x577 D128 causal", 1, 4, 577, 577, 128, False, True),
    ("B2 H6 197x40 D80 mask+causal", 2, 6, 197, 40, 80, True, True),
    ("B3 H2 1x7 D32 mask", 3, 2, 1, 7, 32, True, False),  # one query row
    ("B2 H3 113x113 D96 causal", 2, 3, 113, 113, 96, False, True),
    ("B2 H2 7x1 D64 mask", 2, 2, 7, 1, 64, True, False),  # one key
]
ATTN_DRY = [("B1 H2 7x13 D16 mask", 1, 2, 7, 13, 16, True, False),
            ("B1 H1 9x9 D32 causal", 1, 1, 9, 9, 32, False, True),
            ("B1 H2 13x5 D16 mask+causal", 1, 2, 13, 5, 16, True, True)]


def _key_mask(B, Lk, gen):
    lengths = torch.randint(1, Lk + 1, (B,), generator=gen)
    lengths[0] = Lk  # one sequence unpadded
    return torch.arange(Lk)[None, :] < lengths[:, None]


def check_attention(w: Jsonl):
    """Half precision first, fp32 last: fp32 Triton attention kernels compile slowest (up to ~47 s),
    and a stage stopped at its deadline should have the common dtypes already written."""
    c = Checker(w, "attention")
    gen = torch.Generator().manual_seed(0)
    shapes = [(s, _key_mask(s[1], s[4], gen).to(DEV) if s[6] else None) for s in (ATTN_DRY if DRY else ATTN_SHAPES)]
    for dtype in DTYPES:
        for (label, B, H, Lq, Lk, D, _, causal), mask in shapes:
            q, k, v = (testing.randn(B, H, L, D, dtype=dtype, device=DEV, seed=s) for s, L in ((1, Lq), (2, Lk), (3, Lk)))
            for face in FACES:
                c.forward_backward(face, dtype, label,
                                   lambda q, k, v: mmfast.ops.attention(q, k, v, key_padding_mask=mask, causal=causal,
                                                                        backend=face),
                                   lambda q, k, v: ref.attention(q, k, v, key_padding_mask=mask, causal=causal),
                                   [q, k, v], [0, 1, 2])
        for face in FACES:
            attention_dropout(c, face, dtype)
            if DEV == "cuda":
                attention_cuda_graph(c, face, dtype)


def attention_dropout(c: Checker, face: str, dtype: torch.dtype):
    """With V and the upstream gradient one-hot (Lq, Lk <= D), the forward output is the dropped,
    rescaled probability matrix and dV is its transpose: the two masks can be compared directly."""
    B, H, Lq, Lk, D = (1, 2, 7, 13, 16) if DRY else (2, 4, 40, 64, 64)
    shape = f"B{B} H{H} {Lq}x{Lk} D{D} p{P_DROP}"
    why = c.skip_reason(face, dtype)
    if why:
        for d in ("dropout_repeatable", "dropout_fwd_bwd_mask", "dropout_contract"):
            c.line(face, dtype, shape, d, skipped=why)
        return
    q = testing.randn(B, H, Lq, D, dtype=dtype, device=DEV, seed=4, scale=0.5)
    k = testing.randn(B, H, Lk, D, dtype=dtype, device=DEV, seed=5, scale=0.5)
    v = torch.eye(Lk, D, dtype=dtype, device=DEV).expand(B, H, Lk, D).contiguous().requires_grad_()
    run = lambda: mmfast.ops.attention(q, k, v, dropout_p=P_DROP, backend=face)

    def repeatable():
        torch.manual_seed(123)
        a = run()
        torch.manual_seed(123)
        b = run()
        ms = harness.time_ms(run, warmup=0, reps=1)
        c.line(face, dtype, shape, "dropout_repeatable", passed=bool(torch.equal(a, b)),
               max_err=testing.max_abs_err(a, b), bound=0.0, ms=ms)

    def fwd_bwd():
        torch.manual_seed(7)
        out = run()
        (dv,) = torch.autograd.grad(out, [v], torch.eye(Lq, D, dtype=dtype, device=DEV).expand(B, H, Lq, D))
        fwd, bwd = out.detach()[..., :Lk].float(), dv[..., :Lq].transpose(-1, -2).float()
        same_mask = torch.equal(fwd == 0, bwd == 0)
        err = float((fwd - bwd).abs().max())
        bound = 8 * torch.finfo(dtype).eps * float(fwd.abs().max())  # the probabilities, recomputed once
        c.line(face, dtype, shape, "dropout_fwd_bwd_mask", passed=same_mask and err <= bound, max_err=err,
               bound=bound, dropped=float((fwd == 0).float().mean()), ms=None)

    def contract():
        torch.manual_seed(11)
        seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64, device=DEV))  # what the op draws first
        torch.manual_seed(11)
        kept = (run().detach()[..., :Lk] != 0).cpu()
        want = ref_dropout.keep_mask(seed, B, H, Lq, Lk, P_DROP)
        c.line(face, dtype, shape, "dropout_contract", passed=bool(torch.equal(kept, want)),
               max_err=float((kept != want).float().mean()), bound=0.0, ms=None)

    for direction, fn in (("dropout_repeatable", repeatable), ("dropout_fwd_bwd_mask", fwd_bwd),
                          ("dropout_contract", contract)):
        c.guarded(face, dtype, shape, direction, fn)


def attention_cuda_graph(c: Checker, face: str, dtype: torch.dtype):
    shape = "B4 H12 40x197 D64 mask"
    if c.skip_reason(face, dtype):
        return c.line(face, dtype, shape, "cuda_graph", skipped=c.skip_reason(face, dtype))

    def run():
        q, k, v = (testing.randn(4, 12, L, 64, dtype=dtype, device=DEV, seed=s).requires_grad_()
                   for s, L in ((1, 40), (2, 197), (3, 197)))
        mask = torch.arange(197, device=DEV)[None] < torch.tensor([[197], [150], [60], [1]], device=DEV)
        g = testing.randn(4, 12, 40, 64, dtype=dtype, device=DEV, seed=9)
        step = lambda: (lambda o: (o, *torch.autograd.grad(o, [q, k, v], g)))(
            mmfast.ops.attention(q, k, v, key_padding_mask=mask, backend=face))
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            eager = step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        ms = harness.time_ms(graph.replay, warmup=0, reps=3)
        errs = {n: testing.max_abs_err(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), captured, eager)}
        # The replay must compute what the eager call computed: bit for bit, except dQ of a face that
        # sums it with float atomics (the order differs run to run): there one rounding of dQ's largest
        # value. The first H200 run demanded bits everywhere and failed the CUDA face by 1 fp16 ulp.
        dq_bound = torch.finfo(dtype).eps * float(eager[1].abs().max()) if face in ATOMIC_DQ_FACES else 0.0
        passed = errs["dq"] <= dq_bound and all(errs[n] == 0.0 for n in ("out", "dk", "dv"))
        c.line(face, dtype, shape, "cuda_graph", passed=passed, max_err=max(errs.values()), bound=dq_bound, ms=ms,
               errs=errs)

    c.guarded(face, dtype, shape, "cuda_graph", run)


# --------------------------------------------------------------------------------------------- losses
def check_losses(w: Jsonl):
    gen = torch.Generator().manual_seed(0)
    ce = Checker(w, "cross_entropy")
    shapes = [("N7 C1000", 7, 1000, -100, 0.0), ("N13 C197 ignore smooth0.1", 13, 197, 3, 0.1)] if DRY else \
        [("N4096 C30522", 4096, 30522, -100, 0.0), ("N577 C197 ignore smooth0.1", 577, 197, 3, 0.1)]
    for label, N, C, ignore, smooth in shapes:
        target = torch.randint(0, C, (N,), generator=gen)
        target[::5] = ignore if ignore >= 0 else target[::5]
        target = target.to(DEV)
        for dtype in DTYPES:
            x = testing.randn(N, C, dtype=dtype, device=DEV, seed=N, scale=3.0)
            for face in FACES:
                ce.forward_backward(face, dtype, label,
                                    lambda x: mmfast.ops.cross_entropy(x, target, ignore_index=ignore,
                                                                       label_smoothing=smooth, backend=face),
                                    lambda x: ref.cross_entropy(x, target, ignore_index=ignore, label_smoothing=smooth),
                                    [x], [0])
    lce = Checker(w, "linear_cross_entropy")
    N, Hd, V = (16, 32, 97) if DRY else (4096, 768, 30522)
    label = f"N{N} H{Hd} V{V} 15% labelled"
    t = torch.randint(0, V, (N,), generator=gen)
    t[torch.rand(N, generator=gen) > 0.15] = -100
    t = t.to(DEV)
    for dtype in DTYPES:
        h, wt = testing.randn(N, Hd, dtype=dtype, device=DEV, seed=1), testing.randn(V, Hd, dtype=dtype, device=DEV, seed=2, scale=0.05)
        b = testing.randn(V, dtype=dtype, device=DEV, seed=3, scale=0.1)
        for face in FACES:
            lce.forward_backward(face, dtype, label,
                                 lambda h, wt, b: mmfast.ops.linear_cross_entropy(h, wt, t, b, backend=face),
                                 lambda h, wt, b: ref.linear_cross_entropy(h, wt, t, b), [h, wt, b], [0, 1, 2])
    cl = Checker(w, "contrastive_loss")
    N, D = (8, 16) if DRY else (256, 512)
    for dtype in DTYPES:
        img = torch.nn.functional.normalize(testing.randn(N, D, seed=4), dim=-1).to(DEV, dtype)
        txt = torch.nn.functional.normalize(testing.randn(N, D, seed=5), dim=-1).to(DEV, dtype)
        scale = torch.tensor(14.3, device=DEV)
        for face in FACES:
            cl.forward_backward(face, dtype, f"N{N} D{D}",
                                lambda i, t_, s: mmfast.ops.contrastive_loss(i, t_, s, backend=face),
                                lambda i, t_, s: ref.contrastive_loss(i, t_, s), [img, txt, scale], [0, 1])


# --------------------------------------------------------------------------------------------- concat_embed
def check_concat_embed(w: Jsonl):
    c = Checker(w, "concat_embed")
    B, Ls, D = (2, (3, 5), 64) if DRY else (4, (40, 197), 768)
    label = f"B{B} ({','.join(map(str, Ls))}) D{D} LN"
    for dtype in DTYPES:
        feats = [testing.randn(B, L, D, dtype=dtype, device=DEV, seed=L) for L in Ls]
        # parameters in the features' dtype: eager's low-precision run is then all low precision
        te = testing.randn(2, D, dtype=dtype, device=DEV, seed=7)
        pos = [testing.randn(L + 1, D, dtype=dtype, device=DEV, seed=8 + L) for L in Ls]
        lw = (1 + 0.5 * testing.randn(D, seed=20)).to(DEV, dtype)
        lb = testing.randn(D, dtype=dtype, device=DEV, seed=21)

        def call(fn, *args, **kw):
            *fs, te_, p0, p1, w_, b_ = args
            return fn(list(fs), type_embeddings=te_, pos_embeddings=[p0, p1], ln_weight=w_, ln_bias=b_, eps=1e-5,
                      **kw)[0]

        for face in FACES:
            c.forward_backward(face, dtype, label, lambda *a: call(mmfast.ops.concat_embed, *a, backend=face),
                               lambda *a: call(ref.concat_embed, *a), [*feats, te, *pos, lw, lb],
                               list(range(len(Ls) + 5)))
            concat_embed_dropout(c, face, dtype, feats, te)


def concat_embed_dropout(c: Checker, face: str, dtype: torch.dtype, feats, te):
    """Without LayerNorm the gradient of a feature is elementwise, so its zeros are the forward's."""
    shape = f"B{feats[0].shape[0]} ({','.join(str(f.shape[1]) for f in feats)}) D{feats[0].shape[2]} p{P_DROP}"
    why = c.skip_reason(face, dtype)
    if why:
        for d in ("dropout_repeatable", "dropout_fwd_bwd_mask"):
            c.line(face, dtype, shape, d, skipped=why)
        return
    fs = [f.detach().clone().requires_grad_() for f in feats]
    run = lambda: mmfast.ops.concat_embed(fs, type_embeddings=te, dropout_p=P_DROP, backend=face)[0]

    def repeatable():
        torch.manual_seed(5)
        a = run()
        torch.manual_seed(5)
        c.line(face, dtype, shape, "dropout_repeatable", passed=bool(torch.equal(a, run())), bound=0.0,
               ms=harness.time_ms(run, warmup=0, reps=1), max_err=None)

    def fwd_bwd():
        torch.manual_seed(6)
        out = run()
        grads = torch.autograd.grad(out, fs, torch.ones_like(out))
        g = torch.cat(grads, dim=1)
        # A kept element whose feature + type embedding is exactly 0 is 0 too: in fp16/bf16 about 1e-4
        # of them (the first H200 run). So: what the backward dropped is 0 forward, and a forward 0
        # the backward kept must be 0 without dropout.
        undropped = mmfast.ops.concat_embed(fs, type_embeddings=te, dropout_p=0.0, backend=face)[0]
        wrong = ((g == 0) & (out != 0)) | ((g != 0) & (out == 0) & (undropped != 0))
        c.line(face, dtype, shape, "dropout_fwd_bwd_mask", passed=not bool(wrong.any()),
               max_err=float(wrong.float().mean()), bound=0.0, dropped=float((g == 0).float().mean()), ms=None)

    for direction, fn in (("dropout_repeatable", repeatable), ("dropout_fwd_bwd_mask", fwd_bwd)):
        c.guarded(face, dtype, shape, direction, fn)


FAMILIES = {"attention": check_attention, "cross_entropy": check_losses, "concat_embed": check_concat_embed}


def main(family: str, path: str) -> int:
    w = Jsonl(path)
    try:
        if DTYPES != ALL_DTYPES:
            for dt in ALL_DTYPES:
                if dt not in DTYPES:
                    w.write(op=family, face="*", dtype=_name(dt), shape="*", direction="*",
                            skipped="skipped: dry run (the Triton interpreter's bf16/fp16 dot; tiny shapes, fp32 only)")
        FAMILIES[family](w)
    except KeyboardInterrupt:
        w.write(op=family, face="*", dtype="*", shape="*", direction="*", skipped="stopped at the stage deadline")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
