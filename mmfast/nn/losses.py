"""Loss modules with torch.nn's constructor arguments, running mmfast's fused ops."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfast import ops


def _legacy_reduction(size_average, reduce, reduction: str) -> str:
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    return "none" if not reduce else ("mean" if size_average else "sum")


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Drop-in ``torch.nn.CrossEntropyLoss`` (class-index targets) running ``mmfast.ops.cross_entropy``.
    Subclasses torch's class so ``isinstance`` checks and state_dict (the ``weight`` buffer) match."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, *, backend="auto", inplace_backward=False):
        super().__init__(weight, size_average, ignore_index, reduce, _legacy_reduction(size_average, reduce, reduction),
                         label_smoothing)
        self.backend = backend
        self.inplace_backward = inplace_backward  # see mmfast.ops.cross_entropy: opt-in, overwrites the logits

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if target.is_floating_point():  # probability targets: only torch has them
            return super().forward(input, target)
        return ops.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                 label_smoothing=self.label_smoothing, reduction=self.reduction, backend=self.backend,
                                 inplace_backward=self.inplace_backward)


class LinearCrossEntropyLoss(nn.Module):
    """``loss(hidden, target)`` = cross-entropy of ``hidden @ weight.T + bias`` without materialising
    the logits. Pass the output projection's parameters in ``forward`` (or hold a Linear)."""

    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, *, backend="auto"):
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing, self.backend = (
            ignore_index, reduction, label_smoothing, backend)

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
        return ops.linear_cross_entropy(hidden, weight, target, bias, ignore_index=self.ignore_index,
                                        label_smoothing=self.label_smoothing, reduction=self.reduction,
                                        backend=self.backend)


class ContrastiveLoss(nn.Module):
    """CLIP's symmetric contrastive loss over (already normalised) image and text features."""

    def __init__(self, label_smoothing=0.0, *, backend="auto"):
        super().__init__()
        self.label_smoothing, self.backend = label_smoothing, backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
        if not isinstance(logit_scale, Tensor):
            logit_scale = torch.tensor(float(logit_scale), device=image_features.device)
        return ops.contrastive_loss(image_features, text_features, logit_scale,
                                    label_smoothing=self.label_smoothing, backend=self.backend)
