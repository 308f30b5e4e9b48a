"""``rgs register``: rigid registration of a CT (as radiative Gaussians) to calibrated X-rays
(the work is :func:`rgs_engine.pipelines.register`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.table import Table

from rgs_engine import pipelines
from rgs_engine.core import rigid
from rgs_engine.registration import confidence, register as reg

from .common import DeviceOption, app, handle_errors, out_console, run_pipeline


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
        help="Similarity floor of the success decision: below it a pose is never called a "
             "success, whatever its estimated error.")] = reg.SUCCESS_THRESHOLD,
    force: Annotated[bool, typer.Option("--force", help="Overwrite pose.json / overlay.png and refit the cache.")] = False,
    device: DeviceOption = None,
) -> None:
    """Register a CT to calibrated X-rays: writes OUT/pose.json and OUT/overlay.png.

    The CT becomes radiative Gaussians (cached next to the CT); with --mask/--label the
    structure (one vertebra) and, as its context, the rest of the CT: the pose is found for
    the structure, with the comparison restricted to a window of the views around it. A global search within --capture-mm / --capture-deg of --init is
    followed by a coarse-to-fine gradient refinement of the similarity (NCC + gradient NCC;
    with --mask/--label each view weighs the two by the structure's share of its DRR's signal).
    pose.json holds ct_to_xray (CT world mm -> X-ray frame), similarity, success, the
    estimated error (mm) and the evidence behind it (restarts from perturbed poses, the
    similarity's peak per axis, AP and lateral each alone, a rival basin near the pose that
    the coarse search prefers), seconds and mtre_mm when the
    X-ray folder has a ground truth. Success needs an estimated error within the calibrated
    bound, a maximum on every axis and a similarity of at least --threshold; otherwise the
    pose is reported as a failure (exit status 1, pose.json says success false). A patient
    who moved between the exposures is refused when the two views' own image shifts along the
    axis both see differ by over 3 mm (the held-out GPU sweep: all 20 pairs moved 6-10 mm
    refused, measuring 3.5-10.6 mm); a smaller move, or one a view cannot see, can pass.
    """
    r = run_pipeline(pipelines.register, stages=4, xrays=xrays, ct=ct, out=out, mask=mask, label=label,
                     init=init, grid=grid, gaussians=gaussians, fit_iterations=fit_iterations,
                     candidates=candidates, capture_mm=capture_mm, capture_deg=capture_deg,
                     threshold=threshold, force=force, device=device and device.value)
    result = r.extra["result"]
    moved = rigid.compose(result.pose, rigid.invert(r.extra["init_pose"]))
    table = Table(show_header=False)
    err = f"estimated error {result.estimated_error_mm:.2f} mm"
    table.add_row("result", f"[green]success[/green] ({err})" if result.success else
                  f"[red]FAILED[/red] ({err}: do not use this pose)")
    if result.success:  # the one wrong input the decision is known to pass (validation/registration_design.md)
        table.add_row("caveat", "a patient who moved between the exposures is refused when the views' shifts "
                                "along their shared axis differ by over 3 mm; a smaller move, or one a view "
                                "cannot see, can pass")
    shift = result.evidence.get("view_shift_mm", 0.0)
    if shift > confidence.VIEW_SHIFT_MM:
        table.add_row("views disagree", f"their shifts along the shared axis differ by {shift:.1f} mm: did the "
                                        "patient move between the exposures? (near the search's "
                                        f"{reg.CONSISTENCY_REACH_MM:g} mm: no clear match in a "
                                        "view, e.g. heavy scatter)")
    if result.evidence.get("rival_basin_mm"):
        table.add_row("rival basin", f"{result.evidence['rival_basin_mm']:.1f} mm away scores as well or better")
    table.add_row("similarity", f"{result.initial_similarity:.4f} -> {result.similarity:.4f}")
    table.add_row("moved by", f"{np.linalg.norm(moved[:3, 3]):.3g} mm, {rigid.rotation_angle_deg(moved):.3g} deg")
    if result.mtre_mm is not None:
        table.add_row("mTRE", f"{result.initial_mtre_mm:.3g} -> {result.mtre_mm:.3g} mm")
    table.add_row("Gaussians", f"{r.extra['gaussians']} ({'cached' if r.extra['cached'] else 'fitted'})")
    table.add_row("seconds", f"{result.seconds:.1f} (stages {json.dumps(r.extra['seconds_by_stage'])})")
    table.add_row("device", r.metrics["device"])
    out_console.print(table)
    out_console.print(f"wrote {r.files[0]} and {r.files[1]}")
    if not result.success:
        raise typer.Exit(1)
