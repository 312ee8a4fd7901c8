"""ERSR: Ellipse-constrained pseudo-label Refinement and Symmetric Regularization (fetal head, 2D).

Idea: a fetal head in an ultrasound plane is an ellipse and is (nearly) mirror-symmetric about its
midline. ERSR turns both priors into training signals for a mean teacher: (1) teacher maps that look
irregular are filtered out, (2) the kept maps are pulled towards their fitted ellipse, and (3) the
ellipse's axis makes "perfectly symmetric" images whose predictions must agree with the mirrored
prediction of the original and be symmetric themselves.

Equations (P = the EMA teacher's foreground probability on x_u, p = the student's; t = step / max_iters):

    S_edge = mean |Sobel(P) / 8|,  S_reg = mean |Lap(D(P > 0.5))|,  S = a S_edge + (1 - a) S_reg      (a = 0.5)
    keep:  rank of S among the recent scores < k(t) N,  k(t) = 0.5 + 0.5 ramp(t),  at least 0.8 of the batch
    ellipse (cx, cy, a, b, theta) = fit to the outer contour of the largest component of {P > tau}  (tau = 0.6)
    d = (x'/a)^2 + (y'/b)^2;  P' = max(P, clip(0.6 + (1 - d)^2, 0, 1)) inside, P exp(-0.5 (d - 1)) outside
    Y = 1[P' > tau]                                   (ops.fit_ellipse + ops.ellipse_refine)
    M = reflection across the major axis;  H_L, H_R = the half-planes y' < 0, y' >= 0
    x_left = x (1 - Y) + ~(x Y H_L) + ~M(x Y H_L)      (x_right alike; ~ = light intensity perturbation)
    L_pl = mse(p, Y),  L_aug = mse(p_aug, [p H_L + M(p H_L); p H_R + M(p H_R)]),
    L_mirror = mse(p_aug H_L, M(p_aug H_R)),  L = L_sup + w(t) (L_pl + L_aug + L_mirror)

Algorithm (per iteration):
    1. supervised loss on x_l; teacher map P on x_u (teacher in eval mode, no gradient);
    2. dual-score filter: keep the most regular maps (``regularity_score``, ``select_regular``);
    3. ellipse fit and refinement of the kept maps -> hard pseudo-labels Y and symmetry axes;
    4. the two mirrored images per validly fitted sample (``mirror_images``);
    5. one student pass on [x_u kept; x_left; x_right]; the three MSEs; SGD; EMA update (``ema_horizon``).
The student is evaluated (as in the code). The published recipe ramps k(t) and w(t) over the whole
10k-iteration run with weight 1.0: ``keep_rampup = 1.0`` here, ``--cons_weight 1.0 --rampup 1.0`` for w.

Paper: L. Zhou, Z. Chen, Y. Shen, J. Xu, P. Xuan, Y. Zhu, Y. Fang, C. Cong, L. Wei, R. Su, J. Zhou, Q. Jin,
"ERSR: An Ellipse-constrained pseudo-label refinement and symmetric regularization framework for
semi-supervised fetal head segmentation in ultrasound images", IEEE JBHI 2025, arXiv:2508.19815.
Code: https://github.com/BioMedIA-repo/ERSR (``train.py``, ``utils/util.py``, ``utils/seletor.py``).

Recipe: the shared one by default; ``--recipe official`` gives the code's SGD 0.01, momentum 0.9, weight
decay 1e-4, poly ``(1 - t)^0.9`` over its 10,000 iterations (``train.py``, a ``LambdaLR``), the shared
recipe's values. A 2D method: no 3D recipe. EMA: 0.99 over 10,000 iterations, ``ema_horizon`` = 1/100.

Where minissl differs from the code, and why:
    * two-class softmax, p = softmax[:, 1] (the code: one sigmoid channel), so that ``predict`` gives the
      C >= 2 logits the evaluation expects; the MSEs are on the foreground probability;
    * supervised loss ``Method.supervised_loss`` (SSL4MIS's 0.5 (CE + Dice), squared batch-pooled Dice over
      both classes) instead of (DiceFocal + BCE) / 2; no supervised warm-start checkpoint: the ramp of
      w(t) starts the run nearly supervised;
    * the EMA averages the BatchNorm running statistics with the weights (its ``state_dict`` loop); the
      shared ``ema_update`` copies the student's. The teacher runs in eval mode, so its pseudo-labels use
      those statistics: minissl's teacher normalises with the student's running statistics;
    * the filter's per-epoch score dictionary (keyed by batch position, reset every epoch, so the first
      batch of an epoch ranks only against itself) becomes a running window of the last
      ``score_window`` scores (64 ~ one HC18 10 % epoch of 8 unlabeled images x 10 iterations);
    * D is the exact Euclidean distance to the nearest mask pixel (kornia's ``distance_transform``
      semantics, 0 on the mask), computed in torch for the whole batch (``geometry.distance_to_mask``; kornia
      approximates it by soft-min convolutions). Its Laplacian pads by replication: the code's zero
      padding makes the image border, where the distance is large, dominate S_reg. An empty mask
      scores +inf (ranked last); in the code it gets D = 0 and ranks as the most regular;
    * ``ops.fit_ellipse`` fits the outer boundary of the largest component (its holes filled), like the
      code's external contour (``cv2.findContours(RETR_EXTERNAL)``): low-confidence holes inside the
      head do not shrink the ellipse. Its points are pixel-edge midpoints, OpenCV's contour pixels'
      centres (half a pixel further in);
    * invalid ellipse fits (empty mask, too few points): the code raises on an empty contour list or
      gives an all-zero pseudo-label; here Y = 1[P > tau] is kept for L_pl and the sample is left out of
      L_aug / L_mirror (no axis);
    * the reflection line is the major axis. The code reflects across the line perpendicular to the
      first axis of ``cv2.fitEllipse``, which is the shorter one (OpenCV returns width <= height), i.e.
      the same major axis, the head's midline. Nearest sampling with ``grid_sample`` (zeros outside the
      image; the code clamps to the border);
    * the perturbation is ``transforms.strong`` with the code's probability 0.2 per op and its ranges
      (gamma 1.2-1.8, shift 0.1, noise 0.05, blur 0.5-1.5; shift and noise relative to the image std),
      applied to the image piece before masking, with no per-piece min-max renormalisation;
    * as in the code, the L_aug target is built from the student's own prediction and not detached
      (``detach_mirror_target = True`` detaches it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import geometry, ops
from ..data import transforms
from ..recipes import Recipe
from .base import Method, ema_update, make_teacher, register, sigmoid_rampup


def contour_regularity(probs: Tensor) -> Tensor:
    """S_reg: mean |Laplacian| of the distance to ``P > 0.5`` (replicate padding), (B, H, W) -> (B,); inf if empty."""
    mask = probs > 0.5  # (B, H, W)
    lap = geometry.mean_abs_laplacian(geometry.distance_to_mask(mask).to(probs))  # (B,)
    return torch.where(mask.flatten(1).any(1), lap, math.inf)


def regularity_score(probs: Tensor, alpha: float = 0.5) -> Tensor:
    """Dual score ``alpha S_edge + (1 - alpha) S_reg`` of foreground maps (B, H, W) -> (B,); lower = more regular."""
    return alpha * geometry.mean_gradient_magnitude(probs) + (1 - alpha) * contour_regularity(probs)


def select_regular(scores: Tensor, history: Tensor, keep_ratio: float, min_keep: float = 0.8) -> Tensor:
    """Dual-score filter: which samples of the batch to keep, (B,) bool.

    A sample is kept when its rank among ``[history; scores]`` (stable, ascending) is below
    ``int(keep_ratio * N)``; then the lowest-scoring rejected samples are added until at least
    ``max(1, int(min_keep * B))`` are kept.

    Args:
        scores: (B,) scores of this batch. history: (N0,) recent scores (may be empty).
        keep_ratio: k(t) in [0, 1]. min_keep: minimum kept fraction of the batch.
    """
    pool = torch.cat([history.to(scores), scores])  # (N0 + B,)
    rank = torch.empty_like(pool, dtype=torch.int64)
    rank[torch.argsort(pool, stable=True)] = torch.arange(pool.numel(), device=pool.device)
    keep = rank[history.numel():] < int(keep_ratio * pool.numel())  # (B,)
    n = max(int(keep.sum()), max(1, int(min_keep * scores.numel())))
    order = torch.argsort(torch.where(keep, -math.inf, scores), stable=True)  # kept first, then by score
    return torch.zeros_like(keep).index_fill_(0, order[:n], True)


def mirror_images(x: Tensor, pseudo: Tensor, params: Tensor,
                  perturb: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """The symmetric images [x_left; x_right]: background + each half of the head + its mirror.

    Args:
        x: (B, 1, H, W) images. pseudo: (B, H, W) {0, 1} pseudo-masks Y. params: (B, 5) valid ellipses.
        perturb: intensity perturbation applied to every piece before it is masked (None: none).

    Returns:
        (2B, 1, H, W): ``x (1 - Y) + ~(x Y H) + ~M(x Y H)`` for H = H_L (first B), then H = H_R.
    """
    fg = pseudo.to(x.dtype)[:, None]  # (B, 1, H, W)
    left, right = geometry.axis_half_planes(params, x.shape[-2:])
    masks = torch.cat([fg * left, fg * right])  # (2B, 1, H, W) the two halves of the pseudo-mask
    pieces = torch.cat([x, x]) * masks
    params2 = torch.cat([params, params])
    mirrored = geometry.reflect_across_axis(torch.cat([pieces, masks], 1), params2)  # (2B, 2, H, W) piece, mask
    if perturb is not None:
        pieces = perturb(pieces) * masks
        mirrored = torch.cat([perturb(mirrored[:, :1]) * mirrored[:, 1:], mirrored[:, 1:]], 1)
    return torch.cat([x * (1 - fg)] * 2) + pieces + mirrored[:, :1]


def mirror_targets(p: Tensor, params: Tensor) -> Tensor:
    """L_aug targets ``[p H_L + M(p H_L); p H_R + M(p H_R)]`` from predictions p (B, 1, H, W) -> (2B, 1, H, W)."""
    left, right = geometry.axis_half_planes(params, p.shape[-2:])
    pieces = torch.cat([p * left, p * right])  # (2B, 1, H, W)
    return pieces + geometry.reflect_across_axis(pieces, torch.cat([params, params]))


@dataclass
class ERSRArgs:
    ema_horizon: float = 1 / 100  # 0.99 over 10,000 iterations (ERSR train.py, utils/get_argparser.py)
    threshold: float = 0.6  # tau: binarises the teacher map for the fit and the refined map
    fill_base: float = 0.6  # inside the ellipse: max(P, fill_base + (1 - d)^fill_power)
    fill_power: float = 2.0
    decay: float = 0.5  # outside: P exp(-decay (d - 1))
    alpha: float = 0.5  # weight of S_edge in the dual score (1 - alpha for S_reg)
    keep_rampup: float = 1.0  # k(t) = 0.5 + 0.5 ramp over this fraction of max_iters
    min_keep: float = 0.8  # the filter keeps at least this fraction of each unlabeled batch
    score_window: int = 64  # recent scores the filter ranks against (the code: one epoch)
    perturb_p: float = 0.2  # probability of each intensity perturbation of a mirrored piece
    detach_mirror_target: bool = False  # the code back-propagates through the L_aug target


@register("ersr")
class ERSR(Method):
    """Mean teacher with a dual-score filter, ellipse-refined pseudo-labels and mirror consistencies."""

    Args = ERSRArgs
    official_recipes = {2: Recipe("sgd", 0.01, 0.9, 1e-4, "poly", source="BioMedIA-repo/ERSR train.py")}

    @classmethod
    def applies_to(cls, spec) -> Optional[str]:
        if spec.spatial_dims == 2 and spec.num_classes == 2:
            return None
        return f"expected a 2D binary suite (fetal_head), got spatial_dims={spec.spatial_dims}, " \
               f"num_classes={spec.num_classes}"

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        self.teacher = make_teacher(self.student)
        self.register_buffer("score_history", torch.full((self.args.score_window,), math.nan))

    def keep_ratio(self, step: int) -> float:
        """k(t) = 0.5 + 0.5 ramp(t), t over ``keep_rampup`` of the run."""
        return 0.5 + 0.5 * sigmoid_rampup(self.progress(step), self.args.keep_rampup)

    @torch.no_grad()
    def teacher_probs(self, x_u: Tensor) -> Tensor:
        """Teacher foreground probability in eval mode (as the code), (Bu, H, W)."""
        self.teacher.eval()
        probs = torch.softmax(self.teacher(x_u), 1)[:, 1]
        self.teacher.train(self.training)
        return probs

    @torch.no_grad()
    def filter(self, probs: Tensor, step: int) -> Tensor:
        """Dual-score filter against the running window, which it then updates; (Bu,) bool."""
        scores = regularity_score(probs, self.args.alpha)  # (Bu,)
        hist = self.score_history
        keep = select_regular(scores, hist[~hist.isnan()], self.keep_ratio(step), self.args.min_keep)
        hist.copy_(torch.cat([hist, scores.to(hist)])[-hist.numel():])
        return keep

    def perturb(self, x: Tensor) -> Tensor:
        """Light intensity perturbation of mirrored pieces (the code's MONAI transforms, p = 0.2 each)."""
        return transforms.strong(x, self.rng, p=self.args.perturb_p, contrast=(1.0, 1.0), brightness=0.1,
                                 gamma=(1.2, 1.8), noise=0.05, blur=(0.5, 1.5))

    @torch.no_grad()
    def pseudo_labels(self, probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Ellipse fit (outer contour of the largest component of P > tau) and refinement.

        Returns pseudo-labels (K, H, W) uint8, ellipse params (K, 5) and fit validity (K,) bool.
        """
        a = self.args
        params, valid = ops.fit_ellipse(probs > a.threshold)
        _, pseudo = ops.ellipse_refine(probs, params, valid, threshold=a.threshold, fill_base=a.fill_base,
                                       fill_power=a.fill_power, decay=a.decay)
        return pseudo, params, valid

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x_l, y_l, x_u = batch["x_l"], batch["y_l"], batch["x_u"]
        sup = self.supervised_loss(self.student(x_l), y_l)
        zero = sup.new_zeros(())
        if x_u.shape[0] == 0:
            return {"loss": sup, "sup": sup, "unsup": zero, "w": zero}
        probs_t = self.teacher_probs(x_u)  # (Bu, H, W)
        keep = self.filter(probs_t, step)  # (Bu,)
        x_k, probs_k = x_u[keep], probs_t[keep]  # (K, 1, H, W), (K, H, W)
        pseudo, params, valid = self.pseudo_labels(probs_k)
        params_v = params[valid].to(x_u)  # (V, 5)
        x_aug = x_k[:0]  # (2V, 1, H, W) below; none without a valid fit
        if len(params_v):
            with torch.no_grad():
                x_aug = mirror_images(x_k[valid], pseudo[valid], params_v, self.perturb)
        p = torch.softmax(self.student(torch.cat([x_k, x_aug])), 1)[:, 1:]  # (K + 2V, 1, H, W)
        p_u, p_aug = p[:len(x_k)], p[len(x_k):]
        l_pl = F.mse_loss(p_u, pseudo[:, None].to(p))
        l_aug = l_mirror = zero
        if len(params_v):
            target = mirror_targets(p_u[valid], params_v)  # (2V, 1, H, W)
            l_aug = F.mse_loss(p_aug, target.detach() if self.args.detach_mirror_target else target)
            params2 = torch.cat([params_v, params_v])
            left, right = geometry.axis_half_planes(params2, p_aug.shape[-2:])
            l_mirror = F.mse_loss(p_aug * left, geometry.reflect_across_axis(p_aug * right, params2))
        unsup = l_pl + l_aug + l_mirror
        w = self.cons_weight(step)
        return {"loss": sup + w * unsup, "sup": sup, "unsup": unsup, "w": torch.tensor(w),
                "l_pl": l_pl.detach(), "l_aug": l_aug.detach(), "l_mirror": l_mirror.detach(),
                "kept": keep.float().mean(), "fit_ok": valid.float().mean()}

    def after_step(self, step: int) -> None:
        ema_update(self.teacher, self.student, self.ema_decay(), step)
