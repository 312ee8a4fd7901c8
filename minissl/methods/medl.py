"""MEDL: Mutual Evidential Deep Learning (He et al., IEEE BIBM 2024; extended arXiv:2505.12418).

Idea: two networks of different architectures (the library's UNet and the ResNet-encoder
:class:`~minissl.nets.ResUNet`) each output *evidence* for every class instead of a softmax. Evidence
gives a Dirichlet distribution, so every voxel carries belief masses and an explicit uncertainty mass.
On unlabeled images the two networks' beliefs are fused by a class-aware Dempster-like rule (CAEF) into
pseudo-labels and a fused uncertainty; the fused belief entropy gives a reliability that masks the
pseudo-labels; voxels ranked by uncertainty get a curriculum weight that moves learning from certain to
uncertain voxels over the run; a Fisher-information evidential loss (I-EDL) trains on the pseudo-labels.

Evidential basics (eq. 1), K classes, evidence ``e = exp(clamp(z, -10, 10))`` of the logits z:

    alpha_n = e_n + 1,  S = sum_n alpha_n,  b_n = e_n / S,  u = K / S,  p_n = alpha_n / S,  sum_n b_n + u = 1
CAEF (eq. 3) of two networks' masses (b1, u1), (b2, u2), then normalised so that sum_n b_n + u = 1:

    b_n = b1_n b2_n + c (b1_n u2 + b2_n u1),   u = u1 u2,   c = |C_n| / (|C_n| + |C_K|) = 1 / (1 + K)
    (c = 1 is Dempster's rule of the trusted multi-view classifier, TMC: the conflict is normalised away)
Reliability (eq. 4):  R = exp( u sum_n b_n log2 b_n ) in (0, 1]     (fused masses)
Curriculum weight (eq. 6), per sample, h(v) = 1..V the voxel's rank from the most certain voxel:

    omega = Xi tanh( psi zeta ) + 1,   psi = 2 h(v) / V - 1,   zeta = 2 t - 1,   t = step / max_iters
    (t < 1/2: certain voxels weigh up to 1 + Xi and uncertain ones down to 1 - Xi; after half the run the
    reverse; at t = 1/2 every weight is 1)
I-EDL loss (eq. 7), y the one-hot pseudo-label, psi1 the trigamma function, I the Dirichlet Fisher information:

    L_I = omega [ sum_n ((y_n - p_n)^2 + alpha_n (S - alpha_n) / (S^2 (S + 1))) psi1(alpha_n) - lambda log|I(alpha)| ]
    log|I(alpha)| = sum_n log psi1(alpha_n) + log(1 - psi1(S) sum_n 1 / psi1(alpha_n))     (det of diag - rank one)
Per network i (eqs. 5, 8, 9), with the masses detached where they make targets or weights:

    L_l   = 0.5 (CE + Dice)(p_i[x_l], y_l)                          (the shared supervised loss, on p = alpha / S)
    L_u   = 0.5 (CE + Dice)(p_i[x_u], argmax b_f; voxel weight m)   (m: the reliability mask of R)
    L_wl  = mean_v omega(u_i^l) CE_v(p_i[x_l], y_l),   u_i^l = lambda1 u_i + (1 - lambda1) u_f   (eq. 5)
    L_Iu  = mean_v m omega(u_f) I-EDL(alpha_i[x_u], argmax b_f)
    L     = sum_i (L_l + L_u + L_wl + w(t) L_Iu),   w(t) = cons_weight ramp(step / (rampup max_iters))

Algorithm (per iteration): both networks on ``[x_l; x_u]`` -> evidence -> (alpha, b, u); CAEF of the
detached masses; pseudo-labels, reliability and uncertainty ranks on x_u; the four losses of each
network; one optimiser step over both (targets and weights are detached, so each network gets its own gradient).
Evaluation averages the two networks' p; ``uncertainty(x)`` is the CAEF uncertainty mass u_f.

Values the paper leaves open, chosen here (Args): ``xi = 0.5`` (its Xi; weights in [0.5, 1.5]); the
masking rule of R ("as UPCoL"): ``reliability = "soft"`` uses m = R as a voxel weight (UPCoL weights its
unlabeled loss by a reliability map), ``"hard"`` keeps voxels with R >= ``reliability_threshold``; the
Fisher weight lambda, which the paper writes as lambda2 (the symbol of eq. 5), takes lambda2's value 0.5;
the evidence activation (``exp`` of clamped logits: with ``softplus`` a confident p needs logits of
tens, and on the learning test's phantom the supervised loss fell half as fast); the voxel loss of L_wl
(cross-entropy). The text ranks voxels "by
uncertainty in descending order", which, read literally (most uncertain first), up-weights uncertain
voxels early, the opposite of the curriculum the text and its Fig. 1 describe; minissl follows the
described curriculum (certain voxels first). The Gaussian warm-up lambda_GWU is the shared ramp.
Memory (3D): each network pass is recomputed in backward (``nets.checkpointed``) when ``checkpoint``.

Paper: Y. He, Y. Bi, L. Li, C.-M. Pun, W. Jiao, Z. Jin, "Mutual Evidential Deep Learning for Medical Image
Segmentation", IEEE BIBM 2024, pp. 2010-2017; arXiv:2505.12418. No official code was found: the networks
(VNet and a ResNet34-encoder VNet in the paper; minissl's UNet and ResUNet) and every open value above are
minissl's. The ``official`` recipe is the paper's (Sec. III, stated for all its datasets): SGD 0.01, momentum
0.9, weight decay 1e-4, the rate x0.1 every 2500 of 6000 iterations (every 5/12 of the run).
I-EDL: D. Deng et al., "Uncertainty Estimation by Fisher Information-based Evidential Deep Learning", ICML 2023.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import losses
from ..nets import ResUNet, checkpointed
from ..recipes import Recipe
from .base import Method, register


def dirichlet(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Evidence ``exp(clamp(z, -10, 10))`` -> ``(alpha (B, K, *S), belief b = e / S (B, K, *S), u = K / S (B, *S))``."""
    alpha = logits.clamp(-10, 10).exp() + 1  # (B, K, *S)
    s = alpha.sum(1)  # (B, *S)
    return alpha, (alpha - 1) / s.unsqueeze(1), alpha.shape[1] / s


def caef(b1: Tensor, u1: Tensor, b2: Tensor, u2: Tensor, factor: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Class-aware evidential fusion: ``b = b1 b2 + c (b1 u2 + b2 u1)``, ``u = u1 u2``, normalised to sum 1.

    Args:
        b1, b2: (B, K, *S) belief masses. u1, u2: (B, *S) uncertainty masses.
        factor: c; None gives the class-aware ``1 / (1 + K)``, 1.0 gives Dempster's rule (TMC).

    Returns:
        (b (B, K, *S), u (B, *S)) with ``b.sum(1) + u == 1``.
    """
    c = 1.0 / (1 + b1.shape[1]) if factor is None else factor
    b = b1 * b2 + c * (b1 * u2.unsqueeze(1) + b2 * u1.unsqueeze(1))  # (B, K, *S)
    u = u1 * u2  # (B, *S)
    total = b.sum(1) + u  # (B, *S)
    return b / total.unsqueeze(1), u / total


def reliability(b: Tensor, u: Tensor) -> Tensor:
    """``R = exp(u sum_n b_n log2 b_n)`` (0 log 0 = 0), (B, *S) in (0, 1]."""
    return torch.exp(u * torch.special.xlogy(b, b).sum(1) / math.log(2))


def curriculum_weight(u: Tensor, progress: float, xi: float) -> Tensor:
    """``omega = xi tanh(psi zeta) + 1`` per voxel; psi from the voxel's rank within its sample (most certain first).

    Args:
        u: (B, *S) uncertainty. progress: ``step / max_iters`` in [0, 1]. xi: the amplitude Xi.
    """
    flat = u.reshape(u.shape[0], -1)  # (B, V)
    rank = flat.argsort(dim=1, stable=True).argsort(dim=1) + 1  # (B, V) h(v): 1 = the most certain
    psi = 2 * rank.to(u.dtype) / flat.shape[1] - 1  # (B, V)
    return (xi * torch.tanh(psi * (2 * progress - 1)) + 1).reshape(u.shape)  # (B, *S)


def iedl_loss(alpha: Tensor, target: Tensor, fisher_weight: float) -> Tensor:
    """Per-voxel I-EDL loss (eq. 7 without omega) of Dirichlet ``alpha`` (B, K, *S) and labels ``target`` (B, *S)."""
    s = alpha.sum(1, keepdim=True)  # (B, 1, *S)
    y = F.one_hot(target, alpha.shape[1]).movedim(-1, 1).to(alpha.dtype)  # (B, K, *S)
    tri = torch.polygamma(1, alpha)  # (B, K, *S)
    fit = (((y - alpha / s) ** 2 + alpha * (s - alpha) / (s ** 2 * (s + 1))) * tri).sum(1)  # (B, *S)
    logdet = tri.log().sum(1) + torch.log1p(-torch.polygamma(1, s[:, 0]) * (1 / tri).sum(1))  # (B, *S)
    return fit - fisher_weight * logdet


@dataclass
class MEDLArgs:
    xi: float = 0.5  # Xi, the curriculum amplitude (not given in the paper): weights in [1 - xi, 1 + xi]
    lambda1: float = 0.5  # eq. 5: labeled uncertainty = lambda1 u_i + (1 - lambda1) u_fused (Table VII best)
    fisher_weight: float = 0.5  # lambda of log|I| in the I-EDL loss (the paper's lambda2)
    caef_factor: Optional[float] = None  # None: 1 / (1 + K) (CAEF); 1.0: Dempster's rule (plain EF, TMC)
    reliability: str = "soft"  # masking rule: "soft" (voxel weight R) or "hard" (R >= reliability_threshold)
    reliability_threshold: float = 0.5  # used by "hard"
    checkpoint: bool = True  # 3D: recompute each network pass in backward (memory)


@register("medl")
class MEDL(Method):
    """Two evidential networks fused by CAEF; reliability-masked pseudo-labels; curriculum; I-EDL."""

    Args = MEDLArgs
    has_uncertainty = True
    official_recipes = {d: Recipe(schedule="step", step_every=2500 / 6000, step_gamma=0.1,
                                  source="arXiv:2505.12418 Sec. III (no code released)") for d in (2, 3)}

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        if self.args.reliability not in ("soft", "hard"):
            raise ValueError(f"medl: method_args.reliability must be 'soft' or 'hard', got {self.args.reliability!r}")
        self.peer = ResUNet(1, self.num_classes, self.spatial_dims, width=cfg.width, depth=cfg.depth)

    def evidential(self, x: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """``(alpha, b, u)`` of both networks (UNet, ResUNet) on x."""
        use_ckpt = self.args.checkpoint and self.spatial_dims == 3 and torch.is_grad_enabled()
        return [dirichlet(checkpointed(net, x, net=net) if use_ckpt else net(x)) for net in (self.student, self.peer)]

    def fuse(self, masses: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """CAEF of the two networks' detached masses: (b (B, K, *S), u (B, *S))."""
        (_, b1, u1), (_, b2, u2) = masses
        return caef(b1.detach(), u1.detach(), b2.detach(), u2.detach(), self.args.caef_factor)

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x_l, y_l, x_u = batch["x_l"], batch["y_l"], batch["x_u"]
        bl, a, t = x_l.shape[0], self.args, self.progress(step)
        masses = self.evidential(torch.cat([x_l, x_u]))  # per network (alpha, b, u) on (B, ...)
        b_f, u_f = self.fuse(masses)  # (B, K, *S), (B, *S)
        pseudo = b_f[bl:].argmax(1)  # (Bu, *S)
        r = reliability(b_f[bl:], u_f[bl:])  # (Bu, *S)
        mask = r if a.reliability == "soft" else (r >= a.reliability_threshold).to(r.dtype)  # (Bu, *S)
        omega_u = curriculum_weight(u_f[bl:], t, a.xi)  # (Bu, *S)
        sup = unsup = weighted = fie = 0
        for alpha, _, u in masses:
            log_p = alpha.log()  # (B, K, *S): softmax(log alpha) = alpha / S, so the losses see p
            sup = sup + self.supervised_loss(log_p[:bl], y_l)
            unsup = unsup + losses.dice_ce_loss(log_p[bl:], pseudo, mask, lambda_dice=0.5, lambda_ce=0.5)
            omega_l = curriculum_weight(a.lambda1 * u[:bl].detach() + (1 - a.lambda1) * u_f[:bl], t, a.xi)  # (Bl, *S)
            weighted = weighted + losses.ce_loss(log_p[:bl], y_l, omega_l, reduction="sum") / omega_l.numel()
            fie = fie + (mask * omega_u * iedl_loss(alpha[bl:], pseudo, a.fisher_weight)).mean()
        w = self.cons_weight(step)
        return {"loss": sup + unsup + weighted + w * fie, "sup": sup, "unsup": unsup, "weighted_l": weighted,
                "fie": fie, "w": torch.tensor(w), "u_fused": u_f[bl:].mean(), "reliability": r.mean()}

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Log of the mean Dirichlet expectation ``alpha / S`` of both networks (B, K, *S)."""
        probs = sum(alpha / alpha.sum(1, keepdim=True) for alpha, _, _ in self.evidential(x)) / 2  # (B, K, *S)
        return torch.log(probs)

    @torch.no_grad()
    def uncertainty(self, x: Tensor) -> Tensor:
        """The CAEF uncertainty mass of both networks on x, (B, *S) in (0, 1)."""
        return self.fuse(self.evidential(x))[1]
