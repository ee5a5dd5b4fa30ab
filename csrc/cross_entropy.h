#pragma once
// Argument checks shared by the CPU and CUDA faces of cross_entropy_forward (schema in
// csrc/cross_entropy.cpp), so both reject bad input with the same messages. Inline: the CPU and
// CUDA faces live in two libraries (_C and _C_cuda).
#include <optional>

#include "common.h"

namespace mmfast {

struct CrossEntropyInputs {
  Tensor target;                 // contiguous
  std::optional<Tensor> weight;  // contiguous, when given
  std::optional<Tensor> scale;   // contiguous, when given
  int64_t scale_stride = 0;      // 0: one scale for all rows; 1: one per row
};

inline CrossEntropyInputs check_cross_entropy_inputs(const Tensor& logits, const Tensor& target,
                                                     const std::optional<Tensor>& weight,
                                                     const std::optional<Tensor>& grad_scale) {
  check_dim(logits, "logits", 2);
  check_dim(target, "target", 1);
  MMFAST_CHECK_ARG(logits.stride(1) == 1 || logits.size(1) <= 1, "logits",
                   "expected unit stride along the class dimension, got strides ", strides(logits));
  MMFAST_CHECK_ARG(target.size(0) == logits.size(0), "target", "expected ", logits.size(0),
                   " entries (one per row of logits), got ", target.size(0));
  MMFAST_CHECK_ARG(target.scalar_type() == ScalarType::Long, "target", "expected int64, got ",
                   target.scalar_type());
  check_same_device(target, logits, "target");
  const int64_t N = logits.size(0), C = logits.size(1);
  CrossEntropyInputs c;
  c.target = as_contiguous(target);
  if (weight.has_value()) {
    const Tensor w = as_contiguous(*weight);
    MMFAST_CHECK_ARG(w.dim() == 1 && w.size(0) == C, "weight", "expected shape (", C, ",), got ", shape(w));
    MMFAST_CHECK_ARG(w.scalar_type() == ScalarType::Float, "weight", "expected float32, got ", w.scalar_type());
    check_same_device(w, logits, "weight");
    c.weight = w;
  }
  if (grad_scale.has_value()) {
    const Tensor s = as_contiguous(*grad_scale);
    MMFAST_CHECK_ARG(s.scalar_type() == ScalarType::Float, "grad_scale", "expected float32, got ", s.scalar_type());
    MMFAST_CHECK_ARG(s.numel() == 1 || s.numel() == N, "grad_scale", "expected 1 or ", N, " elements, got ",
                     s.numel());
    check_same_device(s, logits, "grad_scale");
    c.scale_stride = s.numel() == 1 ? 0 : 1;
    c.scale = s;
  }
  if (N > 0) MMFAST_CHECK_ARG(C > 0, "logits", "expected at least one class, got shape ", shape(logits));
  return c;
}

}  // namespace mmfast
