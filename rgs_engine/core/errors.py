"""Input checking shared by every public entry point.

All user-facing problems raise :class:`RgsInputError` (a ``ValueError``) with a one-line
message that names the problem and the fix; the CLI turns it into exit code 2.
"""
from __future__ import annotations

from typing import Sequence

import torch


class RgsInputError(ValueError):
    """Bad input: wrong shape, dtype, device, non-finite values or inconsistent geometry."""


def diverged(what: str, iteration: int) -> RgsInputError:
    """The error of a training loop whose ``what`` (e.g. "the loss is nan") went non-finite
    at ``iteration``."""
    return RgsInputError(f"the training diverged: {what} at iteration {iteration}; check the "
                         "projections for NaN or extreme values, or lower the learning rates "
                         "(e.g. --set rate_scale=0.5)")


class RgsDeviceError(RuntimeError):
    """The requested compute device is not available (e.g. CUDA asked for, none present)."""


def check_tensor(
    name: str,
    x: object,
    shape: Sequence[int | None] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    finite: bool = True,
) -> torch.Tensor:
    """Validate ``x`` and return it; ``None`` entries in ``shape`` match any size."""
    if not isinstance(x, torch.Tensor):
        raise RgsInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if shape is not None:
        ok = x.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, x.shape))
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise RgsInputError(f"{name} has shape {tuple(x.shape)}, expected {want}")
    if dtype is not None and x.dtype != dtype:
        raise RgsInputError(f"{name} has dtype {x.dtype}, expected {dtype} (convert with .to({dtype}))")
    if device is not None and x.device.type != device.type:
        raise RgsInputError(
            f"{name} is on {x.device}, but the engine runs on {device}: move it with .to('{device}')"
        )
    if finite and x.numel() > 0 and x.dtype.is_floating_point:
        if not bool(torch.isfinite(x.detach()).all()):
            raise RgsInputError(f"{name} contains NaN or Inf values: clean the input before calling")
    return x
