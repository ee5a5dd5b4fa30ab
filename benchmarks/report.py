"""Turns pytest-benchmark JSON (written through benchmarks/harness.py) into:

    OUT/report.md          one Markdown table per op: ms, TFLOP/s, GB/s, % of the hardware peak,
                           peak memory, and ratios to eager / SDPA / torch.compile / Liger
    OUT/summary.txt        the short table scripts/gpu_check.sh prints last
    OUT/plot.png           speed-up over eager per case and implementation (matplotlib)
    OUT/kernel_table.json  the verified GPU kernels backend="auto" reads: a CUDA face is preferred
                           only where the GPU tests of its op family passed (--junit) and it beat
                           the Triton face on this architecture; copy it to mmfast/kernel_table.json
                           (or pass --update-table) when committing GPU results.

    python benchmarks/report.py bench.json [more.json ...] [--junit tests.xml] --out DIR [--update-table]

Smoke-mode results (CPU, tiny shapes) are reported but never enter the kernel table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Dense peak rates (TFLOP/s by dtype; HBM GB/s) for "% of floor" columns; SXM parts.
PEAKS = {
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0, "gbps": 3350.0},
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0, "gbps": 4800.0},
}
FAMILY_OPS = {
    "cross_entropy": ["cross_entropy", "linear_cross_entropy", "contrastive_loss"],
    "attention": ["attention"],
    "concat_embed": ["concat_embed"],
}
BASELINES = ["eager", "sdpa", "compile", "liger"]


def load_rows(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        for b in data.get("benchmarks", []):
            info = dict(b.get("extra_info") or {})
            if "op" not in info:
                continue
            info.setdefault("median_ms", b["stats"]["median"] * 1e3)
            rows.append(info)
    return rows


def peak_for(device: str) -> dict | None:
    return next((v for k, v in PEAKS.items() if k in device), None)


def fmt(x, nd=3):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}g}"
    return str(x)


def markdown(rows: list[dict]) -> str:
    by_op = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    lines = []
    if rows:
        r0 = rows[0]
        lines += [f"Device: **{r0.get('device')}** · torch {r0.get('torch')} · triton {r0.get('triton')} · "
                  f"mmfast {r0.get('mmfast')}" + (" · **SMOKE MODE (tiny shapes, not results)**" if r0.get("smoke") else ""), ""]
    for op, rs in sorted(by_op.items()):
        groups = defaultdict(dict)
        for r in rs:
            groups[(r["case"], r["mode"], r["dtype"])][r["impl"]] = r
        lines += [f"### {op}", "",
                  "| case | mode | dtype | impl | ms | TFLOP/s | GB/s | % peak | peak MB | × eager | × sdpa | × compile | × liger |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for (case, mode, dtype), impls in sorted(groups.items()):
            for impl, r in sorted(impls.items()):
                peak = peak_for(r.get("device", ""))
                pct = None
                if peak and r.get("tflops") and peak.get(dtype):
                    pct = 100 * r["tflops"] / peak[dtype]
                elif peak and r.get("gbps"):
                    pct = 100 * r["gbps"] / peak["gbps"]
                ratios = []
                for base in BASELINES:
                    b = impls.get(base)
                    if base == "eager" and r.get("ratio_to_eager") is not None:
                        ratios.append(r["ratio_to_eager"])
                    else:
                        ratios.append(b["median_ms"] / r["median_ms"] if b and impl != base else None)
                lines.append("| " + " | ".join([case, mode, dtype, impl, fmt(r["median_ms"]), fmt(r.get("tflops")),
                                                 fmt(r.get("gbps")), fmt(pct, 2), fmt(r.get("peak_mem_mb")),
                                                 *[fmt(x) for x in ratios]]) + " |")
        lines.append("")
    lines.append("Ratios: baseline time / this time (> 1 = faster), measured in the same process. "
                 "% peak: achieved TFLOP/s (or GB/s for memory-bound ops) against the dense peak.")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per op and impl: geometric mean of the speed-up over eager across cases and modes."""
    acc = defaultdict(list)
    for r in rows:
        if r.get("ratio_to_eager") and r["impl"] != "eager":
            acc[(r["op"], r["impl"])].append(r["ratio_to_eager"])
    out = [f"{'op':<24} {'impl':<16} {'cases':>5} {'x eager (geomean)':>18}"]
    for (op, impl), xs in sorted(acc.items()):
        g = math.exp(sum(math.log(x) for x in xs) / len(xs))
        out.append(f"{op:<24} {impl:<16} {len(xs):>5} {g:>18.2f}")
    if rows and rows[0].get("smoke"):
        out.append("(smoke mode: tiny shapes on CPU, not performance results)")
    return "\n".join(out)


def families_passing(junit: str | None) -> dict[str, bool]:
    """Op family -> whether its GPU tests ran (some cuda test not skipped) and none failed."""
    if not junit or not os.path.exists(junit):
        return {}
    status = {f: {"ran_cuda": False, "failed": False} for f in FAMILY_OPS}
    for tc in ET.parse(junit).getroot().iter("testcase"):
        name = (tc.get("classname", "") + "." + tc.get("name", "")).lower()
        for fam in FAMILY_OPS:
            if f"test_{fam}" not in name:
                continue
            if tc.find("failure") is not None or tc.find("error") is not None:
                status[fam]["failed"] = True
            elif tc.find("skipped") is None and "cuda" in name:
                status[fam]["ran_cuda"] = True
    return {f: s["ran_cuda"] and not s["failed"] for f, s in status.items()}


def kernel_table(rows: list[dict], passing: dict[str, bool], arch: str | None) -> list[dict]:
    table = []
    gpu_rows = [r for r in rows if not r.get("smoke") and not r.get("device", "").startswith("CPU")]
    for fam, ops in FAMILY_OPS.items():
        for op in ops:
            for dtype in sorted({r["dtype"] for r in gpu_rows if r["op"] == op}):
                times = defaultdict(dict)
                for r in gpu_rows:
                    if r["op"] == op and r["dtype"] == dtype:
                        times[(r["case"], r["mode"])][r["impl"]] = r["median_ms"]
                pairs = [t["mmfast-triton"] / t["mmfast-cuda"] for t in times.values()
                         if "mmfast-triton" in t and "mmfast-cuda" in t]
                for backend in ("mmfast-cuda", "mmfast-triton"):
                    if not any(backend in t for t in times.values()):
                        continue
                    row = {"op": op, "backend": backend.split("-")[1], "arch": arch, "dtype": dtype,
                           "device": gpu_rows[0]["device"], "correct": bool(passing.get(fam))}
                    if backend == "mmfast-cuda" and pairs:
                        g = math.exp(sum(math.log(p) for p in pairs) / len(pairs))
                        row["speedup_vs_triton"] = round(g, 3)
                        row["faster_than_triton"] = g > 1.0
                    table.append(row)
    return table


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    pts = [r for r in rows if r.get("ratio_to_eager") and r["impl"] != "eager"]
    if not pts:
        return False
    labels = sorted({f"{r['op']}\n{r['case']}\n{r['mode']}" for r in pts})
    impls = sorted({r["impl"] for r in pts})
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(labels) * max(1, len(impls)) / 2), 5))
    w = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        ys = []
        for lab in labels:
            m = [r["ratio_to_eager"] for r in pts if r["impl"] == impl and f"{r['op']}\n{r['case']}\n{r['mode']}" == lab]
            ys.append(m[0] if m else 0)
        ax.bar([x + i * w for x in range(len(labels))], ys, w, label=impl)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([x + 0.4 - w / 2 for x in range(len(labels))], labels, fontsize=6, rotation=90)
    ax.set_ylabel("speed-up over eager (×)")
    ax.set_title(f"mmfast on {pts[0].get('device')}" + (" (smoke)" if pts[0].get("smoke") else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+")
    ap.add_argument("--junit", default=None, help="pytest --junitxml of the GPU test run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default=None, help="e.g. sm_90 (default: this machine's GPU)")
    ap.add_argument("--update-table", action="store_true", help="also write mmfast/kernel_table.json")
    args = ap.parse_args(argv)
    rows = load_rows([p for p in args.json if os.path.exists(p)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(rows) + "\n")
    (out / "summary.txt").write_text(summary(rows) + "\n")
    plot(rows, out / "plot.png")
    arch = args.arch
    if arch is None:
        try:
            import torch

            if torch.cuda.is_available():
                arch = "sm_%d%d" % torch.cuda.get_device_capability()
        except ImportError:
            pass
    table = kernel_table(rows, families_passing(args.junit), arch)
    doc = {"description": json.loads((ROOT / "mmfast" / "kernel_table.json").read_text())["description"],
           "verified": table}
    (out / "kernel_table.json").write_text(json.dumps(doc, indent=1) + "\n")
    if args.update_table and table:
        (ROOT / "mmfast" / "kernel_table.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"report: {len(rows)} results -> {out}/report.md, summary.txt, plot.png, kernel_table.json ({len(table)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
