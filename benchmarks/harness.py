"""Shared benchmark harness for pytest-benchmark suites.

Every case is one implementation ("impl") of one op on one shape, in one mode:

    from harness import bench, SMOKE, DEVICE, pick

    SHAPES = pick(gpu=[(16384, 30522)], smoke=[(64, 1000)])      # tiny shapes in smoke mode

    @pytest.mark.parametrize("impl", ["eager", "mmfast-triton", "mmfast-cuda", "liger"])
    def test_ce(benchmark, impl, ...):
        x = ...
        fn = {...}[impl]                     # zero-argument callable running one step
        bench(benchmark, fn, op="cross_entropy", impl=impl, mode="fwd+bwd", case="N=16384,V=30522",
              dtype=x.dtype, eager=eager_fn, flops=..., bytes_moved=...)

Every case checks before it times: ``check`` (required) runs the case's implementation once on
the case's inputs and asserts its result under the correctness rule (mmfast/testing.py: float64
reference, error <= 2x / 3x eager's in the same dtype, the mmfast face asked for is the face that
ran), so a benchmark of a wrong kernel fails instead of timing it. Build it with
:func:`rule_check` (an op) or :func:`model_check` (a model's loss). On a GPU the check runs on a
leading slice of the inputs (``check_rows``) so that the float64 reference stays cheap.

`bench` times `fn` (CUDA events on a GPU, perf_counter on CPU; warm-up first; median), times the
eager baseline `eager` for the same (op, case, mode, dtype) once per process with the same timer,
measures peak extra GPU memory, and records in ``benchmark.extra_info``: device, versions, op,
impl, mode, case, dtype, median_ms, eager_ms, ratio_to_eager (eager_ms / median_ms: > 1 means
faster than eager), TFLOP/s and/or GB/s when flops/bytes are given, peak_mem_mb. It then hands
``fn`` to pytest-benchmark (so the JSON has its statistics too). An impl that is unavailable here
(raises RuntimeError mentioning "unavailable", ImportError, NotImplementedError) is skipped with
the reason.

Impl names used across suites (report.py groups by them): "eager", "compile" (torch.compile of
the eager code), "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "liger",
"mmfast-triton", "mmfast-cuda", "mmfast-cpu", "mmfast" (a model with mmfast's default backends).

Smoke mode (no GPU, or MMFAST_BENCH_SMOKE=1): tiny shapes, one round, so the suites run in CI
and never rot. Smoke timings are not benchmark results.

To keep inputs out of L2 on the GPU (50 MB), build several input sets and rotate through them
inside ``fn`` (``rotate`` below).
"""

from __future__ import annotations

import copy
import itertools
import os
import platform
import statistics
import time
from typing import Any, Callable

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMOKE = DEVICE == "cpu" or os.environ.get("MMFAST_BENCH_SMOKE") == "1"
_eager_cache: dict[tuple, float] = {}


def check_rows(n: int, gpu: int = 2) -> int:
    """Leading rows (batch items) a correctness check uses: all of them in smoke mode, at most
    ``gpu`` on a GPU (the float64 reference of a full benchmark batch would cost more than the timing)."""
    return n if SMOKE else min(n, gpu)


def rule_check(fn: Callable, reference: Callable, inputs: list, *, impl: str, op: str, grad: bool,
               reduction, name: str) -> Callable[[], Any]:
    """A ``check`` for :func:`bench`: ``mmfast.testing.check_op(fn, reference, inputs)`` (outputs,
    and with ``grad`` the gradients of the floating-point inputs), asserting the face for
    "mmfast-<backend>" impls."""
    from mmfast import testing

    face = (op, impl.split("-", 1)[1]) if impl.startswith("mmfast-") else None
    grads = [i for i, x in enumerate(inputs) if grad and isinstance(x, torch.Tensor) and x.is_floating_point()]
    return lambda: testing.check_op(fn, reference, inputs, grad_inputs=grads, reduction=reduction, face=face,
                                    name=f"{impl} {name}")


def model_check(model: torch.nn.Module, weights: torch.nn.Module, twin: torch.nn.Module, inputs: dict, *,
                name: str) -> Callable[[], Any]:
    """A ``check`` for :func:`bench`: the loss of ``model`` (eval mode, no grad, in the weights'
    dtype) against ``twin`` (the plain-PyTorch model) holding ``weights``' current values, run in
    float64 (reference) and in the weights' dtype (baseline)."""
    from mmfast import testing

    def check():
        low = copy.deepcopy(twin)
        low.load_state_dict(weights.state_dict())
        ref = copy.deepcopy(low).double()
        was = weights.training
        for m in (weights, low, ref):
            m.eval()
        cast = lambda v: v.double() if v.is_floating_point() else v
        try:
            with torch.no_grad():
                out = model(**inputs).loss
                r = ref(**{k: cast(v) for k, v in inputs.items()}).loss
                l_ = low(**inputs).loss
        finally:
            weights.train(was)
        width = max((m.in_features for m in low.modules() if isinstance(m, torch.nn.Linear)), default=1)
        tokens = max((v.numel() // v.shape[-1] for v in inputs.values() if v.dim() >= 2), default=1)
        testing.assert_close(out, r, l_, name=f"{name} loss", reduction=(width, tokens))

    return check


def pick(*, gpu: list, smoke: list) -> list:
    """Parametrisation values: real shapes on a GPU, tiny ones in smoke mode."""
    return smoke if SMOKE else gpu


def rotate(items: list) -> Callable[[], Any]:
    """Returns a function giving the next item of ``items`` each call (to cycle input sets)."""
    it = itertools.cycle(items)
    return lambda: next(it)


def device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} x{os.cpu_count()}"


def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    import mmfast

    out["mmfast"] = mmfast.__version__
    return out


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], *, warmup: int | None = None, reps: int | None = None) -> float:
    """Median milliseconds of ``fn()``: CUDA events per repetition on a GPU, wall clock on CPU."""
    warmup = warmup if warmup is not None else (0 if SMOKE else 5)
    reps = reps if reps is not None else (1 if SMOKE else 30)
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], Any]) -> float | None:
    """Peak GPU memory allocated by one ``fn()`` beyond what was allocated before it."""
    if DEVICE != "cuda":
        return None
    _sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    _sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _skip_if_unavailable(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except (ImportError, NotImplementedError) as e:
        pytest.skip(f"unavailable here: {e}")
    except RuntimeError as e:
        if "unavailable" in str(e) or "not supported" in str(e).lower():
            pytest.skip(f"unavailable here: {str(e).splitlines()[0]}")
        raise


def bench(benchmark, fn: Callable[[], Any], *, op: str, impl: str, mode: str, case: str, dtype,
          check: Callable[[], Any], eager: Callable[[], Any] | None = None, flops: float | None = None,
          bytes_moved: float | None = None, samples: int | None = None, extra: dict | None = None) -> dict:
    """Checks, then times one case; see the module docstring. ``samples``: items per call, for samples/s."""
    if not callable(check):
        raise TypeError(f"bench({op}, {impl}): argument 'check' must be a callable asserting the result first")
    _skip_if_unavailable(fn)
    check()
    dt = str(dtype).replace("torch.", "")
    ms = time_ms(fn)
    key = (op, case, mode, dt)
    if impl == "eager":
        _eager_cache[key] = ms
    elif eager is not None and key not in _eager_cache:
        _eager_cache[key] = time_ms(eager)
    eager_ms = _eager_cache.get(key)
    info = {
        "device": device_name(), **versions(), "smoke": SMOKE,
        "op": op, "impl": impl, "mode": mode, "case": case, "dtype": dt,
        "median_ms": ms, "eager_ms": eager_ms,
        "ratio_to_eager": (eager_ms / ms) if eager_ms else None,
        "peak_mem_mb": peak_memory_mb(fn),
    }
    if flops:
        info["tflops"] = flops / (ms * 1e-3) / 1e12
    if bytes_moved:
        info["gbps"] = bytes_moved / (ms * 1e-3) / 1e9
    if samples:
        info["samples_per_s"] = samples / (ms * 1e-3)
    if extra:
        info.update(extra)
    benchmark.extra_info.update(info)

    def step():
        fn()
        _sync()

    benchmark.pedantic(step, rounds=1 if SMOKE else 10, iterations=1, warmup_rounds=0 if SMOKE else 1)
    return info
