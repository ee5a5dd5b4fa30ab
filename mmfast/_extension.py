"""Loads the compiled extension ``mmfast._C`` (op schemas, C++ CPU kernels) and, when built and
under a CUDA torch, ``mmfast._C_cuda`` (CUDA kernels) if it was built, and says what it holds.

The kernels register themselves as ``torch.ops.mmfast_C.*`` when the libraries load. They are
built on the LibTorch stable ABI for torch 2.11 and the Python limited API (``*.abi3.so``), so the
same files load into any torch >= 2.11 on any CPython >= 3.10 (README "Install"). Development
override: ``MMFAST_EXTENSION=/path/a.so:/path/b.so`` loads those libraries instead, so
one build can be tried without reinstalling (scripts/compare_extension_speed.py times two builds
this way).
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from functools import lru_cache
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
_load_error: str | None = None
_cuda_load_error: str | None = None


@lru_cache(maxsize=None)
def build_info() -> dict:
    """What setup.py recorded about the build (CUDA sources compiled? for which archs? why not?)."""
    try:
        return json.loads((_HERE / "_build_info.json").read_text())
    except (OSError, ValueError):
        return {"built": False, "cuda": False, "archs": [], "reason": "no build record (not installed with setup.py)"}


@lru_cache(maxsize=None)
def load() -> bool:
    """Loads the extension once; returns whether it is available. Never raises."""
    global _load_error
    override = os.environ.get("MMFAST_EXTENSION")
    if os.environ.get("MMFAST_DISABLE_EXTENSION") == "1":  # behave as a pure-Python install
        _load_error = "disabled by MMFAST_DISABLE_EXTENSION=1"
        return False
    try:
        if override:
            for path in override.split(os.pathsep):
                if path:
                    torch.ops.load_library(path)
        else:
            from mmfast import _C  # noqa: F401  (importing runs the STABLE_TORCH_LIBRARY registrations)
            _load_cuda_kernels()
        return True
    except (ImportError, OSError, RuntimeError) as e:
        _load_error = f"{type(e).__name__}: {e}"
        if build_info().get("built"):  # built but unloadable: worth one warning
            warnings.warn(f"mmfast: compiled extension failed to load ({_load_error}); using Triton/PyTorch paths")
        return False


def _load_cuda_kernels() -> None:
    """The CUDA kernels are a second library, ``mmfast._C_cuda`` (it links the CUDA runtime of its
    build): loaded after ``_C`` and only under a CUDA torch. If it does not load (a torch for another
    CUDA major version), the C++ CPU faces stay available and GPUs use the Triton/PyTorch paths."""
    global _cuda_load_error
    if importlib.util.find_spec("mmfast._C_cuda") is None:
        return  # built without CUDA kernels
    if torch.version.cuda is None:
        _cuda_load_error = "torch was built without CUDA"
        return
    try:
        from mmfast import _C_cuda  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:
        _cuda_load_error = f"{type(e).__name__}: {e}"
        warnings.warn(f"mmfast: the CUDA kernels failed to load ({_cuda_load_error}); the C++ CPU kernels are "
                      "available, GPUs use the Triton/PyTorch paths")


def cuda_load_error() -> str | None:
    """Why the CUDA kernels of a build that has them are not loaded (None when they are, or when
    the build has none)."""
    load()
    return _cuda_load_error


def load_error() -> str | None:
    load()
    return _load_error


_CPU_ISAS = ("base", "avx2", "avx512")  # the order of csrc/cpu/isa.h's Isa enum


def cpu_isa() -> str | None:
    """Which instruction set the C++ CPU kernels run here: "avx512", "avx2" or "base" (the
    extension is built for baseline x86-64 and picks its hot loops at run time), or None when
    the extension is not loaded. ``MMFAST_CPU_ISA=base|avx2|avx512`` narrows the choice (never
    past what the CPU has); a value it does not know is ignored with one warning."""
    if not load() or not hasattr(torch.ops.mmfast_C, "cpu_isa"):
        return None
    asked = os.environ.get("MMFAST_CPU_ISA")
    if asked and asked not in _CPU_ISAS:
        _warn_once(f"mmfast: MMFAST_CPU_ISA={asked!r} is not one of {', '.join(_CPU_ISAS)}; ignoring it")
    return _CPU_ISAS[torch.ops.mmfast_C.cpu_isa()]


@lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message)


def has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether ``torch.ops.mmfast_C.<name>`` has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    if (name, dispatch_key) in _kernels_found:
        return True
    if not load():
        return False
    try:
        found = torch._C._dispatch_has_kernel_for_dispatch_key(f"mmfast_C::{name}", dispatch_key)
    except RuntimeError:
        return False
    if found:  # a registered kernel stays registered; a missing one may still be loaded later
        _kernels_found.add((name, dispatch_key))
    return found


# The CPU faces ask on every call (3 us per dispatcher query: more than a tiny kernel's work).
_kernels_found: set = set()


def op(name: str):
    """``torch.ops.mmfast_C.<name>``."""
    load()
    return getattr(torch.ops.mmfast_C, name)
