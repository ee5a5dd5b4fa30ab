"""Face provenance: which face of which op ran, per direction (read through
``mmfast.testing.faces_run()``).

Every custom-op body in ``mmfast/ops/*.py`` calls :func:`record` with the backend it runs, and
every op's torch-reference branch passes its result through :func:`reference_ran`. With no
recorder active both cost one global read (the ops' per-call overhead budget is a few µs).

Under ``torch.compile`` the custom-op bodies stay opaque and run at run time, so :func:`record`
counts them as in eager mode. The reference branch is traced instead, so a Python call there
would count once, at trace time. While compiling, :func:`reference_ran` therefore inserts two tiny
custom ops (forward and backward) that count when they *run*; it does so only while a recorder is
active, and since dynamo guards on the module global it reads (``_active``), code compiled outside
a recorder recompiles on entering one (and carries no counting ops otherwise).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

_active = False  # True while at least one recorder is open (the only thing the hot path reads)
_recorders: list[Counter] = []


def record(op: str, backend: str, direction: str) -> None:
    """Counts one run of face ``backend`` of ``op`` in ``direction``: "forward", "backward", or
    "forward+backward" for the faces that compute their gradient in the forward pass (the
    cross-entropy family)."""
    if _active:
        for d in direction.split("+"):
            for counts in _recorders:
                counts[(op, backend, d)] += 1


def push(counts: Counter) -> None:
    global _active
    _recorders.append(counts)
    _active = True


def pop(counts: Counter) -> None:
    global _active
    del _recorders[next(i for i, c in enumerate(_recorders) if c is counts)]  # by identity, not ==
    _active = bool(_recorders)


@torch.library.custom_op("mmfast::provenance_forward", mutates_args=())
def _mark_forward(x: Tensor, op: str) -> Tensor:
    record(op, "torch", "forward")
    return x.clone()  # a custom op may not return an alias of its input


@_mark_forward.register_fake
def _(x, op):
    return torch.empty_like(x)


@torch.library.custom_op("mmfast::provenance_backward", mutates_args=())
def _mark_backward(grad: Tensor, op: str) -> Tensor:
    record(op, "torch", "backward")
    return grad.clone()


@_mark_backward.register_fake
def _(grad, op):
    return torch.empty_like(grad)


def _setup(ctx, inputs, output):
    ctx.op = inputs[1]


def _backward(ctx, grad):
    return _mark_backward(grad, ctx.op), None


_mark_forward.register_autograd(_backward, setup_context=_setup)


class _CountBackward(torch.autograd.Function):
    """Eager: an alias of the output whose backward counts."""

    @staticmethod
    def forward(ctx, x, op):
        ctx.op = op
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        record(ctx.op, "torch", "backward")
        return grad, None


def _counted(out: Tensor, op: str) -> Tensor:
    if torch.compiler.is_compiling():
        return _mark_forward(out, op)  # counts when the compiled graph runs, not when it is traced
    record(op, "torch", "forward")
    return _CountBackward.apply(out, op) if out.requires_grad else out


def reference_ran(op: str, result):
    """Returns ``result`` (a tensor, or a tuple/list whose first item is the op's output) of the
    torch-reference face of ``op``; while a recorder is active its forward is counted, and its
    backward once gradients flow through that output."""
    if not _active:
        return result
    if isinstance(result, Tensor):
        return _counted(result, op)
    first, *rest = result
    return type(result)([_counted(first, op), *rest])
