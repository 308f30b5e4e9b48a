"""Dense float64 PyTorch reference of :func:`rgs_engine.core.projector.project` (tests, benchmarks).

The same Joseph sampling as the Taichi kernel, written from :meth:`Geometry.rays` (world
start points and unit directions): for every ray and every slice of its dominant index axis,
bilinear interpolation in the two other axes (zero outside the grid), weighted by the ray
length per slice; cone rays keep only the samples beyond the source (``t > 0``).
Differentiable by torch autograd; memory grows as rays x slices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.geometry import Geometry, VolumeGrid


def interp2(planes: torch.Tensor, k: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``planes[k]`` (S, A, B) at index coordinates (y, x), zero outside.

    ``k``, ``y``, ``x`` broadcast together; ``planes`` may require grad.
    """
    a, b = planes.shape[1:]
    padded = F.pad(planes, (1, 2, 1, 2))  # index i of the plane sits at i + 1
    y = y.clamp(-1.0, float(a))
    x = x.clamp(-1.0, float(b))
    y0, x0 = y.floor(), x.floor()
    fy, fx = y - y0, x - x0
    iy, ix = y0.long() + 1, x0.long() + 1
    k = k.expand_as(iy)
    return ((1 - fy) * ((1 - fx) * padded[k, iy, ix] + fx * padded[k, iy, ix + 1])
            + fy * ((1 - fx) * padded[k, iy + 1, ix] + fx * padded[k, iy + 1, ix + 1]))


def project(volume: torch.Tensor, grid: VolumeGrid, geometry: Geometry) -> torch.Tensor:
    """(V, H, W) float64 line integrals of ``volume`` (nx, ny, nz; 1/mm), Joseph sampling."""
    vol = volume.to(torch.float64)
    dev = vol.device
    start, dirs = (t.reshape(-1, 3).to(dev) for t in geometry.rays())
    spacing = torch.tensor(grid.spacing, dtype=torch.float64, device=dev)
    origin = torch.tensor(grid.origin, dtype=torch.float64, device=dev)
    a = (start - origin) / spacing  # index-space ray: a + t b, t in mm along the unit direction
    b = dirs / spacing
    axis = b.abs().argmax(dim=1)  # first maximum: ties go to the lower axis, as in the kernel
    out = torch.zeros(a.shape[0], dtype=torch.float64, device=dev)
    for ax in range(3):
        rows = torch.nonzero(axis == ax).reshape(-1)
        if rows.numel() == 0:
            continue
        p, q = (k for k in range(3) if k != ax)
        ra, rb = a[rows], b[rows]
        m = torch.arange(grid.shape[ax], dtype=torch.float64, device=dev)
        t = (m - ra[:, ax:ax + 1]) / rb[:, ax:ax + 1]  # (R, n_ax) mm
        samples = interp2(vol.permute(ax, p, q), m.long()[None, :],
                          ra[:, p:p + 1] + t * rb[:, p:p + 1], ra[:, q:q + 1] + t * rb[:, q:q + 1])
        if geometry.mode == "cone":
            samples = samples * (t > 0)
        out = out.index_put((rows,), samples.sum(dim=1) / rb[:, ax].abs())
    return out.reshape(geometry.num_views, *geometry.det_shape)
