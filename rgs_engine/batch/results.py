"""A batch's results: ``DIR/results.csv`` (and ``.parquet`` when pyarrow is installed), one
row per job, and ``DIR/summary.png``.

Columns: ``task, out, status, seconds, device, error, ran`` (whether this invocation ran the
job), then the job's metrics keys flattened (nested keys joined with ``.``, lists as JSON),
in sorted order; a metric a job lacks is empty.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

from ..io import files
from .execution import Outcome

COLUMNS = ("task", "out", "status", "seconds", "device", "error", "ran")
# metrics shown per job in summary.png, the first one any finished job has
SUMMARY_METRICS = (("psnr_3d", "PSNR 3D (dB)"), ("psnr_3d_mean", "mean PSNR 3D (dB)"),
                   ("mtre_mm", "mTRE (mm)"), ("psnr_2d_test", "PSNR 2D test (dB)"))


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``metrics`` with nested mappings flattened to ``a.b`` keys and lists as JSON text."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def table(outcomes: Iterable[Outcome]) -> list[dict[str, Any]]:
    """One row per outcome: :data:`COLUMNS` then the flattened metrics (all rows share the
    same keys; missing values are None)."""
    rows = []
    for o in outcomes:
        metrics = {k: v for k, v in flatten(o.metrics).items() if k not in COLUMNS}
        rows.append({"task": o.task, "out": o.out, "status": o.status, "seconds": o.seconds,
                     "device": o.device, "error": o.error, "ran": o.ran, **metrics})
    keys = list(COLUMNS) + sorted({k for r in rows for k in r} - set(COLUMNS))
    return [{k: r.get(k) for k in keys} for r in rows]


def write_results(batch_dir: Path, outcomes: list[Outcome]) -> list[Path]:
    """Write ``results.csv`` (``results.parquet`` too when pyarrow is installed) and
    ``summary.png`` into ``batch_dir``; returns the paths written."""
    batch_dir = Path(batch_dir)
    rows = table(outcomes)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else list(COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    written = [files.write_bytes(batch_dir / "results.csv", text.getvalue().encode(), force=True)]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        pass
    else:
        with files.atomic_write(batch_dir / "results.parquet", force=True) as tmp:
            pq.write_table(pa.Table.from_pylist(rows), tmp)
        written.append(batch_dir / "results.parquet")
    written.append(summary_png(batch_dir / "summary.png", outcomes))
    return written


def _summary_metric(outcomes: list[Outcome]) -> Optional[tuple[str, str]]:
    for key, label in SUMMARY_METRICS:
        if any(_number(o.metrics.get(key)) is not None for o in outcomes if o.status == "done"):
            return key, label
    return None


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def summary_png(path: Path, outcomes: list[Outcome]) -> Path:
    """Two panels: per job, the first of :data:`SUMMARY_METRICS` that finished jobs report
    (else the seconds), failed jobs marked in red; and a histogram of the finished jobs'
    seconds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = _summary_metric(outcomes)
    key, label = metric if metric is not None else ("seconds", "seconds")
    names = [o.out for o in outcomes]
    values = [(_number(o.metrics.get(key)) if key != "seconds" else o.seconds) or 0.0 for o in outcomes]
    colours = ["tab:blue" if o.status == "done" else "tab:red" for o in outcomes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, max(3.0, 0.3 * len(names) + 1.5)))
    left.barh(range(len(names)), values, color=colours)
    left.set_yticks(range(len(names)), names, fontsize=7)
    left.invert_yaxis()
    left.set_xlabel(label)
    left.set_title(f"{label} per job (red: not done)")
    seconds = [o.seconds for o in outcomes if o.status == "done" and o.ran]
    right.hist(seconds or [0.0], bins=max(1, min(20, len(seconds))))
    right.set_xlabel("seconds per job (run now)")
    right.set_ylabel("jobs")
    right.set_title(f"{len(seconds)} jobs run now, {sum(seconds):.1f} s in all")
    fig.tight_layout()
    with files.atomic_write(path, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
