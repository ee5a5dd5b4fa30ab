"""Attention (cross-modal and self): public API, backend dispatch, custom-op, fake and autograd
registrations.

Faces: reference ``mmfast/reference/attention.py`` ("torch"), Triton ``mmfast/triton/attention.py``,
CUDA ``csrc/cuda/attention.cu`` (schema ``csrc/attention.cpp``), and the CPU face below (the C++
kernel ``csrc/cpu/attention.cpp``; ATen's CPU flash kernels only when the extension is not built).
Every non-reference face implements one contract::

    forward(q, k, v, key_padding_mask, seed, causal, scale, dropout_p) -> (out, lse)
    backward(grad_out, q, k, v, out, lse, key_padding_mask, seed, causal, scale, dropout_p)
        -> (dq, dk, dv)

q (B, H, Lq, D), k/v (B, H, Lk, D) with any strides; out (B, H, Lq, D), contiguous (the CPU face:
(B, Lq, H, D)-major); lse float32 (B, H, Lq) (base 2 in mmfast's kernels, natural log from ATen's;
only the same face's backward reads it); seed an int64 tensor of one element drawn
from torch's generator on the inputs' device (dropout only). The backward recomputes the softmax
(from lse) and regenerates the dropout mask from the seed, so nothing of size Lq x Lk is saved.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast import _extension, _provenance, dispatch
from mmfast import reference as _ref
from mmfast.ops._eager_path import plain_eager
from mmfast.reference.attention import attention_mask as _dense_mask
from mmfast.reference.attention import sdpa_attention as _sdpa_reference

# dtypes per face (attention_varlen's faces take the same)
DTYPES = {
    "torch": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "cpu": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float16, torch.bfloat16),
}

dispatch.register_op(dispatch.OpSpec(
    name="attention",
    cpp_kernel="attention_forward",
    triton_module="mmfast.triton.attention",
    cpu_python=True,
    dtypes=DTYPES,
))

MAX_HEAD_DIM = 128


# ---------------------------------------------------------------------------------------------
# CPU face: the C++ kernel csrc/cpu/attention.cpp (flash-style, register-tiled; its dropout mask is
# the Philox contract shared with the GPU faces). Measured against ATen's CPU flash kernels at the
# zoo's shapes (B8-16, H2-12, L7-237, D32-64, forward + backward, 2026-11-30, 2-core AMD EPYC):
# 1.2-2.7x faster with 2 threads; with 1 thread 1.1-1.3x at D64, 0.88-1.0x for some D32 backward
# shapes. When the extension is not built: ATen's kernels (given mmfast's masks) without dropout,
# and an explicit Python path with the same Philox mask for dropout, float64 and one key.
#
# Layouts: out and the gradients come back (B, Lq, H, D)-major (seen as (B, H, Lq, D)), lse
# (B, Lq, H)-major: what ATen's kernels produce, and what the model code wants (out.transpose(1, 2)
# is then contiguous). The fake registrations below state the same strides.

_aten_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_aten_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _blhd(x: Tensor) -> Tensor:
    """x (B, H, L, D) laid out (B, L, H, D)-major (a copy only when it is not already)."""
    if x.transpose(1, 2).is_contiguous():
        return x
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _aten_mask(key_padding_mask: Optional[Tensor], causal: bool, Lq: int, Lk: int, dtype: torch.dtype):
    """(additive mask for ATen's kernel or None, is_causal flag). ATen's causal is aligned top-left,
    mmfast's bottom-right: the two agree only when Lq == Lk. Rows without a visible key come out of
    ATen's kernels as zeros with zero gradients, which is mmfast's definition."""
    if key_padding_mask is None and (not causal or Lq == Lk):
        return None, causal
    memo = key_padding_mask is None or not key_padding_mask.is_inference()  # those have no version counter
    key = (id(key_padding_mask), key_padding_mask._version if key_padding_mask is not None and memo else 0, causal,
           Lq, Lk, dtype)
    hit = _mask_memo.get(key) if memo else None
    if hit is not None and hit[0] is key_padding_mask:
        return hit[1], False
    if key_padding_mask is not None and not causal:
        visible = key_padding_mask[:, None, None, :]
    else:
        visible = _dense_mask(key_padding_mask, causal, Lq, Lk,
                              "cpu" if key_padding_mask is None else key_padding_mask.device)
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
    # Every layer of a tower passes the same mask tensor, forward and backward: build its additive
    # form once. Entries hold the mask tensor itself, so an id is never reused while it is stored.
    if memo:
        if len(_mask_memo) >= 8:
            _mask_memo.pop(next(iter(_mask_memo)))
        _mask_memo[key] = (key_padding_mask, mask)
    return mask, False


_mask_memo: dict = {}


def _needs_own_kernel(q: Tensor, k: Tensor, dropout_p: float) -> bool:
    """Cases ATen's kernels cannot serve: dropout (mmfast's Philox mask), float64 (ATen's lse is then
    float64, the contract's float32), one key (softmax is exactly 1 and dq exactly 0; ATen's blocked
    backward leaves round-off there)."""
    return dropout_p > 0 or q.dtype == torch.float64 or k.shape[2] == 1


def _use_cpp(q: Tensor, k: Tensor, dropout_p: float) -> bool:
    """The C++ kernel whenever the extension is built: measured faster than ATen's CPU flash kernels
    at the zoo's shapes (see above); ATen's kernels serve the cases they can only without it."""
    return _extension.has_kernel("attention_forward", "CPU")


def cpu_forward(q, k, v, key_padding_mask, seed, causal, scale, dropout_p):
    if _use_cpp(q, k, dropout_p):
        return _extension.op("attention_forward")(q, k, v, key_padding_mask, seed, causal, scale, dropout_p)
    if _needs_own_kernel(q, k, dropout_p):
        return _python_forward(q, k, v, key_padding_mask, seed, causal, scale, dropout_p)
    B, H, Lq, D = q.shape
    if Lq == 0 or B * H == 0 or k.shape[2] == 0:
        return _blhd(q.new_zeros((B, H, Lq, D))), _lse_like(q)
    mask, is_causal = _aten_mask(key_padding_mask, causal, Lq, k.shape[2], q.dtype)
    out, lse = _aten_flash(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
    return _blhd(out), lse


def cpu_backward(grad_out, q, k, v, out, lse, key_padding_mask, seed, causal, scale, dropout_p):
    if _use_cpp(q, k, dropout_p):
        return _extension.op("attention_backward")(grad_out, q, k, v, out, lse, key_padding_mask, seed, causal, scale,
                                                   dropout_p)
    if _needs_own_kernel(q, k, dropout_p):
        return _python_backward(grad_out, q, k, v, key_padding_mask, seed, causal, scale, dropout_p)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if Lq == 0 or Lk == 0 or B * H == 0:
        return _blhd(torch.zeros_like(q)), _blhd(torch.zeros_like(k)), _blhd(torch.zeros_like(v))
    mask, is_causal = _aten_mask(key_padding_mask, causal, Lq, Lk, q.dtype)
    return _aten_flash_backward(grad_out, q, k, v, out, lse, 0.0, is_causal, attn_mask=mask, scale=scale)


def _lse_like(q: Tensor) -> Tensor:
    """Empty lse (B, H, Lq) float32 in the CPU face's (B, Lq, H)-major layout."""
    B, H, Lq, _ = q.shape
    return q.new_zeros((B, Lq, H), dtype=torch.float32).transpose(1, 2)


# The Python path (extension not built): explicit probabilities, the Philox dropout mask.
def _keep_mask(seed: Tensor, B: int, H: int, Lq: int, Lk: int, p: float) -> Tensor:
    from mmfast.reference.dropout import keep_mask

    return keep_mask(int(seed.reshape(-1)[0]), B, H, Lq, Lk, p)


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


def _dropped(p: Tensor, seed: Optional[Tensor], dropout_p: float) -> Tensor:
    """Probabilities times the dropout mask's keep / (1 - p) factor (p itself without dropout)."""
    if dropout_p == 0:
        return p
    B, H, Lq, Lk = p.shape
    return p * (_keep_mask(seed, B, H, Lq, Lk, dropout_p).to(p.dtype) / (1.0 - dropout_p))


def _python_forward(q, k, v, key_padding_mask, seed, causal, scale, dropout_p):
    Lq, Lk = q.shape[2], k.shape[2]
    probs = _cpu_probs(q, k, _dense_mask(key_padding_mask, causal, Lq, Lk, q.device), scale)
    out = _dropped(probs, seed, dropout_p) @ v.to(probs.dtype)
    return _blhd(out.to(q.dtype)), _lse_like(q)


def _python_backward(grad_out, q, k, v, key_padding_mask, seed, causal, scale, dropout_p):
    ct = _compute_dtype(q.dtype)
    p = _cpu_probs(q, k, _dense_mask(key_padding_mask, causal, q.shape[2], k.shape[2], q.device), scale)
    do = grad_out.to(ct)
    pd = _dropped(p, seed, dropout_p)
    dpd = do @ v.to(ct).transpose(-2, -1)  # d loss / d (dropped probabilities)
    dp = _dropped(dpd, seed, dropout_p)    # d loss / d probabilities
    dv = pd.transpose(-2, -1) @ do
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # softmax backward; masked entries have p = 0
    dq = (ds @ k.to(ct)) * scale
    dk = (ds.transpose(-2, -1) @ q.to(ct)) * scale
    return _blhd(dq.to(q.dtype)), _blhd(dk.to(k.dtype)), _blhd(dv.to(v.dtype))


def cpu_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None, causal: bool = False,
                  scale: Optional[float] = None, dropout_p: float = 0.0) -> Tensor:
    """``attention(..., backend="cpu")`` for callers that already hold valid arguments (the model zoo)
    and run eagerly: the same face, minus the argument checks and the custom-op dispatch, which cost
    more than ATen's kernel itself at small sizes (measured ~0.25 ms per forward + backward). Under
    torch.compile use :func:`attention`: the compiler must see the opaque custom op."""
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64) if dropout_p > 0 else None
    return _EagerAttention.apply(q, k, v, key_padding_mask, seed, bool(causal), scale, float(dropout_p), "cpu")


# ---------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) with fake and autograd registrations.

def _face(backend: str):
    if backend == "cpu":
        return cpu_forward, cpu_backward
    if backend == "cuda":
        fwd, bwd = _extension.op("attention_forward"), _extension.op("attention_backward")
        return fwd, bwd  # the C++ schema (csrc/attention.cpp) is the face contract itself
    mod = dispatch.triton_face("attention")
    return mod.attention_forward, mod.attention_backward


def _run_forward(backend: str, *args):
    """The face's forward, recorded for mmfast.testing.faces_run (every path goes through here)."""
    _provenance.record("attention", backend, "forward")
    return _face(backend)[0](*args)


def alert_atomic_dq(op: str, backend: str) -> None:
    """The CUDA face sums dQ with float atomics (csrc/cuda/attention.cu): its bits vary run to run.
    Under torch.use_deterministic_algorithms(True) that raises, as torch's own such kernels do (a
    warning with warn_only=True); ``auto`` avoids the face there (:func:`_unsupported`)."""
    if backend != "cuda" or not torch.are_deterministic_algorithms_enabled():
        return
    what = (f"mmfast.{op} backward with backend='cuda' (dQ summed with float atomics) does not have a deterministic "
            "implementation, but you set 'torch.use_deterministic_algorithms(True)'")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(what)
    else:
        raise RuntimeError(what + ": use backend='auto' or 'triton', or warn_only=True")


def _run_backward(backend: str, *args):
    _provenance.record("attention", backend, "backward")
    alert_atomic_dq("attention", backend)
    return _face(backend)[1](*args)


@torch.library.custom_op("mmfast::attention_forward", mutates_args=())
def _attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], seed: Optional[Tensor],
                      causal: bool, scale: float, dropout_p: float, backend: str) -> tuple[Tensor, Tensor]:
    return _run_forward(backend, q, k, v, key_padding_mask, seed, causal, scale, dropout_p)


@_attention_fwd_op.register_fake
def _(q, k, v, key_padding_mask, seed, causal, scale, dropout_p, backend):
    B, H, Lq, D = q.shape
    if backend == "cpu":  # the CPU face's layouts (see its section)
        return q.new_empty((B, Lq, H, D)).transpose(1, 2), _lse_like(q)
    return q.new_empty((B, H, Lq, D)), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("mmfast::attention_backward", mutates_args=())
def _attention_bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      key_padding_mask: Optional[Tensor], seed: Optional[Tensor], causal: bool, scale: float,
                      dropout_p: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _run_backward(backend, grad_out, q, k, v, out, lse, key_padding_mask, seed, causal, scale, dropout_p)


@_attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, seed, causal, scale, dropout_p, backend):
    if backend == "cpu":
        return tuple(_blhd(x.new_empty(x.shape)) for x in (q, k, v))
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
# Eager fast path: the same faces through an autograd.Function (see mmfast/ops/_eager_path.py).

class _EagerAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, seed, causal, scale, dropout_p, backend):
        out, lse = _run_forward(backend, q, k, v, key_padding_mask, seed, causal, scale, dropout_p)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, seed)
        ctx.args = (causal, scale, dropout_p, backend)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_padding_mask, seed = ctx.saved_tensors
        causal, scale, dropout_p, backend = ctx.args
        dq, dk, dv = _run_backward(backend, grad_out, q, k, v, out, lse, key_padding_mask, seed, causal, scale,
                                   dropout_p)
        return dq, dk, dv, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Public API

def _head_dim_ok(D: int) -> bool:
    return D % 8 == 0 and 8 <= D <= MAX_HEAD_DIM


# triton #11584: garbage, not an error
_NO_INTERPRETED_BF16 = (("triton", "bfloat16 tl.dot is broken in the Triton interpreter"),)
_FP32_AUTO_TO_REFERENCE = (("triton", "float32 Triton attention runs IEEE dots on CUDA cores (no tensor cores) and "
                                      "some of its sm_90 configs spill; backend='auto' takes the reference"),)
_CUDA_NOT_DETERMINISTIC = (("cuda", "its backward sums dQ with float atomics and "
                                   "torch.use_deterministic_algorithms(True) is on"),)


def deterministic_only() -> bool:
    """torch.use_deterministic_algorithms(True) without warn_only: non-deterministic kernels raise."""
    return torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()


def _unsupported(device_type: str, dtype: torch.dtype, head_dim: int, backend: str) -> tuple:
    """The (face, reason) pairs this call's arguments rule out (dispatch.resolve's ``unsupported``)."""
    u = ()
    if device_type == "cpu" and dtype == torch.bfloat16:
        u += _NO_INTERPRETED_BF16
    if (device_type == "cuda" and dtype == torch.float32 and backend == "auto"
            and dispatch.get_default_backend() == "auto"):
        u += _FP32_AUTO_TO_REFERENCE  # an explicit backend="triton" still runs it
    if device_type == "cuda" and backend == "auto" and deterministic_only():
        u += _CUDA_NOT_DETERMINISTIC
    if not _head_dim_ok(head_dim):  # only under auto (else _check_args raised): the reference takes any D
        u += tuple((b, f"head dim {head_dim} is not a multiple of 8 in [8, {MAX_HEAD_DIM}]")
                   for b in ("cuda", "triton", "cpu"))
    return u


def _check_args(q, k, v, key_padding_mask, scale, dropout_p, backend) -> None:
    """Raises on bad arguments. A valid call is recognised by one expression; only a call that
    fails it pays for the diagnosis that names the argument (``_diagnose_args``)."""
    try:
        qs, ks, dt, dev = q.shape, k.shape, q.dtype, q.device
        D = qs[-1]
        ok = (len(qs) == 4 and len(ks) == 4 and v.shape == ks
              and qs[0] == ks[0] and qs[1] == ks[1] and D == ks[3]
              and dt.is_floating_point and k.dtype == dt and v.dtype == dt
              and k.device == dev and v.device == dev
              and (backend == "torch" or (D % 8 == 0 and 8 <= D <= MAX_HEAD_DIM))
              and 0.0 <= dropout_p < 1.0
              and (scale is None or isinstance(scale, (int, float)))
              and (key_padding_mask is None
                   or (isinstance(key_padding_mask, Tensor) and key_padding_mask.dtype == torch.bool
                       and key_padding_mask.shape == (qs[0], ks[2]) and key_padding_mask.device == dev)))
    except (AttributeError, TypeError, IndexError, RuntimeError):
        ok = False
    if not ok:
        _diagnose_args(q, k, v, key_padding_mask, scale, dropout_p, backend)


def _diagnose_args(q, k, v, key_padding_mask, scale, dropout_p, backend) -> None:
    """The first bad argument, in one line naming it and what was expected."""
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
    if backend not in ("torch", "auto") and not _head_dim_ok(D):
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
    dtype, dropout = q.dtype, dropout_p > 0
    device_type = "cuda" if q.is_cuda else "cpu" if q.is_cpu else q.device.type
    be = dispatch.resolve("attention", backend, device_type, dtype, _unsupported(device_type, dtype, q.shape[-1], backend),
                          bucket=dispatch.size_bucket(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]))
    if be == "torch":  # on a GPU the fused SDPA kernels (same semantics), elsewhere the eager formula
        reference = _sdpa_reference if q.is_cuda else _ref.attention
        return _provenance.reference_ran("attention", reference(
            q, k, v, key_padding_mask=key_padding_mask, causal=causal, scale=scale, dropout_p=dropout_p))
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    causal, dropout_p = bool(causal), float(dropout_p)
    seed = None
    if dropout:
        # drawn from the default generator of q's device, so torch.manual_seed reproduces the mask
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)
    if plain_eager(q, k, v):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _EagerAttention.apply(q, k, v, key_padding_mask, seed, causal, scale, dropout_p, be)
        return _run_forward(be, q, k, v, key_padding_mask, seed, causal, scale, dropout_p)[0]
    out, _ = _attention_fwd_op(q, k, v, key_padding_mask, seed, causal, scale, dropout_p, be)
    return out
