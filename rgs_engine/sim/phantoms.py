"""Analytic test volumes: the 3D Shepp-Logan head phantom sampled on a voxel grid.

The phantom is the 10-ellipsoid 3D extension of the Shepp-Logan head (the table of
Schabel's ``phantom3d`` for MATLAB, also shipped by TIGRE's ``sheppLogan3D``), with Toft's
*modified* intensities (1, -0.8, -0.2, -0.2, 0.1 x 6: higher contrast than the original
2, -0.98, -0.02, ...; the original is available as ``variant="original"`` with intensities
1, -0.98, -0.02, -0.02, 0.01 x 6).

Ellipsoid ``k`` occupies ``{x : |diag(a, b, c)^-1 R_k^T (x - c_k)| <= 1}`` in normalised
coordinates where the phantom's box is ``[-1, 1]^3``; ``R_k = Rz(phi) Rx(theta) Rz(psi)``
(the table's Euler angles, degrees), each ellipsoid rotated about its own centre. Values of
overlapping ellipsoids add. The modified phantom's values lie in [0, 1]: 1 in the skull
shell, 0.2 in the brain, 0 in the two dark ellipsoids, 0.3 in the small bright ones.

Attenuation: the normalised value times ``scale`` (default 0.02 /mm, water at ~60-70 keV,
:data:`rgs_engine.sim.ct.MU_WATER`), so the skull attenuates like water and the brain like
0.004 /mm. The phantom's cube ``[-1, 1]^3`` maps to a cube of side ``box_mm`` (default: the
grid's longest edge) centred on the grid's centre; axes x, y, z are the world axes.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .ct import MU_WATER
from ..core.errors import RgsInputError
from ..core.geometry import VolumeGrid

# columns: intensity, semi-axes a b c, centre x0 y0 z0, Euler angles phi theta psi (degrees)
MODIFIED_SHEPP_LOGAN = (
    (1.0, 0.6900, 0.920, 0.810, 0.00, 0.0000, 0.00, 0.0, 0.0, 0.0),
    (-0.8, 0.6624, 0.874, 0.780, 0.00, -0.0184, 0.00, 0.0, 0.0, 0.0),
    (-0.2, 0.1100, 0.310, 0.220, 0.22, 0.0000, 0.00, -18.0, 0.0, 10.0),
    (-0.2, 0.1600, 0.410, 0.280, -0.22, 0.0000, 0.00, 18.0, 0.0, 10.0),
    (0.1, 0.2100, 0.250, 0.410, 0.00, 0.3500, -0.15, 0.0, 0.0, 0.0),
    (0.1, 0.0460, 0.046, 0.050, 0.00, 0.1000, 0.25, 0.0, 0.0, 0.0),
    (0.1, 0.0460, 0.046, 0.050, 0.00, -0.1000, 0.25, 0.0, 0.0, 0.0),
    (0.1, 0.0460, 0.023, 0.050, -0.08, -0.6050, 0.00, 0.0, 0.0, 0.0),
    (0.1, 0.0230, 0.023, 0.020, 0.00, -0.6060, 0.00, 0.0, 0.0, 0.0),
    (0.1, 0.0230, 0.046, 0.020, 0.06, -0.6050, 0.00, 0.0, 0.0, 0.0),
)
ORIGINAL_INTENSITIES = (1.0, -0.98, -0.02, -0.02, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01)
VARIANTS = ("modified", "original")


def ellipsoid_table(variant: str = "modified") -> torch.Tensor:
    """(10, 10) float64 table of the phantom (columns as :data:`MODIFIED_SHEPP_LOGAN`)."""
    if variant not in VARIANTS:
        raise RgsInputError(f"unknown Shepp-Logan variant {variant!r}: use one of {', '.join(VARIANTS)}")
    table = torch.tensor(MODIFIED_SHEPP_LOGAN, dtype=torch.float64)
    if variant == "original":
        table[:, 0] = torch.tensor(ORIGINAL_INTENSITIES, dtype=torch.float64)
    return table


def _euler_zxz(phi: float, theta: float, psi: float) -> torch.Tensor:
    """Rotation ``Rz(phi) Rx(theta) Rz(psi)`` (angles in degrees), float64 (3, 3)."""
    def rz(a):
        c, s = math.cos(a), math.sin(a)
        return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)

    def rx(a):
        c, s = math.cos(a), math.sin(a)
        return torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], dtype=torch.float64)

    return rz(math.radians(phi)) @ rx(math.radians(theta)) @ rz(math.radians(psi))


def _prepared(variant: str, device) -> list[tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per ellipsoid: (value, centre, R / axes scaled columns) ready for evaluation."""
    rows = []
    for row in ellipsoid_table(variant):
        rot = _euler_zxz(*(float(a) for a in row[7:10]))
        # |diag(abc)^-1 R^T (x - c)|^2 = |(x - c) @ (R diag(abc)^-1)|^2 for row vectors x
        rows.append((float(row[0]), row[4:7].to(device), (rot / row[1:4]).to(device), row[1:4].max()))
    return rows


def shepp_logan_normalised(points: torch.Tensor, variant: str = "modified") -> torch.Tensor:
    """Phantom value at ``points`` (..., 3) in normalised coordinates (box [-1, 1]^3), float64."""
    x = points.to(torch.float64)
    out = torch.zeros(x.shape[:-1], dtype=torch.float64, device=x.device)
    for value, centre, m, _ in _prepared(variant, x.device):
        inside = (((x - centre) @ m) ** 2).sum(-1) <= 1.0
        out += value * inside.to(torch.float64)
    return out.clamp_min_(0.0)  # 1 - 0.8 - 0.2 is -5.6e-17 in floating point, 0 in theory


def shepp_logan(grid: VolumeGrid, scale: float = MU_WATER, box_mm: float | None = None,
                variant: str = "modified", oversample: int = 1) -> torch.Tensor:
    """The 3D Shepp-Logan phantom on ``grid``: (nx, ny, nz) float32 CPU, 1/mm.

    ``scale`` (1/mm) multiplies the normalised values (max 1 for the modified variant);
    ``box_mm`` is the side of the phantom's cube (default: the grid's longest edge), centred
    on the grid's centre. ``oversample`` > 1 averages ``oversample^3`` sub-voxel samples per
    voxel (partial-volume edges instead of staircase ones).
    """
    if not isinstance(grid, VolumeGrid):
        raise RgsInputError(f"grid must be a VolumeGrid, got {type(grid).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise RgsInputError(f"phantom scale must be a positive attenuation (1/mm), got {scale}")
    side = float(grid.size_mm.max()) if box_mm is None else float(box_mm)
    if not (math.isfinite(side) and side > 0):
        raise RgsInputError(f"phantom box side must be positive (mm), got {box_mm}")
    if int(oversample) != oversample or oversample < 1:
        raise RgsInputError(f"oversample must be a positive integer, got {oversample}")
    oversample = int(oversample)
    half = side / 2
    centre = np.asarray(grid.centre, dtype=np.float64)
    offsets = (np.arange(oversample) + 0.5) / oversample - 0.5  # sub-voxel positions (voxels)
    # normalised coordinate of every voxel centre along each axis
    axes = [torch.from_numpy((o + np.arange(n) * sp - c) / half)
            for n, sp, o, c in zip(grid.shape, grid.spacing, grid.origin, centre)]
    steps = [sp / half for sp in grid.spacing]
    acc = torch.zeros(grid.shape, dtype=torch.float64)
    weight = 1.0 / oversample ** 3
    for value, ell_centre, m, reach in _prepared(variant, "cpu"):
        # only the voxels within the ellipsoid's bounding cube (+1 voxel) can be inside
        ranges = []
        for axis in range(3):
            lo = float(ell_centre[axis] - reach) - steps[axis]
            hi = float(ell_centre[axis] + reach) + steps[axis]
            idx = torch.nonzero((axes[axis] >= lo) & (axes[axis] <= hi)).reshape(-1)
            ranges.append((int(idx[0]), int(idx[-1]) + 1) if idx.numel() else (0, 0))
        if any(b <= a for a, b in ranges):
            continue
        (x0, x1), (y0, y1), (z0, z1) = ranges
        ys, zs = axes[1][y0:y1], axes[2][z0:z1]
        chunk = max(1, (1 << 21) // (len(ys) * len(zs)))
        for xa in range(x0, x1, chunk):
            xs = axes[0][xa:min(x1, xa + chunk)]
            inside = torch.zeros(len(xs), len(ys), len(zs), dtype=torch.float64)
            for ox in offsets:
                for oy in offsets:
                    for oz in offsets:
                        pts = torch.stack(torch.meshgrid(xs + ox * steps[0], ys + oy * steps[1],
                                                         zs + oz * steps[2], indexing="ij"), -1)
                        inside += ((((pts - ell_centre) @ m) ** 2).sum(-1) <= 1.0).to(torch.float64)
            acc[xa:xa + len(xs), y0:y1, z0:z1] += value * weight * inside
    # 1 - 0.8 - 0.2 is -5.6e-17 in floating point, 0 in theory
    out = (acc.clamp_min_(0.0) * scale).to(torch.float32)
    return out


def shepp_logan_grid(n: int, box_mm: float = 256.0) -> VolumeGrid:
    """A cubic grid of ``n``^3 voxels spanning ``box_mm`` (mm), centred on the origin."""
    if int(n) != n or n < 1:
        raise RgsInputError(f"grid size must be a positive number of voxels, got {n}")
    if not (math.isfinite(box_mm) and box_mm > 0):
        raise RgsInputError(f"phantom box side must be positive (mm), got {box_mm}")
    return VolumeGrid.centred((int(n),) * 3, box_mm / int(n))
