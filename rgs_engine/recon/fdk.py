"""FDK reconstruction for circular cone-beam orbits (plain FBP for circular parallel beams).

:func:`fdk` ``(projections (V, H, W) unitless line integrals, geometry, grid, filter) ->
(nx, ny, nz)`` float32 attenuation in 1/mm, so that ``fdk(project(x)) ~ x``. Not
differentiable (a reconstruction, not a training op).

Orbit (:func:`circular_orbit`, from the geometry's vectors, tolerance :data:`ORBIT_TOL`):

* cone: at least 3 sources on one circle (one plane, one distance DSO from the axis through
  its centre); every detector perpendicular to the line from its source to the axis and its
  rows (``u``) perpendicular to the axis. Detector offsets are free: the principal point (the
  foot of the perpendicular from the source on the detector plane) may sit anywhere, and the
  source-detector distance DSD may differ per view. The detector must cover the object (no
  truncation / offset-detector redundancy weighting).
* parallel: ray directions in one plane (two or more distinct ones), detectors perpendicular
  to the rays, rows perpendicular to the rotation axis.

Steps:

1. cone only: cosine pre-weighting ``DSD / sqrt(DSD^2 + rho^2)``, ``rho`` the pixel's distance
   from the principal point on the detector;
2. ramp filtering of every detector row in coordinates scaled to the isocentre (column pitch
   ``|u| DSO / DSD``; ``|u|`` for parallel): zero-padded FFT of the band-limited spatial ramp
   kernel of Kak & Slaney (``h(0) = 1 / (4 tau^2)``, ``h(n tau) = -1 / (n pi tau)^2`` for odd
   ``n``, 0 for even), optionally times a Hann window (``"hann"``); float64 torch.fft;
3. voxel-driven backprojection (:mod:`rgs_engine.kernels.fdk`, all views in one launch):
   bilinear interpolation of the filtered projection at each voxel centre's projection, FDK
   distance weight ``(DSO / depth)^2`` (cone), and the angular weights.

Angular weights (:func:`angular_weights`): each view gets half the angular gaps to its two
neighbours (cyclically), so non-uniform angle sets work. The normalisation assumes a full
scan: 360 degrees for cone beam (``f = 1/2 sum_v w_v (DSO / depth)^2 q_v``), 180 degrees for
parallel beam (opposite views see the same lines; ``f = sum_v w_v q_v``). On a partial scan
the missing arc is split between its two end views (no Parker short-scan weights).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core import bridge, runtime
from ..core.errors import RgsInputError
from ..core.geometry import Geometry, VolumeGrid
from ..kernels import fdk as kern
from ..core.projector import check_input, check_problem

FILTERS = ("ramp", "hann")
ORBIT_TOL = 1e-3  # relative (positions / DSO) and angular (radians) tolerance of the orbit checks
_FFT_CHUNK = 1 << 24  # padded samples filtered at once


@dataclass(frozen=True)
class CircularOrbit:
    """A circular orbit found in a geometry; float64 CPU tensors, mm and radians.

    ``angles`` (V,) in ``[0, period)`` about the unit ``axis`` (3,); ``period`` is 2 pi (cone)
    or pi (parallel); ``magnification`` (V,) is DSD / DSO per view (1 for parallel). Cone
    only (None for parallel): ``dsd`` (V,) source-to-detector-plane distances and
    ``principal`` (V, 2) the principal point as continuous (row, column) pixel coordinates.
    """

    axis: torch.Tensor
    angles: torch.Tensor
    period: float
    magnification: torch.Tensor
    dsd: torch.Tensor | None
    principal: torch.Tensor | None


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _plane_angles(x: torch.Tensor, basis: torch.Tensor, period: float) -> torch.Tensor:
    """Angles (V,) of vectors ``x`` (V, 3) in the plane of ``basis`` rows e1, e2, mod period."""
    return torch.remainder(torch.atan2(x @ basis[1], x @ basis[0]), period)


def _detector_normals(geometry: Geometry) -> torch.Tensor:
    """(V, 3) unit normals ``u x v`` of the detectors."""
    return _unit(torch.linalg.cross(geometry.vectors[:, 6:9], geometry.vectors[:, 9:12]))


def _check_detectors(geometry: Geometry, facing: torch.Tensor, axis: torch.Tensor) -> None:
    """Detector normals along ``facing`` (V, 3) unit vectors, rows perpendicular to ``axis``."""
    tilt = torch.linalg.cross(_detector_normals(geometry), facing).norm(dim=1)
    row_tilt = (_unit(geometry.vectors[:, 6:9]) @ axis).abs()
    for name, err in (("is not perpendicular to its central ray (tilted detector)", tilt),
                      ("has rows (u) that are not perpendicular to the rotation axis", row_tilt)):
        k = int(err.argmax())
        if float(err[k]) > ORBIT_TOL:
            raise RgsInputError(f"view {k}: the detector {name} by {float(err[k]):.2e} rad: "
                                "FDK needs a circular orbit; use an iterative method instead")


def _cone_orbit(geometry: Geometry) -> CircularOrbit:
    vec = geometry.vectors
    src, d = vec[:, 0:3], vec[:, 3:6]
    if geometry.num_views < 3:
        raise RgsInputError(f"FDK needs at least 3 views on a circular orbit, got {geometry.num_views}")
    centroid = src.mean(0)
    _, sing, vh = torch.linalg.svd(src - centroid, full_matrices=False)
    if float(sing[1]) <= 1e-6 * float(sing[0]) or float(sing[0]) == 0.0:
        raise RgsInputError("the sources lie on a line (or coincide): FDK needs a circular orbit")
    xy = (src - centroid) @ vh[:2].T
    # circle x^2 + y^2 = 2 cx x + 2 cy y + k, least squares
    lhs = torch.cat([2 * xy, torch.ones_like(xy[:, :1])], dim=1)
    sol = torch.linalg.lstsq(lhs, (xy ** 2).sum(1, keepdim=True)).solution.reshape(-1)
    centre = centroid + sol[:2] @ vh[:2]
    dso = float(torch.sqrt(sol[2] + (sol[:2] ** 2).sum()))
    axis = torch.linalg.cross(vh[0], vh[1])
    off = torch.maximum(((src - centroid) @ axis).abs(), ((src - centre).norm(dim=1) - dso).abs())
    k = int(off.argmax())
    if float(off[k]) > ORBIT_TOL * dso:
        raise RgsInputError(f"view {k}: the source is {float(off[k]):.3g} mm off the best-fit circle "
                            f"(radius {dso:.4g} mm): FDK needs a circular orbit")
    radial = _unit(src - centre)
    _check_detectors(geometry, radial, axis)
    normal = _detector_normals(geometry)
    dist = ((d - src) * normal).sum(1)
    behind = dist * (normal * radial).sum(1) > 0
    if bool(behind.any()):
        raise RgsInputError(f"view {int(behind.nonzero()[0])}: the detector lies behind the source "
                            "(away from the rotation axis): FDK needs it across the axis")
    foot = src + dist[:, None] * normal
    rows = geometry.projection_rows()  # the foot is in the detector plane: Pn . (foot - src) = 1
    t = foot - src
    principal = torch.stack([(rows[:, 3:6] * t).sum(1), (rows[:, 0:3] * t).sum(1)], 1)
    return CircularOrbit(axis, _plane_angles(src - centre, vh[:2], 2 * math.pi), 2 * math.pi,
                         dist.abs() / dso, dist.abs(), principal)


def _parallel_orbit(geometry: Geometry) -> CircularOrbit:
    rays = _unit(geometry.vectors[:, 0:3])
    _, sing, vh = torch.linalg.svd(rays, full_matrices=False)
    if geometry.num_views < 2 or float(sing[1]) <= 1e-6:
        raise RgsInputError("all parallel-beam views share one ray direction: FBP needs a "
                            "rotation (two or more directions in one plane)")
    axis = vh[2]
    k = int((rays @ axis).abs().argmax())
    if float((rays[k] @ axis).abs()) > ORBIT_TOL:
        raise RgsInputError(f"view {k}: the ray directions do not lie in one plane: FBP needs a "
                            "circular parallel-beam orbit")
    _check_detectors(geometry, rays, axis)
    ones = torch.ones(geometry.num_views, dtype=torch.float64)
    return CircularOrbit(axis, _plane_angles(rays, vh[:2], math.pi), math.pi, ones, None, None)


def circular_orbit(geometry: Geometry) -> CircularOrbit:
    """Recognise the circular orbit of ``geometry`` or raise :class:`RgsInputError` saying why."""
    return _cone_orbit(geometry) if geometry.mode == "cone" else _parallel_orbit(geometry)


def angular_weights(angles: torch.Tensor, period: float) -> torch.Tensor:
    """(V,) weights (radians): half the gaps to each view's two cyclic neighbours; sum = period."""
    order = torch.argsort(angles)
    ordered = angles[order]
    gaps = torch.diff(torch.cat([ordered, ordered[:1] + period]))  # gap after each sorted view
    weights = torch.empty_like(angles)
    weights[order] = 0.5 * (gaps + torch.roll(gaps, 1))
    return weights


def view_scales(orbit: CircularOrbit) -> torch.Tensor:
    """(V,) angular weight times the FBP normalisation: ``w pi / period``."""
    return angular_weights(orbit.angles, orbit.period) * (math.pi / orbit.period)


def ramp_response(n: int, filter: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n // 2 + 1,) float64 frequency response of the unit-pitch band-limited ramp (Kak & Slaney).

    ``n`` is the (even) padded length; ``"hann"`` multiplies by ``(1 + cos(2 pi f)) / 2``
    (f in cycles per sample), which is 0 at the Nyquist frequency.
    """
    if filter not in FILTERS:
        raise RgsInputError(f"unknown FDK filter {filter!r}: use one of {', '.join(FILTERS)}")
    lag = torch.arange(n, dtype=torch.float64, device=device)
    lag = torch.where(lag <= n // 2, lag, lag - n)
    odd = lag.remainder(2) == 1
    kernel = torch.zeros_like(lag)
    kernel[odd] = -1.0 / (math.pi * lag[odd]) ** 2
    kernel[0] = 0.25
    response = torch.fft.rfft(kernel).real
    if filter == "hann":
        freq = torch.arange(n // 2 + 1, dtype=torch.float64, device=device) / n
        response = response * 0.5 * (1 + torch.cos(2 * math.pi * freq))
    return response


def filter_projections(projections: torch.Tensor, geometry: Geometry, orbit: CircularOrbit,
                       filter: str = "ramp") -> torch.Tensor:
    """Cosine-weighted (cone), ramp-filtered projections: (V, H, W) float64, 1/mm.

    Rows are filtered in coordinates scaled to the isocentre (pitch ``|u| / magnification``);
    ``projections`` (V, H, W) stay on their device.
    """
    p = projections.detach().to(torch.float64)
    dev = p.device
    n_views, height, width = p.shape
    u, v = geometry.vectors[:, 6:9], geometry.vectors[:, 9:12]
    if orbit.principal is not None:
        cols = torch.arange(width, dtype=torch.float64) - orbit.principal[:, 1:2]  # (V, W)
        rows = torch.arange(height, dtype=torch.float64) - orbit.principal[:, 0:1]  # (V, H)
        uu, vv, uv = ((a * b).sum(1).to(dev)[:, None, None] for a, b in ((u, u), (v, v), (u, v)))
        cols, rows = cols.to(dev)[:, None, :], rows.to(dev)[:, :, None]
        rho2 = cols ** 2 * uu + rows ** 2 * vv + 2 * rows * cols * uv
        dsd = orbit.dsd.to(dev)[:, None, None]
        p = p * dsd / torch.sqrt(dsd ** 2 + rho2)
    n = 1 << (2 * width - 1).bit_length()  # power of two >= 2 W: no circular wrap-around
    response = ramp_response(n, filter, dev)
    pitch = (u.norm(dim=1) / orbit.magnification).to(dev)
    out = torch.empty_like(p)
    step = max(1, _FFT_CHUNK // (height * n))
    for s in range(0, n_views, step):
        spec = torch.fft.rfft(p[s:s + step], n=n, dim=-1) * response
        out[s:s + step] = torch.fft.irfft(spec, n=n, dim=-1)[..., :width] / pitch[s:s + step, None, None]
    return out


def fdk(projections: torch.Tensor, geometry: Geometry, grid: VolumeGrid,
        filter: str = "ramp") -> torch.Tensor:
    """FDK (cone) / FBP (parallel) reconstruction on ``grid``: (nx, ny, nz) float32, 1/mm.

    ``projections`` (V, H, W) line integrals (float32/float64 on the runtime device) of a
    circular orbit; ``filter`` is ``"ramp"`` or ``"hann"``.
    """
    check_problem(grid, geometry)
    check_input("projections", projections, (geometry.num_views, *geometry.det_shape))
    orbit = circular_orbit(geometry)
    dev = runtime.ensure()
    filtered = bridge.as_float32(filter_projections(projections, geometry, orbit, filter))
    factor = (view_scales(orbit) / orbit.magnification ** 2).to(device=dev, dtype=torch.float32)
    out = bridge.kernel_output(*grid.shape)
    kern.backproject(filtered, geometry.kernel_table(dev), factor, out, *grid.origin,
                     *grid.spacing, geometry.mode == "cone")
    return out
