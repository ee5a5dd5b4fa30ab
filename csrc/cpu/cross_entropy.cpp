// Softmax cross-entropy, CPU face. Rows run in parallel (torch's thread pool). Per row:
//   pass 1  max over the row (reads the row from memory; it then stays in L2),
//   pass 2  e_j = exp(x_j - max) written straight into the gradient row, sum(e) and the sums
//           label smoothing needs,
//   pass 3  gradient from e_j in place (no second exp).
// float32 rows use AVX2+FMA intrinsics when the CPU has them (cpu_isa() in isa.h, so the
// binary stays portable without -march flags); float16/bfloat16 rows are converted to a float32
// scratch row first; float64 keeps a scalar double path. Sums are accumulated per 256-element
// block in float vectors, then in double, so 30522 classes lose no more than eager does.
//
// loss_i = (1-eps) * w[t] * (lse - x[t]) + eps/C * sum_j w[j] * (lse - x[j])
// grad_ij = (1-eps) * w[t] * (p_j - [j==t]) + eps/C * (W * p_j - w[j]),   W = sum_j w[j]
//
// Matches torch: a row containing +inf or NaN, or made only of -inf, gives NaN.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MMFAST_X86 1
#endif

#include "common.h"
#include "cross_entropy.h"
#include "isa.h"

namespace mmfast {
namespace {

struct RowParams {
  int64_t C;
  const float* w;      // class weights or nullptr
  float weight_total;  // sum of w (C when unweighted)
  float eps;           // label smoothing
};

// ------------------------------------------------------------------ shared by both float32 rows
// e_j = exp(x_j - m) for j in [begin, C), stored into g when given, summed into `sum`; with label
// smoothing also sum_wx += w_j * x_j. Doubles across the row keep 30522-class sums accurate.
inline void accumulate_exp(const float* x, float* g, int64_t begin, float m, const RowParams& p, double& sum,
                           double& sum_wx) {
  for (int64_t j = begin; j < p.C; ++j) {
    const float xj = x[j];
    const float e = std::exp(xj - m);
    if (p.eps != 0.f) sum_wx += static_cast<double>(p.w ? p.w[j] : 1.f) * xj;
    sum += e;
    if (g) g[j] = e;
  }
}

// loss = (1-eps) w_t (lse - x_t) + eps/C (W lse - sum_j w_j x_j); *a = (1-eps) w_t for the gradient.
inline float row_loss(float m, double sum, double sum_wx, float x_t, int64_t t, const RowParams& p, float* a) {
  const float lse = m + static_cast<float>(std::log(sum));
  *a = (1.f - p.eps) * (p.w ? p.w[t] : 1.f);
  float loss = *a * (lse - x_t);
  if (p.eps != 0.f) loss += p.eps / p.C * static_cast<float>(p.weight_total * static_cast<double>(lse) - sum_wx);
  return loss;
}

// ------------------------------------------------------------------ portable float32 row
// g may alias x (in-place); g == nullptr: loss only. t is a valid class index.
float ce_row_f32_scalar(const float* x, float* g, int64_t t, float scale, const RowParams& p) {
  const int64_t C = p.C;
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < C; ++j) m = x[j] > m ? x[j] : m;
  if (std::isnan(m) || m == -std::numeric_limits<float>::infinity()) m = std::numeric_limits<float>::quiet_NaN();
  const float x_t = x[t];
  double sum = 0, sum_wx = 0;
  accumulate_exp(x, g, 0, m, p, sum, sum_wx);
  float a;
  const float loss = row_loss(m, sum, sum_wx, x_t, t, p, &a);
  if (g) {
    const float c = (a + p.eps / C * p.weight_total) * scale / static_cast<float>(sum);
    const float d = p.eps / C * scale;
    for (int64_t j = 0; j < C; ++j) g[j] = g[j] * c - (p.eps != 0.f ? d * (p.w ? p.w[j] : 1.f) : 0.f);
    g[t] -= a * scale;
  }
  return loss;
}

#ifdef MMFAST_X86
// ------------------------------------------------------------------ AVX2 + FMA float32 row
#define MMFAST_AVX2 __attribute__((target("avx2,fma")))

// exp(x) for x <= 0 (Cephes' expf polynomial, ~1 ulp). NaN propagates; x below -87.3 gives a
// value below FLT_MIN (the softmax sums are >= 1, so this is exact to float precision).
MMFAST_AVX2 static inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x);   // operand order keeps NaN
  x = _mm256_max_ps(_mm256_set1_ps(-87.3365447505531f), x);
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  __m256i n = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
}

MMFAST_AVX2 static inline float hmax256(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

MMFAST_AVX2 static inline double hsum256_d(__m256 v) {
  __m256d a = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

MMFAST_AVX2 float ce_row_f32_avx2(const float* x, float* g, int64_t t, float scale, const RowParams& p) {
  const int64_t C = p.C;
  const int64_t C8 = C & ~int64_t(7);
  // pass 1: max (four accumulators hide the max latency)
  __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 32 <= C; j += 32) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + j));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + j + 8));
    m2 = _mm256_max_ps(m2, _mm256_loadu_ps(x + j + 16));
    m3 = _mm256_max_ps(m3, _mm256_loadu_ps(x + j + 24));
  }
  for (; j < C8; j += 8) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + j));
  float m = hmax256(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
  for (; j < C; ++j) m = x[j] > m ? x[j] : m;
  // torch computes x - max: -inf - -inf (a row of -inf) is NaN there too.
  if (m == -INFINITY) m = NAN;
  const float x_t = x[t];  // read before pass 2 may overwrite x (in place)

  // pass 2: e = exp(x - m) into g, sums per 256-element block in float, across blocks in double
  const __m256 vm = _mm256_set1_ps(m);
  const bool smooth = p.eps != 0.f;
  double sum = 0, sum_wx = 0;
  for (int64_t b = 0; b < C8; b += 256) {
    const int64_t bend = std::min<int64_t>(b + 256, C8);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, sw = s0;
    int64_t k = b;
    for (; k + 16 <= bend; k += 16) {
      const __m256 xa = _mm256_loadu_ps(x + k), xb = _mm256_loadu_ps(x + k + 8);
      const __m256 ea = exp256(_mm256_sub_ps(xa, vm)), eb = exp256(_mm256_sub_ps(xb, vm));
      if (smooth) {
        if (p.w) {
          sw = _mm256_fmadd_ps(_mm256_loadu_ps(p.w + k), xa, sw);
          sw = _mm256_fmadd_ps(_mm256_loadu_ps(p.w + k + 8), xb, sw);
        } else {
          sw = _mm256_add_ps(sw, _mm256_add_ps(xa, xb));
        }
      }
      s0 = _mm256_add_ps(s0, ea);
      s1 = _mm256_add_ps(s1, eb);
      if (g) {
        _mm256_storeu_ps(g + k, ea);
        _mm256_storeu_ps(g + k + 8, eb);
      }
    }
    for (; k < bend; k += 8) {
      const __m256 xa = _mm256_loadu_ps(x + k);
      const __m256 ea = exp256(_mm256_sub_ps(xa, vm));
      if (smooth) sw = p.w ? _mm256_fmadd_ps(_mm256_loadu_ps(p.w + k), xa, sw) : _mm256_add_ps(sw, xa);
      s0 = _mm256_add_ps(s0, ea);
      if (g) _mm256_storeu_ps(g + k, ea);
    }
    sum += hsum256_d(_mm256_add_ps(s0, s1));
    if (smooth) sum_wx += hsum256_d(sw);
  }
  accumulate_exp(x, g, C8, m, p, sum, sum_wx);  // the last C % 8 classes

  float a;
  const float loss = row_loss(m, sum, sum_wx, x_t, t, p, &a);
  if (!g) return loss;

  // pass 3: g = e * c - d * w   (the row is in L2 now)
  const float c = (a + p.eps / C * p.weight_total) * scale / static_cast<float>(sum);
  const float d = p.eps / C * scale;
  const __m256 vc = _mm256_set1_ps(c), vd = _mm256_set1_ps(d);
  if (!smooth) {
    for (j = 0; j < C8; j += 8) _mm256_storeu_ps(g + j, _mm256_mul_ps(_mm256_loadu_ps(g + j), vc));
    for (; j < C; ++j) g[j] *= c;
  } else if (p.w) {
    for (j = 0; j < C8; j += 8)
      _mm256_storeu_ps(g + j, _mm256_fmsub_ps(_mm256_loadu_ps(g + j), vc, _mm256_mul_ps(vd, _mm256_loadu_ps(p.w + j))));
    for (; j < C; ++j) g[j] = g[j] * c - d * p.w[j];
  } else {
    for (j = 0; j < C8; j += 8) _mm256_storeu_ps(g + j, _mm256_fmsub_ps(_mm256_loadu_ps(g + j), vc, vd));
    for (; j < C; ++j) g[j] = g[j] * c - d;
  }
  g[t] -= a * scale;
  return loss;
}
#endif

using RowFn = float (*)(const float*, float*, int64_t, float, const RowParams&);

RowFn pick_row_fn() {
#ifdef MMFAST_X86
  if (cpu_isa() != Isa::kBase) return &ce_row_f32_avx2;  // AVX-512 CPUs run the AVX2 row
#endif
  return &ce_row_f32_scalar;
}

// ------------------------------------------------------------------ float64 rows (scalar)
double ce_row_f64(const double* x, double* g, int64_t t, double scale, int64_t C, const float* w,
                  double weight_total, double eps) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < C; ++j) m = x[j] > m ? x[j] : m;
  if (m == -std::numeric_limits<double>::infinity()) m = std::numeric_limits<double>::quiet_NaN();
  const double x_t = x[t];
  double sum = 0, sum_wx = 0;
  for (int64_t j = 0; j < C; ++j) {
    const double e = std::exp(x[j] - m);
    if (eps != 0) sum_wx += (w ? w[j] : 1.0) * x[j];
    sum += e;
    if (g) g[j] = e;
  }
  const double lse = m + std::log(sum);
  const double a = (1 - eps) * (w ? w[t] : 1.0);
  double loss = a * (lse - x_t);
  if (eps != 0) loss += eps / C * (weight_total * lse - sum_wx);
  if (g) {
    const double c = (a + eps / C * weight_total) * scale / sum, d = eps / C * scale;
    for (int64_t j = 0; j < C; ++j) g[j] = g[j] * c - (eps != 0 ? d * (w ? w[j] : 1.0) : 0.0);
    g[t] -= a * scale;
  }
  return loss;
}

// ------------------------------------------------------------------ driver
// grad: nullptr (loss only), a separate (N, C) buffer, or the logits themselves (in place).
template <typename scalar_t, typename loss_t>
void cross_entropy_rows(const scalar_t* x_base, int64_t x_stride, scalar_t* g_base, int64_t g_stride,
                        int64_t N, int64_t C, const int64_t* t_ptr, const float* weight,
                        int64_t ignore_index, double label_smoothing, const float* grad_scale,
                        int64_t grad_scale_stride, loss_t* loss_ptr) {
  double weight_total = static_cast<double>(C);
  if (weight) {
    weight_total = 0;
    for (int64_t j = 0; j < C; ++j) weight_total += weight[j];
  }
  const RowParams params{C, weight, static_cast<float>(weight_total), static_cast<float>(label_smoothing)};
  const RowFn row_fn = pick_row_fn();
  // Grain: about 64K elements per task so small-C batches are not split into tiny tasks.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(C, 1));

  parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;  // float32 copy of a float16/bfloat16 row
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* x = x_base + i * x_stride;  // int64 offsets: N*C may exceed 2^31
      scalar_t* g = g_base ? g_base + i * g_stride : nullptr;
      const int64_t t = t_ptr[i];
      if (t == ignore_index) {
        loss_ptr[i] = 0.f;
        if (g) std::fill(g, g + C, scalar_t(0));
        continue;
      }
      // Checked here, not only in Python, so no caller can make us read out of bounds.
      MMFAST_CHECK_ARG(t >= 0 && t < C, "target", "class index ", t, " at row ", i,
                       " is outside [0, ", C, ") and is not ignore_index=", ignore_index);
      const float scale = grad_scale ? grad_scale[i * grad_scale_stride] : 1.f;
      if constexpr (std::is_same_v<scalar_t, double>) {
        loss_ptr[i] = ce_row_f64(x, g, t, scale, C, weight, weight_total, label_smoothing);
      } else if constexpr (std::is_same_v<scalar_t, float>) {
        loss_ptr[i] = row_fn(x, g, t, scale, params);
      } else {
        scratch.resize(C);
        for (int64_t j = 0; j < C; ++j) scratch[j] = static_cast<float>(x[j]);
        loss_ptr[i] = row_fn(scratch.data(), g ? scratch.data() : nullptr, t, scale, params);
        if (g)
          for (int64_t j = 0; j < C; ++j) g[j] = static_cast<scalar_t>(scratch[j]);
      }
    }
  });
}


// float64 logits get a float64 loss (gradcheck-able); everything else a float32 loss
ScalarType loss_dtype(const Tensor& logits) {
  return logits.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

void launch(const Tensor& logits, const Tensor* grad, const CrossEntropyInputs& c, int64_t ignore_index,
            double label_smoothing, const Tensor& loss) {
  const int64_t N = logits.size(0), C = logits.size(1);
  if (N == 0) return;
  dispatch_floating(logits.scalar_type(), "logits", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using loss_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cross_entropy_rows<scalar_t, loss_t>(
        logits.const_data_ptr<scalar_t>(), logits.stride(0), grad ? grad->mutable_data_ptr<scalar_t>() : nullptr,
        grad ? grad->stride(0) : 0, N, C, c.target.const_data_ptr<int64_t>(),
        c.weight ? c.weight->const_data_ptr<float>() : nullptr, ignore_index, label_smoothing,
        c.scale ? c.scale->const_data_ptr<float>() : nullptr, c.scale_stride, loss.mutable_data_ptr<loss_t>());
  });
}

std::tuple<Tensor, Tensor> cross_entropy_forward_cpu(const Tensor& logits, const Tensor& target,
                                                     const std::optional<Tensor>& weight, int64_t ignore_index,
                                                     double label_smoothing, bool compute_grad,
                                                     const std::optional<Tensor>& grad_scale) {
  const CrossEntropyInputs c = check_cross_entropy_inputs(logits, target, weight, grad_scale);
  const int64_t N = logits.size(0), C = logits.size(1);
  const Tensor loss = empty({N}, loss_dtype(logits), logits);
  const Tensor grad = compute_grad ? empty({N, C}, logits.scalar_type(), logits) : empty({0}, logits.scalar_type(), logits);
  launch(logits, compute_grad ? &grad : nullptr, c, ignore_index, label_smoothing, loss);
  return {loss, grad};
}

Tensor cross_entropy_forward_inplace_cpu(const Tensor& logits, const Tensor& target,
                                         const std::optional<Tensor>& weight, int64_t ignore_index,
                                         double label_smoothing, const std::optional<Tensor>& grad_scale) {
  const CrossEntropyInputs c = check_cross_entropy_inputs(logits, target, weight, grad_scale);
  const Tensor loss = empty({logits.size(0)}, loss_dtype(logits), logits);
  launch(logits, &logits, c, ignore_index, label_smoothing, loss);  // each row is read completely before its gradient is written
  return loss;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(mmfast_C, CPU, m) {
  m.impl("cross_entropy_forward", TORCH_BOX(&cross_entropy_forward_cpu));
  m.impl("cross_entropy_forward_inplace", TORCH_BOX(&cross_entropy_forward_inplace_cpu));
}

}  // namespace mmfast
