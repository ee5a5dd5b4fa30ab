"""Multi-head attention module (self or cross-modal) on top of :func:`mmfast.ops.attention`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mmfast.ops.attention import MAX_HEAD_DIM, attention


class MultiheadCrossAttention(nn.Module):
    """BERT-style multi-head attention with separate q/k/v/out projections.

    ``forward(hidden_states, encoder_hidden_states=None, key_padding_mask=None, causal=False)``:
    queries come from ``hidden_states`` (B, Lq, hidden_size); keys and values from
    ``encoder_hidden_states`` (B, Lk, kv_hidden_size), or from ``hidden_states`` itself when it is
    None (self-attention). ``key_padding_mask``: bool (B, Lk), True = the key takes part. Returns
    (B, Lq, hidden_size). ``dropout`` is applied to the attention probabilities in training mode
    (BERT's ``attention_probs_dropout_prob``). A query whose keys are all masked gets zeros from the
    attention (then the output projection's bias).

    Args:
        hidden_size: width of the queries and of the output (BERT ``hidden_size``).
        num_heads: number of heads (BERT ``num_attention_heads``); hidden_size must divide evenly.
        dropout: attention-probability dropout in training.
        kv_hidden_size: width of ``encoder_hidden_states`` (e.g. a ViT's 768 for a 384-wide text
            encoder); defaults to ``hidden_size``.
        bias: whether the projections have biases.
        scale: softmax scale; default head_dim ** -0.5.
        backend: mmfast backend for the attention op ("auto", "triton", "cuda", "cpu", "torch").
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.0, *, kv_hidden_size: Optional[int] = None,
                 bias: bool = True, scale: Optional[float] = None, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"MultiheadCrossAttention: argument 'hidden_size' ({hidden_size}) must be divisible by "
                             f"'num_heads' ({num_heads})")
        head_dim = hidden_size // num_heads
        if backend != "torch" and (head_dim % 8 != 0 or head_dim > MAX_HEAD_DIM):
            raise ValueError(f"MultiheadCrossAttention: head dim hidden_size / num_heads = {head_dim} must be a multiple "
                             f"of 8 up to {MAX_HEAD_DIM} for the fused kernels")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiheadCrossAttention: argument 'dropout' must be in [0, 1), got {dropout}")
        kv_hidden_size = hidden_size if kv_hidden_size is None else kv_hidden_size
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.kv_hidden_size = kv_hidden_size
        self.dropout, self.scale, self.backend = dropout, scale, backend
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=bias, **factory)
        self.k_proj = nn.Linear(kv_hidden_size, hidden_size, bias=bias, **factory)
        self.v_proj = nn.Linear(kv_hidden_size, hidden_size, bias=bias, **factory)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=bias, **factory)

    def _heads(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        # a (B, L, H, D) view seen as (B, H, L, D): the op reads it through strides, no copy
        return x.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, causal: bool = False) -> Tensor:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"MultiheadCrossAttention: argument 'hidden_states' must be (B, Lq, {self.hidden_size}), "
                             f"got {tuple(hidden_states.shape)}")
        kv = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and (kv.dim() != 3 or kv.shape[-1] != self.kv_hidden_size
                                                  or kv.shape[0] != hidden_states.shape[0]):
            raise ValueError(f"MultiheadCrossAttention: argument 'encoder_hidden_states' must be "
                             f"({hidden_states.shape[0]}, Lk, {self.kv_hidden_size}), got {tuple(kv.shape)}")
        B, Lq, _ = hidden_states.shape
        q = self._heads(self.q_proj(hidden_states))
        k = self._heads(self.k_proj(kv))
        v = self._heads(self.v_proj(kv))
        out = attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal, scale=self.scale,
                        dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return self.out_proj(out.transpose(1, 2).reshape(B, Lq, self.hidden_size))

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, kv_hidden_size={self.kv_hidden_size}, "
                f"dropout={self.dropout}, backend={self.backend!r}")
