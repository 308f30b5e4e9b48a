"""Projection data sets: the rgs .h5 format (round trip, every corruption), view selection,
and the R2-Gaussian folder / NAF pickle readers checked against analytic projections."""
import json
import math
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from rgs_engine.sim.scan import project_views
from rgs_engine.core.errors import RgsInputError
from rgs_engine.core.geometry import Geometry, VolumeGrid
from rgs_engine.io.projections import (ProjectionData, load_projections, save_projections)

GRID = VolumeGrid.centred((24, 24, 24), 2.0, centre=(1.0, -2.0, 3.0))
ANGLES = np.arange(10) * 2 * math.pi / 10


def _data(with_extras: bool = True) -> ProjectionData:
    geo = Geometry.circular(ANGLES, 150.0, 220.0, (32, 28), 2.5, isocentre=GRID.centre)
    gt = torch.rand(GRID.shape) * 0.02
    proj = project_views(gt, GRID, geo).cpu()
    extras = {}
    if with_extras:
        test_geo = Geometry.circular(ANGLES[:3] + 0.1, 150.0, 220.0, (32, 28), 2.5, isocentre=GRID.centre)
        extras = dict(test_projections=project_views(gt, GRID, test_geo).cpu(), test_geometry=test_geo,
                      time=torch.arange(10, dtype=torch.float64) * 0.5)
    return ProjectionData(proj, geo, GRID, ground_truth=gt, source="memory",
                          attributes={"parameters": {"views": 10}, "note": "hello"}, **extras)


@pytest.fixture
def saved(tmp_path, device) -> Path:
    return save_projections(tmp_path / "scan.h5", _data())


# --------------------------------------------------------------------------------------
# .h5 round trip and view selection
# --------------------------------------------------------------------------------------
def test_round_trip_keeps_everything(saved):
    data, back = _data(), load_projections(saved)
    assert back.source == str(saved)
    assert torch.equal(back.projections, load_projections(saved).projections)
    assert back.projections.dtype == torch.float32 and back.projections.shape == (10, 32, 28)
    assert back.geometry.mode == "cone" and back.geometry.det_shape == (32, 28)
    assert torch.equal(back.geometry.vectors, data.geometry.vectors)
    assert back.grid == GRID
    assert back.ground_truth.shape == GRID.shape and back.ground_truth.dtype == torch.float32
    assert back.test_projections.shape == (3, 32, 28) and back.test_geometry.num_views == 3
    assert back.time.dtype == torch.float64 and back.time[-1] == 4.5
    assert back.attributes["parameters"] == {"views": 10} and back.attributes["note"] == "hello"
    assert back.is_circular
    # the stored projections are the ground truth's: the geometry survived exactly
    torch.testing.assert_close(project_views(back.ground_truth, back.grid, back.geometry).cpu(),
                               back.projections)
    with h5py.File(saved) as f:
        assert f.attrs["format"] == "rgs-projections" and f.attrs["version"] == 1
        assert f["projections"].dtype == np.float32 and f["geometry/vectors"].dtype == np.float64
        assert f["geometry/vectors"].attrs["mode"] == "cone"


def test_save_refuses_to_overwrite_and_leaves_no_temp_files(saved):
    before = saved.read_bytes()
    with pytest.raises(RgsInputError, match="exists: pass --force"):
        save_projections(saved, _data(with_extras=False))
    assert saved.read_bytes() == before
    save_projections(saved, _data(with_extras=False), force=True)
    assert load_projections(saved).test_projections is None
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_select_views_spreads_evenly_and_refuses_too_many(saved):
    data = load_projections(saved)
    five = data.select_views(5)
    assert torch.equal(five.geometry.vectors, data.geometry.vectors[[0, 2, 4, 6, 8]])
    assert torch.equal(five.projections, data.projections[[0, 2, 4, 6, 8]])
    assert torch.equal(five.time, data.time[[0, 2, 4, 6, 8]])
    assert torch.equal(five.test_projections, data.test_projections)
    assert torch.equal(five.ground_truth, data.ground_truth) and five.grid == data.grid
    three = data.select_views(3).geometry.vectors
    assert torch.equal(three, data.geometry.vectors[[0, 3, 6]])
    assert data.select_views(10).num_views == 10
    with pytest.raises(RgsInputError, match=r"asked for 11 views but .* has only 10"):
        data.select_views(11)
    with pytest.raises(RgsInputError, match="positive integer"):
        data.select_views(0)


def test_is_circular_false_for_scattered_sources(device):
    rng = np.random.default_rng(1)
    poses = np.tile(np.eye(4), (6, 1, 1))
    for k in range(6):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        q[:, 2] *= np.sign(np.linalg.det(q))
        poses[k, :3, :3] = q
        poses[k, :3, 3] = np.asarray(GRID.centre) - 150 * q[:, 2]
    geo = Geometry.from_poses(poses, 220.0, (8, 8), 8.0)
    data = ProjectionData(torch.zeros(6, 8, 8), geo, GRID)
    assert not data.is_circular


# --------------------------------------------------------------------------------------
# .h5 corruption: every case is one RgsInputError naming the problem
# --------------------------------------------------------------------------------------
def _replace(f, key, value):
    attrs = dict(f[key].attrs)
    del f[key]
    f[key] = value
    f[key].attrs.update(attrs)


CORRUPTIONS = {
    "wrong format attribute": (lambda f: f.attrs.__setitem__("format", "other"), "attribute 'format'"),
    "newer version": (lambda f: f.attrs.__setitem__("version", 2), "version 2 is not supported"),
    "missing projections": (lambda f: f.__delitem__("projections"), "missing dataset /projections"),
    "missing vectors": (lambda f: f.__delitem__("geometry/vectors"), "missing dataset /geometry/vectors"),
    "missing volume": (lambda f: f.__delitem__("volume"), "missing group /volume"),
    "missing spacing": (lambda f: f["volume"].attrs.__delitem__("spacing"), "lacks attribute 'spacing'"),
    "bad origin": (lambda f: f["volume"].attrs.__setitem__("origin", [0.0, np.nan, 0.0]),
                   "'origin' must be 3 finite numbers"),
    "2-D projections": (lambda f: _replace(f, "projections", np.zeros((10, 32), np.float32)),
                        "/projections has shape (10, 32), expected 3 dimensions"),
    "integer projections": (lambda f: _replace(f, "projections", np.zeros((10, 32, 28), np.int16)),
                            "dtype int16"),
    "vectors of 11": (lambda f: _replace(f, "geometry/vectors", np.zeros((10, 11))), "expected (V, 12)"),
    "bad mode": (lambda f: f["geometry/vectors"].attrs.__setitem__("mode", "fan"), "'mode' is 'fan'"),
    "missing mode": (lambda f: f["geometry/vectors"].attrs.__delitem__("mode"), "lacks attribute 'mode'"),
    "NaN projections": (lambda f: f["projections"].__setitem__((3, 4, 5), np.nan),
                        "/projections contains NaN or Inf"),
    "Inf vectors": (lambda f: f["geometry/vectors"].__setitem__((2, 0), np.inf),
                    "/geometry/vectors contains NaN or Inf"),
    "view count mismatch": (lambda f: _replace(f, "geometry/vectors", f["geometry/vectors"][:9]),
                            "/projections has 10 views but /geometry/vectors has 9 rows"),
    "ground truth shape": (lambda f: _replace(f, "volume/ground_truth", np.zeros((24, 24, 23), np.float32)),
                           "/volume/ground_truth has shape (24, 24, 23)"),
    "time length": (lambda f: _replace(f, "time", np.zeros(7)), "/time has 7 entries but there are 10 views"),
    "test without geometry": (lambda f: f.__delitem__("test/geometry"), "/test needs both"),
    "test view mismatch": (lambda f: _replace(f, "test/geometry/vectors", f["test/geometry/vectors"][:2]),
                           "/test/projections has 3 views but /test/geometry/vectors has 2"),
    "source inside the volume": (lambda f: f["volume"].attrs.__setitem__("spacing", [20.0, 20.0, 20.0]),
                                 "lies inside the volume box"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_files_raise_one_clear_error(saved, case):
    mutate, text = CORRUPTIONS[case]
    with h5py.File(saved, "r+") as f:
        mutate(f)
    with pytest.raises(RgsInputError) as info:
        load_projections(saved)
    message = str(info.value)
    assert text in message and str(saved) in message and "\n" not in message


def test_truncated_and_foreign_files(saved, tmp_path):
    raw = saved.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(RgsInputError, match="truncated or corrupt.*generate it again"):
        load_projections(cut)
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5 at all\n")
    with pytest.raises(RgsInputError, match="not an HDF5 file"):
        load_projections(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(RgsInputError, match="not an rgs projection file"):
        load_projections(other)
    with pytest.raises(RgsInputError, match="no such file"):
        load_projections(tmp_path / "missing.h5")
    with pytest.raises(RgsInputError, match="unknown projection data type"):
        load_projections(shutil.copy(saved, tmp_path / "scan.txt"))
    with pytest.raises(RgsInputError, match="without meta_data.json"):
        load_projections(tmp_path)


def test_in_memory_checks(device):
    data = _data(with_extras=False)
    with pytest.raises(RgsInputError, match=r"projections have shape \(9, 32, 28\)"):
        ProjectionData(data.projections[:9], data.geometry, GRID)
    with pytest.raises(RgsInputError, match="ground truth has shape"):
        ProjectionData(data.projections, data.geometry, GRID, ground_truth=torch.zeros(3, 3, 3))
    with pytest.raises(RgsInputError, match="come together"):
        ProjectionData(data.projections, data.geometry, GRID, test_projections=data.projections)
    bad = data.projections.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(RgsInputError, match="NaN"):
        ProjectionData(bad, data.geometry, GRID)


# --------------------------------------------------------------------------------------
# Foreign formats, against analytic projections of Gaussian blobs
# --------------------------------------------------------------------------------------
# two Gaussian blobs off the centre in x, y and z (so a mirrored axis or a wrong angle shows)
BLOBS = ((np.array([0.25, -0.15, 0.3]), 0.2, 1.0), (np.array([-0.2, 0.25, -0.3]), 0.17, 0.6))


def _blob_volume(grid: VolumeGrid, scale_mm: float, amplitude: float) -> np.ndarray:
    """Blobs (positions and widths in units of ``scale_mm``) sampled at voxel centres."""
    x = grid.voxel_centres().numpy()
    out = np.zeros(grid.shape)
    for centre, sigma, weight in BLOBS:
        d2 = ((x - centre * scale_mm) ** 2).sum(-1)
        out += weight * amplitude * np.exp(-d2 / (2 * (sigma * scale_mm) ** 2))
    return out.astype(np.float32)


def _blob_projections(angles, dso, dsd, n_det, d_det, scale_mm, amplitude) -> np.ndarray:
    """Exact line integrals through the documented TIGRE/NAF pixel layout (stored order).

    Source DSO (cos a, sin a, 0); stored pixel (r, c) at (DSO - DSD)(cos a, sin a, 0)
    + (c - (W - 1) / 2) dU (-sin a, cos a, 0) + (r - (H - 1) / 2) dV (0, 0, -1).
    A Gaussian A exp(-|x - m|^2 / 2 s^2) integrates to A s sqrt(2 pi) exp(-d^2 / 2 s^2)
    along a line at distance d from m.
    """
    h, w = n_det
    rows = (np.arange(h) - (h - 1) / 2) * d_det[0]
    cols = (np.arange(w) - (w - 1) / 2) * d_det[1]
    out = np.zeros((len(angles), h, w))
    for k, a in enumerate(angles):
        radial = np.array([math.cos(a), math.sin(a), 0.0])
        col_dir = np.array([-math.sin(a), math.cos(a), 0.0])
        src = dso * radial
        pix = ((dso - dsd) * radial + cols[None, :, None] * col_dir
               + rows[:, None, None] * np.array([0.0, 0.0, -1.0]))
        ray = pix - src
        ray /= np.linalg.norm(ray, axis=-1, keepdims=True)
        for centre, sigma, weight in BLOBS:
            m, s = centre * scale_mm, sigma * scale_mm
            rel = m - src
            d2 = (rel ** 2).sum() - (ray @ rel) ** 2
            out[k] += weight * amplitude * s * math.sqrt(2 * math.pi) * np.exp(-d2 / (2 * s * s))
    return out.astype(np.float32)


def _check_against_analytic(data, expected, rel=0.05):
    got = project_views(data.ground_truth.to(device=torch.device("cpu")), data.grid, data.geometry).cpu()
    err = float((got - torch.from_numpy(expected)).abs().max() / float(np.abs(expected).max()))
    assert err < rel, f"projection mismatch {err:.3f}"
    flipped = float((got - torch.from_numpy(expected[:, ::-1].copy())).abs().max() / float(np.abs(expected).max()))
    assert flipped > 0.3  # the check can tell a vertical flip


def _r2_folder(root: Path, with_d: bool) -> Path:
    """An R2-Gaussian case: box [-1, 1]^3 (their units), DSO 5, DSD 7, 32x36 detector."""
    n_vox, n_det = [24, 24, 24], [32, 36]
    scanner = {"mode": "cone", "filter": None, "DSD": 7.0, "DSO": 5.0, "nDetector": n_det,
               "nVoxel": n_vox, "offOrigin": [0, 0, 0], "offDetector": [0, 0], "accuracy": 0.5,
               "totalAngle": 360.0, "startAngle": 0.0, "noise": False}
    if with_d:
        scanner.update(dDetector=[4.0 / 32, 4.5 / 36], dVoxel=[2 / 24] * 3)
    else:
        scanner.update(sDetector=[4.0, 4.5], sVoxel=[2.0, 2.0, 2.0])
    grid = VolumeGrid.centred(n_vox, 2 / 24)
    root.mkdir()
    np.save(root / "vol_gt.npy", _blob_volume(grid, 1.0, 1.0))  # [x, y, z]
    meta = {"scanner": scanner, "vol": "vol_gt.npy", "bbox": [[-1, -1, -1], [1, 1, 1]]}
    for split, angles in (("proj_train", ANGLES[:6] + 0.3), ("proj_test", [0.05, 2.0])):
        (root / split).mkdir()
        projs = _blob_projections(angles, 5.0, 7.0, n_det, [4.0 / 32, 4.5 / 36], 1.0, 1.0)
        meta[split] = []
        for i, (p, a) in enumerate(zip(projs, angles)):
            name = f"{split}/{split}_{i:04d}.npy"
            np.save(root / name, p)
            meta[split].append({"file_path": name, "angle": float(a)})
    (root / "meta_data.json").write_text(json.dumps(meta, indent=1))
    return root


@pytest.mark.parametrize("with_d", [True, False])
def test_r2_gaussian_folder_matches_analytic_projections(tmp_path, device, with_d):
    folder = _r2_folder(tmp_path / "case", with_d)
    data = load_projections(folder)
    assert data.num_views == 6 and data.geometry.det_shape == (32, 36)
    assert data.grid.shape == (24, 24, 24) and abs(data.grid.spacing[0] - 2 / 24) < 1e-12
    np.testing.assert_allclose(data.geometry.sources[0].numpy(), 5 * np.array([math.cos(0.3), math.sin(0.3), 0]))
    assert data.test_projections.shape == (2, 32, 36) and data.is_circular
    _check_against_analytic(data, np.stack([np.load(folder / f"proj_train/proj_train_{i:04d}.npy")
                                            for i in range(6)]))
    test_got = project_views(data.ground_truth, data.grid, data.test_geometry).cpu()
    assert float((test_got - data.test_projections).abs().max()) < 0.05 * float(data.test_projections.max())
    assert torch.equal(load_projections(folder / "meta_data.json").projections, data.projections)


def test_r2_gaussian_folder_errors(tmp_path, device):
    folder = _r2_folder(tmp_path / "case", True)
    meta = json.loads((folder / "meta_data.json").read_text())
    broken = dict(meta, scanner={k: v for k, v in meta["scanner"].items() if k != "DSO"})
    (folder / "meta_data.json").write_text(json.dumps(broken))
    with pytest.raises(RgsInputError, match="missing key 'DSO'"):
        load_projections(folder)
    (folder / "meta_data.json").write_text(json.dumps(meta))
    (folder / "proj_train/proj_train_0003.npy").unlink()
    with pytest.raises(RgsInputError, match="proj_train_0003.npy is missing"):
        load_projections(folder)
    np.save(folder / "proj_train/proj_train_0003.npy", np.zeros((32, 35), np.float32))
    with pytest.raises(RgsInputError, match=r"shape \(32, 35\), expected \(32, 36\)"):
        load_projections(folder)
    (folder / "meta_data.json").write_text("{not json")
    with pytest.raises(RgsInputError, match="not readable JSON"):
        load_projections(folder)


def _naf_pickle(path: Path, drop: str | None = None) -> Path:
    """A static NAF case in mm: box 200 mm, DSO 500, DSD 700; projections in metres."""
    n_vox, d_vox, n_det, d_det = [24, 24, 24], [200 / 24] * 3, [30, 34], [3.0, 2.8]
    grid = VolumeGrid.centred(n_vox, d_vox)
    angles = ANGLES[:8] + 0.2
    proj_mm = _blob_projections(angles, 500.0, 700.0, n_det, d_det, 100.0, 0.02)
    val_angles = np.array([1.0, 4.0])
    data = {"DSD": 700.0, "DSO": 500.0, "nDetector": n_det, "dDetector": d_det, "nVoxel": n_vox,
            "dVoxel": d_vox, "offOrigin": [0.0, 0.0, 0.0], "offDetector": [0.0, 0.0],
            "accuracy": 0.5, "mode": "cone", "totalAngle": 360, "startAngle": 0, "filter": None,
            "numTrain": 8, "numVal": 2, "image": _blob_volume(grid, 100.0, 0.02),
            "train": {"projections": proj_mm / 1000.0, "angles": angles},
            "val": {"projections": _blob_projections(val_angles, 500.0, 700.0, n_det, d_det, 100.0, 0.02) / 1000.0,
                    "angles": val_angles}}
    if drop:
        del data[drop]
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path


def test_naf_pickle_matches_analytic_projections(tmp_path, device):
    path = _naf_pickle(tmp_path / "chest_50.pickle")
    data = load_projections(path)
    assert data.num_views == 8 and data.geometry.det_shape == (30, 34)
    assert data.attributes["projection_scale"] == 1000.0
    np.testing.assert_allclose(float(data.geometry.vectors[0, 6:9].norm()), 2.8)  # column pitch
    np.testing.assert_allclose(float(data.geometry.vectors[0, 9:12].norm()), 3.0)  # row pitch
    with open(path, "rb") as f:
        raw = pickle.load(f)
    torch.testing.assert_close(data.projections, torch.from_numpy(raw["train"]["projections"] * 1000).float())
    _check_against_analytic(data, raw["train"]["projections"] * 1000)
    assert data.test_projections.shape == (2, 30, 34)


def test_naf_pickle_errors(tmp_path, device):
    with pytest.raises(RgsInputError, match="missing key 'train'"):
        load_projections(_naf_pickle(tmp_path / "a.pkl", drop="train"))
    with pytest.raises(RgsInputError, match="missing key 'nVoxel'"):
        load_projections(_naf_pickle(tmp_path / "b.pkl", drop="nVoxel"))
    bad = tmp_path / "c.pickle"
    bad.write_bytes(b"garbage")
    with pytest.raises(RgsInputError, match="not a readable pickle"):
        load_projections(bad)
    path = _naf_pickle(tmp_path / "d.pickle")
    with open(path, "rb") as f:
        raw = pickle.load(f)
    raw["image"] = np.stack([raw["image"]] * 3)
    with open(path, "wb") as f:
        pickle.dump(raw, f)
    with pytest.raises(RgsInputError, match="4D"):
        load_projections(path)
