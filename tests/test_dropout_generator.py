"""The attention dropout generator (mmfast/reference/dropout.py, csrc/philox.h): Philox4x32-10
known-answer vectors (Random123's), and the layout contract every face follows."""

import numpy as np
import pytest

from mmfast.reference import dropout

# Random123 philox4x32_10 known-answer tests: (counter, key) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    got = dropout.philox4x32_10(*counter, *key)
    assert tuple(int(w) for w in got) == expected


def test_word_layout_one_call_per_four_columns():
    seed, BH, Lq, Lk = (7 << 32) | 12345, 3, 5, 11
    words = dropout.dropout_words(seed, BH, Lq, Lk)
    assert words.shape == (BH, Lq, Lk)
    for bh, i, j in [(0, 0, 0), (2, 4, 10), (1, 3, 5), (2, 0, 7)]:
        w4 = dropout.philox4x32_10(j >> 2, i, bh, 0, seed & 0xFFFFFFFF, seed >> 32)
        assert int(words[bh, i, j]) == int(w4[j & 3])


def test_threshold_is_exact_and_rejects_bad_p():
    assert dropout.dropout_threshold(0.0) == 0
    assert dropout.dropout_threshold(0.5) == 2**31
    assert dropout.dropout_threshold(0.1) == 429496729
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dropout.dropout_threshold(1.0)


def test_keep_rate_within_binomial_bounds():
    p, n = 0.1, 4 * 8 * 64 * 67
    keep = dropout.keep_mask(2**40 + 99, 4, 8, 64, 67, p)
    rate = 1.0 - keep.double().mean().item()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(rate - p) < 5 * sd, (rate, p, sd)
