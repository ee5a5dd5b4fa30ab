"""Modules built on mmfast's ops."""

from mmfast.nn.attention import MultiheadCrossAttention
from mmfast.nn.concat_embed import ConcatEmbed
from mmfast.nn.losses import ContrastiveLoss, CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = ["ConcatEmbed", "ContrastiveLoss", "CrossEntropyLoss", "LinearCrossEntropyLoss", "MultiheadCrossAttention"]
