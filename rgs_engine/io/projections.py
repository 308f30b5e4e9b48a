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

import os
from pathlib import Path

from ..core.errors import RgsInputError
from .naf import load_naf_pickle
from .projection_data import (FORMAT_NAME, FORMAT_VERSION, H5_SUFFIXES, PICKLE_SUFFIXES, ProjectionData,
                              describe)
from .r2_gaussian import load_r2_gaussian
from .rgs_h5 import load_h5, save_projections


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


__all__ = ["ProjectionData", "load_projections", "save_projections", "load_h5", "load_r2_gaussian",
           "load_naf_pickle", "describe", "FORMAT_NAME", "FORMAT_VERSION"]
