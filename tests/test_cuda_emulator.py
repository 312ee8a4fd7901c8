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


# ---- every op's CUDA path against minissl/ops/reference.py -----------------------------------------------------

def _dce_inputs(B, C, S, dtype, target, weighted, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, *S, generator=g, dtype=dtype) * 3  # (B, C, *S)
    if target == "hard":
        t = torch.randint(0, max(C, 2), (B, *S), generator=g)  # (B, *S)
    else:
        t = torch.rand(B, C, *S, generator=g, dtype=dtype)  # (B, C, *S)
    w = torch.rand(B, *S, generator=g, dtype=dtype) if weighted else None  # (B, *S)
    return logits, t, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,S,target,weighted,squared", [
    (2, 3, (8, 8), "hard", False, False),
    (1, 2, (5, 7), "soft", True, True),
    (2, 1, (4, 4, 4), "hard", True, False),
    (1, 1, (1, 1), "soft", False, True),  # single pixel
    (2, 9, (6, 6), "hard", True, True),
    (1, 32, (16, 16), "soft", True, False),
    (1, 32, (3, 5, 7), "hard", False, True),
])
def test_dice_ce_entropy_forward_and_backward(emu, dtype, B, C, S, target, weighted, squared):
    logits, t, w = _dce_inputs(B, C, S, dtype, target, weighted)
    got = emu.dice_ce_entropy(logits, t, w, squared=squared)
    x = logits.clone().requires_grad_(True)
    ref = R.dice_ce_entropy(x, t, w, squared=squared)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.detach(), **TOL[dtype])
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(r.shape, generator=g, dtype=dtype) for r in ref]
    torch.autograd.backward([ref[k] for k in (0, 1, 3, 4)], [grads[k] for k in (0, 1, 3, 4)])
    gl = emu.dice_ce_entropy_backward([grads[0], grads[1], grads[3], grads[4]], logits, t, w, squared=squared)
    torch.testing.assert_close(gl, x.grad, **TOL[dtype])
    assert all(x.grid[0] * x.grid[1] <= 16 for x in emu.launches())


def test_loss_bad_label_is_a_device_flag_not_a_host_read(emu, monkeypatch):
    """Finding 5 (and the label range of finding 2): the glue read the flag with .item() (a synchronisation per
    call); now an out-of-range label turns the statistics and the gradient NaN on the device, and the host
    check (a ValueError naming the range) runs only with MINISSL_DEBUG_CHECKS=1."""
    logits, t, _ = _dce_inputs(2, 3, (4, 4), torch.float32, "hard", False)
    t[0, 1, 2] = 3
    grads = [torch.ones(2, 3)] * 2 + [torch.ones(2)] * 2
    monkeypatch.delenv("MINISSL_DEBUG_CHECKS", raising=False)
    stats = emu.dice_ce_entropy(logits, t)
    assert all(bool(s.isnan().all()) for s in stats)
    assert bool(emu.dice_ce_entropy_backward(grads, logits, t).isnan().all())
    monkeypatch.setenv("MINISSL_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match=r"expected labels in \[0, 3\) for 3 channel logits, got values in \[0, 3\]"):
        emu.dice_ce_entropy(logits, t)
    with pytest.raises(ValueError, match=r"expected labels in \[0, 3\)"):
        emu.dice_ce_entropy_backward(grads, logits, t)
    t[0, 1, 2] = 2
    stats = emu.dice_ce_entropy(logits, t)
    assert not any(bool(s.isnan().any()) for s in stats)


def test_mix_does_not_read_the_boxes_on_the_host(emu, monkeypatch):
    """Finding 5: the glue copied the boxes back to the host to check them (the public function checks them
    where they were made); out-of-range boxes only compare coordinates in the kernel, never index memory."""
    a, b = torch.zeros(2, 6, 5), torch.ones(2, 6, 5)  # (B, H, W)
    boxes = torch.tensor([[1, 2, 9, 4], [0, 0, 2, 2]])  # hi 9 > H = 6: pastes rows 1..5
    monkeypatch.delenv("MINISSL_DEBUG_CHECKS", raising=False)
    (out,) = emu.mix([a], [b], boxes=boxes)
    (ref,) = R.mix([a], [b], boxes=torch.tensor([[1, 2, 6, 4], [0, 0, 2, 2]]))
    assert torch.equal(out, ref)
    monkeypatch.setenv("MINISSL_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match=r"expected 0 <= lo <= hi <= 6 on spatial dim 0, got box \(1, 9\) for sample 0"):
        emu.mix([a], [b], boxes=boxes)


def test_loss_backward_checks_its_gradients_through_the_glue(emu):
    """Finding 2: shape and dtype of the output gradients, checked in csrc/checks.h for both backends."""
    logits, t, _ = _dce_inputs(2, 3, (4, 4), torch.float32, "hard", False)
    g2, g1 = torch.ones(2, 3), torch.ones(2)
    with pytest.raises(ValueError, match=r"expected a \(2, 3\) gradient, got \[3, 2\]"):
        emu.ops.dice_ce_entropy_backward(g2.t(), g2, g1, g1, logits, t, None, False)
    with pytest.raises(ValueError, match=r"expected a \(2,\) gradient, got \[1\]"):
        emu.ops.dice_ce_entropy_backward(g2, g2, g1[:1], g1, logits, t, None, False)
    with pytest.raises(ValueError, match="expected every gradient of dtype Float .the logits' dtype., got Double"):
        emu.ops.dice_ce_entropy_backward(g2, g2.double(), g1, g1, logits, t, None, False)


def test_loss_and_ellipse_sums_are_bit_identical_in_the_shuffled_mode(emu):
    """Finding 6: float atomics in the loss sums and the ellipse moments made the last bits depend on the
    block order; per-block partials added in block order give the same bits for every order."""
    logits, t, w = _dce_inputs(2, 3, (40, 40), torch.float32, "hard", True)  # 7 blocks per sample
    masks = _ellipse_masks(2, 64, 64, seed=0)  # 4 blocks per sample
    runs = []
    torch.use_deterministic_algorithms(True)
    try:
        for seed in range(6):
            emu.configure("shuffled", seed=seed)
            runs.append((*emu.dice_ce_entropy(logits, t, w), *emu.fit_ellipse(masks)))
    finally:
        torch.use_deterministic_algorithms(False)
    assert {x.grid for x in emu.launches() if x.name in ("dce_fwd_kernel", "fit_moments")} == {(7, 2, 1), (4, 2, 1)}
    for run in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(runs[0], run))


@pytest.mark.parametrize("elem", [torch.uint8, torch.int16, torch.float32, torch.float64])
@pytest.mark.parametrize("sd", [1, 2, 3])
def test_mix_boxes_and_blocks(emu, elem, sd):
    g = torch.Generator().manual_seed(sd)
    S = (12, 8, 4)[:sd]
    a = [torch.randint(0, 100, (3, 2, *S), generator=g).to(elem), torch.randint(0, 100, (3, *S), generator=g).to(elem)]
    b = [torch.randint(0, 100, x.shape, generator=g).to(elem) for x in a]
    lo = torch.stack([torch.randint(0, s, (3,), generator=g) for s in S], 1)  # (3, sd)
    hi = torch.minimum(lo + torch.randint(0, 6, lo.shape, generator=g), torch.tensor(S))
    hi[0] = lo[0]  # an empty box
    boxes = torch.cat([lo, hi], 1)  # (3, 2 sd)
    for got, ref in zip(emu.mix(a, b, boxes=boxes), R.mix(a, b, boxes=boxes)):
        assert torch.equal(got, ref)
    blocks = torch.rand(3, *(s // 4 for s in S), generator=g) > 0.5  # (3, *G)
    for got, ref in zip(emu.mix(a, b, blocks=blocks), R.mix(a, b, blocks=blocks)):
        assert torch.equal(got, ref)


def _random_labels(shape, classes, density, seed, dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(1, classes, shape, generator=g) * (torch.rand(shape, generator=g) < density)
    return lab.to(dtype)


@pytest.mark.parametrize("mode", ["sequential", "shuffled", "threads"])
@pytest.mark.parametrize("shape,classes,dtype", [
    ((3, 24, 24), 4, torch.int64),
    ((2, 6, 10, 12), 3, torch.uint8),
    ((2, 20, 20), 2, torch.bool),
    ((1, 1, 1), 3, torch.int64),  # single pixel
])
def test_largest_component(emu, mode, shape, classes, dtype):
    emu.configure(mode, seed=3)
    for seed, density in [(0, 0.5), (1, 0.3), (2, 0.0)]:  # density 0: empty masks
        lab = _random_labels(shape, classes, density, seed, dtype)
        assert torch.equal(emu.largest_component(lab, classes), R.largest_component(lab, classes))


def _ellipse_masks(B, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    out = []
    for _ in range(B):
        cx, cy = (torch.rand(2, generator=g, dtype=torch.float64) * 0.4 + 0.3) * torch.tensor([W, H])
        a, b = torch.rand(2, generator=g, dtype=torch.float64) * 6 + 4
        t = torch.rand((), generator=g, dtype=torch.float64) * 3.14
        xr = (xx - cx) * torch.cos(t) + (yy - cy) * torch.sin(t)
        yr = -(xx - cx) * torch.sin(t) + (yy - cy) * torch.cos(t)
        m = (xr / a) ** 2 + (yr / b) ** 2 <= 1  # (H, W)
        m |= torch.rand(H, W, generator=g) < 0.03  # specks: smaller components
        m[int(cy), int(cx)] = False  # a hole
        out.append(m)
    return torch.stack(out).to(torch.uint8)  # (B, H, W)


@pytest.mark.parametrize("mode", ["sequential", "shuffled"])
def test_fit_ellipse(emu, mode):
    emu.configure(mode, seed=5)
    masks = _ellipse_masks(4, 32, 40, seed=0)
    masks[2] = 0  # empty
    masks[3] = 0
    masks[3, 5, 7] = 1  # single pixel
    params, valid = emu.fit_ellipse(masks)
    rp, rv = R.fit_ellipse(masks)
    assert torch.equal(valid, rv) and valid.tolist() == [True, True, False, False]
    torch.testing.assert_close(params, rp, rtol=1e-7, atol=1e-7)


def test_fit_ellipse_points(emu):
    g = torch.Generator().manual_seed(0)
    t = torch.rand(40, generator=g, dtype=torch.float64) * 6.28
    pts = torch.stack([5 + 7 * torch.cos(t), -2 + 3 * torch.sin(t)], 1) @ torch.tensor([[0.8, 0.6], [-0.6, 0.8]],
                                                                                        dtype=torch.float64)
    for p in (pts, pts[:5], pts[:1], torch.zeros(0, 2, dtype=torch.float64), torch.ones(10, 2, dtype=torch.float64)):
        params, valid = emu.fit_ellipse_points(p)
        rp, rv = R.fit_ellipse_points(p)
        assert bool(valid) == bool(rv)
        torch.testing.assert_close(params, rp, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ellipse_refine_and_mask(emu, dtype):
    g = torch.Generator().manual_seed(0)
    params = torch.tensor([[10.0, 8.0, 7.0, 4.0, 0.5], [3.0, 3.0, 2.5, 1.0, 2.0], [0, 0, 0, 0, 0]],
                          dtype=torch.float64)
    valid = torch.tensor([True, True, False])
    probs = torch.rand(3, 16, 20, generator=g, dtype=dtype)
    for kw in ({}, dict(threshold=0.3, fill_base=0.2, fill_power=1.5, decay=2.0)):
        refined, pseudo = emu.ellipse_refine(probs, params, valid, **kw)
        rr, rps = R.ellipse_refine(probs, params, valid, **kw)
        torch.testing.assert_close(refined, rr, **TOL[dtype])
        assert torch.equal(pseudo, rps)
    assert torch.equal(emu.ellipse_mask(params, valid, (16, 20)), R.ellipse_mask(params, valid, (16, 20)))
    assert emu.ellipse_mask(params, valid, (1, 1)).shape == (3, 1, 1)


def test_every_global_kernel_runs(emu):
    """One small case per op; the launch log must show every __global__ kernel of csrc/cuda/*.cu."""
    kernels = set()
    for cu in (cuda_emu.CSRC / "cuda").glob("*.cu"):
        kernels |= cuda_emu.global_kernels(cu.read_text(encoding="utf-8"))
    for dtype, target in ((torch.float32, "hard"), (torch.float64, "soft")):
        logits, t, w = _dce_inputs(2, 3, (4, 4), dtype, target, True)
        stats = emu.dice_ce_entropy(logits, t, w)
        emu.dice_ce_entropy_backward([torch.ones_like(stats[0])] * 2 + [torch.ones_like(stats[3])] * 2, logits, t, w)
    a, b = [torch.zeros(2, 8, 8)], [torch.ones(2, 8, 8)]
    emu.mix(a, b, boxes=torch.tensor([[0, 0, 4, 4], [1, 1, 2, 2]]))
    emu.largest_component(_random_labels((2, 8, 8), 3, 0.5, 0), 3)
    emu.largest_component(_random_labels((2, 8, 8), 3, 0.5, 0, torch.uint8), 3)
    params, valid = emu.fit_ellipse(_ellipse_masks(2, 24, 24, 0))
    emu.fit_ellipse_points(torch.randn(20, 2, dtype=torch.float64))
    emu.ellipse_refine(torch.rand(2, 24, 24), params, valid)
    emu.ellipse_mask(params, valid, (24, 24))
    assert not [x for x in emu.launches() if x.status != "ran"]
    assert kernels and kernels == {x.name for x in emu.launches()}


# ---- review findings in the kernels ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", [80, 86, 89, 90])
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_forward_fits_the_default_shared_memory_for_every_channel_count(emu, arch, dtype):
    """Finding 1: (3C + 3) * 256 * sizeof(T) bytes of dynamic shared memory failed for C >= 16 (f32) / 8 (f64)."""
    emu.configure(arch=arch)
    for C in (1, 2, 7, 8, 9, 15, 16, 17, 31, 32):  # the old limits: f64 from C = 8, f32 from C = 16
        logits, t, _ = _dce_inputs(1, C, (3, 3), dtype, "hard", False)
        got = emu.dice_ce_entropy(logits, t)
        torch.testing.assert_close(got[3], R.dice_ce_entropy(logits, t).ce, **TOL[dtype])
    assert max(x.smem for x in emu.launches()) <= 48 * 1024


def test_loss_refuses_more_than_32_channels_with_a_clear_error(emu):
    logits, t, _ = _dce_inputs(1, 33, (3, 3), torch.float32, "hard", False)
    with pytest.raises(cuda_emu.EmulatorError, match="at most 32 channels, got C = 33"):
        emu.dice_ce_entropy(logits, t)
    with pytest.raises(cuda_emu.EmulatorError, match="at most 32 channels, got C = 33"):
        emu.dice_ce_entropy_backward([torch.zeros(1, 33)] * 2 + [torch.zeros(1)] * 2, logits, t)


def test_loss_batch_above_65535_dry(emu):
    """Finding 4: the batch on gridDim.y failed for B > 65535; the corner blocks' samples are checked."""
    emu.configure(dry=True)
    B = 70000
    logits, t, w = _dce_inputs(B, 2, (2, 2), torch.float64, "hard", True)
    got = emu.dice_ce_entropy(logits, t, w)
    grads = [torch.ones(B, 2, dtype=torch.float64)] * 2 + [torch.ones(B, dtype=torch.float64)] * 2
    gl = emu.dice_ce_entropy_backward(grads, logits, t, w)
    assert [(x.name, x.status) for x in emu.launches()] == [
        ("dce_fwd_kernel", "dry"), ("dce_reduce_kernel", "dry"), ("dce_bwd_kernel", "dry")]
    for b in (0, emu.launches()[0].grid[1] - 1):  # samples of the first and the last row of blocks
        x = logits[b:b + 1].clone().requires_grad_(True)
        ref = R.dice_ce_entropy(x, t[b:b + 1], w[b:b + 1])
        torch.testing.assert_close(got[0][b], ref.intersect[0])
        torch.testing.assert_close(got[3][b], ref.ce[0])
        (ref.intersect.sum() + ref.pred_sum.sum() + ref.ce.sum() + ref.entropy.sum()).backward()
        torch.testing.assert_close(gl[b], x.grad[0])


def test_fit_ellipse_batch_above_65535_dry(emu):
    """Finding 4: fit_bbox / fit_moments put the batch on gridDim.y."""
    emu.configure(dry=True)
    masks = torch.zeros(70000, 6, 5, dtype=torch.uint8)  # dry runs skip blocks: only sample 0 (in block 0) has a mask
    masks[0, 1:5, 1:4] = 1
    masks[0, 2:4, 0] = 1
    params, valid = emu.fit_ellipse(masks)
    assert all(x.status == "dry" for x in emu.launches())
    rp, rv = R.fit_ellipse(masks[:1])
    assert bool(valid[0]) and bool(rv[0])
    torch.testing.assert_close(params[0], rp[0], rtol=1e-7, atol=1e-7)


def test_largest_component_above_2_31_voxels_dry(emu):
    """Finding 4: int32 voxel indices over the whole batch; 3 x 2^30 voxels on virtual memory, checked at the end."""
    emu.configure(dry=True)
    B, H, W = 3, 2 ** 15, 2 ** 15
    labels = emu.virtual((B, H, W), torch.uint8)
    out = emu.virtual((B, H, W), torch.uint8)
    ws = emu.virtual((emu.lib.emu_largest_component_workspace(B, H * W, 2),), torch.uint8)
    tail = labels[-1, -1]  # (W,) the last row: processed by the last block of every kernel
    tail[-10:] = 1  # a component of 10 voxels ...
    tail[-100:-94] = 1  # ... and one of 6, dropped
    emu.largest_component(labels, 2, out=out, workspace=ws)
    assert all(x.status == "dry" for x in emu.launches())
    expect = torch.zeros(256, dtype=torch.uint8)
    expect[-10:] = 1
    assert torch.equal(out[-1, -1, -256:], expect)


def test_distance_clamps_the_semi_axes_as_the_reference(emu):
    """Finding 8: b = 0 gave 0 / 0 at the centre row (NaN: outside) where the reference clamps to 1e-12."""
    params = torch.tensor([[4.0, 3.0, 2.0, 0.0, 0.0]], dtype=torch.float64)
    valid = torch.tensor([True])
    probs = torch.rand(1, 6, 8, dtype=torch.float64)
    refined, _, mask = emu.ellipse_unchecked(probs, params, valid)  # the glue refuses b = 0: the launchers direct
    assert torch.equal(mask, R.ellipse_mask(params, valid, (6, 8)))
    torch.testing.assert_close(refined, R.ellipse_refine(probs, params, valid)[0])
    with pytest.raises(ValueError, match="expected params finite with semi-axes a, b > 0 in valid rows, got row 0"):
        emu.ellipse_mask(params, valid, (6, 8))


def test_refine_squares_as_the_reference(emu):
    """Finding 8: fill_power = 2 through powf could differ from the reference's square in the last bit."""
    g = torch.Generator().manual_seed(0)
    params = torch.tensor([[60.0, 50.0, 55.0, 45.0, 0.3]], dtype=torch.float64)
    valid = torch.tensor([True])
    probs = torch.rand(1, 100, 120, generator=g) * 0.1
    refined, _ = emu.ellipse_refine(probs, params, valid, fill_base=0.0)
    ref = R.ellipse_refine(probs, params, valid, fill_base=0.0)[0]
    inside = R.ellipse_distance(params, (100, 120)).float() <= 1  # (1, H, W): the fill (1 - d)^2
    assert torch.equal(refined[inside], ref[inside])  # bit for bit (10 pixels differed through powf)
    torch.testing.assert_close(refined, ref)  # outside: exp of the platform's math library, not bitwise


@pytest.mark.parametrize("C,slots", [(1, 2), (2, 2), (3, 4), (9, 16), (32, 32)])
def test_loss_kernels_sized_by_the_channel_count(emu, C, slots):
    """Finding 8: per-thread arrays of 32 class slots even for C = 2; the instance launched holds the slots."""
    logits, t, _ = _dce_inputs(1, C, (3, 3), torch.float32, "hard", False)
    stats = emu.dice_ce_entropy(logits, t)
    emu.dice_ce_entropy_backward([torch.ones_like(stats[0])] * 2 + [torch.ones_like(stats[3])] * 2, logits, t)
    expect = [f"dce_fwd_kernel<float, {slots}>", "dce_reduce_kernel<float>", f"dce_bwd_kernel<float, {slots}>"]
    assert [x.instance for x in emu.launches()] == expect
