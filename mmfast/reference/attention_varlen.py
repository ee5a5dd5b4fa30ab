"""Reference variable-length attention (flash-attn's packed layout), one eager attention per sequence.

q ``(total_q, H, D)``, k/v ``(total_k, H, Dv)``; sequence ``b`` owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``
of q and ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k and v. Semantics of :mod:`mmfast.reference.attention`
per sequence: causal aligned bottom-right, a sequence without keys gives zeros, one without queries
contributes nothing (its keys get zero gradients).
"""

import torch

from mmfast.reference.attention import attention


def to_heads_first(x: torch.Tensor) -> torch.Tensor:
    """(L, H, D) rows of one sequence -> a (1, H, L, D) view, attention's layout."""
    return x.transpose(0, 1).unsqueeze(0)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None, dropout_p=0.0):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for b in range(len(cq) - 1):
        qs, ks, vs = (to_heads_first(t[c[b]:c[b + 1]]) for t, c in ((q, cq), (k, ck), (v, ck)))
        o = attention(qs, ks, vs, causal=causal, scale=scale, dropout_p=dropout_p)
        outs.append(o[0].transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape[:-1] + v.shape[-1:])
    return torch.cat(outs, 0)
