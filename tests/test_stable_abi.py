"""The compiled extension stays on the LibTorch stable ABI (issue #15), so one build loads into every
torch >= 2.11 and every CPython >= 3.10:

- no C++/CUDA source under csrc/ includes a non-stable torch header (torch/extension.h, ATen/, c10/,
  torch/library.h, ...): only torch/csrc/stable/ and torch/headeronly/;
- the built library has no undefined at::, c10:: or torch:: C++ symbol (nm -D --undefined-only) and
  does not link libtorch_python;
- it is a limited-API (abi3) module and it registers every op of csrc/ once loaded.

scripts/check_torch211.sh runs this file again inside a torch 2.11.0 venv, against the installed wheel.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmfast
from mmfast import _extension

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SOURCES = sorted(p for p in CSRC.rglob("*") if p.suffix in {".h", ".cuh", ".cpp", ".cu"})

# Torch headers a source may include (the stable C++ wrappers, the header-only library and the C shim
# they are built on); everything else under these roots is the unstable C++ API.
STABLE_PREFIXES = ("torch/csrc/stable/", "torch/headeronly/", "torch/csrc/inductor/aoti_torch/c/")
UNSTABLE_ROOTS = ("torch/", "ATen/", "c10/", "caffe2/", "pybind11/")
INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)



def forbidden_includes(text: str) -> list[str]:
    return [
        inc for inc in INCLUDE.findall(text)
        if inc.startswith(UNSTABLE_ROOTS) and not inc.startswith(STABLE_PREFIXES)
    ]


def test_sources_found():
    names = {p.relative_to(ROOT).as_posix() for p in SOURCES}
    assert {"csrc/common.h", "csrc/module.cpp", "csrc/cpu/cross_entropy.cpp", "csrc/cuda/concat_embed.cu"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_source_includes_only_stable_headers(path):
    text = path.read_text()
    assert forbidden_includes(text) == [], f"{path.relative_to(ROOT)} includes non-stable torch headers"
    # The unstable registration macros would compile through a stable header's transitive includes.
    assert not re.search(r"(?<!STABLE_)TORCH_LIBRARY(_FRAGMENT|_IMPL)?\s*\(", text), "use STABLE_TORCH_LIBRARY_*"


def test_include_rule_catches_unstable_headers():
    assert forbidden_includes("#include <torch/extension.h>\n#include <ATen/Dispatch.h>\n# include <c10/util/Half.h>") == [
        "torch/extension.h", "ATen/Dispatch.h", "c10/util/Half.h"]
    assert forbidden_includes('#include <torch/csrc/stable/ops.h>\n#include "common.h"\n#include <cmath>\n'
                              '#include <torch/csrc/inductor/aoti_torch/c/shim.h>') == []


def _libraries() -> list[Path]:
    """The loaded mmfast libraries: _C and, in a CUDA build under a CUDA torch, _C_cuda."""
    if not _extension.load():
        if _extension.build_info().get("built"):
            pytest.fail(f"the extension was built but does not load: {_extension.load_error()}")
        pytest.skip(f"mmfast._C is not built ({_extension.load_error()})")
    if _extension.build_info().get("cuda") and torch.version.cuda is not None:
        assert _extension.cuda_load_error() is None, f"the CUDA kernels do not load: {_extension.cuda_load_error()}"
    override = os.environ.get("MMFAST_EXTENSION")  # libraries loaded by path instead of mmfast._C*
    if override:
        return [Path(p) for p in override.split(os.pathsep) if p]
    mods = [sys.modules[m] for m in ("mmfast._C", "mmfast._C_cuda") if m in sys.modules]
    return [Path(m.__file__) for m in mods]


UNSTABLE_SYMBOL = re.compile(r"^_ZN(K)?(2at|3c10|5torch)")


def unstable_symbols(nm_output: str) -> list[str]:
    names = [line.split()[-1] for line in nm_output.splitlines() if line.strip()]
    return [n for n in names if UNSTABLE_SYMBOL.match(n)]


def test_symbol_rule_catches_unstable_symbols():
    out = ("                 U _ZN2at4_ops5empty4callEv\n                 U _ZNK3c1010TensorImpl4sizeEl\n"
           "                 U _ZN5torch8autograd4gradEv\n                 U aoti_torch_get_dim\n"
           "                 U _ZNSt7__cxx1112basic_stringIcEE\n")
    assert unstable_symbols(out) == ["_ZN2at4_ops5empty4callEv", "_ZNK3c1010TensorImpl4sizeEl",
                                     "_ZN5torch8autograd4gradEv"]


@pytest.mark.skipif(shutil.which("nm") is None, reason="binutils' nm is not installed")
def test_library_has_no_unstable_torch_symbols():
    for lib in _libraries():
        out = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True,
                             check=True).stdout
        assert "aoti_torch_" in out, f"expected {lib.name} to use torch's C shim"  # nm really listed symbols
        assert unstable_symbols(out) == [], f"{lib.name} uses torch's unstable C++ ABI"


@pytest.mark.skipif(shutil.which("readelf") is None, reason="binutils' readelf is not installed")
def test_library_does_not_link_libtorch_python_and_cpu_library_not_cuda():
    for lib in _libraries():
        out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
        assert "(NEEDED)" in out
        assert "libtorch_python" not in out, lib.name
        if lib.name.startswith("_C."):  # the CPU library must load under a CPU-only torch
            assert "libtorch_cuda" not in out and "libcudart" not in out, lib.name


def test_library_is_a_limited_api_module():
    libs = _libraries()
    assert libs and all(lib.name.endswith(".abi3.so") for lib in libs), libs


def test_every_op_of_csrc_is_registered():
    _libraries()
    schemas = set()
    for p in CSRC.glob("*.cpp"):
        schemas |= set(re.findall(r'"(\w+)\(', p.read_text()))
    assert {"cross_entropy_forward", "concat_embed_backward", "attention_forward"} <= schemas
    for name in schemas:
        assert hasattr(torch.ops.mmfast_C, name), f"mmfast_C::{name} is not registered"
    cuda = _extension.build_info().get("cuda") and torch.version.cuda is not None
    faces = ["CPU"] + (["CUDA"] if cuda else [])  # what this build compiled and this torch can load
    for name in ("cross_entropy_forward", "cross_entropy_forward_inplace", "concat_embed_forward",
                 "concat_embed_backward"):
        for key in faces:
            assert _extension.has_kernel(name, key), f"no {key} kernel for mmfast_C::{name}"
    if "CUDA" in faces:
        assert _extension.has_kernel("attention_forward", "CUDA")


def test_has_kernel_remembers_only_what_it_found():
    """has_kernel caches its answers for speed: a kernel found stays found, one missing is asked
    again every time (and stays missing)."""
    _libraries()
    for _ in range(2):
        assert _extension.has_kernel("attention_forward", "CPU")
        assert not _extension.has_kernel("no_such_kernel", "CPU")
        assert not _extension.has_kernel("attention_forward", "XLA")  # a real key without a kernel


def test_errors_cross_the_abi_as_one_named_line():
    _libraries()
    x, t = torch.randn(3, 5), torch.tensor([0, 1, 9])
    with pytest.raises(RuntimeError) as e:  # raised inside a parallel_for worker
        torch.ops.mmfast_C.cross_entropy_forward(x, t, None, -100, 0.0, True, None)
    assert str(e.value).splitlines()[0] == (
        "mmfast: argument 'target': class index 9 at row 2 is outside [0, 5) and is not ignore_index=-100")
    with pytest.raises(RuntimeError, match=r"^mmfast: argument 'logits': expected one of the dtypes Float, Double, "
                                           r"Half, BFloat16, got Int"):
        torch.ops.mmfast_C.cross_entropy_forward(x.int(), t.clamp(max=4), None, -100, 0.0, True, None)


def test_runs_under_this_torch():
    """Prints which torch and which mmfast the run used (the torch 2.11 check reads it)."""
    print(f"torch {torch.__version__}, mmfast from {Path(mmfast.__file__).parent}, libraries {_libraries()}")
