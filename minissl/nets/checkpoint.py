"""Activation checkpointing for a network pass whose batch-norm statistics must be counted once.

``checkpointed(fn, x, net=net)`` keeps only the inputs of ``fn`` during the forward pass and recomputes
its activations during backward (``torch.utils.checkpoint``, non-reentrant, random state preserved, so
dropout draws the same masks). Recomputing a training-mode BatchNorm would update its running
statistics a second time; here every BatchNorm of ``net`` runs the recomputation with momentum 0, so
its running statistics (and so evaluation) are those of one ordinary pass. Gradients are exact.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextmanager
def frozen_batchnorm_stats(net: nn.Module) -> Iterator[None]:
    """Run the block with every BatchNorm of ``net`` at momentum 0 (running statistics and counts unchanged)."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def checkpointed(fn: Callable[..., Any], *args: torch.Tensor, net: nn.Module) -> Any:
    """``fn(*args)`` with its activations recomputed in backward; ``net``'s BatchNorm statistics move once."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True,
                      context_fn=lambda: (nullcontext(), frozen_batchnorm_stats(net)))
