// Host-callable launchers of the CUDA kernels. Plain C++ (no torch, no CUDA headers): raw pointers,
// sizes and an opaque stream (a cudaStream_t passed as void*). Implemented in cuda/*.cu, called from
// cuda/bindings.cpp, which turns tensors into these arguments. Every launcher returns a CUDA error
// string, or nullptr on success.
#pragma once

#include <cstddef>
#include <cstdint>

namespace minissl {
namespace cuda {

// ---- dense.cu ------------------------------------------------------------------
// Max channels of the fused loss on CUDA (per-thread registers); more gives an error string naming C.
constexpr int kMaxClasses = 32;

// Fused Dice/CE/entropy forward. logits (B, C, N); exactly one of labels (B, N) int64 / soft (B, C, N)
// is non-null; weight (B, N) or null. acc (B, 3C'+3), C' = C, is overwritten; layout as in
// kernels/loss.h (intersect, pred_sum, target_sum, ce, entropy, weight_sum). *bad_label (device int,
// zeroed by the caller) is set to 1 when a label is out of range (may be null). workspace: device buffer
// of dice_ce_entropy_workspace(B, C, N, sizeof(T)) bytes for the per-block partial sums (fixed-order
// reduction, no float atomics: deterministic).
size_t dice_ce_entropy_workspace(int64_t B, int64_t C, int64_t N, size_t elem_size);
const char* dice_ce_entropy_fwd(const float* logits, const int64_t* labels, const float* soft,
                                const float* weight, int64_t B, int64_t C, int64_t N, bool squared,
                                float* acc, int* bad_label, void* workspace, void* stream);
const char* dice_ce_entropy_fwd(const double* logits, const int64_t* labels, const double* soft,
                                const double* weight, int64_t B, int64_t C, int64_t N, bool squared,
                                double* acc, int* bad_label, void* workspace, void* stream);

// Fused backward. grads (B, C) for gI and gP, (B,) for gCE and gH. grad_logits (B, C, N). *bad_label as
// in the forward.
const char* dice_ce_entropy_bwd(const float* gI, const float* gP, const float* gCE, const float* gH,
                                const float* logits, const int64_t* labels, const float* soft,
                                const float* weight, int64_t B, int64_t C, int64_t N, bool squared,
                                float* grad_logits, int* bad_label, void* stream);
const char* dice_ce_entropy_bwd(const double* gI, const double* gP, const double* gCE, const double* gH,
                                const double* logits, const int64_t* labels, const double* soft,
                                const double* weight, int64_t B, int64_t C, int64_t N, bool squared,
                                double* grad_logits, int* bad_label, void* stream);

// Region paste of one tensor viewed as (B, L, S_0..S_{sd-1}) with elements of elem_size bytes
// (1, 2, 4 or 8). Exactly one of boxes (B, 2 sd) int64 / blocks (B, G_0..G_{sd-1}) bool (device)
// is non-null; sizes and grid are host arrays of length sd (sd <= 3).
const char* mix(const void* a, const void* b, void* out, int64_t elem_size, int64_t B, int64_t L,
                const int64_t* sizes, const int64_t* grid, int sd, const int64_t* boxes,
                const bool* blocks, void* stream);

// ---- geometry.cu ---------------------------------------
// Workspaces are device buffers of the given byte sizes, allocated by the caller (no alignment beyond 8).

// Largest component per class of labels viewed as (B, D, H, W) (D = 1: 2D 8-conn, else 3D 26-conn),
// elements of elem_size 1 (uint8/bool) or 8 (int64); out has the same layout. Requires D*H*W < 2^31 per
// sample (any batch size).
size_t largest_component_workspace(int64_t B, int64_t N, int64_t num_classes);
const char* largest_component(const void* labels, void* out, int elem_size, int64_t B, int64_t D, int64_t H,
                              int64_t W, int64_t num_classes, void* workspace, void* stream);

// Batched ellipse fit of masks (B, H, W) (non-zero = foreground) -> params (B, 5) f64, valid (B,) bool.
// Requires H*W < 2^31.
size_t fit_ellipse_workspace(int64_t B, int64_t H, int64_t W);
const char* fit_ellipse(const uint8_t* masks, int64_t B, int64_t H, int64_t W, void* workspace, double* params,
                        bool* valid, void* stream);

// Ellipse fit of points (n, 2) f64 -> params (5,) f64, valid () bool (one block).
const char* fit_ellipse_points(const double* points, int64_t n, double* params, bool* valid, void* stream);

// ERSR refinement of probs (B, H, W) with params (B, 5) f64, valid (B,) -> refined (B, H, W), pseudo uint8.
const char* ellipse_refine(const float* probs, const double* params, const bool* valid, int64_t B, int64_t H,
                           int64_t W, double threshold, double fill_base, double fill_power, double decay,
                           float* refined, uint8_t* pseudo, void* stream);
const char* ellipse_refine(const double* probs, const double* params, const bool* valid, int64_t B, int64_t H,
                           int64_t W, double threshold, double fill_base, double fill_power, double decay,
                           double* refined, uint8_t* pseudo, void* stream);

// Filled ellipses (d <= 1 at pixel centres) -> out (B, H, W) uint8; all 0 where valid is false.
const char* ellipse_mask(const double* params, const bool* valid, int64_t B, int64_t H, int64_t W, uint8_t* out,
                         void* stream);

}  // namespace cuda
}  // namespace minissl
