// Per-element math of bias_act, shared by the CPU (.cpp) and CUDA (.cu) kernels.
//
// With z = x + b, t = act(z) and y = clamp(t * gain, -clamp, clamp):
//   mode 0 (forward):        y
//   mode 1 (first order):    d * g,       g = dy/dz
//   mode 2 (second order):   d * dy * g', g' = dg/dref
// where `ref` is z for the 'x'-reference activation (swish) and y for the others, matching
// `activation_funcs[act].ref` in bias_act.py (the gradients then chain through that tensor).
// A clamped element has g = g' = 0; clamping off is clamp = +inf.
#pragma once
#include <cmath>

#ifdef __CUDACC__
#define BA_HD __host__ __device__ __forceinline__
#else
#define BA_HD inline
#endif

namespace bias_act_math {

// The ids are `activation_funcs[act].cuda_idx`.
enum Act { kLinear = 1, kRelu = 2, kLrelu = 3, kTanh = 4, kSigmoid = 5, kElu = 6, kSelu = 7, kSoftplus = 8, kSwish = 9 };

// F.selu's constants.
template <typename A> BA_HD A selu_alpha() { return A(1.6732632423543772848170429916717); }
template <typename A> BA_HD A selu_scale() { return A(1.0507009873554804934193349852946); }

template <typename A> BA_HD A sigmoid(A z) { return A(1) / (A(1) + std::exp(-z)); }

template <int ACT, typename A>
BA_HD A act_forward(A z, A alpha) {
  if (ACT == kLinear) return z;
  if (ACT == kRelu) return z > A(0) ? z : A(0);
  if (ACT == kLrelu) return z > A(0) ? z : z * alpha;
  if (ACT == kTanh) return std::tanh(z);
  if (ACT == kSigmoid) return sigmoid(z);
  if (ACT == kElu) return z > A(0) ? z : std::expm1(z);
  if (ACT == kSelu) return z > A(0) ? selu_scale<A>() * z : selu_scale<A>() * selu_alpha<A>() * std::expm1(z);
  if (ACT == kSoftplus) return z > A(20) ? z : std::log1p(std::exp(z));  // F.softplus's threshold.
  return z * sigmoid(z);                                           // kSwish
}

template <typename A> BA_HD A clamp_value(A v, A c) { return v > c ? c : (v < -c ? -c : v); }

template <int ACT, typename A>
BA_HD A forward(A x, A b, A alpha, A gain, A c) {
  return clamp_value(act_forward<ACT>(x + b, alpha) * gain, c);
}

// d * dy/dz. `r` is z (= x + b) for swish, y otherwise (unused for unclamped linear).
template <int ACT, typename A>
BA_HD A grad1(A d, A r, A alpha, A gain, A c) {
  if (ACT == kSwish) {
    A s = sigmoid(r);
    A y = r * s * gain;
    bool kept = y >= -c && y <= c;  // Inclusive, like the gradient of torch.clamp.
    return kept ? d * gain * s * (A(1) + r * (A(1) - s)) : A(0);
  }
  if (!(r < c && r > -c)) return A(0);  // Clamped (y sits at the bound).
  if (ACT == kLinear) return d * gain;
  if (ACT == kRelu) return r > A(0) ? d * gain : A(0);
  if (ACT == kLrelu) return r > A(0) ? d * gain : d * (gain * alpha);
  if (ACT == kTanh) { A t = r / gain; return d * gain * (A(1) - t * t); }
  if (ACT == kSigmoid) { A s = r / gain; return d * gain * s * (A(1) - s); }
  if (ACT == kElu) return r > A(0) ? d * gain : d * (r + gain);
  if (ACT == kSelu) return r > A(0) ? d * (gain * selu_scale<A>()) : d * (r + gain * selu_scale<A>() * selu_alpha<A>());
  /* kSoftplus */ return d * gain * (A(1) - std::exp(-r / gain));
}

// d * dy * d(dy/dz)/dref, for the activations with has_2nd_grad (zero for the others).
template <int ACT, typename A>
BA_HD A grad2(A d, A dy, A r, A alpha, A gain, A c) {
  if (ACT == kSwish) {
    A s = sigmoid(r);
    A y = r * s * gain;
    bool kept = y >= -c && y <= c;
    return kept ? d * dy * gain * s * (A(1) - s) * (A(2) + r * (A(1) - A(2) * s)) : A(0);
  }
  if (!(r < c && r > -c)) return A(0);
  if (ACT == kTanh) return d * dy * (A(-2) * r / gain);
  if (ACT == kSigmoid) return d * dy * (A(1) - A(2) * r / gain);
  if (ACT == kElu || ACT == kSelu) return r > A(0) ? A(0) : d * dy;
  if (ACT == kSoftplus) return d * dy * std::exp(-r / gain);
  return A(0);
}

}  // namespace bias_act_math
