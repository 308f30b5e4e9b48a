"""Whether the views agree on one patient pose: the views' own image shifts along the axis
they share.

Two X-rays of a patient who moved between the exposures admit no single rigid pose; the
registration then follows one view (usually the one that sees the structure more sharply),
and the other view's similarity around the pose may stay nearly flat, so the local evidence
of :mod:`.confidence` can miss it. But the move shifts the whole anatomy in that other view.
So at the registered pose, each view's DRR (the structure and its context, over a window
``margin`` wide around the structure) is shifted over the view's X-ray
(:func:`.shift_search.shift_scores`: every shift within ``reach_mm`` at the object, the X-ray
matched to each shifted DRR's contrast), and the best shift (sub-pixel) becomes the view's
in-plane translation of the patient: ``t_v = pinv(J_v) s_v`` with ``J_v`` the projection's
pixels per mm (:func:`.shift_search.shift_jacobian`). Two views measure one direction
twice: the axis both detector planes contain, ``n = d_a x d_b`` (``d_v``: the view's depth
axis, the null direction of ``J_v``). A rigid pose error moves both views alike along
``n``; a patient who moved between the exposures does not. :func:`view_shift_disagreement` is
``|n . (t_a - t_b)|`` in mm, the largest over pairs of views.

Measured offline (2026-12-07, a 2-core CPU, ``validation/view_shift_probe.py`` at the stored
poses of the held-out seed-1 H100 sweep rebuilt with the CPU's Gaussians; a 60 mm window at
1.33 mm per pixel, reach 16 mm; ``validation/registration_design.md``, "The views' shifts
along their shared axis"): the 20
moved-patient pairs 3.8-10.6 mm, 78 of 79 right poses (clean, detector-like and edge-enhanced,
every vertebra) at most 2.3 mm (95 % under 1.6 mm). The 79th, a detector-like T4 pose, 15.7 mm:
its lateral view's best shift lies at the edge of the reach, with no clear peak. Held out (the
seed-0 H200 sweep): its 10 moved pairs 5.8-9.7 mm, 59 right poses at most 1.6 mm. (Another patient's X-rays measure anything from
0.3 to 21 mm: the other evidence refuses those.) On the GPU (the seed-1 sweep on an H200,
``validation/registration_seed1_shift.md``): moved pairs 3.5-10.6 mm, 372 of 375 right poses at
most 2.8 mm, two right poses refused for a best shift at the edge of the reach. Over
:data:`.confidence.VIEW_SHIFT_MM` the success decision refuses the pose.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from ..core.geometry import Geometry
from .shift_search import shift_jacobian, shift_scores
from .similarity import polarity


def _subpixel(scores: np.ndarray) -> tuple[float, float]:
    """(rows, cols) offset from the centre of ``scores`` (2-D) of its maximum, refined by a
    parabola through its neighbours along each axis."""
    r, c = np.unravel_index(int(np.argmax(scores)), scores.shape)
    out = []
    for axis, i in ((0, r), (1, c)):
        line = scores[:, c] if axis == 0 else scores[r, :]
        frac = 0.0
        if 0 < i < len(line) - 1:
            a, b, d = line[i - 1], line[i], line[i + 1]
            if a - 2 * b + d < 0:
                frac = 0.5 * (a - d) / (a - 2 * b + d)
        out.append(i + frac - (len(line) - 1) / 2)
    return out[0], out[1]


def view_shifts(drr: torch.Tensor, xrays: torch.Tensor, weights: torch.Tensor, signs: list[float],
                geometry: Geometry, centre_xray: np.ndarray, reach_mm: float) -> np.ndarray:
    """Each view's in-plane translation (V, 3, mm in the X-ray frame, none along its depth)
    that best moves the DRR ``drr`` (V, H, W) onto ``xrays`` (V, H, W; pixel ``weights``;
    ``signs`` their polarity), image shifts within ``reach_mm`` at ``centre_xray``."""
    jac = shift_jacobian(geometry, centre_xray)  # (V, 2, 3) pixels per mm
    out = []
    for v in range(drr.shape[0]):
        per_mm = float(np.linalg.norm(jac[v], axis=1).max())
        reach = max(1, min(int(np.ceil(reach_mm * per_mm)), (min(drr.shape[-2:]) - 1) // 2))
        with torch.no_grad():
            scores = shift_scores(drr[v], xrays[v], weights[v], float(signs[v]), reach)
        s = scores.double().cpu().numpy()
        s[~np.isfinite(s)] = -np.inf
        out.append(np.linalg.pinv(jac[v]) @ np.asarray(_subpixel(s)))
    return np.asarray(out)


def view_shift_disagreement(shifts: np.ndarray, geometry: Geometry, centre_xray: np.ndarray) -> float:
    """The largest, over pairs of views, of ``|n . (t_a - t_b)|`` (mm): how far the views'
    translations ``shifts`` (V, 3, from :func:`view_shifts`) disagree along the axis both
    views see (``n``, the cross product of their depth axes; pairs that look along nearly the
    same axis have none and are skipped)."""
    jac = shift_jacobian(geometry, centre_xray)
    depth = np.cross(jac[:, 0], jac[:, 1])
    depth /= np.linalg.norm(depth, axis=1, keepdims=True)
    worst = 0.0
    for a, b in itertools.combinations(range(len(shifts)), 2):
        n = np.cross(depth[a], depth[b])
        if np.linalg.norm(n) < 0.2:  # views within about 12 deg of each other
            continue
        worst = max(worst, abs(float(n / np.linalg.norm(n) @ (shifts[a] - shifts[b]))))
    return worst


def measure(drr: torch.Tensor, xrays: torch.Tensor, weights: torch.Tensor, geometry: Geometry,
            centre_xray: np.ndarray, reach_mm: float) -> tuple[np.ndarray, float]:
    """The check at one pose: each view's translation (:func:`view_shifts`, the X-rays'
    polarity against ``drr`` taken from the weighted pixels) and their disagreement along the
    shared axis (:func:`view_shift_disagreement`, mm)."""
    shifts = view_shifts(drr, xrays, weights, polarity(xrays, drr, weights), geometry, centre_xray, reach_mm)
    return shifts, view_shift_disagreement(shifts, geometry, centre_xray)
