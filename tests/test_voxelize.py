"""Voxelisation kernels against the dense float64 reference, physics and input checks."""
import math

import pytest
import torch

import rgs_engine.core.voxelization as vox
from rgs_engine import RgsInputError, VolumeGrid
from rgs_engine._torch_impl.voxelize import voxelize as reference

GRID = VolumeGrid((20, 17, 23), (0.5, 0.7, 0.4), (-5.0, -6.0, -4.0))  # anisotropic spacing


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def random_gaussians(n, grid, device, dtype=torch.float64, scale=(0.2, 1.4)):
    """Rotated anisotropic Gaussians around the grid's box; some lie partly or fully outside."""
    lo, hi = (torch.as_tensor(b, dtype=dtype) for b in grid.bounds())
    means = lo - 0.15 * (hi - lo) + 1.3 * (hi - lo) * torch.rand(n, 3, dtype=dtype)
    scales = scale[0] + (scale[1] - scale[0]) * torch.rand(n, 3, dtype=dtype)
    quats = 2 * torch.randn(n, 4, dtype=dtype)  # not unit: the kernels normalise
    densities = 0.1 + torch.rand(n, dtype=dtype)
    return [t.to(device) for t in (means, scales, quats, densities)]


def vjps(fn, params, grid, upstream, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in params]
    out = fn(*leaves, grid, **kw)
    return out, torch.autograd.grad((out.double() * upstream).sum(), leaves)


@pytest.mark.parametrize("lanes,per_pass", [(1, 1 << 24), (32, 1 << 24), (32, 5)])
@pytest.mark.parametrize("grid,cutoff", [
    (GRID, 3.0),
    (GRID.sub_grid((3, 5, 4), (9, 8, 11)), 3.0),
    (GRID, 2.0),
])
def test_matches_reference_with_vjps(device, monkeypatch, lanes, per_pass, grid, cutoff):
    # lanes=32 runs the CUDA thread layout (one warp per chunk) on any device; a small
    # per_pass makes each thread walk several chunks, as for a huge total of chunks
    monkeypatch.setattr(vox, "_splat_lanes", lambda dev: lanes)
    monkeypatch.setattr(vox.kernels, "CHUNKS_PER_PASS", per_pass)
    params = random_gaussians(24, GRID, device)
    params[1][0] = torch.tensor([30.0, 20.0, 40.0])  # box larger than the grid: many chunks
    upstream = torch.randn(grid.shape, dtype=torch.float64, device=device)
    out, grads = vjps(vox.voxelize, params, grid, upstream, cutoff=cutoff)
    want, want_grads = vjps(reference, params, grid, upstream, cutoff=cutoff)
    assert out.dtype == torch.float32 and out.shape == grid.shape and out.device.type == device.type
    assert rel_err(out, want) < 1e-3
    for name, g, w in zip(("means", "scales", "quats", "densities"), grads, want_grads):
        assert g.dtype == torch.float64, name
        assert rel_err(g, w) < 1e-3, name


def test_float32_inputs_and_noncontiguous_upstream(device):
    params = [t.float() for t in random_gaussians(10, GRID, device)]
    upstream = torch.randn(GRID.shape[::-1], device=device).permute(2, 1, 0)  # non-contiguous
    out, grads = vjps(vox.voxelize, params, GRID, upstream)
    want, want_grads = vjps(reference, params, GRID, upstream)
    assert rel_err(out, want) < 1e-3
    for g, w in zip(grads, want_grads):
        assert g.dtype == torch.float32 and rel_err(g, w) < 1e-3


def test_gaussians_outside_and_empty(device):
    means, scales, quats, dens = random_gaussians(5, GRID, device)
    far = (means + 1e3).requires_grad_()
    out = vox.voxelize(far, scales, quats, dens, GRID)
    assert not out.any()
    (grad,) = torch.autograd.grad(out.sum(), far)
    assert not grad.any()
    empty = [t[:0] for t in (means, scales, quats, dens)]
    assert not vox.voxelize(*empty, GRID).any()


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_box_empty_along_one_axis_adds_nothing(device, axis):
    """A Gaussian just outside one face, within the grid's span along the other two axes: its
    cutoff ellipsoid misses the grid (its box is empty along ``axis``) although the voxel one
    step outside lies within the cutoff. Nothing may be written, there or anywhere."""
    lo, hi = GRID.bounds()
    mean = (torch.as_tensor(lo) + torch.as_tensor(hi)) / 2
    # sigma 1 mm, cutoff 3: 0.2 mm short of the first voxel centre, while the centre one
    # step further out (0.4-0.7 mm) lies 2.6-2.9 mm from the mean, within the cutoff
    mean[axis] = GRID.origin[axis] - 3.2
    gaussians = [mean[None].to(device), torch.ones(1, 3, dtype=torch.float64, device=device),
                 torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64, device=device),
                 torch.ones(1, dtype=torch.float64, device=device)]
    assert not reference(*gaussians, GRID).any()
    leaves = [t.clone().requires_grad_() for t in gaussians]
    out = vox.voxelize(*leaves, GRID)
    assert not out.any()
    grads = torch.autograd.grad(out.sum(), leaves)
    assert not any(g.any() for g in grads)


def test_mass_of_one_gaussian(device):
    """Sum over a fine grid x voxel volume = rho (2 pi)^1.5 s1 s2 s3 P(chi2_3 <= cutoff^2)."""
    s = torch.tensor([[1.2, 0.7, 1.6]], dtype=torch.float64, device=device)
    rho = torch.tensor([0.8], dtype=torch.float64, device=device)
    mean = torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64, device=device)
    quat = torch.tensor([[0.9, 0.3, -0.2, 0.4]], dtype=torch.float64, device=device)
    h = 0.1
    grid = VolumeGrid.centred((110, 110, 110), h)
    out = vox.voxelize(mean, s, quat, rho, grid)
    c = 3.0
    fraction = math.erf(c / math.sqrt(2)) - math.sqrt(2 / math.pi) * c * math.exp(-c * c / 2)
    want = float(rho * (2 * math.pi) ** 1.5 * s.prod()) * fraction
    assert abs(float(out.double().sum()) * h ** 3 / want - 1) < 1e-3
    assert abs(float(out.max()) / float(rho) - 1) < 1e-2  # peak ~ rho near the centre


@pytest.mark.parametrize("field,value,match", [
    (0, torch.zeros(4, 2), "shape"),
    (1, torch.ones(4, 3), "shape"),  # scales for a different N
    (3, torch.ones(3, 1), "shape"),
    (0, torch.full((3, 3), float("nan")), "NaN"),
    (1, -torch.ones(3, 3), "positive"),
    (2, torch.zeros(3, 4), "zero"),
])
def test_bad_inputs_raise(device, field, value, match):
    params = random_gaussians(3, GRID, device, dtype=torch.float32)
    params[field] = value.to(device)
    with pytest.raises(RgsInputError, match=match):
        vox.voxelize(*params, GRID)


@pytest.mark.parametrize("grid,cutoff", [((20, 17, 23), 3.0), (GRID, 0.0), (GRID, float("inf"))])
def test_bad_grid_or_cutoff_raise(device, grid, cutoff):
    with pytest.raises(RgsInputError):
        vox.voxelize(*random_gaussians(3, GRID, device), grid, cutoff=cutoff)
