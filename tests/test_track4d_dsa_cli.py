"""``rgs track4d --mode dsa`` end to end on a tiny simulated DSA run: outputs, resume, errors."""
import json
from pathlib import Path

import nibabel as nib
import pytest

from cli_helpers import assert_one_line_error, interrupt_at, invoke
from rgs_engine.io.dsa_case import load_dsa
from rgs_engine.motion.dsa import DsaConfig, DsaReconstruction
from rgs_engine.io.mesh import read_ply
from rgs_engine.io.projections import ProjectionData, save_projections

from rgs_engine.pipelines import angiography as track4d_dsa

SHORT = ("--mode", "dsa", "--views", "12", "--iterations", "30")


@pytest.fixture(autouse=True)
def _fewer_surface_points(monkeypatch):
    monkeypatch.setattr(track4d_dsa, "SURFACE_POINTS", 2000)  # the distances dominate on a CPU


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Path:
    """24 frames of 32^2 over 4.4 s of a vessel tree on a 24^3 grid, with ground truth."""
    out = tmp_path_factory.mktemp("dsa") / "case"
    result = invoke("simulate-dsa", out, "--frames", 24, "--grid", 24, "--det", 32)
    assert result.exit_code == 0, result.output
    return out


def test_writes_volumes_surface_gif_and_metrics(case, tmp_path):
    out = tmp_path / "run"
    result = invoke("track4d", case, "--out", out, *SHORT, "--times", "0.5,2,4")
    assert result.exit_code == 0, result.output
    assert "Chamfer, sum (4DRGS convention, mm)" in result.stdout
    assert nib.load(out / "vessels.nii.gz").shape == (24, 24, 24)
    assert nib.load(out / "vessels_4d.nii.gz").shape == (24, 24, 24, 3)
    assert (out / "mip.gif").read_bytes()[:6] == b"GIF89a"
    vertices, faces = read_ply(out / "vessels.ply")
    assert len(faces) > 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["views"] == 12 and m["frames"] == 24 and m["heldout_frames"] == 12
    assert m["iterations"] == 30 and m["num_gaussians"] > 0 and m["times"] == [0.5, 2.0, 4.0]
    assert m["chamfer_sum_mm"] == pytest.approx(2 * m["chamfer_mm"]) and m["hd95_mm"] >= 0
    assert m["psnr_2d_heldout"] > 20 and 0 < m["ssim_2d_heldout"] <= 1
    assert m["psnr_3d_time_average"] > 15 and m["psnr_3d_frames"]
    assert m["surface_vertices"] == len(vertices) and m["seconds"] > 0
    assert m["device"].startswith(("cpu", "cuda"))
    config = json.loads((out / "config.json").read_text())
    assert "--mode dsa" in config["command"] and "--views 12" in config["command"]
    assert config["config"]["time_smoothness_weight"] == DsaConfig().time_smoothness_weight
    assert config["view_indices"] == [2 * k for k in range(12)]
    # outputs are kept unless --force
    assert_one_line_error(invoke("track4d", case, "--out", out, *SHORT),
                          "pass --resume to continue it or --force")
    result = invoke("track4d", case, "--out", out, *SHORT, "--force")
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["times"] == pytest.approx([0.0, 1.1, 2.2, 3.3, 4.4])  # the default: 5 over the run
    assert nib.load(out / "vessels_4d.nii.gz").header.get_zooms()[3] == pytest.approx(1.1)


def test_interrupt_then_resume(case, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupt_at(monkeypatch, DsaReconstruction, 11, "signal")  # Ctrl-C during step 11: the run stops after it
    result = invoke("track4d", case, "--out", out, *SHORT, "--time-smoothness", "2.5")
    assert result.exit_code == 130, result.output
    assert "resume with: rgs track4d" in result.stderr and not (out / "metrics.json").exists()
    assert_one_line_error(invoke("track4d", case, "--out", out, "--mode", "dsa", "--resume", "--views", "8"),
                          "--views 8 differs from the run")
    assert_one_line_error(invoke("track4d", case, "--out", out, "--mode", "dsa", "--resume",
                                 "--time-smoothness", "10"), "--time-smoothness 10.0 differs from the run")
    result = invoke("track4d", case, "--out", out, "--mode", "dsa", "--resume")
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed_from"] == 11 and m["iterations"] == 30
    assert json.loads((out / "config.json").read_text())["config"]["time_smoothness_weight"] == 2.5


def test_h5_with_time(case, tmp_path):
    data = load_dsa(case)
    path = save_projections(tmp_path / "run.h5", data)
    out = tmp_path / "run"
    result = invoke("track4d", path, "--out", out, "--mode", "dsa", "--views", "8", "--iterations", "5")
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["chamfer_mm"] is None and m["hd95_mm"] is None and m["psnr_3d_frames"] is None
    assert m["psnr_3d_time_average"] is not None and m["heldout_frames"] == 16


def test_bad_input_is_one_line_errors(case, tmp_path):
    out = tmp_path / "o"
    for args, text in (((tmp_path / "missing", "--out", out, "--mode", "dsa"), "not found"),
                       ((case, "--out", out, "--mode", "dsa", "--views", "1"), "at least 2 frames"),
                       ((case, "--out", out, "--mode", "dsa", "--views", "25"), "the run has only 24 frames"),
                       ((case, "--out", out, "--mode", "dsa", "--views", "12", "--times", "1,9"),
                        "--times 9 outside the run"),
                       ((case, "--out", out, "--mode", "dsa", "--time-smoothness", "-1"),
                        "--time-smoothness -1.0: give a weight >= 0"),
                       ((case, "--out", out, "--mode", "dsa", "--time-input", "phase"),
                        "--time-input does not apply to --mode dsa"),
                       ((tmp_path, "--out", out, "--mode", "dsa"), "transforms.json: missing"),
                       ((case, "--out", out, "--mode", "dsa", "--resume"), "there is no run to resume")):
        assert_one_line_error(invoke("track4d", *args), text)
    data = load_dsa(case)
    no_time = save_projections(tmp_path / "no_time.h5", ProjectionData(
        data.projections, data.geometry, data.grid, ground_truth=data.ground_truth))
    assert_one_line_error(invoke("track4d", no_time, "--out", out, "--mode", "dsa"), "has no /time")
    assert not out.exists() or not any(out.iterdir())
