"""Softmax cross-entropy: public API, backend dispatch, custom-op, fake and autograd registrations.

Faces: reference ``mmfast/reference/cross_entropy.py``, Triton ``mmfast/triton/cross_entropy.py``,
CUDA ``csrc/cuda/cross_entropy.cu``, CPU ``csrc/cpu/cross_entropy.cpp``. Every non-reference face
implements the same kernel contract::

    cross_entropy_forward(logits (N, C), target (N,) int64, weight (C,) f32 | None, ignore_index,
                          label_smoothing, compute_grad, grad_scale f32 0-d/(N,) | None)
        -> (loss (N,) f32, grad (N, C) logits.dtype  [or (0,) when not compute_grad])

The gradient is produced in the forward pass (no saved softmax); backward only scales it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmfast import _extension, dispatch
from mmfast import reference as _ref

_REDUCTIONS = ("none", "mean", "sum")

dispatch.register_op(dispatch.OpSpec(
    name="cross_entropy",
    cpp_kernel="cross_entropy_forward",
    triton_module="mmfast.triton.cross_entropy",
    dtypes={
        "torch": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
        "cpu": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
        "cuda": (torch.float32, torch.float16, torch.bfloat16),
        "triton": (torch.float32, torch.float16, torch.bfloat16),
    },
))


def _face_forward(backend: str):
    if backend in ("cpu", "cuda"):
        return _extension.op("cross_entropy_forward")
    return dispatch.triton_face("cross_entropy").cross_entropy_forward


def _reduction_denominator(target: Tensor, weight: Optional[Tensor], ignore_index: int, C: int) -> Tensor:
    """sum over non-ignored rows of weight[target] (or their count): torch's 'mean' divisor."""
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(torch.float32)
    # clamp keeps the gather in bounds; out-of-range targets are reported by the kernel itself
    return (weight.gather(0, target.clamp(0, max(C - 1, 0))) * valid).sum(dtype=torch.float32)


@torch.library.custom_op("mmfast::cross_entropy", mutates_args=())
def _cross_entropy_op(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                      label_smoothing: float, reduction: str, compute_grad: bool, backend: str
                      ) -> tuple[Tensor, Tensor]:
    """Returns (loss reduced as asked, gradient of that loss w.r.t. logits for a unit upstream grad)."""
    C = logits.shape[1]
    denom = _reduction_denominator(target, weight, ignore_index, C) if reduction == "mean" else None
    grad_scale = (1.0 / denom).reshape(1) if denom is not None else None
    rows, grad = _face_forward(backend)(logits, target, weight, ignore_index, label_smoothing,
                                        compute_grad, grad_scale)
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / denom  # 0/0 = NaN when every target is ignored, as torch does
    return loss, grad


@_cross_entropy_op.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad, backend):
    N, C = logits.shape
    loss = logits.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    grad = logits.new_empty((N, C) if compute_grad else (0,))
    return loss, grad


def _ce_setup_context(ctx, inputs, output):
    ctx.reduction = inputs[5]
    ctx.save_for_backward(output[1])


def _ce_backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    if ctx.reduction == "none":
        dlogits = grad * grad_loss.to(grad.dtype)[:, None]
    else:
        dlogits = grad * grad_loss.to(grad.dtype)
    return dlogits, None, None, None, None, None, None, None


_cross_entropy_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


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
                  label_smoothing: float = 0.0, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """``torch.nn.functional.cross_entropy`` for class-index targets, fused.

    logits ``(N, C)``, ``(C,)`` or ``(N, C, d1, ...)``; float32/float16/bfloat16 with float32
    accumulation; the gradient w.r.t. logits comes in the logits' dtype. Targets outside
    ``[0, C)`` that are not ``ignore_index`` raise an error (on GPU: a device-side assert).
    """
    _check_args(logits, target, weight, ignore_index, label_smoothing, reduction)
    be = dispatch.resolve("cross_entropy", backend, logits.device.type, logits.dtype)
    if be == "torch":
        return _ref.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index,
                                  label_smoothing=label_smoothing, reduction=reduction)
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
    loss, _ = _cross_entropy_op(logits2d, target1d.to(torch.int64), w, int(ignore_index), float(label_smoothing),
                                reduction, compute_grad, be)
    if reduction == "none":
        loss = loss.reshape(out_shape)
    return loss.to(logits.dtype)


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy and contrastive_loss: the reference runs until their fused faces land.
dispatch.register_op(dispatch.OpSpec(name="linear_cross_entropy"))
dispatch.register_op(dispatch.OpSpec(name="contrastive_loss"))


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                         ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                         backend: str = "auto") -> Tensor:
    """``cross_entropy(hidden @ weight.T + bias, target)`` without materialising all N x V logits."""
    dispatch.resolve("linear_cross_entropy", backend, hidden.device.type, hidden.dtype)
    return _ref.linear_cross_entropy(hidden, weight, target, bias, ignore_index=ignore_index,
                                     label_smoothing=label_smoothing, reduction=reduction)


def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, *,
                     label_smoothing: float = 0.0, backend: str = "auto") -> Tensor:
    """CLIP's symmetric cross-entropy over the batch x batch similarity logits."""
    dispatch.resolve("contrastive_loss", backend, image_features.device.type, image_features.dtype)
    return _ref.contrastive_loss(image_features, text_features, logit_scale, label_smoothing=label_smoothing)
