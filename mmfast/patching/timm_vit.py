"""timm Vision Transformers: ``timm.layers.Attention`` (fused ``qkv`` Linear) swapped in place.

Only instances whose class is exactly ``timm.layers.Attention`` are swapped (its subclasses, e.g.
``AttentionRope``, have their own forward and are left alone). The subclass keeps every
parameter and buffer, so state_dict keys and tensors are unchanged; forward computes q/k/v with
the module's own layers (``qkv``, ``q_norm``, ``k_norm``, optional ``gate``, ``norm``, ``proj``)
and calls ``mmfast.ops.attention``. A mask that is not key padding (+ causal) runs the stock forward.
"""

from __future__ import annotations

import torch
from timm.layers import Attention as _TimmAttention

from mmfast import ops
from mmfast.patching import masks as _masks

BACKEND_ATTR = "_mmfast_backend"
ORIGINAL = _TimmAttention


class MMFastTimmAttention(_TimmAttention):
    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        try:
            kpm, causal = _masks.decompose(attn_mask, B, N, N)
        except _masks.NotExpressible:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        causal = causal or bool(is_causal)
        attn_dim = getattr(self, "attn_dim", self.num_heads * self.head_dim)
        gate_layer = getattr(self, "gate", None)
        gate = gate_layer(x).sigmoid() if gate_layer is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = ops.attention(q, k, v, key_padding_mask=kpm, causal=causal, scale=self.scale,
                            dropout_p=self.attn_drop.p if self.training else 0.0,
                            backend=getattr(self, BACKEND_ATTR, "auto"))
        x = out.transpose(1, 2).reshape(B, N, attn_dim)
        x = self.norm(x) if hasattr(self, "norm") else x
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        return x
