// CUDA kernels of uresnet_ops::_multi_dilation_conv2d_native(_backward):
//   out = cat_b act(conv2d(x, w_b, bias_b, padding=d_b*(k_b-1)/2, dilation=d_b)).
// Same contract as csrc/cpu/multi_dilation_conv2d.cpp (output in x.suggest_memory_format(),
// grad weights contiguous, grad biases empty when there are no biases).
//
// Every kernel is one block-level implicit GEMM (a "tile engine", below):
//   * forward: rows = output pixels (N*H*W), columns = one branch's output channels,
//     K = Cin x taps. One launch covers every branch (blockIdx.y walks the column tiles of all
//     branches); taps whose whole pixel tile reads padding are skipped (__syncthreads_or);
//     bias + activation in the epilogue; each branch stores straight into its channel slice.
//   * grad_pre = grad_out * act'(conv + bias): the same forward kernel with a gradient
//     epilogue (the schema carries no saved output, so the pre-activation is recomputed).
//   * grad_x: one transposed pass over all branches: rows = input pixels, columns = Cin,
//     K = sum_b Cout_b x taps_b, tap offsets flipped, reading grad_pre.
//   * grad weights: own kernel, per (branch column tile, tap) a GEMM Cout_b x Cin over the
//     pixels, split along the pixels; float partials summed by ATen (deterministic, no atomics).
//   * grad biases: grad_pre summed per channel by ATen.
// Tile engines: WMMA 16x16x16 tensor-core fragments with float accumulation for float16 /
// bfloat16 on sm_80+ (128 pixels x 64 channels per block, 8 warps of 32x32), and a shared-memory
// tiled scalar FMA engine (64 x 64, 4x4 per thread) for float32 / float64 (and half on older GPUs).
// Operands are read through strides (NCHW, channels_last or any view); the loads are ordered
// along whichever of pixels / channels is contiguous. 64-bit offsets throughout. No host sync:
// the branch tables travel as kernel arguments, so CUDA graph capture works.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "../multi_dilation_conv2d.h"
#include "cuda_common.cuh"

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define URESNET_MDC_WMMA 1
#else
#define URESNET_MDC_WMMA 0
#endif

namespace uresnet {
namespace {

constexpr const char* kOp = "uresnet_ops::_multi_dilation_conv2d_native";
constexpr int kGemmThreads = 256;
// Branches per launch (their table is a kernel argument); more branches take several launches.
constexpr int kMaxSegs = 16;

// ---- tile engines -------------------------------------------------------------------------
// A block accumulates C (BM x BN) += A (BM x BK) * B (BK x BN) over repeated step() calls. The
// loaders la(m, k) / lb(k, n) return the operand element (zero outside the problem); *_k_fast
// says whether consecutive k (else m / n) are adjacent in memory, so that consecutive threads
// load adjacent addresses. epilogue(f, m_fast) calls f(m, n, value) once per tile element.

template <typename scalar_t, typename acc_t>
struct ScalarEngine {
  static constexpr int BM = 64, BN = 64, BK = 16;
  struct Smem {
    acc_t a[BK][BM];
    acc_t b[BK][BN];
  };
  acc_t acc[4][4];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);
  }

  template <typename LA, typename LB>
  __device__ __forceinline__ void step(Smem& s, const LA& la, bool a_k_fast, const LB& lb, bool b_k_fast) {
    const int tid = threadIdx.x;
    for (int e = tid; e < BM * BK; e += kGemmThreads) {
      const int m = a_k_fast ? e / BK : e % BM, k = a_k_fast ? e % BK : e / BM;
      s.a[k][m] = static_cast<acc_t>(la(m, k));
    }
    for (int e = tid; e < BN * BK; e += kGemmThreads) {
      const int n = b_k_fast ? e / BK : e % BN, k = b_k_fast ? e % BK : e / BN;
      s.b[k][n] = static_cast<acc_t>(lb(k, n));
    }
    __syncthreads();
    const int tx = tid % 16, ty = tid / 16;
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      acc_t a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = s.a[k][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = s.b[k][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }

  template <typename F>
  __device__ __forceinline__ void epilogue(Smem& /*s*/, const F& f, bool /*m_fast*/) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) f(ty * 4 + i, tx * 4 + j, acc[i][j]);
  }
};

template <typename scalar_t>
struct WmmaType;
template <>
struct WmmaType<at::Half> {
  using type = __half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
struct WmmaEngine {
  static constexpr int BM = 128, BN = 64, BK = 32;
  // Row paddings keep every fragment pointer 32-byte aligned (ldm multiples of 8 halves / 4 floats).
  static constexpr int LDA = BK + 8, LDB = BN + 8, LDC = BN + 4;
  union Smem {
    struct {
      scalar_t a[BM][LDA];
      scalar_t b[BK][LDB];
    } ab;
    float c[BM][LDC];  // the accumulators on their way to the epilogue (after the last step)
  };
#if URESNET_MDC_WMMA
  using frag_t = typename WmmaType<scalar_t>::type;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];

  // 8 warps as 4 (rows) x 2 (columns), 32 x 32 each.
  __device__ __forceinline__ int warp_m() const { return (threadIdx.x / 32) % 4; }
  __device__ __forceinline__ int warp_n() const { return (threadIdx.x / 32) / 4; }

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }

  template <typename LA, typename LB>
  __device__ __forceinline__ void step(Smem& s, const LA& la, bool a_k_fast, const LB& lb, bool b_k_fast) {
    using namespace nvcuda;
    const int tid = threadIdx.x;
    for (int e = tid; e < BM * BK; e += kGemmThreads) {
      const int m = a_k_fast ? e / BK : e % BM, k = a_k_fast ? e % BK : e / BM;
      s.ab.a[m][k] = la(m, k);
    }
    for (int e = tid; e < BN * BK; e += kGemmThreads) {
      const int n = b_k_fast ? e / BK : e % BN, k = b_k_fast ? e % BK : e / BN;
      s.ab.b[k][n] = lb(k, n);
    }
    __syncthreads();
    const int wm = warp_m(), wn = warp_n();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, frag_t, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, frag_t, wmma::row_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(a[i], reinterpret_cast<const frag_t*>(&s.ab.a[wm * 32 + i * 16][kk]), LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(b[j], reinterpret_cast<const frag_t*>(&s.ab.b[kk][wn * 32 + j * 16]), LDB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

  template <typename F>
  __device__ __forceinline__ void epilogue(Smem& s, const F& f, bool m_fast) {
    using namespace nvcuda;
    __syncthreads();  // s.c overlays the operand tiles
    const int wm = warp_m(), wn = warp_n();
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&s.c[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], LDC, wmma::mem_row_major);
    __syncthreads();
    for (int e = threadIdx.x; e < BM * BN; e += kGemmThreads) {
      const int m = m_fast ? e % BM : e / BN, n = m_fast ? e / BM : e % BN;
      f(m, n, s.c[m][n]);
    }
    __syncthreads();
  }
#else  // never launched below sm_80 (the host picks the scalar engine there)
  __device__ void init() { __trap(); }
  template <typename LA, typename LB>
  __device__ void step(Smem&, const LA&, bool, const LB&, bool) { __trap(); }
  template <typename F>
  __device__ void epilogue(Smem&, const F&, bool) { __trap(); }
#endif
};

// ---- kernel arguments ----------------------------------------------------------------------

// Branches as seen by one implicit GEMM. Forward: a branch reads input channels [0, Cin), its
// packed weights are (k*k, Cin, Cout_b) and it writes output channels [out_c0, out_c0 + Cout_b).
// Transposed (grad_x): it reads grad_pre channels [in_c0, in_c0 + Cout_b), its weights are
// (k*k, Cout_b, Cin) and every branch accumulates into the same Cin columns.
template <typename scalar_t>
struct Segs {
  const scalar_t* w[kMaxSegs];     // packed weights: w[(t * kch + c) * ncols + col]
  const scalar_t* bias[kMaxSegs];  // forward only; nullptr without biases
  int64_t in_c0[kMaxSegs], kch[kMaxSegs];     // input channels read
  int64_t out_c0[kMaxSegs], ncols[kMaxSegs];  // output columns written
  int64_t k[kMaxSegs], d[kMaxSegs];
  int64_t tile0[kMaxSegs + 1];  // forward: first column tile (blockIdx.y) of each branch
  int64_t w_off[kMaxSegs];      // grad weights: offset of the branch in the partial sums
  int64_t item0[kMaxSegs + 1];  // grad weights: first (column tile, tap) item of each branch
  int count;
};

struct Geo {
  int64_t N, H, W, HW, NHW;
  int64_t in_s[4];   // strides of the GEMM's pixel operand (x, or grad_pre for grad_x)
  int64_t out_s[4];  // strides of the output (out, grad_pre or grad_x)
  int64_t go_s[4];   // strides of grad_out (gradient epilogue)
  int64_t cols;      // transposed: Cin (every branch's column count)
};

enum class Epilogue : int { Forward = 0, Grad = 1, Transposed = 2 };

template <int BM>
struct PixelRows {
  int64_t n[BM];
  int64_t h[BM], w[BM];
  int ok[BM];
};

// Fill the rows of pixel tile m0 (all threads; ends with a barrier).
template <int BM>
__device__ __forceinline__ void load_rows(PixelRows<BM>& rows, int64_t m0, const Geo& g) {
  for (int i = threadIdx.x; i < BM; i += kGemmThreads) {
    const int64_t m = m0 + i;
    const bool ok = m < g.NHW;
    const int64_t n = ok ? m / g.HW : 0, r = ok ? m - n * g.HW : 0;
    rows.n[i] = n;
    rows.h[i] = r / g.W;
    rows.w[i] = r - (r / g.W) * g.W;
    rows.ok[i] = ok;
  }
  __syncthreads();
}

// ---- forward / gradient-epilogue / transposed implicit GEMM --------------------------------

template <typename scalar_t, typename Engine, Epilogue kMode>
__global__ void __launch_bounds__(kGemmThreads)
    conv_gemm_kernel(const scalar_t* __restrict__ in, Segs<scalar_t> segs, scalar_t* __restrict__ out,
                     const scalar_t* __restrict__ grad_out, Geo g, Activation act,
                     at::opmath_type<scalar_t> slope, bool accumulate) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int BM = Engine::BM, BN = Engine::BN, BK = Engine::BK;
  constexpr bool kTransposed = kMode == Epilogue::Transposed;
  static_assert(BM <= kGemmThreads, "one thread per row for the tap test");
  __shared__ __align__(128) unsigned char smem_raw[sizeof(typename Engine::Smem)];
  __shared__ PixelRows<BM> rows;
  auto& smem = *reinterpret_cast<typename Engine::Smem*>(smem_raw);

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  load_rows<BM>(rows, m0, g);

  int seg_begin = 0, seg_end = segs.count;
  int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  if constexpr (!kTransposed) {  // the branch this column tile belongs to
    int b = 0;
    while (b + 1 < segs.count && segs.tile0[b + 1] <= static_cast<int64_t>(blockIdx.y)) ++b;
    seg_begin = b;
    seg_end = b + 1;
    n0 = (static_cast<int64_t>(blockIdx.y) - segs.tile0[b]) * BN;
  }
  const int64_t ncols = kTransposed ? g.cols : segs.ncols[seg_begin];
  const int64_t sN = g.in_s[0], sC = g.in_s[1], sH = g.in_s[2], sW = g.in_s[3];
  const bool in_cl = sC == 1;  // channels adjacent: load along K

  Engine engine;
  engine.init();
  for (int b = seg_begin; b < seg_end; ++b) {
    const int64_t k = segs.k[b], d = segs.d[b], half = (k - 1) / 2;
    const int64_t kch = segs.kch[b], in_c0 = segs.in_c0[b], ldb = segs.ncols[b];
    for (int64_t t = 0; t < k * k; ++t) {
      // Forward: output pixel p reads p + offset; transposed: input pixel p gets p - offset.
      const int64_t dy = (kTransposed ? -1 : 1) * (t / k - half) * d;
      const int64_t dx = (kTransposed ? -1 : 1) * (t % k - half) * d;
      int any = 0;
      if (threadIdx.x < BM && rows.ok[threadIdx.x]) {
        const int64_t ih = rows.h[threadIdx.x] + dy, iw = rows.w[threadIdx.x] + dx;
        any = ih >= 0 && ih < g.H && iw >= 0 && iw < g.W;
      }
      if (!__syncthreads_or(any)) continue;  // the whole pixel tile reads padding through this tap
      const scalar_t* wt = segs.w[b] + t * kch * ldb;
      for (int64_t c0 = 0; c0 < kch; c0 += BK) {
        const auto la = [&](int m, int kk) -> scalar_t {
          const int64_t c = c0 + kk;
          if (c >= kch || !rows.ok[m]) return scalar_t(0);
          const int64_t ih = rows.h[m] + dy, iw = rows.w[m] + dx;
          if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return scalar_t(0);
          return in[rows.n[m] * sN + (in_c0 + c) * sC + ih * sH + iw * sW];
        };
        const auto lb = [&](int kk, int nn) -> scalar_t {
          const int64_t c = c0 + kk, col = n0 + nn;
          if (c >= kch || col >= ldb) return scalar_t(0);
          return wt[c * ldb + col];
        };
        engine.step(smem, la, in_cl, lb, /*b_k_fast=*/false);
      }
    }
  }

  const int64_t out_c0 = kTransposed ? 0 : segs.out_c0[seg_begin];
  const scalar_t* bias = kTransposed ? nullptr : segs.bias[seg_begin];
  const bool out_cl = g.out_s[1] == 1;
  engine.epilogue(smem, [&](int m, int nn, acc_t v) {
    const int64_t col = n0 + nn;
    if (!rows.ok[m] || col >= ncols) return;
    const int64_t c = out_c0 + col;
    const int64_t o = rows.n[m] * g.out_s[0] + c * g.out_s[1] + rows.h[m] * g.out_s[2] + rows.w[m] * g.out_s[3];
    if constexpr (kMode == Epilogue::Transposed) {
      if (accumulate) v += static_cast<acc_t>(out[o]);
      out[o] = static_cast<scalar_t>(v);
    } else {
      if (bias != nullptr) v += static_cast<acc_t>(bias[col]);
      if constexpr (kMode == Epilogue::Grad) {
        const acc_t dy = static_cast<acc_t>(
            grad_out[rows.n[m] * g.go_s[0] + c * g.go_s[1] + rows.h[m] * g.go_s[2] + rows.w[m] * g.go_s[3]]);
        out[o] = static_cast<scalar_t>(activate_grad<acc_t>(dy, v, act, slope));
      } else {
        out[o] = static_cast<scalar_t>(activate<acc_t>(v, act, slope));
      }
    }
  }, /*m_fast=*/!out_cl);
}

// ---- weight gradients ------------------------------------------------------------------------
// Block (ci tile, item, split): item = (branch column tile of Cout, tap). M = Cout_b, N = Cin,
// K = the split's pixels p: A(co, p) = grad_pre(p, c_off + co), B(p, ci) = x(p + offset, ci).
// part[split][w_off_b + (co * Cin + ci) * k*k + t]; every element is written by exactly one block.

template <typename scalar_t, typename Engine>
__global__ void __launch_bounds__(kGemmThreads)
    grad_weight_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gp, Segs<scalar_t> segs,
                       at::opmath_type<scalar_t>* __restrict__ part, Geo g /* in_s: x, out_s: gp */, int64_t cin,
                       int64_t per_split, int64_t w_total) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int BM = Engine::BM, BN = Engine::BN, BK = Engine::BK;
  static_assert(BK <= kGemmThreads, "one thread per pixel of a K chunk");
  __shared__ __align__(128) unsigned char smem_raw[sizeof(typename Engine::Smem)];
  __shared__ PixelRows<BK> pix;
  auto& smem = *reinterpret_cast<typename Engine::Smem*>(smem_raw);

  const int64_t item = blockIdx.y;
  int b = 0;
  while (b + 1 < segs.count && segs.item0[b + 1] <= item) ++b;
  const int64_t k = segs.k[b], d = segs.d[b], half = (k - 1) / 2, kk2 = k * k;
  const int64_t local = item - segs.item0[b], t = local % kk2, co0 = (local / kk2) * BM;
  const int64_t c_off = segs.out_c0[b], cout = segs.ncols[b];
  const int64_t dy = (t / k - half) * d, dx = (t % k - half) * d;
  const int64_t ci0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t p_begin = static_cast<int64_t>(blockIdx.z) * per_split;
  const int64_t p_end = std::min<int64_t>(g.NHW, p_begin + per_split);
  const bool gp_cl = g.out_s[1] == 1, x_cl = g.in_s[1] == 1;

  Engine engine;
  engine.init();
  for (int64_t p0 = p_begin; p0 < p_end; p0 += BK) {
    int any = 0;
    if (threadIdx.x < BK) {  // pixel p0 + i, usable when in range and its shifted pixel is inside
      const int i = threadIdx.x;
      const int64_t p = p0 + i;
      int ok = p < p_end;
      const int64_t n = ok ? p / g.HW : 0, r = ok ? p - n * g.HW : 0, h = r / g.W, w = r - h * g.W;
      ok = ok && h + dy >= 0 && h + dy < g.H && w + dx >= 0 && w + dx < g.W;
      pix.n[i] = n;
      pix.h[i] = h;
      pix.w[i] = w;
      pix.ok[i] = ok;
      any = ok;
    }
    if (!__syncthreads_or(any)) continue;  // barrier: pix is visible below
    const auto la = [&](int m, int kp) -> scalar_t {
      const int64_t co = co0 + m;
      if (co >= cout || !pix.ok[kp]) return scalar_t(0);
      return gp[pix.n[kp] * g.out_s[0] + (c_off + co) * g.out_s[1] + pix.h[kp] * g.out_s[2] +
                pix.w[kp] * g.out_s[3]];
    };
    const auto lb = [&](int kp, int nn) -> scalar_t {
      const int64_t ci = ci0 + nn;
      if (ci >= cin || !pix.ok[kp]) return scalar_t(0);
      return x[pix.n[kp] * g.in_s[0] + ci * g.in_s[1] + (pix.h[kp] + dy) * g.in_s[2] + (pix.w[kp] + dx) * g.in_s[3]];
    };
    engine.step(smem, la, /*a_k_fast=*/!gp_cl, lb, /*b_k_fast=*/!x_cl);
    // step() ends with a barrier, so pix may be rewritten by the next chunk.
  }
  acc_t* dst = part + static_cast<int64_t>(blockIdx.z) * w_total + segs.w_off[b];
  engine.epilogue(smem, [&](int m, int nn, acc_t v) {
    const int64_t co = co0 + m, ci = ci0 + nn;
    if (co < cout && ci < cin) dst[(co * cin + ci) * kk2 + t] = v;
  }, /*m_fast=*/false);
}

// ---- host side -------------------------------------------------------------------------------

struct Plan : MultiDilationLayout {
  int64_t N, H, W;
};

Plan make_plan(const char* op, const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations,
               at::TensorList biases, c10::string_view activation) {
  Plan p;
  static_cast<MultiDilationLayout&>(p) =
      check_multi_dilation(op, x, weights, dilations, biases, activation, c10::DeviceType::CUDA);
  p.N = x.size(0);
  p.H = x.size(2);
  p.W = x.size(3);
  for (size_t i = 0; i < weights.size(); ++i)  // offsets up to (k/2)*d stay far from int64 overflow
    TORCH_CHECK_VALUE(dilations[i] <= (int64_t{1} << 40) / weights[i].size(2), op, ": argument 'dilations[", i,
                "]' is too large, got ", dilations[i]);
  return p;
}

Geo make_geo(const Plan& p, const at::Tensor& in, const at::Tensor& out) {
  Geo g{};
  g.N = p.N;
  g.H = p.H;
  g.W = p.W;
  g.HW = p.H * p.W;
  g.NHW = p.N * g.HW;
  for (int i = 0; i < 4; ++i) {
    g.in_s[i] = in.stride(i);
    g.out_s[i] = out.stride(i);
    g.go_s[i] = 0;
  }
  g.cols = p.cin;
  return g;
}

bool use_tensor_cores(at::ScalarType t) {
  if (t != at::kHalf && t != at::kBFloat16) return false;
  return at::cuda::getCurrentDeviceProperties()->major >= 8;
}

template <typename Engine>
unsigned int pixel_blocks(const Geo& g) {
  const int64_t blocks = (g.NHW + Engine::BM - 1) / Engine::BM;
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int>::max(), kOp, ": too many pixels (", g.NHW, ") for one launch");
  return static_cast<unsigned int>(blocks);
}

// Packed weights per branch. The dilation is not part of a tensor; keep it alongside.
struct Packed {
  std::vector<at::Tensor> w;  // forward: (k*k, Cin, Cout_b); transposed: (k*k, Cout_b, Cin)
  std::vector<int64_t> k, d;
};

Packed pack(at::TensorList weights, at::IntArrayRef dilations, bool transposed) {
  Packed out;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    const int64_t k = w.size(2);
    at::Tensor t = transposed ? w.permute({2, 3, 0, 1}) : w.permute({2, 3, 1, 0});
    out.w.push_back(t.contiguous().view({k * k, t.size(2), t.size(3)}));
    out.k.push_back(k);
    out.d.push_back(dilations[i]);
  }
  return out;
}

// Forward (or gradient-epilogue) launches over the branches in chunks of kMaxSegs.
template <typename scalar_t, typename Engine, Epilogue kMode>
void run_forward(const Plan& p, const at::Tensor& x, const Packed& pk, at::TensorList biases, at::Tensor& out,
                 const at::Tensor* grad_out, double slope) {
  using acc_t = at::opmath_type<scalar_t>;
  Geo g = make_geo(p, x, out);
  if (grad_out != nullptr)
    for (int i = 0; i < 4; ++i) g.go_s[i] = grad_out->stride(i);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t nb = static_cast<int64_t>(pk.w.size());
  for (int64_t s0 = 0; s0 < nb; s0 += kMaxSegs) {
    Segs<scalar_t> segs{};
    segs.count = static_cast<int>(std::min<int64_t>(kMaxSegs, nb - s0));
    int64_t tiles = 0;
    for (int i = 0; i < segs.count; ++i) {
      const int64_t b = s0 + i;
      segs.w[i] = pk.w[b].const_data_ptr<scalar_t>();
      segs.bias[i] = p.has_bias ? biases[b].const_data_ptr<scalar_t>() : nullptr;
      segs.in_c0[i] = 0;
      segs.kch[i] = p.cin;
      segs.out_c0[i] = p.offsets[b];
      segs.ncols[i] = p.widths[b];
      segs.k[i] = pk.k[b];
      segs.d[i] = pk.d[b];
      segs.tile0[i] = tiles;
      tiles += (p.widths[b] + Engine::BN - 1) / Engine::BN;
    }
    segs.tile0[segs.count] = tiles;
    if (tiles == 0) continue;
    TORCH_CHECK_VALUE(tiles <= 65535, kOp, ": too many output channels per launch (", tiles, " column tiles)");
    const dim3 grid(pixel_blocks<Engine>(g), static_cast<unsigned int>(tiles));
    conv_gemm_kernel<scalar_t, Engine, kMode><<<grid, kGemmThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), segs, out.mutable_data_ptr<scalar_t>(),
        grad_out ? grad_out->const_data_ptr<scalar_t>() : nullptr, g, p.act, static_cast<acc_t>(slope), false);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// grad_x (in grad_x's strides) from grad_pre: one pass over all branches (chunks of kMaxSegs
// accumulate after the first).
template <typename scalar_t, typename Engine>
void run_grad_x(const Plan& p, const at::Tensor& gp, const Packed& pk, at::Tensor& grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geo g = make_geo(p, gp, grad_x);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t nb = static_cast<int64_t>(pk.w.size());
  const int64_t col_tiles = (p.cin + Engine::BN - 1) / Engine::BN;
  TORCH_CHECK_VALUE(col_tiles <= 65535, kOp, "_backward: too many input channels (", p.cin, ")");
  for (int64_t s0 = 0; s0 < nb; s0 += kMaxSegs) {
    Segs<scalar_t> segs{};
    segs.count = static_cast<int>(std::min<int64_t>(kMaxSegs, nb - s0));
    for (int i = 0; i < segs.count; ++i) {
      const int64_t b = s0 + i;
      segs.w[i] = pk.w[b].const_data_ptr<scalar_t>();
      segs.bias[i] = nullptr;
      segs.in_c0[i] = p.offsets[b];
      segs.kch[i] = p.widths[b];
      segs.out_c0[i] = 0;
      segs.ncols[i] = p.cin;
      segs.k[i] = pk.k[b];
      segs.d[i] = pk.d[b];
    }
    const dim3 grid(pixel_blocks<Engine>(g), static_cast<unsigned int>(col_tiles));
    conv_gemm_kernel<scalar_t, Engine, Epilogue::Transposed><<<grid, kGemmThreads, 0, stream>>>(
        gp.const_data_ptr<scalar_t>(), segs, grad_x.mutable_data_ptr<scalar_t>(), nullptr, g, Activation::None,
        acc_t(0), /*accumulate=*/s0 > 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Weight gradients as flat (Cout_b, Cin, k, k) blocks of part[splits][w_total], summed over splits.
template <typename scalar_t, typename Engine>
at::Tensor run_grad_w(const Plan& p, const at::Tensor& x, const at::Tensor& gp, at::TensorList weights,
                      at::IntArrayRef dilations) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_opts = x.options().dtype(stat_dtype(x));
  int64_t w_total = 0;
  for (const auto& w : weights) w_total += w.numel();
  const Geo g = make_geo(p, x, gp);
  if (w_total == 0 || g.NHW == 0 || p.cin == 0) return at::zeros({w_total}, acc_opts);
  const int64_t nb = static_cast<int64_t>(weights.size());
  int64_t total_items = 0;
  for (int64_t b = 0; b < nb; ++b)
    total_items += ((p.widths[b] + Engine::BM - 1) / Engine::BM) * weights[b].size(2) * weights[b].size(2);
  const int64_t ci_tiles = (p.cin + Engine::BN - 1) / Engine::BN;
  TORCH_CHECK_VALUE(ci_tiles <= std::numeric_limits<int>::max(), kOp, "_backward: too many input channels");
  // Splits along the pixels: about 4 waves of blocks, at least 8 K chunks per block.
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t want = std::max<int64_t>(1, 4 * prop->multiProcessorCount / std::max<int64_t>(1, total_items * ci_tiles));
  const int64_t chunk = 8 * Engine::BK;
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, (g.NHW + chunk - 1) / chunk, 65535}));
  int64_t per_split = (g.NHW + splits - 1) / splits;
  per_split = (per_split + Engine::BK - 1) / Engine::BK * Engine::BK;
  splits = (g.NHW + per_split - 1) / per_split;
  at::Tensor part = at::empty({splits, w_total}, acc_opts);
  const auto stream = at::cuda::getCurrentCUDAStream();
  int64_t w_off = 0;
  for (int64_t s0 = 0; s0 < nb; s0 += kMaxSegs) {
    Segs<scalar_t> segs{};
    segs.count = static_cast<int>(std::min<int64_t>(kMaxSegs, nb - s0));
    int64_t items = 0;
    for (int i = 0; i < segs.count; ++i) {
      const int64_t b = s0 + i, k = weights[b].size(2);
      segs.w[i] = nullptr;
      segs.bias[i] = nullptr;
      segs.out_c0[i] = p.offsets[b];
      segs.ncols[i] = p.widths[b];
      segs.k[i] = k;
      segs.d[i] = dilations[b];
      segs.w_off[i] = w_off;
      segs.item0[i] = items;
      items += ((p.widths[b] + Engine::BM - 1) / Engine::BM) * k * k;
      w_off += weights[b].numel();
    }
    segs.item0[segs.count] = items;
    if (items == 0) continue;
    TORCH_CHECK_VALUE(items <= 65535, kOp, "_backward: too many (channel tile, tap) pairs per launch (", items, ")");
    const dim3 grid(static_cast<unsigned int>(ci_tiles), static_cast<unsigned int>(items),
                    static_cast<unsigned int>(splits));
    grad_weight_kernel<scalar_t, Engine><<<grid, kGemmThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), gp.const_data_ptr<scalar_t>(), segs, part.mutable_data_ptr<acc_t>(), g,
        p.cin, per_split, w_total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return part.sum(0);
}

template <const char* op>
at::Tensor mdc_forward_cuda(const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations,
                            at::TensorList biases, c10::string_view activation, double negative_slope) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Plan p = make_plan(op, x, weights, dilations, biases, activation);
  at::Tensor out = at::empty({p.N, p.ctot, p.H, p.W}, x.options().memory_format(p.fmt));
  if (out.numel() == 0) return out;
  const Packed pk = pack(weights, dilations, /*transposed=*/false);
  std::vector<at::Tensor> bias_c;
  for (const auto& b : biases) bias_c.push_back(b.contiguous());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_dilation_conv2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      if (use_tensor_cores(x.scalar_type())) {
        run_forward<scalar_t, WmmaEngine<scalar_t>, Epilogue::Forward>(p, x, pk, bias_c, out, nullptr,
                                                                       negative_slope);
        return;
      }
    }
    run_forward<scalar_t, ScalarEngine<scalar_t, acc_t>, Epilogue::Forward>(p, x, pk, bias_c, out, nullptr,
                                                                            negative_slope);
  });
  return out;
}

template <typename scalar_t, typename Engine>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const Plan& p, const at::Tensor& grad_out,
                                                            const at::Tensor& x, at::TensorList weights,
                                                            at::IntArrayRef dilations, at::TensorList biases,
                                                            double slope) {
  // 1. grad_pre = grad_out * act'(conv + bias), recomputed with the forward GEMM.
  at::Tensor gp = grad_out;
  if (p.act != Activation::None) {
    gp = at::empty({p.N, p.ctot, p.H, p.W}, x.options().memory_format(p.fmt));
    const Packed pf = pack(weights, dilations, /*transposed=*/false);
    std::vector<at::Tensor> bias_c;
    for (const auto& b : biases) bias_c.push_back(b.contiguous());
    run_forward<scalar_t, Engine, Epilogue::Grad>(p, x, pf, bias_c, gp, &grad_out, slope);
  }
  // 2. grad_x: one transposed pass over every branch.
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(p.fmt));
  if (grad_x.numel() != 0) run_grad_x<scalar_t, Engine>(p, gp, pack(weights, dilations, /*transposed=*/true), grad_x);
  // 3. weight gradients (flat, accumulation dtype) and bias gradients.
  at::Tensor gw = run_grad_w<scalar_t, Engine>(p, x, gp, weights, dilations);
  at::Tensor gb = p.has_bias ? gp.sum({0, 2, 3}, /*keepdim=*/false, stat_dtype(x)) : at::Tensor();
  return {grad_x, gw, gb};
}

template <const char* op>
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mdc_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations,
    at::TensorList biases, c10::string_view activation, double negative_slope) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Plan p = make_plan(op, x, weights, dilations, biases, activation);
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == p.N && grad_out.size(1) == p.ctot &&
                  grad_out.size(2) == p.H && grad_out.size(3) == p.W,
              op, ": argument 'grad_out' must have shape (", p.N, ", ", p.ctot, ", ", p.H, ", ", p.W, "), got ",
              grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(), op,
              ": argument 'grad_out' must have x's dtype and device (", x.scalar_type(), ", ", x.device(), "), got ",
              grad_out.scalar_type(), ", ", grad_out.device());
  std::vector<at::Tensor> grad_w, grad_b;
  if (p.N * p.H * p.W == 0) {  // empty batch: nothing to convolve
    for (const auto& w : weights) grad_w.push_back(at::zeros(w.sizes(), w.options()));
    for (const auto& b : biases) grad_b.push_back(at::zeros(b.sizes(), b.options()));
    return {at::empty(x.sizes(), x.options().memory_format(p.fmt)), grad_w, grad_b};
  }
  at::Tensor grad_x, gw, gb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_dilation_conv2d_backward_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      if (use_tensor_cores(x.scalar_type())) {
        std::tie(grad_x, gw, gb) = backward_impl<scalar_t, WmmaEngine<scalar_t>>(p, grad_out, x, weights,
                                                                                  dilations, biases, negative_slope);
        return;
      }
    }
    std::tie(grad_x, gw, gb) = backward_impl<scalar_t, ScalarEngine<scalar_t, acc_t>>(
        p, grad_out, x, weights, dilations, biases, negative_slope);
  });
  int64_t off = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    grad_w.push_back(gw.narrow(0, off, w.numel()).view(w.sizes()).to(w.scalar_type(), /*non_blocking=*/false,
                                                                      /*copy=*/true));
    off += w.numel();
    if (p.has_bias)
      grad_b.push_back(gb.narrow(0, p.offsets[i], p.widths[i]).to(biases[i].scalar_type(), /*non_blocking=*/false,
                                                                   /*copy=*/true));
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace uresnet

TORCH_LIBRARY_IMPL(uresnet_ops, CUDA, m) {
  using namespace uresnet;
  m.impl("_multi_dilation_conv2d_native", &mdc_forward_cuda<kMultiDilationConv2dNative>);
  m.impl("_multi_dilation_conv2d_native_backward", &mdc_backward_cuda<kMultiDilationConv2dNativeBackward>);
  m.impl("multi_dilation_conv2d", &multi_dilation_conv2d_routed<&mdc_forward_cuda<kMultiDilationConv2d>>);
  m.impl("multi_dilation_conv2d_backward",
         &multi_dilation_conv2d_backward_routed<&mdc_backward_cuda<kMultiDilationConv2dBackward>>);
}
