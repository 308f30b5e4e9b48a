"""4D (breathing) projection data: one in-memory form and the NAF-style 4D pickle.

:class:`Projection4D` holds a scan taken during free breathing: each projection has its own
acquisition time. :func:`load_4d_pickle` reads the NAF-style 4D pickle that X2-Gaussian uses
and :func:`save_4d_pickle` writes it (atomically), so files round-trip and X2-Gaussian can
read what rgs writes.

The pickle (same keys and units as the static NAF pickle of
:func:`rgs_engine.io.projections.load_naf_pickle`, whose helpers this reader shares):

* scanner: ``DSD``, ``DSO`` (mm), ``nDetector`` [rows, cols], ``dDetector`` (mm),
  ``nVoxel``, ``dVoxel`` (mm), ``offOrigin`` (mm, the grid's centre), ``mode``; circular
  orbit about the world z axis through the origin, NAF convention (``offDetector`` ignored);
* ``image`` (P, nx, ny, nz): the ground-truth attenuation at P phases;
* ``train`` and optionally ``val``: ``projections`` (N, rows, cols) line integrals with path
  lengths in metres (rgs multiplies them by 1000: 1/mm units), ``angles`` (N,) radians,
  ``time`` (N,) fraction of the scan in [0, 1], optionally ``phase`` (N,) bin index;
* optional rgs keys: ``scan_seconds`` (scan length, s), ``period_s`` (true mean breathing
  period, s), ``phase_times_s`` (P,) (the time each ``image`` volume depicts, s) and
  ``rgs_attributes`` (provenance dict). Where ``scan_seconds`` or ``phase_times_s`` is
  missing, X2-Gaussian's evaluation convention applies: a 60 s scan and phase k of P at
  ``t = (k + 0.5) 3 / P`` s (``0.15 + 0.3 k`` for P = 10, bins of a 3 s cycle). The true
  period is never taken from that convention: without ``period_s`` it is derived from the
  file's ``phase_times_s`` when those are P >= 2 evenly spaced times, the bin centres of one
  cycle (period = P times their spacing, :func:`period_from_phase_times`), else it is
  unknown. :attr:`Projection4D.conventions` says which values came from where.

Every problem raises :class:`~rgs_engine.core.errors.RgsInputError` with one line naming the
problem and the fix. Pickles can run code when loaded: only open files you trust.
"""
from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import RgsInputError
from ..core.geometry import Geometry, VolumeGrid
from .naf import _naf_split, _open_naf_pickle
from .projection_data import NAF_METRES_TO_MM, PICKLE_SUFFIXES, ProjectionData, _as_cpu
from .scanner import _float_array, _number
from .files import atomic_write

X2_SCAN_SECONDS = 60.0  # X2-Gaussian's evaluation: a 60 s scan ...
X2_PERIOD_SECONDS = 3.0  # ... a 3 s breathing cycle ...
PICKLE_PROTOCOL = 4  # readable by every Python >= 3.4 (X2-Gaussian runs 3.9)
_ORBIT_TOL = 1e-6  # relative tolerance of the NAF orbit check when writing


def x2_phase_times(phases: int, period_s: float = X2_PERIOD_SECONDS) -> np.ndarray:
    """(P,) seconds: X2-Gaussian's phase times ``(k + 0.5) period / P`` (``0.15 + 0.3 k`` for
    P = 10 and a 3 s cycle), the bin centres of one cycle."""
    return (np.arange(phases) + 0.5) * period_s / phases


def period_from_phase_times(phase_times_s: np.ndarray) -> float | None:
    """The period (s) that P phase times (s) imply when they are the bin centres of one
    cycle: P >= 2 evenly spaced increasing times, period = P times their spacing; None
    when they are not evenly spaced (they span no single cycle that can be read off)."""
    steps = np.diff(np.asarray(phase_times_s, dtype=np.float64))
    if steps.size == 0 or steps.min() <= 0 or not np.allclose(steps, steps.mean(), rtol=1e-6, atol=0):
        return None
    return float(steps.mean() * len(phase_times_s))


# --------------------------------------------------------------------------------------
# In-memory form
# --------------------------------------------------------------------------------------
def _split_times(where: str, name: str, time, phase, views: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Checked ``time`` (N,) float64 in [0, 1] and ``phase`` (N,) int64 >= 0 (or None)."""
    time = _as_cpu(f"{where}{name} time", time, torch.float64)
    if tuple(time.shape) != (views,):
        raise RgsInputError(f"{where}{name} time has shape {tuple(time.shape)} but there are "
                            f"{views} projections: give one time (fraction of the scan) per projection")
    if time.numel() and not bool(((time >= 0) & (time <= 1)).all()):
        raise RgsInputError(f"{where}{name} time spans {float(time.min()):g}..{float(time.max()):g}: "
                            "times are fractions of the scan and must lie in [0, 1]")
    if phase is None:
        return time, None
    phase = _as_cpu(f"{where}{name} phase", torch.as_tensor(np.asarray(phase, dtype=np.float64)),
                    torch.float64)
    if tuple(phase.shape) != (views,):
        raise RgsInputError(f"{where}{name} phase has shape {tuple(phase.shape)} but there are "
                            f"{views} projections: give one phase bin per projection (or none)")
    if not bool(((phase >= 0) & (phase == phase.round())).all()):
        raise RgsInputError(f"{where}{name} phase must hold bin indices 0, 1, 2, ...: "
                            "store whole numbers >= 0")
    return time, phase.to(torch.int64)


@dataclass
class Projection4D:
    """Projections taken at distinct times of a breathing scan, with optional ground truth.

    * ``projections`` (N, H, W) float32 CPU line integrals (attenuation in 1/mm times mm);
      ``geometry`` their N views (mm); ``grid`` the region to reconstruct (mm);
    * ``time`` (N,) float64, each projection's time as a fraction of the scan in [0, 1];
      ``scan_seconds`` the scan's length (s), so :attr:`times_s` = ``time * scan_seconds``;
      ``phase`` (N,) int64 phase-bin index or None;
    * ``phases`` (P, nx, ny, nz) float32 ground-truth attenuation (1/mm) with
      ``phase_times_s`` (P,) float64, the time in [0, scan_seconds] each depicts, or both
      None; ``period_s`` the true (mean) breathing period in s, or None if unknown, and
      ``period_source`` where it came from (``"file"``, ``"phase_times_s"`` (derived from
      the file's phase times, see the module) or None when unknown);
    * ``test_projections`` (T, H, W) with ``test_geometry`` and ``test_time`` (the NAF ``val``
      split; ``test_phase`` optional), or all None;
    * ``conventions`` says which values came from X2-Gaussian's defaults (see the module);
      ``source`` where the data came from; ``attributes`` free-form provenance.

    Shapes and values are checked on construction (:class:`RgsInputError`).
    """

    projections: torch.Tensor
    geometry: Geometry
    time: torch.Tensor
    grid: VolumeGrid
    scan_seconds: float
    phase: torch.Tensor | None = None
    phases: torch.Tensor | None = None
    phase_times_s: torch.Tensor | None = None
    period_s: float | None = None
    test_projections: torch.Tensor | None = None
    test_geometry: Geometry | None = None
    test_time: torch.Tensor | None = None
    test_phase: torch.Tensor | None = None
    conventions: str = ""
    period_source: str | None = "file"
    source: str = ""
    attributes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"{self.source}: " if self.source else ""
        # projections against geometry and grid: the static form's checks
        static = ProjectionData(projections=self.projections, geometry=self.geometry, grid=self.grid,
                                test_projections=self.test_projections,
                                test_geometry=self.test_geometry, source=self.source)
        self.projections, self.test_projections = static.projections, static.test_projections
        if not (isinstance(self.scan_seconds, (int, float)) and math.isfinite(self.scan_seconds)
                and self.scan_seconds > 0):
            raise RgsInputError(f"{where}scan_seconds is {self.scan_seconds!r}: the scan length "
                                "must be a positive number of seconds")
        self.scan_seconds = float(self.scan_seconds)
        if self.period_s is not None:
            if not (isinstance(self.period_s, (int, float)) and math.isfinite(self.period_s)
                    and self.period_s > 0):
                raise RgsInputError(f"{where}period_s is {self.period_s!r}: the breathing period "
                                    "must be a positive number of seconds (or None if unknown)")
            self.period_s = float(self.period_s)
        self.time, self.phase = _split_times(where, "train", self.time, self.phase,
                                             self.geometry.num_views)
        if (self.test_projections is None) != (self.test_time is None):
            raise RgsInputError(f"{where}test projections and test times must come together: "
                                "give both or neither")
        if self.test_projections is not None:
            self.test_time, self.test_phase = _split_times(
                where, "test", self.test_time, self.test_phase, self.test_geometry.num_views)
        elif self.test_phase is not None:
            raise RgsInputError(f"{where}test phases without test projections: drop them")
        self._check_phases(where)

    def _check_phases(self, where: str) -> None:
        if (self.phases is None) != (self.phase_times_s is None):
            raise RgsInputError(f"{where}ground-truth phases and phase_times_s must come together: "
                                "give the time (s) each phase volume depicts")
        if self.phases is None:
            return
        self.phases = _as_cpu(f"{where}phases", self.phases, torch.float32)
        if self.phases.dim() != 4 or tuple(self.phases.shape[1:]) != self.grid.shape:
            raise RgsInputError(f"{where}phases have shape {tuple(self.phases.shape)}, expected "
                                f"(P, {', '.join(map(str, self.grid.shape))}): one volume of the "
                                "grid per phase")
        self.phase_times_s = _as_cpu(f"{where}phase_times_s", self.phase_times_s, torch.float64)
        count = self.phases.shape[0]
        if tuple(self.phase_times_s.shape) != (count,):
            raise RgsInputError(f"{where}phase_times_s has shape {tuple(self.phase_times_s.shape)} "
                                f"but there are {count} phase volumes: give one time (s) per volume")
        if not bool(((self.phase_times_s >= 0) & (self.phase_times_s <= self.scan_seconds)).all()):
            raise RgsInputError(f"{where}phase_times_s must lie within the scan, [0, "
                                f"{self.scan_seconds:g}] s: check the times or scan_seconds")

    @property
    def num_views(self) -> int:
        return self.geometry.num_views

    @property
    def times_s(self) -> torch.Tensor:
        """(N,) float64 acquisition times of the training projections, seconds."""
        return self.time * self.scan_seconds

    @property
    def test_times_s(self) -> torch.Tensor | None:
        """(T,) float64 acquisition times of the test projections (s), or None."""
        return None if self.test_time is None else self.test_time * self.scan_seconds

    def as_static(self) -> ProjectionData:
        """The same projections as a static :class:`ProjectionData` (times in seconds, no
        ground truth): the input of a static reconstruction that ignores the motion."""
        return ProjectionData(projections=self.projections, geometry=self.geometry, grid=self.grid,
                              test_projections=self.test_projections,
                              test_geometry=self.test_geometry, time=self.times_s,
                              source=self.source,
                              attributes={**self.attributes, "conventions": self.conventions})


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
def _split_extras(where: str, key: str, split: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """``time`` (required) and ``phase`` (optional) of one NAF split, as float64 arrays."""
    if "time" not in split:
        raise RgsInputError(f"{where}: {key!r} has projections but no 'time': a 4D pickle needs "
                            "time (N,), each projection's fraction of the scan in [0, 1] (a static "
                            "scan is read by rgs recon)")
    time = _float_array(f"{where} {key}['time']", split["time"], ndim=1, dtype=np.float64)
    phase = split.get("phase")
    if phase is not None:
        phase = _float_array(f"{where} {key}['phase']", phase, ndim=1, dtype=np.float64)
    return time, phase


def load_4d_pickle(path: str | os.PathLike) -> Projection4D:
    """Read a NAF-style 4D pickle (X2-Gaussian's format, see the module) into a
    :class:`Projection4D`; missing rgs keys fall back to X2-Gaussian's convention, stated in
    ``conventions``. Only open pickles from sources you trust."""
    where, data, sc, grid, phases = _open_naf_pickle(path, 4)
    count = phases.shape[0]
    fallback = []
    scan_seconds, period_s, period_source = X2_SCAN_SECONDS, None, None
    if "scan_seconds" in data:
        scan_seconds = _number(where, data, "scan_seconds")
    else:
        fallback.append(f"{X2_SCAN_SECONDS:g} s scan")
    if "phase_times_s" in data:
        phase_times = _float_array(f"{where} 'phase_times_s'", data["phase_times_s"], ndim=1,
                                   dtype=np.float64)
    else:
        phase_times = x2_phase_times(count)
        step = X2_PERIOD_SECONDS / count
        fallback.append(f"phase k of {count} at t = {step / 2:g} + {step:g} k s")
    if "period_s" in data:
        period_s, period_source = _number(where, data, "period_s"), "file"
    elif "phase_times_s" in data:
        period_s = period_from_phase_times(phase_times)
        period_source = None if period_s is None else "phase_times_s"
    notes = ["X2-Gaussian's convention applied (no rgs key in the file): " + ", ".join(fallback)] if fallback else []
    if period_source == "phase_times_s":
        notes.append(f"breathing period {period_s:g} s derived from phase_times_s ({count} evenly "
                     "spaced times over one cycle)")
    elif period_source is None:
        notes.append("no breathing period stated in the file: no period truth")
    conventions = "; ".join(notes) or "scan_seconds, period_s and phase_times_s read from the file"

    proj, geometry, split = _naf_split(where, data, "train", sc)
    time, phase = _split_extras(where, "train", split)
    test = {}
    if data.get("val") is not None:
        test_proj, test_geometry, val = _naf_split(where, data, "val", sc)
        test_time, test_phase = _split_extras(where, "val", val)
        test = {"test_projections": torch.from_numpy(test_proj), "test_geometry": test_geometry,
                "test_time": torch.from_numpy(test_time),
                "test_phase": None if test_phase is None else torch.from_numpy(test_phase)}
    attributes = data.get("rgs_attributes")
    try:
        return Projection4D(
            projections=torch.from_numpy(proj), geometry=geometry, time=torch.from_numpy(time),
            grid=grid, scan_seconds=scan_seconds,
            phase=None if phase is None else torch.from_numpy(phase),
            phases=torch.from_numpy(phases), phase_times_s=torch.from_numpy(phase_times),
            period_s=period_s, conventions=conventions, period_source=period_source, source=where,
            attributes=dict(attributes) if isinstance(attributes, dict) else {}, **test)
    except RgsInputError as exc:
        message = str(exc)
        raise RgsInputError(message if message.startswith(where) else f"{where}: {message}") from exc


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
def _naf_scanner_of(geometry: Geometry) -> tuple[float, float, tuple[float, float]]:
    """(DSO, DSD, (row pitch, column pitch)) of view 0 of a NAF circular cone-beam orbit, mm."""
    vec = geometry.vectors[0]
    src, d = vec[0:3], vec[3:6]
    dso = float(src.norm())
    dsd = dso - float(d @ (src / dso)) if dso > 0 else 0.0
    return dso, dsd, (float(vec[9:12].norm()), float(vec[6:9].norm()))


def _naf_angles(name: str, geometry: Geometry, dso: float, dsd: float,
                pitch: tuple[float, float]) -> np.ndarray:
    """Angles (radians) of ``geometry`` if it is the NAF orbit of DSO / DSD / pitch about the
    world z axis through the origin; raises otherwise (a NAF pickle cannot store it)."""
    if geometry.mode != "cone":
        raise RgsInputError(f"{name} geometry is {geometry.mode}-beam: the 4D NAF pickle is written "
                            "for cone-beam orbits only; save an rgs .h5 file instead")
    src = geometry.vectors[:, 0:3]
    angles = np.unwrap(torch.atan2(src[:, 1], src[:, 0]).numpy())  # continuous, in view order
    try:
        naf = Geometry.circular(angles, dso, dsd, geometry.det_shape, pitch, convention="naf")
        same = bool(torch.allclose(naf.vectors, geometry.vectors, rtol=0.0, atol=_ORBIT_TOL * dsd))
    except RgsInputError:
        same = False
    if not same:
        raise RgsInputError(f"{name} geometry is not one NAF circular orbit (source at DSO (cos a, "
                            "sin a, 0) about the z axis through the origin, centred detector, the "
                            "same DSO / DSD / pixels for every view): a NAF pickle cannot store "
                            "it; centre the orbit on the origin or save an rgs .h5 file")
    return angles


def _naf_split_dict(projections: torch.Tensor, angles: np.ndarray, time: torch.Tensor,
                    phase: torch.Tensor | None) -> dict:
    out = {"projections": (projections.numpy() / NAF_METRES_TO_MM).astype(np.float32),
           "angles": angles.astype(np.float64), "time": time.numpy().astype(np.float64)}
    if phase is not None:
        out["phase"] = phase.numpy().astype(np.int64)
    return out


def save_4d_pickle(path: str | os.PathLike, data: Projection4D, force: bool = False) -> Path:
    """Write ``data`` as a NAF-style 4D pickle (see the module), atomically.

    The geometry must be a NAF circular cone-beam orbit about the world origin (what
    :func:`rgs_engine.sim.breathing_scan.simulate_breathing` makes) and ``data.phases`` must be
    present (NAF's ``image``). Projections are stored divided by 1000 (NAF's metres);
    ``scan_seconds``, ``phase_times_s``, ``period_s`` (when the source stated it:
    ``period_source == "file"``, not derived from the phase times) and ``attributes``
    (``rgs_attributes``) are stored too. An existing ``path`` raises unless ``force``.
    """
    target = Path(path)
    if target.suffix.lower() not in PICKLE_SUFFIXES:
        raise RgsInputError(f"{target}: NAF pickles end in .pickle or .pkl: rename the output")
    if not isinstance(data, Projection4D):
        raise RgsInputError(f"save_4d_pickle needs a Projection4D, got {type(data).__name__}")
    if data.phases is None:
        raise RgsInputError(f"{target}: the data has no ground-truth phases, but a NAF pickle stores "
                            "them as 'image' (P, nx, ny, nz): add phases and phase_times_s")
    dso, dsd, pitch = _naf_scanner_of(data.geometry)
    angles = _naf_angles("training", data.geometry, dso, dsd, pitch)
    grid = data.grid
    # NAF's generator fields: views k arc / N from startAngle (informative; readers use angles)
    arc = float(angles[-1] - angles[0]) * len(angles) / (len(angles) - 1) if len(angles) > 1 else 0.0
    out = {"DSD": dsd, "DSO": dso, "nDetector": list(data.geometry.det_shape), "dDetector": list(pitch),
           "nVoxel": list(grid.shape), "dVoxel": list(grid.spacing),
           "offOrigin": [float(c) for c in grid.centre], "offDetector": [0.0, 0.0],
           "accuracy": 0.5, "mode": "cone", "filter": None,
           "totalAngle": math.degrees(arc), "startAngle": math.degrees(float(angles[0])),
           "numTrain": data.num_views, "numVal": 0,
           "image": data.phases.numpy().astype(np.float32),
           "train": _naf_split_dict(data.projections, angles, data.time, data.phase),
           "scan_seconds": data.scan_seconds,
           "phase_times_s": data.phase_times_s.numpy().astype(np.float64),
           "rgs_attributes": dict(data.attributes)}
    if data.period_s is not None and data.period_source == "file":
        out["period_s"] = data.period_s
    if data.test_projections is not None:
        val_angles = _naf_angles("test", data.test_geometry, dso, dsd, pitch)
        out["numVal"] = data.test_geometry.num_views
        out["val"] = _naf_split_dict(data.test_projections, val_angles, data.test_time, data.test_phase)
    with atomic_write(target, force) as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump(out, fh, protocol=PICKLE_PROTOCOL)
    return target


__all__ = ["Projection4D", "load_4d_pickle", "period_from_phase_times", "save_4d_pickle", "x2_phase_times",
           "X2_SCAN_SECONDS", "X2_PERIOD_SECONDS"]
