"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017), as used for segmentation by SSL4MIS.

Idea: a teacher whose weights are an exponential moving average (EMA) of the student's gives more
stable targets than the student itself. On unlabeled images the student is asked to agree with the
teacher under different input noise.

Equations, with ``f_s`` the student, ``f_t`` the teacher, ``sigma`` the softmax and ``n`` noise:

    L     = L_sup(f_s(x_l), y_l) + w(t) * mean( (sigma f_s(x_u) - sigma f_t(x_u + n))^2 )
    theta_t <- a theta_t + (1 - a) theta_s,   a = min(1 - 1/(step + 1), ema_decay)
    w(t)  = cons_weight * exp(-5 (1 - t / rampup)^2)          (t = step / max_iters)

Algorithm (per iteration):
    1. student logits on ``[x_l; x_u]``; supervised loss on the labeled half;
    2. teacher probabilities on ``x_u + n`` (no gradient);
    3. consistency MSE between the two softmaxes on the unlabeled images, weighted by ``w(t)``;
    4. SGD step on the student, then the EMA update of the teacher.
SSL4MIS validates and tests the student; so does minissl by default (``eval_teacher=True``
evaluates the teacher instead).

Noise: ``n = clip(0.1 * N(0, 1), -0.2, 0.2)`` on the teacher's input only; the student sees the clean
batch (SSL4MIS ``train_mean_teacher_2D.py``; the paper perturbs both inputs).
Schedule: SSL4MIS ramps the weight 0 -> 0.1 over the whole 30k-iteration run (``rampup = 1.0``); the
minissl default is ``rampup = 0.4`` so short CPU runs reach the full weight (``configs/`` holds the
published recipe).

Paper: A. Tarvainen, H. Valpola, "Mean teachers are better role models: Weight-averaged consistency
targets improve semi-supervised deep learning results", NeurIPS 2017, arXiv:1703.01780
(code: https://github.com/CuriousAI/mean-teacher). Code followed for the segmentation recipe:
https://github.com/HiLab-git/SSL4MIS ``code/train_mean_teacher_2D.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import losses
from .base import Method, ema_update, make_teacher, register


@dataclass
class MeanTeacherArgs:
    ema_horizon: float = 1 / 300  # fraction of the run: EMA 0.99 over 30,000 iterations (SSL4MIS MT 2D)
    noise_std: float = 0.1  # std of the Gaussian input noise
    noise_clip: float = 0.2  # the noise is clipped to [-clip, clip]
    eval_teacher: bool = False  # evaluate the EMA teacher instead of the student


@register("mean_teacher")
class MeanTeacher(Method):
    """Student + EMA teacher, softmax-MSE consistency on noisy unlabeled images."""

    Args = MeanTeacherArgs

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        self.teacher = make_teacher(self.student)

    def noise(self, x: Tensor) -> Tensor:
        """Clipped Gaussian noise drawn from the method's generator (resumable)."""
        n = torch.randn(x.shape, generator=self.rng).to(x.device) * self.args.noise_std
        return n.clamp(-self.args.noise_clip, self.args.noise_clip)

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x_l, y_l, x_u = batch["x_l"], batch["y_l"], batch["x_u"]
        bl = x_l.shape[0]
        logits = self.student(torch.cat([x_l, x_u]))  # (Bl + Bu, C, *S)
        sup = self.supervised_loss(logits[:bl], y_l)
        with torch.no_grad():
            probs_t = torch.softmax(self.teacher(x_u + self.noise(x_u)), dim=1)  # (Bu, C, *S)
        unsup = losses.consistency_mse(logits[bl:], probs_t)
        w = self.cons_weight(step)
        return {"loss": sup + w * unsup, "sup": sup, "unsup": unsup, "w": torch.tensor(w)}

    def after_step(self, step: int) -> None:
        ema_update(self.teacher, self.student, self.ema_decay(), step)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return (self.teacher if self.args.eval_teacher else self.student)(x)
