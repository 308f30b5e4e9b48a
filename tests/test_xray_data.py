"""X-ray folders (rgs_engine.io.xrays), rigid transforms and ``rgs simulate-xrays``."""
import io
import json
import math
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
import torch
from PIL import Image

from rgs_engine.core import rigid

from rgs_engine.io import xrays as xray_data
from rgs_engine.core.errors import RgsInputError
from rgs_engine.core.geometry import Geometry
from rgs_engine.core.projector import project
from rgs_engine.sim.scan import load_ct_volume, sphere_covering_pixel
from rgs_engine.io.xrays import XRaySet, decode_png, encode_png_gray, load_xrays, read_tiff, save_xrays
from cli_helpers import error_line as _error_line, invoke as _invoke


AFFINE = np.array([[-4.0, 0, 0, 30.0], [0, 4.0, 0, -50.0], [0, 0, 5.0, 12.0], [0, 0, 0, 1]])


def _tiny_ct(path: Path) -> Path:
    """24^3 CT in HU: air, a water block and an off-centre 1000 HU ball (not symmetric)."""
    hu = np.full((24, 24, 24), -1000.0, np.float32)
    hu[4:20, 5:19, 3:21] = 0.0
    i, j, k = np.meshgrid(*[np.arange(24)] * 3, indexing="ij")
    hu[(i - 15) ** 2 + (j - 9) ** 2 + (k - 14) ** 2 < 16] = 1000.0
    nib.save(nib.Nifti1Image(hu, AFFINE), str(path))
    return path


def _geometry(views=2, det=(6, 7)) -> Geometry:
    return Geometry.circular(np.linspace(0, 1, views), 500.0, 800.0, det, 2.0)


# --------------------------------------------------------------------------------------
# Rigid transforms
# --------------------------------------------------------------------------------------
def test_rigid_transforms():
    t = rigid.from_axis_angle([0, 0, math.pi / 2], [1, 2, 3])
    np.testing.assert_allclose(rigid.apply(t, [1, 0, 0]), [1, 3, 3], atol=1e-12)
    np.testing.assert_allclose(rigid.apply_directions(t, [1, 0, 0]), [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(rigid.compose(t, rigid.invert(t)), np.eye(4), atol=1e-12)
    centre = np.array([10.0, -5.0, 3.0])
    for seed in range(5):
        off = rigid.random_offset(7.0, 12.0, seed, centre)
        assert abs(rigid.rotation_angle_deg(off) - 12.0) < 1e-9
        assert abs(np.linalg.norm(rigid.apply(off, centre) - centre) - 7.0) < 1e-9
    np.testing.assert_array_equal(rigid.random_offset(3, 4, 1), rigid.random_offset(3, 4, 1))
    with pytest.raises(RgsInputError, match="not rigid"):
        rigid.check_rigid(np.diag([2.0, 1, 1, 1]))
    # moving the views by T == moving the volume by T^-1
    geo = _geometry()
    moved = rigid.transform_geometry(geo, t)
    np.testing.assert_allclose(moved.vectors[:, 0:3].numpy(), rigid.apply(t, geo.vectors[:, 0:3].numpy()))


def test_batched_rigid_transforms_equal_one_at_a_time():
    """Stacks of rotation vectors, transforms and poses give, row by row, what one call per
    item gives (and Rodrigues in numpy equals the differentiable torch form, also near 0)."""
    rng = np.random.default_rng(3)
    rotvecs = np.concatenate([rng.normal(size=(6, 3)), 1e-4 * rng.normal(size=(2, 3)), np.zeros((1, 3))])
    for w in rotvecs:
        np.testing.assert_allclose(rigid.rotation_matrix(w), rigid.so3_exp(torch.from_numpy(w)).numpy(), atol=1e-14)
        np.testing.assert_allclose(rigid.rotation_quat(w), rigid.axis_angle_quat(torch.from_numpy(w)).numpy(), atol=1e-14)
    np.testing.assert_allclose(rigid.rotation_quat(rotvecs), np.stack([rigid.rotation_quat(w) for w in rotvecs]))
    qa, qb = rng.normal(size=(2, 5, 4))
    np.testing.assert_allclose(rigid.quat_product(qa, qb),
                               rigid.quat_multiply(torch.from_numpy(qa), torch.from_numpy(qb)).numpy(), atol=1e-14)
    shifts, centres = rng.normal(size=(9, 3)) * 5, rng.normal(size=(9, 3)) * 20
    stack = rigid.from_axis_angle(rotvecs, shifts, centres)
    assert stack.shape == (9, 4, 4)
    for k in range(9):
        one = rigid.from_axis_angle(rotvecs[k], shifts[k], centres[k])
        np.testing.assert_allclose(stack[k], one, atol=1e-13)
        np.testing.assert_allclose(rigid.invert(stack)[k], rigid.invert(one), atol=1e-13)
    for mode in ("cone", "parallel"):
        geo = _geometry(3)
        geo = geo if mode == "cone" else Geometry(geo.vectors, geo.det_shape, "parallel")
        moved = rigid.transform_geometry(geo, stack)
        assert moved.num_views == 27 and moved.mode == mode
        single = torch.cat([rigid.transform_geometry(geo, m).vectors for m in stack])
        torch.testing.assert_close(moved.vectors, single, atol=1e-10, rtol=0)
    bad = stack.copy()
    bad[4, 0, 0] = 2.0
    with pytest.raises(RgsInputError, match="not rigid"):
        rigid.transform_geometry(_geometry(), bad)
    with pytest.raises(RgsInputError, match="finite 4x4"):
        rigid.check_rigid_stack(np.zeros((2, 3, 3)))


# --------------------------------------------------------------------------------------
# PNG and TIFF
# --------------------------------------------------------------------------------------
def test_png_round_trip_exact():
    rng = np.random.default_rng(0)
    img16 = rng.integers(0, 65536, (9, 13)).astype(np.uint16)
    img16[0, 0], img16[-1, -1] = 0, 65535
    out = decode_png(encode_png_gray(img16))
    assert out.dtype == np.uint16 and np.array_equal(out, img16)
    img8 = rng.integers(0, 256, (5, 4)).astype(np.uint8)
    assert np.array_equal(decode_png(encode_png_gray(img8)), img8)


def test_png_rejects_bad_input():
    with pytest.raises(RgsInputError, match="not a PNG"):
        decode_png(b"GIF89a........")
    with pytest.raises(RgsInputError, match="uint8 or uint16"):
        encode_png_gray(np.zeros((3, 3), np.float32))
    rgb = io.BytesIO()
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(rgb, "PNG")
    with pytest.raises(RgsInputError, match="only 8/16-bit grayscale"):
        decode_png(rgb.getvalue())


def test_interlaced_16bit_png_view(tmp_path):
    """An Adam7-interlaced 16-bit grayscale PNG written by pypng loads with its exact values."""
    png = pytest.importorskip("png")
    counts = np.random.default_rng(4).integers(0, 65536, (6, 7)).astype(np.uint16)
    with open(tmp_path / "a.png", "wb") as fh:
        png.Writer(7, 6, greyscale=True, bitdepth=16, interlace=True).write(fh, counts.tolist())
    assert (tmp_path / "a.png").read_bytes()[28] == 1  # IHDR interlace method: Adam7
    _write_folder(tmp_path, [_view("a.png", scale=1e-4, offset=-0.5)], {})
    out = load_xrays(tmp_path).images[0].double().numpy()
    np.testing.assert_allclose(out, -0.5 + 1e-4 * counts, atol=1e-6)


def _tiff(img: np.ndarray, bo: str = "<") -> bytes:
    """A hand-written baseline TIFF: header, pixel strip, then an 8-entry IFD."""
    h, w = img.shape
    pixels = img.astype(np.dtype(bo + "u2")).tobytes()
    ifd_at = 8 + len(pixels)
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 1, 16), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (279, 4, 1, len(pixels))]
    ifd = struct.pack(bo + "H", len(entries))
    for tag, typ, n, value in entries:
        packed = struct.pack(bo + "H", value) + b"\0\0" if typ == 3 else struct.pack(bo + "I", value)
        ifd += struct.pack(bo + "HHI", tag, typ, n) + packed
    ifd += struct.pack(bo + "I", 0)
    mark = b"II" if bo == "<" else b"MM"
    return mark + struct.pack(bo + "HI", 42, ifd_at) + pixels + ifd


def test_tiff_reader_both_byte_orders():
    img = np.arange(35, dtype=np.uint16).reshape(5, 7) * 1800
    for bo in "<>":
        out = read_tiff(_tiff(img, bo))
        assert out.dtype == np.uint16 and np.array_equal(out, img)
    with pytest.raises(RgsInputError, match="not a TIFF"):
        read_tiff(b"P5 not a tiff")


@pytest.mark.parametrize("compression", ["lzw", "zlib"])
def test_compressed_tiff_view(tmp_path, compression):
    """LZW- and deflate-compressed 16-bit TIFFs written by tifffile load as intensity views."""
    if compression == "lzw":  # tifffile needs it to write LZW (a dependency; lacking where rgs is not pip-installed)
        pytest.importorskip("imagecodecs")
    p = np.linspace(0.1, 3, 42).reshape(6, 7)
    i0 = 60000.0
    counts = np.round(i0 * np.exp(-p)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", counts, compression=compression)
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:
        assert tif.pages.first.compression == {"lzw": 5, "zlib": 8}[compression]
    _write_folder(tmp_path, [_view("a.tif", values="intensity", i0=i0)], {})
    out = load_xrays(tmp_path).images[0].double().numpy()
    np.testing.assert_allclose(out, -np.log(counts / i0), atol=1e-6)
    assert np.abs(out - p).max() <= 0.5 / counts.min() + 1e-6


def test_tiff_codec_without_imagecodecs(monkeypatch):
    """A TIFF whose codec tifffile cannot load without imagecodecs names the package to install."""
    data = io.BytesIO()
    tifffile.imwrite(data, np.arange(42, dtype=np.uint16).reshape(6, 7))

    def missing(self, *args, **kwargs):
        raise KeyError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", missing)
    with pytest.raises(RgsInputError, match="pip install imagecodecs"):
        read_tiff(data.getvalue(), "a.tif")


# --------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------
def _xset(views=2, det=(6, 7)) -> XRaySet:
    geo = _geometry(views, det)
    images = torch.rand(views, *det) * 4.0 - 0.1
    return XRaySet(images, geo, ["ap.npy", "lat.npy"][:views], rigid.random_offset(5, 3, 0))


def test_folder_round_trip_npy_and_png(tmp_path):
    xset = _xset()
    save_xrays(tmp_path / "a", xset)
    back = load_xrays(tmp_path / "a")
    assert back.files == ["ap.npy", "lat.npy"]
    assert torch.equal(back.images, xset.images)
    assert torch.equal(back.geometry.vectors, xset.geometry.vectors) and back.geometry.det_shape == (6, 7)
    np.testing.assert_array_equal(back.ground_truth, xset.ground_truth)
    # png: per view, s = round((p - min) / scale), scale = range / 65535 -> error <= scale / 2
    save_xrays(tmp_path / "b", xset, image_format="png")
    back = load_xrays(tmp_path / "b")
    assert back.files == ["ap.png", "lat.png"]
    for k in range(2):
        scale = float(xset.images[k].max() - xset.images[k].min()) / 65535
        assert float((back.images[k].double() - xset.images[k].double()).abs().max()) <= scale / 2 + 1e-6
    with pytest.raises(RgsInputError, match="--force"):
        save_xrays(tmp_path / "b", xset, image_format="png")
    save_xrays(tmp_path / "b", xset, force=True, image_format="png")


def _write_folder(root: Path, views: list[dict], images: dict[str, np.ndarray], **extra) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, img in images.items():
        np.save(root / name, img)
    meta = {"format": "rgs-xrays", "version": 1, "views": views, **extra}
    (root / "geometry.json").write_text(json.dumps(meta))
    return root


def _view(file="a.npy", **kw):
    v = {"file": file, "vectors": _geometry(1).vectors[0].tolist(), "mode": "cone",
         "det_shape": [6, 7], "values": "line_integral"}
    v.update(kw)
    return v


def test_intensity_views_become_line_integrals(tmp_path):
    p = np.linspace(0, 3, 42).reshape(6, 7)
    i0 = 5000.0
    raw = i0 * np.exp(-p)
    raw[0, 0] = 0.0  # clamped to MIN_FRACTION * i0
    _write_folder(tmp_path, [_view(values="intensity", i0=i0)], {"a.npy": raw})
    out = load_xrays(tmp_path).images[0].double().numpy()
    np.testing.assert_allclose(out.reshape(-1)[1:], p.reshape(-1)[1:], atol=1e-6)
    assert abs(out[0, 0] + math.log(xray_data.MIN_FRACTION)) < 1e-4
    # 16-bit TIFF of counts with a stored scale
    counts = np.round(raw / 2).astype(np.uint16)
    (tmp_path / "b.tif").write_bytes(_tiff(counts))
    _write_folder(tmp_path / "t", [_view("../b.tif", values="intensity", i0=i0, scale=2.0)], {})
    out = load_xrays(tmp_path / "t").images[0].double().numpy()
    # rounding to whole counts: |d ln I| <= 0.5 / counts
    assert np.abs(out - p).reshape(-1)[1:].max() <= 0.5 / counts.reshape(-1)[1:].min() + 1e-6


GOOD = np.zeros((6, 7))


@pytest.mark.parametrize("case, match", [
    ("no_folder", "no such X-ray folder"),
    ("no_json", "geometry.json: missing"),
    ("bad_json", "not valid JSON"),
    ("no_file", "view image not found"),
    ("short_vectors", "12 numbers"),
    ("nan_vectors", "NaN or Inf"),
    ("nan_image", "image contains NaN"),
    ("wrong_shape", "det_shape says 6x7"),
    ("kind", "values kind 'counts' unknown"),
    ("no_i0", "need 'i0'"),
    ("non_rigid", "not rigid"),
    ("mixed_shapes", "different det_shape"),
    ("bad_ext", "unknown image type"),
])
def test_folder_errors(tmp_path, case, match):
    root = tmp_path / "x"
    if case == "no_json":
        root.mkdir()
    elif case == "bad_json":
        root.mkdir()
        (root / "geometry.json").write_text("{views: ")
    elif case == "no_file":
        _write_folder(root, [_view()], {})
    elif case == "short_vectors":
        _write_folder(root, [_view(vectors=[1, 2, 3])], {"a.npy": GOOD})
    elif case == "nan_vectors":
        v = _view()
        v["vectors"][0] = float("nan")
        _write_folder(root, [v], {"a.npy": GOOD})
    elif case == "nan_image":
        bad = GOOD.copy()
        bad[1, 1] = np.nan
        _write_folder(root, [_view()], {"a.npy": bad})
    elif case == "wrong_shape":
        _write_folder(root, [_view()], {"a.npy": np.zeros((7, 6))})
    elif case == "kind":
        _write_folder(root, [_view(values="counts")], {"a.npy": GOOD})
    elif case == "no_i0":
        _write_folder(root, [_view(values="intensity")], {"a.npy": GOOD})
    elif case == "non_rigid":
        _write_folder(root, [_view()], {"a.npy": GOOD},
                      ground_truth_ct_to_xray=np.diag([1.0, 1, 2, 1]).tolist())
    elif case == "mixed_shapes":
        _write_folder(root, [_view(), _view("b.npy", det_shape=[6, 6])],
                      {"a.npy": GOOD, "b.npy": np.zeros((6, 6))})
    elif case == "bad_ext":
        (root).mkdir()
        (root / "a.jpg").write_bytes(b"x")
        _write_folder(root, [_view("a.jpg")], {})
    with pytest.raises(RgsInputError, match=match) as info:
        load_xrays(root)
    assert "\n" not in str(info.value)


def test_dicom_needs_pydicom_or_reads(tmp_path):
    (tmp_path / "a.dcm").write_bytes(b"not dicom")
    _write_folder(tmp_path, [_view("a.dcm")], {})
    with pytest.raises(RgsInputError, match="pydicom|DICOM"):
        load_xrays(tmp_path)


# --------------------------------------------------------------------------------------
# rgs simulate-xrays
# --------------------------------------------------------------------------------------
def test_simulate_xrays_identity_matches_project(tmp_path, device):
    ct = _tiny_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "xr"
    res = _invoke("simulate-xrays", ct, out, "--grid", 24, "--det", 32, "--dso", 400, "--dsd", 600)
    assert res.exit_code == 0, res.output
    xs = load_xrays(out)
    assert xs.files == ["ap.npy", "lateral.npy"]
    np.testing.assert_allclose(xs.ground_truth, np.eye(4), atol=1e-12)
    volume, grid = load_ct_volume(ct, 24, device)
    lo, hi = grid.bounds()
    pitch = sphere_covering_pixel(float(np.linalg.norm(hi - lo)) / 2, 400, 600, 32)
    geo = Geometry.biplanar(400, 600, (32, 32), pitch, isocentre=grid.centre)
    assert torch.allclose(xs.geometry.vectors, geo.vectors, atol=1e-9)
    expected = project(volume, grid, geo).cpu()
    assert float(expected.max()) > 0.5
    torch.testing.assert_close(xs.images, expected, atol=1e-5, rtol=1e-5)
    # refuses to overwrite without --force
    line = _error_line(_invoke("simulate-xrays", ct, out, "--grid", 24, "--det", 32))
    assert "--force" in line

    # with an offset: rigid ground truth of the requested size; the images follow the pose
    res = _invoke("simulate-xrays", ct, out, "--grid", 24, "--det", 32, "--dso", 400, "--dsd", 600,
                  "--offset-mm", 10, "--offset-deg", 5, "--seed", 3, "--format", "png",
                  "--views", "90,0,45", "--noise", "1e5,0", "--force")
    assert res.exit_code == 0, res.output
    xs = load_xrays(out)
    assert xs.files == ["view00.png", "view01.png", "view02.png"]
    truth = rigid.check_rigid(xs.ground_truth)
    centre = np.asarray(grid.centre)
    assert abs(np.linalg.norm(rigid.apply(truth, centre) - centre) - 10) < 1e-6
    assert abs(rigid.rotation_angle_deg(truth) - 5) < 1e-6
    moved = rigid.transform_geometry(xs.geometry, rigid.invert(truth))
    expected = project(volume, grid, moved).cpu()
    assert float((xs.images - expected).abs().mean()) < 0.05 * float(expected.abs().mean())
    assert float((xs.images[:2] - project(volume, grid, geo).cpu()).abs().mean()) > 0.1 * float(expected.abs().mean())


def test_simulate_xrays_bad_input(tmp_path):
    ct = _tiny_ct(tmp_path / "ct.nii.gz")
    assert "--views" in _error_line(_invoke("simulate-xrays", ct, tmp_path / "o", "--views", "a,b"))
    assert "DSO" in _error_line(_invoke("simulate-xrays", ct, tmp_path / "o", "--dso", 900, "--dsd", 800))
    assert "--offset-deg" in _error_line(_invoke("simulate-xrays", ct, tmp_path / "o", "--offset-deg", 200))
    assert "no such file" in _error_line(_invoke("simulate-xrays", tmp_path / "nope.nii", tmp_path / "o"))


# --------------------------------------------------------------------------------------
# DICOM radiographs (geometry from the standard tags)
# --------------------------------------------------------------------------------------
def _dx(path: Path, stored: np.ndarray, drop: tuple[str, ...] = (), **tags) -> Path:
    """A DX file written with pydicom alone: LOG pixels (sign -1) with a rescale, DSD 800,
    DSO 500, 1.5 x 1.25 mm pixels, positioner angles 90 / 0 unless ``tags`` say otherwise."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = "0.001", "-0.25"
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", -1
    ds.DistanceSourceToDetector, ds.DistanceSourceToPatient = "800", "500"
    ds.ImagerPixelSpacing = ["1.5", "1.25"]
    ds.PositionerPrimaryAngle, ds.PositionerSecondaryAngle = "90", "0"
    for key, value in tags.items():
        setattr(ds, key, value)
    for key in drop:
        delattr(ds, key)
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_dx_views_take_their_geometry_from_the_tags(tmp_path):
    stored = np.random.default_rng(5).integers(0, 4000, (6, 7)).astype(np.uint16)
    _dx(tmp_path / "a_lao.dcm", stored)
    _dx(tmp_path / "b_oriented.dcm", stored, PatientOrientation=["A", "F"])
    _dx(tmp_path / "c_cranial.dcm", stored, PositionerPrimaryAngle="0", PositionerSecondaryAngle="30")
    xs = load_xrays(tmp_path)  # no geometry.json
    assert xs.files == ["a_lao.dcm", "b_oriented.dcm", "c_cranial.dcm"] and xs.ground_truth is None
    assert xs.geometry.det_shape == (6, 7) and xs.geometry.mode == "cone"
    for k in range(3):
        np.testing.assert_allclose(xs.images[k].double().numpy(), -0.25 + 0.001 * stored, atol=1e-6)
    # LAO 90: detector at the patient's left (world -x, RAS), source at +x: TIGRE's angle 0
    # with 1.5 mm rows and 1.25 mm columns; columns run posterior unless Patient Orientation
    # says anterior
    tigre = Geometry.circular([0.0], 500.0, 800.0, (6, 7), (1.5, 1.25)).vectors[0]
    lao, oriented = xs.geometry.vectors[0], xs.geometry.vectors[1]
    torch.testing.assert_close(oriented, tigre)
    torch.testing.assert_close(lao[:6], tigre[:6])
    torch.testing.assert_close(lao[6:9], -tigre[6:9])
    torch.testing.assert_close(lao[9:], tigre[9:])
    # primary 0, 30 deg cranial: the detector anterior and up, the source behind and below
    a = math.radians(30)
    beam = torch.tensor([0.0, math.cos(a), math.sin(a)], dtype=torch.float64)  # RAS
    cranial = xs.geometry.vectors[2]
    torch.testing.assert_close(cranial[0:3], -500.0 * beam)
    torch.testing.assert_close(cranial[3:6], 300.0 * beam)
    torch.testing.assert_close(cranial[6:9], torch.tensor([-1.25, 0.0, 0.0], dtype=torch.float64))  # patient left
    torch.testing.assert_close(cranial[9:12], 1.5 * torch.tensor([0.0, math.sin(a), -math.cos(a)], dtype=torch.float64))


def test_dicom_view_position_and_geometry_json_values(tmp_path):
    """View Position stands in for the primary angle; geometry.json may give only what the
    tags lack (here: LIN intensities and their i0)."""
    p = np.linspace(0.1, 2, 42).reshape(6, 7)
    counts = np.round(50000 * np.exp(-p)).astype(np.uint16)
    _dx(tmp_path / "pa.dcm", counts, drop=("PositionerPrimaryAngle", "PositionerSecondaryAngle"),
        ViewPosition="PA", PixelIntensityRelationship="LIN", PixelIntensityRelationshipSign=1,
        RescaleSlope="1", RescaleIntercept="0")
    with pytest.raises(RgsInputError, match="'i0'") as info:
        load_xrays(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "geometry.json").write_text(json.dumps(
        {"format": "rgs-xrays", "version": 1, "views": [{"file": "pa.dcm", "values": "intensity", "i0": 50000}]}))
    xs = load_xrays(tmp_path)
    np.testing.assert_allclose(xs.images[0].double().numpy(), -np.log(counts / 50000), atol=1e-6)
    pa = Geometry.circular([-math.pi / 2], 500.0, 800.0, (6, 7), (1.5, 1.25)).vectors[0]  # source posterior
    torch.testing.assert_close(xs.geometry.vectors[0][:6], pa[:6])


@pytest.mark.parametrize("drop, tag, key", [
    (("DistanceSourceToDetector",), "(0018,1110)", "vectors"),
    (("DistanceSourceToPatient",), "(0018,1111)", "vectors"),
    (("ImagerPixelSpacing",), "(0018,1164)", "vectors"),
    (("PositionerPrimaryAngle",), "(0018,1510)", "vectors"),
    (("PixelIntensityRelationship",), "(0028,1040)", "values"),
])
def test_dicom_without_a_needed_tag_names_it(tmp_path, drop, tag, key):
    _dx(tmp_path / "a.dcm", np.zeros((6, 7), np.uint16), drop=drop)
    with pytest.raises(RgsInputError) as info:
        load_xrays(tmp_path)
    line = str(info.value)
    assert "\n" not in line and tag in line and f"'{key}'" in line and "geometry.json" in line


def test_simulate_xrays_dcm_round_trips_through_the_loader(tmp_path):
    ct = _tiny_ct(tmp_path / "ct.nii.gz")
    args = ("--grid", 24, "--det", 16, "--dso", 400, "--dsd", 600, "--offset-mm", 6, "--offset-deg", 4,
            "--views", "90,0,30")
    assert _invoke("simulate-xrays", ct, tmp_path / "npy", *args).exit_code == 0
    res = _invoke("simulate-xrays", ct, tmp_path / "dcm", *args, "--format", "dcm")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "dcm").iterdir()) == ["view00.dcm", "view01.dcm", "view02.dcm"]
    ref, back = load_xrays(tmp_path / "npy"), load_xrays(tmp_path / "dcm")
    assert back.files == ["view00.dcm", "view01.dcm", "view02.dcm"]
    torch.testing.assert_close(back.geometry.vectors, ref.geometry.vectors, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(back.ground_truth, ref.ground_truth)
    for k in range(3):  # 16-bit steps of range / 65535
        step = float(ref.images[k].max() - ref.images[k].min()) / 65535
        assert float((back.images[k] - ref.images[k]).abs().max()) <= step / 2 + 1e-6
    assert pydicom.dcmread(tmp_path / "dcm" / "view00.dcm").Modality == "DX"
    line = _error_line(_invoke("simulate-xrays", ct, tmp_path / "dcm", *args, "--format", "dcm"))
    assert "--force" in line


def test_dcm_into_a_folder_with_a_geometry_json_refuses_then_replaces_it(tmp_path):
    """A geometry.json left in the folder would be read instead of the DICOM tags: writing
    dcm there needs --force, and then removes it."""
    ct = _tiny_ct(tmp_path / "ct.nii.gz")
    args = ("--grid", 24, "--det", 16, "--dso", 400, "--dsd", 600, "--views", "90,0")
    out = tmp_path / "xr"
    assert _invoke("simulate-xrays", ct, out, *args).exit_code == 0
    assert "geometry.json" in _error_line(_invoke("simulate-xrays", ct, out, *args, "--format", "dcm"))
    res = _invoke("simulate-xrays", ct, out, *args, "--format", "dcm", "--force")
    assert res.exit_code == 0, res.output
    assert not (out / "geometry.json").exists()
    assert load_xrays(out).files == ["view00.dcm", "view01.dcm"]
