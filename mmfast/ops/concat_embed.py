"""Feature concatenation (+ type/position embeddings + LayerNorm + dropout): public API and
backend dispatch.

Faces: reference ``mmfast/reference/concat_embed.py``; Triton, CUDA and CPU faces are added by the
concat_embed issue under the same naming scheme.
"""

from __future__ import annotations

from mmfast import dispatch
from mmfast import reference as _ref

dispatch.register_op(dispatch.OpSpec(name="concat_embed"))


def concat_embed(features, *, type_embeddings=None, pos_embeddings=None, ln_weight=None, ln_bias=None,
                 eps=1e-12, dropout_p=0.0, masks=None, backend="auto"):
    """Returns ``(out (B, sum L_m, D), mask (B, sum L_m) bool or None)``."""
    f0 = features[0]
    dispatch.resolve("concat_embed", backend, f0.device.type, f0.dtype)
    return _ref.concat_embed(features, type_embeddings=type_embeddings, pos_embeddings=pos_embeddings,
                             ln_weight=ln_weight, ln_bias=ln_bias, eps=eps, dropout_p=dropout_p, masks=masks)
