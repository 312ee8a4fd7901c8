"""Methods: one file each, registered by name (``minissl methods`` lists them)."""
from .base import METHODS, Method, get_method, register  # noqa: F401
from . import supervised, mean_teacher  # noqa: F401,E401  (registration side effect)
from . import ua_mt, cps, unimatch  # noqa: F401,E401
from . import bcp, m3hl, cad, ersr  # noqa: F401,E401
from . import spcl, mn  # noqa: F401,E401
from . import c3s3, medl  # noqa: F401,E401
from . import label_propagation  # noqa: F401,E401
from . import transmedseg, versemi  # noqa: F401,E401
from . import mcnet_plus, lefed  # noqa: F401,E401
