"""Convert NIH Pancreas-CT (TCIA) into a minissl store.

Where to get it: https://www.cancerimagingarchive.net/collection/pancreas-ct/ (82 contrast CT
scans as DICOM series, downloaded with the NBIA Data Retriever, plus the label archive
``TCIA_pancreas_labels-02-05-2017``). Unpack both under one folder::

    <raw>/Pancreas-CT/PANCREAS_0001/<study>/<series>/1-001.dcm ...   one DICOM series per patient
    <raw>/TCIA_pancreas_labels-02-05-2017/label0001.nii.gz            0 background, 1 pancreas

Command::

    python data_scripts/prepare_pancreas.py RAW_DIR OUT_DIR   # [--force] [--spacing 1 1 1] [--margin 25]

Output (``minissl.data.store``)::

    OUT_DIR/suite.json                          suite "pancreas": 3D, 2 classes, patch 96^3, target_spacing
    OUT_DIR/cases/PANCREAS_0001.h5              image float32 (Z, Y, X) z-scored, label uint8 {0, 1}
    OUT_DIR/splits/{train,val,test}.txt         56 / 6 / 20 cases for the full set
    OUT_DIR/splits/labeled_<n>_seed<k>.txt      n = 6, 12 cases, k = 0-4

Choices (after MC-Net's ``data/Pancreas/Pre-processing.ipynb``, the source of the 62/20 lists):

* CT: the one DICOM series under each ``PANCREAS_XXXX`` folder, read with SimpleITK's
  ``ImageSeriesReader`` (slices ordered by position, rescale slope/intercept applied, so values
  are HU). A ``.dcm`` file that is not part of the readable series is an error naming it.
* Label: read with SimpleITK. When its grid (size, origin, direction, spacing) equals the CT's,
  the arrays are used as they are; otherwise the label is resampled onto the CT grid in physical
  space (nearest neighbour) and ``label_resampled = 1``; losing more than 10% of the pancreas that
  way is an error naming the label file. Values other than 0 and 1 are an error.
* HU window [-125, 275] (clip), then resampling to ``--spacing`` (default 1 mm isotropic;
  (Z, Y, X) order) with ``scipy.ndimage.zoom``: image linear (order 1), label nearest (order 0).
  ``zoom`` maps the first and last voxel centres onto each other, so the spacing stored is the one
  actually reached, old spacing x (old size - 1) / (new size - 1), and voxel (0, 0, 0) keeps its position.
* Crop (MC-Net): in X and Y, the pancreas' bounding box plus ``--margin`` voxels (default 25),
  grown to at least 96 voxels, clipped; Z kept whole. The crop uses the ground truth, on test
  cases too (the community protocol). Then z-score over the cropped volume.
* Axes: SimpleITK arrays are (Z, Y, X), the store's order. Metadata: ``patient_id``,
  ``original_spacing_zyx``, ``hu_window``, ``crop_start_zyx`` / ``crop_stop_zyx`` (in the resampled
  grid), ``slice_positions_mm`` (LPS position of voxel (0, 0, z) of every stored slice),
  ``label_resampled``, ``source``.
* Splits: MC-Net's test list (20 patients; https://github.com/ycwu1997/MC-Net/blob/main/data/Pancreas/test.list)
  stored below as data; the other 62 of PANCREAS_0001-0082 are train. Validation: 10% of the
  training patients (6, seeded, ``_common.hold_out``), since the original protocol selects
  checkpoints on test. Patient numbers above 82 are split 80/20 by a seeded rule (the script says how many).
* Budgets: 6 / 12 patients (MC-Net's 10% / 20% of 62) for seeds 0-4, drawn from the 56 training cases.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import zoom

from minissl.data.store import Case, write_case

if __package__:
    from . import _common as common
else:  # run as a script: _common.py sits beside this file
    import _common as common

NAME = "prepare_pancreas"
VERSION = 2
EXPECTED_CASES = 82
BUDGETS = (6, 12)
CLASSES = ("background", "pancreas")
HU_WINDOW = (-125.0, 275.0)
PATCH = (96, 96, 96)
# MC-Net test list (https://github.com/ycwu1997/MC-Net/blob/main/data/Pancreas/test.list), patient numbers.
MCNET_TEST = (50, 59, 37, 60, 40, 74, 4, 46, 8, 54, 5, 73, 1, 39, 6, 67, 25, 51, 21, 9)
N_LISTED = 82  # PANCREAS_0001-0082: the test list plus the 62 training patients
_PATIENT = re.compile(r"^PANCREAS_(\d{4})$")
_LABEL = re.compile(r"^label(\d{4})\.nii(\.gz)?$")


def published_splits() -> dict[str, list[str]]:
    """MC-Net's 62 / 20 split as patient ids (``PANCREAS_0001``)."""
    test = {f"PANCREAS_{n:04d}" for n in MCNET_TEST}
    everyone = {f"PANCREAS_{n:04d}" for n in range(1, N_LISTED + 1)}
    return {"train": sorted(everyone - test), "test": sorted(test)}


def find_cases(raw_dir: Path) -> dict[str, tuple[Path, Path]]:
    """{patient id: (patient folder, label file)}.

    Raises:
        ValueError: no patients, a duplicate, or a patient without label / a label without CT (names the file).
    """
    folders = common.index_by_name(((d.name, d) for d in sorted(raw_dir.rglob("PANCREAS_*"))
                                    if d.is_dir() and _PATIENT.match(d.name)), "patient")
    labels = {f"PANCREAS_{m[1]}": p for p in sorted(raw_dir.rglob("label*.nii*")) if (m := _LABEL.match(p.name))}
    if not folders:
        raise ValueError(f"{raw_dir}: no Pancreas-CT patients found (expected PANCREAS_XXXX/ folders of DICOM files)")
    label_dir = next(iter(labels.values())).parent if labels else raw_dir / "TCIA_pancreas_labels-02-05-2017"
    for pid in folders:
        if pid not in labels:
            raise ValueError(f"{label_dir / ('label' + pid[-4:] + '.nii.gz')}: missing label of {folders[pid]}")
    for pid, path in labels.items():
        if pid not in folders:
            raise ValueError(f"{path}: label without a CT folder {pid}/ under {raw_dir}")
    return {pid: (folders[pid], labels[pid]) for pid in folders}


def read_series(folder: Path) -> sitk.Image:
    """The one DICOM series under ``folder`` (SimpleITK image, HU).

    Raises:
        ValueError: no series, several series, or ``.dcm`` files outside the readable series (names them).
    """
    dcm = sorted(folder.rglob("*.dcm"))
    dirs = sorted({p.parent for p in dcm})
    if len(dirs) != 1:
        raise ValueError(f"{folder}: expected one folder of DICOM files (*.dcm), found {len(dirs)}: "
                         f"{[str(d) for d in dirs[:5]]}")

    def load(d: Path) -> sitk.Image:
        reader = sitk.ImageSeriesReader()
        ids = reader.GetGDCMSeriesIDs(str(d))
        if len(ids) != 1:
            raise ValueError(f"expected one DICOM series, found {len(ids)}")
        names = reader.GetGDCMSeriesFileNames(str(d), ids[0])
        unread = sorted({str(p.resolve()) for p in dcm} - {str(Path(n).resolve()) for n in names})
        if unread:
            raise ValueError(f"{len(unread)} .dcm files are not part of the readable series, e.g. {unread[0]} "
                             f"(corrupt or from another series)")
        reader.SetFileNames(names)
        return reader.Execute()

    try:
        return load(dirs[0])
    except Exception as e:
        raise ValueError(f"{dirs[0]}: could not read the DICOM series: {type(e).__name__}: {e}") from e


def label_on_ct(ct: sitk.Image, label_path: Path) -> tuple[np.ndarray, bool]:
    """The label as a (Z, Y, X) uint8 array on the CT grid, and whether it had to be resampled."""
    lab = common.read_raw(label_path, "NIfTI label", lambda p: sitk.ReadImage(str(p)))
    same = (lab.GetSize() == ct.GetSize() and np.allclose(lab.GetSpacing(), ct.GetSpacing(), rtol=1e-3)
            and np.allclose(lab.GetOrigin(), ct.GetOrigin(), atol=1e-2)
            and np.allclose(lab.GetDirection(), ct.GetDirection(), atol=1e-3))
    values = sitk.GetArrayFromImage(lab)
    if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
        raise ValueError(f"{label_path}: expected integer labels, got non-integer values")
    common.check_labels(values, (0, 1), label_path)
    if same:
        return values.astype(np.uint8), False
    lab = sitk.Cast(lab, sitk.sitkUInt8)
    moved = sitk.GetArrayFromImage(sitk.Resample(lab, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    before = float(values.sum()) * float(np.prod(lab.GetSpacing()))
    after = float(moved.sum()) * float(np.prod(ct.GetSpacing()))
    if before > 0 and after < 0.9 * before:
        raise ValueError(f"{label_path}: the label's grid differs from the CT's and only {after / before:.0%} of "
                         f"the pancreas volume lies inside the CT after resampling (origin {lab.GetOrigin()} vs "
                         f"{ct.GetOrigin()}, size {lab.GetSize()} vs {ct.GetSize()})")
    return moved.astype(np.uint8), True


def prepare(raw_dir: str | Path, out_dir: str | Path, *, spacing: Sequence[float] = (1.0, 1.0, 1.0),
            margin: int = 25, min_size: int = 96, budgets: Sequence[int] = BUDGETS, force: bool = False) -> Path:
    """Convert the raw Pancreas-CT folder into a store at ``out_dir`` (see the module docstring).

    Args:
        raw_dir: folder holding the ``PANCREAS_XXXX/`` DICOM folders and the ``labelXXXX.nii.gz`` files.
        out_dir: new, empty, or earlier output of this converter.
        spacing: target spacing (dz, dy, dx) in mm.
        margin: voxels kept around the pancreas' bounding box in X and Y (after resampling).
        min_size: smallest crop in X and Y (voxels), the training patch.
        budgets: labeled budgets (patients) whose lists are saved for seeds 0-4.
        force: rebuild even when the output is up to date.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: a missing, unreadable or inconsistent raw file (the message names it), or a
            non-empty ``out_dir`` this converter did not write.
    """
    raw_dir = Path(raw_dir)
    target = tuple(float(s) for s in spacing)
    if len(target) != 3 or not all(s > 0 for s in target):
        raise ValueError(f"spacing: expected 3 positive values (dz, dy, dx) in mm, got {tuple(spacing)}")
    cases = find_cases(raw_dir)
    print(common.count_line("Pancreas-CT", len(cases), EXPECTED_CASES, "patients"))
    options = {"version": VERSION, "spacing": list(target), "margin": margin, "min_size": min_size,
               "hu_window": list(HU_WINDOW), "budgets": list(budgets)}
    files = [f for folder, label in cases.values() for f in [label, *folder.rglob("*.dcm")]]
    digest = common.fingerprint(raw_dir, files, options)

    def build(root: Path) -> None:
        for pid, (folder, label_path) in cases.items():
            ct = read_series(folder)
            label, resampled = label_on_ct(ct, label_path)
            hu = np.clip(sitk.GetArrayFromImage(ct).astype(np.float32), *HU_WINDOW)  # (Z, Y, X)
            old = tuple(float(s) for s in reversed(ct.GetSpacing()))  # (dz, dy, dx)
            factors = [o / t for o, t in zip(old, target)]
            image = zoom(hu, factors, order=1)
            label = zoom(label, factors, order=0)
            reached = tuple(o * (n - 1) / max(m - 1, 1) for o, n, m in zip(old, hu.shape, image.shape))
            box = common.crop_around_label(label, margin, min_size, label_path)
            direction = np.asarray(ct.GetDirection()).reshape(3, 3)
            positions = np.stack([np.asarray(ct.GetOrigin()) + direction[:, 2] * reached[0] * k
                                  for k in range(image.shape[0])])  # (Z, 3)
            meta = {"patient_id": pid, "original_spacing_zyx": list(old), "hu_window": list(HU_WINDOW),
                    "crop_start_zyx": [s.start for s in box], "crop_stop_zyx": [s.stop for s in box],
                    "slice_positions_mm": positions, "label_resampled": int(resampled),
                    "source": str(folder.relative_to(raw_dir))}
            case = Case(pid, common.zscore(image[box], folder), label[box], reached, meta)
            write_case(root / "cases" / f"{pid}.h5", case, len(CLASSES))
        split = common.assign_splits(cases, published_splits(), {"test": 0.2, "train": 0.8},
                                     "Pancreas-CT: patients outside PANCREAS_0001-0082")
        written = common.write_suite(
            root, split, common.count_budgets(budgets), converter=NAME, digest=digest, options=options, classes=CLASSES,
            split_rule="MC-Net 62/20 lists, val = seeded 10% of train; other patients seeded 80/20",
            name="pancreas", spatial_dims=3, patch_size=PATCH, default_budget=max(1, min(6, len(split["train"]))),
            default_iters=15000, intensity="zscore", target_spacing=target,
            description="NIH Pancreas-CT, HU window [-125, 275], 1 mm, cropped around the pancreas")
        print(f"Pancreas-CT: train/val/test {common.split_sizes(split)} (expected 56/6/20); "
              f"labeled lists for budgets {written} x seeds 0-4")

    return common.publish(out_dir, NAME, digest, build, force)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python data_scripts/prepare_pancreas.py RAW_DIR OUT_DIR [options]``."""
    p = common.parser(__doc__, NAME, budgets=BUDGETS, of="patients")
    p.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0], help="target (dz, dy, dx) in mm")
    common.add_crop_options(p, margin=25, min_size=96, around="the pancreas")
    return common.run_main(prepare, p, argv)


if __name__ == "__main__":
    raise SystemExit(main())
