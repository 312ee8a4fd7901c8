"""The Method interface, the registry, and the helpers every method shares (defined once here).

A method is an ``nn.Module`` that owns its networks (student, EMA teacher, peers ...). The one
training loop (``minissl.engine``) calls, per iteration::

    logs = method.update(batch, step)   # default: zero_grad -> training_step -> backward -> step -> after_step

``batch`` is ``{'x_l': (Bl, 1, *S), 'y_l': (Bl, *S) int64, 'x_u': (Bu, 1, *S)}``, plus ``'label_mask':
(Bl, *S)`` (1 where ``y_l`` is ground truth) under a sparse-slice budget; no ``label_mask`` means every
labeled voxel is ground truth, and the losses on ``y_l`` take it as their voxel weight. A method with an
unusual update (several optimisers, inner passes, alternating models) overrides ``update``; the
engine stays the same. ``predict(x)`` returns the logits used for evaluation.

Shared helpers: ``sigmoid_rampup`` (the SSL4MIS ramp ``exp(-5 (1 - t)^2)`` over a fraction of the
run), ``ema_update`` (the Mean-Teacher EMA), ``supervised_loss`` (SSL4MIS's ``0.5 (CE + Dice)``),
``labeled_unlabeled_mixes`` (the two labeled/unlabeled copy-paste mixes of BCP and M3HL).

Recipe (:mod:`minissl.recipes`): ``self.recipe`` is the shared recipe unless ``cfg.recipe`` asks for the
official one (``official_recipes[spatial_dims]``); ``optimizers`` builds from it and the engine scales
every parameter group's ``initial_lr`` by ``lr_factor(step)``. A method whose run has stages (BCP's
labeled pre-training) lists their last steps in ``stage_ends``; the engine validates there and hands
``end_stage`` the best-on-validation state of the stage that ended.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .. import losses, ops
from ..config import Config, resolve_args
from ..nets import UNet
from ..recipes import Recipe, ema_decay_for, lr_factor, make_optimizer, shared_recipe

METHODS: dict[str, type["Method"]] = {}


def register(name: str):
    """Class decorator adding a Method subclass to the registry under ``name``."""

    def deco(cls: type["Method"]) -> type["Method"]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> type["Method"]:
    """Look a method up by name; the error lists the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: expected one of {sorted(METHODS)}")
    return METHODS[name]


def sigmoid_rampup(progress: float, length: float) -> float:
    """Sigmoid ramp-up ``exp(-5 (1 - t)^2)`` with ``t = clip(progress / length, 0, 1)``.

    Args:
        progress: fraction of the run done, ``step / max_iters``.
        length: ramp-up length as a fraction of the run (0 means no ramp: always 1).
    """
    if length <= 0:
        return 1.0
    t = min(max(progress / length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, step: int) -> None:
    """Mean-Teacher update ``theta_t <- a theta_t + (1 - a) theta_s`` with ``a = min(1 - 1/(step+1), decay)``.

    The warm-up ``1 - 1/(step+1)`` makes the teacher track the student closely in the first steps
    (Tarvainen & Valpola 2017; SSL4MIS). Buffers (BatchNorm statistics) are copied.
    """
    a = min(1.0 - 1.0 / (step + 1), decay)
    with torch.no_grad():  # multi-tensor calls: the same per-tensor arithmetic, ~150 Python calls fewer
        teacher_params, teacher_buffers = list(teacher.parameters()), list(teacher.buffers())
        if teacher_params:
            torch._foreach_mul_(teacher_params, a)
            torch._foreach_add_(teacher_params, list(student.parameters()), alpha=1.0 - a)
        if teacher_buffers:
            torch._foreach_copy_(teacher_buffers, list(student.buffers()))


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student`` to be updated only by ``ema_update``."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def labeled_unlabeled_mixes(x_l: Tensor, y_l: Tensor, x_u: Tensor, pseudo: Tensor, *, paste_labeled: bool,
                            boxes: Optional[Tensor] = None, blocks: Optional[Tensor] = None,
                            label_mask: Optional[Tensor] = None) -> list[list[Tensor]]:
    """The two copy-paste mixes of labeled and unlabeled halves (BCP's bidirectional, M3HL's mutual mix).

    Each batch splits into a half ``a`` (first n rows) and ``b`` (next n rows). With R the region
    (boxes or blocks, one per pair of rows):

        paste_labeled=True  (BCP):   X_1 = L_a in R, U_a outside;   X_2 = U_b in R, L_b outside
        paste_labeled=False (M3HL):  X_1 = U_a in R, L_a outside;   X_2 = L_b in R, U_b outside

    Targets travel with the images (Y for labeled content, the pseudo-labels PL for unlabeled
    content), and so does a map that is 1 where the target is ground truth.

    Args:
        x_l, x_u: (2n, 1, *S) labeled and unlabeled images. y_l, pseudo: (2n, *S) int64 labels and
            pseudo-labels of those images.
        paste_labeled: whether the labeled image of the first mix fills the region.
        boxes: (n, 2*sd) int64 boxes, or blocks: (n, *G) bool block masks (exactly one).
        label_mask: optional (2n, *S) float, 1 where ``y_l`` is ground truth (a sparse-slice budget).

    Returns:
        ``[x (n, 1, *S), target (n, *S) int64, gt_region (n, *S) float]`` for X_1, then for X_2; with
        ``label_mask`` each list ends with ``known (n, *S)``: ``label_mask`` on labeled content, 1 elsewhere.
    """
    if not (x_l.shape[0] == y_l.shape[0] == x_u.shape[0] == pseudo.shape[0]) or x_l.shape[0] % 2 or not x_l.shape[0]:
        raise ValueError(f"labeled_unlabeled_mixes: expected x_l, y_l, x_u, pseudo with the same positive even "
                         f"number of rows, got {x_l.shape[0]}, {y_l.shape[0]}, {x_u.shape[0]}, {pseudo.shape[0]}")
    (l_a, l_b), (y_a, y_b), (u_a, u_b), (pl_a, pl_b) = (t.chunk(2) for t in (x_l, y_l, x_u, pseudo))
    one, zero = torch.ones_like(y_a, dtype=x_l.dtype), torch.zeros_like(y_a, dtype=x_l.dtype)  # (n, *S)
    k_a, k_b = (one, one) if label_mask is None else label_mask.to(x_l.dtype).chunk(2)  # (n, *S) each
    pairs = [([u_a, pl_a, zero, one], [l_a, y_a, one, k_a]),
             ([l_b, y_b, one, k_b], [u_b, pl_b, zero, one])]  # (outside, inside)
    if not paste_labeled:
        pairs = [(inside, outside) for outside, inside in pairs]
    mixes = [ops.mix(outside, inside, boxes=boxes, blocks=blocks) for outside, inside in pairs]
    return mixes if label_mask is not None else [m[:3] for m in mixes]


@dataclass
class NoArgs:
    """A method without options of its own."""


class Method(nn.Module):
    """Base class: builds the student UNet, an SGD optimiser, and the default update.

    Subclasses set ``Args`` (a dataclass of their hyper-parameters, defaults from the paper) and
    implement ``training_step``. ``self.args`` is the resolved Args; ``self.rng`` is a
    ``torch.Generator`` for every random draw of the method (boxes, masks), saved in checkpoints
    so that a resumed run continues exactly.
    """

    name: ClassVar[str] = "base"
    Args: ClassVar[type] = NoArgs
    semi_supervised: ClassVar[bool] = True  # False: the loader gives no unlabeled images
    official_recipes: ClassVar[dict[int, Recipe]] = {}  # spatial_dims -> the official code's recipe (2: ACDC, 3: LA)
    has_uncertainty: ClassVar[bool] = False  # True: ``uncertainty(x)`` gives a voxel-wise map
    uses_label_mask: ClassVar[bool] = False  # True: its losses on y_l take batch['label_mask'] (3D sparse slices)

    @classmethod
    def applies_to(cls, spec: Any) -> Optional[str]:
        """None when the method can train on a suite of this spec, else why not (e.g. "2D binary suites only")."""
        return None

    def __init__(self, cfg: Config, spec: Any):
        super().__init__()
        reason = self.applies_to(spec)
        if reason is not None:
            raise ValueError(f"{self.name}: does not apply to suite {getattr(spec, 'name', '?')!r}: {reason}")
        self.cfg, self.spec = cfg, spec
        self.args = resolve_args(self.Args, cfg.method_args, self.name)
        self.num_classes = int(spec.num_classes)
        self.spatial_dims = int(spec.spatial_dims)
        self.max_iters = int(cfg.max_iters)
        self.rng = torch.Generator().manual_seed(cfg.seed * 1000 + 17)
        self.recipe = resolve_recipe(cfg, self.name, self.spatial_dims)
        self.student = self.make_net()

    # --- construction helpers
    def make_net(self, **kwargs: Any) -> UNet:
        """A UNet for this suite (kwargs override, e.g. ``up_modes=("transpose", "linear")``)."""
        opts = dict(in_channels=1, num_classes=self.num_classes, spatial_dims=self.spatial_dims,
                    width=self.cfg.width, depth=self.cfg.depth)
        return UNet(**(opts | kwargs))

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """One optimiser of the run's recipe over every trainable parameter (EMA teachers are frozen)."""
        return [make_optimizer((p for p in self.parameters() if p.requires_grad), self.recipe)]

    def resolved_args(self) -> dict:
        """The method's resolved hyper-parameters (saved beside the config)."""
        return asdict(self.args)

    # --- schedule helpers (fractions of max_iters)
    def progress(self, step: int) -> float:
        """Fraction of the run done at ``step``."""
        return step / max(self.max_iters, 1)

    def lr_factor(self, step: int) -> float:
        """Multiplier of every parameter group's ``initial_lr`` at ``step`` (the recipe's schedule)."""
        return lr_factor(self.recipe, step, self.max_iters)

    def ema_decay(self) -> float:
        """The EMA decay of this run: ``cfg.ema_decay`` if given, else from the method's ``ema_horizon``."""
        if self.cfg.ema_decay is not None:
            return float(self.cfg.ema_decay)
        horizon = getattr(self.args, "ema_horizon", None)
        if horizon is None:
            raise ValueError(f"{self.name}: expected an ema_horizon in the method's Args or --ema_decay, got neither")
        return ema_decay_for(horizon, self.max_iters)

    def stage_ends(self) -> list[int]:
        """Iterations (1-based counts) after which a stage of the run ends; none by default."""
        return []

    def end_stage(self, step: int, best_state: dict[str, Tensor], optimizers: list[torch.optim.Optimizer]) -> None:
        """Called by the engine after iteration ``step`` ends a stage, with the stage's best-on-validation state
        and the optimisers restored to their state at that same iteration."""

    def cons_weight(self, step: int) -> float:
        """``cfg.cons_weight`` times the sigmoid ramp-up over ``cfg.rampup`` of the run."""
        return self.cfg.cons_weight * sigmoid_rampup(self.progress(step), self.cfg.rampup)

    # --- the training protocol
    def supervised_loss(self, logits: Tensor, y: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """SSL4MIS's supervised loss ``0.5 (CE + Dice)``.

        Dice is SSL4MIS's ``DiceLoss``: per class ``1 - (2 sum p y + 1e-5) / (sum p^2 + sum y^2 + 1e-5)``
        with the sums pooled over the whole batch, averaged over all classes (background included).
        ``mask`` (B, *S) is the voxel weight of both terms (``batch['label_mask']``: 0 removes a voxel
        whose label is unknown).
        """
        return losses.dice_ce_loss(logits, y, mask, lambda_dice=0.5, lambda_ce=0.5, squared=True, batch=True)

    def fill_labels(self, label: np.ndarray) -> np.ndarray:
        """The label to train on for a sparsely annotated case (``--budget_kind slices:k``), before training.

        Args:
            label: (Z, Y, X) uint8, ``data.datasets.IGNORE`` on the voxels whose label is hidden.

        Returns:
            (Z, Y, X) uint8, ``IGNORE`` where still unknown; by default ``label`` unchanged.
        """
        return label

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """Return ``{'loss': total, <part>: value, ...}`` for one batch."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after the optimiser step (EMA updates go here)."""

    def update(self, batch: dict[str, Tensor], step: int, optimizers: list[torch.optim.Optimizer]) -> dict[str, float]:
        """One iteration: zero_grad, training_step, backward, optimiser step(s), after_step."""
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        out = self.training_step(batch, step)
        out["loss"].backward()
        for opt in optimizers:
            opt.step()
        self.after_step(step)
        return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Logits used for evaluation, ``(B, C, *S)``; the student by default."""
        return self.student(x)

    @torch.no_grad()
    def uncertainty(self, x: Tensor) -> Tensor:
        """A voxel-wise uncertainty map ``(B, *S)`` for methods with ``has_uncertainty``."""
        raise ValueError(f"method {self.name!r} has no uncertainty map: expected one of the methods with "
                         f"has_uncertainty = True, got {self.name!r}")


def resolve_recipe(cfg: Config, method: str, spatial_dims: int) -> Recipe:
    """The run's recipe: the shared one from ``cfg``, or the official one of ``method`` (or of the method
    named in ``cfg.recipe = "official:<name>"``) for ``spatial_dims``.

    Raises:
        ValueError: the method has no official recipe for this dimension, or the name is unknown.
    """
    if cfg.recipe == "shared":
        return shared_recipe(cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_schedule)
    owner = cfg.recipe.split(":", 1)[1] if ":" in cfg.recipe else method
    table = get_method(owner).official_recipes
    if spatial_dims not in table:
        raise ValueError(f"--recipe {cfg.recipe}: method {owner!r} has no official {spatial_dims}D recipe "
                         f"(it has {sorted(table) or 'none'}); expected --recipe shared")
    return table[spatial_dims]
