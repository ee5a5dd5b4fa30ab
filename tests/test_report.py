"""benchmarks/report.py decides what backend='auto' prefers: it must never prefer an unverified
or slower CUDA face."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("report", Path(__file__).parent.parent / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def _row(impl, ms, smoke=False, device="NVIDIA H100 80GB HBM3"):
    return {"op": "attention", "impl": impl, "mode": "fwd", "case": "c", "dtype": "bfloat16", "median_ms": ms,
            "device": device, "smoke": smoke}


def test_cuda_preferred_only_when_tests_passed_and_faster():
    rows = [_row("mmfast-cuda", 1.0), _row("mmfast-triton", 2.0)]
    table = report.kernel_table(rows, {"attention": True}, "sm_90")
    cuda = [r for r in table if r["backend"] == "cuda"][0]
    assert cuda["correct"] and cuda["faster_than_triton"] and cuda["speedup_vs_triton"] == 2.0
    table = report.kernel_table(rows, {"attention": False}, "sm_90")
    assert not [r for r in table if r["backend"] == "cuda"][0]["correct"]
    slower = report.kernel_table([_row("mmfast-cuda", 3.0), _row("mmfast-triton", 2.0)], {"attention": True}, "sm_90")
    assert not [r for r in slower if r["backend"] == "cuda"][0]["faster_than_triton"]


def test_smoke_and_cpu_results_never_enter_the_table():
    rows = [_row("mmfast-cuda", 1.0, smoke=True), _row("mmfast-triton", 2.0, device="CPU: x")]
    assert report.kernel_table(rows, {"attention": True}, "sm_90") == []


def test_markdown_has_ratio_columns():
    rows = [dict(_row("eager", 4.0), ratio_to_eager=None), dict(_row("mmfast-triton", 2.0), ratio_to_eager=2.0)]
    md = report.markdown(rows)
    assert "× eager" in md and "| mmfast-triton |" in md
