// CPU kernel of uresnet_ops::_pixel_shuffle_bn_native (eval mode):
//   out = act(batch_norm(pixel_shuffle(x, r)))  in one read of x and one write of out.
// Output channel c, row h*r+i, col w*r+j reads input channel c*r*r + i*r + j at (h, w).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // errors if a heavy all-operators header sneaks in
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"

namespace uresnet {
namespace {

constexpr int64_t kGrainSize = 32768;  // elements per parallel task (at::internal::GRAIN_SIZE)

// One NCHW output row (n, c, oh) = OW contiguous elements, from the r input channels
// c*r*r + i*r + j (j < r) of input row h. R is the upscale factor when known at compile time
// (1, 2: the common cases, loops the compiler vectorises), 0 for any r.
template <typename scalar_t, Activation A, int R, typename opmath_t>
C10_ALWAYS_INLINE void nchw_row(const scalar_t* src, int64_t sC, int64_t sW, scalar_t* dst, int64_t W,
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

template <typename scalar_t, Activation A, int R>
void nchw_kernel(const scalar_t* xp, scalar_t* outp, const at::opmath_type<scalar_t>* scale,
                 const at::opmath_type<scalar_t>* shift, const at::Tensor& x, int64_t C, int64_t r,
                 at::opmath_type<scalar_t> slope) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const int64_t OH = H * r, OW = W * r, rr = r * r;
  // One task item per output row (n, c, oh).
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(OW, 1));
  at::parallel_for(0, N * C * OH, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t oh = row % OH, nc = row / OH;
      const int64_t c = nc % C, n = nc / C;
      const int64_t h = oh / r, i = oh % r;
      nchw_row<scalar_t, A, R>(xp + n * sN + (c * rr + i * r) * sC + h * sH, sC, sW, outp + row * OW, W, r,
                               scale[c], shift[c], slope);
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
  at::parallel_for(0, N * OH * OW, grain, [&](int64_t begin, int64_t end) {
    for (int64_t pix = begin; pix < end; ++pix) {
      const int64_t ow = pix % OW, t = pix / OW;
      const int64_t oh = t % OH, n = t / OH;
      const int64_t h = oh / r, i = oh % r, w = ow / r, j = ow % r;
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_shuffle_bn_cpu(
    const at::Tensor& x, int64_t upscale_factor, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, c10::string_view activation,
    double negative_slope) {
  PixelShuffleBNPlan plan = plan_pixel_shuffle_bn(x, upscale_factor, weight, bias, running_mean, running_var,
                                                  training, eps, activation);
  if (plan.out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_shuffle_bn_cpu", [&] {
      switch (plan.act) {
        case Activation::None:
          pixel_shuffle_bn_cpu_kernel<scalar_t, Activation::None>(x, plan, upscale_factor, negative_slope);
          break;
        case Activation::ReLU:
          pixel_shuffle_bn_cpu_kernel<scalar_t, Activation::ReLU>(x, plan, upscale_factor, negative_slope);
          break;
        case Activation::LeakyReLU:
          pixel_shuffle_bn_cpu_kernel<scalar_t, Activation::LeakyReLU>(x, plan, upscale_factor, negative_slope);
          break;
        case Activation::SiLU:
          pixel_shuffle_bn_cpu_kernel<scalar_t, Activation::SiLU>(x, plan, upscale_factor, negative_slope);
          break;
      }
    });
  }
  return {plan.out, plan.mean, plan.var};
}

}  // namespace
}  // namespace uresnet

TORCH_LIBRARY_IMPL(uresnet_ops, CPU, m) {
  m.impl("_pixel_shuffle_bn_native", &uresnet::pixel_shuffle_bn_cpu);
}
