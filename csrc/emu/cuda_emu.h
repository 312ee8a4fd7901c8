// CUDA emulation header: lets the unchanged kernels of csrc/cuda/*.cu compile as plain C++ and run on
// the CPU (tests only; see csrc/emu/README.md). A .cu file is compiled with -I csrc/emu/include, so its
// `#include <cuda_runtime.h>` lands here; tests/cuda_emu.py rewrites only what C++ cannot parse:
//   kernel<<<grid, block, smem, stream>>>(args)  ->  ::emu::launch<kernel>("kernel", grid, block, smem, stream, args)
//   extern __shared__ T name[];                  ->  T* name = ::emu::dynamic_shared<T>();
//   __shared__ T name[N]...;                     ->  static char k; auto& name = ::emu::static_shared<T[N]...>(&k);
// Everything else (qualifiers, threadIdx/blockIdx/blockDim/gridDim, dim3, intrinsics, atomics, the
// runtime calls the launchers use) is defined below and implemented in csrc/emu/runtime.cpp.
//
// Semantics: every thread of a block runs to completion on its own fiber (or, in the OS-thread mode, on
// one of a reused set of OS threads); __syncthreads and the warp intrinsics are real rendezvous of the
// participating threads, checked strictly: a thread that exits or stops at another barrier while the
// others wait is an error naming the kernel and the block, never a hang.
#pragma once

// Every standard header the kernels may use comes before __CUDACC__ is defined (some system headers
// change behaviour under it); later includes of the same headers are then no-ops.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// The kernel sources see the device compiler's view (common.h keeps torch headers out under __CUDACC__).
#define __CUDACC__ 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __restrict__ __restrict

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

namespace emu {

// Where the current CUDA thread stands: set by the scheduler before it resumes a thread.
struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
ThreadState& current();

// Type-erased launch: checks the limits, logs the launch and runs `body` once per thread of every block.
void launch_erased(const char* name, const void* func, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   const std::function<void()>& body);

// The rewrite turns `kernel<<<grid, block, smem, stream>>>(args)` into `launch<kernel>("kernel", grid, ...)`;
// the instance name (template arguments resolved) comes from __PRETTY_FUNCTION__.
std::string instance_name(const char* pretty);

template <auto K, class... P, class... A>
void launch_with(void (*)(P...), const char* text, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                 A&&... args) {
  // Arguments are converted once to the kernel's parameter types (by value, as a real launch copies them).
  std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(std::forward<A>(args))...);
  static const std::string name = std::string(text) + " = " + instance_name(__PRETTY_FUNCTION__);
  launch_erased(name.c_str(), reinterpret_cast<const void*>(K), grid, block, smem, stream,
                [&] { std::apply(K, params); });
}

template <auto K, class... A>
void launch(const char* text, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
  launch_with<K>(K, text, grid, block, smem, stream, std::forward<A>(args)...);
}

// Per-block shared memory: the dynamic buffer of the launch and one slot per static __shared__ variable.
void* dynamic_shared_raw();
void* static_shared_raw(const void* key, size_t bytes, size_t align);

template <class T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_raw());
}

template <class T>
T& static_shared(const void* key) {
  return *static_cast<T*>(static_shared_raw(key, sizeof(T), alignof(T)));
}

// Rendezvous of the block / of the lanes of `mask` in the current warp.
void syncthreads();
void syncwarp(unsigned mask);
// Each lane of `mask` publishes 8 bytes and gets the 32 slots of its warp once every lane of `mask` has
// published; warp_exchange_done() then waits until every lane has read them.
uint64_t* warp_exchange(unsigned mask, uint64_t mine);
void warp_exchange_done(unsigned mask);
unsigned active_mask();
unsigned lane_id();
[[noreturn]] void fail(const std::string& what);
// Called around every atomic: the shuffled mode may switch threads here to vary the interleaving.
void atomic_point();

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp exchange of at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <class T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

template <class T>
T shfl_from(unsigned mask, T v, unsigned src) {
  const uint64_t* slots = warp_exchange(mask, to_bits(v));
  if (!(mask >> src & 1u)) fail("__shfl_*_sync reads lane " + std::to_string(src) + " outside the mask");
  const T out = from_bits<T>(slots[src]);
  warp_exchange_done(mask);
  return out;
}

}  // namespace emu

#define threadIdx (::emu::current().thread_idx)
#define blockIdx (::emu::current().block_idx)
#define blockDim (::emu::current().block_dim)
#define gridDim (::emu::current().grid_dim)
#define warpSize 32

inline void __syncthreads() { ::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::syncwarp(mask); }
inline unsigned __activemask() { return ::emu::active_mask(); }

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const unsigned lane = ::emu::lane_id();
  return ::emu::shfl_from(mask, v, (lane & ~unsigned(width - 1)) + (unsigned(src) & unsigned(width - 1)));
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const unsigned lane = ::emu::lane_id();
  const bool inside = (lane & unsigned(width - 1)) + delta < unsigned(width);
  return ::emu::shfl_from(mask, v, inside ? lane + delta : lane);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const unsigned lane = ::emu::lane_id();
  const bool inside = (lane & unsigned(width - 1)) >= delta;
  return ::emu::shfl_from(mask, v, inside ? lane - delta : lane);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const unsigned lane = ::emu::lane_id();
  const unsigned src = lane ^ unsigned(lane_mask);
  const bool inside = (src & ~unsigned(width - 1)) == (lane & ~unsigned(width - 1));
  return ::emu::shfl_from(mask, v, inside ? src : lane);
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  const uint64_t* slots = ::emu::warp_exchange(mask, pred != 0);
  unsigned out = 0;
  for (unsigned l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && slots[l]) out |= 1u << l;
  ::emu::warp_exchange_done(mask);
  return out;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

template <class T>
unsigned __match_any_sync(unsigned mask, T v) {
  const uint64_t mine = ::emu::to_bits(v);
  const uint64_t* slots = ::emu::warp_exchange(mask, mine);
  unsigned out = 0;
  for (unsigned l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && slots[l] == mine) out |= 1u << l;
  ::emu::warp_exchange_done(mask);
  return out;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Device min/max of the CUDA math library (integer and floating overloads by promotion).
template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) {
  return a < b ? a : b;
}
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a > b ? a : b;
}

// Atomics on global or shared memory through std::atomic_ref (int, unsigned, unsigned long long, float,
// double as the kernels use them); each returns the old value, as CUDA's do.
template <class T, class U>
T atomicAdd(T* p, U v) {
  ::emu::atomic_point();
  const T old = std::atomic_ref<T>(*p).fetch_add(static_cast<T>(v));
  ::emu::atomic_point();
  return old;
}
template <class T, class U>
T atomicSub(T* p, U v) {
  ::emu::atomic_point();
  const T old = std::atomic_ref<T>(*p).fetch_sub(static_cast<T>(v));
  ::emu::atomic_point();
  return old;
}
template <class T, class U>
T atomicExch(T* p, U v) {
  ::emu::atomic_point();
  const T old = std::atomic_ref<T>(*p).exchange(static_cast<T>(v));
  ::emu::atomic_point();
  return old;
}
template <class T, class U, class V>
T atomicCAS(T* p, U expected, V desired) {
  ::emu::atomic_point();
  T e = static_cast<T>(expected);
  std::atomic_ref<T>(*p).compare_exchange_strong(e, static_cast<T>(desired));
  ::emu::atomic_point();
  return e;
}
template <class T, class U>
T atomicMin(T* p, U v) {
  ::emu::atomic_point();
  std::atomic_ref<T> r(*p);
  T old = r.load();
  while (static_cast<T>(v) < old && !r.compare_exchange_weak(old, static_cast<T>(v))) {
  }
  ::emu::atomic_point();
  return old;
}
template <class T, class U>
T atomicMax(T* p, U v) {
  ::emu::atomic_point();
  std::atomic_ref<T> r(*p);
  T old = r.load();
  while (static_cast<T>(v) > old && !r.compare_exchange_weak(old, static_cast<T>(v))) {
  }
  ::emu::atomic_point();
  return old;
}

// Host runtime calls used by the launchers.
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream = nullptr);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
namespace emu {
cudaError_t set_max_dynamic_smem(const void* func, int value);
}
template <class F>
cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return ::emu::set_max_dynamic_smem(reinterpret_cast<const void*>(func), value);
}
