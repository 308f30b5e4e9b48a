"""4x4 rigid transforms (rotation + translation, mm) that define poses.

A transform ``T`` maps a point ``x`` to ``R x + t`` with ``T = [[R, t], [0, 0, 0, 1]]``
(float64 numpy). :func:`compose` ``(A, B)`` is ``A @ B``: apply ``B`` first.

* :func:`from_axis_angle` — from a rotation vector (axis x angle, radians; Rodrigues) and a
  translation, optionally rotating about a ``centre`` instead of the origin;
* :func:`random_offset` — a rotation of exactly ``deg`` about a random axis and a
  translation of exactly ``mm`` in a random direction, from a seeded generator;
* :func:`apply` / :func:`apply_directions` — to points / to direction vectors;
* :func:`invert`, :func:`rotation_angle_deg`, :func:`check_rigid` (:func:`check_rigid_stack`
  for (P, 4, 4));
* :func:`rotation_matrix` / :func:`rotation_quat` / :func:`quat_product` — Rodrigues, the
  quaternion of a rotation vector and the Hamilton product in numpy, batched (the host forms
  of the differentiable torch ones below; analytic, so complex-step derivatives work);
* :func:`move_packed` / :func:`move_packed_vjp` — Gaussians moved by packed poses and the
  poses' gradient, one kernel launch each (registration's steps);
* :func:`transform_geometry` — move every view of a :class:`~rgs_engine.core.geometry.Geometry`
  (sources and detector centres as points, ``u``, ``v`` and parallel ray directions as
  directions).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch

from ..kernels import rigid_move
from ..kernels.chunks import chunking
from .bridge import as_float32, kernel_output, kernel_scratch
from .errors import RgsInputError, check_tensor
from .geometry import Geometry

RIGID_TOL = 1e-6
# L(q) p = q * p: L(q) = q[_LEFT_INDEX] * _LEFT_SIGN (Hamilton product, (w, x, y, z))
_LEFT_INDEX = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 1], [3, 2, 1, 0]])
_LEFT_SIGN = torch.tensor([[1, -1, -1, -1], [1, 1, -1, 1], [1, 1, 1, -1], [1, -1, 1, 1]])


@functools.lru_cache(maxsize=16)
def _left_tables(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``_LEFT_INDEX`` and ``_LEFT_SIGN`` on ``device`` (copied once, not per call: a copy
    from pageable host memory waits for the device)."""
    return _LEFT_INDEX.to(device), _LEFT_SIGN.to(device, dtype)


def check_rigid(matrix, name: str = "transform") -> np.ndarray:
    """``matrix`` as a float64 (4, 4) array; raises unless it is a proper rigid transform."""
    try:
        m = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError):
        raise RgsInputError(f"{name} must be a 4x4 matrix of numbers") from None
    if m.shape != (4, 4):
        raise RgsInputError(f"{name} must be a finite 4x4 matrix, got shape {m.shape}")
    return check_rigid_stack(m[None], name)[0]


def check_rigid_stack(matrices, name: str = "transform") -> np.ndarray:
    """``matrices`` as a float64 (P, 4, 4) array of proper rigid transforms (else raises)."""
    m = np.asarray(matrices, dtype=np.float64)
    if m.ndim != 3 or m.shape[1:] != (4, 4) or not np.all(np.isfinite(m)):
        raise RgsInputError(f"{name} must be a finite 4x4 matrix, got shape {m.shape}")
    r = m[:, :3, :3]
    if (np.abs(m[:, 3] - [0, 0, 0, 1]).max(initial=0) > RIGID_TOL
            or np.abs(r @ r.transpose(0, 2, 1) - np.eye(3)).max(initial=0) > RIGID_TOL
            or (np.linalg.det(r) <= 0).any()):
        raise RgsInputError(f"{name} is not rigid (rotation + translation, last row 0 0 0 1): "
                            "pass a proper rigid 4x4 matrix without scaling, shear or mirroring")
    return m


def _as_stack(matrix) -> tuple[np.ndarray, bool]:
    """``matrix`` (4, 4) or a stack (P, 4, 4) of rigid transforms as a checked (P, 4, 4)
    float64 array, and whether it was a single 4x4."""
    m = np.asarray(matrix, dtype=np.float64)
    return (check_rigid(m)[None], True) if m.ndim == 2 else (check_rigid_stack(m), False)


def _rotvec(rotvec) -> np.ndarray:
    """``rotvec`` (..., 3) as float64, or as complex128 when it is complex (complex-step
    derivatives); raises unless finite."""
    w = np.asarray(rotvec)
    w = w.astype(np.complex128 if np.iscomplexobj(w) else np.float64)
    if w.shape[-1:] != (3,) or not np.all(np.isfinite(w)):
        raise RgsInputError(f"rotation vector must be 3 finite numbers, got {rotvec!r}")
    return w


def rotation_matrix(rotvec) -> np.ndarray:
    """Rotations about ``rotvec`` (..., 3) by their lengths (radians): (..., 3, 3), Rodrigues'
    formula in float64 numpy (Taylor series of sin(t)/t and (1 - cos t)/t^2 below t^2 =
    1e-4, as :func:`so3_exp`). Analytic in ``rotvec``: a complex ``rotvec`` gives the
    complex-step derivative (the branch is chosen on the real part)."""
    w = _rotvec(rotvec)
    t2 = np.einsum("...i,...i->...", w, w)[..., None, None]
    small = t2.real < 1e-4
    ts = np.sqrt(np.where(small, 1.0, t2))
    a = np.where(small, 1 - t2 / 6 + t2 * t2 / 120, np.sin(ts) / ts)
    b = np.where(small, 0.5 - t2 / 24 + t2 * t2 / 720, (1 - np.cos(ts)) / np.where(small, 1.0, t2))
    k = np.zeros(w.shape + (3,), dtype=w.dtype)
    k[..., 0, 1], k[..., 0, 2], k[..., 1, 2] = -w[..., 2], w[..., 1], -w[..., 0]
    k[..., 1, 0], k[..., 2, 0], k[..., 2, 1] = w[..., 2], -w[..., 1], w[..., 0]
    return np.eye(3) + a * k + b * (k @ k)


def rotation_quat(rotvec) -> np.ndarray:
    """Unit quaternions (..., 4) (w, x, y, z) of :func:`rotation_matrix` ``(rotvec)``:
    ``(cos(t/2), rotvec sin(t/2) / t)``, numpy (Taylor series below t^2 = 1e-4, as
    :func:`axis_angle_quat`; complex-step safe like :func:`rotation_matrix`)."""
    w = _rotvec(rotvec)
    t2 = np.einsum("...i,...i->...", w, w)[..., None]
    small = t2.real < 1e-4
    ts = np.sqrt(np.where(small, 1.0, t2))
    c = np.where(small, 1 - t2 / 8 + t2 * t2 / 384, np.cos(ts / 2))
    s = np.where(small, 0.5 - t2 / 48 + t2 * t2 / 3840, np.sin(ts / 2) / ts)
    return np.concatenate([c, s * w], axis=-1)


def quat_product(a, b) -> np.ndarray:
    """Hamilton product ``a * b`` of quaternions (..., 4) (w, x, y, z), numpy, broadcasting
    (the host form of :func:`quat_multiply`)."""
    a, b = np.asarray(a), np.asarray(b)
    return np.einsum("...ij,...j->...i", a[..., _LEFT_INDEX.numpy()] * _LEFT_SIGN.numpy(), b)


def from_axis_angle(rotvec: Sequence[float] = (0.0, 0.0, 0.0),
                    translation: Sequence[float] = (0.0, 0.0, 0.0),
                    centre: Sequence[float] | None = None) -> np.ndarray:
    """``x -> R (x - c) + c + t``: rotate by ``rotvec`` (radians) about ``centre`` (default
    the origin), then translate by ``translation`` (mm). Batched: ``rotvec``, ``translation``
    and ``centre`` (..., 3) broadcast to (..., 4, 4) transforms."""
    t = np.asarray(translation, dtype=np.float64)
    if t.shape[-1:] != (3,) or not np.all(np.isfinite(t)):
        raise RgsInputError(f"translation must be 3 finite numbers (mm), got {translation!r}")
    r = rotation_matrix(rotvec)
    c = np.zeros(3) if centre is None else np.asarray(centre, dtype=np.float64)
    lead = np.broadcast_shapes(r.shape[:-2], t.shape[:-1], c.shape[:-1])
    out = np.broadcast_to(np.eye(4), lead + (4, 4)).copy()
    out[..., :3, :3] = r
    out[..., :3, 3] = c + t - np.einsum("...ij,...j->...i", r, c)
    return out


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    while np.linalg.norm(v) < 1e-9:
        v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def random_offset(mm: float, deg: float, rng: np.random.Generator | int,
                  centre: Sequence[float] | None = None) -> np.ndarray:
    """A rigid offset: rotation of exactly ``deg`` degrees about a uniformly random axis
    through ``centre`` (default the origin), then a translation of exactly ``mm`` in a
    uniformly random direction. ``rng`` is a numpy Generator or a seed. The centre moves by
    exactly ``mm``."""
    if not (math.isfinite(mm) and mm >= 0 and math.isfinite(deg) and 0 <= deg <= 180):
        raise RgsInputError(f"offset {mm:g} mm, {deg:g} deg: need mm >= 0 and 0 <= deg <= 180")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(int(rng))
    axis, direction = _unit(gen), _unit(gen)
    return from_axis_angle(axis * math.radians(deg), direction * mm, centre)


def invert(matrix) -> np.ndarray:
    """Inverse of a rigid transform: ``[[R^T, -R^T t], [0, 1]]``; of each of a stack (P, 4, 4)."""
    ms, single = _as_stack(matrix)
    rt = ms[:, :3, :3].transpose(0, 2, 1)
    out = np.broadcast_to(np.eye(4), ms.shape).copy()
    out[:, :3, :3] = rt
    out[:, :3, 3] = -np.einsum("pij,pj->pi", rt, ms[:, :3, 3])
    return out[0] if single else out


def compose(*matrices) -> np.ndarray:
    """Product ``M1 @ M2 @ ...``: the last one is applied first."""
    out = np.eye(4)
    for m in matrices:
        out = out @ check_rigid(m)
    return out


def apply(matrix, points) -> np.ndarray:
    """Points (..., 3) mm mapped by the transform: ``R x + t``."""
    m = check_rigid(matrix)
    p = np.asarray(points, dtype=np.float64)
    if p.shape[-1:] != (3,):
        raise RgsInputError(f"points must have shape (..., 3), got {p.shape}")
    return p @ m[:3, :3].T + m[:3, 3]


def apply_directions(matrix, vectors) -> np.ndarray:
    """Direction vectors (..., 3) rotated by the transform (no translation)."""
    m = check_rigid(matrix)
    v = np.asarray(vectors, dtype=np.float64)
    if v.shape[-1:] != (3,):
        raise RgsInputError(f"vectors must have shape (..., 3), got {v.shape}")
    return v @ m[:3, :3].T


def rotation_angle_deg(matrix) -> float:
    """Angle of the transform's rotation, degrees in [0, 180]."""
    r = check_rigid(matrix)[:3, :3]
    return math.degrees(math.acos(float(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))))


def transform_geometry(geometry: Geometry, matrix) -> Geometry:
    """The same views moved by ``matrix``: cone sources and detector centres as points,
    ``u``, ``v`` (and parallel ray directions) as directions. Projecting a volume in the
    moved geometry equals projecting the volume moved by ``invert(matrix)`` in the original.
    A stack of P transforms (P, 4, 4) gives one geometry of P x V views, transform-major
    (every view moved by the first transform, then by the second, ...)."""
    ms, _ = _as_stack(matrix)
    vec = geometry.vectors.numpy().reshape(1, -1, 4, 3)  # (1, V, 4, 3): first, centre, u, v
    out = np.einsum("pij,pvkj->pvki", ms[:, :3, :3], np.broadcast_to(vec, (ms.shape[0],) + vec.shape[1:]))
    points = [0, 1] if geometry.mode == "cone" else [1]  # the rest are directions
    out[:, :, points] += ms[:, None, None, :3, 3]
    return geometry.derived(out.reshape(-1, 12))  # a rigid move keeps a checked geometry valid


# --------------------------------------------------------------------------------------
# Differentiable (torch) rotations and the rigid motion of Gaussians
# --------------------------------------------------------------------------------------
def so3_exp(omega: torch.Tensor) -> torch.Tensor:
    """Rotation vector (3,) (axis x angle, radians) -> (3, 3) rotation matrix (Rodrigues).

    Differentiable everywhere, including at 0 (Taylor series of sin(t)/t and
    (1 - cos t)/t^2 below t^2 = 1e-4)."""
    check_tensor("rotation vector", omega, (3,), finite=False)
    t2 = (omega * omega).sum()
    small = t2 < 1e-4
    t2s = torch.where(small, torch.ones_like(t2), t2)
    ts = t2s.sqrt()
    a = torch.where(small, 1 - t2 / 6 + t2 * t2 / 120, torch.sin(ts) / ts)
    b = torch.where(small, 0.5 - t2 / 24 + t2 * t2 / 720, (1 - torch.cos(ts)) / t2s)
    x, y, z = omega.unbind()
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero]).reshape(3, 3)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device)
    return eye + a * k + b * (k @ k)


def axis_angle_quat(omega: torch.Tensor) -> torch.Tensor:
    """Rotation vector (3,) (axis x angle, radians) -> unit quaternion (4,) (w, x, y, z) of
    :func:`so3_exp` ``(omega)``: ``(cos(t/2), omega sin(t/2) / t)``. Differentiable
    everywhere, including at 0 (Taylor series below t^2 = 1e-4)."""
    check_tensor("rotation vector", omega, (3,), finite=False)
    t2 = (omega * omega).sum()
    small = t2 < 1e-4
    ts = torch.where(small, torch.ones_like(t2), t2).sqrt()
    c = torch.where(small, 1 - t2 / 8 + t2 * t2 / 384, torch.cos(ts / 2))
    s = torch.where(small, 0.5 - t2 / 48 + t2 * t2 / 3840, torch.sin(ts / 2) / ts)
    return torch.cat([c.reshape(1), s * omega])


def quat_left_matrix(q: torch.Tensor) -> torch.Tensor:
    """(4, 4) matrix ``L(q)`` with ``L(q) p = q * p`` (Hamilton product, (w, x, y, z)): one
    gather and one product, so a batch of products is one matrix multiply."""
    check_tensor("quaternion", q, (4,), finite=False)
    index, sign = _left_tables(q.device, q.dtype)
    return q[index] * sign


def rigid_transform_vjp(means: torch.Tensor, quats: torch.Tensor, grad_means: torch.Tensor,
                        grad_quats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. the pose ``(R, t)`` and its quaternion of a scalar that depends on
    :func:`rigid_transform_gaussians`' outputs, given its gradients ``grad_means`` (N, 3) and
    ``grad_quats`` (N, 4) w.r.t. them (the Gaussians ``means`` / ``quats`` before the move):
    ``(dR (3, 3), dt (3,), dquat (4,))``, in closed form (``means' = means R^T + t``,
    ``quats' = quats L(quat)^T``), three small device ops instead of an autograd graph."""
    g_left = grad_quats.T @ quats  # d/dL(quat) of quats' = quats @ L^T
    index, sign = _left_tables(g_left.device, g_left.dtype)
    d_quat = torch.zeros(4, dtype=g_left.dtype, device=g_left.device).index_add_(
        0, index.reshape(-1), (g_left * sign).reshape(-1))
    return grad_means.T @ means, grad_means.sum(dim=0), d_quat


def move_packed(means: torch.Tensor, quats: torch.Tensor, poses: torch.Tensor, first: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussians ``means`` (N, 3) mm / ``quats`` (N, 4) moved by packed poses ``poses`` (K,
    16: ``R`` row-major, ``t`` mm, the quaternion of ``R``): rows ``[0, first)`` by pose 0,
    the rest by the last pose. As :func:`rigid_transform_gaussians` per span, in one kernel
    launch (:mod:`rgs_engine.kernels.rigid_move`); float32 on the runtime device."""
    m, q = as_float32(means), as_float32(quats)
    out_m, out_q = kernel_scratch(*m.shape), kernel_scratch(*q.shape)
    if len(m):
        rigid_move.move(m, q, as_float32(poses), int(first), out_m, out_q)
    return out_m, out_q


def move_packed_vjp(means: torch.Tensor, quats: torch.Tensor, grad_means: torch.Tensor,
                    grad_quats: torch.Tensor, first: int, k: int) -> torch.Tensor:
    """Gradients (K, 16) float64 w.r.t. the ``k`` packed poses of :func:`move_packed`, given
    ``grad_means`` (N, 3) / ``grad_quats`` (N, 4) w.r.t. its outputs: per pose,
    :func:`rigid_transform_vjp` of its span (``dR`` row-major, ``dt``, ``dquat``), in one
    kernel launch."""
    m = as_float32(means)
    grads = kernel_output(k, 16, dtype=torch.float64)
    span = max(int(first), len(m) - int(first)) if k > 1 else len(m)
    if len(m):
        rigid_move.move_vjp(m, as_float32(quats), as_float32(grad_means), as_float32(grad_quats), int(first),
                            grads, *chunking(span, m.is_cuda))
    return grads


def se3_exp(xi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose vector ``xi`` (6,) = (rotation vector (rad), translation (mm)) -> ``(R, t)``.

    ``R = so3_exp(xi[:3])`` (3, 3) and ``t = xi[3:]`` (3,), so ``x -> R x + t`` rotates about
    the world origin, then translates (the rotation vector and the translation are decoupled,
    which keeps the translation in mm). Differentiable, stable near 0."""
    check_tensor("xi", xi, (6,), finite=False)
    return so3_exp(xi[:3]), xi[3:]


def rotmat_to_quat(r: torch.Tensor) -> torch.Tensor:
    """(3, 3) rotation matrix -> unit quaternion (4,) (w, x, y, z), differentiable.

    Shepperd's method: the branch with the largest pivot is chosen on the device (no host
    read), the other branches' square roots are clamped so their (discarded) gradients stay
    finite."""
    check_tensor("R", r, (3, 3), finite=False)
    r00, r01, r02, r10, r11, r12, r20, r21, r22 = r.reshape(9).unbind()
    tr = r00 + r11 + r22
    piv = torch.stack([1 + tr, 1 + r00 - r11 - r22, 1 - r00 + r11 - r22, 1 - r00 - r11 + r22])
    s = 2 * piv.clamp_min(1e-12).sqrt()  # 4 |component| for each branch
    cands = torch.stack([
        torch.stack([s[0] / 4, (r21 - r12) / s[0], (r02 - r20) / s[0], (r10 - r01) / s[0]]),
        torch.stack([(r21 - r12) / s[1], s[1] / 4, (r01 + r10) / s[1], (r02 + r20) / s[1]]),
        torch.stack([(r02 - r20) / s[2], (r01 + r10) / s[2], s[2] / 4, (r12 + r21) / s[2]]),
        torch.stack([(r10 - r01) / s[3], (r02 + r20) / s[3], (r12 + r21) / s[3], s[3] / 4]),
    ])
    best = torch.argmax(piv.detach())
    q = cands.index_select(0, best.reshape(1))[0]
    q = q * torch.where(q[0] < 0, -1.0, 1.0).to(q.dtype)  # w >= 0
    return q / q.norm()


def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product ``a * b`` of quaternions (w, x, y, z), broadcasting over leading dims."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz,
                        aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx,
                        aw * bz + ax * by - ay * bx + az * bw], dim=-1)


def _pose(transform) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(transform, torch.Tensor):
        check_tensor("ct_to_xray", transform, (4, 4), finite=False)
        return transform[:3, :3], transform[:3, 3]
    if isinstance(transform, (tuple, list)) and len(transform) == 2:
        r, t = transform
        check_tensor("R", r, (3, 3), finite=False)
        check_tensor("t", t, (3,), finite=False)
        return r, t
    raise RgsInputError("ct_to_xray must be a (4, 4) torch tensor or a pair (R (3, 3), t (3,))")


def rigid_transform_gaussians(means: torch.Tensor, quats: torch.Tensor, ct_to_xray,
                              quat: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Move Gaussians by the rigid map ``x -> R x + t``: ``(means', quats')``.

    ``means`` (N, 3) mm, ``quats`` (N, 4) (w, x, y, z); ``ct_to_xray`` a (4, 4) tensor or
    ``(R, t)``; ``quat`` the unit quaternion of ``R`` when the caller has it (else it is
    computed from ``R``). ``means' = R p + t`` and ``quats' = q(R) * q`` (Hamilton product),
    so the covariances become ``R S R^T``; scales and densities are unchanged.
    Differentiable w.r.t. ``R``/``t``/``quat`` (and the inputs); the pose is cast to
    ``means``' dtype and device. ``R`` must be a rotation (not checked, to keep the call free
    of host reads).
    """
    check_tensor("means", means, (None, 3), finite=False)
    check_tensor("quats", quats, (means.shape[0], 4), finite=False)
    r, t = _pose(ct_to_xray)
    r = r.to(device=means.device, dtype=means.dtype)
    t = t.to(device=means.device, dtype=means.dtype)
    q_r = (rotmat_to_quat(r) if quat is None else quat).to(device=quats.device, dtype=quats.dtype)
    return torch.addmm(t, means, r.T), quats @ quat_left_matrix(q_r).T
