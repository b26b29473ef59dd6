// filtered_lrelu on CUDA, forward fused in one kernel. Each block owns a 2-D tile of the
// output of one plane: it first computes the part of the upsampled, activated intermediate
// image that the tile's downsampling filter reads (polyphase: only the taps that meet
// non-zero samples) into shared memory, then filters and decimates it from there. The
// intermediate never touches global memory; the gradient needs only its sign/clamp byte.
#include "cuda_common.cuh"
#include "filtered_lrelu_cuda.h"

namespace {
using namespace cuda_common;

template <typename T>
__global__ void filtered_lrelu_kernel(T* __restrict__ y, uint8_t* __restrict__ mask, const T* __restrict__ x,
                                      const T* __restrict__ b, const float* __restrict__ fu,
                                      const float* __restrict__ fd, int64_t planes, int64_t C, int64_t H, int64_t W,
                                      int fuh, int fuw, int fdh, int fdw, int up, int down, int64_t px0, int64_t py0,
                                      int64_t TH, int64_t TW, int64_t OH, int64_t OW, int tile, int SH, int SW,
                                      typename Acc<T>::type gain_up, typename Acc<T>::type gain,
                                      typename Acc<T>::type slope, typename Acc<T>::type c, int flip) {
  using A = typename Acc<T>::type;
  extern __shared__ unsigned char shared_raw[];
  A* s = reinterpret_cast<A*>(shared_raw);
  const int64_t oy0 = int64_t(blockIdx.y) * tile, ox0 = int64_t(blockIdx.x) * tile;
  const int64_t ty0 = oy0 * down, tx0 = ox0 * down;  // Intermediate origin of this tile.
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthreads = blockDim.x * blockDim.y;
  for (int64_t p = blockIdx.z; p < planes; p += gridDim.z) {
    const T* __restrict__ plane = x + p * H * W;
    const A bv = b ? load(b + p % C) : A(0);
    for (int k = tid; k < SH * SW; k += nthreads) {
      const int64_t ti = ty0 + k / SW, tj = tx0 + k % SW;
      A u = 0;
      if (ti < TH && tj < TW) {
        const int64_t by = ti - py0, bx = tj - px0;
        const int ky0 = int(floormod(-by, up)), kx0 = int(floormod(-bx, up));
        A acc = 0;
        for (int ky = ky0; ky < fuh; ky += up) {
          const int64_t iy = (by + ky) / up;
          if (iy < 0 || iy >= H) continue;
          const int fy = flip ? ky : fuh - 1 - ky;
          for (int kx = kx0; kx < fuw; kx += up) {
            const int64_t ix = (bx + kx) / up;
            if (ix < 0 || ix >= W) continue;
            const int fx = flip ? kx : fuw - 1 - kx;
            acc += A(__ldg(fu + fy * fuw + fx)) * (load(plane + iy * W + ix) + bv);
          }
        }
        const A v = acc * gain_up;
        u = (v > A(0) ? v : v * slope) * gain;
        const bool clamped = u > c || u < -c;
        u = clamped ? (u > A(0) ? c : -c) : u;
        if (mask) mask[(p * TH + ti) * TW + tj] = uint8_t((v > A(0) ? 1 : 0) | (clamped ? 2 : 0));
      }
      s[k] = u;
    }
    __syncthreads();
    const int64_t oy = oy0 + threadIdx.y, ox = ox0 + threadIdx.x;
    if (threadIdx.y < tile && threadIdx.x < tile && oy < OH && ox < OW) {
      A acc = 0;
      const A* __restrict__ base = s + (threadIdx.y * down) * SW + threadIdx.x * down;
      for (int ky = 0; ky < fdh; ky++) {
        const int fy = flip ? ky : fdh - 1 - ky;
        for (int kx = 0; kx < fdw; kx++) {
          const int fx = flip ? kx : fdw - 1 - kx;
          acc += A(__ldg(fd + fy * fdw + fx)) * base[ky * SW + kx];
        }
      }
      store(y + (p * OH + oy) * OW + ox, acc);
    }
    __syncthreads();
  }
}
}  // namespace

void filtered_lrelu_cuda_launch(int dtype, void* y, uint8_t* mask, const void* x, const void* b, const float* fu,
                                const float* fd, int64_t planes, int64_t C, int64_t H, int64_t W, int64_t fuh,
                                int64_t fuw, int64_t fdh, int64_t fdw, int64_t up, int64_t down, int64_t px0,
                                int64_t py0, int64_t TH, int64_t TW, int64_t OH, int64_t OW, double gain, double slope,
                                double clamp, int flip, void* stream) {
  if (planes * OH * OW == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    // The largest output tile whose intermediate fits the default 48 KB of shared memory.
    int tile = 16, SH = 0, SW = 0;
    for (; tile >= 1; tile /= 2) {
      SH = int((tile - 1) * down + fdh), SW = int((tile - 1) * down + fdw);
      if (size_t(SH) * SW * sizeof(A) <= 48 * 1024) break;
    }
    if (tile < 1) throw std::invalid_argument("filtered_lrelu_cuda: the downsampling filter is too large");
    const dim3 threads(tile, tile);
    const dim3 blocks(unsigned((OW + tile - 1) / tile), unsigned((OH + tile - 1) / tile),
                      unsigned(planes < 65535 ? planes : 65535));
    const size_t shared = size_t(SH) * SW * sizeof(A);
    const A c = clamp < 0 ? A(INFINITY) : A(clamp);
    filtered_lrelu_kernel<T><<<blocks, threads, shared, static_cast<cudaStream_t>(stream)>>>(
        static_cast<T*>(y), mask, static_cast<const T*>(x), static_cast<const T*>(b), fu, fd, planes, C, H, W,
        int(fuh), int(fuw), int(fdh), int(fdw), int(up), int(down), px0, py0, TH, TW, OH, OW, tile, SH, SW,
        A(up * up), A(gain), A(slope), c, flip);
  });
  check("filtered_lrelu_cuda");
}
