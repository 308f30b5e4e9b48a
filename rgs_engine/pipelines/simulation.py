"""The static scan simulator: ``simulate`` (a cone-beam X-ray scan of a CT or of an analytic
phantom, with its ground truth, into an rgs ``.h5`` projection file; format:
datasets/FORMAT.md). Lengths in mm, attenuation in 1/mm, projections unitless line integrals.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..core import runtime
from ..io import files, projections
from ..sim import phantoms, scan
from .common import ProgressCallback, Reporter, RunResult, StopCheck, require

PHANTOMS = ("shepp-logan",)


def simulate(paths: Sequence[str | Path], phantom: Optional[str] = None, grid: int = 128,
             box: float = 256.0, views: int = 50, test_views: int = 25, orbit: str = "circular",
             arc: float = 360.0, dso: Optional[float] = None, dsd: Optional[float] = None,
             det: int = 256, pixel: Optional[float] = None, noise: str = "none",
             noise_model: str = "tigre", normalise: bool = False, seed: int = 0,
             force: bool = False, device: str | None = None,
             progress: ProgressCallback | None = None,
             should_stop: StopCheck | None = None) -> RunResult:
    """Simulate a scan (options as ``rgs simulate``). ``paths``: ``[CT.nii.gz, OUT.h5]``
    (the CT in HU, axis-aligned NIfTI), or ``[OUT.h5]`` with ``phantom="shepp-logan"`` (a
    cubic box of side ``box`` mm). HU -> attenuation, resampled to ``grid`` voxels along the
    box's longest edge; ``views`` training and ``test_views`` noiseless held-out projections.

    Returns ``out`` = the .h5 path, ``files`` [it], ``volumes["ground_truth"]`` (nx, ny, nz)
    in 1/mm, ``metrics`` (``seconds_by_stage``, ``device``, ``max_line_integral``) and in
    ``extra``: ``data`` (the written ProjectionData), ``grid`` (VolumeGrid), ``spec``
    (the ScanSpec), ``device``."""
    reporter = Reporter(progress, should_stop)
    paths = [Path(p) for p in paths]
    require(phantom is None or phantom in PHANTOMS, f"--phantom {phantom!r}: use one of {', '.join(PHANTOMS)}")
    if phantom is None:
        require(len(paths) == 2, "give CT.nii.gz and OUT.h5 (or --phantom shepp-logan and only OUT.h5)")
        ct_path, out = paths
    else:
        require(len(paths) == 1, "with --phantom give only OUT.h5 (no CT)")
        ct_path, out = None, paths[0]
    require(out.suffix.lower() in projections.H5_SUFFIXES,
            f"{out}: the output must end in .h5 or .hdf5: rename it")
    require(grid >= 8, f"--grid {grid} is too small: use at least 8 voxels")
    require(box > 0, f"--box {box:g}: the phantom box side must be positive (mm)")
    spec = scan.ScanSpec(views=views, test_views=test_views, orbit=orbit, arc=arc, dso=dso,
                         dsd=dsd, det=det, pixel=pixel, noise=scan.parse_noise(noise),
                         noise_model=noise_model, seed=seed, normalise=normalise)
    spec.check()
    files.check_writable([out], force)
    dev = runtime.init(device)

    command = {"command": "rgs simulate", "ct": None if ct_path is None else str(ct_path),
               "phantom": phantom, "grid": grid,
               "box_mm": box if phantom is not None else None, "views": views,
               "test_views": test_views, "orbit": orbit, "arc_deg": arc, "dso": dso,
               "dsd": dsd, "det": det, "pixel": pixel, "noise": noise,
               "noise_model": noise_model, "normalise": normalise, "seed": seed}
    if ct_path is None:
        with reporter.stage("volume", f"Shepp-Logan phantom {grid}^3"):
            vol_grid = phantoms.shepp_logan_grid(grid, box)
            volume = phantoms.shepp_logan(vol_grid).to(dev)
    else:
        with reporter.stage("volume", f"load {ct_path.name}, HU -> attenuation"):
            volume, vol_grid = scan.load_ct_volume(ct_path, grid, dev)
    data = scan.simulate(volume, vol_grid, spec, source=str(ct_path or phantom), stage=reporter.stage,
                         extra_attributes={"command": command, "versions": runtime.versions(),
                                           "units": "lengths mm, attenuation 1/mm, "
                                                    "projections unitless line integrals"})
    with reporter.stage("write", f"write {out.name}"):
        projections.save_projections(out, data, force)
    metrics = {"seconds_by_stage": reporter.seconds, "device": runtime.describe(dev),
               "max_line_integral": float(data.projections.max())}
    return RunResult(out=out, metrics=metrics, files=[out], volumes={"ground_truth": data.ground_truth},
                     warnings=reporter.warnings,
                     extra={"data": data, "grid": vol_grid, "spec": spec, "device": dev})
