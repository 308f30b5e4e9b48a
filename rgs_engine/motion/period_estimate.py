"""The breathing period from the projections alone: a motion surrogate, its periodogram, its cycles.

On a circular scan the patient's superior-inferior axis is the rotation axis, which every
view sees along its detector rows, so breathing moves the content of each projection along
its rows (the idea behind the Amsterdam shroud). Given a motion-blurred reference rendering
of every view (e.g. a static fit of all projections):

* :func:`row_shifts`: the least-squares row shift ``s_n`` (pixels) that best explains
  ``measured_n - reference_n`` to first order, ``measured(r) ~ reference(r - s)``, so
  ``s_n = -<r_n, g_n> / <g_n, g_n>`` with ``r = measured - reference`` and ``g`` the
  reference's central difference along rows, summed over the **motion rows** only: the
  :data:`MOTION_ROW_FRACTION` of interior rows (at least :data:`MIN_MOTION_ROWS`) whose
  coherent residual energy over all views is largest (:func:`motion_rows`; the residual's
  energy less the white noise's). Rows of small structures that breathing moves further
  than they are wide (vessels, rib edges in the lungs) stop following the motion to first
  order and compress a deep breath; the rows a broad edge sweeps (the diaphragm's dome)
  carry the most residual energy and stay linear. On the 128^3 chest cases of
  ``validation/surrogate_depth.py`` (150 views of 256^2, TIGRE noise) the irregular case's
  deepest breath (1.52 x the median depth) reads 1.26 over all rows and 1.46 over the
  motion rows (slope of the read on the true depth 0.42 and 0.78). Where the motion rows'
  shifts span under :data:`LINEAR_SWING_PX` (coarse pixels: 0.16 px at 32^3 / 32^2, 0.77 px
  at 64^3 / 128^2, against 2.7 px at 128^3 and 256^3 / 256^2) every row stays linear and all
  rows are used: there the motion rows read no better (64^3) or over-read (32^3: slope
  1.14 against 0.98). :func:`row_terms` gives
  each view's per-row sums, so views rendered in chunks combine before the rows are chosen
  (:func:`shifts_of`);
* :func:`periodogram`: the floating-mean Lomb-Scargle periodogram of the shifts at their
  (unevenly spaced) acquisition times: for each trial period ``P`` the fraction of the
  signal's variance that ``a + b cos(2 pi t / P) + c sin(2 pi t / P)`` explains (in [0, 1]);
* :func:`estimate_period`: its highest peak between ``min_s`` and ``max_s`` seconds on a
  frequency grid oversampled ``OVERSAMPLING`` times the scan's resolution ``1 / span``,
  refined by a parabola through the peak and its neighbours;
* :func:`cycle_offsets`: how regular the breathing is. The signal's mean cycle at the
  period (a ``harmonics``-term Fourier series fitted to all samples) is matched to each
  cycle of the scan (a window of ``CYCLE_WINDOW`` periods around it: offset + scale x the
  mean cycle shifted in time, least squares), and the best shift of each is its phase offset
  (in cycles): constant for strictly periodic breathing, wandering when cycle lengths vary.
  Its standard deviation is :func:`phase_wander`.

The estimate assumes the motion has a component along the detector rows and that the
fundamental dominates the breathing curve's harmonics (true of Lujan's ``sin^(2n)`` curves,
whose first harmonic is 2.5 times the second for ``n = 3``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ..core.errors import RgsInputError

OVERSAMPLING = 8
MIN_PERIOD_S, MAX_PERIOD_S = 1.5, 10.0  # 6 to 40 breaths per minute
CYCLE_HARMONICS = 3  # Fourier terms of the mean cycle (Lujan's sin^(2n) curve has exactly n)
CYCLE_WINDOW = 1.5  # periods of signal matched around each cycle
CYCLE_SHIFTS = 101  # trial shifts of the mean cycle per window, over one period
MOTION_ROW_FRACTION = 0.15  # the share of detector rows whose shift is the surrogate (see the module)
MIN_MOTION_ROWS = 8  # motion rows at the least (small detectors)
LINEAR_SWING_PX = 1.5  # motion rows' shift range (pixels) below which all rows are used (see shifts_of)


class PeriodEstimate(NamedTuple):
    """``period_s`` (s) at the periodogram's peak, ``power`` there (the explained variance
    fraction), and the periodogram itself: ``periods_s`` (F,) and ``powers`` (F,)."""

    period_s: float
    power: float
    periods_s: torch.Tensor
    powers: torch.Tensor


class RowTerms(NamedTuple):
    """Per view and interior row (rows 1 .. H-2), each (N, H - 2) float64: ``correlation``
    ``sum_w r g``, ``gradient`` ``sum_w g^2`` and ``energy`` the residual's coherent energy
    ``sum_w r^2 - W / (W - 1) sum_w (r_{w+1} - r_w)^2 / 2`` (its energy less the white
    noise's, which the column differences measure), with ``r`` the residual (measured -
    reference) and ``g`` the reference's central row difference, summed over the W columns
    (see the module)."""

    correlation: torch.Tensor
    gradient: torch.Tensor
    energy: torch.Tensor

    @classmethod
    def cat(cls, parts: list[RowTerms]) -> RowTerms:
        """The terms of several stacks of views, in order."""
        return cls(*(torch.cat(field) for field in zip(*parts)))


def row_terms(measured: torch.Tensor, reference: torch.Tensor) -> RowTerms:
    """:class:`RowTerms` of ``measured`` (N, H, W) against ``reference`` (N, H, W). Needs H >= 3."""
    if measured.shape != reference.shape or measured.dim() != 3 or measured.shape[1] < 3:
        raise RgsInputError(f"row shifts need two (N, H >= 3, W) stacks of the same shape, got "
                            f"{tuple(measured.shape)} and {tuple(reference.shape)}")
    ref = reference.to(torch.float64)
    grad = (ref[:, 2:] - ref[:, :-2]) / 2
    resid = measured.to(torch.float64)[:, 1:-1] - ref[:, 1:-1]
    energy = (resid * resid).sum(2)
    width = resid.shape[2]
    if width > 1:
        energy = energy - width / (width - 1) * 0.5 * resid.diff(dim=2).square().sum(2)
    return RowTerms((resid * grad).sum(2), (grad * grad).sum(2), energy)


def motion_rows(energy: torch.Tensor, fraction: float = MOTION_ROW_FRACTION) -> torch.Tensor:
    """(R,) bool: the ``fraction`` of the R rows (at least :data:`MIN_MOTION_ROWS`, at most
    all) whose coherent residual ``energy`` (N, R) summed over the views is largest."""
    rows = energy.shape[-1]
    count = min(rows, max(MIN_MOTION_ROWS, round(fraction * rows)))
    chosen = torch.zeros(rows, dtype=torch.bool, device=energy.device)
    chosen[energy.sum(0).topk(count).indices] = True
    return chosen


def shifts_of(terms: RowTerms, fraction: float = MOTION_ROW_FRACTION) -> torch.Tensor:
    """(N,) float64 row shifts (pixels) over the :func:`motion_rows` of ``terms``, or over
    all interior rows where the motion rows' shifts span less than
    :data:`LINEAR_SWING_PX` (5-95 % range: a motion of a pixel or two keeps every row's
    first-order shift linear, and more rows average more noise); 0 for a view whose
    reference has no row gradient there. ``fraction=1`` sums all interior rows."""
    def over(rows: torch.Tensor) -> torch.Tensor:
        num, norm = terms.correlation[:, rows].sum(1), terms.gradient[:, rows].sum(1)
        return torch.where(norm > 0, -num / norm.clamp_min(1e-300), 0.0)

    rows = motion_rows(terms.energy, fraction)
    shifts = over(rows)
    swing = torch.quantile(shifts, 0.95) - torch.quantile(shifts, 0.05) if shifts.numel() > 1 else 0.0
    return shifts if float(swing) >= LINEAR_SWING_PX else over(torch.ones_like(rows))


def row_shifts(measured: torch.Tensor, reference: torch.Tensor,
               fraction: float = MOTION_ROW_FRACTION) -> torch.Tensor:
    """(N,) float64 row shifts (pixels) of ``measured`` (N, H, W) relative to ``reference``
    (N, H, W) over their motion rows (:func:`shifts_of`). Needs H >= 3."""
    return shifts_of(row_terms(measured, reference), fraction)


def periodogram(times_s: torch.Tensor, signal: torch.Tensor, periods_s: torch.Tensor) -> torch.Tensor:
    """(F,) explained-variance fractions of ``signal`` (N,) at ``times_s`` (N,) by a sinusoid
    (plus offset) of each period in ``periods_s`` (F,), float64 on the signal's device
    (scipy's floating-mean Lomb-Scargle, computed on the CPU)."""
    t = times_s.detach().to("cpu", torch.float64).reshape(-1).numpy()
    y = signal.detach().to("cpu", torch.float64).reshape(-1).numpy()
    if t.size != y.size or t.size < 4 or not np.ptp(y) > 0:
        raise RgsInputError("a periodogram needs at least 4 samples, one time each, and a signal that varies")
    from scipy.signal import lombscargle  # here: scipy.signal takes 0.4 s to import (CLI start-up)

    omega = 2 * np.pi / periods_s.detach().to("cpu", torch.float64).reshape(-1).numpy()
    power = lombscargle(t, y, omega, floating_mean=True, normalize="normalize")
    return torch.from_numpy(np.clip(power, 0.0, 1.0)).to(signal.device)


def estimate_period(times_s: torch.Tensor, signal: torch.Tensor, min_s: float = MIN_PERIOD_S,
                    max_s: float = MAX_PERIOD_S) -> PeriodEstimate:
    """The dominant period (s) of ``signal`` (N,) sampled at ``times_s`` (N,) between
    ``min_s`` and ``max_s`` (``max_s`` is capped at half the time span: two cycles at least)."""
    t = times_s.to(torch.float64).reshape(-1)
    span = float(t.max() - t.min()) if t.numel() else 0.0
    max_s = min(max_s, span / 2)
    if not 0 < min_s < max_s:
        raise RgsInputError(f"the projections span {span:.3g} s: a period of {min_s:g} s or more needs "
                            f"at least {2 * min_s:g} s of acquisition to be estimated")
    step = 1.0 / (OVERSAMPLING * span)
    freqs = torch.arange(1.0 / max_s, 1.0 / min_s + step / 2, step, dtype=torch.float64)
    powers = periodogram(t, signal, 1.0 / freqs).cpu()
    k = int(powers.argmax())
    freq = float(freqs[k])
    if 0 < k < len(freqs) - 1:  # vertex of the parabola through the peak and its neighbours
        a, b, c = (float(p) for p in powers[k - 1:k + 2])
        curve = a - 2 * b + c
        if curve < 0:
            freq += step * 0.5 * (a - c) / curve
    return PeriodEstimate(1.0 / freq, float(powers[k]), 1.0 / freqs, powers)


def _cycle_basis(times_s: torch.Tensor, period_s: float, harmonics: int) -> torch.Tensor:
    """(N, 2 K) ``[cos 2 pi k t / P, sin 2 pi k t / P]`` for ``k = 1 .. K``."""
    angle = 2 * torch.pi * times_s[:, None] / period_s * torch.arange(1, harmonics + 1).to(times_s)
    return torch.cat([angle.cos(), angle.sin()], 1)


def cycle_offsets(times_s: torch.Tensor, signal: torch.Tensor, period_s: float,
                  harmonics: int = CYCLE_HARMONICS) -> torch.Tensor:
    """(J,) float64 phase offsets (cycles, in ``[-0.5, 0.5]``) of the J whole cycles of
    ``signal`` (N,) at ``times_s`` (N,) seconds from its mean cycle at ``period_s`` (see the
    module); cycle j is centred at ``t_min + (j + 1/2) period_s``. Needs two whole cycles."""
    t = times_s.to(signal.device, torch.float64).reshape(-1)
    y = signal.to(torch.float64).reshape(-1)
    if not (math.isfinite(period_s) and period_s > 0) or t.numel() != y.numel():
        raise RgsInputError(f"cycle offsets need one time per sample and a positive period, got "
                            f"{t.numel()} times, {y.numel()} samples, period {period_s!r}")
    centres = float(t.min()) + period_s * (torch.arange(int((float(t.max() - t.min())) // period_s),
                                                        dtype=torch.float64, device=t.device) + 0.5)
    if centres.numel() < 2:
        raise RgsInputError(f"the samples span less than two {period_s:.3g} s cycles: "
                            "no cycle-to-cycle comparison")
    design = torch.cat([torch.ones_like(t)[:, None], _cycle_basis(t, period_s, harmonics)], 1)
    coef = torch.linalg.lstsq(design, y[:, None]).solution[1:, 0]          # the mean cycle
    shifts = torch.linspace(-0.5, 0.5, CYCLE_SHIFTS, dtype=torch.float64, device=t.device)
    g = torch.stack([_cycle_basis(t - d * period_s, period_s, harmonics) @ coef for d in shifts])  # (M, N)
    w = ((t[None] - centres[:, None]).abs() <= CYCLE_WINDOW * period_s / 2).to(t)   # (J, N)
    # per window and shift: least squares y ~ a + b g, residual from the weighted sums
    n, sy, syy = w.sum(1, keepdim=True), w @ y[:, None], w @ (y * y)[:, None]
    sg, sgg, sgy = w @ g.T, w @ (g * g).T, w @ (g * y).T                 # (J, M)
    cov_gy, var_g, var_y = sgy - sg * sy / n, sgg - sg * sg / n, syy - sy * sy / n
    b = cov_gy / var_g.clamp_min(1e-300)
    resid = torch.where(b > 0, var_y - b * cov_gy, torch.inf)             # the mean cycle's polarity
    k = resid.argmin(1)
    best = shifts[k]
    inner = (k > 0) & (k < CYCLE_SHIFTS - 1)
    kk = k.clamp(1, CYCLE_SHIFTS - 2)
    r0, r1, r2 = (resid.gather(1, (kk + d)[:, None])[:, 0] for d in (-1, 0, 1))
    curve = r0 - 2 * r1 + r2
    refine = inner & torch.isfinite(curve) & (curve > 0)
    step = float(shifts[1] - shifts[0])
    return torch.where(refine, best + step * 0.5 * (r0 - r2) / torch.where(refine, curve, 1.0), best)


def phase_wander(times_s: torch.Tensor, signal: torch.Tensor, period_s: float) -> float:
    """Standard deviation (cycles) of :func:`cycle_offsets`: about 0 for breathing that keeps
    one period, about a tenth of a cycle for cycle lengths jittered by 10 %."""
    return float(cycle_offsets(times_s, signal, period_s).std())
