"""Store format: round trip, atomic writes, splits, budgets, error messages."""
import h5py
import numpy as np
import pytest

from minissl.data import store
from minissl.data.sources import open_data
from minissl.data.store import Case, SuiteSpec

SPEC = SuiteSpec("toy", 2, 3, (8, 8), 6, 1, 1, 2, 10, ("bg", "a", "b"))


def _case(i: int, shape=(4, 8, 8), patient=None) -> Case:
    rng = np.random.default_rng(i)
    meta = {"patient_id": patient or f"P{i}", "slice_positions": np.linspace(0, 1, shape[0]), "phase": "ED"}
    return Case(f"c{i}", rng.random(shape, dtype=np.float32), rng.integers(0, 3, shape).astype(np.uint8),
                (10.0, 1.5, 1.5)[-len(shape):], meta)


def _toy_store(root, patients=None):
    ids = []
    for i in range(8):
        c = _case(i, patient=None if patients is None else patients[i])
        store.write_case(root / "cases" / f"{c.id}.h5", c, 3)
        ids.append(c.id)
    store.write_store(root, SPEC, {"train": ids[:6], "val": ids[6:7], "test": ids[7:]}, {"version": 1})
    return open_data(root)


@pytest.mark.parametrize("shape", [(8, 8), (4, 8, 8)])
def test_round_trip(tmp_path, shape):
    c = _case(0, shape)
    path = store.write_case(tmp_path / "cases" / "c0.h5", c, num_classes=3)
    r = store.read_case(path, num_classes=3)
    assert r.id == "c0" and r.image.dtype == np.float32 and r.label.dtype == np.uint8
    np.testing.assert_array_equal(r.image, c.image)
    np.testing.assert_array_equal(r.label, c.label)
    assert r.spacing == c.spacing
    assert r.meta["patient_id"] == "P0" and r.meta["phase"] == "ED"
    np.testing.assert_allclose(r.meta["slice_positions"], c.meta["slice_positions"])
    assert [p.name for p in (tmp_path / "cases").iterdir()] == ["c0.h5"]  # no temporary file left


def test_unlabeled_case_round_trip(tmp_path):
    c = Case("u", np.zeros((5, 6), np.float32), None, (1.0, 1.0))
    r = store.read_case(store.write_case(tmp_path / "u.h5", c))
    assert r.label is None and r.image.shape == (5, 6)


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        store.read_case(tmp_path / "nope.h5")
    bad = tmp_path / "broken_case.h5"
    bad.write_bytes(b"this is not hdf5")
    with pytest.raises(ValueError, match="broken_case.h5"):
        store.read_case(bad)
    with h5py.File(tmp_path / "nokey.h5", "w") as f:
        f["label"] = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match="nokey.h5.*image"):
        store.read_case(tmp_path / "nokey.h5")


def test_bad_content_errors(tmp_path):
    c = _case(1, (8, 8))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\].*got values in \[0, 2\]"):
        store.write_case(tmp_path / "a.h5", c, num_classes=2)
    with pytest.raises(ValueError, match="shape mismatch.*image \\(8, 8\\), label \\(8, 7\\)"):
        store.write_case(tmp_path / "a.h5", Case("x", c.image, c.label[:, :7], (1.0, 1.0)))
    with h5py.File(tmp_path / "m.h5", "w") as f:  # written by someone else: checked on reading
        f["image"] = np.zeros((4, 4), np.float32)
        f["label"] = np.full((4, 5), 1, np.uint8)
    with pytest.raises(ValueError, match="m.h5: image/label shape mismatch"):
        store.read_case(tmp_path / "m.h5")
    with h5py.File(tmp_path / "k.h5", "w") as f:
        f["image"] = np.zeros((4, 4), np.float32)
        f["label"] = np.full((4, 4), 7, np.uint8)
    with pytest.raises(ValueError, match="k.h5: labels must lie in"):
        store.read_case(tmp_path / "k.h5", num_classes=4)
    with pytest.raises(ValueError, match="spacing"):
        store.write_case(tmp_path / "s.h5", Case("s", c.image, c.label, (1.0,)))


def test_store_splits_and_read(tmp_path):
    st = _toy_store(tmp_path)
    assert isinstance(st, store.H5Store) and st.spec == SPEC
    assert st.split("train") == [f"c{i}" for i in range(6)]
    assert st.split("test") == ["c7"]
    np.testing.assert_array_equal(st.read("c3").label, _case(3).label)
    (tmp_path / "cases" / "c2.h5").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="c2.h5"):
        st.read("c2")


def test_budgets_saved_by_the_writer_else_drawn_and_never_written(tmp_path):
    st = _toy_store(tmp_path)
    before = sorted(p.name for p in (tmp_path / "splits").iterdir())
    ids = st.labeled(2, seed=3)
    assert sorted(p.name for p in (tmp_path / "splits").iterdir()) == before  # nothing written into the data
    assert len(ids) == 2 and set(ids) <= set(st.split("train")) and st.labeled(2, 3) == ids
    assert store.choose_labeled(st.split("train"), st.patients(st.split("train")), 2, 3) == ids
    train = st.split("train")
    store.write_store(tmp_path, SPEC, {"train": train}, {"version": 1}, budgets=(2, 3))
    saved = sorted(p.name for p in (tmp_path / "splits").glob("labeled_*"))
    assert saved == sorted(f"labeled_{b}_seed{k}.txt" for b in (2, 3) for k in store.STANDARD_SEEDS)
    assert (tmp_path / "splits" / "labeled_2_seed3.txt").read_text().split() == ids  # the same draw
    path = tmp_path / "splits" / "labeled_2_seed3.txt"
    path.write_text("c5\nc0\n")  # a saved file is the truth: it is read, never redrawn
    assert st.labeled(2, 3) == ["c5", "c0"]
    path.write_text("c7\n")
    with pytest.raises(ValueError, match="labeled_2_seed3.txt: expected training case ids, got ids not in train"):
        st.labeled(2, 3)
    path.write_text("c1\nc1\n")
    with pytest.raises(ValueError, match=r"labeled_2_seed3.txt: expected each case once, got duplicates \['c1'\]"):
        st.labeled(2, 3)
    draws = {tuple(store.choose_labeled(st.split("train"), st.patients(st.split("train")), 3, s)) for s in range(10)}
    assert len(draws) > 1  # the seed matters


def test_budget_counts_patients(tmp_path):
    patients = ["A", "A", "B", "B", "C", "D", "E", "E"]  # c0/c1 and c2/c3 belong to one patient each
    st = _toy_store(tmp_path, patients)
    assert st.patients(["c0", "c4"]) == ["A", "C"]
    for seed in range(6):
        ids = st.labeled(2, seed)
        chosen = {patients[int(c[1:])] for c in ids}
        assert len(chosen) == 2  # two patients ...
        assert ids == [c for c in st.split("train") if patients[int(c[1:])] in chosen]  # ... with all their cases
        assert not set(ids) & set(st.unlabeled(2, seed))
    with pytest.raises(ValueError, match=r"budget 5 is larger than the training set \(4 patients, 6 cases\)"):
        st.labeled(5, 0)
    with pytest.raises(ValueError, match="positive number of patients"):
        st.labeled(0, 0)


def test_open_data_errors(tmp_path):
    with pytest.raises(ValueError, match="fetal_head"):
        open_data("no_such_suite_or_folder")
    with pytest.raises(ValueError, match="found neither"):
        open_data(tmp_path)
    (tmp_path / "suite.json").write_text('{"name": "x"}')
    with pytest.raises(ValueError, match="suite.json: suite spec is missing keys"):
        open_data(tmp_path)
