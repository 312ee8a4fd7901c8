"""Cross Pseudo Supervision, CPS (Chen et al., CVPR 2021).

Idea: two networks of the same architecture but different initialisations look at the same images.
Each turns its prediction into a hard pseudo-label (argmax) that supervises the *other* one. The two
networks start apart, so their errors differ; teaching each other, they expand the confident regions
while staying different enough not to collapse into one. Unlike Mean Teacher both networks are
trained by gradient descent; neither is an EMA of the other.

Equations, with ``f_1`` the student, ``f_2`` the peer, ``y_k = argmax_c f_k(x)`` (no gradient):

    L_sup = L_sup(f_1(x_l), y_l) + L_sup(f_2(x_l), y_l)                   (0.5 (CE + Dice) each)
    L_cps = CE(f_1(x), y_2) + CE(f_2(x), y_1),   x = x_u  (labeled_cps: x = [x_l; x_u], one mean over both)
    L     = L_sup + w(t) L_cps,      w(t) = cons_weight ramp(step / (rampup max_iters))

Algorithm (per iteration):
    1. both networks on ``[x_l; x_u]`` -> logits ``z_1, z_2``;
    2. supervised loss of each network on the labeled part;
    3. hard pseudo-labels ``y_1 = argmax z_1``, ``y_2 = argmax z_2``, detached;
    4. cross CE: ``z_1`` against ``y_2`` and ``z_2`` against ``y_1`` on the unlabeled images (on the
       labeled images too with ``labeled_cps=True``, as the paper), weighted by ``w(t)``;
    5. one SGD step over both networks (the peer is a submodule, so the base optimiser holds it; with
       the pseudo-labels detached, the summed loss gives each network exactly its own gradient, as the
       official code's two optimisers do).
Evaluation uses the student ``f_1`` (SSL4MIS tests model 1); ``predict_average=True`` uses the mean
of both softmaxes (returned as log-probabilities, whose argmax is the ensemble's).

Paper: X. Chen, Y. Yuan, G. Zeng, J. Wang, "Semi-Supervised Semantic Segmentation with Cross Pseudo
Supervision", CVPR 2021, arXiv:2106.01226 (code: https://github.com/charlesCXK/TorchSemiSeg).
Medical recipe: https://github.com/HiLab-git/SSL4MIS ``code/train_cross_pseudo_supervision_2D/3D.py``.

Where the codes differ, and what minissl follows:
    * The paper applies CPS to labeled and unlabeled images (``L_cps = L_cps^l + L_cps^u``; its code
      takes one CE mean over the concatenated batch) with a constant weight (1.5 on VOC, 6 on
      Cityscapes) and ImageNet-pretrained backbones. SSL4MIS, whose runs give the published ACDC
      numbers of CPS, applies it to the unlabeled images only, with the MT-style weight 0.1 ramped over
      the run (``iter // 150``). minissl follows SSL4MIS by default (``labeled_cps=False``; True gives
      the paper's concatenated-batch term) with the shared ``cfg.cons_weight`` / ``cfg.rampup``. Why:
      from scratch, both networks first agree on "background everywhere"; the labeled cross term then
      confirms that bias on the very images that carry labels, and on the tiny phantom of the learning
      test (weight 1 after 10 % of 40 iterations) the student collapsed to background (Dice 0), while
      the unlabeled-only version learned (Dice 0.72).
    * Initialisation: TorchSemiSeg draws two Kaiming-normal inits. SSL4MIS's 3D script gives model 1
      Kaiming-normal and model 2 Xavier-normal conv weights (BatchNorm weight 1, bias 0; transposed
      convolutions keep their default); its 2D script builds both networks with the default init (two
      draws). minissl follows SSL4MIS: two default draws in 2D, Kaiming / Xavier in 3D.
    * The code steps two SGD optimisers; minissl one over both networks (the same update, see above).

Recipe: the shared one by default; ``--recipe official`` gives SSL4MIS's
(``code/train_cross_pseudo_supervision_2D.py``, ``_3D.py``): SGD 0.01, momentum 0.9, weight decay 1e-4,
poly over the run for both networks, the shared recipe's values (the 3D script trains on BraTS 2019:
SSL4MIS has no LA script). No EMA (the scripts' ``ema_decay`` is unused).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import losses
from ..recipes import Recipe
from .base import Method, register


def normal_init(net: nn.Module, kind: str) -> nn.Module:
    """SSL4MIS's ``kaiming_normal_init_weight`` / ``xavier_normal_init_weight`` (``kind``: kaiming | xavier):
    normal conv weights (transposed convolutions untouched), BatchNorm weight 1 and bias 0."""
    init = {"kaiming": nn.init.kaiming_normal_, "xavier": nn.init.xavier_normal_}[kind]
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            init(m.weight)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def cross_pseudo_loss(logits_1: Tensor, logits_2: Tensor) -> Tensor:
    """``CE(z_1, argmax z_2) + CE(z_2, argmax z_1)``, the argmax targets detached.

    Args:
        logits_1, logits_2: (B, C, *S) logits of the two networks on the same images.
    """
    if logits_1.shape != logits_2.shape:
        raise ValueError(f"cross_pseudo_loss: expected two logits of the same shape, got "
                         f"{tuple(logits_1.shape)} and {tuple(logits_2.shape)}")
    pseudo_1, pseudo_2 = logits_1.detach().argmax(1), logits_2.detach().argmax(1)  # (B, *S) each
    return losses.ce_loss(logits_1, pseudo_2) + losses.ce_loss(logits_2, pseudo_1)


@dataclass
class CPSArgs:
    labeled_cps: bool = False  # also cross-supervise the labeled images (paper); False: x_u only (SSL4MIS)
    predict_average: bool = False  # evaluate the mean softmax of both networks instead of the student


@register("cps")
class CPS(Method):
    """Two networks of different initial weights, each trained on the other's hard pseudo-labels."""

    Args = CPSArgs
    official_recipes = {
        2: Recipe("sgd", 0.01, 0.9, 1e-4, "poly",
                  source="HiLab-git/SSL4MIS code/train_cross_pseudo_supervision_2D.py"),
        3: Recipe("sgd", 0.01, 0.9, 1e-4, "poly",
                  source="HiLab-git/SSL4MIS code/train_cross_pseudo_supervision_3D.py"),
    }

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        self.peer = self.make_net()  # 2D: a second default draw, as SSL4MIS's 2D script
        if self.spatial_dims == 3:  # SSL4MIS's 3D script: Kaiming-normal model 1, Xavier-normal model 2
            normal_init(self.student, "kaiming")
            normal_init(self.peer, "xavier")

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x_l, y_l, x_u = batch["x_l"], batch["y_l"], batch["x_u"]
        bl = x_l.shape[0]
        x = torch.cat([x_l, x_u])  # (Bl + Bu, 1, *S)
        z_1, z_2 = self.student(x), self.peer(x)  # (Bl + Bu, C, *S) each
        sup = self.supervised_loss(z_1[:bl], y_l) + self.supervised_loss(z_2[:bl], y_l)
        first = 0 if self.args.labeled_cps else bl  # the cross terms cover x_l too, or x_u only
        unsup = cross_pseudo_loss(z_1[first:], z_2[first:])
        w = self.cons_weight(step)
        agree = (z_1[bl:].detach().argmax(1) == z_2[bl:].detach().argmax(1)).float().mean()
        return {"loss": sup + w * unsup, "sup": sup, "unsup": unsup, "w": torch.tensor(w), "agreement_u": agree}

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        if not self.args.predict_average:
            return self.student(x)
        probs = 0.5 * (torch.softmax(self.student(x), 1) + torch.softmax(self.peer(x), 1))  # (B, C, *S)
        return torch.log(probs.clamp_min(1e-12))
