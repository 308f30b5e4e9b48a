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
from typing import NamedTuple

import numpy as np
import torch

from ..core import rigid, runtime
from ..core.adam import Adam
from ..core.errors import RgsInputError
from ..core.gaussians import check_params
from ..core.geometry import Geometry
from ..core.splatting import splat
from ..io.xrays import XRaySet
from . import confidence, consistency
from .levels import Level, moved, object_pitch, refine_step, score_poses
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
from .windows import EPS, Crop

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


class _Settings(NamedTuple):
    """:func:`register`'s keyword settings (its docstring gives their meaning and units)."""

    scales: Sequence[int]
    context_scales: int | None
    candidates: int
    capture_mm: float
    capture_deg: float
    keep: int
    steps: Sequence[int]
    lr_mm: float
    lr_deg: float
    blur: float
    margin_mm: float
    context_margin_mm: float
    threshold: float
    seed: int
    mask: bool
    match: bool
    match_each: bool
    structure_weights: bool


@dataclass
class _Run:
    """One start's climb: its unit-scaled pose vectors (``z`` the structure's, ``zc`` the
    context's once it moves on its own; ``xi = z * lr_vec``), the start ``x0`` (6,) and the
    trace of each scale it climbed."""

    start: int
    x0: np.ndarray
    z: torch.Tensor
    zc: torch.Tensor | None = None
    trace: list[dict] = field(default_factory=list)
    after_coarsest: float | None = None  # full-resolution score after the coarsest scale (several starts)
    from_lead_mm: float | None = None  # how far its coarse end lies from the lead's (mm over the structure)


class _Registration:
    """One call of :func:`register`: the checked inputs and the pose parameterisation
    (:meth:`__init__`), and the stages as methods, run in order by :meth:`run`: the global
    stage, the climbs of each start and of the lead over the finer scales, the final score,
    the basin check and the confidence. Pose vectors and their algebra live on the host in
    float64 (a few dozen tiny ops per step that would each be a kernel launch on a GPU); each
    DRR gets its poses in one packed upload (:class:`.poses.PoseUpload`)."""

    def __init__(self, xrays: XRaySet, params: dict, init, context: dict | None, centre: Sequence[float] | None,
                 settings: _Settings, ground_truth=None, target_points=None,
                 progress: Callable[[str, int, int], None] | None = None):
        self.t0 = time.perf_counter()
        self.s = s = settings
        if not isinstance(xrays, XRaySet):
            raise RgsInputError("xrays must be an rgs_engine.io.xrays.XRaySet (load_xrays(folder))")
        p = _check_params(params)
        ctx = _check_params(context) if context is not None else None
        dev = p["means"].device
        self.init_m = init_m = np.eye(4) if init is None else rigid.check_rigid(init, "init pose")
        if any(int(f) < 1 for f in s.scales):
            raise RgsInputError(f"scales must be positive pooling factors, got {list(s.scales)}")
        self.scales = sorted({int(f) for f in s.scales} | {1}, reverse=True)
        self.steps = list(s.steps) + [s.steps[-1]] * max(0, len(self.scales) - len(s.steps))
        self.means_np = means_np = p["means"].double().cpu().numpy()
        if centre is None:
            wts = (p["densities"] * p["scales"].prod(dim=1)).double()
            centre = ((p["means"].double() * wts[:, None]).sum(0) / wts.sum().clamp_min(EPS)).cpu().numpy()
        self.centre = np.asarray(centre, dtype=np.float64).reshape(3)
        self.c_x = rigid.apply(init_m, self.centre)
        self.images = images = xrays.images.to(device=dev, dtype=torch.float32)
        self.weights = exposure_mask(images) if s.mask else torch.ones_like(images)
        self.geo = geo = xrays.geometry
        if geo.mode == "cone":
            src = rigid.apply(rigid.invert(init_m), geo.sources.numpy())
            lo, hi = means_np.min(axis=0), means_np.max(axis=0)
            inside = np.nonzero(((src > lo) & (src < hi)).all(axis=1))[0]
            if inside.size:
                raise RgsInputError(
                    f"the source of view {int(inside[0])} lies inside the CT (at {np.round(src[inside[0]], 1).tolist()} "
                    "mm in CT world at the start pose): check the X-ray geometry (vectors in mm, X-ray "
                    "frame) and --init")
        self.pitch = object_pitch(geo, self.c_x)
        self.extent = float(np.linalg.norm(means_np - self.centre, axis=1).max())
        self.history: list[dict] = []
        self.has_context = ctx is not None
        self.gauss = p if ctx is None else {k: torch.cat([p[k], ctx[k]]) for k in p}
        self.n_struct = p["means"].shape[0]
        self.dev = dev
        self.q_init = rigid.rotmat_to_quat(torch.as_tensor(init_m[:3, :3])).numpy()
        self.lr_vec = np.array([math.radians(s.lr_deg)] * 3 + [s.lr_mm] * 3)
        self.weighted = s.structure_weights and ctx is not None
        self.rigid_margin = s.margin_mm if ctx is None else s.context_margin_mm
        self.progress = progress
        self.ground_truth, self.target_points = ground_truth, target_points
        # the ground truth's unit-scaled pose vector: diagnostics in the history only
        self.z_truth = None
        if ground_truth is not None:
            truth_xi = delta_xi(rigid.check_rigid(ground_truth, "ground truth pose") @ rigid.invert(init_m), self.c_x)
            self.z_truth = torch.as_tensor(truth_xi / self.lr_vec)
        self.untimed = 0.0  # seconds spent on those diagnostics, left out of ``seconds``
        self.done = self.total = 0  # refinement steps taken / planned (progress)

    # ---- poses, levels and scores -------------------------------------------------------
    def pose_of(self, z: torch.Tensor) -> np.ndarray:
        """The 4x4 pose (CT -> X-ray) of the unit-scaled pose vector ``z``."""
        return delta_matrix(z.detach().numpy() * self.lr_vec, self.c_x) @ self.init_m

    def level(self, factor: int, pose: np.ndarray, margin: float) -> Level:
        """All Gaussians at ``factor`` on the window around the structure at ``pose``."""
        crop = Crop.around(self.geo, rigid.apply(pose, self.means_np), margin / self.pitch)
        return Level(factor, self.geo, self.images, self.weights, crop, self.gauss, self.c_x, self.s.blur)

    def upload(self, z: torch.Tensor, zc: torch.Tensor | None, grad: bool = False) -> PoseUpload:
        """The poses of the structure at ``z`` and the context at ``zc`` (at ``z`` when None)."""
        return PoseUpload([z] if zc is None else [z, zc], self.lr_vec, self.init_m, self.c_x, self.q_init,
                          self.dev, grad)

    def moved(self, lvl: Level, z: torch.Tensor, zc: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``lvl``'s Gaussians (means, quats) with the structure at ``z`` and the context at ``zc``."""
        return moved(lvl, self.upload(z, zc), self.n_struct)

    def moved_drr(self, lvl: Level, z: torch.Tensor, zc: torch.Tensor | None) -> torch.Tensor:
        """DRR with the structure at ``z`` and the context at ``zc`` (at ``z`` when None)."""
        return lvl.drr(*self.moved(lvl, z, zc))

    def weigh(self, lvl: Level, z: torch.Tensor, zc: torch.Tensor | None, drr: torch.Tensor) -> None:
        """With ``structure_weights``: weigh ``lvl``'s channels by the structure at ``z``."""
        if self.weighted:
            with torch.no_grad():
                lvl.weigh(*self.moved(lvl, z, zc), drr, self.n_struct)

    def matched_level(self, factor: int, z: torch.Tensor, zc: torch.Tensor | None, margin: float
                      ) -> tuple[Level, torch.Tensor]:
        """:meth:`level` at the pose ``z`` with its X-rays matched to the DRR there (and its
        channels weighed there), and that DRR."""
        lvl = self.level(factor, self.pose_of(z), margin)
        with torch.no_grad():
            drr = self.moved_drr(lvl, z, zc)
        if self.s.match:
            lvl.match(drr)
        self.weigh(lvl, z, zc, drr)
        return lvl, drr

    def reference_contrast(self, lvl: Level, drr: torch.Tensor) -> None:
        """The global stage's and the basin check's contrast: each candidate's own
        (:meth:`Level.match_each`) or the X-rays mapped once to ``drr`` (:meth:`Level.match`)."""
        if self.s.match_each:
            lvl.match_each(drr)
        else:
            lvl.match(drr)

    def final_score(self, z: torch.Tensor, zc: torch.Tensor | None) -> float:
        """The full-resolution similarity (:data:`FINAL_SCALES` poolings) at ``z`` / ``zc``."""
        lvl, drr = self.matched_level(1, z, zc, self.s.margin_mm)
        with torch.no_grad():
            return float(similarity(drr, lvl.xrays, FINAL_SCALES, lvl.weights, lvl.structure))

    def elapsed(self) -> float:
        """Seconds since the start, without the ground-truth diagnostics."""
        return time.perf_counter() - self.t0 - self.untimed

    def at_truth(self, score: Callable[..., torch.Tensor], *args) -> float | None:
        """``score(*args)`` (a similarity at the true pose) when there is a ground truth, untimed."""
        if self.z_truth is None:
            return None
        t = time.perf_counter()
        with torch.no_grad():
            value = float(score(*args))
        self.untimed += time.perf_counter() - t
        return value

    # ---- stages -------------------------------------------------------------------------
    def global_stage(self) -> list[np.ndarray]:
        """The starts (pose vectors (6,), best first) of the refinement: the ``keep`` best of
        the Sobol candidates, the image-shift translations and the second pass around the
        :data:`LOCAL_SEEDS` best, scored at the coarsest scale with the structure and its
        context moving together; ``[0]`` (``init``) without candidates."""
        s, c_x, init_m = self.s, self.c_x, self.init_m
        if s.candidates <= 1:
            return [np.zeros(6)]
        zero = torch.zeros(6, dtype=torch.float64)
        coarse = self.level(self.scales[0], init_m,
                            self.rigid_margin + s.capture_mm + self.extent * math.radians(s.capture_deg))
        offs = sobol_offsets(s.candidates, s.capture_mm, s.capture_deg, s.seed)
        shifts = 0
        if s.match:
            with torch.no_grad():
                drr0 = self.moved_drr(coarse, zero, None)
                self.reference_contrast(coarse, drr0)
                self.weigh(coarse, zero, None, drr0)
                if SHIFT_PEAKS:  # and translations from each view's best image shifts
                    signs = coarse.rank.signs if coarse.rank else polarity(coarse.raw, drr0, coarse.weights)
                    moves = translation_candidates(drr0, coarse.raw, coarse.weights, signs, coarse.geometry,
                                                   c_x, s.capture_mm, peaks=SHIFT_PEAKS)
                    offs, shifts = np.concatenate([offs, np.pad(moves, ((0, 0), (3, 0)))]), len(moves)
        sims = score_poses(coarse, delta_matrix(offs, c_x) @ init_m).mean(axis=1)
        # second pass: a Sobol set a quarter the size of the range around each of the best few
        local = sobol_offsets(max(s.candidates // LOCAL_SEEDS, 1), s.capture_mm / 4, s.capture_deg / 4, s.seed + 1)
        seeds = np.argsort(-sims)[:LOCAL_SEEDS]
        near = np.concatenate([offs[i] + local for i in seeds])
        sims = np.concatenate([sims, score_poses(coarse, delta_matrix(near, c_x) @ init_m).mean(axis=1)])
        # where each scored pose came from: the Sobol set, the image shifts, the second pass around either
        source = ["sobol"] * (len(offs) - shifts) + ["shift"] * shifts
        source += [f"near {source[i]}" for i in seeds for _ in range(len(local))]
        offs = np.concatenate([offs, near])
        order = np.argsort(-sims)[:max(1, s.keep)]
        if s.keep > 1 and 0 not in order:  # init (row 0) is always one of several starts
            order = np.concatenate([[0], order[:-1]])
        self.history.append({"stage": "global", "scale": self.scales[0], "candidates": s.candidates,
                             "scored": len(offs), "shift_candidates": shifts, "window": list(coarse.geometry.det_shape),
                             "best": [float(sims[i]) for i in order], "best_source": [source[i] for i in order],
                             "at_init": float(sims[0]),
                             "at_truth": self.at_truth(lambda: score_poses(coarse, [self.pose_of(self.z_truth)]).mean()),
                             "t": self.elapsed()})
        if self.progress:
            self.progress("global", 1, 1)
        return [offs[i] for i in order]

    def climb(self, run: _Run, si: int) -> None:
        """Adam at scale ``scales[si]`` on ``run``'s pose vectors (``z``, ``zc``); appends its
        trace. From scale ``context_scales`` on, the context gets a pose of its own."""
        s, f = self.s, self.scales[si]
        if self.has_context and s.context_scales is not None and si >= s.context_scales and run.zc is None:
            run.zc = run.z.clone()
        z, zc = run.z, run.zc
        lvl = self.level(f, self.pose_of(z), self.rigid_margin if zc is None else s.margin_mm)
        lr = LR_DECAY ** si
        opt = Adam([z] if zc is None else [z, zc], lr=lr)
        n, first, sims = int(self.steps[si]), None, None
        for it in range(n):
            for g in opt.param_groups:  # cosine-ish decay within the scale
                g["lr"] = lr * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * it / max(n, 1))))
            up = self.upload(z, zc, grad=True)
            sims = refine_step(lvl, up, self.n_struct, match=it == 0 and s.match,  # (the scale's start pose's contrast)
                               weigh=it == 0 and self.weighted)
            if it == 0:
                first = float(sims.mean())
            opt.step()
            self.done += 1
            if self.progress:
                self.progress("refine", self.done, self.total)
        z_truth = self.z_truth
        run.trace.append({"scale": f, "context": "none" if not self.has_context else ("rigid" if zc is None else "free"),
                          "window": list(lvl.geometry.det_shape), "first": first,
                          "similarity": None if sims is None else float(sims.mean()),
                          "at_truth": self.at_truth(lambda lv, free: lv.similarity(
                              self.moved_drr(lv, z_truth, z_truth if free else None)).mean(), lvl, zc is not None)})

    def choose_lead(self, runs: list[_Run]) -> tuple[_Run, float]:
        """The run that goes on through the finer scales (the best full-resolution score after
        the coarsest scale) and the rival basin (mm) of the others (:func:`.confidence.rival_mm`)."""
        if len(runs) == 1:
            return runs[0], 0.0
        for run in runs:
            run.after_coarsest = self.final_score(run.z, run.zc)
        lead = max(runs, key=lambda r: r.after_coarsest)
        lead_coarse = self.pose_of(lead.z)
        for run in runs:
            run.from_lead_mm = mtre(self.pose_of(run.z), lead_coarse, self.means_np)
        return lead, confidence.rival_mm([(r.after_coarsest, r.from_lead_mm) for r in runs])

    def basin_check(self, z: torch.Tensor) -> dict:
        """The global stage's second pass around the registered pose ``z``: a Sobol set of
        poses within a quarter of the capture range, scored at the coarsest scale (each in
        its own contrast, as the global stage's). A probe further than
        :data:`~.confidence.RIVAL_MM` from the pose that scores above it (by
        :data:`BASIN_MARGIN`) at that scale is a basin the refinement did not reach and the
        scales disagree on: its distance goes to the decision as a rival basin.

        Measured: the H200 sweep of 2026-12-06 flagged a distorted T4 pose 11.4 mm off
        (estimated 1.21 mm) whose truth scored 0.763 at the coarsest scale against the pose's
        0.720, and 0.579 against 0.599 at full resolution."""
        s = self.s
        pose = self.pose_of(z)
        c_pose = rigid.apply(pose, self.centre)
        reach_mm, reach_deg = s.capture_mm / 4, s.capture_deg / 4
        lvl = self.level(self.scales[0], pose, self.rigid_margin + reach_mm + self.extent * math.radians(reach_deg))
        with torch.no_grad():
            drr = self.moved_drr(lvl, z, None)
            if s.match:
                self.reference_contrast(lvl, drr)
        self.weigh(lvl, z, None, drr)
        offs = sobol_offsets(max(s.candidates // LOCAL_SEEDS, 1), reach_mm, reach_deg, s.seed + 2)  # row 0: the pose
        probes = delta_matrix(offs, c_pose) @ pose
        sims = score_poses(lvl, probes).mean(axis=1)
        best = int(np.argmax(sims))
        above = np.nonzero(sims > sims[0] + BASIN_MARGIN)[0]
        # distances only where they matter: each mTRE over the structure's points is host work
        dist = {i: mtre(probes[i], pose, self.means_np) for i in {best, *above.tolist()}}
        rival = max((dist[i] for i in above.tolist() if dist[i] > confidence.RIVAL_MM), default=0.0)
        return {"scale": self.scales[0], "scored": len(offs), "at_pose": float(sims[0]), "best": float(sims[best]),
                "best_from_pose_mm": float(dist[best]), "rival_mm": float(rival)}

    def record_runs(self, runs: list[_Run], lead: _Run, sim_final: float) -> None:
        """One history entry per start: where it began and ended, its trace per scale."""
        for run in runs:
            pose = self.pose_of(run.z)
            entry = {"stage": "refine", "start": run.start, "xi_start": np.asarray(run.x0).tolist(),
                     "trace": run.trace, "similarity": sim_final if run is lead else run.after_coarsest,
                     "t": self.elapsed()}
            if len(runs) > 1:
                entry["similarity_after_coarsest"] = run.after_coarsest
                entry["coarse_end_from_lead_mm"] = run.from_lead_mm
            if run is not lead:
                entry["stopped_after_scale"] = self.scales[0]
            if self.z_truth is not None and self.target_points is not None:
                entry["start_mtre_mm"] = mtre(delta_matrix(run.x0, self.c_x) @ self.init_m, self.ground_truth,
                                              self.target_points)
            if run.zc is not None:
                rel = rigid.compose(self.pose_of(run.zc), rigid.invert(pose))
                entry["context_offset"] = {"mm": float(np.linalg.norm(rigid.apply(rel, self.c_x) - self.c_x)),
                                           "deg": rigid.rotation_angle_deg(rel)}
            self.history.append(entry)

    def assess(self, lead: _Run, sim_final: float, rival: float) -> confidence.Confidence:
        """The success decision and estimated error of the lead's pose
        (:func:`.confidence.assess` on probes at :data:`CONFIDENCE_PITCH_MM`, with the views'
        whole-window shifts along their shared axis from :mod:`.consistency`)."""
        z, zc = lead.z, lead.zc
        pose = self.pose_of(z)
        t_conf = time.perf_counter()
        with torch.no_grad():
            factor = max(1, int(CONFIDENCE_PITCH_MM // self.pitch))
            probe = self.matched_level(factor, z, zc, self.s.margin_mm)[0]
            wide = self.level(max(1, round(CONSISTENCY_PITCH_MM / self.pitch)), pose, CONSISTENCY_MARGIN_MM)
            wide_drr, c_pose = self.moved_drr(wide, z, zc), rigid.apply(pose, self.centre)
            shifts, view_shift = consistency.measure(wide_drr, wide.raw, wide.weights, wide.geometry, c_pose,
                                                     CONSISTENCY_REACH_MM)
            conf = confidence.assess(lambda poses: score_poses(probe, poses), pose, self.means_np, sim_final,
                                     similarity_floor=self.s.threshold, seed=self.s.seed, rival=rival,
                                     view_shift=view_shift, **confidence.for_pitch(factor * self.pitch))
        conf.evidence["view_shifts_mm"] = np.round(shifts, 3).tolist()
        runtime.sync()
        conf.evidence["seconds"] = time.perf_counter() - t_conf
        if self.progress:
            self.progress("confidence", 1, 1)
        return conf

    def run(self) -> RegistrationResult:
        """All stages in order: the :class:`RegistrationResult`."""
        s, history = self.s, self.history
        initial = self.final_score(torch.zeros(6, dtype=torch.float64), None)
        history.append({"stage": "init", "similarity": initial})
        starts = self.global_stage()
        # every kept start climbs the coarsest scale; the one scoring best at full resolution
        # goes on through the finer scales (rigid, then with a context the structure on its
        # own pose) and is the result
        self.total = len(starts) * self.steps[0] + sum(self.steps[1:len(self.scales)])
        runs = []
        for k, x0 in enumerate(starts):
            # optimise unit-scaled vectors: xi = z * lr_vec, Adam's lr 1 moves ~lr_vec per step
            run = _Run(start=k, x0=x0, z=torch.as_tensor(x0 / self.lr_vec))
            self.climb(run, 0)
            runs.append(run)
        lead, rival = self.choose_lead(runs)
        for si in range(1, len(self.scales)):
            self.climb(lead, si)
        ends = {"refinement": self.elapsed()}  # seconds from the start at the end of each later stage
        sim_final = self.final_score(lead.z, lead.zc)
        ends["final score"] = self.elapsed()
        if s.candidates > 1 and lead.zc is None:  # basin check around the registered pose
            basin = self.basin_check(lead.z)
            history.append({"stage": "basin check", **basin, "t": self.elapsed()})
            ends["basin check"] = self.elapsed()
            rival = max(rival, basin["rival_mm"])
        self.record_runs(runs, lead, sim_final)
        conf = self.assess(lead, sim_final, rival)  # (ends with a sync)
        pose = self.pose_of(lead.z)
        result = RegistrationResult(pose=pose, similarity=sim_final, success=conf.success,
                                    estimated_error_mm=conf.estimated_error_mm, evidence=conf.evidence,
                                    seconds=self.elapsed(), initial_similarity=initial,
                                    threshold=s.threshold, init=self.init_m, history=history)
        history.append({"stage": "timing", "ends": {**ends, "confidence": result.seconds}})
        if self.ground_truth is not None and self.target_points is not None:
            truth = rigid.check_rigid(self.ground_truth, "ground truth pose")
            result.mtre_mm = mtre(pose, truth, self.target_points)
            result.initial_mtre_mm = mtre(self.init_m, truth, self.target_points)
        if self.z_truth is not None:
            history.append({"stage": "truth", "similarity": self.final_score(self.z_truth, None)})
        return result


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
    settings = _Settings(**{k: v for k, v in locals().items() if k in _Settings._fields})  # the keywords above
    return _Registration(xrays, params, init, context, centre, settings, ground_truth, target_points, progress).run()
