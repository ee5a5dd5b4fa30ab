// Fused attention, CPU face (schema: csrc/attention.cpp; contract: mmfast/ops/attention.py).
//
// Flash-style: nothing of size Lq x Lk is stored. The forward keeps a few rows of scores at a time and
// saves the log-sum-exp (base 2) per query row; the backward rebuilds each row's probabilities from
// it, p_j = exp2(s_j - lse_i), and regenerates the dropout mask from the seed (csrc/philox.h, the
// same mask as the Triton and CUDA faces).
//
// Work split: the forward runs (batch x head x block of query rows) tasks in parallel, blocks only as
// small as needed to give every thread work (each task repacks its head's keys and values, which at
// 32-row blocks cost a third of the forward); the backward runs one task per (batch, head), which owns
// its dk / dv rows (no atomics, no reduction pass). Each task first packs its head's keys and values
// into float32 (float64 for float64 inputs) scratch, keys transposed (D x Lk), so that scores are D
// broadcast-FMAs over contiguous key columns, kRows query rows at a time: vector loads only, no
// horizontal sums. The loops are written for the compiler's
// vectoriser and compiled three times (AVX-512, AVX2+FMA, baseline x86-64); the CPU picks one at
// run time, so the binary needs no -march flag.
//
// Semantics: key_padding_mask bool (B, Lk), True = attend; causal aligned bottom-right (query i sees
// keys j <= i + Lk - Lq); a row without any visible key gives output 0, lse 0 and zero gradients.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "philox.h"

namespace mmfast {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

#define MMFAST_ATTN_CHECK(cond, name, ...) \
  STD_TORCH_CHECK(cond, "mmfast.attention (cpu face): argument '", name, "': ", __VA_ARGS__)

constexpr double kLog2e = 1.4426950408889634;
constexpr int64_t kMinQueryBlock = 32;  // query rows per forward task, at least
constexpr int64_t kColumnPad = 16;   // score rows are padded to whole vectors

// ------------------------------------------------------------------ element access
// base[offset + d] = src[d] * mul for d < n, in the output's dtype (the switch outside the loop).
template <typename T>
MMFAST_INLINE void store_row(void* base, int64_t offset, ScalarType st, const T* __restrict src, T mul, int64_t n) {
  switch (st) {
    case ScalarType::Float: {
      float* dst = static_cast<float*>(base) + offset;
      for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d] * mul);
      break;
    }
    case ScalarType::Double: {
      double* dst = static_cast<double*>(base) + offset;
      for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<double>(src[d] * mul);
      break;
    }
    case ScalarType::Half: {
      c10::Half* dst = static_cast<c10::Half*>(base) + offset;
      for (int64_t d = 0; d < n; ++d) dst[d] = c10::Half(static_cast<float>(src[d] * mul));
      break;
    }
    default: {
      c10::BFloat16* dst = static_cast<c10::BFloat16*>(base) + offset;
      for (int64_t d = 0; d < n; ++d) dst[d] = c10::BFloat16(static_cast<float>(src[d] * mul));
    }
  }
}

// A (B, H, L, D) tensor seen through its strides.
struct View4 {
  const void* data;
  ScalarType dtype;
  int64_t sb, sh, sl, sd;
  int64_t at(int64_t b, int64_t h, int64_t l, int64_t d) const { return b * sb + h * sh + l * sl + d * sd; }
};

View4 view4(const Tensor& t) {
  return {t.data_ptr(), t.scalar_type(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

struct Problem {
  int64_t B, H, Lq, Lk, D, Lkp;  // Lkp: Lk rounded up to kColumnPad
  View4 q, k, v;
  const bool* kpm;  // (B, Lk) or nullptr
  int64_t kpm_sb, kpm_sl;
  bool causal;
  double scale;
  double dropout_p;
  uint32_t threshold;  // dropout: keep iff the Philox word >= threshold
  uint64_t seed;
  int64_t qblock;  // forward: query rows per task
};

// Keys query row i may see: [0, last), further limited by the padding mask.
inline int64_t visible_end(const Problem& P, int64_t i) {
  if (!P.causal) return P.Lk;
  return std::max<int64_t>(0, std::min<int64_t>(P.Lk, i + P.Lk - P.Lq + 1));
}

// ------------------------------------------------------------------ vectorisable kernels
// Everything below is inlined into one function per instruction set (see the *_range wrappers).


// exp2(x) for x <= 0 (x = -inf gives 0): 2^n * poly(x - n), n = x rounded to nearest, so the
// polynomial (Cephes' exp2f, ~1 ulp) sees [-0.5, 0.5]. Vectorised by hand (no library call in the
// loop); float64 uses std::exp2.
MMFAST_INLINE V<float> exp2_nonpos(V<float> x) {
  typedef int32_t VI __attribute__((vector_size(64)));
  const V<float> lo = vsplat(-126.f);
  const VI below = x < lo;
  x = below ? lo : x;
  // x - 0.5 < 0, so truncation is ceil(x - 0.5): x rounded to nearest
  const VI n = __builtin_convertvector(x - 0.5f, VI);
  const V<float> f = x - __builtin_convertvector(n, V<float>);  // [-0.5, 0.5]
  V<float> p = vsplat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  VI bits = (n + 127) << 23;
  V<float> scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return below ? V<float>{} : p * scale;
}
MMFAST_INLINE V<double> exp2_nonpos(V<double> x) {
  for (int64_t c = 0; c < Vec<double>::n; ++c) x[c] = std::exp2(x[c]);
  return x;
}

// s[j] = exp2(s[j] - m) over j in [0, n), n a multiple of kColumnPad (-inf gives 0); returns the sum.
template <typename T>
MMFAST_INLINE T exp2_row(T* __restrict s, T m, int64_t n) {
  constexpr int64_t W = Vec<T>::n;
  V<T> sum = {};
  for (int64_t j = 0; j < n; j += W) {
    const V<T> e = exp2_nonpos(vload(s + j) - m);
    vstore(s + j, e);
    sum += e;
  }
  return vsum<T>(sum);
}

// Register tiles. Every loop below works on R query rows at once, so each vector of keys or values
// loaded from cache feeds R FMAs instead of one (the one-row loops were load-bound: 2.3x slower than
// ATen's GEMM-based CPU flash kernels at B16 H6 L237 D64). R rows x columns<R>() vectors of
// accumulators use 16 of AVX-512's 32 registers. Rows run in tiles of 8, then 4, then 1.
constexpr int kRows = 8;

template <int R>
constexpr int columns() { return R >= 8 ? 2 : 4; }

// s[r * lds + j] = sum_d q[r * D + d] * kt[d * ld + j] for r < R, j in [0, n), n a multiple of
// kColumnPad. Columns in chunks of 4 vectors, then one vector at a time.
template <int R, typename T>
MMFAST_INLINE void block_scores(const T* __restrict q, int64_t D, const T* __restrict kt, int64_t ld, int64_t n,
                                T* __restrict s, int64_t lds) {
  constexpr int64_t W = Vec<T>::n;
  constexpr int C = columns<R>();
  int64_t j0 = 0;
  for (; j0 + C * W <= n; j0 += C * W) {
    V<T> a[R][C] = {};
    for (int64_t d = 0; d < D; ++d) {
      V<T> k[C];
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) k[c] = vload(kt + d * ld + j0 + c * W);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const V<T> qd = vsplat(q[r * D + d]);
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) a[r][c] += qd * k[c];
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) vstore(s + r * lds + j0 + c * W, a[r][c]);
  }
  for (; j0 < n; j0 += W) {
    V<T> a[R] = {};
    for (int64_t d = 0; d < D; ++d) {
      const V<T> k0 = vload(kt + d * ld + j0);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[r] += vsplat(q[r * D + d]) * k0;
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) vstore(s + r * lds + j0, a[r]);
  }
}

// acc[r * D + c0 + x] += sum_j w[r * ldw + j] * rows[j * D + c0 + x] over j in [0, n), x < C vectors.
template <int R, int C, typename T>
MMFAST_INLINE void accumulate_columns(const T* __restrict w, int64_t ldw, const T* __restrict rows, int64_t D,
                                      int64_t n, T* __restrict acc, int64_t c0) {
  constexpr int64_t W = Vec<T>::n;
  V<T> a[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) a[r][c] = vload(acc + r * D + c0 + c * W);
  for (int64_t j = 0; j < n; ++j) {
    V<T> x[C];
    for (int c = 0; c < C; ++c) x[c] = vload(rows + j * D + c0 + c * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V<T> wr = vsplat(w[r * ldw + j]);
      for (int c = 0; c < C; ++c) a[r][c] += wr * x[c];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) vstore(acc + r * D + c0 + c * W, a[r][c]);
}

// acc[r * D : r * D + D] += sum_j w[r * ldw + j] * rows[j * D : j * D + D] over j in [0, n), r < R.
template <int R, typename T>
MMFAST_INLINE void block_accumulate(const T* __restrict w, int64_t ldw, const T* __restrict rows, int64_t D,
                                    int64_t n, T* __restrict acc) {
  constexpr int64_t W = Vec<T>::n;
  int64_t c = 0;
  if constexpr (columns<R>() >= 4)
    for (; c + 4 * W <= D; c += 4 * W) accumulate_columns<R, 4>(w, ldw, rows, D, n, acc, c);
  for (; c + 2 * W <= D; c += 2 * W) accumulate_columns<R, 2>(w, ldw, rows, D, n, acc, c);
  for (; c + W <= D; c += W) accumulate_columns<R, 1>(w, ldw, rows, D, n, acc, c);
  for (; c < D; ++c) {  // head dims that are not whole vectors
    for (int r = 0; r < R; ++r) {
      T a = acc[r * D + c];
      for (int64_t j = 0; j < n; ++j) a += w[r * ldw + j] * rows[j * D + c];
      acc[r * D + c] = a;
    }
  }
}

// dst[j * D + c0 + x] += sum_r w[r * ldw + j] * src[r * D + c0 + x] over r < R, j in [0, n), x < C
// vectors; the R source rows stay in registers while dst streams through once.
template <int R, int C, typename T>
MMFAST_INLINE void rank_update_columns(const T* __restrict w, int64_t ldw, const T* __restrict src, int64_t D,
                                       int64_t n, T* __restrict dst, int64_t c0) {
  constexpr int64_t W = Vec<T>::n;
  V<T> x[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) x[r][c] = vload(src + r * D + c0 + c * W);
  for (int64_t j = 0; j < n; ++j) {
    T* y = dst + j * D + c0;
    V<T> a[C];
    for (int c = 0; c < C; ++c) a[c] = vload(y + c * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V<T> wr = vsplat(w[r * ldw + j]);
      for (int c = 0; c < C; ++c) a[c] += wr * x[r][c];
    }
    for (int c = 0; c < C; ++c) vstore(y + c * W, a[c]);
  }
}

// dst[j * D : j * D + D] += sum_r w[r * ldw + j] * src[r * D : r * D + D] over r < R, j in [0, n).
template <int R, typename T>
MMFAST_INLINE void block_rank_update(const T* __restrict w, int64_t ldw, const T* __restrict src, int64_t D,
                                     int64_t n, T* __restrict dst) {
  constexpr int64_t W = Vec<T>::n;
  int64_t c = 0;
  if constexpr (columns<R>() >= 4)
    for (; c + 4 * W <= D; c += 4 * W) rank_update_columns<R, 4>(w, ldw, src, D, n, dst, c);
  for (; c + 2 * W <= D; c += 2 * W) rank_update_columns<R, 2>(w, ldw, src, D, n, dst, c);
  for (; c + W <= D; c += W) rank_update_columns<R, 1>(w, ldw, src, D, n, dst, c);
  for (; c < D; ++c)
    for (int64_t j = 0; j < n; ++j) {
      T a = dst[j * D + c];
      for (int r = 0; r < R; ++r) a += w[r * ldw + j] * src[r * D + c];
      dst[j * D + c] = a;
    }
}

// keep[j] = 1/(1-p) or 0 for key columns [0, n) of row i of batch-head bh (the philox.h contract).
// philox4x32_10's rounds run on 16 counters (groups of four columns) at once, as two vectors of
// eight 64-bit lanes holding 32-bit words (GCC does not vectorise the scalar generator's widening
// products): the same words bit for bit, several times faster; the scalar generator made dropout
// ~40 % of a ViT-S attention's forward + backward (B8 H6 L197 D64, 2 threads: 24.2 ms with p = 0.1,
// 14.5 without).
using PhiloxLanes = uint64_t __attribute__((vector_size(64)));
typedef uint32_t Words8 __attribute__((vector_size(32)));
typedef float Floats8 __attribute__((vector_size(32)));
constexpr int kPhiloxVectors = 2, kPhiloxGroups = 8 * kPhiloxVectors;
constexpr int64_t kDropoutSlack = 4 * kPhiloxGroups;  // dropout_row writes whole blocks of columns

template <typename T>
MMFAST_INLINE void dropout_row(const Problem& P, int64_t bh, int64_t i, int64_t n, T* __restrict keep) {
  const T kept = static_cast<T>(1.0 / (1.0 - P.dropout_p));
  const PhiloxLanes low = PhiloxLanes{} + 0xFFFFFFFFull;
  const PhiloxLanes lane = PhiloxLanes{0, 1, 2, 3, 4, 5, 6, 7};
  const int64_t groups = (n + 3) / 4;
  for (int64_t g0 = 0; g0 < groups; g0 += kPhiloxGroups) {
    PhiloxLanes c0[kPhiloxVectors], c1[kPhiloxVectors], c2[kPhiloxVectors], c3[kPhiloxVectors];
    for (int v = 0; v < kPhiloxVectors; ++v) {
      c0[v] = (lane + static_cast<uint64_t>(g0 + 8 * v)) & low;
      c1[v] = PhiloxLanes{} + static_cast<uint64_t>(static_cast<uint32_t>(i));
      c2[v] = PhiloxLanes{} + static_cast<uint64_t>(static_cast<uint32_t>(bh));
      c3[v] = PhiloxLanes{};
    }
    uint64_t k0 = P.seed & 0xFFFFFFFFull, k1 = P.seed >> 32;
    for (int round = 0; round < 10; ++round) {
      for (int v = 0; v < kPhiloxVectors; ++v) {
        const PhiloxLanes a = c0[v] * 0xD2511F53ull, b = c2[v] * 0xCD9E8D57ull;  // 32 x 32 -> 64 bits
        const PhiloxLanes n0 = ((b >> 32) ^ c1[v] ^ k0) & low, n2 = ((a >> 32) ^ c3[v] ^ k1) & low;
        c1[v] = b & low;
        c3[v] = a & low;
        c0[v] = n0;
        c2[v] = n2;
      }
      k0 = (k0 + 0x9E3779B9u) & 0xFFFFFFFFull;
      k1 = (k1 + 0xBB67AE85u) & 0xFFFFFFFFull;
    }
    const int64_t j0 = 4 * g0;  // column 4 (g0 + g) + c takes word c of group g
    if constexpr (std::is_same_v<T, float>) {
      // the four words of 8 groups interleaved by shuffles, compared and stored as 4 vectors: the
      // word-by-word extraction was ~8 % of a ViT-S attention forward with dropout
      for (int v = 0; v < kPhiloxVectors; ++v) {
        const Words8 a = __builtin_convertvector(c0[v], Words8), b = __builtin_convertvector(c1[v], Words8);
        const Words8 c = __builtin_convertvector(c2[v], Words8), d = __builtin_convertvector(c3[v], Words8);
        const Words8 ab_lo = __builtin_shuffle(a, b, Words8{0, 8, 1, 9, 2, 10, 3, 11});
        const Words8 ab_hi = __builtin_shuffle(a, b, Words8{4, 12, 5, 13, 6, 14, 7, 15});
        const Words8 cd_lo = __builtin_shuffle(c, d, Words8{0, 8, 1, 9, 2, 10, 3, 11});
        const Words8 cd_hi = __builtin_shuffle(c, d, Words8{4, 12, 5, 13, 6, 14, 7, 15});
        const Words8 first = {0, 1, 8, 9, 2, 3, 10, 11}, second = {4, 5, 12, 13, 6, 7, 14, 15};
        const Words8 words[4] = {__builtin_shuffle(ab_lo, cd_lo, first), __builtin_shuffle(ab_lo, cd_lo, second),
                                 __builtin_shuffle(ab_hi, cd_hi, first), __builtin_shuffle(ab_hi, cd_hi, second)};
        for (int x = 0; x < 4; ++x) {
          const Floats8 kv = words[x] >= P.threshold ? Floats8{} + kept : Floats8{};
          std::memcpy(keep + j0 + 32 * v + 8 * x, &kv, sizeof(kv));  // keep has kDropoutSlack columns past n
        }
      }
    } else {
      for (int v = 0; v < kPhiloxVectors; ++v)
        for (int l = 0; l < 8; ++l) {
          const int64_t j = j0 + 4 * (8 * v + l);
          const uint32_t w[4] = {static_cast<uint32_t>(c0[v][l]), static_cast<uint32_t>(c1[v][l]),
                                 static_cast<uint32_t>(c2[v][l]), static_cast<uint32_t>(c3[v][l])};
          for (int c = 0; c < 4; ++c) keep[j + c] = w[c] >= P.threshold ? kept : T(0);
        }
    }
  }
}

// Packs keys of batch-head (b, h) transposed and zero-padded: kt[d * Lp + j]; rows: r[j * D + d] * mul.
// The dtype switch sits outside the loops.
template <typename T, typename S>
MMFAST_INLINE void pack_transposed_from(const View4& x, const S* src, int64_t b, int64_t h, int64_t L, int64_t D,
                                        int64_t Lp, T* kt) {
  const S* head = src + x.at(b, h, 0, 0);
  const int64_t sl = x.sl, sd = x.sd;
  for (int64_t d = 0; d < D; ++d) {  // d outer: kt's rows are written in order
    T* __restrict out = kt + d * Lp;
    const S* col = head + d * sd;
    for (int64_t j = 0; j < L; ++j) out[j] = static_cast<T>(static_cast<float>(col[j * sl]));
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = L; j < Lp; ++j) kt[d * Lp + j] = T(0);
}

// The float32 case with d contiguous (every layout the models produce), 16 x 16 blocks transposed in
// registers: the element-wise copy above, a strided access per element, was ~15 % of a B16 H2 L24
// D32 forward and of its backward (which packs keys and values).
typedef int32_t Lanes32 __attribute__((vector_size(64)));

// Rows a, b of a 16 x 16 block at distance w: swap a's lanes {l + w} with b's lanes {l}, l & w == 0.
template <int w>
MMFAST_INLINE void swap_blocks(V<float>& a, V<float>& b) {
  Lanes32 ma, mb;
  for (int l = 0; l < 16; ++l) {
    ma[l] = (l & w) ? 16 + l - w : l;  // a keeps its lanes l & w == 0, takes b's lower ones
    mb[l] = (l & w) ? 16 + l : l + w;  // b takes a's upper ones, keeps its own
  }
  const V<float> na = __builtin_shuffle(a, b, ma), nb = __builtin_shuffle(a, b, mb);
  a = na;
  b = nb;
}

template <int w>
MMFAST_INLINE void transpose_stage(V<float> (&r)[16]) {
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i)
    if ((i & w) == 0) swap_blocks<w>(r[i], r[i + w]);
}

MMFAST_INLINE void pack_transposed_f32(const float* head, int64_t sl, int64_t L, int64_t D, int64_t Lp,
                                       float* __restrict kt) {
  static_assert(kColumnPad % 16 == 0, "Lp must be whole 16-column blocks");
  constexpr int64_t W = 16;
  int64_t d0 = 0;
  for (; d0 + W <= D; d0 += W) {
    for (int64_t j0 = 0; j0 < Lp; j0 += W) {  // Lp is a multiple of 16: the last block's rows past L are zeros
      V<float> r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = j0 + i < L ? vload(head + (j0 + i) * sl + d0) : V<float>{};
      transpose_stage<8>(r);
      transpose_stage<4>(r);
      transpose_stage<2>(r);
      transpose_stage<1>(r);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) vstore(kt + (d0 + i) * Lp + j0, r[i]);
    }
  }
  for (int64_t d = d0; d < D; ++d)  // head dims past the last whole vector
    for (int64_t j = 0; j < Lp; ++j) kt[d * Lp + j] = j < L ? head[j * sl + d] : 0.f;
}

template <typename T, typename S>
MMFAST_INLINE void pack_rows_from(const View4& x, const S* src, int64_t b, int64_t h, int64_t first, int64_t L,
                                  int64_t D, T* r, T mul) {
  for (int64_t j = 0; j < L; ++j) {
    const S* row = src + x.at(b, h, first + j, 0);
    if (x.sd == 1) {  // the vectorisable case
      for (int64_t d = 0; d < D; ++d) r[j * D + d] = static_cast<T>(static_cast<float>(row[d])) * mul;
    } else {
      for (int64_t d = 0; d < D; ++d) r[j * D + d] = static_cast<T>(static_cast<float>(row[d * x.sd])) * mul;
    }
  }
}

template <typename T>
MMFAST_INLINE void pack_transposed(const View4& x, int64_t b, int64_t h, int64_t L, int64_t D, int64_t Lp, T* kt) {
  switch (x.dtype) {
    case ScalarType::Float:
      if constexpr (std::is_same_v<T, float>)
        if (x.sd == 1) return pack_transposed_f32(static_cast<const float*>(x.data) + x.at(b, h, 0, 0), x.sl, L, D, Lp, kt);
      return pack_transposed_from(x, static_cast<const float*>(x.data), b, h, L, D, Lp, kt);
    case ScalarType::Half: return pack_transposed_from(x, static_cast<const c10::Half*>(x.data), b, h, L, D, Lp, kt);
    case ScalarType::BFloat16:
      return pack_transposed_from(x, static_cast<const c10::BFloat16*>(x.data), b, h, L, D, Lp, kt);
    default:  // float64: no float round trip
      for (int64_t d = 0; d < D; ++d) {
        const double* col = static_cast<const double*>(x.data) + x.at(b, h, 0, d);
        for (int64_t j = 0; j < L; ++j) kt[d * Lp + j] = static_cast<T>(col[j * x.sl]);
        for (int64_t j = L; j < Lp; ++j) kt[d * Lp + j] = T(0);
      }
  }
}

template <typename T>
MMFAST_INLINE void pack_rows(const View4& x, int64_t b, int64_t h, int64_t first, int64_t L, int64_t D, T* r,
                             T mul = T(1)) {
  switch (x.dtype) {
    case ScalarType::Float: return pack_rows_from(x, static_cast<const float*>(x.data), b, h, first, L, D, r, mul);
    case ScalarType::Half:
      return pack_rows_from(x, static_cast<const c10::Half*>(x.data), b, h, first, L, D, r, mul);
    case ScalarType::BFloat16:
      return pack_rows_from(x, static_cast<const c10::BFloat16*>(x.data), b, h, first, L, D, r, mul);
    default:
      for (int64_t j = 0; j < L; ++j)
        for (int64_t d = 0; d < D; ++d)
          r[j * D + d] = static_cast<T>(static_cast<const double*>(x.data)[x.at(b, h, first + j, d)]) * mul;
  }
}

// The padding mask of batch b as an additive row: bias[j] = 0 where key j may be seen, -inf where
// it is padding (and for the padded columns [Lk, Lkp)), so masking a row of scores is one vector add.
template <typename T>
MMFAST_INLINE void mask_bias(const Problem& P, int64_t b, T* __restrict bias) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const bool* m = P.kpm ? P.kpm + b * P.kpm_sb : nullptr;
  for (int64_t j = 0; j < P.Lk; ++j) bias[j] = (m == nullptr || m[j * P.kpm_sl]) ? T(0) : ninf;
  for (int64_t j = P.Lk; j < P.Lkp; ++j) bias[j] = ninf;
}

// Scores of a query row (already multiplied by scale * log2 e), masked in place: columns at or past
// end (causal) and padding keys become -inf. Returns the row max (base-2 units), or -inf when no key
// is visible.
template <typename T>
MMFAST_INLINE T mask_and_max(const T* __restrict bias, int64_t end, int64_t ld, T* __restrict s) {
  constexpr int64_t W = Vec<T>::n;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = end; j < ld; ++j) s[j] = ninf;
  V<T> mx = vsplat(ninf);
  const int64_t n = (end + W - 1) / W * W;  // <= ld, a multiple of kColumnPad
  for (int64_t j = 0; j < n; j += W) {
    const V<T> x = vload(s + j) + vload(bias + j);
    vstore(s + j, x);
    mx = x > mx ? x : mx;
  }
  return vmax<T>(mx);
}

// Without dropout, the row's ds in place of dp: delta = sum_j p_j dp_j, ds_j = p_j dp_j - p_j delta
// over j in [0, n) (p is 0 past the row's end, so those columns add nothing and become 0).
template <typename T>
MMFAST_INLINE void softmax_grad_row(const T* __restrict p, int64_t n, T* __restrict dp) {
  constexpr int64_t W = Vec<T>::n;
  V<T> acc = {};
  for (int64_t j = 0; j < n; j += W) acc += vload(p + j) * vload(dp + j);
  const T delta = vsum<T>(acc);
  const V<T> dv = vsplat(delta);
  for (int64_t j = 0; j < n; j += W) {
    const V<T> pj = vload(p + j);
    vstore(dp + j, pj * vload(dp + j) - pj * dv);
  }
}

// ------------------------------------------------------------------ forward
// Outputs are laid out (B, L, H, D)-major (lse (B, Lq, H)-major) and returned as (B, H, L, D) views:
// the layout of ATen's CPU flash kernels and of the model code, whose out.transpose(1, 2) is then
// contiguous without a copy.
inline int64_t blh(const Problem& P, int64_t bh, int64_t i, int64_t L) { return (bh / P.H * L + i) * P.H + bh % P.H; }
inline int64_t blhd_row(const Problem& P, int64_t bh, int64_t i, int64_t L) { return blh(P, bh, i, L) * P.D; }

struct FwdOut {
  void* out;  // (B, Lq, H, D) contiguous, q's dtype
  float* lse; // (B, Lq, H) contiguous
};

template <typename T>
struct FwdScratch {
  T *kt, *vr;  // the head's keys transposed (D x Lkp), values as rows (Lk x D)
  T* bias;     // the batch's padding mask, additive (Lkp)
  T *s, *keep, *q, *acc;  // per R rows: scores (R x Lkp), a dropout row, scaled queries and outputs (R x D)
};

// Query rows [i0, i0 + R) of batch-head bh.
template <int R, typename T>
MMFAST_INLINE void forward_rows(const Problem& P, const FwdOut& o, int64_t bh, int64_t i0, const FwdScratch<T>& w) {
  const int64_t b = bh / P.H, h = bh % P.H, D = P.D, ld = P.Lkp;
  pack_rows(P.q, b, h, i0, R, D, w.q, static_cast<T>(P.scale * kLog2e));
  block_scores<R>(w.q, D, w.kt, ld, ld, w.s, ld);
  int64_t end_max = 0;
  T inv[R];
  for (int r = 0; r < R; ++r) {
    const int64_t row = blh(P, bh, i0 + r, P.Lq), end = visible_end(P, i0 + r);
    T* s = w.s + r * ld;
    const T mx = mask_and_max(w.bias, end, ld, s);
    if (mx == -std::numeric_limits<T>::infinity()) {  // no visible key: zeros, lse 0
      std::fill(s, s + ld, T(0));
      inv[r] = T(0);
      o.lse[row] = 0.f;
      continue;
    }
    const T sum = exp2_row(s, mx, ld);  // invisible columns hold -inf: 0
    if (P.dropout_p > 0) {
      dropout_row(P, bh, i0 + r, end, w.keep);
      for (int64_t j = 0; j < end; ++j) s[j] *= w.keep[j];
    }
    inv[r] = T(1) / sum;
    o.lse[row] = static_cast<float>(mx + std::log2(sum));
    end_max = std::max(end_max, end);
  }
  std::fill(w.acc, w.acc + R * D, T(0));
  block_accumulate<R>(w.s, ld, w.vr, D, end_max, w.acc);
  const ScalarType odt = P.q.dtype;
  for (int r = 0; r < R; ++r) store_row(o.out, blhd_row(P, bh, i0 + r, P.Lq), odt, w.acc + r * D, inv[r], D);
}

template <typename T>
MMFAST_INLINE void forward_task(const Problem& P, const FwdOut& o, int64_t task, const FwdScratch<T>& w) {
  const int64_t blocks = (P.Lq + P.qblock - 1) / P.qblock;
  const int64_t bh = task / blocks, i0 = (task % blocks) * P.qblock;
  const int64_t b = bh / P.H, h = bh % P.H;
  const int64_t i1 = std::min(P.Lq, i0 + P.qblock);
  pack_transposed(P.k, b, h, P.Lk, P.D, P.Lkp, w.kt);
  pack_rows(P.v, b, h, 0, P.Lk, P.D, w.vr);
  mask_bias(P, b, w.bias);
  int64_t i = i0;
  for (; i + kRows <= i1; i += kRows) forward_rows<kRows>(P, o, bh, i, w);
  for (; i + 4 <= i1; i += 4) forward_rows<4>(P, o, bh, i, w);
  for (; i < i1; ++i) forward_rows<1>(P, o, bh, i, w);
}

// ------------------------------------------------------------------ backward
struct BwdIn {
  View4 grad_out, out;
  const float* lse;
  int64_t lse_sb, lse_sh, lse_sl;
  void *dq, *dk, *dv;  // (B, L, H, D) contiguous, q's dtype
};

template <typename T>
struct BwdScratch {
  T *kt, *vt, *kr;  // the head's keys and values transposed (D x Lkp), keys as rows (Lk x D)
  T* bias;          // the batch's padding mask, additive (Lkp)
  T *dk, *dv;       // the head's key gradients (Lk x D), accumulated over every query row
  T *s, *dp, *keep; // per R rows: probabilities and dO . v (R x Lkp), a dropout row
  T *q, *qs, *dout, *dq;  // per R rows (R x D): queries, scaled queries, dO, dq
};

// Query rows [i0, i0 + R) of batch-head bh: their dq, and their terms of dk and dv.
template <int R, typename T>
MMFAST_INLINE void backward_rows(const Problem& P, const BwdIn& g, int64_t bh, int64_t i0, const BwdScratch<T>& w) {
  const int64_t b = bh / P.H, h = bh % P.H, D = P.D, ld = P.Lkp;
  pack_rows(P.q, b, h, i0, R, D, w.q);
  const T qmul = static_cast<T>(P.scale * kLog2e);  // the scaled copy from the packed rows: one read of q
  for (int64_t x = 0; x < R * D; ++x) w.qs[x] = w.q[x] * qmul;
  pack_rows(g.grad_out, b, h, i0, R, D, w.dout);
  block_scores<R>(w.qs, D, w.kt, ld, ld, w.s, ld);
  block_scores<R>(w.dout, D, w.vt, ld, ld, w.dp, ld);  // dp_j = dO_i . v_j
  int64_t end_max = 0;
  for (int r = 0; r < R; ++r) {
    const int64_t end = visible_end(P, i0 + r);
    T* s = w.s + r * ld;
    T* dp = w.dp + r * ld;
    const T mx = mask_and_max(w.bias, end, ld, s);
    if (mx == -std::numeric_limits<T>::infinity()) {  // no visible key: the row contributes nothing
      std::fill(s, s + ld, T(0));
      std::fill(dp, dp + ld, T(0));
      continue;
    }
    T lse = static_cast<T>(g.lse[b * g.lse_sb + h * g.lse_sh + (i0 + r) * g.lse_sl]);
    if constexpr (std::is_same_v<T, double>) {  // the saved lse is float32: too coarse for float64 grads
      T sum = 0;
      for (int64_t j = 0; j < end; ++j) sum += s[j] == -std::numeric_limits<T>::infinity() ? T(0) : std::exp2(s[j] - mx);
      lse = mx + std::log2(sum);
    }
    exp2_row(s, lse, ld);  // columns past end (and masked ones) become 0
    // delta = dO_i . O_i, computed as sum_j (dropped p_j)(dO_i . v_j) from this row's own numbers, so
    // ds sums to zero over the row exactly where it should (one visible key: dq = 0, not round-off)
    if (P.dropout_p > 0) {
      // whole vectors over the padded row: p_j is 0 past end, and keep holds finite values there
      // (dropout_row writes whole blocks; the scratch starts zeroed). The scalar sum's chain of
      // dependent adds was a third of a B8 H12 L237 D32 backward.
      dropout_row(P, bh, i0 + r, end, w.keep);
      constexpr int64_t W = Vec<T>::n;
      V<T> acc = {};
      for (int64_t j = 0; j < ld; j += W) acc += vload(s + j) * vload(w.keep + j) * vload(dp + j);
      const V<T> delta = vsplat(vsum<T>(acc));
      for (int64_t j = 0; j < ld; j += W) {
        const V<T> p = vload(s + j), pd = p * vload(w.keep + j);
        vstore(dp + j, pd * vload(dp + j) - p * delta);  // ds_j = p_j (z_j dp_j - delta)
        vstore(s + j, pd);                                // the dropped probability: weight of dO_i in dv_j
      }
    } else {
      softmax_grad_row(s, ld, dp);
    }
    std::fill(dp + end, dp + ld, T(0));
    end_max = std::max(end_max, end);
  }
  std::fill(w.dq, w.dq + R * D, T(0));
  block_accumulate<R>(w.dp, ld, w.kr, D, end_max, w.dq);
  block_rank_update<R>(w.s, ld, w.dout, D, end_max, w.dv);
  block_rank_update<R>(w.dp, ld, w.q, D, end_max, w.dk);
  const T sc = static_cast<T>(P.scale);
  const ScalarType odt = P.q.dtype;
  for (int r = 0; r < R; ++r) store_row(g.dq, blhd_row(P, bh, i0 + r, P.Lq), odt, w.dq + r * D, sc, D);
}

template <typename T>
MMFAST_INLINE void backward_task(const Problem& P, const BwdIn& g, int64_t bh, const BwdScratch<T>& w) {
  const int64_t b = bh / P.H, h = bh % P.H, D = P.D, Lk = P.Lk;
  pack_transposed(P.k, b, h, Lk, D, P.Lkp, w.kt);
  pack_transposed(P.v, b, h, Lk, D, P.Lkp, w.vt);
  pack_rows(P.k, b, h, 0, Lk, D, w.kr);
  mask_bias(P, b, w.bias);
  std::fill(w.dk, w.dk + Lk * D, T(0));
  std::fill(w.dv, w.dv + Lk * D, T(0));
  int64_t i = 0;
  for (; i + kRows <= P.Lq; i += kRows) backward_rows<kRows>(P, g, bh, i, w);
  for (; i + 4 <= P.Lq; i += 4) backward_rows<4>(P, g, bh, i, w);
  for (; i < P.Lq; ++i) backward_rows<1>(P, g, bh, i, w);
  const T sc = static_cast<T>(P.scale);
  const ScalarType odt = P.q.dtype;
  for (int64_t j = 0; j < Lk; ++j) {
    store_row(g.dk, blhd_row(P, bh, j, Lk), odt, w.dk + j * D, sc, D);
    store_row(g.dv, blhd_row(P, bh, j, Lk), odt, w.dv + j * D, T(1), D);
  }
}

// ------------------------------------------------------------------ per-ISA instantiations
// Scratch is allocated by the caller (outside these functions, which inline everything they call).
template <typename T>
struct Scratch {
  std::vector<T> buf;
  T* take(int64_t n) {  // successive 64-byte aligned slices
    const int64_t at = used;
    used += (n + 15) / 16 * 16;
    return buf.data() + at;
  }
  int64_t used = 0;
};

#define MMFAST_ATTENTION_RANGES(ISA, ATTRS)                                                                 \
  template <typename T>                                                                                    \
  ATTRS void forward_##ISA(const Problem& P, const FwdOut& o, int64_t begin, int64_t end,                 \
                           const FwdScratch<T>& w) {                                                       \
    for (int64_t t = begin; t < end; ++t) forward_task(P, o, t, w);                                        \
  }                                                                                                        \
  template <typename T>                                                                                    \
  ATTRS void backward_##ISA(const Problem& P, const BwdIn& g, int64_t begin, int64_t end,                 \
                            const BwdScratch<T>& w) {                                                      \
    for (int64_t t = begin; t < end; ++t) backward_task(P, g, t, w);                                       \
  }

#ifdef MMFAST_HAVE_X86_ISAS
MMFAST_ATTENTION_RANGES(avx512, MMFAST_AVX512_ATTRS)
MMFAST_ATTENTION_RANGES(avx2, MMFAST_AVX2_ATTRS)
#endif
MMFAST_ATTENTION_RANGES(base, MMFAST_BASE_ATTRS)

// ------------------------------------------------------------------ argument checks and set-up
void check_qkv(const Tensor& q, const Tensor& k, const Tensor& v) {
  const char* names[3] = {"q", "k", "v"};
  const Tensor* ts[3] = {&q, &k, &v};
  for (int n = 0; n < 3; ++n) {
    const Tensor& t = *ts[n];
    MMFAST_ATTN_CHECK(t.dim() == 4, names[n], "expected a 4-D (B, H, L, D) tensor, got ", t.dim(), " dims");
    MMFAST_ATTN_CHECK(t.is_cpu(), names[n], "expected a CPU tensor");
    MMFAST_ATTN_CHECK(t.scalar_type() == q.scalar_type(), names[n], "expected the dtype of q");
  }
  const ScalarType st = q.scalar_type();
  MMFAST_ATTN_CHECK(st == ScalarType::Float || st == ScalarType::Double || st == ScalarType::Half ||
                        st == ScalarType::BFloat16,
                    "q", "expected float32, float64, float16 or bfloat16");
  MMFAST_ATTN_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), "k",
                    "expected (B, H, Lk, D) with q's B, H, D = ", q.size(0), ", ", q.size(1), ", ", q.size(3),
                    "; got (", k.size(0), ", ", k.size(1), ", ", k.size(2), ", ", k.size(3), ")");
  for (int64_t d = 0; d < 4; ++d) MMFAST_ATTN_CHECK(v.size(d) == k.size(d), "v", "expected the shape of k");
}

Problem make_problem(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& kpm,
                     const std::optional<Tensor>& seed, bool causal, double scale, double dropout_p) {
  check_qkv(q, k, v);
  MMFAST_ATTN_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p", "expected a value in [0, 1), got ", dropout_p);
  Problem P{};
  P.B = q.size(0);
  P.H = q.size(1);
  P.Lq = q.size(2);
  P.Lk = k.size(2);
  P.D = q.size(3);
  P.Lkp = (P.Lk + kColumnPad - 1) / kColumnPad * kColumnPad;
  P.q = view4(q);
  P.k = view4(k);
  P.v = view4(v);
  P.kpm = nullptr;
  if (kpm.has_value()) {
    const Tensor& m = *kpm;
    MMFAST_ATTN_CHECK(m.scalar_type() == ScalarType::Bool && m.dim() == 2 && m.size(0) == P.B && m.size(1) == P.Lk,
                      "key_padding_mask", "expected a bool (B, Lk) = (", P.B, ", ", P.Lk, ") tensor");
    MMFAST_ATTN_CHECK(m.is_cpu(), "key_padding_mask", "expected a CPU tensor");
    P.kpm = static_cast<const bool*>(m.data_ptr());
    P.kpm_sb = m.stride(0);
    P.kpm_sl = m.stride(1);
  }
  P.causal = causal;
  P.scale = scale;
  P.dropout_p = dropout_p;
  P.threshold = dropout_threshold(dropout_p);
  P.seed = 0;
  if (dropout_p > 0) {
    MMFAST_ATTN_CHECK(seed.has_value(), "seed", "expected an int64 tensor of one element when dropout_p > 0");
    const Tensor& s = *seed;
    MMFAST_ATTN_CHECK(s.scalar_type() == ScalarType::Long && s.numel() == 1 && s.is_cpu(), "seed",
                      "expected a CPU int64 tensor of one element");
    P.seed = static_cast<uint64_t>(*static_cast<const int64_t*>(s.data_ptr()));
  }
  return P;
}

int64_t grain(int64_t tasks) {
  const int64_t threads = std::max<int64_t>(1, torch::stable::get_num_threads());
  return std::max<int64_t>(1, tasks / (4 * threads));
}

// Query rows per forward task: whole heads when there are enough (batch, head) pairs to keep every
// thread busy (8 tasks per thread), else blocks of at least kMinQueryBlock rows.
int64_t query_block(const Problem& P) {
  const int64_t threads = std::max<int64_t>(1, torch::stable::get_num_threads());
  const int64_t heads = std::max<int64_t>(1, P.B * P.H);
  const int64_t per_head = std::max<int64_t>(1, (8 * threads + heads - 1) / heads);
  const int64_t rows = (P.Lq + per_head - 1) / per_head;
  return std::max<int64_t>(kMinQueryBlock, (rows + kRows - 1) / kRows * kRows);
}

template <typename T>
void run_forward(Problem P, const FwdOut& o) {
  P.qblock = query_block(P);
  const int64_t tasks = P.B * P.H * ((P.Lq + P.qblock - 1) / P.qblock);
  const Isa isa = cpu_isa();
  torch::stable::parallel_for(0, tasks, grain(tasks), [&](int64_t begin, int64_t end) {
    Scratch<T> sc;
    const int64_t R = kRows;
    sc.buf.resize(P.D * P.Lkp + P.Lk * P.D + (R + 2) * P.Lkp + kDropoutSlack + 2 * R * P.D + 7 * 16);
    FwdScratch<T> w;
    w.kt = sc.take(P.D * P.Lkp);
    w.vr = sc.take(P.Lk * P.D);
    w.bias = sc.take(P.Lkp);
    w.s = sc.take(R * P.Lkp);
    w.keep = sc.take(P.Lkp + kDropoutSlack);
    w.q = sc.take(R * P.D);
    w.acc = sc.take(R * P.D);
#ifdef MMFAST_HAVE_X86_ISAS
    if (isa == Isa::kAvx512) return forward_avx512<T>(P, o, begin, end, w);
    if (isa == Isa::kAvx2) return forward_avx2<T>(P, o, begin, end, w);
#endif
    forward_base<T>(P, o, begin, end, w);
  });
}

template <typename T>
void run_backward(const Problem& P, const BwdIn& g) {
  const int64_t tasks = P.B * P.H;
  const Isa isa = cpu_isa();
  torch::stable::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc;
    const int64_t LD = P.Lk * P.D, DL = P.D * P.Lkp, R = kRows;
    sc.buf.resize(2 * DL + 3 * LD + (2 * R + 2) * P.Lkp + kDropoutSlack + 4 * R * P.D + 13 * 16);
    BwdScratch<T> w;
    w.kt = sc.take(DL);
    w.vt = sc.take(DL);
    w.kr = sc.take(LD);
    w.bias = sc.take(P.Lkp);
    w.dk = sc.take(LD);
    w.dv = sc.take(LD);
    w.s = sc.take(R * P.Lkp);
    w.dp = sc.take(R * P.Lkp);
    w.keep = sc.take(P.Lkp + kDropoutSlack);
    w.q = sc.take(R * P.D);
    w.qs = sc.take(R * P.D);
    w.dout = sc.take(R * P.D);
    w.dq = sc.take(R * P.D);
#ifdef MMFAST_HAVE_X86_ISAS
    if (isa == Isa::kAvx512) return backward_avx512<T>(P, g, begin, end, w);
    if (isa == Isa::kAvx2) return backward_avx2<T>(P, g, begin, end, w);
#endif
    backward_base<T>(P, g, begin, end, w);
  });
}

std::tuple<Tensor, Tensor> attention_forward_cpu(Tensor q, Tensor k, Tensor v, std::optional<Tensor> key_padding_mask,
                                                 std::optional<Tensor> seed, bool causal, double scale,
                                                 double dropout_p) {
  const Problem P = make_problem(q, k, v, key_padding_mask, seed, causal, scale, dropout_p);
  Tensor out = torch::stable::new_empty(q, {P.B, P.Lq, P.H, P.D});
  Tensor lse = torch::stable::new_empty(q, {P.B, P.Lq, P.H}, ScalarType::Float);
  if (P.B * P.H * P.Lq > 0) {
    const FwdOut o{out.data_ptr(), static_cast<float*>(lse.data_ptr())};
    if (q.scalar_type() == ScalarType::Double) {
      run_forward<double>(P, o);
    } else {
      run_forward<float>(P, o);
    }
  }
  return {torch::stable::transpose(out, 1, 2), torch::stable::transpose(lse, 1, 2)};
}

std::tuple<Tensor, Tensor, Tensor> attention_backward_cpu(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,
                                                          Tensor lse, std::optional<Tensor> key_padding_mask,
                                                          std::optional<Tensor> seed, bool causal, double scale,
                                                          double dropout_p) {
  const Problem P = make_problem(q, k, v, key_padding_mask, seed, causal, scale, dropout_p);
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&grad_out, "grad_out"}, {&out, "out"}}) {
    MMFAST_ATTN_CHECK(t->dim() == 4 && t->size(0) == P.B && t->size(1) == P.H && t->size(2) == P.Lq &&
                          t->size(3) == P.D && t->scalar_type() == q.scalar_type(),
                      name, "expected q's shape and dtype");
  }
  MMFAST_ATTN_CHECK(lse.scalar_type() == ScalarType::Float && lse.dim() == 3 && lse.size(0) == P.B &&
                        lse.size(1) == P.H && lse.size(2) == P.Lq,
                    "lse", "expected the float32 (B, H, Lq) log-sum-exp of this face's forward");
  Tensor dq = torch::stable::new_empty(q, {P.B, P.Lq, P.H, P.D});
  Tensor dk = torch::stable::new_empty(q, {P.B, P.Lk, P.H, P.D});
  Tensor dv = torch::stable::new_empty(q, {P.B, P.Lk, P.H, P.D});
  if (P.B * P.H > 0 && P.Lq == 0) {  // no query: every key gradient is zero
    torch::stable::zero_(dk);
    torch::stable::zero_(dv);
  } else if (P.B * P.H > 0) {
    const BwdIn g{view4(grad_out), view4(out), static_cast<const float*>(lse.data_ptr()),
                  lse.stride(0), lse.stride(1), lse.stride(2), dq.data_ptr(), dk.data_ptr(), dv.data_ptr()};
    if (q.scalar_type() == ScalarType::Double) {
      run_backward<double>(P, g);
    } else {
      run_backward<float>(P, g);
    }
  }
  return {torch::stable::transpose(dq, 1, 2), torch::stable::transpose(dk, 1, 2), torch::stable::transpose(dv, 1, 2)};
}

}  // namespace
}  // namespace mmfast

STABLE_TORCH_LIBRARY_IMPL(mmfast_C, CPU, m) {
  m.impl("attention_forward", TORCH_BOX(&mmfast::attention_forward_cpu));
  m.impl("attention_backward", TORCH_BOX(&mmfast::attention_backward_cpu));
}
