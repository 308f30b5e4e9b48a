"""Rotational DSA runs in 4DRGS's case layout: reading, writing, and their ground truth.

A case folder (the layout 4DRGS reads; ``ground_truth/`` is rgs's addition):

* ``mask_run.nii.gz``, ``fill_run.nii.gz`` — raw detector intensities (> 0) of the run
  without and with contrast, ``F`` frames of ``H x W`` pixels. 4DRGS reads them with
  SimpleITK, whose arrays are ``(F, H, W)`` (C order, column index fastest). NIfTI stores
  the same bytes with the first axis fastest, so nibabel (and the file's ``dim`` field)
  sees shape ``(W, H, F)``: rgs transposes ``(2, 1, 0)`` on both read and write. The
  images' affines are not used (the writer records the pixel pitch in them).
* ``transforms.json`` — ``volume_resolution`` ``[nx, ny, nz]``, ``volume_spacing`` (mm),
  ``volume_phy`` = resolution x spacing (mm); ``sad`` (source to isocentre, mm), ``sid``
  (source to detector, mm); ``proj_resolution`` ``[W, H]``, ``proj_spacing`` ``[column
  pitch, row pitch]`` (mm), ``proj_phy`` = resolution x spacing; ``N_views`` = ``F``;
  ``frames``: one ``{"PrimaryAngle": radians, "file": name}`` per frame, in acquisition
  order. rgs also writes (and reads, when every frame has it) ``"time"``: seconds since the
  first frame. A ``SecondaryAngle`` is ignored, as 4DRGS ignores it.
* ``ground_truth/`` (optional; written by ``rgs simulate-dsa``): ``truth.json``,
  ``vessels_mean.nii.gz`` (time-averaged contrast attenuation, 1/mm), ``vessels_mask.nii.gz``
  (lumen, 0/1), ``vessels_frameNNN.nii.gz`` (contrast attenuation at frame NNN's time),
  ``vessels_surface.ply`` (lumen surface, mm), ``centrelines.obj`` (``l`` polylines, mm).

Conventions (the same as 4DRGS's cameras and TIGRE FDK on its flipped rows):

* world frame in mm, the volume centred on the isocentre at the origin: voxel ``[i, j, k]``
  at ``((i, j, k) - (n - 1) / 2) * spacing`` (:meth:`VolumeGrid.centred`);
* frame ``f`` at angle ``a = PrimaryAngle[f]`` is :meth:`Geometry.circular` (TIGRE
  convention, no offsets): source at ``sad (cos a, sin a, 0)``, detector centre at
  ``(sad - sid)(cos a, sin a, 0)``, columns along ``(-sin a, cos a, 0)``, rows along
  ``(0, 0, -1)`` (row 0 at the top, +z);
* DSA line integrals ``log(mask) - log(fill)``, clipped at 0: the contrast's line integral;
* frame time: seconds when ``transforms.json`` gives them, otherwise ``f / (F - 1)`` in
  [0, 1] (4DRGS itself uses ``f / F``); ``ProjectionData.attributes["time_unit"]`` says which.

:func:`load_dsa_case` / :func:`save_dsa_case` read and write a :class:`DsaCase` (a write
is file by file atomic, ``transforms.json`` last); :func:`load_dsa` gives a
:class:`~rgs_engine.io.projections.ProjectionData` of all frames. Every problem raises
:class:`~rgs_engine.core.errors.RgsInputError` with one line naming the file and the fix.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import RgsInputError
from ..core.geometry import Geometry, VolumeGrid
from .mesh import read_obj, read_ply, write_obj, write_ply
from .projections import ProjectionData
from .files import atomic_write, check_writable, load_nifti, save_json, save_nifti

MASK_RUN = "mask_run.nii.gz"
FILL_RUN = "fill_run.nii.gz"
TRANSFORMS = "transforms.json"
TRUTH_DIR = "ground_truth"
TRUTH_JSON = "truth.json"
TRUTH_MEAN = "vessels_mean.nii.gz"
TRUTH_MASK = "vessels_mask.nii.gz"
TRUTH_SURFACE = "vessels_surface.ply"
TRUTH_CENTRELINES = "centrelines.obj"
REL_TOL = 1e-4  # agreement asked of volume_phy / proj_phy with resolution x spacing


def frame_volume_name(frame: int) -> str:
    """File name (in ``ground_truth/``) of the contrast volume at frame ``frame``'s time."""
    return f"vessels_frame{frame:03d}.nii.gz"


def dsa_geometry(angles, sad: float, sid: float, det_shape: tuple[int, int],
                 pixel_size: tuple[float, float]) -> Geometry:
    """The run's cone-beam views: :meth:`Geometry.circular` about the origin, TIGRE
    convention, no detector offset. ``angles`` (F,) radians; ``det_shape`` (H, W);
    ``pixel_size`` (row pitch, column pitch) mm."""
    return Geometry.circular(angles, sad, sid, det_shape, pixel_size)


def dsa_line_integrals(mask_run: torch.Tensor, fill_run: torch.Tensor) -> torch.Tensor:
    """``log(mask) - log(fill)`` clipped at 0: (F, H, W) float32 contrast line integrals
    (computed in float64) from two (F, H, W) stacks of positive raw intensities."""
    dsa = torch.log(mask_run.to(torch.float64)) - torch.log(fill_run.to(torch.float64))
    return dsa.clamp_min(0.0).to(torch.float32)


# --------------------------------------------------------------------------------------
# In-memory form
# --------------------------------------------------------------------------------------
@dataclass
class DsaTruth:
    """Ground truth of a (simulated) run, on the case's grid.

    ``mean_volume`` (nx, ny, nz) float32 1/mm: contrast attenuation averaged over the
    frames' times; ``mask`` (nx, ny, nz) bool lumen; ``frame_volumes`` {frame index:
    (nx, ny, nz) float32 1/mm at that frame's time}; ``surface`` ``(vertices (N, 3) mm,
    faces (M, 3))`` of the lumen or None; ``centrelines`` list of (n_i, 3) polylines in mm;
    ``parameters`` what regenerates it (e.g. :meth:`rgs_engine.sim.vessels.VesselPhantom.to_dict`
    under ``"phantom"``).
    """

    mean_volume: torch.Tensor
    mask: torch.Tensor
    frame_volumes: dict[int, torch.Tensor] = field(default_factory=dict)
    surface: tuple[np.ndarray, np.ndarray] | None = None
    centrelines: list[np.ndarray] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)

    def check(self, grid: VolumeGrid, frames: int) -> None:
        """Raise unless every volume has ``grid.shape`` and frame indices are < ``frames``."""
        volumes = {"mean volume": self.mean_volume, "mask": self.mask,
                   **{f"frame {k} volume": v for k, v in self.frame_volumes.items()}}
        for name, vol in volumes.items():
            if tuple(vol.shape) != grid.shape:
                raise RgsInputError(f"ground truth {name} has shape {tuple(vol.shape)} but the "
                                    f"case's grid has {grid.shape}: they must match")
        bad = [k for k in self.frame_volumes if not 0 <= k < frames]
        if bad:
            raise RgsInputError(f"ground truth frame volumes {bad} lie outside the run's "
                                f"{frames} frames (indices 0..{frames - 1})")


@dataclass
class DsaCase:
    """A rotational DSA run: raw mask / fill intensities and their scanner.

    ``mask_run``, ``fill_run`` (F, H, W) float32 positive intensities; ``angles`` (F,)
    float64 radians; ``grid`` centred on the isocentre (the world origin); ``sad``, ``sid``
    mm; ``pixel_size`` (row pitch, column pitch) mm; ``times`` (F,) float64 seconds or None;
    ``truth`` or None; ``frame_files`` the frames' names (default ``frame_NNN``).
    Checked on construction.
    """

    mask_run: torch.Tensor
    fill_run: torch.Tensor
    angles: torch.Tensor
    grid: VolumeGrid
    sad: float
    sid: float
    pixel_size: tuple[float, float]
    times: torch.Tensor | None = None
    truth: DsaTruth | None = None
    frame_files: list[str] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        where = f"{self.source}: " if self.source else ""
        runs = {}
        for name in ("mask_run", "fill_run"):
            x = torch.as_tensor(getattr(self, name)).detach().to("cpu", torch.float32).contiguous()
            if x.dim() != 3 or min(x.shape) < 1:
                raise RgsInputError(f"{where}{name} has shape {tuple(x.shape)}: need (frames, rows, columns)")
            if not bool(torch.isfinite(x).all()):
                raise RgsInputError(f"{where}{name} contains NaN or Inf intensities: re-export the run")
            if not bool((x > 0).all()):
                raise RgsInputError(f"{where}{name} has intensities <= 0 (min {float(x.min()):g}): "
                                    "DSA needs the log of raw detector intensities, not line integrals")
            runs[name] = x
        if runs["mask_run"].shape != runs["fill_run"].shape:
            raise RgsInputError(f"{where}mask run {tuple(runs['mask_run'].shape)} and fill run "
                                f"{tuple(runs['fill_run'].shape)} differ in shape: they must be "
                                "the same frames of the same detector")
        self.mask_run, self.fill_run = runs["mask_run"], runs["fill_run"]
        frames = self.num_frames
        self.angles = torch.as_tensor(self.angles, dtype=torch.float64).reshape(-1)
        if self.angles.numel() != frames or not bool(torch.isfinite(self.angles).all()):
            raise RgsInputError(f"{where}{self.angles.numel()} angles for {frames} frames: "
                                "give one finite angle (radians) per frame")
        if self.times is not None:
            self.times = torch.as_tensor(self.times, dtype=torch.float64).reshape(-1)
            if self.times.numel() != frames or not bool(torch.isfinite(self.times).all()):
                raise RgsInputError(f"{where}{self.times.numel()} frame times for {frames} "
                                    "frames: give one finite time (s) per frame")
        if self.frame_files is None:
            self.frame_files = [f"frame_{f:03d}" for f in range(frames)]
        if len(self.frame_files) != frames:
            raise RgsInputError(f"{where}{len(self.frame_files)} frame names for {frames} frames")
        if float(np.abs(self.grid.centre).max()) > REL_TOL * float(self.grid.size_mm.max()):
            raise RgsInputError(f"{where}the volume grid is centred at {self.grid.centre.tolist()} mm: "
                                "the 4DRGS layout centres it on the isocentre (the origin)")
        self.pixel_size = tuple(float(p) for p in np.broadcast_to(np.asarray(self.pixel_size, float), (2,)))
        if not all(math.isfinite(p) and p > 0 for p in self.pixel_size):
            raise RgsInputError(f"{where}pixel size {self.pixel_size} must be positive (row, column pitch, mm)")
        self.sad, self.sid = float(self.sad), float(self.sid)
        try:
            self.geometry().check_against(self.grid)
        except RgsInputError as exc:
            raise RgsInputError(f"{where}{exc}") from exc
        if self.truth is not None:
            try:
                self.truth.check(self.grid, frames)
            except RgsInputError as exc:
                raise RgsInputError(f"{where}{exc}") from exc

    @property
    def num_frames(self) -> int:
        return int(self.mask_run.shape[0])

    @property
    def det_shape(self) -> tuple[int, int]:
        return int(self.mask_run.shape[1]), int(self.mask_run.shape[2])

    def geometry(self) -> Geometry:
        """All frames' views (:func:`dsa_geometry`)."""
        return dsa_geometry(self.angles, self.sad, self.sid, self.det_shape, self.pixel_size)

    def frame_times(self) -> tuple[torch.Tensor, str]:
        """``(times (F,) float64, unit)``: the stored seconds (``"s"``) or ``f / (F - 1)``
        in [0, 1] (``"normalised"``; 0 for a single frame)."""
        if self.times is not None:
            return self.times, "s"
        return torch.arange(self.num_frames, dtype=torch.float64) / max(1, self.num_frames - 1), "normalised"

    def to_projection_data(self) -> ProjectionData:
        """All frames as DSA line integrals with their geometry, times and (when known)
        the time-averaged contrast volume as ground truth."""
        times, unit = self.frame_times()
        return ProjectionData(
            projections=dsa_line_integrals(self.mask_run, self.fill_run),
            geometry=self.geometry(), grid=self.grid,
            ground_truth=None if self.truth is None else self.truth.mean_volume,
            time=times, source=self.source,
            attributes={"origin_format": "4drgs-dsa", "time_unit": unit, "sad_mm": self.sad,
                        "sid_mm": self.sid, "pixel_mm": list(self.pixel_size)})


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
def _save_run(path: Path, run: torch.Tensor, pixel_size: tuple[float, float], force: bool) -> None:
    """(F, H, W) intensities as a float32 NIfTI of shape (W, H, F) (see the module doc)."""
    import nibabel as nib

    affine = np.diag([pixel_size[1], pixel_size[0], 1.0, 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(run.numpy().transpose(2, 1, 0)), affine)
    with atomic_write(path, force) as tmp:
        nib.save(img, str(tmp))


def _truth_files(truth: DsaTruth) -> list[str]:
    names = [TRUTH_JSON, TRUTH_MEAN, TRUTH_MASK, TRUTH_CENTRELINES]
    names += [frame_volume_name(k) for k in sorted(truth.frame_volumes)]
    return names + ([TRUTH_SURFACE] if truth.surface is not None else [])


def save_dsa_case(folder: str | os.PathLike, case: DsaCase, force: bool = False) -> Path:
    """Write ``case`` into ``folder`` in the 4DRGS layout (plus ``ground_truth/``).

    Refuses up front (:class:`RgsInputError`) if any file it would write exists, unless
    ``force``. Each file is written atomically; ``transforms.json`` comes last, so an
    interrupted write leaves no readable case. Returns the folder.
    """
    out = Path(folder)
    truth_dir = out / TRUTH_DIR
    paths = [out / MASK_RUN, out / FILL_RUN, out / TRANSFORMS]
    if case.truth is not None:
        paths += [truth_dir / name for name in _truth_files(case.truth)]
    check_writable(paths, force)
    _save_run(out / MASK_RUN, case.mask_run, case.pixel_size, force)
    _save_run(out / FILL_RUN, case.fill_run, case.pixel_size, force)
    truth = case.truth
    if truth is not None:
        save_nifti(truth_dir / TRUTH_MEAN, truth.mean_volume, case.grid, force)
        save_nifti(truth_dir / TRUTH_MASK, truth.mask.to(torch.float32), case.grid, force)
        for k, vol in sorted(truth.frame_volumes.items()):
            save_nifti(truth_dir / frame_volume_name(k), vol, case.grid, force)
        if truth.surface is not None:
            write_ply(truth_dir / TRUTH_SURFACE, *truth.surface, force=force)
        points = np.concatenate(truth.centrelines) if truth.centrelines else np.zeros((0, 3))
        ends = np.cumsum([0] + [len(c) for c in truth.centrelines])
        write_obj(truth_dir / TRUTH_CENTRELINES, points,
                  lines=[np.arange(a, b) for a, b in zip(ends[:-1], ends[1:])], force=force)
        times, unit = case.frame_times()
        save_json(truth_dir / TRUTH_JSON, {
            "units": "lengths mm, attenuation 1/mm, times " + unit,
            "mean_volume": TRUTH_MEAN, "mask": TRUTH_MASK,
            "surface": TRUTH_SURFACE if truth.surface is not None else None,
            "centrelines": TRUTH_CENTRELINES,
            "frames": [{"frame": k, "time": float(times[k]), "file": frame_volume_name(k)}
                       for k in sorted(truth.frame_volumes)],
            "parameters": truth.parameters}, force)
    h, w = case.det_shape
    row, col = case.pixel_size
    frames = [{"PrimaryAngle": float(a), "file": name}
              for a, name in zip(case.angles.tolist(), case.frame_files)]
    if case.times is not None:
        for frame, t in zip(frames, case.times.tolist()):
            frame["time"] = float(t)
    save_json(out / TRANSFORMS, {
        "volume_resolution": list(case.grid.shape),
        "volume_phy": case.grid.size_mm.tolist(),
        "volume_spacing": list(case.grid.spacing),
        "sad": case.sad, "sid": case.sid,
        "proj_resolution": [w, h], "proj_phy": [w * col, h * row], "proj_spacing": [col, row],
        "N_views": case.num_frames, "frames": frames}, force)
    return out


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
def _numbers(where: str, cfg: dict, key: str, count: int, integer: bool = False) -> np.ndarray:
    """``count`` positive finite numbers (integers if ``integer``) under ``key``."""
    if key not in cfg:
        raise RgsInputError(f"{where}: missing key {key!r}: not a complete 4DRGS transforms.json")
    try:
        a = np.asarray(cfg[key], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        a = np.array([np.nan])
    if a.shape != (count,) or not np.all(np.isfinite(a)) or np.any(a <= 0) or (
            integer and np.any(a != np.round(a))):
        kind = "positive integer(s)" if integer else "positive number(s)"
        raise RgsInputError(f"{where}: key {key!r} must be {count} {kind}, got {cfg[key]!r}")
    return a


def _consistent(where: str, key: str, phy: np.ndarray, resolution: np.ndarray, spacing: np.ndarray) -> None:
    if np.any(np.abs(phy - resolution * spacing) > REL_TOL * phy):
        raise RgsInputError(f"{where}: {key} {phy.tolist()} is not resolution x spacing "
                            f"{(resolution * spacing).tolist()} mm: the file is inconsistent")


def _load_run(path: Path, det: tuple[int, int]) -> torch.Tensor:
    """A run NIfTI of shape (W, H, F) as (F, H, W) float32 (values checked by :class:`DsaCase`)."""
    import nibabel as nib

    if not path.is_file():
        raise RgsInputError(f"{path}: missing: a 4DRGS case needs {MASK_RUN}, {FILL_RUN} and {TRANSFORMS}")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:  # nibabel raises several types for damaged or foreign files
        raise RgsInputError(f"{path}: not a readable NIfTI image ({type(exc).__name__}: {exc}): "
                            "copy the case again") from exc
    if data.ndim == 2:
        data = data[..., None]
    w, h = det[1], det[0]
    if data.ndim != 3 or data.shape[:2] != (w, h):
        raise RgsInputError(f"{path}: image of shape {data.shape} (NIfTI order W, H, frames) does "
                            f"not hold frames of proj_resolution [W, H] = [{w}, {h}]")
    return torch.from_numpy(np.ascontiguousarray(data.transpose(2, 1, 0)))


def _frames(where: str, cfg: dict, count: int) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Angles (F,) rad, times (F,) s or None, and names of the ``frames`` list."""
    frames = cfg.get("frames")
    if not isinstance(frames, list):
        raise RgsInputError(f"{where}: missing key 'frames' (a list of {{PrimaryAngle, file}}): "
                            "not a complete 4DRGS transforms.json")
    if len(frames) != count:
        raise RgsInputError(f"{where}: {len(frames)} frames listed but N_views is {count}: "
                            "one entry per frame")
    angles, times, names = [], [], []
    for i, frame in enumerate(frames):
        if not isinstance(frame, dict) or "PrimaryAngle" not in frame:
            raise RgsInputError(f"{where}: frames[{i}] lacks 'PrimaryAngle' (radians)")
        try:
            angle = float(frame["PrimaryAngle"])
            time = float(frame["time"]) if "time" in frame else None
        except (TypeError, ValueError):
            raise RgsInputError(f"{where}: frames[{i}] PrimaryAngle / time must be numbers") from None
        if not math.isfinite(angle) or (time is not None and not math.isfinite(time)):
            raise RgsInputError(f"{where}: frames[{i}] has a non-finite PrimaryAngle or time")
        angles.append(angle)
        times.append(time)
        names.append(str(frame.get("file", f"frame_{i:03d}")))
    given = [t is not None for t in times]
    if any(given) and not all(given):
        raise RgsInputError(f"{where}: only {sum(given)} of {count} frames have a 'time': give "
                            "every frame its time (s) or none")
    return np.asarray(angles), (np.asarray(times) if all(given) else None), names


def _load_volume(path: Path, grid: VolumeGrid) -> torch.Tensor:
    if not path.is_file():
        raise RgsInputError(f"{path}: missing: the case's ground truth is incomplete, write it again")
    vol, vol_grid = load_nifti(path)
    if vol_grid.shape != grid.shape or not (
            np.allclose(vol_grid.spacing, grid.spacing, rtol=REL_TOL)
            and np.allclose(vol_grid.origin, grid.origin, atol=REL_TOL * float(grid.size_mm.max()))):
        raise RgsInputError(f"{path}: its grid {vol_grid.to_dict()} is not the case's volume grid "
                            f"{grid.to_dict()}: the ground truth belongs to another case")
    return vol


def load_dsa_truth(folder: str | os.PathLike, grid: VolumeGrid) -> DsaTruth | None:
    """The ``ground_truth/`` of a case folder on ``grid``, or None when it has none."""
    truth_dir = Path(folder) / TRUTH_DIR
    index_path = truth_dir / TRUTH_JSON
    if not index_path.is_file():
        return None
    try:
        index = json.loads(index_path.read_text())
        frames = {int(e["frame"]): truth_dir / str(e["file"]) for e in index.get("frames", [])}
        surface_name = index.get("surface")
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise RgsInputError(f"{index_path}: unreadable ground-truth index ({exc}): write the case again") from exc
    surface = read_ply(truth_dir / str(surface_name)) if surface_name else None
    points, _, lines = read_obj(truth_dir / str(index.get("centrelines", TRUTH_CENTRELINES)))
    return DsaTruth(
        mean_volume=_load_volume(truth_dir / str(index.get("mean_volume", TRUTH_MEAN)), grid),
        mask=_load_volume(truth_dir / str(index.get("mask", TRUTH_MASK)), grid) > 0.5,
        frame_volumes={k: _load_volume(p, grid) for k, p in frames.items()},
        surface=surface, centrelines=[points[line] for line in lines],
        parameters=index.get("parameters") or {})


def load_dsa_case(folder: str | os.PathLike) -> DsaCase:
    """Read a 4DRGS case folder (see the module doc) into a :class:`DsaCase`."""
    root = Path(folder)
    if not root.is_dir():
        raise RgsInputError(f"{root}: not a directory: pass a 4DRGS case folder "
                            f"({MASK_RUN}, {FILL_RUN}, {TRANSFORMS})")
    where = str(root / TRANSFORMS)
    try:
        cfg = json.loads((root / TRANSFORMS).read_text())
    except FileNotFoundError:
        raise RgsInputError(f"{where}: missing: a 4DRGS case needs {MASK_RUN}, {FILL_RUN} and "
                            f"{TRANSFORMS}") from None
    except (OSError, ValueError) as exc:
        raise RgsInputError(f"{where}: not readable JSON ({exc}): copy the case again") from exc
    if not isinstance(cfg, dict):
        raise RgsInputError(f"{where}: must hold a JSON object with the scanner and frames")
    res = _numbers(where, cfg, "volume_resolution", 3, integer=True)
    spacing = _numbers(where, cfg, "volume_spacing", 3)
    _consistent(where, "volume_phy", _numbers(where, cfg, "volume_phy", 3), res, spacing)
    sad, sid = float(_numbers(where, cfg, "sad", 1)[0]), float(_numbers(where, cfg, "sid", 1)[0])
    if sid <= sad:
        raise RgsInputError(f"{where}: sid {sid:g} <= sad {sad:g}: the detector must lie beyond "
                            "the isocentre (sid > sad, mm)")
    proj_res = _numbers(where, cfg, "proj_resolution", 2, integer=True)
    proj_spacing = _numbers(where, cfg, "proj_spacing", 2)
    _consistent(where, "proj_phy", _numbers(where, cfg, "proj_phy", 2), proj_res, proj_spacing)
    count = int(_numbers(where, cfg, "N_views", 1, integer=True)[0])
    angles, times, names = _frames(where, cfg, count)
    det = (int(proj_res[1]), int(proj_res[0]))
    mask_run = _load_run(root / MASK_RUN, det)
    fill_run = _load_run(root / FILL_RUN, det)
    for name, run in ((MASK_RUN, mask_run), (FILL_RUN, fill_run)):
        if run.shape[0] != count:
            raise RgsInputError(f"{root / name}: holds {run.shape[0]} frames but {TRANSFORMS} has "
                                f"N_views = {count}: the run and its angles must match")
    grid = VolumeGrid.centred(tuple(int(n) for n in res), tuple(spacing))
    return DsaCase(mask_run=mask_run, fill_run=fill_run, angles=torch.from_numpy(angles), grid=grid,
                   sad=sad, sid=sid, pixel_size=(float(proj_spacing[1]), float(proj_spacing[0])),
                   times=None if times is None else torch.from_numpy(times),
                   truth=load_dsa_truth(root, grid), frame_files=names, source=str(root))


def load_dsa(folder: str | os.PathLike) -> ProjectionData:
    """A 4DRGS case folder as DSA line integrals of all frames (see
    :meth:`DsaCase.to_projection_data`)."""
    return load_dsa_case(folder).to_projection_data()
