"""Order statistics of tensors of any size.

``torch.quantile`` refuses inputs of more than 2^24 elements ("input tensor is too large"):
a 257^3 grid, a voxelised field or the positive voxels of a large CT exceed it. :func:`quantile`
gives the same values (linear interpolation between order statistics) at any size.
"""
from __future__ import annotations

from typing import Sequence

import torch

TORCH_QUANTILE_LIMIT = 1 << 24  # the most elements torch.quantile accepts


def quantile(values: torch.Tensor, q: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """The ``q``-quantile(s) of all elements of ``values`` (floating point, any shape and
    size), as ``torch.quantile(values.reshape(-1), q)``: a 0-d tensor for a scalar ``q``, else
    one value per entry of ``q`` (each in [0, 1]), on ``values``' device and dtype."""
    flat = values.reshape(-1)
    qs = torch.as_tensor(q, dtype=flat.dtype, device=flat.device)
    if flat.numel() <= TORCH_QUANTILE_LIMIT:
        return torch.quantile(flat, qs)
    ordered = flat.sort().values
    pos = qs * (flat.numel() - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(flat.numel() - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
