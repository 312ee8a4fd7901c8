"""UNet for 2D and 3D segmentation with 1 to 3 decoders (the SSL4MIS UNet, written for ``spatial_dims``).

Encoder level k (k = 0..depth) is a block conv3x3-BN-LeakyReLU-Dropout(p_k)-conv3x3-BN-LeakyReLU with
``width * 2**k`` channels; levels 1..depth start with a 2x max-pool. Each decoder climbs back with one
up-sampling per level, concatenates the skip feature and applies the same block (no dropout), then a
3x3 conv gives the logits. Decoders differ only in up-sampling, as in SSL4MIS's MCNet / URPC family:

* ``"transpose"``: ``ConvTranspose(c_{k+1} -> c_k, kernel 2, stride 2)``;
* ``"linear"`` / ``"nearest"``: ``Conv1x1(c_{k+1} -> c_k)`` then bilinear/trilinear (align_corners=True)
  or nearest up-sampling by 2 (SSL4MIS's plain UNet uses "linear"; the minissl default is "transpose").

Feature taps for decoder-level methods (LeFeD): ``decode_stages`` also returns each decoder's stage
features, one per encoder level and of that level's shape (the bottleneck as the decoder starts from it,
then each up-sampled map before the skip is merged); ``gates`` multiply the skips (and add a gated copy of
the bottleneck) and ``encode(x, feedback)`` adds one tensor per level to the encoder features, so the
deeper levels see the change too.

Feature perturbation (UniMatch): ``decode(feats, index, perturb=True)`` applies channel dropout
(``Dropout2d``/``Dropout3d``, p = ``feature_dropout``, default 0.5) to every encoder feature, in train and
eval mode alike (UniMatch builds a fresh ``nn.Dropout2d(0.5)``, always in training mode, in its forward).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from minissl.nets.norm import BatchNorm2d, BatchNorm3d

UP_MODES = ("transpose", "linear", "nearest")


def _layers(spatial_dims: int) -> tuple[type, type, type]:
    return (nn.Conv2d, nn.ConvTranspose2d, BatchNorm2d) if spatial_dims == 2 else \
        (nn.Conv3d, nn.ConvTranspose3d, BatchNorm3d)


class Dropout(nn.Dropout):
    """Element-wise dropout whose mask does not depend on the memory layout of its input.

    ``nn.Dropout`` draws its mask in memory order, so a channels-last network (``minissl.runtime``) would
    draw other masks than a contiguous one from the same seed. Here a channels-last input gets a mask
    drawn in (B, C, *S) order, the one a contiguous input gets from ``nn.Dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.is_contiguous():
            return super().forward(x)
        keep = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)  # (B, C, *S)
        return x * keep.div_(1 - self.p)


def conv_block(c_in: int, c_out: int, spatial_dims: int, dropout: float = 0.0) -> nn.Sequential:
    """conv3x3-BN-LeakyReLU-Dropout-conv3x3-BN-LeakyReLU (SSL4MIS ``ConvBlock``; element-wise dropout).

    The LeakyReLUs work in place on the BN outputs (BN's backward needs only its input), which keeps one
    map fewer per activation for the backward pass: a third less activation memory, the same values.
    """
    conv, _, norm = _layers(spatial_dims)
    return nn.Sequential(conv(c_in, c_out, 3, padding=1), norm(c_out), nn.LeakyReLU(inplace=True),
                         Dropout(dropout) if dropout > 0 else nn.Identity(),
                         conv(c_out, c_out, 3, padding=1), norm(c_out), nn.LeakyReLU(inplace=True))


def up_layer(c_in: int, c_out: int, spatial_dims: int, mode: str) -> nn.Module:
    """x2 up-sampling c_in -> c_out: a transposed conv, or a 1x1 conv then linear/nearest interpolation."""
    conv, tconv, _ = _layers(spatial_dims)
    if mode == "transpose":
        return tconv(c_in, c_out, 2, stride=2)
    linear = "bilinear" if spatial_dims == 2 else "trilinear"
    return nn.Sequential(conv(c_in, c_out, 1), nn.Upsample(scale_factor=2, mode=linear if mode == "linear" else mode,
                                                           align_corners=True if mode == "linear" else None))


class Decoder(nn.Module):
    """One decoder: per level up-sample, concatenate the skip, conv block; then a 3x3 conv head."""

    def __init__(self, chans: Sequence[int], num_classes: int, spatial_dims: int, up_mode: str):
        super().__init__()
        self.levels = list(reversed(range(len(chans) - 1)))
        self.ups = nn.ModuleList(up_layer(chans[k + 1], chans[k], spatial_dims, up_mode) for k in self.levels)
        self.blocks = nn.ModuleList(conv_block(2 * chans[k], chans[k], spatial_dims) for k in self.levels)
        self.head = _layers(spatial_dims)[0](chans[0], num_classes, 3, padding=1)

    def forward(self, feats: Sequence[torch.Tensor], gates: Optional[Sequence[torch.Tensor]] = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Logits (B, C, *S), the last map (B, width, *S) and the stage features (stage k shaped like feats[k]).

        With ``gates`` (one per level, broadcastable to feats[k]): the bottleneck becomes ``f + f * g`` and
        each skip ``f_k * g_k``.
        """
        x = feats[-1] if gates is None else feats[-1] + feats[-1] * gates[-1]  # (B, c_depth, *S / 2**depth)
        stages = [x]
        for up, block, k in zip(self.ups, self.blocks, self.levels):
            u = up(x)                                                   # (B, c_k, *S / 2**k)
            skip = feats[k] if gates is None else feats[k] * gates[k]   # (B, c_k, *S / 2**k)
            x = block(torch.cat([skip, u], dim=1))                      # (B, c_k, *S / 2**k)
            stages.append(u)
        return self.head(x), x, stages[::-1]                            # (B, C, *S), (B, width, *S), shallow first


class UNet(nn.Module):
    """UNet with ``len(up_modes)`` decoders sharing one encoder.

    Args:
        in_channels: image channels.
        num_classes: output channels (logits).
        spatial_dims: 2 (inputs (B, C_in, H, W)) or 3 (inputs (B, C_in, D, H, W)).
        width: channels of the first level; level k has ``width * 2**k``.
        depth: number of down-samplings; every spatial size must be divisible by ``2**depth``.
        dropout: encoder dropout per level (a float for all levels, or a sequence; when it has more than
            ``depth + 1`` entries the last ``depth + 1`` are used, so the bottleneck keeps the last one).
        up_modes: one up-sampling mode per decoder (1 to 3 of "transpose", "linear", "nearest").
        feature_dropout: channel-dropout rate of ``decode(..., perturb=True)`` (UniMatch feature perturbation).

    Example:
        >>> net = UNet(1, 4, spatial_dims=2, width=8, depth=3, up_modes=("transpose", "linear"))
        >>> [y.shape for y in net.forward_all(torch.zeros(2, 1, 32, 32))]
        [torch.Size([2, 4, 32, 32]), torch.Size([2, 4, 32, 32])]
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, spatial_dims: int = 2, width: int = 16,
                 depth: int = 4, dropout: float | Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
                 up_modes: Sequence[str] = ("transpose",), feature_dropout: float = 0.5):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
        up_modes = (up_modes,) if isinstance(up_modes, str) else tuple(up_modes)
        if not 1 <= len(up_modes) <= 3 or any(m not in UP_MODES for m in up_modes):
            raise ValueError(f"up_modes must be 1 to 3 of {UP_MODES}, got {up_modes}")
        drops = [float(dropout)] * (depth + 1) if isinstance(dropout, (int, float)) else list(dropout)
        if len(drops) < depth + 1:
            raise ValueError(f"dropout needs depth + 1 = {depth + 1} entries, got {len(drops)}")
        drops = drops[len(drops) - depth - 1:]
        self.in_channels, self.num_classes, self.spatial_dims = in_channels, num_classes, spatial_dims
        self.depth, self.up_modes, self.feature_dropout = depth, up_modes, feature_dropout
        chans = [width * 2 ** k for k in range(depth + 1)]
        self.encoder = nn.ModuleList(conv_block(in_channels if k == 0 else chans[k - 1], chans[k],
                                                spatial_dims, drops[k]) for k in range(depth + 1))
        self.decoders = nn.ModuleList(Decoder(chans, num_classes, spatial_dims, m) for m in up_modes)

    def _check(self, x: torch.Tensor) -> None:
        expected = "(B, C, H, W)" if self.spatial_dims == 2 else "(B, C, D, H, W)"
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expected input {expected} with C={self.in_channels}, got {tuple(x.shape)}")
        if any(s % 2 ** self.depth for s in x.shape[2:]):
            raise ValueError(f"UNet input sizes must be divisible by 2**depth={2 ** self.depth}, "
                             f"got {tuple(x.shape[2:])}")

    def encode(self, x: torch.Tensor, feedback: Optional[Sequence[torch.Tensor]] = None) -> list[torch.Tensor]:
        """Encoder features ``[f_0, ..., f_depth]``; f_k is (B, width * 2**k, *S / 2**k), f_depth the bottleneck.

        ``feedback`` (one tensor per level, broadcastable to f_k) is added to f_k before level k + 1 reads it.
        """
        self._check(x)
        if feedback is not None and len(feedback) != self.depth + 1:
            raise ValueError(f"encode expected feedback for {self.depth + 1} levels, got {len(feedback)}")
        pool = F.max_pool2d if self.spatial_dims == 2 else F.max_pool3d
        feats = []
        for k, block in enumerate(self.encoder):
            x = block(pool(x, 2) if k else x)                           # (B, c_k, *S / 2**k)
            if feedback is not None:
                x = x + feedback[k]                                     # (B, c_k, *S / 2**k)
            feats.append(x)
        return feats

    def decode(self, feats: Sequence[torch.Tensor], index: int = 0,
               perturb: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode with decoder ``index``; returns (logits (B, C, *S), last decoder map (B, width, *S)).

        ``perturb=True`` applies channel dropout (p = ``feature_dropout``) to every feature first.
        """
        self._check_decoder(feats, index)
        if perturb:
            drop = F.dropout2d if self.spatial_dims == 2 else F.dropout3d
            feats = [drop(f, self.feature_dropout, training=True) for f in feats]
        return self.decoders[index](feats)[:2]

    def decode_stages(self, feats: Sequence[torch.Tensor], index: int = 0,
                      gates: Optional[Sequence[torch.Tensor]] = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decode with decoder ``index``; returns logits (B, C, *S) and the stage features ``[s_0, ..., s_depth]``,
        s_k shaped like feats[k]: s_depth the bottleneck the decoder starts from, s_k (k < depth) the map
        up-sampled to level k before its skip is concatenated.

        ``gates`` (one per level, e.g. ``sigmoid`` of another decoder's stages): bottleneck ``f + f * g``,
        skips ``f_k * g_k``.
        """
        self._check_decoder(feats, index)
        if gates is not None and len(gates) != self.depth + 1:
            raise ValueError(f"decode_stages expected gates for {self.depth + 1} levels, got {len(gates)}")
        logits, _, stages = self.decoders[index](feats, gates)
        return logits, stages

    def _check_decoder(self, feats: Sequence[torch.Tensor], index: int) -> None:
        if len(feats) != self.depth + 1:
            raise ValueError(f"decode expected {self.depth + 1} encoder features, got {len(feats)}")
        if not 0 <= index < len(self.decoders):
            raise ValueError(f"decoder index must be in [0, {len(self.decoders)}), got {index}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes, *S) of the first decoder."""
        return self.decode(self.encode(x), 0)[0]

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits (B, num_classes, *S) of every decoder, sharing one encoder pass."""
        feats = self.encode(x)
        return [self.decode(feats, i)[0] for i in range(len(self.decoders))]
