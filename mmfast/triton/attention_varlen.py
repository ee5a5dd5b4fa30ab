"""Triton face of attention_varlen: flash-attention kernels over packed sequences (cu_seqlens).

One program per (query block, sequence, head); each reads its sequence's bounds from cu_seqlens,
so no padding is computed and there is one launch for the whole batch. Contract (see
mmfast/ops/attention_varlen.py)::

    attention_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, seed, causal, scale, dropout_p)
        -> (out, lse (H, total_q) f32)
    attention_varlen_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, seed, causal, scale,
                              dropout_p) -> (dq, dk, dv)

lse is in base 2; a query row that sees no key (0 keys, or causal rows above the bottom-right
diagonal) gets output 0 and lse = +inf, so its recomputed probabilities are 0 in the backward.
The backward recomputes the probabilities from lse: one kernel for dk/dv (loop over query blocks),
one for dq (loop over key blocks); no atomics.

Dropout: the generator of the padded Triton face (``mmfast.triton.attention._keep_mask``, the shared
Philox contract) with batch-head ``bh = b * H + h`` for sequence ``b`` and the query row and key
column counted within the sequence (mmfast/reference/attention_varlen.py), so all three kernels
regenerate the same mask and a batch of equal lengths gets the padded op's mask for the same seed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfast.dispatch import triton_interpreting
from mmfast.triton.attention import _dropout_args, _keep_mask

LOG2E = 1.4426950408889634


def _blocks(D: int):
    """(BLOCK_M, BLOCK_N, BLOCK_D): small blocks in the interpreter (speed), 64 on a GPU. tl.dot needs >= 16."""
    block = 16 if triton_interpreting() else 64
    return block, block, max(16, triton.next_power_of_2(D))


def _fwd_block_m(block_m: int, D: int, dtype: torch.dtype) -> int:
    """The forward's query rows: float32 past D = 64 takes 32 (with 64 its tiles need 234 KB of shared
    memory on sm_90 with dropout, over the 227 KB a block may have: kernels-report)."""
    return min(block_m, 32) if dtype == torch.float32 and D > 64 else block_m


def _bwd_warps(D: int) -> int:
    """The backward kernels keep fp32 (BLOCK, D) accumulators: 4 warps spill from D = 64 on sm_90."""
    return 4 if D <= 32 else 8


def _fwd_warps(D: int, dropout: bool) -> int:
    """The forward with dropout's mask tile spills at D = 128 with 4 warps on sm_90 (kernels-report)."""
    return 8 if dropout and D > 64 else 4


def _dkdv_blocks(D: int, block_m: int, block_n: int, dropout: bool = False) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the dK/dV kernel: past D = 64 its fp32 accumulators and (BLOCK_M, D) query
    tiles spill with 64-row blocks even at 8 warps, so 32 query rows from D = 33 on; with dropout's
    mask tile from D = 17 on (sm_90, kernels-report). Triton 3.6 (torch 2.11's) spilled 4 bytes at
    D = 64 and 24 bytes at D = 32 with dropout where Triton 3.8 did not: its limits count."""
    if D > 64:
        return min(block_m, 32), min(block_n, 32)
    return (min(block_m, 32), block_n) if D > 32 or (dropout and D > 16) else (block_m, block_n)


@triton.jit
def _bounds(CU_Q, CU_K, b):
    q0 = tl.load(CU_Q + b)
    k0 = tl.load(CU_K + b)
    return q0, tl.load(CU_Q + b + 1) - q0, k0, tl.load(CU_K + b + 1) - k0


@triton.jit
def _dropout_stream(SEED, b, h, DROPOUT: tl.constexpr):
    """(seed, bh) of the dropout generator for sequence b, head h: bh = b * H + h, H = the grid's
    third dimension."""
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    return seed, b * tl.num_programs(2) + h


@triton.jit
def _rows(PTR, row0, rows, n_rows, h, s_t, s_h, s_d, offs_d, D):
    """A (len(rows), BLOCK_D) tile of rows row0 + rows of head h, zeros outside, as float32."""
    ptrs = PTR + (row0 + rows)[:, None].to(tl.int64) * s_t + h * s_h + offs_d[None, :] * s_d
    return tl.load(ptrs, mask=(rows < n_rows)[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _visible(offs_m, offs_n, Lq, Lk, CAUSAL: tl.constexpr):
    """Which (query, key) pairs take part: keys of the sequence; causal bottom-right (j <= i + Lk - Lq)."""
    ok = (offs_m < Lq)[:, None] & (offs_n < Lk)[None, :]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + Lk - Lq)
    return ok


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, SEED, total_q, sq_t, sq_h, sq_d, sk_t, sk_h, sk_d, sv_t, sv_h, sv_d,
                so_t, so_h, so_d, D, scale_log2, threshold, keep_scale, CAUSAL: tl.constexpr,
                DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1)
    h = tl.program_id(2)
    q0, Lq, k0, Lk = _bounds(CU_Q, CU_K, b)
    seed, bh = _dropout_stream(SEED, b, h, DROPOUT)
    if start_m < Lq:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        q = _rows(Q, q0, offs_m, Lq, h, sq_t, sq_h, sq_d, offs_d, D)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        end_n = Lk
        if CAUSAL:  # the last key the block's last query sees, + 1
            end_n = tl.minimum(Lk, start_m + BLOCK_M + Lk - Lq)
        for start_n in range(0, end_n, BLOCK_N):
            n = start_n + offs_n
            k = _rows(K, k0, n, Lk, h, sk_t, sk_h, sk_d, offs_d, D)
            v = _rows(V, k0, n, Lk, h, sv_t, sv_h, sv_d, offs_d, D)
            s = tl.where(_visible(offs_m, n, Lq, Lk, CAUSAL), tl.dot(q, tl.trans(k)) * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row without keys so far: no NaN
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DROPOUT:  # the normaliser uses every probability, the output only the kept ones
                p = tl.where(_keep_mask(seed, bh, offs_m, start_n, threshold, BLOCK_M, BLOCK_N), p, 0.0)
            acc = acc * alpha[:, None] + tl.dot(p, v)
            m_i = m_new
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        if DROPOUT:
            out = out * keep_scale
        row_ok = offs_m < Lq
        o_ptrs = O + (q0 + offs_m)[:, None].to(tl.int64) * so_t + h * so_h + offs_d[None, :] * so_d
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d < D)[None, :])
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
        tl.store(LSE + h.to(tl.int64) * total_q + q0 + offs_m, lse, mask=row_ok)


@triton.jit
def _probs_and_ds(q, k, v, do, lse, delta, offs_m, start_n, Lq, Lk, scale_log2, seed, bh, threshold, keep_scale,
                  CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Of one tile: the dropped probabilities (what multiplied v in the forward) and d(loss)/d(scores)
    = p * (dP - delta), dP = dO v^T through the same dropout mask."""
    n = start_n + tl.arange(0, BLOCK_N)
    s = tl.dot(q, tl.trans(k)) * scale_log2
    p = tl.where(_visible(offs_m, n, Lq, Lk, CAUSAL), tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v))
    pd = p
    if DROPOUT:
        keep = _keep_mask(seed, bh, offs_m, start_n, threshold, BLOCK_M, BLOCK_N)
        pd = tl.where(keep, p * keep_scale, 0.0)
        dp = tl.where(keep, dp * keep_scale, 0.0)
    return pd, p * (dp - delta[:, None])


@triton.jit
def _query_block(Q, DO, LSE, DELTA, q0, offs_m, Lq, h, total_q, sq_t, sq_h, sq_d, sdo_t, sdo_h, sdo_d, offs_d, D):
    """q, dO, lse (+inf past the sequence) and delta of one query block, as the backward reads them."""
    q = _rows(Q, q0, offs_m, Lq, h, sq_t, sq_h, sq_d, offs_d, D)
    do = _rows(DO, q0, offs_m, Lq, h, sdo_t, sdo_h, sdo_d, offs_d, D)
    row = h.to(tl.int64) * total_q + q0 + offs_m
    lse = tl.load(LSE + row, mask=offs_m < Lq, other=float("inf"))
    delta = tl.load(DELTA + row, mask=offs_m < Lq, other=0.0)
    return q, do, lse, delta


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, SEED, total_q, sq_t, sq_h, sq_d, sk_t, sk_h, sk_d,
                 sv_t, sv_h, sv_d, sdo_t, sdo_h, sdo_d, sg_t, sg_h, sg_d, D, scale, scale_log2, threshold,
                 keep_scale, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    b = tl.program_id(1)
    h = tl.program_id(2)
    q0, Lq, k0, Lk = _bounds(CU_Q, CU_K, b)
    seed, bh = _dropout_stream(SEED, b, h, DROPOUT)
    if start_n < Lk:
        n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        k = _rows(K, k0, n, Lk, h, sk_t, sk_h, sk_d, offs_d, D)
        v = _rows(V, k0, n, Lk, h, sv_t, sv_h, sv_d, offs_d, D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        begin_m = 0
        if CAUSAL:  # the first query that sees key start_n, rounded down to a block
            begin_m = (tl.maximum(start_n - (Lk - Lq), 0) // BLOCK_M) * BLOCK_M
        for start_m in range(begin_m, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q, do, lse, delta = _query_block(Q, DO, LSE, DELTA, q0, offs_m, Lq, h, total_q, sq_t, sq_h, sq_d,
                                             sdo_t, sdo_h, sdo_d, offs_d, D)
            pd, ds = _probs_and_ds(q, k, v, do, lse, delta, offs_m, start_n, Lq, Lk, scale_log2, seed, bh,
                                   threshold, keep_scale, CAUSAL, DROPOUT, BLOCK_M, BLOCK_N)
            dv += tl.dot(tl.trans(pd), do)
            dk += tl.dot(tl.trans(ds), q)
        mask = (n < Lk)[:, None] & (offs_d < D)[None, :]
        g_off = (k0 + n)[:, None].to(tl.int64) * sg_t + h * sg_h + offs_d[None, :] * sg_d
        tl.store(DK + g_off, (dk * scale).to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, SEED, total_q, sq_t, sq_h, sq_d, sk_t, sk_h, sk_d,
               sv_t, sv_h, sv_d, sdo_t, sdo_h, sdo_d, sg_t, sg_h, sg_d, D, scale, scale_log2, threshold, keep_scale,
               CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1)
    h = tl.program_id(2)
    q0, Lq, k0, Lk = _bounds(CU_Q, CU_K, b)
    seed, bh = _dropout_stream(SEED, b, h, DROPOUT)
    if start_m < Lq:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q, do, lse, delta = _query_block(Q, DO, LSE, DELTA, q0, offs_m, Lq, h, total_q, sq_t, sq_h, sq_d,
                                         sdo_t, sdo_h, sdo_d, offs_d, D)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        end_n = Lk
        if CAUSAL:
            end_n = tl.minimum(Lk, start_m + BLOCK_M + Lk - Lq)
        for start_n in range(0, end_n, BLOCK_N):
            n = start_n + tl.arange(0, BLOCK_N)
            k = _rows(K, k0, n, Lk, h, sk_t, sk_h, sk_d, offs_d, D)
            v = _rows(V, k0, n, Lk, h, sv_t, sv_h, sv_d, offs_d, D)
            _, ds = _probs_and_ds(q, k, v, do, lse, delta, offs_m, start_n, Lq, Lk, scale_log2, seed, bh, threshold,
                                  keep_scale, CAUSAL, DROPOUT, BLOCK_M, BLOCK_N)
            dq += tl.dot(ds, k)
        g_ptrs = DQ + (q0 + offs_m)[:, None].to(tl.int64) * sg_t + h * sg_h + offs_d[None, :] * sg_d
        tl.store(g_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=(offs_m < Lq)[:, None] & (offs_d < D)[None, :])


def _strides(*ts):
    return [s for t in ts for s in t.stride()]


def _seed_arg(seed, dropout_p: float, q):
    """The seed tensor the kernels load (q, never read, without dropout)."""
    return seed if dropout_p > 0 else q


def attention_varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, seed, causal: bool, scale: float,
                             dropout_p: float = 0.0):
    total_q, H, D = q.shape
    batch = cu_q.numel() - 1
    out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
    lse = torch.empty((H, total_q), dtype=torch.float32, device=q.device)
    BM, BN, BD = _blocks(D)
    BM = _fwd_block_m(BM, D, q.dtype)
    grid = (triton.cdiv(max_q, BM), batch, H)
    if total_q and batch and H and max_q:
        _fwd_kernel[grid](q, k, v, out, lse, cu_q, cu_k, _seed_arg(seed, dropout_p, q), total_q,
                          *_strides(q, k, v, out), D, scale * LOG2E, *_dropout_args(dropout_p), CAUSAL=causal,
                          DROPOUT=dropout_p > 0, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
                          num_warps=_fwd_warps(D, dropout_p > 0))
    return out, lse


def attention_varlen_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, seed, causal: bool,
                              scale: float, dropout_p: float = 0.0):
    total_q, H, D = q.shape
    batch = cu_q.numel() - 1
    # rowsum(dO * O) per (head, query): the softmax backward's correction term (O the dropped output)
    delta = (grad_out.to(torch.float32) * out.to(torch.float32)).sum(-1).t().contiguous()
    # every row lies in some sequence and its program stores it (zeros where nothing is seen);
    # dk and dv share one layout (one offset computation in the kernel)
    dq, dk, dv = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)
    BM, BN, BD = _blocks(D)
    seed_arg, dropout = _seed_arg(seed, dropout_p, q), dropout_p > 0
    scales = (D, scale, scale * LOG2E, *_dropout_args(dropout_p))
    args = (cu_q, cu_k, seed_arg, total_q, *_strides(q, k, v, grad_out), *[s for s in dq.stride()], *scales)
    if total_q and batch and H and max_q:
        _dq_kernel[(triton.cdiv(max_q, BM), batch, H)](q, k, v, grad_out, lse, delta, dq, *args, CAUSAL=causal,
                                                     DROPOUT=dropout, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
                                                     num_warps=_bwd_warps(D))
    if k.shape[0] and batch and H and max_k:
        BM, BN = _dkdv_blocks(D, BM, BN, dropout)
        args = (cu_q, cu_k, seed_arg, total_q, *_strides(q, k, v, grad_out), *[s for s in dk.stride()], *scales)
        _dkdv_kernel[(triton.cdiv(max_k, BN), batch, H)](q, k, v, grad_out, lse, delta, dk, dv, *args,
                                                       CAUSAL=causal, DROPOUT=dropout, BLOCK_M=BM, BLOCK_N=BN,
                                                       BLOCK_D=BD, num_warps=_bwd_warps(D))
    return dq, dk, dv


# ---- the launches dispatch can make (mmfast.triton convention, for `mmfast kernels-report`) -----
def launches(arch: str = "sm_90"):
    """Forward, dQ and dK/dV kernels per dtype, head dim (32, 64, 128), causal flag and dropout, with the
    GPU's 64 x 64 blocks (``_blocks`` outside the interpreter)."""
    from mmfast.triton import Launch

    total, H, batch = 4096, 12, 64
    seed = torch.empty(1, dtype=torch.int64, device="meta")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        dname = str(dtype).replace("torch.", "")
        for D in (32, 64, 128):
            BM = BN = 64
            BD = max(16, triton.next_power_of_2(D))
            x = torch.empty((total, H, D), dtype=dtype, device="meta")
            lse = torch.empty((H, total), dtype=torch.float32, device="meta")
            cu = torch.empty(batch + 1, dtype=torch.int32, device="meta")
            strides = _strides(x, x, x, x)
            for causal in (False, True):
                for dropout_p in (0.0, 0.1):
                    dropout = dropout_p > 0
                    config = f"BM{BM} BN{BN} D{BD}" + " causal" * causal + " dropout" * dropout
                    constexprs = dict(CAUSAL=causal, DROPOUT=dropout, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD)
                    drop = _dropout_args(dropout_p)
                    fBM = _fwd_block_m(BM, D, dtype)
                    yield Launch("attention_varlen", _fwd_kernel, dname,
                                 config.replace(f"BM{BM} ", f"BM{fBM} ") + f" w{_fwd_warps(D, dropout)}",
                                 (x, x, x, x, lse, cu, cu, seed, total, *strides, D, 0.125 * LOG2E, *drop),
                                 dict(constexprs, BLOCK_M=fBM, num_warps=_fwd_warps(D, dropout)))
                    bwd = (cu, cu, seed, total, *strides, *strides[:3], D, 0.125, 0.125 * LOG2E, *drop)
                    bwd_constexprs = dict(constexprs, num_warps=_bwd_warps(D))
                    bwd_config = config + f" w{_bwd_warps(D)}"
                    yield Launch("attention_varlen", _dq_kernel, dname, bwd_config, (x, x, x, x, lse, lse, x, *bwd),
                                 bwd_constexprs)
                    BMkv, BNkv = _dkdv_blocks(D, BM, BN, dropout)
                    yield Launch("attention_varlen", _dkdv_kernel, dname,
                                 bwd_config.replace(f"BM{BM} BN{BN}", f"BM{BMkv} BN{BNkv}"),
                                 (x, x, x, x, lse, lse, x, x, *bwd), dict(bwd_constexprs, BLOCK_M=BMkv, BLOCK_N=BNkv))
