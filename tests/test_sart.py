"""OS-SART: one update against a dense float64 reference, convergence, FDK comparison, checks."""
import math

import pytest
import torch

from rgs_engine import Geometry, RgsInputError, VolumeGrid, fdk, project
from rgs_engine._torch_impl.projector import project as project_reference
from rgs_engine.recon.sart import SART, ZERO_WEIGHT, sart, subset_order, subsets_of
from rgs_engine.core.metrics import psnr_3d
from blob_phantom import blob_phantom as phantom


def circle(views: int, det=(32, 32), pixel=6.0) -> Geometry:
    angles = torch.arange(views, dtype=torch.float64) * (2 * math.pi / views) + 0.1
    return Geometry.circular(angles, 400.0, 600.0, det, pixel)


def posed(views: int, det=(32, 32), pixel=6.0, dso=400.0, dsd=600.0) -> Geometry:
    """Cone-beam views from arbitrary poses (sources on a tilted, wobbling path)."""
    gen = torch.Generator().manual_seed(3)
    poses = []
    for k in range(views):
        a = 2 * math.pi * k / views + 0.3 * float(torch.rand(1, generator=gen))
        tilt = 0.4 * math.sin(3 * a)
        src = dso * torch.tensor([math.cos(a) * math.cos(tilt), math.sin(a) * math.cos(tilt),
                                  math.sin(tilt)], dtype=torch.float64)
        ez = -src / src.norm()
        ex = torch.linalg.cross(ez, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
        ex = ex / ex.norm()
        ey = torch.linalg.cross(ez, ex)
        m = torch.eye(4, dtype=torch.float64)
        m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = ex, ey, ez, src
        poses.append(m)
    return Geometry.from_poses(torch.stack(poses), dsd, det, pixel)


GRID = VolumeGrid.centred((24, 24, 24), 4.0)


def test_subset_order_spreads_subsets():
    assert subset_order(8) == [0, 4, 2, 6, 1, 5, 3, 7]  # bit reversal for powers of two
    for n in range(1, 13):
        assert sorted(subset_order(n)) == list(range(n))
    subsets = subsets_of(25, 5)
    assert sorted(torch.cat(subsets).tolist()) == list(range(25))
    assert subsets[0].tolist() == [0, 5, 10, 15, 20]  # every 5th view: spread over the orbit


def _dense_matrix(grid: VolumeGrid, geometry: Geometry) -> torch.Tensor:
    """A (rays, voxels) float64 from the reference projector applied to unit vectors."""
    n = math.prod(grid.shape)
    cols = []
    for j in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[j] = 1
        cols.append(project_reference(e.reshape(grid.shape), grid, geometry).reshape(-1))
    return torch.stack(cols, dim=1)


def _safe_inv(x: torch.Tensor) -> torch.Tensor:
    limit = ZERO_WEIGHT * float(x.max())
    return torch.where(x > limit, 1 / x.clamp(min=limit), torch.zeros_like(x))


@pytest.mark.parametrize("kind", ["cone", "parallel", "poses"])
def test_one_iteration_matches_dense_float64_reference(device, kind):
    """Two subsets of an OS-SART pass vs the same update with an explicit float64 matrix."""
    grid = VolumeGrid.centred((6, 7, 5), (9.0, 8.0, 10.0))
    if kind == "poses":
        geometry = posed(4, det=(8, 9), pixel=(10.0, 11.0), dso=200.0, dsd=300.0)
    else:
        angles = torch.tensor([0.1, 1.3, 2.9, 4.4], dtype=torch.float64)
        geometry = Geometry.circular(angles, 200.0, 300.0, (8, 9), (10.0, 11.0), mode=kind)
    a = _dense_matrix(grid, geometry)
    gen = torch.Generator().manual_seed(1)
    truth = torch.rand(grid.shape, generator=gen, dtype=torch.float64) * 0.02
    b = (a @ truth.reshape(-1)).reshape(geometry.num_views, -1)
    b = b + 0.02 * b.max() * torch.randn(b.shape, generator=gen, dtype=torch.float64)  # noisy
    x0 = torch.rand(grid.shape, generator=gen, dtype=torch.float64) * 0.01
    lam = 0.8

    rays = a.reshape(geometry.num_views, -1, a.shape[1])
    x = x0.reshape(-1).clone()
    for idx in subsets_of(geometry.num_views, 2):
        a_s = rays[idx].reshape(-1, a.shape[1])
        resid = (b[idx].reshape(-1) - a_s @ x) * _safe_inv(a_s.sum(1))
        x = (x + lam * (a_s.T @ resid) * _safe_inv(a_s.sum(0))).clamp(min=0)
    expected = x.reshape(grid.shape)

    solver = SART(b.reshape(geometry.num_views, *geometry.det_shape).float().to(device), geometry, grid,
                  subsets=2, relaxation=lam, init=x0.float().to(device))
    got = solver.step().double().cpu()
    step = (expected - x0).abs().max()
    err = (got - expected).abs().max() / step
    print(f"{kind}: max |SART - dense float64| = {err:.2e} of the largest update")
    assert err < 2e-5  # measured ~1e-6
    assert solver.iteration == 1 and math.isfinite(solver.residual)


def test_converges_on_noiseless_data(device):
    """24^3 phantom, 16 views of 32x32: PSNR rises every iteration, past 31 dB (measured 31.7) at 20."""
    truth = phantom(GRID).to(device)
    geometry = circle(16)
    history = []
    sart(project(truth, GRID, geometry), geometry, GRID, iterations=20, subsets=4, relaxation=1.0,
         callback=lambda it, vol: history.append((it, psnr_3d(vol, truth))))
    assert [it for it, _ in history] == list(range(1, 21))
    psnrs = [p for _, p in history]
    print("PSNR by iteration:", [round(p, 2) for p in psnrs])
    assert all(b > a - 0.02 for a, b in zip(psnrs, psnrs[1:]))  # monotone up to rounding
    assert psnrs[-1] > 31.0


def r2_noise(p: torch.Tensor, photons: float = 1e4, sigma: float = 10.0) -> torch.Tensor:
    """R2-Gaussian's projection noise: Poisson counts of ``photons`` x exp(-p) plus Gaussian
    electronic noise ``sigma``, back to line integrals (counts below 1 clamped)."""
    gen = torch.Generator().manual_seed(0)
    counts = photons * torch.exp(-p.double().cpu())
    counts = torch.poisson(counts, generator=gen) + sigma * torch.randn(counts.shape, generator=gen,
                                                                        dtype=torch.float64)
    return (-torch.log(counts.clamp(min=1.0) / photons)).float().to(p.device)


def test_beats_fdk_at_25_noisy_views(device):
    """25 views with R2-Gaussian's noise. Measured: FDK 27.3 dB, SART defaults (6 iterations)
    28.6 dB, 40 iterations 33.4 dB (this coarse 4 mm phantom averages the noise away, so it
    keeps improving past the defaults, which were tuned on a noisier 96^3 CT case)."""
    truth = phantom(GRID).to(device)
    geometry = circle(25)
    noisy = r2_noise(project(truth, GRID, geometry))
    p_fdk = psnr_3d(fdk(noisy, geometry, GRID), truth)
    p_default = psnr_3d(sart(noisy, geometry, GRID), truth)
    p_40 = psnr_3d(sart(noisy, geometry, GRID, iterations=40), truth)
    print(f"FDK {p_fdk:.2f} dB, SART defaults {p_default:.2f} dB, 40 iterations {p_40:.2f} dB")
    assert p_default > p_fdk + 0.8
    assert p_40 > p_fdk + 5.0 and p_40 > 32.0


def test_arbitrary_poses_reduce_the_residual(device):
    truth = phantom(GRID).to(device)
    geometry = posed(20)
    solver = SART(project(truth, GRID, geometry), geometry, GRID)
    residuals = []
    for _ in range(10):
        solver.step()
        residuals.append(solver.residual)
    assert residuals[-1] < 0.3 * residuals[0]
    assert psnr_3d(solver.volume, truth) > 25.0


def test_nonnegativity(device):
    truth = phantom(GRID).to(device)
    geometry = circle(12)
    p = project(truth, GRID, geometry)
    gen = torch.Generator().manual_seed(2)
    p = p + 0.05 * float(p.max()) * torch.randn(p.shape, generator=gen).to(device)
    assert float(sart(p, geometry, GRID, iterations=5).min()) >= 0.0
    assert float(sart(p, geometry, GRID, iterations=5, nonneg=False).min()) < 0.0
    start = -torch.ones(GRID.shape, device=device)  # a negative start is clamped too
    assert float(SART(p, geometry, GRID, init=start).volume.min()) == 0.0


def test_rays_missing_the_volume_are_skipped(device):
    """A detector twice the field of view: rays outside the grid add nothing, no NaN."""
    truth = phantom(GRID).to(device)
    geometry = circle(10, det=(48, 48), pixel=8.0)
    volume = sart(project(truth, GRID, geometry), geometry, GRID, iterations=3)
    assert bool(torch.isfinite(volume).all())


@pytest.mark.parametrize("kwargs, text", [
    ({"subsets": 0}, "subsets must be a positive integer"),
    ({"subsets": 13}, "use at most 12 subsets"),
    ({"relaxation": 0.0}, "relaxation must be in (0, 2)"),
    ({"relaxation": 2.5}, "relaxation must be in (0, 2)"),
    ({"relaxation": float("nan")}, "relaxation must be in (0, 2)"),
    ({"iterations": -1}, "iterations must be a non-negative integer"),
    ({"iterations": 2.5}, "iterations must be a non-negative integer"),
])
def test_bad_options(device, kwargs, text):
    geometry = circle(12)
    p = torch.zeros(12, 32, 32, device=device)
    with pytest.raises(RgsInputError, match=text.replace("(", r"\(").replace(")", r"\)")):
        sart(p, geometry, GRID, **kwargs)


def test_bad_inputs(device):
    geometry = circle(12)
    p = torch.zeros(12, 32, 32, device=device)
    with pytest.raises(RgsInputError, match="shape"):
        sart(p[:11], geometry, GRID)
    bad = p.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(RgsInputError, match="NaN"):
        sart(bad, geometry, GRID)
    with pytest.raises(RgsInputError, match="init has shape"):
        sart(p, geometry, GRID, init=torch.zeros(5, 5, 5, device=device))
    with pytest.raises(RgsInputError, match="grid must be a VolumeGrid"):
        sart(p, geometry, (24, 24, 24))
    inside = Geometry.circular([0.0, 1.0, 2.0], 30.0, 60.0, (32, 32), 6.0)  # source in the box
    with pytest.raises(RgsInputError, match="inside the volume"):
        sart(torch.zeros(3, 32, 32, device=device), inside, GRID)
