// Variable-length (packed) attention, CUDA face: the FlashAttention-2 kernels of csrc/cuda/attention.cu
// (the machinery of attention_fa2.h: mma.sync m16n8k16, ldmatrix, two-stage cp.async, online softmax in
// base 2, the recomputing backward with dQ atomics) over packed sequences. Layout of flash-attn's
// flash_attn_varlen_func: q (total_q, H, D), k/v (total_k, H, D) with any strides (rows a cp.async
// cannot stream are copied contiguous on the host), cu_seqlens_q/k int32 (batch + 1,) on the device.
//
// A block owns (sequence b, head h, 64-row tile): the grid covers the longest sequence (max_seqlen),
// and a block whose tile starts past its own sequence's length returns at once. Offsets come from
// cu_seqlens read in the kernel (no host sync): sequence b is q rows [cu_q[b], cu_q[b+1]) against k/v
// rows [cu_k[b], cu_k[b+1]). Per sequence: causal aligned bottom-right (query i sees keys
// j <= i + Lk - Lq), a sequence without keys gives out 0, lse 0 and dq 0, one without queries gives its
// keys dk = dv = 0. Dropout: the Philox contract of csrc/philox.h (attention_dropout.h) with batch-head
// bh = b * H + h and the row i, column j counted within the sequence, as the other faces
// (mmfast/reference/attention_varlen.py), so a batch of equal lengths gets the padded op's mask.
// Outputs: out, dq, dk, dv contiguous (total, H, D); lse float32 (H, total_q), base 2, read only by
// this face's backward. cu_seqlens values are checked by mmfast/ops/attention_varlen.py (eager mode),
// not here: reading them on the host would synchronise.
//
// Compiled for sm_90 only; never run on a GPU when written.

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "attention_dropout.h"
#include "attention_fa2.h"
#include "attention_varlen_index.h"
#include "launch_config.h"

namespace mmfast {
namespace {

struct VarlenParams {
  Slice q, k, v, o, dout;  // packed (total, H, D): sb unused, sh = head stride, sl = row stride
  const int32_t* cu_q;     // (batch + 1,) cumulative query rows
  const int32_t* cu_k;     // (batch + 1,) cumulative key rows
  const int64_t* seed;     // dropout only: device scalar
  uint32_t drop_threshold;
  float drop_scale;  // 1 / (1 - p), 1 without dropout
  bool dropout;
  void* out;      // forward: out (total_q, H, D); backward: dq
  void* out2;     // backward: dk (total_k, H, D)
  void* out3;     // backward: dv
  float* lse;     // (H, total_q), base 2
  float* delta;   // (H, total_q)
  float* dq_acc;  // (total_q, H, D) fp32, zeroed
  int64_t H, D, total_q;
  int64_t num_tiles;  // 64-row tiles of the longest sequence of the kind the kernel tiles
  float qk_scale;     // scale * log2(e)
  float scale;
  bool causal;
};

using varlen::block_seq;
using varlen::block_tile;
using varlen::lse_off;
using varlen::packed_off;
using varlen::Seq;
using varlen::tiles_of;
static_assert(varlen::kTileRows == kTileRows, "attention_varlen_index.h tiles as attention_fa2.h does");

// The padded head dims the kernels are instantiated for: not D = 80 (attention.cu's fifth), which
// these kernels were never built and tested for; D in (64, 96] pads to 96.
using VarlenPaddedDims = HeadDims<32, 64, 96, 128>;

// Element offset of packed row `row`, head h, in an input slice (any strides; load_tile adds the row
// within the sequence).
__device__ __forceinline__ int64_t row_off(const Slice& s, int64_t row, int64_t h) { return row * s.sl + h * s.sh; }

// ------------------------------------------------------------------------------------------
// Forward: a block = 4 warps owns 64 query rows of one (sequence, head) and streams 64-key tiles.

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) attn_varlen_fwd_kernel(const VarlenParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Ly = Layout<DP>;
  constexpr int kLd = Ly::kLd;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sKV = sQ + Ly::kTile;  // stage s: K at sKV + 2s * kTile, V at sKV + (2s + 1) * kTile

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  // long tiles (causal: more keys) first, as in attention.cu
  const int64_t tile = block_tile(blockIdx.x, p.num_tiles, true);
  const Seq sq = block_seq(p.cu_q, p.cu_k, p.H, blockIdx.x, p.num_tiles);
  const int64_t m0 = tile * kTileRows;
  if (m0 >= sq.Lq) return;  // past this sequence's queries (the whole block: no barrier is skipped)

  int64_t n_end = sq.Lk;  // keys [0, n_end) can be visible to some row of this block
  if (p.causal) {
    const int64_t last_row = (m0 + kTileRows < sq.Lq ? m0 + kTileRows : sq.Lq) - 1;
    const int64_t e = last_row + 1 + sq.Lk - sq.Lq;
    n_end = e < 0 ? 0 : (e < sq.Lk ? e : sq.Lk);
  }
  const int n_tiles = static_cast<int>((n_end + kTileRows - 1) / kTileRows);
  const int64_t k_base = row_off(p.k, sq.k0, sq.h), v_base = row_off(p.v, sq.k0, sq.h);
  auto load_kv = [&](int stage, int64_t n0) {
    load_tile<T, DP>(sKV + 2 * stage * Ly::kTile, p.k, k_base, n0, sq.Lk, p.D);
    load_tile<T, DP>(sKV + (2 * stage + 1) * Ly::kTile, p.v, v_base, n0, sq.Lk, p.D);
  };

  load_tile<T, DP>(sQ, p.q, row_off(p.q, sq.q0, sq.h), m0, sq.Lq, p.D);
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.seed) : 0;
  const int64_t row0 = m0 + warp * 16 + g;  // this lane's rows: row0, row0 + 8 (within the sequence)
  const int64_t diag0 = row0 + sq.Lk - sq.Lq;

  float o[DP / 8][4];
#pragma unroll
  for (int i = 0; i < DP / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  for (int it = 0; it < n_tiles; ++it) {
    const int stage = it & 1;
    const int64_t n0 = static_cast<int64_t>(it) * kTileRows;
    if (it + 1 < n_tiles) load_kv(stage ^ 1, n0 + kTileRows);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* sK = sKV + 2 * stage * Ly::kTile;
    const T* sV = sK + Ly::kTile;
    float s[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    mma_abt<T, 8, DP / 16>(s, sQ + warp * 16 * kLd, sK, kLd);

    // visible: a key of the sequence (its bit in kbits: n0 < Lk here) and, causal, col <= the row's diagonal
    const int64_t keys_left = sq.Lk - n0;
    const uint64_t kbits = keys_left >= 64 ? ~0ull : (1ull << keys_left) - 1;
    const int64_t lim[2] = {p.causal ? diag0 - n0 : 64, p.causal ? diag0 + 8 - n0 : 64};
    fwd_softmax_step<DP>(s, kbits, lim, p.qk_scale, t, m_run, l_run, o);
    if (p.dropout) fwd_dropout(s, seed, sq.bh, row0, n0, t, p.drop_threshold);
    uint32_t pa[4][4];
    acc_to_a<T, 8>(pa, s);
    mma_ab<T, DP, 4>(o, pa, sV, kLd);
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();

  float inv[2];
  fwd_finish(l_run, m_run, p.drop_scale, row0, sq.Lq, t, p.lse + lse_off(sq.q0, sq.h, p.total_q), inv);
  T* out_rows = static_cast<T*>(p.out) + packed_off(sq.q0, sq.h, p.H, p.D);
  store_warp_rows<T, DP>(o, inv[0], inv[1], sQ + warp * 16 * kLd, out_rows, m0 + warp * 16, sq.Lq, p.D, p.H * p.D);
#endif
}

// ------------------------------------------------------------------------------------------
// Backward, kernel 1: delta = rowsum(dO * O) as the diagonal of O dO^T (the mma sequence of dP^T in
// kernel 2: a row with one visible key gets dP - delta = 0 exactly, see attention.cu).

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) attn_varlen_bwd_delta_kernel(const VarlenParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Ly = Layout<DP>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sO = reinterpret_cast<T*>(smem);
  T* sdO = sO + Ly::kTile;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t tile = block_tile(blockIdx.x, p.num_tiles, false);
  const Seq sq = block_seq(p.cu_q, p.cu_k, p.H, blockIdx.x, p.num_tiles);
  const int64_t m0 = tile * kTileRows;
  if (m0 >= sq.Lq) return;
  load_tile<T, DP>(sO, p.o, row_off(p.o, sq.q0, sq.h), m0, sq.Lq, p.D);
  load_tile<T, DP>(sdO, p.dout, row_off(p.dout, sq.q0, sq.h), m0, sq.Lq, p.D);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  bwd_delta_tile<T, DP>(sO, sdO, p.delta + lse_off(sq.q0, sq.h, p.total_q), m0, sq.Lq, warp, g, t);
#endif
}

// Backward, kernel 2: a block owns 64 keys of one (sequence, head), sweeps the query tiles that see
// them, accumulates dK, dV in registers and adds dQ into the fp32 buffer with atomics.

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) attn_varlen_bwd_kernel(const VarlenParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Ly = Layout<DP>;
  constexpr int kLd = Ly::kLd;
  constexpr int kBM = Ly::kBM;
  constexpr int kNT = kBM / 8;
  constexpr int kKC = kBM / 16;
  constexpr int kLdDS = Ly::kLdDS;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + Ly::kTile;
  T* sQdO = sV + Ly::kTile;
  T* sdS = sQdO + 4 * Ly::kQTile;
  float* sLD = reinterpret_cast<float*>(sdS + kTileRows * kLdDS);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t tile = block_tile(blockIdx.x, p.num_tiles, false);
  const Seq sq = block_seq(p.cu_q, p.cu_k, p.H, blockIdx.x, p.num_tiles);
  const int64_t n0 = tile * kTileRows;
  if (n0 >= sq.Lk) return;  // past this sequence's keys

  int64_t m_begin = 0;  // causal: the first query that sees key n0 is n0 - (Lk - Lq)
  if (p.causal) {
    const int64_t first = n0 - (sq.Lk - sq.Lq);
    m_begin = first <= 0 ? 0 : (first / kBM) * kBM;
  }
  // 0 for a sequence without queries: its keys get dk = dv = 0
  const int m_tiles = static_cast<int>((sq.Lq - m_begin + kBM - 1) / kBM);
  const int64_t q_base = row_off(p.q, sq.q0, sq.h), do_base = row_off(p.dout, sq.q0, sq.h);
  const float* lse_rows = p.lse + lse_off(sq.q0, sq.h, p.total_q);
  const float* delta_rows = p.delta + lse_off(sq.q0, sq.h, p.total_q);
  auto load_q = [&](int stage, int64_t m) {
    load_tile<T, DP, kBM>(sQdO + 2 * stage * Ly::kQTile, p.q, q_base, m, sq.Lq, p.D);
    load_tile<T, DP, kBM>(sQdO + (2 * stage + 1) * Ly::kQTile, p.dout, do_base, m, sq.Lq, p.D);
    if (threadIdx.x < 2 * kBM) {  // threads [0, kBM): lse, [kBM, 2 kBM): delta
      const int r = threadIdx.x % kBM;
      const bool ok = m + r < sq.Lq;
      const float* src = (threadIdx.x < kBM ? lse_rows : delta_rows) + (ok ? m + r : 0);
      cp_async4(sLD + 2 * kBM * stage + threadIdx.x, src, ok);
    }
  };

  load_tile<T, DP>(sK, p.k, row_off(p.k, sq.k0, sq.h), n0, sq.Lk, p.D);
  load_tile<T, DP>(sV, p.v, row_off(p.v, sq.k0, sq.h), n0, sq.Lk, p.D);
  if (m_tiles > 0) load_q(0, m_begin);
  cp_async_commit();

  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.seed) : 0;
  int64_t key[2];
  bool key_ok[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    key[r] = n0 + warp * 16 + g + 8 * r;
    key_ok[r] = key[r] < sq.Lk;
  }

  float dk[DP / 8][4], dv[DP / 8][4];
#pragma unroll
  for (int i = 0; i < DP / 8; ++i) {
    dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.f;
    dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
  }
  const int64_t acc_pitch = p.H * p.D;  // rows of dq_acc

  for (int it = 0; it < m_tiles; ++it) {
    const int stage = it & 1;
    const int64_t m0 = m_begin + static_cast<int64_t>(it) * kBM;
    if (it + 1 < m_tiles) load_q(stage ^ 1, m0 + kBM);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* sQ = sQdO + 2 * stage * Ly::kQTile;
    const T* sdO = sQ + Ly::kQTile;
    const float* sLse = sLD + 2 * kBM * stage;
    const float* sDelta = sLse + kBM;

    // P^T = exp2(S^T * scale * log2e - lse), S^T = K_w Q^T (16 keys x kBM queries)
    float pt[kNT][4];
#pragma unroll
    for (int i = 0; i < kNT; ++i) pt[i][0] = pt[i][1] = pt[i][2] = pt[i][3] = 0.f;
    mma_abt<T, kNT, DP / 16, 1>(pt, sK + warp * 16 * kLd, sQ, kLd);
    bwd_probs<kBM>(pt, sLse, p.qk_scale, p.causal, key, key_ok, sq.Lq, sq.Lk, m0, t);
    const uint32_t keep = p.dropout ? bwd_keep_bits<kNT>(seed, sq.bh, m0, key, t, p.drop_threshold) : 0xffffffffu;
    // dS^T = P^T o (dP^T o Z - delta), dP^T = V_w dO^T, Z = keep / (1 - p)
    float ds[kNT][4];
#pragma unroll
    for (int i = 0; i < kNT; ++i) ds[i][0] = ds[i][1] = ds[i][2] = ds[i][3] = 0.f;
    mma_abt<T, kNT, DP / 16, 1>(ds, sV + warp * 16 * kLd, sdO, kLd);
    bwd_ds<kNT>(ds, pt, keep, p.drop_scale, sDelta, t);
    uint32_t pa[kKC][4], da[kKC][4];
    acc_to_a<T, kNT>(pa, pt);
    acc_to_a<T, kNT>(da, ds);
    mma_ab<T, DP, kKC>(dv, pa, sdO, kLd);  // dV_w += (P o keep)^T dO
    mma_ab<T, DP, kKC>(dk, da, sQ, kLd);   // dK_w += dS^T Q

    bwd_store_ds<T, kKC, kLdDS>(sdS + warp * 16 * kLdDS, da, g, t);
    __syncthreads();
    {
      constexpr int kCols = DP / (kWarps / kKC);
      const int mq = (warp % kKC) * 16, c0 = (warp / kKC) * kCols;
      const uint32_t a_addr = smem_u32(sdS + at_row(lane) * kLdDS + mq + at_col(lane));
      const uint32_t b_addr = smem_u32(sK + bt_row(lane) * kLd + c0 + bt_col(lane));
      const int64_t qrow = m0 + mq + g;  // within the sequence
      float* acc_rows = p.dq_acc + packed_off(sq.q0 + qrow, sq.h, p.H, p.D) + c0;
#pragma unroll 1
      for (int d0 = 0; d0 < kCols; d0 += 16) {
        float dq[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < kTileRows / 16; ++kk) {
          uint32_t a[4], bb[4];
          ldsm_x4_trans(a, a_addr + kk * 16 * kLdDS * 2);
          ldsm_x4_trans(bb, b_addr + (kk * 16 * kLd + d0) * 2);
          Mma<T>::run(dq[0], a, bb[0], bb[1]);
          Mma<T>::run(dq[1], a, bb[2], bb[3]);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int col = d0 + i * 8 + 2 * t;
          if (c0 + col < p.D) {
            if (qrow < sq.Lq) atomic_add2(acc_rows + col, dq[i][0], dq[i][1]);
            if (qrow + 8 < sq.Lq) atomic_add2(acc_rows + 8 * acc_pitch + col, dq[i][2], dq[i][3]);
          }
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();

  const int64_t kv_off = packed_off(sq.k0, sq.h, p.H, p.D);
  store_warp_rows<T, DP>(dk, p.scale, p.scale, sK + warp * 16 * kLd, static_cast<T*>(p.out2) + kv_off, n0 + warp * 16,
                         sq.Lk, p.D, p.H * p.D);
  store_warp_rows<T, DP>(dv, p.drop_scale, p.drop_scale, sV + warp * 16 * kLd, static_cast<T*>(p.out3) + kv_off,
                         n0 + warp * 16, sq.Lk, p.D, p.H * p.D);
#endif
}

// Backward, kernel 3: dq = dq_acc * scale in the input dtype (n = total_q * H * D elements, contiguous).
template <typename T>
__global__ void __launch_bounds__(kDqConvertThreads) attn_varlen_dq_convert_kernel(const float* acc, T* dq, int64_t n, float scale) {
  dq_convert(acc, dq, n, scale);
}

// ------------------------------------------------------------------------------------------
// Host side

Slice packed_slice(const Tensor& t) { return Slice{t.const_data_ptr(), 0, t.stride(1), t.stride(0)}; }

template <typename T, int DP>
void run_varlen_forward(const VarlenParams& p, int64_t BH, cudaStream_t stream) {
  launch(attn_varlen_fwd_kernel<T, DP>, Layout<DP>::kFwdLaunch, p.num_tiles * BH, p, stream);
}

template <typename T, int DP>
void run_varlen_backward(const VarlenParams& p, int64_t BH, int64_t max_q, int64_t max_k, Tensor& dq,
                         cudaStream_t stream) {
  VarlenParams pq = p;
  pq.num_tiles = tiles_of(max_q);
  launch(attn_varlen_bwd_delta_kernel<T, DP>, Layout<DP>::kDeltaLaunch, pq.num_tiles * BH, pq, stream);
  VarlenParams pk = p;
  pk.num_tiles = tiles_of(max_k);
  launch(attn_varlen_bwd_kernel<T, DP>, Layout<DP>::kBwdLaunch, pk.num_tiles * BH, pk, stream);
  launch_dq_convert(attn_varlen_dq_convert_kernel<T>, p.dq_acc, static_cast<T*>(dq.data_ptr()), p.total_q * p.H * p.D,
                    p.scale, stream);
}

void check_packed(const Tensor& t, const char* name, const Tensor& q) {
  MMFAST_ATTN_CHECK(t.dim() == 3, name, "expected a 3-D tensor (total, H, D), got ", t.dim(), " dims");
  MMFAST_ATTN_CHECK(t.is_cuda() && t.get_device_index() == q.get_device_index(), name,
                    "expected a tensor on q's CUDA device ", static_cast<int>(q.get_device_index()));
  MMFAST_ATTN_CHECK(t.scalar_type() == q.scalar_type(), name, "expected q's dtype");
}

void check_cu_seqlens(const Tensor& cu, const char* name, const Tensor& q, int64_t batch_plus_one) {
  MMFAST_ATTN_CHECK(cu.scalar_type() == ScalarType::Int, name, "expected an int32 tensor");
  MMFAST_ATTN_CHECK(cu.dim() == 1 && cu.size(0) >= 1 && (batch_plus_one < 0 || cu.size(0) == batch_plus_one), name,
                    "expected shape (batch + 1,)", batch_plus_one < 0 ? "" : " like cu_seqlens_q");
  MMFAST_ATTN_CHECK(cu.is_cuda() && cu.get_device_index() == q.get_device_index(), name,
                    "expected a tensor on q's CUDA device");
}

// Checks the arguments; returns the batch size.
int64_t check_varlen_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q, const Tensor& cu_k,
                            int64_t max_q, int64_t max_k, const std::optional<Tensor>& seed, double dropout_p) {
  MMFAST_ATTN_CHECK(q.is_cuda(), "q", "expected a CUDA tensor");
  MMFAST_ATTN_CHECK(q.scalar_type() == ScalarType::Half || q.scalar_type() == ScalarType::BFloat16, "q",
                    "the CUDA varlen attention kernel supports float16 and bfloat16");
  check_packed(q, "q", q);
  check_packed(k, "k", q);
  check_packed(v, "v", q);
  MMFAST_ATTN_CHECK(k.size(1) == q.size(1) && k.size(2) == q.size(2), "k", "expected shape (total_k, ", q.size(1),
                    ", ", q.size(2), ") matching q, got (", k.size(0), ", ", k.size(1), ", ", k.size(2), ")");
  for (int d = 0; d < 3; ++d)
    MMFAST_ATTN_CHECK(v.size(d) == k.size(d), "v", "expected the shape of k, got size ", v.size(d), " at dim ", d);
  const int64_t D = q.size(2);
  MMFAST_ATTN_CHECK(D % 8 == 0 && D >= 8 && D <= 128, "q", "head dim must be a multiple of 8 in [8, 128], got ", D);
  check_cu_seqlens(cu_q, "cu_seqlens_q", q, -1);
  check_cu_seqlens(cu_k, "cu_seqlens_k", q, cu_q.size(0));
  MMFAST_ATTN_CHECK(max_q >= 0 && max_q <= 2147483647LL, "max_seqlen_q", "expected a length in [0, 2^31), got ", max_q);
  MMFAST_ATTN_CHECK(max_k >= 0 && max_k <= 2147483647LL, "max_seqlen_k", "expected a length in [0, 2^31), got ", max_k);
  const int64_t batch = cu_q.size(0) - 1;
  MMFAST_ATTN_CHECK(batch * q.size(1) <= 4294967295LL, "cu_seqlens_q",
                    "batch * H must fit the dropout counter (32 bits)");
  check_dropout_args(seed, dropout_p, q);
  return batch;
}

VarlenParams varlen_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q, const Tensor& cu_k,
                           const std::optional<Tensor>& seed, bool causal, double scale, double dropout_p) {
  VarlenParams p{};
  p.q = packed_slice(q);
  p.k = packed_slice(k);
  p.v = packed_slice(v);
  p.cu_q = static_cast<const int32_t*>(cu_q.const_data_ptr());
  p.cu_k = static_cast<const int32_t*>(cu_k.const_data_ptr());
  p.H = q.size(1);
  p.D = q.size(2);
  p.total_q = q.size(0);
  set_common_params(p, seed, causal, scale, dropout_p);
  return p;
}

std::tuple<Tensor, Tensor> attention_varlen_forward_cuda(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q,
                                                         Tensor cu_seqlens_k, int64_t max_seqlen_q,
                                                         int64_t max_seqlen_k, std::optional<Tensor> seed, bool causal,
                                                         double scale, double dropout_p) {
  const int64_t batch = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed,
                                            dropout_p);
  const torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  const int64_t total_q = q.size(0), H = q.size(1), D = q.size(2);
  Tensor out = torch::stable::empty({total_q, H, D}, q.scalar_type(), std::nullopt, q.device());
  Tensor lse = torch::stable::empty({H, total_q}, ScalarType::Float, std::nullopt, q.device());
  if (out.numel() == 0) return {out, lse};
  if (batch == 0 || max_seqlen_q == 0) {  // no sequence owns a row: cannot happen with valid cu_seqlens
    torch::stable::zero_(out);
    torch::stable::zero_(lse);
    return {out, lse};
  }
  const Tensor qs = streamable(q), ks = streamable(k), vs = streamable(v);
  VarlenParams p = varlen_params(qs, ks, vs, cu_seqlens_q, cu_seqlens_k, seed, causal, scale, dropout_p);
  p.out = out.data_ptr();
  p.lse = static_cast<float*>(lse.data_ptr());
  p.num_tiles = tiles_of(max_seqlen_q);
  dispatch_instantiation<VarlenPaddedDims>(q.scalar_type(), D, [&](auto elem, auto DP) {
    run_varlen_forward<typename decltype(elem)::type, decltype(DP)::value>(p, batch * H, current_stream(q));
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_varlen_backward_cuda(
    Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, std::optional<Tensor> seed, bool causal, double scale,
    double dropout_p) {
  const int64_t batch = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed,
                                            dropout_p);
  check_packed(grad_out, "grad_out", q);
  check_packed(out, "out", q);
  for (int d = 0; d < 3; ++d) {
    MMFAST_ATTN_CHECK(grad_out.size(d) == q.size(d), "grad_out", "expected q's shape");
    MMFAST_ATTN_CHECK(out.size(d) == q.size(d), "out", "expected q's shape");
  }
  const int64_t total_q = q.size(0), total_k = k.size(0), H = q.size(1), D = q.size(2);
  MMFAST_ATTN_CHECK(lse.scalar_type() == ScalarType::Float && lse.numel() == H * total_q && lse.is_cuda() &&
                        lse.get_device_index() == q.get_device_index(),
                    "lse", "expected float32 (H, total_q) on q's device, from this face's attention_varlen_forward");
  const torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  Tensor dq = torch::stable::empty({total_q, H, D}, q.scalar_type(), std::nullopt, q.device());
  Tensor dk = torch::stable::empty({total_k, H, D}, q.scalar_type(), std::nullopt, q.device());
  Tensor dv = torch::stable::empty({total_k, H, D}, q.scalar_type(), std::nullopt, q.device());
  if (batch == 0 || H == 0 || total_q == 0 || total_k == 0 || max_seqlen_q == 0 || max_seqlen_k == 0) {
    torch::stable::zero_(dq);
    torch::stable::zero_(dk);
    torch::stable::zero_(dv);
    return {dq, dk, dv};
  }
  const Tensor qs = streamable(q), ks = streamable(k), vs = streamable(v);
  const Tensor os = streamable(out), dos = streamable(grad_out);
  Tensor lse_c = torch::stable::contiguous(lse);
  Tensor delta = torch::stable::empty({H, total_q}, ScalarType::Float, std::nullopt, q.device());
  Tensor dq_acc = torch::stable::empty({total_q, H, D}, ScalarType::Float, std::nullopt, q.device());
  torch::stable::zero_(dq_acc);
  VarlenParams p = varlen_params(qs, ks, vs, cu_seqlens_q, cu_seqlens_k, seed, causal, scale, dropout_p);
  p.o = packed_slice(os);
  p.dout = packed_slice(dos);
  p.lse = static_cast<float*>(lse_c.data_ptr());
  p.delta = static_cast<float*>(delta.data_ptr());
  p.dq_acc = static_cast<float*>(dq_acc.data_ptr());
  p.out = dq.data_ptr();
  p.out2 = dk.data_ptr();
  p.out3 = dv.data_ptr();
  dispatch_instantiation<VarlenPaddedDims>(q.scalar_type(), D, [&](auto elem, auto DP) {
    run_varlen_backward<typename decltype(elem)::type, decltype(DP)::value>(p, batch * H, max_seqlen_q, max_seqlen_k,
                                                                            dq, current_stream(q));
  });
  return {dq, dk, dv};
}

// The launch configuration of every instantiation, for `mmfast kernels-report` (its --check fails on
// an undeclared CUDA kernel).
[[maybe_unused]] const bool kVarlenLaunchConfigsDeclared = [] {
  ElementTypes::for_each([](auto elem) {
    using T = typename decltype(elem)::type;
    VarlenPaddedDims::for_each([](auto dp) {
      constexpr int DP = decltype(dp)::value;
      const auto name = [](const char* kernel) { return kernel_name(kernel, {arg_name<T>(), std::to_string(DP)}); };
      declare_launch("attention_varlen", name("attn_varlen_fwd_kernel"), Layout<DP>::kFwdLaunch);
      declare_launch("attention_varlen", name("attn_varlen_bwd_delta_kernel"), Layout<DP>::kDeltaLaunch);
      declare_launch("attention_varlen", name("attn_varlen_bwd_kernel"), Layout<DP>::kBwdLaunch);
    });
    declare_launch("attention_varlen", kernel_name("attn_varlen_dq_convert_kernel", {arg_name<T>()}),
                   kDqConvertLaunch);
  });
  return true;
}();

}  // namespace
}  // namespace mmfast

STABLE_TORCH_LIBRARY_IMPL(mmfast_C, CUDA, m) {
  m.impl("attention_varlen_forward", TORCH_BOX(&mmfast::attention_varlen_forward_cuda));
  m.impl("attention_varlen_backward", TORCH_BOX(&mmfast::attention_varlen_backward_cuda));
}
