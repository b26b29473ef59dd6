// Shared by the compiled ops. The modules use the plain CPython API and take raw data
// pointers, sizes and scalars from their Python wrappers (which own dtype, layout and
// autograd): this keeps each build to a few seconds instead of the minutes that
// <torch/extension.h> takes to compile.
#pragma once
#include <Python.h>
#include <cstdint>
#include <stdexcept>
#include <string>
#if defined(__x86_64__) || defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace plugin {

enum DType { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Floor division and modulo for a positive divisor (C++ truncates towards zero).
inline int64_t floordiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t floormod(int64_t a, int64_t b) { return a - floordiv(a, b) * b; }

// Flush denormal inputs and results to zero on this thread while a kernel's loop runs: Intel
// cores take a microcode assist of ~150 cycles per vector holding a denormal, and vectorised
// code can make them in lanes whose results it then discards (the clamped branch of a
// sigmoid: v * 1.6e-38), which made the GroupNorm-SiLU kernel 8x slower there. Only values
// below 1.2e-38 change (to 0). Declare one at the top of each parallel_for body.
class FlushDenormals {
 public:
#if defined(__x86_64__) || defined(__SSE__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }  // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

template <typename P>
inline P* ptr(unsigned long long address) { return reinterpret_cast<P*>(static_cast<uintptr_t>(address)); }

}  // namespace plugin

#define PLUGIN_CONCAT_(a, b) a##b
#define PLUGIN_CONCAT(a, b) PLUGIN_CONCAT_(a, b)
#define PLUGIN_STR_(a) #a
#define PLUGIN_STR(a) PLUGIN_STR_(a)

// Module boilerplate: `methods` is a PyMethodDef array ending in {nullptr}.
#define PLUGIN_MODULE(methods)                                                              \
  static struct PyModuleDef plugin_module_def = {PyModuleDef_HEAD_INIT,                     \
                                                 PLUGIN_STR(TORCH_EXTENSION_NAME), nullptr, \
                                                 -1, methods};                              \
  PyMODINIT_FUNC PLUGIN_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {                       \
    return PyModule_Create(&plugin_module_def);                                             \
  }

// Run `body` with the GIL released, turning C++ exceptions into Python RuntimeErrors.
#define PLUGIN_CALL(body)                                                  \
  do {                                                                     \
    std::string plugin_error;                                              \
    Py_BEGIN_ALLOW_THREADS try { body; } catch (const std::exception& e) { \
      plugin_error = e.what();                                             \
      if (plugin_error.empty()) plugin_error = "unknown error";            \
    }                                                                      \
    Py_END_ALLOW_THREADS if (!plugin_error.empty()) {                      \
      PyErr_SetString(PyExc_RuntimeError, plugin_error.c_str());           \
      return nullptr;                                                      \
    }                                                                      \
    Py_RETURN_NONE;                                                        \
  } while (0)
