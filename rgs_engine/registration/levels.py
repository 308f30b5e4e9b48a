"""One scale of a registration on one window of the views, and what is computed there.

A :class:`Level` holds a window of the views (:class:`.windows.Crop`) pooled by a factor, the
X-rays there (in the DRR's contrast once matched) with their pixel weights, and the Gaussians
with their scales widened for the coarse pixels. :func:`refine_step` is one refinement step
on it (the similarity and its gradient w.r.t. the pose vectors, chained through closed-form
adjoints); :func:`score_poses` scores many poses at once (the global stage, the basin check,
the confidence probes). Units: mm; images ``(V, h, w)`` line integrals.
"""
from __future__ import annotations

import numpy as np
import torch

from ..core import rigid
from ..core.geometry import Geometry
from ..core.splatting import splat, splat_vjp
from .poses import PoseUpload
from .similarity import (
    RankMatch,
    SimilarityTarget,
    match_contrast,
    polarity,
    pool,
    pool_weights,
    structure_coefs,
    view_similarity,
)
from .windows import Crop, coarse_geometry

CANDIDATE_BATCH_PIXELS = 1 << 20  # pixels per batched candidate splat


def widened(params: dict[str, torch.Tensor], blur_mm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales widened by ``blur_mm`` (in quadrature) and densities scaled to keep each
    Gaussian's integral."""
    s, d = params["scales"], params["densities"]
    if blur_mm <= 0:
        return s, d
    s2 = (s.square() + blur_mm ** 2).sqrt()
    return s2, d * (s / s2).prod(dim=1)


def object_pitch(geometry: Geometry, centre_xray: np.ndarray) -> float:
    """Mean detector pixel pitch (mm) brought back to the object at ``centre_xray`` (X-ray
    frame, mm): divided by the magnification there."""
    vec = geometry.vectors.numpy()
    pitch = 0.5 * (np.linalg.norm(vec[:, 6:9], axis=1) + np.linalg.norm(vec[:, 9:12], axis=1))
    if geometry.mode == "cone":
        src = vec[:, 0:3]
        mag = np.linalg.norm(vec[:, 3:6] - src, axis=1) / np.maximum(
            np.linalg.norm(centre_xray - src, axis=1), 1e-6)
        pitch = pitch / np.maximum(mag, 1e-6)
    return float(pitch.mean())


class Level:
    """One scale on one window: its geometry, the pooled X-rays and their pixel weights, and
    the Gaussians (``means`` and ``quats`` as given, scales widened by ``blur`` coarse pixels
    at the object). ``xrays`` starts as the pooled input; :meth:`match` puts it in the DRR's
    contrast.

    Args:
        factor: detector pooling factor (1: full resolution).
        geometry: the X-rays' geometry; ``xrays`` / ``weights``: their images and pixel
            weights (V, H, W) on the runtime device.
        crop: the window of each view.
        params: the Gaussians (``means``, ``scales``, ``quats``, ``densities``), checked.
        centre_xray: the structure's centre in the X-ray frame (mm), where the coarse pixel
            is measured.
        blur: the widening at coarse scales, in coarse pixels at the object.
    """

    def __init__(self, factor: int, geometry: Geometry, xrays: torch.Tensor, weights: torch.Tensor,
                 crop: Crop, params: dict[str, torch.Tensor], centre_xray: np.ndarray, blur: float):
        self.factor = factor
        self.geometry = coarse_geometry(crop.geometry(geometry), factor)
        self.raw = pool(crop.images(xrays), factor)
        self.xrays = self.raw
        self.rank: RankMatch | None = None
        self._target: SimilarityTarget | None = None  # the X-rays' side of the similarity
        self._cotangent: torch.Tensor | None = None
        self.coefs: torch.Tensor | None = None  # channel weights per view (:meth:`weigh`; None: the default's)
        self.structure: torch.Tensor | None = None  # the structure's DRR that set them
        self.weights = pool_weights(crop.images(weights), factor)
        self.means, self.quats = params["means"], params["quats"]
        blur_mm = blur * object_pitch(self.geometry, centre_xray) if factor > 1 else 0.0
        self.scales, self.densities = widened(params, blur_mm)

    def drr(self, means: torch.Tensor, quats: torch.Tensor, geometry: Geometry | None = None) -> torch.Tensor:
        """Splat of this level's Gaussians moved to ``means`` / ``quats``."""
        # the Gaussians were checked once (register's set-up) and are only moved rigidly since
        return splat(means, self.scales, quats, self.densities, geometry or self.geometry, validate=False)

    def drr_vjp(self, means: torch.Tensor, quats: torch.Tensor):
        """:meth:`drr` without autograd: ``(drr, vjp)`` of :func:`~rgs_engine.core.splatting.splat_vjp`."""
        return splat_vjp(means, self.scales, quats, self.densities, self.geometry, validate=False)

    def weigh(self, means: torch.Tensor, quats: torch.Tensor, drr: torch.Tensor, n_struct: int) -> None:
        """Weigh each view's channels by what it shows of the structure
        (:func:`.similarity.structure_coefs`): ``means`` / ``quats`` are this level's Gaussians
        moved to a reference pose (the structure's first ``n_struct``), ``drr`` their DRR."""
        n = n_struct
        self.structure = splat(means[:n], self.scales[:n], quats[:n], self.densities[:n], self.geometry,
                               validate=False)
        self.coefs = structure_coefs(self.structure, drr.detach(), self.weights)
        self._target = None

    def match(self, drr: torch.Tensor) -> None:
        """Map the X-rays through the monotone contrast curve that matches them to ``drr``
        (this level's DRR at a reference pose): :func:`match_contrast`."""
        self.xrays = match_contrast(self.raw, drr.detach(), self.weights)
        self._target = None

    def match_each(self, drr: torch.Tensor) -> None:
        """Match the X-rays to every DRR that :meth:`similarity` is given (:class:`RankMatch`),
        with the polarity they have against ``drr`` (this level's DRR at a reference pose)."""
        self.rank = RankMatch(self.raw, self.weights, polarity(self.raw, drr.detach(), self.weights))

    @property
    def mean_cotangent(self) -> torch.Tensor:
        """(V,) ``-1 / V``: the gradient of minus the mean over views (a refinement step's)."""
        if self._cotangent is None:
            v = self.geometry.num_views
            self._cotangent = torch.full((v,), -1.0 / v, device=self.raw.device)
        return self._cotangent

    @property
    def target(self) -> SimilarityTarget:
        """The X-rays' side of the similarity (as matched last)."""
        if self._target is None:
            self._target = SimilarityTarget(self.xrays, self.weights, self.coefs)
        return self._target

    def similarity(self, drr: torch.Tensor) -> torch.Tensor:
        """Per-view :func:`view_similarity` of ``drr`` (..., V, h, w) and the X-rays (...,  V)."""
        if self.rank is not None:
            return view_similarity(drr, self.rank(drr.detach()), self.weights.expand_as(drr), self.coefs)
        return self.target(drr)


def moved(lvl: Level, up: PoseUpload, n_struct: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``lvl``'s Gaussians (means, quats) moved by the poses of ``up``: all of them by its one
    pose, or the structure's first ``n_struct`` by the first and the context's by the second."""
    return rigid.move_packed(lvl.means, lvl.quats, up.flat, n_struct)


def refine_step(lvl: Level, up: PoseUpload, n_struct: int, match: bool = False, weigh: bool = False) -> torch.Tensor:
    """One refinement step's per-view similarity (V,) (device) at the poses of ``up``, and the
    gradient of the negative of its mean w.r.t. each pose vector in its ``.grad``
    (:meth:`PoseUpload.backward`). No autograd: the rigid move, the splat and the similarity
    each chain their closed-form adjoint (an autograd graph per step cost more host time than
    the GPU's work). ``match``: first put the X-rays in the contrast of this DRR
    (:meth:`Level.match`); ``weigh``: and weigh its channels by the structure there
    (:meth:`Level.weigh`)."""
    with torch.no_grad():
        means, quats = moved(lvl, up, n_struct)
        drr, vjp = lvl.drr_vjp(means, quats)
        if match:
            lvl.match(drr)
        if weigh:
            lvl.weigh(means, quats, drr, n_struct)
        sims, saved = lvl.target.forward(drr)
        g_means, _, g_quats, _ = vjp(lvl.target.backward(saved, lvl.mean_cotangent))
        up.backward(rigid.move_packed_vjp(lvl.means, lvl.quats, g_means, g_quats, n_struct, len(up.zs)))
        return sims


def score_poses(level: Level, poses) -> np.ndarray:
    """(P, V) per-view similarity at ``level`` of each pose of ``poses`` ((P, 4, 4) or a
    list of 4x4, CT -> X-ray), splatting the untouched Gaussians into the views moved by each
    pose's inverse (several poses, one geometry per launch)."""
    geo = level.geometry
    h, w = geo.det_shape
    per = max(1, CANDIDATE_BATCH_PIXELS // (h * w * geo.num_views))
    scores = []
    with torch.no_grad():
        for s in range(0, len(poses), per):
            chunk = poses[s:s + per]
            drr = level.drr(level.means, level.quats, rigid.transform_geometry(geo, rigid.invert(np.stack(chunk))))
            drr = drr.reshape(len(chunk), geo.num_views, h, w)
            sim = level.similarity(drr)
            scores.append(sim.cpu())
    return torch.cat(scores).double().numpy()
