// CPU kernels of uresnet_ops::_multi_dilation_conv2d_native(_backward):
//   out = cat_b act(conv2d(x, w_b, b_b, padding=d_b*(k_b-1)/2, dilation=d_b))
// as shifted GEMMs: for every branch and tap, one BLAS GEMM over the output pixels whose input
// pixel lies inside the map (taps entirely in padding are skipped, partly-padded taps only
// touch their valid rectangle), accumulating straight into the branch's channel slice of the
// output. NCHW and NHWC are both plain strided matrices for BLAS (pixel stride 1 or channel
// stride 1), so neither layout is converted. Half types are computed in float32.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // errors if a heavy all-operators header sneaks in
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "../multi_dilation_conv2d.h"
#include "cpu_common.h"

// The Fortran BLAS that libtorch_cpu carries (MKL on x86 builds). Weak, so a torch built
// without one still loads the extension; the plain-loop fallback then runs.
extern "C" {
__attribute__((weak)) void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
                                  const float*, const int*, const float*, const int*, const float*, float*,
                                  const int*);
__attribute__((weak)) void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
                                  const double*, const int*, const double*, const int*, const double*, double*,
                                  const int*);
}

namespace uresnet {
namespace {

// Column-major C (m x n, ldc) += op(A) (m x k) * op(B) (k x n), the BLAS convention.
template <typename T>
void gemm_acc(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
              T* c, int64_t ldc) {
  if (m <= 0 || n <= 0 || k <= 0) return;
  const char cta = ta ? 'T' : 'N', ctb = tb ? 'T' : 'N';
  const int im = int(m), in = int(n), ik = int(k), ilda = int(lda), ildb = int(ldb), ildc = int(ldc);
  const T one = 1;
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_) return sgemm_(&cta, &ctb, &im, &in, &ik, &one, a, &ilda, b, &ildb, &one, c, &ildc);
  } else {
    if (dgemm_) return dgemm_(&cta, &ctb, &im, &in, &ik, &one, a, &ilda, b, &ildb, &one, c, &ildc);
  }
  for (int64_t j = 0; j < n; ++j)
    for (int64_t p = 0; p < k; ++p) {
      const T bv = tb ? b[j + p * ldb] : b[p + j * ldb];
      for (int64_t i = 0; i < m; ++i) c[i + j * ldc] += (ta ? a[p + i * lda] : a[i + p * lda]) * bv;
    }
}

// One branch of a tap-shifted convolution: output channels [out_c0, out_c0 + M) of `out` get
// sum over taps of w[tap] (M x K, row-major) times input channels [in_c0, in_c0 + K) of `in`
// at the tap's offset.
template <typename T>
struct Branch {
  int64_t in_c0, K, out_c0, M, k, d;
  const T* w;          // (k*k, M, K) contiguous, or (k*k, K, M) if w_in_out
  const T* bias;       // (M,) or null
  T* grad_w;           // grad_weights: (k*k, M, K) with M = Cout, K = Cin (only for the weight pass)
  bool w_in_out = false;  // the transposed pass reads the forward's packing, (k*k, Cout, Cin)
};

struct Geometry {
  int64_t N, H, W;
  bool channels_last;  // memory is NHWC (else NCHW)
  int64_t HW() const { return H * W; }
};

// The output pixels [oh0, oh1) x [ow0, ow1) whose input pixel (oh + dy, ow + dx) is inside the
// map; empty when the tap only reads padding.
struct Span {
  int64_t oh0, oh1, ow0, ow1;
  bool empty() const { return oh0 >= oh1 || ow0 >= ow1; }
};
inline Span valid_span(const Geometry& g, int64_t dy, int64_t dx, int64_t r0, int64_t r1) {
  return {std::max(r0, -dy), std::min(r1, g.H - dy), std::max<int64_t>(0, -dx), std::min(g.W, g.W - dx)};
}

// Calls f(src, ld, p, np) for the output pixels [p, p + np) of a tap's valid span, src holding
// input channels [c0, c0 + K) of the matching input pixels as (K x np) with leading dimension ld
// (NCHW) or (np x K) (channels_last). A span of whole rows is one run, contiguous in both layouts.
// Otherwise: one run per row, reading the input in place, while the tap's weight matrix
// (weight_bytes) is small enough to stay in cache between the rows' GEMMs; past that, one run
// over a copy of the span's rows shifted by the tap, zero where the tap reads padding (the rows'
// GEMMs would each re-read the weights from memory: the cost that dominates small maps with many
// channels, e.g. 16x16 with 1024 -> 512).
template <typename T, typename F>
void with_tap_input(const Geometry& g, const Span& s, const T* xin, int64_t cin_tot, int64_t c0, int64_t K,
                    int64_t dy, int64_t dx, int64_t weight_bytes, std::vector<T>& buf, F&& f) {
  constexpr int64_t kCachedWeightBytes = 256 << 10;
  const int64_t W = g.W, HW = g.HW();
  const auto in_place = [&](int64_t p, int64_t np) {
    const int64_t q = p + dy * W + dx;  // input pixel of output pixel p
    if (g.channels_last) f(xin + q * cin_tot + c0, cin_tot, p, np);
    else f(xin + c0 * HW + q, HW, p, np);
  };
  if (s.ow0 == 0 && s.ow1 == W) return in_place(s.oh0 * W, (s.oh1 - s.oh0) * W);
  if (weight_bytes <= kCachedWeightBytes) {
    for (int64_t oh = s.oh0; oh < s.oh1; ++oh) in_place(oh * W + s.ow0, s.ow1 - s.ow0);
    return;
  }
  const int64_t np = (s.oh1 - s.oh0) * W;
  buf.assign(static_cast<size_t>(np * K), T(0));
  for (int64_t oh = s.oh0; oh < s.oh1; ++oh) {
    const int64_t out = (oh - s.oh0) * W + s.ow0, in = (oh + dy) * W + s.ow0 + dx, len = s.ow1 - s.ow0;
    if (g.channels_last)  // len pixels of K channels each
      for (int64_t i = 0; i < len; ++i)
        std::copy(xin + (in + i) * cin_tot + c0, xin + (in + i) * cin_tot + c0 + K, buf.data() + (out + i) * K);
    else
      for (int64_t k = 0; k < K; ++k) std::copy(xin + (c0 + k) * HW + in, xin + (c0 + k) * HW + in + len,
                                                buf.data() + k * np + out);
  }
  f(buf.data(), g.channels_last ? K : np, s.oh0 * W, np);
}

// out (cout_tot channels) = [bias or 0] + sum_b sum_taps w_b[tap] * in(shifted by sign * offset);
// then the activation. sign = +1 is the forward convolution, -1 the transposed one (grad_x).
// zero_all: all branches accumulate into the same channels, zeroed once (grad_x).
template <typename T>
void conv_taps(const T* in, int64_t cin_tot, T* out, int64_t cout_tot, const Geometry& g,
               const std::vector<Branch<T>>& branches, int sign, bool zero_all, Activation act, T slope) {
  const int64_t H = g.H, W = g.W, HW = g.HW();
  const bool cl = g.channels_last;
  // Blocks of output rows of one image: up to 1024 pixels per GEMM where taps span full rows,
  // fewer when that would leave threads idle (a batch of one image).
  int64_t rb = std::max<int64_t>(1, std::min<int64_t>(H, 1024 / std::max<int64_t>(W, 1)));
  while (rb > 1 && g.N * ((H + rb - 1) / rb) < 2 * at::get_num_threads()) rb = (rb + 1) / 2;
  const int64_t blocks = (H + rb - 1) / rb;
  at::parallel_for(0, g.N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf;  // shifted input of a tap (with_tap_input)
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / blocks, r0 = (u % blocks) * rb, r1 = std::min(H, r0 + rb);
      const T* xin = in + n * cin_tot * HW;
      T* y = out + n * cout_tot * HW;
      auto fill = [&](int64_t c0, int64_t M, const T* bias) {
        if (cl) {
          for (int64_t p = r0 * W; p < r1 * W; ++p)
            for (int64_t o = 0; o < M; ++o) y[p * cout_tot + c0 + o] = bias ? bias[o] : T(0);
        } else {
          for (int64_t o = 0; o < M; ++o)
            std::fill(y + (c0 + o) * HW + r0 * W, y + (c0 + o) * HW + r1 * W, bias ? bias[o] : T(0));
        }
      };
      if (zero_all) {
        fill(0, cout_tot, nullptr);
      } else {
        for (const auto& b : branches) fill(b.out_c0, b.M, b.bias);
      }
      for (const auto& b : branches) {
        const int64_t half = (b.k - 1) / 2;
        for (int64_t ti = 0; ti < b.k; ++ti)
          for (int64_t tj = 0; tj < b.k; ++tj) {
            const int64_t dy = sign * (ti - half) * b.d, dx = sign * (tj - half) * b.d;
            const Span s = valid_span(g, dy, dx, r0, r1);
            if (s.empty()) continue;  // the tap reads only padding here
            const T* wt = b.w + (ti * b.k + tj) * b.M * b.K;
            const int64_t weight_bytes = b.M * b.K * int64_t(sizeof(T));
            with_tap_input(g, s, xin, cin_tot, b.in_c0, b.K, dy, dx, weight_bytes, buf,
                           [&](const T* src, int64_t ld, int64_t p, int64_t np) {
              // channels_last: C'(M x np) += W(M x K) * X(K x np), pixels are columns of stride ld;
              // NCHW: C(np x M) += X(np x K) * W^T(K x M), pixels are rows of stride 1.
              if (cl && !b.w_in_out)
                gemm_acc<T>(true, false, b.M, np, b.K, wt, b.K, src, ld, y + p * cout_tot + b.out_c0, cout_tot);
              else if (cl)
                gemm_acc<T>(false, false, b.M, np, b.K, wt, b.M, src, ld, y + p * cout_tot + b.out_c0, cout_tot);
              else if (!b.w_in_out)
                gemm_acc<T>(false, false, np, b.M, b.K, src, ld, wt, b.K, y + b.out_c0 * HW + p, HW);
              else
                gemm_acc<T>(false, true, np, b.M, b.K, src, ld, wt, b.M, y + b.out_c0 * HW + p, HW);
            });
          }
      }
      if (act == Activation::None) continue;
      auto apply = [&](T* first, T* last) {
        for (T* v = first; v < last; ++v) *v = activate<T>(*v, act, slope);
      };
      if (cl) {
        apply(y + r0 * W * cout_tot, y + r1 * W * cout_tot);
      } else {
        for (int64_t c = 0; c < cout_tot; ++c) apply(y + c * HW + r0 * W, y + c * HW + r1 * W);
      }
    }
  });
}

// grad_w_b[tap] (Cout_b x Cin) = sum over images and valid output pixels of
// grad_pre(pixel, cout) * x(pixel + offset, cin); one task per (branch, tap). The tasks differ
// in size by orders of magnitude (a centre tap against one that barely overlaps the map), so
// they are handed out largest first, one at a time (an even split of the list leaves threads idle).
template <typename T>
void weight_grads(const T* x, int64_t cin, const T* gp, int64_t ctot, const Geometry& g,
                  const std::vector<Branch<T>>& branches) {
  struct Item {
    int64_t branch, tap, cost;
  };
  std::vector<Item> items;
  for (int64_t b = 0; b < int64_t(branches.size()); ++b)
    for (int64_t t = 0; t < branches[b].k * branches[b].k; ++t) {
      const int64_t half = (branches[b].k - 1) / 2;
      const Span s = valid_span(g, (t / branches[b].k - half) * branches[b].d, (t % branches[b].k - half) * branches[b].d,
                                0, g.H);
      items.push_back({b, t, s.empty() ? 0 : (s.oh1 - s.oh0) * g.W * branches[b].M});
    }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  const int64_t HW = g.HW(), count = int64_t(items.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t it = 0; it < count; ++it) {
    thread_local std::vector<T> buf;  // shifted input of a tap (with_tap_input)
    {
      const auto& b = branches[items[it].branch];
      const int64_t t = items[it].tap, half = (b.k - 1) / 2;
      const int64_t dy = (t / b.k - half) * b.d, dx = (t % b.k - half) * b.d;
      T* c = b.grad_w + t * b.M * cin;  // row-major (M x cin) = column-major (cin x M), ld cin
      std::fill(c, c + b.M * cin, T(0));
      const Span s = valid_span(g, dy, dx, 0, g.H);
      if (s.empty()) continue;
      for (int64_t n = 0; n < g.N; ++n) {
        const T* xn = x + n * cin * HW;
        const T* gn = gp + n * ctot * HW;
        // Here the GEMMs accumulate into the (M x cin) gradient: that is the matrix re-read per row.
        with_tap_input(g, s, xn, cin, 0, cin, dy, dx, b.M * cin * int64_t(sizeof(T)), buf,
                       [&](const T* src, int64_t ld, int64_t p, int64_t np) {
          if (g.channels_last)  // C'(cin x M) += X'(cin x np) * G(np x M), G stored (M x np) ld ctot
            gemm_acc<T>(false, true, cin, b.M, np, src, ld, gn + p * ctot + b.out_c0, ctot, c, cin);
          else  // X stored (np x cin) ld, G stored (np x M) ld HW
            gemm_acc<T>(true, false, cin, b.M, np, src, ld, gn + b.out_c0 * HW + p, HW, c, cin);
        });
      }
    }
  }
}

// grad_pre = grad_out * act'(pre), written over pre (same layout, contiguous).
template <typename T>
void activation_grad_inplace(const T* grad, T* pre, int64_t numel, Activation act, T slope) {
  at::parallel_for(0, numel, 32768, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T v = pre[i], gv = grad[i];
      switch (act) {
        case Activation::ReLU: pre[i] = v <= T(0) ? T(0) : gv; break;
        case Activation::LeakyReLU: pre[i] = v > T(0) ? gv : gv * slope; break;
        case Activation::SiLU: {
          const T sig = T(1) / (T(1) + std::exp(-v));
          pre[i] = gv * sig * (T(1) + v * (T(1) - sig));
          break;
        }
        default: pre[i] = gv;
      }
    }
  });
}

// ---- argument checks and the shared setup ---------------------------------------------------

struct Plan : MultiDilationLayout {
  Geometry g;
  at::ScalarType compute;  // float32 (also for half inputs) or float64
};

Plan make_plan(const char* op, const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations,
               at::TensorList biases, c10::string_view activation) {
  Plan plan;
  static_cast<MultiDilationLayout&>(plan) =
      check_multi_dilation(op, x, weights, dilations, biases, activation, c10::DeviceType::CPU);
  plan.g = {x.size(0), x.size(2), x.size(3), plan.fmt == at::MemoryFormat::ChannelsLast};
  plan.compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // BLAS takes 32-bit sizes and leading dimensions.
  const int64_t limit = std::numeric_limits<int>::max();
  TORCH_CHECK_VALUE(plan.g.HW() <= limit && plan.cin * plan.g.HW() <= limit && plan.ctot * plan.g.HW() <= limit, op,
              ": one image of x (", x.sizes(), ") or of the output is too large for 32-bit BLAS indexing");
  return plan;
}

at::Tensor as_compute(const at::Tensor& t, const Plan& p, at::MemoryFormat fmt = at::MemoryFormat::Contiguous) {
  return t.to(p.compute).contiguous(fmt);
}

// (rows, taps) <-> (taps, rows): a weight (Cout, Cin, k, k) as per-tap (Cout, Cin) matrices and
// back. A loop of our own: ATen's strided copy of this permutation took ~10 ms per 19 MB weight.
template <typename T>
at::Tensor transpose_taps(const at::Tensor& t, int64_t rows, int64_t taps) {
  at::Tensor out = at::empty(t.sizes(), t.options());
  const T* src = t.const_data_ptr<T>();
  T* dst = out.mutable_data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainSize / std::max<int64_t>(taps, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t j = 0; j < taps; ++j) dst[j * rows + i] = src[i * taps + j];
  });
  return out;
}

// Packs each branch's weights per tap as (k*k, Cout, Cin) and builds the branch list: the
// forward's (Cin -> Cout) or the transposed pass's (Cout -> Cin, reading the same packing).
template <typename T>
std::vector<Branch<T>> branches_of(const Plan& p, at::TensorList weights, at::IntArrayRef dilations,
                                   const std::vector<at::Tensor>& biases, bool transposed,
                                   std::vector<at::Tensor>& keep) {
  std::vector<Branch<T>> out;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    const int64_t k = w.size(2), cout = w.size(0);
    const auto wc = as_compute(w, p);
    keep.push_back(k == 1 ? wc : transpose_taps<T>(wc, cout * p.cin, k * k));
    const T* packed = keep.back().template const_data_ptr<T>();
    Branch<T> b;
    if (transposed) {
      b = {p.offsets[i], cout, 0, p.cin, k, dilations[i], packed, nullptr, nullptr, true};
    } else {
      b = {0, p.cin, p.offsets[i], cout, k, dilations[i], packed,
           biases.empty() ? nullptr : biases[i].template data_ptr<T>(), nullptr};
    }
    out.push_back(b);
  }
  return out;
}

// The pre-activation (or activated) output in the compute dtype, in x's layout.
template <typename T>
at::Tensor forward_compute(const Plan& p, const at::Tensor& xc, at::TensorList weights, at::IntArrayRef dilations,
                           at::TensorList biases, Activation act, double slope) {
  std::vector<at::Tensor> keep, bias_c;
  for (const auto& b : biases) bias_c.push_back(as_compute(b, p));
  auto branches = branches_of<T>(p, weights, dilations, bias_c, false, keep);
  auto out = at::empty({p.g.N, p.ctot, p.g.H, p.g.W}, xc.options().memory_format(p.fmt));
  if (out.numel() == 0) return out;
  conv_taps<T>(xc.data_ptr<T>(), p.cin, out.data_ptr<T>(), p.ctot, p.g, branches, +1, false, act, T(slope));
  return out;
}

template <const char* op>
at::Tensor mdc_forward_cpu(const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations,
                           at::TensorList biases, c10::string_view activation, double negative_slope) {
  const Plan p = make_plan(op, x, weights, dilations, biases, activation);
  const auto xc = as_compute(x, p, p.fmt);
  at::Tensor out = p.compute == at::kDouble
                       ? forward_compute<double>(p, xc, weights, dilations, biases, p.act, negative_slope)
                       : forward_compute<float>(p, xc, weights, dilations, biases, p.act, negative_slope);
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type()).contiguous(p.fmt);
}

template <typename T>
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> backward_compute(
    const Plan& p, const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
    at::IntArrayRef dilations, at::TensorList biases, double slope) {
  const auto xc = as_compute(x, p, p.fmt);
  const auto go = as_compute(grad_out, p, p.fmt);
  // grad of the pre-activation: recompute the pre-activation (the public schema carries no
  // saved output), then apply act' in place.
  at::Tensor gp;
  if (p.act == Activation::None) {
    gp = go;
  } else {
    gp = forward_compute<T>(p, xc, weights, dilations, biases, Activation::None, 0.0);
    if (gp.numel()) activation_grad_inplace<T>(go.data_ptr<T>(), gp.data_ptr<T>(), gp.numel(), p.act, T(slope));
  }
  auto grad_x = at::empty(x.sizes(), xc.options().memory_format(p.fmt));
  std::vector<at::Tensor> keep, grad_w_c;
  auto tbranches = branches_of<T>(p, weights, dilations, {}, true, keep);
  auto fbranches = tbranches;  // the weight pass: forward geometry, no weights read
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    grad_w_c.push_back(at::empty({w.size(2), w.size(3), w.size(0), w.size(1)}, xc.options()));
    fbranches[i] = {0, p.cin, p.offsets[i], w.size(0), w.size(2), dilations[i], nullptr, nullptr,
                    grad_w_c.back().data_ptr<T>()};
  }
  if (grad_x.numel()) {
    conv_taps<T>(gp.data_ptr<T>(), p.ctot, grad_x.data_ptr<T>(), p.cin, p.g, tbranches, -1, true, Activation::None,
                 T(0));
  }
  if (gp.numel() && p.cin) {
    weight_grads<T>(xc.data_ptr<T>(), p.cin, gp.data_ptr<T>(), p.ctot, p.g, fbranches);
  } else {
    for (auto& t : grad_w_c) t.zero_();
  }
  std::vector<at::Tensor> grad_w, grad_b;
  const auto gb = p.has_bias ? gp.sum({0, 2, 3}) : at::Tensor();
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    const int64_t taps = w.size(2) * w.size(3);
    const auto unpacked = taps == 1 ? grad_w_c[i] : transpose_taps<T>(grad_w_c[i], taps, w.size(0) * p.cin);
    grad_w.push_back(unpacked.view(w.sizes()).to(w.scalar_type()));
    if (p.has_bias) grad_b.push_back(gb.narrow(0, p.offsets[i], p.widths[i]).to(biases[i].scalar_type()).clone());
  }
  if (grad_x.scalar_type() != x.scalar_type()) grad_x = grad_x.to(x.scalar_type()).contiguous(p.fmt);
  return {grad_x, grad_w, grad_b};
}

template <const char* op>
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mdc_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations,
    at::TensorList biases, c10::string_view activation, double negative_slope) {
  const Plan p = make_plan(op, x, weights, dilations, biases, activation);
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == p.g.N && grad_out.size(1) == p.ctot &&
                  grad_out.size(2) == p.g.H && grad_out.size(3) == p.g.W,
              op, ": argument 'grad_out' must have shape (", p.g.N, ", ", p.ctot, ", ", p.g.H, ", ", p.g.W,
              "), got ", grad_out.sizes());
  return p.compute == at::kDouble
             ? backward_compute<double>(p, grad_out, x, weights, dilations, biases, negative_slope)
             : backward_compute<float>(p, grad_out, x, weights, dilations, biases, negative_slope);
}

}  // namespace
}  // namespace uresnet

TORCH_LIBRARY_IMPL(uresnet_ops, CPU, m) {
  using namespace uresnet;
  m.impl("_multi_dilation_conv2d_native", &mdc_forward_cpu<kMultiDilationConv2dNative>);
  m.impl("_multi_dilation_conv2d_native_backward", &mdc_backward_cpu<kMultiDilationConv2dNativeBackward>);
  m.impl("multi_dilation_conv2d", &multi_dilation_conv2d_routed<&mdc_forward_cpu<kMultiDilationConv2d>>);
  m.impl("multi_dilation_conv2d_backward",
         &multi_dilation_conv2d_backward_routed<&mdc_backward_cpu<kMultiDilationConv2dBackward>>);
}
