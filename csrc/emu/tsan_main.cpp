// ThreadSanitizer run of the kernels in the emulator's OS-thread mode (see README.md): a plain executable,
// since a sanitized library cannot be loaded into a Python that was not built for it. Runs each launcher
// family once on a small input (concurrent blocks and threads race for real) and reports errors.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/launchers.h"

extern "C" int emu_configure(int mode, int dry, int arch, unsigned long long seed, double watchdog_s);

namespace cu = minissl::cuda;

int main() {
  emu_configure(2, 0, 86, 0, 10.0);
  std::mt19937 rng(0);
  int failures = 0;
  auto check = [&](const char* what, const char* err) {
    if (err != nullptr) {
      std::printf("%s: %s\n", what, err);
      ++failures;
    }
  };
  const int64_t B = 2, H = 24, W = 24, N = H * W, C = 3;
  std::vector<int64_t> labels(B * N);
  for (auto& v : labels) v = rng() % C;
  std::vector<int64_t> out(B * N);
  std::vector<unsigned char> ws(cu::largest_component_workspace(B, N, C));
  check("largest_component", cu::largest_component(labels.data(), out.data(), 8, B, 1, H, W, C, ws.data(), nullptr));
  std::vector<uint8_t> masks(B * N);
  for (int64_t i = 0; i < B * N; ++i) {
    const double x = double(i % W) - 12, y = double(i / W % H) - 11;
    masks[i] = x * x / 64 + y * y / 25 <= 1;
  }
  std::vector<unsigned char> ws2(cu::fit_ellipse_workspace(B, H, W));
  double params[2 * 5];
  bool valid[2];
  check("fit_ellipse", cu::fit_ellipse(masks.data(), B, H, W, ws2.data(), params, valid, nullptr));
  std::vector<float> logits(B * C * N), acc(B * (3 * C + 3));
  std::vector<unsigned char> ws3(cu::dice_ce_entropy_workspace(B, C, N, sizeof(float)));
  for (auto& v : logits) v = float(rng() % 1000) / 100.0f;
  check("dice_ce_entropy_fwd", cu::dice_ce_entropy_fwd(logits.data(), labels.data(), nullptr, nullptr, B, C, N, false,
                                                       acc.data(), nullptr, ws3.data(), nullptr));
  std::printf("tsan_main: %d launcher error(s); fit_ellipse valid %d %d, a = %.3f\n", failures, valid[0], valid[1],
              params[2]);
  return failures == 0 && valid[0] && valid[1] ? 0 : 1;
}
