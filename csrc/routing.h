// Which implementation a public op's call runs: the compiled kernel, reached straight from the
// dispatcher (the hot path: no Python between the caller and the kernel), or the Python backend
// registry (uresnet_ops/backends.py: the reference and Triton backends, register_backend,
// use_backend, "auto"). Python resolves the choice once per (op, device) and writes it here
// whenever it changes (set_backend, register_backend); a use_backend block, which is per thread,
// sends its thread's calls to Python for as long as it lasts. csrc/ops.cpp holds the table.
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace uresnet {

// The ops with a routed public kernel, in uresnet_ops.backends.OPS order.
enum class OpId : int { PixelShuffleBN = 0, ShuffleUpsample = 1, MultiDilationConv2d = 2 };
inline constexpr int kNumOps = 3;

enum class Route : int {
  Python = 0,                    // the backend registry decides
  Native = 1,                    // the compiled kernel
  NativeUnlessChannelsLast = 2,  // the compiled kernel, but channels_last input goes to the registry
};

// The route of op for device type dev in the calling thread.
Route route(OpId op, c10::DeviceType dev);

// Whether this call of op (x: its first tensor argument) runs the compiled kernel.
inline bool runs_native(OpId op, const at::Tensor& x) {
  switch (route(op, x.device().type())) {
    case Route::Native: return true;
    case Route::NativeUnlessChannelsLast:
      return !(x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast));
    default: return false;
  }
}

// Records, for uresnet_ops.backends.last_used, that the compiled kernel of dev ran op's phase
// (0 forward, 1 backward) in this thread.
void record_native_run(OpId op, int phase, c10::DeviceType dev);

// The Python side of a routed op, uresnet_ops::_<op>_python (uresnet_ops/_library.py): same
// schema, the backend registry's kernels and autograd. Found on first use (Python defines it
// after this extension is loaded).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Whether x's sizes are symbolic (torch.compile traces): the argument checks need real sizes.
inline bool traced(const at::Tensor& x) { return x.unsafeGetTensorImpl()->has_symbolic_sizes_strides(); }

inline bool requires_grad(const at::Tensor& t) { return t.requires_grad(); }
inline bool requires_grad(const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); }
inline bool requires_grad(at::TensorList ts) {
  return std::any_of(ts.begin(), ts.end(), [](const at::Tensor& t) { return t.requires_grad(); });
}

// Whether autograd records a call with these differentiable inputs (tensors, optional tensors,
// tensor lists): grad mode is on and one of them requires grad.
template <typename... Inputs>
bool records_grad(const Inputs&... inputs) {
  return at::GradMode::is_enabled() && (requires_grad(inputs) || ...);
}

// The Autograd kernel of a routed op (x: its first tensor argument): `python` (the backend
// registry, which records its own autograd) unless the compiled kernel is the choice; then
// `native` (the public op) one dispatch below autograd where `grad` (records_grad) is false, else
// `record` (the op's torch::autograd::Function::apply).
template <typename Python, typename Native, typename Record>
auto autograd_route(OpId op, const at::Tensor& x, bool grad, const Python& python, const Native& native,
                    const Record& record) -> decltype(python()) {
  if (!runs_native(op, x)) return python();
  if (!grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return native();
  }
  return record();
}

// The Tensor? a saved tensor stands for (undefined: none was given).
inline std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

}  // namespace uresnet
