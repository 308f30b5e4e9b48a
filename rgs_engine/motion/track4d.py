"""Continuous-time 4D reconstruction (breathing): canonical Gaussians + a learned deformation.

(This module is over 500 lines because this docstring keeps the measurements behind each
default, about 180 lines; the code itself is one class and its recipe, about 420 lines; the
surrogate's maths live in :mod:`rgs_engine.motion.surrogate`.)

X2-Gaussian's scenario: every projection has its own acquisition time (seconds); the
anatomy at any time ``t`` is the canonical radiative Gaussians moved by a deformation model
(:mod:`rgs_engine.motion.deformation`) evaluated at ``t``, and the breathing period is learned.

Two stages, one iteration counter:

1. **static** (``recipe.iterations`` steps): a :class:`~rgs_engine.recon.gaussian.GaussianReconstruction`
   of all projections as if the anatomy were still (FDK or random init, densification): a
   motion-blurred but well-placed set of canonical Gaussians.
2. **deformation** (``iterations`` steps): each step takes a batch of ``recipe.views_per_step``
   views, deforms the canonical Gaussians to each view's time (one deformation call for the
   batch), splats each view with its own deformed set (one splat call for the batch) and
   minimises

       L = L1 + w_ssim (1 - SSIM)                        (normalised projections, recon.gaussian's)
           + w_tv TV3D(canonical field)                   (recon.gaussian's)
           + consistency_weight * periodic_consistency    (time input only)
           + plane_tv_weight * plane TV + time_smoothness_weight * temporal smoothness (K-planes)

   with Adam on the canonical Gaussians (recon.gaussian's schedule over stage 2, times
   ``canonical_lr_factor``), the deformation network (``lr_network``, K-planes' feature planes
   ``lr_planes``) and the log period (``lr_period``); all rates decay log-linearly. The
   Gaussians are not densified in stage 2 (the anchor skinning is fixed per Gaussian).

All randomness comes from the static stage's generator and the models' own seeded state;
checkpoints hold all of it, so a resumed run continues the uninterrupted one (to the
rounding of float atomics in the kernels).

Measured on a CPU toy (``tests/test_track4d.py``: a blob moving 12 mm along z with a 3.5 s
period, 24^3 grid, 60 views of 32^2 over 20 s, 100 static + 200 deformation steps, three
seeds): with time input the period comes out at 3.49-3.52 s from 2.8 s and the mean 3D PSNR
over one cycle beats the static fit by 3.2-5.9 dB (kplanes) and 8.3-8.5 dB (anchors); over
repeated runs of one seed the kplanes gain spread over 1.0-4.7 dB (float atomics; 6 instead
of 12 time cells per initial period: 2.8-4.5 dB in 11 runs, 1.05 dB in a twelfth), and +5.0 dB
in five of five runs when stage 2 starts from the projections' period (below). With
phase input the period stays near 2.8 s (17-20 % off: the data term's basin around the true
period is about 1 / (cycles in the scan) wide) and nothing is gained, so phase input is for
periods known to that precision, e.g. the projections' estimate (below). With an earlier
(octave) time encoding of the anchors the period drifted to 2.44 s when it learned from the
first step, hence ``period_start``.
On an NVIDIA H200, on breathing cases made from the real chest CT by ``rgs simulate4d``
(256^3-class grid, 300 projections of 256^2 over 60 s, 15 mm SI / 5 mm AP, TIGRE noise
1e4 / 10; ``validation/track4d.md``), the earlier default (time input from 2.8 s, 3000
deformation steps; the default now is below) took 2-3 minutes (kplanes 125-163 s,
anchors 105-117 s; rendering each step's batch in one splat call instead of one per view
took kplanes from 180 s): the period comes out within 0.2 % (regular) and 1.3 %
(irregular); the mean per-phase 3D PSNR is 35.9 dB (regular; three runs of the same
recipe gave 34.98, 35.72 and 35.93 dB: float atomics change which Gaussians densify)
against 34.4 dB for the static recipe on the same projections and 36.9 dB for the static
recipe on the CT held still (its ceiling, not the 4D runs': phase input passes it, below).
3000 static + 4000 deformation steps gave 35.58 dB in 187 s. The ceiling itself moves little
with capacity: the static recipe on the still CT gave 37.43 dB with 6000 steps, 37.48 dB
from 150k initial Gaussians and 37.72 dB with both (74 s). Single 4D runs on the regular
case (H200): the default again 34.77 dB; 150k initial Gaussians 36.30 dB (203 s; with 2000
static steps 36.21 dB, 221 s); 6 time cells per initial period 36.23 and 36.16 dB (seed 0,
116 s) but 34.67 dB with seed 1, whose period stayed at 2.83 s; 8 time cells 35.79 dB. None
reaches static + 3 dB (37.4 dB; phase input with 5000 deformation steps does, below) and one
run per setting does not separate them from the default's spread, so none became the default.

**The period from the projections** (:attr:`Track4DReconstruction.period_estimate`, made
when stage 2 starts, reported always and compared with the learned period
(:attr:`~Track4DReconstruction.period_mismatch_pct`); with ``period_from_projections`` also
the period stage 2 starts from): the periodogram of each view's row shift against the static
fit (:meth:`~Track4DReconstruction.row_shifts`, :mod:`rgs_engine.motion.period_estimate`). On the CPU toy (200 deformation steps) the 2.8 s
start only finds periods near it: with a 5 s period kplanes stayed at 2.81 s and anchors
ended at 3.37 s, while from the estimate (5.012 s) they learned 4.997 s (+5.9 dB over the
static fit) and 5.001 s (+8.1 dB); at 3.5 s the estimate (3.505 s) gave +5.0 dB in five of
five kplanes runs, 2.8 s +0.95 to +4.73 dB. On the real CT, though, both starts learn the
period and 2.8 s gave the higher PSNR in each pair. CPU, 48^3 case of a 5 s period (300
projections of 48^2, 300 + 1500 steps): 2.8 s learned 4.996 s (32.26 dB), the estimate
(4.994 s) 5.004 s (32.18 dB). H200, the ``validation/track4d.py`` cases (3.5 s; estimates
3.500 s regular, 3.599 s irregular, whose cycles average 3.576 s): kplanes regular 35.50 vs
35.01 dB (seed 1: 35.24 vs 35.20), irregular 35.18 vs 34.76 dB (period 1.27 vs 0.78 % off),
noiseless 35.68 vs 35.57 dB, from 2.8 s vs the estimate; anchors 35.87 / 35.83 dB from
2.8 s (previous session), 35.82 / 35.89 dB from the estimate. So 2.8 s stays the default, and
a learned period more than :data:`PERIOD_MISMATCH_PCT` % from the estimate is flagged
(``rgs track4d`` prints a warning naming ``--period-init auto``).

**When K-planes starts to move** (H200, the regular case; motion: the largest displacement of
any Gaussian between two times half a cycle apart): its time planes start constant (K-planes'
init) and its heads at zero, so its features carry no time until the planes drift apart, and
the motion starts after a random delay: 9-11 mm of motion after 300-600 stage-2 steps in three
runs, none (0.00 mm) after 900 steps in two others (seed 1, and seed 0 repeated: float atomics
decide; the same seed moved by step 300 in another run), and a run equal to the default up to
step 1200 never moved in 3000 steps (34.37 dB, period 2.8000 s). The anchors' time encoding
enters their tokens additively, so they move from the first step (CPU toy,
:meth:`~Track4DReconstruction.motion_mm`: 1.9 mm after one step; K-planes 0.01 mm after 50). A
late start costs PSNR (the default's spread) and may not end within the recipe, hence
``motion_mm`` in ``rgs track4d``'s metrics and its warning below
:attr:`~Track4DReconstruction.motion_floor_mm`. Time planes started at 1 +- 0.1 did not move
sooner (seed 2: none after 600 steps).

**Phase input started from the projections' estimate** (``time_input="phase"`` with
``period_from_projections``): on the CPU toy it moves within 50 steps (9-12 mm) and gave 36.1
/ 37.3 dB against the default's 31.7 / 34.8 dB (seeds 0, 1; the default with 4 or 2 time cells
per period instead of 12 moved later or never); on the real CT at 48^3 (CPU, 300 projections
of 48^2, 300 + 1000 steps, one run each) it gave 33.34 dB (period 3.5003 s) against 32.37 dB
(3.4962 s) on the regular case, +0.9 to +1.0 dB at every phase, and 32.87 dB (3.5912 s, 2.6 %
from the 3.5 s mean) against 32.40 dB (3.5657 s) on the irregular one, 0.3 dB lower at two
inhale phases, whose cycle-to-cycle changes phase input cannot represent. On the H200 cases
(exp runs of the engine, then ``validation/track4d.py``, one run per line): regular, phase
input from the estimate 37.22 / 37.13 dB (seeds 0, 1; 101 / 99 s of training; 8.2-8.4 mm of
motion) and 37.14 dB in the validation run (131 s whole command), against time input's 35.18
/ 35.36 dB (121 / 127 s) in the same session: +1.9 dB, flat over the phases (37.0-37.5 dB); 24
instead of 12 time cells 37.05 dB; 5000 deformation steps 37.65 dB (207 s of training), static
+3.2 dB. Irregular: 35.54 / 35.49 dB against 35.11 dB, but 1.0-1.3 dB lower at the three
inhale phases and the period 3.602 / 3.606 s, 3.0 % from the 3.5 s mean of the cycle draw (0.8
% from the 3.576 s the scan's cycles average; time input 3.547 s). So phase input suits
breathing that keeps its period, and time input follows free breathing cycle by cycle
(below: the default chooses between them). A stronger periodic consistency does
not pool the cycles in time mode instead: on the real CT at 48^3 (CPU, as above, one run each)
``consistency_weight`` 1 and 10 learned no motion (0.01 / 0.00 mm; periods 3.222 / 2.816 s)
and 32.52 / 32.54 dB, against 8.43 mm, 3.4981 s and 32.49 dB with the default 0.1.

**The default, time input ``auto``, 5000 deformation steps**: surrogate input with K-planes
(below); with anchors, or where no surrogate can be read, phase input (from the
estimate) where the projections' cycles keep their period, time input (from 2.8 s) where
they do not. The measure is the phase wander (:func:`~rgs_engine.motion.period_estimate.phase_wander`,
the standard deviation of the cycles' phase offsets from the projections' mean cycle, in
cycles), made with the period estimate when stage 2 starts: 0.004 / 0.092 on the regular /
irregular real-CT cases at 48^3 (CPU, after 300 static steps), 0.008 / 0.092 on the H200
cases, 0.001 / 0.050 / 0.079 on the CPU toy with a phase drifting by 0 / 0.10 / 0.15 cycles;
hence the :data:`REGULAR_WANDER_CYCLES` of 0.03: cycle lengths jittered by 10 % (the
irregular case's) wander three times as far, and get time input. 5000 instead of 3000
deformation steps: phase input still gained 0.4-0.5 dB there (above); time input did not
gain (4000 steps above; irregular, 5000 steps below against 3000: 34.86 against 35.18 dB,
single runs within its run-to-run spread of about 1 dB). H200, ``validation/track4d.py``
(whole commands): regular
(phase chosen) kplanes 37.58 dB, static + 3.17 dB, period 0.02 % off, 224 s, and in two more
runs (``--seed 1`` / ``2``, same case) 37.60 / 37.62 dB in 203 / 188 s; anchors 36.61 dB
(+2.20), 174 s. Irregular (time chosen): kplanes 34.86 dB (+0.24; period 0.84 % off), 243 s;
anchors 36.31 dB (+1.69; 0.51 %), 217 s.

**Surrogate input** (``time_input="surrogate"``, :mod:`rgs_engine.motion.surrogate`): each
view's breathing phase and relative depth, read from its row shift when stage 2 starts
(analytic signal of the shifts band-passed around the estimated period) and refined by
per-view offsets (``lr_surrogate`` from ``period_start`` on, ``surrogate_weight`` pulling
them back), drive the deformation: phase as the periodic time axis, depth scaling the
offsets. CPU toy (kplanes, 100 + 200 steps, loaded machine, one run): period 3.508 s,
+6.9 dB over the static fit against phase input's 3.501 s and +7.2 dB; corrections 0.005
cycles RMS, depths 0.91-1.07. ``auto`` chooses it for K-planes (when the projections give a
surrogate; else phase or time as above). Measured with ``validation/track4d.py`` against
auto's earlier choice (phase or time): NVIDIA H100, irregular case, kplanes +2.07 dB over the
static fit (36.66 dB, 228 s) against +0.24 dB (time input, H200) and anchors' +1.69 dB;
amplitude-drift +2.76 dB (37.55 dB), baseline-shift +2.26 dB (37.46 dB), periods 0.06 / 0.04 %
off (auto's earlier choice was not run on those two at that size). CPU (``--cpu``, 32^3, all
four cases, one run each): +0.27 / +0.23 / +0.31 / +0.43 dB (amplitude-drift, baseline-shift,
irregular, regular) against phase / time input's +0.21 / +0.14 / +0.17 / +0.35 dB. The regular
case at full size (H100): +2.86 dB (37.29 dB, period 0.04 % off, 246 s), where phase input
gave +3.15 dB on the H200 (37.58 dB, 224 s).
**The refinement's rates** (``surrogate_weight`` 0.01, ``lr_surrogate`` 1e-2 to 1e-3; 1 and
1e-3 to 1e-4 until 2026-12-07, which left every view's depth and phase at the measurement to
0.001): the measured depth carries a gain that follows the gantry angle (row shift per mm of
diaphragm motion 3.7-4.4 over the turn, a 180 degree period; CPU, 128^3, 300 views of 256^2),
which the free offsets take out: on the regular case (constant true depth) the refined depth's
rms log error against the simulation fell from 0.052 to 0.007. NVIDIA H100, one run each,
``validation/track4d.py``: regular 38.13 dB (+3.71 over the static fit), amplitude-drift 38.10
(+3.31), baseline-shift 38.08 (+2.88), irregular 36.82 (+2.23), against 37.60 / 37.79 / 37.73 /
36.74 dB with the old rates (the first three before the motion rows of
:mod:`~rgs_engine.motion.period_estimate`). CPU, 64^3 with 300 views of 64^2 (300 + 1000
steps): irregular 34.58 against 33.57 dB, regular 34.71 against 34.69 dB. Freer still
(weight 0.001, rates 2e-2 to 2e-3): irregular 37.37 dB (+2.78) but its inhale phases 1.26 dB
under the exhale ones (0.88 at 0.01); baseline-shift 37.83 dB, 0.25 under the default.
Against ``rgs recon`` re-run on the same projections on 2026-12-07 (0.18-0.27 dB above the
static fits quoted here) the default's margins are +3.50 / +3.10 / +2.61 / +2.05 dB (a second
irregular run the same day: 36.66 dB, +1.89). ``recipe.rate_scale=1.5`` alone: +0.50 dB at 64^3
(300 + 1000 steps), -0.04 / -0.14 / -0.06 dB at full size (regular, amplitude-drift, irregular),
and -0.30 dB at 64^3 with this recipe's 1000 + 5000 steps (34.01 against 34.31 dB; 300 + 1000
steps with the rates: 35.08). On an H100 at 64^3 / 128^3 (``validation/track4d.py --grid N``)
300 + 1000 steps with the rates beat these steps on irregular breathing (34.98 / 35.91 against
33.98 / 35.36 dB) and lost on regular breathing (35.20 / 35.99 against 35.55 / 36.71): what the
long schedule overfits is irregular motion, at any grid, so these steps stay.
Anchors keep the phase / time choice: surrogate input with anchors is unmeasured.

**The static stage's count follows the data** (``recipe.pixels_per_gaussian``,
:data:`STATIC_PIXELS_PER_GAUSSIAN`): one initial Gaussian per 131 measured pixels, the ratio
of ``rgs recon``'s 50k Gaussians at 25 views of 512^2, where that passes the automatic 50k
(grids above about 100^3; at most one per 20 voxels): 150k at the validation cases' 300
projections of 256^2, unchanged at the CPU sizes. NVIDIA H100, ``validation/track4d.py``
(one run each, 2026-12-06): with ``--set recipe.num_init=150000`` regular 37.53 dB (+3.10 over
the static fit), irregular 36.93 (+2.34), amplitude-drift 37.78 (+2.99), baseline-shift 37.62
dB (+2.42), each +0.16 to +0.27 dB over the 50k default's row, in 124-128 s; 250k gave 37.62 /
37.61 dB on the two drift cases (no further gain, 159-161 s). The rule as the default: 37.79
(+3.00), 37.73 (+2.53) and 36.91 dB (+2.32) on amplitude-drift, baseline-shift and irregular
in 124-131 s. ``rgs recon``'s static recipe keeps it off: at 25 views, 100k / 150k Gaussians
lost 0.11 / 0.19 dB (``validation/levers.md``).

**The surrogate's baseline** (``surrogate_baseline``, off by default): the end-exhale level
of the row shifts (:class:`~rgs_engine.motion.surrogate.Surrogate`'s ``exhale``, relative to
the median amplitude) times a learned displacement field on a 16^3 grid
(:class:`~rgs_engine.motion.deformation.Deformation`), added to the phase-and-depth motion:
a drift of the resting position, which depth scaling cannot represent. CPU, the toy of
``tests/test_track4d.py`` with the mean position drifting 16 mm over the scan (100 + 200
steps, mean PSNR at 9 times over the scan): +1.06 / +1.22 / +1.32 dB (seeds 1-3; seed 0
+0.56), and -0.16 / -0.21 dB without a drift; the earlier mean-level baseline (the one-period
moving average) gained more there (+1.75 to +1.95 dB) but lost 0.70 dB on the irregular
real-CT case at 32^3 (28.63 against 29.30-29.33 dB), where deeper breaths raise the mean
level, hence the end-exhale level. Real CT (``validation/track4d.py --cpu``, 32^3, one run
each, a 3-period window then): 29.26 / 29.41 / 29.36 / 29.29 dB (irregular, baseline-shift,
amplitude-drift, regular) against the default's 29.30-29.33 / 29.44 / 29.44 / 29.34 dB; at
64^3 (300 projections of 64^2, 300 + 1000 steps, baseline-shift) 34.86 dB against 34.80 dB.
There the 4.5 mm drift is under a voxel. At full size (``validation/track4d.md``'s variants,
H200, one run each): baseline-shift 37.92 dB (+2.72 over static) against the default's 37.73
(+2.54, H100), but irregular 36.48 dB (+1.89, period 2.92 % off the draw's 3.5 s) against
36.91 (+2.32): the deeper breath's end-exhale level is read as a drift. So it stays off.
With the refinement's rates of 2026-12-07 the toy's drift is followed without it (40.25 dB
without, 40.17 with; 34.92 / 35.64 dB at the rates before).

**Densifying in stage 2** by the deformed renderings' position gradients (recon.gaussian's clone /
split rules) was measured and left out: anchors 35.76 dB (5 rounds of 10 % over 5-50 % of
stage 2) and 35.60 dB (3 rounds over 40-70 %) against 35.87 dB without, and each round cut
K-planes' PSNR at the inhale phase by 4 dB (35.36 to 31.19), 150 steps recovering 3.75 dB of
it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from ..core import losses, runtime, stats
from ..core.adam import Adam
from ..core.errors import RgsInputError
from ..core.geometry import Geometry, VolumeGrid
from ..core.splatting import splat
from ..core.voxelization import voxelize
from ..io.projections import ProjectionData
from ..recon.gaussian import (
    GaussianReconstruction,
    GSConfig,
    Recipe,
    gather_rows,
    load_state,
    save_state,
    to_cpu,
)
from .deformation import (
    TIME_INPUTS,
    AnchorDeformation,
    Deformation,
    KPlanesField,
    periodic_consistency,
)
from .period_estimate import PeriodEstimate, RowTerms, estimate_period, phase_wander, row_terms, shifts_of
from .surrogate import SurrogateDrive, measure_surrogate

DEFORMATIONS = ("kplanes", "anchors")
TIME_INPUT_CHOICES = (*TIME_INPUTS, "auto")
REGULAR_WANDER_CYCLES = 0.03  # auto: phase input when the cycles keep the period this closely
CHECKPOINT_FORMAT = "rgs-track4d"
ESTIMATE_VIEWS_PER_CALL = 32  # views per splat call when rendering all of them for the estimate
PERIOD_MISMATCH_PCT = 5.0  # a learned period further from the projections' estimate is suspect
MOTION_FLOOR_VOXELS = 0.5  # learned motion under this many voxels is no motion (a static fit)
STATIC_PIXELS_PER_GAUSSIAN = 131.0  # rgs recon's ratio at 25 views of 512^2 (50k Gaussians)


def _static_recipe() -> GSConfig:
    """The static stage as measured: 1000 steps, densification on (4 rounds) and the rates
    without ``rate_scale`` (rgs recon's recipe changed both after these models' measurements;
    its rates gained 0.40-0.57 dB at 64^3 on the CPU with 300 + 1000 steps, but lost 0.30 dB
    there with this recipe's 1000 + 5000 steps and 0.04-0.70 dB at full size,
    ``validation/README.md``); the count follows the data: one initial
    Gaussian per :data:`STATIC_PIXELS_PER_GAUSSIAN` measured pixels where that passes the
    automatic 50k (the module docstring's section on the count: 150k at 300 views of 256^2)."""
    return GSConfig(iterations=1000, densify_rounds=4, rate_scale=1.0,
                    pixels_per_gaussian=STATIC_PIXELS_PER_GAUSSIAN)


@dataclass
class Track4DConfig(Recipe):
    """The 4D recipe. Learning rates are ``(start, end)`` per step, decaying log-linearly.

    * ``deformation``: ``kplanes`` or ``anchors``; ``time_input``: ``time`` (normalised scan
      time + periodic consistency, X2-Gaussian's way), ``phase`` (``frac(t / T)``, periodic
      by construction; see :mod:`rgs_engine.motion.deformation`), ``surrogate`` (each view's
      phase and depth measured from the projections, :mod:`rgs_engine.motion.surrogate`, and
      refined: per-view offsets at ``lr_surrogate`` from ``period_start`` on, pulled back to
      the measurement with ``surrogate_weight``; with ``surrogate_baseline`` also the slow
      drift of the mean position, times a learned displacement field; time input where the
      scan allows no estimate) or ``auto``: chosen when stage 2
      starts, surrogate with K-planes where the projections give one (the module docstring's
      measurements), else phase where the projections show breathing that keeps its period (a phase
      wander of at most :data:`REGULAR_WANDER_CYCLES`, :attr:`Track4DReconstruction.phase_wander`),
      else time.
    * ``iterations``: deformation-stage steps (the static stage runs ``recipe.iterations``).
    * ``period_from_projections``: stage 2 starts the period at the projections' own estimate
      (:attr:`Track4DReconstruction.period_estimate`, made when stage 2 starts), or at
      ``period_init_s`` (X2-Gaussian's 2.8 s) when off or when the scan allows no estimate;
      None: on with phase input (whose period stays near its start), off with time input.
      The models' time resolution counts cells per ``period_init_s`` either way. ``lr_period``
      acts on its logarithm from ``period_start`` (fraction of stage 2) on: before, the motion
      is not yet learned and the period's gradient is noise (1: the period stays fixed).
    * ``lr_network`` (MLP / transformer), ``lr_planes`` (K-planes' feature planes);
      ``canonical_lr_factor`` scales recon.gaussian's schedule for the canonical Gaussians in stage 2.
    * loss weights: ``consistency_weight``, ``plane_tv_weight``, ``time_smoothness_weight``
      (the SSIM and 3D TV weights and the batch size are the recipe's); the consistency
      is evaluated on ``consistency_points`` random canonical Gaussians per step (0: all).
    * K-planes: ``kplanes_resolution`` spatial cells per axis at level 1, ``kplanes_multires``
      level multipliers, ``kplanes_time_cells`` time cells per initial period (over the scan
      window in time mode: ``ceil(cells x window / period_init_s)``), ``kplanes_features``
      channels per plane, ``kplanes_hidden`` MLP width.
    * anchors: ``anchors`` count, ``anchor_k`` nearest anchors per Gaussian, transformer
      ``anchor_width`` / ``anchor_heads`` / ``anchor_layers``, ``anchor_mask_ratio`` of
      anchor tokens hidden per training step, ``anchor_time_harmonics`` time-encoding
      harmonics per initial period (over the scan window in time mode: ``ceil(harmonics x
      window / period_init_s)``).
    * ``recipe``: the static stage's :class:`~rgs_engine.recon.gaussian.GSConfig` (its seed seeds
      everything).
    """

    NAME = "4D"

    deformation: str = "kplanes"
    time_input: str = "auto"
    iterations: int = 5000
    period_init_s: float = 2.8
    period_from_projections: bool | None = None
    lr_period: tuple[float, float] = (1e-2, 1e-3)
    lr_surrogate: tuple[float, float] = (1e-2, 1e-3)
    surrogate_weight: float = 0.01
    surrogate_baseline: bool = False
    period_start: float = 0.2
    lr_network: tuple[float, float] = (2e-3, 2e-4)
    lr_planes: tuple[float, float] = (2e-2, 2e-3)
    canonical_lr_factor: float = 1.0
    consistency_weight: float = 0.1
    consistency_points: int = 4096
    plane_tv_weight: float = 1e-3
    time_smoothness_weight: float = 1e-2
    kplanes_resolution: int = 32
    kplanes_multires: tuple[int, ...] = (1, 2)
    kplanes_time_cells: int = 12
    kplanes_features: int = 32
    kplanes_hidden: int = 64
    anchors: int = 256
    anchor_k: int = 8
    anchor_width: int = 64
    anchor_heads: int = 4
    anchor_layers: int = 2
    anchor_mask_ratio: float = 0.25
    anchor_time_harmonics: int = 4
    recipe: GSConfig = field(default_factory=_static_recipe)

    def __post_init__(self) -> None:
        if self.deformation not in DEFORMATIONS:
            raise RgsInputError(f"deformation must be kplanes or anchors, got {self.deformation!r}")
        if self.time_input not in TIME_INPUT_CHOICES:
            raise RgsInputError(f"time input must be time, phase, surrogate or auto, got {self.time_input!r}")
        if isinstance(self.recipe, dict):
            self.recipe = GSConfig.from_dict(self.recipe)
        if not isinstance(self.surrogate_baseline, bool):
            raise RgsInputError(f"surrogate_baseline must be true or false, got {self.surrogate_baseline!r}")
        if self.iterations < 0 or not (math.isfinite(self.period_init_s) and self.period_init_s > 0):
            raise RgsInputError("need iterations >= 0 and a positive initial period (s)")
        if min(self.consistency_weight, self.plane_tv_weight, self.time_smoothness_weight, self.surrogate_weight,
               self.canonical_lr_factor, self.consistency_points) < 0 or not 0 <= self.period_start <= 1:
            raise RgsInputError("loss weights, consistency_points and the canonical learning-rate "
                                "factor must be >= 0, period_start in [0, 1]")
        self.kplanes_multires = tuple(int(m) for m in self.kplanes_multires)
        self._rates_as_floats()

    @property
    def total_iterations(self) -> int:
        """Both stages' steps."""
        return self.recipe.iterations + self.iterations


class Track4DReconstruction:
    """A 4D reconstruction of ``projections`` (N, H, W) line integrals taken by the N views of
    ``geometry`` at ``times_s`` (N,) seconds, on ``grid`` (mm).

    :meth:`step` runs one step of the current stage; :meth:`volume_at` / :meth:`phases` give
    volumes (1/mm) at any time; :attr:`period_s` is the learned period (the initial one during
    the static stage). ``static`` is the stage-1 :class:`GaussianReconstruction`, whose
    Gaussians are the canonical set; ``model`` the deformation (None during stage 1);
    :attr:`time_input` what the model sees (None while ``auto`` is undecided).
    """

    def __init__(self, projections: torch.Tensor, geometry: Geometry, grid: VolumeGrid,
                 times_s: torch.Tensor, config: Track4DConfig | None = None,
                 _initialise: bool = True):
        self.config = config or Track4DConfig()
        self.data = ProjectionData(projections, geometry, grid, time=torch.as_tensor(times_s).cpu(),
                                   source="track4d")
        times = self.data.time
        self.time_range = (float(times.min()), float(times.max()))
        if not self.time_range[1] > self.time_range[0]:
            raise RgsInputError("all projections have the same time: a 4D reconstruction needs "
                                "projections taken at different times")
        self.grid = grid
        self.iteration = 0
        self.device = runtime.ensure()
        self.times = times.to(self.device)
        recipe = self.config.recipe.motion_start(self.data.is_circular)
        self.static = GaussianReconstruction(self.data, recipe) if _initialise else None
        self.model: Deformation | None = None
        self.optimizer: Adam | None = None
        self.period_estimate: PeriodEstimate | None = None
        self.phase_wander: float | None = None
        self.surrogate: SurrogateDrive | None = None  # measured when stage 2 starts (surrogate input)
        self.time_input: str | None = None if self.config.time_input == "auto" else self.config.time_input

    # ---- the deformation model -----------------------------------------------------------
    def row_shifts(self) -> torch.Tensor:
        """(N,) float64: each view's row shift (pixels) against the current static Gaussians'
        rendering over the motion rows of all views, the breathing surrogate of
        :mod:`rgs_engine.motion.period_estimate`."""
        terms = []
        for chunk in torch.arange(self.data.num_views).split(ESTIMATE_VIEWS_PER_CALL):
            reference = self.static.render(self.data.geometry.subset(chunk))
            terms.append(row_terms(self.data.projections[chunk].to(self.device), reference))
        return shifts_of(RowTerms.cat(terms))

    def _read_breathing(self) -> None:
        """Set :attr:`period_estimate` and :attr:`phase_wander` (the standard deviation,
        cycles, of the scan's cycles' phase offsets at the estimated period,
        :func:`~rgs_engine.motion.period_estimate.phase_wander`), each None where the data allow
        none (a scan shorter than two of the shortest periods or two estimated ones, no
        motion seen); stage 2 then starts from ``period_init_s``."""
        shifts = self.row_shifts()
        with contextlib.suppress(RgsInputError):
            self.period_estimate = estimate_period(self.data.time, shifts)
            self.phase_wander = phase_wander(self.data.time, shifts, self.period_estimate.period_s)
        if self.period_estimate is not None and self._wants_surrogate:
            with contextlib.suppress(RgsInputError):
                measured = measure_surrogate(self.data.time, shifts, self.period_estimate.period_s)
                self.surrogate = SurrogateDrive(self.data.time, measured.phase,
                                                measured.amplitude.clamp_min(1e-6 * float(measured.amplitude.max())),
                                                measured.exhale if self.config.surrogate_baseline else None)

    @property
    def _wants_surrogate(self) -> bool:
        """Whether stage 2 measures the surrogate: surrogate input, or ``auto`` with K-planes."""
        cfg = self.config
        return cfg.time_input == "surrogate" or (cfg.time_input == "auto" and cfg.deformation == "kplanes")

    def _choose_time_input(self) -> str:
        """``config.time_input``; for ``auto`` surrogate input with K-planes where the
        projections give a surrogate, else phase where :attr:`phase_wander` is at most
        :data:`REGULAR_WANDER_CYCLES`, else time."""
        if self.surrogate is not None:
            return "surrogate"
        if self.config.time_input == "surrogate":
            return "time"
        if self.config.time_input != "auto":
            return self.config.time_input
        regular = self.phase_wander is not None and self.phase_wander <= REGULAR_WANDER_CYCLES
        return "phase" if regular else "time"

    @property
    def period_from_projections(self) -> bool:
        """Whether stage 2 starts the period at the estimate (when there is one): the config's
        choice, by default with phase input."""
        chosen = self.config.period_from_projections
        return self.time_input in ("phase", "surrogate") if chosen is None else chosen

    @property
    def initial_period_s(self) -> float:
        """The period stage 2 starts from (s): the estimate's or ``config.period_init_s``."""
        if self.period_from_projections and self.period_estimate is not None:
            return self.period_estimate.period_s
        return self.config.period_init_s

    def _build_model(self) -> None:
        """Create the deformation model (seeded by the recipe's seed) and its optimiser."""
        cfg = self.config
        lo, hi = self.static.box_lo.cpu(), self.static.box_hi.cpu()
        if self.time_input == "surrogate" and self.surrogate is None:  # resuming: the checkpoint fills it
            self.surrogate = SurrogateDrive.placeholder(self.data.time, self.config.surrogate_baseline)
        common = {"box_lo": lo, "box_hi": hi, "time_range": self.time_range, "period_s": self.initial_period_s,
                      "time_input": self.time_input,
                      "surrogate": self.surrogate if self.time_input == "surrogate" else None}
        # initial periods per time unit of the models: the scan window (time) or one cycle
        cycles = 1.0 if self.time_input != "time" else \
            (self.time_range[1] - self.time_range[0]) / cfg.period_init_s
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.recipe.seed)
            if cfg.deformation == "kplanes":
                model = KPlanesField(**common, resolution=cfg.kplanes_resolution,
                                     time_resolution=max(4, math.ceil(cfg.kplanes_time_cells * cycles)),
                                     multires=cfg.kplanes_multires, features=cfg.kplanes_features,
                                     hidden=cfg.kplanes_hidden)
            else:
                model = AnchorDeformation(self.static.gaussians.means.detach().cpu(), **common,
                                          num_anchors=cfg.anchors, k=cfg.anchor_k,
                                          width=cfg.anchor_width, heads=cfg.anchor_heads,
                                          layers=cfg.anchor_layers, mask_ratio=cfg.anchor_mask_ratio,
                                          time_harmonics=math.ceil(cfg.anchor_time_harmonics * cycles),
                                          seed=cfg.recipe.seed)
        self.model = model.to(self.device)
        groups = [{"params": params, "name": name} for name, params in model.param_groups().items()]
        self.optimizer = Adam(groups, lr=0.0)

    def _set_lrs(self, frac: float) -> None:
        cfg = self.config
        rates = {"network": cfg.lr_network, "planes": cfg.lr_planes}
        late = {"period": cfg.lr_period, "surrogate": cfg.lr_surrogate}  # from period_start on
        for group in self.optimizer.param_groups:
            if group["name"] in late:
                started = cfg.period_start < 1 and frac >= cfg.period_start
                group["lr"] = losses.log_linear(
                    late[group["name"]], (frac - cfg.period_start) / (1 - cfg.period_start)) if started else 0.0
            else:
                group["lr"] = losses.log_linear(rates[group["name"]], frac)
        self.static.set_learning_rates(frac, cfg.canonical_lr_factor)

    @property
    def stage(self) -> str:
        """``"static"`` or ``"deformation"``: the stage the next step belongs to."""
        return "static" if self.iteration < self.config.recipe.iterations else "deformation"

    @property
    def period_s(self) -> float:
        """The current breathing period estimate, seconds (with surrogate input the mean
        period of the refined surrogate phase)."""
        return float(self.model.period_s.detach()) if self.model is not None else self.initial_period_s

    @property
    def period_mismatch_pct(self) -> float | None:
        """How far (%) :attr:`period_s` is from the projections' estimate, None without one;
        above :data:`PERIOD_MISMATCH_PCT` the learned period is suspect."""
        if self.period_estimate is None:
            return None
        return 100 * abs(self.period_s - self.period_estimate.period_s) / self.period_estimate.period_s

    # ---- rendering ---------------------------------------------------------------------
    def _splat(self, params: tuple[torch.Tensor, ...], times: torch.Tensor,
               views: Geometry, validate: bool = True) -> torch.Tensor:
        """(B, H, W) line integrals: view ``b`` of ``views`` sees the canonical Gaussians
        ``params`` (physical) deformed to ``times[b]`` seconds (one deformation call and one
        splat call for the batch); ``validate``: as :func:`splat`'s."""
        deformed = self.model(*params[:3], times)
        return splat(deformed.means, deformed.scales, deformed.quats, params[3], views, validate=validate)

    @contextlib.contextmanager
    def _evaluating(self):
        """No gradients, model in eval mode (no anchor masking), restored afterwards."""
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(training)

    def render(self, geometry: Geometry, times_s) -> torch.Tensor:
        """(V, H, W) line integrals of the V views of ``geometry``, view ``v`` at
        ``times_s[v]`` seconds (the static Gaussians during stage 1)."""
        times = torch.as_tensor(times_s, dtype=torch.float64).reshape(-1).to(self.device)
        if times.numel() != geometry.num_views:
            raise RgsInputError(f"{geometry.num_views} views but {times.numel()} times: give one time per view")
        if self.model is None:
            return self.static.render(geometry)
        with self._evaluating():
            return self._splat(self.static.gaussians.physical(), times, geometry)

    def volume_at(self, t_seconds: float, grid: VolumeGrid | None = None) -> torch.Tensor:
        """(nx, ny, nz) attenuation (1/mm) at time ``t_seconds`` on ``grid`` (default the
        reconstruction grid)."""
        grid = grid if grid is not None else self.grid
        if self.model is None:
            return voxelize(*self.static.physical(), grid)
        with self._evaluating():
            means, scales, quats, densities = self.static.gaussians.physical()
            t = torch.tensor(float(t_seconds), dtype=torch.float64, device=self.device)
            return voxelize(*self.model(means, scales, quats, t), densities, grid)

    def motion_mm(self, times_s) -> float:
        """The size of the learned motion, mm: the 99th percentile over the canonical Gaussians
        of each centre's largest distance from its mean position over the times ``times_s``
        (seconds, e.g. one cycle's phases); 0 before stage 2. Under :attr:`motion_floor_mm`
        the deformation has learned no visible motion: the volumes are a static fit."""
        if self.model is None:
            return 0.0
        times = torch.as_tensor(times_s, dtype=torch.float64).reshape(-1).to(self.device)
        with self._evaluating():
            means, scales, quats, _ = self.static.gaussians.physical()
            moved = self.model(means, scales, quats, times).means          # (T, N, 3)
            distance = (moved - moved.mean(0)).norm(dim=-1).amax(0)
        return float(stats.quantile(distance.float(), 0.99))

    @property
    def motion_floor_mm(self) -> float:
        """:data:`MOTION_FLOOR_VOXELS` of the grid's finest spacing, mm: a :meth:`motion_mm`
        below it is no visible motion."""
        return MOTION_FLOOR_VOXELS * min(self.grid.spacing)

    def phases(self, times_s, grid: VolumeGrid | None = None) -> torch.Tensor:
        """(P, nx, ny, nz) volumes (1/mm) at the P times ``times_s`` (seconds)."""
        return torch.stack([self.volume_at(float(t), grid) for t in torch.as_tensor(times_s).reshape(-1)])

    # ---- one step ------------------------------------------------------------------------
    def _consistency(self, params: tuple[torch.Tensor, ...], times: torch.Tensor) -> torch.Tensor:
        """Periodic consistency at the batch's times on ``consistency_points`` random
        canonical Gaussians (all when 0 or more than there are)."""
        n, k = params[0].shape[0], self.config.consistency_points
        if 0 < k < n:
            index = torch.randperm(n, generator=self.static.generator)[:k].to(self.device)
            return periodic_consistency(self.model, *(p[index] for p in params[:3]), times, index=index)
        return periodic_consistency(self.model, *params[:3], times)

    def step(self) -> dict:
        """One step of the current stage: ``{"loss", "period_s", "gaussians"}`` afterwards
        (loss and period as 0-d device tensors once the motion trains: no host sync per step)."""
        if self.stage == "static":
            out = self.static.step()
            self.iteration += 1
            return {**out, "period_s": self.period_s}
        if self.model is None:
            self._read_breathing()
            self.time_input = self._choose_time_input()
            self._build_model()
        cfg, static = self.config, self.static
        self._set_lrs(min((self.iteration - cfg.recipe.iterations) / max(cfg.iterations - 1, 1), 1.0))
        idx, geo, target, moments = static.batch()
        times = gather_rows(self.times, idx)
        params = static.gaussians.physical()
        pred = self._splat(params, times, geo, validate=False)  # the loop watches the loss
        loss = static.image_loss(pred / static.proj_scale, target, moments)
        loss = loss + static.tv_loss(params)
        if self.time_input == "time" and cfg.consistency_weight > 0:
            loss = loss + cfg.consistency_weight * self._consistency(params, times)
        weights = {"plane_tv": cfg.plane_tv_weight, "time_smoothness": cfg.time_smoothness_weight}
        for name, value in self.model.regularisers().items():
            loss = loss + weights[name] * value
        if self.model.surrogate is not None and cfg.surrogate_weight > 0:
            loss = loss + cfg.surrogate_weight * self.model.surrogate.regulariser()
        static.optimizer.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        static.optimizer.step()
        self.optimizer.step()
        self.iteration += 1
        return {"loss": loss.detach(), "gaussians": len(static.gaussians), "period_s": self.model.period_s.detach()}

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs (CPU tensors)."""
        return {"format": CHECKPOINT_FORMAT, "config": self.config.to_dict(),
                "iteration": self.iteration, "static": self.static.state_dict(),
                "model": None if self.model is None else to_cpu(self.model.state_dict()),
                "period_estimate": None if self.period_estimate is None else tuple(self.period_estimate),
                "phase_wander": self.phase_wander, "time_input": self.time_input,
                "optimizer": None if self.optimizer is None else to_cpu(self.optimizer.state_dict())}

    def save_checkpoint(self, path, force: bool = True) -> None:
        save_state(path, self.state_dict(), force)

    @classmethod
    def load_checkpoint(cls, path, projections: torch.Tensor, geometry: Geometry,
                        grid: VolumeGrid, times_s: torch.Tensor) -> Track4DReconstruction:
        """The run saved at ``path``, on the same data it was started with."""
        state = load_state(path)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise RgsInputError(f"{path}: not an rgs track4d checkpoint: start again without --resume")
        rec = cls(projections, geometry, grid, times_s, Track4DConfig.from_dict(state["config"]),
                  _initialise=False)
        rec.static = GaussianReconstruction.from_state_dict(state["static"], rec.data)
        rec.iteration = int(state["iteration"])
        if state.get("period_estimate") is not None:
            rec.period_estimate = PeriodEstimate(*state["period_estimate"])
        rec.phase_wander, rec.time_input = state.get("phase_wander"), state.get("time_input", rec.time_input)
        if state["model"] is not None:
            rec._build_model()
            rec.model.load_state_dict(state["model"])
            rec.optimizer.load_state_dict(state["optimizer"])
        return rec
