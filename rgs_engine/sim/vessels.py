"""A synthetic rotational DSA case: a branching vessel tree filled by a contrast bolus.

* :class:`VesselPhantom` (built by :func:`make_phantom`, seeded): static tissue (a head-sized
  ellipsoid of water-like soft tissue inside a bone-like skull shell, plus two skull-base
  bones; values of overlapping ellipsoids add) and a vessel tree entering from below (the
  world's -z, the C-arm's rotation axis being z). Each branch is a tube of constant radius
  about a smooth centre line (a straight segment bent by half a sine wave); every branch
  ends in a bifurcation until ``generations`` levels, whose child radii follow Murray's law
  (``r^3 = r1^3 + r2^3``, random split) and whose branching angles are Murray's optimal
  ones, ``cos t1 = (r^4 + r1^4 - r2^4) / (2 r^2 r1^2)``; branch lengths are about 10 radii,
  kept inside the brain.
* :class:`Bolus`: the contrast concentration (0..1) at time ``t`` (s) of a point ``p`` mm
  along the tree from the root is a gamma variate ``c(x) = x^a exp(a (1 - x))``, ``x = (t -
  arrival_s - p / velocity) / rise_s`` (0 before arrival, 1 at the peak ``rise_s`` after it,
  washing out after): the contrast reaches farther points later.
* :meth:`VesselPhantom.rasterise` samples the tree on a :class:`VolumeGrid` as a lumen
  fraction per voxel (a one-voxel linear ramp across the tube's surface) and each voxel's
  path length; :class:`VesselVoxels` (sparse: the lumen's voxels only) then gives the
  contrast volume at any time, its mean over a set of times, the lumen fraction and the
  binary lumen mask on the device of choice.
* :func:`simulate_dsa_run`: a 4DRGS-style rotational run (133 frames over 198 degrees in
  4.4 s about the volume's centre, SAD 750 mm, SID 1200 mm): mask run = tissue only, fill
  run = tissue + contrast at each frame's time, raw intensities ``I = I0 exp(-line
  integral)`` with optional Poisson + Gaussian noise, as a :class:`~rgs_engine.io.dsa_case.DsaCase`
  with its ground truth (write it with :func:`~rgs_engine.io.dsa_case.save_dsa_case`).

Lengths in mm, attenuation in 1/mm, times in s.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import ct

from ..core import runtime
from ..io.dsa_case import DsaCase, DsaTruth, dsa_geometry
from ..core.errors import RgsInputError
from ..core.geometry import VolumeGrid
from ..io.mesh import isosurface
from ..core.projector import project
from .scan import add_noise, project_views

MU_CONTRAST = 0.03  # 1/mm: attenuation the full-strength contrast adds to the lumen
MU_BONE_EXTRA = 0.025  # 1/mm: bone-like = water + this
BOX_MM = 160.0  # default cubic volume side (a head)
FRAMES = 133  # 4DRGS's rotational run
ARC_DEG = 198.0  # 133 frames 1.5 degrees apart
DURATION_S = 4.4  # 133 frames at 30 per second
SAD_MM = 750.0
SID_MM = 1200.0
PHOTONS = 1e4  # unattenuated detector counts I0
TRUTH_FRAMES = 5  # per-frame ground-truth volumes written
LENGTH_PER_RADIUS = 10.0  # branch length / radius (times a random 0.8 .. 1.2)
CURVE_STEP_MM = 1.0  # centre-line sampling
SPLIT_CANDIDATES = 12  # bifurcation planes tried; the one keeping both children deepest wins
_PAIR_BUDGET = 1 << 21  # voxel x centre-line segment pairs per block in rasterise


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _perpendicular(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    """A random unit vector perpendicular to the unit vector ``d``."""
    v = rng.normal(size=3)
    return _unit(v - (v @ d) * d)


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bolus:
    """Gamma-variate contrast passage: reaches the root at ``arrival_s`` (s), travels along
    the tree at ``velocity_mm_s`` (mm/s), peaks ``rise_s`` (s) after arriving; ``alpha``
    shapes the curve (larger: sharper)."""

    arrival_s: float = 0.2
    velocity_mm_s: float = 100.0
    rise_s: float = 1.5
    alpha: float = 3.0

    def arrival(self, path_mm):
        """Arrival time (s) at ``path_mm`` (mm along the tree from the root)."""
        return self.arrival_s + path_mm / self.velocity_mm_s

    def concentration(self, t: float, path_mm: torch.Tensor) -> torch.Tensor:
        """Relative concentration (0..1, same shape as ``path_mm``) at time ``t`` (s)."""
        x = ((t - self.arrival(path_mm)) / self.rise_s).clamp_min(0.0)
        return x ** self.alpha * torch.exp(self.alpha * (1.0 - x))


@dataclass(frozen=True, eq=False)
class Branch:
    """One vessel: ``points`` (n, 3) centre line (mm) from its parent's end, ``radius`` (mm),
    ``path_mm`` (n,) distance along the tree from the root's start, ``parent`` index (-1:
    the root)."""

    points: np.ndarray
    radius: float
    path_mm: np.ndarray
    parent: int


@dataclass(frozen=True)
class Ellipsoid:
    """Axis-aligned ellipsoid adding ``value`` (1/mm) inside: ``centre`` and ``semi_axes`` mm."""

    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    value: float

    def inside(self, x: np.ndarray) -> np.ndarray:
        """(...) bool: which of the points ``x`` (..., 3) mm lie inside."""
        return (((x - np.asarray(self.centre)) / np.asarray(self.semi_axes)) ** 2).sum(-1) <= 1.0


@dataclass
class VesselVoxels:
    """The tree sampled on ``grid``, kept sparse (tensors on one device): ``index`` (K,)
    int64 flat indices (C order of ``grid.shape``) of the voxels with lumen, ``fraction``
    (K,) float32 their lumen fraction in (0, 1], ``path_mm`` (K,) float32 the distance
    along the tree of their nearest centre-line point."""

    grid: VolumeGrid
    index: torch.Tensor
    fraction: torch.Tensor
    path_mm: torch.Tensor
    bolus: Bolus
    contrast_mu: float

    def to_volume(self, values: torch.Tensor) -> torch.Tensor:
        """(K,) per-lumen-voxel ``values`` as a (nx, ny, nz) volume, zero elsewhere."""
        out = torch.zeros(math.prod(self.grid.shape), dtype=values.dtype, device=values.device)
        out[self.index] = values
        return out.reshape(self.grid.shape)

    def occupancy(self) -> torch.Tensor:
        """(nx, ny, nz) float32 lumen fraction."""
        return self.to_volume(self.fraction)

    def mask(self) -> torch.Tensor:
        """(nx, ny, nz) bool: voxel centres inside a tube (lumen fraction >= 0.5)."""
        return self.to_volume(self.fraction >= 0.5)

    def volume(self, t: float) -> torch.Tensor:
        """Contrast attenuation (nx, ny, nz) float32, 1/mm, at time ``t`` (s)."""
        return self.to_volume(self.contrast_mu * self.fraction * self.bolus.concentration(t, self.path_mm))

    def mean_volume(self, times) -> torch.Tensor:
        """Contrast attenuation (nx, ny, nz) float32, 1/mm, averaged over ``times`` (s)."""
        times = [float(t) for t in times]
        if not times:
            raise RgsInputError("mean_volume needs at least one time")
        mean = sum(self.bolus.concentration(t, self.path_mm) for t in times) / len(times)
        return self.to_volume(self.contrast_mu * self.fraction * mean)

    def support(self, margin: int = 2) -> tuple[VolumeGrid, tuple[slice, slice, slice]]:
        """The sub-grid holding every lumen voxel plus ``margin`` voxels (clipped to the
        grid), and the slices that cut it out of a (nx, ny, nz) volume."""
        ijk = np.stack(np.unravel_index(self.index.cpu().numpy(), self.grid.shape), 1)
        lo = np.maximum(ijk.min(0) - margin, 0) if len(ijk) else np.zeros(3, int)
        hi = np.minimum(ijk.max(0) + 1 + margin, self.grid.shape) if len(ijk) else np.ones(3, int)
        return self.grid.sub_grid(lo, hi - lo), tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


@dataclass
class VesselPhantom:
    """Vessel tree, bolus and static tissue (see the module doc); :meth:`to_dict` /
    :meth:`from_dict` round-trip it through JSON exactly."""

    branches: list[Branch]
    tissue: list[Ellipsoid]
    bolus: Bolus = field(default_factory=Bolus)
    contrast_mu: float = MU_CONTRAST

    def centrelines(self) -> list[np.ndarray]:
        """Every branch's centre line, (n_i, 3) mm."""
        return [b.points for b in self.branches]

    def to_dict(self) -> dict:
        return {"bolus": asdict(self.bolus), "contrast_mu": self.contrast_mu,
                "tissue": [asdict(e) for e in self.tissue],
                "branches": [{"points": b.points.tolist(), "radius": b.radius,
                              "path_mm": b.path_mm.tolist(), "parent": b.parent} for b in self.branches]}

    @classmethod
    def from_dict(cls, d: dict) -> "VesselPhantom":
        try:
            return cls(branches=[Branch(np.asarray(b["points"], np.float64), float(b["radius"]),
                                        np.asarray(b["path_mm"], np.float64), int(b["parent"]))
                                 for b in d["branches"]],
                       tissue=[Ellipsoid(tuple(e["centre"]), tuple(e["semi_axes"]), float(e["value"]))
                               for e in d["tissue"]],
                       bolus=Bolus(**d["bolus"]), contrast_mu=float(d["contrast_mu"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise RgsInputError(f"vessel phantom description is incomplete ({exc!r}): need "
                                "branches, tissue, bolus and contrast_mu") from exc

    def tissue_volume(self, grid: VolumeGrid, device: torch.device | str = "cpu") -> torch.Tensor:
        """Static attenuation (nx, ny, nz) float32, 1/mm, on ``device``."""
        x = grid.voxel_centres().numpy()
        vol = np.zeros(grid.shape, np.float64)
        for e in self.tissue:
            vol[e.inside(x)] += e.value
        return torch.from_numpy(vol.astype(np.float32)).to(device)

    def rasterise(self, grid: VolumeGrid, device: torch.device | str = "cpu") -> VesselVoxels:
        """Sample the tree on ``grid`` (computed on the CPU, returned on ``device``).

        A voxel whose centre lies at signed distance ``s`` (mm, negative inside) from the
        nearest tube's surface gets the lumen fraction ``clamp(0.5 - s / h, 0, 1)``, ``h``
        the mean voxel spacing, and the path length of that tube's nearest centre-line point.
        """
        spacing, origin = np.asarray(grid.spacing), np.asarray(grid.origin)
        h = float(spacing.mean())
        dist = np.full(grid.shape, np.inf)
        path = np.zeros(grid.shape)
        for b in self.branches:
            lo = np.ceil((b.points.min(0) - b.radius - h - origin) / spacing).astype(int)
            hi = np.floor((b.points.max(0) + b.radius + h - origin) / spacing).astype(int) + 1
            lo, hi = np.maximum(lo, 0), np.minimum(hi, grid.shape)
            if np.any(hi <= lo):
                continue
            box = tuple(slice(a, z) for a, z in zip(lo, hi))
            axes = [origin[i] + np.arange(lo[i], hi[i]) * spacing[i] for i in range(3)]
            x = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
            start, seg = b.points[:-1], np.diff(b.points, axis=0)
            seg_len2 = np.maximum((seg ** 2).sum(1), 1e-12)
            rows = max(1, _PAIR_BUDGET // len(seg))
            best = np.empty(len(x))
            along = np.empty(len(x))
            for i in range(0, len(x), rows):
                rel = x[i:i + rows, None, :] - start[None]  # (m, P, 3)
                s = np.clip((rel * seg).sum(-1) / seg_len2, 0.0, 1.0)
                d = np.linalg.norm(rel - s[..., None] * seg, axis=-1)
                j = d.argmin(1)
                m = np.arange(len(j))
                best[i:i + rows] = d[m, j] - b.radius
                along[i:i + rows] = b.path_mm[j] + s[m, j] * np.sqrt(seg_len2[j])
            best, along = best.reshape(hi - lo), along.reshape(hi - lo)
            closer = best < dist[box]
            dist[box][closer] = best[closer]
            path[box][closer] = along[closer]
        fraction = np.clip(0.5 - dist / h, 0.0, 1.0).reshape(-1)
        index = np.flatnonzero(fraction)

        def dev(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device)

        return VesselVoxels(grid, dev(index), dev(fraction[index].astype(np.float32)),
                            dev(path.reshape(-1)[index].astype(np.float32)), self.bolus, self.contrast_mu)


# --------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------
def _depth(p: np.ndarray, centre: np.ndarray, axes: np.ndarray) -> float:
    """Ellipsoidal radius of ``p``: < 1 inside the region ``(centre, axes)``."""
    return float(np.linalg.norm((p - centre) / axes))


def _centre_line(rng: np.random.Generator, start: np.ndarray, d: np.ndarray, length: float) -> np.ndarray:
    """``start + s L d + A sin(pi s) n`` for s in [0, 1]: (n, 3) points about 1 mm apart."""
    s = np.linspace(0.0, 1.0, max(4, math.ceil(length / CURVE_STEP_MM)) + 1)[:, None]
    bend = rng.uniform(0.05, 0.12) * length * _perpendicular(rng, d)
    return start + s * length * d + np.sin(math.pi * s) * bend


def _murray_angle(r: float, r_this: float, r_other: float) -> float:
    """Murray's optimal angle (radians) between a parent of radius ``r`` and its child."""
    c = (r ** 4 + r_this ** 4 - r_other ** 4) / (2 * r ** 2 * r_this ** 2)
    return math.acos(min(1.0, max(-1.0, c)))


def _grow(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, radius: float,
          generations: int, centre: np.ndarray, axes: np.ndarray) -> list[Branch]:
    """The tree from a root at ``start`` heading along ``direction``, breadth first."""
    branches: list[Branch] = []
    queue = [(start, direction, radius, 0.0, -1, 0)]
    while queue:
        p0, d, r, path0, parent, gen = queue.pop(0)
        length = LENGTH_PER_RADIUS * r * rng.uniform(0.8, 1.2)
        while length > r and _depth(p0 + length * d, centre, axes) > 1.0:
            length /= 2  # keep the branch inside the region
        if length <= r:
            continue
        pts = _centre_line(rng, p0, d, length)
        path = path0 + np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
        branches.append(Branch(pts, r, path, parent))
        if gen == generations:
            continue
        tangent = _unit(pts[-1] - pts[-2])
        share = rng.uniform(0.35, 0.65)
        r1, r2 = r * share ** (1 / 3), r * (1 - share) ** (1 / 3)  # Murray: r^3 = r1^3 + r2^3
        t1, t2 = _murray_angle(r, r1, r2), _murray_angle(r, r2, r1)
        best = None
        for _ in range(SPLIT_CANDIDATES):
            e = _perpendicular(rng, tangent)
            dirs = (math.cos(t1) * tangent + math.sin(t1) * e, math.cos(t2) * tangent - math.sin(t2) * e)
            score = max(_depth(pts[-1] + LENGTH_PER_RADIUS * rc * dc, centre, axes)
                        for rc, dc in zip((r1, r2), dirs))
            if best is None or score < best[0]:
                best = (score, dirs)
        for rc, dc in zip((r1, r2), best[1]):
            queue.append((pts[-1], dc, rc, path[-1], len(branches) - 1, gen + 1))
    return branches


def make_phantom(seed: int = 0, box_mm: float = BOX_MM, generations: int = 4, root_radius: float = 3.0,
                 bolus: Bolus | None = None, contrast_mu: float = MU_CONTRAST) -> VesselPhantom:
    """A seeded head-and-vessels phantom for a cubic box of side ``box_mm`` centred on the
    origin: root of ``root_radius`` mm and ``generations`` levels of bifurcations
    (``2^(generations + 1) - 1`` branches when none is cut short by the skull)."""
    if not (math.isfinite(box_mm) and box_mm > 0 and root_radius > 0 and generations >= 0):
        raise RgsInputError(f"need box_mm > 0, root_radius > 0 and generations >= 0, got "
                            f"{box_mm}, {root_radius}, {generations}")
    rng = np.random.default_rng(seed)
    head = np.array([0.42, 0.47, 0.44]) * box_mm
    brain = head - 0.04 * box_mm  # inside the skull shell
    bone = ct.MU_WATER + MU_BONE_EXTRA
    tissue = [Ellipsoid((0.0, 0.0, 0.0), tuple(head), bone),
              Ellipsoid((0.0, 0.0, 0.0), tuple(brain), -MU_BONE_EXTRA)]
    tissue += [Ellipsoid((side * 0.18 * box_mm, -0.02 * box_mm, -0.2 * box_mm),
                         tuple(np.array([0.1, 0.05, 0.04]) * box_mm), MU_BONE_EXTRA) for side in (-1, 1)]
    region = 0.85 * brain
    start = np.array([0.0, 0.0, -0.95 * region[2]])
    branches = _grow(rng, start, np.array([0.0, 0.0, 1.0]), root_radius, generations, np.zeros(3), region)
    return VesselPhantom(branches, tissue, bolus or Bolus(), contrast_mu)


# --------------------------------------------------------------------------------------
# The rotational run
# --------------------------------------------------------------------------------------
def run_angles(frames: int, arc_deg: float = ARC_DEG) -> np.ndarray:
    """(frames,) radians evenly over ``arc_deg`` centred on 90 degrees (source at +y), first
    and last included."""
    f = np.arange(frames) / max(1, frames - 1)
    return math.pi / 2 + (f - 0.5) * math.radians(arc_deg)


def simulate_dsa_run(phantom: VesselPhantom, grid: VolumeGrid, frames: int = FRAMES, det: int = 256,
                     sad: float = SAD_MM, sid: float = SID_MM, arc_deg: float = ARC_DEG,
                     duration_s: float = DURATION_S, noise: tuple[float, float] | None = None,
                     photons: float = PHOTONS, seed: int = 0, truth_frames: int = TRUTH_FRAMES) -> DsaCase:
    """Mask and fill runs of ``phantom`` on ``grid`` (centred on the origin) with ground truth.

    Frame ``f`` is taken at ``t_f = f duration / (frames - 1)`` s from angle
    :func:`run_angles` ``[f]`` (:func:`~rgs_engine.io.dsa_case.dsa_geometry`), on a ``det`` x
    ``det`` detector of square pixels that sees the whole box. Line integrals: mask
    ``p_m`` = Joseph projection of the tissue, fill ``p_m + p_c`` with ``p_c`` the
    projection of :meth:`VesselVoxels.volume` ``(t_f)`` in frame ``f``'s view; intensities
    ``photons exp(-p)`` or, with ``noise = (photons, sigma)``, Poisson counts plus Gaussian
    electronic noise (:func:`~rgs_engine.sim.scan.add_noise`, physical model, counts at
    least 0.5; mask and fill noise independent, seeded by ``seed``). The truth holds the
    mean contrast volume over the frames' times, the lumen mask and surface (marching
    tetrahedra of the lumen fraction at 0.5), ``truth_frames`` per-frame volumes evenly
    spread over the run, the centre lines and the phantom's parameters.
    """
    if frames < 1 or det < 8 or truth_frames < 0:
        raise RgsInputError(f"need frames >= 1, det >= 8 and truth_frames >= 0, got {frames}, {det}, {truth_frames}")
    if not (0 < arc_deg <= 360 and duration_s > 0 and photons > 0):
        raise RgsInputError(f"need 0 < arc <= 360 degrees, duration > 0 s and photons > 0, got "
                            f"{arc_deg:g}, {duration_s:g}, {photons:g}")
    dev = runtime.ensure()
    if noise is not None:
        photons = float(noise[0])
    times = torch.linspace(0.0, duration_s, frames, dtype=torch.float64)
    angles = run_angles(frames, arc_deg)
    pixel = float(ct.covering_scan(grid, 1, sad, sid, det).vectors[0, 6:9].norm())
    geometry = dsa_geometry(angles, sad, sid, (det, det), (pixel, pixel))
    voxels = phantom.rasterise(grid, dev)
    p_mask = project_views(phantom.tissue_volume(grid, dev), grid, geometry).to(torch.float64)
    p_fill = p_mask.clone()
    sub, box = voxels.support()  # the contrast is zero elsewhere: project the lumen's box only
    for f in range(frames):
        contrast = voxels.volume(float(times[f]))[box].contiguous()
        p_fill[f] += project(contrast, sub, geometry.subset([f]))[0].cpu().to(torch.float64)
    runs = []
    gen = torch.Generator().manual_seed(int(seed))
    for p in (p_mask, p_fill):
        if noise is not None:
            p = add_noise(p, photons, float(noise[1]), "physical", gen)[0].to(torch.float64)
        runs.append((photons * torch.exp(-p)).to(torch.float32))
    picks = sorted({int(round(x)) for x in np.linspace(0, frames - 1, truth_frames)}) if truth_frames else []
    truth = DsaTruth(
        mean_volume=voxels.mean_volume(times.tolist()).cpu(), mask=voxels.mask().cpu(),
        frame_volumes={k: voxels.volume(float(times[k])).cpu() for k in picks},
        surface=isosurface(voxels.occupancy(), grid, 0.5),
        centrelines=phantom.centrelines(),
        parameters={"phantom": phantom.to_dict(),
                    "run": {"frames": frames, "det": det, "pixel_mm": pixel, "sad_mm": sad, "sid_mm": sid,
                            "arc_deg": arc_deg, "duration_s": duration_s, "photons": photons,
                            "noise": None if noise is None else list(noise), "seed": seed,
                            "grid": grid.to_dict()}})
    return DsaCase(mask_run=runs[0], fill_run=runs[1], angles=torch.from_numpy(angles), grid=grid,
                   sad=sad, sid=sid, pixel_size=(pixel, pixel), times=times, truth=truth)
