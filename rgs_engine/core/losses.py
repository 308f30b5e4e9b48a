"""Differentiable training losses (float32, on the runtime device).

* :func:`l1` — mean absolute error.
* :func:`image_loss` — ``L1 + w (1 - SSIM)`` of projection stacks (V, H, W); on a GPU in one
  kernel call forward and one backward (:func:`fused_image_loss`), SSIM as in
  :mod:`rgs_engine.core.metrics` (11x11 Gaussian window, valid region), data range 1: pass
  projections normalised to about [0, 1]; the fixed target's blurred moments may be passed
  precomputed (:func:`~rgs_engine.core.metrics.ssim_moments`).
* :func:`tv_3d` — anisotropic total variation of a volume: the mean absolute difference of
  neighbouring voxels, summed over the three axes.

:func:`log_linear` is the learning-rate schedule both optimisers use.
"""
from __future__ import annotations

import functools
import math

import torch
from torch.autograd.function import once_differentiable

from ..kernels import image_loss as kernels
from . import metrics
from .bridge import as_float32, kernel_input, kernel_scratch
from .errors import RgsInputError


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).abs().mean()


def image_loss(pred: torch.Tensor, target: torch.Tensor, target_moments: torch.Tensor | None = None,
               ssim_weight: float = 0.25) -> torch.Tensor:
    """``mean |pred - target| + ssim_weight (1 - mean SSIM)`` (0-d, ``pred``'s dtype, on the
    device) of (V, H, W) stacks; differentiable in ``pred``. ``target_moments``:
    :func:`~.metrics.ssim_moments` of ``target`` (V, 2, H', W'), computed here when not given.

    On CUDA tensors :func:`fused_image_loss` (the kernels); on CPU tensors torch's operators
    (:func:`l1` and :func:`~.metrics.ssim_per_slice`, whose blurs are banded matrix products),
    which are faster there: 8 views of 128^2, forward + backward, 2.7-4.2 ms against 12-14 ms for the
    kernels on the 2-core CI machine; on an H100 the kernels take 0.58 ms against torch's 1.44
    ms at 8 x 512^2 (``validation/results/image_loss_ab.json``; 0.93 against 1.94 ms on another). Both are compared with the float64 reference
    :func:`rgs_engine._torch_impl.image_loss.image_loss` in ``tests/test_image_loss.py``.
    """
    if ssim_weight <= 0:
        return l1(pred, target)
    if target_moments is None:
        target_moments = metrics.ssim_moments(target)
    if pred.is_cuda:
        return fused_image_loss(pred, target, target_moments, ssim_weight)
    return l1(pred, target) + ssim_weight * (1.0 - metrics.ssim_per_slice(pred, target, 1.0, target_moments).mean())


def fused_image_loss(pred: torch.Tensor, target: torch.Tensor, target_moments: torch.Tensor,
                     ssim_weight: float) -> torch.Tensor:
    """:func:`image_loss` by :mod:`rgs_engine.kernels.image_loss` on the runtime device (any
    backend; the kernels run in float32, float64 inputs are converted as for every kernel).
    Values are not checked (a host sync): a non-finite prediction gives a non-finite loss.
    Trained with in place of torch's operators on this CPU (the README's quick start, 64^3 from 25
    views of 128^2, 500 iterations): 34.29 dB against 34.28 dB."""
    if pred.dim() != 3 or pred.shape != target.shape or pred.numel() == 0:
        raise RgsInputError(f"image loss: prediction {tuple(pred.shape)} and target {tuple(target.shape)} "
                            "must be the same non-empty (V, H, W) stack")
    if not (math.isfinite(ssim_weight) and ssim_weight >= 0):
        raise RgsInputError(f"image loss: the SSIM weight must be finite and >= 0, got {ssim_weight}")
    size = metrics.window_size(*pred.shape[1:])
    expected = (pred.shape[0], 2, pred.shape[1] - size + 1, pred.shape[2] - size + 1)
    if tuple(target_moments.shape) != expected:
        raise RgsInputError(f"image loss: target moments {tuple(target_moments.shape)}, expected {expected} "
                            "(metrics.ssim_moments of the target)")
    return _ImageLoss.apply(pred, target, target_moments, float(ssim_weight))


@functools.lru_cache(maxsize=8)
def _window(size: int, device: torch.device) -> torch.Tensor:
    """SSIM's float32 window on ``device`` (cached: the same for every step)."""
    return metrics.gaussian_window(size, device, torch.float64).to(torch.float32).contiguous()


@functools.lru_cache(maxsize=8)
def _sum_weights(views: int, height: int, width: int, size: int, ssim_weight: float,
                 device: torch.device) -> torch.Tensor:
    """The weights that turn :func:`~rgs_engine.kernels.image_loss.forward`'s block sums and
    trailing 1 into ``mean |a - b| + w (1 - mean SSIM)`` by one dot product (cached: the same
    at every step)."""
    valid_h, valid_w = height - size + 1, width - size + 1
    n1 = views * -(-height // kernels.ROWS) * width
    n2 = views * -(-valid_h // kernels.ROWS) * valid_w
    with torch.inference_mode(False):  # usable outside inference mode when first made inside it
        weights = torch.empty(n1 + n2 + 1, dtype=torch.float64)
        weights[:n1] = 1.0 / (views * height * width)
        weights[n1:n1 + n2] = -ssim_weight / (views * valid_h * valid_w)
        weights[-1] = ssim_weight
        return weights.to(device=device, dtype=torch.float32)


class _ImageLoss(torch.autograd.Function):
    """Autograd bridge of :mod:`rgs_engine.kernels.image_loss` (``pred``'s dtype is kept; the
    gradient w.r.t. ``pred`` only, first order)."""

    @staticmethod
    def forward(ctx, pred: torch.Tensor, target: torch.Tensor, moments: torch.Tensor,
                ssim_weight: float) -> torch.Tensor:
        a = kernel_input("prediction", pred)
        b = kernel_input("target", target)
        mb = kernel_input("target moments", moments)
        views, height, width = a.shape
        win = _window(metrics.window_size(height, width), a.device)
        valid_h, valid_w = height - win.numel() + 1, width - win.numel() + 1
        partials = kernel_scratch(views, 3, valid_h, valid_w)
        weights = _sum_weights(views, height, width, win.numel(), ssim_weight, a.device)
        sums = kernel_scratch(weights.numel())
        kernels.forward(a, b, mb, win, kernel_scratch(views, 3, height, valid_w), partials, sums,
                        metrics.K1 ** 2, metrics.K2 ** 2, win.numel())
        loss = torch.dot(sums, weights)
        ctx.save_for_backward(a, b, win, partials)  # in-place changes before backward are caught
        ctx.ssim_weight, ctx.dtype = ssim_weight, pred.dtype
        return loss.to(pred.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        a, b, win, partials = ctx.saved_tensors
        views, height, width = a.shape
        valid_h, valid_w = partials.shape[2:]
        out = kernel_scratch(views, height, width)
        kernels.backward(a, b, win, partials, as_float32(grad).reshape(1),
                         kernel_scratch(views, 3, height, valid_w), out, 1.0 / (views * height * width),
                         -ctx.ssim_weight / (views * valid_h * valid_w), win.numel())
        return out.to(ctx.dtype), None, None, None


def tv_3d(volume: torch.Tensor) -> torch.Tensor:
    return sum((volume.diff(dim=axis)).abs().mean() for axis in range(3))


def log_linear(rates: tuple[float, float], frac: float) -> float:
    """Log-linear interpolation from ``rates[0]`` (frac 0) to ``rates[1]`` (frac 1)."""
    start, end = rates
    return math.exp(math.log(start) * (1 - frac) + math.log(end) * frac)
