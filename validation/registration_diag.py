"""Re-run chosen trials of ``validation/registration.py`` and say which stage of
``rgs_engine.register`` goes wrong (issue 19: failures from 15-35 mm starts at full size).

Each trial ``GROUP:LO:J`` (the start bin's lower edge in mm, as ``validation/registration_confidence.py``
takes them; any LO for the wrong-input groups) is regenerated exactly as the sweep makes it (its
:func:`registration.trial_xrays`, seed ``(seed, group, bin, j)``, the vertebra the sweep's
``--labels`` give trial ``j``) and registered once per variant (``--variants``: JSON
``{"name": {register keyword arguments}}``; upper-case names set the register module's
constants for that run, e.g. ``{"LOCAL_SEEDS": 8}``). Per run it prints the final mTRE and, from the
history register keeps when given the ground truth: the global stage's best candidate
against the true pose at the candidates' scale (best < truth: the search missed the
truth's basin; best > truth: the similarity itself prefers a wrong pose there), each
refinement scale's last similarity against the truth's, and the full-resolution score of
the pose found against the truth's.

Measured (2026-12-05, CPU, loaded 2-core machine, full size, seed 0; the GPU sweep's result,
then here: global start's mTRE -> final mTRE). Before (one match at ``init``): clean 20-25 mm
T6 trial 3 (GPU 15.73 mm) start 12.6 -> 15.30 mm, truth scoring 0.879 against the chosen
0.705 at the global scale (a search miss, not a similarity optimum); pre-issue-19
similarity (``mask=False, match=False``) 0.47 mm; clean 30-40 mm T8 trial 2 (GPU 6.92 mm)
start 22.1 mm (as on the GPU) -> 0.22 mm here (the refinement's path differs), pre-issue-19
0.36 mm. With the per-candidate match (``match_each``, the default): T6 trial 3 start 4.6
-> 0.48 mm; distorted 10-15 mm T4 trial 4 (GPU 15.15) start 8.7 -> 7.19 mm (the scale-4
refinement stalls: 0.762 against the truth's 0.826); starts of the other failures: clean
T8 7.2, clean T6 9.2, distorted T4 13.4 (unchanged) and 18.4 mm; two GPU successes stay
(0.25 and 0.15 mm).

Usage::

    python validation/registration_diag.py --trials clean:30:2,clean:20:3,distorted:10:4
        [--labels 32,34,36,38,40] [--seed 0] [--size full] [--variants JSON] [--out FILE.json]
        [--noise-seed N] [--detector scatter=0,blur=0]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import registration as sweep

from rgs_engine.core import runtime
from rgs_engine.core.errors import RgsInputError
from rgs_engine.io.files import load_nifti, save_json
from rgs_engine.registration import register as reg
from rgs_engine.sim import ct, radiograph


def summary(res) -> dict:
    """Final mTRE and the truth comparisons of one registration's history."""
    h = {e["stage"]: e for e in res.history if e["stage"] in ("global", "truth")}
    refine = [e for e in res.history if e["stage"] == "refine"]
    best = next(e for e in refine if "stopped_after_scale" not in e)  # the start that went on
    out = {"mtre_mm": res.mtre_mm, "initial_mtre_mm": res.initial_mtre_mm, "seconds": res.seconds,
           "similarity": res.similarity, "truth_similarity": h.get("truth", {}).get("similarity"),
           "flagged": res.success, "estimated_error_mm": res.estimated_error_mm,
           "scales": [{k: t[k] for k in ("scale", "first", "similarity", "at_truth")} for t in best["trace"]],
           # with several starts: each one's full-resolution score after the coarsest scale and
           # how far its coarse end lay from the lead's
           "starts": [{k: e.get(k) for k in ("similarity_after_coarsest", "coarse_end_from_lead_mm", "start_mtre_mm")}
                      for e in refine]}
    if "global" in h:
        out |= {"global_best": h["global"]["best"], "global_source": h["global"].get("best_source"),
                "global_at_truth": h["global"]["at_truth"],
                "global_at_init": h["global"]["at_init"], "global_seconds": h["global"]["t"],
                "xi_start": best["xi_start"], "start_mtre_mm": best.get("start_mtre_mm")}
    return out


def line(name: str, s: dict) -> str:
    g = (f"global best {s['global_best'][0]:.4f} ({(s['global_source'] or ['?'])[0]}) vs truth {s['global_at_truth']:.4f} "
         f"(start {s['start_mtre_mm']:.1f} mm off, {s['global_seconds']:.0f} s); "
         if "global_best" in s else "")
    sc = " ".join(f"s{t['scale']}: {t['similarity']:.4f}/{t['at_truth']:.4f}" for t in s["scales"]
                  if t["similarity"] is not None)
    return (f"  {name:14s} {s['initial_mtre_mm']:.2f} -> {s['mtre_mm']:.2f} mm  {g}{sc} (found/truth); "
            f"final {s['similarity']:.4f} vs truth {s['truth_similarity']:.4f}; "
            f"{'flagged' if s['flagged'] else 'refused'}, estimated {s['estimated_error_mm']:.2f} mm; {s['seconds']:.1f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", required=True,
                    help="GROUP:LO:J,... (LO: the start bin's lower edge, mm; J: the trial index)")
    ap.add_argument("--labels", default=",".join(map(str, sweep.LABELS)), help="the sweep's --labels")
    ap.add_argument("--bins", default=",".join(map(str, sweep.BINS)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", default="full", choices=tuple(sweep.SIZES))
    ap.add_argument("--variants", type=json.loads, default={"default": {}})
    ap.add_argument("--cache", type=Path, default=sweep.ROOT / ".cache" / "registration")
    ap.add_argument("--out", type=Path, default=None, help="JSON of every run")
    ap.add_argument("--device", default="cpu", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--noise-seed", type=int, default=None,
                    help="another draw of the X-rays' noise (same pose and detector draw)")
    ap.add_argument("--detector", default="",
                    help="override the distorted / processed trials' detector draw, e.g. scatter=0,blur=0")
    args = ap.parse_args(argv)
    try:
        detector = radiograph.DetectorSpec.items(args.detector)
        radiograph.DetectorSpec(**detector)  # the fields' ranges, before the CT loads
    except RgsInputError as e:
        ap.error(str(e))
    labels = [int(v) for v in args.labels.split(",")]
    bins = [float(v) for v in args.bins.split(",")]
    trials = [(g, float(lo), int(j)) for g, lo, j in (t.split(":") for t in args.trials.split(","))]
    runtime.init(args.device)
    size = sweep.SIZES[args.size]
    hu, grid = load_nifti(sweep.CT)
    volume, vgrid = ct.attenuation_volume(hu, grid, size["drr"] or max(grid.shape), str(sweep.CT))
    names = sweep.structure_names()
    cases = {}
    records = []
    for group, lo, j in trials:
        label = labels[j % len(labels)]
        if label not in cases:
            cases[label] = sweep.load_case(label, size["fit"], args.cache, names, fresh=False)[0]
        case = cases[label]
        if group in sweep.WRONG_GROUPS:
            b, (lo, hi) = 0, sweep.WRONG_GROUPS[group]
        else:
            edges = sweep.group_edges(group, bins)
            b = edges.index(lo)
            hi = edges[b + 1]
        t = time.perf_counter()
        other = (sweep.other_patient_input(volume, vgrid, labels, label) if group == "other-patient"
                 else (None, None))
        xs, _ = sweep.trial_xrays(args.seed, group, b, j, lo, hi, case, sweep.case_views(size, case["centre"]),
                                  volume, vgrid, other, noise_seed=args.noise_seed, detector=detector)
        print(f"{group} {lo:g}-{hi:g} mm trial {j} ({case['name']}, X-rays {time.perf_counter() - t:.0f} s)",
              flush=True)
        for name, variant in args.variants.items():
            kw = {**({"candidates": 0} if group == "far-start" else {}),  # as the sweep runs them
                  **{k: v for k, v in variant.items() if not k.isupper()}}
            saved = {k: getattr(reg, k) for k in variant if k.isupper()}
            for k in saved:
                setattr(reg, k, variant[k])
            try:
                res = reg.register(xs, case["params"], context=case["context"], ground_truth=xs.ground_truth,
                                   target_points=case["points"], **kw)
            finally:
                for k, v in saved.items():
                    setattr(reg, k, v)
            s = summary(res)
            print(line(name, s), flush=True)
            records.append({"group": group, "bin": [lo, hi], "trial": j, "label": label, "variant": name,
                            "register": variant, "noise_seed": args.noise_seed, "detector": detector,
                            **s, "pose": np.asarray(res.pose).tolist()})
            if args.out:
                save_json(args.out, {"size": args.size, "seed": args.seed, "runs": records}, force=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
