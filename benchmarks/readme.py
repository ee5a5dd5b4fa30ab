"""Writes README.md's "Status, honestly" and "Benchmarks" sections from committed result files, so that
no figure or claim in them is typed by hand:

    mmfast/kernel_table.json          which GPU faces were verified (S2 of scripts/gpu_check.sh) and
                                      how they compare with the torch reference per size bucket (S4)
    benchmarks/results/<name>/        a GPU check's stage files (env.json, bench.jsonl, ...), GPU runs only

    python benchmarks/readme.py --write    rewrite the two sections in README.md
    python benchmarks/readme.py --check    exit 1 if README.md differs from what this script writes

The sections sit between ``<!-- generated:status -->`` / ``<!-- generated:benchmarks -->`` and their
``<!-- /generated:... -->`` markers; everything else in README.md is left alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
TABLE = ROOT / "mmfast" / "kernel_table.json"


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def gpu_runs() -> list[tuple[str, dict, list[dict]]]:
    """(folder name, env.json, bench rows) of every committed GPU check (dry runs excluded)."""
    runs = []
    for d in sorted(p for p in RESULTS.glob("*") if (p / "env.json").exists()):
        env = json.loads((d / "env.json").read_text())
        if not env.get("dryrun") and isinstance(env.get("gpu"), dict):
            runs.append((d.name, env, _jsonl(d / "bench.jsonl")))
    return runs


def status_section(rows: list[dict], runs: list) -> str:
    head = "> **Status, honestly.** "
    if not rows:
        return (head + "No GPU has run this code yet. CUDA kernels are *compiled* (for sm_90), not *verified*;\n"
                "> Triton kernels are tested on the CPU through the Triton interpreter (fp32/fp16); the C++ CPU\n"
                "> kernels are tested and timed on the CPU. So on a GPU `backend=\"auto\"` runs the torch reference\n"
                "> for every op: it uses a face only where `mmfast/kernel_table.json` records it as verified by a\n"
                "> GPU check and measured faster than the reference for that size (`MMFAST_TRUST_UNVERIFIED=1`\n"
                "> overrides this for development). `mmfast info` says, per op, what `auto` picks and why.\n"
                "> There are no GPU benchmark figures in this repository yet — see [Benchmarks](#benchmarks).")
    committed = ", ".join(f"`{n}` ({e['gpu']['name']})" for n, e, _ in runs) or "none"
    lines = [head + f"GPU checks committed: {committed}. "
             "Per op and face, from `mmfast/kernel_table.json` (verified = every smoke check of the GPU check "
             "passed; speed-up = torch reference time / face time, the slowest case per size bucket); `auto` "
             "uses a face only where it is verified and faster in the call's size bucket, else the torch "
             "reference. Anything not listed never ran on a GPU. `mmfast info` says what `auto` picks and why.", "",
             "| op | face | GPU | dtype | verified | speed-up over the reference |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["op"], r["backend"], r["arch"] or "", r["dtype"])):
        speed = ", ".join(f"{b}: {x:.2f}×" for b, x in r.get("speedup_vs_reference", {}).items()) or "not timed"
        verdict = "yes" if r.get("verified") else "**no**: " + "; ".join(r.get("failed", [])[:2])
        lines.append(f"| {r['op']} | {r['backend']} | {r['arch']} | {r['dtype']} | {verdict} | {speed} |")
    return "\n".join(lines)


def _bench_table(rows: list[dict]) -> list[str]:
    out = ["| op | case | mode | dtype | impl | median ms | TFLOP/s | GB/s | × eager | × best SDPA | peak MB |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda x, nd=3: "–" if x is None else f"{x:.{nd}g}"
    for r in rows:
        if "median_ms" not in r:
            continue
        out.append(f"| {r['op']} | {r['case']} | {r['mode']} | {r['dtype']} | {r['impl']} | {f(r['median_ms'])} | "
                   f"{f(r.get('tflops'))} | {f(r.get('gbps'))} | {f(r.get('ratio_to_eager'))} | "
                   f"{f(r.get('ratio_to_best_sdpa'))} | {f(r.get('peak_mem_mb'), 4)} |")
    return out


def benchmarks_section(runs: list) -> str:
    lines = ["```bash",
             "bash scripts/gpu_prepare.sh                  # CPU machine: wheels to carry, and the one call to make",
             "bash scripts/gpu_check.sh                    # GPU machine: staged check (S0 env .. S5 tests, report), <= 8 min",
             "GPU_CHECK_DRYRUN=1 bash scripts/gpu_check.sh # any machine: the same stages on the CPU, tiny shapes (CI runs it)",
             "```", "",
             "The GPU check writes, stage by stage: `env.json`, `build.log`, `smoke.jsonl` (every op × face × dtype "
             "against float64 under the rule), `sanitizer.txt`, `bench.jsonl` (CUDA events; no autotuning, no "
             "torch.compile), `tests.xml`, then `report.md`, `plot.png` and `kernel_table.json`. "
             "`benchmarks/report.py --stages DIR [DIR ...] --update-table` turns committed runs into "
             "`mmfast/kernel_table.json` (per row the newest run that checked or timed it; runs of other kernel "
             "sources are left out), and `benchmarks/readme.py --write` regenerates this section and the "
             "status above from the committed files. CPU-only pytest-benchmark suites: "
             "`.venv/bin/python -m pytest benchmarks/` (smoke mode without a GPU).", ""]
    if not runs:
        lines.append("**GPU results: none yet.** No GPU was available to the sessions that wrote this code.")
    for name, env, bench in runs:
        gpu, versions = env["gpu"], env.get("versions", {})
        lines += [f"### `benchmarks/results/{name}/`: {gpu['name']} ({gpu.get('capability')}), {env.get('started')}", "",
                  f"torch {versions.get('torch')}, triton {versions.get('triton')}; measured as written in "
                  f"`bench.jsonl` (median of CUDA-event timings; × = baseline time / this time, same process).", "",
                  *_bench_table(bench), ""]
    return "\n".join(lines).rstrip()


def sections() -> dict[str, str]:
    rows = json.loads(TABLE.read_text()).get("verified", []) if TABLE.exists() else []
    runs = gpu_runs()
    return {"status": status_section([r for r in rows if r.get("arch")], runs), "benchmarks": benchmarks_section(runs)}


def render(text: str) -> str:
    for name, body in sections().items():
        pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(\n<!-- /generated:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- generated:{name} --> ... <!-- /generated:{name} --> markers")
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    current = README.read_text()
    wanted = render(current)
    if args.write:
        README.write_text(wanted)
        return 0
    if current != wanted:
        print("README.md's generated sections are stale: run python benchmarks/readme.py --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
