"""The ``rgs`` command line.

Commands: ``rgs info`` (versions and compute device) and ``rgs roundtrip`` (the engine's
end-to-end check on a real CT). Every command takes ``--device auto|cuda|cpu`` (default:
``$RGS_DEVICE``, else ``auto``). Bad input ends with one line ``error: ...`` on stderr and
exit status 2; outputs are written atomically and existing ones are kept unless ``--force``.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Iterator, Optional

import torch
import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                           TextColumn, TimeElapsedColumn)
from rich.table import Table

import rgs_engine
from rgs_engine import ct, imaging, metrics, runtime, volume_io
from rgs_engine.errors import RgsDeviceError, RgsInputError

app = typer.Typer(
    name="rgs", add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
    help="X-ray radiative Gaussian splatting. Scenarios recon / register / track4d are coming; "
         "today: the engine and its end-to-end check (roundtrip).")
out_console = Console()
err_console = Console(stderr=True)


class DeviceChoice(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class FilterChoice(str, Enum):
    ramp = "ramp"
    hann = "hann"


DeviceOption = Annotated[Optional[DeviceChoice], typer.Option(
    "--device", help="Compute device; default: $RGS_DEVICE, else auto (CUDA when available).")]


def _fail(message: str) -> None:
    typer.echo("error: " + " ".join(message.split()), err=True)
    raise typer.Exit(2)


def handle_errors(command):
    """Turn input, device and file-system problems into one ``error: ...`` line, exit 2."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (RgsInputError, RgsDeviceError) as exc:
            _fail(str(exc))
        except OSError as exc:  # missing file, permission denied, a file where a folder should be
            where = exc.filename or "file system"
            _fail(f"{where}: {exc.strerror or exc}: check the path and its permissions")
    return wrapper


def _start(device: DeviceChoice | None) -> torch.device:
    return runtime.init(device.value if device is not None else None)


def versions() -> dict[str, str]:
    """Versions of rgs, Python, torch (with its CUDA) and Taichi."""
    import taichi as ti

    return {"rgs": rgs_engine.__version__, "python": platform.python_version(),
            "torch": f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})",
            "taichi": ".".join(map(str, ti.__version__))}


# --------------------------------------------------------------------------------------
# rgs info
# --------------------------------------------------------------------------------------
@app.command()
@handle_errors
def info(device: DeviceOption = None) -> None:
    """Versions (rgs, Python, torch, Taichi), the compute device rgs would use, the GPUs."""
    dev = _start(device)
    table = Table(show_header=False, box=None)
    for name, version in versions().items():
        table.add_row(name, version)
    table.add_row("device", runtime.describe(dev))
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    table.add_row("GPUs", ", ".join(gpus) or "none visible to torch")
    out_console.print(table)


# --------------------------------------------------------------------------------------
# rgs roundtrip
# --------------------------------------------------------------------------------------
class Stages:
    """A rich progress display (stderr) over named stages that records each stage's seconds.

    The display is erased if a stage fails. Each stage ends with
    :func:`rgs_engine.runtime.sync`, so GPU work is counted in the stage that queued it.
    """

    def __init__(self, total: int):
        self.seconds: dict[str, float] = {}
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description:<34}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(), console=err_console)
        self._task = self._progress.add_task("", total=total)

    def __enter__(self) -> "Stages":
        self._progress.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # leave the error line alone on stderr
            self._progress.live.transient = True
        self._progress.stop()

    @contextlib.contextmanager
    def __call__(self, key: str, label: str) -> Iterator[None]:
        self._progress.update(self._task, description=label)
        t0 = time.perf_counter()
        yield
        runtime.sync()
        self.seconds[key] = round(time.perf_counter() - t0, 3)
        self._progress.advance(self._task)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise RgsInputError(message)


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
    _require(grid >= 8, f"--grid {grid} is too small: use at least 8 voxels")
    _require(views >= 2, f"--views {views} is too few: use at least 2 projections")
    _require(det >= 8, f"--det {det} is too small: use at least 8 detector pixels")
    _require(not out.exists() or out.is_dir(), f"--out {out} is a file: pass a directory")
    outputs = {name: out / name for name in ("fdk.nii.gz", "slices.png", "metrics.json")}
    volume_io.check_writable(list(outputs.values()), force)
    dev = _start(device)

    with Stages(total=6) as stage:
        with stage("load", f"load {ct_path.name}"):
            hu, ct_grid = volume_io.load_nifti(ct_path)
        with stage("resample", "HU -> attenuation, resample"):
            vol_grid = ct.fit_grid(ct_grid, grid)
            truth = ct.resample(ct.hu_to_mu(hu.to(dev)), ct_grid, vol_grid)
            _require(float(truth.max()) > 0, f"{ct_path}: no voxel attenuates (all <= -1000 HU): "
                                             "pass a CT in Hounsfield units")
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
        "versions": versions(),
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
