"""Compiled dense kernels (dice_ce_entropy forward/backward, mix) against minissl.ops.reference.

The extension is built once for the module; with MINISSL_REQUIRE_EXT=1 a failed build fails loudly
(the build raises), otherwise these tests are skipped when it cannot be built.
"""
import os

import pytest
import torch

from minissl import ops
from minissl.ops import _build, reference

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def kernels():
    if os.environ.get("MINISSL_NO_EXT") == "1":
        pytest.skip("MINISSL_NO_EXT=1: compiled kernels disabled")
    path = _build.load()  # raises when MINISSL_REQUIRE_EXT=1 and the build fails
    if path is None:
        pytest.skip(f"extension not built: {_build.build_info()['error']}")
    return ops  # the public functions, which run the compiled kernels now that they are loaded


def _inputs(B, C, spatial, dtype, soft, weighted, g, device="cpu"):
    logits = (3 * torch.randn(B, C, *spatial, generator=g, dtype=dtype)).to(device)  # (B, C, *S)
    if soft:
        target = torch.rand(B, C, *spatial, generator=g, dtype=dtype).to(device)  # (B, C, *S)
    else:
        target = torch.randint(0, max(C, 2), (B, *spatial), generator=g).to(device)  # (B, *S)
    weight = torch.rand(B, *spatial, generator=g, dtype=dtype).to(device) if weighted else None  # (B, *S)
    return logits, target, weight


CONFIGS = [  # (C, spatial, soft, weighted, squared)
    (1, (5, 7), False, False, False), (1, (4, 3, 5), True, True, True), (2, (6, 5), False, True, False),
    (3, (3, 4, 5), False, False, True), (4, (9, 4), True, False, False), (6, (2, 3, 17), False, True, True),
    (9, (5, 5), True, True, False),
]


def _check_against_reference(kernels, dtype, device):
    g = torch.Generator().manual_seed(0)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for C, spatial, soft, weighted, squared in CONFIGS:
        B = int(torch.randint(1, 4, (1,), generator=g))
        logits, target, weight = _inputs(B, C, spatial, dtype, soft, weighted, g, device)
        x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ours = kernels.dice_ce_entropy(x1, target, weight, squared=squared)
        ref = reference.dice_ce_entropy(x2, target, weight, squared=squared)
        for name, a, b in zip(ref._fields, ours, ref):
            assert a.dtype == dtype and a.shape == b.shape, name
            torch.testing.assert_close(a, b, **tol, msg=f"{name} C={C} soft={soft} w={weighted} sq={squared}")
        grads = [torch.randn(r.shape, generator=g, dtype=dtype).to(device) for r in ref]
        used = [i for i, r in enumerate(ref) if r.requires_grad]  # target_sum, weight_sum are constants
        torch.autograd.backward([ours[i] for i in used], [grads[i] for i in used])
        torch.autograd.backward([ref[i] for i in used], [grads[i] for i in used])
        torch.testing.assert_close(x1.grad, x2.grad, **tol, msg=f"grad C={C} soft={soft} w={weighted} sq={squared}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dice_ce_entropy_matches_reference(kernels, dtype):
    _check_against_reference(kernels, dtype, "cpu")


def test_dice_ce_entropy_large_logits_stay_finite(kernels):
    logits = torch.tensor([[[80.0, -80.0]], [[-80.0, 80.0]]]).view(1, 2, 1, 2).repeat(2, 1, 1, 1)  # (2, 2, 1, 2)
    labels = torch.tensor([[[0, 1]], [[1, 0]]])  # (2, 1, 2)
    ours, ref = kernels.dice_ce_entropy(logits, labels), reference.dice_ce_entropy(logits, labels)
    for a, b in zip(ours, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_dice_ce_entropy_gradcheck(kernels):
    g = torch.Generator().manual_seed(1)
    for C, spatial, soft, weighted, squared in [(3, (3, 4), False, True, True), (1, (2, 2, 3), True, False, False),
                                                (2, (4, 3), True, True, False)]:
        logits, target, weight = _inputs(2, C, spatial, torch.float64, soft, weighted, g)
        logits.requires_grad_()
        fn = lambda x: tuple(kernels.dice_ce_entropy(x, target, weight, squared=squared))  # noqa: E731
        assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-6)


def test_opcheck(kernels):
    g = torch.Generator().manual_seed(2)
    logits, target, weight = _inputs(2, 3, (4, 5), torch.float32, False, True, g)
    torch.library.opcheck(torch.ops.minissl.dice_ce_entropy.default, (logits.requires_grad_(), target, weight, False))
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")  # aot_dispatch is slow: once
    soft_logits, soft, _ = _inputs(2, 1, (3, 2, 4), torch.float64, True, False, g)
    torch.library.opcheck(torch.ops.minissl.dice_ce_entropy.default, (soft_logits, soft, None, True), test_utils=quick)
    gBC, gB = torch.randn(2, 3, generator=g), torch.randn(2, generator=g)
    torch.library.opcheck(torch.ops.minissl.dice_ce_entropy_backward.default,
                          (gBC, gBC, gB, gB, logits.detach(), target, weight, False), test_utils=quick)
    a = [torch.randn(2, 1, 6, 8, generator=g), torch.randint(0, 3, (2, 6, 8), generator=g)]
    b = [torch.randn(2, 1, 6, 8, generator=g), torch.randint(0, 3, (2, 6, 8), generator=g)]
    boxes = torch.tensor([[1, 2, 4, 7], [0, 0, 6, 8]])
    torch.library.opcheck(torch.ops.minissl.mix.default, (a, b, boxes, None), test_utils=quick)


def _random_boxes(B, spatial, g):
    lo = torch.stack([torch.randint(0, s + 1, (B,), generator=g) for s in spatial], 1)  # (B, sd)
    hi = torch.stack([torch.randint(0, s + 1, (B,), generator=g) for s in spatial], 1)  # (B, sd)
    return torch.cat([torch.minimum(lo, hi), torch.maximum(lo, hi)], 1)  # (B, 2 sd)


def _random_tensor(shape, dtype, g):
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


@pytest.mark.parametrize("spatial,grid", [((6, 8), (3, 2)), ((4, 6, 10), (2, 3, 5)), ((1, 9), (1, 3)),
                                          ((3, 150), (1, 50)), ((2, 3, 130), (1, 3, 13))])  # rows of many vectors
def test_mix_matches_reference(kernels, spatial, grid):
    g = torch.Generator().manual_seed(3)
    B = 3
    dtypes = [torch.float32, torch.float64, torch.int64, torch.uint8, torch.bool]
    a = [_random_tensor((B, 2, *spatial) if i % 2 else (B, *spatial), d, g) for i, d in enumerate(dtypes)]
    b = [_random_tensor(x.shape, x.dtype, g) for x in a]
    for _ in range(4):
        boxes = _random_boxes(B, spatial, g)
        blocks = torch.rand(B, *grid, generator=g) > 0.5  # (B, *G)
        for kw in (dict(boxes=boxes), dict(blocks=blocks)):
            for ours, ref in zip(kernels.mix(a, b, **kw), reference.mix(a, b, **kw)):
                assert ours.dtype == ref.dtype and torch.equal(ours, ref)


@pytest.mark.parametrize("width", [96, 90])  # rows of whole vectors (streamed) or not (plain stores)
def test_mix_large_outputs_match_reference(kernels, width):
    # outputs of >= 4 MiB take the streaming-store path of the CPU kernel
    g = torch.Generator().manual_seed(5)
    S = (48, 64, width)
    a = [torch.randn(2, 2, *S, generator=g), torch.randint(0, 9, (2, *S), generator=g)]
    b = [torch.randn(2, 2, *S, generator=g), torch.randint(0, 9, (2, *S), generator=g)]
    assert a[0].nbytes >= 4 << 20
    boxes = torch.tensor([[5, 0, 7, 40, 64, 61], [0, 3, 0, 48, 30, width]])
    blocks = torch.rand(2, 4, 4, 3, generator=g) > 0.5  # (B, *G)
    for kw in (dict(boxes=boxes), dict(blocks=blocks)):
        for ours, ref in zip(kernels.mix(a, b, **kw), reference.mix(a, b, **kw)):
            assert torch.equal(ours, ref)


def test_mix_empty_and_full_box(kernels):
    a, b = [torch.zeros(2, 4, 5)], [torch.ones(2, 4, 5)]
    out = kernels.mix(a, b, boxes=torch.tensor([[1, 1, 1, 5], [0, 0, 4, 5]]))[0]
    assert out[0].sum() == 0 and bool((out[1] == 1).all())


def test_bad_input_errors(kernels):
    op = torch.ops.minissl
    logits, labels = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    with pytest.raises(ValueError, match=r"expected labels in \[0, 3\)"):
        op.dice_ce_entropy(logits, labels.clone().fill_(3), None, False)
    with pytest.raises(ValueError, match=r"expected labels in \[0, 2\)"):
        op.dice_ce_entropy(logits[:, :1], labels.clone().fill_(-1), None, False)
    # the range check runs on whole SIMD vectors and on the padded last one, forward and backward
    big_logits = torch.randn(2, 3, 37, 41)
    for where, value in [((1, 30, 40), 2 ** 40), ((0, 0, 0), -1), ((1, 36, 40), 3), ((0, 17, 5), -(2 ** 62))]:
        bad = torch.randint(0, 3, (2, 37, 41))
        bad[where] = value
        with pytest.raises(ValueError, match=r"expected labels in \[0, 3\)"):
            op.dice_ce_entropy(big_logits, bad, None, False)
        g2, g1 = torch.ones(2, 3), torch.ones(2)
        with pytest.raises(ValueError, match=r"expected labels in \[0, 3\)"):
            op.dice_ce_entropy_backward(g2, g2, g1, g1, big_logits, bad, None, False)
    with pytest.raises(ValueError, match="expected logits to be float32 or float64, got Long"):
        op.dice_ce_entropy(labels.unsqueeze(1), labels, None, False)
    with pytest.raises(ValueError, match="expected int64 target of shape"):
        op.dice_ce_entropy(logits, labels[:, :2], None, False)
    with pytest.raises(ValueError, match="expected int64 labels or a Float soft target, got Double"):
        op.dice_ce_entropy(logits, logits.double(), None, False)
    with pytest.raises(ValueError, match="expected weight of shape"):
        op.dice_ce_entropy(logits, labels, torch.ones(2, 4), False)
    a, b = [torch.zeros(2, 4, 5)], [torch.ones(2, 4, 5)]
    with pytest.raises(ValueError, match="exactly one of boxes / blocks, got neither"):
        op.mix(a, b, None, None)
    with pytest.raises(ValueError, match=r"expected 0 <= lo <= hi <= 5 on spatial dim 1, got box \(2, 6\)"):
        op.mix(a, b, torch.tensor([[0, 2, 4, 6], [0, 0, 1, 1]]), None)
    with pytest.raises(ValueError, match="divisible by the block grid"):
        op.mix(a, b, None, torch.ones(2, 3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape and dtype"):
        op.mix(a, [torch.ones(2, 4, 5, dtype=torch.float64)], torch.tensor([[0, 0, 1, 1]] * 2), None)
    if CUDA:
        with pytest.raises(ValueError, match="expected target on"):
            op.dice_ce_entropy(logits.cuda(), labels, None, False)


def test_dispatch_uses_kernel(kernels, monkeypatch):
    assert _build.get_kernel("dice_ce_entropy") is torch.ops.minissl.dice_ce_entropy
    assert _build.get_kernel("mix", "cpu") is torch.ops.minissl.mix
    assert _build.get_kernel("mix", "meta") is None  # no kernel for that device: the reference runs
    status = ops.kernel_status()
    assert status.path and all(status.kernels[op][:1] == ("cpu",) for op in ops.KERNEL_OPS)
    calls = status.calls["dice_ce_entropy"].get("cpu", 0)

    def boom(*args, **kwargs):
        raise AssertionError("the reference ran although a kernel is compiled")

    monkeypatch.setattr(reference, "dice_ce_entropy", boom)
    monkeypatch.setattr(reference, "mix", boom)
    stats = ops.dice_ce_entropy(torch.randn(2, 2, 4, 4), torch.randint(0, 2, (2, 4, 4)))
    assert stats.ce.shape == (2,)
    out = ops.mix([torch.zeros(1, 4, 4)], [torch.ones(1, 4, 4)], boxes=torch.tensor([[0, 0, 2, 2]]))
    assert out[0].sum() == 4
    assert ops.kernel_status().calls["dice_ce_entropy"]["cpu"] == calls + 1


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_reference(kernels, dtype):
    assert _build.has_kernel("dice_ce_entropy", "cuda"), "CUDA torch but the CUDA kernels were not built"
    _check_against_reference(kernels, dtype, "cuda")
    g = torch.Generator().manual_seed(4)
    a = [torch.randn(3, 2, 4, 6, 8, generator=g).cuda(), torch.randint(0, 9, (3, 4, 6, 8), generator=g).cuda()]
    b = [torch.randn(3, 2, 4, 6, 8, generator=g).cuda(), torch.randint(0, 9, (3, 4, 6, 8), generator=g).cuda()]
    for kw in (dict(boxes=_random_boxes(3, (4, 6, 8), g).cuda()), dict(blocks=(torch.rand(3, 2, 3, 4) > 0.5).cuda())):
        for ours, ref in zip(kernels.mix(a, b, **kw), reference.mix(a, b, **kw)):
            assert torch.equal(ours, ref)


def test_opcheck_on_non_contiguous_inputs(kernels):
    """Finding 3: the fake kernels kept the input strides where the real ops return contiguous outputs."""
    g = torch.Generator().manual_seed(3)
    logits, target, weight = _inputs(2, 3, (4, 5), torch.float32, False, True, g)
    cl = logits.contiguous(memory_format=torch.channels_last)  # (2, 3, 4, 5) channels_last
    gBC, gB = torch.randn(2, 3, generator=g), torch.randn(2, generator=g)
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.minissl.dice_ce_entropy_backward.default,
                          (gBC, gBC, gB, gB, cl, target, weight, False), test_utils=quick)
    a = [torch.randn(2, 8, 6, generator=g).transpose(1, 2)]  # (2, 6, 8) non-contiguous
    b = [torch.randn(2, 6, 8, generator=g)]
    torch.library.opcheck(torch.ops.minissl.mix.default, (a, b, torch.tensor([[1, 2, 4, 7], [0, 0, 6, 8]]), None),
                          test_utils=quick)


# ---- batch_norm_rows ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(8, 16, 33, 31), (2, 5, 7, 6, 9), (3000, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_norm_rows_kernel_matches_reference(kernels, shape, dtype):
    g = torch.Generator().manual_seed(0)
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d, 2: torch.contiguous_format}[len(shape)]
    x = (3 * torch.randn(shape, generator=g, dtype=dtype) + 7).contiguous(memory_format=fmt)
    w, b = torch.rand(shape[1], generator=g, dtype=dtype) + 0.5, torch.randn(shape[1], generator=g, dtype=dtype)
    dy = torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=fmt)
    out = []
    for fn in (torch.ops.minissl.batch_norm_rows, reference.batch_norm_rows):
        y, mean, var, invstd = fn(x, w, b, 1e-5)
        out.append((y, mean, var, invstd))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for got, want in zip(*out):
        torch.testing.assert_close(got, want, **tol)
    assert out[0][0].stride() == x.stride()  # y keeps the channels-last layout
    _, mean, _, invstd = out[1]
    got = torch.ops.minissl.batch_norm_rows_backward(dy, x, w, mean, invstd)
    want = reference.batch_norm_rows_backward(dy, x, w, mean, invstd)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **tol)
    assert got[0].stride() == x.stride()


def test_batch_norm_rows_kernel_statistics_are_float64_precise(kernels):
    """Where PyTorch's channels-last CPU batch norm loses digits (a mean large against the spread), the
    kernel's float32 statistics stay within float32 rounding of the float64 ones."""
    g = torch.Generator().manual_seed(1)
    x = (2 * torch.randn(8, 16, 64, 64, generator=g) + 3).contiguous(memory_format=torch.channels_last)
    exact = x.double().var((0, 2, 3), unbiased=True)  # (C,)
    _, _, var, _ = ops.batch_norm_rows(x)
    assert ((var.double() - exact).abs() / exact).max() < 3e-7  # float32 rounding of the result
    native = torch.nn.BatchNorm2d(16, momentum=1.0).to(memory_format=torch.channels_last)
    nn_bn = torch.nn.modules.batchnorm._BatchNorm.forward  # nn's own forward, not minissl's subclass
    nn_bn(native, x)
    assert ((native.running_var.double() - exact).abs() / exact).max() > 1e-6  # what the kernel fixes


def test_batch_norm_rows_kernel_gradcheck_and_threads(kernels):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 5, 3, dtype=torch.float64, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(4, dtype=torch.float64, generator=g) + 0.5, torch.randn(4, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda *t: ops.batch_norm_rows(*t)[0],
                                    tuple(t.clone().requires_grad_() for t in (x, w, b)))
    big = torch.randn(5000, 8, generator=g)  # several row chunks: the sums must not depend on the threads
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.minissl.batch_norm_rows(big, None, None, 1e-5)
        torch.set_num_threads(2)
        two = torch.ops.minissl.batch_norm_rows(big, None, None, 1e-5)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_batch_norm_rows_kernel_reads_strided_weights(kernels):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    wb = torch.rand(3, 2, generator=g) + 0.5  # columns: strided (C,) views
    got = torch.ops.minissl.batch_norm_rows(x, wb[:, 0], wb[:, 1], 1e-5)[0]
    want = reference.batch_norm_rows(x, wb[:, 0].contiguous(), wb[:, 1].contiguous(), 1e-5)[0]
    torch.testing.assert_close(got, want)
    dy = torch.randn(x.shape, generator=g).contiguous(memory_format=torch.channels_last)
    _, mean, _, invstd = reference.batch_norm_rows(x, wb[:, 0].contiguous(), None, 1e-5)
    got = torch.ops.minissl.batch_norm_rows_backward(dy, x, wb[:, 0], mean, invstd)
    want = reference.batch_norm_rows_backward(dy, x, wb[:, 0].contiguous(), mean, invstd)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
