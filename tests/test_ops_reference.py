"""minissl.ops (reference path, or the kernels when built): values vs hand-worked cases and trusted
libraries (torch.nn.functional, scipy.ndimage, OpenCV), float64 gradcheck, and bad input."""
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, ndimage

from minissl import ops


@pytest.fixture(autouse=True)
def reference_only(monkeypatch):
    """This file checks the reference twins (through the public input checks); the kernel tests compare
    the compiled kernels with them."""
    monkeypatch.setattr(ops._build, "get_kernel", lambda name, device_type="cpu": None)

# ----------------------------------------------------------------------------------------- dice_ce_entropy


def test_dice_ce_entropy_hand_worked():
    # zero logits -> p = 0.5 everywhere; two voxels with labels 0 and 1
    s = ops.dice_ce_entropy(torch.zeros(1, 2, 1, 2), torch.tensor([[[0, 1]]]))
    torch.testing.assert_close(s.intersect, torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(s.pred_sum, torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(s.target_sum, torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(s.ce, torch.tensor([2 * math.log(2)]))
    torch.testing.assert_close(s.entropy, torch.tensor([2 * math.log(2)]))
    torch.testing.assert_close(s.weight_sum, torch.tensor([2.0]))
    sq = ops.dice_ce_entropy(torch.zeros(1, 2, 1, 2), torch.tensor([[[0, 1]]]), squared=True)
    torch.testing.assert_close(sq.pred_sum, torch.tensor([[0.5, 0.5]]))
    # sigmoid: logit log(3) -> s = 3/4; target 1, weight 2
    s = ops.dice_ce_entropy(torch.full((1, 1, 1, 1), math.log(3)), torch.ones(1, 1, 1, dtype=torch.int64),
                            torch.full((1, 1, 1), 2.0))
    torch.testing.assert_close(s.intersect, torch.tensor([[1.5]]))
    torch.testing.assert_close(s.ce, torch.tensor([-2 * math.log(0.75)]))
    torch.testing.assert_close(s.entropy, torch.tensor([-2 * (0.75 * math.log(0.75) + 0.25 * math.log(0.25))]))


def _expected(logits, target, weight, squared):
    """Independent composition: torch softmax/sigmoid, F.cross_entropy / F.binary_cross_entropy_with_logits."""
    B, C = logits.shape[:2]
    w = torch.ones(B, *logits.shape[2:], dtype=logits.dtype) if weight is None else weight
    if C == 1:
        p = torch.sigmoid(logits)
        t = target.unsqueeze(1).to(logits.dtype) if not target.is_floating_point() else target
        ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")[:, 0]
        ent = F.binary_cross_entropy_with_logits(logits, p, reduction="none")[:, 0]
    else:
        p = torch.softmax(logits, 1)
        t = F.one_hot(target, C).movedim(-1, 1).to(logits.dtype) if not target.is_floating_point() else target
        ce = F.cross_entropy(logits, target if not target.is_floating_point() else t, reduction="none")
        ent = F.cross_entropy(logits, p, reduction="none")
    dims = tuple(range(2, logits.ndim))
    e = 2 if squared else 1
    wc = w.unsqueeze(1)
    return ((wc * p * t).sum(dims), (wc * p ** e).sum(dims), (wc * t ** e).sum(dims),
            (w * ce).flatten(1).sum(1), (w * ent).flatten(1).sum(1), w.flatten(1).sum(1))


def _case(C, spatial, soft, weighted, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, C, *spatial, generator=g, dtype=torch.float64)
    if soft:
        target = torch.rand(B, C, *spatial, generator=g, dtype=torch.float64)
        target = target / target.sum(1, keepdim=True) if C > 1 else target
    else:
        target = torch.randint(0, max(C, 2), (B, *spatial), generator=g)
    weight = torch.rand(B, *spatial, generator=g, dtype=torch.float64) if weighted else None
    return logits, target, weight


CASES = [(C, sp, soft, wt) for C in (1, 3) for sp in ((5, 6), (3, 4, 5)) for soft in (False, True)
         for wt in (False, True)]


@pytest.mark.parametrize("C,spatial,soft,weighted", CASES)
@pytest.mark.parametrize("squared", [False, True])
def test_dice_ce_entropy_matches_torch(C, spatial, soft, weighted, squared):
    logits, target, weight = _case(C, spatial, soft, weighted)
    got = ops.dice_ce_entropy(logits, target, weight, squared=squared)
    for g, e in zip(got, _expected(logits, target, weight, squared)):
        torch.testing.assert_close(g, e)
    assert all(t.dtype == torch.float64 for t in got)


@pytest.mark.parametrize("C,spatial,soft,weighted", [(1, (2, 3), False, True), (1, (2, 2, 2), True, False),
                                                     (3, (2, 3), True, True), (3, (2, 2, 2), False, False)])
def test_dice_ce_entropy_gradcheck(C, spatial, soft, weighted):
    logits, target, weight = _case(C, spatial, soft, weighted, B=1)
    logits.requires_grad_(True)
    for squared in (False, True):
        assert torch.autograd.gradcheck(lambda z: tuple(ops.dice_ce_entropy(z, target, weight, squared=squared)),
                                        (logits,))


def test_dice_ce_entropy_target_and_weight_are_constants():
    logits, target, weight = _case(3, (4, 4), True, True)
    target.requires_grad_(True), weight.requires_grad_(True), logits.requires_grad_(True)
    s = ops.dice_ce_entropy(logits, target, weight)
    sum(t.sum() for t in s).backward()
    assert logits.grad is not None and target.grad is None and weight.grad is None


def test_dice_ce_entropy_zero_weight_equals_crop():
    logits, target, weight = _case(3, (6, 7), False, True)
    mask = torch.zeros(2, 6, 7)
    mask[:, 1:4, 2:6] = 1
    full = ops.dice_ce_entropy(logits, target, weight * mask)
    crop = ops.dice_ce_entropy(logits[:, :, 1:4, 2:6], target[:, 1:4, 2:6], weight[:, 1:4, 2:6])
    for a, b in zip(full, crop):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("C", [1, 4])
def test_dice_ce_entropy_stable_for_large_logits(C):
    logits = torch.tensor([-200.0, -30.0, 0.0, 30.0, 200.0]).view(1, 1, 1, 5).repeat(1, C, 1, 1)
    logits[:, 0] *= -1
    s = ops.dice_ce_entropy(logits.requires_grad_(True), torch.zeros(1, 1, 5, dtype=torch.int64))
    assert all(torch.isfinite(t).all() for t in s)
    sum(t.sum() for t in s).backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(1, 2, 4, 4, dtype=torch.int64), torch.zeros(1, 4, 4, dtype=torch.int64)), "logits of dtype"),
    ((torch.zeros(1, 2, 4), torch.zeros(1, 4, dtype=torch.int64)), "logits with 4 or 5 dims"),
    ((torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.int64)), r"label target of shape \(1, 4, 4\)"),
    ((torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.int32)), "target of dtype torch.int64"),
    ((torch.zeros(1, 2, 4, 4), torch.full((1, 4, 4), 2)), r"labels in \[0, 2\), got values in \[2, 2\]"),
    ((torch.zeros(1, 2, 4, 4), torch.full((1, 4, 4), -1)), r"labels in \[0, 2\)"),
    ((torch.zeros(1, 1, 4, 4), torch.full((1, 4, 4), 2)), r"labels in \[0, 2\)"),
    ((torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4)), r"soft target of shape \(1, 2, 4, 4\)"),
    ((torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.int64), torch.ones(1, 4, 5)), "weight of shape"),
    ((torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.int64), torch.ones(1, 4, 4, dtype=torch.int64)),
     "weight of dtype"),
])
def test_dice_ce_entropy_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        ops.dice_ce_entropy(*args)

# --------------------------------------------------------------------------------------- largest_component


def _largest_expected(labels: np.ndarray) -> np.ndarray:
    """Per sample and class: scipy components with full connectivity; ties -> smallest first raster index."""
    out = labels.copy()
    for b in range(labels.shape[0]):
        for c in range(1, int(labels.max()) + 1):
            comp, n = ndimage.label(labels[b] == c, structure=ndimage.generate_binary_structure(labels.ndim - 1,
                                                                                                 labels.ndim - 1))
            if n < 2:
                continue
            idx = np.arange(comp.size)
            sizes = {k: (comp.ravel() == k).sum() for k in range(1, n + 1)}
            best = max(sizes.values())
            keep = min((idx[comp.ravel() == k][0], k) for k, s in sizes.items() if s == best)[1]
            out[b][(comp != keep) & (comp > 0)] = 0
    return out


@pytest.mark.parametrize("shape", [(3, 17, 19), (2, 7, 9, 8)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_largest_component_matches_scipy(shape, dtype):
    rng = np.random.default_rng(0)
    labels = rng.choice(4, size=shape, p=[0.55, 0.15, 0.15, 0.15])
    got = ops.largest_component(torch.from_numpy(labels).to(dtype))
    assert got.dtype == dtype and got.shape == shape
    np.testing.assert_array_equal(got.numpy(), _largest_expected(labels))


def test_largest_component_bool_ties_and_connectivity():
    # two 2-pixel components; the one reached first in raster order (row 0) wins even though it starts at col 3
    x = torch.tensor([[[0, 0, 0, 1], [1, 1, 0, 1]]], dtype=torch.bool)
    assert ops.largest_component(x).tolist() == [[[False, False, False, True], [False, False, False, True]]]
    # diagonal neighbours are connected (8-connectivity): size 3 beats size 2
    x = torch.tensor([[[1, 0, 0, 0, 1], [0, 1, 0, 0, 1], [0, 0, 1, 0, 0]]], dtype=torch.bool)
    assert ops.largest_component(x).sum() == 3 and bool(ops.largest_component(x)[0, 2, 2])
    # 26-connectivity in 3D: corner-touching voxels form one component
    v = torch.zeros(1, 4, 4, 4, dtype=torch.uint8)
    v[0, 0, 0, 0] = v[0, 1, 1, 1] = v[0, 2, 2, 2] = v[0, 0, 3, 3] = 1
    assert ops.largest_component(v).sum() == 3 and ops.largest_component(v)[0, 0, 3, 3] == 0


def test_largest_component_num_classes_and_bad_input():
    x = torch.tensor([[[2, 0, 2, 2], [1, 0, 0, 1]]])
    # num_classes=2 cleans class 1 only; class 2 stays as it is
    assert ops.largest_component(x, num_classes=3).tolist() == [[[0, 0, 2, 2], [1, 0, 0, 0]]]
    with pytest.raises(ValueError, match=r"labels in \[0, 2\), got max 2"):
        ops.largest_component(x, num_classes=2)
    with pytest.raises(ValueError, match="labels of dtype"):
        ops.largest_component(x.float())
    with pytest.raises(ValueError, match="labels with 3 or 4 dims"):
        ops.largest_component(x[0])
    with pytest.raises(ValueError, match="labels >= 0"):
        ops.largest_component(-x)

# ---------------------------------------------------------------------------------------------- ellipses


def _ellipse_points(cx, cy, a, b, theta, n=64, start=0.3):
    t = start + torch.linspace(0, 2 * math.pi, n + 1, dtype=torch.float64)[:-1]
    c, s = math.cos(theta), math.sin(theta)
    x = cx + a * torch.cos(t) * c - b * torch.sin(t) * s
    y = cy + a * torch.cos(t) * s + b * torch.sin(t) * c
    return torch.stack([x, y], 1)


def _angle_diff(t1, t2):
    d = (t1 - t2) % math.pi
    return min(d, math.pi - d)


@pytest.mark.parametrize("params", [(10.0, -4.0, 30.0, 12.0, 0.7), (250.0, 180.0, 120.0, 100.0, 3.1),
                                    (0.0, 0.0, 1e-3, 5e-4, 0.01), (3.0, 4.0, 50.0, 2.0, 1.5707)])
def test_fit_ellipse_points_exact(params):
    got, valid = ops.fit_ellipse_points(_ellipse_points(*params))
    assert bool(valid) and got.dtype == torch.float64
    torch.testing.assert_close(got[:4], torch.tensor(params[:4], dtype=torch.float64), rtol=1e-6,
                               atol=1e-6 * params[2])
    assert _angle_diff(got[4].item(), params[4]) < 1e-6 and 0 <= got[4] < math.pi


def test_fit_ellipse_points_matches_opencv_direct():
    g = torch.Generator().manual_seed(0)
    for cx, cy, a, b, theta in [(200, 150, 60, 30, math.radians(20)), (64, 80, 40, 33, 2.5), (30, 30, 25, 10, 0.1)]:
        pts = _ellipse_points(cx, cy, a, b, theta, n=40) + 0.8 * torch.randn(40, 2, generator=g, dtype=torch.float64)
        pts = pts.float().double()  # OpenCV takes float32 points: give both the same ones
        got, valid = ops.fit_ellipse_points(pts)
        (ocx, ocy), (w, h), ang = cv2.fitEllipseDirect(pts.numpy().astype(np.float32))
        # OpenCV: full axis lengths (w, h), w along the angle (degrees), h perpendicular to it
        oa, ob, oth = (w / 2, h / 2, math.radians(ang)) if w >= h else (h / 2, w / 2, math.radians(ang) + math.pi / 2)
        assert bool(valid)
        np.testing.assert_allclose(got[:4].numpy(), [ocx, ocy, oa, ob], rtol=1e-4)
        assert _angle_diff(got[4].item(), oth) < 1e-4


def _raster(shape, cx, cy, a, b, theta):
    """d <= 1 at pixel centres (x = col, y = row), written with numpy."""
    y, x = np.mgrid[:shape[0], :shape[1]].astype(np.float64)
    xr = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
    yr = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
    return (xr / a) ** 2 + (yr / b) ** 2 <= 1


RASTER = [(20.0, 1.0, 0.3), (35.0, 0.8, 2.0), (60.0, 0.9, 1.0), (90.0, 0.85, 2.8), (120.0, 0.95, 0.5)]


@pytest.mark.parametrize("a,ratio,theta", RASTER)
def test_fit_ellipse_on_rasterised_ellipses(a, ratio, theta):
    b, size = a * ratio, int(2 * a + 12)
    cx, cy = size / 2 + 0.3, size / 2 - 0.7
    mask = _raster((size, size), cx, cy, a, b, theta)
    mask[0, 0] = mask[1, 1] = True  # a small second component must be ignored
    params, valid = ops.fit_ellipse(torch.from_numpy(mask)[None])
    p = params[0].tolist()
    assert bool(valid[0]) and params.dtype == torch.float64
    assert abs(p[0] - cx) < 0.5 and abs(p[1] - cy) < 0.5
    assert abs(p[2] - a) < 1 and abs(p[3] - b) < 1
    if ratio <= 0.9:
        assert math.degrees(_angle_diff(p[4], theta)) < 2


def test_fit_ellipse_ignores_holes():
    """Outer boundary only: a head with a hole (holding a speck) fits as the filled head, close to OpenCV's
    external contour; a cavity open to the outside through a 4-connected channel is not a hole."""
    size, (cx, cy, a, b, t) = 96, (47.6, 45.2, 38.0, 30.0, 0.7)
    head = _raster((size, size), cx, cy, a, b, t)
    holed = head & ~_raster((size, size), cx + 8, cy - 3, 16, 11, 2.0)
    holed[int(cy) - 3, int(cx) + 8] = True  # a speck inside the hole (another component)
    masks = torch.from_numpy(np.stack([head, holed]))  # (2, H, W) bool
    params, valid = ops.fit_ellipse(masks)
    assert valid.all()
    torch.testing.assert_close(params[1], params[0], rtol=0, atol=1e-9)
    contours, _ = cv2.findContours(holed.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    (ocx, ocy), (w, h), _ = cv2.fitEllipseDirect(max(contours, key=len).astype(np.float32))
    p = params[1].tolist()  # OpenCV's contour runs through pixel centres: half a pixel inside our edges
    assert abs(p[0] - ocx) < 0.5 and abs(p[1] - ocy) < 0.5 and abs(p[2] - max(w, h) / 2) < 1.0
    # square rings with a 4x4 cavity: background that meets the outside only diagonally is closed
    # off by the 8-connected ring (a hole), a 4-connected channel opens the cavity (not a hole)
    ring = torch.zeros(2, 12, 12, dtype=torch.bool)
    ring[:, 2:10, 2:10] = True
    ring[:, 4:8, 4:8] = False
    ring[0, 2, 2] = ring[0, 3, 3] = False  # cavity (4, 4) - (3, 3) - (2, 2) - outside: diagonal steps
    ring[1, 5, 2:4] = False  # cavity (5, 4) - (5, 3) - (5, 2) - outside: a channel
    filled = ring.clone()
    filled[:, 4:8, 4:8] = True
    filled[0, 3, 3] = True  # (3, 3) is a one-pixel hole; (2, 2) touches the outside
    got, ok = ops.fit_ellipse(ring)
    want, want_ok = ops.fit_ellipse(filled)
    assert ok.all() and want_ok.all()
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-9)
    assert (got[1, :4] - want[1, :4]).abs().max() > 0.05


def test_fit_ellipse_boundary_points_of_a_square():
    # 2x2 square: its 8 edge midpoints lie on a circle of radius sqrt(1.25) around (1.5, 1.5)
    mask = torch.zeros(1, 4, 4, dtype=torch.uint8)
    mask[0, 1:3, 1:3] = 1
    params, valid = ops.fit_ellipse(mask)
    assert bool(valid[0])
    torch.testing.assert_close(params[0, :4], torch.tensor([1.5, 1.5, 1.25 ** 0.5, 1.25 ** 0.5],
                                                           dtype=torch.float64))


def test_fit_ellipse_invalid_masks():
    masks = torch.zeros(5, 12, 12, dtype=torch.bool)
    masks[1, 5, 5] = True  # single pixel: 4 points
    masks[2, 5, 5:7] = True  # domino: 6 points on an ellipse with b < 1 px
    masks[3, 6, 1:11] = True  # horizontal line
    masks[4] = torch.eye(12, dtype=torch.bool)  # diagonal line
    params, valid = ops.fit_ellipse(masks)
    assert not valid.any() and (params == 0).all()
    p, v = ops.fit_ellipse_points(torch.tensor([[0.0, 0.0], [1, 1], [2, 2], [3, 3], [4, 4], [5, 5], [6, 6]]))
    assert not bool(v) and (p == 0).all()
    with pytest.raises(ValueError, match="masks of dtype"):
        ops.fit_ellipse(masks.float())
    with pytest.raises(ValueError, match=r"points of a floating dtype and shape \(N, 2\)"):
        ops.fit_ellipse_points(torch.zeros(7, 3))


def test_ellipse_mask_matches_formula():
    params = torch.tensor([[10.3, 8.7, 7.0, 4.0, 0.6], [0, 0, 0, 0, 0]], dtype=torch.float64)
    got = ops.ellipse_mask(params, torch.tensor([True, False]), (18, 21))
    assert got.dtype == torch.uint8 and got.shape == (2, 18, 21)
    np.testing.assert_array_equal(got[0].numpy(), _raster((18, 21), *params[0].tolist()))
    assert got[1].sum() == 0
    with pytest.raises(ValueError, match=r"params of dtype torch.float32 or torch.float64 and shape \(B, 5\)"):
        ops.ellipse_mask(params[:, :4], torch.tensor([True, False]), (18, 21))
    with pytest.raises(ValueError, match=r"valid of shape \(2,\)"):
        ops.ellipse_mask(params, torch.tensor([True]), (18, 21))


def test_ellipse_refine_by_hand():
    probs = torch.full((2, 5, 5), 0.5, dtype=torch.float64)
    params = torch.tensor([[2.0, 2.0, 2.0, 2.0, 0.0]] * 2, dtype=torch.float64)
    refined, pseudo = ops.ellipse_refine(probs, params, torch.tensor([True, False]))
    r = refined[0]
    assert r[2, 2] == 1.0 and r[2, 3] == 1.0  # d = 0 and 0.25: 0.6 + (1 - d)^2 >= 1 is clipped to 1
    torch.testing.assert_close(r[3, 3], torch.tensor(0.85, dtype=torch.float64))  # d = 0.5: 0.6 + 0.25
    torch.testing.assert_close(r[2, 4], torch.tensor(0.6, dtype=torch.float64))  # d = 1: max(0.5, 0.6)
    torch.testing.assert_close(r[4, 4], torch.tensor(0.5 * math.exp(-0.5), dtype=torch.float64))  # d = 2
    assert pseudo[0, 2, 4] == 0 and pseudo[0, 3, 3] == 1 and pseudo.dtype == torch.uint8
    assert torch.equal(refined[1], probs[1]) and pseudo[1].sum() == 0  # invalid: P, and 0.5 <= 0.6


def _exact_perimeter(a, b):
    return integrate.quad(lambda t: math.hypot(a * math.sin(t), b * math.cos(t)), 0, 2 * math.pi,
                          epsabs=0, epsrel=1e-13, limit=200)[0]


def test_head_circumference_vs_numeric_integration():
    ab = [(60.0, 60.0), (60.0, 54.0), (100.0, 70.0), (80.0, 40.0)]
    params = torch.tensor([[0, 0, a, b, 0.3] for a, b in ab], dtype=torch.float64)
    px = torch.tensor([0.1, 0.2, 0.07, 0.3], dtype=torch.float64)
    hc = ops.head_circumference(params, px)
    assert hc.dtype == torch.float64 and hc.shape == (4,)
    exact = torch.tensor([_exact_perimeter(a * p, b * p) for (a, b), p in zip(ab, px.tolist())],
                         dtype=torch.float64)
    assert ((hc - exact).abs() / exact).max() < 1e-6
    torch.testing.assert_close(ops.head_circumference(params[:1], 0.5),
                               torch.tensor([math.pi * 60.0], dtype=torch.float64))
    assert ops.head_circumference(torch.zeros(1, 5, dtype=torch.float64), 0.2).item() == 0.0
    with pytest.raises(ValueError, match=r"pixel_size a float or of shape \(4,\)"):
        ops.head_circumference(params, px[:2])

# --------------------------------------------------------------------------------------------------- mix


@pytest.mark.parametrize("spatial", [(8, 12), (4, 6, 8)])
@pytest.mark.parametrize("region", ["boxes", "blocks"])
def test_mix_is_the_arithmetic_composition(spatial, region):
    g = torch.Generator().manual_seed(1)
    B, sd = 3, len(spatial)
    if region == "boxes":
        lo = torch.stack([torch.randint(0, s // 2, (B,), generator=g) for s in spatial], 1)
        hi = lo + torch.stack([torch.randint(0, s // 2 + 1, (B,), generator=g) for s in spatial], 1)
        hi[0] = lo[0]  # an empty box
        kw = dict(boxes=torch.cat([lo, hi], 1))
    else:
        kw = dict(blocks=torch.rand(B, *(2,) * sd, generator=g) < 0.5)
    m = ops.region_mask(spatial, **kw)  # (B, *S)
    xa, xb = torch.randn(B, 2, *spatial, generator=g), torch.randn(B, 2, *spatial, generator=g)
    ya, yb = torch.randint(0, 4, (B, *spatial), generator=g), torch.randint(0, 4, (B, *spatial), generator=g)
    x, y = ops.mix([xa, ya], [xb, yb], **kw)
    mf = m.unsqueeze(1).float()
    torch.testing.assert_close(x, xa * (1 - mf) + xb * mf)
    expected = ya.clone()
    expected[m] = yb[m]
    assert torch.equal(y, expected) and y.dtype == torch.int64
    if region == "boxes":
        assert torch.equal(x[0], xa[0])


def test_mix_bad_input():
    a, b = [torch.zeros(2, 8, 8)], [torch.ones(2, 8, 8)]
    box = torch.tensor([[0, 0, 4, 4], [1, 1, 2, 2]])
    with pytest.raises(ValueError, match="exactly one of boxes / blocks, got both"):
        ops.mix(a, b, boxes=box, blocks=torch.ones(2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="exactly one of boxes / blocks, got neither"):
        ops.mix(a, b)
    with pytest.raises(ValueError, match=r"0 <= lo <= hi <= \(8, 8\)"):
        ops.mix(a, b, boxes=torch.tensor([[0, 0, 9, 4], [1, 1, 2, 2]]))
    with pytest.raises(ValueError, match=r"0 <= lo <= hi"):
        ops.mix(a, b, boxes=torch.tensor([[3, 0, 2, 4], [1, 1, 2, 2]]))
    with pytest.raises(ValueError, match="divisible by the grid"):
        ops.mix(a, b, blocks=torch.ones(2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="boxes of dtype torch.int64"):
        ops.mix(a, b, boxes=box.float())
    with pytest.raises(ValueError, match=r"b\[0\] like a\[0\]"):
        ops.mix(a, [torch.ones(2, 8, 9)], boxes=box)
    with pytest.raises(ValueError, match=r"a\[0\] of shape \(2, \[C,\] \*S \(2 dims\)\), got \(3, 8, 8\)"):
        ops.mix([torch.zeros(3, 8, 8)], [torch.ones(3, 8, 8)], boxes=box)

# ----------------------------------------------------------------------------------------- batch_norm_rows


def test_batch_norm_rows_hand_worked():
    # one channel, values 1 and 3: mean 2, biased var 1, unbiased 2; y = (x - 2) / sqrt(1 + eps) * 2 + 1
    x = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    y, mean, var, invstd = ops.batch_norm_rows(x, torch.tensor([2.0], dtype=torch.float64),
                                               torch.tensor([1.0], dtype=torch.float64), eps=0.0)
    torch.testing.assert_close(y, torch.tensor([[-1.0], [3.0]], dtype=torch.float64))
    assert mean.item() == 2.0 and var.item() == 2.0 and invstd.item() == 1.0


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 5, 3, 4, 3)])
def test_batch_norm_rows_matches_torch_batch_norm(shape):
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = (2 * torch.randn(shape, generator=g, dtype=torch.float64) + 5).contiguous(memory_format=fmt)
    w, b = torch.rand(shape[1], dtype=torch.float64, generator=g) + 0.5, torch.randn(shape[1], dtype=torch.float64,
                                                                                     generator=g)
    y, mean, var, invstd = ops.batch_norm_rows(x, w, b, eps=1e-5)
    expected = F.batch_norm(x.contiguous(), None, None, w, b, training=True, eps=1e-5)
    torch.testing.assert_close(y, expected)
    dims = [0, *range(2, len(shape))]
    torch.testing.assert_close(mean, x.mean(dims))
    torch.testing.assert_close(var, x.var(dims, unbiased=True))
    torch.testing.assert_close(invstd, (x.var(dims, unbiased=False) + 1e-5).rsqrt())


def test_batch_norm_rows_gradient():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(4, dtype=torch.float64, generator=g) + 0.5, torch.randn(4, dtype=torch.float64, generator=g)
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda *t: ops.batch_norm_rows(*t, eps=1e-5)[0], inputs)
    # the spelled-out backward equals autograd through the forward
    y = ops.batch_norm_rows(*inputs, eps=1e-5)[0]
    dy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    auto = torch.autograd.grad(y, inputs, dy)
    _, mean, _, invstd = ops.batch_norm_rows(x.detach(), w.detach(), b.detach(), eps=1e-5)
    for got, want in zip(ops.reference.batch_norm_rows_backward(dy, x.detach(), w.detach(), mean, invstd), auto):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(2, 3, 4, 4),), "channels-last"),  # contiguous (B, C, H, W)
    ((torch.zeros(5, 3).t(),), "contiguous"),  # a transposed matrix
    ((torch.zeros(4, 3, dtype=torch.int64),), "dtype"),
    ((torch.zeros(4, 3), torch.ones(2)), r"weight of shape \(3,\)"),
    ((torch.zeros(4, 3), None, torch.ones(3, dtype=torch.float64)), "bias of dtype"),
])
def test_batch_norm_rows_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        ops.batch_norm_rows(*args)
