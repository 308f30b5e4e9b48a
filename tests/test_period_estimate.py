"""The breathing period from the projections (rgs_engine.motion.period_estimate)."""
import math

import pytest
import torch

from rgs_engine import RgsInputError
from rgs_engine.motion.period_estimate import (
    MIN_MOTION_ROWS,
    MOTION_ROW_FRACTION,
    RowTerms,
    cycle_offsets,
    estimate_period,
    motion_rows,
    periodogram,
    phase_wander,
    row_shifts,
    row_terms,
    shifts_of,
)


def uneven_times(n: int, span_s: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.sort(torch.rand(n, generator=gen, dtype=torch.float64)).values * span_s


def test_periodogram_of_a_sinusoid_is_one_at_its_period():
    t = uneven_times(200, 40.0)
    y = 3.0 + 2.0 * torch.cos(2 * math.pi * t / 4.0 + 0.7)
    powers = periodogram(t, y, torch.tensor([4.0, 3.0, 5.5], dtype=torch.float64))
    assert float(powers[0]) == pytest.approx(1.0, abs=1e-9)
    assert float(powers[1:].max()) < 0.2


@pytest.mark.parametrize("period_s", [2.0, 3.5, 6.0])
def test_estimate_finds_a_noisy_breathing_curve(period_s):
    """Lujan's sin^6 curve at 300 uneven times over 60 s, noise of 1/3 of its range."""
    t = uneven_times(300, 60.0, seed=1)
    noise = torch.randn(300, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    est = estimate_period(t, torch.sin(math.pi * t / period_s) ** 6 + noise / 3)
    assert abs(est.period_s - period_s) / period_s < 0.01, est.period_s
    assert 0.3 < est.power <= 1 and est.powers.shape == est.periods_s.shape
    assert float(est.periods_s.min()) >= 1.5 - 1e-9 and float(est.periods_s.max()) <= 10 + 1e-9


def test_row_shift_of_a_shifted_image():
    """A smooth blob moved by s rows reads as a shift of s over all rows (first order: to a
    few per cent)."""
    rows = torch.arange(40, dtype=torch.float64)[:, None]
    cols = torch.arange(30, dtype=torch.float64)[None, :]

    def blob(centre_row: float) -> torch.Tensor:
        return torch.exp(-((rows - centre_row) ** 2 + (cols - 15) ** 2) / (2 * 5.0 ** 2))

    shifts = [-0.4, 0.0, 0.25]
    measured = torch.stack([blob(20 + s) for s in shifts] + [torch.ones(40, 30, dtype=torch.float64)])
    reference = torch.stack([blob(20.0)] * 3 + [torch.ones(40, 30, dtype=torch.float64)])
    got = row_shifts(measured, reference, fraction=1.0)
    assert got[:3].tolist() == pytest.approx(shifts, rel=0.05, abs=1e-12)
    assert float(got[3]) == 0.0  # no row gradient: no shift
    # shifts spanning under LINEAR_SWING_PX: the default sums every row as well
    assert torch.equal(row_shifts(measured, reference), got)


def test_motion_rows_keep_a_deep_breath_linear():
    """Small structures (vessels) and a broad dome edge move down by d rows against a
    motion-blurred reference (the views' mean): over all rows the vessels' first-order
    shifts saturate and the deepest breath (10 rows) reads 0.82 of the shallow breaths'
    linear slope; over the motion rows (the dome's band) 0.96."""
    rows = torch.arange(96, dtype=torch.float64)[:, None]
    cols = torch.arange(24, dtype=torch.float64)[None, :]

    def image(d: float) -> torch.Tensor:
        vessels = sum(0.3 * torch.exp(-0.5 * ((rows - (8 + 6 * k + d)) / 0.8) ** 2)
                      * torch.exp(-0.5 * ((cols - (3 + 5 * k) % 24) / 1.5) ** 2) for k in range(8))
        return vessels + torch.sigmoid((rows - (60 + d)) / 2.0).expand(96, 24)

    depth = torch.tensor([0, 0, 0, 0.5, 1, 2, 3, 4, 5, 6, 7, 8, 10], dtype=torch.float64)
    measured = torch.stack([image(float(d)) for d in depth])
    reference = measured.mean(0, keepdim=True).expand_as(measured)

    def deep_over_linear(fraction: float) -> float:
        s = row_shifts(measured, reference, fraction)
        s = s - s[0]
        slope = (s[3:7] / depth[3:7]).mean()
        return float(s[-1] / (slope * depth[-1]))

    assert deep_over_linear(1.0) < 0.87
    assert deep_over_linear(MOTION_ROW_FRACTION) > 0.93
    chosen = motion_rows(row_terms(measured, reference).energy)
    band = torch.nonzero(chosen)[:, 0] + 1  # interior row r is image row r + 1
    assert len(band) == round(MOTION_ROW_FRACTION * 94) and 56 <= int(band.min()) and int(band.max()) <= 72


def test_row_terms_combine_over_chunks():
    """Views rendered in chunks give the same shifts as one stack."""
    g = torch.Generator().manual_seed(0)
    measured, reference = torch.rand(6, 12, 5, generator=g), torch.rand(6, 12, 5, generator=g)
    parts = RowTerms.cat([row_terms(measured[:4], reference[:4]), row_terms(measured[4:], reference[4:])])
    assert torch.allclose(shifts_of(parts), row_shifts(measured, reference))
    assert int(motion_rows(torch.rand(3, 20, generator=g)).sum()) == MIN_MOTION_ROWS  # small detectors
    assert bool(motion_rows(torch.rand(3, MIN_MOTION_ROWS - 2, generator=g)).all())


def test_white_noise_has_no_coherent_energy():
    """The coherent energy of a residual that is white noise is about 0 (1 % of its energy
    here), that of a smooth residual about all of it."""
    g = torch.Generator().manual_seed(1)
    reference = torch.zeros(4, 10, 400, dtype=torch.float64)
    noise = torch.randn(4, 10, 400, generator=g, dtype=torch.float64)
    smooth = torch.linspace(0, 1, 400, dtype=torch.float64).expand(4, 10, 400)
    white = row_terms(noise, reference)
    assert float(white.energy.sum().abs()) < 0.05 * float(noise[:, 1:-1].square().sum())
    coherent = row_terms(smooth, reference)
    assert float(coherent.energy.sum()) > 0.99 * float(smooth[:, 1:-1].square().sum())


def lujan(phase: torch.Tensor) -> torch.Tensor:
    """Lujan's breathing curve sin^4 at a phase in cycles."""
    return torch.sin(math.pi * phase) ** 4


@pytest.mark.parametrize("period_s", [3.5, 5.0])
def test_cycle_offsets_of_regular_breathing_are_flat(period_s):
    """300 uneven times over 60 s, noise of a seventh of the curve's range: offsets near 0
    (measured: at most 0.030 / 0.011 cycles, wander 0.011 / 0.007 at 3.5 / 5 s)."""
    t = uneven_times(300, 60.0, seed=3)
    noise = torch.randn(300, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = 2.0 - 0.7 * lujan(t / period_s + 0.3) + noise / 10  # any offset, scale, sign, start phase
    offsets = cycle_offsets(t, y, period_s)
    assert offsets.shape == (int(float(t.max() - t.min()) // period_s),)
    assert float(offsets.abs().max()) < 0.04, offsets
    assert phase_wander(t, y, period_s) < 0.015


def test_cycle_offsets_follow_a_wandering_phase():
    """A phase that drifts by 0.12 sin(2 pi t / 24 s) cycles: each cycle's offset is the drift
    at its centre (to the drift within the cycle; measured 0.021 cycles at most), the wander
    its standard deviation (0.082 against 0.086)."""
    t = uneven_times(300, 60.0, seed=5)
    drift = lambda s: 0.12 * torch.sin(2 * math.pi * s / 24.0)  # noqa: E731
    y = lujan(t / 3.5 + drift(t))
    offsets = cycle_offsets(t, y, 3.5)
    centres = 3.5 * (torch.arange(len(offsets), dtype=torch.float64) + 0.5) + float(t.min())
    expected = -drift(centres)  # a later phase is an earlier cycle
    assert float((offsets - offsets.mean() - (expected - expected.mean())).abs().max()) < 0.03
    assert abs(phase_wander(t, y, 3.5) - float(expected.std())) < 0.01


def test_bad_input():
    with pytest.raises(RgsInputError, match="same shape"):
        row_shifts(torch.zeros(2, 8, 8), torch.zeros(2, 8, 7))
    t = torch.linspace(0, 2.5, 50, dtype=torch.float64)
    with pytest.raises(RgsInputError, match="span 2.5 s"):
        estimate_period(t, torch.sin(t))
    t = torch.linspace(0, 30, 50, dtype=torch.float64)
    with pytest.raises(RgsInputError, match="signal that varies"):
        estimate_period(t, torch.ones(50))
    with pytest.raises(RgsInputError, match="less than two 20 s cycles"):
        cycle_offsets(t, torch.sin(t), 20.0)
    with pytest.raises(RgsInputError, match="positive period"):
        cycle_offsets(t, torch.sin(t), -1.0)
