// CUDA kernels of uresnet_ops::_pixel_shuffle_bn_native(_backward):
//   out = act(batch_norm(pixel_shuffle(x, r))). Eval: one read of x, one write of out; training
//   first reduces the per-channel statistics over x in its own layout. The write: a grid-stride
// loop walks the output elements in the output's memory order (coalesced writes) and gathers
// each from x through its strides. Output channel c, row h*r+i,
// col w*r+j reads input channel c*r*r + i*r + j at (h, w).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // errors if a heavy all-operators header sneaks in
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/native/CanUse32BitIndexMath.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../common.h"
#include "../pixel_shuffle_bn.h"
#include "cuda_common.cuh"

namespace uresnet {
namespace {

template <typename index_t>
struct Geometry {
  at::cuda::detail::IntDivider<index_t> out_w, out_h, channels, r;  // fast div/mod for 32-bit index_t
  index_t rr;
  index_t sN, sC, sH, sW;  // x's strides, in elements
};

template <typename scalar_t, typename index_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    pixel_shuffle_bn_cuda_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                 const at::opmath_type<scalar_t>* __restrict__ scale,
                                 const at::opmath_type<scalar_t>* __restrict__ shift, Geometry<index_t> g,
                                 index_t numel, Activation act, at::opmath_type<scalar_t> slope) {
  using opmath_t = at::opmath_type<scalar_t>;
  const index_t step = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t idx = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel; idx += step) {
    const Index4<index_t> o = unravel<kChannelsLast>(idx, g.channels, g.out_h, g.out_w);
    const index_t n = o.n, c = o.c, oh = o.h, ow = o.w;
    const auto hi = g.r.divmod(oh);  // h, i
    const auto wj = g.r.divmod(ow);  // w, j
    const index_t in_c = c * g.rr + hi.mod * g.r.divisor + wj.mod;
    const opmath_t v = static_cast<opmath_t>(x[n * g.sN + in_c * g.sC + hi.div * g.sH + wj.div * g.sW]);
    out[idx] = static_cast<scalar_t>(activate<opmath_t>(v * scale[c] + shift[c], act, slope));
  }
}

template <typename scalar_t, typename index_t, bool kChannelsLast>
void launch(const at::Tensor& x, const PixelShuffleBNPlan& plan, int64_t r, double slope) {
  using opmath_t = at::opmath_type<scalar_t>;
  Geometry<index_t> g;
  g.out_w = at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(plan.out.size(3)));
  g.out_h = at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(plan.out.size(2)));
  g.channels = at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(plan.channels));
  g.r = at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(r));
  g.rr = static_cast<index_t>(r * r);
  g.sN = static_cast<index_t>(x.stride(0));
  g.sC = static_cast<index_t>(x.stride(1));
  g.sH = static_cast<index_t>(x.stride(2));
  g.sW = static_cast<index_t>(x.stride(3));

  const int64_t numel = plan.out.numel();
  const int64_t blocks = grid_for(numel);
  pixel_shuffle_bn_cuda_kernel<scalar_t, index_t, kChannelsLast>
      <<<static_cast<unsigned int>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), plan.out.mutable_data_ptr<scalar_t>(),
          plan.scale.const_data_ptr<opmath_t>(), plan.shift.const_data_ptr<opmath_t>(), g,
          static_cast<index_t>(numel), plan.act, static_cast<opmath_t>(slope));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- per-channel reductions (training statistics, backward sums) ---------------------------
//
// Output channel c's values are the M = N*r*r*H*W elements e of x in input channels
// [c*r*r, (c+1)*r*r); e = ((n * rr + kk) * H + h) * W + w. Channel c is split over S blocks;
// each block writes a partial result, merged by a few tiny ATen ops (no host sync, so CUDA
// graph capture works).

template <typename index_t>
struct ChannelGeometry {
  at::cuda::detail::IntDivider<index_t> w, h, rr, r;
  index_t sN, sC, sH, sW;  // x's strides
  index_t dN, dC, dH, dW;  // grad_out's strides (backward)
  index_t M;               // values per channel
  index_t S;               // blocks per channel
};

template <typename index_t>
struct Located {
  index_t x, dy;
};

template <typename index_t>
__device__ __forceinline__ Located<index_t> locate(const ChannelGeometry<index_t>& g, index_t c, index_t e) {
  const auto q0 = g.w.divmod(e);       // w
  const auto q1 = g.h.divmod(q0.div);  // h
  const auto q2 = g.rr.divmod(q1.div); // kk, n
  const auto ij = g.r.divmod(q2.mod);  // i, j
  const index_t n = q2.div, kk = q2.mod, h = q1.mod, w = q0.mod, r = g.r.divisor;
  return {n * g.sN + (c * g.rr.divisor + kk) * g.sC + h * g.sH + w * g.sW,
          n * g.dN + c * g.dC + (h * r + ij.div) * g.dH + (w * r + ij.mod) * g.dW};
}

// Welford moments of x - shift, shift = the channel's first value: keeps float32 accurate for
// data far from zero (mean 1e4, std 1).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    stats_partial_kernel(const scalar_t* __restrict__ x, ChannelGeometry<index_t> g,
                         at::opmath_type<scalar_t>* __restrict__ part /* [3][C*S] */,
                         at::opmath_type<scalar_t>* __restrict__ shifts /* [C] */, index_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ WelfordData<acc_t> shared[kThreads];
  const index_t c = blockIdx.x / g.S, s = blockIdx.x % g.S;
  const acc_t shift = static_cast<acc_t>(x[locate(g, c, index_t(0)).x]);
  WelfordData<acc_t> t{0, 0, 0};
  for (index_t e = s * kThreads + threadIdx.x; e < g.M; e += g.S * kThreads) {
    const acc_t v = static_cast<acc_t>(x[locate(g, c, e).x]) - shift;
    welford_add(t, v);
  }
  block_reduce(shared, t, welford_merge<acc_t>);
  if (threadIdx.x == 0) {
    const index_t CS = C * g.S;
    part[blockIdx.x] = t.n, part[CS + blockIdx.x] = t.mean, part[2 * CS + blockIdx.x] = t.m2;
    if (s == 0) shifts[c] = shift;
  }
}

// Backward sums per channel: s1 = sum(dy'), s2 = sum(dy' * (x - mean)), dy' = grad through the
// activation at the recomputed pre-activation x * scale + shift.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    backward_partial_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                            const at::opmath_type<scalar_t>* __restrict__ scale,
                            const at::opmath_type<scalar_t>* __restrict__ shift,
                            const at::opmath_type<scalar_t>* __restrict__ mean, ChannelGeometry<index_t> g,
                            Activation act, at::opmath_type<scalar_t> slope,
                            at::opmath_type<scalar_t>* __restrict__ part /* [2][C*S] */, index_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[kThreads];
  const index_t c = blockIdx.x / g.S, s = blockIdx.x % g.S;
  const acc_t sc = scale[c], sh = shift[c], mu = mean[c];
  acc_t s1 = 0, s2 = 0;
  for (index_t e = s * kThreads + threadIdx.x; e < g.M; e += g.S * kThreads) {
    const Located<index_t> o = locate(g, c, e);
    const acc_t xe = static_cast<acc_t>(x[o.x]);
    const acc_t gr = activate_grad<acc_t>(static_cast<acc_t>(dy[o.dy]), xe * sc + sh, act, slope);
    s1 += gr, s2 += gr * (xe - mu);
  }
  const auto add = [](acc_t a, acc_t b) { return a + b; };
  block_reduce(shared, s1, add);
  __syncthreads();
  block_reduce(shared, s2, add);
  if (threadIdx.x == 0) part[blockIdx.x] = s1, part[C * g.S + blockIdx.x] = s2;
}

// grad_x = a * dy' + b * x + d, walking grad_x in its memory order (NCHW or NHWC).
template <typename scalar_t, typename index_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    backward_input_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                          scalar_t* __restrict__ gx, const at::opmath_type<scalar_t>* __restrict__ coef /* [5][C] */,
                          ChannelGeometry<index_t> g, at::cuda::detail::IntDivider<index_t> in_channels,
                          index_t C, index_t numel, Activation act, at::opmath_type<scalar_t> slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t step = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t idx = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel; idx += step) {
    const Index4<index_t> i = unravel<kChannelsLast>(idx, in_channels, g.h, g.w);
    const index_t n = i.n, k = i.c, h = i.h, w = i.w;
    const auto ck = g.rr.divmod(k);      // c, kk
    const auto ij = g.r.divmod(ck.mod);  // i, j
    const index_t c = ck.div, r = g.r.divisor;
    const acc_t xe = static_cast<acc_t>(x[n * g.sN + k * g.sC + h * g.sH + w * g.sW]);
    const acc_t d = static_cast<acc_t>(dy[n * g.dN + c * g.dC + (h * r + ij.div) * g.dH + (w * r + ij.mod) * g.dW]);
    const acc_t gr = activate_grad<acc_t>(d, xe * coef[c] + coef[C + c], act, slope);
    gx[idx] = static_cast<scalar_t>(coef[2 * C + c] * gr + coef[3 * C + c] * xe + coef[4 * C + c]);
  }
}

template <typename index_t>
ChannelGeometry<index_t> channel_geometry(const at::Tensor& x, const at::Tensor* dy, int64_t r, int64_t C) {
  ChannelGeometry<index_t> g;
  g.w = at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(std::max<int64_t>(x.size(3), 1)));
  g.h = at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(std::max<int64_t>(x.size(2), 1)));
  g.rr = at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(r * r));
  g.r = at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(r));
  g.sN = x.stride(0), g.sC = x.stride(1), g.sH = x.stride(2), g.sW = x.stride(3);
  g.dN = dy ? dy->stride(0) : 0, g.dC = dy ? dy->stride(1) : 0, g.dH = dy ? dy->stride(2) : 0;
  g.dW = dy ? dy->stride(3) : 0;
  const int64_t M = x.numel() / std::max<int64_t>(C, 1);
  g.M = static_cast<index_t>(M);
  g.S = static_cast<index_t>(splits_for(C, M));
  return g;
}

template <typename scalar_t, typename index_t>
void batch_stats_cuda(const at::Tensor& x, int64_t r, PixelShuffleBNPlan& plan) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = plan.channels;
  const ChannelGeometry<index_t> g = channel_geometry<index_t>(x, nullptr, r, C);
  const int64_t S = g.S;
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor part = at::empty({3, C, S}, acc_opts);
  at::Tensor shifts = at::empty({C}, acc_opts);
  stats_partial_kernel<scalar_t, index_t><<<static_cast<unsigned int>(C * S), kThreads, 0,
                                            at::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), g, part.mutable_data_ptr<acc_t>(), shifts.mutable_data_ptr<acc_t>(),
      static_cast<index_t>(C));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  std::tie(plan.mean, plan.var) = merge_moments(part, shifts, static_cast<double>(g.M), stat_dtype(x));
}

template <typename scalar_t, typename index_t>
void backward_cuda_impl(const at::Tensor& dy, const at::Tensor& x, const PixelShuffleBNBackwardPlan& plan,
                        int64_t r, bool training, const std::optional<at::Tensor>& weight, double slope,
                        at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = plan.channels;
  const ChannelGeometry<index_t> g = channel_geometry<index_t>(x, &dy, r, C);
  const int64_t S = g.S;
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor part = at::empty({2, C, S}, plan.mean.options());
  backward_partial_kernel<scalar_t, index_t><<<static_cast<unsigned int>(C * S), kThreads, 0, stream>>>(
      dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), plan.scale.const_data_ptr<acc_t>(),
      plan.shift.const_data_ptr<acc_t>(), plan.mean.const_data_ptr<acc_t>(), g, plan.act,
      static_cast<acc_t>(slope), part.mutable_data_ptr<acc_t>(), static_cast<index_t>(C));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor sums = part.to(at::kDouble).sum(2).to(plan.mean.scalar_type());
  BackwardCoefficients k = backward_coefficients(plan, sums.select(0, 0), sums.select(0, 1), training, weight, x);
  grad_weight = k.grad_weight, grad_bias = k.grad_bias;
  const at::Tensor coef = at::empty({5, C}, plan.mean.options());
  coef.select(0, 0).copy_(plan.scale), coef.select(0, 1).copy_(plan.shift), coef.select(0, 2).copy_(k.a);
  coef.select(0, 3).copy_(k.b), coef.select(0, 4).copy_(k.d);

  const int64_t numel = x.numel();
  const int64_t blocks = grid_for(numel);
  const auto in_channels = at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(x.size(1)));
  // grad_x is dense in x.suggest_memory_format(): walk it in memory order.
  ChannelGeometry<index_t> gi = g;
  if (plan.grad_x.is_contiguous()) {
    backward_input_kernel<scalar_t, index_t, false><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), plan.grad_x.mutable_data_ptr<scalar_t>(),
        coef.const_data_ptr<acc_t>(), gi, in_channels, static_cast<index_t>(C), static_cast<index_t>(numel),
        plan.act, static_cast<acc_t>(slope));
  } else {
    backward_input_kernel<scalar_t, index_t, true><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), plan.grad_x.mutable_data_ptr<scalar_t>(),
        coef.const_data_ptr<acc_t>(), gi, in_channels, static_cast<index_t>(C), static_cast<index_t>(numel),
        plan.act, static_cast<acc_t>(slope));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <const char* op>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_shuffle_bn_cuda(
    const at::Tensor& x, int64_t upscale_factor, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, c10::string_view activation,
    double negative_slope) {
  const c10::cuda::CUDAGuard guard(x.device());
  PixelShuffleBNPlan plan = plan_pixel_shuffle_bn(op, x, upscale_factor, weight, bias, running_mean, running_var,
                                                  training, eps, activation);
  // 32-bit indexing unless the output or the span of x's offsets reaches 2^31.
  const bool index32 = at::native::canUse32BitIndexMath(x) && at::native::canUse32BitIndexMath(plan.out);
  if (training) {
    if (x.numel() == 0) {  // empty batch: statistics of nothing are reported as 0, as the reference does
      plan.mean = at::empty({plan.channels}, x.options().dtype(stat_dtype(x))).zero_();
      plan.var = at::empty({plan.channels}, x.options().dtype(stat_dtype(x))).zero_();
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_shuffle_bn_stats_cuda", [&] {
        if (index32) batch_stats_cuda<scalar_t, uint32_t>(x, upscale_factor, plan);
        else batch_stats_cuda<scalar_t, uint64_t>(x, upscale_factor, plan);
      });
    }
    std::tie(plan.scale, plan.shift) = scale_shift(plan.mean, plan.var, weight, bias, eps);
  }
  if (plan.out.numel() == 0) return {plan.out, plan.mean, plan.var};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_shuffle_bn_cuda", [&] {
    if (index32) {
      if (plan.channels_last) launch<scalar_t, uint32_t, true>(x, plan, upscale_factor, negative_slope);
      else launch<scalar_t, uint32_t, false>(x, plan, upscale_factor, negative_slope);
    } else {
      if (plan.channels_last) launch<scalar_t, uint64_t, true>(x, plan, upscale_factor, negative_slope);
      else launch<scalar_t, uint64_t, false>(x, plan, upscale_factor, negative_slope);
    }
  });
  return {plan.out, plan.mean, plan.var};
}

template <const char* op>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_shuffle_bn_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, int64_t upscale_factor, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, bool training, double eps,
    c10::string_view activation, double negative_slope) {
  const c10::cuda::CUDAGuard guard(x.device());
  PixelShuffleBNBackwardPlan plan =
      plan_pixel_shuffle_bn_backward(op, grad_out, x, upscale_factor, weight, bias, mean, var, eps, activation);
  at::Tensor grad_weight, grad_bias;
  if (x.numel() == 0) {  // nothing to reduce: zero parameter gradients
    const at::Tensor zero = plan.mean.mul(0);
    BackwardCoefficients k = backward_coefficients(plan, zero, zero, training, weight, x);
    return {plan.grad_x, k.grad_weight, k.grad_bias};
  }
  const bool index32 = at::native::canUse32BitIndexMath(x) && at::native::canUse32BitIndexMath(grad_out) &&
                       at::native::canUse32BitIndexMath(plan.grad_x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_shuffle_bn_backward_cuda", [&] {
    if (index32) backward_cuda_impl<scalar_t, uint32_t>(grad_out, x, plan, upscale_factor, training, weight,
                                                         negative_slope, grad_weight, grad_bias);
    else backward_cuda_impl<scalar_t, uint64_t>(grad_out, x, plan, upscale_factor, training, weight,
                                                negative_slope, grad_weight, grad_bias);
  });
  return {plan.grad_x, grad_weight, grad_bias};
}

}  // namespace
}  // namespace uresnet

TORCH_LIBRARY_IMPL(uresnet_ops, CUDA, m) {
  using namespace uresnet;
  m.impl("_pixel_shuffle_bn_native", &pixel_shuffle_bn_cuda<kPixelShuffleBNNative>);
  m.impl("_pixel_shuffle_bn_native_backward", &pixel_shuffle_bn_backward_cuda<kPixelShuffleBNNativeBackward>);
  m.impl("pixel_shuffle_bn", &pixel_shuffle_bn_routed<&pixel_shuffle_bn_cuda<kPixelShuffleBN>>);
  m.impl("pixel_shuffle_bn_backward",
         &pixel_shuffle_bn_backward_routed<&pixel_shuffle_bn_backward_cuda<kPixelShuffleBNBackward>>);
}
