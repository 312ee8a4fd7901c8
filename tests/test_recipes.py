"""Recipes: schedules as fractions of the run, optimisers, the EMA horizon, the official-recipe lookup,
the shared supervised loss by hand, and the engine's stage switch from the best-on-validation state."""
import csv
import json
import math

import pytest
import torch

from minissl import bench, engine, losses, results
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


def test_sgd_foreach_is_the_per_parameter_update_bit_for_bit():
    from minissl.nets import UNet
    torch.manual_seed(0)
    nets = [UNet(1, 4, spatial_dims=2, width=4, depth=2) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    recipe = Recipe(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4)
    ours = make_optimizer(nets[0].parameters(), recipe)
    plain = torch.optim.SGD(nets[1].parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=False)
    assert ours.param_groups[0]["foreach"] is True
    x = torch.randn(2, 1, 16, 16)
    for k in range(3):
        for net, opt in zip(nets, (ours, plain)):
            opt.zero_grad()
            torch.manual_seed(k)  # the same dropout masks
            net(x).square().mean().backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))


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


@pytest.mark.parametrize("suite,recipe,kept", [("cardiac", "shared", False), ("cardiac", "official", True),
                                               ("atrium", "official", False)])
def test_engine_switches_stage_from_the_best_on_validation_state(tiny_stores, tmp_path, monkeypatch, suite, recipe,
                                                                 kept):
    """BCP through the engine: validation scores 0.5, 0.9, 0.1 at iterations 1-3 (the labeled stage
    ends after 3), so stage 2 must start from the weights after iteration 2, not the last ones, and the
    optimiser from its state after iteration 2 (official ACDC recipe: momentum kept) or afresh (shared
    recipe, official LA recipe: momentum cleared)."""
    scores = iter([0.5, 0.9, 0.1] + [0.2] * 10)
    monkeypatch.setattr(engine, "validate", lambda *a, **k: next(scores))
    states, moments, switched = {}, {}, {}
    cls = get_method("bcp")
    real_update, real_end = cls.update, cls.end_stage

    def momentum(opts):
        return [v["momentum_buffer"].clone() for v in opts[0].state_dict()["state"].values()]

    def update(self, batch, step, opts):
        out = real_update(self, batch, step, opts)
        states[step + 1] = {k: v.clone() for k, v in self.state_dict().items()}
        moments[step + 1] = momentum(opts)
        return out

    def end_stage(self, step, best_state, opts):
        switched["step"], switched["state"] = step, best_state
        real_end(self, step, best_state, opts)
        switched["student"] = {k: v.clone() for k, v in self.student.state_dict().items()}
        switched["momentum"] = momentum(opts)

    monkeypatch.setattr(cls, "update", update)
    monkeypatch.setattr(cls, "end_stage", end_stage)
    cfg = load_config(method="bcp", data_root=str(tiny_stores[suite]), out_dir=str(tmp_path), width=4,
                      depth=2, batch_size=4, labeled_bs=2, max_iters=12, val_every=1, progress=False,
                      recipe=recipe, method_args={"pretrain": 0.25})
    engine.train(cfg)
    assert switched["step"] == 3
    want = states[2]
    assert all(torch.equal(switched["state"][k], want[k]) for k in want)
    assert all(torch.equal(v, want["student." + k]) for k, v in switched["student"].items())
    assert not all(torch.equal(states[3][k], want[k]) for k in want)
    assert math.isfinite(sum(float(v.float().sum()) for v in switched["student"].values()))
    if kept:  # the momentum of the best step (2), not of the last one (3)
        assert len(switched["momentum"]) == len(moments[2]) > 0
        assert all(torch.equal(a, b) for a, b in zip(switched["momentum"], moments[2]))
        assert not all(torch.equal(a, b) for a, b in zip(moments[3], moments[2]))
    else:
        assert switched["momentum"] == []


SSL4MIS = "HiLab-git/SSL4MIS code/train_"
POLY, CONST = ("sgd", 0.01, 0.9, 1e-4, "poly", 0.0), ("sgd", 0.01, 0.9, 1e-4, "constant", 0.0)
OFFICIAL = {  # (method, spatial dims) -> (optimizer, lr, momentum, weight decay, schedule, step_every), source
    ("supervised", 2): (POLY, SSL4MIS + "fully_supervised_2D.py"),
    ("supervised", 3): (POLY, SSL4MIS + "fully_supervised_3D.py"),
    ("mean_teacher", 2): (POLY, SSL4MIS + "mean_teacher_2D.py"),
    ("mean_teacher", 3): (POLY, SSL4MIS + "mean_teacher_3D.py"),
    ("ua_mt", 2): (POLY, SSL4MIS + "uncertainty_aware_mean_teacher_2D.py"),
    ("ua_mt", 3): (("sgd", 0.01, 0.9, 1e-4, "step", 2500 / 6000),
                   "yulequan/UA-MT code/train_LA_meanteacher_certainty_unlabel.py"),
    ("cps", 2): (POLY, SSL4MIS + "cross_pseudo_supervision_2D.py"),
    ("cps", 3): (POLY, SSL4MIS + "cross_pseudo_supervision_3D.py"),
    ("unimatch", 2): (POLY, "LiheYoung/UniMatch more-scenarios/medical/unimatch.py"),
    ("unimatch", 3): None,  # the medical code is 2D only
    ("bcp", 2): (CONST, "DeepMed-Lab-ECNU/BCP code/ACDC_BCP_train.py"),
    ("bcp", 3): (("sgd", 0.01, 0.9, 1e-4, "step", 1 / 6), "DeepMed-Lab-ECNU/BCP code/LA_BCP_train.py"),
    ("m3hl", 2): (CONST, "PHPJava666/M3HL code/ACDC_M3HL_train.py"),
    ("m3hl", 3): (("sgd", 0.01, 0.9, 1e-4, "step", 1 / 6), "PHPJava666/M3HL code/LA_M3HL_train.py"),
    ("cad", 2): None,  # no code released
    ("cad", 3): None,
    ("ersr", 2): (POLY, "BioMedIA-repo/ERSR train.py"),
    ("ersr", 3): None,  # a 2D method
}


@pytest.mark.parametrize("name,dims", sorted(OFFICIAL))
def test_official_recipe_of_each_method(name, dims):
    cfg = load_config(method=name, recipe="official")
    if OFFICIAL[name, dims] is None:
        with pytest.raises(ValueError, match=f"method '{name}' has no official {dims}D recipe"):
            resolve_recipe(cfg, name, dims)
        return
    values, source = OFFICIAL[name, dims]
    got = resolve_recipe(cfg, name, dims)
    assert (got.optimizer, got.lr, got.momentum, got.weight_decay, got.schedule, got.step_every) == \
        pytest.approx(values) and got.source == source
    assert got.step_gamma == 0.1 and got.warmup == 0.0


@pytest.mark.parametrize("name,suite,recipe,want", [
    ("mean_teacher", "cardiac", "official", {0: 1.0, 600: 0.5 ** 0.9, 1199: (1 / 1200) ** 0.9}),
    ("ua_mt", "atrium", "official", {499: 1.0, 500: 0.1, 1000: 0.01, 1199: 0.01}),  # x0.1 every 5/12 of the run
    ("m3hl", "cardiac", "official", {0: 1.0, 600: 1.0, 1199: 1.0}),
    ("m3hl", "atrium", "official", {199: 1.0, 200: 0.1, 1000: 1e-5, 1199: 1e-5}),  # x0.1 every 1/6 of the run
    ("bcp", "cardiac", "official", {0: 1.0, 300: 1.0, 1199: 1.0}),
    ("bcp", "cardiac", "shared", {299: (1 - 299 / 1200) ** 0.9, 300: 0.75 ** 0.9}),  # one poly, not restarted
    # LA: full rate in stage 1 (300 of 1200), then x0.1 every 1/6 of stage 2 (150), counted from the switch
    ("bcp", "atrium", "official", {0: 1.0, 299: 1.0, 300: 1.0, 449: 1.0, 450: 0.1, 600: 0.01, 1199: 1e-5}),
    ("supervised", "atrium", "official:bcp", {149: 1.0, 200: 0.1}),  # no stage: the period counts from step 0
])
def test_method_lr_factor_follows_its_recipe(name, suite, recipe, want):
    cfg = load_config(method=name, recipe=recipe, max_iters=1200, width=4, depth=2)
    method = get_method(name)(cfg, phantoms.SUITES[suite])
    assert {s: method.lr_factor(s) for s in want} == pytest.approx(want, rel=1e-9)


def test_bench_official_pairs_each_method_with_supervised_on_its_recipe(tiny_stores, tmp_path):
    over = ["--width", "4", "--depth", "2", "--batch_size", "4", "--labeled_bs", "2", "--val_every", "2"]
    store, runs, res = str(tiny_stores["cardiac"]), tmp_path / "runs", tmp_path / "results"
    shared = bench.run_one("cardiac", "supervised", 0, None, 4, runs, store, over, results=res)
    text = bench.bench_methods("cardiac", ["supervised", "m3hl", "cad", "ersr"], [0], None, 4, str(runs), store,
                               over, str(res), recipe="official")
    setting = res / "cardiac" / "b2-i4-official-m3hl"
    got = {p.relative_to(res).as_posix() for p in res.glob("cardiac/*/*/seed0")}
    assert got == {"cardiac/b2-i4-shared/supervised/seed0", "cardiac/b2-i4-official/m3hl/seed0",
                   "cardiac/b2-i4-official-m3hl/supervised/seed0"}
    config = json.loads((setting / "supervised" / "seed0" / "config.json").read_text())
    assert config["recipe"] == "official:m3hl" and results.read_row(setting / "supervised" / "seed0") != shared

    def last_lr(run):
        with open(runs / "cardiac" / run / "log.csv", newline="") as f:
            return float(list(csv.DictReader(f))[-1]["lr"])

    assert last_lr("supervised-b2-i4-official-m3hl-s0") == 0.01  # M3HL's ACDC recipe: constant
    assert last_lr("supervised-b2-i4-shared-s0") == pytest.approx(0.01 * (1 / 4) ** 0.9)  # shared: poly at step 3 of 4
    assert {p.name for p in (runs / "cardiac").iterdir()} == {"supervised-b2-i4-shared-s0", "m3hl-b2-i4-official-s0",
                                                             "supervised-b2-i4-official-m3hl-s0"}
    assert "**cardiac**: 2 labeled, 4 iterations, official:m3hl recipe" in text
    assert "| supervised | 1 | " in text and "| m3hl | 1 | " in text
    assert "No official 2D recipe: cad." in text and "Not applicable to cardiac: ersr." in text
    with pytest.raises(ValueError, match="expected a method with an official 2D recipe besides supervised, "
                                         r"got \['supervised', 'cad'\]"):
        bench.bench_methods("cardiac", ["supervised", "cad"], [0], None, 4, str(runs), store, over, str(res),
                            recipe="official")
