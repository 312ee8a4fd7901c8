"""Label propagation (Hu, Liao & Xia, COSMOS 2022 challenge, 1st place): from sparse slice annotations to 3D labels.

Idea: annotating every slice of a volume is slow, so annotators label every k-th slice. The missing
slices are not unknown in the way an unlabeled scan is: an organ changes shape smoothly from slice to
slice, so the labels between two annotated slices can be *interpolated*. A model trained on the
interpolated 3D labels then labels what interpolation cannot reach (the slices outside the annotated
range, and any unlabeled scan), and a second model is trained on everything.

Shape-based interpolation (Raya & Udupa 1990), per class c, between consecutive annotated slices z0 < z1:

    d_c(z) = EDT(not R_c(z)) - EDT(R_c(z))            signed distance to the region R_c in slice z
                                                       (< 0 inside, > 0 outside; +-far when R_c is empty / fills the slice)
    d_c(z) = (1 - t) d_c(z0) + t d_c(z1),   t = (z - z0) / (z1 - z0)       for z0 < z < z1
    label(z) = argmin_c d_c(z)                         (binary: foreground where the interpolated d_1 < 0)

On an annotated slice t = 0, so its label is returned exactly; between slices a region grows, shrinks
and moves continuously (a sphere sampled every 4th slice comes back with Dice > 0.9). Slices before the
first or after the last annotated slice of a case stay unknown (``IGNORE``).

Algorithm (a run under ``--budget_kind slices:k``; schedule as fractions of ``max_iters``):
    0. before training: every labeled volume's hidden slices are filled by the interpolation
       (``fill_labels``; the data loader calls it once per case);
    1. stage 1 (the first ``first_stage`` = 50 % of the run): model A on the labeled images with
       ``0.5 (CE + Dice)``; voxels still unknown are masked (``label_mask``);
    2. switch (``end_stage``, at the stage-1 best-on-validation weights): model A is frozen as the
       labeller; model B starts from model A's weights (``restart = True``: from fresh weights);
    3. stage 2 (the rest): model B on the labeled images, whose unknown voxels now take model A's
       argmax, plus the unlabeled images with model A's argmax as their labels (weight ``u_weight``):
           L = L_sup(f_B(x_l), y_l or A(x_l) where unknown) + u_weight * L_sup(f_B(x_u), argmax A(x_u))
       Model B is what is evaluated.

In 2D suites the unannotated slices of a labeled case are unlabeled images (the data layer), so model A
labels them through ``x_u``; in 3D they stay in the labeled volumes and model A fills them voxel-wise.
Model A's labels are computed per batch on the augmented crop (one no-grad forward pass), which equals
labelling every scan once and cropping alike up to the crop border, needs no second copy of the data,
and resumes exactly (model A is part of the method's state). Under ``--budget_kind cases`` nothing is
hidden and the method is plain self-training: model A pseudo-labels the unlabeled cases.

Reported parts: ``sup`` (labeled images), ``unsup`` (model A's labels on unlabeled images; 0 in stage 1).

Paper: S. Hu, Z. Liao, Y. Xia, "Label Propagation for 3D Carotid Vessel Wall Segmentation and
Atherosclerosis Diagnosis", MICCAI 2022 COSMOS challenge, arXiv:2208.13337.
Code: https://github.com/ShishuaiHu/Label-Propagation (``convertor/convert.py``, nnU-Net trainers
``nnUNetTrainerV2_100Epoch_4Fold`` for model A and ``nnUNetTrainerV2_500Epoch`` for model B).

Where the official code differs, and what minissl does:
    * the official conversion fills a missing slice with a copy of the *nearest* annotated slice;
      minissl interpolates shapes by signed distances (the paper's "interpolating"); ``interpolation =
      "nearest"`` gives the official copy;
    * model B is trained on model A's predictions of whole scans (the files are moved into a new
      nnU-Net task); minissl keeps the ground truth and the interpolated labels where they exist and
      uses model A's labels only where nothing else is known;
    * model B is a new network trained for 500 epochs after model A's 100 (stage 1 = 1/6), each with its
      own poly schedule from 0.01. One minissl run has one schedule, so a fresh model B would start at a
      decayed rate with fewer iterations than model A had; minissl therefore continues model B from
      model A and gives each half of the run. ``--first_stage 0.1667 --restart true`` gives the official
      proportions and a fresh model B (the learning rate still continues);
    * both models are 4-fold nnU-Nets with deep supervision, nnU-Net's augmentation and 250 iterations
      per epoch; minissl trains one UNet. ``--recipe official`` takes nnU-Net's optimiser (SGD 0.01,
      momentum 0.99, weight decay 3e-5, poly 0.9) for 2D and 3D alike, without its Nesterov flag;
    * the annotated range in COSMOS is wherever the annotators drew contours; minissl's budget annotates
      every k-th slice from an offset drawn per case (``Budget.annotated``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi
from torch import Tensor

from ..data.datasets import IGNORE
from ..recipes import Recipe
from .base import Method, make_teacher, register

NNUNET = Recipe("sgd", lr=0.01, momentum=0.99, weight_decay=3e-5, schedule="poly",
                source="ShishuaiHu/Label-Propagation nnUNet/nnunet/training/network_training/vesselwallseg/"
                       "nnUNetTrainerV2_100Epoch.py (the optimiser of nnU-Net v1's nnUNetTrainerV2)")


def signed_distance(region: np.ndarray, far: float) -> np.ndarray:
    """Signed Euclidean distance of a 2D region: < 0 inside, > 0 outside (pixels), clipped to [-far, far].

    Args:
        region: (Y, X) bool.
        far: the value of an empty region everywhere (``-far`` for a region filling the slice).

    Returns:
        (Y, X) float32: ``EDT(~region) - EDT(region)``, so 1 next to the region and -1 on its rim.
    """
    if not region.any():
        return np.full(region.shape, far, dtype=np.float32)
    if region.all():
        return np.full(region.shape, -far, dtype=np.float32)
    d = ndi.distance_transform_edt(~region) - ndi.distance_transform_edt(region)  # (Y, X)
    return np.clip(d, -far, far).astype(np.float32)


def interpolate_slices(label: np.ndarray, num_classes: int, mode: str = "shape") -> np.ndarray:
    """Fill the hidden slices of a (Z, Y, X) label between its annotated slices (axis 0).

    A slice is annotated when none of its voxels is ``IGNORE``. Between consecutive annotated slices
    z0 < z1, ``mode="shape"`` takes per voxel the class of smallest linearly interpolated signed
    distance (module docstring); ``mode="nearest"`` copies the nearer annotated slice (z0 on a tie), as
    the official conversion does. Known voxels are never changed; slices outside the annotated range
    stay ``IGNORE``.

    Args:
        label: (Z, Y, X) uint8, ``IGNORE`` on hidden voxels.
        num_classes: C (background included).
        mode: "shape" or "nearest".

    Returns:
        (Z, Y, X) uint8, a new array.
    """
    if mode not in ("shape", "nearest"):
        raise ValueError(f"label_propagation: interpolation expected 'shape' or 'nearest', got {mode!r}")
    if label.ndim != 3:
        raise ValueError(f"label_propagation: expected a (Z, Y, X) label, got shape {label.shape}")
    out = label.copy()
    annotated = np.flatnonzero(~(label == IGNORE).reshape(label.shape[0], -1).any(1))
    far = float(sum(label.shape[1:]))
    for z0, z1 in zip(annotated[:-1], annotated[1:]):
        if z1 - z0 < 2:
            continue
        if mode == "shape":
            d0, d1 = (np.stack([signed_distance(label[s] == c, far) for c in range(num_classes)]) for s in (z0, z1))
            d0, d1 = _stand_ins(d0, d1, far), _stand_ins(d1, d0, far)  # (C, Y, X) each
        for z in range(z0 + 1, z1):
            t = (z - z0) / (z1 - z0)
            if mode == "nearest":
                filled = label[z0] if t <= 0.5 else label[z1]  # (Y, X)
            else:
                filled = np.argmin((1 - t) * d0 + t * d1, axis=0)  # (Y, X)
            out[z] = np.where(label[z] == IGNORE, filled, label[z])
    return out


def _stand_ins(d: np.ndarray, other: np.ndarray, far: float) -> np.ndarray:
    """Signed distances (C, Y, X) of one slice with a class that is absent (filling the slice) replaced by a
    constant: the depth of its region (of its complement) in the other slice, so that the region shrinks to
    its deepest point (the complement closes) exactly half-way, as a pole of a sphere between two slices."""
    d = d.copy()
    for c in range(d.shape[0]):
        if d[c].min() >= far:  # absent here
            d[c] = max(-float(other[c].min()), 1.0)
        elif d[c].max() <= -far:  # fills the slice here
            d[c] = -max(float(other[c].max()), 1.0)
    return d


@dataclass
class LabelPropagationArgs:
    first_stage: float = 0.5  # model A's stage, fraction of max_iters (official: 100 of 100 + 500 epochs = 1/6)
    restart: bool = False  # True: model B starts from fresh weights (official: a new nnU-Net); False: from model A
    u_weight: float = 1.0  # weight of the unlabeled images labelled by model A in stage 2
    interpolation: str = "shape"  # shape: signed-distance interpolation | nearest: copy the nearer slice (official)


@register("label_propagation")
class LabelPropagation(Method):
    """Interpolated sparse labels -> model A -> model A labels the rest -> model B."""

    Args = LabelPropagationArgs
    uses_label_mask = True
    official_recipes = {2: NNUNET, 3: NNUNET}

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        if self.args.interpolation not in ("shape", "nearest"):
            raise ValueError(f"label_propagation: --interpolation expected 'shape' or 'nearest', "
                             f"got {self.args.interpolation!r}")
        if not 0.0 < self.args.first_stage < 1.0:
            raise ValueError(f"label_propagation: --first_stage expected a fraction of max_iters in (0, 1), "
                             f"got {self.args.first_stage}")
        self.labeller = make_teacher(self.student)  # model A, frozen at the stage switch
        self.first_iters = int(round(self.args.first_stage * self.max_iters))

    def fill_labels(self, label: np.ndarray) -> np.ndarray:
        """Interpolate the hidden slices of a sparsely annotated case (``interpolate_slices``)."""
        return interpolate_slices(label, self.num_classes, self.args.interpolation)

    def stage_ends(self) -> list[int]:
        """Model A's stage ends after ``first_stage`` of the run."""
        return [self.first_iters] if 0 < self.first_iters < self.max_iters else []

    def end_stage(self, step: int, best_state: dict[str, Tensor], optimizers: list[torch.optim.Optimizer]) -> None:
        """Model A (the stage's best-on-validation weights) becomes the frozen labeller; model B starts."""
        self.load_state_dict(best_state)
        self.labeller.load_state_dict(self.student.state_dict())
        if self.args.restart:
            with torch.random.fork_rng(devices=[]):  # fresh weights, the same on every rank and every resume
                torch.manual_seed(self.cfg.seed + 1)
                fresh = self.make_net()
            self.student.load_state_dict(fresh.state_dict())
        for opt in optimizers:
            opt.state.clear()

    @torch.no_grad()
    def model_a_labels(self, x: Tensor) -> Tensor:
        """Model A's argmax, (B, *S) int64."""
        return self.labeller(x).argmax(1)

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x_l, y_l, x_u = batch["x_l"], batch["y_l"], batch["x_u"]
        known = batch.get("label_mask")  # (Bl, *S) 1 on ground truth / interpolated labels, or None
        if step < self.first_iters:
            sup = self.supervised_loss(self.student(x_l), y_l, known)
            zero = sup.new_zeros(())
            return {"loss": sup, "sup": sup, "unsup": zero, "w": zero}
        bl = x_l.shape[0]
        logits = self.student(torch.cat([x_l, x_u]))  # (Bl + Bu, C, *S)
        if known is not None:
            y_l = torch.where(known > 0, y_l, self.model_a_labels(x_l))  # (Bl, *S)
        sup = self.supervised_loss(logits[:bl], y_l)
        unsup = self.supervised_loss(logits[bl:], self.model_a_labels(x_u)) if x_u.shape[0] else sup.new_zeros(())
        w = self.args.u_weight
        return {"loss": sup + w * unsup, "sup": sup, "unsup": unsup, "w": torch.tensor(w)}
