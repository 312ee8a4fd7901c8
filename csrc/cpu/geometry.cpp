// CPU kernels of the geometry ops: largest_component, fit_ellipse, fit_ellipse_points,
// ellipse_refine, ellipse_mask (semantics: minissl/ops/reference.py).
//
// Connected components are labelled on runs, not pixels: each row (the last axis) is scanned once
// for maximal runs of one value (skipping background 32 bytes at a time for uint8/bool), a run is united with the
// overlapping same-valued runs of the earlier neighbour rows (columns overlapping with a +-1 margin
// give 8-connectivity in 2D and, over the 4 earlier rows of the 3x3 row neighbourhood, 26 in 3D),
// and union-find always hangs the larger root under the smaller one. A root is therefore the first
// run of its component in C order, which gives the reference's tie rule (the component reached first
// in a raster scan wins) for free. Samples run in parallel (for_each_sample). The rows are copied to
// the output during the scan, and only the runs of the smaller components are zeroed afterwards.
//
// fit_ellipse walks the runs of the largest component only, with its holes filled (the gaps between
// its runs, labelled on runs with 4-connectivity, that do not reach the edge of its bounding box): a
// filled run [s, e) of row y contributes the edge midpoints (s - 1/2, y), (e - 1/2, y) and
// (x, y -+ 1/2) for its columns not covered by a filled run of row y -+ 1. Each point is added to
// the 15 moments of kernels/ellipse.h straight away; no point list is stored.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "checks.h"
#include "common.h"
#include "kernels/ellipse.h"

namespace minissl {
namespace {

struct Run {
  int32_t s, e;  // columns [s, e)
};

// Runs of one sample, grouped by row; parent is the union-find forest over run indices.
struct RunSet {
  std::vector<Run> runs;
  std::vector<int64_t> value;  // the label of each run (multi-class labelling only)
  std::vector<int64_t> row_begin;  // (rows + 1,) first run of each row
  std::vector<int32_t> parent;
  std::vector<int64_t> size;  // pixels per root
  std::vector<int32_t> best;  // largest root per class (largest_component)
  // fit_ellipse only, rows y0..y1 of the component's bounding box: the gaps between its runs, their
  // union-find forest and exterior flag, and the runs of the filled component
  std::vector<Run> gaps, filled;
  std::vector<int64_t> gap_begin, filled_begin;
  std::vector<int32_t> gap_parent;
  std::vector<uint8_t> exterior;

  void clear() {
    runs.clear();
    value.clear();
    row_begin.clear();
    parent.clear();
  }
};

// Runs fn(b, scratch) for every sample b in [0, B) on the intra-op threads, handing samples out one
// at a time: a thread the OS deschedules (the CPUs here are shared) does not hold the others up the
// way a static split would. Each thread keeps one RunSet, so buffers are reused across its samples.
template <typename F>
void for_each_sample(int64_t B, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t tasks = std::min<int64_t>(B, at::get_num_threads());
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    RunSet rs;
    for (int64_t b = next.fetch_add(1); b < B; b = next.fetch_add(1)) fn(b, rs);
  });
}

inline bool has_zero_byte(uint64_t w) {
  return ((w - 0x0101010101010101ULL) & ~w & 0x8080808080808080ULL) != 0;
}

// Appends the maximal runs of row `a` (length W). kBinary: runs of non-zero values; otherwise runs of
// one non-zero value.
template <typename T, bool kBinary>
void scan_row(const T* a, int32_t W, RunSet& rs) {
  int32_t x = 0;
  while (x < W) {
    if constexpr (sizeof(T) == 1) {  // skip background 32, then 8 bytes at a time
      uint64_t w[4];
      while (x + 32 <= W) {
        std::memcpy(w, a + x, 32);
        if (w[0] | w[1] | w[2] | w[3]) break;
        x += 32;
      }
      while (x + 8 <= W) {
        std::memcpy(w, a + x, 8);
        if (w[0]) break;
        x += 8;
      }
    }
    if constexpr (sizeof(T) == 8) {
      while (x + 4 <= W && (a[x] | a[x + 1] | a[x + 2] | a[x + 3]) == 0) x += 4;
    }
    while (x < W && a[x] == T(0)) ++x;
    if (x >= W) break;
    const int32_t s = x;
    const T v = a[x];
    if constexpr (sizeof(T) == 1) {
      const uint64_t pattern = 0x0101010101010101ULL * static_cast<uint8_t>(v);
      uint64_t w;
      while (x + 8 <= W) {
        std::memcpy(&w, a + x, 8);
        if (kBinary ? has_zero_byte(w) : (w != pattern)) break;
        x += 8;
      }
    }
    if constexpr (kBinary) {
      while (x < W && a[x] != T(0)) ++x;
    } else {
      while (x < W && a[x] == v) ++x;
      rs.value.push_back(static_cast<int64_t>(v));
    }
    rs.runs.push_back({s, x});
  }
}

inline int32_t find_root(int32_t* p, int32_t x) {
  while (p[x] != x) {
    p[x] = p[p[x]];
    x = p[x];
  }
  return x;
}

inline void unite(int32_t* p, int32_t a, int32_t b) {
  a = find_root(p, a);
  b = find_root(p, b);
  if (a < b) p[b] = a;
  else if (b < a) p[a] = b;
}

// Unites the runs of row r with the 8-adjacent runs (same value unless kBinary) of an earlier row q.
template <bool kBinary>
void connect_rows(RunSet& rs, int64_t r, int64_t q) {
  int64_t j = rs.row_begin[q];
  const int64_t jend = rs.row_begin[q + 1];
  int32_t* p = rs.parent.data();
  for (int64_t i = rs.row_begin[r]; i < rs.row_begin[r + 1] && j < jend; ++i) {
    const int32_t s = rs.runs[i].s, e = rs.runs[i].e;
    while (j < jend && rs.runs[j].e < s) ++j;  // ends left of column s - 1
    for (int64_t k = j; k < jend && rs.runs[k].s <= e; ++k)
      if (kBinary || rs.value[k] == rs.value[i]) unite(p, static_cast<int32_t>(i), static_cast<int32_t>(k));
  }
}

// Labels one sample of `rows` rows of width W (rows = D*H with D planes of H rows when depth > 1),
// copying each row to `copy` (if not null) while it is hot in cache.
// On return parent[i] is the root (first run in C order) of run i and size[root] its pixel count.
template <typename T, bool kBinary>
void label_runs(const T* data, int64_t depth, int64_t H, int32_t W, RunSet& rs, T* copy = nullptr) {
  rs.clear();
  const int64_t rows = depth * H;
  rs.row_begin.resize(rows + 1);
  for (int64_t r = 0; r < rows; ++r) {
    rs.row_begin[r] = static_cast<int64_t>(rs.runs.size());
    scan_row<T, kBinary>(data + r * W, W, rs);
    if (copy) std::memcpy(copy + r * W, data + r * W, sizeof(T) * W);
  }
  rs.row_begin[rows] = static_cast<int64_t>(rs.runs.size());
  TORCH_CHECK(rs.runs.size() < static_cast<size_t>(INT32_MAX), "minissl: expected fewer than 2^31 runs per sample, got ",
              rs.runs.size());
  const int32_t n = static_cast<int32_t>(rs.runs.size());
  rs.parent.resize(n);
  for (int32_t i = 0; i < n; ++i) rs.parent[i] = i;
  for (int64_t z = 0; z < depth; ++z)
    for (int64_t y = 0; y < H; ++y) {
      const int64_t r = z * H + y;
      if (rs.row_begin[r] == rs.row_begin[r + 1]) continue;
      if (y > 0) connect_rows<kBinary>(rs, r, r - 1);
      if (z > 0)
        for (int64_t dy = -1; dy <= 1; ++dy)
          if (y + dy >= 0 && y + dy < H) connect_rows<kBinary>(rs, r, r - H + dy);
    }
  // Parents always point to smaller indices, so one forward pass flattens the forest.
  rs.size.assign(n, 0);
  for (int32_t i = 0; i < n; ++i) {
    rs.parent[i] = rs.parent[rs.parent[i]];
    rs.size[rs.parent[i]] += rs.runs[i].e - rs.runs[i].s;
  }
}

// ------------------------------------------------------------------------------------------------
// largest_component

template <typename T>
void largest_component_sample(const T* in, T* out, int64_t depth, int64_t H, int32_t W, int64_t num_classes,
                              RunSet& rs) {
  label_runs<T, false>(in, depth, H, W, rs, out);
  const int32_t n = static_cast<int32_t>(rs.runs.size());
  int64_t vmax = 0;
  for (int32_t i = 0; i < n; ++i) vmax = std::max(vmax, rs.value[i]);
  const int64_t nc = std::min(num_classes, vmax + 1);
  std::vector<int32_t>& best = rs.best;
  best.assign(std::max<int64_t>(nc, 1), -1);
  for (int32_t i = 0; i < n; ++i) {  // roots in C order; strictly larger wins, so ties keep the first
    const int64_t v = rs.value[i];
    if (rs.parent[i] != i || v < 1 || v >= nc) continue;
    if (best[v] < 0 || rs.size[i] > rs.size[best[v]]) best[v] = i;
  }
  for (int64_t r = 0; r < depth * H; ++r)
    for (int64_t i = rs.row_begin[r]; i < rs.row_begin[r + 1]; ++i) {
      const int64_t v = rs.value[i];
      if (v >= 1 && v < nc && rs.parent[i] != best[v])
        std::memset(out + r * W + rs.runs[i].s, 0, sizeof(T) * (rs.runs[i].e - rs.runs[i].s));
    }
}

at::Tensor largest_component_cpu(const at::Tensor& labels, int64_t num_classes) {
  check_device_type(labels, c10::DeviceType::CPU, "labels");
  check_labels(labels, num_classes);
  const auto dt = labels.scalar_type();
  const at::Tensor in = labels.contiguous();
  at::Tensor out = at::empty_like(in);
  const int64_t B = in.size(0);
  const int64_t W = in.size(-1), H = in.size(-2), depth = labels.dim() == 4 ? in.size(1) : 1;
  TORCH_CHECK_VALUE(W < INT32_MAX, "minissl: expected width < 2^31, got ", W);
  const int64_t per = depth * H * W;
  if (out.numel() == 0) return out;
  for_each_sample(B, [&](int64_t b, RunSet& rs) {
    if (dt == at::kLong)
      largest_component_sample<int64_t>(in.data_ptr<int64_t>() + b * per, out.data_ptr<int64_t>() + b * per, depth, H,
                                        (int32_t)W, num_classes, rs);
    else  // bool is stored as one byte holding 0 or 1
      largest_component_sample<uint8_t>(static_cast<const uint8_t*>(in.data_ptr()) + b * per,
                                        static_cast<uint8_t*>(out.data_ptr()) + b * per, depth, H, (int32_t)W,
                                        num_classes, rs);
  });
  return out;
}

// ------------------------------------------------------------------------------------------------
// fit_ellipse

// Adds the points (x, y) of the columns of [s, e) not covered by runs[k .. kend) (sorted, disjoint).
inline void add_uncovered(ellipse::Moments& m, const Run* runs, int64_t k, int64_t kend, int32_t s, int32_t e,
                          double y, double cx, double cy, double inv) {
  const double v = (y - cy) * inv;
  int32_t x = s;
  for (; k < kend && runs[k].s < e; ++k) {
    if (runs[k].e <= x) continue;
    for (; x < runs[k].s; ++x) ellipse::moments_add(m, (x - cx) * inv, v);
    x = std::max(x, runs[k].e);
    if (x >= e) return;
  }
  for (; x < e; ++x) ellipse::moments_add(m, (x - cx) * inv, v);
}

// Fills rs.filled / rs.filled_begin (rows y0..y1, local index t = y - y0) with the runs of component
// `best` and its holes. The gaps between its runs inside the bounding box [x0, x1] are labelled with
// 4-connectivity (two gaps of adjacent rows touch when their columns overlap); a gap is exterior when
// it reaches the box's edge (all that lies outside the box is connected to the image border) or
// touches an exterior gap, and every other gap is a hole.
void fill_component(RunSet& rs, int32_t best, int64_t y0, int64_t y1, int32_t x0, int32_t x1) {
  const int64_t rows = y1 - y0 + 1;
  rs.gaps.clear();
  rs.gap_begin.resize(rows + 1);
  for (int64_t t = 0; t < rows; ++t) {
    rs.gap_begin[t] = static_cast<int64_t>(rs.gaps.size());
    int32_t x = x0;
    for (int64_t i = rs.row_begin[y0 + t]; i < rs.row_begin[y0 + t + 1]; ++i) {
      if (rs.parent[i] != best) continue;
      if (rs.runs[i].s > x) rs.gaps.push_back({x, rs.runs[i].s});
      x = rs.runs[i].e;
    }
    if (x <= x1) rs.gaps.push_back({x, x1 + 1});
  }
  rs.gap_begin[rows] = static_cast<int64_t>(rs.gaps.size());
  const int32_t n = static_cast<int32_t>(rs.gaps.size());
  rs.gap_parent.resize(n);
  rs.exterior.assign(n, 0);
  int32_t* p = rs.gap_parent.data();
  for (int32_t i = 0; i < n; ++i) p[i] = i;
  for (int64_t t = 1; t < rows; ++t) {  // 4-connectivity: overlapping columns in the row above
    int64_t j = rs.gap_begin[t - 1];
    const int64_t jend = rs.gap_begin[t];
    for (int64_t i = rs.gap_begin[t]; i < rs.gap_begin[t + 1]; ++i) {
      while (j < jend && rs.gaps[j].e <= rs.gaps[i].s) ++j;
      for (int64_t k = j; k < jend && rs.gaps[k].s < rs.gaps[i].e; ++k)
        unite(p, static_cast<int32_t>(i), static_cast<int32_t>(k));
    }
  }
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t i = rs.gap_begin[t]; i < rs.gap_begin[t + 1]; ++i) {
      p[i] = p[p[i]];  // parents point to smaller indices: one forward pass flattens
      if (t == 0 || t == rows - 1 || rs.gaps[i].s == x0 || rs.gaps[i].e == x1 + 1) rs.exterior[p[i]] = 1;
    }
  // Filled runs: the component's runs and the hole gaps of each row, in column order, merged.
  rs.filled.clear();
  rs.filled_begin.resize(rows + 1);
  for (int64_t t = 0; t < rows; ++t) {
    rs.filled_begin[t] = static_cast<int64_t>(rs.filled.size());
    int64_t i = rs.row_begin[y0 + t], g = rs.gap_begin[t];
    const int64_t iend = rs.row_begin[y0 + t + 1];
    for (int32_t x = x0; x <= x1;) {
      while (i < iend && rs.parent[i] != best) ++i;
      Run piece;
      bool in = true;
      if (i < iend && rs.runs[i].s == x) {
        piece = rs.runs[i++];
      } else {  // the gaps and the component's runs tile [x0, x1]
        piece = rs.gaps[g];
        in = !rs.exterior[p[g]];
        ++g;
      }
      if (in) {
        if (static_cast<int64_t>(rs.filled.size()) > rs.filled_begin[t] && rs.filled.back().e == piece.s) {
          rs.filled.back().e = piece.e;
        } else {
          rs.filled.push_back(piece);
        }
      }
      x = piece.e;
    }
  }
  rs.filled_begin[rows] = static_cast<int64_t>(rs.filled.size());
}

// Fits the outer boundary of the largest component of one (H, W) mask; returns validity, writes
// params (5,).
template <typename T>
bool fit_ellipse_sample(const T* mask, int64_t H, int32_t W, RunSet& rs, double* params) {
  for (int k = 0; k < 5; ++k) params[k] = 0.0;
  label_runs<T, true>(mask, 1, H, W, rs);
  const int32_t n = static_cast<int32_t>(rs.runs.size());
  int32_t best = -1;
  for (int32_t i = 0; i < n; ++i)
    if (rs.parent[i] == i && (best < 0 || rs.size[i] > rs.size[best])) best = i;
  if (best < 0) return false;
  // Bounding box of the component -> centre and scale of the normalised coordinates.
  int64_t y0 = H, y1 = -1;
  int32_t x0 = W, x1 = -1;
  for (int64_t r = 0; r < H; ++r)
    for (int64_t i = rs.row_begin[r]; i < rs.row_begin[r + 1]; ++i)
      if (rs.parent[i] == best) {
        y0 = std::min(y0, r);
        y1 = std::max(y1, r);
        x0 = std::min(x0, rs.runs[i].s);
        x1 = std::max(x1, rs.runs[i].e - 1);
      }
  fill_component(rs, best, y0, y1, x0, x1);
  const double cx = 0.5 * (x0 + x1), cy = 0.5 * (y0 + y1);
  const double scale = 0.5 * std::max(x1 - x0, static_cast<int32_t>(y1 - y0)) + 0.5;
  const double inv = 1.0 / scale;
  ellipse::Moments m;
  ellipse::moments_zero(m);
  const Run* f = rs.filled.data();
  const int64_t rows = y1 - y0 + 1;
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t i = rs.filled_begin[t]; i < rs.filled_begin[t + 1]; ++i) {
      const int32_t s = f[i].s, e = f[i].e;
      const double y = static_cast<double>(y0 + t), v = (y - cy) * inv;
      ellipse::moments_add(m, (s - 0.5 - cx) * inv, v);
      ellipse::moments_add(m, (e - 0.5 - cx) * inv, v);
      // vertical edges: columns not covered by the filled runs of the row above / below
      const int64_t up = t > 0 ? rs.filled_begin[t - 1] : 0, up_end = t > 0 ? rs.filled_begin[t] : 0;
      add_uncovered(m, f, up, up_end, s, e, y - 0.5, cx, cy, inv);
      const int64_t dn = t + 1 < rows ? rs.filled_begin[t + 1] : 0, dn_end = t + 1 < rows ? rs.filled_begin[t + 2] : 0;
      add_uncovered(m, f, dn, dn_end, s, e, y + 0.5, cx, cy, inv);
    }
  const bool ok = ellipse::fit_from_moments(m, cx, cy, scale, params) && params[3] >= 1.0;
  if (!ok)
    for (int k = 0; k < 5; ++k) params[k] = 0.0;
  return ok;
}

std::tuple<at::Tensor, at::Tensor> fit_ellipse_cpu(const at::Tensor& masks) {
  check_device_type(masks, c10::DeviceType::CPU, "masks");
  check_masks(masks);
  const at::Tensor m = masks.contiguous();
  const int64_t B = m.size(0), H = m.size(1), W = m.size(2);
  TORCH_CHECK_VALUE(W < INT32_MAX, "minissl: expected width < 2^31, got ", W);
  at::Tensor params = at::zeros({B, 5}, m.options().dtype(at::kDouble));
  at::Tensor valid = at::zeros({B}, m.options().dtype(at::kBool));
  if (H == 0 || W == 0) return {params, valid};
  const uint8_t* src = static_cast<const uint8_t*>(m.data_ptr());
  double* pp = params.data_ptr<double>();
  bool* vp = valid.data_ptr<bool>();
  for_each_sample(B, [&](int64_t b, RunSet& rs) {
    vp[b] = fit_ellipse_sample<uint8_t>(src + b * H * W, H, (int32_t)W, rs, pp + 5 * b);
  });
  return {params, valid};
}

std::tuple<at::Tensor, at::Tensor> fit_ellipse_points_cpu(const at::Tensor& points) {
  check_device_type(points, c10::DeviceType::CPU, "points");
  check_points(points);
  const at::Tensor pts = points.contiguous();
  const int64_t N = pts.size(0);
  const double* p = pts.data_ptr<double>();
  at::Tensor params = at::zeros({5}, pts.options());
  at::Tensor valid = at::zeros({}, pts.options().dtype(at::kBool));
  if (N < 6) return {params, valid};
  // Centred on the centroid and scaled to unit rms radius, as the reference does.
  double sx = 0.0, sy = 0.0;
  for (int64_t i = 0; i < N; ++i) {
    sx += p[2 * i];
    sy += p[2 * i + 1];
  }
  const double cx = sx / N, cy = sy / N;
  double ss = 0.0;
  for (int64_t i = 0; i < N; ++i) {
    const double dx = p[2 * i] - cx, dy = p[2 * i + 1] - cy;
    ss += dx * dx + dy * dy;
  }
  const double scale = std::sqrt(ss / N);
  if (!ellipse::finite(scale) || !(scale > 1e-12)) return {params, valid};
  ellipse::Moments m;
  ellipse::moments_zero(m);
  const double inv = 1.0 / scale;
  for (int64_t i = 0; i < N; ++i) ellipse::moments_add(m, (p[2 * i] - cx) * inv, (p[2 * i + 1] - cy) * inv);
  valid.fill_(ellipse::fit_from_moments(m, cx, cy, scale, params.data_ptr<double>()));
  return {params, valid};
}

// ------------------------------------------------------------------------------------------------
// ellipse_refine / ellipse_mask (per pixel; rows in parallel)

std::tuple<at::Tensor, at::Tensor> ellipse_refine_cpu(const at::Tensor& probs, const at::Tensor& params,
                                                      const at::Tensor& valid, double threshold, double fill_base,
                                                      double fill_power, double decay) {
  check_device_type(probs, c10::DeviceType::CPU, "probs");
  check_probs(probs);
  const int64_t B = probs.size(0), H = probs.size(1), W = probs.size(2);
  check_ellipses(params, valid, B, probs);
  const at::Tensor P = probs.contiguous();
  const at::Tensor prm = params.to(at::kDouble).contiguous();
  const at::Tensor ok = valid.contiguous();
  at::Tensor refined = at::empty_like(P);
  at::Tensor pseudo = at::empty(P.sizes(), P.options().dtype(at::kByte));
  const double* pp = prm.data_ptr<double>();
  const bool* vp = ok.data_ptr<bool>();
  uint8_t* out_pseudo = pseudo.data_ptr<uint8_t>();
  MINISSL_DISPATCH_FLOAT(P.scalar_type(), "ellipse_refine", [&] {
    const scalar_t* src = P.data_ptr<scalar_t>();
    scalar_t* dst = refined.data_ptr<scalar_t>();
    const scalar_t thr = static_cast<scalar_t>(threshold), fb = static_cast<scalar_t>(fill_base),
                   fp = static_cast<scalar_t>(fill_power), dc = static_cast<scalar_t>(decay);
    at::parallel_for(0, B * H, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / H, y = r % H;
        const scalar_t* in = src + r * W;
        scalar_t* out = dst + r * W;
        uint8_t* ps = out_pseudo + r * W;
        if (!vp[b]) {
          for (int64_t x = 0; x < W; ++x) {
            out[x] = in[x];
            ps[x] = in[x] > thr;
          }
          continue;
        }
        // d at the pixel centres of this row (double, rounded to scalar_t as the reference does) ...
        const ellipse::Frame f = ellipse::make_frame(pp + 5 * b);
        for (int64_t x = 0; x < W; ++x) out[x] = static_cast<scalar_t>(ellipse::distance(f, double(x), double(y)));
        // ... then the ERSR rule, SIMD across the row (the same at::vec exp/pow torch itself uses).
        using Vec = at::vec::Vectorized<scalar_t>;
        const Vec one(scalar_t(1)), zero(scalar_t(0)), vfb(fb), vfp(fp), vneg_decay(-dc);
        int64_t x = 0;
        for (; x + Vec::size() <= W; x += Vec::size()) {
          const Vec d = Vec::loadu(out + x), p = Vec::loadu(in + x);
          const Vec t = at::vec::maximum(one - d, zero);
          const Vec fill = at::vec::clamp(vfb + (fp == scalar_t(2) ? t * t : t.pow(vfp)), zero, one);
          const Vec inside = at::vec::maximum(p, fill);
          const Vec outside = p * ((d - one) * vneg_decay).exp();
          Vec::blendv(outside, inside, d <= one).store(out + x);
        }
        for (; x < W; ++x) out[x] = ellipse::refine<scalar_t>(in[x], out[x], fb, fp, dc);
        for (x = 0; x < W; ++x) ps[x] = out[x] > thr;
      }
    });
  });
  return {refined, pseudo};
}

at::Tensor ellipse_mask_cpu(const at::Tensor& params, const at::Tensor& valid, int64_t height, int64_t width) {
  check_mask_shape(height, width);
  check_device_type(params, c10::DeviceType::CPU, "params");
  const int64_t B = params.dim() >= 1 ? params.size(0) : -1;
  check_ellipses(params, valid, B, params);
  const at::Tensor prm = params.to(at::kDouble).contiguous();
  const at::Tensor ok = valid.contiguous();
  at::Tensor out = at::empty({B, height, width}, prm.options().dtype(at::kByte));
  const double* pp = prm.data_ptr<double>();
  const bool* vp = ok.data_ptr<bool>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, B * height, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / height, y = r % height;
      uint8_t* o = dst + r * width;
      if (!vp[b]) {
        std::memset(o, 0, width);
        continue;
      }
      const ellipse::Frame f = ellipse::make_frame(pp + 5 * b);
      for (int64_t x = 0; x < width; ++x) o[x] = ellipse::distance(f, double(x), double(y)) <= 1.0;
    }
  });
  return out;
}

}  // namespace
}  // namespace minissl

TORCH_LIBRARY_IMPL(minissl, CPU, m) {
  m.impl("largest_component", &minissl::largest_component_cpu);
  m.impl("fit_ellipse", &minissl::fit_ellipse_cpu);
  m.impl("fit_ellipse_points", &minissl::fit_ellipse_points_cpu);
  m.impl("ellipse_refine", &minissl::ellipse_refine_cpu);
  m.impl("ellipse_mask", &minissl::ellipse_mask_cpu);
}
