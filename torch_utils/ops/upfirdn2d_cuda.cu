// upfirdn2d on CUDA: one thread per output pixel (grid-stride) that visits only the filter
// taps landing on non-zero input samples (polyphase): tap rows ky0, ky0 + up, ... where ky0
// makes the upsampled row index a multiple of `up`. The taps are read through the read-only
// cache. A separable filter runs as two launches from the Python wrapper (1 x fw, then fh x 1).
#include "cuda_common.cuh"
#include "upfirdn2d_cuda.h"

namespace {
using namespace cuda_common;

template <typename T>
__global__ void upfirdn2d_kernel(T* __restrict__ y, const T* __restrict__ x, const float* __restrict__ f,
                                 int64_t planes, int64_t H, int64_t W, int fh, int fw, int ux, int uy, int dx, int dy,
                                 int64_t px0, int64_t py0, int64_t OH, int64_t OW, int flip,
                                 typename Acc<T>::type gain) {
  using A = typename Acc<T>::type;
  const int64_t n = planes * OH * OW;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ox = i % OW, oy = (i / OW) % OH, p = i / (OW * OH);
    const T* __restrict__ plane = x + p * H * W;
    // Upsampled (padded) coordinates of the first tap; a tap k reads input (base + k) / up.
    const int64_t by = oy * dy - py0, bx = ox * dx - px0;
    const int ky0 = int(floormod(-by, uy)), kx0 = int(floormod(-bx, ux));
    A acc = 0;
    for (int ky = ky0; ky < fh; ky += uy) {
      const int64_t iy = (by + ky) / uy;  // Exact: by + ky is a multiple of uy.
      if (iy < 0 || iy >= H) continue;
      const int fy = flip ? ky : fh - 1 - ky;  // conv2d correlates: true convolution flips.
      for (int kx = kx0; kx < fw; kx += ux) {
        const int64_t ix = (bx + kx) / ux;
        if (ix < 0 || ix >= W) continue;
        const int fx = flip ? kx : fw - 1 - kx;
        acc += A(__ldg(f + fy * fw + fx)) * load(plane + iy * W + ix);
      }
    }
    store(y + i, acc * gain);
  }
}
}  // namespace

void upfirdn2d_cuda_launch(int dtype, void* y, const void* x, const float* f, int64_t planes, int64_t H, int64_t W,
                           int64_t fh, int64_t fw, int separable, int64_t upx, int64_t upy, int64_t downx,
                           int64_t downy, int64_t px0, int64_t py0, int64_t OH, int64_t OW, int flip, double gain,
                           void* stream) {
  if (separable) throw std::invalid_argument("upfirdn2d_cuda: pass separable filters as two 2-D passes");
  const int64_t n = planes * OH * OW;
  if (n == 0) return;
  const int threads = 256;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    upfirdn2d_kernel<T><<<blocks_for(n, threads), threads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<T*>(y), static_cast<const T*>(x), f, planes, H, W, int(fh), int(fw), int(upx), int(upy),
        int(downx), int(downy), px0, py0, OH, OW, flip, A(gain));
  });
  check("upfirdn2d_cuda");
}
