"""Dual encoder (CLIP-style, with a BERT text tower): text and image are encoded separately,
projected (no bias) into a shared space, normalised, and trained with the symmetric contrastive
loss at a learnable temperature.

    t = normalize(text_proj(BERT(input_ids)[:, 0]))     i = normalize(vision_proj(ViT(pixels)[:, 0]))
    loss = contrastive_loss(i, t, exp(logit_scale))

Tasks: itc (and pretrain, which for this architecture is ITC alone: no fusion means no ITM/MLM),
classification (a linear head on the concatenated embeddings [i, t]).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmfast.models.common import FusionModel, FusionOutput, TextTower, ZooConfig, build_vit
from mmfast.models.packing import first_tokens
from mmfast.models.heads import ContrastiveHead, check_labels, classifier_head


class DualEncoderModel(FusionModel):
    arch = "dual_encoder"
    tasks = ("itc", "classification", "pretrain")
    default_task = "itc"

    def __init__(self, cfg: ZooConfig, task: str = "itc", num_labels: Optional[int] = None, fused: bool = True,
                 backend="auto", size: str = "", packed: bool = False):
        super().__init__(cfg, task, fused, backend, size, packed)
        self.num_labels = num_labels or cfg.num_labels
        self.text_encoder = TextTower(cfg, self.kernels)
        self.vision_encoder = build_vit(cfg, self.kernels)
        self.contrastive = ContrastiveHead(cfg.hidden_size, cfg.vision_width, cfg.embed_dim, bias=False)
        if task == "classification":
            self.classifier = classifier_head(task, 2 * cfg.embed_dim, self.num_labels)

    def encode_text(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, token_type_ids=None,
                    cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                    batch: Optional[int] = None) -> Tensor:
        """Each sample's [CLS] state (B, W), from padded or (packed model) packed text."""
        if batch is None:
            batch = input_ids.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        ids, mask, tt, _, _ = self._text_batch(input_ids, attention_mask, token_type_ids, cu_seqlens, max_seqlen, batch)
        return first_tokens(self.text_encoder.encode(ids, mask, tt), mask)

    def get_text_features(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                          cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None) -> Tensor:
        cls = self.encode_text(input_ids, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return torch.nn.functional.normalize(self.contrastive.text_proj(cls), dim=-1)

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        image = self.vision_encoder.forward_features(pixel_values)
        return torch.nn.functional.normalize(self.contrastive.vision_proj(image[:, 0]), dim=-1)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, pixel_values: Tensor = None,
                labels: Optional[Tensor] = None, token_type_ids: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None) -> FusionOutput:
        if pixel_values is None:
            raise ValueError("mmfast.models: dual_encoder needs 'pixel_values'")
        k, c = self.kernels, self.cfg
        text_cls = self.encode_text(input_ids, attention_mask, token_type_ids, cu_seqlens, max_seqlen,
                                    batch=pixel_values.shape[0])
        image = self.vision_encoder.forward_features(pixel_values)
        t_emb, i_emb = self.contrastive.embed(text_cls, image[:, 0])
        scale = self.contrastive.scale()
        if self.task == "classification":
            logits = self.classifier(torch.cat([i_emb, t_emb], dim=-1))
            check_labels(labels, self.task, pixel_values.shape[0])
            loss = None if labels is None else k.cross_entropy(logits, labels, label_smoothing=c.label_smoothing)
            return FusionOutput(loss=loss, logits=logits, text_embeds=t_emb, image_embeds=i_emb)
        loss = k.contrastive_loss(i_emb, t_emb, scale, label_smoothing=c.label_smoothing)
        return FusionOutput(loss=loss, loss_itc=loss, text_embeds=t_emb, image_embeds=i_emb,
                            logits_per_image=None if self.training else scale * i_emb @ t_emb.T)
