"""How well the breathing depth read from the projections follows the simulated one, per cycle.

``rgs track4d``'s surrogate input scales each view's deformation by the breathing depth read
from the projections (:mod:`rgs_engine.motion.surrogate`, from the row shifts of
:mod:`rgs_engine.motion.period_estimate`). This script checks that read on its own, without
training: each case of ``validation/track4d.py`` is simulated by ``rgs simulate4d``'s code
(:func:`rgs_engine.sim.breathing_scan.simulate_breathing`, TIGRE noise), the reference of
every view is the projection of the scan's time-averaged volume (the motion-blurred volume
that the static fit approximates), and the surrogate is measured with the row shifts over
all interior rows (``all rows``, the estimate before the motion rows) and by the default
(``default``: the motion rows, or all rows where the motion rows' shifts span under
:data:`~rgs_engine.motion.period_estimate.LINEAR_SWING_PX`). Per breathing cycle of the simulation: the true depth (the SI
amplitude's swing over the cycle) against the mean measured amplitude over the cycle's
views, both relative to their medians; reported: the slope and correlation of measured on
true depth, and the deepest cycle's true and measured depth.

Usage::

    python datasets/fetch_ct.py                       # once
    python validation/surrogate_depth.py              # 128^3, 150 views of 256^2: ~4 min on 2 CPU cores
    python validation/surrogate_depth.py --grid 256   # the track4d cases' grid: ~25 min on 2 CPU cores

Writes ``validation/results/surrogate_depth_<grid>.json`` (``--out``; kept unless ``--force``).
``--track4d FILE.json`` instead reads a ``track4d.py`` results file and prints the same
per-cycle figures for the depth its surrogate runs stored (measured and refined), e.g.
``python validation/surrogate_depth.py --track4d validation/results/track4d_irregular.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "rgs_engine").is_dir() and str(ROOT) not in sys.path:  # this checkout's engine
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import track  # noqa: E402

from rgs_engine.core import runtime  # noqa: E402
from rgs_engine.core.errors import RgsInputError  # noqa: E402
from rgs_engine.core.geometry import VolumeGrid  # noqa: E402
from rgs_engine.core.projector import project  # noqa: E402
from rgs_engine.io.files import load_json, save_json  # noqa: E402
from rgs_engine.motion.period_estimate import MOTION_ROW_FRACTION, estimate_period, row_shifts  # noqa: E402
from rgs_engine.motion.surrogate import measure_surrogate  # noqa: E402
from rgs_engine.sim import breathing_scan as sim4d  # noqa: E402
from rgs_engine.sim import scan as sim  # noqa: E402
from rgs_engine.sim.breathing import breathing_cycles, displacement_field, motion_amplitudes, warp  # noqa: E402
from track4d import CT, DRIFTS  # noqa: E402  (validation/track4d.py: its cases)
from track4d import CASES as TRACK4D_CASES  # noqa: E402

CASES = {case: {"irregular": case == "irregular", **DRIFTS.get(case, {})} for case in TRACK4D_CASES}
FINE_STEP_S = 0.02  # sampling of the true curve within a cycle (s)
console = Console(highlight=False, soft_wrap=True)


def mean_volume_projections(volume: torch.Tensor, grid: VolumeGrid, spec: sim4d.BreathingSpec,
                            data) -> torch.Tensor:
    """(N, H, W) float64 CPU: every view of ``data`` projected through the scan's time-averaged
    volume (the warps at the N views' times, averaged)."""
    centred = VolumeGrid.centred(grid.shape, grid.spacing)
    field = displacement_field(volume, centred, *spec.amplitude_mm)
    amps = motion_amplitudes(data.times_s.cpu(), spec.period_s, spec.irregular, spec.seed,
                             **spec.drifts)
    mean = torch.zeros_like(volume)
    batch = max(1, (1 << 24) // volume.numel())
    for s in track(range(0, len(amps), batch), description="time-averaged volume", console=console):
        mean += warp(volume, centred, field, amps[s:s + batch]).sum(0) / len(amps)
    return torch.cat([project(mean, centred, data.geometry.subset([k])).cpu()
                      for k in range(data.geometry.num_views)]).to(torch.float64)


def cycle_depths(spec: sim4d.BreathingSpec, times_s: np.ndarray, amplitude: np.ndarray) -> np.ndarray:
    """(K, 2): per whole cycle of the simulation inside the scan, the true SI swing and the
    mean measured ``amplitude`` (N,) over the views at ``times_s`` (N,) in it."""
    starts, _ = breathing_cycles(spec.scan_seconds, spec.period_s, spec.irregular, spec.seed)
    rows = []
    for a, b in zip(starts[:-1], starts[1:]):
        inside = (times_s >= a) & (times_s < b)
        if b > spec.scan_seconds or inside.sum() < 3:
            continue
        fine = torch.arange(a, b, FINE_STEP_S, dtype=torch.float64)
        si = motion_amplitudes(fine, spec.period_s, spec.irregular, spec.seed, **spec.drifts)[:, 2]
        rows.append((float(si.max() - si.min()), float(amplitude[inside].mean())))
    return np.asarray(rows)


def depth_read(depths: np.ndarray) -> dict:
    """Slope / correlation of the measured on the true relative depth, and the deepest cycle."""
    truth, read = (depths[:, k] / np.median(depths[:, k]) for k in (0, 1))
    varied = np.ptp(truth) > 1e-6
    deepest = int(truth.argmax())
    return {"slope": float(np.polyfit(truth, read, 1)[0]) if varied else None,
            "correlation": float(np.corrcoef(truth, read)[0, 1]) if varied else None,
            "deepest_true": float(truth[deepest]), "deepest_read": float(read[deepest]),
            "read_spread": float(read.std()), "cycles": len(depths)}


def read_text(read: dict) -> str:
    """A :func:`depth_read` as one line (slope and correlation n/a where the true depth does
    not vary)."""
    slope, corr = ("n/a" if read[k] is None else f"{read[k]:.2f}" for k in ("slope", "correlation"))
    return (f"slope {slope}  corr {corr}  deepest {read['deepest_true']:.2f} read {read['deepest_read']:.2f}  "
            f"spread {read['read_spread']:.3f}")


def run_case(name: str, volume: torch.Tensor, grid: VolumeGrid, args) -> dict:
    spec = sim4d.BreathingSpec(projections=args.projections, val_projections=0, det=args.det,
                               noise=sim.parse_noise(args.noise), seed=args.seed, **CASES[name])
    t0 = time.perf_counter()
    data = sim4d.simulate_breathing(volume, grid, spec)
    reference = mean_volume_projections(volume, grid, spec, data)
    measured = data.projections.cpu().to(torch.float64)
    times = data.times_s.cpu().to(torch.float64)
    out = {"seconds": None}
    for fraction in args.fractions:
        shifts = row_shifts(measured, reference, fraction)
        period = estimate_period(times, shifts).period_s
        amplitude = measure_surrogate(times, shifts, period).amplitude.numpy()
        read = depth_read(cycle_depths(spec, times.numpy(), amplitude))
        out["all rows" if fraction >= 1 else f"fraction {fraction:g}"] = {"period_s": period, **read}
        label = "all rows" if fraction >= 1 else "default" if fraction == MOTION_ROW_FRACTION else f"rows {fraction:g}"
        console.print(f"{name:16s} {label:9s} period {period:.3f} s  {read_text(read)}")
    out["seconds"] = time.perf_counter() - t0
    return out


def stored_read(path: Path) -> None:
    """Print :func:`depth_read` of the measured and refined depth stored by each surrogate
    run of a ``track4d.py`` results file, per cycle of its simulation."""
    res = load_json(path)
    setup = res["setup"]
    spec = sim4d.BreathingSpec(scan_seconds=setup["scan_seconds"], period_s=setup["period_s"],
                               irregular=setup["irregular"], seed=setup["seed"],
                               **{k: setup[k] for k in ("depth_drift", "baseline_shift") if k in setup})
    for method, row in res["methods"].items():
        if "surrogate" not in row:
            continue
        table = row["surrogate"]
        for key in ("depth_measured", "depth"):
            read = depth_read(cycle_depths(spec, np.asarray(table["time_s"]), np.asarray(table[key])))
            console.print(f"{res['case']} {method} {key}: {read_text(read)}  ({row.get('device', '')}, "
                          f"{row.get('date', '')})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", type=int, default=128)
    p.add_argument("--det", type=int, default=256)
    p.add_argument("--projections", type=int, default=150)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--noise", default="1e4,10", help="PHOTONS,SIGMA (TIGRE's model) or none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fractions", default=f"1,{MOTION_ROW_FRACTION:g}",
                   help="row fractions compared (1: all rows)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--out", default=None, help="results JSON (default validation/results/surrogate_depth_GRID.json)")
    p.add_argument("--force", action="store_true", help="overwrite an existing results file")
    p.add_argument("--track4d", default=None, help="print the depth read stored in this track4d.py results JSON")
    args = p.parse_args(argv)
    if args.track4d:
        stored_read(Path(args.track4d))
        return
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    out = Path(args.out) if args.out else ROOT / "validation" / "results" / f"surrogate_depth_{args.grid}.json"
    try:
        if unknown:
            raise RgsInputError(f"unknown case(s) {', '.join(unknown)}: choose from {', '.join(CASES)}")
        args.fractions = [float(f) for f in args.fractions.split(",")]
        if out.exists() and not args.force:
            raise RgsInputError(f"{out} exists: add --force to overwrite it")
        if not CT.is_file():
            raise RgsInputError(f"{CT} is missing: run python datasets/fetch_ct.py")
    except (RgsInputError, ValueError) as exc:
        console.print(f"error: {exc}")
        raise SystemExit(2) from None
    dev = runtime.init(args.device)
    volume, grid = sim.load_ct_volume(CT, args.grid, dev)
    results = {"device": runtime.device_name(runtime.describe(dev)), "grid": list(grid.shape), "det": args.det,
               "projections": args.projections, "noise": args.noise, "seed": args.seed,
               "reference": "projection of the time-averaged volume", "cases": {}}
    for name in cases:
        results["cases"][name] = run_case(name, volume, grid, args)
        save_json(out, results, force=True)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
