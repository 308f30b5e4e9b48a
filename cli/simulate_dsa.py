"""``rgs simulate-dsa``: a synthetic rotational DSA run of a vessel tree, in 4DRGS's layout
(:func:`rgs_engine.pipelines.simulate_dsa` does the work; this module parses and prints)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from rgs_engine import pipelines
from rgs_engine.sim import vessels

from .common import DeviceOption, app, handle_errors, out_console, run_pipeline
from .simulate import noise_text


@app.command("simulate-dsa")
@handle_errors
def simulate_dsa(
    out: Annotated[Path, typer.Argument(
        metavar="OUT_DIR", help="Case folder to write (mask_run.nii.gz, fill_run.nii.gz, "
                                "transforms.json, ground_truth/).")],
    frames: Annotated[int, typer.Option(help="Frames of the rotational run (4DRGS: 133).")] = vessels.FRAMES,
    grid: Annotated[int, typer.Option(
        help=f"Voxels per side of the {vessels.BOX_MM:g} mm cubic volume.")] = 128,
    det: Annotated[int, typer.Option(help="Detector pixels per side (square, covering the volume).")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the vessel tree and the noise.")] = 0,
    noise: Annotated[str, typer.Option(
        help="PHOTONS,SIGMA: Poisson counts from PHOTONS unattenuated photons plus Gaussian "
             "electronic noise of SIGMA counts on both runs, or none.")] = "none",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing case.")] = False,
    device: DeviceOption = None,
) -> None:
    """Simulate a rotational DSA run of a synthetic vessel tree with a contrast bolus.

    A seeded tree of branching tubes (Murray's law radii and angles) in a head of soft
    tissue and bone; the contrast arrives along the tree with a gamma-variate bolus. The
    C-arm turns 198 degrees in 4.4 s about the volume's centre (SAD 750 mm, SID 1200 mm):
    mask run = tissue, fill run = tissue + contrast at each frame's time, raw intensities.
    Writes the 4DRGS case layout with the ground truth (time-averaged and per-frame contrast
    volumes, lumen mask and surface, centre lines).
    """
    m = run_pipeline(pipelines.simulate_dsa, stages=3, out=out, frames=frames, grid=grid, det=det,
                     seed=seed, noise=noise, force=force, device=device and device.value).metrics
    run, bolus = m["run"], m["bolus"]
    table = Table(show_header=False)
    table.add_row("volume", f"{grid}^3 voxels of {m['voxel_mm']:.3g} mm ({vessels.BOX_MM:g} mm box)")
    table.add_row("vessel tree", f"{m['branches']} branches, radius {m['radius_mm'][0]:.2f}.."
                                 f"{m['radius_mm'][1]:.2f} mm, lumen {m['lumen_ml']:.2f} mL")
    table.add_row("bolus", f"arrives {bolus['arrival_s']:g} s, {bolus['velocity_mm_s']:g} mm/s along the "
                           f"tree, peak {bolus['rise_s']:g} s after arrival")
    table.add_row("run", f"{frames} frames over {run['arc_deg']:g} deg in {run['duration_s']:g} s")
    table.add_row("detector", f"{det}x{det} pixels of {run['pixel_mm']:.3g} mm")
    table.add_row("SAD / SID", f"{run['sad_mm']:g} / {run['sid_mm']:g} mm")
    table.add_row("noise", noise_text(m["noise"]))
    table.add_row("DSA line integrals", f"max {m['dsa_max']:.3g}")
    table.add_row("device", m["device"])
    table.add_row("seconds", json.dumps(m["seconds"]))
    out_console.print(table)
    out_console.print(f"wrote {out}")
