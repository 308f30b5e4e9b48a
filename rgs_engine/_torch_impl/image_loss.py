"""Dense float64 PyTorch reference of :func:`rgs_engine.core.losses.image_loss` (tests).

SSIM from a 2-D convolution with the outer product of the Gaussian window (not the separable
banded products of :mod:`rgs_engine.core.metrics`, nor the kernels' two passes), all five
moments computed here; differentiable by torch autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.metrics import K1, K2, gaussian_window, window_size


def image_loss(pred: torch.Tensor, target: torch.Tensor, ssim_weight: float) -> torch.Tensor:
    """``mean |pred - target| + ssim_weight (1 - mean SSIM)`` of (V, H, W) stacks, float64 (0-d);
    SSIM with the 11-pixel Gaussian window (sigma 1.5; smaller and odd for images under 11
    pixels), 'valid' positions, data range 1."""
    a, b = pred.to(torch.float64), target.to(torch.float64)
    w = gaussian_window(window_size(a.shape[-2], a.shape[-1]), a.device, torch.float64)
    window = (w[:, None] * w[None, :])[None, None]

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x[:, None], window)[:, 0]
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = K1 ** 2, K2 ** 2
    ssim = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return (a - b).abs().mean() + ssim_weight * (1 - ssim.mean())
