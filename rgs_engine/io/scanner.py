"""TIGRE scanner blocks (DSD, DSO, nDetector, dDetector, nVoxel, dVoxel, offsets, mode) as
R2-Gaussian's ``meta_data.json`` and NAF's pickles store them: checked parsing into a
:class:`~rgs_engine.core.geometry.VolumeGrid` and a circular
:class:`~rgs_engine.core.geometry.Geometry` (lengths in mm), shared by the foreign readers."""
from __future__ import annotations


import numpy as np

from ..core.errors import RgsInputError
from ..core.geometry import MODES, Geometry, VolumeGrid


def _number(where: str, cfg: dict, key: str, count: int | None = None) -> np.ndarray | float:
    if key not in cfg:
        raise RgsInputError(f"{where}: missing key {key!r}: the file is not a complete "
                            "TIGRE scanner description")
    try:
        a = np.asarray(cfg[key], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        a = np.array([np.nan])
    n = 1 if count is None else count
    if a.shape != (n,) or not np.all(np.isfinite(a)):
        raise RgsInputError(f"{where}: key {key!r} must be {n} finite number(s), got {cfg[key]!r}")
    return float(a[0]) if count is None else a


def _pitch(where: str, cfg: dict, d_key: str, s_key: str, n: np.ndarray) -> np.ndarray:
    """Element size from ``dX`` or, as R2-Gaussian allows, ``sX / nX``."""
    if d_key in cfg:
        return _number(where, cfg, d_key, len(n))
    if s_key in cfg:
        return _number(where, cfg, s_key, len(n)) / n
    raise RgsInputError(f"{where}: missing key {d_key!r} (or {s_key!r}): the scanner needs the "
                        "element size")


def _scanner(where: str, cfg: dict) -> dict:
    """Checked TIGRE scanner numbers (lengths in the file's unit, read as mm)."""
    if not isinstance(cfg, dict):
        raise RgsInputError(f"{where}: the scanner description must be a mapping of TIGRE keys")
    mode = cfg.get("mode", "cone")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in MODES:
        raise RgsInputError(f"{where}: scanner mode {mode!r} is unknown: use 'cone' or 'parallel'")
    n_det = _number(where, cfg, "nDetector", 2)
    n_vox = _number(where, cfg, "nVoxel", 3)
    counts = np.concatenate([n_det, n_vox])
    if np.any(counts < 1) or np.any(counts != np.round(counts)):
        raise RgsInputError(f"{where}: nDetector / nVoxel must be positive integers")
    d_det = _pitch(where, cfg, "dDetector", "sDetector", n_det)
    d_vox = _pitch(where, cfg, "dVoxel", "sVoxel", n_vox)
    if np.any(d_det <= 0) or np.any(d_vox <= 0):
        raise RgsInputError(f"{where}: detector and voxel sizes must be positive")
    off_origin = _number(where, cfg, "offOrigin", 3) if "offOrigin" in cfg else np.zeros(3)
    return {"mode": mode, "DSD": _number(where, cfg, "DSD"), "DSO": _number(where, cfg, "DSO"),
            "nDetector": n_det.astype(int), "dDetector": d_det, "nVoxel": n_vox.astype(int),
            "dVoxel": d_vox, "offOrigin": off_origin}


def _scanner_grid(sc: dict) -> VolumeGrid:
    """Voxel ``[i, j, k]`` at ``offOrigin + ((i, j, k) - (n - 1) / 2) dVoxel`` (world x, y, z)."""
    return VolumeGrid.centred(tuple(int(n) for n in sc["nVoxel"]), sc["dVoxel"], sc["offOrigin"])


def _scanner_geometry(where: str, sc: dict, angles: np.ndarray) -> Geometry:
    """Circular orbit about z through the origin, NAF convention (detector offsets ignored)."""
    try:
        return Geometry.circular(angles, sc["DSO"], sc["DSD"], tuple(int(n) for n in sc["nDetector"]),
                                 tuple(sc["dDetector"]), convention="naf", mode=sc["mode"])
    except RgsInputError as exc:
        raise RgsInputError(f"{where}: {exc}") from exc


def _angles(where: str, raw, count: int | None = None) -> np.ndarray:
    try:
        a = np.asarray(raw, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise RgsInputError(f"{where}: angles must be numbers (radians)") from None
    if a.size == 0 or not np.all(np.isfinite(a)):
        raise RgsInputError(f"{where}: angles must be a non-empty list of finite radians")
    if count is not None and a.size != count:
        raise RgsInputError(f"{where}: {a.size} angles for {count} projections: one angle per projection")
    return a


def _float_array(where: str, raw, shape: tuple | None = None, ndim: int | None = None,
                 dtype: type = np.float32) -> np.ndarray:
    """``raw`` as a finite ``dtype`` array (optionally of ``shape`` or ``ndim`` dimensions)."""
    try:
        a = np.asarray(raw)
    except Exception:  # noqa: BLE001 - any odd object
        raise RgsInputError(f"{where}: not a numeric array") from None
    if a.dtype.kind not in "fiu":
        raise RgsInputError(f"{where}: has dtype {a.dtype}, expected numbers")
    if ndim is not None and a.ndim != ndim:
        raise RgsInputError(f"{where}: has shape {a.shape}, expected {ndim} dimensions")
    if shape is not None and a.shape != tuple(shape):
        raise RgsInputError(f"{where}: has shape {a.shape}, expected {tuple(shape)}")
    a = a.astype(dtype)
    if not np.all(np.isfinite(a)):
        raise RgsInputError(f"{where}: contains NaN or Inf values: clean or regenerate the data")
    return a
