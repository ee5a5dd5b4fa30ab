"""Fused feature concatenation, Triton face (kernel contract: mmfast/ops/concat_embed.py).

Forward: one program per tile of output token rows (ROWS rows x BLOCK_D, ~4096 values; one launch
per modality, M <= 4): load the feature rows, add the position and type rows in float32, LayerNorm,
dropout, store into the rows' place in the concatenated output. One read of every input, one write
of the output.

Backward: one program per (tile of LT consecutive positions, chunk of BB batch rows) of a modality. It
recomputes x from the inputs (no saved activations beyond mean/rstd), writes the feature gradient
rows, and accumulates in float32 registers: the position-gradient row of each of its positions
(summed over its batch chunk) and one partial sum each for the LayerNorm weight, bias and type
embedding. A second stage sums the partials over chunks/blocks with torch's (deterministic)
reductions. No atomics, so results are reproducible run to run. LT and BB are chosen per launch
(:func:`_bwd_split`) so that the grid has at least two programs per SM: a batch split more finely
costs partial sums (8/BB + 24/(BB*LT) bytes per element, written and read once), so positions
are split first, then batch rows, and only as far as needed.

Dropout: the keep mask is a hash of (seed, flat output index), identical in every face (see
mmfast.ops.concat_embed.dropout_keep_mask); the backward regenerates it.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

_BB = 32  # most batch rows per backward program (positions per program: half the forward tile's rows)
_PROGRAMS_PER_SM = 2  # backward grid target: every SM gets at least this many programs
_INTERPRETER_SMS = 1  # "SMs" under the interpreter, where every program costs Python time


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _keep(SEED, idx, thresh):
    """Dropout keep mask for flat output indices ``idx`` (int64). (Inlined by hand in _bwd_kernel.)"""
    s = tl.load(SEED)
    k0 = s.to(tl.uint32)
    k1 = (s >> 32).to(tl.uint32)
    h = _fmix32(idx.to(tl.uint32) ^ k0)
    h = _fmix32(h ^ (idx >> 32).to(tl.uint32) ^ k1)
    return (h >> 8).to(tl.int32) >= thresh


@triton.jit
def _load_x(F, POS, TYPE, frow, l, cols, m2, D, HAS_POS: tl.constexpr, HAS_TYPE: tl.constexpr):
    """x = features + position + type for a tile of rows: frow, l (ROWS,) int64; cols (BLOCK_D,)."""
    x = tl.load(F + frow[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_POS:
        x += tl.load(POS + l[:, None] * D + cols[None, :], mask=m2, other=0.0)
    if HAS_TYPE:
        x += tl.load(TYPE + cols, mask=cols < D, other=0.0)[None, :]
    return x


@triton.jit
def _fwd_kernel(F, POS, TYPE, W, BIAS, OUT, MEAN, RSTD, SEED, B, L, Ltot, off, D, eps, scale, thresh,
                HAS_POS: tl.constexpr, HAS_TYPE: tl.constexpr, HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr,
                DROPOUT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # ROWS rows of this modality's (B * L, D) features per program
    frow = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = frow < B * L
    b = frow // L
    l = frow % L
    orow = b * Ltot + off + l  # rows of the concatenated output
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    m2 = rmask[:, None] & cmask[None, :]
    x = _load_x(F, POS, TYPE, frow, l, cols, m2, D, HAS_POS, HAS_TYPE)
    if HAS_LN:
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(m2, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(MEAN + orow, mean, mask=rmask)
        tl.store(RSTD + orow, rstd, mask=rmask)
        x = xc * rstd[:, None] * tl.load(W + cols, mask=cmask, other=0.0)[None, :]
        if HAS_BIAS:
            x += tl.load(BIAS + cols, mask=cmask, other=0.0)[None, :]
    if DROPOUT:
        x = tl.where(_keep(SEED, orow[:, None] * D + cols[None, :], thresh), x * scale, 0.0)
    tl.store(OUT + orow[:, None] * D + cols[None, :], x.to(OUT.dtype.element_ty), mask=m2)


@triton.jit
def _bwd_kernel(GO, F, POS, TYPE, W, MEAN, RSTD, SEED, GF, PPOS, PW, PB, PT, B, L, Ltot, off, D, BB, scale, thresh,
                HAS_POS: tl.constexpr, HAS_TYPE: tl.constexpr, HAS_LN: tl.constexpr, DROPOUT: tl.constexpr,
                LT: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (pl, pb): a tile of LT consecutive positions (contiguous rows), for batch rows
    # [pb*BB, pb*BB+BB) one after another. Accumulators stay 2-D (one row per position) and are
    # reduced once at the end. No nested @triton.jit calls (tl.sum is one) inside the loop beyond
    # the two LayerNorm row sums: the interpreter pays ~1 ms per call.
    pl = tl.program_id(0)
    pb = tl.program_id(1)
    nl = tl.num_programs(0)
    l = pl.to(tl.int64) * LT + tl.arange(0, LT)
    lmask = l < L
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    m2 = lmask[:, None] & cmask[None, :]
    if HAS_LN:
        w = tl.load(W + cols, mask=cmask, other=0.0)
        # x = features + pos + type; the pos and type rows do not depend on the batch row
        xadd = tl.zeros([LT, BLOCK_D], dtype=tl.float32)
        if HAS_POS:
            xadd += tl.load(POS + l[:, None] * D + cols[None, :], mask=m2, other=0.0)
        if HAS_TYPE:
            xadd += tl.load(TYPE + cols, mask=cmask, other=0.0)[None, :]
    if DROPOUT:
        s = tl.load(SEED)
        k0 = s.to(tl.uint32)
        k1 = (s >> 32).to(tl.uint32)
    acc_g = tl.zeros([LT, BLOCK_D], dtype=tl.float32)   # sum over b of d/dx: position/type grads
    acc_w = tl.zeros([LT, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([LT, BLOCK_D], dtype=tl.float32)
    b_start = pb.to(tl.int64) * BB
    b_end = tl.minimum(b_start + BB, B)
    for b in range(b_start, b_end):
        frow = b * L + l
        orow = b * Ltot + off + l
        g = tl.load(GO + orow[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        if DROPOUT:  # _keep, inlined
            idx = orow[:, None] * D + cols[None, :]
            h = idx.to(tl.uint32) ^ k0
            h = h ^ (h >> 16)
            h = h * 0x85EBCA6B
            h = h ^ (h >> 13)
            h = h * 0xC2B2AE35
            h = h ^ (h >> 16)
            h = h ^ (idx >> 32).to(tl.uint32) ^ k1
            h = h ^ (h >> 16)
            h = h * 0x85EBCA6B
            h = h ^ (h >> 13)
            h = h * 0xC2B2AE35
            h = h ^ (h >> 16)
            g = tl.where((h >> 8).to(tl.int32) >= thresh, g * scale, 0.0)
        if HAS_LN:
            x = tl.load(F + frow[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32) + xadd
            rstd = tl.load(RSTD + orow, mask=lmask, other=0.0)
            mean = tl.load(MEAN + orow, mask=lmask, other=0.0)
            xhat = tl.where(m2, (x - mean[:, None]) * rstd[:, None], 0.0)
            acc_w += g * xhat
            acc_b += g
            gh = g * w[None, :]
            c1 = tl.sum(gh, axis=1) / D
            c2 = tl.sum(gh * xhat, axis=1) / D
            g = tl.where(m2, rstd[:, None] * (gh - c1[:, None] - xhat * c2[:, None]), 0.0)
        tl.store(GF + frow[:, None] * D + cols[None, :], g.to(GF.dtype.element_ty), mask=m2)
        acc_g += g
    if HAS_POS:
        tl.store(PPOS + (pb.to(tl.int64) * L + l[:, None]) * D + cols[None, :], acc_g, mask=m2)
    prog = (pb.to(tl.int64) * nl + pl) * D
    if HAS_LN:
        tl.store(PW + prog + cols, tl.sum(acc_w, axis=0), mask=cmask)
        tl.store(PB + prog + cols, tl.sum(acc_b, axis=0), mask=cmask)
    if HAS_TYPE:
        tl.store(PT + prog + cols, tl.sum(acc_g, axis=0), mask=cmask)


def _dropout_args(dropout_p: float):
    from mmfast.ops.concat_embed import dropout_threshold

    scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
    return scale, dropout_threshold(dropout_p)


def _check(features, pos_tables, pos_index, seed, dropout_p):
    if not 1 <= len(features) <= 4 or len(pos_index) != len(features):
        raise ValueError("mmfast.concat_embed (triton): argument 'features': expected 1 to 4 modalities and one "
                         "pos_index entry each")
    f0 = features[0]
    for f in features:
        if f.dim() != 3 or f.shape[0] != f0.shape[0] or f.shape[2] != f0.shape[2] or not f.is_contiguous() \
                or f.dtype != f0.dtype:
            raise ValueError("mmfast.concat_embed (triton): argument 'features': expected contiguous (B, L_m, D) "
                             "tensors of one dtype")
    for m, k in enumerate(pos_index):
        if k >= 0 and (pos_tables[k].shape[0] < features[m].shape[1] or not pos_tables[k].is_contiguous()):
            raise ValueError(f"mmfast.concat_embed (triton): argument 'pos_tables': table of modality {m} too short")
    if dropout_p > 0 and seed is None:
        raise ValueError("mmfast.concat_embed (triton): argument 'seed': dropout_p > 0 needs a seed tensor")


def _launch_cfg(D: int):
    """(BLOCK_D, rows per tile, warps): tiles of ~4096 float32 values keep registers in check."""
    block = triton.next_power_of_2(max(int(D), 16))
    rows = max(1, min(16, 4096 // block))
    return block, rows, (4 if block <= 1024 else 8)


def _bwd_launch_cfg(D: int):
    """(BLOCK_D, most positions per program, warps) of the backward. Three float32 accumulator
    tiles live across its batch loop: tiles of <= 1024 values, <= 8 per thread, keep it at
    48-128 registers with no spills (sm_90 compiles, bf16/fp32, with/without dropout, D 16..4096)."""
    block = triton.next_power_of_2(max(int(D), 16))
    return block, max(1, 1024 // block), max(8, min(32, block // 128))


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _bwd_split(B: int, L: int, lt_max: int, sms: int) -> tuple[int, int]:
    """(LT positions, BB batch rows) per backward program for one modality: the largest tiles
    whose grid cdiv(L, LT) * cdiv(B, BB) reaches _PROGRAMS_PER_SM * sms programs (or the finest
    split, one position and one batch row per program, when B * L is smaller than that)."""
    lt, bb = lt_max, _BB
    target = _PROGRAMS_PER_SM * sms
    while triton.cdiv(L, lt) * triton.cdiv(B, bb) < target:
        if lt > 1:
            lt //= 2  # costs nothing: the position partial is per position anyway
        elif bb > 1 and triton.cdiv(B, bb) < B:
            bb //= 2
        else:
            break
    return lt, bb


def _device_guard(t: torch.Tensor):
    """Launch on the tensors' GPU, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def concat_embed_forward(features, type_emb, pos_tables, pos_index, ln_weight, ln_bias, eps, dropout_p, seed):
    _check(features, pos_tables, pos_index, seed, dropout_p)
    f0 = features[0]
    B, D = f0.shape[0], f0.shape[2]
    Ltot = sum(f.shape[1] for f in features)
    out = torch.empty((B, Ltot, D), dtype=f0.dtype, device=f0.device)
    has_ln = ln_weight is not None
    stats = (B, Ltot) if has_ln else (0,)
    mean = torch.empty(stats, dtype=torch.float32, device=f0.device)
    rstd = torch.empty(stats, dtype=torch.float32, device=f0.device)
    if B == 0 or D == 0:
        return out, mean, rstd
    scale, thresh = _dropout_args(dropout_p)
    block, rows, warps = _launch_cfg(D)
    dummy = out  # never read: the matching constexpr flag is off
    off = 0
    with _device_guard(f0):
        for m, f in enumerate(features):
            L = f.shape[1]
            k = pos_index[m]
            _fwd_kernel[(triton.cdiv(B * L, rows),)](
                f, pos_tables[k] if k >= 0 else dummy, type_emb[m] if type_emb is not None else dummy,
                ln_weight if has_ln else dummy, ln_bias if ln_bias is not None else dummy, out,
                mean if has_ln else dummy, rstd if has_ln else dummy, seed if dropout_p > 0 else dummy,
                B, L, Ltot, off, D, float(eps), scale, thresh,
                HAS_POS=k >= 0, HAS_TYPE=type_emb is not None, HAS_LN=has_ln, HAS_BIAS=ln_bias is not None,
                DROPOUT=dropout_p > 0, ROWS=rows, BLOCK_D=block, num_warps=warps)
            off += L
    return out, mean, rstd


def concat_embed_backward(grad_out, features, type_emb, pos_tables, pos_index, ln_weight, ln_bias, mean, rstd,
                          dropout_p, seed):
    _check(features, pos_tables, pos_index, seed, dropout_p)
    f0 = features[0]
    B, D = f0.shape[0], f0.shape[2]
    Ltot = sum(f.shape[1] for f in features)
    dev = f0.device
    go = grad_out.contiguous()
    has_ln, has_type = ln_weight is not None, type_emb is not None
    scale, thresh = _dropout_args(dropout_p)
    block, lt_max, warps = _bwd_launch_cfg(D)
    sms = _sm_count(dev)
    gfeat = [torch.empty_like(f) for f in features]
    gpos = [None] * len(pos_tables)
    parts_w, parts_b, parts_t = [], [], []
    off = 0
    for m, f in enumerate(features):
        L = f.shape[1]
        k = pos_index[m]
        lt, bb = _bwd_split(B, L, lt_max, sms)
        nlb = triton.cdiv(L, lt)
        nbc = triton.cdiv(B, bb) if B > 0 else 0
        ppos = torch.empty((nbc, L, D), dtype=torch.float32, device=dev) if k >= 0 else None
        pw = torch.empty((nbc * nlb, D), dtype=torch.float32, device=dev) if has_ln else None
        pb = torch.empty((nbc * nlb, D), dtype=torch.float32, device=dev) if has_ln else None
        pt = torch.empty((nbc * nlb, D), dtype=torch.float32, device=dev) if has_type else None
        if B > 0 and D > 0:
            dummy = gfeat[m]
            with _device_guard(f0):
                _bwd_kernel[(nlb, nbc)](
                    go, f, pos_tables[k] if k >= 0 else dummy, type_emb[m] if has_type else dummy,
                    ln_weight if has_ln else dummy, mean if has_ln else dummy, rstd if has_ln else dummy,
                    seed if dropout_p > 0 else dummy, gfeat[m], ppos if k >= 0 else dummy, pw if has_ln else dummy,
                    pb if has_ln else dummy, pt if has_type else dummy, B, L, Ltot, off, D, bb, scale, thresh,
                    HAS_POS=k >= 0, HAS_TYPE=has_type, HAS_LN=has_ln, DROPOUT=dropout_p > 0, LT=lt,
                    BLOCK_D=block, num_warps=warps)
        if k >= 0:  # stage 2 for the position table: sum over batch chunks; rows >= L get zero
            table = pos_tables[k]
            g = torch.zeros_like(table)
            g[:L] = ppos.sum(0)
            gpos[k] = g
        parts_w.append(pw)
        parts_b.append(pb)
        parts_t.append(pt)
        off += L
    empty = lambda: torch.empty((0,), dtype=torch.float32, device=dev)  # distinct: outputs may not alias
    if has_type:  # stage 2: one row per modality, unused rows zero
        gtype = torch.zeros_like(type_emb)
        for m, pt in enumerate(parts_t):
            gtype[m] = pt.sum(0)
    else:
        gtype = empty()
    gw = torch.cat(parts_w).sum(0) if has_ln else empty()
    gb = torch.cat(parts_b).sum(0) if ln_bias is not None else empty()
    return gfeat + [gtype] + gpos + [gw, gb]


# ---- the launches dispatch can make (mmfast.triton convention, for `mmfast kernels-report`) -----
def launches(arch: str = "sm_90"):
    """Forward and backward per dtype and hidden size regime (D 384 / 768 / 1024), every optional
    input on (the most registers), with and without dropout; the backward at its widest tile and at
    the split ``_bwd_split`` picks for B64 x L197 on an H100/H200 (132 SMs)."""
    from mmfast.triton import Launch

    B, L, Ltot = 64, 197, 237
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        dname = str(dtype).replace("torch.", "")
        for D in (384, 768, 1024):
            block, rows, warps = _launch_cfg(D)
            bblock, lt_max, bwarps = _bwd_launch_cfg(D)
            f = torch.empty((B, L, D), dtype=dtype, device="meta")
            out = torch.empty((B, Ltot, D), dtype=dtype, device="meta")
            vec = torch.empty(D, dtype=dtype, device="meta")
            stats = torch.empty((B, Ltot), dtype=torch.float32, device="meta")
            seed = torch.empty(1, dtype=torch.int64, device="meta")
            part = torch.empty((64, D), dtype=torch.float32, device="meta")
            for dropout in (False, True):
                flag = " dropout" * dropout
                yield Launch("concat_embed", _fwd_kernel, dname, f"ROWS{rows} D{block} w{warps} pos type ln bias" + flag,
                             (f, vec, vec, vec, vec, out, stats, stats, seed, B, L, Ltot, 40, D, 1e-12, 1.1, 429496729),
                             dict(HAS_POS=True, HAS_TYPE=True, HAS_LN=True, HAS_BIAS=True, DROPOUT=dropout, ROWS=rows,
                                  BLOCK_D=block, num_warps=warps))
                for lt in sorted({lt_max, _bwd_split(B, L, lt_max, 132)[0]}):
                    yield Launch("concat_embed", _bwd_kernel, dname, f"LT{lt} D{bblock} w{bwarps} pos type ln" + flag,
                                 (out, f, vec, vec, vec, stats, stats, seed, f, part, part, part, part, B, L, Ltot, 40,
                                  D, _BB, 1.1, 429496729),
                                 dict(HAS_POS=True, HAS_TYPE=True, HAS_LN=True, DROPOUT=dropout, LT=lt,
                                      BLOCK_D=bblock, num_warps=bwarps))
