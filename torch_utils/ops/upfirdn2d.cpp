// upfirdn2d on the CPU: upsample by zero insertion, pad, FIR-filter, downsample, per plane.
//
// Polyphase: an output pixel only meets the filter taps that land on non-zero (inserted)
// input pixels, so instead of filtering the zero-inserted image we accumulate, per output
// row, `acc[q] += tap * row[q * down + offset]` over the taps that do. Output columns are
// grouped by their residue modulo `up` (each residue meets a fixed tap subset), giving
// contiguous loops that the compiler vectorises; the residues are interleaved at the end.
// Rows are copied into a zero-margined buffer so that the loops need no bounds checks.
//
// A rank-1 2-D filter (e.g. setup_filter([1,3,3,1])) runs like a separable (1-D) one, as a
// vertical then a horizontal 1-D filter per output row (`SepRows`): 2k instead of k^2
// multiply-adds per pixel.
#include "plugin_common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

#ifdef WITH_CUDA
#include "upfirdn2d_cuda.h"
#endif

namespace {
using plugin::floordiv;
using plugin::floormod;

// One pass over a plane: src [H, W] -> dst [OH, OW] with correlation taps [fh, fw].
template <typename A>
struct Pass {
  int64_t H, W, OH, OW, fh, fw, ux, uy, dx, dy, px0, py0;
  std::vector<A> taps;
  std::vector<int64_t> Q;                                // Output columns per residue.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> htaps;  // Per residue: (kx, input offset).
  int64_t margin_l = 0, row_len = 0;

  void plan() {
    Q.assign(ux, 0);
    htaps.assign(ux, {});
    int64_t min_ix = 0, max_ix = W - 1;
    for (int64_t r = 0; r < ux; r++) {
      Q[r] = r < OW ? (OW - 1 - r) / ux + 1 : 0;
      if (Q[r] == 0) continue;
      for (int64_t kx = 0; kx < fw; kx++) {
        int64_t num = r * dx + kx - px0;
        if (floormod(num, ux) != 0) continue;
        int64_t off = floordiv(num, ux);
        htaps[r].push_back({kx, off});
        min_ix = std::min(min_ix, off);
        max_ix = std::max(max_ix, (Q[r] - 1) * dx + off);
      }
    }
    margin_l = -min_ix;
    row_len = margin_l + max_ix + 1;
  }

  // `rows`: a work buffer of H * row_len (margins zero), `acc`: of OW.
  template <typename S, typename D>
  void run(const S* __restrict__ src, D* __restrict__ dst, A* __restrict__ work, A* __restrict__ acc) const {
    const A* rows = work;
    if (std::is_same<S, A>::value && margin_l == 0 && row_len == W) {
      rows = reinterpret_cast<const A*>(src);  // No margins needed: read the plane in place.
    } else {
      for (int64_t iy = 0; iy < H; iy++) {
        A* __restrict__ row = work + iy * row_len + margin_l;
        const S* __restrict__ s = src + iy * W;
        for (int64_t ix = 0; ix < W; ix++) row[ix] = A(s[ix]);
      }
    }
    for (int64_t oy = 0; oy < OH; oy++) {
      A* __restrict__ a = acc;
      for (int64_t i = 0; i < OW; i++) a[i] = A(0);
      for (int64_t ky = 0; ky < fh; ky++) {
        int64_t num = oy * dy + ky - py0;
        if (floormod(num, uy) != 0) continue;
        int64_t iy = floordiv(num, uy);
        if (iy < 0 || iy >= H) continue;
        const A* __restrict__ row = rows + iy * row_len + margin_l;
        int64_t acc_off = 0;
        for (int64_t r = 0; r < ux; r++) {
          A* __restrict__ ar = acc + acc_off;
          const int64_t q_n = Q[r];
          for (const auto& t : htaps[r]) {
            const A w = taps[ky * fw + t.first];
            if (w == A(0)) continue;
            const A* __restrict__ in = row + t.second;
            if (dx == 1) {
              for (int64_t q = 0; q < q_n; q++) ar[q] += w * in[q];
            } else if (dx == 2) {
              for (int64_t q = 0; q < q_n; q++) ar[q] += w * in[2 * q];
            } else {
              for (int64_t q = 0; q < q_n; q++) ar[q] += w * in[q * dx];
            }
          }
          acc_off += q_n;
        }
      }
      D* __restrict__ out = dst + oy * OW;
      if (ux == 1) {
        for (int64_t i = 0; i < OW; i++) out[i] = D(acc[i]);
      } else {
        int64_t acc_off = 0;
        for (int64_t r = 0; r < ux; r++) {
          for (int64_t q = 0; q < Q[r]; q++) out[q * ux + r] = D(acc[acc_off + q]);
          acc_off += Q[r];
        }
      }
    }
  }
};

// A separable filter, one output row at a time: the input rows that the row's vertical taps
// meet (with up > 1, only those on non-inserted rows) are combined into one zero-margined row,
// the sum kept in a register; that row is then filtered along W, polyphase like `Pass`: each
// tap of each output residue is a (weight, pointer) pair, out_r[q] = sum_j w_j * p_j[q * down].
// Down 1 and 2 read the row directly (the compiler deinterleaves stride-2 loads in registers);
// a larger `down` first splits the row into its phases (columns i*down + s). The usual tap
// counts are compile-time constants, so the sums unroll and the q loops vectorise; the taps
// and row offsets are planned once per call, so a row costs no index arithmetic.
template <typename A>
struct SepRows {
  int64_t H, W, OH, OW, fh, fw, ux, uy, dx, dy, px0, py0;
  std::vector<A> u, v;  // Vertical and horizontal correlation taps.
  std::vector<int64_t> Q;                                // Output columns per residue.
  std::vector<std::vector<std::pair<A, int64_t>>> htaps;  // Per residue: (tap, offset into the phases).
  std::vector<std::vector<std::pair<A, int64_t>>> vtaps;  // Per output row: (tap, offset of its input row).
  int64_t margin_l = 0, row_len = 0, phase_len = 0;

  void plan() {
    Q.assign(ux, 0);
    htaps.assign(ux, {});
    std::vector<std::vector<std::pair<A, int64_t>>> offs(ux);
    int64_t min_ix = 0, max_ix = W - 1;
    for (int64_t r = 0; r < ux; r++) {
      Q[r] = r < OW ? (OW - 1 - r) / ux + 1 : 0;
      if (Q[r] == 0) continue;
      for (int64_t kx = 0; kx < fw; kx++) {
        const int64_t num = r * dx + kx - px0;
        if (floormod(num, ux) != 0 || v[kx] == A(0)) continue;
        const int64_t off = floordiv(num, ux);  // Output q of residue r reads input column q*dx + off.
        offs[r].push_back({v[kx], off});
        min_ix = std::min(min_ix, off);
        max_ix = std::max(max_ix, (Q[r] - 1) * dx + off);
      }
    }
    margin_l = -min_ix;
    phase_len = (margin_l + max_ix + 1 + dx - 1) / dx + 1;
    row_len = phase_len * dx;
    for (int64_t r = 0; r < ux; r++)
      for (const auto& t : offs[r]) {
        const int64_t idx = t.second + margin_l;  // Row index of output 0 (for down > 2: phase idx % dx, shifted by idx / dx).
        htaps[r].push_back({t.first, dx > 2 ? (idx % dx) * phase_len + idx / dx : idx});
      }
    vtaps.assign(OH, {});
    for (int64_t oy = 0; oy < OH; oy++)
      for (int64_t ky = 0; ky < fh; ky++) {
        const int64_t num = oy * dy + ky - py0;
        if (floormod(num, uy) != 0 || u[ky] == A(0)) continue;
        const int64_t iy = floordiv(num, uy);
        if (iy >= 0 && iy < H) vtaps[oy].push_back({u[ky], iy * W});
      }
  }

  size_t work_size() const { return size_t(row_len * (dx > 2 ? 2 : 1) + (ux > 1 ? OW : 0)); }

  // dst[q] = sum_k w[k] * src[k][q * STRIDE] for q < n; N taps (0: k_n, not unrolled).
  template <int N, int STRIDE>
  static void weighted_sum(A* __restrict__ dst, const A* const* src, const A* w, int64_t k_n, int64_t n) {
    if (N > 0) {
      for (int64_t q = 0; q < n; q++) {
        A s = w[0] * src[0][q * STRIDE];
        for (int k = 1; k < N; k++) s += w[k] * src[k][q * STRIDE];
        dst[q] = s;
      }
      return;
    }
    for (int64_t q = 0; q < n; q++) {
      A s = A(0);
      for (int64_t k = 0; k < k_n; k++) s += w[k] * src[k][q * STRIDE];
      dst[q] = s;
    }
  }

  template <int STRIDE>
  static void sum_dispatch(A* dst, const A* const* src, const A* w, int64_t k_n, int64_t n) {
    switch (k_n) {
      case 1: return weighted_sum<1, STRIDE>(dst, src, w, k_n, n);
      case 2: return weighted_sum<2, STRIDE>(dst, src, w, k_n, n);
      case 3: return weighted_sum<3, STRIDE>(dst, src, w, k_n, n);
      case 4: return weighted_sum<4, STRIDE>(dst, src, w, k_n, n);
      case 5: return weighted_sum<5, STRIDE>(dst, src, w, k_n, n);
      case 6: return weighted_sum<6, STRIDE>(dst, src, w, k_n, n);
      case 8: return weighted_sum<8, STRIDE>(dst, src, w, k_n, n);
      case 12: return weighted_sum<12, STRIDE>(dst, src, w, k_n, n);
      default: return weighted_sum<0, STRIDE>(dst, src, w, k_n, n);
    }
  }

  // One plane: x [H, W] -> out [OH, OW]. `ptrs`, `w`: scratch of max(fh, fw) entries.
  void run(const A* __restrict__ x, A* __restrict__ dst, A* __restrict__ work, const A** ptrs, A* w) const {
    A* row = work;                                   // [row_len]: input columns at margin_l.
    A* phases = dx > 2 ? work + row_len : row;       // [dx][phase_len]: phase s holds row[i*dx + s].
    A* res = work + row_len * (dx > 2 ? 2 : 1);      // [OW]: the residues before interleaving.
    for (int64_t i = 0; i < row_len; i++) row[i] = A(0);
    for (int64_t oy = 0; oy < OH; oy++) {
      const auto& rows = vtaps[oy];
      for (size_t j = 0; j < rows.size(); j++) {
        ptrs[j] = x + rows[j].second;
        w[j] = rows[j].first;
      }
      sum_dispatch<1>(row + margin_l, ptrs, w, int64_t(rows.size()), W);
      if (dx > 2)
        for (int64_t s = 0; s < dx; s++)
          for (int64_t i = 0; i < phase_len; i++) phases[s * phase_len + i] = row[i * dx + s];
      A* out = dst + oy * OW;
      int64_t res_off = 0;
      for (int64_t r = 0; r < ux; r++) {
        const auto& taps = htaps[r];
        for (size_t j = 0; j < taps.size(); j++) {
          ptrs[j] = phases + taps[j].second;
          w[j] = taps[j].first;
        }
        A* target = ux == 1 ? out : res + res_off;
        if (dx == 2)  // Stride-2 loads straight from the row: the compiler deinterleaves in registers.
          sum_dispatch<2>(target, ptrs, w, int64_t(taps.size()), Q[r]);
        else
          sum_dispatch<1>(target, ptrs, w, int64_t(taps.size()), Q[r]);
        res_off += Q[r];
      }
      if (ux == 2) {  // One loop over both residues, so the interleaving stores vectorise.
        const A* __restrict__ r0 = res;
        const A* __restrict__ r1 = res + Q[0];
        const int64_t both = Q[1];  // Q[0] is Q[1] or Q[1] + 1.
        for (int64_t q = 0; q < both; q++) {
          out[2 * q] = r0[q];
          out[2 * q + 1] = r1[q];
        }
        if (Q[0] > both) out[2 * both] = r0[both];
      } else if (ux > 2) {
        res_off = 0;
        for (int64_t r = 0; r < ux; r++) {
          for (int64_t q = 0; q < Q[r]; q++) out[q * ux + r] = res[res_off + q];
          res_off += Q[r];
        }
      }
    }
  }
};

template <typename A>
bool factor_rank1(const std::vector<A>& k, int64_t fh, int64_t fw, std::vector<A>& u, std::vector<A>& v) {
  int64_t best = 0;
  for (int64_t i = 1; i < fh * fw; i++)
    if (std::abs(k[i]) > std::abs(k[best])) best = i;
  A peak = k[best];
  if (peak == A(0)) return false;
  int64_t i0 = best / fw, j0 = best % fw;
  u.resize(fh);
  v.resize(fw);
  for (int64_t i = 0; i < fh; i++) u[i] = k[i * fw + j0];
  for (int64_t j = 0; j < fw; j++) v[j] = k[i0 * fw + j] / peak;
  // A few ulps of the largest tap: what rounding the outer product to A leaves.
  const A tol = A(4) * std::numeric_limits<A>::epsilon() * std::abs(peak);
  for (int64_t i = 0; i < fh; i++)
    for (int64_t j = 0; j < fw; j++)
      if (std::abs(u[i] * v[j] - k[i * fw + j]) > tol) return false;
  return true;
}

struct Params {
  int64_t planes, H, W, fw, fh, upx, upy, downx, downy, px0, px1, py0, py1, OH, OW;
  int separable, flip;
  double gain;
};

template <typename T>
void run(T* y, const T* x, const float* f, const Params& p) {
  using A = T;  // float32 accumulates in float32, like the reference convolution.
  // Correlation taps: conv2d correlates, so true convolution (flip=0) reverses the filter.
  auto tap = [&](int64_t i, int64_t n) { return p.flip ? i : n - 1 - i; };
  std::vector<A> u, v;  // Vertical and horizontal 1-D taps, if separable.
  std::vector<A> k2;
  bool separable = p.separable != 0;
  if (separable) {
    const A g = A(std::sqrt(p.gain));
    v.resize(p.fw);
    for (int64_t j = 0; j < p.fw; j++) v[j] = A(f[tap(j, p.fw)]) * g;
    u = v;
  } else {
    k2.resize(p.fh * p.fw);
    for (int64_t i = 0; i < p.fh; i++)
      for (int64_t j = 0; j < p.fw; j++) k2[i * p.fw + j] = A(f[tap(i, p.fh) * p.fw + tap(j, p.fw)]) * A(p.gain);
    separable = p.fh > 1 && p.fw > 1 && factor_rank1(k2, p.fh, p.fw, u, v);
  }

  if (!separable) {
    Pass<A> pass{p.H, p.W, p.OH, p.OW, p.fh, p.fw, p.upx, p.upy, p.downx, p.downy, p.px0, p.py0, k2};
    pass.plan();
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, p.OH * p.OW * p.fh));
    at::parallel_for(0, p.planes, grain, [&](int64_t begin, int64_t end) {
      std::vector<A> rows(pass.H * pass.row_len, A(0)), acc(pass.OW);
      for (int64_t i = begin; i < end; i++) pass.run(x + i * p.H * p.W, y + i * p.OH * p.OW, rows.data(), acc.data());
    });
    return;
  }

  SepRows<A> sr{p.H, p.W, p.OH, p.OW, p.fh, p.fw, p.upx, p.upy, p.downx, p.downy, p.px0, p.py0, u, v};
  sr.plan();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, p.OH * p.OW * (p.fh + p.fw)));
  at::parallel_for(0, p.planes, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> work(sr.work_size()), w(std::max(p.fh, p.fw));
    std::vector<const A*> ptrs(w.size());
    for (int64_t i = begin; i < end; i++) sr.run(x + i * p.H * p.W, y + i * p.OH * p.OW, work.data(), ptrs.data(), w.data());
  });
}

bool parse(PyObject* args, unsigned long long* y, unsigned long long* x, unsigned long long* f, int* dtype, Params* p,
           unsigned long long* stream, bool with_stream) {
  long long v[15];
  const char* fmt = with_stream ? "KKKiLLLLLiLLLLLLLLLLidK" : "KKKiLLLLLiLLLLLLLLLLid";
  int ok = with_stream
               ? PyArg_ParseTuple(args, fmt, y, x, f, dtype, &v[0], &v[1], &v[2], &v[3], &v[4], &p->separable, &v[5],
                                  &v[6], &v[7], &v[8], &v[9], &v[10], &v[11], &v[12], &v[13], &v[14], &p->flip,
                                  &p->gain, stream)
               : PyArg_ParseTuple(args, fmt, y, x, f, dtype, &v[0], &v[1], &v[2], &v[3], &v[4], &p->separable, &v[5],
                                  &v[6], &v[7], &v[8], &v[9], &v[10], &v[11], &v[12], &v[13], &v[14], &p->flip,
                                  &p->gain);
  if (!ok) return false;
  p->planes = v[0], p->H = v[1], p->W = v[2], p->fh = v[3], p->fw = v[4];
  p->upx = v[5], p->upy = v[6], p->downx = v[7], p->downy = v[8];
  p->px0 = v[9], p->px1 = v[10], p->py0 = v[11], p->py1 = v[12], p->OH = v[13], p->OW = v[14];
  return true;
}

void check(const Params& p) {
  if (p.upx < 1 || p.upy < 1 || p.downx < 1 || p.downy < 1) throw std::invalid_argument("upfirdn2d: bad scaling");
  if (p.OW != (p.W * p.upx + p.px0 + p.px1 - p.fw) / p.downx + 1 ||
      p.OH != (p.H * p.upy + p.py0 + p.py1 - p.fh) / p.downy + 1 || p.OW < 1 || p.OH < 1)
    throw std::invalid_argument("upfirdn2d: output size does not match the arguments");
}

// upfirdn2d_cpu(y, x, f, dtype, planes, H, W, fh, fw, separable, upx, upy, downx, downy,
//               px0, px1, py0, py1, OH, OW, flip, gain): contiguous x [planes, H, W] -> y [planes, OH, OW];
// f float32 [fh, fw], or [fw] (fh == fw) when separable.
PyObject* upfirdn2d_cpu(PyObject*, PyObject* args) {
  unsigned long long y, x, f, stream = 0;
  int dtype;
  Params p;
  if (!parse(args, &y, &x, &f, &dtype, &p, &stream, false)) return nullptr;
  PLUGIN_CALL({
    check(p);
    if (dtype == plugin::kFloat32)
      run<float>(plugin::ptr<float>(y), plugin::ptr<const float>(x), plugin::ptr<const float>(f), p);
    else if (dtype == plugin::kFloat64)
      run<double>(plugin::ptr<double>(y), plugin::ptr<const double>(x), plugin::ptr<const float>(f), p);
    else
      throw std::invalid_argument("upfirdn2d: the CPU kernel takes float32 or float64");
  });
}

#ifdef WITH_CUDA
// upfirdn2d_cuda(... same as the CPU ..., stream); x and y contiguous, f on the device.
PyObject* upfirdn2d_cuda(PyObject*, PyObject* args) {
  unsigned long long y, x, f, stream = 0;
  int dtype;
  Params p;
  if (!parse(args, &y, &x, &f, &dtype, &p, &stream, true)) return nullptr;
  PLUGIN_CALL({
    check(p);
    upfirdn2d_cuda_launch(dtype, (void*)(uintptr_t)y, (const void*)(uintptr_t)x, (const float*)(uintptr_t)f,
                          p.planes, p.H, p.W, p.fh, p.fw, p.separable, p.upx, p.upy, p.downx, p.downy, p.px0, p.py0,
                          p.OH, p.OW, p.flip, p.gain, (void*)(uintptr_t)stream);
  });
}
#endif

PyMethodDef methods[] = {
    {"upfirdn2d_cpu", upfirdn2d_cpu, METH_VARARGS, "upfirdn2d on the CPU"},
#ifdef WITH_CUDA
    {"upfirdn2d_cuda", upfirdn2d_cuda, METH_VARARGS, "upfirdn2d on CUDA"},
#endif
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

PLUGIN_MODULE(methods)
