"""Synthetic vessel tree, bolus and rotational DSA run (rgs_engine.sim.vessels)."""
import json
import math

import numpy as np
import pytest
import torch

from rgs_engine.io import dsa_case as dsa_data

from rgs_engine.sim import vessels
from rgs_engine.core.errors import RgsInputError
from rgs_engine.core.geometry import VolumeGrid
from rgs_engine.core.projector import project
from rgs_engine.sim.vessels import Bolus, Branch, VesselPhantom

GRID = VolumeGrid.centred((24, 24, 24), vessels.BOX_MM / 24)


@pytest.fixture(scope="module")
def phantom() -> VesselPhantom:
    return vessels.make_phantom(seed=5)


@pytest.fixture(scope="module")
def run(device, phantom) -> dsa_data.DsaCase:
    return vessels.simulate_dsa_run(phantom, GRID, frames=9, det=24)


def test_tree_follows_murray_and_is_seeded(phantom):
    b = phantom.branches
    assert 10 <= len(b) <= 31 and b[0].parent == -1
    children = {}
    for k, br in enumerate(b[1:], 1):
        parent = b[br.parent]
        np.testing.assert_allclose(br.points[0], parent.points[-1])  # starts at the parent's end
        assert br.path_mm[0] == pytest.approx(parent.path_mm[-1])
        assert br.radius < parent.radius
        children.setdefault(br.parent, []).append(br.radius)
    for parent, radii in children.items():
        if len(radii) == 2:
            assert sum(r ** 3 for r in radii) == pytest.approx(b[parent].radius ** 3)
    for br in b:
        steps = np.linalg.norm(np.diff(br.points, axis=0), axis=1)
        assert steps.max() <= vessels.CURVE_STEP_MM * 1.2
        np.testing.assert_allclose(np.diff(br.path_mm), steps)
        brain = np.array([0.38, 0.43, 0.40]) * vessels.BOX_MM  # skull's inner surface
        assert np.all(np.linalg.norm(br.points / brain, axis=1) < 1)
    again = vessels.make_phantom(seed=5)
    assert all(np.array_equal(x.points, y.points) for x, y in zip(b, again.branches))
    assert not np.array_equal(vessels.make_phantom(seed=6).branches[1].points, b[1].points)
    copy = VesselPhantom.from_dict(json.loads(json.dumps(phantom.to_dict())))
    assert copy.bolus == phantom.bolus and copy.tissue == phantom.tissue
    assert all(np.array_equal(x.points, y.points) and x.radius == y.radius for x, y in zip(copy.branches, b))
    with pytest.raises(RgsInputError, match="incomplete"):
        VesselPhantom.from_dict({"branches": []})


def test_bolus_rises_peaks_and_washes_out():
    bolus = Bolus(arrival_s=0.5, velocity_mm_s=50.0, rise_s=1.0, alpha=3.0)
    path = torch.tensor([0.0, 25.0])  # arrivals at 0.5 s and 1.0 s
    assert bolus.concentration(0.4, path).tolist() == [0.0, 0.0]
    assert bolus.concentration(0.9, path)[1] == 0.0 < bolus.concentration(0.9, path)[0]
    assert bolus.concentration(1.5, path)[0] == pytest.approx(1.0)  # peak rise_s after arrival
    assert bolus.concentration(2.0, path)[1] == pytest.approx(1.0)
    assert bolus.concentration(4.0, path)[0] < 0.1  # washed out


def test_contrast_arrives_in_order_along_the_tree(device, phantom):
    voxels = phantom.rasterise(GRID, device)
    times = np.linspace(0.0, 6.0, 121)
    lumen = voxels.mask()
    filled = torch.stack([voxels.volume(t)[lumen] for t in times])  # (T, lumen voxels)
    share = filled / filled.max(0).values
    first = torch.tensor(times)[(share > 0.5).to(torch.int8).argmax(0).cpu()]  # first half-filled
    path = voxels.to_volume(voxels.path_mm)[lumen]
    order = torch.argsort(path.cpu())
    assert bool((first[order].diff() >= -1e-9).all())  # farther along the tree: later
    assert float(first.max() - first.min()) > 0.5  # the delay spans the tree
    for br in phantom.branches[1:]:  # along centre lines: parents fill before children
        parent = phantom.branches[br.parent]
        assert float(phantom.bolus.arrival(br.path_mm[-1])) > float(phantom.bolus.arrival(parent.path_mm[0]))


def test_rasterised_tube_matches_its_geometry(device):
    z = np.linspace(-20.0, 20.0, 41)
    tube = VesselPhantom([Branch(np.stack([np.zeros_like(z), np.zeros_like(z), z], 1), 4.0, z + 20, -1)], [],
                         Bolus(), 0.03)
    grid = VolumeGrid.centred((30, 30, 60), 1.0)
    voxels = tube.rasterise(grid, device)
    lumen_mm3 = float(voxels.occupancy().sum())
    ends = 2 * (2 / 3) * math.pi * 4.0 ** 3  # the flat-ended tube's rounded caps (distance to the line)
    assert lumen_mm3 == pytest.approx(math.pi * 16 * 40 + ends, rel=0.03)
    x = grid.voxel_centres()
    inside = voxels.mask().cpu()
    np.testing.assert_allclose(voxels.to_volume(voxels.path_mm).cpu()[inside & (x[..., 2].abs() < 19)].numpy(),
                               (x[..., 2] + 20)[inside & (x[..., 2].abs() < 19)].numpy(), atol=1e-5)
    assert bool((x[..., :2].norm(dim=-1)[inside] <= 4.0).all())
    times = [0.3, 1.0, 2.5]
    torch.testing.assert_close(voxels.mean_volume(times), sum(voxels.volume(t) for t in times) / 3)
    sub, box = voxels.support()
    assert sub.shape == tuple(s.stop - s.start for s in box)
    assert float(voxels.occupancy()[box].sum()) == pytest.approx(lumen_mm3)


def test_tissue_is_water_in_bone(phantom):
    vol = phantom.tissue_volume(GRID)
    centre = GRID.shape[0] // 2
    assert float(vol[centre, centre, centre]) == pytest.approx(0.02)
    assert float(vol[0, 0, 0]) == 0.0
    assert float(vol.max()) == pytest.approx(0.045)  # skull shell and skull base
    line = vol[:, centre, centre]
    assert float(line[line > 0][0]) == pytest.approx(0.045)  # skull before the brain


def test_run_projections_are_the_joseph_projections(device, phantom, run):
    assert run.num_frames == 9 and run.det_shape == (24, 24)
    np.testing.assert_allclose(run.times.numpy(), np.linspace(0, vessels.DURATION_S, 9))
    span = math.degrees(float(run.angles[-1] - run.angles[0]))
    assert span == pytest.approx(vessels.ARC_DEG) and float(run.angles.mean()) == pytest.approx(math.pi / 2)
    geometry = run.geometry()
    voxels = phantom.rasterise(GRID, device)
    tissue = phantom.tissue_volume(GRID, device)
    mask_p = -torch.log(run.mask_run.double() / vessels.PHOTONS)
    torch.testing.assert_close(mask_p.float(), project(tissue, GRID, geometry).cpu(), rtol=0, atol=2e-5)
    dsa = dsa_data.dsa_line_integrals(run.mask_run, run.fill_run)
    for f in range(run.num_frames):
        want = project(voxels.volume(float(run.times[f])), GRID, geometry.subset([f]))[0].cpu()
        torch.testing.assert_close(dsa[f], want, rtol=0, atol=2e-5)
    assert float(dsa.max()) > 0.05 and float(dsa[0].max()) == 0.0  # no contrast before it arrives


def test_run_truth(device, phantom, run):
    truth, voxels = run.truth, phantom.rasterise(GRID, device)
    torch.testing.assert_close(truth.mean_volume, voxels.mean_volume(run.times.tolist()).cpu())
    assert torch.equal(truth.mask, voxels.mask().cpu())
    assert sorted(truth.frame_volumes) == [0, 2, 4, 6, 8]
    torch.testing.assert_close(truth.frame_volumes[6], voxels.volume(float(run.times[6])).cpu())
    v, f = truth.surface
    assert len(f) > 100 and np.all(np.abs(v) < vessels.BOX_MM / 2)
    assert truth.parameters["phantom"] == phantom.to_dict() and truth.parameters["run"]["frames"] == 9
    assert len(truth.centrelines) == len(phantom.branches)


def test_noise_is_seeded_poisson(device, phantom, run):
    noisy = vessels.simulate_dsa_run(phantom, GRID, frames=9, det=24, noise=(1e5, 0.0), seed=2, truth_frames=0)
    again = vessels.simulate_dsa_run(phantom, GRID, frames=9, det=24, noise=(1e5, 0.0), seed=2, truth_frames=0)
    assert torch.equal(noisy.fill_run, again.fill_run) and noisy.truth.frame_volumes == {}
    counts = noisy.mask_run.double()
    assert float((counts - counts.round()).abs().max()) < 0.05  # photon counts (through float32 logs)
    expected = 10 * run.mask_run.double()  # the noiseless run has 1e4 photons
    z = (counts - expected) / expected.sqrt()
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05
    with pytest.raises(RgsInputError, match="frames >= 1"):
        vessels.simulate_dsa_run(phantom, GRID, frames=0)
