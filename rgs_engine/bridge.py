"""Shared plumbing between torch tensors and Taichi kernels.

Kernels take ``ti.types.ndarray()`` arguments; Taichi uses a contiguous CUDA tensor in place
when it runs on CUDA, but silently copies a tensor from the other device, re-allocates a
``.grad`` for tensors that require grad, and rejects non-contiguous ones. Every tensor that
crosses into a kernel therefore goes through :func:`kernel_input`, and every kernel output is
allocated with :func:`kernel_output` on the runtime device.
"""
from __future__ import annotations

import torch

from . import runtime
from .errors import check_tensor


def kernel_input(name: str, x: torch.Tensor, dtype: torch.dtype = torch.float32,
                 shape=None, finite: bool = True) -> torch.Tensor:
    """Check ``x`` and return a detached, contiguous tensor of ``dtype`` on the runtime device.

    ``x`` must already be on the runtime device (no hidden host/device copies); its dtype
    may be any floating type and is converted (e.g. float64 tests run the float32 kernels).
    """
    dev = runtime.ensure()
    check_tensor(name, x, shape=shape, device=dev, finite=finite)
    return x.detach().to(dtype).contiguous()


def kernel_output(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A zero-filled output buffer on the runtime device."""
    return torch.zeros(*shape, dtype=dtype, device=runtime.ensure())


def grad_input(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Upstream gradient as a contiguous float32 tensor (zeros when autograd passes None)."""
    if g is None:
        return torch.zeros_like(like, dtype=torch.float32)
    return g.detach().to(torch.float32).contiguous()
