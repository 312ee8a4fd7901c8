"""ERSR's parts: dual-score filter, ellipse refinement, mirror images and targets, invalid fits.

The generic geometry (distance, derivative filters, reflection) is tested in tests/test_geometry.py.
"""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

from minissl import ops
from minissl.config import load_config
from minissl.data import phantoms
from minissl.methods.ersr import (ERSR, contour_regularity, mirror_images, mirror_targets, regularity_score,
                                  select_regular)

S = 32


def make(suite="fetal_head", **args):
    spec = replace(phantoms.SUITES[suite], patch_size=(S, S))
    cfg = load_config(method="ersr", max_iters=10, width=4, depth=2, rampup=0.0, cons_weight=1.0, progress=False,
                      method_args=args)
    torch.manual_seed(0)
    return ERSR(cfg, spec)


def ellipse(cx=15.5, cy=15.5, a=10.0, b=6.0, theta=0.0, n=1):
    """(n, H, W) uint8 ellipse masks and their (n, 5) params."""
    params = torch.tensor([[cx, cy, a, b, theta]] * n, dtype=torch.float64)
    return ops.ellipse_mask(params, torch.ones(n, dtype=torch.bool), (S, S)), params


def test_scores_match_scipy_and_rank_regular_maps_first():
    mask, _ = ellipse()
    g = torch.Generator().manual_seed(1)
    ragged = mask.float() * (torch.rand(1, S, S, generator=g) > 0.3)  # same head, holes and a ragged edge
    probs = torch.cat([mask.float(), ragged, torch.zeros(1, S, S)])  # (3, H, W)
    lap = np.abs(ndimage.laplace(ndimage.distance_transform_edt(~(probs[1].numpy() > 0.5)), mode="nearest")).mean()
    np.testing.assert_allclose(contour_regularity(probs)[1].item(), lap, rtol=1e-5)
    score = regularity_score(probs)
    assert score[0] < score[1] < score[2] == math.inf  # clean ellipse, ragged head, empty map last


def test_filter_keeps_lowest_and_at_least_80_percent():
    scores = torch.tensor([0.8, 0.1, 0.5, 0.3, 0.7, 0.2, 0.6, 0.4])
    lowest = lambda n: set(torch.argsort(scores)[:n].tolist())  # noqa: E731
    kept = lambda *a: set(torch.nonzero(select_regular(scores, *a))[:, 0].tolist())  # noqa: E731
    assert kept(torch.empty(0), 0.25, 0.0) == lowest(2)  # rank < int(0.25 * 8)
    assert kept(torch.empty(0), 0.5) == lowest(6)  # 4 pass, topped up to int(0.8 * 8) = 6
    assert kept(torch.empty(0), 1.0) == lowest(8)
    assert kept(torch.full((8,), 0.01), 0.5) == lowest(6)  # a better history rejects all: top-up only
    assert kept(torch.full((8,), 9.0), 0.5, 0.0) == lowest(8)  # a worse history: rank < 8 for all
    method = make(score_window=4)
    assert method.keep_ratio(0) == pytest.approx(0.5 + 0.5 * math.exp(-5))
    assert method.keep_ratio(10) == 1.0
    probs = torch.stack([ellipse(b=b)[0][0].float() for b in (3.0, 4.0, 5.0, 6.0, 7.0)])  # (5, H, W)
    assert int(method.filter(probs, 0).sum()) == 4  # int(0.8 * 5)
    torch.testing.assert_close(method.score_history, regularity_score(probs)[-4:])  # running window


def test_ellipse_refinement_fills_the_ellipse():
    mask, params = ellipse(theta=0.6)
    d = ops.reference.ellipse_distance(params, (S, S))[0]  # (H, W) normalised elliptical distance
    ys, xs = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    arc = (d > 0.75) & (torch.atan2(ys - 15.5, xs - 15.5).abs() < 0.5)  # a boundary dropout arc
    holes = (d < 0.6) & (torch.rand(S, S, generator=torch.Generator().manual_seed(0)) < 0.2)  # speckle holes
    probs = torch.where(d <= 1, 0.9, 0.05)
    probs[arc | holes] = 0.3
    probs[2:5, 26:29] = 0.65  # a confident distractor far outside the head
    pseudo, fit, valid = make().pseudo_labels(probs[None].float())
    assert bool(valid[0])
    np.testing.assert_allclose(fit[0, :4].numpy(), params[0, :4].numpy(), atol=1.0)  # holes do not shrink it
    assert pseudo.dtype == torch.uint8 and bool((pseudo >= ops.ellipse_mask(fit, valid, (S, S))).all())
    gt = mask[0].bool().numpy()
    dice = lambda p: 2 * (p & gt).sum() / (p.sum() + gt.sum())  # noqa: E731
    assert dice(pseudo[0].bool().numpy()) > max(0.95, dice((probs > 0.6).numpy()) + 0.05)  # filled in ...
    assert not pseudo[0, 2:5, 26:29].any()  # ... and the distractor decays away


def test_mirror_images_and_targets_by_hand():
    mask, params = ellipse(cx=15.0, cy=15.5, a=12.0, b=8.0)  # major axis horizontal: halves = top / bottom rows
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, S, S, generator=g)
    fg = mask[:, None].float()
    top = (torch.arange(S) < 15.5).float()[:, None].expand(S, S)
    bottom = 1 - top
    aug = mirror_images(x, mask, params)  # no perturbation
    for k, half in enumerate((top, bottom)):
        piece = x * fg * half
        torch.testing.assert_close(aug[k:k + 1], x * (1 - fg) + piece + piece.flip(-2))
    p = torch.rand(1, 1, S, S, generator=g)
    targets = mirror_targets(p, params)
    torch.testing.assert_close(targets, torch.cat([p * h + (p * h).flip(-2) for h in (top, bottom)]))
    sym = aug[:1]  # the left image is symmetric inside the head
    torch.testing.assert_close((sym * fg), (sym * fg).flip(-2))


def controlled(method, probs):
    """Let the teacher return fixed foreground maps, so the fits are known."""
    method.teacher_probs = lambda x_u: probs
    return method


def batch(n_u):
    g = torch.Generator().manual_seed(2)
    return {"x_l": torch.randn(2, 1, S, S, generator=g), "y_l": torch.randint(0, 2, (2, S, S), generator=g),
            "x_u": torch.randn(n_u, 1, S, S, generator=g)}


def test_invalid_fits_are_skipped_not_fatal():
    head = 0.9 * ellipse(theta=0.5)[0][0].float()
    speck = torch.zeros(S, S)
    speck[3, 3] = 0.9  # one pixel: too few boundary points for a fit
    probs = torch.stack([torch.zeros(S, S), head, speck])  # empty, valid, invalid
    method = controlled(make(min_keep=1.0), probs)
    out = method.training_step(batch(3), step=5)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out["fit_ok"].item() == pytest.approx(1 / 3) and out["kept"].item() == 1.0
    assert out["l_aug"] > 0 and out["l_mirror"] > 0  # the valid sample still builds its mirrored pair
    params = [p for p in method.student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out["unsup"], params, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    none_valid = controlled(make(min_keep=1.0), probs[[0, 2]]).training_step(batch(2), step=5)
    assert none_valid["l_aug"] == 0 and none_valid["l_mirror"] == 0 and none_valid["l_pl"] > 0
    torch.testing.assert_close(none_valid["unsup"], none_valid["l_pl"])


def test_rejects_other_suites():
    with pytest.raises(ValueError, match="expected a 2D binary suite"):
        make("cardiac")
