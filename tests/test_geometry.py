"""minissl.geometry vs scipy.ndimage and exact mirrors worked out with numpy."""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from minissl import geometry, ops

S = 32


def ellipse(cx=15.5, cy=15.5, a=10.0, b=6.0, theta=0.0):
    """(1, H, W) uint8 ellipse mask and its (1, 5) params."""
    params = torch.tensor([[cx, cy, a, b, theta]], dtype=torch.float64)
    return ops.ellipse_mask(params, torch.ones(1, dtype=torch.bool), (S, S)), params


def test_distance_to_mask_matches_scipy():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 17, 23, generator=g) < torch.tensor([0.02, 0.2, 0.7])[:, None, None]
    for m, d in zip(mask, geometry.distance_to_mask(mask)):
        np.testing.assert_allclose(d.numpy(), ndimage.distance_transform_edt(~m.numpy()), rtol=1e-5)
    assert torch.isinf(geometry.distance_to_mask(torch.zeros(1, 5, 5, dtype=torch.bool))).all()


def test_distance_to_mask_rejects_float_masks():
    with pytest.raises(ValueError, match=r"distance_to_mask: expected a \(B, H, W\) bool mask, got torch.float32"):
        geometry.distance_to_mask(torch.zeros(1, 5, 5))


def test_gradient_and_laplacian_match_scipy():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(3, 12, 15, generator=g, dtype=torch.float64)
    sobel = [np.hypot(ndimage.sobel(m, 0, mode="constant"), ndimage.sobel(m, 1, mode="constant")) / 8
             for m in maps.numpy()]
    np.testing.assert_allclose(geometry.mean_gradient_magnitude(maps).numpy(),
                               [np.sqrt(s ** 2 + 1e-6).mean() for s in sobel], rtol=1e-10)
    np.testing.assert_allclose(geometry.mean_abs_laplacian(maps).numpy(),
                               [np.abs(ndimage.laplace(m, mode="nearest")).mean() for m in maps.numpy()],
                               rtol=1e-10)


def test_half_planes_split_at_the_axis():
    _, params = ellipse(cx=15.0, cy=10.5, theta=0.0)  # axis along x through y = 10.5
    left, right = geometry.axis_half_planes(params, (S, S))
    rows = torch.arange(S)[:, None].expand(S, S)
    assert torch.equal(left[0, 0], rows < 10.5) and torch.equal(right[0, 0], rows >= 10.5)
    _, turned = ellipse(cx=15.5, cy=10.5, theta=math.pi / 2)  # axis along y through x = 15.5: y' = 15.5 - x
    left, _ = geometry.axis_half_planes(turned, (S, S))
    assert torch.equal(left[0, 0], torch.arange(S)[None, :].expand(S, S) > 15.5)


@pytest.mark.parametrize("theta", [0.0, 0.4, 1.3, 2.9])
def test_reflection_of_a_symmetric_ellipse_is_itself(theta):
    mask, params = ellipse(cx=15.3, cy=16.2, a=11.0, b=7.0, theta=theta)
    assert (geometry.reflect_across_axis(mask[:, None].float(), params) != mask[:, None]).float().mean() < 0.02
    ys, xs = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    coords = torch.stack([xs, ys])[None].float()  # (1, 2, H, W): each pixel holds its own (x, y)
    u = torch.tensor([math.cos(theta), math.sin(theta)])[:, None, None]  # the major axis
    v = coords[0] - torch.tensor([15.3, 16.2])[:, None, None]
    mirror = torch.tensor([15.3, 16.2])[:, None, None] + 2 * (v * u).sum(0) * u - v  # (2, H, W) exact mirror
    inner = mask.bool()  # (1, H, W): inside the ellipse every mirror lands in the image
    once = geometry.reflect_across_axis(coords, params)  # nearest sampling: the source pixel is the rounded mirror
    assert ((once[0] - mirror).abs().amax(0)[inner[0]] <= 0.5 + 1e-4).all()
    back = geometry.reflect_across_axis(once, params)  # twice: within one pixel of the identity, mostly exact
    err = (back - coords).abs().amax(1)[inner]
    assert err.max() <= 1 and (err == 0).float().mean() > 0.75
    if theta == 0.0:  # axis along x through a pixel row: reflection = flip of the rows about cy
        img = torch.rand(1, 1, S, S, generator=torch.Generator().manual_seed(0))
        _, p0 = ellipse(cx=15.3, cy=15.5, theta=0.0)
        torch.testing.assert_close(geometry.reflect_across_axis(img, p0), img.flip(-2))
        torch.testing.assert_close(geometry.reflect_across_axis(geometry.reflect_across_axis(img, p0), p0), img)
