"""Readers for the SSL4MIS / BCP layouts of ACDC and LA, read as they are on users' disks.

Users who prepared ACDC or LA for SSL4MIS, BCP, UA-MT or MC-Net point minissl at the folder and
start at once: nothing is converted and nothing is written there. ``detect(root)`` recognises a
layout and returns a ``minissl.data.store.CaseStore`` (``spec``, ``split(name)``, ``read(case_id)``,
``labeled(budget, seed)``); ``sources.open_data(root)`` calls it when ``root`` has no ``suite.json``.
Budget lists are computed, never written into the user's folder (both rules are deterministic).

ACDC (SSL4MIS ``acdc_data_processing.py``; ``root`` may also be its parent or its ``data/``)::

    <root>/data/slices/patient001_frame01_slice_1.h5   image (Y, X) float, label (Y, X)  train slices
    <root>/data/patient001_frame01.h5                 image (Z, Y, X) float, label      volumes
    <root>/train_slices.list  [train.list]  val.list  test.list

* A case is a volume ``patientXXX_frameYY``; a patient groups its ED and ES frames. Train cases are
  the volumes of ``train_slices.list`` in order of first appearance (``train.list`` when there is
  no slice list). A volume missing from ``data/`` is stacked from its slices (by slice index): the
  slices the list names, every one of which must exist (a listed slice missing on disk is an error).
* Budgets count PATIENTS and return all their frames. Rule ``"first"`` (default, SSL4MIS-compatible):
  the first N patients in list order, which is how SSL4MIS/BCP/UniMatch get 3 -> 68, 7 -> 136 and
  14 -> 256 labeled slices (``seed`` is ignored). Rule ``"random"``: minissl's seeded patient draw,
  ``store.choose_labeled``. Either way no slice of a labeled patient is in the unlabeled pool.
* The h5 files hold no spacing: spacing is 1 per axis and ``meta["spacing_unit"] == "pixel"`` (as
  in the literature's ACDC HD95/ASD).
* Resolution, as the SSL4MIS recipe (``spec.zoom``, default): training slices of any size are zoomed
  to 256x256 (image linear, label nearest), and validation / test volumes are predicted slice by
  slice at 256x256 and zoomed back to their native size, where the metrics are computed. Native-
  resolution training is the explicit option ``ACDCStore(root, zoom=False)`` (random 256x256
  windows, smaller slices padded), e.g. ``engine.train(cfg, store=ACDCStore(root, zoom=False))``;
  prediction then slides 256x256 windows over each slice at its native resolution (see
  ``minissl.inference``).
* Images are min-max normalised per volume by SSL4MIS (``spec.intensity == "minmax"``).

LA (UA-MT / MC-Net / BCP ``la_heart_processing.py``; ``root`` may also hold ``2018LA_Seg_Training Set/``)::

    <root>/<ID>/mri_norm2.h5     image (X, Y, Z) float (cropped, z-scored), label (X, Y, Z) {0, 1}
    train.list  test.list        in <root>, <root>/.. (UA-MT) or <root>/../data

* Arrays are transposed from (X, Y, Z) to our (Z, Y, X). Spacing is unknown (pixels; the data are
  usually quoted as 0.625 mm isotropic). Budgets count cases (one per patient); same two rules.
  Images are z-scored (``spec.intensity == "zscore"``); training crops 112x112x80 windows.
* The original protocol has no validation list and picks checkpoints on the TEST set. We never use
  test for validation: unless a ``val.list`` exists, val = max(1, round(10%)) of ``train.list``
  drawn with ``np.random.default_rng(val_seed=0)`` from the cases after the first 16, so the
  standard "first 4 / 8 / 16 of train.list" labeled sets are unchanged; val cases leave train.

List lines are tolerated with path prefixes, ``.h5`` suffixes, ``<ID>/mri_norm2.h5`` forms, blank
lines and ``#`` comments. Missing list or h5 files raise FileNotFoundError naming them; a missing
h5 key, a truncated or corrupt h5 file raise ValueError naming the file.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Iterable

import h5py
import numpy as np

from minissl.data.store import Case, CaseStore, SuiteSpec, _check_case, choose_labeled

LA_PROTECTED = 16  # largest standard LA budget: these first train cases never move to val
_SLICE = re.compile(r"^(?P<case>.+)_slice_(?P<index>\d+)$")


def _case_id(line: str) -> str:
    """'../data/ACDC/data/patient001_frame01.h5' -> 'patient001_frame01'; 'ID/mri_norm2.h5' -> 'ID'."""
    path = PurePosixPath(line.strip().replace("\\", "/"))
    name = path.name[:-3] if path.name.endswith(".h5") else path.name
    return path.parent.name if name == "mri_norm2" else name


def _read_list(dirs: list[Path], name: str, required: bool = True) -> list[str] | None:
    """Case ids of the first ``dirs[i]/name`` found (None if absent and not required)."""
    for folder in dirs:
        if (folder / name).is_file():
            lines = (folder / name).read_text().splitlines()
            return [_case_id(s) for s in lines if s.strip() and not s.lstrip().startswith("#")]
    if required:
        raise FileNotFoundError(f"missing list file {name!r}: looked in {', '.join(map(str, dirs))}")
    return None


def _read_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label as stored) of an SSL4MIS h5 file, in the file's axis order."""
    if not path.is_file():
        raise FileNotFoundError(f"missing h5 file {path}")
    try:
        with h5py.File(path, "r") as f:
            keys = sorted(f.keys())
            if "image" in f and "label" in f:
                return np.asarray(f["image"][()], dtype=np.float32), np.asarray(f["label"][()])
    except (OSError, TypeError, ValueError) as e:  # truncated, corrupt or not HDF5
        raise ValueError(f"could not read h5 file {path}: {e}") from e
    missing = [k for k in ("image", "label") if k not in keys]
    raise ValueError(f"{path}: expected key {missing[0]!r}, found keys {keys}")


class SSL4MISStore(CaseStore):
    """Read-only case source over an SSL4MIS layout (subclasses: ACDCStore, LAStore).

    Attributes:
        root: the layout folder. spec: the suite description. splits: name -> case ids.
        budget_rule: default rule of ``labeled`` ("first" or "random").
    """

    splits: dict[str, list[str]]
    budget_rule: str

    def split(self, name: str) -> list[str]:
        """Case ids of split ``name`` ("train", "val" or "test"), in list order."""
        if name not in self.splits:
            raise ValueError(f"split must be one of {sorted(self.splits)}, got {name!r}")
        return list(self.splits[name])

    def patient(self, case_id: str) -> str:
        """Patient id of a case (the case itself unless a subclass groups cases)."""
        return case_id

    def patients(self, case_ids: Iterable[str]) -> list[str]:
        return [self.patient(c) for c in case_ids]  # from the ids: no file is read

    def labeled(self, budget: int, seed: int = 0, rule: str | None = None) -> list[str]:
        """Labeled train cases: all cases of ``budget`` patients, by ``rule`` (default ``budget_rule``).

        "first": the first ``budget`` patients in train-list order (SSL4MIS); "random": the seeded
        draw of ``store.choose_labeled``. Nothing is written to the user's folder.
        """
        rule = rule or self.budget_rule
        if rule not in ("first", "random"):
            raise ValueError(f"rule must be 'first' or 'random', got {rule!r}")
        train = self.splits["train"]
        patients = self.patients(train)
        ids = choose_labeled(train, patients, budget, seed)  # also validates the budget
        if rule == "first":
            chosen = set(list(dict.fromkeys(patients))[:budget])  # first-appearance order
            ids = [c for c, p in zip(train, patients) if p in chosen]
        return ids

    def _case(self, case_id: str, image: np.ndarray, label: np.ndarray, meta: dict) -> Case:
        _check_case(image, label, self.spec.num_classes, f"case {case_id!r} at {self.root}")
        meta = {"patient_id": self.patient(case_id), "spacing_unit": "pixel"} | meta
        return Case(case_id, image, label.astype(np.uint8), (1.0,) * image.ndim, meta)  # pixels


class ACDCStore(SSL4MISStore):
    """SSL4MIS ACDC: 2D training on slices of (Z, Y, X) volumes, 4 classes, budgets in patients.

    Args:
        root: the layout folder (holding ``data/slices``).
        budget_rule: "first" (SSL4MIS) or "random".
        zoom: True (default, SSL4MIS): training slices zoomed to 256x256; False: native-resolution
            256x256 windows (see the module docstring).
    """

    def __init__(self, root: str | Path, budget_rule: str = "first", zoom: bool = True) -> None:
        self.root, self.budget_rule = Path(root), budget_rule
        dirs = [self.root, self.root / "data"]
        slices = _read_list(dirs, "train_slices.list", required=False)
        train = _read_list(dirs, "train.list", required=False)
        self.slices: dict[str, list[str]] = {}  # case -> its slices named in train_slices.list
        for name in slices or ():
            self.slices.setdefault(_SLICE.sub(r"\g<case>", name), []).append(name)
        if slices is not None:  # slice order defines the SSL4MIS "first N patients"
            train = list(self.slices)
        elif train is None:
            raise FileNotFoundError(f"missing list file 'train_slices.list' (or 'train.list') in {self.root}")
        self.splits = {"train": train, "val": _read_list(dirs, "val.list"),
                       "test": _read_list(dirs, "test.list")}
        n_patients = len({self.patient(c) for c in train})
        self.spec = SuiteSpec(
            name="acdc", spatial_dims=2, num_classes=4, patch_size=(256, 256),
            n_train=len(train), n_val=len(self.splits["val"]), n_test=len(self.splits["test"]),
            default_budget=max(2, round(0.1 * n_patients)), default_iters=30000,  # SSL4MIS protocol
            class_names=("BG", "RV", "MYO", "LV"), zoom=zoom,
            description=f"ACDC in SSL4MIS layout at {self.root}; budgets count patients; pixels")

    def patient(self, case_id: str) -> str:
        return case_id.split("_frame")[0]

    def slice_files(self, case_id: str) -> list[Path]:
        """The slice files of a case in slice order: those ``train_slices.list`` names, else those on disk."""
        names = self.slices.get(case_id) or [
            p.stem for p in (self.root / "data" / "slices").glob(f"{case_id}_slice_*.h5")
            if (m := _SLICE.match(p.stem)) and m["case"] == case_id]
        names = sorted(names, key=lambda n: int(m["index"]) if (m := _SLICE.match(n)) else -1)  # slice index
        return [self.root / "data" / "slices" / f"{n}.h5" for n in names]

    def problems(self) -> list[str]:
        """Slices named in ``train_slices.list`` that are missing on disk."""
        missing = [p for c in self.slices for p in self.slice_files(c) if not p.is_file()]
        return [f"train_slices.list names {len(missing)} slice(s) missing on disk: "
                f"{', '.join(str(p) for p in missing[:10])}"] if missing else []

    def read(self, case_id: str) -> Case:
        """The volume ``data/<case_id>.h5`` (or its stacked slices): image (Z, Y, X) float32."""
        path = self.root / "data" / f"{case_id}.h5"
        files = [] if path.is_file() else self.slice_files(case_id)
        if not files:
            image, label = _read_h5(path)  # (Z, Y, X)
        else:
            pairs = [_read_h5(f) for f in files]  # (Y, X) each; a listed slice missing on disk raises
            shapes = {a.shape for pair in pairs for a in pair}
            if len(shapes) > 1:
                raise ValueError(f"case {case_id!r} at {self.root}: expected slice images and labels of one shape, "
                                 f"got shapes {sorted(shapes)}")
            image, label = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])  # (Z, Y, X)
        frame = case_id.split("_frame")[-1] if "_frame" in case_id else ""
        return self._case(case_id, image, label, {"frame": frame, "source": "ssl4mis-acdc"})


class LAStore(SSL4MISStore):
    """UA-MT/BCP LA: 3D binary volumes ``<ID>/mri_norm2.h5``; val split off train (never test)."""

    def __init__(self, root: str | Path, budget_rule: str = "first", val_seed: int = 0) -> None:
        self.root, self.budget_rule = Path(root), budget_rule
        dirs = [self.root, self.root.parent, self.root.parent / "data"]
        train, test = _read_list(dirs, "train.list"), _read_list(dirs, "test.list")
        val = _read_list(dirs, "val.list", required=False)
        n_all = len(train)
        if val is None:
            n_val = max(1, round(0.1 * n_all))
            protected = min(LA_PROTECTED, n_all - n_val)
            pool = train[protected:]
            val = sorted(np.random.default_rng(val_seed).choice(pool, n_val, replace=False).tolist())
        self.splits = {"train": [c for c in train if c not in val], "val": val, "test": test}
        self.spec = SuiteSpec(
            name="la", spatial_dims=3, num_classes=2, patch_size=(80, 112, 112),  # (Z, Y, X)
            n_train=len(self.splits["train"]), n_val=len(val), n_test=len(test),
            default_budget=max(2, round(0.1 * n_all)), default_iters=15000,  # BCP protocol
            class_names=("BG", "LA"), intensity="zscore",
            description=f"LA in UA-MT/BCP layout at {self.root}; val split off train; pixels")

    def read(self, case_id: str) -> Case:
        """``<case_id>/mri_norm2.h5`` transposed (X, Y, Z) -> image (Z, Y, X) float32."""
        image, label = _read_h5(self.root / case_id / "mri_norm2.h5")  # (X, Y, Z)
        image, label = image.transpose(2, 1, 0).copy(), label.transpose(2, 1, 0).copy()  # (Z, Y, X)
        return self._case(case_id, image, label, {"source": "ssl4mis-la"})


def detect(root: str | Path, budget_rule: str = "first") -> SSL4MISStore | None:
    """The ACDC or LA store for an SSL4MIS/BCP layout at (or just around) ``root``; None otherwise."""
    root = Path(root)
    for base in (root, root / "ACDC") + ((root.parent,) if root.name == "data" else ()):
        if (base / "data" / "slices").is_dir():
            return ACDCStore(base, budget_rule)
    for base in (root, root / "2018LA_Seg_Training Set", root / "LA" / "2018LA_Seg_Training Set"):
        if any(base.glob("*/mri_norm2.h5")):
            return LAStore(base, budget_rule)
    return None
