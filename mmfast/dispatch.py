"""Backend selection for every mmfast op.

Each op family has four faces, found by one naming scheme:

    "torch"   mmfast/reference/<family>.py   eager PyTorch formula: the reference and the baseline
    "triton"  mmfast/triton/<family>.py      Triton kernels (GPU; CPU only under TRITON_INTERPRET=1)
    "cuda"    csrc/cuda/<family>.cu          CUDA C++ kernels in the compiled extension mmfast._C
    "cpu"     csrc/cpu/<family>.cpp          C++ CPU kernels in mmfast._C (or a CPU-specific path)

``backend="auto"`` picks per op, device, dtype and size bucket. On a GPU it is *safe*: a face is used
only where ``mmfast/kernel_table.json`` (written by ``benchmarks/report.py`` from a GPU check, see
scripts/gpu_check.sh) records it as verified for that (op, arch, dtype) and measured faster than the
torch reference in that size bucket (the fastest such face wins); everywhere else the torch reference
runs. A dtype, head dim or other argument a face does not take sends ``auto`` to the next choice,
while an explicit ``backend=`` raises. ``MMFAST_TRUST_UNVERIFIED=1`` (development) restores the
old order on a GPU: Triton first, the CUDA face where the table says it beats Triton. On the CPU
``auto`` is the "cpu" face (tested in CI), else the reference. ``MMFAST_BACKEND`` (read at import)
or :func:`set_default_backend` replaces "auto" as the default. :func:`explain` says why.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from mmfast import _extension

BACKENDS = ("cuda", "triton", "cpu", "torch")
_TABLE_PATH = Path(__file__).resolve().parent / "kernel_table.json"


@dataclass(frozen=True)
class OpSpec:
    """What an op family offers. ``dtypes`` maps a backend to the dtypes its face accepts."""

    name: str
    cpp_kernel: str | None = None  # torch.ops.mmfast_C.<cpp_kernel> serves the cpu/cuda faces
    triton_module: str | None = None  # module holding the Triton face
    cpu_python: bool = False  # the "cpu" face is Python (e.g. SDPA), not C++
    dtypes: dict = field(default_factory=dict)
    # Size buckets in which ``auto`` on the CPU takes the cpu face; None = all. For a face measured
    # slower than the reference at some sizes (the reason, with the measurement, in cpu_auto_why).
    # List None too for the face to be taken when the caller gives no size.
    cpu_auto_buckets: tuple | None = None
    cpu_auto_why: str = ""


_OPS: dict[str, OpSpec] = {}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def register_op(spec: OpSpec) -> OpSpec:
    _OPS[spec.name] = spec
    return spec


def op_names() -> list[str]:
    return list(_OPS)


def _check_backend_name(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"mmfast: argument 'backend' must be one of {('auto',) + BACKENDS}, got {backend!r}")


_default_backend = os.environ.get("MMFAST_BACKEND", "auto").strip().lower() or "auto"
_check_backend_name(_default_backend)


def set_default_backend(backend: str) -> None:
    """Replaces the process-wide default used where an op is called with ``backend="auto"``."""
    global _default_backend
    _check_backend_name(backend)
    _default_backend = backend
    _explain.cache_clear()


def refresh() -> None:
    """Forgets cached choices and re-reads kernel_table.json (after MMFAST_TRUST_UNVERIFIED or the
    table changed)."""
    kernel_table.cache_clear()
    _explain.cache_clear()


def get_default_backend() -> str:
    return _default_backend


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def _triton_face(module: str):
    try:
        return importlib.import_module(module), None
    except ImportError as e:  # triton missing, or too old for the kernels
        return None, f"{module} cannot be imported ({e})"


def triton_face(op: str):
    """The imported Triton module of ``op`` (raises if it cannot be imported)."""
    mod, err = _triton_face(_OPS[op].triton_module)
    if mod is None:
        raise RuntimeError(f"mmfast: Triton face of {op} unavailable: {err}")
    return mod


def availability(op: str, backend: str, device_type: str, dtype: torch.dtype) -> str | None:
    """None when ``backend`` can run ``op`` for this device type and dtype, else the reason."""
    spec = _OPS[op]
    allowed = spec.dtypes.get(backend, _FLOATS)
    if backend == "torch":
        return None
    if dtype not in allowed:
        return f"{backend} supports dtypes {[str(d).replace('torch.', '') for d in allowed]}, not {dtype}"
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu face runs on CPU tensors, got a {device_type} tensor"
        if spec.cpu_python:
            return None
        if spec.cpp_kernel is None or not _extension.has_kernel(spec.cpp_kernel, "CPU"):
            return "the C++ extension mmfast._C was not built or has no CPU kernel for it"
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda face runs on CUDA tensors, got a {device_type} tensor"
        if spec.cpp_kernel is None:
            return "no CUDA C++ face"
        if not _extension.has_kernel(spec.cpp_kernel, "CUDA"):
            return "mmfast._C was built without CUDA sources for it (see `mmfast info`)"
        return None
    if backend == "triton":
        if spec.triton_module is None:
            return "no Triton face"
        if device_type == "cpu" and not triton_interpreting():
            return "Triton runs on CPU tensors only with TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return f"Triton does not run on {device_type}"
        mod, err = _triton_face(spec.triton_module)
        return err
    raise ValueError(f"unknown backend {backend!r}")


def _gpu_arch(device_type: str) -> str | None:
    if device_type != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


# Size buckets of an op's work (elements of its largest operand or intermediate, e.g. B*H*Lq*Lk for
# attention, N*C for cross-entropy): speed-ups are measured and used per bucket, never averaged over
# all shapes, since a kernel that wins on large inputs can lose on small ones.
_BUCKETS = ((1 << 20, "small"), (1 << 26, "medium"))
BUCKETS = tuple(name for _, name in _BUCKETS) + ("large",)


def size_bucket(work: int) -> str:
    for limit, name in _BUCKETS:
        if work < limit:
            return name
    return "large"


# A CPU-only bucket for the calls an op's measured rule (kept next to the op, with the
# measurement in its cpu_auto_why) finds faster in the reference: e.g. calls so small that the
# fixed cost of a fused call (its Python around the face, an autograd.Function, the stable ABI's
# boxing; tens of microseconds) is more than the face saves against a few ATen calls. The op's
# call site passes it as the bucket; its OpSpec leaves it out of ``cpu_auto_buckets``. GPU calls
# never get it.
CPU_REFERENCE_FASTER = "reference-faster"
# cpu_auto_buckets of an op whose only exceptions are its CPU_REFERENCE_FASTER calls
CPU_AUTO_BUT_REFERENCE_FASTER = (None,) + BUCKETS


def trust_unverified() -> bool:
    """MMFAST_TRUST_UNVERIFIED=1: on a GPU, ``auto`` tries Triton first even where nothing was verified."""
    return os.environ.get("MMFAST_TRUST_UNVERIFIED", "0").strip() == "1"


@lru_cache(maxsize=None)
def kernel_table() -> list[dict]:
    """Rows of ``kernel_table.json``: per (op, backend, arch, dtype) whether the GPU check verified the
    face and its speed-up over the torch reference per size bucket (see benchmarks/report.py)."""
    try:
        return json.loads(_TABLE_PATH.read_text()).get("verified", [])
    except (OSError, ValueError):
        return []


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _table_row(op: str, backend: str, arch: str | None, dtype: torch.dtype) -> dict | None:
    return next((r for r in kernel_table() if r.get("op") == op and r.get("backend") == backend
                 and r.get("arch") == arch and r.get("dtype") == _dt(dtype)), None)


def gpu_evidence(op: str, backend: str, arch: str | None, dtype: torch.dtype, bucket: str | None):
    """(speed-up over the reference, None) when the table lets ``auto`` use ``backend`` here, else
    (None, why not). Without a bucket the face must be faster in every bucket measured."""
    row = _table_row(op, backend, arch, dtype)
    where = f"{arch or 'this GPU'}/{_dt(dtype)}"
    if row is None:
        return None, f"{backend}: never verified on {where} (no kernel_table.json row)"
    if not row.get("verified"):
        return None, f"{backend}: failed the GPU check on {where}"
    speed = row.get("speedup_vs_reference") or {}
    measured = {b: x for b, x in speed.items() if b == bucket} if bucket else speed
    if not measured:
        return None, f"{backend}: verified on {where} but not timed" + (f" for {bucket} inputs" if bucket else "")
    slowest = min(measured.values())
    if slowest <= 1.0:
        return None, f"{backend}: verified on {where} but {slowest:.2f}x the reference" + \
            (f" for {bucket} inputs" if bucket else f" ({min(measured, key=measured.get)} inputs)")
    return slowest, None


def cuda_preferred(op: str, arch: str | None, dtype: torch.dtype) -> bool:
    """For MMFAST_TRUST_UNVERIFIED: the CUDA face goes before Triton where the table has it verified and
    at least as fast as a verified Triton face in every bucket both were timed in."""
    cuda, triton = _table_row(op, "cuda", arch, dtype), _table_row(op, "triton", arch, dtype)
    if not (cuda and cuda.get("verified")):
        return False
    if not (triton and triton.get("verified")):
        return True
    cs, ts = cuda.get("speedup_vs_reference") or {}, triton.get("speedup_vs_reference") or {}
    return all(cs[b] >= ts[b] for b in cs.keys() & ts.keys())


def verified_on_gpu(op: str, backend: str) -> list[str]:
    """``arch/dtype`` pairs on which ``backend`` of ``op`` passed the GPU check (from the table)."""
    return sorted({f"{r['arch']}/{r['dtype']}" for r in kernel_table()
                   if r.get("op") == op and r.get("backend") == backend and r.get("verified")})


def _assume_constant_result(fn):
    """What ``torch.compiler.assume_constant_result`` does (torch 2.1-2.14: set this marker), without
    importing torch._dynamo, which would add ~1.3 s to ``import mmfast``. A test checks the marker
    still matches torch's decorator."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def resolve(op: str, backend: str, device_type: str, dtype: torch.dtype, unsupported: tuple = (),
            bucket: str | None = None) -> str:
    """The concrete backend to run ``op`` with. ``unsupported``: ((backend, reason), ...) for
    limits that depend on the call's arguments (e.g. dropout on a face without it); ``bucket``:
    ``size_bucket(the op's work)``, which picks the speed measurements ``auto`` trusts (callers
    compute it, so that under torch.compile a symbolic size becomes a guard, not an argument here).

    Runs once per distinct arguments (cached) and is a constant to torch.compile."""
    return _explain(op, backend, device_type, dtype, unsupported, bucket)[0]


def explain(op: str, device_type: str, dtype: torch.dtype, unsupported: tuple = (), bucket: str | None = None,
            backend: str = "auto") -> tuple[str, str]:
    """(backend, why): what :func:`resolve` picks and the reason, for ``mmfast info``."""
    return _explain(op, backend, device_type, dtype, unsupported, bucket)


@lru_cache(maxsize=None)
def _explain(op: str, backend: str, device_type: str, dtype: torch.dtype, unsupported: tuple,
             bucket: str | None) -> tuple[str, str]:
    _check_backend_name(backend)
    if backend == "auto":
        backend = _default_backend
    blocked = dict(unsupported)

    def why_not(b: str) -> str | None:
        return blocked.get(b) or availability(op, b, device_type, dtype)

    if backend != "auto":
        reason = why_not(backend)
        if reason is None:
            return backend, f"backend={backend!r} asked for"
        usable = [b for b in BACKENDS if why_not(b) is None]
        raise RuntimeError(
            f"mmfast.{op}: backend {backend!r} is unavailable for {device_type}/{_dt(dtype)}"
            f" inputs: {reason}. Available here: {usable}"
        )
    if device_type == "cuda" and trust_unverified():
        order = ["cuda", "triton"] if cuda_preferred(op, _gpu_arch(device_type), dtype) else ["triton", "cuda"]
        for b in order:
            if why_not(b) is None:
                return b, "MMFAST_TRUST_UNVERIFIED=1: Triton first, unverified faces allowed"
        return "torch", "MMFAST_TRUST_UNVERIFIED=1, but no GPU face can run these inputs"
    if device_type == "cuda":
        arch, reasons, best = _gpu_arch(device_type), [], None
        for b in ("cuda", "triton"):
            reason = why_not(b)
            speed = None
            if reason is None:
                speed, reason = gpu_evidence(op, b, arch, dtype, bucket)
            else:
                reason = f"{b}: {reason}"
            if speed is not None and (best is None or speed > best[1]):
                best = (b, speed)
            elif reason:
                reasons.append(reason)
        if best:
            return best[0], f"verified on {arch}/{_dt(dtype)} and {best[1]:.2f}x the reference" + \
                (f" for {bucket} inputs" if bucket else " in every size measured")
        return "torch", "torch reference: " + "; ".join(reasons)
    if device_type == "cpu" and why_not("cpu") is None:
        wanted = _OPS[op].cpu_auto_buckets
        if wanted is not None and bucket not in wanted:
            return "torch", f"torch reference for {bucket or 'unsized'} inputs: {_OPS[op].cpu_auto_why}"
        return "cpu", "the C++/PyTorch CPU face, tested in CI"
    return "torch", "torch reference: " + (why_not("cpu") or f"no face for {device_type}")


def _listed_buckets(op: str, device_type: str) -> tuple:
    if device_type == "cuda":
        return (None,) + BUCKETS
    if _OPS[op].cpu_auto_buckets is None:
        return (None,)
    return (None, CPU_REFERENCE_FASTER) + BUCKETS


def auto_choices(op: str) -> dict:
    """What ``auto`` picks for ``op`` on this machine, per device and dtype (and per size bucket on a
    GPU, and on the CPU for an op whose cpu face is taken in some buckets only), with the reason:
    {"cuda/bfloat16/large": ["triton", "verified on sm_90/..."], ...}."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    allowed = _OPS[op].dtypes.get("torch", _FLOATS)
    out = {}
    for d in devices:
        for dt in allowed:
            for bucket in _listed_buckets(op, d):
                try:
                    choice = list(explain(op, d, dt, bucket=bucket))
                except RuntimeError as e:  # MMFAST_BACKEND names a backend that cannot run here
                    choice = ["error", str(e)]
                out[f"{d}/{_dt(dt)}" + (f"/{bucket}" if bucket else "")] = choice
    return out
