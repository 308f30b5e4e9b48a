"""The time / quality curve of ``rgs recon --preset`` on the full-size sparse-view case (issue 18).

Each point is one ``rgs recon DATA --views 25 --seed 0 --device D`` run as a user runs it (its
own process), with ``--preset NAME`` for the presets of :mod:`rgs_engine.recon.presets` and
``--iterations N`` for points between and beyond them. ``seconds`` is the run's own figure
(``metrics.json``: loading, initialisation, iterations, metrics, writing; not the Python and
Taichi start-up). A run folder whose ``metrics.json`` has the point's iterations, views and data
file is reused (``--force`` runs it again).

The preset a run recorded is shown beside its point: a run made before a preset's name
existed (e.g. as ``--iterations 500``, or 2026-12-05's 5000-iteration run as the then ``best``,
whose larger count reaches the same 50k cap at 256^3) holds the same recipe. A point's
``note`` in the JSON (shown under the table) says where a point merged by hand from another
script's run of the same recipe came from.

Outputs: ``OUT/presets.md`` (table, commands, device), ``OUT/presets.png`` (3D PSNR against
seconds, with matplotlib) and ``OUT/results/presets.json``. The picture also shows, marked as
quoted, issue 18's figures measured on an NVIDIA H200 on 2026-11-21: the recipe of that day and
R2-Gaussian's own code on the same protocol.

Usage::

    python datasets/fetch_ct.py && python validation/sparse_view.py --size full   # the data
    python validation/presets.py [--data runs/sparse_view/full/circular.h5]
        [--points draft,fast,default,2000,5000] [--device cuda] [--work runs/presets]
        [--out-dir validation] [--force]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparse_view import ROOT, _rel, rgs_prefix, run_command, shown  # noqa: E402

from rich.console import Console  # noqa: E402

from rgs_engine.core import runtime  # noqa: E402
from rgs_engine.recon import presets  # noqa: E402
from rgs_engine.recon.gaussian import GSConfig  # noqa: E402

console = Console()
VIEWS = 25
DATA = ROOT / "runs" / "sparse_view" / "full" / "circular.h5"
# issue 18's table (NVIDIA H200, 2026-11-21, the same case): quoted, not re-measured here
QUOTED = {
    "rgs, 2026-11-21 recipe (H200)": [(29.7, 32.19), (33.0, 32.99), (72.7, 33.63)],
    "R2-Gaussian, its own code (H200)": [(105.0, 33.60), (200.0, 33.65), (595.0, 33.57)],
}


def point_argv(point: str) -> tuple[str, list[str], int]:
    """(folder name, the options that make the point, its iterations) of a preset name or a
    number of iterations."""
    if point in presets.PRESETS:
        return point, ["--preset", point], GSConfig(**presets.overrides(point)).iterations
    try:
        n = int(point)
    except ValueError:
        raise SystemExit(f"error: --points: {point!r} is neither a preset "
                         f"({', '.join(presets.PRESETS)}) nor a number of iterations") from None
    return f"it{n}", ["--iterations", str(n)], n


def reusable(metrics: Path, iterations: int, data: Path, views: int = VIEWS) -> dict | None:
    try:
        m = json.loads(metrics.read_text())
    except (OSError, ValueError):
        return None
    same = (m.get("iterations") == iterations and m.get("views") == views
            and Path(str(m.get("data"))).name == data.name)
    return m if same else None


def markdown(res: dict) -> str:
    lines = ["# Time / quality of `rgs recon`'s presets (`validation/presets.py`)", "",
             f"Measured {res['date']} on **{res['device']}**: {res['data_note']}, {VIEWS} views, "
             "seed 0. `seconds`: the run's own figure in `metrics.json` (loading, initialisation, "
             "iterations, metrics, writing; without the process start-up).", "",
             "| point | preset in metrics.json | iterations | 3D PSNR (dB) | SSIM | seconds | initialise s | "
             "iterations s | write s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in res["points"]:
        st = p["seconds_by_stage"]
        lines.append(f"| {p['point']} | {p.get('run_preset')} | {p['iterations']} | {p['psnr_3d']:.2f} | {p['ssim_3d']:.3f} | "
                     f"{p['seconds']:.1f} | {st.get('initialise', 0):.1f} | {st.get('iterations', 0):.1f} | "
                     f"{st.get('write', 0):.1f} |")
    notes = [f"* {p['point']}: {p['note']}" for p in res["points"] if p.get("note")]
    lines += ["", *notes] if notes else []
    lines += ["", "Quoted for comparison (issue 18's table, NVIDIA H200, 2026-11-21, same case; not "
              "re-measured here): " + "; ".join(f"{k}: " + ", ".join(f"{q:.2f} dB in {s:g} s" for s, q in v)
                                               for k, v in QUOTED.items()) + ".", "",
              "![PSNR against seconds](presets.png)", "", "## Commands", "", "```"]
    lines += [p["command"] for p in res["points"]] + ["```", ""]
    return "\n".join(lines)


def plot(res: dict, out_dir: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("[yellow]matplotlib is missing: no presets.png (pip install \".[validation]\")[/yellow]")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = sorted(res["points"], key=lambda p: p["seconds"])
    ax.plot([p["seconds"] for p in pts], [p["psnr_3d"] for p in pts], "o-", color="tab:red",
            label=f"rgs today ({res['device_short']})")
    for p in pts:
        ax.annotate(p["point"], (p["seconds"], p["psnr_3d"]), textcoords="offset points", xytext=(5, -12), fontsize=8)
    for (label, series), style in zip(QUOTED.items(), ("s--", "^:")):
        ax.plot(*zip(*series), style, color="grey", alpha=0.8, label=label + ", quoted")
    ax.set_xscale("log")
    ticks = [t for t in (10, 20, 30, 50, 100, 200, 300, 600) if t <= 1.5 * max(s for v in QUOTED.values() for s, _ in v)]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("seconds (run's own figure, log scale)")
    ax.set_ylabel("3D PSNR (dB)")
    ax.set_title(f"rgs recon presets: {VIEWS} views, 256^3 chest CT", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "presets.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="the circular .h5 of sparse_view.py --size full")
    ap.add_argument("--points", default=",".join([*presets.PRESETS, "2000", "5000"]),
                    help="presets and iteration counts, comma-separated")
    ap.add_argument("--device", default="cuda", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "presets")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "validation")
    ap.add_argument("--force", action="store_true", help="run every point again")
    args = ap.parse_args(argv)
    prefix, prefix_text = rgs_prefix()
    res = {"date": _dt.date.today().isoformat(), "points": [],
           "script": "python validation/presets.py " + shlex.join(sys.argv[1:] if argv is None else argv)}
    for point in [p.strip() for p in args.points.split(",") if p.strip()]:
        name, opts, iterations = point_argv(point)
        folder = args.work / name
        argv_ = prefix + ["recon", str(args.data), "--out", str(folder), "--views", str(VIEWS), "--seed", "0",
                          "--device", args.device, *opts]
        metrics = None if args.force else reusable(folder / "metrics.json", iterations, args.data)
        if metrics is None:
            if not args.data.is_file():
                raise SystemExit(f"error: {args.data} not found: run python validation/sparse_view.py --size full first")
            console.print(f"{point}: {shown(argv_, len(prefix), prefix_text)}")
            t0 = time.perf_counter()
            rc = run_command(argv_ + ["--force"])
            if rc != 0:
                console.print(f"[red]{point}: exit status {rc}[/red]")
                continue
            metrics = json.loads((folder / "metrics.json").read_text())
            console.print(f"{point}: {metrics['psnr_3d']:.2f} dB in {metrics['seconds']:.1f} s "
                          f"(process {time.perf_counter() - t0:.1f} s)")
        else:
            console.print(f"{point}: reusing {_rel(folder)} ({metrics['psnr_3d']:.2f} dB in {metrics['seconds']:.1f} s)")
        res["points"].append({"point": point, "command": shown(argv_, len(prefix), "rgs"), "run_preset": metrics.get("preset"),
                              **{k: metrics[k] for k in ("iterations", "psnr_3d", "ssim_3d", "seconds",
                                                         "seconds_by_stage", "num_gaussians", "device")}})
    if not res["points"]:
        raise SystemExit("error: no point finished")
    res["device"] = res["points"][0]["device"]
    res["device_short"] = runtime.device_name(res["device"])
    res["data_note"] = f"`{_rel(args.data)}` (the chest CT at 256^3, 512^2 detector, R2-Gaussian's noise)"
    out = args.out_dir.resolve()
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / "presets.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "presets.md").write_text(markdown(res))
    console.print(f"wrote {_rel(out / 'presets.md')}, {_rel(out / 'results' / 'presets.json')}")
    if (png := plot(res, out)) is not None:
        console.print(f"wrote {_rel(png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
