"""The CPU attention face's two kernels at the model zoo's shapes: mmfast's C++ kernel
(csrc/cpu/attention.cpp, what the face runs when the extension is built) against ATen's CPU flash
kernels with mmfast's masks (what it runs without the extension) and the eager formula
(matmul, masked_fill, softmax, matmul: what the zoo's eager twins run), forward and forward +
backward, float32, interleaved medians in one process.

    python benchmarks/bench_attention_cpu.py [--threads 1,2] [--out FILE]

A second table times the same shapes with attention dropout p = 0.1 (the zoo's training steps): the
C++ kernel (its Philox mask, regenerated in the backward) against the eager formula with
``F.dropout`` on the probabilities; ATen's kernels take no dropout mask of mmfast's.

Each kernel's output and gradients are first checked against the eager formula in float64 (with
dropout: the same Philox mask, mmfast.reference.dropout.keep_mask), and the timings of a wrong
kernel are not printed."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import _cpu_name, emit_row, write_table, thread_counts  # noqa: E402
from mmfast.train.timing import interleaved_medians  # noqa: E402

A = importlib.import_module("mmfast.ops.attention")
DROPOUT_P = 0.1
DROPOUT_SEED = 1234

# (label, B, H, Lq, Lk, D, key padding mask): the zoo's attention calls at small and tiny size
SHAPES = [
    ("ViT-S/16 self, batch 8", 8, 6, 197, 197, 64, False),
    ("single_stream small, ITM batch 16", 16, 6, 237, 237, 64, True),
    ("MiniLM text self", 8, 12, 40, 40, 32, True),
    ("text -> image cross", 8, 12, 40, 197, 32, False),
    ("image -> text cross", 8, 12, 197, 40, 32, True),
    ("tiny text self", 8, 2, 7, 7, 32, True),
    ("tiny single_stream", 16, 2, 24, 24, 32, True),
    ("tiny image self", 8, 2, 17, 17, 32, False),
]


def _eager(q, k, v, mask, scale, dropout_p=0.0, keep=None):
    """The eager twins' formula; with dropout, F.dropout's own mask, or ``keep`` (scaled by 1/(1-p))."""
    s = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], torch.finfo(s.dtype).min)
    p = s.softmax(-1)
    if keep is not None:
        p = p * keep / (1 - dropout_p)
    elif dropout_p > 0:
        p = torch.nn.functional.dropout(p, dropout_p)
    return p @ v


def _cpp_dropout():
    """The C++ kernel's forward and backward with attention dropout (DROPOUT_P, DROPOUT_SEED)."""
    seed = torch.tensor([DROPOUT_SEED], dtype=torch.int64)

    def fwd(q, k, v, mask, scale):
        return A.cpu_forward(q, k, v, mask, seed, False, scale, DROPOUT_P)

    def bwd(g, q, k, v, out, lse, mask, scale):
        return A.cpu_backward(g, q, k, v, out, lse, mask, seed, False, scale, DROPOUT_P)
    return fwd, bwd


def _face(kernel: str):
    """Forward and backward of the CPU face with one kernel forced."""
    use = kernel == "C++"

    def fwd(q, k, v, mask, scale):
        saved = A._use_cpp
        A._use_cpp = lambda *a: use
        try:
            return A.cpu_forward(q, k, v, mask, None, False, scale, 0.0)
        finally:
            A._use_cpp = saved

    def bwd(g, q, k, v, out, lse, mask, scale):
        saved = A._use_cpp
        A._use_cpp = lambda *a: use
        try:
            return A.cpu_backward(g, q, k, v, out, lse, mask, None, False, scale, 0.0)
        finally:
            A._use_cpp = saved
    return fwd, bwd


def _inputs(B, H, Lq, Lk, D, masked, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, Lq, H, D, generator=gen, dtype=dtype).transpose(1, 2)  # the models' layout
    k, v = (torch.randn(B, Lk, H, D, generator=gen, dtype=dtype).transpose(1, 2) for _ in range(2))
    g = torch.randn(B, Lq, H, D, generator=gen, dtype=dtype).transpose(1, 2)
    mask = None
    if masked:
        mask = torch.ones(B, Lk, dtype=torch.bool)
        mask[-1, max(1, Lk // 2):] = False
    return q, k, v, g, mask


def check(shape) -> None:
    """Every kernel against the eager formula in float64 (forward and the three gradients); the
    C++ kernel with dropout against the formula with the same Philox mask."""
    from mmfast.reference.dropout import keep_mask

    _, B, H, Lq, Lk, D, masked = shape
    q, k, v, g, mask = _inputs(B, H, Lq, Lk, D, masked)
    scale = D ** -0.5
    keep = keep_mask(DROPOUT_SEED, B, H, Lq, Lk, DROPOUT_P).double()
    for kernel, (fwd, bwd), dropped in [("C++", _face("C++"), None), ("ATen", _face("ATen"), None),
                                        ("C++ with dropout", _cpp_dropout(), keep)]:
        q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
        ref = _eager(q64, k64, v64, mask, scale, DROPOUT_P if dropped is not None else 0.0, dropped)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
        out, lse = fwd(q, k, v, mask, scale)
        grads = bwd(g, q, k, v, out, lse, mask, scale)
        for name, got, want in [("out", out, ref)] + list(zip(("dq", "dk", "dv"), grads, ref_grads)):
            err = (got.double() - want).abs().max().item()
            bound = 1e-4 * max(1.0, want.abs().max().item())
            if not err <= bound:
                raise SystemExit(f"bench_attention_cpu: {kernel} {name} at {shape[0]} is off by {err:.3g} "
                                 f"(> {bound:.3g}); not timing a wrong kernel")


def time_dropout_shape(shape, rounds: int) -> dict:
    """The C++ kernel and the eager formula with attention dropout DROPOUT_P."""
    _, B, H, Lq, Lk, D, masked = shape
    q, k, v, g, mask = _inputs(B, H, Lq, Lk, D, masked)
    scale = D ** -0.5
    fwd, bwd = _cpp_dropout()
    qe, ke, ve = (x.detach().clone().requires_grad_() for x in (q, k, v))
    steps = {"C++ fwd": lambda: fwd(q, k, v, mask, scale),
             "C++ fwd+bwd": lambda: bwd(g, q, k, v, *fwd(q, k, v, mask, scale), mask, scale),
             "eager fwd": lambda: _eager(q, k, v, mask, scale, DROPOUT_P),
             "eager fwd+bwd": lambda: torch.autograd.grad(_eager(qe, ke, ve, mask, scale, DROPOUT_P), (qe, ke, ve), g)}
    return {n: t * 1e3 for n, t in interleaved_medians(steps, rounds, warmup=1).items()}


def time_shape(shape, rounds: int) -> dict:
    _, B, H, Lq, Lk, D, masked = shape
    q, k, v, g, mask = _inputs(B, H, Lq, Lk, D, masked)
    scale = D ** -0.5
    steps = {}
    for kernel in ("C++", "ATen"):
        fwd, bwd = _face(kernel)
        steps[f"{kernel} fwd"] = lambda fwd=fwd: fwd(q, k, v, mask, scale)
        steps[f"{kernel} fwd+bwd"] = lambda fwd=fwd, bwd=bwd: bwd(g, q, k, v, *fwd(q, k, v, mask, scale), mask,
                                                                 scale)
    qe, ke, ve = (x.detach().clone().requires_grad_() for x in (q, k, v))
    steps["eager fwd"] = lambda: _eager(q, k, v, mask, scale)
    steps["eager fwd+bwd"] = lambda: torch.autograd.grad(_eager(qe, ke, ve, mask, scale), (qe, ke, ve), g)
    return {n: t * 1e3 for n, t in interleaved_medians(steps, rounds, warmup=1).items()}


def test_smoke_checks_and_times_the_tiny_shapes():
    """CI: the check passes (and can fail: a kernel off by a constant is refused) and a timing runs."""
    import pytest

    from mmfast import _extension

    if not _extension.has_kernel("attention_forward", "CPU"):
        pytest.skip("the C++ extension is not built")
    tiny = [s for s in SHAPES if s[0].startswith("tiny")]
    for s in tiny:
        check(s)
    assert set(time_shape(tiny[0], rounds=1)) == {f"{k} {d}" for k in ("C++", "ATen", "eager")
                                                  for d in ("fwd", "fwd+bwd")}
    assert set(time_dropout_shape(tiny[0], rounds=1)) == {f"{k} {d}" for k in ("C++", "eager")
                                                          for d in ("fwd", "fwd+bwd")}
    real = A.cpu_forward
    A.cpu_forward = lambda *args: (lambda out, lse: (out + 1e-3, lse))(*real(*args))
    try:
        with pytest.raises(SystemExit, match="not timing a wrong kernel"):
            check(tiny[0])
    finally:
        A.cpu_forward = real
    # a dropout kernel whose mask is not the Philox contract's (another seed) is refused too
    A.cpu_forward = lambda q, k, v, m, seed, *rest: real(q, k, v, m, None if seed is None else seed + 1, *rest)
    try:
        with pytest.raises(SystemExit, match="C\\+\\+ with dropout out .* not timing a wrong kernel"):
            check(tiny[0])
    finally:
        A.cpu_forward = real


def rows(lines: list, threads, time, cells) -> None:
    """One table row per thread count and shape: ``time(shape, rounds)``'s medians through ``cells``."""
    for t in threads:
        torch.set_num_threads(t)
        for s in SHAPES:
            label, B, H, Lq, Lk, D, masked = s
            r = time(s, rounds=15 if Lq * Lk > 10_000 else 200)
            emit_row(lines, f"| {label}: ({B}, {H}, {Lq}, {Lk}, {D}){' masked' if masked else ''} | {t} " + cells(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--out", help="also write the table to this file")
    a = ap.parse_args()
    threads = thread_counts(ap, a.threads)
    from mmfast import _extension

    if not _extension.has_kernel("attention_forward", "CPU"):
        raise SystemExit("bench_attention_cpu: the C++ extension is not built (python setup.py build_ext --inplace)")
    for s in SHAPES:
        check(s)
    lines = [f"{_cpu_name()} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, load average {os.getloadavg()[0]:.1f}; float32, "
             "median ms of interleaved calls; ratios: ATen's time / C++'s and eager's time / C++'s", "",
             "| shape (B, H, Lq, Lk, D) | threads | C++ fwd | ATen fwd | eager fwd | C++ fwd+bwd | ATen fwd+bwd "
             "| eager fwd+bwd | C++ vs ATen fwd / fwd+bwd | C++ vs eager fwd / fwd+bwd |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    rows(lines, threads, time_shape, lambda r: (
        f"| {r['C++ fwd']:.3f} | {r['ATen fwd']:.3f} | {r['eager fwd']:.3f} "
        f"| {r['C++ fwd+bwd']:.3f} | {r['ATen fwd+bwd']:.3f} | {r['eager fwd+bwd']:.3f} "
        f"| {r['ATen fwd'] / r['C++ fwd']:.2f}x / {r['ATen fwd+bwd'] / r['C++ fwd+bwd']:.2f}x "
        f"| {r['eager fwd'] / r['C++ fwd']:.2f}x / {r['eager fwd+bwd'] / r['C++ fwd+bwd']:.2f}x |"))
    header = ["", f"With attention dropout p = {DROPOUT_P} (training): the C++ kernel (Philox mask, regenerated in "
              "the backward) against the eager formula with F.dropout; ratio: eager's time / C++'s", "",
              "| shape (B, H, Lq, Lk, D) | threads | C++ fwd | eager fwd | C++ fwd+bwd | eager fwd+bwd "
              "| C++ vs eager fwd / fwd+bwd |", "|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    lines += header
    rows(lines, threads, time_dropout_shape, lambda r: (
        f"| {r['C++ fwd']:.3f} | {r['eager fwd']:.3f} | {r['C++ fwd+bwd']:.3f} | {r['eager fwd+bwd']:.3f} "
        f"| {r['eager fwd'] / r['C++ fwd']:.2f}x / {r['eager fwd+bwd'] / r['C++ fwd+bwd']:.2f}x |"))
    write_table(lines, a.out)


if __name__ == "__main__":
    sys.exit(main())
