"""Quality levers of ``rgs recon``'s Gaussian recipe, each measured against the recipe (issue 18).

Each lever is a change of the recipe that a user can make from the command line
(``--init``, ``--set KEY=VALUE``). Every variant is one ``rgs recon DATA --views 25 --seed 0
--iterations N`` run as a user runs it (its own process), on the full-size sparse-view case of
``validation/sparse_view.py`` (the chest CT at 256^3, 25 circular views of 512^2, R2-Gaussian's
noise); ``recipe`` is the unchanged recipe at the same iterations, run in the same invocation
so that the comparison is on the same card. The data file is simulated first when it is missing
(the same command as ``sparse_view.py --size full``).

Outputs: ``OUT/levers.md`` (table: 3D PSNR / SSIM, the difference to ``recipe``, seconds,
Gaussians; the commands; the device) and ``OUT/results/levers.json``. A variant folder whose
``metrics.json`` has the same iterations, views and data file is reused (``--force``: run again).

Usage::

    python datasets/fetch_ct.py
    python validation/levers.py [--levers recipe,fdk-init,tv-0.05] [--iterations 2000]
        [--device cuda] [--work runs/levers] [--out-dir validation] [--force]
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
from presets import DATA, VIEWS, reusable  # noqa: E402
from sparse_view import CTS, ROOT, SIZES, _rel, rgs_prefix, run_command, shown, simulate_argv  # noqa: E402

from rich.console import Console  # noqa: E402

console = Console()
# name: (the options that make it, what it changes)
LEVERS: dict[str, tuple[list[str], str]] = {
    "recipe": ([], "the recipe as it is"),
    "fdk-init": (["--init", "fdk"], "Gaussians sampled from the FDK volume instead of SART's (the start until "
                                    "2026-12-05; SART's is the denoised one)"),
    "tv-0.05": (["--set", "tv_weight=0.05"], "2.5x the TV weight"),
    "tv-0.01": (["--set", "tv_weight=0.01"], "half the TV weight"),
    "tv-patch-64": (["--set", "tv_size=64"], "TV on a 64^3 sub-grid instead of 32^3"),
    "densify-3x": (["--set", "densify_fraction=0.09"], "3x the Gaussians added per densification round"),
    "views-4": (["--set", "views_per_step=4"], "4 views per step instead of 8"),
    "ssim-0.5": (["--set", "ssim_weight=0.5"], "twice the D-SSIM weight"),
    "densify-off": (["--set", "densify_rounds=0"], "no densification: the initial Gaussians only"),
    "scale-floor": (["--set", "scale_min=0.002"], "no Gaussian thinner than 0.002 of the box (about half a voxel "
                                                 "at 256^3) instead of 0.0005"),
    "lr-1.5x": (["--set", "rate_factor=1.5"], "1.5x every learning rate"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="the circular .h5 of sparse_view.py --size full")
    ap.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, of: {', '.join(LEVERS)}")
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--device", default="cuda", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "levers")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "validation")
    ap.add_argument("--force", action="store_true", help="run every variant again")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.levers.split(",") if n.strip()]
    if unknown := [n for n in names if n not in LEVERS]:
        raise SystemExit(f"error: --levers: unknown {', '.join(unknown)}; use any of {', '.join(LEVERS)}")
    prefix, prefix_text = rgs_prefix()
    if not args.data.is_file():
        ct = CTS["chest"][0]
        if not ct.is_file():
            raise SystemExit(f"error: {_rel(ct)} not found: run python datasets/fetch_ct.py first")
        sim = prefix + ["simulate"] + simulate_argv(ct, "circular", args.data, SIZES["full"], 0, args.device)
        console.print(f"simulating: {shown(sim, len(prefix), prefix_text)}")
        if run_command(sim) != 0:
            raise SystemExit("error: the simulation failed")
    res = {"date": _dt.date.today().isoformat(), "iterations": args.iterations, "variants": [],
           "data": _rel(args.data),
           "script": "python validation/levers.py " + shlex.join(sys.argv[1:] if argv is None else argv)}
    for name in names:
        opts, what = LEVERS[name]
        folder = args.work / f"{name}-it{args.iterations}"
        argv_ = prefix + ["recon", str(args.data), "--out", str(folder), "--views", str(VIEWS), "--seed", "0",
                          "--device", args.device, "--iterations", str(args.iterations), *opts]
        metrics = None if args.force else reusable(folder / "metrics.json", args.iterations, args.data)
        if metrics is None:
            console.print(f"{name}: {shown(argv_, len(prefix), prefix_text)}")
            t0 = time.perf_counter()
            if (rc := run_command(argv_ + ["--force"])) != 0:
                console.print(f"[red]{name}: exit status {rc}[/red]")
                continue
            metrics = json.loads((folder / "metrics.json").read_text())
            console.print(f"{name}: {metrics['psnr_3d']:.2f} dB in {metrics['seconds']:.1f} s "
                          f"(process {time.perf_counter() - t0:.1f} s)")
        res["variants"].append({"lever": name, "what": what, "command": shown(argv_, len(prefix), "rgs"),
                                **{k: metrics.get(k) for k in ("psnr_3d", "ssim_3d", "seconds", "num_gaussians",
                                                               "device", "seconds_by_stage")}})
        write(res, args.out_dir.resolve())  # after each variant: a time-out keeps the finished ones
    if not res["variants"]:
        raise SystemExit("error: no variant finished")
    return 0


def write(res: dict, out: Path) -> None:
    """``out/levers.md`` and ``out/results/levers.json`` of the variants so far."""
    res["device"] = res["variants"][0]["device"]
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / "levers.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "levers.md").write_text(markdown(res))
    console.print(f"wrote {_rel(out / 'levers.md')}, {_rel(out / 'results' / 'levers.json')}")


def markdown(res: dict) -> str:
    """The table of ``res`` (:func:`main`'s results), differences against the ``recipe`` row."""
    base = next((v for v in res["variants"] if v["lever"] == "recipe"), None)
    lines = ["# Quality levers of `rgs recon` (`validation/levers.py`)", "",
             f"Measured {res['date']} on **{res['device']}**: `{res['data']}` ({VIEWS} views; `sparse_view.py "
             "--size full`'s file is the chest CT at 256^3, 512^2 detector, R2-Gaussian's noise), "
             f"{res['iterations']} iterations, seed 0, each variant its own `rgs recon` process. `seconds`: "
             "the run's own figure.", "",
             "| lever | what it changes | 3D PSNR (dB) | vs recipe (dB) | SSIM | seconds | Gaussians |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for v in res["variants"]:
        delta = "-" if base is None or v is base else f"{v['psnr_3d'] - base['psnr_3d']:+.2f}"
        lines.append(f"| {v['lever']} | {v['what']} | {v['psnr_3d']:.2f} | {delta} | {v['ssim_3d']:.3f} | "
                     f"{v['seconds']:.1f} | {v['num_gaussians']} |")
    lines += ["", "## Commands", "", "```", *[v["command"] for v in res["variants"]], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
