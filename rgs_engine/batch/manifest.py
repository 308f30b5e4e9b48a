"""A batch manifest: which rgs jobs to run, checked in full before anything starts.

A manifest is a CSV file with the header ``task,input,out,args`` or a YAML list of mappings
with the same keys. ``task`` names an ``rgs`` command that has a pipeline
(:mod:`rgs_engine.pipelines`), ``input`` its data (empty for commands without one),
``out`` its output (a folder, or the file a ``simulate*`` command writes) relative to the
batch folder, ``args`` its options as on the command line (YAML: a string or a list).

``input`` that equals another row's ``out`` names that row's output (the row then runs after
it); any other relative ``input`` is taken from the manifest's folder. ``--out``,
``--resume``, ``--force`` and ``--help`` belong to ``rgs batch`` and are refused in ``args``.

Every row is parsed with the command's own click parser, so a bad option or value is
reported as ``rgs TASK`` would report it; :class:`ManifestError` holds one line per bad row.
"""
from __future__ import annotations

import csv
import inspect
import shlex
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Mapping, Optional

from ..core.errors import RgsInputError

FIELDS = ("task", "input", "out", "args")
RESERVED = ("--out", "--resume", "--force", "--help")


class ManifestError(RgsInputError):
    """Bad manifest rows; ``lines``: one ``where: problem: fix`` line per bad row."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("; ".join(lines))


@dataclass(frozen=True)
class Row:
    """One manifest entry as written. ``where``: ``FILE:LINE`` (CSV) or ``FILE: item N``
    (YAML), for messages; ``args``: the option tokens; ``problem``: set when the entry
    could not be read (reported by :func:`plan` with the other bad rows)."""
    where: str
    task: str
    input: str
    out: str
    args: tuple[str, ...]
    problem: Optional[str] = None  # a malformed row: what is wrong with it


@dataclass(frozen=True)
class Job:
    """A checked row. ``out``: the row's output relative to the batch folder (POSIX form,
    the job's name); ``out_path``: that output's absolute path; ``input_path``: the absolute
    input (None: no input); ``argv``: the command line after ``rgs TASK``; ``params``: the
    pipeline's keyword arguments that the row sets (click-parsed, enums as their values,
    paths as text; the pipeline's defaults, the command's, apply to the rest); ``options``:
    the parameter names the pipeline takes; ``after``: the
    ``out`` of the rows whose output is this row's input."""
    where: str
    task: str
    out: str
    out_path: str
    input_path: Optional[str]
    argv: tuple[str, ...]
    params: dict[str, Any]
    options: frozenset[str]
    after: tuple[str, ...]

    @property
    def function(self) -> str:
        """The pipeline function's name in :mod:`rgs_engine.pipelines`."""
        return self.task.replace("-", "_")


def read_rows(path: Path) -> list[Row]:
    """The rows of the manifest at ``path`` (``.csv``, ``.yaml`` or ``.yml``); a file that
    cannot be read as such raises :class:`ManifestError`, bad rows are reported by
    :func:`plan`."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError([f"{path}: manifest not found: check the path"])
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix in (".yaml", ".yml"):
        return _yaml_rows(path)
    raise ManifestError([f"{path}: unknown manifest type {suffix or '(none)'}: use .csv or .yaml"])


def _csv_rows(path: Path) -> list[Row]:
    rows = []
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        if tuple(header) != FIELDS:
            raise ManifestError([f"{path}:1: header {','.join(header) or '(empty)'}: the first line "
                                 f"must be {','.join(FIELDS)}"])
        for fields in reader:
            where = f"{path}:{reader.line_num}"
            if not any(f.strip() for f in fields) or fields[0].lstrip().startswith("#"):
                continue  # blank line or comment
            if len(fields) != len(FIELDS):
                rows.append(_malformed(where, f"{len(fields)} fields: a row has {len(FIELDS)} "
                                              f"({','.join(FIELDS)}); quote args that hold commas"))
                continue
            task, input_, out, args = (f.strip() for f in fields)
            try:
                rows.append(Row(where, task, input_, out, tuple(shlex.split(args))))
            except ValueError as exc:
                rows.append(_malformed(where, f"args {args!r}: {exc}: fix the quoting"))
    return rows


def _malformed(where: str, problem: str) -> Row:
    return Row(where, "", "", "", (), problem)


def _yaml_rows(path: Path) -> list[Row]:
    import yaml

    try:
        items = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ManifestError([f"{path}: not valid YAML ({' '.join(str(exc).split())}): fix the file"]
                            ) from exc
    if not isinstance(items, list):
        raise ManifestError([f"{path}: a YAML manifest is a list of rows "
                             f"(- task: ..., input: ..., out: ..., args: ...)"])
    rows = []
    for i, item in enumerate(items, 1):
        where = f"{path}: item {i}"
        if not isinstance(item, Mapping) or set(item) - set(FIELDS):
            extra = sorted(map(str, set(item) - set(FIELDS))) if isinstance(item, Mapping) else None
            rows.append(_malformed(where, (f"unknown keys {', '.join(extra)}" if extra else "not a mapping")
                                   + f": use the keys {', '.join(FIELDS)}"))
            continue
        args = item.get("args") or ""
        try:
            tokens = tuple(shlex.split(args)) if isinstance(args, str) else tuple(str(a) for a in args)
        except (ValueError, TypeError) as exc:
            rows.append(_malformed(where, f"args {args!r}: {exc}: give a string or a list of strings"))
            continue
        rows.append(Row(where, str(item.get("task") or "").strip(), str(item.get("input") or "").strip(),
                        str(item.get("out") or "").strip(), tokens))
    return rows


def _normal_out(out: str) -> Optional[str]:
    """``out`` as a clean relative POSIX path, or None if it is absolute or leaves the folder."""
    p = PurePosixPath(out.replace("\\", "/"))
    if not out or p.is_absolute() or ".." in p.parts or str(p) in ("", "."):
        return None
    return str(p)


def _plain(value: Any) -> Any:
    """A click-parsed value as the pipeline takes it: enums as their values, paths as text."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _parse(command, task: str, argv: list[str], accepts: Iterable[str]) -> dict[str, Any]:
    """The parameters that ``argv`` sets (not left at their defaults), parsed by the click
    ``command``; a usage error, or a parameter that the pipeline does not take (not in
    ``accepts``), raises :class:`RgsInputError`."""
    import typer

    try:
        ctx = command.make_context(task, list(argv))
    except typer.TyperException as exc:  # click's UsageError / BadParameter
        text = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise RgsInputError(" ".join(text.split())) from exc
    given = {k: _plain(v) for k, v in ctx.params.items()
             if ctx.get_parameter_source(k).name not in ("DEFAULT", "DEFAULT_MAP")}
    missing = sorted(set(given) - set(accepts))
    if missing:
        raise RgsInputError(f"the pipeline rgs_engine.pipelines.{task.replace('-', '_')} takes no "
                            f"parameter {missing[0]} (the command's option): leave the option out")
    return given


def plan(rows: list[Row], commands: Mapping[str, Any], batch_dir: Path, manifest_dir: Path,
         pipelines: Mapping[str, Callable]) -> list[Job]:
    """Check every row and return its job, in manifest order (``Job.after`` names the rows
    each must wait for). ``commands``: task name -> click command (``rgs`` subcommands);
    ``pipelines``: task name -> pipeline function, for the tasks that have one. Raises :class:`ManifestError` with
    one line per bad row (unknown task or option, bad value, malformed row, duplicate or
    unsafe ``out``, a dependency cycle)."""
    batch_dir, manifest_dir = Path(batch_dir).resolve(), Path(manifest_dir).resolve()
    outs: dict[str, Row] = {}
    for row in rows:
        out = _normal_out(row.out)
        if out is not None and row.problem is None:
            outs.setdefault(out, row)
    jobs: list[Job] = []
    bad: list[str] = []
    for row in rows:
        problem = _check_row(row, commands, pipelines)
        out = _normal_out(row.out)
        if problem is None and out is None:
            problem = f"out {row.out or '(empty)'}: give a path inside the batch folder (relative, no ..)"
        if problem is None and outs[out] is not row:
            problem = f"out {row.out} is also the out of {outs[out].where}: give each row its own out"
        if problem is None:
            try:
                jobs.append(_job(row, out, commands[row.task], pipelines[row.task], batch_dir,
                                 manifest_dir, outs))
            except RgsInputError as exc:
                problem = f"rgs {row.task} {shlex.join(row.args)}: {exc}"
        if problem is not None:
            bad.append(f"{row.where}: {problem}")
    if bad:
        raise ManifestError(bad)
    _check_cycles(jobs)
    return jobs


def _check_row(row: Row, commands: Mapping[str, Any], pipelines: Mapping[str, Callable]) -> Optional[str]:
    if row.problem is not None:
        return row.problem
    usable = sorted(t for t in commands if t in pipelines)
    if not row.task:
        return f"no task: give one of {', '.join(usable)}"
    if row.task not in usable:
        return f"unknown task {row.task!r}: use one of {', '.join(usable)}"
    reserved = [t for t in row.args if t.split("=", 1)[0] in RESERVED]
    if reserved:
        return f"args {reserved[0]}: rgs batch sets --out, --resume and --force itself: drop it"
    return None


def _job(row: Row, out: str, command, pipeline: Callable, batch_dir: Path, manifest_dir: Path,
         outs: Mapping[str, Row]) -> Job:
    positional = [p for p in command.params if p.param_type_name == "argument"]
    has_out = any(p.name == "out" and p.param_type_name == "option" for p in command.params)
    out_path = str(batch_dir / out)
    after: tuple[str, ...] = ()
    input_path = None
    if row.input:
        source = _normal_out(row.input)
        if source is not None and source in outs:
            if source == out:
                raise RgsInputError(f"input {row.input} is the row's own out: read another row's out")
            after, input_path = (source,), str(batch_dir / source)
        else:
            p = Path(row.input).expanduser()
            input_path = str(p if p.is_absolute() else manifest_dir / p)
    if input_path is not None and not positional:
        raise RgsInputError(f"input {row.input}: this command takes no input: leave input empty")
    argv = ([input_path] if input_path else []) + ([] if has_out else [out_path]) + list(row.args) + (
        ["--out", out_path] if has_out else [])
    accepts = frozenset(inspect.signature(pipeline).parameters)
    params = _parse(command, row.task, argv, accepts)
    return Job(row.where, row.task, out, out_path, input_path, tuple(argv), params, accepts, after)


def _check_cycles(jobs: list[Job]) -> None:
    """Raise :class:`ManifestError` when rows depend on each other in a cycle."""
    by_out = {j.out: j for j in jobs}
    finished: set[str] = set()
    pending = list(jobs)
    while pending:
        ready = [j for j in pending if all(a in finished for a in j.after)]
        if not ready:
            raise ManifestError([f"{j.where}: input {j.after[0]} depends on this row through "
                                 f"{by_out[j.after[0]].where}: break the cycle" for j in pending])
        finished.update(j.out for j in ready)
        pending = [j for j in pending if j.out not in finished]
