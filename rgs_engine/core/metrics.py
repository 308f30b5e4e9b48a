"""Image quality metrics for volumes and projection stacks (torch, float64 internally).

* PSNR: ``10 log10(R^2 / MSE)`` with data range ``R = gt.max() - gt.min()``; ``inf`` when
  the images are identical.
* SSIM: the standard 2D SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5),
  ``K1 = 0.01``, ``K2 = 0.03``, data range ``R`` as for PSNR, averaged over the positions
  where the window fits inside the image (no padding). Sides shorter than 11 pixels shrink
  the window to the largest odd size that fits.
* 3D SSIM (the R2-Gaussian protocol): the mean 2D SSIM of all slices along each of the three
  axes, then the mean of the three per-axis values (for cubic volumes this equals the mean
  over all slices).
* 2D metrics of a projection stack (V, H, W): the mean over views of the per-view value, with
  one data range for the whole ground-truth stack.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from .errors import RgsInputError, check_tensor

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03
_CHUNK = 64  # slices per SSIM batch, bounds the memory of the float64 statistics


def _pair(x: torch.Tensor, gt: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    check_tensor("gt", gt)
    check_tensor("x", x, tuple(gt.shape))
    if gt.dim() != dims or gt.numel() == 0:
        raise RgsInputError(f"expected {dims}-D tensors, got shape {tuple(gt.shape)}")
    g = gt.detach().to(torch.float64)
    data_range = float(g.max() - g.min())
    if data_range <= 0:
        raise RgsInputError("ground truth is constant: PSNR/SSIM need a non-zero data range")
    return x.detach().to(device=g.device, dtype=torch.float64), g, data_range


def _psnr(x: torch.Tensor, gt: torch.Tensor, data_range: float) -> float:
    mse = float(((x - gt) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def gaussian_window(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SSIM's 1-D window (size,): a Gaussian of sigma :data:`SIGMA` pixels, summing to 1."""
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    w = torch.exp(-r ** 2 / (2 * SIGMA ** 2))
    return w / w.sum()


@functools.lru_cache(maxsize=16)
def _blur_matrix(n: int, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n, n - size + 1) banded matrix: ``x @ M`` is the 'valid' 1D convolution with the
    Gaussian window of ``size``. Cached (read-only): a training loss asks for the same
    matrices at every step (built outside inference mode, so autograd may use it later)."""
    with torch.inference_mode(False):
        w = gaussian_window(size, device, dtype)
        m = torch.zeros(n, n - size + 1, dtype=dtype, device=device)
        cols = torch.arange(n - size + 1, device=device)
        for j in range(size):
            m[cols + j, cols] = w[j]
    return m


def window_size(height: int, width: int) -> int:
    """SSIM's window size for (height, width) images: :data:`WINDOW`, or the largest odd size
    that fits a smaller side."""
    size = min(WINDOW, height, width)
    return size - (1 - size % 2)


def _ssim_blur(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """SSIM's Gaussian blur for images shaped like ``x`` (..., H, W): a function mapping
    (..., H, W) to the 'valid' region (..., H', W'). The separable blur is two matrix
    products with banded matrices (fast on GPUs and CPUs alike, unlike single-channel
    convolutions)."""
    size = window_size(x.shape[-2], x.shape[-1])
    blur_w = _blur_matrix(x.shape[-1], size, x.device, x.dtype)
    blur_h = _blur_matrix(x.shape[-2], size, x.device, x.dtype)
    return lambda img: blur_h.transpose(0, 1) @ (img @ blur_w)


def ssim_moments(gt: torch.Tensor) -> torch.Tensor:
    """The blurred mean and second moment of a fixed (B, H, W) stack, shape (B, 2, H', W'):
    what :func:`ssim_per_slice` computes of ``gt`` at every call, for a caller that compares
    many predictions with the same ``gt`` (a training loss) and passes it back."""
    blur = _ssim_blur(gt)
    with torch.no_grad():
        return torch.cat([blur(torch.stack([g, g * g], 1)) for g in gt.split(_CHUNK)])


def ssim_per_slice(x: torch.Tensor, gt: torch.Tensor, data_range: float,
                   gt_moments: torch.Tensor | None = None) -> torch.Tensor:
    """Per-slice SSIM of (B, H, W) stacks, shape (B,), in their dtype; differentiable in ``x``.
    ``gt_moments``: :func:`ssim_moments` of ``gt`` (B, 2, H', W'), so that only the three
    blurs that involve ``x`` are computed here instead of five."""
    blur = _ssim_blur(x)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    out = []
    for s in range(0, x.shape[0], _CHUNK):
        a, b = x[s:s + _CHUNK], gt[s:s + _CHUNK]
        if gt_moments is None:
            mu_a, mu_b, ea2, eb2, eab = blur(torch.stack([a, b, a * a, b * b, a * b])).unbind(0)
        else:
            mu_a, ea2, eab = blur(torch.stack([a, a * a, a * b])).unbind(0)
            mu_b, eb2 = gt_moments[s:s + _CHUNK].unbind(1)
        var_a = ea2 - mu_a ** 2
        var_b = eb2 - mu_b ** 2
        cov = eab - mu_a * mu_b
        ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
            (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
        out.append(ssim.mean(dim=(1, 2)))
    return torch.cat(out)


def psnr_3d(x: torch.Tensor, gt: torch.Tensor) -> float:
    """PSNR (dB) of volume ``x`` against ``gt`` (same shape, 3D)."""
    a, g, r = _pair(x, gt, 3)
    return _psnr(a, g, r)


def ssim_3d(x: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean 2D SSIM over the slices along each axis, averaged over the three axes."""
    a, g, r = _pair(x, gt, 3)
    per_axis = [float(ssim_per_slice(a.movedim(axis, 0), g.movedim(axis, 0), r).mean())
                for axis in range(3)]
    return sum(per_axis) / 3


def psnr_2d(x: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean over views of the PSNR (dB) of projection stacks (V, H, W)."""
    a, g, r = _pair(x, gt, 3)
    return sum(_psnr(a[v], g[v], r) for v in range(g.shape[0])) / g.shape[0]


def ssim_2d(x: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean over views of the SSIM of projection stacks (V, H, W)."""
    a, g, r = _pair(x, gt, 3)
    return float(ssim_per_slice(a, g, r).mean())
