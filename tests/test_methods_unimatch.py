"""UniMatch's own parts: the confidence-masked Dice, the two strong CutMix views and their pasted pseudo-labels."""
from types import SimpleNamespace

import pytest
import torch

from minissl.config import load_config
from minissl.data import transforms
from minissl.methods.unimatch import UniMatch, masked_dice
from minissl.ops import regions


def make(spatial_dims=2, **args):
    cfg = load_config(method="unimatch", width=4, depth=1, max_iters=100, method_args=args)
    torch.manual_seed(0)
    return UniMatch(cfg, SimpleNamespace(num_classes=3, spatial_dims=spatial_dims))


def official_dice(probs, pseudo, keep):
    """UniMatch's DiceLoss(softmax probs, labels, ignore=~keep) written out: per class, batch-pooled, squared."""
    loss = 0.0
    for c in range(probs.shape[1]):
        s, t = probs[:, c][keep], (pseudo == c).double()[keep]
        loss += 1 - (2 * (s * t).sum() + 1e-5) / ((s * s).sum() + (t * t).sum() + 1e-5)
    return loss / probs.shape[1]


def test_masked_dice_matches_the_official_formula_and_mask():
    logits = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    pseudo = torch.randint(0, 3, (2, 6, 6))
    conf = torch.rand(2, 6, 6, dtype=torch.float64)
    keep = conf >= 0.5
    want = official_dice(torch.softmax(logits, 1), pseudo, keep)
    assert masked_dice(logits, pseudo, conf, 0.5).item() == pytest.approx(want.item())
    changed = torch.where(keep[:, None], logits, logits + 5 * torch.randn_like(logits))  # only masked-out voxels
    assert masked_dice(changed, pseudo, conf, 0.5).item() == pytest.approx(want.item())
    assert masked_dice(logits, pseudo, conf, 1.01).item() == 0.0  # no confident voxel: loss 0, as the code


@pytest.mark.parametrize("size", [(8, 8), (4, 8, 8)])
def test_strong_views_differ_and_pseudo_labels_follow_the_box(size):
    method = make(spatial_dims=len(size), cutmix_p=1.0)
    g = torch.Generator().manual_seed(3)
    x_u = torch.rand(3, 1, *size, generator=g)
    pseudo, conf = torch.randint(0, 3, (3, *size), generator=g), torch.rand(3, *size, generator=g)
    state = method.rng.get_state()
    views = method.strong_views(x_u, pseudo, conf)
    (x1, y1, c1, box1), (x2, _, _, box2) = views
    assert not torch.allclose(x1, x2) and not torch.allclose(x1, x_u)  # two independent strong views
    assert not torch.equal(box1, box2)
    inside = regions.region_mask(size, boxes=box1)  # (B, *S)
    assert bool(inside.any(dim=tuple(range(1, inside.ndim))).all())  # p = 1: every image has a box
    assert torch.equal(y1, torch.where(inside, pseudo.roll(1, 0), pseudo))  # partner of i is i - 1
    assert torch.equal(c1, torch.where(inside, conf.roll(1, 0), conf))
    method.rng.set_state(state)  # replay: image = strong(x_u) outside the box, the partner's strong view inside
    s1 = transforms.strong(x_u, method.rng)
    regions.cutmix_box(size, 3, method.rng, p=1.0)
    assert torch.allclose(x1, torch.where(inside[:, None], s1.roll(1, 0), s1))


def test_no_box_without_cutmix():
    method = make(cutmix_p=0.0)
    pseudo, conf = torch.randint(0, 3, (2, 8, 8)), torch.rand(2, 8, 8)
    (_, y1, c1, box1), _ = method.strong_views(torch.rand(2, 1, 8, 8), pseudo, conf)
    assert int(box1.abs().sum()) == 0 and torch.equal(y1, pseudo) and torch.equal(c1, conf)


def batch(size=(8, 8)):
    g = torch.Generator().manual_seed(4)
    return {"x_l": torch.rand(2, 1, *size, generator=g), "y_l": torch.randint(0, 3, (2, *size), generator=g),
            "x_u": torch.rand(2, 1, *size, generator=g)}


@pytest.mark.parametrize("size", [(8, 8), (4, 8, 8)])
def test_training_step_weights_and_gradients(size):
    method = make(spatial_dims=len(size), conf_thresh=0.0)  # every voxel confident: the unlabeled terms are on
    out = method.training_step(batch(size), step=0)
    want = 0.5 * out["loss_fp"] + 0.25 * 2 * out["loss_s"]
    assert out["unsup"].item() == pytest.approx(want.item(), rel=1e-5)
    assert out["mask_ratio"].item() == 1.0
    grads = torch.autograd.grad(out["unsup"], list(method.student.parameters()), allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_confidence_threshold_off_gives_zero_unlabeled_loss():
    out = make(conf_thresh=1.01).training_step(batch(), step=0)
    assert out["unsup"].item() == 0.0 and out["mask_ratio"].item() == 0.0


def test_total_scale_scales_supervised_and_unlabeled_parts():
    for scale in (0.5, 1.0):
        out = make(conf_thresh=0.0, total_scale=scale).training_step(batch(), step=0)
        grads = torch.autograd.grad(out["loss"], [out["sup"], out["unsup"]])
        assert [float(g) for g in grads] == pytest.approx([scale, scale])
