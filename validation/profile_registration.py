"""Where a registration's time goes on this machine (issue 19: the median <= 0.3 s target).

Builds one vertebra's case as ``validation/registration.py`` does (its size's Gaussian fits,
cached; the same CT, views and noise) and the X-rays of the sweep's first trials of the
clean and distorted groups, then registers the same trials three ways:

* ``back-to-back``: all the trials' X-rays made first, then registered one after another;
* ``as-sweep``: each trial's X-rays made right before its registration, as the sweep does;
* ``ground-truth``: back to back with the ground truth and target points given (the
  sweep's diagnostics, which ``seconds`` leaves out).

For each way: the median ``seconds`` and the medians of when each stage ended (the global
stage's ``t`` and the result's ``timing`` entry), printed and saved as JSON with the device's
name. The 2026-12-06 sweep on an H100 took 0.38-0.43 s for T12 registrations that took
0.29 s back to back in one process (``registration_design.md``): this separates the two.
``--profile`` (CUDA) adds ``torch.profiler`` tables of one back-to-back round (GPU kernel
time, the top kernels and host calls), saved next to the JSON. ``--census`` (any device)
adds the host operations of one back-to-back round per registration and stage
(:mod:`op_census`: torch operators that do work, Taichi launches, host reads, uploads).

Usage::

    python validation/profile_registration.py --device cuda [--label 32] [--trials 6] [--repeats 3]
        [--size full] [--out validation/results/profile_registration.json] [--profile] [--census]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import registration as sweep  # noqa: E402
from op_census import Census, format_summary  # noqa: E402

from rgs_engine.core import runtime  # noqa: E402
from rgs_engine.io.files import load_nifti, save_json, write_bytes  # noqa: E402
from rgs_engine.registration import register as reg  # noqa: E402
from rgs_engine.sim import ct  # noqa: E402

MODES = ("back-to-back", "as-sweep", "ground-truth")
GROUPS = ("clean", "distorted")


def summarise(results: list) -> dict:
    """Median seconds and stage ends (:func:`registration.stage_ends`) of a list of results."""
    seconds = [r.seconds for r in results]
    return {"n": len(results), "seconds": seconds, "seconds_median": float(np.median(seconds)),
            "stage_ends_median": sweep.stage_ends([{"history": r.history} for r in results])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--label", type=int, default=32, help="the vertebra's label in the mask (32: T12)")
    ap.add_argument("--trials", type=int, default=6, help="trials (alternately clean and distorted, "
                    "the sweep's first start bins)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the trials per way")
    ap.add_argument("--size", default="full", choices=tuple(sweep.SIZES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=sweep.ROOT / ".cache" / "registration")
    ap.add_argument("--out", type=Path, default=sweep.ROOT / "validation" / "results" / "profile_registration.json")
    ap.add_argument("--profile", action="store_true", help="torch.profiler tables of one round (CUDA)")
    ap.add_argument("--census", action="store_true", help="count the host operations of one round (any device)")
    args = ap.parse_args(argv)
    if not sweep.CT.is_file() or not sweep.MASK.is_file():
        print(f"{sweep.CT} or {sweep.MASK} is missing: run python datasets/fetch_ct.py", file=sys.stderr)
        return 2
    if args.trials < 1 or args.repeats < 1:
        ap.error("--trials and --repeats must be at least 1")
    dev = runtime.init(args.device)
    size = sweep.SIZES[args.size]
    hu, grid = load_nifti(sweep.CT)
    volume, vgrid = ct.attenuation_volume(hu.to(dev), grid, size["drr"] or max(grid.shape), str(sweep.CT))
    case, _ = sweep.load_case(args.label, size["fit"], args.cache, sweep.structure_names(), fresh=False)
    geo = sweep.case_views(size, case["centre"])
    other = (volume, np.eye(4))  # the other-patient CT: unused by these groups
    edges = list(zip(sweep.BINS[:-1], sweep.BINS[1:]))
    plan = [(GROUPS[j % 2], j // 2 % len(edges), j) for j in range(args.trials)]

    def xrays(group: str, b: int, j: int):
        return sweep.trial_xrays(args.seed, group, b, j, *edges[b], case, geo, volume, vgrid, other)[0]

    def run(xs, truth: bool):
        kw = {"ground_truth": xs.ground_truth, "target_points": case["points"]} if truth else {}
        return reg.register(xs, case["params"], context=case["context"], **kw)

    made = [xrays(*t) for t in plan]
    run(made[0], False)  # warm-up: compiles the kernels
    results: dict[str, list] = {m: [] for m in MODES}
    for _ in range(args.repeats):  # the ways interleaved, so a drifting machine affects each alike
        results["back-to-back"] += [run(xs, False) for xs in made]
        results["as-sweep"] += [run(xrays(*t), False) for t in plan]
        results["ground-truth"] += [run(xs, True) for xs in made]
    out = {"date": _dt.date.today().isoformat(), "device": runtime.describe(dev), "versions": runtime.versions(),
           "setup": {"label": args.label, "name": case["name"], "size": args.size, "seed": args.seed,
                     "trials": [list(t) for t in plan], "repeats": args.repeats},
           "modes": {m: summarise(r) for m, r in results.items()}}
    for m, s in out["modes"].items():
        ends = ", ".join(f"{k} {v:.3f}" for k, v in s["stage_ends_median"].items())
        print(f"{m:13s} median {s['seconds_median']:.3f} s over {s['n']} (stage ends, s: {ends})")
    if args.profile and dev.type == "cuda":
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for xs in made:
                run(xs, False)
        table = prof.key_averages()
        text = (table.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=50) + "\n"
                + table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))
        write_bytes(args.out.with_suffix(".profile.txt"), text.encode(), force=True)
        # the device's own events only: a CPU range (e.g. an autograd Function) also carries
        # the device time of the kernels launched inside it, which would count them twice
        kernels = [e for e in table if e.device_type == DeviceType.CUDA]
        out["profile"] = {"registrations": len(made), "gpu_kernel_ms_per_registration":
                          sum(e.self_device_time_total for e in kernels) / 1e3 / len(made)}
        print(f"profile: {out['profile']['gpu_kernel_ms_per_registration']:.1f} ms of GPU kernels per registration; "
              f"tables in {args.out.with_suffix('.profile.txt')}")
    if args.census:
        with Census("registration/register.py", "run", dev) as census:
            for xs in made:
                run(xs, False)
        out["census"] = census.summary(calls=len(made))
        print(format_summary(out["census"], "census (per registration, by stage)"))
    save_json(args.out, out, force=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
