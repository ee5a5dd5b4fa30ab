"""torch.profiler top-10 op tables of the zoo's fused models and their eager twins on the CPU
(issue #18): where a training step (forward + backward + AdamW) or an inference step spends its
time, self CPU time per op, averaged over steps after a warm-up.

    python benchmarks/profile_models.py [--size tiny|small] [--mode train|infer] [--threads N]
                                        [--steps 10] [--archs a,b] [--markdown out.md]

The same step functions as ``MMFAST_BENCH_CPU=1 python benchmarks/bench_models.py`` (same weights,
same batch of 8). Each table's first line gives the GEMM share (aten::mm/addmm/bmm/baddbmm self
time over all self time): the part of the step that fused kernels do not change, so 1 / (1 - the
rest) bounds what any fusion of the rest can gain. The line after each model's two tables bounds
what faster mmfast kernels could still give it: the eager step over the fused step without the
self time of mmfast's own ops (the C++ faces, ``mmfast_C::...``, and the autograd.Functions
around them, ``_Eager...``).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import ARCHS, _cpu_name, _cpu_pair  # noqa: E402

GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile_step(step, steps: int) -> tuple[collections.Counter, collections.Counter]:
    """(self CPU µs per step, calls per step) by op name."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    us, calls = collections.Counter(), collections.Counter()
    for e in prof.key_averages():
        us[e.key] += e.self_cpu_time_total / steps
        calls[e.key] += e.count / steps
    return us, calls


def table(arch: str, name: str, us, calls, top: int = 10) -> list[str]:
    total = sum(us.values())
    gemm = sum(us[k] for k in GEMMS)
    lines = [f"**{arch} {name}**: {total / 1e3:.1f} ms self CPU per step, GEMMs {100 * gemm / total:.0f}%", "",
             "| op | self ms | % | calls |", "|---|---|---|---|"]
    for k, v in us.most_common(top):
        lines.append(f"| {k[:60]} | {v / 1e3:.2f} | {100 * v / total:.1f} | {calls[k]:.0f} |")
    return lines + [""]


MMFAST_OPS = ("mmfast", "_Eager")  # the C++ faces (mmfast_C::...) and the Python autograd.Functions around them


def ops_bound(arch: str, eager_us: float, fused_us: float, fused_ops_us) -> str:
    """What faster mmfast kernels could still give this model: the fused step without the self time of
    mmfast's own ops (faces and their autograd wrappers), against the eager step."""
    ours = sum(v for k, v in fused_ops_us.items() if k.startswith(MMFAST_OPS))
    bound = eager_us / max(fused_us - ours, 1e-9)
    return (f"{arch}: mmfast's ops take {ours / 1e3:.1f} of the fused step's {fused_us / 1e3:.1f} ms; were they free, "
            f"fused / eager speed would be at most {bound:.2f}x (now {eager_us / fused_us:.2f}x under the profiler)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=("tiny", "small"))
    ap.add_argument("--mode", default="train", choices=("train", "infer"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--markdown", help="also write the tables to this file")
    a = ap.parse_args()
    archs = [x for x in a.archs.split(",") if x]
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown:
        ap.error(f"argument --archs: unknown architectures {unknown}; known: {list(ARCHS)}")
    torch.set_num_threads(a.threads)
    out = [f"{_cpu_name()}, {a.threads} thread(s), torch {torch.__version__}; {a.size} {a.mode}, batch 8, "
           f"{a.steps} profiled steps after 3 warm-up steps", ""]
    for arch in archs:
        steps, _, _ = _cpu_pair(arch, a.size, a.mode)
        totals = {}
        for name in ("eager", "fused"):
            us, calls = profile_step(steps[name], a.steps)
            out += table(arch, name, us, calls)
            print("\n".join(out[-14:]), flush=True)
            totals[name] = sum(us.values())
        out += [ops_bound(arch, totals["eager"], totals["fused"], us), ""]
        print(out[-2], flush=True)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
