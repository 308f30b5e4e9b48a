"""Isosurfaces (marching cubes), mesh files, surface sampling and surface distances (rgs_engine.io.mesh)."""
import math

import numpy as np
import pytest
import torch

from rgs_engine.io import mesh
from rgs_engine.core.errors import RgsInputError
from rgs_engine.core.geometry import VolumeGrid

CENTRE = np.array([3.0, -2.0, 1.5])
RADIUS = 10.0


def _sphere_grid() -> VolumeGrid:
    """Anisotropic grid (1.0 x 1.2 x 0.9 mm) around CENTRE, covering the sphere with margin."""
    return VolumeGrid.centred((28, 24, 30), (1.0, 1.2, 0.9), CENTRE + [0.3, -0.2, 0.1])


def _sphere_sdf(grid: VolumeGrid) -> torch.Tensor:
    """RADIUS - distance to CENTRE (mm): positive inside."""
    return RADIUS - (grid.voxel_centres() - torch.from_numpy(CENTRE)).norm(dim=-1)


def _fibonacci_sphere(n: int, radius: float) -> np.ndarray:
    """``n`` nearly uniform points on a sphere about the origin."""
    k = np.arange(n) + 0.5
    z = 1 - 2 * k / n
    phi = k * math.pi * (3 - math.sqrt(5))
    r = np.sqrt(1 - z ** 2)
    return radius * np.stack([r * np.cos(phi), r * np.sin(phi), z], 1)


def _edges(faces: np.ndarray) -> np.ndarray:
    return np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])


def test_sphere_isosurface_is_accurate_watertight_and_outward():
    grid = _sphere_grid()
    v, f = mesh.isosurface(_sphere_sdf(grid), grid, 0.0)
    assert v.dtype == np.float64 and f.dtype == np.int64 and f.shape[1] == 3
    dist = np.linalg.norm(v - CENTRE, axis=1)
    assert np.abs(dist - RADIUS).max() < 0.5 * min(grid.spacing)  # world mm, half a voxel
    assert abs(mesh.surface_area(v, f) / (4 * math.pi * RADIUS ** 2) - 1) < 0.02
    assert abs(mesh.enclosed_volume(v, f) / (4 / 3 * math.pi * RADIUS ** 3) - 1) < 0.02  # > 0: outward
    directed = {tuple(e) for e in _edges(f).tolist()}
    assert len(directed) == 3 * len(f)  # no directed edge twice: consistent orientation
    assert all((b, a) in directed for a, b in directed)  # every edge shared by two triangles
    assert len(v) - len(directed) // 2 + len(f) == 2  # Euler characteristic of a sphere
    normals = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    assert np.all(np.einsum("ij,ij->i", normals, v[f].mean(1) - CENTRE) > 0)


def test_partial_volume_ball_surface_within_half_a_voxel():
    grid = _sphere_grid()
    fraction = (0.5 + _sphere_sdf(grid)).clamp(0, 1)  # one-mm ramp across the surface
    v, f = mesh.isosurface(fraction.numpy(), grid, 0.5)
    assert np.abs(np.linalg.norm(v - CENTRE, axis=1) - RADIUS).max() < 0.5 * max(grid.spacing)
    assert abs(mesh.enclosed_volume(v, f) / (4 / 3 * math.pi * RADIUS ** 3) - 1) < 0.02


def test_border_is_capped_half_a_voxel_out_and_empty_cases():
    grid = VolumeGrid((4, 5, 6), (1.0, 2.0, 0.5), (-3.0, 7.0, 1.0))
    full = torch.ones(grid.shape)
    v, f = mesh.isosurface(full, grid, 0.0)
    lo, hi = grid.bounds()
    np.testing.assert_allclose(v.min(0), lo, atol=1e-12)
    np.testing.assert_allclose(v.max(0), hi, atol=1e-12)
    # flat faces on the box, edges and corners bevelled by the diagonal grid edges
    inner = np.prod(grid.size_mm - np.asarray(grid.spacing))  # box of the voxel centres
    assert inner < mesh.enclosed_volume(v, f) < np.prod(grid.size_mm)
    directed = {tuple(e) for e in _edges(f).tolist()}
    assert all((b, a) in directed for a, b in directed)
    for vol, closed in ((full, False), (torch.zeros(grid.shape), True)):
        v, f = mesh.isosurface(vol, grid, 0.5, closed=closed)
        assert v.shape == (0, 3) and f.shape == (0, 3)
    with pytest.raises(RgsInputError, match="shape"):
        mesh.isosurface(torch.zeros(3, 3, 3), grid, 0.5)
    with pytest.raises(RgsInputError, match="NaN"):
        mesh.isosurface(torch.full(grid.shape, float("nan")), grid, 0.5)


def test_obj_and_ply_round_trip_atomic_no_clobber(tmp_path):
    grid = _sphere_grid()
    v, f = mesh.isosurface(_sphere_sdf(grid), grid, 0.0)
    ply = mesh.write_ply(tmp_path / "s.ply", v, f)
    v2, f2 = mesh.read_ply(ply)
    np.testing.assert_array_equal(f2, f)
    np.testing.assert_allclose(v2, v, atol=1e-5)  # float32 coordinates
    lines = [np.arange(0, 5), np.arange(7, 9)]
    obj = mesh.write_obj(tmp_path / "s.obj", v, f, lines=lines)
    v3, f3, l3 = mesh.read_obj(obj)
    np.testing.assert_array_equal(f3, f)
    np.testing.assert_allclose(v3, v, rtol=1e-8)
    assert [x.tolist() for x in l3] == [x.tolist() for x in lines]
    with pytest.raises(RgsInputError, match="exists: pass --force"):
        mesh.write_ply(ply, v, f)
    mesh.write_ply(ply, v[:3], np.array([[0, 1, 2]]), force=True)
    assert mesh.read_ply(ply)[1].tolist() == [[0, 1, 2]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.obj", "s.ply"]  # no temporary left
    ply.write_bytes(ply.read_bytes()[:-3])
    with pytest.raises(RgsInputError, match="truncated"):
        mesh.read_ply(ply)
    with pytest.raises(RgsInputError, match="index"):
        mesh.write_obj(tmp_path / "bad.obj", v, np.array([[0, 1, len(v)]]))


def test_sample_surface_is_on_the_mesh_and_uniform():
    grid = _sphere_grid()
    v, f = mesh.isosurface(_sphere_sdf(grid), grid, 0.0)
    pts = mesh.sample_surface(v, f, 20000, seed=3)
    assert pts.shape == (20000, 3)
    assert np.abs(np.linalg.norm(pts - CENTRE, axis=1) - RADIUS).max() < 0.5
    np.testing.assert_allclose(pts.mean(0), CENTRE, atol=0.3)  # uniform over the sphere
    np.testing.assert_array_equal(pts, mesh.sample_surface(v, f, 20000, seed=3))
    with pytest.raises(RgsInputError):
        mesh.sample_surface(v, f[:0], 10)


def test_chamfer_and_hd95_of_concentric_spheres(monkeypatch):
    inner, outer = _fibonacci_sphere(3000, 10.0), _fibonacci_sphere(4000, 12.0)
    d = mesh.surface_distances(inner, outer)
    assert d["chamfer_mm"] == pytest.approx(2.0, rel=0.01)
    assert d["chamfer_sum_mm"] == pytest.approx(2 * d["chamfer_mm"])
    assert d["hd95_mm"] == pytest.approx(2.0, rel=0.03)  # 0.65 mm point spacing
    a, b = inner[:500], outer[:700]
    small = mesh.surface_distances(a, b)
    assert mesh.chamfer_distance(torch.from_numpy(a), b) == pytest.approx(small["chamfer_mm"], rel=1e-12)
    assert mesh.hd95(b, a) == pytest.approx(small["hd95_mm"], rel=1e-12)
    assert mesh.chamfer_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    brute = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min(1)
    monkeypatch.setattr(mesh, "_PAIR_BUDGET", 500)  # one row at a time, two column blocks
    np.testing.assert_allclose(mesh.nearest_distances(a, b).numpy(), brute, rtol=1e-10)
    with pytest.raises(RgsInputError, match="point array"):
        mesh.chamfer_distance(inner[:, :2], outer)
    with pytest.raises(RgsInputError, match="NaN"):
        mesh.hd95(np.full((3, 3), np.nan), outer)
