"""Where the time of ``rgs recon --method gs`` goes: one training step split into phases,
the initialisation, the writing of the outputs, and the floor the kernels set (issue 18, item 1).

The script runs the real code (:class:`rgs_engine.recon.gaussian.GaussianReconstruction`, the
writers of ``rgs recon``) with timers wrapped around its parts; every timer synchronises the
device before it starts and after it stops (``runtime.sync``), so on a GPU each phase's time
is its own work and not what was queued before it. Nested timers report their exclusive time
(a phase's time minus the timed phases inside it); the backward pass is split with hooks on the
splatting and voxelisation nodes of the autograd graph. Phases:

* ``schedule``: learning rates of the step (Python); ``batch``: the step's random views (CPU
  generator, ``Geometry.subset``, the target rows);
* ``physical``: raw parameters -> means, scales, quaternions, densities;
* ``splat forward``: the splatting of the batch (binning, its one host sync, rendering);
  ``L1 + D-SSIM``: the image loss (one kernel call on a GPU, torch's operators on a CPU:
  :func:`rgs_engine.core.losses.image_loss`); ``TV sub-grid``: the random sub-grid and the TV
  term around ``TV voxelise forward``;
* ``backward (losses, physical)``: what the backward pass spends outside ``splat backward``
  and ``TV voxelise backward``;
* ``Adam``: ``optimizer.step``; ``grad stats, densify check``: the rest of ``finish_step``;
* ``other (Python, zero_grad)``: the synchronised step minus the phases above.

``plain step`` is the same step without the inner timers (a sync only around a run of steps):
the time a real run spends per step. ``PSNR eval / 100`` is the voxelisation of the whole grid
that ``rgs recon`` does every 100 steps, per step. The **floor** is what the kernels alone take
per step on the same Gaussians: splat forward + backward of a batch plus the TV sub-grid's
voxelisation forward + backward (medians of repeats). ``densify`` is one densify-and-prune
round. Initialisation is timed twice in one process: ``cold`` (first calls: Taichi compiles
the kernels or loads them from its offline cache; until 2026-12-05 the first
``torch.optim.Adam`` also imported ``torch._dynamo`` there, 1.8 s on the H100, which
:mod:`rgs_engine.core.adam` avoids) and ``warm``; ``warmup_steps_s`` are the first steps, each synchronised
(the first compiles the backward and TV kernels). Writing times each output of
``rgs recon`` in a temporary folder.

On a GPU, ``device_busy`` is the device's own kernel time over the same number of plain steps
under ``torch.profiler`` (torch's and Taichi's kernels), per step and as a fraction of the plain
step, with the kernel launches per step and the largest kernels: near 1 the step waits on the
GPU, well below it on the host (launches, Python, the splat's one host sync). ``None`` on a CPU.

Usage::

    python validation/profile_recon.py [--size small|full] [--grid N] [--det N] [--views 25]
        [--steps 20] [--device auto|cpu|cuda] [--data FILE.h5] [--json FILE] [--label TEXT]
        [--preset draft|fast|default]

``--size small`` (default on a CPU): the README quick start's case (the chest CT on a 64 grid,
128^2 detector, 25 views, noise 1e4 / 10); ``--size full`` (default on a GPU): issue 18's case
(256 grid, 512^2 detector, 25 views, normalised, noise 1e4 / 10). The scan is simulated once
into ``runs/profile/`` from ``.cache/ct/cxr.nii.gz`` (``python datasets/fetch_ct.py``).
Results: a table on stdout and ``validation/results/profile_recon_<device>_<size>.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "rgs_engine").is_dir() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CT = ROOT / ".cache" / "ct" / "cxr.nii.gz"
SIZES = {"small": {"grid": 64, "det": 128, "normalise": False},
         "full": {"grid": 256, "det": 512, "normalise": True}}


class Phases:
    """Synchronised wall-clock timers by name; nested timers count exclusively."""

    def __init__(self, sync):
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list] = []  # [name, start, time of timed children]
        self.enabled = True

    def start(self, name: str) -> None:
        if self.enabled:
            self.sync()
            self._stack.append([name, time.perf_counter(), 0.0])

    def stop(self, name: str) -> None:
        if not self.enabled:
            return
        self.sync()
        top, t0, inner = self._stack.pop()
        assert top == name, f"timer {name} stopped inside {top}"
        dt = time.perf_counter() - t0
        self.seconds[name] += dt - inner
        self.calls[name] += 1
        if self._stack:
            self._stack[-1][2] += dt

    @contextmanager
    def __call__(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)
        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def _time_backward(phases: Phases, out, name: str):
    """Time the backward of the autograd node that made ``out`` as ``name``."""
    if out.requires_grad and out.grad_fn is not None:
        out.grad_fn.register_prehook(lambda grads: phases.start(name))
        out.grad_fn.register_hook(lambda grads_in, grads_out: phases.stop(name))
    return out


@contextmanager
def instrumented(rec, phases: Phases):
    """Timers around the parts of ``rec.step`` (module functions and bound methods patched
    for the duration)."""
    import torch

    from rgs_engine.core import losses
    from rgs_engine.recon import gaussian

    splat, voxelize, backward = gaussian.splat, gaussian.voxelize, torch.Tensor.backward
    saved = {"image_loss": losses.image_loss, "tv_3d": losses.tv_3d}

    def timed_splat(*args, **kwargs):
        with phases("splat forward"):
            return _time_backward(phases, splat(*args, **kwargs), "splat backward")

    def timed_voxelize(*args, **kwargs):
        with phases("TV voxelise forward"):
            return _time_backward(phases, voxelize(*args, **kwargs), "TV voxelise backward")

    patches = [(gaussian, "splat", timed_splat), (gaussian, "voxelize", timed_voxelize),
               (losses, "image_loss", phases.wrap("L1 + D-SSIM", saved["image_loss"])),
               (losses, "tv_3d", phases.wrap("TV sub-grid", saved["tv_3d"])),
               (torch.Tensor, "backward", phases.wrap("backward (losses, physical)", backward))]
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    methods = {"set_learning_rates": "schedule", "batch": "batch", "tv_loss": "TV sub-grid",
               "finish_step": "grad stats, densify check"}
    try:
        for obj, name, fn in patches:
            setattr(obj, name, fn)
        for name, label in methods.items():
            setattr(rec, name, phases.wrap(label, getattr(rec, name)))
        rec.optimizer.step = phases.wrap("Adam", rec.optimizer.step)
        rec.gaussians.physical = phases.wrap("physical", rec.gaussians.physical)
        yield
    finally:
        for obj, name, fn in originals:
            setattr(obj, name, fn)
        for name in list(methods) + ["physical"]:
            vars(rec).pop(name, None)
            vars(rec.gaussians).pop(name, None)
        vars(rec.optimizer).pop("step", None)


def median_seconds(fn, sync, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def device_busy(step, steps: int, plain_ms: float) -> dict | None:
    """GPU kernel time of ``steps`` plain steps under ``torch.profiler`` (the device's own
    kernel events: torch's and Taichi's launches alike), per step and as a fraction of the
    plain step ``plain_ms`` (timed without the profiler): near 1, the step waits on the GPU's
    kernels; well below, on the host (launches, Python, host syncs). None on a CPU."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    # the device's own events only: a CPU range (e.g. an autograd Function) also carries the
    # device time of the kernels launched inside it, which would count them twice
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    kernel_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / steps
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]
    return {"kernel_ms_per_step": round(kernel_ms, 3), "busy_fraction": round(kernel_ms / plain_ms, 3),
            "launches_per_step": round(sum(e.count for e in kernels) / steps, 1),
            "top_kernels": [{"kernel": e.key[:90], "ms_per_step": round(e.self_device_time_total / 1e3 / steps, 3),
                             "launches_per_step": round(e.count / steps, 1)} for e in top]}


def print_busy(busy: dict | None) -> None:
    if busy is not None:
        print(f"GPU kernels {busy['kernel_ms_per_step']:.2f} ms a plain step ({100 * busy['busy_fraction']:.0f} % of it), "
              f"{busy['launches_per_step']:.0f} kernel launches; largest: "
              + ", ".join(f"{k['kernel'][:40]} {k['ms_per_step']:.2f} ms x{k['launches_per_step']:g}"
                          for k in busy["top_kernels"][:4]))


def make_data(args) -> Path:
    """The profiled scan: ``--data`` or the chest CT simulated once into runs/profile/."""
    if args.data:
        return Path(args.data)
    from rgs_engine import pipelines

    size = SIZES[args.size]
    grid, det = args.grid or size["grid"], args.det or size["det"]
    path = ROOT / "runs" / "profile" / f"chest_g{grid}_d{det}_v{args.views}.h5"
    if not path.exists():
        if not CT.exists():
            sys.exit(f"{CT} is missing: run python datasets/fetch_ct.py")
        path.parent.mkdir(parents=True, exist_ok=True)
        pipelines.simulate([CT, path], grid=grid, views=args.views, test_views=0, det=det,
                           noise="1e4,10", normalise=size["normalise"], seed=0, device=args.device)
    return path


def profile(args) -> dict:
    import torch

    from rgs_engine.core import metrics, runtime
    from rgs_engine.core.splatting import splat
    from rgs_engine.core.voxelization import voxelize
    from rgs_engine.io import files, images
    from rgs_engine.io.projections import load_projections
    from rgs_engine.pipelines.reconstruct import PSNR_EVERY_GS
    from rgs_engine.recon import gaussian, presets
    from rgs_engine.recon.gaussian import GaussianReconstruction, GSConfig

    dev = runtime.init(None if args.device == "auto" else args.device)
    path = make_data(args)
    data = load_projections(path).select_views(args.views)
    config = GSConfig(seed=0, **presets.overrides(args.preset))
    phases = Phases(runtime.sync)
    report: dict = {"device": runtime.describe(dev), "data": str(path), "grid": list(data.grid.shape),
                    "detector": list(data.geometry.det_shape), "views": data.num_views,
                    "label": args.label, "preset": args.preset or "default", "command": " ".join(sys.argv),
                    "load_1min_start": round(os.getloadavg()[0], 2)}

    # ---- initialisation: cold (first calls in this process) and warm --------------------
    init = {}
    timed = [(gaussian, "fdk", "FDK"), (gaussian, "sart", "SART"), (gaussian, "splat", "calibration splat"),
             (gaussian, "voxelize", "reference voxelise"),
             (gaussian.stats, "quantile", "reference quantile"),
             (gaussian, "Adam", "Adam set-up"),
             (gaussian.Geometry, "kernel_table", "geometry kernel table"),
             (gaussian, "unravel", "sample indices")]
    originals = [getattr(obj, name) for obj, name, _ in timed]
    for label in ("cold", "warm"):
        phases.reset()
        for (obj, name, phase), fn in zip(timed, originals):
            setattr(obj, name, phases.wrap(phase, fn))
        try:
            torch.manual_seed(0)
            with phases("total"):
                rec = GaussianReconstruction(data, config)
        finally:
            for (obj, name, _), fn in zip(timed, originals):
                setattr(obj, name, fn)
        parts = {k: round(v, 4) for k, v in phases.seconds.items() if k != "total"}
        parts["sampling, set-up (rest)"] = round(phases.seconds["total"], 4)
        init[label] = {"total_s": round(sum(phases.seconds.values()), 4), **parts}
    report["init"] = init
    report["gaussians"] = len(rec.gaussians)
    report["views_per_step"] = rec.config.views_per_step

    # ---- steps: plain, then with timers --------------------------------------------------
    report["warmup_steps_s"] = [round(median_seconds(rec.step, runtime.sync, 1), 4)
                                for _ in range(args.warmup)]
    report["plain_step_ms"] = round(1e3 * median_seconds(
        lambda: [rec.step() for _ in range(args.steps)], runtime.sync, 1) / args.steps, 3)
    report["device_busy"] = device_busy(rec.step, args.steps, report["plain_step_ms"])
    phases.reset()
    with instrumented(rec, phases), phases("step (synchronised phases)"):
        for _ in range(args.steps):
            rec.step()
    n = args.steps
    step = {k: 1e3 * v / n for k, v in phases.seconds.items()}
    other = step.pop("step (synchronised phases)")
    total = sum(step.values()) + other
    step["other (Python, zero_grad)"] = other
    truth = data.ground_truth.to(dev) if data.ground_truth is not None else None
    if truth is not None:
        step[f"PSNR eval / {PSNR_EVERY_GS}"] = 1e3 * median_seconds(
            lambda: metrics.psnr_3d(rec.volume(), truth), runtime.sync, 3) / PSNR_EVERY_GS
    report["step_ms"] = {k: round(v, 3) for k, v in step.items()}
    report["step_synchronised_ms"] = round(total, 3)

    # ---- the kernels' floor on the same Gaussians -----------------------------------------
    params = [t.detach().clone().requires_grad_() for t in rec.physical()]
    geo = rec.batch()[1]
    sub = rec._tv_grid()

    def splat_fb():
        splat(*params, geo).sum().backward()

    def tv_fb():
        voxelize(*params, sub).sum().backward()

    floor = {"splat forward + backward": median_seconds(splat_fb, runtime.sync, args.repeats),
             "TV voxelise forward + backward": median_seconds(tv_fb, runtime.sync, args.repeats)}
    floor = {k: round(1e3 * v, 3) for k, v in floor.items()}
    floor["floor per step"] = round(sum(floor.values()), 3)
    floor["full-grid voxelise forward"] = round(1e3 * median_seconds(
        lambda: voxelize(*rec.physical(), data.grid), runtime.sync, 3), 3)
    report["floor_ms"] = floor

    # ---- one densify-and-prune round (changes rec: last) ----------------------------------
    before = len(rec.gaussians)
    with phases("densify"):
        rec._densify_and_prune()
    report["densify"] = {"seconds": round(phases.seconds["densify"], 4), "gaussians_before": before,
                         "gaussians_after": len(rec.gaussians)}

    # ---- writing: each output of rgs recon -------------------------------------------------
    write = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        steps = {
            "volume (voxelise grid)": lambda: rec.volume(),
            "metrics (PSNR, SSIM 3D)": (lambda: (metrics.psnr_3d(volume, truth),
                                                 metrics.ssim_3d(volume, truth))) if truth is not None else None,
            "volume.nii.gz": lambda: files.save_nifti(out / "volume.nii.gz", volume, data.grid, force=True),
            "slices.png": lambda: images.slices_png(out / "slices.png", {"gs": volume}, data.grid, force=True),
            "gaussians.npz": lambda: rec.save_gaussians(out / "gaussians.npz", force=True),
            "checkpoint.pt": lambda: rec.save_checkpoint(out / "checkpoint.pt"),
        }
        volume = rec.volume()
        for name, fn in steps.items():
            if fn is not None:
                write[name] = round(median_seconds(fn, runtime.sync, 3), 4)
        report["write_bytes"] = {p.name: p.stat().st_size for p in out.iterdir()}
    write["total after the iterations"] = round(sum(write.values()), 4)
    report["write_s"] = write
    report["load_1min_end"] = round(os.getloadavg()[0], 2)
    report["versions"] = runtime.versions()
    return report


def print_step(r: dict, step: str = "one step", floor: str = "kernels alone", width: int = 40) -> None:
    """The step's phases (``step_ms``, largest first, with their share) and the floor
    (``floor_ms``) of a profile report ``r``."""
    total = r["step_synchronised_ms"]
    print(f"\n{step}: plain {r['plain_step_ms']:.2f} ms; with synchronised timers {total:.2f} ms")
    for k, v in sorted(r["step_ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:<{width}s} {v:9.3f} ms  {100 * v / total:5.1f} %")
    print(f"floor ({floor}):")
    for k, v in r["floor_ms"].items():
        print(f"  {k:<{width}s} {v:9.3f} ms")


def print_table(r: dict) -> None:
    print(f"device {r['device']}; grid {r['grid']}, detector {r['detector']}, {r['views']} views, "
          f"{r['gaussians']:,} Gaussians, {r['views_per_step']} views per step")
    print_step(r)
    print_busy(r.get("device_busy"))
    d = r["densify"]
    print(f"densify round: {d['seconds']:.3f} s ({d['gaussians_before']:,} -> {d['gaussians_after']:,})")
    print("warm-up steps (the first compiles the step's kernels): "
          + ", ".join(f"{t:.3f} s" for t in r["warmup_steps_s"]))
    for label, parts in r["init"].items():
        print(f"initialisation, {label}: " + ", ".join(f"{k} {v:.3f} s" for k, v in parts.items()))
    print("writing: " + ", ".join(f"{k} {v:.3f} s" for k, v in r["write_s"].items()))


def main(argv=None) -> None:
    from rgs_engine.io.files import save_json
    from rgs_engine.recon.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=list(SIZES), default=None,
                   help="small (CPU default) or full (GPU default)")
    p.add_argument("--grid", type=int, default=None)
    p.add_argument("--det", type=int, default=None)
    p.add_argument("--views", type=int, default=25)
    p.add_argument("--steps", type=int, default=20, help="steps timed (plain, then with timers)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10, help="repeats of each floor kernel")
    p.add_argument("--device", default="auto")
    p.add_argument("--data", default=None, help="profile this .h5 instead of the chest CT case")
    p.add_argument("--json", default=None)
    p.add_argument("--label", default="")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="profile this rgs recon preset's recipe (default: the default's)")
    args = p.parse_args(argv)
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.size = args.size or ("full" if cuda else "small")
    report = profile(args)
    report["size"] = args.size
    print_table(report)
    kind = "cuda" if report["device"].startswith("cuda") else "cpu"
    preset = f"_{args.preset}" if args.preset and args.preset != "default" else ""
    path = Path(args.json or ROOT / "validation" / "results" / f"profile_recon_{kind}_{args.size}{preset}.json")
    save_json(path, report, force=True)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
