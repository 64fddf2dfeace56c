// Schemas of the native kernel ops, and the `uresnet_ops._C` Python module.
//
// Only the `_<op>_native` kernel ops are defined here; the public ops are defined from Python
// (uresnet_ops/_library.py, a FRAGMENT library), so they exist even without this extension.
// The kernels are registered per device in csrc/cpu/*.cpp and csrc/cuda/*.cu.
//
// A plain PyInit (no pybind11, no <torch/extension.h>) keeps this file quick to compile.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(uresnet_ops, m) {
  m.def(
      "_pixel_shuffle_bn_native(Tensor x, int upscale_factor, Tensor? weight, Tensor? bias, "
      "Tensor? running_mean, Tensor? running_var, bool training, float eps, str activation, "
      "float negative_slope) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_multi_dilation_conv2d_native(Tensor x, Tensor[] weights, int[] dilations, Tensor[] biases, str activation, "
      "float negative_slope) -> Tensor");
  m.def(
      "_multi_dilation_conv2d_native_backward(Tensor grad_out, Tensor x, Tensor[] weights, int[] dilations, "
      "Tensor[] biases, str activation, float negative_slope) -> (Tensor, Tensor[], Tensor[])");
  m.def(
      "_pixel_shuffle_bn_native_backward(Tensor grad_out, Tensor x, int upscale_factor, Tensor? weight, "
      "Tensor? bias, Tensor mean, Tensor var, bool training, float eps, str activation, float negative_slope) "
      "-> (Tensor, Tensor, Tensor)");
  // The first half of shuffle_upsample: act(conv3x3_grouped(upsample(x), weight) + bias), or with
  // stats only the BatchNorm batch statistics of the conv output (uresnet_ops/shuffle_upsample.py).
  m.def(
      "_shuffle_upsample_conv_native(Tensor x, Tensor weight, Tensor? bias, int scale_factor, str mode, "
      "str activation, float negative_slope, bool stats) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_shuffle_upsample_conv_native_backward(Tensor grad, Tensor x, Tensor weight, int scale_factor, str mode) "
      "-> (Tensor, Tensor)");
  // The shuffle_upsample backward through BatchNorm + activation with the conv output recomputed
  // from x: pass 1 sums BatchNorm's two per-channel reductions (and writes y if asked), pass 2
  // forms the conv-output gradient on the fly and runs the transposed conv on it.
  m.def(
      "_shuffle_upsample_bn_sums_native(Tensor grad, Tensor x, Tensor weight, Tensor scale, Tensor shift, "
      "Tensor mean, int scale_factor, str mode, str activation, float negative_slope, bool write_y) "
      "-> (Tensor, Tensor)");
  m.def(
      "_shuffle_upsample_bn_backward_native(Tensor grad, Tensor x, Tensor weight, Tensor scale, Tensor shift, "
      "Tensor mean, Tensor centered, Tensor constant, int scale_factor, str mode, str activation, "
      "float negative_slope) -> (Tensor, Tensor)");
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
