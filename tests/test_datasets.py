"""The data recipes of ``datasets/`` (a folder of scripts, imported here by path)."""
import gzip
import importlib.util
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

_SPEC = importlib.util.spec_from_file_location(
    "fetch_ct", Path(__file__).resolve().parent.parent / "datasets" / "fetch_ct.py")
fetch_ct = sys.modules.setdefault("fetch_ct", importlib.util.module_from_spec(_SPEC))
_SPEC.loader.exec_module(fetch_ct)


def test_head_atlas_background_becomes_air_but_inner_zeros_stay():
    hu = np.zeros((12, 10, 8), np.int16)  # the atlas' background: 0 HU
    hu[2:10, 2:8, 2:6] = 37  # brain
    hu[5, 4, 3] = 0  # a 0 HU voxel inside (e.g. CSF): not background
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    img = nib.Nifti1Image(hu, affine)
    img.set_sform(affine, code=2)
    out = nib.Nifti1Image.from_bytes(gzip.decompress(fetch_ct._background_to_air(gzip.compress(img.to_bytes()))))
    got = np.asarray(out.dataobj)
    assert got.dtype == np.int16 and got.shape == hu.shape
    np.testing.assert_array_equal(out.affine, affine)
    assert got[5, 4, 3] == 0 and (got[2:10, 2:8, 2:6][hu[2:10, 2:8, 2:6] == 37] == 37).all()
    outside = np.ones_like(hu, bool)
    outside[2:10, 2:8, 2:6] = False
    assert (got[outside] == -1000).all()


def test_every_source_names_a_pinned_wheel():
    for source in fetch_ct.SOURCES.values():
        assert "==" in source.package and source.members
        assert set(source.prepare) <= set(source.members)
