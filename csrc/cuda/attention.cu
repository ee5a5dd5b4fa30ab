// Fused attention, CUDA face, in the FlashAttention-2 design (sm_80+ instructions, built for sm_90):
// mma.sync m16n8k16 tensor-core tiles through inline PTX (fp16/bf16 in, fp32 accumulate), operands
// fetched from shared memory with ldmatrix, tiles streamed with cp.async in two stages, the scores
// S, probabilities P and the output accumulator kept in registers, online softmax in base 2.
// Same semantics as the other faces (mmfast/ops/attention.py): key padding mask bool (B, Lk) True =
// attend, causal aligned bottom-right (query i sees keys j <= i + Lk - Lq), a row without visible keys
// gives out 0, lse 0 and zero gradients, dropout by the Philox contract of csrc/philox.h (the indexing
// in attention_dropout.h), any Lq/Lk >= 1, D a multiple of 8 up to 128 (zero-padded to DP in
// {32, 64, 80, 96, 128} in shared memory), int64 offsets, current stream, no host sync.
//
// Forward: a block = 4 warps owns 64 query rows (16 per warp) and streams 64-key tiles of K and V
// (cp.async, the next tile loads while this one is used); causal tiles past the block's last visible
// key are not visited; the key mask of a tile is read once, as a 64-bit ballot in shared memory.
//
// Backward: delta = rowsum(dO * O) first (a small kernel), then one kernel per 64-key tile (4 warps x
// 16 keys) that sweeps the query tiles seeing it and does FA2's five matmuls per tile: S^T = K Q^T,
// dV += P^T dO, dP^T = V dO^T, dK += dS^T Q, dQ += dS K. Computing the transposes directly makes P^T
// and dS^T register operands of the dV/dK matmuls; only dS^T goes through shared memory (for dQ).
// dQ is accumulated with fp32 atomics into a (B, H, Lq, D) buffer and converted by a last kernel:
// the alternative (a separate dQ pass per query tile) recomputes S and dP, 7 matmuls instead of 5;
// the price is a non-deterministic summation order of dQ in the last bits.
//
// Inputs whose rows cannot be copied with 16-byte cp.async (non-unit stride along D, strides that
// are not multiples of 8 elements, a base not 16-byte aligned) are copied contiguous on the host.

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
#include <type_traits>

#include "attention_dropout.h"
#include "attention_fa2.h"
#include "launch_config.h"

namespace mmfast {
namespace {

// The padded head dims the kernels are instantiated for (attention_fa2.h's Layout, load_tile and
// dQ split serve D = 80 as well).
using PaddedDims = HeadDims<32, 64, 80, 96, 128>;

// ------------------------------------------------------------------------------------------
// Parameters

struct Params {
  Slice q, k, v, o, dout;
  const bool* mask;  // (B, Lk) or null
  int64_t smb, smn;
  const int64_t* seed;  // dropout only: device scalar (read in the kernel: no host sync)
  uint32_t drop_threshold;
  float drop_scale;  // 1 / (1 - p), 1 without dropout
  bool dropout;
  void* out;     // forward: out (B, H, Lq, D); backward: dq
  void* out2;    // backward: dk
  void* out3;    // backward: dv
  float* lse;    // (B, H, Lq), base 2
  float* delta;  // (B, H, Lq)
  float* dq_acc;  // (B, H, Lq, D) fp32, zeroed
  int64_t H, Lq, Lk, D;
  int64_t num_tiles;
  float qk_scale;  // scale * log2(e)
  float scale;
  bool causal;
};

__device__ __forceinline__ int64_t slice_off(const Slice& s, int64_t b, int64_t h) { return b * s.sb + h * s.sh; }

// Valid keys n0 .. n0+63 of batch b (inside Lk and attended) as a 64-bit mask in shared memory,
// written by warps 0 and 1 (one ballot each).
__device__ __forceinline__ void load_key_bits(uint32_t* dst, const Params& p, int64_t b, int64_t n0) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (warp < 2) {
    const int64_t j = n0 + warp * 32 + lane;
    const bool ok = j < p.Lk && (p.mask == nullptr || p.mask[b * p.smb + j * p.smn]);
    const uint32_t bits = __ballot_sync(0xffffffffu, ok);
    if (lane == 0) dst[warp] = bits;
  }
}

// ------------------------------------------------------------------------------------------
// Forward

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) attn_fwd_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Ly = Layout<DP>;
  constexpr int kLd = Ly::kLd;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sKV = sQ + Ly::kTile;  // stage s: K at sKV + 2s * kTile, V at sKV + (2s + 1) * kTile
  uint32_t* sBits = reinterpret_cast<uint32_t*>(smem + 5 * Ly::kTile * 2);  // stage s: words 2s, 2s+1

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  // causal blocks with more keys first (reversed tile order): fewer stragglers in the last wave
  const int64_t tile = p.num_tiles - 1 - static_cast<int64_t>(blockIdx.x) % p.num_tiles;
  const int64_t bh = static_cast<int64_t>(blockIdx.x) / p.num_tiles;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t m0 = tile * kTileRows;

  // keys [0, n_end) can be visible to some row of this block
  int64_t n_end = p.Lk;
  if (p.causal) {
    const int64_t last_row = (m0 + kTileRows < p.Lq ? m0 + kTileRows : p.Lq) - 1;
    const int64_t e = last_row + 1 + p.Lk - p.Lq;
    n_end = e < 0 ? 0 : (e < p.Lk ? e : p.Lk);
  }
  const int n_tiles = static_cast<int>((n_end + kTileRows - 1) / kTileRows);
  const int64_t k_base = slice_off(p.k, b, h), v_base = slice_off(p.v, b, h);
  auto load_kv = [&](int stage, int64_t n0) {
    load_tile<T, DP>(sKV + 2 * stage * Ly::kTile, p.k, k_base, n0, p.Lk, p.D);
    load_tile<T, DP>(sKV + (2 * stage + 1) * Ly::kTile, p.v, v_base, n0, p.Lk, p.D);
    load_key_bits(sBits + 2 * stage, p, b, n0);
  };

  load_tile<T, DP>(sQ, p.q, slice_off(p.q, b, h), m0, p.Lq, p.D);
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.seed) : 0;
  // this lane's two query rows (g, g + 8 of the warp's 16)
  const int64_t row0 = m0 + warp * 16 + g;
  // key j is causally visible to row i iff j - n0 <= i + Lk - Lq - n0 (the tile-relative limit below)
  const int64_t diag0 = row0 + p.Lk - p.Lq;

  float o[DP / 8][4];
#pragma unroll
  for (int i = 0; i < DP / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  for (int it = 0; it < n_tiles; ++it) {
    const int stage = it & 1;
    const int64_t n0 = static_cast<int64_t>(it) * kTileRows;
    if (it + 1 < n_tiles) load_kv(stage ^ 1, n0 + kTileRows);
    cp_async_commit();
    cp_async_wait<1>();  // this thread's copies of tile `it` (and Q) landed ...
    __syncthreads();     // ... and everyone's

    const T* sK = sKV + 2 * stage * Ly::kTile;
    const T* sV = sK + Ly::kTile;
    float s[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    mma_abt<T, 8, DP / 16>(s, sQ + warp * 16 * kLd, sK, kLd);

    const uint64_t kbits = static_cast<uint64_t>(sBits[2 * stage]) | (static_cast<uint64_t>(sBits[2 * stage + 1]) << 32);
    const int64_t lim[2] = {p.causal ? diag0 - n0 : 64, p.causal ? diag0 + 8 - n0 : 64};
    fwd_softmax_step<DP>(s, kbits, lim, p.qk_scale, t, m_run, l_run, o);
    if (p.dropout) fwd_dropout(s, seed, bh, row0, n0, t, p.drop_threshold);
    uint32_t pa[4][4];
    acc_to_a<T, 8>(pa, s);
    mma_ab<T, DP, 4>(o, pa, sV, kLd);
    __syncthreads();  // everyone is done with this stage before the next iteration refills it
  }
  cp_async_wait<0>();  // no tile visited: Q's copies may still be in flight into the staging rows
  __syncthreads();

  // epilogue: normalise; this warp's own 16 rows of sQ stage the output
  float inv[2];
  fwd_finish(l_run, m_run, p.drop_scale, row0, p.Lq, t, p.lse + bh * p.Lq, inv);
  store_warp_rows<T, DP>(o, inv[0], inv[1], sQ + warp * 16 * kLd, static_cast<T*>(p.out) + bh * p.Lq * p.D,
                         m0 + warp * 16, p.Lq, p.D);
#endif
}

// ------------------------------------------------------------------------------------------
// Backward, kernel 1: delta = rowsum(dO * O), computed as the diagonal of O dO^T with the very mma
// sequence that gives dP^T = V dO^T in kernel 2, so that a row with one visible key (O = that key's
// V row exactly) gets dP - delta = 0 exactly, as the float64 reference does.

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) attn_bwd_delta_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Ly = Layout<DP>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sO = reinterpret_cast<T*>(smem);
  T* sdO = sO + Ly::kTile;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) % p.num_tiles, bh = static_cast<int64_t>(blockIdx.x) / p.num_tiles;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t m0 = tile * kTileRows;
  load_tile<T, DP>(sO, p.o, slice_off(p.o, b, h), m0, p.Lq, p.D);
  load_tile<T, DP>(sdO, p.dout, slice_off(p.dout, b, h), m0, p.Lq, p.D);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  bwd_delta_tile<T, DP>(sO, sdO, p.delta + bh * p.Lq, m0, p.Lq, warp, g, t);
#endif
}

// Backward, kernel 2: a block owns 64 keys (warp w: keys 16w .. 16w+15), sweeps the query tiles of
// kBM rows that see them, accumulates dK, dV in registers and adds dQ into the fp32 buffer with atomics.

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) attn_bwd_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Ly = Layout<DP>;
  constexpr int kLd = Ly::kLd;
  constexpr int kBM = Ly::kBM;
  constexpr int kNT = kBM / 8;   // n-tiles (8 queries each) of S^T, dP^T
  constexpr int kKC = kBM / 16;  // k-chunks (16 queries each) of dV, dK
  constexpr int kLdDS = Ly::kLdDS;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + Ly::kTile;
  T* sQdO = sV + Ly::kTile;  // stage s: Q at sQdO + 2s * kQTile, dO at sQdO + (2s + 1) * kQTile
  T* sdS = sQdO + 4 * Ly::kQTile;  // dS^T: 64 keys x kBM queries
  float* sLD = reinterpret_cast<float*>(sdS + kTileRows * kLdDS);  // stage s: lse, delta at 2 kBM s, + kBM

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) % p.num_tiles, bh = static_cast<int64_t>(blockIdx.x) / p.num_tiles;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t n0 = tile * kTileRows;

  // query tiles [m_begin, Lq): the first query that sees key n0 is n0 - (Lk - Lq) under causal
  int64_t m_begin = 0;
  if (p.causal) {
    const int64_t first = n0 - (p.Lk - p.Lq);
    m_begin = first <= 0 ? 0 : (first / kBM) * kBM;
  }
  const int m_tiles = static_cast<int>((p.Lq - m_begin + kBM - 1) / kBM);  // >= 1: first <= Lq - 1 as n0 < Lk
  const int64_t q_base = slice_off(p.q, b, h), do_base = slice_off(p.dout, b, h);
  auto load_q = [&](int stage, int64_t m) {
    load_tile<T, DP, kBM>(sQdO + 2 * stage * Ly::kQTile, p.q, q_base, m, p.Lq, p.D);
    load_tile<T, DP, kBM>(sQdO + (2 * stage + 1) * Ly::kQTile, p.dout, do_base, m, p.Lq, p.D);
    if (threadIdx.x < 2 * kBM) {  // threads [0, kBM): lse, [kBM, 2 kBM): delta
      const int r = threadIdx.x % kBM;
      const bool ok = m + r < p.Lq;
      const float* src = (threadIdx.x < kBM ? p.lse : p.delta) + bh * p.Lq + (ok ? m + r : 0);
      cp_async4(sLD + 2 * kBM * stage + threadIdx.x, src, ok);
    }
  };

  load_tile<T, DP>(sK, p.k, slice_off(p.k, b, h), n0, p.Lk, p.D);
  load_tile<T, DP>(sV, p.v, slice_off(p.v, b, h), n0, p.Lk, p.D);
  load_q(0, m_begin);
  cp_async_commit();

  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.seed) : 0;
  // this lane's two keys (rows g, g + 8 of the warp's 16), checked once
  int64_t key[2];
  bool key_ok[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    key[r] = n0 + warp * 16 + g + 8 * r;
    key_ok[r] = key[r] < p.Lk && (p.mask == nullptr || p.mask[b * p.smb + key[r] * p.smn]);
  }

  float dk[DP / 8][4], dv[DP / 8][4];
#pragma unroll
  for (int i = 0; i < DP / 8; ++i) {
    dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.f;
    dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
  }

  for (int it = 0; it < m_tiles; ++it) {
    const int stage = it & 1;
    const int64_t m0 = m_begin + static_cast<int64_t>(it) * kBM;
    if (it + 1 < m_tiles) load_q(stage ^ 1, m0 + kBM);
    cp_async_commit();
    cp_async_wait<1>();  // this thread's copies of tile `it` (and K, V) landed ...
    __syncthreads();     // ... and everyone's
    const T* sQ = sQdO + 2 * stage * Ly::kQTile;
    const T* sdO = sQ + Ly::kQTile;
    const float* sLse = sLD + 2 * kBM * stage;
    const float* sDelta = sLse + kBM;

    // P^T = exp2(S^T * scale * log2e - lse), S^T = K_w Q^T (16 keys x kBM queries)
    float pt[kNT][4];
#pragma unroll
    for (int i = 0; i < kNT; ++i) pt[i][0] = pt[i][1] = pt[i][2] = pt[i][3] = 0.f;
    mma_abt<T, kNT, DP / 16, 1>(pt, sK + warp * 16 * kLd, sQ, kLd);
    bwd_probs<kBM>(pt, sLse, p.qk_scale, p.causal, key, key_ok, p.Lq, p.Lk, m0, t);
    // dropout: the kept elements of P^T, computed before dP^T is live
    const uint32_t keep = p.dropout ? bwd_keep_bits<kNT>(seed, bh, m0, key, t, p.drop_threshold) : 0xffffffffu;
    // dS^T = P^T o (dP^T o Z - delta), dP^T = V_w dO^T, Z = keep / (1 - p) (1 without dropout)
    float ds[kNT][4];
#pragma unroll
    for (int i = 0; i < kNT; ++i) ds[i][0] = ds[i][1] = ds[i][2] = ds[i][3] = 0.f;
    mma_abt<T, kNT, DP / 16, 1>(ds, sV + warp * 16 * kLd, sdO, kLd);
    bwd_ds<kNT>(ds, pt, keep, p.drop_scale, sDelta, t);  // from here on pt = P o keep
    // 16-bit operands from here on
    uint32_t pa[kKC][4], da[kKC][4];
    acc_to_a<T, kNT>(pa, pt);
    acc_to_a<T, kNT>(da, ds);
    mma_ab<T, DP, kKC>(dv, pa, sdO, kLd);  // dV_w += (P o keep)^T dO
    mma_ab<T, DP, kKC>(dk, da, sQ, kLd);   // dK_w += dS^T Q

    // dS^T -> shared (this warp's 16 key rows), then dQ (kBM queries x DP) += dS K over the 64 keys
    bwd_store_ds<T, kKC, kLdDS>(sdS + warp * 16 * kLdDS, da, g, t);
    __syncthreads();
    {
      // warp w: queries 16 (w % kKC) .. +15 of the tile, columns [w / kKC * kCols, + kCols) of dQ
      // (whole 16-column steps: at DP 80 the first warp of a query group takes 48, the second 32).
      // A = dS (queries x keys) = sdS^T (.trans), B = K [keys][D] (.trans)
      constexpr int kCols = (DP / (kWarps / kKC) + 15) / 16 * 16;
      const int mq = (warp % kKC) * 16, c0 = (warp / kKC) * kCols;
      const uint32_t a_addr = smem_u32(sdS + at_row(lane) * kLdDS + mq + at_col(lane));
      const uint32_t b_addr = smem_u32(sK + bt_row(lane) * kLd + c0 + bt_col(lane));
      const int64_t qrow = m0 + mq + g;
      float* acc_rows = p.dq_acc + (bh * p.Lq + qrow) * p.D + c0;
      constexpr bool kEvenSplit = kCols * (kWarps / kKC) == DP;  // all but DP 80: no run-time bound
#pragma unroll 1
      for (int d0 = 0; d0 < kCols && (kEvenSplit || c0 + d0 < DP); d0 += 16) {  // 16 columns of dQ at a time: 8 registers
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
            if (qrow < p.Lq) atomic_add2(acc_rows + col, dq[i][0], dq[i][1]);
            if (qrow + 8 < p.Lq) atomic_add2(acc_rows + 8 * p.D + col, dq[i][2], dq[i][3]);
          }
        }
      }
    }
    __syncthreads();  // stage buffers and dS^T are free for the next iteration
  }
  cp_async_wait<0>();
  __syncthreads();

  // epilogue: dK * scale and dV * (1 / (1 - p)), staged in this warp's own rows of sK / sV
  const int64_t bh_rows = bh * p.Lk * p.D;
  store_warp_rows<T, DP>(dk, p.scale, p.scale, sK + warp * 16 * kLd, static_cast<T*>(p.out2) + bh_rows,
                         n0 + warp * 16, p.Lk, p.D);
  store_warp_rows<T, DP>(dv, p.drop_scale, p.drop_scale, sV + warp * 16 * kLd, static_cast<T*>(p.out3) + bh_rows,
                         n0 + warp * 16, p.Lk, p.D);
#endif
}

// Backward, kernel 3: dq = dq_acc * scale in the input dtype (n = B * H * Lq * D elements, contiguous).
template <typename T>
__global__ void __launch_bounds__(kDqConvertThreads) attn_bwd_dq_convert_kernel(const float* acc, T* dq, int64_t n, float scale) {
  dq_convert(acc, dq, n, scale);
}

// ------------------------------------------------------------------------------------------
// Host side (LibTorch stable ABI: torch/csrc/stable + the AOTI shim, nothing newer than torch 2.11;
// check_cuda, current_stream, launch: attention_fa2.h)

Slice make_slice(const Tensor& t) { return Slice{t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

template <typename T, int DP>
void run_forward(const Params& p, int64_t BH, cudaStream_t stream) {
  launch(attn_fwd_kernel<T, DP>, Layout<DP>::kFwdLaunch, p.num_tiles * BH, p, stream);
}

template <typename T, int DP>
void run_backward(const Params& p, int64_t BH, Tensor& dq, cudaStream_t stream) {
  Params pq = p;
  pq.num_tiles = ceil_div(p.Lq, kTileRows);
  launch(attn_bwd_delta_kernel<T, DP>, Layout<DP>::kDeltaLaunch, pq.num_tiles * BH, pq, stream);
  Params pk = p;
  pk.num_tiles = ceil_div(p.Lk, kTileRows);
  launch(attn_bwd_kernel<T, DP>, Layout<DP>::kBwdLaunch, pk.num_tiles * BH, pk, stream);
  launch_dq_convert(attn_bwd_dq_convert_kernel<T>, p.dq_acc, static_cast<T*>(dq.data_ptr()), BH * p.Lq * p.D, p.scale,
                    stream);
}

void check_4d_cuda(const Tensor& t, const char* name, const Tensor& q) {
  MMFAST_ATTN_CHECK(t.dim() == 4, name, "expected a 4-D tensor (B, H, L, D), got ", t.dim(), " dims");
  MMFAST_ATTN_CHECK(t.is_cuda() && t.get_device_index() == q.get_device_index(), name,
                    "expected a tensor on q's CUDA device ", static_cast<int>(q.get_device_index()));
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
                  const std::optional<Tensor>& seed, double dropout_p) {
  MMFAST_ATTN_CHECK(q.is_cuda(), "q", "expected a CUDA tensor");
  check_4d_cuda(q, "q", q);
  check_4d_cuda(k, "k", q);
  check_4d_cuda(v, "v", q);
  MMFAST_ATTN_CHECK(q.scalar_type() == ScalarType::Half || q.scalar_type() == ScalarType::BFloat16, "q",
                    "the CUDA attention kernel supports float16 and bfloat16 (float32 runs on the Triton face)");
  MMFAST_ATTN_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "k",
                    "k and v must have q's dtype");
  MMFAST_ATTN_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), "k",
                    "expected shape (B, H, Lk, D) = (", q.size(0), ", ", q.size(1), ", Lk, ", q.size(3),
                    ") matching q, got (", k.size(0), ", ", k.size(1), ", ", k.size(2), ", ", k.size(3), ")");
  for (int d = 0; d < 4; ++d)
    MMFAST_ATTN_CHECK(v.size(d) == k.size(d), "v", "expected the shape of k, got size ", v.size(d), " at dim ", d,
                      " (k has ", k.size(d), ")");
  const int64_t D = q.size(3);
  MMFAST_ATTN_CHECK(D % 8 == 0 && D >= 8 && D <= 128, "q", "head dim must be a multiple of 8 in [8, 128], got ", D);
  MMFAST_ATTN_CHECK(q.size(2) <= 2147483647LL && k.size(2) <= 2147483647LL, "q", "sequence too long");
  MMFAST_ATTN_CHECK(q.size(0) * q.size(1) <= 4294967295LL, "q", "B * H must fit the dropout counter (32 bits)");
  if (mask.has_value()) {
    MMFAST_ATTN_CHECK(mask->scalar_type() == ScalarType::Bool, "key_padding_mask", "expected a bool tensor");
    MMFAST_ATTN_CHECK(mask->dim() == 2 && mask->size(0) == q.size(0) && mask->size(1) == k.size(2),
                      "key_padding_mask", "expected shape (B, Lk) = (", q.size(0), ", ", k.size(2), ")");
    MMFAST_ATTN_CHECK(mask->is_cuda() && mask->get_device_index() == q.get_device_index(), "key_padding_mask",
                      "expected a tensor on q's CUDA device");
  }
  check_dropout_args(seed, dropout_p, q);
}

Params base_params(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
                   const std::optional<Tensor>& seed, bool causal, double scale, double dropout_p) {
  Params p{};
  p.q = make_slice(q);
  p.k = make_slice(k);
  p.v = make_slice(v);
  p.mask = mask.has_value() ? static_cast<const bool*>(mask->const_data_ptr()) : nullptr;
  p.smb = mask.has_value() ? mask->stride(0) : 0;
  p.smn = mask.has_value() ? mask->stride(1) : 0;
  p.H = q.size(1);
  p.Lq = q.size(2);
  p.Lk = k.size(2);
  p.D = q.size(3);
  set_common_params(p, seed, causal, scale, dropout_p);
  return p;
}

std::tuple<Tensor, Tensor> attention_forward_cuda(Tensor q, Tensor k, Tensor v, std::optional<Tensor> key_padding_mask,
                                                  std::optional<Tensor> seed, bool causal, double scale,
                                                  double dropout_p) {
  check_inputs(q, k, v, key_padding_mask, seed, dropout_p);
  const torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  Tensor out = torch::stable::empty({B, H, Lq, D}, q.scalar_type(), std::nullopt, q.device());
  Tensor lse = torch::stable::empty({B, H, Lq}, ScalarType::Float, std::nullopt, q.device());
  if (out.numel() == 0) return {out, lse};
  if (k.size(2) == 0) {  // no key at all: every row is fully masked
    torch::stable::zero_(out);
    torch::stable::zero_(lse);
    return {out, lse};
  }
  const Tensor qs = streamable(q), ks = streamable(k), vs = streamable(v);
  Params p = base_params(qs, ks, vs, key_padding_mask, seed, causal, scale, dropout_p);
  p.out = out.data_ptr();
  p.lse = static_cast<float*>(lse.data_ptr());
  p.num_tiles = ceil_div(Lq, kTileRows);
  dispatch_instantiation<PaddedDims>(q.scalar_type(), D, [&](auto elem, auto DP) {
    run_forward<typename decltype(elem)::type, decltype(DP)::value>(p, B * H, current_stream(q));
  });
  return {out, lse};
}

void check_like_q(const Tensor& t, const char* name, const Tensor& q) {
  check_4d_cuda(t, name, q);
  bool same = t.scalar_type() == q.scalar_type();
  for (int d = 0; d < 4; ++d) same = same && t.size(d) == q.size(d);
  MMFAST_ATTN_CHECK(same, name, "expected q's shape (", q.size(0), ", ", q.size(1), ", ", q.size(2), ", ",
                    q.size(3), ") and dtype");
}

std::tuple<Tensor, Tensor, Tensor> attention_backward_cuda(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,
                                                           Tensor lse, std::optional<Tensor> key_padding_mask,
                                                           std::optional<Tensor> seed, bool causal, double scale,
                                                           double dropout_p) {
  check_inputs(q, k, v, key_padding_mask, seed, dropout_p);
  check_like_q(grad_out, "grad_out", q);
  check_like_q(out, "out", q);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  MMFAST_ATTN_CHECK(lse.scalar_type() == ScalarType::Float && lse.numel() == B * H * Lq && lse.is_cuda() &&
                        lse.get_device_index() == q.get_device_index(),
                    "lse", "expected float32 (B, H, Lq) on q's device, from this face's attention_forward");
  const torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  Tensor dq = torch::stable::empty({B, H, Lq, D}, q.scalar_type(), std::nullopt, q.device());
  Tensor dk = torch::stable::empty({B, H, Lk, D}, q.scalar_type(), std::nullopt, q.device());
  Tensor dv = torch::stable::empty({B, H, Lk, D}, q.scalar_type(), std::nullopt, q.device());
  if (B * H == 0 || Lq == 0 || Lk == 0) {
    torch::stable::zero_(dq);
    torch::stable::zero_(dk);
    torch::stable::zero_(dv);
    return {dq, dk, dv};
  }
  const Tensor qs = streamable(q), ks = streamable(k), vs = streamable(v);
  const Tensor os = streamable(out), dos = streamable(grad_out);
  Tensor lse_c = torch::stable::contiguous(lse);
  Tensor delta = torch::stable::empty({B, H, Lq}, ScalarType::Float, std::nullopt, q.device());
  Tensor dq_acc = torch::stable::empty({B, H, Lq, D}, ScalarType::Float, std::nullopt, q.device());
  torch::stable::zero_(dq_acc);
  Params p = base_params(qs, ks, vs, key_padding_mask, seed, causal, scale, dropout_p);
  p.o = make_slice(os);
  p.dout = make_slice(dos);
  p.lse = static_cast<float*>(lse_c.data_ptr());
  p.delta = static_cast<float*>(delta.data_ptr());
  p.dq_acc = static_cast<float*>(dq_acc.data_ptr());
  p.out = dq.data_ptr();
  p.out2 = dk.data_ptr();
  p.out3 = dv.data_ptr();
  dispatch_instantiation<PaddedDims>(q.scalar_type(), D, [&](auto elem, auto DP) {
    run_backward<typename decltype(elem)::type, decltype(DP)::value>(p, B * H, dq, current_stream(q));
  });
  return {dq, dk, dv};
}

// Every instantiation's launch configuration, for kernels-report (csrc/cuda/launch_config.h).
[[maybe_unused]] const bool kLaunchConfigsDeclared = [] {
  ElementTypes::for_each([](auto elem) {
    using T = typename decltype(elem)::type;
    PaddedDims::for_each([](auto dp) {
      constexpr int DP = decltype(dp)::value;
      const auto name = [](const char* kernel) { return kernel_name(kernel, {arg_name<T>(), std::to_string(DP)}); };
      declare_launch("attention", name("attn_fwd_kernel"), Layout<DP>::kFwdLaunch);
      declare_launch("attention", name("attn_bwd_delta_kernel"), Layout<DP>::kDeltaLaunch);
      declare_launch("attention", name("attn_bwd_kernel"), Layout<DP>::kBwdLaunch);
    });
    declare_launch("attention", kernel_name("attn_bwd_dq_convert_kernel", {arg_name<T>()}), kDqConvertLaunch);
  });
  return true;
}();

}  // namespace
}  // namespace mmfast

STABLE_TORCH_LIBRARY_IMPL(mmfast_C, CUDA, m) {
  m.impl("attention_forward", TORCH_BOX(&mmfast::attention_forward_cuda));
  m.impl("attention_backward", TORCH_BOX(&mmfast::attention_backward_cuda));
}
