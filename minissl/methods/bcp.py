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
        over the best-on-validation stage-1 weights; student and teacher start from them (the
        official code loads its best pre-trained checkpoint into both networks) and the SGD
        momentum is cleared;
    stage 2 (the remaining 75 %; BCP: 30k), per iteration:
        1. teacher pseudo-labels PL_a, PL_b of the unlabeled halves (argmax + largest component);
        2. one box, the two bidirectional mixes X_in, X_out with their targets and GT-region maps
           (``labeled_unlabeled_mixes``: one ``ops.mix`` call each, images, targets and region maps together);
        3. student logits of X_in and X_out (two forward passes, as in the code: BatchNorm sees each
           mixed batch alone); loss above; SGD step; EMA update of the teacher (decay 0.99).

Reported parts: ``sup`` = the GT-region loss, ``unsup`` = the PL-region loss before its weight
``u_weight`` (0 during stage 1), ``loss = sup + u_weight * unsup``. The student is evaluated.

Paper: Y. Bai, D. Chen, Q. Li, W. Shen, Y. Wang, "Bidirectional Copy-Paste for Semi-Supervised
Medical Image Segmentation", CVPR 2023, arXiv:2305.00673.
Code: https://github.com/DeepMed-Lab-ECNU/BCP (``code/ACDC_BCP_train.py``).

Where the official code differs, and what minissl does:
    * stage 2 restarts the poly learning rate at base_lr; minissl keeps one poly schedule over the
      whole run (the engine owns the learning rate) and only clears the momentum at the switch;
    * the EMA uses a constant 0.99 and averages BatchNorm statistics too; minissl uses the shared
      ``ema_update`` (warm-up ``min(1 - 1/(step+1), 0.99)``, buffers copied). Right after the switch
      the teacher equals the student, so the warm-up changes nothing there;
    * the LA (3D) script thresholds the foreground softmax at 0.5 (= argmax for two classes) and uses a
      per-sample, non-squared Dice; minissl uses the ACDC loss in 2D and 3D alike;
    * the box offset is drawn with ``randint(0, H - h)`` (the last position is never drawn);
      ``ops.bcp_box`` draws every position where the box fits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import losses, ops
from .base import Method, ema_update, labeled_unlabeled_mixes, make_teacher, register


@dataclass
class BCPArgs:
    ema_horizon: float = 1 / 400  # fraction of the run: EMA 0.99 over 40,000 iterations (BCP ACDC: 10k + 30k)
    pretrain: float = 0.25  # labeled-only copy-paste stage, fraction of max_iters (BCP: 10k of 40k)
    box_ratio: float = 2 / 3  # side of the pasted box, fraction of every spatial dim
    u_weight: float = 0.5  # loss weight of the pseudo-labelled region (the GT region has 1.0)


@register("bcp")
class BCP(Method):
    """Labeled copy-paste pre-training, then mean-teacher self-training with bidirectional copy-paste."""

    Args = BCPArgs

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

    def pretrain_step(self, x_l: Tensor, y_l: Tensor) -> dict[str, Tensor]:
        """Stage 1: L_a outside the box, L_b inside, both regions ground truth with weight 1."""
        n = x_l.shape[0] // 2
        (l_a, l_b), (y_a, y_b) = x_l[:2 * n].chunk(2), y_l[:2 * n].chunk(2)
        boxes = self.box(l_a)
        x, y = ops.mix([l_a, y_a], [l_b, y_b], boxes=boxes)  # (n, 1, *S), (n, *S)
        outside = 1.0 - ops.region_mask(x.shape[2:], boxes=boxes).to(x.dtype)  # (n, *S)
        region_a, region_b = losses.copy_paste_loss(self.student(x), y, outside)
        sup = region_a + region_b
        zero = sup.new_zeros(())
        return {"loss": sup, "sup": sup, "unsup": zero, "w": zero}

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x_l, y_l, x_u = batch["x_l"], batch["y_l"], batch["x_u"]
        if x_l.shape[0] < 2:
            raise ValueError(f"bcp: expected at least 2 labeled images per batch (two halves), got {x_l.shape[0]}")
        if step < self.pretrain_iters:
            return self.pretrain_step(x_l, y_l)
        n = min(x_l.shape[0], x_u.shape[0]) // 2
        if n < 1:
            raise ValueError(f"bcp: expected at least 2 labeled and 2 unlabeled images, got {x_l.shape[0]} "
                             f"and {x_u.shape[0]}")
        x_l, y_l, x_u = x_l[:2 * n], y_l[:2 * n], x_u[:2 * n]
        pseudo = torch.cat([self.pseudo_labels(u) for u in x_u.chunk(2)])  # (2n, *S), one teacher pass per half
        mixes = labeled_unlabeled_mixes(x_l, y_l, x_u, pseudo, paste_labeled=True, boxes=self.box(x_l[:n]))
        sup, unsup = x_l.new_zeros(()), x_l.new_zeros(())
        for x, y, gt_region in mixes:  # X_in, X_out
            gt, pl = losses.copy_paste_loss(self.student(x), y, gt_region)
            sup, unsup = sup + gt, unsup + pl
        w = self.args.u_weight
        return {"loss": sup + w * unsup, "sup": sup, "unsup": unsup, "w": torch.tensor(w)}

    def stage_ends(self) -> list[int]:
        """The labeled stage ends after ``pretrain_iters`` iterations."""
        return [self.pretrain_iters] if 0 < self.pretrain_iters < self.max_iters else []

    def end_stage(self, step: int, best_state: dict[str, Tensor], optimizers: list[torch.optim.Optimizer]) -> None:
        """Stage switch: student and teacher <- the best-on-validation stage-1 student, fresh SGD momentum."""
        self.load_state_dict(best_state)
        self.teacher.load_state_dict(self.student.state_dict())
        for opt in optimizers:
            opt.state.clear()

    def after_step(self, step: int) -> None:
        if step >= self.pretrain_iters:
            ema_update(self.teacher, self.student, self.ema_decay(), step)
