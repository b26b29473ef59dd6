// Python bindings of the fused CUDA filtered_lrelu (filtered_lrelu_cuda.cu). There is no CPU
// kernel: on the CPU, filtered_lrelu composes the bias_act and upfirdn2d plugins; the figures
// of why a fused CPU loop would not pay are in docs/custom-ops.md.
#include "plugin_common.h"

#ifdef WITH_CUDA
#include "filtered_lrelu_cuda.h"
#endif

namespace {
#ifdef WITH_CUDA
// filtered_lrelu_cuda(y, mask, x, b, fu, fd, dtype, planes, C, H, W, fuh, fuw, fdh, fdw, up, down,
//                     px0, py0, TH, TW, OH, OW, gain, slope, clamp, flip, stream); 0 = no mask / bias.
PyObject* filtered_lrelu_cuda(PyObject*, PyObject* args) {
  unsigned long long y, mask, x, b, fu, fd, stream;
  int dtype, flip;
  long long v[16];
  double gain, slope, clamp;
  if (!PyArg_ParseTuple(args, "KKKKKKiLLLLLLLLLLLLLLLLdddiK", &y, &mask, &x, &b, &fu, &fd, &dtype, &v[0], &v[1], &v[2],
                        &v[3], &v[4], &v[5], &v[6], &v[7], &v[8], &v[9], &v[10], &v[11], &v[12], &v[13], &v[14],
                        &v[15], &gain, &slope, &clamp, &flip, &stream))
    return nullptr;
  PLUGIN_CALL(filtered_lrelu_cuda_launch(dtype, (void*)(uintptr_t)y, (uint8_t*)(uintptr_t)mask,
                                         (const void*)(uintptr_t)x, (const void*)(uintptr_t)b,
                                         (const float*)(uintptr_t)fu, (const float*)(uintptr_t)fd, v[0], v[1], v[2],
                                         v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12], v[13], v[14],
                                         v[15], gain, slope, clamp, flip, (void*)(uintptr_t)stream));
}
#endif

PyMethodDef methods[] = {
#ifdef WITH_CUDA
    {"filtered_lrelu_cuda", filtered_lrelu_cuda, METH_VARARGS, "fused filtered_lrelu forward on CUDA"},
#endif
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

PLUGIN_MODULE(methods)
