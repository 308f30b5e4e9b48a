"""CT-to-X-ray registration scenarios: ``simulate_xrays`` (calibrated DRRs of a CT at a known
rigid pose, written as an X-ray folder) and ``register`` (the rigid pose of a CT, as
radiative Gaussians, that explains an X-ray folder; writes pose.json and overlay.png).

Lengths in mm, angles in degrees, poses 4x4 ``ct_to_xray`` (CT world mm -> X-ray frame mm).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..core import rigid, runtime
from ..core.errors import RgsInputError
from ..core.geometry import Geometry
from ..io import files, images, xrays as xray_io
from ..registration import ct_gaussians, register as reg, report
from ..sim import radiograph, scan
from .common import ProgressCallback, Reporter, RunResult, StopCheck, require

POSE_FILE = "pose.json"
OVERLAY_FILE = "overlay.png"
CT_GRID = 128  # voxels along the CT's box (whole CT, and the context of a structure)
STRUCTURE_GRID = 64  # voxels along a masked structure's box (about 1 mm for a vertebra)
CONTEXT_GAUSSIANS = 20000  # the rest of the CT around a structure (validation/registration.py)


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


def check_noise_model(noise_model: str) -> None:
    """Refuse a ``--noise-model`` that :func:`rgs_engine.sim.scan.add_noise` does not know."""
    require(noise_model in scan.NOISE_MODELS,
            f"--noise-model {noise_model!r}: use one of {', '.join(scan.NOISE_MODELS)}")


def simulate_xrays(ct: str | Path, out_dir: str | Path, grid: int = 256, views: Optional[str] = None,
                   offset_mm: float = 0.0, offset_deg: float = 0.0, seed: int = 0,
                   dso: float = 1000.0, dsd: float = 1500.0, det: int = 256,
                   pixel: Optional[float] = None, noise: str = "none", noise_model: str = "tigre",
                   detector: Optional[str] = None,
                   image_format: str = "npy", force: bool = False, device: str | None = None,
                   progress: ProgressCallback | None = None,
                   should_stop: StopCheck | None = None) -> RunResult:
    """Simulate calibrated X-rays (DRRs) of the CT ``ct`` (HU, axis-aligned NIfTI) at a known
    rigid pose into the X-ray folder ``out_dir`` (options as ``rgs simulate-xrays``).

    ``detector`` (``"gamma=0.6,scatter=0.2,blur=1.2,collimation=14,label=AP"``, keys of
    :class:`rgs_engine.sim.radiograph.DetectorSpec`) turns the noisy line integrals into
    detector-like display images in [0, 1] (:func:`rgs_engine.sim.radiograph.detector_images`).

    The views (``views``: comma-separated angles in degrees; None: AP + lateral) sit about
    the isocentre = the CT box's centre; the true pose rotates the CT by ``offset_deg`` about
    its centre and shifts it by ``offset_mm`` (random axis and direction from ``seed``).
    Returns the folder as ``out``, ``files`` (geometry.json first; none for ``dcm``), ``volumes["images"]``
    (V, H, W) as written (line integrals, or display images with ``detector``), and in
    ``extra``: ``pose`` (4x4), ``geometry`` (X-ray frame),
    ``grid`` (the CT's VolumeGrid), ``angles``, ``pixel`` (mm), ``noise`` (photons, sigma) or
    None, ``centre`` (mm), ``device``."""
    ct, out_dir = Path(ct), Path(out_dir)
    reporter = Reporter(progress, should_stop)
    require(grid >= 8, f"--grid {grid} is too small: use at least 8 voxels")
    require(det >= 8, f"--det {det} is too small: use at least 8 detector pixels")
    require(math.isfinite(dso) and math.isfinite(dsd) and 0 < dso < dsd,
            f"--dso {dso:g} --dsd {dsd:g}: need 0 < DSO < DSD (mm)")
    require(pixel is None or (math.isfinite(pixel) and pixel > 0),
            f"--pixel {pixel}: the pixel pitch must be positive (mm)")
    require(math.isfinite(offset_mm) and offset_mm >= 0, f"--offset-mm {offset_mm:g}: must be >= 0")
    require(math.isfinite(offset_deg) and 0 <= offset_deg <= 180,
            f"--offset-deg {offset_deg:g}: must be in [0, 180] degrees")
    require(image_format in xray_io.IMAGE_FORMATS,
            f"--format {image_format!r}: use one of {', '.join(xray_io.IMAGE_FORMATS)}")
    check_noise_model(noise_model)
    angles = parse_angles(views)
    noise_spec = scan.parse_noise(noise)
    detector_spec = radiograph.DetectorSpec.parse(detector or "")
    names = (["ap", "lateral"] if angles is None
             else [f"view{k:02d}" for k in range(len(angles))])
    ext = image_format
    require(not out_dir.exists() or out_dir.is_dir(), f"{out_dir} exists and is not a folder: pick another OUT_DIR")
    image_paths = [out_dir / f"{n}.{ext}" for n in names]
    files.check_writable([out_dir / xray_io.GEOMETRY_FILE] + image_paths, force)
    dev = runtime.init(device)

    n_views = len(names)
    with reporter.stage("volume", f"load {ct.name}, HU -> attenuation"):
        volume, vol_grid = scan.load_ct_volume(ct, grid, dev)
    with reporter.stage("geometry", f"pose and {n_views} views"):
        centre = np.asarray(vol_grid.centre)
        pose = rigid.random_offset(offset_mm, offset_deg, np.random.default_rng(seed), centre)
        lo, hi = vol_grid.bounds()
        radius = float(np.linalg.norm(hi - lo)) / 2 + offset_mm
        pitch = pixel if pixel is not None else scan.sphere_covering_pixel(radius, dso, dsd, det)
        if angles is None:
            geo_xray = Geometry.biplanar(dso, dsd, (det, det), pitch, isocentre=centre)
        else:
            geo_xray = Geometry.circular(np.radians(angles), dso, dsd, (det, det), pitch,
                                         isocentre=centre)
        geo_ct = rigid.transform_geometry(geo_xray, rigid.invert(pose))
    with reporter.stage("project", f"project {n_views} views of {det}x{det}"):
        projections = scan.project_views(volume, vol_grid, geo_ct)
    if noise_spec is not None:
        with reporter.stage("noise", f"noise: {noise_spec[0]:g} photons, sigma {noise_spec[1]:g}"):
            gen = torch.Generator().manual_seed(int(seed))
            projections, _ = scan.add_noise(projections, *noise_spec, model=noise_model, generator=gen)
    written = projections
    if detector:
        with reporter.stage("detector", f"detector: {detector}"):
            written = radiograph.detector_images(projections, detector_spec)
    command = {"command": "rgs simulate-xrays", "ct": str(ct), "grid": grid, "views": angles,
               "offset_mm": offset_mm, "offset_deg": offset_deg, "seed": seed, "dso": dso,
               "dsd": dsd, "det": det, "pixel": pitch, "noise": noise,
               "noise_model": noise_model, "detector": detector_spec.to_dict() if detector else None,
               "format": ext}
    xset = xray_io.XRaySet(written, geo_xray, [p.name for p in image_paths], pose)
    with reporter.stage("write", f"write {out_dir.name}/"):
        gpath = xray_io.save_xrays(out_dir, xset, force, ext,
                                   attributes={"command": command, "versions": runtime.versions(),
                                               "isocentre_mm": centre.tolist()})
    metrics = {"seconds_by_stage": reporter.seconds, "device": runtime.describe(dev),
               "max_line_integral": float(projections.max())}
    return RunResult(out=out_dir, metrics=metrics, files=([] if ext == "dcm" else [gpath]) + image_paths,
                     volumes={"images": written}, warnings=reporter.warnings,
                     extra={"pose": pose, "geometry": geo_xray, "grid": vol_grid, "angles": angles,
                            "pixel": pitch, "noise": noise_spec, "centre": centre, "device": dev})


def read_init(path: Path | None) -> np.ndarray:
    """The starting pose: identity, a JSON 4x4 list, or an object with ``ct_to_xray`` (a
    previous pose.json)."""
    if path is None:
        return np.eye(4)
    if not path.is_file():
        raise RgsInputError(f"{path}: no such file: check the --init path")
    data = files.load_json(path)
    if isinstance(data, dict):
        if "ct_to_xray" not in data:
            raise RgsInputError(f"{path}: needs a 4x4 list or an object with 'ct_to_xray'")
        data = data["ct_to_xray"]
    return rigid.check_rigid(data, f"{path}: ct_to_xray")


def register(xrays: str | Path, ct: str | Path, out: str | Path, mask: str | Path | None = None,
             label: Optional[int] = None, init: str | Path | None = None, grid: int = 0,
             gaussians: int = 0, fit_iterations: int = 300, candidates: int = 256,
             capture_mm: float = 40.0, capture_deg: float = 10.0,
             threshold: float = reg.SUCCESS_THRESHOLD, force: bool = False,
             device: str | None = None, progress: ProgressCallback | None = None,
             should_stop: StopCheck | None = None) -> RunResult:
    """Register the CT ``ct`` (HU, NIfTI) to the X-ray folder ``xrays``; writes
    ``out``/pose.json and ``out``/overlay.png (options as ``rgs register``).

    Returns ``metrics`` = pose.json's content, ``files`` [pose.json, overlay.png], and in
    ``extra``: ``result`` (the :class:`~rgs_engine.registration.register.RegistrationResult`),
    ``init_pose`` (4x4), ``gaussians`` (count), ``cached`` (whether the Gaussian fit came from
    the cache), ``seconds_by_stage``, ``device``. A registration not flagged as a success
    (:func:`rgs_engine.registration.confidence.assess`: estimated error, per-axis peak,
    similarity floor ``threshold``) is returned, not raised: check ``extra["result"].success``."""
    xrays, ct, out = Path(xrays), Path(ct), Path(out)
    mask = None if mask is None else Path(mask)
    init = None if init is None else Path(init)
    reporter = Reporter(progress, should_stop)
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
    files.check_writable([out / POSE_FILE, out / OVERLAY_FILE], force)
    init_pose = read_init(init)
    xset = xray_io.load_xrays(xrays)
    dev = runtime.init(device)

    with reporter.stage("gaussians", f"Gaussians of {ct.name}"):
        params, info = ct_gaussians.gaussians_for_ct(
            ct, grid_size=grid, num_gaussians=gaussians, iterations=fit_iterations,
            mask_path=mask, label=label, force=force)
        context = None
        if mask is not None:  # the rest of the CT, so the DRR shows what the X-rays show
            context, cinfo = ct_gaussians.gaussians_for_ct(
                ct, grid_size=CT_GRID, num_gaussians=CONTEXT_GAUSSIANS, iterations=fit_iterations,
                mask_path=mask, label=label, complement=True, force=force)
            info["cached"] = bool(info.get("cached")) and bool(cinfo.get("cached"))
        points = report.target_points(ct, mask, label) if xset.ground_truth is not None else None
    with reporter.stage("register", f"register to {xset.geometry.num_views} views"):
        result = reg.register(xset, params, init_pose, context=context, candidates=candidates,
                              capture_mm=capture_mm, capture_deg=capture_deg,
                              threshold=threshold, ground_truth=xset.ground_truth,
                              target_points=points)
    with reporter.stage("overlay", "overlay of DRR edges"):
        before = reg.render(params, init_pose, xset.geometry)
        after = reg.render(params, result.pose, xset.geometry)  # edges of the structure
        picture = report.overlay_image(xset.images, before, after, caption=report.decision_caption(result),
                                    ok=result.success)
    with reporter.stage("write", f"write {out.name}/"):
        doc = {"format": "rgs-pose", "version": 1, **result.to_dict(),
               "inputs": {"ct": str(ct), "xrays": str(xrays), "mask": None if mask is None else str(mask),
                          "label": label, "init": None if init is None else str(init),
                          "grid": grid, "gaussians": int(params["means"].shape[0]),
                          "gaussians_cached": bool(info.get("cached")),
                          "gaussians_cache": info.get("path")},
               "versions": runtime.versions(), "device": runtime.describe(dev)}
        images.write_png(out / OVERLAY_FILE, picture, force,
                         text={"Description": "rows: views; left: DRR edges at the start (red), "
                                              "right: registered (green); top: the decision and its evidence"})
        files.save_json(out / POSE_FILE, doc, force)
    return RunResult(out=out, metrics=doc, files=[out / POSE_FILE, out / OVERLAY_FILE],
                     warnings=reporter.warnings,
                     extra={"result": result, "init_pose": init_pose,
                            "gaussians": int(params["means"].shape[0]), "cached": bool(info.get("cached")),
                            "seconds_by_stage": reporter.seconds, "device": dev})
