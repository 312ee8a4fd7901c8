"""Synthetic suites: determinism, shapes, label semantics, the store on disk, caching."""
import json

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import regionprops

from minissl.data import phantoms, store
from minissl.data.sources import open_data


@pytest.mark.parametrize("name", list(phantoms.SUITES))
def test_cases_deterministic_and_well_formed(name):
    spec = phantoms.SUITES[name]
    a, b, c = (phantoms.generate_case(name, i, seed=s) for i, s in ((3, 0), (3, 0), (3, 1)))
    assert a.image.tobytes() == b.image.tobytes() and a.label.tobytes() == b.label.tobytes()
    assert not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.float32 and a.label.dtype == np.uint8 and np.isfinite(a.image).all()
    assert a.image.shape == a.label.shape and len(a.spacing) == a.image.ndim
    assert a.image.ndim == (2 if name == "fetal_head" else 3)
    assert set(np.unique(a.label)) <= set(range(spec.num_classes)) and a.label.any()
    assert spec.default_budget == max(2, round(0.1 * spec.n_train))
    assert all(p % 16 == 0 for p in spec.patch_size[-2:]) and len(spec.class_names) == spec.num_classes


def test_cases_vary():
    """Each case draws its own acquisition and anatomy: sizes and intensity statistics spread widely."""
    areas = [phantoms.generate_case("fetal_head", i).label.mean() for i in range(12)]
    assert max(areas) > 1.8 * min(areas)
    stds = [phantoms.generate_case("cardiac", i).image.std() for i in range(8)]
    assert max(stds) > 1.2 * min(stds)


def test_fetal_head_label_is_the_ellipse_and_hc_is_consistent():
    for i in range(4):
        c = phantoms.generate_case("fetal_head", i)
        cx, cy, a, b, t = c.meta["ellipse"]
        y, x = np.mgrid[: c.label.shape[0], : c.label.shape[1]]
        xe, ye = (x - cx) * np.cos(t) + (y - cy) * np.sin(t), -(x - cx) * np.sin(t) + (y - cy) * np.cos(t)
        np.testing.assert_array_equal(c.label, ((xe / a) ** 2 + (ye / b) ** 2 <= 1).astype(np.uint8))
        p = regionprops(c.label)[0]
        if min(p.bbox) > 0 and max(p.bbox) < c.label.shape[0]:  # fully inside the image
            assert abs(p.axis_major_length / 2 - a) < 0.05 * a and abs(p.axis_minor_length / 2 - b) < 0.05 * b
        assert 0.7 <= b / a <= 0.95
        # HC in mm = numeric ellipse perimeter (px) * pixel size
        s = np.linspace(0, 2 * np.pi, 20001)
        perim = np.hypot(np.diff(a * np.cos(s)), np.diff(b * np.sin(s))).sum()
        assert c.spacing == (c.meta["pixel_size_mm"],) * 2
        np.testing.assert_allclose(perim * c.meta["pixel_size_mm"], c.meta["hc_mm"], rtol=1e-4)
        assert 150 <= c.meta["hc_mm"] <= 350


def test_cardiac_stack_goes_base_to_apex():
    rv_base, rv_apex = 0, 0
    for i in range(6):
        c = phantoms.generate_case("cardiac", i)
        pos = np.asarray(c.meta["slice_positions"])
        assert len(pos) == len(c.image) and 6 <= len(pos) <= 10 and np.all(np.diff(pos) > 0) and pos[0] == 0
        assert c.meta["phase"] in ("ED", "ES") and c.spacing[0] >= 8
        lv = (c.label == 3).sum((1, 2))
        assert lv[0] > lv[-1]  # the LV shrinks towards the apex
        rv_base += (c.label[0] == 1).sum()
        rv_apex += (c.label[-1] == 1).sum()
        assert (c.label[0] == 2).any() and (c.label[0] == 1).any()
    assert rv_apex < 0.2 * rv_base  # the RV crescent disappears towards the apex


def test_atrium_label_is_one_blob():
    for i in range(2):
        c = phantoms.generate_case("atrium", i)
        _, n = ndi.label(c.label)
        assert n == 1
        assert abs(float(c.image.mean())) < 1e-3 and abs(float(c.image.std()) - 1) < 1e-3  # z-scored
        assert 0.02 < c.label.mean() < 0.25


def test_make_suite_store_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINISSL_DATA", str(tmp_path / "cache"))
    root = phantoms.make_suite("fetal_head", sizes=(5, 2, 3))
    assert root == tmp_path / "cache" / f"fetal_head-v{phantoms.VERSION}-s0-5-2-3"
    info = json.loads((root / "suite.json").read_text())
    assert info["version"] == phantoms.VERSION and info["seed"] == 0 and info["spatial_dims"] == 2
    assert info["patch_size"] == [64, 64] and info["class_names"] == ["background", "head"]
    assert info["n_train"] == 5 and info["default_budget"] == 2 and len(info["spacing"]) == 2
    st = open_data(root)
    assert [len(st.split(s)) for s in ("train", "val", "test")] == [5, 2, 3]
    saved = sorted(p.name for p in (root / "splits").glob("labeled_*.txt"))  # standard budgets 2 and 4, seeds 0-4
    assert saved == sorted(f"labeled_{b}_seed{k}.txt" for b in (2, 4) for k in range(5))
    for k in range(5):
        ids = store.read_list(root / "splits" / f"labeled_2_seed{k}.txt")
        assert ids == store.choose_labeled(st.split("train"), st.split("train"), 2, k) == st.labeled(2, k)
    assert not set(st.split("train")) & (set(st.split("val")) | set(st.split("test")))
    c = st.read(st.split("test")[0])
    np.testing.assert_array_equal(c.image, phantoms.generate_case("fetal_head", 7).image)
    mtime = (root / "suite.json").stat().st_mtime_ns
    assert phantoms.make_suite("fetal_head", sizes=(5, 2, 3)) == root and (root / "suite.json").stat().st_mtime_ns == mtime
    again = phantoms.make_suite("fetal_head", root=tmp_path / "again", sizes=(5, 2, 3))
    for f in sorted((root / "cases").iterdir()):  # same seed -> identical files, byte for byte
        assert f.read_bytes() == (again / "cases" / f.name).read_bytes()


def test_unknown_suite_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown suite 'heart'.*atrium.*cardiac.*fetal_head"):
        phantoms.make_suite("heart")
    with pytest.raises(ValueError, match="sizes"):
        phantoms.make_suite("cardiac", sizes=(0, 1, 1))


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("content", ["notes.txt", "suite.json", "cases"])
def test_make_suite_never_replaces_a_folder_it_did_not_write(tmp_path, content):
    user = tmp_path / "mine"
    (user / "cases").mkdir(parents=True)
    (user / "cases" / "scan.h5").write_bytes(b"user data")
    if content == "notes.txt":
        (user / "notes.txt").write_text("my notes")
    elif content == "suite.json":  # someone else's store: a suite.json without minissl's generator key
        (user / "suite.json").write_text(json.dumps({"name": "mine", "version": 1}))
    before = _snapshot(user)
    with pytest.raises(ValueError, match=f"refusing to write the suite into {user}: the folder is not empty "
                                         "and was not written by minissl"):
        phantoms.make_suite("fetal_head", root=user, sizes=(3, 1, 1))
    assert _snapshot(user) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left behind


def test_make_suite_keeps_user_files_in_its_own_folder(tmp_path):
    root = phantoms.make_suite("fetal_head", root=tmp_path / "s", sizes=(3, 1, 1))
    (root / "my_results.csv").write_text("dice\n0.9\n")
    before = _snapshot(root)
    with pytest.raises(ValueError, match=r"not written by minissl \(it also holds \['my_results.csv'\]\)"):
        phantoms.make_suite("fetal_head", root=root, sizes=(3, 1, 1), force=True)
    assert _snapshot(root) == before


def test_cli_data_make_refuses_a_user_folder(tmp_path):
    import os
    import subprocess
    import sys

    user = tmp_path / "thesis"
    user.mkdir()
    (user / "chapter1.tex").write_text("\\section{Intro}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-m", "minissl.cli", "data", "make", "cardiac", "--root", str(user)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    assert f"refusing to write the suite into {user}" in out.stderr and "nothing was changed" in out.stderr
    assert (user / "chapter1.tex").read_text() == "\\section{Intro}"
    assert sorted(p.name for p in user.iterdir()) == ["chapter1.tex"]


def test_make_suite_replaces_its_own_older_suite_and_fills_an_empty_folder(tmp_path):
    root = phantoms.make_suite("fetal_head", root=tmp_path / "s", sizes=(3, 1, 1))
    info = json.loads((root / "suite.json").read_text())
    (root / "suite.json").write_text(json.dumps(info | {"version": phantoms.VERSION - 1}))
    (root / "cases" / "fetal_head_0000.h5").write_bytes(b"stale")
    assert phantoms.make_suite("fetal_head", root=root, sizes=(3, 1, 1)) == root
    assert json.loads((root / "suite.json").read_text())["version"] == phantoms.VERSION
    np.testing.assert_array_equal(store.read_case(root / "cases" / "fetal_head_0000.h5").image,
                                  phantoms.generate_case("fetal_head", 0).image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert phantoms.make_suite("fetal_head", root=empty, sizes=(3, 1, 1)) == empty
    assert (empty / "suite.json").is_file()
    with pytest.raises(ValueError, match="expected a folder for the suite, got a file at"):
        phantoms.make_suite("fetal_head", root=empty / "suite.json")
