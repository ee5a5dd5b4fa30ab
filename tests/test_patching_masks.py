"""mmfast.patching.masks: turning stock models' attention masks into (key_padding_mask, causal),
and refusing (NotExpressible) every mask that is not exactly that."""

import pytest
import torch

from mmfast.patching import masks

B, Lq, Lk = 3, 5, 7


def kpm_example():
    kpm = torch.ones(B, Lk, dtype=torch.bool)
    kpm[1, 4:] = False
    kpm[2, 1:] = False
    return kpm


def test_none_and_tagged():
    assert masks.decompose(None, B, Lq, Lk) == (None, False)
    kpm = kpm_example()
    m = masks.tag(kpm[:, None, None, :].expand(B, 1, Lq, Lk).clone(), kpm, False)
    got, causal = masks.decompose(m, B, Lq, Lk)
    assert got is kpm and causal is False
    # an in-place edit invalidates the tag: the values are inspected again
    m[0, 0, :, 0] = False  # still padding: key 0 of row 0 is now masked
    got, causal = masks.decompose(m, B, Lq, Lk)
    assert not bool(got[0, 0]) and torch.equal(got[1:], kpm[1:]) and causal is False
    m[0, 0, 0, 1] = False  # one (query, key) pair: not padding any more
    with pytest.raises(masks.NotExpressible):
        masks.decompose(m, B, Lq, Lk)


@pytest.mark.parametrize("form", ["bool", "finfo_min", "neg_inf", "minus_1e4", "fp16_min"])
@pytest.mark.parametrize("causal,lq", [(False, 1), (False, Lq), (True, Lq)])  # (B,1,1,Lk) broadcasts: never causal
def test_dense_forms(form, causal, lq):
    kpm = kpm_example()
    keep = kpm[:, None, None, :].expand(B, 1, lq, Lk)
    if causal:
        keep = keep & masks.causal_keep(Lq, Lk, "cpu")
    if form == "bool":
        m = keep
    else:
        dtype = torch.float16 if form == "fp16_min" else torch.float32
        neg = {"finfo_min": torch.finfo(torch.float32).min, "neg_inf": float("-inf"), "minus_1e4": -1e4,
               "fp16_min": torch.finfo(torch.float16).min}[form]
        m = torch.where(keep, torch.zeros((), dtype=dtype), torch.tensor(neg, dtype=dtype))
    got, c = masks.decompose(m, B, Lq, Lk)
    assert c is causal and torch.equal(got, kpm)


def test_all_attend_gives_no_padding_mask_and_causal_alone():
    assert masks.decompose(torch.zeros(B, 1, Lq, Lk), B, Lq, Lk) == (None, False)
    c = masks.causal_keep(Lq, Lk, "cpu")[None, None].expand(B, 1, Lq, Lk)
    assert masks.decompose(c, B, Lq, Lk) == (None, True)
    # bottom-right alignment: with Lq < Lk, query i sees keys j <= i + Lk - Lq
    assert bool(c[0, 0, 0, Lk - Lq]) and not bool(c[0, 0, 0, Lk - Lq + 1])


def test_batch_broadcast_mask():
    kpm = torch.tensor([True] * 5 + [False] * 2)
    got, c = masks.decompose(kpm[None, None, None, :], B, Lq, Lk)
    assert not c and got.shape == (B, Lk) and bool((got == kpm).all())


@pytest.mark.parametrize("case", ["per_head", "bias", "band", "top_left_causal", "shape", "dtype"])
def test_not_expressible(case):
    kpm = kpm_example()
    keep = kpm[:, None, None, :].expand(B, 1, Lq, Lk)
    if case == "per_head":
        m = keep.expand(B, 2, Lq, Lk).clone()
        m[:, 1, :, 0] = False
    elif case == "bias":  # ALiBi-like additive values
        m = torch.where(keep, torch.randn(B, 1, Lq, Lk), torch.finfo(torch.float32).min)
    elif case == "band":
        i = torch.arange(Lq)[:, None] + (Lk - Lq)
        j = torch.arange(Lk)[None, :]
        m = keep & ((i - j).abs() <= 1)
    elif case == "top_left_causal":  # SDPA's is_causal alignment differs from mmfast's when Lq != Lk
        m = keep & (torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None])
    elif case == "shape":
        m = keep[..., :-1]
    else:
        m = keep.to(torch.int64)
    with pytest.raises(masks.NotExpressible):
        masks.decompose(m, B, Lq, Lk)
    with pytest.raises(masks.NotExpressible):  # cached refusal
        masks.decompose(m, B, Lq, Lk)


def test_additive_conversion():
    keep = kpm_example()[:, None, None, :]
    add = masks.additive(keep, torch.bfloat16)
    assert add.dtype == torch.bfloat16
    assert bool((add[keep.expand_as(add)] == 0).all()) and bool((add[~keep.expand_as(add)] < -1e30).all())
    f = torch.zeros(2, 2)
    assert masks.additive(f, torch.float32) is f and masks.additive(None, torch.float32) is None
