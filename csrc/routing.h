// Which implementation a public op's call runs: the compiled kernel, reached straight from the
// dispatcher (the hot path: no Python between the caller and the kernel), or the Python backend
// registry (uresnet_ops/backends.py: the reference and Triton backends, register_backend,
// use_backend, "auto"). Python resolves the choice once per (op, device) and writes it here
// whenever it changes (set_backend, register_backend); a use_backend block, which is per thread,
// sends its thread's calls to Python for as long as it lasts. csrc/ops.cpp holds the table.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>

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

}  // namespace uresnet
