"""Attention (cross-modal and self): public API, backend dispatch, custom-op, fake and autograd
registrations.

Faces: reference ``mmfast/reference/attention.py`` ("torch"), Triton ``mmfast/triton/attention.py``,
CUDA ``csrc/cuda/attention.cu`` (schema ``csrc/attention.cpp``), and a Python CPU face here (SDPA
forward, explicit recomputing backward). Every non-reference face implements one contract::

    forward(q, k, v, key_padding_mask, seed, causal, scale, dropout_p) -> (out, lse)
    backward(grad_out, q, k, v, out, lse, key_padding_mask, seed, causal, scale, dropout_p)
        -> (dq, dk, dv)

q (B, H, Lq, D), k/v (B, H, Lk, D) with any strides; out contiguous (B, H, Lq, D); lse float32
(B, H, Lq) in base 2 (the CPU face saves none: (0,)); seed an int64 tensor of one element drawn
from torch's generator on the inputs' device (dropout only). The backward recomputes the softmax
(from lse) and regenerates the dropout mask from the seed, so nothing of size Lq x Lk is saved.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast import _extension, _provenance, dispatch
from mmfast import reference as _ref
from mmfast.reference.attention import attention_mask as _dense_mask

dispatch.register_op(dispatch.OpSpec(
    name="attention",
    cpp_kernel="attention_forward",
    triton_module="mmfast.triton.attention",
    cpu_python=True,
    dtypes={
        "torch": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
        "cpu": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
        "triton": (torch.float32, torch.float16, torch.bfloat16),
        "cuda": (torch.float16, torch.bfloat16),
    },
))

MAX_HEAD_DIM = 128


# ---------------------------------------------------------------------------------------------
# CPU face: SDPA for the forward (with mmfast's semantics patched in), explicit math backward.

def _keep_mask_cpu(seed: Tensor, shape, p: float, device) -> Tensor:
    """The dropout keep mask of the CPU face, a pure function of the seed (the backward redraws it)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed.reshape(-1)[0]))
    return (torch.rand(shape, generator=gen, dtype=torch.float32) >= p).to(device)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cpu_probs(q: Tensor, k: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    """softmax(q k^T scale) in the compute dtype, masked, fully masked rows = 0."""
    ct = _compute_dtype(q.dtype)
    s = (q.to(ct) @ k.to(ct).transpose(-2, -1)) * scale
    if mask is None:
        return torch.softmax(s, -1)
    any_key = mask.any(-1, keepdim=True)
    s = s.masked_fill(~mask, float("-inf")).masked_fill(~any_key, 0.0)
    return torch.softmax(s, -1).masked_fill(~any_key, 0.0)


def cpu_forward(q, k, v, key_padding_mask, seed, causal, scale, dropout_p):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    lse = q.new_empty((0,), dtype=torch.float32)
    if Lq == 0 or B * H == 0:
        return q.new_empty((B, H, Lq, D)), lse
    if dropout_p > 0:
        mask = _dense_mask(key_padding_mask, causal, Lq, Lk, q.device)
        probs = _cpu_probs(q, k, mask, scale)
        keep = _keep_mask_cpu(seed, (B, H, Lq, Lk), dropout_p, q.device)
        probs = probs * keep / (1.0 - dropout_p)
        return (probs @ v.to(probs.dtype)).to(q.dtype).contiguous(), lse
    if key_padding_mask is None and (not causal or Lq == Lk):
        # no row can be fully masked here: plain SDPA (its causal mask is top-left = bottom-right)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        return out.contiguous(), lse
    mask = _dense_mask(key_padding_mask, causal, Lq, Lk, q.device)  # (B|1, 1, Lq|1, Lk)
    any_key = mask.any(-1, keepdim=True)
    # SDPA gives NaN for a row without keys; let such rows see every key (finite), then zero them.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~any_key, scale=scale)
    return out.masked_fill(~any_key, 0.0).contiguous(), lse


def cpu_backward(grad_out, q, k, v, out, lse, key_padding_mask, seed, causal, scale, dropout_p):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if Lq == 0 or Lk == 0 or B * H == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    ct = _compute_dtype(q.dtype)
    mask = _dense_mask(key_padding_mask, causal, Lq, Lk, q.device)
    p = _cpu_probs(q, k, mask, scale)
    do = grad_out.to(ct)
    dp = do @ v.to(ct).transpose(-2, -1)  # d loss / d (dropped probabilities)
    if dropout_p > 0:
        z = _keep_mask_cpu(seed, (B, H, Lq, Lk), dropout_p, q.device).to(ct) / (1.0 - dropout_p)
        pd = p * z
        dp = dp * z
    else:
        pd = p
    dv = pd.transpose(-2, -1) @ do
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # softmax backward; masked entries have p = 0
    dq = (ds @ k.to(ct)) * scale
    dk = (ds.transpose(-2, -1) @ q.to(ct)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) with fake and autograd registrations.

def _face(backend: str):
    if backend == "cpu":
        return cpu_forward, cpu_backward
    if backend == "cuda":
        fwd, bwd = _extension.op("attention_forward"), _extension.op("attention_backward")

        def cuda_forward(q, k, v, key_padding_mask, seed, causal, scale, dropout_p):
            return fwd(q, k, v, key_padding_mask, causal, scale)

        def cuda_backward(grad_out, q, k, v, out, lse, key_padding_mask, seed, causal, scale, dropout_p):
            return bwd(grad_out, q, k, v, out, lse, key_padding_mask, causal, scale)

        return cuda_forward, cuda_backward
    mod = dispatch.triton_face("attention")
    return mod.attention_forward, mod.attention_backward


@torch.library.custom_op("mmfast::attention_forward", mutates_args=())
def _attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], seed: Optional[Tensor],
                      causal: bool, scale: float, dropout_p: float, backend: str) -> tuple[Tensor, Tensor]:
    _provenance.record("attention", backend, "forward")
    return _face(backend)[0](q, k, v, key_padding_mask, seed, causal, scale, dropout_p)


@_attention_fwd_op.register_fake
def _(q, k, v, key_padding_mask, seed, causal, scale, dropout_p, backend):
    B, H, Lq, D = q.shape
    lse_shape = (0,) if backend == "cpu" else (B, H, Lq)
    return q.new_empty((B, H, Lq, D)), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("mmfast::attention_backward", mutates_args=())
def _attention_bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      key_padding_mask: Optional[Tensor], seed: Optional[Tensor], causal: bool, scale: float,
                      dropout_p: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    _provenance.record("attention", backend, "backward")
    return _face(backend)[1](grad_out, q, k, v, out, lse, key_padding_mask, seed, causal, scale, dropout_p)


@_attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, seed, causal, scale, dropout_p, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, seed, causal, scale, dropout_p, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, seed)
    ctx.args = (causal, scale, dropout_p, backend)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_padding_mask, seed = ctx.saved_tensors
    causal, scale, dropout_p, backend = ctx.args
    dq, dk, dv = _attention_bwd_op(grad_out, q, k, v, out, lse, key_padding_mask, seed, causal, scale,
                                   dropout_p, backend)
    return dq, dk, dv, None, None, None, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API

def _check_args(q, k, v, key_padding_mask, scale, dropout_p, backend) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"mmfast.attention: argument '{name}' must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"mmfast.attention: argument '{name}' must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"mmfast.attention: argument '{name}' must be floating point, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"mmfast.attention: argument '{name}' has dtype {t.dtype}, q has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"mmfast.attention: argument '{name}' is on {t.device}, q is on {q.device}")
    B, H, Lq, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"mmfast.attention: argument 'k' must have shape ({B}, {H}, Lk, {D}) to match q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"mmfast.attention: argument 'v' must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if backend != "torch" and (D % 8 != 0 or not 8 <= D <= MAX_HEAD_DIM):
        raise ValueError(f"mmfast.attention: the head dim D (last dim of argument 'q') must be a multiple of 8 "
                         f"between 8 and {MAX_HEAD_DIM}, got {D} (backend='torch' takes any D)")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(f"mmfast.attention: argument 'key_padding_mask' must be a bool tensor (True = attend), "
                            f"got {getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if tuple(key_padding_mask.shape) != (B, k.shape[2]):
            raise ValueError(f"mmfast.attention: argument 'key_padding_mask' must have shape (B, Lk) = "
                             f"({B}, {k.shape[2]}), got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"mmfast.attention: argument 'key_padding_mask' is on {key_padding_mask.device}, "
                             f"q is on {q.device}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"mmfast.attention: argument 'dropout_p' must be in [0, 1), got {dropout_p}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"mmfast.attention: argument 'scale' must be a float or None, got {type(scale).__name__}")


def attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None, causal: bool = False,
              scale: Optional[float] = None, dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """Scaled dot-product attention in SDPA's (B, H, L, D) layout, fused.

    Equals ``F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask[:, None, None, :],
    dropout_p=dropout_p, scale=scale)`` except that a query row whose keys are all masked returns
    zeros (and zero gradients; so does every row when Lk = 0) and ``causal`` with Lq != Lk is
    aligned bottom-right (query i sees keys j <= i + Lk - Lq). ``key_padding_mask``: bool (B, Lk),
    True = the key takes part. Dropout draws its seed from torch's generator on q's device
    (``torch.manual_seed`` reproduces it).
    """
    _check_args(q, k, v, key_padding_mask, scale, dropout_p, backend)
    unsupported = (("cuda", "dropout is done by the Triton face"),) if dropout_p > 0 else ()
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:  # triton #11584: garbage, not an error
        unsupported += (("triton", "bfloat16 tl.dot is broken in the Triton interpreter"),)
    be = dispatch.resolve("attention", backend, q.device.type, q.dtype, unsupported)
    if be == "torch":
        return _provenance.reference_ran("attention", _ref.attention(
            q, k, v, key_padding_mask=key_padding_mask, causal=causal, scale=scale, dropout_p=dropout_p))
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    seed = None
    if dropout_p > 0:
        # drawn from the default generator of q's device, so torch.manual_seed reproduces the mask
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)
    out, _ = _attention_fwd_op(q, k, v, key_padding_mask, seed, bool(causal), scale, float(dropout_p), be)
    return out
