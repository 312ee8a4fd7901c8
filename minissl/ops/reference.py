"""Pure-PyTorch reference twins of the ops: the readable spec every compiled kernel is tested against.

Inputs are assumed valid here (the public functions in ``minissl.ops`` check them and resolve defaults,
then call a compiled kernel or the twin here of the same name and arguments).

Notation: B batch, C classes, S spatial dims (2 or 3), i a voxel, p_ic the predicted probability
(softmax over C, or sigmoid when C == 1), t_ic the target (one-hot of a label map, or soft), w_i a
voxel weight.
"""
import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .regions import region_mask


class DiceCEStats(NamedTuple):
    """Unreduced sums returned by ``dice_ce_entropy`` (same dtype as the logits)."""

    intersect: torch.Tensor  # (B, C)  sum_i w_i p_ic t_ic
    pred_sum: torch.Tensor  # (B, C)  sum_i w_i p_ic     (squared: p_ic^2)
    target_sum: torch.Tensor  # (B, C)  sum_i w_i t_ic     (squared: t_ic^2)
    ce: torch.Tensor  # (B,)    sum_i w_i (-sum_c t_ic log p_ic)
    entropy: torch.Tensor  # (B,)    sum_i w_i (-sum_c p_ic log p_ic)
    weight_sum: torch.Tensor  # (B,)    sum_i w_i


def dice_ce_entropy(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
                    squared: bool = False) -> DiceCEStats:
    """Soft-Dice sums, cross-entropy and entropy of softmax/sigmoid probabilities in one pass.

    Softmax (C >= 2):  log p_ic = z_ic - logsumexp_c z_ic,   p_ic = exp(log p_ic)
        ce_i  = -sum_c t_ic log p_ic,          h_i = -sum_c p_ic log p_ic
    Sigmoid (C == 1):  s_i = sigmoid(z_i), log s_i = logsigmoid(z_i), log(1 - s_i) = logsigmoid(-z_i)
        ce_i  = -(t_i log s_i + (1 - t_i) log(1 - s_i)),   h_i = -(s_i log s_i + (1 - s_i) log(1 - s_i))
        and the Dice sums use the foreground channel only: p_i1 = s_i, t_i1 = t_i.
    Then, with w_i = 1 when ``weight`` is None:
        intersect_bc  = sum_i w_i p_ic t_ic
        pred_sum_bc   = sum_i w_i p_ic          (squared: sum_i w_i p_ic^2)
        target_sum_bc = sum_i w_i t_ic          (squared: sum_i w_i t_ic^2)
        ce_b = sum_i w_i ce_i,  entropy_b = sum_i w_i h_i,  weight_sum_b = sum_i w_i

    Args:
        logits: (B, C, *S) float32/float64.
        target: (B, *S) int64 labels in [0, C) ({0, 1} when C == 1), or (B, C, *S) float soft targets.
        weight: optional (B, *S) float voxel weights.
        squared: square p and t in ``pred_sum`` / ``target_sum``.

    Returns:
        DiceCEStats in the dtype of ``logits``. Differentiable w.r.t. ``logits`` only: ``target`` and
        ``weight`` are treated as constants (detached), as in the compiled kernels.
    """
    dtype, C = logits.dtype, logits.shape[1]
    sum_dims = tuple(range(2, logits.ndim))  # spatial dims of (B, C, *S)
    hard = not target.is_floating_point()
    if C == 1:
        z = logits[:, 0]  # (B, *S)
        log_s, log_1ms = F.logsigmoid(z), F.logsigmoid(-z)  # (B, *S) each
        s = torch.sigmoid(z)
        t = target.to(dtype) if hard else target[:, 0].detach().to(dtype)  # (B, *S)
        ce = -(t * log_s + (1 - t) * log_1ms)  # (B, *S)
        ent = -(s * log_s + (1 - s) * log_1ms)  # (B, *S)
        p, t = s.unsqueeze(1), t.unsqueeze(1)  # (B, 1, *S)
    else:
        log_p = F.log_softmax(logits, dim=1)  # (B, C, *S)
        p = log_p.exp()
        t = F.one_hot(target, C).movedim(-1, 1).to(dtype) if hard else target.detach().to(dtype)  # (B, C, *S)
        ce = -(t * log_p).sum(1)  # (B, *S)
        ent = -(p * log_p).sum(1)  # (B, *S)
    w = torch.ones_like(ce) if weight is None else weight.detach().to(dtype)  # (B, *S)
    wc = w.unsqueeze(1)  # (B, 1, *S)
    pp, tt = (p * p, t * t) if squared else (p, t)
    return DiceCEStats(
        intersect=(wc * p * t).sum(sum_dims),  # (B, C)
        pred_sum=(wc * pp).sum(sum_dims),  # (B, C)
        target_sum=(wc * tt).sum(sum_dims),  # (B, C)
        ce=(w * ce).flatten(1).sum(1),  # (B,)
        entropy=(w * ent).flatten(1).sum(1),  # (B,)
        weight_sum=w.flatten(1).sum(1),  # (B,)
    )


def largest_component(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Keep the largest connected component of each class, per sample (scipy.ndimage.label).

    Classes 1..num_classes-1 that occur in a sample are cleaned (labels are in [0, num_classes), the
    public wrapper checks that and resolves the default). Connectivity is full: 8 in 2D ((B, H, W)),
    26 in 3D ((B, D, H, W)). scipy numbers components in C-order raster scan order, so argmax over
    sizes picks, among equal sizes, the one reached first.
    """
    arr = labels.detach().cpu().numpy()
    out = arr.copy()
    structure = np.ones((3,) * (arr.ndim - 1), dtype=bool)
    for b in range(arr.shape[0]):
        for c in np.unique(arr[b]):  # only the classes present: a sparse label range costs nothing
            if not 1 <= c < num_classes:
                continue
            mask = arr[b] == c  # (*S) bool
            comp, n = ndimage.label(mask, structure=structure)
            if n > 1:
                sizes = np.bincount(comp.ravel())[1:]  # (n,) sizes of components 1..n
                out[b][mask & (comp != np.argmax(sizes) + 1)] = 0
    return torch.from_numpy(out).to(labels.device)


def boundary_points(mask: torch.Tensor) -> torch.Tensor:
    """Midpoints (x, y) of the edges between foreground pixels and their background 4-neighbours.

    Args:
        mask: (H, W) bool; pixel (row y, col x) has its centre at (x, y).

    Returns:
        (N, 2) float64 points [x, y]; pixels at the image border contribute their outer edges too.
    """
    padded = F.pad(mask.to(torch.uint8), (1, 1, 1, 1)).bool()  # (H+2, W+2), outside = background
    H, W = mask.shape
    points = []
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        neighbour = padded[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]  # (H, W)
        y, x = torch.nonzero(mask & ~neighbour, as_tuple=True)
        points.append(torch.stack([x + 0.5 * dx, y + 0.5 * dy], 1).to(torch.float64))  # (n, 2)
    return torch.cat(points)


def fit_ellipse_points(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct least-squares ellipse fit (Fitzgibbon 1999, numerically stable form of Halir & Flusser 1998).

    Conic A x^2 + B xy + C y^2 + D x + E y + F = 0 with a1 = (A, B, C), a2 = (D, E, F), rows
    D1 = [x^2, xy, y^2], D2 = [x, y, 1] on points centred and scaled to unit rms radius.
        S1 = D1^T D1, S2 = D1^T D2, S3 = D2^T D2            (3, 3) each
        T  = -S3^-1 S2^T           (a2 = T a1 minimises the residual for a given a1)
        M  = C1^-1 (S1 + S2 T),    C1 = [[0, 0, 2], [0, -1, 0], [2, 0, 0]]
        a1 = the eigenvector of M with 4AC - B^2 > 0 (the ellipse constraint a^T C a = 1)
    Then conic -> centre, semi-axes a >= b and major-axis angle theta in [0, pi).

    Args:
        points: (N, 2) [x, y].

    Returns:
        params (5,) float64 [cx, cy, a, b, theta] and valid () bool; params are all 0 when not valid
        (N < 6, degenerate points, no ellipse solution, or non-finite values).
    """
    pts = points.detach().to(torch.float64)
    params, invalid = pts.new_zeros(5), torch.tensor(False, device=pts.device)
    if pts.shape[0] < 6 or not torch.isfinite(pts).all():
        return params, invalid
    origin = pts.mean(0)  # (2,)
    scale = (pts - origin).pow(2).sum(1).mean().sqrt()  # rms distance to the centroid
    if scale <= 1e-12:
        return params, invalid
    x, y = ((pts - origin) / scale).unbind(1)  # (N,) each
    D1 = torch.stack([x * x, x * y, y * y], 1)  # (N, 3)
    D2 = torch.stack([x, y, torch.ones_like(x)], 1)  # (N, 3)
    S1, S2, S3 = D1.T @ D1, D1.T @ D2, D2.T @ D2  # (3, 3) each
    try:
        T = -torch.linalg.solve(S3, S2.T)  # (3, 3)
    except RuntimeError:  # singular S3: collinear points
        return params, invalid
    R = S1 + S2 @ T  # (3, 3) reduced scatter
    M = torch.stack([R[2] / 2, -R[1], R[0] / 2])  # C1^-1 R
    vecs = torch.linalg.eig(M)[1].real  # (3, 3), eigenvectors in columns
    cond = 4 * vecs[0] * vecs[2] - vecs[1] ** 2  # (3,) 4AC - B^2 per eigenvector
    k = int(torch.argmax(cond))
    if not cond[k] > 0:
        return params, invalid
    a1 = vecs[:, k]
    A, B, C, D, E, F_ = torch.cat([a1, T @ a1]).tolist()
    det = 4 * A * C - B * B
    x0, y0 = (B * E - 2 * C * D) / det, (B * D - 2 * A * E) / det  # gradient of the conic = 0
    f0 = F_ + (D * x0 + E * y0) / 2  # conic value at the centre
    Q = torch.tensor([[A, B / 2], [B / 2, C]], dtype=torch.float64)  # quadratic form: u^T Q u = -f0
    if A + C < 0:
        Q, f0 = -Q, -f0
    lam, vec = torch.linalg.eigh(Q)  # ascending: lam[0] belongs to the major axis
    if not (lam[0] > 0 and f0 < 0):
        return params, invalid
    a, b = math.sqrt(-f0 / lam[0]), math.sqrt(-f0 / lam[1])
    theta = math.atan2(vec[1, 0], vec[0, 0]) % math.pi
    ox, oy, s = origin[0].item(), origin[1].item(), scale.item()
    out = torch.tensor([ox + s * x0, oy + s * y0, s * a, s * b, 0.0 if theta >= math.pi else theta],
                       dtype=torch.float64, device=pts.device)
    if not torch.isfinite(out).all():
        return params, invalid
    return out, torch.tensor(True, device=pts.device)


def fit_ellipse(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit an ellipse to the outer boundary of the largest 8-connected foreground component of each mask.

    Outer boundary: the boundary of the component with its holes filled, where a hole is background
    (anything not in the component) that is not 4-connected to the image border (4 is the dual of the
    component's 8-connectivity; ``ndimage.binary_fill_holes``' default). The edges of holes are left
    out, as in ``cv2.findContours(..., RETR_EXTERNAL)``: a segmentation with a low-confidence patch
    inside the head still gives the head's ellipse.
    Also not valid when the fitted minor semi-axis b < 1 pixel: a mask thinner than 2 px is a line.

    Args:
        masks: (B, H, W) uint8/bool.

    Returns:
        params (B, 5) float64 [cx, cy, a, b, theta] and valid (B,) bool.
    """
    fg = largest_component(masks.detach().cpu() != 0, 2)  # (B, H, W) bool
    params = torch.zeros(masks.shape[0], 5, dtype=torch.float64)
    valid = torch.zeros(masks.shape[0], dtype=torch.bool)
    for i in range(masks.shape[0]):
        filled = torch.from_numpy(ndimage.binary_fill_holes(fg[i].numpy()))  # (H, W) bool
        p, ok = fit_ellipse_points(boundary_points(filled))
        if ok and p[3] >= 1.0:
            params[i], valid[i] = p, True
    return params.to(masks.device), valid.to(masks.device)


def ellipse_distance(params: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Normalised elliptical distance d = (x'/a)^2 + (y'/b)^2 at pixel centres, (B, 5) -> (B, H, W) float64.

    x' = (x - cx) cos t + (y - cy) sin t,  y' = -(x - cx) sin t + (y - cy) cos t. Semi-axes are clamped
    to >= 1e-12 so invalid (all-zero) params give a large finite d.
    """
    H, W = shape
    cx, cy, a, b, t = (v[:, None, None] for v in params.to(torch.float64).unbind(1))  # (B, 1, 1) each
    y = torch.arange(H, dtype=torch.float64, device=params.device)[:, None]  # (H, 1)
    x = torch.arange(W, dtype=torch.float64, device=params.device)[None, :]  # (1, W)
    xr = (x - cx) * torch.cos(t) + (y - cy) * torch.sin(t)  # (B, H, W)
    yr = -(x - cx) * torch.sin(t) + (y - cy) * torch.cos(t)  # (B, H, W)
    return (xr / a.clamp_min(1e-12)) ** 2 + (yr / b.clamp_min(1e-12)) ** 2


def ellipse_mask(params: torch.Tensor, valid: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Rasterise ellipses: 1 where d <= 1 at pixel centres, all 0 for invalid samples. Returns (B, H, W) uint8."""
    inside = ellipse_distance(params, shape) <= 1  # (B, H, W)
    return (inside & valid.view(-1, 1, 1)).to(torch.uint8)


def ellipse_refine(probs: torch.Tensor, params: torch.Tensor, valid: torch.Tensor, *, threshold: float = 0.6,
                   fill_base: float = 0.6, fill_power: float = 2.0,
                   decay: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """ERSR refinement of a foreground probability map P by its fitted ellipse.

    inside (d <= 1):  P' = max(P, clip(fill_base + (1 - d)^fill_power, 0, 1))
    outside (d > 1):  P' = P exp(-decay (d - 1))
    pseudo = P' > threshold. Invalid samples keep P' = P.

    Returns:
        refined (B, H, W) in the dtype of ``probs`` and pseudo (B, H, W) uint8.
    """
    d = ellipse_distance(params, probs.shape[-2:]).to(probs.dtype)  # (B, H, W)
    fill = (fill_base + (1 - d).clamp_min(0) ** fill_power).clamp(0, 1)  # (B, H, W)
    refined = torch.where(d <= 1, torch.maximum(probs, fill), probs * torch.exp(-decay * (d - 1)))
    refined = torch.where(valid.view(-1, 1, 1), refined, probs)  # (B, H, W)
    return refined, (refined > threshold).to(torch.uint8)


def head_circumference(params: torch.Tensor, pixel_size) -> torch.Tensor:
    """Ellipse perimeter in mm by Ramanujan's second approximation, (B, 5) -> (B,) float64.

    HC = pi (a + b) (1 + 3h / (10 + sqrt(4 - 3h))),  h = (a - b)^2 / (a + b)^2,  a, b in mm.
    """
    px = torch.as_tensor(pixel_size, dtype=torch.float64, device=params.device)  # () or (B,)
    a, b = params[:, 2].to(torch.float64) * px, params[:, 3].to(torch.float64) * px  # (B,) each
    s = a + b
    h = torch.where(s > 0, (a - b) ** 2 / s.clamp_min(1e-300) ** 2, torch.zeros_like(s))
    return math.pi * s * (1 + 3 * h / (10 + torch.sqrt(4 - 3 * h)))


def mix(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], *, boxes: Optional[torch.Tensor] = None,
        blocks: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    """Paste b into a: out[k] = b[k] inside the region R (boxes or blocks), a[k] outside.

    Equivalently out = a (1 - M) + b M with M = 1[R], for any dtype (computed with torch.where).
    """
    sd = boxes.shape[1] // 2 if boxes is not None else blocks.ndim - 1
    spatial = tuple(a[0].shape[-sd:])
    region = region_mask(spatial, boxes=boxes, blocks=blocks)  # (B, *S) bool
    out = []
    for x, y in zip(a, b):
        m = region.to(x.device).view(x.shape[0], *(1,) * (x.ndim - 1 - sd), *spatial)  # (B, [1,] *S)
        out.append(torch.where(m, y, x))
    return out


def batch_norm_rows(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode batch norm over every dim but the channel dim 1 of x (B, C, *S) or (M, C):

        mean_c = sum_m x_mc / M,   var_c = sum_m (x_mc - mean_c)^2 / M   (biased),
        invstd_c = 1 / sqrt(var_c + eps),   y_mc = (x_mc - mean_c) * invstd_c * w_c + b_c

    with m running over the M = numel / C values of channel c. The sums are taken in float64 (what the
    kernel does; PyTorch's channels-last CPU batch norm sums in float32). Differentiable through autograd:
    the gradient w.r.t. x, w and b is the batch-norm gradient with the statistics depending on x
    (``batch_norm_rows_backward`` spells it out).

    Returns:
        y (x's shape), mean (C,), the unbiased variance var_c M / (M - 1) (C,) (what the running statistics
        average; var_c itself when M == 1), invstd (C,), all in x's dtype.
    """
    C = x.shape[1]
    xd = x.double().movedim(1, -1).reshape(-1, C)  # (M, C)
    var, mean = torch.var_mean(xd, 0, correction=0)  # (C,), (C,)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight.double()
    y = (xd - mean) * scale + (0.0 if bias is None else bias.double())  # (M, C)
    y = y.reshape(x.movedim(1, -1).shape).movedim(-1, 1).to(x.dtype)  # back to (B, C, *S)
    M = xd.shape[0]
    unbiased = var * (M / (M - 1)) if M > 1 else var
    return y, mean.to(x.dtype).detach(), unbiased.to(x.dtype).detach(), invstd.to(x.dtype).detach()


def batch_norm_rows_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                             mean: torch.Tensor, invstd: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradient of ``batch_norm_rows`` given dL/dy (x's shape), with xhat = (x - mean) * invstd:

        dL/db_c = sum_m dy_mc,   dL/dw_c = sum_m dy_mc xhat_mc,
        dL/dx_mc = w_c invstd_c (dy_mc - dL/db_c / M - xhat_mc dL/dw_c / M)

    Returns:
        grad_x (x's shape), grad_weight (C,), grad_bias (C,) in x's dtype (sums in float64).
    """
    C = x.shape[1]
    g = grad_y.double().movedim(1, -1).reshape(-1, C)  # (M, C)
    xhat = (x.double().movedim(1, -1).reshape(-1, C) - mean.double()) * invstd.double()  # (M, C)
    M = g.shape[0]
    grad_bias, grad_weight = g.sum(0), (g * xhat).sum(0)  # (C,), (C,)
    w = 1.0 if weight is None else weight.double()
    grad_x = w * invstd.double() * (g - grad_bias / M - xhat * grad_weight / M)  # (M, C)
    grad_x = grad_x.reshape(x.movedim(1, -1).shape).movedim(-1, 1)
    return grad_x.to(x.dtype), grad_weight.to(x.dtype), grad_bias.to(x.dtype)
