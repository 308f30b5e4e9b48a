"""Joseph projector: kernel vs float64 reference, exact adjoint, physics, input checks."""
import math

import pytest
import torch

from rgs_engine import Geometry, RgsInputError, VolumeGrid
from rgs_engine._torch_impl import projector as ref
from rgs_engine.core.projector import backproject, project

DET = (16, 20)
ANGLES = torch.tensor([0.3, 1.35, 2.2, 3.9, 5.1])  # avoids 45-degree ties of the dominant axis
CUBE = VolumeGrid.centred((24, 24, 24), 1.0)
ANISO = VolumeGrid.centred((24, 20, 16), (1.0, 1.3, 0.8), centre=(2.0, -3.0, 1.5))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def rotate(x: torch.Tensor, axis: torch.Tensor, angle: float) -> torch.Tensor:
    """Rodrigues rotation of rows of x (V, 3) about unit rows of ``axis`` (V, 3)."""
    c, s = math.cos(angle), math.sin(angle)
    return x * c + torch.linalg.cross(axis, x) * s + axis * (axis * x).sum(1, keepdim=True) * (1 - c)


def tilted(geometry: Geometry) -> Geometry:
    """Detector spun 20 deg in its plane, tilted 15 deg about its rows, shifted and sheared."""
    vec = geometry.vectors.clone()
    u, v = vec[:, 6:9], vec[:, 9:12]
    normal = torch.linalg.cross(u, v)
    normal = normal / normal.norm(dim=1, keepdim=True)
    u, v = rotate(u, normal, 0.35), rotate(v, normal, 0.35)
    v = rotate(v, u / u.norm(dim=1, keepdim=True), 0.26) + 0.2 * u
    vec[:, 3:6] += 3.0 * u / u.norm(dim=1, keepdim=True) - 4.0 * v / v.norm(dim=1, keepdim=True)
    vec[:, 6:9], vec[:, 9:12] = u, v
    return Geometry(vec, geometry.det_shape, geometry.mode)


def oblique_parallel() -> Geometry:
    """Parallel rays not perpendicular to the detector and not in one plane."""
    g = Geometry.circular(ANGLES, 60.0, 100.0, DET, 2.4, mode="parallel")
    vec = g.vectors.clone()
    vec[:, 0:3] += torch.tensor([[0.2, -0.1, 0.35]])
    return Geometry(vec, DET, "parallel")


def poses() -> Geometry:
    """Cone views looking along +x, -y and -z (one per dominant axis), rolled."""
    looks = [((1.0, 0.0, 0.0), (0.0, 0.3, 1.0)), ((0.1, -1.0, 0.2), (1.0, 0.0, 0.0)),
             ((0.2, 0.1, -1.0), (0.0, 1.0, 0.0))]
    mats = []
    for ez, ex in looks:
        ez = torch.tensor(ez, dtype=torch.float64)
        ez = ez / ez.norm()
        ex = torch.tensor(ex, dtype=torch.float64)
        ex = ex - (ex @ ez) * ez
        ex = ex / ex.norm()
        m = torch.eye(4, dtype=torch.float64)
        m[:3, 0], m[:3, 1], m[:3, 2] = ex, torch.linalg.cross(ez, ex), ez
        m[:3, 3] = -70.0 * ez
        mats.append(m)
    return Geometry.from_poses(torch.stack(mats), 120.0, DET, (3.6, 3.2), principal_point=(2.0, -3.0))


def grazing() -> Geometry:
    """Sources 0.3 mm above the box's +y face looking along +-x: the rays run through the
    interpolation support behind the source too, which the t > 0 rule must cut."""
    vec = [[0.0, 12.3, 0.0, 60.0, 10.0, 0.0, 0.0, 0.4, 0.0, 0.0, 0.0, -2.0],
           [3.0, 12.3, -2.0, -60.0, 10.0, 0.0, 0.0, -0.4, 0.0, 0.0, 0.0, -2.0]]
    return Geometry(torch.tensor(vec, dtype=torch.float64), DET, "cone")


CASES = {
    "cone": (lambda: Geometry.circular(ANGLES, 60.0, 110.0, DET, 4.0), CUBE),
    "parallel": (lambda: Geometry.circular(ANGLES, 60.0, 110.0, DET, 2.4, mode="parallel"), CUBE),
    "cone-tilted-offset": (lambda: tilted(Geometry.circular(ANGLES, 60.0, 110.0, DET, 4.0)), CUBE),
    "parallel-oblique": (oblique_parallel, CUBE),
    "cone-poses-aniso": (poses, ANISO),
    "cone-aniso-offcentre": (lambda: Geometry.circular(ANGLES, 70.0, 120.0, DET, (3.0, 4.0),
                                                       det_offset=(2.5, -3.0)), ANISO),
    "cone-grazing-source": (grazing, CUBE),
    "parallel-aniso-offcentre": (lambda: tilted(Geometry.circular(ANGLES, 60.0, 100.0, DET, 2.4,
                                                                  mode="parallel")), ANISO),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(device, case):
    make, grid = CASES[case]
    geometry = make()
    x = torch.rand(grid.shape, dtype=torch.float64, device=device)
    got = project(x, grid, geometry)
    want = ref.project(x, grid, geometry)
    assert got.dtype == torch.float32 and got.shape == (geometry.num_views, *DET)
    assert float(want.max()) > 0
    assert rel(got, want) < 1e-3


@pytest.mark.parametrize("case", ["cone-tilted-offset", "parallel-oblique", "cone-poses-aniso"])
def test_vjp_matches_reference(device, case):
    make, grid = CASES[case]
    geometry = make()
    x = torch.rand(grid.shape, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.randn(geometry.num_views, *DET, dtype=torch.float64, device=device)
    (got,) = torch.autograd.grad((project(x, grid, geometry) * y).sum(), x)
    (want,) = torch.autograd.grad((ref.project(x, grid, geometry) * y).sum(), x)
    assert got.dtype == torch.float64
    assert rel(got, want) < 1e-3


@pytest.mark.parametrize("case", ["cone", "parallel", "cone-poses-aniso", "parallel-aniso-offcentre"])
def test_adjoint_identity(device, case):
    make, grid = CASES[case]
    geometry = make()
    x = torch.rand(grid.shape, device=device)
    y = torch.rand(geometry.num_views, *DET, device=device)
    lhs = float((project(x, grid, geometry).double() * y.double()).sum())
    rhs = float((x.double() * backproject(y, grid, geometry).double()).sum())
    assert abs(lhs - rhs) < 1e-4 * abs(rhs)


def test_backproject_gradient_is_project(device):
    geometry = CASES["cone"][0]()
    x = torch.rand(CUBE.shape, device=device)
    y = torch.rand(geometry.num_views, *DET, device=device, requires_grad=True)
    (grad,) = torch.autograd.grad((backproject(y, CUBE, geometry) * x).sum(), y)
    assert torch.allclose(grad, project(x, CUBE, geometry), rtol=1e-5, atol=1e-5)


def ball(grid: VolumeGrid, radius: float, mu: float, sub: int = 4) -> torch.Tensor:
    """Uniform ball at the grid centre, partial-volume voxelised with sub^3 samples per voxel."""
    centres = grid.voxel_centres() - torch.from_numpy(grid.centre)
    out = torch.zeros(grid.shape, dtype=torch.float64)
    offsets = ((torch.arange(sub, dtype=torch.float64) + 0.5) / sub - 0.5)
    spacing = torch.tensor(grid.spacing, dtype=torch.float64)
    for o in torch.cartesian_prod(offsets, offsets, offsets):
        out += ((centres + o * spacing).norm(dim=-1) <= radius).double()
    return mu * out / sub ** 3


@pytest.mark.parametrize("mode", ["cone", "parallel"])
def test_ball_chords(device, mode):
    grid = VolumeGrid.centred((64, 64, 64), 0.5)
    radius, mu = 12.0, 0.02
    geometry = Geometry.circular(ANGLES[:2], 60.0, 100.0, (9, 9), 2.5, mode=mode)
    proj = project(ball(grid, radius, mu).to(device), grid, geometry).double().cpu()
    start, dirs = geometry.rays()
    foot = start - (start * dirs).sum(-1, keepdim=True) * dirs  # closest point to the centre
    dist = foot.norm(dim=-1)
    chord = mu * 2 * torch.sqrt((radius ** 2 - dist ** 2).clamp(min=0))
    inner = dist < 0.8 * radius
    assert torch.allclose(proj[:, 4, 4], torch.full((2,), 2 * radius * mu, dtype=torch.float64), rtol=0.01)
    assert float(((proj - chord)[inner] / chord[inner]).abs().max()) < 0.03


def test_cube_along_axes(device):
    """A cube of 8 voxels a side seen along x, y and z: side * mu exactly inside, 0 outside."""
    spacing = (0.9, 1.3, 0.7)
    grid = VolumeGrid.centred((16, 16, 16), spacing, centre=(1.0, 2.0, -1.0))
    mu = 0.03
    x = torch.zeros(grid.shape, device=device)
    x[4:12, 4:12, 4:12] = mu
    e = torch.eye(3, dtype=torch.float64)
    vec = []
    for ray, u, v in ((0, 1, 2), (1, 0, 2), (2, 0, 1)):  # columns / rows step one voxel
        vec.append(torch.cat([e[ray], torch.from_numpy(grid.centre) + 40.0 * e[ray],
                              spacing[u] * e[u], spacing[v] * e[v]]))
    geometry = Geometry(torch.stack(vec), (16, 16), "parallel")
    proj = project(x, grid, geometry).cpu()
    want = torch.zeros(3, 16, 16)
    for k in range(3):
        want[k, 4:12, 4:12] = 8 * spacing[k] * mu
    assert torch.allclose(proj, want, atol=1e-6)


def test_bad_inputs(device):
    geometry = CASES["cone"][0]()
    x = torch.rand(CUBE.shape, device=device)
    with pytest.raises(RgsInputError, match="shape"):
        project(x[:-1], CUBE, geometry)
    with pytest.raises(RgsInputError, match="NaN"):
        project(torch.full(CUBE.shape, float("nan"), device=device), CUBE, geometry)
    with pytest.raises(RgsInputError, match="dtype"):
        project(x.to(torch.int32), CUBE, geometry)
    with pytest.raises(RgsInputError, match="shape"):
        backproject(torch.rand(2, *DET, device=device), CUBE, geometry)
    with pytest.raises(RgsInputError, match="VolumeGrid"):
        project(x, CUBE.to_dict(), geometry)
    close = Geometry.circular(ANGLES, 10.0, 110.0, DET, 2.0)  # source inside the 24 mm box
    with pytest.raises(RgsInputError, match="inside the volume"):
        project(x, CUBE, close)
    with pytest.raises(RgsInputError, match="inside the volume"):
        backproject(torch.rand(5, *DET, device=device), CUBE, close)
