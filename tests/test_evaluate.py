"""evaluate / summarise / write_rows on tiny fake cases."""
import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from medpy.metric import binary as mb

from minissl import evaluate as ev
from minissl.data.store import read_case
from minissl.inference import predict_uncertainty


class Oracle(torch.nn.Module):
    """Logits that reproduce a fixed label map (looked up by the input's values)."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):                                     # x holds the labels as floats
        return torch.nn.functional.one_hot(x[:, 0].round().long(), self.num_classes).movedim(-1, 1).float() * 10


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def _case(cid, image, label, spacing=(1.0, 1.0), **meta):
    return SimpleNamespace(id=cid, image=image.astype(np.float32), label=label, spacing=spacing, meta=meta)


def test_evaluate_rows_match_medpy():
    spec = SimpleNamespace(spatial_dims=2, num_classes=3, patch_size=(32, 32), class_names=["bg", "a", "b"])
    vol = np.zeros((3, 32, 32), np.uint8)
    vol[:, 4:14, 4:14], vol[1:, 18:28, 16:30] = 1, 2
    gt = vol.copy()
    gt[:, 5:15, 4:14] = np.where(gt[:, 5:15, 4:14] == 2, 2, 1)
    cases = [_case("v0", vol, gt, spacing=(5.0, 0.8, 0.8)), _case("v1", vol, vol, spacing=None)]
    rows = ev.evaluate(Oracle(3), cases, spec)
    assert [(r["case"], r["class"], r["unit"]) for r in rows] == [
        ("v0", "a", "mm"), ("v0", "b", "mm"), ("v1", "a", "px"), ("v1", "b", "px")]
    assert rows[0]["hd95"] == pytest.approx(mb.hd95(vol == 1, gt == 1, (5.0, 0.8, 0.8)), abs=1e-6)
    assert rows[0]["dice"] == pytest.approx(mb.dc(vol == 1, gt == 1))
    assert rows[2]["dice"] == 1.0 and rows[3]["hd95"] == 0.0
    s = ev.summarise(rows)
    case_means = [np.mean([rows[0]["dice"], rows[1]["dice"]]), 1.0]
    assert sorted(s) == ["asd", "dice", "hd95", "jaccard"] and s["dice"]["n"] == 2
    assert s["dice"]["mean"] == pytest.approx(np.mean(case_means))
    assert s["dice"]["std"] == pytest.approx(np.std(case_means))
    per_class = ev.summarise(rows, by_class=True)
    assert per_class["a"]["dice"]["mean"] == pytest.approx((rows[0]["dice"] + 1) / 2)


def test_fetal_head_hc_error_and_files(tmp_path):
    spec = SimpleNamespace(spatial_dims=2, num_classes=2, patch_size=(64, 80), class_names=["bg", "head"])
    gt = _disk((64, 80), 32, 40, 20)
    pred = np.zeros_like(gt)
    cases = [_case("h0", gt, gt, spacing=(0.2, 0.2), pixel_size_mm=0.2),
             _case("h1", pred, gt, spacing=(0.2, 0.2), pixel_size_mm=0.2)]
    rows = ev.evaluate(Oracle(2), cases, spec)
    assert rows[0]["hc_error_mm"] == pytest.approx(0.0, abs=1e-9)
    assert rows[1]["hc_error_mm"] == pytest.approx(2 * math.pi * 20.0 * 0.2, rel=0.03)   # empty pred: HC 0
    assert rows[1]["hc_signed_mm"] == -rows[1]["hc_error_mm"]                          # too small: negative
    assert rows[1]["dice"] == 0.0 and rows[1]["hd95"] == pytest.approx(math.hypot(64 * 0.2, 80 * 0.2))
    ev.write_rows(rows, tmp_path / "m.csv", tmp_path / "m.json")
    table = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert list(table[0]) == ["case", "class", "unit", "dice", "jaccard", "hd95", "asd", "hc_error_mm", "hc_signed_mm"]
    assert float(table[1]["hd95"]) == pytest.approx(rows[1]["hd95"])
    payload = json.loads((tmp_path / "m.json").read_text())
    assert payload["rows"] == rows and payload["summary"]["hc_error_mm"]["mean"] > 0
    assert payload["summary"]["hc_signed_mm"]["mean"] == pytest.approx(-payload["summary"]["hc_error_mm"]["mean"])
    assert payload["per_class"]["head"]["dice"]["mean"] == 0.5


def test_bad_input():
    spec = SimpleNamespace(spatial_dims=2, num_classes=2, patch_size=(16, 16), class_names=None)
    with pytest.raises(ValueError, match="case u0 has no label"):
        ev.evaluate(Oracle(2), [_case("u0", np.zeros((16, 16)), None)], spec)
    with pytest.raises(ValueError, match="at least one row"):
        ev.summarise([])


def test_evaluate_3d_sliding_window():
    spec = SimpleNamespace(spatial_dims=3, num_classes=2, patch_size=(8, 8, 8), class_names=["bg", "atrium"])
    label = np.zeros((10, 20, 12), np.uint8)
    label[2:8, 5:15, 3:9] = 1
    rows = ev.evaluate(Oracle(2), [_case("a0", label, label, spacing=(1.0, 0.6, 0.6))], spec)
    assert rows == [{"case": "a0", "class": "atrium", "unit": "mm", "dice": 1.0, "jaccard": 1.0,
                     "hd95": 0.0, "asd": 0.0}]


def test_distances_of_an_ssl4mis_case_are_in_pixels():
    """SSL4MIS files hold no spacing: the reader gives spacing 1 and spacing_unit "pixel"; the rows
    must say px (they said mm)."""
    spec = SimpleNamespace(spatial_dims=2, num_classes=2, patch_size=(32, 32), class_names=["bg", "fg"])
    gt = _disk((32, 32), 16, 16, 8)
    pred = _disk((32, 32), 16, 18, 8)
    case = _case("patient001_frame01_slice_3", gt, gt, spacing=(1.0, 1.0), spacing_unit="pixel")
    row = ev.case_rows(pred, case, spec)[0]
    assert row["unit"] == "px" and row["hd95"] == pytest.approx(mb.hd95(pred == 1, gt == 1), abs=1e-6)


def test_signed_hc_difference_is_positive_for_a_too_large_head():
    spec = SimpleNamespace(spatial_dims=2, num_classes=2, patch_size=(64, 80), class_names=["bg", "head"])
    gt, big = _disk((64, 80), 32, 40, 15), _disk((64, 80), 32, 40, 20)
    (row,) = ev.evaluate(Oracle(2), [_case("h", big, gt, spacing=(0.3, 0.3), pixel_size_mm=0.3)], spec)
    assert row["hc_signed_mm"] == pytest.approx(2 * math.pi * 5.0 * 0.3, rel=0.05)
    assert row["hc_error_mm"] == row["hc_signed_mm"]


def test_acdc_per_class_summary_and_printout():
    """RV, MYO and LV each get their own Dice and HD95 (mean over cases), printed after the overall means."""
    spec = SimpleNamespace(spatial_dims=2, num_classes=4, patch_size=(32, 32), class_names=["BG", "RV", "MYO", "LV"])
    gt = np.zeros((2, 32, 32), np.uint8)
    gt[:, 2:10, 2:10], gt[:, 12:20, 12:20], gt[:, 22:30, 22:30] = 1, 2, 3
    pred = gt.copy()
    pred[pred == 2] = 0                                       # MYO missed entirely in case c1
    rows = ev.evaluate(Oracle(4), [_case("c0", gt, gt, spacing=(8.0, 1.5, 1.5)),
                                   _case("c1", pred, gt, spacing=(8.0, 1.5, 1.5))], spec)
    assert [(r["case"], r["class"]) for r in rows] == [(c, k) for c in ("c0", "c1") for k in ("RV", "MYO", "LV")]
    per_class = ev.summarise(rows, by_class=True)
    assert per_class["RV"]["dice"]["mean"] == 1.0 and per_class["LV"]["hd95"]["mean"] == 0.0
    assert per_class["MYO"]["dice"] == {"mean": 0.5, "std": 0.5, "n": 2}
    worst = math.sqrt((2 * 8.0) ** 2 + 2 * (32 * 1.5) ** 2)   # empty prediction: the image diagonal in mm
    assert per_class["MYO"]["hd95"]["mean"] == pytest.approx(worst / 2)
    text = ev.format_summary(rows).splitlines()
    assert text[0].split()[:4] == ["dice:", f"{ev.summarise(rows)['dice']['mean']:.4f}", "±",
                                   f"{ev.summarise(rows)['dice']['std']:.4f}"]
    assert "mm" in next(line for line in text if "hd95:" in line)
    assert [line.split()[0] for line in text[-3:]] == ["RV", "MYO", "LV"]
    assert text[-2].split()[1:4] == ["0.5000", "±", "0.5000"]


class Identity(torch.nn.Module):
    """An "uncertainty" that is the input image itself: windows and resampling must give the image back."""

    def forward(self, x):                                     # (B, 1, *P) -> (B, *P)
        return x[:, 0]


def test_uncertainty_maps_are_saved_beside_the_predictions_in_the_case_geometry(tmp_path):
    spec = SimpleNamespace(spatial_dims=3, num_classes=2, patch_size=(8, 8, 8), class_names=["bg", "atrium"])
    label = np.zeros((10, 20, 12), np.uint8)  # overlapping 8^3 windows along every axis
    label[2:8, 5:15, 3:9] = 1
    case = _case("a0", label, label, spacing=(1.0, 0.6, 0.7), patient_id="p0")
    ev.evaluate(Oracle(2), [case], spec, save_dir=tmp_path, uncertainty=Identity())
    pred, unc = read_case(tmp_path / "a0.h5"), read_case(tmp_path / "a0_uncertainty.h5")
    assert np.array_equal(pred.label, label) and np.array_equal(pred.image, case.image)
    assert unc.label is None and unc.image.dtype == np.float32
    np.testing.assert_allclose(unc.image, case.image, atol=1e-6)  # averaged windows of the identity, padding cropped
    assert pred.spacing == unc.spacing == (1.0, 0.6, 0.7) and unc.meta["patient_id"] == "p0"


def test_uncertainty_needs_a_folder_and_the_map_shape():
    spec = SimpleNamespace(spatial_dims=2, num_classes=2, patch_size=(16, 16), class_names=["bg", "fg"])
    case = _case("c0", np.zeros((16, 16)), np.zeros((16, 16), np.uint8))
    with pytest.raises(ValueError, match="evaluate: an uncertainty map is written beside the predictions; "
                                         "expected a save_dir, got None"):
        ev.evaluate(Oracle(2), [case], spec, uncertainty=Identity())
    with pytest.raises(ValueError, match=r"uncertainty: expected a map of shape \(1, 16, 16\) for an input "
                                         r"\(1, 1, 16, 16\), got \(1, 1, 16, 16\)"):
        predict_uncertainty(lambda x: x, case.image, 2, (16, 16))
