"""minissl.losses vs MONAI / torch.nn and hand-worked values."""
import math

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss as MonaiDiceCE
from monai.losses import DiceLoss as MonaiDice

from minissl import losses


def _data(C=3, spatial=(6, 7), B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(B, C, *spatial, generator=g, dtype=torch.float64)
    target = torch.randint(0, max(C, 2), (B, *spatial), generator=g)
    return logits, target, g


# Mapping to MONAI: our smooth = MONAI smooth_nr = smooth_dr; MONAI's CE is CrossEntropyLoss(reduction="mean"),
# the mean over voxels, which is our CE per unit weight with weight None. Targets go to MONAI as (B, 1, *S).
@pytest.mark.parametrize("spatial", [(6, 7), (3, 4, 5)])
@pytest.mark.parametrize("include_background,batch,squared", [(True, False, False), (False, True, False),
                                                              (True, True, True), (False, False, True)])
def test_dice_ce_loss_matches_monai(spatial, include_background, batch, squared):
    logits, target, _ = _data(spatial=spatial)
    kw = dict(include_background=include_background, batch=batch)
    monai = MonaiDiceCE(to_onehot_y=True, softmax=True, squared_pred=squared, smooth_nr=1e-3, smooth_dr=1e-3,
                        lambda_dice=0.7, lambda_ce=1.3, **kw)
    ours = losses.dice_ce_loss(logits, target, lambda_dice=0.7, lambda_ce=1.3, squared=squared, smooth=1e-3, **kw)
    torch.testing.assert_close(ours, monai(logits, target[:, None]))
    torch.testing.assert_close(losses.DiceCELoss(0.7, 1.3, squared=squared, smooth=1e-3, **kw)(logits, target), ours)
    dice = MonaiDice(to_onehot_y=True, softmax=True, squared_pred=squared, reduction="none", **kw)
    ours = losses.dice_loss(logits, target, squared=squared, reduction="none", **kw)
    torch.testing.assert_close(ours, dice(logits, target[:, None]).reshape(ours.shape))


def test_sigmoid_mode_matches_monai_and_bce():
    logits, target, _ = _data(C=1)
    t = target[:, None].double()
    torch.testing.assert_close(losses.dice_ce_loss(logits, target),
                               MonaiDiceCE(sigmoid=True)(logits, t))
    torch.testing.assert_close(losses.ce_loss(logits, target), F.binary_cross_entropy_with_logits(logits, t))
    torch.testing.assert_close(losses.ce_loss(logits, target, reduction="sum"),
                               F.binary_cross_entropy_with_logits(logits, t, reduction="sum"))
    soft = torch.rand_like(logits)  # soft targets in sigmoid mode
    torch.testing.assert_close(losses.ce_loss(logits, soft), F.binary_cross_entropy_with_logits(logits, soft))


def test_ce_loss_hard_and_soft_targets_match_torch():
    logits, target, g = _data()
    torch.testing.assert_close(losses.ce_loss(logits, target), F.cross_entropy(logits, target))
    torch.testing.assert_close(losses.ce_loss(logits, target, reduction="none"),
                               F.cross_entropy(logits, target, reduction="none").flatten(1).mean(1))
    soft = torch.softmax(torch.randn(logits.shape, generator=g, dtype=torch.float64), 1)
    torch.testing.assert_close(losses.ce_loss(logits, soft), F.cross_entropy(logits, soft))
    torch.testing.assert_close(losses.dice_loss(logits, F.one_hot(target, 3).movedim(-1, 1).double()),
                               losses.dice_loss(logits, target))


def test_hand_worked_values():
    # zero logits: p = 1/2; voxels labelled (0, 1): per class I = 1/2, P = T = 1 -> Dice = 1/2 exactly (smooth 0)
    logits, target = torch.zeros(1, 2, 1, 2), torch.tensor([[[0, 1]]])
    torch.testing.assert_close(losses.dice_loss(logits, target, smooth=0.0), torch.tensor(0.5))
    torch.testing.assert_close(losses.ce_loss(logits, target), torch.tensor(math.log(2)))
    torch.testing.assert_close(losses.entropy_loss(logits), torch.tensor(math.log(2)))
    torch.testing.assert_close(losses.dice_ce_loss(logits, target, smooth=0.0, lambda_dice=2.0),
                               torch.tensor(1.0 + math.log(2)))
    # squared: P = 1/2 per class -> 1 - 1 / 1.5 = 1/3
    torch.testing.assert_close(losses.dice_loss(logits, target, smooth=0.0, squared=True), torch.tensor(1 / 3))
    # perfect, confident prediction: Dice loss ~ 0; empty class with smooth: 1 - s/s = 0
    logits = torch.tensor([[[[-50.0, 50.0]], [[50.0, -50.0]], [[-50.0, -50.0]]]])  # (1, 3, 1, 2)
    assert losses.dice_loss(logits, torch.tensor([[[1, 0]]])) < 1e-6


def test_weight_zero_removes_voxels_exactly():
    logits, target, g = _data(spatial=(8, 9))
    weight = torch.zeros(2, 8, 9, dtype=torch.float64)
    weight[:, 2:6, 1:7] = 1
    crop = (slice(None), slice(None), slice(2, 6), slice(1, 7))
    for fn in (losses.dice_loss, losses.ce_loss, losses.dice_ce_loss):
        torch.testing.assert_close(fn(logits, target, weight), fn(logits[crop], target[crop[:1] + crop[2:]]))
    torch.testing.assert_close(losses.entropy_loss(logits, weight), losses.entropy_loss(logits[crop]))
    q = torch.softmax(torch.randn(logits.shape, generator=g, dtype=torch.float64), 1)
    torch.testing.assert_close(losses.consistency_mse(logits, q, weight), losses.consistency_mse(logits[crop], q[crop]))
    torch.testing.assert_close(losses.ce_loss(logits, target, torch.zeros(2, 8, 9, dtype=torch.float64)),
                               torch.tensor(0.0, dtype=torch.float64))


def test_entropy_loss_matches_formula():
    logits, _, _ = _data()
    p = torch.softmax(logits, 1)
    torch.testing.assert_close(losses.entropy_loss(logits), -(p * p.log()).sum(1).mean())
    s = torch.sigmoid(logits[:, :1])
    torch.testing.assert_close(losses.entropy_loss(logits[:, :1]), -(s * s.log() + (1 - s) * (1 - s).log()).mean())


@pytest.mark.parametrize("C", [1, 3])
def test_consistency_mse_matches_torch(C):
    logits, _, g = _data(C=C)
    q = torch.rand(logits.shape, generator=g, dtype=torch.float64)
    p = torch.sigmoid(logits) if C == 1 else torch.softmax(logits, 1)
    torch.testing.assert_close(losses.consistency_mse(logits, q), F.mse_loss(p, q))
    w = torch.rand(logits.shape[:1] + logits.shape[2:], generator=g, dtype=torch.float64)
    expected = (w[:, None] * (p - q) ** 2).sum() / (C * w.sum())
    torch.testing.assert_close(losses.consistency_mse(logits, q, w), expected)


def test_pseudo_label_loss():
    logits, _, g = _data()
    q = torch.softmax(4 * torch.randn(logits.shape, generator=g, dtype=torch.float64), 1)
    conf, pseudo = q.max(1)
    mask = conf >= 0.9
    ce = F.cross_entropy(logits, pseudo, reduction="none")
    torch.testing.assert_close(losses.pseudo_label_loss(logits, q, threshold=0.9), ce[mask].mean())
    torch.testing.assert_close(losses.pseudo_label_loss(logits, q, threshold=0.9, dice=True),
                               ce[mask].mean() + losses.dice_loss(logits, pseudo, mask.double()))
    assert losses.pseudo_label_loss(logits, q, threshold=1.1) == 0  # nothing confident -> 0, not NaN
    # sigmoid: pseudo = q > 0.5, confidence max(q, 1 - q)
    q1 = torch.tensor([0.97, 0.6, 0.01, 0.5], dtype=torch.float64).view(1, 1, 1, 4)
    z = torch.randn(1, 1, 1, 4, generator=g, dtype=torch.float64)
    bce = F.binary_cross_entropy_with_logits(z, torch.tensor([1.0, 1, 0, 0], dtype=torch.float64).view(1, 1, 1, 4),
                                             reduction="none")[0, 0, 0]
    torch.testing.assert_close(losses.pseudo_label_loss(z, q1, threshold=0.95), bce[[0, 2]].mean())
    with pytest.raises(ValueError, match=r"teacher_probs of shape \(2, 3, 6, 7\)"):
        losses.pseudo_label_loss(logits, q[:, :2])


def region_dice_ce(logits, target, region):
    """BCP's masked (Dice + CE) / 2 over one region, written out with plain torch ops."""
    ce = F.cross_entropy(logits, target, reduction="none")[region].mean()
    p, t = torch.softmax(logits, 1), F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(logits.dtype)
    r = region[:, None].to(logits.dtype)
    inter, psum, tsum = [(v * r).sum((0, 2, 3)) for v in (p * t, p * p, t)]  # (C,) pooled over the batch
    dice = (1 - (2 * inter + 1e-10) / (psum + tsum + 1e-10)).mean()
    return (dice + ce) / 2


def test_copy_paste_loss_normalises_each_region_separately():
    logits, target, g = _data(C=4, spatial=(10, 10), B=3)
    region = torch.rand(3, 10, 10, generator=g) < 0.3
    gt, pl = losses.copy_paste_loss(logits, target, region.double())
    torch.testing.assert_close(gt, region_dice_ce(logits, target, region))
    torch.testing.assert_close(pl, region_dice_ce(logits, target, ~region))


def test_gradients_flow_to_logits_only():
    logits, target, g = _data()
    logits.requires_grad_(True)
    q = torch.softmax(torch.randn(logits.shape, generator=g, dtype=torch.float64), 1).requires_grad_(True)
    (losses.dice_ce_loss(logits, target) + losses.consistency_mse(logits, q) + losses.entropy_loss(logits)).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0 and q.grad is None
    z = logits.detach()[:1, :, :2, :2].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: losses.dice_ce_loss(x, target[:1, :2, :2], squared=True), (z,))


def test_bad_input():
    logits, target, _ = _data()
    with pytest.raises(ValueError, match="expected reduction 'mean', 'sum' or 'none', got 'avg'"):
        losses.dice_loss(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="dice_ce_loss: expected reduction 'mean' or 'sum', got 'none'"):
        losses.dice_ce_loss(logits, target, reduction="none")
    with pytest.raises(ValueError, match=r"labels in \[0, 3\)"):
        losses.dice_ce_loss(logits, target + 1)
    with pytest.raises(ValueError, match=r"label target of shape \(2, 6, 7\)"):
        losses.ce_loss(logits, target[:, None])
    with pytest.raises(ValueError, match=r"target_probs of shape \(2, 3, 6, 7\)"):
        losses.consistency_mse(logits, target)
