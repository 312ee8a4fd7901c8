"""Batch norm whose channels-last CPU statistics are summed in double precision.

PyTorch's CPU batch norm sums a channels-last activation's statistics in float32 down its (B * prod(S))
rows: about 40x less precise than on contiguous memory (relative error 3e-6 against 8e-8 on a 64x64
cardiac step), and through the kinks of LeakyReLU one training step's gradients then move by up to 1e-3
of the largest one (``minissl/runtime.py``). :class:`BatchNorm2d` / :class:`BatchNorm3d` are the
``nn.BatchNorm`` layers with one change: in training mode, on a channels-last CPU tensor, the statistics
and the gradient come from :func:`minissl.ops.batch_norm_rows` (float64 channel sums; compiled kernel or
its pure-PyTorch twin). Everything else (contiguous memory, eval mode, CUDA) runs ``nn.BatchNorm``'s
forward; ``MINISSL_PLAIN_STEP=1`` keeps networks contiguous (``minissl.runtime``), so it never gets here.
Parameters, buffers and ``state_dict`` keys are ``nn.BatchNorm``'s, and ``isinstance(m, nn.BatchNorm2d)``
holds (EMA copies, SyncBatchNorm conversion, checkpoint's momentum 0).
"""
from __future__ import annotations

import torch
from torch import nn

from minissl import ops
from minissl.ops import reference


class _RowsBatchNorm:
    """The shared forward of :class:`BatchNorm2d` and :class:`BatchNorm3d` (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and x.device.type == "cpu" and not x.is_contiguous() and ops.rows_layout(x)):
            return super().forward(x)  # type: ignore[misc]
        # nn.BatchNorm's bookkeeping: the count, then the averaging factor (momentum None: cumulative mean)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        if x.numel() // x.shape[1] < 2:  # values per channel
            raise ValueError(f"expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        # The layout is checked above and weight / bias are this module's own, so the kernel (or its twin) is
        # called without ops.batch_norm_rows's Python checks: ~50 calls per step, each check a few microseconds.
        kernel = ops._kernel("batch_norm_rows", x.device)
        fn = reference.batch_norm_rows if kernel is None else kernel
        y, mean, var, _ = fn(x, self.weight, self.bias, self.eps)  # (B, C, *S), (C,) x3
        if self.track_running_stats and self.running_mean is not None:  # (mean and var carry no graph)
            # var is the unbiased variance, the one nn.BatchNorm averages; one call for both buffers
            torch._foreach_lerp_([self.running_mean, self.running_var], [mean, var], factor)
        return y  # (B, C, *S), channels-last memory like x


class BatchNorm2d(_RowsBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with double-precision statistics on channels-last CPU activations."""


class BatchNorm3d(_RowsBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with double-precision statistics on channels-last CPU activations."""
