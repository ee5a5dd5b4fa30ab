"""Reference variable-length attention (flash-attn's packed layout), one eager attention per sequence.

q ``(total_q, H, D)``, k/v ``(total_k, H, Dv)``; sequence ``b`` owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``
of q and ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k and v. Semantics of :mod:`mmfast.reference.attention`
per sequence: causal aligned bottom-right, a sequence without keys gives zeros, one without queries
contributes nothing (its keys get zero gradients).

Dropout follows the generator contract of :mod:`mmfast.reference.dropout` with, for packed
sequences, batch-head ``bh = b * H + h`` (``b`` the sequence's index in the batch), query row ``i``
and key column ``j`` counted *within* the sequence: sequence ``b``'s mask is the padded op's mask of
batch item ``b`` restricted to its (Lq_b, Lk_b) corner, so a batch of equal lengths gets exactly
the mask of the padded op for the same seed.
"""

import numpy as np
import torch

from mmfast.reference.attention import attention
from mmfast.reference.dropout import dropout_threshold, dropout_words


def to_heads_first(x: torch.Tensor) -> torch.Tensor:
    """(L, H, D) rows of one sequence -> a (1, H, L, D) view, attention's layout."""
    return x.transpose(0, 1).unsqueeze(0)


def sequence_keep_mask(seed: int, b: int, H: int, Lq: int, Lk: int, p: float) -> torch.Tensor:
    """Bool (1, H, Lq, Lk): the keep mask of packed sequence ``b`` (True = kept)."""
    words = dropout_words(int(seed), H, Lq, Lk, first_bh=b * H)
    return torch.from_numpy(words >= np.uint64(dropout_threshold(p)))[None]


def _dropped_attention(q, k, v, keep, causal, scale, p):
    """Attention of one sequence with the given keep mask: the reference's probabilities (read
    through v = I, exact), kept ones scaled by 1 / (1 - p), times v."""
    eye = torch.eye(k.shape[-2], dtype=q.dtype, device=q.device).expand(*k.shape[:-1], k.shape[-2])
    probs = attention(q, k, eye, causal=causal, scale=scale)
    return (probs * keep.to(device=q.device, dtype=q.dtype) / (1.0 - p)) @ v


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None, dropout_p=0.0, seed=None):
    """``seed``: int64 tensor of one element (or int) for dropout_p > 0; None draws one from torch's
    generator on q's device."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if dropout_p > 0 and seed is None:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)
    seed = int(seed.reshape(-1)[0]) if isinstance(seed, torch.Tensor) else seed
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    H = q.shape[1]
    outs = []
    for b in range(len(cq) - 1):
        qs, ks, vs = (to_heads_first(t[c[b]:c[b + 1]]) for t, c in ((q, cq), (k, ck), (v, ck)))
        if dropout_p > 0:
            keep = sequence_keep_mask(seed, b, H, qs.shape[2], ks.shape[2], dropout_p)
            o = _dropped_attention(qs, ks, vs, keep, causal, scale, dropout_p)
        else:
            o = attention(qs, ks, vs, causal=causal, scale=scale)
        outs.append(o[0].transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape[:-1] + v.shape[-1:])
    return torch.cat(outs, 0)
