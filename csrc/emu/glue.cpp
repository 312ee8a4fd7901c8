// The device-agnostic glue of cuda/glue.h on the emulator (tests only): the ops of schemas.h under the
// namespace minissl_emu, for CPU tensors, running the checks, workspaces and flags of the real CUDA path
// and then the launchers of cuda/*.cu compiled as C++ (libminissl_emu.so, see tests/cuda_emu.py). No
// device guard; the stream is the emulator's default (null) stream.
#include "cuda/glue.h"
#include "schemas.h"

namespace {

struct EmulatedDevice {
  static constexpr c10::DeviceType type = c10::DeviceType::CPU;
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static void* stream(const at::Tensor&) { return nullptr; }
};

}  // namespace

TORCH_LIBRARY(minissl_emu, m) { minissl::define_ops(m); }
TORCH_LIBRARY_IMPL(minissl_emu, CPU, m) { minissl::glue::register_ops<EmulatedDevice>(m); }
