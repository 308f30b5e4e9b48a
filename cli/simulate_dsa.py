"""``rgs simulate-dsa``: a synthetic rotational DSA run of a vessel tree, in 4DRGS's layout."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from rgs_engine.io import dsa_case as dsa_data, files as volume_io

from rgs_engine.core import runtime

from rgs_engine.sim import scan as sim, vessels
from rgs_engine.core.geometry import VolumeGrid

from .common import DeviceOption, Stages, app, handle_errors, out_console, require, start
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
    require(frames >= 2, f"--frames {frames}: a run needs at least 2 frames")
    require(grid >= 8, f"--grid {grid} is too small: use at least 8 voxels")
    require(det >= 8, f"--det {det} is too small: use at least 8 detector pixels")
    require(not out.exists() or out.is_dir(), f"{out}: exists and is not a folder: choose another OUT_DIR")
    noise_spec = sim.parse_noise(noise)
    volume_io.check_writable([out / dsa_data.MASK_RUN, out / dsa_data.FILL_RUN, out / dsa_data.TRANSFORMS,
                              out / dsa_data.TRUTH_DIR], force)
    dev = start(device)
    vol_grid = VolumeGrid.centred((grid,) * 3, vessels.BOX_MM / grid)
    with Stages(total=3) as stage:
        with stage("phantom", f"vessel tree (seed {seed})"):
            phantom = vessels.make_phantom(seed)
        with stage("simulate", f"{frames} frames of {det}x{det} on a {grid}^3 grid"):
            case = vessels.simulate_dsa_run(phantom, vol_grid, frames=frames, det=det, noise=noise_spec,
                                            seed=seed)
        with stage("write", f"write {out}"):
            dsa_data.save_dsa_case(out, case, force)

    radii = [b.radius for b in phantom.branches]
    lumen_ml = float(case.truth.mask.sum()) * float(np.prod(vol_grid.spacing)) / 1000
    run = case.truth.parameters["run"]
    dsa = dsa_data.dsa_line_integrals(case.mask_run, case.fill_run)
    bolus = phantom.bolus
    table = Table(show_header=False)
    table.add_row("volume", f"{grid}^3 voxels of {vol_grid.spacing[0]:.3g} mm ({vessels.BOX_MM:g} mm box)")
    table.add_row("vessel tree", f"{len(radii)} branches, radius {min(radii):.2f}..{max(radii):.2f} mm, "
                                 f"lumen {lumen_ml:.2f} mL")
    table.add_row("bolus", f"arrives {bolus.arrival_s:g} s, {bolus.velocity_mm_s:g} mm/s along the tree, "
                           f"peak {bolus.rise_s:g} s after arrival")
    table.add_row("run", f"{frames} frames over {run['arc_deg']:g} deg in {run['duration_s']:g} s")
    table.add_row("detector", f"{det}x{det} pixels of {run['pixel_mm']:.3g} mm")
    table.add_row("SAD / SID", f"{run['sad_mm']:g} / {run['sid_mm']:g} mm")
    table.add_row("noise", noise_text(noise_spec))
    table.add_row("DSA line integrals", f"max {float(dsa.max()):.3g}")
    table.add_row("device", runtime.describe(dev))
    table.add_row("seconds", json.dumps(stage.seconds))
    out_console.print(table)
    out_console.print(f"wrote {out}")
