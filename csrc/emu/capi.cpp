// C entry points of the raw-pointer launchers of cuda/launchers.h for the emulator tests (ctypes cannot
// call overloaded C++ functions): one function per launcher and dtype, same arguments, same error string.
#include <cstddef>
#include <cstdint>

#include "cuda/launchers.h"

namespace cu = minissl::cuda;

extern "C" {

const char* emu_dce_fwd_f32(const float* logits, const int64_t* labels, const float* soft, const float* weight,
                            int64_t B, int64_t C, int64_t N, bool squared, float* acc, int* bad) {
  return cu::dice_ce_entropy_fwd(logits, labels, soft, weight, B, C, N, squared, acc, bad, nullptr);
}
const char* emu_dce_fwd_f64(const double* logits, const int64_t* labels, const double* soft, const double* weight,
                            int64_t B, int64_t C, int64_t N, bool squared, double* acc, int* bad) {
  return cu::dice_ce_entropy_fwd(logits, labels, soft, weight, B, C, N, squared, acc, bad, nullptr);
}
const char* emu_dce_bwd_f32(const float* gI, const float* gP, const float* gCE, const float* gH, const float* logits,
                            const int64_t* labels, const float* soft, const float* weight, int64_t B, int64_t C,
                            int64_t N, bool squared, float* grad) {
  return cu::dice_ce_entropy_bwd(gI, gP, gCE, gH, logits, labels, soft, weight, B, C, N, squared, grad, nullptr);
}
const char* emu_dce_bwd_f64(const double* gI, const double* gP, const double* gCE, const double* gH,
                            const double* logits, const int64_t* labels, const double* soft, const double* weight,
                            int64_t B, int64_t C, int64_t N, bool squared, double* grad) {
  return cu::dice_ce_entropy_bwd(gI, gP, gCE, gH, logits, labels, soft, weight, B, C, N, squared, grad, nullptr);
}
const char* emu_mix(const void* a, const void* b, void* out, int64_t elem_size, int64_t B, int64_t L,
                    const int64_t* sizes, const int64_t* grid, int sd, const int64_t* boxes, const bool* blocks) {
  return cu::mix(a, b, out, elem_size, B, L, sizes, grid, sd, boxes, blocks, nullptr);
}
size_t emu_largest_component_workspace(int64_t B, int64_t N, int64_t num_classes) {
  return cu::largest_component_workspace(B, N, num_classes);
}
const char* emu_largest_component(const void* labels, void* out, int elem_size, int64_t B, int64_t D, int64_t H,
                                  int64_t W, int64_t num_classes, void* workspace) {
  return cu::largest_component(labels, out, elem_size, B, D, H, W, num_classes, workspace, nullptr);
}
size_t emu_fit_ellipse_workspace(int64_t B, int64_t H, int64_t W) { return cu::fit_ellipse_workspace(B, H, W); }
const char* emu_fit_ellipse(const uint8_t* masks, int64_t B, int64_t H, int64_t W, void* workspace, double* params,
                            bool* valid) {
  return cu::fit_ellipse(masks, B, H, W, workspace, params, valid, nullptr);
}
const char* emu_fit_ellipse_points(const double* points, int64_t n, double* params, bool* valid) {
  return cu::fit_ellipse_points(points, n, params, valid, nullptr);
}
const char* emu_ellipse_refine_f32(const float* probs, const double* params, const bool* valid, int64_t B, int64_t H,
                                   int64_t W, double threshold, double fill_base, double fill_power, double decay,
                                   float* refined, uint8_t* pseudo) {
  return cu::ellipse_refine(probs, params, valid, B, H, W, threshold, fill_base, fill_power, decay, refined, pseudo,
                            nullptr);
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
