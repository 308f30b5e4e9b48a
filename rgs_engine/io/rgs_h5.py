"""The rgs projection file (``.h5``, ``datasets/FORMAT.md``): writer and checked reader."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..core.errors import RgsInputError
from ..core.geometry import MODES, Geometry, VolumeGrid
from .files import atomic_write
from .projection_data import FORMAT_NAME, FORMAT_VERSION, H5_SUFFIXES, ProjectionData


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
