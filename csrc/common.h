// Shared helpers for every minissl translation unit.
//
// Part 1 (everywhere, nvcc included): MINISSL_HD and small portable math overloads used by the
// per-element headers in kernels/. Part 2 (host C++ only, never seen by nvcc so the .cu files stay
// free of torch headers): dtype dispatch helpers for the TORCH_LIBRARY_IMPL files. The input checks
// of every op are in checks.h.
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

namespace minissl {

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
