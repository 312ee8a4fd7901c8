"""MC-Net+'s parts: the mutual-consistency pairing with sharpened, detached targets (by hand), the
decoders' disagreement map (by hand), the decoders, the consistency over labeled and unlabeled rows, and
the 3D decoder passes recomputed in backward (the same loss, gradients and BatchNorm statistics).

``losses.sharpen`` itself is worked out by hand in tests/test_losses.py.
"""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from minissl import losses
from minissl.config import load_config
from minissl.data import phantoms
from minissl.methods.mcnet_plus import MCNetPlus, disagreement, mutual_consistency


def make(spatial=(16, 16), **args):
    suite = "cardiac" if len(spatial) == 2 else "atrium"
    spec = replace(phantoms.SUITES[suite], patch_size=spatial)
    cfg = load_config(method="mcnet_plus", max_iters=10, width=4, depth=2, progress=False, method_args=args)
    torch.manual_seed(0)
    return MCNetPlus(cfg, spec)


def batch(spatial=(16, 16), n=2, num_classes=4):
    g = torch.Generator().manual_seed(1)
    return {"x_l": torch.randn(n, 1, *spatial, generator=g),
            "y_l": torch.randint(0, num_classes, (n, *spatial), generator=g),
            "x_u": torch.randn(n, 1, *spatial, generator=g)}


def logits_of(*probs):
    """(1, C, 1, 1) logits whose softmax is each given distribution."""
    return [torch.tensor(p, dtype=torch.float64).log().reshape(1, -1, 1, 1) for p in probs]


def test_mutual_consistency_by_hand():
    # one voxel, two classes, T = 0.5 (squares): s(0.5, 0.5) = (0.5, 0.5); s(0.8, 0.2) = (16/17, 1/17)
    z = logits_of((0.5, 0.5), (0.8, 0.2), (0.2, 0.8))
    pair_12 = (0.5 - 16 / 17) ** 2  # p_1 against s(p_2), both classes give the same square
    pair_21 = (0.8 - 0.5) ** 2  # p_2 against s(p_1) = p_1
    pair_23 = (0.8 - 1 / 17) ** 2  # p_2 against s(p_3) = (1/17, 16/17)
    expected = 2 * pair_12 + 2 * pair_21 + 2 * pair_23  # (1,2),(1,3) | (2,1),(3,1) | (2,3),(3,2)
    assert float(mutual_consistency(z, 0.5)) == pytest.approx(expected, rel=1e-9)
    assert float(mutual_consistency(z[:2], 0.5)) == pytest.approx(pair_12 + pair_21, rel=1e-9)  # MC-Net: 2 terms
    # with T = 1 (no sharpening) the pairs are symmetric: (0.5-0.8)^2 + (0.5-0.2)^2 ... twice per pair
    unsharpened = 2 * (0.3 ** 2 + 0.3 ** 2 + 0.6 ** 2)
    assert float(mutual_consistency(z, 1.0)) == pytest.approx(unsharpened, rel=1e-9)


def test_sharpened_targets_are_detached():
    g = torch.Generator().manual_seed(0)
    z_1 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z_2 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(mutual_consistency([z_1, z_2], 0.1), z_1)
    # only the term where z_1 predicts reaches z_1; the term where it is the (sharpened) target does not
    target = losses.sharpen(torch.softmax(z_2, 1), 0.1)
    (own,) = torch.autograd.grad(F.mse_loss(torch.softmax(z_1, 1), target), z_1)
    torch.testing.assert_close(grad, own)
    with pytest.raises(ValueError, match="mutual_consistency: expected at least two logits of one shape"):
        mutual_consistency([z_1], 0.1)


def test_disagreement_by_hand():
    p = [torch.tensor(v).reshape(1, 2, 1) for v in ((1.0, 0.0), (0.0, 1.0), (0.5, 0.5))]
    # mean (0.5, 0.5); squared deviations summed over classes 0.5, 0.5, 0; mean over decoders 1/3
    torch.testing.assert_close(disagreement(p), torch.tensor([[1 / 3]]))
    pairs = sum(float((a - b).pow(2).sum()) for a in p for b in p)  # ordered pairs, i == j adds 0
    assert pairs == pytest.approx(2 * 3 ** 2 * (1 / 3))  # sum_{i != j} ||p_i - p_j||^2 = 2 D^2 u
    torch.testing.assert_close(disagreement([p[2], p[2], p[2]]), torch.zeros(1, 1))
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    u = disagreement([torch.softmax(v, 1) for v in z])  # (2, 4, 4)
    assert float(mutual_consistency(z, 1.0)) == pytest.approx(2 * 3 ** 2 * float(u.mean()) / 3)  # T = 1: 2 D^2 u / C


@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
def test_three_decoders_uncertainty_and_prediction(spatial):
    method = make(spatial).eval()
    assert method.student.up_modes == ("transpose", "linear", "nearest") and method.has_uncertainty
    x = batch(spatial)["x_u"]
    u = method.uncertainty(x)
    assert u.shape == (2, *spatial) and (u >= 0).all() and u.max() > 0
    torch.testing.assert_close(u, disagreement(method.decoder_probs(x)))
    torch.testing.assert_close(method.predict(x), method.student.forward_all(x)[0])  # decoder 1 is evaluated
    assert make(spatial, num_decoders=2).student.up_modes == ("transpose", "linear")  # MC-Net (MICCAI 2021)


def test_consistency_covers_labeled_rows_and_weights_every_decoder():
    method = make()
    b = batch()
    torch.manual_seed(0)
    out = method.training_step(b, step=9)
    torch.manual_seed(0)
    moved = method.training_step(b | {"x_l": b["x_l"].flip(-1)}, step=9)
    assert not torch.isclose(out["unsup"], moved["unsup"])  # labeled images take part in L_mc, as the code
    params = [dict(d.named_parameters())["head.weight"] for d in method.student.decoders]
    grads = torch.autograd.grad(out["sup"], params)
    assert all(float(g.abs().sum()) > 0 for g in grads)  # every decoder is supervised


def test_bad_args():
    with pytest.raises(ValueError, match="mcnet_plus: num_decoders must be 2 or 3, got 4"):
        make(num_decoders=4)
    with pytest.raises(ValueError, match="mcnet_plus: temperature must be > 0, got 0"):
        make(temperature=0.0)


def test_official_recipe_is_constant_sgd_in_2d_and_3d():
    for spatial in ((16, 16), (8, 8, 8)):
        suite = "cardiac" if len(spatial) == 2 else "atrium"
        spec = replace(phantoms.SUITES[suite], patch_size=spatial)
        method = MCNetPlus(load_config(method="mcnet_plus", max_iters=100, width=4, depth=2, recipe="official"), spec)
        assert method.recipe.optimizer == "sgd" and method.recipe.lr == 0.01
        assert [method.lr_factor(s) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert make().lr_factor(50) < 1.0  # the shared recipe decays (poly)


def test_checkpointed_3d_step_equals_the_plain_step():
    plain, ckpt = make((8, 8, 8), checkpoint=False), make((8, 8, 8))
    ckpt.load_state_dict(plain.state_dict())
    calls = [0]
    for d in ckpt.student.decoders:
        d.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    b = batch((8, 8, 8), num_classes=2)
    outs = []
    for method in (plain, ckpt):
        torch.manual_seed(3)  # the same encoder dropout masks
        out = method.training_step(b, step=5)
        out["loss"].backward()
        outs.append(out)
    assert calls[0] == 2 * 3  # each of the three decoder passes ran again in backward
    torch.testing.assert_close(outs[1]["loss"], outs[0]["loss"], rtol=1e-5, atol=0)
    for (name, a), b_ in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b_.grad, a.grad, rtol=1e-5, atol=1e-8, msg=name)
    for (name, a), b_ in zip(plain.named_buffers(), ckpt.buffers()):  # running statistics moved once
        torch.testing.assert_close(b_, a, rtol=1e-5, atol=0, msg=name)
    assert all(m.momentum == 0.1 for m in ckpt.modules() if isinstance(m, torch.nn.BatchNorm3d))
