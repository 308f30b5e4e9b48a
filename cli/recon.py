"""``rgs recon``: sparse-view CT reconstruction from projections (Gaussians, FDK or SART);
the work, outputs and resume rules are :func:`rgs_engine.pipelines.recon`'s."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from rgs_engine import pipelines
from rgs_engine.io.projections import describe
from rgs_engine.pipelines.reconstruct import DEFAULT_CHECKPOINT_EVERY
from rgs_engine.recon import presets, sart as iterative
from rgs_engine.recon.gaussian import GSConfig

from .common import DeviceOption, FilterChoice, app, fmt, handle_errors, out_console, print_summary, run_pipeline


class MethodChoice(str, Enum):
    gs = "gs"
    fdk = "fdk"
    sart = "sart"


class InitChoice(str, Enum):
    auto = "auto"
    fdk = "fdk"
    sart = "sart"
    random = "random"


@app.command()
@handle_errors
def recon(
    data_path: Annotated[Path, typer.Argument(
        metavar="DATA",
        help="Projections: an rgs .h5 file, an R2-Gaussian data folder or a NAF .pickle.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (created if missing).")],
    views: Annotated[Optional[int], typer.Option(
        help="Use N training views spread evenly over the scan (default: all).")] = None,
    method: Annotated[Optional[MethodChoice], typer.Option(
        help="gs (radiative Gaussians), fdk (circular orbits) or sart (OS-SART). [default: gs]")] = None,
    init: Annotated[Optional[InitChoice], typer.Option(
        help="gs initialisation: fdk (circular orbits), sart (any poses; 6 OS-SART iterations), "
             "random, or auto (sart). "
             "[default: auto]")] = None,
    preset: Annotated[str | None, typer.Option(
        metavar="|".join(presets.PRESETS),
        help=f"gs recipe preset, a point on the time / quality curve ({presets.describe()}). "
             "--iterations and --set override its values; --resume keeps the run's. "
             "[default: default]")] = None,
    iterations: Annotated[Optional[int], typer.Option(
        help=f"gs / sart iterations. [default: gs {GSConfig().iterations}, "
             f"sart {iterative.DEFAULT_ITERATIONS}]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (gs). [default: 0]")] = None,
    filter: Annotated[Optional[FilterChoice], typer.Option(
        help="FDK filter window. [default: ramp]")] = None,
    subsets: Annotated[Optional[int], typer.Option(
        help=f"SART ordered subsets. [default: {iterative.DEFAULT_SUBSETS}, at most one per "
             "view]")] = None,
    relaxation: Annotated[Optional[float], typer.Option(
        help=f"SART relaxation lambda in (0, 2). [default: {iterative.DEFAULT_RELAXATION}]")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        "--checkpoint-every",
        help=f"Iterations between checkpoints. [default: gs {DEFAULT_CHECKPOINT_EVERY['gs']}, "
             f"sart {DEFAULT_CHECKPOINT_EVERY['sart']}]")] = None,
    sets: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE",
        help="Override a field of the Gaussian recipe (gs), e.g. --set num_init=20000; "
             "repeatable.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume",
        help="Continue the interrupted gs / sart run in --out (settings from its "
             "config.json).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    device: DeviceOption = None,
) -> None:
    """Reconstruct a volume from (sparse) projections with Gaussians, FDK or SART.

    Writes OUT/volume.nii.gz (on the data's grid, in its world frame), OUT/slices.png (next
    to the ground truth when the data has one), OUT/metrics.json (3D PSNR / SSIM against the
    ground truth, 2D PSNR / SSIM on the held-out test views, seconds), OUT/config.json and,
    for gs / sart, OUT/checkpoint.pt (and OUT/gaussians.npz for gs). Ctrl-C during the
    iterations saves a checkpoint; continue with --resume.
    """
    stages = None if resume else (5 if method in (None, MethodChoice.gs) else 4)
    r = run_pipeline(pipelines.recon, stages=stages, data_path=data_path, out=out, views=views,
                     method=method and method.value, init=init and init.value, iterations=iterations,
                     seed=seed, filter=filter and filter.value, subsets=subsets, relaxation=relaxation,
                     checkpoint_every=checkpoint_every, sets=sets, preset=preset, resume=resume, force=force,
                     device=device and device.value)
    report = r.metrics
    preset_text = f" (preset {report['preset']})" if report.get("preset") else ""
    out_console.print(f"recon of {data_path}: {describe(r.extra['data'])}; method {report['method']}"
                      f"{preset_text}, {report['device']}", highlight=False)
    rows = [("PSNR 3D (dB)", fmt(report["psnr_3d"])), ("SSIM 3D", fmt(report["ssim_3d"], 4)),
            ("PSNR 2D test (dB)", fmt(report["psnr_2d_test"])),
            ("SSIM 2D test", fmt(report["ssim_2d_test"], 4)),
            ("iterations", str(report["iterations"]) if report["iterations"] is not None else "n/a"),
            ("Gaussians", "n/a" if report["num_gaussians"] is None else f"{report['num_gaussians']:,}"),
            ("seconds", f"{report['seconds']:.2f}")]
    print_summary(rows, r.files)
