"""M&N: the sampling schedule, 2D-slice / 3D-volume round trips, the Dice + KL loss, the inpainting
pretext on a tiny image and its cache, loading a pretrained 2D model, and the alternating update."""
import math

import numpy as np
import pytest
import torch

from minissl.config import load_config
from minissl.data import datasets
from minissl.data.sources import open_data
from minissl.methods import get_method
from minissl.methods import mn
from minissl.nets import UNet


def test_pseudo_count_schedule_by_hand():
    # 80 iterations, transition 1/8 -> stage 2 starts at step 10 and lasts 70 steps; B = 4
    got = [mn.pseudo_count(s, 80, 0.125, 4) for s in (0, 9, 10, 27, 28, 44, 45, 62, 63, 79)]
    assert got == [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]  # floor((s - 10) / 70 * 4) steps up at s = 27.5, 45, 62.5
    assert max(mn.pseudo_count(s, 80, 0.125, 4) for s in range(80)) == 3  # at least one labeled volume
    assert [mn.pseudo_count(s, 10, 0.0, 5) for s in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_volume_slice_round_trip():
    x = torch.arange(2 * 3 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 3, 4, 5, 6)  # (B, C, Z, Y, X)
    s = mn.volumes_to_slices(x)
    assert s.shape == (8, 3, 5, 6)
    for b in range(2):
        for z in range(4):
            assert torch.equal(s[b * 4 + z], x[b, :, z])  # volume-major, slice z of volume b
    assert torch.equal(mn.slices_to_volumes(s, 2), x)


def test_dice_kl_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    q = torch.softmax(torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), dim=1)
    p = torch.softmax(logits, dim=1)
    inter, den = (p * q).sum((0, 2, 3)), (p * p).sum((0, 2, 3)) + (q * q).sum((0, 2, 3))  # (C,) pooled over batch
    dice = 1 - ((2 * inter + 1e-6) / (den + 1e-6)).mean()
    kl = (q * (q.log() - p.log())).sum() / q.numel()
    assert float(mn.dice_kl_loss(logits, q)) == pytest.approx(float(dice + kl), rel=1e-8)
    assert float(mn.dice_kl_loss(logits, p)) == pytest.approx(0.0, abs=1e-12)  # its own softmax: both terms 0


def tiny_image():
    """A ramp with a bright corner square."""
    y, x = np.mgrid[0:24, 0:24] / 23.0
    im = (0.5 * y + 0.2 * x).astype(np.float32)
    im[:6, :6] = 1.0
    return im


def test_inpainting_pretext_on_a_tiny_image():
    torch.manual_seed(0)
    net = UNet(1, 1, spatial_dims=2, width=4, depth=2, dropout=0.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    hist = mn.inpainting_pretext(net, [tiny_image()], iters=40, crop=16, batch=4, block=4)
    assert len(hist) == 40
    assert np.mean(hist[-5:]) < 0.3 * np.mean(hist[:5])  # the restoration is learned
    after = net.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in after if k.endswith("weight"))
    torch.manual_seed(0)
    again = UNet(1, 1, spatial_dims=2, width=4, depth=2, dropout=0.0)
    assert mn.inpainting_pretext(again, [tiny_image()], iters=5, crop=16, batch=4, block=4) == hist[:5]  # deterministic


def test_natural_images_are_the_listed_photographs():
    ims = mn.natural_images(64)
    assert len(ims) == len(mn.NATURAL_IMAGES) == 8
    assert all(im.ndim == 2 and min(im.shape) == 64 and 0 <= im.min() and im.max() <= 1 for im in ims)


def test_pretext_encoder_is_cached_and_leaves_the_global_rng(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    state = torch.get_rng_state()
    enc = mn.pretext_encoder(4, 2, 2)
    assert torch.equal(torch.get_rng_state(), state)
    path = tmp_path / ".cache" / "minissl" / "pretrained" / f"mn-inpainting-w4-d2-i2-v{mn.PRETEXT_VERSION}.pt"
    assert path.is_file() and set(enc) and all(k.startswith("encoder.") for k in enc)
    again = mn.pretext_encoder(4, 2, 2)  # read back, not recomputed
    assert all(torch.equal(enc[k], again[k]) for k in enc)


def build(root, **method_args):
    store = open_data(root)
    cfg = load_config(method="mn", data_root=str(root), width=4, depth=2, batch_size=4, labeled_bs=2,
                      max_iters=16, progress=False, method_args={"pretext": "none"} | method_args)
    torch.manual_seed(0)
    return store, get_method("mn")(cfg, store.spec)


def test_pretrained_state_dict_is_loaded_and_checked(tiny_stores, tmp_path):
    net = UNet(1, 2, spatial_dims=2, width=4, depth=2)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    _, method = build(tiny_stores["atrium"], pretrained=str(tmp_path / "w.pt"))
    for k, v in net.state_dict().items():
        if k.startswith("encoder."):
            assert torch.equal(method.net2d.state_dict()[k], v)
    torch.save(UNet(1, 2, spatial_dims=2, width=8, depth=2).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ValueError, match="mn: --pretrained .*wide.pt: expected the encoder of a 2D UNet of width 4"):
        build(tiny_stores["atrium"], pretrained=str(tmp_path / "wide.pt"))
    with pytest.raises(ValueError, match="mn: --pretrained expected a state_dict file, got .*missing.pt"):
        build(tiny_stores["atrium"], pretrained=str(tmp_path / "missing.pt"))


def test_the_default_starts_from_the_inpainting_pretrained_encoder(tiny_stores, monkeypatch):
    calls = []

    def fake(width, depth, iters):
        calls.append((width, depth, iters))
        return {k: torch.full_like(v, 0.5) for k, v in UNet(1, 2, 2, width, depth).state_dict().items()
                if k.startswith("encoder.") and v.is_floating_point()}

    monkeypatch.setattr(mn, "pretext_encoder", fake)
    _, method = build(tiny_stores["atrium"], pretext="inpainting")
    assert calls == [(4, 2, 200)]
    assert float(method.net2d.encoder[0][0].weight.detach().flatten()[0]) == 0.5
    _, scratch = build(tiny_stores["atrium"])  # --pretext none: no pretext
    assert calls == [(4, 2, 200)] and float(scratch.net2d.encoder[0][0].weight.detach().flatten()[0]) != 0.5


def test_run2d_is_the_2d_model_slice_by_slice(tiny_stores):
    _, method = build(tiny_stores["atrium"])
    method.eval()
    x = torch.randn(2, 1, 8, 16, 16)
    out = method.run2d(x)
    assert out.shape == (2, 2, 8, 16, 16)
    assert torch.allclose(out[1, :, 5], method.net2d(x[1:2, :, 5])[0], atol=1e-5)


def test_alternating_update_uses_two_optimisers_and_the_schedule(tiny_stores):
    store, method = build(tiny_stores["atrium"])
    batch = next(datasets.make_train_loader(store, store.labeled(2, 0), seed=0, batch_size=4, labeled_bs=2))
    opts = method.optimizers()
    assert len(opts) == 2 and {id(p) for p in opts[0].param_groups[0]["params"]} == {
        id(p) for p in method.student.parameters()}
    w3, w2 = (next(n.parameters()).clone() for n in (method.student, method.net2d))
    logs = method.update(batch, 0, opts)
    assert logs["n_pseudo"] == 0 and logs["unsup"] == logs["unsup_2d"] == 0.0  # stage 1: labeled only
    assert not torch.equal(w3, next(method.student.parameters())) and not torch.equal(w2, next(method.net2d.parameters()))
    logs = method.update(batch, 15, opts)  # floor((15 - 2) / 14 * 2) = 1 pseudo-labeled volume of 2
    assert logs["n_pseudo"] == 1 and logs["unsup"] > 0 and logs["unsup_2d"] > 0
    out = method.training_step(batch, 15)
    assert out["loss"].item() == pytest.approx((out["sup"] + out["unsup"] + out["sup_2d"] + out["unsup_2d"]).item() / 2)
    assert method.lr_factor(0) == 1.0 == method.lr_factor(2)  # the schedule starts again at the transition
    assert method.lr_factor(9) == pytest.approx((1 - 7 / 14) ** 0.9)


def test_a_2d_suite_is_refused(tiny_stores):
    with pytest.raises(ValueError, match="mn: does not apply to suite 'cardiac': expected a 3D suite .* got spatial_dims=2"):
        build(tiny_stores["cardiac"])
    with pytest.raises(ValueError, match="--pretext inpainting\\|none"):
        build(tiny_stores["atrium"], pretext="jigsaw")


def test_official_recipe_gives_adamw_and_the_2d_rate_scale(tiny_stores):
    store = open_data(tiny_stores["atrium"])
    cfg = load_config(method="mn", data_root=str(tiny_stores["atrium"]), width=4, depth=2, max_iters=16,
                      progress=False, recipe="official", method_args={"pretext": "none", "lr_2d_scale": 10.0})
    opt3, opt2 = get_method("mn")(cfg, store.spec).optimizers()
    assert isinstance(opt3, torch.optim.AdamW) and opt3.param_groups[0]["lr"] == 1e-4
    assert math.isclose(opt2.param_groups[0]["lr"], 1e-3)
