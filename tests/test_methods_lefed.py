"""LeFeD's parts: K inner passes per iteration, each fed the previous pass's discrepancy 1e-3 (F_2 - F_1);
decoder 2 gated by the detached sigmoid of decoder 1's stages; the deep-supervision weights; the
consistency reaching both decoders; evaluation by decoder 1 without feedback; the 3D decoder passes
and the encoder pass recomputed in backward (the same loss, gradients and BatchNorm statistics).

The UNet taps themselves (stage features, gates, encoder feedback) are tested in tests/test_nets.py.
"""
from dataclasses import replace

import pytest
import torch

from minissl.config import load_config
from minissl.data import phantoms
from minissl.methods.lefed import DS_WEIGHTS, LeFeD


def make(spatial=(16, 16), depth=2, **args):
    suite = "cardiac" if len(spatial) == 2 else "atrium"
    spec = replace(phantoms.SUITES[suite], patch_size=spatial)
    cfg = load_config(method="lefed", max_iters=10, width=4, depth=depth, progress=False, method_args=args)
    torch.manual_seed(0)
    return LeFeD(cfg, spec)


def batch(spatial=(16, 16), n=2, num_classes=4):
    g = torch.Generator().manual_seed(1)
    return {"x_l": torch.randn(n, 1, *spatial, generator=g),
            "y_l": torch.randint(0, num_classes, (n, *spatial), generator=g),
            "x_u": torch.randn(n, 1, *spatial, generator=g)}


def record(method):
    """Wrap the student's encode / decode_stages to record what each pass receives and produces."""
    net, seen = method.student, {"feedback": [], "stages": [], "gates": []}
    encode, decode_stages = net.encode, net.decode_stages

    def rec_encode(x, feedback=None):
        seen["feedback"].append(None if feedback is None else [f.clone() for f in feedback])
        return encode(x, feedback)

    def rec_decode(feats, index=0, gates=None):
        logits, stages = decode_stages(feats, index, gates)
        seen["stages"].append([s.detach().clone() for s in stages])
        seen["gates"].append(gates)
        return logits, stages

    net.encode, net.decode_stages = rec_encode, rec_decode
    return seen


@pytest.mark.parametrize("spatial,num_classes", [((16, 16), 4), ((8, 8, 8), 2)])
def test_inner_passes_feed_the_discrepancy_back(spatial, num_classes):
    method = make(spatial, checkpoint=False)  # every recorded call is a forward call (no recomputation)
    opts = method.optimizers()
    steps = []
    real_step = opts[0].step
    opts[0].step = lambda: (steps.append(1), real_step())[1]
    seen = record(method)
    logs = method.update(batch(spatial, num_classes=num_classes), 0, opts)
    assert len(steps) == 3 and len(seen["feedback"]) == 3  # K = 3 passes, an optimiser step after each
    assert seen["feedback"][0] is None  # the first pass has no feedback
    for k in (1, 2):  # pass k receives 1e-3 (F_2 - F_1) of pass k - 1 (decoder calls 2(k-1), 2(k-1) + 1)
        f_1, f_2 = seen["stages"][2 * (k - 1)], seen["stages"][2 * (k - 1) + 1]
        for got, s1, s2 in zip(seen["feedback"][k], f_1, f_2):
            torch.testing.assert_close(got, 1e-3 * (s2 - s1))
            assert not got.requires_grad
    assert {"loss", "sup", "unsup", "ds", "gap"} <= set(logs) and logs["gap"] > 0


def test_decoder_two_is_gated_by_detached_decoder_one_stages():
    method = make()
    seen = record(method)
    method.training_step(batch(), step=0)
    assert seen["gates"][0] is None  # decoder 1: plain skips
    stages_1, gates = seen["stages"][0], seen["gates"][1]
    assert len(gates) == 3 and all(not g.requires_grad for g in gates)
    for g, s in zip(gates, stages_1):
        torch.testing.assert_close(g, torch.sigmoid(s))


def test_feedback_changes_the_pass_and_its_scale():
    method = make().eval()
    x = torch.cat([batch()["x_l"], batch()["x_u"]])
    z_1, _, _, gap = method.forward_pass(x)
    assert [g.shape[1] for g in gap] == [4, 8, 16]  # one per encoder level, shaped like it
    fed = method.forward_pass(x, [1e-3 * g for g in gap])[0]
    assert not torch.equal(fed, z_1)
    assert torch.equal(method.predict(x), z_1)  # evaluation: decoder 1, one pass, no feedback


def test_deep_supervision_weights_full_resolution_first():
    method = make()  # depth 2: three stages, weights 0.8, 0.6, 0.4
    assert len(method.side) == 3
    for h in method.side:  # every side head gives the same constant logits
        torch.nn.init.zeros_(h.weight)
        with torch.no_grad():
            h.bias.copy_(torch.tensor([1.0, 0.0, -1.0, 0.5]))
    b = batch()
    out = method.training_step(b, step=0)
    const = torch.tensor([1.0, 0.0, -1.0, 0.5]).reshape(1, 4, 1, 1).expand(2, 4, 16, 16)
    expected = (0.8 + 0.6 + 0.4) * method.supervised_loss(const, b["y_l"])
    torch.testing.assert_close(out["ds"], expected)
    assert DS_WEIGHTS == (0.8, 0.6, 0.4, 0.2, 0.1)
    assert len(make(spatial=(16, 16), depth=4).side) == 5


def test_consistency_trains_both_decoders_with_constant_weight():
    method = make()
    for step in (0, 9):
        out = method.training_step(batch(), step=step)
        assert float(out["w"]) == 1.0
    heads = [d.head.weight for d in method.student.decoders]
    grads = torch.autograd.grad(out["unsup"], heads)
    assert all(float(g.abs().sum()) > 0 for g in grads)  # no stop-gradient on either side, as the code


def test_bad_args():
    with pytest.raises(ValueError, match="lefed: passes must be >= 1, got 0"):
        make(passes=0)


def test_official_recipe_steps_every_sixth_of_the_run_in_3d_only():
    spec = replace(phantoms.SUITES["atrium"], patch_size=(8, 8, 8))
    method = LeFeD(load_config(method="lefed", max_iters=600, width=4, depth=2, recipe="official"), spec)
    assert [round(method.lr_factor(s), 6) for s in (0, 99, 100, 200, 599)] == [1.0, 1.0, 0.1, 0.01, 1e-5]
    with pytest.raises(ValueError, match="method 'lefed' has no official 2D recipe"):
        LeFeD(load_config(method="lefed", max_iters=10, recipe="official"), phantoms.SUITES["cardiac"])


def test_checkpointed_3d_pass_equals_the_plain_pass():
    plain, ckpt = make((8, 8, 8), checkpoint=False), make((8, 8, 8))
    ckpt.load_state_dict(plain.state_dict())
    calls = [0]
    for d in (*ckpt.student.decoders, ckpt.student.encoder[0]):
        d.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    b = batch((8, 8, 8), num_classes=2)
    g = torch.Generator().manual_seed(2)
    feedback = [1e-3 * torch.randn(4, 4 * 2 ** k, *(8 // 2 ** k,) * 3, generator=g) for k in range(3)]
    results = []
    for method in (plain, ckpt):
        torch.manual_seed(3)  # the same encoder dropout masks
        out, gap = method.pass_losses(b, feedback)
        out["loss"].backward()
        results.append((out, gap))
    assert calls[0] == 2 * 3  # the encoder and both decoder passes ran again in backward
    (out_p, gap_p), (out_c, gap_c) = results
    torch.testing.assert_close(out_c["loss"], out_p["loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(gap_c, gap_p, rtol=1e-5, atol=1e-8)
    for (name, a), b_ in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b_.grad, a.grad, rtol=1e-5, atol=1e-8, msg=name)
    for (name, a), b_ in zip(plain.named_buffers(), ckpt.buffers()):  # running statistics moved once
        torch.testing.assert_close(b_, a, rtol=1e-5, atol=0, msg=name)
    assert all(m.momentum == 0.1 for m in ckpt.modules() if isinstance(m, torch.nn.BatchNorm3d))
