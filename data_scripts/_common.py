"""What every converter in ``data_scripts/`` shares: safe output folders, split rules, labeled lists.

* **Output folder.** ``publish`` builds the whole store in a temporary sibling folder
  (``.<out>.partial-*``) and renames it into place, so a failure leaves no half-written output. It
  refuses a non-empty ``out_dir`` that this converter did not write (``suite.json`` without the
  matching ``converter`` key) and only ever deletes folders it created. A re-run whose raw files
  (relative path, size, modification time) and options are unchanged writes nothing and says
  "up to date"; ``force=True`` rebuilds, and when every file comes out byte-identical it says so.
  Otherwise the new build replaces the converter's earlier output as a whole (keep nothing of your
  own inside a converted folder).
* **Splits.** Cases are grouped by patient (or exam); ids on a published list keep its split, the
  others are split by ``seeded_split`` (sorted ids, ``np.random.default_rng(SPLIT_SEED)``
  permutation, consecutive parts). A validation split is always taken from training, never from
  test (``hold_out``).
* **Labeled lists.** ``write_suite`` (through ``minissl.data.store.write_store``) saves
  ``splits/labeled_<n>_seed<k>.txt`` for every standard budget and the seeds 0-4 (budgets count
  patients); ``fitting_budgets`` drops the budgets a small (partial) training set cannot hold.
"""
from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Sized, TypeVar

import numpy as np

from minissl.data.store import SuiteSpec, write_store

SPLIT_SEED = 0  # seed of every seeded split rule
VAL_FRACTION = 0.1  # validation share of the training patients where no published val list exists
T = TypeVar("T")


def read_raw(path: Path, what: str, reader: Callable[[Path], T]) -> T:
    """Read one raw file; a missing or unreadable file raises ValueError naming it and the problem.

    Args:
        path: the raw file.
        what: what the file should be, for the message (e.g. "NIfTI image").
        reader: function reading ``path``.

    Returns:
        Whatever ``reader`` returns.
    """
    if not path.is_file():
        raise ValueError(f"{path}: missing {what}")
    try:
        return reader(path)
    except Exception as e:  # every library reports corruption differently; name the file once here
        raise ValueError(f"{path}: could not read {what}: {type(e).__name__}: {e}") from e


def index_by_name(items: Iterable[tuple[str, Path]], what: str) -> dict[str, Path]:
    """{id: path} of the raw files or folders found, each id once.

    Args:
        items: (id, path) pairs in the order found, e.g. (folder name, case folder).
        what: what an id names ("patient", "case", "training image"), for the message.

    Raises:
        ValueError: an id comes twice (names both paths).
    """
    found: dict[str, Path] = {}
    for key, path in items:
        if key in found:
            raise ValueError(f"{path}: {what} {key} found twice (also {found[key]})")
        found[key] = path
    return found


def check_labels(label: np.ndarray, allowed: Sequence[int], path: Path) -> None:
    """Raise ValueError naming ``path`` when ``label`` holds values outside ``allowed``."""
    found = np.unique(label)
    bad = sorted(set(found.tolist()) - set(allowed))
    if bad:
        raise ValueError(f"{path}: expected label values {list(allowed)}, got {found.tolist()[:10]}")


def check_same_shape(image: np.ndarray, label: np.ndarray, image_path: Path, label_path: Path) -> None:
    """Raise ValueError naming both files when image and label shapes differ."""
    if image.shape != label.shape:
        raise ValueError(f"{label_path}: label shape {label.shape} differs from image shape {image.shape} "
                         f"of {image_path}")


def count_line(dataset: str, found: int, expected: int, unit: str) -> str:
    """'ACDC: 100 patients (expected 100)'; the line says when the counts differ."""
    note = "" if found == expected else ": fewer, a subset?" if found < expected else ": more, another release?"
    return f"{dataset}: {found} {unit} (expected {expected}{note})"


def crop_around_label(label: np.ndarray, margin: int, min_size: int, where: Path) -> tuple[slice, slice, slice]:
    """Crop box of a (Z, Y, X) volume around its foreground, in Y and X only (Z is kept whole).

    Each of Y and X spans the label's bounding box plus ``margin`` voxels on both sides, grown
    symmetrically to at least ``min_size`` voxels (the training patch), then clipped to the volume.

    Raises:
        ValueError: the label is empty (names ``where``).
    """
    if not label.any():
        raise ValueError(f"{where}: expected a non-empty label to crop around, got no foreground voxel")
    box = [slice(0, label.shape[0])]
    for axis in (1, 2):
        idx = np.flatnonzero(label.any(axis=tuple(a for a in range(3) if a != axis)))
        lo, hi = int(idx[0]) - margin, int(idx[-1]) + 1 + margin
        short = max(min_size - (hi - lo), 0)
        lo, hi = lo - short // 2, hi + short - short // 2
        box.append(slice(max(lo, 0), min(hi, label.shape[axis])))
    return box[0], box[1], box[2]


def zscore(image: np.ndarray, where: Path) -> np.ndarray:
    """``(image - mean) / std`` as float32; ValueError naming ``where`` for a constant or non-finite image."""
    mean, std = float(image.mean()), float(image.std())
    if not np.isfinite([mean, std]).all() or std == 0:
        raise ValueError(f"{where}: expected a finite, non-constant image, got mean {mean} and std {std}")
    return ((image - mean) / std).astype(np.float32)


# ----------------------------------------------------------------------------- splits and budgets
def share(fraction: float, n: int) -> int:
    """``fraction * n`` rounded half up (Python's ``round`` rounds half to even)."""
    return int(np.floor(fraction * n + 0.5))


def seeded_split(groups: Iterable[str], fractions: dict[str, float], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Split groups (patients, exams) by a seeded permutation into consecutive parts.

    Args:
        groups: group ids (duplicates ignored; sorted before permuting, so the input order is irrelevant).
        fractions: share of each split, in the order the parts are cut, e.g. {"test": 0.2, "val": 0.1,
            "train": 0.7}; the last split takes the remainder.
        seed: permutation seed.

    Returns:
        {split: sorted group ids}.
    """
    uniq = sorted(set(groups))
    order = [uniq[i] for i in np.random.default_rng(seed).permutation(len(uniq))]
    out, start = {}, 0
    names = list(fractions)
    for i, name in enumerate(names):
        stop = len(order) if i == len(names) - 1 else start + share(fractions[name], len(order))
        out[name] = sorted(order[start:stop])
        start = stop
    return out


def hold_out(groups: Sequence[str], fraction: float = VAL_FRACTION,
             seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """Take ``max(1, share(fraction, n))`` groups out of training for validation (seeded).

    Returns:
        (train groups, validation groups), both sorted; with fewer than 2 groups nothing is held out.
    """
    uniq = sorted(set(groups))
    if len(uniq) < 2:
        return uniq, []
    n_val = max(1, share(fraction, len(uniq)))
    order = np.random.default_rng(seed).permutation(len(uniq))
    val = sorted(uniq[i] for i in order[:n_val])
    return sorted(set(uniq) - set(val)), val


def assign_splits(groups: Iterable[str], published: dict[str, Iterable[str]], fallback: dict[str, float],
                  unlisted: str) -> dict[str, list[str]]:
    """Published split of each group where a list names it, a seeded split for the others.

    When no published list gives a validation split, it is held out of training (``hold_out``).

    Args:
        groups: the group ids found in the raw folder.
        published: {split: group ids} from the community's lists.
        fallback: fractions for ``seeded_split`` of the groups no list names.
        unlisted: start of the line printed when some groups are on no list, e.g.
            "LA: cases on neither UA-MT list" (it goes on with their count and the fallback shares).

    Returns:
        {'train', 'val', 'test': sorted group ids}.
    """
    groups = sorted(set(groups))
    where = {g: name for name, ids in published.items() for g in ids}
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    rest = [g for g in groups if g not in where]
    for g in groups:
        if g in where:
            out[where[g]].append(g)
    for name, ids in seeded_split(rest, fallback).items():
        out[name] += ids
    if rest:
        shares = "/".join(f"{fallback[k] * 100:g}" for k in ("train", "val", "test") if k in fallback)
        print(f"{unlisted}: {len(rest)} (split {shares} by the seeded rule)")
    out = {k: sorted(v) for k, v in out.items()}
    if "val" not in published:
        out["train"], out["val"] = hold_out(out["train"])
    return out


def split_sizes(splits: Mapping[str, Sized]) -> str:
    """'56/6/20': the sizes of the train, val and test splits, for the summary line a converter prints."""
    return "/".join(str(len(splits[k])) for k in ("train", "val", "test"))


def percent_budget(n_patients: int, percent: float) -> int:
    """Patients of a percentage budget: ``max(1, share(percent / 100, n_patients))``."""
    return max(1, share(percent / 100.0, n_patients))


def fitting_budgets(budgets: Sequence[int], patients: Sequence[str]) -> list[int]:
    """The budgets (in patients) that the training set can hold, each once, in increasing order."""
    n = len(set(patients))
    return sorted({int(b) for b in budgets if 1 <= b <= n})


# ----------------------------------------------------------------------------- the output folder
def fingerprint(raw_dir: Path, files: Iterable[Path], options: dict[str, Any]) -> str:
    """Digest of the raw files (relative path, size, modification time) and the conversion options."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for f in sorted(set(files)):
        st = f.stat()
        h.update(f"{f.relative_to(raw_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _written_by(out_dir: Path, converter: str) -> dict[str, Any] | None:
    """suite.json of ``out_dir`` if this converter wrote it; None if the folder is absent or empty.

    Raises:
        ValueError: ``out_dir`` is a file, or a non-empty folder this converter did not write.
    """
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir}: expected an output folder, got an existing file")
    if not any(out_dir.iterdir()):
        return None
    info: Any = None
    meta = out_dir / "suite.json"
    if meta.is_file():
        try:
            info = json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            info = None
    if not isinstance(info, dict) or info.get("converter") != converter:
        raise ValueError(f"{out_dir}: refusing to write into a non-empty folder that {converter} did not write "
                         f"(no suite.json with converter={converter!r}); choose a new or empty folder")
    return info


def _same_tree(a: Path, b: Path) -> bool:
    """True when both folders hold the same relative file paths with byte-identical contents."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def _new_sibling(out_dir: Path, kind: str) -> Path:
    """A new empty folder ``.<out>.<kind>-<pid>-<random>`` beside ``out_dir`` (created with the umask's mode)."""
    while True:
        path = out_dir.parent / f".{out_dir.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def publish(out_dir: str | os.PathLike, converter: str, digest: str, build: Callable[[Path], None],
            force: bool = False) -> Path:
    """Build a store with ``build(tmp)`` in a temporary sibling folder and rename it to ``out_dir``.

    Args:
        out_dir: destination folder (absent, empty, or written earlier by the same converter).
        converter: the converter's name, saved as ``suite.json["converter"]`` by ``build``.
        digest: ``fingerprint`` of the raw files and options, saved as ``suite.json["source_fingerprint"]``.
        build: writes the complete store into the folder it is given.
        force: rebuild even when ``out_dir`` already holds the same conversion.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: ``out_dir`` is foreign (see ``_written_by``); whatever ``build`` raises, after the
            temporary folder is removed.
    """
    out_dir = Path(out_dir)
    info = _written_by(out_dir, converter)
    if info is not None and info.get("source_fingerprint") == digest and not force:
        print(f"{out_dir}: up to date (same raw files and options); nothing written")
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(out_dir, "partial")
    try:
        build(tmp)
        if info is not None and _same_tree(tmp, out_dir):
            print(f"{out_dir}: rebuilt, every file identical to the existing output; nothing changed")
            return out_dir
        if out_dir.exists() and info is None:
            out_dir.rmdir()  # empty folder
        elif out_dir.exists():
            old = _new_sibling(out_dir, "old")
            os.replace(out_dir, old / "store")
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
            print(f"{out_dir}: replaced the earlier output of {converter}")
            return out_dir
        os.replace(tmp, out_dir)
        print(f"{out_dir}: written")
        return out_dir
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def count_budgets(budgets: Iterable[int]) -> dict[str, int]:
    """Budgets given in patients as {"7": 7}, each once, in increasing order."""
    return {str(b): b for b in sorted({int(b) for b in budgets})}


def percent_budgets(percents: Iterable[float], n_patients: int) -> dict[str, int]:
    """Budgets given in percent of ``n_patients`` as {"10%": patients} (``percent_budget``), in the given order."""
    return {f"{p:g}%": percent_budget(n_patients, p) for p in percents}


def write_suite(root: Path, splits: Mapping[str, Sequence[str]], budgets: Mapping[str, int], *, converter: str,
                digest: str, options: dict[str, Any], split_rule: str, classes: Sequence[str],
                patient_of: Mapping[str, str] | None = None, **spec: Any) -> list[int]:
    """Write suite.json, the split lists and the labeled lists of a store whose cases ``build`` wrote.

    suite.json holds the ``SuiteSpec`` and the keys every converter adds: ``converter``,
    ``source_fingerprint``, ``standard_budgets`` (the labels of the budgets written), ``options`` and
    ``split_rule``.

    Args:
        root: the store folder being built.
        splits: {'train', 'val', 'test': case ids}.
        budgets: the wanted standard budgets, {label: patients} (``count_budgets``, ``percent_budgets``);
            those the training patients cannot hold are not written (``fitting_budgets``).
        converter: the converter's name.
        digest: ``fingerprint`` of the raw files and options.
        options: the conversion options.
        split_rule: how the splits were made, in words.
        classes: one name per class (gives ``num_classes`` and ``class_names``).
        patient_of: patient id of each case; None: each case is its own patient.
        **spec: the other ``SuiteSpec`` fields (name, spatial_dims, patch_size, default_budget, ...).

    Returns:
        The budgets written (patients), in increasing order.
    """
    train = list(splits["train"])
    patients = None if patient_of is None else [patient_of[c] for c in train]
    written = fitting_budgets(list(budgets.values()), train if patients is None else patients)
    suite = SuiteSpec(n_train=len(train), n_val=len(splits["val"]), n_test=len(splits["test"]),
                      num_classes=len(classes), class_names=tuple(classes), **spec)
    extra = {"converter": converter, "source_fingerprint": digest,
             "standard_budgets": {k: v for k, v in budgets.items() if v in written}, "options": options,
             "split_rule": split_rule}
    write_store(root, suite, {k: splits[k] for k in ("train", "val", "test")}, extra, written, patients)
    return written


def parser(doc: str | None, name: str, *, budgets: Sequence[int] | None = None,
           percents: Sequence[float] | None = None, of: str = "patients") -> argparse.ArgumentParser:
    """Argument parser with the arguments every converter takes: RAW_DIR, OUT_DIR, --force, and the budgets.

    Args:
        doc: the converter's module docstring (its first paragraph is the description).
        name: the converter's name (the program name).
        budgets: default of ``--budgets`` (labeled budgets in patients); None: no such option.
        percents: default of ``--budget-percents`` (labeled budgets in percent); None: no such option.
        of: what the budgets count ("patients", "cases", "training exams"), for the help text.
    """
    p = argparse.ArgumentParser(prog=name, description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw_dir", type=Path, help="the dataset as downloaded (unpacked)")
    p.add_argument("out_dir", type=Path, help="new (or empty) folder for the minissl store")
    p.add_argument("--force", action="store_true", help="rebuild even when the output is up to date")
    if budgets is not None:
        p.add_argument("--budgets", type=int, nargs="+", default=list(budgets), help=f"labeled budgets ({of})")
    if percents is not None:
        p.add_argument("--budget-percents", type=float, nargs="+", default=list(percents),
                       help=f"labeled budgets in percent of the {of}")
    return p


def add_crop_options(p: argparse.ArgumentParser, margin: int, min_size: int, around: str) -> None:
    """Add ``--margin`` and ``--min-size``, the arguments of ``crop_around_label``, with their defaults.

    Args:
        p: the converter's parser.
        margin: default voxels kept around the label's bounding box in X and Y.
        min_size: default smallest crop in X and Y (voxels), the training patch.
        around: what the crop is around ("the atrium"), for the help text.
    """
    p.add_argument("--margin", type=int, default=margin, help=f"voxels kept around {around} in X and Y")
    p.add_argument("--min-size", type=int, default=min_size, help="smallest crop in X and Y (voxels)")


def run_main(prepare: Callable[..., Path], p: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` with ``p`` and call ``prepare``; print an error and return 1 on a ValueError."""
    args = p.parse_args(argv)
    kwargs = {k: v for k, v in vars(args).items() if k not in ("raw_dir", "out_dir")}
    try:
        prepare(args.raw_dir, args.out_dir, **kwargs)
    except ValueError as e:
        print(f"error: {e}")
        return 1
    return 0
