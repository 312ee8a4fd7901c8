#!/usr/bin/env bash
# First check of the CUDA kernels on a GPU machine as it comes: no network, its own CUDA torch. Installs
# minissl in place, builds the two extensions (CPU kernels, then CUDA kernels), runs the CUDA tests (the
# anchors MONAI and medpy are skipped when absent), captures the loss and mix in a CUDA graph (no host
# synchronisation in the hot path) and times every op on the GPU against its reference. Under five minutes.
#
#   tools/gpu_check.sh            # from anywhere; logs to stdout
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export MINISSL_REQUIRE_EXT=1 MAX_JOBS=${MAX_JOBS:-8}
if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then export CUDA_HOME=/usr/local/cuda; fi
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi
timeout 120 pip install -q --no-deps --no-build-isolation -e .

tests=(tests/test_kernels_dense.py tests/test_kernels_geometry.py tests/test_build.py tests/test_cuda_compile.py
       tests/test_cuda_emulator.py)
for anchor in "monai tests/test_losses.py" "medpy tests/test_evaluate.py"; do
  set -- $anchor
  if python -c "import $1" 2>/dev/null; then tests+=("$2"); else echo "anchor $1 absent: $2 skipped"; fi
done
start=$(date +%s)
timeout 200 python -m pytest -q -x -p no:cacheprovider "${tests[@]}"
echo "build + CUDA tests: $(( $(date +%s) - start )) s"

timeout 60 python - <<'PY'
"""No host synchronisation in the hot path: the loss and mix run inside a CUDA graph capture."""
import torch

from minissl import ops

print(ops.kernel_status())
dev = torch.device("cuda")
logits = torch.randn(2, 4, 32, 32, 32, device=dev)  # (B, C, D, H, W)
labels = torch.randint(0, 4, (2, 32, 32, 32), device=dev)
boxes = torch.tensor([[1, 2, 3, 20, 21, 22]] * 2, device=dev)
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    for _ in range(2):  # warm-up outside the capture (allocator, lazy module loading)
        ops.dice_ce_entropy(logits, labels), ops.mix([logits], [logits.flip(0)], boxes=boxes)
torch.cuda.current_stream().wait_stream(side)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    stats = ops.dice_ce_entropy(logits, labels)
    (mixed,) = ops.mix([logits], [logits.flip(0)], boxes=boxes)
graph.replay()
torch.cuda.synchronize()
torch.testing.assert_close(stats.ce, ops.dice_ce_entropy(logits, labels).ce)
assert torch.equal(mixed, ops.mix([logits], [logits.flip(0)], boxes=boxes)[0])
print("CUDA graph capture of dice_ce_entropy and mix: ok")
PY

timeout 60 python - <<'PY'
"""GPU time of each op (CUDA kernel) and of its reference on the same CUDA tensors, median of 20."""
import time

import torch

from minissl import ops
from minissl.ops import reference as R

dev = torch.device("cuda")
g = torch.Generator(device=dev).manual_seed(0)


def ms(fn, *args, **kw) -> float:
    fn(*args, **kw)
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        fn(*args, **kw)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


logits = torch.randn(8, 4, 96, 96, 96, device=dev, generator=g)  # (B, C, D, H, W)
labels = torch.randint(0, 4, (8, 96, 96, 96), device=dev, generator=g)
masks = (torch.rand(32, 256, 256, device=dev, generator=g) > 0.5).to(torch.uint8)  # (B, H, W)
blob = torch.zeros(32, 256, 256, dtype=torch.uint8, device=dev)
blob[:, 60:200, 40:220] = 1
params, valid = ops.fit_ellipse(blob)
probs = torch.rand(32, 256, 256, device=dev, generator=g)
boxes = torch.tensor([[10, 20, 30, 60, 70, 80]] * 8, device=dev)
cases = [
    ("dice_ce_entropy (8, 4, 96^3)", ops.dice_ce_entropy, R.dice_ce_entropy, (logits, labels)),
    ("mix (8, 4, 96^3) boxes", lambda a, b: ops.mix(a, b, boxes=boxes), lambda a, b: R.mix(a, b, boxes=boxes),
     ([logits], [logits.flip(0)])),
    ("largest_component (32, 256^2)", ops.largest_component, R.largest_component, (masks,)),
    ("fit_ellipse (32, 256^2)", ops.fit_ellipse, R.fit_ellipse, (blob,)),
    ("ellipse_refine (32, 256^2)", ops.ellipse_refine, R.ellipse_refine, (probs, params, valid)),
]
print(f"| op | kernel (ms) | reference (ms) | ratio |\n|---|---:|---:|---:|")
for name, op, ref, args in cases:
    a, b = ms(op, *args), ms(ref, *args)
    print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.1f}x |")
PY
echo "gpu_check: done in $(( $(date +%s) - start )) s after install"
