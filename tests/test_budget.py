"""The sparse-slice budget kind: which slices are annotated, what the loader yields (2D: unannotated slices
become unlabeled images; 3D: ``label_mask`` removes them), and that the mask reaches the losses of the
methods that take it."""
import numpy as np
import pytest
import torch

from minissl import engine, losses, ops
from minissl.config import load_config
from minissl.data.datasets import hide_unannotated, make_train_loader
from minissl.data.sources import open_data
from minissl.data.store import Budget, Case, slice_step
from minissl.methods import get_method
from minissl.methods.base import labeled_unlabeled_mixes


def test_budget_kinds_parse_and_bad_kinds_are_refused():
    assert slice_step("cases") == 0 and slice_step("slices:4") == 4 and Budget(3, 1, "slices:12").step == 12
    for bad in ("slices:0", "slice:4", "slices:", "slices:-2", "Cases", "slices:2.5"):
        with pytest.raises(ValueError, match=r"budget kind: expected cases or slices:<k> \(k >= 1\), got"):
            Budget(2, 0, bad)


def test_every_kth_slice_from_a_seeded_offset_per_case():
    b = Budget(2, 0, "slices:4")
    offsets = set()
    for case in (f"case_{i}" for i in range(20)):
        a = b.annotated(case, 17)
        z = np.flatnonzero(a)
        assert (np.diff(z) == 4).all() and 0 <= z[0] < 4  # every 4th slice from an offset in [0, 4)
        assert np.array_equal(a, Budget(2, 0, "slices:4").annotated(case, 17))  # a function of (seed, case)
        offsets.add(int(z[0]))
    assert len(offsets) > 1  # offsets are drawn per case
    assert not all(np.array_equal(Budget(2, s, "slices:4").annotated("case_0", 17), b.annotated("case_0", 17))
                   for s in range(1, 8))  # and depend on the seed
    assert Budget(2, 0, "slices:9").annotated("c", 3).sum() == 1  # k > Z: still one annotated slice
    assert Budget(2, 0, "cases").annotated("c", 5).all()


def test_config_takes_a_budget_kind_and_names_the_run_after_it():
    cfg = load_config(overrides=["--budget_kind", "slices:4", "--budget", "3"])
    assert (cfg.budget_kind, cfg.budget) == ("slices:4", 3)
    assert load_config().budget_kind == "cases"
    with pytest.raises(ValueError, match=r"budget_kind: expected cases or slices:<k> .* got 'slices:0'"):
        load_config(overrides=["--budget_kind", "slices:0"])
    store = open_data("cardiac")
    assert engine.resolve(cfg, store).run_name == "cardiac-supervised-b3slices4-s0"
    assert engine.resolve(load_config(budget=3), store).run_name == "cardiac-supervised-b3-s0"


def test_2d_unannotated_slices_become_unlabeled_images(tiny_stores):
    store = open_data(tiny_stores["cardiac"])
    labeled, budget = store.labeled(2, 0), Budget(2, 0, "slices:3")
    loader = make_train_loader(store, labeled, batch_size=4, labeled_bs=2, budget=budget)
    plain = make_train_loader(store, labeled, batch_size=4, labeled_bs=2)
    n_slices = {c: store.read(c).image.shape[0] for c in labeled}
    annotated = {c: budget.annotated(c, n) for c, n in n_slices.items()}
    items_l = {(loader.labeled.cases[i].id, z) for i, z in loader.labeled.items}
    assert items_l == {(c, int(z)) for c, a in annotated.items() for z in np.flatnonzero(a)}
    hidden = {(loader.unlabeled.cases[i].id, z) for i, z in loader.unlabeled.items if loader.unlabeled.cases[i].id in annotated}
    assert hidden == {(c, int(z)) for c, a in annotated.items() for z in np.flatnonzero(~a)}
    assert all(c.label is None for c in loader.unlabeled.cases)  # their labels are gone
    assert len(loader.unlabeled) == len(plain.unlabeled) + len(hidden)
    batch = next(loader)
    assert batch["label_mask"].shape == batch["y_l"].shape and bool((batch["label_mask"] == 1).all())
    assert "label_mask" not in next(plain)  # a cases budget keeps the old batch


def test_3d_label_mask_is_zero_exactly_on_unannotated_slices(tiny_stores):
    store = open_data(tiny_stores["atrium"])
    labeled, budget = store.labeled(2, 0), Budget(2, 0, "slices:4")
    loader = make_train_loader(store, labeled, batch_size=2, labeled_bs=1, budget=budget, augment=False)
    start = (np.asarray(store.read(labeled[0]).image.shape) - np.asarray(store.spec.patch_size)) // 2  # centre crop
    for b in range(4):
        batch = loader.batch(b)
        case = store.read(labeled[loader._order(0, len(labeled), b, 1)[0]])
        a = budget.annotated(case.id, case.image.shape[0])
        sl = tuple(slice(s, s + p) for s, p in zip(start, store.spec.patch_size))
        mask, y = batch["label_mask"][0].numpy(), batch["y_l"][0].numpy()  # (Z, Y, X)
        assert np.array_equal(mask, np.broadcast_to(a[sl[0], None, None], mask.shape).astype(np.float32))
        assert np.array_equal(y[mask == 1], case.label[sl][mask == 1]) and (y[mask == 0] == 0).all()


def test_hidden_labels_need_volumes(tiny_stores):
    store = open_data(tiny_stores["fetal_head"])
    with pytest.raises(ValueError, match=r"budget kind slices:2: expected labeled \(Z, Y, X\) volumes .* got a "
                                         r"label of shape \(\d+, \d+\) for case 'fetal_head_"):
        make_train_loader(store, store.labeled(2, 0), budget=Budget(2, 0, "slices:2"))
    case = store.read(store.split("train")[0])
    with pytest.raises(ValueError, match="got no label for case"):
        hide_unannotated(Case(case.id, case.image[None], None, (1.0,) * 3), Budget(2, 0, "slices:2"))


def test_supervised_loss_ignores_masked_voxels():
    torch.manual_seed(0)
    store = open_data("atrium")
    method = get_method("supervised")(load_config(max_iters=10), store.spec)
    logits = torch.randn(2, 2, 4, 6, 6, requires_grad=True)
    y = torch.randint(0, 2, (2, 4, 6, 6))
    mask = torch.ones(2, 4, 6, 6)
    mask[:, 1:3] = 0  # two unannotated slices
    y_other = torch.where(mask > 0, y, 1 - y)
    a, b = method.supervised_loss(logits, y, mask), method.supervised_loss(logits, y_other, mask)
    assert torch.equal(a, b) and not torch.equal(method.supervised_loss(logits, y), method.supervised_loss(logits, y_other))
    assert torch.allclose(method.supervised_loss(logits, y, torch.ones_like(mask)), method.supervised_loss(logits, y))
    (grad,) = torch.autograd.grad(a, logits)
    assert (grad[:, :, 1:3] == 0).all() and (grad[:, :, 0] != 0).any()
    # the masked loss is the loss of the annotated slices alone
    keep = [0, 3]
    assert torch.allclose(a, method.supervised_loss(logits[:, :, keep], y[:, keep]), atol=1e-6)


def test_copy_paste_loss_mask_multiplies_both_regions():
    torch.manual_seed(0)
    logits, y = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    gt_region = torch.zeros(2, 8, 8)
    gt_region[:, :4] = 1
    mask = torch.ones(2, 8, 8)
    mask[:, 2:6] = 0  # straddles both regions
    y_other = torch.where(mask > 0, y, (y + 1) % 3)
    assert losses.copy_paste_loss(logits, y, gt_region, mask) == losses.copy_paste_loss(logits, y_other, gt_region, mask)
    gt, pl = losses.copy_paste_loss(logits, y, gt_region, mask)
    kw = dict(lambda_dice=0.5, lambda_ce=0.5, squared=True, batch=True, smooth=1e-10)
    assert torch.allclose(gt, losses.dice_ce_loss(logits[:, :, :2], y[:, :2], **kw))
    assert torch.allclose(pl, losses.dice_ce_loss(logits[:, :, 6:], y[:, 6:], **kw))


def test_mixes_carry_the_label_mask_with_the_labeled_content():
    n, spatial = 2, (8, 8)
    x = torch.zeros(2 * n, 1, *spatial)
    y = torch.zeros(2 * n, *spatial, dtype=torch.int64)
    mask = torch.cat([torch.full((n, *spatial), 0.25), torch.full((n, *spatial), 0.5)])  # M_a, M_b
    boxes = ops.bcp_box(spatial, n, torch.Generator().manual_seed(0))
    (_, _, g1, k1), (_, _, g2, k2) = labeled_unlabeled_mixes(x, y, x, y, paste_labeled=True, boxes=boxes,
                                                              label_mask=mask)
    r = ops.region_mask(spatial, boxes=boxes)
    assert torch.equal(k1, torch.where(r, 0.25, 1.0)) and torch.equal(k2, torch.where(r, 1.0, 0.5))
    assert len(labeled_unlabeled_mixes(x, y, x, y, paste_labeled=True, boxes=boxes)[0]) == 3


@pytest.mark.parametrize("name,step", [("supervised", 0), ("mean_teacher", 0), ("bcp", 0), ("bcp", 30),
                                       ("ua_mt", 0), ("label_propagation", 0), ("label_propagation", 30)])
def test_the_mask_reaches_the_supervised_loss(name, step, tiny_stores):
    """Changing y_l on masked voxels changes nothing; without the mask it changes 'sup'."""
    store = open_data(tiny_stores["atrium"])
    cfg = load_config(method=name, data_root=str(tiny_stores["atrium"]), width=4, depth=2, max_iters=40,
                      budget_kind="slices:4", progress=False)
    torch.manual_seed(0)
    method = get_method(name)(cfg, store.spec).eval()  # eval: BatchNorm statistics do not move between calls
    assert method.uses_label_mask
    batch = next(make_train_loader(store, store.labeled(2, 0), batch_size=4, labeled_bs=2,
                                   budget=Budget(2, 0, "slices:4")))
    assert 0 < float(batch["label_mask"].mean()) < 1
    flipped = batch | {"y_l": torch.where(batch["label_mask"] > 0, batch["y_l"], 1 - batch["y_l"])}

    def sup(b):
        method.rng.manual_seed(3)  # the same boxes and noise every call
        return method.training_step(b, step)["sup"]

    assert torch.equal(sup(batch), sup(flipped))
    if name != "label_propagation" or step < method.first_iters:  # stage 2 fills unknown voxels from model A
        no_mask = {k: v for k, v in batch.items() if k != "label_mask"}
        assert not torch.equal(sup(no_mask), sup({k: v for k, v in flipped.items() if k != "label_mask"}))


def test_3d_sparse_budget_is_refused_for_methods_without_the_mask(tiny_stores, tmp_path):
    cfg = load_config(method="cps", data_root=str(tiny_stores["atrium"]), budget_kind="slices:4", max_iters=2,
                      out_dir=str(tmp_path), width=4, depth=2, progress=False)
    with pytest.raises(ValueError, match=r"--budget_kind slices:4: method 'cps' does not mask unannotated slices "
                                         r".*expected --budget_kind cases or one of \[.*'bcp'.*'supervised'"):
        engine.train(cfg)
    assert not any(tmp_path.iterdir())


def test_supervised_trains_under_a_sparse_budget(tiny_stores, tmp_path):
    cfg = load_config(method="supervised", data_root=str(tiny_stores["atrium"]), budget_kind="slices:4",
                      max_iters=4, batch_size=2, labeled_bs=2, out_dir=str(tmp_path), width=4, depth=2,
                      progress=False)
    res = engine.train(cfg)
    assert res.run_dir.name == "atrium-supervised-b2slices4-s0" and (res.run_dir / "metrics.json").is_file()
