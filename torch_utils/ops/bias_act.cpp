// bias_act on the CPU: forward, first and second order gradients (see bias_act_math.h).
//
// The tensors are viewed as [outer, C, inner] (contiguous: C = the bias dimension; channels
// last: inner = 1), all in the same layout. Rows of constant bias are processed as plain
// loops that the compiler vectorises. When `colsum` is given, the per-channel sums of the
// output (the bias gradient) are accumulated in float64 in a fixed order, so the result
// does not depend on the number of threads.
#include "plugin_common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "bias_act_math.h"
#ifdef WITH_CUDA
#include "bias_act_cuda.h"
#endif

namespace {
using namespace bias_act_math;

struct Args {
  int64_t outer, C, inner;
  double alpha, gain, clamp;
};

template <typename T>
inline double sum_row(const T* __restrict__ v, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // Independent partial sums: vectorisable.
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; j++) acc[j] += double(v[k + j]);
  double total = 0;
  for (; k < n; k++) total += double(v[k]);
  for (int j = 0; j < 8; j++) total += acc[j];
  return total;
}

template <typename T, int ACT, int MODE>
inline T element(const T* __restrict__ d, const T* __restrict__ dy, const T* __restrict__ r, int64_t i, T bv,
                 T alpha, T gain, T c) {
  if (MODE == 0) return forward<ACT, T>(r[i], bv, alpha, gain, c);
  T ref = ACT == kSwish ? r[i] + bv : r[i];
  if (MODE == 1) return grad1<ACT, T>(d[i], ref, alpha, gain, c);
  return grad2<ACT, T>(d[i], dy[i], ref, alpha, gain, c);
}

template <typename T, int ACT, int MODE>
void run(T* __restrict__ out, double* colsum, const T* __restrict__ d, const T* __restrict__ dy,
         const T* __restrict__ r, const T* b, const Args& a) {
  const T alpha = T(a.alpha), gain = T(a.gain);
  const T c = a.clamp < 0 ? std::numeric_limits<T>::infinity() : T(a.clamp);
  const int64_t C = a.C, inner = a.inner;
  std::vector<T> zeros;
  if (b == nullptr) {
    zeros.assign(C, T(0));
    b = zeros.data();
  }
  if (inner > 1) {
    const int64_t rows = a.outer * C;
    std::vector<double> row_sums(colsum ? rows : 0);
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / inner), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; row++) {
        const T bv = b[row % C];
        const int64_t base = row * inner;
        T* __restrict__ o = out + base;
        for (int64_t k = 0; k < inner; k++) o[k] = element<T, ACT, MODE>(d, dy, r, base + k, bv, alpha, gain, c);
        if (colsum) row_sums[row] = sum_row(o, inner);
      }
    });
    if (colsum) {
      for (int64_t ch = 0; ch < C; ch++) colsum[ch] = 0;
      for (int64_t row = 0; row < rows; row++) colsum[row % C] += row_sums[row];
    }
    return;
  }
  // inner == 1: each row holds all C channels.
  const int64_t block = std::max<int64_t>(1, 16384 / C);
  const int64_t blocks = (a.outer + block - 1) / block;
  std::vector<double> partial(colsum ? blocks * C : 0, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; blk++) {
      for (int64_t row = blk * block; row < std::min(a.outer, (blk + 1) * block); row++) {
        const int64_t base = row * C;
        T* __restrict__ o = out + base;
        for (int64_t ch = 0; ch < C; ch++) o[ch] = element<T, ACT, MODE>(d, dy, r, base + ch, b[ch], alpha, gain, c);
        if (colsum) {
          double* __restrict__ p = partial.data() + blk * C;
          for (int64_t ch = 0; ch < C; ch++) p[ch] += double(o[ch]);
        }
      }
    }
  });
  if (colsum) {
    for (int64_t ch = 0; ch < C; ch++) colsum[ch] = 0;
    for (int64_t blk = 0; blk < blocks; blk++)
      for (int64_t ch = 0; ch < C; ch++) colsum[ch] += partial[blk * C + ch];
  }
}

template <typename T, int MODE>
void by_act(int act, T* out, double* colsum, const T* d, const T* dy, const T* r, const T* b, const Args& a) {
  switch (act) {
    case kLinear: return run<T, kLinear, MODE>(out, colsum, d, dy, r, b, a);
    case kRelu: return run<T, kRelu, MODE>(out, colsum, d, dy, r, b, a);
    case kLrelu: return run<T, kLrelu, MODE>(out, colsum, d, dy, r, b, a);
    case kTanh: return run<T, kTanh, MODE>(out, colsum, d, dy, r, b, a);
    case kSigmoid: return run<T, kSigmoid, MODE>(out, colsum, d, dy, r, b, a);
    case kElu: return run<T, kElu, MODE>(out, colsum, d, dy, r, b, a);
    case kSelu: return run<T, kSelu, MODE>(out, colsum, d, dy, r, b, a);
    case kSoftplus: return run<T, kSoftplus, MODE>(out, colsum, d, dy, r, b, a);
    case kSwish: return run<T, kSwish, MODE>(out, colsum, d, dy, r, b, a);
  }
  throw std::invalid_argument("bias_act: unknown activation id");
}

template <typename T>
void by_mode(int mode, int act, uintptr_t out, uintptr_t colsum, uintptr_t d, uintptr_t dy, uintptr_t r, uintptr_t b,
             const Args& a) {
  using plugin::ptr;
  auto call = [&](auto mode_tag) {
    constexpr int M = decltype(mode_tag)::value;
    by_act<T, M>(act, ptr<T>(out), ptr<double>(colsum), ptr<const T>(d), ptr<const T>(dy), ptr<const T>(r),
                 ptr<const T>(b), a);
  };
  if (mode == 0) return call(std::integral_constant<int, 0>());
  if (mode == 1) return call(std::integral_constant<int, 1>());
  if (mode == 2) return call(std::integral_constant<int, 2>());
  throw std::invalid_argument("bias_act: mode must be 0, 1 or 2");
}

// bias_act_cpu(mode, dtype, act, out, colsum, d, dy, r, b, outer, C, inner, alpha, gain, clamp);
// pointers are addresses (0: none), clamp < 0 disables clamping.
PyObject* bias_act_cpu(PyObject*, PyObject* args) {
  int mode, dtype, act;
  unsigned long long out, colsum, d, dy, r, b;
  Args a;
  long long outer, C, inner;
  if (!PyArg_ParseTuple(args, "iiiKKKKKKLLLddd", &mode, &dtype, &act, &out, &colsum, &d, &dy, &r, &b, &outer, &C,
                        &inner, &a.alpha, &a.gain, &a.clamp))
    return nullptr;
  a.outer = outer, a.C = C, a.inner = inner;
  PLUGIN_CALL({
    if (dtype == plugin::kFloat32)
      by_mode<float>(mode, act, out, colsum, d, dy, r, b, a);
    else if (dtype == plugin::kFloat64)
      by_mode<double>(mode, act, out, colsum, d, dy, r, b, a);
    else
      throw std::invalid_argument("bias_act: the CPU kernel takes float32 or float64");
  });
}

#ifdef WITH_CUDA
// bias_act_cuda(mode, dtype, act, out, d, dy, r, b, outer, C, inner, alpha, gain, clamp, stream); no colsum
// (the wrapper sums on the GPU).
PyObject* bias_act_cuda(PyObject*, PyObject* args) {
  int mode, dtype, act;
  unsigned long long out, d, dy, r, b, stream;
  double alpha, gain, clamp;
  long long outer, C, inner;
  if (!PyArg_ParseTuple(args, "iiiKKKKKLLLdddK", &mode, &dtype, &act, &out, &d, &dy, &r, &b, &outer, &C, &inner,
                        &alpha, &gain, &clamp, &stream))
    return nullptr;
  PLUGIN_CALL(bias_act_cuda_launch(mode, dtype, act, (void*)(uintptr_t)out, (const void*)(uintptr_t)d,
                                   (const void*)(uintptr_t)dy, (const void*)(uintptr_t)r, (const void*)(uintptr_t)b,
                                   outer, C, inner, alpha, gain, clamp, (void*)(uintptr_t)stream));
}
#endif

PyMethodDef methods[] = {
    {"bias_act_cpu", bias_act_cpu, METH_VARARGS, "bias_act on the CPU"},
#ifdef WITH_CUDA
    {"bias_act_cuda", bias_act_cuda, METH_VARARGS, "bias_act on CUDA"},
#endif
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

PLUGIN_MODULE(methods)
