"""Public ops of minissl: each checks its inputs once, then runs the compiled kernel when there is one for
the device of its tensors, else its pure-PyTorch twin of the same signature in ``minissl.ops.reference``
(the spec). Both paths see the same checks and give the same results (tested on both).

``kernel_status()`` says what was built and which implementation each op ran.

Example:
    >>> import torch
    >>> from minissl import ops
    >>> stats = ops.dice_ce_entropy(torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8)))
    >>> stats.intersect.shape, stats.ce.shape
    (torch.Size([2, 3]), torch.Size([2]))
"""
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from . import _build, reference
from .reference import DiceCEStats
from .regions import bcp_box, block_grid, check_region, cutmix_box, region_mask

__all__ = ["DiceCEStats", "KernelStatus", "dice_ce_entropy", "largest_component", "fit_ellipse",
           "fit_ellipse_points", "ellipse_mask", "ellipse_refine", "head_circumference", "mix", "region_mask",
           "bcp_box", "cutmix_box", "block_grid", "batch_norm_rows", "rows_layout", "kernel_status", "MAX_CLASSES"]

_FLOATS = (torch.float32, torch.float64)
MAX_CLASSES = 65536  # largest_component: the most classes one call cleans (a stray label value beyond is an error)
KERNEL_OPS = ("dice_ce_entropy", "mix", "largest_component", "fit_ellipse", "fit_ellipse_points", "ellipse_mask",
              "ellipse_refine", "batch_norm_rows")  # the ops with compiled kernels; head_circumference is a closed form
_calls: dict[str, Counter] = {op: Counter() for op in KERNEL_OPS}  # op -> {"cpu"/"cuda"/"reference": calls}
CUDA_MAX_CLASSES = 32  # channels of the CUDA loss kernel (per-thread registers; csrc/cuda/launchers.h kMaxClasses)
_warned: set[str] = set()  # the one-time warnings already given in this process


def reads_values(device: torch.device) -> bool:
    """Whether the checks that read tensor values (label range, box bounds) run for tensors on ``device``.

    Always on the CPU. On a GPU such a read is a device-to-host copy and a synchronisation per call, so it
    runs only with MINISSL_DEBUG_CHECKS=1; otherwise the kernels flag bad values on the device (an
    out-of-range label makes the loss statistics NaN, see csrc/cuda/glue.h).
    """
    return device.type == "cpu" or _build._flag("MINISSL_DEBUG_CHECKS")


def _kernel(op: str, device: torch.device) -> Optional[Callable]:
    """The compiled ``torch.ops.minissl.<op>`` for ``device`` (None: run the reference); counts the call."""
    fn = _build.get_kernel(op, device.type)
    _calls[op]["reference" if fn is None else device.type] += 1
    return fn


@dataclass
class KernelStatus:
    """What ``minissl.ops`` built and ran in this process.

    Attributes:
        enabled: False when MINISSL_NO_EXT=1 (every op runs its reference).
        path: the loaded shared object, or None.
        build_dir: the build folder (its name holds the cache key), or None.
        seconds: build (when compiled) or load time of the extension, or None.
        compiled: True when this process compiled the kernels (False: loaded from the cache).
        error: why the extension is not loaded (the build error), or None.
        cuda: why CUDA tensors have no compiled kernels (no CUDA in torch, no nvcc, the CUDA build's error
            with its log path), or None when the CUDA extension is loaded.
        kernels: op -> devices with a compiled kernel, e.g. {"mix": ("cpu",)}.
        calls: op -> {"cpu" | "cuda" | "reference": number of calls} in this process.
    """

    enabled: bool
    path: Optional[str]
    build_dir: Optional[str]
    seconds: Optional[float]
    compiled: bool
    error: Optional[str]
    cuda: Optional[str] = None
    kernels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    calls: dict[str, dict[str, int]] = field(default_factory=dict)

    def __str__(self) -> str:
        head = (f"kernels: {self.path} ({'compiled' if self.compiled else 'loaded'} in {self.seconds:.1f} s)"
                if self.path else f"kernels: not loaded ({self.error or 'MINISSL_NO_EXT=1'}); ops run the reference")
        rows = [f"  {op:19s} kernel on: {', '.join(self.kernels.get(op, ())) or '-':9s} calls: "
                f"{', '.join(f'{k} {v}' for k, v in sorted(self.calls.get(op, {}).items())) or '-'}"
                for op in KERNEL_OPS]
        cuda = [f"  no CUDA kernels: {self.cuda}"] if self.path and self.cuda else []
        return "\n".join([head, *cuda, *rows])


def kernel_status() -> KernelStatus:
    """Build or load the kernels if not done yet (as the first op call would), and report what happened.

    Returns:
        KernelStatus: the shared object, build folder and seconds, whether it was compiled now, the
        error if any, the devices each op has a kernel for, and how often each op ran which
        implementation. ``print(minissl.ops.kernel_status())`` shows it as a small table.
    """
    path = _build.load()
    info = _build.build_info()
    devices = ("cpu", "cuda")
    kernels = {op: tuple(d for d in devices if path and _build.has_kernel(op, d)) for op in KERNEL_OPS}
    return KernelStatus(enabled=not _build._flag("MINISSL_NO_EXT"), path=path,
                        build_dir=str(info["build_dir"]) if info["build_dir"] else None, seconds=info["seconds"],
                        compiled=bool(info["compiled"]), error=str(info["error"]) if info["error"] else None,
                        cuda=_build.cuda_unavailable_reason(), kernels=kernels,
                        calls={op: dict(c) for op, c in _calls.items()})


def _fail(op: str, what: str, expected: str, got) -> None:
    raise ValueError(f"{op}: expected {what}{' ' + expected if expected else ''}, got {got}")


def _check_tensor(op: str, what: str, x, dtypes: Sequence[torch.dtype], ndims: Sequence[int]) -> None:
    if not isinstance(x, torch.Tensor):
        _fail(op, what, "to be a torch.Tensor", type(x).__name__)
    if x.dtype not in dtypes:
        _fail(op, what, f"of dtype {' or '.join(str(d) for d in dtypes)}", x.dtype)
    if x.ndim not in ndims:
        _fail(op, what, f"with {' or '.join(map(str, ndims))} dims", f"shape {tuple(x.shape)}")


def _check_device(op: str, what: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        _fail(op, what, f"on {ref.device} (the device of {ref_name})", x.device)


def dice_ce_entropy(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
                    squared: bool = False) -> DiceCEStats:
    """Soft-Dice sums, cross-entropy and entropy of softmax (C >= 2) or sigmoid (C == 1) probabilities.

    The equations are in ``minissl.ops.reference.dice_ce_entropy``. First and second derivatives
    w.r.t. the logits agree between the kernel and the reference (the kernel's second order goes
    through the reference).

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
    _check_device(op, "target", target, logits, "logits")
    if target.is_floating_point():
        if target.shape != logits.shape:
            _fail(op, "soft target", f"of shape {tuple(logits.shape)} (same as logits)", tuple(target.shape))
    elif target.dtype != torch.int64:
        _fail(op, "target", "of dtype torch.int64 (labels) or floating (soft targets)", target.dtype)
    elif tuple(target.shape) != (B, *S):
        _fail(op, "label target", f"of shape {(B, *S)}", tuple(target.shape))
    elif target.numel() and reads_values(target.device):
        lo, hi = (int(v) for v in torch.aminmax(target))
        if lo < 0 or hi >= max(C, 2):
            _fail(op, "labels", f"in [0, {max(C, 2)})", f"values in [{lo}, {hi}]")
    if weight is not None:
        _check_tensor(op, "weight", weight, (torch.float16, torch.bfloat16) + _FLOATS, (logits.ndim - 1,))
        if tuple(weight.shape) != (B, *S):
            _fail(op, "weight", f"of shape {(B, *S)}", tuple(weight.shape))
        _check_device(op, "weight", weight, logits, "logits")
    kernel = _dce_kernel(logits.device, C)
    if kernel is None:
        return reference.dice_ce_entropy(logits, target, weight, squared=squared)
    target = target.detach().to(logits.dtype) if target.is_floating_point() else target
    weight = weight.detach().to(logits.dtype) if weight is not None else None
    return DiceCEStats(*kernel(logits, target, weight, squared))


def _dce_kernel(device: torch.device, channels: int) -> Optional[Callable]:
    """The compiled dice_ce_entropy for ``device`` and ``channels`` (None: run the reference).

    The CUDA kernel holds at most CUDA_MAX_CLASSES channels; more run the reference with one warning.
    """
    op = "dice_ce_entropy"
    if device.type == "cuda" and channels > CUDA_MAX_CLASSES:
        if "classes" not in _warned:
            _warned.add("classes")
            warnings.warn(f"{op}: the CUDA kernel takes at most {CUDA_MAX_CLASSES} channels, got C = {channels}; "
                          "using the pure-PyTorch reference", RuntimeWarning, stacklevel=3)
        _calls[op]["reference"] += 1
        return None
    return _kernel(op, device)


def largest_component(labels: torch.Tensor, num_classes: Optional[int] = None) -> torch.Tensor:
    """Keep only the largest connected component of each foreground class, per sample.

    Args:
        labels: (B, H, W) (8-connectivity) or (B, D, H, W) (26-connectivity), int64/uint8/bool, values
            in [0, num_classes).
        num_classes: classes 1..num_classes-1 are cleaned, at most MAX_CLASSES (default: max label + 1;
            2 for bool).

    Returns:
        Same shape and dtype; voxels of the smaller components of a class become 0. Ties: the
        component reached first in C-order raster scan wins.
    """
    op = "largest_component"
    _check_tensor(op, "labels", labels, (torch.int64, torch.uint8, torch.bool), (3, 4))
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or not 1 <= num_classes <= MAX_CLASSES):
        _fail(op, "num_classes", f"an int in [1, {MAX_CLASSES}]", repr(num_classes))
    lo, hi = (int(v) for v in torch.aminmax(labels.to(torch.uint8) if labels.dtype == torch.bool else labels)) \
        if labels.numel() else (0, 0)
    if lo < 0:
        _fail(op, "labels", ">= 0", f"min {lo}")
    if num_classes is None:
        num_classes = 2 if labels.dtype == torch.bool else hi + 1
        if num_classes > MAX_CLASSES:
            _fail(op, "labels", f"below {MAX_CLASSES} (num_classes defaults to max + 1)", f"max {hi}")
    elif hi >= num_classes:
        _fail(op, "labels", f"in [0, {num_classes})", f"max {hi}")
    kernel = _kernel(op, labels.device)
    if kernel is None:
        return reference.largest_component(labels, num_classes)
    return kernel(labels, num_classes)


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
    op = "fit_ellipse"
    _check_tensor(op, "masks", masks, (torch.uint8, torch.bool), (3,))
    kernel = _kernel(op, masks.device)
    return reference.fit_ellipse(masks) if kernel is None else tuple(kernel(masks))


def fit_ellipse_points(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct least-squares ellipse fit (Halir-Flusser) to points (N, 2) [x, y] of a floating dtype.

    Returns:
        params (5,) float64 [cx, cy, a, b, theta] and valid () bool (params all 0 when not valid).
    """
    op = "fit_ellipse_points"
    if not isinstance(points, torch.Tensor) or not points.is_floating_point() or points.ndim != 2 \
            or points.shape[1] != 2:
        got = f"{points.dtype} {tuple(points.shape)}" if isinstance(points, torch.Tensor) else type(points).__name__
        _fail(op, "points", "of a floating dtype and shape (N, 2)", got)
    kernel = _kernel(op, points.device)
    return reference.fit_ellipse_points(points) if kernel is None else tuple(kernel(points.to(torch.float64)))


def _check_params(op: str, params: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
    """params (B, 5) float32/float64 [cx, cy, a, b, theta]; the rows that count (``valid``, or all when
    None) finite with semi-axes a, b > 0 (>= 0 when ``valid`` is None: invalid fits are all 0)."""
    if not isinstance(params, torch.Tensor) or params.dtype not in _FLOATS or params.ndim != 2 \
            or params.shape[1] != 5:
        got = f"{params.dtype} {tuple(params.shape)}" if isinstance(params, torch.Tensor) else type(params).__name__
        _fail(op, "params", "of dtype torch.float32 or torch.float64 and shape (B, 5)", got)
    if valid is not None:
        _check_tensor(op, "valid", valid, (torch.bool,), (1,))
        if valid.shape[0] != params.shape[0]:
            _fail(op, "valid", f"of shape ({params.shape[0]},)", tuple(valid.shape))
        _check_device(op, "valid", valid, params, "params")
    rows = params if valid is None else params[valid]  # (n, 5)
    axes = rows[:, 2:4]  # (n, 2)
    bad = ~torch.isfinite(rows).all(1) | ((axes <= 0) if valid is not None else (axes < 0)).any(1)  # (n,)
    if bad.any():
        index = torch.arange(params.shape[0], device=params.device)
        row = int((index if valid is None else index[valid])[bad][0])
        _fail(op, "params", f"finite with semi-axes a, b {'>' if valid is not None else '>='} 0"
              f"{' in valid rows' if valid is not None else ''}", f"row {row}: {params[row].tolist()}")


def ellipse_mask(params: torch.Tensor, valid: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Rasterise ellipses: (B, H, W) uint8, 1 where d <= 1 at pixel centres, all 0 for invalid rows.

    d = (x'/a)^2 + (y'/b)^2, x' = (x-cx) cos t + (y-cy) sin t, y' = -(x-cx) sin t + (y-cy) cos t.

    Args:
        params: (B, 5) float32/float64 [cx, cy, a, b, theta]; rows where ``valid`` is True finite, a, b > 0.
        valid: (B,) bool.
        shape: (H, W), non-negative.
    """
    op = "ellipse_mask"
    _check_params(op, params, valid)
    if len(shape) != 2 or any(int(s) != s or s < 0 for s in shape):
        _fail(op, "shape", "(H, W) of non-negative ints", tuple(shape))
    H, W = (int(s) for s in shape)
    kernel = _kernel(op, params.device)
    return reference.ellipse_mask(params, valid, (H, W)) if kernel is None else kernel(params, valid, H, W)


def ellipse_refine(probs: torch.Tensor, params: torch.Tensor, valid: torch.Tensor, *, threshold: float = 0.6,
                   fill_base: float = 0.6, fill_power: float = 2.0,
                   decay: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """ERSR refinement of foreground probabilities by the fitted ellipse.

    inside (d <= 1): max(P, clip(fill_base + (1 - d)^fill_power, 0, 1)); outside: P exp(-decay (d - 1)).

    Args:
        probs: (B, H, W) float32/float64 foreground probabilities.
        params: (B, 5) float32/float64; rows where ``valid`` is True finite with semi-axes a, b > 0.
        valid: (B,) bool.

    Returns:
        refined (B, H, W) float (= P for invalid rows) and pseudo = refined > threshold, (B, H, W) uint8.
    """
    op = "ellipse_refine"
    _check_tensor(op, "probs", probs, _FLOATS, (3,))
    _check_params(op, params, valid)
    if params.shape[0] != probs.shape[0]:
        _fail(op, "params", f"of shape ({probs.shape[0]}, 5)", tuple(params.shape))
    _check_device(op, "params", params, probs, "probs")
    kernel = _kernel(op, probs.device)
    if kernel is None:
        return reference.ellipse_refine(probs, params, valid, threshold=threshold, fill_base=fill_base,
                                        fill_power=fill_power, decay=decay)
    return tuple(kernel(probs, params, valid, float(threshold), float(fill_base), float(fill_power), float(decay)))


def head_circumference(params: torch.Tensor, pixel_size: Union[float, torch.Tensor]) -> torch.Tensor:
    """Ellipse perimeter in mm (Ramanujan II) from params (B, 5) in pixels and pixel_size float or (B,).

    Returns:
        (B,) float64: pi (a+b) (1 + 3h / (10 + sqrt(4 - 3h))), h = (a-b)^2 / (a+b)^2, a, b in mm.
    """
    op = "head_circumference"
    _check_params(op, params)
    if isinstance(pixel_size, torch.Tensor) and pixel_size.ndim and tuple(pixel_size.shape) != (params.shape[0],):
        _fail(op, "pixel_size", f"a float or of shape ({params.shape[0]},)", tuple(pixel_size.shape))
    return reference.head_circumference(params, pixel_size)


def mix(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], *, boxes: Optional[torch.Tensor] = None,
        blocks: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    """Paste b into a inside a region: out[k] = b[k] in R, a[k] outside (images, labels, weights at once).

    Args:
        a, b: sequences of tensors on one device; a[k], b[k] of the same shape and dtype, (B, *S) or (B, C, *S).
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
        _check_device(op, f"a[{k}]", x, a[0], "a[0]")
        if x.ndim not in (sd + 1, sd + 2) or x.shape[0] != batch or (spatial and tuple(x.shape[-sd:]) != spatial):
            _fail(op, f"a[{k}]", f"of shape ({batch}, [C,] *{spatial or f'S ({sd} dims)'})", tuple(x.shape))
        spatial = tuple(x.shape[-sd:])
    check_region(spatial, boxes, blocks, name=op)
    device = a[0].device
    boxes = boxes.to(device) if boxes is not None else None
    blocks = blocks.to(device) if blocks is not None else None
    kernel = _kernel(op, device)
    if kernel is None:
        return reference.mix(a, b, boxes=boxes, blocks=blocks)
    return list(kernel(list(a), list(b), boxes, blocks))


def rows_layout(x: torch.Tensor) -> bool:
    """True when x's memory is M rows of C channels: (M, C) contiguous, (B, C, H, W) channels-last or
    (B, C, D, H, W) channels-last-3d (a size-1 dim can make a tensor both contiguous and channels-last)."""
    fmt = {2: torch.contiguous_format, 4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return fmt is not None and x.is_contiguous(memory_format=fmt)


def batch_norm_rows(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                    eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode batch norm of a channels-last activation, channel sums in float64.

    ``x`` (B, C, *S) stored (B, *S, C) is M = numel / C rows of C channels (a contiguous (M, C) matrix is
    the same thing). :class:`minissl.nets.norm.BatchNorm2d` uses this for channels-last CPU activations,
    where PyTorch's own batch norm sums in float32 (``minissl/runtime.py``).

    Args:
        x: (B, C, *S) channels-last or (M, C) contiguous; float32/float64; at least one value per channel.
        weight, bias: optional (C,) of x's dtype.
        eps: added to the variance.

    Returns:
        y (x's shape and strides), mean (C,), unbiased var (C,) (M / (M - 1) times the biased one, what
        running statistics average; the biased one when M == 1), invstd (C,) = 1 / sqrt(biased var + eps).
        ``y`` is differentiable w.r.t. x, weight and bias; the statistics are not.
    """
    op = "batch_norm_rows"
    _check_tensor(op, "x", x, _FLOATS, (2, 4, 5))
    if x.numel() == 0 or not rows_layout(x):
        _fail(op, "x", "to be a non-empty (M, C) contiguous or (B, C, *S) channels-last tensor",
              f"shape {tuple(x.shape)} strides {x.stride()}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check_tensor(op, name, t, (x.dtype,), (1,))
            _check_device(op, name, t, x, "x")
            if t.shape[0] != x.shape[1]:
                _fail(op, name, f"of shape ({x.shape[1]},)", f"shape {tuple(t.shape)}")
    if not eps >= 0:
        _fail(op, "eps", ">= 0", eps)
    kernel = _kernel(op, x.device)
    if kernel is None:
        return reference.batch_norm_rows(x, weight, bias, eps)
    return tuple(kernel(x, weight, bias, float(eps)))  # differentiable: its autograd is registered in C++
