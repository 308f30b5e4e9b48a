"""Running a batch's jobs on Ray: one Ray task per job, each calling the job's pipeline.

The driver (:func:`run_batch`) submits a job once the jobs it depends on have finished,
with ``num_gpus`` / ``num_cpus`` per job (fractional GPUs let one GPU take several small
jobs) and Ray's ``max_retries`` for workers that die. Each job (:func:`run_job`, in a Ray
worker) writes its progress events and its end to ``DIR/logs/<out>.log`` and returns an
:class:`Outcome`; an error inside a job fails that job only. A stop request sets a flag in
the :class:`Control` actor: running pipelines save their checkpoints and stop, queued jobs
do not start. Workers keep their process between jobs, so Taichi starts once per worker
(:func:`rgs_engine.core.runtime.init` is idempotent).
"""
from __future__ import annotations

import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..core import runtime
from ..core.errors import RgsDeviceError, RgsInputError
from ..io import files
from ..pipelines.common import Interrupted, ProgressCallback, ProgressEvent, StopCheck
from .manifest import Job

EXTRA = "batch"  # pip install "rgs[batch]"
FAULT_ENV = "RGS_BATCH_FAULT"  # fault injection (tests): a marker file path, see run_job
STOP_POLL_S = 0.2  # seconds between a job's looks at the stop flag
WAIT_S = 0.25  # seconds the driver waits for a job to end before it looks at its stop check


@dataclass
class Outcome:
    """How a job ended. ``status``: ``done``, ``failed``, ``interrupted`` (stopped on request;
    ``resumable``: its checkpoint is kept) or ``not run`` (stopped before it started);
    ``seconds``: its wall time; ``device``: where it ran; ``error``: one line (failed /
    interrupted); ``metrics``: its pipeline's metrics; ``ran``: whether this invocation ran
    it (False: done in an earlier one, kept by ``--resume``)."""
    task: str
    out: str
    status: str
    seconds: float = 0.0
    device: str = ""
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    resumable: bool = False
    ran: bool = True
    argv: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "argv": list(self.argv)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Outcome":
        return cls(**{**d, "argv": tuple(d.get("argv", ()))})


def log_path(batch_dir: Path, out: str) -> Path:
    """``DIR/logs/<out>.log``: the log of the job whose output is ``out``."""
    return Path(batch_dir) / "logs" / f"{out}.log"


def require_ray():
    """The ``ray`` module, or :class:`RgsInputError` naming the extra that installs it."""
    try:
        import ray
    except ImportError as exc:
        raise RgsInputError(f"rgs batch needs Ray, which is not installed: pip install "
                            f"'rgs[{EXTRA}]' (from a checkout: pip install '.[{EXTRA}]')") from exc
    return ray


class Control:
    """The batch's shared state on the cluster (a Ray actor): the stop flag, and how many
    times each job started in this invocation (a second start is Ray's retry after its
    worker died)."""

    def __init__(self) -> None:
        self._stop = False
        self._starts: dict[str, int] = {}
        self._running: set[str] = set()

    def stop(self) -> None:
        self._stop = True

    def stopped(self) -> bool:
        return self._stop

    def start(self, out: str) -> tuple[int, bool]:
        """Record a start of job ``out``; returns (starts so far, stop requested)."""
        self._starts[out] = self._starts.get(out, 0) + 1
        if not self._stop:
            self._running.add(out)
        return self._starts[out], self._stop

    def end(self, out: str) -> None:
        self._running.discard(out)

    def running(self) -> int:
        return len(self._running)


class _Log:
    """A job's log file and progress callback: stages, warnings and every ~5 % of a loop
    (and its end) as one line each, with the seconds since the job started."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "a", buffering=1)
        self._t0 = time.perf_counter()

    def line(self, text: str) -> None:
        self._fh.write(f"[{time.perf_counter() - self._t0:8.2f} s] {text}\n")

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "stage":
            self.line(f"stage: {event.label}")
        elif event.kind == "warning":
            self.line(f"warning: {event.label}")
        elif event.kind == "step":
            every = max(1, (event.total or 1) // 20)
            if event.done == event.total or (event.done or 0) % every == 0:
                self.line(f"{event.label} {event.done}/{event.total} {event.info}")

    def close(self) -> None:
        self._fh.close()


def _error_line(exc: BaseException) -> str:
    """An exception as one ``error`` line (the text ``rgs TASK`` would print)."""
    if isinstance(exc, (RgsInputError, RgsDeviceError)):
        text = str(exc)
    elif isinstance(exc, OSError):
        text = f"{exc.filename or 'file system'}: {exc.strerror or exc}: check the path and its permissions"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def run_job(job: Job, batch_dir: str, control, resume: bool, force: bool,
            fault_marker: Optional[str] = None) -> Outcome:
    """Run ``job`` through its pipeline (in a Ray worker); ``control``: the :class:`Control`
    actor. ``resume``: continue the job's interrupted run (commands with ``--resume``);
    ``force``: overwrite its outputs. A second start of the same job (its first worker died)
    starts over with ``force`` unless it resumes, since the dead attempt may have left a
    partial run behind. ``fault_marker`` (tests): the first job to report progress while this
    file does not exist creates it and kills its worker."""
    import ray

    from .. import pipelines

    starts, stopped = ray.get(control.start.remote(job.out))
    log = _Log(log_path(Path(batch_dir), job.out))
    outcome = Outcome(job.task, job.out, "not run", argv=job.argv)
    if stopped:
        log.line("not started: the batch was asked to stop")
        log.close()
        return outcome
    last_poll, stop_seen = 0.0, False

    def should_stop() -> bool:
        nonlocal last_poll, stop_seen
        if not stop_seen and time.monotonic() - last_poll > STOP_POLL_S:
            last_poll = time.monotonic()
            stop_seen = ray.get(control.stopped.remote())
        return stop_seen

    def progress(event: ProgressEvent) -> None:
        log(event)
        if fault_marker and not os.path.exists(fault_marker):
            Path(fault_marker).touch()
            log.line(f"fault injection ({FAULT_ENV}): this worker exits now")
            os._exit(1)

    kwargs = dict(job.params)
    if "resume" in job.options:
        kwargs["resume"] = resume
    if "force" in job.options:
        kwargs["force"] = force or (starts > 1 and not resume)
    log.line(f"rgs {job.task} {' '.join(job.argv)}" + (" --resume" if kwargs.get("resume") else "")
             + (" --force" if kwargs.get("force") else "") + (f"  (start {starts})" if starts > 1 else ""))
    t0 = time.perf_counter()
    try:
        if job.input_path is not None and not os.path.exists(job.input_path):
            raise RgsInputError(f"input {job.input_path} not found: check the row's input (or the row "
                                "that writes it)")
        result = getattr(pipelines, job.function)(**kwargs, progress=progress, should_stop=should_stop)
        outcome.status, outcome.metrics = "done", dict(result.metrics)
        outcome.device = str(result.metrics.get("device", ""))
    except Interrupted as stop:
        outcome.status, outcome.error, outcome.resumable = "interrupted", stop.message(), stop.resumable
    except KeyboardInterrupt:
        outcome.status, outcome.error = "interrupted", "interrupted outside the pipeline's iterations"
    except Exception as exc:  # noqa: BLE001 - a job's error fails that job only, recorded
        outcome.status, outcome.error = "failed", _error_line(exc)
        if not isinstance(exc, (RgsInputError, RgsDeviceError, OSError)):
            log.line(traceback.format_exc().rstrip())
    finally:
        ray.get(control.end.remote(job.out))
    outcome.seconds = round(time.perf_counter() - t0, 3)
    if not outcome.device and runtime.is_initialised():
        outcome.device = runtime.describe(runtime.ensure())
    log.line(f"{outcome.status} after {outcome.seconds:.1f} s" + (f": {outcome.error}" if outcome.error else ""))
    log.close()
    return outcome


def connect(address: Optional[str]) -> bool:
    """Join the Ray cluster at ``address`` (``auto``: the running one, ``ray://HOST:PORT``:
    a remote one) or, with None, start a local one; an already connected driver is reused.
    Returns whether this call connected (and so should disconnect)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address is None:
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise RgsInputError(f"--address {address}: no Ray cluster answers there ({exc}): start one "
                            "with 'ray start --head' or leave --address out") from exc
    return True


def run_batch(jobs: list[Job], batch_dir: Path, *, gpus_per_job: float = 1.0,
              cpus_per_job: float = 1.0, max_retries: int = 2, resume: dict[str, Outcome] | None = None,
              force: bool = False, on_outcome: Callable[[Outcome], None] | None = None,
              progress: ProgressCallback | None = None,
              should_stop: StopCheck | None = None) -> list[Outcome]:
    """Run ``jobs`` (from :func:`~.manifest.plan`; each after the jobs in its ``after``) on
    the connected Ray cluster.

    ``resume``: the outcomes of an earlier invocation by ``out``; a job done there with the
    same command line is kept (not run), an interrupted resumable one continues with the
    pipeline's ``resume=True``, others run again. ``on_outcome`` is called as each job ends
    (to save the batch state). ``progress`` receives ``step`` events over the jobs (``info``:
    done / running / failed counts) and ``warning`` events; ``should_stop()`` True stops
    the batch: queued jobs do not start, running ones save their checkpoints. Returns one
    :class:`Outcome` per job, in ``jobs`` order."""
    ray = require_ray()
    emit = progress or (lambda event: None)
    if gpus_per_job > 0 and not ray.cluster_resources().get("GPU", 0):
        emit(ProgressEvent("warning", "gpu", f"--gpus-per-job {gpus_per_job:g}: the Ray cluster has no "
                                             "GPU, the jobs run on CPUs"))
        gpus_per_job = 0
    earlier = resume or {}
    outcomes: dict[str, Outcome] = {}
    for job in jobs:
        before = earlier.get(job.out)
        if before is not None and before.status == "done" and before.argv == job.argv:
            outcomes[job.out] = Outcome(**{**before.to_dict(), "argv": job.argv, "ran": False})
    todo = [j for j in jobs if j.out not in outcomes]
    control = ray.remote(Control).options(num_cpus=0).remote()
    try:
        ray.get(control.running.remote())
    except ray.exceptions.RayError as exc:  # e.g. rgs cannot be imported where the workers run
        last = [line for line in str(exc).splitlines() if line.strip()][-1]
        raise RgsDeviceError(f"the Ray workers cannot run rgs ({last.strip()}): install rgs (and its "
                             "extra 'batch') where the workers run") from exc
    task = ray.remote(run_job).options(num_gpus=gpus_per_job, num_cpus=cpus_per_job,
                                       max_retries=max_retries, retry_exceptions=False)
    fault = os.environ.get(FAULT_ENV)
    running: dict[Any, Job] = {}
    stopping, total = False, len(todo)

    def report() -> None:
        failed = sum(o.status == "failed" for o in outcomes.values() if o.ran)
        done = sum(o.ran for o in outcomes.values())
        busy = ray.get(control.running.remote())
        emit(ProgressEvent("step", "jobs", "jobs", done, total,
                           f"{done - failed} done, {busy} running, {failed} failed"))

    def finish(job: Job, outcome: Outcome) -> None:
        outcomes[job.out] = outcome
        if on_outcome is not None:
            on_outcome(outcome)

    report()
    while todo or running:
        if not stopping and should_stop is not None and should_stop():
            stopping = True
            ray.get(control.stop.remote())
            emit(ProgressEvent("warning", "stop", "stopping: queued jobs will not start, running ones "
                                                  "save their checkpoints"))
        if stopping:
            for job in todo:
                finish(job, Outcome(job.task, job.out, "not run", argv=job.argv))
            todo = []
        for job in [j for j in todo if all(a in outcomes for a in j.after)]:
            before = earlier.get(job.out)
            again = before is not None and before.status == "interrupted" and before.resumable \
                and before.argv == job.argv and "resume" in job.options
            running[task.remote(job, str(batch_dir), control, again, force, fault)] = job
            todo.remove(job)
        ready, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_S)
        for ref in ready:
            job = running.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the worker died more than --max-retries times
                outcome = Outcome(job.task, job.out, "failed", argv=job.argv,
                                  error=f"its worker died {max_retries + 1} times: "
                                        f"{type(exc).__name__}: see the Ray logs")
                with open(log_path(batch_dir, job.out), "a") as fh:
                    fh.write(f"failed: {outcome.error}\n")
            finish(job, outcome)
        report()
    return [outcomes[j.out] for j in jobs]


def save_state(path: Path, manifest: Path, outcomes: dict[str, Outcome]) -> None:
    """Write the batch state (``DIR/batch.json``): the manifest's path and each job's outcome."""
    files.save_json(path, {"manifest": str(Path(manifest).resolve()),
                           "jobs": {out: o.to_dict() for out, o in outcomes.items()}}, force=True)


def load_state(path: Path) -> dict[str, Outcome]:
    """The job outcomes saved in ``DIR/batch.json`` by :func:`save_state`, by ``out``."""
    data = files.load_json(path)
    try:
        return {out: Outcome.from_dict(d) for out, d in data["jobs"].items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise RgsInputError(f"{path}: not an rgs batch state ({type(exc).__name__}: {exc}): start "
                            "the batch again with --force instead of --resume") from exc
