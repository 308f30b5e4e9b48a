"""``rgs simulate``: a simulated X-ray scan of a CT (or a phantom) into an rgs ``.h5`` file
(the work is :func:`rgs_engine.pipelines.simulate`)."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.table import Table

from rgs_engine import pipelines
from rgs_engine.core import runtime
from rgs_engine.core.errors import RgsInputError
from rgs_engine.sim import scan

from .common import DeviceOption, app, handle_errors, out_console, run_pipeline


class OrbitChoice(str, Enum):
    circular = "circular"
    arbitrary = "arbitrary"


class PhantomChoice(str, Enum):
    shepp_logan = "shepp-logan"


class NoiseModelChoice(str, Enum):
    tigre = "tigre"
    physical = "physical"


def noise_text(noise: tuple[float, float] | None, model: str | None = None) -> str:
    """The summary table's noise cell: ``none`` or photons, sigma (and the model)."""
    if noise is None:
        return "none"
    return f"{noise[0]:g} photons, sigma {noise[1]:g}" + (f" ({model})" if model else "")


def has_noise(text: str) -> bool:
    """Whether ``--noise`` asks for noise (the progress display's stage count; a malformed
    value counts as noise and is refused by the pipeline)."""
    try:
        return scan.parse_noise(text) is not None
    except RgsInputError:
        return True


def add_scan_rows(table: Table, data, noise, noise_model: str, dev, seconds: dict, out: Path) -> None:
    """The rows every simulated scan file's summary ends with: detector, distances, noise,
    largest line integral, device, stage seconds and the written file."""
    setup = data.attributes["scan"]
    h, w = data.geometry.det_shape
    table.add_row("detector", f"{h}x{w} pixels of {setup['pixel_mm']:.3g} mm")
    table.add_row("DSO / DSD", f"{setup['dso_mm']:.4g} / {setup['dsd_mm']:.4g} mm")
    table.add_row("noise", noise_text(noise, noise_model))
    table.add_row("line integrals", f"max {float(data.projections.max()):.3g}")
    table.add_row("device", runtime.describe(dev))
    table.add_row("seconds", json.dumps(seconds))
    table.add_row("file", f"{out} ({_size(out.stat().st_size)})")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@app.command()
@handle_errors
def simulate(
    paths: Annotated[List[Path], typer.Argument(
        metavar="[CT.nii.gz] OUT.h5",
        help="CT volume in Hounsfield units (axis-aligned NIfTI; omit it with --phantom) and "
             "the projection file to write (.h5).")],
    phantom: Annotated[Optional[PhantomChoice], typer.Option(
        help="Simulate an analytic phantom instead of a CT (then give only OUT.h5).")] = None,
    grid: Annotated[int, typer.Option(
        help="Voxels along the volume box's longest edge (isotropic).")] = 128,
    box: Annotated[float, typer.Option(help="Phantom only: side of its cubic box, mm.")] = 256.0,
    views: Annotated[int, typer.Option(help="Training projections.")] = 50,
    test_views: Annotated[int, typer.Option(
        "--test-views", help="Held-out noiseless projections at other angles / poses.")] = 25,
    orbit: Annotated[OrbitChoice, typer.Option(
        help="circular: evenly spaced views over --arc about z; arbitrary: random calibrated "
             "C-arm poses (primary angle over --arc, secondary within +-30 deg, random "
             "detector roll, isocentre jitter).")] = OrbitChoice.circular,
    arc: Annotated[float, typer.Option(help="Angular range of the orbit, degrees.")] = 360.0,
    dso: Annotated[Optional[float], typer.Option(
        help="Source to isocentre distance, mm [default: 2.5 x the box's longest edge].")] = None,
    dsd: Annotated[Optional[float], typer.Option(
        help="Source to detector distance, mm [default: 3.5 x the box's longest edge, or "
             "1.4 x --dso].")] = None,
    det: Annotated[int, typer.Option(help="Detector pixels per side (square).")] = 256,
    pixel: Annotated[Optional[float], typer.Option(
        help="Detector pixel pitch, mm [default: the detector covers the volume].")] = None,
    noise: Annotated[str, typer.Option(
        help="PHOTONS,SIGMA: Poisson counts + Gaussian electronic noise on the training "
             "views (R2-Gaussian: 1e4,10), or none.")] = "none",
    noise_model: Annotated[NoiseModelChoice, typer.Option(
        "--noise-model", help="tigre: line integrals scaled by their maximum first (TIGRE's "
                              "CTnoise, as R2-Gaussian); physical: PHOTONS is the unattenuated "
                              "count.")] = NoiseModelChoice.tigre,
    normalise: Annotated[bool, typer.Option(
        "--normalise", help="R2-Gaussian's protocol: volume scaled to [0, 1] per half box side "
                            "(mu = v / (side / 2) in 1/mm).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random poses, test angles and noise.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing OUT.h5.")] = False,
    device: DeviceOption = None,
) -> None:
    """Simulate a cone-beam X-ray scan of a CT (or a phantom) and write an rgs projection file.

    HU -> attenuation (mu = 0.02/mm x (1 + HU/1000), >= 0), resampled to an isotropic grid;
    Joseph DRR projections of the training and test views; optional noise; written with the
    ground truth and the parameters to OUT.h5 (format: datasets/FORMAT.md).
    """
    r = run_pipeline(pipelines.simulate, stages=4 + (test_views > 0) + has_noise(noise), paths=paths,
                     phantom=phantom and phantom.value, grid=grid, box=box, views=views,
                     test_views=test_views, orbit=orbit.value, arc=arc, dso=dso, dsd=dsd, det=det,
                     pixel=pixel, noise=noise, noise_model=noise_model.value, normalise=normalise,
                     seed=seed, force=force, device=device and device.value)
    data, vol_grid = r.extra["data"], r.extra["grid"]
    table = Table(show_header=False)
    table.add_row("volume", f"{'x'.join(map(str, vol_grid.shape))} voxels of {vol_grid.spacing[0]:.3g} mm"
                  + (" (normalised, R2-Gaussian units)" if normalise else ""))
    table.add_row("views", f"{data.num_views} training + {test_views} test, {orbit.value} orbit"
                  + (f" over {arc:g} deg" if orbit is OrbitChoice.circular else ""))
    add_scan_rows(table, data, r.extra["spec"].noise, noise_model.value, r.extra["device"],
                  r.metrics["seconds_by_stage"], r.out)
    out_console.print(table)
    out_console.print(f"wrote {r.out}")
