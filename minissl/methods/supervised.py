"""Supervised baseline: train on the labeled cases only.

The lower bound every semi-supervised method must beat with the same labeled budget, network,
iterations and augmentation; run with ``--budget <all train cases>`` it gives the upper bound.

Loss (SSL4MIS): ``L = 0.5 * CE(f(x_l), y_l) + 0.5 * Dice(softmax f(x_l), y_l)``, soft Dice over all
classes including the background. The unlabeled images are never drawn (``semi_supervised = False``).
"""
from __future__ import annotations

from torch import Tensor

from .base import Method, register


@register("supervised")
class Supervised(Method):
    """Labeled images only: ``0.5 (CE + Dice)``."""

    semi_supervised = False
    uses_label_mask = True

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        logits = self.student(batch["x_l"])  # (Bl, C, *S)
        loss = self.supervised_loss(logits, batch["y_l"], batch.get("label_mask"))
        return {"loss": loss, "sup": loss}
