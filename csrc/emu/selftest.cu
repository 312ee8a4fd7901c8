// Kernels that test the emulator itself (tests/test_cuda_emulator.py): rendezvous that some thread
// skips, warp intrinsics with full and partial masks, atomics, shared memory per block, the dynamic
// shared memory opt-in. Built only into the emulator library, never into the package.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

inline const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// mode 0: every thread reaches both barriers; 1: thread `who` returns before the first; 2: thread `who`
// calls one barrier fewer (stops after the first while the others wait at the second).
__global__ void barrier_kernel(int* out, int mode, int who) {
  __shared__ int cell[1];
  if (mode == 1 && threadIdx.x == who) return;
  if (threadIdx.x == 0) cell[0] = 7;
  __syncthreads();
  if (mode == 2 && threadIdx.x == who) return;
  out[blockIdx.x * blockDim.x + threadIdx.x] = cell[0];
  __syncthreads();
}

// Per lane: out[0..7][lane] = shfl(src 31 - lane), shfl_down 1, shfl_up 1, shfl_xor 5, ballot(odd),
// match_any(lane / 4), activemask, and the sum over the lanes of `mask` (even lanes only when mask is
// 0x55555555) with shfl_xor. Lanes outside `mask` skip the partial-mask part.
__global__ void warp_kernel(int* out, unsigned mask) {
  const int lane = threadIdx.x & 31;
  const unsigned full = 0xffffffffu;
  int* o = out + (threadIdx.x / 32) * 8 * 32;
  o[0 * 32 + lane] = __shfl_sync(full, lane * 10, 31 - lane);
  o[1 * 32 + lane] = __shfl_down_sync(full, lane * 10, 1);
  o[2 * 32 + lane] = __shfl_up_sync(full, lane * 10, 1);
  o[3 * 32 + lane] = __shfl_xor_sync(full, lane * 10, 5);
  o[4 * 32 + lane] = static_cast<int>(__ballot_sync(full, lane & 1));
  o[5 * 32 + lane] = static_cast<int>(__match_any_sync(full, lane / 4));
  o[6 * 32 + lane] = static_cast<int>(__activemask());
  __syncwarp();
  if (mask >> lane & 1u) {
    int v = lane;
    for (int k = 2; k < 32; k <<= 1) v += __shfl_xor_sync(mask, v, k);
    o[7 * 32 + lane] = v;
  }
}

// Atomics of every kind the kernels use; one slot each, every thread of every block adds.
__global__ void atomic_kernel(int* i32, unsigned long long* u64, float* f32, double* f64) {
  const int t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  atomicAdd(&i32[0], 1);
  atomicMin(&i32[1], -t);
  atomicMax(&i32[2], t);
  atomicCAS(&i32[3], t, t + 1);  // counts up 0 -> 1 -> ... only when the order allows it; checked >= 1
  atomicExch(&i32[4], 5);
  atomicMax(&u64[0], static_cast<unsigned long long>(t) << 33);
  atomicAdd(&u64[1], 2ull);
  atomicAdd(&f32[0], 0.5f);
  atomicAdd(&f64[0], 0.25);
}

// Shared memory is per block: each block fills its static and dynamic buffers with its own index and
// reads them back after a barrier (two concurrent blocks would see each other's values if it were not).
__global__ void shared_kernel(int* out, int words) {
  __shared__ int stat[64];
  extern __shared__ int dyn[];
  for (int k = threadIdx.x; k < 64; k += blockDim.x) stat[k] = static_cast<int>(blockIdx.x);
  for (int k = threadIdx.x; k < words; k += blockDim.x) dyn[k] = static_cast<int>(blockIdx.x);
  __syncthreads();
  int bad = 0;
  for (int k = 0; k < 64; ++k) bad += stat[k] != static_cast<int>(blockIdx.x);
  for (int k = 0; k < words; ++k) bad += dyn[k] != static_cast<int>(blockIdx.x);
  out[blockIdx.x * blockDim.x + threadIdx.x] = bad;
}

__global__ void noop_kernel() {}

}  // namespace

extern "C" {

const char* selftest_barrier(int* out, int blocks, int threads, int mode, int who) {
  barrier_kernel<<<blocks, threads>>>(out, mode, who);
  return last_error();
}

const char* selftest_warp(int* out, int threads, unsigned mask) {
  warp_kernel<<<1, threads>>>(out, mask);
  return last_error();
}

const char* selftest_atomic(int* i32, unsigned long long* u64, float* f32, double* f64, int blocks, int threads) {
  atomic_kernel<<<blocks, threads>>>(i32, u64, f32, f64);
  return last_error();
}

// opt_in < 0: no cudaFuncSetAttribute call.
const char* selftest_shared(int* out, int blocks, int threads, int words, int opt_in) {
  if (opt_in >= 0 &&
      cudaFuncSetAttribute(shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, opt_in) != cudaSuccess)
    return last_error();
  shared_kernel<<<blocks, threads, sizeof(int) * words>>>(out, words);
  return last_error();
}

const char* selftest_launch(int gx, int gy, int gz, int bx, int by, int bz) {
  noop_kernel<<<dim3(gx, gy, gz), dim3(bx, by, bz)>>>();
  return last_error();
}

}  // extern "C"
