"""``rgs batch``: run a manifest of rgs jobs (a cohort) on Ray, locally or on a cluster.

The work is :func:`rgs_engine.batch.batch`; this module parses the options, draws a progress
bar over the jobs, turns Ctrl-C into a stop request and maps the outcome to the exit status:
0 all jobs done, 1 a job failed, 2 a bad manifest or option (one ``error:`` line per bad
row, nothing run), 130 stopped by Ctrl-C (continue with ``--resume``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from .common import (EXIT_INTERRUPTED, Interrupt, app, err_console, fail, handle_errors, out_console,
                     print_summary)


class _JobsBar:
    """A rich progress bar over the jobs (done / running / failed, elapsed, ETA) on stderr,
    fed with the batch's progress events, shown from the first one (a bad manifest prints
    only its errors); warnings in yellow."""

    def __init__(self) -> None:
        self._progress = Progress(TextColumn("jobs"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                  TextColumn("ETA"), TimeRemainingColumn(), console=err_console)
        self._task = self._progress.add_task("jobs", total=None, info="")

    def __enter__(self) -> "_JobsBar":
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def __call__(self, event) -> None:
        self._progress.start()  # a no-op once started
        if event.kind == "step":
            self._progress.update(self._task, completed=event.done, total=event.total, info=event.info)
        elif event.kind == "warning":
            self._progress.console.print(f"[yellow]warning: {event.label}[/yellow]", highlight=False)


@app.command()
@handle_errors
def batch(
    manifest: Annotated[Path, typer.Argument(
        metavar="MANIFEST", help="Jobs: a CSV file with the header task,input,out,args, or a YAML "
                                 "list of the same fields.")],
    out: Annotated[Path, typer.Option("--out", help="Batch folder: each job's out, logs/, "
                                                    "results.csv, summary.png.")],
    address: Annotated[Optional[str], typer.Option(
        help="Ray cluster: auto (the running one) or ray://HOST:PORT. [default: start a local "
             "one]")] = None,
    gpus_per_job: Annotated[float, typer.Option(
        "--gpus-per-job", help="GPUs per job; a fraction lets one GPU run several jobs "
                               "(0.25: four). Ignored on a cluster without GPUs.")] = 1.0,
    cpus_per_job: Annotated[float, typer.Option("--cpus-per-job", help="CPUs per job.")] = 1.0,
    max_retries: Annotated[int, typer.Option(
        "--max-retries", help="Times a job is retried when its worker dies.")] = 2,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the batch in --out: done jobs are kept, interrupted ones "
                         "resume from their checkpoints, the others run again.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Run in a folder that holds a batch, letting jobs overwrite their "
                        "outputs.")] = False,
) -> None:
    """Run the jobs of MANIFEST on Ray: one task per row, a row whose input is another row's
    out after it, failed jobs recorded while the rest go on.

    Every row is checked first (the task's own options); a bad one stops everything with
    one line per bad row. Writes OUT/<out> per job, OUT/logs/<out>.log, OUT/results.csv
    (one row per job: status, seconds, device, error, its metrics), OUT/summary.png and
    OUT/batch.json (for --resume). Ctrl-C stops scheduling and lets running jobs save their
    checkpoints; continue with --resume. Exit status 1 if a job failed.
    """
    from rgs_engine.batch import ManifestError, batch as run

    from .main import app as rgs_app  # the full command set, imported late: main imports us

    commands = {name: cmd for name, cmd in typer.main.get_command(rgs_app).commands.items()
                if name != "batch"}
    try:
        with Interrupt() as interrupt, _JobsBar() as bar:
            result = run(manifest, out, commands, address=address, gpus_per_job=gpus_per_job,
                         cpus_per_job=cpus_per_job, max_retries=max_retries, resume=resume,
                         force=force, progress=bar, should_stop=lambda: interrupt.requested)
    except ManifestError as exc:
        for line in exc.lines[:-1]:
            typer.echo("error: " + " ".join(line.split()), err=True)
        fail(exc.lines[-1])
    table = Table()
    for column in ("out", "task", "status", "seconds", "error"):
        table.add_column(column, justify="right" if column == "seconds" else "left")
    for o in result.outcomes:
        table.add_row(o.out, o.task, o.status + ("" if o.ran else " (earlier)"), f"{o.seconds:.1f}",
                      o.error, style="red" if o.status == "failed" else None)
    counts = {s: sum(o.status == s for o in result.outcomes) for s in ("done", "failed")}
    out_console.print(table)
    print_summary([("jobs", str(len(result.outcomes))), ("done", str(counts["done"])),
                   ("failed", str(counts["failed"]))], result.files)
    if result.stopped:
        err_console.print(f"stopped: continue with: rgs batch {manifest} --out {out} --resume",
                          highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    if counts["failed"]:
        raise typer.Exit(1)
