"""4D vessels from a rotational DSA run (4DRGS's scenario): :func:`dsa` (``rgs track4d --mode
dsa``) and the synthetic run that tests it, :func:`simulate_dsa` (``rgs simulate-dsa``).

CASE is a 4DRGS case folder (``transforms.json``, mask and fill runs, optionally
``ground_truth/``: :mod:`rgs_engine.io.dsa_case`) or an rgs ``.h5`` of DSA line integrals with
``/time``. ``--views N`` (default 30) frames spread evenly over the run train the model
(:class:`rgs_engine.motion.dsa.DsaReconstruction`); the other frames are held out and
rendered at their times for the 2D metrics. Times are in the case's unit: seconds, or
``f / (F - 1)`` for a 4DRGS case without frame times.

Outputs in ``--out DIR``:

* ``vessels.nii.gz``: contrast attenuation (1/mm) averaged over the times of all the run's
  frames, on the case's grid;
* ``vessels_4d.nii.gz``: 4D (nx, ny, nz, T), the volume at each of the ``--times`` (default:
  5 times evenly over the run, first and last frame included; ``times`` in ``metrics.json``);
* ``vessels.ply`` (mm): the surface of ``vessels.nii.gz`` by
  :func:`rgs_engine.motion.dsa.vessel_surface` (half the robust maximum, no ground truth; the
  time average, not the peak over time, whose per-time noise speckles the surface);
* ``mip.gif``: maximum-intensity projection along y (coronal, radiological orientation) of
  the volume at those :data:`MIP_TIMES` times, one grey scale for all frames;
* ``metrics.json``: ``psnr_2d_heldout`` / ``ssim_2d_heldout`` (held-out frames at their
  times, ``heldout_frames`` of them), ``chamfer_mm`` (mean of both directions),
  ``chamfer_sum_mm`` (their sum, 4DRGS's convention), ``hd95_mm`` against the case's lumen
  surface (null without one), ``psnr_3d_time_average`` (``vessels.nii.gz`` against the
  case's time-averaged truth) and ``psnr_3d_frames`` (per ground-truth frame with contrast,
  ``{frame, time, psnr}``) when known, ``surface_level``, ``seconds`` (this invocation,
  loading included), ``seconds_by_stage``, ``device``, ``views``, ``iterations``,
  ``num_gaussians``, ``times``, ``time_unit``;
* ``config.json`` (everything to rerun, the equivalent command line), ``checkpoint.pt``.

A stop request (Ctrl-C on the command line) ends the run after the current iteration with a
checkpoint (:class:`~.common.Interrupted`); ``resume=True`` continues with the settings in
``config.json``.
"""
from __future__ import annotations

import math
import shlex
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

import rgs_engine
from ..core import metrics, runtime
from ..core.errors import RgsInputError
from ..core.geometry import VolumeGrid
from ..io import dsa_case, files, images, mesh
from ..io.projections import ProjectionData, load_projections
from ..motion.dsa import DsaConfig, DsaReconstruction, vessel_surface
from ..sim import scan, vessels
from .common import (ProgressCallback, Reporter, RunResult, StopCheck, check_new_run, data_sha256,
                     require, resume_settings, run_iterations, write_metrics, write_run_config)

MEAN, SERIES, SURFACE, GIF, METRICS, CONFIG, CHECKPOINT = (
    "vessels.nii.gz", "vessels_4d.nii.gz", "vessels.ply", "mip.gif",
    "metrics.json", "config.json", "checkpoint.pt")
OUTPUTS = (MEAN, SERIES, SURFACE, GIF, METRICS, CONFIG, CHECKPOINT)
DEFAULT_VIEWS = 30
DEFAULT_TIMES = 5
DEFAULT_CHECKPOINT_EVERY = 500
MIP_TIMES = 24  # volumes over the run for mip.gif
MIP_PIXELS = 256  # mip.gif: pixels along the longer edge
MIP_FPS = 6.0
SURFACE_POINTS = 20_000  # points sampled on each surface for the distances


# --------------------------------------------------------------------------------------
# Options shared with rgs track4d --mode breathing
# --------------------------------------------------------------------------------------
def check_run_options(case: Path, out: Path, counts: dict[str, Optional[int]],
                      time_smoothness: Optional[float]) -> None:
    """The checks every ``rgs track4d`` run makes first: ``out`` is no file, the ``counts``
    (option -> value; ``--static-iterations`` may be 0) are at least 1, the
    ``--time-smoothness`` weight is >= 0 and ``case`` exists."""
    require(not out.exists() or out.is_dir(), f"--out {out} is a file: pass a directory")
    for option, value in counts.items():
        require(value is None or value >= 1 or (option == "--static-iterations" and value == 0),
                f"{option} {value}: use at least 1")
    require(time_smoothness is None or (math.isfinite(time_smoothness) and time_smoothness >= 0),
            f"--time-smoothness {time_smoothness}: give a weight >= 0")
    require(case.exists(), f"{case} not found: pass the case to reconstruct")


def parse_times(times: Union[str, Sequence[float], None]) -> Optional[list[float]]:
    """``--times``: comma-separated seconds (or a sequence of them), each finite and >= 0."""
    if times is None:
        return None
    text = times if isinstance(times, str) else ",".join(str(t) for t in times)
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise RgsInputError(f"--times {text!r}: give comma-separated seconds, e.g. 0.5,2,4") from exc
    require(values and all(math.isfinite(v) and v >= 0 for v in values),
            f"--times {text!r}: give comma-separated non-negative seconds, e.g. 0.5,2,4")
    return values


# --------------------------------------------------------------------------------------
# The case
# --------------------------------------------------------------------------------------
def load_case(case: Path) -> tuple[ProjectionData, Optional[dsa_case.DsaTruth]]:
    """All frames of the run (DSA line integrals with ``.time``) and the case's ground truth."""
    if case.is_dir():
        run = dsa_case.load_dsa_case(case)
        return run.to_projection_data(), run.truth
    data = load_projections(case)
    require(data.time is not None, f"{case}: has no /time: a DSA run needs each frame's "
                                   "acquisition time (s); pass a 4DRGS case folder or an .h5 with /time")
    return data, None


def split_views(data: ProjectionData, views: int) -> tuple[ProjectionData, list[int], list[int]]:
    """``views`` training frames spread evenly over the run, their indices and the others'."""
    require(views >= 2, f"--views {views}: a 4D reconstruction needs at least 2 frames")
    require(views <= data.num_views, f"--views {views}: the run has only {data.num_views} "
                                     f"frames; use at most {data.num_views}")
    index = data.view_indices(views).tolist()
    return data.select_views(views), index, sorted(set(range(data.num_views)) - set(index))


def output_times(data: ProjectionData, times: Optional[list[float]]) -> list[float]:
    """The ``--times`` (checked to lie in the run), or :data:`DEFAULT_TIMES` evenly over it."""
    t0, t1 = float(data.time.min()), float(data.time.max())
    if times is None:
        return np.linspace(t0, t1, DEFAULT_TIMES).tolist()
    outside = [t for t in times if not t0 <= t <= t1]
    require(not outside, f"--times {', '.join(f'{t:g}' for t in outside)} outside the run "
                         f"({t0:g} .. {t1:g} {data.attributes.get('time_unit', 's')}): give times within it")
    return [float(t) for t in times]


def _fingerprint(data: ProjectionData) -> str:
    """SHA-256 of the training frames, their geometry and times (detects changed data)."""
    return data_sha256((data.projections, data.geometry.vectors, data.time), repr(data.grid.to_dict()))


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------
def _known(s: dict) -> dict[str, Any]:
    """The options of the run whose config.json is ``s``."""
    config = DsaConfig.from_dict(s["config"])
    return {"--views": s["views"], "--iterations": config.iterations, "--seed": config.seed,
            "--time-smoothness": config.time_smoothness_weight, "--times": s["times"],
            "--checkpoint-every": s["checkpoint_every"]}


# --------------------------------------------------------------------------------------
# Training, evaluation, outputs
# --------------------------------------------------------------------------------------
def coronal_mip(volume: torch.Tensor) -> torch.Tensor:
    """Maximum-intensity projection along y of a (nx, ny, nz) volume, in
    :func:`rgs_engine.io.images.central_slices`'s coronal orientation (CPU float32)."""
    # the coronal "central slice" of the (nx, 1, nz) projection is the projection itself
    return images.central_slices(volume.amax(1, keepdim=True))[1]


def mip_frames(mips: list[torch.Tensor], grid) -> np.ndarray:
    """(T, H, W) uint8 frames of :func:`coronal_mip` images: square mm pixels
    (:data:`MIP_PIXELS` along the longer edge), grey scale 0 .. the largest value of all."""
    rows, cols = mips[0].shape
    mm = (rows * grid.spacing[2], cols * grid.spacing[0])
    size = [max(1, round(MIP_PIXELS * s / max(mm))) for s in mm]
    stack = F.interpolate(torch.stack(mips)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return images.to_uint8(stack, 0.0, float(stack.max()))


def surface_metrics(surface: tuple[np.ndarray, np.ndarray], truth: Optional[tuple], dev) -> dict[str, Any]:
    """Chamfer (both conventions) and HD95 (mm) of ``surface`` to the truth surface, null
    when either is missing or empty."""
    none = {"chamfer_mm": None, "chamfer_sum_mm": None, "hd95_mm": None}
    if truth is None or len(truth[1]) == 0 or len(surface[1]) == 0:
        return none
    return mesh.mesh_distances(surface, truth, SURFACE_POINTS, device=dev)


def _evaluate(rec: DsaReconstruction, data: ProjectionData, mean: torch.Tensor,
              truth: Optional[dsa_case.DsaTruth], heldout: list[int], dev) -> dict[str, Any]:
    """Metrics against the held-out frames and the case's truth (``mean``: the volume
    averaged over the run)."""
    report: dict[str, Any] = {"psnr_2d_heldout": None, "ssim_2d_heldout": None,
                              "heldout_frames": len(heldout), "psnr_3d_time_average": None,
                              "psnr_3d_frames": None}
    if heldout:
        rendered = rec.render(data.geometry.subset(heldout), data.time[heldout])
        target = data.projections[heldout].to(rendered.device)
        report["psnr_2d_heldout"] = metrics.psnr_2d(rendered, target)
        report["ssim_2d_heldout"] = metrics.ssim_2d(rendered, target)
    if data.ground_truth is not None:
        report["psnr_3d_time_average"] = metrics.psnr_3d(mean, data.ground_truth.to(dev))
    if truth is not None:
        report["psnr_3d_frames"] = [
            {"frame": k, "time": float(data.time[k]),
             "psnr": metrics.psnr_3d(rec.volume_at(float(data.time[k])), vol.to(dev))}
            for k, vol in sorted(truth.frame_volumes.items()) if float(vol.max()) > float(vol.min())]
    return report


def _write_outputs(rec: DsaReconstruction, data: ProjectionData, mean: torch.Tensor,
                   times: list[float], time_unit: str, out: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """The volumes, the surface and the GIF; returns the surface and its level."""
    grid = data.grid
    files.save_nifti(out / MEAN, mean, grid, force=True)
    steps = np.diff(times)
    even = time_unit == "s" and steps.size > 0 and steps.min() > 0 and bool(np.allclose(steps, steps.mean()))
    files.save_nifti(out / SERIES, torch.stack([rec.volume_at(t) for t in times], -1), grid,
                         force=True, frame_seconds=float(steps.mean()) if even else None)
    mips = [coronal_mip(rec.volume_at(t)) for t in np.linspace(*rec.time_range, MIP_TIMES).tolist()]
    vertices, faces, level = vessel_surface(mean, grid)
    mesh.write_ply(out / SURFACE, vertices, faces, force=True)
    images.write_gif(out / GIF, mip_frames(mips, grid), MIP_FPS, force=True)
    return vertices, faces, level


# --------------------------------------------------------------------------------------
# rgs track4d --mode dsa
# --------------------------------------------------------------------------------------
def dsa(case: Union[str, Path], out: Union[str, Path], *, views: Optional[int] = None,
        iterations: Optional[int] = None, seed: Optional[int] = None,
        time_smoothness: Optional[float] = None, times: Union[str, Sequence[float], None] = None,
        checkpoint_every: Optional[int] = None, resume: bool = False, force: bool = False,
        device: Optional[str] = None, progress: Optional[ProgressCallback] = None,
        should_stop: Optional[StopCheck] = None) -> RunResult:
    """``rgs track4d CASE --out OUT --mode dsa``: see the module. ``None`` options take their
    defaults (views 30, the recipe's iterations, seed 0 and time-smoothness weight, 5 times
    over the run, a checkpoint every 500 iterations); on ``resume`` the options given must
    match the run's. ``times``: seconds, comma-separated text or a sequence.

    Returns the metrics.json report, the written files, ``volumes["vessels"]`` (nx, ny, nz)
    the time-averaged contrast attenuation (1/mm) and ``extra["reconstruction"]`` the
    trained :class:`~rgs_engine.motion.dsa.DsaReconstruction`."""
    t_start = time.perf_counter()
    case, out = Path(case), Path(out)
    check_run_options(case, out, {"--iterations": iterations, "--views": views,
                                  "--checkpoint-every": checkpoint_every}, time_smoothness)
    times = parse_times(times)
    reporter = Reporter(progress, should_stop)
    if resume:
        given = {"--views": views, "--iterations": iterations, "--seed": seed,
                 "--time-smoothness": time_smoothness, "--times": times,
                 "--checkpoint-every": checkpoint_every}
        settings = resume_settings(out, case, "dsa", _known, given)
        require((out / CHECKPOINT).is_file(), f"{out / CHECKPOINT} not found: the run stopped before "
                                              "its first checkpoint; start it again with --force")
        files.check_writable([out / f for f in OUTPUTS if f not in (CONFIG, CHECKPOINT)], force)
    else:
        check_new_run(out, OUTPUTS, force)
        base = DsaConfig()
        config = DsaConfig(**{**base.to_dict(), "seed": 0 if seed is None else seed,
                              **({} if iterations is None else {"iterations": iterations}),
                              **({} if time_smoothness is None
                                 else {"time_smoothness_weight": time_smoothness})})
        settings = {"mode": "dsa", "data": str(case.resolve()),
                    "views": DEFAULT_VIEWS if views is None else views, "config": config.to_dict(),
                    "checkpoint_every": checkpoint_every or DEFAULT_CHECKPOINT_EVERY}
    dev = runtime.init(device)

    with reporter.stage("load", f"load {case.name}"):
        data, truth = load_case(case)
        train, index, heldout = split_views(data, settings["views"])
        settings["times"] = output_times(data, settings.get("times", times))
        fingerprint = _fingerprint(train)
    config = DsaConfig.from_dict(settings["config"])
    if resume:
        require(fingerprint == settings.get("data_sha256"),
                f"the frames in {case} differ from the ones the run in {out} used: pass the same "
                "case to resume, or start a new run without --resume")
        with reporter.stage("initialise", "load checkpoint"):
            rec = DsaReconstruction.load_checkpoint(out / CHECKPOINT, train)
        require(rec.config.to_dict() == config.to_dict(),
                f"{out / CHECKPOINT} holds a different recipe than {out / CONFIG}: start again "
                "with --force instead of --resume")
        resumed_from = rec.iteration
    else:
        settings.update({
            "view_indices": index, "frames": data.num_views, "data_sha256": fingerprint,
            "time_unit": data.attributes.get("time_unit", "s"), "device": dev.type,
            "grid": data.grid.to_dict(), "rgs_version": rgs_engine.__version__,
            "command": "rgs track4d " + shlex.join(
                [settings["data"], "--out", str(out.resolve()), "--mode", "dsa",
                 "--views", str(settings["views"]), "--iterations", str(config.iterations),
                 "--seed", str(config.seed), "--times", ",".join(f"{t:g}" for t in settings["times"]),
                 "--checkpoint-every", str(settings["checkpoint_every"])])})
        write_run_config(out, OUTPUTS, settings, force)
        with reporter.stage("initialise", "initialise Gaussians (FDK)"):
            torch.manual_seed(config.seed)
            rec = DsaReconstruction(train, config)
        resumed_from = None

    with reporter.stage("iterations", "train the contrast field"):
        stats = run_iterations(
            rec, rec.config.iterations, out / CHECKPOINT, settings["checkpoint_every"], reporter, "dsa",
            lambda st: f"loss {st['loss']:.4f}  {int(st['gaussians']):,} Gaussians",
            "rgs track4d " + shlex.join([str(case), "--out", str(out), "--mode", "dsa", "--resume"]))
    with reporter.stage("metrics", "held-out frames, ground truth"):
        mean = rec.mean_volume(data.time)
        report = _evaluate(rec, data, mean, truth, heldout, dev)
    with reporter.stage("write", "volumes, surface, MIP"):
        vertices, faces, level = _write_outputs(rec, data, mean, settings["times"],
                                                settings["time_unit"], out)
    with reporter.stage("surface", "surface distances"):
        report.update(surface_metrics((vertices, faces), truth.surface if truth is not None else None, dev))
    report.update({"mode": "dsa", "views": settings["views"], "frames": data.num_views,
                   "times": settings["times"], "time_unit": settings["time_unit"],
                   "surface_level": level, "surface_vertices": len(vertices),
                   "iterations": rec.iteration, "num_gaussians": len(rec.gs.gaussians),
                   "final_loss": stats["loss"], "resumed_from": resumed_from})
    write_metrics(out / METRICS, report, dev, t_start, reporter.seconds, settings)
    return RunResult(out, report, [out / f for f in OUTPUTS], volumes={"vessels": mean},
                     warnings=reporter.warnings, extra={"reconstruction": rec})


# --------------------------------------------------------------------------------------
# rgs simulate-dsa
# --------------------------------------------------------------------------------------
def simulate_dsa(out: Union[str, Path], *, frames: int = vessels.FRAMES, grid: int = 128, det: int = 256,
                 seed: int = 0, noise: str = "none", force: bool = False, device: Optional[str] = None,
                 progress: Optional[ProgressCallback] = None,
                 should_stop: Optional[StopCheck] = None) -> RunResult:
    """``rgs simulate-dsa OUT_DIR``: a seeded vessel tree (:func:`rgs_engine.sim.vessels.make_phantom`)
    with a contrast bolus, scanned as a rotational DSA run of ``frames`` frames of
    ``det`` x ``det`` pixels over a ``grid``^3 volume, written in the 4DRGS case layout with its
    ground truth (:func:`rgs_engine.io.dsa_case.save_dsa_case`). ``noise``: ``PHOTONS,SIGMA``
    or ``none``. ``should_stop`` is not polled (no loop to stop).

    Returns ``metrics``: ``voxel_mm``, ``branches``, ``radius_mm`` [min, max], ``lumen_ml``,
    ``bolus`` (arrival s, velocity mm/s, rise s), ``run`` (the C-arm run's parameters),
    ``noise`` (photons, sigma or None), ``dsa_max`` (largest DSA line integral), ``device``,
    ``seconds`` by stage; ``extra["case"]`` the :class:`~rgs_engine.io.dsa_case.DsaCase`."""
    out = Path(out)
    require(frames >= 2, f"--frames {frames}: a run needs at least 2 frames")
    require(grid >= 8, f"--grid {grid} is too small: use at least 8 voxels")
    require(det >= 8, f"--det {det} is too small: use at least 8 detector pixels")
    require(not out.exists() or out.is_dir(), f"{out}: exists and is not a folder: choose another OUT_DIR")
    noise_spec = scan.parse_noise(noise)
    written = [out / dsa_case.MASK_RUN, out / dsa_case.FILL_RUN, out / dsa_case.TRANSFORMS,
               out / dsa_case.TRUTH_DIR]
    files.check_writable(written, force)
    dev = runtime.init(device)
    reporter = Reporter(progress, should_stop)
    vol_grid = VolumeGrid.centred((grid,) * 3, vessels.BOX_MM / grid)
    with reporter.stage("phantom", f"vessel tree (seed {seed})"):
        phantom = vessels.make_phantom(seed)
    with reporter.stage("simulate", f"{frames} frames of {det}x{det} on a {grid}^3 grid"):
        case = vessels.simulate_dsa_run(phantom, vol_grid, frames=frames, det=det, noise=noise_spec, seed=seed)
    with reporter.stage("write", f"write {out}"):
        dsa_case.save_dsa_case(out, case, force)

    radii = [b.radius for b in phantom.branches]
    bolus = phantom.bolus
    summary = {"voxel_mm": vol_grid.spacing[0], "branches": len(radii), "radius_mm": [min(radii), max(radii)],
               "lumen_ml": float(case.truth.mask.sum()) * float(np.prod(vol_grid.spacing)) / 1000,
               "bolus": {"arrival_s": bolus.arrival_s, "velocity_mm_s": bolus.velocity_mm_s,
                         "rise_s": bolus.rise_s},
               "run": case.truth.parameters["run"], "noise": noise_spec,
               "dsa_max": float(dsa_case.dsa_line_integrals(case.mask_run, case.fill_run).max()),
               "device": runtime.describe(dev), "seconds": reporter.seconds}
    return RunResult(out, summary, written, warnings=reporter.warnings, extra={"case": case})
