"""Bad data is refused before training, by name, all at once, and no user file is touched.

A catalogue of broken stores and SSL4MIS folders: each is opened with ``sources.open_data`` and
checked with ``sources.check_store`` (what the engine does before its first step); the error must
name the problem, and every file in the folder must be byte for byte and mtime for mtime as before.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest

from minissl.config import load_config
from minissl.data import sources, store
from minissl.data.store import Case, SuiteSpec

SPEC = SuiteSpec("toy", 2, 3, (8, 8), 6, 2, 2, 2, 10, ("bg", "a", "b"))
IDS = [f"c{i}" for i in range(10)]  # c0-c5 train, c6-c7 val, c8-c9 test


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Remembered checks go to a temporary cache, never beside the data."""
    monkeypatch.setenv("MINISSL_DATA", str(tmp_path_factory.mktemp("cache")))


def _h5(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f[key] = value


def _store(root: Path) -> Path:
    for i, c in enumerate(IDS):
        rng = np.random.default_rng(i)
        store.write_case(root / "cases" / f"{c}.h5", Case(c, rng.random((8, 8), dtype=np.float32),
                                                           rng.integers(0, 3, (8, 8)).astype(np.uint8), (1.0, 1.0)))
    store.write_store(root, SPEC, {"train": IDS[:6], "val": IDS[6:8], "test": IDS[8:]}, budgets=(2,))
    return root


def _acdc(root: Path) -> Path:
    rows = []
    for k, patient in enumerate(["patient001", "patient002", "patient003", "patient004", "patient005"]):
        for frame in ("01", "12"):
            case = f"{patient}_frame{frame}"
            rng = np.random.default_rng(k)
            image, label = rng.random((3, 6, 5), dtype=np.float32), rng.integers(0, 4, (3, 6, 5)).astype(np.uint8)
            if case != "patient002_frame12":  # this one only exists as slices
                _h5(root / "data" / f"{case}.h5", image=image, label=label)
            if k < 3:
                for z in range(3):
                    rows.append(f"{case}_slice_{z + 1}")
                    _h5(root / "data" / "slices" / f"{rows[-1]}.h5", image=image[z], label=label[z])
    (root / "train_slices.list").write_text("\n".join(rows) + "\n")
    (root / "val.list").write_text("patient004_frame01\npatient004_frame12\n")
    (root / "test.list").write_text("patient005_frame01\npatient005_frame12\n")
    return root


def _la(root: Path) -> Path:
    ids = [f"CASE{k:02d}" for k in range(8)]
    for k, case in enumerate(ids):
        image = np.random.default_rng(k).standard_normal((7, 6, 4)).astype(np.float32)  # (X, Y, Z)
        _h5(root / case / "mri_norm2.h5", image=image, label=(image > 1).astype(np.uint8))
    (root / "train.list").write_text("\n".join(ids[:6]) + "\n")
    (root / "test.list").write_text("\n".join(ids[6:]) + "\n")
    return root


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_case(path: Path, image=None, label=None) -> None:
    with h5py.File(path, "r+") as f:
        for key, value in (("image", image), ("label", label)):
            if value is not None:
                del f[key]
                f[key] = value


def _edit_json(path: Path, **changes) -> None:
    info = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            info.pop(k)
        else:
            info[k] = v
    path.write_text(json.dumps(info))


def _set_spacing(path: Path, spacing: list[float]) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs["spacing"] = spacing


def _nan(path: Path, value: float = np.nan) -> None:
    with h5py.File(path, "r") as f:
        image = f["image"][()]
    image.flat[3] = value
    _edit_case(path, image=image)


S = "cases"  # H5 store case folder
# (layout, id, how to break it, expected message)
CATALOGUE: list[tuple[str, str, Callable[[Path], None], str]] = [
    ("store", "truncated_test_case", lambda r: _truncate(r / S / "c9.h5"),
     r"case 'c9' \(test\): could not read HDF5 case file .*c9\.h5"),
    ("store", "garbage_val_case", lambda r: (r / S / "c6.h5").write_bytes(b"not an hdf5 file"),
     r"case 'c6' \(val\): could not read HDF5 case file .*c6\.h5"),
    ("store", "missing_test_case", lambda r: (r / S / "c8.h5").unlink(),
     r"case 'c8' \(test\): case file not found: .*c8\.h5"),
    ("store", "shape_mismatch", lambda r: _edit_case(r / S / "c7.h5", label=np.zeros((8, 7), np.uint8)),
     r"case 'c7' \(val\): .*c7\.h5: image/label shape mismatch: image \(8, 8\), label \(8, 7\)"),
    ("store", "label_out_of_range", lambda r: _edit_case(r / S / "c9.h5", label=np.full((8, 8), 5, np.uint8)),
     r"case 'c9' \(test\): .*labels must lie in \[0, 2\] \(num_classes=3\), got values in \[5, 5\]"),
    ("store", "non_integer_label", lambda r: _edit_case(r / S / "c2.h5", label=np.full((8, 8), 0.5)),
     r"case 'c2' \(train\): .*expected an integer label map, got non-integer values of dtype float64"),
    ("store", "nan_test_image", lambda r: _nan(r / S / "c8.h5"),
     r"case 'c8' \(test\): .*c8\.h5: expected finite image values, got 1 NaN and 0 Inf of 64 voxels"),
    ("store", "inf_train_image", lambda r: _nan(r / S / "c3.h5", np.inf),
     r"case 'c3' \(train\): .*expected finite image values, got 0 NaN and 1 Inf"),
    ("store", "one_dimensional_image", lambda r: _edit_case(r / S / "c1.h5", image=np.zeros(8, np.float32),
                                                            label=np.zeros(8, np.uint8)),
     r"case 'c1' \(train\): .*expected image of shape \(Y, X\) or \(Z, Y, X\), got shape \(8,\)"),
    ("store", "val_case_without_label", lambda r: _h5(r / S / "c7.h5", image=np.zeros((8, 8), np.float32)),
     r"case 'c7' \(val\): expected a label \(val, test and labeled cases are scored or trained on\), got none"),
    ("store", "bad_spacing", lambda r: _set_spacing(r / S / "c0.h5", [1.0, -2.0]),
     r"case 'c0' \(train\): .*c0\.h5: expected 2 positive finite spacing values, got \[1\.0, -2\.0\]"),
    ("store", "empty_val_list", lambda r: (r / "splits" / "val.txt").write_text("\n"),
     r"split 'val': expected at least one case, got an empty list"),
    ("store", "empty_test_list", lambda r: (r / "splits" / "test.txt").write_text(""),
     r"split 'test': expected at least one case, got an empty list"),
    ("store", "missing_test_list", lambda r: (r / "splits" / "test.txt").unlink(),
     r"split 'test': split file not found: .*test\.txt"),
    ("store", "train_test_overlap", lambda r: (r / "splits" / "test.txt").write_text("c8\nc0\n"),
     r"splits 'train' and 'test' share 1 case\(s\) \['c0'\]: the test set would be trained on"),
    ("store", "val_inside_train", lambda r: (r / "splits" / "train.txt").write_text("\n".join(IDS[:7])),
     r"splits 'train' and 'val' share 1 case\(s\) \['c6'\]: validation would score training cases"),
    ("store", "val_test_overlap", lambda r: (r / "splits" / "val.txt").write_text("c6\nc9\n"),
     r"splits 'val' and 'test' share 1 case\(s\) \['c9'\]: checkpoints would be chosen on the test set"),
    ("store", "duplicate_train_ids", lambda r: (r / "splits" / "train.txt").write_text("c0\nc1\nc1\nc2\nc1\n"),
     r"split 'train': expected each case once, got duplicates \['c1'\]"),
    ("store", "saved_budget_names_test_case", lambda r: (r / "splits" / "labeled_2_seed1.txt").write_text("c0\nc9\n"),
     r"labeled_2_seed1\.txt: expected training case ids, got ids not in train: \['c9'\]"),
    ("store", "suite_json_missing_field", lambda r: _edit_json(r / "suite.json", num_classes=None),
     r"suite\.json: suite spec is missing keys \['num_classes'\]"),
    ("store", "suite_json_bad_spatial_dims", lambda r: _edit_json(r / "suite.json", spatial_dims=4),
     r"suite\.json: suite spec field 'spatial_dims': expected 2 or 3, got 4"),
    ("store", "suite_json_patch_size_mismatch", lambda r: _edit_json(r / "suite.json", patch_size=[8, 8, 8]),
     r"suite\.json: suite spec field 'patch_size': expected 2 positive integers \(spatial_dims=2\)"),
    ("store", "suite_json_not_json", lambda r: (r / "suite.json").write_text("{name: toy"),
     r"could not parse .*suite\.json"),
    ("store", "two_d_image_in_3d_suite", lambda r: _edit_json(r / "suite.json", spatial_dims=3, patch_size=[2, 8, 8]),
     r"case 'c0' \(train\): expected a \(Z, Y, X\) image for spatial_dims=3, got shape \(8, 8\)"),
    ("acdc", "test_list_names_missing_volume", lambda r: (r / "test.list").write_text("patient005_frame01\npatient009_frame01\n"),
     r"case 'patient009_frame01' \(test\): missing h5 file .*data/patient009_frame01\.h5"),
    ("acdc", "listed_slice_missing", lambda r: (r / "data" / "slices" / "patient002_frame12_slice_2.h5").unlink(),
     r"train_slices\.list names 1 slice\(s\) missing on disk: .*slices/patient002_frame12_slice_2\.h5"),
    ("acdc", "truncated_slice", lambda r: _truncate(r / "data" / "slices" / "patient002_frame12_slice_1.h5"),
     r"case 'patient002_frame12' \(train\): could not read h5 file .*patient002_frame12_slice_1\.h5"),
    ("acdc", "slices_of_different_shapes", lambda r: _h5(r / "data" / "slices" / "patient002_frame12_slice_3.h5",
                                                         image=np.zeros((4, 4), np.float32), label=np.zeros((4, 4), np.uint8)),
     r"case 'patient002_frame12' \(train\): case 'patient002_frame12' at .*: expected slice images and labels of one "
     r"shape, got shapes \[\(4, 4\), \(6, 5\)\]"),
    ("acdc", "nan_val_volume", lambda r: _nan(r / "data" / "patient004_frame12.h5"),
     r"case 'patient004_frame12' \(val\): .*expected finite image values, got 1 NaN"),
    ("acdc", "empty_val_list", lambda r: (r / "val.list").write_text("# nothing here\n"),
     r"split 'val': expected at least one case, got an empty list"),
    ("acdc", "duplicate_test_ids", lambda r: (r / "test.list").write_text("patient005_frame01\npatient005_frame01.h5\n"),
     r"split 'test': expected each case once, got duplicates \['patient005_frame01'\]"),
    ("acdc", "val_volume_missing_label_key", lambda r: _h5(r / "data" / "patient004_frame01.h5", image=np.zeros((2, 6, 5))),
     r"case 'patient004_frame01' \(val\): .*patient004_frame01\.h5: expected key 'label', found keys \['image'\]"),
    ("la", "test_list_names_missing_case", lambda r: (r / "test.list").write_text("CASE06\nCASE99/mri_norm2.h5\n"),
     r"case 'CASE99' \(test\): missing h5 file .*CASE99/mri_norm2\.h5"),
    ("la", "label_out_of_range", lambda r: _edit_case(r / "CASE07" / "mri_norm2.h5", label=np.full((7, 6, 4), 2, np.uint8)),
     r"case 'CASE07' \(test\): .*labels must lie in \[0, 1\]"),
    ("la", "train_test_overlap", lambda r: (r / "test.list").write_text("CASE06\nCASE01\n"),
     r"splits 'train' and 'test' share 1 case\(s\) \['CASE01'\]"),
    ("la", "corrupt_volume", lambda r: (r / "CASE03" / "mri_norm2.h5").write_bytes(b"\x89HDF\r\n\x1a\n broken"),
     r"case 'CASE03' \(train\): could not read h5 file .*CASE03/mri_norm2\.h5"),
]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


MAKERS = {"store": _store, "acdc": _acdc, "la": _la}


@pytest.mark.parametrize("layout, name, breakit, message", CATALOGUE, ids=[c[1] + "-" + c[0] for c in CATALOGUE])
def test_bad_data_is_refused_by_name_and_left_untouched(tmp_path, layout, name, breakit, message):
    root = MAKERS[layout](tmp_path / layout)
    sources.check_store(sources.open_data(root))  # the intact folder passes
    breakit(root)
    before = _snapshot(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        sources.check_store(sources.open_data(root))
    assert _snapshot(tmp_path) == before  # nothing written, changed or deleted


def test_every_problem_is_reported_at_once(tmp_path):
    root = _store(tmp_path / "s")
    _nan(root / "cases" / "c8.h5")
    (root / "cases" / "c6.h5").unlink()
    _edit_case(root / "cases" / "c2.h5", label=np.full((8, 8), 9, np.uint8))
    (root / "splits" / "val.txt").write_text("c6\nc7\nc0\n")
    with pytest.raises(ValueError) as err:
        sources.check_store(sources.open_data(root))
    text = str(err.value)
    assert text.startswith(f"H5Store(root={str(root)!r}, suite='toy'): 4 problem(s) found before training:")
    for part in ("splits 'train' and 'val' share 1 case(s) ['c0']", "case 'c6' (val): case file not found",
                 "case 'c2' (train): ", "labels must lie in [0, 2]", "case 'c8' (test): ", "1 NaN"):
        assert part in text


def test_acdc_missing_val_list_is_named(tmp_path):
    root = _acdc(tmp_path / "ACDC")
    (root / "val.list").unlink()
    before = _snapshot(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing list file 'val.list'"):
        sources.open_data(root)
    assert _snapshot(tmp_path) == before


def test_labeled_cases_must_be_train_cases_with_labels(tmp_path):
    root = _store(tmp_path / "s")
    _h5(root / "cases" / "c4.h5", image=np.zeros((8, 8), np.float32))  # an unlabeled training case
    st = sources.open_data(root)
    sources.check_store(st, ["c0", "c1"])  # unlabeled cases may sit in the unlabeled pool
    with pytest.raises(ValueError, match=r"case 'c4' \(train\): expected a label"):
        sources.check_store(st, ["c0", "c4"])
    with pytest.raises(ValueError, match=r"2 problem\(s\)") as err:
        sources.check_store(st, ["c0", "c0", "c9"])
    assert "labeled cases: expected each case once, got duplicates ['c0']" in str(err.value)
    assert "labeled cases: expected cases of the train split, got ['c9']" in str(err.value)


def test_a_passed_check_is_remembered_until_a_file_changes(tmp_path, monkeypatch):
    root = _store(tmp_path / "s")
    st = sources.open_data(root)
    sources.check_store(st)
    reads = []
    real = type(st).read
    monkeypatch.setattr(type(st), "read", lambda self, c: reads.append(c) or real(self, c))
    sources.check_store(st)
    assert reads == []  # unchanged store: not read again
    _nan(root / "cases" / "c9.h5")
    with pytest.raises(ValueError, match=r"case 'c9' \(test\).*1 NaN"):
        sources.check_store(st)
    assert len(reads) == len(IDS)  # every case read once


def _train(root: Path, out: Path, **kw):
    from minissl import engine

    base = dict(data_root=str(root), out_dir=str(out), width=4, depth=2, batch_size=2, labeled_bs=1, max_iters=1,
                val_every=1, progress=False)
    return engine.train(load_config(**(base | kw)))


def test_engine_checks_before_creating_anything(tmp_path):
    root = _store(tmp_path / "s")
    _nan(root / "cases" / "c9.h5")
    (root / "splits" / "val.txt").write_text("c6\nc1\n")
    with pytest.raises(ValueError, match=r"2 problem\(s\)(.|\n)*share 1 case\(s\) \['c1'\](.|\n)*case 'c9' \(test\)"):
        _train(root, tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_a_budget_without_saved_list_goes_to_the_run_folder_not_the_data(tmp_path):
    root = _store(tmp_path / "s")
    before = _snapshot(root)
    res = _train(root, tmp_path / "runs", budget=3, method="supervised")
    assert _snapshot(root) == before
    st = sources.open_data(root)
    assert (res.run_dir / "labeled.txt").read_text().split() == st.labeled(3, 0) == \
        store.choose_labeled(st.split("train"), st.split("train"), 3, 0)


def test_training_on_an_ssl4mis_folder_writes_nothing_there(tmp_path):
    root = _acdc(tmp_path / "ACDC")
    before = _snapshot(root)
    res = _train(root, tmp_path / "runs", budget=2, method="mean_teacher")
    assert _snapshot(root) == before
    assert (res.run_dir / "labeled.txt").read_text().split() == sources.open_data(root).labeled(2, 0)
