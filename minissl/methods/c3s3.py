"""C3S3: Complementary Competition and Contrastive Selection (He et al., ICME 2025).

Idea: two networks of *different* architectures (here the library's UNet and a ResNet-encoder UNet,
:class:`~minissl.nets.ResUNet`) make different mistakes. At every step they compete on the labeled
images; the winner teaches the loser on the unlabeled images with sharpened targets, so the better
network of the moment leads (Dynamic Complementary Competition, DCC). Where the two agree that a voxel is
foreground, their voxel features should agree too; where neither calls it foreground, so should they
(Outcome-Driven Contrastive Learning, ODCL). No EMA teacher; at test time the two softmaxes are averaged.

Each network N in {U (UNet), R (ResUNet)} runs twice on the same batch ``x = [x_l; x_u]``: the two
"views" v = 1, 2 differ by dropout only (as in the official code). With ``z^N_v`` the logits,
``p = softmax(z)``, ``f`` projector features (a 1x1 MLP ``Linear-PReLU-Linear`` to 64 channels on the
last decoder map):

    L_sup^N = sum_v 0.5 (CE + Dice)(z^N_v[x_l], y_l)                     (the shared supervised loss)
    C^N     = sum_v alpha CE(z^N_v[x_l], y_l) + (1 - alpha) Dice_fg(z^N_v[x_l], y_l)   (squared Dice, foreground)
    win     = argmin_N C^N  (ties: R),   lose = the other one
    Y_v     = sharpen(p^win_v[x_u], T) = p^(1/T) / sum_c p^(1/T),   detached,  T = 0.1
    L_cp    = sum_v mean( (p^lose_v[x_u] - Y_v)^2 )                       (the loser only)
    L_cos^N = 1 - mean cos(z^N_1, z^N_2)       (cosine along the last spatial axis, as the official code)
    ODCL, per voxel i of a drawn set, s_i = cos(f^U_i, f^R_i), predictions yU = argmax z^U, yR = argmax z^R:
        I_i = [yU_i = yR_i != 0]   (both say the same foreground class: the intersection)
        U_i = [yU_i != 0 or yR_i != 0]   (either says foreground: the union)
        L1  = -mean_i log( e^{I_i s_i / tau} / (sum_j e^{(1 - I_j) s_j / tau} + e^{I_i s_i / tau}) )
        L2  = -mean_i log( e^{(1 - U_i) s_i / tau} / (sum_j e^{U_j s_j / tau} + e^{(1 - U_i) s_i / tau}) )
        L_iuc = sum over the 4 view pairs (U_a, R_b) of L1 + L2,  tau = 0.1
    L = sum_N (L_sup^N + L_cos^N) + w(t) L_cp + L_iuc,   w(t) = cons_weight ramp(step / (rampup max_iters))

Algorithm (per iteration):
    1. draw ``contrast_voxels`` voxel positions of the batch (the method's generator);
    2. four passes: UNet and ResUNet, two dropout views each -> logits and projector features at the drawn voxels;
    3. supervised losses; the competition scores decide the winner (no gradient);
    4. the loser's softmax on x_u is pulled towards the winner's sharpened softmax (ramped weight);
    5. view consistency of each network; intersection/union contrast of the four view pairs;
    6. one step of each network's own optimiser (the run's recipe; the detached targets give each network
       exactly the gradient of its own loss).
Evaluation: the mean of the two softmaxes (returned as log-probabilities).

Memory (3D): the official loss compares every voxel of the batch; minissl draws ``contrast_voxels``
voxels (4096, with replacement) and runs the projector on those only, so the sums over ``j`` above run
over the drawn voxels (``contrast_voxels = 0`` uses every voxel, the official loss). In 3D each network
pass is also recomputed in backward (``nets.checkpointed``, BatchNorm statistics counted once), so one
step at 112x112x80, batch 4, width 16 stays within 8 GiB of CPU memory (``checkpoint = False`` turns it off).

Paper: J. He, Y. Lin, J. Chen, H. Xu, J. Zheng, "C3S3: Complementary Competition and Contrastive
Selection for Semi-Supervised Medical Image Segmentation", ICME 2025, arXiv:2506.07368.
Code: https://github.com/Y-TARL/C3S3 (``train_LA.py``, ``utils/ContrastiveLoss.py``, ``models/ResNet34.py``).

Where the official code differs, and what minissl does:
    * The code has a 3D VNet where minissl has its UNet (2D and 3D); the ResNet34-encoder network is the same
      design (``nets/resunet.py``). Its ``ContrastiveLoss(sample_num=50)`` builds a top-k sampler it never
      calls: the loss covers every voxel. minissl samples voxels (above) to fit in memory.
    * The code backpropagates both networks' totals, each holding the shared contrastive term, so that term
      reaches each network twice (weight 2); minissl counts it once (each network minimises its own loss).
    * Intersection and union are defined for binary labels (class 1); with several classes minissl takes
      "the same foreground class" for the intersection and "any foreground" for the union.
    * The supervised loss is the library's shared ``0.5 (CE + Dice)`` over all classes (the code: foreground
      Dice with squared denominators); the competition score keeps the code's squared foreground Dice.
    * Weight of L_cp: the code uses 0.1 with a sigmoid ramp over ``40 * 150`` of its 2500 iterations, so the
      ramp never completes (0.17 of 0.1 at the end); minissl uses the shared ``cons_weight`` / ``rampup``.
      Its ``step`` schedule (x0.1 at 2500) never applies within its 2500 iterations: the ``official`` recipe
      (3D; there is no 2D script) is SGD 0.01, momentum 0.9, weight decay 1e-4 at a constant rate.
    * alpha: 0.8 in the LA script (0.5 for Pancreas-CT); the ACDC-like 2D suites use 0.8 too (no 2D code).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses
from ..nets import ResUNet, checkpointed
from ..recipes import Recipe, make_optimizer
from .base import Method, register


def competition_score(logits: Tensor, y: Tensor, alpha: float) -> Tensor:
    """``alpha CE + (1 - alpha) Dice`` of one view, Dice squared, foreground classes, sums over the batch.

    Args:
        logits: (B, C, *S) logits on the labeled images. y: (B, *S) int64 labels. alpha: the CE share.
    """
    dice = losses.dice_loss(logits, y, include_background=False, squared=True, batch=True)
    return alpha * losses.ce_loss(logits, y) + (1 - alpha) * dice


def complementary_competition(views_a: list[Tensor], views_b: list[Tensor], score_a: Tensor, score_b: Tensor,
                              temperature: float) -> tuple[Tensor, int]:
    """The winner (lower score; ties go to ``b``) teaches the loser with its sharpened softmax.

    Args:
        views_a, views_b: logits (B, C, *S) of networks a and b on the unlabeled images, one per view.
        score_a, score_b: competition scores (lower is better).
        temperature: sharpening temperature T.

    Returns:
        ``(sum_v mean((softmax(loser_v) - sharpen(softmax(winner_v), T))^2), winner)`` with winner 0 (a) or 1 (b);
        the targets are detached, so the loss trains the loser only.
    """
    winner = 0 if float(score_a) < float(score_b) else 1
    teach, learn = (views_a, views_b) if winner == 0 else (views_b, views_a)
    loss = sum(losses.consistency_mse(z, losses.sharpen(torch.softmax(t.detach(), 1), temperature))
               for z, t in zip(learn, teach))
    return loss, winner


def view_cosine_loss(z_1: Tensor, z_2: Tensor) -> Tensor:
    """``1 - mean cos(z_1, z_2)`` with the cosine along the last spatial axis (the official code's ``dim=-1``)."""
    return 1 - F.cosine_similarity(z_1, z_2, dim=-1).mean()


def intersection_union_masks(pred_a: Tensor, pred_b: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection ``pred_a == pred_b != 0`` and union ``pred_a != 0 or pred_b != 0`` of two label maps (bool)."""
    return (pred_a == pred_b) & (pred_a > 0), (pred_a > 0) | (pred_b > 0)


def intersection_union_loss(feat_a: Tensor, feat_b: Tensor, inter: Tensor, union: Tensor, tau: float) -> Tensor:
    """ODCL ``L1 + L2`` (module docstring) on the features of M voxels.

    Args:
        feat_a, feat_b: (M, D) features of the two networks at the same voxels.
        inter, union: (M,) bool intersection and union masks. tau: temperature.
    """
    s = F.cosine_similarity(feat_a, feat_b, dim=1) / tau  # (M,)

    def term(pos: Tensor) -> Tensor:  # -mean log( e^{pos s} / (sum_j e^{(1 - pos_j) s_j} + e^{pos s}) )
        num = pos * s  # (M,)
        return (torch.logaddexp(torch.logsumexp((1 - pos) * s, 0), num) - num).mean()

    return term(inter.to(s.dtype)) + term(1 - union.to(s.dtype))


@dataclass
class C3S3Args:
    alpha: float = 0.8  # CE share of the competition score (train_LA.py; 0.5 in train_Pancreas.py)
    temperature: float = 0.1  # sharpening temperature of the winner's targets
    tau: float = 0.1  # temperature of the intersection/union contrast
    projector_dim: int = 64  # channels of the projector features
    contrast_voxels: int = 4096  # voxels drawn per step for the contrast (0: every voxel, as the official code)
    checkpoint: bool = True  # 3D: recompute each network pass in backward (memory)


@register("c3s3")
class C3S3(Method):
    """UNet and ResUNet: the labeled-loss winner teaches the loser; intersection/union contrast; ensemble."""

    Args = C3S3Args
    official_recipes = {3: Recipe(schedule="constant", source="Y-TARL/C3S3 train_LA.py")}  # SGD 0.01 / 0.9 / 1e-4

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        self.peer = ResUNet(1, self.num_classes, self.spatial_dims, width=cfg.width, depth=cfg.depth)
        w, d = cfg.width, self.args.projector_dim
        self.projectors = nn.ModuleList(nn.Sequential(nn.Linear(w, w), nn.PReLU(), nn.Linear(w, d)) for _ in range(2))

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """One optimiser of the run's recipe per network (with its projector), as the official code."""
        groups = [[*self.student.parameters(), *self.projectors[0].parameters()],
                  [*self.peer.parameters(), *self.projectors[1].parameters()]]
        return [make_optimizer(g, self.recipe) for g in groups]

    def sample_voxels(self, n: int, device: torch.device) -> Tensor:
        """(M,) flat voxel indices for the contrast: ``contrast_voxels`` draws with replacement, or all n."""
        m = self.args.contrast_voxels
        idx = torch.arange(n) if m <= 0 or m >= n else torch.randint(n, (m,), generator=self.rng)
        return idx.to(device)

    def run(self, i: int, x: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Network i (0 UNet, 1 ResUNet): logits (B, C, *S) and projector features (M, D) at the voxels idx."""
        net = (self.student, self.peer)[i]

        def forward(x: Tensor) -> tuple[Tensor, Tensor]:
            logits, last = net.decode(net.encode(x), 0)  # (B, C, *S), (B, width, *S)
            return logits, last.movedim(1, -1).reshape(-1, last.shape[1])[idx]  # (B, C, *S), (M, width)

        use_ckpt = self.args.checkpoint and self.spatial_dims == 3 and torch.is_grad_enabled()
        logits, feat = checkpointed(forward, x, net=net) if use_ckpt else forward(x)
        return logits, self.projectors[i](feat)  # (B, C, *S), (M, D)

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x_l, y_l, x_u = batch["x_l"], batch["y_l"], batch["x_u"]
        bl, a = x_l.shape[0], self.args
        x = torch.cat([x_l, x_u])  # (B, 1, *S)
        idx = self.sample_voxels(x[:, 0].numel(), x.device)  # (M,)
        out = [[self.run(i, x, idx) for _view in range(2)] for i in range(2)]  # out[net][view] = (logits, feat)
        z = [[o[0] for o in views] for views in out]  # z[net][view]: (B, C, *S)
        sup = sum(self.supervised_loss(zv[:bl], y_l) for views in z for zv in views)
        with torch.no_grad():
            scores = [sum(competition_score(zv[:bl], y_l, a.alpha) for zv in views) for views in z]
        cp, winner = complementary_competition([zv[bl:] for zv in z[0]], [zv[bl:] for zv in z[1]], *scores,
                                               a.temperature)
        cos = view_cosine_loss(*z[0]) + view_cosine_loss(*z[1])
        preds = [[zv.detach().argmax(1).reshape(-1)[idx] for zv in views] for views in z]  # (M,) each
        contrast = sum(intersection_union_loss(out[0][u][1], out[1][r][1],
                                               *intersection_union_masks(preds[0][u], preds[1][r]), a.tau)
                       for u in range(2) for r in range(2))
        w = self.cons_weight(step)
        unsup = w * cp + contrast  # the unlabeled terms as they enter the loss
        return {"loss": sup + cos + unsup, "sup": sup, "unsup": unsup, "cp": cp, "contrast": contrast, "cos": cos,
                "w": torch.tensor(w), "winner": torch.tensor(float(winner)), "score_unet": scores[0],
                "score_resunet": scores[1]}

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Log of the mean softmax of both networks (B, C, *S)."""
        probs = 0.5 * (torch.softmax(self.student(x), 1) + torch.softmax(self.peer(x), 1))  # (B, C, *S)
        return torch.log(probs.clamp_min(1e-12))
