"""Shared pieces of the ``rgs`` commands: the Typer app, options, error handling, progress.

Bad input ends with one line ``error: ...`` on stderr and exit status 2
(:func:`handle_errors`); :class:`Stages` shows a progress display over named stages,
:func:`iteration_progress` one over training iterations, and :class:`Interrupt` turns Ctrl-C
into a stop after the current iteration (exit status :data:`EXIT_INTERRUPTED`).
"""
from __future__ import annotations

import contextlib
import functools
import signal
import time
from enum import Enum
from typing import Annotated, Callable, Iterator, Optional

import torch
import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                           TextColumn, TimeElapsedColumn)

from rgs_engine import runtime
from rgs_engine.errors import RgsDeviceError, RgsInputError

app = typer.Typer(
    name="rgs", add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
    help="X-ray radiative Gaussian splatting: sparse-view CT (simulate, recon), CT-to-X-ray "
         "registration (simulate-xrays, register; being validated), and the engine check "
         "(roundtrip), 4D reconstruction (simulate4d, track4d).")
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
    :func:`rgs_engine.runtime.sync`, so GPU work is counted in the stage that queued it.
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
