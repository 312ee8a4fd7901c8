"""Public ops of minissl: input checks, then the compiled kernel when there is one, else the reference.

Every op here has a pure-PyTorch twin of the same signature in ``minissl.ops.reference`` (the spec).
``_build.get_kernel(name)`` returns the compiled callable (same signature as the twin) or None.

Example:
    >>> import torch
    >>> from minissl import ops
    >>> stats = ops.dice_ce_entropy(torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8)))
    >>> stats.intersect.shape, stats.ce.shape
    (torch.Size([2, 3]), torch.Size([2]))
"""
from typing import Optional, Sequence, Union

import torch

from . import _build, reference
from .reference import DiceCEStats
from .regions import bcp_box, block_grid, check_region, cutmix_box, region_mask

__all__ = ["DiceCEStats", "dice_ce_entropy", "largest_component", "fit_ellipse", "fit_ellipse_points",
           "ellipse_mask", "ellipse_refine", "head_circumference", "mix", "region_mask", "bcp_box",
           "cutmix_box", "block_grid"]

_FLOATS = (torch.float32, torch.float64)


def _dispatch(name: str, tensors: Sequence[torch.Tensor], *args, **kwargs):
    """Run the compiled kernel ``name`` if it exists and the tensors live on one CPU/CUDA device, else the reference."""
    kernel = _build.get_kernel(name)
    devices = {t.device for t in tensors}
    if kernel is not None and len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda"):
        return kernel(*args, **kwargs)
    return getattr(reference, name)(*args, **kwargs)


def _fail(op: str, what: str, expected: str, got) -> None:
    raise ValueError(f"{op}: expected {what}{' ' + expected if expected else ''}, got {got}")


def _check_tensor(op: str, what: str, x, dtypes: Sequence[torch.dtype], ndims: Sequence[int]) -> None:
    if not isinstance(x, torch.Tensor):
        _fail(op, what, "to be a torch.Tensor", type(x).__name__)
    if x.dtype not in dtypes:
        _fail(op, what, f"of dtype {' or '.join(str(d) for d in dtypes)}", x.dtype)
    if x.ndim not in ndims:
        _fail(op, what, f"with {' or '.join(map(str, ndims))} dims", f"shape {tuple(x.shape)}")


def dice_ce_entropy(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
                    squared: bool = False) -> DiceCEStats:
    """Soft-Dice sums, cross-entropy and entropy of softmax (C >= 2) or sigmoid (C == 1) probabilities.

    The equations are in ``minissl.ops.reference.dice_ce_entropy``.

    Args:
        logits: (B, C, *S) float32/float64, S = 2 or 3 spatial dims.
        target: (B, *S) int64 labels in [0, C) ({0, 1} when C == 1) or (B, C, *S) floating soft targets.
        weight: optional (B, *S) floating voxel weights.
        squared: square p and t in the Dice denominators.

    Returns:
        DiceCEStats(intersect (B, C), pred_sum (B, C), target_sum (B, C), ce (B,), entropy (B,),
        weight_sum (B,)), differentiable w.r.t. ``logits`` only.
    """
    op = "dice_ce_entropy"
    _check_tensor(op, "logits", logits, _FLOATS, (4, 5))
    B, C, *S = logits.shape
    if not isinstance(target, torch.Tensor):
        _fail(op, "target", "to be a torch.Tensor", type(target).__name__)
    if target.is_floating_point():
        if target.shape != logits.shape:
            _fail(op, "soft target", f"of shape {tuple(logits.shape)} (same as logits)", tuple(target.shape))
    elif target.dtype != torch.int64:
        _fail(op, "target", "of dtype torch.int64 (labels) or floating (soft targets)", target.dtype)
    elif tuple(target.shape) != (B, *S):
        _fail(op, "label target", f"of shape {(B, *S)}", tuple(target.shape))
    elif target.numel() and _build.get_kernel(op) is None:  # the kernels check the range in their own pass
        lo, hi = (int(v) for v in torch.aminmax(target))
        if lo < 0 or hi >= max(C, 2):
            _fail(op, "labels", f"in [0, {max(C, 2)})", f"values in [{lo}, {hi}]")
    if target.device != logits.device:
        _fail(op, "target", f"on {logits.device} (the device of logits)", target.device)
    if weight is not None:
        _check_tensor(op, "weight", weight, (torch.float16, torch.bfloat16) + _FLOATS, (logits.ndim - 1,))
        if tuple(weight.shape) != (B, *S) or weight.device != logits.device:
            _fail(op, "weight", f"of shape {(B, *S)} on {logits.device}", f"{tuple(weight.shape)} on {weight.device}")
    tensors = [logits, target] + ([weight] if weight is not None else [])
    return DiceCEStats(*_dispatch(op, tensors, logits, target, weight, squared=squared))


def largest_component(labels: torch.Tensor, num_classes: Optional[int] = None) -> torch.Tensor:
    """Keep only the largest connected component of each foreground class, per sample.

    Args:
        labels: (B, H, W) (8-connectivity) or (B, D, H, W) (26-connectivity), int64/uint8/bool.
        num_classes: classes 1..num_classes-1 are cleaned (default max + 1; bool is binary).

    Returns:
        Same shape and dtype; voxels of the smaller components of a class become 0. Ties: the
        component reached first in C-order raster scan wins.
    """
    op = "largest_component"
    _check_tensor(op, "labels", labels, (torch.int64, torch.uint8, torch.bool), (3, 4))
    if num_classes is not None and num_classes < 1:
        _fail(op, "num_classes", ">= 1", num_classes)
    if labels.dtype == torch.bool:
        num_classes = num_classes or 2
    elif labels.numel():  # one pass for both bounds; the default num_classes comes from it too
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0:
            _fail(op, "labels", ">= 0", f"min {lo}")
        if num_classes is not None and hi >= num_classes:
            _fail(op, "labels", f"in [0, {num_classes})", f"max {hi}")
        num_classes = num_classes or hi + 1
    return _dispatch(op, [labels], labels, num_classes or 1)


def fit_ellipse(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct least-squares ellipse fit to the outer boundary of the largest 8-connected component of each mask.

    Points are the midpoints of the edges between component pixels and their 4-neighbours outside it,
    holes not counted: background not 4-connected to the image border is filled first (as
    ``cv2.findContours(RETR_EXTERNAL)``). Pixel (row y, col x) has its centre at (x, y).

    Args:
        masks: (B, H, W) uint8/bool.

    Returns:
        params (B, 5) float64 [cx, cy, a, b, theta] (a >= b semi-axes in pixels, theta in [0, pi) the
        major-axis angle from +x towards +y) and valid (B,) bool; invalid rows are all 0 (empty mask,
        < 6 points, no ellipse, non-finite, or minor semi-axis < 1 px).
    """
    _check_tensor("fit_ellipse", "masks", masks, (torch.uint8, torch.bool), (3,))
    return _dispatch("fit_ellipse", [masks], masks)


def fit_ellipse_points(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct least-squares ellipse fit (Halir-Flusser) to points (N, 2) [x, y].

    Returns:
        params (5,) float64 [cx, cy, a, b, theta] and valid () bool (params all 0 when not valid).
    """
    if not isinstance(points, torch.Tensor) or not points.is_floating_point() or points.ndim != 2 \
            or points.shape[1] != 2:
        got = f"{points.dtype} {tuple(points.shape)}" if isinstance(points, torch.Tensor) else type(points).__name__
        _fail("fit_ellipse_points", "points", "of a floating dtype and shape (N, 2)", got)
    return _dispatch("fit_ellipse_points", [points], points)


def _check_params(op: str, params: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
    if not isinstance(params, torch.Tensor) or not params.is_floating_point() or params.ndim != 2 \
            or params.shape[1] != 5:
        got = f"{params.dtype} {tuple(params.shape)}" if isinstance(params, torch.Tensor) else type(params).__name__
        _fail(op, "params", "of a floating dtype and shape (B, 5)", got)
    if valid is not None:
        _check_tensor(op, "valid", valid, (torch.bool,), (1,))
        if valid.shape[0] != params.shape[0]:
            _fail(op, "valid", f"of shape ({params.shape[0]},)", tuple(valid.shape))


def ellipse_mask(params: torch.Tensor, valid: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Rasterise ellipses: (B, H, W) uint8, 1 where d <= 1 at pixel centres, all 0 for invalid rows.

    d = (x'/a)^2 + (y'/b)^2, x' = (x-cx) cos t + (y-cy) sin t, y' = -(x-cx) sin t + (y-cy) cos t.
    """
    _check_params("ellipse_mask", params, valid)
    if len(shape) != 2:
        _fail("ellipse_mask", "shape", "(H, W)", tuple(shape))
    return _dispatch("ellipse_mask", [params, valid], params, valid, tuple(int(s) for s in shape))


def ellipse_refine(probs: torch.Tensor, params: torch.Tensor, valid: torch.Tensor, *, threshold: float = 0.6,
                   fill_base: float = 0.6, fill_power: float = 2.0,
                   decay: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """ERSR refinement of foreground probabilities by the fitted ellipse (Zhou et al., IEEE JBHI 2025).

    inside (d <= 1): max(P, clip(fill_base + (1 - d)^fill_power, 0, 1)); outside: P exp(-decay (d - 1)).

    Args:
        probs: (B, H, W) float foreground probabilities. params: (B, 5). valid: (B,) bool.

    Returns:
        refined (B, H, W) float (= P for invalid rows) and pseudo = refined > threshold, (B, H, W) uint8.
    """
    op = "ellipse_refine"
    _check_tensor(op, "probs", probs, _FLOATS, (3,))
    _check_params(op, params, valid)
    if params.shape[0] != probs.shape[0]:
        _fail(op, "params", f"of shape ({probs.shape[0]}, 5)", tuple(params.shape))
    return _dispatch(op, [probs, params, valid], probs, params, valid, threshold=threshold, fill_base=fill_base,
                     fill_power=fill_power, decay=decay)


def head_circumference(params: torch.Tensor, pixel_size: Union[float, torch.Tensor]) -> torch.Tensor:
    """Ellipse perimeter in mm (Ramanujan II) from params (B, 5) in pixels and pixel_size float or (B,).

    Returns:
        (B,) float64: pi (a+b) (1 + 3h / (10 + sqrt(4 - 3h))), h = (a-b)^2 / (a+b)^2, a, b in mm.
    """
    _check_params("head_circumference", params)
    if isinstance(pixel_size, torch.Tensor) and pixel_size.ndim and tuple(pixel_size.shape) != (params.shape[0],):
        _fail("head_circumference", "pixel_size", f"a float or of shape ({params.shape[0]},)",
              tuple(pixel_size.shape))
    return reference.head_circumference(params, pixel_size)


def mix(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], *, boxes: Optional[torch.Tensor] = None,
        blocks: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    """Paste b into a inside a region: out[k] = b[k] in R, a[k] outside (images, labels, weights at once).

    Args:
        a, b: sequences of tensors; a[k], b[k] of the same shape and dtype, (B, *S) or (B, C, *S).
        boxes: (B, 2*sd) int64 half-open boxes (lo..., hi...), 0 <= lo <= hi <= S; or
        blocks: (B, *G) bool, each S_d divisible by G_d. Exactly one of them.

    Returns:
        list of mixed tensors, out[k] like a[k]. Not differentiable (inputs are data).
    """
    op = "mix"
    if len(a) != len(b) or len(a) == 0:
        _fail(op, "a and b", "to be non-empty sequences of equal length", f"lengths {len(a)} and {len(b)}")
    if (boxes is None) == (blocks is None):
        _fail(op, "exactly one of boxes / blocks", "", "both" if boxes is not None else "neither")
    region = boxes if boxes is not None else blocks
    if not isinstance(region, torch.Tensor) or region.ndim < 2:
        _fail(op, "boxes (B, 2*sd) or blocks (B, *G)", "tensor", getattr(region, "shape", type(region).__name__))
    sd = region.shape[1] // 2 if boxes is not None else region.ndim - 1
    if sd not in (2, 3):
        _fail(op, "2 or 3 spatial dims from boxes/blocks", "", sd)
    batch, spatial = region.shape[0], None
    for k, (x, y) in enumerate(zip(a, b)):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            _fail(op, f"a[{k}] and b[{k}]", "tensors", f"{type(x).__name__} and {type(y).__name__}")
        if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
            _fail(op, f"b[{k}]", f"like a[{k}] {tuple(x.shape)} {x.dtype} {x.device}",
                  f"{tuple(y.shape)} {y.dtype} {y.device}")
        if x.ndim not in (sd + 1, sd + 2) or x.shape[0] != batch or (spatial and tuple(x.shape[-sd:]) != spatial):
            _fail(op, f"a[{k}]", f"of shape ({batch}, [C,] *{spatial or f'S ({sd} dims)'})", tuple(x.shape))
        spatial = tuple(x.shape[-sd:])
    check_region(spatial, boxes, blocks, name=op)
    device = a[0].device
    boxes = boxes.to(device) if boxes is not None else None
    blocks = blocks.to(device) if blocks is not None else None
    return _dispatch(op, list(a) + list(b), list(a), list(b), boxes=boxes, blocks=blocks)
