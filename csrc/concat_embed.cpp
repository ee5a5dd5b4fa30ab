// Schemas of the fused feature-concatenation kernels. Implementations: csrc/cpu/concat_embed.cpp
// (CPU) and csrc/cuda/concat_embed.cu (CUDA). Python (mmfast/ops/concat_embed.py) validates the
// arguments, casts parameters to float32 and adds autograd, fake tensors and the mask concatenation.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY_FRAGMENT(mmfast_C, m) {
  // features[m]: (B, L_m, D) contiguous, one dtype. type_emb: (>=M, D). pos_tables: the position
  // tables that exist, pos_index[m] = index into pos_tables of modality m's table, or -1; table k
  // has >= L_m rows. Parameters are contiguous float32 (float64 for float64 features).
  // LayerNorm over D when ln_weight is given (ln_bias optional). Dropout when dropout_p > 0, with
  // the keep mask hashed from seed (a (1,) int64 tensor on the features' device) and the flat
  // output index. Returns out (B, sum L_m, D) and, with LayerNorm, the per-row mean and rstd.
  m.def(
      "concat_embed_forward(Tensor[] features, Tensor? type_emb, Tensor[] pos_tables, int[] pos_index, "
      "Tensor? ln_weight, Tensor? ln_bias, float eps, float dropout_p, Tensor? seed) "
      "-> (Tensor out, Tensor mean, Tensor rstd)");
  // Gradients: [grad_features[0..M), grad_type (like type_emb, or (0,)), grad_pos[0..K) (like the
  // tables, rows >= L_m zero), grad_ln_weight (D,) or (0,), grad_ln_bias (D,) or (0,)]. Parameter
  // gradients are reduced in float32 in two fixed-order stages (deterministic).
  m.def(
      "concat_embed_backward(Tensor grad_out, Tensor[] features, Tensor? type_emb, Tensor[] pos_tables, "
      "int[] pos_index, Tensor? ln_weight, Tensor? ln_bias, Tensor mean, Tensor rstd, float dropout_p, "
      "Tensor? seed) -> Tensor[]");
}
