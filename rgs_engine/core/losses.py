"""Differentiable training losses (float32, on the runtime device).

* :func:`l1` — mean absolute error.
* :func:`dssim` — ``1 - SSIM`` of projection stacks (V, H, W), SSIM as in
  :mod:`rgs_engine.core.metrics` (11x11 Gaussian window, valid region), data range 1: pass
  projections normalised to about [0, 1]; a fixed target's blurred moments may be passed
  precomputed (:func:`~rgs_engine.core.metrics.ssim_moments`).
* :func:`tv_3d` — anisotropic total variation of a volume: the mean absolute difference of
  neighbouring voxels, summed over the three axes.

:func:`log_linear` is the learning-rate schedule both optimisers use.
"""
from __future__ import annotations

import math

import torch

from .metrics import ssim_per_slice


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).abs().mean()


def dssim(pred: torch.Tensor, target: torch.Tensor,
          target_moments: torch.Tensor | None = None) -> torch.Tensor:
    """``target_moments``: :func:`~.metrics.ssim_moments` of ``target`` (V, 2, H', W'), which
    saves two of SSIM's five blurs (and their share of the backward pass)."""
    return 1.0 - ssim_per_slice(pred, target, 1.0, target_moments).mean()


def tv_3d(volume: torch.Tensor) -> torch.Tensor:
    return sum((volume.diff(dim=axis)).abs().mean() for axis in range(3))


def log_linear(rates: tuple[float, float], frac: float) -> float:
    """Log-linear interpolation from ``rates[0]`` (frac 0) to ``rates[1]`` (frac 1)."""
    start, end = rates
    return math.exp(math.log(start) * (1 - frac) + math.log(end) * frac)
