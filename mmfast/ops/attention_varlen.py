"""Variable-length (packed) attention: public API, backend dispatch, custom-op, fake and autograd
registrations.

Layout (flash-attn's ``flash_attn_varlen_func``): q ``(total_q, H, D)``, k and v ``(total_k, H, D)``,
``cu_seqlens_q``/``cu_seqlens_k`` int32 ``(batch + 1,)`` cumulative lengths starting at 0. Semantics
per sequence are those of :func:`mmfast.ops.attention`: causal aligned bottom-right, a sequence
with 0 keys gives zeros, one with 0 queries contributes nothing.

Faces: reference ``mmfast/reference/attention_varlen.py`` ("torch"); Triton
``mmfast/triton/attention_varlen.py`` (flash-attention kernels that read cu_seqlens: one launch for
the batch); "cpu": *not* a varlen kernel: the CPU attention face
(``torch.ops.mmfast.attention_forward/backward``, the contract of mmfast/ops/attention.py) run once
per sequence on views of the packed tensors (no padding computed, one call per sequence); with
dropout, the reference's eager formula per sequence instead (that face numbers its batch-heads
from 0 in every call, so it cannot give sequence b the mask of bh = b * H + h). "cuda":
``csrc/cuda/attention_varlen.cu`` (schema ``csrc/attention.cpp``), the FlashAttention-2 kernels of the
attention CUDA face over cu_seqlens, float16/bfloat16. It was compiled for sm_90 but never run here
(no GPU): ``backend="cuda"`` runs it, ``auto`` never picks it.

Dropout, in every face: the shared Philox contract (mmfast/reference/dropout.py) with bh = b * H + h
for sequence b, query row and key column counted within the sequence
(mmfast/reference/attention_varlen.py): equal lengths give the padded op's mask for the same seed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmfast import _extension, _provenance, dispatch
from mmfast.ops.attention import DTYPES as ATTENTION_DTYPES
from mmfast.ops.attention import MAX_HEAD_DIM, _compute_dtype, _cpu_probs, alert_atomic_dq
from mmfast.reference.attention import attention_mask as _dense_mask
from mmfast.reference.attention_varlen import attention_varlen as _reference, sequence_keep_mask, to_heads_first

# The attention faces' custom ops (mmfast/ops/attention.py, imported above, registers them)
_attention_forward = torch.ops.mmfast.attention_forward
_attention_backward = torch.ops.mmfast.attention_backward

dispatch.register_op(dispatch.OpSpec(
    name="attention_varlen",
    cpp_kernel="attention_varlen_forward",
    triton_module="mmfast.triton.attention_varlen",
    cpu_python=True,
    dtypes=ATTENTION_DTYPES,
))

# Compiled, never run on a GPU: only an explicit backend="cuda" runs it (the GPU check's tests). Safe
# auto already skips a face kernel_table.json does not list as verified; this also keeps it out of
# auto under MMFAST_TRUST_UNVERIFIED=1. Drop it once the GPU check has verified the face.
_CUDA_UNVERIFIED = (("cuda", "compiled for sm_90 but never verified on a GPU: only backend='cuda' runs it"),)


def _sequences(cu_q: Tensor, cu_k: Tensor):
    """(b, q0, q1, k0, k1) per sequence (host values: one device->host copy on a GPU)."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(b, cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


def _draw_seed(device) -> Tensor:
    """The dropout seed of a call: drawn as mmfast.ops.attention draws it (same range, q's device
    generator), so torch.manual_seed reproduces the masks and a padded call after the same
    torch.manual_seed gets the same seed."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _face_keeps_lse(q: Tensor, backend: str) -> bool:
    """Whether the attention face ``backend`` returns an lse (B, H, Lq) for its backward (else (0,)),
    asked of its fake on a one-query meta input, so the loop below follows the face's contract."""
    x = torch.empty((1, q.shape[1], 1, q.shape[2]), dtype=q.dtype, device="meta")
    return _attention_forward(x, x, x, None, None, False, 1.0, 0.0, backend)[1].numel() > 0


def _loop_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, seed, causal, scale, dropout_p, backend):
    """The attention face ``backend`` once per sequence, on views of the packed tensors ->
    (out, the faces' lse as (H, total_q) float32, or (0,) when the face keeps none)."""
    out = q.new_zeros(q.shape)  # rows of sequences without keys stay 0
    lse = q.new_zeros((q.shape[1], q.shape[0]) if _face_keeps_lse(q, backend) else (0,), dtype=torch.float32)
    if dropout_p > 0:  # lse unused: the backward recomputes the probabilities
        return _eager_dropout(None, q, k, v, cu_seqlens_q, cu_seqlens_k, seed, causal, scale, dropout_p), lse
    for b, q0, q1, k0, k1 in _sequences(cu_seqlens_q, cu_seqlens_k):
        if q1 > q0 and k1 > k0:
            o, seq_lse = _attention_forward(
                to_heads_first(q[q0:q1]), to_heads_first(k[k0:k1]), to_heads_first(v[k0:k1]), None,
                None, causal, scale, dropout_p, backend)
            out[q0:q1] = o[0].transpose(0, 1)
            if lse.numel():
                lse[:, q0:q1] = seq_lse[0]
    return out, lse


def _loop_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed, causal, scale, dropout_p,
                   backend):
    """Per sequence: the attention face's backward, given its own forward's lse (with dropout: autograd
    through the eager formula the forward ran, same seed, so the same mask)."""
    if dropout_p > 0:
        return _eager_dropout(grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, seed, causal, scale, dropout_p)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b, q0, q1, k0, k1 in _sequences(cu_seqlens_q, cu_seqlens_k):
        if q1 > q0 and k1 > k0:  # otherwise: zero output, zero gradients
            seq_lse = lse[None, :, q0:q1].contiguous() if lse.numel() else lse  # faces take a dense lse
            g = _attention_backward(
                to_heads_first(grad_out[q0:q1]), to_heads_first(q[q0:q1]), to_heads_first(k[k0:k1]),
                to_heads_first(v[k0:k1]), to_heads_first(out[q0:q1]), seq_lse, None,
                None, causal, scale, dropout_p, backend)
            for dst, src, (r0, r1) in zip((dq, dk, dv), g, ((q0, q1), (k0, k1), (k0, k1))):
                dst[r0:r1] = src[0].transpose(0, 1)
    return dq, dk, dv


def _eager_dropout(grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, seed, causal, scale, dropout_p):
    """The cpu face with dropout: explicit probabilities per sequence (float32, float64 for float64)
    times the contract's mask of that sequence -> out when ``grad_out`` is None, else (dq, dk, dv)."""
    ct = _compute_dtype(q.dtype)
    H, seed = q.shape[1], int(seed.reshape(-1)[0])
    outs = [torch.zeros_like(t) for t in ((q,) if grad_out is None else (q, k, v))]
    for b, q0, q1, k0, k1 in _sequences(cu_seqlens_q, cu_seqlens_k):
        if q1 == q0 or k1 == k0:
            continue
        qs, ks, vs = (to_heads_first(t[r0:r1]).to(ct) for t, r0, r1 in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        probs = _cpu_probs(qs, ks, _dense_mask(None, causal, q1 - q0, k1 - k0, q.device), scale)
        keep = sequence_keep_mask(seed, b, H, q1 - q0, k1 - k0, dropout_p).to(ct) / (1.0 - dropout_p)
        if grad_out is None:
            outs[0][q0:q1] = ((probs * keep) @ vs)[0].transpose(0, 1)
            continue
        do = to_heads_first(grad_out[q0:q1]).to(ct)
        dp = (do @ vs.transpose(-2, -1)) * keep  # d loss / d probabilities
        ds = probs * (dp - (probs * dp).sum(-1, keepdim=True))  # softmax backward; masked entries have p = 0
        grads = (ds @ ks * scale, ds.transpose(-2, -1) @ qs * scale, (probs * keep).transpose(-2, -1) @ do)
        for dst, g, (r0, r1) in zip(outs, grads, ((q0, q1), (k0, k1), (k0, k1))):
            dst[r0:r1] = g[0].transpose(0, 1)
    return outs[0] if grad_out is None else tuple(outs)


@torch.library.custom_op("mmfast::attention_varlen_forward", mutates_args=())
def _varlen_fwd_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                   max_seqlen_k: int, seed: Optional[Tensor], causal: bool, scale: float, dropout_p: float,
                   backend: str) -> tuple[Tensor, Tensor]:
    """(out (total_q, H, D), lse (H, total_q) float32; (0,) where the cpu attention face keeps none)."""
    _provenance.record("attention_varlen", backend, "forward")
    if backend == "cuda":
        return _extension.op("attention_varlen_forward")(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                         max_seqlen_k, seed, causal, scale, dropout_p)
    if backend == "cpu":
        return _loop_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, seed, causal, scale, dropout_p, backend)
    return dispatch.triton_face("attention_varlen").attention_varlen_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, causal, scale, dropout_p)


@_varlen_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, causal, scale, dropout_p, backend):
    keeps_lse = backend != "cpu" or _face_keeps_lse(q, backend)
    lse_shape = (q.shape[1], q.shape[0]) if keeps_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("mmfast::attention_varlen_backward", mutates_args=())
def _varlen_bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                   seed: Optional[Tensor], causal: bool, scale: float, dropout_p: float, backend: str
                   ) -> tuple[Tensor, Tensor, Tensor]:
    _provenance.record("attention_varlen", backend, "backward")
    alert_atomic_dq("attention_varlen", backend)
    if backend == "cuda":
        return _extension.op("attention_varlen_backward")(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                          max_seqlen_q, max_seqlen_k, seed, causal, scale, dropout_p)
    if backend == "cpu":
        return _loop_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed, causal, scale,
                              dropout_p, backend)
    return dispatch.triton_face("attention_varlen").attention_varlen_backward(
        grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, causal, scale,
        dropout_p)


@_varlen_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, causal, scale,
      dropout_p, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, seed, causal, scale, dropout_p, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seed)
    ctx.args = (max_q, max_k, causal, scale, dropout_p, backend)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_q, cu_k, seed = ctx.saved_tensors
    max_q, max_k, causal, scale, dropout_p, backend = ctx.args
    dq, dk, dv = _varlen_bwd_op(grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, seed, causal,
                                scale, dropout_p, backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_varlen_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API

def _check_cu_seqlens(name: str, cu: Tensor, total: int, total_name: str, batch: Optional[int],
                      max_seqlen, max_name: str, device) -> None:
    if not isinstance(cu, Tensor) or cu.dtype != torch.int32:
        raise TypeError(f"mmfast.attention_varlen: argument '{name}' must be an int32 tensor, got "
                        f"{getattr(cu, 'dtype', type(cu).__name__)}")
    if cu.dim() != 1 or cu.numel() < 1 or (batch is not None and cu.numel() != batch + 1):
        expected = "(batch + 1,)" if batch is None else f"({batch + 1},) like 'cu_seqlens_q'"
        raise ValueError(f"mmfast.attention_varlen: argument '{name}' must have shape {expected}, "
                         f"got {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"mmfast.attention_varlen: argument '{name}' is on {cu.device}, q is on {device}")
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"mmfast.attention_varlen: argument '{max_name}' must be a non-negative int, got {max_seqlen!r}")
    if torch.compiler.is_compiling():
        return  # the values are data: checked in eager mode only
    c = cu.tolist()
    if c[0] != 0 or any(b < a for a, b in zip(c, c[1:])):
        raise ValueError(f"mmfast.attention_varlen: argument '{name}' must start at 0 and never decrease, got {c}")
    if c[-1] != total:
        raise ValueError(f"mmfast.attention_varlen: the last entry of argument '{name}' must equal {total_name} "
                         f"= {total}, got {c[-1]}")
    longest = max((b - a for a, b in zip(c, c[1:])), default=0)
    if longest > max_seqlen:
        raise ValueError(f"mmfast.attention_varlen: argument '{max_name}' = {max_seqlen} is below the longest "
                         f"sequence in '{name}' ({longest})")


def _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, dropout_p, backend):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 3:
            raise ValueError(f"mmfast.attention_varlen: argument '{name}' must be a 3-D (total, H, D) floating-point "
                             f"tensor, got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"mmfast.attention_varlen: argument '{name}' is {t.dtype} on {t.device}, q is "
                             f"{q.dtype} on {q.device}")
    if k.shape[1:] != q.shape[1:] or v.shape != k.shape:
        raise ValueError(f"mmfast.attention_varlen: arguments 'k' and 'v' must have shape (total_k, {q.shape[1]}, "
                         f"{q.shape[2]}) to match q {tuple(q.shape)}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if backend != "torch" and (q.shape[2] % 8 != 0 or not 8 <= q.shape[2] <= MAX_HEAD_DIM):
        raise ValueError(f"mmfast.attention_varlen: the head dim D (last dim of argument 'q') must be a multiple of 8 "
                         f"between 8 and {MAX_HEAD_DIM}, got {q.shape[2]} (backend='torch' takes any D)")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "total_q (q.shape[0])", None,
                      max_seqlen_q, "max_seqlen_q", q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "total_k (k.shape[0])", cu_seqlens_q.numel() - 1,
                      max_seqlen_k, "max_seqlen_k", q.device)
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"mmfast.attention_varlen: argument 'dropout_p' must be in [0, 1), got {dropout_p}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"mmfast.attention_varlen: argument 'scale' must be a float or None, got {type(scale).__name__}")


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False, scale: Optional[float] = None,
                     dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """Attention over packed sequences (flash-attn's ``flash_attn_varlen_func`` layout) -> out ``(total_q, H, D)``.

    Sequence ``b`` is q rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` against k/v rows
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``; nothing attends across sequences. ``causal`` is aligned
    bottom-right per sequence; a sequence with 0 keys gives zeros; one with 0 queries contributes
    nothing. Dropout draws its seed from torch's generator on q's device (``torch.manual_seed``
    reproduces it); its mask is the padded op's for batch item b, restricted to each sequence's
    (Lq_b, Lk_b) corner (module docstring). ``cu_seqlens_*`` are int32 ``(batch + 1,)``, start at 0, never decrease and end at the
    total row count; their values are checked on the host in eager mode (one device->host copy on
    a GPU), not under torch.compile. ``max_seqlen_*`` must be at least the longest sequence.
    """
    _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, dropout_p, backend)
    unsupported = _CUDA_UNVERIFIED if backend == "auto" and dispatch.get_default_backend() == "auto" else ()
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:  # triton #11584: garbage, not an error
        unsupported += (("triton", "bfloat16 tl.dot is broken in the Triton interpreter"),)
    be = dispatch.resolve("attention_varlen", backend, q.device.type, q.dtype, unsupported)
    seed = _draw_seed(q.device) if dropout_p > 0 else None
    if be == "torch":
        return _provenance.reference_ran("attention_varlen", _reference(
            q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale, dropout_p=dropout_p, seed=seed))
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    out, _ = _varlen_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), seed,
                            bool(causal), scale, float(dropout_p), be)
    return out
