// Makes `import mmfast._C_cuda` work: the CUDA kernels are a library of their own, loaded after
// mmfast._C (which holds the schemas and the CPU kernels) and only when torch was built with CUDA,
// so a wheel with CUDA kernels still gives the C++ CPU faces under a CPU-only or other-CUDA torch.
// The kernels register through STABLE_TORCH_LIBRARY_IMPL(mmfast_C, CUDA, ...) in csrc/cuda/*.cu;
// only the Python limited API is used (cp310-abi3).
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
