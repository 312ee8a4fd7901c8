"""Convert ACDC (MICCAI 2017 cardiac cine MRI) into a minissl store.

Where to get it: https://www.creatis.insa-lyon.fr/Challenge/acdc/ (registration; the data now live
on https://humanheart-project.creatis.insa-lyon.fr/database/). Unpack it anywhere; every
``patientXXX/`` folder holding an ``Info.cfg`` is found, e.g. ``<raw>/training/patient001/``::

    patient001/Info.cfg                        ED: 1, ES: 12, Group: DCM, Height, Weight, NbFrame
    patient001/patient001_frame01.nii.gz       the ED frame (X, Y, Z)
    patient001/patient001_frame01_gt.nii.gz    its labels 0 BG, 1 RV, 2 MYO, 3 LV
    patient001/patient001_frame12.nii.gz (+ _gt)   the ES frame

Command::

    python data_scripts/prepare_acdc.py RAW_DIR OUT_DIR        # [--force] [--budgets 1 3 7 14]

Output (``minissl.data.store`` layout; ``minissl.data.sources.open_data(OUT_DIR)`` opens it)::

    OUT_DIR/suite.json                         suite "acdc": 2D, 4 classes, slices zoomed to 256x256 (SSL4MIS)
    OUT_DIR/cases/patient001_frame01.h5        image float32 (Z, Y, X) in [0, 1], label uint8, spacing
    OUT_DIR/splits/{train,val,test}.txt        frames (both frames of a patient in one split)
    OUT_DIR/splits/labeled_<n>_seed<k>.txt     n = 1, 3, 7, 14 patients, k = 0-4

Choices:

* One case per annotated frame (ED and ES), id = the raw file stem (SSL4MIS renames them
  ``frame01`` / ``frame02``); ``patient_id`` groups the two frames, so splits and budgets never part
  them. Metadata: ``patient_id``, ``phase`` ("ED"/"ES" from Info.cfg), ``frame``, ``group``
  (pathology), ``height_cm``, ``weight_kg``, ``n_frames``, ``slice_positions_mm`` (world
  coordinates of voxel (0, 0, z) of every slice, nibabel's RAS+ frame), ``source``.
* Axes: nibabel gives (X, Y, Z); the store holds (Z, Y, X) and spacing (dz, dy, dx) in mm from
  the header. Intensities: per-volume min-max to [0, 1], as SSL4MIS does. No resampling here: the
  training pipeline decides how slices meet the 256x256 network input.
* Splits: the SSL4MIS patient lists (70 train / 10 val / 20 test, ``data/ACDC/*.list`` of
  https://github.com/HiLab-git/SSL4MIS), stored below as data. Their val list is already taken
  from outside test, so checkpoint selection never sees test. Patients no list names (e.g. the
  challenge's testing patients 101-150) are split by a seeded rule, 70% / 10% / 20%
  (``_common.seeded_split``, seed 0) and the script says how many.
* Budgets: 1 / 3 / 7 / 14 patients, saved for seeds 0-4 (``store.choose_labeled``).
  SSL4MIS itself labels the FIRST N patients of its train list (patients 99, 38, 50, ... in the
  order of ``SSL4MIS_TRAIN``); the seeded lists are different patients.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from minissl.data.store import Case, write_case

if __package__:
    from . import _common as common
else:  # run as a script: _common.py sits beside this file
    import _common as common

NAME = "prepare_acdc"
VERSION = 1
EXPECTED_PATIENTS = 100
BUDGETS = (1, 3, 7, 14)
CLASSES = ("background", "RV", "MYO", "LV")
# SSL4MIS patient lists (https://github.com/HiLab-git/SSL4MIS/tree/master/data/ACDC, train.list,
# val.list, test.list; two frames per patient there), patient numbers in the lists' order.
SSL4MIS_TRAIN = (99, 38, 50, 100, 58, 21, 49, 20, 72, 40, 60, 89, 4, 56, 98, 96, 31, 18, 94, 47, 48, 55, 97,
                 74, 43, 41, 63, 37, 95, 54, 26, 88, 32, 69, 6, 71, 12, 73, 61, 17, 25, 10, 57, 29, 51, 5, 36,
                 46, 62, 34, 76, 92, 70, 77, 67, 3, 91, 16, 14, 44, 42, 90, 53, 27, 35, 86, 23, 9, 79, 15)
SSL4MIS_VAL = (28, 85, 82, 87, 19, 30, 78, 45, 2, 39)
SSL4MIS_TEST = (11, 13, 84, 33, 93, 22, 68, 24, 83, 81, 80, 1, 7, 66, 8, 65, 75, 64, 59, 52)
_PATIENT = re.compile(r"^patient\d{3}$")


def published_splits() -> dict[str, list[str]]:
    """The SSL4MIS patient lists as patient ids (``patient001``)."""
    lists = {"train": SSL4MIS_TRAIN, "val": SSL4MIS_VAL, "test": SSL4MIS_TEST}
    return {k: [f"patient{n:03d}" for n in v] for k, v in lists.items()}


def read_info(path: Path) -> dict[str, Any]:
    """``Info.cfg`` as {key: value} (Height, Weight, NbFrame as numbers).

    Raises:
        ValueError: naming the file, when ED or ES is missing or not an integer, or a number is malformed.
    """
    info = common.read_raw(path, "Info.cfg", lambda p: dict(
        (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in p.read_text().splitlines()) if v))
    for key in ("ED", "ES"):
        if not info.get(key, "").isdigit():
            raise ValueError(f"{path}: expected an integer field {key!r}, got {info.get(key)!r} "
                             f"(fields found: {sorted(info)})")
    out: dict[str, Any] = dict(info)
    for key, kind in (("Height", float), ("Weight", float), ("NbFrame", int)):
        try:
            out[key] = kind(info[key]) if key in info else (float("nan") if kind is float else 0)
        except ValueError:
            raise ValueError(f"{path}: expected a number in field {key!r}, got {info[key]!r}") from None
    return out


def _nifti(folder: Path, stem: str) -> Path:
    """``stem.nii.gz``, or ``stem.nii`` when only that exists (the missing-file error names ``.nii.gz``)."""
    plain = folder / f"{stem}.nii"
    return plain if plain.is_file() and not (folder / f"{stem}.nii.gz").is_file() else folder / f"{stem}.nii.gz"


def read_frame(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], np.ndarray]:
    """One frame and its labels in store order.

    Returns:
        image float32 (Z, Y, X) in [0, 1], label uint8 (Z, Y, X), spacing (dz, dy, dx) mm,
        slice positions (Z, 3) mm.
    """
    def load(path: Path) -> tuple[np.ndarray, Any]:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
        if data.ndim != 3:
            raise ValueError(f"expected a 3D volume (X, Y, Z), got shape {data.shape}")
        return data, img

    raw, img = common.read_raw(image_path, "NIfTI image", load)
    lab, _ = common.read_raw(label_path, "NIfTI label", load)
    common.check_same_shape(raw, lab, image_path, label_path)
    if lab.dtype.kind == "f" and not np.array_equal(lab, np.round(lab)):
        raise ValueError(f"{label_path}: expected integer labels, got non-integer values")
    common.check_labels(lab, range(len(CLASSES)), label_path)
    raw = raw.astype(np.float32)
    lo, hi = float(raw.min()), float(raw.max())
    if not np.isfinite([lo, hi]).all() or hi <= lo:
        raise ValueError(f"{image_path}: expected a finite, non-constant image, got values in [{lo}, {hi}]")
    image = ((raw - lo) / (hi - lo)).transpose(2, 1, 0)  # (Z, Y, X)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    positions = np.stack([img.affine[:3, :3] @ np.array([0.0, 0.0, k]) + img.affine[:3, 3]
                          for k in range(raw.shape[2])])  # (Z, 3)
    return image, lab.astype(np.uint8).transpose(2, 1, 0), (zooms[2], zooms[1], zooms[0]), positions


def find_patients(raw_dir: Path) -> dict[str, Path]:
    """{patient id: folder} of every ``patientXXX/Info.cfg`` under ``raw_dir``."""
    folders = (cfg.parent for cfg in sorted(raw_dir.rglob("Info.cfg")))
    found = common.index_by_name(((d.name, d) for d in folders if _PATIENT.match(d.name)), "patient")
    if not found:
        raise ValueError(f"{raw_dir}: no ACDC patient folders found (expected patientXXX/Info.cfg, e.g. "
                         f"{raw_dir}/training/patient001/Info.cfg)")
    return found


def prepare(raw_dir: str | Path, out_dir: str | Path, *, budgets: Sequence[int] = BUDGETS,
            force: bool = False) -> Path:
    """Convert the raw ACDC folder into a store at ``out_dir`` (see the module docstring).

    Args:
        raw_dir: folder holding the ``patientXXX/`` folders (at any depth).
        out_dir: new, empty, or earlier output of this converter.
        budgets: labeled budgets in patients whose lists are saved for seeds 0-4.
        force: rebuild even when the output is up to date.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: a missing, unreadable or inconsistent raw file (the message names it), or a
            non-empty ``out_dir`` this converter did not write.
    """
    raw_dir = Path(raw_dir)
    patients = find_patients(raw_dir)
    print(common.count_line("ACDC", len(patients), EXPECTED_PATIENTS, "patients"))
    frames = []  # (case id, patient id, phase, frame, image path, label path, info)
    for pid, folder in patients.items():
        info = read_info(folder / "Info.cfg")
        for phase in ("ED", "ES"):
            frame = int(info[phase])
            if phase == "ES" and frame == int(info["ED"]):
                continue
            stem = f"{pid}_frame{frame:02d}"
            frames.append((stem, pid, phase, frame, _nifti(folder, stem), _nifti(folder, f"{stem}_gt"), info))
    options = {"version": VERSION, "budgets": list(budgets)}
    files = [f for fr in frames for f in fr[4:6] if f.is_file()] + [p / "Info.cfg" for p in patients.values()]
    digest = common.fingerprint(raw_dir, files, options)

    def build(root: Path) -> None:
        for cid, pid, phase, frame, image_path, label_path, info in frames:
            image, label, spacing, positions = read_frame(image_path, label_path)
            meta = {"patient_id": pid, "phase": phase, "frame": frame, "group": info.get("Group", ""),
                    "height_cm": info["Height"], "weight_kg": info["Weight"], "n_frames": info["NbFrame"],
                    "slice_positions_mm": positions, "source": str(image_path.relative_to(raw_dir))}
            write_case(root / "cases" / f"{cid}.h5", Case(cid, image, label, spacing, meta), len(CLASSES))
        by_patient = common.assign_splits(patients, published_splits(), {"test": 0.2, "val": 0.1, "train": 0.7},
                                          "ACDC: patients on no SSL4MIS list")
        splits = {name: [f[0] for f in frames if f[1] in set(ids)] for name, ids in by_patient.items()}
        written = common.write_suite(
            root, splits, common.count_budgets(budgets), converter=NAME, digest=digest, options=options,
            split_rule="SSL4MIS patient lists; other patients seeded 70/10/20", classes=CLASSES,
            patient_of={f[0]: f[1] for f in frames}, name="acdc", spatial_dims=2, patch_size=(256, 256),
            default_budget=max(1, min(7, len(by_patient["train"]))), default_iters=30000, zoom=True,
            description="ACDC cine MRI, ED and ES frames, RV/MYO/LV (SSL4MIS patient splits)")
        print(f"ACDC: {len(frames)} frames; train/val/test patients {common.split_sizes(by_patient)} "
              f"(expected 70/10/20); labeled lists for budgets {written} x seeds 0-4")

    return common.publish(out_dir, NAME, digest, build, force)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python data_scripts/prepare_acdc.py RAW_DIR OUT_DIR [--force] [--budgets ...]``."""
    return common.run_main(prepare, common.parser(__doc__, NAME, budgets=BUDGETS), argv)


if __name__ == "__main__":
    raise SystemExit(main())
