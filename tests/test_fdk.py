"""FDK / FBP: recovery of a uniform sphere, kernel vs float64 reference, orbit and input checks."""
import math

import pytest
import torch

from rgs_engine import Geometry, RgsInputError, VolumeGrid
from rgs_engine._torch_impl.fdk import fdk as fdk_reference
from rgs_engine.recon.fdk import angular_weights, fdk
from rgs_engine.core.projector import project

MU = 0.02  # 1/mm


def full_circle(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float64) * (2 * math.pi / n) + 0.1


def sphere_projections(geometry: Geometry, radius: float, device) -> torch.Tensor:
    """Exact line integrals (V, H, W) of a uniform sphere (MU, radius mm) at the origin."""
    start, dirs = geometry.rays()
    foot = start - (start * dirs).sum(-1, keepdim=True) * dirs
    chord = 2 * torch.sqrt((radius ** 2 - (foot * foot).sum(-1)).clamp(min=0))
    return (MU * chord).to(device)


def interior_errors(volume: torch.Tensor, grid: VolumeGrid, radius: float) -> tuple[float, float]:
    """(mean relative error, max per-voxel relative deviation) inside 0.7 radius."""
    inner = grid.voxel_centres().norm(dim=-1) < 0.7 * radius
    values = volume.double().cpu()[inner] / MU
    return abs(float(values.mean()) - 1), float((values - 1).abs().max())


def check_sphere(volume, grid, radius, mean_tol=0.02, max_tol=0.05, label=""):
    mean_err, max_err = interior_errors(volume, grid, radius)
    print(f"{label}: interior mean error {mean_err:.2%}, max voxel deviation {max_err:.2%}")
    assert mean_err < mean_tol and max_err < max_tol


@pytest.mark.parametrize("offset", [(0.0, 0.0), (20.0, -35.0)], ids=["centred", "detector-offset"])
def test_fdk_sphere_cone(device, offset):
    """64^3 grid, 180 views over 360 degrees, analytic projections of a 22 mm sphere.

    The offset moves the principal point 12 rows and 22 columns off the detector centre; the
    sphere's shadow stays on the detector. Cosine weights about the detector centre instead
    of the principal point would give a 2.5 % mean error here.
    """
    grid = VolumeGrid.centred((64, 64, 64), 1.0)
    geometry = Geometry.circular(full_circle(180), 120.0, 200.0, (80, 100), 1.6, det_offset=offset)
    volume = fdk(sphere_projections(geometry, 22.0, device), geometry, grid)
    assert volume.dtype == torch.float32 and volume.shape == grid.shape
    check_sphere(volume, grid, 22.0, mean_tol=0.01, label=f"cone offset {offset}")


@pytest.mark.parametrize("mode", ["cone", "parallel"])
def test_fdk_of_projection(device, mode):
    """FDK(project(x)) ~ x for a voxelised sphere, with the Hann filter."""
    grid = VolumeGrid.centred((40, 40, 40), 1.0)
    radius = 14.0
    x = MU * (grid.voxel_centres().norm(dim=-1) <= radius).float().to(device)
    pitch = 1.6 if mode == "cone" else 0.8
    geometry = Geometry.circular(full_circle(120), 150.0, 300.0, (56, 64), pitch, mode=mode)
    volume = fdk(project(x, grid, geometry), geometry, grid, filter="hann")
    check_sphere(volume, grid, radius, label=f"{mode} FDK(project(x))")


def test_fdk_non_uniform_angles(device):
    grid = VolumeGrid.centred((32, 32, 32), 1.0)
    angles = torch.sort(torch.rand(150, dtype=torch.float64) * 2 * math.pi).values
    geometry = Geometry.circular(angles, 150.0, 300.0, (48, 56), 1.5)
    volume = fdk(sphere_projections(geometry, 11.0, device), geometry, grid)
    check_sphere(volume, grid, 11.0, max_tol=0.08, label="random angles")


def test_parallel_half_scan(device):
    """Parallel beam over 180 degrees is a complete scan."""
    grid = VolumeGrid.centred((32, 32, 32), 1.0)
    geometry = Geometry.circular(full_circle(180)[:90], 100.0, 200.0, (40, 48), 0.8, mode="parallel")
    volume = fdk(sphere_projections(geometry, 11.0, device), geometry, grid)
    check_sphere(volume, grid, 11.0, label="parallel 180 deg")


def tilted_axis(geometry: Geometry) -> Geometry:
    """The whole geometry rotated 0.4 rad about (1, 1, 0): the orbit axis is no longer z."""
    c, s = math.cos(0.4), math.sin(0.4)
    k = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64) / math.sqrt(2)
    cross = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    rot = c * torch.eye(3, dtype=torch.float64) + s * cross + (1 - c) * torch.outer(k, k)
    vec = (geometry.vectors.reshape(-1, 4, 3) @ rot.T).reshape(-1, 12)
    return Geometry(vec, geometry.det_shape, geometry.mode)


@pytest.mark.parametrize("mode, filt, tilt", [("cone", "ramp", False), ("cone", "hann", False),
                                              ("cone", "ramp", True), ("parallel", "ramp", False),
                                              ("parallel", "hann", True)])
def test_fdk_matches_reference(device, mode, filt, tilt):
    grid = VolumeGrid.centred((20, 18, 16), (1.0, 1.2, 0.9), centre=(1.0, -2.0, 0.5))
    geometry = Geometry.circular(full_circle(24), 60.0, 110.0, (16, 20), (2.5, 3.0),
                                 det_offset=(2.0, -3.0), isocentre=(0.5, 1.0, -1.0), mode=mode)
    if tilt:
        geometry = tilted_axis(geometry)
    proj = torch.rand(geometry.num_views, 16, 20, dtype=torch.float64, device=device)
    got = fdk(proj, geometry, grid, filter=filt)
    want = fdk_reference(proj, geometry, grid, filter=filt)
    assert float((got.double() - want).norm() / want.norm()) < 1e-4


def test_angular_weights():
    uniform = angular_weights(full_circle(8), 2 * math.pi)
    assert torch.allclose(uniform, torch.full((8,), math.pi / 4, dtype=torch.float64))
    angles = torch.tensor([0.0, 0.5, 2.0, 4.0], dtype=torch.float64)
    weights = angular_weights(angles[[2, 0, 3, 1]], 2 * math.pi)
    wrap = 2 * math.pi - 4.0  # gap from 4.0 round to 0.0
    want = 0.5 * torch.tensor([1.5 + 2.0, wrap + 0.5, 2.0 + wrap, 0.5 + 1.5], dtype=torch.float64)
    assert torch.allclose(weights, want)


def _perturbed(geometry: Geometry, view: int, column: slice, delta) -> Geometry:
    vec = geometry.vectors.clone()
    vec[view, column] += torch.tensor(delta, dtype=torch.float64)
    return Geometry(vec, geometry.det_shape, geometry.mode)


def test_non_circular_raises(device):
    grid = VolumeGrid.centred((16, 16, 16), 1.0)
    base = Geometry.circular(full_circle(12), 100.0, 200.0, (16, 16), 2.0)
    proj = torch.zeros(12, 16, 16, device=device)
    on_line = base.vectors.clone()
    on_line[:, 0:3] = torch.tensor([100.0, 0.0, 0.0])
    on_line[:, 2] = torch.linspace(-50.0, 50.0, 12)  # sources on a vertical line
    behind = base.vectors.clone()
    behind[:, 3:6] = 1.5 * behind[:, 0:3]  # detector beyond the source, away from the axis
    bad = {
        "off the best-fit circle": _perturbed(base, 3, slice(0, 3), [0.0, 0.0, 2.0]),
        "not perpendicular to its central ray": _perturbed(base, 5, slice(9, 12), [0.2, 0.0, 0.0]),
        "rows \\(u\\)": _perturbed(base, 5, slice(6, 9), [0.0, 0.0, 0.1]),
        "on a line": Geometry(on_line, (16, 16)),
        "behind the source": Geometry(behind, (16, 16)),
    }
    for message, geometry in bad.items():
        with pytest.raises(RgsInputError, match=message):
            fdk(proj, geometry, grid)
    with pytest.raises(RgsInputError, match="at least 3 views"):
        fdk(proj[:2], base.subset([0, 1]), grid)
    parallel = Geometry.circular(full_circle(12), 100.0, 200.0, (16, 16), 2.0, mode="parallel")
    with pytest.raises(RgsInputError, match="one plane"):
        fdk(proj, _perturbed(parallel, 2, slice(0, 3), [0.0, 0.0, 0.3]), grid)
    with pytest.raises(RgsInputError, match="one ray direction"):
        fdk(proj, Geometry(parallel.vectors[:1].expand(12, 12), (16, 16), "parallel"), grid)


def test_bad_inputs(device):
    grid = VolumeGrid.centred((16, 16, 16), 1.0)
    geometry = Geometry.circular(full_circle(12), 100.0, 200.0, (16, 16), 2.0)
    proj = torch.zeros(12, 16, 16, device=device)
    with pytest.raises(RgsInputError, match="shape"):
        fdk(proj[:, :-1], geometry, grid)
    with pytest.raises(RgsInputError, match="NaN"):
        fdk(torch.full_like(proj, float("nan")), geometry, grid)
    with pytest.raises(RgsInputError, match="filter"):
        fdk(proj, geometry, grid, filter="shepp")
    close = Geometry.circular(full_circle(12), 5.0, 200.0, (16, 16), 2.0)
    with pytest.raises(RgsInputError, match="inside the volume"):
        fdk(proj, close, grid)
