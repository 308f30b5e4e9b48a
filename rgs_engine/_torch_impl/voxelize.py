"""Dense float64 PyTorch reference of :func:`rgs_engine.voxelize.voxelize` (tests, benchmarks).

Evaluates every Gaussian at every voxel centre with the same cutoff rule (``m <= cutoff^2``);
differentiable by torch autograd. Memory and time grow as voxels x Gaussians.
"""
from __future__ import annotations

import torch

from ..core.gaussians import inverse_covariance
from ..core.geometry import VolumeGrid

_BATCH_ELEMENTS = 1 << 22  # voxel x Gaussian pairs evaluated at once


def voxelize(means: torch.Tensor, scales: torch.Tensor, quats: torch.Tensor,
             densities: torch.Tensor, grid: VolumeGrid, cutoff: float = 3.0) -> torch.Tensor:
    """(nx, ny, nz) float64 attenuation (1/mm) of N Gaussians at the voxel centres of ``grid``.

    ``means`` (N, 3) mm, ``scales`` (N, 3) mm, ``quats`` (N, 4) (w, x, y, z), ``densities``
    (N,) 1/mm; ``cutoff`` in standard deviations.
    """
    p, s, q, rho = (t.to(torch.float64) for t in (means, scales, quats, densities))
    x = grid.voxel_centres(torch.float64, p.device).reshape(-1, 1, 3)
    prec = inverse_covariance(s, q)
    out = torch.zeros(x.shape[0], dtype=torch.float64, device=p.device)
    step = max(1, _BATCH_ELEMENTS // x.shape[0])
    for b in range(0, p.shape[0], step):
        d = x - p[b:b + step]
        m = torch.einsum("vbi,bij,vbj->vb", d, prec[b:b + step], d)
        g = torch.where(m <= cutoff * cutoff, torch.exp(-0.5 * m), torch.zeros_like(m))
        out = out + g @ rho[b:b + step]
    return out.reshape(grid.shape)
