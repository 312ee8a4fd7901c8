// C entry points of raw-pointer launchers of cuda/launchers.h for the emulator tests that go around the
// glue (cuda/glue.h, emu/glue.cpp): connected components on virtual (address-space only) buffers in dry
// launches, sizes the glue would allocate for real; the ellipse launchers on parameters the glue refuses.
#include <cstddef>
#include <cstdint>

#include "cuda/launchers.h"

namespace cu = minissl::cuda;

extern "C" {

size_t emu_largest_component_workspace(int64_t B, int64_t N, int64_t num_classes) {
  return cu::largest_component_workspace(B, N, num_classes);
}
const char* emu_largest_component(const void* labels, void* out, int elem_size, int64_t B, int64_t D, int64_t H,
                                  int64_t W, int64_t num_classes, void* workspace) {
  return cu::largest_component(labels, out, elem_size, B, D, H, W, num_classes, workspace, nullptr);
}
const char* emu_ellipse_refine_f64(const double* probs, const double* params, const bool* valid, int64_t B, int64_t H,
                                   int64_t W, double threshold, double fill_base, double fill_power, double decay,
                                   double* refined, uint8_t* pseudo) {
  return cu::ellipse_refine(probs, params, valid, B, H, W, threshold, fill_base, fill_power, decay, refined, pseudo,
                            nullptr);
}
const char* emu_ellipse_mask(const double* params, const bool* valid, int64_t B, int64_t H, int64_t W,
                             uint8_t* out) {
  return cu::ellipse_mask(params, valid, B, H, W, out, nullptr);
}

}  // extern "C"
