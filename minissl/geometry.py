"""Plain 2D geometry on batches of maps: distance to a mask, derivative filters, reflection across a line.

Everything is vectorised over the batch, runs on any device and works in the maps' dtype. The lines
are given as ellipses ``(cx, cy, a, b, theta)`` in pixel coordinates (x = column, y = row), as
``minissl.ops.fit_ellipse`` returns them: the line is the major axis, through the centre ``(cx, cy)``
at angle ``theta`` from the x axis; ``a`` and ``b`` are not used.

Example:
    >>> import torch
    >>> mask = torch.zeros(1, 5, 5, dtype=torch.bool); mask[0, 2, 2] = True
    >>> distance_to_mask(mask)[0, 0, 0]  # sqrt(2^2 + 2^2)
    tensor(2.8284)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SOBEL_X = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 8  # d/dx; its transpose is d/dy
LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])  # 4-neighbour Laplacian


def distance_to_mask(mask: Tensor) -> Tensor:
    """Euclidean distance from each pixel to the nearest True pixel, exact, vectorised over the batch.

    Column pass: vertical distance g to the nearest mask pixel of the column (cummax / cummin of row
    indices); row pass: D(y, x)^2 = min_x' (x - x')^2 + g(y, x')^2. O(B H W^2) memory.

    Args:
        mask: (B, H, W) bool.

    Returns:
        (B, H, W) float32: 0 on the mask, ``scipy.ndimage.distance_transform_edt(~mask)`` elsewhere; inf
        everywhere for an empty mask.
    """
    if mask.ndim != 3 or mask.dtype != torch.bool:
        raise ValueError(f"distance_to_mask: expected a (B, H, W) bool mask, got {mask.dtype} {tuple(mask.shape)}")
    B, H, W = mask.shape
    rows = torch.arange(H, dtype=torch.float32, device=mask.device)[None, :, None].expand(B, H, W)  # (B, H, W)
    inf = torch.full_like(rows, math.inf)
    above = torch.where(mask, rows, -inf).cummax(1).values  # (B, H, W) last mask row at or above
    below = torch.where(mask, rows, inf).flip(1).cummin(1).values.flip(1)  # (B, H, W) first mask row at or below
    g2 = torch.minimum(rows - above, below - rows).pow(2)  # (B, H, W)
    cols = torch.arange(W, dtype=torch.float32, device=mask.device)
    dx2 = (cols[:, None] - cols[None, :]).pow(2)  # (W, W)
    return (g2[:, :, None, :] + dx2).amin(-1).sqrt()  # (B, H, W)


def mean_gradient_magnitude(maps: Tensor, eps: float = 1e-6) -> Tensor:
    """Mean Sobel gradient magnitude ``sqrt(gx^2 + gy^2 + eps)`` of each map (kernels / 8, zero padding).

    Args:
        maps: (B, H, W) float.

    Returns:
        (B,): equals ``mean(hypot(ndimage.sobel(m, 0), ndimage.sobel(m, 1)) / 8)`` with ``mode='constant'``
        (up to ``eps``).
    """
    k = torch.stack([SOBEL_X, SOBEL_X.T])[:, None].to(maps)  # (2, 1, 3, 3)
    g = F.conv2d(maps[:, None], k, padding=1)  # (B, 2, H, W)
    return torch.sqrt(g.pow(2).sum(1) + eps).mean((1, 2))


def mean_abs_laplacian(maps: Tensor) -> Tensor:
    """Mean absolute 4-neighbour Laplacian of each map, border pixels replicated (``ndimage.laplace``, 'nearest').

    Args:
        maps: (B, H, W) float.

    Returns:
        (B,) mean of ``|Laplacian|`` over the pixels.
    """
    padded = F.pad(maps[:, None], (1, 1, 1, 1), mode="replicate")  # (B, 1, H + 2, W + 2)
    return F.conv2d(padded, LAPLACE.to(maps)[None, None]).abs().mean((1, 2, 3))


def axis_frame(ellipses: Tensor, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in each ellipse's frame: x' along the major axis, y' along the minor one.

    Args:
        ellipses: (B, 5) ``(cx, cy, a, b, theta)``. shape: (H, W) of the image.

    Returns:
        (x', y'), (B, H, W) float64 each.
    """
    cx, cy, _, _, t = (v[:, None, None] for v in ellipses.to(torch.float64).unbind(1))  # (B, 1, 1) each
    y = torch.arange(shape[0], dtype=torch.float64, device=ellipses.device)[:, None]  # (H, 1)
    x = torch.arange(shape[1], dtype=torch.float64, device=ellipses.device)[None, :]  # (1, W)
    return (x - cx) * torch.cos(t) + (y - cy) * torch.sin(t), -(x - cx) * torch.sin(t) + (y - cy) * torch.cos(t)


def axis_half_planes(ellipses: Tensor, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The two sides of each major axis: left ``y' < 0`` and right ``y' >= 0``, (B, 1, H, W) bool each."""
    left = axis_frame(ellipses, shape)[1][:, None] < 0  # (B, 1, H, W)
    return left, ~left


def reflect_across_axis(x: Tensor, ellipses: Tensor) -> Tensor:
    """Mirror images across each ellipse's major axis (nearest sampling, zeros outside the image).

    Args:
        x: (B, C, H, W) images. ellipses: (B, 5) ``(cx, cy, a, b, theta)``, one line per image.

    Returns:
        (B, C, H, W): pixel (x', y') of the axis frame takes the value at (x', -y').
    """
    H, W = x.shape[-2:]
    xr, yr = axis_frame(ellipses, (H, W))  # (B, H, W) each
    cx, cy, _, _, t = (v[:, None, None] for v in ellipses.to(torch.float64).unbind(1))  # (B, 1, 1) each
    sx = cx + xr * torch.cos(t) + yr * torch.sin(t)  # (B, H, W) source column
    sy = cy + xr * torch.sin(t) - yr * torch.cos(t)  # (B, H, W) source row
    grid = torch.stack([2 * sx / max(W - 1, 1) - 1, 2 * sy / max(H - 1, 1) - 1], -1).to(x)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=True)
