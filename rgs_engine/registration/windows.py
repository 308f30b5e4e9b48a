"""Detector windows for registration: coarser detectors (pixel blocks merged) and crops of
each view around the structure, with the geometry that goes with them (mm, ASTRA vectors)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import RgsInputError
from ..core.geometry import Geometry

EPS = 1e-8  # smallest depth along the detector normal (mm) a point may project from


def coarse_geometry(geometry: Geometry, factor: int) -> Geometry:
    """The detector of ``geometry`` with ``factor`` x ``factor`` pixels merged: each new pixel
    centre is the centre of the block that :func:`pool` averages."""
    if factor == 1:
        return geometry
    h, w = geometry.det_shape
    hc, wc = h // factor, w // factor
    if hc < 2 or wc < 2:
        raise RgsInputError(f"detector {h}x{w} is too small for a scale factor {factor}: "
                            "use smaller scales")
    vec = _shift_detector(geometry, (hc * factor - 1) / 2 - (h - 1) / 2,
                          (wc * factor - 1) / 2 - (w - 1) / 2)
    vec[:, 6:12] *= factor
    return geometry.derived(vec, (hc, wc))


def _shift_detector(geometry: Geometry, rows, cols) -> torch.Tensor:
    """A copy of ``geometry.vectors`` with each detector centre moved by ``rows`` / ``cols``
    pixels (scalars or (V,) arrays) along ``v`` / ``u``."""
    vec = geometry.vectors.clone()
    r = torch.as_tensor(rows, dtype=torch.float64).reshape(-1, 1)
    c = torch.as_tensor(cols, dtype=torch.float64).reshape(-1, 1)
    vec[:, 3:6] += c * vec[:, 6:9] + r * vec[:, 9:12]
    return vec


def project_points(geometry: Geometry, points) -> np.ndarray:
    """Continuous pixel coordinates (V, N, 2) as (row, col) of ``points`` (N, 3, mm) in each
    view (pixel centres at integers)."""
    p = torch.as_tensor(np.asarray(points, dtype=np.float64).reshape(-1, 3))
    m = geometry.projection_rows()
    if geometry.mode == "cone":
        t = p[None] - geometry.vectors[:, None, 0:3]
        den = (t * m[:, None, 6:9]).sum(-1).clamp_min(EPS)
        col = (t * m[:, None, 0:3]).sum(-1) / den
        row = (t * m[:, None, 3:6]).sum(-1) / den
    else:
        col = p @ m[:, 0:3].T + m[:, 9]
        row = p @ m[:, 3:6].T + m[:, 10]
        col, row = col.T, row.T
    return torch.stack([row, col], dim=-1).numpy()


@dataclass
class Crop:
    """Per-view windows of one common ``shape`` (H, W) whose top-left pixels are ``starts``
    (V, 2) as (row, col): the detector region a registration compares."""

    starts: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def around(cls, geometry: Geometry, points, margin_px: float) -> Crop:
        """The smallest windows holding the projections of ``points`` (N, 3, mm) grown by
        ``margin_px`` pixels, all of the largest size, kept inside the detector."""
        h, w = geometry.det_shape
        rc = project_points(geometry, points)
        lo = np.floor(rc.min(axis=1) - margin_px)
        hi = np.ceil(rc.max(axis=1) + margin_px)
        lo = np.clip(lo, 0, [h - 1, w - 1])
        hi = np.clip(hi, 0, [h - 1, w - 1])
        size = np.maximum((hi - lo).max(axis=0).astype(int) + 1, 2)
        shape = (int(min(size[0], h)), int(min(size[1], w)))
        centre = (lo + hi) / 2
        starts = np.round(centre - (np.asarray(shape) - 1) / 2).astype(int)
        starts = np.clip(starts, 0, [h - shape[0], w - shape[1]])
        return cls(starts, shape)

    def geometry(self, geometry: Geometry) -> Geometry:
        """The cropped detectors: same pixels, ``shape`` of them, centres moved."""
        (h, w), (hc, wc) = geometry.det_shape, self.shape
        rows = self.starts[:, 0] + (hc - 1) / 2 - (h - 1) / 2
        cols = self.starts[:, 1] + (wc - 1) / 2 - (w - 1) / 2
        return geometry.derived(_shift_detector(geometry, rows, cols), self.shape)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """The windows (V, H, W) of ``images`` (V, rows, cols)."""
        hc, wc = self.shape
        return torch.stack([images[k, r:r + hc, c:c + wc] for k, (r, c) in enumerate(self.starts)])
