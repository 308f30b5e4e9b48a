"""The in-memory form of a scan: :class:`ProjectionData`.

It holds a scan ready for reconstruction: line integrals ``-ln(I / I0)`` (V, H, W) float32,
their :class:`~rgs_engine.core.geometry.Geometry` (mm), the
:class:`~rgs_engine.core.geometry.VolumeGrid` to reconstruct, and optionally the ground-truth
attenuation (1/mm), held-out test views and per-view acquisition times. The readers and the
writer are in :mod:`rgs_engine.io.projections`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.errors import RgsInputError
from ..core.geometry import Geometry, VolumeGrid

FORMAT_NAME = "rgs-projections"
FORMAT_VERSION = 1
H5_SUFFIXES = (".h5", ".hdf5")
PICKLE_SUFFIXES = (".pickle", ".pkl")
NAF_METRES_TO_MM = 1000.0  # NAF projections integrate over metres; rgs works in mm


# --------------------------------------------------------------------------------------
# In-memory form
# --------------------------------------------------------------------------------------
def _as_cpu(name: str, x: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise RgsInputError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise RgsInputError(f"{name} has dtype {x.dtype}, expected floating point values")
    x = x.detach().to(device="cpu", dtype=dtype).contiguous()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise RgsInputError(f"{name} contains NaN or Inf values: clean or regenerate the data")
    return x


@dataclass
class ProjectionData:
    """A scan: training projections with their geometry, the grid, optional extras.

    ``projections`` (V, H, W) float32 CPU line integrals; ``geometry`` V views of ``det_shape``
    (H, W); ``grid`` the region to reconstruct (mm); ``ground_truth`` (nx, ny, nz) float32 in
    1/mm or None; ``test_projections`` (T, H', W') with ``test_geometry`` (T views) or both
    None; ``time`` (V,) float64 seconds or None; ``source`` where it came from;
    ``attributes`` free-form provenance (e.g. the parameters of ``rgs simulate``).
    Shapes and values are checked on construction.
    """

    projections: torch.Tensor
    geometry: Geometry
    grid: VolumeGrid
    ground_truth: torch.Tensor | None = None
    test_projections: torch.Tensor | None = None
    test_geometry: Geometry | None = None
    time: torch.Tensor | None = None
    source: str = ""
    attributes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"{self.source}: " if self.source else ""
        if not isinstance(self.geometry, Geometry):
            raise RgsInputError(f"{where}geometry must be a Geometry, got {type(self.geometry).__name__}")
        if not isinstance(self.grid, VolumeGrid):
            raise RgsInputError(f"{where}grid must be a VolumeGrid, got {type(self.grid).__name__}")
        self.projections = _as_cpu("projections", self.projections, torch.float32)
        want = (self.geometry.num_views, *self.geometry.det_shape)
        if tuple(self.projections.shape) != want:
            raise RgsInputError(
                f"{where}projections have shape {tuple(self.projections.shape)} but the geometry "
                f"describes {want} (views, rows, columns): one geometry row per projection")
        self.geometry.check_against(self.grid)
        if self.ground_truth is not None:
            self.ground_truth = _as_cpu("ground truth", self.ground_truth, torch.float32)
            if tuple(self.ground_truth.shape) != self.grid.shape:
                raise RgsInputError(
                    f"{where}ground truth has shape {tuple(self.ground_truth.shape)} but the volume "
                    f"grid has shape {self.grid.shape}: they must match")
        if (self.test_projections is None) != (self.test_geometry is None):
            raise RgsInputError(f"{where}test projections and test geometry must come together: "
                                "give both or neither")
        if self.test_projections is not None:
            if not isinstance(self.test_geometry, Geometry):
                raise RgsInputError(f"{where}test geometry must be a Geometry")
            self.test_projections = _as_cpu("test projections", self.test_projections, torch.float32)
            want = (self.test_geometry.num_views, *self.test_geometry.det_shape)
            if tuple(self.test_projections.shape) != want:
                raise RgsInputError(
                    f"{where}test projections have shape {tuple(self.test_projections.shape)} but "
                    f"the test geometry describes {want}: one geometry row per test projection")
            self.test_geometry.check_against(self.grid)
        if self.time is not None:
            self.time = _as_cpu("time", self.time, torch.float64)
            if tuple(self.time.shape) != (self.geometry.num_views,):
                raise RgsInputError(
                    f"{where}time has shape {tuple(self.time.shape)} but there are "
                    f"{self.geometry.num_views} views: give one time (s) per training view")

    @property
    def num_views(self) -> int:
        return self.geometry.num_views

    def view_indices(self, n: int) -> torch.Tensor:
        """Indices (n,) of ``n`` training views spread evenly over the acquisition order.

        View ``floor(k V / n)`` for ``k = 0 .. n - 1`` (all views if ``n == V``): on an evenly
        sampled circular orbit these are evenly spread angles.
        """
        total = self.num_views
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise RgsInputError(f"number of views must be a positive integer, got {n!r}")
        if n > total:
            raise RgsInputError(f"asked for {n} views but {self.source or 'the data'} has only "
                                f"{total}: ask for at most {total}")
        return torch.div(torch.arange(n) * total, n, rounding_mode="floor")

    def select_views(self, n: int) -> "ProjectionData":
        """The ``n`` training views of :meth:`view_indices`; test views, ground truth and
        grid are kept."""
        index = self.view_indices(n)
        return ProjectionData(
            projections=self.projections[index].contiguous(),
            geometry=self.geometry.subset(index),
            grid=self.grid,
            ground_truth=self.ground_truth,
            test_projections=self.test_projections,
            test_geometry=self.test_geometry,
            time=None if self.time is None else self.time[index].contiguous(),
            source=self.source,
            attributes=dict(self.attributes),
        )

    @property
    def is_circular(self) -> bool:
        """True when the training views form a circular orbit (FDK applies)."""
        from ..recon.fdk import circular_orbit

        try:
            circular_orbit(self.geometry)
        except RgsInputError:
            return False
        return True


def describe(data: ProjectionData) -> str:
    """One line: views, detector, mode, grid and extras."""
    h, w = data.geometry.det_shape
    extras = [name for name, x in (("ground truth", data.ground_truth),
                                   ("test views", data.test_projections), ("time", data.time))
              if x is not None]
    grid = "x".join(map(str, data.grid.shape))
    return (f"{data.num_views} {data.geometry.mode}-beam views of {h}x{w}, grid {grid} of "
            f"{'x'.join(f'{s:.3g}' for s in data.grid.spacing)} mm"
            + (f"; with {', '.join(extras)}" if extras else ""))
