"""K-planes features by the kernels of :mod:`rgs_engine.kernels.kplanes` (autograd bridge).

:func:`features` takes each level's three spatial planes stacked channels last (3, R, R, F) and its three
time planes already interpolated to the batch's times (3, B, R, F, torch operators: small), and
returns the concatenated (B, N, F x levels) features in one buffer, one kernel call per level
forward and one backward. It replaces, per level, three ``grid_sample`` calls, three
time-plane samplings and the products of (B, N, F) tensors, whose many full-size temporaries
and launches made the model most of a 4D step.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..core.bridge import as_float32, kernel_input, kernel_output, kernel_scratch
from ..core.errors import RgsInputError
from ..kernels import kplanes as kernels


def features(points: torch.Tensor, levels: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(B, N, F x L) features of ``points`` (N, 3) in box coordinates, in ``points``' dtype, from
    ``levels``: per level ``(spatial (3, R, R, F), lines (3, B, R, F))``; differentiable in
    all of them. Values are not checked (a host sync; a NaN point gives NaN features)."""
    if points.dim() != 2 or points.shape[1] != 3:
        raise RgsInputError(f"K-planes points must be (N, 3), got {tuple(points.shape)}")
    if not levels:
        raise RgsInputError("K-planes features need at least one level")
    views = levels[0][1].shape[1]
    for spatial, lines in levels:
        size, channels = spatial.shape[1], spatial.shape[-1]
        if (spatial.shape != (3, size, size, channels) or lines.shape != (3, views, size, channels)
                or size < 2 or views < 1):
            raise RgsInputError(f"K-planes level: spatial {tuple(spatial.shape)} and lines {tuple(lines.shape)} "
                                f"must be (3, R, R, F) and (3, {views}, R, F), R >= 2, B >= 1")
    total = sum(spatial.shape[-1] for spatial, _ in levels)
    if views * points.shape[0] * total >= 2 ** 31:
        raise RgsInputError(f"K-planes features of {points.shape[0]} points at {views} times: more than 2^31 "
                            "values (the kernels index in int32); use fewer points or times per batch")
    if points.shape[0] == 0:  # nothing to launch; zero gradients for every input
        return points.new_zeros(views, 0, total) + 0 * sum(t.sum() for t in (points, *(t for lv in levels for t in lv)))
    return _Features.apply(points, *(t for level in levels for t in level))


class _Features(torch.autograd.Function):
    @staticmethod
    def forward(ctx, points: torch.Tensor, *level_tensors: torch.Tensor) -> torch.Tensor:
        p = kernel_input("K-planes points", points)
        tensors = [kernel_input("K-planes planes", t) for t in level_tensors]
        views = tensors[1].shape[1]
        total = sum(t.shape[-1] for t in tensors[0::2])
        out = kernel_scratch(views, p.shape[0], total)
        offset = 0
        for spatial, lines in zip(tensors[0::2], tensors[1::2]):
            kernels.forward(p, spatial, lines, out, offset)
            offset += spatial.shape[-1]
        ctx.save_for_backward(p, *tensors)
        ctx.dtypes = [t.dtype for t in (points, *level_tensors)]
        return out.to(points.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        p, *tensors = ctx.saved_tensors
        g = as_float32(grad)
        shares = kernel_scratch(p.shape[0], g.shape[2], 3)  # (N, F x L, 3): each channel's share
        grads, offset = [], 0
        for spatial, lines in zip(tensors[0::2], tensors[1::2]):
            grad_spatial, grad_lines = kernel_output(*spatial.shape), kernel_output(*lines.shape)
            kernels.backward(p, spatial, lines, g, offset, grad_spatial, grad_lines, shares)
            grads += [grad_spatial, grad_lines]
            offset += spatial.shape[-1]
        return tuple(t.to(dtype) for t, dtype in zip([shares.sum(1), *grads], ctx.dtypes))
