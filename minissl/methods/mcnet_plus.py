"""MC-Net+: mutual consistency of three decoders (Wu et al., Medical Image Analysis 2022; MC-Net, MICCAI 2021).

Idea: one encoder feeds several decoders that differ only in how they up-sample (transposed
convolution, linear interpolation, nearest interpolation). Trained on the same labels they agree where
the image is easy and disagree where it is hard: their disagreement approximates the model's
(epistemic) uncertainty. MC-Net+ turns the disagreement into a training signal: every decoder must
match the *sharpened* prediction of every other decoder, on labeled and unlabeled images alike. The
sharpened targets are confident (near one-hot), so the consistency both pulls the decoders together and
pushes each towards low-entropy predictions exactly where they disagree. No EMA teacher, no threshold.

Equations, with D decoders ``f_1 .. f_D`` on one shared encoder, ``p_d = softmax(f_d(x))``:

    s(p)_c  = p_c^(1/T) / sum_k p_k^(1/T)                                   (losses.sharpen, T = 0.1)
    L_sup   = sum_d L_sup(f_d(x_l), y_l)                                    (0.5 (CE + Dice) each)
    L_mc    = sum_{i != j} mean( (p_i - sg[s(p_j)])^2 )      over x = [x_l; x_u]  (sg = stop-gradient)
    L       = L_sup + w(t) L_mc,       w(t) = cons_weight * exp(-5 (1 - t / rampup)^2)

Algorithm (per iteration):
    1. one encoder pass on ``[x_l; x_u]``, one pass of each decoder -> logits ``z_1 .. z_D``;
    2. supervised loss of every decoder on the labeled rows;
    3. sharpened, detached targets ``s(p_j)``; for each ordered pair (i, j), i != j, the MSE between
       ``p_i`` and ``s(p_j)`` (D = 3: six terms), weighted by ``w(t)``;
    4. one SGD step.
Evaluation uses decoder 1 (transposed convolution), as the official test scripts do.
``uncertainty(x)`` is the decoders' disagreement: the per-voxel variance of the D probability maps,
summed over classes, ``u = (1/D) sum_d sum_c (p_dc - mean_d' p_d'c)^2``; it is L_mc without the
sharpening, per voxel: ``sum_{i != j} ||p_i - p_j||^2 = 2 D^2 u``, so with T = 1, L_mc = 2 D^2 mean(u) / C.
Schedule: the consistency weight ramps over ``cfg.rampup`` of the run (fraction of max_iters).
Memory (3D): the 3D decoder passes are recomputed in backward to fit CPU memory (``nets.checkpointed``,
BatchNorm statistics counted once; the same loss and gradients), so one step at 112x112x80, batch 4,
width 16 stays within 8 GiB (``checkpoint = False`` turns it off).

Paper: Y. Wu, Z. Ge, D. Zhang, M. Xu, L. Zhang, Y. Xia, J. Cai, "Mutual consistency learning for
semi-supervised medical image segmentation", Medical Image Analysis 81 (2022) 102530, arXiv:2109.09960;
MC-Net: "Semi-supervised left atrium segmentation with mutual consistency training", MICCAI 2021.
Code: https://github.com/ycwu1997/MC-Net (``code/train_mcnet_2d.py``, ``code/train_mcnet_3d.py``).

Where the official code differs, and what minissl does:
    * the sharpened pseudo-labels are not detached: they are copied into a zero tensor in place, which
      keeps the graph, so each MSE also moves the decoder that made the target towards the other one.
      minissl detaches them (each decoder learns to match the others' confident predictions; the
      target is a teacher signal, as in every other method here);
    * sharpening is ``p^(1/T) / (p^(1/T) + (1 - p)^(1/T))`` per channel. With two classes (every 3D
      set) this equals the class-normalised ``losses.sharpen``; with ACDC's four classes the official
      target of a voxel no longer sums to 1 (a class with p <= 0.5 is never sharpened up). minissl uses
      ``losses.sharpen`` for every number of classes;
    * the supervised loss is Dice only: in 2D SSL4MIS's squared, batch-pooled Dice without its factor
      2 (``1 - I / (P + T)`` = 0.5 + 0.5 x the shared Dice) with weight 1; in 3D the plain
      foreground-channel Dice with weight 0.5. Either way the Dice enters with weight 0.5, as in the
      shared ``supervised_loss`` = 0.5 (CE + Dice) that minissl applies to every decoder; the 0.5 CE
      is computed but not added by the official scripts;
    * consistency weight: 3D ``1.0 * ramp(iter // 150, 40)`` (the first 6000 of 15000 iterations = 0.4
      of the run), 2D ``0.1 * ramp(iter // 150, 200)`` (the whole 30000). minissl uses the shared
      ``cfg.cons_weight`` (0.1) and ``cfg.rampup`` (0.4): ``--cons_weight 1.0`` gives the 3D values,
      ``--rampup 1.0`` the 2D ones;
    * networks: a VNet with dropout (3D) and the SSL4MIS UNet (2D), whose linear/nearest decoders
      interpolate then apply a 3x3 conv (VNet) or a 1x1 conv then interpolate (UNet); minissl uses its
      UNet in 2D and 3D (1x1 conv then interpolation);
    * the optimiser is SGD 0.01 (momentum 0.9, weight decay 1e-4) at a constant rate
      (``official_recipes``); the shared recipe decays it (poly);
    * the best checkpoint is picked on the test volumes (3D) every 200 iterations after 800; minissl
      picks on the validation split (the protocol).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import losses
from ..nets import UNet, checkpointed
from ..nets.unet import UP_MODES
from ..recipes import Recipe
from .base import Method, register


def mutual_consistency(logits: Sequence[Tensor], temperature: float) -> Tensor:
    """``sum_{i != j} mean((softmax(z_i) - sg[sharpen(softmax(z_j), T)])^2)`` over every ordered pair.

    Args:
        logits: D >= 2 logits (B, C, *S) of the decoders on the same images.
        temperature: sharpening temperature T.
    """
    if len(logits) < 2 or any(z.shape != logits[0].shape for z in logits):
        raise ValueError(f"mutual_consistency: expected at least two logits of one shape, got "
                         f"{[tuple(z.shape) for z in logits]}")
    targets = [losses.sharpen(torch.softmax(z.detach(), dim=1), temperature) for z in logits]  # D x (B, C, *S)
    return sum(losses.consistency_mse(z_i, targets[j])
               for i, z_i in enumerate(logits) for j in range(len(logits)) if i != j)


def disagreement(probs: Sequence[Tensor]) -> Tensor:
    """Per-voxel variance of D probability maps, summed over classes: ``(1/D) sum_d ||p_d - mean p||^2``.

    Args:
        probs: D probability maps (B, C, *S).

    Returns:
        (B, *S), 0 where all maps agree.
    """
    stack = torch.stack(list(probs))  # (D, B, C, *S)
    return (stack - stack.mean(0)).pow(2).sum(2).mean(0)  # (B, *S)


@dataclass
class MCNetPlusArgs:
    num_decoders: int = 3  # 3 = MC-Net+ (transpose, linear, nearest); 2 = MC-Net (transpose, linear)
    temperature: float = 0.1  # sharpening temperature T (both official scripts)
    checkpoint: bool = True  # 3D: recompute each decoder pass in backward (memory)

    def __post_init__(self):
        if self.num_decoders not in (2, 3):
            raise ValueError(f"mcnet_plus: num_decoders must be 2 or 3, got {self.num_decoders}")
        if not self.temperature > 0:
            raise ValueError(f"mcnet_plus: temperature must be > 0, got {self.temperature}")


@register("mcnet_plus")
class MCNetPlus(Method):
    """One encoder, decoders differing in up-sampling, each matching the others' sharpened predictions."""

    Args = MCNetPlusArgs
    has_uncertainty = True
    official_recipes = {2: Recipe("sgd", 0.01, 0.9, 1e-4, "constant", source="ycwu1997/MC-Net code/train_mcnet_2d.py"),
                        3: Recipe("sgd", 0.01, 0.9, 1e-4, "constant", source="ycwu1997/MC-Net code/train_mcnet_3d.py")}

    def make_net(self, **kwargs) -> UNet:
        """The student: one UNet decoder per up-sampling mode (encoder and decoder 1 as every other method's)."""
        return super().make_net(**({"up_modes": UP_MODES[:self.args.num_decoders]} | kwargs))

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x_l, y_l, x_u = batch["x_l"], batch["y_l"], batch["x_u"]
        bl = x_l.shape[0]
        feats = self.student.encode(torch.cat([x_l, x_u]))  # (depth + 1) x (Bl + Bu, c_l, *S / 2**l)
        logits = [self.decode(feats, i) for i in range(len(self.student.decoders))]  # D x (Bl + Bu, C, *S)
        sup = sum(self.supervised_loss(z[:bl], y_l) for z in logits)
        unsup = mutual_consistency(logits, self.args.temperature)
        w = self.cons_weight(step)
        with torch.no_grad():
            spread = disagreement([torch.softmax(z, dim=1) for z in logits]).mean()
        return {"loss": sup + w * unsup, "sup": sup, "unsup": unsup, "w": torch.tensor(w), "disagreement": spread}

    def decode(self, feats: Sequence[Tensor], index: int) -> Tensor:
        """Logits (B, C, *S) of decoder ``index`` on the encoder features; in 3D training recomputed in backward."""
        def run(*f: Tensor) -> Tensor:
            return self.student.decode(f, index)[0]  # (B, C, *S)

        use_ckpt = self.args.checkpoint and self.spatial_dims == 3 and torch.is_grad_enabled()
        return checkpointed(run, *feats, net=self.student) if use_ckpt else run(*feats)

    @torch.no_grad()
    def decoder_probs(self, x: Tensor) -> list[Tensor]:
        """Softmax of every decoder on ``x`` (B, 1, *S): D x (B, C, *S)."""
        return [torch.softmax(z, dim=1) for z in self.student.forward_all(x)]

    def uncertainty(self, x: Tensor) -> Tensor:
        """The decoders' disagreement on ``x`` (B, 1, *S) -> (B, *S) (see ``disagreement``)."""
        return disagreement(self.decoder_probs(x))
