"""Whole-case prediction at the resolution the run was trained at: zoomed to the patch, or windows at native size.

* ``zoom=True`` (``SuiteSpec.zoom``, the SSL4MIS ACDC recipe: training samples were zoomed to the
  patch): each 2D slice (3D: the volume) is resized to ``patch_size`` with bilinear / trilinear
  interpolation (``transforms.resize``, align_corners=False), predicted in batches of ``batch_size``,
  and the logits are resized back before softmax/argmax, so labels are decided at the original
  resolution (SSL4MIS instead zooms the hard labels back with nearest neighbour).
* ``zoom=False`` (training cropped ``patch_size`` windows at native resolution): an image (2D: each
  slice) smaller than the patch is zero-padded symmetrically to the patch (extra voxel at the end), then
  windows of ``patch_size`` start every ``int(patch * (1 - overlap))`` voxels per axis (the last window
  flush with the end); the softmax probabilities of overlapping windows are averaged with equal weight and
  the padding is cropped off. This is MONAI's ``sliding_window_inference`` with ``mode="constant"``
  (tested against it). An image of exactly the patch size is one window.
* ``patch_size=None`` (2D only) predicts slices at their own size.

A 2D run predicts a (Z, Y, X) volume slice by slice.

:func:`predict_files` segments users' image files (NIfTI, NRRD, MHA/MHD, PNG, HDF5; ``minissl predict``)
and writes each mask in its input's format and geometry (:mod:`minissl.data.formats`); a run whose store
resampled every image to one spacing (``SuiteSpec.target_spacing``) gets its inputs resampled to that
spacing and the probabilities resampled back to the input's grid.

The model is any callable x (B, 1, *P) -> logits (B, C, *P) already on ``device``; an ``nn.Module`` (or the
module of a bound method such as ``Method.predict``) is switched to eval mode for the call and restored
afterwards; everything runs under ``torch.no_grad``. One-channel (sigmoid) logits become the two
probabilities (1 - s, s), so label maps are always argmax over classes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from itertools import product

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.formats import read_image, suffix, write_mask
from .data.store import SuiteSpec
from .data.transforms import normalise, resize

Model = Callable[[torch.Tensor], torch.Tensor]
Post = Callable[[torch.Tensor], torch.Tensor]  # the model's output (b, C, *P) -> the maps averaged over windows


@contextmanager
def _eval_mode(model: Model):
    module = model if isinstance(model, nn.Module) else getattr(model, "__self__", None)
    was_training = module.training if isinstance(module, nn.Module) else None
    if was_training is not None:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            module.train()


def _probs(logits: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] == 1:
        s = torch.sigmoid(logits)                                   # (B, 1, *P)
        return torch.cat([1 - s, s], dim=1)                         # (B, 2, *P)
    return torch.softmax(logits, dim=1)                             # (B, C, *P)


def _predict_resized(model: Model, image: torch.Tensor, spatial_dims: int, patch_size: Sequence[int] | None,
                     batch_size: int, post: Post) -> torch.Tensor:
    size = tuple(image.shape[-spatial_dims:])
    items = image.reshape(-1, 1, *size)                             # (N, 1, *S): slices, or one volume
    out = []
    for start in range(0, items.shape[0], batch_size):
        x = items[start:start + batch_size]                         # (b, 1, *S)
        logits = model(resize(x, patch_size or size))               # (b, C, *patch)
        out.append(post(resize(logits.float(), size)))              # (b, C, *S)
    probs = torch.cat(out)                                          # (N, C, *S)
    return probs.movedim(1, 0).reshape(-1, *image.shape)            # (C, *image.shape)


def _starts(size: int, patch: int, overlap: float) -> list[int]:
    step = patch if size == patch else max(int(patch * (1 - overlap)), 1)
    starts = list(range(0, size - patch + 1, step))
    return starts if starts[-1] == size - patch else starts + [size - patch]


def _predict_windows(model: Model, image: torch.Tensor, patch_size: Sequence[int], batch_size: int,
                     overlap: float, post: Post) -> torch.Tensor:
    shape = image.shape
    pad = [max(p - s, 0) for p, s in zip(patch_size, shape)]
    flat_pad = [v for d in reversed(pad) for v in (d // 2, d - d // 2)]   # F.pad: last axis first
    vol = F.pad(image, flat_pad)                                    # (Z', Y', X') >= patch
    corners = list(product(*(_starts(s, p, overlap) for s, p in zip(vol.shape, patch_size))))
    acc, count = None, torch.zeros(vol.shape, device=vol.device)
    for i in range(0, len(corners), batch_size):
        windows = [tuple(slice(c, c + p) for c, p in zip(corner, patch_size))
                   for corner in corners[i:i + batch_size]]
        x = torch.stack([vol[w] for w in windows])[:, None]        # (b, 1, *P)
        probs = post(model(x).float())                              # (b, C, *P)
        if acc is None:
            acc = torch.zeros(probs.shape[1], *vol.shape, device=vol.device)   # (C, Z', Y', X')
        for w, p in zip(windows, probs):
            acc[(slice(None), *w)] += p
            count[w] += 1
    acc = acc / count                                               # (C, Z', Y', X')
    crop = tuple(slice(d // 2, d // 2 + s) for d, s in zip(pad, shape))
    return acc[(slice(None), *crop)]                                # (C, Z, Y, X)


def predict_probs(model: Model, image: np.ndarray | torch.Tensor, spatial_dims: int,
                  patch_size: Sequence[int] | None, batch_size: int = 8, device: str | torch.device = "cpu",
                  overlap: float = 0.5, zoom: bool = False) -> np.ndarray:
    """Class probabilities of a whole case.

    Args:
        model: callable x (B, 1, *P) -> logits (B, C, *P), already on ``device``.
        image: (Y, X) or (Z, Y, X) for ``spatial_dims=2``; (Z, Y, X) for ``spatial_dims=3``.
        spatial_dims: 2 (slice-wise) or 3 (volumes).
        patch_size: the network's input size, (H, W) or (D, H, W); None (2D only) keeps the slice size.
        batch_size: slices or windows per forward pass.
        device: where the image goes.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        zoom: predict each slice (3D: the volume) resized to ``patch_size`` (``SuiteSpec.zoom``) instead
            of sliding windows at native resolution.

    Returns:
        float32 array (C, *image.shape) (C = 2 for one-channel sigmoid models).
    """
    return _whole_case(model, _probs, image, spatial_dims, patch_size, batch_size, device, overlap, zoom)


def _whole_case(model: Model, post: Post, image: np.ndarray | torch.Tensor, spatial_dims: int,
                patch_size: Sequence[int] | None, batch_size: int, device: str | torch.device, overlap: float,
                zoom: bool) -> np.ndarray:
    image = torch.as_tensor(np.asarray(image), dtype=torch.float32, device=device)
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if image.ndim not in ((2, 3) if spatial_dims == 2 else (3,)):
        want = "(Y, X) or (Z, Y, X)" if spatial_dims == 2 else "(Z, Y, X)"
        raise ValueError(f"predict expected a {want} image for spatial_dims={spatial_dims}, "
                         f"got shape {tuple(image.shape)}")
    if (patch_size is None and spatial_dims == 3) or (patch_size is not None and len(patch_size) != spatial_dims):
        raise ValueError(f"patch_size must have {spatial_dims} entries, got {patch_size}")
    if not 0 <= overlap < 1 or batch_size < 1:
        raise ValueError(f"overlap must be in [0, 1) and batch_size >= 1, got {overlap} and {batch_size}")
    with _eval_mode(model):
        if zoom or patch_size is None or tuple(image.shape[-spatial_dims:]) == tuple(patch_size):
            maps = _predict_resized(model, image, spatial_dims, patch_size, batch_size, post)
        elif spatial_dims == 3 or image.ndim == 2:
            maps = _predict_windows(model, image, patch_size, batch_size, overlap, post)
        else:  # a 2D run on a volume: windows slice by slice
            maps = torch.stack([_predict_windows(model, sl, patch_size, batch_size, overlap, post) for sl in image], 1)
    return maps.cpu().numpy()


def predict_uncertainty(uncertainty: Model, image: np.ndarray | torch.Tensor, spatial_dims: int,
                        patch_size: Sequence[int] | None, batch_size: int = 8, device: str | torch.device = "cpu",
                        overlap: float = 0.5, zoom: bool = False) -> np.ndarray:
    """A method's uncertainty map of a whole case, resampled and averaged as :func:`predict_probs` does the
    probabilities (resized back to the slice size, or the mean over overlapping windows).

    Args:
        uncertainty: callable x (B, 1, *P) -> (B, *P), e.g. ``Method.uncertainty`` (its module is put in eval mode).
        image, spatial_dims, patch_size, batch_size, device, overlap, zoom: as :func:`predict_probs`.

    Returns:
        float32 array of ``image``'s shape.
    """
    def as_channel(x: torch.Tensor) -> torch.Tensor:
        u = uncertainty(x)                                          # (b, *P)
        if tuple(u.shape) != (x.shape[0], *x.shape[2:]):
            raise ValueError(f"uncertainty: expected a map of shape {(x.shape[0], *x.shape[2:])} for an input "
                             f"{tuple(x.shape)}, got {tuple(u.shape)}")
        return u[:, None]                                           # (b, 1, *P)

    with _eval_mode(uncertainty):
        maps = _whole_case(as_channel, lambda u: u, image, spatial_dims, patch_size, batch_size, device, overlap,
                           zoom)                                    # (1, *image.shape)
    return maps[0]


def predict_case(model: Model, image: np.ndarray | torch.Tensor, spatial_dims: int,
                 patch_size: Sequence[int] | None, batch_size: int = 8, device: str | torch.device = "cpu",
                 overlap: float = 0.5, zoom: bool = False) -> np.ndarray:
    """Label map (int64, same shape as ``image``) = argmax of :func:`predict_probs` (same arguments).

    Example:
        >>> from minissl.nets import UNet
        >>> net = UNet(1, 2, spatial_dims=2, width=4, depth=2)
        >>> predict_case(net, np.zeros((3, 20, 20)), 2, (16, 16)).shape
        (3, 20, 20)
    """
    probs = predict_probs(model, image, spatial_dims, patch_size, batch_size, device, overlap, zoom)
    return probs.argmax(0).astype(np.int64)


def _predict_at_spacing(model: Model, image: np.ndarray, spacing: Sequence[float], spec: SuiteSpec,
                        batch_size: int, device: str | torch.device, overlap: float) -> np.ndarray:
    """Label map of ``image`` (its own grid) predicted on the grid of ``spec.target_spacing``.

    The last ``spec.spatial_dims`` axes are resampled (linear) from ``spacing`` to the target spacing,
    the class probabilities predicted there are resampled (linear) back to ``image.shape``, then argmax.
    """
    sd = spec.spatial_dims
    shape = image.shape[-sd:]
    size = [max(1, round(n * s / t)) for n, s, t in zip(shape, spacing[-sd:], spec.target_spacing)]
    x = torch.as_tensor(image, dtype=torch.float32).reshape(-1, 1, *shape)          # (N, 1, *S)
    moved = resize(x, size).reshape(*image.shape[:-sd], *size).numpy()               # (..., *size)
    probs = predict_probs(model, moved, sd, spec.patch_size, batch_size, device, overlap, spec.zoom)
    probs = torch.from_numpy(probs).reshape(probs.shape[0], -1, *size).movedim(0, 1)  # (N, C, *size)
    back = resize(probs, shape).argmax(1)                                             # (N, *S)
    return back.reshape(image.shape).numpy().astype(np.int64)


def predict_files(model: Model, spec: SuiteSpec, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  device: str | torch.device = "cpu", intensity: str | None = None, batch_size: int = 8,
                  overlap: float = 0.5, spacing: Sequence[float] | None = None) -> list[Path]:
    """Segment image files with a trained model; each mask goes to ``out_dir/<input file name>``.

    What a file goes through is what the run's cases went through (read from its suite spec):

    * intensity: ``spec.intensity`` ("minmax", "zscore" or "none": what the store's images went
      through, over the whole image or volume; ``intensity`` overrides it). A store that also
      clipped (e.g. the Pancreas-CT HU window) or cropped its images expects inputs treated alike.
    * spacing: when the store resampled every image to ``spec.target_spacing`` (mm), the file is
      resampled from its own voxel size (``ImageFile.spacing``; for a 2D run on a volume, in-plane
      only) to that spacing, and the class probabilities back to the file's grid (both linear) before
      the argmax. A file without a physical voxel size (PNG) takes ``spacing``; without it, it is refused.
      ``target_spacing`` None: the file's own grid is used.
    * resolution: as the run's validation and test (:func:`predict_probs` with ``spec.zoom``): zoomed
      runs resize each slice (3D: the volume) to ``spec.patch_size`` and the logits back; the others
      slide ``patch_size`` windows over the image at its (resampled) grid.
    * dimensions: a 2D run segments a (Z, Y, X) volume slice by slice along Z (the NIfTI's third
      axis, SimpleITK's / NRRD's slowest); a 3D run refuses a 2D image.

    Args:
        model: callable x (B, 1, *P) -> logits (B, C, *P), on ``device`` (``Run.load_method().predict``).
        spec: the run's ``SuiteSpec`` (``spatial_dims``, ``patch_size``, ``num_classes``, ``zoom``, ``intensity``,
            ``target_spacing``).
        inputs: image files (:data:`minissl.data.formats.SUFFIXES`).
        out_dir: folder of the masks (created); it may not hold an input under its own name.
        device: where inference runs.
        intensity: override of ``spec.intensity``.
        batch_size, overlap: as :func:`predict_probs`.
        spacing: mm per pixel, (Y, X) or (Z, Y, X) as the files, of inputs whose file gives no voxel size.

    Returns:
        The mask files written, in the order of ``inputs``.

    Raises:
        ValueError: an unsupported or unreadable file, two inputs of one name, an output that would
            overwrite its input, a 2D image for a 3D run, or a file without voxel size for a run with a
            ``target_spacing`` and no ``spacing`` given (every input is checked before any is predicted).
    """
    out_dir, paths = Path(out_dir), [Path(p) for p in inputs]
    if not paths:
        raise ValueError("expected at least one input image, got none")
    for p in paths:
        suffix(p)  # unsupported types fail before anything is read
    names = [p.name for p in paths]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"inputs share the file names {dup}: their masks would overwrite each other in {out_dir}")
    for p in paths:
        if (out_dir / p.name).resolve() == p.resolve():
            raise ValueError(f"{p}: the mask would overwrite its input; choose another output folder than {out_dir}")
    files = [read_image(p) for p in paths]
    spacings = []
    for f in files:
        if spec.spatial_dims == 3 and f.image.ndim != 3:
            raise ValueError(f"{f.path}: a 3D run (patch {tuple(spec.patch_size)}, (Z, Y, X)) needs a 3D volume, "
                             f"got a 2D image of shape {f.image.shape}")
        sp = f.spacing if f.spacing is not None else (tuple(float(v) for v in spacing) if spacing else None)
        if spec.target_spacing is not None and sp is None:
            raise ValueError(f"{f.path}: the run's images were resampled to {tuple(spec.target_spacing)} mm and "
                             f"this file gives no voxel size; pass the input spacing (minissl predict --spacing)")
        if sp is not None and (len(sp) < spec.spatial_dims or not all(v > 0 for v in sp)):
            raise ValueError(f"{f.path}: expected at least {spec.spatial_dims} positive voxel sizes (mm), got {sp}")
        spacings.append(sp)
    written = []
    for f, sp in zip(files, spacings):
        image = normalise(f.image, intensity or spec.intensity)
        if spec.target_spacing is None:
            mask = predict_case(model, image, spec.spatial_dims, spec.patch_size, batch_size, device, overlap,
                                spec.zoom)
        else:
            mask = _predict_at_spacing(model, image, sp, spec, batch_size, device, overlap)
        written.append(write_mask(out_dir / f.path.name, mask, f))
    return written
