"""The registration tests' CT case: a 32^3, 3 mm blob phantom stored in HU with an affine off the
origin (fixtures ``ct_path``, ``params``, ``points`` in conftest.py) and its X-rays from
``rgs simulate-xrays`` (64x64 AP + lateral Joseph DRRs)."""
import torch

from blob_phantom import blob_phantom
from cli_helpers import invoke
from rgs_engine import VolumeGrid
from rgs_engine.io import xrays as xray_data
from rgs_engine.io.files import save_nifti

GRID = VolumeGrid.centred((32, 32, 32), 3.0, (5.0, -3.0, 10.0))
FIT = {"grid_size": 32, "num_gaussians": 2000, "iterations": 150}
MTRE_OK_MM = 1.5


def hu(volume: torch.Tensor) -> torch.Tensor:
    """Attenuation (1/mm, water 0.02) to Hounsfield units."""
    return volume / 0.02 * 1000 - 1000


def write_ct(folder):
    """The phantom CT as ``folder/ct.nii.gz``; returns its path."""
    return save_nifti(folder / "ct.nii.gz", hu(blob_phantom(VolumeGrid.centred((32, 32, 32), 3.0))), GRID)


def simulate(ct, out, mm, deg, seed, *extra):
    """``rgs simulate-xrays`` of ``ct`` into ``out`` at a ``mm`` / ``deg`` offset; the loaded X-ray set."""
    res = invoke("simulate-xrays", ct, out, "--grid", 32, "--det", 64, "--offset-mm", mm,
                 "--offset-deg", deg, "--seed", seed, *extra)
    assert res.exit_code == 0, res.output
    return xray_data.load_xrays(out)
