"""Reference attention (eager matmul -> softmax -> matmul) with mmfast's semantics:

- ``key_padding_mask``: bool (B, Lk), True = the key takes part;
- a query row whose keys are all masked returns zeros (SDPA returns NaN there);
- ``causal`` with Lq != Lk is aligned bottom-right: query i sees keys j <= i + Lk - Lq.
"""

import torch
import torch.nn.functional as F


def attention_mask(key_padding_mask, causal, Lq, Lk, device):
    """Bool mask broadcastable to (B, H, Lq, Lk), True = attend; None when nothing is masked."""
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].bool()
    if causal:
        i = torch.arange(Lq, device=device)[:, None]
        j = torch.arange(Lk, device=device)[None, :]
        c = j <= i + (Lk - Lq)
        mask = c if mask is None else mask & c
    return mask


def attention(q, k, v, *, key_padding_mask=None, causal=False, scale=None, dropout_p=0.0):
    Lq, Lk = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    mask = attention_mask(key_padding_mask, causal, Lq, Lk, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
        # A fully masked row would give softmax NaN (and NaN gradients); mmfast defines its
        # output and gradients as zeros: give it finite scores, then zero its probabilities.
        any_key = mask.any(-1, keepdim=True)
        scores = scores.masked_fill(~any_key, 0.0)
    # softmax in float32 for half inputs, but never below the input precision (float64 stays float64)
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    if mask is not None:
        probs = probs.masked_fill(~any_key, 0.0)
    probs = probs.to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p, training=True)
    return probs @ v


def sdpa_attention(q, k, v, *, key_padding_mask=None, causal=False, scale=None, dropout_p=0.0):
    """The same semantics through ``F.scaled_dot_product_attention`` (fused flash / memory-efficient /
    cuDNN kernels on a GPU): what ``backend="torch"``, and so a safe ``auto``, runs on CUDA tensors.
    Rows without keys get every key (finite), then zeros, as above; dropout is SDPA's own."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    if key_padding_mask is None and (not causal or Lq == Lk):  # SDPA's causal is top-left = bottom-right here
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, dropout_p=dropout_p)
    mask = attention_mask(key_padding_mask, causal, Lq, Lk, q.device)
    any_key = mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~any_key, scale=scale, dropout_p=dropout_p)
    return out.masked_fill(~any_key, 0.0)
