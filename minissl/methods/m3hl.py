"""M3HL: Mutual Mask Mix with High-Low level feature consistency (Liu et al., MICCAI 2025).

Idea: BCP pastes one large box between a labeled and an unlabeled image. M3HL replaces the box by an
MIM-style random block mask: the image is cut into a grid (4 x 4 in 2D, 4 x 4 x 4 in 3D) and half of
the blocks, chosen anew for every sample, come from the other image. The mask M and its complement
are used *mutually*, so each image pair gives two mixes. On top of the mixed segmentation loss, the
student's features of the mixed images are pulled towards the EMA teacher's features of the *unmixed*
unlabeled images, at the bottleneck (high level, cosine) and at the last decoder map (low level, L1).

Equations (M (n, *S) in {0, 1} per sample, 50 % of the blocks set; PL = teacher pseudo-labels):

    X_1 = U_a * M + L_a * (1 - M)            Y_1 = PL_a on M, Y_a on 1 - M
    X_2 = L_b * M + U_b * (1 - M)            Y_2 = Y_b on M, PL_b on 1 - M
    PL  = largest_component(argmax f_t(U))    (per class, per image)
    L_seg  = sum_i [ 1.0 * l(f_s(X_i), Y_i; GT region) + 0.5 * l(f_s(X_i), Y_i; PL region) ]   (BCP's mix_loss)
    L_high = 1/4 sum_{i in 1,2} sum_{j in a,b} [ 1 - cos(flatten h_s(X_i), flatten h_t(U_j)) ]  (mean over samples)
    L_low  = 1/4 sum_{i in 1,2} sum_{j in a,b} mean | l_s(X_i) - l_t(U_j) |
    L      = L_seg + (L_low + L_high) / 2

with h the bottleneck (``encode(x)[-1]``) and l the last decoder feature map (``decode(...)[1]``);
``l(., .; R) = (Dice_R + CE_R) / 2`` over a region R, as in BCP (``losses.copy_paste_loss``).

Algorithm (per iteration; no pre-training stage in the released scripts):
    1. teacher on U_a and U_b (no gradient): pseudo-labels, bottleneck and last decoder features;
    2. per-sample block mask (``ops.block_grid``), the two mutual mixes with their targets and
       GT-region maps (``labeled_unlabeled_mixes``, BCP's two ``ops.mix`` calls with the region swapped);
    3. student on X_1 and X_2: logits, bottleneck, last feature; L_seg, L_high, L_low; SGD step;
    4. EMA update of the teacher (``ema_horizon``).
Note that the pairs (X_1, U_b) and (X_2, U_a) compare features of unrelated images (row k of one
batch with row k of the other): that is what the code does, and minissl keeps it.

Reported parts: ``sup`` = the GT-region loss; ``unsup`` = ``u_weight * PL-region loss + (L_low + L_high) / 2``,
everything the unlabeled images contribute (M3HL puts no ramp weight on it); ``loss = sup + unsup``;
``high`` and ``low`` separately.

Paper: Y. Liu, Z. Zhang, J. Yue, W. Guo, D. Li, "M3HL: Mutual Mask Mix with High-Low Level Feature
Consistency for Semi-Supervised Medical Image Segmentation", MICCAI 2025, arXiv:2508.03752.
Code: https://github.com/PHPJava666/M3HL (``code/ACDC_M3HL_train.py``; the LA script is incomplete).

Where the official code differs, and what minissl does:
    * a ``consistency_weight`` sigmoid ramp is computed (and logged) but never used: the feature
      terms always have weight 1/2. minissl follows the code (``feat_weight = 0.5``, no ramp);
    * the EMA teacher is built from its own random initialisation (not a copy of the student) and
      averaged with a constant 0.99 (no warm-up), BatchNorm statistics included; minissl copies the
      student at start and uses the shared ``ema_update`` (warm-up, buffers copied) with
      ``ema_horizon`` = 1/300: 0.99 over the ACDC script's 30,000 iterations (LA: 15,000, 1/150);
    * the LA script pools the bottleneck before the cosine, thresholds the softmax at 0.5 for
      pseudo-labels, and (bug) never writes the block mask, so it does not mix at all; minissl uses the
      ACDC recipe in 2D and 3D alike (4 x 4 x 4 blocks, as the LA script intends);
    * per-sample masks are drawn with ``random.sample`` over block positions; minissl draws them from
      the method's generator so runs resume exactly;
    * validation every 200 iterations (LA: on the test volumes); minissl every ``val_every`` iterations
      on its validation split.

Recipe: the shared one by default; ``--recipe official`` gives the official scripts' SGD (0.01, momentum
0.9, weight decay 1e-4) with their schedules: in 2D the ACDC script's constant rate over its 30,000
iterations, in 3D the LA script's x0.1 every 2,500 of its 15,000 iterations (a step schedule with period
1/6 of the run; the script reads ``args.self_max_iteration``, which its parser does not define: its
option ``--max_iteration`` defaults to 15,000). There is no stage to convert.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import losses, ops
from ..recipes import Recipe
from .base import Method, ema_update, labeled_unlabeled_mixes, make_teacher, register


def feature_losses(high_s: list[Tensor], low_s: list[Tensor], high_t: list[Tensor],
                   low_t: list[Tensor]) -> tuple[Tensor, Tensor]:
    """M3HL's high- and low-level consistency, averaged over every (student, teacher) pair.

    Args:
        high_s, high_t: student / teacher bottleneck features, each (n, C_b, *S_b).
        low_s, low_t: student / teacher last decoder features, each (n, C_l, *S).

    Returns:
        (L_high, L_low): mean over pairs of ``1 - cos`` (flattened per sample, mean over samples) and of
        the mean absolute difference.
    """
    pairs = [(i, j) for i in range(len(high_s)) for j in range(len(high_t))]
    high = sum(1 - F.cosine_similarity(high_s[i].flatten(1), high_t[j].flatten(1)).mean() for i, j in pairs)
    low = sum(F.l1_loss(low_s[i], low_t[j]) for i, j in pairs)
    return high / len(pairs), low / len(pairs)


@dataclass
class M3HLArgs:
    ema_horizon: float = 1 / 300  # 0.99 over 30,000 iterations (M3HL code/ACDC_M3HL_train.py)
    grid: int = 4  # blocks per spatial dim: 4 x 4 (2D), 4 x 4 x 4 (3D)
    mask_ratio: float = 0.5  # fraction of the blocks taken from the other image, per sample
    u_weight: float = 0.5  # loss weight of the pseudo-labelled region (the GT region has 1.0)
    feat_weight: float = 0.5  # weight of L_low + L_high (the code's fixed 1/2)


@register("m3hl")
class M3HL(Method):
    """Mutual block-mask mix of labeled/unlabeled halves + high/low feature consistency with the EMA teacher."""

    Args = M3HLArgs
    official_recipes = {
        2: Recipe("sgd", 0.01, 0.9, 1e-4, "constant", source="PHPJava666/M3HL code/ACDC_M3HL_train.py"),
        3: Recipe("sgd", 0.01, 0.9, 1e-4, "step", step_every=2500 / 15000, step_gamma=0.1,
                  source="PHPJava666/M3HL code/LA_M3HL_train.py"),
    }

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        self.teacher = make_teacher(self.student)

    def block_mask(self, x: Tensor) -> Tensor:
        """Per-sample block choice M, (n, *grid) bool with ``int(mask_ratio * grid**sd)`` blocks set."""
        grid = (self.args.grid,) * (x.ndim - 2)
        return ops.block_grid(x.shape[2:], x.shape[0], self.rng, grid, ratio=self.args.mask_ratio)

    @torch.no_grad()
    def teacher_view(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher pseudo-labels (n, *S), bottleneck (n, C_b, *S_b) and last feature (n, width, *S) of ``u``."""
        feats = self.teacher.encode(u)
        logits, last = self.teacher.decode(feats)  # (n, C, *S), (n, width, *S)
        return ops.largest_component(logits.argmax(1), self.num_classes), feats[-1], last

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x_l, y_l, x_u = batch["x_l"], batch["y_l"], batch["x_u"]
        n = min(x_l.shape[0], x_u.shape[0]) // 2
        if n < 1:
            raise ValueError(f"m3hl: expected at least 2 labeled and 2 unlabeled images, got {x_l.shape[0]} "
                             f"and {x_u.shape[0]}")
        x_l, y_l, x_u = x_l[:2 * n], y_l[:2 * n], x_u[:2 * n]
        (pl_a, high_ta, low_ta), (pl_b, high_tb, low_tb) = (self.teacher_view(u) for u in x_u.chunk(2))
        mixes = labeled_unlabeled_mixes(x_l, y_l, x_u, torch.cat([pl_a, pl_b]), paste_labeled=False,
                                        blocks=self.block_mask(x_l[:n]))
        sup, seg_pl, high_s, low_s = x_l.new_zeros(()), x_l.new_zeros(()), [], []
        for x, y, gt_region in mixes:  # X_1, X_2
            feats = self.student.encode(x)
            logits, last = self.student.decode(feats)  # (n, C, *S), (n, width, *S)
            gt, pl = losses.copy_paste_loss(logits, y, gt_region)
            sup, seg_pl = sup + gt, seg_pl + pl
            high_s.append(feats[-1])
            low_s.append(last)
        high, low = feature_losses(high_s, low_s, [high_ta, high_tb], [low_ta, low_tb])
        unsup = self.args.u_weight * seg_pl + self.args.feat_weight * (low + high)
        return {"loss": sup + unsup, "sup": sup, "unsup": unsup, "high": high.detach(), "low": low.detach()}

    def after_step(self, step: int) -> None:
        ema_update(self.teacher, self.student, self.ema_decay(), step)
