"""Attention (cross-modal and self): public API and backend dispatch.

Faces: reference ``mmfast/reference/attention.py``; Triton, CUDA and CPU faces are added by the
attention issue under the same naming scheme.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from mmfast import dispatch
from mmfast import reference as _ref

dispatch.register_op(dispatch.OpSpec(name="attention"))


def attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None, causal: bool = False,
              scale: Optional[float] = None, dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """Scaled dot-product attention, (B, H, L, D) layout. Fully masked query rows give zeros;
    causal with Lq != Lk is aligned bottom-right."""
    dispatch.resolve("attention", backend, q.device.type, q.dtype)
    return _ref.attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal, scale=scale,
                          dropout_p=dropout_p)
