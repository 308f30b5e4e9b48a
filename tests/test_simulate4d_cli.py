"""``rgs simulate4d`` end to end on a small synthetic chest CT, and its one-line errors."""
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from chest_phantom import chest_grid, write_chest_nifti
from cli_helpers import assert_one_line_error, invoke
from rgs_engine.sim.breathing import displacement_field, motion_amplitudes, warp
from rgs_engine.io.naf4d import load_4d_pickle
from rgs_engine.core.geometry import VolumeGrid
from rgs_engine.core.projector import project
from rgs_engine.sim.scan import load_ct_volume

SMALL = ("--grid", "24", "--projections", "12", "--val-projections", "3", "--det", "24",
         "--scan-seconds", "16", "--period", "4", "--phases", "4")


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    return write_chest_nifti(tmp_path_factory.mktemp("ct") / "chest.nii.gz")


def _truth(ct: Path, data, device, irregular: bool = False, seed: int = 0):
    """Recompute a case from the CT, one view and one warp at a time: (grid, projections,
    test projections, phases), each the exact Joseph projection / warp at its time."""
    mu, grid = load_ct_volume(ct, 24, device)
    centred = VolumeGrid.centred(grid.shape, grid.spacing)
    u = displacement_field(mu, centred, 15.0, 5.0)

    def at(times_s, geometry):
        amps = motion_amplitudes(times_s, 4.0, irregular, seed)
        return torch.cat([project(warp(mu, centred, u, a[None])[0], centred, geometry.subset([i])).cpu()
                          for i, a in enumerate(amps)])

    phases = torch.cat([warp(mu, centred, u, a[None]).cpu()
                        for a in motion_amplitudes(data.phase_times_s, 4.0, irregular, seed)])
    return centred, at(data.times_s, data.geometry), at(data.test_times_s, data.test_geometry), phases


def test_simulate4d_end_to_end_matches_exact_projections(tmp_path, ct, device):
    out = tmp_path / "case.pickle"
    result = invoke("simulate4d", ct, out, *SMALL)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout and "regular, period 4 s" in result.stdout
    data = load_4d_pickle(out)
    assert data.conventions == "scan_seconds, period_s and phase_times_s read from the file"
    assert (data.num_views, data.scan_seconds, data.period_s) == (12, 16.0, 4.0)
    assert data.projections.shape == (12, 24, 24) and data.phases.shape == (4, *data.grid.shape)
    # evenly spread in time and angle over one turn; the truth spans the cycle holding 8 s
    torch.testing.assert_close(data.time, torch.arange(12, dtype=torch.float64) / 12)
    src = data.geometry.vectors[:, :3]
    angles = torch.remainder(torch.atan2(src[:, 1], src[:, 0]), 2 * math.pi)
    torch.testing.assert_close(angles, 2 * math.pi * data.time, rtol=0, atol=1e-9)
    torch.testing.assert_close(data.phase_times_s, torch.tensor([8.5, 9.5, 10.5, 11.5], dtype=torch.float64))
    torch.testing.assert_close(data.phase, torch.tensor([0, 1, 2] * 4))  # t = 4k/3 s: bins of 1 s
    assert data.test_projections.shape == (3, 24, 24) and data.test_phase.shape == (3,)
    # the grid is the CT's, re-centred on the origin (RAS+ axes kept)
    grid, projections, test_projections, phases = _truth(ct, data, device)
    np.testing.assert_allclose(data.grid.origin, grid.origin, atol=1e-9)
    assert data.grid.shape == grid.shape and data.grid.spacing == grid.spacing
    np.testing.assert_allclose(data.attributes["ct_centre_mm"], chest_grid().centre, atol=1e-6)
    # every projection is the Joseph projection of the volume warped to its own time
    torch.testing.assert_close(data.projections, projections, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(data.test_projections, test_projections, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(data.phases, phases, rtol=0, atol=1e-6)
    # every phase of the cycle is a distinct volume (the AP motion lags: inhale != exhale)
    steps = (phases[:, None] - phases[None]).abs().amax(dim=(2, 3, 4))
    assert float((steps + torch.eye(4)).min()) > 2e-4  # 1/mm; near exhale they differ least
    # and the motion shows: end-exhale and end-inhale projections of one view differ
    static = project(phases[0].to(device), grid, data.geometry).cpu()
    inhale = project(phases[2].to(device), grid, data.geometry).cpu()
    assert float((inhale - static).abs().max()) > 0.1 * float(static.max())
    # an existing output is kept unless --force
    assert_one_line_error(invoke("simulate4d", ct, out, *SMALL), "exists: pass --force")
    assert invoke("simulate4d", ct, out, *SMALL, "--phases", "2", "--force").exit_code == 0
    assert load_4d_pickle(out).phases.shape[0] == 2


def test_simulate4d_irregular_and_noise(tmp_path, ct, device):
    clean, noisy = tmp_path / "clean.pkl", tmp_path / "noisy.pkl"
    for out, extra in ((clean, ()), (noisy, ("--noise", "1e4,10"))):
        result = invoke("simulate4d", ct, out, *SMALL, "--irregular", "--seed", "3", *extra)
        assert result.exit_code == 0, result.output
    a, b = load_4d_pickle(clean), load_4d_pickle(noisy)
    _, projections, _, phases = _truth(ct, a, device, irregular=True, seed=3)
    torch.testing.assert_close(a.projections, projections, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.phases, phases, rtol=0, atol=1e-6)
    assert a.attributes["parameters"]["irregular"] is True
    # noise on the training projections only
    assert 0 < float((b.projections - a.projections).abs().mean()) < 0.1 * float(a.projections.max())
    assert torch.equal(b.test_projections, a.test_projections)


@pytest.mark.parametrize("args, message", [
    (("--scan-seconds", "10"), "at least 4 breathing periods"),
    (("--amplitude-mm", "big"), "write SI,AP"),
    (("--amplitude-mm", "15,-2"), "mm >= 0"),
    (("--phases", "0"), "at least 1 ground-truth phase"),
    (("--projections", "0"), "at least 1 projection"),
    (("--noise", "1e4"), "PHOTONS,SIGMA"),
    (("--grid", "4"), "too small"),
])
def test_simulate4d_bad_options_are_one_line_errors(tmp_path, ct, args, message):
    out = tmp_path / "case.pickle"
    assert_one_line_error(invoke("simulate4d", ct, out, *SMALL, *args), message)
    assert not out.exists()


def test_simulate4d_bad_paths_are_one_line_errors(tmp_path, ct):
    assert_one_line_error(invoke("simulate4d", ct, tmp_path / "case.h5", *SMALL), "end in .pickle or .pkl")
    assert_one_line_error(invoke("simulate4d", tmp_path / "none.nii.gz", tmp_path / "a.pickle", *SMALL),
                          "no such file")
    water = np.where(np.linalg.norm(np.indices((16, 16, 16))[:2] - 7.5, axis=0) < 6, 0.0, -1000.0)
    nib.save(nib.Nifti1Image(water.astype(np.float32), np.diag([12.0, 12.0, 12.0, 1.0])),
             str(tmp_path / "water.nii.gz"))
    assert_one_line_error(invoke("simulate4d", tmp_path / "water.nii.gz", tmp_path / "b.pickle", *SMALL),
                          "no lungs found")
    assert not list(tmp_path.glob("*.pickle"))
