"""Float64 dense references for X-ray splatting (slow; tests and benchmarks only).

* :func:`splat` — the same local-affine model as the kernels (same cutoff), evaluated for
  every (view, pixel, Gaussian) triple with torch ops; differentiable by autograd.
* :func:`line_integrals_exact` — the exact line integral of each Gaussian along every pixel
  ray (closed form, no affine approximation, no cutoff).
* :func:`line_integrals_raymarch` — a dense numerical ray-march of the attenuation field.
"""
from __future__ import annotations

import math

import torch

from ..core.gaussians import inverse_covariance, quat_to_rotmat
from ..core.geometry import Geometry


def _detector_params(means, scales, quats, densities, geometry: Geometry):
    """Per (view, Gaussian): projected centre (V,N,2), detector covariance (V,N,2,2), amp (V,N)."""
    rows = geometry.projection_rows().to(means)
    vec = geometry.vectors.to(means)
    pc, pr, pn = rows[:, None, 0:3], rows[:, None, 3:6], rows[:, None, 6:9]
    if geometry.mode == "cone":
        t = means[None] - vec[:, None, 0:3]
        nt = (pn * t).sum(-1, keepdim=True)
        c = (pc * t).sum(-1, keepdim=True) / nt
        r = (pr * t).sum(-1, keepdim=True) / nt
        j0, j1 = (pc - c * pn) / nt, (pr - r * pn) / nt
        j2 = t / t.norm(dim=-1, keepdim=True)
        visible = nt[..., 0] > 1e-4
    else:
        c = (pc * means[None]).sum(-1, keepdim=True) + rows[:, None, 9:10]
        r = (pr * means[None]).sum(-1, keepdim=True) + rows[:, None, 10:11]
        ray = vec[:, None, 0:3] / vec[:, None, 0:3].norm(dim=-1, keepdim=True)
        n = means.shape[0]
        j0, j1, j2 = pc.expand(-1, n, -1), pr.expand(-1, n, -1), ray.expand(-1, n, -1)
        visible = torch.ones(c.shape[:2], dtype=torch.bool, device=means.device)
    jac = torch.stack([j0, j1, j2], dim=-2)  # (V, N, 3, 3)
    m = quat_to_rotmat(quats) * scales[:, None, :]
    tm = jac @ m[None]
    cov_ray = tm @ tm.transpose(-1, -2)
    cov_det = cov_ray[..., :2, :2]
    amp = densities * torch.sqrt(2 * math.pi * torch.linalg.det(cov_ray) / torch.linalg.det(cov_det))
    amp = torch.where(visible, amp, torch.zeros_like(amp))
    return torch.cat([c, r], -1), cov_det, amp


def splat(means, scales, quats, densities, geometry: Geometry, cutoff: float = 3.0) -> torch.Tensor:
    """(V, H, W) local-affine splat of N Gaussians, float64, dense over all pixels; per-view
    geometry (V, N, k) and/or densities (V, N) render view by view."""
    if means.dim() == 3 or densities.dim() == 2:
        def pick(t, per_view_dim, v):
            return t[v] if t.dim() == per_view_dim else t
        return torch.cat([splat(pick(means, 3, v), pick(scales, 3, v), pick(quats, 3, v),
                                pick(densities, 2, v), geometry.subset([v]), cutoff)
                          for v in range(geometry.num_views)])
    means, scales, quats, densities = (t.to(torch.float64) for t in (means, scales, quats, densities))
    centre, cov_det, amp = _detector_params(means, scales, quats, densities, geometry)
    h, w = geometry.det_shape
    rr, cc = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=means.device),
                            torch.arange(w, dtype=torch.float64, device=means.device), indexing="ij")
    pix = torch.stack([cc, rr], -1)  # (H, W, 2) as (column, row)
    d = pix[None, :, :, None, :] - centre[:, None, None, :, :]  # (V, H, W, N, 2)
    conic = torch.linalg.inv(cov_det)[:, None, None]  # (V, 1, 1, N, 2, 2)
    q = (d[..., None, :] @ conic @ d[..., :, None])[..., 0, 0]
    val = amp[:, None, None, :] * torch.exp(-0.5 * q) * (q <= cutoff * cutoff)
    return val.sum(-1)


def line_integrals_exact(means, scales, quats, densities, geometry: Geometry) -> torch.Tensor:
    """(V, H, W) exact integrals of the field along each pixel's full ray line, float64."""
    means, scales, quats, densities = (t.to(torch.float64) for t in (means, scales, quats, densities))
    start, dirs = (x.to(means.device) for x in geometry.rays())
    prec = inverse_covariance(scales, quats)  # (N, 3, 3)
    o = start[..., None, :] - means  # (V, H, W, N, 3)
    pr = torch.einsum("nij,vhwj->vhwni", prec, dirs)
    a = (pr * dirs[..., None, :]).sum(-1)
    b = (pr * o).sum(-1)
    c = torch.einsum("vhwni,nij,vhwnj->vhwn", o, prec, o)
    val = densities * torch.sqrt(2 * math.pi / a) * torch.exp(-0.5 * (c - b * b / a))
    return val.sum(-1)


def line_integrals_raymarch(means, scales, quats, densities, geometry: Geometry,
                            t_near: float, t_far: float, steps: int = 4096) -> torch.Tensor:
    """(V, H, W) midpoint-rule march of the field from ``t_near`` to ``t_far`` mm along each ray."""
    means, scales, quats, densities = (t.to(torch.float64) for t in (means, scales, quats, densities))
    start, dirs = (x.to(means.device) for x in geometry.rays())
    prec = inverse_covariance(scales, quats)
    dt = (t_far - t_near) / steps
    total = torch.zeros(start.shape[:-1], dtype=torch.float64, device=means.device)
    for k in range(steps):
        x = start + (t_near + (k + 0.5) * dt) * dirs
        o = x[..., None, :] - means
        qf = torch.einsum("vhwni,nij,vhwnj->vhwn", o, prec, o)
        total += (densities * torch.exp(-0.5 * qf)).sum(-1) * dt
    return total
