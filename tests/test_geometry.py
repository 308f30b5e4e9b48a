"""Geometry model: conventions, constructors, kernel tables, grids and NIfTI affines."""
import math

import numpy as np
import pytest
import torch

from rgs_engine import Geometry, Gaussians, RgsInputError, VolumeGrid, covariance, inverse_covariance
from rgs_engine.core.geometry import reorient_to_grid


def test_circular_tigre_convention():
    geo = Geometry.circular([0.0, math.pi / 2], dso=1000, dsd=1500, det_shape=(4, 6),
                            pixel_size=(2.0, 3.0), det_offset=(1.0, 5.0))
    v = geo.vectors
    assert torch.allclose(v[0, 0:3], torch.tensor([1000.0, 0, 0], dtype=torch.float64))
    assert torch.allclose(v[1, 0:3], torch.tensor([0.0, 1000, 0], dtype=torch.float64), atol=1e-9)
    # detector centre 500 mm behind the axis, shifted 1 mm along rows (-z), 5 mm along columns
    assert torch.allclose(v[0, 3:6], torch.tensor([-500.0, 5.0, -1.0], dtype=torch.float64))
    assert torch.allclose(v[0, 6:9], torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64))
    assert torch.allclose(v[0, 9:12], torch.tensor([0.0, 0.0, -2.0], dtype=torch.float64))
    naf = Geometry.circular([0.0], 1000, 1500, (4, 6), (2.0, 3.0), det_offset=(1.0, 5.0), convention="naf")
    assert torch.allclose(naf.vectors[0, 3:6], torch.tensor([-500.0, 0, 0], dtype=torch.float64))


def test_pixel_centre_formula():
    geo = Geometry.circular([0.3], 800, 1200, (5, 7), (1.0, 2.0))
    pix = geo.pixel_centres()
    d, u, v = geo.vectors[0, 3:6], geo.vectors[0, 6:9], geo.vectors[0, 9:12]
    assert torch.allclose(pix[0, 0, 0], d - 3 * u - 2 * v)
    assert torch.allclose(pix[0, 4, 6], d + 3 * u + 2 * v)
    start, dirs = geo.rays()
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(1, 5, 7, dtype=torch.float64))


def _random_tilted(mode):
    g = torch.Generator().manual_seed(3)
    vec = torch.randn(4, 12, generator=g, dtype=torch.float64)
    vec[:, 0:3] = vec[:, 0:3] * 10 + torch.tensor([600.0, 0, 0]) * (mode == "cone")
    vec[:, 3:6] = vec[:, 3:6] * 10 - torch.tensor([400.0, 0, 0])
    vec[:, 6:9] += torch.tensor([0.0, 2.0, 0.0])
    vec[:, 9:12] += torch.tensor([0.0, 0.0, -2.0])
    if mode == "parallel":
        vec[:, 0:3] += torch.tensor([-5.0, 0, 0])
    return Geometry(vec, (9, 11), mode)


@pytest.mark.parametrize("mode", ["cone", "parallel"])
def test_projection_rows_map_pixels_to_indices(mode):
    geo = _random_tilted(mode)
    rows = geo.projection_rows()
    start, dirs = geo.rays()
    # any point along a pixel's ray projects back to that pixel's (column, row)
    for depth in (50.0, 300.0):
        x = start + depth * dirs
        if mode == "cone":
            t = x - geo.vectors[:, None, None, 0:3]
            nt = (t * rows[:, None, None, 6:9]).sum(-1)
            c = (t * rows[:, None, None, 0:3]).sum(-1) / nt
            r = (t * rows[:, None, None, 3:6]).sum(-1) / nt
        else:
            c = (x * rows[:, None, None, 0:3]).sum(-1) + rows[:, None, None, 9]
            r = (x * rows[:, None, None, 3:6]).sum(-1) + rows[:, None, None, 10]
        cc, rr = torch.meshgrid(torch.arange(11.0), torch.arange(9.0), indexing="xy")
        assert torch.allclose(c, cc.double().expand_as(c), atol=1e-8)
        assert torch.allclose(r, rr.double().expand_as(r), atol=1e-8)
    table = geo.kernel_table("cpu")
    assert table.shape == (4, 24) and table.dtype == torch.float32
    assert geo.kernel_table("cpu") is table  # cached per device


@pytest.mark.parametrize("mode", ["cone", "parallel"])
def test_subset_carries_the_cached_kernel_tables(mode, device):
    geo = _random_tilted(mode)
    fresh = _random_tilted(mode).subset([3, 1])
    assert not fresh._tables  # nothing cached, nothing carried
    table = geo.kernel_table(device)
    for index in ([3, 1], torch.tensor([2]), slice(1, 3)):
        sub = geo.subset(index)
        carried = sub._tables[str(torch.device(device))]
        # the same values, bit for bit, as the subset's own table computed from its vectors
        assert torch.equal(carried, Geometry(sub.vectors, sub.det_shape, mode).kernel_table(device))
        assert carried.device == table.device and sub.kernel_table(device) is carried
        assert sub.mode == mode and sub.det_shape == geo.det_shape and sub.vectors.is_contiguous()
        assert torch.equal(sub.vectors, geo.vectors[index].reshape(-1, 12))
    with pytest.raises(RgsInputError, match="at least one view"):
        geo.subset([])


def test_from_poses_and_biplanar():
    pose = np.eye(4)
    pose[:3, 3] = [0, 0, -700]
    geo = Geometry.from_poses(pose[None], dsd=1200, det_shape=(10, 20), pixel_size=0.5,
                              principal_point=(2.0, -3.0))
    assert torch.allclose(geo.vectors[0, 3:6], torch.tensor([-3.0, 2.0, 500.0], dtype=torch.float64))
    assert torch.allclose(geo.vectors[0, 6:9], torch.tensor([0.5, 0, 0], dtype=torch.float64))
    bi = Geometry.biplanar(dso=1000, dsd=1500, det_shape=(8, 8), pixel_size=1.0, isocentre=(10, 20, 30))
    src = bi.sources
    assert torch.allclose(src[0], torch.tensor([10.0, 1020.0, 30.0], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(src[1], torch.tensor([1010.0, 20.0, 30.0], dtype=torch.float64), atol=1e-9)
    with pytest.raises(RgsInputError, match="orthonormal"):
        Geometry.from_poses(np.eye(4)[None] * 2, 1000, (4, 4), 1.0)


@pytest.mark.parametrize("make, msg", [
    (lambda: Geometry(torch.zeros(3, 11), (4, 4)), r"\(V, 12\)"),
    (lambda: Geometry(torch.full((1, 12), float("nan")), (4, 4)), "NaN"),
    (lambda: Geometry(torch.tensor([[9.0, 0, 0, -9, 0, 0, 0, 1, 0, 0, 2, 0]]), (4, 4)), "parallel"),
    (lambda: Geometry(torch.tensor([[9.0, 0, 0, -9, 0, 0, 0, 1, 0, 0, 0, 1]]), (4, 4), "fan"), "mode"),
    (lambda: Geometry.circular([0.0], dso=1000, dsd=900, det_shape=(4, 4), pixel_size=1), "DSD > DSO"),
    (lambda: Geometry.circular([], dso=1000, dsd=1500, det_shape=(4, 4), pixel_size=1), "angles"),
])
def test_bad_geometry_raises(make, msg):
    with pytest.raises(RgsInputError, match=msg):
        make()


def test_source_inside_volume_is_rejected():
    geo = Geometry.circular([0.0, 1.0], dso=100, dsd=300, det_shape=(4, 4), pixel_size=1)
    with pytest.raises(RgsInputError, match="inside the volume"):
        geo.check_against(VolumeGrid.centred((256, 256, 256), 1.0))
    geo.check_against(VolumeGrid.centred((64, 64, 64), 1.0))


def test_grid_affine_round_trip_and_subgrid():
    grid = VolumeGrid((10, 12, 14), (0.7, 0.8, 2.5), (-3.0, 4.0, 5.0))
    back, perm, flips = VolumeGrid.from_affine(grid.affine(), grid.shape)
    assert back == grid and perm == (0, 1, 2) and flips == (False, False, False)
    sub = grid.sub_grid((2, 3, 4), (4, 4, 4))
    assert torch.allclose(sub.voxel_centres()[0, 0, 0], grid.voxel_centres()[2, 3, 4])
    with pytest.raises(RgsInputError, match="does not fit"):
        grid.sub_grid((8, 0, 0), (4, 4, 4))
    assert VolumeGrid.from_dict(grid.to_dict()) == grid


def test_from_affine_signed_permutation_matches_world_positions():
    # an LPS-style, axis-permuted affine: array axis 0 -> world z, 1 -> -x, 2 -> -y
    aff = np.array([[0, -0.7, 0, 100.0], [0, 0, -0.8, 50.0], [2.5, 0, 0, -30.0], [0, 0, 0, 1]])
    shape = (5, 6, 7)
    arr = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    grid, perm, flips = VolumeGrid.from_affine(aff, shape)
    vol = reorient_to_grid(arr, perm, flips)
    assert vol.shape == grid.shape == (6, 7, 5)
    world = grid.voxel_centres().numpy()
    # every grid voxel holds the array value of the voxel at the same world position
    inv = np.linalg.inv(aff)
    for idx in [(0, 0, 0), (5, 6, 4), (2, 3, 1)]:
        ijk = np.rint(inv @ np.append(world[idx], 1.0))[:3].astype(int)
        assert vol[idx] == arr[tuple(ijk)]
    assert np.all(np.asarray(grid.spacing) > 0)
    tvol = reorient_to_grid(torch.from_numpy(arr), perm, flips)
    assert np.array_equal(tvol.numpy(), vol)
    oblique = np.diag([1.0, 1, 1, 1])
    oblique[:2, :2] = [[math.cos(0.3), -math.sin(0.3)], [math.sin(0.3), math.cos(0.3)]]
    with pytest.raises(RgsInputError, match="oblique"):
        VolumeGrid.from_affine(oblique, shape)


def test_gaussian_activations_and_covariances():
    n = 6
    scales = torch.rand(n, 3, dtype=torch.float64) * 2 + 0.5
    quats = torch.randn(n, 4, dtype=torch.float64)
    dens = torch.rand(n, dtype=torch.float64) * 0.1
    g = Gaussians.from_physical(torch.randn(n, 3, dtype=torch.float64), scales, quats, dens, 0.1, 5.0)
    assert torch.allclose(g.scales, scales) and torch.allclose(g.densities, dens)
    assert torch.allclose(g.quats.norm(dim=1), torch.ones(n, dtype=torch.float64))
    cov = covariance(scales, quats)
    assert torch.allclose(cov @ inverse_covariance(scales, quats), torch.eye(3, dtype=torch.float64).expand(n, 3, 3))
    assert torch.allclose(torch.linalg.det(cov), (scales ** 2).prod(1))
    g.requires_grad_()
    g.scales.sum().backward()
    assert g.scale_raw.grad is not None and bool((g.scales < 5.0).all())


def test_unravel_matches_numpy():
    """geometry.unravel: C-order flat indices to (N, D) indices, as numpy.unravel_index."""

    from rgs_engine.core.geometry import unravel

    for shape in [(4, 5, 6), (7,), (3, 1, 2, 5)]:
        flat = torch.randperm(int(np.prod(shape)))
        want = np.stack(np.unravel_index(flat.numpy(), shape), 1)
        got = unravel(flat, shape)
        assert got.dtype == torch.int64 and np.array_equal(got.numpy(), want)
