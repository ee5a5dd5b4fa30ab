// Makes `import mmfast._C` work. The ops register themselves through TORCH_LIBRARY_FRAGMENT
// in the per-family files when this shared library is loaded; no pybind11 needed.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
