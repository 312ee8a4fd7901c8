"""The real CUDA kernels of csrc/cuda/*.cu, run on the CPU by the emulator (tests/cuda_emu.py, csrc/emu/).

What passes here is proven under emulation: kernel logic, index arithmetic, barriers and warp
rendezvous, launch limits of sm_80/86/89/90. Not proven: speed, and memory-ordering effects of real
hardware. Every case stays at 16 blocks or fewer; the emulator is built once (cached by source hash).
"""
from __future__ import annotations

import ctypes
import re

import pytest
import torch

import cuda_emu
from minissl.ops import reference as R

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


@pytest.fixture(scope="session")
def lib() -> cuda_emu.Emulator:
    return cuda_emu.Emulator(cuda_emu.build())


@pytest.fixture
def emu(lib):
    lib.configure("sequential")
    lib.clear_log()
    yield lib
    lib.configure("sequential")


def ran(emu) -> list[cuda_emu.Launch]:
    return [x for x in emu.launches() if x.status == "ran"]


# ---- the rewrite ------------------------------------------------------------------------------------------

def test_rewrite_launches_and_shared():
    src = ("extern __shared__ unsigned char smem_raw[];\n  __shared__ double part[8][15];\n"
           "k<T, true><<<dim3(2, B),\n 256, n * 4, static_cast<cudaStream_t>(s)>>>(a, f(b, c));\nj<<<1, 32>>>();")
    out = cuda_emu.rewrite(src, cuda_emu.CSRC / "x.cu")
    assert "unsigned char* smem_raw = ::emu::dynamic_shared<unsigned char>();" in out
    assert "auto& part = ::emu::static_shared<double[8][15]>(&part_emu_key);" in out
    assert ('::emu::launch<k<T, true>>("k<T, true>", dim3(2, B), 256, n * 4, static_cast<cudaStream_t>(s), '
            'a, f(b, c))') in out
    assert '::emu::launch<j>("j", 1, 32, 0, nullptr);' in out
    assert out.count("\n") == src.count("\n") + 1  # line numbers kept (plus the #line directive)


# ---- emulator semantics (csrc/emu/selftest.cu) ---------------------------------------------------------------

def _call(emu, fn: str, *args):
    f = getattr(emu.lib, fn)
    f.restype = ctypes.c_char_p
    err = f(*args)
    emu.lib.emu_take_error()
    return None if err is None else err.decode()


@pytest.mark.parametrize("mode", ["sequential", "shuffled", "threads"])
def test_barrier_runs_and_names_the_kernel_when_a_thread_skips_it(emu, mode):
    emu.configure(mode, watchdog=2.0)
    out = torch.zeros(4 * 64, dtype=torch.int32)
    assert _call(emu, "selftest_barrier", ctypes.c_void_p(out.data_ptr()), 4, 64, 0, 0) is None
    assert (out == 7).all()
    err = _call(emu, "selftest_barrier", ctypes.c_void_p(out.data_ptr()), 4, 64, 1, 5)
    assert re.search(r"kernel barrier_kernel.*block \(\d, 0, 0\).*thread \(5, 0, 0\) exited without reaching "
                     r"__syncthreads #1", err), err
    err = _call(emu, "selftest_barrier", ctypes.c_void_p(out.data_ptr()), 1, 64, 2, 63)
    assert "barrier_kernel" in err and "__syncthreads #2" in err, err


def test_watchdog_names_the_kernel_in_the_os_thread_mode(emu):
    """Thread 0 exits after the first barrier while the others wait: reported, not a hang (OS threads)."""
    emu.configure("threads", watchdog=0.5)
    out = torch.zeros(32, dtype=torch.int32)
    err = _call(emu, "selftest_barrier", ctypes.c_void_p(out.data_ptr()), 1, 32, 2, 0)
    assert "barrier_kernel" in err and "__syncthreads #2" in err, err


@pytest.mark.parametrize("mode", ["sequential", "threads"])
def test_warp_intrinsics_exchange_within_each_warp(emu, mode):
    emu.configure(mode)
    out = torch.full((2, 8, 32), -1, dtype=torch.int32)
    assert _call(emu, "selftest_warp", ctypes.c_void_p(out.data_ptr()), 64, ctypes.c_uint(0x55555555)) is None
    lane = torch.arange(32)
    for w in range(2):
        o = out[w]
        assert torch.equal(o[0], (31 - lane) * 10)
        assert torch.equal(o[1], torch.where(lane < 31, lane + 1, lane) * 10)
        assert torch.equal(o[2], torch.where(lane > 0, lane - 1, lane) * 10)
        assert torch.equal(o[3], (lane ^ 5) * 10)
        assert (o[4].to(torch.int64) & 0xffffffff == 0xaaaaaaaa).all()
        assert torch.equal(o[5].to(torch.int64) & 0xffffffff, 0xf << (lane // 4 * 4))
        assert (o[6].to(torch.int64) & 0xffffffff == 0xffffffff).all()
        even = lane % 2 == 0  # butterfly sum over the even lanes of the mask: 0 + 2 + ... + 30
        assert (o[7][even] == 240).all() and (o[7][~even] == -1).all()


def test_warp_mask_must_include_the_calling_lane(emu):
    out = torch.zeros(8 * 32, dtype=torch.int32)
    err = _call(emu, "selftest_warp", ctypes.c_void_p(out.data_ptr()), 16, ctypes.c_uint(0x55555555))
    assert "warp_kernel" in err and "which the block does not have" in err, err


@pytest.mark.parametrize("mode", ["sequential", "shuffled", "threads"])
def test_atomics(emu, mode):
    emu.configure(mode)
    i32 = torch.tensor([0, 0, 0, 0, 0], dtype=torch.int32)
    u64 = torch.zeros(2, dtype=torch.int64)
    f32, f64 = torch.zeros(1), torch.zeros(1, dtype=torch.float64)
    assert _call(emu, "selftest_atomic", *(ctypes.c_void_p(t.data_ptr()) for t in (i32, u64, f32, f64)), 4, 64) is None
    n = 256
    assert i32[:3].tolist() == [n, -(n - 1), n - 1] and i32[3] >= 1 and i32[4] == 5
    assert u64.tolist() == [(n - 1) << 33, 2 * n]
    assert f32.item() == n / 2 and f64.item() == n / 4


@pytest.mark.parametrize("mode", ["sequential", "shuffled"])
def test_shared_memory_is_per_block(emu, mode):
    emu.configure(mode)
    out = torch.full((8 * 64,), -1, dtype=torch.int32)
    assert _call(emu, "selftest_shared", ctypes.c_void_p(out.data_ptr()), 8, 64, 100, -1) is None
    assert (out == 0).all()


@pytest.mark.parametrize("arch,allowed", [(80, 163 * 1024), (86, 99 * 1024), (89, 99 * 1024), (90, 227 * 1024)])
def test_dynamic_shared_memory_limits(emu, arch, allowed):
    emu.configure(arch=arch)
    out = torch.zeros(64, dtype=torch.int32)
    ptr = ctypes.c_void_p(out.data_ptr())
    assert _call(emu, "selftest_shared", ptr, 1, 64, 12 * 1024, -1) is None  # 48 KiB exactly
    err = _call(emu, "selftest_shared", ptr, 1, 64, 12 * 1024 + 1, -1)
    assert "shared_kernel" in err and "exceeds the 48 KiB" in err, err
    words = (allowed - 64 * 4) // 4  # opted in to the maximum, minus the kernel's static 256 bytes
    assert _call(emu, "selftest_shared", ptr, 1, 64, words, allowed) is None
    err = _call(emu, "selftest_shared", ptr, 1, 64, words, allowed + 1)
    assert f"sm_{arch}" in err and f"maximum of {allowed} bytes" in err, err


@pytest.mark.parametrize("dims,limit", [((1, 65536, 1, 32, 1, 1), "grid y = 65536 exceeds the limit of 65535"),
                                        ((1, 1, 65536, 32, 1, 1), "grid z = 65536 exceeds the limit of 65535"),
                                        ((1, 1, 1, 1025, 1, 1), "limit of 1024 threads per block"),
                                        ((1, 1, 1, 64, 32, 1), "limit of 1024 threads per block")])
def test_launch_limits(emu, dims, limit):
    err = _call(emu, "selftest_launch", *dims)
    assert "noop_kernel" in err and limit in err, err


def test_dry_launch_runs_only_the_corner_blocks(emu):
    emu.configure(dry=True)
    assert _call(emu, "selftest_launch", 2 ** 31 - 1, 65535, 1, 1024, 1, 1) is None
    (launch,) = emu.launches()
    assert launch.status == "dry" and launch.grid == (2 ** 31 - 1, 65535, 1)
