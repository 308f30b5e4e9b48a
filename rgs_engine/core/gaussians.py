"""Radiative Gaussians as plain tensors, their activations and covariance helpers.

Physical parameters (what the kernels take), for ``N`` Gaussians:

* ``means``     (N, 3) centres in world mm;
* ``scales``    (N, 3) standard deviations along the Gaussian's own axes, mm;
* ``quats``     (N, 4) rotations as quaternions ``(w, x, y, z)``; kernels normalise them;
* ``densities`` (N,)   peak attenuation, 1/mm.

The attenuation field is ``mu(x) = sum_i rho_i exp(-1/2 (x - p_i)^T S_i^-1 (x - p_i))`` with
``S_i = R_i diag(s_i)^2 R_i^T``.

:class:`Gaussians` holds the raw (unconstrained) tensors an optimiser updates and applies
the activations: scales through a sigmoid bounded to ``[scale_min, scale_max]`` mm,
quaternions normalised, densities through softplus.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import RgsInputError, check_tensor


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """(N, 4) quaternions (w, x, y, z), any norm > 0 -> (N, 3, 3) rotation matrices."""
    q = quats / quats.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(*q.shape[:-1], 3, 3)


def covariance(scales: torch.Tensor, quats: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) covariances ``R diag(s)^2 R^T`` in mm^2."""
    m = quat_to_rotmat(quats) * scales[..., None, :]
    return m @ m.transpose(-1, -2)


def inverse_covariance(scales: torch.Tensor, quats: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) precision matrices ``R diag(1/s)^2 R^T`` in 1/mm^2."""
    m = quat_to_rotmat(quats) / scales[..., None, :]
    return m @ m.transpose(-1, -2)


def check_params(means, scales, quats, densities, views: int | None = None, values: bool = True) -> int:
    """Validate physical Gaussian parameters; return N.

    With ``views`` (splatting), the geometry may instead be one set per view (``means`` and
    ``scales`` (views, N, 3), ``quats`` (views, N, 4)) and so may the densities (views, N).
    Shapes, dtypes and devices are checked without touching the data; the value checks
    (finite, positive scales, non-zero quaternions) share one device-to-host transfer, so a
    training loop pays one sync per call, not six; ``values=False`` skips them (no sync).
    """
    tensors = {"means": means, "scales": scales, "quats": quats, "densities": densities}
    per_view = views is not None and isinstance(means, torch.Tensor) and means.dim() == 3
    check_tensor("means", means, (views, None, 3) if per_view else (None, 3), finite=False)
    n = means.shape[-2]
    lead = (views, n) if per_view else (n,)
    check_tensor("scales", scales, (*lead, 3), finite=False)
    check_tensor("quats", quats, (*lead, 4), finite=False)
    per_view_density = views is not None and isinstance(densities, torch.Tensor) and densities.dim() == 2
    check_tensor("densities", densities, (views, n) if per_view_density else (n,), finite=False)
    dtypes = {t.dtype for t in tensors.values()}
    devices = {t.device for t in tensors.values()}
    if len(dtypes) != 1 or len(devices) != 1:
        raise RgsInputError("means, scales, quats and densities must share one dtype and device")
    if not means.dtype.is_floating_point:
        raise RgsInputError(f"Gaussian parameters must be floating point, got {means.dtype}")
    if n == 0 or not values:
        return n
    with torch.no_grad():
        flags = torch.stack([~torch.isfinite(t).all() for t in tensors.values()]
                            + [(scales <= 0).any(), (quats.norm(dim=-1) == 0).any()]).cpu()
    for name, bad in zip(tensors, flags[:4].tolist()):
        if bad:
            raise RgsInputError(f"{name} contains NaN or Inf values: clean the input before calling")
    if flags[4]:
        raise RgsInputError("scales must be positive (mm): pass activated scales, e.g. Gaussians.scales")
    if flags[5]:
        raise RgsInputError("a quaternion is zero: quaternions must have non-zero norm")
    return n


def inv_softplus(x: torch.Tensor) -> torch.Tensor:
    """Inverse of softplus for x > 0."""
    return x + torch.log(-torch.expm1(-x))


@dataclass
class Gaussians:
    """Raw trainable tensors of N Gaussians and their activations.

    ``means`` (N, 3) mm, ``scale_raw`` (N, 3), ``quat_raw`` (N, 4), ``density_raw`` (N,);
    ``scale_min`` / ``scale_max`` bound the activated scales (mm).
    """

    means: torch.Tensor
    scale_raw: torch.Tensor
    quat_raw: torch.Tensor
    density_raw: torch.Tensor
    scale_min: float
    scale_max: float

    @classmethod
    def from_physical(cls, means, scales, quats, densities, scale_min: float, scale_max: float
                      ) -> "Gaussians":
        """Raw tensors that activate to the given physical values (scales clamped inside bounds)."""
        if not 0 < scale_min < scale_max:
            raise RgsInputError(f"need 0 < scale_min < scale_max, got {scale_min}, {scale_max}")
        check_params(means, scales, quats, densities)
        frac = ((scales - scale_min) / (scale_max - scale_min)).clamp(1e-6, 1 - 1e-6)
        dens = densities.clamp_min(1e-12)
        return cls(means.clone(), torch.logit(frac), quats / quats.norm(dim=1, keepdim=True),
                   inv_softplus(dens), float(scale_min), float(scale_max))

    def __len__(self) -> int:
        return int(self.means.shape[0])

    @property
    def scales(self) -> torch.Tensor:
        return self.scale_min + (self.scale_max - self.scale_min) * torch.sigmoid(self.scale_raw)

    @property
    def quats(self) -> torch.Tensor:
        return self.quat_raw / self.quat_raw.norm(dim=1, keepdim=True)

    @property
    def densities(self) -> torch.Tensor:
        return F.softplus(self.density_raw)

    def physical(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(means, scales, quats, densities), differentiable w.r.t. the raw tensors."""
        return self.means, self.scales, self.quats, self.densities

    def covariances(self) -> torch.Tensor:
        return covariance(self.scales, self.quats)

    def parameters(self) -> list[torch.Tensor]:
        return [self.means, self.scale_raw, self.quat_raw, self.density_raw]

    def requires_grad_(self, flag: bool = True) -> "Gaussians":
        for t in self.parameters():
            t.requires_grad_(flag)
        return self
