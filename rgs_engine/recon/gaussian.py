"""Sparse-view CT reconstruction with radiative Gaussians (R2-Gaussian's model, rgs's recipe).

The volume is a sum of Gaussians fitted to the training projections by Adam through the
splatting kernels. One step renders a batch of views in one launch and minimises

    L = L1(P, P*) + w_ssim (1 - SSIM(P, P*)) + w_tv TV3D(mu on a random sub-grid)

with projections normalised by the data's maximum and the volume by a reference attenuation,
so the weights do not depend on units. Learning rates decay log-linearly. Densification
(Gaussians with large accumulated position gradients are cloned (small ones) or split (large
ones) on a schedule up to a cap, and near-empty ones or ones that left the box are pruned)
follows the data (``densify_rounds=-1``, :meth:`GSConfig.resolved`): 4 rounds where the
training views hold at least 200 detector pixels per initial Gaussian, none below. Measured
(3D PSNR, 4 rounds -> none, 3000 steps; ``validation/levers.md``, 2026-12-05):

* full size (256^3, 50k Gaussians, 512^2 views): 25 views (131 pixels per Gaussian) 33.84 ->
  34.17 dB (H100), 25 arbitrary poses 32.51 (H100) -> 32.63 (H200); 50 views (262) 36.28 ->
  36.05 and 75 views (393) 36.93 -> 36.57 (H200; the runs without densification start from
  FDK, 0.04 dB from SART's start at 25 views): densifying pays only where many pixels
  constrain each Gaussian;
* ``validation/small_grid.py``'s 64^3-class cases (12k-35k Gaussians, 128^2 or smaller views,
  at most 67 pixels per Gaussian) at 500 steps (2 CPU cores): full-c128 34.43 -> 35.03,
  crop-c64 30.25 -> 30.40, upper-c96 33.07 -> 33.86, head-c96 (another anatomy) 33.16 -> 34.08,
  full-c128-v50 (50 views) 35.43 -> 35.62, lower-arb128 (25 random C-arm poses) 31.17 -> 31.30.

The 4D and DSA models' static stages keep 4 rounds, as they were measured.

Learning rates are 1.5x those below (``rate_scale``, on top of the grid-size factor of
:meth:`GSConfig.resolved`), measured 2026-12-05 (3D PSNR, 1x -> 1.5x): at full size (H100, 25
views) 33.86 -> 34.11 dB at 2000 steps and, on the recipe of the day with 4 densification
rounds, 33.84 -> 34.01 at 3000; on ``validation/small_grid.py``'s six cases at 500 steps (2 CPU
cores, same time) full-c128 35.03 -> 35.64, crop-c64 30.40 -> 30.80, upper-c96 33.86 -> 34.37,
head-c96 34.08 -> 35.29, full-c128-v50 35.62 -> 36.46, lower-arb128 31.30 -> 31.91. Not yet
measured: 3000 steps of today's recipe, 50 / 75 views and arbitrary poses at full size. The 4D
and DSA static stages keep 1x, as measured.

Initialisation (``auto``: ``sart``): ``sart`` samples Gaussians where 6 OS-SART iterations
of the training views are bright (any poses); ``fdk`` the same from the FDK reconstruction
(circular orbits); ``random`` places them uniformly in the box (any poses). ``auto`` chose
``fdk`` on circular orbits until SART measured better there too: on ``validation/small_grid.py``'s
four circular 64^3-class cases at 500 iterations (same code, 2 CPU cores, 2026-12-05) 3D PSNR
FDK -> SART start: full-c128 34.31 -> 34.43, crop-c64 30.11 -> 30.25, upper-c96 32.99 -> 33.07,
head-c96 (another anatomy) 31.81 -> 33.16 dB, SSIM equal or higher; at 25 views SART's image
is far closer to the truth than FDK's streaks (29.65 against 16.67 dB at 256^3), so fewer
Gaussians start in empty space. In all cases the densities are
calibrated once so the rendered projections match the data's mean. The reference attenuation
(TV's and pruning's unit) is the 99th percentile of the bright voxels of the FDK / SART image,
or of the calibrated field for ``random``, which is nearly uniform and so gives a value about
3x lower (a 3x stronger TV; ``validation/small_grid.md``).

Named recipes (``rgs recon --preset``) are in :mod:`.presets`.

All randomness comes from one generator whose state is in the checkpoint, so a resumed run
continues where it stopped (float atomics in the kernels reorder sums, so two runs agree to
rounding, not bit for bit; with the SART start a voxel that rounding moves across the sampling
threshold shifts which voxels are drawn, so two runs of one seed differ by more than
rounding, as runs of nearby seeds do; ``--init fdk`` starts identically every time).

The defaults were chosen by measurement on an NVIDIA H200: the chest CT of
``datasets/fetch_ct.py`` at 256^3, 25 circular views of 512^2, R2-Gaussian's normalisation and
noise (SART peaks at 30.2 dB, FDK 17.0 dB there). 3D PSNR: R2-Gaussian's learning rates
32.7 dB after 2000 steps of 8 views, twice those 33.35 dB; 3000 steps 33.8 dB, and 34.25 dB
with TV weight 0.02 instead of 0.05 (both without densification); all 25 views per step gave
31.5 dB after 32 s against 32.7 dB after 26 s with 8; an initial scale of 0.5 x the sample
spacing lost 1 dB; 150k instead of 50k Gaussians gained nothing; mass-preserving split
densities lost 0.7 dB (at 128^3). Today's full recipe: 34.24 dB at 25 views in 22 s of
``seconds`` on an NVIDIA H100 (``validation/sparse_view.md``, 2026-12-07).

Small grids (:meth:`GSConfig.resolved`): below 256^3 all learning rates are scaled by up to
2x (x2 at 64^3); at 256^3 and above nothing changes. Measured on 2 loaded CPU cores at the
README's 500 iterations on ``validation/small_grid.py``'s held-out 64^3-class cases (projected
from a 3x finer grid): ``crop-c64`` 29.31 dB with the old recipe (12.3k Gaussians), 30.02 dB
with 30k Gaussians and rates x2 (SART 28.87 dB); ``full-c128`` 32.96 dB with the old recipe,
34.62 dB with 34.6k Gaussians and rates x2 (SART 32.47 dB). On the README's quick-start case
(quiet 2 cores, 500 iterations): the old recipe 32.05 dB in 201 s; rates x2 alone 33.41 dB in
219 s (13.7k Gaussians); rates x2 with one Gaussian per ~8 voxels 33.76 dB in 327 s (34.6k
Gaussians). The larger count is therefore not the default (it would take the quick start
past 5 minutes); ``--set voxels_per_gaussian=8`` asks for it.
The default's own held-out runs (500 iterations, heavily loaded CPU): ``full-c128`` 34.48 dB
(SART 32.47), ``crop-c64`` 30.11 dB (SART 28.87), ``lower-arb128`` (arbitrary poses) 29.79 dB
with the random initialisation and 31.27 dB with the SART one (SART 28.87). Table, levers and
what was not measured: ``validation/small_grid.md``.
"""
from __future__ import annotations

import math
import pickle
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from ..core import losses, metrics, runtime, stats
from ..core.adam import Adam
from .fdk import fdk
from .sart import sart
from ..core.errors import RgsInputError, diverged
from ..core.gaussians import Gaussians, inv_softplus, quat_to_rotmat
from ..core.geometry import Geometry, unravel
from ..io.projections import ProjectionData
from ..core.splatting import splat
from ..io.files import atomic_write
from ..core.voxelization import voxelize


class Recipe:
    """What the recipe dataclasses share: learning rates ``lr_*`` stored as float tuples, and
    ``to_dict`` / ``from_dict`` (config.json) that reject unknown keys (``NAME`` labels them)."""

    NAME = "recipe"

    def _rates_as_floats(self) -> None:
        for f in fields(self):
            if f.name.startswith("lr_"):
                object.__setattr__(self, f.name, tuple(float(x) for x in getattr(self, f.name)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise RgsInputError(f"unknown {cls.NAME} recipe keys {sorted(unknown)}: check config.json")
        return cls(**d)


@dataclass
class GSConfig(Recipe):
    """The Gaussian recipe. Lengths are fractions of the volume box unless stated."""

    NAME = "Gaussian"
    AUTOMATIC = ("num_init", "max_gaussians", "rate_factor", "densify_rounds")  # what resolved() fills in

    iterations: int = 3000
    init: str = "auto"                 # auto | fdk | sart | random
    seed: int = 0
    num_init: int = 0                  # initial Gaussians; 0: by grid size (resolved), 10k..50k
    voxels_per_gaussian: float = 20.0  # the automatic count (num_init=0): one per this many voxels
    pixels_per_gaussian: float = 0.0   # > 0: the automatic count rises above 50k to one per this many
                                       # measured detector pixels (at most one per voxels_per_gaussian)
    max_gaussians: int = 0             # cap; 0: 6 x num_init
    views_per_step: int = 8            # 0: all training views in every step
    init_threshold: float = 0.05       # fdk / sart init: sample voxels above this fraction of the max
    init_scale: float = 1.0            # initial scale = this x mean spacing of the samples
    scale_min: float = 0.0005          # scale bounds, fractions of the box's longest edge
    scale_max: float = 0.5
    lr_position: tuple[float, float] = (4e-4, 2e-5)   # fractions of the half box, per step
    lr_scale: tuple[float, float] = (1e-2, 5e-4)
    lr_rotation: tuple[float, float] = (2e-3, 1e-4)
    lr_density: tuple[float, float] = (2e-2, 1e-3)
    rate_factor: float = 0.0           # x every rate; 0: by grid size (resolved), 1 at >= 256^3
    rate_scale: float = 1.5            # x rate_factor, on any grid (see the module)
    ssim_weight: float = 0.25
    tv_weight: float = 0.02
    tv_size: int = 32                  # edge of the random TV sub-grid, voxels
    densify_start: float = 0.1         # densify between these fractions of the iterations,
    densify_stop: float = 0.4          # densify_rounds times, evenly spaced
    densify_rounds: int = -1           # -1: by the data (resolved): 4 or 0; 0: none (see the module)
    densify_pixels: float = 200.0      # the automatic rule: 4 rounds from this many measured
                                       # detector pixels per initial Gaussian, else none
    densify_fraction: float = 0.03     # of the Gaussians, the highest position gradients
    split_scale: float = 0.01          # larger (max scale, fraction of the box) -> split
    split_density: float = 1.0         # children's density / parent's (scales shrink by 1.6)
    prune_density: float = 1e-3        # fraction of the reference attenuation

    def __post_init__(self) -> None:
        if self.init not in ("auto", "fdk", "sart", "random"):
            raise RgsInputError(f"init must be auto, fdk, sart or random, got {self.init!r}")
        if self.iterations < 0 or self.num_init < 0 or self.max_gaussians < 0 or not self.pixels_per_gaussian >= 0:
            raise RgsInputError("need iterations, num_init, max_gaussians and pixels_per_gaussian >= 0")
        if self.num_init and self.max_gaussians and self.max_gaussians < self.num_init:
            raise RgsInputError("need num_init <= max_gaussians")
        if not self.voxels_per_gaussian > 0:
            raise RgsInputError(f"voxels_per_gaussian must be > 0, got {self.voxels_per_gaussian}")
        if not self.rate_factor >= 0:
            raise RgsInputError(f"rate_factor must be >= 0 (0: by grid size), got {self.rate_factor}")
        if not self.rate_scale > 0:
            raise RgsInputError(f"rate_scale must be > 0, got {self.rate_scale}")
        if self.densify_rounds < -1:
            raise RgsInputError(f"densify_rounds must be >= 0, or -1 (by the data), got {self.densify_rounds}")
        self._rates_as_floats()

    def start(self) -> str:
        """The initialisation ``init`` asks for: ``auto`` is ``sart`` on any orbit (the module
        gives the measurements)."""
        return "sart" if self.init == "auto" else self.init

    def motion_start(self, circular: bool) -> "GSConfig":
        """This recipe for the static stage of the 4D and DSA models: ``auto`` starts from FDK
        on circular orbits (else SART), as those models were measured; an explicit ``init``
        is kept. On the 4D toy of ``tests/test_track4d.py`` (a blob breathing 12 mm with a 5 s
        period; CPU, 2026-12-05) the deformation stage gained +5.8 / +5.9 dB over the static
        fit from the FDK start in two runs, but +2.9 to +5.2 dB from the SART start in six
        (its sampled voxels vary with SART's float atomics), below the test's +4 dB bar in
        four: motion-blurred projections make a SART image that is a poorer guide to where
        the moving structure goes."""
        if self.init != "auto":
            return self
        return GSConfig(**{**asdict(self), "init": "fdk" if circular else "sart"})

    def resolved(self, voxels: int, pixels: int) -> "GSConfig":
        """A copy with the automatic sizes filled in for a grid of ``voxels`` voxels and
        ``pixels`` measured detector pixels (training views x detector rows x columns).

        ``edge_ratio = 256 / voxels^(1/3)`` clamped to [1, 4] (1 at 256^3 and above, 4 at
        64^3 and below). Automatic count (``num_init=0``): one Gaussian per
        ``voxels_per_gaussian`` (20) voxels, 10k..50k; automatic rates (``rate_factor=0``): ``edge_ratio^(1/2)`` (1 at 256^3, 2 at
        64^3) when the count is automatic too, else 1 (a recipe that fixes its count keeps its
        rates as written). With ``pixels_per_gaussian`` > 0 the automatic count rises to
        ``min(pixels / pixels_per_gaussian, voxels / voxels_per_gaussian)`` where that is
        larger: only grids whose voxel count passes the 50k cap (about 100^3 and above) and
        data holding more pixels per Gaussian than that ratio (the 4D recipe's, where it was
        measured; ``rgs recon``'s recipe leaves it off).
        At 256^3 and above this gives exactly the recipe measured there (50k Gaussians,
        cap 300k, rates x1). Measurements: ``validation/small_grid.md``.
        Automatic densification (``densify_rounds=-1``): 4 rounds where the data hold at least
        ``densify_pixels`` (200) detector pixels per initial Gaussian, else none (the module's
        docstring gives the measurements).
        """
        ratio = round(min(max(256.0 / max(voxels, 1) ** (1 / 3), 1.0), 4.0), 6)
        n = self.num_init or int(min(max(voxels // self.voxels_per_gaussian, 10_000), 50_000))
        if not self.num_init and self.pixels_per_gaussian > 0:
            n = max(n, int(min(pixels // self.pixels_per_gaussian, voxels // self.voxels_per_gaussian)))
        rate_factor = self.rate_factor or (ratio ** 0.5 if self.num_init == 0 else 1.0)
        rounds = self.densify_rounds
        if rounds < 0:
            rounds = 4 if pixels >= self.densify_pixels * n else 0
        return GSConfig(**{**asdict(self), "num_init": n, "max_gaussians": self.max_gaussians or 6 * n,
                           "rate_factor": float(rate_factor), "densify_rounds": rounds})

    def resolved_for(self, data: ProjectionData) -> "GSConfig":
        """:meth:`resolved` for ``data``'s grid and its views' detector pixels."""
        return self.resolved(math.prod(data.grid.shape), data.projections.numel())


class GaussianReconstruction:
    """State of one reconstruction: Gaussians, optimiser, schedules and the random generator."""

    PARAMS = ("means", "scale_raw", "quat_raw", "density_raw")

    def __init__(self, data: ProjectionData, config: GSConfig, _initialise: bool = True):
        self.data, self.config = data, config.resolved_for(data)
        self.device = runtime.ensure()
        self.grid = data.grid
        self.projections = data.projections.to(self.device, torch.float32)
        self.proj_scale = float(self.projections.max())
        if not self.proj_scale > 0:
            raise RgsInputError("all projections are zero: nothing to reconstruct")
        self.target = self.projections / self.proj_scale
        self._moments: torch.Tensor | None = None  # the targets' SSIM moments, on first use
        data.geometry.kernel_table(self.device)  # cached: every step's batch takes its rows
        lo, hi = (torch.tensor(b, dtype=torch.float32, device=self.device) for b in data.grid.bounds())
        self.box_lo, self.box_hi = lo, hi
        self.half_box = float((hi - lo).max()) / 2
        self.generator = torch.Generator().manual_seed(config.seed)
        self.iteration = 0
        self.mu_ref = 1.0
        self.gaussians: Gaussians | None = None
        self.optimizer: Adam | None = None
        if _initialise:
            self._initialise()

    # ---- initialisation ---------------------------------------------------------------
    def init_mode(self) -> str:
        mode = self.config.start()
        if mode == "fdk" and not self.data.is_circular:
            raise RgsInputError("--init fdk needs a circular orbit; these views have arbitrary "
                                "poses: use --init sart (or auto)")
        return mode

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator).to(self.device)

    def _initialise(self) -> None:
        cfg, grid = self.config, self.grid
        n = cfg.num_init
        spacing = torch.tensor(grid.spacing, dtype=torch.float32, device=self.device)
        mode = self.init_mode()
        if mode in ("fdk", "sart"):
            vol = (fdk(self.projections, self.data.geometry, grid) if mode == "fdk"
                   else sart(self.projections, self.data.geometry, grid)).clamp_min(0)
            peak = float(vol.max())
            cand = torch.nonzero(vol.reshape(-1) > cfg.init_threshold * peak).squeeze(1)
            if cand.numel() == 0:
                raise RgsInputError(f"the {mode.upper()} initialisation is empty: use --init random")
            pick = cand[(self._rand(n) * cand.numel()).long().clamp_max(cand.numel() - 1)]
            idx = unravel(pick, grid.shape).float()
            origin = torch.tensor(grid.origin, dtype=torch.float32, device=self.device)
            means = origin + (idx + self._rand(n, 3) - 0.5) * spacing
            weights = vol.reshape(-1)[pick]
            region = cand.numel() * float(spacing.prod())
            self.mu_ref = float(stats.quantile(vol.reshape(-1)[cand].float(), 0.99))
        else:
            means = self.box_lo + self._rand(n, 3) * (self.box_hi - self.box_lo)
            weights = torch.ones(n, device=self.device)
            region = float((self.box_hi - self.box_lo).prod())
        size = 2 * self.half_box
        sigma = cfg.init_scale * (region / n) ** (1 / 3)
        sigma = min(max(sigma, 1.5 * cfg.scale_min * size), 0.5 * cfg.scale_max * size)
        scales = torch.full((n, 3), sigma, device=self.device)
        quats = torch.zeros(n, 4, device=self.device)
        quats[:, 0] = 1
        dens = weights / weights.mean()
        # calibrate: the rendered projections' mean must match the data's
        rendered = splat(means, scales, quats, dens, self.data.geometry)
        dens = dens * (self.projections.mean() / rendered.mean().clamp_min(1e-12))
        if self.init_mode() == "random":  # reference attenuation from the calibrated field
            self.mu_ref = float(stats.quantile(voxelize(means, scales, quats, dens, grid), 0.99))
        self.gaussians = Gaussians.from_physical(means, scales, quats, dens,
                                                 cfg.scale_min * size, cfg.scale_max * size)
        self._new_optimizer()
        self._reset_stats()

    def _new_optimizer(self) -> None:
        self.gaussians.requires_grad_()
        groups = [{"params": [getattr(self.gaussians, name)], "name": name} for name in self.PARAMS]
        self.optimizer = Adam(groups, lr=0.0, eps=1e-15)

    def _reset_stats(self) -> None:
        n = len(self.gaussians)
        self.grad_accum = torch.zeros(n, device=self.device)
        self.grad_count = torch.zeros(n, device=self.device)

    # ---- one step ----------------------------------------------------------------------
    def learning_rates(self, frac: float) -> dict[str, float]:
        """Learning rate of each parameter tensor (by name) at ``frac`` (0..1) of the schedule."""
        cfg = self.config
        k = (cfg.rate_factor or 1.0) * cfg.rate_scale
        return {"means": k * losses.log_linear(cfg.lr_position, frac) * self.half_box,
                "scale_raw": k * losses.log_linear(cfg.lr_scale, frac),
                "quat_raw": k * losses.log_linear(cfg.lr_rotation, frac),
                "density_raw": k * losses.log_linear(cfg.lr_density, frac)}

    def set_learning_rates(self, frac: float, factor: float = 1.0) -> None:
        """Set the optimiser to ``factor`` x :meth:`learning_rates` at ``frac``."""
        lrs = self.learning_rates(frac)
        for group in self.optimizer.param_groups:
            group["lr"] = factor * lrs[group["name"]]

    def view_batch(self) -> torch.Tensor:
        """Sorted indices (CPU, long) of the training views of the next step: a random
        ``views_per_step`` of them from the generator, or all of them."""
        v = self.data.geometry.num_views
        k = self.config.views_per_step
        if k <= 0 or k >= v:
            return torch.arange(v)
        return torch.randperm(v, generator=self.generator)[:k].sort().values

    def batch(self) -> tuple[torch.Tensor, Geometry, torch.Tensor, torch.Tensor | None]:
        """The next step's views: their indices (CPU, long, from :meth:`view_batch`), geometry,
        normalised targets (V, H, W) and the targets' SSIM moments (V, 2, H', W'; None without
        SSIM), for :meth:`image_loss`. The rows are gathered on the device (:func:`gather_rows`:
        no host-to-device copy, so no stream sync on a GPU) and the geometry's kernel table
        comes from the full geometry's cached one. The 4D and DSA models draw their batches
        here too, and gather their views' times the same way."""
        idx = self.view_batch()
        moments = self._target_moments() if self.config.ssim_weight > 0 else None
        if idx.numel() == self.data.geometry.num_views:
            return idx, self.data.geometry, self.target, moments
        return (idx, self.data.geometry.subset(idx), gather_rows(self.target, idx),
                None if moments is None else gather_rows(moments, idx))

    def _target_moments(self) -> torch.Tensor:
        """:func:`~rgs_engine.core.metrics.ssim_moments` of all normalised targets (V, 2, H',
        W'), computed at the first step that needs them (the targets never change)."""
        if self._moments is None:
            self._moments = metrics.ssim_moments(self.target)
        return self._moments

    def _tv_grid(self):
        size = [min(self.config.tv_size, n) for n in self.grid.shape]
        start = [int(torch.randint(0, n - s + 1, (1,), generator=self.generator)) for n, s in zip(self.grid.shape, size)]
        return self.grid.sub_grid(start, size)

    def image_loss(self, pred: torch.Tensor, target: torch.Tensor,
                   target_moments: torch.Tensor | None = None) -> torch.Tensor:
        """``L1 + ssim_weight (1 - SSIM)`` of normalised projections (V, H, W);
        ``target_moments``: the targets' SSIM moments if known (see :meth:`batch`)."""
        return losses.image_loss(pred, target, target_moments, self.config.ssim_weight)

    def tv_loss(self, params: tuple[torch.Tensor, ...]) -> torch.Tensor | float:
        """``tv_weight`` x the 3D TV of the field of ``params`` (physical means, scales,
        quats, densities) on a random sub-grid, in units of the reference attenuation."""
        if self.config.tv_weight <= 0:
            return 0.0
        field = voxelize(*params, self._tv_grid(), validate=False)  # the loop watches the loss
        return self.config.tv_weight * losses.tv_3d(field / self.mu_ref)

    def step(self) -> dict:
        """One Adam step on a batch of views; densify / prune on schedule. Returns ``{"loss":
        0-d tensor on the device, "gaussians": int}``: the loss stays on the device (no host
        sync per step on a GPU); ``float()`` it only when it is reported. The splat and TV
        skip their value checks (a host sync each): Gaussians that turn non-finite make the
        loss non-finite, which :func:`~rgs_engine.pipelines.common.run_iterations` stops on."""
        g = self.gaussians
        self.set_learning_rates(min(self.iteration / max(self.config.iterations - 1, 1), 1.0))
        _, geo, target, moments = self.batch()
        params = g.physical()
        pred = splat(*params, geo, validate=False) / self.proj_scale
        loss = self.image_loss(pred, target, moments) + self.tv_loss(params)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.finish_step()
        return {"loss": loss.detach(), "gaussians": len(self.gaussians)}

    def finish_step(self) -> None:
        """The rest of a step once its loss is backpropagated into the Gaussians: position
        gradient statistics, the Adam step, the iteration count, densify / prune on schedule
        (:meth:`step` and models built on these Gaussians share it)."""
        g = self.gaussians
        with torch.no_grad():
            self.grad_accum.add_(torch.linalg.vector_norm(g.means.grad, dim=1), alpha=self.half_box)
            self.grad_count += 1
        self.optimizer.step()
        self.iteration += 1
        if self.iteration in self._densify_steps():
            self._densify_and_prune()

    # ---- adaptive density control ------------------------------------------------------
    def _densify_steps(self) -> set[int]:
        cfg = self.config
        if cfg.densify_rounds < 1:
            return set()
        a, b = cfg.densify_start * cfg.iterations, cfg.densify_stop * cfg.iterations
        spots = np.linspace(a, b, cfg.densify_rounds) if cfg.densify_rounds > 1 else [a]
        return {int(round(x)) for x in spots if round(x) >= 1}

    def _densify_and_prune(self) -> None:
        cfg, g = self.config, self.gaussians
        with torch.no_grad():
            n = len(g)
            score = self.grad_accum / self.grad_count.clamp_min(1)
            room = cfg.max_gaussians - n
            k = min(int(cfg.densify_fraction * n), max(room, 0))
            chosen = torch.topk(score, k).indices if k > 0 else torch.zeros(0, dtype=torch.long, device=self.device)
            scales = g.scales
            big = scales[chosen].max(dim=1).values > cfg.split_scale * 2 * self.half_box
            clone, split = chosen[~big], chosen[big]
            # clones share the original's place and density (both halves keep the sum)
            dens_raw = g.density_raw.detach().clone()
            dens_raw[clone] = inv_softplus(F.softplus(dens_raw[clone]) / 2)
            new = {name: getattr(g, name).detach() for name in self.PARAMS}
            new["density_raw"] = dens_raw
            # split: two children sampled from the parent, scales / 1.6
            rot = quat_to_rotmat(g.quats[split])
            offs = torch.randn(2, split.numel(), 3, generator=self.generator).to(self.device)
            child_means = (g.means[split][None] + (rot[None] @ (scales[split][None] * offs)[..., None])[..., 0]).reshape(-1, 3)
            child_scales = (scales[split] / 1.6).repeat(2, 1)
            frac = ((child_scales - g.scale_min) / (g.scale_max - g.scale_min)).clamp(1e-6, 1 - 1e-6)
            children = {"means": child_means, "scale_raw": torch.logit(frac),
                        "quat_raw": g.quat_raw[split].detach().repeat(2, 1),
                        "density_raw": inv_softplus(cfg.split_density * F.softplus(g.density_raw[split].detach())).repeat(2)}
            extra_clone = {name: new[name][clone] for name in self.PARAMS}
            keep = torch.ones(n, dtype=torch.bool, device=self.device)
            keep[split] = False
            merged = {name: torch.cat([new[name][keep], extra_clone[name], children[name]])
                      for name in self.PARAMS}
            origin = torch.cat([torch.nonzero(keep).squeeze(1), clone,
                                torch.full((2 * split.numel(),), -1, device=self.device, dtype=torch.long)])
            # prune: negligible density or centre outside the box
            dens = F.softplus(merged["density_raw"])
            inside = ((merged["means"] >= self.box_lo) & (merged["means"] <= self.box_hi)).all(1)
            alive = (dens > cfg.prune_density * self.mu_ref) & inside
            merged = {name: t[alive] for name, t in merged.items()}
            origin = origin[alive]
        self._replace_params(merged, origin)

    def prune(self, keep: torch.Tensor) -> None:
        """Drop the Gaussians where ``keep`` (N,) bool is False; the others keep their Adam
        moments and densification statistics."""
        with torch.no_grad():
            merged = {name: getattr(self.gaussians, name).detach()[keep] for name in self.PARAMS}
            accum, count = self.grad_accum[keep], self.grad_count[keep]
        self._replace_params(merged, torch.nonzero(keep).squeeze(1))
        self.grad_accum, self.grad_count = accum, count

    def _replace_params(self, merged: dict[str, torch.Tensor], origin: torch.Tensor) -> None:
        """Swap in new parameter tensors; Adam moments follow their rows (zeros for children)."""
        old_state = {group["name"]: self.optimizer.state.get(group["params"][0], {})
                     for group in self.optimizer.param_groups}
        for name in self.PARAMS:
            setattr(self.gaussians, name, merged[name].contiguous())
        self._new_optimizer()
        has = origin >= 0
        for group in self.optimizer.param_groups:
            st = old_state[group["name"]]
            if not st:
                continue
            p = group["params"][0]
            moments = {}
            for key in ("exp_avg", "exp_avg_sq"):
                m = torch.zeros_like(p)
                m[has] = st[key][origin[has]]
                moments[key] = m
            self.optimizer.state[p] = {"step": st["step"].clone(), **moments}
        self._reset_stats()

    # ---- outputs -------------------------------------------------------------------------
    def physical(self) -> tuple[torch.Tensor, ...]:
        return tuple(t.detach() for t in self.gaussians.physical())

    @torch.no_grad()
    def volume(self) -> torch.Tensor:
        """(nx, ny, nz) attenuation (1/mm) on the data's grid."""
        return voxelize(*self.physical(), self.grid)

    @torch.no_grad()
    def render(self, geometry: Geometry) -> torch.Tensor:
        """(V, H, W) line integrals of the current Gaussians for any views."""
        return splat(*self.physical(), geometry)

    def save_gaussians(self, path, force: bool = False) -> None:
        """``.npz`` with means, scales (mm), quats (w, x, y, z), densities (1/mm) and the grid."""
        means, scales, quats, dens = (t.cpu().numpy() for t in self.physical())
        with atomic_write(path, force) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, means=means, scales=scales, quats=quats, densities=dens,
                                    grid_shape=np.asarray(self.grid.shape),
                                    grid_spacing=np.asarray(self.grid.spacing),
                                    grid_origin=np.asarray(self.grid.origin))

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs (CPU tensors): config, iteration, parameters,
        optimiser, densification statistics and the generator's state. Non-finite parameters
        raise RgsInputError (the training diverged: the steps skip per-step value checks, and
        a non-finite Gaussian falls out of every footprint, so the loss may stay finite)."""
        params = {name: getattr(self.gaussians, name).detach().cpu() for name in self.PARAMS}
        if bad := [name for name, t in params.items() if not bool(torch.isfinite(t).all())]:
            raise diverged(f"non-finite Gaussian parameters ({', '.join(bad)})", self.iteration)
        return {
            "config": self.config.to_dict(), "iteration": self.iteration, "mu_ref": self.mu_ref,
            "params": params,
            "scale_bounds": (self.gaussians.scale_min, self.gaussians.scale_max),
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "grad_accum": self.grad_accum.cpu(), "grad_count": self.grad_count.cpu(),
            "generator": self.generator.get_state(),
        }

    def save_checkpoint(self, path, force: bool = True) -> None:
        save_state(path, self.state_dict(), force)

    @classmethod
    def load_checkpoint(cls, path, data: ProjectionData) -> "GaussianReconstruction":
        state = load_state(path)
        try:
            return cls.from_state_dict(state, data)
        except (KeyError, TypeError) as exc:
            raise RgsInputError(f"{path}: not a Gaussian reconstruction checkpoint ({exc}): "
                                "start again without --resume") from exc

    @classmethod
    def from_state_dict(cls, state: dict, data: ProjectionData) -> "GaussianReconstruction":
        """The reconstruction of :meth:`state_dict` on ``data`` (tensors moved to the device)."""
        rec = cls(data, GSConfig.from_dict(state["config"]), _initialise=False)
        dev = rec.device
        rec.iteration, rec.mu_ref = int(state["iteration"]), float(state["mu_ref"])
        p = {name: t.to(dev) for name, t in state["params"].items()}
        rec.gaussians = Gaussians(p["means"], p["scale_raw"], p["quat_raw"], p["density_raw"],
                                  *state["scale_bounds"])
        rec._new_optimizer()
        rec.optimizer.load_state_dict(state["optimizer"])
        rec.grad_accum, rec.grad_count = state["grad_accum"].to(dev), state["grad_count"].to(dev)
        rec.generator.set_state(state["generator"])
        return rec


def gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[idx]`` for CPU indices ``idx`` (B,) into ``t``'s first dimension, gathered where ``t``
    lives: one stack of row views, no host-to-device copy of ``idx`` (a blocking copy waits for
    the GPU's queued work: a host sync per training step)."""
    return torch.stack([t[i] for i in idx.tolist()])


def save_state(path, state: dict, force: bool = True) -> None:
    """Write a checkpoint dictionary atomically (``torch.save``)."""
    with atomic_write(path, force) as tmp:
        torch.save(state, tmp)


def load_state(path) -> dict:
    """Read a checkpoint dictionary to the CPU; an unreadable file raises RgsInputError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise RgsInputError(f"{path}: not a readable rgs checkpoint ({exc}): "
                            "start again without --resume") from exc
    if not isinstance(state, dict):
        raise RgsInputError(f"{path}: not a readable rgs checkpoint: start again without --resume")
    return state


def to_cpu(obj):
    """Tensors in nested dicts / lists detached and moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    return obj
