"""Eager PyTorch references: the exact semantics of every mmfast op, the "torch" backend and
the benchmark baseline. Written for clarity, not speed."""

from mmfast.reference.attention import attention
from mmfast.reference.concat_embed import concat_embed
from mmfast.reference.cross_entropy import contrastive_loss, cross_entropy, linear_cross_entropy

__all__ = ["attention", "concat_embed", "contrastive_loss", "cross_entropy", "linear_cross_entropy"]
