"""Turning the attention masks stock models pass around into what ``mmfast.ops.attention`` takes:
a bool ``key_padding_mask`` (B, Lk) (True = attend) and a ``causal`` flag (bottom-right aligned).

Masks come in three forms:

* **tagged**: the bool (B, 1, Lq, Lk) masks built by mmfast's own mask function (registered as
  ``"mmfast"`` in Hugging Face's ``AttentionMaskInterface``) carry their decomposition in the
  attribute ``_mmfast_mask`` -- no inspection, no host sync.
* **foreign 4-D masks** (HF's eager additive masks, a user's prebuilt 4-D mask, timm masks):
  bool (True = attend) or additive float (0 = attend, <= -1e4 or -inf = masked). They are
  decomposed once per tensor object (one comparison and one host sync) and the result is cached
  on the tensor, keyed by its version counter so an in-place edit invalidates it.
* anything else (per-head masks, additive biases with other values, sliding windows, packed
  sequences, shapes we cannot match): :class:`NotExpressible`; callers then run the model's own
  eager attention for that call (never a silently wrong result).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

# Additive masks in the wild use finfo.min, -inf, or the old BERT -10000.0: exp() of any of
# them relative to a real score is exactly 0 in float32, so they all mean "masked".
_MASKED_AT_OR_BELOW = -1.0e4

TAG = "_mmfast_mask"
_CACHE = "_mmfast_decomposed"


class NotExpressible(Exception):
    """The mask is not 'key padding (+ causal)'; the reason is the message."""


def causal_keep(Lq: int, Lk: int, device) -> Tensor:
    """(Lq, Lk) bool, True where query i may see key j under bottom-right alignment."""
    i = torch.arange(Lq, device=device)[:, None]
    j = torch.arange(Lk, device=device)[None, :]
    return j <= i + (Lk - Lq)


def _version_of(mask: Tensor) -> Optional[int]:
    # Under torch.compile a tensor's version counter is an unbacked symbol: comparing two of them
    # is a data-dependent guard that fails fullgraph=True. A traced graph cannot edit the mask in
    # place between building it and reading its tag unnoticed by the graph, so None = "trust it".
    return None if torch.compiler.is_compiling() else mask._version


def tag(mask: Tensor, key_padding_mask: Optional[Tensor], causal: bool) -> Tensor:
    """Attaches the decomposition to a mask this package built."""
    setattr(mask, TAG, (key_padding_mask, bool(causal), _version_of(mask)))
    return mask


def decompose(mask: Optional[Tensor], B: int, Lq: int, Lk: int) -> Tuple[Optional[Tensor], bool]:
    """``(key_padding_mask (B, Lk) bool or None, causal)`` equivalent to ``mask`` for attention with
    ``B`` batch rows, ``Lq`` queries and ``Lk`` keys, or raises :class:`NotExpressible`.

    ``mask``: None, or a 2-D..4-D tensor broadcastable to (B, H, Lq, Lk) that is the same for every
    head. A fully masked query row is fine: mmfast returns zeros there (only padded positions can
    have one in the masks stock models build)."""
    if mask is None:
        return None, False
    if not isinstance(mask, Tensor):
        raise NotExpressible(f"mask of type {type(mask).__name__}")
    tagged = getattr(mask, TAG, None)
    if tagged is not None:
        kpm, causal, version = tagged
        if (version is None or version == _version_of(mask)) and (kpm is None or tuple(kpm.shape) == (B, Lk)):
            return kpm, causal
    cached = getattr(mask, _CACHE, None)
    if cached is not None and cached[0] == mask._version and cached[1] == (B, Lq, Lk):
        if cached[2] is None:
            raise NotExpressible(cached[4])
        return cached[2], cached[3]
    try:
        kpm, causal = _decompose_dense(mask, B, Lq, Lk)
    except NotExpressible as e:
        _cache(mask, (mask._version, (B, Lq, Lk), None, False, str(e)))
        raise
    _cache(mask, (mask._version, (B, Lq, Lk), kpm, causal, None))
    return kpm, causal


def _cache(mask: Tensor, value) -> None:
    try:
        setattr(mask, _CACHE, value)
    except (AttributeError, RuntimeError):  # e.g. tensors under tracing: just do not cache
        pass


def _decompose_dense(mask: Tensor, B: int, Lq: int, Lk: int) -> Tuple[Optional[Tensor], bool]:
    if torch.compiler.is_compiling():
        raise NotExpressible("inspecting a foreign mask's values is not possible while compiling")
    if mask.dim() < 2 or mask.dim() > 4:
        raise NotExpressible(f"{mask.dim()}-D mask")
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    b, h, lq, lk = m.shape
    if lk != Lk or lq not in (1, Lq) or b not in (1, B):
        raise NotExpressible(f"mask shape {tuple(mask.shape)} does not broadcast to ({B}, H, {Lq}, {Lk})")
    if h != 1:
        raise NotExpressible(f"per-head mask (shape {tuple(mask.shape)})")
    if m.dtype == torch.bool:
        keep = m
    elif m.is_floating_point():
        keep = m == 0
        masked = m <= _MASKED_AT_OR_BELOW
        if not bool((keep | masked).all()):
            raise NotExpressible("additive mask holds values other than 0 and a large negative number (a bias)")
    else:
        raise NotExpressible(f"mask of dtype {m.dtype}")
    keep = keep[:, 0]  # (b, lq, Lk)
    # The last query row sees every key under both patterns (bottom-right causal included), so it
    # is the key padding mask; then check the whole mask is padding, or padding & causal.
    kpm = keep[:, -1, :].expand(B, Lk)
    if bool((keep == kpm[:, None, :]).all()):
        causal = False
    elif lq == Lq and bool((keep == (kpm[:, None, :] & causal_keep(Lq, Lk, m.device))).all()):
        causal = True
    else:
        raise NotExpressible("mask is neither key padding nor key padding + causal (e.g. sliding window, "
                             "packed sequences, prefix-LM)")
    if bool(kpm.all()):
        kpm = None
    else:
        kpm = kpm.contiguous()
    return kpm, causal


def additive(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A bool mask (True = attend) as the additive float mask eager attention code expects."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)
