"""Modules built on mmfast's ops."""

from mmfast.nn.losses import ContrastiveLoss, CrossEntropyLoss, LinearCrossEntropyLoss
from mmfast.nn.attention import MultiheadCrossAttention  # noqa: F401
from mmfast.nn.concat_embed import ConcatEmbed  # noqa: F401

__all__ = ["ContrastiveLoss", "CrossEntropyLoss", "LinearCrossEntropyLoss"]
