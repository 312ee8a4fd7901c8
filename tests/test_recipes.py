"""Recipes: schedules as fractions of the run, optimisers, the EMA horizon, the official-recipe lookup,
the shared supervised loss by hand, and the engine's stage switch from the best-on-validation state."""
import math

import pytest
import torch

from minissl import engine, losses
from minissl.config import load_config
from minissl.data import phantoms
from minissl.methods import METHODS, get_method
from minissl.methods.base import resolve_recipe
from minissl.recipes import Recipe, ema_decay_for, horizon_of, lr_factor, make_optimizer


@pytest.mark.parametrize("recipe,step,want", [
    (Recipe(schedule="poly"), 0, 1.0),
    (Recipe(schedule="poly"), 50, 0.5 ** 0.9),
    (Recipe(schedule="cosine"), 50, 0.5),
    (Recipe(schedule="cosine"), 100, 0.0),
    (Recipe(schedule="constant"), 77, 1.0),
    (Recipe(schedule="step", step_every=0.25), 24, 1.0),
    (Recipe(schedule="step", step_every=0.25), 25, 0.1),
    (Recipe(schedule="step", step_every=0.25, step_gamma=0.5), 99, 0.125),
    (Recipe(schedule="constant", warmup=0.1), 0, 0.1),  # 10 warm-up steps: 1/10, 2/10, ... 10/10
    (Recipe(schedule="constant", warmup=0.1), 9, 1.0),
    (Recipe(schedule="cosine", warmup=0.2), 60, 0.5),  # cosine over the 80 steps after warm-up
])
def test_lr_factor_is_a_function_of_the_fraction_of_the_run(recipe, step, want):
    assert lr_factor(recipe, step, 100) == pytest.approx(want, abs=1e-12)
    if not recipe.warmup and recipe.schedule != "step":  # the same curve at 10x the length
        assert lr_factor(recipe, 10 * step, 1000) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("bad,match", [
    (dict(optimizer="lbfgs"), "optimizer: expected one of sgd, adam, adamw, radam, got 'lbfgs'"),
    (dict(schedule="linear"), "schedule: expected one of poly, constant, cosine, step"),
    (dict(schedule="step"), r"step_every: expected a fraction of max_iters in \(0, 1\]"),
    (dict(warmup=1.0), r"warmup: expected a fraction of max_iters in \[0, 1\)"),
])
def test_recipe_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        Recipe(**bad)


@pytest.mark.parametrize("name,cls,extra", [("sgd", torch.optim.SGD, {"momentum": 0.9}),
                                            ("adam", torch.optim.Adam, {"betas": (0.5, 0.999)}),
                                            ("adamw", torch.optim.AdamW, {"betas": (0.5, 0.999)}),
                                            ("radam", torch.optim.RAdam, {"betas": (0.5, 0.999)})])
def test_make_optimizer(name, cls, extra):
    w = torch.nn.Parameter(torch.ones(3))
    momentum = 0.9 if name == "sgd" else 0.5
    opt = make_optimizer([w], Recipe(optimizer=name, lr=0.1, momentum=momentum, weight_decay=0.0))
    assert isinstance(opt, cls)
    group = opt.param_groups[0]
    assert group["initial_lr"] == group["lr"] == 0.1
    assert all(group[k] == v for k, v in extra.items())


def test_ema_horizon_mapping():
    assert horizon_of(0.99, 30000) == pytest.approx(1 / 300)
    assert ema_decay_for(1 / 300, 30000) == pytest.approx(0.99)  # the published run is unchanged
    assert ema_decay_for(1 / 300, 2400) == pytest.approx(1 - 1 / 8)  # a shorter run keeps the proportion
    assert ema_decay_for(1 / 300, 100) == 0.0  # a horizon under one step: the teacher is the student
    with pytest.raises(ValueError, match="ema_horizon: expected a fraction of the run > 0, got 0"):
        ema_decay_for(0, 100)
    with pytest.raises(ValueError, match="expected a decay in"):
        horizon_of(1.0, 100)


def test_method_ema_decay_follows_its_horizon_unless_fixed():
    spec = phantoms.SUITES["cardiac"]
    mt = get_method("mean_teacher")(load_config(method="mean_teacher", max_iters=2400, width=4, depth=2), spec)
    assert mt.ema_decay() == pytest.approx(0.875)
    fixed = get_method("mean_teacher")(load_config(method="mean_teacher", max_iters=2400, width=4, depth=2,
                                                   ema_decay=0.99), spec)
    assert fixed.ema_decay() == 0.99
    ua = get_method("ua_mt")(load_config(method="ua_mt", max_iters=6000, width=4, depth=2), spec)
    assert ua.ema_decay() == pytest.approx(0.99)  # UA-MT's own 0.99 over 6,000 iterations


def test_shared_and_official_recipes():
    cfg = load_config(method="mean_teacher", lr=0.02, lr_schedule="cosine")
    shared = resolve_recipe(cfg, "mean_teacher", 2)
    assert (shared.optimizer, shared.lr, shared.momentum, shared.weight_decay, shared.schedule) == \
        ("sgd", 0.02, 0.9, 1e-4, "cosine")
    for name, cls in METHODS.items():
        for dims, recipe in cls.official_recipes.items():
            assert dims in (2, 3) and recipe.source, (name, dims)
            got = resolve_recipe(load_config(method="supervised", recipe=f"official:{name}"), "supervised", dims)
            assert got == recipe  # a baseline can borrow a method's official schedule
    missing = next((n for n, c in METHODS.items() if 3 not in c.official_recipes), None)
    if missing is not None:
        with pytest.raises(ValueError, match=f"method '{missing}' has no official 3D recipe"):
            resolve_recipe(load_config(method=missing, recipe="official"), missing, 3)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        resolve_recipe(load_config(recipe="official:nope"), "supervised", 2)
    with pytest.raises(ValueError, match="recipe: expected shared, official or official:<method>"):
        load_config(recipe="best")


def test_supervised_loss_is_ssl4mis_dice_plus_ce_by_hand():
    torch.manual_seed(0)
    logits, y = torch.randn(2, 3, 5, 4), torch.randint(0, 3, (2, 5, 4))
    spec = phantoms.SUITES["cardiac"]
    method = get_method("supervised")(load_config(width=4, depth=2, max_iters=10), spec)
    p = torch.softmax(logits.double(), 1)
    dice = 0.0
    for c in range(3):  # SSL4MIS DiceLoss: squared denominators, sums over the whole batch, all classes
        t = (y == c).double()
        inter, z, yy = (p[:, c] * t).sum(), (p[:, c] ** 2).sum(), (t * t).sum()
        dice += 1 - (2 * inter + 1e-5) / (z + yy + 1e-5)
    ce = -torch.log(p.gather(1, y[:, None])).mean()
    want = 0.5 * (dice / 3 + ce)
    assert float(method.supervised_loss(logits, y)) == pytest.approx(float(want), rel=1e-5)


def test_sharpen_by_hand():
    p = torch.tensor([0.6, 0.3, 0.1]).view(1, 3, 1, 1)
    got = losses.sharpen(p, 0.5).flatten()  # p^2 / sum p^2 = (0.36, 0.09, 0.01) / 0.46
    assert torch.allclose(got, torch.tensor([0.36, 0.09, 0.01]) / 0.46)
    assert torch.allclose(losses.sharpen(p, 1.0), p)
    assert losses.sharpen(p, 0.01).flatten()[0] > 0.999
    with pytest.raises(ValueError, match="temperature > 0"):
        losses.sharpen(p, 0.0)


def test_engine_switches_stage_from_the_best_on_validation_state(tiny_stores, tmp_path, monkeypatch):
    """BCP through the engine: validation scores 0.5, 0.9, 0.1 at iterations 1-3 (the labeled stage
    ends after 3), so stage 2 must start from the weights after iteration 2, not the last ones."""
    scores = iter([0.5, 0.9, 0.1] + [0.2] * 10)
    monkeypatch.setattr(engine, "validate", lambda *a, **k: next(scores))
    states, switched = {}, {}
    cls = get_method("bcp")
    real_update, real_end = cls.update, cls.end_stage

    def update(self, batch, step, opts):
        out = real_update(self, batch, step, opts)
        states[step + 1] = {k: v.clone() for k, v in self.state_dict().items()}
        return out

    def end_stage(self, step, best_state, opts):
        switched["step"], switched["state"] = step, best_state
        real_end(self, step, best_state, opts)
        switched["student"] = {k: v.clone() for k, v in self.student.state_dict().items()}

    monkeypatch.setattr(cls, "update", update)
    monkeypatch.setattr(cls, "end_stage", end_stage)
    cfg = load_config(method="bcp", data_root=str(tiny_stores["cardiac"]), out_dir=str(tmp_path), width=4,
                      depth=2, batch_size=4, labeled_bs=2, max_iters=12, val_every=1, progress=False,
                      method_args={"pretrain": 0.25})
    engine.train(cfg)
    assert switched["step"] == 3
    want = states[2]
    assert all(torch.equal(switched["state"][k], want[k]) for k in want)
    assert all(torch.equal(v, want["student." + k]) for k, v in switched["student"].items())
    assert not all(torch.equal(states[3][k], want[k]) for k in want)
    assert math.isfinite(sum(float(v.float().sum()) for v in switched["student"].values()))
