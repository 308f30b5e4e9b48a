"""A small synthetic chest CT in Hounsfield units, shared by the breathing and simulate4d tests."""
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from rgs_engine import VolumeGrid

LUNG_CENTRE_Z = 40.0  # mm above the box centre
LUNG_HALF_HEIGHT = 90.0  # mm
SPINE = (0.0, -70.0, 18.0)  # x, y of the axis and radius, mm (posterior: -y)


def chest_hu(grid: VolumeGrid) -> torch.Tensor:
    """(nx, ny, nz) float32 HU on ``grid`` (RAS+ axes), about the box centre: air, a body
    (elliptic cylinder 140 x 100 mm, 0 HU) along z, two lungs (ellipsoids, -800 HU) and a
    spine (cylinder posterior of the lungs, 700 HU)."""
    c = grid.voxel_centres() - torch.from_numpy(grid.centre)
    x, y, z = c[..., 0], c[..., 1], c[..., 2]
    hu = torch.full(grid.shape, -1000.0, dtype=torch.float64)
    hu[(x / 140) ** 2 + (y / 100) ** 2 <= 1] = 0.0
    for side in (-1, 1):
        lung = ((x - 60 * side) / 45) ** 2 + ((y - 5) / 60) ** 2 + ((z - LUNG_CENTRE_Z) / LUNG_HALF_HEIGHT) ** 2
        hu[lung <= 1] = -800.0
    hu[(x - SPINE[0]) ** 2 + (y - SPINE[1]) ** 2 <= SPINE[2] ** 2] = 700.0
    return hu.float()


def chest_grid(n: int = 32, spacing: float = 10.0, centre=(5.0, -20.0, 100.0)) -> VolumeGrid:
    """An n^3 grid of ``spacing`` mm about ``centre`` (not the origin, as a real CT)."""
    return VolumeGrid.centred((n, n, n), spacing, centre)


def write_chest_nifti(path: Path, n: int = 32, spacing: float = 10.0) -> Path:
    """:func:`chest_hu` on :func:`chest_grid` stored LPS-like (x and y reversed), as many
    scanners write: readers must reorient it to RAS+."""
    grid = chest_grid(n, spacing)
    hu = chest_hu(grid).numpy()[::-1, ::-1, :]
    affine = np.diag([-spacing, -spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(grid.origin) + np.array([(n - 1) * spacing, (n - 1) * spacing, 0.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(hu), affine), str(path))
    return path
