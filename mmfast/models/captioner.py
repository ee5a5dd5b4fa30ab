"""Captioner (BLIP's image-grounded text decoder): a ViT encodes the image; a BERT decoder with
causal self-attention and cross-attention into the image tokens in every layer predicts the next
token; the LM head is BERT's, tied to the word embeddings.

    image  = ViT(pixels)
    hidden = BERT decoder(input_ids, causal, cross-attention into image)
    loss   = linear_cross_entropy(hidden[:, :-1], word_embeddings, input_ids[:, 1:])   (pads ignored)

``generate(pixel_values, max_new_tokens)`` decodes greedily from [CLS] (BLIP's [DEC]) with a
key/value cache: each step runs only the new token, extending every layer's self-attention
cache; the cross-attention keys/values of the image are computed once. ``use_cache=False`` re-runs
the whole prefix each step (same tokens). No text-only stage: ``model.text_encoder`` is None; the
decoder is ``model.text_decoder`` (HF BERT names, so ``text_pretrained`` loads BERT into it, the
cross-attention weights staying as initialised, as BLIP does).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmfast.models.common import FusionModel, FusionOutput, TextTower, ZooConfig, as_bool_mask, build_vit
from mmfast.models.packing import flatten, is_packed, shifted_targets
from mmfast.models.heads import MLMHead


class CaptionerModel(FusionModel):
    arch = "captioner"
    tasks = ("caption",)
    default_task = "caption"

    def __init__(self, cfg: ZooConfig, task: str = "caption", num_labels: Optional[int] = None, fused: bool = True,
                 backend="auto", size: str = "", packed: bool = False):
        super().__init__(cfg, task, fused, backend, size, packed)
        self.num_labels = None
        self.vision_encoder = build_vit(cfg, self.kernels)
        self.text_decoder = TextTower(cfg, self.kernels, cross_from=0, kv_width=cfg.vision_width, causal=True)
        self.text_encoder = None
        self.lm_head = MLMHead(self.text_decoder.config, self.text_decoder.embeddings.word_embeddings, self.kernels)

    def text_pretrained_target(self):
        return self.text_decoder

    def decode(self, input_ids: Tensor, attention_mask, image: Tensor, caches=None,
               past_length: int = 0) -> Tensor:
        """``attention_mask``: padding mask of (B, L) ids, or the Layout of packed ids (total,) (no cache)."""
        d = self.text_decoder
        if is_packed(attention_mask):
            image, image_mask = flatten(image)
            return d.run(d.embed(input_ids, layout=attention_mask), attention_mask, 0, len(d.layers),
                         encoder_hidden_states=image, encoder_mask=image_mask)
        hidden = d.embed(input_ids, past_length=past_length)
        return d.run(hidden, as_bool_mask(attention_mask), 0, len(d.layers), encoder_hidden_states=image,
                     caches=caches)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, pixel_values: Tensor = None,
                labels: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None) -> FusionOutput:
        """``labels`` (B, L): the tokens to predict, aligned with ``input_ids`` (-100 = ignore); the
        loss predicts position t+1 from positions <= t. Without labels, returns the logits.
        Packed (``packed=True``): the same within each sample; logits and states are packed rows."""
        if pixel_values is None:
            raise ValueError("mmfast.models: captioner needs 'pixel_values'")
        input_ids, mask, _, labels, _ = self._text_batch(input_ids, attention_mask, None, cu_seqlens, max_seqlen,
                                                         pixel_values.shape[0], labels)
        image = self.vision_encoder.forward_features(pixel_values)
        hidden = self.decode(input_ids, mask, image)
        if labels is None:
            return FusionOutput(logits=self.lm_head.logits(hidden), last_hidden_state=hidden)
        if is_packed(mask):
            targets = shifted_targets(labels, mask)
            return FusionOutput(loss=self.lm_head.loss(hidden, targets, self.cfg.label_smoothing), last_hidden_state=hidden)
        if labels.shape != input_ids.shape:
            raise ValueError(f"mmfast.models: captioner 'labels' must have the shape of 'input_ids' "
                             f"{tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        loss = self.lm_head.loss(hidden[:, :-1], labels[:, 1:], self.cfg.label_smoothing)
        return FusionOutput(loss=loss, last_hidden_state=hidden)

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, max_new_tokens: int = 20, *, bos_token_id: Optional[int] = None,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 use_cache: bool = True) -> Tensor:
        """Greedy decoding. Returns (B, 1 + n) token ids starting with BOS; after a sample emits EOS
        it is padded with ``pad_token_id``; stops early once every sample has ended."""
        if max_new_tokens < 0:
            raise ValueError(f"mmfast.models: argument 'max_new_tokens' must be >= 0, got {max_new_tokens}")
        c = self.cfg
        bos = c.cls_token_id if bos_token_id is None else bos_token_id
        eos = c.sep_token_id if eos_token_id is None else eos_token_id
        pad = c.pad_token_id if pad_token_id is None else pad_token_id
        limit = c.max_position_embeddings - 1
        if max_new_tokens > limit:
            raise ValueError(f"mmfast.models: max_new_tokens {max_new_tokens} exceeds the decoder's "
                             f"{c.max_position_embeddings} positions (at most {limit})")
        image = self.vision_encoder.forward_features(pixel_values)
        B = image.shape[0]
        tokens = torch.full((B, 1), bos, dtype=torch.long, device=image.device)
        done = torch.zeros(B, dtype=torch.bool, device=image.device)
        caches = [{} for _ in self.text_decoder.layers] if use_cache else None
        for step in range(max_new_tokens):
            if use_cache:
                hidden = self.decode(tokens[:, -1:], None, image, caches=caches, past_length=step)
            else:
                hidden = self.decode(tokens, None, image)
            nxt = self.lm_head.logits(hidden[:, -1]).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done = done | (nxt == eos)
            if bool(done.all()):
                break
        return tokens
