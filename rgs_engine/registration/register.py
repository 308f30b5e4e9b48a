"""Rigid CT-to-X-ray registration of radiative Gaussians (the core of ``rgs register``).

The CT is a set of radiative Gaussians in CT world mm (:func:`rgs_engine.registration.ct_gaussians.
gaussians_for_ct`); the X-rays an :class:`~rgs_engine.io.xrays.XRaySet` (line integrals and
their calibrated geometry in the X-ray frame). The pose ``ct_to_xray`` (4x4, mm) maps CT
world to the X-ray frame. It is parameterised as

    ``pose(xi) = D(xi) @ init``,  ``D(xi): y -> R(xi[:3]) (y - c) + c + xi[3:]``

with ``c = init(centre)`` the rotation centre in the X-ray frame (``centre`` defaults to the
density-weighted centroid of the Gaussians), ``R`` Rodrigues' rotation
(:func:`~rgs_engine.core.rigid.rotation_matrix`) of a rotation vector (rad) and ``xi[3:]`` a
translation (mm) (:mod:`.poses`). Gradients reach the pose's (R, t, q) on the device through
the closed-form adjoints of the similarity (:class:`.similarity.SimilarityTarget`), the splat
(:func:`~rgs_engine.core.splatting.splat_vjp`) and the rigid move
(:func:`~rgs_engine.core.rigid.move_packed_vjp`), then ``xi`` through the pose's Jacobian on
the host (:class:`.poses.PoseUpload`).

Similarity (:func:`similarity`): per view and per scale, the mean of the normalised
cross-correlation (NCC) of the DRR and the X-ray and the NCC of their finite-difference
gradients (gradient NCC, robust to smooth soft-tissue differences); averaged over views and
over the scales (detector average-pooled by each factor). It lies in [-1, 1].

Stages of :func:`register`:

1. global: ``candidates`` poses (a scrambled Sobol set of translations within
   ``+-capture_mm`` and rotations within ``+-capture_deg``, plus ``init``) are scored at the
   coarsest scale in batched splats (candidates move the views, not the Gaussians), with
   the translations that each view's best image shifts of the DRR at ``init`` imply
   (:mod:`.shift_search`, :data:`SHIFT_PEAKS` per view), then as many again in quarter-size
   ranges around the :data:`LOCAL_SEEDS` best; the best ``keep`` of all go on;
2. refinement: Adam on ``xi`` from each kept candidate at the coarsest scale; the one with
   the best full-resolution similarity then goes on, coarse to fine over the other
   ``scales``, and is the result. Each step chains closed-form adjoints (splat, similarity,
   rigid move) without an autograd graph;
3. basin check (with the global stage): the global stage's second pass repeated around the
   result at the coarsest scale; a pose there that scores above the result (further than
   :data:`~.confidence.RIVAL_MM`) is a rival basin for the success decision.

At coarse scales the detector is resampled (fewer, larger pixels over the same area) and the
Gaussians are widened by half the coarse pixel (mass preserved) so they do not alias.

X-rays: pixels that show no anatomy (collimation borders, saturation, burned-in labels at
the image's extremes) are masked (:mod:`.masking`), and at each level's start pose the
X-rays are mapped through the monotone curve matching them to the DRR (:mod:`.similarity`:
a detector or display contrast curve, inverted polarity).

``success`` and ``estimated_error_mm`` come from :func:`.confidence.assess` (restart
agreement, peak offset, per-view agreement, the basin check, and the views' whole-window shifts
along their shared axis from :mod:`.consistency`; ``threshold`` is only its similarity floor).
Measurements: ``validation/registration.md`` (the sweep), ``validation/registration_design.md``
(what chose the defaults).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core import rigid, runtime
from ..core.adam import Adam
from ..core.errors import RgsInputError
from ..core.gaussians import check_params
from ..core.geometry import Geometry
from ..core.splatting import splat, splat_vjp
from ..io.xrays import XRaySet
from . import confidence, consistency
from .masking import exposure_mask
from .poses import PoseUpload, delta_matrix, delta_xi, mtre, sobol_offsets  # noqa: F401 (API)
from .shift_search import translation_candidates
from .similarity import (  # noqa: F401 (API)
    RankMatch,
    SimilarityTarget,
    gradient_ncc,
    match_contrast,
    ncc,
    polarity,
    pool,
    pool_weights,
    similarity,
    structure_coefs,
    view_similarity,
)
from .windows import EPS, Crop, coarse_geometry

SUCCESS_THRESHOLD = confidence.SIMILARITY_FLOOR  # the decision's similarity floor
CONFIDENCE_PITCH_MM = 0.8  # the confidence probes pool the detector up to this pitch at the object
CONSISTENCY_PITCH_MM = 1.33  # the views' whole-window shifts (:mod:`.consistency`): about this pitch,
CONSISTENCY_MARGIN_MM = 60.0  # ... a window this much wider than the structure (context included),
CONSISTENCY_REACH_MM = 16.0  # ... shifts up to this far
DEFAULT_SCALES = (4, 2, 1)
LR_DECAY = 0.5  # Adam's learning rate at each finer refinement scale: this times the coarser one's
LOCAL_SEEDS = 4  # the global stage searches again around this many of its best candidates
SHIFT_PEAKS = 6  # the global stage also scores translations from each view's best this many image shifts
# (6, from 3: at full size it turned three of three search misses into 0.6-0.8 mm, and left seven
# right trials as they were; validation/registration_design.md, "More image-shift peaks")
BASIN_MARGIN = 0.0  # basin check: a probe beating the registered pose's coarse score by more than this is a rival
FINAL_SCALES = (1, 2, 4)  # the reported similarity averages these poolings (less noise-bound)
CANDIDATE_BATCH_PIXELS = 1 << 20  # pixels per batched candidate splat


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------
def _widened(params: dict[str, torch.Tensor], blur_mm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales widened by ``blur_mm`` (in quadrature) and densities scaled to keep each
    Gaussian's integral."""
    s, d = params["scales"], params["densities"]
    if blur_mm <= 0:
        return s, d
    s2 = (s.square() + blur_mm ** 2).sqrt()
    return s2, d * (s / s2).prod(dim=1)


def _object_pitch(geometry: Geometry, centre_xray: np.ndarray) -> float:
    """Mean detector pixel pitch brought back to the object (divided by the magnification)."""
    vec = geometry.vectors.numpy()
    pitch = 0.5 * (np.linalg.norm(vec[:, 6:9], axis=1) + np.linalg.norm(vec[:, 9:12], axis=1))
    if geometry.mode == "cone":
        src = vec[:, 0:3]
        mag = np.linalg.norm(vec[:, 3:6] - src, axis=1) / np.maximum(
            np.linalg.norm(centre_xray - src, axis=1), 1e-6)
        pitch = pitch / np.maximum(mag, 1e-6)
    return float(pitch.mean())


class _Level:
    """One scale on one window: its geometry, the pooled X-rays and their pixel weights, and
    the Gaussians (``means`` and ``quats`` as given, scales widened by ``blur`` coarse pixels
    at the object). ``xrays`` starts as the pooled input; :meth:`match` puts it in the DRR's
    contrast."""

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
        blur_mm = blur * _object_pitch(self.geometry, centre_xray) if factor > 1 else 0.0
        self.scales, self.densities = _widened(params, blur_mm)

    def drr(self, means: torch.Tensor, quats: torch.Tensor, geometry: Geometry | None = None) -> torch.Tensor:
        """Splat of this level's Gaussians moved to ``means`` / ``quats``."""
        # the Gaussians were checked once (_check_params) and are only moved rigidly since
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


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------
@dataclass
class RegistrationResult:
    """``pose`` (4x4 float64, CT world mm -> X-ray frame), its full-resolution ``similarity``,
    ``success`` (the decision of :func:`rgs_engine.registration.confidence.assess`: the pose
    may be used), ``estimated_error_mm`` (its estimate of the pose's mTRE over the structure),
    ``evidence`` (what the decision rests on), ``seconds``, ``initial_similarity`` (at
    ``init``), ``threshold`` (the similarity floor of the decision), ``history`` (per stage),
    ``mtre_mm`` / ``initial_mtre_mm`` when a ground truth and target points were given."""

    pose: np.ndarray
    similarity: float
    success: bool
    seconds: float
    initial_similarity: float
    threshold: float
    init: np.ndarray
    history: list[dict] = field(default_factory=list)
    estimated_error_mm: float | None = None
    evidence: dict = field(default_factory=dict)
    mtre_mm: float | None = None
    initial_mtre_mm: float | None = None

    def to_dict(self) -> dict:
        out = {"ct_to_xray": self.pose.tolist(), "similarity": self.similarity,
               "success": self.success, "estimated_error_mm": self.estimated_error_mm,
               "evidence": self.evidence, "threshold": self.threshold,
               "initial_similarity": self.initial_similarity, "seconds": self.seconds,
               "init": self.init.tolist()}
        if self.mtre_mm is not None:
            out["mtre_mm"] = self.mtre_mm
            out["initial_mtre_mm"] = self.initial_mtre_mm
        out["history"] = self.history
        return out


def _check_params(params: dict) -> dict[str, torch.Tensor]:
    need = ("means", "scales", "quats", "densities")
    if not isinstance(params, dict) or any(k not in params for k in need):
        raise RgsInputError(f"Gaussians must be a dict with {', '.join(need)}")
    dev = runtime.ensure()
    out = {k: torch.as_tensor(params[k]).detach().to(device=dev, dtype=torch.float32).contiguous()
           for k in need}
    if out["means"].dim() != 2 or out["means"].shape[0] == 0:
        raise RgsInputError("registration needs at least one Gaussian")
    check_params(out["means"], out["scales"], out["quats"], out["densities"])
    return out


def render(params: dict[str, torch.Tensor], pose, geometry: Geometry) -> torch.Tensor:
    """DRR (V, H, W) of the Gaussians at ``pose`` (4x4 CT -> X-ray) in ``geometry``."""
    p = _check_params(params)
    with torch.no_grad():
        m = torch.as_tensor(rigid.check_rigid(pose, "pose"), dtype=torch.float32, device=p["means"].device)
        means, quats = rigid.rigid_transform_gaussians(p["means"], p["quats"], m)
        return splat(means, p["scales"], quats, p["densities"], geometry, validate=False)  # checked above


def _moved(lvl: _Level, up: PoseUpload, n_struct: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``lvl``'s Gaussians (means, quats) moved by the poses of ``up``: all of them by its one
    pose, or the structure's first ``n_struct`` by the first and the context's by the second."""
    return rigid.move_packed(lvl.means, lvl.quats, up.flat, n_struct)


def _step(lvl: _Level, up: PoseUpload, n_struct: int, match: bool = False, weigh: bool = False) -> torch.Tensor:
    """One refinement step's per-view similarity (V,) (device) at the poses of ``up``, and the
    gradient of the negative of its mean w.r.t. each pose vector in its ``.grad``
    (:meth:`PoseUpload.backward`). No autograd: the rigid move, the splat and the similarity
    each chain their closed-form adjoint (an autograd graph per step cost more host time than
    the GPU's work). ``match``: first put the X-rays in the contrast of this DRR
    (:meth:`_Level.match`); ``weigh``: and weigh its channels by the structure there
    (:meth:`_Level.weigh`)."""
    with torch.no_grad():
        means, quats = _moved(lvl, up, n_struct)
        drr, vjp = lvl.drr_vjp(means, quats)
        if match:
            lvl.match(drr)
        if weigh:
            lvl.weigh(means, quats, drr, n_struct)
        sims, saved = lvl.target.forward(drr)
        g_means, _, g_quats, _ = vjp(lvl.target.backward(saved, lvl.mean_cotangent))
        up.backward(rigid.move_packed_vjp(lvl.means, lvl.quats, g_means, g_quats, n_struct, len(up.zs)))
        return sims


def score_poses(level: _Level, poses) -> np.ndarray:
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


def register(xrays: XRaySet, params: dict, init=None, *, context: dict | None = None,
             centre: Sequence[float] | None = None, scales: Sequence[int] = DEFAULT_SCALES,
             context_scales: int | None = None, candidates: int = 256, capture_mm: float = 40.0,
             capture_deg: float = 10.0, keep: int = 1, steps: Sequence[int] = (30, 20, 15),
             lr_mm: float = 2.0, lr_deg: float = 1.0, blur: float = 0.5, margin_mm: float = 10.0,
             context_margin_mm: float = 30.0, threshold: float = SUCCESS_THRESHOLD,
             ground_truth=None, target_points=None, seed: int = 0, mask: bool = True,
             match: bool = True, match_each: bool = True, structure_weights: bool = True,
             progress: Callable[[str, int, int], None] | None = None) -> RegistrationResult:
    """Register the Gaussians ``params`` (CT world mm) to ``xrays``: a :class:`RegistrationResult`.

    ``init`` (4x4, default identity) is the starting ``ct_to_xray``. ``scales`` are the detector
    pooling factors, coarse to fine; ``steps`` the Adam steps at each (the last value repeats).
    The global stage scores ``candidates`` poses (0 skips it) within ``capture_mm`` /
    ``capture_deg`` of ``init`` at the coarsest scale; the ``keep`` best (with ``keep`` > 1,
    ``init`` always among them) climb that scale, and the one scoring best at full resolution
    goes on through the finer scales (``keep`` > 1 adds :func:`.confidence.rival_mm`'s rival
    basin to the estimate). Adam's learning rates start at ``lr_mm`` (translation) and
    ``lr_deg`` (rotation) and shrink by :data:`LR_DECAY` at each finer scale. ``blur`` widens
    the Gaussians at coarse scales by that many coarse pixels (at the object).

    ``mask`` drops the X-ray pixels that show no anatomy (:mod:`.masking`); ``match`` puts the
    X-rays in the DRR's contrast at each refinement scale's start pose and, in the global
    stage, with ``match_each``, in each candidate's own contrast (:class:`.similarity.RankMatch`;
    without it, in the contrast of the DRR at ``init``, which distorts the X-rays when
    ``init`` is far off).

    ``structure_weights`` (with a ``context``): each view's similarity weighs its intensity
    NCC and its gradient NCC by the structure's share of the DRR's signal in each
    (:func:`.similarity.structure_coefs`), computed once per level at its reference pose (each
    scale's start, the global stage's ``init``, the scored pose of the final score and the
    confidence probe) instead of 1/2 each. On by default: on the full-size GPU sweep
    (``validation/registration.md``, NVIDIA H200, 220 registrations, against the unweighted
    similarity on the same lease) 184 of 189 right poses flagged against 174 of 187, 0 of 31
    wrong poses flagged against 1 of 33 (a distorted T10 pose 2.08 mm off, estimated 0.73 mm;
    weighted, that trial ended 1.98 mm off, flagged: a near miss either way), worst distorted
    bin 90 % against 80 %, median mTRE 0.42 against 0.41 mm
    (``validation/registration_design.md``, "Weighing each view by what it shows of the
    structure"). Without a ``context`` it changes nothing.

    ``context`` (optional, same dict form): Gaussians of everything around the structure
    that ``params`` describes, e.g. the rest of the CT around one vertebra
    (:func:`rgs_engine.registration.ct_gaussians.gaussians_for_ct` with ``complement``), so that
    the DRR shows all the anatomy the X-rays show. The global stage and the first
    ``context_scales`` scales (default: all) move structure and context together (the
    anatomy around the structure tells neighbouring vertebrae apart); finer scales, if any,
    give the context a pose of its own, so the pose found is the structure's alone
    (history's ``context_offset`` says how far the two parted). The history's global stage
    says where each kept start came from (``best_source``: the Sobol set, the image shifts of
    :mod:`.shift_search`, or the second pass near either).

    Only a window of each view is compared: the projection of ``params`` at the current pose
    grown by ``margin_mm`` (at the object), or by ``context_margin_mm`` while structure and
    context move together; the global stage's window also spans the capture range.

    ``ground_truth`` (4x4) with ``target_points`` (N, 3, CT world mm) gives ``mtre_mm``; the
    ground truth is never used by the optimisation. With a ground truth, the history also
    holds the similarity at the true pose (diagnostics, left out of ``seconds``): the global
    stage's ``at_truth`` (the candidates' scale), each refinement scale's ``at_truth`` (that
    scale's window and contrast match; ``first`` / ``similarity`` are the search's first and
    last step there) and a last ``truth`` stage (the full-resolution score ``similarity`` is).
    The history's ``timing`` stage gives the seconds from the start (as ``seconds`` counts
    them) at the end of the refinement, the final score, the basin check (when run) and the
    confidence (the global stage's entry has its own ``t``).
    ``progress(stage, done, total)`` is called as the stages advance.

    The measurements behind these defaults (one start, per-candidate contrast match, context
    moving with the structure at every scale, the step counts) and what was tried instead:
    ``validation/registration_design.md``.
    """
    t0 = time.perf_counter()
    if not isinstance(xrays, XRaySet):
        raise RgsInputError("xrays must be an rgs_engine.io.xrays.XRaySet (load_xrays(folder))")
    p = _check_params(params)
    ctx = _check_params(context) if context is not None else None
    dev = p["means"].device
    init_m = np.eye(4) if init is None else rigid.check_rigid(init, "init pose")
    if any(int(f) < 1 for f in scales):
        raise RgsInputError(f"scales must be positive pooling factors, got {list(scales)}")
    scales = sorted({int(f) for f in scales} | {1}, reverse=True)
    steps = list(steps) + [steps[-1]] * max(0, len(scales) - len(steps))
    means_np = p["means"].double().cpu().numpy()
    if centre is None:
        wts = (p["densities"] * p["scales"].prod(dim=1)).double()
        centre = ((p["means"].double() * wts[:, None]).sum(0) / wts.sum().clamp_min(EPS)).cpu().numpy()
    centre = np.asarray(centre, dtype=np.float64).reshape(3)
    c_x = rigid.apply(init_m, centre)
    images = xrays.images.to(device=dev, dtype=torch.float32)
    weights = exposure_mask(images) if mask else torch.ones_like(images)
    geo = xrays.geometry
    if geo.mode == "cone":
        src = rigid.apply(rigid.invert(init_m), geo.sources.numpy())
        lo, hi = means_np.min(axis=0), means_np.max(axis=0)
        inside = np.nonzero(((src > lo) & (src < hi)).all(axis=1))[0]
        if inside.size:
            raise RgsInputError(
                f"the source of view {int(inside[0])} lies inside the CT (at {np.round(src[inside[0]], 1).tolist()} "
                "mm in CT world at the start pose): check the X-ray geometry (vectors in mm, X-ray "
                "frame) and --init")
    pitch = _object_pitch(geo, c_x)
    extent = float(np.linalg.norm(means_np - centre, axis=1).max())
    history: list[dict] = []

    gauss = p if ctx is None else {k: torch.cat([p[k], ctx[k]]) for k in p}
    n_struct = p["means"].shape[0]
    # the pose vectors and their algebra live on the host in float64 (a few dozen tiny ops
    # per step that would each be a kernel launch on a GPU); one packed upload per DRR
    q_init = rigid.rotmat_to_quat(torch.as_tensor(init_m[:3, :3])).numpy()
    lr_vec = np.array([math.radians(lr_deg)] * 3 + [lr_mm] * 3)

    def pose_of(z: torch.Tensor) -> np.ndarray:
        return delta_matrix(z.detach().numpy() * lr_vec, c_x) @ init_m

    def level(factor: int, pose: np.ndarray, margin: float) -> _Level:
        """All Gaussians at ``factor`` on the window around the structure at ``pose``."""
        return _Level(factor, geo, images, weights, Crop.around(geo, rigid.apply(pose, means_np), margin / pitch),
                      gauss, c_x, blur)

    def upload(zs: list[torch.Tensor], grad: bool = False) -> PoseUpload:
        return PoseUpload(zs, lr_vec, init_m, c_x, q_init, dev, grad)

    def moved_drr(lvl: _Level, z: torch.Tensor, zc: torch.Tensor | None) -> torch.Tensor:
        """DRR with the structure at ``z`` and the context at ``zc`` (at ``z`` when None)."""
        return lvl.drr(*_moved(lvl, upload([z] if zc is None else [z, zc]), n_struct))

    weighted = structure_weights and ctx is not None

    def weigh(lvl: _Level, z: torch.Tensor, zc: torch.Tensor | None, drr: torch.Tensor) -> None:
        """With ``structure_weights``: weigh ``lvl``'s channels by the structure at ``z``."""
        if weighted:
            with torch.no_grad():
                lvl.weigh(*_moved(lvl, upload([z] if zc is None else [z, zc]), n_struct), drr, n_struct)

    def matched_level(factor: int, z: torch.Tensor, zc: torch.Tensor | None, margin: float
                      ) -> tuple[_Level, torch.Tensor]:
        """:func:`level` at the pose ``z`` with its X-rays matched to the DRR there (and its
        channels weighed there), and that DRR."""
        lvl = level(factor, pose_of(z), margin)
        with torch.no_grad():
            drr = moved_drr(lvl, z, zc)
        if match:
            lvl.match(drr)
        weigh(lvl, z, zc, drr)
        return lvl, drr

    def reference_contrast(lvl: _Level, drr: torch.Tensor) -> None:
        """The global stage's and the basin check's contrast: each candidate's own
        (:meth:`_Level.match_each`) or the X-rays mapped once to ``drr`` (:meth:`_Level.match`)."""
        if match_each:
            lvl.match_each(drr)
        else:
            lvl.match(drr)

    def final_score(z: torch.Tensor, zc: torch.Tensor | None) -> float:
        lvl, drr = matched_level(1, z, zc, margin_mm)
        with torch.no_grad():
            return float(similarity(drr, lvl.xrays, FINAL_SCALES, lvl.weights, lvl.structure))

    # the ground truth's unit-scaled pose vector: diagnostics in the history only
    z_truth = None
    if ground_truth is not None:
        truth_xi = delta_xi(rigid.check_rigid(ground_truth, "ground truth pose") @ rigid.invert(init_m), c_x)
        z_truth = torch.as_tensor(truth_xi / lr_vec)
    untimed = [0.0]  # seconds spent on those diagnostics, left out of ``seconds``

    def elapsed() -> float:
        """Seconds since the start, without the ground-truth diagnostics."""
        return time.perf_counter() - t0 - untimed[0]

    def at_truth(score: Callable[..., torch.Tensor], *args) -> float | None:
        """``score(*args)`` (a similarity at the true pose) when there is a ground truth, untimed."""
        if z_truth is None:
            return None
        t = time.perf_counter()
        with torch.no_grad():
            value = float(score(*args))
        untimed[0] += time.perf_counter() - t
        return value

    zero = torch.zeros(6, dtype=torch.float64)
    initial = final_score(zero, None)
    history.append({"stage": "init", "similarity": initial})

    # ---- global stage: the structure and its context move together ----------------------
    rigid_margin = margin_mm if ctx is None else context_margin_mm
    starts = [np.zeros(6)]
    if candidates > 1:
        coarse = level(scales[0], init_m, rigid_margin + capture_mm + extent * math.radians(capture_deg))
        offs = sobol_offsets(candidates, capture_mm, capture_deg, seed)
        shifts = 0
        if match:
            with torch.no_grad():
                drr0 = moved_drr(coarse, zero, None)
                reference_contrast(coarse, drr0)
                weigh(coarse, zero, None, drr0)
                if SHIFT_PEAKS:  # and translations from each view's best image shifts
                    signs = coarse.rank.signs if coarse.rank else polarity(coarse.raw, drr0, coarse.weights)
                    moves = translation_candidates(drr0, coarse.raw, coarse.weights, signs, coarse.geometry,
                                                   c_x, capture_mm, peaks=SHIFT_PEAKS)
                    offs, shifts = np.concatenate([offs, np.pad(moves, ((0, 0), (3, 0)))]), len(moves)
        sims = score_poses(coarse, delta_matrix(offs, c_x) @ init_m).mean(axis=1)
        # second pass: a Sobol set a quarter the size of the range around each of the best few
        local = sobol_offsets(max(candidates // LOCAL_SEEDS, 1), capture_mm / 4, capture_deg / 4, seed + 1)
        seeds = np.argsort(-sims)[:LOCAL_SEEDS]
        near = np.concatenate([offs[i] + local for i in seeds])
        sims = np.concatenate([sims, score_poses(coarse, delta_matrix(near, c_x) @ init_m).mean(axis=1)])
        # where each scored pose came from: the Sobol set, the image shifts, the second pass around either
        source = ["sobol"] * (len(offs) - shifts) + ["shift"] * shifts
        source += [f"near {source[i]}" for i in seeds for _ in range(len(local))]
        offs = np.concatenate([offs, near])
        order = np.argsort(-sims)[:max(1, keep)]
        if keep > 1 and 0 not in order:  # init (row 0) is always one of several starts
            order = np.concatenate([[0], order[:-1]])
        starts = [offs[i] for i in order]
        history.append({"stage": "global", "scale": scales[0], "candidates": candidates,
                        "scored": len(offs), "shift_candidates": shifts, "window": list(coarse.geometry.det_shape),
                        "best": [float(sims[i]) for i in order], "best_source": [source[i] for i in order],
                        "at_init": float(sims[0]),
                        "at_truth": at_truth(lambda: score_poses(coarse, [pose_of(z_truth)]).mean()),
                        "t": elapsed()})
        if progress:
            progress("global", 1, 1)

    # ---- refinement: rigid, then (with a context) the structure on its own pose ----------
    # every kept start climbs the coarsest scale; the one scoring best at full resolution
    # goes on through the finer scales and is the result
    total = len(starts) * steps[0] + sum(steps[1:len(scales)])
    done = 0

    def climb(run: dict, si: int) -> None:
        """Adam at scale ``scales[si]`` on ``run``'s pose vectors (``z``, ``zc``); appends its trace."""
        nonlocal done
        f = scales[si]
        if ctx is not None and context_scales is not None and si >= context_scales and run["zc"] is None:
            run["zc"] = run["z"].clone()
        z, zc = run["z"], run["zc"]
        lvl = level(f, pose_of(z), rigid_margin if zc is None else margin_mm)
        lr = LR_DECAY ** si
        opt = Adam([z] if zc is None else [z, zc], lr=lr)
        n, first, sims = int(steps[si]), None, None
        for it in range(n):
            for g in opt.param_groups:  # cosine-ish decay within the scale
                g["lr"] = lr * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * it / max(n, 1))))
            up = upload([z] if zc is None else [z, zc], grad=True)
            sims = _step(lvl, up, n_struct, match=it == 0 and match,  # (the scale's start pose's contrast)
                         weigh=it == 0 and weighted)
            if it == 0:
                first = float(sims.mean())
            opt.step()
            done += 1
            if progress:
                progress("refine", done, total)
        run["trace"].append({"scale": f, "context": "none" if ctx is None else ("rigid" if zc is None else "free"),
                             "window": list(lvl.geometry.det_shape), "first": first,
                             "similarity": None if sims is None else float(sims.mean()),
                             "at_truth": at_truth(lambda lv, free: lv.similarity(
                                 moved_drr(lv, z_truth, z_truth if free else None)).mean(), lvl, zc is not None)})

    def basin_check(z: torch.Tensor) -> dict:
        """The global stage's second pass around the registered pose ``z``: a Sobol set of
        poses within a quarter of the capture range, scored at the coarsest scale (each in
        its own contrast, as the global stage's). A probe further than
        :data:`~.confidence.RIVAL_MM` from the pose that scores above it (by
        :data:`BASIN_MARGIN`) at that scale is a basin the refinement did not reach and the
        scales disagree on: its distance goes to the decision as a rival basin.

        Measured: the H200 sweep of 2026-12-06 flagged a distorted T4 pose 11.4 mm off
        (estimated 1.21 mm) whose truth scored 0.763 at the coarsest scale against the pose's
        0.720, and 0.579 against 0.599 at full resolution."""
        pose = pose_of(z)
        c_pose = rigid.apply(pose, centre)
        reach_mm, reach_deg = capture_mm / 4, capture_deg / 4
        lvl = level(scales[0], pose, rigid_margin + reach_mm + extent * math.radians(reach_deg))
        with torch.no_grad():
            drr = moved_drr(lvl, z, None)
            if match:
                reference_contrast(lvl, drr)
        weigh(lvl, z, None, drr)
        offs = sobol_offsets(max(candidates // LOCAL_SEEDS, 1), reach_mm, reach_deg, seed + 2)  # row 0: the pose
        probes = delta_matrix(offs, c_pose) @ pose
        sims = score_poses(lvl, probes).mean(axis=1)
        best = int(np.argmax(sims))
        above = np.nonzero(sims > sims[0] + BASIN_MARGIN)[0]
        # distances only where they matter: each mTRE over the structure's points is host work
        dist = {i: mtre(probes[i], pose, means_np) for i in {best, *above.tolist()}}
        rival = max((dist[i] for i in above.tolist() if dist[i] > confidence.RIVAL_MM), default=0.0)
        return {"scale": scales[0], "scored": len(offs), "at_pose": float(sims[0]), "best": float(sims[best]),
                "best_from_pose_mm": float(dist[best]), "rival_mm": float(rival)}

    runs = []
    for k, x0 in enumerate(starts):
        # optimise unit-scaled vectors: xi = z * lr_vec, Adam's lr 1 moves ~lr_vec per step
        run = {"start": k, "x0": x0, "z": torch.as_tensor(x0 / lr_vec),
               "zc": None, "trace": []}
        climb(run, 0)
        runs.append(run)
    lead, rival = runs[0], 0.0
    if len(runs) > 1:  # the full-resolution score after the coarsest scale chooses the lead
        for run in runs:
            run["after_coarsest"] = final_score(run["z"], run["zc"])
        lead = max(runs, key=lambda r: r["after_coarsest"])
        lead_coarse = pose_of(lead["z"])
        for run in runs:  # how far each start's coarse end lies from the lead's (mm over the structure)
            run["from_lead_mm"] = mtre(pose_of(run["z"]), lead_coarse, means_np)
        rival = confidence.rival_mm([(r["after_coarsest"], r["from_lead_mm"]) for r in runs])
    for si in range(1, len(scales)):
        climb(lead, si)
    ends = {"refinement": elapsed()}  # seconds from the start at the end of each later stage
    sim_final = final_score(lead["z"], lead["zc"])
    ends["final score"] = elapsed()
    if candidates > 1 and lead["zc"] is None:  # basin check around the registered pose
        basin = basin_check(lead["z"])
        history.append({"stage": "basin check", **basin, "t": elapsed()})
        ends["basin check"] = elapsed()
        rival = max(rival, basin["rival_mm"])
    for run in runs:
        z, zc, x0 = run["z"], run["zc"], run["x0"]
        pose = pose_of(z)
        entry = {"stage": "refine", "start": run["start"], "xi_start": np.asarray(x0).tolist(), "trace": run["trace"],
                 "similarity": sim_final if run is lead else run["after_coarsest"], "t": elapsed()}
        if len(runs) > 1:
            entry["similarity_after_coarsest"] = run["after_coarsest"]
            entry["coarse_end_from_lead_mm"] = run["from_lead_mm"]
        if run is not lead:
            entry["stopped_after_scale"] = scales[0]
        if z_truth is not None and target_points is not None:
            entry["start_mtre_mm"] = mtre(delta_matrix(x0, c_x) @ init_m, ground_truth, target_points)
        if zc is not None:
            rel = rigid.compose(pose_of(zc), rigid.invert(pose))
            entry["context_offset"] = {"mm": float(np.linalg.norm(rigid.apply(rel, c_x) - c_x)),
                                       "deg": rigid.rotation_angle_deg(rel)}
        history.append(entry)

    z, zc = lead["z"], lead["zc"]
    pose = pose_of(z)
    t_conf = time.perf_counter()
    with torch.no_grad():
        factor = max(1, int(CONFIDENCE_PITCH_MM // pitch))
        probe = matched_level(factor, z, zc, margin_mm)[0]
        wide = level(max(1, round(CONSISTENCY_PITCH_MM / pitch)), pose, CONSISTENCY_MARGIN_MM)
        wide_drr, c_pose = moved_drr(wide, z, zc), rigid.apply(pose, centre)
        shifts, view_shift = consistency.measure(wide_drr, wide.raw, wide.weights, wide.geometry, c_pose,
                                                 CONSISTENCY_REACH_MM)
        conf = confidence.assess(lambda poses: score_poses(probe, poses), pose, means_np, sim_final,
                                 similarity_floor=threshold, seed=seed, rival=rival, view_shift=view_shift,
                                 **confidence.for_pitch(factor * pitch))
    conf.evidence["view_shifts_mm"] = np.round(shifts, 3).tolist()
    runtime.sync()
    conf.evidence["seconds"] = time.perf_counter() - t_conf
    if progress:
        progress("confidence", 1, 1)
    runtime.sync()
    result = RegistrationResult(pose=pose, similarity=sim_final, success=conf.success,
                                estimated_error_mm=conf.estimated_error_mm, evidence=conf.evidence,
                                seconds=elapsed(), initial_similarity=initial,
                                threshold=threshold, init=init_m, history=history)
    history.append({"stage": "timing", "ends": {**ends, "confidence": result.seconds}})
    if ground_truth is not None and target_points is not None:
        truth = rigid.check_rigid(ground_truth, "ground truth pose")
        result.mtre_mm = mtre(pose, truth, target_points)
        result.initial_mtre_mm = mtre(init_m, truth, target_points)
    if z_truth is not None:
        history.append({"stage": "truth", "similarity": final_score(z_truth, None)})
    return result
