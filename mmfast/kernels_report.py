"""``mmfast kernels-report [--json]``: registers, spills, shared memory and occupancy of every GPU
kernel configuration mmfast can launch, found offline (no GPU needed).

Triton: every module of ``mmfast.triton`` lists its launches (``launches(arch)``, the convention in
mmfast/triton/__init__.py); each distinct compilation is compiled for the target (default sm_90)
with Triton's bundled ptxas, whose ``-v`` log gives registers and spill bytes; shared memory is
the compiled kernel's. CUDA C++: ``cuobjdump --dump-resource-usage`` on the built extension
(mmfast/_C*.so; nothing when it was built without CUDA sources) gives registers, stack/local bytes and
static shared memory; the block size and dynamic shared memory of each kernel come from the table the
library exports, ``mmfast_cuda_launch_configs()`` (declared beside the launchers' constants:
csrc/cuda/launch_config.h), read through ctypes in a child process (no GPU needed). A kernel without a
declared configuration, or a declaration without its kernel, is an error row.

Blocks per SM follow the CUDA occupancy calculator (cuda_occupancy.h) for sm_90 with the largest
shared-memory carveout: registers allocated per warp in units of 256 from 4 sub-partitions of 16384,
shared memory per block rounded up to 128 bytes with 1 KB reserved per block (228 KB per SM, 227 KB
per block), at most 64 warps and 32 blocks per SM. Each row names the resource that binds.

Compiling everything takes a while (~1-4 s per configuration on one core, fp32 longer): results
are cached in a JSON file keyed by a hash of the kernel source (with the jit functions it calls),
signature, constants, options, target and Triton version, so a run recompiles only what changed (Triton's kernel hash includes line numbers: an edit above
a kernel recompiles it). A configuration is reported once, in one representative specialisation of
its integer arguments.

``--check`` exits 1 when an fp16/bf16 Triton configuration or any CUDA kernel spills, any configuration
needs more shared memory than a block may have, a CUDA kernel declared to need N blocks per SM
(its ``__launch_bounds__``) gets fewer, or a row is an error: CI runs it.
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

KEYS = ("op", "face", "kernel", "dtype", "config", "registers", "spill_bytes", "shared_bytes", "blocks_per_sm",
        "threads", "limited_by", "min_blocks_per_sm")
# sm_90 (H100/H200) limits, as cuda_occupancy.h (CUDA 13) states them
SM_REGISTERS = 65536
SUB_PARTITIONS = 4  # registers are allocated per sub-partition: 16384 each
REG_ALLOC_UNIT = 256  # registers per warp are rounded up to this
MAX_REGS_PER_THREAD = 255
SM_SHARED = 233472  # 228 KB per SM (the largest carveout)
BLOCK_SHARED_MAX = 232448  # 227 KB opt-in per block, static + dynamic
SHARED_ALLOC_UNIT = 128
SHARED_RESERVED_PER_BLOCK = 1024  # by the driver, on top of the block's own
SM_WARPS = 64
BLOCK_THREADS_MAX = 1024
SM_BLOCKS = 32
CHECKED_DTYPES = ("float16", "bfloat16")  # a spill there fails --check
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmfast" / "kernels-report.json"


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(registers: int, shared_bytes: int, threads: int) -> tuple[int, str]:
    """(resident blocks per SM on sm_90, the resource that limits them) for a kernel using
    ``registers`` per thread and ``shared_bytes`` (static + dynamic) per block of ``threads``, as the
    CUDA occupancy calculator computes it (cuda_occupancy.h: cudaOccMaxBlocksPerSM*Limit). Ties name
    every binding resource ("registers, shared memory")."""
    warps = -(-threads // 32)
    limits = {}
    # registers: per warp, rounded up to 256; each of the 4 sub-partitions holds 16384 of them, and a
    # block's warps are spread over the sub-partitions (the hardware check rounds them up to 4)
    regs_per_warp = _round_up(registers * 32, REG_ALLOC_UNIT)
    if registers > MAX_REGS_PER_THREAD or regs_per_warp * _round_up(warps, SUB_PARTITIONS) > SM_REGISTERS:
        limits["registers"] = 0
    elif regs_per_warp:
        limits["registers"] = (SM_REGISTERS // SUB_PARTITIONS // regs_per_warp) * SUB_PARTITIONS // warps
    # shared memory: the block's own plus 1 KB reserved, rounded up to 128 bytes
    per_block = _round_up(shared_bytes + SHARED_RESERVED_PER_BLOCK, SHARED_ALLOC_UNIT)
    limits["shared memory"] = 0 if shared_bytes > BLOCK_SHARED_MAX else SM_SHARED // per_block
    limits["warps"] = 0 if threads > BLOCK_THREADS_MAX else SM_WARPS // max(warps, 1)
    limits["blocks"] = SM_BLOCKS
    blocks = min(limits.values())
    return blocks, ", ".join(name for name, n in limits.items() if n == blocks)


def blocks_per_sm(registers: int, shared_bytes: int, threads: int) -> int:
    """Resident blocks per SM on sm_90 (``occupancy`` without the limiting resource)."""
    return occupancy(registers, shared_bytes, threads)[0]


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
            yield mod, _error_row(op, "triton", "launches()", f"{type(e).__name__}: {e}")
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
        if "error" in r:
            row = _error_row(launch.op, "triton", launch.kernel.__name__, r["error"], launch.dtype, launch.config)
        else:
            row = _row(launch.op, "triton", launch.kernel.__name__, launch.dtype, launch.config, r["registers"],
                       r["spill_bytes"], r["shared_bytes"], r["threads"])
        out.append(row)
    return out


def _row(op, face, kernel, dtype, config, registers, spill_bytes, shared_bytes, threads, min_blocks_per_sm=None):
    blocks, limited_by = occupancy(registers, shared_bytes, threads)
    return dict(op=op, face=face, kernel=kernel, dtype=dtype, config=config, registers=registers,
                spill_bytes=spill_bytes, shared_bytes=shared_bytes, blocks_per_sm=blocks, threads=threads,
                limited_by=limited_by, min_blocks_per_sm=min_blocks_per_sm)


def _error_row(op, face, kernel, error, dtype="", config=""):
    return dict(op=op, face=face, kernel=kernel, dtype=dtype, config=config, registers=None, spill_bytes=None,
                shared_bytes=None, blocks_per_sm=0, threads=None, limited_by="", min_blocks_per_sm=None,
                error=error[:300])


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

def cuda_rows(library: str | None = None, arch: str = "sm_90") -> list[dict]:
    """Rows of the CUDA kernels compiled for ``arch`` in the built extension's libraries (none without
    device code: the CUDA kernels live in mmfast/_C_cuda*.so, the CPU ones in _C*.so): cuobjdump's
    resource usage joined with the launch configurations the library declares."""
    if library is None:
        import mmfast

        libs = sorted(glob.glob(str(Path(mmfast.__file__).parent / "_C*.so")))
    else:
        libs = [library]
    rows = []
    for lib in libs:
        proc = subprocess.run([_bundled_tool("cuobjdump"), "--dump-resource-usage", lib], capture_output=True,
                              text=True)
        if proc.returncode != 0:  # no device code in it (the CPU library, a CPU-only build)
            continue
        try:
            declared = launch_configs(lib)
        except RuntimeError as e:
            rows.append(_error_row("", "cuda", Path(lib).name, str(e)))
            continue
        usage = parse_resource_usage(proc.stdout)
        built = sorted({u["arch"] for u in usage})
        usage = [u for u in usage if u["arch"] == arch]
        if not usage:
            rows.append(_error_row("", "cuda", Path(lib).name, f"no {arch} code in the library (built for {built})"))
            continue
        rows += join_launch_configs(usage, declared)
    return rows


# Run in a child process: loading the library registers its kernels with torch's dispatcher, which
# must not happen twice in the report's own process (nor beside another build of the library).
_READ_LAUNCH_CONFIGS = r"""
import ctypes, json, sys
import torch  # the library's torch and CUDA runtime dependencies, by soname
class Row(ctypes.Structure):
    _fields_ = [("op", ctypes.c_char_p), ("kernel", ctypes.c_char_p), ("threads", ctypes.c_int32),
                ("dynamic_smem_bytes", ctypes.c_int32), ("min_blocks_per_sm", ctypes.c_int32)]
lib = ctypes.CDLL(sys.argv[1])
try:
    fn = lib.mmfast_cuda_launch_configs
except AttributeError:
    sys.exit("exports no mmfast_cuda_launch_configs() (csrc/cuda/launch_config.h)")
fn.restype = ctypes.POINTER(Row)
fn.argtypes = [ctypes.POINTER(ctypes.c_int64)]
n = ctypes.c_int64()
table = fn(ctypes.byref(n))
print(json.dumps([dict(op=r.op.decode(), kernel=r.kernel.decode(), threads=r.threads,
                       dynamic_smem_bytes=r.dynamic_smem_bytes, min_blocks_per_sm=r.min_blocks_per_sm)
                  for r in table[:n.value]]))
"""


def launch_configs(library: str) -> list[dict]:
    """The launch configurations ``library`` declares (mmfast_cuda_launch_configs(), read through
    ctypes in a child process; the CUDA runtime is loaded, no GPU is needed)."""
    proc = subprocess.run([sys.executable, "-c", _READ_LAUNCH_CONFIGS, str(library)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"cannot read the launch configurations of {library}: {last}")
    return json.loads(proc.stdout)


def kernel_key(name: str) -> str:
    """A kernel's name without namespaces, return type, parameters or spaces: the demangled
    "void mmfast::(anonymous namespace)::attn_fwd_kernel<__half, 64>(mmfast::(anonymous namespace)::Params)"
    and the declared "attn_fwd_kernel<__half, 64>" both give "attn_fwd_kernel<__half,64>"."""
    s = re.sub(r"\(anonymous namespace\)::|\b[A-Za-z_]\w*::", "", name)
    s = re.sub(r"^void\s+", "", s.strip())
    depth = 0
    for i, ch in enumerate(s):  # the parameter list: the first "(" outside the template arguments
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            s = s[:i]
            break
    return s.replace(" ", "")


def join_launch_configs(usage: list[dict], declared: list[dict]) -> list[dict]:
    """One row per kernel of cuobjdump's ``usage`` (parse_resource_usage) with its declared launch
    configuration; a kernel without one, and a declaration matching no kernel, are error rows."""
    by_key = {}
    for d in declared:
        by_key.setdefault(kernel_key(d["kernel"]), d)
    rows, used = [], set()
    for u in usage:
        key = kernel_key(u["kernel"])
        d = by_key.get(key)
        if d is None:
            rows.append(_error_row(_cuda_op(u["kernel"]), "cuda", u["kernel"],
                                   "no launch configuration declared (csrc/cuda/launch_config.h)",
                                   _cuda_dtype(u["kernel"]), u["arch"]))
            continue
        used.add(key)
        rows.append(_row(d["op"], "cuda", d["kernel"], _cuda_dtype(d["kernel"]),
                         f"{u['arch']} dyn smem {d['dynamic_smem_bytes']}", u["registers"], u["spill_bytes"],
                         u["static_shared_bytes"] + d["dynamic_smem_bytes"], d["threads"],
                         d["min_blocks_per_sm"] or None))
    for key, d in by_key.items():
        if key not in used:
            rows.append(_error_row(d["op"], "cuda", d["kernel"], "declared, but no such kernel in the library",
                                   _cuda_dtype(d["kernel"])))
    return rows


def parse_resource_usage(text: str) -> list[dict]:
    """Per kernel of ``cuobjdump --dump-resource-usage`` output: its demangled name, arch, registers,
    spill bytes and static shared memory. Spill bytes: the stack frame plus local memory (cuobjdump
    does not split spills from local arrays; ptxas -v would)."""
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
            rows.append(dict(kernel=name, arch=arch or "", registers=reg, spill_bytes=stack + local,
                             static_shared_bytes=shared))
            name = None
    for row, demangled in zip(rows, _demangle([r["kernel"] for r in rows])):
        row["kernel"] = demangled
    return rows


def _demangle(names: list[str]) -> list[str]:
    """Demangled names (one c++filt run); the names themselves where c++filt is missing."""
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return names
    return out if len(out) == len(names) else names


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
    """What --check fails on: a spill in an fp16/bf16 Triton configuration or in any CUDA kernel,
    shared memory over the per-block limit, fewer blocks per SM than a CUDA kernel declares it needs,
    an error row (a configuration that did not compile, a CUDA kernel without a declared launch
    configuration)."""
    out = []
    for r in rows:
        name = f"{r['face']} {r['kernel']} {r['dtype']} [{r['config']}]"
        if "error" in r:
            out.append(f"{name}: {r['error']}")
            continue
        if r["spill_bytes"] and (r["face"] == "cuda" or r["dtype"] in CHECKED_DTYPES):
            out.append(f"{name}: spills {r['spill_bytes']} bytes per thread")
        if r["shared_bytes"] > BLOCK_SHARED_MAX:
            out.append(f"{name}: needs {r['shared_bytes']} bytes of shared memory (limit {BLOCK_SHARED_MAX})")
        if r.get("min_blocks_per_sm") and r["blocks_per_sm"] < r["min_blocks_per_sm"]:
            out.append(f"{name}: {r['blocks_per_sm']} blocks per SM (limited by {r['limited_by']}), "
                       f"needs {r['min_blocks_per_sm']}")
    return out


def markdown(rows: list[dict], arch: str) -> str:
    import triton

    lines = [f"# Kernel resource usage ({arch}, offline compile)", "",
             f"Generated by `mmfast kernels-report` (Triton {triton.__version__}, bundled ptxas; CUDA C++: "
             "cuobjdump on the built mmfast._C_cuda and the launch configurations it declares, "
             "csrc/cuda/launch_config.h). Registers and spill bytes are per thread; shared memory is per "
             "block, static + dynamic; threads per block; blocks/SM is the occupancy those allow on sm_90 "
             "(the CUDA occupancy calculator's rules: registers in units of 256 per warp from 4 sub-partitions, "
             "shared memory + 1 KB reserved per block in units of 128 B out of 228 KB, 64 warps, 32 blocks), "
             "with the resource that binds. Need: the blocks/SM a CUDA kernel is built for (its "
             "`__launch_bounds__`), checked by `--check`. CUDA static shared memory is cuobjdump's, which "
             "includes a 1 KB section most nvcc-built sm_90 kernels carry though `ptxas -v` reports none: "
             "counted, the conservative reading.", ""]
    bad = problems(rows)
    lines += [f"Configurations: {len(rows)}; problems (spills, shared-memory overflows, occupancy below "
              f"the need, errors): {len(bad)}.", ""]
    if bad:
        lines += ["## Problems", ""] + [f"- {b}" for b in bad] + [""]
    lines += ["| op | face | kernel | dtype | config | registers | spill B | shared B | threads | blocks/SM | "
              "limited by | need |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['face']} | {r['kernel']} | {r['dtype']} | {r['config']} | "
                     f"{r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | {r['threads']} | "
                     f"{r['blocks_per_sm']} | {r['limited_by']} | {r['min_blocks_per_sm'] or ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mmfast kernels-report", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per configuration")
    p.add_argument("--arch", default="sm_90", help="target architecture (default sm_90)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 on an fp16/bf16 (Triton) or CUDA spill, a shared-memory overflow, a CUDA kernel "
                        "below the blocks/SM it declares, a failed compile or an undeclared CUDA launch configuration")
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
    rows += [r for r in cuda_rows(args.library, args.arch)  # --only applies to them as to the Triton rows
             if not args.only or re.search(args.only, " ".join((r["op"], r["kernel"], r["dtype"], r["config"])))]
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown(rows, args.arch))
    if args.json:
        print(json.dumps([{k: r[k] for k in KEYS} for r in rows], indent=1))
    else:
        print(f"{'op':<14}{'face':<7}{'kernel':<36}{'dtype':<10}{'config':<44}{'regs':>5}{'spill':>6}"
              f"{'shared':>8}{'thr':>5}{'blk/SM':>7}  limited by")
        for r in rows:
            print(f"{r['op']:<14}{r['face']:<7}{r['kernel'][:35]:<36}{r['dtype']:<10}{r['config'][:43]:<44}"
                  f"{r['registers'] or 0:>5}{r['spill_bytes'] or 0:>6}{r['shared_bytes'] or 0:>8}"
                  f"{r['threads'] or 0:>5}{r['blocks_per_sm']:>7}  {r['limited_by']}")
    bad = problems(rows)
    for b in bad:
        say(f"kernels-report: {b}")
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
