"""Shepp-Logan phantom, scan simulation (orbits, noise, normalisation) and ``rgs simulate``."""
import json
import math
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from rgs_engine.sim.scan import project_views
from rgs_engine.sim import scan as sim
from rgs_engine.core.errors import RgsInputError
from rgs_engine.core.geometry import VolumeGrid
from rgs_engine.sim.phantoms import ellipsoid_table, shepp_logan, shepp_logan_grid, shepp_logan_normalised
from rgs_engine.io.projections import load_projections
from cli_helpers import error_line as _error_line, invoke as _invoke


AFFINE = np.array([[-3.0, 0, 0, 5.0], [0, 2.5, 0, -20.0], [0, 0, 3.0, 10.0], [0, 0, 0, 1]])


def _tiny_ct(path: Path) -> Path:
    """20^3 CT in HU: air, a water cylinder and a 1000 HU ball, anisotropic, x reversed."""
    idx = np.stack(np.meshgrid(*[np.arange(20)] * 3, indexing="ij"), -1)
    world = idx @ AFFINE[:3, :3].T + AFFINE[:3, 3]
    centre = AFFINE[:3, :3] @ np.full(3, 9.5) + AFFINE[:3, 3]
    hu = np.full((20, 20, 20), -1000.0, np.float32)
    hu[np.linalg.norm(world[..., :2] - centre[:2], axis=-1) < 20] = 0.0
    hu[np.linalg.norm(world - (centre + [6, 4, 5]), axis=-1) < 7] = 1000.0
    nib.save(nib.Nifti1Image(hu, AFFINE), str(path))
    return path


# --------------------------------------------------------------------------------------
# Phantom
# --------------------------------------------------------------------------------------
def test_shepp_logan_values_and_symmetry():
    pts = torch.tensor([[0.0, 0.0, 0.0],      # brain: 1 - 0.8
                        [0.22, 0.0, 0.0],     # dark ellipsoid: 1 - 0.8 - 0.2
                        [0.0, 0.35, -0.15],   # bright ellipsoid: 1 - 0.8 + 0.1
                        [0.0, 0.9, 0.0],      # skull shell
                        [0.95, 0.95, 0.95]])  # outside
    np.testing.assert_allclose(shepp_logan_normalised(pts).numpy(), [0.2, 0.0, 0.3, 1.0, 0.0], atol=1e-12)

    grid = shepp_logan_grid(32, box_mm=256.0)
    vol = shepp_logan(grid)
    assert vol.shape == (32, 32, 32) and vol.dtype == torch.float32
    assert float(vol.min()) >= 0 and abs(float(vol.max()) - 0.02) < 1e-7  # skull = water, 0.02 /mm
    assert set(np.round(vol.unique().double().numpy() / 0.02, 5).tolist()) <= {0.0, 0.2, 0.3, 1.0}
    # above the small features (z > 0.3) only the two outer ellipsoids remain: mirror symmetric in x
    top = vol[:, :, 24:]  # z of voxel centres > 0.5 in normalised units
    assert float(top.max()) > 0 and torch.equal(top, top.flip(0))
    assert not torch.equal(vol, vol.flip(2))  # but not up-down symmetric
    # volume integral = sum of intensity x ellipsoid volume (partial-volume sampled)
    fine = shepp_logan(grid, scale=1.0, oversample=3)
    t = ellipsoid_table()
    expected = float((t[:, 0] * 4 / 3 * math.pi * t[:, 1] * t[:, 2] * t[:, 3]).sum()) * 128.0 ** 3
    assert abs(float(fine.double().sum()) * 8.0 ** 3 / expected - 1) < 0.02


def test_shepp_logan_follows_the_grid_and_checks_input():
    grid = VolumeGrid.centred((16, 20, 12), 8.0, centre=(100.0, -50.0, 30.0))
    vol = shepp_logan(grid, box_mm=160.0)
    assert vol.shape == (16, 20, 12)
    assert abs(float(vol[8, 10, 6]) - 0.004) < 1e-7  # the grid's centre is the phantom's centre
    with pytest.raises(RgsInputError, match="scale"):
        shepp_logan(grid, scale=-1.0)
    with pytest.raises(RgsInputError, match="variant"):
        shepp_logan(grid, variant="other")


# --------------------------------------------------------------------------------------
# Orbits and noise
# --------------------------------------------------------------------------------------
def test_geometries_cover_the_volume_and_arbitrary_is_not_circular(device):
    grid = shepp_logan_grid(24, 256.0)
    vol = shepp_logan(grid)
    for orbit in ("circular", "arbitrary"):
        spec = sim.ScanSpec(views=12, test_views=5, orbit=orbit, det=32, seed=3)
        data = sim.simulate(vol, grid, spec)
        assert data.is_circular == (orbit == "circular")
        assert data.test_geometry.num_views == 5
        dso, dsd = sim.default_distances(grid)
        assert (dso, dsd) == (640.0, 896.0)
        for geo, proj in ((data.geometry, data.projections), (data.test_geometry, data.test_projections)):
            dist = (geo.sources - torch.tensor(grid.centre)).norm(dim=1)
            assert torch.allclose(dist, torch.full_like(dist, dso), rtol=0.02)  # jitter <= 2 %
            assert float(proj[:, [0, -1], :].abs().max()) == 0 and float(proj[:, :, [0, -1]].abs().max()) == 0
            assert float(proj.max()) > 0.5
    arbitrary = sim.arbitrary_poses(200, grid, 640.0, np.random.default_rng(0))
    src = arbitrary[:, :3, 3] - np.asarray(grid.centre)
    elevation = np.degrees(np.arcsin(src[:, 2] / np.linalg.norm(src, axis=1)))
    assert np.abs(elevation).max() <= 31 and np.abs(elevation).max() > 20
    # the detector faces the isocentre: its axis passes within the jitter of the centre
    look = arbitrary[:, :3, 2]
    miss = np.linalg.norm(np.cross(look, -src), axis=1)
    assert miss.max() <= math.sqrt(3) * 0.02 * 256 + 1e-6


def test_noise_is_unbiased_and_matches_the_poisson_model():
    levels = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    clean = levels[:, None, None].expand(4, 200, 200).to(torch.float32).contiguous()
    gen = torch.Generator().manual_seed(0)
    for model, photons, sigma in (("physical", 1e4, 10.0), ("tigre", 1e4, 10.0), ("physical", 500.0, 0.0)):
        noisy, scale = sim.add_noise(clean, photons, sigma, model, gen)
        assert scale == (2.0 if model == "tigre" else 1.0)
        err = (noisy - clean).double()
        var = sim.noise_variance(clean, photons, sigma, scale)
        for k in range(4):
            std = float(var[k].mean().sqrt())
            assert abs(float(err[k].mean())) < 0.05 * std + 0.5 * std ** 2  # bias is 2nd order
            assert abs(float(err[k].var()) / float(var[k].mean()) - 1) < 0.1
    noiseless_again, _ = sim.add_noise(clean, 1e12, 0.0, "physical", gen)
    assert float((noiseless_again - clean).abs().max()) < 1e-4
    assert sim.parse_noise("1e4,10") == (1e4, 10.0) and sim.parse_noise("none") is None
    with pytest.raises(RgsInputError, match="PHOTONS,SIGMA"):
        sim.parse_noise("1e4")


# --------------------------------------------------------------------------------------
# rgs simulate
# --------------------------------------------------------------------------------------
def test_simulate_ct_end_to_end_then_refuses_to_overwrite(tmp_path, device):
    ct_path = _tiny_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "scan.h5"
    args = ["simulate", ct_path, out, "--grid", "20", "--views", "10", "--test-views", "4",
            "--det", "32", "--seed", "7"]
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout and "10 training + 4 test" in result.stdout
    data = load_projections(out)
    assert data.num_views == 10 and data.geometry.det_shape == (32, 32) and data.is_circular
    assert data.grid.shape == (20, 17, 20)  # 60 x 50 x 60 mm at 3 mm
    assert abs(float(data.ground_truth.max()) - 0.04) < 0.005  # the 1000 HU ball
    # noiseless: the stored projections are the ground truth's DRR, train and test
    torch.testing.assert_close(project_views(data.ground_truth, data.grid, data.geometry).cpu(), data.projections)
    torch.testing.assert_close(project_views(data.ground_truth, data.grid, data.test_geometry).cpu(),
                               data.test_projections)
    params = data.attributes["command"]
    assert params["views"] == 10 and params["seed"] == 7 and params["ct"] == str(ct_path)
    assert data.attributes["scan"]["dso_mm"] == pytest.approx(2.5 * 60)

    before = (out.read_bytes(), out.stat().st_mtime_ns)
    line = _error_line(_invoke(*args))
    assert "exists: pass --force" in line
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before
    assert _invoke(*args, "--force", "--views", "6").exit_code == 0
    assert load_projections(out).num_views == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "scan.h5"]  # no temp files


def test_simulate_phantom_noise_and_normalise(tmp_path, device):
    out = tmp_path / "sl.h5"
    result = _invoke("simulate", "--phantom", "shepp-logan", out, "--grid", "24", "--views", "16",
                     "--test-views", "3", "--det", "32", "--noise", "1e4,10", "--normalise",
                     "--orbit", "arbitrary")
    assert result.exit_code == 0, result.output
    data = load_projections(out)
    assert not data.is_circular and data.grid.shape == (24, 24, 24)
    assert data.grid.size_mm.max() == pytest.approx(256.0)
    # R2-Gaussian units: values in [0, 1] per half box side (128 mm)
    assert float(data.ground_truth.max()) == pytest.approx(1 / 128, rel=1e-6)
    assert data.attributes["scan"]["normalised"] is True
    clean = project_views(data.ground_truth, data.grid, data.geometry).cpu()
    torch.testing.assert_close(project_views(data.ground_truth, data.grid, data.test_geometry).cpu(),
                               data.test_projections)  # test views stay noiseless
    scale = data.attributes["scan"]["noise_scale"]
    assert scale == pytest.approx(float(clean.max()), rel=1e-5)
    err = (data.projections - clean).double()
    var = sim.noise_variance(clean, 1e4, 10.0, scale)
    assert abs(float(err.mean())) < 0.1 * float(var.mean().sqrt())
    assert abs(float(err.var()) / float(var.mean()) - 1) < 0.15
    with h5py.File(out) as f:
        assert json.loads(f.attrs["command"])["normalise"] is True


@pytest.mark.parametrize("args, text", [
    (["--phantom", "shepp-logan", "a.h5", "b.h5"], "with --phantom give only OUT.h5"),
    (["only.h5"], "give CT.nii.gz and OUT.h5"),
    (["--phantom", "shepp-logan", "out.nii"], "must end in .h5"),
    (["--phantom", "shepp-logan", "o.h5", "--noise", "lots"], "PHOTONS,SIGMA"),
    (["--phantom", "shepp-logan", "o.h5", "--dso", "100", "--grid", "8"], "increase the source distance"),
    (["--phantom", "shepp-logan", "o.h5", "--dso", "1000", "--dsd", "900", "--grid", "8"], "DSD > DSO"),
    (["--phantom", "shepp-logan", "o.h5", "--orbit", "arbitrary", "--dso", "200", "--grid", "8"],
     "increase --dso"),
    (["--phantom", "shepp-logan", "o.h5", "--arc", "400"], "--arc 400"),
    (["missing.nii.gz", "o.h5"], "no such file"),
])
def test_simulate_rejects_bad_input(tmp_path, monkeypatch, args, text):
    monkeypatch.chdir(tmp_path)
    assert text in _error_line(_invoke("simulate", *args))
    assert not (tmp_path / "o.h5").exists()
