// CUDA kernels of the geometry ops (raw pointers, no torch headers; launchers in cuda/launchers.h,
// called from cuda/bindings.cpp). Semantics: minissl/ops/reference.py; per-sample math:
// kernels/ellipse.h, shared with the CPU kernels.
//
// Connected components: union-find over voxels (Playne & Hawick 2018). Every foreground voxel
// starts as its own root; one pass unites it with the same-valued earlier voxels of its
// 8 (2D) / 26 (3D) neighbourhood with atomicMin, always hanging the larger root under the smaller,
// so a root is the first voxel of its component in C order; one pass flattens the forest. Labels are
// int32 voxel indices local to their sample (the forest of sample b lives at parent + b N), so a batch
// may hold any number of voxels as long as each sample has fewer than 2^31; loops stride over the
// batch in 64-bit indices, and per-sample kernels stride the samples over gridDim.y. Sizes are
// counted per root (warp-aggregated atomics), and the largest component of each (sample, class) is
// picked with one 64-bit atomicMax of (size << 32 | ~index): larger first, then earlier in raster
// order, the reference's tie rule.
//
// fit_ellipse: the same labelling on the binary mask; a second labelling, 4-connected, of the pixels
// outside the largest component, whose groups touching the image border are the exterior (the rest
// are holes); the bounding box of the component (its centre and scale normalise the coordinates);
// then each thread adds the midpoints of its component pixels' edges to the exterior to 15 moment
// sums in registers, reduced per block into a partial per (sample, block), and one thread per sample adds
// its partials in block order (no float atomics: bit-identical from run to run) and solves
// the 3x3 problem.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/launchers.h"
#include "kernels/ellipse.h"

namespace minissl {
namespace cuda {
namespace {

constexpr int kThreads = 256;

inline const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

inline unsigned int blocks_for(int64_t n, int per_thread = 1) {
  const int64_t b = (n + int64_t(kThreads) * per_thread - 1) / (int64_t(kThreads) * per_thread);
  return static_cast<unsigned int>(b < 1 ? 1 : b);
}

// ---- union-find ------------------------------------------------------------------------------------

__device__ __forceinline__ int32_t find_root(const int32_t* p, int32_t x) {
  int32_t q = p[x];
  while (q != x) {
    x = q;
    q = p[x];
  }
  return x;
}

__device__ __forceinline__ void unite(int32_t* p, int32_t a, int32_t b) {
  while (true) {
    a = find_root(p, a);
    b = find_root(p, b);
    if (a == b) return;
    if (a > b) {
      const int32_t t = a;
      a = b;
      b = t;
    }
    const int32_t old = atomicMin(&p[b], a);  // hang root b under a
    if (old == b) return;
    b = old;  // b was re-hung meanwhile: continue from its new parent
  }
}

// Value of voxel i as a class (kBinary: any non-zero value is class 1).
template <typename T, bool kBinary>
__device__ __forceinline__ int64_t class_of(const T* v, int64_t i) {
  if (kBinary) return v[i] != T(0) ? 1 : 0;
  return static_cast<int64_t>(v[i]);
}

// Labels are voxel indices local to the sample (i - b N), parent -1 for background.
template <typename T, bool kBinary>
__global__ void ccl_init(const T* v, int32_t* parent, int64_t total, int64_t N) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    parent[i] = class_of<T, kBinary>(v, i) != 0 ? static_cast<int32_t>(i % N) : -1;
}

template <typename T, bool kBinary>
__global__ void ccl_merge(const T* v, int32_t* parent, int64_t total, int64_t D, int64_t H, int64_t W) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    if (parent[i] < 0) continue;
    const int64_t c = class_of<T, kBinary>(v, i);
    const int64_t k = i % (D * H * W);
    int32_t* p = parent + (i - k);  // the sample's forest
    const int64_t x = k % W, y = (k / W) % H, z = k / (W * H);
    for (int dz = (D > 1 ? -1 : 0); dz <= 0; ++dz)
      for (int dy = -1; dy <= 1; ++dy)
        for (int dx = -1; dx <= 1; ++dx) {
          if (dz == 0 && (dy > 0 || (dy == 0 && dx >= 0))) continue;  // earlier neighbours only
          const int64_t zz = z + dz, yy = y + dy, xx = x + dx;
          if (zz < 0 || yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
          const int64_t j = k + (dz * H + dy) * W + dx;
          if (p[j] >= 0 && class_of<T, kBinary>(v, i - k + j) == c)
            unite(p, static_cast<int32_t>(k), static_cast<int32_t>(j));
        }
  }
}

__global__ void ccl_flatten(int32_t* parent, int64_t total, int64_t N) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = i % N;
    if (parent[i] >= 0) parent[i] = find_root(parent + (i - k), static_cast<int32_t>(k));
  }
}

// count[root] += 1 per voxel, one atomic per distinct root in a warp. One thread per voxel.
__global__ void ccl_count(const int32_t* parent, int32_t* count, int64_t total, int64_t N) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int32_t r = i < total ? parent[i] : -1;
  const int64_t root = r >= 0 ? i - i % N + r : -1;  // global index of the root (a warp may span samples)
  const unsigned active = __ballot_sync(0xffffffffu, r >= 0);
  if (r >= 0) {
    const unsigned peers = __match_any_sync(active, root);
    if ((threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&count[root], __popc(peers));
  }
}

// best[b * nc + c] (binary: best[b]) = max over roots of (size << 32 | (0xffffffff - local index)).
template <typename T, bool kBinary>
__global__ void ccl_best(const T* v, const int32_t* parent, const int32_t* count, unsigned long long* best,
                         int64_t total, int64_t N, int64_t nc) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / N;
    if (parent[i] != i - b * N) continue;
    const int64_t c = class_of<T, kBinary>(v, i);
    if (c < 1 || c >= nc) continue;
    const int64_t slot = kBinary ? b : b * nc + c;  // binary masks: one slot per sample
    const unsigned long long key = (static_cast<unsigned long long>(count[i]) << 32) |
                                   (0xffffffffull - static_cast<unsigned long long>(i - b * N));
    atomicMax(&best[slot], key);
  }
}

// Local index of the root of the best component (-1: none).
__device__ __forceinline__ int32_t best_root(unsigned long long key) {
  return key == 0 ? -1 : static_cast<int32_t>(0xffffffffull - (key & 0xffffffffull));
}

template <typename T>
__global__ void lc_write(const T* v, const int32_t* parent, const unsigned long long* best, T* out, int64_t total,
                         int64_t N, int64_t nc) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const T x = v[i];
    const int64_t c = static_cast<int64_t>(x);
    const int64_t b = i / N;
    const bool drop = c >= 1 && c < nc && parent[i] != best_root(best[b * nc + c]);
    out[i] = drop ? T(0) : x;
  }
}

template <typename T, bool kBinary>
const char* label(const T* v, int32_t* parent, int32_t* count, unsigned long long* best, int64_t B, int64_t D,
                  int64_t H, int64_t W, int64_t nc, cudaStream_t s) {
  const int64_t N = D * H * W, total = B * N;
  cudaMemsetAsync(count, 0, sizeof(int32_t) * total, s);
  cudaMemsetAsync(best, 0, sizeof(unsigned long long) * B * (kBinary ? 1 : nc), s);
  const unsigned g = blocks_for(total, 4);
  ccl_init<T, kBinary><<<g, kThreads, 0, s>>>(v, parent, total, N);
  ccl_merge<T, kBinary><<<g, kThreads, 0, s>>>(v, parent, total, D, H, W);
  ccl_flatten<<<g, kThreads, 0, s>>>(parent, total, N);
  ccl_count<<<blocks_for(total), kThreads, 0, s>>>(parent, count, total, N);
  ccl_best<T, kBinary><<<g, kThreads, 0, s>>>(v, parent, count, best, total, N, nc);
  return last_error();
}

// ---- fit_ellipse -----------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  return x;
}

// bbox[4 b ..] = (x0, y0, x1, y1) of the largest component of sample b (grid: (chunks, samples)).
__global__ void fit_bbox(const int32_t* parent, const unsigned long long* best, int32_t* bbox, int64_t B, int64_t H,
                         int64_t W) {
  const int64_t N = H * W;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int32_t root = best_root(best[b]);
    if (root < 0) continue;
    int32_t x0 = INT32_MAX, y0 = INT32_MAX, x1 = -1, y1 = -1;
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < N; k += int64_t(gridDim.x) * blockDim.x) {
      if (parent[b * N + k] != root) continue;
      const int32_t x = static_cast<int32_t>(k % W), y = static_cast<int32_t>(k / W);
      x0 = min(x0, x);
      x1 = max(x1, x);
      y0 = min(y0, y);
      y1 = max(y1, y);
    }
    for (int o = 16; o > 0; o >>= 1) {
      x0 = min(x0, __shfl_down_sync(0xffffffffu, x0, o));
      y0 = min(y0, __shfl_down_sync(0xffffffffu, y0, o));
      x1 = max(x1, __shfl_down_sync(0xffffffffu, x1, o));
      y1 = max(y1, __shfl_down_sync(0xffffffffu, y1, o));
    }
    if ((threadIdx.x & 31) == 0 && x1 >= 0) {
      atomicMin(&bbox[4 * b + 0], x0);
      atomicMin(&bbox[4 * b + 1], y0);
      atomicMax(&bbox[4 * b + 2], x1);
      atomicMax(&bbox[4 * b + 3], y1);
    }
  }
}

// Holes of the largest component: every pixel not in it (par2[i] = i; -1 in it) is united with its
// left and upper neighbours not in it (4-connectivity, the dual of the component's 8), one pass of
// ccl_flatten, then the roots of the groups that touch the image border are marked exterior
// (par2[root] = kExterior). What is neither in the component nor exterior is a hole.
constexpr int32_t kExterior = -2;

__global__ void ext_init(const int32_t* parent, const unsigned long long* best, int32_t* par2, int64_t total,
                         int64_t N) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / N;
    par2[i] = parent[i] == best_root(best[b]) ? -1 : static_cast<int32_t>(i - b * N);
  }
}

__global__ void ext_merge(int32_t* par2, int64_t total, int64_t H, int64_t W) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    if (par2[i] < 0) continue;
    const int64_t k = i % (H * W), x = k % W, y = k / W;
    int32_t* p = par2 + (i - k);
    if (x > 0 && p[k - 1] >= 0) unite(p, static_cast<int32_t>(k), static_cast<int32_t>(k - 1));
    if (y > 0 && p[k - W] >= 0) unite(p, static_cast<int32_t>(k), static_cast<int32_t>(k - W));
  }
}

// After ccl_flatten: every pixel not in the component points at its root, so only roots are written.
__global__ void ext_mark(int32_t* par2, int64_t total, int64_t H, int64_t W) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = i % (H * W), x = k % W, y = k / W;
    if (x != 0 && x != W - 1 && y != 0 && y != H - 1) continue;
    const int32_t r = par2[i];
    if (r >= 0) par2[i - k + r] = kExterior;
  }
}

// Pixel k of a sample (par2 of the sample; in the image, not in the component) is outside it:
// background connected to the border.
__device__ __forceinline__ bool exterior(const int32_t* par2, int64_t k) {
  const int32_t r = par2[k];
  return r == kExterior || (r >= 0 && par2[r] == kExterior);
}

__device__ __forceinline__ void frame_of(const int32_t* bb, double& cx, double& cy, double& scale) {
  cx = 0.5 * (bb[0] + bb[2]);
  cy = 0.5 * (bb[1] + bb[3]);
  scale = 0.5 * max(bb[2] - bb[0], bb[3] - bb[1]) + 0.5;
}

// Moments of the edge midpoints of the largest component, one partial per block: grid (chunks, samples),
// partials (B, chunks, 15), written for every sample with a component.
__global__ void fit_moments(const int32_t* parent, const int32_t* par2, const unsigned long long* best,
                            const int32_t* bbox, double* partials, int64_t B, int64_t H, int64_t W) {
  __shared__ double part[kThreads / 32][15];
  const int64_t N = H * W;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int32_t root = best_root(best[b]);
    if (root < 0) continue;  // the same for the whole block: no barrier is skipped by some threads only
    const int32_t* pb = par2 + b * N;
    double cx, cy, scale;
    frame_of(bbox + 4 * b, cx, cy, scale);
    const double inv = 1.0 / scale;
    ellipse::Moments m;
    ellipse::moments_zero(m);
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < N; k += int64_t(gridDim.x) * blockDim.x) {
      if (parent[b * N + k] != root) continue;
      const int64_t x = k % W, y = k / W;
      const double u = (x - cx) * inv, v = (y - cy) * inv, h = 0.5 * inv;
      // Outer edges only: the 4-neighbour is off-image or exterior (a 4-neighbour in the mask is in the
      // component, and a hole pixel is inside the filled component).
      if (x == 0 || exterior(pb, k - 1)) ellipse::moments_add(m, u - h, v);
      if (x == W - 1 || exterior(pb, k + 1)) ellipse::moments_add(m, u + h, v);
      if (y == 0 || exterior(pb, k - W)) ellipse::moments_add(m, u, v - h);
      if (y == H - 1 || exterior(pb, k + W)) ellipse::moments_add(m, u, v + h);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int j = 0; j < 15; ++j) {
      const double s = warp_sum(m.m[j]);
      if (lane == 0) part[warp][j] = s;
    }
    __syncthreads();
    if (threadIdx.x < 15) {
      double s = 0.0;
      for (int w = 0; w < kThreads / 32; ++w) s += part[w][threadIdx.x];
      partials[(b * gridDim.x + blockIdx.x) * 15 + threadIdx.x] = s;
    }
    __syncthreads();  // part is reused by the next sample
  }
}

__global__ void fit_solve(const unsigned long long* best, const int32_t* bbox, const double* partials,
                          int64_t chunks, double* params, bool* valid, int64_t B) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  double* p = params + 5 * b;
  bool ok = false;
  if (best[b] != 0) {
    ellipse::Moments m;
    ellipse::moments_zero(m);
    for (int64_t c = 0; c < chunks; ++c)
      for (int j = 0; j < 15; ++j) m.m[j] += partials[(b * chunks + c) * 15 + j];
    double cx, cy, scale;
    frame_of(bbox + 4 * b, cx, cy, scale);
    ok = ellipse::fit_from_moments(m, cx, cy, scale, p) && p[3] >= 1.0;
  }
  if (!ok)
    for (int k = 0; k < 5; ++k) p[k] = 0.0;
  valid[b] = ok;
}

__global__ void bbox_init(int32_t* bbox, int64_t B) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < 4 * B) bbox[i] = (i % 4) < 2 ? INT32_MAX : -1;
}

// fit_ellipse_points: one block; centroid, rms scale, moments, solve.
__global__ void fit_points(const double* pts, int64_t n, double* params, bool* valid) {
  __shared__ double part[kThreads / 32][15];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  auto block_sum = [&](double x) -> double {  // result valid in every thread
    x = warp_sum(x);
    if (lane == 0) part[warp][0] = x;
    __syncthreads();
    double s = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) s += part[w][0];
    __syncthreads();
    return s;
  };
  double sx = 0.0, sy = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    sx += pts[2 * i];
    sy += pts[2 * i + 1];
  }
  const double cx = block_sum(sx) / n, cy = block_sum(sy) / n;
  double ss = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double dx = pts[2 * i] - cx, dy = pts[2 * i + 1] - cy;
    ss += dx * dx + dy * dy;
  }
  const double scale = sqrt(block_sum(ss) / n);
  const bool usable = n >= 6 && ellipse::finite(scale) && scale > 1e-12;
  ellipse::Moments m;
  ellipse::moments_zero(m);
  if (usable) {
    const double inv = 1.0 / scale;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      ellipse::moments_add(m, (pts[2 * i] - cx) * inv, (pts[2 * i + 1] - cy) * inv);
  }
  for (int j = 0; j < 15; ++j) {
    const double s = warp_sum(m.m[j]);
    if (lane == 0) part[warp][j] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    ellipse::Moments tot;
    for (int j = 0; j < 15; ++j) {
      double s = 0.0;
      for (int w = 0; w < kThreads / 32; ++w) s += part[w][j];
      tot.m[j] = s;
    }
    double p[5];
    const bool ok = usable && ellipse::fit_from_moments(tot, cx, cy, scale, p);
    for (int k = 0; k < 5; ++k) params[k] = ok ? p[k] : 0.0;
    *valid = ok;
  }
}

// ---- per-pixel ops ---------------------------------------------------------------------------------

template <typename T>
__global__ void refine_kernel(const T* probs, const double* params, const bool* valid, int64_t B, int64_t H,
                              int64_t W, T threshold, T fill_base, T fill_power, T decay, T* refined,
                              uint8_t* pseudo) {
  const int64_t total = B * H * W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / (H * W), y = (i / W) % H, x = i % W;
    T r = probs[i];
    if (valid[b]) {
      const ellipse::Frame f = ellipse::make_frame(params + 5 * b);
      const T d = static_cast<T>(ellipse::distance(f, double(x), double(y)));
      r = ellipse::refine<T>(r, d, fill_base, fill_power, decay);
    }
    refined[i] = r;
    pseudo[i] = r > threshold;
  }
}

__global__ void mask_kernel(const double* params, const bool* valid, int64_t B, int64_t H, int64_t W, uint8_t* out) {
  const int64_t total = B * H * W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / (H * W), y = (i / W) % H, x = i % W;
    bool in = false;
    if (valid[b]) in = ellipse::distance(ellipse::make_frame(params + 5 * b), double(x), double(y)) <= 1.0;
    out[i] = in;
  }
}

template <typename T>
const char* refine_launch(const T* probs, const double* params, const bool* valid, int64_t B, int64_t H, int64_t W,
                          double threshold, double fill_base, double fill_power, double decay, T* refined,
                          uint8_t* pseudo, void* stream) {
  const int64_t total = B * H * W;
  if (total == 0) return nullptr;
  refine_kernel<T><<<blocks_for(total, 4), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      probs, params, valid, B, H, W, T(threshold), T(fill_base), T(fill_power), T(decay), refined, pseudo);
  return last_error();
}

// Blocks per sample of fit_bbox / fit_moments (4 pixels per thread), at least 1.
int64_t moment_chunks(int64_t N) { return std::max<int64_t>(1, (N + 4 * kThreads - 1) / (4 * kThreads)); }

}  // namespace

// ---- launchers ---------------------------------------------------------------------------------------

const char* per_sample_limit(int64_t N) {
  return N >= INT32_MAX ? "minissl: CUDA connected components expect fewer than 2^31 voxels per sample" : nullptr;
}

size_t largest_component_workspace(int64_t B, int64_t N, int64_t num_classes) {
  return sizeof(int32_t) * 2 * B * N + sizeof(unsigned long long) * B * num_classes;
}

const char* largest_component(const void* labels, void* out, int elem_size, int64_t B, int64_t D, int64_t H,
                              int64_t W, int64_t num_classes, void* workspace, void* stream) {
  const int64_t N = D * H * W, total = B * N;
  if (total == 0) return nullptr;
  if (const char* err = per_sample_limit(N)) return err;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int32_t* parent = static_cast<int32_t*>(workspace);
  int32_t* count = parent + total;
  unsigned long long* best = reinterpret_cast<unsigned long long*>(count + total);
  const unsigned g = blocks_for(total, 4);
  const char* err = nullptr;
  if (elem_size == 8) {
    const int64_t* v = static_cast<const int64_t*>(labels);
    err = label<int64_t, false>(v, parent, count, best, B, D, H, W, num_classes, s);
    if (!err) lc_write<int64_t><<<g, kThreads, 0, s>>>(v, parent, best, static_cast<int64_t*>(out), total, N, num_classes);
  } else if (elem_size == 1) {
    const uint8_t* v = static_cast<const uint8_t*>(labels);
    err = label<uint8_t, false>(v, parent, count, best, B, D, H, W, num_classes, s);
    if (!err) lc_write<uint8_t><<<g, kThreads, 0, s>>>(v, parent, best, static_cast<uint8_t*>(out), total, N, num_classes);
  } else {
    return "largest_component: expected 1- or 8-byte labels";
  }
  return err ? err : last_error();
}

size_t fit_ellipse_workspace(int64_t B, int64_t H, int64_t W) {
  // parent, count (B*N int32), best (B u64), moment partials (B x chunks x 15 f64), bbox (4 B int32)
  return sizeof(int32_t) * 2 * B * H * W + sizeof(unsigned long long) * B +
         sizeof(double) * 15 * B * moment_chunks(H * W) + sizeof(int32_t) * 4 * B;
}

const char* fit_ellipse(const uint8_t* masks, int64_t B, int64_t H, int64_t W, void* workspace, double* params,
                        bool* valid, void* stream) {
  if (B == 0) return nullptr;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t N = H * W, total = B * N;
  int32_t* parent = static_cast<int32_t*>(workspace);
  int32_t* count = parent + total;
  unsigned long long* best = reinterpret_cast<unsigned long long*>(count + total);
  const int64_t chunks = moment_chunks(N);
  double* partials = reinterpret_cast<double*>(best + B);
  int32_t* bbox = reinterpret_cast<int32_t*>(partials + 15 * B * chunks);
  if (total == 0) {
    cudaMemsetAsync(params, 0, sizeof(double) * 5 * B, s);
    cudaMemsetAsync(valid, 0, sizeof(bool) * B, s);
    return last_error();
  }
  if (const char* err = per_sample_limit(N)) return err;
  if (const char* err = label<uint8_t, true>(masks, parent, count, best, B, 1, H, W, 2, s)) return err;
  int32_t* par2 = count;  // the sizes are no longer needed: the hole labelling reuses the buffer
  const unsigned g = blocks_for(total, 4);
  ext_init<<<g, kThreads, 0, s>>>(parent, best, par2, total, N);
  ext_merge<<<g, kThreads, 0, s>>>(par2, total, H, W);
  ccl_flatten<<<g, kThreads, 0, s>>>(par2, total, N);
  ext_mark<<<g, kThreads, 0, s>>>(par2, total, H, W);
  bbox_init<<<blocks_for(4 * B), kThreads, 0, s>>>(bbox, B);
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(B < 65535 ? B : 65535));
  fit_bbox<<<grid, kThreads, 0, s>>>(parent, best, bbox, B, H, W);
  fit_moments<<<grid, kThreads, 0, s>>>(parent, par2, best, bbox, partials, B, H, W);
  fit_solve<<<blocks_for(B), kThreads, 0, s>>>(best, bbox, partials, chunks, params, valid, B);
  return last_error();
}

const char* fit_ellipse_points(const double* points, int64_t n, double* params, bool* valid, void* stream) {
  fit_points<<<1, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(points, n, params, valid);
  return last_error();
}

const char* ellipse_refine(const float* probs, const double* params, const bool* valid, int64_t B, int64_t H,
                           int64_t W, double threshold, double fill_base, double fill_power, double decay,
                           float* refined, uint8_t* pseudo, void* stream) {
  return refine_launch<float>(probs, params, valid, B, H, W, threshold, fill_base, fill_power, decay, refined, pseudo,
                              stream);
}

const char* ellipse_refine(const double* probs, const double* params, const bool* valid, int64_t B, int64_t H,
                           int64_t W, double threshold, double fill_base, double fill_power, double decay,
                           double* refined, uint8_t* pseudo, void* stream) {
  return refine_launch<double>(probs, params, valid, B, H, W, threshold, fill_base, fill_power, decay, refined, pseudo,
                               stream);
}

const char* ellipse_mask(const double* params, const bool* valid, int64_t B, int64_t H, int64_t W, uint8_t* out,
                         void* stream) {
  const int64_t total = B * H * W;
  if (total == 0) return nullptr;
  mask_kernel<<<blocks_for(total, 4), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(params, valid, B, H, W, out);
  return last_error();
}

}  // namespace cuda
}  // namespace minissl
