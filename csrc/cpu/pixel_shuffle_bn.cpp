// CPU kernels of uresnet_ops::_pixel_shuffle_bn_native(_backward):
//   out = act(batch_norm(pixel_shuffle(x, r))); eval is one read of x and one write of out,
//   training adds one statistics pass over x in its own layout; backward is two passes.
// Output channel c, row h*r+i, col w*r+j reads input channel c*r*r + i*r + j at (h, w).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // errors if a heavy all-operators header sneaks in
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "../common.h"
#include "../pixel_shuffle_bn.h"
#include "cpu_common.h"

namespace uresnet {
namespace {

// One NCHW output row (n, c, oh) = OW contiguous elements, from the r input channels
// c*r*r + i*r + j (j < r) of input row h. R is the upscale factor when known at compile time
// (1, 2: the common cases, loops the compiler vectorises), 0 for any r.
template <typename scalar_t, Activation A, int R, typename opmath_t, typename Step>
C10_ALWAYS_INLINE void nchw_row(const scalar_t* src, int64_t sC, Step sW, scalar_t* dst, int64_t W,
                                int64_t r, opmath_t a, opmath_t b, opmath_t slope) {
  if constexpr (R > 0) {
    for (int64_t w = 0; w < W; ++w)
      for (int64_t j = 0; j < R; ++j)
        dst[w * R + j] = static_cast<scalar_t>(activate<A>(static_cast<opmath_t>(src[j * sC + w * sW]) * a + b,
                                                           slope));
  } else {  // one input row at a time: contiguous reads, stride-r writes into the (cached) output row
    for (int64_t j = 0; j < r; ++j)
      for (int64_t w = 0; w < W; ++w)
        dst[w * r + j] = static_cast<scalar_t>(activate<A>(static_cast<opmath_t>(src[j * sC + w * sW]) * a + b,
                                                           slope));
  }
}

// Output rows (n, c, oh) in NCHW order, with (h, i) = divmod(oh, r), stepped without divisions:
// four integer divisions per row of a few dozen elements cost about as much as the row itself.
struct RowCursor {
  int64_t C, OH, r;
  int64_t n, c, oh, h, i;
  RowCursor(int64_t row, int64_t C_, int64_t OH_, int64_t r_) : C(C_), OH(OH_), r(r_) {
    oh = row % OH, c = (row / OH) % C, n = row / OH / C, h = oh / r, i = oh % r;
  }
  void next() {
    if (++i == r) i = 0, ++h;
    if (++oh == OH) {
      oh = h = i = 0;
      if (++c == C) c = 0, ++n;
    }
  }
};

// Output pixels (n, oh, ow) in NHWC order, with (h, i) = divmod(oh, r), (w, j) = divmod(ow, r).
struct PixelCursor {
  int64_t OH, OW, r;
  int64_t n, oh, ow, h, i, w, j;
  PixelCursor(int64_t pix, int64_t OH_, int64_t OW_, int64_t r_) : OH(OH_), OW(OW_), r(r_) {
    ow = pix % OW, oh = (pix / OW) % OH, n = pix / OW / OH;
    h = oh / r, i = oh % r, w = ow / r, j = ow % r;
  }
  void next() {
    if (++j == r) j = 0, ++w;
    if (++ow < OW) return;
    ow = w = j = 0;
    if (++i == r) i = 0, ++h;
    if (++oh == OH) oh = h = i = 0, ++n;
  }
};

template <typename scalar_t, Activation A, int R>
void nchw_kernel(const scalar_t* xp, scalar_t* outp, const at::opmath_type<scalar_t>* scale,
                 const at::opmath_type<scalar_t>* shift, const at::Tensor& x, int64_t C, int64_t r,
                 at::opmath_type<scalar_t> slope) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const int64_t OH = H * r, OW = W * r, rr = r * r;
  // One task item per output row (n, c, oh).
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(OW, 1));
  parallel_for_best_isa(0, N * C * OH, grain, [&](int64_t begin, int64_t end) {
    RowCursor cur(begin, C, OH, r);
    for (int64_t row = begin; row < end; ++row, cur.next()) {
      const int64_t n = cur.n, c = cur.c, h = cur.h, i = cur.i;
      const scalar_t* src = xp + n * sN + (c * rr + i * r) * sC + h * sH;
      if (sW == 1)  // unit step known at compile time: the row loop vectorises
        nchw_row<scalar_t, A, R>(src, sC, std::integral_constant<int64_t, 1>{}, outp + row * OW, W, r, scale[c],
                                 shift[c], slope);
      else
        nchw_row<scalar_t, A, R>(src, sC, sW, outp + row * OW, W, r, scale[c], shift[c], slope);
    }
  });
}

template <typename scalar_t, Activation A>
void channels_last_kernel(const scalar_t* xp, scalar_t* outp, const at::opmath_type<scalar_t>* scale,
                          const at::opmath_type<scalar_t>* shift, const at::Tensor& x, int64_t C, int64_t r,
                          at::opmath_type<scalar_t> slope) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const int64_t OH = H * r, OW = W * r;
  const int64_t sCr = r * r * sC;  // input stride between consecutive output channels
  // One task item per output pixel (n, oh, ow) = C contiguous elements.
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(C, 1));
  parallel_for_best_isa(0, N * OH * OW, grain, [&](int64_t begin, int64_t end) {
    PixelCursor cur(begin, OH, OW, r);
    for (int64_t pix = begin; pix < end; ++pix, cur.next()) {
      const int64_t n = cur.n, h = cur.h, i = cur.i, w = cur.w, j = cur.j;
      const scalar_t* src = xp + n * sN + (i * r + j) * sC + h * sH + w * sW;
      scalar_t* dst = outp + pix * C;
      for (int64_t c = 0; c < C; ++c)
        dst[c] = static_cast<scalar_t>(activate<A>(static_cast<opmath_t>(src[c * sCr]) * scale[c] + shift[c], slope));
    }
  });
}

template <typename scalar_t, Activation A>
void pixel_shuffle_bn_cpu_kernel(const at::Tensor& x, const PixelShuffleBNPlan& plan, int64_t r, double slope_d) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto slope = static_cast<opmath_t>(slope_d);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* outp = plan.out.mutable_data_ptr<scalar_t>();
  const opmath_t* scale = plan.scale.const_data_ptr<opmath_t>();
  const opmath_t* shift = plan.shift.const_data_ptr<opmath_t>();
  const int64_t C = plan.channels;
  if (plan.channels_last) channels_last_kernel<scalar_t, A>(xp, outp, scale, shift, x, C, r, slope);
  else if (r == 1) nchw_kernel<scalar_t, A, 1>(xp, outp, scale, shift, x, C, r, slope);
  else if (r == 2) nchw_kernel<scalar_t, A, 2>(xp, outp, scale, shift, x, C, r, slope);
  else nchw_kernel<scalar_t, A, 0>(xp, outp, scale, shift, x, C, r, slope);
}

// ---- training statistics ----------------------------------------------------------------

// Batch mean and biased variance per output channel c over input channels [c*r*r, (c+1)*r*r),
// read in x's own layout. Per-thread per-input-channel moments, merged at the end.
template <typename scalar_t>
void batch_stats_cpu(const at::Tensor& x, int64_t r, int64_t C, at::Tensor& mean, at::Tensor& var) {
  using opmath_t = at::opmath_type<scalar_t>;
  using stat_t = opmath_t;  // float, or double for double input
  const int64_t N = x.size(0), CR = x.size(1), H = x.size(2), W = x.size(3), rr = r * r;
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int nthreads = at::get_num_threads();
  std::vector<Moments> acc(static_cast<size_t>(nthreads) * CR);
  if (N * H * W > 0) {
    if (x.is_contiguous(at::MemoryFormat::ChannelsLast) && CR > 1) {
      // Pixels in chunks: each chunk's CR-long rows, moments per input channel.
      constexpr int64_t kPix = 64;
      const int64_t P = N * H * W, chunks = (P + kPix - 1) / kPix;
      parallel_for_best_isa(0, chunks, std::max<int64_t>(1, kGrainSize / (kPix * CR)), [&](int64_t begin, int64_t end) {
        Moments* a = acc.data() + static_cast<size_t>(at::get_thread_num()) * CR;
        for (int64_t chunk = begin; chunk < end; ++chunk) {
          const int64_t p0 = chunk * kPix, len = std::min(P, p0 + kPix) - p0;
          for (int64_t k = 0; k < CR; ++k) {
            opmath_t m, m2;
            block_moments<scalar_t, opmath_t>(xp + p0 * CR + k, CR, len, m, m2);
            a[k].merge(static_cast<double>(len), m, m2);
          }
        }
      });
    } else {
      // One (n, k) plane at a time; row by row when the plane is not one contiguous run.
      const bool plane_contiguous = sW == 1 && sH == W;
      parallel_for_best_isa(0, N * CR, std::max<int64_t>(1, kGrainSize / (H * W)), [&](int64_t begin, int64_t end) {
        Moments* a = acc.data() + static_cast<size_t>(at::get_thread_num()) * CR;
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t n = plane / CR, k = plane % CR;
          const scalar_t* base = xp + n * sN + k * sC;
          opmath_t m, m2;
          if (plane_contiguous) {
            block_moments<scalar_t, opmath_t>(base, std::integral_constant<int64_t, 1>{}, H * W, m, m2);
            a[k].merge(static_cast<double>(H * W), m, m2);
          } else {
            for (int64_t h = 0; h < H; ++h) {
              block_moments<scalar_t, opmath_t>(base + h * sH, sW, W, m, m2);
              a[k].merge(static_cast<double>(W), m, m2);
            }
          }
        }
      });
    }
  }
  stat_t* mp = mean.mutable_data_ptr<stat_t>();
  stat_t* vp = var.mutable_data_ptr<stat_t>();
  for (int64_t c = 0; c < C; ++c) {
    Moments t;
    for (int th = 0; th < nthreads; ++th)
      for (int64_t k = c * rr; k < (c + 1) * rr; ++k) {
        const Moments& m = acc[static_cast<size_t>(th) * CR + k];
        t.merge(m.n, m.mean, m.m2);
      }
    mp[c] = static_cast<stat_t>(t.mean);
    vp[c] = static_cast<stat_t>(t.n > 0 ? t.m2 / t.n : 0.0);
  }
}

// ---- backward ---------------------------------------------------------------------------

// Visits every (x element, grad_out element) pair once, grouped as the forward writes them:
// NCHW: one output row (n, c, oh) per task item, as r input rows; channels_last: one output
// pixel, C channels. f(c, x_offset, dy_offset, gx_offset, len, x_step, dy_step, gx_step)
// handles a run of len elements of channel c.
template <typename F>
void for_each_run(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& gx, int64_t C, int64_t r,
                  bool channels_last, const F& f) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), OH = H * r, OW = W * r, rr = r * r;
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const int64_t dN = dy.stride(0), dC = dy.stride(1), dH = dy.stride(2), dW = dy.stride(3);
  const int64_t gN = gx.stride(0), gC = gx.stride(1), gH = gx.stride(2), gW = gx.stride(3);
  if (!channels_last) {
    parallel_for_best_isa(0, N * C * OH, std::max<int64_t>(1, kGrainSize / std::max<int64_t>(OW, 1)),
                     [&](int64_t begin, int64_t end) {
      RowCursor cur(begin, C, OH, r);
      for (int64_t row = begin; row < end; ++row, cur.next()) {
        const int64_t oh = cur.oh, c = cur.c, n = cur.n, h = cur.h, i = cur.i;
        for (int64_t j = 0; j < r; ++j) {
          const int64_t k = c * rr + i * r + j;
          f(c, n * sN + k * sC + h * sH, n * dN + c * dC + oh * dH + j * dW, n * gN + k * gC + h * gH, W, sW,
            r * dW, gW);
        }
      }
    });
  } else {
    parallel_for_best_isa(0, N * OH * OW, std::max<int64_t>(1, kGrainSize / std::max<int64_t>(C, 1)),
                     [&](int64_t begin, int64_t end) {
      PixelCursor cur(begin, OH, OW, r);
      for (int64_t pix = begin; pix < end; ++pix, cur.next()) {
        const int64_t ow = cur.ow, oh = cur.oh, n = cur.n, h = cur.h, w = cur.w, k0 = cur.i * r + cur.j;
        // A run across channels: channel c+1 is rr input channels further on.
        f(-1, n * sN + k0 * sC + h * sH + w * sW, n * dN + oh * dH + ow * dW, n * gN + k0 * gC + h * gH + w * gW,
          C, rr * sC, dC, rr * gC);
      }
    });
  }
}

// Calls f(x_step, dy_step) with compile-time steps in the common NCHW cases (x rows contiguous,
// dy read at every r-th element for r = 1, 2): constant strides let the compiler vectorise.
template <typename F>
C10_ALWAYS_INLINE void with_unit_strides(int64_t xs, int64_t dys, const F& f) {
  using One = std::integral_constant<int64_t, 1>;
  if (xs == 1 && dys == 2) f(One{}, std::integral_constant<int64_t, 2>{});
  else if (xs == 1 && dys == 1) f(One{}, One{});
  else f(xs, dys);
}

template <typename scalar_t, Activation A>
void backward_cpu_kernel(const at::Tensor& dy, const at::Tensor& x, const PixelShuffleBNBackwardPlan& plan,
                         int64_t r, bool training, const std::optional<at::Tensor>& weight, double slope_d,
                         at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto slope = static_cast<opmath_t>(slope_d);
  const int64_t C = plan.channels;
  const bool cl = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  scalar_t* gxp = plan.grad_x.mutable_data_ptr<scalar_t>();
  const opmath_t* scale = plan.scale.const_data_ptr<opmath_t>();
  const opmath_t* shift = plan.shift.const_data_ptr<opmath_t>();
  const opmath_t* mean = plan.mean.const_data_ptr<opmath_t>();

  // Pass 1: s1 = sum(dy'), s2 = sum(dy' * (x - mean)) per channel, per thread in double.
  const int nthreads = at::get_num_threads();
  std::vector<double> acc(static_cast<size_t>(nthreads) * C * 2, 0.0);
  for_each_run(x, dy, plan.grad_x, C, r, cl, [&](int64_t c, int64_t xo, int64_t dyo, int64_t, int64_t len,
                                                 int64_t xs, int64_t dys, int64_t) {
    double* a = acc.data() + static_cast<size_t>(at::get_thread_num()) * C * 2;
    const scalar_t* xv = xp + xo;
    const scalar_t* dv = dyp + dyo;
    if (c >= 0) {  // one channel
      const opmath_t sc = scale[c], sh = shift[c], mu = mean[c];
      const auto run = [&](auto xs_c, auto dys_c) {
        opmath_t s1[kLanes] = {}, s2[kLanes] = {};
        int64_t i = 0;
        for (; i + kLanes <= len; i += kLanes)
          for (int l = 0; l < kLanes; ++l) {
            const opmath_t xe = static_cast<opmath_t>(xv[(i + l) * xs_c]);
            const opmath_t g = cpu_activate_grad<A>(static_cast<opmath_t>(dv[(i + l) * dys_c]), xe * sc + sh, slope);
            s1[l] += g, s2[l] += g * (xe - mu);
          }
        for (; i < len; ++i) {
          const opmath_t xe = static_cast<opmath_t>(xv[i * xs_c]);
          const opmath_t g = cpu_activate_grad<A>(static_cast<opmath_t>(dv[i * dys_c]), xe * sc + sh, slope);
          s1[0] += g, s2[0] += g * (xe - mu);
        }
        opmath_t t1 = 0, t2 = 0;
        for (int l = 0; l < kLanes; ++l) t1 += s1[l], t2 += s2[l];
        a[2 * c] += t1, a[2 * c + 1] += t2;
      };
      with_unit_strides(xs, dys, run);
    } else {  // one pixel, every channel
      for (int64_t cc = 0; cc < len; ++cc) {
        const opmath_t xe = static_cast<opmath_t>(xv[cc * xs]);
        const opmath_t g = cpu_activate_grad<A>(static_cast<opmath_t>(dv[cc * dys]), xe * scale[cc] + shift[cc], slope);
        a[2 * cc] += g, a[2 * cc + 1] += g * (xe - mean[cc]);
      }
    }
  });
  at::Tensor s1 = at::empty({C}, plan.mean.options()), s2 = at::empty({C}, plan.mean.options());
  opmath_t* s1p = s1.mutable_data_ptr<opmath_t>();
  opmath_t* s2p = s2.mutable_data_ptr<opmath_t>();
  for (int64_t c = 0; c < C; ++c) {
    double t1 = 0, t2 = 0;
    for (int th = 0; th < nthreads; ++th) t1 += acc[(static_cast<size_t>(th) * C + c) * 2], t2 += acc[(static_cast<size_t>(th) * C + c) * 2 + 1];
    s1p[c] = static_cast<opmath_t>(t1), s2p[c] = static_cast<opmath_t>(t2);
  }
  BackwardCoefficients k = backward_coefficients(plan, s1, s2, training, weight, x);
  grad_weight = k.grad_weight, grad_bias = k.grad_bias;
  const opmath_t* ka = k.a.const_data_ptr<opmath_t>();
  const opmath_t* kb = k.b.const_data_ptr<opmath_t>();
  const opmath_t* kd = k.d.const_data_ptr<opmath_t>();

  // Pass 2: grad_x = a * dy' + b * x + d.
  for_each_run(x, dy, plan.grad_x, C, r, cl, [&](int64_t c, int64_t xo, int64_t dyo, int64_t gxo, int64_t len,
                                                 int64_t xs, int64_t dys, int64_t gxs) {
    const scalar_t* xv = xp + xo;
    const scalar_t* dv = dyp + dyo;
    scalar_t* gv = gxp + gxo;
    if (c >= 0) {
      const opmath_t sc = scale[c], sh = shift[c], a = ka[c], b = kb[c], d = kd[c];
      const auto run = [&](auto xs_c, auto dys_c) {
        if (gxs == 1) {
          for (int64_t i = 0; i < len; ++i) {
            const opmath_t xe = static_cast<opmath_t>(xv[i * xs_c]);
            const opmath_t g = cpu_activate_grad<A>(static_cast<opmath_t>(dv[i * dys_c]), xe * sc + sh, slope);
            gv[i] = static_cast<scalar_t>(a * g + b * xe + d);
          }
        } else {
          for (int64_t i = 0; i < len; ++i) {
            const opmath_t xe = static_cast<opmath_t>(xv[i * xs_c]);
            const opmath_t g = cpu_activate_grad<A>(static_cast<opmath_t>(dv[i * dys_c]), xe * sc + sh, slope);
            gv[i * gxs] = static_cast<scalar_t>(a * g + b * xe + d);
          }
        }
      };
      with_unit_strides(xs, dys, run);
    } else {
      for (int64_t cc = 0; cc < len; ++cc) {
        const opmath_t xe = static_cast<opmath_t>(xv[cc * xs]);
        const opmath_t g = cpu_activate_grad<A>(static_cast<opmath_t>(dv[cc * dys]), xe * scale[cc] + shift[cc], slope);
        gv[cc * gxs] = static_cast<scalar_t>(ka[cc] * g + kb[cc] * xe + kd[cc]);
      }
    }
  });
}

template <const char* op>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_shuffle_bn_cpu(
    const at::Tensor& x, int64_t upscale_factor, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, c10::string_view activation,
    double negative_slope) {
  PixelShuffleBNPlan plan = plan_pixel_shuffle_bn(op, x, upscale_factor, weight, bias, running_mean, running_var,
                                                  training, eps, activation);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_shuffle_bn_cpu", [&] {
    if (training) {
      const auto stat_opts = x.options().dtype(stat_dtype(x));
      plan.mean = at::empty({plan.channels}, stat_opts);
      plan.var = at::empty({plan.channels}, stat_opts);
      batch_stats_cpu<scalar_t>(x, upscale_factor, plan.channels, plan.mean, plan.var);
      std::tie(plan.scale, plan.shift) = scale_shift(plan.mean, plan.var, weight, bias, eps);
    }
    if (plan.out.numel() > 0) {
      URESNET_DISPATCH_ACTIVATION(plan.act,
          pixel_shuffle_bn_cpu_kernel<scalar_t, A>(x, plan, upscale_factor, negative_slope));
    }
  });
  return {plan.out, plan.mean, plan.var};
}

template <const char* op>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_shuffle_bn_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, int64_t upscale_factor, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, bool training, double eps,
    c10::string_view activation, double negative_slope) {
  PixelShuffleBNBackwardPlan plan =
      plan_pixel_shuffle_bn_backward(op, grad_out, x, upscale_factor, weight, bias, mean, var, eps, activation);
  at::Tensor grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_shuffle_bn_backward_cpu", [&] {
    URESNET_DISPATCH_ACTIVATION(plan.act,
        backward_cpu_kernel<scalar_t, A>(grad_out, x, plan, upscale_factor, training, weight, negative_slope,
                                         grad_weight, grad_bias));
  });
  return {plan.grad_x, grad_weight, grad_bias};
}

}  // namespace
}  // namespace uresnet

TORCH_LIBRARY_IMPL(uresnet_ops, CPU, m) {
  using namespace uresnet;
  m.impl("_pixel_shuffle_bn_native", &pixel_shuffle_bn_cpu<kPixelShuffleBNNative>);
  m.impl("_pixel_shuffle_bn_native_backward", &pixel_shuffle_bn_backward_cpu<kPixelShuffleBNNativeBackward>);
  m.impl("pixel_shuffle_bn", &pixel_shuffle_bn_routed<&pixel_shuffle_bn_cpu<kPixelShuffleBN>>);
  m.impl("pixel_shuffle_bn_backward",
         &pixel_shuffle_bn_backward_routed<&pixel_shuffle_bn_backward_cpu<kPixelShuffleBNBackward>>);
}
