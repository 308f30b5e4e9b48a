"""Slow float64 PyTorch reference of :func:`rgs_engine.fdk.fdk` (tests, benchmarks).

Reuses the orbit recognition, angular weights and filtering of :mod:`rgs_engine.fdk`; the
backprojection is independent of the kernel: one view at a time, every voxel centre is
projected by intersecting its ray with the detector plane and solving for the (column, row)
coordinates in the (u, v) basis, and the FDK weight uses the voxel's depth along the central
ray directly.
"""
from __future__ import annotations

import torch

from ..recon.fdk import circular_orbit, filter_projections, view_scales
from ..core.geometry import Geometry, VolumeGrid
from .projector import interp2


def fdk(projections: torch.Tensor, geometry: Geometry, grid: VolumeGrid,
        filter: str = "ramp") -> torch.Tensor:
    """(nx, ny, nz) float64 FDK / FBP reconstruction (1/mm) of (V, H, W) line integrals."""
    orbit = circular_orbit(geometry)
    q = filter_projections(projections, geometry, orbit, filter)
    dev = q.device
    scales = view_scales(orbit).to(dev)
    vec = geometry.vectors.to(dev)
    height, width = geometry.det_shape
    x = grid.voxel_centres(torch.float64, dev).reshape(-1, 3)
    out = torch.zeros(x.shape[0], dtype=torch.float64, device=dev)
    for k in range(geometry.num_views):
        first, d, u, v = vec[k, 0:3], vec[k, 3:6], vec[k, 6:9], vec[k, 9:12]
        normal = torch.linalg.cross(u, v)
        weight = scales[k]
        if geometry.mode == "cone":
            ray = x - first
            hit = first + ((d - first) @ normal / (ray @ normal))[:, None] * ray
            central = normal * torch.sign((d - first) @ normal) / normal.norm()
            dso = float(orbit.dsd[k] / orbit.magnification[k])
            weight = weight * (dso / (ray @ central)) ** 2
        else:
            hit = x + (((d - x) @ normal) / (first @ normal))[:, None] * first
        gram = torch.stack([torch.stack([u @ u, u @ v]), torch.stack([u @ v, v @ v])])
        coef = torch.linalg.solve(gram, torch.stack([(hit - d) @ u, (hit - d) @ v]))
        col = coef[0] + (width - 1) / 2
        row = coef[1] + (height - 1) / 2
        out = out + weight * interp2(q, torch.tensor([k], device=dev), row, col)
    return out.reshape(grid.shape)
