"""``rgs simulate4d``: a simulated free-breathing scan of a CT into a NAF-style 4D pickle
(:func:`rgs_engine.pipelines.simulate4d` does the work; this module parses and prints)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from rgs_engine import pipelines

from .common import DeviceOption, app, handle_errors, out_console, run_pipeline
from .simulate import NoiseModelChoice, add_scan_rows, has_noise


@app.command()
@handle_errors
def simulate4d(
    ct: Annotated[Path, typer.Argument(
        metavar="CT.nii.gz", help="Chest CT in Hounsfield units (axis-aligned NIfTI) showing the lungs.")],
    out: Annotated[Path, typer.Argument(
        metavar="OUT.pickle", help="The NAF-style 4D pickle to write (.pickle or .pkl).")],
    grid: Annotated[int, typer.Option(
        help="Voxels along the volume box's longest edge (isotropic).")] = 128,
    projections: Annotated[int, typer.Option(
        help="Training projections, evenly spread in time and angle over the scan.")] = 300,
    val_projections: Annotated[int, typer.Option(
        "--val-projections", help="Noiseless test projections at random times of the scan.")] = 10,
    scan_seconds: Annotated[float, typer.Option(
        "--scan-seconds", help="Length of the scan (one full gantry turn), seconds.")] = 60.0,
    period: Annotated[float, typer.Option(help="Breathing period, seconds (the mean one with "
                                               "--irregular).")] = 3.5,
    irregular: Annotated[bool, typer.Option(
        "--irregular", help="Irregular breathing: cycle-to-cycle period and amplitude jitter and "
                            "one deeper breath (seeded).")] = False,
    amplitude_mm: Annotated[str, typer.Option(
        "--amplitude-mm", help="SI,AP: peak inferior displacement of the diaphragm and peak "
                               "anterior displacement of the chest wall, mm (reached in the "
                               "deep breath with --irregular).")] = "15,5",
    phases: Annotated[int, typer.Option(
        help="Ground-truth volumes at this many times spread over one breathing cycle.")] = 10,
    det: Annotated[int, typer.Option(help="Detector pixels per side (square).")] = 256,
    noise: Annotated[str, typer.Option(
        help="PHOTONS,SIGMA: Poisson counts + Gaussian electronic noise on the training "
             "projections (R2-Gaussian: 1e4,10), or none.")] = "none",
    noise_model: Annotated[NoiseModelChoice, typer.Option(
        "--noise-model", help="tigre: line integrals scaled by their maximum first (TIGRE's "
                              "CTnoise, as R2-Gaussian); physical: PHOTONS is the unattenuated "
                              "count.")] = NoiseModelChoice.tigre,
    seed: Annotated[int, typer.Option(
        help="Seed of the irregular breathing, the test times and the noise.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing OUT.pickle.")] = False,
    device: DeviceOption = None,
) -> None:
    """Simulate a free-breathing cone-beam scan of a chest CT and write a NAF-style 4D pickle.

    HU -> attenuation on an isotropic grid (centred on the world origin, RAS+ axes); a
    smooth breathing displacement field from the CT's body, lung and bone masks (diaphragm
    and abdomen superior-inferior, chest wall anterior-posterior) following a breathing
    curve; each projection is the Joseph DRR of the volume warped to its time; ground-truth
    volumes at --phases times of one cycle. The pickle holds X2-Gaussian's keys plus
    scan_seconds, period_s and phase_times_s.
    """
    r = run_pipeline(pipelines.simulate4d, stages=5 + (val_projections > 0) + has_noise(noise), ct=ct,
                     out=out, grid=grid, projections=projections, val_projections=val_projections,
                     scan_seconds=scan_seconds, period=period, irregular=irregular,
                     amplitude_mm=amplitude_mm, phases=phases, det=det, noise=noise,
                     noise_model=noise_model.value, seed=seed, force=force, device=device and device.value)
    data, spec = r.extra["data"], r.extra["spec"]
    si_mm, ap_mm = spec.amplitude_mm
    times = ", ".join(f"{t:.3g}" for t in data.phase_times_s.tolist())
    table = Table(show_header=False)
    table.add_row("volume", f"{'x'.join(map(str, data.grid.shape))} voxels of "
                            f"{data.grid.spacing[0]:.3g} mm, centred on the origin")
    table.add_row("projections", f"{data.num_views} training + {val_projections} test over "
                                 f"{scan_seconds:g} s, one circular turn")
    table.add_row("breathing", f"{'irregular' if irregular else 'regular'}, period {period:g} s, "
                               f"peak SI {si_mm:g} mm, AP {ap_mm:g} mm")
    table.add_row("phases", f"{phases} ground-truth volumes at t = {times} s")
    add_scan_rows(table, data, spec.noise, noise_model.value, r.extra["device"], r.metrics["seconds"], out)
    out_console.print(table)
    out_console.print(f"wrote {out}")
