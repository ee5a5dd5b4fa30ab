// Schemas of the fused attention kernels. Implementation: csrc/cuda/attention.cu (CUDA, fp16/bf16,
// tensor-core MMA). The CPU face is Python (SDPA) in mmfast/ops/attention.py, which also adds the
// autograd and fake-tensor registrations on top of these.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mmfast_C, m) {
  // q (B, H, Lq, D), k/v (B, H, Lk, D), any strides; key_padding_mask bool (B, Lk), True = attend;
  // causal aligned bottom-right. Returns out (B, H, Lq, D) contiguous and lse (B, H, Lq) float32
  // in base 2 of the scaled scores (0 for a row without visible keys, whose output is 0).
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal, "
      "float scale) -> (Tensor out, Tensor lse)");
  // Recomputing backward from (out, lse): returns dq, dk, dv contiguous.
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, bool causal, float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
}
