"""SSL4MIS / BCP layout readers on tiny fake ACDC and LA folders written with h5py."""
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from minissl.data.datasets import make_train_loader
from minissl.data.ssl4mis import ACDCStore, LAStore, detect
from minissl.data.sources import open_data
from minissl.data.transforms import zoom
from minissl.inference import predict_case

# train_slices.list order is patient-grouped but not sorted, as in SSL4MIS (starts with patient099)
TRAIN = ["patient099", "patient038", "patient050", "patient100"]
FRAMES = ("01", "12")
Z, Y, X = 3, 6, 5


def _h5(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f[key] = value


def _volume(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((Z, Y, X), dtype=np.float32), rng.integers(0, 4, (Z, Y, X)).astype(np.uint8)


@pytest.fixture
def acdc(tmp_path: Path) -> Path:
    root = tmp_path / "ACDC"
    rows = []
    for k, patient in enumerate(TRAIN + ["patient028", "patient011"]):
        for frame in FRAMES:
            case = f"{patient}_frame{frame}"
            image, label = _volume(k * 10 + int(frame))
            if case != "patient050_frame12":  # this one only exists as slices
                _h5(root / "data" / f"{case}.h5", image=image, label=label)
            if patient in TRAIN:
                for z in range(Z):
                    rows.append(f"{case}_slice_{z + 1}")
                    _h5(root / "data" / "slices" / f"{rows[-1]}.h5", image=image[z], label=label[z])
    (root / "train_slices.list").write_text("\n".join(rows) + "\n")
    (root / "val.list").write_text("# validation\npatient028_frame01\n\n../data/ACDC/data/patient028_frame12.h5\n")
    (root / "test.list").write_text("patient011_frame01.h5\npatient011_frame12\n")
    return root


def _la(tmp_path: Path, n_train: int = 20, n_test: int = 3) -> tuple[Path, list[str], list[str]]:
    """UA-MT layout: volumes in data/2018LA_Seg_Training Set/<ID>/, lists one folder up."""
    data = tmp_path / "data"
    ids = [f"CASE{k:02d}" for k in range(n_train + n_test)]
    for k, case in enumerate(ids):
        rng = np.random.default_rng(k)
        image = rng.standard_normal((7, 6, 4)).astype(np.float32)  # (X, Y, Z) as in mri_norm2.h5
        _h5(data / "2018LA_Seg_Training Set" / case / "mri_norm2.h5", image=image, label=(image > 1).astype(np.uint8))
    (data / "train.list").write_text("\n".join(ids[:n_train]) + "\n")
    (data / "test.list").write_text("\n".join(f"{c}/mri_norm2.h5" for c in ids[n_train:]) + "\n")
    return data, ids[:n_train], ids[n_train:]


def test_acdc_detect_and_splits(acdc: Path, tmp_path: Path) -> None:
    for root in (acdc, acdc / "data", tmp_path):  # the folder, its data/, its parent
        store = open_data(root)  # no suite.json: open_data asks detect()
        assert isinstance(store, ACDCStore) and store.root == acdc
    assert store.split("train") == [f"{p}_frame{f}" for p in TRAIN for f in FRAMES]
    assert store.split("val") == ["patient028_frame01", "patient028_frame12"]
    assert store.split("test") == ["patient011_frame01", "patient011_frame12"]
    assert (store.spec.spatial_dims, store.spec.num_classes, store.spec.n_train) == (2, 4, 8)
    assert detect(tmp_path / "nothing") is None


def test_acdc_first_patients_budget_matches_list_prefix(acdc: Path) -> None:
    store = detect(acdc)
    labeled = store.labeled(3, seed=123)  # "first" ignores the seed
    assert labeled == [f"{p}_frame{f}" for p in TRAIN[:3] for f in FRAMES]
    rows = (acdc / "train_slices.list").read_text().split()
    n = 3 * len(FRAMES) * Z  # SSL4MIS: 3 patients -> the first rows of train_slices.list
    assert {r.rsplit("_slice_", 1)[0] for r in rows[:n]} == set(labeled)
    assert not {r.rsplit("_slice_", 1)[0] for r in rows[n:]} & set(labeled)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_acdc_random_budget_groups_patients(acdc: Path, seed: int) -> None:
    store = ACDCStore(acdc, budget_rule="random")
    labeled = store.labeled(2, seed)
    assert labeled == store.labeled(2, seed) and len(labeled) == 2 * len(FRAMES)
    patients = {store.patient(c) for c in labeled}
    unlabeled = store.unlabeled(2, seed)
    assert sorted(unlabeled + labeled) == sorted(store.split("train"))
    assert len(patients) == 2 and not patients & {store.patient(c) for c in unlabeled}
    slices = [r for r in (acdc / "train_slices.list").read_text().split() if r.rsplit("_slice_", 1)[0] in unlabeled]
    assert not [s for s in slices if s.split("_frame")[0] in patients]


def test_acdc_read_volume_and_stacked_slices(acdc: Path) -> None:
    store = detect(acdc)
    case = store.read("patient099_frame01")
    image, label = _volume(1)
    np.testing.assert_array_equal(case.image, image)
    np.testing.assert_array_equal(case.label, label)
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8 and case.spacing == (1.0, 1.0, 1.0)
    assert case.meta["patient_id"] == "patient099" and case.meta["spacing_unit"] == "pixel"
    stacked = store.read("patient050_frame12")  # no volume file: built from its 3 slices
    np.testing.assert_array_equal(stacked.image, _volume(2 * 10 + 12)[0])


def test_la_transpose_lists_and_validation(tmp_path: Path) -> None:
    data, train, test = _la(tmp_path)
    store = detect(data)
    assert isinstance(store, LAStore) and store.split("test") == test
    val = store.split("val")
    assert len(val) == 2 and set(val) <= set(train[16:])  # first 16 (standard budgets) stay in train
    assert store.split("train") == [c for c in train if c not in val]
    assert LAStore(store.root).split("val") == val  # seeded: the same every time
    assert store.labeled(4) == train[:4]
    with h5py.File(store.root / train[0] / "mri_norm2.h5") as f:
        raw = f["image"][()]  # (X, Y, Z)
    case = store.read(train[0])
    assert case.image.shape == (4, 6, 7) and case.image[3, 2, 1] == raw[1, 2, 3]  # (Z, Y, X)
    assert case.label.shape == (4, 6, 7) and case.meta["spacing_unit"] == "pixel"
    (data / "val.list").write_text(train[-1] + "\n")
    assert LAStore(store.root).split("val") == [train[-1]]


def test_errors_name_the_missing_thing(acdc: Path, tmp_path: Path) -> None:
    store = detect(acdc)
    (acdc / "data" / "patient099_frame12.h5").unlink()
    for s in (acdc / "data" / "slices").glob("patient099_frame12_*"):
        s.unlink()
    with pytest.raises(FileNotFoundError, match="missing h5 file .*slices/patient099_frame12_slice_1.h5"):
        store.read("patient099_frame12")
    _h5(acdc / "data" / "broken.h5", image=np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match=r"broken.h5: expected key 'label'"):
        store.read("broken")
    _h5(acdc / "data" / "bad.h5", image=np.zeros((1, 2, 2)), label=np.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        store.read("bad")
    with pytest.raises(ValueError, match=r"budget 5 is larger than the training set \(4 patients"):
        store.labeled(5)
    with pytest.raises(ValueError, match="rule must be 'first' or 'random'"):
        store.labeled(1, rule="best")
    with pytest.raises(ValueError, match="split must be one of"):
        store.split("valid")
    (acdc / "val.list").unlink()
    with pytest.raises(FileNotFoundError, match="missing list file 'val.list'"):
        detect(acdc)
    data, _, _ = _la(tmp_path / "la", n_train=3, n_test=1)
    (data / "test.list").unlink()
    with pytest.raises(FileNotFoundError, match="missing list file 'test.list'"):
        detect(data)


def _blocks(shape: tuple[int, int, int]) -> np.ndarray:
    """A (Z, Y, X) label of nested blocks of classes 1-3, placed relative to the slice size."""
    label = np.zeros(shape, np.uint8)
    _, h, w = shape
    label[:, h // 5:4 * h // 5, w // 6:5 * w // 6] = 1
    label[:, h // 3:2 * h // 3, w // 3:2 * w // 3] = 2
    label[:, 2 * h // 5:3 * h // 5, 2 * w // 5:3 * w // 5] = 3
    return label


@pytest.fixture
def acdc_sizes(tmp_path: Path) -> Path:
    """ACDC layout whose volumes have slices of 150x180 and 300x256; the image is the label as a float."""
    root, rows = tmp_path / "ACDC", []
    for patient, shape in (("patient001", (2, 150, 180)), ("patient002", (2, 300, 256))):
        label = _blocks(shape)
        case = f"{patient}_frame01"
        _h5(root / "data" / f"{case}.h5", image=label.astype(np.float32), label=label)
        for z in range(shape[0]):
            rows.append(f"{case}_slice_{z + 1}")
            _h5(root / "data" / "slices" / f"{rows[-1]}.h5", image=label[z].astype(np.float32), label=label[z])
    (root / "train_slices.list").write_text("\n".join(rows) + "\n")
    for name in ("val.list", "test.list"):
        (root / name).write_text("patient001_frame01\npatient002_frame01\n")
    return root


def _oracle(x: torch.Tensor) -> torch.Tensor:
    """Logits (B, 4, H, W) that pick the class written in the image (the image is the label)."""
    return 10.0 * torch.nn.functional.one_hot(x[:, 0].round().long().clamp(0, 3), 4).movedim(-1, 1).float()


@pytest.mark.parametrize("patient", ["patient001", "patient002"])
def test_acdc_trains_on_slices_zoomed_to_256_and_predicts_at_native_size(acdc_sizes, patient):
    store = ACDCStore(acdc_sizes)
    assert store.spec.zoom and store.spec.patch_size == (256, 256)
    batch = make_train_loader(store, [f"{patient}_frame01"], batch_size=2, unlabeled=False, augment=False).batch(0)
    assert batch["x_l"].shape == (2, 1, 256, 256) and batch["y_l"].shape == (2, 256, 256)
    labels = batch["y_l"]
    assert set(labels.unique().tolist()) == {0, 1, 2, 3}  # nearest: no class invented, none lost
    assert (batch["x_l"][:, 0].round() == labels).float().mean() > 0.98  # image (linear) and label aligned
    fractions = np.bincount(labels.flatten().numpy(), minlength=4) / labels.numel()
    native = store.read(f"{patient}_frame01")
    assert np.allclose(fractions, np.bincount(native.label.ravel(), minlength=4) / native.label.size, atol=0.01)
    pred = predict_case(_oracle, native.image, 2, store.spec.patch_size, zoom=store.spec.zoom)
    assert pred.shape == native.label.shape  # zoomed back to 150x180 / 300x256
    assert (pred == native.label).mean() > 0.98


def test_acdc_native_resolution_patches_are_an_option(acdc_sizes):
    store = ACDCStore(acdc_sizes, zoom=False)
    assert not store.spec.zoom
    batch = make_train_loader(store, ["patient001_frame01"], batch_size=2, unlabeled=False, augment=False).batch(0)
    assert batch["x_l"].shape == (2, 1, 256, 256)
    y = batch["y_l"][0]  # the 150x180 slice sits padded in the middle of the 256x256 window
    native = torch.from_numpy(store.read("patient001_frame01").label[0])
    assert (y[:53] == 0).all() and (y[53:203, 38:218] == native).all()


def test_zoom_round_trip_keeps_an_upsampled_label_exactly():
    label = np.random.default_rng(0).integers(0, 4, (2, 150, 180)).astype(np.uint8)
    image, up = zoom(label.astype(np.float32), label, (256, 256))
    assert up.shape == image.shape == (2, 256, 256) and up.dtype == np.uint8
    assert np.array_equal(zoom(image, up, (150, 180))[1], label)  # nearest up, then down: every pixel back
