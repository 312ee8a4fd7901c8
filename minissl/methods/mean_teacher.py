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

Recipe: the shared one by default; ``--recipe official`` gives SSL4MIS's (``code/train_mean_teacher_2D.py``,
``_3D.py``): SGD 0.01, momentum 0.9, weight decay 1e-4, poly ``(1 - t)^0.9`` over the run, the shared
recipe's values (the 3D script trains on BraTS 2019: SSL4MIS has no LA script). EMA: 0.99 over the
scripts' 30,000 iterations, ``ema_horizon`` = 1/300 of the run.

Where the official code differs, and what minissl does:
    * the 2D script sets the consistency loss to 0 for the first 1,000 iterations (1/30 of its run; the
      3D script has no such gate); minissl has no gate, the ramp-up alone keeps the early weight small;
    * its ramp takes the weight 0 -> 0.1 over the whole 30k-iteration run (``iter // 150`` up to 200,
      ``rampup = 1.0``); minissl uses the shared ``cfg.cons_weight`` / ``cfg.rampup`` (``configs/`` holds
      the published recipe);
    * noise ``n = clip(0.1 N(0, 1), -0.2, 0.2)`` on the teacher's input only, the student sees the clean
      batch, as in the code (the paper perturbs both inputs);
    * the EMA averages the parameters and leaves the teacher's BatchNorm statistics to its own
      training-mode passes; minissl's ``ema_update`` copies the student's buffers. The teacher runs in
      training mode in both (batch statistics), so this matters only for ``eval_teacher=True``;
    * SSL4MIS validates and tests the student; so does minissl by default (``eval_teacher=True``
      evaluates the teacher instead).

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
from ..recipes import Recipe
from .base import Method, ema_update, make_teacher, register


@dataclass
class MeanTeacherArgs:
    ema_horizon: float = 1 / 300  # 0.99 over 30,000 iterations (SSL4MIS code/train_mean_teacher_2D.py)
    noise_std: float = 0.1  # std of the Gaussian input noise
    noise_clip: float = 0.2  # the noise is clipped to [-clip, clip]
    eval_teacher: bool = False  # evaluate the EMA teacher instead of the student


@register("mean_teacher")
class MeanTeacher(Method):
    """Student + EMA teacher, softmax-MSE consistency on noisy unlabeled images."""

    Args = MeanTeacherArgs
    uses_label_mask = True
    official_recipes = {
        2: Recipe("sgd", 0.01, 0.9, 1e-4, "poly", source="HiLab-git/SSL4MIS code/train_mean_teacher_2D.py"),
        3: Recipe("sgd", 0.01, 0.9, 1e-4, "poly", source="HiLab-git/SSL4MIS code/train_mean_teacher_3D.py"),
    }

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
        sup = self.supervised_loss(logits[:bl], y_l, batch.get("label_mask"))
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
