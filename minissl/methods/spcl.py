"""SPCL: Self-Paced Contrastive Learning with meta-labels (Peng, Wang, Desrosiers, Pedersoli, NeurIPS 2021).

Idea: scans come with labels that cost nothing: where a slice lies in its volume, which patient it
belongs to, which cardiac phase it shows. Slices that share such a meta-label should look alike to
the encoder, so a supervised-contrastive (SupCon) loss on these meta-labels pre-trains the encoder
on every scan, labeled or not, before the network is fine-tuned on the few labeled ones. The
meta-labels are noisy positives (the base and the middle of two hearts can share a partition and
look different), so a self-paced weight ignores hard positive pairs early and lets them in as its
threshold gamma grows.

Meta-labels of a slice ``z`` of a scan with ``Z`` slices (``meta_l`` / ``meta_u`` rows of the batch):

    partition = floor(z * P / Z)   (P = 3 equal slabs for ACDC)      patient = the scan's patient id
    phase     = ED / ES where the suite records it (``cardiac`` does); an unknown value (-1) makes the
                sample a class of its own, so that term falls back to instance contrast for it. The
                partition is unknown for items that are not slices (2D images, 3D volumes).

Loss, with ``u = normalize(g(mean_pool(f_enc(x))))`` the projection of the bottleneck ("Conv5"), two
views per image (2n vectors), ``P(i)`` the other vectors with i's label (the other view included):

    l_ij = -log( exp(u_i . u_j / tau) / sum_{k != i} exp(u_i . u_k / tau) )                (tau = 0.07)
    w_ij = max(0, 1 - l_ij / gamma)  (soft)   or   1[l_ij <= gamma]  (hard); no gradient through w
    L    = -mean_i ( sum_{j in P(i)} w_ij (-l_ij) / |P(i)| )     (/ mean_{P} w_ij with ``correct_grad``)
    gamma(t) = gamma_begin + (gamma_end - gamma_begin) t^p,   t = step / pre-training iterations

Negatives keep weight 1 in the denominator. One such term per meta-label, summed (the paper's
multi-meta-label runs add partition, patient and phase with weight 1 each).

Algorithm (two stages in one run, the engine's loop throughout):
    stage 1 (first ``pretrain`` = 4/7 of max_iters; the paper: 80 of 80 + 60 epochs), every image of
        the batch (labeled and unlabeled, ``[x_l; x_u]``), two views (the loader's sample and a
        random flip / rot90 / contrast change of it): L above; only the encoder and the projector
        receive gradients; ``sup`` is reported (computed without gradient) so the log shows the
        untrained decoder;
    switch: the optimiser state is cleared and the learning-rate schedule starts again (the official
        code builds a new optimiser and scheduler); the last pre-trained weights go on (validation
        Dice of a decoder that was not trained says nothing about the encoder, so the engine's
        best-on-validation stage switch is not used);
    stage 2 (the rest): fine-tuning of the whole UNet with the supervised loss on the labeled images.
``pretrain 0`` is the comparison without pre-training (the same network, fine-tuning only):
``--method spcl --pretrain 0`` paired with the default at the same seeds and iterations.
Reported parts: ``unsup`` = L (0 in stage 2), ``sup``, and in stage 1 ``w_pos`` = the mean self-paced
weight of the positive pairs and ``gamma``.

Paper: J. Peng, P. Wang, C. Desrosiers, M. Pedersoli, "Self-Paced Contrastive Learning for
Semi-supervised Medical Image Segmentation with Meta-labels", NeurIPS 2021, arXiv:2107.13741.
Code: https://github.com/jizongFox/Self-paced-Contrastive-Learning (``contrastyou/losses/contrast_loss3.py``
``SelfPacedSupConLoss``, ``semi_seg/hooks/infonce.py`` ``PScheduler``, ``semi_seg/main_infonce.py``).

Where the official code differs, and what minissl does:
    * pre-training batches are drawn by a scan sampler (10 scans x one slice per partition), so every
      partition and patient has positives; minissl contrasts the engine's batch of random slices
      (positives by partition and phase are common, by patient rare: then the other view only);
    * the first view's feature map is transformed after the encoder by the same affine map as the
      second view's image; minissl pools the bottleneck globally, so flips / rot90 need no such step;
    * gamma moves once per epoch with one (begin, end) pair per meta-label (5/3.5/2 -> 60/50/50 in the
      three-label script); minissl moves it every iteration, one pair for all labels (5 -> 60, p = 0.5);
    * fine-tuning uses a KL (= cross-entropy with one-hot targets) loss; minissl the shared supervised
      loss (Dice + CE);
    * ``--recipe official``: RAdam with a warm-up of 10 of 80 epochs (12.5 % of each stage here) and a
      cosine decay, in each stage anew; the official fine-tuning rate is 6e-5 (ACDC) against 2e-4 in
      pre-training, minissl uses 2e-4 in both stages.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..recipes import Recipe, stage_lr_factor
from .base import Method, register

META_LABELS = ("partition", "patient", "phase")


@dataclass
class SPCLArgs:
    pretrain: float = 4 / 7  # contrastive pre-training stage, fraction of max_iters (80 of 140 epochs); 0 = without
    meta_labels: str = "partition,patient,phase"  # comma-separated meta-labels, one SupCon term each
    partitions: int = 3  # equal slice-position partitions per scan (ACDC: 3)
    temperature: float = 0.07  # tau of the SupCon loss
    weighting: str = "soft"  # self-paced weight of a positive pair: soft | hard
    gamma_begin: float = 5.0  # gamma at the start of pre-training (released ACDC runs: 5)
    gamma_end: float = 60.0  # gamma at its end (60)
    gamma_power: float = 0.5  # p of gamma(t) = begin + (end - begin) t^p
    correct_grad: bool = False  # divide L by the mean positive weight
    proj_dim: int = 256  # hidden and output width of the projector


def meta_label(meta: Tensor, kind: str, partitions: int) -> Tensor:
    """One meta-label per item from the loader's meta rows.

    Args:
        meta: (N, 4) int64 rows ``(patient, slice, slices, phase)`` (``datasets.META_COLUMNS``).
        kind: "partition" (``floor(slice * partitions / slices)``; -1 for a 2D image or a volume, which
            is no slice of a scan), "patient" or "phase" (-1 unknown).
        partitions: equal slabs per scan.

    Returns:
        (N,) int64 labels.
    """
    patient, z, slices, phase = meta.unbind(1)  # (N,) each
    if kind == "partition":  # unknown (-1) for items that are not slices of a scan
        return torch.where(slices > 1, z * partitions // slices.clamp(min=1), -1)
    if kind == "patient":
        return patient
    if kind == "phase":
        return phase
    raise ValueError(f"spcl: unknown meta-label {kind!r}: expected one of {META_LABELS}")


def gamma_at(t: float, begin: float, end: float, power: float) -> float:
    """The self-paced threshold ``begin + (end - begin) t^power`` at progress ``t`` in [0, 1]."""
    return begin + (end - begin) * min(max(t, 0.0), 1.0) ** power


def self_paced_supcon(u1: Tensor, u2: Tensor, labels: Tensor, gamma: float, temperature: float = 0.07,
                      weighting: str = "soft", correct_grad: bool = False) -> tuple[Tensor, Tensor]:
    """Self-paced supervised-contrastive loss of two views (equations in the module docstring).

    Args:
        u1, u2: (n, D) L2-normalised projections of the two views.
        labels: (n,) int64 meta-labels; a negative label is unknown (the item is a class of its own).
        gamma: the self-paced threshold. temperature: tau. weighting: "soft" or "hard".
        correct_grad: divide by the mean weight of the positive pairs.

    Returns:
        (loss, mean weight of the positive pairs), both scalars.
    """
    n = u1.shape[0]
    own = -1 - torch.arange(n, device=labels.device)  # (n,) distinct negative ids
    y = torch.where(labels < 0, own, labels).repeat(2)  # (2n,)
    u = torch.cat([u1, u2])  # (2n, D)
    eye = torch.eye(2 * n, dtype=torch.bool, device=u.device)  # (2n, 2n)
    sim = (u @ u.T / temperature).masked_fill(eye, float("-inf"))  # (2n, 2n)
    log_prob = (sim - torch.logsumexp(sim, dim=1, keepdim=True)).masked_fill(eye, 0.0)  # (2n, 2n) = -l_ij
    pos = (y[:, None] == y[None, :]) & ~eye  # (2n, 2n)
    with torch.no_grad():
        l_ij = -log_prob
        w = (l_ij <= gamma).to(u.dtype) if weighting == "hard" else (1.0 - l_ij / gamma).clamp(min=0.0)
        w = w * pos  # (2n, 2n) zero off the positives
        ratio = w.sum() / pos.sum()
    loss = -((w * log_prob).sum(1) / pos.sum(1)).mean()
    if correct_grad and ratio > 0:
        loss = loss / ratio
    return loss, ratio


@register("spcl")
class SPCL(Method):
    """Self-paced meta-label contrastive pre-training of the encoder, then supervised fine-tuning."""

    Args = SPCLArgs
    official_recipes = {2: Recipe("radam", lr=2e-4, momentum=0.9, weight_decay=1e-5, schedule="cosine", warmup=0.125,
                                  source="jizongFox/Self-paced-Contrastive-Learning config/pretrain.yaml, "
                                         "semi_seg/trainers/base.py")}

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        a = self.args
        self.kinds = [k.strip() for k in a.meta_labels.split(",") if k.strip()]
        if not self.kinds or any(k not in META_LABELS for k in self.kinds):
            raise ValueError(f"spcl: --meta_labels expected a comma-separated subset of {META_LABELS}, "
                             f"got {a.meta_labels!r}")
        if a.weighting not in ("soft", "hard") or a.partitions < 1 or not 0 <= a.pretrain < 1 or a.gamma_begin <= 0:
            raise ValueError(f"spcl: expected --weighting soft|hard, --partitions >= 1, 0 <= --pretrain < 1 and "
                             f"--gamma_begin > 0, got {a.weighting!r}, {a.partitions}, {a.pretrain}, {a.gamma_begin}")
        self.pretrain_iters = int(round(a.pretrain * self.max_iters))
        c = self.student.encoder[-1][0].out_channels  # bottleneck channels
        self.projector = nn.Sequential(nn.Linear(c, a.proj_dim), nn.ReLU(), nn.Linear(a.proj_dim, a.proj_dim))

    def pooled(self, x: Tensor) -> Tensor:
        """The bottleneck ("Conv5") averaged over space, (B, c): what the meta-labels shape."""
        return self.student.encode(x)[-1].flatten(2).mean(2)  # (B, c)

    def project(self, x: Tensor) -> Tensor:
        """Normalised projections of the pooled bottleneck, (B, proj_dim)."""
        return F.normalize(self.projector(self.pooled(x)), dim=1)  # (B, proj_dim)

    def view(self, x: Tensor) -> Tensor:
        """The second view: a random rot90 / flip and a contrast change per image (the method's generator)."""
        b, dims = x.shape[0], tuple(range(2, x.ndim))
        k, flip = torch.randint(0, 4, (b,), generator=self.rng), torch.rand(b, generator=self.rng) < 0.5
        k = k if x.shape[-1] == x.shape[-2] else k - k % 2  # non-square images: 0 or 180 degrees only
        scale, shift = 0.8 + 0.4 * torch.rand(b, generator=self.rng), 0.2 * torch.rand(b, generator=self.rng) - 0.1
        out = []
        for i in range(b):
            v = torch.rot90(x[i], int(k[i]), dims=(dims[-2] - 1, dims[-1] - 1))  # (1, *S)
            out.append((v.flip(-1) if flip[i] else v) * float(scale[i]) + float(shift[i]))
        return torch.stack(out)  # (B, 1, *S)

    def gamma(self, step: int) -> float:
        """gamma at ``step`` of the pre-training stage."""
        a = self.args
        return gamma_at(step / max(self.pretrain_iters, 1), a.gamma_begin, a.gamma_end, a.gamma_power)

    def contrastive_loss(self, x: Tensor, meta: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Sum over the meta-labels of the self-paced SupCon loss, and the mean positive weight."""
        a = self.args
        u1, u2 = self.project(torch.cat([x, self.view(x)])).chunk(2)  # (B, D) each, one encoder pass
        total, ratios = x.new_zeros(()), []
        for kind in self.kinds:
            loss, ratio = self_paced_supcon(u1, u2, meta_label(meta, kind, a.partitions), self.gamma(step),
                                            a.temperature, a.weighting, a.correct_grad)
            total, ratios = total + loss, ratios + [ratio]
        return total, torch.stack(ratios).mean()

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x_l, y_l = batch["x_l"], batch["y_l"]
        if step >= self.pretrain_iters:
            sup = self.supervised_loss(self.student(x_l), y_l)
            return {"loss": sup, "sup": sup, "unsup": sup.new_zeros(())}
        x = torch.cat([x_l, batch["x_u"]])  # (Bl + Bu, 1, *S): meta-labels are free for every scan
        meta = torch.cat([batch["meta_l"], batch["meta_u"]])  # (Bl + Bu, 4)
        unsup, w_pos = self.contrastive_loss(x, meta, step)
        with torch.no_grad():
            sup = self.supervised_loss(self.student(x_l), y_l)
        return {"loss": unsup, "sup": sup, "unsup": unsup, "w_pos": w_pos, "gamma": torch.tensor(self.gamma(step))}

    def lr_factor(self, step: int) -> float:
        """The recipe's schedule in each stage anew (the official code trains the stages with two optimisers)."""
        return stage_lr_factor(self.recipe, step, self.max_iters, self.pretrain_iters)

    def update(self, batch: dict[str, Tensor], step: int, optimizers: list[torch.optim.Optimizer]) -> dict[str, float]:
        """The default update; after the last pre-training iteration the optimiser state is cleared."""
        logs = super().update(batch, step, optimizers)
        if step + 1 == self.pretrain_iters:
            for opt in optimizers:
                opt.state.clear()
        return logs
