// CUDA kernels of the dense ops (fused dice_ce_entropy forward/backward, mix). Raw pointers only, no
// torch headers: the launchers declared in launchers.h are called from bindings.cpp.
//
// Forward: a grid-stride loop gives each thread a set of voxels of one sample (samples stride over
// blockIdx.y, so any batch fits the grid); the thread accumulates the 3C+3 sums of kernels/loss.h in
// registers, each warp reduces them with shuffles, the block adds the per-warp partials from shared
// memory (8 x (3C+3) values: at most 6.2 KiB for C = 32 in float64) and writes one partial per sum and
// block to a workspace; a second kernel adds the partials of each sample in block order. No float atomics:
// the sums are bit-identical from run to run, always (torch.use_deterministic_algorithms needs nothing
// more). The per-thread arrays hold K class slots, the smallest of 2, 4, 8, 16, 32 that fits C.
// Backward: one thread per voxel, no reduction.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <type_traits>

#include "../kernels/loss.h"
#include "launchers.h"

namespace minissl {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGridY = 65535;

inline const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <class T>
__device__ __forceinline__ void load_voxel(const T* logits, const int64_t* labels, const T* soft, const T* weight,
                                           int64_t b, int64_t n, int C, int64_t N, T* z, T* t, T& w, int* bad) {
  for (int c = 0; c < C; ++c) z[c] = logits[(b * C + c) * N + n];
  if (labels != nullptr) {
    const int64_t lab = labels[b * N + n];
    const int64_t c_eff = C == 1 ? 2 : C;
    if ((lab < 0 || lab >= c_eff) && bad != nullptr) *bad = 1;
    if (C == 1) {
      t[0] = static_cast<T>(lab);
    } else {
      for (int c = 0; c < C; ++c) t[c] = lab == c ? T(1) : T(0);
    }
  } else {
    for (int c = 0; c < C; ++c) t[c] = soft[(b * C + c) * N + n];
  }
  w = weight != nullptr ? weight[b * N + n] : T(1);
}

// K: class slots per thread (C <= K). Shared memory: (kWarps, 3C+3) partial sums.
template <class T, int K>
__global__ void dce_fwd_kernel(const T* logits, const int64_t* labels, const T* soft, const T* weight, int C,
                               int64_t B, int64_t N, bool squared, T* partials, int* bad) {
  extern __shared__ unsigned char smem_raw[];
  T* part = reinterpret_cast<T*>(smem_raw);
  const int nk = 3 * C + 3;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T z[K], t[K], p[K], acc[3 * K + 3];
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    for (int k = 0; k < nk; ++k) acc[k] = T(0);
    for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
      T w;
      load_voxel(logits, labels, soft, weight, b, n, C, N, z, t, w, bad);
      dce_forward_voxel(z, t, w, C, squared, acc, p);
    }
    for (int k = 0; k < nk; ++k) {
      T v = acc[k];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
      if (lane == 0) part[warp * nk + k] = v;
    }
    __syncthreads();
    for (int k = threadIdx.x; k < nk; k += blockDim.x) {
      T s = T(0);
      for (int w = 0; w < kWarps; ++w) s += part[w * nk + k];
      partials[(b * gridDim.x + blockIdx.x) * nk + k] = s;
    }
    __syncthreads();  // part is reused by the next sample
  }
}

// acc[b, k] = sum over j of partials[b, j, k] in the order j = 0, 1, ... (partials: (B, blocks, nk)).
// Samples on blockIdx.y as in dce_fwd_kernel; one thread per sum.
template <class T>
__global__ void dce_reduce_kernel(const T* partials, int64_t blocks, int nk, int64_t B, T* acc) {
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    for (int k = threadIdx.x; k < nk; k += blockDim.x) {
      T s = T(0);
      for (int64_t j = 0; j < blocks; ++j) s += partials[(b * blocks + j) * nk + k];
      acc[b * nk + k] = s;
    }
  }
}

template <class T, int K>
__global__ void dce_bwd_kernel(const T* gI, const T* gP, const T* gCE, const T* gH, const T* logits,
                               const int64_t* labels, const T* soft, const T* weight, int C, int64_t B, int64_t N,
                               bool squared, T* grad, int* bad) {
  T z[K], t[K], p[K], gz[K], vI[K], vP[K];
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    for (int c = 0; c < C; ++c) {
      vI[c] = gI[b * C + c];
      vP[c] = gP[b * C + c];
    }
    for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
      T w;
      load_voxel(logits, labels, soft, weight, b, n, C, N, z, t, w, bad);
      dce_backward_voxel(z, t, w, C, squared, vI, vP, gCE[b], gH[b], gz, p);
      for (int c = 0; c < C; ++c) grad[(b * C + c) * N + n] = gz[c];
    }
  }
}

// Calls f(std::integral_constant<int, K>) with the smallest class capacity K in {2, 4, 8, 16, 32} >= C.
template <class F>
const char* with_slots(int64_t C, F&& f) {
  if (C <= 2) return f(std::integral_constant<int, 2>{});
  if (C <= 4) return f(std::integral_constant<int, 4>{});
  if (C <= 8) return f(std::integral_constant<int, 8>{});
  if (C <= 16) return f(std::integral_constant<int, 16>{});
  return f(std::integral_constant<int, 32>{});
}

const char* too_many_classes(int64_t C) {
  static thread_local char msg[160];
  std::snprintf(msg, sizeof(msg), "minissl: the CUDA dice_ce_entropy supports at most %d channels, got C = %lld",
                kMaxClasses, static_cast<long long>(C));
  return msg;
}

unsigned grid_x(int64_t N, int64_t B) {
  // Enough blocks to fill the GPU a few times over, fewer for small inputs.
  const int64_t want = (N + kThreads - 1) / kThreads;
  const int64_t cap = std::max<int64_t>(1, 1024 / std::max<int64_t>(B, 1));
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(want, cap)));
}

template <class T>
const char* fwd(const T* logits, const int64_t* labels, const T* soft, const T* weight, int64_t B, int64_t C,
                int64_t N, bool squared, T* acc, int* bad, void* workspace, void* stream) {
  if (C > kMaxClasses) return too_many_classes(C);
  if (B == 0) return nullptr;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int nk = static_cast<int>(3 * C + 3);
  if (N == 0) {
    cudaMemsetAsync(acc, 0, sizeof(T) * B * nk, s);
    return last_error();
  }
  const dim3 grid(grid_x(N, B), static_cast<unsigned>(std::min(B, kMaxGridY)));
  const size_t smem = size_t(kWarps) * nk * sizeof(T);
  T* partials = static_cast<T*>(workspace);
  const char* err = with_slots(C, [&](auto slots) {
    dce_fwd_kernel<T, decltype(slots)::value><<<grid, kThreads, smem, s>>>(logits, labels, soft, weight,
                                                                          static_cast<int>(C), B, N, squared,
                                                                          partials, bad);
    return last_error();
  });
  if (err != nullptr) return err;
  dce_reduce_kernel<T><<<dim3(1, grid.y), 128, 0, s>>>(partials, grid.x, nk, B, acc);
  return last_error();
}

template <class T>
const char* bwd(const T* gI, const T* gP, const T* gCE, const T* gH, const T* logits, const int64_t* labels,
                const T* soft, const T* weight, int64_t B, int64_t C, int64_t N, bool squared, T* grad, int* bad,
                void* stream) {
  if (C > kMaxClasses) return too_many_classes(C);
  if (B == 0 || N == 0) return nullptr;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((N + kThreads - 1) / kThreads, 65535)),
                  static_cast<unsigned>(std::min(B, kMaxGridY)));
  return with_slots(C, [&](auto slots) {
    dce_bwd_kernel<T, decltype(slots)::value><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        gI, gP, gCE, gH, logits, labels, soft, weight, static_cast<int>(C), B, N, squared, grad, bad);
    return last_error();
  });
}

// ---- mix: one thread per element; the source of element (s, l, x_0..x_{sd-1}) is decided per element. Index
// math in I = uint32 when the tensor has fewer than 2^31 elements (32-bit divisions are several times
// cheaper than 64-bit ones on the GPU), int64 otherwise; the region blocks' edge lengths come precomputed.
template <class I>
struct MixArgs {
  I L, S[3], K[3], G[3];  // channels, spatial sizes, block edges S / G, block grid
  int sd;
};

template <class E, class I>
__global__ void mix_kernel(const E* a, const E* b, E* out, MixArgs<I> g, const int64_t* boxes, const bool* blocks,
                           I total) {
  for (I i = blockIdx.x * I(blockDim.x) + threadIdx.x; i < total; i += I(gridDim.x) * blockDim.x) {
    I r = i, x[3];
    for (int d = g.sd - 1; d >= 0; --d) {
      const I q = r / g.S[d];
      x[d] = r - q * g.S[d];
      r = q;
    }
    const I s = r / g.L;
    bool in_b;
    if (boxes != nullptr) {
      const int64_t* box = boxes + int64_t(s) * 2 * g.sd;
      in_b = true;
      for (int d = 0; d < g.sd; ++d) in_b &= int64_t(x[d]) >= box[d] && int64_t(x[d]) < box[g.sd + d];
    } else {
      int64_t gi = s;
      for (int d = 0; d < g.sd; ++d) gi = gi * g.G[d] + x[d] / g.K[d];
      in_b = blocks[gi];
    }
    out[i] = in_b ? b[i] : a[i];
  }
}

template <class E, class I>
const char* mix_typed(const void* a, const void* b, void* out, int64_t L, const int64_t* S, const int64_t* G, int sd,
                      int64_t total, const int64_t* boxes, const bool* blocks, void* stream) {
  MixArgs<I> g{I(L), {1, 1, 1}, {1, 1, 1}, {1, 1, 1}, sd};
  for (int d = 0; d < sd; ++d) {
    g.S[d] = I(S[d]);
    g.G[d] = I(G[d]);
    g.K[d] = I(S[d] / G[d]);
  }
  const unsigned blocks_n = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
  mix_kernel<E, I><<<blocks_n, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const E*>(a), static_cast<const E*>(b), static_cast<E*>(out), g, boxes, blocks, I(total));
  return last_error();
}

template <class E>
const char* mix_elem(const void* a, const void* b, void* out, int64_t L, const int64_t* S, const int64_t* G, int sd,
                     int64_t total, const int64_t* boxes, const bool* blocks, void* stream) {
  // uint32 while i + grid stride (< 2^24) cannot wrap around.
  if (total < (int64_t(1) << 31)) return mix_typed<E, uint32_t>(a, b, out, L, S, G, sd, total, boxes, blocks, stream);
  return mix_typed<E, int64_t>(a, b, out, L, S, G, sd, total, boxes, blocks, stream);
}

}  // namespace

const char* dice_ce_entropy_fwd(const float* logits, const int64_t* labels, const float* soft, const float* weight,
                                int64_t B, int64_t C, int64_t N, bool squared, float* acc, int* bad,
                                void* workspace, void* stream) {
  return fwd(logits, labels, soft, weight, B, C, N, squared, acc, bad, workspace, stream);
}
const char* dice_ce_entropy_fwd(const double* logits, const int64_t* labels, const double* soft,
                                const double* weight, int64_t B, int64_t C, int64_t N, bool squared, double* acc,
                                int* bad, void* workspace, void* stream) {
  return fwd(logits, labels, soft, weight, B, C, N, squared, acc, bad, workspace, stream);
}

size_t dice_ce_entropy_workspace(int64_t B, int64_t C, int64_t N, size_t elem_size) {
  return B == 0 || N == 0 ? 0 : elem_size * B * grid_x(N, B) * (3 * C + 3);
}
const char* dice_ce_entropy_bwd(const float* gI, const float* gP, const float* gCE, const float* gH,
                                const float* logits, const int64_t* labels, const float* soft, const float* weight,
                                int64_t B, int64_t C, int64_t N, bool squared, float* grad, int* bad,
                                void* stream) {
  return bwd(gI, gP, gCE, gH, logits, labels, soft, weight, B, C, N, squared, grad, bad, stream);
}
const char* dice_ce_entropy_bwd(const double* gI, const double* gP, const double* gCE, const double* gH,
                                const double* logits, const int64_t* labels, const double* soft,
                                const double* weight, int64_t B, int64_t C, int64_t N, bool squared, double* grad,
                                int* bad, void* stream) {
  return bwd(gI, gP, gCE, gH, logits, labels, soft, weight, B, C, N, squared, grad, bad, stream);
}

const char* mix(const void* a, const void* b, void* out, int64_t elem_size, int64_t B, int64_t L,
                const int64_t* sizes, const int64_t* grid, int sd, const int64_t* boxes, const bool* blocks,
                void* stream) {
  if (sd < 1 || sd > 3) return "minissl: mix supports 1 to 3 spatial dims";
  int64_t S[3] = {1, 1, 1}, G[3] = {1, 1, 1};
  int64_t total = B * L;
  for (int d = 0; d < sd; ++d) {
    S[d] = sizes[d];
    G[d] = grid != nullptr ? grid[d] : 1;
    total *= sizes[d];
  }
  if (total == 0) return nullptr;
  switch (elem_size) {
    case 1: return mix_elem<uint8_t>(a, b, out, L, S, G, sd, total, boxes, blocks, stream);
    case 2: return mix_elem<uint16_t>(a, b, out, L, S, G, sd, total, boxes, blocks, stream);
    case 4: return mix_elem<uint32_t>(a, b, out, L, S, G, sd, total, boxes, blocks, stream);
    case 8: return mix_elem<uint64_t>(a, b, out, L, S, G, sd, total, boxes, blocks, stream);
    default: return "minissl: mix supports elements of 1, 2, 4 or 8 bytes";
  }
}

}  // namespace cuda
}  // namespace minissl
