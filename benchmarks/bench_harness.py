"""The harness itself: ratio to eager is computed in-process and recorded."""

import torch

from harness import bench


def test_harness_records_ratio(benchmark):
    x = torch.randn(64, 64)
    info = bench(benchmark, lambda: x @ x, op="matmul", impl="mmfast-cpu", mode="fwd", case="64x64",
                 dtype=x.dtype, eager=lambda: x @ x, flops=2 * 64**3)
    assert info["eager_ms"] is not None and info["ratio_to_eager"] > 0 and info["tflops"] > 0
    assert benchmark.extra_info["device"]
