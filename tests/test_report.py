"""benchmarks/report.py's pytest-benchmark tables (its GPU-check kernel table: tests/test_gpu_check.py)."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("report", Path(__file__).parent.parent / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def _row(impl, ms, smoke=False, device="NVIDIA H100 80GB HBM3"):
    return {"op": "attention", "impl": impl, "mode": "fwd", "case": "c", "dtype": "bfloat16", "median_ms": ms,
            "device": device, "smoke": smoke}


def test_markdown_has_ratio_columns():
    rows = [dict(_row("eager", 4.0), ratio_to_eager=None), dict(_row("mmfast-triton", 2.0), ratio_to_eager=2.0)]
    md = report.markdown(rows)
    assert "× eager" in md and "| mmfast-triton |" in md
