"""``rgs track4d``: 4D reconstruction over time, breathing motion (default) or contrast inflow
(``--mode dsa``). The options are those of :func:`rgs_engine.pipelines.track4d`, which does
the work (outputs and ``metrics.json`` keys: :mod:`rgs_engine.pipelines.breathing` and
:mod:`rgs_engine.pipelines.angiography`); this module parses them and prints the summary."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from rgs_engine import pipelines
from rgs_engine.motion.dsa import DsaConfig
from rgs_engine.motion.track4d import Track4DConfig
from rgs_engine.pipelines.breathing import AUTO, DEFAULT_CHECKPOINT_EVERY
from rgs_engine.pipelines.angiography import DEFAULT_VIEWS as DSA_DEFAULT_VIEWS

from .common import DeviceOption, app, fmt, handle_errors, out_console, print_summary, run_pipeline

TRUTH_SOURCES = {"file": "the file's period_s", "phase_times_s": "the file's phase_times_s"}


class ModeChoice(str, Enum):
    breathing = "breathing"
    dsa = "dsa"


class DeformationChoice(str, Enum):
    kplanes = "kplanes"
    anchors = "anchors"


class TimeInputChoice(str, Enum):
    time = "time"
    phase = "phase"
    surrogate = "surrogate"
    auto = "auto"


def _period_cell(report: dict[str, Any]) -> str:
    """The learned period and its truth, with where the truth came from."""
    truth = report["period_truth_s"]
    if truth is None:
        return fmt(report["period_s"], 3) + "  (no truth: the file states no period)"
    return (fmt(report["period_s"], 3) + f"  (truth {truth:g} from {TRUTH_SOURCES[report['period_truth_source']]}"
            f", {report['period_error_pct']:.2f} % off)")


def _breathing_summary(report: dict[str, Any], case: Path, written: list[Path]) -> None:
    out_console.print(f"track4d of {case}: {report['views']} projections over "
                      f"{report['scan_seconds']:g} s; {report['deformation']} "
                      f"({report['time_input']} input"
                      f"{', auto' if report['time_input_option'] == 'auto' else ''}), {report['device']}",
                      highlight=False)
    rows = [("period (s)", _period_cell(report)),
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
    print_summary(rows, written)


def _dsa_summary(report: dict[str, Any], case: Path, written: list[Path]) -> None:
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
    print_summary(rows, written)


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
                             "cycle alike), surrogate (each projection's breathing phase and "
                             "depth read from the projections and refined: cycles of other "
                             "length and depth) or auto (surrogate with kplanes; with anchors, or "
                             "where no surrogate can be read, phase where the projections show "
                             "cycles that keep the period, else time). [default: auto]")] = None,
    iterations: Annotated[Optional[int], typer.Option(
        help=f"Training iterations (breathing: of the deformation stage). [default: breathing "
             f"{Track4DConfig().iterations}, dsa {DsaConfig().iterations}]")] = None,
    static_iterations: Annotated[Optional[int], typer.Option(
        "--static-iterations", help=f"breathing: iterations of the static coarse stage. "
                                    f"[default: {Track4DConfig().recipe.iterations}]")] = None,
    period_init: Annotated[Optional[str], typer.Option(
        "--period-init", help=f"breathing: initial breathing period, s (learned from it), or "
                              f"{AUTO} (estimated from the projections' row shifts). [default: "
                              f"{AUTO} with phase or surrogate input, {Track4DConfig().period_init_s:g} with time "
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
    sets: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE",
        help="breathing: override a field of the 4D recipe, or recipe.FIELD of its static stage, "
             "e.g. --set recipe.rate_scale=1.5; repeatable.")] = None,
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
    dsa = mode is ModeChoice.dsa
    result = run_pipeline(
        pipelines.track4d, stages=6 if dsa else 5, case=case, out=out, mode=mode.value,
        deformation=deformation and deformation.value, time_input=time_input and time_input.value,
        iterations=iterations, static_iterations=static_iterations, period_init=period_init,
        views=views, times=times, time_smoothness=time_smoothness, seed=seed,
        checkpoint_every=checkpoint_every, sets=sets, resume=resume, force=force, device=device and device.value)
    (_dsa_summary if dsa else _breathing_summary)(result.metrics, case, result.files)
