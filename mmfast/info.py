"""What this installation offers: versions, the compiled extension, and per op which backends
exist, which were verified on a GPU, and which ``auto`` picks here and why."""

from __future__ import annotations

import platform

import torch

from mmfast import _extension, dispatch


def _versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "mmfast": __import__("mmfast").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "gpu": gpu,
        "triton_interpret": dispatch.triton_interpreting(),
    }


def backends() -> dict:
    """Everything ``mmfast info --json`` prints, as a dict."""
    import mmfast.ops  # noqa: F401  (registers every op family)

    info = _extension.build_info()
    loaded = _extension.load()
    ext = {
        "built": bool(info.get("built")),
        "loaded": loaded,
        "cuda_sources": bool(info.get("cuda")),
        "archs": info.get("archs", []),
        "cpu_isa": _extension.cpu_isa(),
        "why_not": info.get("reason") or (None if loaded else _extension.load_error()),
    }
    ops = {}
    for name in dispatch.op_names():
        spec = dispatch._OPS[name]
        faces = {"torch": "reference"}
        if spec.triton_module:
            mod, err = dispatch._triton_face(spec.triton_module)
            faces["triton"] = "implemented" if mod is not None else f"unavailable: {err}"
        # CPU faces run in the CPU test suite (CI); GPU faces only count as verified from GPU runs.
        if spec.cpp_kernel and _extension.has_kernel(spec.cpp_kernel, "CPU"):
            faces["cpu"] = "C++ kernel (CPU-tested)"
        elif spec.cpu_python:
            faces["cpu"] = "PyTorch path (CPU-tested)"
        if spec.cpp_kernel and _extension.has_kernel(spec.cpp_kernel, "CUDA"):
            faces["cuda"] = "compiled"
        gpu_verified = {b: dispatch.verified_on_gpu(name, b) for b in ("cuda", "triton")}
        for b, where in gpu_verified.items():
            if b in faces and not faces[b].startswith("unavailable"):
                faces[b] = f"verified on GPU ({', '.join(where)})" if where else f"{faces[b]}, unverified on GPU"
        choices = dispatch.auto_choices(name)
        ops[name] = {"backends": faces, "auto": {k: c[0] for k, c in choices.items()},
                     "auto_why": {k: c[1] for k, c in choices.items()}}
    return {"versions": _versions(), "extension": ext, "default_backend": dispatch.get_default_backend(), "ops": ops}
