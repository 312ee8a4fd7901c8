"""TransMedSeg: Mean Teacher + transferable semantic augmentation (TSA) of pixel features (Wang et al., 2025).

Idea: the teacher and the student see the same pixels but describe each class a little differently.
A memory keeps, per class c, the mean of the student's pixel features, and the mean and covariance of
the teacher's. Augmenting a student feature of class c by ``delta ~ N(alpha dmu_c, alpha Sigma_c)``
(``dmu_c = mu_t^c - mu_s^c``: towards the teacher's semantics, spread like the teacher's class) gives
infinitely many "transferred" features. Training on all of them is never done explicitly: the expected
cross-entropy over the augmentations has a closed-form upper bound that costs one small convolution.

The bound (ISDA, Wang et al. NeurIPS 2019; TSA, Li et al. CVPR 2021). For a linear classifier
``z_c = w_c^T f + b_c`` and ``f~ = f + delta``, with ``dw_c = w_c - w_y``, ``z_c - z_y`` is Gaussian
with mean ``m_c = dw_c^T f + b_c - b_y + alpha dw_c^T dmu_y`` and variance ``v_c = alpha dw_c^T Sigma_y dw_c``.
By Jensen (log is concave) and the Gaussian moment generating function:

    E[CE(f~, y)] = E[log sum_c exp(z~_c - z~_y)] <= log sum_c E[exp(z~_c - z~_y)] = log sum_c exp(m_c + v_c / 2)
                 = CE(z + s, y),     s_c = alpha dw_c^T dmu_y + (alpha / 2) dw_c^T Sigma_y dw_c      (s_y = 0)

with equality when Sigma -> 0 (the augmentation is then a fixed shift). minissl's classifier is the
UNet's 3x3(x3) head, so a logit mixes the features of a neighbourhood. Each pixel j is augmented with
its own class's distribution, independently of the others; then ``z~_c(i) - z~_y(i)`` is still Gaussian,
with mean and variance summed over the kernel taps k. Both depend on the neighbours only through their
classes, so the shift is a convolution of the one-hot label map with a (C*C, C, *k) kernel built from
the head's weight W (C, D, *k), the memory's dmu (C, D) and Sigma (C, D, D):

    K_{c,y}[c', k] = alpha dW_{cy,k}^T dmu_{c'} + (alpha / 2) dW_{cy,k}^T Sigma_{c'} dW_{cy,k}
    dW_{cy,k}      = W_c[k] - W_y[k]                              (tap k of the head's kernel)
    s_c(i) = conv(onehot(labels), K)_{c, y_i}(i)                  (``tsa_shift``; a 1x1 head gives the ISDA formula)

Losses (teacher on ``[x_l; x_u + n]``, pseudo-labels PL = argmax of the teacher on x_u; labels
``y = [y_l; PL]`` for every pixel of the batch):

    L     = L_sup(f_s(x_l), y_l) + w(t) * (mse(sigma f_s(x_u), sigma f_t(x_u + n)) + beta * L_tsa)
    L_tsa = mean_i CE(z_i + s_i, y_i),    alpha(t) = alpha_max * t        (ISDA's linear schedule, t = step / max_iters)

Algorithm (per iteration):
    1. student logits and head features on ``[x_l; x_u]``; teacher logits and features on ``[x_l; x_u + n]``;
    2. memory update (EMA, momentum ``memory_momentum`` with the warm-up ``min(1 - 1/(k+1), m)`` after k
       updates of a class): student class means, teacher class means and covariances, from at most
       ``stat_pixels`` random pixels of the batch; under DDP the ranks' sums are added first;
    3. the Mean-Teacher consistency, the TSA bound, the supervised loss; SGD step; EMA teacher update.
The student is evaluated (as Mean Teacher).

Schedule (fractions of max_iters): alpha grows linearly over the whole run; the weight w(t) ramps up over
``cfg.rampup`` (Mean Teacher's sigmoid ramp); the EMA horizon is 1/300 of the run (Mean Teacher's 0.99 over
30k iterations). No official code exists: ``official_recipes`` is empty and ``--recipe official`` is refused.

Choices (the paper body was not available, and no official code was found; the loss is derived here from the
TSA/ISDA bound and the abstract, with a third-party summary's notation ``delta ~ N(alpha dmu_c, alpha Sigma_t^c)``):
    * the augmented features are the student's (the abstract speaks of augmenting the teacher's features
      towards the student's semantics; a frozen teacher's features train nothing unless passed through the
      student's head, so minissl augments the student's, towards the teacher's statistics);
    * the baseline is Mean Teacher (the summary names GraphCL); beta = 1 under the consistency ramp,
      alpha_max = 0.5 (ISDA's lambda_0), memory momentum 0.9, full covariances (D = width: 16 x 16 per class);
    * the statistics come from GT labels on labeled pixels and the teacher's argmax on unlabeled pixels, and
      at most 65536 pixels per batch (a random subset: 3D batches have millions of voxels).

Paper: M. Wang, J. Li, S. Wang, L. Lan, H. Tian, L. Yang, G. Yang, "TransMedSeg: A Transferable Semantic
Framework for Semi-Supervised Medical Image Segmentation", arXiv:2505.14753, 2025. Bounds: Y. Wang et al.,
"Implicit Semantic Data Augmentation for Deep Networks", NeurIPS 2019; S. Li et al., "Transferable Semantic
Augmentation for Domain Adaptation", CVPR 2021.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses
from .base import Method, ema_update, make_teacher, register


def class_moments(feats: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class pixel counts, feature sums and sums of outer products.

    Args:
        feats: (N, D) pixel features. labels: (N,) int64 classes.
        num_classes: C.

    Returns:
        count (C,), sums (C, D), outer sums (C, D, D).
    """
    onehot = F.one_hot(labels, num_classes).to(feats.dtype)                 # (N, C)
    weighted = onehot[:, :, None] * feats[:, None, :]                       # (N, C, D)
    outer = torch.einsum("ncd,ne->cde", weighted, feats)                   # (C, D, D)
    return onehot.sum(0), weighted.sum(0), outer


class FeatureMemory(nn.Module):
    """Class-wise feature mean (C, D) and covariance (C, D, D), updated by EMA (buffers: saved, resumed)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_classes, dim))
        self.register_buffer("cov", torch.zeros(num_classes, dim, dim))
        self.register_buffer("updates", torch.zeros(num_classes, dtype=torch.int64))

    @torch.no_grad()
    def update(self, feats: Tensor, labels: Tensor, momentum: float) -> None:
        """Move the statistics of every class with at least 2 pixels towards the batch's.

        A class updated k times before mixes with ``a = min(1 - 1/(k+1), momentum)``: its first batch is
        copied. The batch covariance is the biased one (divided by the count). Under an initialised
        ``torch.distributed`` group the sums are added over the ranks first, so every rank holds the same memory.

        Args:
            feats: (N, D) pixel features. labels: (N,) int64 classes.
            momentum: the EMA momentum m in [0, 1).
        """
        count, sums, outer = class_moments(feats.float(), labels, self.mean.shape[0])
        if dist.is_available() and dist.is_initialized():
            flat = torch.cat([count, sums.flatten(), outer.flatten()])    # (C + C D + C D D,)
            dist.all_reduce(flat)
            c, d = self.mean.shape
            count, sums, outer = flat[:c], flat[c:c + c * d].view(c, d), flat[c + c * d:].view(c, d, d)
        seen = count >= 2                                                   # (C,)
        n = count.clamp_min(1)[:, None]                                     # (C, 1)
        mean = sums / n                                                     # (C, D)
        cov = outer / n[:, :, None] - mean[:, :, None] * mean[:, None, :]  # (C, D, D)
        a = torch.clamp(1.0 - 1.0 / (self.updates.float() + 1.0), max=momentum)  # (C,)
        a = torch.where(seen, a, torch.ones_like(a))                        # unseen classes keep their statistics
        self.mean.mul_(a[:, None]).add_((1 - a)[:, None] * mean)
        self.cov.mul_(a[:, None, None]).add_((1 - a)[:, None, None] * cov)
        self.updates.add_(seen.long())


def tsa_shift(weight: Tensor, labels: Tensor, delta_mu: Tensor, cov: Tensor, alpha: float,
              padding: int | tuple[int, ...]) -> Tensor:
    """Logit shift s (B, C, *S) of the TSA bound ``CE(z + s, y)`` for a convolutional head (module docstring).

    Args:
        weight: the head's conv weight (C, D, *k) (gradients flow into it).
        labels: (B, *S) int64 class of every pixel (it picks each pixel's augmentation and its target).
        delta_mu: (C, D) mean shift per class. cov: (C, D, D) covariance per class.
        alpha: augmentation strength.
        padding: the head's padding (zero padding: padded pixels are not augmented).

    Returns:
        (B, C, *S), 0 at the target class.
    """
    (num_classes, dim), spatial = weight.shape[:2], labels.shape[1:]
    if tuple(delta_mu.shape) != (num_classes, dim) or tuple(cov.shape) != (num_classes, dim, dim):
        raise ValueError(f"tsa_shift: expected delta_mu {(num_classes, dim)} and cov {(num_classes, dim, dim)} "
                         f"for a head weight {tuple(weight.shape)}, got {tuple(delta_mu.shape)} and {tuple(cov.shape)}")
    dw = weight[:, None] - weight[None, :]                                  # (C, C, D, *k): w_c - w_y
    mean_k = torch.einsum("cyd...,kd->cyk...", dw, delta_mu)                # (C, C, C', *k)
    var_k = torch.einsum("cyd...,kde,cye...->cyk...", dw, cov, dw)          # (C, C, C', *k)
    kernel = (alpha * (mean_k + 0.5 * var_k)).flatten(0, 1)                 # (C*C, C', *k)
    onehot = F.one_hot(labels, num_classes).movedim(-1, 1).to(weight.dtype)  # (B, C', *S)
    conv = F.conv2d if len(spatial) == 2 else F.conv3d
    shift = conv(onehot, kernel, padding=padding)                           # (B, C*C, *S)
    shift = shift.view(labels.shape[0], num_classes, num_classes, *spatial)  # (B, C, C_y, *S)
    index = labels[:, None, None].expand(-1, num_classes, 1, *spatial)      # (B, C, 1, *S)
    return shift.gather(2, index).squeeze(2)                                # (B, C, *S)


def tsa_loss(logits: Tensor, labels: Tensor, weight: Tensor, delta_mu: Tensor, cov: Tensor, alpha: float,
             padding: int | tuple[int, ...]) -> Tensor:
    """The closed-form upper bound of the expected cross-entropy over the augmented features, mean over pixels.

    Args:
        logits: (B, C, *S) of the un-augmented features; the other arguments as :func:`tsa_shift`.
    """
    return F.cross_entropy(logits + tsa_shift(weight, labels, delta_mu, cov, alpha, padding), labels)


def _pixels(feats: Tensor) -> Tensor:
    return feats.movedim(1, -1).reshape(-1, feats.shape[1])                 # (B * prod S, D)


@dataclass
class TransMedSegArgs:
    ema_horizon: float = 1 / 300  # fraction of the run: EMA 0.99 over 30,000 iterations (SSL4MIS MT 2D)
    noise_std: float = 0.1  # the teacher's input noise (Mean Teacher)
    noise_clip: float = 0.2
    beta: float = 1.0  # weight of the TSA bound beside the consistency (both under the ramp w(t))
    alpha_max: float = 0.5  # augmentation strength at the end of the run; alpha(t) = alpha_max * t
    memory_momentum: float = 0.9  # EMA momentum of the class statistics
    stat_pixels: int = 65536  # at most this many random pixels per batch update the memory


@register("transmedseg")
class TransMedSeg(Method):
    """Mean Teacher + the closed-form TSA bound on the student's pixel features."""

    Args = TransMedSegArgs

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        if self.args.stat_pixels < 2 or not 0 <= self.args.memory_momentum < 1:
            raise ValueError(f"transmedseg: expected stat_pixels >= 2 and memory_momentum in [0, 1), got "
                             f"{self.args.stat_pixels} and {self.args.memory_momentum}")
        self.teacher = make_teacher(self.student)
        dim = self.student.decoders[0].head.in_channels
        self.student_memory = FeatureMemory(self.num_classes, dim)
        self.teacher_memory = FeatureMemory(self.num_classes, dim)

    def noise(self, x: Tensor) -> Tensor:
        """Clipped Gaussian noise drawn from the method's generator (resumable)."""
        n = torch.randn(x.shape, generator=self.rng).to(x.device) * self.args.noise_std
        return n.clamp(-self.args.noise_clip, self.args.noise_clip)

    def alpha(self, step: int) -> float:
        """Augmentation strength ``alpha_max * step / max_iters``."""
        return self.args.alpha_max * min(self.progress(step), 1.0)

    def update_memories(self, feats_s: Tensor, feats_t: Tensor, labels: Tensor) -> None:
        """EMA update of both memories from the same random subset of pixels (at most ``stat_pixels``)."""
        fs, ft, y = _pixels(feats_s.detach()), _pixels(feats_t), labels.reshape(-1)  # (N, D), (N, D), (N,)
        if y.numel() > self.args.stat_pixels:
            keep = torch.randperm(y.numel(), generator=self.rng)[:self.args.stat_pixels].to(y.device)
            fs, ft, y = fs[keep], ft[keep], y[keep]
        self.student_memory.update(fs, y, self.args.memory_momentum)
        self.teacher_memory.update(ft, y, self.args.memory_momentum)

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x_l, y_l, x_u = batch["x_l"], batch["y_l"], batch["x_u"]
        bl = x_l.shape[0]
        logits, feats = self.student.decode(self.student.encode(torch.cat([x_l, x_u])))  # (B, C, *S), (B, D, *S)
        sup = self.supervised_loss(logits[:bl], y_l)
        with torch.no_grad():
            x_t = torch.cat([x_l, x_u + self.noise(x_u)])                  # (B, 1, *S)
            logits_t, feats_t = self.teacher.decode(self.teacher.encode(x_t))  # (B, C, *S), (B, D, *S)
            probs_t = torch.softmax(logits_t[bl:], dim=1)                  # (Bu, C, *S)
            labels = torch.cat([y_l, probs_t.argmax(1)])                   # (B, *S)
            if self.training:
                self.update_memories(feats, feats_t, labels)
        head = self.student.decoders[0].head
        delta_mu = self.teacher_memory.mean - self.student_memory.mean      # (C, D)
        tsa = tsa_loss(logits, labels, head.weight, delta_mu, self.teacher_memory.cov, self.alpha(step),
                       head.padding)
        mse = losses.consistency_mse(logits[bl:], probs_t)
        unsup = mse + self.args.beta * tsa
        w = self.cons_weight(step)
        return {"loss": sup + w * unsup, "sup": sup, "unsup": unsup, "mse": mse, "tsa": tsa,
                "w": torch.tensor(w)}

    def after_step(self, step: int) -> None:
        ema_update(self.teacher, self.student, self.ema_decay(), step)
