"""mmfast.ops.attention_varlen: every CPU-runnable face vs the float64 reference (the rule), the
per-sequence semantics (no leakage, bottom-right causal, 0-query / 0-key sequences), argument
errors, opcheck and torch.compile."""

import importlib

import pytest
import torch

import mmfast
from mmfast.reference.attention_varlen import attention_varlen as ref_varlen
from mmfast.testing import assert_face_ran, check_op, faces_run, poisoned_outputs, randn

varlen_mod = importlib.import_module("mmfast.ops.attention_varlen")  # mmfast.ops.attention_varlen is the function

# odd lengths; sequence 2 has keys but no queries, sequence 3 queries but no keys
LENS_Q = [1, 7, 0, 5, 3]
LENS_K = [3, 7, 2, 0, 4]
H = 2


def _cu(lens):
    return torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _inputs(D=8, dtype=torch.float32, seed=0):
    q = randn(sum(LENS_Q), H, D, dtype=dtype, seed=seed)
    k = randn(sum(LENS_K), H, D, dtype=dtype, seed=seed + 1)
    v = randn(sum(LENS_K), H, D, dtype=dtype, seed=seed + 2)
    return q, k, v, _cu(LENS_Q), _cu(LENS_K)


@pytest.fixture
def faces_called(monkeypatch):
    """Records which kernels the varlen op runs: the attention face's (per sequence, with its backend
    name) or the Triton varlen kernel launcher (once per batch)."""
    import mmfast.triton.attention_varlen as triton_face

    calls = []
    fwd, varlen_fwd = varlen_mod._attention_forward, triton_face.attention_varlen_forward

    def spy(*args):
        if args[0].device.type != "meta":  # not the probe of the face's lse layout
            calls.append(args[-1])
        return fwd(*args)

    def varlen_spy(*args):
        calls.append("triton varlen kernel")
        return varlen_fwd(*args)

    monkeypatch.setattr(varlen_mod, "_attention_forward", spy)
    monkeypatch.setattr(triton_face, "attention_varlen_forward", varlen_spy)
    return calls


def _reduction(q, longest=None):
    """Reductions behind one element: dot products over D, then sums over a sequence's keys or queries."""
    return (longest or max(LENS_Q + LENS_K), q.shape[-1])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend,dtype", [("cpu", torch.float32), ("cpu", torch.float16), ("cpu", torch.float64),
                                           ("triton", torch.float32), ("torch", torch.float32)])
def test_matches_float64_reference(backend, dtype, causal, faces_called):
    q, k, v, cq, ck = _inputs(dtype=dtype)
    fn = lambda q, k, v, cq, ck: mmfast.ops.attention_varlen(q, k, v, cq, ck, max(LENS_Q), max(LENS_K),
                                                             causal=causal, backend=backend)
    ref = lambda q, k, v, cq, ck: ref_varlen(q, k, v, cq, ck, causal=causal)
    check_op(fn, ref, [q, k, v, cq, ck], grad_inputs=(0, 1, 2), name=f"attention_varlen[{backend}]",
             face=("attention_varlen", backend), reduction=_reduction(q))
    sequences_with_both = sum(1 for a, b in zip(LENS_Q, LENS_K) if a and b)
    expected = {"torch": [], "cpu": ["cpu"] * sequences_with_both, "triton": ["triton varlen kernel"]}[backend]
    assert faces_called == expected


@pytest.mark.parametrize("causal", [False, True])
def test_reference_is_padded_attention_per_sequence(causal):
    """The reference itself against dense attention of each sequence (bottom-right causal), and the
    0-key sequence's rows are exact zeros."""
    q, k, v, cq, ck = (t.double() if t.is_floating_point() else t for t in _inputs(D=7))
    out = ref_varlen(q, k, v, cq, ck, causal=causal)
    for b in range(len(LENS_Q)):
        qs, ks, vs = q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
        if qs.shape[0] == 0:
            continue
        if ks.shape[0] == 0:
            assert torch.equal(out[cq[b]:cq[b + 1]], torch.zeros_like(qs))
            continue
        scores = torch.einsum("ihd,jhd->hij", qs, ks) / 7 ** 0.5
        if causal:  # query i sees keys j <= i + Lk - Lq
            i, j = torch.arange(qs.shape[0])[:, None], torch.arange(ks.shape[0])[None, :]
            scores = scores.masked_fill(j > i + ks.shape[0] - qs.shape[0], float("-inf"))
        p = torch.softmax(scores, -1).nan_to_num(0.0)
        torch.testing.assert_close(out[cq[b]:cq[b + 1]], torch.einsum("hij,jhd->ihd", p, vs))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_zero_key_sequence_gives_zeros_and_zero_query_keys_get_no_gradient(backend):
    q, k, v, cq, ck = _inputs()
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    with poisoned_outputs():
        out = mmfast.ops.attention_varlen(q, k, v, cq, ck, 7, 7, backend=backend)
        out.backward(torch.randn_like(out))
    no_keys, no_queries = 3, 2
    assert torch.equal(out[cq[no_keys]:cq[no_keys + 1]], torch.zeros(LENS_Q[no_keys], H, 8))
    assert torch.equal(q.grad[cq[no_keys]:cq[no_keys + 1]], torch.zeros(LENS_Q[no_keys], H, 8))
    for g in (k.grad, v.grad):
        assert torch.equal(g[ck[no_queries]:ck[no_queries + 1]], torch.zeros(LENS_K[no_queries], H, 8))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in (q.grad, k.grad, v.grad))


def _call(q, k, v, cq, ck, mq=7, mk=7, **kw):
    return mmfast.ops.attention_varlen(q, k, v, cq, ck, mq, mk, backend="cpu", **kw)


@pytest.mark.parametrize("change,match", [
    (dict(cq=torch.tensor([0, 1, 8, 8, 13, 16], dtype=torch.int64)), "'cu_seqlens_q' must be an int32 tensor"),
    (dict(ck=torch.tensor([0, 3, 10, 12, 12], dtype=torch.int32)), r"'cu_seqlens_k' must have shape \(6,\)"),
    (dict(cq=torch.tensor([0, 8, 1, 8, 13, 16], dtype=torch.int32)), "'cu_seqlens_q' must start at 0 and never decrease"),
    (dict(cq=torch.tensor([1, 1, 8, 8, 13, 16], dtype=torch.int32)), "'cu_seqlens_q' must start at 0"),
    (dict(ck=torch.tensor([0, 3, 10, 12, 12, 15], dtype=torch.int32)), "last entry of argument 'cu_seqlens_k' must equal"),
    (dict(cq=torch.tensor([[0, 1, 8, 8, 13, 16]], dtype=torch.int32)), "'cu_seqlens_q' must have shape"),
    (dict(mq=6), "'max_seqlen_q' = 6 is below the longest"),
    (dict(mk=None), "'max_seqlen_k' must be a non-negative int"),
])
def test_bad_cu_seqlens_name_the_argument(change, match):
    q, k, v, cq, ck = _inputs()
    args = dict(q=q, k=k, v=v, cq=cq, ck=ck, mq=7, mk=7) | change
    with pytest.raises((ValueError, TypeError), match=match):
        _call(**args)


def test_bad_tensors_name_the_argument():
    q, k, v, cq, ck = _inputs()
    with pytest.raises(ValueError, match="argument 'q' must be a 3-D"):
        _call(q[None], k, v, cq, ck)
    with pytest.raises(ValueError, match="arguments 'k' and 'v' must have shape"):
        _call(q, k[:, :1], v, cq, ck)
    with pytest.raises(ValueError, match="head dim D"):
        _call(q[..., :7], k[..., :7], v[..., :7], cq, ck)
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        mmfast.ops.attention_varlen(q, k, v, cq, ck, 7, 7, backend="cuda")


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend, causal, dropout_p):
    q, k, v, cq, ck = _inputs()
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    seed = torch.tensor([12345], dtype=torch.int64) if dropout_p else None
    torch.library.opcheck(varlen_mod._varlen_fwd_op, (q, k, v, cq, ck, 7, 7, seed, causal, 0.3, dropout_p, backend))
    out, lse = varlen_mod._varlen_fwd_op(q, k, v, cq, ck, 7, 7, seed, causal, 0.3, dropout_p, backend)
    torch.library.opcheck(varlen_mod._varlen_bwd_op,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, cq, ck,
                           7, 7, seed, causal, 0.3, dropout_p, backend))


def test_torch_compile_matches_eager():
    q, k, v, cq, ck = _inputs()

    def f(q, k, v):
        return mmfast.ops.attention_varlen(q, k, v, cq, ck, 7, 7, causal=True, backend="cpu").square().sum()

    grads = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        loss = fn(*leaves)
        grads.append([loss.detach()] + list(torch.autograd.grad(loss, leaves)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_dropout_masks_differ_between_sequences_and_backward_uses_the_forward_mask():
    """Same seed: forward reproducible; two identical sequences get different masks (per-sequence
    seed); the gradient is the one of the very mask the forward used (dropout is linear in v:
    d<out, g>/dv computed by the op equals the finite difference along a random direction)."""
    L, D = 6, 8
    q, k, v = (randn(2 * L, H, D, dtype=torch.float64, seed=s) for s in (1, 2, 3))
    q[L:], k[L:], v[L:] = q[:L], k[:L], v[:L]  # two identical sequences
    cu = torch.tensor([0, L, 2 * L], dtype=torch.int32)
    run = lambda v: mmfast.ops.attention_varlen(q, k, v, cu, cu, L, L, dropout_p=0.5, backend="cpu")
    torch.manual_seed(7)
    a = run(v)
    torch.manual_seed(7)
    assert torch.equal(a, run(v))
    assert not torch.allclose(a[:L], a[L:])
    g, dv = torch.randn_like(a), torch.randn_like(v)
    vv = v.clone().requires_grad_(True)
    torch.manual_seed(7)
    (grad_v,) = torch.autograd.grad((run(vv) * g).sum(), vv)
    torch.manual_seed(7)
    moved = run(v + dv)
    torch.testing.assert_close(((moved - a) * g).sum(), (grad_v * dv).sum())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend,dtype,D", [("triton", torch.float32, 24), ("triton", torch.float16, 8),
                                             ("cpu", torch.float32, 24)])
def test_long_sequences_across_blocks(backend, dtype, D, causal):
    """Sequences longer than one 16-row block (the interpreter's block), Lq > Lk and Lq < Lk (causal rows
    that see no key, blocks skipped by the causal bounds), a head dim that is not a power of 2."""
    lens_q, lens_k = [33, 1, 0, 20, 2], [17, 40, 5, 0, 35]
    q = randn(sum(lens_q), H, D, dtype=dtype, seed=5)
    k = randn(sum(lens_k), H, D, dtype=dtype, seed=6)
    v = randn(sum(lens_k), H, D, dtype=dtype, seed=7)
    fn = lambda q, k, v, cq, ck: mmfast.ops.attention_varlen(q, k, v, cq, ck, 33, 40, causal=causal, scale=0.3,
                                                             backend=backend)
    ref = lambda q, k, v, cq, ck: ref_varlen(q, k, v, cq, ck, causal=causal, scale=0.3)
    check_op(fn, ref, [q, k, v, _cu(lens_q), _cu(lens_k)], grad_inputs=(0, 1, 2), name=f"attention_varlen[{backend}]",
             face=("attention_varlen", backend), reduction=_reduction(q, max(lens_q + lens_k)))


def test_per_sequence_loop_carries_the_lse_of_a_face_that_keeps_one():
    """The loop behind the cpu face works for any attention face: run it over the attention Triton face
    (which keeps an lse (1, H, Lq) and reads it in its backward) and compare with the reference."""
    q, k, v, cq, ck = _inputs()
    assert varlen_mod._face_keeps_lse(q, "triton")
    with poisoned_outputs():
        out, lse = varlen_mod._loop_forward(q, k, v, cq, ck, None, True, 0.3, 0.0, "triton")
    assert lse.shape == (H, sum(LENS_Q))
    g = torch.randn_like(out)
    with poisoned_outputs():
        grads = varlen_mod._loop_backward(g, q, k, v, out, lse, cq, ck, None, True, 0.3, 0.0, "triton")
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref = ref_varlen(*leaves, cq, ck, causal=True, scale=0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(ref, leaves, g.double())):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Dropout: the shared Philox contract with bh = b * H + h, rows and columns counted within each
# sequence (mmfast/reference/attention_varlen.py)

DROP_LENS_Q = [37, 1, 0, 20, 3]  # several 16-row interpreter blocks, a 0-query sequence
DROP_LENS_K = [21, 40, 5, 0, 19]  # several key blocks, column groups cut by a length, a 0-key sequence
DROP_D = 40  # >= every length: v (or dO) can be the identity of a sequence


def _eye_rows(lens, D=DROP_D, dtype=torch.float32, device="cpu"):
    """(sum(lens), H, D): per sequence, row r is e_r (v = I: the forward returns its probabilities)."""
    return torch.cat([torch.eye(n, D, dtype=dtype)[:, None, :].expand(n, H, D) for n in lens], 0).to(device)


def _device(backend):
    return "cuda" if backend == "cuda" else "cpu"


def _drop_inputs(dtype, seed=11, device="cpu"):
    q = randn(sum(DROP_LENS_Q), H, DROP_D, dtype=dtype, seed=seed, scale=0.3, device=device)  # probabilities >> 0
    k = randn(sum(DROP_LENS_K), H, DROP_D, dtype=dtype, seed=seed + 1, scale=0.3, device=device)
    return q, k, _cu(DROP_LENS_Q).to(device), _cu(DROP_LENS_K).to(device)


def _expected_keep(seed, p, causal):
    """The reference keep mask of every sequence (visible elements only), as (Lq_b, H, Lk_b) blocks."""
    blocks = []
    for b, (lq, lk) in enumerate(zip(DROP_LENS_Q, DROP_LENS_K)):
        keep = varlen_mod.sequence_keep_mask(seed, b, H, lq, lk, p)[0]
        if causal:
            i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
            keep = keep & (j <= i + lk - lq)
        blocks.append(keep.transpose(0, 1))
    return blocks


def _kept_per_sequence(A, lens_rows, lens_cols):
    """Per sequence, the (rows, H, cols) block of A (packed over rows, identity-indexed columns) != 0."""
    starts = _cu(lens_rows).tolist()
    return [(A[r0:r0 + n, :, :c] != 0).cpu() for r0, n, c in zip(starts, lens_rows, lens_cols)]


CUDA_FACE = [pytest.param("cuda", torch.float16, marks=pytest.mark.cuda),
             pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend,dtype", [("triton", torch.float32), ("triton", torch.float16),
                                           ("cpu", torch.float32), ("torch", torch.float32)] + CUDA_FACE)
@pytest.mark.parametrize("p", [0.2, 0.5])  # 0.5: threshold 2**31, the unsigned compare's edge
def test_dropout_forward_mask_equals_reference_bit_for_bit(backend, dtype, causal, p, faces_called):
    """The mask every face applies, read through v = I (out = dropped probabilities), is the reference
    mask of each sequence, decision for decision."""
    device = _device(backend)
    q, k, cq, ck = _drop_inputs(dtype, device=device)
    torch.manual_seed(3)
    seed = int(varlen_mod._draw_seed(device))
    torch.manual_seed(3)
    with poisoned_outputs(), faces_run() as ran:
        A = mmfast.ops.attention_varlen(q, k, _eye_rows(DROP_LENS_K, dtype=dtype, device=device), cq, ck, 37, 40,
                                        causal=causal, dropout_p=p, backend=backend)
    assert_face_ran(ran, "attention_varlen", backend, ("forward",))
    assert torch.isfinite(A).all()
    for b, (got, want) in enumerate(zip(_kept_per_sequence(A, DROP_LENS_Q, DROP_LENS_K),
                                        _expected_keep(seed, p, causal))):
        assert torch.equal(got, want), f"sequence {b}: {(got != want).sum().item()} of {want.numel()} decisions differ"
    assert faces_called == {"torch": [], "cpu": [], "cuda": [], "triton": ["triton varlen kernel"]}[backend]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_dkdv_kernel_regenerates_the_forward_mask(dtype):
    """With v = I and dO = I the dK/dV kernel returns dV = (dropped probabilities)^T: its mask, read
    back, is the reference's (the dQ kernel's is checked by the gradients below)."""
    q, k, cq, ck = _drop_inputs(dtype)
    seed, p = torch.tensor([(7 << 32) | 0x9E3779B9]), 0.3
    v, dO = _eye_rows(DROP_LENS_K, dtype=dtype), _eye_rows(DROP_LENS_Q, dtype=dtype)
    out, lse = varlen_mod._varlen_fwd_op(q, k, v, cq, ck, 37, 40, seed, False, 0.2, p, "triton")
    with poisoned_outputs():
        _, _, dv = varlen_mod._varlen_bwd_op(dO, q, k, v, out, lse, cq, ck, 37, 40, seed, False, 0.2, p, "triton")
    kept_t = _kept_per_sequence(dv, DROP_LENS_K, DROP_LENS_Q)  # (Lk_b, H, Lq_b): the transposed mask
    for b, (got, want) in enumerate(zip(kept_t, _expected_keep(int(seed), p, False))):
        assert torch.equal(got.permute(2, 1, 0), want), f"sequence {b}"


@pytest.mark.parametrize("backend,dtype", [("triton", torch.float32), ("cpu", torch.float32)] + CUDA_FACE[:1])
def test_dropout_equal_lengths_give_the_padded_ops_mask(backend, dtype):
    """A batch without padding (every sequence of length L): after the same torch.manual_seed, the
    varlen face applies exactly the mask of mmfast.ops.attention's same face on the (B, H, L, D) batch."""
    B, L, p, device = 3, 19, 0.4, _device(backend)
    q, k = (randn(B * L, H, 24, seed=s, scale=0.3, dtype=dtype, device=device) for s in (1, 2))
    eye = _eye_rows([L] * B, D=24, dtype=dtype, device=device)
    cu = _cu([L] * B).to(device)
    torch.manual_seed(5)
    packed = mmfast.ops.attention_varlen(q, k, eye, cu, cu, L, L, dropout_p=p, backend=backend)
    heads = lambda x: x.reshape(B, L, H, 24).transpose(1, 2)
    torch.manual_seed(5)
    padded = mmfast.ops.attention(heads(q), heads(k), heads(eye), dropout_p=p, backend=backend)
    assert torch.equal(heads(packed) != 0, padded != 0)
    assert 0.4 < (padded[..., :L] == 0).double().mean() < 0.8  # the mask is not trivial


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend,dtype", [("triton", torch.float32), ("triton", torch.float16),
                                           ("cpu", torch.float32), ("cpu", torch.float16)] + CUDA_FACE)
def test_dropout_matches_float64_reference_given_the_same_mask(backend, dtype, causal):
    """Outputs and gradients under the rule against the float64 reference face run with the seed the
    op draws (so the same mask)."""
    lens_q, lens_k = [33, 1, 0, 20, 2], [17, 40, 5, 0, 35]
    if backend == "cuda":  # several 64-row tiles of the CUDA kernels, Lq > Lk and Lq < Lk
        lens_q, lens_k = [133, 1, 0, 70, 2], [67, 140, 5, 0, 135]
    device = _device(backend)
    q = randn(sum(lens_q), H, 24, dtype=dtype, seed=5, device=device)
    k = randn(sum(lens_k), H, 24, dtype=dtype, seed=6, device=device)
    v = randn(sum(lens_k), H, 24, dtype=dtype, seed=7, device=device)
    p = 0.25
    torch.manual_seed(9)
    seed = varlen_mod._draw_seed(device).cpu()

    def fn(q, k, v, cq, ck):
        torch.manual_seed(9)
        return mmfast.ops.attention_varlen(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=causal, scale=0.3,
                                           dropout_p=p, backend=backend)

    ref = lambda q, k, v, cq, ck: ref_varlen(q, k, v, cq, ck, causal=causal, scale=0.3, dropout_p=p, seed=seed)
    check_op(fn, ref, [q, k, v, _cu(lens_q).to(device), _cu(lens_k).to(device)], grad_inputs=(0, 1, 2),
             name=f"attention_varlen[{backend}] dropout", face=("attention_varlen", backend),
             reduction=_reduction(q, max(lens_q + lens_k)))


# ---------------------------------------------------------------------------------------------
# The CUDA face (csrc/cuda/attention_varlen.cu): compiled here, run only by the GPU check (cuda marker);
# on the CPU, the index arithmetic of its blocks (csrc/cuda/attention_varlen_index.h) and its dispatch

INDEX_DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "cuda/attention_varlen_index.h"

// argv: H D max_q max_k batch cu_q[0..batch] cu_k[0..batch]. Runs the block -> rows arithmetic of the
// forward grid (query tiles, longest first) and of the dK/dV grid (key tiles) and prints, per row a
// block writes: "O <out offset> <lse offset> <bh> <row within the sequence>" and "K <dk offset> <bh> <key>".
int main(int argc, char** argv) {
  using namespace mmfast::varlen;
  const int64_t H = std::atoll(argv[1]), D = std::atoll(argv[2]), max_q = std::atoll(argv[3]),
                max_k = std::atoll(argv[4]), batch = std::atoll(argv[5]);
  std::vector<int32_t> cu_q(batch + 1), cu_k(batch + 1);
  for (int64_t b = 0; b <= batch; ++b) cu_q[b] = std::atoi(argv[6 + b]), cu_k[b] = std::atoi(argv[7 + batch + b]);
  const int64_t total_q = cu_q[batch];
  const int64_t tq = tiles_of(max_q), tk = tiles_of(max_k);
  for (int64_t block = 0; block < tq * batch * H; ++block) {
    const Seq s = block_seq(cu_q.data(), cu_k.data(), H, block, tq);
    const int64_t m0 = block_tile(block, tq, true) * kTileRows;
    for (int64_t i = m0; i < m0 + kTileRows && i < s.Lq; ++i)
      std::printf("O %lld %lld %lld %lld\n", (long long)(packed_off(s.q0, s.h, H, D) + i * H * D),
                  (long long)(lse_off(s.q0, s.h, total_q) + i), (long long)s.bh, (long long)i);
  }
  for (int64_t block = 0; block < tk * batch * H; ++block) {
    const Seq s = block_seq(cu_q.data(), cu_k.data(), H, block, tk);
    const int64_t n0 = block_tile(block, tk, false) * kTileRows;
    for (int64_t j = n0; j < n0 + kTileRows && j < s.Lk; ++j)
      std::printf("K %lld %lld %lld\n", (long long)(packed_off(s.k0, s.h, H, D) + j * H * D), (long long)s.bh,
                  (long long)j);
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def index_driver(tmp_path_factory):
    import shutil
    import subprocess
    from pathlib import Path

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("varlen_index")
    (d / "driver.cpp").write_text(INDEX_DRIVER)
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{csrc}", str(d / "driver.cpp"), "-o", str(d / "driver")],
                   check=True, capture_output=True, text=True)
    return d / "driver"


@pytest.mark.parametrize("lens_q,lens_k,H,D", [
    ([1, 7, 0, 5, 3], [3, 7, 2, 0, 4], 2, 8),
    ([130, 64, 0, 65, 1], [64, 200, 5, 0, 129], 3, 40),  # several tiles, tile edges, 0-query / 0-key
])
def test_cuda_block_index_arithmetic_writes_every_row_once(index_driver, lens_q, lens_k, H, D):
    """The CUDA kernels' blocks (from attention_varlen_index.h, compiled for the host) write every
    row of out/lse (forward grid) and of dk/dv (key grid) exactly once, at its packed offset, with the
    dropout counters of the contract: bh = b * H + h, the row / key counted within the sequence."""
    import subprocess

    cq, ck = _cu(lens_q).tolist(), _cu(lens_k).tolist()
    args = [H, D, max(lens_q), max(lens_k), len(lens_q)] + cq + ck
    lines = subprocess.run([str(index_driver)] + [str(a) for a in args], check=True, capture_output=True,
                           text=True).stdout.split("\n")
    O = sorted(tuple(map(int, line.split()[1:])) for line in lines if line.startswith("O"))
    K = sorted(tuple(map(int, line.split()[1:])) for line in lines if line.startswith("K"))

    def expected(cu, with_lse):
        rows = []
        for b in range(len(lens_q)):
            for r in range(cu[b], cu[b + 1]):
                for h in range(H):
                    rows.append(((r * H + h) * D,) + ((h * cq[-1] + r,) if with_lse else ()) + (b * H + h, r - cu[b]))
        return sorted(rows)

    assert O == expected(cq, True)
    assert K == expected(ck, False)


def test_auto_never_picks_the_unverified_cuda_face(monkeypatch):
    """``auto`` passes the CUDA face as unsupported (so even MMFAST_TRUST_UNVERIFIED=1 skips it); an
    explicit backend does not."""
    seen = []
    resolve = varlen_mod.dispatch.resolve
    monkeypatch.setattr(varlen_mod.dispatch, "resolve", lambda op, be, dev, dt, unsupported=(), **kw: (
        seen.append(dict(unsupported)), resolve(op, be, dev, dt, unsupported, **kw))[1])
    q, k, v, cq, ck = _inputs()
    mmfast.ops.attention_varlen(q, k, v, cq, ck, 7, 7)
    mmfast.ops.attention_varlen(q, k, v, cq, ck, 7, 7, backend="cpu")
    assert "cuda" in seen[0] and "never verified" in seen[0]["cuda"]
    assert "cuda" not in seen[1]


GPU_LENS = [([1, 7, 0, 113, 197, 64, 65], [7, 1, 5, 0, 577, 64, 130])]  # odd lengths, tile edges, empty sequences


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [32, 64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lens_q,lens_k", GPU_LENS)
def test_gpu_cuda_face_matches_float64_reference(lens_q, lens_k, dtype, D, causal):
    q = randn(sum(lens_q), H, D, dtype=dtype, seed=1, device="cuda")
    k = randn(sum(lens_k), H, D, dtype=dtype, seed=2, device="cuda")
    v = randn(sum(lens_k), H, D, dtype=dtype, seed=3, device="cuda")
    fn = lambda q, k, v, cq, ck: mmfast.ops.attention_varlen(q, k, v, cq, ck, max(lens_q), max(lens_k),
                                                             causal=causal, backend="cuda")
    ref = lambda q, k, v, cq, ck: ref_varlen(q, k, v, cq, ck, causal=causal)
    check_op(fn, ref, [q, k, v, _cu(lens_q).cuda(), _cu(lens_k).cuda()], grad_inputs=(0, 1, 2),
             name="attention_varlen[cuda]", face=("attention_varlen", "cuda"),
             reduction=_reduction(q, max(lens_q + lens_k)))


@pytest.mark.cuda
def test_gpu_cuda_face_streams_strided_and_copies_misaligned_inputs():
    """q, k, v as views of one packed (total, 3, H, D) qkv tensor (row stride 3 H D) stream in place;
    a view starting one element in (misaligned for cp.async) is copied first: both right."""
    lens, D = [5, 70, 1], 64
    total = sum(lens)
    qkv = randn(total, 3, H, D, dtype=torch.float16, seed=4, device="cuda")
    cu = _cu(lens).cuda()
    flat = randn(total * H * D + 1, dtype=torch.float16, seed=5, device="cuda")
    for q, k, v in ((qkv[:, 0], qkv[:, 1], qkv[:, 2]), (flat[1:].view(total, H, D), qkv[:, 1], qkv[:, 2])):
        fn = lambda q, k, v: mmfast.ops.attention_varlen(q, k, v, cu, cu, 70, 70, causal=True, backend="cuda")
        ref = lambda q, k, v: ref_varlen(q, k, v, cu.cpu(), cu.cpu(), causal=True)
        check_op(fn, ref, [q, k, v], grad_inputs=(0, 1, 2), name="attention_varlen[cuda] strided",
                 face=("attention_varlen", "cuda"), reduction=(70, D))


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_cuda_dropout_masks_across_tiles(causal):
    """Sequences longer than one 64-row tile: the forward's mask (v = I) and the dK/dV kernel's (dO = I:
    dV = dropped probabilities^T) equal the reference mask, decision for decision."""
    lens_q, lens_k, D, p = [100, 1, 0, 65], [128, 70, 3, 0], 128, 0.3
    q = randn(sum(lens_q), H, D, dtype=torch.float16, seed=1, scale=0.3, device="cuda")
    k = randn(sum(lens_k), H, D, dtype=torch.float16, seed=2, scale=0.3, device="cuda")
    cq, ck = _cu(lens_q).cuda(), _cu(lens_k).cuda()
    v, dO = _eye_rows(lens_k, D, torch.float16, "cuda"), _eye_rows(lens_q, D, torch.float16, "cuda")
    seed = torch.tensor([(3 << 32) | 12345], device="cuda")
    out, lse = varlen_mod._varlen_fwd_op(q, k, v, cq, ck, 100, 128, seed, causal, 0.1, p, "cuda")
    _, _, dv = varlen_mod._varlen_bwd_op(dO, q, k, v, out, lse, cq, ck, 100, 128, seed, causal, 0.1, p, "cuda")
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        keep = varlen_mod.sequence_keep_mask(int(seed), b, H, lq, lk, p)[0]
        if causal:
            keep = keep & (torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + lk - lq)
        got = _kept_per_sequence(out, lens_q, lens_k)[b]
        assert torch.equal(got.transpose(0, 1), keep), f"forward, sequence {b}"
        got_t = _kept_per_sequence(dv, lens_k, lens_q)[b]  # (Lk, H, Lq)
        assert torch.equal(got_t.permute(1, 2, 0), keep), f"dK/dV kernel, sequence {b}"


@pytest.mark.cuda
def test_gpu_cuda_errors_name_the_argument():
    from mmfast import _extension

    q = randn(12, H, 32, dtype=torch.float16, device="cuda")
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device="cuda")
    fwd = _extension.op("attention_varlen_forward")
    with pytest.raises(RuntimeError, match="cu_seqlens_q"):
        fwd(q, q, q, cu.long(), cu, 7, 7, None, False, 0.1, 0.0)
    with pytest.raises(RuntimeError, match="cu_seqlens_k"):
        fwd(q, q, q, cu, cu[:2], 7, 7, None, False, 0.1, 0.0)
    with pytest.raises(RuntimeError, match="seed"):
        fwd(q, q, q, cu, cu, 7, 7, None, False, 0.1, 0.2)
    with pytest.raises(RuntimeError, match="'q'"):
        fwd(q.float(), q.float(), q.float(), cu, cu, 7, 7, None, False, 0.1, 0.0)
