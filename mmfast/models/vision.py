"""timm ViT vision tower with mmfast attention (and a key padding mask) in every block."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from mmfast.models.config import ZooConfig
from mmfast.models.kernels import Kernels
from mmfast.models.packing import is_packed

def _timm_attention_base():
    from timm.layers import Attention

    return Attention


class FusedViTAttention(_timm_attention_base()):
    """timm ``Attention`` (fused ``qkv`` Linear, same parameters) running through :class:`Kernels`,
    with a key padding mask for single-stream fusion, or packed rows ``x (total, C)`` whose
    :class:`~mmfast.models.packing.Layout` comes as ``key_padding_mask`` (packed single-stream
    fusion). Installed by swapping an instance's class, so the timm model's state_dict keys do not change."""

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if attn_mask is not None:  # timm's own arbitrary masks: keep timm's path
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        H = self.num_heads
        D = self.head_dim
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        dropout_p = self.attn_drop.p if self.training else 0.0
        if is_packed(key_padding_mask):
            q, k, v = self.qkv(x).reshape(-1, 3, H, D).unbind(1)  # (total, H, D) each
            q, k = self.q_norm(q), self.k_norm(k)
            out = self.kernels.attention_varlen(q, k, v, key_padding_mask, key_padding_mask, causal=is_causal,
                                                scale=self.scale, dropout_p=dropout_p).reshape(-1, H * D)
        else:
            B, N, C = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            out = self.kernels.attention(q, k, v, key_padding_mask=key_padding_mask, causal=is_causal,
                                         scale=self.scale, dropout_p=dropout_p)
            out = out.transpose(1, 2).reshape(B, N, H * D)
        out = getattr(self, "norm", nn.Identity())(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


def build_vit(cfg: ZooConfig, kernels: Kernels):
    """timm ``VisionTransformer`` (no head, no download) with mmfast attention in every block."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.vision_width,
                            depth=cfg.vision_depth, num_heads=cfg.vision_heads, mlp_ratio=cfg.vision_mlp_ratio,
                            qkv_bias=True, num_classes=0, drop_path_rate=cfg.vision_drop_path)
    for blk in vit.blocks:
        if not isinstance(blk.attn, _timm_attention_base()):
            raise TypeError(f"mmfast.models: unexpected timm attention class {type(blk.attn).__name__}")
        blk.attn.__class__ = FusedViTAttention
        blk.attn.kernels = kernels
    return vit


def vit_block(blk, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """timm ``Block.forward`` with a key padding mask (or packed rows' Layout) passed to the attention."""
    x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x), key_padding_mask=key_padding_mask)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
