"""CAD: Confidence-Aware adaptive Displacement (Xiao et al., arXiv 2502.00536), inside mean teacher + CPS.

Idea (from ABD, CVPR 2024): where a network is unsure, its prediction is a poor training signal; so
take the unsure part of an unlabeled image out and put confident content from elsewhere in its place,
together with that content's pseudo-label. ABD swaps the least-confident cell of a fixed 4 x 4 grid
for a confident cell. CAD makes the displacement adaptive:
    * LLCR (Largest Low-Confidence Region Replacement): the region replaced is the *largest connected
      low-confidence region*, not a grid cell;
    * DTE (Dynamic Threshold Escalation): the confidence threshold rises and the maximum replaced size
      changes over training, so displacements are mild early and targeted later.
These sit in a Mean-Teacher + Cross-Pseudo-Supervision (CPS) framework.

No official code exists ("released after publication"); the abstract gives no threshold, size or
schedule. Everything below that is not in the two bullets above is minissl's design (marked GUESS).

Equations (q = mean of the two EMA teachers' softmax on x_u; t = step / max_iters):

    c = max_c q,  pl = argmax_c q                                    (confidence, pseudo-label)
    tau(t)   = tau_start + (tau_end - tau_start) min(t / dte_ramp, 1)        GUESS 0.70 -> 0.95 over the run
    A_max(t) = size_start + (size_end - size_start) min(t / dte_ramp, 1)     GUESS 1/16 -> 1/4 of the image
    R_i  = bounding box of the largest connected component of {c_i < tau(t)}, shrunk about its centre
           (same factor per side) until |R_i| <= A_max(t) |S|
    j(i) = argmax_{j != i} mean_{R_i} c_j                             donor: the most confident other image on R_i
    x~_i = x_j(i) on R_i, x_i elsewhere;  pl~_i likewise (ops.mix with boxes)
    L = sum_k L_sup(f_k(x_l), y_l) + w(t) sum_k [ l(f_k(x~), pl~) + l(f_k(x~), argmax f_{k'}(x~)) ]

with students f_1, f_2 (k' the other one), l = 0.5 (CE + Dice), w(t) the shared sigmoid ramp of
``cons_weight``; the first unlabeled term is the mean-teacher part (teacher pseudo-labels carried with
the displaced content), the second is CPS on the displaced images.

Algorithm (per iteration):
    1. teachers on x_u (no gradient): q, c, pl;
    2. tau(t), A_max(t); LLCR boxes (``ops.largest_component`` on the low-confidence masks, batched);
       donors; displaced images and pseudo-labels (one ``ops.mix`` call);
    3. both students on [x_l; x~]; supervised, mean-teacher and CPS losses; SGD step on both students;
    4. EMA update of each student's teacher. The first student is evaluated.

GUESSES (none is from the paper):
    * tau rises linearly 0.70 -> 0.95 and A_max grows linearly from 1/16 of the image (one cell of
      ABD's 4 x 4 grid) to 1/4, both over the whole run (``dte_ramp = 1.0`` of max_iters). Early on the
      low-confidence region is large and unreliable, so the cap keeps the displacement small (mild);
      later the region shrinks to the genuinely hard parts and the looser cap lets it be replaced whole;
    * the region is replaced by its bounding box (mixing works on boxes), shrunk about its centre;
    * the donor is another image of the unlabeled batch (ABD displaces between two views of one image),
      the one most confident on that box (ABD picks the donor patch by confidence and KL similarity);
      with a single unlabeled image the donor is the image itself (no displacement);
    * two students, each with its own EMA teacher; confidence and pseudo-labels from the mean of the
      two teachers; CPS with hard argmax targets; every unlabeled term uses the shared supervised loss
      0.5 (CE + Dice); no displacement of labeled images (ABD-I) and no CPS on the un-displaced images;
    * the teachers make the confidence maps in training mode, as the whole method is during training:
      dropout on and BatchNorm batch statistics (the EMA teachers of UA-MT, BCP and M3HL's code also
      run in training mode; ERSR's in eval mode);
    * the EMA horizon: ABD's 0.99 over its 30,000 self-training iterations (``code/train_ACDC_BCP.py``),
      ``ema_horizon`` = 1/300 of the run, with the shared ``ema_update`` (warm-up, buffers copied).

Recipe: the shared one only. Neither CAD nor a training script exists, so there is no official recipe
(``--recipe official`` is refused); ABD's ACDC scripts would give SGD 0.01 with poly decay
(``train_ACDC_Cross_Teaching.py``) or a constant rate (``train_ACDC_BCP.py``).

Reported parts: ``sup`` (both students), ``unsup`` (MT + CPS terms before ``w``), ``w``, ``tau``, ``a_max``.

Paper: W. Xiao, Z. Xu, G. Liang, Y. Deng, Y. Xiao, CAD (Confidence-Aware adaptive Displacement),
arXiv:2502.00536, 2025 (abstract only; no code released). Base method: H. Chi, J. Pang, B. Zhang, W. Liu,
ABD, "Adaptive Bidirectional Displacement for Semi-Supervised Medical Image Segmentation", CVPR 2024,
arXiv:2405.00378 (code: https://github.com/chy-upc/ABD).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops
from .base import Method, ema_update, make_teacher, register


def linear_schedule(progress: float, start: float, end: float, ramp: float) -> float:
    """``start + (end - start) min(progress / ramp, 1)``; ``ramp`` is a fraction of max_iters (0: always end)."""
    t = 1.0 if ramp <= 0 else min(max(progress / ramp, 0.0), 1.0)
    return start + (end - start) * t


def low_confidence_boxes(conf: Tensor, tau: float, max_frac: float) -> Tensor:
    """LLCR region: bounding box of the largest connected component of ``conf < tau``, capped in size.

    A box larger than ``max_frac`` of the image is shrunk about its centre by the same factor along every
    side (sizes floored, at least 1) so that its volume is at most ``max_frac * prod(S)``.

    Args:
        conf: (B, *S) confidence maps (2 or 3 spatial dims).
        tau: confidence threshold. max_frac: largest box volume as a fraction of the image.

    Returns:
        (B, 2*sd) int64 half-open boxes; an empty box (all 0) where no voxel is below ``tau``.
    """
    if conf.ndim not in (3, 4):
        raise ValueError(f"low_confidence_boxes: expected conf (B, H, W) or (B, D, H, W), got {tuple(conf.shape)}")
    spatial, sd = conf.shape[1:], conf.ndim - 1
    comp = ops.largest_component(conf < tau).to(torch.uint8)  # (B, *S) 1 on the largest low region
    lo, hi = [], []
    for d in range(sd):
        profile = comp.amax(dim=[e + 1 for e in range(sd) if e != d]).bool()  # (B, S_d) rows/cols it touches
        i = torch.arange(spatial[d], device=conf.device)  # (S_d,)
        lo.append(torch.where(profile, i, spatial[d]).amin(1))
        hi.append(torch.where(profile, i + 1, 0).amax(1))
    lo, hi = torch.stack(lo, 1), torch.stack(hi, 1)  # (B, sd) each
    size = (hi - lo).clamp_min(0)  # (B, sd), 0 for an empty component
    vol = size.prod(1).double()  # (B,)
    scale = (max_frac * math.prod(spatial) / vol.clamp_min(1)).clamp(max=1) ** (1 / sd)  # (B,)
    new = (size * scale[:, None]).floor().long().clamp_min(1).minimum(size)  # (B, sd)
    lo = lo + (size - new) // 2
    boxes = torch.cat([lo, lo + new], 1)  # (B, 2*sd)
    return torch.where(vol[:, None] > 0, boxes, torch.zeros_like(boxes))


def donor_index(conf: Tensor, boxes: Tensor) -> Tensor:
    """For each image i, the other image j whose mean confidence inside box i is highest, (B,) int64."""
    region = ops.region_mask(conf.shape[1:], boxes=boxes).flatten(1).to(conf.dtype)  # (B, N)
    score = region @ conf.flatten(1).T  # (B, B): sum of conf_j over box_i
    score.fill_diagonal_(-math.inf)
    return score.argmax(1)  # a batch of one gives itself (argmax of [-inf] is 0): no displacement


@dataclass
class CADArgs:
    ema_horizon: float = 1 / 300  # GUESS: 0.99 over 30,000 iterations (ABD code/train_ACDC_BCP.py; CAD has no code)
    tau_start: float = 0.70  # GUESS: confidence threshold at the start (DTE)
    tau_end: float = 0.95  # GUESS: threshold at the end of the ramp
    size_start: float = 1 / 16  # GUESS: largest displaced box at the start, fraction of the image
    size_end: float = 1 / 4  # GUESS: largest displaced box at the end of the ramp
    dte_ramp: float = 1.0  # GUESS: both schedules are linear over this fraction of max_iters


@register("cad")
class CAD(Method):
    """Two students + EMA teachers; unlabeled images get their largest low-confidence region displaced."""

    Args = CADArgs

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        self.peer = self.make_net()
        self.teacher, self.peer_teacher = make_teacher(self.student), make_teacher(self.peer)

    def schedules(self, step: int) -> tuple[float, float]:
        """DTE at ``step``: (confidence threshold tau, largest displaced fraction A_max)."""
        a, t = self.args, self.progress(step)
        return (linear_schedule(t, a.tau_start, a.tau_end, a.dte_ramp),
                linear_schedule(t, a.size_start, a.size_end, a.dte_ramp))

    @torch.no_grad()
    def teacher_probs(self, x_u: Tensor) -> Tensor:
        """Mean softmax of the two EMA teachers, (Bu, C, *S)."""
        return (torch.softmax(self.teacher(x_u), 1) + torch.softmax(self.peer_teacher(x_u), 1)) / 2

    @torch.no_grad()
    def displace(self, x_u: Tensor, step: int) -> tuple[Tensor, Tensor, Tensor]:
        """Displaced images (Bu, 1, *S), their pseudo-labels (Bu, *S) and the replaced boxes (Bu, 2*sd)."""
        conf, pl = self.teacher_probs(x_u).max(1)  # (Bu, *S) each
        tau, a_max = self.schedules(step)
        boxes = low_confidence_boxes(conf, tau, a_max)
        donor = donor_index(conf, boxes)  # (Bu,)
        x_d, pl_d = ops.mix([x_u, pl], [x_u[donor], pl[donor]], boxes=boxes)
        return x_d, pl_d, boxes

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x_l, y_l, x_u = batch["x_l"], batch["y_l"], batch["x_u"]
        bl = x_l.shape[0]
        x_d, pl_d, _ = self.displace(x_u, step)
        x = torch.cat([x_l, x_d])  # (Bl + Bu, 1, *S)
        logits = [self.student(x), self.peer(x)]  # 2 x (Bl + Bu, C, *S)
        sup = sum(self.supervised_loss(lg[:bl], y_l) for lg in logits)
        u1, u2 = logits[0][bl:], logits[1][bl:]  # (Bu, C, *S) each
        mt = self.supervised_loss(u1, pl_d) + self.supervised_loss(u2, pl_d)
        cps = self.supervised_loss(u1, u2.detach().argmax(1)) + self.supervised_loss(u2, u1.detach().argmax(1))
        unsup, w = mt + cps, self.cons_weight(step)
        tau, a_max = self.schedules(step)
        return {"loss": sup + w * unsup, "sup": sup, "unsup": unsup, "w": torch.tensor(w),
                "tau": torch.tensor(tau), "a_max": torch.tensor(a_max)}

    def after_step(self, step: int) -> None:
        ema_update(self.teacher, self.student, self.ema_decay(), step)
        ema_update(self.peer_teacher, self.peer, self.ema_decay(), step)
