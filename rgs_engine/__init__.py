"""rgs: X-ray radiative Gaussian splatting engine (Taichi kernels, PyTorch bridge)."""
from . import runtime
from .errors import RgsDeviceError, RgsInputError
from .gaussians import Gaussians, covariance, inverse_covariance, quat_to_rotmat
from .geometry import Geometry, VolumeGrid

__version__ = "0.1.0"
init = runtime.init
