"""Shared pieces of the ``rgs`` commands: the Typer app, options, error handling, progress.

Bad input ends with one line ``error: ...`` on stderr and exit status 2
(:func:`handle_errors`); :class:`Stages` shows a progress display over named stages,
:func:`iteration_progress` one over training iterations, and :class:`Interrupt` turns Ctrl-C
into a stop after the current iteration (exit status :data:`EXIT_INTERRUPTED`).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import time
from enum import Enum
from typing import Annotated, Any, Callable, Iterator, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                           TextColumn, TimeElapsedColumn)

from rgs_engine.core import runtime

from rgs_engine.io import files as volume_io
from rgs_engine.core.errors import RgsDeviceError, RgsInputError

app = typer.Typer(
    name="rgs", add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
    help="X-ray radiative Gaussian splatting: sparse-view CT (simulate, recon), CT-to-X-ray "
         "registration (simulate-xrays, register), 4D reconstruction of breathing and of DSA "
         "contrast inflow (simulate4d, simulate-dsa, track4d), and the engine check (roundtrip).")
EXIT_INTERRUPTED = 130  # the shell's status for Ctrl-C
out_console = Console()
err_console = Console(stderr=True)


class DeviceChoice(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class FilterChoice(str, Enum):
    ramp = "ramp"
    hann = "hann"


DeviceOption = Annotated[Optional[DeviceChoice], typer.Option(
    "--device", help="Compute device; default: $RGS_DEVICE, else auto (CUDA when available).")]


def fail(message: str) -> None:
    typer.echo("error: " + " ".join(message.split()), err=True)
    raise typer.Exit(2)


def handle_errors(command):
    """Turn input, device and file-system problems into one ``error: ...`` line, exit 2."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (RgsInputError, RgsDeviceError) as exc:
            fail(str(exc))
        except OSError as exc:  # missing file, permission denied, a file where a folder should be
            where = exc.filename or "file system"
            fail(f"{where}: {exc.strerror or exc}: check the path and its permissions")
    return wrapper


def start(device: DeviceChoice | None) -> torch.device:
    return runtime.init(device.value if device is not None else None)


class Stages:
    """A rich progress display (stderr) over named stages that records each stage's seconds.

    The display is erased if a stage fails. Each stage ends with
    :func:`rgs_engine.core.runtime.sync`, so GPU work is counted in the stage that queued it.
    """

    def __init__(self, total: int):
        self.seconds: dict[str, float] = {}
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description:<34}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(), console=err_console)
        self._task = self._progress.add_task("", total=total)

    def __enter__(self) -> "Stages":
        self._progress.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # leave the error line alone on stderr
            self._progress.live.transient = True
        self._progress.stop()

    @contextlib.contextmanager
    def __call__(self, key: str, label: str) -> Iterator[None]:
        self._progress.update(self._task, description=label)
        t0 = time.perf_counter()
        yield
        runtime.sync()
        self.seconds[key] = round(time.perf_counter() - t0, 3)
        self._progress.advance(self._task)


def require(ok: bool, message: str) -> None:
    if not ok:
        raise RgsInputError(message)


class Interrupt:
    """SIGINT handler for the iteration loop: the first Ctrl-C asks the loop to stop after
    the current iteration (so the checkpoint is consistent); a second one interrupts at once.
    Outside the main thread (no signal handlers) Ctrl-C raises KeyboardInterrupt as usual."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        err_console.print("[yellow]interrupt: stopping after this iteration "
                          "(Ctrl-C again to stop at once)[/yellow]")

    def __enter__(self) -> "Interrupt":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@contextlib.contextmanager
def iteration_progress(description: str, total: int, done: int) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr; yields ``update(done, info)``. Erased on an error."""
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=14),
                        MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), console=err_console)
    task = progress.add_task(description, total=total, completed=done, info="")

    def update(completed: int, info: str) -> None:
        progress.update(task, completed=completed, info=info)

    progress.start()
    try:
        yield update
    except BaseException:
        progress.live.transient = True
        raise
    finally:
        progress.stop()


def fmt(x: Optional[float], digits: int = 2) -> str:
    """``x`` with ``digits`` decimals, ``n/a`` for None (summary tables)."""
    return "n/a" if x is None else f"{x:.{digits}f}"


def stage_timer(seconds: dict[str, float]) -> Callable[[str, str], contextlib.AbstractContextManager]:
    """``stage(key, label)``: a context manager showing ``label`` as a status line on stderr
    and recording the block's seconds (after :func:`rgs_engine.core.runtime.sync`) in ``seconds[key]``."""
    @contextlib.contextmanager
    def stage(key: str, label: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with err_console.status(label):
            yield
        runtime.sync()
        seconds[key] = round(time.perf_counter() - t0, 3)
    return stage


def interrupted_exit(checkpoint, iteration: Optional[int], saved: bool, resume_command: str) -> None:
    """Report a Ctrl-C (what was saved, how to resume) and exit with status 130."""
    if saved:
        message = f"interrupted: checkpoint at iteration {iteration} saved to {checkpoint}"
    elif os.path.exists(checkpoint):
        message = f"interrupted inside an iteration: the last periodic checkpoint {checkpoint} is kept"
    else:
        message = "interrupted before the first checkpoint: nothing to resume"
    err_console.print(message, highlight=False)
    if saved or os.path.exists(checkpoint):
        err_console.print("resume with: " + resume_command, highlight=False)
    raise typer.Exit(EXIT_INTERRUPTED)


def run_iterations(rec, total: int, checkpoint, every: int, label: str, info: Callable[[dict], str],
                   resume_command: str, psnr: Optional[Callable[[], float]] = None,
                   psnr_every: int = 100) -> dict:
    """Run ``rec.step()`` until ``rec.iteration == total`` under a progress bar (``info(stats)``
    after each step, then the latest ``psnr()`` in dB, evaluated every ``min(psnr_every,
    total / 10)`` steps and at the end), saving ``rec.save_checkpoint(checkpoint)`` every
    ``every`` iterations and at the end; returns the last step's stats. Ctrl-C stops after
    the current step, saves a checkpoint and exits with status 130 (:func:`interrupted_exit`)."""
    stats: dict = {"loss": math.nan}
    in_step = saved = False
    psnr_every = max(1, min(psnr_every, total // 10))
    latest: Optional[float] = None
    with Interrupt() as interrupt, iteration_progress(label, total, rec.iteration) as update:
        try:
            while rec.iteration < total:
                if interrupt.requested:
                    raise KeyboardInterrupt
                in_step = True
                stats = rec.step()
                in_step = False
                if psnr is not None and (rec.iteration % psnr_every == 0 or rec.iteration == total):
                    latest = psnr()
                update(rec.iteration, info(stats) + (f"  PSNR {latest:.2f} dB" if latest is not None else ""))
                if rec.iteration % every == 0:
                    rec.save_checkpoint(checkpoint)
        except KeyboardInterrupt:
            saved = not in_step  # a second Ctrl-C inside a step may leave it half done
            if saved:
                rec.save_checkpoint(checkpoint)
        else:
            rec.save_checkpoint(checkpoint)
            return stats
    interrupted_exit(checkpoint, rec.iteration, saved, resume_command)


def resume_settings(out, case, mode: str, known: Callable[[dict], dict], given: dict) -> dict:
    """``out/config.json`` of the ``rgs track4d --mode MODE`` run in ``out``, for --resume.

    ``known(settings)`` maps each option to the run's value (a damaged file raises KeyError
    or TypeError there); the options in ``given`` that are not None must match them, and
    ``case`` must be the run's data."""
    path = out / "config.json"
    require(path.is_file(), f"{path} not found: there is no run to resume in {out}; "
                            "start one without --resume")
    s = volume_io.load_json(path)
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


def print_summary(rows: list[tuple[str, str]], written) -> None:
    """A two-column (quantity, value) table on stdout, then ``wrote PATH`` per written file."""
    table = Table()
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for row in rows:
        table.add_row(*row)
    out_console.print(table)
    for path in written:
        out_console.print(f"wrote {path}", highlight=False)


def write_run_config(out, outputs, settings: dict, force: bool) -> None:
    """Start a new run in ``out``: with ``force``, first remove the old run's ``outputs``
    (file names: no stale checkpoint survives); then write ``settings`` to config.json."""
    if force:
        for f in outputs:
            (out / f).unlink(missing_ok=True)
    volume_io.save_json(out / "config.json", settings, force=True)


def check_new_run(out, outputs, force: bool) -> None:
    """A new run in ``out``: refuse to replace another run's config.json or any of
    ``outputs`` (file names) without ``--force``."""
    if not force and (out / "config.json").exists():
        raise RgsInputError(f"{out / 'config.json'} exists: a run is already in {out}; pass --resume "
                            "to continue it or --force to start over")
    volume_io.check_writable([out / f for f in outputs], force)


def write_metrics(path, report: dict, dev: torch.device, t_start: float, seconds: dict,
                  settings: dict) -> None:
    """Finish ``report`` with what every run reports (``device``, total ``seconds`` since
    ``t_start`` (perf_counter), ``seconds_by_stage``, the input's ``data`` record from
    ``settings``) and write it to ``path`` (metrics.json)."""
    report.update({"device": runtime.describe(dev), "seconds": round(time.perf_counter() - t_start, 3),
                   "seconds_by_stage": seconds, "data": settings["data"]})
    volume_io.save_json(path, report, force=True)


class RichProgress:
    """The command line's view of a pipeline's :class:`~rgs_engine.pipelines.common.ProgressEvent`
    stream (stderr): a spinner with the current stage, a bar under each iteration loop,
    warnings in yellow. Use as a context manager; the display is erased if the run fails."""

    def __init__(self, stages: Optional[int] = None):
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description:<34}"),
                                  BarColumn(bar_width=14), MofNCompleteColumn(),
                                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                  console=err_console)
        self._stages = self._progress.add_task("", total=stages, info="")
        self._loops: dict[str, Any] = {}
        self._started = 0

    def __enter__(self) -> "RichProgress":
        self._progress.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # leave the error line alone on stderr
            self._progress.live.transient = True
        self._progress.stop()

    def __call__(self, event) -> None:
        if event.kind == "stage":
            if self._started:
                self._progress.advance(self._stages)
            self._started += 1
            self._progress.update(self._stages, description=event.label)
        elif event.kind == "step":
            task = self._loops.get(event.label)
            if task is None:
                task = self._loops[event.label] = self._progress.add_task(
                    event.label, total=event.total, completed=0, info="")
            self._progress.update(task, completed=event.done, info=event.info)
        elif event.kind == "warning":
            self._progress.console.print(f"[yellow]warning: {event.label}[/yellow]", highlight=False)


def run_pipeline(job: Callable[..., Any], stages: Optional[int] = None, **kwargs) -> Any:
    """Run a pipeline function ``job(**kwargs, progress=..., should_stop=...)`` under a
    :class:`RichProgress` display; the first Ctrl-C asks it to stop after the current
    iteration (a second one interrupts at once). An
    :class:`~rgs_engine.pipelines.common.Interrupted` run is reported (what was saved, how
    to resume) and exits with status 130."""
    from rgs_engine.pipelines.common import Interrupted
    try:
        with Interrupt() as interrupt, RichProgress(stages) as progress:
            return job(**kwargs, progress=progress, should_stop=lambda: interrupt.requested)
    except Interrupted as stop:
        err_console.print(stop.message(), highlight=False)
        if stop.resumable:
            err_console.print("resume with: " + stop.resume_command, highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED)
