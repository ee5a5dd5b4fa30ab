#pragma once
// Argument checks shared by the CPU and CUDA faces of concat_embed (schema in
// csrc/concat_embed.cpp). The Python layer checks too, with friendlier messages; these keep any
// caller of torch.ops.mmfast_C.* from reading out of bounds. Inline: the CPU and CUDA faces live in
// two libraries (_C and _C_cuda).
#include <optional>
#include <vector>

#include "common.h"

namespace mmfast {

constexpr int64_t kConcatEmbedMaxModalities = 4;

// param_dtype: the dtype the face expects for type/position tables and LayerNorm parameters.
inline void check_concat_embed_inputs(const std::vector<Tensor>& features, const std::optional<Tensor>& type_emb,
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
