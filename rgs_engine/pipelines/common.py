"""What every scenario pipeline shares: progress reporting, stop requests, the iteration loop
with checkpoints, and the run-folder rules (a new run, ``--resume``, ``--force``, metrics).

Progress goes through one callback, ``progress(event: ProgressEvent)``, so the same pipeline
drives the command line's rich display, a notebook's print, or a batch runner's log:

* ``ProgressEvent("stage", key, label)`` when a named stage starts;
* ``ProgressEvent("step", key, label, done, total, info)`` after each iteration of a loop;
* ``ProgressEvent("warning", key, text)`` for something the user must know about the result.

A pipeline asked to stop (``should_stop()`` returns True, e.g. after Ctrl-C) finishes the
current iteration, saves its checkpoint and raises :class:`Interrupted`; a
``KeyboardInterrupt`` inside the loop is treated the same way (the checkpoint is only saved
when it arrived between two iterations).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from ..core import runtime
from ..core.errors import RgsInputError, diverged
from ..io import files

ProgressCallback = Callable[["ProgressEvent"], None]
StopCheck = Callable[[], bool]


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report. ``kind``: ``stage`` (a stage starts), ``step`` (an iteration of
    ``total`` finished, ``done`` so far, ``info`` the loop's latest figures) or ``warning``
    (``label`` is the message)."""
    kind: str
    key: str
    label: str
    done: Optional[int] = None
    total: Optional[int] = None
    info: str = ""


class Interrupted(Exception):
    """A run stopped on request. ``checkpoint``: its path; ``iteration``: the iteration it
    holds (None: stopped inside an iteration); ``saved``: whether this stop wrote it;
    ``resume_command``: the command line that continues the run."""

    def __init__(self, checkpoint: Path, iteration: Optional[int], saved: bool, resume_command: str):
        self.checkpoint, self.iteration, self.saved = Path(checkpoint), iteration, saved
        self.resume_command = resume_command
        super().__init__(self.message())

    def message(self) -> str:
        if self.saved:
            return f"interrupted: checkpoint at iteration {self.iteration} saved to {self.checkpoint}"
        if self.checkpoint.exists():
            return f"interrupted inside an iteration: the last periodic checkpoint {self.checkpoint} is kept"
        return "interrupted before the first checkpoint: nothing to resume"

    @property
    def resumable(self) -> bool:
        return self.saved or self.checkpoint.exists()


def require(ok: bool, message: str) -> None:
    """Raise :class:`RgsInputError` with ``message`` unless ``ok``."""
    if not ok:
        raise RgsInputError(message)


def parse_sets(items: Iterable[str], known: Iterable[str], options: dict[str, str], what: str,
               example: str) -> dict[str, Any]:
    """``--set KEY=VALUE`` overrides of a recipe: ``{KEY: VALUE}``, VALUE read as JSON when it
    parses, else text. ``known`` are the keys ``what`` has (e.g. "Gaussian recipe field");
    ``options`` maps the keys that have their own command-line option to it (refused here);
    ``example`` is a valid item for the error messages."""
    known = set(known)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        require(sep == "=" and key, f"--set {item!r} is not KEY=VALUE: write e.g. --set {example}")
        require(key in known, f"--set {key}: no such {what}: use one of {', '.join(sorted(known - set(options)))}")
        require(key not in options, f"--set {key}: use the {options.get(key)} option instead")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def built_with_sets(build: Callable[[], Any], sets: dict[str, Any]) -> Any:
    """``build()``: a recipe made with the ``--set`` overrides ``sets`` among its values; a
    value of the wrong type (e.g. ``--set num_init=many``) is raised as one clear error."""
    try:
        return build()
    except RgsInputError:
        raise
    except (TypeError, ValueError) as exc:
        raise RgsInputError(f"--set {', '.join(f'{k}={v!r}' for k, v in sets.items())}: a value "
                            f"has the wrong type ({exc}): give numbers as numbers, pairs as [a, b]"
                            ) from exc


class Reporter:
    """A pipeline's link to its caller: forwards progress events, answers stop requests and
    records each stage's seconds (``seconds[key]``, after :func:`runtime.sync`, so GPU work
    counts in the stage that queued it). Collects warnings in ``warnings``."""

    def __init__(self, progress: Optional[ProgressCallback] = None,
                 should_stop: Optional[StopCheck] = None):
        self._progress = progress
        self._should_stop = should_stop
        self.seconds: dict[str, float] = {}
        self.warnings: list[str] = []

    def emit(self, event: ProgressEvent) -> None:
        if self._progress is not None:
            self._progress(event)

    def stop_requested(self) -> bool:
        return bool(self._should_stop is not None and self._should_stop())

    def warn(self, message: str, key: str = "warning") -> None:
        self.warnings.append(message)
        self.emit(ProgressEvent("warning", key, message))

    @contextlib.contextmanager
    def stage(self, key: str, label: str) -> Iterator[None]:
        """Time the block as stage ``key`` (shown as ``label``)."""
        self.emit(ProgressEvent("stage", key, label))
        t0 = time.perf_counter()
        yield
        runtime.sync()
        self.seconds[key] = round(time.perf_counter() - t0, 3)

    def step(self, key: str, label: str, done: int, total: int, info: str = "") -> None:
        self.emit(ProgressEvent("step", key, label, done, total, info))


INFO_SECONDS = 0.5  # the loop's figures are read back from the device at most this often


def host_floats(stats: dict, iteration: int) -> dict:
    """``stats`` of step ``iteration`` with its device tensors (0-d) turned into Python floats
    (a host sync on a GPU: call it only when the figures are reported). A non-finite ``loss``
    raises RgsInputError: the training diverged (the loops' splats skip their per-step value
    checks; Gaussians gone non-finite are refused by their checkpoint)."""
    out = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in stats.items()}
    loss = out.get("loss")
    if isinstance(loss, float) and not math.isfinite(loss):
        raise diverged(f"the loss is {loss}", iteration)
    return out


def run_iterations(rec, total: int, checkpoint: Path, every: int, reporter: Reporter, label: str,
                   info: Callable[[dict], str], resume_command: str,
                   psnr: Optional[Callable[[], float]] = None, psnr_every: int = 100,
                   atomic_steps: bool = False) -> dict:
    """Run ``rec.step()`` until ``rec.iteration == total``, reporting progress after each step,
    saving ``rec.save_checkpoint(checkpoint)`` every ``every`` iterations and at the end;
    returns the last step's stats (floats). The report's text is ``info(stats)`` with the
    stats as floats (and the latest ``psnr()`` in dB, evaluated every
    ``min(psnr_every, total / 10)`` steps and at the end); ``rec.step()`` may return 0-d
    device tensors, which are read back (a GPU sync) only for the first and last steps, a
    PSNR evaluation, or when ``INFO_SECONDS`` have passed since the last read; steps in
    between repeat the last text. The loss is also read before each checkpoint; a non-finite
    one raises RgsInputError (the training diverged), as does a checkpoint of non-finite
    Gaussians (see ``GaussianReconstruction.state_dict``). A stop request or a
    ``KeyboardInterrupt`` raises :class:`Interrupted` (see the module docstring);
    ``atomic_steps``: a step interrupted half way leaves ``rec`` as it was before it (SART
    replaces its volume only after a full pass), so the checkpoint is saved then too."""
    stats: dict = {"loss": math.nan}
    in_step = False
    psnr_every = max(1, min(psnr_every, total // 10))
    latest: Optional[float] = None
    text, read_at = "", -math.inf
    try:
        while rec.iteration < total:
            if reporter.stop_requested():
                raise KeyboardInterrupt
            in_step = True
            stats = rec.step()
            in_step = False
            evaluate = psnr is not None and (rec.iteration % psnr_every == 0 or rec.iteration == total)
            if evaluate:
                latest = psnr()
            now = time.perf_counter()
            checkpoint_due = rec.iteration % every == 0
            if evaluate or checkpoint_due or rec.iteration == total or now - read_at >= INFO_SECONDS:
                text = info(host_floats(stats, rec.iteration)) + (f"  PSNR {latest:.2f} dB" if latest is not None else "")
                read_at = now
            reporter.step("iterations", label, rec.iteration, total, text)
            if checkpoint_due:  # its loss was read just above: a diverged run saves none
                rec.save_checkpoint(checkpoint)
    except KeyboardInterrupt:
        saved = atomic_steps or not in_step  # a second Ctrl-C inside a step may leave it half done
        if saved:
            rec.save_checkpoint(checkpoint)
        raise Interrupted(checkpoint, rec.iteration if saved else None, saved, resume_command) from None
    rec.save_checkpoint(checkpoint)
    return host_floats(stats, rec.iteration)


# --------------------------------------------------------------------------------------
# The run folder: new run, resume, force, metrics
# --------------------------------------------------------------------------------------
def check_new_run(out: Path, outputs: Iterable[str], force: bool) -> None:
    """A new run in ``out``: refuse to replace another run's config.json or any of
    ``outputs`` (file names) without ``force``."""
    if not force and (out / "config.json").exists():
        raise RgsInputError(f"{out / 'config.json'} exists: a run is already in {out}; pass --resume "
                            "to continue it or --force to start over")
    files.check_writable([out / f for f in outputs], force)


def write_run_config(out: Path, outputs: Iterable[str], settings: dict, force: bool) -> None:
    """Start a new run in ``out``: with ``force``, first remove the old run's ``outputs``
    (file names: no stale checkpoint survives); then write ``settings`` to config.json."""
    if force:
        for f in outputs:
            (out / f).unlink(missing_ok=True)
    files.save_json(out / "config.json", settings, force=True)


def resume_settings(out: Path, case: Path, mode: str, known: Callable[[dict], dict], given: dict) -> dict:
    """``out/config.json`` of the ``rgs track4d --mode MODE`` run in ``out``, for --resume.

    ``known(settings)`` maps each option to the run's value (a damaged file raises KeyError
    or TypeError there); the options in ``given`` that are not None must match them, and
    ``case`` must be the run's data."""
    path = out / "config.json"
    require(path.is_file(), f"{path} not found: there is no run to resume in {out}; "
                            "start one without --resume")
    s = files.load_json(path)
    run_mode = s.get("mode", "breathing") if isinstance(s, dict) else None
    require(run_mode == mode, f"the run in {out} is not a --mode {mode} run ({run_mode}): resume it "
                              "with its own mode, or start a new run with --force")
    try:
        values = known(s)
        same_data = s["data"] == str(case.resolve())
    except (KeyError, TypeError, RgsInputError) as exc:
        raise RgsInputError(f"{path}: not an rgs track4d {mode} config ({type(exc).__name__}: {exc}): "
                            "start again with --force instead of --resume") from exc
    require(same_data, f"CASE {case} differs from the run in {out} ({s['data']}): pass the same "
                       "case to resume, or start a new run without --resume")
    for option, value in given.items():
        require(value is None or value == values[option],
                f"{option} {value} differs from the run in {out} ({option} {values[option]}): "
                "drop it to resume, or start a new run without --resume")
    return s


def data_sha256(tensors: Iterable[torch.Tensor], text: str = "") -> str:
    """SHA-256 of the CPU ``tensors``' bytes in order, then ``text``: the fingerprint a run
    keeps in config.json so that ``--resume`` refuses changed data."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    h.update(text.encode())
    return h.hexdigest()


def write_metrics(path: Path, report: dict, dev: torch.device, t_start: float, seconds: dict,
                  settings: dict) -> dict:
    """Finish ``report`` with what every run reports (``device``, total ``seconds`` since
    ``t_start`` (perf_counter), ``seconds_by_stage``, the input's ``data`` record from
    ``settings``), write it to ``path`` (metrics.json) and return it."""
    report.update({"device": runtime.describe(dev), "seconds": round(time.perf_counter() - t_start, 3),
                   "seconds_by_stage": seconds, "data": settings["data"]})
    files.save_json(path, report, force=True)
    return report


@dataclass
class RunResult:
    """What a pipeline returns. ``out``: the run folder; ``metrics``: what metrics.json (or
    pose.json) holds; ``files``: the paths written; ``volumes``: the main results as tensors
    (name -> tensor, e.g. ``volume`` (nx, ny, nz) in 1/mm); ``warnings``: what the run
    flagged; ``extra``: scenario-specific objects (the trained model, the pose, ...)."""
    out: Path
    metrics: dict[str, Any]
    files: list[Path]
    volumes: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
