// The CUDA part of the glue: device guard and stream, then the device-agnostic glue of cuda/glue.h for
// every op (TORCH_LIBRARY_IMPL(minissl, CUDA)). Compiled by the host compiler into the CUDA extension,
// only when torch has CUDA and nvcc is found (minissl/ops/_build.py); the launchers live in cuda/*.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/glue.h"

namespace {

struct CudaDevice {
  static constexpr c10::DeviceType type = c10::DeviceType::CUDA;
  using Guard = c10::cuda::CUDAGuard;
  static void* stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
};

}  // namespace

TORCH_LIBRARY_IMPL(minissl, CUDA, m) { minissl::glue::register_ops<CudaDevice>(m); }
