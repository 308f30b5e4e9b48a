"""The ``rgs`` command line: info, the roundtrip check on a tiny CT, refusals and errors."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cli_helpers import assert_one_line_error as _assert_one_line_error, invoke

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = ("fdk.nii.gz", "slices.png", "metrics.json")
# a negative x axis and anisotropic voxels; world box centre (-29.5, 8.75, 44.5) mm
AFFINE = np.array([[-3.0, 0, 0, 5.0], [0, 2.5, 0, -20.0], [0, 0, 3.0, 10.0], [0, 0, 0, 1]])
BALL_CENTRE = np.array([-20.0, 14.0, 50.0])  # mm, off-centre so orientation errors show


def _tiny_ct(path: Path, nan: bool = False) -> Path:
    """24^3 CT in HU: air, a water cylinder (r 25 mm) and a 1000 HU ball (r 9 mm)."""
    idx = np.stack(np.meshgrid(*[np.arange(24)] * 3, indexing="ij"), -1)
    world = idx @ AFFINE[:3, :3].T + AFFINE[:3, 3]
    centre = AFFINE[:3, :3] @ np.full(3, 11.5) + AFFINE[:3, 3]
    hu = np.full((24, 24, 24), -1000.0, np.float32)
    hu[np.linalg.norm(world[..., :2] - centre[:2], axis=-1) < 25] = 0.0
    hu[np.linalg.norm(world - BALL_CENTRE, axis=-1) < 9] = 1000.0
    if nan:
        hu[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(hu, AFFINE), str(path))
    return path


def test_info_reports_versions_and_device():
    result = invoke("info")
    assert result.exit_code == 0, result.output
    for word in ("rgs", "torch", "taichi", "device"):
        assert word in result.stdout


def test_roundtrip_writes_outputs_then_refuses_to_overwrite(tmp_path):
    ct_path = _tiny_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "run"
    args = ["roundtrip", str(ct_path), "--out", str(out), "--grid", "24", "--views", "24",
            "--det", "32"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "metrics.json").read_text())
    assert report["grid"]["shape"] == [24, 20, 24] and report["views"] == 24
    assert report["psnr_3d"] > 20 and 0.5 < report["ssim_3d"] <= 1
    assert set(report["seconds"]) >= {"project", "fdk"}
    assert (out / "slices.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the reconstruction sits in the CT's world frame: the dense ball lands where it was
    img = nib.load(str(out / "fdk.nii.gz"))
    rec = img.get_fdata()
    idx = np.argwhere(rec > 0.75 * rec.max())  # the 0.04 /mm ball, not the water
    centroid = idx.mean(0) @ img.affine[:3, :3].T + img.affine[:3, 3]
    np.testing.assert_allclose(centroid, BALL_CENTRE, atol=3.0)

    before = {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in OUTPUTS}
    _assert_one_line_error(invoke(*args), "exists: pass --force")
    assert before == {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns)
                      for name in OUTPUTS}
    assert invoke(*args, "--force").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # no temp files left


def test_roundtrip_rejects_nan_ct(tmp_path):
    ct_path = _tiny_ct(tmp_path / "nan.nii.gz", nan=True)
    _assert_one_line_error(invoke("roundtrip", str(ct_path), "--out", str(tmp_path / "r")), "NaN")
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_missing_file_is_one_line_exit_2_from_a_real_process(tmp_path):
    package = "rgs_cli" if importlib.util.find_spec("rgs_cli") else "cli"
    done = subprocess.run([sys.executable, "-m", package, "roundtrip", str(tmp_path / "none.nii.gz"),
                           "--out", str(tmp_path / "r")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no such file" in lines[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, text", [
    (["--grid", "4"], "--grid 4 is too small"),
    (["--dso", "20"], "increase the source distance (--dso)"),
    (["--dso", "1000", "--dsd", "900"], "DSD > DSO"),
])
def test_roundtrip_rejects_bad_options(tmp_path, args, text):
    ct_path = _tiny_ct(tmp_path / "ct.nii.gz")
    _assert_one_line_error(invoke("roundtrip", str(ct_path), "--out", str(tmp_path / "r"), *args), text)


CHEST_CT = ROOT / ".cache" / "ct" / "cxr.nii.gz"


@pytest.mark.slow
@pytest.mark.skipif(not CHEST_CT.is_file(), reason="fetch the CT first: python datasets/fetch_ct.py")
def test_roundtrip_on_the_real_chest_ct(tmp_path):
    result = invoke("roundtrip", str(CHEST_CT), "--out", str(tmp_path), "--grid", "96",
                     "--views", "120")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["grid"]["shape"] == [96, 96, 89]  # 360 x 360 x 332.5 mm at 3.75 mm
    assert report["psnr_3d"] > 32 and report["ssim_3d"] > 0.85
