// Defines the native kernel ops, and the `uresnet_ops._C` Python module.
//
// Only the `_<op>_native` kernel ops are defined here, each from the schema constant in its op's
// header (csrc/<op>.h, next to the checks of those arguments); the public ops are defined from
// Python (uresnet_ops/_library.py, a FRAGMENT library), so they exist even without this
// extension. The kernels are registered per device in csrc/cpu/*.cpp and csrc/cuda/*.cu.
//
// A plain PyInit (no pybind11, no <torch/extension.h>) keeps this file quick to compile.
#include <Python.h>
#include <torch/library.h>

#include "multi_dilation_conv2d.h"
#include "pixel_shuffle_bn.h"
#include "shuffle_upsample.h"

TORCH_LIBRARY(uresnet_ops, m) {
  m.def(uresnet::kPixelShuffleBNNativeSchema);
  m.def(uresnet::kPixelShuffleBNNativeBackwardSchema);
  m.def(uresnet::kShuffleUpsampleConvNativeSchema);
  m.def(uresnet::kShuffleUpsampleConvNativeBackwardSchema);
  m.def(uresnet::kShuffleUpsampleBNSumsNativeSchema);
  m.def(uresnet::kShuffleUpsampleBNBackwardNativeSchema);
  m.def(uresnet::kMultiDilationConv2dNativeSchema);
  m.def(uresnet::kMultiDilationConv2dNativeBackwardSchema);
}

namespace {

PyObject* cuda_built(PyObject* /*self*/, PyObject* /*args*/) {
#ifdef URESNET_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cuda_built", cuda_built, METH_NOARGS, "True when the CUDA kernels were compiled into this extension."},
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
