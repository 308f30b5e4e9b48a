"""The motion pipelines through the Python API alone (no Typer): ``simulate4d`` ->
``track4d`` (breathing) with the period truth derived from the phase times (the loader's
other cases: tests/test_data4d.py), ``simulate_dsa`` -> ``dsa`` with a
stop request and a resume. Tiny sizes: these run on 2 CPU cores in CI."""
import json
import pickle

import numpy as np
import pytest

from chest_phantom import write_chest_nifti
from rgs_engine import pipelines
from rgs_engine.core.errors import RgsInputError
from rgs_engine.pipelines import Interrupted, RunResult

from rgs_engine.pipelines import angiography as dsa_module


class Events(list):
    """A progress callback that keeps every event."""

    def __call__(self, event):
        self.append(event)

    def kinds(self, kind: str) -> list:
        return [e for e in self if e.kind == kind]


def test_track4d_breathing_python_api_without_period_s(tmp_path):
    ct = write_chest_nifti(tmp_path / "chest.nii.gz")
    events = Events()
    sim = pipelines.simulate4d(ct, tmp_path / "case.pickle", grid=16, projections=24, val_projections=2,
                               det=16, scan_seconds=15.0, period=3.7, phases=4, progress=events)
    assert isinstance(sim, RunResult) and sim.files == [tmp_path / "case.pickle"]
    assert {e.key for e in events.kinds("stage")} >= {"volume", "write"} and sim.metrics["seconds"]
    # the held-out case of issue 20: the file states no period_s, its phase times span one cycle
    raw = pickle.loads(sim.out.read_bytes())
    del raw["period_s"]
    case = tmp_path / "no_period.pickle"
    case.write_bytes(pickle.dumps(raw))

    events = Events()
    result = pipelines.track4d(case, tmp_path / "run", static_iterations=4, iterations=4,
                               period_init="3.5", time_input="time", checkpoint_every=3,
                               progress=events, should_stop=lambda: False)
    assert [e.key for e in events.kinds("stage")] == ["load", "initialise", "iterations", "metrics", "write"]
    steps = events.kinds("step")
    assert [e.done for e in steps] == list(range(1, 9)) and steps[-1].total == 8
    m = result.metrics
    assert m == json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["period_truth_source"] == "phase_times_s" and m["period_truth_s"] == pytest.approx(3.7)
    assert m["period_error_pct"] == pytest.approx(100 * abs(m["period_s"] - 3.7) / 3.7)
    assert "derived from phase_times_s" in m["conventions"]
    assert result.volumes["phases"].shape == (4, 16, 16, 16) and m["iterations"] == 8
    assert result.files == [tmp_path / "run" / f for f in
                            ("phases.nii.gz", "phases.gif", "metrics.json", "config.json", "checkpoint.pt")]
    assert all(f.is_file() for f in result.files)
    # every warning reached the callback too
    assert [e.label for e in events.kinds("warning")] == result.warnings
    assert set(m["seconds_by_stage"]) == {"load", "initialise", "iterations", "metrics", "write"}

    # plain-string options are checked as the command line checks its choices
    with pytest.raises(RgsInputError, match="--deformation splines: use kplanes or anchors"):
        pipelines.track4d(case, tmp_path / "bad", deformation="splines")


def test_track4d_writes_the_surrogate_it_used(tmp_path):
    ct = write_chest_nifti(tmp_path / "chest.nii.gz")
    case = pipelines.simulate4d(ct, tmp_path / "case.pickle", grid=16, projections=24, val_projections=2,
                                det=16, scan_seconds=15.0, period=3.7, phases=4).out
    result = pipelines.track4d(case, tmp_path / "run", static_iterations=4, iterations=4,
                               time_input="surrogate")
    assert result.metrics["time_input"] == "surrogate"
    path = tmp_path / "run" / "surrogate.csv"
    assert path in result.files
    lines = path.read_text().splitlines()
    assert lines[0] == "time_s,phase_measured_cycles,phase_cycles,depth_measured,depth"
    rows = np.array([[float(x) for x in line.split(",")] for line in lines[1:]])
    drive = result.extra["reconstruction"].surrogate
    assert rows.shape == (drive.times_s.numel(), 5) and np.all(np.diff(rows[:, 0]) > 0)
    assert np.allclose(rows[:, 3], drive.measured_log_amplitude.exp().cpu().numpy(), rtol=1e-5)
    low, high = result.metrics["surrogate_amplitude_range"]
    assert rows[:, 4].min() == pytest.approx(low, rel=1e-4) and rows[:, 4].max() == pytest.approx(high, rel=1e-4)


def test_dsa_python_api_stop_and_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(dsa_module, "SURFACE_POINTS", 1000)  # the distances dominate on a CPU
    case = pipelines.simulate_dsa(tmp_path / "case", frames=12, grid=16, det=16).out
    out = tmp_path / "run"
    events = Events()
    with pytest.raises(Interrupted) as stop:  # a stop request after the 4th iteration's report
        pipelines.track4d(case, out, mode="dsa", views=6, iterations=10, times=[0.5, 2.0],
                          progress=events, should_stop=lambda: len(events.kinds("step")) >= 4)
    assert stop.value.saved and stop.value.iteration == 4 and stop.value.checkpoint == out / "checkpoint.pt"
    assert stop.value.resume_command.endswith("--mode dsa --resume")

    events = Events()
    result = pipelines.dsa(case, out, resume=True, progress=events)
    assert [e.key for e in events.kinds("stage")] == ["load", "initialise", "iterations", "metrics",
                                                       "write", "surface"]
    assert [e.done for e in events.kinds("step")] == list(range(5, 11))
    m = result.metrics
    assert m["resumed_from"] == 4 and m["iterations"] == 10 and m["times"] == [0.5, 2.0]
    assert m["views"] == 6 and m["heldout_frames"] == 6 and m["chamfer_mm"] is not None
    assert result.volumes["vessels"].shape == (16, 16, 16)
    assert result.extra["reconstruction"].iteration == 10
    assert all(f.is_file() for f in result.files) and len(result.files) == 7
