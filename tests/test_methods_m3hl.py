"""M3HL's parts: per-sample block mask ratio, mutual mixes, high (cosine) and low (L1) feature losses."""
from dataclasses import replace

import pytest
import torch

from minissl import ops
from minissl.config import load_config
from minissl.data import phantoms
from minissl.methods.m3hl import M3HL, feature_losses


def make(spatial=(16, 16)):
    suite = "cardiac" if len(spatial) == 2 else "atrium"
    spec = replace(phantoms.SUITES[suite], patch_size=spatial)
    cfg = load_config(method="m3hl", max_iters=10, width=4, depth=2, progress=False)
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


def test_mutual_mix_targets():
    spatial, n = (16, 16), 2
    const = [torch.full((n, 1, *spatial), float(v)) for v in (1, 2, 3, 4)]  # L_a, L_b, U_a, U_b
    labels = [torch.full((n, *spatial), v, dtype=torch.int64) for v in (1, 2, 3, 0)]  # Y_a, Y_b, PL_a, PL_b
    blocks = make().block_mask(const[0])
    (x1, t1, g1), (x2, t2, g2) = M3HL.mutual_mix(const[0], labels[0], const[1], labels[1], const[2], labels[2],
                                                 const[3], labels[3], blocks)
    m = ops.region_mask(spatial, blocks=blocks)  # (n, *S) M
    assert torch.equal(x1[:, 0], torch.where(m, 3.0, 1.0)) and torch.equal(t1, torch.where(m, 3, 1))
    assert torch.equal(x2[:, 0], torch.where(m, 2.0, 4.0)) and torch.equal(t2, torch.where(m, 2, 0))
    assert torch.equal(g1, (~m).float()) and torch.equal(g2, m.float())  # ground truth on the labeled blocks


def test_feature_losses_by_hand():
    e = torch.eye(3)
    high_s = [e[0].view(1, 3, 1, 1), e[0].view(1, 3, 1, 1)]
    high_t = [e[0].view(1, 3, 1, 1), e[1].view(1, 3, 1, 1)]  # parallel (cos 1) and orthogonal (cos 0)
    low_s = [torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)]
    low_t = [torch.zeros(1, 2, 2, 2), 3 * torch.ones(1, 2, 2, 2)]
    high, low = feature_losses(high_s, low_s, high_t, low_t)
    assert high.item() == pytest.approx((0 + 1 + 0 + 1) / 4)
    assert low.item() == pytest.approx((0 + 3 + 1 + 2) / 4)


def test_feature_losses_match_torch():
    g = torch.Generator().manual_seed(0)
    hs, ht = [torch.randn(3, 8, 2, 2, generator=g) for _ in range(2)], [torch.randn(3, 8, 2, 2, generator=g)
                                                                       for _ in range(2)]
    ls, lt = [torch.randn(3, 4, 8, 8, generator=g) for _ in range(2)], [torch.randn(3, 4, 8, 8, generator=g)
                                                                       for _ in range(2)]
    high, low = feature_losses(hs, ls, ht, lt)
    cos = torch.nn.CosineSimilarity(dim=1)
    ref_high = sum((1 - cos(a.reshape(3, -1), b.reshape(3, -1))).mean() for a in hs for b in ht) / 4
    ref_low = sum((a - b).abs().mean() for a in ls for b in lt) / 4
    torch.testing.assert_close(high, ref_high)
    torch.testing.assert_close(low, ref_low)


@pytest.mark.parametrize("spatial", [(16, 16), (8, 16, 16)])
def test_training_step_parts(spatial):
    method = make(spatial)
    g = torch.Generator().manual_seed(1)
    batch = {"x_l": torch.randn(4, 1, *spatial, generator=g), "x_u": torch.randn(4, 1, *spatial, generator=g),
             "y_l": torch.randint(0, method.num_classes, (4, *spatial), generator=g)}
    out = method.training_step(batch, step=0)
    torch.testing.assert_close(out["loss"], out["sup"] + out["unsup"])
    assert out["high"] > 0 and out["low"] > 0
    # the feature terms train the student: a gradient reaches the first encoder layer through them
    feats = method.student.encode(batch["x_l"][:2])
    high, low = feature_losses([feats[-1]], [method.student.decode(feats)[1]], [feats[-1].detach() + 1],
                               [torch.zeros(2, 4, *spatial)])
    grad = torch.autograd.grad(high + low, method.student.encoder[0][0].weight)[0]
    assert grad.abs().sum() > 0
