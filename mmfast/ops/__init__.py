"""mmfast's fused ops. Each family lives in one file here (API, dispatch, autograd) with its
faces under mmfast/reference/, mmfast/triton/, csrc/cpu/ and csrc/cuda/ of the same name."""

from mmfast.ops.attention import attention
from mmfast.ops.attention_varlen import attention_varlen
from mmfast.ops.concat_embed import concat_embed
from mmfast.ops.cross_entropy import contrastive_loss, cross_entropy, linear_cross_entropy

__all__ = ["attention", "attention_varlen", "concat_embed", "contrastive_loss", "cross_entropy", "linear_cross_entropy"]
