// GroupNorm + SiLU + dropout on the CPU, fused: forward and first-order gradient.
//
//   h = drop(act(w[c] * (x - mean[n,g]) * rstd[n,g] + b[c]))      act: SiLU or identity
//   drop(v) = keep ? v * scale : 0                                 (keep: a uint8 mask, or none)
//
// In NCHW one (sample, group) is a contiguous block of C/G channels x HW pixels: the kernels
// run over those blocks in parallel, reading each one twice while it is still in cache. In
// channels last (NHWC) they run over samples, vectorised along the channels. Arithmetic is in float32 (float64 for float64 tensors); the tensors read and
// written may be float32 or bfloat16 (the UNets' activations under bf16 autocast), so no cast
// pass is needed around the op. Statistics are summed in float64 in a fixed order and the
// affine gradients are reduced over samples in a fixed order: results do not depend on the
// number of threads.
#include "plugin_common.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace {

// bfloat16 as its 16 bits; conversions round to nearest even like torch's.
struct bf16 {
  uint16_t bits;
};

inline float load(const float* p, int64_t i) { return p[i]; }
inline double load(const double* p, int64_t i) { return p[i]; }
inline float load(const bf16* p, int64_t i) {
  uint32_t u = uint32_t(p[i].bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(double* p, int64_t i, double v) { p[i] = v; }
inline void store(bf16* p, int64_t i, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  u = nan ? (u | 0x00400000u) : u + 0x7fffu + ((u >> 16) & 1u);
  p[i].bits = uint16_t(u >> 16);
}

// exp for float32 in a form the compiler vectorises (libm's expf is a scalar call): 2^n * e^r
// with n = round(x / ln 2), |r| <= ln(2)/2 and e^r by its Taylor polynomial to degree 7
// (truncation error < 6e-9 relative, so the result is within 2 ulp of expf).
inline float exp_vec(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // (fmin/fmax would not vectorise)
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln 2 split in two parts.
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return p * two_n;
}
inline double exp_vec(double x) { return std::exp(x); }

template <typename A>
inline A sigmoid(A v) {
  return A(1) / (A(1) + exp_vec(-v));
}

// The forward element after the affine normalisation: SiLU, then the dropout multiply
// (keep is 0 or 1; a multiply rather than a select, so the loop vectorises).
template <typename A, bool ACT, bool DROP>
inline A act_drop(A v, uint8_t keep, A scale) {
  if (ACT) v = v * sigmoid(v);
  if (DROP) v = v * (A(keep) * scale);
  return v;
}

struct Shape {
  int64_t N, C, HW, G;
  int64_t cpg() const { return C / G; }
  int64_t block() const { return cpg() * HW; }
};

// mean and 1/sqrt(var + eps) of one block (two passes, float64 sums).
template <typename T>
inline void block_stats(const T* __restrict__ x, int64_t m, double eps, double& mean, double& rstd) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= m; i += 8)
    for (int j = 0; j < 8; j++) acc[j] += double(load(x, i + j));
  double s = 0;
  for (; i < m; i++) s += double(load(x, i));
  for (int j = 0; j < 8; j++) s += acc[j];
  mean = s / double(m);
  for (int j = 0; j < 8; j++) acc[j] = 0;
  i = 0;
  for (; i + 8 <= m; i += 8)
    for (int j = 0; j < 8; j++) {
      const double d = double(load(x, i + j)) - mean;
      acc[j] += d * d;
    }
  double v = 0;
  for (; i < m; i++) {
    const double d = double(load(x, i)) - mean;
    v += d * d;
  }
  for (int j = 0; j < 8; j++) v += acc[j];
  rstd = 1.0 / std::sqrt(v / double(m) + eps);
}

// Forward. With `given_stats` the statistics are read from mean/rstd (the backward pass's
// recomputation), else computed and written there.
template <typename TI, typename TO, typename A, bool ACT, bool DROP>
void forward(TO* __restrict__ out, A* __restrict__ mean_out, A* __restrict__ rstd_out, const TI* __restrict__ x,
             const A* __restrict__ w, const A* __restrict__ b, const uint8_t* __restrict__ keep, const Shape& s,
             double eps, A scale, bool given_stats) {
  const int64_t blocks = s.N * s.G, cpg = s.cpg(), HW = s.HW, m = s.block();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const plugin::FlushDenormals flush;
    for (int64_t blk = begin; blk < end; blk++) {
      const int64_t base = blk * m;
      A mu, rs;
      if (given_stats) {
        mu = mean_out[blk], rs = rstd_out[blk];
      } else {
        double dmu, drs;
        block_stats(x + base, m, eps, dmu, drs);
        mu = A(dmu), rs = A(drs);
        mean_out[blk] = mu, rstd_out[blk] = rs;
      }
      const int64_t c0 = (blk % s.G) * cpg;
      for (int64_t k = 0; k < cpg; k++) {
        const A ca = rs * w[c0 + k], cb = b[c0 + k] - mu * ca;
        const int64_t off = base + k * HW;
        const TI* __restrict__ xi = x + off;
        TO* __restrict__ o = out + off;
        const uint8_t* __restrict__ kp = DROP ? keep + off : nullptr;
#pragma omp simd
        for (int64_t i = 0; i < HW; i++) {
          store(o, i, act_drop<A, ACT, DROP>(load(xi, i) * ca + cb, DROP ? kp[i] : 1, scale));
        }
      }
    }
  });
}

// Backward: the gradient with respect to x (if grad_x) and the per-channel sums that are the
// gradients of w and b (float64, reduced over samples after the parallel region).
template <typename TI, typename TO, typename A, bool ACT, bool DROP>
void backward(TI* __restrict__ grad_x, double* __restrict__ grad_w, double* __restrict__ grad_b,
              const TO* __restrict__ dy, const TI* __restrict__ x, const A* __restrict__ mean,
              const A* __restrict__ rstd, const A* __restrict__ w, const A* __restrict__ b,
              const uint8_t* __restrict__ keep, const Shape& s, A scale) {
  const int64_t blocks = s.N * s.G, cpg = s.cpg(), HW = s.HW, m = s.block();
  std::vector<double> sum_g(s.N * s.C), sum_gx(s.N * s.C);  // Per (sample, channel).
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const plugin::FlushDenormals flush;
    std::vector<A> scratch(m);  // dL/d(normalised x) / w, for the whole block.
    A* __restrict__ g = scratch.data();
    for (int64_t blk = begin; blk < end; blk++) {
      const int64_t base = blk * m, n = blk / s.G, c0 = (blk % s.G) * cpg;
      const A mu = mean[blk], rs = rstd[blk];
      A group_dot = 0, group_dot_xhat = 0;
      for (int64_t k = 0; k < cpg; k++) {
        const int64_t c = c0 + k, off = base + k * HW;
        const A ca = rs * w[c], cb = b[c] - mu * ca;
        const TI* __restrict__ xi = x + off;
        const TO* __restrict__ d = dy + off;
        const uint8_t* __restrict__ kp = DROP ? keep + off : nullptr;
        A* __restrict__ gk = g + k * HW;
        A sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
        for (int64_t i = 0; i < HW; i++) {
          const A xv = load(xi, i);
          A gv = load(d, i);
          if (DROP) gv = gv * (A(kp[i]) * scale);
          if (ACT) {
            const A v = xv * ca + cb, sv = sigmoid(v);
            gv = gv * (sv * (A(1) + v * (A(1) - sv)));
          }
          gk[i] = gv;
          sg += gv;
          sgx += gv * ((xv - mu) * rs);
        }
        sum_g[n * s.C + c] = double(sg), sum_gx[n * s.C + c] = double(sgx);
        group_dot += w[c] * sg, group_dot_xhat += w[c] * sgx;
      }
      if (grad_x == nullptr) continue;
      const A m1 = group_dot / A(m), m2 = group_dot_xhat / A(m);
      for (int64_t k = 0; k < cpg; k++) {
        const int64_t c = c0 + k, off = base + k * HW;
        const A wc = w[c];
        const TI* __restrict__ xi = x + off;
        const A* __restrict__ gk = g + k * HW;
        TI* __restrict__ o = grad_x + off;
#pragma omp simd
        for (int64_t i = 0; i < HW; i++) store(o, i, rs * (wc * gk[i] - m1 - (load(xi, i) - mu) * rs * m2));
      }
    }
  });
  for (int64_t c = 0; c < s.C; c++) grad_w[c] = 0, grad_b[c] = 0;
  for (int64_t n = 0; n < s.N; n++)
    for (int64_t c = 0; c < s.C; c++) grad_w[c] += sum_gx[n * s.C + c], grad_b[c] += sum_g[n * s.C + c];
}

// Channels last: one sample is [HW, C], so the loops run over pixels and, inside, over all C
// channels (vectorised); per-channel coefficients are expanded from the per-group ones.
// Parallel over samples.
template <typename T>
void sample_stats_nhwc(const T* __restrict__ x, const Shape& s, double eps, double* mean, double* rstd,
                       std::vector<double>& acc) {
  const int64_t C = s.C, cpg = s.cpg();
  const double m = double(s.block());
  for (int64_t c = 0; c < C; c++) acc[c] = 0;
  for (int64_t p = 0; p < s.HW; p++) {
    const T* __restrict__ xp = x + p * C;
    for (int64_t c = 0; c < C; c++) acc[c] += double(load(xp, c));
  }
  for (int64_t g = 0; g < s.G; g++) {
    double t = 0;
    for (int64_t k = 0; k < cpg; k++) t += acc[g * cpg + k];
    mean[g] = t / m;
  }
  std::vector<double> mean_c(C);
  for (int64_t c = 0; c < C; c++) mean_c[c] = mean[c / cpg], acc[c] = 0;
  for (int64_t p = 0; p < s.HW; p++) {
    const T* __restrict__ xp = x + p * C;
    for (int64_t c = 0; c < C; c++) {
      const double d = double(load(xp, c)) - mean_c[c];
      acc[c] += d * d;
    }
  }
  for (int64_t g = 0; g < s.G; g++) {
    double t = 0;
    for (int64_t k = 0; k < cpg; k++) t += acc[g * cpg + k];
    rstd[g] = 1.0 / std::sqrt(t / m + eps);
  }
}

template <typename TI, typename TO, typename A, bool ACT, bool DROP>
void forward_nhwc(TO* __restrict__ out, A* __restrict__ mean_out, A* __restrict__ rstd_out, const TI* __restrict__ x,
                  const A* __restrict__ w, const A* __restrict__ b, const uint8_t* __restrict__ keep, const Shape& s,
                  double eps, A scale, bool given_stats) {
  const int64_t C = s.C, G = s.G, cpg = s.cpg(), sample = C * s.HW;
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    const plugin::FlushDenormals flush;
    std::vector<double> acc(C), dmean(G), drstd(G);
    std::vector<A> ca(C), cb(C);
    for (int64_t n = begin; n < end; n++) {
      const int64_t base = n * sample;
      if (!given_stats) {
        sample_stats_nhwc(x + base, s, eps, dmean.data(), drstd.data(), acc);
        for (int64_t g = 0; g < G; g++) mean_out[n * G + g] = A(dmean[g]), rstd_out[n * G + g] = A(drstd[g]);
      }
      for (int64_t c = 0; c < C; c++) {
        const A mu = mean_out[n * G + c / cpg], rs = rstd_out[n * G + c / cpg];
        ca[c] = rs * w[c], cb[c] = b[c] - mu * ca[c];
      }
      const A* __restrict__ pa = ca.data();
      const A* __restrict__ pb = cb.data();
      for (int64_t p = 0; p < s.HW; p++) {
        const int64_t off = base + p * C;
        const TI* __restrict__ xp = x + off;
        TO* __restrict__ o = out + off;
        const uint8_t* __restrict__ kp = DROP ? keep + off : nullptr;
#pragma omp simd
        for (int64_t c = 0; c < C; c++) {
          store(o, c, act_drop<A, ACT, DROP>(load(xp, c) * pa[c] + pb[c], DROP ? kp[c] : 1, scale));
        }
      }
    }
  });
}

template <typename TI, typename TO, typename A, bool ACT, bool DROP>
void backward_nhwc(TI* __restrict__ grad_x, double* __restrict__ grad_w, double* __restrict__ grad_b,
                   const TO* __restrict__ dy, const TI* __restrict__ x, const A* __restrict__ mean,
                   const A* __restrict__ rstd, const A* __restrict__ w, const A* __restrict__ b,
                   const uint8_t* __restrict__ keep, const Shape& s, A scale) {
  const int64_t C = s.C, G = s.G, cpg = s.cpg(), m = s.block(), sample = C * s.HW;
  std::vector<double> sum_g(s.N * C), sum_gx(s.N * C);
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    const plugin::FlushDenormals flush;
    std::vector<A> scratch(sample), ca(C), cb(C), mu_c(C), rs_c(C), sg(C), sgx(C), m1_c(C), m2_c(C);
    A* __restrict__ g = scratch.data();
    for (int64_t n = begin; n < end; n++) {
      const int64_t base = n * sample;
      for (int64_t c = 0; c < C; c++) {
        mu_c[c] = mean[n * G + c / cpg], rs_c[c] = rstd[n * G + c / cpg];
        ca[c] = rs_c[c] * w[c], cb[c] = b[c] - mu_c[c] * ca[c], sg[c] = 0, sgx[c] = 0;
      }
      A* __restrict__ psg = sg.data();
      A* __restrict__ psgx = sgx.data();
      const A *__restrict__ pa = ca.data(), *__restrict__ pb = cb.data();
      const A *__restrict__ pmu = mu_c.data(), *__restrict__ prs = rs_c.data();
      for (int64_t p = 0; p < s.HW; p++) {
        const int64_t off = base + p * C;
        const TI* __restrict__ xp = x + off;
        const TO* __restrict__ d = dy + off;
        const uint8_t* __restrict__ kp = DROP ? keep + off : nullptr;
        A* __restrict__ gp = g + p * C;
#pragma omp simd
        for (int64_t c = 0; c < C; c++) {
          const A xv = load(xp, c);
          A gv = load(d, c);
          if (DROP) gv = gv * (A(kp[c]) * scale);
          if (ACT) {
            const A v = xv * pa[c] + pb[c], sv = sigmoid(v);
            gv = gv * (sv * (A(1) + v * (A(1) - sv)));
          }
          gp[c] = gv;
          psg[c] += gv;
          psgx[c] += gv * ((xv - pmu[c]) * prs[c]);
        }
      }
      for (int64_t c = 0; c < C; c++) sum_g[n * C + c] = double(sg[c]), sum_gx[n * C + c] = double(sgx[c]);
      if (grad_x == nullptr) continue;
      for (int64_t gi = 0; gi < G; gi++) {
        A d1 = 0, d2 = 0;
        for (int64_t k = 0; k < cpg; k++) {
          const int64_t c = gi * cpg + k;
          d1 += w[c] * sg[c], d2 += w[c] * sgx[c];
        }
        for (int64_t k = 0; k < cpg; k++) m1_c[gi * cpg + k] = d1 / A(m), m2_c[gi * cpg + k] = d2 / A(m);
      }
      const A *__restrict__ pm1 = m1_c.data(), *__restrict__ pm2 = m2_c.data();
      for (int64_t p = 0; p < s.HW; p++) {
        const int64_t off = base + p * C;
        const TI* __restrict__ xp = x + off;
        const A* __restrict__ gp = g + p * C;
        TI* __restrict__ o = grad_x + off;
#pragma omp simd
        for (int64_t c = 0; c < C; c++)
          store(o, c, prs[c] * (w[c] * gp[c] - pm1[c] - (load(xp, c) - pmu[c]) * prs[c] * pm2[c]));
      }
    }
  });
  for (int64_t c = 0; c < C; c++) grad_w[c] = 0, grad_b[c] = 0;
  for (int64_t n = 0; n < s.N; n++)
    for (int64_t c = 0; c < C; c++) grad_w[c] += sum_gx[n * C + c], grad_b[c] += sum_g[n * C + c];
}

// The flags ACT and DROP as template arguments, so that the inner loops have no branches on them.
template <typename F>
void by_flags(bool act, bool drop, F&& f) {
  if (act && drop) return f(std::true_type(), std::true_type());
  if (act) return f(std::true_type(), std::false_type());
  if (drop) return f(std::false_type(), std::true_type());
  return f(std::false_type(), std::false_type());
}

// The (input, output) dtype pairs: float32/bfloat16 in any combination (float32 arithmetic),
// and float64 with float64.
template <typename F>
void by_dtypes(int in_dtype, int out_dtype, F&& f) {
  using plugin::kBFloat16;
  using plugin::kFloat32;
  using plugin::kFloat64;
  if (in_dtype == kFloat32 && out_dtype == kFloat32) return f(float(), float(), float());
  if (in_dtype == kFloat32 && out_dtype == kBFloat16) return f(float(), bf16(), float());
  if (in_dtype == kBFloat16 && out_dtype == kBFloat16) return f(bf16(), bf16(), float());
  if (in_dtype == kBFloat16 && out_dtype == kFloat32) return f(bf16(), float(), float());
  if (in_dtype == kFloat64 && out_dtype == kFloat64) return f(double(), double(), double());
  throw std::invalid_argument("norm_act: unsupported dtypes (float32/bfloat16 in and out, or float64)");
}

// One instantiation of the kernels: input, output and arithmetic types, SiLU, dropout.
template <typename TI_, typename TO_, typename A_, bool ACT_, bool DROP_>
struct Config {
  using TI = TI_;
  using TO = TO_;
  using A = A_;
  static constexpr bool ACT = ACT_, DROP = DROP_;
};

// f(Config<...>()) for the dtypes and flags of a call.
template <typename F>
void dispatch(int in_dtype, int out_dtype, bool act, bool drop, F&& f) {
  by_dtypes(in_dtype, out_dtype, [&](auto ti, auto to, auto ta) {
    by_flags(act, drop, [&](auto act_tag, auto drop_tag) {
      f(Config<decltype(ti), decltype(to), decltype(ta), decltype(act_tag)::value, decltype(drop_tag)::value>());
    });
  });
}

Shape parse_shape(long long N, long long C, long long HW, long long G) {
  if (N < 1 || C < 1 || HW < 1 || G < 1 || C % G != 0) throw std::invalid_argument("norm_act: bad shape");
  return Shape{N, C, HW, G};
}

// norm_act_forward(in_dtype, out_dtype, out, mean, rstd, x, w, b, keep, N, C, HW, G, eps, act, scale,
// given_stats, channels_last): pointers are addresses (keep 0: no dropout; keep, out and x in one
// layout); w, b, mean, rstd are float32 (float64 for float64 x).
PyObject* norm_act_forward(PyObject*, PyObject* args) {
  int in_dtype, out_dtype, act, given_stats, channels_last;
  unsigned long long out, mean, rstd, x, w, b, keep;
  long long N, C, HW, G;
  double eps, scale;
  if (!PyArg_ParseTuple(args, "iiKKKKKKKLLLLdidpp", &in_dtype, &out_dtype, &out, &mean, &rstd, &x, &w, &b, &keep, &N,
                        &C, &HW, &G, &eps, &act, &scale, &given_stats, &channels_last))
    return nullptr;
  PLUGIN_CALL({
    const Shape s = parse_shape(N, C, HW, G);
    dispatch(in_dtype, out_dtype, act != 0, keep != 0, [&](auto config) {
      using K = decltype(config);
      using TI = typename K::TI;
      using TO = typename K::TO;
      using A = typename K::A;
      using plugin::ptr;
      auto run = channels_last ? forward_nhwc<TI, TO, A, K::ACT, K::DROP> : forward<TI, TO, A, K::ACT, K::DROP>;
      run(ptr<TO>(out), ptr<A>(mean), ptr<A>(rstd), ptr<const TI>(x), ptr<const A>(w), ptr<const A>(b),
          ptr<const uint8_t>(keep), s, eps, A(scale), given_stats != 0);
    });
  });
}

// norm_act_backward(in_dtype, out_dtype, grad_x, grad_w, grad_b, dy, x, mean, rstd, w, b, keep, N, C, HW,
// G, act, scale, channels_last): grad_x (x's dtype; 0: not wanted), grad_w and grad_b (float64, C each).
PyObject* norm_act_backward(PyObject*, PyObject* args) {
  int in_dtype, out_dtype, act, channels_last;
  unsigned long long grad_x, grad_w, grad_b, dy, x, mean, rstd, w, b, keep;
  long long N, C, HW, G;
  double scale;
  if (!PyArg_ParseTuple(args, "iiKKKKKKKKKKLLLLidp", &in_dtype, &out_dtype, &grad_x, &grad_w, &grad_b, &dy, &x, &mean,
                        &rstd, &w, &b, &keep, &N, &C, &HW, &G, &act, &scale, &channels_last))
    return nullptr;
  PLUGIN_CALL({
    const Shape s = parse_shape(N, C, HW, G);
    dispatch(in_dtype, out_dtype, act != 0, keep != 0, [&](auto config) {
      using K = decltype(config);
      using TI = typename K::TI;
      using TO = typename K::TO;
      using A = typename K::A;
      using plugin::ptr;
      auto run = channels_last ? backward_nhwc<TI, TO, A, K::ACT, K::DROP> : backward<TI, TO, A, K::ACT, K::DROP>;
      run(ptr<TI>(grad_x), ptr<double>(grad_w), ptr<double>(grad_b), ptr<const TO>(dy), ptr<const TI>(x),
          ptr<const A>(mean), ptr<const A>(rstd), ptr<const A>(w), ptr<const A>(b), ptr<const uint8_t>(keep), s,
          A(scale));
    });
  });
}

PyMethodDef methods[] = {
    {"norm_act_forward", norm_act_forward, METH_VARARGS, "GroupNorm-SiLU-dropout forward on the CPU"},
    {"norm_act_backward", norm_act_backward, METH_VARARGS, "GroupNorm-SiLU-dropout gradient on the CPU"},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

PLUGIN_MODULE(methods)
