// Input checks of every op, in one place for the CPU kernels (cpu/*.cpp) and the CUDA bindings
// (cuda/bindings.cpp). Host C++ only (torch headers; never included by the .cu files).
//
// The public Python functions (minissl/ops/__init__.py) check the same rules first with messages that
// name the op; these checks guard direct torch.ops.minissl calls. TORCH_CHECK_VALUE reaches Python as
// ValueError. Each backend adds only check_device_type for its own device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "common.h"

namespace minissl {

// largest_component: the most classes one call cleans (minissl.ops.MAX_CLASSES).
constexpr int64_t kMaxLabelClasses = 65536;

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "minissl: expected ", name,
                    " to be float32 or float64, got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, "minissl: expected ", name, " to be ", dtype, ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "minissl: expected ", name, " on ", ref.device(), ", got ", t.device());
}

inline void check_device_type(const at::Tensor& t, c10::DeviceType type, const char* name) {
  TORCH_CHECK_VALUE(t.device().type() == type, "minissl: expected ", name, " on ", c10::DeviceTypeName(type),
                    ", got ", t.device());
}

inline void check_ndim(const at::Tensor& t, int64_t lo, int64_t hi, const char* name) {
  TORCH_CHECK_VALUE(t.dim() >= lo && t.dim() <= hi, "minissl: expected ", name, " with ", lo, "..", hi,
                    " dims, got shape ", t.sizes());
}

// MINISSL_DEBUG_CHECKS=1 (or true / yes / on): the device backends also run the checks that read tensor
// values on the host (a device-to-host copy and a synchronisation per call), e.g. the label range.
// Off by default, so the hot path never waits for the device; read at every call.
inline bool debug_checks() {
  const char* raw = std::getenv("MINISSL_DEBUG_CHECKS");
  std::string v = raw == nullptr ? "" : raw;
  for (char& ch : v) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return v == "1" || v == "true" || v == "yes" || v == "on";
}

// ---- dice_ce_entropy -------------------------------------------------------------------------------

// Validates dice_ce_entropy inputs. Returns true for hard int64 labels (their range is checked by the
// kernels in their own pass over the data).
inline bool check_dce(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight) {
  check_floating(logits, "logits");
  check_ndim(logits, 3, 5, "logits (B, C, *S)");
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "minissl: expected logits with C >= 1 channels, got ", logits.sizes());
  const bool hard = target.scalar_type() == at::kLong;
  check_same_device(target, logits, "target");
  if (hard) {
    TORCH_CHECK_VALUE(target.dim() == logits.dim() - 1 && target.size(0) == logits.size(0) &&
                          target.sizes().slice(1) == logits.sizes().slice(2),
                      "minissl: expected int64 target of shape (B, *S) = ", logits.sizes()[0], " x ",
                      logits.sizes().slice(2), ", got ", target.sizes());
  } else {
    TORCH_CHECK_VALUE(target.scalar_type() == logits.scalar_type(), "minissl: expected int64 labels or a ",
                      logits.scalar_type(), " soft target, got ", target.scalar_type());
    TORCH_CHECK_VALUE(target.sizes() == logits.sizes(), "minissl: expected soft target of shape ", logits.sizes(),
                      ", got ", target.sizes());
  }
  if (weight.has_value() && weight->defined()) {
    check_same_device(*weight, logits, "weight");
    TORCH_CHECK_VALUE(weight->scalar_type() == logits.scalar_type(), "minissl: expected weight of dtype ",
                      logits.scalar_type(), ", got ", weight->scalar_type());
    TORCH_CHECK_VALUE(weight->dim() == logits.dim() - 1 && weight->size(0) == logits.size(0) &&
                          weight->sizes().slice(1) == logits.sizes().slice(2),
                      "minissl: expected weight of shape (B, *S), got ", weight->sizes(), " for logits ",
                      logits.sizes());
  }
  return hard;
}

// Hard labels in [0, C) ([0, 2) when C == 1), read on the host: the CPU kernels check them in their own
// pass; the device backends call this under debug_checks() (else a device-side flag, see cuda/glue.h).
inline void check_label_range(const at::Tensor& labels, int64_t C) {
  if (labels.numel() == 0) return;
  const int64_t c_eff = C == 1 ? 2 : C;
  const int64_t lo = labels.min().item<int64_t>(), hi = labels.max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < c_eff, "minissl: expected labels in [0, ", c_eff, ") for ", C,
                    " channel logits, got values in [", lo, ", ", hi, "]");
}

// The output gradients handed to dice_ce_entropy_backward: (B, C) for intersect / pred_sum, (B,) for
// ce / entropy, of the dtype and on the device of the logits.
inline void check_dce_grads(const at::Tensor& gI, const at::Tensor& gP, const at::Tensor& gCE, const at::Tensor& gH,
                            const at::Tensor& logits) {
  const int64_t B = logits.size(0), C = logits.size(1);
  for (const at::Tensor* g : {&gI, &gP}) {
    TORCH_CHECK_VALUE(g->dim() == 2 && g->size(0) == B && g->size(1) == C, "minissl: expected a (", B, ", ", C,
                      ") gradient, got ", g->sizes());
  }
  for (const at::Tensor* g : {&gCE, &gH}) {
    TORCH_CHECK_VALUE(g->dim() == 1 && g->size(0) == B, "minissl: expected a (", B, ",) gradient, got ", g->sizes());
  }
  for (const at::Tensor* g : {&gI, &gP, &gCE, &gH}) {
    check_same_device(*g, logits, "every gradient");
    TORCH_CHECK_VALUE(g->scalar_type() == logits.scalar_type(), "minissl: expected every gradient of dtype ",
                      logits.scalar_type(), " (the logits' dtype), got ", g->scalar_type());
  }
}

// ---- mix -------------------------------------------------------------------------------------------

// Validated geometry of a mix call: every tensor is viewed as (B, L_k, S_0..S_{sd-1}).
struct MixGeometry {
  int sd = 0;              // spatial dims (1..3)
  int64_t B = 0;           // batch
  std::vector<int64_t> S;  // spatial sizes (sd)
  std::vector<int64_t> G;  // block grid (sd), empty for boxes
  std::vector<int64_t> L;  // leading channel count per tensor (1 when (B, *S))
};

// Validates every tensor, the region's shape and, with read_boxes, the box values 0 <= lo <= hi <= S,
// read on the host (B x 2 sd numbers). The device backends pass read_boxes = debug_checks(): the public
// function checks the boxes where they were made (minissl.ops.regions.check_region), and the kernel only
// compares coordinates, so out-of-range boxes cannot make it read or write out of bounds.
inline MixGeometry check_mix(at::TensorList a, at::TensorList b, const std::optional<at::Tensor>& boxes,
                             const std::optional<at::Tensor>& blocks, bool read_boxes) {
  MixGeometry g;
  const bool has_boxes = boxes.has_value() && boxes->defined();
  const bool has_blocks = blocks.has_value() && blocks->defined();
  TORCH_CHECK_VALUE(has_boxes != has_blocks, "minissl: mix expected exactly one of boxes / blocks, got ",
                    has_boxes ? "both" : "neither");
  TORCH_CHECK_VALUE(a.size() == b.size() && !a.empty(),
                    "minissl: mix expected a and b of the same non-zero length, got ", a.size(), " and ", b.size());
  if (has_boxes) {
    check_dtype(*boxes, at::kLong, "boxes");
    TORCH_CHECK_VALUE(boxes->dim() == 2 && boxes->size(1) % 2 == 0 && boxes->size(1) >= 2 && boxes->size(1) <= 6,
                      "minissl: mix expected boxes of shape (B, 2*sd) with sd in 1..3, got ", boxes->sizes());
    g.sd = static_cast<int>(boxes->size(1) / 2);
    g.B = boxes->size(0);
  } else {
    check_dtype(*blocks, at::kBool, "blocks");
    TORCH_CHECK_VALUE(blocks->dim() >= 2 && blocks->dim() <= 4,
                      "minissl: mix expected blocks of shape (B, *G) with 1..3 grid dims, got ", blocks->sizes());
    g.sd = static_cast<int>(blocks->dim() - 1);
    g.B = blocks->size(0);
  }
  const at::Tensor& a0 = a[0];
  TORCH_CHECK_VALUE(a0.dim() == g.sd + 1 || a0.dim() == g.sd + 2,
                    "minissl: mix expected tensors of shape (B, *S) or (B, C, *S) with ", g.sd,
                    " spatial dims, got ", a0.sizes());
  for (int d = 0; d < g.sd; ++d) g.S.push_back(a0.size(a0.dim() - g.sd + d));
  for (size_t k = 0; k < a.size(); ++k) {
    TORCH_CHECK_VALUE(a[k].sizes() == b[k].sizes() && a[k].scalar_type() == b[k].scalar_type(),
                      "minissl: mix expected a[", k, "] and b[", k, "] of the same shape and dtype, got ",
                      a[k].sizes(), " ", a[k].scalar_type(), " and ", b[k].sizes(), " ", b[k].scalar_type());
    check_same_device(a[k], a0, "every mixed tensor");
    check_same_device(b[k], a0, "every mixed tensor");
    TORCH_CHECK_VALUE((a[k].dim() == g.sd + 1 || a[k].dim() == g.sd + 2) && a[k].size(0) == g.B,
                      "minissl: mix expected a[", k, "] of shape (", g.B, ", [C,] *S), got ", a[k].sizes());
    for (int d = 0; d < g.sd; ++d) {
      TORCH_CHECK_VALUE(a[k].size(a[k].dim() - g.sd + d) == g.S[d],
                        "minissl: mix expected every tensor to share the spatial size ", at::IntArrayRef(g.S),
                        ", got ", a[k].sizes(), " for a[", k, "]");
    }
    g.L.push_back(a[k].dim() == g.sd + 2 ? a[k].size(1) : 1);
  }
  if (has_blocks) {
    for (int d = 0; d < g.sd; ++d) {
      const int64_t gd = blocks->size(d + 1);
      TORCH_CHECK_VALUE(gd > 0 && g.S[d] % gd == 0, "minissl: mix expected spatial size ", at::IntArrayRef(g.S),
                        " divisible by the block grid, got grid ", blocks->sizes().slice(1));
      g.G.push_back(gd);
    }
    check_same_device(*blocks, a0, "blocks");
  } else {
    check_same_device(*boxes, a0, "boxes");
  }
  if (has_boxes && read_boxes) {
    const at::Tensor host = boxes->to(at::kCPU).contiguous();  // (B, 2 sd)
    const int64_t* p = host.data_ptr<int64_t>();
    for (int64_t s = 0; s < g.B; ++s) {
      for (int d = 0; d < g.sd; ++d) {
        const int64_t lo = p[s * 2 * g.sd + d], hi = p[s * 2 * g.sd + g.sd + d];
        TORCH_CHECK_VALUE(0 <= lo && lo <= hi && hi <= g.S[d], "minissl: mix expected 0 <= lo <= hi <= ", g.S[d],
                          " on spatial dim ", d, ", got box (", lo, ", ", hi, ") for sample ", s);
      }
    }
  }
  return g;
}

// ---- largest_component / fit_ellipse / fit_ellipse_points --------------------------------------------

inline void check_labels(const at::Tensor& labels, int64_t num_classes) {
  TORCH_CHECK_VALUE(labels.dim() == 3 || labels.dim() == 4,
                    "minissl: expected labels of shape (B, H, W) or (B, D, H, W), got shape ", labels.sizes());
  const auto dt = labels.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kLong || dt == at::kByte || dt == at::kBool,
                    "minissl: expected labels to be int64, uint8 or bool, got ", dt);
  TORCH_CHECK_VALUE(num_classes >= 1 && num_classes <= kMaxLabelClasses, "minissl: expected num_classes in [1, ",
                    kMaxLabelClasses, "], got ", num_classes);
}

inline void check_masks(const at::Tensor& masks) {
  TORCH_CHECK_VALUE(masks.dim() == 3, "minissl: expected masks of shape (B, H, W), got shape ", masks.sizes());
  TORCH_CHECK_VALUE(masks.scalar_type() == at::kByte || masks.scalar_type() == at::kBool,
                    "minissl: expected masks to be uint8 or bool, got ", masks.scalar_type());
}

inline void check_points(const at::Tensor& points) {
  TORCH_CHECK_VALUE(points.dim() == 2 && points.size(1) == 2, "minissl: expected points of shape (N, 2), got shape ",
                    points.sizes());
  check_dtype(points, at::kDouble, "points");
}

// ---- ellipse_refine / ellipse_mask -------------------------------------------------------------------

// params (B, 5) float32/float64 and valid (B,) bool on the device of `ref`; every valid row finite with
// semi-axes a, b > 0 (read on the host: B x 5 numbers).
inline void check_ellipses(const at::Tensor& params, const at::Tensor& valid, int64_t B, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(params.dim() == 2 && params.size(0) == B && params.size(1) == 5,
                    "minissl: expected params of shape (", B, ", 5), got shape ", params.sizes());
  TORCH_CHECK_VALUE(valid.dim() == 1 && valid.size(0) == B, "minissl: expected valid of shape (", B,
                    ",), got shape ", valid.sizes());
  check_dtype(valid, at::kBool, "valid");
  check_floating(params, "params");
  check_same_device(params, ref, "params");
  check_same_device(valid, ref, "valid");
  const at::Tensor p = params.to(at::kCPU, at::kDouble).contiguous();
  const at::Tensor v = valid.to(at::kCPU).contiguous();
  const double* pp = p.data_ptr<double>();
  const bool* vp = v.data_ptr<bool>();
  for (int64_t r = 0; r < B; ++r) {
    if (!vp[r]) continue;
    const double* q = pp + 5 * r;
    const bool finite = std::isfinite(q[0]) && std::isfinite(q[1]) && std::isfinite(q[2]) && std::isfinite(q[3]) &&
                        std::isfinite(q[4]);
    TORCH_CHECK_VALUE(finite && q[2] > 0 && q[3] > 0,
                      "minissl: expected params finite with semi-axes a, b > 0 in valid rows, got row ", r, ": [",
                      q[0], ", ", q[1], ", ", q[2], ", ", q[3], ", ", q[4], "]");
  }
}

inline void check_mask_shape(int64_t height, int64_t width) {
  TORCH_CHECK_VALUE(height >= 0 && width >= 0, "minissl: expected a non-negative shape, got (", height, ", ", width,
                    ")");
}

inline void check_probs(const at::Tensor& probs) {
  TORCH_CHECK_VALUE(probs.dim() == 3, "minissl: expected probs of shape (B, H, W), got shape ", probs.sizes());
  check_floating(probs, "probs");
}

}  // namespace minissl
