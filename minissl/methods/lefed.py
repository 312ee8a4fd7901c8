"""LeFeD: learning from the feature discrepancy of two decoders (Zeng et al., arXiv 2023 / IEEE TMI 2025).

Idea: two decoders trained to give the same prediction still disagree inside, in their features, and
they disagree most where the encoder's representation is ambiguous. LeFeD makes the two decoders
deliberately different (another up-sampling, and the second one looks at the first one's features
through sigmoid gates), asks their predictions to agree, and feeds the feature-level discrepancy back
into the encoder: the same batch is processed K times, each pass adding the previous pass's
discrepancy to the encoder features, with an optimiser step after every pass. The model "learns from
the inconsistent information iteratively", with no uncertainty estimate, EMA teacher or threshold.

Equations, per pass k = 1..K (K = 3), with encoder levels ``f_0 .. f_L`` (f_L the bottleneck):

    f_l^(k)   = f_l + e_l^(k-1)                    (e^(0) = 0; added before level l + 1 reads f_l)
    z_1, F_1  = decoder_1(f^(k))                   (transposed-conv up-sampling; stage features F_1)
    z_2, F_2  = decoder_2(f^(k); g = sg[sigmoid(F_1)])   (linear up-sampling; skips f_l * g_l,
                                                          bottleneck f_L + f_L * g_L)
    e_l^(k)   = 1e-3 * sg[F_2,l - F_1,l]           (one per level, shaped like f_l)
    L_sup     = L_sup(z_1, y) + L_sup(z_2, y)                       (labeled rows)
    L_ds      = sum_l w_l L_sup(up(h_l(F_1,l)), y),  w = 0.8, 0.6, 0.4, 0.2, 0.1  (full resolution first)
    L_cons    = mean( (softmax z_1 - softmax z_2)^2 )              (all rows, gradient into both)
    L         = L_sup + L_ds + cons_weight * L_cons,   cons_weight = 1 (no ramp)

Stage features: ``F_L`` is the bottleneck the decoder starts from, ``F_l`` (l < L) the map up-sampled
to level l before its skip is merged (``UNet.decode_stages``); ``h_l`` is a 1x1 convolution to the
classes and ``up`` an interpolation to the input size (deep supervision of decoder 1).

Algorithm (per iteration, one batch of labeled and unlabeled images):
    e = 0
    for k in 1..K: forward with feedback e; losses above; zero_grad, backward, optimiser step;
                   e <- 1e-3 (F_2 - F_1), detached.
``training_step`` is the first pass (no feedback); ``update`` runs the K passes (the engine sets the
learning rate once per iteration, so K steps share it). Evaluation: decoder 1, one pass, no feedback,
as the official test script. ``inner_passes`` also returns, per pass and level, the channel mean of
``|F_2 - F_1|`` (the picture in the tutorial). Schedule: none; every weight is constant.
Memory (3D): the 3D decoder passes (and the encoder pass) are recomputed in backward to fit CPU memory
(``nets.checkpointed``, BatchNorm statistics counted once, the same dropout masks; the same loss and
gradients), so one pass at 112x112x80, batch 4, width 16 stays within 8 GiB (``checkpoint = False``
turns it off).

Paper: Q. Zeng, Y. Xie, Z. Lu, M. Lu, Y. Xia, "Discrepancy Matters: Learning from Inconsistent Decoder
Features for Consistent Semi-supervised Medical Image Segmentation", arXiv:2309.14819 (2023); IEEE TMI
2025 as "Consistency-Guided Differential Decoding for Enhancing Semi-Supervised Medical Image
Segmentation". Code: https://github.com/maxwell0027/LeFeD (``train.py``, ``networks/my_net.py``).

Where the official code differs, and what minissl does:
    * it does not run as released: the network calls ``super(MCNet3d_v2, self)`` (NameError) and
      train.py uses ``Pancreas`` and ``test_calculate_metric`` without importing them; it trains on
      96^3 patches (the Pancreas size) of the LA data. minissl reads the intent from the code;
    * the network is a VNet (skips added, not concatenated; Dropout3d 0.3 at the bottleneck, 0.5
      before each head); minissl uses its UNet in 2D and 3D: the gates multiply the skip before it is
      concatenated, the feedback is added after each encoder level's conv block (before pooling, as the
      code adds it before the down-sampling conv), and the dropout is the UNet's per level;
    * decoder 2 interpolates then applies a 3x3 conv, BN and ReLU; minissl's "linear" decoder applies
      a 1x1 conv then interpolates. The side outputs are up-sampled by repeated x2 trilinear steps;
      minissl interpolates once to the input size;
    * the supervised, deep-supervision and (unused) losses are the foreground-channel squared Dice
      (smooth 1e-5); minissl uses the shared ``supervised_loss`` = 0.5 (CE + Dice) for the decoders and
      the side outputs alike. ``L_cons`` is the plain MSE over all rows with gradients into both
      decoders, as the code;
    * a consistency ramp, a sharpening temperature (0.05) and an EMA decay are parsed or computed but
      unused; minissl has none of them (``cons_weight`` is a constant, 1 as the code);
    * SGD 0.01 (momentum 0.9, weight decay 1e-4) whose rate drops x0.1 every 2500 of 15000 iterations
      (``official_recipes``, 3D only: the 'step' schedule every 1/6 of the run; the shared recipe
      decays it by poly); an iteration there is also one batch with 3 optimiser steps;
    * the deep-supervision weights exist for a 4-level VNet; with ``depth`` < 4 minissl uses the first
      ``depth + 1`` (full resolution first; the UNet has at most 4 levels).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nets import UNet, checkpointed
from ..recipes import Recipe
from .base import Method, register

DS_WEIGHTS = (0.8, 0.6, 0.4, 0.2, 0.1)  # deep supervision of decoder 1's stages, full resolution first


@dataclass
class LeFeDArgs:
    passes: int = 3  # K: forward/backward/step passes per batch, each fed the previous discrepancy
    feedback_scale: float = 1e-3  # e = scale * (F_2 - F_1)
    cons_weight: float = 1.0  # constant weight of MSE(softmax z_1, softmax z_2) (the code's ramp is unused)
    checkpoint: bool = True  # 3D: recompute the encoder and decoder passes in backward (memory)

    def __post_init__(self):
        if self.passes < 1:
            raise ValueError(f"lefed: passes must be >= 1, got {self.passes}")


@register("lefed")
class LeFeD(Method):
    """Two differentiated decoders; their feature discrepancy is fed back into the encoder over K passes."""

    Args = LeFeDArgs
    official_recipes = {3: Recipe("sgd", 0.01, 0.9, 1e-4, "step", step_every=2500 / 15000, step_gamma=0.1,
                                  source="maxwell0027/LeFeD train.py")}

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        conv = nn.Conv2d if self.spatial_dims == 2 else nn.Conv3d
        self.side = nn.ModuleList(conv(cfg.width * 2 ** k, self.num_classes, 1) for k in range(cfg.depth + 1))

    def make_net(self, **kwargs) -> UNet:
        """The student: decoder 1 up-samples by transposed convolution, decoder 2 by linear interpolation."""
        return super().make_net(**({"up_modes": ("transpose", "linear")} | kwargs))

    def forward_pass(self, x: Tensor, feedback: Optional[list[Tensor]] = None
                     ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        """One pass: logits z_1, z_2 (B, C, *S), side logits of decoder 1 (one per level, (B, C, *S)),
        and the detached discrepancy ``F_2 - F_1`` per level (shaped like the encoder features)."""
        student = self.student
        feats = self.recomputed(lambda x: student.encode(x, feedback), x)  # (depth + 1) x (B, c_l, *S / 2**l)
        z_1, stages_1 = self.recomputed(lambda *f: student.decode_stages(f, 0), *feats)

        def second(*f: Tensor) -> tuple[Tensor, list[Tensor]]:
            gates = [torch.sigmoid(s.detach()) for s in stages_1]  # (B, c_l, *S / 2**l) each
            return student.decode_stages(f, 1, gates=gates)

        z_2, stages_2 = self.recomputed(second, *feats)
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        side = [F.interpolate(h(s), size=x.shape[2:], mode=mode, align_corners=True)
                for h, s in zip(self.side, stages_1)]  # (depth + 1) x (B, C, *S)
        gap = [(s2 - s1).detach() for s1, s2 in zip(stages_1, stages_2)]  # (B, c_l, *S / 2**l) each
        return z_1, z_2, side, gap

    def recomputed(self, fn: Callable[..., Any], *args: Tensor) -> Any:
        """``fn(*args)`` (a pass of the student); in 3D training its activations are recomputed in backward."""
        use_ckpt = self.args.checkpoint and self.spatial_dims == 3 and torch.is_grad_enabled()
        return checkpointed(fn, *args, net=self.student) if use_ckpt else fn(*args)

    def pass_losses(self, batch: dict[str, Tensor], feedback: Optional[list[Tensor]] = None
                    ) -> tuple[dict[str, Tensor], list[Tensor]]:
        """The losses of one pass with ``feedback`` (None: the first pass) and the discrepancy per level."""
        x_l, y_l, x_u = batch["x_l"], batch["y_l"], batch["x_u"]
        bl = x_l.shape[0]
        z_1, z_2, side, gap = self.forward_pass(torch.cat([x_l, x_u]), feedback)
        ds = sum(w * self.supervised_loss(s[:bl], y_l) for w, s in zip(DS_WEIGHTS, side))
        sup = self.supervised_loss(z_1[:bl], y_l) + self.supervised_loss(z_2[:bl], y_l) + ds  # L_sup + L_ds
        unsup = F.mse_loss(torch.softmax(z_1, dim=1), torch.softmax(z_2, dim=1))
        w = self.args.cons_weight
        out = {"loss": sup + w * unsup, "sup": sup, "unsup": unsup, "ds": ds.detach(), "w": torch.tensor(w)}
        return out, gap

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """The first pass of the iteration (no feedback); ``update`` runs all K passes."""
        return self.pass_losses(batch)[0]

    def inner_passes(self, batch: dict[str, Tensor], optimizers: list[torch.optim.Optimizer]
                     ) -> tuple[list[dict[str, float]], list[list[Tensor]]]:
        """K passes on one batch, an optimiser step after each, the discrepancy of pass k fed to pass k + 1.

        Returns:
            per pass its logged parts, and per pass the channel mean of ``|F_2 - F_1|`` per level,
            (B, *S / 2**l) each, shallow level first.
        """
        feedback, logs, maps = None, [], []
        for _ in range(self.args.passes):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            out, gap = self.pass_losses(batch, feedback)
            out["loss"].backward()
            for opt in optimizers:
                opt.step()
            logs.append({k: float(v.detach()) for k, v in out.items()})
            maps.append([g.abs().mean(1) for g in gap])  # (B, *S / 2**l) each
            feedback = [g.mul_(self.args.feedback_scale) for g in gap]  # (B, c_l, *S / 2**l) each, in place
        return logs, maps

    def update(self, batch: dict[str, Tensor], step: int, optimizers: list[torch.optim.Optimizer]) -> dict[str, float]:
        """K inner passes; logs the mean of each part over the passes and the mean discrepancy ``gap``."""
        logs, maps = self.inner_passes(batch, optimizers)
        self.after_step(step)
        mean = {k: sum(log[k] for log in logs) / len(logs) for k in logs[0]}
        return mean | {"gap": float(torch.stack([m.mean() for ms in maps for m in ms]).mean())}
