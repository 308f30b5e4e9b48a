"""Where the time of ``rgs track4d`` (breathing) goes: a static-stage step, the start of the
deformation stage, one deformation step split into phases, and the floor the kernels set
(issue 20: the default within 240 s on the GPU).

The script builds a breathing case from the chest CT as ``validation/track4d.py`` does (same
simulator, sizes and noise), runs the real :class:`rgs_engine.motion.track4d.Track4DReconstruction`
for ``--static-steps`` static steps, starts the deformation stage (its first step reads the
breathing from the projections: row shifts, period, surrogate) and times its steps. Timers
are ``validation/profile_recon.py``'s: each synchronises the device before it starts and after
it stops, nested timers count exclusively, and the splat's and the TV voxelisation's backward
are timed with hooks on their autograd nodes. Phases of a deformation step:

* ``schedule`` (learning rates), ``batch`` (the step's views and targets), ``physical``
  (canonical parameters -> means, scales, quaternions, densities);
* ``deformation forward``: the model (K-planes or anchors) moving the canonical Gaussians to
  each view's time, one call for the batch;
* ``splat forward`` / ``splat backward``: the batch, each view with its own deformed set;
* ``L1 + D-SSIM`` and ``image loss (rest)`` (the recipe's ``image_loss`` method around it); ``TV sub-grid`` around ``TV voxelise forward`` /
  ``backward``; ``motion regularisers`` (plane TV, time smoothness, the surrogate's pull);
* ``backward (deformation, losses, physical)``: the backward pass outside the splat and the
  TV voxelisation;
* ``Adam`` (the canonical Gaussians) and ``Adam (motion)`` (the deformation, period,
  surrogate); ``other (Python, zero_grad)``: the synchronised step minus the phases above.

``plain step`` is a step without the inner timers (a sync only around a run of steps), for the
static and the deformation stage: what a real run spends per step, so ``static steps x static
plain + deformation steps x deformation plain`` predicts the training time of a default run.
The **floor**: the splat forward + backward of a batch of deformed sets, the deformation forward
+ backward alone, and the TV sub-grid's voxelisation forward + backward (medians of repeats).
``--blocks N`` then runs the rest of the default deformation schedule (5000 steps in all)
in plain steps timed per N steps, and times one checkpoint save and one training-time PSNR
evaluation: whether steps slow down as training goes on, and what a real run adds.
``--model-profile`` adds ``torch.profiler``'s operators of the model's forward + backward
(device self time on a GPU, host self time on a CPU).

Usage::

    python validation/profile_track4d.py [--size gpu|cpu|quick] [--case regular|irregular]
        [--static-steps N] [--steps 20] [--repeats 5] [--device auto|cpu|cuda] [--blocks N]
        [--model-profile] [--json FILE]

``--size gpu`` (default on a GPU): ``validation/track4d.py``'s case (256^3-class grid, 300
projections of 256^2 over 60 s); ``cpu`` (default on a CPU) and ``quick``: its smaller sizes.
Results: a table on stdout and ``validation/results/profile_track4d_<device>_<size>.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_recon import (Phases, _time_backward, device_busy, instrumented, median_seconds,  # noqa: E402
                           print_busy, print_step)
from track4d import CT, NOISE, ROOT, SIZES  # noqa: E402


def profile(args) -> dict:
    import torch

    from rgs_engine.core import runtime
    from rgs_engine.core.splatting import splat
    from rgs_engine.core.voxelization import voxelize
    from rgs_engine.motion import track4d
    from rgs_engine.motion.track4d import Track4DConfig, Track4DReconstruction
    from rgs_engine.sim import breathing_scan as sim4d
    from rgs_engine.sim.scan import parse_noise

    dev = runtime.init(None if args.device == "auto" else args.device)
    size = args.size or ("gpu" if dev.type == "cuda" else "cpu")
    grid, projections, det, _, _ = SIZES[size]
    spec = sim4d.BreathingSpec(projections=projections, det=det, noise=parse_noise(NOISE),
                               irregular=args.case == "irregular", seed=0)
    t0 = time.perf_counter()
    data = sim4d.simulate_breathing_case(CT, grid, spec)
    simulate_s = time.perf_counter() - t0
    default = Track4DConfig()
    config = replace(default, recipe=replace(default.recipe, iterations=args.static_steps))
    phases = Phases(runtime.sync)
    report: dict = {"device": runtime.describe(dev), "size": size, "case": args.case,
                    "grid": list(data.grid.shape), "projections": projections, "detector": det,
                    "static_steps": args.static_steps, "default_steps": [default.recipe.iterations, default.iterations],
                    "command": " ".join(sys.argv), "simulate_s": round(simulate_s, 3),
                    "load_1min_start": round(os.getloadavg()[0], 2)}

    with phases("initialise"):
        rec = Track4DReconstruction(data.projections, data.geometry, data.grid, data.times_s, config)
    report["initialise_s"] = round(phases.seconds["initialise"], 3)
    static_n = max(1, min(args.steps, args.static_steps - 2))
    runtime.sync()
    t0 = time.perf_counter()
    while rec.iteration < args.static_steps - static_n:  # densification happens in here
        rec.step()
    runtime.sync()
    report["static_steps_before_s"] = round(time.perf_counter() - t0, 3)
    report["static_plain_step_ms"] = round(1e3 * median_seconds(
        lambda: [rec.step() for _ in range(static_n)], runtime.sync, 1) / static_n, 3)
    while rec.stage == "static":
        rec.step()
    report["gaussians"] = len(rec.static.gaussians)
    report["views_per_step"] = rec.static.config.views_per_step
    report["stage2_first_step_s"] = round(median_seconds(rec.step, runtime.sync, 1), 3)
    report["time_input"] = rec.time_input
    report["deformation"] = rec.config.deformation
    report["warmup_steps_s"] = [round(median_seconds(rec.step, runtime.sync, 1), 4) for _ in range(args.warmup)]
    report["plain_step_ms"] = round(1e3 * median_seconds(
        lambda: [rec.step() for _ in range(args.steps)], runtime.sync, 1) / args.steps, 3)
    report["device_busy"] = device_busy(rec.step, args.steps, report["plain_step_ms"])

    # ---- one deformation step in phases ----------------------------------------------------
    def timed_splat(*a, **k):
        with phases("splat forward"):
            return _time_backward(phases, splat(*a, **k), "splat backward")

    model_forward, motion_step, regularisers = rec.model.forward, rec.optimizer.step, rec.model.regularisers
    image_loss = rec.static.image_loss
    phases.reset()
    track4d.splat = timed_splat
    rec.model.forward = phases.wrap("deformation forward", model_forward)
    rec.model.regularisers = phases.wrap("motion regularisers", regularisers)
    rec.optimizer.step = phases.wrap("Adam (motion)", motion_step)
    rec.static.image_loss = phases.wrap("image loss (rest)", image_loss)
    rec._set_lrs = phases.wrap("schedule", rec._set_lrs)
    try:
        with instrumented(rec.static, phases), phases("step (synchronised phases)"):
            for _ in range(args.steps):
                rec.step()
    finally:
        track4d.splat = splat
        for obj, name in ((rec.model, "forward"), (rec.model, "regularisers"), (rec.optimizer, "step"),
                          (rec.static, "image_loss"), (rec, "_set_lrs")):
            vars(obj).pop(name, None)
    step = {k: 1e3 * v / args.steps for k, v in phases.seconds.items()}
    step["backward (deformation, losses, physical)"] = step.pop("backward (losses, physical)", 0.0)
    other = step.pop("step (synchronised phases)")
    total = sum(step.values()) + other
    step["other (Python, zero_grad)"] = other
    report["step_ms"] = {k: round(v, 3) for k, v in step.items()}
    report["step_synchronised_ms"] = round(total, 3)

    # ---- the kernels' floor on the same Gaussians and model ---------------------------------
    idx, geo, _, _ = rec.static.batch()
    times = rec.times[idx.to(rec.device)]
    params = [t.detach().clone().requires_grad_() for t in rec.static.gaussians.physical()]
    with torch.no_grad():
        moved = rec.model(*params[:3], times)
    moved = [t.detach().clone().requires_grad_() for t in (moved.means, moved.scales, moved.quats)]
    sub = rec.static._tv_grid()

    def splat_fb():
        splat(*moved, params[3], geo).sum().backward()

    def deform_fb():
        out = rec.model(*params[:3], times)
        (out.means.sum() + out.scales.sum() + out.quats.sum()).backward()

    def tv_fb():
        voxelize(*params, sub).sum().backward()

    floor = {"splat forward + backward": median_seconds(splat_fb, runtime.sync, args.repeats),
             "deformation forward + backward": median_seconds(deform_fb, runtime.sync, args.repeats),
             "TV voxelise forward + backward": median_seconds(tv_fb, runtime.sync, args.repeats)}
    floor = {k: round(1e3 * v, 3) for k, v in floor.items()}
    floor["floor per step"] = round(sum(floor.values()), 3)
    report["floor_ms"] = floor
    if args.model_profile:
        report["model_ops"] = model_ops(deform_fb, args.repeats, dev.type == "cuda")
    s, d = default.recipe.iterations, default.iterations
    report["predicted_training_s"] = round((s * report["static_plain_step_ms"] + d * report["plain_step_ms"]) / 1e3, 1)
    if args.blocks:
        report["schedule"] = rest_of_schedule(rec, args.blocks, runtime.sync)
    report["load_1min_end"] = round(os.getloadavg()[0], 2)
    report["versions"] = runtime.versions()
    return report


def model_ops(fn, repeats: int, cuda: bool, rows: int = 12) -> list[dict]:
    """``torch.profiler`` over ``repeats`` calls of ``fn`` (the deformation model's forward +
    backward): the ``rows`` operators with the most self time on the device (CUDA) or the
    host, in ms per call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
    from torch.autograd import DeviceType

    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # the operators (host events, with the device time of the kernels each launched itself),
    # not also the kernels' own device events, which would list each kernel twice
    operators = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]
    ops = sorted(operators, key=lambda e: getattr(e, key), reverse=True)[:rows]
    return [{"op": e.key, "ms_per_call": round(getattr(e, key) / 1e3 / repeats, 3), "count": e.count // repeats}
            for e in ops]


def rest_of_schedule(rec, block: int, sync) -> dict:
    """The rest of the deformation stage's schedule in plain steps, timed per ``block`` steps
    (does a step get slower as training goes on?), and what a real run adds between steps:
    one checkpoint save and one training-time PSNR evaluation (``rgs track4d`` does them every
    500 / 250 steps)."""
    import tempfile

    import torch

    from rgs_engine.core import metrics

    blocks = []
    end = rec.config.total_iterations
    while rec.iteration < end:
        n = min(block, end - rec.iteration)
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            rec.step()
        sync()
        blocks.append({"until": rec.iteration, "steps": n, "ms_per_step": round(1e3 * (time.perf_counter() - t0) / n, 3)})
    with tempfile.TemporaryDirectory() as tmp:
        save_s = median_seconds(lambda: rec.save_checkpoint(Path(tmp) / "checkpoint.pt"), sync, 3)
    t = float(rec.times[0])
    reference = rec.volume_at(t).detach()
    with torch.no_grad():
        psnr_s = median_seconds(lambda: metrics.psnr_3d(rec.volume_at(t), reference), sync, 3)
    return {"blocks": blocks, "checkpoint_save_s": round(save_s, 4), "psnr_evaluation_s": round(psnr_s, 4)}


def print_table(r: dict) -> None:
    print(f"device {r['device']}; {r['case']} case at size {r['size']}: grid {r['grid']}, {r['projections']} "
          f"projections of {r['detector']}^2; {r['gaussians']:,} Gaussians, {r['views_per_step']} views per step; "
          f"{r['deformation']}, {r['time_input']} input")
    print(f"initialise {r['initialise_s']:.2f} s; static step (plain) {r['static_plain_step_ms']:.2f} ms; "
          f"first deformation step (reads the breathing, builds the model) {r['stage2_first_step_s']:.2f} s")
    print_step(r, "one deformation step", "kernels and model alone", 44)
    print_busy(r.get("device_busy"))
    s, d = r["default_steps"]
    print(f"the default's training predicted from the plain steps: {s} x {r['static_plain_step_ms']:.2f} ms + "
          f"{d} x {r['plain_step_ms']:.2f} ms = {r['predicted_training_s']:.1f} s")
    if "model_ops" in r:
        print("the deformation model's forward + backward by operator (self time, ms a call):")
        for o in r["model_ops"]:
            print(f"  {o['op'][:60]:60s} {o['ms_per_call']:8.3f} ms  x{o['count']}")
    if "schedule" in r:
        sch = r["schedule"]
        print("the rest of the deformation schedule, ms per plain step: " + ", ".join(
            f"to {b['until']}: {b['ms_per_step']:.2f}" for b in sch["blocks"]))
        print(f"a checkpoint save {sch['checkpoint_save_s']:.3f} s, a training-time PSNR evaluation "
              f"{sch['psnr_evaluation_s']:.3f} s")


def main(argv=None) -> int:
    from rgs_engine.io.files import save_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=tuple(SIZES), default=None, help="default: gpu on a GPU, else cpu")
    ap.add_argument("--case", choices=("regular", "irregular"), default="regular")
    ap.add_argument("--static-steps", type=int, default=200,
                    help="static steps before the deformation stage (the default recipe runs 1000)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--blocks", type=int, default=0,
                    help="then run the rest of the default deformation schedule, timed per this many steps (0: not)")
    ap.add_argument("--model-profile", action="store_true",
                    help="torch.profiler table of the deformation model's forward + backward by operator")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not CT.is_file():
        print(f"{CT} is missing: run python datasets/fetch_ct.py", file=sys.stderr)
        return 2
    if args.static_steps < 3 or args.steps < 1 or args.blocks < 0:
        ap.error("--static-steps must be at least 3, --steps at least 1 and --blocks at least 0")
    report = profile(args)
    print_table(report)
    path = args.json or ROOT / "validation" / "results" / (
        f"profile_track4d_{'cuda' if 'cuda' in report['device'] else 'cpu'}_{report['size']}.json")
    save_json(path, report, force=True)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
