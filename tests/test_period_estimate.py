"""The breathing period from the projections (rgs_engine.period_estimate)."""
import math

import pytest
import torch

from rgs_engine import RgsInputError
from rgs_engine.period_estimate import estimate_period, periodogram, row_shifts


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
    """A smooth blob moved by s rows reads as a shift of s (first order: to a few per cent)."""
    rows = torch.arange(40, dtype=torch.float64)[:, None]
    cols = torch.arange(30, dtype=torch.float64)[None, :]

    def blob(centre_row: float) -> torch.Tensor:
        return torch.exp(-((rows - centre_row) ** 2 + (cols - 15) ** 2) / (2 * 5.0 ** 2))

    shifts = [-0.4, 0.0, 0.25]
    measured = torch.stack([blob(20 + s) for s in shifts] + [torch.ones(40, 30, dtype=torch.float64)])
    reference = torch.stack([blob(20.0)] * 3 + [torch.ones(40, 30, dtype=torch.float64)])
    got = row_shifts(measured, reference)
    assert got[:3].tolist() == pytest.approx(shifts, rel=0.05, abs=1e-12)
    assert float(got[3]) == 0.0  # no row gradient: no shift


def test_bad_input():
    with pytest.raises(RgsInputError, match="same shape"):
        row_shifts(torch.zeros(2, 8, 8), torch.zeros(2, 8, 7))
    t = torch.linspace(0, 2.5, 50, dtype=torch.float64)
    with pytest.raises(RgsInputError, match="span 2.5 s"):
        estimate_period(t, torch.sin(t))
    t = torch.linspace(0, 30, 50, dtype=torch.float64)
    with pytest.raises(RgsInputError, match="signal that varies"):
        estimate_period(t, torch.ones(50))
