"""``mmfast kernels-report [--json]``: registers, spills, shared memory and occupancy of every GPU
kernel configuration mmfast can launch, found offline (no GPU needed).

Triton: every module of ``mmfast.triton`` lists its launches (``launches(arch)``, the convention in
mmfast/triton/__init__.py); each distinct compilation is compiled for the target (default sm_90)
with Triton's bundled ptxas, whose ``-v`` log gives registers and spill bytes; shared memory is
the compiled kernel's. CUDA C++: ``cuobjdump --dump-resource-usage`` on the built extension
(mmfast/_C*.so; nothing when it was built without CUDA sources).

Compiling everything takes a while (~1-4 s per configuration on one core, fp32 longer): results
are cached in a JSON file keyed by a hash of the kernel source (with the jit functions it calls),
signature, constants, options, target and Triton version, so a run recompiles only what changed (Triton's kernel hash includes line numbers: an edit above
a kernel recompiles it). A configuration is reported once, in one representative specialisation of
its integer arguments.

``--check`` exits 1 when an fp16/bf16 configuration spills or any configuration needs more shared
memory than a block may have: CI runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import importlib
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import time
from pathlib import Path

KEYS = ("op", "face", "kernel", "dtype", "config", "registers", "spill_bytes", "shared_bytes", "blocks_per_sm")
# sm_90 (H100/H200) limits
SM_REGISTERS = 65536
SM_SHARED = 233472  # 228 KB per SM
BLOCK_SHARED_MAX = 232448  # 227 KB opt-in per block
SM_THREADS = 2048
SM_BLOCKS = 32
SHARED_RESERVED_PER_BLOCK = 1024
CHECKED_DTYPES = ("float16", "bfloat16")  # a spill there fails --check
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmfast" / "kernels-report.json"


def blocks_per_sm(registers: int, shared_bytes: int, threads: int) -> int:
    """Resident blocks per SM on sm_90: limited by registers (allocated per warp in units of 256),
    shared memory (plus 1 KB the system reserves per block), threads and the 32-block cap."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = SM_REGISTERS // (regs_per_warp * warps) if regs_per_warp * warps else SM_BLOCKS
    by_shared = SM_SHARED // (shared_bytes + SHARED_RESERVED_PER_BLOCK) if shared_bytes else SM_BLOCKS
    if shared_bytes > BLOCK_SHARED_MAX:
        by_shared = 0
    return max(0, min(by_regs, by_shared, SM_THREADS // max(threads, 1), SM_BLOCKS))


# ---------------------------------------------------------------------------------------------
# Triton

def _triton_modules():
    """Every module of mmfast.triton (each must follow the launches() convention)."""
    import mmfast.triton as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        yield importlib.import_module(f"mmfast.triton.{info.name}")


def _all_launches(arch: str):
    """(module, Launch) of every module; a module whose launches() raises gives one error row
    (so --check fails) instead of hiding the others."""
    for mod in _triton_modules():
        op = mod.__name__.rsplit(".", 1)[-1]
        try:
            if not callable(getattr(mod, "launches", None)):  # a kernel module the report cannot see
                raise AttributeError(f"{mod.__name__} defines no launches(arch) (see mmfast/triton/__init__.py)")
            items = list(mod.launches(arch))
        except Exception as e:  # noqa: BLE001
            yield mod, dict(op=op, face="triton", kernel="launches()", dtype="", config="", registers=None,
                            spill_bytes=None, shared_bytes=None, blocks_per_sm=0,
                            error=f"{type(e).__name__}: {e}"[:300])
            continue
        for launch in items:
            yield mod, launch


def _bundled_tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else name


def cache_key(source_hash: str, options: dict, target, triton_version: str, triton_dir: str) -> str:
    """The cache key of one compile. Options hold absolute paths into the triton package (libdevice):
    keyed without them, so the committed cache serves any checkout and virtual env (CI's fresh clone)."""
    opts = str(sorted(options.items())).replace(triton_dir, "<triton>")
    return hashlib.sha256(f"{source_hash}|{opts}|{target}|{triton_version}".encode()).hexdigest()


class _Compiler:
    """Compiles one Launch for the target the way Triton's launcher would (same binder, so the
    same specialisation of the arguments), without a GPU."""

    def __init__(self, arch: str):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.target = GPUTarget("cuda", int(arch.removeprefix("sm_")), 32)
        self.backend = make_backend(self.target)
        self.triton_version = triton.__version__
        self.triton_dir = os.path.dirname(triton.__file__)
        self._binders = {}

    def source(self, launch):
        """(ASTSource, options, cache key) of ``launch``."""
        from triton.compiler import ASTSource
        from triton.runtime.jit import create_function_from_signature

        fn = launch.kernel
        if fn not in self._binders:
            self._binders[fn] = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, spec, opts = self._binders[fn](*launch.args, **launch.kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, launch.kwargs, bound, spec, opts)
        src = ASTSource(fn, signature, constexprs, attrs)
        return src, options, cache_key(src.hash(), options.__dict__, self.target, self.triton_version, self.triton_dir)

    def compile(self, launch) -> dict:
        import triton

        src, options, _ = self.source(launch)
        log = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            compiled = triton.compile(src, target=self.target, options=options.__dict__)
        res = _parse_ptxas_log(log.getvalue())
        usage = _cuobjdump_usage(compiled.asm["cubin"])
        if "registers" not in res:  # no log (another Triton version): the binary's own figures
            res["registers"] = usage.get("REG", 0)
            res["spill_bytes"] = usage.get("STACK", 0)
        meta = compiled.metadata
        res["shared_bytes"] = int(meta.shared) + usage.get("SHARED", 0)
        res["threads"] = 32 * int(meta.num_warps)
        res["compile_s"] = round(time.perf_counter() - t0, 2)
        return res


def _parse_ptxas_log(text: str) -> dict:
    res = {}
    m = re.search(r"Used (\d+) registers", text)
    if m:
        res["registers"] = int(m.group(1))
        res["spill_bytes"] = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", text))
    return res


def _cuobjdump_usage(cubin: bytes) -> dict:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_bundled_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


_WORK: list = []  # (launch, key) of the compilations to do, inherited by forked workers


def _compile_one(i: int):
    launch, key = _WORK[i]
    try:
        return key, _COMPILER.compile(launch)
    except Exception as e:  # noqa: BLE001 (reported, and fails --check)
        return key, {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}


_COMPILER = None


def triton_rows(arch: str = "sm_90", cache_path: Path | None = DEFAULT_CACHE, jobs: int = 1,
                progress=None, only: str | None = None, cached_only: bool = False) -> list[dict]:
    """One row per distinct (op, kernel, dtype, config) of every mmfast.triton module (``only``: a
    regular expression searched in "op kernel dtype config")."""
    global _COMPILER
    if os.environ.get("TRITON_INTERPRET") == "1" and "mmfast.triton" in sys.modules:
        raise RuntimeError("kernels-report: Triton kernels were defined under TRITON_INTERPRET=1; run it in a "
                           "process without it")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # the ptxas log comes only from a real compile
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    _COMPILER = _Compiler(arch)
    cache = _load_cache(cache_path)
    rows, todo, seen, errors = [], {}, set(), []
    for mod, launch in _all_launches(arch):
        if isinstance(launch, dict):  # the module's launches() failed: an error row
            errors.append(launch)
            continue
        key = _COMPILER.source(launch)[2]
        ident = (launch.op, launch.kernel.__name__, launch.dtype, launch.config)
        if ident in seen or (only and not re.search(only, " ".join(ident))):
            continue
        seen.add(ident)
        rows.append((launch, key))
        if key not in cache and key not in todo:
            todo[key] = launch
    if cached_only:  # report what the cache holds; say what is missing
        if todo and progress:
            progress(f"kernels-report: {len(todo)} configurations not in the cache (not compiled: --cached-only)")
        rows = [(launch, key) for launch, key in rows if key in cache]
        todo = {}
    _WORK[:] = [(launch, key) for key, launch in todo.items()]
    if _WORK:
        if progress:
            progress(f"kernels-report: compiling {len(_WORK)} Triton configurations for {arch} "
                     f"({len(rows) - len(_WORK)} cached), {jobs} job(s)")
        if jobs > 1:
            import multiprocessing

            with multiprocessing.get_context("fork").Pool(jobs) as pool:
                results = pool.imap_unordered(_compile_one, range(len(_WORK)))
                _collect(results, cache, cache_path, progress)
        else:
            _collect(map(_compile_one, range(len(_WORK))), cache, cache_path, progress)
    if not only and not cached_only and cache_path is not None:  # a full run: keep only live entries
        live = {key for _, key in rows}
        _save_cache({k: v for k, v in cache.items() if k in live}, cache_path)
    out = list(errors)
    for launch, key in rows:
        r = cache[key]
        row = dict(op=launch.op, face="triton", kernel=launch.kernel.__name__, dtype=launch.dtype,
                   config=launch.config, registers=r.get("registers"), spill_bytes=r.get("spill_bytes"),
                   shared_bytes=r.get("shared_bytes"),
                   blocks_per_sm=(blocks_per_sm(r["registers"], r["shared_bytes"], r["threads"])
                                  if "error" not in r else 0))
        if "error" in r:
            row["error"] = r["error"]
        out.append(row)
    return out


def _collect(results, cache, cache_path, progress):
    for n, (key, res) in enumerate(results, 1):
        cache[key] = res
        if n % 20 == 0:
            _save_cache(cache, cache_path)  # a killed run keeps what it compiled
            if progress:
                progress(f"kernels-report: {n}/{len(_WORK)} compiled")
    _save_cache(cache, cache_path)


def _load_cache(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict, path: Path | None) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: cache[k] for k in sorted(cache)}, indent=0, sort_keys=True))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# CUDA C++

def cuda_rows(library: str | None = None) -> list[dict]:
    """Rows of the CUDA kernels in the built extension's libraries (none without device code: the CUDA
    kernels live in mmfast/_C_cuda*.so, the CPU ones in _C*.so)."""
    if library is None:
        import mmfast

        libs = sorted(glob.glob(str(Path(mmfast.__file__).parent / "_C*.so")))
    else:
        libs = [library]
    rows = []
    for lib in libs:
        proc = subprocess.run([_bundled_tool("cuobjdump"), "--dump-resource-usage", lib], capture_output=True,
                              text=True)
        if proc.returncode == 0:  # else no device code in it (the CPU library, a CPU-only build)
            rows += parse_resource_usage(proc.stdout)
    return rows


def parse_resource_usage(text: str) -> list[dict]:
    """Rows from ``cuobjdump --dump-resource-usage`` output. Spill bytes: the stack frame plus
    local memory (cuobjdump does not split spills from local arrays; ptxas -v would)."""
    rows, arch, name = [], None, None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name:
            reg, stack, shared, local = map(int, m.groups())
            kernel = _demangle(name)
            rows.append(dict(op=_cuda_op(kernel), face="cuda", kernel=kernel, dtype=_cuda_dtype(kernel),
                             config=arch or "", registers=reg, spill_bytes=stack + local, shared_bytes=shared,
                             # threads per block are a launch parameter: occupancy at 256 threads
                             blocks_per_sm=blocks_per_sm(reg, shared, 256)))
            name = None
    return rows


def _demangle(name: str) -> str:
    try:
        return subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
    except OSError:
        return name


def _cuda_op(kernel: str) -> str:
    low = kernel.lower()
    for op, patterns in (("attention", ("attention", "attn")), ("cross_entropy", ("cross_entropy", "crossentropy", "ce_")),
                         ("concat_embed", ("concat_embed", "concat"))):
        if any(p in low for p in patterns):
            return op
    return "other"


def _cuda_dtype(kernel: str) -> str:
    for pat, name in (("__nv_bfloat16", "bfloat16"), ("BFloat16", "bfloat16"), ("__half", "float16"),
                      ("Half", "float16"), ("double", "float64"), ("float", "float32")):
        if pat in kernel:
            return name
    return ""


# ---------------------------------------------------------------------------------------------
# Output

def problems(rows: list[dict]) -> list[str]:
    """What --check fails on: a spill in an fp16/bf16 configuration, shared memory over the per-block
    limit, a configuration that did not compile."""
    out = []
    for r in rows:
        name = f"{r['face']} {r['kernel']} {r['dtype']} [{r['config']}]"
        if "error" in r:
            out.append(f"{name}: does not compile: {r['error']}")
            continue
        if r["dtype"] in CHECKED_DTYPES and r["spill_bytes"]:
            out.append(f"{name}: spills {r['spill_bytes']} bytes per thread")
        if r["shared_bytes"] > BLOCK_SHARED_MAX:
            out.append(f"{name}: needs {r['shared_bytes']} bytes of shared memory (limit {BLOCK_SHARED_MAX})")
    return out


def markdown(rows: list[dict], arch: str) -> str:
    import triton

    lines = [f"# Kernel resource usage ({arch}, offline compile)", "",
             f"Generated by `mmfast kernels-report` (Triton {triton.__version__}, bundled ptxas). "
             "Registers and spill bytes are per thread, shared memory per block; blocks/SM is the "
             "occupancy those allow on sm_90 (CUDA kernels: at 256 threads per block, static shared memory only: "
             "cuobjdump sees neither a kernel's block size nor its dynamic shared memory).", ""]
    bad = problems(rows)
    lines += [f"Configurations: {len(rows)}; fp16/bf16 spills or shared-memory overflows: {len(bad)}.", ""]
    if bad:
        lines += ["## Problems", ""] + [f"- {b}" for b in bad] + [""]
    lines += ["| op | face | kernel | dtype | config | registers | spill B | shared B | blocks/SM |",
              "|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['face']} | {r['kernel']} | {r['dtype']} | {r['config']} | "
                     f"{r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | {r['blocks_per_sm']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mmfast kernels-report", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per configuration")
    p.add_argument("--arch", default="sm_90", help="target architecture (default sm_90)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 on an fp16/bf16 spill, a shared-memory overflow or a failed compile")
    p.add_argument("--markdown", metavar="PATH", help="also write the report as a markdown table")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="result cache (JSON); '' for none")
    p.add_argument("--cached-only", action="store_true", help="compile nothing: report the cached configurations")
    p.add_argument("--jobs", type=int, default=1, help="parallel compiles")
    p.add_argument("--only", metavar="REGEX", help='only configurations whose "op kernel dtype config" matches')
    p.add_argument("--library", help="the built extension to read CUDA kernels from (default mmfast/_C*.so)")


def run(args) -> int:
    say = lambda msg: print(msg, file=sys.stderr, flush=True)
    rows = triton_rows(args.arch, Path(args.cache) if args.cache else None, args.jobs, progress=say, only=args.only,
                       cached_only=args.cached_only)
    rows += [r for r in cuda_rows(args.library)  # --only applies to them as to the Triton rows
             if not args.only or re.search(args.only, " ".join((r["op"], r["kernel"], r["dtype"], r["config"])))]
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown(rows, args.arch))
    if args.json:
        print(json.dumps([{k: r[k] for k in KEYS} for r in rows], indent=1))
    else:
        print(f"{'op':<14}{'face':<7}{'kernel':<28}{'dtype':<10}{'config':<44}{'regs':>5}{'spill':>6}"
              f"{'shared':>8}{'blk/SM':>7}")
        for r in rows:
            print(f"{r['op']:<14}{r['face']:<7}{r['kernel'][:27]:<28}{r['dtype']:<10}{r['config'][:43]:<44}"
                  f"{r['registers'] or 0:>5}{r['spill_bytes'] or 0:>6}{r['shared_bytes'] or 0:>8}"
                  f"{r['blocks_per_sm']:>7}")
    bad = problems(rows)
    for b in bad:
        say(f"kernels-report: {b}")
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
