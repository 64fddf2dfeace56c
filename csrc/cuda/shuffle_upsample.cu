// CUDA kernels of uresnet_ops::_shuffle_upsample_conv_native(_backward): conv3x3_grouped(upsample(x))
// with the upsample fused into the convolution (each tap reads the low-resolution x directly;
// the upsampled tensor never exists). Same contract as csrc/cpu/shuffle_upsample.cpp; the op
// itself is the composition of csrc/shuffle_upsample.h around them (the 1x1 GEMM on cuBLAS).
//
// Direct kernels, one thread per output element: x is 1/s^2 the size of the output and its
// taps are re-read from L1/L2. 64-bit indices throughout (tensors over 2^31 elements work).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../common.h"
#include "../shuffle_upsample.h"
#include "cuda_common.cuh"

namespace uresnet {
namespace {

struct ConvGeometry {
  int64_t N, C, H, W, s, OH, OW, Cg;
  int64_t sN, sC, sH, sW;  // x's strides
  bool bilinear;
};

// Value of the upsampled plane (n, c) at (uh, uw), zero outside it (the conv's padding).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t upsampled(const scalar_t* __restrict__ x, const ConvGeometry& g, int64_t n,
                                           int64_t c, int64_t uh, int64_t uw) {
  if (uh < 0 || uh >= g.OH || uw < 0 || uw >= g.OW) return acc_t(0);
  const scalar_t* plane = x + n * g.sN + c * g.sC;
  if (!g.bilinear) return static_cast<acc_t>(plane[(uh / g.s) * g.sH + (uw / g.s) * g.sW]);
  // align_corners=False, as ATen: src = max((dst + 0.5) / s - 0.5, 0).
  const acc_t sh = max((static_cast<acc_t>(uh) + acc_t(0.5)) / g.s - acc_t(0.5), acc_t(0));
  const acc_t sw = max((static_cast<acc_t>(uw) + acc_t(0.5)) / g.s - acc_t(0.5), acc_t(0));
  const int64_t h0 = static_cast<int64_t>(sh), w0 = static_cast<int64_t>(sw);
  const int64_t h1 = h0 + (h0 < g.H - 1), w1 = w0 + (w0 < g.W - 1);
  const acc_t lh = sh - h0, lw = sw - w0;
  const auto at = [&](int64_t h, int64_t w) { return static_cast<acc_t>(plane[h * g.sH + w * g.sW]); };
  return (1 - lh) * ((1 - lw) * at(h0, w0) + lw * at(h0, w1)) + lh * ((1 - lw) * at(h1, w0) + lw * at(h1, w1));
}

// conv3x3_grouped(upsample(x), weight) for output channel co at (oh, ow), before bias.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t conv_at(const scalar_t* __restrict__ x, const acc_t* __restrict__ weight,
                                         const ConvGeometry& g, int64_t n, int64_t co, int64_t oh, int64_t ow) {
  const int64_t c0 = (co / g.Cg) * g.Cg;
  const acc_t* w = weight + co * g.Cg * 9;
  acc_t acc = 0;
  for (int64_t ci = 0; ci < g.Cg; ++ci)
#pragma unroll
    for (int k = 0; k < 9; ++k)
      acc += w[ci * 9 + k] * upsampled<scalar_t, acc_t>(x, g, n, c0 + ci, oh + k / 3 - 1, ow + k % 3 - 1);
  return acc;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ x, const at::opmath_type<scalar_t>* __restrict__ weight,
                   const at::opmath_type<scalar_t>* __restrict__ bias, scalar_t* __restrict__ out, ConvGeometry g,
                   Activation act, at::opmath_type<scalar_t> slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t numel = g.N * g.C * g.OH * g.OW;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t ow = idx % g.OW, oh = (idx / g.OW) % g.OH, co = (idx / (g.OW * g.OH)) % g.C;
    const int64_t n = idx / (g.OW * g.OH * g.C);
    const acc_t v = conv_at<scalar_t, acc_t>(x, weight, g, n, co, oh, ow) + (bias ? bias[co] : acc_t(0));
    out[idx] = static_cast<scalar_t>(activate<acc_t>(v, act, slope));
  }
}

// Per (channel, split) Welford moments of conv - shift, shift = the channel's first conv value
// (accurate for values far from zero); merged by merge_moments.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const scalar_t* __restrict__ x, const at::opmath_type<scalar_t>* __restrict__ weight, ConvGeometry g,
                 int64_t splits, at::opmath_type<scalar_t>* __restrict__ part /* [3][C][S] */,
                 at::opmath_type<scalar_t>* __restrict__ shifts /* [C] */) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ WelfordData<acc_t> shared[kThreads];
  const int64_t c = blockIdx.x / splits, split = blockIdx.x % splits, plane = g.OH * g.OW, M = g.N * plane;
  const acc_t shift = conv_at<scalar_t, acc_t>(x, weight, g, 0, c, 0, 0);
  WelfordData<acc_t> t{0, 0, 0};
  for (int64_t e = split * kThreads + threadIdx.x; e < M; e += splits * kThreads) {
    const int64_t n = e / plane, p = e % plane;
    const acc_t v = conv_at<scalar_t, acc_t>(x, weight, g, n, c, p / g.OW, p % g.OW) - shift;
    welford_add(t, v);
  }
  block_reduce(shared, t, welford_merge<acc_t>);
  if (threadIdx.x == 0) {
    const int64_t CS = g.C * splits;
    part[blockIdx.x] = t.n, part[CS + blockIdx.x] = t.mean, part[2 * CS + blockIdx.x] = t.m2;
    if (split == 0) shifts[c] = shift;
  }
}

ConvGeometry conv_geometry(const char* op, const at::Tensor& x, const at::Tensor& weight, int64_t s,
                           c10::string_view mode) {
  const bool bilinear = check_upsample_conv(op, x, weight, s, mode);
  return {x.size(0), x.size(1), x.size(2), x.size(3), s, x.size(2) * s, x.size(3) * s, weight.size(1),
          x.stride(0), x.stride(1), x.stride(2), x.stride(3), bilinear};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shuffle_upsample_conv_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t scale_factor,
    c10::string_view mode, c10::string_view activation, double negative_slope, bool stats) {
  constexpr const char* op = "uresnet_ops::_shuffle_upsample_conv_native";
  const c10::cuda::CUDAGuard guard(x.device());
  const ConvGeometry g = conv_geometry(op, x, weight, scale_factor, mode);
  check_upsample_conv_bias(op, bias, x);
  const Activation act = parse_activation(activation, op);
  const auto stat_opts = x.options().dtype(stat_dtype(x));
  at::Tensor out = stats ? at::empty({0}, x.options()) : at::empty({g.N, g.C, g.OH, g.OW}, x.options());
  at::Tensor mean = at::zeros({stats ? g.C : 0}, stat_opts), var = at::zeros({stats ? g.C : 0}, stat_opts);
  if (g.N * g.OH * g.OW == 0 || g.C == 0) return {out, mean, var};
  const at::Tensor w = weight.contiguous(), b = has(bias) ? bias->contiguous() : at::Tensor();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "shuffle_upsample_conv_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (stats) {
      const int64_t S = splits_for(g.C, g.N * g.OH * g.OW);
      at::Tensor part = at::empty({3, g.C, S}, stat_opts), shifts = at::empty({g.C}, stat_opts);
      stats_kernel<scalar_t><<<static_cast<unsigned int>(g.C * S), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(), g, S, part.mutable_data_ptr<acc_t>(),
          shifts.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      std::tie(mean, var) = merge_moments(part, shifts, static_cast<double>(g.N * g.OH * g.OW), stat_dtype(x));
    } else {
      forward_kernel<scalar_t><<<static_cast<unsigned int>(grid_for(out.numel())), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(), b.defined() ? b.const_data_ptr<acc_t>() : nullptr,
          out.mutable_data_ptr<scalar_t>(), g, act, static_cast<acc_t>(negative_slope));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, mean, var};
}

// ---- backward ------------------------------------------------------------------------------

// Weight of the upsampled row (or column) u in the interpolation of source row (column) i.
template <typename acc_t>
__device__ __forceinline__ acc_t upsample_weight(int64_t u, int64_t i, int64_t in, int64_t s, bool bilinear) {
  if (!bilinear) return u / s == i ? acc_t(1) : acc_t(0);
  const acc_t src = max((static_cast<acc_t>(u) + acc_t(0.5)) / s - acc_t(0.5), acc_t(0));
  const int64_t i0 = static_cast<int64_t>(src), i1 = i0 + (i0 < in - 1);
  const acc_t l1 = src - i0;
  return (i0 == i ? 1 - l1 : acc_t(0)) + (i1 == i ? l1 : acc_t(0));
}

// grad_x at one low-resolution element, gathered (no atomics): over the upsampled pixels that
// interpolate from it, the transposed conv of grad over the group's output channels.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    grad_input_kernel(const scalar_t* __restrict__ grad, const at::opmath_type<scalar_t>* __restrict__ weight,
                      scalar_t* __restrict__ grad_x, ConvGeometry g, int64_t dN, int64_t dC, int64_t dH, int64_t dW) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t numel = g.N * g.C * g.H * g.W;
  // Upsampled rows reading source row h: [h*s, h*s+s) for nearest, [2h-2, 2h+3) for bilinear x2.
  const int64_t lo = g.bilinear ? -2 : 0, span = g.bilinear ? 5 : g.s;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t w = idx % g.W, h = (idx / g.W) % g.H, ci = (idx / (g.W * g.H)) % g.C, n = idx / (g.W * g.H * g.C);
    const int64_t c0 = (ci / g.Cg) * g.Cg, k = ci - c0;
    acc_t acc = 0;
    for (int64_t a = 0; a < span; ++a) {
      const int64_t uh = h * g.s + lo + a;
      if (uh < 0 || uh >= g.OH) continue;
      const acc_t wh = upsample_weight<acc_t>(uh, h, g.H, g.s, g.bilinear);
      if (wh == acc_t(0)) continue;
      for (int64_t b = 0; b < span; ++b) {
        const int64_t uw = w * g.s + lo + b;
        if (uw < 0 || uw >= g.OW) continue;
        const acc_t ww = upsample_weight<acc_t>(uw, w, g.W, g.s, g.bilinear);
        if (ww == acc_t(0)) continue;
        acc_t up = 0;  // d loss / d upsampled(ci, uh, uw)
        for (int64_t co = c0; co < c0 + g.Cg; ++co) {
          const acc_t* wt = weight + (co * g.Cg + k) * 9;
          const scalar_t* d = grad + n * dN + co * dC;
#pragma unroll
          for (int t = 0; t < 9; ++t) {
            const int64_t oh = uh - t / 3 + 1, ow = uw - t % 3 + 1;
            if (oh >= 0 && oh < g.OH && ow >= 0 && ow < g.OW) up += wt[t] * static_cast<acc_t>(d[oh * dH + ow * dW]);
          }
        }
        acc += wh * ww * up;
      }
    }
    grad_x[idx] = static_cast<scalar_t>(acc);
  }
}

// Partial sums of grad_weight[co, ci, :, :] over one split of the N*OH*OW positions:
// one block per (co, ci within the group, split), nine sums per thread.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    grad_weight_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x, ConvGeometry g,
                       int64_t dN, int64_t dC, int64_t dH, int64_t dW, int64_t splits,
                       at::opmath_type<scalar_t>* __restrict__ part /* [C][Cg][9][S] */) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[kThreads];
  const int64_t split = blockIdx.x % splits, k = (blockIdx.x / splits) % g.Cg, co = blockIdx.x / (splits * g.Cg);
  const int64_t ci = (co / g.Cg) * g.Cg + k, plane = g.OH * g.OW, M = g.N * plane;
  acc_t sums[9] = {};
  for (int64_t e = split * kThreads + threadIdx.x; e < M; e += splits * kThreads) {
    const int64_t n = e / plane, oh = (e % plane) / g.OW, ow = e % g.OW;
    const acc_t d = static_cast<acc_t>(grad[n * dN + co * dC + oh * dH + ow * dW]);
#pragma unroll
    for (int t = 0; t < 9; ++t) sums[t] += d * upsampled<scalar_t, acc_t>(x, g, n, ci, oh + t / 3 - 1, ow + t % 3 - 1);
  }
  const auto add = [](acc_t a, acc_t b) { return a + b; };
  for (int t = 0; t < 9; ++t) {
    block_reduce(shared, sums[t], add);
    if (threadIdx.x == 0) part[((co * g.Cg + k) * 9 + t) * splits + split] = sums[t];
    __syncthreads();
  }
}

std::tuple<at::Tensor, at::Tensor> shuffle_upsample_conv_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                        const at::Tensor& weight,
                                                                        int64_t scale_factor, c10::string_view mode) {
  constexpr const char* op = "uresnet_ops::_shuffle_upsample_conv_native_backward";
  const c10::cuda::CUDAGuard guard(x.device());
  const ConvGeometry g = conv_geometry(op, x, weight, scale_factor, mode);
  check_upsample_conv_grad(op, grad, x, scale_factor);
  at::Tensor grad_x = at::empty({g.N, g.C, g.H, g.W}, x.options());
  at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options());
  if (x.numel() == 0) return {grad_x, grad_weight};
  const at::Tensor w = weight.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "shuffle_upsample_conv_backward_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    grad_input_kernel<scalar_t><<<static_cast<unsigned int>(grid_for(grad_x.numel())), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(), grad_x.mutable_data_ptr<scalar_t>(), g,
        grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t S = splits_for(g.C * g.Cg, g.N * g.OH * g.OW);
    at::Tensor part = at::empty({g.C, g.Cg, 3, 3, S}, weight.options());
    grad_weight_kernel<scalar_t><<<static_cast<unsigned int>(g.C * g.Cg * S), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), g, grad.stride(0), grad.stride(1),
        grad.stride(2), grad.stride(3), S, part.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_weight = part.sum(-1);
  });
  return {grad_x, grad_weight};
}

// ---- the op --------------------------------------------------------------------------------

// The backward recomputes the conv output once and runs BatchNorm + activation and its backward
// as pixel_shuffle_bn's kernels with upscale factor 1; the forward runs the whole batch at once.
const ShuffleUpsampleKernels kKernels{&shuffle_upsample_conv_cuda, &shuffle_upsample_conv_backward_cuda};

template <const char* op>
std::tuple<at::Tensor, at::Tensor, at::Tensor> shuffle_upsample_cuda(
    const at::Tensor& x, const at::Tensor& dw, const std::optional<at::Tensor>& pw,
    const std::optional<at::Tensor>& pw_bias, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, int64_t s, c10::string_view mode,
    int64_t groups, c10::string_view activation, double slope) {
  const c10::cuda::CUDAGuard guard(x.device());
  return shuffle_upsample_fused(kKernels, op, x, dw, pw, pw_bias, bn_weight, bn_bias, running_mean, running_var,
                                training, eps, s, mode, groups, activation, slope);
}

template <const char* op>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shuffle_upsample_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& dw, const std::optional<at::Tensor>& pw,
    const std::optional<at::Tensor>& pw_bias, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const at::Tensor& mean, const at::Tensor& var, bool training,
    double eps, int64_t s, c10::string_view mode, int64_t groups, c10::string_view activation, double slope) {
  const c10::cuda::CUDAGuard guard(x.device());
  return shuffle_upsample_fused_backward(kKernels, op, grad_out, x, dw, pw, pw_bias, bn_weight, bn_bias, mean, var,
                                         training, eps, s, mode, groups, activation, slope);
}

}  // namespace
}  // namespace uresnet

TORCH_LIBRARY_IMPL(uresnet_ops, CUDA, m) {
  using namespace uresnet;
  m.impl("_shuffle_upsample_conv_native", &shuffle_upsample_conv_cuda);
  m.impl("_shuffle_upsample_conv_native_backward", &shuffle_upsample_conv_backward_cuda);
  m.impl("_shuffle_upsample_native", &shuffle_upsample_cuda<kShuffleUpsampleNative>);
  m.impl("_shuffle_upsample_native_backward", &shuffle_upsample_backward_cuda<kShuffleUpsampleNativeBackward>);
  m.impl("shuffle_upsample", &shuffle_upsample_routed<&shuffle_upsample_cuda<kShuffleUpsample>>);
  m.impl("shuffle_upsample_backward",
         &shuffle_upsample_backward_routed<&shuffle_upsample_backward_cuda<kShuffleUpsampleBackward>>);
}
