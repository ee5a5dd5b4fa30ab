"""The fused / eager switch of the zoo: every model holds one :class:`Kernels`, shared by all of its
modules. ``fused=True`` calls ``mmfast.ops`` (on the CPU the attention face directly, without the
custom-op dispatch); ``fused=False`` runs plain eager PyTorch: matmul-softmax-matmul attention,
``torch.cat`` + LayerNorm, ``F.cross_entropy`` on the full logits. The module tree and parameter
names are identical either way, so a state_dict moves freely between the two twins."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast import dispatch, ops, reference  # reference: the eager formulas the eager twin runs
from mmfast.ops.attention import cpu_attention
from mmfast.reference.attention_varlen import attention_varlen as reference_attention_varlen

OP_NAMES = ("attention", "concat_embed", "cross_entropy", "linear_cross_entropy", "contrastive_loss")

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

    # -- attention over packed rows: q (total_q, H, D), k and v (total_k, H, D); the layouts
    # (mmfast.models.packing.Layout) say which rows belong to which sample. The "attention"
    # backend choice applies to it too (one setting for the padded and the packed attention).
    def attention_varlen(self, q: Tensor, k: Tensor, v: Tensor, q_layout, k_layout, causal: bool = False,
                         scale: Optional[float] = None, dropout_p: float = 0.0) -> Tensor:
        if self.fused:
            return ops.attention_varlen(q, k, v, q_layout.cu_seqlens, k_layout.cu_seqlens, q_layout.max_seqlen,
                                        k_layout.max_seqlen, causal=causal, scale=scale, dropout_p=dropout_p,
                                        backend=self.backend["attention"])
        return reference_attention_varlen(q, k, v, q_layout.cu_seqlens, k_layout.cu_seqlens, causal=causal,
                                          scale=scale, dropout_p=dropout_p)

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

    # Set by mmfast.train.Trainer around DDP training forwards: the contrastive (itc) loss then takes its
    # negatives from every process's batch (mmfast/ops/contrastive_gather.py, one face: torch tiles), in
    # both twins.
    gather_contrastive = False

    def contrastive_loss(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                         label_smoothing: float = 0.0) -> Tensor:
        if self.gather_contrastive:
            dt = torch.promote_types(image_features.dtype, text_features.dtype)
            return ops.contrastive_loss(image_features.to(dt), text_features.to(dt), logit_scale,
                                        label_smoothing=label_smoothing, gather=True)
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
