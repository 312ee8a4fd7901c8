#!/usr/bin/env bash
# Build the whole minissl extension -- CPU kernels, CUDA kernels and the CUDA tensor glue -- against a
# CUDA build of torch in a side virtual environment, and list which ops got CPU / CUDA kernels.
# By hand, not in CI: it needs nvcc and a few GB of disk, but no GPU (nothing is run on a device).
#
#   tools/build_cuda_side_env.sh [venv-dir]          # default /tmp/minissl-cuda-venv
#   TORCH_SPEC=torch==2.14.1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=2 tools/build_cuda_side_env.sh
set -euo pipefail
VENV=${1:-/tmp/minissl-cuda-venv}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "${TORCH_SPEC:-torch==2.14.1}" ninja numpy scipy
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(mktemp -d)} MINISSL_REQUIRE_EXT=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2}
# torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script in /usr/local/bin makes that /usr/local,
# where cuda_runtime.h is not. Point it at the toolkit unless the caller did.
if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then export CUDA_HOME=/usr/local/cuda; fi
cd "$ROOT"
PYTHONPATH="$ROOT" "$VENV/bin/python" - <<'PY'
import torch

from minissl import ops
from minissl.ops import _build

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, nvcc found: {_build.with_cuda()}")
assert _build.with_cuda(), "this torch has no CUDA, or nvcc is not on PATH"
print(ops.kernel_status())  # MINISSL_REQUIRE_EXT=1: a failed build raises
PY
