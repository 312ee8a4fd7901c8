"""How a training process runs: the settings that make the step faster, and its peak memory.

The default (``tests/test_runtime.py`` checks each against the plain step):

* **glibc's allocator keeps its memory** (2D runs; bit for bit the same results). By default glibc serves
  blocks above a dynamic threshold with fresh ``mmap`` pages and gives freed memory at the top of the heap
  back to the OS, so every step page-faults its activations in again (7 % of a cardiac Mean Teacher step
  was system time). :func:`tune_malloc` raises both thresholds (``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``,
  1 GiB, the run-time form of ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``): blocks below 1 GiB
  come from the heap and freed memory stays mapped for the next step. Glibc on Linux only. Raising only one
  of the two thresholds makes it worse (more page faults), so both are set. 2D only: 3D activations are
  large enough that the page faults matter less, while the heap kept between steps fragments (one LeFeD
  step at 112x112x80 peaked at 8.39 GiB with the setting, 5.75 without).
* **channels-last networks on the CPU** (2D runs, when the compiled ``batch_norm_rows`` kernel is there).
  oneDNN's convolutions with few channels at full resolution and max pooling run 2-3x faster on
  (B, *S, C)-ordered memory; the weights are stored that way and every convolution then returns
  channels-last activations (inputs and targets stay as they are; dropout masks do not depend on the layout,
  :class:`minissl.nets.unet.Dropout`). PyTorch's own channels-last CPU batch norm sums its statistics in
  float32 (relative error 3e-6 against 8e-8 contiguous), which moved one step's gradients by up to 1e-3 of
  the largest one; minissl's batch norm (:mod:`minissl.nets.norm`) sums them in float64 instead. The result
  is not bit for bit the plain step's (other convolution kernels round differently) but at least as close
  to the exact step: on a fixed 64x64 Mean Teacher step the gradients are 9e-6 of the largest one away
  from the float64 step, the plain float32 step's 2e-4 (``docs/results.md``, "Training step"). oneDNN's
  channels-last weight gradient of a strided 1x1 convolution crashed (torch 2.13); ResUNet's projection
  shortcuts avoid it (:class:`minissl.nets.resunet.StridedPointwise2d`).

``MINISSL_CHANNELS_LAST=0`` keeps the layout, ``=1`` also uses channels-last in 3D (and with the reference
batch norm when the kernels are not built); ``MINISSL_PLAIN_STEP=1`` turns every setting off (``minissl
bench step`` times the step each way).

Peak memory: :func:`reset_peak_rss` once the model and its optimisers are built (:data:`PEAK_FROM`),
:func:`peak_rss_mb` at the end; the run's ``metrics.json`` holds the difference and the baseline's name
(see ``minissl.engine.train``), so that every run of a process measures the same thing.
"""
from __future__ import annotations

import ctypes
import os
import platform
import re
import resource
import sys
from typing import Optional

import torch
from torch import nn

MALLOC_THRESHOLD = 1 << 30  # bytes: mmap and trim thresholds of tune_malloc (mallopt takes an int)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def plain_step() -> bool:
    """True when ``MINISSL_PLAIN_STEP=1``: run the training step without the speed settings."""
    return _flag("MINISSL_PLAIN_STEP")


def _glibc() -> Optional[ctypes.CDLL]:
    """glibc on Linux, or None (another platform or C library)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds to :data:`MALLOC_THRESHOLD` (process-wide, once is enough).

    Returns:
        True when both were set; False off glibc/Linux or when ``MINISSL_PLAIN_STEP=1``.
    """
    libc = None if plain_step() else _glibc()
    if libc is None:
        return False
    return all(libc.mallopt(p, MALLOC_THRESHOLD) == 1 for p in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))


def memory_format(spatial_dims: int, device: torch.device) -> Optional[torch.memory_format]:
    """The layout :func:`speed_up` gives a network (None: keep it).

    Channels-last on the CPU: in 2D by default when the compiled batch-norm kernel is there (without it the
    float64 reference would cost more than the layout saves), in 2D and 3D with ``MINISSL_CHANNELS_LAST=1``;
    never with ``MINISSL_CHANNELS_LAST=0``, ``MINISSL_PLAIN_STEP=1`` or on another device.
    """
    setting = os.environ.get("MINISSL_CHANNELS_LAST", "").strip().lower()
    if device.type != "cpu" or plain_step() or setting in ("0", "false", "no", "off"):
        return None
    if not _flag("MINISSL_CHANNELS_LAST"):  # the default
        from minissl.ops import _build  # the kernels are built on first use
        if spatial_dims != 2 or _build.get_kernel("batch_norm_rows", "cpu") is None:
            return None
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def speed_up(model: nn.Module, spatial_dims: int, device: torch.device) -> nn.Module:
    """Apply the speed settings of the module docstring to a built model (in place; returned).

    Args:
        model: a method or network, already on ``device``.
        spatial_dims: 2 or 3.
        device: where it trains.
    """
    if spatial_dims == 2:  # 3D: the kept heap fragments (a LeFeD step peaked at 8.39 instead of 5.75 GiB)
        tune_malloc()
    fmt = memory_format(spatial_dims, device)
    return model if fmt is None else model.to(memory_format=fmt)


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            found = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(found[1]) if found else None


def _max_rss_mb() -> float:
    """getrusage's ru_maxrss in MB (KiB on Linux, bytes on macOS): the process-lifetime maximum."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 1024


# Where a training run takes the baseline of its peak memory (metrics.json ``peak_rss_from``). Building the
# first optimiser of a process imports torch._dynamo and what it pulls in (about 900 modules, 100 MB with
# torch 2.13): a baseline taken before the optimisers counted that import in the first run of a process only.
PEAK_FROM = "model and optimisers built"


def reset_peak_rss() -> float:
    """Start a peak-memory measurement: the RSS now, in MB.

    The heap's free memory goes back to the OS first: with :func:`tune_malloc` it stays mapped, and a
    second run in one process (``minissl bench methods`` trains one after another) would otherwise reuse
    the pages the first one left and report a peak near 0. On Linux the kernel's high-water mark is then
    reset to the current RSS (``/proc/self/clear_refs``), so :func:`peak_rss_mb` gives the peak since this
    call. Elsewhere (or when the reset is refused) the mark cannot be reset and the returned baseline is
    the process-lifetime maximum so far.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)  # the heap's free memory back to the OS
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") / 1024
    except (OSError, TypeError):
        return _max_rss_mb()


def peak_rss_mb() -> float:
    """The highest RSS, in MB, since the last :func:`reset_peak_rss` (Linux) or of the whole process."""
    hwm = _status_kb("VmHWM")
    return hwm / 1024 if hwm is not None else _max_rss_mb()
