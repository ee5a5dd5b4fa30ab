"""Co-attention fusion (METER; LXMERT-style): a full BERT and a full ViT encode each modality, then
``num_fusion_layers`` co-attention layers update both streams in parallel: each stream's layer runs
self-attention, cross-attention into the *other* stream's previous states, and a feed-forward.

    text  = BERT(input_ids)              image = ViT(pixels)                (unimodal stage)
    t, i  = Linear(text) + type[0],      Linear(image) + type[1]            (into the fusion width)
    for each layer:  t, i = text_layer(t, cross into i),  image_layer(i, cross into t)
    pooled = [tanh(dense(t[:, 0])), tanh(dense(i[:, 0]))]                 (2 x hidden)

The fusion width is the text width (so the MLM head ties to BERT's word embeddings). Tasks: vqa,
itm, mlm, itc (on the unimodal [CLS] embeddings), classification, pretrain = ITC + ITM + MLM.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mmfast.models.common import FusionModel, FusionOutput, Pooler, TextLayer, TextTower, ZooConfig, build_vit
from mmfast.models.packing import first_tokens, flatten, is_packed, twice
from mmfast.models.heads import (ContrastiveHead, MLMHead, check_labels, classifier_head, itm_labels,
                                 shifted_negatives)


class CoAttentionModel(FusionModel):
    arch = "co_attention"
    tasks = ("vqa", "itm", "mlm", "itc", "classification", "pretrain")
    default_task = "vqa"

    def __init__(self, cfg: ZooConfig, task: str = "vqa", num_labels: Optional[int] = None, fused: bool = True,
                 backend="auto", size: str = "", packed: bool = False):
        super().__init__(cfg, task, fused, backend, size, packed)
        self.num_labels = num_labels or cfg.num_labels
        H = cfg.hidden_size
        self.text_encoder = TextTower(cfg, self.kernels)
        self.vision_encoder = build_vit(cfg, self.kernels)
        self.cross_modal_text_transform = nn.Linear(H, H)
        self.cross_modal_image_transform = nn.Linear(cfg.vision_width, H)
        self.token_type_embeddings = nn.Embedding(2, H)
        fcfg = self.text_encoder.config  # the fusion layers are BERT layers of the text width
        self.cross_modal_text_layers = nn.ModuleList(
            [TextLayer(fcfg, self.kernels, cross_attention=True) for _ in range(cfg.num_fusion_layers)])
        self.cross_modal_image_layers = nn.ModuleList(
            [TextLayer(fcfg, self.kernels, cross_attention=True) for _ in range(cfg.num_fusion_layers)])
        self.cross_modal_text_pooler = Pooler(H)
        self.cross_modal_image_pooler = Pooler(H)
        if task in ("itc", "pretrain"):
            self.contrastive = ContrastiveHead(H, cfg.vision_width, cfg.embed_dim)
        if task in ("mlm", "pretrain"):
            self.mlm_head = MLMHead(fcfg, self.text_encoder.embeddings.word_embeddings, self.kernels)
        if task in ("itm", "pretrain"):
            self.itm_head = classifier_head("itm", 2 * H, 2)
        if task in ("vqa", "classification"):
            self.classifier = classifier_head(task, 2 * H, self.num_labels)

    def encode_text(self, input_ids, mask, token_type_ids=None) -> Tensor:
        """``mask``: padding mask of (B, L) ids, or the Layout of packed ids (total,)."""
        return self.text_encoder.encode(input_ids, mask, token_type_ids, len(self.text_encoder.layers))

    def encode_image(self, pixel_values) -> Tensor:
        return self.vision_encoder.forward_features(pixel_values)

    def fuse(self, text: Tensor, mask, image: Tensor):
        """-> (text stream, image stream, pooled). Packed text (``mask`` its Layout): the image stream
        runs as packed rows too (uniform layout), so that each stream attends to the other's rows."""
        tt = self.token_type_embeddings.weight
        image_mask = None
        if is_packed(mask):
            image, image_mask = flatten(image)
        t = self.cross_modal_text_transform(text) + tt[0]
        i = self.cross_modal_image_transform(image) + tt[1]
        for tl, il in zip(self.cross_modal_text_layers, self.cross_modal_image_layers):
            # both updates read the previous states of the other stream
            t, i = (tl(t, mask, encoder_hidden_states=i, encoder_mask=image_mask),
                    il(i, image_mask, encoder_hidden_states=t, encoder_mask=mask))
        pooled = torch.cat([self.cross_modal_text_pooler(t, mask), self.cross_modal_image_pooler(i, image_mask)], dim=-1)
        return t, i, pooled

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, pixel_values: Tensor = None,
                labels: Optional[Tensor] = None, mlm_labels: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None) -> FusionOutput:
        if pixel_values is None:
            raise ValueError("mmfast.models: co_attention needs 'pixel_values'")
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
            _, _, pooled = self.fuse(*twice(text, mask), torch.cat([image, shifted_negatives(image)]))
            itm_logits = self.itm_head(pooled)
            loss_itm = k.cross_entropy(itm_logits, itm_labels(B, image.device))
            masked = self.encode_text(self._mask_for_mlm(input_ids, mlm_labels), mask, token_type_ids)
            t_mlm, _, _ = self.fuse(masked, mask, image)
            loss_mlm = self.mlm_head.loss(t_mlm, mlm_labels, c.label_smoothing)
            return FusionOutput(loss=loss_itc + loss_itm + loss_mlm, loss_itc=loss_itc, loss_itm=loss_itm,
                                loss_mlm=loss_mlm, itm_logits=itm_logits, text_embeds=t_emb, image_embeds=i_emb)

        text = self.encode_text(input_ids, mask, token_type_ids)
        if task == "itc":
            t_emb, i_emb = self.contrastive.embed(first_tokens(text, mask), image[:, 0])
            scale = self.contrastive.scale()
            loss = k.contrastive_loss(i_emb, t_emb, scale, label_smoothing=c.label_smoothing)
            return FusionOutput(loss=loss, loss_itc=loss, text_embeds=t_emb, image_embeds=i_emb,
                                logits_per_image=None if self.training else scale * i_emb @ t_emb.T)
        t, i, pooled = self.fuse(text, mask, image)
        if task == "mlm":
            if labels is None:
                return FusionOutput(logits=self.mlm_head.logits(t), last_hidden_state=t)
            loss = self.mlm_head.loss(t, labels, c.label_smoothing)
            return FusionOutput(loss=loss, loss_mlm=loss, last_hidden_state=t)
        head = self.itm_head if task == "itm" else self.classifier
        logits = head(pooled)
        check_labels(labels, task, B)
        loss = None if labels is None else k.cross_entropy(logits, labels, label_smoothing=c.label_smoothing)
        return FusionOutput(loss=loss, logits=logits, itm_logits=logits if task == "itm" else None,
                            last_hidden_state=t, pooled_output=pooled)
