"""R2-Gaussian's data folder (``meta_data.json`` + per-view ``.npy`` projections)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..core.errors import RgsInputError
from .projection_data import ProjectionData
from .scanner import _angles, _float_array, _scanner, _scanner_geometry, _scanner_grid


def _load_npy(where: str, path: Path) -> np.ndarray:
    if not path.is_file():
        raise RgsInputError(f"{where}: {path} is missing: the folder is incomplete, copy it again")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RgsInputError(f"{path}: not a readable .npy array ({exc}): copy it again") from exc


def _r2_split(folder: Path, meta: dict, key: str, det: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    where = f"{folder / 'meta_data.json'} {key}"
    frames = meta[key]
    if not isinstance(frames, list) or not frames:
        raise RgsInputError(f"{where}: must be a non-empty list of {{file_path, angle}} entries")
    projs, angles = [], []
    for i, frame in enumerate(frames):
        if not isinstance(frame, dict) or "file_path" not in frame or "angle" not in frame:
            raise RgsInputError(f"{where}[{i}]: needs keys 'file_path' and 'angle' (radians)")
        projs.append(_float_array(f"{folder / str(frame['file_path'])}",
                                  _load_npy(where, folder / str(frame["file_path"])), shape=det))
        angles.append(frame["angle"])
    return np.stack(projs), _angles(where, angles, len(projs))


def load_r2_gaussian(folder: str | os.PathLike) -> ProjectionData:
    """Read an R2-Gaussian data folder (``meta_data.json`` + ``.npy`` files).

    ``meta_data.json``: ``scanner`` (TIGRE keys: mode, DSD, DSO, nDetector [rows, cols],
    dDetector or sDetector, nVoxel [x, y, z], dVoxel or sVoxel, offOrigin), ``vol``
    (``vol_gt.npy``, stored ``[x, y, z]``), ``proj_train`` / ``proj_test``: lists of
    ``{"file_path": ..., "angle": radians}``. Geometry: :meth:`Geometry.circular` with
    ``convention="naf"`` (source at DSO (cos a, sin a, 0), columns along (-sin a, cos a, 0),
    rows along -z: the stored projections are TIGRE's output flipped vertically; detector
    offsets ignored as R2-Gaussian does). Lengths are in the file's unit, read as mm, so
    the stored projections and volume are used unchanged.
    """
    folder = Path(folder)
    meta_path = folder / "meta_data.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise RgsInputError(f"{folder}: no meta_data.json: not an R2-Gaussian data folder") from None
    except (OSError, ValueError) as exc:
        raise RgsInputError(f"{meta_path}: not readable JSON ({exc}): copy it again") from exc
    if not isinstance(meta, dict):
        raise RgsInputError(f"{meta_path}: must hold a JSON object with scanner, vol, proj_train")
    for key in ("scanner", "proj_train"):
        if key not in meta:
            raise RgsInputError(f"{meta_path}: missing key {key!r}: not an R2-Gaussian meta_data.json")
    sc = _scanner(str(meta_path), meta["scanner"])
    grid = _scanner_grid(sc)
    det = (int(sc["nDetector"][0]), int(sc["nDetector"][1]))

    proj, angles = _r2_split(folder, meta, "proj_train", det)
    geometry = _scanner_geometry(str(meta_path), sc, angles)
    test_proj = test_geom = None
    if meta.get("proj_test"):
        test_proj, test_angles = _r2_split(folder, meta, "proj_test", det)
        test_geom = _scanner_geometry(str(meta_path), sc, test_angles)
    gt = None
    if meta.get("vol"):
        vol_path = folder / str(meta["vol"])
        gt = _float_array(str(vol_path), _load_npy(str(meta_path), vol_path), shape=grid.shape)
    try:
        return ProjectionData(
            projections=torch.from_numpy(proj), geometry=geometry, grid=grid,
            ground_truth=None if gt is None else torch.from_numpy(gt),
            test_projections=None if test_proj is None else torch.from_numpy(test_proj),
            test_geometry=test_geom, time=None, source=str(folder),
            attributes={"origin_format": "r2-gaussian", "length_unit": "file unit read as mm"})
    except RgsInputError as exc:
        raise RgsInputError(f"{folder}: {exc}") from exc
