"""Python side of the compiled ops: ``torch.ops.minissl.*`` calls, fake kernels and autograd.

Imported by ``_build.load()`` only after the shared object is loaded (the schemas must exist before
``torch.library`` can refer to them). Each wrapper has exactly the signature of its twin in
``minissl.ops.reference`` and falls back to that twin when the op has no compiled kernel for the
device of its inputs (e.g. a CUDA tensor with a CPU-only build, or an op whose source is not written).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Optional, Sequence

import torch

from . import reference
from .reference import DiceCEStats

OPS = ("dice_ce_entropy", "dice_ce_entropy_backward", "mix", "largest_component", "fit_ellipse",
       "fit_ellipse_points", "ellipse_refine", "ellipse_mask")


@lru_cache(maxsize=None)
def has_kernel(name: str, device_type: str = "cpu") -> bool:
    """True when op ``minissl::name`` has a compiled kernel for ``device_type`` ('cpu' or 'cuda')."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"minissl::{name}", key)


# ---- fake (meta) kernels: shapes only, for torch.compile and opcheck ---------------------------------

@torch.library.register_fake("minissl::dice_ce_entropy")
def _(logits, target, weight, squared):
    B, C = logits.shape[0], logits.shape[1]
    bc = [logits.new_empty((B, C)) for _ in range(3)]  # intersect, pred_sum, target_sum
    b = [logits.new_empty((B,)) for _ in range(3)]  # ce, entropy, weight_sum
    return (*bc, *b)


@torch.library.register_fake("minissl::dice_ce_entropy_backward")
def _(grad_intersect, grad_pred_sum, grad_ce, grad_entropy, logits, target, weight, squared):
    return torch.empty_like(logits)


@torch.library.register_fake("minissl::mix")
def _(a, b, boxes, blocks):
    return [torch.empty_like(x) for x in a]


@torch.library.register_fake("minissl::largest_component")
def _(labels, num_classes):
    return torch.empty_like(labels)


@torch.library.register_fake("minissl::fit_ellipse")
def _(masks):
    B = masks.shape[0]
    return masks.new_empty((B, 5), dtype=torch.float64), masks.new_empty((B,), dtype=torch.bool)


@torch.library.register_fake("minissl::fit_ellipse_points")
def _(points):
    return points.new_empty((5,), dtype=torch.float64), points.new_empty((), dtype=torch.bool)


@torch.library.register_fake("minissl::ellipse_refine")
def _(probs, params, valid, threshold, fill_base, fill_power, decay):
    return torch.empty_like(probs), torch.empty_like(probs, dtype=torch.uint8)


@torch.library.register_fake("minissl::ellipse_mask")
def _(params, valid, height, width):
    return params.new_empty((params.shape[0], height, width), dtype=torch.uint8)


# ---- autograd of the fused loss ----------------------------------------------------------------------

def _dce_setup_context(ctx, inputs, output):
    logits, target, weight, squared = inputs
    ctx.save_for_backward(logits, target, weight)
    ctx.squared = squared


def _dce_backward(ctx, g_intersect, g_pred_sum, g_target_sum, g_ce, g_entropy, g_weight_sum):
    """Gradient w.r.t. logits only (target_sum and weight_sum do not depend on them); one fused pass."""
    logits, target, weight = ctx.saved_tensors
    B, C = logits.shape[0], logits.shape[1]

    def grad(g, shape):  # undefined output gradients are zeros
        return logits.new_zeros(shape) if g is None else g.to(logits.dtype)

    g_logits = torch.ops.minissl.dice_ce_entropy_backward(
        grad(g_intersect, (B, C)), grad(g_pred_sum, (B, C)), grad(g_ce, (B,)), grad(g_entropy, (B,)),
        logits, target, weight, ctx.squared)  # (B, C, *S)
    return g_logits, None, None, None


torch.library.register_autograd("minissl::dice_ce_entropy", _dce_backward, setup_context=_dce_setup_context)


# ---- wrappers with the reference signatures ----------------------------------------------------------

def dice_ce_entropy(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
                    squared: bool = False) -> DiceCEStats:
    """Compiled ``reference.dice_ce_entropy``: one pass forward, one pass backward."""
    if not has_kernel("dice_ce_entropy", logits.device.type):
        return reference.dice_ce_entropy(logits, target, weight, squared=squared)
    if target.is_floating_point():
        target = target.detach().to(logits.dtype)
    if weight is not None:
        weight = weight.detach().to(logits.dtype)
    return DiceCEStats(*torch.ops.minissl.dice_ce_entropy(logits, target, weight, squared))


def mix(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], *, boxes: Optional[torch.Tensor] = None,
        blocks: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    """Compiled ``reference.mix``: one pass of row copies per tensor."""
    if not a or not has_kernel("mix", a[0].device.type):
        return reference.mix(a, b, boxes=boxes, blocks=blocks)
    return list(torch.ops.minissl.mix(list(a), list(b), boxes, blocks))


def largest_component(labels: torch.Tensor, num_classes: Optional[int] = None) -> torch.Tensor:
    """Compiled ``reference.largest_component``."""
    if not has_kernel("largest_component", labels.device.type):
        return reference.largest_component(labels, num_classes)
    if num_classes is None:
        num_classes = 2 if labels.dtype == torch.bool else (int(labels.max()) + 1 if labels.numel() else 1)
    return torch.ops.minissl.largest_component(labels, int(num_classes))


def fit_ellipse(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compiled ``reference.fit_ellipse``."""
    if not has_kernel("fit_ellipse", masks.device.type):
        return reference.fit_ellipse(masks)
    params, valid = torch.ops.minissl.fit_ellipse(masks)
    return params, valid


def fit_ellipse_points(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compiled ``reference.fit_ellipse_points``."""
    if not has_kernel("fit_ellipse_points", points.device.type):
        return reference.fit_ellipse_points(points)
    params, valid = torch.ops.minissl.fit_ellipse_points(points.to(torch.float64))
    return params, valid


def ellipse_mask(params: torch.Tensor, valid: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Compiled ``reference.ellipse_mask``."""
    if not has_kernel("ellipse_mask", params.device.type):
        return reference.ellipse_mask(params, valid, shape)
    H, W = (int(s) for s in shape)
    return torch.ops.minissl.ellipse_mask(params, valid, H, W)


def ellipse_refine(probs: torch.Tensor, params: torch.Tensor, valid: torch.Tensor, *, threshold: float = 0.6,
                   fill_base: float = 0.6, fill_power: float = 2.0,
                   decay: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Compiled ``reference.ellipse_refine``."""
    if not has_kernel("ellipse_refine", probs.device.type):
        return reference.ellipse_refine(probs, params, valid, threshold=threshold, fill_base=fill_base,
                                        fill_power=fill_power, decay=decay)
    refined, pseudo = torch.ops.minissl.ellipse_refine(probs, params, valid, float(threshold), float(fill_base),
                                                       float(fill_power), float(decay))
    return refined, pseudo


KERNELS: dict[str, Callable] = {
    "dice_ce_entropy": dice_ce_entropy,
    "mix": mix,
    "largest_component": largest_component,
    "fit_ellipse": fit_ellipse,
    "fit_ellipse_points": fit_ellipse_points,
    "ellipse_mask": ellipse_mask,
    "ellipse_refine": ellipse_refine,
}


def get(name: str) -> Optional[Callable]:
    """The wrapper of public op ``name`` when it has a compiled CPU kernel, else None."""
    fn = KERNELS.get(name)
    return fn if fn is not None and has_kernel(name, "cpu") else None
