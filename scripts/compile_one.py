"""Compile ONE csrc file alone (syntax/type check, no link) with the flags setup.py uses.

    .venv/bin/python scripts/compile_one.py csrc/cuda/attention.cu

Lets you check a file without touching the shared build (scripts/dev_build.sh)."""

import os
import subprocess
import sys
import sysconfig
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import setup as _setup  # noqa: E402  (only for _find_cuda_home; setup() runs on import, so guard below)


def main(path):
    from torch.utils.cpp_extension import include_paths

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    inc = [f"-I{p}" for p in include_paths() + [os.path.join(root, "csrc"), sysconfig.get_paths()["include"]]]
    defs = ["-DTORCH_EXTENSION_NAME=_C", "-D_GLIBCXX_USE_CXX11_ABI=1", f"-DPy_LIMITED_API={_setup.PY_LIMITED_API}"]
    out = os.path.join(tempfile.mkdtemp(), "x.o")
    if path.endswith(".cu"):
        cuda = _setup._find_cuda_home()
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0").split(";")[0].replace(".", "")
        cmd = [os.path.join(cuda, "bin", "nvcc"), "-c", path, "-o", out, "-std=c++20"] + _setup.nvcc_flags() + [
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xcompiler", "-fPIC",
               "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "-D__CUDA_NO_HALF2_OPERATORS__"] + inc + defs
    else:
        cmd = ["c++", "-c", path, "-o", out, "-std=c++20", "-fPIC"] + _setup.cxx_flags(False) + inc + defs
    print(" ".join(cmd[:3]), "...", flush=True)
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main(sys.argv[1])
