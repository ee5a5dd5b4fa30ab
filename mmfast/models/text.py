"""BERT text tower with Hugging Face parameter names; its attention runs through :class:`Kernels`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mmfast.models.config import ZooConfig
from mmfast.models.kernels import Kernels, as_bool_mask
from mmfast.models.packing import Layout, embed as embed_packed, is_packed

class TextSelfAttention(nn.Module):
    """``BertSelfAttention``'s parameters (query, key, value), attention through :class:`Kernels`.
    For cross-attention, key/value read ``kv_width``-wide encoder states (ALBEF's ``encoder_width``)."""

    def __init__(self, config, kernels: Kernels, kv_width: Optional[int] = None):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                             f"{config.num_attention_heads}")
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        kv_width = kv_width or config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self.kernels = kernels

    def heads(self, x: Tensor) -> Tensor:  # (B, L, H*D) -> (B, H, L, D), a view
        B, L, _ = x.shape
        return x.view(B, L, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(self, hidden: Tensor, key_padding_mask: Optional[Tensor] = None, context: Optional[Tensor] = None,
                causal: bool = False, past_kv: Optional[tuple] = None, static_kv: Optional[tuple] = None,
                query_layout: Optional[Layout] = None):
        """``context``: encoder states for cross-attention (None: self-attention). ``past_kv``: cached
        (k, v) of earlier positions to extend (self-attention decoding); ``static_kv``: precomputed
        (k, v) of the context (cross-attention decoding). Returns (out (B, L, H*D), (k, v)).

        Packed rows (``key_padding_mask`` a :class:`Layout`, the keys' rows; ``query_layout`` the
        queries' rows when they differ, i.e. cross-attention): out ``(total, H*D)`` and no (k, v)."""
        if is_packed(key_padding_mask):
            return self._forward_packed(hidden, key_padding_mask, context, causal, query_layout), None
        q = self.heads(self.query(hidden))
        if static_kv is not None:
            k, v = static_kv
        else:
            src = hidden if context is None else context
            k, v = self.heads(self.key(src)), self.heads(self.value(src))
            if past_kv is not None:
                k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        out = self.kernels.attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal,
                                     dropout_p=self.dropout_p if self.training else 0.0)
        B, H, L, D = out.shape
        return out.transpose(1, 2).reshape(B, L, H * D), (k, v)

    def _forward_packed(self, hidden: Tensor, kv_layout: Layout, context: Optional[Tensor], causal: bool,
                        query_layout: Optional[Layout]) -> Tensor:
        H, D = self.num_attention_heads, self.attention_head_size
        src = hidden if context is None else context
        q = self.query(hidden).view(-1, H, D)
        k, v = self.key(src).view(-1, H, D), self.value(src).view(-1, H, D)
        out = self.kernels.attention_varlen(q, k, v, kv_layout if query_layout is None else query_layout, kv_layout,
                                            causal=causal, dropout_p=self.dropout_p if self.training else 0.0)
        return out.reshape(-1, H * D)


class TextAttention(nn.Module):
    """``BertAttention``: ``self`` (attention) + ``output`` (dense, dropout, residual LayerNorm)."""

    def __init__(self, config, kernels: Kernels, kv_width: Optional[int] = None):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertSelfOutput

        self.self = TextSelfAttention(config, kernels, kv_width)
        self.output = BertSelfOutput(config)

    def forward(self, hidden, key_padding_mask=None, context=None, causal=False, past_kv=None, static_kv=None,
                query_layout=None):
        out, kv = self.self(hidden, key_padding_mask, context, causal, past_kv, static_kv, query_layout)
        return self.output(out, hidden), kv


class TextLayer(nn.Module):
    """``BertLayer`` (post-LN): self-attention, optional cross-attention into encoder states
    (``crossattention``, as HF's decoder layers name it), feed-forward."""

    def __init__(self, config, kernels: Kernels, cross_attention: bool = False, kv_width: Optional[int] = None,
                 causal: bool = False):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput

        self.attention = TextAttention(config, kernels)
        self.has_cross_attention = cross_attention
        if cross_attention:
            self.crossattention = TextAttention(config, kernels, kv_width)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)
        self.causal = causal

    def forward(self, hidden, key_padding_mask=None, encoder_hidden_states=None, encoder_mask=None,
                cache: Optional[dict] = None):
        """``cache`` (decoding): {"self": (k, v) or None, "cross": (k, v) or None}, updated in place.
        Packed rows ``hidden (total, W)``: ``key_padding_mask`` is their :class:`Layout` and
        ``encoder_mask`` that of ``encoder_hidden_states`` (rows too); no cache."""
        packed = is_packed(key_padding_mask)
        if packed and (cache is not None or (encoder_hidden_states is not None and not is_packed(encoder_mask))):
            raise ValueError("mmfast.models: a packed text layer takes no decoding cache, and its encoder states "
                             "must be packed rows with their Layout as 'encoder_mask'")
        past = cache.get("self") if cache is not None else None
        hidden, self_kv = self.attention(hidden, key_padding_mask, causal=self.causal, past_kv=past)
        if cache is not None:
            cache["self"] = self_kv
        if self.has_cross_attention:
            if encoder_hidden_states is None:
                raise ValueError("mmfast.models: this text layer has cross-attention and needs encoder states")
            static = cache.get("cross") if cache is not None else None
            hidden, cross_kv = self.crossattention(hidden, encoder_mask, context=encoder_hidden_states,
                                                   static_kv=static, query_layout=key_padding_mask if packed else None)
            if cache is not None:
                cache["cross"] = cross_kv
        return self.output(self.intermediate(hidden), hidden)


class TextEncoderLayers(nn.Module):
    """Holds ``layer`` so parameter names read ``encoder.layer.<i>...`` as in ``BertModel``."""

    def __init__(self, layers):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TextTower(nn.Module):
    """A ``BertModel`` without pooler whose state_dict keys are Hugging Face's (``embeddings.*``,
    ``encoder.layer.<i>.attention.self.query.weight``, ...). Layers at index >= ``cross_from`` carry
    cross-attention into image tokens; ``causal`` makes the self-attention a decoder's.

    Calling it like ``BertModel`` (``input_ids, attention_mask``) runs the text-only stage: every
    layer before the first cross-attention layer (all of them for a text-only tower)."""

    def __init__(self, cfg: ZooConfig, kernels: Kernels, cross_from: Optional[int] = None,
                 kv_width: Optional[int] = None, causal: bool = False):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertEmbeddings

        self.config = cfg.bert_config(is_decoder=causal, add_cross_attention=cross_from is not None)
        n = cfg.num_hidden_layers
        self.cross_from = n if cross_from is None else cross_from
        if not 0 <= self.cross_from <= n:
            raise ValueError(f"mmfast.models: fusion_layer must be in [0, {n}] for {n} text layers, got {self.cross_from}")
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = TextEncoderLayers([
            TextLayer(self.config, kernels, cross_attention=i >= self.cross_from, kv_width=kv_width, causal=causal)
            for i in range(n)])
        self.causal = causal

    @property
    def layers(self):
        return self.encoder.layer

    def embed(self, input_ids: Tensor, token_type_ids: Optional[Tensor] = None, past_length: int = 0,
              layout: Optional[Layout] = None) -> Tensor:
        """(B, L) ids -> (B, L, W); packed ids (total,) with their ``layout`` -> (total, W)."""
        if layout is not None:
            return embed_packed(self.embeddings, input_ids, layout, token_type_ids)
        position_ids = None
        if past_length:  # decoding with a cache: positions continue after the cached prefix
            L = input_ids.shape[1]
            position_ids = torch.arange(past_length, past_length + L, device=input_ids.device)[None, :]
        return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)

    def run(self, hidden: Tensor, mask: Optional[Tensor], start: int, end: int, encoder_hidden_states=None,
            encoder_mask=None, caches=None, all_hidden: Optional[list] = None) -> Tensor:
        """Layers [start, end). ``mask``: the key padding mask of ``hidden`` (B, L, W), or the
        :class:`Layout` of packed rows ``hidden`` (total, W) (then ``encoder_mask`` is that of the
        packed encoder rows)."""
        for i in range(start, end):
            hidden = self.layers[i](hidden, mask, encoder_hidden_states, encoder_mask,
                                    None if caches is None else caches[i])
            if all_hidden is not None:
                all_hidden.append(hidden)
        return hidden

    def encode(self, input_ids: Tensor, mask, token_type_ids: Optional[Tensor] = None,
               end: Optional[int] = None) -> Tensor:
        """Embeddings, then layers [0, ``end``) (default: the text-only stage). ``mask``: the bool
        padding mask of (B, L) ids, or the :class:`Layout` of packed ids (total,)."""
        layout = mask if is_packed(mask) else None
        return self.run(self.embed(input_ids, token_type_ids, layout=layout), mask, 0,
                        self.cross_from if end is None else end)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, output_hidden_states: bool = False, return_dict: bool = True):
        from transformers.modeling_outputs import BaseModelOutput

        if self.cross_from == 0:
            raise RuntimeError("mmfast.models: this text tower has no text-only stage (cross-attention from layer 0)")
        hidden = self.embed(input_ids, token_type_ids)
        all_hidden = [hidden] if output_hidden_states else None
        hidden = self.run(hidden, as_bool_mask(attention_mask), 0, self.cross_from, all_hidden=all_hidden)
        out = BaseModelOutput(last_hidden_state=hidden,
                              hidden_states=tuple(all_hidden) if all_hidden is not None else None)
        return out if return_dict else out.to_tuple()
