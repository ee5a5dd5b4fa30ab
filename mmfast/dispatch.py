"""Backend selection for every mmfast op.

Each op family has four faces, found by one naming scheme:

    "torch"   mmfast/reference/<family>.py   eager PyTorch formula: the reference and the baseline
    "triton"  mmfast/triton/<family>.py      Triton kernels (GPU; CPU only under TRITON_INTERPRET=1)
    "cuda"    csrc/cuda/<family>.cu          CUDA C++ kernels in the compiled extension mmfast._C
    "cpu"     csrc/cpu/<family>.cpp          C++ CPU kernels in mmfast._C (or a CPU-specific path)

``backend="auto"`` picks per op, device and dtype: on a GPU the CUDA C++ kernel only where
``mmfast/kernel_table.json`` records it as verified and faster than Triton on that architecture
(the table is written from benchmark results), otherwise Triton; on the CPU the "cpu" face.
``MMFAST_BACKEND`` (read at import) or :func:`set_default_backend` replaces "auto" as the default.
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
    _resolve.cache_clear()


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
        if spec.cpp_kernel is None or not _extension.has_kernel(spec.cpp_kernel, "CUDA"):
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


@lru_cache(maxsize=None)
def kernel_table() -> list[dict]:
    """Rows of ``kernel_table.json``: verified GPU kernels, written from benchmark results."""
    try:
        return json.loads(_TABLE_PATH.read_text()).get("verified", [])
    except (OSError, ValueError):
        return []


def cuda_preferred(op: str, arch: str | None, dtype: torch.dtype) -> bool:
    dt = str(dtype).replace("torch.", "")
    return any(
        r.get("op") == op and r.get("backend") == "cuda" and r.get("arch") == arch and r.get("dtype") == dt
        and r.get("correct") and r.get("faster_than_triton")
        for r in kernel_table()
    )


def verified_on_gpu(op: str, backend: str) -> list[str]:
    """``arch/dtype`` pairs on which ``backend`` of ``op`` passed the GPU tests (from the table)."""
    return sorted({f"{r['arch']}/{r['dtype']}" for r in kernel_table()
                   if r.get("op") == op and r.get("backend") == backend and r.get("correct")})


def _assume_constant_result(fn):
    """What ``torch.compiler.assume_constant_result`` does (torch 2.1-2.14: set this marker), without
    importing torch._dynamo, which would add ~1.3 s to ``import mmfast``. A test checks the marker
    still matches torch's decorator."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def resolve(op: str, backend: str, device_type: str, dtype: torch.dtype, unsupported: tuple = ()) -> str:
    """The concrete backend to run ``op`` with. ``unsupported``: ((backend, reason), ...) for
    limits that depend on the call's arguments (e.g. dropout on a face without it).

    Runs once per distinct arguments (cached) and is a constant to torch.compile."""
    return _resolve(op, backend, device_type, dtype, unsupported)


@lru_cache(maxsize=None)
def _resolve(op: str, backend: str, device_type: str, dtype: torch.dtype, unsupported: tuple) -> str:
    _check_backend_name(backend)
    if backend == "auto":
        backend = _default_backend
    blocked = dict(unsupported)

    def why_not(b: str) -> str | None:
        return blocked.get(b) or availability(op, b, device_type, dtype)

    if backend != "auto":
        reason = why_not(backend)
        if reason is None:
            return backend
        usable = [b for b in BACKENDS if why_not(b) is None]
        raise RuntimeError(
            f"mmfast.{op}: backend {backend!r} is unavailable for {device_type}/{str(dtype).replace('torch.', '')}"
            f" inputs: {reason}. Available here: {usable}"
        )
    if device_type == "cuda":
        order = ["cuda", "triton"] if cuda_preferred(op, _gpu_arch(device_type), dtype) else ["triton", "cuda"]
    elif device_type == "cpu":
        order = ["cpu"]
    else:
        order = []
    for b in order + ["torch"]:
        if why_not(b) is None:
            return b
    return "torch"


def auto_choices(op: str) -> dict:
    """What ``auto`` picks for ``op`` on this machine, per device and dtype."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    allowed = _OPS[op].dtypes.get("torch", _FLOATS)
    return {f"{d}/{str(dt).replace('torch.', '')}": resolve(op, "auto", d, dt) for d in devices for dt in allowed}
