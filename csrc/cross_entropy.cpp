// Schemas of the softmax cross-entropy kernels. Implementations: csrc/cpu/cross_entropy.cpp
// (CPU) and csrc/cuda/cross_entropy.cu (CUDA). Python (mmfast/ops/cross_entropy.py) adds the
// reductions, autograd and fake-tensor registrations on top.
#include <torch/csrc/stable/library.h>

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
