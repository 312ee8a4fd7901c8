"""Convert PSFH / PSFHS (pubic symphysis and fetal head, intrapartum ultrasound) into a minissl store.

Where to get it: https://zenodo.org/records/10969427 (PSFHS, 1358 images, Chen et al., Sci Data
2024); the MICCAI 2023 challenge set in the same format (4000 images) is at
https://zenodo.org/records/7851339 (https://ps-fh-aop-2023.grand-challenge.org/). Unpack it::

    <raw>/image_mha/00001.mha      the image, 256x256, stored as 3 channels (grey in each)
    <raw>/label_mha/00001.mha      the labels 256x256: 0 background, 1 pubic symphysis, 2 fetal head

Command::

    python data_scripts/prepare_psfh.py RAW_DIR OUT_DIR     # [--force] [--budget-percents 10 20]

Output (``minissl.data.store``)::

    OUT_DIR/suite.json                          suite "psfh": 2D, 3 classes, patch 256x256
    OUT_DIR/cases/00001.h5                      image float32 (Y, X), label uint8 {0, 1, 2}
    OUT_DIR/splits/{train,val,test}.txt         70% / 10% / 20% of the images
    OUT_DIR/splits/labeled_<n>_seed<k>.txt      n = 10% and 20% of the training images, k = 0-4

Choices:

* Pairs: every ``.mha`` in a folder whose name contains "image" is paired with the ``.mha`` of the
  same name in a folder whose name contains "label"; a missing partner is an error naming it.
* Labels kept as they are, 3 classes: 0 background, 1 pubic symphysis (PS), 2 fetal head (FH);
  any other value is an error naming the file. (ERSR trains on the fetal-head class alone:
  ``label == 2``.)
* Image: several channels (a vector pixel or a leading axis of 3) are averaged into one grey
  image; uint8 images are divided by 255, other types min-max scaled to [0, 1] per image.
* Spacing: the ``.mha`` header's pixel spacing (Y, X); these files carry no calibrated pixel size
  as far as the dataset paper states, so treat it as pixels unless your copy says otherwise.
* Splits: PSFH publishes no patient ids with the images and no standard semi-supervised split
  (ERSR does not publish its lists). Rule: image ids sorted, permuted with seed 0; the first 20%
  are test, the next 10% val, the rest train (``_common.seeded_split``). Each image is its own
  "patient" (``patient_id`` = image id): two images of one woman may fall in different splits.
* Budgets: 10% and 20% of the training images (rounded, at least 1) for seeds 0-4; suite.json
  ``standard_budgets`` maps "10%" / "20%" to the counts in the file names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from minissl.data.store import Case, write_case

if __package__:
    from . import _common as common
else:  # run as a script: _common.py sits beside this file
    import _common as common

NAME = "prepare_psfh"
VERSION = 1
EXPECTED_IMAGES = 1358
PERCENTS = (10, 20)
CLASSES = ("background", "pubic symphysis", "fetal head")


def find_pairs(raw_dir: Path) -> dict[str, tuple[Path, Path]]:
    """{image id: (image .mha, label .mha)}.

    Raises:
        ValueError: no images, a duplicate id, or an image without its label (names the file).
    """
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for p in sorted(raw_dir.rglob("*.mha")):
        folder = p.parent.name.lower()
        side = labels if "label" in folder else images if "image" in folder else None
        if side is None:
            continue
        if p.stem in side:
            raise ValueError(f"{p}: {p.name} found twice (also {side[p.stem]})")
        side[p.stem] = p
    if not images:
        raise ValueError(f"{raw_dir}: no PSFH images found (expected image_mha/*.mha and label_mha/*.mha)")
    label_dir = next(iter(labels.values())).parent if labels else raw_dir / "label_mha"
    for stem, p in images.items():
        if stem not in labels:
            raise ValueError(f"{label_dir / p.name}: missing label for image {p}")
    return {stem: (p, labels[stem]) for stem, p in images.items()}


def read_pair(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Image float32 (Y, X) in [0, 1], label uint8 (Y, X), spacing (dy, dx)."""
    def load(p: Path) -> tuple[np.ndarray, tuple[float, ...], int]:
        img = sitk.ReadImage(str(p))
        return sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetNumberOfComponentsPerPixel()

    raw, spacing, components = common.read_raw(image_path, "MHA image", load)
    lab, _, _ = common.read_raw(label_path, "MHA label", load)
    dtype = raw.dtype
    if components > 1:  # vector pixels (Y, X, C)
        raw = raw.mean(axis=-1)
    elif raw.ndim == 3 and raw.shape[0] in (1, 3, 4):  # channels stacked on a first axis (C, Y, X)
        raw = raw.mean(axis=0)
    if lab.ndim == 3 and lab.shape[0] == 1:
        lab = lab[0]
    if raw.ndim != 2 or lab.ndim != 2:
        raise ValueError(f"{image_path}: expected a 2D image and label, got shapes {raw.shape} and {lab.shape} "
                         f"(label {label_path})")
    common.check_same_shape(raw, lab, image_path, label_path)
    common.check_labels(lab, range(len(CLASSES)), label_path)
    if dtype == np.uint8:
        image = raw.astype(np.float32) / 255.0
    else:
        lo, hi = float(raw.min()), float(raw.max())
        if not hi > lo:
            raise ValueError(f"{image_path}: expected a non-constant image, got values in [{lo}, {hi}]")
        image = ((raw - lo) / (hi - lo)).astype(np.float32)
    return image, lab.astype(np.uint8), (float(spacing[1]), float(spacing[0]))


def prepare(raw_dir: str | Path, out_dir: str | Path, *, budget_percents: Sequence[float] = PERCENTS,
            force: bool = False) -> Path:
    """Convert the raw PSFH folder into a store at ``out_dir`` (see the module docstring).

    Args:
        raw_dir: folder holding ``image_mha/`` and ``label_mha/`` (at any depth).
        out_dir: new, empty, or earlier output of this converter.
        budget_percents: labeled budgets in percent of the training images (lists for seeds 0-4).
        force: rebuild even when the output is up to date.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: a missing, unreadable or inconsistent raw file (the message names it), or a
            non-empty ``out_dir`` this converter did not write.
    """
    raw_dir = Path(raw_dir)
    pairs = find_pairs(raw_dir)
    print(common.count_line("PSFH", len(pairs), EXPECTED_IMAGES, "image/label pairs") +
          " (the MICCAI 2023 challenge set has 4000)")
    options = {"version": VERSION, "budget_percents": list(budget_percents)}
    digest = common.fingerprint(raw_dir, [f for pair in pairs.values() for f in pair], options)

    def build(root: Path) -> None:
        for cid, (image_path, label_path) in pairs.items():
            image, label, spacing = read_pair(image_path, label_path)
            meta = {"patient_id": cid, "pixel_size_mm": list(spacing), "source": str(image_path.relative_to(raw_dir))}
            write_case(root / "cases" / f"{cid}.h5", Case(cid, image, label, spacing, meta), len(CLASSES))
        splits = common.seeded_split(pairs, {"test": 0.2, "val": 0.1, "train": 0.7})
        wanted = common.percent_budgets(budget_percents, len(splits["train"]))
        common.write_suite(
            root, splits, wanted, converter=NAME, digest=digest, options=options, classes=CLASSES,
            split_rule="image ids sorted, seeded permutation (seed 0): 20% test, 10% val, 70% train",
            name="psfh", spatial_dims=2, patch_size=(256, 256), default_budget=min(wanted.values()) if wanted else 1,
            default_iters=10000, description="PSFH intrapartum ultrasound: pubic symphysis and fetal head")
        print(f"PSFH: train/val/test {common.split_sizes(splits)}; labeled lists for {wanted} x seeds 0-4")

    return common.publish(out_dir, NAME, digest, build, force)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python data_scripts/prepare_psfh.py RAW_DIR OUT_DIR [--force] [--budget-percents ...]``."""
    return common.run_main(prepare, common.parser(__doc__, NAME, percents=PERCENTS, of="training images"), argv)


if __name__ == "__main__":
    raise SystemExit(main())
