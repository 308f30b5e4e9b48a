"""Kernel benchmarks: median wall time of every engine op on the current device.

Cases (full size; ``--small`` shrinks them for CPU machines):

* splat: 100k Gaussians onto 25 views of 512 x 512 (forward; forward + backward);
* voxelize: 100k Gaussians into 256^3 (forward; forward + backward);
* project: DRR of a 256^3 volume onto 25 views of 512 x 512 (forward; adjoint = backproject);
* fdk: 256^3 from 25 views of 512 x 512;
* image loss: L1 + D-SSIM of the 25 projections against a perturbed copy (forward + backward);
* kplanes: the K-planes features (two levels of 32 channels, 32 and 64 cells) of the 100k
  Gaussians' centres at 8 times (forward + backward), as one 4D training step asks.

Inputs are synthetic but realistic: a 256 mm box on a grid of ``n^3`` voxels, Gaussians
with centres inside the box, scales 1-3 voxels, random rotations, densities 0.005-0.025
/mm; the volume is their voxelisation; a circular cone-beam scan (DSO 1000 mm, DSD 1500 mm)
whose detector covers the box. Each case runs ``--warmup`` times, then ``--repeats`` timed
runs (``torch.cuda.synchronize()`` before and after each on CUDA); the median is reported.

The float64 torch references (``rgs_engine._torch_impl``) are dense and infeasible at full
size: they run at the size :data:`REFERENCE`, and the engine is timed at that size too, so
the speed-up column compares like with like. The reference of the adjoint is the autograd
VJP of the reference projector (its forward included). On CUDA the peak memory allocated
through torch is recorded per case (Taichi's own preallocated pool is not included).

Usage::

    python validation/bench_kernels.py [--small] [--device auto|cuda|cpu] [--out FILE] [--force]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import rgs_engine
from rgs_engine.sim import ct
from rgs_engine.core import losses, metrics, runtime
from rgs_engine.io import files as volume_io
from rgs_engine._torch_impl import fdk as ref_fdk
from rgs_engine._torch_impl import image_loss as ref_image_loss
from rgs_engine._torch_impl import kplanes as ref_kplanes
from rgs_engine._torch_impl import projector as ref_projector
from rgs_engine._torch_impl import splat as ref_splat
from rgs_engine._torch_impl import voxelize as ref_voxelize
from rgs_engine.core.errors import RgsDeviceError, RgsInputError
from rgs_engine.core.geometry import VolumeGrid
from rgs_engine.motion import kplanes_features

BOX_MM = 256.0
DSO, DSD = 1000.0, 1500.0


@dataclass(frozen=True)
class Size:
    grid: int  # voxels per side of the box
    gaussians: int
    views: int
    det: int  # detector pixels per side


FULL = Size(grid=256, gaussians=100_000, views=25, det=512)
SMALL = Size(grid=64, gaussians=5_000, views=5, det=128)
REFERENCE = Size(grid=32, gaussians=500, views=4, det=48)

# Budgets (ms) per case at FULL size on one H100/H200 (issue 2); None where none is set.
# The DRR budget is 1 ms per 512^2 view.
TARGETS_MS: dict[str, float | None] = {
    "splat fwd": None, "splat fwd+bwd": 50.0, "voxelize fwd": 20.0, "voxelize fwd+bwd": 60.0,
    "project fwd": 1.0 * FULL.views, "project adjoint": None, "fdk": None,
    "image loss fwd+bwd": None, "kplanes fwd+bwd": None,
}
KPLANES_TIMES = 8  # views of a 4D training step
KPLANES_LEVELS = ((32, 32), (32, 64))  # (channels, cells per axis) of the default model's levels


class Scene:
    """Gaussians, their voxelised volume, a covering cone-beam scan and its projections."""

    def __init__(self, size: Size, device: torch.device, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        n, voxel = size.gaussians, BOX_MM / size.grid
        self.grid = VolumeGrid.centred((size.grid,) * 3, voxel)
        self.geometry = ct.covering_scan(self.grid, size.views, DSO, DSD, size.det)

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=gen)

        params = ((rand(n, 3) - 0.5) * (BOX_MM - 6 * voxel), voxel * (1 + 2 * rand(n, 3)),
                  torch.randn(n, 4, generator=gen), 0.005 + 0.02 * rand(n))
        self.gaussians = [t.to(device) for t in params]
        self.volume = rgs_engine.voxelize(*self.gaussians, self.grid)
        self.projections = rgs_engine.project(self.volume, self.grid, self.geometry)
        self.upstream_proj = torch.randn(self.projections.shape, generator=gen).to(device)
        self.upstream_vol = torch.randn(self.volume.shape, generator=gen).to(device)
        target = self.projections / self.projections.max()
        self.loss_pair = (target * (1 + 0.05 * torch.randn(target.shape, generator=gen).to(device)), target,
                          metrics.ssim_moments(target))
        self.kplanes = [(self.gaussians[0] / (BOX_MM / 2)).clamp(-1, 1)]
        for channels, cells in KPLANES_LEVELS:
            self.kplanes += [(0.1 + 0.4 * rand(3, cells, cells, channels)).to(device),
                             (0.5 + rand(3, KPLANES_TIMES, cells, channels)).to(device)]

    def as_float64(self) -> "Scene":
        """A copy of this scene with float64 tensors (the references' inputs)."""
        other = copy.copy(self)
        other.gaussians = [t.double() for t in self.gaussians]
        for name in ("volume", "projections", "upstream_proj", "upstream_vol"):
            setattr(other, name, getattr(self, name).double())
        other.loss_pair = [t.double() for t in self.loss_pair]
        other.kplanes = [t.double() for t in self.kplanes]
        return other


def _fwd_bwd(fn: Callable, leaves: list[torch.Tensor], upstream: torch.Tensor, *args) -> None:
    leaves = [t.detach().requires_grad_() for t in leaves]
    torch.autograd.grad(fn(*leaves, *args), leaves, upstream)


def _loss_fwd_bwd(s: Scene, reference: bool) -> None:
    pred, target, moments = s.loss_pair
    pred = pred.detach().requires_grad_()
    loss = ref_image_loss.image_loss(pred, target, 0.25) if reference else losses.fused_image_loss(pred, target, moments, 0.25)
    torch.autograd.grad(loss, pred)


def _kplanes_fwd_bwd(s: Scene, reference: bool) -> None:
    leaves = [t.detach().requires_grad_() for t in s.kplanes]
    levels = list(zip(leaves[1::2], leaves[2::2]))
    out = (torch.cat([ref_kplanes.level_features(leaves[0], *lv) for lv in levels], -1) if reference
           else kplanes_features.features(leaves[0], levels))
    torch.autograd.grad(out, leaves, torch.ones_like(out))


# case -> (engine op, reference op); each takes a Scene and runs once
CASES: dict[str, tuple[Callable[[Scene], object], Callable[[Scene], object]]] = {
    "splat fwd": (lambda s: rgs_engine.splat(*s.gaussians, s.geometry),
                  lambda s: ref_splat.splat(*s.gaussians, s.geometry)),
    "splat fwd+bwd": (lambda s: _fwd_bwd(rgs_engine.splat, s.gaussians, s.upstream_proj, s.geometry),
                      lambda s: _fwd_bwd(ref_splat.splat, s.gaussians, s.upstream_proj, s.geometry)),
    "voxelize fwd": (lambda s: rgs_engine.voxelize(*s.gaussians, s.grid),
                     lambda s: ref_voxelize.voxelize(*s.gaussians, s.grid)),
    "voxelize fwd+bwd": (lambda s: _fwd_bwd(rgs_engine.voxelize, s.gaussians, s.upstream_vol, s.grid),
                         lambda s: _fwd_bwd(ref_voxelize.voxelize, s.gaussians, s.upstream_vol, s.grid)),
    "project fwd": (lambda s: rgs_engine.project(s.volume, s.grid, s.geometry),
                    lambda s: ref_projector.project(s.volume, s.grid, s.geometry)),
    "project adjoint": (lambda s: rgs_engine.backproject(s.projections, s.grid, s.geometry),
                        lambda s: _fwd_bwd(ref_projector.project, [s.volume], s.projections,
                                           s.grid, s.geometry)),
    "fdk": (lambda s: rgs_engine.fdk(s.projections, s.geometry, s.grid),
            lambda s: ref_fdk.fdk(s.projections, s.geometry, s.grid)),
    "image loss fwd+bwd": (lambda s: _loss_fwd_bwd(s, False), lambda s: _loss_fwd_bwd(s, True)),
    "kplanes fwd+bwd": (lambda s: _kplanes_fwd_bwd(s, False), lambda s: _kplanes_fwd_bwd(s, True)),
}


def median_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        runtime.sync()
        t0 = time.perf_counter()
        fn()
        runtime.sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _describe(size: Size) -> str:
    return (f"{size.grid}^3 voxels, {size.gaussians} Gaussians, {size.views} views of "
            f"{size.det}x{size.det}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Median timings of the rgs kernels.")
    parser.add_argument("--small", action="store_true", help=f"CPU-sized cases: {SMALL}")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default=None,
                        help="compute device (default: $RGS_DEVICE, else auto)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default: validation/results/bench_<device>.json)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = parser.parse_args()
    dev = runtime.init(args.device)
    out = args.out or Path(__file__).resolve().parent / "results" / f"bench_{dev.type}.json"
    volume_io.check_writable([out], args.force)
    size = SMALL if args.small else FULL

    console = Console()
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("scenes", total=2 * len(CASES) + 2)
        scene = Scene(size, dev)
        small_scene = Scene(REFERENCE, dev)
        ref_scene = small_scene.as_float64()
        progress.advance(task, 2)
        for case, (engine, reference) in CASES.items():
            progress.update(task, description=f"{case} (engine)")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            engine_ms = median_ms(lambda: engine(scene), args.warmup, args.repeats)
            peak_mb = torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == "cuda" else None
            engine_small_ms = median_ms(lambda: engine(small_scene), args.warmup, args.repeats)
            progress.update(task, advance=1, description=f"{case} (float64 reference)")
            ref_ms = median_ms(lambda: reference(ref_scene), 1, max(1, args.repeats // 2))
            progress.advance(task)
            rows.append({"case": case, "engine_ms": engine_ms,
                         "engine_ms_at_reference_size": engine_small_ms,
                         "reference_ms": ref_ms, "speedup_at_reference_size": ref_ms / engine_small_ms,
                         "target_ms": TARGETS_MS[case] if size == FULL else None, "peak_torch_mb": peak_mb})

    report = {
        "device": runtime.describe(dev), "device_type": dev.type,
        "versions": runtime.versions(),
        "sizes": {"engine": asdict(size), "reference": asdict(REFERENCE), "box_mm": BOX_MM,
                  "dso_mm": DSO, "dsd_mm": DSD},
        "warmup": args.warmup, "repeats": args.repeats, "cases": rows,
    }
    volume_io.save_json(out, report, args.force)

    console.print(f"rgs kernels on {report['device']}, median of {args.repeats} after {args.warmup} "
                  f"warm-up runs\n  engine size: {_describe(size)}\n  reference size: {_describe(REFERENCE)} "
                  "(engine timed there too: 'ms @ref')")
    table = Table()
    for col in ("case", "ms", "ms @ref", "f64 ref ms", "speed-up", "target ms", "peak MB"):
        table.add_column(col, justify="left" if col == "case" else "right", no_wrap=True)
    for r in rows:
        table.add_row(r["case"], f"{r['engine_ms']:.2f}", f"{r['engine_ms_at_reference_size']:.2f}",
                      f"{r['reference_ms']:.1f}", f"{r['speedup_at_reference_size']:.0f}x",
                      "-" if r["target_ms"] is None else f"{r['target_ms']:g}",
                      "-" if r["peak_torch_mb"] is None else f"{r['peak_torch_mb']:.0f}")
    console.print(table)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    try:
        main()
    except (RgsInputError, RgsDeviceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
