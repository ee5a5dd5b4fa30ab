"""Softmax cross-entropy, Triton face (kernel contract: top of mmfast/ops/cross_entropy.py).

One program handles ROWS rows (ROWS = 1 for large vocabularies on a GPU; more rows for small C
and under the interpreter, where fewer programs means much less Python overhead):

    pass 1  online max / sum(exp) over the row in BLOCK-wide chunks (+ the sums label smoothing
            needs: sum w_j x_j and, with class weights, sum w_j)
    pass 2  (compute_grad) the gradient times grad_scale, chunk by chunk; it may overwrite the
            logits (in place): every chunk is loaded before the same chunk is stored, and a
            program owns its rows.

When the row fits in one chunk (ONE_CHUNK: C <= 32768 on a GPU, 8192 with label smoothing) it
stays in registers from pass 1 to pass 2, so the kernel reads the logits once and writes the
gradient once; longer rows read each chunk again in pass 2 (mostly from L2).

All offsets are int64 (N*C may exceed 2^31). A target outside [0, C) that is not ignore_index
reads nothing out of bounds: its row gets loss NaN and a NaN gradient, and the host wrapper
raises (CPU/interpreter) or queues a device-side assert (``torch._assert_async``, no host sync).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from mmfast.dispatch import triton_interpreting


@triton.jit
def _stats_update(x, mask, cm, cols, w_ptr, m, s, swx, wtot, SMOOTH: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """Pass 1 on one (ROWS, BLOCK) chunk ``x`` (float32, -inf where masked): the running max m,
    sum(exp(x - m)) s, and the sums label smoothing needs, sum w_j x_j and sum w_j."""
    m_new = tl.maximum(m, tl.max(x, 1))
    # A chunk of only -inf keeps m = -inf: shift by 0 then so exp() gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
    if SMOOTH:
        xz = tl.where(mask, x, 0.0)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=cm, other=0.0)
            swx += tl.sum(xz * w[None, :], 1)
            wtot += tl.sum(tl.where(mask, w[None, :], 0.0), 1)
        else:
            swx += tl.sum(xz, 1)
    return m_new, s, swx, wtot


@triton.jit
def _row_loss(x_row, rows, row_ok, active, ignored, bad, t, w_ptr, loss_ptr, scale_ptr, scale_stride, m, s, swx,
              wtot, C, eps, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, HAS_SCALE: tl.constexpr):
    """Stores the rows' losses; returns what pass 2 needs: (m_fin, coef, a * scale, scale)."""
    # torch computes x - max: a row made only of -inf (or holding +inf / NaN) gives NaN.
    lse = tl.where(m == float("-inf"), float("nan"), m + tl.log(tl.where(m == float("-inf"), 1.0, s)))
    t_safe = tl.where(active, t, 0)
    x_t = tl.load(x_row + t_safe, mask=active, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        w_t = tl.load(w_ptr + t_safe, mask=active, other=0.0)
    else:
        w_t = tl.full(t.shape, 1.0, tl.float32)
    if not HAS_WEIGHT:
        wtot = tl.full(t.shape, 1.0, tl.float32) * C
    a = (1.0 - eps) * w_t
    loss = a * (lse - x_t)
    if SMOOTH:
        loss += eps / C * (wtot * lse - swx)
    loss = tl.where(ignored, 0.0, tl.where(bad, float("nan"), loss))
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + rows * scale_stride, mask=row_ok, other=0.0)
    else:
        scale = tl.full(t.shape, 1.0, tl.float32)
    # p_j = exp(x_j - max) / sum: x_j - max is exact, x_j - lse would lose digits at |x| ~ 1e4
    m_fin = tl.where(m == float("-inf"), 0.0, m)
    coef = (a + eps / C * wtot) * scale / tl.where(active, s, 1.0)  # s = 0 (all -inf): NaN, as torch
    return m_fin, coef, a * scale, scale


@triton.jit
def _grad_chunk(x, cols, cm, w_ptr, t, ignored, bad, m_fin, coef, a_scale, scale, C, eps,
                SMOOTH: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """Pass 2 on one chunk: the gradient, already multiplied by the row's scale."""
    g = tl.exp(x - m_fin[:, None]) * coef[:, None]
    if SMOOTH:
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=cm, other=0.0)
            g -= (eps / C) * w[None, :] * scale[:, None]
        else:
            g -= (eps / C) * scale[:, None]
    g = tl.where(cols[None, :] == t[:, None], g - a_scale[:, None], g)
    return tl.where(ignored[:, None], 0.0, tl.where(bad[:, None], float("nan"), g))


@triton.jit
def _ce_kernel(x_ptr, x_stride, g_ptr, g_stride, t_ptr, w_ptr, loss_ptr, scale_ptr, scale_stride,
               N, C, ignore_index, eps,
               HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, HAS_SCALE: tl.constexpr,
               COMPUTE_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
               ONE_CHUNK: tl.constexpr = False):
    # ONE_CHUNK (the host checked C <= BLOCK): the row stays in registers from pass 1 to pass 2,
    # so the logits are read once; otherwise pass 2 reads each chunk again.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < N
    t = tl.load(t_ptr + rows, mask=row_ok, other=ignore_index)
    ignored = t == ignore_index
    bad = (~ignored) & ((t < 0) | (t >= C))
    active = row_ok & (~ignored) & (~bad)
    x_row = x_ptr + rows * x_stride
    g_row = g_ptr + rows * g_stride
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    swx = tl.zeros([ROWS], tl.float32)
    wtot = tl.zeros([ROWS], tl.float32)
    if ONE_CHUNK:
        cols = tl.arange(0, BLOCK).to(tl.int64)
        cm = cols < C
        mask = active[:, None] & cm[None, :]
        x = tl.load(x_row[:, None] + cols[None, :], mask=mask, other=float("-inf"))
        m, s, swx, wtot = _stats_update(x.to(tl.float32), mask, cm, cols, w_ptr, m, s, swx, wtot, SMOOTH,
                                        HAS_WEIGHT)
        m_fin, coef, a_scale, scale = _row_loss(x_row, rows, row_ok, active, ignored, bad, t, w_ptr, loss_ptr,
                                                scale_ptr, scale_stride, m, s, swx, wtot, C, eps,
                                                HAS_WEIGHT, SMOOTH, HAS_SCALE)
        if COMPUTE_GRAD:
            g = _grad_chunk(x.to(tl.float32), cols, cm, w_ptr, t, ignored, bad, m_fin, coef, a_scale, scale, C,
                            eps, SMOOTH, HAS_WEIGHT)
            tl.store(g_row[:, None] + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & cm[None, :])
    else:
        for c0 in range(0, C, BLOCK):
            cols = c0 + tl.arange(0, BLOCK).to(tl.int64)
            cm = cols < C
            mask = active[:, None] & cm[None, :]
            x = tl.load(x_row[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            m, s, swx, wtot = _stats_update(x, mask, cm, cols, w_ptr, m, s, swx, wtot, SMOOTH, HAS_WEIGHT)
        m_fin, coef, a_scale, scale = _row_loss(x_row, rows, row_ok, active, ignored, bad, t, w_ptr, loss_ptr,
                                                scale_ptr, scale_stride, m, s, swx, wtot, C, eps,
                                                HAS_WEIGHT, SMOOTH, HAS_SCALE)
        if COMPUTE_GRAD:  # pass 2 reads each chunk again
            for c0 in range(0, C, BLOCK):
                cols = c0 + tl.arange(0, BLOCK).to(tl.int64)
                cm = cols < C
                mask = active[:, None] & cm[None, :]
                x = tl.load(x_row[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
                g = _grad_chunk(x, cols, cm, w_ptr, t, ignored, bad, m_fin, coef, a_scale, scale, C, eps,
                                SMOOTH, HAS_WEIGHT)
                tl.store(g_row[:, None] + cols[None, :], g.to(g_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & cm[None, :])


_ONE_CHUNK_MAX = 32768  # longest row kept in registers between the passes (32 warps, sm_90: no spills)


def _launch_config(N: int, C: int, compute_grad: bool, smooth: bool) -> tuple[int, int, int, bool]:
    """(ROWS, BLOCK, num_warps, ONE_CHUNK). ONE_CHUNK (only when C <= BLOCK) keeps the row in
    registers for the gradient pass: the kernel then reads the logits once."""
    block_c = triton.next_power_of_2(max(C, 1))
    if triton_interpreting():
        # numpy executes a whole block at once: big blocks, few programs.
        block = min(block_c, 32768)
        rows = max(1, min(4096, (1 << 18) // block, triton.next_power_of_2(max(N, 1))))
        return rows, block, 1, compute_grad and C <= block
    return _gpu_launch_config(N, C, compute_grad, smooth)


def _gpu_launch_config(N: int, C: int, compute_grad: bool, smooth: bool) -> tuple[int, int, int, bool]:
    """Register use of every choice here was read from sm_90 compiles (bundled ptxas -v, bf16/fp16/
    fp32, with and without weights/smoothing): none spills."""
    block_c = triton.next_power_of_2(max(C, 1))
    if C < 2048:  # several rows per program, ~2048 values (4096 needed ~240 registers)
        rows = max(1, min(16, 2048 // block_c, triton.next_power_of_2(max(N, 1))))
        return rows, block_c, 4 if block_c >= 1024 or block_c <= 32 else 8, compute_grad
    if compute_grad and (block_c <= 8192 or (block_c <= _ONE_CHUNK_MAX and not smooth)):
        # 16..64 values per thread. The smoothing sums tip the one-chunk row into spills from 16384
        # classes on (Triton 3.6, torch 2.11's: 44-48 bytes with 32 warps, 144-160 with 16; Triton
        # 3.8 spills from 32768): smoothing past 8192 classes takes the two-pass path instead
        return 1, block_c, max(4, min(32, block_c // 512)), True
    return 1, min(block_c, 8192), 8 if C <= 16384 or smooth else 16, False  # 16 warps + smoothing: 8 B spill


def _check_targets(target: torch.Tensor, C: int, ignore_index: int) -> None:
    """Out-of-range targets: an error on the CPU, a device-side assert on the GPU (no host sync)."""
    if target.numel() == 0:
        return
    ok = ((target >= 0) & (target < C)) | (target == ignore_index)
    if target.device.type == "cpu":
        if not bool(ok.all()):
            bad = target[~ok][0].item()
            raise RuntimeError(f"mmfast: argument 'target': class index {bad} is outside [0, {C}) and is not "
                               f"ignore_index={ignore_index}")
    else:
        torch._assert_async(ok.all(), "mmfast cross_entropy: argument 'target' holds a class index outside [0, C)")


def _run(logits, target, weight, ignore_index, label_smoothing, grad, grad_scale):
    N, C = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N == 0:
        return loss
    if C == 0:
        raise RuntimeError(f"mmfast: argument 'logits': expected at least one class, got shape {tuple(logits.shape)}")
    if C > 1 and logits.stride(1) != 1:
        raise RuntimeError(f"mmfast: argument 'logits': expected unit stride along the class dimension, got "
                           f"strides {logits.stride()}")
    if target.dtype != torch.int64:
        raise RuntimeError(f"mmfast: argument 'target': expected int64, got {target.dtype}")
    target = target.contiguous()
    _check_targets(target, C, ignore_index)
    if weight is not None:
        weight = weight.contiguous()
        if weight.dtype != torch.float32:
            raise RuntimeError(f"mmfast: argument 'weight': expected float32, got {weight.dtype}")
    scale_stride = 0
    if grad_scale is not None:
        grad_scale = grad_scale.contiguous()
        if grad_scale.dtype != torch.float32 or grad_scale.numel() not in (1, N):
            raise RuntimeError(f"mmfast: argument 'grad_scale': expected float32 with 1 or {N} elements")
        scale_stride = 0 if grad_scale.numel() == 1 else 1
    smooth = float(label_smoothing) != 0.0
    rows, block, warps, one_chunk = _launch_config(N, C, grad is not None, smooth)
    g = grad if grad is not None else logits  # unused when COMPUTE_GRAD is off
    with _device_guard(logits):
        _ce_kernel[(triton.cdiv(N, rows),)](
            logits, logits.stride(0), g, g.stride(0) if g.dim() == 2 else 0, target,
            weight if weight is not None else loss, loss,
            grad_scale if grad_scale is not None else loss, scale_stride,
            N, C, ignore_index, float(label_smoothing),
            HAS_WEIGHT=weight is not None, SMOOTH=smooth,
            HAS_SCALE=grad_scale is not None, COMPUTE_GRAD=grad is not None,
            ROWS=rows, BLOCK=block, ONE_CHUNK=one_chunk, num_warps=warps)
    return loss


def _device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def cross_entropy_forward(logits, target, weight, ignore_index, label_smoothing, compute_grad, grad_scale):
    """(loss (N,) f32, grad (N, C) logits.dtype or (0,)): see mmfast/ops/cross_entropy.py."""
    N, C = logits.shape
    grad = torch.empty((N, C), dtype=logits.dtype, device=logits.device) if compute_grad else None
    loss = _run(logits, target, weight, int(ignore_index), label_smoothing, grad, grad_scale)
    return loss, grad if grad is not None else logits.new_empty((0,))


def cross_entropy_forward_inplace(logits, target, weight, ignore_index, label_smoothing, grad_scale):
    """Per-row loss; the gradient overwrites ``logits``."""
    return _run(logits, target, weight, int(ignore_index), label_smoothing, logits, grad_scale)


# ---- contrastive loss: the gradient of one logits tile, both directions at once ------------------
@triton.jit
def _contrastive_grad_kernel(L_ptr, stride, lse_r_ptr, lse_c_ptr, B, N, i0, eps,
                             BM: tl.constexpr, BN: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    rm, cm = r < B, c < N
    mask = rm[:, None] & cm[None, :]
    ptrs = L_ptr + r[:, None] * stride + c[None, :]
    L = tl.load(ptrs, mask=mask, other=0.0)
    lr = tl.load(lse_r_ptr + r, mask=rm, other=0.0)
    lc = tl.load(lse_c_ptr + c, mask=cm, other=0.0)
    # softmax over the row (image->text) + softmax over the column (text->image) - 2 * target
    p = tl.exp(L - lr[:, None]) + tl.exp(L - lc[None, :]) - 2.0 * eps / N
    p = tl.where((r[:, None] + i0) == c[None, :], p - 2.0 * (1.0 - eps), p)
    tl.store(ptrs, p / (2.0 * N), mask=mask)


def contrastive_grad_tile(L, lse_r, lse_c, i0, eps, N):
    """dL of the symmetric contrastive loss for the row tile ``L`` = logits[i0:i0+B] (float32,
    overwritten in place); lse_r (B,) row and lse_c (N,) column log-sum-exps."""
    B = L.shape[0]
    if B == 0 or N == 0:
        return L
    if L.stride(1) != 1 or L.dtype != torch.float32:
        raise RuntimeError("mmfast: contrastive_grad_tile expects a float32 tile with unit column stride")
    bm, bn = (128, 128) if triton_interpreting() else (64, 128)
    with _device_guard(L):
        _contrastive_grad_kernel[(triton.cdiv(B, bm), triton.cdiv(N, bn))](
            L, L.stride(0), lse_r.contiguous(), lse_c.contiguous(), B, N, i0, float(eps), BM=bm, BN=bn)
    return L


# ---- the launches dispatch can make (mmfast.triton convention, for `mmfast kernels-report`) -----
def launches(arch: str = "sm_90"):
    """The cross-entropy kernel per dtype and per regime of ``_gpu_launch_config`` (class counts from
    2 to 65536), with its flags all off and all on (the most registers), with and without the
    gradient; the contrastive tile kernel (float32)."""
    from mmfast.triton import Launch

    N = 4096
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for C in (2, 64, 1024, 4096, 16384, 30522, 65536):
            x = torch.empty((N, C), dtype=dtype, device="meta")
            t = torch.empty(N, dtype=torch.int64, device="meta")
            w = loss = torch.empty(N, dtype=torch.float32, device="meta")
            for flags in (False, True):
                for grad in (False, True):
                    rows, block, warps, one_chunk = _gpu_launch_config(N, C, grad, flags)
                    yield Launch("cross_entropy", _ce_kernel, str(dtype).replace("torch.", ""),
                                 f"ROWS{rows} BLOCK{block} w{warps}" + " one-chunk" * one_chunk
                                 + " weight smooth scale" * flags + " grad" * grad,
                                 (x, C, x, C, t, w, loss, loss, 0, N, C, -100, 0.1),
                                 dict(HAS_WEIGHT=flags, SMOOTH=flags, HAS_SCALE=flags, COMPUTE_GRAD=grad, ROWS=rows,
                                      BLOCK=block, ONE_CHUNK=one_chunk, num_warps=warps))
    L = torch.empty((256, 256), dtype=torch.float32, device="meta")
    lse = torch.empty(256, dtype=torch.float32, device="meta")
    yield Launch("cross_entropy", _contrastive_grad_kernel, "float32", "BM64 BN128 w4",
                 (L, 256, lse, lse, 256, 256, 0, 0.1), dict(BM=64, BN=128))
