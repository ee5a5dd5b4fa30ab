// Fused attention, CUDA face: flash-attention forward (online softmax, saves the base-2
// log-sum-exp) and a recomputing backward (a dK/dV kernel per key tile, a dQ kernel per query
// tile, no atomics), with tensor-core MMA through nvcuda::wmma 16x16x16 fp16/bf16 fragments and
// float32 accumulation (sm_80+). Same semantics as the Triton face (mmfast/triton/attention.py):
// key padding mask (bool (B, Lk), True = attend), causal aligned bottom-right, a query row with
// no visible key gives 0 output and 0 gradients, any Lq/Lk >= 1, D a multiple of 8 up to 128
// (zero-padded to DP in {32, 64, 96, 128} in shared memory), any input strides, int64 offsets,
// current stream, no host sync. No dropout here: mmfast routes dropout_p > 0 to Triton.
//
// Work split: a block = 4 warps = 64 rows of the tile it owns; each warp owns 16 rows. Per key
// (or query) tile of 64 the warp computes its 16x64 scores with wmma into shared memory, lanes
// 2r and 2r+1 do the element-wise work of row r (32 columns each), and the warp multiplies the
// 16x64 probabilities by the 64xDP tile with wmma. The forward's output accumulator lives in
// shared memory (float), because rescaling by the online-softmax factor needs the row of each
// element, which wmma's register layout does not expose.
//
// Every score product is computed as A = (q or dO rows) times B = (k or v rows)^T in all kernels,
// including delta = rowsum(dO * O) (the diagonal of dO O^T), so a row with one visible key gets
// dP - delta = 0 exactly, as the float64 reference does.
// The AOTI shim declares aoti_torch_get_current_cuda_stream only under USE_CUDA.
#ifndef USE_CUDA
#define USE_CUDA
#endif
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace mmfast {
namespace {

constexpr int kRows = 64;     // rows of the tile a block owns (queries or keys)
constexpr int kCols = 64;     // rows of the tile it streams through per iteration
constexpr int kWarps = 4;     // 16 rows each
constexpr int kThreads = 32 * kWarps;
constexpr int kLdS = kCols + 4;  // float row stride of score tiles (multiple of 4 for wmma)
constexpr int kLdP = kCols + 8;  // 16-bit row stride of probability tiles (multiple of 8)

template <int DP>
struct Layout {
  static constexpr int kLdH = DP + 8;  // 16-bit row stride of q/k/v/dO tiles (skews banks)
  static constexpr int kLdO = DP + 4;  // float row stride of the output accumulator
  static constexpr int kTile = kRows * kLdH * 2;  // bytes of one 64 x DP 16-bit tile
  static constexpr int kScore = kRows * kLdS * 4;
  static constexpr int kProb = kRows * kLdP * 2;
  static constexpr int kAcc = kRows * kLdO * 4;
  // All sizes are multiples of 32 bytes, so consecutive regions keep wmma's 256-bit alignment.
  static constexpr int kFwdBytes = 3 * kTile + kScore + kProb + kAcc;
  static constexpr int kBwdBytes = 4 * kTile + 2 * kScore + 2 * kProb + 2 * kRows * 4;
};

template <typename T>
struct Cvt;
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_f(float x) { return __float2half_rn(x); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
};

// A (batch, head) slice of a (B, H, L, D) tensor.
struct Slice {
  const void* ptr;
  int64_t sb, sh, sl, sd;
  bool vec;  // 16-byte loads are legal: unit stride along D, 8-element aligned rows and base
};

struct Params {
  Slice q, k, v, o, dout;
  const bool* mask;
  int64_t smb, smn;
  void* out;    // forward: out (B, H, Lq, D) contiguous; backward: dq
  void* out2;   // backward: dk
  void* out3;   // backward: dv
  float* lse;   // (B, H, Lq)
  float* delta; // (B, H, Lq)
  int64_t H, Lq, Lk, D, num_tiles;
  float qk_scale;  // scale * log2(e)
  float scale;
  bool causal;
};

// Loads rows [row0, row0 + kRows) of a slice into a kRows x DP shared tile (row stride ld),
// zero-filling rows past L and columns past D.
template <typename T, int DP>
__device__ __forceinline__ void load_tile(T* dst, int ld, const Slice& s, int64_t bh_off, int64_t row0, int64_t L,
                                          int64_t D) {
  const T* src = static_cast<const T*>(s.ptr) + bh_off;
  if (s.vec) {
    constexpr int kVec = 8;  // 8 x 16-bit = 16 bytes; D is a multiple of 8
    for (int idx = threadIdx.x; idx < kRows * (DP / kVec); idx += kThreads) {
      const int r = idx / (DP / kVec), c = (idx % (DP / kVec)) * kVec;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (row0 + r < L && c < D) val = *reinterpret_cast<const uint4*>(src + (row0 + r) * s.sl + c);
      *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
    }
  } else {
    for (int idx = threadIdx.x; idx < kRows * DP; idx += kThreads) {
      const int r = idx / DP, c = idx % DP;
      T val = Cvt<T>::from_f(0.f);
      if (row0 + r < L && c < D) val = src[(row0 + r) * s.sl + c * s.sd];
      dst[r * ld + c] = val;
    }
  }
}

__device__ __forceinline__ int64_t slice_off(const Slice& s, int64_t b, int64_t h) { return b * s.sb + h * s.sh; }

__device__ __forceinline__ bool key_ok(const Params& p, int64_t b, int64_t j) {
  return j < p.Lk && (p.mask == nullptr || p.mask[b * p.smb + j * p.smn]);
}

// 16 x 64 scores of this warp: C (ld kLdS, float) = A (16 x DP rows of a, ld) times B^T, where B
// is 64 x DP rows of b; written column-major when transpose (C^T, for the dK/dV kernel).
template <typename T, int DP>
__device__ __forceinline__ void warp_scores(float* c, const T* a, const T* b, int ld) {
  using namespace nvcuda;
#pragma unroll
  for (int nt = 0; nt < kCols / 16; ++nt) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
#pragma unroll
    for (int kt = 0; kt < DP / 16; ++kt) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
      wmma::load_matrix_sync(fa, a + kt * 16, ld);
      wmma::load_matrix_sync(fb, b + nt * 16 * ld + kt * 16, ld);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c + nt * 16, acc, kLdS, wmma::mem_row_major);
  }
}

// ------------------------------------------------------------------------------------------
// Forward

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using Ly = Layout<DP>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = reinterpret_cast<T*>(smem + Ly::kTile);
  T* Vs = reinterpret_cast<T*>(smem + 2 * Ly::kTile);
  float* Ss = reinterpret_cast<float*>(smem + 3 * Ly::kTile);
  T* Ps = reinterpret_cast<T*>(smem + 3 * Ly::kTile + Ly::kScore);
  float* Os = reinterpret_cast<float*>(smem + 3 * Ly::kTile + Ly::kScore + Ly::kProb);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t tile = blockIdx.x % p.num_tiles, bh = blockIdx.x / p.num_tiles;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t row0 = tile * kRows;
  const int rl = lane >> 1, half = lane & 1;  // this lane's row within the warp, column half
  const int rb = warp * 16 + rl;             // row within the block
  const int64_t row = row0 + rb;             // query index

  load_tile<T, DP>(Qs, Ly::kLdH, p.q, slice_off(p.q, b, h), row0, p.Lq, p.D);
  for (int i = threadIdx.x; i < kRows * Ly::kLdO; i += kThreads) Os[i] = 0.f;

  float m_i = -INFINITY, l_i = 0.f;
  int64_t hi = p.Lk;
  if (p.causal) {  // the last key any row of this tile sees: (last row) + Lk - Lq
    const int64_t last = row0 + kRows + p.Lk - p.Lq;
    hi = last < 0 ? 0 : (last < p.Lk ? last : p.Lk);
  }
  const int64_t k_off = slice_off(p.k, b, h), v_off = slice_off(p.v, b, h);
  for (int64_t n0 = 0; n0 < hi; n0 += kCols) {
    __syncthreads();  // everyone is done with the previous K/V tile (and Os is zeroed)
    load_tile<T, DP>(Ks, Ly::kLdH, p.k, k_off, n0, p.Lk, p.D);
    load_tile<T, DP>(Vs, Ly::kLdH, p.v, v_off, n0, p.Lk, p.D);
    __syncthreads();
    warp_scores<T, DP>(Ss + warp * 16 * kLdS, Qs + warp * 16 * Ly::kLdH, Ks, Ly::kLdH);
    __syncwarp();

    float* srow = Ss + rb * kLdS + half * 32;
    T* prow = Ps + rb * kLdP + half * 32;
    float mx = -INFINITY;
#pragma unroll 8
    for (int c = 0; c < 32; ++c) {
      const int64_t j = n0 + half * 32 + c;
      const bool ok = row < p.Lq && key_ok(p, b, j) && (!p.causal || j <= row + p.Lk - p.Lq);
      const float s = ok ? srow[c] * p.qk_scale : -INFINITY;
      srow[c] = s;
      mx = fmaxf(mx, s);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m_i, mx);
    const float m_safe = m_new == -INFINITY ? 0.f : m_new;  // no key seen yet: exp2(-inf) = 0
    float sum = 0.f;
#pragma unroll 8
    for (int c = 0; c < 32; ++c) {
      const float pv = exp2f(srow[c] - m_safe);
      prow[c] = Cvt<T>::from_f(pv);
      sum += pv;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    const float alpha = exp2f(m_i - m_safe);
    l_i = l_i * alpha + sum;
    m_i = m_new;
    float* orow = Os + rb * Ly::kLdO + half * (DP / 2);
    for (int c = 0; c < DP / 2; ++c) orow[c] *= alpha;
    __syncwarp();

#pragma unroll
    for (int dt = 0; dt < DP / 16; ++dt) {
      float* o_tile = Os + warp * 16 * Ly::kLdO + dt * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, o_tile, Ly::kLdO, wmma::mem_row_major);
#pragma unroll
      for (int kt = 0; kt < kCols / 16; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, Ps + warp * 16 * kLdP + kt * 16, kLdP);
        wmma::load_matrix_sync(fb, Vs + kt * 16 * Ly::kLdH + dt * 16, Ly::kLdH);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(o_tile, acc, Ly::kLdO, wmma::mem_row_major);
    }
    __syncwarp();
  }
  __syncthreads();  // Os zeroing by other threads is visible even when the loop did not run

  if (row < p.Lq) {
    const bool empty = l_i == 0.f;
    const float inv_l = empty ? 0.f : 1.f / l_i;
    T* out = static_cast<T*>(p.out) + (bh * p.Lq + row) * p.D;
    const float* orow = Os + rb * Ly::kLdO;
    for (int c = half; c < p.D; c += 2) out[c] = Cvt<T>::from_f(orow[c] * inv_l);
    if (half == 0) p.lse[bh * p.Lq + row] = empty ? 0.f : m_i + log2f(l_i);
  }
#endif
}

// ------------------------------------------------------------------------------------------
// Backward: delta = rowsum(dO * O) as the diagonal of dO O^T (see the header comment)

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) attn_bwd_delta_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using Ly = Layout<DP>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* dOs = reinterpret_cast<T*>(smem);
  T* Os = reinterpret_cast<T*>(smem + Ly::kTile);
  float* Cs = reinterpret_cast<float*>(smem + 2 * Ly::kTile);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t tile = blockIdx.x % p.num_tiles, bh = blockIdx.x / p.num_tiles;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t row0 = tile * kRows;
  load_tile<T, DP>(dOs, Ly::kLdH, p.dout, slice_off(p.dout, b, h), row0, p.Lq, p.D);
  load_tile<T, DP>(Os, Ly::kLdH, p.o, slice_off(p.o, b, h), row0, p.Lq, p.D);
  __syncthreads();
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
#pragma unroll
  for (int kt = 0; kt < DP / 16; ++kt) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
    wmma::load_matrix_sync(fa, dOs + warp * 16 * Ly::kLdH + kt * 16, Ly::kLdH);
    wmma::load_matrix_sync(fb, Os + warp * 16 * Ly::kLdH + kt * 16, Ly::kLdH);
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(Cs + warp * 16 * kLdS, acc, kLdS, wmma::mem_row_major);
  __syncwarp();
  const int64_t row = row0 + warp * 16 + lane;
  if (lane < 16 && row < p.Lq) p.delta[bh * p.Lq + row] = Cs[(warp * 16 + lane) * kLdS + lane];
#endif
}

// Writes a warp's 16 x DP accumulator (times mul) to rows [r0, r0 + 16) of a contiguous
// (L, D) slice, through a 16 x 16 float staging area of the warp (row stride kLdS).
template <typename T, int DP>
__device__ __forceinline__ void store_acc(
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&acc)[DP / 16], float* stage, T* dst,
    int64_t r0, int64_t L, int64_t D, float mul) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int dt = 0; dt < DP / 16; ++dt) {
    nvcuda::wmma::store_matrix_sync(stage, acc[dt], kLdS, nvcuda::wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int r = e / 16, c = dt * 16 + e % 16;
      if (r0 + r < L && c < D) dst[(r0 + r) * D + c] = Cvt<T>::from_f(stage[r * kLdS + e % 16] * mul);
    }
    __syncwarp();
  }
}

// dK, dV: a block owns 64 keys (warp w: keys 16w..16w+15) and sweeps the query tiles that see them.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using Ly = Layout<DP>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = reinterpret_cast<T*>(smem + Ly::kTile);
  T* Qs = reinterpret_cast<T*>(smem + 2 * Ly::kTile);
  T* dOs = reinterpret_cast<T*>(smem + 3 * Ly::kTile);
  float* STs = reinterpret_cast<float*>(smem + 4 * Ly::kTile);                // S^T: keys x queries
  float* dPTs = reinterpret_cast<float*>(smem + 4 * Ly::kTile + Ly::kScore);  // dP^T
  T* PTs = reinterpret_cast<T*>(smem + 4 * Ly::kTile + 2 * Ly::kScore);               // P^T
  T* dSTs = reinterpret_cast<T*>(smem + 4 * Ly::kTile + 2 * Ly::kScore + Ly::kProb);  // dS^T
  float* lse_s = reinterpret_cast<float*>(smem + 4 * Ly::kTile + 2 * Ly::kScore + 2 * Ly::kProb);
  float* delta_s = lse_s + kRows;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t tile = blockIdx.x % p.num_tiles, bh = blockIdx.x / p.num_tiles;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t n0 = tile * kRows;
  const int rl = lane >> 1, half = lane & 1;
  const int rb = warp * 16 + rl;
  const int64_t j = n0 + rb;  // this lane's key
  const bool kok = key_ok(p, b, j);

  load_tile<T, DP>(Ks, Ly::kLdH, p.k, slice_off(p.k, b, h), n0, p.Lk, p.D);
  load_tile<T, DP>(Vs, Ly::kLdH, p.v, slice_off(p.v, b, h), n0, p.Lk, p.D);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dk[DP / 16], dv[DP / 16];
#pragma unroll
  for (int dt = 0; dt < DP / 16; ++dt) {
    wmma::fill_fragment(dk[dt], 0.f);
    wmma::fill_fragment(dv[dt], 0.f);
  }
  int64_t lo = 0;
  if (p.causal) {  // the first query that sees key n0 is n0 - (Lk - Lq)
    lo = n0 - (p.Lk - p.Lq);
    lo = lo < 0 ? 0 : (lo / kCols) * kCols;
  }
  const int64_t q_off = slice_off(p.q, b, h), do_off = slice_off(p.dout, b, h);
  for (int64_t m0 = lo; m0 < p.Lq; m0 += kCols) {
    __syncthreads();
    load_tile<T, DP>(Qs, Ly::kLdH, p.q, q_off, m0, p.Lq, p.D);
    load_tile<T, DP>(dOs, Ly::kLdH, p.dout, do_off, m0, p.Lq, p.D);
    for (int i = threadIdx.x; i < kCols; i += kThreads) {
      const bool in = m0 + i < p.Lq;
      lse_s[i] = in ? p.lse[bh * p.Lq + m0 + i] : 0.f;
      delta_s[i] = in ? p.delta[bh * p.Lq + m0 + i] : 0.f;
    }
    __syncthreads();
    // S = Q K_w^T and dP = dO V_w^T (64 queries x 16 keys), stored transposed: keys x queries.
#pragma unroll
    for (int mt = 0; mt < kCols / 16; ++mt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s, dp;
      wmma::fill_fragment(s, 0.f);
      wmma::fill_fragment(dp, 0.f);
#pragma unroll
      for (int kt = 0; kt < DP / 16; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fa, Qs + mt * 16 * Ly::kLdH + kt * 16, Ly::kLdH);
        wmma::load_matrix_sync(fb, Ks + warp * 16 * Ly::kLdH + kt * 16, Ly::kLdH);
        wmma::mma_sync(s, fa, fb, s);
        wmma::load_matrix_sync(fa, dOs + mt * 16 * Ly::kLdH + kt * 16, Ly::kLdH);
        wmma::load_matrix_sync(fb, Vs + warp * 16 * Ly::kLdH + kt * 16, Ly::kLdH);
        wmma::mma_sync(dp, fa, fb, dp);
      }
      wmma::store_matrix_sync(STs + warp * 16 * kLdS + mt * 16, s, kLdS, wmma::mem_col_major);
      wmma::store_matrix_sync(dPTs + warp * 16 * kLdS + mt * 16, dp, kLdS, wmma::mem_col_major);
    }
    __syncwarp();
    {
      const float* srow = STs + rb * kLdS + half * 32;
      const float* dprow = dPTs + rb * kLdS + half * 32;
      T* prow = PTs + rb * kLdP + half * 32;
      T* dsrow = dSTs + rb * kLdP + half * 32;
#pragma unroll 8
      for (int c = 0; c < 32; ++c) {
        const int qi = half * 32 + c;
        const int64_t i = m0 + qi;
        const bool ok = kok && i < p.Lq && (!p.causal || j <= i + p.Lk - p.Lq);
        const float pv = ok ? exp2f(srow[c] * p.qk_scale - lse_s[qi]) : 0.f;
        prow[c] = Cvt<T>::from_f(pv);
        dsrow[c] = Cvt<T>::from_f(pv * (dprow[c] - delta_s[qi]));
      }
    }
    __syncwarp();
    // dV_w += P^T dO, dK_w += dS^T Q   (16 keys x 64 queries) x (64 queries x DP)
#pragma unroll
    for (int kt = 0; kt < kCols / 16; ++kt) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fp, fds;
      wmma::load_matrix_sync(fp, PTs + warp * 16 * kLdP + kt * 16, kLdP);
      wmma::load_matrix_sync(fds, dSTs + warp * 16 * kLdP + kt * 16, kLdP);
#pragma unroll
      for (int dt = 0; dt < DP / 16; ++dt) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, dOs + kt * 16 * Ly::kLdH + dt * 16, Ly::kLdH);
        wmma::mma_sync(dv[dt], fp, fb, dv[dt]);
        wmma::load_matrix_sync(fb, Qs + kt * 16 * Ly::kLdH + dt * 16, Ly::kLdH);
        wmma::mma_sync(dk[dt], fds, fb, dk[dt]);
      }
    }
  }
  const int64_t bh_rows = bh * p.Lk * p.D;
  float* stage = STs + warp * 16 * kLdS;
  __syncwarp();
  store_acc<T, DP>(dk, stage, static_cast<T*>(p.out2) + bh_rows, n0 + warp * 16, p.Lk, p.D, p.scale);
  store_acc<T, DP>(dv, stage, static_cast<T*>(p.out3) + bh_rows, n0 + warp * 16, p.Lk, p.D, 1.f);
#endif
}

// dQ: a block owns 64 queries (warp w: 16 of them) and sweeps the key tiles they see.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using Ly = Layout<DP>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* dOs = reinterpret_cast<T*>(smem + Ly::kTile);
  T* Ks = reinterpret_cast<T*>(smem + 2 * Ly::kTile);
  T* Vs = reinterpret_cast<T*>(smem + 3 * Ly::kTile);
  float* Ss = reinterpret_cast<float*>(smem + 4 * Ly::kTile);
  float* dPs = reinterpret_cast<float*>(smem + 4 * Ly::kTile + Ly::kScore);
  T* dSs = reinterpret_cast<T*>(smem + 4 * Ly::kTile + 2 * Ly::kScore);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t tile = blockIdx.x % p.num_tiles, bh = blockIdx.x / p.num_tiles;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t row0 = tile * kRows;
  const int rl = lane >> 1, half = lane & 1;
  const int rb = warp * 16 + rl;
  const int64_t row = row0 + rb;
  const float lse = row < p.Lq ? p.lse[bh * p.Lq + row] : 0.f;
  const float delta = row < p.Lq ? p.delta[bh * p.Lq + row] : 0.f;

  load_tile<T, DP>(Qs, Ly::kLdH, p.q, slice_off(p.q, b, h), row0, p.Lq, p.D);
  load_tile<T, DP>(dOs, Ly::kLdH, p.dout, slice_off(p.dout, b, h), row0, p.Lq, p.D);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dq[DP / 16];
#pragma unroll
  for (int dt = 0; dt < DP / 16; ++dt) wmma::fill_fragment(dq[dt], 0.f);

  int64_t hi = p.Lk;
  if (p.causal) {
    const int64_t last = row0 + kRows + p.Lk - p.Lq;
    hi = last < 0 ? 0 : (last < p.Lk ? last : p.Lk);
  }
  const int64_t k_off = slice_off(p.k, b, h), v_off = slice_off(p.v, b, h);
  for (int64_t n0 = 0; n0 < hi; n0 += kCols) {
    __syncthreads();
    load_tile<T, DP>(Ks, Ly::kLdH, p.k, k_off, n0, p.Lk, p.D);
    load_tile<T, DP>(Vs, Ly::kLdH, p.v, v_off, n0, p.Lk, p.D);
    __syncthreads();
    warp_scores<T, DP>(Ss + warp * 16 * kLdS, Qs + warp * 16 * Ly::kLdH, Ks, Ly::kLdH);
    warp_scores<T, DP>(dPs + warp * 16 * kLdS, dOs + warp * 16 * Ly::kLdH, Vs, Ly::kLdH);
    __syncwarp();
    const float* srow = Ss + rb * kLdS + half * 32;
    const float* dprow = dPs + rb * kLdS + half * 32;
    T* dsrow = dSs + rb * kLdP + half * 32;
#pragma unroll 8
    for (int c = 0; c < 32; ++c) {
      const int64_t jj = n0 + half * 32 + c;
      const bool ok = row < p.Lq && key_ok(p, b, jj) && (!p.causal || jj <= row + p.Lk - p.Lq);
      const float pv = ok ? exp2f(srow[c] * p.qk_scale - lse) : 0.f;
      dsrow[c] = Cvt<T>::from_f(pv * (dprow[c] - delta));
    }
    __syncwarp();
#pragma unroll
    for (int kt = 0; kt < kCols / 16; ++kt) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, dSs + warp * 16 * kLdP + kt * 16, kLdP);
#pragma unroll
      for (int dt = 0; dt < DP / 16; ++dt) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, Ks + kt * 16 * Ly::kLdH + dt * 16, Ly::kLdH);
        wmma::mma_sync(dq[dt], fa, fb, dq[dt]);
      }
    }
  }
  __syncwarp();
  store_acc<T, DP>(dq, Ss + warp * 16 * kLdS, static_cast<T*>(p.out) + bh * p.Lq * p.D, row0 + warp * 16, p.Lq,
                   p.D, p.scale);
#endif
}

// ------------------------------------------------------------------------------------------
// Host side (LibTorch stable ABI: torch/csrc/stable + the AOTI shim, nothing newer than torch 2.11)

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

#define MMFAST_ATTN_CHECK(cond, name, ...) STD_TORCH_CHECK(cond, "mmfast: argument '", name, "': ", __VA_ARGS__)

void check_cuda(cudaError_t err, const char* what) {
  STD_TORCH_CHECK(err == cudaSuccess, "mmfast: CUDA attention: ", what, ": ", cudaGetErrorString(err));
}

cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream) == AOTI_TORCH_SUCCESS,
                  "mmfast: CUDA attention: cannot get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

Slice make_slice(const Tensor& t) {
  const bool vec = t.stride(3) == 1 && t.stride(2) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(0) % 8 == 0 &&
                   reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  return Slice{t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3), vec};
}

int padded_dim(int64_t D) { return D <= 32 ? 32 : D <= 64 ? 64 : D <= 96 ? 96 : 128; }

template <typename Kernel>
void launch(Kernel kernel, int64_t blocks, int smem_bytes, const Params& p, cudaStream_t stream) {
  if (blocks == 0) return;
  MMFAST_ATTN_CHECK(blocks <= 2147483647LL, "q", "too many (batch, head, tile) blocks: ", blocks);
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes),
             "cudaFuncSetAttribute");
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem_bytes, stream>>>(p);
  check_cuda(cudaGetLastError(), "kernel launch");
}

template <typename T, int DP>
void run_forward(const Params& p, int64_t blocks, cudaStream_t stream) {
  launch(attn_fwd_kernel<T, DP>, blocks, Layout<DP>::kFwdBytes, p, stream);
}

template <typename T, int DP>
void run_backward(const Params& p, int64_t q_tiles, int64_t k_tiles, int64_t BH, cudaStream_t stream) {
  Params pq = p;
  pq.num_tiles = q_tiles;
  launch(attn_bwd_delta_kernel<T, DP>, q_tiles * BH, 2 * Layout<DP>::kTile + Layout<DP>::kScore, pq, stream);
  launch(attn_bwd_dq_kernel<T, DP>, q_tiles * BH, Layout<DP>::kBwdBytes, pq, stream);
  Params pk = p;
  pk.num_tiles = k_tiles;
  launch(attn_bwd_dkdv_kernel<T, DP>, k_tiles * BH, Layout<DP>::kBwdBytes, pk, stream);
}

// One switch over (dtype, padded head dim): 2 x 4 instantiations of each kernel.
#define MMFAST_ATTN_DISPATCH(DTYPE, D, FN, ...)                                          \
  do {                                                                                  \
    const bool is_half = (DTYPE) == ScalarType::Half;                                   \
    switch (padded_dim(D)) {                                                            \
      case 32: is_half ? FN<__half, 32>(__VA_ARGS__) : FN<__nv_bfloat16, 32>(__VA_ARGS__); break;   \
      case 64: is_half ? FN<__half, 64>(__VA_ARGS__) : FN<__nv_bfloat16, 64>(__VA_ARGS__); break;   \
      case 96: is_half ? FN<__half, 96>(__VA_ARGS__) : FN<__nv_bfloat16, 96>(__VA_ARGS__); break;   \
      default: is_half ? FN<__half, 128>(__VA_ARGS__) : FN<__nv_bfloat16, 128>(__VA_ARGS__); break; \
    }                                                                                   \
  } while (0)

void check_4d_cuda(const Tensor& t, const char* name, const Tensor& q) {
  MMFAST_ATTN_CHECK(t.dim() == 4, name, "expected a 4-D tensor (B, H, L, D), got ", t.dim(), " dims");
  MMFAST_ATTN_CHECK(t.is_cuda() && t.get_device_index() == q.get_device_index(), name,
                    "expected a tensor on q's CUDA device ", static_cast<int>(q.get_device_index()));
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
                  double dropout_p) {
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
  if (mask.has_value()) {
    MMFAST_ATTN_CHECK(mask->scalar_type() == ScalarType::Bool, "key_padding_mask", "expected a bool tensor");
    MMFAST_ATTN_CHECK(mask->dim() == 2 && mask->size(0) == q.size(0) && mask->size(1) == k.size(2),
                      "key_padding_mask", "expected shape (B, Lk) = (", q.size(0), ", ", k.size(2), ")");
    MMFAST_ATTN_CHECK(mask->is_cuda() && mask->get_device_index() == q.get_device_index(), "key_padding_mask",
                      "expected a tensor on q's CUDA device");
  }
  MMFAST_ATTN_CHECK(dropout_p == 0.0, "dropout_p",
                    "the CUDA attention kernel has no dropout yet (dropout runs on the Triton face), got ",
                    dropout_p);
}

Params base_params(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
                   bool causal, double scale) {
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
  p.scale = static_cast<float>(scale);
  p.qk_scale = static_cast<float>(scale * 1.4426950408889634);
  p.causal = causal;
  return p;
}

std::tuple<Tensor, Tensor> attention_forward_cuda(Tensor q, Tensor k, Tensor v, std::optional<Tensor> key_padding_mask,
                                                  std::optional<Tensor> seed, bool causal, double scale,
                                                  double dropout_p) {
  (void)seed;  // only read with dropout
  check_inputs(q, k, v, key_padding_mask, dropout_p);
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
  Params p = base_params(q, k, v, key_padding_mask, causal, scale);
  p.out = out.data_ptr();
  p.lse = static_cast<float*>(lse.data_ptr());
  p.num_tiles = (Lq + kRows - 1) / kRows;
  MMFAST_ATTN_DISPATCH(q.scalar_type(), D, run_forward, p, p.num_tiles * B * H, current_stream(q));
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
  (void)seed;
  check_inputs(q, k, v, key_padding_mask, dropout_p);
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
  Tensor lse_c = torch::stable::contiguous(lse);
  Tensor delta = torch::stable::empty({B, H, Lq}, ScalarType::Float, std::nullopt, q.device());
  Params p = base_params(q, k, v, key_padding_mask, causal, scale);
  p.o = make_slice(out);
  p.dout = make_slice(grad_out);
  p.lse = static_cast<float*>(lse_c.data_ptr());
  p.delta = static_cast<float*>(delta.data_ptr());
  p.out = dq.data_ptr();
  p.out2 = dk.data_ptr();
  p.out3 = dv.data_ptr();
  const int64_t q_tiles = (Lq + kRows - 1) / kRows, k_tiles = (Lk + kRows - 1) / kRows;
  MMFAST_ATTN_DISPATCH(q.scalar_type(), D, run_backward, p, q_tiles, k_tiles, B * H, current_stream(q));
  return {dq, dk, dv};
}

}  // namespace
}  // namespace mmfast

STABLE_TORCH_LIBRARY_IMPL(mmfast_C, CUDA, m) {
  m.impl("attention_forward", TORCH_BOX(&mmfast::attention_forward_cuda));
  m.impl("attention_backward", TORCH_BOX(&mmfast::attention_backward_cuda));
}
