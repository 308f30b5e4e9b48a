"""``rgs track4d`` (breathing) end to end on a small simulated breathing case, resume, errors."""
import json
import pickle
from pathlib import Path

import nibabel as nib
import pytest

from chest_phantom import write_chest_nifti
from cli_helpers import assert_one_line_error, interrupt_at, invoke
from rgs_engine.motion.track4d import REGULAR_WANDER_CYCLES, Track4DReconstruction
from rgs_engine.pipelines.breathing import suspect_warnings

try:
    from cli import track4d as track4d_cli
except ImportError:  # an installed rgs
    from rgs_cli import track4d as track4d_cli

SHORT = ("--static-iterations", "20", "--iterations", "20", "--period-init", "3.5", "--time-input", "time")


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Path:
    """24^3 chest phantom breathing with a 4 s period: 40 projections of 24^2 over 16 s."""
    folder = tmp_path_factory.mktemp("case4d")
    ct = write_chest_nifti(folder / "chest.nii.gz")
    out = folder / "case.pickle"
    result = invoke("simulate4d", ct, out, "--grid", "24", "--projections", "40", "--val-projections",
                    "3", "--det", "24", "--scan-seconds", "16", "--period", "4", "--phases", "4")
    assert result.exit_code == 0, result.output
    return out


def test_track4d_writes_phases_gif_and_metrics(case, tmp_path):
    out = tmp_path / "run"
    # the static stage's initialisation can be chosen (GSConfig.motion_start keeps an explicit one)
    result = invoke("track4d", case, "--out", out, *SHORT, "--set", "recipe.init=sart")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["config"]["recipe"]["init"] == "sart"
    img = nib.load(out / "phases.nii.gz")
    assert img.shape == (24, 24, 24, 4)
    assert (out / "phases.gif").read_bytes()[:6] == b"GIF89a"
    m = json.loads((out / "metrics.json").read_text())
    assert m["period_truth_s"] == 4.0 and m["period_truth_source"] == "file"
    assert m["period_error_pct"] == pytest.approx(100 * abs(m["period_s"] - 4.0) / 4.0)
    assert len(m["psnr_3d"]) == 4 and m["psnr_3d_mean"] == pytest.approx(sum(m["psnr_3d"]) / 4)
    assert m["psnr_3d_mean"] > 15 and m["test_views"] == 3 and m["iterations"] == 40
    assert m["phase_times_note"] == "ground-truth phase times"
    assert m["period_initial_s"] == 3.5 and m["period_estimate_s"] > 0 and 0 < m["period_estimate_power"] <= 1
    assert m["time_input"] == m["time_input_option"] == "time" and m["phase_wander_cycles"] >= 0
    # 20 steps leave the period near its 3.5 s start (the projections show about 4 s) and
    # teach K-planes no visible motion yet (measured 0.00 mm; 1 mm = half a voxel): flagged
    mismatch = 100 * abs(m["period_s"] - m["period_estimate_s"]) / m["period_estimate_s"]
    assert m["period_mismatch_pct"] == pytest.approx(mismatch) and mismatch > 5, m
    assert m["motion_floor_mm"] == pytest.approx(0.5 * min(img.header.get_zooms()[:3]), rel=1e-5)
    assert 0 <= m["motion_mm"] < m["motion_floor_mm"], m
    err = result.stderr.replace("\n", " ")
    assert "learned no visible motion" in err and "another --seed" in err, err
    config = json.loads((out / "config.json").read_text())
    assert "--deformation kplanes" in config["command"] and "--static-iterations 20" in config["command"]
    # outputs are kept unless --force
    again = invoke("track4d", case, "--out", out, *SHORT)
    assert_one_line_error(again, "pass --resume to continue it or --force")


def test_track4d_interrupt_then_resume(case, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupt_at(monkeypatch, Track4DReconstruction, 25, "signal")  # Ctrl-C during step 25: the run stops after it
    # a --set override (the surrogate's rates: unused by anchors) is kept with the run
    result = invoke("track4d", case, "--out", out, *SHORT[:4], "--deformation", "anchors",
                    "--set", "lr_surrogate=[0.002, 0.0002]")
    assert result.exit_code == 130, result.output
    config = json.loads((out / "config.json").read_text())
    command = config["command"]
    assert "--time-input auto" in command and "--period-init" not in command  # the default
    assert config["config"]["lr_surrogate"] == [0.002, 0.0002] and "lr_surrogate=[0.002, 0.0002]" in command
    bad = invoke("track4d", case, "--out", out, "--resume", "--set", "lr_surrogate=[0.003, 0.0003]")
    assert_one_line_error(bad, "--set lr_surrogate [0.003, 0.0003] differs from the run")
    assert "resume with: rgs track4d" in result.stderr and not (out / "metrics.json").exists()
    bad = invoke("track4d", case, "--out", out, "--resume", "--deformation", "kplanes")
    assert_one_line_error(bad, "--deformation kplanes differs from the run")
    bad = invoke("track4d", case, "--out", out, "--resume", "--period-init", "3.5")
    assert_one_line_error(bad, "--period-init 3.5 differs from the run in")
    assert "(--period-init default)" in bad.stderr.replace("\n", " ")
    bad = invoke("track4d", case, "--out", out, "--resume", "--time-input", "time")
    assert_one_line_error(bad, "--time-input time differs from the run")
    result = invoke("track4d", case, "--out", out, "--resume", "--set", "lr_surrogate=[0.002, 0.0002]")
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed_from"] == 25 and m["iterations"] == 40
    assert m["deformation"] == "anchors" and m["time_input_option"] == "auto"
    # the estimate and the choice made when stage 2 started (step 21) came back with the
    # checkpoint: phase input (started from the estimate) where the cycles keep the period
    regular = m["phase_wander_cycles"] is not None and m["phase_wander_cycles"] <= REGULAR_WANDER_CYCLES
    assert m["time_input"] == ("phase" if regular else "time"), m
    assert m["period_initial_s"] == (m["period_estimate_s"] if regular else 2.8)
    assert abs(m["period_estimate_s"] - 4.0) < 0.4


def test_track4d_bad_input_is_one_line_errors(case, tmp_path):
    assert_one_line_error(invoke("track4d", tmp_path / "missing.pickle", "--out", tmp_path / "o"),
                          "not found")
    assert_one_line_error(invoke("track4d", case, "--out", tmp_path / "o", "--views", "30"),
                          "--views does not apply to --mode breathing")
    assert_one_line_error(invoke("track4d", case, "--out", tmp_path / "o", "--time-smoothness", "1"),
                          "--time-smoothness applies to --mode dsa only")
    assert_one_line_error(invoke("track4d", case, "--out", tmp_path / "o", "--period-init", "-1"),
                          "--period-init -1: give a positive period in seconds, or auto")
    assert_one_line_error(invoke("track4d", case, "--out", tmp_path / "o", "--resume"),
                          "there is no run to resume")
    for sets, message in ((["nonsense=1"], "--set nonsense: no such 4D recipe field"),
                          (["recipe.iterations=5"], "--set recipe.iterations: use the --static-iterations option"),
                          (["recipe.rate_scale=fast"], "a value has the wrong type"),
                          (["rate_scale"], "is not KEY=VALUE")):
        assert_one_line_error(invoke("track4d", case, "--out", tmp_path / "o", *[a for s in sets for a in ("--set", s)]),
                              message)
    assert_one_line_error(invoke("track4d", case, "--out", tmp_path / "o", "--mode", "dsa", "--set", "iterations=3"),
                          "--set does not apply to --mode dsa")
    assert not (tmp_path / "o").exists()  # nothing written
    with open(case, "rb") as f:
        data = pickle.load(f)
    del data["train"]["time"]
    no_time = tmp_path / "no_time.pickle"
    no_time.write_bytes(pickle.dumps(data))
    assert_one_line_error(invoke("track4d", no_time, "--out", tmp_path / "o"), "no 'time'")


def test_period_and_motion_warnings():
    auto, fixed = True, False  # the period started from the projections' estimate, or not
    report = {"period_s": 3.1, "period_estimate_s": 3.5, "period_initial_s": 2.8, "motion_mm": 9.0,
              "motion_floor_mm": 0.7}
    assert suspect_warnings({**report, "period_mismatch_pct": 4.9}, fixed) == []
    assert "3.100 s is 11 % from the 3.500 s" in " ".join(suspect_warnings({**report, "period_mismatch_pct": 11.4}, fixed))
    assert "--period-init SECONDS" in " ".join(suspect_warnings({**report, "period_mismatch_pct": 11.4}, auto))
    err = " ".join(suspect_warnings({**report, "period_estimate_s": None, "period_mismatch_pct": None}, auto))
    assert "no breathing period" in err and "learned from 2.8 s" in err, err
    # a model that did not move: its period means nothing, the advice is another seed
    err = " ".join(suspect_warnings({**report, "motion_mm": 0.02, "period_mismatch_pct": 20.0}, fixed))
    assert "no visible motion (0.02 mm" in err and "3.500 s period" in err and "another --seed" in err, err
    assert "learned period" not in err
    # no motion in the model and none in the projections: nothing to say
    assert suspect_warnings({**report, "motion_mm": 0.02, "period_estimate_s": None,
                             "period_mismatch_pct": None}, fixed) == []


def test_summary_says_where_the_period_truth_came_from():
    from_file = {"period_s": 3.98, "period_truth_s": 4.0, "period_truth_source": "file", "period_error_pct": 0.5}
    assert track4d_cli._period_cell(from_file) == "3.980  (truth 4 from the file's period_s, 0.50 % off)"
    derived = {**from_file, "period_truth_s": 3.7, "period_truth_source": "phase_times_s", "period_error_pct": 7.57}
    assert "(truth 3.7 from the file's phase_times_s, 7.57 % off)" in track4d_cli._period_cell(derived)
    unknown = {"period_s": 3.98, "period_truth_s": None, "period_truth_source": None, "period_error_pct": None}
    assert track4d_cli._period_cell(unknown) == "3.980  (no truth: the file states no period)"
