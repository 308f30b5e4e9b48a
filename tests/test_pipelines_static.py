"""The static pipelines through the Python API alone (no Typer): ``recon``, ``simulate``,
``simulate_xrays`` and ``register`` return a RunResult, report stages and steps through the
progress callback, and ``recon`` stops on request with a checkpoint that ``resume`` continues."""
import json
import math

import numpy as np
import pytest
import torch

from blob_phantom import blob_phantom
from rgs_engine import Geometry, VolumeGrid, pipelines
from rgs_engine.core.errors import RgsInputError
from rgs_engine.io.files import save_nifti
from rgs_engine.io.projections import ProjectionData, load_projections, save_projections
from rgs_engine.pipelines import Interrupted
from rgs_engine.sim.scan import project_views

GRID = VolumeGrid.centred((16, 16, 16), 6.0)
GS_SETS = ["num_init=500", "max_gaussians=1000", "tv_size=8"]


@pytest.fixture(scope="module")
def scan_path(tmp_path_factory, device):
    """12 circular views (+ 3 held-out ones) of the 16^3 blob phantom, as rgs .h5."""
    truth = blob_phantom(GRID)
    angles = torch.arange(12, dtype=torch.float64) * (2 * math.pi / 12)
    geometry = Geometry.circular(angles, 400.0, 600.0, (24, 24), 6.0)
    test_geometry = Geometry.circular(angles[:3] + 0.2, 400.0, 600.0, (24, 24), 6.0)
    data = ProjectionData(projections=project_views(truth, GRID, geometry).cpu(), geometry=geometry,
                          grid=GRID, ground_truth=truth,
                          test_projections=project_views(truth, GRID, test_geometry).cpu(),
                          test_geometry=test_geometry, source="blob phantom")
    return save_projections(tmp_path_factory.mktemp("scan") / "scan.h5", data)


class Recorder:
    """A progress callback that keeps every event; ``stop_after(n)`` a should_stop that asks
    to stop once ``n`` step events have arrived."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def kinds(self, kind):
        return [e for e in self.events if e.kind == kind]

    def stop_after(self, steps):
        return lambda: len(self.kinds("step")) >= steps


def test_recon_gs_returns_its_result_and_reports_progress(scan_path, tmp_path):
    progress = Recorder()
    result = pipelines.recon(scan_path, tmp_path / "run", iterations=4, sets=GS_SETS, progress=progress)
    assert result.out == tmp_path / "run"
    assert [p.name for p in result.files] == ["volume.nii.gz", "slices.png", "metrics.json", "config.json",
                                              "checkpoint.pt", "gaussians.npz"]
    assert all(p.is_file() for p in result.files)
    assert result.metrics == json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert result.metrics["method"] == "gs" and result.metrics["iterations"] == 4
    assert result.metrics["num_gaussians"] == len(result.extra["reconstruction"].gaussians) > 0
    assert math.isfinite(result.metrics["psnr_3d"]) and math.isfinite(result.metrics["psnr_2d_test"])
    assert tuple(result.volumes["volume"].shape) == GRID.shape
    stages = [e.key for e in progress.kinds("stage")]
    assert stages == ["load", "initialise", "iterations", "metrics", "write"]
    assert list(result.metrics["seconds_by_stage"]) == stages
    assert [(e.done, e.total) for e in progress.kinds("step")] == [(k, 4) for k in range(1, 5)]
    assert "Gaussians" in progress.kinds("step")[-1].info and "PSNR" in progress.kinds("step")[-1].info


class _CountingRun:
    """A loop body for run_iterations whose step returns its loss as a 0-d tensor, as the
    Gaussian reconstruction does (kept on the device, no host sync per step)."""
    iteration = 0

    def step(self):
        self.iteration += 1
        return {"loss": torch.tensor(float(self.iteration)), "gaussians": 5}

    def save_checkpoint(self, path):
        pass


@pytest.mark.parametrize("info_seconds, reads", [(3600.0, [1.0, 50.0]),
                                                  (0.0, [float(i) for i in range(1, 51)])])
def test_run_iterations_reads_device_figures_only_when_reporting(tmp_path, monkeypatch,
                                                                 info_seconds, reads):
    from rgs_engine.pipelines import common

    seen = []

    def info(stats):
        seen.append(stats)
        return f"loss {stats['loss']:.1f}"

    monkeypatch.setattr(common, "INFO_SECONDS", info_seconds)
    progress = Recorder()
    out = common.run_iterations(_CountingRun(), 50, tmp_path / "ck.pt", 1000,
                                common.Reporter(progress), "x", info, "resume")
    assert out == {"loss": 50.0, "gaussians": 5} and type(out["loss"]) is float
    assert [s["loss"] for s in seen] == reads and all(type(s["loss"]) is float for s in seen)
    steps = progress.kinds("step")
    assert len(steps) == 50 and steps[-1].info == "loss 50.0"
    assert steps[1].info == ("loss 1.0" if info_seconds else "loss 2.0")


class _DivergingRun(_CountingRun):
    """Its loss turns NaN from iteration 7 on; records the checkpoints it is asked to save."""

    def __init__(self):
        self.saved = []

    def step(self):
        out = super().step()
        return {**out, "loss": out["loss"] * float("nan")} if self.iteration >= 7 else out

    def save_checkpoint(self, path):
        self.saved.append(self.iteration)


def test_run_iterations_stops_a_diverged_run_before_its_next_checkpoint(tmp_path, monkeypatch):
    from rgs_engine.pipelines import common

    monkeypatch.setattr(common, "INFO_SECONDS", 3600.0)  # figures read only when due
    run = _DivergingRun()
    with pytest.raises(RgsInputError, match="diverged: the loss is nan at iteration 10.*rate_scale"):
        common.run_iterations(run, 50, tmp_path / "ck.pt", 5, common.Reporter(), "x",
                              lambda st: "", "resume")
    assert run.saved == [5]  # the finite one; iteration 10's NaN state is not written


def test_recon_stop_request_saves_a_checkpoint_that_resume_continues(scan_path, tmp_path):
    options = {"method": "sart", "iterations": 5, "checkpoint_every": 2}
    full = pipelines.recon(scan_path, tmp_path / "full", **options)

    out = tmp_path / "part"
    progress = Recorder()
    with pytest.raises(Interrupted) as stop:
        pipelines.recon(scan_path, out, **options, progress=progress, should_stop=progress.stop_after(3))
    assert stop.value.saved and stop.value.iteration == 3 and stop.value.checkpoint == out / "checkpoint.pt"
    assert stop.value.resume_command.endswith("--resume")
    assert {p.name for p in out.iterdir()} == {"config.json", "checkpoint.pt"}
    with pytest.raises(RgsInputError, match="pass --resume"):
        pipelines.recon(scan_path, out, **options)

    progress = Recorder()
    resumed = pipelines.recon(scan_path, out, resume=True, progress=progress)
    assert [(e.done, e.total) for e in progress.kinds("step")] == [(4, 5), (5, 5)]
    assert resumed.metrics["resumed_from"] == 3 and resumed.metrics["iterations"] == 5
    assert all(p.is_file() for p in resumed.files)
    torch.testing.assert_close(resumed.volumes["volume"], full.volumes["volume"], rtol=1e-4, atol=1e-6)


def test_simulate_phantom_through_the_api(tmp_path):
    progress = Recorder()
    out = tmp_path / "scan.h5"
    result = pipelines.simulate([str(out)], phantom="shepp-logan", grid=16, box=96.0, views=8,
                                test_views=2, orbit="arbitrary", arc=180.0, det=16,
                                noise="1e4,1", progress=progress)
    assert result.out == out and result.files == [out] and out.is_file()
    data = load_projections(out)
    assert data.num_views == 8 and data.test_geometry.num_views == 2
    assert data.attributes["command"]["orbit"] == "arbitrary"
    np.testing.assert_allclose(data.ground_truth.numpy(), result.volumes["ground_truth"].cpu().numpy())
    assert result.metrics["max_line_integral"] == pytest.approx(float(data.projections.max()))
    stages = [e.key for e in progress.kinds("stage")]
    assert stages[0] == "volume" and stages[-1] == "write" and "noise" in stages
    assert list(result.metrics["seconds_by_stage"]) == stages
    with pytest.raises(RgsInputError, match="exists"):
        pipelines.simulate([out], phantom="shepp-logan", grid=16)
    with pytest.raises(RgsInputError, match="--phantom"):
        pipelines.simulate([out], phantom="cube")


def test_simulate_xrays_and_register_through_the_api(tmp_path):
    grid = VolumeGrid.centred((32, 32, 32), 3.0, (5.0, -3.0, 10.0))
    hu = blob_phantom(VolumeGrid.centred((32, 32, 32), 3.0)) / 0.02 * 1000 - 1000
    ct = save_nifti(tmp_path / "ct.nii.gz", hu, grid)
    xrays = pipelines.simulate_xrays(ct, tmp_path / "x", grid=32, det=64, offset_mm=5.0, offset_deg=3.0)
    assert [p.name for p in xrays.files] == ["geometry.json", "ap.npy", "lateral.npy"]
    assert all(p.is_file() for p in xrays.files)
    assert tuple(xrays.volumes["images"].shape) == (2, 64, 64)

    progress = Recorder()
    result = pipelines.register(tmp_path / "x", ct, tmp_path / "out", grid=32, gaussians=2000,
                                fit_iterations=150, progress=progress)
    assert [p.name for p in result.files] == ["pose.json", "overlay.png"]
    assert json.loads(result.files[0].read_text()) == json.loads(json.dumps(result.metrics))
    assert result.extra["result"].success and result.metrics["mtre_mm"] < 1.5
    assert result.extra["result"].initial_mtre_mm > 3 * result.metrics["mtre_mm"]  # 5 mm, 3 deg start
    assert [e.key for e in progress.kinds("stage")] == ["gaussians", "register", "overlay", "write"]
