// Makes `import mmfast._C` work. The ops register themselves through STABLE_TORCH_LIBRARY_FRAGMENT /
// _IMPL in the per-family files when this shared library is loaded; no pybind11, and only the
// Python limited API (built with Py_LIMITED_API=3.10), so the same binary imports on every
// CPython >= 3.10 (the wheel is cp310-abi3).
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
