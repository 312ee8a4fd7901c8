"""Benchmark the compiled ops against the libraries and idioms they replace, side by side.

    python -m minissl.ops.benchmark                 # all rows, 2 threads (or benchmarks/bench_ops.py)
    python -m minissl.ops.benchmark --only mix --repeats 9

For each row, ours and that row's competitor run round-robin in one loop, so a slow patch of a shared
machine hits both alike (one loop per pair, see ``run``); the table shows median milliseconds, the
ratio other / ours (> 1: ours is faster) and the target of the issue. Rows are registered with
``@case(op, description)``: the function builds its inputs and returns a ``Case``; add new ops' rows
the same way. The competitors (MONAI, OpenCV, scikit-image) are imported only by their rows (the
``test`` extra installs them).
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from minissl import ops


@dataclass
class Other:
    """A competitor: its timed call and the target on ratio = other / ours (None: just shown)."""

    fn: Callable[[], object]
    min_ratio: Optional[float] = None


@dataclass
class Case:
    ours: Callable[[], object]
    others: dict[str, Other] = field(default_factory=dict)


CASES: list[tuple[str, str, Callable[[], Case]]] = []


def case(op: str, description: str):
    """Register a benchmark row builder: ``@case("mix", "B=4 112x112x80")`` on a function returning a Case."""
    def wrap(fn: Callable[[], Case]) -> Callable[[], Case]:
        CASES.append((op, description, fn))
        return fn

    return wrap


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time (ms) of each callable, calling them in turn ``repeats`` times.

    Each timed call directly follows an untimed call of the same function. Big CPU tensors come from
    malloc/mmap, so a call that follows a different op may get fresh pages to fault in, or reuse the
    other op's freed ones: measured both ways, that ordering alone moved the softmax
    and loss timings by up to 1.6x. Timing each op right after itself gives every op its own steady
    state, while the turns still share a slow patch of a shared machine.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            fn()
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


# ---- fused Dice + CE + entropy ---------------------------------------------------

def _loss_from_stats(stats: ops.DiceCEStats, smooth: float = 1e-5, lam_ent: float = 0.1) -> torch.Tensor:
    dice = 1 - (2 * stats.intersect + smooth) / (stats.pred_sum + stats.target_sum + smooth)  # (B, C)
    ce = stats.ce.sum() / stats.weight_sum.sum()
    ent = stats.entropy.sum() / stats.weight_sum.sum()
    return dice.mean() + ce + lam_ent * ent


def _dice_case(B: int, C: int, spatial: tuple[int, ...]) -> Case:
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, C, *spatial, generator=g).requires_grad_()  # (B, C, *S)
    labels = torch.randint(0, C, (B, *spatial), generator=g)  # (B, *S)
    monai_loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def ours():
        _loss_from_stats(ops.dice_ce_entropy(logits, labels)).backward()
        logits.grad = None

    def monai():
        log_p = torch.log_softmax(logits, 1)  # (B, C, *S)
        ent = -(log_p.exp() * log_p).sum(1).mean()
        (monai_loss(logits, labels.unsqueeze(1)) + 0.1 * ent).backward()
        logits.grad = None

    grad_out = torch.randn(logits.shape, generator=g)

    def softmax():
        torch.softmax(logits, 1).backward(grad_out)
        logits.grad = None

    return Case(ours, {"MONAI DiceCELoss + entropy": Other(monai, 4.0),
                       "torch.softmax fwd+bwd": Other(softmax, 1 / 1.5)})


@case("dice_ce_entropy", "fwd+bwd B=24 C=4 256x256")
def _dice_2d() -> Case:
    return _dice_case(24, 4, (256, 256))


@case("dice_ce_entropy", "fwd+bwd B=4 C=2 112x112x80")
def _dice_3d() -> Case:
    return _dice_case(4, 2, (112, 112, 80))


# ---- mix ---------------------------------------------------------------------

@case("mix", "img f32 + label i64 + weight f32, B=4 112x112x80, BCP box")
def _mix_3d() -> Case:
    g = torch.Generator().manual_seed(0)
    S = (112, 112, 80)
    a = [torch.randn(4, 1, *S, generator=g), torch.randint(0, 2, (4, *S), generator=g), torch.rand(4, *S, generator=g)]
    b = [torch.randn(4, 1, *S, generator=g), torch.randint(0, 2, (4, *S), generator=g), torch.rand(4, *S, generator=g)]
    boxes = ops.bcp_box(S, 4, g)  # (B, 6)
    region = ops.region_mask(S, boxes=boxes)  # (B, *S) bool
    mask_f = region.float().unsqueeze(1)  # (B, 1, *S)   BCP precomputes its masks once per step
    mask_l = region.long()  # (B, *S)

    def bcp():
        img = b[0] * mask_f + a[0] * (1 - mask_f)
        lab = b[1] * mask_l + a[1] * (1 - mask_l)
        w = b[2] * mask_f[:, 0] + a[2] * (1 - mask_f[:, 0])
        return img, lab, w

    return Case(lambda: ops.mix(a, b, boxes=boxes),
                {"BCP arithmetic img*m + img*(1-m)": Other(bcp, 5.0),
                 "clone() of the 3 tensors": Other(lambda: [t.clone() for t in a], 1 / 1.25)})


@case("mix", "same, M3HL 4x4x4 blocks")
def _mix_blocks() -> Case:
    g = torch.Generator().manual_seed(1)
    S = (112, 112, 80)
    a = [torch.randn(4, 1, *S, generator=g), torch.randint(0, 2, (4, *S), generator=g), torch.rand(4, *S, generator=g)]
    b = [torch.randn(4, 1, *S, generator=g), torch.randint(0, 2, (4, *S), generator=g), torch.rand(4, *S, generator=g)]
    blocks = ops.block_grid(S, 4, g, (4, 4, 4))  # (B, 4, 4, 4) bool
    region = ops.region_mask(S, blocks=blocks)  # (B, *S)
    return Case(lambda: ops.mix(a, b, blocks=blocks),
                {"torch.where per tensor": Other(lambda: [torch.where(region.view(4, *(1,) * (x.ndim - 4), *S), y, x)
                                                          for x, y in zip(a, b)]),
                 "clone() of the 3 tensors": Other(lambda: [t.clone() for t in a])})  # shown, no target


# ---- geometry ops -------------------------------------------

def _blobs(spatial: tuple[int, ...], classes: int, g: torch.Generator, big: int = 1, small: int = 6,
           salt: float = 0.002) -> torch.Tensor:
    """A prediction-like label map (int64, shape ``spatial``): per class ``big`` large and ``small`` small
    ellipsoids at random places (later classes paint over earlier ones) plus ``salt`` random specks."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in spatial], indexing="ij")
    lab = torch.zeros(spatial, dtype=torch.int64)
    for c in range(1, classes):
        for k in range(big + small):
            lo, hi = (0.15, 0.3) if k < big else (0.01, 0.04)
            centre = [float(torch.rand((), generator=g)) * n for n in spatial]
            radius = [(lo + (hi - lo) * float(torch.rand((), generator=g))) * n for n in spatial]
            d = sum(((x - m) / r) ** 2 for x, m, r in zip(grids, centre, radius))
            lab[d <= 1] = c
    specks = torch.rand(spatial, generator=g) < salt
    lab[specks] = torch.randint(1, classes, spatial, generator=g)[specks]
    return lab


def _scipy_largest_component(labels: torch.Tensor, num_classes: int):
    """The loop the kernel replaces: scipy.ndimage.label per (sample, class) + bincount."""
    import numpy as np
    from scipy import ndimage

    arr = labels.numpy()
    out = arr.copy()
    structure = np.ones((3,) * (arr.ndim - 1), dtype=bool)
    for b in range(arr.shape[0]):
        for c in range(1, num_classes):
            mask = arr[b] == c
            comp, n = ndimage.label(mask, structure=structure)
            if n > 1:
                out[b][mask & (comp != np.argmax(np.bincount(comp.ravel())[1:]) + 1)] = 0
    return out


@case("largest_component", "B=24 256x256, 4 classes (int64)")
def _lcc_2d() -> Case:
    g = torch.Generator().manual_seed(0)
    labels = torch.stack([_blobs((256, 256), 4, g) for _ in range(24)])  # (24, 256, 256)
    return Case(lambda: ops.largest_component(labels, 4),
                {"scipy.ndimage.label + bincount loop": Other(lambda: _scipy_largest_component(labels, 4), 3.0)})


@case("largest_component", "B=4 112x112x80, binary (int64)")
def _lcc_3d() -> Case:
    g = torch.Generator().manual_seed(1)
    labels = torch.stack([_blobs((112, 112, 80), 2, g, small=10, salt=0.001) for _ in range(4)])  # (4, 112, 112, 80)
    return Case(lambda: ops.largest_component(labels, 2),
                {"scipy.ndimage.label + bincount loop": Other(lambda: _scipy_largest_component(labels, 2), 3.0)})


@case("fit_ellipse", "B=256 uint8 masks 256x256")
def _fit_ellipse() -> Case:
    import math

    import cv2
    import numpy as np
    from skimage.measure import EllipseModel, find_contours

    g = torch.Generator().manual_seed(2)
    B = 256
    a = 30 + 80 * torch.rand(B, generator=g, dtype=torch.float64)  # (B,) semi-major axes
    params = torch.stack([118 + 20 * torch.rand(B, generator=g, dtype=torch.float64),
                          118 + 20 * torch.rand(B, generator=g, dtype=torch.float64),
                          a, a * (0.7 + 0.3 * torch.rand(B, generator=g, dtype=torch.float64)),
                          math.pi * torch.rand(B, generator=g, dtype=torch.float64)], 1)  # (B, 5)
    masks = ops.ellipse_mask(params, torch.ones(B, dtype=torch.bool), (256, 256))  # (B, 256, 256) uint8
    masks |= (torch.rand(masks.shape, generator=g) < 0.0005).to(torch.uint8)  # a few stray specks
    arr = masks.numpy()

    def opencv():
        out = []
        for m in arr:
            contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            out.append(cv2.fitEllipseDirect(max(contours, key=len)))
        return out

    def skimage():
        out = []
        for m in arr:
            contour = max(find_contours(m, 0.5), key=len)  # (n, 2) [row, col]
            model = EllipseModel.from_estimate(np.ascontiguousarray(contour[:, ::-1]))
            out.append((model.center, model.axis_lengths, model.theta))
        return out

    return Case(lambda: ops.fit_ellipse(masks),
                {"OpenCV findContours + fitEllipseDirect loop": Other(opencv, 1.0),
                 "skimage find_contours + EllipseModel loop": Other(skimage, 20.0)})


@case("ellipse_refine", "B=24 256x256 float32")
def _ellipse_refine() -> Case:
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(24, 256, 256, generator=g)  # (B, H, W)
    params = torch.tensor([[128.0, 120.0, 80.0, 60.0, 0.4]], dtype=torch.float64).repeat(24, 1)  # (B, 5)
    valid = torch.ones(24, dtype=torch.bool)
    from minissl.ops import reference

    return Case(lambda: ops.ellipse_refine(probs, params, valid),
                {"reference (torch)": Other(lambda: reference.ellipse_refine(probs, params, valid))})


def _bn_case(shape: tuple[int, ...]) -> Case:
    g = torch.Generator().manual_seed(4)
    x = (2 * torch.randn(shape, generator=g) + 1).contiguous(memory_format=torch.channels_last)  # (B, C, H, W)
    dy = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.ones(shape[1], requires_grad=True), torch.zeros(shape[1], requires_grad=True)

    def fwd_bwd(fn, inp):
        def call():
            xi = inp.detach().requires_grad_()
            return torch.autograd.grad(fn(xi), (xi, w, b), dy)
        return call

    def native(xi):
        return torch.nn.functional.batch_norm(xi, None, None, w, b, training=True)

    return Case(fwd_bwd(lambda xi: ops.batch_norm_rows(xi, w, b)[0], x),
                {"torch batch_norm, channels-last (float32 sums)": Other(fwd_bwd(native, x)),
                 "torch batch_norm, contiguous": Other(fwd_bwd(native, x.contiguous()))})


@case("batch_norm_rows", "fwd+bwd B=8 C=8 64x64 channels-last (cardiac's first layer)")
def _bn_small() -> Case:
    return _bn_case((8, 8, 64, 64))


@case("batch_norm_rows", "fwd+bwd B=24 C=16 256x256 channels-last")
def _bn_big() -> Case:
    return _bn_case((24, 16, 256, 256))


def run(only: Optional[str] = None, repeats: int = 7) -> list[dict]:
    """Measure every registered case (or those whose op contains ``only``); returns table rows."""
    rows = []
    for op, desc, build in CASES:
        if only and only not in op:
            continue
        c = build()
        for name, other in c.others.items():
            # one round robin per pair: a competitor that allocates and frees hundreds of MB (MONAI, BCP's
            # arithmetic) leaves the allocator handing fresh, page-faulting memory to whoever runs next,
            # so sharing one loop among three would tax one candidate for another's habits
            med = time_round_robin({"ours": c.ours, name: other.fn}, repeats)
            ratio = med[name] / med["ours"]
            target = "" if other.min_ratio is None else (
                f">= {other.min_ratio:.2f}x" if other.min_ratio >= 1 else f"<= {1 / other.min_ratio:.2f}x its time")
            ok = "" if other.min_ratio is None else ("yes" if ratio >= other.min_ratio else "NO")
            rows.append(dict(op=op, case=desc, ours_ms=med["ours"], other=name, other_ms=med[name], ratio=ratio,
                             target=target, ok=ok))
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of ``run`` rows."""
    lines = ["| op | case | ours (ms) | compared with | its time (ms) | ratio (its / ours) | target | met |",
             "|---|---|---:|---|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['case']} | {r['ours_ms']:.1f} | {r['other']} | {r['other_ms']:.1f} | "
                     f"{r['ratio']:.2f}x | {r['target']} | {r['ok']} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", default=None, help="run only ops whose name contains this")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    status = ops.kernel_status()
    print(f"extension: {'compiled' if status.path else 'NOT built, timing the reference'} "
          f"({status.seconds or 0:.1f} s to build/load); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU, median of {args.repeats}")
    print(format_table(run(args.only, args.repeats)))


if __name__ == "__main__":
    main()
