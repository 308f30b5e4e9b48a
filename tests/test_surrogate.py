"""The respiratory surrogate on toy breathing signals with known depth, pace and baseline."""
import math

import numpy as np
import pytest
import torch

from rgs_engine import RgsInputError
from rgs_engine.motion.surrogate import (
    SurrogateDrive,
    measure_surrogate,
    phase_period_s,
)

PERIOD_S, DT, VIEWS = 3.5, 0.2, 300  # 300 views over 60 s, like the validation cases
TIMES = torch.arange(VIEWS, dtype=torch.float64) * DT
INNER = (TIMES > 2 * PERIOD_S) & (TIMES < TIMES[-1] - 2 * PERIOD_S)  # away from the scan's ends


def lujan(phase: np.ndarray) -> np.ndarray:
    """Lujan's ``sin^4`` breathing curve of a phase in cycles: its fundamental has amplitude 1/2."""
    return np.sin(np.pi * (phase % 1.0)) ** 4


def detrended(phase: torch.Tensor, truth: np.ndarray) -> np.ndarray:
    """The phase error (cycles) once the arbitrary phase origin is removed."""
    error = phase.numpy() - truth
    return error - error[INNER.numpy()].mean()


def test_depth_drifting_30_percent():
    # measured: relative amplitude within 0.4 % of the truth inside, 5 % at the ends
    depth = 1 - 0.3 * TIMES / TIMES[-1]
    signal = 4.0 * depth * torch.from_numpy(lujan(TIMES.numpy() / PERIOD_S))
    s = measure_surrogate(TIMES, signal, PERIOD_S)
    ratio = s.amplitude / (2.0 * depth)
    assert float((ratio[INNER] - 1).abs().max()) < 0.02, ratio
    assert float((ratio - 1).abs().max()) < 0.1
    assert float(np.abs(detrended(s.phase, TIMES.numpy() / PERIOD_S)[INNER.numpy()]).max()) < 0.01
    assert math.isclose(float(phase_period_s(TIMES, s.phase)), PERIOD_S, rel_tol=2e-3)
    drive = SurrogateDrive(TIMES, s.phase, s.amplitude)
    _, amplitude = drive(TIMES)
    amplitude = amplitude.detach()
    assert math.isclose(float(amplitude[INNER][0] / amplitude[INNER][-1]),
                        float(depth[INNER][0] / depth[INNER][-1]), rel_tol=0.02)


def test_cycle_length_changing_from_3_5_to_4_5_s():
    # measured: 3.5003 / 4.4990 s over the two halves, phase within 0.016 cycles
    t = TIMES.numpy()
    truth = np.where(t < 30, t / 3.5, 30 / 3.5 + (t - 30) / 4.5)
    s = measure_surrogate(TIMES, torch.from_numpy(lujan(truth)), 4.0)
    assert float(np.abs(detrended(s.phase, truth)[INNER.numpy()]).max()) < 0.03
    for (lo, hi), period in (((5, 25), 3.5), ((35, 55), 4.5)):
        part = (TIMES > lo) & (TIMES < hi)
        assert math.isclose(float(phase_period_s(TIMES[part], s.phase[part])), period, rel_tol=0.005)
    # one period for all would be off by half a cycle at the ends: the phase follows each pace
    assert np.ptp(detrended(s.phase, t / 4.0)) > 0.5


def test_the_simulators_irregular_breathing_and_its_deep_breath():
    """The validation's irregular case (seed 0: jittered cycles of 3.06-4.24 s, peaks 0.50-0.85
    and one deep breath of peak 1, the cycle the ground-truth phases sample): each view's
    relative depth and phase in its cycle, from the clean breathing curve."""
    # measured: the deep breath's mean relative depth 1.498 against 1.522 (1.6 % under), log
    # error rms 0.067 over all views; phase error within each cycle at most 0.034 cycles
    from rgs_engine.sim.breathing import breathing_amplitude, breathing_cycles

    starts, peaks = breathing_cycles(float(TIMES[-1]), PERIOD_S, irregular=True, seed=0)
    cycle = np.searchsorted(starts, TIMES.numpy(), side="right") - 1
    deep = int(np.argmax(peaks))
    truth_depth = peaks[cycle] / np.median(peaks[cycle])
    s = measure_surrogate(TIMES, breathing_amplitude(TIMES, PERIOD_S, irregular=True, seed=0), 3.6)
    depth = s.amplitude.numpy() / np.median(s.amplitude.numpy())
    assert abs(depth[cycle == deep].mean() / truth_depth[cycle == deep].mean() - 1) < 0.03
    assert float(np.sqrt(np.mean(np.log(depth / truth_depth) ** 2))) < 0.1
    within = (TIMES.numpy() - starts[cycle]) / (starts[cycle + 1] - starts[cycle])
    def wrapped(cycles):  # to (-1/2, 1/2]
        return np.angle(np.exp(2j * np.pi * cycles)) / (2 * np.pi)

    error = wrapped(s.phase.numpy() - within)
    error = wrapped(error - wrapped(np.angle(np.exp(2j * np.pi * error).mean()) / (2 * np.pi)))
    assert float(np.abs(error[INNER.numpy()]).max()) < 0.05


def test_baseline_shift():
    # the end-exhale level drifts by 2 pixels (a third of the breath) over the scan: measured
    # in the baseline to 0.06 pixels inside, and the amplitude stays 3 pixels within 1 %
    drift = 2.0 * TIMES / TIMES[-1]
    signal = 6.0 * torch.from_numpy(lujan(TIMES.numpy() / PERIOD_S)) + drift
    s = measure_surrogate(TIMES, signal, PERIOD_S)
    expected = drift + 6.0 * 3 / 8  # the sin^4 curve's mean is 3/8
    assert float((s.baseline - expected)[INNER].abs().max()) < 0.1
    assert float((s.amplitude[INNER] / 3.0 - 1).abs().max()) < 0.02
    assert math.isclose(float(phase_period_s(TIMES, s.phase)), PERIOD_S, rel_tol=2e-3)


def test_the_end_exhale_level_follows_the_resting_position_only():
    # sin^4 breathing rests at 0 (end-exhale): a drift of the resting position moves the
    # exhale level with it (to 0.1 pixels inside), a breath of falling depth or cycles of
    # jittered depth do not (the mean level B moves with them)
    breath = torch.from_numpy(lujan(TIMES.numpy() / PERIOD_S))
    drift = 2.0 * TIMES / TIMES[-1]
    shifted = measure_surrogate(TIMES, 6.0 * breath + drift, PERIOD_S)
    assert float((shifted.exhale - drift)[INNER].abs().max()) < 0.1
    depth = 1 - 0.3 * TIMES / TIMES[-1]
    shallower = measure_surrogate(TIMES, 6.0 * depth * breath, PERIOD_S)
    assert float(shallower.exhale[INNER].abs().max()) < 0.05
    assert float(shallower.baseline[INNER].max() - shallower.baseline[INNER].min()) > 0.4
    cycle = torch.floor(TIMES / PERIOD_S).long()
    peaks = 1 + 0.3 * torch.randn(int(cycle.max()) + 1, generator=torch.Generator().manual_seed(0),
                                  dtype=torch.float64)
    jittered = measure_surrogate(TIMES, 6.0 * peaks[cycle] * breath, PERIOD_S)
    assert float(jittered.exhale[INNER].abs().max()) < 0.05
    # breathing that rests at its top (a flipped sign of the row shift) is read from above
    flipped = measure_surrogate(TIMES, -6.0 * breath - drift, PERIOD_S)
    assert float((flipped.exhale + drift)[INNER].abs().max()) < 0.1


def test_uneven_unsorted_views_and_noise():
    gen = torch.Generator().manual_seed(0)
    times = TIMES + 0.05 * torch.rand(VIEWS, generator=gen, dtype=torch.float64)
    order = torch.randperm(VIEWS, generator=gen)
    signal = torch.from_numpy(lujan(times.numpy() / PERIOD_S)) + 0.05 * torch.randn(VIEWS, generator=gen,
                                                                                     dtype=torch.float64)
    s = measure_surrogate(times[order], signal[order], PERIOD_S)
    assert math.isclose(float(phase_period_s(times[order], s.phase)), PERIOD_S, rel_tol=5e-3)
    inner = INNER[order]
    assert float((s.amplitude[inner] / 0.5 - 1).abs().max()) < 0.15


def test_drive_interpolates_refines_and_bins():
    truth = TIMES / PERIOD_S
    drive = SurrogateDrive(TIMES.flip(0), truth.flip(0), torch.full((VIEWS,), 2.0))
    at = torch.tensor([0.1, 10.0, float(TIMES[-1]) + PERIOD_S], dtype=torch.float64)
    phase, amplitude = drive(at)
    assert torch.allclose(phase, at / PERIOD_S)  # interpolated, and continued beyond the last view
    assert torch.allclose(amplitude, torch.ones(3, dtype=torch.float64))  # relative to the median
    assert math.isclose(float(drive.period_s), PERIOD_S, rel_tol=1e-9)
    assert float(drive.regulariser()) == 0.0
    bins = drive.bin_times(10, 30.0)  # the cycle containing 30 s: 8 to 9 cycles, 28 to 31.5 s
    assert torch.allclose(bins, 28.0 + (torch.arange(10, dtype=torch.float64) + 0.5) * 0.35)
    # the offsets are parameters with gradients through the interpolation
    drive(torch.tensor([10.1], dtype=torch.float64))[0].sum().backward()
    assert drive.phase_offset.grad.abs().sum() > 0
    with torch.no_grad():
        drive.phase_offset.fill_(0.1)
    assert float(drive.regulariser()) == pytest.approx(0.01)


def test_drive_baseline_relative_centred_and_interpolated():
    # a baseline of 1 -> 3 pixels over the scan with 2-pixel amplitudes: relative to the
    # amplitude (/2) and centred on its median (2 pixels)
    drift = 1.0 + 2.0 * TIMES / TIMES[-1]
    drive = SurrogateDrive(TIMES.flip(0), (TIMES / PERIOD_S).flip(0), torch.full((VIEWS,), 2.0), drift.flip(0))
    assert drive.has_baseline
    at = torch.tensor([-5.0, 0.0, float(TIMES[-1]) / 2, float(TIMES[-1]), 1e3], dtype=torch.float64)
    expected = ((1.0 + 2.0 * at.clamp(0, float(TIMES[-1])) / TIMES[-1]) - float(drift.median())) / 2.0
    torch.testing.assert_close(drive.baseline_at(at), expected)  # the ends held beyond the views
    plain = SurrogateDrive(TIMES, TIMES / PERIOD_S, torch.full((VIEWS,), 2.0))
    assert not plain.has_baseline and float(plain.baseline_at(at).abs().max()) == 0.0
    assert SurrogateDrive.placeholder(TIMES, baseline=True).has_baseline
    with pytest.raises(RgsInputError, match="baselines must be finite"):
        SurrogateDrive(TIMES, TIMES, torch.ones(VIEWS), torch.full((VIEWS,), float("nan")))


def test_bad_input():
    with pytest.raises(RgsInputError, match="two periods"):
        measure_surrogate(TIMES[:20], TIMES[:20], PERIOD_S)
    with pytest.raises(RgsInputError, match="positive period"):
        measure_surrogate(TIMES, TIMES, 0.0)
    with pytest.raises(RgsInputError, match="amplitudes"):
        SurrogateDrive(TIMES, TIMES, torch.zeros(VIEWS))
    with pytest.raises(RgsInputError, match="one phase"):
        SurrogateDrive(TIMES, TIMES[:5], torch.ones(VIEWS))
