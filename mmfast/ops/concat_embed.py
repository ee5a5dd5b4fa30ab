"""Feature concatenation (+ type/position embeddings + LayerNorm + dropout): public API, backend
dispatch, custom-op, fake and autograd registrations.

Faces: reference ``mmfast/reference/concat_embed.py``, Triton ``mmfast/triton/concat_embed.py``,
CUDA ``csrc/cuda/concat_embed.cu``, CPU ``csrc/cpu/concat_embed.cpp``. Every non-reference face
implements the same kernel contract (``P`` = the position tables that exist, ``pos_index[m]`` =
index into ``P`` of modality m's table or -1; all parameters contiguous float32, or float64
for float64 features)::

    concat_embed_forward(features[M] (B, L_m, D), type_emb (>=M, D)?, pos_tables P[k] (>=L_m, D),
                         pos_index[M], ln_weight (D,)?, ln_bias (D,)?, eps, dropout_p, seed (1,) int64?)
        -> (out (B, sum L_m, D) features' dtype, mean (B, sum L_m), rstd (B, sum L_m))
           [mean/rstd in the parameters' dtype; (0,) without LayerNorm]
    concat_embed_backward(grad_out, features, type_emb?, pos_tables, pos_index, ln_weight?, ln_bias?,
                          mean, rstd, dropout_p, seed?)
        -> [grad_features[M]..., grad_type (like type_emb or (0,)), grad_pos[k]... (like P[k]),
            grad_weight (D,) or (0,), grad_bias (D,) or (0,)]      parameter grads in the params' dtype

Parameter gradients are reduced in float32 in two stages (per-block partial sums, then a sum over
blocks in a fixed order): deterministic, no atomics. The GPU faces size the backward grid to the
GPU (two blocks per SM: the Triton face splits positions, then batch rows; the CUDA face batch
rows), so results are bit-for-bit reproducible on one GPU model; on GPUs with another SM count
the partial sums are grouped differently (last-bit differences).

Dropout does not use torch's Philox stream directly (a kernel cannot share it across the three
faces); instead a 64-bit seed is drawn from torch's generator for every call (so ``torch.manual_seed``
makes it reproducible) and every face hashes (seed, element index) with the same integer hash
(:func:`dropout_keep_mask` is its PyTorch twin). The backward regenerates the same mask from the
saved seed, so no mask is stored.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from mmfast import _extension, _provenance, dispatch
from mmfast import reference as _ref
from mmfast.ops._eager_path import plain_eager

_MAX_MODALITIES = 4
_CUDA_MAX_D = 1024  # kMaxD in csrc/cuda/concat_embed.cu
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

dispatch.register_op(dispatch.OpSpec(
    name="concat_embed",
    cpp_kernel="concat_embed_forward",
    triton_module="mmfast.triton.concat_embed",
    dtypes={
        "torch": _DTYPES + (torch.float64,),
        "cpu": _DTYPES + (torch.float64,),
        "cuda": _DTYPES,
        "triton": _DTYPES,
    },
    cpu_auto_buckets=dispatch.CPU_AUTO_BUT_REFERENCE_FASTER,  # see _bucket
    cpu_auto_why=("without LayerNorm and dropout the op is adds and a cat, whose eager backward passes the feature "
                  "gradients on as views (the face writes them): the cpu face measured 0.84-0.99x the reference's "
                  "speed forward + backward and 0.57-0.99x forward only, single_stream's shapes from tiny "
                  "(8, [7, 1, 16], 64) to small (16, [40, 1, 196], 384), 1 and 2 threads, 2-core AMD EPYC, "
                  "2026-11-30; with dropout it measured 1.2-4.1x, with LayerNorm up to 1.4x (auto takes it)"),
))


def _bucket(features, ln_weight, dropout_p) -> str:
    """The call's size bucket; CPU_REFERENCE_FASTER for the CPU calls the reference runs faster (cpu_auto_why)."""
    f0 = features[0]
    if f0.device.type == "cpu" and ln_weight is None and not float(dropout_p) > 0:
        return dispatch.CPU_REFERENCE_FASTER
    return dispatch.size_bucket(f0.shape[0] * f0.shape[2] * sum(f.shape[1] for f in features))


# ---------------------------------------------------------------------------------------------
# Dropout: the hash every face implements.
_M32 = 0xFFFFFFFF


def dropout_threshold(p: float) -> int:
    """An element is kept when the top 24 bits of its hash are >= this (so P(drop) = thr / 2^24)."""
    return min(1 << 24, math.floor(float(p) * (1 << 24) + 0.5))


def _fmix32(h: Tensor) -> Tensor:  # murmur3's finaliser on int64 tensors holding uint32 values
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def dropout_keep_mask(seed: int | Tensor, shape: Sequence[int], p: float, device=None) -> Tensor:
    """The keep mask (bool, ``shape`` = (B, sum L_m, D)) the fused faces draw for ``seed``: element
    with flat index i is kept iff ``hash(seed, i) >> 8 >= dropout_threshold(p)``."""
    seed = int(seed.reshape(-1)[0]) if isinstance(seed, Tensor) else int(seed)
    n = 1
    for s in shape:
        n *= int(s)
    idx = torch.arange(n, dtype=torch.int64, device=device)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    h = _fmix32((idx & _M32) ^ k0)
    h = _fmix32(h ^ (idx >> 32) ^ k1)
    return ((h >> 8) >= dropout_threshold(p)).reshape(tuple(shape))


# ---------------------------------------------------------------------------------------------
# Custom ops (what torch.compile and autograd see). Backend is resolved before; "backend" is
# "cpu" | "cuda" (the C++ extension) or "triton".
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Parameters, statistics and parameter gradients: float32 (float64 for float64 features)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _face(backend: str, name: str):
    if backend in ("cpu", "cuda"):
        return _extension.op(name)
    return getattr(dispatch.triton_face("concat_embed"), name)


def _run_forward(backend, features, type_emb, pos_tables, pos_index, ln_weight, ln_bias, eps, dropout_p, seed):
    """The one place every forward face is called from (custom op and eager path alike)."""
    _provenance.record("concat_embed", backend, "forward")
    return _face(backend, "concat_embed_forward")(
        features, type_emb, pos_tables, pos_index, ln_weight, ln_bias, eps, dropout_p, seed)


def _run_backward(backend, grad_out, features, type_emb, pos_tables, pos_index, ln_weight, ln_bias, mean, rstd,
                  dropout_p, seed):
    _provenance.record("concat_embed", backend, "backward")
    return list(_face(backend, "concat_embed_backward")(
        grad_out, features, type_emb, pos_tables, pos_index, ln_weight, ln_bias, mean, rstd, dropout_p, seed))


@torch.library.custom_op("mmfast::concat_embed", mutates_args=())
def _concat_embed_op(features: List[Tensor], type_emb: Optional[Tensor], pos_tables: List[Tensor],
                     pos_index: List[int], ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float,
                     dropout_p: float, seed: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _run_forward(backend, features, type_emb, pos_tables, pos_index, ln_weight, ln_bias, eps, dropout_p,
                        seed)


@_concat_embed_op.register_fake
def _(features, type_emb, pos_tables, pos_index, ln_weight, ln_bias, eps, dropout_p, seed, backend):
    f0 = features[0]
    B, D = f0.shape[0], f0.shape[2]
    L = sum(f.shape[1] for f in features)
    out = f0.new_empty((B, L, D))
    stats = (B, L) if ln_weight is not None else (0,)
    acc = _acc_dtype(f0.dtype)
    return out, f0.new_empty(stats, dtype=acc), f0.new_empty(stats, dtype=acc)


@torch.library.custom_op("mmfast::concat_embed_backward", mutates_args=())
def _concat_embed_backward_op(grad_out: Tensor, features: List[Tensor], type_emb: Optional[Tensor],
                              pos_tables: List[Tensor], pos_index: List[int], ln_weight: Optional[Tensor],
                              ln_bias: Optional[Tensor], mean: Tensor, rstd: Tensor, dropout_p: float,
                              seed: Optional[Tensor], backend: str) -> List[Tensor]:
    return _run_backward(backend, grad_out, features, type_emb, pos_tables, pos_index, ln_weight, ln_bias, mean, rstd,
                         dropout_p, seed)


@_concat_embed_backward_op.register_fake
def _(grad_out, features, type_emb, pos_tables, pos_index, ln_weight, ln_bias, mean, rstd, dropout_p, seed,
      backend):
    empty = lambda: grad_out.new_empty((0,), dtype=_acc_dtype(features[0].dtype))
    grads = [torch.empty_like(f) for f in features]
    grads.append(torch.empty_like(type_emb) if type_emb is not None else empty())
    grads += [torch.empty_like(p) for p in pos_tables]
    grads.append(torch.empty_like(ln_weight) if ln_weight is not None else empty())
    grads.append(torch.empty_like(ln_bias) if ln_bias is not None else empty())
    return grads


def _setup_context(ctx, inputs, output):
    features, type_emb, pos_tables, pos_index, ln_weight, ln_bias, eps, dropout_p, seed, backend = inputs
    _, mean, rstd = output
    ctx.M, ctx.K = len(features), len(pos_tables)
    ctx.pos_index, ctx.dropout_p, ctx.backend = list(pos_index), dropout_p, backend
    ctx.has = (type_emb is not None, ln_weight is not None, ln_bias is not None, seed is not None)
    opt = [t for t in (type_emb, ln_weight, ln_bias, seed) if t is not None]
    ctx.save_for_backward(*features, *pos_tables, mean, rstd, *opt)


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    saved = list(ctx.saved_tensors)
    M, K = ctx.M, ctx.K
    features, pos_tables = saved[:M], saved[M:M + K]
    mean, rstd = saved[M + K], saved[M + K + 1]
    rest = iter(saved[M + K + 2:])
    type_emb, ln_weight, ln_bias, seed = (next(rest) if h else None for h in ctx.has)
    grads = _concat_embed_backward_op(grad_out.contiguous(), features, type_emb, pos_tables, ctx.pos_index,
                                      ln_weight, ln_bias, mean, rstd, ctx.dropout_p, seed, ctx.backend)
    g_feat, g_type, g_pos, g_w, g_b = _split_grads(grads, M, K, ctx.has)
    return g_feat, g_type, g_pos, None, g_w, g_b, None, None, None, None


def _split_grads(grads, M, K, has):
    """The kernel's flat gradient list -> (features, type, pos tables, ln weight, ln bias); None
    for an absent parameter. ``has`` = (type_emb, ln_weight, ln_bias, seed) given."""
    return (grads[:M], grads[M] if has[0] else None, grads[M + 1:M + 1 + K],
            grads[M + 1 + K] if has[1] else None, grads[M + 2 + K] if has[2] else None)


_concat_embed_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Eager fast path: the same faces through an autograd.Function (see mmfast/ops/_eager_path.py).
# autograd.Function sees only top-level tensor arguments, so the lists travel flattened:
# (*features, *pos_tables, type_emb, ln_weight, ln_bias, seed), None where absent.

class _EagerConcatEmbed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, meta, *tensors):
        M, K, pos_index, eps, dropout_p, backend = meta
        features, pos_tables = list(tensors[:M]), list(tensors[M:M + K])
        type_emb, ln_weight, ln_bias, seed = tensors[M + K:]
        out, mean, rstd = _run_forward(backend, features, type_emb, pos_tables, pos_index, ln_weight, ln_bias, eps,
                                       dropout_p, seed)
        ctx.save_for_backward(*tensors, mean, rstd)
        ctx.meta = meta
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        M, K, pos_index, _, dropout_p, backend = ctx.meta
        saved = ctx.saved_tensors
        features, pos_tables = list(saved[:M]), list(saved[M:M + K])
        type_emb, ln_weight, ln_bias, seed, mean, rstd = saved[M + K:]
        grads = _run_backward(backend, grad_out.contiguous(), features, type_emb, pos_tables, pos_index, ln_weight,
                              ln_bias, mean, rstd, dropout_p, seed)
        has = (type_emb is not None, ln_weight is not None, ln_bias is not None)
        g_feat, g_type, g_pos, g_w, g_b = _split_grads(grads, M, K, has)
        return (None, *g_feat, *g_pos, g_type, g_w, g_b, None)


# ---------------------------------------------------------------------------------------------
# Public API.
def _err(arg: str, msg: str) -> str:
    return f"mmfast.concat_embed: argument '{arg}': {msg}"


def _check_args(features, type_embeddings, pos_embeddings, ln_weight, ln_bias, eps, dropout_p, masks) -> None:
    if isinstance(features, Tensor) or not isinstance(features, (list, tuple)):
        raise TypeError(_err("features", f"expected a list or tuple of (B, L_m, D) tensors, got {type(features).__name__}"))
    M = len(features)
    if not 1 <= M <= _MAX_MODALITIES:
        raise ValueError(_err("features", f"expected 1 to {_MAX_MODALITIES} modalities, got {M}"))
    for m, f in enumerate(features):
        if not isinstance(f, Tensor) or not f.is_floating_point():
            raise TypeError(_err(f"features[{m}]", f"expected a floating-point tensor, got "
                                                   f"{getattr(f, 'dtype', type(f).__name__)}"))
        if f.dim() != 3:
            raise ValueError(_err(f"features[{m}]", f"expected a 3-D (B, L, D) tensor, got shape {tuple(f.shape)}"))
        if f.shape[1] < 1:
            raise ValueError(_err(f"features[{m}]", f"expected at least one token (L >= 1), got shape {tuple(f.shape)}"))
    f0 = features[0]
    B, D = f0.shape[0], f0.shape[2]
    if D < 1:
        raise ValueError(_err("features[0]", f"expected a hidden size D >= 1, got shape {tuple(f0.shape)}"))
    for m, f in enumerate(features[1:], 1):
        if f.shape[2] != D:
            raise ValueError(_err(f"features[{m}]", f"hidden size {f.shape[2]} differs from features[0]'s {D}"))
        if f.shape[0] != B:
            raise ValueError(_err(f"features[{m}]", f"batch size {f.shape[0]} differs from features[0]'s {B}"))
        if f.dtype != f0.dtype:
            raise TypeError(_err(f"features[{m}]", f"dtype {f.dtype} differs from features[0]'s {f0.dtype}"))
        if f.device != f0.device:
            raise ValueError(_err(f"features[{m}]", f"device {f.device} differs from features[0]'s {f0.device}"))

    def check_param(t, name, shape_ok, expected):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(_err(name, f"expected a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}"))
        if not shape_ok(t):
            raise ValueError(_err(name, f"expected shape {expected}, got {tuple(t.shape)}"))
        if t.device != f0.device:
            raise ValueError(_err(name, f"device {t.device} differs from the features' {f0.device}"))

    if type_embeddings is not None:
        check_param(type_embeddings, "type_embeddings", lambda t: t.dim() == 2 and t.shape[1] == D,
                    f"(>= {M}, {D})")
        if type_embeddings.shape[0] < M:
            raise ValueError(_err("type_embeddings", f"has {type_embeddings.shape[0]} rows (modality types) for "
                                                     f"{M} modalities; expected at least {M}"))
    if pos_embeddings is not None:
        if isinstance(pos_embeddings, Tensor) or not isinstance(pos_embeddings, (list, tuple)):
            raise TypeError(_err("pos_embeddings", "expected a list with one (max_len, D) tensor or None per modality"))
        if len(pos_embeddings) != M:
            raise ValueError(_err("pos_embeddings", f"expected {M} entries (one per modality, None allowed), "
                                                    f"got {len(pos_embeddings)}"))
        for m, p in enumerate(pos_embeddings):
            if p is None:
                continue
            L_m = features[m].shape[1]
            check_param(p, f"pos_embeddings[{m}]", lambda t: t.dim() == 2 and t.shape[1] == D, f"(>= {L_m}, {D})")
            if p.shape[0] < L_m:
                raise ValueError(_err(f"pos_embeddings[{m}]", f"has {p.shape[0]} positions, shorter than the "
                                                              f"{L_m} tokens of features[{m}]"))
    if ln_weight is not None:
        check_param(ln_weight, "ln_weight", lambda t: tuple(t.shape) == (D,), f"({D},)")
    if ln_bias is not None:
        if ln_weight is None:
            raise ValueError(_err("ln_bias", "given without ln_weight (the LayerNorm runs only when ln_weight is "
                                             "given; pass torch.ones(D) for a bias-only affine)"))
        check_param(ln_bias, "ln_bias", lambda t: tuple(t.shape) == (D,), f"({D},)")
    if not float(eps) > 0:
        raise ValueError(_err("eps", f"expected a positive number, got {eps}"))
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(_err("dropout_p", f"expected a probability in [0, 1], got {dropout_p}"))
    if masks is not None:
        if isinstance(masks, Tensor) or not isinstance(masks, (list, tuple)):
            raise TypeError(_err("masks", "expected a list with one (B, L_m) mask or None per modality"))
        if len(masks) != M:
            raise ValueError(_err("masks", f"expected {M} entries (one per modality, None allowed), got {len(masks)}"))
        for m, mk in enumerate(masks):
            if mk is None:
                continue
            if not isinstance(mk, Tensor):
                raise TypeError(_err(f"masks[{m}]", f"expected a tensor or None, got {type(mk).__name__}"))
            L_m = features[m].shape[1]
            if tuple(mk.shape) != (B, L_m):
                raise ValueError(_err(f"masks[{m}]", f"expected shape ({B}, {L_m}), got {tuple(mk.shape)}"))
            if mk.dtype.is_floating_point or mk.dtype.is_complex:
                raise TypeError(_err(f"masks[{m}]", f"expected a bool or integer (1 = keep) mask, got {mk.dtype}"))
            if mk.device != f0.device:
                raise ValueError(_err(f"masks[{m}]", f"device {mk.device} differs from the features' {f0.device}"))


def _concat_masks(masks, features) -> Optional[Tensor]:
    if masks is None:
        return None
    B = features[0].shape[0]
    return torch.cat([mk.bool() if mk is not None else
                      torch.ones(B, f.shape[1], dtype=torch.bool, device=f.device)
                      for mk, f in zip(masks, features)], dim=1)


def _as_param(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Kernels take parameters as contiguous float32 (float64 for float64 features, so gradcheck
    stays meaningful). The casts are differentiable: gradients flow back in the parameter's dtype."""
    if t is None:
        return None
    return t.to(_acc_dtype(dtype)).contiguous()


def concat_embed(features, *, type_embeddings=None, pos_embeddings=None, ln_weight=None, ln_bias=None,
                 eps=1e-12, dropout_p=0.0, masks=None, backend="auto"):
    """Adds position and modality-type embeddings to each modality's tokens, concatenates the
    modalities along the sequence, applies LayerNorm and dropout, and concatenates the masks::

        features[m] (B, L_m, D) -> out (B, sum L_m, D), mask (B, sum L_m) bool or None

    ``type_embeddings`` (>= M, D); ``pos_embeddings`` a list with one (>= L_m, D) table or None per
    modality (rows [:L_m] are used); LayerNorm over D when ``ln_weight`` is given; dropout with
    probability ``dropout_p`` whenever it is > 0 (a module passes 0 in eval mode); ``masks`` a list
    with one (B, L_m) mask or None (all tokens valid) per modality. M = 1..4.

    The output has the features' dtype; parameters are used (and their gradients reduced) in
    float32. The fused faces draw dropout from a seed taken from torch's generator, so the same
    ``torch.manual_seed`` gives the same mask (but not the mask ``torch.nn.functional.dropout``
    would draw; ``backend="torch"`` runs the eager formula with it).
    """
    _check_args(features, type_embeddings, pos_embeddings, ln_weight, ln_bias, eps, dropout_p, masks)
    f0 = features[0]
    # The CUDA face keeps a row in registers (D <= 1024); larger rows go to Triton.
    limits = (("cuda", f"the CUDA face supports hidden sizes up to {_CUDA_MAX_D}, got {f0.shape[2]}"),) \
        if f0.shape[2] > _CUDA_MAX_D else ()
    be = dispatch.resolve("concat_embed", backend, f0.device.type, f0.dtype, limits,
                          bucket=_bucket(features, ln_weight, dropout_p))
    if be == "torch":
        return _provenance.reference_ran("concat_embed", _ref.concat_embed(
            list(features), type_embeddings=type_embeddings, pos_embeddings=pos_embeddings, ln_weight=ln_weight,
            ln_bias=ln_bias, eps=eps, dropout_p=dropout_p, masks=masks))
    feats = [f.contiguous() for f in features]
    pos_tables, pos_index = [], []
    for m in range(len(feats)):
        p = None if pos_embeddings is None else pos_embeddings[m]
        if p is None:
            pos_index.append(-1)
        else:
            pos_index.append(len(pos_tables))
            pos_tables.append(_as_param(p, f0.dtype))
    p = float(dropout_p)
    # A fresh 64-bit seed per call from torch's default generator (no host sync: drawn on the device).
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=f0.device) if p > 0 else None
    params = (_as_param(type_embeddings, f0.dtype), _as_param(ln_weight, f0.dtype), _as_param(ln_bias, f0.dtype))
    if plain_eager(*feats, *pos_tables, *params):
        out = _EagerConcatEmbed.apply((len(feats), len(pos_tables), pos_index, float(eps), p, be),
                                      *feats, *pos_tables, *params, seed)
    else:
        out, _, _ = _concat_embed_op(feats, params[0], pos_tables, pos_index, params[1], params[2], float(eps), p,
                                     seed, be)
    return out, _concat_masks(masks, features)
