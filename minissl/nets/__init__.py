"""Networks: :class:`UNet` (2D/3D, 1 to 3 decoders) and :class:`ResUNet` (ResNet encoder), plus
:func:`checkpointed` (activation checkpointing that counts BatchNorm statistics once)."""
from minissl.nets.checkpoint import checkpointed
from minissl.nets.resunet import ResUNet
from minissl.nets.unet import UNet

__all__ = ["ResUNet", "UNet", "checkpointed"]
