"""``rgs batch`` on a local Ray cluster of 2 CPU workers: results and errors, --resume,
a worker killed mid-job, a stop request, and manifests refused before anything runs."""
import csv
import json
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("yaml")

import typer  # noqa: E402
from cli_helpers import app, invoke  # noqa: E402

from rgs_engine.batch import execution, runner  # noqa: E402

SIM = "--phantom shepp-logan --grid 16 --views 8 --test-views 2 --det 24 --device cpu"
GOOD_ROWS = [("simulate", "", "scan.h5", SIM),
             ("recon", "scan.h5", "fdk", "--method fdk --device cpu"),
             ("recon", "scan.h5", "sart", "--method sart --iterations 2 --device cpu")]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local cluster of 2 CPUs for the module (rgs batch reuses a connected driver)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    if started:
        ray.shutdown()


def write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["task", "input", "out", "args"])
        writer.writerows(rows)
    return path


def results(folder: Path) -> dict[str, dict]:
    with open(folder / "results.csv", newline="") as fh:
        return {row["out"]: row for row in csv.DictReader(fh)}


def test_batch_runs_records_a_failure_and_resumes_nothing_finished(tmp_path):
    manifest = write_csv(tmp_path / "cohort.csv",
                         GOOD_ROWS + [("recon", "missing.h5", "lost", "--method fdk --device cpu")])
    out = tmp_path / "batch"
    r = invoke("batch", manifest, "--out", out, "--gpus-per-job", "0")
    assert r.exit_code == 1, r.output
    table = results(out)
    assert {k: v["status"] for k, v in table.items()} == {
        "scan.h5": "done", "fdk": "done", "sart": "done", "lost": "failed"}
    assert "missing.h5 not found" in table["lost"]["error"]
    assert "missing.h5 not found" in (out / "logs" / "lost.log").read_text()
    assert float(table["fdk"]["psnr_3d"]) > 15 and table["sart"]["iterations"] == "2"
    assert table["fdk"]["device"].startswith("cpu") and float(table["sart"]["seconds"]) > 0
    assert "stage: load scan.h5" in (out / "logs" / "fdk.log").read_text()
    assert (out / "summary.png").stat().st_size > 1000
    assert (out / "fdk" / "volume.nii.gz").is_file() and (out / "scan.h5").is_file()

    again = invoke("batch", manifest, "--out", out, "--gpus-per-job", "0")
    assert again.exit_code == 2 and "pass --resume" in again.stderr

    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent.name != "logs"
               and p.suffix not in (".csv", ".png", ".json", ".parquet")}
    resumed = invoke("batch", manifest, "--out", out, "--gpus-per-job", "0", "--resume")
    assert resumed.exit_code == 1, resumed.output
    table = results(out)
    assert [table[k]["ran"] for k in ("scan.h5", "fdk", "sart", "lost")] == ["False", "False", "False", "True"]
    assert table["lost"]["status"] == "failed" and table["fdk"]["psnr_3d"]
    assert {p: p.stat().st_mtime_ns for p in written} == written  # nothing finished ran again
    assert (out / "logs" / "fdk.log").read_text().count("rgs recon") == 1


def test_a_killed_worker_is_retried_and_the_job_completes(tmp_path, monkeypatch):
    marker = tmp_path / "killed-once"
    monkeypatch.setenv(execution.FAULT_ENV, str(marker))
    manifest = write_csv(tmp_path / "one.csv", GOOD_ROWS[:1])
    r = invoke("batch", manifest, "--out", tmp_path / "b", "--gpus-per-job", "0", "--max-retries", "1")
    assert r.exit_code == 0, r.output
    assert marker.exists()  # the first start died in its first progress event
    log = (tmp_path / "b" / "logs" / "scan.h5.log").read_text()
    assert "this worker exits now" in log and "(start 2)" in log and "done after" in log
    assert results(tmp_path / "b")["scan.h5"]["status"] == "done"


def test_a_stopped_batch_saves_checkpoints_and_resume_continues(tmp_path):
    scan = tmp_path / "scan.h5"
    write_csv(tmp_path / "s.csv", GOOD_ROWS[:1])
    assert invoke("batch", tmp_path / "s.csv", "--out", tmp_path, "--gpus-per-job", "0").exit_code == 0
    assert scan.is_file()
    rows = [("recon", str(scan), "long", "--method sart --iterations 200 --checkpoint-every 1 --device cpu"),
            ("recon", str(scan), "queued", "--method fdk --device cpu")]
    manifest = write_csv(tmp_path / "m.csv", rows)
    out = tmp_path / "batch"
    clicks = {n: c for n, c in typer.main.get_command(app).commands.items() if n != "batch"}
    log = out / "logs" / "long.log"

    def stop_after_ten_iterations() -> bool:
        return log.is_file() and "sart 10/200" in log.read_text()

    result = runner.batch(manifest, out, clicks, gpus_per_job=0, cpus_per_job=2,
                          should_stop=stop_after_ten_iterations)
    by_out = {o.out: o for o in result.outcomes}
    assert result.stopped and by_out["long"].status == "interrupted" and by_out["long"].resumable
    assert by_out["queued"].status == "not run"  # cpus-per-job 2: it waited, then was not started
    assert (out / "long" / "checkpoint.pt").is_file()
    t0 = time.perf_counter()
    result = runner.batch(manifest, out, clicks, gpus_per_job=0, cpus_per_job=2, resume=True)
    assert [o.status for o in result.outcomes] == ["done", "done"], result.outcomes
    text = log.read_text()
    assert "--resume" in text and json.loads((out / "long" / "metrics.json").read_text())["resumed_from"] >= 1
    assert time.perf_counter() - t0 < 120


def test_a_bad_manifest_exits_2_before_any_job_starts(tmp_path):
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(
        "- {task: simulate, out: a.h5, args: --phantom shepp-logan --grid many}\n"
        "- {task: recon, input: a.h5, out: r, args: --method nope}\n"
        "- {task: reconstruct, input: a.h5, out: s}\n"
        "- {task: recon, input: a.h5, out: r, args: [--views, '4']}\n"
        "- {task: recon, input: a.h5, out: t, args: --out elsewhere}\n"
        "- {task: recon, input: a.h5, out: ../u}\n"
        "- {task: recon, inptu: a.h5, out: v}\n"
        "- {task: recon, input: a.h5, out: w, args: --views 4}\n")
    out = tmp_path / "never"
    r = invoke("batch", manifest, "--out", out, "--gpus-per-job", "0")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 7 and all(line.startswith("error: ") for line in lines), r.stderr
    for item, text in [(1, "--grid"), (2, "'nope' is not one of"), (3, "unknown task 'reconstruct'"),
                       (4, "also the out of"), (5, "rgs batch sets --out"), (6, "inside the batch folder"),
                       (7, "unknown keys inptu")]:
        assert f"item {item}: " in lines[item - 1] and text in lines[item - 1], lines[item - 1]
    assert not out.exists()  # nothing ran, nothing was written
    header = tmp_path / "bad.csv"
    header.write_text("task,input,output,args\n")
    assert invoke("batch", header, "--out", out).exit_code == 2 and not out.exists()


def test_without_ray_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # import ray raises ImportError
    manifest = write_csv(tmp_path / "m.csv", GOOD_ROWS[:1])
    r = invoke("batch", manifest, "--out", tmp_path / "b")
    assert r.exit_code == 2 and "pip install 'rgs[batch]'" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()
