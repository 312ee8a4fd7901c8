// CUDA glue: checks tensors, turns them into raw pointers for the launchers of launchers.h and
// registers the CUDA kernels (TORCH_LIBRARY_IMPL(minissl, CUDA)). Compiled by the host compiler, and
// only when torch has CUDA (minissl/ops/_build.py). The launchers themselves live in cuda/*.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "common.h"
#include "cuda/launchers.h"

namespace minissl {
namespace {

void check_launch(const char* err) { TORCH_CHECK(err == nullptr, "minissl CUDA kernel failed: ", err); }

void* stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// ---- dice_ce_entropy -----------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dice_ce_entropy_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight, bool squared) {
  const bool hard = check_dce(logits, target, weight);
  check_device_type(logits, c10::DeviceType::CUDA, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor lg = logits.contiguous(), tg = target.contiguous();
  const at::Tensor w = weight.has_value() && weight->defined() ? weight->contiguous() : at::Tensor();
  const int64_t B = lg.size(0), C = lg.size(1), N = numel_from(lg, 2), K = 3 * C + 3;
  at::Tensor acc = at::zeros({B, K}, lg.options());
  at::Tensor bad = at::zeros({1}, lg.options().dtype(at::kInt));
  MINISSL_DISPATCH_FLOAT(lg.scalar_type(), "dice_ce_entropy", [&] {
    check_launch(cuda::dice_ce_entropy_fwd(
        lg.data_ptr<scalar_t>(), hard ? tg.data_ptr<int64_t>() : nullptr, hard ? nullptr : tg.data_ptr<scalar_t>(),
        w.defined() ? w.data_ptr<scalar_t>() : nullptr, B, C, N, squared, acc.data_ptr<scalar_t>(),
        bad.data_ptr<int>(), stream_of(lg)));
  });
  if (hard) {
    TORCH_CHECK_VALUE(bad.item<int>() == 0, "minissl: expected labels in [0, ", C == 1 ? 2 : C, ") for ", C,
                      " channel logits, got a label outside that range");
  }
  return {acc.slice(1, 0, C).contiguous(), acc.slice(1, C, 2 * C).contiguous(), acc.slice(1, 2 * C, 3 * C).contiguous(),
          acc.select(1, 3 * C).contiguous(), acc.select(1, 3 * C + 1).contiguous(), acc.select(1, 3 * C + 2).contiguous()};
}

at::Tensor dice_ce_entropy_backward_cuda(const at::Tensor& gI, const at::Tensor& gP, const at::Tensor& gCE,
                                         const at::Tensor& gH, const at::Tensor& logits, const at::Tensor& target,
                                         const std::optional<at::Tensor>& weight, bool squared) {
  const bool hard = check_dce(logits, target, weight);
  check_dce_grads(gI, gP, gCE, gH, logits);
  check_device_type(logits, c10::DeviceType::CUDA, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto dt = logits.scalar_type();
  const at::Tensor lg = logits.contiguous(), tg = target.contiguous();
  const at::Tensor w = weight.has_value() && weight->defined() ? weight->contiguous() : at::Tensor();
  const at::Tensor i = gI.to(dt).contiguous(), p = gP.to(dt).contiguous(), ce = gCE.to(dt).contiguous(),
                   h = gH.to(dt).contiguous();
  const int64_t B = lg.size(0), C = lg.size(1), N = numel_from(lg, 2);
  at::Tensor grad = at::empty_like(lg);
  MINISSL_DISPATCH_FLOAT(dt, "dice_ce_entropy_backward", [&] {
    check_launch(cuda::dice_ce_entropy_bwd(
        i.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), ce.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
        lg.data_ptr<scalar_t>(), hard ? tg.data_ptr<int64_t>() : nullptr, hard ? nullptr : tg.data_ptr<scalar_t>(),
        w.defined() ? w.data_ptr<scalar_t>() : nullptr, B, C, N, squared, grad.data_ptr<scalar_t>(),
        stream_of(lg)));
  });
  return grad;
}

// ---- mix ---------------------------------------------------------------------------------------------

std::vector<at::Tensor> mix_cuda(at::TensorList a, at::TensorList b, const std::optional<at::Tensor>& boxes,
                                 const std::optional<at::Tensor>& blocks) {
  const MixGeometry g = check_mix(a, b, boxes, blocks);
  check_device_type(a[0], c10::DeviceType::CUDA, "a[0]");
  const c10::cuda::CUDAGuard guard(a[0].device());
  at::Tensor bx, bl;
  if (boxes.has_value() && boxes->defined()) {
    bx = boxes->contiguous();
  } else {
    bl = blocks->contiguous();
  }
  std::vector<at::Tensor> out;
  for (size_t k = 0; k < a.size(); ++k) {
    const at::Tensor ak = a[k].contiguous(), bk = b[k].contiguous();
    at::Tensor ok = at::empty_like(ak);
    check_launch(cuda::mix(ak.data_ptr(), bk.data_ptr(), ok.data_ptr(), ak.element_size(), g.B, g.L[k], g.S.data(),
                           g.G.empty() ? nullptr : g.G.data(), g.sd, bx.defined() ? bx.data_ptr<int64_t>() : nullptr,
                           bl.defined() ? bl.data_ptr<bool>() : nullptr, stream_of(ak)));
    out.push_back(ok);
  }
  return out;
}

// ---- geometry ops --------------------------

int32_t int32_total(int64_t n, const char* what) {
  TORCH_CHECK_VALUE(n < INT32_MAX, "minissl: expected fewer than 2^31 voxels in ", what, " on CUDA, got ", n);
  return static_cast<int32_t>(n);
}

at::Tensor largest_component_cuda(const at::Tensor& labels, int64_t num_classes) {
  check_device_type(labels, c10::DeviceType::CUDA, "labels");
  check_labels(labels, num_classes);
  const c10::cuda::CUDAGuard guard(labels.device());
  const at::Tensor in = labels.contiguous();
  at::Tensor out = at::empty_like(in);
  if (in.numel() == 0) return out;
  int32_total(in.numel(), "labels");
  if (num_classes > 4096) num_classes = std::min<int64_t>(num_classes, in.max().item<int64_t>() + 1);
  const int64_t B = in.size(0), W = in.size(-1), H = in.size(-2), D = in.dim() == 4 ? in.size(1) : 1;
  at::Tensor ws = at::empty({static_cast<int64_t>(cuda::largest_component_workspace(B, D * H * W, num_classes))},
                            in.options().dtype(at::kByte));
  check_launch(cuda::largest_component(in.data_ptr(), out.data_ptr(), static_cast<int>(in.element_size()), B, D, H, W,
                                       num_classes, ws.data_ptr(), stream_of(in)));
  return out;
}

std::tuple<at::Tensor, at::Tensor> fit_ellipse_cuda(const at::Tensor& masks) {
  check_device_type(masks, c10::DeviceType::CUDA, "masks");
  check_masks(masks);
  const c10::cuda::CUDAGuard guard(masks.device());
  const at::Tensor m = masks.contiguous();
  const int64_t B = m.size(0), H = m.size(1), W = m.size(2);
  int32_total(m.numel(), "masks");
  at::Tensor params = at::empty({B, 5}, m.options().dtype(at::kDouble));
  at::Tensor valid = at::empty({B}, m.options().dtype(at::kBool));
  at::Tensor ws = at::empty({static_cast<int64_t>(cuda::fit_ellipse_workspace(B, H, W))}, m.options().dtype(at::kByte));
  check_launch(cuda::fit_ellipse(static_cast<const uint8_t*>(m.data_ptr()), B, H, W, ws.data_ptr(),
                                 params.data_ptr<double>(), valid.data_ptr<bool>(), stream_of(m)));
  return {params, valid};
}

std::tuple<at::Tensor, at::Tensor> fit_ellipse_points_cuda(const at::Tensor& points) {
  check_device_type(points, c10::DeviceType::CUDA, "points");
  check_points(points);
  const c10::cuda::CUDAGuard guard(points.device());
  const at::Tensor p = points.contiguous();
  at::Tensor params = at::empty({5}, p.options());
  at::Tensor valid = at::empty({}, p.options().dtype(at::kBool));
  check_launch(cuda::fit_ellipse_points(p.data_ptr<double>(), p.size(0), params.data_ptr<double>(),
                                        valid.data_ptr<bool>(), stream_of(p)));
  return {params, valid};
}

std::tuple<at::Tensor, at::Tensor> ellipse_refine_cuda(const at::Tensor& probs, const at::Tensor& params,
                                                       const at::Tensor& valid, double threshold, double fill_base,
                                                       double fill_power, double decay) {
  check_device_type(probs, c10::DeviceType::CUDA, "probs");
  check_probs(probs);
  check_ellipses(params, valid, probs.size(0), probs);
  const c10::cuda::CUDAGuard guard(probs.device());
  const at::Tensor P = probs.contiguous(), prm = params.to(at::kDouble).contiguous(), ok = valid.contiguous();
  at::Tensor refined = at::empty_like(P);
  at::Tensor pseudo = at::empty(P.sizes(), P.options().dtype(at::kByte));
  MINISSL_DISPATCH_FLOAT(P.scalar_type(), "ellipse_refine", [&] {
    check_launch(cuda::ellipse_refine(P.data_ptr<scalar_t>(), prm.data_ptr<double>(), ok.data_ptr<bool>(), P.size(0),
                                      P.size(1), P.size(2), threshold, fill_base, fill_power, decay,
                                      refined.data_ptr<scalar_t>(), pseudo.data_ptr<uint8_t>(), stream_of(P)));
  });
  return {refined, pseudo};
}

at::Tensor ellipse_mask_cuda(const at::Tensor& params, const at::Tensor& valid, int64_t height, int64_t width) {
  check_device_type(params, c10::DeviceType::CUDA, "params");
  check_mask_shape(height, width);
  check_ellipses(params, valid, params.dim() >= 1 ? params.size(0) : -1, params);
  const c10::cuda::CUDAGuard guard(params.device());
  const at::Tensor prm = params.to(at::kDouble).contiguous(), ok = valid.contiguous();
  at::Tensor out = at::empty({prm.size(0), height, width}, prm.options().dtype(at::kByte));
  check_launch(cuda::ellipse_mask(prm.data_ptr<double>(), ok.data_ptr<bool>(), prm.size(0), height, width,
                                  out.data_ptr<uint8_t>(), stream_of(prm)));
  return out;
}

}  // namespace
}  // namespace minissl

TORCH_LIBRARY_IMPL(minissl, CUDA, m) {
  m.impl("dice_ce_entropy", &minissl::dice_ce_entropy_cuda);
  m.impl("dice_ce_entropy_backward", &minissl::dice_ce_entropy_backward_cuda);
  m.impl("mix", &minissl::mix_cuda);
  m.impl("largest_component", &minissl::largest_component_cuda);
  m.impl("fit_ellipse", &minissl::fit_ellipse_cuda);
  m.impl("fit_ellipse_points", &minissl::fit_ellipse_points_cuda);
  m.impl("ellipse_refine", &minissl::ellipse_refine_cuda);
  m.impl("ellipse_mask", &minissl::ellipse_mask_cuda);
}
