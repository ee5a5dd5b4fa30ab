#pragma once
// The FlashAttention-2 machinery shared by the CUDA attention faces, csrc/cuda/attention.cu (padded
// (B, H, L, D) batches) and csrc/cuda/attention_varlen.cu (packed sequences with cu_seqlens): tile
// geometry, shared-memory layout and launch configurations, PTX wrappers (cp.async, ldmatrix,
// mma.sync m16n8k16), the warp-level matmuls on register fragments, tile loads and stores, the steps
// of the kernels' inner loops (masked online softmax, dropout, P^T, dS^T and its store for dQ, the
// delta tile, the forward epilogue, the dQ conversion) and the host-side helpers (launch, dispatch
// over head dims, streamable inputs, dropout arguments). Each .cu file keeps its own parameters,
// kernels (their indexing: batch-head slices or packed sequences) and shape checks. The dQ tile
// (dQ += dS K, fp32 atomics) stays written in each backward kernel: as a function here it cost
// attention.cu's attn_bwd_kernel registers (D 32: 204 -> 213, D 64: 251 -> 255; ptxas, sm_90).
//
// Everything is in an anonymous namespace: each .cu file that includes it gets its own copy.

// The AOTI shim declares aoti_torch_get_current_cuda_stream only under USE_CUDA.
#ifndef USE_CUDA
#define USE_CUDA
#endif
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "attention_dropout.h"
#include "attention_fragments.h"
#include "launch_config.h"

namespace mmfast {
namespace {

constexpr int kTileRows = 64;  // query rows of a forward block, keys of a backward block, rows of every tile
constexpr int kWarps = 4;      // 16 rows of the block's tile each
constexpr int kThreads = 32 * kWarps;
constexpr int kMinBlocksPerSm = 2;     // forward and backward: the residency they are built for
constexpr int kSmemPerSm = 233472;     // sm_90: 228 KB of shared memory per SM
constexpr int kSmemReserved = 1024;    // reserved by the driver per block

// A list of padded head dims DP a .cu file instantiates its kernels for (D is zero-padded up to the
// next one in shared memory), and the element types of every kernel.
template <int... DPs>
struct HeadDims {
  static constexpr int padded(int64_t D) {
    int dp = 0;
    ((dp = (dp == 0 && D <= DPs) ? DPs : dp), ...);
    return dp;
  }
  template <typename F>
  static void for_each(F&& f) {
    (f(std::integral_constant<int, DPs>{}), ...);
  }
};
using ElementTypes = TypeList<__half, __nv_bfloat16>;

template <int DP>
struct Layout {
  // 16-bit elements per shared row: +8 (16 bytes) makes the 8 row addresses of an ldmatrix land in 8
  // distinct 16-byte bank groups (row pitch = 16 mod 128 bytes), so operand loads are conflict-free.
  static constexpr int kLd = DP + 8;
  static constexpr int kTile = kTileRows * kLd;  // elements of one 64-row tile
  // forward: Q, two stages of (K, V), two stages of the 64-bit key mask
  static constexpr int kFwdBytes = 5 * kTile * 2 + 2 * 8;
  static_assert(kMinBlocksPerSm * (kFwdBytes + kSmemReserved) <= kSmemPerSm, "forward: 2 blocks per SM");

  // backward: query tiles of kBM rows. 32 for D > 64: with 64, the 16 x 64 fp32 tiles S^T and dP^T
  // beside the dK, dV accumulators (2 x DP / 2 registers) made ptxas spill at 255 registers.
  static constexpr int kBM = DP > 64 ? 32 : 64;
  static constexpr int kQTile = kBM * kLd;
  static constexpr int kLdDS = kBM + 8;  // dS^T tile (64 keys x kBM queries), conflict-free like kLd
  // K, V, two stages of (Q, dO), dS^T, two stages of (lse, delta)
  static constexpr int kBwdBytes = 2 * kTile * 2 + 4 * kQTile * 2 + kTileRows * kLdDS * 2 + 2 * 2 * kBM * 4;
  static_assert(kMinBlocksPerSm * (kBwdBytes + kSmemReserved) <= kSmemPerSm, "backward: 2 blocks per SM");
  // backward, kernel 1 (delta): one 64-row tile of O and one of dO
  static constexpr int kDeltaBytes = 2 * kTile * 2;

  // How each kernel is launched (and what kernels-report reads: csrc/cuda/launch_config.h)
  static constexpr LaunchConfig kFwdLaunch{kThreads, kFwdBytes, kMinBlocksPerSm};
  static constexpr LaunchConfig kDeltaLaunch{kThreads, kDeltaBytes, 0};
  static constexpr LaunchConfig kBwdLaunch{kThreads, kBwdBytes, kMinBlocksPerSm};
};

constexpr int kDqConvertThreads = 256;
constexpr LaunchConfig kDqConvertLaunch{kDqConvertThreads, 0, 0};

// ------------------------------------------------------------------------------------------
// PTX wrappers. "memory" clobbers keep the compiler from moving ordinary shared-memory accesses
// across them.

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronous; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 4 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// c (16x8 fp32) += a (16x16, row) * b (16x8, col); TY: the PTX type of a and b ("f16" or "bf16")
#define MMFAST_MMA_M16N8K16(TY, c, a, b0, b1)                                                           \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY                                      \
               ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                  \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                         \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

// The tensor-core step and the float -> 16-bit packing of the element type T (__half or __nv_bfloat16).
template <typename T>
struct Mma {
  static constexpr bool kHalf = std::is_same_v<T, __half>;

  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (kHalf)
      MMFAST_MMA_M16N8K16("f16", c, a, b0, b1);
    else
      MMFAST_MMA_M16N8K16("bf16", c, a, b0, b1);
  }
  // two floats -> one register of two 16-bit values, lo in the low half (the lower column)
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    if constexpr (kHalf) {
      const __half2 h = __floats2half2_rn(lo, hi);
      return *reinterpret_cast<const uint32_t*>(&h);
    } else {
      const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
      return *reinterpret_cast<const uint32_t*>(&h);
    }
  }
};

// ------------------------------------------------------------------------------------------
// Fragment addressing. An mma.sync m16n8k16 accumulator tile gives lane (g = lane / 4, t = lane % 4)
// the elements (row g, cols 2t, 2t+1) in c[0..1] and (row g+8, same cols) in c[2..3]. The lane
// addresses for ldmatrix (which 16-byte row each lane points at) are in attention_fragments.h.
using namespace fragment;

// A 16 x 8NT accumulator (NT n-tiles) rounded to 16 bits as the A fragments of NT / 2 k-chunks: tiles
// 2kk and 2kk+1 hold (rows g, g+8) x (cols 2t, 2t+1) of chunk kk's columns 0-7 and 8-15, which is
// exactly the A layout (a[0]: row g, k 2t; a[1]: row g+8; a[2]: row g, k 2t+8; a[3]: row g+8, k 2t+8).
template <typename T, int NT>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[NT / 2][4], const float (&c)[NT][4]) {
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    a[kk][0] = Mma<T>::pack(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = Mma<T>::pack(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = Mma<T>::pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = Mma<T>::pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

// C[16 x 8*NT] += A[16 x 16*KC] * B, A at a_addr (this warp's rows, row-major) and B at b_addr, a
// shared [N][K] array (keys or queries by rows, D along K), both with row pitch ld (elements).
// UNROLL: 1 in the backward, whose dK, dV accumulators need the registers ptxas spends on hoisting
// operand loads of later chunks when the loop is unrolled (only addresses depend on kk; the
// accumulation order is the same either way).
template <typename T, int NT, int KC, int UNROLL = KC>
__device__ __forceinline__ void mma_abt(float (&c)[NT][4], const T* a_tile, const T* b_tile, int ld) {
  const int lane = threadIdx.x & 31;
  const uint32_t a_addr = smem_u32(a_tile + a_row(lane) * ld + a_col(lane));
  const uint32_t b_addr = smem_u32(b_tile + bn_row(lane) * ld + bn_col(lane));
#pragma unroll UNROLL
  for (int kk = 0; kk < KC; ++kk) {
    uint32_t a[4];
    ldsm_x4(a, a_addr + kk * 32);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      ldsm_x4(b, b_addr + (np * 16 * ld + kk * 16) * 2);
      Mma<T>::run(c[2 * np], a, b[0], b[1]);
      Mma<T>::run(c[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// C[16 x DP] += A[16 x 16KC] * B[16KC x DP]: A in registers (acc_to_a), B a shared [K][N] array
// (rows of V, dO or Q, D along N) with row pitch ld.
template <typename T, int DP, int KC>
__device__ __forceinline__ void mma_ab(float (&c)[DP / 8][4], const uint32_t (&a)[KC][4], const T* b_tile, int ld) {
  const int lane = threadIdx.x & 31;
  const uint32_t b_addr = smem_u32(b_tile + bt_row(lane) * ld + bt_col(lane));
#pragma unroll
  for (int kk = 0; kk < KC; ++kk) {
#pragma unroll
    for (int dp = 0; dp < DP / 16; ++dp) {
      uint32_t b[4];
      ldsm_x4_trans(b, b_addr + (kk * 16 * ld + dp * 16) * 2);
      Mma<T>::run(c[2 * dp], a[kk], b[0], b[1]);
      Mma<T>::run(c[2 * dp + 1], a[kk], b[2], b[3]);
    }
  }
}

// dst[0] += a, dst[1] += b (dst 8-byte aligned): one vector atomic on sm_90.
__device__ __forceinline__ void atomic_add2(float* dst, float a, float b) {
#if __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(a, b));
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}

// ------------------------------------------------------------------------------------------
// Parameters and tile loads

// A (batch, head) slice of a (B, H, L, D) tensor whose rows cp.async can copy: unit stride along D,
// row/head/batch strides multiples of 8 elements, 16-byte aligned base (the host guarantees it).
struct Slice {
  const void* ptr;
  int64_t sb, sh, sl;
};

// Rows [row0, row0 + ROWS) of a slice -> a ROWS x DP shared tile (pitch kLd), asynchronously; rows past L
// and columns past D are zero-filled (so padded keys/queries contribute exact zeros to every product).
template <typename T, int DP, int ROWS = kTileRows>
__device__ __forceinline__ void load_tile(T* dst, const Slice& s, int64_t base, int64_t row0, int64_t L,
                                          int64_t D) {
  constexpr int kChunks = DP / 8;  // 16-byte chunks per row
  constexpr int kLd = Layout<DP>::kLd;
  constexpr int kTotal = ROWS * kChunks;  // not a multiple of kThreads at DP 80 with 32 rows
  const T* src = static_cast<const T*>(s.ptr) + base;
#pragma unroll
  for (int it = 0; it < (kTotal + kThreads - 1) / kThreads; ++it) {
    const int idx = it * kThreads + threadIdx.x;
    if (kTotal % kThreads != 0 && idx >= kTotal) break;
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    const bool ok = row0 + r < L && c < D;
    cp_async16(dst + r * kLd + c, ok ? src + (row0 + r) * s.sl + c : src, ok);
  }
}

// Stores a warp's 16 x DP accumulator (rows g: times mul_lo, rows g + 8: times mul_hi) as rows
// [row0, row0 + 16) of dst (row pitch `pitch`, rows past L skipped): staged in 16 rows of shared memory that
// only this warp uses (pitch kLd), then copied out in 16-byte chunks.
template <typename T, int DP>
__device__ __forceinline__ void store_warp_rows(const float (&acc)[DP / 8][4], float mul_lo, float mul_hi,
                                                T* stage, T* dst, int64_t row0, int64_t L, int64_t D,
                                                int64_t pitch) {
  constexpr int kLd = Layout<DP>::kLd;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < DP / 8; ++i) {
    *reinterpret_cast<uint32_t*>(stage + g * kLd + i * 8 + 2 * t) = Mma<T>::pack(acc[i][0] * mul_lo, acc[i][1] * mul_lo);
    *reinterpret_cast<uint32_t*>(stage + (g + 8) * kLd + i * 8 + 2 * t) =
        Mma<T>::pack(acc[i][2] * mul_hi, acc[i][3] * mul_hi);
  }
  __syncwarp();
  constexpr int kChunks = DP / 8;
#pragma unroll
  for (int idx = lane; idx < 16 * kChunks; idx += 32) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    if (row0 + r < L && c < D)
      *reinterpret_cast<uint4*>(dst + (row0 + r) * pitch + c) = *reinterpret_cast<const uint4*>(stage + r * kLd + c);
  }
}
// The same with row pitch D (dst rows contiguous).
template <typename T, int DP>
__device__ __forceinline__ void store_warp_rows(const float (&acc)[DP / 8][4], float mul_lo, float mul_hi,
                                                T* stage, T* dst, int64_t row0, int64_t L, int64_t D) {
  store_warp_rows<T, DP>(acc, mul_lo, mul_hi, stage, dst, row0, L, D, D);
}

// ------------------------------------------------------------------------------------------
// Steps of the kernels' inner loops, on a warp's register tiles (lane = 4g + t holds rows g, g + 8
// and columns 2t, 2t + 1 of each 8-column n-tile), shared by attention.cu and attention_varlen.cu

// Forward, one 64-key tile of scores s (16 x 64): keys whose bit of kbits is clear, or past row r's
// causal limit lim[r] (tile-relative), get -inf, the others s * qk_scale; then the online softmax:
// the running max m_run and (lane-partial) sum l_run are updated, o is rescaled, s becomes exp2(s - m).
template <int DP>
__device__ __forceinline__ void fwd_softmax_step(float (&s)[8][4], uint64_t kbits, const int64_t (&lim)[2],
                                                 float qk_scale, int t, float (&m_run)[2], float (&l_run)[2],
                                                 float (&o)[DP / 8][4]) {
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = nt * 8 + 2 * t + (e & 1);
      const bool ok = ((kbits >> col) & 1) && col <= lim[e >> 1];
      s[nt][e] = ok ? s[nt][e] * qk_scale : -INFINITY;
      mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
    }
  }
  float alpha[2], m_safe[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // the 4 lanes of a quad share the row
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float m_new = fmaxf(m_run[r], mx[r]);
    m_safe[r] = m_new == -INFINITY ? 0.f : m_new;  // no visible key yet: exp2(-inf - 0) = 0
    alpha[r] = exp2f(m_run[r] - m_safe[r]);
    m_run[r] = m_new;
  }
  float rowsum[2] = {0.f, 0.f};
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] = exp2f(s[nt][e] - m_safe[e >> 1]);
      rowsum[e >> 1] += s[nt][e];
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + rowsum[r];  // quad-reduced at the end
#pragma unroll
  for (int i = 0; i < DP / 8; ++i) {
    o[i][0] *= alpha[0];
    o[i][1] *= alpha[0];
    o[i][2] *= alpha[1];
    o[i][3] *= alpha[1];
  }
}

// Forward dropout of one tile's probabilities s: rows row0, row0 + 8 and key columns n0 + ... of
// batch-head bh (the Philox contract's counters), dropped ones set to 0 (l keeps the undropped sum:
// dropout scales the normalised probabilities).
__device__ __forceinline__ void fwd_dropout(float (&s)[8][4], uint64_t seed, int64_t bh, int64_t row0, int64_t n0,
                                            int t, uint32_t threshold) {
  // bits 2 (2 nt + r) + {0, 1}: columns 2t, 2t+1 of n-tile nt, row r kept. A rolled loop: one
  // Philox call live at a time
  uint32_t keep = 0;
#pragma unroll 1
  for (int idx = 0; idx < 16; ++idx) {
    const int64_t j = n0 + (idx >> 1) * 8 + 2 * t;
    keep |= dropout_keep_pair(seed, static_cast<uint32_t>(bh), static_cast<uint32_t>(row0 + 8 * (idx & 1)),
                              static_cast<uint32_t>(j), threshold)
            << (2 * idx);
  }
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {  // element e: row e >> 1, column 2t + (e & 1)
      if (!((keep >> (2 * (2 * nt + (e >> 1)) + (e & 1))) & 1u)) s[nt][e] = 0.f;
    }
  }
}

// Backward, P^T of one tile (16 keys x kBM queries from m0): exp2(S^T * qk_scale - lse) where visible
// (a query of the sequence; key_ok; causal: query >= key - (Lk - Lq)), else 0.
template <int kBM>
__device__ __forceinline__ void bwd_probs(float (&pt)[kBM / 8][4], const float* sLse, float qk_scale, bool causal,
                                          const int64_t (&key)[2], const bool (&key_ok)[2], int64_t Lq, int64_t Lk,
                                          int64_t m0, int t) {
  // visible iff col < q_end and col >= col_min[r] (32-bit tile-relative bounds: fewer registers)
  const int q_end = static_cast<int>(Lq - m0 < kBM ? Lq - m0 : kBM);
  int col_min[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // causal: i >= key - (Lk - Lq); a masked key: never
    const int64_t first = causal ? key[r] - (Lk - Lq) - m0 : 0;
    col_min[r] = !key_ok[r] ? kBM : first < 0 ? 0 : first > kBM ? kBM : static_cast<int>(first);
  }
#pragma unroll
  for (int nt = 0; nt < kBM / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = nt * 8 + 2 * t + (e & 1);
      const bool ok = col < q_end && col >= col_min[e >> 1];
      pt[nt][e] = ok ? exp2f(pt[nt][e] * qk_scale - sLse[col]) : 0.f;
    }
  }
}

// Backward dropout: bit 4 nt + e set = element (nt, e) of P^T kept (queries m0 + col, keys key[r] of
// batch-head bh). A rolled loop: one Philox call in registers at a time.
template <int kNT>
__device__ __forceinline__ uint32_t bwd_keep_bits(uint64_t seed, int64_t bh, int64_t m0, const int64_t (&key)[2], int t,
                                                  uint32_t threshold) {
  uint32_t keep = 0;
#pragma unroll 1
  for (int idx = 0; idx < 4 * kNT; ++idx) {
    const int col = (idx >> 2) * 8 + 2 * t + (idx & 1);
    const int64_t j = (idx & 2) ? key[1] : key[0];
    keep |= static_cast<uint32_t>(dropout_keep(seed, static_cast<uint32_t>(bh), static_cast<uint32_t>(m0 + col),
                                               static_cast<uint32_t>(j), threshold))
            << idx;
  }
  return keep;
}

// dS^T = P^T o (dP^T o Z - delta) in ds (which holds dP^T), Z = keep / (1 - p) (1 without dropout);
// then pt = P^T o keep (1 / (1 - p) goes into dV at the end).
template <int kNT>
__device__ __forceinline__ void bwd_ds(float (&ds)[kNT][4], float (&pt)[kNT][4], uint32_t keep, float drop_scale,
                                       const float* sDelta, int t) {
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const bool kept = (keep >> (4 * nt + e)) & 1u;
      ds[nt][e] = pt[nt][e] * ((kept ? ds[nt][e] * drop_scale : 0.f) - sDelta[nt * 8 + 2 * t + (e & 1)]);
      if (!kept) pt[nt][e] = 0.f;
    }
  }
}

// Backward: this warp's rows of dS^T (16 keys x kBM queries, held as the A fragments da of
// dK += dS^T Q) -> shared memory (row pitch kLdDS), for the dQ matmul over the block's 64 keys.
template <typename T, int kKC, int kLdDS>
__device__ __forceinline__ void bwd_store_ds(T* ds_rows, const uint32_t (&da)[kKC][4], int g, int t) {
#pragma unroll
  for (int kk = 0; kk < kKC; ++kk) {  // da[kk][hh]: row g + 8 (hh & 1), columns 16 kk + 8 (hh >> 1) + 2t
#pragma unroll
    for (int hh = 0; hh < 4; ++hh)
      *reinterpret_cast<uint32_t*>(ds_rows + (g + 8 * (hh & 1)) * kLdDS + kk * 16 + 8 * (hh >> 1) + 2 * t) =
          da[kk][hh];
  }
}

// Backward, the last step: dq = acc * scale in the input dtype (n elements, contiguous), grid-stride.
template <typename T>
__device__ __forceinline__ void dq_convert(const float* acc, T* dq, int64_t n, float scale) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if constexpr (Mma<T>::kHalf)
      dq[i] = __float2half_rn(acc[i] * scale);
    else
      dq[i] = __float2bfloat16_rn(acc[i] * scale);
  }
}

// Forward epilogue: the quad-reduced sums l of this lane's rows row0, row0 + 8 give the output
// factors inv (drop_scale / l; 0 for a row without visible keys) and, by lane t = 0, the base-2 lse of
// rows inside Lq (lse_rows[i]; 0 without visible keys).
__device__ __forceinline__ void fwd_finish(const float (&l_run)[2], const float (&m_run)[2], float drop_scale,
                                           int64_t row0, int64_t Lq, int t, float* lse_rows, float (&inv)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = l == 0.f ? 0.f : drop_scale / l;
    const int64_t i = row0 + 8 * r;
    if (t == 0 && i < Lq) lse_rows[i] = l == 0.f ? 0.f : m_run[r] + log2f(l);
  }
}

// Backward: delta = rowsum(dO * O) of the 64 rows from m0 (shared tiles sO, sdO) as the diagonal of
// O dO^T, computed with the very mma sequence that gives dP^T = V dO^T, so that a row with one visible
// key (O = that key's V row exactly) gets dP - delta = 0 exactly, as the float64 reference does;
// stored as delta_rows[i] for rows i inside Lq.
template <typename T, int DP>
__device__ __forceinline__ void bwd_delta_tile(const T* sO, const T* sdO, float* delta_rows, int64_t m0, int64_t Lq,
                                               int warp, int g, int t) {
  constexpr int kLd = Layout<DP>::kLd;
  float c[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  mma_abt<T, 2, DP / 16, 1>(c, sO + warp * 16 * kLd, sdO + warp * 16 * kLd, kLd);
  // (g, g) sits in n-tile 0 at column g = 2t + (g & 1); (g + 8, g + 8) in n-tile 1, same column
  if (t == (g >> 1)) {
    const int64_t i = m0 + warp * 16 + g;
    const bool odd = g & 1;  // selects, not c[0][g & 1]: a run-time index would move c to local memory
    if (i < Lq) delta_rows[i] = odd ? c[0][1] : c[0][0];
    if (i + 8 < Lq) delta_rows[i + 8] = odd ? c[1][3] : c[1][2];
  }
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

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename Kernel, typename Params>
void launch(Kernel kernel, const LaunchConfig& cfg, int64_t blocks, const Params& p, cudaStream_t stream) {
  const int smem_bytes = cfg.dynamic_smem_bytes;
  if (blocks == 0) return;
  MMFAST_ATTN_CHECK(blocks <= 2147483647LL, "q", "too many (batch, head, tile) blocks: ", blocks);
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes),
             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  // the largest shared-memory carveout, so that two blocks of the backward fit on an SM
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                  static_cast<int>(cudaSharedmemCarveoutMaxShared)),
             "cudaFuncSetAttribute(PreferredSharedMemoryCarveout)");
  kernel<<<static_cast<unsigned>(blocks), cfg.threads, smem_bytes, stream>>>(p);
  check_cuda(cudaGetLastError(), "kernel launch");
}

// Launches a dQ conversion kernel (kernel(acc, dq, n, scale), dq_convert's body) over n elements.
template <typename T, typename Kernel>
void launch_dq_convert(Kernel kernel, const float* acc, T* dq, int64_t n, float scale, cudaStream_t stream) {
  if (n == 0) return;
  const int64_t per_block = kDqConvertLaunch.threads;
  const int64_t blocks = ceil_div(n, per_block) < 65536 ? ceil_div(n, per_block) : 65536;
  kernel<<<static_cast<unsigned>(blocks), kDqConvertLaunch.threads, kDqConvertLaunch.dynamic_smem_bytes, stream>>>(
      acc, dq, n, scale);
  check_cuda(cudaGetLastError(), "kernel launch");
}

// Rows the kernels can stream with 16-byte cp.async (load_tile): unit stride along the last dim (D),
// every other stride a multiple of 8 elements, a 16-byte aligned base.
bool cp_async_ok(const Tensor& t) {
  bool ok = t.stride(t.dim() - 1) == 1 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && t.stride(d) % 8 == 0;
  return ok;
}

// t itself when the kernels can stream its rows with cp.async, else a contiguous copy.
Tensor streamable(const Tensor& t) {
  if (cp_async_ok(t)) return t;
  std::vector<int64_t> sizes;
  for (int64_t d = 0; d < t.dim(); ++d) sizes.push_back(t.size(d));
  Tensor c = torch::stable::empty(sizes, t.scalar_type(), std::nullopt, t.device());
  torch::stable::copy_(c, t);
  return c;
}

// dropout_p in [0, 1); with dropout, seed an int64 scalar tensor on q's device.
void check_dropout_args(const std::optional<Tensor>& seed, double dropout_p, const Tensor& q) {
  MMFAST_ATTN_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p", "expected a probability in [0, 1), got ",
                    dropout_p);
  if (dropout_p > 0.0) {
    MMFAST_ATTN_CHECK(seed.has_value(), "seed", "required when dropout_p > 0");
    MMFAST_ATTN_CHECK(seed->scalar_type() == ScalarType::Long && seed->numel() == 1, "seed",
                      "expected an int64 tensor of one element");
    MMFAST_ATTN_CHECK(seed->is_cuda() && seed->get_device_index() == q.get_device_index(), "seed",
                      "expected a tensor on q's CUDA device");
  }
}

// The fields every kernel parameter struct P shares: dropout (seed, threshold, 1 / (1 - p)), the
// score scale (and times log2(e): the kernels' softmax is in base 2) and causal.
template <typename P>
void set_common_params(P& p, const std::optional<Tensor>& seed, bool causal, double scale, double dropout_p) {
  p.dropout = dropout_p > 0.0;
  p.seed = p.dropout ? static_cast<const int64_t*>(seed->const_data_ptr()) : nullptr;
  p.drop_threshold = p.dropout ? dropout_threshold(dropout_p) : 0u;
  p.drop_scale = p.dropout ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.f;
  p.scale = static_cast<float>(scale);
  p.qk_scale = static_cast<float>(scale * 1.4426950408889634);
  p.causal = causal;
}

// Calls f(Elem<T>{}, std::integral_constant<int, DP>{}) for the instantiation serving (dtype, D):
// the element types x the padded head dims Dims (a HeadDims) of each kernel.
template <typename Dims, typename F>
void dispatch_instantiation(ScalarType dtype, int64_t D, F&& f) {
  const int dp = Dims::padded(D);
  ElementTypes::for_each([&](auto elem) {
    if ((dtype == ScalarType::Half) != std::is_same_v<typename decltype(elem)::type, __half>) return;
    Dims::for_each([&](auto DP) {
      if (decltype(DP)::value == dp) f(elem, DP);
    });
  });
}

}  // namespace
}  // namespace mmfast
