"""Static reconstruction scenarios: ``recon`` (sparse-view CT from projections with radiative
Gaussians, FDK or SART, with checkpoints and resume) and ``roundtrip`` (the engine's
end-to-end check: a DRR scan of a real CT, reconstructed with FDK).

``recon`` writes in ``out``:

* ``volume.nii.gz`` on the data's grid (its affine), so it overlays the CT it came from;
* ``slices.png``: central axial, coronal and sagittal slices, under the ground truth's;
* ``metrics.json``: ``psnr_3d`` / ``ssim_3d`` against the ground truth and ``psnr_2d_test`` /
  ``ssim_2d_test`` on the held-out test views (rendered by the Gaussians for gs, projected
  from the volume for fdk / sart), null where the data has none; ``seconds`` (wall time of
  this invocation, loading included; a resumed run counts from its resume, see
  ``resumed_from``), ``seconds_by_stage``, ``iterations``, ``num_gaussians`` (gs),
  ``device``, ``views``, ``method``, ``preset`` (gs; null for fdk / sart);
* ``config.json``: everything to rerun (data path and fingerprint, the selected view
  indices, method, preset and the recipe it gave, seed, device, rgs version, the
  equivalent command line; gs: ``init_resolved``, the start ``--init`` gave, and
  ``gs_resolved``, what the recipe's automatic rules chose for this grid and these views:
  ``num_init``, ``max_gaussians``, ``rate_factor``, ``densify_rounds``);
* gs / sart: ``checkpoint.pt`` (every ``checkpoint_every`` iterations and at the end);
  gs: ``gaussians.npz``.

``resume=True`` continues an interrupted gs / sart run from ``checkpoint.pt`` with the
settings in ``config.json``, its preset included (options given again must match them). A
stop request during the iterations stops after the current iteration, saves a checkpoint and
raises :class:`~.common.Interrupted`.

Lengths in mm, attenuation in 1/mm, volumes (nx, ny, nz) on the data's grid.
"""
from __future__ import annotations

import json
import shlex
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

import torch

import rgs_engine
from ..core import metrics, runtime
from ..core.errors import RgsInputError
from ..io import files, images
from ..io.projections import ProjectionData, load_projections
from ..recon import fdk as fdk_method, presets, sart as iterative
from ..recon.gaussian import GaussianReconstruction, GSConfig
from ..sim import ct as ct_sim
from .common import (ProgressCallback, Reporter, RunResult, StopCheck, built_with_sets, check_new_run, data_sha256,
                     parse_sets, require, run_iterations, write_metrics, write_run_config)

VOLUME, SLICES, METRICS, CONFIG, CHECKPOINT, GAUSSIANS = (
    "volume.nii.gz", "slices.png", "metrics.json", "config.json", "checkpoint.pt", "gaussians.npz")
SART_CHECKPOINT_FORMAT = "rgs-sart-checkpoint"
DEFAULT_CHECKPOINT_EVERY = {"gs": 500, "sart": 2}
DEFAULT_SEED = 0
PSNR_EVERY_GS = 100  # iterations between PSNR evaluations (a voxelisation) while training
METHODS = ("gs", "fdk", "sart")
INITS = ("auto", "fdk", "sart", "random")
LABELS = {"gs": "Gaussians", "fdk": "FDK", "sart": "SART"}


# --------------------------------------------------------------------------------------
# Settings: from the options (a new run) or from config.json (--resume)
# --------------------------------------------------------------------------------------
def _parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` overrides of the Gaussian recipe (:func:`~.common.parse_sets`)."""
    return parse_sets(items, (f.name for f in fields(GSConfig)),
                      {"iterations": "--iterations", "init": "--init", "seed": "--seed"},
                      "Gaussian recipe field", "num_init=20000")


def _new_settings(data_path: Path, views: Optional[int], method: str, init: Optional[str],
                  iterations: Optional[int], seed: Optional[int], filter: Optional[str],
                  subsets: Optional[int], relaxation: Optional[float],
                  checkpoint_every: Optional[int], sets: dict[str, Any],
                  preset: str | None) -> dict[str, Any]:
    """The settings of a new run (before the data are loaded: views may still be None). The
    gs recipe is the defaults, then the ``preset``'s overrides, then ``iterations`` and
    ``sets`` (explicit options win)."""
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
    s["preset"] = presets.check(preset)
    base = {**GSConfig().to_dict(), **presets.overrides(preset)}
    cfg = built_with_sets(lambda: GSConfig(**{**base, **sets,
                                              "iterations": base["iterations"] if iterations is None else iterations,
                                              "init": init or "auto", "seed": s["seed"]}), sets)
    s["iterations"] = cfg.iterations
    s["gs"] = cfg.to_dict()
    return s


def _check_method_options(method: str, init, iterations, filter, subsets, relaxation,
                          checkpoint_every, sets, preset) -> None:
    given = {"--init": (init, ("gs",)), "--preset": (preset, ("gs",)),
             "--iterations": (iterations, ("gs", "sart")),
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
             "--preset": s.get("preset", presets.DEFAULT) if s["method"] == "gs" else None,
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
    return data_sha256((data.projections, data.geometry.vectors),
                       repr((data.geometry.det_shape, data.geometry.mode, data.grid.to_dict())))


def _select(data: ProjectionData, views: int) -> tuple[ProjectionData, list[int]]:
    """``views`` evenly spread training views and their indices in the file."""
    return data.select_views(views), data.view_indices(views).tolist()


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------
class _SartRun:
    """A :class:`~rgs_engine.recon.sart.SART` solver as :func:`~.common.run_iterations` drives
    it: ``step()`` returns its residual, ``save_checkpoint(path)`` writes the volume."""

    def __init__(self, solver: iterative.SART):
        self.solver = solver

    @property
    def iteration(self) -> int:
        return self.solver.iteration

    def step(self) -> dict:
        self.solver.step()
        return {"residual": self.solver.residual}

    def save_checkpoint(self, path: Path) -> None:
        state = {"format": SART_CHECKPOINT_FORMAT, "iteration": self.solver.iteration,
                 "volume": self.solver.volume.detach().cpu()}
        with files.atomic_write(path, force=True) as tmp:
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
              truth: Optional[torch.Tensor], dev: torch.device, reporter: Reporter
              ) -> tuple[torch.Tensor, dict]:
    grid, total, every = data.grid, settings["iterations"], settings["checkpoint_every"]
    init, done = (None, 0)
    if resume:
        init, done = _load_sart_checkpoint(out / CHECKPOINT, grid)
        init = init.to(dev)
    sart_cfg = settings["sart"]
    solver = iterative.SART(data.projections.to(dev), data.geometry, grid,
                            subsets=sart_cfg["subsets"], relaxation=sart_cfg["relaxation"],
                            nonneg=sart_cfg["nonneg"], init=init, iteration=done)
    run_iterations(_SartRun(solver), total, out / CHECKPOINT, every, reporter, "sart",
                   lambda st: f"residual {st['residual']:.4f}", _resume_command(out, data_path),
                   psnr=None if truth is None else lambda: metrics.psnr_3d(solver.volume, truth),
                   psnr_every=1, atomic_steps=True)
    return solver.volume, {"iterations": solver.iteration, "num_gaussians": None,
                           "final_residual": solver.residual,
                           "resumed_from": done if resume else None}


def _run_gs(data: ProjectionData, settings: dict, out: Path, data_path: Path, resume: bool,
            truth: Optional[torch.Tensor], reporter: Reporter
            ) -> tuple[torch.Tensor, dict, GaussianReconstruction]:
    config = GSConfig.from_dict(settings["gs"])
    total, every = config.iterations, settings["checkpoint_every"]
    with reporter.stage("initialise", "initialise Gaussians" if not resume else "load checkpoint"):
        if resume:
            rec = GaussianReconstruction.load_checkpoint(out / CHECKPOINT, data)
            require(rec.config.to_dict() == config.resolved_for(data).to_dict(),
                    f"{out / CHECKPOINT} holds a different Gaussian recipe than {out / CONFIG}: "
                    "start again with --force instead of --resume")
        else:
            torch.manual_seed(config.seed)
            rec = GaussianReconstruction(data, config)
    resumed_from = rec.iteration if resume else None
    last: dict[str, Any] = {}  # the volume of the latest PSNR evaluation and its iteration

    def psnr() -> float:
        last.update(iteration=rec.iteration, volume=rec.volume())
        return metrics.psnr_3d(last["volume"], truth)

    with reporter.stage("iterations", f"{total} iterations"):
        stats = run_iterations(rec, total, out / CHECKPOINT, every, reporter, "gs",
                               lambda st: f"loss {st['loss']:.4f}  {int(st['gaussians']):,} Gaussians",
                               _resume_command(out, data_path), psnr=None if truth is None else psnr,
                               psnr_every=PSNR_EVERY_GS)
        rec.save_gaussians(out / GAUSSIANS, force=True)
    # the final PSNR evaluation already voxelised the last iteration's Gaussians
    volume = last["volume"] if last.get("iteration") == rec.iteration else rec.volume()
    return volume, {"iterations": rec.iteration, "num_gaussians": len(rec.gaussians),
                          "final_loss": stats["loss"], "resumed_from": resumed_from}, rec


def _command_line(settings: dict, out: Path, name: str, n: int, recipe: dict[str, Any]) -> str:
    """The ``rgs recon`` command line that reruns the new run ``settings`` (config.json)."""
    per_method = {
        "fdk": ["--filter", settings.get("fdk", {}).get("filter", "ramp")],
        "sart": ["--iterations", str(settings.get("iterations")),
                 "--checkpoint-every", str(settings.get("checkpoint_every")),
                 "--subsets", str(settings.get("sart", {}).get("subsets")),
                 "--relaxation", str(settings.get("sart", {}).get("relaxation"))],
        "gs": ["--iterations", str(settings.get("iterations")),
               "--checkpoint-every", str(settings.get("checkpoint_every")),
               "--init", str(settings.get("gs", {}).get("init")),
               "--preset", str(settings.get("preset"))]
        + [a for k, v in recipe.items() for a in ("--set", f"{k}={json.dumps(v)}")]}
    return "rgs recon " + shlex.join([settings["data"], "--out", str(out.resolve()), "--views", str(n),
                                      "--method", name, "--seed", str(settings["seed"])]
                                     + per_method[name])


def _complete_new_settings(settings: dict, full: ProjectionData, data: ProjectionData, index: list[int],
                           fingerprint: str, data_path: Path, dev: torch.device) -> None:
    """Add to a new run's ``settings`` what is known once the data are loaded, and check the
    method against the data (circular orbits for FDK, subsets against the views)."""
    n, name = data.num_views, settings["method"]
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
                                      "have other poses: use --init sart (or auto)")
        config = GSConfig.from_dict(settings["gs"])
        resolved = config.resolved_for(data)
        settings["init_resolved"] = config.start()
        settings["gs_resolved"] = {k: getattr(resolved, k) for k in GSConfig.AUTOMATIC}


# --------------------------------------------------------------------------------------
# recon
# --------------------------------------------------------------------------------------
def recon(data_path: str | Path, out: str | Path, views: Optional[int] = None,
          method: Optional[str] = None, init: Optional[str] = None,
          iterations: Optional[int] = None, seed: Optional[int] = None,
          filter: Optional[str] = None, subsets: Optional[int] = None,
          relaxation: Optional[float] = None, checkpoint_every: Optional[int] = None,
          sets: Optional[list[str]] = None, preset: str | None = None, resume: bool = False,
          force: bool = False, device: str | None = None, progress: ProgressCallback | None = None,
          should_stop: StopCheck | None = None) -> RunResult:
    """Reconstruct a volume from the projections ``data_path`` (rgs .h5, R2-Gaussian folder or
    NAF .pickle) into ``out`` (options as ``rgs recon``; ``preset``: a name of
    :data:`~rgs_engine.recon.presets.PRESETS` (gs; None: default); ``sets``: ``KEY=VALUE``
    overrides of the Gaussian recipe, VALUE read as JSON when it parses; both recorded in
    config.json and ``preset`` in metrics.json). See the module docstring for the
    outputs. Returns ``metrics`` (metrics.json), ``files``, ``volumes["volume"]`` (nx, ny, nz)
    in 1/mm, and in ``extra``: ``data`` (the selected ProjectionData), ``method``,
    ``reconstruction`` (the GaussianReconstruction for gs, else None), ``device``.
    Raises :class:`~.common.Interrupted` when stopped during the iterations."""
    t_start = time.perf_counter()
    data_path, out = Path(data_path), Path(out)
    reporter = Reporter(progress, should_stop)
    require(method is None or method in METHODS, f"--method {method!r}: use one of {', '.join(METHODS)}")
    require(init is None or init in INITS, f"--init {init!r}: use one of {', '.join(INITS)}")
    require(filter is None or filter in fdk_method.FILTERS,
            f"--filter {filter!r}: use one of {', '.join(fdk_method.FILTERS)}")
    require(views is None or views >= 1, f"--views {views} is too few: use at least 1 view")
    require(iterations is None or iterations >= 1, f"--iterations {iterations}: use at least 1")
    require(checkpoint_every is None or checkpoint_every >= 1,
            f"--checkpoint-every {checkpoint_every}: use at least 1")
    require(subsets is None or subsets >= 1, f"--subsets {subsets}: use at least 1")
    require(relaxation is None or 0 < relaxation < 2,
            f"--relaxation {relaxation}: use a value in (0, 2)")
    require(not out.exists() or out.is_dir(), f"--out {out} is a file: pass a directory")
    if preset is not None:
        presets.check(preset)
    recipe = _parse_sets(sets) if sets else {}

    if resume:
        given = {"--views": views, "--method": method, "--iterations": iterations, "--seed": seed,
                 "--checkpoint-every": checkpoint_every, "--init": init, "--subsets": subsets,
                 "--relaxation": relaxation, "--set": recipe or None, "--preset": preset}
        require(filter is None, "--filter does not apply to a resumed gs / sart run: drop it")
        settings = _resume_settings(out, data_path, given)
        name = settings["method"]
        finals = [VOLUME, SLICES, METRICS] + ([GAUSSIANS] if name == "gs" else [])
        require((out / CHECKPOINT).is_file(),
                f"{out / CHECKPOINT} not found: the run stopped before its first checkpoint; "
                "start it again with --force")
        files.check_writable([out / f for f in finals], force)
    else:
        name = method or "gs"
        _check_method_options(name, init, iterations, filter, subsets, relaxation,
                              checkpoint_every, recipe, preset)
        outputs = [VOLUME, SLICES, METRICS, CONFIG] + (
            [CHECKPOINT] if name != "fdk" else []) + ([GAUSSIANS] if name == "gs" else [])
        check_new_run(out, outputs, force)
        settings = _new_settings(data_path, views, name, init, iterations, seed, filter,
                                 subsets, relaxation, checkpoint_every, recipe, preset)

    dev = runtime.init(device)
    with reporter.stage("load", f"load {data_path.name}"):
        full = load_projections(data_path)
        n = settings["views"] if settings["views"] is not None else full.num_views
        data, index = _select(full, n)
        fingerprint = _fingerprint(data)
    if resume:
        require(index == settings.get("view_indices") and fingerprint == settings.get("data_sha256"),
                f"the projections in {data_path} differ from the ones the run in {out} used: "
                "pass the same data to resume, or start a new run without --resume")
    else:
        _complete_new_settings(settings, full, data, index, fingerprint, data_path, dev)
        settings["command"] = _command_line(settings, out, name, n, recipe)
        write_run_config(out, (VOLUME, SLICES, METRICS, CONFIG, CHECKPOINT, GAUSSIANS), settings, force)

    truth = data.ground_truth.to(dev) if data.ground_truth is not None else None
    rec = None
    if name == "fdk":
        with reporter.stage("fdk", f"FDK ({settings['fdk']['filter']})"):
            volume = rgs_engine.fdk(data.projections.to(dev), data.geometry, data.grid,
                                    filter=settings["fdk"]["filter"])
        extra = {"iterations": None, "num_gaussians": None, "resumed_from": None}
    elif name == "sart":
        with reporter.stage("iterations", f"{settings['iterations']} SART iterations"):
            volume, extra = _run_sart(data, settings, out, data_path, resume, truth, dev, reporter)
    else:
        volume, extra, rec = _run_gs(data, settings, out, data_path, resume, truth, reporter)

    with reporter.stage("metrics", "PSNR / SSIM"):
        report: dict[str, Any] = {"method": name, "views": n,
                                  "preset": settings.get("preset", presets.DEFAULT) if name == "gs" else None,
                                  "psnr_3d": None, "ssim_3d": None,
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
    with reporter.stage("write", "write outputs"):
        files.save_nifti(out / VOLUME, volume, data.grid, force=True)
        panels = ({"ground truth": truth} if truth is not None else {}) | {LABELS[name]: volume}
        images.slices_png(out / SLICES, panels, data.grid, force=True)
    report.update(extra)
    write_metrics(out / METRICS, report, dev, t_start, reporter.seconds, settings)
    written = [VOLUME, SLICES, METRICS, CONFIG] + ([CHECKPOINT] if name != "fdk" else []) + (
        [GAUSSIANS] if name == "gs" else [])
    return RunResult(out=out, metrics=report, files=[out / f for f in written],
                     volumes={"volume": volume}, warnings=reporter.warnings,
                     extra={"data": data, "method": name, "reconstruction": rec, "device": dev})


# --------------------------------------------------------------------------------------
# roundtrip
# --------------------------------------------------------------------------------------
def roundtrip(ct_path: str | Path, out: str | Path, grid: int = 128, views: int = 180,
              dso: float = 1000.0, dsd: float = 1500.0, det: int = 256, filter: str = "ramp",
              force: bool = False, device: str | None = None,
              progress: ProgressCallback | None = None,
              should_stop: StopCheck | None = None) -> RunResult:
    """The engine's check (options as ``rgs roundtrip``): the CT ``ct_path`` (HU, NIfTI) to
    attenuation on an isotropic grid of ``grid`` voxels along its longest edge, ``views``
    Joseph projections over a full circle (``det`` pixels per side sized to cover the
    volume), FDK with the ``filter`` window, PSNR / SSIM against the truth. Writes
    ``out``/fdk.nii.gz (the CT's world frame), slices.png and metrics.json. Returns
    ``metrics`` (metrics.json; its ``seconds`` is per stage), ``files``, ``volumes``
    (``truth`` and ``fdk``, (nx, ny, nz) in 1/mm) and ``extra["grid"]`` (VolumeGrid)."""
    ct_path, out = Path(ct_path), Path(out)
    reporter = Reporter(progress, should_stop)
    require(filter in fdk_method.FILTERS, f"--filter {filter!r}: use one of {', '.join(fdk_method.FILTERS)}")
    require(grid >= 8, f"--grid {grid} is too small: use at least 8 voxels")
    require(views >= 2, f"--views {views} is too few: use at least 2 projections")
    require(det >= 8, f"--det {det} is too small: use at least 8 detector pixels")
    require(not out.exists() or out.is_dir(), f"--out {out} is a file: pass a directory")
    outputs = {name: out / name for name in ("fdk.nii.gz", "slices.png", "metrics.json")}
    files.check_writable(list(outputs.values()), force)
    dev = runtime.init(device)

    with reporter.stage("load", f"load {ct_path.name}"):
        hu, ct_grid = files.load_nifti(ct_path)
    with reporter.stage("resample", "HU -> attenuation, resample"):
        truth, vol_grid = ct_sim.attenuation_volume(hu.to(dev), ct_grid, grid, str(ct_path))
        scan = ct_sim.covering_scan(vol_grid, views, dso, dsd, det)
    with reporter.stage("project", f"project {views} views of {det}x{det}"):
        sinogram = rgs_engine.project(truth, vol_grid, scan)
    with reporter.stage("fdk", f"FDK ({filter}) onto {'x'.join(map(str, vol_grid.shape))}"):
        volume = rgs_engine.fdk(sinogram, scan, vol_grid, filter=filter)
    with reporter.stage("metrics", "PSNR / SSIM"):
        psnr, ssim = metrics.psnr_3d(volume, truth), metrics.ssim_3d(volume, truth)
    with reporter.stage("write", "write outputs"):
        files.save_nifti(outputs["fdk.nii.gz"], volume, vol_grid, force)
        images.slices_png(outputs["slices.png"], {"ground truth": truth, "FDK": volume}, vol_grid, force)

    report = {
        "ct": str(ct_path),
        "psnr_3d": psnr,
        "ssim_3d": ssim,
        "seconds": reporter.seconds,
        "device": runtime.describe(dev),
        "grid": vol_grid.to_dict(),
        "views": views,
        "scan": {"dso_mm": dso, "dsd_mm": dsd, "detector": [det, det],
                 "pixel_mm": float(scan.vectors[0, 6:9].norm()), "filter": filter,
                 "orbit": "full circle about z through the grid centre"},
        "mu_water_per_mm": ct_sim.MU_WATER,
        "versions": runtime.versions(),
    }
    files.save_json(outputs["metrics.json"], report, force)
    return RunResult(out=out, metrics=report, files=list(outputs.values()),
                     volumes={"truth": truth, "fdk": volume}, warnings=reporter.warnings,
                     extra={"grid": vol_grid})
