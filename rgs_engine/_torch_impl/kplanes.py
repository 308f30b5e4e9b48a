"""Float64 PyTorch reference of one K-planes level's features (tests, benchmarks): the
spatial planes through ``grid_sample``, the time rows through linear interpolation by
``grid_sample`` too (one column of rows per axis); differentiable by torch autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.kplanes import SPATIAL_AXES


def level_features(points: torch.Tensor, spatial: torch.Tensor, lines: torch.Tensor) -> torch.Tensor:
    """(B, N, F) features of ``points`` (N, 3) in ``[-1, 1]`` from ``spatial`` (3, R, R, F) and
    ``lines`` (3, B, R, F); see :mod:`rgs_engine.kernels.kplanes`."""
    p, sp, ln = (t.to(torch.float64) for t in (points, spatial.permute(0, 3, 1, 2), lines))
    n = p.shape[0]
    s = 1.0
    for k, (a, b) in enumerate(SPATIAL_AXES):
        grid = p[:, [a, b]].reshape(1, 1, n, 2)
        s = s * F.grid_sample(sp[k:k + 1], grid, align_corners=True, padding_mode="border")[0, :, 0].T  # (N, F)
    t = 1.0
    for k in range(3):
        rows = ln[k].permute(2, 0, 1)[None]  # (1, F, B, R): a B x R image per channel
        views = torch.linspace(-1, 1, ln.shape[1], dtype=torch.float64, device=p.device)
        grid = torch.stack([p[:, k][None, :].expand(ln.shape[1], n), views[:, None].expand(ln.shape[1], n)], -1)[None]
        t = t * F.grid_sample(rows, grid, align_corners=True, padding_mode="border")[0].permute(1, 2, 0)  # (B, N, F)
    return s[None] * t
