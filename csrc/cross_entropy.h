#pragma once
// Argument checks shared by the CPU and CUDA faces of cross_entropy_forward (defined in
// csrc/cross_entropy.cpp), so both reject bad input with the same messages.
#include <ATen/core/Tensor.h>

#include <optional>

namespace mmfast {

struct CrossEntropyInputs {
  at::Tensor target, weight, scale;  // contiguous; weight/scale undefined when absent
  int64_t scale_stride = 0;          // 0: one scale for all rows; 1: one per row
};

CrossEntropyInputs check_cross_entropy_inputs(const at::Tensor& logits, const at::Tensor& target,
                                              const std::optional<at::Tensor>& weight,
                                              const std::optional<at::Tensor>& grad_scale);

}  // namespace mmfast
