// Device-agnostic glue of the CUDA kernels: input checks, contiguity, outputs and workspaces, the
// bad-label flag, then the raw-pointer launchers of cuda/launchers.h. Host C++ with ATen, no CUDA
// headers. Two backends include it:
//   cuda/bindings.cpp  the real CUDA path (Dev = CUDA tensors, CUDAGuard, the current CUDA stream);
//   emu/glue.cpp       the emulator: the same glue on CPU tensors, launchers compiled from the same .cu
//                      files as C++ (tests only, op namespace minissl_emu).
// Dev provides: `static constexpr c10::DeviceType type` (every tensor must be there), `Dev::Guard(device)`
// (makes the device current for the scope) and `static void* stream(const at::Tensor&)`.
//
// No call reads device memory on the host unless MINISSL_DEBUG_CHECKS is on (checks.h): no
// synchronisation per call, and the ops can be captured in a CUDA graph. An out-of-range hard label
// sets a device flag instead, and the flag turns the statistics (forward) or the gradient (backward) to
// NaN on the device; with MINISSL_DEBUG_CHECKS=1 it is a ValueError naming the range instead.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "common.h"
#include "cuda/launchers.h"

namespace minissl {
namespace glue {

inline void check_launch(const char* err) { TORCH_CHECK(err == nullptr, "minissl CUDA kernel failed: ", err); }

inline at::Tensor optional_contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

template <class T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// NaN wherever the device flag `bad` (1,) int32 is set: no host read.
inline void poison_if_bad(at::Tensor& t, const at::Tensor& bad) {
  t.masked_fill_(bad.ne(0), std::numeric_limits<double>::quiet_NaN());
}

// ---- dice_ce_entropy -------------------------------------------------------------------------------

template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dice_ce_entropy(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight, bool squared) {
  const bool hard = check_dce(logits, target, weight);
  check_device_type(logits, Dev::type, "logits");
  const typename Dev::Guard guard(logits.device());
  if (hard && debug_checks()) check_label_range(target, logits.size(1));
  const at::Tensor lg = logits.contiguous(), tg = target.contiguous(), w = optional_contiguous(weight);
  const int64_t B = lg.size(0), C = lg.size(1), N = numel_from(lg, 2), K = 3 * C + 3;
  at::Tensor acc = at::empty({B, K}, lg.options());  // (B, 3C+3)
  at::Tensor bad = at::zeros({1}, lg.options().dtype(at::kInt));
  at::Tensor ws = at::empty({static_cast<int64_t>(cuda::dice_ce_entropy_workspace(B, C, N, lg.element_size()))},
                            lg.options().dtype(at::kByte));
  MINISSL_DISPATCH_FLOAT(lg.scalar_type(), "dice_ce_entropy", [&] {
    check_launch(cuda::dice_ce_entropy_fwd(lg.data_ptr<scalar_t>(), hard ? tg.data_ptr<int64_t>() : nullptr,
                                           hard ? nullptr : tg.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(w), B, C,
                                           N, squared, acc.data_ptr<scalar_t>(), bad.data_ptr<int>(),
                                           ws.data_ptr(), Dev::stream(lg)));
  });
  if (hard) poison_if_bad(acc, bad);
  const auto sums = [&](int64_t k) { return acc.slice(1, k * C, (k + 1) * C).contiguous(); };  // (B, C)
  const auto scalar = [&](int64_t k) { return acc.select(1, 3 * C + k).contiguous(); };      // (B,)
  return {sums(0), sums(1), sums(2), scalar(0), scalar(1), scalar(2)};
}

template <class Dev>
at::Tensor dice_ce_entropy_backward(const at::Tensor& gI, const at::Tensor& gP, const at::Tensor& gCE,
                                    const at::Tensor& gH, const at::Tensor& logits, const at::Tensor& target,
                                    const std::optional<at::Tensor>& weight, bool squared) {
  const bool hard = check_dce(logits, target, weight);
  check_dce_grads(gI, gP, gCE, gH, logits);
  check_device_type(logits, Dev::type, "logits");
  const typename Dev::Guard guard(logits.device());
  if (hard && debug_checks()) check_label_range(target, logits.size(1));
  const at::Tensor lg = logits.contiguous(), tg = target.contiguous(), w = optional_contiguous(weight);
  const at::Tensor i = gI.contiguous(), p = gP.contiguous(), ce = gCE.contiguous(), h = gH.contiguous();
  const int64_t B = lg.size(0), C = lg.size(1), N = numel_from(lg, 2);
  at::Tensor grad = at::empty_like(lg, at::MemoryFormat::Contiguous);  // (B, C, *S)
  at::Tensor bad = at::zeros({1}, lg.options().dtype(at::kInt));
  MINISSL_DISPATCH_FLOAT(lg.scalar_type(), "dice_ce_entropy_backward", [&] {
    check_launch(cuda::dice_ce_entropy_bwd(
        i.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), ce.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
        lg.data_ptr<scalar_t>(), hard ? tg.data_ptr<int64_t>() : nullptr, hard ? nullptr : tg.data_ptr<scalar_t>(),
        ptr_or_null<scalar_t>(w), B, C, N, squared, grad.data_ptr<scalar_t>(), bad.data_ptr<int>(),
        Dev::stream(lg)));
  });
  if (hard) poison_if_bad(grad, bad);
  return grad;
}

// ---- mix ---------------------------------------------------------------------------------------------

template <class Dev>
std::vector<at::Tensor> mix(at::TensorList a, at::TensorList b, const std::optional<at::Tensor>& boxes,
                            const std::optional<at::Tensor>& blocks) {
  const MixGeometry g = check_mix(a, b, boxes, blocks, /*read_boxes=*/debug_checks());
  check_device_type(a[0], Dev::type, "a[0]");
  const typename Dev::Guard guard(a[0].device());
  const at::Tensor bx = optional_contiguous(boxes), bl = optional_contiguous(blocks);
  std::vector<at::Tensor> out;
  for (size_t k = 0; k < a.size(); ++k) {
    const at::Tensor ak = a[k].contiguous(), bk = b[k].contiguous();
    at::Tensor ok = at::empty_like(ak);
    check_launch(cuda::mix(ak.data_ptr(), bk.data_ptr(), ok.data_ptr(), ak.element_size(), g.B, g.L[k], g.S.data(),
                           g.G.empty() ? nullptr : g.G.data(), g.sd, ptr_or_null<int64_t>(bx),
                           ptr_or_null<bool>(bl), Dev::stream(ak)));
    out.push_back(ok);
  }
  return out;
}

// ---- geometry ops ------------------------------------------------------------------------------------

inline void check_int32_total(int64_t n, const char* what) {
  TORCH_CHECK_VALUE(n < std::numeric_limits<int32_t>::max(), "minissl: expected fewer than 2^31 voxels per sample in ",
                    what, " on CUDA, got ", n);
}

template <class Dev>
at::Tensor largest_component(const at::Tensor& labels, int64_t num_classes) {
  check_device_type(labels, Dev::type, "labels");
  check_labels(labels, num_classes);
  const typename Dev::Guard guard(labels.device());
  const at::Tensor in = labels.contiguous();
  at::Tensor out = at::empty_like(in);
  if (in.numel() == 0) return out;
  const int64_t B = in.size(0), W = in.size(-1), H = in.size(-2), D = in.dim() == 4 ? in.size(1) : 1;
  check_int32_total(D * H * W, "labels");
  at::Tensor ws = at::empty({static_cast<int64_t>(cuda::largest_component_workspace(B, D * H * W, num_classes))},
                            in.options().dtype(at::kByte));
  check_launch(cuda::largest_component(in.data_ptr(), out.data_ptr(), static_cast<int>(in.element_size()), B, D, H, W,
                                       num_classes, ws.data_ptr(), Dev::stream(in)));
  return out;
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor> fit_ellipse(const at::Tensor& masks) {
  check_device_type(masks, Dev::type, "masks");
  check_masks(masks);
  const typename Dev::Guard guard(masks.device());
  const at::Tensor m = masks.contiguous();
  const int64_t B = m.size(0), H = m.size(1), W = m.size(2);
  check_int32_total(H * W, "masks");
  at::Tensor params = at::empty({B, 5}, m.options().dtype(at::kDouble));
  at::Tensor valid = at::empty({B}, m.options().dtype(at::kBool));
  at::Tensor ws = at::empty({static_cast<int64_t>(cuda::fit_ellipse_workspace(B, H, W))}, m.options().dtype(at::kByte));
  check_launch(cuda::fit_ellipse(static_cast<const uint8_t*>(m.data_ptr()), B, H, W, ws.data_ptr(),
                                 params.data_ptr<double>(), valid.data_ptr<bool>(), Dev::stream(m)));
  return {params, valid};
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor> fit_ellipse_points(const at::Tensor& points) {
  check_device_type(points, Dev::type, "points");
  check_points(points);
  const typename Dev::Guard guard(points.device());
  const at::Tensor p = points.contiguous();
  at::Tensor params = at::empty({5}, p.options());
  at::Tensor valid = at::empty({}, p.options().dtype(at::kBool));
  check_launch(cuda::fit_ellipse_points(p.data_ptr<double>(), p.size(0), params.data_ptr<double>(),
                                        valid.data_ptr<bool>(), Dev::stream(p)));
  return {params, valid};
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor> ellipse_refine(const at::Tensor& probs, const at::Tensor& params,
                                                  const at::Tensor& valid, double threshold, double fill_base,
                                                  double fill_power, double decay) {
  check_device_type(probs, Dev::type, "probs");
  check_probs(probs);
  check_ellipses(params, valid, probs.size(0), probs);
  const typename Dev::Guard guard(probs.device());
  const at::Tensor P = probs.contiguous(), prm = params.to(at::kDouble).contiguous(), ok = valid.contiguous();
  at::Tensor refined = at::empty_like(P);
  at::Tensor pseudo = at::empty(P.sizes(), P.options().dtype(at::kByte));
  MINISSL_DISPATCH_FLOAT(P.scalar_type(), "ellipse_refine", [&] {
    check_launch(cuda::ellipse_refine(P.data_ptr<scalar_t>(), prm.data_ptr<double>(), ok.data_ptr<bool>(), P.size(0),
                                      P.size(1), P.size(2), threshold, fill_base, fill_power, decay,
                                      refined.data_ptr<scalar_t>(), pseudo.data_ptr<uint8_t>(), Dev::stream(P)));
  });
  return {refined, pseudo};
}

template <class Dev>
at::Tensor ellipse_mask(const at::Tensor& params, const at::Tensor& valid, int64_t height, int64_t width) {
  check_device_type(params, Dev::type, "params");
  check_mask_shape(height, width);
  check_ellipses(params, valid, params.dim() >= 1 ? params.size(0) : -1, params);
  const typename Dev::Guard guard(params.device());
  const at::Tensor prm = params.to(at::kDouble).contiguous(), ok = valid.contiguous();
  at::Tensor out = at::empty({prm.size(0), height, width}, prm.options().dtype(at::kByte));
  check_launch(cuda::ellipse_mask(prm.data_ptr<double>(), ok.data_ptr<bool>(), prm.size(0), height, width,
                                  out.data_ptr<uint8_t>(), Dev::stream(prm)));
  return out;
}

// Registers every op of the glue for Dev on an operator library (TORCH_LIBRARY_IMPL body).
template <class Dev>
void register_ops(torch::Library& m) {
  m.impl("dice_ce_entropy", &dice_ce_entropy<Dev>);
  m.impl("dice_ce_entropy_backward", &dice_ce_entropy_backward<Dev>);
  m.impl("mix", &mix<Dev>);
  m.impl("largest_component", &largest_component<Dev>);
  m.impl("fit_ellipse", &fit_ellipse<Dev>);
  m.impl("fit_ellipse_points", &fit_ellipse_points<Dev>);
  m.impl("ellipse_refine", &ellipse_refine<Dev>);
  m.impl("ellipse_mask", &ellipse_mask<Dev>);
}

}  // namespace glue
}  // namespace minissl
