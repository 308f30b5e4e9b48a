"""rgs: X-ray radiative Gaussian splatting engine (Taichi kernels, PyTorch bridge)."""
import os

# Taichi prints a banner on import; rgs reports its own device (``rgs info``).
os.environ.setdefault("ENABLE_TAICHI_HEADER_PRINT", "false")

from . import runtime
from .errors import RgsDeviceError, RgsInputError
from .gaussians import Gaussians, covariance, inverse_covariance, quat_to_rotmat
from .geometry import Geometry, VolumeGrid

__version__ = "0.1.0"
init = runtime.init
from .analytic import fdk
from .projector import backproject, project
from .splatting import splat
from .voxelization import voxelize
