// The `minissl` operator library: its schemas (schemas.h) and the dummy Python module of the CPU extension.
//
// Every op is declared here exactly once; each backend registers its kernels in its own translation
// unit with TORCH_LIBRARY_IMPL(minissl, CPU|CUDA, m): cpu/dense.cpp, cpu/geometry.cpp and (only when
// torch has CUDA) cuda/bindings.cpp. An op whose kernel was not compiled has a schema but no kernel;
// minissl/ops/_build.py sees that and the Python side falls back to minissl/ops/reference.py.
// The schemas themselves are in schemas.h.
#include <Python.h>
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(minissl, m) { minissl::define_ops(m); }

// A dummy Python module so the shared object can also be imported as a module (the build loads it
// with torch.ops.load_library, which runs the static registrations above).
#define MINISSL_CONCAT_(a, b) a##b
#define MINISSL_CONCAT(a, b) MINISSL_CONCAT_(a, b)
extern "C" PyObject* MINISSL_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "minissl_ext", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
