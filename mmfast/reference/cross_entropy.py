"""Reference softmax cross-entropy family (eager PyTorch)."""

import torch
import torch.nn.functional as F


def cross_entropy(logits, target, *, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)


def linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0,
                         reduction="mean"):
    """``cross_entropy(hidden @ weight.T + bias, target)``: materialises the full logits."""
    return cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=ignore_index,
                         label_smoothing=label_smoothing, reduction=reduction)


def contrastive_loss(image_features, text_features, logit_scale, *, label_smoothing=0.0):
    """CLIP's symmetric loss: mean of image->text and text->image cross-entropy over the batch."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)) / 2
