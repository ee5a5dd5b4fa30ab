"""Single-stream fusion (ViLT): text and image tokens merged into one sequence that one transformer
reads with merged self-attention.

    text  = BertEmbeddings(input_ids)                        (word + position + token type, LayerNorm)
    image = [ViT cls] + ViT patch_embed(pixels)
    x, m  = concat_embed([text, cls, patches], + modality-type embeddings, + ViT position embeddings,
                         masks=[attention_mask, -, -])        (one fused op)
    x     = ViT blocks (pre-LN) over x with key padding mask m, final ViT norm
    pool  = tanh(dense(x[:, 0]))                             (text [CLS])

As in ViLT, the transformer is the ViT's (its weights load from ``vision_pretrained``) and only
BERT's embeddings are used from a text checkpoint (``text_pretrained``). Tasks: vqa, itm, mlm,
classification, pretrain (ITM + MLM: no unimodal stage, so no ITC). There is no text-only stage:
``model.text_encoder`` is None; ``model.text_embeddings`` is the BERT embedding module.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mmfast.data.pack import concat_embed_packed
from mmfast.models.common import (FusionModel, FusionOutput, Pooler, ZooConfig, as_bool_mask, build_vit,
                                  load_bert_checkpoint, _strict_load, vit_block, check_bert_config)
from mmfast.models.packing import Layout, embed as embed_packed, is_packed, positions, rows_in_fused, twice
from mmfast.models.heads import MLMHead, check_labels, classifier_head, itm_labels, shifted_negatives


class SingleStreamModel(FusionModel):
    arch = "single_stream"
    tasks = ("vqa", "itm", "mlm", "classification", "pretrain")
    default_task = "vqa"

    def __init__(self, cfg: ZooConfig, task: str = "vqa", num_labels: Optional[int] = None, fused: bool = True,
                 backend="auto", size: str = "", packed: bool = False):
        super().__init__(cfg, task, fused, backend, size, packed)
        from transformers.models.bert.modeling_bert import BertEmbeddings

        if cfg.hidden_size != cfg.vision_width:
            raise ValueError(f"mmfast.models: single_stream needs hidden_size == vision_width (one transformer), "
                             f"got {cfg.hidden_size} and {cfg.vision_width}")
        self.num_labels = num_labels or cfg.num_labels
        self.bert_config = cfg.bert_config()
        self.text_embeddings = BertEmbeddings(self.bert_config)
        self.vision_encoder = build_vit(cfg, self.kernels)
        self.token_type_embeddings = nn.Embedding(2, cfg.hidden_size)  # modality: 0 text, 1 image
        self.pooler = Pooler(cfg.hidden_size)
        self.text_encoder = None  # no text-only stage in a single-stream model
        if task in ("mlm", "pretrain"):
            self.mlm_head = MLMHead(self.bert_config, self.text_embeddings.word_embeddings, self.kernels)
        if task in ("itm", "pretrain"):
            self.itm_head = classifier_head("itm", cfg.hidden_size, 2)
        if task in ("vqa", "classification"):
            self.classifier = classifier_head(task, cfg.hidden_size, self.num_labels)

    def load_pretrained(self, text_pretrained=None, vision_pretrained=None) -> None:
        if text_pretrained is not None:  # ViLT's recipe: BERT's embeddings only
            sd, conf = load_bert_checkpoint(text_pretrained)
            check_bert_config(conf, self.cfg, text_pretrained)
            emb = {k[len("embeddings."):]: v for k, v in sd.items() if k.startswith("embeddings.")}
            _strict_load(self.text_embeddings, emb, "text (BERT embeddings)", str(text_pretrained))
        super().load_pretrained(None, vision_pretrained)

    def encode(self, input_ids: Tensor, attention_mask, pixel_values: Tensor,
               token_type_ids: Optional[Tensor] = None):
        """Merged sequence after the transformer: (B, L_text + 1 + patches, D). Packed text
        (``attention_mask`` the Layout of ids (total,)) -> (packed fused rows (total_fused, D), their
        Layout): each sample's text, then its image tokens."""
        vit = self.vision_encoder
        patches = vit.patch_embed(pixel_values)
        if patches.dim() == 4:  # timm with dynamic_img_size keeps (B, H, W, C)
            patches = patches.flatten(1, 2)
        B = patches.shape[0]
        cls = vit.cls_token.expand(B, -1, -1)
        pos = vit.pos_embed[0]
        tt = self.token_type_embeddings.weight
        if is_packed(attention_mask):
            return self._encode_packed(input_ids, attention_mask, torch.cat([cls, patches], 1), pos, tt,
                                       token_type_ids)
        text = self.text_embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        x, mask = self.kernels.concat_embed(
            [text, cls, patches],
            type_embeddings=torch.stack([tt[0], tt[1], tt[1]]),
            pos_embeddings=[None, pos[:1], pos[1:]],
            dropout_p=self.cfg.hidden_dropout_prob if self.training else 0.0,
            masks=[as_bool_mask(attention_mask), None, None] if attention_mask is not None else None)
        return self._transformer(x, mask)

    def _transformer(self, x: Tensor, mask) -> Tensor:
        vit = self.vision_encoder
        x = vit.norm_pre(x)
        for blk in vit.blocks:
            x = vit_block(blk, x, mask)
        return vit.norm(x)

    def _encode_packed(self, input_ids: Tensor, layout: Layout, image: Tensor, pos: Tensor, tt: Tensor,
                       token_type_ids: Optional[Tensor]):
        text = embed_packed(self.text_embeddings, input_ids, layout, token_type_ids)
        # the eager twin runs the reference formula, as its padded concat_embed does
        backend = self.kernels.backend["concat_embed"] if self.fused else "torch"
        fused = concat_embed_packed(text, layout.cu_seqlens, image, type_embeddings=torch.stack([tt[0], tt[1]]),
                                    pos_embeddings=[None, pos], backend=backend,
                                    dropout_p=self.cfg.hidden_dropout_prob if self.training else 0.0)
        fused_layout = Layout(fused.cu_seqlens, fused.max_seqlen, positions(fused.cu_seqlens))
        return self._transformer(fused.values, fused_layout), fused_layout

    def _encode_with_text(self, input_ids: Tensor, mask, pixel_values: Tensor, token_type_ids=None):
        """-> (merged sequence, its text tokens: (B, Lt, D) or packed rows (total_text, D), the
        sequence's mask for the pooler: None or the packed Layout)."""
        if is_packed(mask):
            x, fused_layout = self.encode(input_ids, mask, pixel_values, token_type_ids)
            return x, x[rows_in_fused(mask, fused_layout)], fused_layout
        x = self.encode(input_ids, mask, pixel_values, token_type_ids)
        return x, x[:, :input_ids.shape[1]], None

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, pixel_values: Tensor = None,
                labels: Optional[Tensor] = None, mlm_labels: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None) -> FusionOutput:
        if pixel_values is None:
            raise ValueError("mmfast.models: single_stream needs 'pixel_values'")
        B = pixel_values.shape[0]
        input_ids, mask, token_type_ids, labels, mlm_labels = self._text_batch(
            input_ids, attention_mask, token_type_ids, cu_seqlens, max_seqlen, B, labels, mlm_labels)
        k, task = self.kernels, self.task

        if task == "pretrain":
            if mlm_labels is None:
                raise ValueError("mmfast.models: task 'pretrain' needs 'mlm_labels' (-100 = not masked)")
            # ITM: positives and shifted in-batch negatives in one batch of 2B
            ids2, mask2 = twice(input_ids, mask)
            pix2 = torch.cat([pixel_values, shifted_negatives(pixel_values)])
            x, _, pool_mask = self._encode_with_text(ids2, mask2, pix2)
            itm_logits = self.itm_head(self.pooler(x, pool_mask))
            loss_itm = k.cross_entropy(itm_logits, itm_labels(B, x.device))
            # MLM: masked text with its own image
            xm, text, _ = self._encode_with_text(self._mask_for_mlm(input_ids, mlm_labels), mask, pixel_values)
            loss_mlm = self.mlm_head.loss(text, mlm_labels, self.cfg.label_smoothing)
            return FusionOutput(loss=loss_itm + loss_mlm, loss_itm=loss_itm, loss_mlm=loss_mlm, itm_logits=itm_logits,
                                last_hidden_state=xm)
        x, text, pool_mask = self._encode_with_text(input_ids, mask, pixel_values, token_type_ids)
        if task == "mlm":
            if labels is None:
                return FusionOutput(logits=self.mlm_head.logits(text), last_hidden_state=x)
            loss = self.mlm_head.loss(text, labels, self.cfg.label_smoothing)
            return FusionOutput(loss=loss, loss_mlm=loss, last_hidden_state=x)
        pooled = self.pooler(x, pool_mask)
        head = self.itm_head if task == "itm" else self.classifier
        logits = head(pooled)
        check_labels(labels, task, B)
        loss = None if labels is None else k.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
        return FusionOutput(loss=loss, logits=logits, itm_logits=logits if task == "itm" else None,
                            last_hidden_state=x, pooled_output=pooled)
