"""Shared plumbing between torch tensors and Taichi kernels.

Kernels take ``ti.types.ndarray()`` arguments; Taichi uses a contiguous CUDA tensor in place
when it runs on CUDA, but silently copies a tensor from the other device, re-allocates a
``.grad`` for tensors that require grad, and rejects non-contiguous ones. Every tensor that
crosses into a kernel therefore goes through :func:`kernel_input` (or :func:`as_float32`, for
tensors already checked or made on the runtime device, such as upstream gradients), and every
kernel output is allocated with :func:`kernel_output` on the runtime device.
"""
from __future__ import annotations

import torch

from . import runtime
from .errors import check_tensor


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` detached, contiguous and float32 (no copy when it already is; ``x`` itself when
    it also needs no gradient: a registration step passes a dozen such tensors)."""
    if x.dtype == torch.float32 and not x.requires_grad and x.is_contiguous():
        return x
    return x.detach().to(torch.float32).contiguous()


def kernel_input(name: str, x: torch.Tensor) -> torch.Tensor:
    """Check that ``x`` is on the runtime device; return it through :func:`as_float32`.

    ``x`` must already be on the runtime device (no hidden host/device copies); its dtype
    may be any floating type and is converted (e.g. float64 tests run the float32 kernels).
    Values are not read here: callers check them first (:func:`~rgs_engine.core.gaussians.check_params`
    does all value checks in one host sync).
    """
    check_tensor(name, x, device=runtime.ensure(), finite=False)
    return as_float32(x)


def kernel_output(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A zero-filled output buffer on the runtime device."""
    return torch.zeros(*shape, dtype=dtype, device=runtime.ensure())


def kernel_scratch(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised output buffer on the runtime device, for a kernel that writes every
    element (one fill launch fewer than :func:`kernel_output`)."""
    return torch.empty(*shape, dtype=dtype, device=runtime.ensure())
