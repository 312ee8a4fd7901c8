"""M&N: co-training of a 2D model pretrained on natural images and a 3D model (Yeung et al., MLMI 2025).

Idea: a 2D network pretrained on millions of natural photographs brings knowledge that a 3D network
trained from scratch on a few labeled volumes lacks, and the 3D network sees the through-plane
context that the 2D one, applied slice by slice, cannot. Each teaches the other: on unlabeled
volumes, each model is trained on the other's soft pseudo-masks. Unlabeled volumes enter the
batches gradually, as the learning rate decays, so that early noisy pseudo-masks do little harm.

Equations, with ``f2`` the 2D model applied to every slice of a volume (``volumes_to_slices`` and
back), ``f3`` the 3D model, ``sigma`` the softmax, ``onehot(y)`` the labels as probabilities:

    L(f, x, q) = Dice(sigma f(x), q) + KL(q || sigma f(x))        (Dice: squared denominators, sums
                                                                   pooled over the batch, all classes)
    2D step:  targets q = onehot(y_l) on labeled volumes, sigma f3(x_u) (eval mode, no gradient) on pseudo-labeled
    3D step:  targets q = onehot(y_l) on labeled volumes, sigma f2(x_u) (eval mode, no gradient) on pseudo-labeled
    n_p(t) = floor((t - t_0) / (1 - t_0) * B) for t >= t_0, else 0;   n_l = B - n_p

with B = the labeled images per batch, t = step / max_iters, t_0 = ``transition``. Each model's loss
is ``(n_l * sup + n_p * unsup) / B`` with ``sup`` the loss on the n_l labeled volumes and ``unsup``
on the n_p pseudo-labeled ones (the unlabeled images of the batch, in order).

Algorithm (per iteration, ``update``, two optimisers):
    stage 1 (first ``transition`` = 12.5 % of max_iters; M&N: 500 of 4000 epochs): n_p = 0, both models
        are trained on the labeled volumes;
    stage 2: the batch holds n_l labeled and n_p pseudo-labeled volumes; 2D step (targets from the 3D
        model), then 3D step (targets from the just-updated 2D model). The learning-rate schedule
        starts again at the transition, so the pseudo-labeled share grows as the rate decays (the
        "learning-rate guided" sampling; the official code ramps n_p linearly in epochs within its
        last cosine cycle, as here).
Memory: one update at 80 x 112 x 112 voxels, 2 labeled + 2 unlabeled volumes, width 16, takes
4.2 GiB above the built models on CPU (the 2D model sees 160 slices at once); nothing is subsampled.
The 3D model is evaluated. ``sup`` / ``unsup`` in the log are the 3D model's, ``sup_2d`` /
``unsup_2d`` the 2D model's, ``loss`` their sum.

The natural-image 2D model: the paper adapts SegFormer-B2 (ImageNet / ADE20k weights) with LoRA; hub
weights cannot be fetched at run time, so minissl's 2D UNet stands in. ``--pretrained PATH`` loads a
state_dict of it (the whole UNet or its ``encoder.*`` part). Without one, the encoder is pretrained
by **inpainting with denoising** (a UNet with one output channel restores grey 32x32 crops in which
30 % of the 8x8 blocks were blanked and noise of std 0.05 added; mean squared error, Adam 1e-3,
``pretext_iters`` steps of 16 crops, seed 0; its encoder is kept) on the photographs bundled with
scikit-image (``NATURAL_IMAGES``: astronaut, camera, chelsea, coffee, rocket, coins, moon, clock;
grey, short side 128 px). Rotation prediction was tried first and stayed at chance (loss ln 4) over
300 steps on such crops. The encoder is computed once per (width, depth, iterations) and cached in
``~/.cache/minissl/pretrained``. ``--pretext none`` starts the 2D model from scratch: the with /
without comparison of "2D natural-image knowledge helps 3D".

Paper: P.-H. Yeung, J. Ramesh, P. Lyu, A. Namburete, J. Rajapakse, "Semi-Supervised 3D Medical
Segmentation from 2D Natural Images Pretrained Model", MLMI 2025, arXiv:2509.15167.
Code: https://github.com/pakheiyeung/M-N (``train.py``, ``losses.py``, ``utilities.py``, ``hyperparameters.py``).

Where the official code differs, and what minissl does:
    * the 2D model is SegFormer-B2 + LoRA (r = alpha = 64) on RGB-repeated slices; minissl: a 2D UNet
      with an encoder pretrained by inpainting natural images (above);
    * the models alternate per epoch of 8 batches, each on its own batches; minissl alternates within
      each iteration on one batch;
    * one Dice + KL over the concatenated batch (so Dice pools labeled and pseudo-labeled volumes);
      minissl computes the two parts apart and weights them by their counts (reported separately);
      the Dice clamps its denominator at 1e-6, minissl adds smooth = 1e-6 to numerator and denominator;
    * the 3D model's saved predictions bias unlabeled crops towards foreground; minissl crops
      unlabeled volumes uniformly (the loader's rule);
    * AdamW (2D 1e-3, 3D 1e-4), a linear warm-up from 1 % over 50 epochs, cosine to epoch 500, then one
      cosine over the rest. minissl runs the recipe's schedule over the transition and again over the
      rest, each with its own warm-up (``--recipe official``: AdamW 1e-4, warm-up 10 % of each stage from
      0, as 50 of the 500 transition epochs, then cosine; the official code warms up once); the 2D rate
      is the 3D one times ``lr_2d_scale`` (1 by default; 10 is the official ratio).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses
from ..atomic import atomic_open
from ..nets import UNet
from ..recipes import Recipe, make_optimizer, stage_lr_factor
from .base import Method, register

NATURAL_IMAGES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "moon", "clock")  # skimage.data
PRETEXT_VERSION = 1  # bump when the pretext changes: cached encoders are then recomputed


@dataclass
class MNArgs:
    transition: float = 0.125  # labeled-only stage, fraction of max_iters (500 of 4000 epochs)
    pretext: str = "inpainting"  # natural-image pretraining of the 2D encoder: inpainting | none (without)
    pretext_iters: int = 200  # inpainting steps (computed once, cached)
    pretrained: str = ""  # path to a 2D UNet state_dict (whole or encoder.*); replaces the pretext
    lr_2d_scale: float = 1.0  # the 2D optimiser's learning rate / the 3D one's (official: 1e-3 / 1e-4 = 10)


def volumes_to_slices(x: Tensor) -> Tensor:
    """(B, C, Z, Y, X) volumes -> (B * Z, C, Y, X) slices, volume-major."""
    return x.movedim(2, 1).flatten(0, 1)


def slices_to_volumes(x: Tensor, batch: int) -> Tensor:
    """(B * Z, C, Y, X) slices -> (B, C, Z, Y, X) volumes (inverse of ``volumes_to_slices``)."""
    return x.unflatten(0, (batch, -1)).movedim(1, 2)


def pseudo_count(step: int, max_iters: int, transition: float, batch: int) -> int:
    """Pseudo-labeled volumes in a batch of ``batch``: 0 before ``transition``, then a linear ramp to batch - 1."""
    start = int(round(transition * max_iters))
    if step < start:
        return 0
    return min(math.floor((step - start) / max(max_iters - start, 1) * batch), batch - 1)


def dice_kl_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Soft Dice + KL(target || softmax(logits)) (KL averaged over every element, as nn.KLDivLoss 'mean').

    Args:
        logits: (B, C, *S). target: (B, C, *S) probabilities (one-hot labels or a peer's softmax).
    """
    dice = losses.dice_loss(logits, target, squared=True, batch=True, smooth=1e-6)
    return dice + F.kl_div(F.log_softmax(logits, dim=1), target, reduction="sum") / target.numel()


def natural_images(size: int = 128) -> list[np.ndarray]:
    """The ``NATURAL_IMAGES`` of ``skimage.data`` as grey float32 in [0, 1], short side ``size`` pixels."""
    from skimage import color, data, transform, util

    out = []
    for name in NATURAL_IMAGES:
        im = getattr(data, name)()
        im = color.rgb2gray(im) if im.ndim == 3 else util.img_as_float(im)  # (H, W) in [0, 1]
        out.append(transform.rescale(im, size / min(im.shape), anti_aliasing=True).astype(np.float32))
    return out


def inpainting_pretext(net: UNet, images: list[np.ndarray], iters: int, crop: int = 32, batch: int = 16,
                       block: int = 8, masked: float = 0.3, noise: float = 0.05, seed: int = 0) -> list[float]:
    """Train ``net`` (one output channel) to restore random crops whose blocks were blanked and pixels noised.

    Each ``block`` x ``block`` cell of a crop is replaced by 0.5 with probability ``masked``, then Gaussian
    noise of std ``noise`` is added; the loss is the mean squared error to the clean crop.

    Args:
        net: a 2D UNet with ``num_classes == 1`` (trained in place). images: (H, W) grey images in [0, 1],
            each side >= crop. iters: Adam steps (lr 1e-3). crop: crop side (a multiple of ``block``).
        batch: crops per step. seed: the generator of crops, masks and noise.

    Returns:
        The loss of every step.
    """
    g = torch.Generator().manual_seed(seed)
    ims = [torch.from_numpy(im) for im in images]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    history = []
    for _ in range(iters):
        crops = []
        for _ in range(batch):
            im = ims[int(torch.randint(len(ims), (1,), generator=g))]
            y0, x0 = (int(torch.randint(s - crop + 1, (1,), generator=g)) for s in im.shape)
            crops.append(im[y0:y0 + crop, x0:x0 + crop])
        x = torch.stack(crops)[:, None]  # (N, 1, crop, crop)
        cells = (torch.rand(batch, 1, crop // block, crop // block, generator=g) > masked).to(x.dtype)
        keep = cells.repeat_interleave(block, 2).repeat_interleave(block, 3)  # (N, 1, crop, crop)
        corrupted = x * keep + 0.5 * (1 - keep) + noise * torch.randn(x.shape, generator=g)
        loss = F.mse_loss(net(corrupted), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history


def pretext_encoder(width: int, depth: int, iters: int) -> dict[str, Tensor]:
    """The ``encoder.*`` weights of a 2D UNet pretrained by inpainting natural images, computed once and cached.

    Deterministic (seed 0, the global random state is left as it was); cached as
    ``~/.cache/minissl/pretrained/mn-inpainting-w<width>-d<depth>-i<iters>-v<PRETEXT_VERSION>.pt``.
    """
    name = f"mn-inpainting-w{width}-d{depth}-i{iters}-v{PRETEXT_VERSION}.pt"
    path = Path.home() / ".cache" / "minissl" / "pretrained" / name
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)["encoder"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = UNet(1, 1, spatial_dims=2, width=width, depth=depth)
        inpainting_pretext(net, natural_images(), iters)
    state = {k: v for k, v in net.state_dict().items() if k.startswith("encoder.")}
    with atomic_open(path) as f:  # several processes may compute it at once: the file appears whole
        torch.save({"encoder": state, "images": list(NATURAL_IMAGES), "iters": iters}, f)
    return state


@register("mn")
class MN(Method):
    """A 2D (natural-image pretrained) and a 3D UNet trained on each other's soft pseudo-masks."""

    Args = MNArgs
    official_recipes = {3: Recipe("adamw", lr=1e-4, momentum=0.9, weight_decay=0.01, schedule="cosine",
                                  warmup=0.1, source="pakheiyeung/M-N hyperparameters.py, train.py")}

    @classmethod
    def applies_to(cls, spec) -> Optional[str]:
        if spec.spatial_dims == 3:
            return None
        return f"expected a 3D suite (a 2D and a 3D model), got spatial_dims={spec.spatial_dims}"

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        a = self.args
        if a.pretext not in ("inpainting", "none") or not 0 <= a.transition < 1:
            raise ValueError(f"mn: expected --pretext inpainting|none and 0 <= --transition < 1, got {a.pretext!r}, "
                             f"{a.transition}")
        self.net2d = self.make_net(spatial_dims=2)
        if a.pretrained:
            self.load_2d(a.pretrained)
        elif a.pretext == "inpainting":
            self.net2d.load_state_dict(pretext_encoder(cfg.width, cfg.depth, a.pretext_iters), strict=False)

    def load_2d(self, path: str) -> None:
        """Load a 2D UNet state_dict (whole, or its ``encoder.*`` entries) from ``path``."""
        if not Path(path).is_file():
            raise ValueError(f"mn: --pretrained expected a state_dict file, got {path!r} (not a file)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("encoder", state)
        own = self.net2d.state_dict()
        wrong = [k for k in own if k.startswith("encoder.") and (k not in state or state[k].shape != own[k].shape)]
        if wrong:
            raise ValueError(f"mn: --pretrained {path}: expected the encoder of a 2D UNet of width "
                             f"{self.cfg.width} and depth {self.cfg.depth}; missing or mis-shaped: {wrong[:3]}")
        self.net2d.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """One optimiser of the recipe per model: ``[3D, 2D]`` (the 2D rate times ``lr_2d_scale``)."""
        r = self.recipe
        return [make_optimizer(self.student.parameters(), r),
                make_optimizer(self.net2d.parameters(), replace(r, lr=r.lr * self.args.lr_2d_scale))]

    def lr_factor(self, step: int) -> float:
        """The recipe's schedule over the transition, then anew over the rest (the official restart)."""
        return stage_lr_factor(self.recipe, step, self.max_iters, int(round(self.args.transition * self.max_iters)))

    def run2d(self, x: Tensor) -> Tensor:
        """The 2D model applied slice by slice: (B, 1, Z, Y, X) -> logits (B, C, Z, Y, X)."""
        return slices_to_volumes(self.net2d(volumes_to_slices(x)), x.shape[0])

    @torch.no_grad()
    def soft_targets(self, peer: str, x: Tensor) -> Tensor:
        """Softmax of the peer model (eval mode, no gradient), (B, C, *S)."""
        net = self.net2d if peer == "2d" else self.student
        was = net.training
        net.eval()
        probs = torch.softmax(self.run2d(x) if peer == "2d" else net(x), dim=1)
        net.train(was)
        return probs

    def n_pseudo(self, batch: dict[str, Tensor], step: int) -> int:
        """Pseudo-labeled volumes of this step (``pseudo_count`` with B = the labeled images, at most the unlabeled)."""
        return min(pseudo_count(step, self.max_iters, self.args.transition, batch["x_l"].shape[0]),
                   batch["x_u"].shape[0])

    def model_loss(self, which: str, batch: dict[str, Tensor], step: int) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, sup, unsup) of model ``which`` ("2d" / "3d") on this step's labeled / pseudo-labeled mix."""
        b, n_p = batch["x_l"].shape[0], self.n_pseudo(batch, step)
        x_l, y_l, x_u = batch["x_l"][:b - n_p], batch["y_l"][:b - n_p], batch["x_u"][:n_p]
        onehot = F.one_hot(y_l, self.num_classes).movedim(-1, 1).to(x_l.dtype)  # (n_l, C, *S)
        x = torch.cat([x_l, x_u])  # (B, 1, *S)
        logits = self.run2d(x) if which == "2d" else self.student(x)  # (B, C, *S)
        sup = dice_kl_loss(logits[:b - n_p], onehot)
        if n_p == 0:
            return sup, sup, sup.new_zeros(())
        unsup = dice_kl_loss(logits[b - n_p:], self.soft_targets("3d" if which == "2d" else "2d", x_u))
        return ((b - n_p) * sup + n_p * unsup) / b, sup, unsup

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """Both models' losses at the current weights (``update`` steps them one after the other)."""
        loss2, sup2, unsup2 = self.model_loss("2d", batch, step)
        loss3, sup3, unsup3 = self.model_loss("3d", batch, step)
        return {"loss": loss2 + loss3, "sup": sup3, "unsup": unsup3, "sup_2d": sup2, "unsup_2d": unsup2}

    def update(self, batch: dict[str, Tensor], step: int, optimizers: list[torch.optim.Optimizer]) -> dict[str, float]:
        """2D step with the 3D model's targets, then 3D step with the updated 2D model's targets."""
        opt3d, opt2d = optimizers
        logs = {}
        for which, opt in (("2d", opt2d), ("3d", opt3d)):
            opt.zero_grad(set_to_none=True)
            loss, sup, unsup = self.model_loss(which, batch, step)
            loss.backward()
            opt.step()
            suffix = "_2d" if which == "2d" else ""
            logs |= {f"loss{suffix}": loss.item(), f"sup{suffix}": sup.item(), f"unsup{suffix}": unsup.item()}
        logs["loss"] += logs.pop("loss_2d")
        logs["n_pseudo"] = float(self.n_pseudo(batch, step))
        return logs

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The 3D model's logits, (B, C, *S)."""
        return self.student(x)
