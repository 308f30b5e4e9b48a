"""A respiratory surrogate per view: the phase, depth and baseline of the breathing the projections show.

The row shifts of :func:`rgs_engine.motion.period_estimate.row_shifts` (pixels, one per
view, against a motion-blurred static fit) follow the superior-inferior motion; read as a
signal ``s(t)`` of the views' acquisition times they give each view a point of the 2-D
surrogate of surrogate-driven respiratory motion models (displacement and its rate), here in
polar form (:func:`measure_surrogate`):

* ``baseline`` ``B(t)`` (pixels): the moving average of ``s`` over one period ``P`` (a boxcar
  of one period cancels the breathing cycle and its harmonics and keeps slower drifts of
  the mean position);
* ``exhale`` ``E(t)`` (pixels): the end-exhale level, the :data:`EXHALE_QUANTILE` quantile of
  ``s`` over :data:`EXHALE_PERIODS` periods on the side where the breathing dwells (the side
  of ``s - B`` its median lies on: breathing rests at end-exhale). A deeper or shallower
  breath moves the mean ``B`` but not ``E``; a drift of the resting position, the clinical
  baseline drift, moves both;
* the fundamental ``x(t)``: ``s - B`` band-passed to ``[BAND[0] f, BAND[1] f]`` around
  ``f = 1 / P`` (zero-phase Butterworth of order :data:`FILTER_ORDER`);
* ``amplitude`` ``A(t) = |z(t)|`` (pixels) and ``phase`` ``phi(t) = arg z(t) / 2 pi``
  (cycles, unwrapped: it grows by one per breath) of the analytic signal
  ``z = x + i H[x]`` (``H`` the Hilbert transform): ``x = A cos(2 pi phi)``. ``(x, H[x])``
  is the phase portrait of the breathing (the Hilbert transform of a sinusoid is its rate
  over its angular frequency), so a shallower breath has a smaller ``A`` and a longer one a
  slower ``phi``, cycle by cycle, instead of one period for all.

The signal is resampled to its median time step for the filters (the views' times need not
be evenly spaced) and read back at the views' times. :func:`phase_period_s` is the mean
period the phase implies (one over the least-squares slope of ``phi(t)``).

:class:`SurrogateDrive` turns a measured surrogate into a deformation input that training
refines: per view a phase offset (cycles) and a log-amplitude offset, both started at 0 and
pulled back towards the measurement by :meth:`SurrogateDrive.regulariser`; at any time the
phase and relative amplitude are interpolated linearly between the views' times.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..core.errors import RgsInputError

BAND = (0.5, 1.5)  # the fundamental's band, in multiples of 1 / period
ROLL_OFF = 0.25  # width of the band's raised-cosine edges, in multiples of 1 / period
PAD_PERIODS = 2.0  # periods of continued signal padded at each end against edge effects
EXHALE_PERIODS = 1.5  # the end-exhale level's window, periods (one trough even in a cycle 1.5x the mean)
EXHALE_QUANTILE = 0.1  # the end-exhale level: this quantile of the window, on the dwell side


class Surrogate(NamedTuple):
    """Per-view surrogate, each (N,) float64 in the views' order: ``signal`` (the row shifts,
    pixels), ``baseline`` (pixels), ``amplitude`` (pixels, >= 0), ``phase`` (cycles,
    unwrapped); ``period_s`` the period (s) the filters were centred on; ``exhale`` (pixels)
    the end-exhale level."""

    signal: torch.Tensor
    baseline: torch.Tensor
    amplitude: torch.Tensor
    phase: torch.Tensor
    period_s: float
    exhale: torch.Tensor


def measure_surrogate(times_s: torch.Tensor, signal: torch.Tensor, period_s: float) -> Surrogate:
    """The surrogate of ``signal`` (N,) pixels at ``times_s`` (N,) seconds, breathing at about
    ``period_s`` seconds (e.g. :func:`rgs_engine.motion.period_estimate.estimate_period`'s);
    see the module. Needs two periods of signal sampled at least 4 times per period."""
    t = times_s.detach().to("cpu", torch.float64).reshape(-1).numpy()
    y = signal.detach().to("cpu", torch.float64).reshape(-1).numpy()
    if t.size != y.size or t.size < 4 or not (math.isfinite(period_s) and period_s > 0):
        raise RgsInputError(f"a surrogate needs one time per sample (got {t.size} times, {y.size} "
                            f"samples) and a positive period (got {period_s!r})")
    order = np.argsort(t, kind="stable")
    ts, ys = t[order], y[order]
    dt = float(np.median(np.diff(ts)))
    span = float(ts[-1] - ts[0])
    if not (dt > 0 and span >= 2 * period_s and period_s >= 4 * dt):
        raise RgsInputError(f"the samples span {span:.3g} s every {dt:.3g} s: a surrogate of a "
                            f"{period_s:.3g} s breathing period needs two periods at 4 samples per period")
    grid = ts[0] + dt * np.arange(round(span / dt) + 1)
    uniform = np.interp(grid, ts, ys)
    pad, padded = _pad_periodic(uniform, period_s / dt)
    baseline = _moving_average(padded, period_s / dt)
    exhale = _exhale_level(padded, padded - baseline, EXHALE_PERIODS * period_s / dt)
    analytic = _analytic_band(padded, dt, period_s)[pad:pad + grid.size]
    phase = np.unwrap(np.angle(analytic)) / (2 * np.pi)
    back = np.empty_like(order)
    back[order] = np.arange(order.size)
    at_views = [torch.from_numpy(np.interp(ts, grid, v)[back])
                for v in (baseline[pad:pad + grid.size], np.abs(analytic), phase, exhale[pad:pad + grid.size])]
    return Surrogate(torch.from_numpy(y.copy()), *at_views[:3], float(period_s), at_views[3])


def _odd_window(width: float) -> int:
    """A centred window's sample count for ``width`` samples: ``floor(width)`` (at least 1),
    less one where that is even."""
    n = max(1, math.floor(width))
    return n - (1 - n % 2)


def _moving_average(y: np.ndarray, width: float) -> np.ndarray:
    """(M,) the mean of ``y`` (M,) over a centred window of ``width`` samples (fractional:
    ``n = floor(width)`` odd-centred samples at weight 1, the two beyond at half the rest;
    the ends repeat the border)."""
    n = _odd_window(width)
    end = (width - n) / 2
    kernel = np.concatenate([[end], np.ones(n), [end]]) / width
    half = kernel.size // 2
    return np.convolve(np.pad(y, half, mode="edge"), kernel, mode="valid")


def _exhale_level(y: np.ndarray, breathing: np.ndarray, width: float) -> np.ndarray:
    """(M,) the end-exhale level of ``y`` (M,): its :data:`EXHALE_QUANTILE` quantile over a
    centred window of ``width`` samples (the ends repeat the border), from below where
    ``breathing`` (``y`` less its mean level) has a negative median, else from above."""
    n = _odd_window(width)
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(y, n // 2, mode="edge"), n)
    below = np.median(breathing) < 0
    return np.quantile(windows, EXHALE_QUANTILE if below else 1 - EXHALE_QUANTILE, axis=-1)


def _analytic_band(y: np.ndarray, dt: float, period_s: float) -> np.ndarray:
    """(M,) complex: the analytic signal of ``y`` (M,) sampled every ``dt`` s, band-limited
    to ``[BAND[0], BAND[1]] / period_s`` Hz with raised-cosine edges :data:`ROLL_OFF` /
    ``period_s`` wide (one-sided spectrum, zero-padded FFT; the ends tapered over
    :data:`PAD_PERIODS` periods, the padding of :func:`_pad_periodic`)."""
    m = y.size
    taper = np.ones(m)
    edge = min(round(PAD_PERIODS * period_s / dt), m // 2)
    if edge > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(edge) + 0.5) / edge)
        taper[:edge], taper[m - edge:] = ramp, ramp[::-1]
    n_fft = 2 * m
    f = np.fft.fftfreq(n_fft, dt) * period_s              # in multiples of 1 / period
    lo, hi = BAND
    below = np.clip((f - (lo - ROLL_OFF)) / ROLL_OFF, 0, 1)
    above = np.clip(((hi + ROLL_OFF) - f) / ROLL_OFF, 0, 1)
    mask = np.where(f > 0, 2 * (0.5 - 0.5 * np.cos(np.pi * below)) * (0.5 - 0.5 * np.cos(np.pi * above)), 0)
    return np.fft.ifft(np.fft.fft((y - y.mean()) * taper, n_fft) * mask)[:m]


def _pad_periodic(y: np.ndarray, period_samples: float) -> tuple[int, np.ndarray]:
    """``y`` (M,) extended by ``pad`` samples at each end with the samples a whole number of
    periods inside (the breathing continued, not mirrored: a mirror reverses the phase),
    and ``pad``."""
    n_p = max(1, round(period_samples))
    pad = min(round(PAD_PERIODS * period_samples), y.size - n_p)
    shift = n_p * math.ceil(pad / n_p)
    if pad < 1 or shift >= y.size:
        return 0, y
    k = np.arange(pad)
    return pad, np.concatenate([y[k + shift - pad], y, y[y.size - shift + k]])


def phase_period_s(times_s: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """0-d float64: the mean period (s) of an unwrapped ``phase`` (N,) cycles at ``times_s``
    (N,): one over the least-squares slope of phase against time (differentiable)."""
    t = times_s.to(phase.dtype)
    tc = t - t.mean()
    return (tc * tc).sum() / (tc * (phase - phase.mean())).sum()


class SurrogateDrive(nn.Module):
    """The deformation input of ``time_input="surrogate"``: per-view phase and amplitude,
    refined during training.

    ``times_s`` (N,) s, ``phase`` (N,) cycles (unwrapped) and ``amplitude`` (N,) > 0 (any
    unit; made relative to its median) of the N views, e.g. from :func:`measure_surrogate`.
    Buffers hold the measurement (sorted by time); parameters ``phase_offset`` (cycles) and
    ``log_amplitude_offset`` (N,) start at 0. :meth:`forward` gives the (unwrapped) phase and
    relative amplitude at any times: linear interpolation between the views' times, beyond
    them the end amplitude and the phase continued at the mean rate.

    ``baseline`` (N,), optional, in ``amplitude``'s unit: the slow drift of the mean position
    (:class:`Surrogate`'s). Stored relative to the median amplitude and centred on its own
    median; :meth:`baseline_at` interpolates it (the end values beyond the views), and a
    deformation given such a drive adds ``baseline_at(t)`` times a learned displacement field
    (:class:`~rgs_engine.motion.deformation.Deformation`). :attr:`has_baseline` says whether
    it was given (a drive without one moves nothing by it).
    """

    def __init__(self, times_s: torch.Tensor, phase: torch.Tensor, amplitude: torch.Tensor,
                 baseline: torch.Tensor | None = None):
        super().__init__()
        t = torch.as_tensor(times_s, dtype=torch.float64).reshape(-1)
        phase = torch.as_tensor(phase, dtype=torch.float64).reshape(-1)
        amplitude = torch.as_tensor(amplitude, dtype=torch.float64).reshape(-1)
        drift = torch.zeros_like(t) if baseline is None else torch.as_tensor(baseline, dtype=torch.float64).reshape(-1)
        if not (t.numel() >= 2 and phase.shape == t.shape == amplitude.shape == drift.shape
                and float(t.max()) > float(t.min())):
            raise RgsInputError("a surrogate drive needs one phase, one amplitude (and one baseline, "
                                "if any) per view and views at two times at least")
        if not bool(torch.isfinite(phase).all() and (amplitude > 0).all() and torch.isfinite(amplitude).all()
                    and torch.isfinite(drift).all()):
            raise RgsInputError("surrogate phases and baselines must be finite and amplitudes finite and > 0")
        order = torch.argsort(t, stable=True)
        relative = amplitude[order] / amplitude.median()
        self.has_baseline = baseline is not None
        self.register_buffer("times_s", t[order])
        self.register_buffer("measured_phase", phase[order])
        self.register_buffer("measured_log_amplitude", relative.log())
        self.register_buffer("measured_baseline", (drift[order] - drift.median()) / amplitude.median())
        self.phase_offset = nn.Parameter(torch.zeros_like(t))
        self.log_amplitude_offset = nn.Parameter(torch.zeros_like(t))

    def table(self) -> dict[str, np.ndarray]:
        """The drive per view, sorted by time: (N,) float64 arrays ``time_s``,
        ``phase_measured_cycles`` / ``phase_cycles`` (unwrapped, as measured / refined),
        ``depth_measured`` / ``depth`` (relative to the measurement's median) and, with a
        baseline, ``baseline`` (relative, centred)."""
        with torch.no_grad():
            cols = {"time_s": self.times_s, "phase_measured_cycles": self.measured_phase,
                    "phase_cycles": self.phase, "depth_measured": self.measured_log_amplitude.exp(),
                    "depth": (self.measured_log_amplitude + self.log_amplitude_offset).exp()}
            if self.has_baseline:
                cols["baseline"] = self.measured_baseline
            return {k: v.detach().cpu().numpy().astype(np.float64) for k, v in cols.items()}

    @classmethod
    def placeholder(cls, times_s: torch.Tensor, baseline: bool = False) -> SurrogateDrive:
        """A drive of the right shapes (with a baseline or not) whose state a checkpoint then loads."""
        t = torch.as_tensor(times_s, dtype=torch.float64).reshape(-1)
        return cls(t, torch.zeros_like(t), torch.ones_like(t), torch.zeros_like(t) if baseline else None)

    @property
    def phase(self) -> torch.Tensor:
        """(N,) float64 refined phases (cycles) of the views, sorted by time."""
        return self.measured_phase + self.phase_offset

    @property
    def amplitude(self) -> torch.Tensor:
        """(N,) float64 refined relative amplitudes of the views, sorted by time."""
        return (self.measured_log_amplitude + self.log_amplitude_offset).exp()

    @property
    def period_s(self) -> torch.Tensor:
        """0-d float64: the mean period (s) of the refined phase, :func:`phase_period_s`."""
        return phase_period_s(self.times_s, self.phase)

    def forward(self, t_seconds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(phase (B,) cycles unwrapped, relative amplitude (B,)), float64, at ``t_seconds`` (B,)."""
        t, inside, i, w = self._bracket(t_seconds)
        phase, log_amp = self.phase, self.measured_log_amplitude + self.log_amplitude_offset
        beyond = (t - inside) / self.period_s.detach()
        return (phase[i - 1] * (1 - w) + phase[i] * w + beyond,
                (log_amp[i - 1] * (1 - w) + log_amp[i] * w).exp())

    def baseline_at(self, t_seconds: torch.Tensor) -> torch.Tensor:
        """(B,) float64: the relative baseline at ``t_seconds`` (B,) (zero without one)."""
        _, _, i, w = self._bracket(t_seconds)
        b = self.measured_baseline
        return b[i - 1] * (1 - w) + b[i] * w

    def _bracket(self, t_seconds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t, t clamped to the views' times, index of the view after it, weight of that
        view)`` for linear interpolation between the views, each (B,)."""
        ts = self.times_s
        t = torch.as_tensor(t_seconds, dtype=torch.float64, device=ts.device).reshape(-1)
        inside = t.clamp(ts[0], ts[-1])
        i = torch.searchsorted(ts, inside).clamp(1, ts.numel() - 1)
        t0, t1 = ts[i - 1], ts[i]
        return t, inside, i, ((inside - t0) / (t1 - t0).clamp_min(1e-12)).clamp(0, 1)

    def regulariser(self) -> torch.Tensor:
        """0-d: how far the refinement strays from the measurement, the mean square of the
        offsets (cycles, log amplitude) plus that of their differences between neighbouring
        views (so neighbours move together)."""
        return sum(o.square().mean() + o.diff().square().mean()
                   for o in (self.phase_offset, self.log_amplitude_offset))

    def bin_times(self, bins: int, around_s: float) -> torch.Tensor:
        """(bins,) float64 times (s) at which the refined phase passes the centres of ``bins``
        equal phase bins of the cycle (whole phase count) containing ``around_s``: the
        per-phase times of that cycle, binned on the surrogate (phase increasing in time is
        assumed; where it does not, the running maximum is inverted)."""
        if bins < 1:
            raise RgsInputError(f"need at least one phase bin, got {bins}")
        with torch.no_grad():
            phase = torch.cummax(self.phase, 0).values.cpu()
            times = self.times_s.cpu()
            start = math.floor(float(self(torch.tensor([around_s]))[0][0]))
            targets = start + (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
            return torch.from_numpy(np.interp(targets.numpy(), phase.numpy(), times.numpy()))
