"""Pose vectors of registration and their algebra (float64, host).

A pose is ``D(xi) @ init`` with ``D(xi): y -> R(xi[:3]) (y - c) + c + xi[3:]`` (rotation
vector in rad about the centre ``c``, then a translation in mm; :func:`delta_matrix`).
:class:`PoseUpload` puts a step's poses on the device in one copy and brings the DRR's
gradient back to the pose vectors through the complex-step Jacobian of :func:`_packed_pose`;
:func:`sobol_offsets` draws the global stage's candidates; :func:`delta_xi` inverts
:func:`delta_matrix`; :func:`mtre` scores a pose against the truth.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..core import rigid
from ..core.errors import RgsInputError


def delta_matrix(xi, centre: Sequence[float]) -> np.ndarray:
    """``D(xi)`` as a 4x4: ``y -> R(xi[:3]) (y - c) + c + xi[3:]``; (..., 4, 4) of ``xi`` (..., 6)."""
    xi = np.asarray(xi, dtype=np.float64)
    if xi.shape[-1:] != (6,):
        raise RgsInputError(f"pose vectors must have shape (..., 6), got {xi.shape}")
    return rigid.from_axis_angle(xi[..., :3], xi[..., 3:], centre)


COMPLEX_STEP = 1e-30  # the imaginary step of the pose Jacobian (exact to rounding at any size)


def _packed_pose(xi: np.ndarray, init: np.ndarray, c: np.ndarray, q_init: np.ndarray) -> np.ndarray:
    """``D(xi) @ init`` as (..., 16): its rotation (9, row-major), its translation (3, mm) and
    the unit quaternion of its rotation (4), given ``q_init`` that of ``init``'s. Numpy,
    batched over ``xi`` (..., 6), analytic in ``xi`` (real or complex: complex-step
    derivatives, :class:`PoseUpload`)."""
    r = rigid.rotation_matrix(xi[..., :3])
    rot = r @ init[:3, :3]
    t = np.einsum("...ij,j->...i", r, init[:3, 3] - c) + c + xi[..., 3:]
    q = rigid.quat_product(rigid.rotation_quat(xi[..., :3]), q_init)
    return np.concatenate([rot.reshape(*rot.shape[:-2], 9), t, q], axis=-1)


class PoseUpload:
    """The poses of unit-scaled pose vectors ``zs`` (host float64 tensors (6,); ``xi = z *
    scale``) on ``device`` in one float32 copy :attr:`flat` (k, 16: ``R`` row-major, ``t``
    mm, the quaternion of ``R``; :func:`rgs_engine.core.rigid.move_packed`); :attr:`poses`
    gives each one's ``((R, t), q)``. With ``grad``, :meth:`backward` turns a gradient
    w.r.t. the packed poses into each vector's ``.grad`` through the Jacobians of
    :func:`_packed_pose` (complex step on the host, exact to rounding): the pose algebra
    costs no device launch and no autograd graph."""

    def __init__(self, zs: list[torch.Tensor], scale: np.ndarray, init: np.ndarray, c: np.ndarray,
                 q_init: np.ndarray, device: torch.device, grad: bool = False):
        self.zs = zs
        xi = np.stack([z.detach().numpy() for z in zs]) * scale  # (k, 6)
        if grad:  # rows: the value, then the six imaginary steps of each vector
            steps = xi[:, None, :] + 1j * COMPLEX_STEP * np.diag(scale)
            vals = _packed_pose(np.concatenate([xi[:, None, :].astype(complex), steps], axis=1), init, c, q_init)
            packed, self.jac = vals[:, 0].real, vals[:, 1:].imag / COMPLEX_STEP  # (k, 16), (k, 6, 16)
        else:
            packed = _packed_pose(xi, init, c, q_init)
        self.flat = torch.from_numpy(packed.astype(np.float32)).to(device).requires_grad_(grad)

    @property
    def poses(self) -> list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
        return [((f[:9].reshape(3, 3), f[9:12]), f[12:]) for f in self.flat]

    def backward(self, grad: torch.Tensor | None = None) -> None:
        """Each vector's gradient from ``grad`` (k, 16), the gradient w.r.t. :attr:`flat`
        (default: ``flat.grad``, from autograd); one device-to-host copy."""
        g = (self.flat.grad if grad is None else grad).cpu().double().numpy()
        for z, gk, jk in zip(self.zs, g, self.jac):
            z.grad = torch.from_numpy(jk @ gk)


def delta_xi(delta, centre: Sequence[float]) -> np.ndarray:
    """The pose vector ``xi`` (6,) with ``delta_matrix(xi, centre) == delta`` (4x4 rigid)."""
    from scipy.spatial.transform import Rotation  # here: 0.18 s to import (CLI start-up)

    d = rigid.check_rigid(delta, "pose")
    c = np.asarray(centre, dtype=np.float64).reshape(3)
    return np.concatenate([Rotation.from_matrix(d[:3, :3]).as_rotvec(), d[:3, 3] + d[:3, :3] @ c - c])


def mtre(pose, truth, points) -> float:
    """Mean distance (mm) between ``points`` (N, 3) mapped by ``pose`` and by ``truth``."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if p.shape[0] == 0:
        raise RgsInputError("mTRE needs at least one target point")
    return float(np.linalg.norm(rigid.apply(pose, p) - rigid.apply(truth, p), axis=1).mean())


def sobol_offsets(n: int, capture_mm: float, capture_deg: float, seed: int = 0) -> np.ndarray:
    """(n, 6) pose vectors: rotations (rad) within +-capture_deg, translations within
    +-capture_mm per axis, a scrambled Sobol set (row 0 is the zero pose)."""
    if n < 1:
        return np.zeros((0, 6))
    eng = torch.quasirandom.SobolEngine(6, scramble=True, seed=seed)
    s = eng.draw(n).double().numpy() * 2 - 1
    s[:, :3] *= math.radians(capture_deg)
    s[:, 3:] *= capture_mm
    s[0] = 0
    return s
