"""4D DSA reconstruction: radiative Gaussians of fixed geometry whose attenuation changes with time.

4DRGS's scenario: a rotational DSA run (contrast line integrals, one frame per view, each
taken at its own time) while contrast flows into vessels that do not move. The model:

* N Gaussians with time-invariant centres ``p_i`` (mm), scales (mm), rotations and a base
  density ``b_i`` (1/mm): the Gaussians of a
  :class:`~rgs_engine.recon.gaussian.GaussianReconstruction` of the training views (its
  parameterisation, FDK initialisation from the time-averaged views, Adam, learning-rate
  schedule, loss pieces, view batches and random generator);
* a contrast field ``w(x, t) > 0`` (:class:`ContrastField`), evaluated at each centre: the
  attenuation of Gaussian ``i`` at time ``t`` is ``rho_i(t) = b_i w(p_i, t)``. The field is a
  rank-``R`` factorisation over space and time, ``w = softplus(c + sum_r S_r(x) T_r(t))``,
  ``S`` a trilinear grid of ``space_cells^3`` cells over the volume box, ``T`` a linear grid of
  ``time_cells`` over the training views' time span (held constant outside it), ``c`` such
  that ``w = 1`` where the sum is 0. ``T`` starts at 0, so the model starts as the static fit.

Each step renders ``recipe.views_per_step`` training views, each splatted with its own
density vector ``rho(t_view)`` (one splat call for the batch), and minimises recon.gaussian's loss
(``L1 + w_ssim (1 - SSIM)`` on normalised projections + ``w_tv`` TV3D of the base field) plus
``time_smoothness_weight`` x the field's temporal roughness (the squared second differences
of ``T`` over its time cells, summed, averaged over the rank) with Adam on the Gaussians
(recon.gaussian's schedule) and on the field (``lr_field``, log-linear).
Every ``prune_every`` steps, Gaussians whose peak attenuation over the run (``max_t
rho_i(t)`` on ``prune_times`` times spread over the training span) is below
``prune_fraction`` times the reference attenuation (recon.gaussian's ``mu_ref``, the 99th
percentile of the FDK initialisation) are dropped. The Gaussians' recipe is recon.gaussian's
(``rgs recon``'s), chosen on the GPU case below.

Volumes: :meth:`DsaReconstruction.volume_at` (attenuation at a time), :meth:`mean_volume`
(over a set of times; voxelisation is linear in the densities, so one voxelisation).
:func:`vessel_surface`
is the surface rule every method shares: the isosurface of a volume at half its robust
maximum (the smallest value of the top 0.01 % of the voxels), a rule that needs no ground truth.

All randomness comes from the Gaussians' generator and the seed (the field's initial grid);
checkpoints hold all of it, so a resumed run continues the uninterrupted one (to the rounding
of float atomics in the kernels).

Measured on a CPU toy (``vessels.make_phantom(seed, box_mm=96, generations=3,
root_radius=2.5)``, 13 branches of radius 1.0-2.5 mm on a 48^3 grid of 2 mm, 133-frame run of
64^2 pixels, noise 1e5 photons + sigma 10, 30 training views, 4000 Gaussians, 300 steps of 4
views; phantom seeds 0 / 1 / 2; "frame PSNR" is the 3D PSNR at the ground-truth frames with
contrast, "CD" the mean-convention Chamfer distance of :func:`vessel_surface` of the peak
volume to the lumen surface):

* field: this factorisation (rank 8, 16^3 x 32 cells, lr 3e-2 -> 3e-3) against an MLP on
  Fourier features of (x, t) (4 + 4 octaves, width 64, two layers, lr 1e-2; 3e-3 gave 37.6 dB
  on seed 0):
  frame PSNR 37.9 / 38.1 / 38.2 dB vs 37.8 / 38.1 / 38.4 dB, held-out 2D PSNR 40.4 / 39.7 /
  38.2 vs 40.3 / 39.6 / 38.2 dB, CD 0.62 / 0.46 / 0.71 mm vs 1.52 / 0.54 / 0.67 mm (the MLP
  made spurious transient blobs: HD95 15 mm on seed 0), 0.024 vs 0.035 s per step; the
  static fit of the same views: frame PSNR 33.0 / 32.9 / 32.7 dB, held-out 37.9 / 36.8 /
  35.5 dB, CD 1.61 / 1.45 / 1.06 mm, 0.018 s per step. Field lr 1e-2 instead of 3e-2 lost
  1.5 dB of frame PSNR; rank 16, 32^3 space cells or 16 time cells changed it by < 0.4 dB.
* densification (recon.gaussian's, 4 rounds) hurt: without it frame PSNR 39.0 / 39.4 dB and CD 0.54
  / 0.38 mm (seeds 0 / 1) against 37.9 / 38.1 dB and 0.62 / 0.46 mm with it; 32^3 space
  cells then gave 39.0 / 39.3 dB, 0.50 / 0.39 mm (kept: finer cells for larger boxes); an
  FDK sampling threshold of 0.15 instead of 0.05 lost 4 dB; 600 steps gained 0.2 dB over
  300.
* recon.gaussian's default sizes (10k Gaussians from the FDK, 8 views per step) without
  densification, initial scale 1 vs 0.5 x the sample spacing (seeds 0 / 1 / 2): frame PSNR
  38.1 / 37.5 / 38.3 vs 38.3 / 38.6 / 38.8 dB, CD 0.64 / 0.58 / 0.58 vs 0.41 / 0.35 / 0.46 mm,
  HD95 3.4-3.7 vs 1.1-1.8 mm, held-out 2D PSNR equal within 0.2 dB, 0.12 vs 0.08 s per step.

The default recipe on a larger CPU case (``make_phantom(0)``: 31 vessels of radius 0.9-3 mm
in the 160 mm head, 80^3 grid of 2 mm, 96^2 detector, same noise, 30 views, 25.6k Gaussians,
only 300 steps of 8 views): CD 0.75 mm (sum 1.50 mm), HD95 4.7 mm, 0.16 s per step; the static
fit with rgs recon's recipe CD 2.35 mm (sum 4.70), HD95 19.1 mm; this recipe without the field
CD 1.38 mm (sum 2.77), HD95 13.2 mm.

On the GPU case of ``validation/dsa.py`` (NVIDIA H200: 160^3 grid of 1 mm, 256^2 detector,
noise 1e5 / 10, 30 views, 3000 steps of 8 views, about 60 s) the toy's choices did not
carry over: with no densification and half the initial scale the fit kept ~50k small
Gaussians that speckle the background (surface of the time average: CD 2.75 mm, HD95
32.9 mm; of the peak over time 7.34 / 47.3 mm), while recon.gaussian's own recipe (densification,
initial scale 1) ends with ~22k Gaussians and CD 0.88 mm (sum 1.76), HD95 1.73 mm on the
time average (peak over time: 2.75 / 30.1 mm; 8 instead of 32 time cells: 0.94 / 1.71 mm on
the time average). Hence recon.gaussian's recipe and surfaces of the time-averaged volume. With
the batch rendered in one splat call (23 s for the 3000 steps), seeds 0 / 1 / 2 gave CD sums
of 1.70 / 1.89 / 1.89 mm (HD95 1.65 / 1.60 / 1.86 mm), 8 time cells 1.80 / 1.81 mm (seeds 0 /
1), and 6000 steps 4.86 mm with HD95 27 mm: the longer fit grows background speckle above
the surface level, so the recipe stays at 3000 steps. With one training view per time cell
the field overfits in time: the mean 3D PSNR over the ground-truth frames was 33.94 dB,
below the static fit's 34.25 dB. The temporal roughness penalty fixes that (seed 0, weights
0 / 0.1 / 1 / 10): Chamfer sum 1.79 / 1.39 / 1.12 / 1.02 mm, HD95 1.61 / 1.35 / 1.04 /
0.93 mm, frame PSNR 33.94 / 36.04 / 38.54 / 40.07 dB (8 time cells instead: 1.94 mm, 34.34
dB), so the default weight is 10. ``validation/dsa.py`` with it (H200): Chamfer sums 1.04 /
0.86 / 0.77 mm at 30 / 40 / 60 views (static fit 2.14 / 1.69 / 1.64 mm), 32 s; at 30 views
seeds 1 / 2 gave 1.05 / 1.00 mm and frame PSNR 40.6 / 40.2 dB.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core import losses, runtime
from ..core.adam import Adam
from ..core.errors import RgsInputError
from ..core.geometry import Geometry, VolumeGrid
from ..recon.gaussian import GaussianReconstruction, GSConfig, Recipe, gather_rows, load_state, save_state, to_cpu
from ..io.mesh import isosurface
from ..io.projections import ProjectionData
from ..core.splatting import splat
from ..core.voxelization import voxelize

CHECKPOINT_FORMAT = "rgs-dsa"
SOFTPLUS_ONE = math.log(math.e - 1)  # softplus(SOFTPLUS_ONE) = 1
SURFACE_FRACTION = 0.5  # vessel_surface: level = this x the robust maximum
ROBUST_MAX_FRACTION = 1e-4  # the robust maximum: the value of the top 0.01 % of the voxels


def _dsa_recipe() -> GSConfig:
    """rgs recon's recipe with densification on (4 rounds) and the rates without
    ``rate_scale``, as this model was measured."""
    return GSConfig(densify_rounds=4, rate_scale=1.0)


@dataclass
class DsaConfig(Recipe):
    """The DSA recipe. Learning rates are ``(start, end)`` per step, decaying log-linearly.

    * ``iterations``, ``seed``: copied into ``recipe`` (which also holds the batch size
      ``views_per_step``, the Gaussians' learning rates, loss weights and initialisation).
    * field: ``rank`` products of a ``space_cells^3`` grid over the volume box and a
      ``time_cells`` grid over the training time span; ``lr_field`` its learning rates.
    * ``time_smoothness_weight``: weight of the field's temporal roughness in the loss.
    * pruning every ``prune_every`` steps (0: never) of Gaussians whose peak attenuation over
      ``prune_times`` times is below ``prune_fraction`` x the reference attenuation.
    """

    NAME = "DSA"

    iterations: int = 3000
    seed: int = 0
    space_cells: int = 32
    time_cells: int = 32
    rank: int = 8
    lr_field: tuple[float, float] = (3e-2, 3e-3)
    time_smoothness_weight: float = 10.0
    prune_every: int = 500
    prune_fraction: float = 0.01
    prune_times: int = 64
    recipe: GSConfig = field(default_factory=_dsa_recipe)

    def __post_init__(self) -> None:
        if isinstance(self.recipe, dict):
            self.recipe = GSConfig.from_dict(self.recipe)
        if self.iterations < 0 or self.prune_every < 0 or not self.prune_fraction >= 0 \
                or not self.time_smoothness_weight >= 0:
            raise RgsInputError("need iterations, prune_every, prune_fraction and "
                                "time_smoothness_weight >= 0")
        if min(self.space_cells, self.time_cells, self.prune_times) < 2 or self.rank < 1:
            raise RgsInputError("need space_cells, time_cells and prune_times >= 2 and rank >= 1")
        self._rates_as_floats()
        if len(self.lr_field) != 2 or not min(self.lr_field) > 0:
            raise RgsInputError(f"lr_field must be two positive rates (start, end), got {self.lr_field}")
        self.recipe = replace(self.recipe, iterations=self.iterations, seed=self.seed)


class ContrastField(nn.Module):
    """``w(x, t) = softplus(c + sum_r S_r(x) T_r(t))`` with ``softplus(c) = 1`` (module doc).

    ``box_lo``, ``box_hi`` (3,) mm: the volume box (``S`` spans it, clamped outside);
    ``time_range`` ``(t0, t1)``: the span ``T`` covers (held constant outside). ``S`` starts
    uniform in [0, 1) (from torch's generator), ``T`` at 0.
    """

    def __init__(self, box_lo, box_hi, time_range: tuple[float, float], space_cells: int,
                 time_cells: int, rank: int):
        super().__init__()
        lo = torch.as_tensor(box_lo, dtype=torch.float32).reshape(3)
        hi = torch.as_tensor(box_hi, dtype=torch.float32).reshape(3)
        self.register_buffer("centre", (lo + hi) / 2)
        self.register_buffer("half_extent", (hi - lo) / 2)
        self.time_range = (float(time_range[0]), float(time_range[1]))
        self.space = nn.Parameter(torch.rand(1, rank, space_cells, space_cells, space_cells))
        self.time = nn.Parameter(torch.zeros(1, rank, 1, time_cells))

    def forward(self, points: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """(B, N) field values at ``points`` (N, 3) mm and ``times`` (B,)."""
        x = ((points - self.centre) / self.half_extent).float().reshape(1, 1, 1, -1, 3)
        space = F.grid_sample(self.space, x, align_corners=True, padding_mode="border")[0, :, 0, 0]
        t0, t1 = self.time_range
        t = (2 * (times.to(torch.float64) - t0) / (t1 - t0) - 1).float()
        grid = torch.stack([t, torch.zeros_like(t)], -1).reshape(1, 1, -1, 2)
        time = F.grid_sample(self.time, grid, align_corners=True, padding_mode="border")[0, :, 0]
        return F.softplus(time.T @ space + SOFTPLUS_ONE)  # (R, B)^T @ (R, N)

    def time_roughness(self) -> torch.Tensor:
        """Squared second differences of the time factors over their cells, summed per
        factor, averaged over the rank (0 for factors linear in time)."""
        t = self.time[0, :, 0]
        return ((t[:, 2:] - 2 * t[:, 1:-1] + t[:, :-2]) ** 2).sum(-1).mean()


def robust_max(volume: torch.Tensor) -> float:
    """The smallest of the ``ROBUST_MAX_FRACTION`` largest voxel values (at least one voxel)."""
    flat = volume.detach().reshape(-1)
    k = max(1, math.ceil(ROBUST_MAX_FRACTION * flat.numel()))
    return float(flat.topk(k).values[-1])


def vessel_surface(volume: torch.Tensor, grid: VolumeGrid) -> tuple[np.ndarray, np.ndarray, float]:
    """The vessel surface of a contrast volume (nx, ny, nz) 1/mm: :func:`~rgs_engine.io.mesh.isosurface`
    at ``SURFACE_FRACTION`` x :func:`robust_max` (half maximum, no ground truth needed).
    Returns ``(vertices (V, 3) mm, faces (F, 3), level 1/mm)``; empty for an all-zero volume."""
    level = SURFACE_FRACTION * robust_max(volume)
    if not level > 0:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64), level
    return (*isosurface(volume, grid, level), level)


class DsaReconstruction:
    """A 4D DSA reconstruction of ``data``: training views (V, H, W) with ``data.time`` (V,)
    (seconds, or the data's time unit), on ``data.grid``.

    ``gs`` is the :class:`GaussianReconstruction` holding the Gaussians (base densities);
    ``field`` the :class:`ContrastField`. Times passed to the methods are in the data's unit.
    """

    def __init__(self, data: ProjectionData, config: DsaConfig | None = None, _initialise: bool = True):
        self.config = config or DsaConfig()
        if data.time is None:
            raise RgsInputError(f"{data.source or 'the data'} has no frame times: a DSA "
                                "reconstruction needs one time per view")
        self.time_range = (float(data.time.min()), float(data.time.max()))
        if not self.time_range[1] > self.time_range[0]:
            raise RgsInputError("all views have the same time: a 4D reconstruction needs views "
                                "taken at different times")
        self.data, self.grid = data, data.grid
        self.device = runtime.ensure()
        self.times = data.time.to(self.device)
        recipe = self.config.recipe.motion_start(data.is_circular)
        self.gs = GaussianReconstruction(data, recipe) if _initialise else None
        lo, hi = data.grid.bounds()
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = ContrastField(lo, hi, self.time_range, cfg.space_cells, cfg.time_cells, cfg.rank)
        self.field = model.to(self.device)
        self.optimizer = Adam(self.field.parameters(), lr=0.0)

    @property
    def iteration(self) -> int:
        return self.gs.iteration

    def _times(self, times) -> torch.Tensor:
        t = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
        if t.numel() == 0 or not bool(torch.isfinite(t).all()):
            raise RgsInputError(f"need at least one finite time, got {t.tolist()}")
        return t.to(self.device)

    def densities(self, params: tuple[torch.Tensor, ...], times: torch.Tensor) -> torch.Tensor:
        """(B, N) attenuation (1/mm) of the Gaussians ``params`` (physical means, scales,
        quats, base densities) at ``times`` (B,)."""
        return params[3][None] * self.field(params[0], times)

    # ---- training ------------------------------------------------------------------------
    def step(self) -> dict:
        """One Adam step on a batch of views at their times; prune on schedule.
        Returns ``{"loss": 0-d device tensor (no host sync per step), "gaussians"}`` (after
        the step)."""
        cfg, gs = self.config, self.gs
        frac = min(gs.iteration / max(cfg.iterations - 1, 1), 1.0)
        gs.set_learning_rates(frac)
        for group in self.optimizer.param_groups:
            group["lr"] = losses.log_linear(cfg.lr_field, frac)
        idx, geo, target, moments = gs.batch()
        params = gs.gaussians.physical()
        pred = splat(*params[:3], self.densities(params, gather_rows(self.times, idx)), geo,
                     validate=False)  # the loop watches the loss
        loss = gs.image_loss(pred / gs.proj_scale, target, moments) + gs.tv_loss(params)
        if cfg.time_smoothness_weight > 0:
            loss = loss + cfg.time_smoothness_weight * self.field.time_roughness()
        gs.optimizer.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        gs.finish_step()
        if cfg.prune_every and gs.iteration % cfg.prune_every == 0:
            self.prune()
        return {"loss": loss.detach(), "gaussians": len(gs.gaussians)}

    @torch.no_grad()
    def peak_densities(self) -> torch.Tensor:
        """(N,) each Gaussian's largest attenuation (1/mm) over ``prune_times`` times spread
        evenly over the training span."""
        times = torch.linspace(*self.time_range, self.config.prune_times, dtype=torch.float64)
        return self.densities(self.gs.physical(), times.to(self.device)).amax(0)

    def prune(self) -> int:
        """Drop the Gaussians with negligible attenuation over the whole run (module doc);
        returns how many were dropped."""
        keep = self.peak_densities() > self.config.prune_fraction * self.gs.mu_ref
        dropped = int((~keep).sum())
        if dropped:
            self.gs.prune(keep)
        return dropped

    # ---- outputs -------------------------------------------------------------------------
    @torch.no_grad()
    def volume_at(self, t: float, grid: VolumeGrid | None = None) -> torch.Tensor:
        """(nx, ny, nz) attenuation (1/mm) at time ``t`` on ``grid`` (default the data's)."""
        params = self.gs.physical()
        grid = grid if grid is not None else self.grid
        return voxelize(*params[:3], self.densities(params, self._times([t]))[0], grid)

    @torch.no_grad()
    def mean_volume(self, times, grid: VolumeGrid | None = None) -> torch.Tensor:
        """(nx, ny, nz) attenuation (1/mm) averaged over ``times``."""
        params = self.gs.physical()
        grid = grid if grid is not None else self.grid
        return voxelize(*params[:3], self.densities(params, self._times(times)).mean(0), grid)

    @torch.no_grad()
    def render(self, geometry: Geometry, times) -> torch.Tensor:
        """(V, H, W) line integrals of the V views of ``geometry``, view ``v`` at ``times[v]``."""
        times = self._times(times)
        if times.numel() != geometry.num_views:
            raise RgsInputError(f"{geometry.num_views} views but {times.numel()} times: give one "
                                "time per view")
        params = self.gs.physical()
        return splat(*params[:3], self.densities(params, times), geometry)

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs (CPU tensors)."""
        return {"format": CHECKPOINT_FORMAT, "config": self.config.to_dict(),
                "gaussians": self.gs.state_dict(), "field": to_cpu(self.field.state_dict()),
                "optimizer": to_cpu(self.optimizer.state_dict())}

    def save_checkpoint(self, path, force: bool = True) -> None:
        save_state(path, self.state_dict(), force)

    @classmethod
    def load_checkpoint(cls, path, data: ProjectionData) -> "DsaReconstruction":
        """The run saved at ``path``, on the same training views it was started with."""
        state = load_state(path)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise RgsInputError(f"{path}: not an rgs DSA checkpoint: start again without --resume")
        try:
            rec = cls(data, DsaConfig.from_dict(state["config"]), _initialise=False)
            rec.gs = GaussianReconstruction.from_state_dict(state["gaussians"], data)
            rec.field.load_state_dict(state["field"])
            rec.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise RgsInputError(f"{path}: not a checkpoint of this DSA run ({type(exc).__name__}: "
                                f"{exc}): start again without --resume") from exc
        return rec
