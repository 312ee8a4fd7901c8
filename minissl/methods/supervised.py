"""Supervised baseline: train on the labeled cases only.

The lower bound every semi-supervised method must beat with the same labeled budget, network,
iterations and augmentation; run with ``--budget <all train cases>`` it gives the upper bound.

Loss (SSL4MIS): ``L = 0.5 CE(f(x_l), y_l) + 0.5 Dice(softmax f(x_l), y_l)`` with SSL4MIS's ``DiceLoss``:
squared denominators, sums pooled over the batch, averaged over all classes including the background
(``Method.supervised_loss``). The unlabeled images are never drawn (``semi_supervised = False``).

Recipe: the shared one by default. ``--recipe official`` gives SSL4MIS's fully supervised scripts
(``code/train_fully_supervised_2D.py``, ``_3D.py``): SGD 0.01, momentum 0.9, weight decay 1e-4, poly
``(1 - t)^0.9`` over the run, i.e. the shared recipe's values. ``--recipe official:<method>`` trains
the baseline on another method's official recipe (``minissl bench methods --recipe official`` pairs
every method with such a baseline); a schedule that a method ties to its stages (BCP's 3D step
schedule restarts at its switch) counts here from the start of the run.

Where the official code differs, and what minissl does: the 3D script is SSL4MIS's BraTS one (batch 2,
96^3 patches), there is no LA script; batch, patch and labeled budget (the 2D script's default is 50
patients) come from the suite in minissl, the same for every method.
"""
from __future__ import annotations

from torch import Tensor

from ..recipes import Recipe
from .base import Method, register


@register("supervised")
class Supervised(Method):
    """Labeled images only: ``0.5 (CE + Dice)``."""

    semi_supervised = False
    uses_label_mask = True
    official_recipes = {
        2: Recipe("sgd", 0.01, 0.9, 1e-4, "poly", source="HiLab-git/SSL4MIS code/train_fully_supervised_2D.py"),
        3: Recipe("sgd", 0.01, 0.9, 1e-4, "poly", source="HiLab-git/SSL4MIS code/train_fully_supervised_3D.py"),
    }

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        logits = self.student(batch["x_l"])  # (Bl, C, *S)
        loss = self.supervised_loss(logits, batch["y_l"], batch.get("label_mask"))
        return {"loss": loss, "sup": loss}
