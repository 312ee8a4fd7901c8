"""Segmentation losses built on one op, ``minissl.ops.dice_ce_entropy`` (MONAI-like argument vocabulary).

Every loss gets its sums from ``dice_ce_entropy`` (softmax for C >= 2 channels, sigmoid for C == 1),
so all of them become faster together when the compiled kernel lands. Shapes: logits (B, C, *S);
target (B, *S) int64 labels or (B, C, *S) soft targets; weight (B, *S) voxel weights (0 removes a voxel).

    Dice  per (sample, class):  1 - (2 I + smooth) / (P + T + smooth)    (batch=True: sum I, P, T over B first)
    CE:                         sum_i w_i ce_i / max(sum_i w_i, eps)      (mean per unit weight)
    Entropy:                    sum_i w_i h_i / max(sum_i w_i, eps)       (nats, not divided by log C)

Example:
    >>> import torch
    >>> logits, target = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))
    >>> loss = dice_ce_loss(logits, target)  # equals MONAI DiceCELoss(to_onehot_y=True, softmax=True)
"""
from typing import Optional

import torch
from torch import nn

from . import ops

EPS = 1e-8  # floor of the weight sum in per-unit-weight means: an all-zero weight gives loss 0


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"expected reduction 'mean', 'sum' or 'none', got {reduction!r}")


def _dice(stats: ops.DiceCEStats, include_background: bool, smooth: float, batch: bool,
          reduction: str) -> torch.Tensor:
    """1 - (2I + smooth) / (P + T + smooth) per (b, c), or per c when ``batch``; background dropped if asked."""
    inter, pred, targ = stats.intersect, stats.pred_sum, stats.target_sum  # (B, C) each
    if not include_background and inter.shape[1] > 1:  # the single sigmoid channel is foreground already
        inter, pred, targ = inter[:, 1:], pred[:, 1:], targ[:, 1:]
    if batch:
        inter, pred, targ = inter.sum(0), pred.sum(0), targ.sum(0)  # (C,)
    return _reduce(1 - (2 * inter + smooth) / (pred + targ + smooth), reduction)


def _per_weight(total: torch.Tensor, weight_sum: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum per unit weight: 'mean' pools the batch, 'none' is per sample, 'sum' is the plain sum."""
    if reduction == "mean":
        return total.sum() / weight_sum.sum().clamp_min(EPS)
    if reduction == "sum":
        return total.sum()
    if reduction == "none":
        return total / weight_sum.clamp_min(EPS)  # (B,)
    raise ValueError(f"expected reduction 'mean', 'sum' or 'none', got {reduction!r}")


def dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
              include_background: bool = True, squared: bool = False, smooth: float = 1e-5, batch: bool = False,
              reduction: str = "mean") -> torch.Tensor:
    """Soft Dice loss on softmax/sigmoid probabilities (MONAI DiceLoss with smooth_nr = smooth_dr = smooth).

    Returns:
        scalar, or (B, C') / (C',) with reduction='none' (C' = C - 1 without background).
    """
    stats = ops.dice_ce_entropy(logits, target, weight, squared=squared)
    return _dice(stats, include_background, smooth, batch, reduction)


def ce_loss(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
            reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (softmax) or binary cross-entropy (sigmoid), mean per unit weight.

    'mean': sum(w ce) / max(sum(w), eps) over the batch; 'none': the same per sample (B,); 'sum': sum(w ce).
    Equals torch CrossEntropyLoss / BCEWithLogitsLoss when ``weight`` is None.
    """
    stats = ops.dice_ce_entropy(logits, target, weight)
    return _per_weight(stats.ce, stats.weight_sum, reduction)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
                 lambda_dice: float = 1.0, lambda_ce: float = 1.0, include_background: bool = True,
                 squared: bool = False, smooth: float = 1e-5, batch: bool = False,
                 reduction: str = "mean") -> torch.Tensor:
    """lambda_dice * dice_loss + lambda_ce * ce_loss from a single ``dice_ce_entropy`` call.

    With the defaults it equals MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)`` (or ``sigmoid=True``
    for one channel). reduction: 'mean' or 'sum' (a scalar either way).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"dice_ce_loss: expected reduction 'mean' or 'sum', got {reduction!r}")
    stats = ops.dice_ce_entropy(logits, target, weight, squared=squared)
    dice = _dice(stats, include_background, smooth, batch, reduction)
    return lambda_dice * dice + lambda_ce * _per_weight(stats.ce, stats.weight_sum, reduction)


def entropy_loss(logits: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
                 reduction: str = "mean") -> torch.Tensor:
    """Mean prediction entropy per unit weight, -sum_c p log p (sigmoid: binary entropy), in nats."""
    dummy = torch.zeros(logits.shape[:1] + logits.shape[2:], dtype=torch.int64, device=logits.device)  # (B, *S)
    stats = ops.dice_ce_entropy(logits, dummy, weight)
    return _per_weight(stats.entropy, stats.weight_sum, reduction)


def pseudo_label_loss(logits: torch.Tensor, teacher_probs: torch.Tensor, threshold: float = 0.95,
                      dice: bool = False, *, weight: Optional[torch.Tensor] = None, include_background: bool = True,
                      smooth: float = 1e-5) -> torch.Tensor:
    """Confidence-masked hard pseudo-label CE (+ Dice), FixMatch/UniMatch style.

    pseudo = argmax_c q (sigmoid, C == 1: q > 0.5); mask = max_c q >= threshold (sigmoid: max(q, 1 - q));
    loss = ce_loss(logits, pseudo, mask * weight) [+ dice_loss(logits, pseudo, mask * weight)].
    No voxel above the threshold gives 0.

    Args:
        logits: (B, C, *S) student logits.
        teacher_probs: (B, C, *S) teacher probabilities (detached here).
        threshold: confidence threshold. dice: add the Dice term on the same weighted voxels.
        weight: optional (B, *S) extra voxel weight.
    """
    if not isinstance(teacher_probs, torch.Tensor) or teacher_probs.shape != logits.shape:
        raise ValueError(f"pseudo_label_loss: expected teacher_probs of shape {tuple(logits.shape)}, got "
                         f"{tuple(getattr(teacher_probs, 'shape', ()))}")
    q = teacher_probs.detach()
    if q.shape[1] == 1:
        pseudo = (q[:, 0] > 0.5).long()  # (B, *S)
        conf = torch.maximum(q[:, 0], 1 - q[:, 0])  # (B, *S)
    else:
        conf, pseudo = q.max(1)  # (B, *S) each
    w = (conf >= threshold).to(logits.dtype)  # (B, *S)
    if weight is not None:
        w = w * weight
    stats = ops.dice_ce_entropy(logits, pseudo, w)
    loss = _per_weight(stats.ce, stats.weight_sum, "mean")
    return loss + _dice(stats, include_background, smooth, False, "mean") if dice else loss


def consistency_mse(logits: torch.Tensor, target_probs: torch.Tensor,
                    weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE between the student's softmax (sigmoid if C == 1) and target probabilities, mean over weighted voxels.

        mse = sum_i w_i sum_c (p_ic - q_ic)^2 / (C max(sum_i w_i, eps))
    computed from the squared Dice sums: sum w (p - q)^2 = sum w p^2 - 2 sum w p q + sum w q^2.
    With weight None it equals ``F.mse_loss(softmax(logits), target_probs)``. The target is a constant.
    """
    if not isinstance(target_probs, torch.Tensor) or target_probs.shape != logits.shape:
        raise ValueError(f"consistency_mse: expected target_probs of shape {tuple(logits.shape)}, got "
                         f"{tuple(getattr(target_probs, 'shape', ()))}")
    stats = ops.dice_ce_entropy(logits, target_probs, weight, squared=True)
    sq_err = (stats.pred_sum - 2 * stats.intersect + stats.target_sum).sum(1).clamp_min(0)  # (B,)
    return sq_err.sum() / (logits.shape[1] * stats.weight_sum.sum().clamp_min(EPS))


def copy_paste_loss(logits: torch.Tensor, target: torch.Tensor, gt_region: torch.Tensor,
                    mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BCP's ``mix_loss`` of one copy-paste batch, split into its ground-truth and pseudo-label regions.

    For R = the GT region and R = its complement, ``(Dice_R + CE_R) / 2`` with each term normalised over
    the voxels of R alone: Dice with squared denominators, sums pooled over the batch, ``smooth = 1e-10``,
    mean over all classes; CE the mean over R. The caller weights the two parts (BCP: 1.0 and 0.5).

    Args:
        logits: (B, C, *S) student logits of one mixed batch.
        target: (B, *S) int64 mixed target (ground truth in the GT region, pseudo-labels elsewhere).
        gt_region: (B, *S) {0, 1} float map of the ground-truth region.
        mask: optional (B, *S) voxel weight multiplying both regions (0 where the label is unknown).

    Returns:
        (gt, pl): the loss over the GT region and over the pseudo-label region, scalars.
    """
    kw = dict(lambda_dice=0.5, lambda_ce=0.5, squared=True, batch=True, smooth=1e-10)
    known = torch.ones_like(gt_region) if mask is None else mask  # (B, *S)
    gt = dice_ce_loss(logits, target, gt_region * known, **kw)
    pl = dice_ce_loss(logits, target, (1.0 - gt_region) * known, **kw)
    return gt, pl


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature sharpening of class probabilities along dim 1: ``p^(1/T) / sum_c p^(1/T)``.

    T < 1 pushes every voxel towards its most likely class (MC-Net+ uses T = 0.1), T = 1 changes
    nothing. Computed in the log domain, so tiny probabilities do not underflow to 0/0.

    Args:
        probs: (B, C, *S) probabilities (summing to 1 over C).
        temperature: T > 0.
    """
    if not temperature > 0:
        raise ValueError(f"sharpen: expected a temperature > 0, got {temperature!r}")
    return torch.softmax(torch.log(probs.clamp_min(1e-30)) / temperature, dim=1)


class DiceLoss(nn.Module):
    """Module form of :func:`dice_loss`; the arguments are stored and passed through."""

    def __init__(self, include_background: bool = True, squared: bool = False, smooth: float = 1e-5,
                 batch: bool = False, reduction: str = "mean"):
        super().__init__()
        self.kwargs = dict(include_background=include_background, squared=squared, smooth=smooth, batch=batch,
                           reduction=reduction)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return dice_loss(logits, target, weight, **self.kwargs)


class DiceCELoss(nn.Module):
    """Module form of :func:`dice_ce_loss`; the arguments are stored and passed through."""

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0, include_background: bool = True,
                 squared: bool = False, smooth: float = 1e-5, batch: bool = False, reduction: str = "mean"):
        super().__init__()
        self.kwargs = dict(lambda_dice=lambda_dice, lambda_ce=lambda_ce, include_background=include_background,
                           squared=squared, smooth=smooth, batch=batch, reduction=reduction)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return dice_ce_loss(logits, target, weight, **self.kwargs)
