// CPU kernels of uresnet_ops::_shuffle_upsample_conv_native(_backward) and of the backward's two
// passes through BatchNorm (_shuffle_upsample_bn_sums_native, _shuffle_upsample_bn_backward_native):
// the first half of the EUCB block, conv3x3_grouped(upsample(x)), with the upsample fused into the
// convolution; and the op itself (uresnet_ops::shuffle_upsample and its native twin), the
// composition of csrc/shuffle_upsample.h around them.
//
// One task per (sample, conv group). Nearest x2 reads its Cg input planes from zero-bordered
// low-resolution copies by the parity identity; the other modes, and the backward, upsample
// them into zero-bordered buffers the size of one output plane (in cache) and run the 3x3 taps
// as contiguous row sweeps. The epilogue (per-channel moments, bias, activation, or the
// BatchNorm terms) runs on each finished plane before it is written once. The upsampled tensor
// never exists in memory.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "../common.h"
#include "../shuffle_upsample.h"
#include "cpu_common.h"

namespace uresnet {
namespace {

constexpr const char* kOp = "uresnet_ops::_shuffle_upsample_conv_native";

enum class Mode { Nearest, Bilinear };

// Source rows (or columns) of each upsampled row: nearest uses i0; bilinear (align_corners=False)
// blends i0 and i1 with weight l1 on i1, as ATen's upsample_bilinear2d computes them.
template <typename opmath_t>
struct Taps {
  std::vector<int64_t> i0, i1;
  std::vector<opmath_t> l1;
  Taps(int64_t in, int64_t s, Mode mode) : i0(in * s), i1(in * s), l1(in * s, 0) {
    for (int64_t o = 0; o < in * s; ++o) {
      if (mode == Mode::Nearest) {
        i0[o] = i1[o] = o / s;
        continue;
      }
      const opmath_t src = std::max<opmath_t>((static_cast<opmath_t>(o) + opmath_t(0.5)) / s - opmath_t(0.5), 0);
      i0[o] = static_cast<int64_t>(src);
      i1[o] = i0[o] + (i0[o] < in - 1 ? 1 : 0);
      l1[o] = src - static_cast<opmath_t>(i0[o]);
    }
  }
};

struct Geometry {
  int64_t N, C, H, W, s, OH, OW, Cg, groups;
  int64_t padded() const { return (OH + 2) * (OW + 2); }  // one zero-bordered upsampled plane
};

Geometry geometry(const at::Tensor& x, const at::Tensor& weight, int64_t s) {
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), s, x.size(2) * s, x.size(3) * s, weight.size(1), 0};
  g.groups = g.C / g.Cg;
  return g;
}

Mode check_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight, int64_t s, c10::string_view mode) {
  return check_upsample_conv(op, x, weight, s, mode) ? Mode::Bilinear : Mode::Nearest;
}

// Fills the interior of a zero-bordered (OH+2) x (OW+2) buffer with the upsampled plane of x.
template <typename scalar_t, typename opmath_t>
void upsample_plane(const scalar_t* x, int64_t sH, int64_t sW, const Geometry& g, const Taps<opmath_t>& rows,
                    const Taps<opmath_t>& cols, Mode mode, opmath_t* buf) {
  const int64_t stride = g.OW + 2;
  std::fill(buf, buf + stride, opmath_t(0));
  std::fill(buf + (g.OH + 1) * stride, buf + (g.OH + 2) * stride, opmath_t(0));
  for (int64_t oh = 0; oh < g.OH; ++oh) {
    opmath_t* dst = buf + (oh + 1) * stride;
    dst[0] = dst[g.OW + 1] = 0;
    ++dst;
    const scalar_t* r0 = x + rows.i0[oh] * sH;
    if (mode == Mode::Nearest) {
      if (oh > 0 && rows.i0[oh] == rows.i0[oh - 1]) {  // same source row: copy the row above
        std::copy(dst - stride, dst - stride + g.OW, dst);
        continue;
      }
      if (g.s == 2 && sW == 1)
        for (int64_t w = 0; w < g.W; ++w) dst[2 * w] = dst[2 * w + 1] = static_cast<opmath_t>(r0[w]);
      else
        for (int64_t ow = 0; ow < g.OW; ++ow) dst[ow] = static_cast<opmath_t>(r0[cols.i0[ow] * sW]);
    } else {
      const scalar_t* r1 = x + rows.i1[oh] * sH;
      const opmath_t h1 = rows.l1[oh], h0 = 1 - h1;
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const int64_t a = cols.i0[ow] * sW, b = cols.i1[ow] * sW;
        const opmath_t w1 = cols.l1[ow], w0 = 1 - w1;
        dst[ow] = h0 * (w0 * static_cast<opmath_t>(r0[a]) + w1 * static_cast<opmath_t>(r0[b])) +
                  h1 * (w0 * static_cast<opmath_t>(r1[a]) + w1 * static_cast<opmath_t>(r1[b]));
      }
    }
  }
}

// row[i] (+)= sum over the 3x3 taps of w[kh][kw] * src[kh * stride + i + kw]: the nine taps of
// one output element accumulate in registers and the row is stored once (nine separate AXPYs
// over the row would chain on store-to-load forwarding).
template <bool Accumulate, typename T>
C10_ALWAYS_INLINE void conv3x3_row(T* C10_RESTRICT row, const T* C10_RESTRICT src, int64_t stride, const T* w,
                                   int64_t n) {
  const T* r0 = src;
  const T* r1 = src + stride;
  const T* r2 = src + 2 * stride;
  const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5], w6 = w[6], w7 = w[7], w8 = w[8];
  for (int64_t i = 0; i < n; ++i) {
    const T v = w0 * r0[i] + w1 * r0[i + 1] + w2 * r0[i + 2] + w3 * r1[i] + w4 * r1[i + 1] + w5 * r1[i + 2] +
                w6 * r2[i] + w7 * r2[i + 1] + w8 * r2[i + 2];
    row[i] = Accumulate ? row[i] + v : v;
  }
}

// ---- forward ------------------------------------------------------------------------------

// Mean and M2 of v[0..len) in one pass, from sums of deviations from v[0]: stable when the
// values lie far from zero (mean 1e4, std 1), because v[0] is then as far from them as they
// are from each other.
template <typename T>
void shifted_moments(const T* v, int64_t len, T& mean, T& m2) {
  const T k = v[0];
  T t1 = 0, t2 = 0;
#pragma omp simd reduction(+ : t1, t2)  // a vectorised reduction (plain FP sums are not reordered)
  for (int64_t i = 0; i < len; ++i) {
    const T d = v[i] - k;
    t1 += d, t2 += d * d;
  }
  mean = k + t1 / static_cast<T>(len);
  m2 = std::max<T>(t2 - t1 * t1 / static_cast<T>(len), 0);
}

// Nearest x2 by parity (docs/design.md §3.2; tests/test_shuffle_upsample.py proves the
// identity): output row 2i+a reads two low-resolution rows, top (i-1 for a=0, i for a=1) and
// bottom (the next), with the 3x3 kernel's rows summed into two (a=0: w0 | w1+w2,
// a=1: w0+w1 | w2); output column 2j+b likewise reads columns j-1, j (b=0) or j, j+1 (b=1).
// 8 multiply-adds per output pair instead of 18, read straight from a zero-bordered
// low-resolution plane.
struct ParityTaps {
  // [a][top/bottom][even-left, even-right, odd-left, odd-right]
  template <typename T>
  static void of(const T* w, T out[2][2][4]) {
    for (int a = 0; a < 2; ++a)
      for (int tb = 0; tb < 2; ++tb) {
        T u[3];
        for (int kw = 0; kw < 3; ++kw) {
          const T r0 = w[kw], r1 = w[3 + kw], r2 = w[6 + kw];
          u[kw] = a == 0 ? (tb == 0 ? r0 : r1 + r2) : (tb == 0 ? r0 + r1 : r2);
        }
        out[a][tb][0] = u[0], out[a][tb][1] = u[1] + u[2], out[a][tb][2] = u[0] + u[1], out[a][tb][3] = u[2];
      }
  }
};

// row[2j], row[2j+1] (+)= the parity sums over the low-resolution rows top, bottom (zero-bordered:
// index 0 is column -1).
template <bool Accumulate, typename T>
C10_ALWAYS_INLINE void conv_row_nearest2(T* C10_RESTRICT row, const T* C10_RESTRICT top,
                                         const T* C10_RESTRICT bottom, const T (&t)[2][4], int64_t W) {
  for (int64_t j = 0; j < W; ++j) {
    const T even = t[0][0] * top[j] + t[0][1] * top[j + 1] + t[1][0] * bottom[j] + t[1][1] * bottom[j + 1];
    const T odd = t[0][2] * top[j + 1] + t[0][3] * top[j + 2] + t[1][2] * bottom[j + 1] + t[1][3] * bottom[j + 2];
    row[2 * j] = Accumulate ? row[2 * j] + even : even;
    row[2 * j + 1] = Accumulate ? row[2 * j + 1] + odd : odd;
  }
}

// Copies a plane of x into the interior of a zero-bordered (H+2) x (W+2) buffer.
template <typename scalar_t, typename opmath_t>
void pad_plane(const scalar_t* x, int64_t sH, int64_t sW, const Geometry& g, opmath_t* buf) {
  std::fill(buf, buf + (g.H + 2) * (g.W + 2), opmath_t(0));
  for (int64_t h = 0; h < g.H; ++h)
    for (int64_t w = 0; w < g.W; ++w) buf[(h + 1) * (g.W + 2) + w + 1] = static_cast<opmath_t>(x[h * sH + w * sW]);
}

// Calls epilogue(n, co, plane) for every output plane of conv3x3_grouped(upsample(x), weight),
// plane being that (OH x OW) conv output in opmath in a per-thread buffer, from a thread of the
// parallel region (the epilogue may index per-thread accumulators by at::get_thread_num()).
template <typename scalar_t, typename Epilogue>
void for_each_conv_plane(const at::Tensor& x, const at::Tensor& weight, Mode mode, const Geometry& g,
                         const Epilogue& epilogue) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Taps<opmath_t> rows(g.H, g.s, mode), cols(g.W, g.s, mode);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const opmath_t* wp = weight.const_data_ptr<opmath_t>();
  const bool parity = mode == Mode::Nearest && g.s == 2;
  // per input plane: the upsampled plane, or for parity the low-resolution one, zero-bordered
  const int64_t stride = parity ? g.W + 2 : g.OW + 2, plane_size = parity ? (g.H + 2) * stride : g.padded();
  parallel_for_best_isa</*AllowAVX512=*/true>(0, g.N * g.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> in(static_cast<size_t>(g.Cg * plane_size)), conv(static_cast<size_t>(g.OH * g.OW));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / g.groups, c0 = (task % g.groups) * g.Cg;
      for (int64_t ci = 0; ci < g.Cg; ++ci) {
        const scalar_t* src = xp + n * x.stride(0) + (c0 + ci) * x.stride(1);
        if (parity) pad_plane(src, x.stride(2), x.stride(3), g, in.data() + ci * plane_size);
        else upsample_plane<scalar_t, opmath_t>(src, x.stride(2), x.stride(3), g, rows, cols, mode,
                                                in.data() + ci * plane_size);
      }
      for (int64_t co = c0; co < c0 + g.Cg; ++co) {
        const opmath_t* w = wp + co * g.Cg * 9;
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          opmath_t* row = conv.data() + oh * g.OW;
          for (int64_t ci = 0; ci < g.Cg; ++ci) {
            if (parity) {
              opmath_t t[2][2][4];
              ParityTaps::of(w + ci * 9, t);  // cheap next to the row: 24 adds
              const int64_t a = oh % 2, top = oh / 2 - 1 + a;  // low-res row of the top tap
              const opmath_t* p = in.data() + ci * plane_size + (top + 1) * stride;
              if (ci == 0) conv_row_nearest2<false>(row, p, p + stride, t[a], g.W);
              else conv_row_nearest2<true>(row, p, p + stride, t[a], g.W);
              continue;
            }
            const opmath_t* src = in.data() + ci * plane_size + oh * stride;
            if (ci == 0) conv3x3_row<false>(row, src, stride, w, g.OW);
            else conv3x3_row<true>(row, src, stride, w + ci * 9, g.OW);
          }
        }
        epilogue(n, co, conv.data());
      }
    }
  });
}

template <typename scalar_t, Activation A>
void forward_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, Mode mode,
                    double slope_d, at::Tensor& out, at::Tensor& mean, at::Tensor& var, const Geometry& g) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t slope = static_cast<opmath_t>(slope_d);
  const opmath_t* bp = bias.defined() ? bias.const_data_ptr<opmath_t>() : nullptr;
  const int64_t plane = g.OH * g.OW;
  if (!mean.defined()) {
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_each_conv_plane<scalar_t>(x, weight, mode, g, [&](int64_t n, int64_t co, const opmath_t* conv) {
      const opmath_t b = bp ? bp[co] : opmath_t(0);
      scalar_t* dst = op + (n * g.C + co) * plane;
      for (int64_t i = 0; i < plane; ++i) dst[i] = static_cast<scalar_t>(activate<A>(conv[i] + b, slope));
    });
    return;
  }
  const int nthreads = at::get_num_threads();
  std::vector<Moments> acc(static_cast<size_t>(nthreads) * g.C);
  for_each_conv_plane<scalar_t>(x, weight, mode, g, [&](int64_t, int64_t co, const opmath_t* conv) {
    opmath_t m, m2;
    shifted_moments(conv, plane, m, m2);
    acc[static_cast<size_t>(at::get_thread_num()) * g.C + co].merge(static_cast<double>(plane), m, m2);
  });
  opmath_t* mp = mean.mutable_data_ptr<opmath_t>();
  opmath_t* vp = var.mutable_data_ptr<opmath_t>();
  for (int64_t c = 0; c < g.C; ++c) {
    Moments t;
    for (int th = 0; th < nthreads; ++th) {
      const Moments& m = acc[static_cast<size_t>(th) * g.C + c];
      t.merge(m.n, m.mean, m.m2);
    }
    mp[c] = static_cast<opmath_t>(t.mean);
    vp[c] = static_cast<opmath_t>(t.n > 0 ? t.m2 / t.n : 0.0);
  }
}

// Returns (out, mean, var). Without stats: out = act(conv3x3_grouped(upsample(x), weight) + bias),
// NCHW contiguous in x's dtype, and empty mean/var. With stats: only the per-channel mean and
// biased variance of the conv output (the BatchNorm batch statistics; recomputing the conv with
// BatchNorm folded in costs less than writing it and reading it back), and an empty out.
std::tuple<at::Tensor, at::Tensor, at::Tensor> shuffle_upsample_conv_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t scale_factor,
    c10::string_view mode_name, c10::string_view activation, double negative_slope, bool stats) {
  const Mode mode = check_inputs(kOp, x, weight, scale_factor, mode_name);
  check_upsample_conv_bias(kOp, bias, x);
  const Activation act = parse_activation(activation, kOp);
  const Geometry g = geometry(x, weight, scale_factor);
  at::Tensor out = stats ? at::empty({0}, x.options()) : at::empty({g.N, g.C, g.OH, g.OW}, x.options());
  const auto stat_opts = x.options().dtype(stat_dtype(x));
  at::Tensor mean = at::zeros({stats ? g.C : 0}, stat_opts), var = at::zeros({stats ? g.C : 0}, stat_opts);
  if (g.N * g.OH * g.OW == 0) return {out, mean, var};  // empty batch: zero statistics, as the reference
  const at::Tensor w = weight.contiguous(), b = has(bias) ? bias->contiguous() : at::Tensor();
  at::Tensor o = stats ? at::Tensor() : out, m = stats ? mean : at::Tensor(), v = stats ? var : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "shuffle_upsample_conv_cpu", [&] {
    URESNET_DISPATCH_ACTIVATION(act, forward_kernel<scalar_t, A>(x, w, b, mode, negative_slope, o, m, v, g));
  });
  return {out, mean, var};
}

// ---- backward -----------------------------------------------------------------------------

// Adds the gradient of one upsampled plane (OH x OW) into its source plane (H x W), the
// adjoint of upsample_plane.
template <typename opmath_t>
void downsample_plane(const opmath_t* grad_up, const Geometry& g, const Taps<opmath_t>& rows,
                      const Taps<opmath_t>& cols, Mode mode, opmath_t* grad) {
  std::fill(grad, grad + g.H * g.W, opmath_t(0));
  for (int64_t oh = 0; oh < g.OH; ++oh) {
    const opmath_t* src = grad_up + oh * g.OW;
    opmath_t* r0 = grad + rows.i0[oh] * g.W;
    if (mode == Mode::Nearest && g.s == 2) {  // the common case, without index tables
      for (int64_t w = 0; w < g.W; ++w) r0[w] += src[2 * w] + src[2 * w + 1];
      continue;
    }
    if (mode == Mode::Nearest) {  // one source each: no zero-weighted terms (0 * inf would be NaN)
      for (int64_t ow = 0; ow < g.OW; ++ow) r0[cols.i0[ow]] += src[ow];
      continue;
    }
    opmath_t* r1 = grad + rows.i1[oh] * g.W;
    const opmath_t h1 = rows.l1[oh], h0 = 1 - h1;
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      const opmath_t w1 = cols.l1[ow], w0 = 1 - w1, v = src[ow];
      r0[cols.i0[ow]] += h0 * w0 * v;
      r0[cols.i1[ow]] += h0 * w1 * v;
      r1[cols.i0[ow]] += h1 * w0 * v;
      r1[cols.i1[ow]] += h1 * w1 * v;
    }
  }
}

// The transposed pass of the upsample-conv. fill_grad(n, c, oh, up, row) writes row oh of the
// conv-output gradient of channel c (OW values, opmath); up holds the task's Cg upsampled input
// planes (zero-bordered), from which a fill may recompute the conv output it needs.
template <typename scalar_t, typename FillGrad>
void backward_kernel(const at::Tensor& x, const at::Tensor& weight, Mode mode, at::Tensor& grad_x,
                     at::Tensor& grad_weight, const Geometry& g, const FillGrad& fill_grad) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Taps<opmath_t> rows(g.H, g.s, mode), cols(g.W, g.s, mode);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const opmath_t* wp = weight.const_data_ptr<opmath_t>();
  scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
  const int64_t plane = g.OH * g.OW, stride = g.OW + 2, wsize = g.C * g.Cg * 9;
  const int nthreads = at::get_num_threads();
  std::vector<double> gw_acc(static_cast<size_t>(nthreads) * wsize, 0.0);

  parallel_for_best_isa(0, g.N * g.groups, 1, [&](int64_t begin, int64_t end) {
    // up: the group's upsampled input planes; dz: its output-gradient planes, zero-bordered so
    // the transposed conv reads them like the forward reads up; row / low: one plane each.
    std::vector<opmath_t> up(static_cast<size_t>(g.Cg * g.padded())), dz(static_cast<size_t>(g.Cg * g.padded()), 0);
    std::vector<opmath_t> grad_up(static_cast<size_t>(plane)), low(static_cast<size_t>(g.H * g.W));
    double* gw = gw_acc.data() + static_cast<size_t>(at::get_thread_num()) * wsize;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / g.groups, c0 = (task % g.groups) * g.Cg;
      for (int64_t c = 0; c < g.Cg; ++c)
        upsample_plane<scalar_t, opmath_t>(xp + n * x.stride(0) + (c0 + c) * x.stride(1), x.stride(2), x.stride(3),
                                           g, rows, cols, mode, up.data() + c * g.padded());
      for (int64_t c = 0; c < g.Cg; ++c)
        for (int64_t oh = 0; oh < g.OH; ++oh)
          fill_grad(n, c0 + c, oh, up.data(), dz.data() + c * g.padded() + (oh + 1) * stride + 1);
      // grad_weight[co, ci, kh, kw] += sum over the plane of dz[co] * up[ci] shifted by (kh, kw):
      // one sweep per tap over planes that stay in L1, each a plain vectorised dot product.
      for (int64_t co = 0; co < g.Cg; ++co)
        for (int64_t ci = 0; ci < g.Cg; ++ci)
          for (int64_t k = 0; k < 9; ++k) {
            opmath_t sum = 0;
            for (int64_t oh = 0; oh < g.OH; ++oh) {
              const opmath_t* d = dz.data() + co * g.padded() + (oh + 1) * stride + 1;
              const opmath_t* u = up.data() + ci * g.padded() + (oh + k / 3) * stride + k % 3;
#pragma omp simd reduction(+ : sum)
              for (int64_t i = 0; i < g.OW; ++i) sum += d[i] * u[i];
            }
            gw[((c0 + co) * g.Cg + ci) * 9 + k] += sum;
          }
      // grad of upsampled input ci: the transposed conv, dz[co] read at (oh - kh + 1, ow - kw + 1).
      for (int64_t ci = 0; ci < g.Cg; ++ci) {
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          opmath_t* row = grad_up.data() + oh * g.OW;
          for (int64_t co = 0; co < g.Cg; ++co) {
            // The transposed conv is the forward row sweep with the kernel rotated by 180 degrees.
            const opmath_t* w = wp + ((c0 + co) * g.Cg + ci) * 9;
            const opmath_t flipped[9] = {w[8], w[7], w[6], w[5], w[4], w[3], w[2], w[1], w[0]};
            const opmath_t* src = dz.data() + co * g.padded() + oh * stride;
            if (co == 0) conv3x3_row<false>(row, src, stride, flipped, g.OW);
            else conv3x3_row<true>(row, src, stride, flipped, g.OW);
          }
        }
        downsample_plane(grad_up.data(), g, rows, cols, mode, low.data());
        scalar_t* dst = gxp + (n * g.C + c0 + ci) * g.H * g.W;
        for (int64_t i = 0; i < g.H * g.W; ++i) dst[i] = static_cast<scalar_t>(low[i]);
      }
    }
  });
  opmath_t* gwp = grad_weight.mutable_data_ptr<opmath_t>();
  for (int64_t i = 0; i < wsize; ++i) {
    double t = 0;
    for (int th = 0; th < nthreads; ++th) t += gw_acc[static_cast<size_t>(th) * wsize + i];
    gwp[i] = static_cast<opmath_t>(t);
  }
}

// The plain backward: the conv-output gradient is given.
template <typename scalar_t>
void backward_kernel(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, Mode mode,
                     at::Tensor& grad_x, at::Tensor& grad_weight, const Geometry& g) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  backward_kernel<scalar_t>(x, weight, mode, grad_x, grad_weight, g,
                            [&](int64_t n, int64_t c, int64_t oh, const opmath_t*, opmath_t* dst) {
                              const scalar_t* row = gp + n * grad.stride(0) + c * grad.stride(1) + oh * grad.stride(2);
                              if (grad.stride(3) == 1)  // the usual case: a contiguous row, a vectorised copy
                                for (int64_t ow = 0; ow < g.OW; ++ow) dst[ow] = static_cast<opmath_t>(row[ow]);
                              else
                                for (int64_t ow = 0; ow < g.OW; ++ow)
                                  dst[ow] = static_cast<opmath_t>(row[ow * grad.stride(3)]);
                            });
}

// Returns (grad_x, grad_weight): grad_x NCHW contiguous in x's dtype, grad_weight in weight's.
std::tuple<at::Tensor, at::Tensor> shuffle_upsample_conv_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                       const at::Tensor& weight, int64_t scale_factor,
                                                                       c10::string_view mode_name) {
  constexpr const char* op = "uresnet_ops::_shuffle_upsample_conv_native_backward";
  const Mode mode = check_inputs(op, x, weight, scale_factor, mode_name);
  check_upsample_conv_grad(op, grad, x, scale_factor);
  const Geometry g = geometry(x, weight, scale_factor);
  at::Tensor grad_x = at::empty({g.N, g.C, g.H, g.W}, x.options());
  at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options());
  if (x.numel() == 0) return {grad_x, grad_weight};
  const at::Tensor w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "shuffle_upsample_conv_backward_cpu",
                                  [&] { backward_kernel<scalar_t>(grad, x, w, mode, grad_x, grad_weight, g); });
  return {grad_x, grad_weight};
}

// ---- backward through BatchNorm + activation ----------------------------------------------
//
// The part of the EUCB backward below the 1x1 conv, with the conv output z recomputed from x
// instead of stored. pre = scale * z + shift is the BatchNorm output, y = act(pre), and grad the
// gradient of y; grad_pre = act'(pre) * grad.
// Pass 1 (sums): per channel, sum(grad_pre) and sum(grad_pre * (z - mean)), the two reductions
// BatchNorm's backward needs, and y if asked (the 1x1 conv's weight gradient needs it).
// Pass 2: grad_z = scale * grad_pre + centered * (z - mean) + constant, formed row by row in
// cache and fed straight into the transposed conv; grad_z is never written.

template <typename opmath_t>
struct NormTerms {  // (C,) vectors
  const opmath_t *scale, *shift, *mean, *centered, *constant;
  opmath_t slope;
};

template <typename opmath_t>
NormTerms<opmath_t> norm_terms(const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& mean,
                               const at::Tensor& centered, const at::Tensor& constant, double slope) {
  const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<opmath_t>() : nullptr; };
  return {ptr(scale), ptr(shift), ptr(mean), ptr(centered), ptr(constant), static_cast<opmath_t>(slope)};
}

template <typename scalar_t, Activation A>
void bn_sums_kernel(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, Mode mode,
                    const NormTerms<at::opmath_type<scalar_t>>& t, at::Tensor& y, at::Tensor& sums,
                    const Geometry& g) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t plane = g.OH * g.OW;
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  scalar_t* yp = y.defined() ? y.mutable_data_ptr<scalar_t>() : nullptr;
  const int nthreads = at::get_num_threads();
  std::vector<double> acc(static_cast<size_t>(nthreads) * 2 * g.C, 0.0);
  for_each_conv_plane<scalar_t>(x, weight, mode, g, [&](int64_t n, int64_t c, const opmath_t* z) {
    const opmath_t sc = t.scale[c], sh = t.shift[c], mu = t.mean[c];
    const scalar_t* gy = gp + (n * g.C + c) * plane;
    scalar_t* out = yp ? yp + (n * g.C + c) * plane : nullptr;
    opmath_t s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t i = 0; i < plane; ++i) {
      const opmath_t pre = z[i] * sc + sh;
      const opmath_t d = cpu_activate_grad<A>(static_cast<opmath_t>(gy[i]), pre, t.slope);
      s1 += d, s2 += d * (z[i] - mu);
    }
    if (out)
      for (int64_t i = 0; i < plane; ++i) out[i] = static_cast<scalar_t>(activate<A>(z[i] * sc + sh, t.slope));
    double* a = acc.data() + static_cast<size_t>(at::get_thread_num()) * 2 * g.C;
    a[c] += s1, a[g.C + c] += s2;
  });
  opmath_t* sp = sums.mutable_data_ptr<opmath_t>();
  for (int64_t i = 0; i < 2 * g.C; ++i) {
    double total = 0;
    for (int th = 0; th < nthreads; ++th) total += acc[static_cast<size_t>(th) * 2 * g.C + i];
    sp[i] = static_cast<opmath_t>(total);
  }
}

template <typename scalar_t, Activation A>
void bn_backward_kernel(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, Mode mode,
                        const NormTerms<at::opmath_type<scalar_t>>& t, at::Tensor& grad_x, at::Tensor& grad_weight,
                        const Geometry& g) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const opmath_t* wp = weight.const_data_ptr<opmath_t>();
  const int64_t stride = g.OW + 2;
  backward_kernel<scalar_t>(x, weight, mode, grad_x, grad_weight, g,
                            [&](int64_t n, int64_t c, int64_t oh, const opmath_t* up, opmath_t* dst) {
    const opmath_t* w = wp + c * g.Cg * 9;  // z's row first, into dst
    for (int64_t ci = 0; ci < g.Cg; ++ci) {
      const opmath_t* src = up + ci * g.padded() + oh * stride;
      if (ci == 0) conv3x3_row<false>(dst, src, stride, w, g.OW);
      else conv3x3_row<true>(dst, src, stride, w + ci * 9, g.OW);
    }
    const opmath_t sc = t.scale[c], sh = t.shift[c], mu = t.mean[c], k_z = t.centered[c], k_1 = t.constant[c];
    const scalar_t* gy = gp + ((n * g.C + c) * g.OH + oh) * g.OW;
#pragma omp simd
    for (int64_t i = 0; i < g.OW; ++i) {
      const opmath_t z = dst[i];
      dst[i] = sc * cpu_activate_grad<A>(static_cast<opmath_t>(gy[i]), z * sc + sh, t.slope) + k_z * (z - mu) + k_1;
    }
  });
}

// Checks shared by both passes; returns the mode.
Mode check_bn_inputs(const char* op, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                     int64_t s, c10::string_view mode, std::initializer_list<std::pair<const char*, const at::Tensor*>> vectors) {
  const Mode m = check_inputs(op, x, weight, s, mode);
  check_upsample_conv_grad(op, grad, x, s);
  for (const auto& [name, v] : vectors) check_upsample_conv_vector(op, name, *v, x);
  return m;
}

// Returns (y, sums): y = act(scale * z + shift), NCHW contiguous in x's dtype, if write_y (else
// empty); sums (2, C) in the accumulation type: sum(grad_pre), sum(grad_pre * (z - mean)).
std::tuple<at::Tensor, at::Tensor> shuffle_upsample_bn_sums_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& mean, int64_t scale_factor, c10::string_view mode_name,
    c10::string_view activation, double negative_slope, bool write_y) {
  constexpr const char* op = "uresnet_ops::_shuffle_upsample_bn_sums_native";
  const Mode mode = check_bn_inputs(op, grad, x, weight, scale_factor, mode_name,
                                    {{"scale", &scale}, {"shift", &shift}, {"mean", &mean}});
  const Activation act = parse_activation(activation, op);
  const Geometry g = geometry(x, weight, scale_factor);
  at::Tensor y = write_y ? at::empty({g.N, g.C, g.OH, g.OW}, x.options()) : at::Tensor();
  at::Tensor sums = at::zeros({2, g.C}, x.options().dtype(stat_dtype(x)));
  if (x.numel() == 0) return {write_y ? y : at::empty({0}, x.options()), sums};
  const at::Tensor sc = scale.contiguous(), sh = shift.contiguous(), mu = mean.contiguous();
  const at::Tensor gr = grad.contiguous(), w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "shuffle_upsample_bn_sums_cpu", [&] {
    const auto t = norm_terms<at::opmath_type<scalar_t>>(sc, sh, mu, {}, {}, negative_slope);
    URESNET_DISPATCH_ACTIVATION(act, bn_sums_kernel<scalar_t, A>(gr, x, w, mode, t, y, sums, g));
  });
  return {write_y ? y : at::empty({0}, x.options()), sums};
}

// Returns (grad_x, grad_weight) for grad_z = scale * act'(pre) * grad + centered * (z - mean) + constant.
std::tuple<at::Tensor, at::Tensor> shuffle_upsample_bn_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& centered, const at::Tensor& constant,
    int64_t scale_factor, c10::string_view mode_name, c10::string_view activation, double negative_slope) {
  constexpr const char* op = "uresnet_ops::_shuffle_upsample_bn_backward_native";
  const Mode mode = check_bn_inputs(op, grad, x, weight, scale_factor, mode_name,
                                    {{"scale", &scale}, {"shift", &shift}, {"mean", &mean},
                                     {"centered", &centered}, {"constant", &constant}});
  const Activation act = parse_activation(activation, op);
  const Geometry g = geometry(x, weight, scale_factor);
  at::Tensor grad_x = at::empty({g.N, g.C, g.H, g.W}, x.options());
  at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options());
  if (x.numel() == 0) return {grad_x, grad_weight};
  const at::Tensor sc = scale.contiguous(), sh = shift.contiguous(), mu = mean.contiguous();
  const at::Tensor kz = centered.contiguous(), k1 = constant.contiguous(), gr = grad.contiguous();
  const at::Tensor w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "shuffle_upsample_bn_backward_cpu", [&] {
    const auto t = norm_terms<at::opmath_type<scalar_t>>(sc, sh, mu, kz, k1, negative_slope);
    URESNET_DISPATCH_ACTIVATION(act, bn_backward_kernel<scalar_t, A>(gr, x, w, mode, t, grad_x, grad_weight, g));
  });
  return {grad_x, grad_weight};
}

// ---- the op --------------------------------------------------------------------------------

// The backward recomputes through BatchNorm in two passes, and the forward runs in batch slices
// of about L2 size (2 MiB per core here) that stay in cache between the conv and the GEMM.
const ShuffleUpsampleKernels kKernels{&shuffle_upsample_conv_cpu, &shuffle_upsample_conv_backward_cpu,
                                      &shuffle_upsample_bn_sums_cpu, &shuffle_upsample_bn_backward_cpu, 2 << 20};

template <const char* op>
std::tuple<at::Tensor, at::Tensor, at::Tensor> shuffle_upsample_cpu(
    const at::Tensor& x, const at::Tensor& dw, const std::optional<at::Tensor>& pw,
    const std::optional<at::Tensor>& pw_bias, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, int64_t s, c10::string_view mode,
    int64_t groups, c10::string_view activation, double slope) {
  return shuffle_upsample_fused(kKernels, op, x, dw, pw, pw_bias, bn_weight, bn_bias, running_mean, running_var,
                                training, eps, s, mode, groups, activation, slope);
}

template <const char* op>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shuffle_upsample_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& dw, const std::optional<at::Tensor>& pw,
    const std::optional<at::Tensor>& pw_bias, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const at::Tensor& mean, const at::Tensor& var, bool training,
    double eps, int64_t s, c10::string_view mode, int64_t groups, c10::string_view activation, double slope) {
  return shuffle_upsample_fused_backward(kKernels, op, grad_out, x, dw, pw, pw_bias, bn_weight, bn_bias, mean, var,
                                         training, eps, s, mode, groups, activation, slope);
}

}  // namespace
}  // namespace uresnet

TORCH_LIBRARY_IMPL(uresnet_ops, CPU, m) {
  using namespace uresnet;
  m.impl("_shuffle_upsample_conv_native", &shuffle_upsample_conv_cpu);
  m.impl("_shuffle_upsample_conv_native_backward", &shuffle_upsample_conv_backward_cpu);
  m.impl("_shuffle_upsample_bn_sums_native", &shuffle_upsample_bn_sums_cpu);
  m.impl("_shuffle_upsample_bn_backward_native", &shuffle_upsample_bn_backward_cpu);
  m.impl("_shuffle_upsample_native", &shuffle_upsample_cpu<kShuffleUpsampleNative>);
  m.impl("_shuffle_upsample_native_backward", &shuffle_upsample_backward_cpu<kShuffleUpsampleNativeBackward>);
  m.impl("shuffle_upsample", &shuffle_upsample_routed<&shuffle_upsample_cpu<kShuffleUpsample>>);
  m.impl("shuffle_upsample_backward",
         &shuffle_upsample_backward_routed<&shuffle_upsample_backward_cpu<kShuffleUpsampleBackward>>);
}
