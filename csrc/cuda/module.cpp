// Makes `import mmfast._C_cuda` work: the CUDA kernels are a library of their own, loaded after
// mmfast._C (which holds the schemas and the CPU kernels) and only when torch was built with CUDA,
// so a wheel with CUDA kernels still gives the C++ CPU faces under a CPU-only or other-CUDA torch.
// The kernels register through STABLE_TORCH_LIBRARY_IMPL(mmfast_C, CUDA, ...) in csrc/cuda/*.cu;
// only the Python limited API is used (cp310-abi3).
//
// It also holds the table of the kernels' launch configurations (csrc/cuda/launch_config.h),
// exported as plain C for `mmfast kernels-report`.
#include <Python.h>

#include <deque>
#include <string>
#include <vector>

#include "launch_config.h"

namespace mmfast {
namespace {

struct Declared {
  std::string op, kernel;
  LaunchConfig config;
};

// Filled by the static initialisers of the .cu files (a function-local static: constructed before
// its first use whatever the order of the translation units). A deque keeps the strings in place.
std::deque<Declared>& declared() {
  static std::deque<Declared> rows;
  return rows;
}

}  // namespace

void declare_launch(const char* op, const std::string& kernel, const LaunchConfig& config) {
  declared().push_back(Declared{op, kernel, config});
}

}  // namespace mmfast

// The table: *count rows, valid as long as the library is loaded. Only called after the static
// initialisers ran (the library is loaded), so the table is complete.
extern "C" __attribute__((visibility("default"))) const MmfastLaunchConfig* mmfast_cuda_launch_configs(
    int64_t* count) {
  static const std::vector<MmfastLaunchConfig> table = [] {
    std::vector<MmfastLaunchConfig> t;
    for (const auto& d : mmfast::declared())
      t.push_back(MmfastLaunchConfig{d.op.c_str(), d.kernel.c_str(), d.config.threads, d.config.dynamic_smem_bytes,
                                     d.config.min_blocks_per_sm});
    return t;
  }();
  *count = static_cast<int64_t>(table.size());
  return table.data();
}

extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
