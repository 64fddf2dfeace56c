// Pieces shared by the CUDA kernels: block size, index unravelling, block reductions and the
// merge of per-block moments.
#pragma once

#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace uresnet {

constexpr int kThreads = 256;

// Blocks per channel for a reduction over M values: fill the GPU a few times over, at least
// ~8 values per thread.
inline int64_t splits_for(int64_t channels, int64_t M) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t want = std::max<int64_t>(1, 4 * prop->multiProcessorCount / std::max<int64_t>(channels, 1));
  return std::max<int64_t>(1, std::min<int64_t>(want, (M + kThreads * 8 - 1) / (kThreads * 8)));
}

// Blocks for a grid-stride loop over numel elements: enough to fill every SM, no more.
inline int64_t grid_for(int64_t numel) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t max_blocks =
      static_cast<int64_t>(prop->multiProcessorCount) * (prop->maxThreadsPerMultiProcessor / kThreads);
  return std::max<int64_t>(1, std::min<int64_t>((numel + kThreads - 1) / kThreads, max_blocks));
}

template <typename index_t>
struct Index4 {
  index_t n, c, h, w;
};

// (n, c, h, w) of the idx-th element of a dense (N, C, H, W) tensor walked in memory order:
// NCHW, or NHWC when kChannelsLast.
template <bool kChannelsLast, typename index_t>
__device__ __forceinline__ Index4<index_t> unravel(index_t idx, const at::cuda::detail::IntDivider<index_t>& channels,
                                                   const at::cuda::detail::IntDivider<index_t>& height,
                                                   const at::cuda::detail::IntDivider<index_t>& width) {
  if constexpr (kChannelsLast) {  // idx = ((n * H + h) * W + w) * C + c
    const auto q0 = channels.divmod(idx);
    const auto q1 = width.divmod(q0.div);
    const auto q2 = height.divmod(q1.div);
    return {q2.div, q0.mod, q2.mod, q1.mod};
  } else {  // idx = ((n * C + c) * H + h) * W + w
    const auto q0 = width.divmod(idx);
    const auto q1 = height.divmod(q0.div);
    const auto q2 = channels.divmod(q1.div);
    return {q2.div, q2.mod, q1.mod, q0.mod};
  }
}

// Tree reduction over the block; every thread passes its part, thread 0 gets the total.
template <typename T, typename Combine>
__device__ __forceinline__ void block_reduce(T* shared, T& v, const Combine& combine) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] = combine(shared[threadIdx.x], shared[threadIdx.x + stride]);
    __syncthreads();
  }
  v = shared[0];
}

template <typename acc_t>
struct WelfordData {
  acc_t n, mean, m2;
};

template <typename acc_t>
__device__ __forceinline__ void welford_add(WelfordData<acc_t>& t, acc_t v) {
  t.n += acc_t(1);
  const acc_t d = v - t.mean;
  t.mean += d / t.n;
  t.m2 += d * (v - t.mean);
}

template <typename acc_t>
__device__ __forceinline__ WelfordData<acc_t> welford_merge(const WelfordData<acc_t>& a, const WelfordData<acc_t>& b) {
  const acc_t n = a.n + b.n;
  if (n == acc_t(0)) return a;
  const acc_t delta = b.mean - a.mean, f = b.n / n;
  return {n, a.mean + delta * f, a.m2 + b.m2 + delta * delta * a.n * f};
}

// Merges per-block moments part[3][C][S] = (count, mean, M2) of values minus shifts[c] into the
// per-channel mean and biased variance over M values (in double, with a few tiny ATen ops: no
// host sync, so CUDA graph capture works): mean = sum(n_s mean_s) / M,
// M2 = sum(M2_s) + sum(n_s (mean_s - mean)^2).
inline std::pair<at::Tensor, at::Tensor> merge_moments(const at::Tensor& part, const at::Tensor& shifts, double M,
                                                       at::ScalarType out_dtype) {
  const at::Tensor p = part.to(at::kDouble);
  const at::Tensor n = p.select(0, 0), m = p.select(0, 1), q = p.select(0, 2);
  const double inv_m = 1.0 / M;
  const at::Tensor mean = n.mul(m).sum(1).mul_(inv_m);
  const at::Tensor var = q.sum(1).add_(n.mul(m.sub(mean.unsqueeze(1)).pow_(2)).sum(1)).mul_(inv_m);
  return {mean.add_(shifts.to(at::kDouble)).to(out_dtype), var.to(out_dtype)};
}

}  // namespace uresnet
