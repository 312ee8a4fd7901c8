"""Uncertainty-Aware Mean Teacher, UA-MT (Yu et al., MICCAI 2019).

Idea: Mean Teacher asks the student to match the teacher everywhere, including where the teacher is
guessing. UA-MT estimates the teacher's uncertainty with Monte-Carlo dropout and keeps the consistency
loss only on voxels where the teacher is confident; the confidence bar is lowered (the entropy
threshold raised) as the teacher improves.

Equations, with ``f_s`` the student, ``f_t`` the EMA teacher, ``sigma`` the softmax, ``n`` clipped noise:

    mu        = 1/T sum_{k=1..T} sigma f_t(x_u + n_k)          (T noisy passes, dropout on)
    u         = -sum_c mu_c ln mu_c                            (predictive entropy per voxel)
    H(t)      = (0.75 + 0.25 ramp(t)) ln C                     (ramp = exp(-5 (1 - t)^2), t = step / max_iters)
    m         = 1[u < H(t)]
    L_cons    = sum_i m_i sum_c (sigma f_s(x_u)_ic - sigma f_t(x_u + n)_ic)^2 / (C sum_i m_i)
    L         = L_sup(f_s(x_l), y_l) + w(t) L_cons,     w(t) = cons_weight ramp(step / (rampup max_iters))

Algorithm (per iteration):
    1. student logits on ``[x_l; x_u]``; supervised ``0.5 (CE + Dice)`` on the labeled part;
    2. teacher softmax on ``x_u + n`` (the consistency target, no gradient);
    3. T more teacher passes on ``x_u + n_k`` (one batch of T * Bu images) -> mean -> entropy map ``u``;
    4. mask ``m = u < H(t)``; masked softmax-MSE between student and teacher, weighted by ``w(t)``;
    5. SGD step on the student, then the EMA update of the teacher (``after_step``, from Mean Teacher).

The teacher runs in training mode (dropout on, batch-norm batch statistics), as in the official code
where the EMA model is never switched to eval; this is what makes the T passes differ beyond the noise.

Schedules (fractions of ``max_iters``): the threshold ramps over the whole run
(``threshold_rampup = 1.0``, official ``sigmoid_rampup(iter, max_iterations)``); the consistency weight
uses the shared ``cfg.cons_weight`` / ``cfg.rampup`` (official: 0.1 ramped over ``iter // 150``, up to 40 in
the LA script and 200 in SSL4MIS's 2D one, i.e. over the whole run in both; minissl default 40 %).

Recipe: the shared one by default; ``--recipe official`` gives, in 2D, SSL4MIS's
``code/train_uncertainty_aware_mean_teacher_2D.py`` (SGD 0.01, momentum 0.9, weight decay 1e-4, poly over
the run) and, in 3D, the UA-MT LA script ``code/train_LA_meanteacher_certainty_unlabel.py`` (the same SGD,
the rate x0.1 every 2,500 of its 6,000 iterations: a step schedule with period 5/12 of the run).
EMA: 0.99 over the LA script's 6,000 iterations, ``ema_horizon`` = 1/60 of the run (SSL4MIS's 2D script:
0.99 over 30,000, 1/300).

Paper: L. Yu, S. Wang, X. Li, C.-W. Fu, P.-A. Heng, "Uncertainty-aware Self-ensembling Model for
Semi-supervised 3D Left Atrium Segmentation", MICCAI 2019, arXiv:1907.07034.
Official code: https://github.com/yulequan/UA-MT (3D LA, binary) and https://github.com/HiLab-git/SSL4MIS
``code/train_uncertainty_aware_mean_teacher_2D/3D.py``.

Where the code differs from the paper or from minissl, and what minissl follows:
    * The paper writes the masked loss as ``sum m (p_s - p_t)^2 / sum m``; the code divides by
      ``2 sum m``, i.e. it averages over the C = 2 channels of the binary LA task. minissl divides by
      ``C sum m`` (``losses.consistency_mse`` with the mask as weight): identical to the code for
      binary suites, and still a per-voxel mean for C > 2.
    * The threshold is ``(0.75 + 0.25 ramp) ln 2`` in the code, also in SSL4MIS's 4-class ACDC script
      (where ln 2 is half of the maximal entropy ln 4, and the loss is ``C / 2 = 2`` times the channel
      mean). minissl uses ``ln C``, the paper's "maximal uncertainty"; ``ssl4mis_constants=True``
      reproduces the hard-coded ``ln 2`` and ``2 sum m`` for any C. With ``ln C`` the bar starts at three
      quarters of the maximal entropy and ends at the maximum, which only a uniform prediction reaches:
      on a 4-class suite (``cardiac``) the mask keeps almost every voxel after the first few dozen
      iterations (``mask_ratio`` of a default 600-iteration cardiac run, seed 0: 48 % at iteration 20,
      87 % at 40, 96 % at 120, 99 % at 220), so there UA-MT is Mean Teacher by construction; with two
      classes ``ln C = ln 2`` and the code's masking is unchanged.
    * The LA script's supervised loss is CE + a foreground-only Dice (squared, pooled over the batch);
      SSL4MIS's 2D script uses its ``DiceLoss`` over all classes, which minissl uses in 2D and 3D
      (``Method.supervised_loss``).
    * The code runs T/2 passes of a doubled batch (same statistics); minissl runs one batch of T * Bu.
    * The student sees the clean ``x_u`` (only the teacher inputs are noisy), as in the code.
    * The EMA averages the parameters only (the teacher's BatchNorm statistics are its own, unused: it
      runs in training mode); minissl's ``ema_update`` copies the student's buffers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import losses
from ..recipes import Recipe
from .base import register, sigmoid_rampup
from .mean_teacher import MeanTeacher, MeanTeacherArgs


def uncertainty_threshold(progress: float, num_classes: int, rampup: float = 1.0,
                          ssl4mis_constants: bool = False) -> float:
    """Entropy threshold ``H(t) = (0.75 + 0.25 ramp(t)) ln C`` (``ln 2`` with ``ssl4mis_constants``).

    Args:
        progress: ``step / max_iters``.
        num_classes: C (the maximal entropy of a C-class softmax is ln C).
        rampup: ramp length as a fraction of the run.
        ssl4mis_constants: use the official code's ``ln 2`` whatever C.
    """
    log_c = math.log(2 if ssl4mis_constants else max(num_classes, 2))
    return (0.75 + 0.25 * sigmoid_rampup(progress, rampup)) * log_c


def predictive_entropy(probs: Tensor, eps: float = 1e-6) -> Tensor:
    """Entropy of the mean of T probability maps, ``-sum_c mu_c ln(mu_c + eps)`` (eps as the official code).

    Args:
        probs: (T, B, C, *S) softmax outputs of T stochastic passes.

    Returns:
        (B, *S) entropy in nats.
    """
    if probs.ndim not in (5, 6):
        raise ValueError(f"predictive_entropy: expected probs (T, B, C, *S) with 2 or 3 spatial dims, "
                         f"got shape {tuple(probs.shape)}")
    mu = probs.mean(0)  # (B, C, *S)
    return -(mu * torch.log(mu + eps)).sum(1)  # (B, *S)


@dataclass
class UAMTArgs(MeanTeacherArgs):
    ema_horizon: float = 1 / 60  # 0.99 over 6,000 iterations (UA-MT code/train_LA_meanteacher_certainty_unlabel.py)
    mc_passes: int = 8  # T: noisy dropout passes of the teacher for the uncertainty
    threshold_rampup: float = 1.0  # the entropy threshold ramps 0.75 -> 1.0 ln C over this fraction of the run
    ssl4mis_constants: bool = False  # official ln 2 threshold and 2 sum(mask) normaliser whatever C


@register("ua_mt")
class UAMT(MeanTeacher):
    """Mean Teacher whose consistency is masked by the teacher's Monte-Carlo uncertainty."""

    Args = UAMTArgs
    official_recipes = {
        2: Recipe("sgd", 0.01, 0.9, 1e-4, "poly",
                  source="HiLab-git/SSL4MIS code/train_uncertainty_aware_mean_teacher_2D.py"),
        3: Recipe("sgd", 0.01, 0.9, 1e-4, "step", step_every=2500 / 6000, step_gamma=0.1,
                  source="yulequan/UA-MT code/train_LA_meanteacher_certainty_unlabel.py"),
    }

    @torch.no_grad()
    def uncertainty(self, x_u: Tensor) -> Tensor:
        """Teacher predictive entropy over ``mc_passes`` noisy passes of ``x_u`` (B, 1, *S) -> (B, *S)."""
        t = self.args.mc_passes
        x_rep = x_u.repeat(t, *(1,) * (x_u.ndim - 1))  # (T B, 1, *S): pass k = rows k B .. (k+1) B
        probs = torch.softmax(self.teacher(x_rep + self.noise(x_rep)), dim=1)  # (T B, C, *S)
        return predictive_entropy(probs.view(t, *x_u.shape[:1], *probs.shape[1:]))  # (B, *S)

    def threshold(self, step: int) -> float:
        """The entropy threshold at ``step``."""
        return uncertainty_threshold(self.progress(step), self.num_classes, self.args.threshold_rampup,
                                     self.args.ssl4mis_constants)

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x_l, y_l, x_u = batch["x_l"], batch["y_l"], batch["x_u"]
        bl = x_l.shape[0]
        logits = self.student(torch.cat([x_l, x_u]))  # (Bl + Bu, C, *S)
        sup = self.supervised_loss(logits[:bl], y_l, batch.get("label_mask"))
        with torch.no_grad():
            probs_t = torch.softmax(self.teacher(x_u + self.noise(x_u)), dim=1)  # (Bu, C, *S)
            mask = (self.uncertainty(x_u) < self.threshold(step)).to(logits.dtype)  # (Bu, *S)
        unsup = losses.consistency_mse(logits[bl:], probs_t, weight=mask)
        if self.args.ssl4mis_constants:
            unsup = unsup * (self.num_classes / 2)  # sum m (p - q)^2 / (2 sum m)
        w = self.cons_weight(step)
        return {"loss": sup + w * unsup, "sup": sup, "unsup": unsup, "w": torch.tensor(w),
                "mask_ratio": mask.mean()}
