"""SPCL: the self-paced SupCon loss against a direct computation, the gamma schedule, the meta-labels
(by hand and as the loader delivers them), and the two stages of a run."""
import math

import numpy as np
import pytest
import torch

from minissl.config import load_config
from minissl.data import datasets
from minissl.data.sources import open_data
from minissl.methods import get_method
from minissl.methods.spcl import gamma_at, meta_label, self_paced_supcon


def direct_loss(u1, u2, labels, gamma, tau, weighting, correct_grad=False):
    """The loss of the module docstring with loops over anchors and pairs (python floats)."""
    u = [list(map(float, r)) for r in torch.cat([u1, u2])]
    y = [int(v) if v >= 0 else -1 - i for i, v in enumerate(labels.tolist())] * 2
    m = len(u)
    dot = [[sum(a * b for a, b in zip(u[i], u[j])) / tau for j in range(m)] for i in range(m)]
    per_anchor, weights = [], []
    for i in range(m):
        denom = sum(math.exp(dot[i][k]) for k in range(m) if k != i)
        positives = [j for j in range(m) if j != i and y[j] == y[i]]
        total = 0.0
        for j in positives:
            l_ij = -math.log(math.exp(dot[i][j]) / denom)
            w = float(l_ij <= gamma) if weighting == "hard" else max(0.0, 1.0 - l_ij / gamma)
            weights.append(w)
            total += w * -l_ij
        per_anchor.append(total / len(positives))
    loss = -sum(per_anchor) / m
    ratio = sum(weights) / len(weights)
    return (loss / ratio if correct_grad and ratio > 0 else loss), ratio


@pytest.mark.parametrize("weighting,gamma,correct_grad", [("soft", 3.0, False), ("hard", 1.5, False),
                                                           ("soft", 2.0, True), ("soft", 1e6, False)])
def test_self_paced_supcon_matches_a_direct_computation(weighting, gamma, correct_grad):
    g = torch.Generator().manual_seed(3)
    u1 = torch.nn.functional.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=1)
    u2 = torch.nn.functional.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 1, 0, -1])  # the last is unknown: only its other view is a positive
    loss, ratio = self_paced_supcon(u1, u2, labels, gamma, 0.5, weighting, correct_grad)
    want, want_ratio = direct_loss(u1, u2, labels, gamma, 0.5, weighting, correct_grad)
    assert float(loss) == pytest.approx(want, rel=1e-10)
    assert float(ratio) == pytest.approx(want_ratio, rel=1e-10)
    if gamma == 1e6:  # every positive kept: plain SupCon (Khosla et al.), weights ~1
        assert 0.99 < float(ratio) <= 1.0


def test_self_paced_weight_drops_hard_positives_and_has_no_gradient():
    u1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    u2 = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    # item 1's views point apart: that pair is hard (large l_ij); a small gamma drops it
    _, ratio_small = self_paced_supcon(u1, u2, torch.tensor([0, 1]), 0.5, 0.5, "hard")
    _, ratio_big = self_paced_supcon(u1, u2, torch.tensor([0, 1]), 100.0, 0.5, "hard")
    assert float(ratio_small) == 0.5 and float(ratio_big) == 1.0
    loss, _ = self_paced_supcon(u1, u2, torch.tensor([0, 1]), 3.0, 0.5, "soft")
    loss.backward()  # the weights are constants: the gradient is that of sum w * log p with w fixed
    assert torch.isfinite(u1.grad).all() and u1.grad.abs().sum() > 0


def test_gamma_schedule_by_hand():
    assert gamma_at(0.0, 5.0, 60.0, 0.5) == 5.0
    assert gamma_at(0.25, 5.0, 60.0, 0.5) == pytest.approx(5.0 + 55.0 * 0.5)
    assert gamma_at(1.0, 5.0, 60.0, 0.5) == 60.0 == gamma_at(2.0, 5.0, 60.0, 0.5)
    assert gamma_at(0.5, 3.0, 14.0, 1.0) == pytest.approx(8.5)


def test_meta_labels_by_hand():
    # rows (patient, slice, slices, phase): slices 0..7 of an 8-slice scan, a 6-slice scan, a 2D image
    meta = torch.tensor([[0, z, 8, 1] for z in range(8)] + [[1, z, 6, -1] for z in range(6)] + [[2, 0, 1, 0]])
    assert meta_label(meta, "partition", 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2] + [0, 0, 1, 1, 2, 2] + [-1]
    assert meta_label(meta, "partition", 1).tolist() == [0] * 14 + [-1]
    assert meta_label(meta, "patient", 3).tolist() == [0] * 8 + [1] * 6 + [2]
    assert meta_label(meta, "phase", 3).tolist() == [1] * 8 + [-1] * 6 + [0]
    with pytest.raises(ValueError, match="spcl: unknown meta-label 'slice'"):
        meta_label(meta, "slice", 3)


def test_loader_meta_rows_describe_the_drawn_slices(tiny_stores):
    store = open_data(tiny_stores["cardiac"])
    loader = datasets.make_train_loader(store, store.labeled(2, 0), seed=0, batch_size=6, labeled_bs=3,
                                        augment=False)
    cases = loader.labeled.cases + loader.unlabeled.cases  # patients are numbered in this order
    assert loader.meta_l[:, 0].max() + 1 == len(loader.labeled.cases)
    assert sorted(set(loader.meta_u[:, 0].tolist())) == list(range(len(loader.labeled.cases), len(cases)))
    for b in range(3):
        batch = loader.batch(b)
        for (patient, z, slices, phase), y in zip(batch["meta_l"].tolist(), batch["y_l"]):
            case = cases[patient]
            assert slices == case.image.shape[0] and 0 <= z < slices
            assert phase == {"ED": 0, "ES": 1}[case.meta["phase"]]
            assert np.array_equal(y.numpy(), case.label[z])  # the row names the slice that was drawn
        assert batch["meta_u"].shape == (3, 4) and (batch["meta_u"][:, 0] >= len(loader.labeled.cases)).all()


def build(root, **method_args):
    store = open_data(root)
    cfg = load_config(method="spcl", data_root=str(root), width=4, depth=2, batch_size=4, labeled_bs=2,
                      max_iters=14, progress=False, method_args=method_args)
    torch.manual_seed(0)
    method = get_method("spcl")(cfg, store.spec)
    batch = next(datasets.make_train_loader(store, store.labeled(2, 0), seed=0, batch_size=4, labeled_bs=2))
    return method, batch


def test_stage_one_trains_encoder_and_projector_on_meta_labels_only(tiny_stores):
    method, batch = build(tiny_stores["cardiac"])
    assert method.pretrain_iters == 8  # 4/7 of 14
    out = method.training_step(batch, 0)
    assert out["loss"].item() == out["unsup"].item() > 0 and not out["sup"].requires_grad
    out["loss"].backward()
    assert all(p.grad is not None for p in method.student.encoder.parameters())
    assert all(p.grad is not None for p in method.projector.parameters())
    assert all(p.grad is None for p in method.student.decoders.parameters())
    assert float(out["gamma"]) == 5.0 and 0 < float(out["w_pos"]) <= 1
    # the meta-labels are what the loss contrasts: other meta rows, another loss
    other = batch | {"meta_u": batch["meta_u"].flip(0), "meta_l": batch["meta_l"].flip(0)}
    method.rng.manual_seed(1)
    a = method.training_step(batch, 3)["unsup"]
    method.rng.manual_seed(1)
    b = method.training_step(other, 3)["unsup"]
    assert not torch.isclose(a, b)


def test_switch_clears_the_optimiser_and_restarts_the_schedule(tiny_stores):
    method, batch = build(tiny_stores["cardiac"])
    opts = method.optimizers()
    for step in range(method.pretrain_iters):
        logs = method.update(batch, step, opts)
        assert logs["sup"] > 0 and logs["unsup"] > 0
    assert opts[0].state == {}  # cleared after the last pre-training step
    logs = method.update(batch, method.pretrain_iters, opts)
    assert logs["unsup"] == 0.0 and logs["loss"] == logs["sup"]
    s = method.pretrain_iters
    assert method.lr_factor(0) == 1.0 == method.lr_factor(s)
    assert method.lr_factor(s - 1) == pytest.approx((1 - (s - 1) / s) ** 0.9)
    assert method.lr_factor(13) == pytest.approx((1 - 5 / 6) ** 0.9)


def test_without_pretraining_is_plain_fine_tuning(tiny_stores):
    method, batch = build(tiny_stores["cardiac"], pretrain=0.0)
    out = method.training_step(batch, 0)
    assert out["sup"].requires_grad and float(out["unsup"]) == 0.0
    assert [method.lr_factor(s) for s in (0, 7)] == [1.0, pytest.approx((1 - 7 / 14) ** 0.9)]


@pytest.mark.parametrize("args,match", [({"meta_labels": "partition,slice"}, "--meta_labels expected a comma"),
                                        ({"weighting": "medium"}, "--weighting soft|hard"),
                                        ({"pretrain": 1.0}, "0 <= --pretrain < 1")])
def test_bad_options_are_refused(tiny_stores, args, match):
    with pytest.raises(ValueError, match=match):
        build(tiny_stores["cardiac"], **args)
