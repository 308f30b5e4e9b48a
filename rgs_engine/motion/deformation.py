"""Deformation models of canonical Gaussians over time (breathing motion), pure PyTorch.

A deformation maps the canonical Gaussians to the Gaussians at a time ``t`` (seconds):

    model(means (N, 3) mm, scales (N, 3) mm, quats (N, 4), t_seconds (B,)) -> Deformed
    with Deformed.means (B, N, 3) mm, .scales (B, N, 3) mm, .quats (B, N, 4) unit (w, x, y, z)

(a 0-d ``t_seconds`` drops the leading ``B`` axis), so the caller splats the deformed
Gaussians of each time with the unchanged densities. Positions are normalised by the volume
box (``[-1, 1]`` per axis inside it); offsets come back in mm, ``scales' = scales exp(dlog)``
and ``quats' = dq * quats`` (Hamilton product, ``dq`` a unit quaternion). Every model starts
at the identity: its output layers are zero-initialised.

Time enters in one of three ways (``time_input``):

* ``"time"`` (X2-Gaussian's way): the time normalised over the scan window ``time_range``
  (seconds) to ``[-1, 1]``; the model can represent any motion and :func:`periodic_consistency`
  (deformation at ``t`` and ``t + n T`` must agree) both makes it periodic and gives the
  period ``T`` its gradient (once the model fits the motion, the disagreement is an
  autocorrelation-like function of ``T``, smallest at the true period and its multiples).
  Times outside the window are moved into it by whole periods.
* ``"phase"``: the breathing phase ``frac(t / T)``; the model is periodic by construction and
  ``T`` learns from the data term only, whose basin is far narrower (see
  :mod:`rgs_engine.motion.track4d` for measurements).
* ``"surrogate"``: each time's phase and depth from the breathing the projections show
  (a :class:`~rgs_engine.motion.surrogate.SurrogateDrive`, refined in training): the model
  sees ``frac(phase)`` as in phase mode and its offsets are scaled by the relative amplitude
  (positions and log scales times ``a``, rotations' vector parts times ``a``: the rotation
  angle scaled to first order), so cycles of other depth and length are the same motion
  met at another pace and depth. The period is the surrogate phase's mean period. A drive
  with a baseline (the end-exhale level) also adds ``baseline_at(t)`` times a learned
  displacement field on a :data:`BASELINE_CELLS`^3 grid (zero at the start): a drift of the
  resting position.

Models:

* :class:`KPlanesField` — spatio-temporal K-planes (xy, xz, yz, xt, yt, zt) at several
  resolutions, combined by Hadamard product (time planes start at 1, i.e. static), a small MLP
  trunk and zero-initialised heads for d(position), d(log scale), d(rotation quaternion);
  :meth:`KPlanesField.regularisers` gives K-planes' plane TV and temporal smoothness.
* :class:`AnchorDeformation` — anchors chosen by :func:`farthest_point_sampling` among the
  canonical centres, each Gaussian skinned to its ``k`` nearest anchors
  (:func:`knn_skinning`, Gaussian RBF weights), a small transformer encoder over anchor
  tokens (position + time encodings) predicting per-anchor translation + rotation, blended
  to the Gaussians (linear blend skinning); during training a random fraction of anchor
  tokens is hidden from the attention (masked-anchor training).

:class:`LearnedPeriod` holds the breathing period (seconds, log-parameterised).
"""
from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import RgsInputError, check_tensor
from ..core.gaussians import quat_to_rotmat
from ..core.rigid import quat_multiply
from . import kplanes_features
from .surrogate import SurrogateDrive

TIME_INPUTS = ("time", "phase", "surrogate")
BASELINE_CELLS = 16  # the baseline drift's displacement grid, cells per box axis


class Deformed(NamedTuple):
    """Deformed Gaussians: means (..., N, 3) mm, scales (..., N, 3) mm, quats (..., N, 4) unit."""

    means: torch.Tensor
    scales: torch.Tensor
    quats: torch.Tensor


class LearnedPeriod(nn.Module):
    """Breathing period ``T = exp(log_period)`` in seconds (float64 parameter).

    ``phase(t) = frac(t / T)`` in ``[0, 1)``, differentiable w.r.t. the period (``frac`` has
    derivative 1 almost everywhere); :func:`phase_harmonics` is its (sin, cos) embedding.
    """

    def __init__(self, period_s: float = 2.8):
        super().__init__()
        if not (math.isfinite(period_s) and period_s > 0):
            raise RgsInputError(f"period must be a positive number of seconds, got {period_s!r}")
        self.log_period = nn.Parameter(torch.tensor(math.log(period_s), dtype=torch.float64))

    @property
    def period_s(self) -> torch.Tensor:
        """The period in seconds, a 0-d float64 tensor (differentiable)."""
        return self.log_period.exp()

    def phase(self, t_seconds: torch.Tensor) -> torch.Tensor:
        """Phase ``frac(t / T)`` in ``[0, 1)``, float64, shape of ``t_seconds``."""
        x = t_seconds.to(torch.float64) / self.period_s
        return x - x.detach().floor()


def phase_harmonics(phase: torch.Tensor, harmonics: int) -> torch.Tensor:
    """(B,) phases -> (B, 2 K) ``[sin 2 pi k phase, cos 2 pi k phase]`` for ``k = 1 .. K``."""
    k = torch.arange(1, harmonics + 1, dtype=phase.dtype, device=phase.device)
    angle = 2 * math.pi * phase[:, None] * k
    return torch.cat([angle.sin(), angle.cos()], 1)


def fourier_features(x: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """``[x, sin(2^k pi x), cos(2^k pi x)]`` for ``k = 0 .. L - 1``: (..., D) -> (..., D (1 + 2 L))."""
    freqs = math.pi * 2.0 ** torch.arange(num_freqs, dtype=x.dtype, device=x.device)
    angle = (x[..., None] * freqs).flatten(-2)
    return torch.cat([x, angle.sin(), angle.cos()], -1)


def _zero_linear(fan_in: int, fan_out: int) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class Deformation(nn.Module, abc.ABC):
    """Common part of the deformation models: box and time normalisation, the period, and
    the application of offsets. Subclasses implement :meth:`offsets`.

    ``box_lo``, ``box_hi`` (3,) mm: the volume box; ``time_range`` (t0, t1) seconds: the scan
    window; ``period_s``: initial period (s); ``time_input``: ``"time"``, ``"phase"`` or
    ``"surrogate"`` (then ``surrogate`` is the drive; :attr:`periodic`: not time).
    """

    def __init__(self, box_lo: Sequence[float], box_hi: Sequence[float],
                 time_range: tuple[float, float], period_s: float = 2.8, time_input: str = "time",
                 surrogate: SurrogateDrive | None = None):
        super().__init__()
        if time_input not in TIME_INPUTS:
            raise RgsInputError(f"time input must be time, phase or surrogate, got {time_input!r}")
        if (surrogate is None) == (time_input == "surrogate"):
            raise RgsInputError("surrogate input needs a surrogate drive, and only it takes one")
        lo = torch.as_tensor(box_lo, dtype=torch.float32).reshape(3)
        hi = torch.as_tensor(box_hi, dtype=torch.float32).reshape(3)
        if not bool((hi > lo).all()):
            raise RgsInputError(f"the volume box must have positive size, got {lo.tolist()}..{hi.tolist()} mm")
        t0, t1 = (float(x) for x in time_range)
        if not (math.isfinite(t0) and math.isfinite(t1) and t1 > t0):
            raise RgsInputError(f"the scan window must have t1 > t0 (s), got {time_range!r}")
        self.register_buffer("centre", (lo + hi) / 2)
        self.register_buffer("half_extent", (hi - lo) / 2)
        self.time_range = (t0, t1)
        self.time_input = time_input
        self.periodic = time_input != "time"
        self.period = LearnedPeriod(period_s)
        self.surrogate = surrogate
        # the baseline drift's displacement per unit of the surrogate's baseline (box units),
        # a coarse grid over the box, zero at the start (only with a drive that has a baseline)
        self.baseline_field = nn.Parameter(torch.zeros(1, 3, *(BASELINE_CELLS,) * 3)) \
            if surrogate is not None and surrogate.has_baseline else None

    @property
    def period_s(self) -> torch.Tensor:
        """0-d float64: the period (s), the learned one or the surrogate phase's mean period."""
        return self.period.period_s if self.surrogate is None else self.surrogate.period_s

    def normalise(self, means: torch.Tensor) -> torch.Tensor:
        """(N, 3) mm -> box coordinates, ``[-1, 1]`` per axis inside the box."""
        return (means - self.centre) / self.half_extent

    def wrap_time(self, t_seconds: torch.Tensor) -> torch.Tensor:
        """Times outside the scan window moved into it by whole periods (float64)."""
        t0, t1 = self.time_range
        t = t_seconds.to(torch.float64)
        period = self.period.period_s
        shift = torch.floor((t - t0) / period).detach() * period
        return torch.where((t < t0) | (t > t1), t - shift, t)

    def time_coordinate(self, t_seconds: torch.Tensor) -> torch.Tensor:
        """(B,) float32: the normalised time in ``[-1, 1]`` (time input) or the phase in
        ``[0, 1)`` (phase and surrogate input)."""
        if self.surrogate is not None:
            phase = self.surrogate(t_seconds)[0]
            return (phase - phase.detach().floor()).float()
        if self.time_input == "phase":
            return self.period.phase(t_seconds).float()
        t0, t1 = self.time_range
        return (2 * (self.wrap_time(t_seconds) - t0) / (t1 - t0) - 1).float()

    @abc.abstractmethod
    def offsets(self, points: torch.Tensor, time: torch.Tensor, index: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Per-time offsets of N points in box coordinates (N, 3) at time coordinates (B,):
        ``(d position (B, N, 3) in box units, d log scale (B, N, 3) or None, rotation
        quaternion (B, N, 4), any non-zero norm)``. ``index``: see :meth:`forward`."""

    def forward(self, means: torch.Tensor, scales: torch.Tensor, quats: torch.Tensor,
                t_seconds, index: torch.Tensor | None = None) -> Deformed:
        """Deform the Gaussians (means, scales in mm; quats (w, x, y, z)) to the times
        ``t_seconds`` (B,) or 0-d, seconds; see the module docstring for the shapes.

        ``index`` (N,) long: which of the Gaussians the model was built for these are, when
        they are a subset (models with per-Gaussian state, such as the anchor skinning, need
        it; the others ignore it)."""
        check_tensor("means", means, (None, 3), finite=False)
        check_tensor("scales", scales, (means.shape[0], 3), finite=False)
        check_tensor("quats", quats, (means.shape[0], 4), finite=False)
        t = torch.as_tensor(t_seconds, device=means.device)
        single = t.dim() == 0
        points = self.normalise(means)
        dpos, dlog, dq = self.offsets(points, self.time_coordinate(t.reshape(-1)), index)
        if self.surrogate is not None:
            dpos, dlog, dq = _scaled(self.surrogate(t.reshape(-1))[1].float()[:, None, None], dpos, dlog, dq)
        if self.baseline_field is not None:
            dpos = dpos + self.surrogate.baseline_at(t.reshape(-1)).float()[:, None, None] * \
                self.baseline_displacement(points)[None]
        new_means = means + dpos * self.half_extent
        new_scales = scales * dlog.exp() if dlog is not None else scales.expand_as(new_means)
        new_quats = quat_multiply(F.normalize(dq, dim=-1), F.normalize(quats, dim=-1))
        out = Deformed(new_means, new_scales, new_quats)
        return Deformed(*(x[0] for x in out)) if single else out

    def baseline_displacement(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) box units: the baseline field at ``points`` (N, 3) in box coordinates
        (trilinear; the grid's axes (z, y, x) as ``grid_sample`` reads them)."""
        grid = points.to(self.baseline_field.dtype).reshape(1, 1, 1, -1, 3)
        return F.grid_sample(self.baseline_field, grid, align_corners=True, padding_mode="border")[0, :, 0, 0].T

    def regularisers(self) -> dict[str, torch.Tensor]:
        """Named regularisation terms of the model's own parameters (none by default)."""
        return {}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimiser group: ``"network"``, ``"period"`` (the learned period) or
        ``"surrogate"`` (the drive's per-view offsets), and model-specific ones."""
        if self.surrogate is not None:
            own = list(self.surrogate.parameters())
            return {"network": [p for p in self.parameters()
                                if all(p is not q for q in (*own, self.period.log_period))], "surrogate": own}
        period = [self.period.log_period]
        return {"network": [p for p in self.parameters() if p is not period[0]], "period": period}


def _scaled(a: torch.Tensor, dpos: torch.Tensor, dlog: torch.Tensor | None, dq: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Offsets (B, N, .) scaled by amplitudes ``a`` (B, 1, 1): positions and log scales times
    ``a``; the rotation quaternion made unit with ``w >= 0`` and its vector part times ``a``."""
    q = F.normalize(dq, dim=-1)
    q = torch.where(q[..., :1] < 0, -q, q)
    return a * dpos, None if dlog is None else a * dlog, torch.cat([q[..., :1], a * q[..., 1:]], -1)


# --------------------------------------------------------------------------------------
# K-planes
# --------------------------------------------------------------------------------------
PLANES = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))  # xy, xz, yz, xt, yt, zt


def _lerp_index(coord: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower cell index (long) and weight of the upper one for coordinates in ``[-1, 1]`` on
    ``size`` cells (``align_corners=True``: -1 and 1 are the first and last cell; at and
    beyond them the border cell, with no gradient, as ``grid_sample`` has it)."""
    u = (coord + 1) * (0.5 * (size - 1))
    u = torch.where((u > 0) & (u < size - 1), u, u.detach().clamp(0, size - 1))
    i0 = u.detach().floor().clamp(max=size - 2).long()
    return i0, u - i0


def time_rows(planes: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Time planes (..., T, R: time rows, space columns) linearly interpolated along time to
    the B time coordinates ``t`` (B,) in ``[-1, 1]`` (``align_corners``, border): (..., B, R)."""
    i, w = _lerp_index(t.to(planes.dtype), planes.shape[-2])
    return planes[..., i, :] * (1 - w)[:, None] + planes[..., i + 1, :] * w[:, None]


def sample_time_plane(plane: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B, N, F) bilinear samples of a time plane ``plane`` (1, F, T, R: time rows, space
    columns) at the N space coordinates ``x`` (N,) for each of the B time coordinates ``t``
    (B,), both in ``[-1, 1]``: ``F.grid_sample(plane, grid, align_corners=True,
    padding_mode="border")[0].permute(1, 2, 0)`` of the grid pairing every ``x`` with every
    ``t``, computed separably. Every view's N points share one time, so the plane is first
    interpolated to B rows along time (:func:`time_rows`), then those rows to the N points by
    one matrix product with the (N, R) linear-interpolation weights, which are the same for all
    B times: the backward pass is matrix products too, where ``grid_sample``'s scatters B x N
    points into the few cells of each view's time row (on a CPU it was most of a 4D step's
    deformation time)."""
    lines = time_rows(plane[0], t)  # (F, B, R)
    j, v = _lerp_index(x.to(plane.dtype), plane.shape[3])
    weights = torch.zeros(x.shape[0], plane.shape[3], dtype=plane.dtype, device=plane.device)
    weights = weights.scatter(1, torch.stack([j, j + 1], 1), torch.stack([1 - v, v], 1))  # (N, R)
    return torch.matmul(weights, lines.permute(1, 2, 0))  # (N, R) @ (B, R, F)


class KPlanesField(Deformation):
    """Spatio-temporal K-planes with MLP heads.

    Each level ``m`` of ``multires`` holds six planes of ``features`` channels: spatial planes
    of ``resolution * m`` cells per axis and time planes of ``time_resolution`` cells along
    time (``resolution * m`` along space). A point's feature at a level is the Hadamard
    product of its six bilinear samples; the levels' features are concatenated and fed to a
    two-layer ReLU trunk of width ``hidden`` and three zero-initialised linear heads. Spatial
    planes start uniform in [0.1, 0.5], time planes at 1. With phase or surrogate input the
    time axis wraps around (phase 1 = phase 0).
    """

    def __init__(self, box_lo, box_hi, time_range, period_s: float = 2.8, time_input: str = "time",
                 surrogate: SurrogateDrive | None = None, resolution: int = 32,
                 time_resolution: int = 64, multires: Sequence[int] = (1, 2),
                 features: int = 32, hidden: int = 64):
        super().__init__(box_lo, box_hi, time_range, period_s, time_input, surrogate)
        if min(resolution, time_resolution, features, hidden) < 2 or not multires:
            raise RgsInputError("K-planes need resolutions, features and hidden width >= 2 "
                                "and at least one level")
        self.planes = nn.ParameterList()
        for m in multires:
            size = (resolution * m,) * 3 + (time_resolution,)
            for a, b in PLANES:
                if b == 3:
                    self.planes.append(nn.Parameter(torch.ones(1, features, size[b], size[a])))
                else:
                    self.planes.append(nn.Parameter(torch.empty(1, features, size[b], size[a]).uniform_(0.1, 0.5)))
        self.levels = len(multires)
        self.trunk = nn.Sequential(nn.Linear(features * self.levels, hidden), nn.ReLU(),
                                   nn.Linear(hidden, hidden), nn.ReLU())
        self.head_position = _zero_linear(hidden, 3)
        self.head_scale = _zero_linear(hidden, 3)
        self.head_rotation = _zero_linear(hidden, 4)

    def _time_plane(self, plane: torch.Tensor) -> torch.Tensor:
        """The plane as sampled: when periodic, its first time row repeated at the end."""
        return torch.cat([plane, plane[:, :, :1]], 2) if self.periodic else plane

    def features(self, points: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """(B, N, features x levels) K-planes features of box coordinates (N, 3) at time
        coordinates (B,).

        On CUDA tensors by :func:`.kplanes_features.features` (per level the three spatial
        planes stacked and the three time planes interpolated to the B times, then one kernel
        call forward and one backward; the model lives on the runtime's device); on CPU tensors
        by torch's operators (``grid_sample``
        and :func:`sample_time_plane`), faster there: 11k points at 8 times, forward +
        backward, 118 ms against 188 ms for the kernels on the 2-core CI machine. On an H100,
        55.8k points at 8 times: features 9.7 -> 3.5 ms, the whole model 11.5 -> 4.5 ms, forward +
        backward (``validation/results/kplanes_ab.json``; 10.9 -> 4.1 and 12.2 -> 5.2 ms on another)."""
        tcoord = 2 * time - 1 if self.periodic else time
        if points.is_cuda:
            return kplanes_features.features(points, [self.level_planes(level, tcoord) for level in range(self.levels)])
        n = points.shape[0]
        out = []
        for level in range(self.levels):
            spatial, temporal = 1.0, 1.0
            for (a, b), plane in zip(PLANES, self.planes[6 * level:6 * level + 6]):
                if b < 3:
                    grid = points[:, [a, b]].reshape(1, 1, n, 2)
                    spatial = spatial * F.grid_sample(plane, grid, align_corners=True,
                                                      padding_mode="border")[0, :, 0]   # (F, N)
                else:
                    temporal = temporal * sample_time_plane(self._time_plane(plane), points[:, a], tcoord)  # (B, N, F)
            out.append(spatial.T * temporal)
        return torch.cat(out, -1)

    def level_planes(self, level: int, tcoord: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the kernels take of one level at time coordinates ``tcoord`` (B,) in [-1, 1]:
        the xy, xz, yz planes stacked channels last (3, R, R, F) and the xt, yt, zt planes'
        rows at those times (3, B, R, F)."""
        planes = self.planes[6 * level:6 * level + 6]
        spatial = torch.stack([plane[0] for (_, b), plane in zip(PLANES, planes) if b < 3]).permute(0, 2, 3, 1).contiguous()
        timed = torch.stack([self._time_plane(plane)[0] for (_, b), plane in zip(PLANES, planes) if b == 3])
        return spatial, time_rows(timed, tcoord).permute(0, 2, 3, 1).contiguous()

    def offsets(self, points, time, index=None):
        h = self.trunk(self.features(points, time))
        dq = self.head_rotation(h)
        dq = dq + torch.tensor([1.0, 0.0, 0.0, 0.0], device=dq.device, dtype=dq.dtype)
        return self.head_position(h), self.head_scale(h), dq

    def regularisers(self) -> dict[str, torch.Tensor]:
        """K-planes' regularisers, averaged over levels: ``plane_tv``, the mean squared first
        difference along the spatial axes of every plane; ``time_smoothness``, the mean
        squared second difference along time of the time planes (circular when periodic)."""
        tv, smooth = 0.0, 0.0
        for (a, b), plane in zip(PLANES * self.levels, self.planes):
            tv = tv + plane.diff(dim=3).square().mean()
            if b < 3:
                tv = tv + plane.diff(dim=2).square().mean()
            else:
                p = self._time_plane(plane)
                if self.periodic:
                    p = torch.cat([plane[:, :, -1:], p], 2)
                smooth = smooth + (p[:, :, 2:] - 2 * p[:, :, 1:-1] + p[:, :, :-2]).square().mean()
        return {"plane_tv": tv / self.levels, "time_smoothness": smooth / self.levels}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``"planes"`` (the feature planes), ``"network"`` (MLP), ``"period"``."""
        groups = super().param_groups()
        planes = {id(p) for p in self.planes}
        groups["network"] = [p for p in groups["network"] if id(p) not in planes]
        return {"planes": list(self.planes), **groups}


# --------------------------------------------------------------------------------------
# Anchors
# --------------------------------------------------------------------------------------
def farthest_point_sampling(points: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """Indices (count,) of ``count`` points of (N, 3) chosen by farthest-point sampling.

    The first index is drawn from a CPU generator seeded with ``seed``; each next one is the
    point farthest (squared Euclidean distance in float64, first index on ties) from those
    chosen so far. Deterministic given ``seed``; runs on the points' device without host
    reads inside the loop.
    """
    check_tensor("points", points, (None, 3))
    n = points.shape[0]
    if not 1 <= count <= n:
        raise RgsInputError(f"cannot choose {count} anchors among {n} points: need 1 <= count <= N")
    p = points.detach().to(torch.float64)
    gen = torch.Generator().manual_seed(int(seed))
    current = torch.randint(n, (), generator=gen).to(p.device)
    chosen = torch.empty(count, dtype=torch.long, device=p.device)
    dist = torch.full((n,), math.inf, dtype=torch.float64, device=p.device)
    for i in range(count):
        chosen[i] = current
        dist = torch.minimum(dist, (p - p[current]).square().sum(1))
        current = torch.argmax(dist)
    return chosen


def knn_skinning(points: torch.Tensor, anchors: torch.Tensor, k: int, sigma: float | None = None,
                 chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Each point's ``k`` nearest anchors and Gaussian RBF weights that sum to 1.

    ``points`` (N, 3), ``anchors`` (A, 3) in the same unit; returns indices (N, k) long
    (nearest first) and weights (N, k) ``softmax(-d^2 / (2 sigma^2))`` over the k anchors.
    ``sigma`` defaults to the mean distance from an anchor to its nearest other anchor.
    Distances are computed ``chunk`` points at a time.
    """
    check_tensor("points", points, (None, 3))
    check_tensor("anchors", anchors, (None, 3))
    a = anchors.shape[0]
    if not 1 <= k <= a:
        raise RgsInputError(f"need 1 <= k <= number of anchors ({a}), got k = {k}")
    p, q = points.detach().float(), anchors.detach().float()
    if sigma is None:  # (one anchor: every weight is 1 whatever sigma is)
        sigma = float(torch.cdist(q, q).fill_diagonal_(math.inf).min(1).values.mean()) if a > 1 else 1.0
    idx, weights = [], []
    for s in range(0, p.shape[0], chunk):
        d2, i = torch.cdist(p[s:s + chunk], q).square().topk(k, dim=1, largest=False)
        idx.append(i)
        weights.append(torch.softmax(-d2 / (2 * sigma ** 2), 1))
    return torch.cat(idx), torch.cat(weights)


def _rotvec_quat(omega: torch.Tensor) -> torch.Tensor:
    """(..., 3) rotation vectors (rad) -> unit quaternions ``normalise(1, omega / 2)`` (..., 4)
    (the exact rotation to second order; smooth everywhere, w > 0)."""
    return F.normalize(torch.cat([torch.ones_like(omega[..., :1]), omega / 2], -1), dim=-1)


class AnchorDeformation(Deformation):
    """Anchor-driven deformation with a transformer over anchor tokens.

    ``means`` (N, 3) mm: the canonical centres the anchors and the skinning are built from
    (indices and weights are then fixed buffers; later calls must pass the same N
    Gaussians). ``num_anchors`` anchors by FPS (``seed``); ``k`` nearest anchors per
    Gaussian. A token per anchor: Fourier features of its box position (``pos_freqs``
    octaves) plus a time encoding (phase input: ``time_harmonics`` harmonics of the phase;
    time input: the normalised time ``u`` and ``time_harmonics`` harmonics of ``(u + 1) / 4``,
    a Fourier basis over twice the scan window, so ``K`` harmonics resolve motion of up to
    ``K / 2`` cycles per window), each through a linear layer to ``width``; ``layers``
    pre-norm transformer encoder layers with ``heads`` heads; a zero-initialised linear head
    gives each anchor a translation (box units) and a rotation vector (rad) about the anchor.
    Gaussians follow by linear blend skinning:
    ``x' = x + sum_k w_k ((R_k - I)(x - a_k) + t_k)``, ``q' = normalise(sum_k w_k q_k) * q``.

    In training mode a fraction ``mask_ratio`` of anchors, drawn per time, is hidden from the
    other tokens' attention (each still sees itself); ``masking=False`` or eval mode turns it
    off. The masks come from the module's own generator, part of its state dict.
    """

    def __init__(self, means: torch.Tensor, box_lo, box_hi, time_range, period_s: float = 2.8,
                 time_input: str = "time", surrogate: SurrogateDrive | None = None, num_anchors: int = 256, k: int = 8, width: int = 64,
                 heads: int = 4, layers: int = 2, mask_ratio: float = 0.25, pos_freqs: int = 4,
                 time_harmonics: int = 8, seed: int = 0):
        super().__init__(box_lo, box_hi, time_range, period_s, time_input, surrogate)
        if not 0 <= mask_ratio < 1:
            raise RgsInputError(f"mask ratio must be in [0, 1), got {mask_ratio}")
        points = self.normalise(means.detach().float().to(self.centre.device))
        anchors = points[farthest_point_sampling(points, min(num_anchors, points.shape[0]), seed)]
        idx, weights = knn_skinning(points, anchors, min(k, anchors.shape[0]))
        self.register_buffer("anchors", anchors)
        self.register_buffer("knn_index", idx)
        self.register_buffer("knn_weights", weights)
        self.pos_freqs, self.time_harmonics, self.heads = pos_freqs, time_harmonics, heads
        self.mask_ratio, self.masking = float(mask_ratio), True
        self.mask_generator = torch.Generator().manual_seed(int(seed))
        self.embed_position = nn.Linear(3 * (1 + 2 * pos_freqs), width)
        time_dim = 2 * time_harmonics + (1 if time_input == "time" else 0)
        self.embed_time = nn.Linear(time_dim, width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = _zero_linear(width, 6)

    def get_extra_state(self):
        return {"mask_generator": self.mask_generator.get_state()}

    def set_extra_state(self, state) -> None:
        self.mask_generator.set_state(state["mask_generator"])

    def _time_encoding(self, time: torch.Tensor) -> torch.Tensor:
        if self.periodic:
            return phase_harmonics(time, self.time_harmonics)
        return torch.cat([time[:, None], phase_harmonics((time + 1) / 4, self.time_harmonics)], 1)

    def _attention_mask(self, batch: int) -> torch.Tensor | None:
        """(B heads, A, A) bool, True where a query may not attend to a hidden anchor."""
        if not (self.training and self.masking and self.mask_ratio > 0):
            return None
        a = self.anchors.shape[0]
        hidden = torch.rand(batch, 1, a, generator=self.mask_generator) < self.mask_ratio
        mask = hidden.expand(batch, a, a) & ~torch.eye(a, dtype=torch.bool)
        return mask.repeat_interleave(self.heads, 0).to(self.anchors.device)

    def anchor_motion(self, time: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-anchor translation (B, A, 3), box units, and rotation vector (B, A, 3), rad,
        at time coordinates (B,)."""
        tokens = (self.embed_position(fourier_features(self.anchors, self.pos_freqs))[None]
                  + self.embed_time(self._time_encoding(time))[:, None])
        out = self.head(self.encoder(tokens, mask=self._attention_mask(time.shape[0])))
        return out[..., :3], out[..., 3:]

    def offsets(self, points, time, index=None):
        knn_index, knn_weights = self.knn_index, self.knn_weights
        if index is not None:
            knn_index, knn_weights = knn_index[index], knn_weights[index]
        if points.shape[0] != knn_index.shape[0]:
            raise RgsInputError(f"this anchor model was built for {self.knn_index.shape[0]} "
                                f"Gaussians, got {points.shape[0]}: rebuild it after densification")
        translation, rotvec = self.anchor_motion(time)
        nb, a = translation.shape[:2]
        quats = _rotvec_quat(rotvec)                                      # (B, A, 4)
        # x' - x = M x + c with M = sum w (R_k - I), c = sum w (t_k - (R_k - I) a_k): both
        # exactly 0 at the identity
        rel = quat_to_rotmat(quats) - torch.eye(3, device=quats.device)   # (B, A, 3, 3)
        shift = translation - (rel @ self.anchors[..., None])[..., 0]
        table = torch.cat([rel.flatten(2), shift, quats], -1)             # (B, A, 16)
        table = table.permute(1, 0, 2).reshape(a, nb * 16)
        blend = F.embedding_bag(knn_index, table, per_sample_weights=knn_weights,
                                mode="sum").reshape(-1, nb, 16).transpose(0, 1)   # (B, N, 16)
        m = blend[..., :9].unflatten(-1, (3, 3))
        dpos = (m @ points[..., None])[..., 0] + blend[..., 9:12]
        return dpos, None, blend[..., 12:]


# --------------------------------------------------------------------------------------
# Periodicity
# --------------------------------------------------------------------------------------
def periodic_consistency(model: Deformation, means: torch.Tensor, scales: torch.Tensor,
                         quats: torch.Tensor, t_seconds: torch.Tensor, cycles: int = 1,
                         index: torch.Tensor | None = None) -> torch.Tensor:
    """Disagreement of the deformations at ``t`` and ``t + n T`` (0-d tensor, >= 0).

    ``t_seconds`` (B,); ``n = +cycles`` where ``t + cycles T`` stays inside the model's scan
    window, else ``-cycles``. The loss is the mean over Gaussians and times of
    ``|d means| / half box + |d log scales| + (1 - |<q, q'>|)``. It is 0 for an exactly periodic
    model and gives the period its gradient in time-input mode. ``index`` as in
    :meth:`Deformation.forward` (the loss may use a subset of the Gaussians). The model is evaluated in
    eval mode (without training-time randomness such as anchor masking), then restored.
    """
    t = torch.as_tensor(t_seconds, device=means.device).to(torch.float64).reshape(-1)
    shift = cycles * model.period.period_s
    n = torch.where(t + shift.detach() <= model.time_range[1], 1.0, -1.0).to(t)
    training = model.training
    model.eval()
    try:
        deformed = model(means, scales, quats, torch.cat([t, t + n * shift]), index)
    finally:
        model.train(training)
    (means_a, means_b), (scales_a, scales_b), (quats_a, quats_b) = (x.chunk(2) for x in deformed)
    return ((means_a - means_b).abs() / model.half_extent).mean() \
        + (scales_a.log() - scales_b.log()).abs().mean() \
        + (1 - (quats_a * quats_b).sum(-1).abs()).mean()
