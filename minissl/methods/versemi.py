"""VerSemi: one network for several segmentation tasks at once, prompted per task (Zeng et al., IEEE TMI 2025).

Idea: instead of one semi-supervised model per dataset, train a single network on every dataset together.
A *dynamic head* conditioned on a task prompt turns the shared features into the segmentation of that
task; a further, synthetic task "any foreground" is learned on CutMix composites of images from different
datasets (its target: the union of their foregrounds). On unlabeled images the task heads together say
where some foreground is, and that aggregate supervises the synthetic task.

Network (DoDNet-style dynamic head, ``PromptedUNet``): the UNet's 3x3 head gives ``head_channels`` = 8
feature maps h; a controller (a linear layer) maps ``[GAP(bottleneck) || onehot(task, T + 1)]`` to the
weights of a per-sample head of 1x1 convolutions 8 -> 8 -> 8 -> C (ReLU between):

    theta_b = W_ctrl [mean_S(f_bottleneck,b) ; e_{t_b}] + b_ctrl        (per sample b)
    z_b     = W3(theta_b) relu(W2(theta_b) relu(W1(theta_b) h_b + c1) + c2) + c3

Tasks: T = number of suites (``--suites cardiac,fetal_head``: task 0 cardiac, task 1 fetal_head; the
synthetic task is T). A task keeps its suite's classes: the 4-class cardiac suite is ONE task with the
classes background / RV / myocardium / LV (the head has C = the largest number of classes; a 2-class task
is trained and evaluated on the first 2 channels). For the synthetic task every foreground class of every
suite is "foreground": channels (0, 1) = (background, any foreground).

Losses (M: a box of ratio r ~ U(0.3, 0.6) of every side, one per pair; fg = label > 0; p_t = softmax):

    L_sup   = L_sup(f(x_l, t_l), y_l)                                         (each labeled image with its prompt)
    L_mix   = Dice(f(x_mix, T), fg_mix),   x_mix = x_a in M, x_b outside     (labeled halves a, b: any datasets)
    x_chaos = x_l in M, x_u outside;       p_agg = max_{t < T} (1 - p_t(f(x_chaos, t))_background)   (no gradient)
    L_agg   = Dice(f(x_chaos, T), p_agg)                                     (the unlabeled part)
    L_box   = Dice(f(x_chaos, T), fg(y_l); inside M only)                    (labeled-region consistency)
    L       = (L_sup + L_mix + L_box) + L_agg               reported: sup = L_sup + L_mix + L_box, unsup = L_agg

Dice is the official one on the foreground channel: squared sums pooled over the batch, smooth 1e-5.
All weights are 1 (the official code computes a ramp-up but does not apply it). The task heads of x_chaos
share one encoder/decoder pass (the prompt enters only at the head). Schedule: none (one stage).
Evaluation: each suite with its own prompt (``minissl.evaluate.evaluate_split``). The paired baseline is
``supervised`` on each suite alone with the same ``--budget`` (patients per suite: ``TaskStore.labeled``)
and ``--max_iters``. A single suite works too (one task + the synthetic one).

Paper: Q. Zeng, Y. Xie, Z. Lu, M. Lu, Y. Wu, Y. Xia, "Segment Together: A Versatile Paradigm for
Semi-Supervised Medical Image Segmentation", IEEE TMI 2025, arXiv:2311.11686.
Code: https://github.com/maxwell0027/VerSemi (``train.py``, ``vnet_odod_mix.py``).

Where the official code differs, and what minissl does:
    * every task is binary there (``lab == 1``); minissl keeps each suite's classes (above);
    * it trains a labeled pre-training stage (task heads on mixed labeled pairs, 1000 epochs) then the
      semi-supervised stage, and its released ``__main__`` runs only the pre-training; minissl runs the
      semi-supervised stage's four losses from the first iteration;
    * the aggregated target is not detached there; minissl treats it as a target (no gradient);
    * the controller sees BatchNorm + ReLU + GAP of the bottleneck; minissl averages the UNet bottleneck
      (already normalised and activated); ``precls_conv`` (16 -> 8, 1x1) is the UNet's 3x3 head;
    * an EMA model is kept there but never used for targets: minissl keeps none;
    * unlabeled volumes are centre-cropped there; minissl's loader crops them at random like labeled ones;
    * the optimiser is Adam (lr 1e-3, betas (0.5, 0.999), constant rate, no weight decay): ``--recipe official``
      (3D only: the paper and code are 3D); the default is the shared recipe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses, ops
from ..recipes import Recipe
from .base import Method, register


class PromptedUNet(nn.Module):
    """A UNet whose output layer is a per-sample 1x1 head generated from the task prompt.

    Args:
        unet: a UNet with ``head_channels`` outputs (its own head is the pre-classifier conv).
        num_prompts: T + 1 (the suites' tasks and the synthetic one).
        num_classes: C, channels of the task logits.
        head_channels: width of the dynamic head (8 in VerSemi).
    """

    def __init__(self, unet: nn.Module, num_prompts: int, num_classes: int, head_channels: int = 8):
        super().__init__()
        self.unet, self.num_prompts, self.num_classes, self.k = unet, num_prompts, num_classes, head_channels
        k, c = head_channels, num_classes
        self.shapes = [(k, k), (k,), (k, k), (k,), (c, k), (c,)]  # W1, c1, W2, c2, W3, c3
        bottleneck = unet.encoder[-1][0].out_channels
        self.controller = nn.Linear(bottleneck + num_prompts, sum(torch.Size(s).numel() for s in self.shapes))

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Head input h (B, k, *S) and the pooled bottleneck g (B, C_b) of one encoder/decoder pass."""
        feats = self.unet.encode(x)
        h = self.unet.decode(feats)[0]                                       # (B, k, *S)
        return h, feats[-1].flatten(2).mean(2)                               # (B, k, *S), (B, C_b)

    def head(self, h: Tensor, g: Tensor, task: Tensor) -> Tensor:
        """Logits (B, C, *S) of the per-sample head generated for ``task`` (B,) int64."""
        if task.shape != (h.shape[0],) or task.min() < 0 or task.max() >= self.num_prompts:
            raise ValueError(f"PromptedUNet: expected one task in [0, {self.num_prompts}) per sample "
                             f"({h.shape[0]}), got {task.tolist()}")
        prompt = F.one_hot(task, self.num_prompts).to(g.dtype)              # (B, T + 1)
        theta = self.controller(torch.cat([g, prompt], 1))                  # (B, n_params)
        sizes = [torch.Size(s).numel() for s in self.shapes]
        w1, c1, w2, c2, w3, c3 = (p.reshape(-1, *s) for p, s in zip(theta.split(sizes, 1), self.shapes))
        tail = (None,) * (h.ndim - 2)
        z = F.relu(torch.einsum("boi,bi...->bo...", w1, h) + c1[(..., *tail)])   # (B, k, *S)
        z = F.relu(torch.einsum("boi,bi...->bo...", w2, z) + c2[(..., *tail)])   # (B, k, *S)
        return torch.einsum("boi,bi...->bo...", w3, z) + c3[(..., *tail)]        # (B, C, *S)

    def forward(self, x: Tensor, task: Tensor) -> Tensor:
        h, g = self.features(x)
        return self.head(h, g, task)


def aggregate_foreground(task_logits: list[Tensor]) -> Tensor:
    """VerSemi's aggregated target: per voxel the largest foreground probability over the tasks.

    Args:
        task_logits: one (B, C, *S) logits per task (each task's foreground = not its background).

    Returns:
        (B, *S) in [0, 1].
    """
    fg = [1 - torch.softmax(z, dim=1)[:, 0] for z in task_logits]           # T x (B, *S)
    return torch.stack(fg).amax(0)                                          # (B, *S)


def foreground_dice(logits: Tensor, target: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """The official Dice of the synthetic task: channels (0, 1) = (background, any foreground); squared sums
    pooled over the batch, smooth 1e-5; ``target`` (B, *S) in [0, 1] (hard or soft foreground)."""
    soft = torch.stack([1 - target, target], 1).to(logits.dtype)            # (B, 2, *S)
    return losses.dice_loss(logits[:, :2], soft, weight, include_background=False, squared=True, batch=True)


@dataclass
class VerSemiArgs:
    head_channels: int = 8  # width of the dynamic head (and of the UNet's pre-classifier output)
    mix_ratio_min: float = 0.3  # CutMix box side as a fraction of every image side, drawn in [min, max]
    mix_ratio_max: float = 0.6


@register("versemi")
class VerSemi(Method):
    """One task-prompted network for several suites; a synthetic any-foreground task on CutMix composites."""

    Args = VerSemiArgs
    multi_task = True  # trains with ``--suites a,b`` (one task per suite)
    official_recipes = {3: Recipe(optimizer="adam", lr=1e-3, momentum=0.5, weight_decay=0.0, schedule="constant",
                                  source="maxwell0027/VerSemi train.py")}  # Adam betas (0.5, 0.999), no decay

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        a = self.args
        if not 0 < a.mix_ratio_min <= a.mix_ratio_max < 1 or a.head_channels < 1:
            raise ValueError(f"versemi: expected 0 < mix_ratio_min <= mix_ratio_max < 1 and head_channels >= 1, got "
                             f"{a.mix_ratio_min}, {a.mix_ratio_max}, {a.head_channels}")
        self.num_tasks = len([s for s in cfg.suites.split(",") if s.strip()]) or 1
        self.student = PromptedUNet(self.make_net(num_classes=a.head_channels), self.num_tasks + 1,
                                    self.num_classes, a.head_channels)

    def boxes(self, n: int, spatial: tuple[int, ...], device: torch.device) -> Tensor:
        """(n, *S) bool: one box per sample, side ratio r ~ U(min, max) per batch, offsets uniform."""
        lo, hi = self.args.mix_ratio_min, self.args.mix_ratio_max
        r = lo + (hi - lo) * float(torch.rand((), generator=self.rng))
        return ops.region_mask(spatial, boxes=ops.bcp_box(spatial, n, self.rng, ratio=r, shared=False)).to(device)

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x_l, y_l, x_u = batch["x_l"], batch["y_l"], batch["x_u"]
        bl, bu, spatial = x_l.shape[0], x_u.shape[0], tuple(x_l.shape[2:])
        t_l = batch.get("task_l", torch.zeros(bl, dtype=torch.int64, device=x_l.device))  # (Bl,)
        synthetic = torch.full((max(bl // 2, bu),), self.num_tasks, dtype=torch.int64, device=x_l.device)
        sup = self.supervised_loss(self.student(x_l, t_l), y_l)
        fg_l = (y_l > 0).to(x_l.dtype)                                      # (Bl, *S)
        n = bl // 2
        m = self.boxes(max(n, bu), spatial, x_l.device)                      # (max(n, Bu), *S)
        if n:  # labeled CutMix across datasets: x_a inside the box, x_b outside
            inside = m[:n, None]                                             # (n, 1, *S)
            x_mix = torch.where(inside, x_l[:n], x_l[n:2 * n])               # (n, 1, *S)
            fg_mix = torch.where(m[:n], fg_l[:n], fg_l[n:2 * n])             # (n, *S)
            sup = sup + foreground_dice(self.student(x_mix, synthetic[:n]), fg_mix)
        if not bu:  # no unlabeled images (full supervision): no composite
            return {"loss": sup, "sup": sup, "unsup": torch.zeros(())}
        pair = torch.arange(bu, device=x_l.device) % bl                     # labeled partner of each unlabeled image
        x_chaos = torch.where(m[:bu, None], x_l[pair], x_u)                  # (Bu, 1, *S): labeled inside the box
        h, g = self.student.features(x_chaos)                                # (Bu, k, *S), (Bu, C_b)
        logits_syn = self.student.head(h, g, synthetic[:bu])                 # (Bu, C, *S)
        with torch.no_grad():
            p_agg = aggregate_foreground([self.student.head(h, g, torch.full_like(synthetic[:bu], t))
                                          for t in range(self.num_tasks)])   # (Bu, *S)
        unsup = foreground_dice(logits_syn, p_agg)
        box = foreground_dice(logits_syn, fg_l[pair], m[:bu].to(x_l.dtype))
        sup = sup + box
        return {"loss": sup + unsup, "sup": sup, "unsup": unsup, "box": box}

    @torch.no_grad()
    def predict(self, x: Tensor, task: Optional[int] = None) -> Tensor:
        """Logits (B, C, *S) of task ``task`` (default 0: the suite of a single-suite run)."""
        t = torch.full((x.shape[0],), 0 if task is None else int(task), dtype=torch.int64, device=x.device)
        return self.student(x, t)
