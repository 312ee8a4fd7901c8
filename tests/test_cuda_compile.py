"""Every CUDA source compiles and links with plain nvcc (no GPU and no CUDA torch needed).

The .cu files include no torch headers, so nvcc alone must turn them into one shared object with no
undefined symbols. Skipped when nvcc is not on PATH.
"""
import shutil
import subprocess

import pytest

from minissl.ops import _build

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_sources_compile_and_link(tmp_path):
    sources = sorted((_build.CSRC / "cuda").glob("*.cu"))
    assert sources, "no CUDA sources found"
    so = tmp_path / "minissl_cuda_kernels.so"
    cmd = [NVCC, "-O1", "-std=c++17", "-arch=sm_90", "-Xcompiler", "-fPIC", "-shared", "-Xlinker", "--no-undefined",
           "-I", str(_build.CSRC), "-o", str(so), *map(str, sources)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}"
    assert so.stat().st_size > 0
