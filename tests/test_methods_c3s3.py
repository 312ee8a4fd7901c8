"""C3S3's parts by hand: intersection/union masks, the contrastive loss, the competition score and who
teaches whom; the method: the loser alone learns from the winner, two optimisers, ensemble, 3D."""
import math
from types import SimpleNamespace

import pytest
import torch

from minissl.config import load_config
from minissl.methods.c3s3 import (C3S3, competition_score, complementary_competition, intersection_union_loss,
                                  intersection_union_masks)


def make(spatial_dims=2, num_classes=3, **kw):
    cfg = load_config(method="c3s3", width=4, depth=1, max_iters=100, rampup=0.5, method_args=kw)
    torch.manual_seed(0)
    return C3S3(cfg, SimpleNamespace(num_classes=num_classes, spatial_dims=spatial_dims))


def batch(size=(8, 8), classes=3):
    g = torch.Generator().manual_seed(2)
    return {"x_l": torch.rand(2, 1, *size, generator=g), "y_l": torch.randint(0, classes, (2, *size), generator=g),
            "x_u": torch.rand(2, 1, *size, generator=g)}


def test_intersection_union_masks_by_hand():
    a = torch.tensor([0, 1, 1, 2, 0, 2])
    b = torch.tensor([0, 1, 0, 2, 2, 1])
    inter, union = intersection_union_masks(a, b)
    assert inter.tolist() == [False, True, False, True, False, False]  # the same foreground class in both
    assert union.tolist() == [False, True, True, True, True, True]  # foreground in either


def test_intersection_union_loss_by_hand():
    fa = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    fb = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # cosines 1, 0, -1
    inter, union = torch.tensor([True, False, False]), torch.tensor([True, True, False])
    tau = 0.5  # s / tau = 2, 0, -2
    e = math.exp
    d1 = e(0) + e(0) + e(-2)  # sum_j e^{(1 - I_j) s_j / tau}
    l1 = (math.log((d1 + e(2)) / e(2)) + 2 * math.log(d1 + e(0))) / 3
    d2 = e(2) + e(0) + e(0)  # sum_j e^{U_j s_j / tau}
    l2 = (2 * math.log(d2 + e(0)) + math.log((d2 + e(-2)) / e(-2))) / 3
    assert float(intersection_union_loss(fa, fb, inter, union, tau)) == pytest.approx(l1 + l2, rel=1e-6)


def test_competition_score_by_hand():
    logits = torch.log(torch.tensor([[0.2, 0.7], [0.8, 0.3]])).reshape(1, 2, 1, 2)  # foreground p = 0.8, 0.3
    y = torch.tensor([[[1, 0]]])
    ce = -(math.log(0.8) + math.log(0.7)) / 2
    dice = 1 - (2 * 0.8 + 1e-5) / (0.8 ** 2 + 0.3 ** 2 + 1 + 1e-5)  # squared denominators, foreground only
    assert float(competition_score(logits, y, 0.8)) == pytest.approx(0.8 * ce + 0.2 * dice, rel=1e-5)


@pytest.mark.parametrize("scores,winner", [((1.0, 2.0), 0), ((2.0, 1.0), 1), ((1.0, 1.0), 1)])
def test_the_winner_teaches_the_loser_by_hand(scores, winner):
    teacher = torch.log(torch.tensor([0.8, 0.2])).reshape(1, 2, 1, 1)  # sharpened with T = 0.5: (0.64, 0.04) / 0.68
    student = torch.zeros(1, 2, 1, 1)  # softmax (0.5, 0.5)
    views = [[(teacher if i == winner else student).clone().requires_grad_() for _ in range(2)] for i in range(2)]
    loss, got = complementary_competition(views[0], views[1], torch.tensor(scores[0]), torch.tensor(scores[1]), 0.5)
    assert got == winner
    per_view = ((0.5 - 0.64 / 0.68) ** 2 + (0.5 - 0.04 / 0.68) ** 2) / 2
    assert float(loss.detach()) == pytest.approx(2 * per_view, rel=1e-5)
    grads = torch.autograd.grad(loss, views[0] + views[1], allow_unused=True)
    moved = [g is not None and float(g.abs().sum()) > 0 for g in grads]
    assert moved == [winner == 1] * 2 + [winner == 0] * 2  # only the loser's views get a gradient


def test_training_step_loser_learns_and_documented_weights():
    method = make()
    out = method.training_step(batch(), step=20)
    loser = (method.peer, method.student)[int(out["winner"])]
    winner = (method.student, method.peer)[int(out["winner"])]
    assert int(out["winner"]) == int(out["score_resunet"] <= out["score_unet"])
    g_lose = torch.autograd.grad(out["cp"], list(loser.parameters()), retain_graph=True, allow_unused=True)
    g_win = torch.autograd.grad(out["cp"], list(winner.parameters()), retain_graph=True, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in g_lose if g is not None) > 0
    assert all(g is None or float(g.abs().sum()) == 0 for g in g_win)
    parts = [out[k] for k in ("sup", "cos", "cp", "contrast")]
    got = [float(g) for g in torch.autograd.grad(out["loss"], parts)]
    w = 0.1 * math.exp(-5 * (1 - 0.2 / 0.5) ** 2)  # cons_weight 0.1, ramp over half of the 100 steps
    assert got == pytest.approx([1.0, 1.0, w, 1.0], rel=1e-5)
    assert float(out["contrast"].detach()) > 0


def test_two_optimisers_and_the_official_recipe():
    method = make()
    opts = method.optimizers()
    ids = [{id(p) for g in o.param_groups for p in g["params"]} for o in opts]
    assert ids[0] == {id(p) for p in [*method.student.parameters(), *method.projectors[0].parameters()]}
    assert ids[1] == {id(p) for p in [*method.peer.parameters(), *method.projectors[1].parameters()]}
    cfg = load_config(method="c3s3", width=4, depth=1, max_iters=100, recipe="official")
    with pytest.raises(ValueError, match="no official 2D recipe"):
        C3S3(cfg, SimpleNamespace(num_classes=2, spatial_dims=2))
    assert C3S3(cfg, SimpleNamespace(num_classes=2, spatial_dims=3)).recipe.schedule == "constant"


def test_voxel_draws():
    method = make(contrast_voxels=5)
    idx = method.sample_voxels(100, torch.device("cpu"))
    assert idx.shape == (5,) and int(idx.max()) < 100
    assert torch.equal(make(contrast_voxels=0).sample_voxels(7, torch.device("cpu")), torch.arange(7))


def test_ensemble_prediction_and_a_checkpointed_3d_step():
    method = make(spatial_dims=3, num_classes=2)
    method.eval()
    x = torch.rand(1, 1, 4, 8, 8)
    probs = 0.5 * (torch.softmax(method.student(x), 1) + torch.softmax(method.peer(x), 1))
    assert torch.allclose(method.predict(x).exp(), probs, atol=1e-6)
    method.train()
    opts = method.optimizers()
    logs = method.update(batch((4, 8, 8), classes=2), 10, opts)
    assert {"loss", "sup", "unsup", "cp", "contrast", "cos"} <= set(logs) and math.isfinite(logs["loss"])
