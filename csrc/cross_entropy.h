#pragma once
// Argument checks shared by the CPU and CUDA faces of cross_entropy_forward (defined in
// csrc/cross_entropy.cpp), so both reject bad input with the same messages.
#include <optional>

#include "common.h"

namespace mmfast {

struct CrossEntropyInputs {
  Tensor target;                 // contiguous
  std::optional<Tensor> weight;  // contiguous, when given
  std::optional<Tensor> scale;   // contiguous, when given
  int64_t scale_stride = 0;      // 0: one scale for all rows; 1: one per row
};

CrossEntropyInputs check_cross_entropy_inputs(const Tensor& logits, const Tensor& target,
                                              const std::optional<Tensor>& weight,
                                              const std::optional<Tensor>& grad_scale);

}  // namespace mmfast
