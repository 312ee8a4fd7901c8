"""BCP: Bidirectional Copy-Paste (Bai et al., CVPR 2023), mean-teacher self-training after a labeled pre-stage.

Idea: labeled and unlabeled images come from the same distribution, but a network trained on few
labeled images learns their "labeled" statistics only. BCP closes the gap by pasting a large box of
a labeled image into an unlabeled one and a box of an unlabeled image into a labeled one, so that
every training image holds both kinds of content, supervised by ground truth (GT) on the labeled
part and by the teacher's pseudo-labels (PL) on the unlabeled part.

Equations (one box per batch, M = 1 outside the box, 0 inside; sizes 2/3 of every side):

    X_in  = U_a * M + L_a * (1 - M)          Y_in  = PL_a * M + Y_a * (1 - M)
    X_out = L_b * M + U_b * (1 - M)          Y_out = Y_b * M + PL_b * (1 - M)
    PL    = largest_component(argmax f_t(U))  (per class, per image)
    L     = sum_{X in {X_in, X_out}} [ 1.0 * l(f_s(X), Y; GT region) + 0.5 * l(f_s(X), Y; PL region) ]
    l(., .; R) = (Dice_R + CE_R) / 2,   each normalised over its own region R (``losses.copy_paste_loss``)

Dice_R is BCP's masked Dice: squared denominators, sums pooled over the batch, smooth 1e-10, mean
over all classes including the background; CE_R is the mean cross-entropy over the voxels of R.

Algorithm:
    stage 1 (first ``pretrain`` = 25 % of max_iters; BCP: 10k of 40k iterations), labeled only:
        X = L_a * M + L_b * (1 - M), targets Y_a / Y_b, both regions weight 1.0;
    switch (``stage_ends`` / ``end_stage``): the engine validates at the end of stage 1 and hands
        over the best-on-validation stage-1 state, with the optimiser restored to that same step;
        student and teacher start from those weights (the official code loads its best pre-trained
        checkpoint into both networks); the SGD momentum is cleared or kept as below;
    stage 2 (the remaining 75 %; BCP: 30k), per iteration:
        1. teacher pseudo-labels PL_a, PL_b of the unlabeled halves (argmax + largest component);
        2. one box, the two bidirectional mixes X_in, X_out with their targets and GT-region maps
           (``labeled_unlabeled_mixes``: one ``ops.mix`` call each, images, targets and region maps together);
        3. student logits of X_in and X_out (two forward passes, as in the code: BatchNorm sees each
           mixed batch alone); loss above; SGD step; EMA update of the teacher (``ema_horizon``).

Reported parts: ``sup`` = the GT-region loss, ``unsup`` = the PL-region loss before its weight
``u_weight`` (0 during stage 1), ``loss = sup + u_weight * unsup``. The student is evaluated.

Paper: Y. Bai, D. Chen, Q. Li, W. Shen, Y. Wang, "Bidirectional Copy-Paste for Semi-Supervised
Medical Image Segmentation", CVPR 2023, arXiv:2305.00673.
Code: https://github.com/DeepMed-Lab-ECNU/BCP (``code/ACDC_BCP_train.py``).

Recipe and stage switch. The official scripts differ from each other:
    * ACDC (``code/ACDC_BCP_train.py``): SGD 0.01, momentum 0.9, weight decay 1e-4, a constant rate in
      both stages; stage 2 restores the optimiser state saved with the best stage-1 checkpoint (momentum
      kept);
    * LA (``code/LA_BCP_train.py``): stage 1 at a constant 0.01; stage 2 builds a new optimiser (momentum
      cleared) and multiplies the rate by 0.1 every 2,500 of its 15,000 iterations (1/6 of stage 2).
``--recipe official`` follows them: the 2D recipe is the ACDC one (constant rate, momentum kept), the
3D recipe the LA one (``BCP.lr_factor`` runs the step schedule over stage 2 only, counted from the
switch, at the full rate in stage 1; momentum cleared). The shared recipe runs one poly schedule over
the whole run (the switch does not restart it) and clears the momentum at the switch: stage 2 trains a
new objective from weights chosen by validation. ``keep_momentum`` overrides the choice in any recipe.
A supervised baseline on ``--recipe official:bcp`` has no stage: in 3D its step schedule counts from the
start of its run.

Where the official code differs otherwise, and what minissl does:
    * the EMA uses a constant 0.99 (no warm-up); the ACDC script averages the whole state dict, BatchNorm
      statistics included, the LA script the parameters only; minissl uses the shared ``ema_update``
      (buffers copied; its warm-up ``min(1 - 1/(step+1), decay)`` counts from the start of the run, so in
      stage 2 it is the constant decay) with ``ema_horizon`` = 1/400: 0.99 over the 40,000 iterations of
      the ACDC run (LA: 0.99 over 17,000, 1/170);
    * the LA script pre-trains 2,000 and self-trains 15,000 iterations (a pre-training fraction of 0.12);
      ``pretrain`` stays at the ACDC fraction 0.25 in 2D and 3D;
    * both scripts pick the stage-1 checkpoint on validation Dice every 200 iterations (LA: on the test
      volumes); minissl's engine validates every ``val_every`` iterations and at the switch, on the
      validation split;
    * the LA (3D) script thresholds the foreground softmax at 0.5 (= argmax for two classes) and uses a
      per-sample, non-squared Dice; minissl uses the ACDC loss in 2D and 3D alike;
    * the box offset is drawn with ``randint(0, H - h)`` (the last position is never drawn);
      ``ops.bcp_box`` draws every position where the box fits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import losses, ops
from ..recipes import Recipe, lr_factor
from .base import Method, ema_update, labeled_unlabeled_mixes, make_teacher, register


@dataclass
class BCPArgs:
    ema_horizon: float = 1 / 400  # 0.99 over 40,000 iterations, 10k + 30k (BCP code/ACDC_BCP_train.py)
    pretrain: float = 0.25  # labeled-only copy-paste stage, fraction of max_iters (BCP: 10k of 40k)
    box_ratio: float = 2 / 3  # side of the pasted box, fraction of every spatial dim
    u_weight: float = 0.5  # loss weight of the pseudo-labelled region (the GT region has 1.0)
    keep_momentum: Optional[bool] = None  # at the switch; None: kept under the official 2D (ACDC) recipe only


@register("bcp")
class BCP(Method):
    """Labeled copy-paste pre-training, then mean-teacher self-training with bidirectional copy-paste."""

    Args = BCPArgs
    uses_label_mask = True
    official_recipes = {
        2: Recipe("sgd", 0.01, 0.9, 1e-4, "constant", source="DeepMed-Lab-ECNU/BCP code/ACDC_BCP_train.py"),
        3: Recipe("sgd", 0.01, 0.9, 1e-4, "step", step_every=1 / 6, step_gamma=0.1,  # of stage 2: 2,500 of 15,000
                  source="DeepMed-Lab-ECNU/BCP code/LA_BCP_train.py"),
    }

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        self.teacher = make_teacher(self.student)
        self.pretrain_iters = int(round(self.args.pretrain * self.max_iters))

    def box(self, x: Tensor) -> Tensor:
        """One BCP box for the whole batch (the same for every sample), (B, 2*sd) int64."""
        return ops.bcp_box(x.shape[2:], x.shape[0], self.rng, ratio=self.args.box_ratio)

    @torch.no_grad()
    def pseudo_labels(self, x_u: Tensor) -> Tensor:
        """Teacher argmax cleaned to the largest component of each class, (B, *S) int64."""
        return ops.largest_component(self.teacher(x_u).argmax(1), self.num_classes)

    def pretrain_step(self, x_l: Tensor, y_l: Tensor, known: Tensor) -> dict[str, Tensor]:
        """Stage 1: L_a outside the box, L_b inside, both regions ground truth with weight 1."""
        n = x_l.shape[0] // 2
        (l_a, l_b), (y_a, y_b), (k_a, k_b) = (t[:2 * n].chunk(2) for t in (x_l, y_l, known))
        boxes = self.box(l_a)
        x, y, k = ops.mix([l_a, y_a, k_a], [l_b, y_b, k_b], boxes=boxes)  # (n, 1, *S), (n, *S), (n, *S)
        outside = 1.0 - ops.region_mask(x.shape[2:], boxes=boxes).to(x.dtype)  # (n, *S)
        region_a, region_b = losses.copy_paste_loss(self.student(x), y, outside, k)
        sup = region_a + region_b
        zero = sup.new_zeros(())
        return {"loss": sup, "sup": sup, "unsup": zero, "w": zero}

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x_l, y_l, x_u = batch["x_l"], batch["y_l"], batch["x_u"]
        known = batch.get("label_mask", torch.ones_like(y_l, dtype=x_l.dtype))  # (Bl, *S) 1 on ground truth
        if x_l.shape[0] < 2:
            raise ValueError(f"bcp: expected at least 2 labeled images per batch (two halves), got {x_l.shape[0]}")
        if step < self.pretrain_iters:
            return self.pretrain_step(x_l, y_l, known)
        n = min(x_l.shape[0], x_u.shape[0]) // 2
        if n < 1:
            raise ValueError(f"bcp: expected at least 2 labeled and 2 unlabeled images, got {x_l.shape[0]} "
                             f"and {x_u.shape[0]}")
        x_l, y_l, x_u = x_l[:2 * n], y_l[:2 * n], x_u[:2 * n]
        pseudo = torch.cat([self.pseudo_labels(u) for u in x_u.chunk(2)])  # (2n, *S), one teacher pass per half
        mixes = labeled_unlabeled_mixes(x_l, y_l, x_u, pseudo, paste_labeled=True, boxes=self.box(x_l[:n]),
                                        label_mask=known[:2 * n])
        sup, unsup = x_l.new_zeros(()), x_l.new_zeros(())
        for x, y, gt_region, k in mixes:  # X_in, X_out
            gt, pl = losses.copy_paste_loss(self.student(x), y, gt_region, k)
            sup, unsup = sup + gt, unsup + pl
        w = self.args.u_weight
        return {"loss": sup + w * unsup, "sup": sup, "unsup": unsup, "w": torch.tensor(w)}

    def stage_ends(self) -> list[int]:
        """The labeled stage ends after ``pretrain_iters`` iterations."""
        return [self.pretrain_iters] if 0 < self.pretrain_iters < self.max_iters else []

    def lr_factor(self, step: int) -> float:
        """The recipe's schedule; a step schedule (the LA script) keeps the full rate in stage 1 and restarts
        at the switch, its period a fraction of stage 2. Other schedules run over the whole run."""
        if self.recipe.schedule != "step" or not self.stage_ends():
            return super().lr_factor(step)
        if step < self.pretrain_iters:
            return 1.0
        return lr_factor(self.recipe, step - self.pretrain_iters, self.max_iters - self.pretrain_iters)

    def keeps_momentum(self) -> bool:
        """Whether the switch keeps the optimiser state: ``keep_momentum`` if set, else only under the ACDC recipe."""
        if self.args.keep_momentum is not None:
            return self.args.keep_momentum
        return self.recipe == self.official_recipes[2]

    def end_stage(self, step: int, best_state: dict[str, Tensor], optimizers: list[torch.optim.Optimizer]) -> None:
        """Stage switch: student and teacher <- the best-on-validation stage-1 student; the optimisers (which
        the engine restored to that step) keep their momentum or start afresh (``keeps_momentum``)."""
        self.load_state_dict(best_state)
        self.teacher.load_state_dict(self.student.state_dict())
        if not self.keeps_momentum():
            for opt in optimizers:
                opt.state.clear()

    def after_step(self, step: int) -> None:
        if step >= self.pretrain_iters:
            ema_update(self.teacher, self.student, self.ema_decay(), step)
