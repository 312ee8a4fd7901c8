"""UniMatch (Yang et al., CVPR 2023), the medical (ACDC) variant of the official code.

Idea: FixMatch with a wider perturbation space. One network predicts on a weakly augmented image;
where it is confident (max softmax >= 0.95) its argmax is the pseudo-label for (a) two *independent*
strong views of the same image, each with its own CutMix box pasted from another unlabeled image, and
(b) a feature-perturbed pass, where channel dropout (p = 0.5) hits the encoder features before the
decoder. Image-level and feature-level perturbations are separate streams, and two strong views
instead of one give a cheaper, more diverse consistency signal ("dual-stream perturbations").

Equations, with ``f = g o h`` the UNet (encoder ``h``, decoder ``g``), ``x_w = x_u`` the weak view
(the batch as loaded), ``x_w'`` its CutMix partner, ``B_k`` the boxes, ``S_k`` strong intensity augmentations:

    p      = sigma f(x_w),   yhat = argmax p,   m = 1[max_c p >= tau]       (tau = 0.95; no gradient)
    x_s,k  = mix(S_k(x_w), S_k(x_w'), B_k)       yhat_k, m_k = mix((yhat, m), (yhat', m'), B_k)
    L_x    = 0.5 CE(f(x_l), y_l) + 0.5 Dice(f(x_l), y_l)
    L_fp   = Dice_m(g(Dropout(h(x_w))), yhat)
    L_s,k  = Dice_{m_k}(f(x_s,k), yhat_k)
    L      = (L_x + 0.5 L_fp + 0.25 L_s,1 + 0.25 L_s,2) / 2
``Dice_m`` is the official masked Dice: squared denominators, sums pooled over the batch, background
included, voxels outside ``m`` dropped from every sum (``losses.dice_loss(..., weight=m, squared=True,
batch=True)``); with no confident voxel it is 0.

Algorithm (per iteration):
    1. encoder on ``[x_l; x_u]``; clean decoder -> ``L_x`` and the weak prediction ``p``; perturbed
       decoder (``UNet.decode(..., perturb=True)``) on the unlabeled features -> ``L_fp``;
    2. pseudo-labels and confidences from ``p`` (detached); the partner of image i is image i - 1
       (the unlabeled batch rolled by one), for images, pseudo-labels and confidences alike;
    3. two strong views ``transforms.strong(x_u, rng)``, each with its own ``ops.regions.cutmix_box``
       (p = 0.5, area 2-40 %, aspect 0.3-3.3) pasted from its partner by ``ops.mix``;
    4. one forward of both strong views -> ``L_s,1``, ``L_s,2``; SGD on ``L``.
No teacher: the same network makes the targets; no ramp-up (weights are constant from step 0).

Paper: L. Yang, L. Qi, L. Feng, W. Zhang, Y. Shi, "Revisiting Weak-to-Strong Consistency in
Semi-Supervised Semantic Segmentation", CVPR 2023, arXiv:2208.09910.
Code: https://github.com/LiheYoung/UniMatch ``more-scenarios/medical``.

Where the official medical code differs from the paper, and what minissl follows:
    * The paper uses CE on the unlabeled views; the medical code uses the masked Dice above only, and
      divides the total by 2 (``total_scale = 0.5``; with plain SGD that also halves the step of the
      supervised term compared with every other method). minissl follows the medical code; its
      ``L_x`` is the shared ``Method.supervised_loss``, the same ``0.5 (CE + Dice)`` with the same
      squared, batch-pooled ``DiceLoss`` as the code.
    * The code's partner images come from a second unlabeled loader and their pseudo-labels from an
      extra eval-mode pass; minissl rolls the unlabeled batch by one and reuses the (detached) weak
      predictions of the training pass, which saves a forward and a loader.
    * The code decodes clean and perturbed features of ``[x_l; x_u]`` in one batch; minissl decodes the
      perturbed unlabeled features alone (same loss, batch-norm statistics of that batch only).
    * Strong views: the code uses ColorJitter + blur (PIL, per image, in the loader); minissl uses
      ``transforms.strong`` (contrast, brightness, gamma, blur, noise) inside the step, 2D and 3D.
    * The code validates and keeps the best epoch on the merged validation and test volumes
      (``valtest.txt``); minissl selects on its validation split only.
Schedules: none of its own (no ramp-up, no teacher).

Recipe: the shared one by default; ``--recipe official`` gives the medical code's
(``more-scenarios/medical/unimatch.py`` with ``configs/acdc.yaml``): SGD 0.01, momentum 0.9, weight decay
1e-4, poly ``(1 - t)^0.9`` over the run (300 epochs), the shared recipe's values. There is no 3D script:
no official 3D recipe.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import losses, ops
from ..data import transforms
from ..ops import regions
from ..recipes import Recipe
from .base import Method, register


def masked_dice(logits: Tensor, pseudo: Tensor, conf: Tensor, threshold: float) -> Tensor:
    """UniMatch's unlabeled loss: batch-pooled squared Dice on voxels with ``conf >= threshold``.

    Args:
        logits: (B, C, *S) student logits. pseudo: (B, *S) int64 labels. conf: (B, *S) confidences.
    """
    return losses.dice_loss(logits, pseudo, (conf >= threshold).to(logits.dtype), squared=True, batch=True)


@dataclass
class UniMatchArgs:
    conf_thresh: float = 0.95  # tau: pseudo-labels only where max softmax >= tau
    cutmix_p: float = 0.5  # probability of a CutMix box per strong view and image
    fp_weight: float = 0.5  # weight of the feature-perturbation loss
    strong_weight: float = 0.25  # weight of each of the two strong-view losses
    total_scale: float = 0.5  # the medical code's final "/ 2", which halves the supervised step as well


@register("unimatch")
class UniMatch(Method):
    """Weak-to-strong consistency with two CutMix strong views and a feature-perturbed stream."""

    Args = UniMatchArgs
    official_recipes = {
        2: Recipe("sgd", 0.01, 0.9, 1e-4, "poly", source="LiheYoung/UniMatch more-scenarios/medical/unimatch.py"),
    }

    def strong_views(self, x_u: Tensor, pseudo: Tensor, conf: Tensor) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Two strong CutMix views with their pasted pseudo-labels and confidences.

        Args:
            x_u: (B, 1, *S) weak images. pseudo: (B, *S) int64. conf: (B, *S) float.

        Returns:
            two tuples ``(image (B, 1, *S), pseudo (B, *S), conf (B, *S), box (B, 2 sd))``.
        """
        views = []
        for _ in range(2):
            x_s = transforms.strong(x_u, self.rng)  # (B, 1, *S)
            box = regions.cutmix_box(x_u.shape[2:], x_u.shape[0], self.rng, p=self.args.cutmix_p)  # (B, 2 sd)
            ours = [x_s, pseudo, conf]
            mixed = ops.mix(ours, [t.roll(1, 0) for t in ours], boxes=box)  # partner of i = i - 1
            views.append((*mixed, box))
        return views

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x_l, y_l, x_u = batch["x_l"], batch["y_l"], batch["x_u"]
        bl, tau = x_l.shape[0], self.args.conf_thresh
        feats = self.student.encode(torch.cat([x_l, x_u]))  # [f_0 .. f_depth], batch Bl + Bu
        logits = self.student.decode(feats)[0]  # (Bl + Bu, C, *S)
        logits_fp = self.student.decode([f[bl:] for f in feats], perturb=True)[0]  # (Bu, C, *S)
        sup = self.supervised_loss(logits[:bl], y_l)
        conf, pseudo = torch.softmax(logits[bl:].detach(), dim=1).max(1)  # (Bu, *S) each
        (x_s1, y_1, c_1, _), (x_s2, y_2, c_2, _) = self.strong_views(x_u, pseudo, conf)
        logits_s1, logits_s2 = self.student(torch.cat([x_s1, x_s2])).chunk(2)  # (Bu, C, *S) each
        loss_fp = masked_dice(logits_fp, pseudo, conf, tau)
        loss_s1, loss_s2 = masked_dice(logits_s1, y_1, c_1, tau), masked_dice(logits_s2, y_2, c_2, tau)
        unsup = self.args.fp_weight * loss_fp + self.args.strong_weight * (loss_s1 + loss_s2)
        return {"loss": self.args.total_scale * (sup + unsup), "sup": sup, "unsup": unsup, "loss_fp": loss_fp,
                "loss_s": (loss_s1 + loss_s2) / 2, "mask_ratio": (conf >= tau).float().mean()}
