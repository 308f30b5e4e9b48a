"""Simulated CT of a volume: Hounsfield units to 1/mm, resampling, a scan that covers a grid.

Hounsfield units relate to linear attenuation by ``HU = 1000 (mu - mu_water) / mu_water``
(air -1000, water 0), so ``mu = mu_water (1 + HU / 1000)``, clamped at 0. ``mu_water`` is
0.02 /mm (water at roughly 60-70 keV effective energy). Padding values such as -2048
outside a scanner's reconstruction circle map to 0.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import RgsInputError, check_tensor
from ..core.geometry import Geometry, VolumeGrid

MU_WATER = 0.02  # 1/mm
COVER_MARGIN = 1.02  # detectors 2 % larger than the volume's shadow


def hu_to_mu(hu: torch.Tensor, mu_water: float = MU_WATER) -> torch.Tensor:
    """Linear attenuation (1/mm, float32, same shape) of a volume in Hounsfield units."""
    return (mu_water * (1.0 + hu.to(torch.float32) / 1000.0)).clamp_min(0.0)


def fit_grid(grid: VolumeGrid, n: int) -> VolumeGrid:
    """An isotropic grid with ``n`` voxels along the longest edge of ``grid``'s box.

    Spacing = longest edge / ``n`` (mm); the other axes get as many voxels as cover their
    edge (rounded up); the new box is centred on ``grid``'s centre.
    """
    if n < 1:
        raise RgsInputError(f"grid size must be a positive number of voxels, got {n}")
    size = grid.size_mm
    spacing = float(size.max()) / n
    shape = [max(1, math.ceil(s / spacing - 1e-6)) for s in size]
    return VolumeGrid.centred(shape, spacing, grid.centre)


def _box_average(volume: torch.Tensor, grid: VolumeGrid, new_grid: VolumeGrid
                 ) -> tuple[torch.Tensor, VolumeGrid]:
    """Average blocks of ``floor(new / old spacing)`` voxels per axis (anti-aliasing)."""
    factor = [max(1, int(ns / s + 1e-6)) for s, ns in zip(grid.spacing, new_grid.spacing)]
    factor = [min(f, n) for f, n in zip(factor, grid.shape)]
    if factor == [1, 1, 1]:
        return volume, grid
    pooled = F.avg_pool3d(volume[None, None], kernel_size=factor, stride=factor)[0, 0]
    sp = np.asarray(grid.spacing)
    origin = np.asarray(grid.origin) + (np.asarray(factor) - 1) / 2 * sp
    return pooled, VolumeGrid(tuple(pooled.shape), tuple(sp * factor), tuple(origin))


def resample(volume: torch.Tensor, grid: VolumeGrid, new_grid: VolumeGrid) -> torch.Tensor:
    """Resample ``volume`` (``grid.shape``) onto ``new_grid``: float32, ``new_grid.shape``.

    Trilinear interpolation at the world positions of ``new_grid``'s voxel centres; points
    outside ``grid``'s voxel centres blend towards 0 (so resample attenuation, not HU).
    Where ``new_grid`` is at least twice as coarse along an axis, blocks of
    ``floor(ratio)`` voxels are averaged first so fine detail does not alias. Runs on the
    volume's device.
    """
    check_tensor("volume", volume, tuple(grid.shape))
    vol, src = _box_average(volume.to(torch.float32), grid, new_grid)
    dev = vol.device
    coords = []
    for axis in range(3):
        n_new, n_src = new_grid.shape[axis], src.shape[axis]
        world = new_grid.origin[axis] + torch.arange(n_new, dtype=torch.float64) * new_grid.spacing[axis]
        index = (world - src.origin[axis]) / src.spacing[axis]
        # align_corners=False: -1 and +1 are the outer faces of the first and last voxel
        norm = (2.0 * index + 1.0) / n_src - 1.0
        coords.append(norm.to(device=dev, dtype=torch.float32))
    gi, gj, gk = torch.meshgrid(*coords, indexing="ij")
    # grid_sample's last dimension is (W, H, D) = (k, j, i) for an input laid out (D, H, W)
    sample_at = torch.stack([gk, gj, gi], dim=-1)[None]
    out = F.grid_sample(vol[None, None], sample_at, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out[0, 0].contiguous()


def attenuation_volume(hu: torch.Tensor, hu_grid: VolumeGrid, n: int, source: str = "CT",
                       region: VolumeGrid | None = None) -> tuple[torch.Tensor, VolumeGrid]:
    """A CT in Hounsfield units on ``hu_grid`` as attenuation (1/mm) on :func:`fit_grid`'s
    isotropic grid of ``n`` voxels along the longest edge of ``region``'s box (default: the
    CT's box): ``(volume, grid)``, on ``hu``'s device. Raises :class:`RgsInputError` (naming
    ``source``) if no voxel attenuates."""
    grid = fit_grid(region if region is not None else hu_grid, n)
    mu = resample(hu_to_mu(hu), hu_grid, grid)
    if not float(mu.max()) > 0:
        raise RgsInputError(f"{source}: no voxel attenuates (all <= -1000 HU): pass a CT in "
                            "Hounsfield units")
    return mu, grid


def covering_scan(grid: VolumeGrid, views: int, dso: float, dsd: float, det: int) -> Geometry:
    """Full-circle cone-beam scan about ``grid``'s centre whose square detector sees the box.

    ``views`` angles evenly over 360 degrees (:meth:`Geometry.circular`, TIGRE convention:
    orbit about the z axis through the grid's centre), distances ``dso`` / ``dsd`` in mm.

    The box lies inside the cylinder about the rotation axis of radius ``r`` (half the box's
    xy diagonal) and half-height ``h``; seen from a source at ``dso`` its shadow spans
    ``2 r DSD / sqrt(DSO^2 - r^2)`` across and at most ``2 h DSD / (DSO - r)`` along the axis
    (mm). The ``det`` x ``det`` detector of square pixels covers the larger of the two plus 2 %.
    """
    lo, hi = grid.bounds()
    half = (hi - lo) / 2
    r, h = float(np.hypot(half[0], half[1])), float(half[2])
    if dso <= r:
        raise RgsInputError(f"DSO = {dso:g} mm puts the X-ray source inside the volume's "
                            f"{r:.0f} mm radius: increase the source distance (--dso)")
    extent = 2 * max(r * dsd / math.sqrt(dso ** 2 - r ** 2), h * dsd / (dso - r))
    angles = np.arange(views) * (2 * math.pi / views)
    return Geometry.circular(angles, dso, dsd, (det, det), COVER_MARGIN * extent / det,
                             isocentre=grid.centre)
