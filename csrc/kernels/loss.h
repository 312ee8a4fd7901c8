// Per-voxel math of the fused Dice / cross-entropy / entropy statistics, shared by the CPU kernels
// (T = float, double or at::vec::Vectorized<float|double>: one SIMD lane per voxel) and the CUDA
// kernels (T = float or double: one thread per voxel). Reference: minissl/ops/reference.py.
//
// One voxel i of sample b has logits z_c (c < C), targets t_c and a weight w. Accumulators (the
// per-(sample, class) sums the op returns), layout acc[0..3C+3):
//   acc[c]        intersect_c  += w p_c t_c
//   acc[C + c]    pred_sum_c   += w p_c        (squared: w p_c^2)
//   acc[2C + c]   target_sum_c += w t_c        (squared: w t_c^2)
//   acc[3C]       ce           += w (-sum_c t_c log p_c)
//   acc[3C + 1]   entropy      += w (-sum_c p_c log p_c)
//   acc[3C + 2]   weight_sum   += w
// Softmax mode (C >= 2): p = softmax(z). Sigmoid mode (C == 1, one channel): s = sigmoid(z) is the
// foreground probability, ce and entropy are the binary ones over {s, 1 - s}.
#pragma once

#include "../common.h"

namespace minissl {

// Stable softmax that shifts the logits in place: z_c <- z_c - max_k z_k (<= 0), p_c = exp(z_c) / s and
// lse = log s, s = sum_k exp(z_k) >= 1, so log p_c = z_c - lse. No log-probability array is kept:
// CE and entropy need only sums of t z and p z (below), which saves registers and a log per class.
template <class T>
MINISSL_HD MINISSL_INLINE void softmax_shifted(T* z, int C, T* p, T& s) {
  T m = z[0];
  for (int c = 1; c < C; ++c) m = vmax(m, z[c]);
  s = T(0.0);
  for (int c = 0; c < C; ++c) {
    z[c] = z[c] - m;
    p[c] = vexp(z[c]);
    s = s + p[c];
  }
  const T inv = vrecip(s);
  for (int c = 0; c < C; ++c) p[c] = p[c] * inv;
}

// Sigmoid in log space: log s = -softplus(-z) = min(z, 0) - log1p(exp(-|z|)), log(1 - s) = log s - z.
template <class T>
MINISSL_HD MINISSL_INLINE void sigmoid_logp(T z, T& s, T& s1, T& logs, T& log1ms) {
  logs = vmin(z, T(0.0)) - vlog1p(vexp(T(0.0) - vabs(z)));
  log1ms = logs - z;
  s = vexp(logs);
  s1 = vexp(log1ms);
}

// Forward: add voxel i's contributions to acc (layout above). z is overwritten (shifted); p is scratch of
// length C.
template <class T>
MINISSL_HD MINISSL_INLINE void dce_forward_voxel(T* z, const T* t, T w, int C, bool squared, T* acc, T* p) {
  if (C == 1) {
    T s, s1, logs, log1ms;
    sigmoid_logp(z[0], s, s1, logs, log1ms);
    acc[0] = acc[0] + w * s * t[0];
    acc[1] = acc[1] + w * (squared ? s * s : s);
    acc[2] = acc[2] + w * (squared ? t[0] * t[0] : t[0]);
    acc[3] = acc[3] - w * (t[0] * logs + (T(1.0) - t[0]) * log1ms);
    acc[4] = acc[4] - w * (s * logs + s1 * log1ms);
    acc[5] = acc[5] + w;
    return;
  }
  // With z shifted (z_c <- z_c - max) and lse = log s:  log p_c = z_c - lse, so
  //   ce = -sum_c t_c log p_c = lse * sum_c t_c - sum_c t_c z_c,
  //   entropy = -sum_c p_c log p_c = lse - sum_c p_c z_c  (sum_c p_c = 1).
  T s;
  softmax_shifted(z, C, p, s);
  T tz = T(0.0), pz = T(0.0), tsum = T(0.0);
  for (int c = 0; c < C; ++c) {
    const T wp = w * p[c];
    acc[c] = acc[c] + wp * t[c];
    acc[C + c] = acc[C + c] + (squared ? wp * p[c] : wp);
    acc[2 * C + c] = acc[2 * C + c] + w * (squared ? t[c] * t[c] : t[c]);
    tz = tz + t[c] * z[c];
    pz = pz + p[c] * z[c];
    tsum = tsum + t[c];
  }
  const T lse = vlog(s);
  acc[3 * C] = acc[3 * C] + w * (tsum * lse - tz);
  acc[3 * C + 1] = acc[3 * C + 1] + w * (lse - pz);
  acc[3 * C + 2] = acc[3 * C + 2] + w;
}

// Backward: gradient of  L = sum_c gI_c I_c + sum_c gP_c P_c + gCE ce + gH entropy  w.r.t. voxel i's
// logits (target_sum and weight_sum do not depend on z). gz has length C.
//
// Softmax. Jacobian dp_c/dz_k = p_c (delta_ck - p_k), so for any f(p) with g_c = df/dp_c:
//   df/dz_k = p_k (g_k - sum_c p_c g_c).
//   Dice parts: g_c = w (gI_c t_c + gP_c q'(p_c)), q' = 1 (linear) or 2 p_c (squared)  =: w G_c.
//   CE:  d(-sum_c t_c log p_c)/dz_k = -sum_c t_c (delta_ck - p_k) = T p_k - t_k,  T = sum_c t_c
//        (T = 1 for hard labels; soft targets need not sum to one).
//   Entropy: H = -sum_c p_c log p_c, g_c = -(log p_c + 1), sum_c p_c g_c = H - 1, so
//        dH/dz_k = p_k (-(log p_k + 1) - (H - 1)) = -p_k (log p_k + H),
//        and with shifted z (see softmax_shifted) log p_k + H = z_k - sum_c p_c z_c: no log needed.
//   => gz_k = w [ p_k (G_k - sum_c p_c G_c) + gCE (T p_k - t_k) - gH p_k (z_k - sum_c p_c z_c) ].
// Sigmoid (C == 1). ds/dz = s (1 - s).
//   Dice parts: w (gI t + gP q'(s)) s (1 - s).
//   BCE: d(-(t log s + (1 - t) log(1 - s)))/dz = s - t.
//   Binary entropy: dH/ds = -(log s - log(1 - s)) = -z, so dH/dz = -z s (1 - s).
//   => gz = w [ (gI t + gP q'(s) - gH z) s (1 - s) + gCE (s - t) ].
// z is overwritten (shifted); p is scratch of length C.
template <class T>
MINISSL_HD MINISSL_INLINE void dce_backward_voxel(T* z, const T* t, T w, int C, bool squared, const T* gI,
                                          const T* gP, T gCE, T gH, T* gz, T* p) {
  if (C == 1) {
    T s, s1, logs, log1ms;
    sigmoid_logp(z[0], s, s1, logs, log1ms);
    const T dq = squared ? T(2.0) * s : T(1.0);
    gz[0] = w * ((gI[0] * t[0] + gP[0] * dq - gH * z[0]) * (s * s1) + gCE * (s - t[0]));
    return;
  }
  T s;
  softmax_shifted(z, C, p, s);
  T pz = T(0.0), tsum = T(0.0), pG = T(0.0);
  for (int c = 0; c < C; ++c) {
    pz = pz + p[c] * z[c];
    tsum = tsum + t[c];
    const T G = gI[c] * t[c] + gP[c] * (squared ? T(2.0) * p[c] : T(1.0));
    gz[c] = G;  // G_c kept in gz until the sum is known
    pG = pG + p[c] * G;
  }
  for (int c = 0; c < C; ++c) {
    gz[c] = w * (p[c] * (gz[c] - pG) + gCE * (tsum * p[c] - t[c]) - gH * p[c] * (z[c] - pz));
  }
}

}  // namespace minissl
