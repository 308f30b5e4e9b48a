"""``rgs roundtrip``: the engine's end-to-end check on a real CT (DRR scan, then FDK); the
work is :func:`rgs_engine.pipelines.roundtrip`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from rgs_engine import pipelines

from .common import DeviceOption, FilterChoice, app, handle_errors, out_console, run_pipeline


@app.command()
@handle_errors
def roundtrip(
    ct_path: Annotated[Path, typer.Argument(
        metavar="CT.nii.gz", help="CT volume in Hounsfield units (axis-aligned NIfTI).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (created if missing).")],
    grid: Annotated[int, typer.Option(help="Voxels along the CT box's longest edge (isotropic).")] = 128,
    views: Annotated[int, typer.Option(help="Projections over a full circle.")] = 180,
    dso: Annotated[float, typer.Option(help="Source to rotation axis distance, mm.")] = 1000.0,
    dsd: Annotated[float, typer.Option(help="Source to detector distance, mm.")] = 1500.0,
    det: Annotated[int, typer.Option(
        help="Detector pixels per side (a square detector sized to cover the volume).")] = 256,
    filter: Annotated[FilterChoice, typer.Option(help="FDK filter window.")] = FilterChoice.ramp,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    device: DeviceOption = None,
) -> None:
    """Simulate a cone-beam scan of a real CT and reconstruct it with FDK: the engine's check.

    HU -> attenuation (mu = 0.02/mm x (1 + HU/1000), >= 0), resample to an isotropic grid,
    project every view with the Joseph projector, reconstruct with FDK, compare with the
    ground truth. Writes OUT/fdk.nii.gz (in the CT's world frame), OUT/slices.png (ground
    truth row, FDK row) and OUT/metrics.json.
    """
    r = run_pipeline(pipelines.roundtrip, stages=6, ct_path=ct_path, out=out, grid=grid, views=views,
                     dso=dso, dsd=dsd, det=det, filter=filter.value, force=force,
                     device=device and device.value)
    report, vol_grid = r.metrics, r.extra["grid"]
    out_console.print(f"roundtrip of {ct_path}: {'x'.join(map(str, vol_grid.shape))} voxels of "
                      f"{vol_grid.spacing[0]:.3g} mm, {views} views, {report['device']}")
    table = Table()
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("PSNR 3D (dB)", f"{report['psnr_3d']:.2f}")
    table.add_row("SSIM 3D", f"{report['ssim_3d']:.4f}")
    for key, seconds in report["seconds"].items():
        table.add_row(f"{key} (s)", f"{seconds:.2f}")
    out_console.print(table)
    for path in r.files:
        out_console.print(f"wrote {path}")
