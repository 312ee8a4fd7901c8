"""End-to-end tests of the dataset converters in data_scripts/ on tiny raw folders in the real formats.

Each test writes a few cases the way the dataset ships them (NIfTI via nibabel, NRRD via pynrrd,
a DICOM series and MHA via SimpleITK, PNG + CSV via pillow), runs the converter, and opens the
result through the data's one door (``minissl.data.sources.open_data``, then ``check_store``).
"""
from __future__ import annotations

import json
import locale
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from skimage.draw import ellipse_perimeter

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # data_scripts/ is a folder of scripts beside the package, not installed with it
    sys.path.insert(0, str(ROOT))

from data_scripts import _common, prepare_acdc, prepare_hc18, prepare_la, prepare_pancreas, prepare_psfh  # noqa: E402
from minissl.data.sources import check_store as check_splits_and_cases  # noqa: E402
from minissl.data.sources import open_data  # noqa: E402


def check_store(out: Path, budgets: dict[int, int]) -> object:
    """Open the store; test never meets train/val; every saved budget list holds whole patients of train."""
    store = open_data(out)
    check_splits_and_cases(store, store.labeled(min(budgets), 0) if budgets else (), remember=False)
    train, val, test = (set(store.split(s)) for s in ("train", "val", "test"))
    assert train and test
    assert not (train & test) and not (val & test) and not (train & val)
    pid = dict(zip(sorted(train), store.patients(sorted(train))))
    for budget, expected_patients in budgets.items():
        for seed in range(5):
            assert (out / "splits" / f"labeled_{budget}_seed{seed}.txt").is_file()
            ids = store.labeled(budget, seed)
            assert set(ids) <= train
            patients = {pid[c] for c in ids}
            assert len(patients) == expected_patients
            assert set(ids) == {c for c in train if pid[c] in patients}  # whole patients only
    return store


def no_leftovers(out: Path) -> None:
    """The output folder is absent and no temporary sibling was left behind."""
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# ----------------------------------------------------------------------------- ACDC (NIfTI)
def write_acdc(raw: Path, numbers: list[int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """ACDC patient folders (ED frame 1, ES frame 4) with Info.cfg; returns the raw (X, Y, Z) arrays."""
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.25, 10.0, 1.0])
    affine[:3, 3] = (-5.0, 3.0, 20.0)
    arrays = {}
    for n in numbers:
        folder = raw / "training" / f"patient{n:03d}"
        folder.mkdir(parents=True)
        (folder / "Info.cfg").write_text("ED: 1\nES: 4\nGroup: NOR\nHeight: 170.0\nNbFrame: 5\nWeight: 70.0\n")
        for frame in (1, 4):
            image = rng.integers(0, 400, (12, 10, 3)).astype(np.int16)  # (X, Y, Z)
            label = np.zeros((12, 10, 3), np.uint8)
            label[2:6, 2:5, 0], label[6:9, 3:8, 1], label[3:10, 6:9, 2] = 1, 2, 3
            stem = f"patient{n:03d}_frame{frame:02d}"
            nib.save(nib.Nifti1Image(image, affine), str(folder / f"{stem}.nii.gz"))
            nib.save(nib.Nifti1Image(label, affine), str(folder / f"{stem}_gt.nii.gz"))
            arrays[stem] = (image, label)
    return arrays


def test_acdc_end_to_end(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "acdc"
    arrays = write_acdc(raw, [11, 28, 99, 38, 50, 150])  # test, val, train x3, on no list
    prepare_acdc.prepare(raw, out)
    text = capsys.readouterr().out
    assert "ACDC: 6 patients (expected 100" in text
    assert "patients on no SSL4MIS list: 1" in text
    store = check_store(out, {1: 1, 3: 3})
    assert not (out / "splits" / "labeled_7_seed0.txt").exists()  # 4 training patients: 7 and 14 do not fit
    assert store.spec.num_classes == 4 and store.spec.spatial_dims == 2
    assert store.split("test") == ["patient011_frame01", "patient011_frame04"]
    assert store.split("val") == ["patient028_frame01", "patient028_frame04"]
    assert {c[:10] for c in store.split("train")} == {"patient099", "patient038", "patient050", "patient150"}
    case = store.read("patient099_frame04")
    image, label = arrays["patient099_frame04"]
    assert case.image.shape == (3, 10, 12) and case.spacing == (10.0, 1.25, 1.5)
    np.testing.assert_array_equal(case.label, label.transpose(2, 1, 0))
    expected = (image - image.min()) / (image.max() - image.min())
    np.testing.assert_allclose(case.image, expected.transpose(2, 1, 0), atol=1e-6)
    assert case.meta["patient_id"] == "patient099" and case.meta["phase"] == "ES" and case.meta["frame"] == 4
    assert store.read("patient099_frame01").meta["phase"] == "ED"
    np.testing.assert_allclose(case.meta["slice_positions_mm"], [[-5, 3, 20], [-5, 3, 30], [-5, 3, 40]])
    assert json.loads((out / "suite.json").read_text())["standard_budgets"] == {"1": 1, "3": 3}


def test_acdc_published_lists_are_the_ssl4mis_partition():
    lists = prepare_acdc.published_splits()
    assert [len(lists[s]) for s in ("train", "val", "test")] == [70, 10, 20]
    assert sorted(sum(lists.values(), [])) == [f"patient{n:03d}" for n in range(1, 101)]


def test_acdc_truncated_frame_names_file_and_leaves_nothing(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "acdc"
    write_acdc(raw, [11, 99])
    bad = raw / "training" / "patient099" / "patient099_frame04.nii.gz"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"patient099_frame04\.nii\.gz: could not read NIfTI image"):
        prepare_acdc.prepare(raw, out)
    no_leftovers(out)


def test_acdc_info_cfg_without_es_names_file(tmp_path):
    raw = tmp_path / "raw"
    write_acdc(raw, [11])
    (raw / "training" / "patient011" / "Info.cfg").write_text("ED: 1\nGroup: NOR\n")
    with pytest.raises(ValueError, match=r"patient011/Info\.cfg: expected an integer field 'ES'"):
        prepare_acdc.prepare(raw, tmp_path / "out")
    no_leftovers(tmp_path / "out")


# ----------------------------------------------------------------------------- LA (NRRD)
def write_la(raw: Path, ids: list[str], with_spacing: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {}
    for cid in ids:
        folder = raw / "2018LA_Seg_Training Set" / cid
        folder.mkdir(parents=True)
        image = rng.normal(100.0, 20.0, (40, 36, 6)).astype(np.float32)  # (X, Y, Z)
        label = np.zeros((40, 36, 6), np.uint8)
        label[10:20, 12:18, 1:5] = 255
        header = {"space": "left-posterior-superior", "space directions": np.diag([0.625, 0.625, 1.25])} \
            if with_spacing else {}
        nrrd.write(str(folder / "lgemri.nrrd"), image, header)
        nrrd.write(str(folder / "laendo.nrrd"), label, header)
        arrays[cid] = image
    return arrays


def test_la_end_to_end(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "la"
    train_ids, test_id = prepare_la.UAMT_TRAIN[:4], prepare_la.UAMT_TEST[0]
    arrays = write_la(raw, [*train_ids, test_id])
    prepare_la.prepare(raw, out, margin=2, min_size=12, budgets=(1, 2, 4))
    assert "LA: 5 volumes (expected 100" in capsys.readouterr().out
    store = check_store(out, {1: 1, 2: 2})
    assert not (out / "splits" / "labeled_4_seed0.txt").exists()  # 3 training cases after validation
    assert store.split("test") == [test_id]
    assert len(store.split("val")) == 1 and set(store.split("train")) | set(store.split("val")) == set(train_ids)
    case = store.read(test_id)
    # X: box 10..19 + margin 2 -> [8, 22) (14 >= 12); Y: 12..17 + 2 -> [10, 20), grown to 12 -> [9, 21)
    assert case.image.shape == (6, 12, 14) and case.spacing == (1.25, 0.625, 0.625)
    raw_image = arrays[test_id]
    expected = ((raw_image - raw_image.mean()) / raw_image.std()).transpose(2, 1, 0)[:, 9:21, 8:22]
    np.testing.assert_allclose(case.image, expected, atol=1e-4)
    assert set(np.unique(case.label)) == {0, 1} and case.label.sum() == 10 * 6 * 4
    assert case.meta["crop_start_zyx"] == [0, 9, 8] and case.meta["crop_stop_zyx"] == [6, 21, 22]
    assert case.meta["spacing_from_header"] == 1


def test_converted_la_and_acdc_are_scored_in_mm_per_class_as_medpy(tmp_path):
    """LA: Dice, Jaccard, HD95, ASD with the NRRD voxel spacing (mm), equal to medpy with voxelspacing;
    ACDC: one row per RV / MYO / LV, distances in mm from the NIfTI header."""
    from medpy.metric import binary as mb

    from minissl.evaluate import case_rows

    write_la(tmp_path / "la_raw", prepare_la.UAMT_TRAIN[:3] + prepare_la.UAMT_TEST[:1])
    la = open_data(prepare_la.prepare(tmp_path / "la_raw", tmp_path / "la", margin=2, min_size=12, budgets=(1,)))
    case = la.read(prepare_la.UAMT_TEST[0])
    pred = np.roll(case.label, 2, axis=2)  # shifted 2 voxels (1.25 mm) along X
    (row,) = case_rows(pred, case, la.spec)
    gt, p = case.label == 1, pred == 1
    assert row["unit"] == "mm" and row["class"] == "left atrium"
    assert row["dice"] == pytest.approx(mb.dc(p, gt)) and row["jaccard"] == pytest.approx(mb.jc(p, gt))
    assert row["hd95"] == pytest.approx(mb.hd95(p, gt, voxelspacing=(1.25, 0.625, 0.625)))
    assert row["asd"] == pytest.approx(mb.asd(p, gt, voxelspacing=(1.25, 0.625, 0.625)))
    assert row["hd95"] == pytest.approx(1.25)  # 2 voxels of 0.625 mm, not 2 voxels

    write_acdc(tmp_path / "acdc_raw", [11, 99])
    acdc = open_data(prepare_acdc.prepare(tmp_path / "acdc_raw", tmp_path / "acdc", budgets=(1,)))
    frame = acdc.read("patient011_frame01")
    rows = case_rows(np.where(frame.label == 2, 0, frame.label), frame, acdc.spec)  # MYO missed
    assert [(r["class"], r["unit"]) for r in rows] == [("RV", "mm"), ("MYO", "mm"), ("LV", "mm")]
    assert rows[0]["dice"] == 1.0 and rows[1]["dice"] == 0.0 and rows[2]["hd95"] == 0.0


def test_la_header_without_spacing_gets_default(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "la"
    write_la(raw, [prepare_la.UAMT_TRAIN[0], prepare_la.UAMT_TEST[0]], with_spacing=False)
    store = open_data(prepare_la.prepare(raw, out, budgets=()))
    case = store.read(prepare_la.UAMT_TEST[0])
    assert case.spacing == (0.625, 0.625, 0.625) and case.meta["spacing_from_header"] == 0
    assert case.image.shape == (6, 36, 40)  # 112-voxel minimum crop clipped to the whole 40 x 36 slice


def test_la_missing_label_names_file_and_leaves_nothing(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "la"
    write_la(raw, prepare_la.UAMT_TRAIN[:2])
    (raw / "2018LA_Seg_Training Set" / prepare_la.UAMT_TRAIN[1] / "laendo.nrrd").unlink()
    with pytest.raises(ValueError, match=rf"{prepare_la.UAMT_TRAIN[1]}/laendo\.nrrd: missing NRRD label"):
        prepare_la.prepare(raw, out)
    no_leftovers(out)


# ----------------------------------------------------------------------------- Pancreas-CT (DICOM + NIfTI)
def write_dicom_series(folder: Path, image: sitk.Image) -> None:
    """One CT series, one file per slice, with the position and orientation tags GDCM sorts by.

    GDCM's DICOM writer leaves the process locale at "C" (ASCII text decoding for everything after
    it in the process), so the locale is restored after writing.
    """
    folder.mkdir(parents=True)
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_slices(folder, image)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_slices(folder: Path, image: sitk.Image) -> None:
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetSize()[2]):
        sl = image[:, :, k]
        position = "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
        for tag, value in (("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.1"), ("0020|000e", "1.2.826.0.1.1.2"),
                           ("0020|0013", str(k + 1)), ("0020|0032", position),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0018|0050", str(image.GetSpacing()[2]))):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"1-{k + 1:03d}.dcm"))
        writer.Execute(sl)


def write_pancreas(raw: Path, numbers: list[int], flipped: tuple[int, ...] = ()) -> None:
    """CT of 40 HU with a -1000 and a +1000 HU block; pancreas block; ``flipped`` labels stored upside down."""
    hu = np.full((5, 28, 30), 40, np.int16)  # (Z, Y, X)
    hu[:, 2:8, 2:10], hu[:, 20:26, 20:28] = -1000, 1000
    label = np.zeros(hu.shape, np.uint8)
    label[1:4, 8:18, 10:20] = 1
    for n in numbers:
        ct = sitk.GetImageFromArray(hu)
        ct.SetSpacing((0.7, 0.7, 2.0))
        ct.SetOrigin((-10.0, 5.0, 100.0))
        write_dicom_series(raw / "Pancreas-CT" / f"PANCREAS_{n:04d}" / "study" / "series", ct)
        if n in flipped:  # same anatomy on a grid whose z axis runs the other way
            lab = sitk.GetImageFromArray(label[::-1].copy())
            lab.SetSpacing(ct.GetSpacing())
            lab.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
            lab.SetOrigin(ct.TransformIndexToPhysicalPoint((0, 0, 4)))
        else:
            lab = sitk.GetImageFromArray(label)
            lab.CopyInformation(ct)
        labels = raw / "TCIA_pancreas_labels-02-05-2017"
        labels.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(lab, str(labels / f"label{n:04d}.nii.gz"))


def test_pancreas_end_to_end(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "pancreas"
    write_pancreas(raw, [1, 2, 3, 7], flipped=(3,))
    prepare_pancreas.prepare(raw, out, margin=50, budgets=(1, 2, 6))
    assert "Pancreas-CT: 4 patients (expected 82" in capsys.readouterr().out
    store = check_store(out, {1: 1, 2: 2})
    assert store.split("test") == ["PANCREAS_0001"] and len(store.split("val")) == 1
    assert store.spec.patch_size == (96, 96, 96) and store.spec.spatial_dims == 3
    assert store.spec.target_spacing == (1.0, 1.0, 1.0)  # minissl predict resamples inputs to it
    a, b = store.read("PANCREAS_0002"), store.read("PANCREAS_0003")
    # (5, 28, 30) at (2.0, 0.7, 0.7) mm -> zoom (2, 0.7, 0.7) -> (10, 20, 21); zoom keeps the end voxel
    # centres, so the spacing reached is old x (n - 1) / (m - 1)
    assert a.image.shape == (10, 20, 21)
    np.testing.assert_allclose(a.spacing, (2.0 * 4 / 9, 0.7 * 27 / 19, 0.7 * 29 / 20))
    np.testing.assert_allclose(a.meta["original_spacing_zyx"], (2.0, 0.7, 0.7))
    assert a.meta["label_resampled"] == 0 and b.meta["label_resampled"] == 1
    np.testing.assert_array_equal(a.label, b.label)  # the flipped label grid lands on the same anatomy
    volume_mm3 = a.label.sum() * np.prod(a.spacing)
    assert abs(volume_mm3 - 3 * 10 * 10 * 2.0 * 0.7 * 0.7) / volume_mm3 < 0.25
    assert abs(a.image.mean()) < 1e-4 and abs(a.image.std() - 1) < 1e-3  # z-scored
    values, counts = np.unique(np.round(a.image, 4), return_counts=True)
    tissue = values[counts.argmax()]  # 40 HU, the most frequent value
    # HU window [-125, 275]: the -1000 / +1000 blocks are clipped to 165 below and 235 above 40 HU
    np.testing.assert_allclose((a.image.max() - tissue) / (tissue - a.image.min()), 235 / 165, rtol=1e-3)
    positions = np.asarray(a.meta["slice_positions_mm"])  # (Z, 3), LPS mm
    np.testing.assert_allclose(positions[[0, 9]], [(-10.0, 5.0, 100.0), (-10.0, 5.0, 108.0)])


def test_pancreas_corrupt_dicom_slice_names_file_and_leaves_nothing(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "pancreas"
    write_pancreas(raw, [1, 2])
    bad = raw / "Pancreas-CT" / "PANCREAS_0002" / "study" / "series" / "1-003.dcm"
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"1-003\.dcm \(corrupt or from another series\)"):
        prepare_pancreas.prepare(raw, out)
    no_leftovers(out)


def test_pancreas_published_split_is_62_20():
    lists = prepare_pancreas.published_splits()
    assert len(lists["train"]) == 62 and len(lists["test"]) == 20 and not set(lists["train"]) & set(lists["test"])


# ----------------------------------------------------------------------------- HC18 (PNG + CSV)
def write_hc18(raw: Path, stems: list[str]) -> dict[str, np.ndarray]:
    """Training images with 1-pixel (8-connected) ellipse outlines and the pixel-size CSV."""
    rng = np.random.default_rng(2)
    folder = raw / "training_set"
    folder.mkdir(parents=True)
    rows = ["filename,pixel size(mm),head circumference (mm)"]
    outlines = {}
    for i, stem in enumerate(stems):
        Image.fromarray(rng.integers(0, 256, (60, 80), dtype=np.uint8)).save(folder / f"{stem}.png")
        outline = np.zeros((60, 80), np.uint8)
        rr, cc = ellipse_perimeter(30, 40, 18 + i % 3, 25, orientation=0.3, shape=outline.shape)
        outline[rr, cc] = 255
        Image.fromarray(outline).save(folder / f"{stem}_Annotation.png")
        rows.append(f"{stem}.png,{0.1 + 0.01 * i:.2f},{150.0 + i:.2f}")
        outlines[stem] = outline > 0
    (raw / prepare_hc18.CSV_NAME).write_text("\n".join(rows) + "\n")
    test_folder = raw / "test_set"  # the unannotated test set reuses training file names
    test_folder.mkdir()
    Image.fromarray(np.zeros((60, 80), np.uint8)).save(test_folder / f"{stems[0]}.png")
    return outlines


HC18_STEMS = [f"{i:03d}_HC" for i in range(9)] + ["010_HC", "010_2HC"]  # 10 exams, 11 images


def test_hc18_end_to_end(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "hc18"
    outlines = write_hc18(raw, HC18_STEMS)
    prepare_hc18.prepare(raw, out, budget_percents=(10, 50))
    assert "HC18: 11 annotated images (expected 999" in capsys.readouterr().out
    store = check_store(out, {1: 1, 4: 4})  # 7 training exams: 10% -> 1, 50% -> 3.5 -> 4
    assert [len(store.split(s)) for s in ("train", "val", "test")] in ([8, 1, 2], [7, 2, 2], [7, 1, 3])
    assert json.loads((out / "suite.json").read_text())["standard_budgets"] == {"10%": 1, "50%": 4}
    where = {c: s for s in ("train", "val", "test") for c in store.split(s)}
    assert where["010_HC"] == where["010_2HC"]
    assert store.spec.zoom  # whole images zoomed to the 224 x 224 patch, never a 224 window of an 800 x 540 image
    case = store.read("004_HC")
    assert case.image.shape == (60, 80) and case.spacing == (0.14, 0.14)
    assert case.meta["patient_id"] == "004" and case.meta["hc_mm"] == 154.0
    assert store.read("010_2HC").meta["patient_id"] == "010"
    outline, label = outlines["004_HC"], case.label.astype(bool)
    assert label[outline].all() and label[30, 40]
    for y in range(60):  # a filled convex outline: each row is one run from its first to its last outline pixel
        xs = np.flatnonzero(outline[y])
        expected = np.zeros(80, bool)
        if xs.size:
            expected[xs[0]:xs[-1] + 1] = True
        np.testing.assert_array_equal(label[y], expected, err_msg=f"row {y}")


def test_hc18_open_outline_names_file_and_leaves_nothing(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "hc18"
    write_hc18(raw, HC18_STEMS[:3])
    path = raw / "training_set" / "001_HC_Annotation.png"
    outline = np.asarray(Image.open(path)).copy()
    outline[:30, 40:] = 0  # cut an arc out of the ellipse
    Image.fromarray(outline).save(path)
    with pytest.raises(ValueError, match=r"001_HC_Annotation\.png: the ellipse outline does not close"):
        prepare_hc18.prepare(raw, out)
    no_leftovers(out)


def test_hc18_rerun_is_idempotent_and_foreign_folders_are_refused(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "hc18"
    write_hc18(raw, HC18_STEMS[:4])
    prepare_hc18.prepare(raw, out)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    capsys.readouterr()
    prepare_hc18.prepare(raw, out)
    assert "up to date" in capsys.readouterr().out
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before
    prepare_hc18.prepare(raw, out, force=True)
    assert "every file identical" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in files} == {p: v[0] for p, v in before.items()}
    csv_path = raw / prepare_hc18.CSV_NAME
    csv_path.write_text(csv_path.read_text().replace("151.00", "160.00"))
    prepare_hc18.prepare(raw, out)
    assert "replaced" in capsys.readouterr().out and open_data(out).read("001_HC").meta["hc_mm"] == 160.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hc18.")]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to write into a non-empty folder that prepare_hc18 did not write"):
        prepare_hc18.prepare(raw, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    write_psfh(tmp_path / "psfh_raw", 3)
    with pytest.raises(ValueError, match="prepare_psfh did not write"):  # another converter's store
        prepare_psfh.prepare(tmp_path / "psfh_raw", out)
    assert open_data(out).spec.name == "hc18"


def test_hc18_through_minissl_data_prepare(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "hc18"
    write_hc18(raw, HC18_STEMS)
    res = subprocess.run([sys.executable, "-m", "minissl.cli", "data", "prepare", "hc18", str(raw), str(out),
                          "--budget-percents", "50"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "MINISSL_NO_EXT": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "HC18: 11 annotated images" in res.stdout
    check_store(out, {4: 4})
    res = subprocess.run([sys.executable, "-m", "minissl.cli", "data", "prepare", "hc19", str(raw), str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 2 and "unknown dataset 'hc19': expected one of ['acdc', 'la'" in res.stderr


def test_hc18_runs_as_a_script(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "hc18"
    write_hc18(raw, HC18_STEMS[:3])
    script = ROOT / "data_scripts" / "prepare_hc18.py"
    done = subprocess.run([sys.executable, str(script), str(raw), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "HC18: 3 annotated images (expected 999" in done.stdout
    assert prepare_hc18.main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 1


# ----------------------------------------------------------------------------- PSFH (MHA)
def write_psfh(raw: Path, n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(Y, X) labels {0, 1, 2} with 3-channel uint8 images: (3, Y, X) volumes as in the PSFHS release,
    every even-numbered one as a 2D image of 3-vector pixels."""
    rng = np.random.default_rng(3)
    (raw / "image_mha").mkdir(parents=True)
    (raw / "label_mha").mkdir()
    arrays = {}
    for i in range(1, n + 1):
        image = rng.integers(0, 256, (3, 24, 32), dtype=np.uint8)
        label = np.zeros((24, 32), np.uint8)
        label[2:6, 3:9], label[10:20, 12:28] = 1, 2
        img = sitk.GetImageFromArray(image.transpose(1, 2, 0), isVector=True) if i % 2 == 0 \
            else sitk.GetImageFromArray(image)
        img.SetSpacing((0.2, 0.3) if i % 2 == 0 else (0.2, 0.3, 1.0))
        sitk.WriteImage(img, str(raw / "image_mha" / f"{i:05d}.mha"))
        sitk.WriteImage(sitk.GetImageFromArray(label), str(raw / "label_mha" / f"{i:05d}.mha"))
        arrays[f"{i:05d}"] = (image, label)
    return arrays


def test_psfh_end_to_end(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "psfh"
    arrays = write_psfh(raw, 10)
    prepare_psfh.prepare(raw, out)
    assert "PSFH: 10 image/label pairs (expected 1358" in capsys.readouterr().out
    store = check_store(out, {1: 1})  # 7 training images: 10% and 20% both round to 1
    assert [len(store.split(s)) for s in ("train", "val", "test")] == [7, 1, 2]
    assert store.spec.num_classes == 3 and store.spec.class_names[2] == "fetal head"
    for cid in ("00003", "00004"):  # channels on a first axis, vector pixels
        case = store.read(cid)
        image, label = arrays[cid]
        assert case.image.shape == (24, 32) and case.spacing == (0.3, 0.2)
        np.testing.assert_allclose(case.image, image.mean(axis=0) / 255.0, atol=1e-6)
        np.testing.assert_array_equal(case.label, label)


def test_psfh_bad_label_value_names_file_and_leaves_nothing(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "psfh"
    write_psfh(raw, 3)
    sitk.WriteImage(sitk.GetImageFromArray(np.full((24, 32), 5, np.uint8)), str(raw / "label_mha" / "00002.mha"))
    with pytest.raises(ValueError, match=r"label_mha/00002\.mha: expected label values \[0, 1, 2\], got \[5\]"):
        prepare_psfh.prepare(raw, out)
    no_leftovers(out)


# ----------------------------------------------------------------------------- every converter: damaged raw folders
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


LA_DIR = "2018LA_Seg_Training Set/" + prepare_la.UAMT_TRAIN[1]
PANCREAS_LABELS = "TCIA_pancreas_labels-02-05-2017"
DAMAGED = {  # name: (converter, write the raw folder, damage it, the error expected)
    "acdc missing label": (prepare_acdc, lambda raw: write_acdc(raw, [11, 99]),
                           lambda raw: (raw / "training/patient099/patient099_frame04_gt.nii.gz").unlink(),
                           r"patient099_frame04_gt\.nii\.gz: missing NIfTI label"),
    "la truncated image": (prepare_la, lambda raw: write_la(raw, prepare_la.UAMT_TRAIN[:2]),
                           lambda raw: _truncate(raw / LA_DIR / "lgemri.nrrd"),
                           rf"{LA_DIR}/lgemri\.nrrd: could not read NRRD image"),
    "pancreas missing label": (prepare_pancreas, lambda raw: write_pancreas(raw, [1, 2]),
                               lambda raw: (raw / PANCREAS_LABELS / "label0002.nii.gz").unlink(),
                               r"label0002\.nii\.gz: missing label of .*PANCREAS_0002"),
    "pancreas truncated label": (prepare_pancreas, lambda raw: write_pancreas(raw, [1, 2]),
                                 lambda raw: _truncate(raw / PANCREAS_LABELS / "label0002.nii.gz"),
                                 r"label0002\.nii\.gz: could not read NIfTI label"),
    "hc18 missing annotation": (prepare_hc18, lambda raw: write_hc18(raw, HC18_STEMS[:3]),
                                lambda raw: (raw / "training_set/001_HC_Annotation.png").unlink(),
                                r"001_HC_Annotation\.png: missing PNG annotation"),
    "hc18 truncated image": (prepare_hc18, lambda raw: write_hc18(raw, HC18_STEMS[:3]),
                             lambda raw: _truncate(raw / "training_set/001_HC.png"),
                             r"001_HC\.png: could not read PNG image: OSError: image file is truncated"),
    "hc18 image listed but absent": (prepare_hc18, lambda raw: write_hc18(raw, HC18_STEMS[:3]),
                                     lambda raw: (raw / "training_set/002_HC.png").unlink(),
                                     r"002_HC\.png: missing image listed in .*training_set_pixel_size_and_HC\.csv"),
    "hc18 bad csv row": (prepare_hc18, lambda raw: write_hc18(raw, HC18_STEMS[:3]),
                         lambda raw: (raw / prepare_hc18.CSV_NAME).write_text(
                             "filename,pixel size(mm),head circumference (mm)\n000_HC.png,abc,150\n"),
                         r"pixel_size_and_HC\.csv, line 2: expected numbers for pixel size and HC, got 'abc'"),
    "psfh missing label": (prepare_psfh, lambda raw: write_psfh(raw, 3),
                           lambda raw: (raw / "label_mha/00002.mha").unlink(),
                           r"label_mha/00002\.mha: missing label for image .*image_mha/00002\.mha"),
    "psfh truncated image": (prepare_psfh, lambda raw: write_psfh(raw, 3),
                             lambda raw: _truncate(raw / "image_mha/00003.mha"),
                             r"image_mha/00003\.mha: could not read MHA image"),
}


@pytest.mark.parametrize("name", list(DAMAGED))
def test_damaged_raw_folder_names_file_and_problem_and_leaves_nothing(tmp_path, name):
    converter, write, damage, message = DAMAGED[name]
    raw, out = tmp_path / "raw", tmp_path / "out"
    write(raw)
    damage(raw)
    with pytest.raises(ValueError, match=message):
        converter.prepare(raw, out)
    no_leftovers(out)


def test_damaged_rebuild_keeps_the_earlier_output_whole(tmp_path):
    """A forced rebuild that fails half-way leaves the earlier conversion exactly as it was."""
    raw, out = tmp_path / "raw", tmp_path / "psfh"
    write_psfh(raw, 4)
    prepare_psfh.prepare(raw, out)
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    _truncate(raw / "image_mha" / "00004.mha")
    with pytest.raises(ValueError, match=r"image_mha/00004\.mha: could not read MHA image"):
        prepare_psfh.prepare(raw, out, force=True)
    after = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".psfh.")]


# ----------------------------------------------------------------------------- shared rules
def test_seeded_split_and_hold_out_are_deterministic_partitions():
    groups = [f"g{i:02d}" for i in range(20)]
    a = _common.seeded_split(reversed(groups), {"test": 0.2, "val": 0.1, "train": 0.7})
    assert a == _common.seeded_split(groups, {"test": 0.2, "val": 0.1, "train": 0.7})
    assert [len(a[s]) for s in ("test", "val", "train")] == [4, 2, 14]
    assert sorted(sum(a.values(), [])) == groups
    train, val = _common.hold_out(groups)
    assert len(val) == 2 and sorted(train + val) == groups and _common.hold_out(groups) == (train, val)
