"""``rgs simulate-xrays``: simulated calibrated radiographs of a CT at a known rigid pose."""
from __future__ import annotations

import json
import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer
from rich.table import Table

from rgs_engine.core import rigid, runtime

from rgs_engine.sim import scan as sim

from rgs_engine.io import files as volume_io, xrays as xray_data
from rgs_engine.core.geometry import Geometry

from .common import DeviceOption, Stages, app, handle_errors, out_console, require, start
from .simulate import NoiseModelChoice, noise_text


class ImageFormatChoice(str, Enum):
    npy = "npy"
    png = "png"


def parse_angles(text: str | None) -> list[float] | None:
    """``"0,90"`` -> [0.0, 90.0] (degrees); None -> None (the AP + lateral pair)."""
    if text is None:
        return None
    try:
        angles = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        angles = []
    require(bool(angles) and all(math.isfinite(a) for a in angles),
            f"--views {text!r}: write angles in degrees separated by commas, e.g. 90,0")
    return angles


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
    image_format: Annotated[ImageFormatChoice, typer.Option(
        "--format", help="npy: float32 line integrals; png: 16-bit, scaled per view.")] = ImageFormatChoice.npy,
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
    require(grid >= 8, f"--grid {grid} is too small: use at least 8 voxels")
    require(det >= 8, f"--det {det} is too small: use at least 8 detector pixels")
    require(math.isfinite(dso) and math.isfinite(dsd) and 0 < dso < dsd,
            f"--dso {dso:g} --dsd {dsd:g}: need 0 < DSO < DSD (mm)")
    require(pixel is None or (math.isfinite(pixel) and pixel > 0),
            f"--pixel {pixel}: the pixel pitch must be positive (mm)")
    require(math.isfinite(offset_mm) and offset_mm >= 0, f"--offset-mm {offset_mm:g}: must be >= 0")
    require(math.isfinite(offset_deg) and 0 <= offset_deg <= 180,
            f"--offset-deg {offset_deg:g}: must be in [0, 180] degrees")
    angles = parse_angles(views)
    noise_spec = sim.parse_noise(noise)
    names = (["ap", "lateral"] if angles is None
             else [f"view{k:02d}" for k in range(len(angles))])
    ext = image_format.value
    require(not out_dir.exists() or out_dir.is_dir(), f"{out_dir} exists and is not a folder: pick another OUT_DIR")
    volume_io.check_writable([out_dir / xray_data.GEOMETRY_FILE] + [out_dir / f"{n}.{ext}" for n in names], force)
    dev = start(device)

    n_views = 2 if angles is None else len(angles)
    with Stages(total=4 + (noise_spec is not None)) as stage:
        with stage("volume", f"load {ct.name}, HU -> attenuation"):
            volume, vol_grid = sim.load_ct_volume(ct, grid, dev)
        with stage("geometry", f"pose and {n_views} views"):
            centre = np.asarray(vol_grid.centre)
            pose = rigid.random_offset(offset_mm, offset_deg, np.random.default_rng(seed), centre)
            lo, hi = vol_grid.bounds()
            radius = float(np.linalg.norm(hi - lo)) / 2 + offset_mm
            pitch = pixel if pixel is not None else sim.sphere_covering_pixel(radius, dso, dsd, det)
            if angles is None:
                geo_xray = Geometry.biplanar(dso, dsd, (det, det), pitch, isocentre=centre)
            else:
                geo_xray = Geometry.circular(np.radians(angles), dso, dsd, (det, det), pitch,
                                             isocentre=centre)
            geo_ct = rigid.transform_geometry(geo_xray, rigid.invert(pose))
        with stage("project", f"project {n_views} views of {det}x{det}"):
            images = sim.project_views(volume, vol_grid, geo_ct)
        if noise_spec is not None:
            with stage("noise", f"noise: {noise_spec[0]:g} photons, sigma {noise_spec[1]:g}"):
                gen = torch.Generator().manual_seed(int(seed))
                images, _ = sim.add_noise(images, *noise_spec, model=noise_model.value, generator=gen)
        command = {"command": "rgs simulate-xrays", "ct": str(ct), "grid": grid, "views": angles,
                   "offset_mm": offset_mm, "offset_deg": offset_deg, "seed": seed, "dso": dso,
                   "dsd": dsd, "det": det, "pixel": pitch, "noise": noise,
                   "noise_model": noise_model.value, "format": ext}
        xset = xray_data.XRaySet(images, geo_xray, [f"{n}.{ext}" for n in names], pose)
        with stage("write", f"write {out_dir.name}/"):
            gpath = xray_data.save_xrays(out_dir, xset, force, ext,
                                         attributes={"command": command, "versions": runtime.versions(),
                                                     "isocentre_mm": centre.tolist()})

    moved = float(np.linalg.norm(rigid.apply(pose, centre) - centre))
    table = Table(show_header=False)
    table.add_row("volume", f"{'x'.join(map(str, vol_grid.shape))} voxels of {vol_grid.spacing[0]:.3g} mm")
    table.add_row("views", "AP + lateral" if angles is None else ", ".join(f"{a:g}" for a in angles) + " deg")
    table.add_row("detector", f"{det}x{det} pixels of {pitch:.3g} mm")
    table.add_row("DSO / DSD", f"{dso:.4g} / {dsd:.4g} mm")
    table.add_row("true pose", f"{moved:.3g} mm, {rigid.rotation_angle_deg(pose):.3g} deg (seed {seed})")
    table.add_row("noise", noise_text(noise_spec, noise_model.value))
    table.add_row("line integrals", f"max {float(images.max()):.3g}")
    table.add_row("device", runtime.describe(dev))
    table.add_row("seconds", json.dumps(stage.seconds))
    table.add_row("folder", f"{out_dir} ({n_views} {ext} images + {gpath.name})")
    out_console.print(table)
    out_console.print(f"wrote {out_dir}")
