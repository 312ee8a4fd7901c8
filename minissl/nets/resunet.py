"""ResUNet: a ResNet-encoder segmentation network for 2D and 3D (the "3D-ResVNet" of C3S3 and MEDL).

Two co-trained networks make different errors when their architectures differ; C3S3 and MEDL pair the
library's :class:`~minissl.nets.UNet` with this network. Its encoder is a ResNet (ResNet34's
``(3, 4, 6, 3)`` basic blocks by default), its decoder VNet-like (skips are *added*, not concatenated):

* stem (level 0): ``conv k7 (stride 1) - BN - ReLU`` to ``width`` channels at full resolution;
* stage k = 1..depth: ``blocks[k-1]`` basic blocks ``conv3x3-BN-ReLU-conv3x3-BN (+ shortcut) - ReLU``
  with ``width * 2**k`` channels; the first block halves the size (stride 2, 1x1-conv-BN shortcut).
  The last BN of every block starts at weight 0 (each block starts as its shortcut: "zero-init residual");
* decoder level k = depth-1..0: ``ConvTranspose(k2, s2) - BN - ReLU`` to ``width * 2**k`` channels, add the
  stage-k feature, then ``min(k + 1, 3)`` conv3x3-BN-ReLU layers (the VNet decoder's 3, 3, 2, 1 convs);
* channel dropout (p = ``dropout``) on the last decoder map, then a 1x1 conv gives the logits.
Convolutions start Kaiming-normal. The C3S3 code builds the same network in 3D with ``width = 16`` (its
``models/ResNet34.py`` and ``models/resnet.py``, https://github.com/Y-TARL/C3S3).

Example:
    >>> net = ResUNet(1, 2, spatial_dims=3, width=4, depth=2)
    >>> net(torch.zeros(1, 1, 8, 16, 16)).shape
    torch.Size([1, 2, 8, 16, 16])
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minissl.nets.unet import _layers


class _StridedPointwise:
    """The ResNet projection shortcut, a bias-free 1x1 convolution with stride s, computed as the 1x1
    convolution (stride 1) of every s-th voxel: the same numbers, as a 1x1 kernel with stride s reads
    nothing else.

    Written this way because oneDNN's channels-last weight gradient of a strided 1x1 convolution crashed
    (torch 2.13, AVX-512; e.g. 8 -> 16 channels at 64x64, stride 2: a segmentation fault), and channels-last
    is the 2D CPU step's layout (``minissl.runtime``). An ``nn.Conv`` of kernel 1 and stride 1 otherwise, so
    parameters and ``state_dict`` keys are the plain convolution's.
    """

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__(c_in, c_out, 1, bias=False)  # type: ignore[call-arg]
        self.sub_stride = stride

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sub_stride={self.sub_stride}"  # type: ignore[misc]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.sub_stride
        sub = x[(slice(None), slice(None)) + (slice(None, None, s),) * (x.dim() - 2)]  # (B, c_in, *S / s)
        return self._conv_forward(sub, self.weight, self.bias)  # type: ignore[attr-defined]  (B, c_out, *S / s)


class StridedPointwise2d(_StridedPointwise, nn.Conv2d):
    """2D :class:`_StridedPointwise`."""


class StridedPointwise3d(_StridedPointwise, nn.Conv3d):
    """3D :class:`_StridedPointwise`."""


class BasicBlock(nn.Module):
    """ResNet basic block ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``; stride 2 halves the size."""

    def __init__(self, c_in: int, c_out: int, spatial_dims: int, stride: int = 1):
        super().__init__()
        conv, _, norm = _layers(spatial_dims)
        self.body = nn.Sequential(conv(c_in, c_out, 3, stride=stride, padding=1, bias=False), norm(c_out),
                                  nn.ReLU(), conv(c_out, c_out, 3, padding=1, bias=False), norm(c_out))
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else \
            nn.Sequential((StridedPointwise2d if spatial_dims == 2 else StridedPointwise3d)(c_in, c_out, stride),
                          norm(c_out))
        nn.init.zeros_(self.body[-1].weight)  # zero-init residual: the block starts as its shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))                  # (B, c_out, *S / stride)


def conv_bn_relu(c_in: int, c_out: int, spatial_dims: int, n: int) -> nn.Sequential:
    """``n`` layers conv3x3-BN-ReLU (the VNet decoder block)."""
    conv, _, norm = _layers(spatial_dims)
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [conv(c_in if i == 0 else c_out, c_out, 3, padding=1), norm(c_out), nn.ReLU()]
    return nn.Sequential(*layers)


class ResUNet(nn.Module):
    """ResNet encoder + additive-skip decoder (see the module docstring).

    Args:
        in_channels: image channels.
        num_classes: output channels (logits).
        spatial_dims: 2 (inputs (B, C_in, H, W)) or 3 (inputs (B, C_in, D, H, W)).
        width: channels of level 0; level k has ``width * 2**k``.
        depth: number of down-samplings (ResNet stages); every spatial size must be divisible by ``2**depth``.
        blocks: basic blocks per stage (ResNet34: ``(3, 4, 6, 3)``); stages past the end repeat the last entry.
        dropout: channel-dropout rate before the 1x1 head (C3S3's ``has_dropout``: 0.5).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, spatial_dims: int = 2, width: int = 16,
                 depth: int = 4, blocks: Sequence[int] = (3, 4, 6, 3), dropout: float = 0.5):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"ResUNet: spatial_dims must be 2 or 3, got {spatial_dims}")
        if depth < 1 or width < 1 or not blocks or min(blocks) < 1:
            raise ValueError(f"ResUNet: expected depth >= 1, width >= 1 and blocks >= 1 per stage, got depth={depth}, "
                             f"width={width}, blocks={tuple(blocks)}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.spatial_dims, self.depth = spatial_dims, depth
        conv, tconv, norm = _layers(spatial_dims)
        chans = [width * 2 ** k for k in range(depth + 1)]
        self.stem = nn.Sequential(conv(in_channels, width, 7, padding=3, bias=False), norm(width), nn.ReLU())
        self.stages = nn.ModuleList(
            nn.Sequential(*(BasicBlock(chans[k - 1] if i == 0 else chans[k], chans[k], spatial_dims, 2 if i == 0 else 1)
                            for i in range(blocks[min(k, len(blocks)) - 1])))
            for k in range(1, depth + 1))
        levels = list(reversed(range(depth)))
        self.ups = nn.ModuleList(nn.Sequential(tconv(chans[k + 1], chans[k], 2, stride=2), norm(chans[k]), nn.ReLU())
                                 for k in levels)
        self.blocks = nn.ModuleList(conv_bn_relu(chans[k], chans[k], spatial_dims, min(k + 1, 3)) for k in levels)
        self.dropout = (nn.Dropout2d if spatial_dims == 2 else nn.Dropout3d)(dropout)
        self.head = conv(width, num_classes, 1)
        for m in self.modules():
            if isinstance(m, (conv, tconv)):
                nn.init.kaiming_normal_(m.weight)

    def _check(self, x: torch.Tensor) -> None:
        expected = "(B, C, H, W)" if self.spatial_dims == 2 else "(B, C, D, H, W)"
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"ResUNet expected input {expected} with C={self.in_channels}, got {tuple(x.shape)}")
        if any(s % 2 ** self.depth for s in x.shape[2:]):
            raise ValueError(f"ResUNet input sizes must be divisible by 2**depth={2 ** self.depth}, "
                             f"got {tuple(x.shape[2:])}")

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features ``[f_0, ..., f_depth]``; f_k is (B, width * 2**k, *S / 2**k), f_0 the stem output."""
        self._check(x)
        feats = [self.stem(x)]                                          # (B, width, *S)
        for stage in self.stages:
            feats.append(stage(feats[-1]))                              # (B, c_k, *S / 2**k)
        return feats

    def decode(self, feats: Sequence[torch.Tensor], index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, C, *S) and the last decoder map (B, width, *S, before dropout); ``index`` must be 0."""
        if len(feats) != self.depth + 1 or index != 0:
            raise ValueError(f"ResUNet.decode expected {self.depth + 1} features and index 0, got {len(feats)} "
                             f"features and index {index}")
        x = feats[-1]                                                   # (B, c_depth, *S / 2**depth)
        for up, block, skip in zip(self.ups, self.blocks, reversed(feats[:-1])):
            x = block(up(x) + skip)                                     # (B, c_k, *S / 2**k)
        return self.head(self.dropout(x)), x                            # (B, C, *S), (B, width, *S)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes, *S)."""
        return self.decode(self.encode(x))[0]
