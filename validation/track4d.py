"""Continuous-time 4D breathing reconstruction on a real chest CT: rgs track4d vs a static fit.

X2-Gaussian's task on cases made from the chest CT of ``datasets/fetch_ct.py``
(``.cache/ct/cxr.nii.gz``) by ``rgs simulate4d`` (the same code, called here):

* ``regular``: period 3.5 s, peak SI 15 mm (diaphragm) and AP 5 mm (chest wall);
* ``irregular``: mean period 3.5 s with cycle-to-cycle period and amplitude jitter and one
  deeper breath (the peaks are reached there);
* ``amplitude-drift``: the regular case with breaths growing 30 % shallower over the scan;
* ``baseline-shift``: the regular case with the end-exhale level rising by 30 % of the peak
  over the scan (the breath itself 30 % shallower, so the peaks stay);

each a 256^3-class grid (1.4 mm), 300 cone-beam projections of 256^2 over a 60 s turn,
10 held-out views, TIGRE noise (1e4 photons, sigma 10), 10 ground-truth phases over the
cycle in mid-scan. Per case, every method reconstructs the same projections:

* ``kplanes`` / ``anchors``: ``rgs track4d CASE --out DIR --deformation M`` with the default
  recipe, run as a user runs it (a subprocess; ``seconds`` is its wall time, loading included);
  the default ``--time-input auto`` picks phase input (every cycle alike, the period started
  from the projections' estimate) for breathing that keeps its period, else time input;
  ``kplanes-surrogate`` is ``--time-input surrogate`` (each view's breathing phase and depth
  from the projections, :mod:`rgs_engine.motion.surrogate`, refined in training);
  ``M-time-3000`` is the earlier default (``--time-input time --iterations 3000``, the period
  started at X2-Gaussian's 2.8 s), ``M-time-3000-estimate`` the same with ``--period-init
  auto`` (started from the estimate), ``kplanes-phase-3000`` phase input for 3000 steps;
* ``static``: the static Gaussian recipe of ``rgs recon`` (``GaussianReconstruction`` with
  the default ``GSConfig``) on all projections, ignoring time: one volume, compared to every
  phase; ``fdk``: FDK of all projections, the same way.

Metrics per phase (3D PSNR / SSIM against the ground-truth phase, the definitions of
``rgs recon``), their means, the learned period and its error. Each case writes
``OUT/results/track4d_CASE.json`` (and ``_slices.npz``: float16 central coronal slices at
two phases half a cycle apart, for the picture); ``--report`` turns the JSON files into
``OUT/track4d.md`` (table, setup, bars) and ``OUT/track4d.png`` (per-phase PSNR and slices,
needs matplotlib).

Usage::

    python datasets/fetch_ct.py                      # once
    python validation/track4d.py --case regular      # GPU: about 12 minutes per case (all methods)
    python validation/track4d.py --case irregular
    python validation/track4d.py --report            # anywhere: markdown + picture

``--quick`` (a CPU check of the script: 32^3 grid, 40 projections of 32^2, short recipes)
gives numbers that mean nothing. ``--cpu`` is a size a shared, loaded 2-core CPU finishes
in about half an hour per method: 32^3-class grid, 120 projections of 32^2 over the same 60 s
(2 per second, 7 per breath), 100 static + 300 deformation steps for the 4D runs and 400
steps for the static fit (``--static-iterations`` / ``--iterations`` change the 4D runs';
the static fit runs their sum); its results are kept apart (``track4d_CASE-cpu32.json``;
processes running other methods of the same case add to it) and
``--report`` writes them in a CPU section, e.g.::

    python validation/track4d.py --cpu --device cpu --case amplitude-drift --methods kplanes,kplanes-surrogate,static

``--grid N`` runs the full-size scan (the same 300 projections over 60 s, the same noise) on
an N^3-class grid with N^2 detector pixels and the default 4D steps: where the 4D default's
lead over ``rgs recon`` goes on small grids (results in ``track4d_CASE-gridN.json``). At any size, 4D steps other than the size's
(``--static-iterations`` / ``--iterations``) put the results in a file of their own
(``track4d_CASE[-gridN]-stepsS-I.json``), and so does another draw of a case (``--seed S``:
other noise and, irregular, other cycles; ``track4d_CASE-seedS.json``), so the default's
rows are never replaced by them; ``--report`` lists them all in a section of their own::

    python validation/track4d.py --grid 64 --case irregular --methods static,kplanes-surrogate
    python validation/track4d.py --grid 64 --case irregular --methods kplanes-surrogate --static-iterations 300 --iterations 1000

``--set KEY=VALUE`` (repeatable) measures a variant of the 4D recipe: every ``rgs track4d``
run gets the same ``--set`` (a field of ``Track4DConfig``, or ``recipe.FIELD`` of its static
stage), and the case's results go to their own file (``track4d_CASE-set-KEY=VALUE.json``),
which ``--report`` lists under "Variants" (not in the bars); run the static fit there too to
compare in one file::

    python validation/track4d.py --case irregular --methods kplanes-surrogate,static --set recipe.rate_scale=1.5
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import io
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "rgs_engine").is_dir() and str(ROOT) not in sys.path:  # this checkout's engine
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from rgs_engine.io import naf4d as data4d  # noqa: E402

from rgs_engine import fdk

from rgs_engine.core import metrics, runtime
from rgs_engine.sim import breathing_scan as sim4d  # noqa: E402
from rgs_engine.sim.breathing import breathing_cycles, motion_amplitudes  # noqa: E402
from rgs_engine.sim.scan import parse_noise  # noqa: E402
from rgs_engine.recon.gaussian import GaussianReconstruction, GSConfig  # noqa: E402
from rgs_engine.motion.track4d import REGULAR_WANDER_CYCLES, Track4DConfig  # noqa: E402
from rgs_engine.io.files import load_json, save_json, write_bytes  # noqa: E402

CT = ROOT / ".cache" / "ct" / "cxr.nii.gz"
CASES = ("regular", "irregular", "amplitude-drift", "baseline-shift")
DRIFTS = {"amplitude-drift": {"depth_drift": 0.3}, "baseline-shift": {"baseline_shift": 0.3}}
EARLIER = ("--time-input", "time", "--iterations", "3000")  # the default before time input auto
TRACK4D = {  # rgs track4d runs: method -> options
    **{m: ("--deformation", m) for m in ("kplanes", "anchors")},
    **{f"{m}-time-3000": ("--deformation", m, *EARLIER) for m in ("kplanes", "anchors")},
    **{f"{m}-time-3000-estimate": ("--deformation", m, *EARLIER, "--period-init", "auto")
       for m in ("kplanes", "anchors")},
    "kplanes-phase-3000": ("--deformation", "kplanes", "--time-input", "phase", "--iterations", "3000"),
    "kplanes-surrogate": ("--deformation", "kplanes", "--time-input", "surrogate")}
METHODS = (*TRACK4D, "static", "fdk", "ceiling")
LABELS = {**{m: f"rgs track4d ({opts[1]}{', ' if opts[2:] else ''}{' '.join(opts[2:])})"
             for m, opts in TRACK4D.items()},
          "static": "static Gaussians (rgs recon)", "fdk": "FDK (static)",
          "ceiling": "ceiling: static Gaussians of the CT held still"}
GRID, PROJECTIONS, DET = 256, 300, 256
SIZES = {  # grid, projections, detector, 4D static / deformation steps (None: the defaults)
    "gpu": (GRID, PROJECTIONS, DET, None, None), "cpu": (32, 120, 32, 100, 300),
    "quick": (32, 40, 32, 20, 20)}
NOISE = "1e4,10"
DEFAULT_4D = Track4DConfig()
BARS = {"period_error_pct": 1.0, "gain_db": 3.0, "seconds": 240.0, "inhale_db": 1.0}  # issue 20
console = Console(highlight=False, soft_wrap=True)


def results_path(out_dir: Path, case: str, suffix: str = ".json") -> Path:
    """``OUT/results/track4d_CASE.json`` (figures) or ``..._slices.npz`` (the picture's slices)."""
    return out_dir / "results" / f"track4d_{case}{'' if suffix == '.json' else '_slices'}{suffix}"


def save_results(out_dir: Path, res: dict) -> None:
    """Write a case's results (after each method, so a failure later keeps the earlier ones)."""
    slices = res["slices"]
    save_json(results_path(out_dir, res["case"]), {k: v for k, v in res.items() if k != "slices"},
              force=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{f"{name}_{k}": s for name, pair in slices.items() for k, s in enumerate(pair)})
    write_bytes(results_path(out_dir, res["case"], ".npz"), buffer.getvalue(), force=True)


def load_results(out_dir: Path, case: str) -> dict:
    """A case's saved results; ``slices`` empty where the ``_slices.npz`` is missing (figures
    copied back from a machine without it: the picture then shows no slices of that case)."""
    res = load_json(results_path(out_dir, case))
    res["slices"] = {}
    if results_path(out_dir, case, ".npz").is_file():
        with np.load(results_path(out_dir, case, ".npz")) as z:
            names = sorted({key.rsplit("_", 1)[0] for key in z.files})
            res["slices"] = {name: [z[f"{name}_0"], z[f"{name}_1"]] for name in names}
    return res


def coronal(volume: torch.Tensor) -> np.ndarray:
    """The central coronal slice in display orientation (rows z descending), averaged over
    2 x 2 pixels (the picture's resolution), float16."""
    image = volume[:, volume.shape[1] // 2, :].flip(0, 1).T.detach().float().cpu()
    return torch.nn.functional.avg_pool2d(image[None, None], 2)[0, 0].numpy().astype(np.float16)


def scores(volumes, truth: torch.Tensor) -> dict:
    """Per-phase PSNR / SSIM of (P, ...) volumes (or one volume for all) against (P, ...)."""
    volumes = [volumes] * truth.shape[0] if volumes.dim() == 3 else volumes
    psnr = [metrics.psnr_3d(v, g) for v, g in zip(volumes, truth)]
    ssim = [metrics.ssim_3d(v, g) for v, g in zip(volumes, truth)]
    return {"psnr_3d": psnr, "ssim_3d": ssim, "psnr_3d_mean": float(np.mean(psnr)),
            "ssim_3d_mean": float(np.mean(ssim))}


def run_track4d(case_path: Path, method: str, work: Path, args, device: str) -> tuple[dict, torch.Tensor]:
    """``rgs track4d`` in a subprocess: its metrics.json and its phases (P, nx, ny, nz)."""
    import nibabel as nib

    out = work / method
    cmd = [sys.executable, "-m", "cli", "track4d", str(case_path), "--out", str(out), "--force",
           "--device", device, *TRACK4D[method]]
    for option, value in (("--static-iterations", args.static_iterations), ("--iterations", args.iterations)):
        if value is not None:
            cmd += [option, str(value)]
    cmd += [a for item in args.sets for a in ("--set", item)]
    console.print("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"rgs track4d failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = load_json(out / "metrics.json")
    report["wall_seconds"] = wall
    if (out / "surrogate.csv").is_file():  # surrogate input: the per-view breathing it used
        lines = (out / "surrogate.csv").read_text().splitlines()
        columns = list(zip(*(map(float, line.split(",")) for line in lines[1:])))
        report["surrogate"] = dict(zip(lines[0].split(","), map(list, columns)))
    phases = torch.from_numpy(np.asarray(nib.load(out / "phases.nii.gz").get_fdata(dtype=np.float32)))
    return report, phases.permute(3, 0, 1, 2)


def static_fit(data, args, dev) -> torch.Tensor:
    """``rgs recon``'s default Gaussian recipe on all projections of ``data``, ignoring time."""
    steps = GSConfig().iterations if args.static_iterations is None else args.static_iterations + args.iterations
    config = GSConfig(iterations=steps, seed=args.seed)
    torch.manual_seed(config.seed)
    rec = GaussianReconstruction(data.as_static(), config)
    for _ in range(config.iterations):
        rec.step()
    return rec.volume()


def ceiling(spec: sim4d.BreathingSpec, args, dev) -> dict:
    """The same scan of the CT held still (amplitude 0), fitted by the static recipe and
    scored against the still CT: the PSNR the noise and the recipe allow without motion."""
    still = sim4d.simulate_breathing_case(CT, args.grid, replace(spec, amplitude_mm=(0.0, 0.0)))
    runtime.sync()
    t0 = time.perf_counter()
    volume = static_fit(still, args, dev)
    runtime.sync()
    return {"seconds": time.perf_counter() - t0, **scores(volume, still.phases.to(dev))}


def cycles_mean_s(setup: dict) -> float:
    """The mean length (s) of the breathing cycles covering the scan of a case's ``setup``."""
    starts, _ = breathing_cycles(setup["scan_seconds"], setup["period_s"], setup["irregular"], setup["seed"])
    return float(np.mean(np.diff(np.asarray(starts))))


def case_key(case: str, noise, size: str = "gpu", sets: tuple[str, ...] = (), grid: int | None = None,
             steps: tuple[int, int] | None = None, seed: int = 0) -> str:
    """``CASE`` with the default noise, ``+ "-noiseless"`` without; ``+ "-cpu32"`` at the
    CPU size (``--cpu``, 32^3), ``+ "-quick"`` with ``--quick``, ``+ "-gridN"`` with ``--grid
    N``; ``+ "-seedS"`` with ``--seed S`` other than 0 (another draw of the case: its noise,
    and the irregular case's cycles); ``+ "-stepsS-I"`` with 4D steps other than the size's
    (``--static-iterations S --iterations I``); ``+ "-set-KEY=VALUE"`` per ``--set`` (a
    variant's file, which ``--report`` lists apart from the bars)."""
    key = case if noise is not None else f"{case}-noiseless"
    key += {"gpu": "", "cpu": f"-cpu{SIZES['cpu'][0]}", "quick": "-quick", "grid": f"-grid{grid}"}[size]
    key += f"-seed{seed}" if seed else ""
    key += "" if steps is None else f"-steps{steps[0]}-{steps[1]}"
    return key + "".join("-set-" + "".join(c if c.isalnum() or c in "._=" else "_" for c in item) for item in sets)


def inhale_phases(setup: dict) -> list[bool]:
    """Per ground-truth phase of a case: is it an inhale phase (the diaphragm's breathing
    amplitude at least half its largest over the phases), the phases where cycles of other
    depth differ most; the others are exhale phases."""
    drifts = {k: setup[k] for k in ("depth_drift", "baseline_shift") if k in setup}
    si = motion_amplitudes(torch.tensor(setup["phase_times_s"]), setup["period_s"], setup["irregular"],
                           setup["seed"], **drifts, horizon_s=setup["scan_seconds"])[:, 2]
    lo, hi = float(si.min()), float(si.max())
    return [float(a) >= (lo + hi) / 2 for a in si]


def merge_saved(out_dir: Path, res: dict) -> None:
    """Add to ``res`` the methods (and their slices) that the saved results of the same case
    and setup hold and ``res`` lacks: another process running other methods of the case."""
    if not results_path(out_dir, res["case"]).is_file():
        return
    saved = load_results(out_dir, res["case"])
    if saved["setup"] | {"simulate_seconds": 0} == res["setup"] | {"simulate_seconds": 0}:
        res["methods"] = saved["methods"] | res["methods"]
        res["slices"] = saved["slices"] | res["slices"]


def run_case(args, case: str) -> dict:
    dev = runtime.init(args.device)
    spec = sim4d.BreathingSpec(projections=args.projections, det=args.det, noise=args.noise,
                               irregular=case == "irregular", seed=args.seed, **DRIFTS.get(case, {}))
    key = case_key(case, args.noise, args.size, args.sets, args.grid, args.custom_steps, args.seed)
    t0 = time.perf_counter()
    data = sim4d.simulate_breathing_case(CT, args.grid, spec)
    simulate_s = time.perf_counter() - t0
    truth = data.phases.to(dev)
    i_a, i_b = 0, int(data.phases.shape[0]) // 2  # the phases shown in the picture
    res = {"case": key, "date": _dt.date.today().isoformat(), "device": runtime.describe(dev),
           "versions": runtime.versions(), "quick": args.quick, **({"sets": list(args.sets)} if args.sets else {}),
           "setup": {"ct": str(CT.relative_to(ROOT)), "grid": list(data.grid.shape),
                     "spacing_mm": float(data.grid.spacing[0]), "projections": spec.projections,
                     "det": spec.det, "scan_seconds": spec.scan_seconds, "period_s": spec.period_s,
                     "irregular": spec.irregular, "amplitude_mm": list(spec.amplitude_mm),
                     "noise": None if args.noise is None else list(args.noise),
                     "phases": int(data.phases.shape[0]),
                     "phase_times_s": data.phase_times_s.tolist(), "slice_phases": [i_a, i_b],
                     "seed": spec.seed, **DRIFTS.get(case, {}),
                     **({} if args.size == "gpu" and args.custom_steps is None
                        else {"iterations_4d": [args.static_iterations, args.iterations]}),
                     "simulate_seconds": simulate_s},
           "slices": {"truth": [coronal(data.phases[i_a]), coronal(data.phases[i_b])]},
           "methods": {}}
    if results_path(args.out_dir, key).is_file():  # add to an earlier run of the same case
        old = load_results(args.out_dir, key)
        if old["setup"] | {"simulate_seconds": simulate_s} == res["setup"]:
            # rows from before per-row stamps keep the earlier file's device and date
            res["methods"] = {m: {"device": old["device"], "date": old["date"], **row}
                              for m, row in old["methods"].items()}
            res["slices"] = old["slices"] | res["slices"]
    args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        case_path = work / f"{case}.pickle"
        data4d.save_4d_pickle(case_path, data)
        for method in args.methods:
            if method in TRACK4D:
                report, phases = run_track4d(case_path, method, work, args, dev.type)
                row = {k: report[k] for k in ("period_s", "period_error_pct", "period_initial_s",
                                              "period_estimate_s", "psnr_3d", "ssim_3d",
                                              "psnr_3d_mean", "ssim_3d_mean", "psnr_2d_test",
                                              "ssim_2d_test", "seconds", "seconds_by_stage",
                                              "iterations", "num_gaussians", "motion_mm",
                                              "time_input", "phase_wander_cycles", "wall_seconds")}
                if "surrogate" in report:  # beside the simulated diaphragm amplitude at the same times
                    times = torch.tensor(report["surrogate"]["time_s"], dtype=torch.float64)
                    truth_si = motion_amplitudes(times, spec.period_s, spec.irregular, spec.seed,
                                                 **DRIFTS.get(case, {}), horizon_s=spec.scan_seconds)[:, 2]
                    row["surrogate"] = report["surrogate"] | {"truth_si_amplitude": truth_si.tolist()}
                res["slices"][method] = [coronal(phases[i_a]), coronal(phases[i_b])]
            elif method == "ceiling":
                row = ceiling(spec, args, dev)
            else:
                runtime.sync()
                t0 = time.perf_counter()
                volume = (static_fit(data, args, dev) if method == "static" else
                          fdk(data.projections.to(dev), data.geometry, data.grid))
                runtime.sync()
                row = {"seconds": time.perf_counter() - t0, **scores(volume, truth)}
                res["slices"][method] = [coronal(volume)] * 2
            res["methods"][method] = {**row, "device": res["device"], "date": res["date"]}
            merge_saved(args.out_dir, res)
            save_results(args.out_dir, res)
            console.print(f"{case} {method}: PSNR {row['psnr_3d_mean']:.2f} dB, SSIM "
                          f"{row['ssim_3d_mean']:.4f}" + (f", period {row['period_s']:.4f} s "
                          f"({row['period_error_pct']:.2f} % off)" if "period_s" in row else "")
                          + f", {row['seconds']:.1f} s")
    return res


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------
def default_method(methods: dict[str, dict]) -> str | None:
    """The method whose row measures today's default (``rgs track4d`` with K-planes and
    ``--time-input auto``, which chooses surrogate input): ``kplanes`` where it ran with
    surrogate input, else ``kplanes-surrogate`` (the same options); None where neither ran."""
    if methods.get("kplanes", {}).get("time_input") == "surrogate":
        return "kplanes"
    return "kplanes-surrogate" if "kplanes-surrogate" in methods else None


def period_truth(setup: dict) -> tuple[float, str]:
    """The period (s) a learned one is compared with, and what it is: the case's period, or
    for the irregular case (no single period) the mean of its cycles over the scan."""
    if setup["irregular"]:
        return cycles_mean_s(setup), "its cycles' mean over the scan"
    return setup["period_s"], "the case's period"


def bars(results: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(bar, PASS / FAIL / not run / stated / context, measured) rows (issue 20's bars)."""
    rows = []
    for case, r in results.items():
        methods = r["methods"]
        default = default_method(methods)
        if default is None:
            rows.append((f"{case}: the default (kplanes, surrogate input)", "not run", "-"))
            continue
        row = methods[default]
        if "static" in methods:
            gain = row["psnr_3d_mean"] - methods["static"]["psnr_3d_mean"]
            rows.append((f"{case}: the default's mean 3D PSNR >= static + {BARS['gain_db']:g} dB",
                         "PASS" if gain >= BARS["gain_db"] else "FAIL", f"{gain:+.2f} dB ({LABELS[default]})"))
        truth, what = period_truth(r["setup"])
        error = abs(row["period_s"] - truth) / truth * 100
        rows.append((f"{case}: the default's period within {BARS['period_error_pct']:g} % of {what} "
                     f"({truth:.4f} s)", "PASS" if error <= BARS["period_error_pct"] else "FAIL",
                     f"{row['period_s']:.4f} s, {error:.2f} %"))
        inhale, exhale = inhale_exhale(r["setup"], row)
        rows.append((f"{case}: the default's inhale phases no worse than its exhale phases by more "
                     f"than {BARS['inhale_db']:g} dB", "PASS" if exhale - inhale <= BARS["inhale_db"] else "FAIL",
                     f"{inhale:.2f} / {exhale:.2f} dB"))
        device = row.get("device", r["device"])
        if "cuda" in device:  # the time bar is the GPU's
            rows.append((f"{case}: the default <= {BARS['seconds']:g} s on the GPU ({device})",
                         "PASS" if row["seconds"] <= BARS["seconds"] else "FAIL", f"{row['seconds']:.0f} s"))
        for method in TRACK4D:
            if method != default and method in methods and "static" in methods:
                other = methods[method]["psnr_3d_mean"] - methods["static"]["psnr_3d_mean"]
                rows.append((f"{case}: margin over static, {LABELS[method]} "
                             f"[{time_input(method, methods[method])}]", "stated", f"{other:+.2f} dB"))
        if "ceiling" in methods and "static" in methods:
            room = methods["ceiling"]["psnr_3d_mean"] - methods["static"]["psnr_3d_mean"]
            rows.append((f"{case}: static recipe on the still CT minus static (ceiling - static, "
                         "not a bar)", "context", f"{room:+.2f} dB"))
    return rows


def time_input(method: str, row: dict) -> str:
    """``time`` / ``phase`` (+ the phase wander) of a 4D row: from its metrics, or for rows
    that predate them from the method's ``--time-input``; ``-`` for the static methods."""
    if "time_input" in row:
        wander = row["phase_wander_cycles"]
        return row["time_input"] + ("" if wander is None else f" ({wander:.3f})")
    options = TRACK4D.get(method, ())
    return options[options.index("--time-input") + 1] if "--time-input" in options else "-"


def inhale_exhale(setup: dict, row: dict) -> tuple[float, float]:
    """The inhale and exhale mean PSNR (dB) of a row over the case's :func:`inhale_phases`."""
    inhale = inhale_phases(setup)
    inhaled, exhaled = (float(np.mean([p for p, i in zip(row["psnr_3d"], inhale) if i == side]))
                        for side in (True, False))
    return inhaled, exhaled


def measured(result: dict, row: dict) -> str:
    """Where and when a row was measured: its own device and date, or (rows that predate
    them) its file's; the device as its name in brackets (``cuda:0 (NVIDIA H100 ...)``)."""
    name = runtime.device_name(row.get("device", result["device"]))
    return f"{name.removeprefix('NVIDIA ')}, {row.get('date', result['date'])}"


def markdown(results: dict[str, dict], heading: str = "# 4D breathing reconstruction (rgs track4d) "
             "on a real chest CT", picture: bool = True,
             variants: dict[tuple[str, str], dict] | None = None) -> str:
    first = next(iter(results.values()))
    s = first["setup"]
    lines = [heading, "",
             f"Measured by `validation/track4d.py` on "
             f"**{', '.join(sorted({measured(r, row) for r in results.values() for row in r['methods'].values()}))}**"
             + (" (--quick: numbers mean nothing)" if first["quick"] else "") + ".", "",
             f"Cases from `{s['ct']}` by `rgs simulate4d`: {'x'.join(map(str, s['grid']))} grid of "
             f"{s['spacing_mm']:.2f} mm, {s['projections']} projections of {s['det']}^2 over "
             f"{s['scan_seconds']:g} s (one turn), TIGRE noise {NOISE.replace(',', ' photons / sigma ')} "
             f"(none in the `-noiseless` cases), peak SI {s['amplitude_mm'][0]:g} mm / AP {s['amplitude_mm'][1]:g} mm, "
             f"period {s['period_s']:g} s (irregular: jittered cycles and one deeper breath), "
             f"{s['phases']} ground-truth phases over the cycle in mid-scan. Every method sees the "
             "same projections; static methods give one volume, scored against every phase.", "",
             "| case | method | input (phase wander) | period (s) | period error | period from the "
             "projections (s) | motion (mm) | PSNR 3D mean (dB) | inhale / exhale (dB) | SSIM 3D mean | "
             "vs static (dB) | Gaussians | seconds | measured |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for case, r in results.items():
        static = r["methods"].get("static", {}).get("psnr_3d_mean")
        for method in sorted(r["methods"], key=METHODS.index):
            row = r["methods"][method]
            period = f"{row['period_s']:.4f}" if "period_s" in row else "-"
            error = f"{row['period_error_pct']:.2f} %" if "period_s" in row else "-"
            estimate = f"{row['period_estimate_s']:.4f}" if row.get("period_estimate_s") else "-"
            motion = f"{row['motion_mm']:.2f}" if "motion_mm" in row else "-"
            gain = f"{row['psnr_3d_mean'] - static:+.2f}" if static is not None and method != "ceiling" else "-"
            lines.append(f"| {case} | {LABELS[method]} | {time_input(method, row)} | {period} | {error} | "
                         f"{estimate} | {motion} | "
                         f"{row['psnr_3d_mean']:.2f} | {'{:.2f} / {:.2f}'.format(*inhale_exhale(r['setup'], row))} | "
                         f"{row['ssim_3d_mean']:.4f} | {gain} | {gaussians(row)} | {row['seconds']:.1f} | "
                         f"{measured(r, row)} |")
    irregular = next((r["setup"] for r in results.values() if r["setup"]["irregular"]), None)
    drawn = "" if irregular is None else (
        f"; its cycles over the scan average {cycles_mean_s(irregular):.3f} s")
    lines += ["", f"True period {s['period_s']:g} s (the mean of the irregular case's cycle draw{drawn}). "
              "`seconds`: the whole `rgs track4d` "
              "invocation (loading, both stages, metrics, writing) for the 4D methods; training "
              "(static) or the reconstruction (FDK) for the others. `input`: what the deformation "
              "saw, and in brackets the phase wander of the scan's cycles (`phase_wander_cycles`, "
              "cycles); with K-planes the default `--time-input auto` now takes the surrogate "
              "(the rows without `--time-input` ran before that, when `auto` chose phase input "
              f"at a wander of at most {REGULAR_WANDER_CYCLES:g} cycles, else time input). "
              "`period from the projections`: "
              "the estimate `rgs track4d` reports (and starts the period from with phase input or "
              "`--period-init auto`; time input otherwise starts at X2-Gaussian's 2.8 s); `motion`: "
              "the learned motion's size (`motion_mm` of `metrics.json`, 99th percentile over the "
              "Gaussians); `Gaussians`: the 4D runs' count at the end (the static stage's "
              "densification included; the static stage's automatic count follows the data since "
              "2026-12-06, one initial Gaussian per "
              f"{DEFAULT_4D.recipe.pixels_per_gaussian:g} measured pixels, 150k at this size: rows "
              "measured earlier started from 50k); `-` where the run predates the column. `inhale / exhale`: the mean PSNR "
              "over the phases whose diaphragm amplitude is at least / below halfway between the "
              "phases' smallest and largest (the inhale phases are where cycles of other depth "
              "differ most).", "",
              "The `ceiling` rows fit the same scan of the CT held still (no motion) with the static "
              "recipe: the PSNR that the noise allows that recipe without motion blur. It is not a "
              f"bound on the 4D runs, which follow another schedule ({DEFAULT_4D.recipe.iterations} "
              f"static + {DEFAULT_4D.iterations} deformation steps, 3000 in the `--iterations 3000` "
              f"rows, against the static recipe's {GSConfig().iterations}, with other densification): "
              "`ceiling - static` is context, not the most a motion model can gain.", "",
              "## Bars", "",
              "| bar | result | measured |", "|---|---|---|"]
    lines += [f"| {b} | {v} | {m} |" for b, v, m in bars(results)]
    if variants:
        lines += ["", "## Variants (`--set`)", "",
                  "Each row: one run of a method with `--set` options (its own results file); `vs "
                  "static` against the static row of the same case (this file's, else the table's). "
                  "Not bars: a variant becomes the default only when it pays on every case.", "",
                  "| case | options | method | Gaussians | PSNR 3D mean (dB) | inhale / exhale (dB) | "
                  "vs static (dB) | seconds | measured |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
        for (case, options), r in variants.items():
            static = r["methods"].get("static", results.get(case, {}).get("methods", {}).get("static"))
            for method in sorted(r["methods"], key=METHODS.index):
                row = r["methods"][method]
                gain = "-" if static is None or method == "static" else f"{row['psnr_3d_mean'] - static['psnr_3d_mean']:+.2f}"
                lines.append(f"| {case} | {options} | {LABELS[method]} | {gaussians(row)} | "
                             f"{row['psnr_3d_mean']:.2f} | {'{:.2f} / {:.2f}'.format(*inhale_exhale(r['setup'], row))} | "
                             f"{gain} | {row['seconds']:.1f} | {measured(r, row)} |")
    lines += ["", "![per-phase PSNR and coronal slices](track4d.png)", ""] if picture else [""]
    return "\n".join(lines)


def gaussians(row: dict) -> str:
    """A row's final Gaussian count, ``-`` where it has none (static, FDK)."""
    return f"{row['num_gaussians']:,}" if row.get("num_gaussians") else "-"


def find_variants(out_dir: Path, results: dict[str, dict]) -> dict[tuple[str, str], dict]:
    """The ``--set`` variants' results of the cases in ``results``: ``(case, "--set K=V ...")``
    -> the file's results (``track4d_CASE-set-K=V.json``, :func:`case_key`; the options as the
    run stored them in ``sets``, else as its file name spells them)."""
    found = {}
    for case in results:
        for path in sorted((out_dir / "results").glob(f"track4d_{case}-set-*.json")):
            res = load_results(out_dir, path.stem.removeprefix("track4d_"))
            sets = res.get("sets") or path.stem.removeprefix(f"track4d_{case}").split("-set-")[1:]  # the file name's, sanitised, before 2026-12-07
            found[(case, " ".join(f"--set {item}" for item in sets))] = res
    return found


OTHER_RUN = re.compile(r"-(grid\d+|seed\d+|steps\d+-\d+)")  # a results key off the table's protocol


def other_runs_markdown(out_dir: Path) -> str:
    """A section for the runs off the main table's protocol (:func:`case_key`): other grids
    (``--grid N``), other draws (``--seed S``) and other 4D steps, with or without ``--set``.
    One row per run and method; ``vs static`` against ``rgs recon``'s row of the same case,
    grid and seed (the run's own file, else the file without steps and options). Empty
    without any."""
    paths = [p for p in sorted((out_dir / "results").glob("track4d_*.json")) if OTHER_RUN.search(p.stem)]
    if not paths:
        return ""
    found = {p.stem.removeprefix("track4d_"): load_json(p) for p in paths}  # (no slices: the rows need none)
    lines = ["## Other grids, draws and step counts", "",
             f"The scan of the table ({PROJECTIONS} projections over the same 60 s, the same noise) "
             "with one thing changed: the grid (`--grid N`: an N^3-class grid with N^2 detector "
             "pixels; the table's is 256), the draw (`--seed S`: other noise and, in the irregular "
             "case, other cycles; the table's is 0) or the 4D steps (`--static-iterations S "
             "--iterations I`). `vs static`: against `rgs recon`'s default on the same case, grid "
             "and draw.", "",
             "| case | grid | seed | 4D steps | options | method | PSNR 3D mean (dB) | inhale / exhale (dB) | "
             "vs static (dB) | seconds | measured |", "|---|---:|---:|---|---|---|---:|---:|---:|---:|---|"]

    def order(key):  # case, grid, seed, then the default steps before others, without --set first
        setup = found[key]["setup"]
        steps = setup.get("iterations_4d", [None, None])
        case = next(c for c in sorted(CASES, key=len, reverse=True) if key.startswith(c))
        return case, setup["grid"][0], setup["seed"], steps[0] is not None, [x or 0 for x in steps], found[key].get("sets", [])

    statics: dict[str, dict | None] = {}  # each base file's static row, read once (if not among found)
    for key in sorted(found, key=order):
        r = found[key]
        case, grid, seed = order(key)[:3]
        base = key.split("-steps")[0].split("-set-")[0]
        if base not in statics:
            base_res = found.get(base) or (load_json(results_path(out_dir, base))
                                           if results_path(out_dir, base).is_file() else None)
            statics[base] = base_res and base_res["methods"].get("static")
        static = r["methods"].get("static") or statics[base]
        steps = r["setup"].get("iterations_4d", [None, None])
        steps = (f"{DEFAULT_4D.recipe.iterations} + {DEFAULT_4D.iterations} (default)" if steps[0] is None
                 else f"{steps[0]} + {steps[1]}")
        for method in sorted(r["methods"], key=METHODS.index):
            row = r["methods"][method]
            gain = "-" if static is None or method == "static" else f"{row['psnr_3d_mean'] - static['psnr_3d_mean']:+.2f}"
            lines.append(f"| {case} | {grid} | {seed} | {steps if method in TRACK4D else '-'} | "
                         f"{' '.join(f'--set {item}' for item in r.get('sets', [])) or '-'} | {LABELS[method]} | "
                         f"{row['psnr_3d_mean']:.2f} | {'{:.2f} / {:.2f}'.format(*inhale_exhale(r['setup'], row))} | "
                         f"{gain} | {row['seconds']:.1f} | {measured(r, row)} |")
    return "\n".join(lines + [""])


def plot(results: dict[str, dict], path: Path) -> Path | None:
    if importlib.util.find_spec("matplotlib") is None:
        console.print("matplotlib is missing: no track4d.png (pip install '.[validation]')")
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    cases = list(results)
    pictured = [c for c in cases if "truth" in results[c]["slices"]]  # cases whose slices were kept
    rows = ["truth"] + [m for m in METHODS if any(m in results[c]["slices"] for c in pictured)
                        and m != "ceiling"]
    rows = rows if pictured else []
    height = max(len(rows), len(cases))
    fig = plt.figure(figsize=(3.2 * (2.2 + 2 * len(pictured)), 2.6 * height))
    grid = fig.add_gridspec(height, 1 + 2 * len(pictured), width_ratios=[2.2] + [1] * 2 * len(pictured))
    for c, case in enumerate(cases):
        ax = fig.add_subplot(grid[c * height // len(cases):(c + 1) * height // len(cases), 0])
        r = results[case]
        for method, row in r["methods"].items():
            ax.plot(range(len(row["psnr_3d"])), row["psnr_3d"], marker="o", ms=3,
                    color=f"C{METHODS.index(method)}", ls="--" if method == "ceiling" else "-")
        ax.set_title(f"{case}: 3D PSNR per phase")
        ax.set_xlabel("phase")
        ax.set_ylabel("dB")
        ax.grid(alpha=0.3)
        if c == 0:  # one legend for every method of every case
            shown = [m for m in METHODS if any(m in results[k]["methods"] for k in cases)]
            ax.legend(handles=[Line2D([], [], marker="o", ms=3, color=f"C{METHODS.index(m)}", label=LABELS[m],
                                      ls="--" if m == "ceiling" else "-") for m in shown], fontsize=7)
        if case not in pictured:
            continue
        col = 1 + 2 * pictured.index(case)
        lo, hi = np.quantile(np.asarray(r["slices"]["truth"], dtype=np.float32), [0.001, 0.999])
        for i, name in enumerate(rows):
            for k, phase in enumerate(r["setup"]["slice_phases"]):
                ax = fig.add_subplot(grid[i, col + k])
                if name in r["slices"]:
                    ax.imshow(np.asarray(r["slices"][name][k], dtype=np.float32), cmap="gray",
                              vmin=lo, vmax=hi)
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"{case}, phase {phase}", fontsize=8)
                if col == 1 and k == 0:
                    ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)  # a slice panel (3.2 in) gets 256 px: twice the stored slices' 128
    plt.close(fig)
    return path


def report(out_dir: Path) -> int:
    found = {size: {key: load_results(out_dir, key) for key in (case_key(c, n, size) for c in CASES
                                                                 for n in ((1,), None))
                    if results_path(out_dir, key).is_file()} for size in ("gpu", "cpu")}
    results, cpu = found["gpu"], found["cpu"]
    if not results:
        console.print(f"[red]no results under {out_dir / 'results'}: run a case first[/red]")
        return 2
    text = markdown(results, variants=find_variants(out_dir, results))
    others = other_runs_markdown(out_dir)
    text += "\n" + others if others else ""
    if cpu:
        first = next(iter(cpu.values()))["setup"]
        text += "\n" + markdown(cpu, f"## CPU, a smaller size: {first['grid'][0]}^3-class grid, "
                                     f"{first['projections']} projections of {first['det']}^2, "
                                     f"{' + '.join(map(str, first['iterations_4d']))} 4D steps "
                                     "(loaded shared 2-core machine: seconds are noisy)", picture=False)
    write_bytes(out_dir / "track4d.md", text.encode(), force=True)
    console.print(text)
    picture = plot(results, out_dir / "track4d.png")
    for p in (out_dir / "track4d.md", picture):
        if p is not None:
            console.print(f"wrote {p}")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=CASES, help="simulate and reconstruct this case")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--report", action="store_true", help="write track4d.md / .png from the results")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "validation")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()),
                    help="folder for the temporary case pickle (about 0.7 GB) and run folders")
    ap.add_argument("--noise", default=NOISE, help="PHOTONS,SIGMA (TIGRE's model) or none")
    ap.add_argument("--quick", action="store_true", help="tiny CPU check of the script")
    ap.add_argument("--cpu", action="store_true", help="a size a CPU finishes (see the module)")
    ap.add_argument("--grid", type=int, metavar="N", help="the full-size scan on an N^3-class grid with "
                    "N^2 detector pixels and the default 4D steps (see the module)")
    ap.add_argument("--static-iterations", type=int, help="4D runs' static steps (default: the size's)")
    ap.add_argument("--iterations", type=int, help="4D runs' deformation steps (default: the size's)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a variant of the 4D recipe: passed to every rgs track4d run as --set (e.g. "
                         "recipe.rate_scale=1.5); its results go to their own file, which --report leaves out")
    args = ap.parse_args(argv)
    args.noise = parse_noise(args.noise)
    args.methods = [m for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}: use {', '.join(METHODS)}")
    if not args.report and args.case is None:
        ap.error("pass --case CASE or --report")
    if args.grid is not None and (args.quick or args.cpu or args.grid < 16):
        ap.error("--grid N takes N >= 16 and neither --cpu nor --quick")
    args.size = "quick" if args.quick else "cpu" if args.cpu else "gpu" if args.grid is None else "grid"
    grid, projections, det, static_iterations, iterations = (
        (args.grid, PROJECTIONS, args.grid, None, None) if args.size == "grid" else SIZES[args.size])
    args.grid, args.projections, args.det = grid, projections, det
    if (args.static_iterations is None) != (args.iterations is None):
        ap.error("give both --static-iterations and --iterations, or neither")
    default = (static_iterations, iterations)
    if static_iterations is None and args.iterations is not None:  # the recipe's own steps
        default = (DEFAULT_4D.recipe.iterations, DEFAULT_4D.iterations)
    given = (args.static_iterations, args.iterations)
    args.custom_steps = None if args.iterations is None or given == default else given
    args.static_iterations, args.iterations = given if args.custom_steps else (static_iterations, iterations)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        return report(args.out_dir)
    if not CT.is_file():
        console.print(f"[red]{CT} is missing: run python datasets/fetch_ct.py[/red]")
        return 2
    res = run_case(args, args.case)
    console.print(f"wrote {results_path(args.out_dir, res['case'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
