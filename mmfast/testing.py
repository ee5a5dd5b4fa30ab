"""The correctness rule every mmfast kernel is held to (ENGINEERING.md section 4).

A kernel's output ``out`` passes when, against the eager formula computed in float64 (``ref``),

    max|out - ref| <= factor * max|eager_lowp - ref| + floor

where ``eager_lowp`` is the same eager formula run in the kernel's dtype, ``factor`` is 2 for
outputs and 3 for gradients (the flash-attention test rule), and ``floor`` is the rounding error a
correct kernel may make where eager happens to be exact (see :func:`rounding_floor`)::

    floor = magnitude * (u(dtype) + u(float32) * sum(sqrt(K) for K in reduction))

``u`` is a dtype's unit roundoff (float32 is the accumulation dtype; float64 for float64),
``magnitude`` the size of the compared quantity (max|ref| unless the caller names a larger quantity
it is part of) and ``reduction`` the lengths of the (nested) reductions behind one element. NaN never passes unless the reference has NaN in the very same
places.

Outputs are poisoned before kernels run: inside :func:`poisoned_outputs`, every ``torch.empty``
(Python or C++ ``at::empty``) is filled with NaN (integers with their max value), so an element
a kernel forgets to write fails the comparison.

Typical use::

    with poisoned_outputs():
        out = mmfast.ops.cross_entropy(x, t, backend="cpu")
    ref = reference(x.double(), t)            # float64
    low = reference(x, t)                     # eager in x.dtype
    assert_close(out, ref, low, name="loss", reduction=(C, N))   # log-sum-exp over C, mean over N
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from typing import Callable, Iterator, Sequence

import torch

from mmfast import _provenance

DIRECTIONS = ("forward", "backward")

def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for a p-bit significand: the largest relative error of one rounding."""
    return torch.finfo(dtype).eps / 2


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """mmfast kernels accumulate in float32 (float64 for float64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rounding_floor(dtype: torch.dtype, magnitude: float, reduction: int | Sequence[int] = 1) -> float:
    """Rounding error a correct ``dtype`` kernel may make on a quantity of size ``magnitude``
    whose elements each come out of reductions of the given lengths (nested reductions: one
    length per level, e.g. ``(Lk, D)`` for attention's scores, then the weighted sum over keys)::

        magnitude * (u(dtype) + u(acc) * sum(sqrt(K) for K in reduction))

    A sum of K terms of one sign, evaluated in any order in the accumulation dtype ``acc``, is off
    by at most about u(acc) * sqrt(K) * |sum| (Higham & Mary's probabilistic bound, lambda = 1); to
    first order the errors of nested reductions add, and rounding the result to ``dtype`` adds
    u(dtype). Where terms cancel the error is larger, but then eager's own error, which the rule
    measures, is too."""
    lengths = (reduction,) if isinstance(reduction, int) else tuple(reduction)
    if any(int(k) < 0 for k in lengths):
        raise ValueError(f"rounding_floor: reduction lengths must be >= 0, got {lengths}")
    acc = unit_roundoff(accumulation_dtype(dtype)) * sum(math.sqrt(max(int(k), 1)) for k in lengths)
    return magnitude * (unit_roundoff(dtype) + acc)


@contextlib.contextmanager
def poisoned_outputs():
    """Every uninitialised allocation inside the block is filled with NaN (floats) or the
    maximum value (integers), in Python and in the C++ extension alike."""
    import torch.utils.deterministic as det

    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        det.fill_uninitialized_memory = prev_fill
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


@contextlib.contextmanager
def faces_run() -> Iterator[Counter]:
    """Counts, per ``(op, backend, direction)``, the mmfast faces that run inside the block
    (eager or compiled; recorders nest). Faces that compute their gradient in the forward pass
    (the cross-entropy family) count their "backward" there."""
    counts: Counter = Counter()
    _provenance.push(counts)
    try:
        yield counts
    finally:
        _provenance.pop(counts)


def assert_face_ran(counts: Counter, op: str | None, backend: str, directions: Sequence[str] = DIRECTIONS,
                    *, what: str = "") -> None:
    """The face ``backend`` of ``op`` (of every op that ran when ``op`` is None) ran in each of
    ``directions``, and no other face did."""
    ran = {key: n for key, n in counts.items() if n and (op is None or key[0] == op)}
    for d in directions:
        if not any(b == backend and dd == d for (_, b, dd) in ran):
            raise AssertionError(f"{what or op or 'mmfast'}: face {backend!r} did not run {d} "
                                 f"(faces that ran: {_faces_text(ran)})")
    others = {key: n for key, n in ran.items() if key[1] != backend}
    if others:
        raise AssertionError(f"{what or op or 'mmfast'}: asked for face {backend!r}, but other faces ran: "
                             f"{_faces_text(others)}")


def _faces_text(ran: dict) -> str:
    return ", ".join(f"{op}/{b}/{d} x{n}" for (op, b, d), n in sorted(ran.items())) or "none"


def max_abs_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - ref| in float64; NaN/inf where the two disagree on non-finite values."""
    a64, r64 = a.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    if a64.shape != r64.shape:
        raise AssertionError(f"shape {tuple(a64.shape)} != reference shape {tuple(r64.shape)}")
    if a64.numel() == 0:
        return 0.0
    same_nonfinite = (~torch.isfinite(r64)) & ((a64 == r64) | (torch.isnan(a64) & torch.isnan(r64)))
    diff = (a64 - r64).abs().masked_fill(same_nonfinite, 0.0)
    return float(diff.max())


def finite_magnitude(t: torch.Tensor) -> float:
    """max|t| over its finite elements (0 when there are none)."""
    t = t.detach()
    finite = t[torch.isfinite(t)] if t.numel() else t
    return float(finite.abs().max()) if finite.numel() else 0.0


def assert_close(out: torch.Tensor, ref: torch.Tensor, eager_lowp: torch.Tensor, *, grad: bool = False,
                 name: str = "output", factor: float | None = None, floor: float | None = None,
                 reduction: int | Sequence[int] = 1, magnitude: float | None = None) -> dict:
    """Asserts the rule above; returns the measured errors (for reports). ``floor`` defaults to
    :func:`rounding_floor` of ``out.dtype`` with ``reduction`` and ``magnitude`` (max|ref| unless
    given: pass the magnitude of the whole quantity when ``ref`` is a slice of it, e.g. one
    parameter's share of a model's gradient)."""
    factor = factor if factor is not None else (3.0 if grad else 2.0)
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if torch.isnan(out).any() and not torch.equal(torch.isnan(out.cpu()), torch.isnan(ref.cpu())):
        n = int(torch.isnan(out).sum())
        raise AssertionError(f"{name}: {n} NaN element(s) where the reference has none "
                             "(unwritten output or numerical failure)")
    err = max_abs_err(out, ref)
    base = max_abs_err(eager_lowp, ref)
    if floor is None:
        if magnitude is None:
            magnitude = finite_magnitude(ref)
        floor = rounding_floor(out.dtype, magnitude, reduction) + 1e-30
    bound = factor * base + floor
    if not err <= bound:  # also catches err = NaN
        raise AssertionError(f"{name} ({out.dtype}): max error {err:.3e} > bound {bound:.3e} "
                             f"(= {factor:g} x eager {out.dtype} error {base:.3e} + floor {floor:.1e})")
    return {"name": name, "err": err, "eager_err": base, "bound": bound}


def check_op(fn: Callable[..., torch.Tensor | Sequence[torch.Tensor]],
             reference: Callable[..., torch.Tensor | Sequence[torch.Tensor]],
             inputs: Sequence, *, face: tuple[str, str] | None, reduction: int | Sequence[int],
             grad_inputs: Sequence[int] = (), name: str = "op", grad_seed: int = 0) -> list[dict]:
    """Runs ``fn(*inputs)`` with poisoned outputs and checks every output and, for the inputs whose
    positions are in ``grad_inputs``, every gradient against ``reference`` in float64 (rule factor 2,
    gradients 3) with ``reference(*inputs)`` in the inputs' own dtype as the low-precision baseline.
    ``reduction``: the lengths of the nested reductions behind one element of the outputs and
    gradients (the longest path; see :func:`rounding_floor`), e.g. ``(C, N)`` for a cross-entropy
    summed over N rows of C classes. ``face``: ``(op, backend)`` of the mmfast face ``fn`` asks
    for, which must be the face that runs (forward, and backward when gradients are checked), and
    the only one; None only for a ``fn`` that is not an mmfast op.

    Tensors among ``inputs`` are used as given (their dtype is the kernel's dtype, and ``fn`` gets
    them with their strides: a row- or column-strided view stays one); non-tensor inputs pass
    through. Upstream gradients are random (seeded), never ones."""

    def prepare(dtype_map, same_strides=False):
        out = []
        for i, x in enumerate(inputs):
            if isinstance(x, torch.Tensor):
                y = _copy(dtype_map(x).detach(), same_strides)
                if i in grad_inputs:
                    y.requires_grad_(True)
                out.append(y)
            else:
                out.append(x)
        return out

    as_list = lambda r: list(r) if isinstance(r, (tuple, list)) else [r]
    to64 = lambda x: x.to(torch.float64) if x.is_floating_point() else x

    kin = prepare(lambda x: x, same_strides=True)
    with faces_run() as ran, poisoned_outputs():
        kout = as_list(fn(*kin))
    if face is not None:
        assert_face_ran(ran, face[0], face[1], ("forward",), what=name)
    rin = prepare(lambda x: to64(x).cpu())
    rout = as_list(reference(*rin))
    lin = prepare(lambda x: x)
    lout = as_list(reference(*lin))

    results = []
    diff_outs = []
    for j, (k, r, l) in enumerate(zip(kout, rout, lout)):
        if k is None:
            continue
        if k.is_floating_point():
            results.append(assert_close(k, r, l, name=f"{name} output {j}", reduction=reduction))
            if k.requires_grad:
                diff_outs.append(j)
        else:
            assert torch.equal(k.cpu(), r.cpu()), f"{name} output {j}: differs from the reference"
    if not grad_inputs or not diff_outs:
        return results
    gen = torch.Generator().manual_seed(grad_seed)
    ups = [torch.randn(rout[j].shape, generator=gen, dtype=torch.float64) for j in diff_outs]

    def grads(outs, ins, dtype, device):
        with poisoned_outputs():
            return torch.autograd.grad([outs[j] for j in diff_outs], [ins[i] for i in grad_inputs],
                                       [u.to(dtype=outs[j].dtype, device=device) for u, j in zip(ups, diff_outs)],
                                       allow_unused=True)

    with faces_run() as ran_backward:
        kg = grads(kout, kin, None, kout[diff_outs[0]].device)
    if face is not None:  # the cross-entropy family counts its backward in the forward pass
        assert_face_ran(ran + ran_backward, face[0], face[1], ("backward",), what=name)
    rg = grads(rout, rin, None, "cpu")
    lg = grads(lout, lin, None, lout[diff_outs[0]].device)
    # The gradients with respect to all checked inputs are one vector (as a model's parameter gradient
    # is): a gradient that is exactly zero in exact arithmetic (e.g. dq with one visible key) comes out
    # of cancelling terms the size of the others, so its floor is scaled by the largest of them.
    grad_magnitude = max((finite_magnitude(r) for r in rg if r is not None), default=0.0)
    for i, k, r, l in zip(grad_inputs, kg, rg, lg):
        if r is None:
            continue
        if k is None:
            raise AssertionError(f"{name}: no gradient for input {i}")
        results.append(assert_close(k, r, l, grad=True, name=f"{name} grad of input {i}", reduction=reduction,
                                    magnitude=grad_magnitude))
    return results


def _copy(x: torch.Tensor, same_strides: bool) -> torch.Tensor:
    """A copy of ``x``; with ``same_strides``, laid out exactly as ``x`` (a strided view stays
    strided; broadcast (0-stride) views are materialised, as no copy can share their elements)."""
    if not same_strides or x.is_contiguous() or 0 in x.stride():
        return x.clone()
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return y.copy_(x)


def cpu_faces(op: str) -> list[str]:
    """The faces of ``op`` that must run on CPU tensors here: "cpu" (unless it is C++ and the
    extension was not built, or is disabled) and "triton" when the Triton interpreter is on.
    Raises, with the reason, when one that should exist is unavailable (an extension that does not
    load, a Triton face that fails to import): a broken face fails the suite instead of silently
    shrinking its test matrix."""
    import importlib.util
    import os

    from mmfast import _extension, dispatch

    spec = dispatch._OPS[op]
    faces = []
    if spec.cpu_python or (_extension.build_info().get("built") and os.environ.get("MMFAST_DISABLE_EXTENSION") != "1"):
        faces.append("cpu")
    if spec.triton_module and dispatch.triton_interpreting() and importlib.util.find_spec("triton"):
        faces.append("triton")
    broken = {f: why for f in faces if (why := dispatch.availability(op, f, "cpu", torch.float32))}
    if broken:
        raise RuntimeError(f"mmfast.{op}: faces that should run here are unavailable: {broken}")
    return faces


def randn(*shape, dtype=torch.float32, device="cpu", seed: int | None = None, scale: float = 1.0) -> torch.Tensor:
    """Fresh random normal data (never zeros or constants), optionally seeded."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dtype=dtype, device=device)
