// The schemas of every op of the `minissl` operator library, declared once: csrc/ops.cpp defines them for
// `minissl`, and the emulator's glue (emu/glue.cpp, tests only) for its own namespace `minissl_emu`.
// Semantics of every op: minissl/ops/reference.py (the pure-PyTorch twins).
#pragma once

#include <torch/library.h>

namespace minissl {

inline void define_ops(torch::Library& m) {
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
  // Training-mode batch norm of a (B, C, *S) activation stored channels-last (B, *S, C) (or of a
  // contiguous (M, C) matrix), with double-precision channel sums (CPU only: CUDA keeps the native one).
  //   -> y (x's shape and strides), mean (C,), unbiased var (C,) (for the running statistics; the biased
  //   one when M == 1), invstd (C,) = 1 / sqrt(biased var + eps)
  m.def("batch_norm_rows(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // Its gradient (grad_y with x's strides): -> grad_x (x's shape and strides), grad_weight (C,), grad_bias (C,).
  m.def("batch_norm_rows_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor invstd) -> "
        "(Tensor, Tensor, Tensor)");
}

}  // namespace minissl
