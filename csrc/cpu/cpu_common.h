// Pieces shared by the CPU kernels: per-channel moments, activation dispatch, task sizes.
#pragma once

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

#include "../common.h"

namespace uresnet {

constexpr int64_t kGrainSize = 32768;  // elements per parallel task (at::internal::GRAIN_SIZE)

// (count, mean, M2) of a set of values; merged with Chan's formula in double.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void merge(double nb, double mean_b, double m2_b) {
    if (nb == 0) return;
    const double total = n + nb, delta = mean_b - mean;
    mean += delta * (nb / total);
    m2 += m2_b + delta * delta * (n * nb / total);
    n = total;
  }
};

constexpr int kLanes = 8;  // independent accumulators: break the add chain, let the compiler vectorise

// Corrected two-pass moments of v[0], v[s], ..., v[(len-1)*s] in opmath precision: a rough mean
// first, then deviations from it (the block is in cache by then), whose sum corrects the mean.
// Stable for data far from zero (mean 1e4, std 1).
template <typename scalar_t, typename opmath_t, typename Step>
void block_moments(const scalar_t* v, Step s, int64_t len, opmath_t& mean, opmath_t& m2) {
  opmath_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<opmath_t>(v[(i + l) * s]);
  for (; i < len; ++i) acc[0] += static_cast<opmath_t>(v[i * s]);
  opmath_t sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  const opmath_t rough = sum / static_cast<opmath_t>(len);
  opmath_t d1[kLanes] = {}, d2[kLanes] = {};
  i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const opmath_t d = static_cast<opmath_t>(v[(i + l) * s]) - rough;
      d1[l] += d, d2[l] += d * d;
    }
  for (; i < len; ++i) {
    const opmath_t d = static_cast<opmath_t>(v[i * s]) - rough;
    d1[0] += d, d2[0] += d * d;
  }
  opmath_t sd = 0, sq = 0;
  for (int l = 0; l < kLanes; ++l) sd += d1[l], sq += d2[l];
  mean = rough + sd / static_cast<opmath_t>(len);
  m2 = std::max<opmath_t>(sq - sd * sd / static_cast<opmath_t>(len), 0);
}

#define URESNET_DISPATCH_ACTIVATION(act, ...)                                 \
  switch (act) {                                                              \
    case Activation::None: { constexpr Activation A = Activation::None; __VA_ARGS__; break; }      \
    case Activation::ReLU: { constexpr Activation A = Activation::ReLU; __VA_ARGS__; break; }      \
    case Activation::LeakyReLU: { constexpr Activation A = Activation::LeakyReLU; __VA_ARGS__; break; } \
    case Activation::SiLU: { constexpr Activation A = Activation::SiLU; __VA_ARGS__; break; }      \
  }

}  // namespace uresnet
