"""``rgs simulate-xrays``: simulated calibrated radiographs of a CT at a known rigid pose
(the work is :func:`rgs_engine.pipelines.simulate_xrays`)."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.table import Table

from rgs_engine import pipelines
from rgs_engine.core import rigid

from .common import DeviceOption, app, handle_errors, out_console, run_pipeline
from .simulate import NoiseModelChoice, has_noise, noise_text


class ImageFormatChoice(str, Enum):
    npy = "npy"
    png = "png"
    dcm = "dcm"


@app.command("simulate-xrays")
@handle_errors
def simulate_xrays(
    ct: Annotated[Path, typer.Argument(metavar="CT.nii.gz", help="CT in Hounsfield units (axis-aligned NIfTI).")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="X-ray folder to write.")],
    grid: Annotated[int, typer.Option(help="Voxels along the CT box's longest edge (isotropic).")] = 256,
    views: Annotated[Optional[str], typer.Option(
        help="Angles in degrees (comma separated) of a circular orbit about the isocentre; "
             "default: AP + lateral (90,0).")] = None,
    offset_mm: Annotated[float, typer.Option(
        "--offset-mm", help="Length of the true pose's translation (random direction), mm.")] = 0.0,
    offset_deg: Annotated[float, typer.Option(
        "--offset-deg", help="Angle of the true pose's rotation about the CT centre (random axis), deg.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the pose and the noise.")] = 0,
    dso: Annotated[float, typer.Option(help="Source to isocentre distance, mm.")] = 1000.0,
    dsd: Annotated[float, typer.Option(help="Source to detector distance, mm.")] = 1500.0,
    det: Annotated[int, typer.Option(help="Detector pixels per side (square).")] = 256,
    pixel: Annotated[Optional[float], typer.Option(
        help="Detector pixel pitch, mm [default: the detector covers the volume at any pose].")] = None,
    noise: Annotated[str, typer.Option(
        help="PHOTONS,SIGMA: Poisson counts + Gaussian electronic noise, or none.")] = "none",
    noise_model: Annotated[NoiseModelChoice, typer.Option(
        "--noise-model", help="As rgs simulate: tigre (scaled by the largest line integral) or "
                              "physical.")] = NoiseModelChoice.tigre,
    detector: Annotated[Optional[str], typer.Option(
        help="Detector-like images instead of line integrals, e.g. gamma=0.6,scatter=0.2,blur=1.2,"
             "collimation=14,label=AP (contrast-curve exponent, scatter fraction, blur sigma px, "
             "unexposed border px, text burned into view label_view=0; see rgs_engine.sim.radiograph).")] = None,
    image_format: Annotated[ImageFormatChoice, typer.Option(
        "--format", help="npy: float32 line integrals; png: 16-bit, scaled per view; dcm: DICOM DX "
                         "files whose tags hold the geometry (no geometry.json).")] = ImageFormatChoice.npy,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files in OUT_DIR.")] = False,
    device: DeviceOption = None,
) -> None:
    """Simulate calibrated X-rays (DRRs) of a CT at a known rigid pose into an X-ray folder.

    The views (AP + lateral by default) sit about the isocentre = the CT box's centre in CT
    world coordinates, i.e. where the CT centre is at the identity pose. The true pose
    ``ct_to_xray`` rotates the CT by --offset-deg about its centre (random axis) and shifts
    it by --offset-mm (random direction). The DRRs are rendered by moving the view vectors
    into CT world with the inverse pose and projecting the CT there (no resampling of the CT).
    Written with ground_truth_ct_to_xray (format: datasets/FORMAT.md, "X-ray folders").
    """
    r = run_pipeline(pipelines.simulate_xrays, stages=4 + has_noise(noise) + bool(detector), ct=ct,
                     out_dir=out_dir, grid=grid, views=views, offset_mm=offset_mm, offset_deg=offset_deg,
                     seed=seed, dso=dso, dsd=dsd, det=det, pixel=pixel, noise=noise, noise_model=noise_model.value,
                     detector=detector, image_format=image_format.value, force=force,
                     device=device and device.value)
    x, pose, centre, angles = r.extra, r.extra["pose"], r.extra["centre"], r.extra["angles"]
    moved = float(np.linalg.norm(rigid.apply(pose, centre) - centre))
    table = Table(show_header=False)
    table.add_row("volume", f"{'x'.join(map(str, x['grid'].shape))} voxels of {x['grid'].spacing[0]:.3g} mm")
    table.add_row("views", "AP + lateral" if angles is None else ", ".join(f"{a:g}" for a in angles) + " deg")
    table.add_row("detector", f"{det}x{det} pixels of {x['pixel']:.3g} mm")
    table.add_row("DSO / DSD", f"{dso:.4g} / {dsd:.4g} mm")
    table.add_row("true pose", f"{moved:.3g} mm, {rigid.rotation_angle_deg(pose):.3g} deg (seed {seed})")
    table.add_row("noise", noise_text(x["noise"], noise_model.value))
    table.add_row("line integrals", f"max {r.metrics['max_line_integral']:.3g}")
    table.add_row("images", f"detector-like, {detector}" if detector else "line integrals")
    table.add_row("device", r.metrics["device"])
    table.add_row("seconds", json.dumps(r.metrics["seconds_by_stage"]))
    images = [f for f in r.files if f.suffix == f".{image_format.value}"]
    table.add_row("folder", f"{out_dir} ({len(images)} {image_format.value} images"
                  + "".join(f" + {f.name}" for f in r.files if f not in images) + ")")
    out_console.print(table)
    out_console.print(f"wrote {out_dir}")
