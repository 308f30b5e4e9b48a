"""``rgs track4d``: 4D reconstruction over time.

``--mode breathing`` (default; X2-Gaussian's scenario): a NAF-style 4D pickle of projections
taken during free breathing -> canonical Gaussians + a learned deformation and breathing
period (:mod:`rgs_engine.motion.track4d`). Outputs in ``--out DIR``:

* ``phases.nii.gz``: a 4D NIfTI (nx, ny, nz, P) on the data's grid, the volume at each
  ground-truth phase time, or without ground truth at P = 10 times evenly spread over one
  learned cycle in the middle of the scan; ``phase_times_s`` in ``metrics.json`` says which;
* ``phases.gif``: central coronal and sagittal slices over those times (truth above when known);
* ``metrics.json``: ``period_s``, ``period_truth_s`` and ``period_error_pct`` (with
  ``period_truth_source``: the file, or X2-Gaussian's 3 s convention when the file has no
  ``period_s``), ``period_estimate_s`` / ``period_estimate_power`` (the period the
  projections show, :mod:`rgs_engine.motion.period_estimate`, or null where the scan is too short),
  ``period_mismatch_pct`` (the learned period's distance from it; above 5 % a warning
  suggests ``--period-init auto``), ``phase_wander_cycles`` (how far the scan's cycles
  stray from that period, :func:`rgs_engine.motion.period_estimate.phase_wander`), ``time_input``
  (what the deformation saw: ``time`` or ``phase``; with ``--time-input auto``, the default,
  phase where the phase wander is at most 0.03 cycles) and ``time_input_option``,
  ``motion_mm`` (the learned motion's size: 99th percentile over the Gaussians of the largest
  distance from their mean position over the output times; under ``motion_floor_mm``, half a
  voxel, a warning says the model learned no motion and the volumes are a static fit),
  ``period_initial_s`` (where the learning started:
  ``--period-init`` seconds, or with ``auto`` the estimate; by default the estimate with
  phase input, 2.8 s with time input), ``psnr_3d`` /
  ``ssim_3d`` per phase and their means ``psnr_3d_mean`` / ``ssim_3d_mean`` against the
  ground truth, ``psnr_2d_test`` / ``ssim_2d_test`` on the held-out views at their times,
  ``seconds`` (this invocation, loading included),
  ``seconds_by_stage``, ``iterations``, ``num_gaussians``, ``device``, ``conventions``;
* ``config.json`` (everything to rerun, the equivalent command line), ``checkpoint.pt``.

``--mode dsa`` (4DRGS's scenario) is :func:`cli.track4d_dsa.run_dsa`. Ctrl-C stops after the
current iteration and saves a checkpoint (exit status 130); ``--resume`` continues.
"""
from __future__ import annotations

import hashlib
import math
import shlex
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional, Union

import torch
import typer

import rgs_engine
from rgs_engine.io import naf4d as data4d, images as imaging, files as volume_io
from rgs_engine.core import metrics
from rgs_engine.io.naf4d import Projection4D
from rgs_engine.core.errors import RgsInputError
from rgs_engine.recon.gaussian import GSConfig
from rgs_engine.motion.dsa import DsaConfig
from rgs_engine.motion.track4d import PERIOD_MISMATCH_PCT, Track4DConfig, Track4DReconstruction

from .common import (DeviceOption, app, check_new_run, err_console, fmt, handle_errors, out_console,
                     print_summary, require, resume_settings, run_iterations, stage_timer, start,
                     write_metrics, write_run_config)

PHASES, GIF, METRICS, CONFIG, CHECKPOINT = (
    "phases.nii.gz", "phases.gif", "metrics.json", "config.json", "checkpoint.pt")
OUTPUTS = (PHASES, GIF, METRICS, CONFIG, CHECKPOINT)
DEFAULT_PHASES = 10  # volumes over one learned cycle when the data have no ground truth
DEFAULT_CHECKPOINT_EVERY = 500
AUTO = "auto"  # --period-init: the period estimated from the projections
DSA_DEFAULT_VIEWS = 30
PSNR_EVERY = 250  # iterations between PSNR evaluations (one voxelisation) while training


class ModeChoice(str, Enum):
    breathing = "breathing"
    dsa = "dsa"


class DeformationChoice(str, Enum):
    kplanes = "kplanes"
    anchors = "anchors"


class TimeInputChoice(str, Enum):
    time = "time"
    phase = "phase"
    auto = "auto"


def _fingerprint(data: Projection4D) -> str:
    """SHA-256 of the training projections, their geometry and times (detects changed data)."""
    h = hashlib.sha256()
    for t in (data.projections, data.geometry.vectors, data.times_s):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _output_times(data: Projection4D, period_s: float) -> tuple[torch.Tensor, str]:
    """(P,) seconds at which ``phases.nii.gz`` shows the anatomy, and where they came from."""
    if data.phase_times_s is not None:
        return data.phase_times_s, "ground-truth phase times"
    t0 = data.scan_seconds / 2
    return (t0 + (torch.arange(DEFAULT_PHASES, dtype=torch.float64) + 0.5) * period_s / DEFAULT_PHASES,
            f"{DEFAULT_PHASES} times over one learned cycle from mid-scan ({t0:g} s)")


def _new_settings(case: Path, deformation: Optional[str], time_input: Optional[str],
                  iterations: Optional[int], static_iterations: Optional[int],
                  period_init: Union[float, str, None], seed: Optional[int],
                  checkpoint_every: Optional[int]) -> dict[str, Any]:
    base = Track4DConfig()
    recipe = GSConfig(**{**base.recipe.to_dict(), "seed": 0 if seed is None else seed,
                         **({} if static_iterations is None else {"iterations": static_iterations})})
    config = Track4DConfig(**{**base.to_dict(), "recipe": recipe,
                              "deformation": deformation or base.deformation,
                              "time_input": time_input or base.time_input,
                              **({} if iterations is None else {"iterations": iterations}),
                              **({} if period_init is None else {"period_from_projections": True}
                                 if period_init == AUTO else {"period_init_s": period_init,
                                                              "period_from_projections": False})})
    return {"mode": "breathing", "data": str(case.resolve()), "config": config.to_dict(),
            "checkpoint_every": checkpoint_every or DEFAULT_CHECKPOINT_EVERY}


def _period_init(config: Track4DConfig) -> Union[float, str]:
    """The ``--period-init`` value of ``config``: seconds, ``auto``, or ``default`` (none
    given: the time input's, see :attr:`Track4DReconstruction.period_from_projections`)."""
    if config.period_from_projections is None:
        return "default"
    return AUTO if config.period_from_projections else config.period_init_s


def _parse_period_init(text: Optional[str]) -> Union[float, str, None]:
    if text is None or text == AUTO:
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    require(math.isfinite(value) and value > 0,
            f"--period-init {text}: give a positive period in seconds, or auto")
    return value


def _known(s: dict) -> dict[str, Any]:
    """The options of the run whose config.json is ``s``."""
    cfg = Track4DConfig.from_dict(s["config"])
    return {"--deformation": cfg.deformation, "--time-input": cfg.time_input,
            "--iterations": cfg.iterations,
            "--static-iterations": cfg.recipe.iterations,
            "--period-init": _period_init(cfg),
            "--seed": cfg.recipe.seed, "--checkpoint-every": s["checkpoint_every"]}


def _evaluate(rec: Track4DReconstruction, data: Projection4D) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Metrics against the truth the data carry, the output times and the volumes there."""
    times, times_note = _output_times(data, rec.period_s)
    volumes = rec.phases(times)
    estimate = rec.period_estimate
    report: dict[str, Any] = {
        "time_input": rec.time_input, "time_input_option": rec.config.time_input,
        "phase_wander_cycles": rec.phase_wander,
        "period_s": rec.period_s, "period_truth_s": data.period_s,
        "period_truth_source": data.period_source,
        "period_error_pct": None if data.period_s is None else 100 * abs(rec.period_s - data.period_s) / data.period_s,
        "period_initial_s": rec.initial_period_s,
        "period_estimate_s": None if estimate is None else estimate.period_s,
        "period_estimate_power": None if estimate is None else estimate.power,
        "period_mismatch_pct": rec.period_mismatch_pct,
        "motion_mm": rec.motion_mm(times), "motion_floor_mm": rec.motion_floor_mm,
        "phase_times_s": times.tolist(), "phase_times_note": times_note,
        "psnr_3d": None, "ssim_3d": None, "psnr_3d_mean": None, "ssim_3d_mean": None,
        "psnr_2d_test": None, "ssim_2d_test": None, "test_views": None}
    if data.phases is not None:
        truth = data.phases.to(volumes.device)
        report["psnr_3d"] = [metrics.psnr_3d(v, g) for v, g in zip(volumes, truth)]
        report["ssim_3d"] = [metrics.ssim_3d(v, g) for v, g in zip(volumes, truth)]
        report["psnr_3d_mean"] = sum(report["psnr_3d"]) / len(volumes)
        report["ssim_3d_mean"] = sum(report["ssim_3d"]) / len(volumes)
    if data.test_projections is not None:
        rendered = rec.render(data.test_geometry, data.test_times_s)
        test = data.test_projections.to(rendered.device)
        report["psnr_2d_test"] = metrics.psnr_2d(rendered, test)
        report["ssim_2d_test"] = metrics.ssim_2d(rendered, test)
        report["test_views"] = data.test_geometry.num_views
    return report, times, volumes


def _summary(report: dict[str, Any], case: Path, out: Path) -> None:
    out_console.print(f"track4d of {case}: {report['views']} projections over "
                      f"{report['scan_seconds']:g} s; {report['deformation']} "
                      f"({report['time_input']} input"
                      f"{', auto' if report['time_input_option'] == 'auto' else ''}), {report['device']}",
                      highlight=False)
    truth = report["period_truth_s"]
    rows = [("period (s)", fmt(report["period_s"], 3)
             + ("" if truth is None else f"  (truth {truth:g}, {report['period_error_pct']:.2f} % off)")),
            ("period from the projections (s)", fmt(report["period_estimate_s"], 3)),
            ("period learned from (s)", fmt(report["period_initial_s"], 3)),
            ("phase wander of the cycles (cycles)", fmt(report["phase_wander_cycles"], 3)),
            ("motion learned (mm, 99th percentile)", fmt(report["motion_mm"])),
            ("PSNR 3D, mean over phases (dB)", fmt(report["psnr_3d_mean"])),
            ("SSIM 3D, mean over phases", fmt(report["ssim_3d_mean"], 4)),
            ("PSNR 2D test (dB)", fmt(report["psnr_2d_test"])),
            ("SSIM 2D test", fmt(report["ssim_2d_test"], 4)),
            ("iterations", str(report["iterations"])), ("Gaussians", f"{report['num_gaussians']:,}"),
            ("seconds", f"{report['seconds']:.1f}")]
    print_summary(rows, [out / f for f in OUTPUTS])


def run_breathing(case: Path, out: Path, *, deformation: Optional[str], time_input: Optional[str],
                  iterations: Optional[int], static_iterations: Optional[int],
                  period_init: Union[float, str, None],
                  seed: Optional[int], checkpoint_every: Optional[int], resume: bool, force: bool,
                  device) -> None:
    """``rgs track4d --mode breathing``: see the module."""
    t_start = time.perf_counter()
    if resume:
        given = {"--deformation": deformation, "--time-input": time_input, "--iterations": iterations,
                 "--static-iterations": static_iterations, "--period-init": period_init,
                 "--seed": seed, "--checkpoint-every": checkpoint_every}
        settings = resume_settings(out, case, "breathing", _known, given)
        require((out / CHECKPOINT).is_file(), f"{out / CHECKPOINT} not found: the run stopped before "
                                              "its first checkpoint; start it again with --force")
        volume_io.check_writable([out / f for f in (PHASES, GIF, METRICS)], force)
    else:
        check_new_run(out, OUTPUTS, force)
        settings = _new_settings(case, deformation, time_input, iterations, static_iterations,
                                 period_init, seed, checkpoint_every)
    dev = start(device)
    seconds: dict[str, float] = {}
    stage = stage_timer(seconds)

    with stage("load", f"load {case.name}"):
        data = data4d.load_4d_pickle(case)
        fingerprint = _fingerprint(data)
    config = Track4DConfig.from_dict(settings["config"])
    args = (data.projections, data.geometry, data.grid, data.times_s)
    if resume:
        require(fingerprint == settings.get("data_sha256"),
                f"the projections in {case} differ from the ones the run in {out} used: pass the "
                "same case to resume, or start a new run without --resume")
        with stage("initialise", "load checkpoint"):
            rec = Track4DReconstruction.load_checkpoint(out / CHECKPOINT, *args)
        require(rec.config.to_dict()["deformation"] == config.deformation,
                f"{out / CHECKPOINT} holds a different recipe than {out / CONFIG}: start again "
                "with --force instead of --resume")
        resumed_from = rec.iteration
    else:
        period_init = _period_init(config)
        settings.update({"data_sha256": fingerprint, "views": data.num_views, "device": dev.type,
                         "grid": data.grid.to_dict(), "rgs_version": rgs_engine.__version__,
                         "command": "rgs track4d " + shlex.join(
                             [settings["data"], "--out", str(out.resolve()), "--mode", "breathing",
                              "--deformation", config.deformation, "--time-input", config.time_input,
                              "--iterations", str(config.iterations),
                              "--static-iterations", str(config.recipe.iterations),
                              *(() if period_init == "default" else ("--period-init", str(period_init))),
                              "--seed", str(config.recipe.seed),
                              "--checkpoint-every", str(settings["checkpoint_every"])])})
        write_run_config(out, OUTPUTS, settings, force)
        with stage("initialise", "initialise Gaussians"):
            rec = Track4DReconstruction(*args, config=config)
        resumed_from = None

    t0 = time.perf_counter()
    stats = run_iterations(
        rec, rec.config.total_iterations, out / CHECKPOINT, settings["checkpoint_every"], "track4d",
        lambda st: f"{rec.stage}  loss {st['loss']:.4f}  period {rec.period_s:.3f} s",
        "rgs track4d " + shlex.join([str(case), "--out", str(out), "--resume"]),
        psnr=None if data.phases is None else lambda: metrics.psnr_3d(
            rec.volume_at(float(data.phase_times_s[0])), data.phases[0].to(dev)),
        psnr_every=PSNR_EVERY)
    seconds["iterations"] = round(time.perf_counter() - t0, 3)
    with stage("metrics", "PSNR / SSIM per phase"):
        report, times, volumes = _evaluate(rec, data)
    with stage("write", "write outputs"):
        steps = times.diff()
        even = steps.numel() > 0 and bool(torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-6))
        volume_io.save_nifti(out / PHASES, volumes.permute(1, 2, 3, 0), data.grid, force=True,
                             frame_seconds=float(steps.mean()) if even else None)
        series = ({"ground truth": data.phases} if data.phases is not None else {}) | {"rgs": volumes.cpu()}
        imaging.slices_gif(out / GIF, series, data.grid, force=True)
    report.update({"mode": "breathing", "deformation": config.deformation, "views": data.num_views,
                   "scan_seconds": data.scan_seconds, "conventions": data.conventions,
                   "iterations": rec.iteration, "num_gaussians": len(rec.static.gaussians),
                   "final_loss": stats["loss"], "resumed_from": resumed_from})
    write_metrics(out / METRICS, report, dev, t_start, seconds, settings)
    _summary(report, case, out)
    _warn_if_suspect(report, rec.period_from_projections)


def _warn_if_suspect(report: dict[str, Any], from_projections: bool) -> None:
    """Warnings on stderr: the period was to start from the projections' estimate
    (``from_projections``) but they allow none; the model learned no visible motion though
    the projections show a period; the learned period is far from the projections' estimate."""
    mismatch, estimate = report["period_mismatch_pct"], report["period_estimate_s"]
    if from_projections and estimate is None:
        _warn(f"the projections show no breathing period (scan too short or no motion seen): the "
              f"period was learned from {report['period_initial_s']:g} s")
    if estimate is not None and report["motion_mm"] < report["motion_floor_mm"]:
        _warn(f"the deformation learned no visible motion ({report['motion_mm']:.2f} mm, under half a "
              f"voxel) though the projections show a {estimate:.3f} s period: these volumes are a "
              f"static fit; rerun with another --seed or more --iterations")
        return  # the period of a model that does not move means nothing
    if mismatch is None or mismatch <= PERIOD_MISMATCH_PCT:
        return
    advice = ("give the period if you know it: --period-init SECONDS" if from_projections
              else f"rerun with --period-init {AUTO} to start from the estimate")
    _warn(f"the learned period {report['period_s']:.3f} s is {mismatch:.0f} % from the {estimate:.3f} s "
          f"the projections show: {advice}")


def _warn(message: str) -> None:
    """One yellow ``warning: ...`` line on stderr."""
    err_console.print(f"[yellow]warning: {message}[/yellow]", highlight=False)


@app.command()
@handle_errors
def track4d(
    case: Annotated[Path, typer.Argument(
        metavar="CASE", help="breathing: a NAF-style 4D .pickle (X2-Gaussian's format); dsa: a "
                             "4DRGS case folder or an rgs data.h5 with /time.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (created if missing).")],
    mode: Annotated[ModeChoice, typer.Option(
        help="breathing (moving anatomy, learned period) or dsa (contrast inflow, static "
             "anatomy).")] = ModeChoice.breathing,
    deformation: Annotated[Optional[DeformationChoice], typer.Option(
        help="breathing: kplanes (spatio-temporal planes + MLP) or anchors (skinned anchors + "
             "transformer). [default: kplanes]")] = None,
    time_input: Annotated[Optional[TimeInputChoice], typer.Option(
        "--time-input", help="breathing: what the deformation sees: time (scan time, so cycles "
                             "may differ; periodic-consistency loss), phase (time modulo the "
                             "learned period, started from the projections' estimate: every "
                             "cycle alike) or auto (phase where the projections show cycles that "
                             "keep the period, else time). [default: auto]")] = None,
    iterations: Annotated[Optional[int], typer.Option(
        help=f"Training iterations (breathing: of the deformation stage). [default: breathing "
             f"{Track4DConfig().iterations}, dsa {DsaConfig().iterations}]")] = None,
    static_iterations: Annotated[Optional[int], typer.Option(
        "--static-iterations", help=f"breathing: iterations of the static coarse stage. "
                                    f"[default: {Track4DConfig().recipe.iterations}]")] = None,
    period_init: Annotated[Optional[str], typer.Option(
        "--period-init", help=f"breathing: initial breathing period, s (learned from it), or "
                              f"{AUTO} (estimated from the projections' row shifts). [default: "
                              f"{AUTO} with phase input, {Track4DConfig().period_init_s:g} with time "
                              f"input]")] = None,
    views: Annotated[Optional[int], typer.Option(
        help=f"dsa: training frames spread evenly over the run. [default: {DSA_DEFAULT_VIEWS}]")] = None,
    times: Annotated[Optional[str], typer.Option(
        help="dsa: comma-separated times (s) at which to write volumes. [default: 5 frames "
             "spread over the run]")] = None,
    time_smoothness: Annotated[Optional[float], typer.Option(
        "--time-smoothness", help=f"dsa: weight of the contrast field's temporal roughness in "
                                  f"the loss (0: none). "
                                  f"[default: {DsaConfig().time_smoothness_weight:g}]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed. [default: 0]")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        "--checkpoint-every", help=f"Iterations between checkpoints. [default: "
                                   f"{DEFAULT_CHECKPOINT_EVERY}]")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the interrupted run in --out (settings from its config.json).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    device: DeviceOption = None,
) -> None:
    """Reconstruct anatomy over time: breathing motion (default) or contrast inflow (--mode dsa).

    breathing writes OUT/phases.nii.gz (4D: the volume at each ground-truth phase time),
    OUT/phases.gif, OUT/metrics.json (learned period and its error, 3D PSNR / SSIM per phase,
    seconds), OUT/config.json and OUT/checkpoint.pt. --mode dsa writes OUT/vessels.nii.gz
    (time average), OUT/vessels_4d.nii.gz (at --times), OUT/vessels.ply, OUT/mip.gif,
    OUT/metrics.json (held-out 2D PSNR / SSIM, Chamfer and HD95 to the truth surface, seconds),
    OUT/config.json and OUT/checkpoint.pt. Ctrl-C saves a checkpoint; continue with --resume.
    """
    require(not out.exists() or out.is_dir(), f"--out {out} is a file: pass a directory")
    for option, value in {"--iterations": iterations, "--static-iterations": static_iterations,
                          "--views": views, "--checkpoint-every": checkpoint_every}.items():
        require(value is None or value >= 1 or (option == "--static-iterations" and value == 0),
                f"{option} {value}: use at least 1")
    period_init = _parse_period_init(period_init)
    require(time_smoothness is None or (math.isfinite(time_smoothness) and time_smoothness >= 0),
            f"--time-smoothness {time_smoothness}: give a weight >= 0")
    require(case.exists(), f"{case} not found: pass the case to reconstruct")
    if mode is ModeChoice.dsa:
        for option, value in {"--deformation": deformation, "--time-input": time_input,
                              "--static-iterations": static_iterations, "--period-init": period_init}.items():
            require(value is None, f"{option} does not apply to --mode dsa: drop it")
        from .track4d_dsa import run_dsa
        run_dsa(case, out, views=views, iterations=iterations, seed=seed,
                time_smoothness=time_smoothness, times=None if times is None else _parse_times(times),
                resume=resume, force=force, checkpoint_every=checkpoint_every, device=device)
        return
    require(time_smoothness is None, "--time-smoothness applies to --mode dsa only: drop it")
    for option, value in {"--views": views, "--times": times}.items():
        require(value is None, f"{option} does not apply to --mode breathing: the whole scan is "
                               "used and phases.nii.gz holds the phase times; drop it")
    run_breathing(case, out, deformation=deformation.value if deformation else None,
                  time_input=time_input.value if time_input else None, iterations=iterations,
                  static_iterations=static_iterations, period_init=period_init,
                  seed=seed, checkpoint_every=checkpoint_every, resume=resume, force=force, device=device)


def _parse_times(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise RgsInputError(f"--times {text!r}: give comma-separated seconds, e.g. 0.5,2,4") from exc
    require(values and all(math.isfinite(v) and v >= 0 for v in values),
            f"--times {text!r}: give comma-separated non-negative seconds, e.g. 0.5,2,4")
    return values
