"""NAF's data pickles: the static reader, and the checks the 4D reader
(:mod:`rgs_engine.io.naf4d`) shares."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from ..core.errors import RgsInputError
from ..core.geometry import Geometry, VolumeGrid
from .projection_data import NAF_METRES_TO_MM, ProjectionData
from .scanner import _angles, _float_array, _scanner, _scanner_geometry, _scanner_grid


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
