"""Triton attention dropout against the shared generator contract (mmfast/reference/dropout.py):
the keep mask the kernels apply, read back through the kernels themselves, equals the numpy
reference bit for bit — in the forward, in the dK/dV kernel and in the dQ kernel, for every launch
config — and has the statistics of independent Bernoulli draws. One Philox call serves four
decisions. Runs in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).

How the masks are read: with K = V = I (Lk = D) the forward returns A = softmax(q s) * keep / (1-p)
itself, so keep = (A != 0); with dO = I (Lq = D) the dK/dV kernel returns dV = A^T; with dO = c
(all entries) the dQ kernel returns dq = s * P * (c keep / (1-p) - delta), from which keep follows.
"""

import numpy as np
import pytest
import torch

from mmfast.reference.dropout import keep_mask as reference_keep_mask

T = pytest.importorskip("mmfast.triton.attention")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (CPU tensors)")

SEED = (5 << 32) | 0x9E3779B9  # both key words non-zero


def _seed(value=SEED):
    return torch.tensor([value], dtype=torch.int64)


def _eye_like(B, H, L, D):
    """(B, H, L, D) with ones on the diagonal: as K or V it makes the kernel return its matrices."""
    e = torch.zeros(B, H, L, D)
    idx = torch.arange(min(L, D))
    e[:, :, idx, idx] = 1.0
    return e


def forward_keep(B, H, Lq, Lk, p, seed=SEED, D=None):
    """The forward kernel's keep mask (B, H, Lq, Lk), read through V = I."""
    D = D or -(-Lk // 8) * 8
    q = torch.randn(B, H, Lq, D) * 0.3  # every probability well above 0
    k = torch.randn(B, H, Lk, D) * 0.3
    A, _ = T.attention_forward(q, k, _eye_like(B, H, Lk, D), None, _seed(seed), False, D ** -0.5, p)
    assert torch.isfinite(A).all()
    return A[..., :Lk] != 0


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])  # 0.5: threshold 2**31, the unsigned compare's edge
@pytest.mark.parametrize("B,H,Lq,Lk", [(2, 3, 37, 43), (1, 2, 70, 128)])
def test_forward_mask_equals_reference_bit_for_bit(B, H, Lq, Lk, p):
    keep = forward_keep(B, H, Lq, Lk, p)
    ref = reference_keep_mask(SEED, B, H, Lq, Lk, p)
    assert torch.equal(keep, ref), f"{(keep != ref).sum().item()} of {ref.numel()} decisions differ"


def test_masks_identical_across_configs(monkeypatch):
    """Every launch config (block sizes) the tuner may pick applies the same mask."""
    B, H, Lq, Lk, p = 1, 2, 45, 72, 0.3
    ref = reference_keep_mask(SEED, B, H, Lq, Lk, p)
    cands = T.fwd_configs(Lq, Lk, 128, torch.float32, False, True)
    assert len({(c["BLOCK_M"], c["BLOCK_N"]) for c in cands}) >= 3
    for i in range(len(cands)):
        monkeypatch.setattr(T, "_choose", lambda key, c, run, i=i: c[i])
        torch.manual_seed(0)
        assert torch.equal(forward_keep(B, H, Lq, Lk, p), ref), cands[i]


@pytest.mark.parametrize("L", [40, 72])  # 72: two query and two key blocks
def test_backward_kernels_apply_the_forward_mask(monkeypatch, L):
    """dK/dV and dQ regenerate exactly the reference mask (so exactly the forward's), for the
    default backward config and a differently blocked one."""
    B, H, p, c = 2, 2, 0.25, 2.0
    scale = L ** -0.5
    ref = reference_keep_mask(SEED, B, H, L, L, p)
    eye = _eye_like(B, H, L, L)
    q = torch.randn(B, H, L, L) * 0.3
    A, lse = T.attention_forward(q, eye, eye, None, _seed(), False, scale, p)
    assert torch.equal(A != 0, ref)
    P = torch.softmax(q.double() * scale, -1)  # K = I: scores are q * scale
    for cfg_index in (0, -1):
        monkeypatch.setattr(T, "_choose", lambda key, cands, run: cands[cfg_index])
        _, _, dv = T.attention_backward(_eye_like(B, H, L, L), q, eye, eye, A, lse, None, _seed(), False, scale, p)
        assert torch.equal(dv.transpose(-2, -1) != 0, ref), f"dK/dV kernel, config {cfg_index}"
        dO = torch.full((B, H, L, L), c)
        dq, _, _ = T.attention_backward(dO, q, eye, eye, A, lse, None, _seed(), False, scale, p)
        delta = c * A.double().sum(-1, keepdim=True)  # dO . O
        keep_from_dq = (dq.double() / (scale * P) + delta) * (1 - p) / c
        assert torch.allclose(keep_from_dq, ref.double(), atol=1e-3), f"dQ kernel, config {cfg_index}"


def test_keep_statistics_binomial_and_uncorrelated():
    """Keep rate within 5 sigma of 1 - p; no correlation between neighbouring columns (inside a
    Philox group of four and across groups), rows, heads or batch items: each within 5 sigma of 0."""
    B, H, Lq, Lk, p = 2, 4, 64, 128, 0.1
    x = forward_keep(B, H, Lq, Lk, p).double().numpy()
    n = x.size
    rate = x.mean()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sd, f"keep rate {rate:.5f}, expected {1 - p} +- {5 * sd:.5f}"

    def corr(a, b):
        a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
        return float((a * b).mean() / (a.std() * b.std())), a.size

    pairs = {
        "column j, j+1": (x[..., :-1], x[..., 1:]),
        "column 4g, 4g+3 (one Philox call)": (x[..., 0::4], x[..., 3::4]),
        "column j, j+4 (next counter)": (x[..., :-4], x[..., 4:]),
        "row i, i+1": (x[:, :, :-1], x[:, :, 1:]),
        "head h, h+1": (x[:, :-1], x[:, 1:]),
        "batch b, b+1": (x[:-1], x[1:]),
    }
    for name, (a, b) in pairs.items():
        r, m = corr(a, b)
        assert abs(r) < 5 / m ** 0.5, f"{name}: correlation {r:.4f} (bound {5 / m ** 0.5:.4f})"


def test_one_philox_call_per_four_decisions(monkeypatch):
    """Counts the Philox lanes the forward evaluates: a quarter of the decisions it makes."""
    import triton.language as tl

    lanes, real = [], tl.philox

    def counting_philox(seed, c0, *rest, **kw):
        lanes.append(int(np.prod(c0.shape)))
        return real(seed, c0, *rest, **kw)

    monkeypatch.setattr(tl, "philox", counting_philox)
    B, H, Lq, Lk, p = 1, 2, 64, 128, 0.2
    forward_keep(B, H, Lq, Lk, p, D=128)
    cfg = T.fwd_configs(Lq, Lk, 128, torch.float32, False, True)[0]
    decisions = B * H * (-(-Lq // cfg["BLOCK_M"]) * cfg["BLOCK_M"]) * (-(-Lk // cfg["BLOCK_N"]) * cfg["BLOCK_N"])
    assert lanes, "the forward never called tl.philox"
    assert sum(lanes) * 4 == decisions, (sum(lanes), decisions)


def test_threshold_is_the_integer_contract():
    assert T._dropout_args(0.0) == (0, 1.0)
    thr, scale = T._dropout_args(0.1)
    assert thr == 429496729 and scale == pytest.approx(1 / 0.9)
    assert T._dropout_args(0.5)[0] == 2**31
