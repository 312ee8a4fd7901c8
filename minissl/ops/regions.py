"""Mixing regions for copy-paste / CutMix / block masks (BCP, UniMatch, M3HL), 2D and 3D.

A region is given either as ``boxes`` (B, 2*sd) int64 = (lo_0..lo_{sd-1}, hi_0..hi_{sd-1}), half-open,
or as ``blocks`` (B, *G) bool on a regular grid of the spatial size S. Random parameters are drawn in
Python from a ``torch.Generator`` (deterministic given its state, so runs resume exactly) and passed
to ``minissl.ops.mix``.
"""
import math
import os
from typing import Optional, Sequence

import torch


def check_region(spatial: Sequence[int], boxes: Optional[torch.Tensor], blocks: Optional[torch.Tensor],
                 name: str = "region_mask") -> None:
    """Raise ValueError unless exactly one of boxes / blocks describes a valid region of ``spatial``."""
    sd = len(spatial)
    if (boxes is None) == (blocks is None):
        raise ValueError(f"{name}: expected exactly one of boxes / blocks, got "
                         f"{'both' if boxes is not None else 'neither'}")
    if boxes is not None:
        if not isinstance(boxes, torch.Tensor) or boxes.dtype != torch.int64 or boxes.shape[-1:] != (2 * sd,) \
                or boxes.ndim != 2:
            got = f"{boxes.dtype} {tuple(boxes.shape)}" if isinstance(boxes, torch.Tensor) else type(boxes).__name__
            raise ValueError(f"{name}: expected boxes of dtype torch.int64 and shape (B, {2 * sd}), got {got}")
        lo, hi = boxes[:, :sd], boxes[:, sd:]  # (B, sd) each
        size = torch.tensor(list(spatial), device=boxes.device)
        # on a GPU the read is a synchronisation: only with MINISSL_DEBUG_CHECKS=1 (minissl.ops.reads_values)
        debug = os.environ.get("MINISSL_DEBUG_CHECKS", "").strip().lower() in ("1", "true", "yes", "on")
        if (boxes.device.type == "cpu" or debug) and bool(((lo < 0) | (lo > hi) | (hi > size)).any()):
            raise ValueError(f"{name}: expected boxes with 0 <= lo <= hi <= {tuple(spatial)}, got {boxes.tolist()}")
    else:
        if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.bool or blocks.ndim != sd + 1:
            got = f"{blocks.dtype} {tuple(blocks.shape)}" if isinstance(blocks, torch.Tensor) else type(blocks).__name__
            raise ValueError(f"{name}: expected blocks of dtype torch.bool and shape (B, *G) with {sd} grid dims, "
                             f"got {got}")
        grid = tuple(blocks.shape[1:])
        if any(s % g for s, g in zip(spatial, grid)):
            raise ValueError(f"{name}: expected spatial size {tuple(spatial)} divisible by the grid {grid}")


def region_mask(spatial: Sequence[int], *, boxes: Optional[torch.Tensor] = None,
                blocks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean mask of the region, on the device of boxes/blocks.

    Args:
        spatial: S, the spatial size (2 or 3 ints).
        boxes: (B, 2*sd) int64 half-open boxes, or
        blocks: (B, *G) bool grid cells; cell g covers [g*S_d/G_d, (g+1)*S_d/G_d) along each dim d.

    Returns:
        (B, *S) bool.
    """
    check_region(spatial, boxes, blocks)
    sd = len(spatial)
    if blocks is not None:
        mask = blocks
        for d, (s, g) in enumerate(zip(spatial, blocks.shape[1:])):
            mask = mask.repeat_interleave(s // g, dim=d + 1)  # expand grid dim d to S_d
        return mask
    mask = torch.ones(boxes.shape[0], *(1,) * sd, dtype=torch.bool, device=boxes.device)
    for d, s in enumerate(spatial):
        i = torch.arange(s, device=boxes.device)  # (S_d,)
        inside = (boxes[:, d, None] <= i) & (i < boxes[:, sd + d, None])  # (B, S_d)
        mask = mask & inside.view(-1, *(s if e == d else 1 for e in range(sd)))  # broadcast along dim d
    return mask


def _check_spatial(spatial: Sequence[int], name: str) -> tuple[int, ...]:
    spatial = tuple(int(s) for s in spatial)
    if len(spatial) not in (2, 3) or min(spatial) < 1:
        raise ValueError(f"{name}: expected 2 or 3 positive spatial sizes, got {spatial}")
    return spatial


def _uniform(batch: int, lo: torch.Tensor, hi: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """U(lo, hi) elementwise, float64, drawn from ``generator``."""
    u = torch.rand(batch, dtype=torch.float64, generator=generator, device=lo.device)
    return lo + (hi - lo) * u


def _place(sizes: torch.Tensor, spatial: tuple[int, ...], generator: Optional[torch.Generator]) -> torch.Tensor:
    """Uniform random offsets for boxes of ``sizes`` (B, sd) inside ``spatial``; returns (B, 2*sd) int64."""
    room = torch.tensor(spatial, dtype=torch.int64) - sizes + 1  # (B, sd) number of valid offsets per dim
    lo = (torch.rand(sizes.shape, dtype=torch.float64, generator=generator) * room).long().clamp_max(room - 1)
    return torch.cat([lo, lo + sizes], 1)


def bcp_box(spatial: Sequence[int], batch: int, generator: Optional[torch.Generator], ratio: float = 2 / 3,
            shared: bool = True) -> torch.Tensor:
    """BCP copy-paste box: size int(ratio * S_d) along every dim, offset uniform over all positions that fit.

    Args:
        spatial: S (2 or 3 ints). batch: B. generator: CPU torch.Generator.
        ratio: box size as a fraction of each dim. shared: one box for the whole batch (as in BCP).

    Returns:
        (B, 2*sd) int64 boxes.
    """
    spatial = _check_spatial(spatial, "bcp_box")
    if not 0 <= ratio <= 1:
        raise ValueError(f"bcp_box: expected ratio in [0, 1], got {ratio}")
    sizes = torch.tensor([int(s * ratio) for s in spatial], dtype=torch.int64)  # (sd,)
    boxes = _place(sizes.expand(1 if shared else batch, -1), spatial, generator)  # (1 or B, 2*sd)
    return boxes.expand(batch, -1).clone()


def cutmix_box(spatial: Sequence[int], batch: int, generator: Optional[torch.Generator], p: float = 0.5,
               area: tuple[float, float] = (0.02, 0.4),
               aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """UniMatch CutMix box per sample; an empty box (lo == hi == 0) with probability 1 - p.

    The area fraction f ~ U(area). 2D: aspect r ~ U(aspect) restricted to the range where the box fits
    (r in [f H / W, H / (f W)]), h = int(sqrt(f H W r)), w = int(sqrt(f H W / r)). 3D: a box similar to
    the volume, size_d = int(S_d f^(1/3)). Offsets are uniform over the positions where the box fits.

    Returns:
        (B, 2*sd) int64 boxes.
    """
    spatial = _check_spatial(spatial, "cutmix_box")
    if not 0 < area[0] <= area[1] <= 1 or not 0 < aspect[0] <= aspect[1]:
        raise ValueError(f"cutmix_box: expected 0 < area[0] <= area[1] <= 1 and 0 < aspect[0] <= aspect[1], "
                         f"got area={area}, aspect={aspect}")
    apply = torch.rand(batch, generator=generator) < p  # (B,)
    f = _uniform(batch, torch.tensor(area[0], dtype=torch.float64), torch.tensor(area[1], dtype=torch.float64),
                 generator)  # (B,)
    if len(spatial) == 2:
        H, W = spatial
        r = _uniform(batch, (f * H / W).clamp_min(aspect[0]), (H / (f * W)).clamp_max(aspect[1]), generator)  # (B,)
        sizes = torch.stack([torch.sqrt(f * H * W * r), torch.sqrt(f * H * W / r)], 1)  # (B, 2) = (h, w)
    else:
        sizes = f[:, None] ** (1 / 3) * torch.tensor(spatial, dtype=torch.float64)  # (B, 3)
    sizes = (sizes + 1e-9).long().clamp(1, None).minimum(torch.tensor(spatial))  # (B, sd) int64
    boxes = _place(sizes, spatial, generator)  # (B, 2*sd)
    return torch.where(apply[:, None], boxes, torch.zeros_like(boxes))


def block_grid(spatial: Sequence[int], batch: int, generator: Optional[torch.Generator], grid: Sequence[int],
               ratio: float = 0.5) -> torch.Tensor:
    """M3HL block mask: exactly int(ratio * prod(grid)) cells chosen uniformly per sample.

    Returns:
        (B, *grid) bool.
    """
    spatial, grid = _check_spatial(spatial, "block_grid"), tuple(int(g) for g in grid)
    if len(grid) != len(spatial) or min(grid) < 1 or any(s % g for s, g in zip(spatial, grid)):
        raise ValueError(f"block_grid: expected a grid of {len(spatial)} positive sizes dividing {spatial}, "
                         f"got {grid}")
    if not 0 <= ratio <= 1:
        raise ValueError(f"block_grid: expected ratio in [0, 1], got {ratio}")
    n = math.prod(grid)
    order = torch.rand(batch, n, generator=generator).argsort(1)  # (B, n) random permutation per sample
    chosen = order < int(ratio * n)  # (B, n) exactly int(ratio * n) True per row
    return chosen.view(batch, *grid)
