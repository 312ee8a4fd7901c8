"""M3HL's parts: per-sample block mask ratio, the high (cosine) and low (L1) feature losses by hand and
inside ``training_step``. The mutual mixes are ``labeled_unlabeled_mixes`` (tests/test_methods.py)."""
import math
from dataclasses import replace

import pytest
import torch

from minissl import ops
from minissl.config import load_config
from minissl.data import phantoms
from minissl.methods.m3hl import M3HL, feature_losses


def make(spatial=(16, 16), **args):
    suite = "cardiac" if len(spatial) == 2 else "atrium"
    spec = replace(phantoms.SUITES[suite], patch_size=spatial)
    cfg = load_config(method="m3hl", max_iters=10, width=4, depth=2, progress=False, method_args=args)
    torch.manual_seed(0)
    return M3HL(cfg, spec)


@pytest.mark.parametrize("spatial", [(16, 16), (8, 16, 16)])
def test_block_mask_ratio(spatial):
    method = make(spatial)
    blocks = method.block_mask(torch.zeros(6, 1, *spatial))
    assert blocks.shape == (6, *(4,) * len(spatial))  # 4 x 4 or 4 x 4 x 4 grid
    n = 4 ** len(spatial)
    assert (blocks.flatten(1).sum(1) == n // 2).all()  # exactly 50 % of the blocks, per sample
    mask = ops.region_mask(spatial, blocks=blocks)
    assert torch.allclose(mask.flatten(1).float().mean(1), torch.tensor(0.5))  # 50 % of the voxels
    assert len({tuple(b.flatten().tolist()) for b in blocks}) > 1  # drawn anew for every sample


def test_feature_losses_by_hand():
    e = torch.eye(3)
    high_s = [e[0].view(1, 3, 1, 1), e[0].view(1, 3, 1, 1)]
    high_t = [e[0].view(1, 3, 1, 1), e[1].view(1, 3, 1, 1)]  # parallel (cos 1) and orthogonal (cos 0)
    low_s = [torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)]
    low_t = [torch.zeros(1, 2, 2, 2), 3 * torch.ones(1, 2, 2, 2)]
    high, low = feature_losses(high_s, low_s, high_t, low_t)
    assert high.item() == pytest.approx((0 + 1 + 0 + 1) / 4)
    assert low.item() == pytest.approx((0 + 3 + 1 + 2) / 4)


def batch(spatial, num_classes):
    g = torch.Generator().manual_seed(1)
    return {"x_l": torch.randn(4, 1, *spatial, generator=g), "x_u": torch.randn(4, 1, *spatial, generator=g),
            "y_l": torch.randint(0, num_classes, (4, *spatial), generator=g)}


def constant_features(net, bottleneck, last):
    """Make ``net``'s bottleneck and last decoder map constant: their final BatchNorm gets weight 0 and a bias."""
    with torch.no_grad():
        for bn, bias in ((net.encoder[-1][5], bottleneck), (net.decoders[0].blocks[-1][5], last)):
            bn.weight.zero_()
            bn.bias.copy_(torch.as_tensor(bias, dtype=bn.bias.dtype).expand_as(bn.bias))
    return net


@pytest.mark.parametrize("spatial", [(16, 16), (8, 16, 16)])
def test_feature_consistency_of_training_step_by_hand(spatial):
    method = make(spatial, u_weight=0.0)  # unsup = feat_weight (L_low + L_high): the feature terms alone
    c_b = method.student.encoder[-1][5].num_features  # 16 bottleneck channels
    c_l = method.student.decoders[0].blocks[-1][5].num_features  # 4 channels in the last decoder map
    constant_features(method.student, torch.eye(c_b)[0], 0.5)  # h_s = e_0 at every voxel, l_s = 0.5
    constant_features(method.teacher, 1.0, 0.0)  # h_t = 1 everywhere, l_t = 0
    out = method.training_step(batch(spatial, method.num_classes), step=0)
    high = 1 - 1 / math.sqrt(c_b)  # cos(e_0, 1) over N voxels = N / (sqrt(N) sqrt(c_b N)), for every pair
    assert out["high"].item() == pytest.approx(high) and out["low"].item() == pytest.approx(0.5)
    assert out["unsup"].item() == pytest.approx(0.5 * (high + 0.5))
    # each student map is in 2 of the 4 (student, teacher) pairs: d L_low / d l_s,c = 1 / c_l per channel
    bias = method.student.decoders[0].blocks[-1][5].bias
    torch.testing.assert_close(torch.autograd.grad(out["unsup"], bias)[0], torch.full((c_l,), 0.5 / c_l))


@pytest.mark.parametrize("spatial", [(16, 16), (8, 16, 16)])
def test_feature_terms_train_the_whole_student(spatial):
    method = make(spatial, u_weight=0.0)
    out = method.training_step(batch(spatial, method.num_classes), step=0)
    assert out["high"] > 0 and out["low"] > 0
    first_conv = method.student.encoder[0][0].weight
    assert torch.autograd.grad(out["unsup"], first_conv)[0].abs().sum() > 0
    assert not any(p.requires_grad for p in method.teacher.parameters())  # the teacher only follows the EMA
