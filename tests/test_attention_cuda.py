"""The CUDA C++ attention face (csrc/cuda/attention.cu, FlashAttention-2 design).

On the CPU: the dropout indexing the kernels call (csrc/cuda/attention_dropout.h over csrc/philox.h),
compiled by the host C++ compiler, equals the executable specification mmfast/reference/dropout.py
bit for bit, and its threshold is the reference's.

On a GPU (cuda marker; tests/test_attention.py::test_gpu_matrix covers every head dim x dtype x
mask x causal x the odd lengths 1, 7, 113, 197, 577 on this face too): the tile edges of this
kernel (64-key tiles, 64-query forward blocks, 32/64-query backward tiles), inputs the kernel
cannot stream in place (strided, misaligned), dropout against the reference mask (forward and all
gradients under the rule) and identical to the Triton face's for the same seed, the kernels that
ran (profiler), and the argument errors of the C++ op.
"""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfast import reference as R
from mmfast import testing
from mmfast.ops.attention import _attention_fwd_op, attention
from mmfast.reference import dropout
from mmfast.reference.attention import attention_mask
from test_attention import check, make_inputs

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# CPU: the kernels' dropout indexing, compiled for the host, against the reference

DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include "cuda/attention_dropout.h"

// argv: seed bh0 BH i0 Lq Lk p. Prints the threshold, then per (bh, i): the keep bits of
// dropout_keep for j in [0, Lk), a space, the bits of dropout_keep_pair for j in [0, Lk + Lk % 2).
int main(int argc, char** argv) {
  if (argc != 8) return 2;
  const uint64_t seed = std::strtoull(argv[1], nullptr, 10);
  const uint32_t bh0 = std::strtoul(argv[2], nullptr, 10), BH = std::strtoul(argv[3], nullptr, 10);
  const uint32_t i0 = std::strtoul(argv[4], nullptr, 10), Lq = std::strtoul(argv[5], nullptr, 10);
  const uint32_t Lk = std::strtoul(argv[6], nullptr, 10);
  const uint32_t thr = mmfast::dropout_threshold(std::strtod(argv[7], nullptr));
  std::printf("%u\n", thr);
  for (uint32_t bh = bh0; bh < bh0 + BH; ++bh)
    for (uint32_t i = i0; i < i0 + Lq; ++i) {
      for (uint32_t j = 0; j < Lk; ++j) std::putchar(mmfast::dropout_keep(seed, bh, i, j, thr) ? '1' : '0');
      std::putchar(' ');
      for (uint32_t j = 0; j < Lk; j += 2) {
        const uint32_t two = mmfast::dropout_keep_pair(seed, bh, i, j, thr);
        std::putchar(two & 1u ? '1' : '0');
        std::putchar(two & 2u ? '1' : '0');
      }
      std::putchar('\n');
    }
  return 0;
}
"""


def _compile(tmp_path_factory, name, source):
    """A host executable from `source`, which includes headers of csrc/ (the kernels' own code)."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp(name)
    (d / "driver.cpp").write_text(source)
    exe = d / "driver"
    subprocess.run([cxx, "-std=c++17", "-O2", f"-I{ROOT / 'csrc'}", str(d / "driver.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    return exe


@pytest.fixture(scope="module")
def dropout_driver(tmp_path_factory):
    return _compile(tmp_path_factory, "attn_dropout", DRIVER)


def _run_driver(exe, seed, bh0, BH, i0, Lq, Lk, p):
    out = subprocess.run([str(exe), str(seed), str(bh0), str(BH), str(i0), str(Lq), str(Lk), repr(float(p))],
                         check=True, capture_output=True, text=True).stdout.split("\n")
    thr = int(out[0])
    rows = [line.split(" ") for line in out[1:1 + BH * Lq]]
    single = np.array([[c == "1" for c in r[0]] for r in rows]).reshape(BH, Lq, Lk)
    pair = np.array([[c == "1" for c in r[1]] for r in rows]).reshape(BH, Lq, -1)
    return thr, single, pair


def _reference_keep(seed, bh0, BH, i0, Lq, Lk, p):
    """The contract itself: counter (j >> 2, i, bh, 0), key (seed lo, seed hi), word j & 3."""
    bh = np.arange(bh0, bh0 + BH, dtype=np.uint64)[:, None, None]
    i = np.arange(i0, i0 + Lq, dtype=np.uint64)[None, :, None]
    j = np.arange(Lk, dtype=np.uint64)[None, None, :]
    words = np.stack(np.broadcast_arrays(*dropout.philox4x32_10(j >> np.uint64(2), i, bh, 0, seed & 0xFFFFFFFF,
                                                                seed >> 32)), axis=-1)
    word = np.take_along_axis(words, np.broadcast_to((j & np.uint64(3)).astype(np.int64)[..., None],
                                                     words.shape[:-1] + (1,)), axis=-1)[..., 0]
    return word >= np.uint64(dropout.dropout_threshold(p))


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 5, 0x123456789ABCDEF, 2**62 - 1])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kernel_dropout_indexing_equals_reference(dropout_driver, seed, p):
    BH, Lq, Lk = 3, 7, 197  # odd Lk: every j & 3, a partial last group
    thr, single, pair = _run_driver(dropout_driver, seed, 0, BH, 0, Lq, Lk, p)
    assert thr == dropout.dropout_threshold(p)
    expected = dropout.keep_mask(seed, BH, 1, Lq, Lk, p).reshape(BH, Lq, Lk).numpy()
    assert np.array_equal(single, expected)
    expected_even = dropout.keep_mask(seed, BH, 1, Lq, Lk + 1, p).reshape(BH, Lq, Lk + 1).numpy()
    assert np.array_equal(pair, expected_even)  # the pair function: columns j, j + 1 of even j
    assert 0 < single.sum() < single.size  # neither all kept nor all dropped: the comparison can fail


def test_kernel_dropout_indexing_large_counters(dropout_driver):
    seed, bh0, i0, p = 2**61 + 12345, 70_000, 100_000, 0.3  # bh, i beyond 16 bits
    thr, single, _ = _run_driver(dropout_driver, seed, bh0, 2, i0, 3, 29, p)
    assert np.array_equal(single, _reference_keep(seed, bh0, 2, i0, 3, 29, p))


@pytest.mark.parametrize("p", [0.0, 1 / 3, 0.1, 0.999999999, 1 - 2.0**-33])
def test_kernel_dropout_threshold(dropout_driver, p):
    thr, single, _ = _run_driver(dropout_driver, 7, 0, 1, 0, 1, 8, p)
    assert thr == dropout.dropout_threshold(p)
    if p == 0.0:
        assert single.all()


# ---------------------------------------------------------------------------------------------
# CPU: the kernels' ldmatrix lane addresses (attention_fragments.h) against an emulation of
# ldmatrix.x4 and mma.sync m16n8k16 as the PTX ISA defines their fragments (lane = 4g + t)

FRAGMENT_DRIVER = r"""
#include <cstdio>
#include "cuda/attention_fragments.h"
using namespace mmfast::fragment;
int main() {
  for (int l = 0; l < 32; ++l)
    std::printf("%d %d %d %d %d %d %d %d\n", a_row(l), a_col(l), bn_row(l), bn_col(l), bt_row(l), bt_col(l),
                at_row(l), at_col(l));
  return 0;
}
"""


@pytest.fixture(scope="module")
def lane_addresses(tmp_path_factory):
    exe = _compile(tmp_path_factory, "attn_fragments", FRAGMENT_DRIVER)
    table = np.loadtxt(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines(),
                       dtype=int)
    names = ["a", "bn", "bt", "at"]
    return {n: [tuple(rc) for rc in table[:, 2 * i:2 * i + 2]] for i, n in enumerate(names)}


def _ldmatrix_x4(smem, lane_rows, trans):
    """ldmatrix.m8n8.x4(.trans): lanes 8i .. 8i+7 point at the 8 rows of matrix i; lane 4g + t receives
    (row g, cols 2t, 2t+1) of each matrix, with .trans (rows 2t, 2t+1, col g). -> (lane, matrix, 2)"""
    out = np.empty((32, 4, 2))
    for i in range(4):
        m = np.stack([smem[r, c:c + 8] for r, c in lane_rows[8 * i:8 * i + 8]])
        for lane in range(32):
            g, t = divmod(lane, 4)
            out[lane, i] = m[2 * t:2 * t + 2, g] if trans else m[g, 2 * t:2 * t + 2]
    return out


def _mma(a, b):
    """mma.sync.m16n8k16.row.col from fragments a (lane, 4, 2) and b (lane, 2, 2): the 16 x 8 product,
    as the accumulator layout (lane, 4): (row g, cols 2t, 2t+1), (row g+8, same cols)."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = divmod(lane, 4)
        A[g, 2 * t:2 * t + 2], A[g + 8, 2 * t:2 * t + 2] = a[lane, 0], a[lane, 1]
        A[g, 2 * t + 8:2 * t + 10], A[g + 8, 2 * t + 8:2 * t + 10] = a[lane, 2], a[lane, 3]
        B[2 * t:2 * t + 2, g], B[2 * t + 8:2 * t + 10, g] = b[lane, 0], b[lane, 1]
    C = A @ B
    return np.array([[C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]]
                     for g, t in (divmod(lane, 4) for lane in range(32))])


def _acc_matrix(acc):
    """Accumulator layout (lane, 4) -> the 16 x 8 matrix."""
    C = np.zeros((16, 8))
    for lane in range(32):
        g, t = divmod(lane, 4)
        C[g, 2 * t:2 * t + 2], C[g + 8, 2 * t:2 * t + 2] = acc[lane, 0:2], acc[lane, 2:4]
    return C


def test_kernel_lane_addresses_give_the_mma_fragments(lane_addresses):
    rng = np.random.default_rng(0)
    X, Y, Z = (rng.integers(-4, 5, (16, 16)).astype(float) for _ in range(3))  # exact in float64
    a = _ldmatrix_x4(X, lane_addresses["a"], trans=False)  # A = X ([M][K] in shared)
    b = _ldmatrix_x4(Y, lane_addresses["bn"], trans=False)  # B = Y^T (Y: [N][K], as K, Q, dO, V rows)
    assert np.array_equal(_acc_matrix(_mma(a, b[:, 0:2])), X @ Y[0:8].T)  # S = Q K^T: n-tile 0
    assert np.array_equal(_acc_matrix(_mma(a, b[:, 2:4])), X @ Y[8:16].T)  # n-tile 1
    b = _ldmatrix_x4(Z, lane_addresses["bt"], trans=True)  # B = Z ([K][N]: V, dO, Q, K rows by D)
    assert np.array_equal(_acc_matrix(_mma(a, b[:, 0:2])), X @ Z[:, 0:8])  # O += P V
    assert np.array_equal(_acc_matrix(_mma(a, b[:, 2:4])), X @ Z[:, 8:16])
    a = _ldmatrix_x4(Y, lane_addresses["at"], trans=True)  # A = Y^T ([K][M]: dS^T in shared)
    assert np.array_equal(_acc_matrix(_mma(a, b[:, 0:2])), Y.T @ Z[:, 0:8])  # dQ += dS K
    assert np.array_equal(_acc_matrix(_mma(a, b[:, 2:4])), Y.T @ Z[:, 8:16])


def test_kernel_accumulators_are_the_next_a_fragments(lane_addresses):
    # acc_to_a: n-tiles 2kk, 2kk+1 of an accumulator -> A of chunk kk, as (c0[0..1], c0[2..3], c1[0..1], c1[2..3])
    rng = np.random.default_rng(1)
    X, Y, Z = (rng.integers(-4, 5, (16, 16)).astype(float) for _ in range(3))
    a = _ldmatrix_x4(X, lane_addresses["a"], trans=False)
    b = _ldmatrix_x4(Y, lane_addresses["bn"], trans=False)
    c0, c1 = _mma(a, b[:, 0:2]), _mma(a, b[:, 2:4])  # S (16 x 16) = X Y^T as two n-tiles
    p = np.stack([c0[:, 0:2], c0[:, 2:4], c1[:, 0:2], c1[:, 2:4]], axis=1)
    v = _ldmatrix_x4(Z, lane_addresses["bt"], trans=True)
    assert np.array_equal(_acc_matrix(_mma(p, v[:, 0:2])), (X @ Y.T) @ Z[:, 0:8])


# ---------------------------------------------------------------------------------------------
# GPU: tile edges, layouts, dropout, provenance, errors

# (Lq, Lk): tile edges of 64 keys / 64 forward queries / 32-64 backward queries, causal with
# Lq > Lk (fully masked leading rows) and Lq < Lk, one key and one query
EDGES = [(1, 64), (64, 1), (31, 33), (63, 65), (65, 63), (96, 129), (129, 96), (200, 67)]


@pytest.mark.cuda
@pytest.mark.parametrize("Lq,Lk", EDGES)
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_tile_edges(Lq, Lk, D, causal):
    check("cuda", 2, 2, Lq, Lk, D, torch.bfloat16, True, causal, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("D", [8, 24, 40, 80, 120])
def test_gpu_head_dims_padded_in_shared_memory(D):
    check("cuda", 2, 3, 97, 131, D, torch.float16, True, True, device="cuda")


@pytest.mark.cuda
def test_gpu_inputs_copied_when_not_streamable():
    # k with a non-unit stride along D (kept by check_op's clones): the rule, forward and gradients
    B, H, L, D = 2, 3, 77, 64
    q, _, v, m = make_inputs(B, H, L, L, D, torch.float16, device="cuda", mask=True)
    k = torch.randn(B, H, D, L, device="cuda", dtype=torch.float16).transpose(-2, -1)
    assert k.stride(3) != 1
    check_args = dict(key_padding_mask=m, causal=True)
    testing.check_op(lambda q, k, v: attention(q, k, v, **check_args, backend="cuda"),
                     lambda q, k, v: R.attention(q, k, v, **check_args), [q, k, v], grad_inputs=[0, 1, 2],
                     name="cuda strided k", face=("attention", "cuda"), reduction=(max(q.shape[2], k.shape[2]), q.shape[3]))
    # a base that is not 16-byte aligned (check_op would clone it away): the same bits as aligned
    flat = torch.empty(q.numel() + 1, device="cuda", dtype=q.dtype)
    q_odd = flat[1:].view(q.shape)
    q_odd.copy_(q)
    assert q_odd.data_ptr() % 16 != 0
    assert torch.equal(attention(q_odd, k, v, **check_args, backend="cuda"),
                       attention(q, k, v, **check_args, backend="cuda"))


def _op(backend, q, k, v, m, seed, causal, p):
    scale = q.shape[-1] ** -0.5
    return _attention_fwd_op(q, k, v, m, seed, causal, scale, p, backend)[0]


def _reference_with_mask(keep, p, causal):
    """Attention with the given keep mask, from R.attention's probabilities (identity V)."""

    def ref(q, k, v, m):
        Lk = k.shape[2]
        eye = torch.eye(Lk, dtype=q.dtype, device=q.device).expand(*k.shape[:2], Lk, Lk)
        probs = R.attention(q, k, eye, key_padding_mask=m, causal=causal)
        return (probs * keep.to(dtype=q.dtype, device=q.device) / (1 - p)) @ v

    return ref


@pytest.mark.cuda
@pytest.mark.parametrize("D", [32, 64, 80, 128])
@pytest.mark.parametrize("Lq,Lk,causal", [(7, 197, False), (113, 113, True), (197, 40, True), (1, 577, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_dropout_equals_reference_mask(D, Lq, Lk, causal, dtype):
    B, H, p, s = 2, 3, 0.2, 2**40 + 17
    q, k, v, m = make_inputs(B, H, Lq, Lk, D, dtype, device="cuda", mask=True)
    seed = torch.tensor([s], dtype=torch.int64, device="cuda")
    keep = dropout.keep_mask(s, B, H, Lq, Lk, p)
    testing.check_op(lambda q, k, v, m: _op("cuda", q, k, v, m, seed, causal, p),
                     _reference_with_mask(keep, p, causal), [q, k, v, m], grad_inputs=[0, 1, 2],
                     name=f"cuda dropout {Lq}x{Lk} D{D} {dtype} causal={causal}", face=("attention", "cuda"),
                     reduction=(max(Lq, Lk), D))


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_dropout_same_elements_as_triton(causal):
    B, H, Lq, Lk, p = 2, 3, 77, 64, 0.3
    q, k, _, m = make_inputs(B, H, Lq, Lk, 64, torch.float16, device="cuda", mask=True)
    m[-1, :5] = True  # some visible keys in every batch row
    eye = torch.eye(Lk, device="cuda", dtype=torch.float16).expand(B, H, Lk, Lk).contiguous()
    seed = torch.tensor([123456789], dtype=torch.int64, device="cuda")
    a = _op("cuda", q, k, eye, m, seed, causal, p)  # = probabilities * keep / (1 - p)
    b = _op("triton", q, k, eye, m, seed, causal, p)
    vis = attention_mask(m, causal, Lq, Lk, "cuda").expand(B, H, Lq, Lk)
    assert vis.sum() > 1000
    assert torch.equal((a != 0) & vis, (b != 0) & vis)
    expected = dropout.keep_mask(123456789, B, H, Lq, Lk, p).cuda() & vis
    assert torch.equal((a != 0) & vis, expected)


@pytest.mark.cuda
def test_gpu_cuda_kernels_ran():
    q, k, v, m = make_inputs(2, 3, 40, 197, 64, torch.bfloat16, device="cuda", mask=True)
    q.requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        attention(q, k, v, key_padding_mask=m, backend="cuda").sum().backward()
        torch.cuda.synchronize()
    names = " ".join(e.name for e in prof.events())
    for kernel in ("attn_fwd_kernel", "attn_bwd_delta_kernel", "attn_bwd_kernel", "attn_bwd_dq_convert_kernel"):
        assert kernel in names, kernel


@pytest.mark.cuda
def test_gpu_op_argument_errors():
    q, k, v, m = make_inputs(1, 2, 8, 16, 64, torch.float16, device="cuda", mask=True)
    op = torch.ops.mmfast_C.attention_forward
    with pytest.raises(RuntimeError, match="argument 'seed'.*required when dropout_p > 0"):
        op(q, k, v, m, None, False, 0.125, 0.1)
    with pytest.raises(RuntimeError, match="argument 'seed'.*int64"):
        op(q, k, v, m, torch.zeros(1, device="cuda"), False, 0.125, 0.1)
    with pytest.raises(RuntimeError, match="argument 'dropout_p'"):
        op(q, k, v, m, None, False, 0.125, 1.0)
    with pytest.raises(RuntimeError, match="argument 'key_padding_mask'"):
        op(q, k, v, m[:, :5], None, False, 0.125, 0.0)
    with pytest.raises(RuntimeError, match="argument 'q'.*multiple of 8"):
        op(q[..., :60], k[..., :60], v[..., :60], m, None, False, 0.125, 0.0)


@pytest.mark.cuda
def test_gpu_opcheck():
    from mmfast.ops.attention import _attention_bwd_op

    q, k, v, m = make_inputs(2, 2, 5, 9, 16, torch.float16, device="cuda", mask=True)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    seed = torch.tensor([1234], device="cuda")
    for args in [(q, k, v, m, None, True, 0.25, 0.0, "cuda"), (q, k, v, None, seed, False, 0.25, 0.2, "cuda")]:
        torch.library.opcheck(_attention_fwd_op, args)
    out, lse = _attention_fwd_op(q, k, v, m, seed, True, 0.25, 0.2, "cuda")
    assert lse.shape == (2, 2, 5) and lse.dtype == torch.float32
    q, k, v = (x.detach() for x in (q, k, v))
    torch.library.opcheck(_attention_bwd_op, (torch.randn_like(out), q, k, v, out.detach(), lse, m, seed, True, 0.25,
                                              0.2, "cuda"))
