"""The C++ CPU kernels are built for baseline x86-64 and pick AVX-512, AVX2 or plain code at run
time (csrc/cpu/isa.h). This machine runs the widest; here every narrower instantiation runs the
C++ CPU face tests too (MMFAST_CPU_ISA, in a fresh process since the choice is made once), after
proving that the process really runs the instruction set asked for."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from mmfast import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not _extension.load(), reason="needs the compiled extension")

ORDER = ("base", "avx2", "avx512")


def _isa_in_fresh_process(asked):
    env = dict(os.environ)
    env.pop("MMFAST_CPU_ISA", None)
    if asked is not None:
        env["MMFAST_CPU_ISA"] = asked
    code = "from mmfast import _extension; print(_extension.cpu_isa())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1], out.stderr


def test_override_narrows_and_never_widens():
    widest, _ = _isa_in_fresh_process(None)
    assert widest in ORDER
    for asked in ORDER:
        got, _ = _isa_in_fresh_process(asked)
        # what was asked when the CPU has it, else the widest the CPU has
        assert got == ORDER[min(ORDER.index(asked), ORDER.index(widest))], (asked, got, widest)


def test_unknown_value_is_named_in_one_warning_and_ignored():
    widest, _ = _isa_in_fresh_process(None)
    got, err = _isa_in_fresh_process("sse9")
    assert got == widest
    assert "MMFAST_CPU_ISA='sse9' is not one of base, avx2, avx512" in err


def test_cpu_isa_is_reported_by_info():
    from mmfast.info import backends

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert backends()["extension"]["cpu_isa"] == _extension.cpu_isa()


# The tests of every C++ CPU face (forward and backward against float64, odd sizes, dropout
# masks), rerun with a narrower instruction set. The widest runs in the normal suite.
FACE_TESTS = ["tests/test_concat_embed.py", "tests/test_cross_entropy.py", "tests/test_attention.py",
              "tests/test_attention_cpu.py"]


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_cpu_faces_under_narrower_isa(isa):
    widest, _ = _isa_in_fresh_process(None)
    if ORDER.index(isa) >= ORDER.index(widest):
        pytest.skip(f"this CPU's widest instruction set is {widest}: the normal suite runs it")
    assert _isa_in_fresh_process(isa)[0] == isa
    env = dict(os.environ, MMFAST_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          *FACE_TESTS, "-k", "cpu"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=900)
    tail = out.stdout[-3000:]
    assert out.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail, tail
