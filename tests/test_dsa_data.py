"""4DRGS DSA case layout (rgs_engine.io.dsa_case): round trip, conventions, every error path."""
import gzip
import json
import math
import struct

import nibabel as nib
import numpy as np
import pytest
import torch

from rgs_engine.io import dsa_case as dsa_data
from rgs_engine.io.dsa_case import DsaCase, DsaTruth, load_dsa, load_dsa_case, save_dsa_case
from rgs_engine.core.errors import RgsInputError
from rgs_engine.core.geometry import VolumeGrid

F, H, W = 5, 6, 7
GRID = VolumeGrid.centred((8, 9, 10), (2.0, 2.5, 1.5))


def _case(times: bool = True, truth: bool = True) -> DsaCase:
    gen = torch.Generator().manual_seed(1)
    mask = 1000 + 500 * torch.rand(F, H, W, generator=gen)
    fill = mask * torch.exp(-torch.rand(F, H, W, generator=gen))
    fill[0, 0, 0] = mask[0, 0, 0] * 1.5  # brighter fill: DSA clipped to 0 there
    vol = lambda: torch.rand(GRID.shape, generator=gen)  # noqa: E731
    gt = None
    if truth:
        gt = DsaTruth(mean_volume=vol(), mask=vol() > 0.5, frame_volumes={0: vol(), 3: vol()},
                      surface=(np.random.default_rng(0).normal(size=(4, 3)), np.array([[0, 1, 2], [0, 2, 3]])),
                      centrelines=[np.arange(6.0).reshape(2, 3), np.arange(9.0).reshape(3, 3) / 7],
                      parameters={"phantom": {"seed": 4}})
    return DsaCase(mask_run=mask, fill_run=fill, angles=torch.linspace(0.1, 3.0, F, dtype=torch.float64),
                   grid=GRID, sad=700.0, sid=1100.0, pixel_size=(0.8, 0.6),
                   times=torch.arange(F, dtype=torch.float64) / 30 if times else None, truth=gt)


@pytest.fixture
def folder(tmp_path):
    return save_dsa_case(tmp_path / "case", _case())


def test_round_trip_is_exact(folder):
    case, back = _case(), load_dsa_case(folder)
    for name in ("mask_run", "fill_run", "angles", "times"):
        assert torch.equal(getattr(back, name), getattr(case, name)), name
    assert back.grid == GRID and (back.sad, back.sid, back.pixel_size) == (700.0, 1100.0, (0.8, 0.6))
    assert back.frame_files == case.frame_files
    assert torch.equal(back.geometry().vectors, case.geometry().vectors)
    t, b = case.truth, back.truth
    assert torch.equal(b.mean_volume, t.mean_volume) and torch.equal(b.mask, t.mask)
    assert sorted(b.frame_volumes) == [0, 3]
    assert all(torch.equal(b.frame_volumes[k], t.frame_volumes[k]) for k in (0, 3))
    np.testing.assert_allclose(b.surface[0], t.surface[0], atol=1e-6)  # float32 PLY
    np.testing.assert_array_equal(b.surface[1], t.surface[1])
    assert all(np.allclose(x, y, rtol=1e-8) for x, y in zip(b.centrelines, t.centrelines))
    assert len(b.centrelines) == 2 and b.parameters == {"phantom": {"seed": 4}}
    assert not any(p.name.startswith(".tmp") for p in folder.rglob("*"))


def test_file_layout_is_4drgs(folder):
    cfg = json.loads((folder / "transforms.json").read_text())
    assert cfg["volume_resolution"] == [8, 9, 10] and cfg["volume_spacing"] == [2.0, 2.5, 1.5]
    assert cfg["volume_phy"] == [16.0, 22.5, 15.0]
    assert cfg["proj_resolution"] == [W, H] and cfg["proj_spacing"] == [0.6, 0.8]
    assert cfg["proj_phy"] == pytest.approx([W * 0.6, H * 0.8]) and cfg["N_views"] == F
    assert cfg["frames"][2] == {"PrimaryAngle": pytest.approx(1.55), "file": "frame_002",
                                "time": pytest.approx(2 / 30)}
    # nibabel sees (W, H, F); the bytes in C order are SimpleITK's (F, H, W) array
    assert nib.load(str(folder / "mask_run.nii.gz")).shape == (W, H, F)
    raw = gzip.decompress((folder / "fill_run.nii.gz").read_bytes())
    offset = int(struct.unpack("<f", raw[108:112])[0])
    sitk_array = np.frombuffer(raw, "<f4", F * H * W, offset).reshape(F, H, W)
    np.testing.assert_array_equal(sitk_array, _case().fill_run.numpy())


def test_projection_data_dsa_geometry_and_time(folder, tmp_path):
    data = load_dsa(folder)
    case = _case()
    want = (torch.log(case.mask_run.double()) - torch.log(case.fill_run.double())).clamp_min(0)
    torch.testing.assert_close(data.projections, want.float(), rtol=0, atol=1e-6)
    assert float(data.projections[0, 0, 0]) == 0.0  # clipped
    assert torch.equal(data.time, case.times) and data.attributes["time_unit"] == "s"
    assert torch.equal(data.ground_truth, case.truth.mean_volume)
    a = float(case.angles[1])
    v = data.geometry.vectors[1]
    np.testing.assert_allclose(v[0:3], [700 * math.cos(a), 700 * math.sin(a), 0], atol=1e-9)
    np.testing.assert_allclose(v[3:6], [-400 * math.cos(a), -400 * math.sin(a), 0], atol=1e-9)
    np.testing.assert_allclose(v[6:9], [-0.6 * math.sin(a), 0.6 * math.cos(a), 0], atol=1e-12)
    np.testing.assert_allclose(v[9:12], [0, 0, -0.8], atol=1e-12)
    # a plain 4DRGS case (no times, no ground truth): times f / (F - 1)
    plain = load_dsa(save_dsa_case(tmp_path / "plain", _case(times=False, truth=False)))
    assert plain.ground_truth is None and plain.attributes["time_unit"] == "normalised"
    np.testing.assert_allclose(plain.time.numpy(), np.arange(F) / (F - 1))
    assert not (tmp_path / "plain" / "ground_truth").exists()


def test_writer_refuses_to_overwrite_without_force(folder):
    with pytest.raises(RgsInputError, match="exists: pass --force"):
        save_dsa_case(folder, _case())
    save_dsa_case(folder, _case(times=False), force=True)
    assert load_dsa_case(folder).times is None


def _edit_json(folder, change):
    path = folder / "transforms.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


def _write_run(folder, name, array_fhw):
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array_fhw.transpose(2, 1, 0)), np.eye(4)), str(folder / name))


def _bad_value(value):
    def edit(folder):
        run = _case().mask_run.numpy().copy()
        run[1, 2, 3] = value
        _write_run(folder, "mask_run.nii.gz", run)
    return edit


ERRORS = {
    "missing mask": (lambda d: (d / "mask_run.nii.gz").unlink(), "mask_run.nii.gz: missing"),
    "missing fill": (lambda d: (d / "fill_run.nii.gz").unlink(), "fill_run.nii.gz: missing"),
    "missing transforms": (lambda d: (d / "transforms.json").unlink(), "transforms.json: missing"),
    "bad json": (lambda d: (d / "transforms.json").write_text("{"), "not readable JSON"),
    "missing key": (lambda d: _edit_json(d, lambda c: c.pop("sad")), "missing key 'sad'"),
    "missing frames": (lambda d: _edit_json(d, lambda c: c.pop("frames")), "missing key 'frames'"),
    "bad number": (lambda d: _edit_json(d, lambda c: c.update(volume_resolution=[8, 9])),
                   "'volume_resolution' must be 3 positive integer"),
    "no angle": (lambda d: _edit_json(d, lambda c: c["frames"][1].pop("PrimaryAngle")),
                 "frames[1] lacks 'PrimaryAngle'"),
    "nan angle": (lambda d: _edit_json(d, lambda c: c["frames"][1].update(PrimaryAngle="nan")),
                  "non-finite"),
    "some times": (lambda d: _edit_json(d, lambda c: c["frames"][1].pop("time")), "only 4 of 5 frames"),
    "frames vs N_views": (lambda d: _edit_json(d, lambda c: c.update(N_views=4)),
                          "5 frames listed but N_views is 4"),
    "run frames": (lambda d: (_edit_json(d, lambda c: (c.update(N_views=4), c["frames"].pop()))),
                   "holds 5 frames but transforms.json has N_views = 4"),
    "proj_resolution": (lambda d: _edit_json(d, lambda c: c.update(proj_resolution=[H, W],
                                                                   proj_phy=[H * 0.6, W * 0.8])),
                        "does not hold frames of proj_resolution"),
    "fill frames": (lambda d: _write_run(d, "fill_run.nii.gz", np.ones((F - 1, H, W), np.float32)),
                    "fill_run.nii.gz: holds 4 frames but transforms.json has N_views = 5"),
    "phy": (lambda d: _edit_json(d, lambda c: c.update(volume_phy=[16.0, 22.5, 16.0])),
            "volume_phy [16.0, 22.5, 16.0] is not resolution x spacing"),
    "sid <= sad": (lambda d: _edit_json(d, lambda c: c.update(sid=600.0)), "sid 600 <= sad 700"),
    "zero intensity": (_bad_value(0.0), "intensities <= 0"),
    "negative intensity": (_bad_value(-3.0), "intensities <= 0"),
    "nan intensity": (_bad_value(np.nan), "NaN or Inf"),
    "not nifti": (lambda d: (d / "fill_run.nii.gz").write_bytes(b"nope"), "not a readable NIfTI"),
    "truth missing": (lambda d: (d / "ground_truth" / "vessels_mask.nii.gz").unlink(),
                      "vessels_mask.nii.gz: missing: the case's ground truth is incomplete"),
    "truth grid": (lambda d: nib.save(nib.Nifti1Image(np.zeros((8, 9, 10), np.float32), np.eye(4)),
                                      str(d / "ground_truth" / "vessels_mean.nii.gz")),
                   "is not the case's volume grid"),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_each_problem_is_one_clear_line(folder, name):
    edit, text = ERRORS[name]
    edit(folder)
    with pytest.raises(RgsInputError) as info:
        load_dsa_case(folder)
    message = str(info.value)
    assert text in message and "\n" not in message, message


def test_not_a_folder_and_in_memory_checks(tmp_path):
    with pytest.raises(RgsInputError, match="not a directory"):
        load_dsa_case(tmp_path / "absent")
    good = _case()
    with pytest.raises(RgsInputError, match="centres it on the isocentre"):
        DsaCase(good.mask_run, good.fill_run, good.angles, VolumeGrid((8, 9, 10), (2.0,) * 3, (0.0,) * 3),
                700.0, 1100.0, 0.5)
    with pytest.raises(RgsInputError, match="differ in shape"):
        DsaCase(good.mask_run, good.fill_run[:, :, 1:], good.angles, GRID, 700.0, 1100.0, 0.5)
    with pytest.raises(RgsInputError, match="4 angles for 5 frames"):
        DsaCase(good.mask_run, good.fill_run, good.angles[:4], GRID, 700.0, 1100.0, 0.5)
    with pytest.raises(RgsInputError, match="ground truth mean volume has shape"):
        DsaCase(good.mask_run, good.fill_run, good.angles, GRID, 700.0, 1100.0, 0.5,
                truth=DsaTruth(torch.zeros(3, 3, 3), torch.zeros(GRID.shape, dtype=torch.bool)))
    with pytest.raises(RgsInputError, match="outside the run's 5 frames"):
        DsaCase(good.mask_run, good.fill_run, good.angles, GRID, 700.0, 1100.0, 0.5,
                truth=DsaTruth(good.truth.mean_volume, good.truth.mask, {7: good.truth.mean_volume}))
    with pytest.raises(RgsInputError, match="pixel size"):
        DsaCase(good.mask_run, good.fill_run, good.angles, GRID, 700.0, 1100.0, (0.5, 0.0))
    with pytest.raises(RgsInputError, match="inside the volume box"):
        DsaCase(good.mask_run, good.fill_run, good.angles, GRID, 5.0, 1100.0, 0.5)
    assert dsa_data.frame_volume_name(7) == "vessels_frame007.nii.gz"
