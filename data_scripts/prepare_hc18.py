"""Convert HC18 (fetal head circumference, 2D ultrasound) into a minissl store.

Where to get it: https://hc18.grand-challenge.org/ (files on Zenodo, https://zenodo.org/records/1327317).
Unpack ``training_set.zip`` next to ``training_set_pixel_size_and_HC.csv``::

    <raw>/training_set_pixel_size_and_HC.csv   filename, pixel size(mm), head circumference (mm)
    <raw>/training_set/000_HC.png               800x540 grey-level image
    <raw>/training_set/000_HC_Annotation.png    the head as a 1-pixel ellipse OUTLINE

Command::

    python data_scripts/prepare_hc18.py RAW_DIR OUT_DIR     # [--force] [--budget-percents 10 20]

Output (``minissl.data.store``)::

    OUT_DIR/suite.json                          suite "hc18": 2D, 2 classes, images zoomed to 224x224
    OUT_DIR/cases/000_HC.h5                     image float32 (Y, X) in [0, 1], label uint8 {0, 1}
    OUT_DIR/splits/{train,val,test}.txt         by exam: 70% / 10% / 20% of the exams
    OUT_DIR/splits/labeled_<n>_seed<k>.txt      n = 10% and 20% of the training exams, k = 0-4

Choices:

* Only the 999 annotated training images are converted (the 335 test images have no public
  annotation and reuse the same file names): images are looked up in folders named
  ``training_set`` and beside the CSV; images there that the CSV does not list are ignored and counted.
* Label: the outline (any non-zero pixel) filled with ``scipy.ndimage.binary_fill_holes``; the
  outline belongs to the head. The fill must enclose something: an outline that does not close is
  an error naming the annotation file (nothing is guessed).
* Spacing (pixel size, pixel size) in mm from the CSV; metadata ``pixel_size_mm``, ``hc_mm`` (the
  CSV's reference head circumference), ``patient_id`` = the exam (``010_HC`` and ``010_2HC`` are
  exam ``010``).
* Image: grey level / 255 (RGB PNGs are converted to grey by pillow's "L" mode), stored at its own
  800x540 grid; training zooms whole images to 224x224 (``zoom``: image linear, label nearest) and
  prediction zooms back, as HC18 methods resize the image: a 224-pixel window at native resolution
  would hold only part of a head that spans 300-600 pixels.
* Splits: HC18 has no standard semi-supervised split (ERSR, the reference method, does not publish
  its lists). Rule: the exam ids, sorted, permuted with seed 0; the first 20% are test, the next
  10% val, the rest train (``_common.seeded_split``). Two images of one exam always share a split.
* Budgets: 10% and 20% of the training exams (rounded, at least 1) for seeds 0-4; suite.json
  ``standard_budgets`` maps "10%" / "20%" to the patient counts in the file names.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from scipy.ndimage import binary_fill_holes

from minissl.data.store import Case, write_case

if __package__:
    from . import _common as common
else:  # run as a script: _common.py sits beside this file
    import _common as common

NAME = "prepare_hc18"
VERSION = 2
EXPECTED_IMAGES = 999
PERCENTS = (10, 20)
CLASSES = ("background", "head")
CSV_NAME = "training_set_pixel_size_and_HC.csv"
COLUMNS = ("filename", "pixel size(mm)", "head circumference (mm)")
_EXAM = re.compile(r"^(?P<exam>\d+)_\d*HC$")


def exam_of(stem: str) -> str:
    """'010_2HC' -> '010'; a stem of another form is its own exam."""
    m = _EXAM.match(stem)
    return m["exam"] if m else stem


def fill_outline(outline: np.ndarray, where: Path) -> np.ndarray:
    """Fill a closed outline (bool (Y, X)) into a mask that includes the outline.

    Raises:
        ValueError: the outline is empty or encloses nothing (names ``where``).
    """
    if not outline.any():
        raise ValueError(f"{where}: expected an ellipse outline, got an empty annotation")
    filled = binary_fill_holes(outline)
    inside = int(filled.sum() - outline.sum())
    if inside == 0:
        raise ValueError(f"{where}: the ellipse outline does not close ({int(outline.sum())} outline pixels, "
                         f"nothing enclosed), so it cannot be filled")
    return filled


def read_csv(path: Path) -> list[tuple[str, float, float]]:
    """Rows (filename, pixel size mm, HC mm) of the HC18 training CSV; ValueError naming the file and row."""
    def load(p: Path) -> list[dict[str, str]]:
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"expected columns {list(COLUMNS)}, missing {missing} (got {reader.fieldnames})")
            return list(reader)

    rows = []
    for i, row in enumerate(common.read_raw(path, "HC18 pixel-size CSV", load), start=2):
        try:
            size, hc = float(row[COLUMNS[1]]), float(row[COLUMNS[2]])
        except (TypeError, ValueError):
            raise ValueError(f"{path}, line {i}: expected numbers for pixel size and HC, got "
                             f"{row[COLUMNS[1]]!r}, {row[COLUMNS[2]]!r}") from None
        if not size > 0:
            raise ValueError(f"{path}, line {i}: expected a positive pixel size, got {size}")
        rows.append((row[COLUMNS[0]].strip(), size, hc))
    if not rows:
        raise ValueError(f"{path}: expected one row per training image, got none")
    return rows


def find_inputs(raw_dir: Path) -> tuple[Path, list[tuple[str, float, float, Path, Path]], int]:
    """The CSV, one (stem, pixel size, HC, image, annotation) per CSV row, and the count of unlisted images.

    Raises:
        ValueError: no (or several) CSVs, or a listed image / annotation missing (names the file).
    """
    found = sorted(raw_dir.rglob(CSV_NAME))
    if len(found) != 1:
        raise ValueError(f"{raw_dir}: expected one {CSV_NAME}, found {len(found)}: {[str(p) for p in found]}")
    rows = read_csv(found[0])
    images = common.index_by_name(  # training images only: the test set reuses the same file names
        ((p.name, p) for p in sorted(raw_dir.rglob("*.png")) if not p.name.endswith("_Annotation.png")
         and (p.parent.name == "training_set" or p.parent == found[0].parent)), "training image")
    items = []
    for name, size, hc in rows:
        image = images.get(name)
        if image is None:
            raise ValueError(f"{raw_dir / 'training_set' / name}: missing image listed in {found[0]}")
        annotation = image.with_name(f"{image.stem}_Annotation.png")
        items.append((image.stem, size, hc, image, annotation))
    return found[0], items, len(images) - len(items)


def read_pair(image_path: Path, annotation_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Image float32 (Y, X) in [0, 1] and the filled head mask uint8 (Y, X)."""
    def load(p: Path) -> np.ndarray:
        with Image.open(p) as im:
            return np.asarray(im.convert("L"))

    image = common.read_raw(image_path, "PNG image", load)
    outline = common.read_raw(annotation_path, "PNG annotation", load) > 0
    common.check_same_shape(image, outline, image_path, annotation_path)
    return image.astype(np.float32) / 255.0, fill_outline(outline, annotation_path).astype(np.uint8)


def prepare(raw_dir: str | Path, out_dir: str | Path, *, budget_percents: Sequence[float] = PERCENTS,
            force: bool = False) -> Path:
    """Convert the raw HC18 folder into a store at ``out_dir`` (see the module docstring).

    Args:
        raw_dir: folder holding the CSV and the ``training_set`` PNGs (at any depth).
        out_dir: new, empty, or earlier output of this converter.
        budget_percents: labeled budgets in percent of the training exams (lists for seeds 0-4).
        force: rebuild even when the output is up to date.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: a missing, unreadable or inconsistent raw file (the message names it), or a
            non-empty ``out_dir`` this converter did not write.
    """
    raw_dir = Path(raw_dir)
    csv_path, items, n_unlisted = find_inputs(raw_dir)
    print(common.count_line("HC18", len(items), EXPECTED_IMAGES, "annotated images"))
    if n_unlisted:
        print(f"HC18: {n_unlisted} images not in {CSV_NAME} (the unannotated test set?) are ignored")
    options = {"version": VERSION, "budget_percents": list(budget_percents)}
    files = [csv_path] + [f for it in items for f in it[3:5] if f.is_file()]
    digest = common.fingerprint(raw_dir, files, options)

    def build(root: Path) -> None:
        for stem, size, hc, image_path, annotation_path in items:
            image, label = read_pair(image_path, annotation_path)
            meta = {"patient_id": exam_of(stem), "pixel_size_mm": size, "hc_mm": hc,
                    "source": str(image_path.relative_to(raw_dir))}
            write_case(root / "cases" / f"{stem}.h5", Case(stem, image, label, (size, size), meta), len(CLASSES))
        exam = {it[0]: exam_of(it[0]) for it in items}
        by_exam = common.seeded_split(exam.values(), {"test": 0.2, "val": 0.1, "train": 0.7})
        splits = {name: sorted(c for c in exam if exam[c] in set(ids)) for name, ids in by_exam.items()}
        wanted = common.percent_budgets(budget_percents, len(by_exam["train"]))
        common.write_suite(
            root, splits, wanted, converter=NAME, digest=digest, options=options, classes=CLASSES,
            split_rule="exams sorted, seeded permutation (seed 0): 20% test, 10% val, 70% train", patient_of=exam,
            name="hc18", spatial_dims=2, patch_size=(224, 224), zoom=True, default_budget=min(wanted.values()) if wanted else 1,
            default_iters=10000, description="HC18 fetal head ultrasound, filled head ellipse, by exam")
        print(f"HC18: {len(exam)} images of {len(set(exam.values()))} exams; train/val/test images "
              f"{common.split_sizes(splits)}; labeled lists for {wanted} x seeds 0-4")

    return common.publish(out_dir, NAME, digest, build, force)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python data_scripts/prepare_hc18.py RAW_DIR OUT_DIR [--force] [--budget-percents ...]``."""
    return common.run_main(prepare, common.parser(__doc__, NAME, percents=PERCENTS, of="training exams"), argv)


if __name__ == "__main__":
    raise SystemExit(main())
