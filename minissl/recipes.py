"""Training recipes: the optimiser and the learning-rate schedule of a run, and the EMA horizon.

The leaderboard compares methods, not optimisers, so every method trains with the **shared recipe** by
default (SGD, learning rate 0.01, momentum 0.9, weight decay 1e-4, poly decay; the values of the
Config fields ``lr``, ``momentum``, ``weight_decay``, ``lr_schedule``). ``--recipe official`` gives a
method the optimiser and schedule of its official code instead (``Method.official_recipes``: the 2D
entry follows the ACDC script, the 3D entry the LA script), and ``--recipe official:<method>`` gives a
run another method's official recipe, so that the benchmark can pair it with a supervised baseline
trained on the same schedule.

Everything tied to the length of a run is a fraction of ``max_iters``: warm-up, step periods, and the
EMA horizon. An EMA of decay ``d`` averages about the last ``1 / (1 - d)`` steps; 0.99 over a
30,000-iteration run is a horizon of 100 / 30,000 = 1/300 of the run, and a 2,400-iteration run keeps
that proportion with ``d = 1 - 1 / (2400 / 300) = 0.875``.

Example:
    >>> r = Recipe(schedule="step", step_every=0.25, step_gamma=0.1)
    >>> [round(lr_factor(r, s, 100), 3) for s in (0, 24, 25, 50)]
    [1.0, 1.0, 0.1, 0.01]
    >>> round(ema_decay_for(horizon_of(0.99, 30000), 2400), 3)
    0.875
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

OPTIMIZERS = ("sgd", "adam", "adamw", "radam")
SCHEDULES = ("poly", "constant", "cosine", "step")


@dataclass(frozen=True)
class Recipe:
    """An optimiser and its learning-rate schedule; schedule lengths are fractions of ``max_iters``."""

    optimizer: str = "sgd"  # sgd | adam | adamw | radam
    lr: float = 0.01  # initial (peak, after warm-up) learning rate
    momentum: float = 0.9  # SGD momentum; Adam-family: beta1
    weight_decay: float = 1e-4
    schedule: str = "poly"  # poly (1 - t)^0.9 | constant | cosine | step
    warmup: float = 0.0  # linear warm-up from 0, fraction of max_iters
    step_every: float = 0.0  # 'step': the rate is multiplied by step_gamma every step_every * max_iters
    step_gamma: float = 0.1
    beta2: float = 0.999  # Adam-family second-moment decay
    source: str = ""  # where the official values come from: "<repository> <file>"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"recipe optimizer: expected one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"recipe schedule: expected one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.schedule == "step" and not 0 < self.step_every <= 1:
            raise ValueError(f"recipe step_every: expected a fraction of max_iters in (0, 1] for the step "
                             f"schedule, got {self.step_every!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"recipe warmup: expected a fraction of max_iters in [0, 1), got {self.warmup!r}")


def shared_recipe(lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 1e-4,
                  schedule: str = "poly") -> Recipe:
    """The protocol's recipe, SGD with the given values (the Config fields of the same names)."""
    return Recipe("sgd", lr, momentum, weight_decay, schedule, source="minissl shared recipe")


def make_optimizer(params: Iterable[torch.nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``params``; each group remembers its ``initial_lr`` for the schedule.

    SGD runs its multi-tensor (``foreach``) form, which PyTorch picks by itself only on CUDA: one call per
    update for all parameters instead of one per parameter; on the CPU it performs the same per-tensor
    operations, so the results are bit for bit those of the plain loop (``tests/test_recipes.py``).
    """
    params = list(params)
    if recipe.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                                                     weight_decay=recipe.weight_decay, foreach=True)
    else:
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[recipe.optimizer]
        opt = cls(params, lr=recipe.lr, betas=(recipe.momentum, recipe.beta2), weight_decay=recipe.weight_decay)
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return opt


def lr_factor(recipe: Recipe, step: int, max_iters: int) -> float:
    """The multiplier of the initial learning rate at ``step`` (0-based) of a ``max_iters`` run.

    Warm-up (if any) rises linearly from ``1 / warm-up steps`` to 1; the schedule then runs over the
    remaining steps with ``t`` going from 0 to 1 (the step schedule counts from the start of the run).
    """
    max_iters = max(int(max_iters), 1)
    warm = int(round(recipe.warmup * max_iters))
    if step < warm:
        return (step + 1) / warm
    t = min((step - warm) / max(max_iters - warm, 1), 1.0)
    if recipe.schedule == "poly":
        return (1.0 - t) ** 0.9
    if recipe.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if recipe.schedule == "step":
        period = max(int(round(recipe.step_every * max_iters)), 1)
        return recipe.step_gamma ** (step // period)
    return 1.0


def stage_lr_factor(recipe: Recipe, step: int, max_iters: int, stage_start: int) -> float:
    """``lr_factor`` run anew from ``stage_start``: the schedule (warm-up included) covers the steps
    before it, then starts again over the rest of the run (a method whose official code trains its
    stages with separate schedules: SPCL's pre-training and fine-tuning, M&N's transition)."""
    if 0 < stage_start < max_iters and step >= stage_start:
        return lr_factor(recipe, step - stage_start, max_iters - stage_start)
    return lr_factor(recipe, step, stage_start if 0 < stage_start < max_iters else max_iters)


def horizon_of(decay: float, iters: int) -> float:
    """The EMA horizon of ``decay`` in a run of ``iters`` iterations, as a fraction of the run: 1 / ((1 - d) iters)."""
    if not 0 <= decay < 1 or iters < 1:
        raise ValueError(f"horizon_of: expected a decay in [0, 1) and iters >= 1, got {decay!r}, {iters!r}")
    return 1.0 / ((1.0 - decay) * iters)


def ema_decay_for(horizon: float, max_iters: int) -> float:
    """The EMA decay that averages over ``horizon * max_iters`` steps: ``1 - 1 / max(horizon * max_iters, 1)``."""
    if not horizon > 0:
        raise ValueError(f"ema_horizon: expected a fraction of the run > 0, got {horizon!r}")
    return 1.0 - 1.0 / max(horizon * max_iters, 1.0)

