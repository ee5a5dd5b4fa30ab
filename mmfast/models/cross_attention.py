"""Cross-attention fusion (ALBEF; BLIP's image-grounded text encoder): a ViT encodes the image; a
BERT encodes the text, and its upper layers (from ``fusion_layer`` on; ALBEF: 6 of 12) add
cross-attention from text queries into the image tokens.

    image = ViT(pixels)                                      (all tokens after the final norm)
    text  = BERT layers [0, fusion_layer)(input_ids)         (text-only stage: model.text_encoder(...))
    fused = BERT layers [fusion_layer, N)(text, cross-attention into image, image keys unmasked)

Tasks: itc (contrastive on the unimodal [CLS] embeddings), itm, mlm, vqa and classification (on
the fused [CLS]), pretrain = ITC + ITM + MLM (ALBEF's recipe, without the momentum distillation;
ITM negatives are shifted in-batch pairs, see ``heads.shifted_negatives``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmfast.models.common import FusionModel, FusionOutput, TextTower, ZooConfig, build_vit
from mmfast.models.packing import first_tokens, flatten, is_packed, twice
from mmfast.models.heads import (ContrastiveHead, MLMHead, check_labels, classifier_head, itm_labels,
                                 shifted_negatives)


class CrossAttentionModel(FusionModel):
    arch = "cross_attention"
    tasks = ("vqa", "itm", "mlm", "itc", "classification", "pretrain")
    default_task = "pretrain"

    def __init__(self, cfg: ZooConfig, task: str = "pretrain", num_labels: Optional[int] = None, fused: bool = True,
                 backend="auto", size: str = "", packed: bool = False):
        super().__init__(cfg, task, fused, backend, size, packed)
        self.num_labels = num_labels or cfg.num_labels
        self.vision_encoder = build_vit(cfg, self.kernels)
        self.text_encoder = TextTower(cfg, self.kernels, cross_from=cfg.fusion_layer, kv_width=cfg.vision_width)
        H = cfg.hidden_size
        if task in ("itc", "pretrain"):
            self.contrastive = ContrastiveHead(H, cfg.vision_width, cfg.embed_dim)
        if task in ("mlm", "pretrain"):
            self.mlm_head = MLMHead(self.text_encoder.config, self.text_encoder.embeddings.word_embeddings,
                                    self.kernels)
        if task in ("itm", "pretrain"):
            self.itm_head = classifier_head("itm", H, 2)
        if task in ("vqa", "classification"):
            self.classifier = classifier_head(task, H, self.num_labels)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        return self.vision_encoder.forward_features(pixel_values)

    def encode_text(self, input_ids: Tensor, mask, token_type_ids=None) -> Tensor:
        """``mask``: padding mask of (B, L) ids, or the Layout of packed ids (total,)."""
        return self.text_encoder.encode(input_ids, mask, token_type_ids)

    def fuse(self, text: Tensor, mask, image: Tensor) -> Tensor:
        t = self.text_encoder
        image_mask = None
        if is_packed(mask):  # packed text queries attend to the image tokens as packed rows
            image, image_mask = flatten(image)
        return t.run(text, mask, t.cross_from, len(t.layers), encoder_hidden_states=image, encoder_mask=image_mask)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, pixel_values: Tensor = None,
                labels: Optional[Tensor] = None, mlm_labels: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None) -> FusionOutput:
        if pixel_values is None:
            raise ValueError("mmfast.models: cross_attention needs 'pixel_values'")
        k, task, c = self.kernels, self.task, self.cfg
        B = pixel_values.shape[0]
        input_ids, mask, token_type_ids, labels, mlm_labels = self._text_batch(
            input_ids, attention_mask, token_type_ids, cu_seqlens, max_seqlen, B, labels, mlm_labels)
        image = self.encode_image(pixel_values)

        if task == "pretrain":
            if mlm_labels is None:
                raise ValueError("mmfast.models: task 'pretrain' needs 'mlm_labels' (-100 = not masked)")
            text = self.encode_text(input_ids, mask, token_type_ids)
            t_emb, i_emb = self.contrastive.embed(first_tokens(text, mask), image[:, 0])
            loss_itc = k.contrastive_loss(i_emb, t_emb, self.contrastive.scale(), label_smoothing=c.label_smoothing)
            # ITM over positives + shifted negatives, one fused pass of 2B
            text2, mask2 = twice(text, mask)
            fused = self.fuse(text2, mask2, torch.cat([image, shifted_negatives(image)]))
            itm_logits = self.itm_head(first_tokens(fused, mask2))
            loss_itm = k.cross_entropy(itm_logits, itm_labels(B, image.device))
            # MLM: masked text through both stages with its own image
            masked = self.encode_text(self._mask_for_mlm(input_ids, mlm_labels), mask, token_type_ids)
            fused_mlm = self.fuse(masked, mask, image)
            loss_mlm = self.mlm_head.loss(fused_mlm, mlm_labels, c.label_smoothing)
            return FusionOutput(loss=loss_itc + loss_itm + loss_mlm, loss_itc=loss_itc, loss_itm=loss_itm,
                                loss_mlm=loss_mlm, itm_logits=itm_logits, text_embeds=t_emb, image_embeds=i_emb)

        text = self.encode_text(input_ids, mask, token_type_ids)
        if task == "itc":
            t_emb, i_emb = self.contrastive.embed(first_tokens(text, mask), image[:, 0])
            scale = self.contrastive.scale()
            loss = k.contrastive_loss(i_emb, t_emb, scale, label_smoothing=c.label_smoothing)
            return FusionOutput(loss=loss, loss_itc=loss, text_embeds=t_emb, image_embeds=i_emb,
                                logits_per_image=None if self.training else scale * i_emb @ t_emb.T)
        fused = self.fuse(text, mask, image)
        if task == "mlm":
            if labels is None:
                return FusionOutput(logits=self.mlm_head.logits(fused), last_hidden_state=fused)
            loss = self.mlm_head.loss(fused, labels, c.label_smoothing)
            return FusionOutput(loss=loss, loss_mlm=loss, last_hidden_state=fused)
        head = self.itm_head if task == "itm" else self.classifier
        logits = head(first_tokens(fused, mask))
        check_labels(labels, task, B)
        loss = None if labels is None else k.cross_entropy(logits, labels, label_smoothing=c.label_smoothing)
        return FusionOutput(loss=loss, logits=logits, itm_logits=logits if task == "itm" else None,
                            last_hidden_state=fused)
