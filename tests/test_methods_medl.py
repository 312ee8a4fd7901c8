"""MEDL's parts by hand: Dirichlet masses, CAEF (sums to 1; factor 1 is the TMC/Dempster rule), the
reliability, the curriculum weight's sign change, the I-EDL loss against a direct computation; the
method: masking rules, loss weights, ensemble and the fused uncertainty map, 3D."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.special import polygamma

from minissl.config import load_config
from minissl.methods.medl import MEDL, caef, curriculum_weight, dirichlet, iedl_loss, reliability


def make(spatial_dims=2, num_classes=3, **kw):
    cfg = load_config(method="medl", width=4, depth=1, max_iters=100, rampup=0.5, method_args=kw)
    torch.manual_seed(0)
    return MEDL(cfg, SimpleNamespace(num_classes=num_classes, spatial_dims=spatial_dims))


def batch(size=(8, 8), classes=3):
    g = torch.Generator().manual_seed(2)
    return {"x_l": torch.rand(2, 1, *size, generator=g), "y_l": torch.randint(0, classes, (2, *size), generator=g),
            "x_u": torch.rand(2, 1, *size, generator=g)}


def test_dirichlet_masses():
    z = torch.tensor([math.log(2.0), math.log(5.0)]).reshape(1, 2, 1, 1)  # evidence 2, 5
    alpha, b, u = dirichlet(z)
    assert alpha.flatten().tolist() == pytest.approx([3.0, 6.0])
    assert b.flatten().tolist() == pytest.approx([2 / 9, 5 / 9]) and float(u) == pytest.approx(2 / 9)


def masses(b, u):
    return torch.tensor(b).reshape(1, -1, 1, 1), torch.tensor([u]).reshape(1, 1, 1)


def test_caef_with_factor_one_is_the_tmc_rule_by_hand():
    (b1, u1), (b2, u2) = masses([0.6, 0.1], 0.3), masses([0.5, 0.2], 0.3)
    # Dempster / TMC: conflict C = 0.6 * 0.2 + 0.1 * 0.5 = 0.17, everything divided by 1 - C = 0.83
    b, u = caef(b1, u1, b2, u2, factor=1.0)
    assert b.flatten().tolist() == pytest.approx([(0.30 + 0.18 + 0.15) / 0.83, (0.02 + 0.03 + 0.06) / 0.83])
    assert float(u) == pytest.approx(0.09 / 0.83)
    # class-aware: the cross terms get 1 / (1 + K) = 1/3 -> (0.30 + 0.11, 0.02 + 0.03, 0.09) / 0.55
    b, u = caef(b1, u1, b2, u2)
    assert b.flatten().tolist() == pytest.approx([0.41 / 0.55, 0.05 / 0.55]) and float(u) == pytest.approx(0.09 / 0.55)


def test_caef_beliefs_and_uncertainty_sum_to_one():
    g = torch.Generator().manual_seed(0)
    _, b1, u1 = dirichlet(torch.randn(2, 4, 5, 5, generator=g) * 3)
    _, b2, u2 = dirichlet(torch.randn(2, 4, 5, 5, generator=g) * 3)
    for factor in (None, 1.0, 0.5):
        b, u = caef(b1, u1, b2, u2, factor)
        assert torch.allclose(b.sum(1) + u, torch.ones_like(u)) and (b >= 0).all() and (u > 0).all()


def test_reliability_by_hand():
    b, u = masses([0.5, 0.25], 0.25)  # sum b log2 b = -0.5 - 0.5 = -1
    assert float(reliability(b, u)) == pytest.approx(math.exp(-0.25))
    b, u = masses([0.75, 0.0], 0.25)  # 0 log 0 = 0
    assert float(reliability(b, u)) == pytest.approx(math.exp(0.25 * 0.75 * math.log2(0.75)))


def test_curriculum_weight_changes_sign_at_half_the_run():
    u = torch.tensor([[0.1, 0.5, 0.9, 0.3], [0.9, 0.8, 0.7, 0.6]])  # ranks from the most certain: 1 3 4 2 / 4 3 2 1
    psi = torch.tensor([[-0.5, 0.5, 1.0, 0.0], [1.0, 0.5, 0.0, -0.5]])  # 2 h / V - 1, per sample
    for t, zeta in ((0.0, -1.0), (0.25, -0.5), (0.5, 0.0), (1.0, 1.0)):
        want = 0.5 * torch.tanh(psi * zeta) + 1
        assert torch.allclose(curriculum_weight(u, t, xi=0.5), want), t
    early, late = curriculum_weight(u, 0.0, 0.5), curriculum_weight(u, 1.0, 0.5)
    assert early[0, 0] > 1 > early[0, 2] and late[0, 0] < 1 < late[0, 2]  # certain first, then uncertain
    assert torch.equal(curriculum_weight(u, 0.5, 0.5), torch.ones_like(u))


def test_iedl_loss_against_a_direct_computation():
    alpha = torch.tensor([[1.5, 2.0, 4.0], [7.0, 1.2, 1.1]], dtype=torch.float64).T.reshape(1, 3, 1, 2)
    target = torch.tensor([[[2, 0]]])
    got = iedl_loss(alpha, target, fisher_weight=0.5).flatten()
    for v, (a, y) in enumerate([(np.array([1.5, 2.0, 4.0]), 2), (np.array([7.0, 1.2, 1.1]), 0)]):
        s, onehot, tri = a.sum(), np.eye(3)[y], polygamma(1, a)
        fit = sum(((onehot[n] - a[n] / s) ** 2 + a[n] * (s - a[n]) / (s ** 2 * (s + 1))) * tri[n] for n in range(3))
        fisher = np.diag(tri) - polygamma(1, s) * np.ones((3, 3))  # Dirichlet Fisher information
        sign, logdet = np.linalg.slogdet(fisher)
        assert sign > 0
        assert float(got[v]) == pytest.approx(fit - 0.5 * logdet, rel=1e-8)


def test_masking_rules():
    b = batch()
    soft = make().training_step(b, 20)
    dropped = make(reliability="hard", reliability_threshold=2.0).training_step(b, 20)  # R <= 1: nothing kept
    kept = make(reliability="hard", reliability_threshold=0.0).training_step(b, 20)  # everything kept
    assert float(dropped["unsup"].detach()) == 0 and float(dropped["fie"].detach()) == 0
    assert float(kept["unsup"].detach()) > 0 and not torch.isclose(kept["unsup"], soft["unsup"])
    with pytest.raises(ValueError, match="medl: method_args.reliability must be 'soft' or 'hard', got 'mask'"):
        make(reliability="mask")


def test_loss_weights_and_gradients():
    out = make().training_step(batch(), 20)
    parts = [out[k] for k in ("sup", "unsup", "weighted_l", "fie")]
    got = [float(g) for g in torch.autograd.grad(out["loss"], parts, retain_graph=True)]
    w = 0.1 * math.exp(-5 * (1 - 0.2 / 0.5) ** 2)  # the shared ramp as lambda_GWU
    assert got == pytest.approx([1.0, 1.0, 1.0, w], rel=1e-5)
    method = make()
    out = method.training_step(batch(), 20)
    for net in (method.student, method.peer):  # the fused targets are detached: each net learns from L_u
        grads = torch.autograd.grad(out["unsup"], list(net.parameters()), retain_graph=True, allow_unused=True)
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_prediction_and_uncertainty_3d():
    method = make(spatial_dims=3, num_classes=2)
    assert MEDL.has_uncertainty and MEDL.official_recipes[3].step_every == pytest.approx(2500 / 6000)
    method.eval()
    x = torch.rand(2, 1, 4, 8, 8)
    (a1, b1, u1), (a2, b2, u2) = dirichlet(method.student(x)), dirichlet(method.peer(x))
    p = 0.5 * (a1 / a1.sum(1, keepdim=True) + a2 / a2.sum(1, keepdim=True))
    assert torch.allclose(method.predict(x).exp(), p, atol=1e-6)
    u = method.uncertainty(x)
    assert u.shape == (2, 4, 8, 8) and torch.allclose(u, caef(b1, u1, b2, u2)[1])
    assert ((u > 0) & (u < 1)).all()
    method.train()
    logs = method.update(batch((4, 8, 8), classes=2), 10, method.optimizers())
    assert math.isfinite(logs["loss"]) and logs["unsup"] > 0
