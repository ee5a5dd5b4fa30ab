// mmfast_C::cpu_isa(): which instruction set the C++ CPU faces run (0 baseline x86-64, 1 AVX2+FMA,
// 2 AVX-512), so tests and benchmarks can say which code ran.
#include <torch/csrc/stable/library.h>

#include <cstdint>

#include "isa.h"

namespace mmfast {
namespace {
int64_t cpu_isa_op() { return static_cast<int64_t>(cpu_isa()); }
}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(mmfast_C, m) { m.def("cpu_isa() -> int"); }

STABLE_TORCH_LIBRARY_IMPL(mmfast_C, CompositeExplicitAutograd, m) { m.impl("cpu_isa", TORCH_BOX(&cpu_isa_op)); }

}  // namespace mmfast
