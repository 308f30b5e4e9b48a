"""``rgs register``: rigid registration of a CT (as radiative Gaussians) to calibrated X-rays."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.table import Table

from rgs_engine.registration import ct_gaussians, register as reg

from rgs_engine.io import images as imaging, files as volume_io, xrays as xray_data

from rgs_engine.core import rigid, runtime
from rgs_engine.core.errors import RgsInputError

from .common import DeviceOption, Stages, app, handle_errors, out_console, require, start

POSE_FILE = "pose.json"
CT_GRID = 128  # voxels along the CT's box (whole CT, and the context of a structure)
STRUCTURE_GRID = 64  # voxels along a masked structure's box (about 1 mm for a vertebra)
CONTEXT_GAUSSIANS = 20000  # the rest of the CT around a structure (validation/registration.py)
OVERLAY_FILE = "overlay.png"


def read_init(path: Path | None) -> np.ndarray:
    """The starting pose: identity, a JSON 4x4 list, or an object with ``ct_to_xray`` (a
    previous pose.json)."""
    if path is None:
        return np.eye(4)
    if not path.is_file():
        raise RgsInputError(f"{path}: no such file: check the --init path")
    data = volume_io.load_json(path)
    if isinstance(data, dict):
        if "ct_to_xray" not in data:
            raise RgsInputError(f"{path}: needs a 4x4 list or an object with 'ct_to_xray'")
        data = data["ct_to_xray"]
    return rigid.check_rigid(data, f"{path}: ct_to_xray")


@app.command("register")
@handle_errors
def register(
    xrays: Annotated[Path, typer.Argument(metavar="XRAYS", help="X-ray folder (datasets/FORMAT.md).")],
    ct: Annotated[Path, typer.Option("--ct", help="CT in Hounsfield units (axis-aligned NIfTI).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (pose.json, overlay.png).")],
    mask: Annotated[Optional[Path], typer.Option(help="Segmentation on the CT's box.")] = None,
    label: Annotated[Optional[int], typer.Option(help="Label of --mask to register (one vertebra).")] = None,
    init: Annotated[Optional[Path], typer.Option(
        help="Starting ct_to_xray: a JSON 4x4 or a pose.json [default: identity].")] = None,
    grid: Annotated[int, typer.Option(
        help="Voxels along the box of the Gaussian fit: the CT's, or with --mask the structure's "
             "(0: 128, or 64 with --mask).")] = 0,
    gaussians: Annotated[int, typer.Option(help="Number of Gaussians (0: automatic).")] = 0,
    fit_iterations: Annotated[int, typer.Option("--fit-iterations", help="Steps of the Gaussian fit.")] = 300,
    candidates: Annotated[int, typer.Option(help="Poses scored by the global stage (0: none).")] = 256,
    capture_mm: Annotated[float, typer.Option("--capture-mm", help="Global stage: translation range, mm.")] = 40.0,
    capture_deg: Annotated[float, typer.Option("--capture-deg", help="Global stage: rotation range, deg.")] = 10.0,
    threshold: Annotated[float, typer.Option(
        help="Similarity needed to call the registration a success.")] = reg.SUCCESS_THRESHOLD,
    force: Annotated[bool, typer.Option("--force", help="Overwrite pose.json / overlay.png and refit the cache.")] = False,
    device: DeviceOption = None,
) -> None:
    """Register a CT to calibrated X-rays: writes OUT/pose.json and OUT/overlay.png.

    The CT becomes radiative Gaussians (cached next to the CT); with --mask/--label the
    structure (one vertebra) and, as its context, the rest of the CT: the pose is found for
    the structure, with the comparison restricted to a window of the views around it. A global search within --capture-mm / --capture-deg of --init is
    followed by a coarse-to-fine gradient refinement of the similarity (NCC + gradient NCC).
    pose.json holds ct_to_xray (CT world mm -> X-ray frame), similarity, success, seconds
    and mtre_mm when the X-ray folder has a ground truth. A similarity below --threshold is
    reported as a failure (exit status 1, pose.json says success false).
    """
    require(grid == 0 or grid >= 8, f"--grid {grid} is too small: use at least 8 voxels")
    grid = grid or (STRUCTURE_GRID if mask is not None else CT_GRID)
    require(gaussians >= 0 and fit_iterations >= 0, "--gaussians and --fit-iterations must be >= 0")
    require(candidates >= 0, f"--candidates {candidates}: must be >= 0")
    require(math.isfinite(capture_mm) and capture_mm >= 0 and math.isfinite(capture_deg)
            and 0 <= capture_deg <= 180, "--capture-mm must be >= 0 and --capture-deg in [0, 180]")
    require(math.isfinite(threshold) and -1 <= threshold <= 1, f"--threshold {threshold:g}: must be in [-1, 1]")
    require(ct.is_file(), f"{ct}: no such file: check the --ct path")
    require(label is None or mask is not None, "--label needs --mask: pass the segmentation the label refers to")
    require(mask is None or mask.is_file(), f"{mask}: no such file: check the --mask path")
    require(not out.exists() or out.is_dir(), f"{out} exists and is not a folder: pick another --out")
    volume_io.check_writable([out / POSE_FILE, out / OVERLAY_FILE], force)
    init_pose = read_init(init)
    xset = xray_data.load_xrays(xrays)
    dev = start(device)

    with Stages(total=4) as stage:
        with stage("gaussians", f"Gaussians of {ct.name}"):
            params, info = ct_gaussians.gaussians_for_ct(
                ct, grid_size=grid, num_gaussians=gaussians, iterations=fit_iterations,
                mask_path=mask, label=label, force=force)
            context = None
            if mask is not None:  # the rest of the CT, so the DRR shows what the X-rays show
                context, cinfo = ct_gaussians.gaussians_for_ct(
                    ct, grid_size=CT_GRID, num_gaussians=CONTEXT_GAUSSIANS, iterations=fit_iterations,
                    mask_path=mask, label=label, complement=True, force=force)
                info["cached"] = bool(info.get("cached")) and bool(cinfo.get("cached"))
            points = reg.target_points(ct, mask, label) if xset.ground_truth is not None else None
        with stage("register", f"register to {xset.geometry.num_views} views"):
            result = reg.register(xset, params, init_pose, context=context, candidates=candidates,
                                  capture_mm=capture_mm, capture_deg=capture_deg,
                                  threshold=threshold, ground_truth=xset.ground_truth,
                                  target_points=points)
        with stage("overlay", "overlay of DRR edges"):
            before = reg.render(params, init_pose, xset.geometry)
            after = reg.render(params, result.pose, xset.geometry)  # edges of the structure
            picture = reg.overlay_image(xset.images, before, after)
        with stage("write", f"write {out.name}/"):
            doc = {"format": "rgs-pose", "version": 1, **result.to_dict(),
                   "inputs": {"ct": str(ct), "xrays": str(xrays), "mask": None if mask is None else str(mask),
                              "label": label, "init": None if init is None else str(init),
                              "grid": grid, "gaussians": int(params["means"].shape[0]),
                              "gaussians_cached": bool(info.get("cached")),
                              "gaussians_cache": info.get("path")},
                   "versions": runtime.versions(), "device": runtime.describe(dev)}
            imaging.write_png(out / OVERLAY_FILE, picture, force,
                              text={"Description": "rows: views; left: DRR edges at the start (red), "
                                                   "right: registered (green)"})
            volume_io.save_json(out / POSE_FILE, doc, force)

    moved = rigid.compose(result.pose, rigid.invert(init_pose))
    table = Table(show_header=False)
    table.add_row("result", "[green]success[/green]" if result.success else
                  f"[red]FAILED[/red] (similarity below {result.threshold:g}: do not use this pose)")
    table.add_row("similarity", f"{result.initial_similarity:.4f} -> {result.similarity:.4f}")
    table.add_row("moved by", f"{np.linalg.norm(moved[:3, 3]):.3g} mm, {rigid.rotation_angle_deg(moved):.3g} deg")
    if result.mtre_mm is not None:
        table.add_row("mTRE", f"{result.initial_mtre_mm:.3g} -> {result.mtre_mm:.3g} mm")
    table.add_row("Gaussians", f"{params['means'].shape[0]} ({'cached' if info.get('cached') else 'fitted'})")
    table.add_row("seconds", f"{result.seconds:.1f} (stages {json.dumps(stage.seconds)})")
    table.add_row("device", runtime.describe(dev))
    out_console.print(table)
    out_console.print(f"wrote {out / POSE_FILE} and {out / OVERLAY_FILE}")
    if not result.success:
        raise typer.Exit(1)
