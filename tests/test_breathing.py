"""Breathing curve, anatomical displacement field and warp (rgs_engine.sim.breathing)."""
import math

import numpy as np
import pytest
import torch

from chest_phantom import LUNG_CENTRE_Z, LUNG_HALF_HEIGHT, SPINE, chest_grid, chest_hu
from rgs_engine.sim import breathing as br
from rgs_engine.sim.ct import hu_to_mu
from rgs_engine.core.errors import RgsInputError
from rgs_engine.core.geometry import VolumeGrid


# --------------------------------------------------------------------------------------
# Breathing curve
# --------------------------------------------------------------------------------------
def test_regular_curve_is_periodic_in_range_and_starts_at_exhale():
    t = torch.linspace(0.0, 30.0, 3001, dtype=torch.float64)
    a = br.breathing_amplitude(t, 3.5)
    assert a.shape == t.shape and a.dtype == torch.float64
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    torch.testing.assert_close(br.breathing_amplitude(t + 3.5, 3.5), a, rtol=0, atol=1e-9)
    torch.testing.assert_close(br.breathing_amplitude(torch.tensor([0.0, 1.75, 3.5, 5.25]), 3.5),
                               torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-12)
    # Lujan's sin^4: lingers near exhale (below half amplitude for well over half the cycle)
    assert float((a < 0.5).double().mean()) > 0.6
    phase = br.breathing_phase(t, 3.5)
    assert float(phase.min()) >= 0 and float(phase.max()) < 1
    torch.testing.assert_close(phase, torch.remainder(t / 3.5, 1.0), rtol=0, atol=1e-9)
    with pytest.raises(RgsInputError, match=">= 0 s"):
        br.breathing_amplitude([-1.0, 2.0], 3.5)
    with pytest.raises(RgsInputError, match="positive number of seconds"):
        br.breathing_amplitude([1.0], 0.0)


def test_irregular_curve_is_seeded_jittered_and_has_one_deep_breath():
    t = torch.linspace(0.0, 60.0, 6001, dtype=torch.float64)
    regular = br.breathing_amplitude(t, 3.5)
    a = br.breathing_amplitude(t, 3.5, irregular=True, seed=7)
    assert float(a.min()) >= 0.0 and abs(float(a.max()) - 1.0) < 1e-3  # the deep breath peaks at 1
    assert float((a - regular).abs().max()) > 0.3
    torch.testing.assert_close(br.breathing_amplitude(t, 3.5, irregular=True, seed=7), a, rtol=0, atol=0)
    assert not torch.equal(br.breathing_amplitude(t, 3.5, irregular=True, seed=8), a)
    starts, peaks = br.breathing_cycles(60.0, 3.5, irregular=True, seed=7)
    lengths = np.diff(starts)
    assert starts[0] == 0 and starts[-1] > 60 and lengths.std() > 0.05 * 3.5
    assert abs(np.median(lengths) / 3.5 - 1) < 0.1  # jitter about the nominal period
    assert (peaks == 1.0).sum() == 1 and br.DEEP_CYCLES[0] <= int(np.argmax(peaks)) <= br.DEEP_CYCLES[1]
    assert peaks[peaks < 1].max() < 0.95 and peaks.min() > 0.4  # normal breaths are shallower
    # a cycle does not depend on how far the curve is evaluated
    short_starts, short_peaks = br.breathing_cycles(20.0, 3.5, irregular=True, seed=7)
    np.testing.assert_array_equal(short_starts, starts[:len(short_starts)])
    np.testing.assert_array_equal(short_peaks, peaks[:len(short_peaks)])
    # smooth across cycle boundaries: 0 at every cycle start
    np.testing.assert_allclose(br.breathing_amplitude(starts[:-1], 3.5, irregular=True, seed=7).numpy(),
                               0.0, atol=1e-12)


def test_motion_amplitudes_lag_the_chest_wall():
    t = torch.linspace(0.0, 14.0, 141, dtype=torch.float64)
    amps = br.motion_amplitudes(t, 3.5)
    assert amps.shape == (141, 3) and float(amps[:, 0].abs().max()) == 0.0
    torch.testing.assert_close(amps[:, 2], br.breathing_amplitude(t, 3.5))
    lag = br.AP_LAG * 3.5
    torch.testing.assert_close(amps[:, 1], br.breathing_amplitude((t - lag).clamp_min(0), 3.5))
    # inhale and exhale at equal SI amplitude differ in AP: a hysteresis loop, not a line
    early, late = br.motion_amplitudes(torch.tensor([1.0, 2.5]), 3.5)
    assert abs(float(early[2] - late[2])) < 1e-9 and abs(float(early[1] - late[1])) > 0.1
    assert br.motion_amplitudes(torch.zeros(2, 5), 3.5, irregular=True).shape == (2, 5, 3)


def test_depth_drift_and_baseline_shift():
    t = torch.linspace(0.0, 56.0, 5601, dtype=torch.float64)
    peaks = (torch.arange(16, dtype=torch.float64) + 0.5) * 3.5  # the cycles' peak times
    # the depth drift: peaks fall linearly from 1 to 0.7 over the 56 s horizon, exhale stays 0
    a = br.drifted(br.breathing_amplitude(t, 3.5), t, depth_drift=0.3, horizon_s=56.0)
    torch.testing.assert_close(br.drifted(br.breathing_amplitude(peaks, 3.5), peaks, depth_drift=0.3,
                                          horizon_s=56.0), 1 - 0.3 * peaks / 56.0)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # the baseline shift: end-exhale rises to 0.3 and the peaks to 1, the breath's depth is 0.7
    b = br.drifted(br.breathing_amplitude(t, 3.5), t, baseline_shift=0.3, horizon_s=56.0)
    exhale = torch.arange(17, dtype=torch.float64) * 3.5
    torch.testing.assert_close(br.drifted(br.breathing_amplitude(exhale, 3.5), exhale, baseline_shift=0.3,
                                          horizon_s=56.0), 0.3 * exhale / 56.0)
    torch.testing.assert_close(br.drifted(br.breathing_amplitude(peaks, 3.5), peaks, baseline_shift=0.3,
                                          horizon_s=56.0), 0.7 + 0.3 * peaks / 56.0)
    assert float(b.max()) <= 1.0 and float(b.min()) == 0.0
    # both axes of motion_amplitudes drift; no drift leaves the curve as it was
    amps = br.motion_amplitudes(t, 3.5, depth_drift=0.3, horizon_s=56.0)
    torch.testing.assert_close(amps[:, 2], a)
    assert float(amps[:, 1].max()) < 1.0 and float(amps[-1000:, 1].max()) < 0.8
    torch.testing.assert_close(br.motion_amplitudes(t, 3.5, horizon_s=56.0), br.motion_amplitudes(t, 3.5))
    with pytest.raises(RgsInputError, match="horizon"):
        br.drifted(a, t, depth_drift=0.3)
    with pytest.raises(RgsInputError, match="fractions"):
        br.drifted(a, t, baseline_shift=1.2, horizon_s=56.0)


# --------------------------------------------------------------------------------------
# Displacement field
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chest():
    """(attenuation 1/mm, grid, displacement at amplitude 1) of the synthetic chest."""
    grid = chest_grid()
    mu = hu_to_mu(chest_hu(grid))
    return mu, grid, br.displacement_field(mu, grid, si_mm=15.0, ap_mm=5.0)


def _rel(grid: VolumeGrid) -> torch.Tensor:
    """Voxel centres relative to the box centre (the phantom's frame), (nx, ny, nz, 3) mm."""
    return (grid.voxel_centres() - torch.from_numpy(grid.centre)).float()


def test_displacement_has_its_peaks_signs_and_zeros_where_expected(chest):
    mu, grid, u = chest
    assert u.shape == (*grid.shape, 3) and u.dtype == torch.float32
    assert float(u[..., 0].abs().max()) == 0.0  # no lateral motion
    assert abs(float(u[..., 2].min()) + 15.0) < 1e-4 and float(u[..., 2].max()) <= 0.0  # inferior
    assert abs(float(u[..., 1].max()) - 5.0) < 1e-4 and float(u[..., 1].min()) >= 0.0  # anterior
    c = _rel(grid)
    x, y, z = c[..., 0], c[..., 1], c[..., 2]
    norm = u.norm(dim=-1)
    # nothing moves well outside the body (beyond the 3-sigma reach of the envelope)
    outside = (x / 140) ** 2 + (y / 100) ** 2 > 1.0 + 1e-6
    far = outside & ((x.abs() - 140 > 40) | (y.abs() - 100 > 40))
    assert bool(far.any()) and float(norm[far].max()) == 0.0
    # the spine barely moves; nothing moves superior-inferiorly above the lung apex
    spine = (x - SPINE[0]) ** 2 + (y - SPINE[1]) ** 2 <= SPINE[2] ** 2
    assert float(norm[spine].max()) < 0.1 * 15.0
    above = z > LUNG_CENTRE_Z + LUNG_HALF_HEIGHT
    assert float(u[..., 2][above].abs().max()) == 0.0
    # SI motion is largest at the lung base and falls towards the apex and into the abdomen
    k = int(u[..., 2].amin(dim=(0, 1)).argmin())
    base = LUNG_CENTRE_Z - LUNG_HALF_HEIGHT
    assert abs(float(z[0, 0, k]) - base) <= 2.5 * grid.spacing[2]
    column = u[22, 16, :, 2]  # through the left lung (x = +60 mm)
    assert float(column[k:].diff().min()) >= -1e-6  # monotone towards the apex
    assert float(column[:k].diff().max()) <= 1e-6  # and monotone into the abdomen
    # AP motion grows towards the anterior chest wall
    assert float(u[16, :, k + 4, 1].diff()[:24].min()) >= -1e-6
    assert float(u[16, 26, k + 4, 1]) > 2.0 > float(u[16, 10, k + 4, 1])


def test_displacement_is_smooth_and_the_warp_stays_invertible(chest):
    _, grid, u = chest
    # no jump: neighbouring voxels (10 mm apart) differ by less than 10 mm
    steps = [torch.diff(u, dim=axis).abs().amax() / grid.spacing[axis] for axis in range(3)]
    assert max(float(s) for s in steps) < 1.0
    # x -> x - u(x) folds nowhere: its Jacobian determinant stays well above 0
    jacobian = torch.stack(torch.gradient(-u, spacing=grid.spacing, dim=(0, 1, 2)), -1) + torch.eye(3)
    assert float(torch.linalg.det(jacobian).min()) > 0.5


def test_field_and_warp_run_on_the_volume_device(chest, device):
    mu, grid, u = chest
    u_dev = br.displacement_field(mu.to(device), grid)
    assert u_dev.device.type == device.type
    torch.testing.assert_close(u_dev.cpu(), u, rtol=0, atol=1e-4)
    warped = br.warp(mu.to(device), grid, u_dev, torch.tensor([0.5, 1.0]))
    assert warped.device.type == device.type
    torch.testing.assert_close(warped.cpu(), br.warp(mu, grid, u, torch.tensor([0.5, 1.0])), rtol=0, atol=1e-5)


def test_displacement_needs_lungs():
    grid = chest_grid(16, 20.0)
    c = _rel(grid)
    water = hu_to_mu(torch.where((c[..., 0] / 140) ** 2 + (c[..., 1] / 100) ** 2 <= 1, 0.0, -1000.0))
    with pytest.raises(RgsInputError, match="no lungs found"):
        br.displacement_field(water, grid)
    with pytest.raises(RgsInputError, match="mm >= 0"):
        br.displacement_field(water, grid, si_mm=-1.0)


# --------------------------------------------------------------------------------------
# Warp
# --------------------------------------------------------------------------------------
def _blob(grid: VolumeGrid) -> torch.Tensor:
    c = _rel(grid)
    return torch.exp(-0.5 * ((c - torch.tensor([4.0, -6.0, 3.0])) ** 2).sum(-1) / 8.0 ** 2)


def _centroid(v: torch.Tensor, grid: VolumeGrid) -> torch.Tensor:
    return (grid.voxel_centres().float() * v[..., None]).sum((0, 1, 2)) / v.sum()


def test_warp_identity_and_known_shifts():
    grid = VolumeGrid.centred((20, 22, 24), 5.0, (10.0, 0.0, -30.0))
    blob = _blob(grid)
    field = torch.zeros(*grid.shape, 3)
    field[..., 2] = 10.0  # 10 mm along +z everywhere
    torch.testing.assert_close(br.warp(blob, grid, field, 0.0), blob, rtol=0, atol=1e-6)
    # out(x) = blob(x - a u): a shift of two voxels moves the blob two voxels up, exactly
    moved = br.warp(blob, grid, field, 1.0)
    torch.testing.assert_close(moved[:, :, 2:], blob[:, :, :-2], rtol=0, atol=1e-6)
    # half a voxel: trilinear interpolation moves the centroid by exactly 2.5 mm
    shift = _centroid(br.warp(blob, grid, field, 0.25), grid) - _centroid(blob, grid)
    torch.testing.assert_close(shift, torch.tensor([0.0, 0.0, 2.5]), rtol=0, atol=1e-3)
    # a batch of amplitudes equals one warp each
    field[..., 0] = -4.0
    amps = torch.tensor([0.0, 0.3, 1.0])
    batch = br.warp(blob, grid, field, amps)
    assert batch.shape == (3, *grid.shape)
    for i, a in enumerate(amps.tolist()):
        torch.testing.assert_close(batch[i], br.warp(blob, grid, field, a), rtol=0, atol=1e-6)
    # per-axis amplitudes scale each component: (1, 0, 0) moves along x only (-4 mm)
    along_x = br.warp(blob, grid, field, torch.tensor([[1.0, 0.0, 0.0]]))
    shift = _centroid(along_x[0], grid) - _centroid(blob, grid)
    torch.testing.assert_close(shift, torch.tensor([-4.0, 0.0, 0.0]), rtol=0, atol=1e-3)
    with pytest.raises(RgsInputError, match="displacement has shape"):
        br.warp(blob, grid, field[..., :2], 1.0)
    with pytest.raises(RgsInputError, match="per-axis amplitudes"):
        br.warp(blob, grid, field, torch.ones(2, 2))


def test_inhalation_lowers_the_lung_base(chest):
    mu, grid, u = chest
    inhaled = br.warp(mu, grid, u, 1.0)
    lungs_before = br.anatomy_masks(mu, grid).lungs
    lungs_after = br.anatomy_masks(inhaled, grid).lungs
    low = [float(torch.nonzero(m.any(0).any(0))[0]) * grid.spacing[2] for m in (lungs_before, lungs_after)]
    assert low[0] - low[1] >= 10.0  # the lowest lung slice moves down by about the 15 mm peak
    assert math.isclose(float(br.warp(mu, grid, u, 0.0).sum()), float(mu.sum()), rel_tol=1e-5)
