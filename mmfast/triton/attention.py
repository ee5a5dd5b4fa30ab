"""Attention, Triton face: flash-attention forward (online softmax, saves the log-sum-exp) and a
recomputing backward (one kernel for dK/dV, one for dQ: no atomics, deterministic).

Semantics (see mmfast/ops/attention.py): key padding mask (bool (B, Lk), True = attend) and causal
(bottom-right aligned when Lq != Lk) are applied in-kernel; a query row with no visible key gives
a zero output and zero gradients; every length >= 1 is boundary-checked; D a multiple of 8 up to
128 is padded to a power of two inside the kernel with masked loads. Inputs may have any strides
(e.g. transposed (B, L, H, D) views). Dropout is in-kernel, by the generator contract every face
shares (mmfast/reference/dropout.py): the keep mask is a Philox4x32-10 function of (seed,
batch*head, row, column), one Philox call per four neighbouring columns, compared with an integer
threshold computed on the host; the seed is a tensor drawn from torch's generator, so the backward
regenerates exactly the forward's mask and nothing of size Lq x Lk is stored.

Launch configurations are static (no timing inside a user call): mmfast/triton_attention_configs.json
holds the tuned (BLOCK_M, BLOCK_N, warps, stages) per (arch, dtype, head-dim block, Lq bucket, causal,
dropout), written offline on a GPU by ``MMFAST_TUNE=1 python -m mmfast.tune``; keys it lacks get the
heuristic default, chosen so that no fp16/bf16 default spills registers on sm_90 (``mmfast
kernels-report`` compiles every configuration this module can launch and checks that).

The log-sum-exp is kept in base 2 (scores are pre-multiplied by scale * log2(e), exp2 in the
loop). float32 inputs use IEEE-precision dots unless torch.backends.cuda.matmul.allow_tf32 is set.
"""

from __future__ import annotations

import contextlib
import json
import os
from functools import lru_cache
from pathlib import Path

import torch
import triton
import triton.language as tl

from mmfast import dispatch
from mmfast.reference.dropout import dropout_threshold

_LOG2E = 1.4426950408889634


@triton.jit
def _keep_mask(seed, bh, rows, start_n, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dropout keep mask [BLOCK_M, BLOCK_N] of query ``rows`` x key columns start_n + [0, BLOCK_N)
    (start_n a multiple of 4): Philox4x32-10 with counter (column >> 2, row, batch*head, 0) gives
    the words of four neighbouring columns in one call; word (column & 3) >= threshold keeps."""
    GROUPS: tl.constexpr = BLOCK_N // 4
    zero = tl.zeros([BLOCK_M, GROUPS], dtype=tl.uint32)
    c0 = (start_n // 4 + tl.arange(0, GROUPS)).to(tl.uint32)[None, :] + zero
    c1 = rows.to(tl.uint32)[:, None] + zero
    c2 = zero + bh.to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, zero)
    # [M, G, 2, 2] with element [m, g, x, y] = word 2x + y of group g, i.e. column 4g + 2x + y
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK_M, BLOCK_N])
    return words >= threshold.to(tl.uint32)


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
    H, Lq, Lk, D, num_m_blocks, qk_scale, threshold, keep_scale,
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
            p = tl.where(_keep_mask(seed, bh, rows, start_n, threshold, BLOCK_M, BLOCK_N), p, 0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * svn + offs_d[None, :] * svd, mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    empty = l_i == 0.0  # no visible key: output 0, lse 0 (the backward then sees p = 0)
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    if DROPOUT:
        inv_l = inv_l * keep_scale
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
    H, Lq, Lk, D, num_n_blocks, qk_scale, sm_scale, threshold, keep_scale,
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
            keep = _keep_mask(seed, bh, rows, pid_n * BLOCK_N, threshold, BLOCK_M, BLOCK_N)
            pd = tl.where(keep, p * keep_scale, 0.0)
            dp = tl.where(keep, dp * keep_scale, 0.0)
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
    H, Lq, Lk, D, num_m_blocks, qk_scale, sm_scale, threshold, keep_scale,
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
            keep = _keep_mask(seed, bh, rows, start_n, threshold, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)

    dq = dq * sm_scale
    tl.store(DQ + bh.to(tl.int64) * Lq * D + rows[:, None].to(tl.int64) * D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=qd_ok)


# ---------------------------------------------------------------------------------------------
# Launch configuration: static (a table and a heuristic), never timed inside a user call

LQ_BUCKETS = (32, 64, 128)  # a query length's bucket: the first >= Lq; 128 stands for every Lq > 64
HEAD_DIM_BLOCKS = (16, 32, 64, 128)  # BLOCK_D: D padded to a power of two (D is a multiple of 8, <= 128)
DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# next to kernel_table.json: packaged by pyproject's package-data ("*.json" at the package root)
TABLE_PATH = Path(__file__).resolve().parent.parent / "triton_attention_configs.json"


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _cfg(bm, bn, warps, stages):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


def lq_bucket(Lq: int) -> int:
    return next((b for b in LQ_BUCKETS[:-1] if Lq <= b), LQ_BUCKETS[-1])


def table_key(dtype: torch.dtype, block_d: int, lqb: int, causal: bool, dropout: bool) -> str:
    return (f"{DTYPES[dtype]}/D{block_d}/Lq{lqb}/{'causal' if causal else 'full'}/"
            f"{'dropout' if dropout else 'nodropout'}")


def _default_fwd(dtype, block_d, lqb, dropout) -> dict:
    """The forward's config where the table has none. Short queries (cross-modal text -> image,
    Lq <= 64) get a query block just covering the bucket (a 40-token text is one block of 64, not
    a third of a 128 block) and wide key blocks; long sequences the usual flash tiles. float32
    (IEEE dots on CUDA cores, no tensor cores) gets tiles small enough not to spill."""
    if dtype == torch.float32:
        return _cfg(min(lqb, 32 if block_d >= 64 else 64), 32, 4, 1)
    if lqb <= 64:
        return _cfg(lqb, 128 if block_d <= 64 and not dropout else 64, 4, 3 if block_d <= 64 else 2)
    if block_d <= 64:  # dropout's mask tile spills a 4-warp 128 x 64 forward (sm_90 compile): 8 warps
        return _cfg(128, 64, 8 if dropout else 4, 3)
    return _cfg(64, 64, 8, 2)


def _default_bwd(dtype, block_d, lqb, dropout) -> dict:
    """dK/dV programs own a key block and sweep queries, dQ programs the reverse (one config for the
    three backward kernels)."""
    if dtype == torch.float32:
        return _cfg(min(lqb, 32), 32 if block_d <= 64 else 16, 4, 1)
    if dropout and block_d <= 64:
        # a 64-row dK/dV tile with dropout + mask + causal spills on sm_90 with 4 warps and with 8
        # (255 registers); 32 rows: ~180-210, no spill
        return _cfg(min(32, lqb), 64, 4, 2)
    return _cfg(min(64, lqb), 64 if block_d <= 64 else 32, 8 if dropout else 4, 2)


@lru_cache(maxsize=None)
def config_table() -> dict:
    """``triton_attention_configs.json``: {arch: {table_key: {"fwd": cfg, "bwd": cfg}}} (written by the
    offline tuner, ``MMFAST_TUNE=1 python -m mmfast.tune``)."""
    try:
        return json.loads(TABLE_PATH.read_text())
    except (OSError, ValueError):
        return {}


def static_config(direction: str, arch, dtype, block_d: int, lqb: int, causal: bool, dropout: bool) -> dict:
    """The config a user call launches: the table's entry for ``arch`` (e.g. "sm_90"; None in the
    interpreter) or the heuristic default. ``direction``: "fwd" or "bwd"."""
    entry = config_table().get(arch or "", {}).get(table_key(dtype, block_d, lqb, causal, dropout), {})
    if direction in entry:
        return dict(entry[direction])
    return (_default_fwd if direction == "fwd" else _default_bwd)(dtype, block_d, lqb, dropout)


def fwd_configs(Lq: int, Lk: int, block_d: int, dtype=torch.float16, causal=False, dropout=False, arch=None) -> list[dict]:
    """The static config first, then the alternatives the offline tuner times (``Lk`` is not part
    of the key: kept for callers of the older signature)."""
    lqb = lq_bucket(Lq)
    alts = ([_cfg(lqb, 64, 4, 2), _cfg(lqb, 128, 8, 3), _cfg(max(16, lqb // 2), 128, 4, 3), _cfg(lqb, 32, 4, 2)]
            if lqb <= 64 else
            [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 128, 8, 2), _cfg(64, 32, 4, 3), _cfg(128, 32, 4, 3)])
    return _dedup([static_config("fwd", arch, dtype, block_d, lqb, causal, dropout)] + alts)


def bwd_configs(Lq: int, Lk: int, block_d: int, dtype=torch.float16, causal=False, dropout=False, arch=None) -> list[dict]:
    lqb = lq_bucket(Lq)
    alts = [_cfg(64, 64, 4, 3), _cfg(32, 64, 4, 2), _cfg(64, 128, 8, 2), _cfg(128, 64, 8, 2), _cfg(32, 32, 4, 2)]
    for c in alts:
        c["BLOCK_M"] = min(c["BLOCK_M"], lqb)
    return _dedup([static_config("bwd", arch, dtype, block_d, lqb, causal, dropout)] + alts)


def _dedup(cfgs: list[dict]) -> list[dict]:
    out = []
    for c in cfgs:
        if c not in out:
            out.append(c)
    return out


def fwd_config(Lq: int, Lk: int, block_d: int) -> dict:
    return fwd_configs(Lq, Lk, block_d)[0]


def bwd_config(Lq: int, Lk: int, block_d: int) -> dict:
    return bwd_configs(Lq, Lk, block_d)[0]


def _autotuning() -> bool:
    """Only the offline tuner times candidates (MMFAST_TUNE=1, on a GPU): a user call never does
    (timing compiles every candidate, synchronises, breaks CUDA-graph capture, and several
    processes on one GPU make its figures noise)."""
    return os.environ.get("MMFAST_TUNE", "0") == "1" and not dispatch.triton_interpreting()


_tuned: dict = {}


def _choose(key: tuple, candidates: list[dict], run) -> dict:
    """The config to launch: ``candidates[0]`` (the static one), except under the offline tuner,
    which times every candidate once per ``key`` with ``run(cfg)`` (it overwrites its outputs),
    skips one that fails to compile (e.g. out of shared memory) or spills registers, and records
    the fastest in ``_tuned`` (``candidates[0]`` when none qualifies)."""
    if len(candidates) == 1 or not _autotuning():
        return candidates[0]
    if key not in _tuned:
        from triton.testing import do_bench

        best, best_ms = candidates[0], float("inf")
        for cfg in candidates:
            _last_launch.clear()
            try:
                ms = do_bench(lambda: run(cfg), warmup=3, rep=15)
            except Exception:  # noqa: BLE001 (a config the compiler or the GPU rejects)
                continue
            if any(getattr(k, "n_spills", 0) for k in _last_launch):
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        _tuned[key] = best
    return _tuned[key]


@lru_cache(maxsize=None)
def _arch_of(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def _arch(t: torch.Tensor):
    if not t.is_cuda:
        return None
    return _arch_of(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _on_device(t: torch.Tensor):
    """Launch on the tensors' GPU, not the current one (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # the default; ignored for 16-bit inputs


def _mask_args(key_padding_mask, q):
    if key_padding_mask is None:
        return q, 0, 0, False  # dummy pointer, never read
    m = key_padding_mask.view(torch.uint8)  # same bytes as bool; Triton loads it as integers
    return m, m.stride(0), m.stride(1), True


def _dropout_args(dropout_p: float):
    """(threshold, keep_scale): the uint32 threshold from the double p on the host (the contract),
    and the 1 / (1 - p) rescaling of kept values."""
    if dropout_p <= 0:
        return 0, 1.0
    return dropout_threshold(float(dropout_p)), 1.0 / (1.0 - float(dropout_p))


def _check(q, k, v):
    D = q.shape[-1]
    if D % 8 != 0 or not 8 <= D <= 128:
        raise ValueError(f"mmfast.attention (triton): head dim D must be a multiple of 8 in [8, 128], got {D}")
    if q.dtype not in DTYPES:
        raise TypeError(f"mmfast.attention (triton): argument 'q' dtype {q.dtype} not supported")


# Each *_launches function builds the (kernel, grid, args, kwargs) of its launches: the one place
# their arguments are made, used by the real launch and by `mmfast kernels-report` alike.

def _fwd_launches(q, k, v, out, lse, key_padding_mask, seed, causal, scale, dropout_p, cfg):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    mask, smb, smn, has_mask = _mask_args(key_padding_mask, q)
    dropout = dropout_p > 0
    threshold, keep_scale = _dropout_args(dropout_p)
    num_m = triton.cdiv(Lq, cfg["BLOCK_M"])
    args = (q, k, v, out, lse, mask, seed if dropout else q,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), smb, smn,
            H, Lq, Lk, D, num_m, float(scale) * _LOG2E, threshold, keep_scale)
    kwargs = dict(HAS_MASK=has_mask, CAUSAL=bool(causal), DROPOUT=dropout, PREC=_precision(q.dtype),
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_pow2_at_least(D, 16),
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return [(_attn_fwd_kernel, (num_m * B * H,), args, kwargs)]


def _bwd_launches(grad_out, q, k, v, out, lse, delta, dq, dk, dv, key_padding_mask, seed, causal, scale,
                  dropout_p, cfg):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    mask, smb, smn, has_mask = _mask_args(key_padding_mask, q)
    dropout = dropout_p > 0
    threshold, keep_scale = _dropout_args(dropout_p)
    prec, block_d = _precision(q.dtype), _pow2_at_least(D, 16)
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    common = dict(HAS_MASK=has_mask, CAUSAL=bool(causal), DROPOUT=dropout, PREC=prec,
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, **opts)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), smb, smn)
    seed_arg = seed if dropout else q
    num_m, num_n = triton.cdiv(Lq, cfg["BLOCK_M"]), triton.cdiv(Lk, cfg["BLOCK_N"])
    scales = (float(scale) * _LOG2E, float(scale), threshold, keep_scale)
    return [
        (_attn_bwd_delta_kernel, (num_m * B * H,),
         (out, grad_out, delta, *out.stride(), *grad_out.stride(), H, Lq, D, num_m),
         dict(PREC=prec, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=block_d, **opts)),
        (_attn_bwd_dkdv_kernel, (num_n * B * H,),
         (q, k, v, grad_out, lse, delta, dk, dv, mask, seed_arg, *strides, H, Lq, Lk, D, num_n, *scales), common),
        (_attn_bwd_dq_kernel, (num_m * B * H,),
         (q, k, v, grad_out, lse, delta, dq, mask, seed_arg, *strides, H, Lq, Lk, D, num_m, *scales), common),
    ]


_last_launch: list = []  # the compiled kernels of the latest launch (the tuner reads their spills)


def _launch(launches) -> None:
    _last_launch[:] = [kernel[grid](*args, **kwargs) for kernel, grid, args, kwargs in launches]


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
    block_d, dropout, arch = _pow2_at_least(D, 16), dropout_p > 0, _arch(q)

    def run(cfg):
        _launch(_fwd_launches(q, k, v, out, lse, key_padding_mask, seed, causal, scale, dropout_p, cfg))

    key = ("fwd", arch, table_key(q.dtype, block_d, lq_bucket(Lq), bool(causal), dropout))
    cands = fwd_configs(Lq, Lk, block_d, q.dtype, bool(causal), dropout, arch)
    with _on_device(q):
        run(_choose(key, cands, run))
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
    block_d, dropout, arch = _pow2_at_least(D, 16), dropout_p > 0, _arch(q)
    # delta_i = sum_d dO_i O_i = sum_j P~_ij dP~_ij (also with dropout: O is the dropped output)
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)

    def run(cfg):
        _launch(_bwd_launches(grad_out, q, k, v, out, lse, delta, dq, dk, dv, key_padding_mask, seed, causal,
                              scale, dropout_p, cfg))

    key = ("bwd", arch, table_key(q.dtype, block_d, lq_bucket(Lq), bool(causal), dropout))
    cands = bwd_configs(Lq, Lk, block_d, q.dtype, bool(causal), dropout, arch)
    with _on_device(q):
        run(_choose(key, cands, run))
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Every launch dispatch can make (the mmfast.triton convention, for `mmfast kernels-report`)

# a representative query length per Lq bucket (the kernels specialise on integer alignment only)
_REPRESENTATIVE_LQ = {32: 25, 64: 40, 128: 197}


def launches(arch: str = "sm_90"):
    """One Launch per (kernel, dtype, head-dim block, Lq bucket, mask, causal, dropout[, fp32
    precision]) with the config a user call on ``arch`` gets (the table's, else the default).
    Duplicates (e.g. Lq buckets sharing a config) are left in: the report compiles each distinct
    compilation once."""
    from mmfast.triton import Launch

    meta = dict(device="meta")
    B, H, Lk = 2, 12, 197
    seed = torch.empty(1, dtype=torch.int64, **meta)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):  # the CI-checked dtypes first
        dname = DTYPES[dtype]
        precs = ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)
        for block_d in HEAD_DIM_BLOCKS:
            for lqb in LQ_BUCKETS:
                Lq = _REPRESENTATIVE_LQ[lqb]
                q = torch.empty(B, H, Lq, block_d, dtype=dtype, **meta)
                k, v = (torch.empty(B, H, Lk, block_d, dtype=dtype, **meta) for _ in range(2))
                out, dq, dk, dv = torch.empty_like(q), torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
                lse, delta = (torch.empty(B, H, Lq, dtype=torch.float32, **meta) for _ in range(2))
                for has_mask in (False, True):
                    mask = torch.empty(B, Lk, dtype=torch.bool, **meta) if has_mask else None
                    for causal in (False, True):
                        for dropout_p in (0.0, 0.1):
                            flags = (" mask" * has_mask + " causal" * causal + " dropout" * (dropout_p > 0))
                            dropout = dropout_p > 0
                            fwd = static_config("fwd", arch, dtype, block_d, lqb, causal, dropout)
                            bwd = static_config("bwd", arch, dtype, block_d, lqb, causal, dropout)
                            todo = (_fwd_launches(q, k, v, out, lse, mask, seed, causal, 1.0, dropout_p, fwd)
                                    + _bwd_launches(out, q, k, v, out, lse, delta, dq, dk, dv, mask, seed, causal,
                                                    1.0, dropout_p, bwd))
                            for kernel, _grid, args, kwargs in todo:
                                for prec in precs:
                                    kw = {**kwargs, "PREC": prec}
                                    desc = (f"M{kw['BLOCK_M']}" + (f" N{kw['BLOCK_N']}" if "BLOCK_N" in kw else "")
                                            + f" D{block_d} w{kw['num_warps']} s{kw['num_stages']}")
                                    if "HAS_MASK" in kw:
                                        desc += flags
                                    if dtype == torch.float32:
                                        desc += f" {prec}"
                                    yield Launch("attention", kernel, dname, desc, args, kw)
