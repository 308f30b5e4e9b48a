"""How far a registered pose can be trusted: an error estimate in mm and a success decision
built from several pieces of evidence, not from one similarity threshold.

A right pose is a sharp, isolated maximum of the similarity that both views agree on; a wrong
one is a compromise (a patient who moved between the views: each view alone wants another
pose), a shallow or slanted spot (not converged, a near miss) or an isolated maximum of the
wrong anatomy. :func:`assess` probes the similarity around the pose with poses scored in
batched splats (the views move, the Gaussians stay: a handful of launches) and measures

* ``restart_spread_mm``: ``restarts`` starts perturbed by ``restart_mm`` / ``restart_deg``
  from the pose (and the pose itself) each climb ``polish_steps`` coordinate steps (a
  parabola through the probes at ``+-step`` along each of the 6 axes, the step halving each
  time); the median over the perturbed starts of the mean displacement of the structure's
  points between where that start ends and where the pose itself ends (the median: one
  restart caught on a ridge does not condemn a right pose). Right poses come back together,
  wrong ones scatter.
* ``peak_offset_mm``: how far the joint similarity's parabola peak lies from the pose (the
  first probe around the pose; the 6 axes' offsets as a displacement of the structure's
  points), and ``not_maximum``: the axes along which the similarity curves up.
* ``view_disagreement_mm``: each view climbs its own similarity from the pose (the same
  coordinate steps, a view still travelling along an axis keeping its step there, so it can
  go up to ``polish_steps`` first steps per axis); along each axis both views constrain
  (curvature at their own peaks at least :data:`VIEW_AXIS_FRACTION` of the other's), the
  distance between the two views' peaks, as a displacement of the structure's points. A pose
  no single rigid motion explains in both views (moved patient, wrong patient) pulls them
  apart. (A single parabola per view at the pose missed a moved patient whose views' peaks
  lay further apart than the probes reach: at the pose the view whose peak is far curves up
  and the axis was dropped.)
* ``curvature``: minus the joint similarity's second derivative along each axis at the pose
  (rotations about the X-ray frame's axes through the structure, per rad^2; translations
  along them, per mm^2): how sharply each axis is determined (evidence only).

``estimated_error_mm`` is the root sum of squares of the spread, the peak offset and half the
view disagreement (each view's own peak lies about that far from the compromise). The
decision (``success``) needs all of: estimated error <= ``max_error_mm``, a maximum along every
axis, and ``similarity`` >= ``similarity_floor`` (:data:`SIMILARITY_FLOOR`) (below it the images do not show the
anatomy at all).

Measured (CPU, real chest CT of ``datasets/fetch_ct.py``, T10 / T12, 160^2 views of 1.2 mm,
vertebra 32^3 + context 64^3 Gaussians; detector-like images as
:func:`rgs_engine.sim.radiograph.detector_images` makes them): right poses (mTRE 0.34-1.21
mm; clean, gamma 0.6 + 20 % scatter + 1.2 px blur + 14 px border + label, gamma 2 + 30 %
scatter + 2 px blur, inverted gamma 0.5; T8 / T10 / T12) had estimates 0.48-1.80 mm, all
but the 1.80 one flagged; wrong poses (a lateral view after an 8 mm move: 3.5-5.2 mm off;
45-50 mm starts without the global stage: 56-79 mm off) had estimates 2.4-6.4 mm and none
was flagged. The bound :data:`MAX_ERROR_MM` = 1.5 mm sits between the two, nearer the right
poses: the estimate under-reads wrong poses (a 5.2 mm moved-patient pose read 2.7 mm). On the toy of
``tests/test_registration.py`` (64^2 views of 3 mm voxels) right poses 0.2-0.9 mm off are
estimated 0.3-2.3 mm: the bound then refuses some right poses (conservative; no
wrong pose is flagged in the tests). The GPU sweep of ``validation/registration.py`` is the
calibration over many cases; :data:`MAX_ERROR_MM` is set for no wrong pose flagged.

Cost: ``polish_steps`` x (``restarts`` + 1 + views) x 13 scored poses (364 by default with
two views) in batched splats, at a detector pooled to about 0.8 mm at
the object.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..core import rigid

RESTARTS = 4
RESTART_MM = 3.0
RESTART_DEG = 3.0
POLISH_STEPS = 4
STEP_MM = 2.0  # first probe step: translation mm, rotation STEP_MM / lever arm
VIEW_AXIS_FRACTION = 0.25
MAX_ERROR_MM = 1.5  # measured: right poses estimated 0.48-1.80 mm, wrong ones 2.4-6.4 mm
SIMILARITY_FLOOR = 0.3
MAX_POINTS = 2000


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


def _moved_about(poses: list[np.ndarray], moves: np.ndarray, centre_ct: np.ndarray) -> list[np.ndarray]:
    """Each pose (4x4) moved by ``D(move)`` about its own image of ``centre_ct``."""
    return [rigid.from_axis_angle(m[:3], m[3:], rigid.apply(p, centre_ct)) @ p for p, m in zip(poses, moves)]


def _view_disagreement(xi: np.ndarray, curvature: np.ndarray) -> np.ndarray:
    """(6,) per-axis distance between the two views' own peaks that constrain each axis best.

    ``xi`` (V, 6): each view's climbed peak relative to the pose (rad, mm); ``curvature`` (V, 6):
    minus each view's second derivative there. An axis counts where both views curve down and
    the weaker at least :data:`VIEW_AXIS_FRACTION` of the stronger (a view's depth axis does not)."""
    out = np.zeros(6)
    if xi.shape[0] < 2:
        return out
    for i in range(6):
        both = np.argsort(-curvature[:, i])[:2]
        a, b = curvature[both, i]
        if b > 0 and b >= VIEW_AXIS_FRACTION * a:
            out[i] = abs(xi[both[0], i] - xi[both[1], i])
    return out


def assess(score: Callable[[list[np.ndarray]], np.ndarray], pose: np.ndarray, points: np.ndarray,
           similarity: float, restarts: int = RESTARTS, restart_mm: float = RESTART_MM,
           restart_deg: float = RESTART_DEG, polish_steps: int = POLISH_STEPS,
           max_error_mm: float = MAX_ERROR_MM, similarity_floor: float = SIMILARITY_FLOOR,
           seed: int = 0) -> Confidence:
    """Assess ``pose`` (4x4 CT -> X-ray): a :class:`Confidence` (module docstring).

    ``score(poses)`` gives the (P, V) per-view similarity of a list of 4x4 poses;
    ``points`` (N, 3, CT world mm) stand for the structure (error in mm is their mean
    displacement); ``similarity`` is the pose's reported similarity."""
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
    step0 = np.array([STEP_MM / lever] * 3 + [STEP_MM] * 3)
    step = step0.copy()
    first = None  # (13, V) scores around the pose
    # Besides the joint chains (mean of the views), each view climbs its own similarity from
    # the pose; a view still travelling (its move clipped) keeps its step, a settled one halves it.
    view_poses, view_xi, view_step = [], None, None
    for _ in range(max(1, polish_steps)):
        chains = joint + view_poses
        steps = [step] * len(joint) + list(view_step if view_poses else [])
        trial = [rigid.from_axis_angle(x[:3], x[3:], rigid.apply(p, centre_ct)) @ p
                 for p, st in zip(chains, steps) for x in _pattern(st)]
        s = np.asarray(score(trial), dtype=np.float64).reshape(len(chains), 13, -1)  # (chains, 13, V)
        views = s.shape[2]
        if first is None:
            first = s[0]
            own, view_step, view_xi = first.T, np.tile(step0, (views, 1)), np.zeros((views, 6))
            view_poses = [pose] * views
        else:
            own = s[len(joint) + np.arange(views), :, np.arange(views)]  # (V, 13): each view's own
        moves = _climb_moves(own, view_step)
        view_poses = _moved_about(view_poses, moves, centre_ct)
        view_xi = view_xi + moves
        view_step = np.where(np.abs(moves) >= view_step * (1 - 1e-9), view_step, view_step / 2)
        joint = _moved_about(joint, _climb_moves(s[:len(joint)].mean(axis=2), step), centre_ct)
        step = step / 2
    own = np.asarray(score([rigid.from_axis_angle(x[:3], x[3:], rigid.apply(p, centre_ct)) @ p
                            for p, st in zip(view_poses, view_step) for x in _pattern(st)]),
                     dtype=np.float64).reshape(views, 13, views)[np.arange(views), :, np.arange(views)]
    view_curv = -_parabola(own, view_step)[1]  # (V, 6) at each view's own peak

    pts_x, centre_x = rigid.apply(joint[0], pts), rigid.apply(joint[0], centre_ct)  # X-ray frame
    spread = float(np.median([_moved(p @ rigid.invert(joint[0]), pts_x) for p in joint[1:]])) if restarts else 0.0
    g, h = _parabola(first.mean(axis=1), step0)
    not_max = [int(i) for i in np.nonzero(h >= 0)[0]]
    offset = np.where(h < 0, -g / np.where(h < 0, h, -1.0), 0.0)
    offset = np.clip(offset, -2 * step0, 2 * step0)
    peak_mm = _displacement(offset, pts_x, centre_x)
    view_mm = _displacement(_view_disagreement(view_xi, view_curv), pts_x, centre_x)
    est = float(math.sqrt(spread ** 2 + peak_mm ** 2 + (view_mm / 2) ** 2))
    success = bool(est <= max_error_mm and not not_max and similarity >= similarity_floor)
    evidence = {"restart_spread_mm": spread, "peak_offset_mm": peak_mm, "view_disagreement_mm": view_mm,
                "view_peaks": view_xi.tolist(), "not_maximum_axes": not_max, "curvature": (-h).tolist(),
                "similarity": similarity, "restarts": restarts, "max_error_mm": max_error_mm,
                "similarity_floor": similarity_floor}
    return Confidence(success, est, evidence)
