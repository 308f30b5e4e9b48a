"""The NAF-style 4D pickle (X2-Gaussian's format): Projection4D, reader, writer, every error."""
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from rgs_engine.io.naf4d import Projection4D, load_4d_pickle, save_4d_pickle, x2_phase_times
from rgs_engine.core.errors import RgsInputError
from rgs_engine.core.geometry import Geometry, VolumeGrid
from rgs_engine.io.projections import ProjectionData, load_projections

GRID = VolumeGrid.centred((6, 7, 8), (10.0, 9.0, 8.0))
DET = (10, 12)


def _geometry(angles, **kw) -> Geometry:
    return Geometry.circular(angles, 300.0, 450.0, DET, (4.0, 3.5), convention="naf", **kw)


def _case(phases: int = 3, test: bool = True) -> Projection4D:
    """A small 4D case with arbitrary (but finite, positive) numbers in every field."""
    gen = torch.Generator().manual_seed(1)
    n, t = 9, 4
    time = torch.arange(n, dtype=torch.float64) / n
    extra = {}
    if test:
        test_time = torch.tensor([0.05, 0.4, 0.61, 0.9], dtype=torch.float64)
        extra = {"test_projections": torch.rand(t, *DET, generator=gen),
                 "test_geometry": _geometry(2 * math.pi * test_time.numpy()),
                 "test_time": test_time, "test_phase": torch.tensor([0, 2, 1, 0])}
    return Projection4D(
        projections=torch.rand(n, *DET, generator=gen) * 3, geometry=_geometry(2 * math.pi * time.numpy()),
        time=time, grid=GRID, scan_seconds=20.0, phase=torch.arange(n) % phases,
        phases=torch.rand(phases, *GRID.shape, generator=gen) * 0.02,
        phase_times_s=torch.linspace(8.0, 11.0, phases, dtype=torch.float64), period_s=4.0,
        conventions="made here", source="test", attributes={"note": "x", "numbers": [1, 2]}, **extra)


def _raw(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


def _dump(path: Path, raw: dict) -> Path:
    with open(path, "wb") as f:
        pickle.dump(raw, f)
    return path


def test_round_trip_keeps_everything(tmp_path):
    case = _case()
    path = save_4d_pickle(tmp_path / "case.pickle", case)
    back = load_4d_pickle(path)
    torch.testing.assert_close(back.projections, case.projections, rtol=1e-6, atol=0)
    torch.testing.assert_close(back.test_projections, case.test_projections, rtol=1e-6, atol=0)
    torch.testing.assert_close(back.geometry.vectors, case.geometry.vectors, rtol=0, atol=1e-9)
    torch.testing.assert_close(back.test_geometry.vectors, case.test_geometry.vectors, rtol=0, atol=1e-9)
    np.testing.assert_allclose(back.grid.origin, GRID.origin, atol=1e-12)
    assert back.grid.shape == GRID.shape and back.grid.spacing == GRID.spacing
    for name in ("time", "phase", "phases", "phase_times_s", "test_time", "test_phase"):
        assert torch.equal(getattr(back, name), getattr(case, name)), name
    assert (back.scan_seconds, back.period_s) == (20.0, 4.0)
    assert back.attributes == case.attributes
    assert back.conventions == "scan_seconds, period_s and phase_times_s read from the file"
    torch.testing.assert_close(back.times_s, case.time * 20.0)
    # X2-Gaussian's keys and units: projections in metres, angles in radians, image (P, ...)
    raw = _raw(path)
    assert raw["image"].shape == (3, *GRID.shape) and raw["mode"] == "cone"
    assert raw["nDetector"] == list(DET) and raw["dDetector"] == pytest.approx([4.0, 3.5])
    assert (raw["DSO"], raw["DSD"], raw["numTrain"], raw["numVal"]) == pytest.approx((300, 450, 9, 4))
    np.testing.assert_allclose(raw["train"]["projections"] * 1000, case.projections.numpy(), rtol=1e-6)
    np.testing.assert_allclose(raw["train"]["angles"], 2 * np.pi * np.arange(9) / 9, atol=1e-12)
    assert raw["totalAngle"] == pytest.approx(360.0) and raw["startAngle"] == pytest.approx(0.0)
    # a second save needs force
    with pytest.raises(RgsInputError, match="exists: pass --force"):
        save_4d_pickle(path, case)
    save_4d_pickle(path, _case(test=False), force=True)
    back = load_4d_pickle(path)
    assert back.test_projections is None and back.test_time is None


def test_without_rgs_keys_x2_convention_applies_and_is_stated(tmp_path):
    path = save_4d_pickle(tmp_path / "x2.pkl", _case(phases=10))
    raw = _raw(path)
    for key in ("scan_seconds", "period_s", "phase_times_s", "rgs_attributes"):
        del raw[key]
    back = load_4d_pickle(_dump(path, raw))
    assert back.scan_seconds == 60.0 and back.attributes == {}
    assert back.period_s is None and back.period_source is None  # no truth from the 3 s convention
    np.testing.assert_allclose(back.phase_times_s.numpy(), 0.15 + 0.3 * np.arange(10), atol=1e-12)
    np.testing.assert_allclose(x2_phase_times(10), 0.15 + 0.3 * np.arange(10), atol=1e-12)
    assert back.conventions.startswith("X2-Gaussian's convention applied")
    for part in ("60 s scan", "no breathing period stated", "t = 0.15 + 0.3 k s"):
        assert part in back.conventions
    torch.testing.assert_close(back.times_s, back.time * 60.0)
    # and a phase is optional
    del raw["train"]["phase"]
    assert load_4d_pickle(_dump(path, raw)).phase is None


def test_period_without_period_s_comes_from_phase_times_or_is_unknown(tmp_path):
    path = save_4d_pickle(tmp_path / "held_out.pkl", _case(phases=10))
    raw = _raw(path)
    del raw["period_s"]
    raw["phase_times_s"] = 11.0 + (np.arange(10) + 0.5) * 3.7 / 10  # one 3.7 s cycle from 11 s
    back = load_4d_pickle(_dump(path, raw))
    assert back.period_s == pytest.approx(3.7, rel=1e-12) and back.period_source == "phase_times_s"
    assert "breathing period 3.7 s derived from phase_times_s" in back.conventions
    # written back, the derived period is not stated as the file's own
    again = _raw(save_4d_pickle(tmp_path / "again.pkl", back))
    assert "period_s" not in again and load_4d_pickle(tmp_path / "again.pkl").period_source == "phase_times_s"
    # times that are not one cycle's evenly spaced bins give no truth
    raw["phase_times_s"] = np.array([1.0, 1.5, 3.0, 3.2, 5.0, 6.0, 6.5, 7.0, 8.0, 9.5])
    back = load_4d_pickle(_dump(path, raw))
    assert back.period_s is None and back.period_source is None
    assert "no breathing period stated in the file" in back.conventions


def _edit(key, value):
    """A change to the raw pickle dict: key is a top-level key or (split, key)."""
    def apply(raw):
        target = raw if isinstance(key, str) else raw[key[0]]
        name = key if isinstance(key, str) else key[1]
        if value is _DROP:
            del target[name]
        else:
            target[name] = value(target[name]) if callable(value) else value
    return apply


_DROP = object()
_NAN = float("nan")


@pytest.mark.parametrize("edit, message", [
    (_edit("train", _DROP), "missing key 'train'"),
    (_edit("image", _DROP), "missing key 'image'"),
    (_edit("nVoxel", _DROP), "missing key 'nVoxel'"),
    (_edit(("train", "time"), _DROP), "'train' has projections but no 'time'"),
    (_edit(("val", "time"), _DROP), "'val' has projections but no 'time'"),
    (_edit(("train", "time"), lambda t: t + 0.5), r"must lie in \[0, 1\]"),
    (_edit(("train", "time"), lambda t: t - 0.1), r"must lie in \[0, 1\]"),
    (_edit(("train", "time"), lambda t: np.where(np.arange(t.size) == 2, _NAN, t)), "NaN or Inf"),
    (_edit(("train", "time"), lambda t: t[:-1]), "give one time"),
    (_edit(("train", "phase"), lambda p: p[:-2]), "give one phase bin per projection"),
    (_edit(("train", "phase"), lambda p: p - 1), "bin indices"),
    (_edit(("train", "angles"), lambda a: a[:-1]), "one angle per projection"),
    (_edit(("train", "projections"), lambda p: np.where(p > 2e-3, _NAN, p)), "NaN or Inf"),
    (_edit(("train", "projections"), lambda p: p[:, :, :-1]), "projections must be"),
    (_edit("image", lambda v: v[0]), "a static NAF pickle; this reader needs \\(phases, nx, ny, nz\\)"),
    (_edit("image", lambda v: v[:, :, :-1]), "it must be \\(phases, nx, ny, nz\\)"),
    (_edit("image", lambda v: np.where(v > 0.01, _NAN, v)), "NaN or Inf"),
    (_edit("phase_times_s", lambda t: t[:-1]), "one time \\(s\\) per volume"),
    (_edit("phase_times_s", lambda t: t + 100), "within the scan"),
    (_edit("scan_seconds", -1.0), "positive number of seconds"),
    (_edit("period_s", "often"), "'period_s' must be 1 finite number"),
])
def test_reader_errors_name_the_problem(tmp_path, edit, message):
    path = save_4d_pickle(tmp_path / "case.pickle", _case())
    raw = _raw(path)
    edit(raw)
    with pytest.raises(RgsInputError, match=message) as info:
        load_4d_pickle(_dump(path, raw))
    assert "\n" not in str(info.value) and str(info.value).startswith(str(path))


def test_reader_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(RgsInputError, match="no such file"):
        load_4d_pickle(tmp_path / "none.pickle")
    bad = tmp_path / "bad.pickle"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(RgsInputError, match="not a readable pickle"):
        load_4d_pickle(bad)
    with pytest.raises(RgsInputError, match="expected a NAF dict"):
        load_4d_pickle(_dump(tmp_path / "list.pickle", [1, 2]))
    # the static reader points a 4D pickle here
    path = save_4d_pickle(tmp_path / "case.pickle", _case())
    with pytest.raises(RgsInputError, match="4D.*load_4d_pickle"):
        load_projections(path)


def test_writer_refuses_what_the_format_cannot_hold(tmp_path):
    case = _case()
    with pytest.raises(RgsInputError, match="end in .pickle or .pkl"):
        save_4d_pickle(tmp_path / "case.h5", case)
    off_axis = _geometry(2 * math.pi * case.time.numpy(), isocentre=(0.0, 5.0, 0.0))
    with pytest.raises(RgsInputError, match="not one NAF circular orbit"):
        save_4d_pickle(tmp_path / "a.pickle", Projection4D(
            projections=case.projections, geometry=off_axis, time=case.time, grid=GRID,
            scan_seconds=20.0, phases=case.phases, phase_times_s=case.phase_times_s))
    parallel = Geometry.circular(case.time.numpy(), 300.0, 450.0, DET, 4.0, convention="naf",
                                 mode="parallel")
    with pytest.raises(RgsInputError, match="cone-beam orbits only"):
        save_4d_pickle(tmp_path / "b.pickle", Projection4D(
            projections=case.projections, geometry=parallel, time=case.time, grid=GRID,
            scan_seconds=20.0, phases=case.phases, phase_times_s=case.phase_times_s))
    with pytest.raises(RgsInputError, match="no ground-truth phases"):
        save_4d_pickle(tmp_path / "c.pickle", Projection4D(
            projections=case.projections, geometry=case.geometry, time=case.time, grid=GRID,
            scan_seconds=20.0))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_projection4d_checks_and_static_view():
    case = _case()
    fields = dict(projections=case.projections, geometry=case.geometry, time=case.time, grid=GRID,
                  scan_seconds=20.0)
    with pytest.raises(RgsInputError, match="must come together"):
        Projection4D(**fields, phases=case.phases)
    with pytest.raises(RgsInputError, match="test projections and test times"):
        Projection4D(**fields, test_projections=case.test_projections, test_geometry=case.test_geometry)
    with pytest.raises(RgsInputError, match="geometry describes"):
        Projection4D(**{**fields, "projections": case.projections[:-1]})
    with pytest.raises(RgsInputError, match="scan length"):
        Projection4D(**{**fields, "scan_seconds": 0.0})
    with pytest.raises(RgsInputError, match="breathing period"):
        Projection4D(**fields, period_s=-3.0)
    static = case.as_static()
    assert isinstance(static, ProjectionData) and static.ground_truth is None
    torch.testing.assert_close(static.time, case.time * 20.0)
    assert torch.equal(static.test_projections, case.test_projections)
    assert static.attributes["conventions"] == "made here"
