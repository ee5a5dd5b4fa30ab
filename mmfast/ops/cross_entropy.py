"""Softmax cross-entropy family: public API, backend dispatch, custom-op, fake and autograd registrations.

Faces: reference ``mmfast/reference/cross_entropy.py``, Triton ``mmfast/triton/cross_entropy.py``,
CUDA ``csrc/cuda/cross_entropy.cu``, CPU ``csrc/cpu/cross_entropy.cpp``. Every non-reference face
implements the same kernel contract::

    cross_entropy_forward(logits (N, C), target (N,) int64, weight (C,) f32 | None, ignore_index,
                          label_smoothing, compute_grad, grad_scale f32 1-element/(N,) | None)
        -> (loss (N,) f32, grad (N, C) logits.dtype  [or (0,) when not compute_grad])

    cross_entropy_forward_inplace(logits (N, C) [overwritten by the gradient], target, weight,
                                  ignore_index, label_smoothing, grad_scale) -> loss (N,) f32

``logits`` needs unit stride along C only (any row stride); all offsets are int64. ``grad_scale``
multiplies each row's gradient inside the kernel (read on the device, never on the host): the
gradient comes out already scaled, with no separate pass to scale it. Ignored rows get loss 0
and a zero gradient. A target outside ``[0, C)`` that is not ``ignore_index`` is never
used as an index: the CPU face raises an error naming 'target'; the GPU faces write NaN for that
row and raise a device-side assert (no host synchronisation), so the loss is never finite and wrong.

Passes over the N x C data and memory, per mode of ``cross_entropy`` (R = one read, W = one write
of N x C elements; "scalar upstream" covers 1, a loss weight, an AMP loss scale, 1/accumulation):

    GPU faces (cuda, triton: the gradient is deferred)
      forward            R (loss only; the logits are saved, not copied; no N x C allocation).
      backward           R + W for any upstream (scalar or per row with reduction='none'): the
                         kernel writes the gradient times the upstream factor, read on the device
                         (no host sync). Extra memory: the N x C gradient, allocated here.
    CPU face (the gradient is computed in the forward, where a second sweep hits the cache)
      forward            R + W (the N x C gradient of a unit upstream is allocated and kept).
      backward           nothing for an upstream of 1.0 (read on the host, free there) with the
                         graph freed; otherwise R + W to scale it (in place; a copy under
                         retain_graph).
    inplace_backward     as the CPU face, but the gradient overwrites the logits (no N x C
    (opt-in, any face)   allocation; on a GPU the backward scales it unless the upstream is a CPU
                         tensor equal to 1.0).

The kernels keep a row on chip between their two sweeps when it fits (GPU: up to 32768 classes),
so "R" is one read of the logits. Double backward is refused with a clear error.

Host synchronisation: ``cross_entropy`` has none. ``linear_cross_entropy`` has one on the GPU (the
row compaction below needs the number of non-ignored rows); while a CUDA graph is being captured
it skips the compaction instead (all rows are computed; ignored rows just produce zeros).
``contrastive_loss`` has none.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmfast import _extension, _provenance, dispatch
from mmfast import reference as _ref
from mmfast.ops._eager_path import plain_eager

_REDUCTIONS = ("none", "mean", "sum")
# Dtypes each face of the cross-entropy kernels accepts (shared by every op built on them).
_CE_DTYPES = {
    "torch": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "cpu": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}

dispatch.register_op(dispatch.OpSpec(
    name="cross_entropy",
    cpp_kernel="cross_entropy_forward",
    triton_module="mmfast.triton.cross_entropy",
    dtypes=_CE_DTYPES,
    cpu_auto_buckets=dispatch.CPU_AUTO_BUT_REFERENCE_FASTER,  # see _bucket
    cpu_auto_why=("below N x C = 2^17 with N < 2^14 rows the fused call's fixed cost (~80 us forward + backward) "
                  "outweighs its kernel: forward + backward, 1 thread, 2-core AMD EPYC, 2026-11-30, the cpu face "
                  "measured 0.27-0.88x the reference's speed there ((16, 2) to (8192, 2), (64, 1000), (128, 1000), "
                  "(2, 30522)); past the bound 0.8x at (2048, 64), 1.1-1.4x at (16384, 2), (200, 1000), "
                  "(4096, 64), (8, 30522), 2.5x at (64, 30522)"),
))


def _bucket(logits: Tensor, C: int) -> str:
    """The call's size bucket; CPU_REFERENCE_FASTER for the CPU calls the reference runs faster (cpu_auto_why)."""
    work = logits.numel()
    if logits.device.type == "cpu" and work < (1 << 17) and work < (1 << 14) * max(C, 1):
        return dispatch.CPU_REFERENCE_FASTER
    return dispatch.size_bucket(work)


def _face_forward(backend: str):
    if backend in ("cpu", "cuda"):
        return _extension.op("cross_entropy_forward")
    return dispatch.triton_face("cross_entropy").cross_entropy_forward


def _face_inplace(backend: str):
    if backend in ("cpu", "cuda"):
        return _extension.op("cross_entropy_forward_inplace")
    return dispatch.triton_face("cross_entropy").cross_entropy_forward_inplace


def _reduction_denominator(target: Tensor, weight: Optional[Tensor], ignore_index: int, C: int) -> Tensor:
    """sum over non-ignored rows of weight[target] (or their count): torch's 'mean' divisor."""
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(torch.float32)
    # clamp keeps the gather in bounds; out-of-range targets are reported by the kernel itself
    return (weight.gather(0, target.clamp(0, max(C - 1, 0))) * valid).sum(dtype=torch.float32)


def _loss_dtype(x: Tensor) -> torch.dtype:
    """Faces return float32 losses (float64 for float64 inputs, which only the CPU face takes)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _reduce(rows: Tensor, reduction: str, denom: "Optional[Tensor | int]") -> Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / denom  # 0/0 = NaN when every target is ignored, as torch does


def _graph_freed() -> bool:
    """True inside a backward whose graph is freed afterwards (no retain_graph): the gradients
    saved by the forward are then never read again and may be scaled in place."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and not keep_graph()


def _scaled(grad: Tensor, up: Tensor) -> Tensor:
    """grad * up: in place on the saved gradient when the graph is freed after this backward (one
    N x C buffer at peak instead of two; no host sync needed), else a new tensor (retain_graph:
    the saved gradient must stay intact for the next backward)."""
    up = up.to(grad.dtype)
    if not torch.compiler.is_compiling() and type(grad) is Tensor and _graph_freed():
        return grad.mul_(up)
    return grad * up


def _unit_upstream(grad_loss: Tensor) -> bool:
    """True when a backward may hand out its saved gradient itself instead of a scaled copy: the
    upstream gradient is exactly 1 and checking costs nothing (an eager CPU scalar: never under
    tracing, where the value is unknown, nor on a GPU, where reading it is a host sync), and the
    graph is freed after this backward (no retain_graph). The receiver may then own the buffer
    (AccumulateGrad steals it as .grad and later adds into it): with retain_graph the saved
    gradient must stay intact for the next backward, so a copy is made then."""
    if not (type(grad_loss) is Tensor and grad_loss.device.type == "cpu" and grad_loss.numel() == 1
            and not torch.compiler.is_compiling()):
        return False
    return _graph_freed() and float(grad_loss) == 1.0


def _upstream_scale(grad_loss: Tensor, reduction: str, target: Tensor, weight: Optional[Tensor],
                    ignore_index: int, C: int) -> Tensor:
    """The factor each row's gradient is multiplied by, as a float32 device tensor of 1 or N elements
    (tiny device ops, never a host read): the upstream gradient, divided by torch's 'mean' divisor."""
    up = grad_loss.to(torch.float32)
    if reduction == "none":
        return up.reshape(-1).contiguous()
    if reduction == "mean":
        up = up / _reduction_denominator(target, weight, ignore_index, C)
    return up.reshape(1)


@torch.library.custom_op("mmfast::cross_entropy", mutates_args=())
def _cross_entropy_op(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                      label_smoothing: float, reduction: str, compute_grad: bool, backend: str
                      ) -> tuple[Tensor, Tensor]:
    """(loss reduced as asked, gradient of that loss w.r.t. logits for a unit upstream gradient, or
    (0,) when not compute_grad). compute_grad is the CPU face's mode (see _grad_in_forward); for
    the GPU faces it is False and the backward op writes the gradient."""
    return _ce_forward(logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad, backend)


def _ce_forward(logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad, backend):
    """The custom op's body, also run by the eager path (_EagerCrossEntropy)."""
    _provenance.record("cross_entropy", backend, "forward+backward" if compute_grad else "forward")
    C = logits.shape[1]
    denom = _reduction_denominator(target, weight, ignore_index, C) if reduction == "mean" else None
    grad_scale = (1.0 / denom).reshape(1) if (denom is not None and compute_grad) else None
    rows, grad = _face_forward(backend)(logits, target, weight, ignore_index, label_smoothing,
                                        compute_grad, grad_scale)
    return _reduce(rows, reduction, denom), grad


@_cross_entropy_op.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad, backend):
    N, C = logits.shape
    loss = logits.new_empty((N,) if reduction == "none" else (), dtype=_loss_dtype(logits))
    grad = logits.new_empty((N, C) if compute_grad else (0,))
    return loss, grad


def _grad_in_forward(backend: str) -> bool:
    """The CPU face computes the gradient in the forward (its second sweep reads the row from cache)
    and its backward reads the upstream gradient on the host for free: a unit upstream then costs
    no pass at all. The GPU faces defer it: reading the upstream there would be a host sync, so the
    backward kernel writes the gradient times the upstream instead (no extra pass for any upstream)."""
    return backend == "cpu"


@torch.library.custom_op("mmfast::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
                               ignore_index: int, label_smoothing: float, reduction: str, backend: str) -> Tensor:
    """d(loss)/d(logits) times the upstream gradient, written in one pass by the face kernel: the
    upstream factor (scalar or per row) goes in as the kernel's grad_scale, read on the device."""
    return _ce_deferred_backward(grad_loss, logits, target, weight, ignore_index, label_smoothing, reduction, backend)


def _ce_deferred_backward(grad_loss, logits, target, weight, ignore_index, label_smoothing, reduction, backend):
    """The backward op's body, also run by the eager path."""
    _provenance.record("cross_entropy", backend, "backward")
    scale = _upstream_scale(grad_loss, reduction, target, weight, ignore_index, logits.shape[1])
    _, grad = _face_forward(backend)(logits, target, weight, ignore_index, label_smoothing, True, scale)
    return grad


@_cross_entropy_backward_op.register_fake
def _(grad_loss, logits, target, weight, ignore_index, label_smoothing, reduction, backend):
    return torch.empty_like(logits)


def _ce_setup_context(ctx, inputs, output):
    # The gradient output is never differentiated: without this autograd would materialise
    # zeros the size of it as its incoming gradient (a full extra pass).
    ctx.set_materialize_grads(False)
    logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad, backend = inputs
    ctx.args = (ignore_index, label_smoothing, reduction, backend)
    ctx.deferred = not compute_grad
    # The logits themselves (no copy; every face, so the rules are the same): an in-place change
    # to them before backward is reported by autograd's version counter.
    ctx.save_for_backward(logits, target, weight, None if ctx.deferred else output[1])


def _ce_backward(ctx, grad_loss, _grad_of_grad, deferred_backward=None):
    if grad_loss is None:  # only the (non-differentiable) gradient output was used
        return None, None, None, None, None, None, None, None
    logits, target, weight, grad = ctx.saved_tensors
    if ctx.deferred and deferred_backward is None:  # the custom backward op refuses double backward itself
        return _cross_entropy_backward_op(grad_loss, logits, target, weight, *ctx.args), *(None,) * 7
    if ctx.deferred:
        dlogits = deferred_backward(grad_loss, logits, target, weight, *ctx.args)
    else:
        if ctx.args[2] == "none":
            dlogits = _scaled(grad, grad_loss[:, None])
        elif _unit_upstream(grad_loss):
            # loss.backward() on the CPU: the saved gradient already is the answer. Returning it
            # saves a full read+write pass over N x C (see _unit_upstream for why this is safe).
            dlogits = grad
        else:
            dlogits = _scaled(grad, grad_loss)
    if torch.is_grad_enabled():  # create_graph=True: no silently missing second derivative
        dlogits = _NoDoubleBackward.apply(dlogits, logits)
    return dlogits, None, None, None, None, None, None, None


_cross_entropy_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


def _eager_function(name: str, forward_body, setup_context, backward):
    """An autograd.Function running a custom op's body, setup and backward without the custom-op
    dispatch (see mmfast/ops/_eager_path.py). Outputs after the first (gradients computed in the
    forward) are not differentiable, as in the custom ops."""

    def forward(ctx, *inputs):
        out = forward_body(*inputs)
        ctx.mark_non_differentiable(*out[1:])
        setup_context(ctx, inputs, out)
        return out

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})


def _eager_body(body, grad_loss):
    """The backward body to call directly, or None (use the custom backward op) when a mode is
    watching the backward (dispatch, functorch): it then sees the op, as without the fast path."""
    return body if plain_eager(grad_loss) else None


_EagerCrossEntropy = _eager_function(
    "_EagerCrossEntropy", _ce_forward, _ce_setup_context,
    lambda ctx, grad_loss, gg: _ce_backward(ctx, grad_loss, gg, _eager_body(_ce_deferred_backward, grad_loss)))


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError("mmfast.cross_entropy: double backward (create_graph=True through the loss) is not "
                       "supported; use backend='torch' for second derivatives")


_cross_entropy_backward_op.register_autograd(_refuse_double_backward, setup_context=lambda ctx, inputs, output: None)


class _NoDoubleBackward(torch.autograd.Function):
    """grad (identity), tied to the logits by a backward that refuses: a second derivative through
    the CPU face's saved gradient is an error instead of silently missing."""

    @staticmethod
    def forward(ctx, grad, logits):
        return grad.view_as(grad)

    backward = staticmethod(_refuse_double_backward)


# ---- inplace_backward=True: the gradient overwrites the logits buffer ----------------------------
@torch.library.custom_op("mmfast::cross_entropy_inplace", mutates_args=("logits",))
def _cross_entropy_inplace_op(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                              label_smoothing: float, reduction: str, backend: str) -> Tensor:
    """Loss reduced as asked; ``logits`` becomes d(loss)/d(logits) for a unit upstream gradient.
    Declared as mutating ``logits``, so the dispatcher bumps its version counter."""
    _provenance.record("cross_entropy", backend, "forward+backward")
    C = logits.shape[1]
    denom = _reduction_denominator(target, weight, ignore_index, C) if reduction == "mean" else None
    grad_scale = (1.0 / denom).reshape(1) if denom is not None else None
    rows = _face_inplace(backend)(logits, target, weight, ignore_index, label_smoothing, grad_scale)
    return _reduce(rows, reduction, denom)


@_cross_entropy_inplace_op.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, reduction, backend):
    return logits.new_empty((logits.shape[0],) if reduction == "none" else (), dtype=_loss_dtype(logits))


class _CrossEntropyInplace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, label_smoothing, reduction, backend):
        loss = _cross_entropy_inplace_op(logits, target, weight, ignore_index, label_smoothing, reduction, backend)
        ctx.mark_dirty(logits)
        ctx.set_materialize_grads(False)  # no zero-filled N x C gradient for the overwritten logits
        ctx.save_for_backward(logits)  # now the gradient; a later in-place write to it is caught
        ctx.reduction = reduction
        return loss, logits

    @staticmethod
    def backward(ctx, grad_loss, _grad_overwritten_logits):
        if grad_loss is None:
            return None, None, None, None, None, None, None
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad = _scaled(grad, grad_loss[:, None])
        elif not _unit_upstream(grad_loss):
            grad = _scaled(grad, grad_loss)
        return grad, None, None, None, None, None, None


def _check_args(logits: Tensor, target: Tensor, weight, ignore_index, label_smoothing, reduction) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"mmfast.cross_entropy: argument 'logits' must be a floating-point tensor, got "
                        f"{getattr(logits, 'dtype', type(logits))}")
    if not isinstance(target, Tensor) or target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"mmfast.cross_entropy: argument 'target' must hold integer class indices, got "
                        f"{getattr(target, 'dtype', type(target))} (probability targets: use backend='torch')")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"mmfast.cross_entropy: argument 'reduction' must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"mmfast.cross_entropy: argument 'label_smoothing' must be in [0, 1], got {label_smoothing}")
    if logits.dim() == 0:
        raise ValueError("mmfast.cross_entropy: argument 'logits' must have at least 1 dimension (classes)")
    expected = (logits.shape[0],) + tuple(logits.shape[2:]) if logits.dim() >= 2 else ()
    if tuple(target.shape) != expected:
        raise ValueError(f"mmfast.cross_entropy: argument 'target' must have shape {expected} for logits of "
                         f"shape {tuple(logits.shape)}, got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"mmfast.cross_entropy: argument 'target' is on {target.device}, logits on {logits.device}")
    C = logits.shape[1] if logits.dim() >= 2 else logits.shape[0]
    if weight is not None:
        if weight.shape != (C,):
            raise ValueError(f"mmfast.cross_entropy: argument 'weight' must have shape ({C},), got {tuple(weight.shape)}")
        if weight.device != logits.device:
            raise ValueError(f"mmfast.cross_entropy: argument 'weight' is on {weight.device}, logits on {logits.device}")


def cross_entropy(logits: Tensor, target: Tensor, *, weight: Optional[Tensor] = None, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean", backend: str = "auto",
                  inplace_backward: bool = False) -> Tensor:
    """``torch.nn.functional.cross_entropy`` for class-index targets, fused.

    logits ``(N, C)``, ``(C,)`` or ``(N, C, d1, ...)``; float32/float16/bfloat16 with float32
    accumulation; the gradient w.r.t. logits comes in the logits' dtype. On a GPU the forward
    reads the logits once and saves them (no copy; changing them in place before ``backward()``
    is reported by autograd) and the backward writes the gradient in one pass, already multiplied
    by the upstream gradient, whatever it is; the CPU face computes it in the forward (passes and
    memory per mode: module docstring). Targets outside ``[0, C)`` that are not ``ignore_index``
    raise an error naming 'target' (on GPU: a device-side assert).

    ``inplace_backward=True`` (opt-in) writes the gradient into the logits buffer instead of a new
    N x C tensor: after the call ``logits`` holds the gradient, not the logits. This saves one
    N x C allocation but is only safe when nothing else needs those logit values. The op is
    declared as mutating ``logits``, so autograd's version counter catches misuse: if an earlier
    op saved ``logits`` for its own backward (e.g. ``logits = torch.tanh(z)``), or ``logits`` is
    modified in place afterwards, ``backward()`` raises "modified by an inplace operation" instead
    of silently using corrupted values (the bug Liger-Kernel #272 describes). ``logits`` must not be
    a leaf that requires grad; reading it after the call gives the gradient; backward twice with
    ``retain_graph=True`` works only while the upstream gradient is 1.
    """
    _check_args(logits, target, weight, ignore_index, label_smoothing, reduction)
    be = dispatch.resolve("cross_entropy", backend, logits.device.type, logits.dtype,
                          bucket=_bucket(logits, logits.shape[1] if logits.dim() >= 2 else logits.shape[0]))
    if be == "torch":
        return _provenance.reference_ran("cross_entropy", _ref.cross_entropy(
            logits, target, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
            reduction=reduction))
    out_shape = target.shape
    if logits.dim() == 1:  # a single sample: (C,) with a 0-d target
        logits2d, target1d = logits.unsqueeze(0), target.reshape(1)
    elif logits.dim() == 2:
        logits2d, target1d = logits, target
    else:  # (N, C, d1, ...): classes last, one row per position
        C = logits.shape[1]
        logits2d, target1d = logits.movedim(1, -1).reshape(-1, C), target.reshape(-1)
    if logits2d.shape[1] > 1 and logits2d.stride(1) != 1:
        logits2d = logits2d.contiguous()
    w = None if weight is None else weight.to(torch.float32)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    if inplace_backward and compute_grad:
        if logits2d.is_leaf:
            raise ValueError("mmfast.cross_entropy: inplace_backward=True overwrites argument 'logits', which is a "
                             "leaf tensor requiring grad; pass the output of the layer that produced the logits")
        loss, _ = _CrossEntropyInplace.apply(logits2d, target1d.to(torch.int64), w, int(ignore_index),
                                             float(label_smoothing), reduction, be)
    else:
        args = (logits2d, target1d.to(torch.int64), w, int(ignore_index), float(label_smoothing), reduction,
                compute_grad and _grad_in_forward(be), be)
        loss, _ = _EagerCrossEntropy.apply(*args) if plain_eager(logits2d, w) else _cross_entropy_op(*args)
    if reduction == "none":
        loss = loss.reshape(out_shape)
    return loss.to(logits.dtype)


# =============================================================================================
# linear_cross_entropy: cross_entropy(hidden @ weight.T + bias, target) without the N x V logits
dispatch.register_op(dispatch.OpSpec(
    name="linear_cross_entropy",
    cpp_kernel="cross_entropy_forward_inplace",
    triton_module="mmfast.triton.cross_entropy",
    dtypes=_CE_DTYPES,
))


def _chunk_rows(V: int, device: torch.device) -> int:
    """Rows per chunk: the chunk's logits stay around 2^24 (CPU) / 2^25 (GPU) elements. On the CPU a
    chunk's GEMM reads all of W (47 MB at V = 30522, H = 384) and with few rows is bound by that
    read (MKL, 2 threads: 137 rows 103 GFLOP/s, 512 rows 122): at 2^22 a captioning batch of ~300
    rows took three chunks and lost to the eager twin's single full-logits GEMM."""
    budget = 1 << (25 if device.type == "cuda" else 24)
    return max(1, budget // max(V, 1))


def _valid_rows(target: Tensor, ignore_index: int) -> tuple[Optional[Tensor], Optional[int]]:
    """(indices of the rows whose target is not ``ignore_index``, or None when that is every row;
    their count, or None while a CUDA graph is captured). The count is the one host read (a sync on
    a GPU); during capture nothing is compacted (ignored rows just produce zeros)."""
    if target.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None, None
    rows = (target != ignore_index).nonzero().squeeze(1)
    n = rows.numel()
    return (None if n == target.numel() else rows), n


def _lce_chunks(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ignore_index: int,
                label_smoothing: float, grad_scale: Optional[Tensor], compute_grad: bool, backend: str,
                rows: Optional[Tensor], n: Optional[int]):
    """Per-row losses (N,) f32 and, when compute_grad, (dh, dW, db) for d(sum_i scale_i * loss_i).

    Only rows whose target is not ``ignore_index`` are computed (``rows``, ``n``: _valid_rows),
    ``chunk`` rows at a time: the chunk logits h_c @ W.T (+ b) are overwritten by their gradient
    by the CE face kernel (in place), then dh_c = G_c @ W, dW += G_c.T @ h_c and db += sum(G_c)
    (float32 across chunks). When one chunk holds every row (a small batch) and at most half of them
    are ignored, all rows go through one GEMM and the results are the kernel's and the GEMMs'
    outputs themselves (the kernel gives an ignored row loss 0 and gradient 0): no zero-filled
    buffers, gathers or scatters, which cost more than the GEMM rows they would save there (a
    captioning batch has a few padded rows; an MLM batch ~85 %, compacted)."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    empty = lambda: hidden.new_empty((0,))  # noqa: E731  (separate tensors: outputs may not alias)
    if n is None:  # capturing: every row
        n = N
    step = _chunk_rows(V, dev)
    nchunks = -(-n // step) if n else 0
    kernel, forward = _face_inplace(backend), _face_forward(backend)
    if n and N <= step and (rows is None or 2 * n >= N):
        logits = torch.addmm(bias, hidden, weight.t()) if bias is not None else hidden @ weight.t()
        if not compute_grad:
            loss = forward(logits, target, None, ignore_index, label_smoothing, False, None)[0]
            return loss, empty(), empty(), empty()
        loss = kernel(logits, target, None, ignore_index, label_smoothing, grad_scale)
        db = logits.sum(0, dtype=torch.float32).to(bias.dtype) if bias is not None else empty()
        return loss, logits @ weight, logits.t() @ hidden, db
    loss = torch.zeros(N, dtype=_loss_dtype(hidden), device=dev)
    dh = torch.zeros_like(hidden) if compute_grad else empty()
    dW = torch.zeros_like(weight) if compute_grad else empty()
    db = torch.zeros_like(bias) if (compute_grad and bias is not None) else empty()
    if nchunks == 0:
        return loss, dh, dW, db
    step = -(-n // nchunks)  # equal chunks: no small last GEMM that rereads all of W for a few rows
    per_row_scale = grad_scale is not None and grad_scale.numel() > 1
    fp32_acc = compute_grad and nchunks > 1 and weight.dtype != torch.float32 and weight.dtype != torch.float64
    dW_acc = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if fp32_acc else dW
    db_acc = torch.zeros(V, dtype=torch.float32, device=dev) if (compute_grad and bias is not None) else None
    for s in range(0, n, step):
        idx = rows[s:s + step] if rows is not None else torch.arange(s, min(s + step, N), device=dev)
        h_c = hidden.index_select(0, idx)
        t_c = target.index_select(0, idx)
        logits_c = torch.addmm(bias, h_c, weight.t()) if bias is not None else h_c @ weight.t()
        gs = grad_scale.index_select(0, idx) if per_row_scale else grad_scale
        if not compute_grad:
            loss.index_copy_(0, idx, forward(logits_c, t_c, None, ignore_index, label_smoothing, False, None)[0])
            continue
        loss.index_copy_(0, idx, kernel(logits_c, t_c, None, ignore_index, label_smoothing, gs))
        g_c = logits_c  # now d(loss)/d(logits) of the chunk, scaled
        dh.index_copy_(0, idx, g_c @ weight)
        if fp32_acc:
            dW_acc += (g_c.t() @ h_c).float()
        else:
            dW_acc.addmm_(g_c.t(), h_c)
        if db_acc is not None:
            db_acc += g_c.sum(0, dtype=torch.float32)
    if compute_grad:
        if fp32_acc:
            dW.copy_(dW_acc)
        if db_acc is not None:
            db.copy_(db_acc)
    return loss, dh, dW, db


@torch.library.custom_op("mmfast::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                             ignore_index: int, label_smoothing: float, reduction: str, compute_grad: bool,
                             backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss reduced as asked, dh, dW, db) for a unit upstream gradient. With reduction='none' the
    gradients are not computed here (they depend on the upstream gradient): see the backward op."""
    return _lce_forward(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, compute_grad, backend)


def _lce_forward(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, compute_grad, backend):
    """The custom op's body, also run by the eager path (_EagerLinearCrossEntropy)."""
    _provenance.record("linear_cross_entropy", backend,
                       "forward+backward" if compute_grad and reduction != "none" else "forward")
    rows, n = _valid_rows(target, ignore_index)
    denom = grad_scale = None
    if reduction == "mean":
        if n is None:  # capturing a CUDA graph: the count stays on the device
            denom = (target != ignore_index).sum().to(torch.float32)
            grad_scale = (1.0 / denom).reshape(1)
        else:  # a host number: no device ops for the divisor
            denom = n
            grad_scale = torch.full((1,), 1.0 / n, dtype=torch.float32, device=hidden.device) if n else None
    compute_grad = compute_grad and reduction != "none"
    losses, dh, dW, db = _lce_chunks(hidden, weight, target, bias, ignore_index, label_smoothing,
                                     grad_scale, compute_grad, backend, rows, n)
    return _reduce(losses, reduction, denom), dh, dW, db


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, compute_grad, backend):
    N = hidden.shape[0]
    grads = compute_grad and reduction != "none"
    loss = hidden.new_empty((N,) if reduction == "none" else (), dtype=_loss_dtype(hidden))
    dh = torch.empty_like(hidden) if grads else hidden.new_empty((0,))
    dW = torch.empty_like(weight) if grads else weight.new_empty((0,))
    db = torch.empty_like(bias) if (grads and bias is not None) else weight.new_empty((0,))
    return loss, dh, dW, db


@torch.library.custom_op("mmfast::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                                      grad_rows: Tensor, ignore_index: int, label_smoothing: float,
                                      backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_i grad_rows[i] * loss_i (reduction='none'): recomputes the chunks."""
    return _lce_rows_backward(hidden, weight, target, bias, grad_rows, ignore_index, label_smoothing, backend)


def _lce_rows_backward(hidden, weight, target, bias, grad_rows, ignore_index, label_smoothing, backend):
    """The backward op's body, also run by the eager path."""
    _provenance.record("linear_cross_entropy", backend, "backward")
    _, dh, dW, db = _lce_chunks(hidden, weight, target, bias, ignore_index, label_smoothing,
                                grad_rows.to(torch.float32).contiguous(), True, backend,
                                *_valid_rows(target, ignore_index))
    return dh, dW, db


@_linear_cross_entropy_backward_op.register_fake
def _(hidden, weight, target, bias, grad_rows, ignore_index, label_smoothing, backend):
    db = torch.empty_like(bias) if bias is not None else weight.new_empty((0,))
    return torch.empty_like(hidden), torch.empty_like(weight), db


def _lce_setup_context(ctx, inputs, output):
    # The gradient outputs are never differentiated: without this autograd would materialise
    # zeros the size of each of them as their incoming gradient (a full extra pass).
    ctx.set_materialize_grads(False)
    hidden, weight, target, bias, ignore_index, label_smoothing, reduction, compute_grad, backend = inputs
    ctx.reduction, ctx.has_bias = reduction, bias is not None
    if reduction == "none":
        ctx.args = (ignore_index, label_smoothing, backend)
        ctx.save_for_backward(hidden, weight, target, bias)
    else:
        ctx.save_for_backward(*output[1:])


def _lce_backward(ctx, grad_loss, _g1, _g2, _g3, rows_backward=None):
    if grad_loss is None:
        return None, None, None, None, None, None, None, None, None
    if ctx.reduction == "none":
        hidden, weight, target, bias = ctx.saved_tensors
        dh, dW, db = (rows_backward or _linear_cross_entropy_backward_op)(hidden, weight, target, bias, grad_loss,
                                                                          *ctx.args)
    else:
        dh, dW, db = ctx.saved_tensors
        if not _unit_upstream(grad_loss):
            dh, dW, db = (_scaled(g, grad_loss) for g in (dh, dW, db))
    return dh, dW, None, (db if ctx.has_bias else None), None, None, None, None, None


_linear_cross_entropy_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)


_EagerLinearCrossEntropy = _eager_function(
    "_EagerLinearCrossEntropy", _lce_forward, _lce_setup_context,
    lambda ctx, grad_loss, *g: _lce_backward(ctx, grad_loss, *g, _eager_body(_lce_rows_backward, grad_loss)))


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                         ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                         backend: str = "auto") -> Tensor:
    """``cross_entropy(hidden @ weight.T + bias, target)`` without materialising all N x V logits.

    hidden ``(..., H)``, weight ``(V, H)``, bias ``(V,)``, target ``hidden.shape[:-1]``. Only rows whose
    target is not ``ignore_index`` are computed (an MLM batch has ~15 % of them), in chunks of about
    2^22 (CPU) / 2^25 (GPU) logits; the gradients for hidden, weight and bias are computed in the
    forward pass (dW and db accumulated in float32 across chunks). On the GPU, selecting the rows
    costs one host synchronisation (skipped while a CUDA graph is captured).
    """
    if not isinstance(hidden, Tensor) or not hidden.is_floating_point():
        raise TypeError("mmfast.linear_cross_entropy: argument 'hidden' must be a floating-point tensor")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"mmfast.linear_cross_entropy: argument 'weight' must have shape (V, {hidden.shape[-1]}), "
                         f"got {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"mmfast.linear_cross_entropy: arguments 'weight'/'bias' must have the dtype of 'hidden' "
                        f"({hidden.dtype}), got {weight.dtype}/{None if bias is None else bias.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"mmfast.linear_cross_entropy: argument 'bias' must have shape ({weight.shape[0]},), "
                         f"got {tuple(bias.shape)}")
    if not isinstance(target, Tensor) or target.is_floating_point() or tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"mmfast.linear_cross_entropy: argument 'target' must hold class indices of shape "
                         f"{tuple(hidden.shape[:-1])}, got {getattr(target, 'dtype', None)} "
                         f"{tuple(getattr(target, 'shape', ()))}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"mmfast.linear_cross_entropy: argument 'reduction' must be one of {_REDUCTIONS}, "
                         f"got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"mmfast.linear_cross_entropy: argument 'label_smoothing' must be in [0, 1], "
                         f"got {label_smoothing}")
    be = dispatch.resolve("linear_cross_entropy", backend, hidden.device.type, hidden.dtype,
                          bucket=dispatch.size_bucket(target.numel() * weight.shape[0]))
    if be == "torch":
        return _provenance.reference_ran("linear_cross_entropy", _ref.linear_cross_entropy(
            hidden, weight, target, bias, ignore_index=ignore_index, label_smoothing=label_smoothing,
            reduction=reduction))
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = target.reshape(-1).to(torch.int64)
    compute_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                                or (bias is not None and bias.requires_grad))
    args = (h2, weight, t1, bias, int(ignore_index), float(label_smoothing), reduction, compute_grad, be)
    op = _EagerLinearCrossEntropy.apply if plain_eager(h2, weight, bias) else _linear_cross_entropy_op
    loss = op(*args)[0]
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss.to(hidden.dtype)


# =============================================================================================
# contrastive_loss: CLIP's symmetric cross-entropy over one batch x batch logit matrix
dispatch.register_op(dispatch.OpSpec(
    name="contrastive_loss",
    triton_module="mmfast.triton.cross_entropy",
    cpu_python=True,
    dtypes=_CE_DTYPES,  # no cpp_kernel: the "cuda" entry never applies
    # its size_bucket is of N * N: "large" from N = 8192 on, where the cpu face tiles the logits
    cpu_auto_buckets=("large",),
    cpu_auto_why=("the cpu face (torch ops over one logits tile) measured 0.37-0.69x the reference's speed for "
                  "N = 8 to 4096 on the 2-core AMD EPYC (2026-11-30); from N = 8192 on it tiles the N x N logits "
                  "(memory) and auto takes it"),
))

_CONTRASTIVE_TILE_FROM = 8192  # from this batch size on, logits are built TILE rows at a time
_CONTRASTIVE_TILE = 2048


def _contrastive_impl(img: Tensor, txt: Tensor, scale: Tensor, label_smoothing: float, compute_grad: bool,
                      backend: str):
    """loss, d_img, d_txt, d_scale. Row-block tiles L_r = s * img_r @ txt.T (float32) give, in one
    sweep, the row log-sum-exp (image->text) and running column max/sum-exp (text->image). The
    gradient sweep rebuilds each tile (or reuses the only one when N < 8192) and turns it into
    dL = (softmax_row + softmax_col - 2 * smoothed one-hot) / (2N), from which d_img = s dL @ txt,
    d_txt += s dL.T @ img, d_scale += sum(dL * S)."""
    N = img.shape[0]
    dev = img.device
    eps = float(label_smoothing)
    s = scale.reshape(()).to(torch.float32)
    f32 = img.dtype != torch.float64
    acc = torch.float32 if f32 else torch.float64
    tile = N if N < _CONTRASTIVE_TILE_FROM else _CONTRASTIVE_TILE
    zero_loss = torch.zeros((), dtype=_loss_dtype(img), device=dev)
    if N == 0:
        empty = (torch.zeros_like(img), torch.zeros_like(txt), torch.zeros_like(scale)) if compute_grad else \
            (img.new_empty((0,)), txt.new_empty((0,)), scale.new_empty((0,)))
        return zero_loss / zero_loss, *empty

    def sim(i0, i1):
        return (img[i0:i1] @ txt.t()).to(acc)

    lse_r = torch.empty(N, dtype=acc, device=dev)
    diag = torch.empty(N, dtype=acc, device=dev)
    rowsum = torch.empty(N, dtype=acc, device=dev)
    col_m = torch.full((N,), float("-inf"), dtype=acc, device=dev)
    col_s = torch.zeros(N, dtype=acc, device=dev)
    colsum = torch.zeros(N, dtype=acc, device=dev)
    kept = None
    for i0 in range(0, N, tile):
        i1 = min(i0 + tile, N)
        S = sim(i0, i1)
        L = S * s.to(acc)
        lse_r[i0:i1] = torch.logsumexp(L, 1)
        diag[i0:i1] = L.diagonal(offset=i0)
        rowsum[i0:i1] = L.sum(1)
        colsum += L.sum(0)
        if tile == N:  # one tile: the column log-sum-exp directly
            kept = (S, L)
            lse_c = torch.logsumexp(L, 0)
            break
        m_new = torch.maximum(col_m, L.max(0).values)
        m_safe = torch.where(torch.isinf(m_new) & (m_new < 0), torch.zeros_like(m_new), m_new)
        col_s = col_s * torch.exp(col_m - m_safe) + torch.exp(L - m_safe).sum(0)
        col_m = m_new
    if kept is None:  # merged online across row tiles
        lse_c = col_m + torch.log(col_s)
    # (lse - L_ii) + eps * (L_ii - mean_j L_ij): exact 0 where torch's is (N = 1), no cancellation
    loss_r = (lse_r - diag) + eps * (diag - rowsum / N)
    loss_c = (lse_c - diag) + eps * (diag - colsum / N)
    loss = ((loss_r.sum() + loss_c.sum()) / (2 * N)).to(_loss_dtype(img))
    if not compute_grad:
        return loss, img.new_empty((0,)), txt.new_empty((0,)), scale.new_empty((0,))

    d_img = torch.empty_like(img)
    d_txt = torch.zeros(txt.shape, dtype=acc, device=dev)
    d_s = torch.zeros((), dtype=acc, device=dev)
    grad_tile = _contrastive_grad_tile(backend)
    for i0 in range(0, N, tile):
        i1 = min(i0 + tile, N)
        if kept is not None:
            S, L = kept
        else:
            S = sim(i0, i1)
            L = S * s.to(acc)
        dL = grad_tile(L, lse_r[i0:i1], lse_c, i0, eps, N)  # overwrites L
        d_s += torch.dot(dL.reshape(-1), S.reshape(-1))  # sum(dL * S) without an N x N temporary
        dL_lp = dL.to(img.dtype)
        d_img[i0:i1] = (dL_lp @ txt) * s.to(img.dtype)
        d_txt += (dL_lp.t() @ img[i0:i1]).to(acc)
    return loss, d_img, (d_txt * s.to(acc)).to(txt.dtype), d_s.reshape(scale.shape).to(scale.dtype)


def _contrastive_grad_torch(L: Tensor, lse_r: Tensor, lse_c: Tensor, i0: int, eps: float, N: int) -> Tensor:
    p = torch.exp(L - lse_r[:, None])
    p += torch.exp(L - lse_c[None, :])
    p -= 2 * eps / N
    p.diagonal(offset=i0).sub_(2 * (1 - eps))
    return p.div_(2 * N)


def _contrastive_grad_tile(backend: str):
    if backend == "triton":
        return dispatch.triton_face("contrastive_loss").contrastive_grad_tile
    return _contrastive_grad_torch


@torch.library.custom_op("mmfast::contrastive_loss", mutates_args=())
def _contrastive_op(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, label_smoothing: float,
                    compute_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _contrastive_forward(image_features, text_features, logit_scale, label_smoothing, compute_grad, backend)


def _contrastive_forward(image_features, text_features, logit_scale, label_smoothing, compute_grad, backend):
    """The custom op's body, also run by the eager path (_EagerContrastive)."""
    _provenance.record("contrastive_loss", backend, "forward+backward" if compute_grad else "forward")
    return _contrastive_impl(image_features, text_features, logit_scale, label_smoothing, compute_grad, backend)


@_contrastive_op.register_fake
def _(image_features, text_features, logit_scale, label_smoothing, compute_grad, backend):
    loss = image_features.new_empty((), dtype=_loss_dtype(image_features))
    if compute_grad:
        return loss, torch.empty_like(image_features), torch.empty_like(text_features), torch.empty_like(logit_scale)
    return loss, image_features.new_empty((0,)), text_features.new_empty((0,)), logit_scale.new_empty((0,))


def _contrastive_setup_context(ctx, inputs, output):
    # The gradient outputs are never differentiated: without this autograd would materialise
    # zeros the size of each of them as their incoming gradient (a full extra pass).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output[1:])


def _contrastive_backward(ctx, grad_loss, _g1, _g2, _g3):
    if grad_loss is None:
        return None, None, None, None, None, None
    grads = ctx.saved_tensors
    if not _unit_upstream(grad_loss):
        grads = tuple(_scaled(g, grad_loss) for g in grads)
    return grads[0], grads[1], grads[2], None, None, None


_contrastive_op.register_autograd(_contrastive_backward, setup_context=_contrastive_setup_context)


_EagerContrastive = _eager_function("_EagerContrastive", _contrastive_forward, _contrastive_setup_context,
                                    _contrastive_backward)


def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, *,
                     label_smoothing: float = 0.0, gather: bool = False, backend: str = "auto") -> Tensor:
    """CLIP's symmetric loss ``(CE(s I T^T, arange) + CE(s T I^T, arange)) / 2`` over one logit matrix.

    Features ``(N, D)`` (already normalised by the caller), ``logit_scale`` a scalar tensor (usually
    ``logit_scale.exp()``). Both directions come from the same logits tile; gradients for both
    feature matrices and the scale are computed in the forward pass. From N = 8192 on the N x N
    logits are never held whole: 2048-row tiles are built twice (statistics sweep, gradient sweep).
    The matmuls are torch's; the "triton" face fuses the gradient of each tile into one kernel.

    ``gather=True`` (torch.distributed initialised): the loss over the global batch of all processes,
    each computing its own rows against all gathered columns (mmfast/ops/contrastive_gather.py).
    """
    for name, f in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(f, Tensor) or not f.is_floating_point() or f.dim() != 2:
            raise ValueError(f"mmfast.contrastive_loss: argument '{name}' must be a 2-D floating-point tensor")
    if image_features.shape != text_features.shape or image_features.dtype != text_features.dtype:
        raise ValueError(f"mmfast.contrastive_loss: arguments 'image_features' and 'text_features' must have the "
                         f"same shape and dtype, got {tuple(image_features.shape)} {image_features.dtype} and "
                         f"{tuple(text_features.shape)} {text_features.dtype}")
    if not isinstance(logit_scale, Tensor):
        logit_scale = torch.tensor(float(logit_scale), device=image_features.device)
    if logit_scale.numel() != 1:
        raise ValueError(f"mmfast.contrastive_loss: argument 'logit_scale' must be a scalar tensor, got shape "
                         f"{tuple(logit_scale.shape)}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"mmfast.contrastive_loss: argument 'label_smoothing' must be in [0, 1], got {label_smoothing}")
    if gather:
        from mmfast.ops.contrastive_gather import gathered_contrastive_loss  # imports this module
        return gathered_contrastive_loss(image_features, text_features, logit_scale,
                                         label_smoothing=label_smoothing, backend=backend)
    be = dispatch.resolve("contrastive_loss", backend, image_features.device.type, image_features.dtype,
                          bucket=dispatch.size_bucket(image_features.shape[0] ** 2))
    if be == "torch":
        return _provenance.reference_ran("contrastive_loss", _ref.contrastive_loss(
            image_features, text_features, logit_scale, label_smoothing=label_smoothing))
    compute_grad = torch.is_grad_enabled() and (image_features.requires_grad or text_features.requires_grad
                                                or logit_scale.requires_grad)
    args = (image_features, text_features, logit_scale, float(label_smoothing), compute_grad, be)
    op = _EagerContrastive.apply if plain_eager(image_features, text_features, logit_scale) else _contrastive_op
    loss = op(*args)[0]
    return loss.to(image_features.dtype)
