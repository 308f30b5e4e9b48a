"""Voxelise radiative Gaussians onto a :class:`~rgs_engine.core.geometry.VolumeGrid`, differentiably.

``voxelize`` evaluates ``mu(x) = sum_i rho_i exp(-1/2 m_i(x))`` (1/mm) at every voxel centre,
counting Gaussian ``i`` only where its Mahalanobis distance ``m_i <= cutoff^2`` (3 sigma by
default). Gradients w.r.t. means, scales, quaternions and densities come from hand-written
adjoint kernels (:mod:`rgs_engine.kernels.voxelize` documents the design); the dense float64
reference is :mod:`rgs_engine._torch_impl.voxelize`.
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from . import bridge
from .errors import RgsInputError
from .gaussians import check_params
from .geometry import VolumeGrid
from ..kernels import voxelize as kernels


def voxelize(means: torch.Tensor, scales: torch.Tensor, quats: torch.Tensor,
             densities: torch.Tensor, grid: VolumeGrid, cutoff: float = 3.0,
             validate: bool = True) -> torch.Tensor:
    """Attenuation of N Gaussians at the voxel centres of ``grid``: (nx, ny, nz) float32, 1/mm.

    ``means`` (N, 3) mm, ``scales`` (N, 3) mm (> 0), ``quats`` (N, 4) (w, x, y, z), any
    non-zero norm, ``densities`` (N,) 1/mm; float32 or float64 on the runtime device.
    ``cutoff`` is in standard deviations. Any grid works, e.g. ``grid.sub_grid(...)``; the
    cost is one pass over the Gaussians plus the voxels inside their cutoff boxes. Gradients
    come back in the inputs' dtype. ``validate``: check the parameters' values (as
    :func:`~rgs_engine.core.splatting.splat`'s: one host sync); ``False`` is for training
    loops that watch their loss for non-finite values instead (shapes are checked anyway).
    """
    check_params(means, scales, quats, densities, values=validate)
    if not isinstance(grid, VolumeGrid):
        raise RgsInputError(f"grid must be a VolumeGrid, got {type(grid).__name__}")
    if not (isinstance(cutoff, (int, float)) and math.isfinite(cutoff) and cutoff > 0):
        raise RgsInputError(f"cutoff must be a positive number of standard deviations, got {cutoff!r}")
    return _Voxelize.apply(means, scales, quats, densities, grid, float(cutoff))


def _splat_lanes(device: torch.device) -> int:
    """Threads per chunk in the forward kernel: one warp on CUDA, one thread on the CPU."""
    return 32 if device.type == "cuda" else 1


class _Voxelize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, scales, quats, densities, grid: VolumeGrid, cutoff: float):
        p = bridge.kernel_input("means", means)
        s = bridge.kernel_input("scales", scales)
        q = bridge.kernel_input("quats", quats)
        rho = bridge.kernel_input("densities", densities)
        n, dev, cutoff2 = p.shape[0], p.device, cutoff * cutoff
        volume = bridge.kernel_output(*grid.shape)
        # prepare() writes every entry of these: no zero fill needed
        params = torch.empty(n, kernels.NPARAM, dtype=torch.float32, device=dev)
        ibox = torch.empty(n, 6, dtype=torch.int32, device=dev)
        counts = torch.empty(n, dtype=torch.int32, device=dev)
        if n:
            kernels.prepare(p, s, q, rho, grid.origin, grid.spacing, grid.shape, cutoff,
                            params, ibox, counts)
        ends = torch.cumsum(counts, 0)  # int64 inclusive chunk ends
        if n:
            kernels.splat(params, ibox, ends, grid.spacing, cutoff2, volume,
                          kernels.CHUNKS_PER_PASS, _splat_lanes(dev))
        ctx.save_for_backward(s, q, rho, params, ibox, ends)
        ctx.spacing, ctx.cutoff2, ctx.dtype = grid.spacing, cutoff2, means.dtype
        return volume

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_volume):
        s, q, rho, params, ibox, ends = ctx.saved_tensors
        n, dev = s.shape[0], s.device
        g_vol = bridge.as_float32(grad_volume)  # autograd materialises zeros
        moments = bridge.kernel_output(n, kernels.NMOMENT)
        # moments_to_grads() writes every entry of these
        grads = tuple(torch.empty(n, *tail, dtype=torch.float32, device=dev)
                      for tail in ((3,), (3,), (4,), ()))
        if n:
            kernels.gather_moments(params, ibox, ends, ctx.spacing, ctx.cutoff2, g_vol,
                                   moments, kernels.CHUNKS_PER_PASS)
            kernels.moments_to_grads(s, q, rho, moments, *grads)
        return (*(g.to(ctx.dtype) for g in grads), None, None)
