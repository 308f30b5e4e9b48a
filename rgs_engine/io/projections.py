"""Projection data sets: one in-memory form, the rgs ``.h5`` file, and two foreign readers.

:class:`ProjectionData` holds a scan ready for reconstruction: line integrals
``-ln(I / I0)`` (V, H, W) float32, their :class:`~rgs_engine.core.geometry.Geometry` (mm), the
:class:`~rgs_engine.core.geometry.VolumeGrid` to reconstruct, and optionally the ground-truth
attenuation (1/mm), held-out test views and per-view acquisition times.

:func:`load_projections` reads, by what the path is:

* a ``.h5`` / ``.hdf5`` file in the rgs format (``datasets/FORMAT.md``), every key checked;
* a directory holding ``meta_data.json``: an R2-Gaussian data folder (TIGRE scanner block,
  per-view ``.npy`` projections stored flipped vertically from TIGRE, ``vol_gt.npy`` as
  ``[x, y, z]``). Their lengths are in their own unit, read as mm; projections unchanged;
* a ``.pickle`` / ``.pkl`` file: a static NAF pickle (lengths in mm, projections computed
  with path lengths in metres, so multiplied by 1000 here).

:func:`save_projections` writes the ``.h5`` format atomically (existing file kept unless
``force``). Every problem raises :class:`~rgs_engine.core.errors.RgsInputError` with a one-line
message naming the problem and the fix.
"""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import RgsInputError
from ..core.geometry import MODES, Geometry, VolumeGrid
from .files import atomic_write

FORMAT_NAME = "rgs-projections"
FORMAT_VERSION = 1
H5_SUFFIXES = (".h5", ".hdf5")
PICKLE_SUFFIXES = (".pickle", ".pkl")
NAF_METRES_TO_MM = 1000.0  # NAF projections integrate over metres; rgs works in mm


# --------------------------------------------------------------------------------------
# In-memory form
# --------------------------------------------------------------------------------------
def _as_cpu(name: str, x: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise RgsInputError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise RgsInputError(f"{name} has dtype {x.dtype}, expected floating point values")
    x = x.detach().to(device="cpu", dtype=dtype).contiguous()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise RgsInputError(f"{name} contains NaN or Inf values: clean or regenerate the data")
    return x


@dataclass
class ProjectionData:
    """A scan: training projections with their geometry, the grid, optional extras.

    ``projections`` (V, H, W) float32 CPU line integrals; ``geometry`` V views of ``det_shape``
    (H, W); ``grid`` the region to reconstruct (mm); ``ground_truth`` (nx, ny, nz) float32 in
    1/mm or None; ``test_projections`` (T, H', W') with ``test_geometry`` (T views) or both
    None; ``time`` (V,) float64 seconds or None; ``source`` where it came from;
    ``attributes`` free-form provenance (e.g. the parameters of ``rgs simulate``).
    Shapes and values are checked on construction.
    """

    projections: torch.Tensor
    geometry: Geometry
    grid: VolumeGrid
    ground_truth: torch.Tensor | None = None
    test_projections: torch.Tensor | None = None
    test_geometry: Geometry | None = None
    time: torch.Tensor | None = None
    source: str = ""
    attributes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"{self.source}: " if self.source else ""
        if not isinstance(self.geometry, Geometry):
            raise RgsInputError(f"{where}geometry must be a Geometry, got {type(self.geometry).__name__}")
        if not isinstance(self.grid, VolumeGrid):
            raise RgsInputError(f"{where}grid must be a VolumeGrid, got {type(self.grid).__name__}")
        self.projections = _as_cpu("projections", self.projections, torch.float32)
        want = (self.geometry.num_views, *self.geometry.det_shape)
        if tuple(self.projections.shape) != want:
            raise RgsInputError(
                f"{where}projections have shape {tuple(self.projections.shape)} but the geometry "
                f"describes {want} (views, rows, columns): one geometry row per projection")
        self.geometry.check_against(self.grid)
        if self.ground_truth is not None:
            self.ground_truth = _as_cpu("ground truth", self.ground_truth, torch.float32)
            if tuple(self.ground_truth.shape) != self.grid.shape:
                raise RgsInputError(
                    f"{where}ground truth has shape {tuple(self.ground_truth.shape)} but the volume "
                    f"grid has shape {self.grid.shape}: they must match")
        if (self.test_projections is None) != (self.test_geometry is None):
            raise RgsInputError(f"{where}test projections and test geometry must come together: "
                                "give both or neither")
        if self.test_projections is not None:
            if not isinstance(self.test_geometry, Geometry):
                raise RgsInputError(f"{where}test geometry must be a Geometry")
            self.test_projections = _as_cpu("test projections", self.test_projections, torch.float32)
            want = (self.test_geometry.num_views, *self.test_geometry.det_shape)
            if tuple(self.test_projections.shape) != want:
                raise RgsInputError(
                    f"{where}test projections have shape {tuple(self.test_projections.shape)} but "
                    f"the test geometry describes {want}: one geometry row per test projection")
            self.test_geometry.check_against(self.grid)
        if self.time is not None:
            self.time = _as_cpu("time", self.time, torch.float64)
            if tuple(self.time.shape) != (self.geometry.num_views,):
                raise RgsInputError(
                    f"{where}time has shape {tuple(self.time.shape)} but there are "
                    f"{self.geometry.num_views} views: give one time (s) per training view")

    @property
    def num_views(self) -> int:
        return self.geometry.num_views

    def view_indices(self, n: int) -> torch.Tensor:
        """Indices (n,) of ``n`` training views spread evenly over the acquisition order.

        View ``floor(k V / n)`` for ``k = 0 .. n - 1`` (all views if ``n == V``): on an evenly
        sampled circular orbit these are evenly spread angles.
        """
        total = self.num_views
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise RgsInputError(f"number of views must be a positive integer, got {n!r}")
        if n > total:
            raise RgsInputError(f"asked for {n} views but {self.source or 'the data'} has only "
                                f"{total}: ask for at most {total}")
        return torch.div(torch.arange(n) * total, n, rounding_mode="floor")

    def select_views(self, n: int) -> "ProjectionData":
        """The ``n`` training views of :meth:`view_indices`; test views, ground truth and
        grid are kept."""
        index = self.view_indices(n)
        return ProjectionData(
            projections=self.projections[index].contiguous(),
            geometry=self.geometry.subset(index),
            grid=self.grid,
            ground_truth=self.ground_truth,
            test_projections=self.test_projections,
            test_geometry=self.test_geometry,
            time=None if self.time is None else self.time[index].contiguous(),
            source=self.source,
            attributes=dict(self.attributes),
        )

    @property
    def is_circular(self) -> bool:
        """True when the training views form a circular orbit (FDK applies)."""
        from ..recon.fdk import circular_orbit

        try:
            circular_orbit(self.geometry)
        except RgsInputError:
            return False
        return True


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------
def load_projections(path: str | os.PathLike) -> ProjectionData:
    """Read a projection data set: rgs ``.h5``, R2-Gaussian folder or static NAF pickle."""
    p = Path(path)
    if p.is_dir():
        if (p / "meta_data.json").is_file():
            return load_r2_gaussian(p)
        raise RgsInputError(f"{p}: a directory without meta_data.json: pass an rgs .h5 file, an "
                            "R2-Gaussian data folder (with meta_data.json) or a NAF .pickle")
    if not p.exists():
        raise RgsInputError(f"{p}: no such file or directory: check the path")
    suffix = p.suffix.lower()
    if suffix in H5_SUFFIXES:
        return load_h5(p)
    if suffix in PICKLE_SUFFIXES:
        return load_naf_pickle(p)
    if p.name == "meta_data.json":
        return load_r2_gaussian(p.parent)
    raise RgsInputError(f"{p}: unknown projection data type {suffix or '(no suffix)'!r}: pass a "
                        ".h5/.hdf5 file, an R2-Gaussian folder (meta_data.json) or a NAF .pickle/.pkl")


# --------------------------------------------------------------------------------------
# rgs .h5
# --------------------------------------------------------------------------------------
def save_projections(path: str | os.PathLike, data: ProjectionData, force: bool = False) -> Path:
    """Write ``data`` to ``path`` in the rgs ``.h5`` format, atomically.

    An existing ``path`` raises :class:`RgsInputError` unless ``force``. ``data.attributes``
    are stored as root attributes (dicts and lists as JSON strings).
    """
    import h5py

    target = Path(path)
    if target.suffix.lower() not in H5_SUFFIXES:
        raise RgsInputError(f"{target}: projection files end in .h5 or .hdf5: rename the output")
    if not isinstance(data, ProjectionData):
        raise RgsInputError(f"save_projections needs a ProjectionData, got {type(data).__name__}")
    with atomic_write(target, force) as tmp:
        with h5py.File(tmp, "w") as f:
            for key, value in data.attributes.items():
                if key in ("format", "version"):
                    continue
                plain = isinstance(value, (str, bool, int, float, np.generic))
                f.attrs[key] = value if plain else json.dumps(value, default=str)
            f.attrs["format"] = FORMAT_NAME
            f.attrs["version"] = FORMAT_VERSION
            f.create_dataset("projections", data=data.projections.numpy().astype(np.float32))
            _write_geometry(f.create_group("geometry"), data.geometry)
            vol = f.create_group("volume")
            vol.attrs["shape"] = np.asarray(data.grid.shape, dtype=np.int64)
            vol.attrs["spacing"] = np.asarray(data.grid.spacing, dtype=np.float64)
            vol.attrs["origin"] = np.asarray(data.grid.origin, dtype=np.float64)
            if data.ground_truth is not None:
                vol.create_dataset("ground_truth", data=data.ground_truth.numpy().astype(np.float32))
            if data.test_projections is not None:
                test = f.create_group("test")
                test.create_dataset("projections", data=data.test_projections.numpy().astype(np.float32))
                _write_geometry(test.create_group("geometry"), data.test_geometry)
            if data.time is not None:
                f.create_dataset("time", data=data.time.numpy().astype(np.float64))
    return target


def _write_geometry(group, geometry: Geometry) -> None:
    ds = group.create_dataset("vectors", data=geometry.vectors.numpy().astype(np.float64))
    ds.attrs["mode"] = geometry.mode


class _H5Reader:
    """Checked access to one open rgs file; every failure names the key and the fix."""

    def __init__(self, f, path: Path):
        self.f, self.path = f, path

    def fail(self, message: str) -> None:
        raise RgsInputError(f"{self.path}: {message}")

    def dataset(self, key: str, ndim: int, required: bool = True):
        import h5py

        if key not in self.f:
            if required:
                self.fail(f"missing dataset /{key}: not a complete rgs projection file "
                          "(see datasets/FORMAT.md), write it with rgs simulate or save_projections")
            return None
        ds = self.f[key]
        if not isinstance(ds, h5py.Dataset):
            self.fail(f"/{key} is a group, expected a dataset: see datasets/FORMAT.md")
        if ds.ndim != ndim:
            self.fail(f"/{key} has shape {ds.shape}, expected {ndim} dimensions: see datasets/FORMAT.md")
        if ds.dtype.kind != "f":
            self.fail(f"/{key} has dtype {ds.dtype}, expected floating point: store it as float32/float64")
        arr = np.asarray(ds[()])
        if not np.all(np.isfinite(arr)):
            self.fail(f"/{key} contains NaN or Inf values: clean or regenerate the data")
        return arr

    def attr(self, obj, key: str, name: str):
        if key not in obj.attrs:
            self.fail(f"{name} lacks attribute {key!r}: see datasets/FORMAT.md")
        return obj.attrs[key]

    def vector3(self, obj, key: str, name: str) -> np.ndarray:
        raw = self.attr(obj, key, name)
        try:
            a = np.asarray(raw, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            a = np.zeros(0)
        if a.shape != (3,) or not np.all(np.isfinite(a)):
            self.fail(f"{name} attribute {key!r} must be 3 finite numbers, got {raw!r}")
        return a

    def geometry(self, group_key: str, det_shape: tuple[int, int]) -> Geometry:
        key = f"{group_key}/vectors"
        vec = self.dataset(key, 2)
        if vec.shape[1] != 12 or vec.shape[0] < 1:
            self.fail(f"/{key} has shape {vec.shape}, expected (V, 12) ASTRA-style vectors")
        mode = self.attr(self.f[key], "mode", f"/{key}")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if mode not in MODES:
            self.fail(f"/{key} attribute 'mode' is {mode!r}: use 'cone' or 'parallel'")
        try:
            return Geometry(torch.from_numpy(vec.astype(np.float64)), det_shape, mode)
        except RgsInputError as exc:
            self.fail(f"/{key}: {exc}")


def _decode_attr(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def load_h5(path: str | os.PathLike) -> ProjectionData:
    """Read and check an rgs projection file (see ``datasets/FORMAT.md``)."""
    import h5py

    p = Path(path)
    if not p.is_file():
        raise RgsInputError(f"{p}: no such file: check the path")
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise RgsInputError(f"{p}: cannot read the file ({exc.strerror or exc}): check its permissions") from exc
    if head != b"\x89HDF\r\n\x1a\n":
        raise RgsInputError(f"{p}: not an HDF5 file: pass an rgs .h5 projection file "
                            "(written by rgs simulate or save_projections)")
    try:
        with h5py.File(p, "r") as f:
            return _read_h5(_H5Reader(f, p))
    except RgsInputError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as exc:  # h5py: truncated / corrupt
        first = " ".join(str(exc).split())[:160]
        raise RgsInputError(f"{p}: the HDF5 file is truncated or corrupt ({type(exc).__name__}: "
                            f"{first}): copy or generate it again") from exc


def _read_h5(r: _H5Reader) -> ProjectionData:
    f = r.f
    fmt = _decode_attr(f.attrs.get("format"))
    if fmt != FORMAT_NAME:
        r.fail(f"root attribute 'format' is {fmt!r}, expected {FORMAT_NAME!r}: this HDF5 file is "
               "not an rgs projection file (see datasets/FORMAT.md)")
    version = _decode_attr(f.attrs.get("version"))
    if not isinstance(version, (int, float)) or int(version) != FORMAT_VERSION:
        r.fail(f"format version {version!r} is not supported (this rgs reads version "
               f"{FORMAT_VERSION}): upgrade rgs or regenerate the file")

    proj = r.dataset("projections", 3)
    if min(proj.shape) < 1:
        r.fail(f"/projections has shape {proj.shape}: need at least one view of one pixel")
    det = (int(proj.shape[1]), int(proj.shape[2]))
    geometry = r.geometry("geometry", det)
    if geometry.num_views != proj.shape[0]:
        r.fail(f"/projections has {proj.shape[0]} views but /geometry/vectors has "
               f"{geometry.num_views} rows: one vector row per projection")

    if "volume" not in f:
        r.fail("missing group /volume (grid attributes shape, spacing, origin): see datasets/FORMAT.md")
    vol = f["volume"]
    shape_raw = r.attr(vol, "shape", "/volume")
    try:
        shape = np.asarray(shape_raw).reshape(-1)
        ok = shape.shape == (3,) and np.all(shape == np.round(shape)) and np.all(shape >= 1)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        r.fail(f"/volume attribute 'shape' must be 3 positive integers, got {shape_raw!r}")
    spacing = r.vector3(vol, "spacing", "/volume")
    if np.any(spacing <= 0):
        r.fail(f"/volume attribute 'spacing' must be positive (mm), got {spacing.tolist()}")
    origin = r.vector3(vol, "origin", "/volume")
    grid = VolumeGrid(tuple(int(s) for s in shape), tuple(spacing), tuple(origin))

    gt = r.dataset("volume/ground_truth", 3, required=False)
    if gt is not None and gt.shape != grid.shape:
        r.fail(f"/volume/ground_truth has shape {gt.shape} but /volume attribute 'shape' is "
               f"{grid.shape}: they must match")

    test_proj = test_geom = None
    has_p, has_g = "test/projections" in f, "test/geometry/vectors" in f
    if has_p != has_g:
        r.fail("/test needs both /test/projections and /test/geometry/vectors: "
               "write both or drop the /test group")
    if has_p:
        test_proj = r.dataset("test/projections", 3)
        if min(test_proj.shape) < 1:
            r.fail(f"/test/projections has shape {test_proj.shape}: need at least one view")
        test_geom = r.geometry("test/geometry", (int(test_proj.shape[1]), int(test_proj.shape[2])))
        if test_geom.num_views != test_proj.shape[0]:
            r.fail(f"/test/projections has {test_proj.shape[0]} views but /test/geometry/vectors "
                   f"has {test_geom.num_views} rows: one vector row per projection")

    time = r.dataset("time", 1, required=False)
    if time is not None and time.shape[0] != proj.shape[0]:
        r.fail(f"/time has {time.shape[0]} entries but there are {proj.shape[0]} views: "
               "one time (s) per training view")

    for name, geo in (("/geometry/vectors", geometry), ("/test/geometry/vectors", test_geom)):
        if geo is not None:
            try:
                geo.check_against(grid)
            except RgsInputError as exc:
                r.fail(f"{name}: {exc}")

    attributes = {k: _decode_attr(v) for k, v in f.attrs.items() if k not in ("format", "version")}
    try:
        return ProjectionData(
            projections=torch.from_numpy(proj.astype(np.float32)),
            geometry=geometry, grid=grid,
            ground_truth=None if gt is None else torch.from_numpy(gt.astype(np.float32)),
            test_projections=None if test_proj is None else torch.from_numpy(test_proj.astype(np.float32)),
            test_geometry=test_geom,
            time=None if time is None else torch.from_numpy(time.astype(np.float64)),
            source=str(r.path), attributes=attributes)
    except RgsInputError as exc:
        r.fail(str(exc))


# --------------------------------------------------------------------------------------
# Foreign formats: shared scanner handling (TIGRE scanner block)
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# R2-Gaussian data folder
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# NAF pickle (static here; the 4D reader in rgs_engine.io.naf4d shares these helpers)
# --------------------------------------------------------------------------------------
_NAF_KINDS = {3: ("a static NAF pickle", "(nx, ny, nz)", "rgs recon (load_naf_pickle)"),
              4: ("a 4D (phase) NAF pickle", "(phases, nx, ny, nz)", "rgs_engine.io.naf4d.load_4d_pickle")}


def _open_naf_pickle(path: str | os.PathLike, dims: int
                     ) -> tuple[str, dict, dict, VolumeGrid, np.ndarray]:
    """Unpickle and check a NAF data file whose ``image`` has ``dims`` dimensions (3: static,
    4: phases): ``(its path for messages, the dict, its checked scanner, the grid, image as
    float32)``."""
    p = Path(path)
    if not p.is_file():
        raise RgsInputError(f"{p}: no such file: check the path")
    try:
        with open(p, "rb") as fh:
            data = pickle.load(fh)
    except Exception as exc:  # noqa: BLE001 - unpickling raises many types
        raise RgsInputError(f"{p}: not a readable pickle ({type(exc).__name__}: {exc}): "
                            "pass a NAF data .pickle") from exc
    where = str(p)
    if not isinstance(data, dict):
        raise RgsInputError(f"{where}: holds a {type(data).__name__}, expected a NAF dict "
                            "(DSD, DSO, nDetector, ..., image, train)")
    for key in ("image", "train"):
        if key not in data:
            raise RgsInputError(f"{where}: missing key {key!r}: not a NAF data pickle")
    sc = _scanner(where, data)
    grid = _scanner_grid(sc)
    image = _float_array(f"{where} 'image'", data["image"])
    if image.ndim != dims and image.ndim in _NAF_KINDS:
        kind, _, reader = _NAF_KINDS[image.ndim]
        raise RgsInputError(f"{where}: 'image' has shape {image.shape}: {kind}; this reader needs "
                            f"{_NAF_KINDS[dims][1]}: read it with {reader}")
    if image.ndim != dims or image.shape[-3:] != grid.shape:
        raise RgsInputError(f"{where}: 'image' has shape {image.shape} but nVoxel is "
                            f"{list(grid.shape)}: it must be {_NAF_KINDS[dims][1]}")
    return where, data, sc, grid, image


def _naf_split(where: str, data: dict, key: str, sc: dict) -> tuple[np.ndarray, Geometry, dict]:
    """``data[key]`` (``"train"`` / ``"val"``) of a NAF pickle with scanner ``sc``:
    ``(projections (N, rows, cols) float32 line integrals in 1/mm units, their geometry, the
    split's dict)``. The stored projections integrate over metres, so they are scaled by
    1000; ``angles`` are radians, one per projection."""
    split = data[key]
    if not isinstance(split, dict) or "projections" not in split or "angles" not in split:
        raise RgsInputError(f"{where}: {key!r} must be a dict with 'projections' and 'angles'")
    det = (int(sc["nDetector"][0]), int(sc["nDetector"][1]))
    proj = _float_array(f"{where} {key}['projections']", split["projections"], ndim=3)
    if proj.shape[1:] != det:
        raise RgsInputError(f"{where}: {key}['projections'] has shape {proj.shape} but nDetector is "
                            f"{list(det)}: projections must be (N, rows, cols)")
    angles = _angles(f"{where} {key}['angles']", split["angles"], proj.shape[0])
    return proj * np.float32(NAF_METRES_TO_MM), _scanner_geometry(where, sc, angles), split


def load_naf_pickle(path: str | os.PathLike) -> ProjectionData:
    """Read a static NAF pickle (as NAF, R2-Gaussian and X2-Gaussian read it).

    Lengths (DSD, DSO, dDetector, dVoxel, offOrigin) are mm; ``image`` (nx, ny, nz) is the
    ground truth, axes world x, y, z; ``train`` / ``val`` hold ``projections`` (N, rows,
    cols) and ``angles`` (radians). NAF computed the projections with path lengths in metres,
    so rgs multiplies them by 1000: line integrals of ``image`` read as 1/mm. Geometry:
    :meth:`Geometry.circular` with ``convention="naf"`` (``offDetector`` ignored). ``val``
    becomes the test views. A 4D pickle (``image`` of shape (phases, nx, ny, nz)) is refused:
    :func:`rgs_engine.io.naf4d.load_4d_pickle` reads it.

    Pickles can run code when loaded: only open files from sources you trust.
    """
    where, data, sc, grid, gt = _open_naf_pickle(path, 3)
    proj, geometry, _ = _naf_split(where, data, "train", sc)
    test_proj = test_geom = None
    if data.get("val") is not None:
        test_proj, test_geom, _ = _naf_split(where, data, "val", sc)
    try:
        return ProjectionData(
            projections=torch.from_numpy(proj), geometry=geometry, grid=grid,
            ground_truth=torch.from_numpy(gt),
            test_projections=None if test_proj is None else torch.from_numpy(test_proj),
            test_geometry=test_geom, time=None, source=where,
            attributes={"origin_format": "naf-pickle",
                        "projection_scale": NAF_METRES_TO_MM})
    except RgsInputError as exc:
        raise RgsInputError(f"{where}: {exc}") from exc


def describe(data: ProjectionData) -> str:
    """One line: views, detector, mode, grid and extras."""
    h, w = data.geometry.det_shape
    extras = [name for name, x in (("ground truth", data.ground_truth),
                                   ("test views", data.test_projections), ("time", data.time))
              if x is not None]
    grid = "x".join(map(str, data.grid.shape))
    return (f"{data.num_views} {data.geometry.mode}-beam views of {h}x{w}, grid {grid} of "
            f"{'x'.join(f'{s:.3g}' for s in data.grid.spacing)} mm"
            + (f"; with {', '.join(extras)}" if extras else ""))


__all__ = ["ProjectionData", "load_projections", "save_projections", "load_h5", "load_r2_gaussian",
           "load_naf_pickle", "describe", "FORMAT_NAME", "FORMAT_VERSION"]
