"""predict_probs / predict_case: zoomed to the patch and back, or sliding windows vs MONAI (2D and 3D);
predict_files: the input's format, geometry and the run's resampling."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from minissl.inference import predict_case, predict_probs
from minissl.nets import UNet


def _net(spatial_dims, num_classes=3):
    torch.manual_seed(0)
    return UNet(1, num_classes, spatial_dims, width=4, depth=2)


def test_2d_slicewise_equals_batched_forward():
    net = _net(2)
    vol = np.random.default_rng(0).standard_normal((5, 16, 12)).astype(np.float32)
    probs = predict_probs(net, vol, 2, (16, 12), batch_size=2)
    with torch.no_grad():
        ref = torch.softmax(net.eval()(torch.from_numpy(vol)[:, None]), 1).movedim(1, 0).numpy()
    assert probs.shape == (3, 5, 16, 12)
    np.testing.assert_allclose(probs, ref, atol=1e-6)
    labels = predict_case(net, vol[2], 2, (16, 12))
    assert labels.dtype == np.int64 and np.array_equal(labels, ref[:, 2].argmax(0))


def test_2d_resizes_to_patch_and_back():
    net = _net(2)
    img = np.random.default_rng(1).standard_normal((20, 28)).astype(np.float32)
    probs = predict_probs(net, img, 2, (16, 16), zoom=True)
    with torch.no_grad():
        x = F.interpolate(torch.from_numpy(img)[None, None], size=(16, 16), mode="bilinear")
        logits = F.interpolate(net.eval()(x), size=(20, 28), mode="bilinear")
    np.testing.assert_allclose(probs, torch.softmax(logits, 1)[0].numpy(), atol=1e-6)
    assert predict_case(net, img, 2, (16, 16), zoom=True).shape == (20, 28)


@pytest.mark.parametrize("shape", [(20, 28), (3, 20, 28), (10, 12)])
def test_2d_native_resolution_runs_slide_windows_as_monai(shape):
    """A run trained on native-resolution crops (zoom False) is predicted with windows at native
    resolution, slice by slice, not with the slice squeezed into one patch (a scale the net never saw)."""
    net = _net(2).eval()
    image = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    probs = predict_probs(net, image, 2, (16, 16), batch_size=3, overlap=0.5)
    slices = image.reshape(-1, *shape[-2:])
    with torch.no_grad():
        ref = torch.stack([sliding_window_inference(torch.from_numpy(sl)[None, None], (16, 16), 3,
                                                    lambda x: torch.softmax(net(x), 1), overlap=0.5,
                                                    mode="constant")[0] for sl in slices], 1)   # (C, N, Y, X)
    assert probs.shape == (3, *shape)
    np.testing.assert_allclose(probs, ref.reshape(3, *shape).numpy(), atol=1e-6)


@pytest.mark.parametrize("shape,overlap", [((12, 20, 18), 0.5), ((6, 10, 30), 0.25), ((8, 8, 8), 0.0)])
def test_3d_sliding_window_matches_monai(shape, overlap):
    net = _net(3).eval()
    vol = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    patch = (8, 12, 16)
    probs = predict_probs(net, vol, 3, patch, batch_size=3, overlap=overlap)
    with torch.no_grad():
        ref = sliding_window_inference(torch.from_numpy(vol)[None, None], patch, 3,
                                       lambda x: torch.softmax(net(x), 1), overlap=overlap, mode="constant")
    assert probs.shape == (3, *shape)
    np.testing.assert_allclose(probs, ref[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_restores_train_mode_and_no_grad():
    net = _net(2, num_classes=1).train()
    probs = predict_probs(net.forward, np.zeros((16, 16)), 2, (16, 16))
    assert net.training and probs.shape == (2, 16, 16)        # sigmoid -> (1 - s, s)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-6)


def test_bad_input():
    net = _net(2)
    with pytest.raises(ValueError, match=r"\(Z, Y, X\) image for spatial_dims=3, got shape \(16, 16\)"):
        predict_case(net, np.zeros((16, 16)), 3, (8, 8, 8))
    with pytest.raises(ValueError, match="patch_size must have 2 entries"):
        predict_case(net, np.zeros((16, 16)), 2, (8, 8, 8))
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\)"):
        predict_case(net, np.zeros((8, 8, 8)), 3, (8, 8, 8), overlap=1.0)


@pytest.fixture(scope="module")
def cardiac_run(tiny_stores, tmp_path_factory):
    """A tiny trained 2D run (4 classes, patch 32x32)."""
    from minissl import engine
    from minissl.config import load_config

    cfg = load_config(method="supervised", data_root=str(tiny_stores["cardiac"]), width=4, depth=2, batch_size=2,
                      labeled_bs=2, max_iters=2, out_dir=str(tmp_path_factory.mktemp("runs")), progress=False)
    return engine.train(cfg).run_dir


def test_predict_writes_masks_in_the_inputs_format_and_geometry(cardiac_run, tmp_path):
    import nibabel as nib
    import SimpleITK as sitk
    from PIL import Image

    from minissl import cli
    from minissl.data.transforms import normalise
    from minissl.run import Run

    rng = np.random.default_rng(1)
    volume = rng.random((40, 36, 3)).astype(np.float32) * 900 - 100  # (X, Y, Z), not in [0, 1]
    affine = np.array([[0.0, -1.3, 0.2, 40.0], [0.7, 0.0, 0.0, -9.0], [0.0, 0.1, 3.0, 2.5], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / "scan.nii.gz"))
    Image.fromarray(rng.integers(0, 256, (50, 30, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    img = sitk.GetImageFromArray(volume.T.copy())  # (Z, Y, X)
    img.SetSpacing((0.7, 1.3, 3.0))
    img.SetOrigin((5.0, -2.0, 1.0))
    img.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(tmp_path / "scan.mha"))
    inputs = [str(tmp_path / n) for n in ("scan.nii.gz", "photo.png", "scan.mha")]
    assert cli.main(["predict", str(cardiac_run), *inputs, "-o", str(tmp_path / "masks")]) == 0

    out = nib.load(str(tmp_path / "masks" / "scan.nii.gz"))
    assert out.shape == volume.shape and np.allclose(out.affine, affine) and out.get_data_dtype() == np.uint8
    mask = np.asarray(out.dataobj)
    assert mask.min() >= 0 and mask.max() < 4
    run = Run(cardiac_run)
    spec, method = run.suite_spec(), run.load_method()
    expected = predict_case(method.predict, normalise(volume.T, spec.intensity), 2, spec.patch_size)  # slice by slice
    assert np.array_equal(mask.T, expected)
    with Image.open(tmp_path / "masks" / "photo.png") as im:
        assert im.mode == "L" and im.size == (30, 50) and np.asarray(im).max() < 4
    a, b = img, sitk.ReadImage(str(tmp_path / "masks" / "scan.mha"))
    assert (b.GetSize(), b.GetSpacing(), b.GetOrigin(), b.GetDirection()) == \
        (a.GetSize(), a.GetSpacing(), a.GetOrigin(), a.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(b), expected)


def test_predict_refuses_unsupported_files_and_2d_images_for_3d_runs(cardiac_run, tmp_path, capsys):
    from PIL import Image

    from minissl import cli
    from minissl.data.phantoms import SUITES
    from minissl.inference import predict_files

    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8")
    assert cli.main(["predict", str(cardiac_run), str(tmp_path / "x.jpg"), "-o", str(tmp_path / "m")]) == 2
    assert "x.jpg: unsupported file type; expected one of .nii, .nii.gz" in capsys.readouterr().err
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "flat.png")
    with pytest.raises(ValueError, match=r"flat\.png: a 3D run .* needs a 3D volume, got a 2D image of shape \(16, 16"):
        predict_files(_net(3), SUITES["atrium"], [tmp_path / "flat.png"], tmp_path / "m")
    with pytest.raises(ValueError, match="the mask would overwrite its input"):
        predict_files(_net(2), SUITES["cardiac"], [tmp_path / "flat.png"], tmp_path)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("intensity", ["minmax", "zscore", "none"])
def test_predict_files_normalises_as_the_run_s_data(tmp_path, intensity):
    import dataclasses

    import nibabel as nib

    from minissl.data.phantoms import SUITES
    from minissl.inference import predict_files

    def two_classes(x):  # class 1 where the normalised intensity exceeds 0.5 (zscore: 0)
        t = 0.0 if intensity == "zscore" else 0.5
        return torch.cat([t - x, x - t], dim=1)  # (B, 2, H, W)

    volume = np.random.default_rng(2).uniform(100, 300, (12, 8, 2)).astype(np.float32)  # (X, Y, Z)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "v.nii"))
    spec = dataclasses.replace(SUITES["fetal_head"], patch_size=(8, 12), intensity=intensity)
    (out,) = predict_files(two_classes, spec, [tmp_path / "v.nii"], tmp_path / "m")
    threshold = {"minmax": (volume.min() + volume.max()) / 2, "zscore": volume.mean(), "none": 0.5}[intensity]
    assert np.array_equal(np.asarray(nib.load(str(out)).dataobj), volume > threshold)


def _erode5(x):
    """A scale-sensitive 'network': class 1 where a 5x5-pixel erosion of (x > 0.5) keeps the pixel, so a bar
    narrower than 5 pixels vanishes. (B, 1, H, W) -> (B, 2, H, W)."""
    p = -F.max_pool2d(-(x > 0.5).float(), 5, stride=1, padding=2)       # (B, 1, H, W)
    return torch.cat([0.5 - p, p - 0.5], dim=1)


def _bars(scale):
    """(Y, X) image of 32 x 32 mm at ``scale`` px per mm: a 8 mm wide and a 3 mm wide vertical bar."""
    image = np.zeros((32 * scale, 32 * scale), np.float32)
    image[4 * scale:28 * scale, 4 * scale:12 * scale] = 1.0     # x 4-12 mm
    image[4 * scale:28 * scale, 20 * scale:23 * scale] = 1.0    # x 20-23 mm
    return image


def _check_bars(mask, scale):
    assert mask[16 * scale, 8 * scale] == 1                     # the wide bar survives the 5 mm erosion
    assert not mask[:, 18 * scale:].any()                       # the 3 mm bar is narrower than 5 px at 1 mm


def test_predict_files_resamples_to_the_run_s_spacing_and_back(tmp_path):
    """A run whose store was resampled to 1 mm gets a 0.5 mm NIfTI (and a PNG with --spacing) at 1 mm: the
    3 mm bar disappears as it would in training; without the resampling it is 6 px wide and would survive."""
    import dataclasses

    import nibabel as nib
    from PIL import Image

    from minissl.data.phantoms import SUITES
    from minissl.inference import predict_files

    spec = dataclasses.replace(SUITES["fetal_head"], patch_size=(32, 32), intensity="none", target_spacing=(1.0, 1.0))
    fine = _bars(2)                                                 # (64, 64) at 0.5 mm
    affine = np.diag([0.5, 0.5, 1.0, 1.0])
    affine[:3, 3] = (7.0, -3.0, 2.0)
    nib.save(nib.Nifti1Image(fine.T[..., None].copy(), affine), str(tmp_path / "fine.nii.gz"))  # (X, Y, 1)
    Image.fromarray((fine * 255).astype(np.uint8)).save(tmp_path / "fine.png")
    with pytest.raises(ValueError, match=r"fine\.png: the run's images were resampled to \(1\.0, 1\.0\) mm .* "
                                         r"--spacing"):
        predict_files(_erode5, spec, [tmp_path / "fine.png"], tmp_path / "m")
    nii, png = predict_files(_erode5, spec, [tmp_path / "fine.nii.gz", tmp_path / "fine.png"], tmp_path / "m",
                             spacing=(0.5, 0.5))                    # the PNG takes --spacing, the NIfTI its own
    out = nib.load(str(nii))
    assert out.shape == (64, 64, 1) and np.allclose(out.affine, affine)
    nii_mask = np.asarray(out.dataobj)[..., 0].T                      # (Y, X)
    _check_bars(nii_mask, 2)
    with Image.open(png) as im:
        png_mask = np.asarray(im)
    assert png_mask.shape == (64, 64)
    np.testing.assert_array_equal(png_mask, nii_mask)
    native = predict_case(_erode5, fine, 2, (32, 32))                  # the same file without resampling
    assert native[:, 36:].any()                                       # keeps the thin bar: a different answer


def test_zoomed_run_predicts_a_png_of_another_size_at_the_patch_scale(tmp_path):
    """An SSL4MIS-style run (slices zoomed to the patch) sees a 64 x 64 PNG zoomed to 32 x 32 and the mask
    comes back at 64 x 64: the thin bar (6 px, 3 px after the zoom) disappears."""
    import dataclasses

    from PIL import Image

    from minissl.data.phantoms import SUITES
    from minissl.inference import predict_files

    spec = dataclasses.replace(SUITES["fetal_head"], patch_size=(32, 32), zoom=True)
    Image.fromarray((_bars(2) * 255).astype(np.uint8)).save(tmp_path / "scan.png")
    (png,) = predict_files(_erode5, spec, [tmp_path / "scan.png"], tmp_path / "m")
    with Image.open(png) as im:
        mask = np.asarray(im)
    assert mask.shape == (64, 64)
    _check_bars(mask, 2)
