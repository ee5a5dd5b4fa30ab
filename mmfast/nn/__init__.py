"""Modules built on mmfast's ops."""

from mmfast.nn.losses import ContrastiveLoss, CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = ["ContrastiveLoss", "CrossEntropyLoss", "LinearCrossEntropyLoss"]
