#pragma once
// Argument checks shared by the C++ kernels: every message names the argument and what was
// expected, because these errors reach users of the Python API unchanged.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define MMFAST_CHECK_ARG(cond, name, ...) \
  TORCH_CHECK(cond, "mmfast: argument '", name, "': ", __VA_ARGS__)

namespace mmfast {

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  MMFAST_CHECK_ARG(t.dim() == dim, name, "expected a ", dim, "-D tensor, got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  MMFAST_CHECK_ARG(t.device() == ref.device(), name, "expected device ", ref.device(), ", got ",
                   t.device());
}

}  // namespace mmfast
