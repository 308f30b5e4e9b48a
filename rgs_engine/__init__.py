"""rgs: X-ray radiative Gaussian splatting engine (Taichi kernels, PyTorch bridge).

Public API (all lengths in mm, attenuation in 1/mm; tensors on the runtime device):

* :class:`Geometry` — per-view ASTRA-style vectors (cone / parallel), with the circular
  (TIGRE / NAF), arbitrary-pose and biplanar constructors; :class:`VolumeGrid` — an
  axis-aligned voxel grid convertible to and from a NIfTI affine.
* :class:`Gaussians` — raw trainable tensors and their activations.
* :func:`splat` — Gaussians -> projections (V, H, W), differentiable.
* :func:`voxelize` — Gaussians -> volume (nx, ny, nz) on any grid, differentiable.
* :func:`project` / :func:`backproject` — dense DRR of a volume and its exact adjoint.
* :func:`fdk` — filtered backprojection for circular orbits.
* :func:`register` — rigid CT-to-X-ray registration of Gaussians (engine level).
* :func:`init` — choose the device (``auto`` / ``cuda`` / ``cpu``); otherwise lazy.

Whole jobs (load, iterate, evaluate, write, resume) are in :mod:`rgs_engine.pipelines`, one
function per ``rgs`` command; the sub-packages ``core``, ``io``, ``sim``, ``recon``,
``registration``, ``motion`` and ``batch`` hold the rest (README, "Architecture").
"""
import os
import warnings

# Taichi prints a banner on import; rgs reports its own device (``rgs info``).
os.environ.setdefault("ENABLE_TAICHI_HEADER_PRINT", "false")
# Taichi 1.7.4's sources hold invalid escape sequences: where its bytecode was not compiled at
# install time (an unpacked site, ``pip install --no-compile``), Python >= 3.12 prints a
# SyntaxWarning for them on the first import, on stderr above rgs' own one-line errors.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", SyntaxWarning)
    import taichi  # noqa: E402, F401

from .core import runtime  # noqa: E402
from .core.errors import RgsDeviceError, RgsInputError  # noqa: E402
from .core.gaussians import Gaussians, covariance, inverse_covariance, quat_to_rotmat  # noqa: E402
from .core.geometry import Geometry, VolumeGrid  # noqa: E402
from .core.projector import backproject, project  # noqa: E402
from .core.splatting import splat  # noqa: E402
from .core.voxelization import voxelize  # noqa: E402
from .recon.fdk import fdk  # noqa: E402
from .registration.register import register  # noqa: E402

__version__ = "0.1.0"
init = runtime.init

__all__ = ["Geometry", "VolumeGrid", "Gaussians", "covariance", "inverse_covariance", "quat_to_rotmat",
           "splat", "voxelize", "project", "backproject", "fdk", "register", "init", "runtime",
           "RgsInputError", "RgsDeviceError", "__version__"]
