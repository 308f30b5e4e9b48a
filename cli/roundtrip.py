"""``rgs roundtrip``: the engine's end-to-end check on a real CT (DRR scan, then FDK)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

import rgs_engine
from rgs_engine.sim import ct
from rgs_engine.io import images as imaging, files as volume_io
from rgs_engine.core import metrics, runtime

from .common import (DeviceOption, FilterChoice, Stages, app, handle_errors, out_console, require,
                     start)


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
    require(grid >= 8, f"--grid {grid} is too small: use at least 8 voxels")
    require(views >= 2, f"--views {views} is too few: use at least 2 projections")
    require(det >= 8, f"--det {det} is too small: use at least 8 detector pixels")
    require(not out.exists() or out.is_dir(), f"--out {out} is a file: pass a directory")
    outputs = {name: out / name for name in ("fdk.nii.gz", "slices.png", "metrics.json")}
    volume_io.check_writable(list(outputs.values()), force)
    dev = start(device)

    with Stages(total=6) as stage:
        with stage("load", f"load {ct_path.name}"):
            hu, ct_grid = volume_io.load_nifti(ct_path)
        with stage("resample", "HU -> attenuation, resample"):
            truth, vol_grid = ct.attenuation_volume(hu.to(dev), ct_grid, grid, str(ct_path))
            scan = ct.covering_scan(vol_grid, views, dso, dsd, det)
        with stage("project", f"project {views} views of {det}x{det}"):
            sinogram = rgs_engine.project(truth, vol_grid, scan)
        with stage("fdk", f"FDK ({filter.value}) onto {'x'.join(map(str, vol_grid.shape))}"):
            recon = rgs_engine.fdk(sinogram, scan, vol_grid, filter=filter.value)
        with stage("metrics", "PSNR / SSIM"):
            psnr, ssim = metrics.psnr_3d(recon, truth), metrics.ssim_3d(recon, truth)
        with stage("write", "write outputs"):
            volume_io.save_nifti(outputs["fdk.nii.gz"], recon, vol_grid, force)
            imaging.slices_png(outputs["slices.png"], {"ground truth": truth, "FDK": recon},
                               vol_grid, force)

    report = {
        "ct": str(ct_path),
        "psnr_3d": psnr,
        "ssim_3d": ssim,
        "seconds": stage.seconds,
        "device": runtime.describe(dev),
        "grid": vol_grid.to_dict(),
        "views": views,
        "scan": {"dso_mm": dso, "dsd_mm": dsd, "detector": [det, det],
                 "pixel_mm": float(scan.vectors[0, 6:9].norm()), "filter": filter.value,
                 "orbit": "full circle about z through the grid centre"},
        "mu_water_per_mm": ct.MU_WATER,
        "versions": runtime.versions(),
    }
    volume_io.save_json(outputs["metrics.json"], report, force)

    out_console.print(f"roundtrip of {ct_path}: {'x'.join(map(str, vol_grid.shape))} voxels of "
                      f"{vol_grid.spacing[0]:.3g} mm, {views} views, {report['device']}")
    table = Table()
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("PSNR 3D (dB)", f"{psnr:.2f}")
    table.add_row("SSIM 3D", f"{ssim:.4f}")
    for key, seconds in stage.seconds.items():
        table.add_row(f"{key} (s)", f"{seconds:.2f}")
    out_console.print(table)
    for path in outputs.values():
        out_console.print(f"wrote {path}")
