"""Shared pieces of the ``rgs`` commands: the Typer app, options, error handling, progress.

Bad input ends with one line ``error: ...`` on stderr and exit status 2
(:func:`handle_errors`); :func:`run_pipeline` runs a pipeline of :mod:`rgs_engine.pipelines`
under a :class:`RichProgress` display, and :class:`Interrupt` turns Ctrl-C into a stop
request after the current iteration (exit status :data:`EXIT_INTERRUPTED`).
"""
from __future__ import annotations

import functools
import signal
from enum import Enum
from typing import Annotated, Any, Callable, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                           TextColumn, TimeElapsedColumn)

from rgs_engine.core import runtime
from rgs_engine.core.errors import RgsDeviceError, RgsInputError

app = typer.Typer(
    name="rgs", add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
    help="X-ray radiative Gaussian splatting: sparse-view CT (simulate, recon), CT-to-X-ray "
         "registration (simulate-xrays, register), 4D reconstruction of breathing and of DSA "
         "contrast inflow (simulate4d, simulate-dsa, track4d), the engine check (roundtrip), and "
         "any of them over a cohort on Ray (batch).")
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


def fmt(x: Optional[float], digits: int = 2) -> str:
    """``x`` with ``digits`` decimals, ``n/a`` for None (summary tables)."""
    return "n/a" if x is None else f"{x:.{digits}f}"


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
