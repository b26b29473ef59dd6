// bias_act on CUDA: one thread per element (grid-stride), the math of bias_act_math.h in
// float32 for half/bfloat16 and in float64 for double.
#include "cuda_common.cuh"
#include "bias_act_math.h"
#include "bias_act_cuda.h"

namespace {
using namespace bias_act_math;
using namespace cuda_common;

template <typename T, int ACT, int MODE>
__global__ void bias_act_kernel(T* __restrict__ out, const T* __restrict__ d, const T* __restrict__ dy,
                                const T* __restrict__ r, const T* __restrict__ b, int64_t n, int64_t C, int64_t inner,
                                typename Acc<T>::type alpha, typename Acc<T>::type gain, typename Acc<T>::type c) {
  using A = typename Acc<T>::type;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const A bv = b ? load(b + (i / inner) % C) : A(0);
    A v;
    if (MODE == 0) {
      v = forward<ACT, A>(load(r + i), bv, alpha, gain, c);
    } else {
      const A ref = ACT == kSwish ? load(r + i) + bv : load(r + i);
      v = MODE == 1 ? grad1<ACT, A>(load(d + i), ref, alpha, gain, c)
                    : grad2<ACT, A>(load(d + i), load(dy + i), ref, alpha, gain, c);
    }
    store(out + i, v);
  }
}

template <typename T, int MODE>
void launch_act(int act, T* out, const T* d, const T* dy, const T* r, const T* b, int64_t n, int64_t C, int64_t inner,
                double alpha, double gain, double clamp, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const A c = clamp < 0 ? A(INFINITY) : A(clamp);
  const int threads = 256;
  const unsigned blocks = blocks_for(n, threads);
#define BA_CASE(ID)                                                                                          \
  case ID:                                                                                                   \
    bias_act_kernel<T, ID, MODE><<<blocks, threads, 0, stream>>>(out, d, dy, r, b, n, C, inner, A(alpha),   \
                                                                 A(gain), c);                                \
    return;
  if (MODE == 2) {  // Only the activations with has_2nd_grad have a second-order kernel.
    switch (act) { BA_CASE(kTanh) BA_CASE(kSigmoid) BA_CASE(kElu) BA_CASE(kSelu) BA_CASE(kSoftplus) BA_CASE(kSwish) }
  } else {
    switch (act) {
      BA_CASE(kLinear) BA_CASE(kRelu) BA_CASE(kLrelu) BA_CASE(kTanh) BA_CASE(kSigmoid) BA_CASE(kElu) BA_CASE(kSelu)
      BA_CASE(kSoftplus) BA_CASE(kSwish)
    }
  }
#undef BA_CASE
  throw std::invalid_argument("bias_act_cuda: no kernel for this activation and mode");
}
}  // namespace

void bias_act_cuda_launch(int mode, int dtype, int act, void* out, const void* d, const void* dy, const void* r,
                          const void* b, int64_t outer, int64_t C, int64_t inner, double alpha, double gain,
                          double clamp, void* stream) {
  const int64_t n = outer * C * inner;
  if (n == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto o = static_cast<T*>(out);
    auto dd = static_cast<const T*>(d), ddy = static_cast<const T*>(dy), rr = static_cast<const T*>(r);
    auto bb = static_cast<const T*>(b);
    if (mode == 0) launch_act<T, 0>(act, o, dd, ddy, rr, bb, n, C, inner, alpha, gain, clamp, s);
    else if (mode == 1) launch_act<T, 1>(act, o, dd, ddy, rr, bb, n, C, inner, alpha, gain, clamp, s);
    else if (mode == 2) launch_act<T, 2>(act, o, dd, ddy, rr, bb, n, C, inner, alpha, gain, clamp, s);
    else throw std::invalid_argument("bias_act_cuda: mode must be 0, 1 or 2");
  });
  check("bias_act_cuda");
}
