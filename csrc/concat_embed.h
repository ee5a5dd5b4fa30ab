#pragma once
// Argument checks shared by the CPU and CUDA faces of concat_embed (defined in
// csrc/concat_embed.cpp). The Python layer checks too, with friendlier messages; these keep any
// caller of torch.ops.mmfast_C.* from reading out of bounds.
#include <optional>
#include <vector>

#include "common.h"

namespace mmfast {

constexpr int64_t kConcatEmbedMaxModalities = 4;

// param_dtype: the dtype the face expects for type/position tables and LayerNorm parameters.
void check_concat_embed_inputs(const std::vector<Tensor>& features, const std::optional<Tensor>& type_emb,
                               const std::vector<Tensor>& pos_tables, const std::vector<int64_t>& pos_index,
                               const std::optional<Tensor>& ln_weight, const std::optional<Tensor>& ln_bias,
                               double dropout_p, const std::optional<Tensor>& seed, ScalarType param_dtype);

}  // namespace mmfast
