"""``rgs track4d --mode dsa``: 4D vessels from a rotational DSA run (4DRGS's scenario).

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

Ctrl-C stops after the current iteration and saves a checkpoint (exit status 130);
``--resume`` continues with the settings in ``config.json``.
"""
from __future__ import annotations

import hashlib
import shlex
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

import rgs_engine
from rgs_engine.io import dsa_case as dsa_data, images as imaging, mesh, files as volume_io
from rgs_engine.core import metrics
from rgs_engine.motion.dsa import DsaConfig, DsaReconstruction, vessel_surface
from rgs_engine.io.projections import ProjectionData, load_projections

from .common import (check_new_run, fmt, out_console, print_summary, require, resume_settings, run_iterations,
                     stage_timer, start, write_metrics, write_run_config)

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
# The case
# --------------------------------------------------------------------------------------
def load_case(case: Path) -> tuple[ProjectionData, Optional[dsa_data.DsaTruth]]:
    """All frames of the run (DSA line integrals with ``.time``) and the case's ground truth."""
    if case.is_dir():
        run = dsa_data.load_dsa_case(case)
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
    h = hashlib.sha256()
    for t in (data.projections, data.geometry.vectors, data.time):
        h.update(t.contiguous().numpy().tobytes())
    h.update(repr(data.grid.to_dict()).encode())
    return h.hexdigest()


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
    return imaging.central_slices(volume.amax(1, keepdim=True))[1]


def mip_frames(mips: list[torch.Tensor], grid) -> np.ndarray:
    """(T, H, W) uint8 frames of :func:`coronal_mip` images: square mm pixels
    (:data:`MIP_PIXELS` along the longer edge), grey scale 0 .. the largest value of all."""
    rows, cols = mips[0].shape
    mm = (rows * grid.spacing[2], cols * grid.spacing[0])
    size = [max(1, round(MIP_PIXELS * s / max(mm))) for s in mm]
    stack = F.interpolate(torch.stack(mips)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return imaging.to_uint8(stack, 0.0, float(stack.max()))


def surface_metrics(surface: tuple[np.ndarray, np.ndarray], truth: Optional[tuple], dev) -> dict[str, Any]:
    """Chamfer (both conventions) and HD95 (mm) of ``surface`` to the truth surface, null
    when either is missing or empty."""
    none = {"chamfer_mm": None, "chamfer_sum_mm": None, "hd95_mm": None}
    if truth is None or len(truth[1]) == 0 or len(surface[1]) == 0:
        return none
    return mesh.mesh_distances(surface, truth, SURFACE_POINTS, device=dev)


def _evaluate(rec: DsaReconstruction, data: ProjectionData, mean: torch.Tensor,
              truth: Optional[dsa_data.DsaTruth], heldout: list[int], dev) -> dict[str, Any]:
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


def _summary(report: dict[str, Any], case: Path, out: Path) -> None:
    out_console.print(f"track4d dsa of {case}: {report['views']} of {report['frames']} frames, "
                      f"{report['device']}", highlight=False)
    rows = [("Chamfer, mean of both directions (mm)", fmt(report["chamfer_mm"])),
            ("Chamfer, sum (4DRGS convention, mm)", fmt(report["chamfer_sum_mm"])),
            ("HD95 (mm)", fmt(report["hd95_mm"])),
            ("PSNR 2D held-out frames (dB)", fmt(report["psnr_2d_heldout"])),
            ("SSIM 2D held-out frames", fmt(report["ssim_2d_heldout"], 4)),
            ("PSNR 3D time average (dB)", fmt(report["psnr_3d_time_average"])),
            ("iterations", str(report["iterations"])), ("Gaussians", f"{report['num_gaussians']:,}"),
            ("seconds", f"{report['seconds']:.1f}")]
    print_summary(rows, [out / f for f in OUTPUTS])


def _write_outputs(rec: DsaReconstruction, data: ProjectionData, mean: torch.Tensor,
                   times: list[float], time_unit: str, out: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """The volumes, the surface and the GIF; returns the surface and its level."""
    grid = data.grid
    volume_io.save_nifti(out / MEAN, mean, grid, force=True)
    steps = np.diff(times)
    even = time_unit == "s" and steps.size > 0 and steps.min() > 0 and bool(np.allclose(steps, steps.mean()))
    volume_io.save_nifti(out / SERIES, torch.stack([rec.volume_at(t) for t in times], -1), grid,
                         force=True, frame_seconds=float(steps.mean()) if even else None)
    mips = [coronal_mip(rec.volume_at(t)) for t in np.linspace(*rec.time_range, MIP_TIMES).tolist()]
    vertices, faces, level = vessel_surface(mean, grid)
    mesh.write_ply(out / SURFACE, vertices, faces, force=True)
    imaging.write_gif(out / GIF, mip_frames(mips, grid), MIP_FPS, force=True)
    return vertices, faces, level


# --------------------------------------------------------------------------------------
# rgs track4d --mode dsa
# --------------------------------------------------------------------------------------
def run_dsa(case: Path, out: Path, *, views: Optional[int], iterations: Optional[int],
            seed: Optional[int], time_smoothness: Optional[float], times: Optional[list[float]],
            resume: bool, force: bool, checkpoint_every: Optional[int], device) -> None:
    """``rgs track4d CASE --out OUT --mode dsa``: see the module. ``None`` options take their
    defaults (views 30, the recipe's iterations, seed 0 and time-smoothness weight, 5 times
    over the run, a checkpoint every 500 iterations); on ``resume`` the options given must
    match the run's."""
    t_start = time.perf_counter()
    if resume:
        given = {"--views": views, "--iterations": iterations, "--seed": seed,
                 "--time-smoothness": time_smoothness, "--times": times,
                 "--checkpoint-every": checkpoint_every}
        settings = resume_settings(out, case, "dsa", _known, given)
        require((out / CHECKPOINT).is_file(), f"{out / CHECKPOINT} not found: the run stopped before "
                                              "its first checkpoint; start it again with --force")
        volume_io.check_writable([out / f for f in OUTPUTS if f not in (CONFIG, CHECKPOINT)], force)
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
    dev = start(device)
    seconds: dict[str, float] = {}
    stage = stage_timer(seconds)

    with stage("load", f"load {case.name}"):
        data, truth = load_case(case)
        train, index, heldout = split_views(data, settings["views"])
        settings["times"] = output_times(data, settings.get("times", times))
        fingerprint = _fingerprint(train)
    config = DsaConfig.from_dict(settings["config"])
    if resume:
        require(fingerprint == settings.get("data_sha256"),
                f"the frames in {case} differ from the ones the run in {out} used: pass the same "
                "case to resume, or start a new run without --resume")
        with stage("initialise", "load checkpoint"):
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
        with stage("initialise", "initialise Gaussians (FDK)"):
            torch.manual_seed(config.seed)
            rec = DsaReconstruction(train, config)
        resumed_from = None

    t0 = time.perf_counter()
    stats = run_iterations(rec, rec.config.iterations, out / CHECKPOINT, settings["checkpoint_every"], "dsa",
                  lambda st: f"loss {st['loss']:.4f}  {int(st['gaussians']):,} Gaussians",
                  "rgs track4d " + shlex.join([str(case), "--out", str(out), "--mode", "dsa", "--resume"]))
    seconds["iterations"] = round(time.perf_counter() - t0, 3)
    with stage("metrics", "held-out frames, ground truth"):
        mean = rec.mean_volume(data.time)
        report = _evaluate(rec, data, mean, truth, heldout, dev)
    with stage("write", "volumes, surface, MIP"):
        vertices, faces, level = _write_outputs(rec, data, mean, settings["times"],
                                                settings["time_unit"], out)
    with stage("surface", "surface distances"):
        report.update(surface_metrics((vertices, faces), truth.surface if truth is not None else None, dev))
    report.update({"mode": "dsa", "views": settings["views"], "frames": data.num_views,
                   "times": settings["times"], "time_unit": settings["time_unit"],
                   "surface_level": level, "surface_vertices": len(vertices),
                   "iterations": rec.iteration, "num_gaussians": len(rec.gs.gaussians),
                   "final_loss": stats["loss"], "resumed_from": resumed_from})
    write_metrics(out / METRICS, report, dev, t_start, seconds, settings)
    _summary(report, case, out)
