// Softmax cross-entropy, CPU face. One pass over a row computes max, sum(exp) and the sums
// label smoothing needs; a second pass writes the gradient. Rows run in parallel (OpenMP via
// at::parallel_for); accumulation is float32 (float64 for float64 logits).
//
// loss_i = (1-eps) * w[t] * (lse - x[t]) + eps/C * sum_j w[j] * (lse - x[j])
// grad_ij = (1-eps) * w[t] * (p_j - [j==t]) + eps/C * (W * p_j - w[j]),   W = sum_j w[j]
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common.h"

namespace mmfast {
namespace {

template <typename scalar_t, typename acc_t>
void cross_entropy_rows(const at::Tensor& logits, const at::Tensor& target, const float* weight,
                        int64_t ignore_index, double label_smoothing, bool compute_grad,
                        const float* grad_scale, int64_t grad_scale_stride, at::Tensor& loss,
                        at::Tensor& grad) {
  const int64_t N = logits.size(0), C = logits.size(1);
  const int64_t row_stride = logits.stride(0);  // int64: N*C may exceed 2^31
  const scalar_t* x_base = logits.const_data_ptr<scalar_t>();
  const int64_t* t_ptr = target.const_data_ptr<int64_t>();
  float* loss_ptr = loss.data_ptr<float>();
  scalar_t* g_base = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
  const acc_t eps = static_cast<acc_t>(label_smoothing);

  acc_t weight_total = static_cast<acc_t>(C);
  if (weight) {
    weight_total = 0;
    for (int64_t j = 0; j < C; ++j) weight_total += weight[j];
  }

  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* x = x_base + i * row_stride;
      scalar_t* g = compute_grad ? g_base + i * C : nullptr;
      const int64_t t = t_ptr[i];
      if (t == ignore_index) {
        loss_ptr[i] = 0.f;
        if (g) std::fill(g, g + C, scalar_t(0));
        continue;
      }
      // Checked here, not only in Python, so no caller can make us read out of bounds.
      MMFAST_CHECK_ARG(t >= 0 && t < C, "target", "class index ", t, " at row ", i,
                       " is outside [0, ", C, ") and is not ignore_index=", ignore_index);

      acc_t m = -std::numeric_limits<acc_t>::infinity();
      for (int64_t j = 0; j < C; ++j) m = std::max(m, static_cast<acc_t>(x[j]));
      // A row of -inf has no finite max; shifting by 0 keeps exp() well defined (loss = inf).
      const acc_t shift = std::isfinite(m) ? m : acc_t(0);
      // exp in acc_t, sums in double: a float running sum over 30522 classes loses ~1e-4
      // relative, several times eager's (vectorised, multi-accumulator) error.
      double sum_exp = 0, sum_wx = 0;
      for (int64_t j = 0; j < C; ++j) {
        const acc_t xj = static_cast<acc_t>(x[j]);
        sum_exp += std::exp(xj - shift);
        if (eps != 0) sum_wx += (weight ? weight[j] : acc_t(1)) * xj;
      }
      const acc_t lse = shift + static_cast<acc_t>(std::log(sum_exp));
      const acc_t w_t = weight ? static_cast<acc_t>(weight[t]) : acc_t(1);
      const acc_t x_t = static_cast<acc_t>(x[t]);
      acc_t row_loss = (1 - eps) * w_t * (lse - x_t);
      if (eps != 0) row_loss += eps / C * (weight_total * lse - static_cast<acc_t>(sum_wx));
      loss_ptr[i] = static_cast<float>(row_loss);

      if (g) {
        const acc_t scale = grad_scale ? grad_scale[i * grad_scale_stride] : acc_t(1);
        const acc_t a = (1 - eps) * w_t;           // coefficient of p_j from the target term
        const acc_t b = eps / C * weight_total;    // ... and from the smoothing term
        for (int64_t j = 0; j < C; ++j) {
          const acc_t p = std::exp(static_cast<acc_t>(x[j]) - lse);
          acc_t gj = (a + b) * p;
          if (eps != 0) gj -= eps / C * (weight ? weight[j] : acc_t(1));
          if (j == t) gj -= a;
          g[j] = static_cast<scalar_t>(gj * scale);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, bool compute_grad,
    const std::optional<at::Tensor>& grad_scale) {
  check_dim(logits, "logits", 2);
  check_dim(target, "target", 1);
  MMFAST_CHECK_ARG(logits.stride(1) == 1 || logits.size(1) <= 1, "logits",
                   "expected unit stride along the class dimension, got strides ", logits.strides());
  MMFAST_CHECK_ARG(target.size(0) == logits.size(0), "target", "expected ", logits.size(0),
                   " entries (one per row of logits), got ", target.size(0));
  MMFAST_CHECK_ARG(target.scalar_type() == at::kLong, "target", "expected int64, got ",
                   target.scalar_type());
  check_same_device(target, logits, "target");
  const int64_t N = logits.size(0), C = logits.size(1);
  at::Tensor target_c = target.contiguous();

  at::Tensor weight_c;
  if (weight.has_value()) {
    weight_c = weight->contiguous();
    MMFAST_CHECK_ARG(weight_c.dim() == 1 && weight_c.size(0) == C, "weight",
                     "expected shape (", C, ",), got ", weight_c.sizes());
    MMFAST_CHECK_ARG(weight_c.scalar_type() == at::kFloat, "weight", "expected float32, got ",
                     weight_c.scalar_type());
    check_same_device(weight_c, logits, "weight");
  }
  at::Tensor scale_c;
  int64_t scale_stride = 0;
  if (grad_scale.has_value()) {
    scale_c = grad_scale->contiguous();
    MMFAST_CHECK_ARG(scale_c.scalar_type() == at::kFloat, "grad_scale", "expected float32");
    MMFAST_CHECK_ARG(scale_c.numel() == 1 || scale_c.numel() == N, "grad_scale",
                     "expected 1 or ", N, " elements, got ", scale_c.numel());
    scale_stride = scale_c.numel() == 1 ? 0 : 1;
  }

  at::Tensor loss = at::empty({N}, logits.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty({N, C}, logits.options()) : at::empty({0}, logits.options());
  if (N == 0) return {loss, grad};
  MMFAST_CHECK_ARG(C > 0, "logits", "expected at least one class, got shape ", logits.sizes());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cross_entropy_rows<scalar_t, acc_t>(
        logits, target_c, weight.has_value() ? weight_c.const_data_ptr<float>() : nullptr,
        ignore_index, label_smoothing, compute_grad,
        grad_scale.has_value() ? scale_c.const_data_ptr<float>() : nullptr, scale_stride, loss, grad);
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast_C, CPU, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward_cpu);
}

}  // namespace mmfast
