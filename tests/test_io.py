"""NIfTI in/out (orientation, affine, no-clobber atomic writes), PNG output, CT preparation."""
import io
import struct
import zlib

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from rgs_engine.sim import ct

from rgs_engine.io import images as imaging, files as volume_io
from rgs_engine.core.errors import RgsInputError
from rgs_engine.core.geometry import VolumeGrid

LPS_AFFINE = np.array([[-0.8, 0, 0, 20.0], [0, -0.9, 0, 31.0], [0, 0, 2.0, -40.0], [0, 0, 0, 1]])
PERMUTED_AFFINE = np.array([[0, 0, 2.0, -7.0], [1.5, 0, 0, 3.0], [0, -1.1, 0, 12.0], [0, 0, 0, 1]])


def _write_nifti(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def _world_of_indices(affine, shape):
    """World positions (N, 3) of every voxel of an array of ``shape``, C order."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _values_at(volume, grid, world):
    """Values of a grid-ordered volume at world positions that fall on voxel centres."""
    idx = (world - np.asarray(grid.origin)) / np.asarray(grid.spacing)
    assert np.allclose(idx, np.round(idx), atol=1e-4)
    i, j, k = np.round(idx).astype(int).T
    return volume.numpy()[i, j, k]


@pytest.mark.parametrize("affine", [LPS_AFFINE, PERMUTED_AFFINE], ids=["lps", "permuted"])
def test_load_puts_every_voxel_at_its_world_position(tmp_path, affine):
    data = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    vol, grid = volume_io.load_nifti(_write_nifti(tmp_path / "in.nii.gz", data, affine))
    assert vol.dtype == torch.float32 and tuple(vol.shape) == grid.shape
    assert all(s > 0 for s in grid.spacing)
    np.testing.assert_array_equal(_values_at(vol, grid, _world_of_indices(affine, data.shape)),
                                  data.reshape(-1))


@pytest.mark.parametrize("affine", [LPS_AFFINE, PERMUTED_AFFINE], ids=["lps", "permuted"])
def test_save_then_load_keeps_affine_and_orientation(tmp_path, affine):
    data = np.random.default_rng(1).normal(size=(5, 6, 7)).astype(np.float32)
    vol, grid = volume_io.load_nifti(_write_nifti(tmp_path / "in.nii.gz", data, affine))
    out = volume_io.save_nifti(tmp_path / "out.nii.gz", vol, grid)
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, grid.affine(), atol=1e-5)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), grid.affine(), atol=1e-5)
    assert img.header.get_xyzt_units()[0] == "mm"
    # the written image overlays the input: same value at the same world position
    saved = img.get_fdata()
    world = _world_of_indices(img.affine, saved.shape)
    back, back_grid = volume_io.load_nifti(out)
    assert back_grid.shape == grid.shape  # the header stores the affine in float32
    np.testing.assert_allclose(back_grid.affine(), grid.affine(), atol=1e-5)
    torch.testing.assert_close(back, vol)
    np.testing.assert_array_equal(_values_at(vol, grid, world), saved.reshape(-1).astype(np.float32))


def test_gzip_and_plain_nifti_hold_the_same_image(tmp_path):
    import gzip

    grid = volume_io.VolumeGrid((9, 8, 7), (1.0, 1.5, 2.0), (-4.0, -5.0, -6.0))
    vol = torch.rand(grid.shape) * (torch.rand(grid.shape) > 0.5)  # zeros and noise, as voxelised fields
    packed = volume_io.save_nifti(tmp_path / "v.nii.gz", vol, grid)
    plain = volume_io.save_nifti(tmp_path / "v.nii", vol, grid)
    assert gzip.decompress(packed.read_bytes()) == plain.read_bytes()  # a standard gzip stream
    assert packed.stat().st_size < plain.stat().st_size


@pytest.mark.parametrize("size", [0, 1, 5000, 3 * 1024 + 17])
def test_parallel_gzip_is_one_standard_member(tmp_path, size):
    """Chunks deflated apart (here 1 KiB each, 4 threads) join into one gzip member whose
    CRC and length the decoder checks: the bytes come back exactly, nothing follows."""
    from rgs_engine.io.files import _write_gzip

    rng = np.random.default_rng(size)
    data = (rng.random(size) * (rng.random(size) > 0.6) * 50).astype(np.uint8).tobytes()
    _write_gzip(tmp_path / "d.gz", data, chunk=1024, workers=4)
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert d.decompress((tmp_path / "d.gz").read_bytes()) == data
    assert d.eof and d.unused_data == b""


def test_load_drops_trailing_singleton_dimension(tmp_path):
    data = np.ones((4, 5, 6, 1), np.float32)
    vol, grid = volume_io.load_nifti(_write_nifti(tmp_path / "in.nii", data, np.eye(4)))
    assert grid.shape == (4, 5, 6)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"), ("nan", "NaN"), ("2d", "3D"), ("oblique", "oblique"),
    ("garbage", "not a readable NIfTI")])
def test_load_rejects_bad_input_with_a_clear_message(tmp_path, case, message):
    path = tmp_path / "bad.nii.gz"
    if case == "nan":
        data = np.zeros((4, 4, 4), np.float32)
        data[1, 2, 3] = np.nan
        _write_nifti(path, data, np.eye(4))
    elif case == "2d":
        _write_nifti(path, np.zeros((4, 4), np.float32), np.eye(4))
    elif case == "oblique":
        c, s = np.cos(0.3), np.sin(0.3)
        _write_nifti(path, np.zeros((4, 4, 4), np.float32),
                     np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    elif case == "garbage":
        path.write_bytes(b"not an image")
    with pytest.raises(RgsInputError, match=message):
        volume_io.load_nifti(path)


def test_writers_refuse_to_overwrite_without_force(tmp_path):
    grid = VolumeGrid.centred((3, 4, 5), 1.0)
    path = volume_io.save_nifti(tmp_path / "v.nii.gz", torch.zeros(grid.shape), grid)
    before = path.read_bytes()
    with pytest.raises(RgsInputError, match="exists: pass --force"):
        volume_io.save_nifti(path, torch.ones(grid.shape), grid)
    with pytest.raises(RgsInputError, match="exists: pass --force"):
        volume_io.save_json(path, {"a": 1})
    assert path.read_bytes() == before
    volume_io.save_nifti(path, torch.ones(grid.shape), grid, force=True)
    assert float(nib.load(str(path)).get_fdata().min()) == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nii.gz"]  # no temp files left


def test_atomic_write_keeps_target_when_the_writer_fails(tmp_path):
    path = tmp_path / "r.json"
    volume_io.save_json(path, {"kept": True})
    with pytest.raises(ZeroDivisionError):
        with volume_io.atomic_write(path, force=True) as tmp:
            tmp.write_text("partial")
            1 / 0
    assert path.read_text().strip().startswith("{") and "kept" in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# ---- PNG -------------------------------------------------------------------------------
def decode_png(data: bytes):
    """PNG chunk checker for 8-bit non-interlaced images (chunk CRCs, header, filter bytes):
    (header dict, pixels decoded by Pillow, text chunks)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    channels = {0: 1, 2: 3}[colour]
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert (depth, comp, filt, interlace) == (8, 0, 0, 0)
    assert len(raw) == h * (1 + w * channels)
    rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + w * channels)
    assert rows[:, 0].max() <= 4  # a PNG filter type (0-4) on every row
    pixels = np.asarray(Image.open(io.BytesIO(data)))
    assert pixels.shape == ((h, w) if channels == 1 else (h, w, 3))
    text = dict(body.split(b"\0", 1) for kind, body in chunks if kind == b"tEXt")
    return {"width": w, "height": h, "colour": colour}, pixels, text


@pytest.mark.parametrize("shape", [(7, 5), (4, 9, 3)], ids=["gray", "rgb"])
def test_png_round_trips_pixels(tmp_path, shape):
    img = np.random.default_rng(2).integers(0, 256, size=shape, dtype=np.uint8)
    path = imaging.write_png(tmp_path / "a.png", img)
    header, pixels, _ = decode_png(path.read_bytes())
    assert (header["height"], header["width"]) == shape[:2]
    np.testing.assert_array_equal(pixels, img)


def test_slices_png_respects_physical_aspect(tmp_path):
    # a 20 x 20 x 20 mm box with anisotropic voxels: every panel is square on screen
    grid = VolumeGrid.centred((20, 10, 5), (1.0, 2.0, 4.0))
    vols = {"a": torch.rand(grid.shape), "b": torch.rand(grid.shape)}
    path = imaging.slices_png(tmp_path / "s.png", vols, grid)
    header, pixels, text = decode_png(path.read_bytes())
    p, gap = imaging.PANEL, imaging.GAP
    assert (header["width"], header["height"]) == (3 * p + 2 * gap, 2 * p + gap)
    assert header["colour"] == 0 and pixels.min() == 0 and pixels.max() == 255
    assert text[b"Description"].startswith(b"rows: a, b")
    with pytest.raises(RgsInputError, match="exists"):
        imaging.slices_png(path, vols, grid)


# ---- CT preparation --------------------------------------------------------------------
def test_hu_to_mu():
    hu = torch.tensor([-2048.0, -1000.0, 0.0, 1000.0])
    torch.testing.assert_close(ct.hu_to_mu(hu), torch.tensor([0.0, 0.0, 0.02, 0.04]))


def test_fit_grid_is_isotropic_and_covers_the_box():
    grid = VolumeGrid((512, 512, 133), (0.703125, 0.703125, 2.5), (-193.3, -187.6, -340.0))
    new = ct.fit_grid(grid, 96)
    assert new.shape[0] == 96 and len(set(new.spacing)) == 1
    np.testing.assert_allclose(new.centre, grid.centre)
    assert np.all(new.size_mm >= grid.size_mm - 1e-6)
    assert np.all(new.size_mm < grid.size_mm + new.spacing[0] + 1e-6)


@pytest.mark.parametrize("new_spacing", [0.7, 2.9], ids=["finer", "coarser"])
def test_resample_maps_world_coordinates(new_spacing):
    # trilinear interpolation and block averaging both reproduce a linear field exactly
    grid = VolumeGrid((30, 24, 12), (1.0, 1.25, 2.5), (-14.0, 3.0, -10.0))
    coef = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    field = (grid.voxel_centres() * coef).sum(-1) + 5.0
    new = VolumeGrid.centred((5, 4, 4), new_spacing, grid.centre + np.array([0.6, -0.4, 0.9]))
    out = ct.resample(field.float(), grid, new)
    assert out.dtype == torch.float32 and tuple(out.shape) == new.shape
    expected = (new.voxel_centres() * coef).sum(-1) + 5.0
    torch.testing.assert_close(out.double(), expected, atol=2e-4, rtol=1e-5)


def test_resample_is_zero_outside_the_source_box():
    grid = VolumeGrid.centred((8, 8, 8), 1.0)
    far = VolumeGrid.centred((4, 4, 4), 1.0, centre=(50.0, 0.0, 0.0))
    assert float(ct.resample(torch.ones(grid.shape), grid, far).abs().max()) == 0.0


def test_covering_scan_sees_the_whole_box():
    grid = VolumeGrid.centred((40, 30, 20), (3.0, 3.0, 5.0), centre=(10.0, -5.0, 30.0))
    scan = ct.covering_scan(grid, views=36, dso=400.0, dsd=600.0, det=64)
    lo, hi = grid.bounds()
    corners = torch.tensor([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                            for z in (lo[2], hi[2])], dtype=torch.float64)
    rows = scan.projection_rows()
    t = corners[None] - scan.sources[:, None]
    depth = (t * rows[:, None, 6:9]).sum(-1)
    col = (t * rows[:, None, 0:3]).sum(-1) / depth
    row = (t * rows[:, None, 3:6]).sum(-1) / depth
    assert float(col.min()) > -0.5 and float(col.max()) < 63.5
    assert float(row.min()) > -0.5 and float(row.max()) < 63.5
    assert max(float(col.max() - col.min()), float(row.max() - row.min())) > 0.8 * 63


def test_4d_nifti_keeps_frames_affine_and_time_step(tmp_path):
    grid = VolumeGrid.centred((4, 5, 6), (1.0, 2.0, 3.0))
    series = torch.rand(4, 5, 6, 3)
    volume_io.save_nifti(tmp_path / "s.nii.gz", series, grid, frame_seconds=0.35)
    img = nib.load(tmp_path / "s.nii.gz")
    np.testing.assert_allclose(img.get_fdata(), series.numpy(), rtol=1e-6)
    np.testing.assert_allclose(img.affine, grid.affine())
    assert img.header.get_zooms() == pytest.approx((1.0, 2.0, 3.0, 0.35))
    assert img.header.get_xyzt_units() == ("mm", "sec")
    with pytest.raises(RgsInputError, match="frames last"):
        volume_io.save_nifti(tmp_path / "t.nii.gz", series.permute(3, 0, 1, 2), grid)


def test_slices_gif_shows_each_series_over_time(tmp_path):
    grid = VolumeGrid.centred((8, 8, 8), 1.0)
    moving = torch.zeros(3, 8, 8, 8)
    for t in range(3):
        moving[t, :, :, 2 + t] = 1.0  # a bright axial plane moving up
    imaging.slices_gif(tmp_path / "m.gif", {"truth": moving, "fit": moving * 0.5}, grid)
    data = (tmp_path / "m.gif").read_bytes()
    assert data[:6] == b"GIF89a" and data.count(b"\x21\xf9\x04") == 3  # one control block per frame
    with pytest.raises(RgsInputError, match="different shapes"):
        imaging.slices_gif(tmp_path / "n.gif", {"a": moving, "b": moving[:2]}, grid)
