"""Registrations around the compiled ops: fake (meta) kernels and autograd of ``torch.ops.minissl.*``.

Imported by ``_build.load()`` only after the shared object is loaded (the schemas must exist before
``torch.library`` can refer to them). Dispatch to the kernels is in ``minissl/ops/__init__.py``.
"""
from __future__ import annotations

import torch

from . import reference


# ---- fake (meta) kernels: shapes only, for torch.compile and opcheck ---------------------------------
# Every real kernel (CPU and CUDA) returns contiguous outputs whatever the input strides, so the fakes
# do too (``contiguous`` below), never ``torch.empty_like``'s stride-preserving default; the one
# exception is batch_norm_rows, whose outputs keep the channels-last strides of its input.

def contiguous(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new contiguous tensor of x's shape and device (and x's dtype unless given)."""
    return x.new_empty(x.shape, dtype=dtype or x.dtype)


@torch.library.register_fake("minissl::dice_ce_entropy")
def _(logits, target, weight, squared):
    B, C = logits.shape[0], logits.shape[1]
    bc = [logits.new_empty((B, C)) for _ in range(3)]  # intersect, pred_sum, target_sum
    b = [logits.new_empty((B,)) for _ in range(3)]  # ce, entropy, weight_sum
    return (*bc, *b)


@torch.library.register_fake("minissl::dice_ce_entropy_backward")
def _(grad_intersect, grad_pred_sum, grad_ce, grad_entropy, logits, target, weight, squared):
    return contiguous(logits)


@torch.library.register_fake("minissl::mix")
def _(a, b, boxes, blocks):
    return [contiguous(x) for x in a]


@torch.library.register_fake("minissl::largest_component")
def _(labels, num_classes):
    return contiguous(labels)


@torch.library.register_fake("minissl::fit_ellipse")
def _(masks):
    B = masks.shape[0]
    return masks.new_empty((B, 5), dtype=torch.float64), masks.new_empty((B,), dtype=torch.bool)


@torch.library.register_fake("minissl::fit_ellipse_points")
def _(points):
    return points.new_empty((5,), dtype=torch.float64), points.new_empty((), dtype=torch.bool)


@torch.library.register_fake("minissl::ellipse_refine")
def _(probs, params, valid, threshold, fill_base, fill_power, decay):
    return contiguous(probs), contiguous(probs, torch.uint8)


@torch.library.register_fake("minissl::ellipse_mask")
def _(params, valid, height, width):
    return params.new_empty((params.shape[0], height, width), dtype=torch.uint8)


@torch.library.register_fake("minissl::batch_norm_rows")
def _(x, weight, bias, eps):
    C = x.shape[1]  # y keeps x's (channels-last) strides
    return torch.empty_like(x), x.new_empty((C,)), x.new_empty((C,)), x.new_empty((C,))


@torch.library.register_fake("minissl::batch_norm_rows_backward")
def _(grad_y, x, weight, mean, invstd):
    C = x.shape[1]
    return torch.empty_like(x), x.new_empty((C,)), x.new_empty((C,))


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


def _dce_backward_setup_context(ctx, inputs, output):
    g_intersect, g_pred_sum, g_ce, g_entropy, logits, target, weight, squared = inputs
    ctx.save_for_backward(g_intersect, g_pred_sum, g_ce, g_entropy, logits, target, weight)
    ctx.squared = squared


def _dce_double_backward(ctx, grad_out):
    """Second derivatives through the reference twin (the kernel has no second-order pass).

    The first-order gradient g(logits, g_intersect, g_pred_sum, g_ce, g_entropy) is rebuilt as a
    differentiable function with ``reference.dice_ce_entropy``; its vector-Jacobian product with
    ``grad_out`` (B, C, *S) gives the gradients of all five inputs. Second order only: the results
    carry no graph of their own.
    """
    *g_stats, logits, target, weight = ctx.saved_tensors
    with torch.enable_grad():
        x = logits.detach().requires_grad_()
        gs = [g.detach().requires_grad_() for g in g_stats]  # (B, C), (B, C), (B,), (B,)
        s = reference.dice_ce_entropy(x, target, weight, squared=ctx.squared)
        first = sum((stat * g).sum() for stat, g in zip((s.intersect, s.pred_sum, s.ce, s.entropy), gs))
        (g_x,) = torch.autograd.grad(first, x, create_graph=True)  # (B, C, *S) the first-order gradient
        grads = torch.autograd.grad(g_x, [*gs, x], grad_out, allow_unused=True)
    return (*grads, None, None, None)


torch.library.register_autograd("minissl::dice_ce_entropy_backward", _dce_double_backward,
                                setup_context=_dce_backward_setup_context)

# The autograd of batch_norm_rows is in C++ (csrc/cpu/dense.cpp, AutogradCPU): about 50 calls per step.
