"""How fast and how accurate the CPU's float32 GEMMs are at the small zoo models' linear-layer
shapes (issue #18: the linear layers are 71-77% of an inference step, the same calls in the fused
model and its eager twin): MKL through ``F.linear`` against oneDNN's ``mkldnn._linear_pointwise``,
with the weight as given and prepacked, GFLOP/s per thread count, and each one's largest error
against float64.

    python benchmarks/bench_linear_cpu.py [--threads 1,2] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import _cpu_name, emit_row, write_table, thread_counts  # noqa: E402

# (rows, in, out): ViT-S/16 at batch 8 (1576 rows): qkv, proj, fc1, fc2; MiniLM text at batch 8 (320)
SHAPES = [(1576, 384, 1152), (1576, 384, 384), (1576, 384, 1536), (1576, 1536, 384),
          (320, 384, 384), (320, 384, 1536), (320, 1536, 384)]


def _median_s(fn, n: int = 30) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _kernels(x, w, b):
    packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
    return {"MKL F.linear": lambda: F.linear(x, w, b),
            "oneDNN": lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""),
            "oneDNN prepacked": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--out", help="also write the table to this file")
    a = ap.parse_args()
    threads = thread_counts(ap, a.threads)
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("bench_linear_cpu: this torch build has no oneDNN (torch.backends.mkldnn)")
    lines = [f"{_cpu_name()} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, load average {os.getloadavg()[0]:.1f}; float32 "
             "y = x W^T + b, median of 30 calls; error: max |y - y_float64|", "",
             "| rows x in x out | threads | MKL GFLOP/s | oneDNN GFLOP/s | oneDNN prepacked GFLOP/s "
             "| prepacked / MKL | MKL error | oneDNN error | oneDNN / MKL error |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    gen = torch.Generator().manual_seed(0)
    for t in threads:
        torch.set_num_threads(t)
        for M, K, N in SHAPES:
            x = torch.randn(M, K, generator=gen)
            w = torch.randn(N, K, generator=gen) * K ** -0.5
            b = torch.randn(N, generator=gen)
            ref = F.linear(x.double(), w.double(), b.double())
            ks = _kernels(x, w, b)
            err = {n: (f().double() - ref).abs().max().item() for n, f in ks.items()}
            gf = {n: 2 * M * K * N / _median_s(f) / 1e9 for n, f in ks.items()}
            row = (f"| {M} x {K} x {N} | {t} | {gf['MKL F.linear']:.1f} | {gf['oneDNN']:.1f} "
                   f"| {gf['oneDNN prepacked']:.1f} | {gf['oneDNN prepacked'] / gf['MKL F.linear']:.2f}x "
                   f"| {err['MKL F.linear']:.2e} | {err['oneDNN']:.2e} | {err['oneDNN'] / err['MKL F.linear']:.2f}x |")
            emit_row(lines, row)
    write_table(lines, a.out)


if __name__ == "__main__":
    sys.exit(main())
