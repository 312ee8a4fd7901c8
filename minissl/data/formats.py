"""Users' image files in, masks out in the same format and geometry (``minissl predict``).

=================  ==========  ==========================================================================
suffix             library     what is kept in the mask file
=================  ==========  ==========================================================================
.nii, .nii.gz      nibabel     shape, affine and header (sform / qform, voxel sizes, units); uint8 data
.nrrd              pynrrd      shape, space, space directions, space origin, spacings, kinds, ...
.mha, .mhd         SimpleITK   shape, spacing, origin, direction (``CopyInformation``)
.png               pillow      size (and dpi); a uint8 label image whose pixel values are the classes
.h5, .hdf5         h5py        the store's case format: the image, spacing and attributes, plus the
                               mask as its ``label`` dataset (replacing a label the input held)
=================  ==========  ==========================================================================

Arrays are in minissl's order, (Y, X) or (Z, Y, X): NIfTI data (X, Y, Z) are transposed (pynrrd and
SimpleITK give C order already). Colour PNGs are converted to grey (pillow's "L" mode); 16-bit PNGs
keep their values. Trailing NIfTI axes of length 1 ((X, Y, Z, 1)) are dropped on reading and put
back on writing. ``ImageFile.spacing`` is the voxel size in mm in minissl's order (NIfTI voxel sizes,
NRRD ``space directions`` norms or ``spacings``, SimpleITK spacing, the store's ``spacing``), None for
a PNG or a NRRD without either (no physical size). A 4D image with more than one volume, a multi-component (vector) MHA or a
detached NRRD header (.nhdr) is refused with a ``ValueError`` naming the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .store import Case, read_case, write_case

SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".png", ".h5", ".hdf5")
_NRRD_DATA_KEYS = {"type", "dimension", "sizes", "endian", "encoding", "data file", "datafile",
                   "byte skip", "line skip"}  # describe the stored data, rewritten for the mask


@dataclass
class ImageFile:
    """An image read from a user's file, with what its mask file needs.

    Attributes:
        path: the file.
        image: float32 (Y, X) or (Z, Y, X).
        shape: the array shape as stored (before dropping trailing axes of length 1, in minissl order).
        header: the format's own description (nibabel image, NRRD header, SimpleITK image, PIL info,
            store Case).
        spacing: mm per axis of ``image`` ((Y, X) or (Z, Y, X)), or None when the file gives none.
    """

    path: Path
    image: np.ndarray
    shape: tuple[int, ...]
    header: Any
    spacing: tuple[float, ...] | None = None


def suffix(path: str | os.PathLike) -> str:
    """The format suffix of ``path`` (".nii.gz" counts as one), lower case.

    Raises:
        ValueError: not one of ``SUFFIXES`` (the message names the file and the supported ones).
    """
    name = Path(path).name.lower()
    found = next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)
    if found is None:
        raise ValueError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
    return found


def _squeeze(data: np.ndarray) -> np.ndarray:
    """Drop trailing axes of length 1 beyond the third (NIfTI order: (X, Y, Z, 1) -> (X, Y, Z))."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def read_image(path: str | os.PathLike) -> ImageFile:
    """Read one image file (see the module docstring for the formats).

    Raises:
        ValueError: unsupported suffix, unreadable file, or not a 2D / 3D single-channel image (names the file).
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    kind = suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"input image not found: {path}")
    try:
        if kind in (".nii", ".nii.gz"):
            import nibabel as nib

            try:
                header = nib.load(str(path))
            except nib.filebasedimages.ImageFileError as e:
                raise ValueError(str(e)) from e
            xyz = np.asanyarray(header.dataobj)  # (X, Y[, Z, ...]), scaling applied
            stored, data = xyz.T, _squeeze(xyz).T  # (..., Z, Y, X), (Z, Y, X) or (Y, X)
            spacing = tuple(float(z) for z in header.header.get_zooms()[:data.ndim])[::-1]
        elif kind == ".nrrd":
            import nrrd

            try:
                stored, header = nrrd.read(str(path), index_order="C")  # (Z, Y, X)
            except nrrd.NRRDError as e:
                raise ValueError(str(e)) from e
            data = stored
            spacing = _nrrd_spacing(header, data.ndim)
        elif kind in (".mha", ".mhd"):
            import SimpleITK as sitk

            header = sitk.ReadImage(str(path))
            if header.GetNumberOfComponentsPerPixel() != 1:
                raise ValueError(f"expected one component per pixel, got {header.GetNumberOfComponentsPerPixel()}")
            stored = data = sitk.GetArrayFromImage(header)  # (Z, Y, X)
            spacing = tuple(float(v) for v in header.GetSpacing())[::-1]
        elif kind == ".png":
            from PIL import Image

            with Image.open(path) as im:
                grey = im if im.mode in ("L", "I", "I;16", "F") else im.convert("L")
                stored = data = np.asarray(grey)
                header = dict(im.info)
            spacing = None
        else:
            header = read_case(path)
            stored = data = header.image
            spacing = tuple(header.spacing)
    except (OSError, RuntimeError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"could not read {path}: {e}") from e
    data = np.asarray(data)
    if data.ndim not in (2, 3):
        raise ValueError(f"{path}: expected a 2D or 3D single-channel image, got an array of shape {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: expected finite intensities, got NaN or Inf values")
    if spacing is not None and (len(spacing) != data.ndim or not all(np.isfinite(v) and v > 0 for v in spacing)):
        raise ValueError(f"{path}: expected {data.ndim} positive voxel sizes, got {spacing}")
    return ImageFile(path, data.astype(np.float32), tuple(np.shape(stored)), header, spacing)


def _nrrd_spacing(header: dict, ndim: int) -> tuple[float, ...] | None:
    """mm per axis in C order from a NRRD header (``space directions`` norms, else ``spacings``), or None."""
    if header.get("space directions") is not None:
        rows = [np.asarray(r, dtype=np.float64) for r in header["space directions"]]
        sizes = [float(np.linalg.norm(r)) for r in rows if np.all(np.isfinite(r))]  # NaN rows: non-spatial axes
    elif header.get("spacings") is not None:
        sizes = [float(v) for v in header["spacings"]]
    else:
        return None
    return tuple(sizes[::-1]) if len(sizes) == ndim else None


def write_mask(path: str | os.PathLike, mask: np.ndarray, like: ImageFile) -> Path:
    """Write a label map in the format of ``path`` with the geometry of the file it was predicted from.

    Args:
        path: the mask file (same suffix as ``like.path``); parent folders are created.
        mask: integer labels in [0, 255], shape ``like.image.shape``.
        like: the input, as :func:`read_image` returned it.

    Returns:
        The path written.
    """
    path, kind = Path(path), suffix(path)
    if kind != suffix(like.path):
        raise ValueError(f"{path}: expected the input's file type {suffix(like.path)!r}, got {kind!r}")
    if mask.shape != like.image.shape:
        raise ValueError(f"{path}: expected a mask of the image's shape {like.image.shape}, got {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"{path}: expected labels in [0, 255], got [{mask.min()}, {mask.max()}]")
    labels = mask.astype(np.uint8).reshape(like.shape)  # trailing axes of length 1 back
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind in (".nii", ".nii.gz"):
        import nibabel as nib

        header = like.header.header.copy()
        header.set_data_dtype(np.uint8)
        out = type(like.header)(np.ascontiguousarray(labels.T), like.header.affine, header)  # (X, Y, Z)
        out.header.set_slope_inter(1.0, 0.0)
        nib.save(out, str(path))
    elif kind == ".nrrd":
        import nrrd

        header = {k: v for k, v in like.header.items() if k not in _NRRD_DATA_KEYS}
        nrrd.write(str(path), labels, header, index_order="C")
    elif kind in (".mha", ".mhd"):
        import SimpleITK as sitk

        out = sitk.GetImageFromArray(labels)
        out.CopyInformation(like.header)
        sitk.WriteImage(out, str(path), True)
    elif kind == ".png":
        from PIL import Image

        dpi = like.header.get("dpi")
        Image.fromarray(labels, mode="L").save(path, **({"dpi": dpi} if dpi else {}))
    else:
        case: Case = like.header
        write_case(path, Case(case.id, case.image, labels, case.spacing, case.meta))
    return path
