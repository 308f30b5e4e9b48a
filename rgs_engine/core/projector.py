"""Dense volume projector (DRR) and its exact adjoint, both differentiable through autograd.

* :func:`project` ``(volume (nx, ny, nz) in 1/mm, grid, geometry) -> (V, H, W)`` unitless
  line integrals along every pixel's ray (cone: from the source through the pixel centre,
  only beyond the source; parallel: the whole line through the pixel centre).
* :func:`backproject` ``(projections (V, H, W), grid, geometry) -> (nx, ny, nz)`` is the exact
  transpose ``A^T`` of :func:`project` (same samples, same weights in mm), so
  ``<A x, y> = <x, A^T y>`` holds to float32 rounding.

Each is the other's backward, so double backward works too. Inputs may be float32 or
float64 on the runtime device; outputs are float32. Sampling is Joseph's method, computed by
the Taichi kernels of :mod:`rgs_engine.kernels.projector` (all views in one launch).
"""
from __future__ import annotations

import math

import torch

from . import bridge, runtime
from .errors import RgsInputError, check_tensor
from .geometry import Geometry, VolumeGrid
from ..kernels import projector as kern

_INDEX_LIMIT = 2**31  # int32 indices in the kernels


def check_problem(grid: VolumeGrid, geometry: Geometry) -> None:
    """Validate the grid/geometry pair (types, index limits, no source inside the volume)."""
    if not isinstance(grid, VolumeGrid):
        raise RgsInputError(f"grid must be a VolumeGrid, got {type(grid).__name__}")
    if not isinstance(geometry, Geometry):
        raise RgsInputError(f"geometry must be a Geometry, got {type(geometry).__name__}")
    geometry.check_against(grid)
    rays = geometry.num_views * geometry.det_shape[0] * geometry.det_shape[1]
    if math.prod(grid.shape) >= _INDEX_LIMIT or rays >= _INDEX_LIMIT:
        raise RgsInputError(f"volume {grid.shape} or projections of {rays} pixels exceed 2^31 "
                            "elements: split the volume or the views")


def check_input(name: str, x: torch.Tensor, shape) -> torch.Tensor:
    """Validate a float32/float64 input of ``shape`` on the runtime device (finite values)."""
    check_tensor(name, x, shape=shape, device=runtime.ensure())
    if x.dtype not in (torch.float32, torch.float64):
        raise RgsInputError(f"{name} has dtype {x.dtype}, expected float32 or float64")
    return x


def _joseph(x: torch.Tensor, grid: VolumeGrid, geometry: Geometry, adjoint: bool) -> torch.Tensor:
    """Run the kernel on a checked tensor: forward on a volume, adjoint on projections."""
    dev = runtime.ensure()
    src = bridge.as_float32(x)
    if adjoint:
        vol = out = bridge.kernel_output(*grid.shape)
        proj = src
    else:
        vol = src
        proj = out = bridge.kernel_output(geometry.num_views, *geometry.det_shape)
    kern.joseph(vol.view(-1), proj, geometry.kernel_table(dev), *grid.shape, *grid.origin,
                *grid.spacing, geometry.mode == "cone", adjoint)
    return out


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, volume, grid, geometry):
        ctx.grid, ctx.geometry = grid, geometry
        return _joseph(volume, grid, geometry, adjoint=False)

    @staticmethod
    def backward(ctx, grad):
        return _Backproject.apply(grad, ctx.grid, ctx.geometry), None, None


class _Backproject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projections, grid, geometry):
        ctx.grid, ctx.geometry = grid, geometry
        return _joseph(projections, grid, geometry, adjoint=True)

    @staticmethod
    def backward(ctx, grad):
        return _Project.apply(grad, ctx.grid, ctx.geometry), None, None


def project(volume: torch.Tensor, grid: VolumeGrid, geometry: Geometry) -> torch.Tensor:
    """Line integrals of ``volume`` (nx, ny, nz; 1/mm) for every pixel: (V, H, W) float32."""
    check_problem(grid, geometry)
    check_input("volume", volume, grid.shape)
    return _Project.apply(volume, grid, geometry)


def backproject(projections: torch.Tensor, grid: VolumeGrid, geometry: Geometry) -> torch.Tensor:
    """Exact adjoint of :func:`project`: (V, H, W) -> (nx, ny, nz) float32 (projection units x mm)."""
    check_problem(grid, geometry)
    check_input("projections", projections, (geometry.num_views, *geometry.det_shape))
    return _Backproject.apply(projections, grid, geometry)
