// Host entry point of upfirdn2d_cuda.cu, called by upfirdn2d.cpp when built WITH_CUDA.
#pragma once
#include <cstdint>

// Contiguous x [planes, H, W] -> y [planes, OH, OW]; f float32 on the device, [fh, fw] or,
// if separable, [fw] for both axes. Throws std::runtime_error on a launch error.
void upfirdn2d_cuda_launch(int dtype, void* y, const void* x, const float* f, int64_t planes, int64_t H, int64_t W,
                           int64_t fh, int64_t fw, int separable, int64_t upx, int64_t upy, int64_t downx,
                           int64_t downy, int64_t px0, int64_t py0, int64_t OH, int64_t OW, int flip, double gain,
                           void* stream);
