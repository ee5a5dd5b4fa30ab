// Schemas of the softmax cross-entropy kernels. Implementations: csrc/cpu/cross_entropy.cpp
// (CPU) and csrc/cuda/cross_entropy.cu (CUDA). Python (mmfast/ops/cross_entropy.py) adds the
// reductions, autograd and fake-tensor registrations on top.
#include "cross_entropy.h"

STABLE_TORCH_LIBRARY_FRAGMENT(mmfast_C, m) {
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

CrossEntropyInputs check_cross_entropy_inputs(const Tensor& logits, const Tensor& target,
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
  c.target = torch::stable::contiguous(target);
  if (weight.has_value()) {
    const Tensor w = torch::stable::contiguous(*weight);
    MMFAST_CHECK_ARG(w.dim() == 1 && w.size(0) == C, "weight", "expected shape (", C, ",), got ", shape(w));
    MMFAST_CHECK_ARG(w.scalar_type() == ScalarType::Float, "weight", "expected float32, got ", w.scalar_type());
    check_same_device(w, logits, "weight");
    c.weight = w;
  }
  if (grad_scale.has_value()) {
    const Tensor s = torch::stable::contiguous(*grad_scale);
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
