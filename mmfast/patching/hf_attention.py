"""Hugging Face models on the attention registry (BERT and every model calling
``ALL_ATTENTION_FUNCTIONS.get_interface``): the ``"mmfast"`` attention implementation.

Two registrations, both under the name ``"mmfast"`` (ENGINEERING.md section 7: registering only
the attention function makes HF pass no mask at all):

* ``AttentionMaskInterface``: :func:`mmfast_mask` builds the 4-D bool mask HF's SDPA path would
  build and tags it with its decomposition (key padding mask + causal flag) so the attention
  function needs no inspection. Mask patterns it cannot describe that way (sliding windows, packed
  sequences, custom ``and/or`` mask functions, cache offsets that are not bottom-right) are built
  by HF's own ``sdpa_mask``, untagged.
* ``AttentionInterface``: :func:`mmfast_attention_forward` calls ``mmfast.ops.attention`` with the
  backend the model was patched with (``module._mmfast_backend``, default "auto"). Any call it
  cannot express exactly (an untagged mask that is not padding/causal, attention weights asked
  for, softcap, sinks, position biases, paged caches, ...) runs the model's own eager attention
  for that call, with the mask converted to the additive form eager expects; each reason is
  warned about once and counted in :func:`fallback_counts`. Packed sequences (HF's
  ``cu_seq_lens_q/k`` kwargs, as its FlashAttention-2 path takes them) run
  ``mmfast.ops.attention_varlen``; what that cannot do raises instead (eager would mix sequences).
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from typing import Optional

import torch
from torch import Tensor

from mmfast import ops
from mmfast.patching import masks as _masks

NAME = "mmfast"
BACKEND_ATTR = "_mmfast_backend"
_fallbacks: Counter = Counter()

# kwargs HF passes that change the math in ways mmfast.ops.attention does not do: run eager then.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "sliding_window", "cache", "attention_bias",
                       "head_mask", "alibi")


def fallback_counts() -> dict:
    """How many attention calls ran the eager path instead of mmfast, per reason (this process)."""
    return dict(_fallbacks)


def _fallback(reason: str, module, query, key, value, attention_mask, scaling, dropout, kwargs):
    if reason not in _fallbacks:
        warnings.warn(f"mmfast: attention in {type(module).__name__} runs HF's eager path for calls where {reason}",
                      RuntimeWarning, stacklevel=3)
    _fallbacks[reason] += 1
    model_module = sys.modules.get(type(module).__module__)
    eager = getattr(model_module, "eager_attention_forward", None)
    if eager is not None:
        return eager(module, query, key, value, _masks.additive(attention_mask, query.dtype), scaling=scaling,
                     dropout=dropout, **kwargs)
    return _transformers()["sdpa_attention_forward"](module, query, key, value, attention_mask, dropout=dropout,
                                                     scaling=scaling, **kwargs)


# HF's names for packed sequences (FlashAttentionKwargs): rows of a (1, total, ...) batch, sequence
# b = rows cu_seq_lens[b]:cu_seq_lens[b + 1]. Passed by mmfast's unpadded BERT encoder (hf_unpad.py)
# and by HF's DataCollatorWithFlattening.
_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _varlen_forward(module, query: Tensor, key: Tensor, value: Tensor, scaling: Optional[float], dropout: float,
                    kwargs: dict):
    """Packed sequences through ``mmfast.ops.attention_varlen``. No eager fallback here: HF's eager
    attention would let the packed sequences see each other, so what it cannot do raises."""
    why = [f"'{n}' is given" for n in _UNSUPPORTED_KWARGS if kwargs.get(n) is not None]
    if kwargs.get("output_attentions"):
        why.append("attention weights are requested")
    if query.dim() != 4 or query.shape[0] != 1 or key.shape[0] != 1 or query.shape[1] % key.shape[1] != 0:
        why.append(f"q/k are not (1, H, total, D) with grouped heads (got {tuple(query.shape)}, {tuple(key.shape)})")
    if why:
        raise ValueError(f"mmfast: attention in {type(module).__name__} got packed sequences (cu_seq_lens_q/k) but "
                         f"{'; '.join(why)}: not supported")
    if key.shape[1] != query.shape[1]:  # grouped-query attention
        rep = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    is_causal = kwargs.get("is_causal")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    cu_q, cu_k = (kwargs[n].to(torch.int32) for n in ("cu_seq_lens_q", "cu_seq_lens_k"))
    # (1, H, total, D) -> (total, H, D): for HF's q/k/v (a head-split view of (1, total, H*D)) a view
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = ops.attention_varlen(q, k, v, cu_q, cu_k, int(kwargs["max_length_q"]), int(kwargs["max_length_k"]),
                               causal=causal, scale=scaling, dropout_p=float(dropout),
                               backend=getattr(module, BACKEND_ATTR, "auto"))
    return out[None], None


def mmfast_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Optional[Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                             **kwargs):
    """HF attention-interface function: q, k, v (B, H, L, D) -> (out (B, Lq, H, D) contiguous, None).
    Packed sequences (HF's ``cu_seq_lens_q/k``, ``max_length_q/k`` kwargs, B = 1, no mask) run
    ``mmfast.ops.attention_varlen``."""
    if attention_mask is None and all(kwargs.get(n) is not None for n in _VARLEN_KWARGS):
        # (with a mask, e.g. the one HF builds from packed position_ids, the mask says it all)
        return _varlen_forward(module, query, key, value, scaling, dropout, kwargs)
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            return _fallback(f"'{name}' is given", module, query, key, value, attention_mask, scaling, dropout, kwargs)
    if kwargs.get("output_attentions"):
        return _fallback("attention weights are requested", module, query, key, value, attention_mask, scaling,
                         dropout, kwargs)
    if query.dim() != 4 or key.dim() != 4 or key.shape[1] == 0 or query.shape[1] % key.shape[1] != 0:
        return _fallback("q/k/v are not (B, H, L, D) with grouped heads", module, query, key, value, attention_mask,
                         scaling, dropout, kwargs)
    B, H, Lq, _ = query.shape
    Lk = key.shape[2]
    if attention_mask is None:
        # HF's SDPA convention for an absent mask: causal iff the module says so and Lq > 1.
        is_causal = kwargs.get("is_causal")
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)) and Lq > 1
        if causal and Lq != Lk:  # SDPA aligns is_causal top-left (it crops keys); mmfast is bottom-right
            return _fallback("causal without a mask and Lq != Lk", module, query, key, value, attention_mask,
                             scaling, dropout, kwargs)
        kpm = None
    else:
        try:
            kpm, causal = _masks.decompose(attention_mask, B, Lq, Lk)
        except _masks.NotExpressible as e:
            return _fallback(f"the mask is not expressible ({e})", module, query, key, value, attention_mask,
                             scaling, dropout, kwargs)
    if key.shape[1] != H:  # grouped-query attention: share each key/value head across its group
        rep = H // key.shape[1]
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    backend = getattr(module, BACKEND_ATTR, "auto")
    out = ops.attention(query, key, value, key_padding_mask=kpm, causal=causal, scale=scaling,
                        dropout_p=float(dropout), backend=backend)
    return out.transpose(1, 2).contiguous(), None


def mmfast_mask(batch_size: int, q_length: Optional[int] = None, kv_length: Optional[int] = None, q_offset=0,
                kv_offset: int = 0, mask_function=None, attention_mask: Optional[Tensor] = None,
                allow_is_causal_skip: bool = True, allow_is_bidirectional_skip: bool = False, use_vmap: bool = False,
                device="cpu", **kwargs):
    """HF mask-interface function: a (B, 1, Lq, Lk) bool mask (True = attend) tagged with its
    decomposition, or None for full bidirectional attention without padding when HF allows it."""
    mu = _transformers()["masking_utils"]

    if q_length is None:
        # Older transformers describe queries by `cache_position` instead of (q_length, q_offset):
        # build HF's exact SDPA mask (never skipped); attention decomposes it once per forward.
        sdpa = mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"]
        return sdpa(batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset,
                    mask_function=mask_function if mask_function is not None else mu.causal_mask_function,
                    attention_mask=attention_mask, allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                    use_vmap=use_vmap, device=device, **kwargs)
    if mask_function is None:
        mask_function = mu.causal_mask_function
    causal = mask_function is mu.causal_mask_function
    plain = causal or mask_function is getattr(mu, "bidirectional_mask_function", None)
    # Causal is expressible when key j is visible to query i iff j + kv_offset <= i + q_offset,
    # i.e. bottom-right alignment: q_offset - kv_offset == kv_length - q_length.
    offsets_ok = isinstance(q_offset, int) and isinstance(kv_offset, int) and (
        not causal or q_offset - kv_offset == kv_length - q_length)
    if not (plain and offsets_ok and not use_vmap):
        return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                            allow_is_causal_skip=False, allow_is_bidirectional_skip=False, use_vmap=use_vmap,
                            device=device)
    kpm = None
    if attention_mask is not None:
        # The 2-D mask covers keys [0, kv_offset + kv_length); shorter ones (static caches) are
        # padded with "masked", as HF does.
        end = kv_offset + kv_length
        padding = attention_mask
        if padding.shape[-1] < end:
            padding = torch.nn.functional.pad(padding, (0, end - padding.shape[-1]))
        kpm = padding[:, kv_offset:end].to(device=device, dtype=torch.bool)
        if kpm.shape[0] != batch_size:
            kpm = kpm.expand(batch_size, kv_length)
        kpm = kpm.contiguous()
    if not causal and kpm is None and allow_is_bidirectional_skip:
        return None
    # Cheap views where possible: attention never reads this tensor when the tag is valid, but
    # other model code may look at it, so it holds the true pattern.
    if causal:
        keep = _masks.causal_keep(q_length, kv_length, device)[None, None]
        mask = (keep & kpm[:, None, None, :]) if kpm is not None else keep.expand(batch_size, 1, q_length, kv_length)
    elif kpm is not None:
        mask = kpm[:, None, None, :].expand(batch_size, 1, q_length, kv_length)
    else:
        mask = torch.ones((), dtype=torch.bool, device=device).expand(batch_size, 1, q_length, kv_length)
    return _masks.tag(mask, kpm, causal)


_registered = False
# The transformers pieces the functions above use, imported once outside them (register() does it
# at patch time): torch 2.11's dynamo refuses an import from transformers' lazy top-level module
# inside a compiled forward ("Bad import result").
_hf: dict = {}


def _transformers() -> dict:
    if not _hf:
        from transformers import masking_utils
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _hf.update(masking_utils=masking_utils, sdpa_attention_forward=sdpa_attention_forward)
    return _hf


def register() -> None:
    """Registers "mmfast" in HF's AttentionInterface and AttentionMaskInterface (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    _transformers()

    AttentionInterface.register(NAME, mmfast_attention_forward)
    AttentionMaskInterface.register(NAME, mmfast_mask)
    _registered = True


def uses_attention_registry(cls) -> bool:
    """Whether a PreTrainedModel class routes its attention through ``ALL_ATTENTION_FUNCTIONS``
    (HF's own heuristic: its modeling file calls ``get_interface``)."""
    if not getattr(cls, "_supports_attention_backend", False):
        return False
    can = getattr(cls, "_can_set_attn_implementation", None)
    try:
        return bool(can()) if can is not None else False
    except Exception:  # noqa: BLE001 - never raise on an unfamiliar model
        return False


def attention_modules(model: torch.nn.Module, config) -> list:
    """(qualified name, module) of the attention modules that will call the interface for ``config``:
    modules holding that config whose class is defined in a file that calls ``get_interface``."""
    out = []
    for name, m in model.named_modules():
        if getattr(m, "config", None) is config and "attention" in type(m).__name__.lower():
            src_mod = sys.modules.get(type(m).__module__)
            if src_mod is not None and hasattr(src_mod, "ALL_ATTENTION_FUNCTIONS"):
                out.append((name, m))
    return out
