// Shared helpers for every minissl translation unit.
//
// Part 1 (everywhere, nvcc included): MINISSL_HD and small portable math overloads used by the
// per-element headers in kernels/. Part 2 (host C++ only, never seen by nvcc so the .cu files stay
// free of torch headers): input checks and dtype dispatch helpers for the TORCH_LIBRARY_IMPL files.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MINISSL_HD __host__ __device__
#define MINISSL_INLINE __forceinline__
#else
#define MINISSL_HD
#define MINISSL_INLINE inline __attribute__((always_inline))
#endif

namespace minissl {

// Scalar math overloads; the CPU kernels add the same names for at::vec::Vectorized<T>, so the
// templates in kernels/*.h compile unchanged for scalars (CPU tails, CUDA threads) and SIMD vectors.
MINISSL_HD inline float vexp(float x) { return expf(x); }
MINISSL_HD inline double vexp(double x) { return exp(x); }
MINISSL_HD inline float vlog(float x) { return logf(x); }
MINISSL_HD inline double vlog(double x) { return log(x); }
MINISSL_HD inline float vlog1p(float x) { return log1pf(x); }
MINISSL_HD inline double vlog1p(double x) { return log1p(x); }
MINISSL_HD inline float vabs(float x) { return fabsf(x); }
MINISSL_HD inline double vabs(double x) { return fabs(x); }
MINISSL_HD inline float vmax(float a, float b) { return a > b ? a : b; }
MINISSL_HD inline double vmax(double a, double b) { return a > b ? a : b; }
MINISSL_HD inline float vmin(float a, float b) { return a < b ? a : b; }
MINISSL_HD inline float vrecip(float x) { return 1.0f / x; }
MINISSL_HD inline double vrecip(double x) { return 1.0 / x; }
MINISSL_HD inline double vmin(double a, double b) { return a < b ? a : b; }

}  // namespace minissl

#if !defined(__CUDACC__)
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace minissl {

// TORCH_CHECK raises c10::Error, which reaches Python as RuntimeError; the ValueError wording
// ("expected ..., got ...") is kept so messages read the same as the Python-side validation.
inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), "minissl: expected a tensor for ", name, ", got an undefined tensor");
}

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

// Product of sizes from dim `start` on (the flattened spatial size N of a (B, C, *S) tensor).
inline int64_t numel_from(const at::Tensor& t, int64_t start) {
  int64_t n = 1;
  for (int64_t d = start; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

}  // namespace minissl

// Float dispatch: runs __VA_ARGS__ with scalar_t = float or double.
#define MINISSL_DISPATCH_FLOAT(TYPE, NAME, ...)                                          \
  [&] {                                                                                  \
    switch (TYPE) {                                                                      \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                 \
      case at::kDouble: { using scalar_t = double; return __VA_ARGS__(); }               \
      default: TORCH_CHECK_VALUE(false, "minissl: ", NAME, " expected float32 or float64, got ", TYPE); \
    }                                                                                    \
  }()
#endif  // !__CUDACC__

#if !defined(__CUDACC__)
#include <optional>
#include <vector>

namespace minissl {

// Validated geometry of a mix call: every tensor is viewed as (B, L_k, S_0..S_{sd-1}).
struct MixGeometry {
  int sd = 0;                 // spatial dims (1..3)
  int64_t B = 0;              // batch
  std::vector<int64_t> S;     // spatial sizes (sd)
  std::vector<int64_t> G;     // block grid (sd), empty for boxes
  std::vector<int64_t> L;     // leading channel count per tensor (1 when (B, *S))
};

inline MixGeometry check_mix(at::TensorList a, at::TensorList b, const std::optional<at::Tensor>& boxes,
                             const std::optional<at::Tensor>& blocks) {
  MixGeometry g;
  const bool has_boxes = boxes.has_value() && boxes->defined();
  const bool has_blocks = blocks.has_value() && blocks->defined();
  TORCH_CHECK_VALUE(has_boxes != has_blocks, "minissl: mix expected exactly one of boxes / blocks, got ",
              has_boxes ? "both" : "neither");
  TORCH_CHECK_VALUE(a.size() == b.size() && !a.empty(), "minissl: mix expected a and b of the same non-zero length, got ",
              a.size(), " and ", b.size());
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
  TORCH_CHECK_VALUE(a0.dim() == g.sd + 1 || a0.dim() == g.sd + 2, "minissl: mix expected tensors of shape (B, *S) or (B, C, *S) with ",
              g.sd, " spatial dims, got ", a0.sizes());
  for (int d = 0; d < g.sd; ++d) g.S.push_back(a0.size(a0.dim() - g.sd + d));
  for (size_t k = 0; k < a.size(); ++k) {
    TORCH_CHECK_VALUE(a[k].sizes() == b[k].sizes() && a[k].scalar_type() == b[k].scalar_type(),
                "minissl: mix expected a[", k, "] and b[", k, "] of the same shape and dtype, got ", a[k].sizes(), " ",
                a[k].scalar_type(), " and ", b[k].sizes(), " ", b[k].scalar_type());
    check_same_device(a[k], a0, "every mixed tensor");
    check_same_device(b[k], a0, "every mixed tensor");
    TORCH_CHECK_VALUE((a[k].dim() == g.sd + 1 || a[k].dim() == g.sd + 2) && a[k].size(0) == g.B,
                "minissl: mix expected a[", k, "] of shape (", g.B, ", [C,] *S), got ", a[k].sizes());
    for (int d = 0; d < g.sd; ++d) {
      TORCH_CHECK_VALUE(a[k].size(a[k].dim() - g.sd + d) == g.S[d], "minissl: mix expected every tensor to share the spatial size ",
                  at::IntArrayRef(g.S), ", got ", a[k].sizes(), " for a[", k, "]");
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
  }
  if (has_boxes) check_same_device(*boxes, a0, "boxes");
  if (has_blocks) check_same_device(*blocks, a0, "blocks");
  return g;
}

}  // namespace minissl
#endif  // !__CUDACC__

#if !defined(__CUDACC__)
namespace minissl {

// Validates dice_ce_entropy inputs (shared by CPU and CUDA). Returns true for hard int64 labels.
inline bool check_dce(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight) {
  check_floating(logits, "logits");
  check_ndim(logits, 3, 5, "logits (B, C, *S)");
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "minissl: expected logits with C >= 1 channels, got ", logits.sizes());
  const bool hard = target.scalar_type() == at::kLong;
  check_same_device(target, logits, "target");
  if (hard) {
    TORCH_CHECK_VALUE(target.dim() == logits.dim() - 1 && target.size(0) == logits.size(0) &&
                    target.sizes().slice(1) == logits.sizes().slice(2),
                "minissl: expected int64 target of shape (B, *S) = ", logits.sizes()[0], " x ", logits.sizes().slice(2),
                ", got ", target.sizes());
  } else {
    TORCH_CHECK_VALUE(target.scalar_type() == logits.scalar_type(), "minissl: expected int64 labels or a ",
                logits.scalar_type(), " soft target, got ", target.scalar_type());
    TORCH_CHECK_VALUE(target.sizes() == logits.sizes(), "minissl: expected soft target of shape ", logits.sizes(), ", got ",
                target.sizes());
  }
  if (weight.has_value() && weight->defined()) {
    check_same_device(*weight, logits, "weight");
    TORCH_CHECK_VALUE(weight->scalar_type() == logits.scalar_type(), "minissl: expected weight of dtype ",
                logits.scalar_type(), ", got ", weight->scalar_type());
    TORCH_CHECK_VALUE(weight->dim() == logits.dim() - 1 && weight->size(0) == logits.size(0) &&
                    weight->sizes().slice(1) == logits.sizes().slice(2),
                "minissl: expected weight of shape (B, *S), got ", weight->sizes(), " for logits ", logits.sizes());
  }
  return hard;
}

}  // namespace minissl
#endif  // !__CUDACC__
