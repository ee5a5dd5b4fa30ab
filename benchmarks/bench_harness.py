"""The harness itself: ratio to eager is computed in-process and recorded."""

import pytest
import torch

from harness import bench, rule_check


def test_harness_records_ratio(benchmark):
    x = torch.randn(64, 64)
    info = bench(benchmark, lambda: x @ x, op="matmul", impl="mmfast-cpu", mode="fwd", case="64x64",
                 dtype=x.dtype, eager=lambda: x @ x, flops=2 * 64**3,
                 check=rule_check(lambda x: x @ x, lambda x: x @ x, [x], impl="eager", op="matmul", grad=True,
                                  reduction=64, name="64x64"))
    assert info["eager_ms"] is not None and info["ratio_to_eager"] > 0 and info["tflops"] > 0
    assert benchmark.extra_info["device"]


def test_harness_refuses_a_case_without_a_check():
    with pytest.raises(TypeError, match="argument 'check'"):
        bench(None, lambda: None, op="noop", impl="eager", mode="fwd", case="-", dtype=torch.float32,
              check=None)


def test_a_wrong_kernel_fails_its_check_before_it_is_timed():
    x = torch.randn(16, 16)
    timed = []
    with pytest.raises(AssertionError, match="max error"):
        bench(None, lambda: timed.append(1), op="matmul", impl="eager", mode="fwd", case="16x16",
              dtype=x.dtype, check=rule_check(lambda x: x @ x + 1e-3, lambda x: x @ x, [x], impl="eager",
                                              op="matmul", grad=False, reduction=16, name="off by 1e-3"))
    assert timed == [1]  # the availability probe ran once; no timing round did
