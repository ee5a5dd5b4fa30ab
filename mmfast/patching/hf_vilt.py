"""Hugging Face models with hand-written (matmul/softmax) attention: ViLT, VisualBERT, LXMERT.

Their attention modules are swapped in place for subclasses (``module.__class__ = ...``): same
parameters, same names, same ``state_dict``; only ``forward`` changes, to project q/k/v with the
module's own Linear layers and call ``mmfast.ops.attention``. They receive HF's additive eager
masks (0 / finfo.min, built once per forward and shared by all layers); :mod:`masks` turns them
into a key padding mask once per forward. When attention weights are requested, or a mask is not
expressible, the original forward runs for that call.

``ViltEmbeddings`` (``embeddings=True``): ViLT adds the modality-type embedding to the text
tokens (after their LayerNorm and dropout) and to the image tokens (after their dropout), then
concatenates the two sequences and their masks, with no LayerNorm or dropout after the
concatenation. That is exactly ``mmfast.ops.concat_embed(features=[text, image],
type_embeddings=W[[0, image_token_type_idx]], masks=[text_mask, image_mask])`` with no position
table, LayerNorm or dropout, so the swapped module runs the text and patch embeddings as before
and merges through the fused op. (The text LayerNorm and the image position/patch steps stay in
their own modules: they come before the type embedding is added, so they cannot move into the
merge without changing the result.)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from mmfast import ops
from mmfast.patching import masks as _masks

BACKEND_ATTR = "_mmfast_backend"


def _backend(module) -> str:
    return getattr(module, BACKEND_ATTR, "auto")


def _attend(module, hidden_states: Tensor, context: Tensor, attention_mask: Optional[Tensor]) -> Optional[Tensor]:
    """(B, Lq, H*D) context layer through mmfast, or None when the mask is not expressible."""
    B, Lq = hidden_states.shape[:2]
    Lk = context.shape[1]
    try:
        kpm, causal = _masks.decompose(attention_mask, B, Lq, Lk)
    except _masks.NotExpressible:
        return None
    d = module.attention_head_size
    q = module.query(hidden_states).view(B, Lq, -1, d).transpose(1, 2)
    k = module.key(context).view(B, Lk, -1, d).transpose(1, 2)
    v = module.value(context).view(B, Lk, -1, d).transpose(1, 2)
    p = module.dropout.p if module.training else 0.0
    out = ops.attention(q, k, v, key_padding_mask=kpm, causal=causal, scale=1.0 / math.sqrt(d), dropout_p=p,
                        backend=_backend(module))
    return out.transpose(1, 2).reshape(B, Lq, -1)


class _SelfAttentionMixin:
    """forward(hidden_states, attention_mask=None, output_attentions=False) -> (context,)"""

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, *args, **kwargs):
        if not output_attentions and not args and not kwargs:
            out = _attend(self, hidden_states, hidden_states, attention_mask)
            if out is not None:
                return (out,)
        return super().forward(hidden_states, _masks.additive(attention_mask, hidden_states.dtype),
                               output_attentions, *args, **kwargs)


class _CrossAttentionMixin:
    """LXMERT: forward(hidden_states, context, attention_mask=None, output_attentions=False) -> (context,)"""

    def forward(self, hidden_states, context, attention_mask=None, output_attentions=False, *args, **kwargs):
        if not output_attentions and not args and not kwargs:
            out = _attend(self, hidden_states, context, attention_mask)
            if out is not None:
                return (out,)
        return super().forward(hidden_states, context, _masks.additive(attention_mask, hidden_states.dtype),
                               output_attentions, *args, **kwargs)


def _import(module: str, name: str):
    try:
        import importlib

        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


# Subclasses defined at import (this module is imported only when a model holds one of these
# classes), at module level so pickling a patched module finds them by name.
_ViltSelfAttention = _import("transformers.models.vilt.modeling_vilt", "ViltSelfAttention")
_ViltEmbeddings = _import("transformers.models.vilt.modeling_vilt", "ViltEmbeddings")
_VisualBertSelfAttention = _import("transformers.models.visual_bert.modeling_visual_bert", "VisualBertSelfAttention")
_LxmertAttention = _import("transformers.models.lxmert.modeling_lxmert", "LxmertAttention")

SWAPS = {}  # original class -> (mmfast subclass, kind)

if _ViltSelfAttention is not None:
    class MMFastViltSelfAttention(_SelfAttentionMixin, _ViltSelfAttention):
        pass

    SWAPS[_ViltSelfAttention] = (MMFastViltSelfAttention, "attention: ViLT self-attention (class swap) -> mmfast.ops.attention")

if _VisualBertSelfAttention is not None:
    class MMFastVisualBertSelfAttention(_SelfAttentionMixin, _VisualBertSelfAttention):
        pass

    SWAPS[_VisualBertSelfAttention] = (MMFastVisualBertSelfAttention,
                                       "attention: VisualBERT self-attention (class swap) -> mmfast.ops.attention")

if _LxmertAttention is not None:
    class MMFastLxmertAttention(_CrossAttentionMixin, _LxmertAttention):
        pass

    SWAPS[_LxmertAttention] = (MMFastLxmertAttention,
                               "attention: LXMERT self/cross-attention (class swap) -> mmfast.ops.attention")


if _ViltEmbeddings is not None:
    class MMFastViltEmbeddings(_ViltEmbeddings):
        """ViltEmbeddings whose type-embedding add + concatenation run in ``mmfast.ops.concat_embed``."""

        def forward(self, input_ids, attention_mask, token_type_ids, pixel_values, pixel_mask, inputs_embeds,
                    image_embeds, image_token_type_idx=1):
            text_embeds = self.text_embeddings(input_ids=input_ids, token_type_ids=token_type_ids,
                                               inputs_embeds=inputs_embeds)
            if image_embeds is None:
                image_embeds, image_masks, _ = self.visual_embed(pixel_values, pixel_mask,
                                                                 max_image_length=self.config.max_image_length)
            else:
                image_masks = pixel_mask.flatten(1)
            if image_token_type_idx is None:
                image_token_type_idx = 1
            W = self.token_type_embeddings.weight
            if text_embeds.dtype == image_embeds.dtype and 0 <= image_token_type_idx < W.shape[0]:
                types = W[[0, image_token_type_idx]]
                embeddings, _ = ops.concat_embed([text_embeds, image_embeds], type_embeddings=types,
                                                 backend=_backend(self))
            else:  # mixed dtypes or a bad index: the stock arithmetic (and its error messages)
                text_embeds = text_embeds + self.token_type_embeddings(
                    torch.zeros_like(attention_mask, dtype=torch.long, device=text_embeds.device))
                image_embeds = image_embeds + self.token_type_embeddings(
                    torch.full_like(image_masks, image_token_type_idx, dtype=torch.long, device=text_embeds.device))
                embeddings = torch.cat([text_embeds, image_embeds], dim=1)
            # The stock module returns torch.cat of the two masks (type promotion included).
            masks = torch.cat([attention_mask, image_masks.to(attention_mask.device)], dim=1)
            return embeddings, masks

    SWAPS[_ViltEmbeddings] = (MMFastViltEmbeddings,
                              "embeddings: ViLT text+image merge (class swap) -> mmfast.ops.concat_embed")

EMBEDDING_CLASSES = tuple(c for c in (_ViltEmbeddings,) if c is not None)
