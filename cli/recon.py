"""``rgs recon``: sparse-view CT reconstruction from projections (Gaussians, FDK or SART).

Outputs in ``--out DIR``:

* ``volume.nii.gz`` on the data's grid (its affine), so it overlays the CT it came from;
* ``slices.png``: central axial, coronal and sagittal slices, under the ground truth's;
* ``metrics.json``: ``psnr_3d`` / ``ssim_3d`` against the ground truth and ``psnr_2d_test`` /
  ``ssim_2d_test`` on the held-out test views (rendered by the Gaussians for gs, projected
  from the volume for fdk / sart), null where the data has none; ``seconds`` (wall time of
  this invocation, loading included; a resumed run counts from its resume, see
  ``resumed_from``), ``seconds_by_stage``, ``iterations``, ``num_gaussians`` (gs),
  ``device``, ``views``, ``method``;
* ``config.json``: everything to rerun (data path and fingerprint, the selected view
  indices, method, recipe, seed, device, rgs version, the equivalent command line);
* gs / sart: ``checkpoint.pt`` (every ``--checkpoint-every`` iterations and at the end);
  gs: ``gaussians.npz``.

``--resume`` continues an interrupted gs / sart run from ``checkpoint.pt`` with the settings
in ``config.json`` (options given again must match them). Ctrl-C during the iterations stops
after the current iteration, saves a checkpoint and exits with status 130.
"""
from __future__ import annotations

import hashlib
import json
import shlex
import time
from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import torch
import typer

import rgs_engine
from rgs_engine.io import images as imaging, files as volume_io
from rgs_engine.recon import sart as iterative
from rgs_engine.core import metrics, runtime
from rgs_engine.core.errors import RgsInputError
from rgs_engine.recon.gaussian import GaussianReconstruction, GSConfig
from rgs_engine.io.projections import ProjectionData, describe, load_projections

from .common import (DeviceOption, FilterChoice, Interrupt, app, fmt, handle_errors, interrupted_exit,
                     iteration_progress, out_console, print_summary, require, run_iterations,
                     stage_timer, start, write_metrics, write_run_config)

VOLUME, SLICES, METRICS, CONFIG, CHECKPOINT, GAUSSIANS = (
    "volume.nii.gz", "slices.png", "metrics.json", "config.json", "checkpoint.pt", "gaussians.npz")
SART_CHECKPOINT_FORMAT = "rgs-sart-checkpoint"
DEFAULT_CHECKPOINT_EVERY = {"gs": 500, "sart": 2}
DEFAULT_SEED = 0
PSNR_EVERY_GS = 100  # iterations between PSNR evaluations (a voxelisation) while training


class MethodChoice(str, Enum):
    gs = "gs"
    fdk = "fdk"
    sart = "sart"


class InitChoice(str, Enum):
    auto = "auto"
    fdk = "fdk"
    random = "random"


LABELS = {"gs": "Gaussians", "fdk": "FDK", "sart": "SART"}


# --------------------------------------------------------------------------------------
# Settings: from the options (a new run) or from config.json (--resume)
# --------------------------------------------------------------------------------------
def _parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` recipe overrides; VALUE is read as JSON when it parses, else text."""
    known = {f.name for f in fields(GSConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        require(sep == "=" and key, f"--set {item!r} is not KEY=VALUE: write e.g. --set num_init=20000")
        require(key in known, f"--set {key}: no such Gaussian recipe field: use one of "
                              f"{', '.join(sorted(known - {'iterations', 'init', 'seed'}))}")
        require(key not in ("iterations", "init", "seed"),
                f"--set {key}: use the --{key} option instead")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _new_settings(data_path: Path, views: Optional[int], method: str, init: Optional[str],
                  iterations: Optional[int], seed: Optional[int], filter: Optional[str],
                  subsets: Optional[int], relaxation: Optional[float],
                  checkpoint_every: Optional[int], sets: dict[str, Any]) -> dict[str, Any]:
    """The settings of a new run (before the data are loaded: views may still be None)."""
    s: dict[str, Any] = {"data": str(data_path.resolve()), "views": views, "method": method,
                         "seed": DEFAULT_SEED if seed is None else seed}
    if method == "fdk":
        s["fdk"] = {"filter": filter or "ramp"}
        return s
    s["checkpoint_every"] = checkpoint_every or DEFAULT_CHECKPOINT_EVERY[method]
    if method == "sart":
        s["iterations"] = iterative.DEFAULT_ITERATIONS if iterations is None else iterations
        s["sart"] = {"subsets": subsets,  # None: the default, resolved once the views are known
                     "relaxation": iterative.DEFAULT_RELAXATION if relaxation is None else relaxation,
                     "nonneg": True}
        return s
    base = GSConfig()
    try:
        cfg = GSConfig(**{**base.to_dict(), **sets,
                          "iterations": base.iterations if iterations is None else iterations,
                          "init": init or "auto", "seed": s["seed"]})
    except RgsInputError:
        raise
    except (TypeError, ValueError) as exc:  # e.g. --set num_init=many
        raise RgsInputError(f"--set {', '.join(f'{k}={v!r}' for k, v in sets.items())}: a value "
                            f"has the wrong type ({exc}): give numbers as numbers, pairs as [a, b]"
                            ) from exc
    s["iterations"] = cfg.iterations
    s["gs"] = cfg.to_dict()
    return s


def _check_method_options(method: str, init, iterations, filter, subsets, relaxation,
                          checkpoint_every, sets) -> None:
    given = {"--init": (init, ("gs",)), "--iterations": (iterations, ("gs", "sart")),
             "--filter": (filter, ("fdk",)), "--subsets": (subsets, ("sart",)),
             "--relaxation": (relaxation, ("sart",)),
             "--checkpoint-every": (checkpoint_every, ("gs", "sart")),
             "--set": (sets or None, ("gs",))}
    for option, (value, methods) in given.items():
        require(value is None or method in methods,
                f"{option} does not apply to --method {method}: it is for "
                f"{' / '.join(methods)} only; drop it")


def _resume_settings(out: Path, data_path: Path, given: dict[str, Any]) -> dict[str, Any]:
    """config.json of the run in ``out``; options given on the command line must match it."""
    path = out / CONFIG
    require(path.is_file(), f"{path} not found: there is no run to resume in {out}; "
                            "start one without --resume")
    try:
        s = json.loads(path.read_text())
        s["method"], s["data"], s["views"], s["iterations"]  # noqa: B018 - presence check
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RgsInputError(f"{path}: not a readable rgs recon config ({type(exc).__name__}: {exc}): "
                            "start again with --force instead of --resume") from exc
    require(s["method"] in ("gs", "sart"),
            f"the run in {out} used --method {s['method']}: only gs and sart runs can be "
            "resumed; run it again with --force")
    require(str(data_path.resolve()) == s["data"],
            f"DATA {data_path} differs from the run in {out} ({s['data']}): pass the same "
            "data to resume, or start a new run without --resume")
    known = {"--views": s.get("views"), "--method": s["method"],
             "--iterations": s.get("iterations"), "--seed": s.get("seed"),
             "--checkpoint-every": s.get("checkpoint_every"),
             "--init": (s.get("gs") or {}).get("init"),
             "--subsets": (s.get("sart") or {}).get("subsets"),
             "--relaxation": (s.get("sart") or {}).get("relaxation")}
    for option, value in given.items():
        if value is None:
            continue
        if option == "--set":
            recipe = s.get("gs") or {}
            for key, v in value.items():
                require(recipe.get(key) == v, f"--set {key}={json.dumps(v)} differs from the run in "
                                               f"{out} ({key}={json.dumps(recipe.get(key))}): drop it "
                                               "to resume, or start a new run without --resume")
            continue
        require(value == known.get(option),
                f"{option} {value} differs from the run in {out} ({option} {known.get(option)}): "
                "drop it to resume, or start a new run without --resume")
    return s


def _fingerprint(data: ProjectionData) -> str:
    """SHA-256 of the selected projections and their geometry (detects changed data)."""
    h = hashlib.sha256()
    h.update(data.projections.numpy().tobytes())
    h.update(data.geometry.vectors.numpy().tobytes())
    h.update(repr((data.geometry.det_shape, data.geometry.mode, data.grid.to_dict())).encode())
    return h.hexdigest()


def _select(data: ProjectionData, views: int) -> tuple[ProjectionData, list[int]]:
    """``views`` evenly spread training views and their indices in the file."""
    return data.select_views(views), data.view_indices(views).tolist()


# --------------------------------------------------------------------------------------
# Progress, interruption, checkpoints
# --------------------------------------------------------------------------------------
def _save_sart_checkpoint(path: Path, solver: iterative.SART) -> None:
    state = {"format": SART_CHECKPOINT_FORMAT, "iteration": solver.iteration,
             "volume": solver.volume.detach().cpu()}
    with volume_io.atomic_write(path, force=True) as tmp:
        torch.save(state, tmp)


def _load_sart_checkpoint(path: Path, grid) -> tuple[torch.Tensor, int]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        ok = (isinstance(state, dict) and state.get("format") == SART_CHECKPOINT_FORMAT
              and tuple(state["volume"].shape) == grid.shape and int(state["iteration"]) >= 0)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for damaged files
        raise RgsInputError(f"{path}: not a readable SART checkpoint ({type(exc).__name__}): "
                            "start again with --force instead of --resume") from exc
    require(ok, f"{path}: not a SART checkpoint of this run's grid {grid.shape}: start again "
                "with --force instead of --resume")
    return state["volume"], int(state["iteration"])


def _resume_command(out: Path, data_path: Path) -> str:
    return "rgs recon " + shlex.join([str(data_path), "--out", str(out), "--resume"])


# --------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------
def _run_sart(data: ProjectionData, settings: dict, out: Path, data_path: Path, resume: bool,
              truth: Optional[torch.Tensor], dev: torch.device) -> tuple[torch.Tensor, dict]:
    grid, total, every = data.grid, settings["iterations"], settings["checkpoint_every"]
    init, done = (None, 0)
    if resume:
        init, done = _load_sart_checkpoint(out / CHECKPOINT, grid)
        init = init.to(dev)
    sart_cfg = settings["sart"]
    solver = iterative.SART(data.projections.to(dev), data.geometry, grid,
                            subsets=sart_cfg["subsets"], relaxation=sart_cfg["relaxation"],
                            nonneg=sart_cfg["nonneg"], init=init, iteration=done)
    psnr = None
    with Interrupt() as interrupt, iteration_progress("sart", total, done) as update:
        try:
            while solver.iteration < total:
                if interrupt.requested:
                    raise KeyboardInterrupt
                solver.step()
                if truth is not None:
                    psnr = metrics.psnr_3d(solver.volume, truth)
                update(solver.iteration, f"residual {solver.residual:.4f}"
                       + (f"  PSNR {psnr:.2f} dB" if psnr is not None else ""))
                if solver.iteration % every == 0:
                    _save_sart_checkpoint(out / CHECKPOINT, solver)
        except KeyboardInterrupt:
            # the volume is only replaced after a complete pass: always consistent
            _save_sart_checkpoint(out / CHECKPOINT, solver)
            iteration = solver.iteration
            interrupt_exit = True
        else:
            interrupt_exit = False
    if interrupt_exit:
        interrupted_exit(out / CHECKPOINT, iteration, True, _resume_command(out, data_path))
    _save_sart_checkpoint(out / CHECKPOINT, solver)
    return solver.volume, {"iterations": solver.iteration, "num_gaussians": None,
                           "final_residual": solver.residual,
                           "resumed_from": done if resume else None}


def _run_gs(data: ProjectionData, settings: dict, out: Path, data_path: Path, resume: bool,
            truth: Optional[torch.Tensor], stage: Callable[[str, str], Any]
            ) -> tuple[torch.Tensor, dict, Any]:
    config = GSConfig.from_dict(settings["gs"])
    total, every = config.iterations, settings["checkpoint_every"]
    with stage("initialise", "initialise Gaussians" if not resume else "load checkpoint"):
        if resume:
            rec = GaussianReconstruction.load_checkpoint(out / CHECKPOINT, data)
            voxels = data.grid.shape[0] * data.grid.shape[1] * data.grid.shape[2]
            require(rec.config.to_dict() == config.resolved(voxels).to_dict(),
                    f"{out / CHECKPOINT} holds a different Gaussian recipe than {out / CONFIG}: "
                    "start again with --force instead of --resume")
        else:
            torch.manual_seed(config.seed)
            rec = GaussianReconstruction(data, config)
    resumed_from = rec.iteration if resume else None
    stats = run_iterations(rec, total, out / CHECKPOINT, every, "gs",
                           lambda st: f"loss {st['loss']:.4f}  {int(st['gaussians']):,} Gaussians",
                           _resume_command(out, data_path),
                           psnr=None if truth is None else lambda: metrics.psnr_3d(rec.volume(), truth),
                           psnr_every=PSNR_EVERY_GS)
    rec.save_gaussians(out / GAUSSIANS, force=True)
    return rec.volume(), {"iterations": rec.iteration, "num_gaussians": len(rec.gaussians),
                          "final_loss": stats["loss"], "resumed_from": resumed_from}, rec


# --------------------------------------------------------------------------------------
# rgs recon
# --------------------------------------------------------------------------------------
@app.command()
@handle_errors
def recon(
    data_path: Annotated[Path, typer.Argument(
        metavar="DATA",
        help="Projections: an rgs .h5 file, an R2-Gaussian data folder or a NAF .pickle.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (created if missing).")],
    views: Annotated[Optional[int], typer.Option(
        help="Use N training views spread evenly over the scan (default: all).")] = None,
    method: Annotated[Optional[MethodChoice], typer.Option(
        help="gs (radiative Gaussians), fdk (circular orbits) or sart (OS-SART). [default: gs]")] = None,
    init: Annotated[Optional[InitChoice], typer.Option(
        help="gs initialisation: fdk (circular orbits), random, or auto (fdk when circular). "
             "[default: auto]")] = None,
    iterations: Annotated[Optional[int], typer.Option(
        help=f"gs / sart iterations. [default: gs {GSConfig().iterations}, "
             f"sart {iterative.DEFAULT_ITERATIONS}]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (gs). [default: 0]")] = None,
    filter: Annotated[Optional[FilterChoice], typer.Option(
        help="FDK filter window. [default: ramp]")] = None,
    subsets: Annotated[Optional[int], typer.Option(
        help=f"SART ordered subsets. [default: {iterative.DEFAULT_SUBSETS}, at most one per "
             "view]")] = None,
    relaxation: Annotated[Optional[float], typer.Option(
        help=f"SART relaxation lambda in (0, 2). [default: {iterative.DEFAULT_RELAXATION}]")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        "--checkpoint-every",
        help=f"Iterations between checkpoints. [default: gs {DEFAULT_CHECKPOINT_EVERY['gs']}, "
             f"sart {DEFAULT_CHECKPOINT_EVERY['sart']}]")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE",
        help="Override a field of the Gaussian recipe (gs), e.g. --set num_init=20000; "
             "repeatable.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume",
        help="Continue the interrupted gs / sart run in --out (settings from its "
             "config.json).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    device: DeviceOption = None,
) -> None:
    """Reconstruct a volume from (sparse) projections with Gaussians, FDK or SART.

    Writes OUT/volume.nii.gz (on the data's grid, in its world frame), OUT/slices.png (next
    to the ground truth when the data has one), OUT/metrics.json (3D PSNR / SSIM against the
    ground truth, 2D PSNR / SSIM on the held-out test views, seconds), OUT/config.json and,
    for gs / sart, OUT/checkpoint.pt (and OUT/gaussians.npz for gs). Ctrl-C during the
    iterations saves a checkpoint; continue with --resume.
    """
    t_start = time.perf_counter()
    require(views is None or views >= 1, f"--views {views} is too few: use at least 1 view")
    require(iterations is None or iterations >= 1, f"--iterations {iterations}: use at least 1")
    require(checkpoint_every is None or checkpoint_every >= 1,
            f"--checkpoint-every {checkpoint_every}: use at least 1")
    require(subsets is None or subsets >= 1, f"--subsets {subsets}: use at least 1")
    require(relaxation is None or 0 < relaxation < 2,
            f"--relaxation {relaxation}: use a value in (0, 2)")
    require(not out.exists() or out.is_dir(), f"--out {out} is a file: pass a directory")
    opt = {"init": init.value if init else None, "filter": filter.value if filter else None}
    sets = _parse_sets(set_) if set_ else {}

    if resume:
        given = {"--views": views, "--method": method.value if method else None,
                 "--iterations": iterations, "--seed": seed, "--checkpoint-every": checkpoint_every,
                 "--init": opt["init"], "--subsets": subsets, "--relaxation": relaxation,
                 "--set": sets or None}
        require(opt["filter"] is None, "--filter does not apply to a resumed gs / sart run: drop it")
        settings = _resume_settings(out, data_path, given)
        name = settings["method"]
        finals = [VOLUME, SLICES, METRICS] + ([GAUSSIANS] if name == "gs" else [])
        require((out / CHECKPOINT).is_file(),
                f"{out / CHECKPOINT} not found: the run stopped before its first checkpoint; "
                "start it again with --force")
        volume_io.check_writable([out / f for f in finals], force)
    else:
        name = (method or MethodChoice.gs).value
        _check_method_options(name, opt["init"], iterations, opt["filter"], subsets, relaxation,
                              checkpoint_every, sets)
        outputs = [VOLUME, SLICES, METRICS, CONFIG] + (
            [CHECKPOINT] if name != "fdk" else []) + ([GAUSSIANS] if name == "gs" else [])
        if not force and (out / CONFIG).exists():
            raise RgsInputError(f"{out / CONFIG} exists: a run is already in {out}; pass --resume "
                                "to continue it or --force to start over")
        volume_io.check_writable([out / f for f in outputs], force)
        settings = _new_settings(data_path, views, name, opt["init"], iterations, seed, opt["filter"],
                                 subsets, relaxation, checkpoint_every, sets)

    dev = start(device)
    stage_seconds: dict[str, float] = {}
    stage = stage_timer(stage_seconds)

    with stage("load", f"load {data_path.name}"):
        full = load_projections(data_path)
        n = settings["views"] if settings["views"] is not None else full.num_views
        data, index = _select(full, n)
        fingerprint = _fingerprint(data)
    if resume:
        require(index == settings.get("view_indices") and fingerprint == settings.get("data_sha256"),
                f"the projections in {data_path} differ from the ones the run in {out} used: "
                "pass the same data to resume, or start a new run without --resume")
    else:
        settings.update({"views": n, "view_indices": index, "available_views": full.num_views,
                         "data_sha256": fingerprint, "data_source": data.source,
                         "grid": data.grid.to_dict(), "device": dev.type,
                         "rgs_version": rgs_engine.__version__})
        if name == "sart":
            sart_cfg = settings["sart"]
            if sart_cfg["subsets"] is None:
                sart_cfg["subsets"] = iterative.default_subsets(n)
            require(sart_cfg["subsets"] <= n, f"--subsets {sart_cfg['subsets']} is more than the "
                                              f"{n} views: use at most {n} subsets")
        if name == "fdk":
            require(data.is_circular, f"--method fdk needs a circular orbit; the views in {data_path} "
                                      "have other poses: use --method sart or gs")
        if name == "gs":
            if settings["gs"]["init"] == "fdk":
                require(data.is_circular, f"--init fdk needs a circular orbit; the views in {data_path} "
                                          "have other poses: use --init random (or auto)")
            settings["init_resolved"] = (settings["gs"]["init"] if settings["gs"]["init"] != "auto"
                                         else ("fdk" if data.is_circular else "random"))
        settings["command"] = "rgs recon " + shlex.join(
            [settings["data"], "--out", str(out.resolve()), "--views", str(n), "--method", name,
             "--seed", str(settings["seed"])]
            + ({"fdk": ["--filter", settings.get("fdk", {}).get("filter", "ramp")],
                "sart": ["--iterations", str(settings.get("iterations")),
                         "--checkpoint-every", str(settings.get("checkpoint_every")),
                         "--subsets", str(settings.get("sart", {}).get("subsets")),
                         "--relaxation", str(settings.get("sart", {}).get("relaxation"))],
                "gs": ["--iterations", str(settings.get("iterations")),
                       "--checkpoint-every", str(settings.get("checkpoint_every")),
                       "--init", str(settings.get("gs", {}).get("init"))]
                + [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]}[name]))
        write_run_config(out, (VOLUME, SLICES, METRICS, CONFIG, CHECKPOINT, GAUSSIANS), settings, force)

    truth = data.ground_truth.to(dev) if data.ground_truth is not None else None
    rec = None
    if name == "fdk":
        with stage("fdk", f"FDK ({settings['fdk']['filter']})"):
            volume = rgs_engine.fdk(data.projections.to(dev), data.geometry, data.grid,
                                    filter=settings["fdk"]["filter"])
        extra = {"iterations": None, "num_gaussians": None, "resumed_from": None}
    elif name == "sart":
        t0 = time.perf_counter()
        volume, extra = _run_sart(data, settings, out, data_path, resume, truth, dev)
        stage_seconds["iterations"] = round(time.perf_counter() - t0, 3)
    else:
        t0 = time.perf_counter()
        volume, extra, rec = _run_gs(data, settings, out, data_path, resume, truth, stage)
        stage_seconds["iterations"] = round(time.perf_counter() - t0 - stage_seconds["initialise"], 3)

    with stage("metrics", "PSNR / SSIM"):
        report: dict[str, Any] = {"method": name, "views": n, "psnr_3d": None, "ssim_3d": None,
                                  "psnr_2d_test": None, "ssim_2d_test": None, "test_views": None}
        if truth is not None:
            report["psnr_3d"] = metrics.psnr_3d(volume, truth)
            report["ssim_3d"] = metrics.ssim_3d(volume, truth)
        if data.test_projections is not None:
            test = data.test_projections.to(dev)
            rendered = (rec.render(data.test_geometry) if rec is not None
                        else rgs_engine.project(volume, data.grid, data.test_geometry))
            report["psnr_2d_test"] = metrics.psnr_2d(rendered, test)
            report["ssim_2d_test"] = metrics.ssim_2d(rendered, test)
            report["test_views"] = data.test_geometry.num_views
    with stage("write", "write outputs"):
        volume_io.save_nifti(out / VOLUME, volume, data.grid, force=True)
        panels = ({"ground truth": truth} if truth is not None else {}) | {LABELS[name]: volume}
        imaging.slices_png(out / SLICES, panels, data.grid, force=True)
    report.update(extra)
    write_metrics(out / METRICS, report, dev, t_start, stage_seconds, settings)

    out_console.print(f"recon of {data_path}: {describe(data)}; method {name}, {runtime.describe(dev)}",
                      highlight=False)
    rows = [("PSNR 3D (dB)", fmt(report["psnr_3d"])), ("SSIM 3D", fmt(report["ssim_3d"], 4)),
            ("PSNR 2D test (dB)", fmt(report["psnr_2d_test"])),
            ("SSIM 2D test", fmt(report["ssim_2d_test"], 4)),
            ("iterations", str(report["iterations"]) if report["iterations"] is not None else "n/a"),
            ("Gaussians", "n/a" if report["num_gaussians"] is None else f"{report['num_gaussians']:,}"),
            ("seconds", f"{report['seconds']:.2f}")]
    files = [VOLUME, SLICES, METRICS, CONFIG] + ([CHECKPOINT] if name != "fdk" else []) + (
        [GAUSSIANS] if name == "gs" else [])
    print_summary(rows, [out / f for f in files])
