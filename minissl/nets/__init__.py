"""Networks: :class:`UNet` for 2D and 3D with 1 to 3 decoders (``from minissl.nets import UNet``)."""
from minissl.nets.unet import UNet

__all__ = ["UNet"]
