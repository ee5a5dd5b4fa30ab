"""The plumbing: extension loading, backend dispatch, `mmfast info`, the correctness helper."""

import json
import os
import subprocess
import sys

import pytest
import torch

import mmfast
from mmfast import dispatch, testing


def _run(code: str, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)


def test_backends_dict_lists_every_op():
    info = mmfast.backends()
    assert set(info["ops"]) >= {"attention", "concat_embed", "cross_entropy", "linear_cross_entropy",
                                "contrastive_loss"}
    for name, entry in info["ops"].items():
        assert entry["backends"]["torch"] == "reference", name
        assert "cpu/float32" in entry["auto"], name
    assert info["versions"]["torch"] == torch.__version__


def test_extension_built_with_cpu_kernel_and_cuda_sources_reported():
    ext = mmfast.backends()["extension"]
    if not ext["built"]:
        pytest.skip(f"extension not built here: {ext['why_not']}")
    assert ext["loaded"], ext
    assert mmfast.backends()["ops"]["cross_entropy"]["backends"]["cpu"] == "C++ kernel (CPU-tested)"
    if ext["cuda_sources"]:
        assert ext["archs"], "CUDA sources built but no arch recorded"
        # compiled, never run here: info must not claim more than that
        status = mmfast.backends()["ops"]["cross_entropy"]["backends"]["cuda"]
        assert status.startswith("compiled") or status.startswith("verified"), status


def test_cli_info_json_is_one_object():
    out = subprocess.run([sys.executable, "-m", "mmfast", "info", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["ops"]["cross_entropy"]["backends"]["torch"] == "reference"


def test_cli_info_text_runs():
    out = subprocess.run([sys.executable, "-m", "mmfast", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "cross_entropy" in out.stdout and "extension mmfast._C" in out.stdout


def test_unknown_backend_name_is_rejected_clearly():
    x, t = torch.randn(4, 5), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="argument 'backend' must be one of"):
        mmfast.ops.cross_entropy(x, t, backend="fastest")


def test_unavailable_backend_names_what_is_available():
    x, t = torch.randn(4, 5), torch.randint(0, 5, (4,))
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is unavailable.*Available here: \[.*'torch'"):
        mmfast.ops.cross_entropy(x, t, backend="cuda")


def test_auto_picks_cpu_face_on_cpu_when_built():
    if not mmfast.backends()["extension"]["loaded"]:
        pytest.skip("extension not built")
    assert dispatch.resolve("cross_entropy", "auto", "cpu", torch.float32) == "cpu"


def test_cuda_face_is_preferred_only_where_the_table_says_verified_and_faster(monkeypatch):
    """MMFAST_TRUST_UNVERIFIED's order: the CUDA face before Triton only where the table has it
    verified and at least as fast as a verified Triton face in every size bucket both were timed in."""
    row = dict(op="cross_entropy", backend="cuda", arch="sm_90", dtype="bfloat16", verified=True,
               speedup_vs_reference={"large": 2.0})
    triton = dict(row, backend="triton", speedup_vs_reference={"large": 1.5})
    prefers = lambda rows: (monkeypatch.setattr(dispatch, "kernel_table", lambda: rows),
                            dispatch.cuda_preferred("cross_entropy", "sm_90", torch.bfloat16))[1]
    assert not prefers([])
    assert prefers([row]) and prefers([row, triton])
    assert not prefers([row, dict(triton, speedup_vs_reference={"large": 3.0})])
    assert not prefers([dict(row, verified=False)])
    assert not prefers([dict(row, arch="sm_80")]) and not prefers([dict(row, dtype="float16")])
    assert not prefers([dict(row, op="attention")]) and not prefers([dict(row, backend="triton")])


def test_env_default_backend_and_pure_python_mode():
    """MMFAST_BACKEND sets the default; with the extension disabled (as a build without compiler),
    every op still runs through the torch backend."""
    code = """
import torch, mmfast
from mmfast import dispatch
assert dispatch.get_default_backend() == 'torch', dispatch.get_default_backend()
x, t = torch.randn(6, 9, requires_grad=True), torch.randint(0, 9, (6,))
mmfast.ops.cross_entropy(x, t).backward()
q = torch.randn(2, 3, 5, 8)
mmfast.ops.attention(q, q, q)
mmfast.ops.concat_embed([torch.randn(2, 3, 8), torch.randn(2, 4, 8)])
mmfast.ops.linear_cross_entropy(torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,)))
mmfast.ops.contrastive_loss(torch.randn(4, 8), torch.randn(4, 8), torch.tensor(10.0))
print(mmfast.backends()['extension']['loaded'])
"""
    r = _run(code, MMFAST_BACKEND="torch", MMFAST_DISABLE_EXTENSION="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
    r = _run("import mmfast", MMFAST_BACKEND="bogus")
    assert r.returncode != 0 and "argument 'backend' must be one of" in r.stderr


# --- the correctness helper must be able to fail -------------------------------------------------

def test_assert_close_accepts_kernel_as_good_as_eager():
    ref = torch.randn(100, dtype=torch.float64)
    low = ref.half()
    testing.assert_close(ref.half(), ref, low)


def test_assert_close_rejects_larger_error():
    ref = torch.randn(100, dtype=torch.float64)
    low = ref.float()
    bad = ref.float() + 1e-3
    with pytest.raises(AssertionError, match="max error"):
        testing.assert_close(bad, ref, low)


def test_assert_close_rejects_nan():
    ref = torch.randn(10, dtype=torch.float64)
    out = ref.float().clone()
    out[3] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        testing.assert_close(out, ref, ref.float())


def test_poisoned_outputs_fill_python_and_cpp_allocations():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    with testing.poisoned_outputs():
        assert torch.isnan(torch.empty(16)).all()
        assert (torch.empty(4, dtype=torch.int64) == torch.iinfo(torch.int64).max).all()
        t = torch.ops.aten.empty.memory_format([8])  # at::empty through the C++ dispatcher
        assert torch.isnan(t).all()
        assert torch.isnan(torch.empty_strided((3, 2), (1, 3))).all()
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) \
        == before, "poisoned_outputs() must restore the deterministic-algorithms settings"


def test_check_op_catches_an_unwritten_element_of_a_cpp_face(monkeypatch):
    """A C++ face whose output keeps one element of at::empty unwritten is caught: the extension's
    allocations are poisoned too (simulated by a face that returns its loss one row short)."""
    if "cpu" not in testing.cpu_faces("cross_entropy"):
        pytest.skip("extension not built")
    import importlib

    from mmfast import _extension

    CE = importlib.import_module("mmfast.ops.cross_entropy")

    real = _extension.op("cross_entropy_forward")

    def leaky(logits, target, *args):  # runs the C++ face on all rows but the last, in a fresh buffer
        rows, grad = real(logits[:-1], target[:-1], *args)
        out = torch.ops.aten.empty.memory_format([logits.shape[0]], dtype=rows.dtype)
        out[:-1] = rows
        return out, grad

    monkeypatch.setattr(CE, "_face_forward", lambda backend: leaky)
    x, t = torch.randn(6, 9), torch.randint(0, 9, (6,))
    with pytest.raises(AssertionError, match="NaN"):
        testing.check_op(lambda x, t: mmfast.ops.cross_entropy(x, t, reduction="none", backend="cpu"),
                         lambda x, t: torch.nn.functional.cross_entropy(x, t, reduction="none"), [x, t],
                         reduction=9, face=("cross_entropy", "cpu"), name="leaky")
