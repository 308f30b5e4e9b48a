"""Vertebra-level CT-to-X-ray registration on a real chest CT: capture range, accuracy on
clean and detector-like X-rays, and whether the success decision can be trusted.

RadGS-Reg's protocol (``../shared`` references: mTRE of the vertebra's points under the
estimated vs the true pose, success = final mTRE < 2 mm, capture range = the largest start
bin with >= 95 % success), with rgs's training-free registration, extended by issue 19:

1. The chest CT of ``datasets/fetch_ct.py`` (``.cache/ct/cxr.nii.gz``, 0.70 x 0.70 x 2.5 mm)
   and its TotalSegmentator label map (``mask.nii.gz``). Each vertebra in ``--labels`` is a
   case: its Gaussians (``rgs_engine.registration.ct_gaussians.gaussians_for_ct`` with the
   mask and the label, the same call as ``rgs register --mask --label``; the conversion time
   is reported for a fresh fit and for a cached load) and its target points (the label's
   voxel centres).
2. Biplanar views (AP + lateral, :meth:`Geometry.biplanar`, DSO / DSD 1000 / 1500 mm,
   512^2 detector of 0.5 mm) centred on the vertebra, as a C-arm is set up for it; the CT
   world frame at the identity pose is the X-ray frame (the start pose ``init`` = identity).
3. Trials: for each start bin ``[lo, hi)`` mm and trial ``j`` (seed ``(seed, group, bin,
   j)``), a true pose moves the CT by a translation of uniform length in the bin (random
   direction) after a rotation of ``length / 4`` degrees (so 40 mm goes with 10 degrees)
   about a random axis through the vertebra's centre. The X-rays are Joseph DRRs of the whole
   CT (all anatomy, at the CT's in-plane resolution) at that pose with noise (Poisson 1e4
   photons + Gaussian sigma 10, TIGRE's model as in ``rgs simulate``). Vertebrae take turns
   over the trials. ``rgs_engine.register`` then starts from the identity; its ``seconds``
   is the runtime (one untimed warm-up registration compiles the kernels first).
4. Groups of trials:

   * ``clean``: the noisy DRRs (bins ``--bins``, up to 40 mm);
   * ``distorted``: the noisy DRRs through :func:`rgs_engine.sim.radiograph.detector_images`
     with, per trial, a contrast curve gamma log-uniform in [0.5, 2], a scatter fraction
     uniform in [0.1, 0.3], a detector blur uniform in [1, 2] px, an unexposed collimation
     border of 14 px (at 512^2; scaled with the detector) and a text label burned into one
     view (bins up to 30 mm);
   * ``processed``: as ``distorted`` plus edge enhancement (unsharp masking of the log signal,
     amount uniform in [0.5, 2]), as processed clinical radiographs are displayed: not a
     monotone function of the line integral, so the contrast match cannot undo it (beyond
     issue 19's list: measures whether that processing is handled);
   * ``other-patient`` (wrong input): X-rays of a different anatomy given with this CT: the
     same CT mirrored left-right and shifted along the spine by :data:`OTHER_LEVELS`
     vertebra levels, so the view centre shows another vertebra with mirrored surroundings
     and the registered vertebra lies outside the field of view. No pose is right; every
     flagged success is a wrong pose flagged.
   * ``moved-patient`` (wrong input): the lateral view taken after the patient moved by
     6-10 mm along the line both detector planes share (superior-inferior) and 2 deg about
     the vertebra
     (:func:`rgs_engine.sim.radiograph.moved_patient_views`): no single pose explains both
     views; the mTRE is measured against the AP view's pose; every flagged success is wrong.
   * ``far-start``: starts 45-70 mm away without the global stage (``candidates=0``), to
     produce wrong poses of the right input; right or wrong by the final mTRE.

5. Per group and bin: initial mTRE, final mTRE mean and median, success rate (< 2 mm, wrong
   inputs never succeed), the decision's flagged success among right poses, the wrong poses
   flagged, the Spearman correlation of the estimated error (``estimated_error_mm`` of the
   result, when the registration provides one) with the true mTRE, runtime median.
   ``OUT/registration.md`` (tables, setup, bars PASS / FAIL against issue 19's targets;
   ``registration_cpu`` / ``registration_quick`` in every name below at the smaller sizes),
   ``OUT/results/registration.json`` (every trial), and with matplotlib
   ``OUT/registration.png`` (success and flagged rates against the start offset, estimated
   error against true mTRE) and ``OUT/registration_overlay.png`` (one distorted
   registration's DRR edges over its X-rays).

Usage::

    python datasets/fetch_ct.py           # once
    python validation/registration.py [--device auto|cuda|cpu] [--trials 20] [--wrong-trials 20]
        [--labels 32,34,36,38,40] [--groups clean,distorted,...] [--size full|cpu|quick]
        [--out-dir validation] [--budget-s S] [--resume OUT/results/registration.json] [--quick]

``--size cpu`` (160^2 views of 1.6 mm over the same field, vertebra / context fits of 32 / 64
voxels along their boxes, taken from the cache when there) is the size a CPU calibration run
can afford. ``--quick`` (a check of the script: 2 vertebrae, 2 trials per bin, 1 per
wrong-input group, ``SIZES["quick"]``: 128^2 views of 2 mm and coarse Gaussian fits) gives
numbers that mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gzip
import importlib.util
import json
import math
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
from scipy.stats import spearmanr  # noqa: E402

from rgs_engine.core import rigid, runtime  # noqa: E402
from rgs_engine.core.geometry import Geometry  # noqa: E402
from rgs_engine.io import images as imaging  # noqa: E402
from rgs_engine.io.files import load_nifti, save_json, write_bytes  # noqa: E402
from rgs_engine.io.xrays import XRaySet  # noqa: E402
from rgs_engine.registration import ct_gaussians, register as reg, report  # noqa: E402
from rgs_engine.sim import ct, radiograph  # noqa: E402
from rgs_engine.sim import scan as sim  # noqa: E402

CT = ROOT / ".cache" / "ct" / "cxr.nii.gz"
MASK = ROOT / ".cache" / "ct" / "mask.nii.gz"
STRUCTURES = ROOT / ".cache" / "ct" / "structures.csv"
LABELS = (32, 34, 36, 38, 40)  # T12, T10, T8, T6, T4 of the TotalSegmentator map
FIT_GRID = 64  # voxels along the vertebra's box (about 1 mm)
CONTEXT_GRID = 128  # voxels along the CT's box for the rest of the CT (about 2.8 mm)
CONTEXT_GAUSSIANS = 20000
SIZES = {  # detector pixels and pitch (mm), DRR grid (None: the CT's), Gaussian fits, output names, report note
    "full": {"det": 512, "pixel": 0.5, "drr": None, "stem": "registration", "note": "",
             "fit": {"vertebra": {"grid_size": FIT_GRID},
                     "context": {"grid_size": CONTEXT_GRID, "num_gaussians": CONTEXT_GAUSSIANS}}},
    "cpu": {"det": 160, "pixel": 1.6, "drr": 256,  # the same field of view, about 1.1 mm at the vertebra
            "stem": "registration_cpu",
            "note": " at the CPU size (160^2 views of 1.6 mm, vertebra 32 / context 64 voxel fits)",
            "fit": {"vertebra": {"grid_size": 32}, "context": {"grid_size": 64, "num_gaussians": 8000}}},
    "quick": {"det": 128, "pixel": 2.0, "drr": 192,  # coarse fits: a check of the script
              "stem": "registration_quick", "note": " (--size quick: coarse fits, numbers mean nothing)",
              "fit": {"vertebra": {"grid_size": 32, "iterations": 60},
                      "context": {"grid_size": 48, "num_gaussians": 4000, "iterations": 60}}},
}
BINS = (0, 5, 10, 15, 20, 25, 30, 40)  # start offsets, mm
DSO, DSD = 1000.0, 1500.0  # source-isocentre and source-detector distances, mm
DISTORTED_UPTO_MM = 30.0  # distorted cases: the bins up to here
WRONG_BIN = (0.0, 20.0)  # start offsets of the wrong-input cases, mm
FAR_MM = (45.0, 70.0)  # far starts without the global stage
WRONG_GROUPS = {"other-patient": WRONG_BIN, "moved-patient": WRONG_BIN, "far-start": FAR_MM}  # their starts
DEG_PER_MM = 0.25  # rotation that goes with a translation: 40 mm <-> 10 degrees
SUCCESS_MM = 2.0
NOISE = (1e4, 10.0)  # TIGRE's model, as rgs simulate's --noise 1e4,10
GAMMA = (0.5, 2.0)  # contrast-curve exponent, log-uniform
SCATTER = (0.1, 0.3)  # scatter fraction, uniform
BLUR_PX = (1.0, 2.0)  # detector blur sigma, uniform
COLLIMATION_PX = 14  # unexposed border at 512^2 (scaled with the detector)
LABEL_TEXTS = ("AP", "LAT", "R", "L 12")
OTHER_LEVELS = 4  # the other-patient X-rays are shifted by this many vertebra levels
MOVE_MM = (6.0, 10.0)  # moved patient: translation both views see (see patient_move)
MOVE_DEG = 2.0
UNSHARP = (0.5, 2.0)  # processed: edge-enhancement amount, uniform
GROUPS = ("clean", "distorted", "processed", "other-patient", "moved-patient", "far-start")
IMAGE_GROUPS = ("clean", "distorted", "processed")  # right input, swept over the start bins
WRONG_INPUT = ("other-patient", "moved-patient")
BARS = {"success_upto_mm": 25, "success_rate": 0.95, "median_mtre_mm": 1.0,
        "capture_mm": 30, "seconds": 0.8}
TARGETS = {"flagged_right": 0.95, "wrong_flagged": 0, "distorted_success": 0.95,
           "distorted_upto_mm": 30, "median_mtre_mm": 0.5, "seconds": 0.3}
console = Console(highlight=False, soft_wrap=True)


def structure_names() -> dict[int, str]:
    """Label -> name from ``structures.csv`` (empty when absent)."""
    if not STRUCTURES.is_file():
        return {}
    rows = [line.split(",") for line in STRUCTURES.read_text().splitlines()[1:] if line]
    return {int(r[3]): r[2].replace("vertebrae_", "") for r in rows if len(r) >= 4}


def load_case(label: int, fit_kw: dict, cache: Path, names: dict[int, str], fresh: bool) -> tuple[dict, dict]:
    """One vertebra's case (its Gaussians and the rest of the CT's as context, fitted with
    ``fit_kw`` (a SIZES entry's ``fit``) or loaded from ``cache``; its target points (N, 3, CT
    world mm) and their centre) and its conversion record; ``fresh`` times a forced fit first."""
    fits = {}
    for part, kw in (("vertebra", fit_kw["vertebra"]), ("context", {**fit_kw["context"], "complement": True})):
        info = None
        if fresh:
            _, info = ct_gaussians.gaussians_for_ct(CT, mask_path=MASK, label=label, cache_dir=cache, force=True, **kw)
        params, cached = ct_gaussians.gaussians_for_ct(CT, mask_path=MASK, label=label, cache_dir=cache, **kw)
        fits[part] = (params, info, cached)
    points = report.target_points(CT, MASK, label)
    (params, info, cached), (context, cinfo, ccached) = fits["vertebra"], fits["context"]
    conv = {"label": label, "fit_seconds": info["seconds"] + cinfo["seconds"] if info else None,
            "cached_seconds": cached["seconds"] + ccached["seconds"],
            "gaussians": int(params["means"].shape[0] + context["means"].shape[0])}
    return {"label": label, "name": names.get(label, str(label)), "params": params, "context": context,
            "points": points, "centre": points.mean(axis=0)}, conv


def case_views(size: dict, centre: np.ndarray) -> Geometry:
    """AP + lateral views of ``size`` (a SIZES entry) centred on ``centre`` (mm)."""
    return Geometry.biplanar(DSO, DSD, (size["det"], size["det"]), size["pixel"], isocentre=centre)


def true_pose(lo: float, hi: float, centre: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A rigid offset: translation of uniform length in [lo, hi) mm, rotation of
    DEG_PER_MM x that length about a random axis through ``centre``."""
    mm = float(rng.uniform(lo, hi))
    return rigid.random_offset(mm, min(DEG_PER_MM * mm, 180.0), rng, centre)


def random_detector(rng: np.random.Generator, det: int, views: int, processed: bool = False
                    ) -> radiograph.DetectorSpec:
    """One distorted case's detector: gamma log-uniform in GAMMA, scatter uniform in SCATTER,
    blur uniform in BLUR_PX, the collimation border scaled to ``det`` pixels, a label in a
    random view; ``processed`` adds edge enhancement of an amount uniform in UNSHARP."""
    return radiograph.DetectorSpec(
        unsharp=float(rng.uniform(*UNSHARP)) if processed else 0.0,
        gamma=float(math.exp(rng.uniform(math.log(GAMMA[0]), math.log(GAMMA[1])))),
        scatter=float(rng.uniform(*SCATTER)), blur=float(rng.uniform(*BLUR_PX)),
        collimation=max(1, round(COLLIMATION_PX * det / 512)),
        label=str(rng.choice(LABEL_TEXTS)), label_view=int(rng.integers(views)))


def patient_move(rng: np.random.Generator, geometry: Geometry, centre_xray: np.ndarray) -> np.ndarray:
    """A rigid move of the patient (X-ray frame, mm) between the two exposures: MOVE_DEG about
    a random axis through ``centre_xray``, then MOVE_MM (random sign) along the line common to
    the two detector planes (superior-inferior for AP + lateral), which both views see. A
    move along one view's depth axis would not do: that view barely sees it, so one pose
    (the moved one) explains both images and no registration could tell."""
    normals = [np.cross(geometry.vectors[k, 6:9].numpy(), geometry.vectors[k, 9:12].numpy()) for k in (0, 1)]
    common = np.cross(normals[0], normals[1])
    common = common / np.linalg.norm(common)
    move = rigid.random_offset(0.0, MOVE_DEG, rng, centre_xray)
    move[:3, 3] += float(rng.uniform(*MOVE_MM)) * float(rng.choice((-1.0, 1.0))) * common
    return move


def other_patient(volume: torch.Tensor, vgrid, cases: list[dict]) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The other-patient CT (``volume`` mirrored left-right about the grid centre) and, per
    case, the shift (4x4) that brings the vertebra OTHER_LEVELS levels away (towards the
    CT's centre) to the case's place; the level height is the mean spacing of the cases'
    centres along the spine (the labels are every other vertebra)."""
    z = np.array([c["centre"][2] for c in cases])
    labels = np.array([c["label"] for c in cases])
    level = float(np.abs(np.diff(z)).sum() / max(np.abs(np.diff(labels)).sum(), 1)) if len(z) > 1 else 27.0
    shifts = []
    for c in cases:
        t = np.eye(4)
        t[2, 3] = -OTHER_LEVELS * level * math.copysign(1.0, float(vgrid.centre[2] - c["centre"][2]))
        shifts.append(t)
    return torch.flip(volume, dims=[0]), shifts


def other_patient_input(volume: torch.Tensor, vgrid, labels: list[int], label: int) -> tuple[torch.Tensor, np.ndarray]:
    """The ``other`` argument of :func:`trial_xrays` for vertebra ``label`` of a run over
    ``labels``, as :func:`run_trials` makes it (for tools that rebuild single trials)."""
    centres = [{"label": lb, "centre": report.target_points(CT, MASK, lb).mean(axis=0)} for lb in labels]
    mirrored, shifts = other_patient(volume, vgrid, centres)
    return mirrored, shifts[labels.index(label)]


def result_fields(res) -> dict:
    """What the registration says about its pose: the decision, and the estimated error and
    its evidence where the result provides them (None / {} otherwise)."""
    d = res.to_dict()
    return {"flagged_success": bool(d["success"]), "estimated_error_mm": d.get("estimated_error_mm"),
            "evidence": d.get("evidence", {})}


def trial_xrays(seed: int, group: str, b: int, j: int, lo: float, hi: float, case: dict, geo: Geometry,
                volume: torch.Tensor, vgrid, other: tuple[torch.Tensor, np.ndarray], noise_seed: int | None = None,
                detector: dict | None = None) -> tuple[XRaySet, dict]:
    """One trial's X-rays (seed ``(seed, group, b, j)``; ``other``: the other-patient CT and this
    case's shift, :func:`other_patient`) with the true pose as ground truth, and the trial's
    extra record fields (shift, move, detector). For diagnostics (the same pose and detector
    draw, one thing changed): ``noise_seed`` replaces the seed of the noise's draw,
    ``detector`` overrides fields of a distorted / processed trial's detector
    (:class:`~rgs_engine.sim.radiograph.DetectorSpec` names, e.g. ``{"scatter": 0.0}``)."""
    rng = np.random.default_rng([seed, GROUPS.index(group), b, j])
    truth = true_pose(lo, hi, case["centre"], rng)
    extra: dict = {}
    if group == "other-patient":
        clean = sim.project_views(other[0], vgrid, rigid.transform_geometry(geo, rigid.invert(truth @ other[1])))
        extra["shift_mm"] = float(other[1][2, 3])
    elif group == "moved-patient":
        move = patient_move(rng, geo, rigid.apply(truth, case["centre"][None])[0])
        clean = radiograph.moved_patient_views(volume, vgrid, geo, truth, move)
        extra["move_mm"] = float(np.linalg.norm(rigid.apply(move, rigid.apply(truth, case["points"]))
                                                - rigid.apply(truth, case["points"]), axis=1).mean())
    else:
        clean = sim.project_views(volume, vgrid, rigid.transform_geometry(geo, rigid.invert(truth)))
    drawn = int(rng.integers(1 << 31))
    gen = torch.Generator().manual_seed(drawn if noise_seed is None else noise_seed)
    images, _ = sim.add_noise(clean, *NOISE, model="tigre", generator=gen)
    if group in ("distorted", "processed"):
        spec = random_detector(rng, geo.det_shape[0], geo.num_views, processed=group == "processed")
        spec = dataclasses.replace(spec, **(detector or {}))
        images = radiograph.detector_images(images, spec)
        extra["detector"] = spec.to_dict()
    return XRaySet(images, geo, ["ap", "lateral"], truth), extra


def planned(args) -> list[tuple]:
    """Every registration of the sweep: ``(group, bin index, trial, lo mm, hi mm)``."""
    plan = []
    for g in [g for g in IMAGE_GROUPS if g in args.groups]:
        edges = group_edges(g, args.bins)
        for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
            plan += [(g, b, j, lo, hi) for j in range(args.trials)]
    for g, (lo, hi) in WRONG_GROUPS.items():
        if g in args.groups:
            plan += [(g, 0, j, lo, hi) for j in range(args.wrong_trials)]
    return plan


def trial_key(group: str, edges, trial: int) -> tuple:
    """What names one registration of the sweep: group, start bin (lo, hi mm), trial."""
    return group, tuple(float(e) for e in edges), int(trial)


def run_trials(args, volume, vgrid, cases: list[dict], geos: list[Geometry], done: list[dict]) -> list[dict]:
    """Every registration of every group not in ``done`` (records of an earlier run): a list of
    records, ``done``'s first."""
    mirrored, shifts = other_patient(volume, vgrid, cases)

    def one(group: str, b: int, j: int, lo: float, hi: float, keep_images: bool = False) -> dict:
        k = j % len(cases)
        case, geo = cases[k], geos[k]
        xs, extra = trial_xrays(args.seed, group, b, j, lo, hi, case, geo, volume, vgrid, (mirrored, shifts[k]))
        truth = xs.ground_truth
        kw = {**args.register, **({"candidates": 0} if group == "far-start" else {})}
        res = reg.register(xs, case["params"], context=case["context"], ground_truth=truth,
                           target_points=case["points"], **kw)
        wrong_input = group in WRONG_INPUT
        rec = {"group": group, "wrong_input": wrong_input, "bin": [lo, hi], "trial": j,
               "label": case["label"], "name": case["name"],
               "start_mm": float(np.linalg.norm(truth[:3, 3] + truth[:3, :3] @ case["centre"] - case["centre"])),
               "start_deg": rigid.rotation_angle_deg(truth), "initial_mtre_mm": res.initial_mtre_mm,
               "mtre_mm": res.mtre_mm, "similarity": res.similarity,
               "initial_similarity": res.initial_similarity, **result_fields(res),
               "success": (not wrong_input) and res.mtre_mm < SUCCESS_MM, "seconds": res.seconds,
               **extra, "truth": truth.tolist(), "pose": res.pose.tolist(), "history": res.history}
        if keep_images:
            rec["_example"] = (xs, res, case)
        return rec

    have = {trial_key(r["group"], r["bin"], r["trial"]) for r in done}
    plan = [t for t in planned(args) if trial_key(t[0], t[3:], t[2]) not in have]
    plan.sort(key=lambda t: t[2])  # trial by trial over every bin: a time budget trims all bins alike
    example = ("distorted", 1, 0)
    one("clean", 0, 0, *args.bins[:2])  # warm-up: compiles the kernels
    records = list(done)
    t0 = time.perf_counter()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("registrations", total=len(plan))
        for g, b, j, lo, hi in plan:
            if args.budget_s and time.perf_counter() - t0 > args.budget_s:
                console.print(f"time budget of {args.budget_s:g} s spent: {len(records) - len(done)} of {len(plan)} "
                              "registrations run")
                break
            rec = one(g, b, j, lo, hi, keep_images=(g, b, j) == example)
            records.append(rec)
            bar.update(task, advance=1, description=f"{g} {lo:g}-{hi:g} mm: {rec['mtre_mm']:.2f} mm")
    return records


def correlation(records: list[dict]) -> float | None:
    """Spearman correlation of the estimated error with the true mTRE over ``records`` that
    have an estimate and a meaningful mTRE (not the other-patient input); None below 3 or
    when either is constant."""
    pairs = [(x["estimated_error_mm"], x["mtre_mm"]) for x in records
             if x.get("estimated_error_mm") is not None and x["group"] != "other-patient"]
    if len(pairs) < 3:
        return None
    a, b = np.array(pairs, dtype=float).T
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def decision_counts(records: list[dict]) -> dict:
    """Right poses (right input, mTRE < 2 mm), how many the registration flagged; wrong
    poses (the rest), how many it flagged."""
    right = [x for x in records if x["success"]]
    wrong = [x for x in records if not x["success"]]
    return {"right": len(right), "right_flagged": sum(x["flagged_success"] for x in right),
            "wrong": len(wrong), "wrong_flagged": sum(x["flagged_success"] for x in wrong)}


def summarise(records: list[dict]) -> list[dict]:
    """Per group and bin statistics, in GROUPS order."""
    rows = []
    for g in GROUPS:
        for lo, hi in sorted({tuple(x["bin"]) for x in records if x["group"] == g}):
            r = [x for x in records if x["group"] == g and tuple(x["bin"]) == (lo, hi)]
            m = np.array([x["mtre_mm"] for x in r])
            sec = np.array([x["seconds"] for x in r])
            est = [x["estimated_error_mm"] for x in r if x.get("estimated_error_mm") is not None]
            rows.append({"group": g, "bin": [lo, hi], "n": len(r),
                         "initial_mtre_mm_mean": float(np.mean([x["initial_mtre_mm"] for x in r])),
                         "mtre_mm_mean": float(m.mean()), "mtre_mm_median": float(np.median(m)),
                         "success_rate": float(np.mean([x["success"] for x in r])),
                         "flagged_rate": float(np.mean([x["flagged_success"] for x in r])),
                         **decision_counts(r),
                         "estimated_error_mm_median": float(np.median(est)) if est else None,
                         "correlation": correlation(r),
                         "seconds_mean": float(sec.mean()), "seconds_median": float(np.median(sec))})
    return rows


def evaluate(rows: list[dict], records: list[dict]) -> dict:
    """The bars: the earlier clean-sweep bars (BARS) and issue 19's targets (TARGETS)."""
    clean = [r for r in rows if r["group"] == "clean"]
    upto = [r for r in clean if r["bin"][1] <= BARS["success_upto_mm"]]
    capture = 0.0
    for r in clean:  # contiguous from the smallest bin
        if r["success_rate"] < BARS["success_rate"]:
            break
        capture = r["bin"][1]
    sec = [r["seconds_median"] for r in clean]
    dist = [r for r in rows if r["group"] == "distorted" and r["bin"][1] <= TARGETS["distorted_upto_mm"]]
    within = [x for x in records if x["group"] in IMAGE_GROUPS
              and x["bin"][1] <= TARGETS["distorted_upto_mm"]]
    counts = decision_counts(records)
    flagged_right = counts["right_flagged"] / counts["right"] if counts["right"] else None
    med_mtre = float(np.median([x["mtre_mm"] for x in within])) if within else None
    med_sec = float(np.median([x["seconds"] for x in records])) if records else None
    dist_worst = min(r["success_rate"] for r in dist) if dist else None
    return {
        "success_upto": {"value": min(r["success_rate"] for r in upto) if upto else None,
                         "pass": bool(upto) and all(r["success_rate"] >= BARS["success_rate"] for r in upto)},
        "median_upto": {"value": max(r["mtre_mm_median"] for r in upto) if upto else None,
                        "pass": bool(upto) and all(r["mtre_mm_median"] <= BARS["median_mtre_mm"] for r in upto)},
        "capture_mm": {"value": capture, "pass": capture >= BARS["capture_mm"]},
        "seconds": {"value": float(np.median(sec)) if sec else None,
                    "pass": bool(sec) and float(np.median(sec)) <= BARS["seconds"]},
        "flagged_right": {"value": flagged_right, "counts": counts,
                          "pass": flagged_right is not None and flagged_right >= TARGETS["flagged_right"]},
        "wrong_flagged": {"value": counts["wrong_flagged"], "pass": counts["wrong_flagged"] == 0},
        "distorted_success": {"value": dist_worst,
                              "pass": dist_worst is not None and dist_worst >= TARGETS["distorted_success"]},
        "median_mtre": {"value": med_mtre, "pass": med_mtre is not None and med_mtre <= TARGETS["median_mtre_mm"]},
        "median_seconds": {"value": med_sec, "pass": med_sec is not None and med_sec <= TARGETS["seconds"]},
        "correlation": {"value": correlation(records)},
    }


def stage_ends(records: list[dict]) -> dict[str, float]:
    """Median seconds from each registration's start at the end of its stages (the history's
    global stage and ``timing`` entry; records from before that entry have none)."""
    ends: dict[str, list[float]] = {}
    for rec in records:
        for h in rec.get("history", []):
            if h.get("stage") == "global":
                ends.setdefault("global", []).append(h["t"])
            elif h.get("stage") == "timing":
                for k, v in h["ends"].items():
                    ends.setdefault(k, []).append(v)
    return {k: float(np.median(v)) for k, v in ends.items()}


def markdown(res: dict) -> str:
    s, bars, conv = res["setup"], res["bars"], res["conversion"]
    names = ", ".join(f"{c['name']} ({c['label']})" for c in res["cases"])
    pct = (lambda v: "n/a" if v is None else f"{100 * v:.0f} %")
    num = (lambda v, f=".2f": "n/a" if v is None else format(v, f))
    out = ["# Vertebra-level CT-to-X-ray registration (`validation/registration.py`)", "",
           f"Measured {res['date']} on **{res['device']}** with rgs {res['versions'].get('rgs', '')}"
           f"{SIZES[s.get('size', 'full')]['note']}.", "",
           *([f"Two device calls: the first {s['resumed']['trials']} trials from `{s['resumed']['file']}` "
              f"({s['resumed']['device']}, {s['resumed']['date']}), the rest run here with `--resume` "
              "(the same sweep: the same draws per trial).", ""] if s.get("resumed") else []),
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
           f"of {DEG_PER_MM:g} deg per mm (random axis); {s['trials']} trials per bin planned (run: n) "
           f"({s['wrong_trials']} per wrong-input group), seed {s['seed']}; start from the identity. "
           "Success: final mTRE < 2 mm over the vertebra's voxel centres.",
           f"- distorted: detector-like images (`rgs_engine.sim.radiograph`): gamma {GAMMA[0]:g}-{GAMMA[1]:g} "
           f"(log-uniform) on the windowed log signal, scatter fraction {SCATTER[0]:g}-{SCATTER[1]:g} "
           f"(low-pass of 1/8 detector), blur {BLUR_PX[0]:g}-{BLUR_PX[1]:g} px, an unexposed "
           f"{s['collimation_px']} px collimation border, a text label burned into one view.",
           f"- processed: as distorted, plus edge enhancement (unsharp masking of the log signal, amount "
           f"{UNSHARP[0]:g}-{UNSHARP[1]:g}, low-pass of 1/32 detector), as processed radiographs are shown: "
           "not a monotone function of the line integral.",
           f"- other-patient (wrong input): the CT mirrored left-right and shifted {OTHER_LEVELS} vertebra "
           "levels along the spine (another vertebra at the view centre, mirrored surroundings, the "
           "registered vertebra outside the field of view); no pose is right.",
           f"- moved-patient (wrong input): the lateral view after the patient moved {MOVE_MM[0]:g}-"
           f"{MOVE_MM[1]:g} mm along the line both detector planes share and {MOVE_DEG:g} deg; no pose explains both "
           "views (mTRE against the AP view's pose).",
           f"- far-start: starts {FAR_MM[0]:g}-{FAR_MM[1]:g} mm without the global stage (candidates=0).",
           f"- Registration settings: {json.dumps(s['register'])}; the decision is the result's `success`"
           f"{'' if res['has_estimate'] else ' (this rgs gives no estimated error: its columns read n/a)'}.", "",
           "| group | start offset | n | initial mTRE | final mTRE mean | median | success "
           "| flagged / right poses | wrong poses flagged | est. error (median) | corr. est. vs true "
           "| seconds (median) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["bins"]:
        out.append(f"| {r['group']} | {r['bin'][0]:g}-{r['bin'][1]:g} mm | {r['n']} "
                   f"| {r['initial_mtre_mm_mean']:.2f} mm | {r['mtre_mm_mean']:.2f} mm | {r['mtre_mm_median']:.2f} mm "
                   f"| {pct(r['success_rate'])} | {r['right_flagged']} / {r['right']} "
                   f"| {r['wrong_flagged']} / {r['wrong']} | {num(r['estimated_error_mm_median'])} mm "
                   f"| {num(r['correlation'])} | {r['seconds_median']:.2f} s |")
    mark = {True: "PASS", False: "FAIL"}
    c = bars["flagged_right"]["counts"]
    out += ["", "CT to Gaussians (per vertebra, on the same device): "
            + (f"fresh fit {conv['fit_seconds_mean']:.2f} s on average, " if conv["fit_seconds_mean"] else "")
            + f"{conv['gaussians_mean']:.0f} Gaussians, cached load {conv['cached_seconds_mean']:.3f} s.", ""]
    if stages := stage_ends(res["trials"]):
        out += ["When each stage ended (median seconds from the registration's start, over the registrations "
                "that ran it): " + ", ".join(f"{k} {v:.3f} s" for k, v in stages.items()) + ".", ""]
    out += [
            "| bar | measured | target | |", "|---|---:|---:|---|",
            f"| flagged success among right poses, whole sweep | {pct(bars['flagged_right']['value'])} "
            f"({c['right_flagged']} / {c['right']}) | >= {100 * TARGETS['flagged_right']:.0f} % "
            f"| {mark[bars['flagged_right']['pass']]} |",
            f"| wrong poses flagged, whole sweep | {c['wrong_flagged']} of {c['wrong']} | 0 "
            f"| {mark[bars['wrong_flagged']['pass']]} |",
            f"| success, distorted, starts up to {TARGETS['distorted_upto_mm']} mm (worst bin) "
            f"| {pct(bars['distorted_success']['value'])} | >= {100 * TARGETS['distorted_success']:.0f} % "
            f"| {mark[bars['distorted_success']['pass']]} |",
            f"| median mTRE, clean + distorted + processed up to {TARGETS['distorted_upto_mm']} mm "
            f"| {num(bars['median_mtre']['value'])} mm | <= {TARGETS['median_mtre_mm']:g} mm "
            f"| {mark[bars['median_mtre']['pass']]} |",
            f"| median seconds per registration, whole sweep | {num(bars['median_seconds']['value'])} s "
            f"| <= {TARGETS['seconds']:g} s | {mark[bars['median_seconds']['pass']]} |",
            f"| Spearman correlation, estimated error vs true mTRE (all but other-patient) "
            f"| {num(bars['correlation']['value'])} | | |",
            f"| clean: success rate, starts up to {BARS['success_upto_mm']} mm (worst bin) | "
            f"{pct(bars['success_upto']['value'])} | >= {100 * BARS['success_rate']:.0f} % | "
            f"{mark[bars['success_upto']['pass']]} |",
            f"| clean: median mTRE, starts up to {BARS['success_upto_mm']} mm (worst bin) | "
            f"{num(bars['median_upto']['value'])} mm | <= {BARS['median_mtre_mm']:g} mm | "
            f"{mark[bars['median_upto']['pass']]} |",
            f"| clean: capture range (largest bin with >= 95 % success, contiguous) | "
            f"{bars['capture_mm']['value']:g} mm | >= {BARS['capture_mm']} mm | {mark[bars['capture_mm']['pass']]} |",
            ""]
    return "\n".join(out)


def write_overlay(path: Path, example) -> None:
    """One registration's X-rays with the vertebra's DRR edges at the start and at the end."""
    xs, res, case = example
    before = reg.render(case["params"], res.init, xs.geometry)
    after = reg.render(case["params"], res.pose, xs.geometry)
    imaging.write_png(path, report.overlay_image(xs.images, before, after), force=True,
                      text={"Description": f"{case['name']}: start mTRE {res.initial_mtre_mm:.2f} mm "
                                           f"(red), registered {res.mtre_mm:.2f} mm (green)"})


def plot(res: dict, out_dir: Path) -> list[Path]:
    """Success and flagged rates per start bin (clean, distorted, processed), and the estimated error
    against the true mTRE per group (needs matplotlib)."""
    written = []
    if importlib.util.find_spec("matplotlib") is None:
        console.print("matplotlib is missing: no registration.png (pip install '.[validation]')")
        return written
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for g, colour in (("clean", "tab:red"), ("distorted", "tab:purple"), ("processed", "tab:green")):
        rows = [r for r in res["bins"] if r["group"] == g]
        x = [0.5 * (r["bin"][0] + r["bin"][1]) for r in rows]
        a1.plot(x, [100 * r["success_rate"] for r in rows], "o-", color=colour, label=f"{g}: success")
        a1.plot(x, [100 * r["right_flagged"] / max(r["right"], 1) for r in rows], "s--", color=colour,
                alpha=0.6, label=f"{g}: flagged / right")
    a1.axhline(95, color="grey", lw=0.8, ls=":")
    a1.set(xlabel="start offset (mm; rotation 0.25 deg/mm)", ylabel="%", ylim=(0, 102), title="capture range")
    a1.legend(loc="lower left", fontsize=8)
    colours = dict(zip(GROUPS, ("tab:red", "tab:purple", "tab:green", "tab:brown", "tab:orange", "tab:grey")))
    for g in GROUPS:
        r = [x for x in res["trials"] if x["group"] == g and x.get("estimated_error_mm") is not None]
        if r:
            a2.scatter([max(x["mtre_mm"], 1e-2) for x in r], [max(x["estimated_error_mm"], 1e-2) for x in r],
                       s=12, color=colours[g], marker="x" if g in WRONG_INPUT else "o", label=g)
    a2.set(xscale="log", yscale="log", xlabel="true mTRE (mm; wrong inputs: vs the nominal pose)",
           ylabel="estimated error (mm)", title="estimated vs true error")
    a2.axvline(SUCCESS_MM, color="grey", lw=0.8, ls=":")
    if a2.collections:
        a2.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"rgs register, vertebra level, {res['device']}")
    fig.tight_layout()
    path = out_dir / f"{res['setup']['stem']}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


def group_edges(group: str, bins: list[float]) -> list[float]:
    """The start-bin edges (mm) of an image group: all of ``bins`` for ``clean``, those up to
    :data:`DISTORTED_UPTO_MM` for the distorted and processed groups."""
    return list(bins) if group == "clean" else [e for e in bins if e <= DISTORTED_UPTO_MM]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--trials", type=int, default=20,
                    help="registrations per start bin (clean, distorted, processed)")
    ap.add_argument("--wrong-trials", type=int, default=20,
                    help="registrations per wrong-input group (other-patient, moved-patient, far-start)")
    ap.add_argument("--labels", default=",".join(map(str, LABELS)), help="vertebra labels of the mask")
    ap.add_argument("--bins", default=",".join(map(str, BINS)), help="start-offset bin edges, mm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "validation")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "registration",
                    help="folder of the Gaussian cache (a fresh one is timed)")
    ap.add_argument("--register", type=json.loads, default={},
                    help="JSON of rgs_engine.register keyword arguments (default: its defaults)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="stop starting registrations after this many seconds (0: run all); the trials "
                         "run trial index by trial index, so every bin loses the same last trials")
    ap.add_argument("--size", default="full", choices=tuple(SIZES),
                    help="image and fit sizes: full (the GPU sweep), cpu (160^2 views, coarser fits: a "
                         "CPU calibration run), quick (coarse fits: a check of the script)")
    ap.add_argument("--groups", default=",".join(GROUPS), help="the groups of trials to run")
    ap.add_argument("--resume", type=Path, default=None,
                    help="results JSON of an earlier run of the same sweep cut short by --budget-s: its "
                         "trials are kept and only the missing ones run (a sweep over several device calls)")
    ap.add_argument("--quick", action="store_true",
                    help="CPU check of the script (a few minutes): --size quick, 2 vertebrae, fewer trials")
    args = ap.parse_args(argv)
    args.groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if unknown := sorted(set(args.groups) - set(GROUPS)):
        ap.error(f"unknown group(s) {', '.join(unknown)}: choose from {', '.join(GROUPS)}")
    args.labels = [int(v) for v in args.labels.split(",") if v.strip()]
    args.bins = [float(v) for v in args.bins.split(",") if v.strip()]
    if args.quick:
        args.size = "quick"
        args.trials, args.wrong_trials, args.bins = 2, 1, [0.0, 10.0, 30.0]
        args.labels = args.labels[:2]
    return args


def output_stem(size: str, register: dict) -> str:
    """The outputs' file stem: the size's, with ``--register``'s options appended
    (``registration_keep3`` for ``{"keep": 3}``), so a variant never overwrites the default's."""
    stem = SIZES[size]["stem"]
    return stem + "".join(f"_{k}{v}" for k, v in sorted(register.items()))


def load_results(path: Path) -> dict:
    """A results JSON written by this script, plain or gzip-compressed (``.json.gz``: the larger
    committed sweeps)."""
    data = path.read_bytes()
    return json.loads(gzip.decompress(data) if path.suffix == ".gz" else data)


SAME_SWEEP = ("ct", "trials", "wrong_trials", "seed", "size", "groups", "dso", "dsd", "det", "pixel", "register",
              "collimation_px")  # what --resume's file must share with this run


class ResumeError(ValueError):
    """A ``--resume`` file that is missing or of another sweep."""


def resumed(args, setup: dict) -> tuple[list[dict], float]:
    """The records and trial seconds of ``--resume``'s file (none without it), checked to be the
    same sweep (:data:`SAME_SWEEP`, the labels, and its trials among :func:`planned`'s); notes
    the file in ``setup``."""
    if args.resume is None:
        return [], 0.0
    if not args.resume.is_file():
        raise ResumeError(f"--resume {args.resume}: not found (give the results JSON of the earlier run)")
    old = load_results(args.resume)
    differ = [k for k in SAME_SWEEP if old["setup"].get(k) != setup[k]]
    if [c["label"] for c in old["cases"]] != args.labels:
        differ.append("labels")
    if not {trial_key(r["group"], r["bin"], r["trial"]) for r in old["trials"]} <= {
            trial_key(t[0], t[3:], t[2]) for t in planned(args)}:
        differ.append("planned trials")
    if differ:
        raise ResumeError(f"--resume {args.resume}: another sweep ({', '.join(differ)} differ): rerun without --resume")
    setup["resumed"] = {"file": str(args.resume), "trials": len(old["trials"]), "device": old["device"],
                        "date": old["date"]}
    return old["trials"], float(old["wall_seconds"])


def main(argv=None) -> int:
    args = parse_args(argv)
    if not CT.is_file() or not MASK.is_file():
        console.print(f"[red]{CT} or {MASK} is missing: run python datasets/fetch_ct.py[/red]")
        return 2
    dev = runtime.init(args.device)
    size = SIZES[args.size]
    det = size["det"]
    setup = {"ct": str(CT.relative_to(ROOT)), "trials": args.trials, "wrong_trials": args.wrong_trials,
             "seed": args.seed, "size": args.size, "groups": args.groups, "budget_s": args.budget_s, "dso": DSO, "dsd": DSD, "det": det,
             "pixel": size["pixel"], "register": args.register, "stem": output_stem(args.size, args.register),
             "collimation_px": max(1, round(COLLIMATION_PX * det / 512))}
    try:
        done, wall_before = resumed(args, setup)
    except ResumeError as e:
        console.print(f"[red]{e}[/red]")
        return 2
    hu, ct_grid = load_nifti(CT)
    setup["ct_shape"] = "x".join(map(str, ct_grid.shape))
    setup["ct_spacing"] = "x".join(f"{v:.3g}" for v in ct_grid.spacing)
    n_drr = size["drr"] or max(ct_grid.shape)
    volume, vgrid = ct.attenuation_volume(hu.to(dev), ct_grid, n_drr, str(CT))
    setup["drr_grid"] = "x".join(map(str, vgrid.shape))
    setup["drr_spacing"] = float(vgrid.spacing[0])
    names = structure_names()

    fit_kw = size["fit"]
    setup["fit_grid"], setup["context_grid"] = fit_kw["vertebra"]["grid_size"], fit_kw["context"]["grid_size"]
    cases, geos, conv = [], [], []
    for label in args.labels:
        case, c = load_case(label, fit_kw, args.cache, names, fresh=args.size == "full")
        cases.append(case)
        conv.append(c)
        geos.append(case_views(size, case["centre"]))
        console.print(f"{case['name']}: {case['params']['means'].shape[0]} + {case['context']['means'].shape[0]} "
                      f"Gaussians (vertebra + context), cached load {c['cached_seconds']:.3f} s, "
                      f"{len(case['points'])} target points")

    t0 = time.perf_counter()
    records = run_trials(args, volume, vgrid, cases, geos, done)
    rows = summarise(records)
    example = next((r.pop("_example") for r in records if "_example" in r), None)
    fit = [c["fit_seconds"] for c in conv if c["fit_seconds"] is not None]
    res = {"date": _dt.date.today().isoformat(), "device": runtime.describe(dev),
           "versions": runtime.versions(), "setup": setup,
           "cases": [{k: c[k] for k in ("label", "name")} | {"centre_mm": c["centre"].tolist(),
                                                               "points": len(c["points"])} for c in cases],
           "conversion": {"per_case": conv, "fit_seconds_mean": float(np.mean(fit)) if fit else None,
                          "cached_seconds_mean": float(np.mean([c["cached_seconds"] for c in conv])),
                          "gaussians_mean": float(np.mean([c["gaussians"] for c in conv]))},
           "has_estimate": any(x.get("estimated_error_mm") is not None for x in records),
           "bins": rows, "bars": evaluate(rows, records), "wall_seconds": wall_before + time.perf_counter() - t0,
           "trials": records}
    out = args.out_dir
    stem = setup["stem"]
    save_json(out / "results" / f"{stem}.json", res, force=True)
    write_bytes(out / f"{stem}.md", markdown(res).encode(), force=True)
    if example is not None:
        write_overlay(out / f"{stem}_overlay.png", example)
    for p in plot(res, out):
        console.print(f"wrote {p}")
    console.print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
