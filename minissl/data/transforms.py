"""Augmentations, 2D and 3D through one ``spatial_dims``.

* :func:`weak` — per sample, geometric, image and label together (NumPy or torch in, same type out):
  random crop to the patch (padding when the image is smaller; optionally centred on a foreground
  voxel), a small in-plane rotation, a random rot90 in the (Y, X) plane and random flips. This is
  SSL4MIS's ``RandomGenerator`` / ``RandomRotFlip`` + ``RandomCrop``.
* :func:`resize` / :func:`zoom` — resampling to a fixed size (the SSL4MIS ACDC recipe trains on slices
  zoomed to the patch and predicts at the patch size, then zooms back): linear for images,
  nearest for labels, on pixel centres (``align_corners=False``), the one convention of training
  and :mod:`minissl.inference`.
* :func:`normalise` — whole-image intensity rules (``SuiteSpec.intensity``) for images from outside a store.
* :func:`strong` — batched, intensity only, in torch on any device (for the unlabeled / student
  view of FixMatch-style methods): contrast, brightness, gamma, Gaussian blur, Gaussian noise.

Both are deterministic given their generator (``numpy.random.Generator`` for ``weak``,
``torch.Generator`` for ``strong``).
"""
from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from torch import Tensor

Array = TypeVar("Array", np.ndarray, Tensor)


def _numpy_rng(rng: np.random.Generator | torch.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=rng)))
    return np.random.default_rng(rng)


def crop_window(shape: Sequence[int], patch_size: Sequence[int], rng: np.random.Generator,
                label: np.ndarray | None = None, fg_prob: float = 0.0) -> np.ndarray:
    """Random start corner of a ``patch_size`` window on an array of ``shape`` (negative = padding).

    With probability ``fg_prob`` (and a non-empty ``label``) the window is centred on a random
    foreground voxel (shifted to stay inside the array where it fits).

    Returns:
        int64 array (len(patch_size),) of start indices.
    """
    shape, patch = np.asarray(shape), np.asarray(patch_size)
    room = shape - patch
    if fg_prob > 0 and label is not None and rng.random() < fg_prob and label.any():
        fg = np.flatnonzero(label)
        centre = np.asarray(np.unravel_index(fg[rng.integers(len(fg))], label.shape))
        start = centre - patch // 2
        return np.where(room >= 0, np.clip(start, 0, np.maximum(room, 0)), room // 2)
    lo, hi = np.minimum(room, 0), np.maximum(room, 0)
    return np.array([rng.integers(a, b + 1) for a, b in zip(lo, hi)], dtype=np.int64)


def crop(x: np.ndarray, start: np.ndarray, patch: Sequence[int], cval: float) -> np.ndarray:
    """Window [start, start + patch) of the last len(patch) axes, padded with ``cval`` outside."""
    lead = x.ndim - len(patch)
    pad_lo = np.maximum(-start, 0)
    pad_hi = np.maximum(start + np.asarray(patch) - np.asarray(x.shape[lead:]), 0)
    if pad_lo.any() or pad_hi.any():
        x = np.pad(x, [(0, 0)] * lead + list(zip(pad_lo, pad_hi)), constant_values=cval)
        start = start + pad_lo
    return x[(Ellipsis,) + tuple(slice(s, s + p) for s, p in zip(start, patch))]


def resize(x: Tensor, size: Sequence[int], order: int = 1) -> Tensor:
    """Resample the spatial axes of a batch to ``size``.

    Args:
        x: (B, C, *S) tensor, S = 2 or 3 spatial axes (float for ``order=1``).
        size: output spatial size (len = len(S)).
        order: 1 linear (bilinear / trilinear), 0 nearest; both with pixel centres mapped onto pixel
            centres (``align_corners=False``; nearest is torch's "nearest-exact").

    Returns:
        (B, C, *size), same dtype and device as ``x`` (``x`` itself when the size already matches).
    """
    size = tuple(int(v) for v in size)
    if order not in (0, 1) or len(size) != x.ndim - 2 or len(size) not in (2, 3):
        raise ValueError(f"resize: expected order 0 or 1 and a (B, C, *S) input with len(S) = len(size) in (2, 3), "
                         f"got order {order}, input shape {tuple(x.shape)}, size {size}")
    if tuple(x.shape[2:]) == size:
        return x
    if order == 0:
        return F.interpolate(x.float(), size=size, mode="nearest-exact").to(x.dtype)
    return F.interpolate(x, size=size, mode="bilinear" if len(size) == 2 else "trilinear", align_corners=False)


def zoom(image: np.ndarray, label: np.ndarray | None, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Zoom the last ``len(size)`` axes of an image (linear) and its label (nearest) to ``size``.

    Args:
        image: (*L, *S) float array; leading axes L (e.g. the slices of a volume) are kept.
        label: (*L, *S) integer array or None.
        size: output spatial size S' (2 or 3 entries).

    Returns:
        (image (*L, *S') float32, label (*L, *S') of the label's dtype, or None).
    """
    sd = len(size)
    lead, S = image.shape[:-sd], image.shape[-sd:]
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).reshape(-1, 1, *S)  # (N, 1, *S)
    out = resize(x, size, 1).reshape(*lead, *size).numpy()  # (*L, *S')
    if label is None:
        return out, None
    y = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)).reshape(-1, 1, *S)  # (N, 1, *S)
    return out, resize(y, size, 0).reshape(*lead, *size).numpy().astype(label.dtype)


def normalise(image: np.ndarray, rule: str) -> np.ndarray:
    """Intensity normalisation of a whole image or volume by a ``SuiteSpec.intensity`` rule.

    Args:
        image: (Y, X) or (Z, Y, X) float array.
        rule: "minmax" ((x - min) / (max - min), so [0, 1]), "zscore" ((x - mean) / std) or "none".
            A constant image becomes zeros under "minmax" and "zscore".

    Returns:
        float32 array of the same shape.
    """
    x = np.asarray(image, dtype=np.float32)
    if rule == "minmax":
        span = float(x.max() - x.min()) if x.size else 0.0
        return (x - x.min()) / span if span > 0 else np.zeros_like(x)
    if rule == "zscore":
        std = float(x.std()) if x.size else 0.0
        return (x - x.mean()) / std if std > 0 else np.zeros_like(x)
    if rule == "none":
        return x
    raise ValueError(f"intensity rule: expected 'minmax', 'zscore' or 'none', got {rule!r}")


def weak(image: Array, label: Array | None, patch_size: Sequence[int],
         rng: np.random.Generator | torch.Generator | int, *, spatial_dims: int | None = None,
         flip: bool = True, rot90: bool = True, rotate_prob: float = 0.5, max_angle: float = 20.0,
         fg_prob: float = 0.0) -> tuple[Array, Array | None]:
    """Weak (geometric) augmentation of one sample, image and label alike.

    Args:
        image: (*S) or (C, *S), S = 2 or 3 spatial axes; float NumPy array or tensor.
        label: (*S) integer map or None.
        patch_size: output spatial size P (len = spatial_dims).
        rng: numpy Generator (or torch Generator / int seed, turned into one).
        spatial_dims: 2 or 3 (default ``len(patch_size)``).
        flip: flip each spatial axis with probability 1/2.
        rot90: rotate by k * 90 deg in the (Y, X) plane (k in 0..3 if the patch is square there, else 0/2).
        rotate_prob: probability of a small rotation in the (Y, X) plane.
        max_angle: small rotation angle range, degrees (uniform in [-max_angle, max_angle]).
        fg_prob: probability of centring the crop on a foreground voxel of ``label``.

    Returns:
        (image (*P) or (C, *P) float32, label (*P) same dtype as given, or None); NumPy in -> NumPy
        out, torch in -> torch out (on the input's device). Outside the image the image is padded
        with its minimum and the label with 0. Rotation: linear for the image, nearest for the label.
    """
    sd = spatial_dims or len(patch_size)
    if sd not in (2, 3) or len(patch_size) != sd:
        raise ValueError(f"expected spatial_dims 2 or 3 matching patch_size, got spatial_dims={sd}, "
                         f"patch_size={tuple(patch_size)}")
    is_torch = isinstance(image, Tensor)
    device = image.device if is_torch else None
    img = image.detach().cpu().numpy() if is_torch else np.asarray(image)
    lab = None if label is None else (label.detach().cpu().numpy() if isinstance(label, Tensor) else np.asarray(label))
    if img.ndim not in (sd, sd + 1):
        raise ValueError(f"expected image of shape (*S) or (C, *S) with {sd} spatial axes, got shape {img.shape}")
    S = img.shape[-sd:]
    if lab is not None and lab.shape != S:
        raise ValueError(f"image/label shape mismatch: image spatial shape {S}, label {lab.shape}")
    rng = _numpy_rng(rng)
    patch = tuple(int(p) for p in patch_size)
    cval = float(img.min()) if img.size else 0.0

    start = crop_window(S, patch, rng, lab, fg_prob)
    if rotate_prob > 0 and rng.random() < rotate_prob:
        ang = np.deg2rad(rng.uniform(-max_angle, max_angle))
        c, s = np.cos(ang), np.sin(ang)
        mat = np.eye(sd)
        mat[-2:, -2:] = [[c, -s], [s, c]]
        pc = (np.asarray(patch) - 1) / 2.0
        offset = start + pc - mat @ pc  # input = mat @ out + offset (rotation about the window centre)

        def warp(a: np.ndarray, order: int, fill: float) -> np.ndarray:
            return ndi.affine_transform(a, mat, offset, output_shape=patch, order=order, mode="constant", cval=fill)

        img = np.stack([warp(ch, 1, cval) for ch in img.reshape((-1,) + S)]).reshape(img.shape[:-sd] + patch)
        lab = None if lab is None else warp(lab, 0, 0)
    else:
        img = crop(img, start, patch, cval)
        lab = None if lab is None else crop(lab, start, patch, 0)
    if rot90:
        k = int(rng.integers(4)) if patch[-1] == patch[-2] else 2 * int(rng.integers(2))
        img = np.rot90(img, k, axes=(-2, -1))
        lab = None if lab is None else np.rot90(lab, k, axes=(-2, -1))
    if flip:
        for ax in range(1, sd + 1):
            if rng.random() < 0.5:
                img = np.flip(img, -ax)
                lab = None if lab is None else np.flip(lab, -ax)
    img = np.ascontiguousarray(img, dtype=np.float32)
    lab = None if lab is None else np.ascontiguousarray(lab)
    if is_torch:
        return torch.from_numpy(img).to(device), None if lab is None else torch.from_numpy(lab).to(device)
    return img, lab


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int = 2) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma (voxels); edges replicated.

    Args:
        x: (B, C, *S), S = 2 or 3 spatial axes.
        sigma: (B,) standard deviations; 0 leaves the sample unchanged.
        radius: kernel half-width (kernel size 2 * radius + 1).

    Returns:
        (B, C, *S) blurred.
    """
    B, C, *S = x.shape
    sd = len(S)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # (K,)
    w = torch.exp(-0.5 * (t[None] / sigma.to(x).clamp_min(1e-3)[:, None]) ** 2)  # (B, K)
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, K)
    conv = F.conv2d if sd == 2 else F.conv3d
    y = x.reshape(1, B * C, *S)
    for ax in range(sd):
        shape = [B * C, 1] + [1] * sd
        shape[2 + ax] = 2 * radius + 1
        pad = [0, 0] * sd
        pad[2 * (sd - 1 - ax)] = pad[2 * (sd - 1 - ax) + 1] = radius
        y = conv(F.pad(y, pad, mode="replicate"), w.reshape(shape), groups=B * C)  # (1, B*C, *S)
    return y.reshape(B, C, *S)


def strong(x: Tensor, generator: torch.Generator | None = None, *, p: float = 0.5,
           contrast: tuple[float, float] = (0.7, 1.3), brightness: float = 0.2,
           gamma: tuple[float, float] = (0.7, 1.5), noise: float = 0.1, blur: tuple[float, float] = (0.3, 1.0)) -> Tensor:
    """Strong (intensity) augmentation of a batch, each op applied per sample with probability ``p``.

    In this order, with per-sample mean m and std s of the input (so it works for [0, 1] and
    z-scored images alike): contrast ``(x - m) * c + m``, c ~ U(contrast); brightness ``x + b s``,
    b ~ U(-brightness, brightness); gamma on the sample's [min, max] range, g ~ log-uniform(gamma);
    Gaussian blur, sigma ~ U(blur) voxels; Gaussian noise of std ``n s``, n ~ U(0, noise).

    Args:
        x: (B, C, *S) float, S = 2 or 3 spatial axes, any device.
        generator: torch.Generator (any device) for every random draw; None uses the global RNG.
        p: probability of each op per sample.

    Returns:
        (B, C, *S) tensor on x's device and dtype. Not differentiable by design (data).
    """
    if x.ndim not in (4, 5) or not x.is_floating_point():
        raise ValueError(f"expected a float tensor (B, C, *S) with 2 or 3 spatial axes, got {x.dtype} {tuple(x.shape)}")
    B = x.shape[0]
    gdev = generator.device if generator is not None else torch.device("cpu")
    r = torch.rand(B, 10, generator=generator, device=gdev).to(x.device, x.dtype)  # (B, 10)
    eps = torch.randn(x.shape, generator=generator, device=gdev).to(x.device, x.dtype)  # (B, C, *S)
    on = r[:, :5] < p  # (B, 5) which ops apply
    bshape = (B,) + (1,) * (x.ndim - 1)
    dims = tuple(range(1, x.ndim))
    x = x.detach()
    mean = x.mean(dims, keepdim=True)  # (B, 1, ...)
    std = x.std(dims, keepdim=True).clamp_min(1e-6)
    c = torch.where(on[:, 0], contrast[0] + (contrast[1] - contrast[0]) * r[:, 5], torch.ones_like(r[:, 5]))
    y = torch.where(on[:, 0].view(bshape), (x - mean) * c.view(bshape) + mean, x)
    b = torch.where(on[:, 1], brightness * (2 * r[:, 6] - 1), torch.zeros_like(r[:, 6]))
    y = y + b.view(bshape) * std
    lg = torch.log(torch.tensor(gamma, dtype=x.dtype, device=x.device))
    g = torch.where(on[:, 2], torch.exp(lg[0] + (lg[1] - lg[0]) * r[:, 7]), torch.ones_like(r[:, 7]))
    lo, hi = y.amin(dims, keepdim=True), y.amax(dims, keepdim=True)
    span = (hi - lo).clamp_min(1e-6)
    y = torch.where(on[:, 2].view(bshape), ((y - lo) / span).clamp(0, 1) ** g.view(bshape) * span + lo, y)
    sig = torch.where(on[:, 3], blur[0] + (blur[1] - blur[0]) * r[:, 8], torch.zeros_like(r[:, 8]))
    if bool(on[:, 3].any()):
        y = gaussian_blur(y, sig, radius=max(1, int(np.ceil(2 * blur[1]))))
    n = torch.where(on[:, 4], noise * r[:, 9], torch.zeros_like(r[:, 9]))
    return y + eps * (n.view(bshape) * std)
