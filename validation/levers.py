"""Quality levers of ``rgs recon``'s Gaussian recipe, each measured against the recipe (issue 18).

Each lever is a change of the recipe that a user can make from the command line
(``--init``, ``--set KEY=VALUE``); ``A+B`` makes both changes in one run. Every variant is one
``rgs recon DATA --views V --seed S --iterations N`` run as a user runs it (its own process),
on the full-size sparse-view case of ``validation/sparse_view.py`` (the chest CT at 256^3,
circular views of 512^2, R2-Gaussian's noise; 25 views unless ``--views``); put ``recipe``
(the unchanged recipe) in the same invocation so that the comparison is on the same card. The
data file is simulated first when it is missing (the same command as ``sparse_view.py --size full``).

Outputs: ``OUT/levers.md`` (table: 3D PSNR / SSIM, the difference to ``recipe`` at the same
views, seed and iterations, seconds, Gaussians, card and date; the commands) and
``OUT/results/levers.json``. Rows accumulate over invocations: a new row replaces the one of
the same lever, views, seed, iterations and recipe; the hand-written ``## Reading`` of ``levers.md``
is kept. A variant folder whose ``metrics.json`` has the same iterations, views and data file
is reused (``--force``: run again).

Usage::

    python datasets/fetch_ct.py
    python validation/levers.py [--levers recipe,densify-4,views-4+rates-2x] [--iterations 2000]
        [--views 25] [--seed 0] [--device cuda] [--work runs/levers] [--out-dir validation] [--force]
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

from rgs_engine.core import runtime  # noqa: E402

console = Console()
# name: (the options that make it, what it changes)
LEVERS: dict[str, tuple[list[str], str]] = {
    "recipe": ([], "the recipe as it is"),
    "fdk-init": (["--init", "fdk"], "Gaussians sampled from the FDK volume instead of SART's (the start until "
                                    "2026-12-05; SART's is the denoised one)"),
    "tv-0.05": (["--set", "tv_weight=0.05"], "2.5x the TV weight"),
    "tv-0.01": (["--set", "tv_weight=0.01"], "half the TV weight"),
    "tv-0.04": (["--set", "tv_weight=0.04"], "twice the TV weight"),
    "tv-0.08": (["--set", "tv_weight=0.08"], "4x the TV weight"),
    "tv-0": (["--set", "tv_weight=0"], "no TV"),
    "tv-patch-64": (["--set", "tv_size=64"], "TV on a 64^3 sub-grid instead of 32^3"),
    "views-4": (["--set", "views_per_step=4"], "4 views per step instead of 8"),
    "ssim-0.5": (["--set", "ssim_weight=0.5"], "twice the D-SSIM weight"),
    "densify-4": (["--set", "densify_rounds=4"], "4 densification rounds (the recipe's choice from 200 measured "
                                                "pixels per Gaussian; none below)"),
    "scale-floor": (["--set", "scale_min=0.002"], "no Gaussian thinner than 0.002 of the box (about half a voxel "
                                                 "at 256^3) instead of 0.0005"),
    "rates-1x": (["--set", "rate_scale=1"], "the base learning rates (the recipe: 1.5x, since 2026-12-05)"),
    "rates-2x": (["--set", "rate_scale=2"], "2x the base learning rates instead of 1.5x"),
    "count-100k": (["--set", "num_init=100000"], "100k Gaussians instead of the automatic 50k at 256^3"),
    "count-150k": (["--set", "num_init=150000"], "150k Gaussians instead of the automatic 50k at 256^3"),
}


def lever_options(name: str) -> tuple[list[str], str]:
    """The options and description of lever ``name``: one of :data:`LEVERS`, or several joined
    by ``+`` (``views-4+rates-2x``: both changes in one run)."""
    parts = name.split("+")
    if "recipe" in parts and len(parts) > 1:
        raise SystemExit(f"error: --levers: {name}: recipe is the unchanged recipe; combine only the others")
    if unknown := [p for p in parts if p not in LEVERS]:
        raise SystemExit(f"error: --levers: unknown {', '.join(unknown)}; use any of {', '.join(LEVERS)}, "
                         "or several joined by +")
    return [o for p in parts for o in LEVERS[p][0]], "; ".join(LEVERS[p][1] for p in parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="the circular .h5 of sparse_view.py --size full")
    ap.add_argument("--levers", default=",".join(LEVERS),
                    help=f"comma-separated, of: {', '.join(LEVERS)}; A+B: both in one run")
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--views", type=int, default=VIEWS, help="training views (evenly spaced of the file's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "levers")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "validation")
    ap.add_argument("--force", action="store_true", help="run every variant again")
    args = ap.parse_args(argv)
    levers = {n.strip(): lever_options(n.strip()) for n in args.levers.split(",") if n.strip()}
    prefix, prefix_text = rgs_prefix()
    if not args.data.is_file():
        ct = CTS["chest"][0]
        if not ct.is_file():
            raise SystemExit(f"error: {_rel(ct)} not found: run python datasets/fetch_ct.py first")
        sim = prefix + ["simulate"] + simulate_argv(ct, "circular", args.data, SIZES["full"], 0, args.device)
        console.print(f"simulating: {shown(sim, len(prefix), prefix_text)}")
        if run_command(sim) != 0:
            raise SystemExit("error: the simulation failed")
    out = args.out_dir.resolve()
    res = load(out) | {"data": _rel(args.data)}
    script = "python validation/levers.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    tag = ("" if args.views == VIEWS else f"-v{args.views}") + (f"-s{args.seed}" if args.seed else "")
    done = 0
    for name, (opts, what) in levers.items():
        folder = args.work / f"{name}-it{args.iterations}{tag}"
        argv_ = prefix + ["recon", str(args.data), "--out", str(folder), "--views", str(args.views),
                          "--seed", str(args.seed), "--device", args.device, "--iterations", str(args.iterations),
                          *opts]
        metrics = None if args.force else reusable(folder / "metrics.json", args.iterations, args.data, args.views)
        if metrics is None:
            console.print(f"{name}: {shown(argv_, len(prefix), prefix_text)}")
            t0 = time.perf_counter()
            if (rc := run_command(argv_ + ["--force"])) != 0:
                console.print(f"[red]{name}: exit status {rc}[/red]")
                continue
            metrics = json.loads((folder / "metrics.json").read_text())
            console.print(f"{name}: {metrics['psnr_3d']:.2f} dB in {metrics['seconds']:.1f} s "
                          f"(process {time.perf_counter() - t0:.1f} s)")
        row = {"lever": name, "what": what, "base": RECIPE, "views": args.views, "seed": args.seed,
               "iterations": args.iterations, "date": _dt.date.today().isoformat(),
               "command": shown(argv_, len(prefix), "rgs"), "script": script,
               **{k: metrics.get(k) for k in ("psnr_3d", "ssim_3d", "seconds", "num_gaussians",
                                              "device", "seconds_by_stage")}}
        res["variants"] = [v for v in res["variants"] if key(v) != key(row)] + [row]
        write(res, out)  # after each variant: a time-out keeps the finished ones
        done += 1
    if not done:
        raise SystemExit("error: no variant finished")
    return 0


# the recipe a row's lever changes: rows without "base" ran before densification followed the
# data (2026-12-05), on the recipe with 4 densification rounds at every view count; then came
# densification by the data (1x rates), then 1.5x rates
RECIPE = "by-data densification, 1.5x rates"
OLD_RECIPE = "4 densification rounds"
BASES = (OLD_RECIPE, "densification by the data", RECIPE)  # oldest first


def base(row: dict) -> str:
    """The recipe ``row``'s lever was applied to (one of :data:`BASES`)."""
    return row.get("base", OLD_RECIPE)


def key(row: dict) -> tuple:
    """What makes two rows the same measurement (a new one replaces the old)."""
    return row["lever"], row["views"], row["seed"], row["iterations"], base(row)


def load(out: Path) -> dict:
    """The rows of ``out/results/levers.json`` so far (``{"variants": []}`` without one)."""
    path = out / "results" / "levers.json"
    return json.loads(path.read_text()) if path.is_file() else {"variants": []}


def write(res: dict, out: Path) -> None:
    """``out/levers.md`` and ``out/results/levers.json`` of the rows so far; ``levers.md``'s
    hand-written reading (from its ``## Reading`` heading on) is kept."""
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / "levers.json").write_text(json.dumps(res, indent=2) + "\n")
    md = out / "levers.md"
    reading = md.read_text().partition("\n## Reading")[2] if md.is_file() else ""
    md.write_text(markdown(res) + ("\n## Reading" + reading if reading else ""))
    console.print(f"wrote {_rel(md)}, {_rel(out / 'results' / 'levers.json')}")


def markdown(res: dict) -> str:
    """The table of ``res``'s rows, sorted by views, seed and iterations, each with its difference
    against the ``recipe`` row of the same views, seed and iterations."""
    rows = sorted(res["variants"], key=lambda v: (BASES.index(base(v)), v["views"], v["seed"], v["iterations"]))
    recipes = {key(v)[1:]: v for v in rows if v["lever"] == "recipe"}
    lines = ["# Quality levers of `rgs recon` (`validation/levers.py`)", "",
             f"`{res['data']}` (`sparse_view.py --size full`'s file: the chest CT at 256^3, 512^2 detector, "
             "R2-Gaussian's noise); each row is its own `rgs recon` process, its command below. `seconds`: "
             "the run's own figure. `recipe`: the recipe the lever changes, oldest first: "
             f"{'; '.join(BASES)} (all 2026-12-05); `vs recipe`: against the "
             "`recipe` row of that recipe and the same views, seed and iterations.", "",
             "| lever | what it changes | recipe | views | seed | iterations | 3D PSNR (dB) | vs recipe (dB) | "
             "SSIM | seconds | Gaussians | measured |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for v in rows:
        b = recipes.get(key(v)[1:])
        delta = "-" if b is None or v is b else f"{v['psnr_3d'] - b['psnr_3d']:+.2f}"
        card = runtime.device_name(str(v["device"])).removeprefix("NVIDIA ")
        lines.append(f"| {v['lever']} | {v['what']} | {base(v)} | {v['views']} | {v['seed']} | {v['iterations']} | "
                     f"{v['psnr_3d']:.2f} | {delta} | {v['ssim_3d']:.3f} | {v['seconds']:.1f} | "
                     f"{v['num_gaussians']} | {card}, {v['date']} |")
    lines += ["", "## Commands", "", "```", *[v["command"] for v in rows], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
