"""Throughput of ``rgs batch`` against the same reconstructions run one after another.

Steps (each ``rgs`` command in its own process, as a user runs them):

1. ``rgs simulate --phantom shepp-logan`` once (``--grid``, ``--views``), and one short
   ``rgs recon`` (untimed) so that Taichi's on-disk kernel cache serves both phases alike.
2. Batch: one manifest of N rows ``recon SCAN --out rI --iterations K --seed I``, run by
   ``rgs batch --gpus-per-job F`` (a local Ray cluster; F = 0.25 puts four jobs on one GPU
   at a time), Ray's start included.
3. Sequential: the same N as ``rgs recon`` processes one after another (each one starts
   Python and Taichi).
4. While each phase runs, ``nvidia-smi`` samples the GPU's utilisation and memory every
   200 ms. The JSON (``OUT/results/batch_throughput.json``) and ``OUT/batch_throughput.md``
   report both phases' wall seconds, jobs per minute, the speed-up, the mean / median GPU
   utilisation, the per-job seconds and PSNR (the same recipe and seeds, so the PSNRs must
   agree), with the GPU's name.

On the project's GPU machine (no registry): Ray travels as a repacked cp312 wheel
(ray 2.60.0 without jars/, rllib, data, serve, tune, train, llm and the dashboard's web
client, ELF files stripped, plus jsonschema, jsonschema-specifications, referencing and
rpds-py) in a 17 MB ``.raysite/ray-site.tar.xz`` beside the 26 MB Taichi archive (the working
tree then travels at ~52 MB); pydicom and trimesh go as wheels. ``ray.init`` starts there
in 5.2 s and sees ``GPU: 1.0, accelerator_type:H200``. Print progress per phase (flushed),
since a 400 s call that ran out left no output (8 jobs x 1000 iterations at 64^3).

Usage::

    python validation/batch_throughput.py [--jobs 8] [--gpus-per-job 0.25] [--grid 64]
        [--views 25] [--iterations 500] [--device cuda] [--work runs/batch] [--out-dir validation]
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparse_view import rgs_prefix  # noqa: E402  (this checkout's CLI, as the other scripts)


class GpuSampler:
    """``nvidia-smi`` utilisation (%) and memory (MiB) of GPU 0 every ``period_ms`` while
    the block runs; ``samples``: (seconds since start, util %, memory MiB)."""

    def __init__(self, period_ms: int = 200):
        self.period_ms = period_ms
        self.samples: list[tuple[float, float, float]] = []
        self._proc = None
        self._thread = None

    def __enter__(self) -> "GpuSampler":
        if shutil.which("nvidia-smi") is None:
            return self
        self._proc = subprocess.Popen(
            ["nvidia-smi", "-i", "0", "--query-gpu=utilization.gpu,memory.used",
             "--format=csv,noheader,nounits", f"-lms={self.period_ms}"],
            stdout=subprocess.PIPE, text=True)
        t0 = time.perf_counter()

        def read() -> None:
            for line in self._proc.stdout:
                util, mem = (float(x) for x in line.split(","))
                self.samples.append((time.perf_counter() - t0, util, mem))
        self._thread = threading.Thread(target=read, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._thread.join(timeout=2)

    def summary(self) -> dict:
        utils = [s[1] for s in self.samples]
        mems = [s[2] for s in self.samples]
        if not utils:
            return {"gpu_util_mean_pct": None, "gpu_util_median_pct": None, "gpu_mem_max_mib": None,
                    "samples": 0}
        return {"gpu_util_mean_pct": round(statistics.fmean(utils), 1),
                "gpu_util_median_pct": statistics.median(utils),
                "gpu_busy_fraction": round(sum(u > 0 for u in utils) / len(utils), 3),
                "gpu_mem_max_mib": max(mems), "samples": len(utils)}


def gpu_name() -> str:
    if shutil.which("nvidia-smi") is None:
        return "none (nvidia-smi not found)"
    return subprocess.run(["nvidia-smi", "-i", "0", "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True, check=True).stdout.strip()


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` (output to ``log``); returns its wall seconds; a failure stops the script."""
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {code}: see {log}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=8, help="reconstructions N")
    ap.add_argument("--gpus-per-job", type=float, default=0.25)
    ap.add_argument("--grid", type=int, default=64)
    ap.add_argument("--views", type=int, default=25)
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", type=Path, default=Path("runs/batch"))
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    a = ap.parse_args()
    rgs, _ = rgs_prefix()
    if a.work.exists():
        shutil.rmtree(a.work)
    a.work.mkdir(parents=True)
    log = a.work / "commands.log"
    scan = (a.work / "scan.h5").resolve()
    run(rgs + ["simulate", str(scan), "--phantom", "shepp-logan", "--grid", str(a.grid), "--views",
               str(a.views), "--det", str(2 * a.grid), "--device", a.device], log)
    recon_args = ["--iterations", str(a.iterations), "--device", a.device]
    # warm-up (untimed): Taichi's on-disk kernel cache serves both phases alike
    warm = run(rgs + ["recon", str(scan), "--out", str(a.work / "warmup"), "--iterations", "20",
                      "--device", a.device], log)
    print(f"simulate and warm-up done ({warm:.1f} s for the warm-up recon)", flush=True)

    manifest = a.work / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "input", "out", "args"])
        for i in range(a.jobs):
            w.writerow(["recon", str(scan), f"r{i}", " ".join(["--seed", str(i)] + recon_args)])
    with GpuSampler() as batch_gpu:
        batch_wall = run(rgs + ["batch", str(manifest), "--out", str(a.work / "batch"),
                                "--gpus-per-job", str(a.gpus_per_job)], log)
    with open(a.work / "batch" / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(r["status"] == "done" for r in rows), rows
    print(f"batch: {a.jobs} jobs in {batch_wall:.1f} s", flush=True)

    seq_seconds: list[float] = []
    with GpuSampler() as seq_gpu:
        t0 = time.perf_counter()
        for i in range(a.jobs):
            seq_seconds.append(run(rgs + ["recon", str(scan), "--out", str(a.work / "seq" / f"r{i}"),
                                          "--seed", str(i)] + recon_args, log))
            print(f"sequential: job {i + 1}/{a.jobs} in {seq_seconds[-1]:.1f} s", flush=True)
        seq_wall = time.perf_counter() - t0
    seq_psnr = [json.loads((a.work / "seq" / f"r{i}" / "metrics.json").read_text())["psnr_3d"]
                for i in range(a.jobs)]

    report = {
        "gpu": gpu_name(), "jobs": a.jobs, "grid": a.grid, "views": a.views, "iterations": a.iterations,
        "gpus_per_job": a.gpus_per_job, "device": rows[0]["device"],
        "sequential": {"wall_s": round(seq_wall, 2), "jobs_per_min": round(60 * a.jobs / seq_wall, 2),
                       "job_process_s": [round(s, 2) for s in seq_seconds], "psnr_3d": seq_psnr,
                       **seq_gpu.summary()},
        "batch": {"wall_s": round(batch_wall, 2), "jobs_per_min": round(60 * a.jobs / batch_wall, 2),
                  "job_s": [float(r["seconds"]) for r in rows],
                  "psnr_3d": [float(r["psnr_3d"]) for r in rows], **batch_gpu.summary()},
    }
    report["speedup"] = round(seq_wall / batch_wall, 2)
    report["max_psnr_difference_db"] = round(max(abs(x - y) for x, y in zip(seq_psnr, report["batch"]["psnr_3d"])), 3)
    (a.out_dir / "results").mkdir(parents=True, exist_ok=True)
    (a.out_dir / "results" / "batch_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    s, b = report["sequential"], report["batch"]
    md = [
        "# rgs batch throughput",
        "",
        f"{a.jobs} Gaussian reconstructions (`rgs recon --iterations {a.iterations}`, seeds 0..{a.jobs - 1}) "
        f"of one Shepp-Logan scan ({a.grid}^3, {a.views} views, {2 * a.grid}^2 detector) on "
        f"**{report['gpu']}**: one `rgs recon` process after another, against one `rgs batch` with "
        f"`--gpus-per-job {a.gpus_per_job:g}` (a local Ray cluster started by the command, included). "
        "GPU utilisation: `nvidia-smi` every 200 ms over each phase.",
        "",
        "| | wall s | jobs / min | GPU util mean % | GPU util median % | GPU memory max MiB | "
        "median job s | mean PSNR 3D dB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| sequential `rgs recon` | {s['wall_s']} | {s['jobs_per_min']} | {s['gpu_util_mean_pct']} | "
        f"{s['gpu_util_median_pct']} | {s['gpu_mem_max_mib']} | {statistics.median(s['job_process_s']):.2f} "
        f"(process) | {statistics.fmean(seq_psnr):.2f} |",
        f"| `rgs batch` | {b['wall_s']} | {b['jobs_per_min']} | {b['gpu_util_mean_pct']} | "
        f"{b['gpu_util_median_pct']} | {b['gpu_mem_max_mib']} | {statistics.median(b['job_s']):.2f} "
        f"(pipeline) | {statistics.fmean(b['psnr_3d']):.2f} |",
        "",
        f"Speed-up {report['speedup']}x; largest PSNR difference between the same seed's two runs "
        f"{report['max_psnr_difference_db']} dB. Device: {report['device']}. Command: "
        f"`python validation/batch_throughput.py --jobs {a.jobs} --gpus-per-job {a.gpus_per_job:g} "
        f"--grid {a.grid} --views {a.views} --iterations {a.iterations}`.",
        "",
    ]
    (a.out_dir / "batch_throughput.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
