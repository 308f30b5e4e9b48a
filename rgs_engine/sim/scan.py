"""Simulated X-ray scans of a volume: orbits, DRR projection, noise, R2-Gaussian scaling.

The pieces of ``rgs simulate`` (each usable on its own):

* :func:`default_distances` — DSO = 2.5 and DSD = 3.5 times the volume box's longest edge
  (R2-Gaussian's 5 / 7 with a box of side 2);
* :func:`circular_geometry` — evenly spaced views over an arc about the z axis through the
  grid's centre (TIGRE convention), detector sized by :func:`rgs_engine.sim.ct.covering_scan`;
* :func:`arbitrary_geometry` — random calibrated C-arm poses (as IXGS): primary angle
  uniform over the arc, secondary (cranio-caudal) angle uniform within +-``tilt_deg``,
  random in-plane detector rotation, isocentre jitter, via :meth:`Geometry.from_poses`;
* :func:`project_views` — Joseph DRR of every view in batches on the runtime device;
* :func:`add_noise` — Poisson photon counts plus Gaussian electronic noise (TIGRE's
  ``CTnoise.add`` model, as R2-Gaussian uses it, or the unscaled physical model);
* :func:`normalise_volume` — R2-Gaussian's protocol: values in [0, 1] per half box side;
* :func:`simulate` — all of the above into a :class:`~rgs_engine.io.projections.ProjectionData`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from . import ct

from ..core import runtime
from ..core.errors import RgsInputError
from ..core.geometry import Geometry, VolumeGrid
from ..io.projections import ProjectionData
from ..core.projector import project

ORBITS = ("circular", "arbitrary")
NOISE_MODELS = ("tigre", "physical")
DSO_PER_SIDE = 2.5  # R2-Gaussian: DSO 5 for a box of side 2
DSD_PER_SIDE = 3.5  # R2-Gaussian: DSD 7 for a box of side 2
MIN_COUNT = 0.5  # photons: detected counts are clamped here before the logarithm
TILT_DEG = 30.0  # arbitrary orbit: secondary angle within +-TILT_DEG
JITTER_PER_SIDE = 0.02  # arbitrary orbit: isocentre jitter within +-2 % of the box side per axis
_BATCH_PIXELS = 1 << 24  # pixels projected per kernel launch


# --------------------------------------------------------------------------------------
# Scan description
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanSpec:
    """What to simulate. Lengths in mm, angles in degrees; ``None`` = derived default.

    ``noise`` is ``(photons, sigma)`` or ``None`` (noiseless); ``noise_model`` ``"tigre"``
    or ``"physical"`` (see :func:`add_noise`); ``dso`` / ``dsd`` default to
    :func:`default_distances`; ``pixel`` defaults to a detector of ``det`` x ``det``
    pixels that covers the volume.
    """

    views: int = 50
    test_views: int = 25
    orbit: str = "circular"
    arc: float = 360.0
    dso: float | None = None
    dsd: float | None = None
    det: int = 256
    pixel: float | None = None
    noise: tuple[float, float] | None = None
    noise_model: str = "tigre"
    seed: int = 0
    normalise: bool = False
    tilt: float = TILT_DEG

    def check(self) -> None:
        if self.views < 1:
            raise RgsInputError(f"--views {self.views}: need at least 1 training view")
        if self.test_views < 0:
            raise RgsInputError(f"--test-views {self.test_views}: must be 0 or more")
        if self.orbit not in ORBITS:
            raise RgsInputError(f"unknown orbit {self.orbit!r}: use circular or arbitrary")
        if not (math.isfinite(self.arc) and 0 < self.arc <= 360):
            raise RgsInputError(f"--arc {self.arc:g}: must be in (0, 360] degrees")
        if self.det < 8:
            raise RgsInputError(f"--det {self.det} is too small: use at least 8 detector pixels")
        if self.pixel is not None and not (math.isfinite(self.pixel) and self.pixel > 0):
            raise RgsInputError(f"--pixel {self.pixel:g}: the pixel pitch must be positive (mm)")
        for name, value in (("--dso", self.dso), ("--dsd", self.dsd)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise RgsInputError(f"{name} {value:g}: distances must be positive (mm)")
        if self.noise is not None:
            photons, sigma = self.noise
            if not (math.isfinite(photons) and photons > 0 and math.isfinite(sigma) and sigma >= 0):
                raise RgsInputError(f"--noise {photons:g},{sigma:g}: need PHOTONS > 0 and SIGMA >= 0")
        if self.noise_model not in NOISE_MODELS:
            raise RgsInputError(f"unknown noise model {self.noise_model!r}: use tigre or physical")
        if not (math.isfinite(self.tilt) and 0 <= self.tilt < 90):
            raise RgsInputError(f"tilt {self.tilt:g}: must be in [0, 90) degrees")


def parse_noise(text: str | None) -> tuple[float, float] | None:
    """``"PHOTONS,SIGMA"`` (e.g. ``"1e4,10"``) -> (photons, sigma); ``"none"`` / None -> None."""
    if text is None or text.strip().lower() in ("", "none", "off", "0"):
        return None
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        photons, sigma = float(parts[0]), float(parts[1])
    except ValueError:
        raise RgsInputError(f"--noise {text!r}: write PHOTONS,SIGMA (e.g. 1e4,10) or none") from None
    if not (math.isfinite(photons) and photons > 0 and math.isfinite(sigma) and sigma >= 0):
        raise RgsInputError(f"--noise {text!r}: need PHOTONS > 0 and SIGMA >= 0")
    return photons, sigma


def default_distances(grid: VolumeGrid) -> tuple[float, float]:
    """(DSO, DSD) in mm: 2.5 and 3.5 times the box's longest edge (R2-Gaussian's 5 and 7
    for a box of side 2)."""
    side = float(grid.size_mm.max())
    return DSO_PER_SIDE * side, DSD_PER_SIDE * side


def _distances(grid: VolumeGrid, spec: ScanSpec) -> tuple[float, float]:
    dso0, dsd0 = default_distances(grid)
    dso = spec.dso if spec.dso is not None else dso0
    if spec.dsd is not None:
        dsd = spec.dsd
    else:  # keep R2-Gaussian's DSD / DSO = 7 / 5 when only DSO is given
        dsd = dsd0 if spec.dso is None else dso * DSD_PER_SIDE / DSO_PER_SIDE
    if dsd <= dso:
        raise RgsInputError(f"need DSD > DSO (mm), got DSD={dsd:g}, DSO={dso:g}: "
                            "the detector sits beyond the rotation axis")
    return float(dso), float(dsd)


# --------------------------------------------------------------------------------------
# Orbits
# --------------------------------------------------------------------------------------
def circular_angles(views: int, arc_deg: float = 360.0) -> np.ndarray:
    """``views`` angles (radians) ``k arc / views`` for ``k = 0 .. views - 1`` (as R2-Gaussian)."""
    return np.arange(views, dtype=np.float64) * math.radians(arc_deg) / views


def circular_geometry(grid: VolumeGrid, angles: np.ndarray, dso: float, dsd: float, det: int,
                      pixel: float | None = None) -> Geometry:
    """Circular cone-beam orbit about the z axis through the grid's centre (TIGRE convention).

    The default ``pixel`` pitch is the one of :func:`rgs_engine.sim.ct.covering_scan`: the
    ``det`` x ``det`` detector sees the whole box from every angle (2 % margin).
    """
    if pixel is None:
        pixel = float(ct.covering_scan(grid, 1, dso, dsd, det).vectors[0, 6:9].norm())
    return Geometry.circular(angles, dso, dsd, (det, det), pixel, isocentre=grid.centre)


def sphere_covering_pixel(radius: float, dso: float, dsd: float, det: int) -> float:
    """Pixel pitch (mm) for a ``det``-wide detector that sees a ball of ``radius`` (mm)
    centred ``dso`` from the source from any direction: its shadow is
    ``2 radius DSD / sqrt(DSO^2 - radius^2)`` wide (plus the 2 % margin)."""
    if dso <= radius:
        raise RgsInputError(f"DSO = {dso:g} mm puts the X-ray source within {radius:.0f} mm of the "
                            "volume's centre (inside its bounding sphere): increase --dso")
    return ct.COVER_MARGIN * 2 * radius * dsd / math.sqrt(dso ** 2 - radius ** 2) / det


def arbitrary_poses(views: int, grid: VolumeGrid, dso: float, rng: np.random.Generator,
                    arc_deg: float = 360.0, tilt_deg: float = TILT_DEG,
                    jitter_mm: float | None = None) -> np.ndarray:
    """(views, 4, 4) random C-arm source-to-world poses (OpenCV camera frame, see
    :meth:`Geometry.from_poses`) looking at the grid's centre.

    Per view: primary angle ``a`` uniform in [0, arc), secondary angle ``b`` uniform in
    [-tilt, tilt]; the source sits at ``iso + DSO (cos b cos a, cos b sin a, sin b)``, the
    isocentre ``iso`` = grid centre + a jitter uniform in [-jitter, jitter]^3 mm (default
    2 % of the box side); the detector is rotated in its plane by an angle uniform in
    [0, 360) degrees. With no rotation and ``b = 0`` the view is the TIGRE view at angle ``a``
    (columns along (-sin a, cos a, 0), rows along -z).
    """
    side = float(grid.size_mm.max())
    jitter = JITTER_PER_SIDE * side if jitter_mm is None else float(jitter_mm)
    a = rng.uniform(0.0, math.radians(arc_deg), views)
    b = rng.uniform(-math.radians(tilt_deg), math.radians(tilt_deg), views)
    roll = rng.uniform(0.0, 2 * math.pi, views)
    iso = np.asarray(grid.centre)[None, :] + rng.uniform(-jitter, jitter, (views, 3))
    out_dir = np.stack([np.cos(b) * np.cos(a), np.cos(b) * np.sin(a), np.sin(b)], 1)
    ez = -out_dir  # looking from the source at the isocentre
    down = np.array([0.0, 0.0, -1.0])
    ey0 = down - (ez @ down)[:, None] * ez  # detector rows point down (towards -z) ...
    ey0 /= np.linalg.norm(ey0, axis=1, keepdims=True)
    ex0 = np.cross(ey0, ez)  # ... so (ex, ey, ez) is right-handed
    c, s = np.cos(roll)[:, None], np.sin(roll)[:, None]
    ex, ey = c * ex0 + s * ey0, -s * ex0 + c * ey0  # in-plane detector rotation
    poses = np.tile(np.eye(4), (views, 1, 1))
    poses[:, :3, 0], poses[:, :3, 1], poses[:, :3, 2] = ex, ey, ez
    poses[:, :3, 3] = iso + dso * out_dir
    return poses


def arbitrary_geometry(grid: VolumeGrid, views: int, dso: float, dsd: float, det: int,
                       rng: np.random.Generator, pixel: float | None = None, arc_deg: float = 360.0,
                       tilt_deg: float = TILT_DEG, jitter_mm: float | None = None) -> Geometry:
    """Random calibrated C-arm views (:func:`arbitrary_poses`); the default pixel pitch lets
    the ``det`` x ``det`` detector see the box's bounding sphere (grown by the jitter) from
    every direction."""
    side = float(grid.size_mm.max())
    jitter = JITTER_PER_SIDE * side if jitter_mm is None else float(jitter_mm)
    radius = float(np.linalg.norm(grid.size_mm)) / 2 + math.sqrt(3) * jitter
    if pixel is None:
        pixel = sphere_covering_pixel(radius, dso, dsd, det)
    elif dso <= radius:
        sphere_covering_pixel(radius, dso, dsd, det)  # raises with the explanation
    poses = arbitrary_poses(views, grid, dso, rng, arc_deg, tilt_deg, jitter)
    return Geometry.from_poses(poses, dsd, (det, det), pixel)


def make_geometries(grid: VolumeGrid, spec: ScanSpec) -> tuple[Geometry, Geometry | None, dict]:
    """Training and test geometries of ``spec`` (seeded), plus a description of the scan.

    Circular: training views evenly over the arc; test views at angles drawn uniformly over
    the arc (sorted; R2-Gaussian draws its test angles at random too). Arbitrary: training
    and test views are independent draws of :func:`arbitrary_poses`.
    """
    spec.check()
    dso, dsd = _distances(grid, spec)
    rng = np.random.default_rng(spec.seed)
    test = None
    if spec.orbit == "circular":
        train = circular_geometry(grid, circular_angles(spec.views, spec.arc), dso, dsd, spec.det,
                                  spec.pixel)
        pixel = float(train.vectors[0, 6:9].norm())
        if spec.test_views:
            test_angles = np.sort(rng.uniform(0.0, math.radians(spec.arc), spec.test_views))
            test = circular_geometry(grid, test_angles, dso, dsd, spec.det, pixel)
    else:
        train = arbitrary_geometry(grid, spec.views, dso, dsd, spec.det, rng, spec.pixel, spec.arc,
                                   spec.tilt)
        pixel = float(train.vectors[0, 6:9].norm())
        if spec.test_views:
            test = arbitrary_geometry(grid, spec.test_views, dso, dsd, spec.det, rng, pixel,
                                      spec.arc, spec.tilt)
    for g in (train, test):
        if g is not None:
            g.check_against(grid)
    info = {"dso_mm": dso, "dsd_mm": dsd, "pixel_mm": pixel, "detector": [spec.det, spec.det]}
    return train, test, info


# --------------------------------------------------------------------------------------
# Projection and noise
# --------------------------------------------------------------------------------------
def project_views(volume: torch.Tensor, grid: VolumeGrid, geometry: Geometry,
                  on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Joseph DRR of ``volume`` (1/mm) for every view: (V, H, W) float32 on the CPU.

    Views are projected in batches of at most 2^24 pixels on the runtime device;
    ``on_batch(done, total)`` is called after each batch.
    """
    dev = runtime.ensure()
    vol = volume.to(device=dev, dtype=torch.float32).contiguous()
    h, w = geometry.det_shape
    step = max(1, _BATCH_PIXELS // (h * w))
    out = torch.empty(geometry.num_views, h, w, dtype=torch.float32)
    for s in range(0, geometry.num_views, step):
        e = min(geometry.num_views, s + step)
        out[s:e] = project(vol, grid, geometry.subset(slice(s, e))).cpu()
        if on_batch is not None:
            on_batch(e, geometry.num_views)
    return out


def add_noise(projections: torch.Tensor, photons: float, sigma: float, model: str = "tigre",
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """Noisy line integrals and the scale ``s`` used: ``(p_noisy (V, H, W) float32 CPU, s)``.

    Counts ``I = Poisson(photons exp(-p / s)) + Normal(0, sigma)``, clamped to at least
    :data:`MIN_COUNT` photons, then ``p_noisy = -ln(I / photons) s``. ``model="tigre"``
    follows TIGRE's ``CTnoise.add`` (R2-Gaussian's noise): ``s`` = the largest line
    integral of the stack, so the most attenuated ray keeps ``photons / e`` counts whatever
    the units. ``model="physical"``: ``s = 1`` (line integrals in their own units, i.e.
    ``photons`` is the unattenuated count per pixel).
    """
    if model not in NOISE_MODELS:
        raise RgsInputError(f"unknown noise model {model!r}: use tigre or physical")
    if not (photons > 0 and sigma >= 0):
        raise RgsInputError(f"noise needs photons > 0 and sigma >= 0, got {photons:g}, {sigma:g}")
    p = projections.detach().to(device="cpu", dtype=torch.float64)
    scale = 1.0
    if model == "tigre":
        top = float(p.max()) if p.numel() else 0.0
        scale = top if top > 0 else 1.0
    expected = photons * torch.exp(-p / scale)
    counts = torch.poisson(expected, generator=generator)
    if sigma > 0:
        counts = counts + sigma * torch.randn(counts.shape, dtype=torch.float64, generator=generator)
    noisy = -torch.log(counts.clamp_min(MIN_COUNT) / photons) * scale
    return noisy.to(torch.float32), scale


def noise_variance(projections: torch.Tensor, photons: float, sigma: float, scale: float) -> torch.Tensor:
    """First-order (delta-method) variance of :func:`add_noise`'s output per pixel:
    ``s^2 (N + sigma^2) / N^2`` with ``N = photons exp(-p / s)`` the expected count."""
    n = photons * torch.exp(-projections.to(torch.float64) / scale)
    return scale ** 2 * (n + sigma ** 2) / n ** 2


# --------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------
def normalise_volume(volume: torch.Tensor, grid: VolumeGrid) -> tuple[torch.Tensor, float]:
    """R2-Gaussian's scaling: ``(mu, k)`` with ``mu = v k`` (1/mm), ``v = volume / max`` in
    [0, 1] and ``k = 1 / (box_side / 2)`` (1/mm), box_side the grid's longest edge (mm).

    Line integrals of ``mu`` in mm equal those of ``v`` with lengths in units of the half box
    side, i.e. R2-Gaussian's numbers (their box is [-1, 1]^3). ``v = mu / k`` recovers [0, 1].
    """
    top = float(volume.max())
    if not top > 0:
        raise RgsInputError("the volume has no positive value: nothing to normalise to [0, 1]")
    k = 2.0 / float(grid.size_mm.max())
    return (volume.to(torch.float32) / top) * k, k


def load_ct_volume(path, grid_size: int, device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, VolumeGrid]:
    """A CT in Hounsfield units as attenuation (1/mm) on an isotropic grid of ``grid_size``
    voxels along its longest edge: ``(volume on device, grid)``."""
    from ..io.files import load_nifti

    hu, ct_grid = load_nifti(path)
    return ct.attenuation_volume(hu.to(device), ct_grid, grid_size, str(path))


# --------------------------------------------------------------------------------------
# Everything
# --------------------------------------------------------------------------------------
def simulate(volume: torch.Tensor, grid: VolumeGrid, spec: ScanSpec, source: str = "",
             stage: Callable | None = None, extra_attributes: dict | None = None) -> ProjectionData:
    """Simulate ``spec`` on ``volume`` (1/mm on ``grid``) into a :class:`ProjectionData`.

    ``spec.normalise`` first rescales the volume (:func:`normalise_volume`); the ground
    truth is the volume actually projected. Noise (if any) is added to the training views
    only (as R2-Gaussian); test views stay noiseless. ``stage(key, label)``, if given, is a
    context-manager factory wrapping each step (the CLI's progress display).
    """
    import contextlib

    spec.check()
    step = stage if stage is not None else (lambda key, label: contextlib.nullcontext())
    attributes: dict = {"parameters": asdict(spec)}
    with step("geometry", f"{spec.orbit} orbit, {spec.views}+{spec.test_views} views"):
        train_geo, test_geo, info = make_geometries(grid, spec)
        if spec.normalise:
            volume, k = normalise_volume(volume, grid)
            info["normalise_per_mm"] = k
        info["normalised"] = bool(spec.normalise)
    h, w = train_geo.det_shape
    with step("project", f"project {spec.views} views of {h}x{w}"):
        clean = project_views(volume, grid, train_geo)
    test = None
    if test_geo is not None:
        with step("project_test", f"project {spec.test_views} test views"):
            test = project_views(volume, grid, test_geo)
    projections = clean
    if spec.noise is not None:
        photons, sigma = spec.noise
        with step("noise", f"noise: {photons:g} photons, sigma {sigma:g}"):
            gen = torch.Generator().manual_seed(int(spec.seed))
            projections, scale = add_noise(clean, photons, sigma, spec.noise_model, gen)
            info["noise_scale"] = scale
    attributes["scan"] = info
    attributes.update(extra_attributes or {})
    return ProjectionData(projections=projections, geometry=train_geo, grid=grid,
                          ground_truth=volume.detach().to("cpu", torch.float32),
                          test_projections=test, test_geometry=test_geo, time=None,
                          source=source, attributes=attributes)
