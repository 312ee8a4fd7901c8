"""UA-MT's own parts: the entropy threshold schedule, the Monte-Carlo uncertainty and the masked consistency."""
import math
from types import SimpleNamespace

import pytest
import scipy.stats
import torch

from minissl import losses
from minissl.config import load_config
from minissl.methods.ua_mt import UAMT, predictive_entropy, uncertainty_threshold


def make(spatial_dims=2, num_classes=2, **args):
    cfg = load_config(method="ua_mt", width=4, depth=1, max_iters=100, method_args=args)
    torch.manual_seed(0)
    return UAMT(cfg, SimpleNamespace(num_classes=num_classes, spatial_dims=spatial_dims))


class Constant(torch.nn.Module):
    """A stand-in teacher that returns fixed per-class logits at every voxel."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x):
        shape = (x.shape[0], len(self.logits)) + x.shape[2:]
        return self.logits.view(1, -1, *(1,) * (x.ndim - 2)).expand(shape)


@pytest.mark.parametrize("progress,c,expected", [
    (0.0, 2, (0.75 + 0.25 * math.exp(-5)) * math.log(2)),
    (0.5, 4, (0.75 + 0.25 * math.exp(-1.25)) * math.log(4)),
    (1.0, 4, math.log(4)),
    (2.0, 3, math.log(3)),
])
def test_threshold_schedule_hand_values(progress, c, expected):
    assert uncertainty_threshold(progress, c) == pytest.approx(expected)


def test_threshold_ssl4mis_constants_and_method_steps():
    assert uncertainty_threshold(1.0, 4, ssl4mis_constants=True) == pytest.approx(math.log(2))
    method = make(num_classes=4)  # max_iters 100, threshold ramp over the whole run
    assert method.threshold(50) == pytest.approx((0.75 + 0.25 * math.exp(-1.25)) * math.log(4))
    assert method.threshold(100) == pytest.approx(math.log(4))


def test_predictive_entropy_hand_values_and_scipy():
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 1, 2, 1, 1)  # T=2 passes that disagree completely
    assert predictive_entropy(two).item() == pytest.approx(math.log(2), abs=1e-5)
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(2, 1, 2, 1, 1)  # agreeing, certain
    assert predictive_entropy(same).item() == pytest.approx(0.0, abs=1e-5)
    probs = torch.softmax(torch.randn(8, 2, 3, 4, 5, dtype=torch.float64), dim=2)  # (T, B, C, H, W)
    ref = scipy.stats.entropy(probs.mean(0).numpy(), axis=1)  # (B, H, W)
    assert torch.allclose(predictive_entropy(probs, eps=0.0), torch.from_numpy(ref))
    with pytest.raises(ValueError, match="expected probs"):
        predictive_entropy(torch.rand(2, 3, 4))


def test_uncertainty_of_a_constant_teacher_is_its_entropy_3d():
    method = make(spatial_dims=3, num_classes=3)
    method.teacher = Constant([0.0, 1.0, 2.0])
    u = method.uncertainty(torch.rand(2, 1, 2, 4, 4))
    assert u.shape == (2, 2, 4, 4)
    p = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    assert torch.allclose(u, -(p * torch.log(p + 1e-6)).sum().expand_as(u), atol=1e-6)


def test_mc_passes_differ_through_teacher_dropout():
    method = make(mc_passes=8)
    u = method.uncertainty(torch.rand(2, 1, 8, 8))
    assert u.shape == (2, 8, 8) and float(u.min()) >= 0 and float(u.max()) <= math.log(2) + 1e-6


def batch(bl=2, bu=2, size=8):
    g = torch.Generator().manual_seed(1)
    return {"x_l": torch.rand(bl, 1, size, size, generator=g),
            "y_l": torch.randint(0, 2, (bl, size, size), generator=g),
            "x_u": torch.rand(bu, 1, size, size, generator=g)}


@pytest.mark.parametrize("teacher_logits,unsup_zero", [([0.0, 0.0], True), ([5.0, -5.0], False)])
def test_mask_removes_uncertain_voxels(teacher_logits, unsup_zero):
    method = make()
    method.teacher = Constant(teacher_logits)  # uniform -> entropy ln 2 > threshold: all masked out
    out = method.training_step(batch(), step=0)
    assert (out["mask_ratio"].item() == 0.0) == unsup_zero and (out["unsup"].item() == 0.0) == unsup_zero


@pytest.mark.parametrize("ssl4mis,num_classes", [(False, 3), (True, 3)])
def test_masked_mse_normalisation(ssl4mis, num_classes):
    logits = torch.randn(2, num_classes, 4, 4, dtype=torch.float64)
    q = torch.softmax(torch.randn_like(logits), 1)
    mask = (torch.rand(2, 4, 4) > 0.5).double()
    d = ((torch.softmax(logits, 1) - q) ** 2 * mask[:, None]).sum()
    ours = losses.consistency_mse(logits, q, weight=mask) * (num_classes / 2 if ssl4mis else 1)
    assert ours.item() == pytest.approx((d / ((2 if ssl4mis else num_classes) * mask.sum())).item())
