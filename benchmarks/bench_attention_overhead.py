"""Python overhead of ``mmfast.ops.attention``: forward and forward+backward at a tiny size on the
CPU with the kernel call stubbed out, so what is timed is everything *around* the kernel (argument
checks, backend resolution, the custom-op and autograd machinery, face lookup).

The stub replaces ``mmfast.ops.attention._face`` for the duration of the measurement (here, not in
the library): its forward returns preallocated (out, lse), its backward preallocated gradients.

    PYTHONPATH=$PWD python benchmarks/bench_attention_overhead.py [--backend triton] [--n 20000]

prints microseconds per call (median and min of 5 repeats, one thread): forward without grad,
forward with inputs requiring grad (graph recorded, no backward), forward+backward. Under pytest (CI smoke) it
runs a few hundred calls and checks the stub is what ran; it asserts no timing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton face resolves on a CPU-only machine

import torch  # noqa: E402

import importlib  # noqa: E402

A = importlib.import_module("mmfast.ops.attention")  # the module (mmfast.ops re-exports the function)


@contextlib.contextmanager
def stubbed_kernels(q: torch.Tensor, k: torch.Tensor, calls: dict):
    """Every face's forward/backward replaced by a function returning preallocated outputs."""
    B, H, Lq, D = q.shape
    out, lse = torch.empty_like(q), torch.empty((B, H, Lq), dtype=torch.float32)
    grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(k))

    def fwd(*args):
        calls["fwd"] += 1
        return out, lse

    def bwd(*args):
        calls["bwd"] += 1
        return grads

    real = A._face
    A._face = lambda backend: (fwd, bwd)
    try:
        yield
    finally:
        A._face = real


def measure(backend: str = "triton", n: int = 20000, repeats: int = 5, dropout_p: float = 0.0) -> dict:
    """Median microseconds per call of forward (no grad) and of forward+backward."""
    torch.set_num_threads(1)
    q = torch.randn(1, 2, 8, 16)
    k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    calls = {"fwd": 0, "bwd": 0}
    res = {}
    with stubbed_kernels(q, k, calls):
        def fwd_only():
            with torch.no_grad():
                A.attention(q, k, v, backend=backend, dropout_p=dropout_p)

        def fwd_grad():  # the forward of a training step: records the graph, no backward
            A.attention(qg, kg, vg, backend=backend, dropout_p=dropout_p)

        def fwd_bwd():
            A.attention(qg, kg, vg, backend=backend, dropout_p=dropout_p).backward(q)

        for name, fn in (("fwd", fwd_only), ("fwd(grad)", fwd_grad), ("fwd+bwd", fwd_bwd)):
            for _ in range(min(n, 200)):  # warm-up (caches, lazy imports)
                fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                times.append((time.perf_counter() - t0) / n * 1e6)
            res[name] = statistics.median(times)
            res[name + " min"] = min(times)
    res["calls"] = dict(calls)
    return res


def test_overhead_smoke():
    """CI smoke: the stubbed faces are what ran (forward and backward), so the figures the script
    prints measure the Python around the kernel. No timing is asserted."""
    res = measure(n=50, repeats=1)
    assert res["calls"]["fwd"] > 0 and res["calls"]["bwd"] > 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--dropout", type=float, default=0.0)
    a = ap.parse_args()
    r = measure(a.backend, a.n, dropout_p=a.dropout)
    print(f"backend={a.backend} dropout={a.dropout} torch {torch.__version__} (median / min of 5 repeats, us per call): "
          + ", ".join(f"{k} {r[k]:.1f} / {r[k + ' min']:.1f}" for k in ("fwd", "fwd(grad)", "fwd+bwd")))
