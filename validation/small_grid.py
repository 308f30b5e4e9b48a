"""Small-grid (CPU-size) held-out cases: Gaussians against SART and FDK without the inverse crime.

Issue 18's "CPU-size cases" bar and issue 20's item 2. Each case is made from the real chest
CT of ``datasets/fetch_ct.py`` (``.cache/ct/cxr.nii.gz``; ``head-c96``: the head CT of
``fetch_ct.py --ct head``, another anatomy) as follows:

1. a region of the CT's box (fractions of its extent per axis) fixes a 64-voxel grid along
   the region's longest edge (:func:`rgs_engine.sim.ct.fit_grid`; 5-6 mm voxels);
2. the CT (HU -> attenuation) is resampled onto a grid ``FINE`` (3) times finer on the same
   box (about 190 voxels along the longest edge) and the projections are computed there by
   the Joseph DRR, so the data do not come from the reconstruction grid's own discretisation
   (no inverse crime); the ground truth is the fine volume averaged over 3^3 blocks, i.e.
   exactly the reconstruction grid's voxels;
3. training views (25; 50 in ``full-c128-v50``; circular or arbitrary C-arm poses, ``det`` x ``det`` pixels) get
   TIGRE-model noise (Poisson + Gaussian); 10 noiseless test views are kept for 2D metrics;
4. ``rgs_engine.pipelines.recon`` (the code behind ``rgs recon``) runs ``gs`` at the README's
   CPU settings (``--views 25 --iterations 500``, default recipe unless ``--variant`` gives
   ``--set`` overrides, or ``init=MODE`` / ``preset=NAME`` for ``--init`` / ``--preset``), ``sart`` and ``fdk`` (circular orbits only) at their defaults.

Results: ``validation/results/small_grid.json`` (every run appended: case, method, variant,
3D PSNR / SSIM, 2D test PSNR, seconds, Gaussians, device, CPU load, tag) and
``validation/small_grid.md`` (the tables and notes, written by hand from the JSON).

Usage::

    python validation/small_grid.py [--cases a,b] [--methods gs,sart,fdk]
        [--variant LABEL:KEY=VALUE;KEY=VALUE ...] [--iterations 500] [--device auto|cpu|cuda]
        [--work runs/small_grid] [--json validation/results/small_grid.json] [--tag TEXT]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "rgs_engine").is_dir() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CT_DIR = ROOT / ".cache" / "ct"
GRID = 64  # voxels along the region's longest edge
FINE = 3  # projection grid = GRID x FINE
VIEWS, TEST_VIEWS = 25, 10
GS_ITERATIONS = 500  # the README's CPU quick-start setting


@dataclass(frozen=True)
class Case:
    name: str
    region: tuple  # ((x0, x1), (y0, y1), (z0, z1)) fractions of the CT box
    det: int
    orbit: str  # circular | arbitrary
    noise: tuple  # (photons, sigma), TIGRE model
    seed: int
    note: str
    ct: str = "cxr.nii.gz"  # file in .cache/ct/ (datasets/fetch_ct.py)
    views: int = VIEWS  # training views


FULL = (0.0, 1.0)
CASES = {
    c.name: c for c in (
        Case("full-c128", (FULL, FULL, FULL), 128, "circular", (1e4, 10.0), 0,
             "whole CT box (360 mm, 5.6 mm voxels, 64x64x60), as the README quick start"),
        Case("upper-c96", (FULL, FULL, (0.4, 1.0)), 96, "circular", (1e4, 10.0), 1,
             "upper 60 % of z (64x64x36, 5.6 mm), 96 px detector"),
        Case("lower-arb128", (FULL, FULL, (0.0, 0.65)), 128, "arbitrary", (2e4, 5.0), 2,
             "lower 65 % of z (64x64x39, 5.6 mm), 25 random C-arm poses (random init)"),
        Case("crop-c64", ((0.06, 0.94), (0.06, 0.94), (0.1, 0.9)), 64, "circular", (5e3, 10.0), 3,
             "central 317 mm x 317 mm x 266 mm crop (64x64x54, 5.0 mm), 64 px detector, 5e3 photons"),
        Case("head-c96", (FULL, FULL, FULL), 96, "circular", (1e4, 10.0), 4,
             "another anatomy: the CT brain atlas of `fetch_ct.py --ct head` (skull-stripped head "
             "in air, 202 mm box, 64x64x57 of 3.2 mm), 96 px detector", ct="head.nii.gz"),
        Case("full-c128-v50", (FULL, FULL, FULL), 128, "circular", (1e4, 10.0), 5,
             "full-c128 with 50 training views: a recipe must not lose where the views are less sparse",
             views=50),
    )
}


def region_grid(ct_grid, region):
    """The VolumeGrid of ``ct_grid``'s box restricted to ``region`` (fractions per axis)."""
    import numpy as np

    from rgs_engine.core.geometry import VolumeGrid

    lo, hi = ct_grid.bounds()
    a = np.array([lo[i] + region[i][0] * (hi[i] - lo[i]) for i in range(3)])
    b = np.array([lo[i] + region[i][1] * (hi[i] - lo[i]) for i in range(3)])
    n = 4  # any grid; only the box matters to fit_grid
    return VolumeGrid(tuple([n] * 3), tuple((b - a) / n), tuple(a + (b - a) / (2 * n)))


def build_case(case: Case, path: Path) -> dict:
    """Simulate ``case`` into ``path`` (rgs .h5); returns a description."""
    import torch
    import torch.nn.functional as F

    from rgs_engine.core.geometry import VolumeGrid
    from rgs_engine.io.files import load_nifti
    from rgs_engine.io.projection_data import ProjectionData
    from rgs_engine.io.rgs_h5 import save_projections
    from rgs_engine.sim import ct, scan

    hu, ct_grid = load_nifti(CT_DIR / case.ct)
    grid = ct.fit_grid(region_grid(ct_grid, case.region), GRID)
    fine = VolumeGrid.centred([FINE * n for n in grid.shape], grid.spacing[0] / FINE, grid.centre)
    mu_fine = ct.resample(ct.hu_to_mu(hu), ct_grid, fine)
    gt = F.avg_pool3d(mu_fine[None, None], FINE)[0, 0].contiguous()
    spec = scan.ScanSpec(views=case.views, test_views=TEST_VIEWS, orbit=case.orbit, det=case.det,
                         noise=case.noise, seed=case.seed)
    train, test, info = scan.make_geometries(grid, spec)
    clean = scan.project_views(mu_fine, fine, train)
    test_p = scan.project_views(mu_fine, fine, test)
    gen = torch.Generator().manual_seed(case.seed)
    noisy, s = scan.add_noise(clean, *case.noise, "tigre", gen)
    info.update(noise_scale=s, projected_on=list(fine.shape), fine_spacing_mm=fine.spacing[0])
    data = ProjectionData(projections=noisy, geometry=train, grid=grid, ground_truth=gt.cpu(),
                          test_projections=test_p, test_geometry=test, time=None,
                          source=f"{case.ct} small_grid {case.name}",
                          attributes={"parameters": asdict(spec), "scan": info,
                                      "small_grid_case": asdict(case)})
    save_projections(path, data, force=True)
    return {"grid": list(grid.shape), "spacing_mm": round(grid.spacing[0], 3),
            "fine": list(fine.shape), **{k: info[k] for k in ("dso_mm", "dsd_mm", "pixel_mm")}}


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _progress(event) -> None:
    """Print every 100th iteration (with the PSNR the pipeline reports) and the stages."""
    done = getattr(event, "done", None)
    if getattr(event, "kind", "") == "step" and done and (done % 100 == 0):
        print(f"  {time.strftime('%H:%M:%S')} {event.label} {done}/{event.total} {event.info}",
              flush=True)


def old_count(voxels: int) -> int:
    """The automatic Gaussian count before the size rule (commit a041725): one per 20
    voxels, 10k..50k."""
    return int(min(max(voxels // 20, 10_000), 50_000))


def expand_sets(sets: list[str], path: Path) -> list[str]:
    """``@before`` -> the recipe before the size rule (old count, rates x1); ``@count`` ->
    today's automatic count with rates x1; ``@rates`` -> the old count with today's
    automatic rate factor. Other items pass through."""
    if not any(s.startswith("@") for s in sets):
        return sets
    from rgs_engine.io.projections import load_projections
    from rgs_engine.recon.gaussian import GSConfig

    data = load_projections(path)
    voxels = int(math.prod(data.grid.shape))
    new = GSConfig().resolved_for(data)
    macros = {"@before": [f"num_init={old_count(voxels)}", "rate_factor=1"],
              "@count": [f"num_init={new.num_init}", "rate_factor=1"],
              "@rates": [f"num_init={old_count(voxels)}", f"rate_factor={new.rate_factor}"]}
    return [x for s in sets for x in macros.get(s, [s])]


def parse_variant(text: str) -> tuple[str, list[str]]:
    label, _, sets = text.partition(":")
    return label, [s for s in sets.split(";") if s]


OPTIONS = ("init", "preset")  # variant items that are rgs recon options, not --set items


def split_options(sets: list[str]) -> tuple[dict, list[str]]:
    """``init=MODE`` / ``preset=NAME`` in a variant are ``rgs recon --init MODE`` /
    ``--preset NAME``; the other items are ``--set`` overrides."""
    is_option = [s.partition("=")[0] in OPTIONS for s in sets]
    options = dict(s.split("=", 1) for s, o in zip(sets, is_option) if o)
    return options, [s for s, o in zip(sets, is_option) if not o]


def run(args) -> list[dict]:
    import torch

    from rgs_engine import pipelines
    from rgs_engine.core import runtime

    runtime.init(None if args.device == "auto" else args.device)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    variants = [parse_variant(v) for v in args.variant] or [("default", [])]
    rows = []
    for name in args.cases.split(","):
        case = CASES[name]
        path = work / f"{name}.h5"
        t0 = time.perf_counter()
        if args.rebuild or not path.exists():
            if not (CT_DIR / case.ct).exists():
                sys.exit(f"{CT_DIR / case.ct} is missing: run python datasets/fetch_ct.py --ct all")
            desc = build_case(case, path)
        else:
            desc = {"reused": str(path)}
        print(f"[{name}] data {time.perf_counter() - t0:.1f} s {desc}", flush=True)
        for method in args.methods.split(","):
            if method == "fdk" and case.orbit != "circular":
                continue
            for label, sets in (variants if method == "gs" else [("default", [])]):
                options, sets = split_options(expand_sets(sets, path))
                out = work / f"{name}_{method}_{label}"
                load0 = load_average()
                res = pipelines.recon(path, out, views=case.views, method=method, **options,
                                      iterations=args.iterations if method == "gs" else None,
                                      sets=sets or None, force=True, progress=_progress,
                                      device=None if args.device == "auto" else args.device)
                m = res.metrics
                row = {"case": name, "method": method, "variant": label, "sets": sets, **options,
                       "psnr_3d": round(m["psnr_3d"], 3), "ssim_3d": round(m["ssim_3d"], 4),
                       "psnr_2d_test": round(m.get("psnr_2d_test") or math.nan, 3),
                       "seconds": round(m["seconds"], 1), "iterations": m.get("iterations"),
                       "num_gaussians": m.get("num_gaussians"), "device": m.get("device"),
                       "torch_threads": torch.get_num_threads(),
                       "load_1min": [round(load0, 2), round(load_average(), 2)],
                       "tag": args.tag, "when": _dt.datetime.now().isoformat(timespec="seconds")}
                rows.append(row)
                print(json.dumps(row), flush=True)
                save_rows(Path(args.json), [row])
    return rows


def save_rows(path: Path, new: list[dict]) -> None:
    """Append ``new`` to the JSON list at ``path`` (created if missing)."""
    old = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(old + new, indent=1))
    tmp.replace(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--methods", default="gs,sart,fdk")
    p.add_argument("--variant", action="append", default=[],
                   help="LABEL:KEY=VALUE;KEY=VALUE (gs --set overrides; init=MODE, preset=NAME: those "
                        "options); "
                        "repeatable")
    p.add_argument("--iterations", type=int, default=GS_ITERATIONS)
    p.add_argument("--device", default="auto")
    p.add_argument("--work", default=str(ROOT / "runs" / "small_grid"))
    p.add_argument("--json", default=str(ROOT / "validation" / "results" / "small_grid.json"))
    p.add_argument("--tag", default="")
    p.add_argument("--rebuild", action="store_true")
    args = p.parse_args(argv)
    run(args)


if __name__ == "__main__":
    main()
