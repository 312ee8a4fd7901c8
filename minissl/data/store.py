"""On-disk case store: one HDF5 file per case, split lists, labeled budgets, and the case-source interface.

Layout of a store root::

    <root>/suite.json                      the SuiteSpec (+ spacing, generator version, seed)
    <root>/cases/<case_id>.h5              dataset `image` float32 (Z, Y, X) or (Y, X),
                                           dataset `label` uint8 (same shape; optional),
                                           attrs `spacing` (mm per axis) + free metadata
    <root>/splits/{train,val,test}.txt     one case id per line
    <root>/splits/labeled_<n>_seed<k>.txt  the labeled subset of `train` for budget n and seed k

Budgets count **patients** (cases that share the `patient_id` attribute are labeled together; in the
embedded suites one case is one patient). A :class:`Budget` is ``(kind, n, seed)``: kind ``cases`` labels
every slice of the n drawn patients; kind ``slices:k`` draws the same patients but annotates only every
k-th slice along axis 0 (Z) of each of their volumes, from an offset drawn per case. Whoever writes a store (a suite builder, a converter) writes
the labeled lists of its standard budgets for seeds 0-4 (``write_store(..., budgets=...)``); any other
budget is drawn by the same deterministic rule when asked for and never written into the data folder.

Every reader of cases (this HDF5 store, the SSL4MIS-layout reader in ``ssl4mis.py``) is a
:class:`CaseStore`: ``.spec``, ``.split(name)``, ``.read(case_id)``, ``.labeled(budget, seed)``.
``sources.open_data`` returns the right one, and the datasets only ever talk to that interface.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import h5py
import numpy as np

from ..atomic import write_text_atomic

SPLITS = ("train", "val", "test")
STANDARD_SEEDS = (0, 1, 2, 3, 4)  # seeds of the labeled lists a store writer saves
INTENSITIES = ("minmax", "zscore", "none")  # SuiteSpec.intensity: what the stored images went through


@dataclass
class Case:
    """One case (patient / exam) held in memory.

    Attributes:
        id: case id (file stem).
        image: float32 (Y, X) or (Z, Y, X).
        label: uint8 of the same shape, or None for an unlabeled-only case.
        spacing: mm per axis, one entry per image axis.
        meta: free metadata (patient_id, pixel_size_mm, slice_positions, phase, ...).
    """

    id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SuiteSpec:
    """What a training run needs to know about a suite (written as ``suite.json``).

    Attributes:
        name: suite name.
        spatial_dims: 2 (trained on 2D images or slices) or 3 (trained on 3D patches).
        num_classes: number of classes including background.
        patch_size: training input size, (Y, X) or (Z, Y, X).
        n_train, n_val, n_test: cases per split.
        default_budget: labeled training cases (patients) by default (10% of train, at least 2).
        default_iters: training iterations of the default recipe on 2 CPU cores.
        class_names: one name per class.
        description: one line for humans.
        zoom: how training samples are made and cases predicted. False (default): training crops
            ``patch_size`` windows at native resolution (padding smaller images). True (the SSL4MIS
            ACDC recipe): each 2D image / slice (3D: volume) is zoomed to ``patch_size`` for training
            (image linear, label nearest), and cases are predicted at ``patch_size`` and zoomed back.
        intensity: what the stored images went through, so that new images can be treated alike
            (``minissl predict``): "minmax" (each image scaled to [0, 1] by its min and max, or a
            fixed division such as /255 that does the same), "zscore" ((x - mean) / std per image or
            volume) or "none" (used as they are).
        target_spacing: mm per axis of a training image ((Y, X) or (Z, Y, X)) when the store resampled
            every image to one spacing (Pancreas-CT 1 mm, brain_tissue 1.5 mm); ``minissl predict``
            resamples inputs to it and the mask back. None: images kept their own spacing.
    """

    name: str
    spatial_dims: int
    num_classes: int
    patch_size: tuple[int, ...]
    n_train: int
    n_val: int
    n_test: int
    default_budget: int
    default_iters: int
    class_names: tuple[str, ...]
    description: str = ""
    zoom: bool = False
    intensity: str = "minmax"
    target_spacing: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"suite spec field {name!r}: expected {expected}, got {getattr(self, name)!r}")

        def count(v: Any, low: int) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= low

        if self.spatial_dims not in (2, 3) or isinstance(self.spatial_dims, bool):
            fail("spatial_dims", "2 or 3")
        if not count(self.num_classes, 2):
            fail("num_classes", "an integer >= 2 (background included)")
        if len(self.patch_size) != self.spatial_dims or not all(count(p, 1) for p in self.patch_size):
            fail("patch_size", f"{self.spatial_dims} positive integers (spatial_dims={self.spatial_dims})")
        for name in ("n_train", "n_val", "n_test"):
            if not count(getattr(self, name), 0):
                fail(name, "an integer >= 0")
        for name in ("default_budget", "default_iters"):
            if not count(getattr(self, name), 1):
                fail(name, "an integer >= 1")
        if len(self.class_names) != self.num_classes:
            fail("class_names", f"{self.num_classes} names (num_classes={self.num_classes})")
        if not isinstance(self.zoom, bool):
            fail("zoom", "true or false")
        if self.intensity not in INTENSITIES:
            fail("intensity", f"one of {INTENSITIES}")
        ts = self.target_spacing
        if ts is not None and not (isinstance(ts, tuple) and len(ts) == self.spatial_dims and all(
                isinstance(v, (int, float)) and np.isfinite(v) and v > 0 for v in ts)):
            fail("target_spacing", f"None or {self.spatial_dims} positive mm values")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SuiteSpec":
        """Build from a dict, ignoring unknown keys (suite.json carries extra ones)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("patch_size", "class_names", "target_spacing"):
            if k in kw and not (k == "target_spacing" and kw[k] is None):
                if not isinstance(kw[k], (list, tuple)):
                    raise ValueError(f"suite spec field {k!r}: expected a list, got {kw[k]!r}")
                kw[k] = tuple(kw[k])
        missing = {f.name for f in fields(cls) if f.default is MISSING} - set(kw)
        if missing:
            raise ValueError(f"suite spec is missing keys {sorted(missing)}; got keys {sorted(d)}")
        return cls(**kw)


# ----------------------------------------------------------------------------- single files
def _check_case(image: np.ndarray, label: np.ndarray | None, num_classes: int | None, where: str) -> None:
    if image.ndim not in (2, 3):
        raise ValueError(f"{where}: expected image of shape (Y, X) or (Z, Y, X), got shape {image.shape}")
    if image.dtype.kind in "fc" and not np.isfinite(image).all():
        n_nan, n_inf = int(np.isnan(image).sum()), int(np.isinf(image).sum())
        raise ValueError(f"{where}: expected finite image values, got {n_nan} NaN and {n_inf} Inf "
                         f"of {image.size} voxels")
    if label is None:
        return
    if label.shape != image.shape:
        raise ValueError(f"{where}: image/label shape mismatch: image {image.shape}, label {label.shape}")
    if label.dtype.kind == "f" and not np.array_equal(label, np.round(label)):
        raise ValueError(f"{where}: expected an integer label map, got non-integer values of dtype {label.dtype}")
    if num_classes is not None and label.size:
        lo, hi = int(label.min()), int(label.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{where}: labels must lie in [0, {num_classes - 1}] (num_classes={num_classes}), "
                             f"got values in [{lo}, {hi}]")


def _attr(v: Any) -> Any:
    if isinstance(v, (str, bytes)):
        return v.decode() if isinstance(v, bytes) else v
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_case(path: str | os.PathLike, num_classes: int | None = None, *, case_id: str | None = None) -> Case:
    """Read one case file.

    Args:
        path: ``<root>/cases/<id>.h5``.
        num_classes: when given, labels outside [0, num_classes) raise ValueError.
        case_id: id to give the case (default: the file stem).

    Returns:
        Case with image float32 (Y, X) or (Z, Y, X) and label uint8 of the same shape (or None).

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        ValueError: the file is not a readable HDF5 case (names it), or the content is inconsistent.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"case file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise KeyError(f"no dataset 'image' (found {sorted(f.keys())})")
            image = np.asarray(f["image"][()], dtype=np.float32)
            label = np.asarray(f["label"][()]) if "label" in f else None
            attrs = {k: _attr(v) for k, v in f.attrs.items()}
    except (OSError, KeyError, TypeError, ValueError) as e:  # truncated, corrupt or not HDF5
        raise ValueError(f"could not read HDF5 case file {path}: {e}") from e
    _check_case(image, label, num_classes, str(path))
    raw = attrs.pop("spacing", [1.0] * image.ndim)
    try:
        spacing = tuple(float(v) for v in np.atleast_1d(raw))
    except (TypeError, ValueError):
        spacing = ()
    if len(spacing) != image.ndim or not all(np.isfinite(v) and v > 0 for v in spacing):
        raise ValueError(f"{path}: expected {image.ndim} positive finite spacing values, got {raw!r}")
    label = None if label is None else label.astype(np.uint8)
    return Case(case_id or path.stem, image, label, spacing, attrs)


def write_case(path: str | os.PathLike, case: Case, num_classes: int | None = None) -> Path:
    """Write one case atomically (a temporary file beside it, then ``os.replace``).

    Args:
        path: destination ``.h5`` file (parent folders are created).
        case: the case; ``image`` is stored as float32, ``label`` as uint8, ``meta`` as attributes.
        num_classes: when given, labels outside [0, num_classes) raise ValueError.

    Returns:
        The path written.
    """
    path = Path(path)
    image = np.asarray(case.image)
    label = None if case.label is None else np.asarray(case.label)
    _check_case(image, label, num_classes, f"case {case.id!r}")
    if label is not None and label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"case {case.id!r}: labels must fit uint8 [0, 255], got [{label.min()}, {label.max()}]")
    if len(case.spacing) != image.ndim:
        raise ValueError(f"case {case.id!r}: expected {image.ndim} spacing values, got {tuple(case.spacing)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w", track_order=True) as f:
            f.create_dataset("image", data=image.astype(np.float32), track_times=False)
            if label is not None:
                f.create_dataset("label", data=label.astype(np.uint8), track_times=False)
            f.attrs["spacing"] = np.asarray(case.spacing, dtype=np.float64)
            for k, v in case.meta.items():
                f.attrs[k] = v
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_list(path: str | os.PathLike) -> list[str]:
    """Non-empty stripped lines of a text file (a split list)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    return [s.strip() for s in path.read_text().splitlines() if s.strip()]


def budget_file(root: str | os.PathLike, budget: int, seed: int) -> Path:
    """``<root>/splits/labeled_<budget>_seed<seed>.txt``: the saved labeled list of (budget, seed)."""
    return Path(root) / "splits" / f"labeled_{budget}_seed{seed}.txt"


def duplicates(ids: Sequence[str]) -> list[str]:
    """Ids listed more than once, each once, in order of first repetition."""
    counts = Counter(ids)
    return [c for c, n in counts.items() if n > 1]


def labeled_list_problems(ids: Sequence[str], train: Sequence[str], where: str) -> list[str]:
    """What is wrong with a labeled list (empty, duplicates, ids outside ``train``); [] if nothing."""
    out = []
    if not ids:
        out.append(f"{where}: expected at least one labeled case, got an empty list")
    if dup := duplicates(ids):
        out.append(f"{where}: expected each case once, got duplicates {dup[:5]}")
    if bad := sorted(set(ids) - set(train)):
        out.append(f"{where}: expected training case ids, got ids not in train: {bad[:5]}")
    return out


BUDGET_KINDS = "cases or slices:<k> (k >= 1)"  # what a budget kind may be


def slice_step(kind: str) -> int:
    """The annotation step k of a budget kind: 0 for ``cases``, k for ``slices:<k>``.

    Raises:
        ValueError: ``kind`` is neither ``cases`` nor ``slices:<k>`` with an integer k >= 1.
    """
    if kind == "cases":
        return 0
    found = re.fullmatch(r"slices:([1-9][0-9]*)", str(kind))
    if found is None:
        raise ValueError(f"budget kind: expected {BUDGET_KINDS}, got {kind!r}")
    return int(found.group(1))


@dataclass(frozen=True)
class Budget:
    """A labeled budget ``(kind, n, seed)``.

    Attributes:
        n: labeled patients, drawn by ``CaseStore.labeled(n, seed)`` for either kind.
        seed: the draw's seed (patients, and the first annotated slice of each case).
        kind: ``cases`` (every slice of a labeled case is annotated) or ``slices:<k>`` (every k-th slice
            along axis 0 of each labeled (Z, Y, X) case, starting at an offset in ``[0, min(k, Z))``
            drawn from ``(seed, crc32(case id))``, so at least one slice per case is annotated).
    """

    n: int
    seed: int = 0
    kind: str = "cases"

    def __post_init__(self) -> None:
        slice_step(self.kind)

    @property
    def step(self) -> int:
        """k of ``slices:<k>``; 0 for ``cases``."""
        return slice_step(self.kind)

    def annotated(self, case_id: str, n_slices: int) -> np.ndarray:
        """(n_slices,) bool: the annotated slices (axis 0) of the labeled case ``case_id``."""
        k = self.step
        if k == 0:
            return np.ones(n_slices, dtype=bool)
        offset = int(np.random.default_rng([self.seed, zlib.crc32(case_id.encode())]).integers(min(k, n_slices)))
        return np.arange(n_slices) % k == offset


def choose_labeled(case_ids: Sequence[str], patients: Sequence[str], budget: int, seed: int) -> list[str]:
    """Deterministically choose ``budget`` patients among the training cases and return their cases.

    Args:
        case_ids: training case ids.
        patients: patient id of each case (same length); cases of one patient go together.
        budget: number of patients to label, 1 <= budget <= number of patients.
        seed: selection seed (numpy PCG64 permutation of the sorted patient ids).

    Returns:
        The labeled case ids, in the order of ``case_ids``.
    """
    if len(patients) != len(case_ids):
        raise ValueError(f"expected one patient id per case ({len(case_ids)}), got {len(patients)}")
    uniq = sorted(set(patients))
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be a positive number of patients, got {budget!r}")
    if budget > len(uniq):
        raise ValueError(f"budget {budget} is larger than the training set ({len(uniq)} patients, "
                         f"{len(case_ids)} cases)")
    order = np.random.default_rng(seed).permutation(len(uniq))
    chosen = {uniq[i] for i in order[:budget]}
    return [c for c, p in zip(case_ids, patients) if p in chosen]


# ----------------------------------------------------------------------------- case sources
class CaseStore:
    """Interface of every case source (HDF5 store, SSL4MIS layouts, ...).

    Subclasses set ``root`` and ``spec`` and implement ``split`` and ``read``; ``patients`` and
    ``labeled`` have generic implementations that subclasses may override.
    """

    root: Path
    spec: SuiteSpec

    def split(self, name: str) -> list[str]:
        """Case ids of split ``name`` ('train', 'val', 'test')."""
        raise NotImplementedError

    def read(self, case_id: str) -> Case:
        """Load one case (image, label, spacing, meta), validated against ``spec.num_classes``."""
        raise NotImplementedError

    def patients(self, case_ids: Iterable[str]) -> list[str]:
        """Patient id of each case (default: ``meta['patient_id']``, else the case id)."""
        return [str(self.read(c).meta.get("patient_id", c)) for c in case_ids]

    def has_label(self, case_ids: Iterable[str]) -> list[bool]:
        """Whether each case carries a label (default: every case does)."""
        return [True for _ in case_ids]

    def labeled(self, budget: int, seed: int = 0) -> list[str]:
        """Labeled training case ids for a budget counted in patients (``choose_labeled``; never written).

        Only training cases that carry a label can be drawn; unlabeled-only cases stay unlabeled.

        Raises:
            ValueError: budget < 1 or larger than the number of training patients with labels.
        """
        train = self.split("train")
        train = [c for c, ok in zip(train, self.has_label(train)) if ok]
        return choose_labeled(train, self.patients(train), budget, seed)

    def problems(self) -> list[str]:
        """What is wrong in the store's own files besides the cases (list files); [] if nothing.

        ``sources.check_store`` adds the split-level and per-case checks.
        """
        return []

    def unlabeled(self, budget: int, seed: int = 0) -> list[str]:
        """Training case ids that are not labeled for (budget, seed)."""
        lab = set(self.labeled(budget, seed))
        return [c for c in self.split("train") if c not in lab]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, suite={self.spec.name!r})"


class H5Store(CaseStore):
    """The native store: ``suite.json`` + ``cases/*.h5`` + ``splits/*.txt``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        meta_path = self.root / "suite.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"not a minissl store (no suite.json): {self.root}")
        try:
            self.info: dict[str, Any] = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"could not parse {meta_path}: {e}") from e
        if not isinstance(self.info, dict):
            raise ValueError(f"{meta_path}: expected a JSON object, got {type(self.info).__name__}")
        try:
            self.spec = SuiteSpec.from_dict(self.info)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{meta_path}: {e}") from e

    def case_path(self, case_id: str) -> Path:
        """``<root>/cases/<case_id>.h5``."""
        return self.root / "cases" / f"{case_id}.h5"

    def split(self, name: str) -> list[str]:
        return read_list(self.root / "splits" / f"{name}.txt")

    def read(self, case_id: str) -> Case:
        return read_case(self.case_path(case_id), self.spec.num_classes, case_id=case_id)

    def labeled(self, budget: int, seed: int = 0) -> list[str]:
        """The saved labeled list of (budget, seed) if the store has one, else drawn (never written).

        Raises:
            ValueError: a saved list is empty, repeats a case or names cases outside train; or the
                budget is < 1 or larger than the number of training patients.
        """
        path = budget_file(self.root, budget, seed)
        if not path.is_file():
            return super().labeled(budget, seed)
        ids = read_list(path)
        found = labeled_list_problems(ids, self.split("train"), str(path))
        if found:
            raise ValueError("; ".join(found))
        return ids

    def problems(self) -> list[str]:
        """Problems of the saved labeled lists ``splits/labeled_<n>_seed<k>.txt``."""
        found: list[str] = []
        files = sorted((self.root / "splits").glob("labeled_*.txt"))
        train = self.split("train") if files else []
        for path in files:
            found += labeled_list_problems(read_list(path), train, str(path))
        return found

    def _headers(self, case_ids: Iterable[str], get: Callable[[h5py.File, str], Any]) -> list[Any]:
        out = []
        for c in case_ids:  # attributes and dataset names only: no pixel data is read
            p = self.case_path(c)
            if not p.is_file():
                raise FileNotFoundError(f"case file not found: {p}")
            try:
                with h5py.File(p, "r") as f:
                    out.append(get(f, c))
            except OSError as e:
                raise ValueError(f"could not read HDF5 case file {p}: {e}") from e
        return out

    def patients(self, case_ids: Iterable[str]) -> list[str]:
        return self._headers(case_ids, lambda f, c: str(_attr(f.attrs.get("patient_id", c))))

    def has_label(self, case_ids: Iterable[str]) -> list[bool]:
        return self._headers(case_ids, lambda f, c: "label" in f)


def write_store(root: str | os.PathLike, spec: SuiteSpec, splits: dict[str, Sequence[str]],
                extra: dict[str, Any] | None = None, budgets: Sequence[int] = (),
                patients: Sequence[str] | None = None, unlabeled: Sequence[str] = ()) -> Path:
    """Write ``suite.json``, the split lists and the standard labeled lists of a store.

    Args:
        root: store root (cases are, or will be, in ``cases/``).
        spec: the suite spec.
        splits: {'train': [...], 'val': [...], 'test': [...]} case ids.
        extra: more keys for suite.json (spacing, generator version, seed, ...).
        budgets: standard budgets (patients) whose labeled lists are saved for ``STANDARD_SEEDS``.
        patients: patient id of each training case (default: one patient per case).
        unlabeled: training cases that carry no label (never drawn into a labeled list).
    """
    root = Path(root)
    for name, ids in splits.items():
        write_text_atomic(root / "splits" / f"{name}.txt", "".join(c + "\n" for c in ids))
    train = list(splits.get("train", ()))
    patients = list(patients) if patients is not None else train
    skip = set(unlabeled)
    drawable = [(c, p) for c, p in zip(train, patients) if c not in skip]
    for budget in budgets:
        for seed in STANDARD_SEEDS:
            ids = choose_labeled([c for c, _ in drawable], [p for _, p in drawable], budget, seed)
            write_text_atomic(budget_file(root, budget, seed), "".join(c + "\n" for c in ids))
    info = spec.to_dict() | dict(extra or {})
    write_text_atomic(root / "suite.json", json.dumps(info, indent=2) + "\n")
    return root
