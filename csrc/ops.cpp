// The one schema block of the `minissl` operator library.
//
// Every op is declared here exactly once; each backend registers its kernels in its own translation
// unit with TORCH_LIBRARY_IMPL(minissl, CPU|CUDA, m): cpu/dense.cpp, cpu/geometry.cpp and (only when
// torch has CUDA) cuda/bindings.cpp. An op whose kernel was not compiled has a schema but no kernel;
// minissl/ops/_build.py sees that and the Python side falls back to minissl/ops/reference.py.
// Semantics of every op: minissl/ops/reference.py (the pure-PyTorch twins).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(minissl, m) {
  // Fused soft Dice / cross-entropy / entropy statistics (one pass over the logits).
  //   logits (B, C, *S) float; target int64 (B, *S) or float (B, C, *S); weight (B, *S) or None.
  //   -> intersect (B, C'), pred_sum (B, C'), target_sum (B, C'), ce (B,), entropy (B,), weight_sum (B,)
  //   with C' = C (softmax, C >= 2) or 1 (sigmoid, C == 1).
  m.def("dice_ce_entropy(Tensor logits, Tensor target, Tensor? weight, bool squared) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradient w.r.t. logits given the gradients of intersect, pred_sum, ce and entropy (target_sum and
  // weight_sum do not depend on the logits). -> grad_logits (B, C, *S)
  m.def("dice_ce_entropy_backward(Tensor grad_intersect, Tensor grad_pred_sum, Tensor grad_ce, "
        "Tensor grad_entropy, Tensor logits, Tensor target, Tensor? weight, bool squared) -> Tensor");
  // Region paste: out[k] = b[k] inside the region of each sample, a[k] outside. Exactly one of
  // boxes (B, 2*sd) int64 / blocks (B, *G) bool is given.
  m.def("mix(Tensor[] a, Tensor[] b, Tensor? boxes, Tensor? blocks) -> Tensor[]");
  // Keep the largest connected component per class (2D 8-conn for (B, H, W), 3D 26-conn for
  // (B, D, H, W)); num_classes already resolved by the Python wrapper.
  m.def("largest_component(Tensor labels, int num_classes) -> Tensor");
  // Batched direct least-squares ellipse fit: masks (B, H, W) -> params (B, 5) f64, valid (B,) bool.
  m.def("fit_ellipse(Tensor masks) -> (Tensor, Tensor)");
  // Same fit on points (N, 2) f64 [x, y] -> params (5,) f64, valid () bool.
  m.def("fit_ellipse_points(Tensor points) -> (Tensor, Tensor)");
  // ERSR refinement: probs (B, H, W) float -> refined (B, H, W) float, pseudo (B, H, W) uint8.
  m.def("ellipse_refine(Tensor probs, Tensor params, Tensor valid, float threshold, float fill_base, "
        "float fill_power, float decay) -> (Tensor, Tensor)");
  // Rasterised filled ellipses: params (B, 5), valid (B,) -> (B, height, width) uint8.
  m.def("ellipse_mask(Tensor params, Tensor valid, int height, int width) -> Tensor");
}

// A dummy Python module so the shared object can also be imported as a module (the build loads it
// with torch.ops.load_library, which runs the static registrations above).
#define MINISSL_CONCAT_(a, b) a##b
#define MINISSL_CONCAT(a, b) MINISSL_CONCAT_(a, b)
extern "C" PyObject* MINISSL_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "minissl_ext", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
