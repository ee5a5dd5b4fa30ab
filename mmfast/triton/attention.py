"""Attention, Triton face: flash-attention forward (online softmax, saves the log-sum-exp) and a
recomputing backward (one kernel for dK/dV, one for dQ: no atomics, deterministic).

Semantics (see mmfast/ops/attention.py): key padding mask (bool (B, Lk), True = attend) and causal
(bottom-right aligned when Lq != Lk) are applied in-kernel; a query row with no visible key gives
a zero output and zero gradients; every length >= 1 is boundary-checked; D a multiple of 8 up to
128 is padded to a power of two inside the kernel with masked loads. Inputs may have any strides
(e.g. transposed (B, L, H, D) views). Dropout is in-kernel: the keep mask is a Philox function of
(seed, batch*head, row, column), the seed a tensor drawn from torch's generator, so the backward
regenerates exactly the forward's mask and nothing of size Lq x Lk is stored.

The log-sum-exp is kept in base 2 (scores are pre-multiplied by scale * log2(e), exp2 in the
loop). float32 inputs use IEEE-precision dots unless torch.backends.cuda.matmul.allow_tf32 is set.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mmfast import dispatch

_LOG2E = 1.4426950408889634


@triton.jit
def _keep_mask(seed, bh, rows, cols, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dropout keep mask [BLOCK_M, BLOCK_N]: Philox(seed; col, row, batch*head) >= p."""
    zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    c0 = cols[None, :] + zero
    c1 = rows[:, None] + zero
    c2 = zero + bh
    r, _, _, _ = tl.philox(seed, c0, c1, c2, zero)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _valid(rows, cols, mask_row_ptr, smn, Lq, Lk,
           HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """Which (row, col) scores take part: in bounds, key not padded, causal (bottom-right)."""
    ok = (rows[:, None] < Lq) & (cols[None, :] < Lk)
    if HAS_MASK:
        km = tl.load(mask_row_ptr + cols.to(tl.int64) * smn, mask=cols < Lk, other=0)
        ok = ok & (km != 0)[None, :]
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + (Lk - Lq))
    return ok


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, MASK, SEED,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sob, soh, som, sod, smb, smn,
    H, Lq, Lk, D, num_m_blocks, qk_scale, dropout_p,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q = tl.load(Q + b * sqb + h * sqh + rows[:, None].to(tl.int64) * sqm + offs_d[None, :] * sqd,
                mask=(rows[:, None] < Lq) & d_ok[None, :], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    mask_row = MASK + b * smb
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = Lk
    if CAUSAL:  # the last key any row of this block sees is (last row) + Lk - Lq
        hi = tl.minimum(Lk, tl.maximum((pid_m + 1) * BLOCK_M + Lk - Lq, 0))
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = (cols[:, None] < Lk) & d_ok[None, :]
        k = tl.load(k_base + cols[:, None].to(tl.int64) * skn + offs_d[None, :] * skd, mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        ok = _valid(rows, cols, mask_row, smn, Lq, Lk, HAS_MASK, CAUSAL)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no key yet keeps m = -inf: subtract 0 instead (exp2(-inf) = 0)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # the normaliser uses every probability, the output only the kept ones
            p = tl.where(_keep_mask(seed, bh, rows, cols, dropout_p, BLOCK_M, BLOCK_N), p, 0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * svn + offs_d[None, :] * svd, mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    empty = l_i == 0.0  # no visible key: output 0, lse 0 (the backward then sees p = 0)
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    row_ok = rows < Lq
    tl.store(O + b * sob + h * soh + rows[:, None].to(tl.int64) * som + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(empty, 0.0, m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + bh.to(tl.int64) * Lq + rows, lse, mask=row_ok)

@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, sob, soh, som, sod, sdob, sdoh, sdom, sdod, H, Lq, D, num_m_blocks,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta_i = dO_i . O_i, taken as the diagonal of tl.dot(dO, O^T): the same reduction as the
    dP = dO V^T dots of the backward, so a row with a single visible key (p = 1, O = V) gets
    dP - delta = 0 exactly, as the reference does (a plain sum would leave rounding noise)."""
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows[:, None] < Lq) & (offs_d[None, :] < D)
    o = tl.load(O + b * sob + h * soh + rows[:, None].to(tl.int64) * som + offs_d[None, :] * sod, mask=ok, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None].to(tl.int64) * sdom + offs_d[None, :] * sdod,
                 mask=ok, other=0.0)
    prod = tl.dot(do, tl.trans(o.to(do.dtype)), input_precision=PREC)
    diag = tl.arange(0, BLOCK_M)[:, None] == tl.arange(0, BLOCK_M)[None, :]
    delta = tl.sum(tl.where(diag, prod, 0.0), 1)
    tl.store(DELTA + bh.to(tl.int64) * Lq + rows, delta, mask=rows < Lq)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, MASK, SEED,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod, smb, smn,
    H, Lq, Lk, D, num_n_blocks, qk_scale, sm_scale, dropout_p,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (batch*head, key block): loops over the query blocks that see it."""
    pid = tl.program_id(0)
    pid_n = pid % num_n_blocks
    bh = pid // num_n_blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_ok = (cols[:, None] < Lk) & d_ok[None, :]
    k = tl.load(K + b * skb + h * skh + cols[:, None].to(tl.int64) * skn + offs_d[None, :] * skd, mask=kv_ok, other=0.0)
    v = tl.load(V + b * svb + h * svh + cols[:, None].to(tl.int64) * svn + offs_d[None, :] * svd, mask=kv_ok, other=0.0)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    mask_row = MASK + b * smb
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    lo = 0
    if CAUSAL:  # the first row that sees key pid_n * BLOCK_N is that key - (Lk - Lq)
        lo = tl.maximum(pid_n * BLOCK_N - (Lk - Lq), 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    for start_m in range(lo, Lq, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < Lq
        qd_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None].to(tl.int64) * sqm + offs_d[None, :] * sqd, mask=qd_ok, other=0.0)
        do = tl.load(do_base + rows[:, None].to(tl.int64) * sdom + offs_d[None, :] * sdod, mask=qd_ok, other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        ok = _valid(rows, cols, mask_row, smn, Lq, Lk, HAS_MASK, CAUSAL)
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if DROPOUT:
            keep = _keep_mask(seed, bh, rows, cols, dropout_p, BLOCK_M, BLOCK_N)
            inv_keep = 1.0 / (1.0 - dropout_p)
            pd = tl.where(keep, p * inv_keep, 0.0)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        else:
            pd = p
        dv += tl.dot(tl.trans(pd).to(do.dtype), do, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)

    dk = dk * sm_scale
    tl.store(DK + bh.to(tl.int64) * Lk * D + cols[:, None].to(tl.int64) * D + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + bh.to(tl.int64) * Lk * D + cols[:, None].to(tl.int64) * D + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, MASK, SEED,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod, smb, smn,
    H, Lq, Lk, D, num_m_blocks, qk_scale, sm_scale, dropout_p,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (batch*head, query block): loops over the key blocks it sees."""
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok = rows < Lq
    qd_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None].to(tl.int64) * sqm + offs_d[None, :] * sqd, mask=qd_ok, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None].to(tl.int64) * sdom + offs_d[None, :] * sdod,
                 mask=qd_ok, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    mask_row = MASK + b * smb
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, tl.maximum((pid_m + 1) * BLOCK_M + Lk - Lq, 0))
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = (cols[:, None] < Lk) & d_ok[None, :]
        k = tl.load(k_base + cols[:, None].to(tl.int64) * skn + offs_d[None, :] * skd, mask=kv_ok, other=0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * svn + offs_d[None, :] * svd, mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        ok = _valid(rows, cols, mask_row, smn, Lq, Lk, HAS_MASK, CAUSAL)
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if DROPOUT:
            keep = _keep_mask(seed, bh, rows, cols, dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)

    dq = dq * sm_scale
    tl.store(DQ + bh.to(tl.int64) * Lq * D + rows[:, None].to(tl.int64) * D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=qd_ok)


# ---------------------------------------------------------------------------------------------
# Launch configuration

def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _cfg(bm, bn, warps, stages):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


def fwd_configs(Lq: int, Lk: int, block_d: int) -> list[dict]:
    """Forward candidates, the shape heuristic first. Short queries (cross-modal text -> image,
    Lq <= 64) get a query block just covering Lq (no wasted rows: a 40-token text is one block of
    64, not half of a 128 block) and wide key blocks; long sequences the usual flash tiles."""
    bn_cap = _pow2_at_least(Lk, 16)
    if Lq <= 64:
        bm = _pow2_at_least(Lq, 16)
        first = _cfg(bm, min(128 if block_d <= 64 else 64, bn_cap), 4, 3 if block_d <= 64 else 2)
        alts = [_cfg(bm, 64, 4, 2), _cfg(bm, 128, 8, 3), _cfg(max(16, bm // 2), 128, 4, 3), _cfg(bm, 32, 4, 2)]
    else:
        first = _cfg(128 if block_d <= 64 else 64, 64, 4 if block_d <= 64 else 8, 3 if block_d <= 64 else 2)
        alts = [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 128, 8, 2), _cfg(64, 32, 4, 3), _cfg(128, 32, 4, 3)]
    out = [first]
    for c in alts:
        c["BLOCK_N"] = min(c["BLOCK_N"], bn_cap)
        if c not in out:
            out.append(c)
    return out


def bwd_configs(Lq: int, Lk: int, block_d: int) -> list[dict]:
    """dK/dV programs own a key block and sweep queries; dQ programs the reverse (one config for
    the three backward kernels)."""
    bm_cap, bn_cap = _pow2_at_least(Lq, 16), _pow2_at_least(Lk, 16)
    first = _cfg(min(64, bm_cap), min(64 if block_d <= 64 else 32, bn_cap), 4, 2)
    alts = [_cfg(64, 64, 4, 3), _cfg(32, 64, 4, 2), _cfg(64, 128, 8, 2), _cfg(128, 64, 8, 2), _cfg(32, 32, 4, 2)]
    out = [first]
    for c in alts:
        c["BLOCK_M"], c["BLOCK_N"] = min(c["BLOCK_M"], bm_cap), min(c["BLOCK_N"], bn_cap)
        if c not in out:
            out.append(c)
    return out


def fwd_config(Lq: int, Lk: int, block_d: int) -> dict:
    return fwd_configs(Lq, Lk, block_d)[0]


def bwd_config(Lq: int, Lk: int, block_d: int) -> dict:
    return bwd_configs(Lq, Lk, block_d)[0]


def _autotuning() -> bool:
    """On a GPU the candidates are timed once per shape bucket (MMFAST_ATTN_AUTOTUNE=0: always the
    heuristic first candidate). The interpreter always uses the heuristic."""
    return not dispatch.triton_interpreting() and os.environ.get("MMFAST_ATTN_AUTOTUNE", "1") != "0"


_tuned: dict = {}


def _choose(key: tuple, candidates: list[dict], run) -> dict:
    """The fastest candidate for ``key`` (timed with ``run(cfg)``, which overwrites its outputs);
    a candidate that fails to compile (e.g. out of shared memory) is skipped."""
    if len(candidates) == 1 or not _autotuning():
        return candidates[0]
    if key not in _tuned:
        from triton.testing import do_bench

        best, best_ms = candidates[0], float("inf")
        for cfg in candidates:
            try:
                ms = do_bench(lambda: run(cfg), warmup=3, rep=15)
            except Exception:  # noqa: BLE001 (a config the compiler or the GPU rejects)
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        _tuned[key] = best
    return _tuned[key]


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _launch_opts(cfg: dict) -> dict:
    if dispatch.triton_interpreting():  # warps/stages mean nothing to the interpreter
        return {}
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # the default; ignored for 16-bit inputs


def _mask_args(key_padding_mask, q):
    if key_padding_mask is None:
        return q, 0, 0, False  # dummy pointer, never read
    m = key_padding_mask.view(torch.uint8)  # same bytes as bool; Triton loads it as integers
    return m, m.stride(0), m.stride(1), True


def _check(q, k, v):
    D = q.shape[-1]
    if D % 8 != 0 or not 8 <= D <= 128:
        raise ValueError(f"mmfast.attention (triton): head dim D must be a multiple of 8 in [8, 128], got {D}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"mmfast.attention (triton): argument 'q' dtype {q.dtype} not supported")


def attention_forward(q, k, v, key_padding_mask, seed, causal, scale, dropout_p):
    _check(q, k, v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if Lk == 0:  # no key at all: every row is fully masked
        return out.zero_(), lse.zero_()
    block_d = _pow2_at_least(D, 16)
    mask, smb, smn, has_mask = _mask_args(key_padding_mask, q)
    dropout = dropout_p > 0

    def run(cfg):
        num_m = triton.cdiv(Lq, cfg["BLOCK_M"])
        _attn_fwd_kernel[(num_m * B * H,)](
            q, k, v, out, lse, mask, seed if dropout else q,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), smb, smn,
            H, Lq, Lk, D, num_m, float(scale) * _LOG2E, float(dropout_p),
            HAS_MASK=has_mask, CAUSAL=bool(causal), DROPOUT=dropout, PREC=_precision(q.dtype),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, **_launch_opts(cfg),
        )

    key = ("fwd", q.dtype, block_d, has_mask, bool(causal), dropout, _bucket(Lq), _bucket(Lk), _bucket(B * H))
    run(_choose(key, fwd_configs(Lq, Lk, block_d), run))
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, key_padding_mask, seed, causal, scale, dropout_p):
    _check(q, k, v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, Lk, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H, Lk, D), dtype=v.dtype, device=v.device)
    if B * H == 0 or Lq == 0 or Lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = _pow2_at_least(D, 16)
    mask, smb, smn, has_mask = _mask_args(key_padding_mask, q)
    dropout = dropout_p > 0
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), smb, smn)
    seed_arg = seed if dropout else q
    # delta_i = sum_d dO_i O_i = sum_j P~_ij dP~_ij (also with dropout: O is the dropped output)
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)

    def run(cfg):
        common = dict(HAS_MASK=has_mask, CAUSAL=bool(causal), DROPOUT=dropout, PREC=_precision(q.dtype),
                      BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, **_launch_opts(cfg))
        num_m = triton.cdiv(Lq, cfg["BLOCK_M"])
        _attn_bwd_delta_kernel[(num_m * B * H,)](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), H, Lq, D, num_m,
            PREC=_precision(q.dtype), BLOCK_M=cfg["BLOCK_M"], BLOCK_D=block_d, **_launch_opts(cfg))
        num_n = triton.cdiv(Lk, cfg["BLOCK_N"])
        _attn_bwd_dkdv_kernel[(num_n * B * H,)](
            q, k, v, grad_out, lse, delta, dk, dv, mask, seed_arg, *strides,
            H, Lq, Lk, D, num_n, float(scale) * _LOG2E, float(scale), float(dropout_p), **common)
        _attn_bwd_dq_kernel[(num_m * B * H,)](
            q, k, v, grad_out, lse, delta, dq, mask, seed_arg, *strides,
            H, Lq, Lk, D, num_m, float(scale) * _LOG2E, float(scale), float(dropout_p), **common)

    key = ("bwd", q.dtype, block_d, has_mask, bool(causal), dropout, _bucket(Lq), _bucket(Lk), _bucket(B * H))
    run(_choose(key, bwd_configs(Lq, Lk, block_d), run))
    return dq, dk, dv
