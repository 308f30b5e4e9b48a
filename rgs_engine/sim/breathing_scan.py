"""A simulated free-breathing cone-beam scan of a real CT (``rgs simulate4d``).

:func:`simulate_breathing` turns an attenuation volume into a :class:`~rgs_engine.io.naf4d.
Projection4D`:

1. the grid is translated so that its centre is the world origin (NAF's rotation axis; the
   axes stay RAS+, the original centre is kept in ``attributes["ct_centre_mm"]``);
2. the breathing displacement field of :func:`rgs_engine.sim.breathing.displacement_field`
   (``amplitude_mm`` = peak SI, peak AP in mm) driven by the breathing curve of
   :func:`rgs_engine.sim.breathing.motion_amplitudes` (``period_s``, optionally irregular; the
   AP motion lags the SI motion, so every phase of a cycle is a distinct volume);
3. ``projections`` views at times ``k scan_seconds / N`` (time fractions ``k / N``) on a
   full-circle orbit at constant speed (angle ``2 pi k / N``), NAF convention, distances of
   :func:`rgs_engine.sim.scan.default_distances`, a ``det`` x ``det`` detector covering the
   box; each view is the Joseph projection of the volume warped to its time
   (:func:`rgs_engine.sim.breathing.warp`), warps batched on the runtime device;
4. ``val_projections`` noiseless test views at seeded random times, at the angle the gantry
   has then; noise on the training views as ``rgs simulate`` (:func:`rgs_engine.sim.scan.
   add_noise`);
5. ground truth: the warped volume at ``phases`` times evenly spread over the breathing
   cycle that contains the middle of the scan (bin centres, as X2-Gaussian's
   ``0.15 + 0.3 k``); each projection's ``phase`` is the bin of its time in its own cycle.

:func:`simulate_breathing_case` does the same from a CT file in Hounsfield units.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..core import runtime
from ..core.errors import RgsInputError
from ..core.geometry import Geometry, VolumeGrid
from ..core.projector import project
from ..io.naf4d import Projection4D
from . import scan as sim
from .breathing import (
    breathing_cycles,
    breathing_phase,
    displacement_field,
    drifted,
    motion_amplitudes,
    warp,
)

MIN_CYCLES = 4  # the scan must hold at least this many nominal breathing periods
_WARP_VOXELS = 1 << 25  # voxels warped per grid_sample call


@dataclass(frozen=True)
class BreathingSpec:
    """What to simulate. Seconds, mm; ``noise`` is ``(photons, sigma)`` or None.

    ``amplitude_mm`` = (peak inferior displacement of the diaphragm, peak anterior
    displacement of the chest wall); with ``irregular`` the peaks are reached in the deep
    breath and normal breaths are smaller. ``depth_drift`` / ``baseline_shift``: the
    breaths grow shallower by that fraction / the end-exhale level rises by that fraction of
    the peak over the scan (:func:`rgs_engine.sim.breathing.drifted`). ``seed`` draws the
    irregular cycles, the test times and the noise.
    """

    projections: int = 300
    val_projections: int = 10
    scan_seconds: float = 60.0
    period_s: float = 3.5
    irregular: bool = False
    amplitude_mm: tuple[float, float] = (15.0, 5.0)
    depth_drift: float = 0.0
    baseline_shift: float = 0.0
    phases: int = 10
    det: int = 256
    noise: tuple[float, float] | None = None
    noise_model: str = "tigre"
    seed: int = 0

    @property
    def drifts(self) -> dict:
        """The slow drifts' keywords of :func:`rgs_engine.sim.breathing.motion_amplitudes`."""
        return {"depth_drift": self.depth_drift, "baseline_shift": self.baseline_shift,
                "horizon_s": self.scan_seconds}

    def check(self) -> None:
        if self.projections < 1:
            raise RgsInputError(f"--projections {self.projections}: need at least 1 projection")
        if self.val_projections < 0:
            raise RgsInputError(f"--val-projections {self.val_projections}: must be 0 or more")
        if not (math.isfinite(self.period_s) and self.period_s > 0):
            raise RgsInputError(f"--period {self.period_s:g}: the breathing period must be positive (s)")
        if not (math.isfinite(self.scan_seconds) and self.scan_seconds >= MIN_CYCLES * self.period_s):
            raise RgsInputError(f"--scan-seconds {self.scan_seconds:g}: the scan must last at least "
                                f"{MIN_CYCLES} breathing periods ({MIN_CYCLES * self.period_s:g} s): "
                                "lengthen the scan or shorten --period")
        si, ap = self.amplitude_mm
        if not (math.isfinite(si) and math.isfinite(ap) and si >= 0 and ap >= 0):
            raise RgsInputError(f"--amplitude-mm {si:g},{ap:g}: amplitudes must be mm >= 0")
        if self.phases < 1:
            raise RgsInputError(f"--phases {self.phases}: need at least 1 ground-truth phase")
        drifted(torch.zeros(()), 0.0, **self.drifts)
        sim.ScanSpec(views=self.projections, test_views=self.val_projections, det=self.det,
                     noise=self.noise, noise_model=self.noise_model, seed=self.seed).check()


def parse_amplitude(text: str) -> tuple[float, float]:
    """``"SI,AP"`` (e.g. ``"15,5"``) -> (si_mm, ap_mm); one number sets SI and keeps AP at a
    third of it."""
    parts = text.split(",")
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        values = [float(p) for p in parts]
    except ValueError:
        raise RgsInputError(f"--amplitude-mm {text!r}: write SI,AP in mm (e.g. 15,5)") from None
    si, ap = values if len(values) == 2 else (values[0], values[0] / 3)
    if not (math.isfinite(si) and math.isfinite(ap) and si >= 0 and ap >= 0):
        raise RgsInputError(f"--amplitude-mm {text!r}: amplitudes must be mm >= 0")
    return si, ap


def _project_at(volume: torch.Tensor, grid: VolumeGrid, field: torch.Tensor, geometry: Geometry,
                amplitudes: torch.Tensor) -> torch.Tensor:
    """View k of ``geometry`` projected through the volume warped by ``amplitudes[k]``
    ((V, 3) per-axis, see :func:`warp`): (V, H, W) float32 CPU line integrals."""
    h, w = geometry.det_shape
    out = torch.empty(geometry.num_views, h, w, dtype=torch.float32)
    step = max(1, _WARP_VOXELS // math.prod(grid.shape))
    for s in range(0, geometry.num_views, step):
        e = min(geometry.num_views, s + step)
        warped = warp(volume, grid, field, amplitudes[s:e])
        out[s:e] = torch.cat([project(warped[b], grid, geometry.subset([s + b]))
                              for b in range(e - s)]).cpu()
    return out


def _phase_bins(times_s: torch.Tensor, spec: BreathingSpec) -> torch.Tensor:
    """(N,) int64: the phase bin (of ``spec.phases``) of each time within its own cycle."""
    frac = breathing_phase(times_s, spec.period_s, spec.irregular, spec.seed)
    return (frac * spec.phases).floor().clamp(max=spec.phases - 1).to(torch.int64)


def simulate_breathing(volume: torch.Tensor, grid: VolumeGrid, spec: BreathingSpec,
                       source: str = "", stage: Callable | None = None,
                       extra_attributes: dict | None = None) -> Projection4D:
    """Simulate ``spec`` on ``volume`` (attenuation in 1/mm on ``grid``, RAS+ axes, on the
    runtime device) into a :class:`Projection4D` on the grid re-centred at the origin (see
    the module). ``stage(key, label)``, if given, is a context-manager factory wrapping each
    step (the CLI's progress display)."""
    spec.check()
    step = stage if stage is not None else (lambda key, label: contextlib.nullcontext())
    dev = runtime.ensure()
    volume = volume.to(device=dev, dtype=torch.float32)
    centred = VolumeGrid.centred(grid.shape, grid.spacing)
    si_mm, ap_mm = spec.amplitude_mm
    with step("motion", f"breathing motion: SI {si_mm:g} mm, AP {ap_mm:g} mm"):
        field = displacement_field(volume, centred, si_mm, ap_mm)
    n = spec.projections
    time = torch.arange(n, dtype=torch.float64) / n
    dso, dsd = sim.default_distances(centred)
    geometry = sim.circular_geometry(centred, 2 * math.pi * time.numpy(), dso, dsd, spec.det)
    pixel = float(geometry.vectors[0, 6:9].norm())
    curve = {"period_s": spec.period_s, "irregular": spec.irregular, "seed": spec.seed}
    with step("project", f"project {n} views at their times"):
        clean = _project_at(volume, centred, field, geometry,
                            motion_amplitudes(time * spec.scan_seconds, **curve, **spec.drifts))
    test = {}
    if spec.val_projections:
        rng = np.random.default_rng(spec.seed)
        test_time = torch.from_numpy(np.sort(rng.uniform(0.0, 1.0, spec.val_projections)))
        test_geometry = sim.circular_geometry(centred, 2 * math.pi * test_time.numpy(), dso, dsd,
                                              spec.det, pixel)
        with step("project_test", f"project {spec.val_projections} test views"):
            test = {"test_projections": _project_at(
                        volume, centred, field, test_geometry,
                        motion_amplitudes(test_time * spec.scan_seconds, **curve, **spec.drifts)),
                    "test_geometry": test_geometry, "test_time": test_time,
                    "test_phase": _phase_bins(test_time * spec.scan_seconds, spec)}
    starts, _ = breathing_cycles(spec.scan_seconds, **curve)
    k = int(np.searchsorted(starts, spec.scan_seconds / 2, side="right")) - 1
    phase_times = torch.from_numpy(
        starts[k] + (np.arange(spec.phases) + 0.5) / spec.phases * (starts[k + 1] - starts[k]))
    with step("phases", f"ground truth at {spec.phases} phase times"):
        phases = torch.cat([warp(volume, centred, field, a[None]).cpu()
                            for a in motion_amplitudes(phase_times, **curve, **spec.drifts)])
    projections = clean
    info = {"dso_mm": dso, "dsd_mm": dsd, "pixel_mm": pixel, "detector": [spec.det, spec.det]}
    if spec.noise is not None:
        photons, sigma = spec.noise
        with step("noise", f"noise: {photons:g} photons, sigma {sigma:g}"):
            gen = torch.Generator().manual_seed(int(spec.seed))
            projections, info["noise_scale"] = sim.add_noise(clean, photons, sigma, spec.noise_model, gen)
    attributes = {"parameters": asdict(spec), "scan": info,
                  "ct_centre_mm": [float(c) for c in grid.centre],
                  "phase_cycle_s": [float(starts[k]), float(starts[k + 1])],
                  "axes": "RAS+: x left, y anterior, z superior (mm)",
                  **(extra_attributes or {})}
    return Projection4D(
        projections=projections, geometry=geometry, time=time, grid=centred,
        scan_seconds=spec.scan_seconds, phase=_phase_bins(time * spec.scan_seconds, spec),
        phases=phases, phase_times_s=phase_times, period_s=spec.period_s,
        conventions="rgs simulate4d: scan_seconds, period_s (the nominal period) and "
                    "phase_times_s set by the simulation",
        source=source, attributes=attributes, **test)


def simulate_breathing_case(ct_path, grid_size: int = 128, spec: BreathingSpec = BreathingSpec(),
                            stage: Callable | None = None,
                            extra_attributes: dict | None = None) -> Projection4D:
    """:func:`simulate_breathing` of a CT file in Hounsfield units (axis-aligned NIfTI),
    converted to attenuation on an isotropic grid of ``grid_size`` voxels along its longest
    edge (:func:`rgs_engine.sim.scan.load_ct_volume`), on the runtime device."""
    step = stage if stage is not None else (lambda key, label: contextlib.nullcontext())
    with step("volume", f"load {Path(ct_path).name}, HU -> attenuation"):
        volume, grid = sim.load_ct_volume(ct_path, grid_size, runtime.ensure())
    return simulate_breathing(volume, grid, spec, source=str(ct_path), stage=stage,
                              extra_attributes=extra_attributes)
