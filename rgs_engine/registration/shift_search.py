"""Translation candidates for the global stage of registration from each view's best image shift.

A translation of the CT moves its projection in each view by about ``J_v t`` pixels (``J_v``
(2, 3): the derivative of the structure centre's projection, rows and columns). So the DRR at
the start pose, shifted within the view until it best matches the X-ray, tells that view's
in-plane part of the translation; two views with different directions give all three
components (least squares). Every shift of a view is scored in one batch: the DRR padded by
its edge values and cut at each offset, the X-ray put in each shifted DRR's contrast
(:class:`.similarity.RankMatch`), :func:`.similarity.view_similarity` per shift. The best
``peaks`` shifts of each view (at least ``2 * suppress`` pixels apart) are combined across
views into ``peaks ** V`` translations.

This samples the translations on the detector's pixel grid, where a Sobol set of a few
hundred 6-D poses spaces them tens of millimetres apart. It adds candidates only: the global
stage still keeps the best-scoring pose of all.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from ..core.geometry import Geometry
from .similarity import RankMatch, pool, pool_weights, view_similarity
from .windows import project_points


def shift_scores(drr: torch.Tensor, xray: torch.Tensor, weights: torch.Tensor, sign: float,
                 reach: int) -> torch.Tensor:
    """Similarity (2 reach + 1, 2 reach + 1) of one view's ``xray`` (H, W; pixel ``weights``)
    with ``drr`` (H, W) moved by (rows, cols) = (i - reach, j - reach) pixels (edge values
    fill in), the X-ray matched to each moved DRR's contrast with polarity ``sign``."""
    n = 2 * reach + 1
    h, w = drr.shape
    padded = F.pad(drr[None, None], (reach,) * 4, mode="replicate")[0, 0]
    # window (a, b) of the padded image holds the DRR moved by (reach - a, reach - b)
    moved = padded.unfold(0, h, 1).unfold(1, w, 1).flip(0, 1).reshape(n * n, 1, h, w)
    matched = RankMatch(xray[None], weights[None], [sign])(moved)
    return view_similarity(moved, matched, weights.expand_as(moved)).reshape(n, n)


def _peaks(scores: torch.Tensor, count: int, suppress: int) -> list[tuple[int, int]]:
    """The ``count`` best cells of ``scores`` (2-D), each at least ``suppress`` cells (in both
    directions) from the better ones, as (row, col) offsets from the centre."""
    s = scores.detach().double().cpu().numpy().copy()
    centre = (s.shape[0] - 1) // 2
    out = []
    s[~np.isfinite(s)] = -np.inf
    for _ in range(count):
        if not np.isfinite(s).any():
            break
        r, c = np.unravel_index(int(np.argmax(s)), s.shape)
        out.append((int(r) - centre, int(c) - centre))
        s[max(r - suppress, 0):r + suppress + 1, max(c - suppress, 0):c + suppress + 1] = -np.inf
    return out


def shift_jacobian(geometry: Geometry, point: np.ndarray, step_mm: float = 1.0) -> np.ndarray:
    """(V, 2, 3): pixels (rows, cols) that ``point`` (3, mm) moves in each view per mm of
    translation along x, y, z (central differences of its projection)."""
    p = np.asarray(point, dtype=np.float64).reshape(1, 3) + np.concatenate(
        [np.eye(3), -np.eye(3)]) * step_mm
    rc = project_points(geometry, p)  # (V, 6, 2)
    return ((rc[:, :3] - rc[:, 3:]) / (2 * step_mm)).transpose(0, 2, 1)


def translation_candidates(drr: torch.Tensor, xrays: torch.Tensor, weights: torch.Tensor,
                           signs: list[float], geometry: Geometry, centre_xray: np.ndarray,
                           reach_mm: float, pool_factor: int = 2, peaks: int = 3,
                           suppress: int = 2) -> np.ndarray:
    """Translations (K, 3) mm in the X-ray frame that move the DRR ``drr`` (V, H, W, on
    ``geometry``'s detector) onto ``xrays`` (V, H, W; pixel ``weights``; ``signs`` their
    polarity per view): each view's best ``peaks`` shifts within ``reach_mm`` at the object
    (images pooled by ``pool_factor``), every combination across views solved for one
    translation by least squares through :func:`shift_jacobian` at ``centre_xray``."""
    jac = shift_jacobian(geometry, centre_xray) / pool_factor  # pooled pixels per mm
    d, x, w = pool(drr, pool_factor), pool(xrays, pool_factor), pool_weights(weights, pool_factor)
    per_mm = float(np.linalg.norm(jac, axis=2).max())
    reach = max(1, int(np.ceil(reach_mm * per_mm)))
    reach = min(reach, (min(d.shape[-2:]) - 1) // 2)
    shifts = [_peaks(shift_scores(d[v], x[v], w[v], signs[v], reach), peaks, suppress)
              for v in range(d.shape[0])]
    a = jac.reshape(-1, 3)
    out = []
    for combo in itertools.product(*shifts):
        b = np.asarray(combo, dtype=np.float64).reshape(-1)
        out.append(np.linalg.lstsq(a, b, rcond=None)[0])
    return np.asarray(out).reshape(-1, 3)
