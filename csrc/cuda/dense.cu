// CUDA kernels of the dense ops (fused dice_ce_entropy forward/backward, mix). Raw pointers only, no
// torch headers: the launchers declared in launchers.h are called from bindings.cpp.
//
// Forward: a grid-stride loop gives each thread a set of voxels of one sample (blockIdx.y = b); the
// thread accumulates the 3C+3 sums of kernels/loss.h in registers, the block reduces them in shared
// memory and one thread per block adds them to the output with atomicAdd. Backward: one thread per
// voxel, no reduction.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../kernels/loss.h"
#include "launchers.h"

namespace minissl {
namespace cuda {
namespace {

constexpr int kThreads = 256;

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

template <class T>
__global__ void dce_fwd_kernel(const T* logits, const int64_t* labels, const T* soft, const T* weight, int C,
                               int64_t N, bool squared, T* acc_out, int* bad) {
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);  // (K, blockDim.x)
  const int K = 3 * C + 3;
  const int64_t b = blockIdx.y;
  T z[kMaxClasses], t[kMaxClasses], p[kMaxClasses], acc[3 * kMaxClasses + 3];
  for (int k = 0; k < K; ++k) acc[k] = T(0);
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
    T w;
    load_voxel(logits, labels, soft, weight, b, n, C, N, z, t, w, bad);
    dce_forward_voxel(z, t, w, C, squared, acc, p);
  }
  for (int k = 0; k < K; ++k) smem[k * blockDim.x + threadIdx.x] = acc[k];
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      for (int k = 0; k < K; ++k) smem[k * blockDim.x + threadIdx.x] += smem[k * blockDim.x + threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    for (int k = 0; k < K; ++k) atomicAdd(acc_out + b * K + k, smem[k * blockDim.x]);
  }
}

template <class T>
__global__ void dce_bwd_kernel(const T* gI, const T* gP, const T* gCE, const T* gH, const T* logits,
                               const int64_t* labels, const T* soft, const T* weight, int C, int64_t N,
                               bool squared, T* grad) {
  const int64_t b = blockIdx.y;
  T z[kMaxClasses], t[kMaxClasses], p[kMaxClasses], gz[kMaxClasses];
  T vI[kMaxClasses], vP[kMaxClasses];
  for (int c = 0; c < C; ++c) {
    vI[c] = gI[b * C + c];
    vP[c] = gP[b * C + c];
  }
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
    T w;
    load_voxel(logits, labels, soft, weight, b, n, C, N, z, t, w, static_cast<int*>(nullptr));
    dce_backward_voxel(z, t, w, C, squared, vI, vP, gCE[b], gH[b], gz, p);
    for (int c = 0; c < C; ++c) grad[(b * C + c) * N + n] = gz[c];
  }
}

unsigned grid_x(int64_t N, int64_t B) {
  // Enough blocks to fill the GPU a few times over, fewer for small inputs.
  const int64_t want = (N + kThreads - 1) / kThreads;
  const int64_t cap = std::max<int64_t>(1, 1024 / std::max<int64_t>(B, 1));
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(want, cap)));
}

template <class T>
const char* fwd(const T* logits, const int64_t* labels, const T* soft, const T* weight, int64_t B, int64_t C,
                int64_t N, bool squared, T* acc, int* bad, void* stream) {
  if (C > kMaxClasses) return "minissl: the CUDA dice_ce_entropy supports at most 32 channels";
  if (B == 0 || N == 0) return nullptr;
  const dim3 grid(grid_x(N, B), static_cast<unsigned>(B));
  const size_t smem = size_t(3 * C + 3) * kThreads * sizeof(T);
  dce_fwd_kernel<T><<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(
      logits, labels, soft, weight, static_cast<int>(C), N, squared, acc, bad);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <class T>
const char* bwd(const T* gI, const T* gP, const T* gCE, const T* gH, const T* logits, const int64_t* labels,
                const T* soft, const T* weight, int64_t B, int64_t C, int64_t N, bool squared, T* grad,
                void* stream) {
  if (C > kMaxClasses) return "minissl: the CUDA dice_ce_entropy supports at most 32 channels";
  if (B == 0 || N == 0) return nullptr;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((N + kThreads - 1) / kThreads, 65535)),
                  static_cast<unsigned>(B));
  dce_bwd_kernel<T><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      gI, gP, gCE, gH, logits, labels, soft, weight, static_cast<int>(C), N, squared, grad);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// ---- mix: one thread per element; the source of element (s, l, x_0..x_{sd-1}) is decided per element.
struct MixArgs {
  int64_t B, L, S[3], G[3];
  int sd;
};

template <class E>
__global__ void mix_kernel(const E* a, const E* b, E* out, MixArgs g, const int64_t* boxes, const bool* blocks,
                           int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t r = i, x[3];
    for (int d = g.sd - 1; d >= 0; --d) {
      x[d] = r % g.S[d];
      r /= g.S[d];
    }
    const int64_t s = r / g.L;
    bool in_b;
    if (boxes != nullptr) {
      in_b = true;
      for (int d = 0; d < g.sd; ++d) in_b &= x[d] >= boxes[s * 2 * g.sd + d] && x[d] < boxes[s * 2 * g.sd + g.sd + d];
    } else {
      int64_t gi = s;
      for (int d = 0; d < g.sd; ++d) gi = gi * g.G[d] + x[d] / (g.S[d] / g.G[d]);
      in_b = blocks[gi];
    }
    out[i] = in_b ? b[i] : a[i];
  }
}

template <class E>
const char* mix_typed(const void* a, const void* b, void* out, const MixArgs& g, int64_t total, const int64_t* boxes,
                      const bool* blocks, void* stream) {
  const unsigned blocks_n = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
  mix_kernel<E><<<blocks_n, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const E*>(a), static_cast<const E*>(b), static_cast<E*>(out), g, boxes, blocks, total);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* dice_ce_entropy_fwd(const float* logits, const int64_t* labels, const float* soft, const float* weight,
                                int64_t B, int64_t C, int64_t N, bool squared, float* acc, int* bad, void* stream) {
  return fwd(logits, labels, soft, weight, B, C, N, squared, acc, bad, stream);
}
const char* dice_ce_entropy_fwd(const double* logits, const int64_t* labels, const double* soft,
                                const double* weight, int64_t B, int64_t C, int64_t N, bool squared, double* acc,
                                int* bad, void* stream) {
  return fwd(logits, labels, soft, weight, B, C, N, squared, acc, bad, stream);
}
const char* dice_ce_entropy_bwd(const float* gI, const float* gP, const float* gCE, const float* gH,
                                const float* logits, const int64_t* labels, const float* soft, const float* weight,
                                int64_t B, int64_t C, int64_t N, bool squared, float* grad, void* stream) {
  return bwd(gI, gP, gCE, gH, logits, labels, soft, weight, B, C, N, squared, grad, stream);
}
const char* dice_ce_entropy_bwd(const double* gI, const double* gP, const double* gCE, const double* gH,
                                const double* logits, const int64_t* labels, const double* soft,
                                const double* weight, int64_t B, int64_t C, int64_t N, bool squared, double* grad,
                                void* stream) {
  return bwd(gI, gP, gCE, gH, logits, labels, soft, weight, B, C, N, squared, grad, stream);
}

const char* mix(const void* a, const void* b, void* out, int64_t elem_size, int64_t B, int64_t L,
                const int64_t* sizes, const int64_t* grid, int sd, const int64_t* boxes, const bool* blocks,
                void* stream) {
  if (sd < 1 || sd > 3) return "minissl: mix supports 1 to 3 spatial dims";
  MixArgs g{B, L, {1, 1, 1}, {1, 1, 1}, sd};
  int64_t total = B * L;
  for (int d = 0; d < sd; ++d) {
    g.S[d] = sizes[d];
    g.G[d] = grid != nullptr ? grid[d] : 1;
    total *= sizes[d];
  }
  if (total == 0) return nullptr;
  switch (elem_size) {
    case 1: return mix_typed<uint8_t>(a, b, out, g, total, boxes, blocks, stream);
    case 2: return mix_typed<uint16_t>(a, b, out, g, total, boxes, blocks, stream);
    case 4: return mix_typed<uint32_t>(a, b, out, g, total, boxes, blocks, stream);
    case 8: return mix_typed<uint64_t>(a, b, out, g, total, boxes, blocks, stream);
    default: return "minissl: mix supports elements of 1, 2, 4 or 8 bytes";
  }
}

}  // namespace cuda
}  // namespace minissl
