"""``rgs batch`` as a Python function: check the manifest, apply the batch folder's rules
(a new batch, ``resume``, ``force``), run the jobs on Ray and write the results."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from .. import pipelines
from ..core.errors import RgsInputError
from ..pipelines.common import ProgressCallback, StopCheck, require
from . import execution, manifest as manifest_io, results

STATE = "batch.json"


@dataclass
class BatchResult:
    """``outcomes``: one per job in run order; ``files``: results.csv (, .parquet),
    summary.png; ``stopped``: the batch was asked to stop before all jobs ran."""
    outcomes: list[execution.Outcome]
    files: list[Path]
    stopped: bool

    @property
    def failed(self) -> list[execution.Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def check(manifest: str | Path, out: str | Path, commands: Mapping[str, Any]) -> list[manifest_io.Job]:
    """The manifest's jobs, checked against ``commands`` (task -> click command) and the
    pipelines that exist; raises :class:`~.manifest.ManifestError` (one line per bad row)."""
    functions = {t: getattr(pipelines, t.replace("-", "_")) for t in commands
                 if callable(getattr(pipelines, t.replace("-", "_"), None))}
    rows = manifest_io.read_rows(Path(manifest))
    return manifest_io.plan(rows, commands, Path(out), Path(manifest).parent, functions)


def batch(manifest: str | Path, out: str | Path, commands: Mapping[str, Any], address: Optional[str] = None,
          gpus_per_job: float = 1.0, cpus_per_job: float = 1.0, max_retries: int = 2,
          resume: bool = False, force: bool = False, progress: ProgressCallback | None = None,
          should_stop: StopCheck | None = None) -> BatchResult:
    """Run the jobs of ``manifest`` (CSV or YAML, see :mod:`.manifest`) into the folder
    ``out`` on a Ray cluster (``address``: None starts a local one) and write
    ``out``/results.csv and ``out``/summary.png; ``out``/batch.json keeps each job's outcome
    for ``resume``. Without ``resume`` or ``force`` a folder that holds a batch is refused;
    ``force`` lets the jobs overwrite their outputs. Options as ``rgs batch``."""
    execution.require_ray()
    require(gpus_per_job >= 0, f"--gpus-per-job {gpus_per_job:g}: give 0 or more (fractions share a GPU)")
    require(cpus_per_job > 0, f"--cpus-per-job {cpus_per_job:g}: give a positive number")
    require(max_retries >= 0, f"--max-retries {max_retries}: give 0 or more")
    out = Path(out)
    require(not out.exists() or out.is_dir(), f"--out {out} is a file: pass a directory")
    jobs = check(manifest, out, commands)
    state = out / STATE
    earlier: dict[str, execution.Outcome] = {}
    if resume:
        if not state.is_file():
            raise RgsInputError(f"{state} not found: there is no batch to resume in {out}; start one "
                                "without --resume")
        earlier = execution.load_state(state)
    elif state.exists() and not force:
        raise RgsInputError(f"{state} exists: a batch already ran in {out}; pass --resume to continue "
                            "it or --force to run it again")
    kept = dict(earlier)

    def save(outcome: execution.Outcome) -> None:
        kept[outcome.out] = outcome
        execution.save_state(state, Path(manifest), kept)

    connected = execution.connect(address)
    try:
        out.mkdir(parents=True, exist_ok=True)
        outcomes = execution.run_batch(jobs, out, gpus_per_job=gpus_per_job, cpus_per_job=cpus_per_job,
                                       max_retries=max_retries, resume=earlier, force=force,
                                       on_outcome=save, progress=progress, should_stop=should_stop)
    finally:
        if connected:
            import ray
            ray.shutdown()
    execution.save_state(state, Path(manifest), {**kept, **{o.out: o for o in outcomes}})
    stopped = any(o.status in ("interrupted", "not run") for o in outcomes)
    return BatchResult(outcomes, results.write_results(out, outcomes), stopped)
