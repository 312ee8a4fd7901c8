"""CPS's own parts: cross targets are the other network's argmax, detached; two trained, different networks."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from minissl.config import load_config
from minissl.methods.cps import CPS, cross_pseudo_loss


def make(spatial_dims=2, **args):
    cfg = load_config(method="cps", width=4, depth=1, max_iters=100, method_args=args)
    torch.manual_seed(0)
    return CPS(cfg, SimpleNamespace(num_classes=3, spatial_dims=spatial_dims))


def batch(size=(8, 8), bl=2, bu=2):
    g = torch.Generator().manual_seed(2)
    return {"x_l": torch.rand(bl, 1, *size, generator=g), "y_l": torch.randint(0, 3, (bl, *size), generator=g),
            "x_u": torch.rand(bu, 1, *size, generator=g)}


def test_cross_targets_are_the_other_argmax_and_detached():
    z1 = torch.randn(2, 3, 5, 5, requires_grad=True)
    z2 = torch.randn(2, 3, 5, 5, requires_grad=True)
    loss = cross_pseudo_loss(z1, z2)
    ref = F.cross_entropy(z1, z2.argmax(1)) + F.cross_entropy(z2, z1.argmax(1))
    assert torch.allclose(loss, ref)
    g1, g2 = torch.autograd.grad(loss, [z1, z2])
    # each network gets only the gradient of its own CE term: the targets carry none
    assert torch.allclose(g1, torch.autograd.grad(F.cross_entropy(z1, z2.detach().argmax(1)), z1)[0])
    assert torch.allclose(g2, torch.autograd.grad(F.cross_entropy(z2, z1.detach().argmax(1)), z2)[0])
    with pytest.raises(ValueError, match="same shape"):
        cross_pseudo_loss(z1, z2[:1])


def test_unsup_gradient_into_the_student_is_its_own_ce_only():
    method = make()
    method.eval()  # batch norm and dropout deterministic, so the passes below are comparable
    b = batch()
    out = method.training_step(b, step=50)
    params = list(method.student.parameters())
    got = torch.autograd.grad(out["unsup"], params)
    target = method.peer(b["x_u"]).argmax(1)
    want = torch.autograd.grad(F.cross_entropy(method.student(b["x_u"]), target), params)
    assert all(torch.allclose(a, c, atol=1e-6) for a, c in zip(got, want))
    peer_grads = torch.autograd.grad(out["unsup"], list(method.peer.parameters()))
    assert sum(float(g.abs().sum()) for g in peer_grads) > 0


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_initialisation_as_ssl4mis_and_both_networks_in_one_optimiser(spatial_dims):
    method = make(spatial_dims=spatial_dims)
    assert not torch.allclose(method.student.encoder[0][0].weight, method.peer.encoder[0][0].weight)
    w = [net.decoders[0].blocks[0][0].weight.detach() for net in (method.student, method.peer)]  # conv 8 -> 4
    k = 3 ** spatial_dims
    fan_in, fan_out = 8 * k, 4 * k
    kaiming, xavier = (2 / fan_in) ** 0.5, (2 / (fan_in + fan_out)) ** 0.5  # normal stds
    default = (1 / (3 * fan_in)) ** 0.5  # PyTorch's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    want = (kaiming, xavier) if spatial_dims == 3 else (default, default)  # SSL4MIS 3D script / 2D script
    assert [float(x.std()) for x in w] == pytest.approx(want, rel=0.2)
    opt_params = {id(p) for g in method.optimizers()[0].param_groups for p in g["params"]}
    assert {id(p) for p in method.peer.parameters()} <= opt_params
    assert {id(p) for p in method.student.parameters()} <= opt_params


@pytest.mark.parametrize("labeled_cps", [False, True])
def test_labeled_cps_covers_the_labeled_images(labeled_cps):
    method = make(labeled_cps=labeled_cps)
    method.eval()
    b = batch()
    u1 = method.training_step(b, 50)["unsup"]
    u2 = method.training_step(b | {"x_l": b["x_l"].flip(-1)}, 50)["unsup"]
    assert torch.isclose(u1, u2).item() != labeled_cps


def test_predict_average_is_the_log_mean_softmax_3d():
    method = make(spatial_dims=3, predict_average=True)
    method.eval()
    x = torch.rand(1, 1, 4, 8, 8)
    probs = 0.5 * (torch.softmax(method.student(x), 1) + torch.softmax(method.peer(x), 1))
    assert torch.allclose(method.predict(x).exp(), probs, atol=1e-6)
    method.train()
    out = method.training_step(batch(size=(4, 8, 8)), step=10)
    assert {"loss", "sup", "unsup"} <= set(out) and torch.isfinite(out["loss"])
