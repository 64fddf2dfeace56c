// CUDA kernel of uresnet_ops::_pixel_shuffle_bn_native (eval mode):
//   out = act(batch_norm(pixel_shuffle(x, r)))  in one read of x and one write of out.
// A grid-stride loop walks the output elements in the output's memory order (coalesced
// writes) and gathers each from x through its strides. Output channel c, row h*r+i,
// col w*r+j reads input channel c*r*r + i*r + j at (h, w).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // errors if a heavy all-operators header sneaks in
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/native/CanUse32BitIndexMath.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"

namespace uresnet {
namespace {

constexpr int kThreads = 256;

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
    index_t n, c, oh, ow;
    if constexpr (kChannelsLast) {  // idx = ((n * OH + oh) * OW + ow) * C + c
      const auto q0 = g.channels.divmod(idx);
      const auto q1 = g.out_w.divmod(q0.div);
      const auto q2 = g.out_h.divmod(q1.div);
      c = q0.mod, ow = q1.mod, oh = q2.mod, n = q2.div;
    } else {  // idx = ((n * C + c) * OH + oh) * OW + ow
      const auto q0 = g.out_w.divmod(idx);
      const auto q1 = g.out_h.divmod(q0.div);
      const auto q2 = g.channels.divmod(q1.div);
      ow = q0.mod, oh = q1.mod, c = q2.mod, n = q2.div;
    }
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
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t max_blocks =
      static_cast<int64_t>(prop->multiProcessorCount) * (prop->maxThreadsPerMultiProcessor / kThreads);
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((numel + kThreads - 1) / kThreads, max_blocks));
  pixel_shuffle_bn_cuda_kernel<scalar_t, index_t, kChannelsLast>
      <<<static_cast<unsigned int>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), plan.out.mutable_data_ptr<scalar_t>(),
          plan.scale.const_data_ptr<opmath_t>(), plan.shift.const_data_ptr<opmath_t>(), g,
          static_cast<index_t>(numel), plan.act, static_cast<opmath_t>(slope));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_shuffle_bn_cuda(
    const at::Tensor& x, int64_t upscale_factor, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, c10::string_view activation,
    double negative_slope) {
  const c10::cuda::CUDAGuard guard(x.device());
  PixelShuffleBNPlan plan = plan_pixel_shuffle_bn(x, upscale_factor, weight, bias, running_mean, running_var,
                                                  training, eps, activation);
  if (plan.out.numel() == 0) return {plan.out, plan.mean, plan.var};
  // 32-bit indexing unless the output or the span of x's offsets reaches 2^31.
  const bool index32 = at::native::canUse32BitIndexMath(x) && at::native::canUse32BitIndexMath(plan.out);
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

}  // namespace
}  // namespace uresnet

TORCH_LIBRARY_IMPL(uresnet_ops, CUDA, m) {
  m.impl("_pixel_shuffle_bn_native", &uresnet::pixel_shuffle_bn_cuda);
}
