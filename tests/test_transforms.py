"""Weak (geometric) and strong (intensity) augmentations."""
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from minissl.data.transforms import crop, gaussian_blur, strong, weak


def _blobs(shape, seed=0):
    rng = np.random.default_rng(seed)
    lab = (ndi.gaussian_filter(rng.random(shape), 2) > 0.5).astype(np.uint8)
    lab[(slice(2, 6),) * len(shape)] = 2
    return lab


@pytest.mark.parametrize("shape,patch", [((40, 48), (32, 32)), ((20, 40, 36), (16, 32, 32)), ((24, 24), (32, 32))])
def test_weak_keeps_image_and_label_aligned(shape, patch):
    lab = _blobs(shape)
    img = lab.astype(np.float32)  # an image derived from the label
    for seed in range(6):
        xi, yi = weak(img, lab, patch, np.random.default_rng(seed), rotate_prob=0.0)
        assert xi.shape == patch and yi.shape == patch and xi.dtype == np.float32 and yi.dtype == np.uint8
        np.testing.assert_array_equal(xi, yi)  # crop / rot90 / flips: exact
        xr, yr = weak(img, lab, patch, np.random.default_rng(seed), rotate_prob=1.0, max_angle=20)
        assert np.mean(np.rint(xr) != yr) < 0.05  # rotation: linear vs nearest differ only on edges


def test_weak_is_a_dihedral_transform_when_nothing_is_cropped():
    img = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    candidates = [np.rot90(f, k) for f in (img, img[:, ::-1]) for k in range(4)]
    seen = set()
    for seed in range(30):
        out, _ = weak(img, None, (16, 16), np.random.default_rng(seed), rotate_prob=0.0)
        match = [i for i, c in enumerate(candidates) if np.array_equal(c, out)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) >= 6


def test_weak_deterministic_torch_and_channels():
    img = torch.rand(2, 20, 24)
    lab = torch.randint(0, 3, (20, 24))
    a = weak(img, lab, (16, 16), torch.Generator().manual_seed(5))
    b = weak(img, lab, (16, 16), torch.Generator().manual_seed(5))
    assert isinstance(a[0], torch.Tensor) and a[0].shape == (2, 16, 16) and a[1].shape == (16, 16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[1].dtype == torch.int64
    c = weak(img.numpy(), lab.numpy(), (16, 16), 5)
    d = weak(img.numpy(), lab.numpy(), (16, 16), 5)
    np.testing.assert_array_equal(c[0], d[0])


def test_crop_pads_with_min_and_foreground_crop():
    x = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    out = crop(x, np.array([-1, 1]), (5, 2), cval=-7)
    np.testing.assert_array_equal(out, [[-7, -7], [2, 3], [6, 7], [10, 11], [-7, -7]])
    lab = np.zeros((30, 64, 64), np.uint8)
    lab[25:28, 2:5, 60:63] = 1
    for seed in range(5):
        _, y = weak(lab.astype(np.float32), lab, (8, 16, 16), np.random.default_rng(seed), fg_prob=1.0,
                    rotate_prob=0.0)
        assert y.any()


def test_weak_bad_input():
    with pytest.raises(ValueError, match="shape mismatch"):
        weak(np.zeros((8, 8)), np.zeros((8, 7)), (4, 4), 0)
    with pytest.raises(ValueError, match="spatial_dims 2 or 3"):
        weak(np.zeros((8, 8)), None, (4,), 0)


def test_gaussian_blur_matches_scipy():
    x = torch.rand(2, 1, 12, 14, dtype=torch.float64)
    y = gaussian_blur(x, torch.tensor([1.0, 0.7]), radius=2)
    for i, s in enumerate((1.0, 0.7)):
        ref = ndi.gaussian_filter(x[i, 0].numpy(), s, mode="nearest", truncate=2 / s + 1e-9)
        np.testing.assert_allclose(y[i, 0].numpy(), ref, atol=1e-10)
    v = torch.rand(1, 1, 6, 7, 8, dtype=torch.float64)
    ref = ndi.gaussian_filter(v[0, 0].numpy(), 0.8, mode="nearest", truncate=2 / 0.8 + 1e-9)
    np.testing.assert_allclose(gaussian_blur(v, torch.tensor([0.8]))[0, 0].numpy(), ref, atol=1e-10)
    np.testing.assert_allclose(gaussian_blur(x, torch.zeros(2)).numpy(), x.numpy(), atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 1, 16, 16), (2, 1, 8, 16, 16)])
def test_strong_deterministic_and_shape(shape):
    x = torch.rand(shape)
    a = strong(x, torch.Generator().manual_seed(0))
    b = strong(x, torch.Generator().manual_seed(0))
    c = strong(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(strong(x, torch.Generator().manual_seed(0), p=0.0), x)


def test_strong_contrast_matches_hand_formula():
    x = torch.rand(3, 1, 10, 10, dtype=torch.float64)
    y = strong(x, torch.Generator().manual_seed(0), p=1.0, contrast=(2.0, 2.0), brightness=0.0,
               gamma=(1.0, 1.0), noise=0.0, blur=(0.0, 0.0))
    m = x.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(y, (x - m) * 2 + m)


def test_strong_bad_input():
    with pytest.raises(ValueError, match="float tensor"):
        strong(torch.zeros(2, 16, 16))
