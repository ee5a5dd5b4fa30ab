"""Builds the optional compiled extension ``mmfast._C``.

Sources, one file per op family and face:
    csrc/<family>.cpp       op schemas (STABLE_TORCH_LIBRARY_FRAGMENT) shared by CPU and CUDA  } mmfast._C
    csrc/cpu/<family>.cpp   C++ CPU kernels          (always, when a C++ compiler exists)      }
    csrc/cuda/<family>.cu   CUDA C++ kernels         (when nvcc and a CUDA-enabled torch exist)  mmfast._C_cuda

Everything is compiled against the LibTorch stable ABI with TORCH_TARGET_VERSION = 2.11 and the
Python limited API (3.10), so the built library loads into torch >= 2.11 on Python >= 3.10 and
`pip wheel .` tags the wheel cp310-abi3 (scripts/build_wheel.sh; README "Install").

Environment:
    MMFAST_BUILD_CUDA=auto|0|1   auto (default): CUDA sources when possible; 1: fail if impossible
    TORCH_CUDA_ARCH_LIST         default "8.0;9.0+PTX" (sm_80, sm_90, and PTX that newer GPUs JIT)
    MAX_JOBS                     parallel compile jobs (ninja)

Without a compiler the package installs as pure Python (Triton + PyTorch paths) and says why
once; ``mmfast info`` reports the same from ``mmfast/_build_info.json``.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "mmfast", "_build_info.json")

# The oldest torch the binary must load into (0xMMmm000000000000: major, minor). The stable headers
# refuse anything newer than this at compile time (their TORCH_FEATURE_VERSION guards).
TORCH_TARGET_VERSION = "0x020b000000000000"  # 2.11
PY_LIMITED_API = "0x030a0000"  # Python 3.10: the wheel is cp310-abi3
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def stable_abi_defines(cuda):
    """The stable-ABI target and, for CUDA builds, USE_CUDA (exposes the CUDA stream functions of
    torch's C shim). Py_LIMITED_API is added by torch's cpp_extension for py_limited_api=True
    extensions (scripts/compile_one.py adds it itself)."""
    defines = [f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"]
    return defines + (["-DUSE_CUDA", "-DMMFAST_WITH_CUDA"] if cuda else [])


# Hidden visibility: the library exports only PyInit__C (torch's stable types are hidden too).
# CPU parallelism goes through torch's thread pool (torch::stable::parallel_for): no -fopenmp.
# Both lists are also used by scripts/compile_one.py.
def cxx_flags(cuda):
    return ["-O3", "-fvisibility=hidden"] + stable_abi_defines(cuda)


def nvcc_flags():
    return ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler=-fvisibility=hidden"] + stable_abi_defines(True)


def _say(msg):
    print(f"[mmfast setup] {msg}", file=sys.stderr, flush=True)


def _find_cuda_home():
    """The toolkit folder. The ``nvcc`` on PATH may be a wrapper script, so torch's guess
    (two folders above it) can be wrong: accept only a folder that really holds bin/nvcc and
    libcudart."""

    def is_toolkit(path):
        if not path or not os.path.isfile(os.path.join(path, "bin", "nvcc")):
            return False
        libs = glob.glob(os.path.join(path, "lib64", "libcudart.so*")) + glob.glob(
            os.path.join(path, "targets", "*", "lib", "libcudart.so*")
        )
        return bool(libs)

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script: ask the real nvcc where it lives
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "replace")
            for token in head.split():
                if token.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if is_toolkit(c):
            return os.path.realpath(c)
    return None


def _have_cxx():
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) is not None or shutil.which("g++") is not None


def _write_build_info(**info):
    with open(BUILD_INFO, "w") as f:
        json.dump(info, f, indent=1)


def _extensions():
    mode = os.environ.get("MMFAST_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"MMFAST_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")

    try:
        import torch  # noqa: F401
    except ImportError:
        reason = "torch is not installed in the build environment (use --no-build-isolation)"
        _say(f"NOT building mmfast._C: {reason}; installing pure Python")
        _write_build_info(built=False, cuda=False, archs=[], reason=reason)
        return [], {}
    if not _have_cxx():
        reason = "no C++ compiler found (set CXX or install g++)"
        _say(f"NOT building mmfast._C: {reason}; installing pure Python (Triton + PyTorch paths)")
        _write_build_info(built=False, cuda=False, archs=[], reason=reason)
        return [], {}

    cuda_home = None
    cuda_reason = ""
    if mode == "0":
        cuda_reason = "MMFAST_BUILD_CUDA=0"
    else:
        import torch

        if torch.version.cuda is None:
            cuda_reason = "torch was built without CUDA"
        else:
            cuda_home = _find_cuda_home()
            if cuda_home is None:
                cuda_reason = "no CUDA toolkit (nvcc + libcudart) found; set CUDA_HOME"
    if mode == "1" and cuda_home is None:
        raise SystemExit(f"MMFAST_BUILD_CUDA=1 but CUDA cannot be built: {cuda_reason}")
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # must precede the cpp_extension import

    from torch.utils import cpp_extension

    if cuda_home:
        cpp_extension.CUDA_HOME = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    archs = [a.strip() for a in os.environ["TORCH_CUDA_ARCH_LIST"].replace(",", ";").split(";") if a.strip()]

    # A library from before the stable-ABI port (_C.cpython-3XY-*.so) would shadow the new
    # _C.abi3.so: Python tries the version-specific suffix first. A _C_cuda from a CUDA build is
    # stale once a build without CUDA replaces _C.
    stale_cuda = [] if cuda_home else glob.glob(os.path.join(ROOT, "mmfast", "_C_cuda*.so"))
    for stale in glob.glob(os.path.join(ROOT, "mmfast", "_C.cpython-*.so")) + stale_cuda:
        _say(f"removing {os.path.relpath(stale, ROOT)} (left by an older build)")
        os.remove(stale)

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    include_dirs = [os.path.join(ROOT, "csrc")]
    # mmfast._C: the schemas and the C++ CPU kernels; it links only torch's CPU libraries, so it
    # loads under every torch build. mmfast._C_cuda: the CUDA kernels (they link the CUDA runtime
    # the build used); mmfast/_extension.py loads it after _C, and only under a CUDA torch.
    exts = [cpp_extension.CppExtension(
        name="mmfast._C", sources=rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp"), include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags(False)}, py_limited_api=True)]
    if cuda_home:
        exts.append(cpp_extension.CUDAExtension(
            name="mmfast._C_cuda", sources=rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu"), include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags(True), "nvcc": nvcc_flags()}, py_limited_api=True))
        _say(f"building mmfast._C (C++ CPU) and mmfast._C_cuda (CUDA sources for {archs}, CUDA_HOME={cuda_home})")
    else:
        _say(f"building mmfast._C with C++ CPU sources only: {cuda_reason}")
    _write_build_info(
        built=True,
        cuda=bool(cuda_home),
        archs=[f"sm_{a.replace('.', '').replace('+PTX', '')}" for a in archs] if cuda_home else [],
        ptx=[f"compute_{a.replace('.', '').replace('+PTX', '')}" for a in archs if a.endswith("+PTX")] if cuda_home else [],
        reason="" if cuda_home else cuda_reason,
        torch=__import__("torch").__version__,
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return exts, {"build_ext": build_ext}


if __name__ == "__main__":  # importable by scripts/compile_one.py without building
    ext_modules, cmdclass = _extensions()
    # A compiled extension makes the wheel cp310-abi3 (one wheel for every CPython >= 3.10).
    options = {"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {}
    setup(ext_modules=ext_modules, cmdclass=cmdclass, options=options)
