// Host entry point of filtered_lrelu_cuda.cu, called by filtered_lrelu.cpp when built WITH_CUDA.
#pragma once
#include <cstdint>

// Fused forward of filtered_lrelu on contiguous x [planes, H, W] (plane p has bias b[p % C]):
// the intermediate image [TH, TW] = clamp(lrelu(upfirdn2d(x + b, fu, up, pads) * up^2) * gain)
// lives only in shared memory, per output tile; y [planes, OH, OW] = upfirdn2d(., fd, down).
// fu [fuh, fuw] and fd [fdh, fdw] are float32 on the device. If `mask` is given, it receives
// one byte per intermediate pixel for the gradient: bit 0 = pre-activation > 0, bit 1 = clamped.
void filtered_lrelu_cuda_launch(int dtype, void* y, uint8_t* mask, const void* x, const void* b, const float* fu,
                                const float* fd, int64_t planes, int64_t C, int64_t H, int64_t W, int64_t fuh,
                                int64_t fuw, int64_t fdh, int64_t fdw, int64_t up, int64_t down, int64_t px0,
                                int64_t py0, int64_t TH, int64_t TW, int64_t OH, int64_t OW, double gain, double slope,
                                double clamp, int flip, void* stream);
