// Ellipse math shared by the CPU and CUDA kernels (no torch headers; every function is MINISSL_HD).
//
//   * Moments: the 15 raw moments sum x^i y^j (i + j <= 4) of a point set, in normalised coordinates
//     u = (x - cx) / s, v = (y - cy) / s. They are all the direct least-squares fit needs, so a
//     kernel accumulates them point by point and never stores the points.
//   * solve_conic: the direct least-squares ellipse fit (Fitzgibbon, Pilu & Fisher 1999) in the
//     numerically stable form of Halir & Flusser (1998): with D1 = [u^2, uv, v^2], D2 = [u, v, 1],
//     S1 = D1'D1, S2 = D1'D2, S3 = D2'D2, the quadratic part a1 is the eigenvector of
//     M = C1^-1 (S1 - S2 S3^-1 S2') with 4 a c - b^2 > 0 (C1 = [[0,0,2],[0,-1,0],[2,0,0]]) and the
//     linear part is a2 = -S3^-1 S2' a1. The pencil (M, C1) has exactly one non-negative eigenvalue,
//     the largest root of the characteristic cubic, found here by Newton's method from above.
//   * conic_to_params: conic A u^2 + B uv + C v^2 + D u + E v + F = 0 -> (cx, cy, a, b, theta) with
//     a >= b and theta in [0, pi), the angle of the major axis from +x towards +y.
//   * distance / refine: the normalised elliptical distance d and the ERSR refinement rule.
#pragma once

#include "common.h"

namespace minissl {
namespace ellipse {

constexpr double kPi = 3.14159265358979323846;

// True for finite x (NaN and +-inf fail the comparison); portable to host and device code.
MINISSL_HD inline bool finite(double x) { return fabs(x) <= 1.7976931348623157e308; }

// Raw moments, index order: 1, u, v, uu, uv, vv, uuu, uuv, uvv, vvv, u4, u3v, u2v2, uv3, v4.
struct Moments {
  double m[15];
};

MINISSL_HD inline void moments_zero(Moments& s) {
  for (int k = 0; k < 15; ++k) s.m[k] = 0.0;
}

MINISSL_HD inline void moments_add(Moments& s, double u, double v) {
  const double uu = u * u, uv = u * v, vv = v * v;
  s.m[0] += 1.0;
  s.m[1] += u;
  s.m[2] += v;
  s.m[3] += uu;
  s.m[4] += uv;
  s.m[5] += vv;
  s.m[6] += uu * u;
  s.m[7] += uu * v;
  s.m[8] += u * vv;
  s.m[9] += vv * v;
  s.m[10] += uu * uu;
  s.m[11] += uu * uv;
  s.m[12] += uu * vv;
  s.m[13] += uv * vv;
  s.m[14] += vv * vv;
}

MINISSL_HD inline void moments_merge(Moments& s, const Moments& o) {
  for (int k = 0; k < 15; ++k) s.m[k] += o.m[k];
}

// Inverse of a symmetric 3x3 matrix; returns false when it is singular relative to its scale.
MINISSL_HD inline bool inverse3_sym(const double a[3][3], double inv[3][3]) {
  const double c00 = a[1][1] * a[2][2] - a[1][2] * a[2][1];
  const double c01 = a[1][2] * a[2][0] - a[1][0] * a[2][2];
  const double c02 = a[1][0] * a[2][1] - a[1][1] * a[2][0];
  const double det = a[0][0] * c00 + a[0][1] * c01 + a[0][2] * c02;
  const double scale = fabs(a[0][0]) + fabs(a[1][1]) + fabs(a[2][2]);
  if (!(fabs(det) > 1e-14 * scale * scale * scale)) return false;
  const double r = 1.0 / det;
  inv[0][0] = c00 * r;
  inv[0][1] = (a[0][2] * a[2][1] - a[0][1] * a[2][2]) * r;
  inv[0][2] = (a[0][1] * a[1][2] - a[0][2] * a[1][1]) * r;
  inv[1][0] = c01 * r;
  inv[1][1] = (a[0][0] * a[2][2] - a[0][2] * a[2][0]) * r;
  inv[1][2] = (a[0][2] * a[1][0] - a[0][0] * a[1][2]) * r;
  inv[2][0] = c02 * r;
  inv[2][1] = (a[0][1] * a[2][0] - a[0][0] * a[2][1]) * r;
  inv[2][2] = (a[0][0] * a[1][1] - a[0][1] * a[1][0]) * r;
  return true;
}

// Null vector of a (numerically) rank-2 3x3 matrix: the largest cross product of two of its rows.
MINISSL_HD inline bool null_vector3(const double a[3][3], double v[3]) {
  double best = 0.0;
  for (int i = 0; i < 3; ++i) {
    const double* p = a[i];
    const double* q = a[(i + 1) % 3];
    const double c[3] = {p[1] * q[2] - p[2] * q[1], p[2] * q[0] - p[0] * q[2], p[0] * q[1] - p[1] * q[0]};
    const double n = c[0] * c[0] + c[1] * c[1] + c[2] * c[2];
    if (n > best) {
      best = n;
      v[0] = c[0];
      v[1] = c[1];
      v[2] = c[2];
    }
  }
  if (!(best > 0.0) || !finite(best)) return false;
  const double r = 1.0 / sqrt(best);
  v[0] *= r;
  v[1] *= r;
  v[2] *= r;
  return true;
}

// Halir-Flusser direct fit from the moments of >= 6 normalised points.
// conic = (A, B, C, D, E, F) of A u^2 + B uv + C v^2 + D u + E v + F = 0. False: no ellipse.
MINISSL_HD inline bool solve_conic(const Moments& s, double conic[6]) {
  const double* m = s.m;
  if (!(m[0] >= 6.0)) return false;
  const double S1[3][3] = {{m[10], m[11], m[12]}, {m[11], m[12], m[13]}, {m[12], m[13], m[14]}};
  const double S2[3][3] = {{m[6], m[7], m[3]}, {m[7], m[8], m[4]}, {m[8], m[9], m[5]}};
  const double S3[3][3] = {{m[3], m[4], m[1]}, {m[4], m[5], m[2]}, {m[1], m[2], m[0]}};
  double S3i[3][3];
  if (!inverse3_sym(S3, S3i)) return false;
  // T = -S3^-1 S2'  (3x3), so a2 = T a1.
  double T[3][3];
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      double acc = 0.0;
      for (int k = 0; k < 3; ++k) acc += S3i[i][k] * S2[j][k];
      T[i][j] = -acc;
    }
  // Reduced scatter R = S1 + S2 T (symmetric in exact arithmetic; symmetrised here).
  double R[3][3];
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      double acc = S1[i][j];
      for (int k = 0; k < 3; ++k) acc += S2[i][k] * T[k][j];
      R[i][j] = acc;
    }
  for (int i = 0; i < 3; ++i)
    for (int j = i + 1; j < 3; ++j) R[i][j] = R[j][i] = 0.5 * (R[i][j] + R[j][i]);
  // M = C1^-1 R, C1^-1 = [[0, 0, 1/2], [0, -1, 0], [1/2, 0, 0]].
  const double M[3][3] = {{0.5 * R[2][0], 0.5 * R[2][1], 0.5 * R[2][2]},
                          {-R[1][0], -R[1][1], -R[1][2]},
                          {0.5 * R[0][0], 0.5 * R[0][1], 0.5 * R[0][2]}};
  // Characteristic polynomial p(x) = x^3 - t x^2 + q x - d.
  const double t = M[0][0] + M[1][1] + M[2][2];
  const double q = M[0][0] * M[1][1] - M[0][1] * M[1][0] + M[0][0] * M[2][2] - M[0][2] * M[2][0] +
                   M[1][1] * M[2][2] - M[1][2] * M[2][1];
  const double d = M[0][0] * (M[1][1] * M[2][2] - M[1][2] * M[2][1]) -
                   M[0][1] * (M[1][0] * M[2][2] - M[1][2] * M[2][0]) +
                   M[0][2] * (M[1][0] * M[2][1] - M[1][1] * M[2][0]);
  if (!finite(t) || !finite(q) || !finite(d)) return false;
  // Largest root by Newton from Fujiwara's upper bound (p is convex and increasing above it).
  double x = 2.0 * fmax(fabs(t), fmax(sqrt(fabs(q)), cbrt(0.5 * fabs(d))));
  if (!(x > 0.0)) return false;
  for (int it = 0; it < 200; ++it) {
    const double p = ((x - t) * x + q) * x - d;
    const double dp = (3.0 * x - 2.0 * t) * x + q;
    if (!(dp > 0.0)) break;
    const double step = p / dp;
    if (!(step > 0.0)) break;  // monotone from above: stop when no more progress
    x -= step;
    if (step <= 1e-16 * fabs(x)) break;
  }
  double A[3][3];
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) A[i][j] = M[i][j] - (i == j ? x : 0.0);
  double a1[3];
  if (!null_vector3(A, a1)) return false;
  if (!(4.0 * a1[0] * a1[2] - a1[1] * a1[1] > 0.0)) return false;
  conic[0] = a1[0];
  conic[1] = a1[1];
  conic[2] = a1[2];
  for (int i = 0; i < 3; ++i) conic[3 + i] = T[i][0] * a1[0] + T[i][1] * a1[1] + T[i][2] * a1[2];
  return true;
}

// Conic -> (cx, cy, a, b, theta); false when the conic is not a real ellipse or not finite.
MINISSL_HD inline bool conic_to_params(const double conic[6], double out[5]) {
  double A = conic[0], B = conic[1], C = conic[2], D = conic[3], E = conic[4], F = conic[5];
  if (A + C < 0.0) {
    A = -A;
    B = -B;
    C = -C;
    D = -D;
    E = -E;
    F = -F;
  }
  const double den = 4.0 * A * C - B * B;
  if (!(den > 0.0)) return false;
  const double cx = (B * E - 2.0 * C * D) / den;
  const double cy = (B * D - 2.0 * A * E) / den;
  const double F0 = F + 0.5 * (D * cx + E * cy);  // conic value at the centre
  const double root = sqrt((A - C) * (A - C) + B * B);
  const double lmin = 0.5 * (A + C - root);  // eigenvalues of [[A, B/2], [B/2, C]]
  const double lmax = 0.5 * (A + C + root);
  if (!(lmin > 0.0) || !(F0 < 0.0)) return false;
  const double a = sqrt(-F0 / lmin);
  const double b = sqrt(-F0 / lmax);
  double theta = 0.5 * atan2(-B, C - A);
  if (theta < 0.0) theta += kPi;
  if (theta >= kPi) theta -= kPi;
  out[0] = cx;
  out[1] = cy;
  out[2] = a;
  out[3] = b;
  out[4] = theta;
  for (int k = 0; k < 5; ++k)
    if (!finite(out[k])) return false;
  return a > 0.0 && b > 0.0;
}

// Full fit from the moments of points normalised as u = (x - cx) / scale, v = (y - cy) / scale.
// params = (cx, cy, a, b, theta) in pixels; all zero when the fit is invalid.
MINISSL_HD inline bool fit_from_moments(const Moments& s, double cx, double cy, double scale, double params[5]) {
  double conic[6], p[5];
  bool ok = solve_conic(s, conic) && conic_to_params(conic, p);
  if (ok) {
    p[0] = cx + scale * p[0];
    p[1] = cy + scale * p[1];
    p[2] *= scale;
    p[3] *= scale;
    for (int k = 0; k < 5; ++k) ok = ok && finite(p[k]);
  }
  for (int k = 0; k < 5; ++k) params[k] = ok ? p[k] : 0.0;
  return ok;
}

// Precomputed per-ellipse terms for the normalised elliptical distance.
struct Frame {
  double cx, cy, c, s, a, b;
};

MINISSL_HD inline Frame make_frame(const double* params) {
  Frame f;
  f.cx = params[0];
  f.cy = params[1];
  f.c = cos(params[4]);
  f.s = sin(params[4]);
  f.a = fmax(params[2], 1e-12);  // clamped as the reference does: all-zero params give a large finite d
  f.b = fmax(params[3], 1e-12);
  return f;
}

// d = (x'/a)^2 + (y'/b)^2 at the pixel centre (x, y) = (col, row), evaluated as the reference does.
MINISSL_HD inline double distance(const Frame& f, double x, double y) {
  const double dx = x - f.cx, dy = y - f.cy;
  const double xr = dx * f.c + dy * f.s;
  const double yr = -dx * f.s + dy * f.c;
  const double p = xr / f.a, q = yr / f.b;
  return p * p + q * q;
}

MINISSL_HD inline float vpow(float x, float y) { return powf(x, y); }
MINISSL_HD inline double vpow(double x, double y) { return pow(x, y); }

// ERSR rule in the dtype T of the probabilities (d already rounded to T, as the reference does):
// inside (d <= 1) max(P, clip(fill_base + (1 - d)^fill_power, 0, 1)); outside P exp(-decay (d - 1)).
// The default power 2 is a product, as torch computes x ** 2 (pow may differ in the last bit).
template <typename T>
MINISSL_HD inline T refine(T p, T d, T fill_base, T fill_power, T decay) {
  if (d <= T(1)) {
    const T q = T(1) - d;
    const T fill = vmin(vmax(fill_base + (fill_power == T(2) ? q * q : vpow(q, fill_power)), T(0)), T(1));
    return vmax(p, fill);
  }
  return p * vexp(-decay * (d - T(1)));
}

}  // namespace ellipse
}  // namespace minissl
