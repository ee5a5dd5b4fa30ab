"""The attention dropout mask, defined once for every face (Triton, CUDA C++, C++ CPU).

A counter-based generator (Philox4x32-10, the generator of cuRAND and of Triton's ``tl.philox``)
makes the mask a pure function of (seed, element): the backward regenerates it instead of storing
it, and two faces given the same seed drop exactly the same elements.

The contract, for the attention probability of batch-head ``bh = b * H + h``, query row ``i`` and
key column ``j``:

    key     (k0, k1)          = (seed & 0xffffffff, seed >> 32)      seed: int64 in [0, 2**62)
    counter (c0, c1, c2, c3)  = (j >> 2, i, bh, 0)
    word                      = philox4x32_10(counter, key)[j & 3]    (uint32)
    keep                      = word >= dropout_threshold(p)          (unsigned compare)

One Philox call serves four neighbouring key columns; kept probabilities are scaled by 1 / (1 - p).
This module is the executable specification (numpy uint64 arithmetic, exact): slow, for tests.
"""

from __future__ import annotations

import numpy as np
import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
_M32 = np.uint64(0xFFFFFFFF)


def dropout_threshold(p: float) -> int:
    """The uint32 threshold: a word below it drops its element (probability p, exact to 2**-32).
    Faces compute it on the host from the double ``p`` and pass the integer to their kernels."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return min(int(p * 2.0**32), 2**32 - 1)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on numpy arrays (broadcast); returns four uint32 arrays (as uint64)."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _M32 for c in (c0, c1, c2, c3))
    k0, k1 = np.uint64(k0) & _M32, np.uint64(k1) & _M32
    a, b = np.uint64(PHILOX_ROUND_A), np.uint64(PHILOX_ROUND_B)
    for _ in range(PHILOX_ROUNDS):
        prod_a, prod_b = a * c0, b * c2  # < 2**64: exact in uint64
        c0, c1, c2, c3 = ((prod_b >> np.uint64(32)) ^ c1 ^ k0, prod_b & _M32,
                          (prod_a >> np.uint64(32)) ^ c3 ^ k1, prod_a & _M32)
        k0 = (k0 + np.uint64(PHILOX_KEY_A)) & _M32
        k1 = (k1 + np.uint64(PHILOX_KEY_B)) & _M32
    return c0, c1, c2, c3


def dropout_words(seed: int, BH: int, Lq: int, Lk: int, first_bh: int = 0) -> np.ndarray:
    """The uint32 word of every element, shape (BH, Lq, Lk), as uint64, for the batch-heads
    first_bh .. first_bh + BH - 1 (a packed sequence b starts at b * H)."""
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be a non-negative int64, got {seed}")
    bh = np.arange(first_bh, first_bh + BH, dtype=np.uint64)[:, None, None]
    i = np.arange(Lq, dtype=np.uint64)[None, :, None]
    groups = (Lk + 3) // 4
    g = np.arange(groups, dtype=np.uint64)[None, None, :]
    words = philox4x32_10(g, i, bh, 0, seed & 0xFFFFFFFF, seed >> 32)
    words = np.broadcast_arrays(*words)
    out = np.stack(words, axis=-1).reshape(BH, Lq, groups * 4)
    return out[:, :, :Lk]


def keep_mask(seed: int, B: int, H: int, Lq: int, Lk: int, p: float) -> torch.Tensor:
    """Bool (B, H, Lq, Lk): True where the element is kept."""
    words = dropout_words(seed, B * H, Lq, Lk)
    return torch.from_numpy(words >= np.uint64(dropout_threshold(p))).reshape(B, H, Lq, Lk)
