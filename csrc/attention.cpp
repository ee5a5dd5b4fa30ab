// Schemas of the fused attention kernels, shared by the C++ faces: csrc/cuda/attention.cu (CUDA) and,
// where built, csrc/cpu/attention.cpp (CPU). mmfast/ops/attention.py adds the autograd and fake-tensor
// registrations on top of these. Stable ABI: nothing here depends on the torch version it loads into.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY_FRAGMENT(mmfast_C, m) {
  // q (B, H, Lq, D), k/v (B, H, Lk, D), any strides; key_padding_mask bool (B, Lk), True = attend;
  // causal aligned bottom-right; seed int64 (1,) when dropout_p > 0 (the mask is the Philox contract of
  // csrc/philox.h). Returns out (B, H, Lq, D) contiguous and lse (B, H, Lq) float32 (0 for a row without
  // visible keys, whose output is 0); only the same face's backward reads lse.
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? seed, bool causal, "
      "float scale, float dropout_p) -> (Tensor out, Tensor lse)");
  // Recomputing backward from (out, lse), the dropout mask regenerated from the seed: dq, dk, dv contiguous.
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, Tensor? seed, bool causal, float scale, float dropout_p) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  // Packed (variable-length) sequences, csrc/cuda/attention_varlen.cu (the contract of
  // mmfast/ops/attention_varlen.py): q (total_q, H, D), k/v (total_k, H, D); cu_seqlens_q/k int32
  // (batch + 1,) on q's device, values checked by the caller; max_seqlen_* at least the longest
  // sequence; causal bottom-right per sequence; dropout bh = b * H + h with rows and columns counted
  // within sequence b. Returns out (total_q, H, D) contiguous and lse (H, total_q) float32.
  m.def(
      "attention_varlen_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, Tensor? seed, bool causal, float scale, float dropout_p) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "attention_varlen_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor? seed, bool causal, "
      "float scale, float dropout_p) -> (Tensor dq, Tensor dk, Tensor dv)");
}
