"""Diagnose the success decision of ``rgs register`` (issue 19) on trials of a
``validation/registration.py`` run: each chosen trial's X-rays are made again exactly as that
script made them (same seeds, same distortions, same Gaussians: its own functions), the
confidence probe of :func:`rgs_engine.registration.register.register` is rebuilt at the
trial's stored final pose (same pooling, window, contrast match), and
:func:`rgs_engine.registration.confidence.assess` runs there with variants of its parameters.

The first variant should be the one the run used (``{}``: the defaults of the code it ran):
its evidence is printed next to the stored one, so a diagnosis is of the same pose and the same
images (the Gaussians are fitted again on this device when not cached: small differences).

For each trial and variant: the estimate, the restart spread, the peak offset, the view
disagreement, the decision, the scored poses, and per restart its end point's distance from
the pose's own end point (mm) and the similarity it reached relative to the pose's own end.

Usage::

    python validation/registration_confidence.py --results validation/results/registration.json \\
        --trials clean:0:2,moved-patient:0:2 [--variants '{"default": {}, "wide": {"restart_mm": 2}}'] \\
        [--out /tmp/diagnosis.json]

Trials are ``group:bin:trial`` with ``bin`` the start bin's lower edge (mm). X-rays are cached
under ``--cache``/diagnose (the DRRs of the whole CT are the slow part on a CPU); Gaussians
under ``--cache`` as ``validation/registration.py`` caches them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import registration as sweep  # validation/registration.py (this folder is on sys.path when run)
import torch

from rgs_engine.core import rigid, runtime
from rgs_engine.io.files import atomic_write, load_nifti, save_json
from rgs_engine.io.xrays import XRaySet
from rgs_engine.registration import confidence, levels
from rgs_engine.registration import register as reg
from rgs_engine.registration.masking import exposure_mask
from rgs_engine.registration.windows import Crop
from rgs_engine.sim import ct

EVIDENCE = ("restart_spread_mm", "peak_offset_mm", "view_disagreement_mm")


def bin_index(group: str, lo: float, res: dict) -> int:
    """The start bin's index ``b`` of the trial seed in the plan of the ``validation/registration.py``
    run ``res`` (its bin edges, ``--bins``, are those of its image groups' bins)."""
    if group not in sweep.IMAGE_GROUPS:
        return 0
    edges = sorted({e for r in res["bins"] if r["group"] in sweep.IMAGE_GROUPS for e in r["bin"]})
    return sweep.group_edges(group, edges).index(lo)


class Scene:
    """The run's CT as DRR volume (loaded on first need), its cases (target points of every
    label; Gaussians of the labels asked for) and their views, at the run's size."""

    def __init__(self, res: dict, cache: Path):
        self.res, self.setup, self.cache = res, res["setup"], cache
        self.size = sweep.SIZES[self.setup["size"]]
        self.labels = [c["label"] for c in res["cases"]]
        self.names = sweep.structure_names()
        self.cases: dict[int, dict] = {}
        self._volume = None

    def case(self, label: int) -> dict:
        if label not in self.cases:
            self.cases[label] = sweep.load_case(label, self.size["fit"], self.cache, self.names, fresh=False)[0]
        return self.cases[label]

    def volume(self):
        if self._volume is None:
            hu, ct_grid = load_nifti(sweep.CT)
            n_drr = self.size["drr"] or max(ct_grid.shape)
            self._volume = ct.attenuation_volume(hu.to(runtime.ensure()), ct_grid, n_drr, str(sweep.CT))
        return self._volume

    def record(self, spec: str) -> dict | None:
        """The stored trial ``GROUP:LO:J`` (the start bin's lower edge in mm), None if the run has none."""
        group, lo, j = spec.split(":")
        return next((r for r in self.res["trials"]
                     if r["group"] == group and r["bin"][0] == float(lo) and r["trial"] == int(j)), None)

    def xrays(self, rec: dict) -> XRaySet:
        """The trial's X-rays, from the cache or made again as the sweep made them."""
        group, lo, j = rec["group"], rec["bin"][0], rec["trial"]
        b = bin_index(group, lo, self.res)
        case = self.case(rec["label"])
        geo = sweep.case_views(self.size, case["centre"])
        path = self.cache / "diagnose" / f"{self.setup['size']}-s{self.setup['seed']}-{group}-b{b}-j{j}.pt"
        if path.is_file():
            saved = torch.load(path)
            return XRaySet(saved["images"], geo, ["ap", "lateral"], saved["truth"].numpy())
        volume, vgrid = self.volume()
        other = (sweep.other_patient_input(volume, vgrid, self.labels, rec["label"]) if group == "other-patient"
                 else (None, np.eye(4)))
        xs, _ = sweep.trial_xrays(self.setup["seed"], group, b, j, lo, rec["bin"][1], case, geo, volume, vgrid, other)
        with atomic_write(path, force=True) as tmp:
            torch.save({"images": xs.images.cpu(), "truth": torch.from_numpy(xs.ground_truth)}, tmp)
        return xs


def register_inputs(xs: XRaySet, case: dict) -> tuple[dict, np.ndarray, np.ndarray, torch.Tensor]:
    """What :func:`reg.register` works on for a stored trial: all Gaussians (structure, then
    context), the structure's means (N, 3), its density-weighted centre (register's default
    rotation centre) and the X-rays on the Gaussians' device."""
    p, ctx = reg._check_params(case["params"]), reg._check_params(case["context"])
    wts = (p["densities"] * p["scales"].prod(dim=1)).double()
    centre = ((p["means"].double() * wts[:, None]).sum(0) / wts.sum()).cpu().numpy()
    images = xs.images.to(device=p["means"].device, dtype=torch.float32)
    return {k: torch.cat([p[k], ctx[k]]) for k in p}, p["means"].double().cpu().numpy(), centre, images


def probe_score(xs: XRaySet, case: dict, pose: np.ndarray, margin_mm: float = 10.0, blur: float = 0.5):
    """The confidence probe of :func:`reg.register` at ``pose`` (its defaults, identity start,
    structure and context moving together): ``(score(poses) -> (P, V), structure means (N, 3))``."""
    gauss, means_np, centre, images = register_inputs(xs, case)
    pitch = levels.object_pitch(xs.geometry, centre)
    crop = Crop.around(xs.geometry, rigid.apply(pose, means_np), margin_mm / pitch)
    probe = levels.Level(max(1, int(reg.CONFIDENCE_PITCH_MM // pitch)), xs.geometry, images, exposure_mask(images),
                       crop, gauss, centre, blur)
    with torch.no_grad():
        m = torch.as_tensor(pose, dtype=torch.float32, device=probe.means.device)
        probe.match(probe.drr(*rigid.rigid_transform_gaussians(probe.means, probe.quats, m)))
    return (lambda poses: levels.score_poses(probe, poses)), means_np


def restart_ends(calls: list[tuple[list, np.ndarray]], polish_steps: int, points: np.ndarray) -> list[dict]:
    """Per restart (from the recorded polish calls of :func:`confidence.assess`): where its last
    probe centre lies from the pose's own (mean displacement of ``points``, mm) and its joint
    similarity there minus the pose's own."""
    poses, scores = calls[max(1, polish_steps) - 1]
    k = len(poses) // 13
    ends = [poses[13 * i] for i in range(k)]
    sims = [float(scores[13 * i].mean()) for i in range(k)]
    pts = rigid.apply(ends[0], points)
    return [{"mm": confidence._moved(e @ rigid.invert(ends[0]), pts), "d_similarity": s - sims[0]}
            for e, s in zip(ends[1:], sims[1:])]


def diagnose(score, pose: np.ndarray, points: np.ndarray, similarity: float, variant: dict) -> dict:
    """:func:`confidence.assess` with ``variant`` (its keyword arguments), recording the scored poses."""
    calls = []

    def recorded(poses):
        s = np.asarray(score(poses))
        calls.append((poses, s))
        return s

    conf = confidence.assess(recorded, pose, points, similarity, **variant)
    ev = conf.evidence
    steps = variant.get("polish_steps", confidence.POLISH_STEPS)
    return {"estimated_error_mm": conf.estimated_error_mm, "success": conf.success,
            **{k: ev[k] for k in EVIDENCE}, "not_maximum_axes": ev["not_maximum_axes"],
            "scored_poses": sum(len(c[0]) for c in calls),
            "restarts": restart_ends(calls, steps, points) if ev["restarts"] else []}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=sweep.ROOT / "validation" / "results" / "registration.json")
    ap.add_argument("--trials", required=True, help="comma-separated group:bin:trial (bin: lower edge, mm)")
    ap.add_argument("--variants", type=json.loads, default={"default": {}},
                    help="JSON: name -> keyword arguments of confidence.assess")
    ap.add_argument("--device", default="cpu", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--cache", type=Path, default=sweep.ROOT / ".cache" / "registration")
    ap.add_argument("--out", type=Path, default=None, help="JSON of every trial's diagnosis")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    runtime.init(args.device)
    res = sweep.load_results(args.results)
    scene = Scene(res, args.cache)
    out = []
    for spec in args.trials.split(","):
        rec = scene.record(spec)
        if rec is None:
            sweep.console.print(f"[red]{spec}: no such trial in {args.results}[/red]")
            return 2
        xs = scene.xrays(rec)
        if not np.allclose(xs.ground_truth, np.array(rec["truth"]), atol=1e-9):
            sweep.console.print(f"[red]{spec}: the regenerated true pose differs from the stored one[/red]")
            return 2
        pose = np.array(rec["pose"])
        case = scene.case(rec["label"])
        score, points = probe_score(xs, case, pose)
        stored = rec["evidence"]
        sweep.console.print(f"{spec} ({rec['name']}, true mTRE {rec['mtre_mm']:.2f} mm): stored est. "
                            f"{rec['estimated_error_mm']:.2f} = spread {stored['restart_spread_mm']:.2f}, peak "
                            f"{stored['peak_offset_mm']:.2f}, views {stored['view_disagreement_mm']:.2f}")
        row = {"trial": spec, "label": rec["label"], "name": rec["name"], "mtre_mm": rec["mtre_mm"],
               "wrong_input": rec["wrong_input"], "right": rec["success"],
               "stored": {"estimated_error_mm": rec["estimated_error_mm"], **{k: stored[k] for k in EVIDENCE}},
               "variants": {}}
        for name, variant in args.variants.items():
            d = diagnose(score, pose, points, rec["similarity"], variant)
            row["variants"][name] = d
            ends = " ".join(f"{r['mm']:.2f}/{1e3 * r['d_similarity']:+.1f}" for r in d["restarts"])
            sweep.console.print(f"  {name:>12}: est. {d['estimated_error_mm']:.2f} = spread {d['restart_spread_mm']:.2f}"
                                f", peak {d['peak_offset_mm']:.2f}, views {d['view_disagreement_mm']:.2f}"
                                f"{' FLAGGED' if d['success'] else ''} ({d['scored_poses']} poses; restarts mm/"
                                f"1e-3 similarity: {ends})")
        out.append(row)
        if args.out:
            save_json(args.out, {"results": str(args.results), "variants": args.variants, "trials": out}, force=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
