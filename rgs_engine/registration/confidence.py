"""How far a registered pose can be trusted: an error estimate in mm and a success decision
built from several pieces of evidence, not from one similarity threshold.

A right pose is a sharp, isolated maximum of the similarity that both views agree on; a wrong
one is a compromise (a patient who moved between the views: each view alone wants another
pose), a shallow or slanted spot (not converged, a near miss) or an isolated maximum of the
wrong anatomy. :func:`assess` probes the similarity around the pose with poses scored in
batched splats (the views move, the Gaussians stay: a handful of launches) and measures

* ``restart_spread_mm``: ``restarts`` starts perturbed by ``restart_mm`` / ``restart_deg``
  from the pose (and the pose itself) each climb ``polish_steps`` coordinate steps (a
  parabola through the probes at ``+-step`` along each of the 6 axes, ``step_mm`` first, the
  step halving each time); the median, over the perturbed starts that end within
  :data:`RESTART_TOLERANCE` of the pose's own end or above it, of the mean displacement of
  the structure's points between where that start ends and where the pose itself ends (0
  when none does; the median: one restart caught on a ridge does not condemn a right pose; a
  restart that ends lower did not climb back and found no better pose). Right poses come
  back together, wrong ones scatter to poses that score as well or better.
* ``peak_offset_mm``: how far the joint similarity's parabola peak lies from the pose (the
  first probe around the pose; the 6 axes' offsets as a displacement of the structure's
  points), and ``not_maximum``: the axes along which the similarity curves up.
* ``view_disagreement_mm``: each view's own preference. Each view's similarity is scanned
  along each of the 6 axes through the pose (+-:data:`SCAN_MM` mm in :data:`SCAN_STEP_MM` mm
  steps; rotations :data:`SCAN_DEG_PER_MM` degrees per mm); along the axes a view constrains
  (its similarity's range over the scan at least :data:`VIEW_AXIS_FRACTION` of the other
  view's: not its depth axis) and where its maximum beats the pose by at least
  :data:`SCAN_GAIN_FRACTION` of that range, the offset of that maximum; the largest
  displacement of the structure's points under one view's offsets. A pose no single rigid
  motion explains in both views (a patient who moved between the exposures) leaves one view
  wanting to be elsewhere. (Two earlier forms missed moved patients: a parabola per view
  through the probes at the pose, where the view whose peak lies beyond the bell's
  inflection curves up and the axis was dropped; and each view climbing from the pose, which
  stalled on the broad, bumpy superior-inferior profile of the AP view.) The views are also
  scanned along 12 combined directions (:func:`_scan_directions`: a translation with a
  rotation about another axis, 1 mm with :data:`SCAN_DEG_PER_MM` degrees, the tilt that keeps
  anatomy about 115 mm from the structure in place): a view dominated by such anatomy (the
  heart in the AP view of T10) barely sees the structure move along them, so its range there
  is small; it counts from :data:`COMBINED_AXIS_FRACTION` of the other view's range where its
  own peak beats the pose by :data:`COMBINED_GAIN_FRACTION` of its range and the direction's
  translation lies in the view's plane (the view constrains that axis), and the
  displacement under each counting combined peak joins the largest. Measured offline on
  the stored poses of the seed-1 GPU sweep (``validation/registration_design.md``, "Combined
  scans"): it refuses its one flagged wrong pose (a moved-patient T10 pair 6.65 mm off) and 2
  of its 366 flagged right poses (distorted T4). Every scan's range, gain and peak offset per
  view are kept in the evidence (``scans``, directions named by :func:`scan_direction_names`),
  so a counting rule can be re-evaluated offline on the scans of the device that registered
  (``validation/combined_scans_rules.py``).
* ``curvature``: minus the joint similarity's second derivative along each axis at the pose
  (rotations about the X-ray frame's axes through the structure, per rad^2; translations
  along them, per mm^2): how sharply each axis is determined (evidence only).

* ``rival_basin_mm``: with several starts (``register(keep=...)``), the distance to another
  start's basin that scores as well as the lead's (:func:`rival_mm`): the images do not tell
  the two apart; and, from ``register``'s basin check (its global-stage pass repeated around
  the registered pose at the coarsest scale), the distance to a pose that scores above the
  registered one there: the scales disagree on the basin (the larger of the two).
* ``view_shift_mm``: from ``register``, how far the views' own whole-window image shifts
  disagree along the axis they share (:mod:`.consistency`: a patient who moved between the
  exposures); up to :data:`VIEW_SHIFT_MM` it is the right poses' spread and counts for
  nothing, beyond it in full.

``estimated_error_mm`` is the root sum of squares of the spread, the peak offset, the view
disagreement, the rival basin and the view shift beyond its bound. The decision (``success``) needs all of: estimated error <= ``max_error_mm``, a
maximum along every axis, and ``similarity`` >= ``similarity_floor`` (:data:`SIMILARITY_FLOOR`;
below it the images do not show the anatomy at all).

Measured (CPU, real chest CT of ``datasets/fetch_ct.py``, ``validation/registration.py
--size cpu``: 160^2 views of 1.6 mm, vertebra 32 / context 64 voxel fits, T12 / T10 / T8 /
T6). The scan rule was chosen on seed 0 (12 right poses of clean and detector-like images,
8 moved-patient pairs, every trial's per-view scans saved): right poses' own-peak gains on
the axes they constrain stayed under 0.09 of the range, moved patients' superior-inferior
gains were 0.07-0.37; with :data:`SCAN_GAIN_FRACTION` 0.05 and :data:`MAX_ERROR_MM` 1.5, 11
of 12 right poses and 0 of 8 moved patients would be flagged, against 10 of 12 and 3 of 8
with the view climbs (the rule before). Held out (seed 1, ``validation/registration_cpu.md``:
clean, distorted and processed images, other patient, moved patient, far starts): 16 of 18
right poses flagged (estimates 0.6-2.2 mm) and 2 of 18 wrong poses: two moved-patient T10
pairs (6.5 / 7.2 mm from the AP view's pose, estimated 1.1 / 0.3 mm) whose AP view prefers no
other pose along any single axis: its own pose lies 7 mm superior-inferior and 3.3 deg away,
a combined offset that 1-D scans do not reach and its broad superior-inferior profile at this
size does not show. Other-patient and far-start poses were estimated 5-18 mm.
Before (T10 / T12, 160^2 views of 1.2 mm): right poses (mTRE 0.34-1.21 mm; clean and
detector-like) had estimates 0.48-1.80 mm, wrong poses (45-50 mm starts without the global
stage: 56-79 mm off) 2.4-6.4 mm. On the toy of ``tests/test_registration.py`` (64^2 views of
3 mm voxels) right poses 0.2-0.9 mm off are estimated 0.3-2.3 mm: the bound then refuses
some right poses (conservative). The GPU sweep of ``validation/registration.py`` at full
size (NVIDIA H100, 512^2 views of 0.5 mm, vertebra / context fits of 64 / 128 voxels, seed 0,
143 registrations) flagged 0 of 24 wrong poses but only 82 of 119 right ones: the 37 refused
right poses (true mTRE 0.09-1.5 mm, T8 / T6 / T4) fail on ``restart_spread_mm`` 1.0-1.9 mm.
Diagnosed on CPU with ``validation/registration_confidence.py`` (the same X-rays, Gaussians
refitted on CPU, the confidence probe rebuilt at each stored pose: estimates within 0.06 mm of
the GPU's on the 6 trials chosen on, 0.01-0.26 mm on the 10 others): at the 0.67 mm probe pitch the joint similarity is a cusp (it falls linearly,
10-60e-3 per mm along single axes) with a weak, oblique direction (rotation mixed with
translation; curvatures 4-124e-3 per mm^2 at 1 mm, condition ~30). From 3 mm / 3 deg kicks the
4 halving coordinate steps (2, 1, 0.5, 0.25 mm) do not come back: on 4 right trials the
restarts end 0.6-2.5 mm from the pose's own end, all but one with a similarity 1.6-14e-3 below
it (not converged, not another maximum). Climbers tried on T8 / T6 trials (about the same
polish poses): fixed or adaptive steps, damped moves, the pose's Hessian eigenbasis, a line
search: none brought both clean right spreads (1.62 / 1.65 mm) under 1.1 / 1.3 mm; 2 mm / 2 deg
kicks with ``step_mm`` 1.5 did (on 4 right trials 1.32 / 0.86 / 1.03 /
1.19 mm against 1.62 / 1.65 / 1.84 / 1.83 mm; 3 of those 4 flagged, the fourth refused on its
peak offset, 1.6 mm), moved / other patient stayed at 6.3 / 7.8 mm (their view disagreement).
Checked on trials not looked at before: 5 refused right poses (T4 clean / distorted /
processed, T8 and T6 processed) go from 1.62-1.89 mm to 1.01-1.38 mm, all flagged; a flagged
T12 one stays flagged (0.51 mm); wrong poses stay above the bound: moved patient T4 6.31,
T10 2.10 (the sweep's closest, 2.28 stored), other patient T8 8.67, far start T8 3.26 mm. Same
338 scored poses. On the toy of ``tests/test_registration_confidence.py`` (64^2 views of
3 mm voxels, a broader similarity) that setting estimates a 0.63 mm right pose at 2.6 mm, so
the kicks and steps follow the probe pitch: ``register`` passes :func:`for_pitch` (that
setting at full size; the values measured at the CPU size and on the toy there). :data:`MAX_ERROR_MM` is set for no wrong
pose flagged. Re-measured with :func:`for_pitch` (H100, ``validation/registration.md``, 171
registrations): 132 of 146 right poses flagged, 0 of 25 wrong. The 14 refused right poses (13
on detector-like or edge-enhanced images) were estimated 1.53-2.25 mm, mostly on the restart
spread (0.8-1.5 mm) and the peak offset; the closest wrong poses 2.13 mm (a moved patient, its
view disagreement 2.0 mm), 2.68 and 2.73 mm: no bound flags the first without nearly flagging
the others, so the bound stays (the sweep re-run after the speed work, 214 registrations:
154 of 178 right poses flagged, 0 of 36 wrong, the closest 2.17 mm, a moved patient). Re-run on CPU (``validation/registration_confidence.py``), 6
instead of 4 polish steps brought a refused right pose's restarts closer (estimate 1.99 to
1.87 mm; their similarity still 1-6e-3 below the pose's) and left the moved patient at 2.16 mm;
8 restarts raised both (2.11 / 2.30 mm). Held out (the same protocol at full size with seeds 1
and 2, on a CPU; ``validation/registration_design.md``): 1 of 26 wrong poses flagged, a
moved-patient T10 pair 6.45 mm off, estimated 1.02 mm, whose AP view scores its own pose only
0.009 above the registered one (no single-axis scan shows it): this decision does not catch a
patient who moves along a direction one view barely sees. Restarts that end lower than the
pose (:data:`RESTART_TOLERANCE`): on the full-size sweep's refused right poses 79 of 88
restarts ended more than 1e-3 below the pose (they did not climb back), on far starts and
other patients several ended above it. Counting only the restarts that end as high
(H100 sweep, 220 registrations, ``validation/registration_design.md``): 175 of 188 right
poses flagged (166 before), 0 of 32 wrong, the closest wrong pose 2.06 mm (a moved patient,
on its view disagreement; 2.17 before). The price: where no restart ends as high (38 of 188
right and 7 of 32 wrong poses there) the spread is 0, so a sharp, isolated maximum of the
wrong anatomy that the kicked restarts cannot climb back to is left to the view
disagreement, the peak offset and the similarity floor; offline on the held-out runs the rule
lowered the closest wrong estimates by up to 0.5 mm (2.62 to 2.10 mm).

Cost: ``polish_steps`` x (``restarts`` + 1) x 13 + 18 x (2 :data:`SCAN_MM` / :data:`SCAN_STEP_MM`
+ 1) + ``restarts`` + 1 scored poses (499 by default; 343 before the combined scans) in batched
splats, at a detector pooled to about 0.8 mm at the object.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..core import rigid

RESTARTS = 4
RESTART_MM = 3.0
RESTART_DEG = 3.0
POLISH_STEPS = 4
STEP_MM = 2.0  # first probe step: translation mm, rotation STEP_MM / lever arm
VIEW_AXIS_FRACTION = 0.25
SCAN_MM = 12.0  # each view's 1-D scans reach this far along each axis (rotations: SCAN_DEG_PER_MM)
SCAN_STEP_MM = 2.0
SCAN_DEG_PER_MM = 0.5  # rotation scans: degrees per mm of the scan
RESTART_TOLERANCE = 1e-3  # a restart ending this far below the pose's own end or higher counts in the spread
SCAN_GAIN_FRACTION = 0.05  # a view's own peak counts where it beats the pose by this part of its range
COMBINED_AXIS_FRACTION = 0.1  # combined scans: a view counts where its range is this part of the other's ...
COMBINED_GAIN_FRACTION = 0.25  # ... and its own peak beats the pose by this part of its range
MAX_ERROR_MM = 1.5  # the decision's bound on the estimate (module docstring: measurements)
SIMILARITY_FLOOR = 0.3
MAX_POINTS = 2000
RIVAL_SIMILARITY = 0.005  # another start's coarse end scoring within this of the lead's is a rival ...
RIVAL_MM = 2.0  # ... where it lies further than this from the lead's (another basin)
VIEW_SHIFT_MM = 3.0  # the views' shifts along their shared axis may disagree by this much (:mod:`.consistency`)


def for_pitch(pitch_mm: float) -> dict:
    """The restart kicks and the first probe step (``assess`` keywords) for a probe of
    ``pitch_mm`` mm per pixel at the object: :data:`RESTART_MM` / :data:`RESTART_DEG` /
    :data:`STEP_MM` down to 3 x / 3 x / 2.25 x the pitch, where the similarity's peak is
    sharper than those steps. Measured on the full-size trials of the module docstring (probe
    pitch 0.67 mm: 2 mm / 2 deg / 1.5 mm flagged 8 of 9 right poses that 3 / 3 / 2 refused,
    every wrong pose still estimated above 2 mm); at the CPU size (about 1.07 mm) and on the
    tests' toy (coarser) the values stay as they were measured there."""
    return {"restart_mm": min(RESTART_MM, 3.0 * pitch_mm), "restart_deg": min(RESTART_DEG, 3.0 * pitch_mm),
            "step_mm": min(STEP_MM, 2.25 * pitch_mm)}


@dataclass
class Confidence:
    """The decision, the error estimate (mm) and the evidence behind them (JSON-able dict)."""

    success: bool
    estimated_error_mm: float
    evidence: dict


def _moved(matrix: np.ndarray, points: np.ndarray) -> float:
    """Mean distance (mm) ``points`` (N, 3) move under ``matrix`` (4x4)."""
    return float(np.linalg.norm(rigid.apply(matrix, points) - points, axis=1).mean())


def _displacement(xi: np.ndarray, points: np.ndarray, centre: np.ndarray) -> float:
    """Mean distance (mm) ``points`` (N, 3) move under ``D(xi)`` about ``centre``."""
    return _moved(rigid.from_axis_angle(xi[:3], xi[3:], centre), points)


def _pattern(step: np.ndarray) -> np.ndarray:
    """(13, 6) pose vectors: zero, then ``+step_i`` and ``-step_i`` along each axis."""
    out = np.zeros((13, 6))
    for i in range(6):
        out[1 + 2 * i, i] = step[i]
        out[2 + 2 * i, i] = -step[i]
    return out


def _parabola(s: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slopes and curvatures (..., 6) along each axis from scores (..., 13) at :func:`_pattern`."""
    plus, minus, mid = s[..., 1::2], s[..., 2::2], s[..., :1]
    return (plus - minus) / (2 * step), (plus + minus - 2 * mid) / step ** 2


def _climb_moves(s: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Coordinate moves (..., 6) towards each axis' parabola peak from scores (..., 13) at
    :func:`_pattern` (a full ``step`` uphill where the similarity curves up), clipped to +-step."""
    g, h = _parabola(s, step)
    move = np.where(h < 0, -g / np.where(h < 0, h, -1.0), np.sign(g) * step)
    return np.clip(move, -step, step)


def _moved_about(poses, moves: np.ndarray, centre_ct: np.ndarray) -> np.ndarray:
    """Each pose of ``poses`` (K, 4, 4) moved by ``D(move)`` (``moves`` (K, 6)) about its own
    image of ``centre_ct``: (K, 4, 4)."""
    poses = np.asarray(poses, dtype=np.float64)
    centres = np.einsum("kij,j->ki", poses[:, :3, :3], centre_ct) + poses[:, :3, 3]
    return rigid.from_axis_angle(moves[:, :3], moves[:, 3:], centres) @ poses


def _scan_directions() -> np.ndarray:
    """(18, 6) unit pose directions (rotation rad, translation mm in scan units: see
    :data:`SCAN_DEG_PER_MM`) of the views' 1-D scans: the 6 axes, then each translation
    combined with a rotation about another axis, both signs ((t_i +- r_j) / sqrt 2, i != j).
    A combined direction is what a view barely sees when the anatomy that dominates it lies
    off the structure: a shift along one axis with the tilt that keeps anatomy one lever arm
    away in place (the moved-patient pairs of the module docstring)."""
    out = list(np.eye(6))
    for i in range(3):
        for j in range(3):
            if i != j:
                for sign in (1.0, -1.0):
                    d = np.zeros(6)
                    d[3 + i], d[j] = math.sqrt(0.5), sign * math.sqrt(0.5)
                    out.append(d)
    return np.array(out)


def scan_direction_names() -> list[str]:
    """A name per row of :func:`_scan_directions`: an axis (``tz``: translation along the X-ray
    frame's z; ``rx``: rotation about x), or a translation with a signed rotation (``tz-rx``)."""
    axes = ("rx", "ry", "rz", "tx", "ty", "tz")
    names = []
    for d in _scan_directions():
        nz = np.nonzero(d)[0]
        names.append(axes[nz[0]] if len(nz) == 1 else f"{axes[nz[1]]}{'+' if d[nz[0]] > 0 else '-'}{axes[nz[0]]}")
    return names


def _scan_stats(profiles: np.ndarray, offsets_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each view's similarity range over each 1-D scan, the gain of its maximum over the pose
    and the maximum's offset, each (D, V), from ``profiles`` (D, S, V) at ``offsets_mm`` (S,)."""
    span = profiles.max(axis=1) - profiles.min(axis=1)
    gain = profiles.max(axis=1) - profiles[:, int(np.argmin(np.abs(offsets_mm))), :]
    return span, gain, offsets_mm[profiles.argmax(axis=1)]


def _view_counts(span: np.ndarray, gain: np.ndarray, axis_fraction: float = VIEW_AXIS_FRACTION,
                 gain_fraction: float = SCAN_GAIN_FRACTION) -> np.ndarray:
    """Whether each view's own peak along each scanned direction counts, (D, V), from
    :func:`_scan_stats`' ``span`` and ``gain``: where the view constrains the direction (its
    similarity's range over the scan at least ``axis_fraction`` of the other views' largest: a
    view's depth axis does not) and its maximum beats the pose by at least ``gain_fraction`` of
    that range (a real preference, not noise)."""
    return _constrains(span, axis_fraction) & (gain >= gain_fraction * span) & (span > 0)


def _constrains(span: np.ndarray, axis_fraction: float = VIEW_AXIS_FRACTION) -> np.ndarray:
    """(D, V): whether each view's similarity range over a scan (``span`` (D, V)) is at least
    ``axis_fraction`` of the other views' largest (a view's depth axis is not)."""
    views = span.shape[1]
    others = np.stack([np.delete(span, v, axis=1).max(axis=1) if views > 1 else np.zeros(len(span))
                       for v in range(views)], axis=1)
    return span >= axis_fraction * others


def _in_plane(translation_span: np.ndarray) -> np.ndarray:
    """(12, V): whether each combined direction's translation (:func:`_scan_directions`) lies in
    each view's plane, i.e. the view constrains that axis (:func:`_constrains` of the
    translation scans' ranges ``translation_span`` (3, V)): a depth shift with a tilt is mostly
    the tilt."""
    return _constrains(translation_span)[np.argmax(np.abs(_scan_directions()[6:, 3:]), axis=1)]


def rival_mm(starts: list[tuple[float, float]]) -> float:
    """The distance (mm) to the furthest rival basin among several starts of a registration:
    ``starts`` holds, per start, its full-resolution similarity after the coarsest scale and
    how far (mm, over the structure) its coarse end lay from the lead's (the best-scoring
    start's). A start scoring within :data:`RIVAL_SIMILARITY` of the lead and ending further
    than :data:`RIVAL_MM` from it is a second basin the images do not tell apart from the
    lead's; 0 where there is none.

    Measured (``register(keep=3)``): on 14 full-size trials rebuilt on CPU
    (``validation/registration_diag.py``; 11 right poses, 3 wrong), starts within 0.003 of the lead lay 0-1.5 mm from
    it on right poses (the same basin; the nearest score at another basin: 0.012 below the lead,
    9.6 mm away) and the starts of the two T4 failures that three starts fix scored 0.048 or
    more below; a refused 11.3 mm T4 pose had a rival 0.005 below, 5.3 mm away. On the toy of
    ``tests/test_registration_confidence.py`` (bordered, labelled 64^2 views of 3 mm voxels) a
    pose 2.5 mm off, estimated 1.29 mm, had a rival 7e-5 below, 6.1 mm away; the clean toy's
    right poses' starts lay within 1.5 mm."""
    if len(starts) < 2:
        return 0.0
    lead = max(s for s, _ in starts)
    return max((d for s, d in starts if lead - s <= RIVAL_SIMILARITY and d > RIVAL_MM), default=0.0)


def assess(score: Callable[[list[np.ndarray]], np.ndarray], pose: np.ndarray, points: np.ndarray,
           similarity: float, restarts: int = RESTARTS, restart_mm: float = RESTART_MM,
           restart_deg: float = RESTART_DEG, polish_steps: int = POLISH_STEPS, step_mm: float = STEP_MM,
           max_error_mm: float = MAX_ERROR_MM, similarity_floor: float = SIMILARITY_FLOOR,
           seed: int = 0, rival: float = 0.0, view_shift: float = 0.0) -> Confidence:
    """Assess ``pose`` (4x4 CT -> X-ray): a :class:`Confidence` (module docstring).

    ``score(poses)`` gives the (P, V) per-view similarity of a list of 4x4 poses;
    ``points`` (N, 3, CT world mm) stand for the structure (error in mm is their mean
    displacement); ``similarity`` is the pose's reported similarity; ``step_mm`` the first
    probe step (translations mm, rotations ``step_mm`` / the points' rms radius, rad);
    ``rival`` the distance (mm) to a rival basin of several starts (:func:`rival_mm`), part of
    the estimate; ``view_shift`` how far (mm) the views' own image shifts disagree along the
    axis they share (:func:`.consistency.view_shift_disagreement`): over
    :data:`VIEW_SHIFT_MM` it refuses the pose and joins the estimate."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if pts.shape[0] > MAX_POINTS:
        pts = pts[np.random.default_rng(seed).choice(pts.shape[0], MAX_POINTS, replace=False)]
    centre_ct = pts.mean(axis=0)
    lever = max(float(np.sqrt(np.square(pts - centre_ct).sum(axis=1).mean())), 1.0)  # rms radius, mm
    rng = np.random.default_rng(seed)
    kicks = [np.zeros(6)]
    for _ in range(restarts):
        d = rng.normal(size=(2, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        kicks.append(np.concatenate([d[0] * math.radians(restart_deg), d[1] * restart_mm]))
    joint = _moved_about([pose] * len(kicks), np.array(kicks), centre_ct)  # joint[0] is the pose
    step0 = np.array([step_mm / lever] * 3 + [step_mm] * 3)
    step, first = step0.copy(), None
    for _ in range(max(1, polish_steps)):
        trial = _moved_about(np.repeat(joint, 13, axis=0), np.tile(_pattern(step), (len(joint), 1)), centre_ct)
        s = np.asarray(score(trial), dtype=np.float64).reshape(len(joint), 13, -1)  # (K, 13, V)
        if first is None:
            first = s[0]  # (13, V) around the pose
        joint = _moved_about(joint, _climb_moves(s.mean(axis=2), step), centre_ct)
        step = step / 2
    # each view's own preference: 1-D scans along the 6 axes and the combined directions
    offsets = np.arange(-SCAN_MM, SCAN_MM + 1e-9, SCAN_STEP_MM)
    scale = np.array([math.radians(SCAN_DEG_PER_MM)] * 3 + [1.0] * 3)
    directions = _scan_directions() * scale  # (D, 6)
    xis = directions[:, None, :] * offsets[None, :, None]  # (D, S, 6): direction, offset
    scan = _moved_about([pose] * xis.shape[0] * xis.shape[1], xis.reshape(-1, 6), centre_ct)
    profiles = np.asarray(score(scan), dtype=np.float64).reshape(len(directions), len(offsets), -1)  # (D, S, V)
    span, gain, peak = _scan_stats(profiles, offsets)  # (D, V) each
    view_peaks, view_counts = peak[:6].T, _view_counts(span[:6], gain[:6]).T  # (V, 6)
    combined_peaks = peak[6:].T  # (V, 12)
    combined_counts = (_view_counts(span[6:], gain[6:], COMBINED_AXIS_FRACTION, COMBINED_GAIN_FRACTION)
                       & _in_plane(span[3:6])).T

    pts_x, centre_x = rigid.apply(joint[0], pts), rigid.apply(joint[0], centre_ct)  # X-ray frame
    ends = np.asarray(score(list(joint)), dtype=np.float64).mean(axis=1)  # (K,): where each start ended
    counted = [p for p, e in zip(joint[1:], ends[1:]) if e >= ends[0] - RESTART_TOLERANCE]
    spread = float(np.median([_moved(p @ rigid.invert(joint[0]), pts_x) for p in counted])) if counted else 0.0
    g, h = _parabola(first.mean(axis=1), step0)
    not_max = [int(i) for i in np.nonzero(h >= 0)[0]]
    offset = np.where(h < 0, -g / np.where(h < 0, h, -1.0), 0.0)
    offset = np.clip(offset, -2 * step0, 2 * step0)
    peak_mm = _displacement(offset, pts_x, centre_x)
    view_mm = max((_displacement(np.where(c, o, 0.0) * scale, pts_x, centre_x)
                   for o, c in zip(view_peaks, view_counts)), default=0.0)
    view_mm = max([view_mm] + [_displacement(o * d, pts_x, centre_x)  # each counting combined peak alone
                               for peaks_v, counts_v in zip(combined_peaks, combined_counts)
                               for o, c, d in zip(peaks_v, counts_v, directions[6:]) if c])
    shift_mm = view_shift if view_shift > VIEW_SHIFT_MM else 0.0  # within it: the right poses' spread
    est = float(math.sqrt(spread ** 2 + peak_mm ** 2 + view_mm ** 2 + rival ** 2 + shift_mm ** 2))
    success = bool(est <= max_error_mm and not not_max and similarity >= similarity_floor)
    evidence = {"restart_spread_mm": spread, "peak_offset_mm": peak_mm, "view_disagreement_mm": view_mm,
                "rival_basin_mm": rival, "view_shift_mm": view_shift,
                "view_peaks_mm": np.where(view_counts, view_peaks, 0.0).tolist(),
                "combined_view_peaks_mm": np.where(combined_counts, combined_peaks, 0.0).tolist(),
                "scans": {"directions": scan_direction_names(), "span": np.round(span, 5).tolist(),
                          "gain": np.round(gain, 5).tolist(), "peak_mm": peak.tolist()},
                "not_maximum_axes": not_max, "curvature": (-h).tolist(),
                "restart_similarity": (ends[1:] - ends[0]).tolist(), "restarts_counted": len(counted),
                "similarity": similarity, "restarts": restarts, "restart_mm": restart_mm,
                "restart_deg": restart_deg, "step_mm": step_mm, "max_error_mm": max_error_mm,
                "similarity_floor": similarity_floor}
    return Confidence(success, est, evidence)
