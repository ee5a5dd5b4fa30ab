"""Reports of benchmark and GPU-check results.

1. The files of scripts/gpu_check.sh's stages (env.json, build.log, smoke.jsonl, sanitizer.txt,
   bench.jsonl, tests.xml, stages.jsonl) become, in the same folder:

    report.md          every stage's outcome, smoke checks per op x face x dtype, benchmarks, tests
    summary.txt        the short table gpu_check.sh prints last
    plot.png           speed-up over eager per case and implementation
    kernel_table.json  per (op, face, arch, dtype): verified (every S2 check ran and passed) and the
                       speed-up over the torch reference per size bucket (S4); what backend="auto"
                       reads once copied to mmfast/kernel_table.json (--update-table)

    python benchmarks/report.py --stages DIR [DIR ...] [--update-table]

   Several folders: runs of one tree on short leases; mmfast/kernel_table.json takes each row from
   the newest run that checked it (S2) and the newest that timed it (S4).

   Dry-run results (CPU, tiny shapes) are reported but their rows carry no GPU arch, so auto never
   uses them.

2. Older: pytest-benchmark JSON (written through benchmarks/harness.py) becomes:

    OUT/report.md          one Markdown table per op: ms, TFLOP/s, GB/s, % of the hardware peak,
                           peak memory, and ratios to eager / SDPA / torch.compile / Liger
    OUT/summary.txt        the short table scripts/gpu_check.sh prints last
    OUT/plot.png           speed-up over eager per case and implementation (matplotlib)

    python benchmarks/report.py bench.json [more.json ...] --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
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
TABLE_DESCRIPTION = (
    "Per (op, backend, arch, dtype): verified = every check of scripts/gpu_check.sh's S2 smoke stage ran and passed "
    "on that GPU (checked_in: the run); speedup_vs_reference = time of the torch reference / time of the face, per "
    "size bucket (dispatch.size_bucket), the slowest case of the bucket, from S4 benchmarks (timed_in: the run). "
    "backend='auto' on a GPU uses a face only where verified and faster in the call's bucket. Written by "
    "benchmarks/report.py --stages DIR [DIR ...] --update-table (the newest run that checked or timed a row wins).")


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


# ============================================================================================= GPU check
STAGE_FILES = ("env.json", "build.log", "smoke.jsonl", "sanitizer.txt", "bench.jsonl", "tests.xml")


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a line cut off by a killed stage is skipped."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def _dispatch():
    import sys

    sys.path.insert(0, str(ROOT))
    from mmfast import dispatch

    return dispatch


def smoke_verdicts(smoke: list[dict]) -> dict[tuple, dict]:
    """(op, face, dtype) -> {ran, passed, failed: [short descriptions], skipped: reason}."""
    out: dict[tuple, dict] = {}
    for r in smoke:
        if r.get("face") in (None, "*") or r.get("placeholder"):
            continue
        v = out.setdefault((r["op"], r["face"], r["dtype"]), {"ran": 0, "passed": 0, "failed": [], "skipped": None})
        if "skipped" in r:
            v["skipped"] = r["skipped"]
            continue
        v["ran"] += 1
        if r.get("passed"):
            v["passed"] += 1
        else:
            what = r.get("error") or f"max_err {fmt(r.get('max_err'))} > bound {fmt(r.get('bound'))}"
            v["failed"].append(f"{r['shape']} {r['direction']}: {what}")
    return out


def kernel_table_rows(smoke: list[dict], bench: list[dict], arch: str | None) -> list[dict]:
    """One row per (op, face, dtype) that S2 ran: verified when every check ran and passed; the
    speed-up over the torch reference ("eager" in S4) per size bucket, the slowest of the bucket's
    cases and modes (a face is only as fast as its worst case there)."""
    dispatch = _dispatch()
    speed: dict[tuple, dict] = defaultdict(dict)
    for r in bench:
        if r.get("ratio_to_eager") is None or not str(r.get("impl", "")).startswith("mmfast-") or r.get("dryrun"):
            continue
        key = (r["op"], r["impl"].split("-", 1)[1], r["dtype"])
        b = dispatch.size_bucket(r["work"])
        speed[key][b] = round(min(speed[key].get(b, math.inf), r["ratio_to_eager"]), 3)
    rows = []
    for (op, face, dtype), v in sorted(smoke_verdicts(smoke).items()):
        if not v["ran"]:
            continue
        rows.append({"op": op, "backend": face, "arch": arch, "dtype": dtype,
                     "verified": v["passed"] == v["ran"], "checks": v["ran"], "failed": v["failed"][:5],
                     "speedup_vs_reference": dict(sorted(speed.get((op, face, dtype), {}).items()))})
    return rows


def _run_rows(d: Path) -> tuple[str, list[dict], str | None]:
    """(start time, kernel_table rows, kernel-source fingerprint) of one committed GPU run; no rows
    for a dry run. Runs from before env.json recorded the fingerprint give None."""
    env = json.loads((d / "env.json").read_text()) if (d / "env.json").exists() else {}
    gpu = env.get("gpu") if isinstance(env.get("gpu"), dict) else {}
    if env.get("dryrun") or not gpu.get("capability"):
        return "", [], None
    rows = kernel_table_rows(read_jsonl(d / "smoke.jsonl"), read_jsonl(d / "bench.jsonl"), gpu["capability"])
    return str(env.get("started", "")), rows, env.get("kernel_sources")


def merged_kernel_table(dirs: list[Path]) -> list[dict]:
    """The kernel table of several GPU runs of one tree (a short lease rarely finishes every stage):
    per (op, face, arch, dtype) the verdict of the newest run whose S2 checked it, and the speed-ups
    of the newest run whose S4 timed it. Each row names the runs it comes from."""
    merged: dict[tuple, dict] = {}
    planned: dict[tuple, int] = defaultdict(int)  # checks per (op, arch, dtype): the most any face ran
    runs = sorted(((*_run_rows(Path(d)), Path(d).name) for d in dirs), key=lambda run: (run[0], run[3]))
    newest = next((fp for _, rows, fp, _ in reversed(runs) if rows), None)
    # runs of other kernels say nothing about these (None: a run from before fingerprints were recorded)
    runs = [run for run in runs if None in (run[2], newest) or run[2] == newest]
    for _started, rows, _fp, name in runs:  # oldest first: a newer run's row replaces an older one...
        for r in rows:
            key = (r["op"], r["backend"], r["arch"], r["dtype"])
            planned[(r["op"], r["arch"], r["dtype"])] = max(planned[(r["op"], r["arch"], r["dtype"])], r["checks"])
            old = merged.get(key)
            row = dict(r, checked_in=name, timed_in=name if r["speedup_vs_reference"] else None, kernel_sources=_fp)
            if old and r["checks"] < old["checks"]:  # ...unless it was stopped before it ran as many checks
                row.update(verified=old["verified"] and r["verified"], checks=old["checks"],
                           failed=r["failed"] + old["failed"], checked_in=f"{old['checked_in']}+{name}")
            if old and not row["speedup_vs_reference"] and old["speedup_vs_reference"]:
                row.update(speedup_vs_reference=old["speedup_vs_reference"], timed_in=old["timed_in"])
            merged[key] = row
    for (op, _face, arch, dtype), row in merged.items():  # a face that ran fewer checks than the plan
        want = planned[(op, arch, dtype)]
        if row["checks"] < want:
            row.update(verified=False, failed=row["failed"] + [f"only {row['checks']} of the {want} checks ran "
                                                                "(S2 stopped at its deadline)"])
    return [merged[k] for k in sorted(merged, key=lambda k: tuple(str(x) for x in k))]


def junit_summary(path: Path) -> dict:
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": []}
    if not path.exists():
        return out
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        out["failed"].append(f"tests.xml unreadable: {e}")
        return out
    for tc in root.iter("testcase"):
        out["tests"] += 1
        name = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        for kind, key in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
            el = tc.find(kind)
            if el is not None:
                out[key] += 1
                if kind != "skipped":
                    out["failed"].append(f"{name}: {(el.get('message') or '')[:160]}")
    return out


_TEST_OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b.*?(tests/\S+::\S+)|(tests/\S+::\S+)\s+"
                           r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def tests_log_summary(path: Path) -> dict:
    """The outcomes pytest -v printed into tests.log (xdist's "[gw0] PASSED tests/..." or plain
    "tests/... PASSED"): what S5 ran before its deadline, when pytest was stopped before it wrote
    tests.xml."""
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": [], "source": "tests.log"}
    seen = set()
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        m = _TEST_OUTCOME.search(line)
        if not m:
            continue
        outcome, test = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        if test in seen:
            continue
        seen.add(test)
        out["tests"] += 1
        key = {"FAILED": "failures", "ERROR": "errors", "SKIPPED": "skipped"}.get(outcome)
        if key:
            out[key] += 1
            if key != "skipped":
                out["failed"].append(f"{test}: {outcome} (tests.log)")
    return out


def _stage_table(stages: list[dict]) -> list[str]:
    lines = ["| stage | seconds | deadline | stopped at deadline | file |", "|---|---|---|---|---|"]
    for s in stages:
        lines.append(f"| {s['stage']} | {s['seconds']:.0f} | {s['deadline']:.0f} | {'yes' if s['killed'] else 'no'} | "
                     f"{s['file']}{' (placeholder)' if s['placeholder'] else ''} |")
    return lines


def _smoke_table(verdicts: dict) -> list[str]:
    lines = ["| op | face | dtype | checks passed | result |", "|---|---|---|---|---|"]
    for (op, face, dtype), v in sorted(verdicts.items()):
        result = v["skipped"] if not v["ran"] else ("pass" if not v["failed"] else "FAIL: " + "; ".join(v["failed"][:3]))
        lines.append(f"| {op} | {face} | {dtype} | {v['passed']}/{v['ran']} | {result} |")
    return lines


def _bench_rows_for_markdown(bench: list[dict], env: dict) -> list[dict]:
    versions = env.get("versions", {})
    return [dict(r, smoke=r.get("dryrun", False), torch=versions.get("torch"), triton=versions.get("triton"),
                 mmfast="tree") for r in bench if "median_ms" in r]


def gpu_check_report(d: Path) -> str:
    """Writes report.md, summary.txt, plot.png and kernel_table.json into ``d``; returns the summary."""
    d = Path(d)
    env = json.loads((d / "env.json").read_text()) if (d / "env.json").exists() else {}
    gpu = env.get("gpu") if isinstance(env.get("gpu"), dict) else {}
    arch, dry = gpu.get("capability"), bool(env.get("dryrun"))
    smoke, bench = read_jsonl(d / "smoke.jsonl"), read_jsonl(d / "bench.jsonl")
    stages = read_jsonl(d / "stages.jsonl")
    verdicts = smoke_verdicts(smoke)
    tests = junit_summary(d / "tests.xml")
    if any(st.get("stage") == "S5" and st.get("placeholder") for st in stages):  # pytest stopped before its junit
        tests = tests_log_summary(d / "tests.log")
    build = [ln for ln in (d / "build.log").read_text().splitlines() if ln.startswith("[S1] result")] \
        if (d / "build.log").exists() else []
    spills = [ln for ln in (d / "build.log").read_text().splitlines()
              if "spill" in ln and not ln.strip().startswith("0 bytes") and " 0 bytes spill stores" not in ln] \
        if (d / "build.log").exists() else []
    sanitizer = [ln for ln in (d / "sanitizer.txt").read_text().splitlines()
                 if ln.startswith("===") or "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln] \
        if (d / "sanitizer.txt").exists() else []
    # a GPU run: the rows auto would read from this run alone (a face with fewer checks than the plan is not verified)
    table = merged_kernel_table([d]) if arch and not dry else kernel_table_rows(smoke, bench, arch)

    md = [f"# GPU check: {gpu.get('name', 'no GPU')}" + (" — DRY RUN on the CPU (tiny shapes; not results)" if dry else ""),
          "", f"Started {env.get('started')}; torch {env.get('versions', {}).get('torch')}, "
          f"triton {env.get('versions', {}).get('triton')}, Python {env.get('host', {}).get('python')}.", "",
          "## Stages", "", *_stage_table(stages), "",
          "## S1 build", "", *(build or ["(no result line)"]),
          *([f"", f"ptxas lines reporting spills: {len(spills)}"] + [f"    {ln.strip()}" for ln in spills[:20]]), "",
          "## S2 smoke (public API, explicit backend, float64 reference under the rule)", "", *_smoke_table(verdicts), "",
          "## S3 sanitizer", "", *[f"    {ln}" for ln in sanitizer], "",
          "## S4 micro-benchmarks", "", markdown(_bench_rows_for_markdown(bench, env)), "",
          f"## S5 tests (pytest -m cuda)", "",
          f"{tests['tests']} test cases: {tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped"
          + (" (from tests.log: pytest was stopped at the stage deadline before it wrote tests.xml)."
             if tests.get("source") == "tests.log" else "."),
          *[f"- {f}" for f in tests["failed"][:40]], "",
          "## kernel_table.json (what backend='auto' may use)", "",
          "| op | face | dtype | verified | speed-up over reference by size bucket |", "|---|---|---|---|---|",
          *[f"| {r['op']} | {r['backend']} | {r['dtype']} | {'yes' if r['verified'] else 'no'} | "
            f"{', '.join(f'{b}: {x}x' for b, x in r['speedup_vs_reference'].items()) or '–'} |" for r in table]]
    (d / "report.md").write_text("\n".join(md) + "\n")
    doc = {"description": TABLE_DESCRIPTION,
           "source": "dry run (CPU)" if dry else f"{gpu.get('name')} {env.get('started')}", "verified": table}
    (d / "kernel_table.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot([r for r in _bench_rows_for_markdown(bench, env)], d / "plot.png")

    counts = defaultdict(lambda: [0, 0, 0])
    for (op, face, _), v in verdicts.items():
        c = counts[(op, face)]
        c[0] += v["passed"]
        c[1] += len(v["failed"])
        c[2] += v["ran"] == 0
    lines = [f"{'stage':<8} {'s':>5}  result"]
    lines += [f"{s['stage']:<8} {s['seconds']:>5.0f}  " + ("stopped at deadline" if s["killed"] else f"exit {s['rc']}")
              + (" (placeholder file)" if s["placeholder"] else "") for s in stages]
    lines += ["", f"{'smoke: op':<24} {'face':<7} {'pass':>5} {'fail':>5} {'skip':>5}"]
    lines += [f"{op:<24} {face:<7} {c[0]:>5} {c[1]:>5} {c[2]:>5}" for (op, face), c in sorted(counts.items())]
    lines += ["", f"tests: {tests['tests']} cases, {tests['failures']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped" + (" (tests.log; stopped)" if tests.get("source") else ""), f"sanitizer: " + "; ".join(ln.strip("= ") for ln in sanitizer
                                                                           if ln.startswith("===")),
              f"bench rows: {sum(1 for r in bench if 'median_ms' in r)}; kernel_table rows verified: "
              f"{sum(r['verified'] for r in table)}/{len(table)}" + (" (DRY RUN)" if dry else "")]
    summary_text = "\n".join(lines)
    (d / "summary.txt").write_text(summary_text + "\n")
    return summary_text


def write_kernel_table(dirs: list[Path]) -> list[dict]:
    """mmfast/kernel_table.json from the given GPU runs (:func:`merged_kernel_table`)."""
    if not any(_run_rows(Path(d))[1] for d in dirs):
        raise SystemExit(f"report.py --update-table: none of {[str(d) for d in dirs]} is a GPU run with smoke "
                         "results (dry runs never go into mmfast/kernel_table.json); the table is left as it was")
    rows = merged_kernel_table(dirs)
    doc = {"description": TABLE_DESCRIPTION, "source": sorted(Path(d).name for d in dirs), "verified": rows}
    (ROOT / "mmfast" / "kernel_table.json").write_text(json.dumps(doc, indent=1) + "\n")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="*", help="pytest-benchmark JSON files")
    ap.add_argument("--out", help="folder for the pytest-benchmark report")
    ap.add_argument("--stages", type=Path, nargs="+", help="GPU checks' stage folders (several: runs of one tree)")
    ap.add_argument("--update-table", action="store_true",
                    help="also write mmfast/kernel_table.json from all the --stages runs (GPU runs only)")
    args = ap.parse_args(argv)
    if args.stages:
        for d in args.stages:
            print(f"== {d}\n" + gpu_check_report(d))
        if args.update_table:
            rows = write_kernel_table(args.stages)
            print(f"mmfast/kernel_table.json: {sum(r['verified'] for r in rows)}/{len(rows)} rows verified, "
                  f"from {sorted(Path(d).name for d in args.stages)}")
        return 0
    if not args.json or not args.out:
        ap.error("give pytest-benchmark JSON files and --out, or --stages DIR")
    rows = load_rows([p for p in args.json if os.path.exists(p)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(rows) + "\n")
    (out / "summary.txt").write_text(summary(rows) + "\n")
    plot(rows, out / "plot.png")
    print(f"report: {len(rows)} results -> {out}/report.md, summary.txt, plot.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
