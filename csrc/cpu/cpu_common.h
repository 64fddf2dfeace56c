// Pieces shared by the CPU kernels: per-channel moments, activation helpers and dispatch, the
// run-time choice of the AVX2 clone, task sizes.
#pragma once

#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

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

// activate_grad for the CPU loops. ReLU/LeakyReLU select on the sign through the bits (an
// integer compare and mask): GCC turns the float compare into a branch, which mispredicts half the
// time on random signs and costs 5x. y = +0 counts as not positive, as in threshold_backward.
template <Activation A, typename T>
C10_ALWAYS_INLINE T cpu_activate_grad(T dy, T y, T slope) {
  if constexpr (A == Activation::ReLU || A == Activation::LeakyReLU) {
    using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    using SBits = std::make_signed_t<Bits>;
    Bits yb, pass, other;
    std::memcpy(&yb, &y, sizeof(T));
    const T neg = A == Activation::ReLU ? T(0) : dy * slope;
    std::memcpy(&pass, &dy, sizeof(T));
    std::memcpy(&other, &neg, sizeof(T));
    const Bits mask = Bits(0) - static_cast<Bits>(static_cast<SBits>(yb) > 0);  // all ones where y > 0
    const Bits gb = (pass & mask) | (other & ~mask);
    T g;
    std::memcpy(&g, &gb, sizeof(T));
    return g;
  } else {
    return activate_grad<A>(dy, y, slope);
  }
}

// with_best_isa(f) runs f() compiled for the widest vector ISA the CPU has: AVX-512 (only where
// the caller allows it: it measured faster for the forward conv loops, slower for the backward's),
// else AVX2 + FMA, else the baseline. The extension itself is built for baseline x86-64 (SSE2)
// so that it loads on any x86-64 CPU; `flatten` inlines all that f calls into each clone, so the
// loops inside are vectorised 16 or 8 floats wide with FMA. URESNET_CPU_ISA=baseline|avx2 caps
// the choice (tests and debugging).
#if defined(__x86_64__) && defined(__GNUC__)
template <typename F>
__attribute__((target("avx2,fma,f16c"), flatten)) void run_avx2(const F& f) {
  f();
}

template <typename F>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"), flatten)) void run_avx512(const F& f) {
  f();
}

enum class Isa : int { Baseline = 0, AVX2 = 1, AVX512 = 2 };

inline Isa cpu_isa() {
  static const Isa isa = [] {
    const char* cap = std::getenv("URESNET_CPU_ISA");
    const Isa limit = cap && std::strcmp(cap, "baseline") == 0 ? Isa::Baseline
                      : cap && std::strcmp(cap, "avx2") == 0   ? Isa::AVX2
                                                               : Isa::AVX512;
    Isa has = Isa::Baseline;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
      has = Isa::AVX2;
      if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        has = Isa::AVX512;
    }
    return static_cast<Isa>(std::min(static_cast<int>(has), static_cast<int>(limit)));
  }();
  return isa;
}

template <bool AllowAVX512 = false, typename F>
C10_ALWAYS_INLINE void with_best_isa(const F& f) {
  const Isa isa = cpu_isa();
  if (AllowAVX512 && isa == Isa::AVX512) run_avx512(f);
  else if (isa >= Isa::AVX2) run_avx2(f);
  else f();
}
#else
template <bool AllowAVX512 = false, typename F>
C10_ALWAYS_INLINE void with_best_isa(const F& f) {
  f();
}
#endif

// at::parallel_for whose task body f(begin, end) runs with_best_isa.
template <bool AllowAVX512 = false, typename F>
void parallel_for_best_isa(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { with_best_isa<AllowAVX512>([&] { f(b, e); }); });
}

#define URESNET_DISPATCH_ACTIVATION(act, ...)                                 \
  switch (act) {                                                              \
    case Activation::None: { constexpr Activation A = Activation::None; __VA_ARGS__; break; }      \
    case Activation::ReLU: { constexpr Activation A = Activation::ReLU; __VA_ARGS__; break; }      \
    case Activation::LeakyReLU: { constexpr Activation A = Activation::LeakyReLU; __VA_ARGS__; break; } \
    case Activation::SiLU: { constexpr Activation A = Activation::SiLU; __VA_ARGS__; break; }      \
  }

}  // namespace uresnet
