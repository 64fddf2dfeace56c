// Defines the native kernel ops, and the `uresnet_ops._C` Python module.
//
// Only the `_<op>_native` kernel ops are defined here, each from the schema constant in its op's
// header (csrc/<op>.h, next to the checks of those arguments); the public ops are defined from
// Python (uresnet_ops/_library.py, a FRAGMENT library), so they exist even without this
// extension. The kernels are registered per device in csrc/cpu/*.cpp and csrc/cuda/*.cu.
//
// It also holds the routing table of csrc/routing.h and the functions Python sets it with.
//
// A plain PyInit (no pybind11, no <torch/extension.h>) keeps this file quick to compile.
#include <Python.h>
#include <torch/library.h>

#include <atomic>

#include "multi_dilation_conv2d.h"
#include "pixel_shuffle_bn.h"
#include "routing.h"
#include "shuffle_upsample.h"

TORCH_LIBRARY(uresnet_ops, m) {
  m.def(uresnet::kPixelShuffleBNNativeSchema);
  m.def(uresnet::kPixelShuffleBNNativeBackwardSchema);
  m.def(uresnet::kShuffleUpsampleNativeSchema);
  m.def(uresnet::kShuffleUpsampleNativeBackwardSchema);
  m.def(uresnet::kShuffleUpsampleConvNativeSchema);
  m.def(uresnet::kShuffleUpsampleConvNativeBackwardSchema);
  m.def(uresnet::kShuffleUpsampleBNSumsNativeSchema);
  m.def(uresnet::kShuffleUpsampleBNBackwardNativeSchema);
  m.def(uresnet::kMultiDilationConv2dNativeSchema);
  m.def(uresnet::kMultiDilationConv2dNativeBackwardSchema);
}

namespace uresnet {
namespace {

int device_index(c10::DeviceType dev) { return dev == c10::DeviceType::CUDA ? 1 : 0; }

// [op][cpu, cuda]: set by Python for every thread (the process-wide choice).
std::atomic<int> routes[kNumOps][2] = {};
// use_backend blocks open in this thread: while any is, every call goes to Python.
thread_local int open_use_backend_blocks = 0;
// [op][forward, backward]: 0 nothing recorded, else 1 + device_index of the compiled kernel that ran.
thread_local int native_runs[kNumOps][2] = {};

}  // namespace

Route route(OpId op, c10::DeviceType dev) {
  if (open_use_backend_blocks > 0 || (dev != c10::DeviceType::CPU && dev != c10::DeviceType::CUDA)) {
    return Route::Python;
  }
  return static_cast<Route>(routes[static_cast<int>(op)][device_index(dev)].load(std::memory_order_relaxed));
}

void record_native_run(OpId op, int phase, c10::DeviceType dev) {
  native_runs[static_cast<int>(op)][phase] = 1 + device_index(dev);
}

}  // namespace uresnet

namespace {

// (op index, device or phase index 0/1, an int) from Python.
bool parse_args(PyObject* args, int* op, int* index, int* value) {
  if (!PyArg_ParseTuple(args, "iii", op, index, value)) return false;
  if (*op < 0 || *op >= uresnet::kNumOps || *index < 0 || *index > 1) {
    PyErr_SetString(PyExc_ValueError, "uresnet_ops._C: op index or device/phase index out of range");
    return false;
  }
  return true;
}

// set_route(op, device, route): device 0 cpu, 1 cuda; route a csrc/routing.h Route.
PyObject* set_route(PyObject* /*self*/, PyObject* args) {
  int op = 0, device = 0, value = 0;
  if (!parse_args(args, &op, &device, &value)) return nullptr;
  uresnet::routes[op][device].store(value, std::memory_order_relaxed);
  Py_RETURN_NONE;
}

// open_use_backend(delta): +1 when a use_backend block opens in this thread, -1 when it closes.
PyObject* open_use_backend(PyObject* /*self*/, PyObject* args) {
  int delta = 0;
  if (!PyArg_ParseTuple(args, "i", &delta)) return nullptr;
  uresnet::open_use_backend_blocks += delta;
  Py_RETURN_NONE;
}

// native_run(op, phase, clear): the device type name ("cpu"/"cuda") of the compiled kernel that
// last ran op's phase in this thread, or None; clear=1 forgets it (a Python backend ran since).
PyObject* native_run(PyObject* /*self*/, PyObject* args) {
  int op = 0, phase = 0, clear = 0;
  if (!parse_args(args, &op, &phase, &clear)) return nullptr;
  const int ran = uresnet::native_runs[op][phase];
  if (clear) uresnet::native_runs[op][phase] = 0;
  if (ran == 0) Py_RETURN_NONE;
  return PyUnicode_FromString(ran == 1 ? "cpu" : "cuda");
}

PyObject* cuda_built(PyObject* /*self*/, PyObject* /*args*/) {
#ifdef URESNET_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cuda_built", cuda_built, METH_NOARGS, "True when the CUDA kernels were compiled into this extension."},
    {"set_route", set_route, METH_VARARGS, "set_route(op, device, route): the routing table (csrc/routing.h)."},
    {"open_use_backend", open_use_backend, METH_VARARGS, "open_use_backend(+1|-1): use_backend blocks of this thread."},
    {"native_run", native_run, METH_VARARGS, "native_run(op, phase, clear): the compiled kernel that last ran."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "uresnet_ops._C",
    "Native kernels of uresnet_ops; importing this module registers them as torch.ops.uresnet_ops._*_native.",
    -1,
    methods,
};

}  // namespace

#define URESNET_CONCAT_(a, b) a##b
#define URESNET_CONCAT(a, b) URESNET_CONCAT_(a, b)

PyMODINIT_FUNC URESNET_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module); }
