"""minissl.data.formats: every format read in minissl order and a mask written back with the input's geometry."""
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from minissl.data.formats import read_image, suffix, write_mask
from minissl.data.store import Case, read_case, write_case

RNG = np.random.default_rng(0)
VOLUME = RNG.random((3, 5, 7)).astype(np.float32)  # (Z, Y, X)
AFFINE = np.array([[0.0, -1.2, 0.1, 30.0], [0.9, 0.0, 0.0, -12.5], [0.0, 0.2, 2.5, 7.0], [0, 0, 0, 1]])


def nifti(path: Path, data_xyz: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data_xyz, AFFINE), str(path))
    return path


def mha(path: Path, volume: np.ndarray) -> Path:
    img = sitk.GetImageFromArray(volume)
    img.SetSpacing((0.7, 0.8, 2.0))
    img.SetOrigin((-3.0, 4.0, 11.0))
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path))
    return path


def nrrd_file(path: Path, volume: np.ndarray) -> Path:
    header = {"space": "left-posterior-superior", "space origin": np.array([1.0, -2.0, 3.0]),
              "space directions": np.diag([0.5, 0.6, 1.5])}
    nrrd.write(str(path), volume, header, index_order="C")
    return path


@pytest.mark.parametrize("name", ["a.nii", "a.nii.gz", "a.mha", "a.mhd", "a.nrrd", "a.h5"])
def test_volume_round_trip_keeps_geometry(tmp_path, name):
    src = tmp_path / name
    kind = suffix(src)
    if kind in (".nii", ".nii.gz"):
        nifti(src, VOLUME.T)
    elif kind in (".mha", ".mhd"):
        mha(src, VOLUME)
    elif kind == ".nrrd":
        nrrd_file(src, VOLUME)
    else:
        write_case(src, Case("a", VOLUME, None, (2.0, 0.8, 0.7), {"patient_id": "p1"}))
    f = read_image(src)
    assert f.image.shape == VOLUME.shape and np.allclose(f.image, VOLUME)  # (Z, Y, X) whatever the format
    mask = (f.image > 0.5).astype(np.int64) + (f.image > 0.8)
    out = write_mask(tmp_path / "out" / name, mask, f)
    if kind in (".nii", ".nii.gz"):
        img = nib.load(str(out))
        assert np.allclose(img.affine, AFFINE) and img.get_data_dtype() == np.uint8
        assert np.array_equal(np.asarray(img.dataobj).T, mask)
    elif kind in (".mha", ".mhd"):
        a, b = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
        assert (b.GetSpacing(), b.GetOrigin(), b.GetDirection()) == (a.GetSpacing(), a.GetOrigin(), a.GetDirection())
        assert np.array_equal(sitk.GetArrayFromImage(b), mask)
    elif kind == ".nrrd":
        data, header = nrrd.read(str(out), index_order="C")
        assert np.array_equal(data, mask) and header["space"] == "left-posterior-superior"
        assert np.allclose(header["space origin"], [1, -2, 3])
        assert np.allclose(header["space directions"], np.diag([0.5, 0.6, 1.5]))
    else:
        case = read_case(out)
        assert np.array_equal(case.label, mask) and case.spacing == (2.0, 0.8, 0.7) and case.meta["patient_id"] == "p1"


def test_png_grey_and_colour_to_uint8_label_image(tmp_path):
    rgb = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png", dpi=(72, 72))
    f = read_image(tmp_path / "c.png")
    assert f.image.shape == (20, 30)
    out = write_mask(tmp_path / "out" / "c.png", (f.image > 100).astype(np.int64) * 3, f)
    with Image.open(out) as im:
        assert im.mode == "L" and im.size == (30, 20) and set(np.unique(np.asarray(im))) <= {0, 3}


def test_nifti_trailing_axis_is_dropped_and_restored(tmp_path):
    f = read_image(nifti(tmp_path / "t.nii.gz", VOLUME.T[..., None]))  # (X, Y, Z, 1)
    assert f.image.shape == (3, 5, 7)
    out = write_mask(tmp_path / "o" / "t.nii.gz", np.zeros((3, 5, 7), np.int64), f)
    assert nib.load(str(out)).shape == (7, 5, 3, 1)


@pytest.mark.parametrize("make, match", [
    (lambda d: (d / "x.jpg").write_bytes(b"\xff\xd8"), r"x\.jpg: unsupported file type; expected one of \.nii"),
    (lambda d: nifti(d / "x.nii", np.zeros((4, 4, 3, 2), np.float32)),
     r"x\.nii: expected a 2D or 3D single-channel image, got an array of shape \(2, 3, 4, 4\)"),
    (lambda d: (d / "x.nii.gz").write_bytes(b"not a nifti"), r"could not read .*x\.nii\.gz"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path, make, match):
    make(tmp_path)
    with pytest.raises(ValueError, match=match):
        read_image(next(tmp_path.iterdir()))


def test_corrupt_nrrd_names_the_file(tmp_path):
    (tmp_path / "x.nrrd").write_bytes(b"NRRD0004\ntype: float\n")
    with pytest.raises(ValueError, match=r"could not read .*x\.nrrd"):
        read_image(tmp_path / "x.nrrd")


def test_spacing_is_read_in_minissl_order(tmp_path):
    """Voxel sizes (mm) come back (Z, Y, X) like the array, from each format's header; a PNG has none."""
    xyz = np.zeros((6, 5, 4), np.float32)  # (X, Y, Z)
    nib.save(nib.Nifti1Image(xyz, np.diag([0.5, 0.7, 2.0, 1.0])), str(tmp_path / "a.nii.gz"))
    nrrd.write(str(tmp_path / "a.nrrd"), xyz, {"space": "left-posterior-superior",
                                               "space directions": np.diag([0.5, 0.7, 2.0])})
    nrrd.write(str(tmp_path / "b.nrrd"), xyz, {"spacings": [0.5, 0.7, 2.0]})
    nrrd.write(str(tmp_path / "c.nrrd"), xyz)
    img = sitk.GetImageFromArray(xyz.T.copy())
    img.SetSpacing((0.5, 0.7, 2.0))
    sitk.WriteImage(img, str(tmp_path / "a.mha"))
    write_case(tmp_path / "a.h5", Case("a", xyz.T.copy(), None, (2.0, 0.7, 0.5)))
    for name in ("a.nii.gz", "a.nrrd", "b.nrrd", "a.mha", "a.h5"):
        f = read_image(tmp_path / name)
        assert f.image.shape == (4, 5, 6) and f.spacing == pytest.approx((2.0, 0.7, 0.5)), name
    assert read_image(tmp_path / "c.nrrd").spacing is None
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png").spacing is None
