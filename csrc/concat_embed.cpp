// Schemas of the fused feature-concatenation kernels. Implementations: csrc/cpu/concat_embed.cpp
// (CPU) and csrc/cuda/concat_embed.cu (CUDA). Python (mmfast/ops/concat_embed.py) validates the
// arguments, casts parameters to float32 and adds autograd, fake tensors and the mask concatenation.
#include "concat_embed.h"

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

namespace mmfast {

void check_concat_embed_inputs(const std::vector<Tensor>& features, const std::optional<Tensor>& type_emb,
                               const std::vector<Tensor>& pos_tables, const std::vector<int64_t>& pos_index,
                               const std::optional<Tensor>& ln_weight, const std::optional<Tensor>& ln_bias,
                               double dropout_p, const std::optional<Tensor>& seed, ScalarType param_dtype) {
  const int64_t M = static_cast<int64_t>(features.size());
  MMFAST_CHECK_ARG(M >= 1 && M <= kConcatEmbedMaxModalities, "features", "expected 1 to ",
                   kConcatEmbedMaxModalities, " modalities, got ", M);
  MMFAST_CHECK_ARG(static_cast<int64_t>(pos_index.size()) == M, "pos_index", "expected ", M, " entries, got ",
                   pos_index.size());
  const Tensor& f0 = features[0];
  check_dim(f0, "features", 3);
  const int64_t B = f0.size(0), D = f0.size(2);
  auto check_param = [&](const Tensor& t, const char* name) {
    MMFAST_CHECK_ARG(t.scalar_type() == param_dtype, name, "expected ", param_dtype, ", got ", t.scalar_type());
    MMFAST_CHECK_ARG(t.is_contiguous(), name, "expected a contiguous tensor");
    check_same_device(t, f0, name);
  };
  bool used[kConcatEmbedMaxModalities] = {};
  for (int64_t m = 0; m < M; ++m) {
    const Tensor& f = features[m];
    check_dim(f, "features", 3);
    MMFAST_CHECK_ARG(f.size(0) == B && f.size(2) == D, "features", "modality ", m, " has shape ", shape(f),
                     ", expected (", B, ", L, ", D, ")");
    MMFAST_CHECK_ARG(f.scalar_type() == f0.scalar_type(), "features", "modality ", m, " has dtype ",
                     f.scalar_type(), ", expected ", f0.scalar_type());
    MMFAST_CHECK_ARG(f.is_contiguous(), "features", "modality ", m, " is not contiguous");
    MMFAST_CHECK_ARG(f.size(1) >= 1, "features", "modality ", m, " has no tokens");
    check_same_device(f, f0, "features");
    const int64_t k = pos_index[m];
    if (k >= 0) {
      MMFAST_CHECK_ARG(k < static_cast<int64_t>(pos_tables.size()) && !used[k], "pos_index", "entry ", m, " = ", k,
                       " is out of range or repeated");
      used[k] = true;
      const Tensor& t = pos_tables[k];
      check_dim(t, "pos_tables", 2);
      MMFAST_CHECK_ARG(t.size(1) == D && t.size(0) >= f.size(1), "pos_tables", "table of modality ", m,
                       " has shape ", shape(t), ", expected (>= ", f.size(1), ", ", D, ")");
      check_param(t, "pos_tables");
    }
  }
  if (type_emb.has_value()) {
    check_dim(*type_emb, "type_emb", 2);
    MMFAST_CHECK_ARG(type_emb->size(0) >= M && type_emb->size(1) == D, "type_emb", "expected shape (>= ", M, ", ",
                     D, "), got ", shape(*type_emb));
    check_param(*type_emb, "type_emb");
  }
  if (ln_weight.has_value()) {
    MMFAST_CHECK_ARG(ln_weight->dim() == 1 && ln_weight->size(0) == D, "ln_weight", "expected shape (", D,
                     ",), got ", shape(*ln_weight));
    check_param(*ln_weight, "ln_weight");
  }
  if (ln_bias.has_value()) {
    MMFAST_CHECK_ARG(ln_weight.has_value(), "ln_bias", "given without ln_weight");
    MMFAST_CHECK_ARG(ln_bias->dim() == 1 && ln_bias->size(0) == D, "ln_bias", "expected shape (", D, ",), got ",
                     shape(*ln_bias));
    check_param(*ln_bias, "ln_bias");
  }
  MMFAST_CHECK_ARG(dropout_p >= 0.0 && dropout_p <= 1.0, "dropout_p", "expected a probability in [0, 1], got ",
                   dropout_p);
  if (dropout_p > 0.0) {
    MMFAST_CHECK_ARG(seed.has_value() && seed->scalar_type() == ScalarType::Long && seed->numel() >= 1, "seed",
                     "dropout_p > 0 needs a (1,) int64 seed tensor");
    check_same_device(*seed, f0, "seed");
  }
}

}  // namespace mmfast
