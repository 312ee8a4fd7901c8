"""On-disk case store: one HDF5 file per case, split lists, labeled budgets, and the case-source interface.

Layout of a store root::

    <root>/suite.json                      the SuiteSpec (+ spacing, generator version, seed)
    <root>/cases/<case_id>.h5              dataset `image` float32 (Z, Y, X) or (Y, X),
                                           dataset `label` uint8 (same shape; optional),
                                           attrs `spacing` (mm per axis) + free metadata
    <root>/splits/{train,val,test}.txt     one case id per line
    <root>/splits/labeled_<n>_seed<k>.txt  the labeled subset of `train` for budget n and seed k

Budgets count **patients** (cases that share the `patient_id` attribute are labeled together; in the
embedded suites one case is one patient). A budget file is written once, then only read, so every
method and every run with the same (budget, seed) uses the same labeled cases.

Every reader of cases (this HDF5 store, the SSL4MIS-layout reader in ``ssl4mis.py``) is a
:class:`CaseStore`: ``.spec``, ``.split(name)``, ``.read(case_id)``, ``.labeled(budget, seed)``.
``open_store(root)`` returns the right one, and the datasets only ever talk to that interface.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import h5py
import numpy as np

from ..atomic import write_text_atomic

SPLITS = ("train", "val", "test")


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SuiteSpec":
        """Build from a dict, ignoring unknown keys (suite.json carries extra ones)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("patch_size", "class_names"):
            if k in kw:
                kw[k] = tuple(kw[k])
        missing = names - set(kw) - {"description"}
        if missing:
            raise ValueError(f"suite spec is missing keys {sorted(missing)}; got keys {sorted(d)}")
        return cls(**kw)


# ----------------------------------------------------------------------------- single files
def _check_case(image: np.ndarray, label: np.ndarray | None, num_classes: int | None, where: str) -> None:
    if image.ndim not in (2, 3):
        raise ValueError(f"{where}: expected image of shape (Y, X) or (Z, Y, X), got shape {image.shape}")
    if label is None:
        return
    if label.shape != image.shape:
        raise ValueError(f"{where}: image/label shape mismatch: image {image.shape}, label {label.shape}")
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
    except (OSError, KeyError) as e:
        raise ValueError(f"could not read HDF5 case file {path}: {e}") from e
    spacing = tuple(float(s) for s in attrs.pop("spacing", (1.0,) * image.ndim))
    if len(spacing) != image.ndim:
        raise ValueError(f"{path}: expected {image.ndim} spacing values, got {spacing}")
    if label is not None:
        if label.dtype.kind == "f" and not np.array_equal(label, np.round(label)):
            raise ValueError(f"{path}: expected an integer label map, got non-integer values of dtype {label.dtype}")
        _check_case(image, label, num_classes, str(path))
        label = label.astype(np.uint8)
    else:
        _check_case(image, None, None, str(path))
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

    def budget_file(self, budget: int, seed: int) -> Path:
        """Where the labeled list for (budget, seed) lives."""
        return self.root / "splits" / f"labeled_{budget}_seed{seed}.txt"

    def labeled(self, budget: int, seed: int = 0) -> list[str]:
        """Labeled training case ids for a budget counted in patients (written once, then read).

        Raises:
            ValueError: budget < 1 or larger than the number of training patients, or an existing
                budget file names cases outside the training split.
        """
        train = self.split("train")
        path = self.budget_file(budget, seed)
        if path.is_file():
            ids = read_list(path)
            bad = sorted(set(ids) - set(train))
            if bad:
                raise ValueError(f"{path}: expected training case ids, got ids not in train: {bad[:5]}")
            return ids
        ids = choose_labeled(train, self.patients(train), budget, seed)
        try:
            write_text_atomic(path, "".join(c + "\n" for c in ids))
        except OSError:  # read-only store: the choice is deterministic anyway
            pass
        return ids

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
        except json.JSONDecodeError as e:
            raise ValueError(f"could not parse {meta_path}: {e}") from e
        self.spec = SuiteSpec.from_dict(self.info)

    def case_path(self, case_id: str) -> Path:
        """``<root>/cases/<case_id>.h5``."""
        return self.root / "cases" / f"{case_id}.h5"

    def split(self, name: str) -> list[str]:
        return read_list(self.root / "splits" / f"{name}.txt")

    def read(self, case_id: str) -> Case:
        return read_case(self.case_path(case_id), self.spec.num_classes, case_id=case_id)

    def patients(self, case_ids: Iterable[str]) -> list[str]:
        out = []
        for c in case_ids:  # attributes only: no pixel data is read
            p = self.case_path(c)
            if not p.is_file():
                raise FileNotFoundError(f"case file not found: {p}")
            try:
                with h5py.File(p, "r") as f:
                    out.append(str(_attr(f.attrs.get("patient_id", c))))
            except OSError as e:
                raise ValueError(f"could not read HDF5 case file {p}: {e}") from e
        return out


def write_store(root: str | os.PathLike, spec: SuiteSpec, splits: dict[str, Sequence[str]],
                extra: dict[str, Any] | None = None) -> Path:
    """Write ``suite.json`` and the split lists of a store whose cases are (or will be) in ``cases/``.

    Args:
        root: store root.
        spec: the suite spec.
        splits: {'train': [...], 'val': [...], 'test': [...]} case ids.
        extra: more keys for suite.json (spacing, generator version, seed, ...).
    """
    root = Path(root)
    for name, ids in splits.items():
        write_text_atomic(root / "splits" / f"{name}.txt", "".join(c + "\n" for c in ids))
    info = spec.to_dict() | dict(extra or {})
    write_text_atomic(root / "suite.json", json.dumps(info, indent=2) + "\n")
    return root


def open_store(root: str | os.PathLike | CaseStore) -> CaseStore:
    """Open a case source.

    Args:
        root: a store folder (``suite.json`` present), an SSL4MIS-layout folder (ACDC / LA), the
            name of an embedded suite (generated and cached on first use), or a CaseStore (returned).

    Raises:
        ValueError: nothing recognisable at ``root``.
    """
    if isinstance(root, CaseStore):
        return root
    path = Path(root)
    if (path / "suite.json").is_file():
        return H5Store(path)
    if not path.exists():
        from minissl.data import phantoms

        if str(root) in phantoms.SUITES:
            return H5Store(phantoms.make_suite(str(root)))
        raise ValueError(f"expected a store folder or one of the suites {sorted(phantoms.SUITES)}, "
                         f"got {str(root)!r} (no such folder)")
    try:
        from minissl.data import ssl4mis
    except ImportError:
        ssl4mis = None
    if ssl4mis is not None:
        found = ssl4mis.detect(path)
        if found is not None:
            return found
    raise ValueError(f"expected a minissl store (suite.json) or an SSL4MIS layout (ACDC data/slices, "
                     f"LA <id>/mri_norm2.h5) at {path}, found neither")


def read_split(root: str | os.PathLike | CaseStore, name: str) -> list[str]:
    """Case ids of split ``name`` of the store at ``root``."""
    return open_store(root).split(name)


def labeled_cases(root: str | os.PathLike | CaseStore, budget: int, seed: int = 0) -> list[str]:
    """Labeled training case ids for a budget in patients (the split file is written once, then read)."""
    return open_store(root).labeled(budget, seed)
