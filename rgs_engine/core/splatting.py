"""X-ray splatting of radiative Gaussians onto every view of a geometry, differentiable.

``splat(means, scales, quats, densities, geometry)`` returns the line integrals
``(V, H, W)`` of the attenuation field ``sum_i rho_i exp(-1/2 (x - p_i)^T S_i^-1 (x - p_i))``
through each pixel centre, computed by local-affine splatting with the integration-bias
rectification (exact for parallel beams; see :mod:`rgs_engine.kernels.splat_projection`).
Units: means and scales in mm, densities in 1/mm, projections unitless. All views are
rendered by one launch of each kernel; gradients flow to all four parameter tensors.

The views may also each see their own Gaussians: per-view geometry ``(V, N, k)`` (a
deformation evaluated at each view's time) and/or per-view densities ``(V, N)`` (contrast
that changes with time); the launch count and the single host sync stay the same.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from . import runtime
from .bridge import as_float32, kernel_input, kernel_output, kernel_scratch
from .errors import RgsInputError
from .gaussians import check_params
from .geometry import Geometry
from ..kernels import splat_backward, splat_forward, tiling
from ..kernels.splat_projection import NUM_GRADS, NUM_PARAMS

MAX_PAIRS = 2**31 - 1


class _Binning(NamedTuple):
    """Splat parameters and the tile lists of one forward pass (kept for the backward)."""

    params: torch.Tensor
    keys: torch.Tensor
    ids: torch.Tensor
    ranges: torch.Tensor


def _bin(means, scales, quats, densities, n: int, per_view: tuple[bool, bool], table,
         geometry: Geometry, cutoff: float) -> _Binning:
    """Project and tile-bin ``n`` Gaussians per view. ``means``, ``scales``, ``quats`` have
    ``n`` rows, or ``V * n`` when ``per_view[0]``; ``densities`` ``n``, or ``V * n`` when
    ``per_view[1]`` (view ``v``'s set starts at row ``v * n``)."""
    num_v, (height, width) = geometry.num_views, geometry.det_shape
    params = kernel_scratch(num_v, n, NUM_PARAMS)  # project_gaussians writes every entry
    counts = kernel_scratch(num_v, n, dtype=torch.int32)
    cone = geometry.mode == "cone"
    if n:
        splat_forward.project_gaussians(means, scales, quats, densities, table, params, counts,
                                        cone, cutoff, width, height, n * per_view[0], n * per_view[1])
    ends = torch.cumsum(counts.reshape(-1), 0, dtype=torch.int64)
    total = int(ends[-1]) if ends.numel() else 0  # the one host sync of a forward pass
    if total > MAX_PAIRS:
        raise RgsInputError(f"{total} tile pairs exceed the int32 index range: splat fewer "
                            "views per call or prune oversized Gaussians")
    keys = kernel_scratch(max(total, 1), dtype=torch.int32)[:total]  # emit_pairs writes all total
    ids = kernel_scratch(max(total, 1), dtype=torch.int32)[:total]
    if total:
        tiling.emit_pairs(params, counts, ends, keys, ids, width, height)
        keys, order = torch.sort(keys, stable=True)
        ids = ids[order].contiguous()
    tiles = num_v * (-(-height // tiling.TILE)) * (-(-width // tiling.TILE))
    bounds = torch.arange(tiles + 1, dtype=torch.int32, device=keys.device)
    ranges = torch.searchsorted(keys, bounds, out_int32=True)
    return _Binning(params, keys.contiguous(), ids, ranges)


class _Forward(NamedTuple):
    """What :func:`_backward` needs of a forward pass."""

    inputs: tuple  # the kernels' float32 (means, scales, quats, densities), per-view sets flattened
    binning: _Binning
    table: torch.Tensor
    cone: bool
    cutoff: float
    per_view: tuple[bool, bool]


def _forward(means, scales, quats, densities, geometry: Geometry, cutoff: float) -> tuple[torch.Tensor, _Forward]:
    """The float32 image (V, H, W) and what the backward pass needs."""
    dev = runtime.ensure()
    n, per_view = means.shape[-2], (means.dim() == 3, densities.dim() == 2)
    m, s, q = (kernel_input(name, t).reshape(-1, t.shape[-1])  # per-view sets: V * N rows
               for name, t in (("means", means), ("scales", scales), ("quats", quats)))
    d = kernel_input("densities", densities).reshape(-1)
    table = geometry.kernel_table(dev)
    binning = _bin(m, s, q, d, n, per_view, table, geometry, cutoff)
    height, width = geometry.det_shape
    if binning.keys.numel() and dev.type == "cuda":  # render writes every pixel
        image = kernel_scratch(geometry.num_views, height, width)
        splat_forward.render(binning.params, binning.ranges, binning.ids, image, cutoff * cutoff)
    else:  # render_tiles adds into the image
        image = kernel_output(geometry.num_views, height, width)
        if binning.keys.numel():
            splat_forward.render_tiles(binning.params, binning.ranges, binning.ids, image, cutoff * cutoff)
    return image, _Forward((m, s, q, d), binning, table, geometry.mode == "cone", cutoff, per_view)


def _backward(f: _Forward, grad_image: torch.Tensor) -> list[torch.Tensor]:
    """Gradients (float32, the kernels' flattened shapes) of the four inputs of ``f``'s pass."""
    b = f.binning
    num_v, n = b.params.shape[:2]
    if not b.keys.numel():  # nothing reached a pixel
        return [torch.zeros_like(t) for t in f.inputs]
    grads = [torch.empty_like(t) for t in f.inputs]  # gaussian_grads writes every entry
    g2d = kernel_output(num_v, n, NUM_GRADS)
    splat_backward.pair_grads(b.params, b.keys, b.ids, as_float32(grad_image), g2d, f.cutoff * f.cutoff)
    splat_backward.gaussian_grads(*f.inputs, f.table, g2d, *grads, f.cone, *f.per_view)
    return grads


class SplatFunction(torch.autograd.Function):
    """Autograd bridge: forward/backward are the Taichi kernels, not Taichi autodiff."""

    @staticmethod
    def forward(ctx, means, scales, quats, densities, geometry: Geometry, cutoff: float):
        image, state = _forward(means, scales, quats, densities, geometry, cutoff)
        ctx.save_for_backward(*state.inputs)  # autograd's check that they are not changed in place
        ctx.state = state._replace(inputs=None)
        ctx.dtypes = (means.dtype, scales.dtype, quats.dtype, densities.dtype)
        ctx.shapes = (means.shape, scales.shape, quats.shape, densities.shape)
        return image.to(means.dtype) if means.dtype != torch.float32 else image

    @staticmethod
    def backward(ctx, grad_image):
        grads = _backward(ctx.state._replace(inputs=ctx.saved_tensors), grad_image)
        out = [g.reshape(shape).to(dt) for g, shape, dt in zip(grads, ctx.shapes, ctx.dtypes)]
        return (*out, None, None)


def _check(means, scales, quats, densities, geometry, cutoff: float, validate: bool) -> None:
    if not isinstance(geometry, Geometry):
        raise RgsInputError(f"geometry must be an rgs_engine.Geometry, got {type(geometry).__name__}")
    if not cutoff > 0:
        raise RgsInputError(f"cutoff must be positive (standard deviations), got {cutoff}")
    check_params(means, scales, quats, densities, views=geometry.num_views, values=validate)


def splat(means: torch.Tensor, scales: torch.Tensor, quats: torch.Tensor,
          densities: torch.Tensor, geometry: Geometry, cutoff: float = 3.0,
          validate: bool = True) -> torch.Tensor:
    """Line integrals of N Gaussians onto all V views of ``geometry``.

    Args:
        means: (N, 3) centres, mm.  scales: (N, 3) standard deviations, mm, > 0.
        quats: (N, 4) rotations (w, x, y, z), any non-zero norm.  densities: (N,) 1/mm.
            Per view instead: ``means``, ``scales``, ``quats`` together (V, N, 3 / 3 / 4),
            and/or ``densities`` (V, N); view ``v`` then renders entry ``v``.
        geometry: the views (cone or parallel); detector ``(H, W)``.
        cutoff: footprint radius in standard deviations of the detector-plane Gaussian.
        validate: check the parameters' values (:func:`~rgs_engine.core.gaussians.check_params`:
            finite values, positive scales, non-zero quaternions, at the cost of one host
            sync and a dozen small launches; shapes are checked either way). ``False`` is for
            inner loops whose Gaussians were checked once and are only moved since (a rigid
            registration's steps), or that watch their loss for non-finite values instead
            (the training loops of :func:`~rgs_engine.pipelines.common.run_iterations`).

    Returns:
        (V, H, W) projections (unitless line integrals), on the runtime device, in the
        dtype of ``means`` (kernels compute in float32).
    """
    _check(means, scales, quats, densities, geometry, cutoff, validate)
    return SplatFunction.apply(means, scales, quats, densities, geometry, float(cutoff))


def splat_vjp(means: torch.Tensor, scales: torch.Tensor, quats: torch.Tensor, densities: torch.Tensor,
              geometry: Geometry, cutoff: float = 3.0, validate: bool = True
              ) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple[torch.Tensor, ...]]]:
    """:func:`splat` without autograd: ``(image, vjp)``, where ``vjp(grad_image)`` (V, H, W)
    gives the gradients of ``<grad_image, image>`` w.r.t. ``means``, ``scales``, ``quats``,
    ``densities`` (their shapes, float32). For loops that chain their own adjoints (a rigid
    registration's steps) and would otherwise pay for an autograd graph per step. The image
    is float32, arguments and units as :func:`splat`'s."""
    _check(means, scales, quats, densities, geometry, cutoff, validate)
    image, state = _forward(means, scales, quats, densities, geometry, float(cutoff))
    shapes = (means.shape, scales.shape, quats.shape, densities.shape)

    def vjp(grad_image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(g.reshape(shape) for g, shape in zip(_backward(state, grad_image), shapes))

    return image, vjp
