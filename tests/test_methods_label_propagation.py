"""Label propagation: signed distances and the slice interpolation worked out by hand, exact on annotated
slices and plausible between them, the stage switch to model B, and model A's labels in stage 2."""
import numpy as np
import pytest
import torch

from minissl import engine
from minissl.config import load_config
from minissl.data.datasets import IGNORE, make_train_loader
from minissl.data.sources import open_data
from minissl.data.store import Budget
from minissl.methods import get_method
from minissl.methods.label_propagation import interpolate_slices, signed_distance
from minissl.metrics import dice


def ellipsoid(shape=(33, 40, 40), radii=(14, 11, 16), centre=(16, 20, 19)):
    z, y, x = np.mgrid[tuple(slice(0, s) for s in shape)]
    return (sum(((a - c) / r) ** 2 for a, c, r in zip((z, y, x), centre, radii)) <= 1).astype(np.uint8)


def sparse(label, k, offset):
    out = label.copy()
    out[np.arange(len(label)) % k != offset] = IGNORE
    return out


def test_signed_distance_by_hand():
    region = np.zeros((5, 5), dtype=bool)
    region[2, 2] = True
    d = signed_distance(region, far=10.0)
    assert d[2, 2] == -1 and d[2, 3] == 1 and d[1, 1] == pytest.approx(np.sqrt(2)) and d[0, 0] == pytest.approx(np.sqrt(8))
    assert (signed_distance(np.zeros((3, 3), bool), 7.0) == 7).all()
    assert (signed_distance(np.ones((3, 3), bool), 7.0) == -7).all()


@pytest.mark.parametrize("k", [2, 4, 6])
def test_an_ellipsoid_sampled_every_kth_slice_comes_back(k):
    gt = ellipsoid()
    label = sparse(gt, k, offset=1)
    out = interpolate_slices(label, 2)
    annotated = np.flatnonzero(np.arange(len(gt)) % k == 1)
    assert np.array_equal(out[annotated], gt[annotated])  # exact on annotated slices
    inside = slice(annotated[0], annotated[-1] + 1)
    assert dice(out[inside] == 1, gt[inside] == 1) > 0.9  # plausible between them
    assert (out[:annotated[0]] == IGNORE).all() and (out[annotated[-1] + 1:] == IGNORE).all()  # no extrapolation
    assert dice(out[inside] == 1, gt[inside] == 1) >= dice(interpolate_slices(label, 2, "nearest")[inside] == 1,
                                                            gt[inside] == 1) - 0.02


def test_a_disc_moving_between_two_slices_is_half_way_at_the_middle():
    label = np.full((5, 32, 32), IGNORE, dtype=np.uint8)
    yy, xx = np.mgrid[:32, :32]
    label[0] = (yy - 16) ** 2 + (xx - 12) ** 2 <= 36
    label[4] = (yy - 16) ** 2 + (xx - 18) ** 2 <= 36  # overlapping discs: shape interpolation moves the region
    out = interpolate_slices(label, 2)
    centre_x = [xx[out[z] == 1].mean() for z in range(5)]
    assert centre_x == pytest.approx([12, 13.5, 15, 16.5, 18], abs=0.5)  # moves linearly
    area = [int((out[z] == 1).sum()) for z in range(5)]
    assert min(area) > 0.8 * area[0]  # and keeps most of its size
    near = interpolate_slices(label, 2, "nearest")
    assert np.array_equal(near[1], label[0]) and np.array_equal(near[2], label[0]) and np.array_equal(near[3], label[4])


def test_a_region_missing_on_one_side_shrinks_to_its_centre_half_way():
    label = np.full((9, 21, 21), IGNORE, dtype=np.uint8)
    yy, xx = np.mgrid[:21, :21]
    label[0] = (yy - 10) ** 2 + (xx - 10) ** 2 <= 25
    label[8] = 0
    out = interpolate_slices(label, 2)
    area = [int((out[z] == 1).sum()) for z in range(9)]
    assert area == [81, 81, 45, 13, 0, 0, 0, 0, 0]  # depth 5: the rim (d = -1) goes after t = 1/6, the centre at t = 1/2
    assert out[3, 10, 10] == 1


def test_known_voxels_are_kept_and_several_classes_interpolate():
    yy, xx = np.mgrid[:40, :40]
    gt = np.zeros((9, 40, 40), dtype=np.uint8)
    for z in range(9):  # rings as in the cardiac suite: MYO (2) around LV (3), RV (1) beside them
        r = 12 - z
        d2 = (yy - 20) ** 2 + (xx - 22) ** 2
        gt[z][d2 <= r * r] = 2
        gt[z][d2 <= (r - 3) ** 2] = 3
        gt[z][((yy - 20) ** 2 + (xx - 6) ** 2 <= 16) & (gt[z] == 0)] = 1
    label = sparse(gt, 4, 0)
    label[2, 0, 0] = 0  # a known voxel inside a hidden slice stays
    out = interpolate_slices(label, 4)
    assert np.array_equal(out[[0, 4, 8]], gt[[0, 4, 8]]) and out[2, 0, 0] == 0
    assert set(np.unique(out)) <= {0, 1, 2, 3}
    assert np.mean([dice(out == c, gt == c) for c in (1, 2, 3)]) > 0.85


def test_interpolation_refuses_unknown_modes_and_shapes():
    with pytest.raises(ValueError, match="label_propagation: interpolation expected 'shape' or 'nearest', got 'linear'"):
        interpolate_slices(np.zeros((2, 4, 4), np.uint8), 2, "linear")
    with pytest.raises(ValueError, match=r"expected a \(Z, Y, X\) label, got shape \(4, 4\)"):
        interpolate_slices(np.zeros((4, 4), np.uint8), 2)
    store = open_data("atrium")
    for opt, match in ((["--interpolation", "linear"], "--interpolation expected 'shape' or 'nearest'"),
                       (["--first_stage", "1.0"], r"--first_stage expected a fraction of max_iters in \(0, 1\), got 1.0")):
        with pytest.raises(ValueError, match=match):
            get_method("label_propagation")(load_config(overrides=["--method", "label_propagation", *opt],
                                                        max_iters=12), store.spec)


def build(root, **kw):
    store = open_data(root)
    cfg = load_config(method="label_propagation", data_root=str(root), width=4, depth=2, max_iters=60,
                      budget_kind="slices:4", progress=False, **kw)
    torch.manual_seed(0)
    return store, get_method("label_propagation")(cfg, store.spec)


def test_the_loader_trains_on_interpolated_labels(tiny_stores):
    store, method = build(tiny_stores["atrium"])
    budget = Budget(2, 0, "slices:4")
    plain = make_train_loader(store, store.labeled(2, 0), budget=budget)
    filled = make_train_loader(store, store.labeled(2, 0), budget=budget, fill=method.fill_labels)
    for p, f in zip(plain.labeled.cases, filled.labeled.cases):
        case = store.read(p.id)
        hidden = p.label == IGNORE
        now_known = hidden & (f.label != IGNORE)
        assert now_known.sum() > 0.5 * hidden.sum()  # between the annotated slices
        assert np.array_equal(f.label[~hidden], case.label[~hidden])  # ground truth untouched
        assert dice(f.label[now_known] == 1, case.label[now_known] == 1) > 0.6
    store2d, method2d = build(tiny_stores["cardiac"])
    sparse2d = make_train_loader(store2d, store2d.labeled(2, 0), budget=Budget(2, 0, "slices:4"))
    filled2d = make_train_loader(store2d, store2d.labeled(2, 0), budget=Budget(2, 0, "slices:4"),
                                 fill=method2d.fill_labels)
    assert len(filled2d.labeled) > len(sparse2d.labeled)  # interpolated slices are labeled images in 2D
    assert len(filled2d.labeled) + len(filled2d.unlabeled) == len(sparse2d.labeled) + len(sparse2d.unlabeled)


@pytest.mark.parametrize("restart", [True, False])
def test_the_stage_switch_freezes_model_a_and_starts_model_b(restart, tiny_stores):
    store, method = build(tiny_stores["atrium"], method_args={"restart": restart})
    assert method.stage_ends() == [30]  # half of 60 iterations
    opts = method.optimizers()
    batch = next(make_train_loader(store, store.labeled(2, 0), batch_size=4, labeled_bs=2,
                                   budget=Budget(2, 0, "slices:4"), fill=method.fill_labels))
    best = {k: v.clone() for k, v in method.state_dict().items()}  # the "best" stage-1 state
    method.update(batch, 0, opts)  # the live weights move on; the switch must take the best ones
    assert opts[0].state
    method.end_stage(30, best, opts)
    student_a = {k[len("student."):]: v for k, v in best.items() if k.startswith("student.")}
    assert all(torch.equal(v, student_a[k]) for k, v in method.labeller.state_dict().items())
    assert not opts[0].state
    same = all(torch.equal(v, student_a[k]) for k, v in method.student.state_dict().items())
    assert same != restart
    if restart:  # fresh weights, the same on every call (ranks, resumes)
        first = {k: v.clone() for k, v in method.student.state_dict().items()}
        method.end_stage(30, best, opts)
        assert all(torch.equal(v, first[k]) for k, v in method.student.state_dict().items())
    assert not any(p.requires_grad for p in method.labeller.parameters())


def test_stage_two_labels_unknown_voxels_and_unlabeled_images_with_model_a(tiny_stores):
    store, method = build(tiny_stores["atrium"], method_args={"restart": True})  # so that model B is not model A
    method.eval()
    batch = next(make_train_loader(store, store.labeled(2, 0), batch_size=4, labeled_bs=2,
                                   budget=Budget(2, 0, "slices:4"), fill=method.fill_labels))
    known = batch["label_mask"]
    assert 0 < float(known.mean()) < 1  # slices outside the annotated range are still unknown
    torch.manual_seed(1)
    method.end_stage(30, {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                          for k, v in method.state_dict().items()}, method.optimizers())
    out = method.training_step(batch, 30)
    with torch.no_grad():
        a_l, a_u = method.labeller(batch["x_l"]).argmax(1), method.labeller(batch["x_u"]).argmax(1)
    assert not torch.equal(a_l, method.student(batch["x_l"]).argmax(1))  # model A is not model B
    logits = method.student(torch.cat([batch["x_l"], batch["x_u"]]))
    target = torch.where(known > 0, batch["y_l"], a_l)
    assert torch.allclose(out["sup"], method.supervised_loss(logits[:2], target), atol=1e-6)
    assert torch.allclose(out["unsup"], method.supervised_loss(logits[2:], a_u), atol=1e-6)
    assert out["loss"].item() == pytest.approx((out["sup"] + out["unsup"]).item(), rel=1e-6)
    first = method.training_step(batch, 29)  # stage 1: unknown voxels masked, no unlabeled part
    assert float(first["unsup"]) == 0 and not first["unsup"].requires_grad


def test_the_engine_runs_both_stages(tiny_stores, tmp_path):
    cfg = load_config(method="label_propagation", data_root=str(tiny_stores["atrium"]), budget_kind="slices:4",
                      max_iters=6, batch_size=2, labeled_bs=1, val_every=3, out_dir=str(tmp_path), width=4, depth=2,
                      progress=False)
    res = engine.train(cfg)
    assert res.run_dir.name == "atrium-label_propagation-b2slices4-s0"
    assert (res.run_dir / "stage_best.pt").is_file()  # validated at the stage end (iteration 3 of 6)
    rows = [r for r in (res.run_dir / "log.csv").read_text().splitlines()[1:]]
    assert rows and np.isfinite(res.best_val_dice)
