"""Breathing motion: :func:`track4d` (``rgs track4d``, 4D reconstruction over time) and
:func:`simulate4d` (``rgs simulate4d``).

``--mode breathing`` (default; X2-Gaussian's scenario): a NAF-style 4D pickle of projections
taken during free breathing -> canonical Gaussians + a learned deformation and breathing
period (:mod:`rgs_engine.motion.track4d`). Outputs in ``--out DIR``:

* ``phases.nii.gz``: a 4D NIfTI (nx, ny, nz, P) on the data's grid, the volume at each
  ground-truth phase time, or without ground truth at P = 10 times over one learned cycle
  in the middle of the scan (evenly spread, or with surrogate input where the surrogate's
  phase passes the centres of 10 equal phase bins); ``phase_times_s`` in ``metrics.json``
  says which;
* ``phases.gif``: central coronal and sagittal slices over those times (truth above when known);
* ``surrogate.csv`` (surrogate input only): the breathing the projections show, one row per
  view in time order: ``time_s``, the phase in cycles as measured and as refined in training
  (``phase_measured_cycles``, ``phase_cycles``; unwrapped, one per breath), the relative depth
  (``depth_measured``, ``depth``; 1 = the median breath) and, with ``surrogate_baseline``,
  ``baseline``;
* ``metrics.json``: ``period_s``, ``period_truth_s`` and ``period_error_pct`` with
  ``period_truth_source``: ``"file"`` (its ``period_s``), ``"phase_times_s"`` (derived from
  the file's phase times when those are the evenly spaced bins of one cycle, see
  :func:`rgs_engine.io.naf4d.period_from_phase_times`) or null, when the file states no
  period (then the truth and the error are null too: no convention is shown as truth), ``period_estimate_s`` / ``period_estimate_power`` (the period the
  projections show, :mod:`rgs_engine.motion.period_estimate`, or null where the scan is too short),
  ``period_mismatch_pct`` (the learned period's distance from it; above 5 % a warning
  suggests ``--period-init auto``), ``phase_wander_cycles`` (how far the scan's cycles
  stray from that period, :func:`rgs_engine.motion.period_estimate.phase_wander`), ``time_input``
  (what the deformation saw: ``time``, ``phase`` or ``surrogate``; with ``--time-input
  auto``, the default, surrogate with K-planes; with anchors or without a surrogate, phase
  where the phase wander is at most 0.03 cycles, else time) and
  ``time_input_option``, with surrogate input ``surrogate_amplitude_range`` (the smallest and
  largest relative breathing depth over the views, after training) and
  ``surrogate_phase_offset_cycles`` (the RMS of the learned per-view phase corrections),
  else null,
  ``motion_mm`` (the learned motion's size: 99th percentile over the Gaussians of the largest
  distance from their mean position over the output times; under ``motion_floor_mm``, half a
  voxel, a warning says the model learned no motion and the volumes are a static fit),
  ``period_initial_s`` (where the learning started:
  ``--period-init`` seconds, or with ``auto`` the estimate; by default the estimate with
  phase or surrogate input, 2.8 s with time input), ``psnr_3d`` /
  ``ssim_3d`` per phase and their means ``psnr_3d_mean`` / ``ssim_3d_mean`` against the
  ground truth, ``psnr_2d_test`` / ``ssim_2d_test`` on the held-out views at their times,
  ``seconds`` (this invocation, loading included),
  ``seconds_by_stage``, ``iterations``, ``num_gaussians``, ``device``, ``conventions``;
* ``config.json`` (everything to rerun, the equivalent command line), ``checkpoint.pt``.

``--mode dsa`` (4DRGS's scenario) is :func:`rgs_engine.pipelines.angiography.dsa`. A stop request
(Ctrl-C on the command line) ends the run after the current iteration with a checkpoint
(:class:`~.common.Interrupted`); ``resume=True`` continues.

:func:`simulate4d` (``rgs simulate4d``) makes such a pickle from a chest CT.
"""
from __future__ import annotations

import json
import math
import shlex
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional, Union

import torch

import rgs_engine
from ..core import metrics, runtime
from ..io import files, images, naf4d, projections as projection_files
from ..io.naf4d import Projection4D
from ..motion.track4d import PERIOD_MISMATCH_PCT, Track4DConfig, Track4DReconstruction
from ..recon.gaussian import GSConfig
from ..sim import breathing_scan, scan
from .common import (ProgressCallback, Reporter, RunResult, StopCheck, built_with_sets, check_new_run, data_sha256,
                     parse_sets, require, resume_settings, run_iterations, write_metrics, write_run_config)
from .angiography import check_run_options, dsa

PHASES, GIF, SURROGATE, METRICS, CONFIG, CHECKPOINT = (
    "phases.nii.gz", "phases.gif", "surrogate.csv", "metrics.json", "config.json", "checkpoint.pt")
OUTPUTS = (PHASES, GIF, SURROGATE, METRICS, CONFIG, CHECKPOINT)  # surrogate.csv with surrogate input only
DEFAULT_PHASES = 10  # volumes over one learned cycle when the data have no ground truth
DEFAULT_CHECKPOINT_EVERY = 500
AUTO = "auto"  # --period-init: the period estimated from the projections
PSNR_EVERY = 250  # iterations between PSNR evaluations (one voxelisation) while training
MODES = ("breathing", "dsa")
DEFORMATIONS = ("kplanes", "anchors")
TIME_INPUTS = ("time", "phase", "surrogate", "auto")


def _fingerprint(data: Projection4D) -> str:
    """SHA-256 of the training projections, their geometry and times (detects changed data)."""
    return data_sha256((data.projections, data.geometry.vectors, data.times_s))


def _output_times(data: Projection4D, rec: Track4DReconstruction) -> tuple[torch.Tensor, str]:
    """(P,) seconds at which ``phases.nii.gz`` shows the anatomy, and where they came from."""
    if data.phase_times_s is not None:
        return data.phase_times_s, "ground-truth phase times"
    t0 = data.scan_seconds / 2
    drive = rec.model.surrogate if rec.model is not None else None
    if drive is not None:
        return (drive.bin_times(DEFAULT_PHASES, t0),
                f"{DEFAULT_PHASES} phase bins of the surrogate's cycle containing mid-scan ({t0:g} s)")
    return (t0 + (torch.arange(DEFAULT_PHASES, dtype=torch.float64) + 0.5) * rec.period_s / DEFAULT_PHASES,
            f"{DEFAULT_PHASES} times over one learned cycle from mid-scan ({t0:g} s)")


def _surrogate_report(rec: Track4DReconstruction) -> dict[str, Any]:
    """``surrogate_amplitude_range`` and ``surrogate_phase_offset_cycles`` (null without
    surrogate input)."""
    drive = rec.model.surrogate if rec.model is not None else None
    if drive is None:
        return {"surrogate_amplitude_range": None, "surrogate_phase_offset_cycles": None}
    amplitude = drive.amplitude.detach()
    return {"surrogate_amplitude_range": [float(amplitude.min()), float(amplitude.max())],
            "surrogate_phase_offset_cycles": float(drive.phase_offset.detach().square().mean().sqrt())}


# --set keys that have their own option
_SET_OPTIONS = {"iterations": "--iterations", "deformation": "--deformation", "time_input": "--time-input",
                "period_init_s": "--period-init", "period_from_projections": "--period-init",
                "recipe": "--set recipe.FIELD", "recipe.iterations": "--static-iterations",
                "recipe.seed": "--seed"}


def _parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` overrides of the 4D recipe: a field of
    :class:`~rgs_engine.motion.track4d.Track4DConfig`, or ``recipe.FIELD`` of its static
    stage's :class:`~rgs_engine.recon.gaussian.GSConfig` (:func:`~.common.parse_sets`)."""
    known = [f.name for f in fields(Track4DConfig)] + [f"recipe.{f.name}" for f in fields(GSConfig)]
    return parse_sets(items, known, _SET_OPTIONS, "4D recipe field (or recipe.FIELD of the static stage)",
                      "recipe.rate_scale=1.5")


def _flat_config(config: Track4DConfig) -> dict[str, Any]:
    """``config`` as the keys of :func:`_parse_sets` (``recipe.FIELD`` for the static stage)."""
    d = json.loads(json.dumps(config.to_dict()))  # as --set's JSON values read (lists, not tuples)
    return {**{k: v for k, v in d.items() if k != "recipe"}, **{f"recipe.{k}": v for k, v in d["recipe"].items()}}


def _new_settings(case: Path, deformation: Optional[str], time_input: Optional[str],
                  iterations: Optional[int], static_iterations: Optional[int],
                  period_init: Union[float, str, None], seed: Optional[int],
                  checkpoint_every: Optional[int], sets: dict[str, Any]) -> dict[str, Any]:
    """The settings of a new run: the defaults, then ``sets`` (:func:`_parse_sets`), then the
    options given."""
    base = Track4DConfig()
    recipe_sets = {k.removeprefix("recipe."): v for k, v in sets.items() if k.startswith("recipe.")}
    top_sets = {k: v for k, v in sets.items() if not k.startswith("recipe.")}

    def build() -> Track4DConfig:
        recipe = GSConfig(**{**base.recipe.to_dict(), **recipe_sets, "seed": 0 if seed is None else seed,
                             **({} if static_iterations is None else {"iterations": static_iterations})})
        return Track4DConfig(**{**base.to_dict(), **top_sets, "recipe": recipe,
                                "deformation": deformation or base.deformation,
                                "time_input": time_input or base.time_input,
                                **({} if iterations is None else {"iterations": iterations}),
                                **({} if period_init is None else {"period_from_projections": True}
                                   if period_init == AUTO else {"period_init_s": period_init,
                                                                "period_from_projections": False})})

    config = built_with_sets(build, sets)
    return {"mode": "breathing", "data": str(case.resolve()), "config": config.to_dict(),
            "checkpoint_every": checkpoint_every or DEFAULT_CHECKPOINT_EVERY}


def _period_init(config: Track4DConfig) -> Union[float, str]:
    """The ``--period-init`` value of ``config``: seconds, ``auto``, or ``default`` (none
    given: the time input's, see :attr:`Track4DReconstruction.period_from_projections`)."""
    if config.period_from_projections is None:
        return "default"
    return AUTO if config.period_from_projections else config.period_init_s


def _parse_period_init(text: Union[str, float, None]) -> Union[float, str, None]:
    """``--period-init``: None, ``auto`` or a positive number of seconds (text or number)."""
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
    """The options of the run whose config.json is ``s`` (``--set KEY`` for each recipe field)."""
    cfg = Track4DConfig.from_dict(s["config"])
    return {"--deformation": cfg.deformation, "--time-input": cfg.time_input,
            "--iterations": cfg.iterations,
            "--static-iterations": cfg.recipe.iterations,
            "--period-init": _period_init(cfg),
            "--seed": cfg.recipe.seed, "--checkpoint-every": s["checkpoint_every"],
            **{f"--set {k}": v for k, v in _flat_config(cfg).items()}}


def _evaluate(rec: Track4DReconstruction, data: Projection4D) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Metrics against the truth the data carry, the output times and the volumes there."""
    times, times_note = _output_times(data, rec)
    volumes = rec.phases(times)
    estimate = rec.period_estimate
    report: dict[str, Any] = {
        "time_input": rec.time_input, "time_input_option": rec.config.time_input,
        "phase_wander_cycles": rec.phase_wander, **_surrogate_report(rec),
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


def suspect_warnings(report: dict[str, Any], from_projections: bool) -> list[str]:
    """What to warn about: the period was to start from the projections' estimate
    (``from_projections``) but they allow none; the model learned no visible motion though
    the projections show a period; the learned period is far from the projections' estimate."""
    mismatch, estimate = report["period_mismatch_pct"], report["period_estimate_s"]
    warnings = []
    if from_projections and estimate is None:
        warnings.append(f"the projections show no breathing period (scan too short or no motion seen): "
                        f"the period was learned from {report['period_initial_s']:g} s")
    if estimate is not None and report["motion_mm"] < report["motion_floor_mm"]:
        warnings.append(f"the deformation learned no visible motion ({report['motion_mm']:.2f} mm, under "
                        f"half a voxel) though the projections show a {estimate:.3f} s period: these "
                        f"volumes are a static fit; rerun with another --seed or more --iterations")
        return warnings  # the period of a model that does not move means nothing
    if mismatch is None or mismatch <= PERIOD_MISMATCH_PCT:
        return warnings
    advice = ("give the period if you know it: --period-init SECONDS" if from_projections
              else f"rerun with --period-init {AUTO} to start from the estimate")
    warnings.append(f"the learned period {report['period_s']:.3f} s is {mismatch:.0f} % from the "
                    f"{estimate:.3f} s the projections show: {advice}")
    return warnings




def track4d(case: Union[str, Path], out: Union[str, Path], *, mode: str = "breathing",
            deformation: Optional[str] = None, time_input: Optional[str] = None,
            iterations: Optional[int] = None, static_iterations: Optional[int] = None,
            period_init: Union[str, float, None] = None, views: Optional[int] = None,
            times: Optional[str] = None, time_smoothness: Optional[float] = None,
            seed: Optional[int] = None, checkpoint_every: Optional[int] = None,
            sets: Optional[list[str]] = None,
            resume: bool = False, force: bool = False, device: Optional[str] = None,
            progress: Optional[ProgressCallback] = None,
            should_stop: Optional[StopCheck] = None) -> RunResult:
    """``rgs track4d CASE --out OUT``: see the module; ``mode="dsa"`` runs
    :func:`rgs_engine.pipelines.angiography.dsa` (``views``, ``times``, ``time_smoothness``).
    ``None`` options take their defaults; on ``resume`` the options given must match the run's.
    ``sets`` (breathing): ``KEY=VALUE`` overrides of the 4D recipe, ``KEY`` a field of
    :class:`~rgs_engine.motion.track4d.Track4DConfig` or ``recipe.FIELD`` of its static stage
    (VALUE read as JSON when it parses), recorded in config.json's command.

    Returns the metrics.json report, the written files, ``volumes["phases"]`` (P, nx, ny, nz)
    attenuation (1/mm) at ``metrics["phase_times_s"]``, the warnings (also sent as progress
    events) and ``extra["reconstruction"]`` the trained
    :class:`~rgs_engine.motion.track4d.Track4DReconstruction`."""
    case, out = Path(case), Path(out)
    require(mode in MODES, f"--mode {mode}: use breathing or dsa")
    require(deformation in (None, *DEFORMATIONS), f"--deformation {deformation}: use kplanes or anchors")
    require(time_input in (None, *TIME_INPUTS), f"--time-input {time_input}: use time, phase, surrogate or auto")
    check_run_options(case, out, {"--iterations": iterations, "--static-iterations": static_iterations,
                                  "--views": views, "--checkpoint-every": checkpoint_every}, time_smoothness)
    period_init = _parse_period_init(period_init)
    if mode == "dsa":
        for option, value in {"--deformation": deformation, "--time-input": time_input,
                              "--static-iterations": static_iterations, "--period-init": period_init,
                              "--set": sets or None}.items():
            require(value is None, f"{option} does not apply to --mode dsa: drop it")
        return dsa(case, out, views=views, iterations=iterations, seed=seed, time_smoothness=time_smoothness,
                   times=times, checkpoint_every=checkpoint_every, resume=resume, force=force,
                   device=device, progress=progress, should_stop=should_stop)
    require(time_smoothness is None, "--time-smoothness applies to --mode dsa only: drop it")
    for option, value in {"--views": views, "--times": times}.items():
        require(value is None, f"{option} does not apply to --mode breathing: the whole scan is "
                               "used and phases.nii.gz holds the phase times; drop it")
    overrides = _parse_sets(sets) if sets else {}
    t_start = time.perf_counter()
    reporter = Reporter(progress, should_stop)
    if resume:
        given = {"--deformation": deformation, "--time-input": time_input, "--iterations": iterations,
                 "--static-iterations": static_iterations, "--period-init": period_init,
                 "--seed": seed, "--checkpoint-every": checkpoint_every,
                 **{f"--set {k}": v for k, v in overrides.items()}}
        settings = resume_settings(out, case, "breathing", _known, given)
        require((out / CHECKPOINT).is_file(), f"{out / CHECKPOINT} not found: the run stopped before "
                                              "its first checkpoint; start it again with --force")
        files.check_writable([out / f for f in (PHASES, GIF, METRICS)], force)
    else:
        check_new_run(out, OUTPUTS, force)
        settings = _new_settings(case, deformation, time_input, iterations, static_iterations,
                                 period_init, seed, checkpoint_every, overrides)
    dev = runtime.init(device)

    with reporter.stage("load", f"load {case.name}"):
        data = naf4d.load_4d_pickle(case)
        fingerprint = _fingerprint(data)
    config = Track4DConfig.from_dict(settings["config"])
    args = (data.projections, data.geometry, data.grid, data.times_s)
    if resume:
        require(fingerprint == settings.get("data_sha256"),
                f"the projections in {case} differ from the ones the run in {out} used: pass the "
                "same case to resume, or start a new run without --resume")
        with reporter.stage("initialise", "load checkpoint"):
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
                              "--checkpoint-every", str(settings["checkpoint_every"]),
                              *[a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]])})
        write_run_config(out, OUTPUTS, settings, force)
        with reporter.stage("initialise", "initialise Gaussians"):
            rec = Track4DReconstruction(*args, config=config)
        resumed_from = None

    with reporter.stage("iterations", "train the static fit and the motion"):
        stats = run_iterations(
            rec, rec.config.total_iterations, out / CHECKPOINT, settings["checkpoint_every"], reporter,
            "track4d", lambda st: f"{rec.stage}  loss {st['loss']:.4f}  period {rec.period_s:.3f} s",
            "rgs track4d " + shlex.join([str(case), "--out", str(out), "--resume"]),
            psnr=None if data.phases is None else lambda: metrics.psnr_3d(
                rec.volume_at(float(data.phase_times_s[0])), data.phases[0].to(dev)),
            psnr_every=PSNR_EVERY)
    with reporter.stage("metrics", "PSNR / SSIM per phase"):
        report, times, volumes = _evaluate(rec, data)
    with reporter.stage("write", "write outputs"):
        steps = times.diff()
        even = steps.numel() > 0 and bool(torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-6))
        files.save_nifti(out / PHASES, volumes.permute(1, 2, 3, 0), data.grid, force=True,
                         frame_seconds=float(steps.mean()) if even else None)
        series = ({"ground truth": data.phases} if data.phases is not None else {}) | {"rgs": volumes.cpu()}
        images.slices_gif(out / GIF, series, data.grid, force=True)
        if rec.time_input == "surrogate" and rec.surrogate is not None:
            _write_surrogate(out / SURROGATE, rec.surrogate)
    report.update({"mode": "breathing", "deformation": config.deformation, "views": data.num_views,
                   "scan_seconds": data.scan_seconds, "conventions": data.conventions,
                   "iterations": rec.iteration, "num_gaussians": len(rec.static.gaussians),
                   "final_loss": stats["loss"], "resumed_from": resumed_from})
    write_metrics(out / METRICS, report, dev, t_start, reporter.seconds, settings)
    for message in suspect_warnings(report, rec.period_from_projections):
        reporter.warn(message)
    return RunResult(out, report, [out / f for f in OUTPUTS if (out / f).is_file()], volumes={"phases": volumes},
                     warnings=reporter.warnings, extra={"reconstruction": rec})


def _write_surrogate(path: Path, drive) -> None:
    """``surrogate.csv``: one row per view of :meth:`~rgs_engine.motion.surrogate.SurrogateDrive.table`
    (the breathing the projections show, as measured and as refined), written atomically."""
    cols = drive.table()
    rows = [",".join(cols)] + [",".join(f"{x:.6g}" for x in row) for row in zip(*cols.values())]
    files.write_bytes(path, ("\n".join(rows) + "\n").encode(), force=True)


# --------------------------------------------------------------------------------------
# rgs simulate4d
# --------------------------------------------------------------------------------------
def simulate4d(ct: Union[str, Path], out: Union[str, Path], *, grid: int = 128, projections: int = 300,
               val_projections: int = 10, scan_seconds: float = 60.0, period: float = 3.5,
               irregular: bool = False, amplitude_mm: str = "15,5", phases: int = 10, det: int = 256,
               noise: str = "none", noise_model: str = "tigre", seed: int = 0, force: bool = False,
               device: Optional[str] = None, progress: Optional[ProgressCallback] = None,
               should_stop: Optional[StopCheck] = None) -> RunResult:
    """``rgs simulate4d CT OUT.pickle``: a free-breathing cone-beam scan of a chest CT
    (Hounsfield units) written as a NAF-style 4D pickle
    (:func:`rgs_engine.sim.breathing_scan.simulate_breathing_case`, :func:`rgs_engine.io.naf4d.save_4d_pickle`).
    ``grid`` voxels along the box's longest edge, ``projections`` training and
    ``val_projections`` test views of ``det``^2 pixels over ``scan_seconds`` s, breathing
    ``period`` s (``irregular``: seeded jitter and one deeper breath), ``amplitude_mm``
    ``"SI,AP"`` mm, ``phases`` ground-truth volumes over one cycle, ``noise``
    ``"PHOTONS,SIGMA"`` or ``none`` with ``noise_model`` ``tigre`` or ``physical``.
    ``should_stop`` is not polled (no loop to stop).

    Returns ``metrics``: ``device`` and ``seconds`` by stage; ``extra``: ``data`` (the
    :class:`~rgs_engine.io.naf4d.Projection4D` written), ``spec`` (the
    :class:`~rgs_engine.sim.breathing_scan.BreathingSpec`) and ``device`` (torch)."""
    ct, out = Path(ct), Path(out)
    require(out.suffix.lower() in projection_files.PICKLE_SUFFIXES,
            f"{out}: the output must end in .pickle or .pkl: rename it")
    require(grid >= 8, f"--grid {grid} is too small: use at least 8 voxels")
    spec = breathing_scan.BreathingSpec(
        projections=projections, val_projections=val_projections, scan_seconds=scan_seconds,
        period_s=period, irregular=irregular, amplitude_mm=breathing_scan.parse_amplitude(amplitude_mm),
        phases=phases, det=det, noise=scan.parse_noise(noise), noise_model=noise_model, seed=seed)
    spec.check()
    files.check_writable([out], force)
    dev = runtime.init(device)
    reporter = Reporter(progress, should_stop)
    command = {"command": "rgs simulate4d", "ct": str(ct), "grid": grid, "projections": projections,
               "val_projections": val_projections, "scan_seconds": scan_seconds, "period": period,
               "irregular": irregular, "amplitude_mm": amplitude_mm, "phases": phases, "det": det,
               "noise": noise, "noise_model": noise_model, "seed": seed}
    data = breathing_scan.simulate_breathing_case(
        ct, grid, spec, stage=reporter.stage,
        extra_attributes={"command": command, "versions": runtime.versions(),
                          "units": "lengths mm, attenuation 1/mm, projections unitless "
                                   "line integrals, times s"})
    with reporter.stage("write", f"write {out.name}"):
        naf4d.save_4d_pickle(out, data, force)
    return RunResult(out, {"device": runtime.describe(dev), "seconds": reporter.seconds}, [out],
                     warnings=reporter.warnings, extra={"data": data, "spec": spec, "device": dev})
