"""Compiled geometry kernels (largest_component, fit_ellipse, fit_ellipse_points, ellipse_refine,
ellipse_mask) against minissl.ops.reference, scipy.ndimage.label, OpenCV and analytic ellipses.

The extension is built once for the module; with MINISSL_REQUIRE_EXT=1 a failed build fails loudly,
otherwise these tests are skipped when it cannot be built. CUDA value tests run only with a GPU.
"""
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from minissl import ops
from minissl.ops import _build, reference

CUDA = torch.cuda.is_available()
OPS = torch.ops.minissl


@pytest.fixture(scope="module")
def kernels():
    if os.environ.get("MINISSL_NO_EXT") == "1":
        pytest.skip("MINISSL_NO_EXT=1: compiled kernels disabled")
    if _build.load() is None:  # raises when MINISSL_REQUIRE_EXT=1 and the build fails
        pytest.skip(f"extension not built: {_build.build_info()['error']}")
    if not _build.has_kernel("fit_ellipse", "cpu"):
        pytest.skip("geometry kernels not compiled")
    return OPS


# ---- helpers ------------------------------------------------------------------------------------------

def scipy_largest(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Largest component per (sample, class) straight from scipy.ndimage.label (full connectivity)."""
    out = labels.copy()
    structure = np.ones((3,) * (labels.ndim - 1), dtype=bool)
    for b in range(labels.shape[0]):
        for c in range(1, num_classes):
            comp, n = ndimage.label(labels[b] == c, structure=structure)
            if n > 1:
                keep = np.argmax(np.bincount(comp.ravel())[1:]) + 1  # first of the largest, in raster order
                out[b][(comp > 0) & (comp != keep)] = 0
    return out


def blobby_labels(shape, num_classes, density, g):
    """Random label maps with blobs of several sizes (smoothed noise) and isolated specks."""
    noise = torch.rand((shape[0], num_classes) + tuple(shape[1:]), generator=g)
    pool = torch.nn.functional.avg_pool2d if len(shape) == 3 else torch.nn.functional.avg_pool3d
    smooth = pool(noise, 3, 1, 1)  # (B, C, *S)
    labels = smooth.argmax(1)  # (B, *S)
    return labels * (torch.rand(shape, generator=g) < density)


def ellipse_masks(params: np.ndarray, shape) -> np.ndarray:
    """Rasterise analytic ellipses (numpy, independent of the code under test): d <= 1 at pixel centres."""
    y, x = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    out = []
    for cx, cy, a, b, t in params:
        xr = (x - cx) * math.cos(t) + (y - cy) * math.sin(t)
        yr = -(x - cx) * math.sin(t) + (y - cy) * math.cos(t)
        out.append((xr / a) ** 2 + (yr / b) ** 2 <= 1)
    return np.stack(out).astype(np.uint8)


def random_params(n, g, a_range=(20.0, 120.0), ratio=(0.8, 1.0), centre=(128.0, 128.0), jitter=3.0):
    a = a_range[0] + (a_range[1] - a_range[0]) * torch.rand(n, generator=g, dtype=torch.float64)
    r = ratio[0] + (ratio[1] - ratio[0]) * torch.rand(n, generator=g, dtype=torch.float64)
    c = torch.tensor(centre, dtype=torch.float64) + jitter * (2 * torch.rand(n, 2, generator=g, dtype=torch.float64) - 1)
    t = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    return torch.stack([c[:, 0], c[:, 1], a, a * r, t], 1)  # (n, 5)


def angle_diff(t1, t2):
    """|t1 - t2| modulo pi (axis directions), elementwise."""
    return ((t1 - t2 + math.pi / 2) % math.pi - math.pi / 2).abs()


def assert_params_close(ours, ref, atol=1e-7):
    """Centre and axes within atol; the angle too, except where the ellipse is (nearly) a circle."""
    torch.testing.assert_close(ours[..., :4], ref[..., :4], rtol=0, atol=atol)
    round_ = (ref[..., 2] - ref[..., 3]) < 1e-3 * ref[..., 2]
    dt = angle_diff(ours[..., 4], ref[..., 4])
    assert bool(((dt < 1e-6) | round_).all()), dt.max()


def ellipse_points(p, n=36, offset=0.1):
    cx, cy, a, b, t = p.tolist()
    s = torch.linspace(0, 2 * math.pi, n + 1, dtype=torch.float64)[:-1] + offset
    x = cx + a * torch.cos(s) * math.cos(t) - b * torch.sin(s) * math.sin(t)
    y = cy + a * torch.cos(s) * math.sin(t) + b * torch.sin(s) * math.cos(t)
    return torch.stack([x, y], 1)  # (n, 2)


# ---- largest_component ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 33, 47), (3, 9, 17, 13)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_largest_component_matches_scipy_and_reference(kernels, shape, dtype):
    g = torch.Generator().manual_seed(len(shape) * 10 + {torch.int64: 0, torch.uint8: 1, torch.bool: 2}[dtype])
    for num_classes, density in ((2, 0.35), (4, 0.6), (5, 0.9), (3, 1.0)):
        labels = blobby_labels(shape, num_classes, density, g)  # (B, *S) int64
        if dtype == torch.bool:
            labels, num_classes = labels > 0, 2
        labels = labels.to(dtype)
        ours = kernels.largest_component(labels, num_classes)
        assert ours.dtype == dtype and ours.shape == labels.shape
        expected = scipy_largest(labels.numpy(), num_classes)
        np.testing.assert_array_equal(ours.numpy(), expected)
        assert torch.equal(ours, reference.largest_component(labels, num_classes))
        assert torch.equal(ops.largest_component(labels, num_classes), ours)


@settings(max_examples=40, deadline=None)
@given(spatial=st.lists(st.integers(1, 9), min_size=2, max_size=3), batch=st.integers(1, 3),
       num_classes=st.integers(2, 4), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_largest_component_random_shapes(kernels, spatial, batch, num_classes, density, seed):
    rng = np.random.default_rng(seed)
    shape = (batch, *spatial)
    labels = rng.integers(1, num_classes, shape) * (rng.random(shape) < density)  # (B, *S) int64
    np.testing.assert_array_equal(kernels.largest_component(torch.from_numpy(labels), num_classes).numpy(),
                                  scipy_largest(labels, num_classes))


def test_largest_component_ties_and_edge_cases(kernels):
    # Ties: equal sizes -> the component reached first in C order wins (2D and 3D, diagonal links count).
    lab = torch.zeros(1, 6, 8, dtype=torch.int64)
    lab[0, 4, 1] = lab[0, 5, 2] = 1  # 2 pixels, 8-connected diagonally, reached second
    lab[0, 0, 6] = lab[0, 0, 7] = 1  # 2 pixels, reached first
    lab[0, 2, 3] = 2
    out = kernels.largest_component(lab, 3)
    expected = lab.clone()
    expected[0, 4, 1] = expected[0, 5, 2] = 0
    assert torch.equal(out, expected)
    vol = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    vol[0, 2, 0, 0] = vol[0, 1, 1, 1] = 1  # 26-connected through a corner, reached second
    vol[0, 0, 3, 2] = vol[0, 0, 3, 3] = 1
    out = kernels.largest_component(vol, 2)
    assert out.sum() == 2 and out[0, 0, 3, 2] == 1 and out[0, 0, 3, 3] == 1
    # All background, all foreground, single pixels, classes >= num_classes untouched, empty batch.
    for shape in ((2, 5, 7), (2, 3, 5, 7)):
        zeros = torch.zeros(shape, dtype=torch.int64)
        assert torch.equal(kernels.largest_component(zeros, 3), zeros)
        full = torch.full(shape, 2, dtype=torch.int64)
        assert torch.equal(kernels.largest_component(full, 3), full)
        single = torch.zeros(shape, dtype=torch.int64)
        single.view(shape[0], -1)[:, 7] = 1
        assert torch.equal(kernels.largest_component(single, 2), single)
    lab = torch.tensor([[[1, 0, 1, 1], [0, 0, 0, 0], [3, 0, 3, 3]]])  # class 3 >= num_classes: kept as is
    assert torch.equal(kernels.largest_component(lab, 3), torch.tensor([[[0, 0, 1, 1], [0, 0, 0, 0], [3, 0, 3, 3]]]))
    assert kernels.largest_component(torch.zeros(0, 4, 4, dtype=torch.int64), 2).shape == (0, 4, 4)


def test_largest_component_noncontiguous_input(kernels):
    g = torch.Generator().manual_seed(5)
    labels = blobby_labels((3, 20, 30), 3, 0.7, g).transpose(1, 2)  # (B, 30, 20), not contiguous
    np.testing.assert_array_equal(kernels.largest_component(labels, 3).numpy(), scipy_largest(labels.numpy(), 3))


# ---- fit_ellipse ----------------------------------------------------------------------------------------

def test_fit_ellipse_rasterised_analytic_ellipses(kernels):
    """Semi-axes 20-120 px, b/a in 0.8..1: centre within 0.5 px, semi-axes within 1 px, angle within 2 deg
    (the angle only where a - b >= 2 px: for a near-circle the major-axis direction is not defined)."""
    g = torch.Generator().manual_seed(0)
    truth = random_params(48, g)  # (48, 5)
    masks = torch.from_numpy(ellipse_masks(truth.numpy(), (256, 256)))  # (48, 256, 256) uint8
    params, valid = kernels.fit_ellipse(masks)
    assert params.dtype == torch.float64 and valid.dtype == torch.bool and bool(valid.all())
    assert (params[:, :2] - truth[:, :2]).abs().max() < 0.5
    assert (params[:, 2:4] - truth[:, 2:4]).abs().max() < 1.0
    assert bool((params[:, 2] >= params[:, 3]).all())
    assert bool(((params[:, 4] >= 0) & (params[:, 4] < math.pi)).all())
    elongated = (truth[:, 2] - truth[:, 3]) >= 2
    assert elongated.sum() > 10
    assert angle_diff(params[elongated, 4], truth[elongated, 4]).max() < math.radians(2)
    # bool masks give the same fit
    assert torch.equal(kernels.fit_ellipse(masks.bool())[0], params)


def test_fit_ellipse_matches_reference_on_messy_masks(kernels):
    """Several components, holes, specks, masks touching the border: same params and validity as the twin."""
    g = torch.Generator().manual_seed(1)
    truth = random_params(12, g, a_range=(6.0, 40.0), ratio=(0.4, 1.0), centre=(40.0, 32.0), jitter=30.0)
    masks = torch.from_numpy(ellipse_masks(truth.numpy(), (64, 80)))  # (12, 64, 80)
    masks |= (torch.rand(masks.shape, generator=g) < 0.03).to(torch.uint8)  # specks
    masks &= (torch.rand(masks.shape, generator=g) > 0.02).to(torch.uint8)  # holes
    masks[3] = 0
    masks[4] = 1
    masks[5, 10:12, 10:50] = 1
    ours, ok = kernels.fit_ellipse(masks)
    ref, ref_ok = reference.fit_ellipse(masks)
    assert torch.equal(ok, ref_ok)
    assert not ok[3] and bool(ok[4])
    assert_params_close(ours, ref, atol=1e-7)


def test_fit_ellipse_fills_holes_like_the_reference(kernels):
    """Rings with specks in the cavity, cavities opened by a 1-px channel, pinholes: same fit as the twin."""
    g = torch.Generator().manual_seed(7)
    outer = random_params(16, g, a_range=(12.0, 30.0), ratio=(0.5, 1.0), centre=(40.0, 36.0), jitter=8.0)
    inner = outer.clone()
    inner[:, :2] += 3 * (2 * torch.rand(16, 2, generator=g, dtype=torch.float64) - 1)
    inner[:, 2:4] *= 0.3 + 0.4 * torch.rand(16, 1, generator=g, dtype=torch.float64)
    shape = (72, 80)
    masks = torch.from_numpy(ellipse_masks(outer.numpy(), shape) & (1 - ellipse_masks(inner.numpy(), shape)))
    masks |= (torch.rand(masks.shape, generator=g) < 0.02).to(torch.uint8)  # specks, some in the cavities
    masks &= (torch.rand(masks.shape, generator=g) > 0.03).to(torch.uint8)  # pinholes
    for i in range(0, 16, 2):  # a channel from the cavity's centre to the right border
        masks[i, int(inner[i, 1]), int(inner[i, 0]):] = 0
    ours, ok = kernels.fit_ellipse(masks)
    ref, ref_ok = reference.fit_ellipse(masks)
    assert torch.equal(ok, ref_ok) and int(ok.sum()) >= 14
    assert_params_close(ours, ref, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), density=st.floats(0.4, 0.9), h=st.integers(3, 24), w=st.integers(3, 24))
def test_fit_ellipse_random_masks_match_reference(kernels, seed, density, h, w):
    """Random masks: tangled holes, gaps meeting diagonally, holes at the bounding box's edge."""
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand(4, h, w, generator=g) < density).to(torch.uint8)  # (4, h, w)
    ours, ok = kernels.fit_ellipse(masks)
    ref, ref_ok = reference.fit_ellipse(masks)
    assert torch.equal(ok, ref_ok)
    assert_params_close(ours, ref, atol=1e-6)


def test_fit_ellipse_degenerate_masks_are_invalid(kernels):
    masks = torch.zeros(6, 16, 16, dtype=torch.uint8)
    masks[1, 5, 5] = 1  # single pixel: 4 points
    masks[2, 3, 2:12] = 1  # a line: minor semi-axis < 1 px
    masks[3, 2:14, 7] = 1  # a vertical line
    masks[4, 4, 4] = masks[4, 9, 9] = 1  # two single pixels
    masks[5, 3:5, 3:5] = 1  # 2x2 square: a circle of radius ~1.1 fits
    params, valid = kernels.fit_ellipse(masks)
    ref, ref_valid = reference.fit_ellipse(masks)
    assert valid.tolist() == ref_valid.tolist() == [False, False, False, False, False, True]
    assert bool(torch.isfinite(params).all()) and bool((params[:5] == 0).all())
    assert_params_close(params, ref, atol=1e-9)
    p, v = kernels.fit_ellipse(torch.zeros(2, 0, 5, dtype=torch.uint8))
    assert p.shape == (2, 5) and not v.any()


# ---- fit_ellipse_points ----------------------------------------------------------------------------------

def test_fit_ellipse_points_exact_samples(kernels):
    g = torch.Generator().manual_seed(2)
    truth = random_params(30, g, a_range=(0.5, 500.0), ratio=(0.05, 0.99), centre=(-50.0, 300.0), jitter=200.0)
    for p in truth:
        params, valid = kernels.fit_ellipse_points(ellipse_points(p))
        assert bool(valid) and params.shape == (5,)
        assert ((params[:4] - p[:4]).abs() / p[:4].abs()).max() < 1e-6
        assert angle_diff(params[4], p[4]) < 1e-6


def test_fit_ellipse_points_matches_reference_and_opencv(kernels):
    cv2 = pytest.importorskip("cv2")
    g = torch.Generator().manual_seed(3)
    truth = random_params(8, g, a_range=(10.0, 60.0), ratio=(0.3, 0.95), centre=(64.0, 64.0))
    masks = ellipse_masks(truth.numpy(), (128, 128))
    for mask in masks:
        pts = reference.boundary_points(torch.from_numpy(mask).bool())  # (N, 2) half-integers
        ours, valid = kernels.fit_ellipse_points(pts)
        ref, ref_valid = reference.fit_ellipse_points(pts)
        assert bool(valid) and bool(ref_valid)
        assert_params_close(ours, ref, atol=1e-8)
        (cx, cy), (w, h), deg = cv2.fitEllipseDirect(pts.numpy().astype(np.float32))  # full axes, degrees
        a, b, theta = (h / 2, w / 2, math.radians(deg + 90)) if w <= h else (w / 2, h / 2, math.radians(deg))
        cv = torch.tensor([cx, cy, a, b, theta % math.pi], dtype=torch.float64)
        torch.testing.assert_close(ours[:4], cv[:4], rtol=0, atol=1e-3)
        assert angle_diff(ours[4], cv[4]) < 1e-4
    # random clouds (often not an ellipse-shaped set): validity and params agree with the twin
    for _ in range(20):
        pts = torch.randn(int(torch.randint(6, 40, (1,), generator=g)), 2, generator=g, dtype=torch.float64)
        ours, valid = kernels.fit_ellipse_points(pts * 7 + 3)
        ref, ref_valid = reference.fit_ellipse_points(pts * 7 + 3)
        assert bool(valid) == bool(ref_valid)
        assert_params_close(ours, ref, atol=1e-6)


def test_fit_ellipse_points_degenerate(kernels):
    p = torch.tensor([100.0, 50.0, 30.0, 20.0, 0.5], dtype=torch.float64)
    line = torch.stack([torch.arange(10.0), 2 * torch.arange(10.0) + 1], 1).double()
    cases = {
        "five points": ellipse_points(p, n=5),
        "collinear": line,
        "identical": torch.ones(10, 2, dtype=torch.float64),
        "nan": torch.cat([ellipse_points(p), torch.tensor([[math.nan, 1.0]], dtype=torch.float64)]),
        "inf": torch.cat([ellipse_points(p), torch.tensor([[math.inf, 1.0]], dtype=torch.float64)]),
        "empty": torch.zeros(0, 2, dtype=torch.float64),
    }
    for name, pts in cases.items():
        params, valid = kernels.fit_ellipse_points(pts)
        assert not bool(valid), name
        assert bool((params == 0).all()), name
        assert not bool(reference.fit_ellipse_points(pts)[1]), name
    # points on a hyperbola: the direct fit is ellipse-specific, so it still returns the (same) ellipse
    s = torch.linspace(-2, 2, 20, dtype=torch.float64)
    hyperbola = torch.stack([torch.cosh(s), torch.sinh(s)], 1)
    ours, ref = kernels.fit_ellipse_points(hyperbola), reference.fit_ellipse_points(hyperbola)
    assert bool(ours[1]) == bool(ref[1])
    assert_params_close(ours[0], ref[0], atol=1e-6)


# ---- ellipse_refine / ellipse_mask -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ellipse_refine_and_mask_match_reference(kernels, dtype):
    g = torch.Generator().manual_seed(4)
    B, H, W = 6, 40, 56
    probs = torch.rand(B, H, W, generator=g, dtype=dtype)
    params = random_params(B, g, a_range=(3.0, 25.0), ratio=(0.3, 1.0), centre=(28.0, 20.0), jitter=15.0)
    valid = torch.tensor([True, True, False, True, True, True])
    params[2] = 0
    params[5] = torch.tensor([-10.0, -10.0, 5.0, 4.0, 1.0], dtype=torch.float64)  # entirely outside the image
    for kwargs in ({}, dict(threshold=0.3, fill_base=0.2, fill_power=1.5, decay=2.0)):
        kw = dict(threshold=0.6, fill_base=0.6, fill_power=2.0, decay=0.5) | kwargs
        refined, pseudo = kernels.ellipse_refine(probs, params, valid, *kw.values())
        ref, ref_pseudo = reference.ellipse_refine(probs, params, valid, **kw)
        assert refined.dtype == dtype and pseudo.dtype == torch.uint8
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(refined, ref, **tol)
        assert (pseudo != ref_pseudo).sum() <= (1 if dtype == torch.float32 else 0)
        assert torch.equal(refined[2], probs[2])
    mask = kernels.ellipse_mask(params, valid, H, W)
    assert mask.dtype == torch.uint8 and mask.shape == (B, H, W)
    assert torch.equal(mask, reference.ellipse_mask(params, valid, (H, W)))
    assert mask[2].sum() == 0 and mask[5].sum() == 0
    np.testing.assert_array_equal(mask[valid].numpy(), ellipse_masks(params[valid].numpy(), (H, W)))


def test_ellipse_mask_round_trips_through_fit(kernels):
    g = torch.Generator().manual_seed(6)
    truth = random_params(8, g, a_range=(20.0, 60.0), ratio=(0.5, 0.9), centre=(64.0, 64.0), jitter=5.0)
    masks = kernels.ellipse_mask(truth, torch.ones(8, dtype=torch.bool), 128, 128)
    params, valid = kernels.fit_ellipse(masks)
    assert bool(valid.all()) and (params[:, :4] - truth[:, :4]).abs().max() < 1.0


# ---- opcheck and bad input -------------------------------------------------------------------------------

def test_opcheck(kernels):
    g = torch.Generator().manual_seed(7)
    masks = torch.from_numpy(ellipse_masks(random_params(3, g, (5.0, 10.0), centre=(16.0, 16.0)).numpy(), (32, 32)))
    params, valid = kernels.fit_ellipse(masks)
    probs = torch.rand(3, 32, 32, generator=g)
    samples = {
        "largest_component": [(blobby_labels((2, 12, 14), 3, 0.6, g), 3), (blobby_labels((2, 5, 6, 7), 2, 0.5, g), 2)],
        "fit_ellipse": [(masks,)],
        "fit_ellipse_points": [(ellipse_points(params[0]),)],
        "ellipse_refine": [(probs, params, valid, 0.6, 0.6, 2.0, 0.5)],
        "ellipse_mask": [(params, valid, 20, 24)],
    }
    for name, arg_sets in samples.items():
        for args in arg_sets:
            torch.library.opcheck(getattr(OPS, name).default, args)


def test_bad_input_raises(kernels):
    cases = [
        (lambda: kernels.fit_ellipse(torch.zeros(2, 8, 8)), "expected masks to be uint8 or bool, got Float"),
        (lambda: kernels.fit_ellipse(torch.zeros(8, 8, dtype=torch.uint8)), r"expected masks of shape \(B, H, W\)"),
        (lambda: kernels.largest_component(torch.zeros(2, 8, 8), 2), "expected labels to be int64, uint8 or bool"),
        (lambda: kernels.largest_component(torch.zeros(8, 8, dtype=torch.long), 2), r"expected labels of shape"),
        (lambda: kernels.largest_component(torch.zeros(1, 8, 8, dtype=torch.long), 0),
         r"expected num_classes in \[1, 65536\], got 0"),
        (lambda: kernels.fit_ellipse_points(torch.zeros(8, 3, dtype=torch.float64)), r"expected points of shape \(N, 2\)"),
        (lambda: kernels.fit_ellipse_points(torch.zeros(8, 2)), "expected points to be Double, got Float"),
        (lambda: kernels.ellipse_refine(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 5, dtype=torch.float64),
                                        torch.ones(2, dtype=torch.bool), 0.6, 0.6, 2.0, 0.5),
         "expected probs to be float32 or float64, got Long"),
        (lambda: kernels.ellipse_refine(torch.zeros(2, 4, 4), torch.zeros(3, 5, dtype=torch.float64),
                                        torch.ones(2, dtype=torch.bool), 0.6, 0.6, 2.0, 0.5),
         r"expected params of shape \(2, 5\), got shape \[3, 5\]"),
        (lambda: kernels.ellipse_mask(torch.zeros(2, 5, dtype=torch.float64), torch.ones(2, dtype=torch.uint8), 4, 4),
         "expected valid to be Bool, got Byte"),
        (lambda: kernels.ellipse_mask(torch.tensor([[4.0, 4.0, 0.0, 2.0, 0.0]]), torch.ones(1, dtype=torch.bool), 8, 8),
         r"expected params finite with semi-axes a, b > 0 in valid rows, got row 0: \[4, 4, 0, 2, 0\]"),
        (lambda: kernels.ellipse_refine(torch.zeros(1, 4, 4), torch.tensor([[2.0, 2.0, 3.0, float("nan"), 0.0]]),
                                        torch.ones(1, dtype=torch.bool), 0.6, 0.6, 2.0, 0.5),
         "expected params finite with semi-axes a, b > 0 in valid rows, got row 0"),
        (lambda: kernels.ellipse_mask(torch.zeros(1, 5), torch.ones(1, dtype=torch.bool), -1, 4),
         r"expected a non-negative shape, got \(-1, 4\)"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
    with pytest.raises(ValueError, match="fit_ellipse: expected masks of dtype"):
        ops.fit_ellipse(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="largest_component: expected labels with 3 or 4 dims"):
        ops.largest_component(torch.zeros(8, 8, dtype=torch.long))


# ---- CUDA (only with a GPU) -------------------------------------------------------------------------------

@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_matches_cpu(kernels):
    if not _build.has_kernel("fit_ellipse", "cuda"):
        pytest.skip("CUDA geometry kernels not compiled")
    g = torch.Generator().manual_seed(8)
    dev = torch.device("cuda")
    for shape, nc in (((4, 64, 72), 4), ((2, 24, 20, 28), 3)):
        for dtype in (torch.int64, torch.uint8):
            labels = blobby_labels(shape, nc, 0.6, g).to(dtype)
            assert torch.equal(kernels.largest_component(labels.to(dev), nc).cpu(), kernels.largest_component(labels, nc))
    truth = random_params(16, g, a_range=(5.0, 60.0), ratio=(0.5, 1.0), centre=(64.0, 64.0), jitter=20.0)
    masks = torch.from_numpy(ellipse_masks(truth.numpy(), (128, 128)))
    masks |= (torch.rand(masks.shape, generator=g) < 0.01).to(torch.uint8)
    masks[0] = 0
    params, valid = kernels.fit_ellipse(masks)
    cparams, cvalid = kernels.fit_ellipse(masks.to(dev))
    assert torch.equal(cvalid.cpu(), valid)
    assert_params_close(cparams.cpu(), params, atol=1e-7)
    pts = ellipse_points(truth[1], n=1000)
    p_cpu, v_cpu = kernels.fit_ellipse_points(pts)
    p_gpu, v_gpu = kernels.fit_ellipse_points(pts.to(dev))
    assert bool(v_gpu.cpu()) == bool(v_cpu)
    assert_params_close(p_gpu.cpu(), p_cpu, atol=1e-8)
    probs = torch.rand(16, 128, 128, generator=g)
    for dtype in (torch.float32, torch.float64):
        r_cpu, s_cpu = kernels.ellipse_refine(probs.to(dtype), params, valid, 0.6, 0.6, 2.0, 0.5)
        r_gpu, s_gpu = kernels.ellipse_refine(probs.to(dtype).to(dev), params.to(dev), valid.to(dev), 0.6, 0.6, 2.0, 0.5)
        torch.testing.assert_close(r_gpu.cpu(), r_cpu)
        assert (s_gpu.cpu() != s_cpu).sum() <= 2
    assert (kernels.ellipse_mask(params.to(dev), valid.to(dev), 128, 128).cpu()
            != kernels.ellipse_mask(params, valid, 128, 128)).sum() <= 2


def test_opcheck_on_non_contiguous_inputs(kernels):
    """Finding 3: the fake kernels kept the input strides where the real ops return contiguous outputs."""
    g = torch.Generator().manual_seed(8)
    labels = blobby_labels((2, 14, 12), 3, 0.6, g).transpose(1, 2)  # (2, 12, 14) non-contiguous
    torch.library.opcheck(OPS.largest_component.default, (labels, 3))
    probs = torch.rand(2, 24, 20, generator=g).transpose(1, 2)  # (2, 20, 24) non-contiguous
    params = torch.tensor([[10.0, 8.0, 6.0, 4.0, 0.3], [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.library.opcheck(OPS.ellipse_refine.default, (probs, params, torch.tensor([True, False]), 0.6, 0.6, 2.0, 0.5))
