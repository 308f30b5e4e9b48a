"""Vertebra-level CT-to-X-ray registration on a real chest CT: capture range and accuracy.

RadGS-Reg's protocol (``../shared`` references: mTRE of the vertebra's points under the
estimated vs the true pose, success = final mTRE < 2 mm, capture range = the largest start
bin with >= 95 % success), with rgs's training-free registration:

1. The chest CT of ``datasets/fetch_ct.py`` (``.cache/ct/cxr.nii.gz``, 0.70 x 0.70 x 2.5 mm)
   and its TotalSegmentator label map (``mask.nii.gz``). Each vertebra in ``--labels`` is a
   case: its Gaussians (``rgs_engine.registration.ct_gaussians.gaussians_for_ct`` with the mask and the
   label, the same call as ``rgs register --mask --label``; the conversion time is reported
   for a fresh fit and for a cached load) and its target points (the label's voxel centres).
2. Biplanar views (AP + lateral, :meth:`Geometry.biplanar`, DSO / DSD 1000 / 1500 mm,
   512^2 detector of 0.5 mm) centred on the vertebra, as a C-arm is set up for it; the CT
   world frame at the identity pose is the X-ray frame (the start pose ``init`` = identity).
3. Trials: for each start bin ``[lo, hi)`` mm and trial ``j`` (seed ``(seed, bin, j)``), a
   true pose moves the CT by a translation of uniform length in the bin (random direction)
   after a rotation of ``length / 4`` degrees (so 40 mm goes with 10 degrees) about a random
   axis through the vertebra's centre. The X-rays are Joseph DRRs of the whole CT (all
   anatomy, at the CT's in-plane resolution) at that pose with noise (Poisson 1e4 photons +
   Gaussian sigma 10, TIGRE's model as in ``rgs simulate``). Vertebrae take turns over the
   trials. ``rgs_engine.register`` then starts from the identity; its ``seconds`` is the
   runtime (one untimed warm-up registration compiles the kernels first).
4. Per bin: initial mTRE, final mTRE mean and median, success rate (< 2 mm), the rate the
   registration itself flags as success and the number of wrong poses it flagged as success,
   runtime mean and median. ``OUT/registration.md`` (table, setup, bars PASS / FAIL),
   ``OUT/results/registration.json`` (every trial), and with matplotlib
   ``OUT/registration.png`` (success rate and mTRE against the start offset) and
   ``OUT/registration_overlay.png`` (one registration's DRR edges over its X-rays).

Usage::

    python datasets/fetch_ct.py           # once
    python validation/registration.py [--device auto|cuda|cpu] [--trials 20]
        [--labels 31,33,35,37,39] [--out-dir validation] [--quick]

``--quick`` (a CPU check of the script: 2 bins x 2 trials, 256^2 detector of 1 mm, a
coarser DRR volume) gives numbers that mean nothing.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "rgs_engine").is_dir() and str(ROOT) not in sys.path:  # this checkout's engine
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402

from rgs_engine.sim import ct  # noqa: E402

from rgs_engine.registration import ct_gaussians, register as reg

from rgs_engine.io import images as imaging

from rgs_engine.core import rigid, runtime
from rgs_engine.sim import scan as sim  # noqa: E402
from rgs_engine.core.geometry import Geometry  # noqa: E402
from rgs_engine.io.files import load_nifti, save_json, write_bytes  # noqa: E402
from rgs_engine.io.xrays import XRaySet  # noqa: E402

CT = ROOT / ".cache" / "ct" / "cxr.nii.gz"
MASK = ROOT / ".cache" / "ct" / "mask.nii.gz"
STRUCTURES = ROOT / ".cache" / "ct" / "structures.csv"
LABELS = (32, 34, 36, 38, 40)  # T12, T10, T8, T6, T4 of the TotalSegmentator map
FIT_GRID = 64  # voxels along the vertebra's box (about 1 mm)
CONTEXT_GRID = 128  # voxels along the CT's box for the rest of the CT (about 2.8 mm)
CONTEXT_GAUSSIANS = 20000
BINS = (0, 5, 10, 15, 20, 25, 30, 40)  # start offsets, mm
DEG_PER_MM = 0.25  # rotation that goes with a translation: 40 mm <-> 10 degrees
SUCCESS_MM = 2.0
CALIBRATION_MM = (45.0, 70.0)  # far starts for the threshold check (no global stage)
NOISE = (1e4, 10.0)  # TIGRE's model, as rgs simulate's --noise 1e4,10
BARS = {"success_upto_mm": 25, "success_rate": 0.95, "median_mtre_mm": 1.0,
        "capture_mm": 30, "seconds": 0.8}
RESULTS_JSON = Path("results") / "registration.json"
console = Console(highlight=False, soft_wrap=True)


def structure_names() -> dict[int, str]:
    """Label -> name from ``structures.csv`` (empty when absent)."""
    if not STRUCTURES.is_file():
        return {}
    rows = [line.split(",") for line in STRUCTURES.read_text().splitlines()[1:] if line]
    return {int(r[3]): r[2].replace("vertebrae_", "") for r in rows if len(r) >= 4}


def true_pose(lo: float, hi: float, centre: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A rigid offset: translation of uniform length in [lo, hi) mm, rotation of
    DEG_PER_MM x that length about a random axis through ``centre``."""
    mm = float(rng.uniform(lo, hi))
    return rigid.random_offset(mm, min(DEG_PER_MM * mm, 180.0), rng, centre)


def run_trials(args, volume, vgrid, cases: list[dict], geos: list[Geometry]) -> list[dict]:
    """Every (bin, trial) registration: a list of records."""
    bins = list(zip(args.bins[:-1], args.bins[1:]))
    records = []

    def one(b: int, j: int, lo: float, hi: float, keep_images: bool = False) -> dict:
        k = j % len(cases)
        case, geo = cases[k], geos[k]
        rng = np.random.default_rng([args.seed, b, j])
        truth = true_pose(lo, hi, case["centre"], rng)
        clean = sim.project_views(volume, vgrid, rigid.transform_geometry(geo, rigid.invert(truth)))
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
        images, _ = sim.add_noise(clean, *NOISE, model="tigre", generator=gen)
        xs = XRaySet(images, geo, ["ap", "lateral"], truth)
        res = reg.register(xs, case["params"], context=case["context"], ground_truth=truth,
                           target_points=case["points"], **args.register)
        rec = {"bin": [lo, hi], "trial": j, "label": case["label"], "name": case["name"],
               "start_mm": float(np.linalg.norm(truth[:3, 3] + truth[:3, :3] @ case["centre"] - case["centre"])),
               "start_deg": rigid.rotation_angle_deg(truth), "initial_mtre_mm": res.initial_mtre_mm,
               "mtre_mm": res.mtre_mm, "similarity": res.similarity,
               "initial_similarity": res.initial_similarity, "flagged_success": res.success,
               "success": res.mtre_mm < SUCCESS_MM, "seconds": res.seconds,
               "truth": truth.tolist(), "pose": res.pose.tolist(), "history": res.history}
        if keep_images:
            rec["_example"] = (xs, res, case)
        return rec

    one(0, 0, *bins[0])  # warm-up: compiles the kernels
    if args.calibration:  # wrong poses on purpose: far starts without the global stage
        plain = args.register
        args.register = {**plain, "candidates": 0}
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("calibration", total=args.calibration)
            for j in range(args.calibration):
                rec = one(len(bins), j, *CALIBRATION_MM)
                rec["calibration"] = True
                records.append(rec)
                bar.update(task, advance=1)
        args.register = plain
    total = len(bins) * args.trials
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("registrations", total=total)
        for b, (lo, hi) in enumerate(bins):
            for j in range(args.trials):
                rec = one(b, j, lo, hi, keep_images=(b == len(bins) // 2 and j == 0))
                records.append(rec)
                bar.update(task, advance=1, description=f"{lo:g}-{hi:g} mm: {rec['mtre_mm']:.2f} mm")
    return records


def summarise(records: list[dict], bins) -> list[dict]:
    """Per-bin statistics."""
    rows = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        r = [x for x in records if x["bin"] == [lo, hi] and not x.get("calibration")]
        if not r:
            continue
        m = np.array([x["mtre_mm"] for x in r])
        sec = np.array([x["seconds"] for x in r])
        rows.append({"bin": [lo, hi], "n": len(r),
                     "initial_mtre_mm_mean": float(np.mean([x["initial_mtre_mm"] for x in r])),
                     "mtre_mm_mean": float(m.mean()), "mtre_mm_median": float(np.median(m)),
                     "success_rate": float(np.mean([x["success"] for x in r])),
                     "flagged_rate": float(np.mean([x["flagged_success"] for x in r])),
                     "false_success": int(sum(x["flagged_success"] and not x["success"] for x in r)),
                     "seconds_mean": float(sec.mean()), "seconds_median": float(np.median(sec))})
    return rows


def evaluate(rows: list[dict]) -> dict:
    """The issue's bars from the per-bin rows."""
    upto = [r for r in rows if r["bin"][1] <= BARS["success_upto_mm"]]
    ok_rows = [r for r in rows if r["success_rate"] >= BARS["success_rate"]]
    capture = 0.0
    for r in rows:  # contiguous from the smallest bin
        if r["success_rate"] < BARS["success_rate"]:
            break
        capture = r["bin"][1]
    sec = [r["seconds_median"] for r in rows]
    return {
        "success_upto": {"value": min(r["success_rate"] for r in upto) if upto else None,
                         "pass": bool(upto) and all(r["success_rate"] >= BARS["success_rate"] for r in upto)},
        "median_upto": {"value": max(r["mtre_mm_median"] for r in upto) if upto else None,
                        "pass": bool(upto) and all(r["mtre_mm_median"] <= BARS["median_mtre_mm"] for r in upto)},
        "capture_mm": {"value": capture, "pass": capture >= BARS["capture_mm"]},
        "seconds": {"value": float(np.median(sec)) if sec else None,
                    "pass": bool(sec) and float(np.median(sec)) <= BARS["seconds"]},
        "bins_at_95": [r["bin"] for r in ok_rows],
        "false_success_total": sum(r["false_success"] for r in rows),
    }


def threshold_check(records: list[dict]) -> dict:
    """How the similarity separates right (mTRE < 2 mm) from wrong poses, all records."""
    right = [x["similarity"] for x in records if x["success"]]
    wrong = [x["similarity"] for x in records if not x["success"]]
    return {"threshold": reg.SUCCESS_THRESHOLD, "right": len(right), "wrong": len(wrong),
            "right_min": min(right) if right else None, "right_median": float(np.median(right)) if right else None,
            "wrong_max": max(wrong) if wrong else None,
            "wrong_flagged": int(sum(x["flagged_success"] and not x["success"] for x in records)),
            "right_flagged": int(sum(x["flagged_success"] and x["success"] for x in records))}


def markdown(res: dict) -> str:
    s, bars, conv = res["setup"], res["bars"], res["conversion"]
    names = ", ".join(f"{c['name']} ({c['label']})" for c in res["cases"])
    out = ["# Vertebra-level CT-to-X-ray registration (`validation/registration.py`)", "",
           f"Measured {res['date']} on **{res['device']}** with rgs {res['versions'].get('rgs', '')}.", "",
           f"- CT: {s['ct']} (real chest CT, {s['ct_shape']} voxels of {s['ct_spacing']} mm); "
           f"X-rays rendered from it on a {s['drr_grid']} grid of {s['drr_spacing']:.3g} mm.",
           f"- Cases: the vertebrae {names}; each registration uses that vertebra's Gaussians "
           f"(mask + label, {s['fit_grid']} voxels along its box) and those of the rest of the CT "
           f"({s['context_grid']} voxels along the CT's box) as context, and compares a window of "
           "the views around the vertebra.",
           f"- Views: AP + lateral, DSO / DSD {s['dso']:g} / {s['dsd']:g} mm, {s['det']}^2 pixels "
           f"of {s['pixel']:g} mm, centred on the vertebra; noise Poisson {NOISE[0]:g} photons + "
           f"Gaussian sigma {NOISE[1]:g} (TIGRE's model).",
           f"- Starts: translation of uniform length in the bin (random direction) and rotation "
           f"of {DEG_PER_MM:g} deg per mm (random axis); {s['trials']} trials per bin, seed {s['seed']}; "
           "start from the identity. Success: final mTRE < 2 mm over the vertebra's voxel centres.",
           f"- Registration settings: {json.dumps(s['register'])}.", "",
           "| start offset | n | initial mTRE | final mTRE mean | median | success | flagged success "
           "| wrong poses flagged | seconds (median) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["bins"]:
        out.append(f"| {r['bin'][0]:g}-{r['bin'][1]:g} mm | {r['n']} | {r['initial_mtre_mm_mean']:.2f} mm "
                   f"| {r['mtre_mm_mean']:.2f} mm | {r['mtre_mm_median']:.2f} mm | {100 * r['success_rate']:.0f} % "
                   f"| {100 * r['flagged_rate']:.0f} % | {r['false_success']} | {r['seconds_median']:.2f} s |")
    mark = {True: "PASS", False: "FAIL"}
    out += ["", "CT to Gaussians (per vertebra, on the same device): fresh fit "
            f"{conv['fit_seconds_mean']:.2f} s on average ({conv['gaussians_mean']:.0f} Gaussians), "
            f"cached load {conv['cached_seconds_mean']:.3f} s.", "",
            "| bar | measured | target | |", "|---|---:|---:|---|",
            f"| success rate, starts up to {BARS['success_upto_mm']} mm (worst bin) | "
            f"{100 * bars['success_upto']['value']:.0f} % | >= {100 * BARS['success_rate']:.0f} % | "
            f"{mark[bars['success_upto']['pass']]} |",
            f"| median mTRE, starts up to {BARS['success_upto_mm']} mm (worst bin) | "
            f"{bars['median_upto']['value']:.2f} mm | <= {BARS['median_mtre_mm']:g} mm | "
            f"{mark[bars['median_upto']['pass']]} |",
            f"| capture range (largest bin with >= 95 % success, contiguous) | "
            f"{bars['capture_mm']['value']:g} mm | >= {BARS['capture_mm']} mm | {mark[bars['capture_mm']['pass']]} |",
            f"| runtime per registration (median over bins of the bin medians) | "
            f"{bars['seconds']['value']:.2f} s | <= {BARS['seconds']:g} s | {mark[bars['seconds']['pass']]} |",
            ""]
    t = res["threshold_check"]
    fmt = (lambda v: "n/a" if v is None else f"{v:.4f}")
    out += [f"Success flag (similarity >= {t['threshold']:g}) over all {t['right'] + t['wrong']} registrations "
            f"(including {res['calibration']} from far starts without the global stage, to produce wrong "
            f"poses): right poses (mTRE < 2 mm) {t['right']}, similarity min {fmt(t['right_min'])}, median "
            f"{fmt(t['right_median'])}, flagged {t['right_flagged']}; wrong poses {t['wrong']}, similarity max "
            f"{fmt(t['wrong_max'])}, flagged {t['wrong_flagged']}.", ""]
    return "\n".join(out)


def write_overlay(path: Path, example) -> None:
    """One registration's X-rays with the vertebra's DRR edges at the start and at the end."""
    xs, res, case = example
    before = reg.render(case["params"], res.init, xs.geometry)
    after = reg.render(case["params"], res.pose, xs.geometry)
    imaging.write_png(path, reg.overlay_image(xs.images, before, after), force=True,
                      text={"Description": f"{case['name']}: start mTRE {res.initial_mtre_mm:.2f} mm "
                                           f"(red), registered {res.mtre_mm:.2f} mm (green)"})


def plot(res: dict, out_dir: Path) -> list[Path]:
    """The capture-range plot (needs matplotlib)."""
    written = []
    if importlib.util.find_spec("matplotlib") is None:
        console.print("matplotlib is missing: no registration.png (pip install '.[validation]')")
        return written
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["bins"]
    x = [0.5 * (r["bin"][0] + r["bin"][1]) for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(x, [100 * r["success_rate"] for r in rows], "o-", color="tab:red", label="success (mTRE < 2 mm)")
    a1.plot(x, [100 * r["flagged_rate"] for r in rows], "s--", color="tab:blue", label="flagged success")
    a1.axhline(95, color="grey", lw=0.8, ls=":")
    a1.set(xlabel="start offset (mm; rotation 0.25 deg/mm)", ylabel="%", ylim=(0, 102),
           title="capture range")
    a1.legend(loc="lower left")
    a2.semilogy(x, [r["initial_mtre_mm_mean"] for r in rows], "^-", color="grey", label="initial (mean)")
    a2.semilogy(x, [r["mtre_mm_mean"] for r in rows], "o-", color="tab:red", label="final (mean)")
    a2.semilogy(x, [r["mtre_mm_median"] for r in rows], "s-", color="tab:green", label="final (median)")
    a2.axhline(SUCCESS_MM, color="grey", lw=0.8, ls=":")
    a2.set(xlabel="start offset (mm)", ylabel="mTRE (mm)", title="accuracy")
    a2.legend(loc="upper left")
    fig.suptitle(f"rgs register, vertebra level, {res['device']}")
    fig.tight_layout()
    path = out_dir / "registration.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--trials", type=int, default=20, help="registrations per start bin")
    ap.add_argument("--labels", default=",".join(map(str, LABELS)), help="vertebra labels of the mask")
    ap.add_argument("--bins", default=",".join(map(str, BINS)), help="start-offset bin edges, mm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "validation")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "registration",
                    help="folder of the Gaussian cache (a fresh one is timed)")
    ap.add_argument("--register", type=json.loads, default={},
                    help="JSON of rgs_engine.register keyword arguments (default: its defaults)")
    ap.add_argument("--calibration", type=int, default=0,
                    help="extra registrations from far starts without the global stage (wrong poses), "
                         "to check the success threshold")
    ap.add_argument("--quick", action="store_true", help="tiny CPU check of the script")
    args = ap.parse_args(argv)
    args.labels = [int(v) for v in args.labels.split(",") if v.strip()]
    args.bins = [float(v) for v in args.bins.split(",") if v.strip()]
    if args.quick:
        args.trials, args.bins = 2, [0.0, 5.0, 20.0]
        args.labels = args.labels[:2]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not CT.is_file() or not MASK.is_file():
        console.print(f"[red]{CT} or {MASK} is missing: run python datasets/fetch_ct.py[/red]")
        return 2
    dev = runtime.init(args.device)
    setup = {"ct": str(CT.relative_to(ROOT)), "trials": args.trials, "seed": args.seed,
             "dso": 1000.0, "dsd": 1500.0, "det": 256 if args.quick else 512,
             "pixel": 1.0 if args.quick else 0.5, "register": args.register,
             "fit_grid": FIT_GRID, "context_grid": CONTEXT_GRID}
    hu, ct_grid = load_nifti(CT)
    setup["ct_shape"] = "x".join(map(str, ct_grid.shape))
    setup["ct_spacing"] = "x".join(f"{v:.3g}" for v in ct_grid.spacing)
    n_drr = 192 if args.quick else max(ct_grid.shape)
    volume, vgrid = ct.attenuation_volume(hu.to(dev), ct_grid, n_drr, str(CT))
    setup["drr_grid"] = "x".join(map(str, vgrid.shape))
    setup["drr_spacing"] = float(vgrid.spacing[0])
    names = structure_names()

    cases, geos, conv = [], [], []
    for label in args.labels:
        fits = {}
        for part, kw in (("vertebra", {"grid_size": FIT_GRID}),
                         ("context", {"grid_size": CONTEXT_GRID, "complement": True,
                                     "num_gaussians": CONTEXT_GAUSSIANS})):
            _, fresh = ct_gaussians.gaussians_for_ct(CT, mask_path=MASK, label=label, cache_dir=args.cache,
                                                     force=True, **kw)
            params, cached = ct_gaussians.gaussians_for_ct(CT, mask_path=MASK, label=label,
                                                           cache_dir=args.cache, **kw)
            fits[part] = (params, fresh, cached)
        points = reg.target_points(CT, MASK, label)
        centre = points.mean(axis=0)
        (params, info, cached), (context, cinfo, ccached) = fits["vertebra"], fits["context"]
        conv.append({"label": label, "fit_seconds": info["seconds"] + cinfo["seconds"],
                     "cached_seconds": cached["seconds"] + ccached["seconds"],
                     "vertebra": {"seconds": info["seconds"], "gaussians": int(params["means"].shape[0]),
                                  "psnr": info["report"]["psnr"]},
                     "context": {"seconds": cinfo["seconds"], "gaussians": int(context["means"].shape[0]),
                                 "psnr": cinfo["report"]["psnr"]},
                     "gaussians": int(params["means"].shape[0] + context["means"].shape[0])})
        cases.append({"label": label, "name": names.get(label, str(label)), "params": params,
                      "context": context, "points": points, "centre": centre})
        geos.append(Geometry.biplanar(setup["dso"], setup["dsd"], (setup["det"],) * 2, setup["pixel"],
                                      isocentre=centre))
        console.print(f"{names.get(label, label)}: {params['means'].shape[0]} + {context['means'].shape[0]} "
                      f"Gaussians (vertebra + context), fits {info['seconds']:.2f} + {cinfo['seconds']:.2f} s "
                      f"(PSNR {info['report']['psnr']:.1f} / {cinfo['report']['psnr']:.1f} dB), cached "
                      f"{cached['seconds'] + ccached['seconds']:.3f} s, {len(points)} target points")

    t0 = time.perf_counter()
    records = run_trials(args, volume, vgrid, cases, geos)
    rows = summarise(records, args.bins)
    example = next((r.pop("_example") for r in records if "_example" in r), None)
    res = {"date": _dt.date.today().isoformat(), "device": runtime.describe(dev),
           "versions": runtime.versions(), "setup": setup,
           "cases": [{k: c[k] for k in ("label", "name")} | {"centre_mm": c["centre"].tolist(),
                                                               "points": len(c["points"])} for c in cases],
           "conversion": {"per_case": conv,
                          "fit_seconds_mean": float(np.mean([c["fit_seconds"] for c in conv])),
                          "cached_seconds_mean": float(np.mean([c["cached_seconds"] for c in conv])),
                          "gaussians_mean": float(np.mean([c["gaussians"] for c in conv]))},
           "bins": rows, "bars": evaluate(rows), "wall_seconds": time.perf_counter() - t0,
           "threshold_check": threshold_check(records), "calibration": args.calibration,
           "trials": records}
    out = args.out_dir
    save_json(out / RESULTS_JSON, res, force=True)
    write_bytes(out / "registration.md", markdown(res).encode(), force=True)
    if example is not None:
        write_overlay(out / "registration_overlay.png", example)
    for p in plot(res, out):
        console.print(f"wrote {p}")
    console.print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
