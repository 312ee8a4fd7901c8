"""minissl.metrics against medpy.metric.binary (dc, jc, hd95, asd with voxelspacing)."""
import math

import numpy as np
import pytest
from medpy.metric import binary as mb
from scipy.ndimage import gaussian_filter

from minissl import metrics


def _blob(rng, shape, sigma=2.0, q=0.7):
    field = gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, q)


CASES = [((40, 48), (0.7, 1.3)), ((31, 37), (2.0, 0.5)), ((12, 20, 18), (2.5, 0.8, 1.1)),
         ((9, 16, 24), (1.0, 0.3, 0.6))]


@pytest.mark.parametrize("shape,spacing", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_medpy(shape, spacing, seed):
    rng = np.random.default_rng(seed)
    pred, gt = _blob(rng, shape), _blob(rng, shape, q=0.6)
    got = metrics.binary_metrics(pred, gt, spacing)
    assert got["dice"] == pytest.approx(mb.dc(pred, gt), abs=1e-6)
    assert got["jaccard"] == pytest.approx(mb.jc(pred, gt), abs=1e-6)
    assert got["hd95"] == pytest.approx(mb.hd95(pred, gt, voxelspacing=spacing), abs=1e-6)
    assert got["asd"] == pytest.approx(mb.asd(pred, gt, voxelspacing=spacing), abs=1e-6)
    assert metrics.hd95(pred, gt, spacing) == got["hd95"] and metrics.asd(pred, gt, spacing) == got["asd"]
    assert metrics.dice(pred, gt) == got["dice"] and metrics.jaccard(pred, gt) == got["jaccard"]


def test_unit_spacing_and_touching_edge():
    pred = np.zeros((8, 8), bool)
    pred[:4, :4] = True                      # touches the image edge: medpy counts that as border
    gt = np.zeros((8, 8), bool)
    gt[1:6, 2:7] = True
    assert metrics.hd95(pred, gt) == pytest.approx(mb.hd95(pred, gt), abs=1e-12)
    assert metrics.asd(pred, gt) == pytest.approx(mb.asd(pred, gt), abs=1e-12)


def test_empty_masks_defined_values():
    z, one = np.zeros((10, 20)), np.zeros((10, 20))
    one[3, 4] = 1
    assert metrics.binary_metrics(z, z) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    diag = math.hypot(10 * 2.0, 20 * 0.5)
    for a, b in ((z, one), (one, z)):
        m = metrics.binary_metrics(a, b, (2.0, 0.5))
        assert m == {"dice": 0.0, "jaccard": 0.0, "hd95": pytest.approx(diag), "asd": pytest.approx(diag)}
    assert metrics.dice(z, z) == 1.0 and metrics.jaccard(z, z) == 1.0   # medpy 0.5.2 dc gives NaN


def test_case_metrics_per_class():
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 4, (6, 24, 24)) * _blob(rng, (6, 24, 24), q=0.3)
    pred = np.where(_blob(rng, (6, 24, 24), q=0.8), 2, gt)
    pred[pred == 3] = 0                       # class 3 missing in the prediction
    out = metrics.case_metrics(pred, gt, 4, spacing=(5.0, 1.2, 1.2))
    assert sorted(out) == [1, 2, 3]
    assert out[1]["hd95"] == pytest.approx(mb.hd95(pred == 1, gt == 1, (5.0, 1.2, 1.2)), abs=1e-6)
    assert out[3]["dice"] == 0.0 and out[3]["hd95"] == pytest.approx(metrics.image_diagonal(gt.shape, (5, 1.2, 1.2)))
    assert all(np.isfinite(v) for m in out.values() for v in m.values())


def test_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        metrics.binary_metrics(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        metrics.case_metrics(np.full((4, 4), 3), np.zeros((4, 4), int), 3)
    with pytest.raises(ValueError, match="spacing must be"):
        metrics.hd95(np.ones((3, 3)), np.ones((3, 3)), spacing=(1.0, 1.0, 1.0))


def _ellipse_mask(shape, cx, cy, a, b):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1


def _ramanujan(a, b):
    h = (a - b) ** 2 / (a + b) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def test_hc_error_mm():
    ops = pytest.importorskip("minissl.ops")
    if not hasattr(ops, "fit_ellipse"):
        pytest.skip("minissl.ops.fit_ellipse not available yet")
    gt = _ellipse_mask((96, 128), 64, 48, 40, 28)
    pred = _ellipse_mask((96, 128), 60, 50, 34, 25)
    px = 0.15
    expected = abs(_ramanujan(40, 28) - _ramanujan(34, 25)) * px
    assert metrics.hc_error_mm(gt, gt, px) == 0.0
    assert metrics.hc_error_mm(pred, gt, px) == pytest.approx(expected, rel=0.05)
    assert metrics.hc_error_mm(np.zeros_like(gt), gt, px) == pytest.approx(_ramanujan(40, 28) * px, rel=0.02)
