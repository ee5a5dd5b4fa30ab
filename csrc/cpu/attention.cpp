// Fused attention, CPU face (schema: csrc/attention.cpp; contract: mmfast/ops/attention.py).
//
// Flash-style: nothing of size Lq x Lk is stored. The forward keeps one row of scores at a time and
// saves the log-sum-exp (base 2) per query row; the backward rebuilds each row's probabilities from
// it, p_j = exp2(s_j - lse_i), and regenerates the dropout mask from the seed (csrc/philox.h, the
// same mask as the Triton and CUDA faces).
//
// Work split: the forward runs (batch x head x block of query rows) tasks in parallel; the backward
// runs one task per (batch, head), which owns its dk / dv rows (no atomics, no reduction pass).
// Each task first packs its head's keys and values into float32 (float64 for float64 inputs)
// scratch, keys transposed (D x Lk), so that a row of scores is D broadcast-FMAs over contiguous
// key columns: vector loads only, no horizontal sums. The loops are written for the compiler's
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
constexpr int64_t kQueryBlock = 32;  // query rows per forward task
constexpr int64_t kColumnPad = 16;   // score rows are padded to whole vectors

// ------------------------------------------------------------------ element access
template <typename T>
inline void store_as(void* base, int64_t offset, ScalarType st, T value) {
  switch (st) {
    case ScalarType::Float: static_cast<float*>(base)[offset] = static_cast<float>(value); break;
    case ScalarType::Double: static_cast<double*>(base)[offset] = static_cast<double>(value); break;
    case ScalarType::Half: static_cast<c10::Half*>(base)[offset] = c10::Half(static_cast<float>(value)); break;
    default: static_cast<c10::BFloat16*>(base)[offset] = c10::BFloat16(static_cast<float>(value)); break;
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
};

// Keys query row i may see: [0, last), further limited by the padding mask.
inline int64_t visible_end(const Problem& P, int64_t i) {
  if (!P.causal) return P.Lk;
  return std::max<int64_t>(0, std::min<int64_t>(P.Lk, i + P.Lk - P.Lq + 1));
}

// ------------------------------------------------------------------ vectorisable kernels
// Everything below is inlined into one function per instruction set (see the *_range wrappers).

// One 64-byte vector of T (an AVX-512 register; two AVX2 or four SSE registers on smaller ISAs),
// loaded and stored unaligned. GCC's vector extensions: the compiler maps them onto the ISA of the
// function they are inlined into.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64), aligned(sizeof(T))));
  static constexpr int64_t n = 64 / sizeof(T);
};
template <typename T>
using V = typename Vec<T>::type;
template <typename T>
MMFAST_INLINE V<T> vload(const T* p) { return *reinterpret_cast<const V<T>*>(p); }
template <typename T>
MMFAST_INLINE void vstore(T* p, V<T> x) { *reinterpret_cast<V<T>*>(p) = x; }
template <typename T>
MMFAST_INLINE V<T> vsplat(T x) { return V<T>{} + x; }

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
  T total = 0;
  for (int64_t c = 0; c < W; ++c) total += sum[c];
  return total;
}

// s[j] = sum_d q[d] * kt[d * ld + j] for j in [0, n), n a multiple of kColumnPad. Columns in chunks
// of 4 vectors so four independent FMA chains run per query element.
template <typename T>
MMFAST_INLINE void row_scores(const T* __restrict q, const T* __restrict kt, int64_t ld, int64_t D, int64_t n,
                              T* __restrict s) {
  constexpr int64_t W = Vec<T>::n;
  int64_t j0 = 0;
  for (; j0 + 4 * W <= n; j0 += 4 * W) {
    V<T> a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t d = 0; d < D; ++d) {
      const V<T> qd = vsplat(q[d]);
      const T* kr = kt + d * ld + j0;
      a0 += qd * vload(kr);
      a1 += qd * vload(kr + W);
      a2 += qd * vload(kr + 2 * W);
      a3 += qd * vload(kr + 3 * W);
    }
    vstore(s + j0, a0);
    vstore(s + j0 + W, a1);
    vstore(s + j0 + 2 * W, a2);
    vstore(s + j0 + 3 * W, a3);
  }
  for (; j0 < n; j0 += W) {  // the last 1-3 vectors: four partial sums over d instead of over columns
    V<T> a0 = {}, a1 = {}, a2 = {}, a3 = {};
    int64_t d = 0;
    for (; d + 4 <= D; d += 4) {
      const T* kr = kt + d * ld + j0;
      a0 += vsplat(q[d]) * vload(kr);
      a1 += vsplat(q[d + 1]) * vload(kr + ld);
      a2 += vsplat(q[d + 2]) * vload(kr + 2 * ld);
      a3 += vsplat(q[d + 3]) * vload(kr + 3 * ld);
    }
    for (; d < D; ++d) a0 += vsplat(q[d]) * vload(kt + d * ld + j0);
    vstore(s + j0, (a0 + a1) + (a2 + a3));
  }
}

// y[0:D] += a * x[0:D]
template <typename T>
MMFAST_INLINE void axpy(T a, const T* __restrict x, int64_t D, T* __restrict y) {
  constexpr int64_t W = Vec<T>::n;
  int64_t c = 0;
  const V<T> av = vsplat(a);
  for (; c + W <= D; c += W) vstore(y + c, vload(y + c) + av * vload(x + c));
  for (; c < D; ++c) y[c] += a * x[c];
}

// acc[0:D] += sum_j w[j] * rows[j * D : j * D + D] over j in [0, n): per vector of acc, four
// partial sums over j so four FMA chains run.
template <typename T>
MMFAST_INLINE void accumulate_rows(const T* __restrict w, const T* __restrict rows, int64_t D, int64_t n,
                                   T* __restrict acc) {
  constexpr int64_t W = Vec<T>::n;
  int64_t c = 0;
  for (; c + W <= D; c += W) {
    V<T> a0 = vload(acc + c), a1 = {}, a2 = {}, a3 = {};
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      const T* r = rows + j * D + c;
      a0 += vsplat(w[j]) * vload(r);
      a1 += vsplat(w[j + 1]) * vload(r + D);
      a2 += vsplat(w[j + 2]) * vload(r + 2 * D);
      a3 += vsplat(w[j + 3]) * vload(r + 3 * D);
    }
    for (; j < n; ++j) a0 += vsplat(w[j]) * vload(rows + j * D + c);
    vstore(acc + c, (a0 + a1) + (a2 + a3));
  }
  for (; c < D; ++c) {
    T a = acc[c];
    for (int64_t j = 0; j < n; ++j) a += w[j] * rows[j * D + c];
    acc[c] = a;
  }
}

// keep[j] = 1/(1-p) or 0 for key columns [0, n) of row i of batch-head bh (the philox.h contract).
template <typename T>
MMFAST_INLINE void dropout_row(const Problem& P, int64_t bh, int64_t i, int64_t n, T* __restrict keep) {
  const T kept = static_cast<T>(1.0 / (1.0 - P.dropout_p));
  const int64_t groups = (n + 3) / 4;
  uint32_t words[4];
  for (int64_t g = 0; g < groups; ++g) {
    const PhiloxWords w = dropout_words4(P.seed, static_cast<uint32_t>(bh), static_cast<uint32_t>(i),
                                         static_cast<uint32_t>(g));
    for (int c = 0; c < 4; ++c) words[c] = w.w[c];
    for (int c = 0; c < 4; ++c) {
      const int64_t j = 4 * g + c;
      if (j < n) keep[j] = words[c] >= P.threshold ? kept : T(0);
    }
  }
}

// Packs keys of batch-head (b, h) transposed and zero-padded: kt[d * Lp + j]; rows: r[j * D + d] * mul.
// The dtype switch sits outside the loops.
template <typename T, typename S>
MMFAST_INLINE void pack_transposed_from(const View4& x, const S* src, int64_t b, int64_t h, int64_t L, int64_t D,
                                        int64_t Lp, T* kt) {
  for (int64_t d = 0; d < D; ++d) {
    T* dst = kt + d * Lp;
    const S* col = src + x.at(b, h, 0, d);
    for (int64_t j = 0; j < L; ++j) dst[j] = static_cast<T>(static_cast<float>(col[j * x.sl]));
    for (int64_t j = L; j < Lp; ++j) dst[j] = T(0);
  }
}

template <typename T, typename S>
MMFAST_INLINE void pack_rows_from(const View4& x, const S* src, int64_t b, int64_t h, int64_t first, int64_t L,
                                  int64_t D, T* r, T mul) {
  for (int64_t j = 0; j < L; ++j) {
    const S* row = src + x.at(b, h, first + j, 0);
    for (int64_t d = 0; d < D; ++d) r[j * D + d] = static_cast<T>(static_cast<float>(row[d * x.sd])) * mul;
  }
}

template <typename T>
MMFAST_INLINE void pack_transposed(const View4& x, int64_t b, int64_t h, int64_t L, int64_t D, int64_t Lp, T* kt) {
  switch (x.dtype) {
    case ScalarType::Float: return pack_transposed_from(x, static_cast<const float*>(x.data), b, h, L, D, Lp, kt);
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

// Scores of query row (already multiplied by scale * log2 e) -> probabilities numerators in s,
// invisible columns 0. Returns the row max (base-2 units), or -inf when no key is visible.
template <typename T>
MMFAST_INLINE T mask_and_max(const Problem& P, int64_t b, int64_t end, T* __restrict s) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = end; j < P.Lkp; ++j) s[j] = ninf;
  if (P.kpm) {
    const bool* m = P.kpm + b * P.kpm_sb;
    for (int64_t j = 0; j < end; ++j) s[j] = m[j * P.kpm_sl] ? s[j] : ninf;
  }
  T mx = ninf;
  for (int64_t j = 0; j < end; ++j) mx = s[j] > mx ? s[j] : mx;
  return mx;
}

// ------------------------------------------------------------------ forward
struct FwdOut {
  void* out;  // (B, H, Lq, D) contiguous, q's dtype
  float* lse; // (B, H, Lq)
};

template <typename T>
MMFAST_INLINE void forward_task(const Problem& P, const FwdOut& o, int64_t task, T* kt, T* vr, T* s, T* keep,
                                T* qrow, T* acc) {
  const int64_t blocks = (P.Lq + kQueryBlock - 1) / kQueryBlock;
  const int64_t bh = task / blocks, i0 = (task % blocks) * kQueryBlock;
  const int64_t b = bh / P.H, h = bh % P.H, D = P.D;
  const int64_t i1 = std::min(P.Lq, i0 + kQueryBlock);
  pack_transposed(P.k, b, h, P.Lk, D, P.Lkp, kt);
  pack_rows(P.v, b, h, 0, P.Lk, D, vr);
  const T qmul = static_cast<T>(P.scale * kLog2e);
  const ScalarType odt = P.q.dtype;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t row = bh * P.Lq + i;
    const int64_t end = visible_end(P, i);
    pack_rows(P.q, b, h, i, 1, D, qrow, qmul);
    row_scores(qrow, kt, P.Lkp, D, P.Lkp, s);
    const T mx = mask_and_max(P, b, end, s);
    if (mx == -std::numeric_limits<T>::infinity()) {  // no visible key: zeros, lse 0
      for (int64_t d = 0; d < D; ++d) store_as<T>(o.out, row * D + d, odt, T(0));
      o.lse[row] = 0.f;
      continue;
    }
    const T sum = exp2_row(s, mx, P.Lkp);  // invisible columns hold -inf: 0
    if (P.dropout_p > 0) {
      dropout_row(P, bh, i, end, keep);
      for (int64_t j = 0; j < end; ++j) s[j] *= keep[j];
    }
    for (int64_t d = 0; d < D; ++d) acc[d] = T(0);
    accumulate_rows(s, vr, D, end, acc);
    const T inv = T(1) / sum;
    for (int64_t d = 0; d < D; ++d) store_as<T>(o.out, row * D + d, odt, acc[d] * inv);
    o.lse[row] = static_cast<float>(mx + std::log2(sum));
  }
}

// ------------------------------------------------------------------ backward
struct BwdIn {
  View4 grad_out, out;
  const float* lse;
  void *dq, *dk, *dv;  // (B, H, L, D) contiguous, q's dtype
};

template <typename T>
MMFAST_INLINE void backward_task(const Problem& P, const BwdIn& g, int64_t bh, T* kt, T* vt, T* kr, T* dk, T* dv,
                                 T* s, T* dp, T* keep, T* qrow, T* dorow, T* dqrow) {
  const int64_t b = bh / P.H, h = bh % P.H, D = P.D, Lk = P.Lk;
  pack_transposed(P.k, b, h, Lk, D, P.Lkp, kt);
  pack_transposed(P.v, b, h, Lk, D, P.Lkp, vt);
  pack_rows(P.k, b, h, 0, Lk, D, kr);
  for (int64_t x = 0; x < Lk * D; ++x) dk[x] = dv[x] = T(0);
  const T qmul = static_cast<T>(P.scale * kLog2e);
  const ScalarType odt = P.q.dtype;
  for (int64_t i = 0; i < P.Lq; ++i) {
    const int64_t row = bh * P.Lq + i;
    const int64_t end = visible_end(P, i);
    pack_rows(P.q, b, h, i, 1, D, qrow);
    pack_rows(g.grad_out, b, h, i, 1, D, dorow);
    pack_rows(P.q, b, h, i, 1, D, dqrow, qmul);  // scratch: the scaled query
    row_scores(dqrow, kt, P.Lkp, D, P.Lkp, s);
    const T mx = mask_and_max(P, b, end, s);
    if (mx == -std::numeric_limits<T>::infinity()) {  // no visible key: the row contributes nothing
      for (int64_t d = 0; d < D; ++d) store_as<T>(g.dq, row * D + d, odt, T(0));
      continue;
    }
    T lse = static_cast<T>(g.lse[row]);
    if constexpr (std::is_same_v<T, double>) {  // the saved lse is float32: too coarse for float64 grads
      T sum = 0;
      for (int64_t j = 0; j < end; ++j) sum += s[j] == -std::numeric_limits<T>::infinity() ? T(0) : std::exp2(s[j] - mx);
      lse = mx + std::log2(sum);
    }
    exp2_row(s, lse, P.Lkp);
    row_scores(dorow, vt, P.Lkp, D, P.Lkp, dp);  // dp_j = dO_i . v_j
    // delta = dO_i . O_i, computed as sum_j (dropped p_j)(dO_i . v_j) from this row's own numbers, so
    // ds sums to zero over the row exactly where it should (one visible key: dq = 0, not round-off)
    if (P.dropout_p > 0) dropout_row(P, bh, i, end, keep);
    T delta = 0;
    for (int64_t j = 0; j < end; ++j) delta += (P.dropout_p > 0 ? s[j] * keep[j] : s[j]) * dp[j];
    for (int64_t j = 0; j < end; ++j) {
      const T p = s[j], pd = P.dropout_p > 0 ? p * keep[j] : p;
      dp[j] = pd * dp[j] - p * delta;  // ds_j = p_j (z_j dp_j - delta)
      s[j] = pd;                       // the dropped probability: weight of dO_i in dv_j
    }
    for (int64_t d = 0; d < D; ++d) dqrow[d] = T(0);
    accumulate_rows(dp, kr, D, end, dqrow);
    for (int64_t j = 0; j < end; ++j) {
      axpy(s[j], dorow, D, dv + j * D);
      axpy(dp[j], qrow, D, dk + j * D);
    }
    const T sc = static_cast<T>(P.scale);
    for (int64_t d = 0; d < D; ++d) store_as<T>(g.dq, row * D + d, odt, dqrow[d] * sc);
  }
  const T sc = static_cast<T>(P.scale);
  const int64_t base = bh * Lk * D;
  for (int64_t x = 0; x < Lk * D; ++x) {
    store_as<T>(g.dk, base + x, odt, dk[x] * sc);
    store_as<T>(g.dv, base + x, odt, dv[x]);
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

#define MMFAST_FORWARD_RANGE(NAME, ATTRS)                                                                  \
  template <typename T>                                                                                    \
  ATTRS void NAME(const Problem& P, const FwdOut& o, int64_t begin, int64_t end, T* kt, T* vr, T* s,    \
                  T* keep, T* qrow, T* acc) {                                                              \
    for (int64_t t = begin; t < end; ++t) forward_task(P, o, t, kt, vr, s, keep, qrow, acc);               \
  }
#define MMFAST_BACKWARD_RANGE(NAME, ATTRS)                                                                 \
  template <typename T>                                                                                    \
  ATTRS void NAME(const Problem& P, const BwdIn& g, int64_t begin, int64_t end, T* kt, T* vt, T* kr, T* dk, \
                  T* dv, T* s, T* dp, T* keep, T* qrow, T* dorow, T* dqrow) {                              \
    for (int64_t t = begin; t < end; ++t) backward_task(P, g, t, kt, vt, kr, dk, dv, s, dp, keep, qrow, dorow, dqrow); \
  }

#ifdef MMFAST_HAVE_X86_ISAS
MMFAST_FORWARD_RANGE(forward_avx512, MMFAST_AVX512_ATTRS)
MMFAST_FORWARD_RANGE(forward_avx2, MMFAST_AVX2_ATTRS)
MMFAST_BACKWARD_RANGE(backward_avx512, MMFAST_AVX512_ATTRS)
MMFAST_BACKWARD_RANGE(backward_avx2, MMFAST_AVX2_ATTRS)
#endif
MMFAST_FORWARD_RANGE(forward_base, MMFAST_BASE_ATTRS)
MMFAST_BACKWARD_RANGE(backward_base, MMFAST_BASE_ATTRS)

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

template <typename T>
void run_forward(const Problem& P, const FwdOut& o) {
  const int64_t tasks = P.B * P.H * ((P.Lq + kQueryBlock - 1) / kQueryBlock);
  const Isa isa = cpu_isa();
  torch::stable::parallel_for(0, tasks, grain(tasks), [&](int64_t begin, int64_t end) {
    Scratch<T> sc;
    sc.buf.resize(P.D * P.Lkp + P.Lk * P.D + 2 * P.Lkp + 2 * P.D + 6 * 16);
    T* kt = sc.take(P.D * P.Lkp);
    T* vr = sc.take(P.Lk * P.D);
    T* s = sc.take(P.Lkp);
    T* keep = sc.take(P.Lkp);
    T* qrow = sc.take(P.D);
    T* acc = sc.take(P.D);
#ifdef MMFAST_HAVE_X86_ISAS
    if (isa == Isa::kAvx512) return forward_avx512<T>(P, o, begin, end, kt, vr, s, keep, qrow, acc);
    if (isa == Isa::kAvx2) return forward_avx2<T>(P, o, begin, end, kt, vr, s, keep, qrow, acc);
#endif
    forward_base<T>(P, o, begin, end, kt, vr, s, keep, qrow, acc);
  });
}

template <typename T>
void run_backward(const Problem& P, const BwdIn& g) {
  const int64_t tasks = P.B * P.H;
  const Isa isa = cpu_isa();
  torch::stable::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc;
    const int64_t LD = P.Lk * P.D, DL = P.D * P.Lkp;
    sc.buf.resize(2 * DL + 3 * LD + 3 * P.Lkp + 3 * P.D + 12 * 16);
    T* kt = sc.take(DL);
    T* vt = sc.take(DL);
    T* kr = sc.take(LD);
    T* dk = sc.take(LD);
    T* dv = sc.take(LD);
    T* s = sc.take(P.Lkp);
    T* dp = sc.take(P.Lkp);
    T* keep = sc.take(P.Lkp);
    T* qrow = sc.take(P.D);
    T* dorow = sc.take(P.D);
    T* dqrow = sc.take(P.D);
#ifdef MMFAST_HAVE_X86_ISAS
    if (isa == Isa::kAvx512)
      return backward_avx512<T>(P, g, begin, end, kt, vt, kr, dk, dv, s, dp, keep, qrow, dorow, dqrow);
    if (isa == Isa::kAvx2)
      return backward_avx2<T>(P, g, begin, end, kt, vt, kr, dk, dv, s, dp, keep, qrow, dorow, dqrow);
#endif
    backward_base<T>(P, g, begin, end, kt, vt, kr, dk, dv, s, dp, keep, qrow, dorow, dqrow);
  });
}

std::tuple<Tensor, Tensor> attention_forward_cpu(Tensor q, Tensor k, Tensor v, std::optional<Tensor> key_padding_mask,
                                                 std::optional<Tensor> seed, bool causal, double scale,
                                                 double dropout_p) {
  const Problem P = make_problem(q, k, v, key_padding_mask, seed, causal, scale, dropout_p);
  Tensor out = torch::stable::new_empty(q, {P.B, P.H, P.Lq, P.D});
  Tensor lse = torch::stable::new_empty(q, {P.B, P.H, P.Lq}, ScalarType::Float);
  if (P.B * P.H * P.Lq == 0) return {out, lse};
  if (q.scalar_type() == ScalarType::Double) {
    run_forward<double>(P, {out.data_ptr(), static_cast<float*>(lse.data_ptr())});
  } else {
    run_forward<float>(P, {out.data_ptr(), static_cast<float*>(lse.data_ptr())});
  }
  return {out, lse};
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
                        lse.size(1) == P.H && lse.size(2) == P.Lq && lse.is_contiguous(),
                    "lse", "expected the contiguous float32 (B, H, Lq) log-sum-exp of this face's forward");
  Tensor dq = torch::stable::new_empty(q, {P.B, P.H, P.Lq, P.D});
  Tensor dk = torch::stable::new_empty(q, {P.B, P.H, P.Lk, P.D});
  Tensor dv = torch::stable::new_empty(q, {P.B, P.H, P.Lk, P.D});
  if (P.B * P.H == 0) return {dq, dk, dv};
  if (P.Lq == 0) {  // no query: every key gradient is zero
    torch::stable::zero_(dk);
    torch::stable::zero_(dv);
    return {dq, dk, dv};
  }
  const BwdIn g{view4(grad_out), view4(out), static_cast<const float*>(lse.data_ptr()), dq.data_ptr(),
                dk.data_ptr(), dv.data_ptr()};
  if (q.scalar_type() == ScalarType::Double) {
    run_backward<double>(P, g);
  } else {
    run_backward<float>(P, g);
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace mmfast

STABLE_TORCH_LIBRARY_IMPL(mmfast_C, CPU, m) {
  m.impl("attention_forward", TORCH_BOX(&mmfast::attention_forward_cpu));
  m.impl("attention_backward", TORCH_BOX(&mmfast::attention_backward_cpu));
}
