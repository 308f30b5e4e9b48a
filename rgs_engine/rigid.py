"""4x4 rigid transforms (rotation + translation, mm) that define poses.

A transform ``T`` maps a point ``x`` to ``R x + t`` with ``T = [[R, t], [0, 0, 0, 1]]``
(float64 numpy). :func:`compose` ``(A, B)`` is ``A @ B``: apply ``B`` first.

* :func:`from_axis_angle` — from a rotation vector (axis x angle, radians; Rodrigues) and a
  translation, optionally rotating about a ``centre`` instead of the origin;
* :func:`random_offset` — a rotation of exactly ``deg`` about a random axis and a
  translation of exactly ``mm`` in a random direction, from a seeded generator;
* :func:`apply` / :func:`apply_directions` — to points / to direction vectors;
* :func:`invert`, :func:`rotation_angle_deg`, :func:`check_rigid`;
* :func:`transform_geometry` — move every view of a :class:`~rgs_engine.geometry.Geometry`
  (sources and detector centres as points, ``u``, ``v`` and parallel ray directions as
  directions).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .errors import RgsInputError
from .geometry import Geometry

RIGID_TOL = 1e-6


def check_rigid(matrix, name: str = "transform") -> np.ndarray:
    """``matrix`` as a float64 (4, 4) array; raises unless it is a proper rigid transform."""
    try:
        m = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError):
        raise RgsInputError(f"{name} must be a 4x4 matrix of numbers") from None
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise RgsInputError(f"{name} must be a finite 4x4 matrix, got shape {m.shape}")
    r = m[:3, :3]
    if (np.abs(m[3] - [0, 0, 0, 1]).max() > RIGID_TOL
            or np.abs(r @ r.T - np.eye(3)).max() > RIGID_TOL or np.linalg.det(r) <= 0):
        raise RgsInputError(f"{name} is not rigid (rotation + translation, last row 0 0 0 1): "
                            "pass a proper rigid 4x4 matrix without scaling, shear or mirroring")
    return m


def rotation_matrix(rotvec: Sequence[float]) -> np.ndarray:
    """3x3 rotation about ``rotvec`` by its length (radians), Rodrigues' formula."""
    w = np.asarray(rotvec, dtype=np.float64).reshape(-1)
    if w.shape != (3,) or not np.all(np.isfinite(w)):
        raise RgsInputError(f"rotation vector must be 3 finite numbers, got {rotvec!r}")
    angle = float(np.linalg.norm(w))
    if angle == 0.0:
        return np.eye(3)
    k = w / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def from_axis_angle(rotvec: Sequence[float] = (0.0, 0.0, 0.0),
                    translation: Sequence[float] = (0.0, 0.0, 0.0),
                    centre: Sequence[float] | None = None) -> np.ndarray:
    """``x -> R (x - c) + c + t``: rotate by ``rotvec`` (radians) about ``centre`` (default
    the origin), then translate by ``translation`` (mm)."""
    t = np.asarray(translation, dtype=np.float64).reshape(-1)
    if t.shape != (3,) or not np.all(np.isfinite(t)):
        raise RgsInputError(f"translation must be 3 finite numbers (mm), got {translation!r}")
    c = np.zeros(3) if centre is None else np.asarray(centre, dtype=np.float64).reshape(3)
    out = np.eye(4)
    out[:3, :3] = rotation_matrix(rotvec)
    out[:3, 3] = c + t - out[:3, :3] @ c
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
    """Inverse of a rigid transform: ``[[R^T, -R^T t], [0, 1]]``."""
    m = check_rigid(matrix)
    out = np.eye(4)
    out[:3, :3] = m[:3, :3].T
    out[:3, 3] = -m[:3, :3].T @ m[:3, 3]
    return out


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
    moved geometry equals projecting the volume moved by ``invert(matrix)`` in the original."""
    m = check_rigid(matrix)
    vec = geometry.vectors.numpy().copy()
    first = vec[:, 0:3]
    vec[:, 0:3] = apply(m, first) if geometry.mode == "cone" else apply_directions(m, first)
    vec[:, 3:6] = apply(m, vec[:, 3:6])
    vec[:, 6:9] = apply_directions(m, vec[:, 6:9])
    vec[:, 9:12] = apply_directions(m, vec[:, 9:12])
    return Geometry(torch.from_numpy(vec), geometry.det_shape, geometry.mode)
