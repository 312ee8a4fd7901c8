"""BCP's parts: 1.0 / 0.5 region weights, the labeled-only pre-training stage, the stage switch per recipe.

The bidirectional mixes are ``labeled_unlabeled_mixes`` (tests/test_methods.py), the region loss is
``losses.copy_paste_loss`` (tests/test_losses.py).
"""
from dataclasses import replace

import pytest
import torch

from minissl import ops
from minissl.config import load_config
from minissl.data import phantoms
from minissl.methods.bcp import BCP


def make(spatial=(12, 12), iters=8, recipe="shared", **args):
    suite = "cardiac" if len(spatial) == 2 else "atrium"
    spec = replace(phantoms.SUITES[suite], patch_size=spatial)
    cfg = load_config(method="bcp", max_iters=iters, width=4, depth=2, progress=False, recipe=recipe,
                      method_args=args)
    torch.manual_seed(0)
    return BCP(cfg, spec)


def const(value, n=2, spatial=(12, 12)):
    return torch.full((n, 1, *spatial), float(value))


def batch(spatial=(12, 12), n=4):
    g = torch.Generator().manual_seed(1)
    return {"x_l": torch.randn(n, 1, *spatial, generator=g), "y_l": torch.randint(0, 4, (n, *spatial), generator=g),
            "x_u": torch.randn(n, 1, *spatial, generator=g)}


def test_one_two_thirds_box_for_the_whole_batch():
    box = ops.region_mask((12, 12), boxes=make().box(const(1, n=3)))  # (3, 12, 12)
    assert int(box[0].sum()) == 8 * 8 and torch.equal(box[0], box[1]) and torch.equal(box[1], box[2])


def test_region_weights_one_and_half():
    method = make()
    out = method.training_step(batch(), step=5)  # self-training stage (pre-training = steps 0, 1)
    assert out["unsup"] > 0
    sup_only = make(u_weight=0.0)  # same initial weights
    runs = []
    for m in (method, sup_only):
        m.rng.manual_seed(3)  # same box
        torch.manual_seed(3)  # same dropout
        runs.append(m.training_step(batch(), step=5))
    a, b = runs
    torch.testing.assert_close(b["loss"], a["sup"])  # the weight scales the pseudo-labelled region only


def test_pretrain_stage_is_labeled_only():
    method = make()
    assert method.pretrain_iters == 2  # 25 % of 8
    method.teacher.forward = lambda x: pytest.fail("the teacher must not run during pre-training")
    seen = []
    method.student.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    b = {"x_l": torch.cat([const(1), const(2)]), "y_l": torch.ones(4, 12, 12, dtype=torch.int64),
         "x_u": torch.cat([const(3), const(4)])}
    out = method.training_step(b, step=1)
    assert out["unsup"] == 0 and out["loss"] == out["sup"]
    assert set(seen[0].unique().tolist()) == {1.0, 2.0}  # L_a outside the box, L_b inside, no unlabeled image
    losses = []
    for x_u in (b["x_u"], -b["x_u"]):  # the unlabeled images must not matter
        method.rng.manual_seed(0)
        torch.manual_seed(0)
        losses.append(method.training_step(b | {"x_u": x_u}, step=0)["loss"])
    assert losses[0] == losses[1]


@pytest.mark.parametrize("spatial,recipe,args,kept", [
    ((12, 12), "shared", {}, False),  # the shared recipe clears the momentum
    ((12, 12), "official", {}, True),  # ACDC script: the stage-1 optimiser state is restored
    ((8, 12, 12), "official", {}, False),  # LA script: a new optimiser
    ((12, 12), "shared", {"keep_momentum": True}, True),
    ((12, 12), "official", {"keep_momentum": False}, False),
])
def test_stage_switch_starts_from_the_given_best_state(spatial, recipe, args, kept):
    method = make(spatial, recipe=recipe, **args)
    assert method.stage_ends() == [2]  # pretrain 0.25 of 8 iterations
    opts = method.optimizers()
    best = {k: v.clone() for k, v in method.state_dict().items()}  # "the best stage-1 state": the initial one
    b = batch(spatial) | {"y_l": torch.randint(0, method.num_classes, (4, *spatial))}
    for step in range(2):
        method.update(b, step, opts)
    momentum = [s["momentum_buffer"].clone() for s in opts[0].state.values()]
    assert momentum  # momentum buffers exist
    assert not all(torch.equal(best["student." + k], v) for k, v in method.student.state_dict().items())
    method.end_stage(2, best, opts)
    student, teacher = method.student.state_dict(), method.teacher.state_dict()
    assert all(torch.equal(student[k], best["student." + k]) for k in student)
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    after = [s["momentum_buffer"] for s in opts[0].state.values()]
    assert (len(after) == len(momentum) and all(torch.equal(a, m) for a, m in zip(after, momentum))) if kept \
        else after == []
    assert all(not p.requires_grad for p in method.teacher.parameters())


def test_3d_step():
    spatial = (8, 12, 12)
    method = make(spatial)
    b = batch(spatial) | {"y_l": torch.randint(0, 2, (4, *spatial))}
    out = method.training_step(b, step=5)
    assert torch.isfinite(out["loss"]) and out["unsup"] > 0


def test_too_few_labeled_images():
    with pytest.raises(ValueError, match="at least 2 labeled"):
        make().training_step({k: v[:1] for k, v in batch().items()}, step=0)
