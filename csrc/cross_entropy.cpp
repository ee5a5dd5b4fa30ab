// Schemas of the softmax cross-entropy kernels. Implementations: csrc/cpu/cross_entropy.cpp
// (CPU) and csrc/cuda/cross_entropy.cu (CUDA). Python (mmfast/ops/cross_entropy.py) adds the
// reductions, autograd and fake-tensor registrations on top.
#include <torch/library.h>

#include "common.h"
#include "cross_entropy.h"

TORCH_LIBRARY_FRAGMENT(mmfast_C, m) {
  // Per-row loss and, when compute_grad, d(loss_i)/d(logits_i) times grad_scale (a 0-d or (N,)
  // float32 tensor, or None for 1). logits: (N, C) with unit stride along C; target: (N,) int64;
  // weight: (C,) float32. Ignored rows get loss 0 and a zero gradient.
  m.def(
      "cross_entropy_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, bool compute_grad, Tensor? grad_scale) -> (Tensor loss, Tensor grad)");
  // Same, but the gradient overwrites `logits` (used by inplace_backward=True and by
  // linear_cross_entropy on its private chunk buffers). Returns the per-row loss.
  m.def(
      "cross_entropy_forward_inplace(Tensor(a!) logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, Tensor? grad_scale) -> Tensor loss");
}

namespace mmfast {

CrossEntropyInputs check_cross_entropy_inputs(const at::Tensor& logits, const at::Tensor& target,
                                              const std::optional<at::Tensor>& weight,
                                              const std::optional<at::Tensor>& grad_scale) {
  check_dim(logits, "logits", 2);
  check_dim(target, "target", 1);
  MMFAST_CHECK_ARG(logits.stride(1) == 1 || logits.size(1) <= 1, "logits",
                   "expected unit stride along the class dimension, got strides ", logits.strides());
  MMFAST_CHECK_ARG(target.size(0) == logits.size(0), "target", "expected ", logits.size(0),
                   " entries (one per row of logits), got ", target.size(0));
  MMFAST_CHECK_ARG(target.scalar_type() == at::kLong, "target", "expected int64, got ", target.scalar_type());
  check_same_device(target, logits, "target");
  const int64_t N = logits.size(0), C = logits.size(1);
  CrossEntropyInputs c;
  c.target = target.contiguous();
  if (weight.has_value()) {
    c.weight = weight->contiguous();
    MMFAST_CHECK_ARG(c.weight.dim() == 1 && c.weight.size(0) == C, "weight", "expected shape (", C, ",), got ",
                     c.weight.sizes());
    MMFAST_CHECK_ARG(c.weight.scalar_type() == at::kFloat, "weight", "expected float32, got ", c.weight.scalar_type());
    check_same_device(c.weight, logits, "weight");
  }
  if (grad_scale.has_value()) {
    c.scale = grad_scale->contiguous();
    MMFAST_CHECK_ARG(c.scale.scalar_type() == at::kFloat, "grad_scale", "expected float32, got ",
                     c.scale.scalar_type());
    MMFAST_CHECK_ARG(c.scale.numel() == 1 || c.scale.numel() == N, "grad_scale", "expected 1 or ", N,
                     " elements, got ", c.scale.numel());
    check_same_device(c.scale, logits, "grad_scale");
    c.scale_stride = c.scale.numel() == 1 ? 0 : 1;
  }
  if (N > 0) MMFAST_CHECK_ARG(C > 0, "logits", "expected at least one class, got shape ", logits.sizes());
  return c;
}

}  // namespace mmfast
