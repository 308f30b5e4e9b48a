"""Breathing motion for a real CT: a breathing curve, an anatomical displacement field, a warp.

**World axes.** A CT read by :func:`rgs_engine.io.files.load_nifti` sits on a
:class:`~rgs_engine.core.geometry.VolumeGrid` whose axes are the NIfTI RAS+ world axes, whatever
the file's storage order (its affine is reoriented on reading): grid axis 0 = world x
(+ towards the patient's left), axis 1 = world y (+ anterior), axis 2 = world z
(+ superior). So superior-inferior (SI) motion is along z and anterior-posterior (AP) motion
along y. Inhalation moves the diaphragm and abdomen inferiorly (-z) and the chest wall
anteriorly (+y).

**Breathing curve** (:func:`breathing_amplitude`): ``a(t)`` in [0, 1], 0 at end-exhale (the
CT as given), 1 at the deepest inhalation of the scan. Regular breathing follows Lujan et
al.'s model (Med. Phys. 1999), ``a = sin^(2n)(pi t / T)`` with ``n =`` :data:`LUJAN_N`:
each cycle starts at end-exhale, peaks at mid-cycle and lingers near exhale. Irregular
breathing (:func:`breathing_cycles`) draws each cycle's length and peak from the seed:
length ``T (1 + PERIOD_JITTER g)``, peak ``(1 + AMPLITUDE_JITTER g') / DEEP_BREATH`` (``g``,
``g'`` standard normal, factors clipped to :data:`JITTER_CLIP`), and one deep breath (cycle
:data:`DEEP_CYCLES` drawn from the seed) with peak 1 and a cycle :data:`DEEP_BREATH_LONGER`
times as long. The curve is smooth across cycle boundaries (``a`` and ``da/dt`` vanish there).
Slow drifts over a horizon ``H`` (the scan), ``u = t / H`` clipped to [0, 1]: a depth drift
``d`` makes the breaths shallower, ``a (1 - d u)``, and a baseline shift ``b`` raises the
end-exhale level, ``b u + (1 - b) a``, so the curve stays in [0, 1] (:func:`drifted`).
:func:`motion_amplitudes` gives the per-axis amplitudes the warp uses: the diaphragm's SI
motion follows ``a(t)`` and the chest wall's AP motion lags it by :data:`AP_LAG` of the
period, so inhalation and exhalation pass through different states (the hysteresis of real
breathing) and every phase of a cycle is a distinct volume.

**Displacement field** (:func:`displacement_field`): ``u(x)`` (nx, ny, nz, 3) in mm, the
motion at ``a = 1``, built from masks of the CT (:func:`anatomy_masks`: HU thresholds) with
smooth fall-offs:

* SI: ``u_z = -si_mm s(x) / max s`` with ``s = footprint(x, y) p(z) (1 - bone(x)) env(x)``:
  ``p`` is 1 at the lung base (the diaphragm), decays upward to 0 at the lung apex
  (``((z_apex - z) / H)^1.5``, ``H`` the lung height) and downward through the abdomen
  (Gaussian of width ``H / 2``); ``footprint`` is the lungs' axial silhouette (so the
  abdomen under the lungs moves with the diaphragm), ``bone`` the smoothed, saturated mask of the bone
  posterior of the lungs' middle (the spine, posterior ribs and scapulae stay put; contrast-
  enhanced blood of the heart, as dense as bone, does move), ``env`` the smoothed body
  envelope (nothing moves outside the body);
* AP: ``u_y = ap_mm q(x) / max q`` with ``q = r(y)^2 h(z) env(x)``: ``r`` ramps from 0 at
  the lungs' posterior edge to 1 at the anterior body surface (the back and the spine stay,
  the anterior chest wall moves most) and ``h`` is a Gaussian in z centred a quarter of the
  lung height above the lung base (width ``H / 2``).

**Warp** (:func:`warp`): a backward warp, ``out(x) = volume(x - a u(x))`` (trilinear, values
beyond the box repeat the border; ``a`` one number or one per world axis), so the tissue
found at ``x - a u(x)`` in the CT is shown at ``x``: with ``u_z < 0`` the lungs slide down
over the liver.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import RgsInputError, check_tensor
from ..core.geometry import VolumeGrid
from .ct import hu_to_mu

# breathing curve
LUJAN_N = 2  # a = sin^(2n): n = 1 is a plain sinusoid, larger n lingers longer at exhale
PERIOD_JITTER = 0.10  # irregular: relative standard deviation of a cycle's length
AMPLITUDE_JITTER = 0.15  # irregular: relative standard deviation of a normal breath's peak
JITTER_CLIP = (0.7, 1.3)  # irregular: bounds of the jitter factors
DEEP_BREATH = 1.4  # irregular: the deep breath's peak over a mean normal breath's
DEEP_BREATH_LONGER = 1.25  # irregular: the deep breath's cycle length over its drawn length
DEEP_CYCLES = (3, 9)  # irregular: the deep breath is cycle k (from 0), k drawn in this range
AP_LAG = 0.1  # the chest wall's AP motion lags the diaphragm's SI motion by this part of a period

# anatomy (HU thresholds) and fall-offs (mm)
AIR_HU = -400.0  # below: air (outside the body) or lung
BONE_HU = 200.0  # above: bone
ENVELOPE_SIGMA_MM = 8.0  # body envelope: motion fades over ~2 sigma outside the skin
FOOTPRINT_SIGMA_MM = 15.0  # smoothing of the lungs' axial silhouette
BONE_SIGMA_MM = 8.0  # smoothing of the bone mask (fills the vertebral bodies' trabecular bone)
LUNG_QUANTILES = (0.02, 0.98)  # lung base / apex (z), posterior edge (y): robust extremes


# --------------------------------------------------------------------------------------
# Breathing curve
# --------------------------------------------------------------------------------------
def _check_period(period_s: float) -> None:
    if not (isinstance(period_s, (int, float)) and math.isfinite(period_s) and period_s > 0):
        raise RgsInputError(f"breathing period {period_s!r}: must be a positive number of seconds")


def breathing_cycles(until_s: float, period_s: float, irregular: bool = False, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The breathing cycles covering ``[0, until_s]`` seconds: ``(starts (K + 1,) s,
    peaks (K,))``; cycle k runs from ``starts[k]`` to ``starts[k + 1]`` and peaks at
    ``peaks[k]`` in (0, 1].

    Regular: cycles of ``period_s``, peaks 1. Irregular: drawn from ``seed`` cycle by cycle
    (see the module), so a cycle does not depend on ``until_s``; ``period_s`` is the mean
    of the length distribution (the deep breath's cycle is longer).
    """
    _check_period(period_s)
    if not (math.isfinite(until_s) and until_s >= 0):
        raise RgsInputError(f"breathing curve horizon {until_s!r}: must be a time >= 0 s")
    if not irregular:
        count = int(until_s // period_s) + 1
        return np.arange(count + 1) * float(period_s), np.ones(count)
    rng = np.random.default_rng(seed)
    deep = int(rng.integers(DEEP_CYCLES[0], DEEP_CYCLES[1] + 1))
    starts, peaks = [0.0], []
    while starts[-1] <= until_s:
        length = period_s * float(np.clip(1 + PERIOD_JITTER * rng.standard_normal(), *JITTER_CLIP))
        peak = float(np.clip(1 + AMPLITUDE_JITTER * rng.standard_normal(), *JITTER_CLIP)) / DEEP_BREATH
        if len(peaks) == deep:
            length, peak = length * DEEP_BREATH_LONGER, 1.0
        starts.append(starts[-1] + length)
        peaks.append(peak)
    return np.asarray(starts), np.asarray(peaks)


def _locate(t_s, period_s: float, irregular: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fraction of its cycle elapsed at each time, that cycle's peak), arrays shaped like t."""
    t = np.asarray(t_s.detach().cpu() if isinstance(t_s, torch.Tensor) else t_s, dtype=np.float64)
    if not (np.all(np.isfinite(t)) and np.all(t >= 0)):
        raise RgsInputError("breathing curve times must be finite and >= 0 s")
    starts, peaks = breathing_cycles(float(t.max()) if t.size else 0.0, period_s, irregular, seed)
    k = np.searchsorted(starts, t, side="right") - 1
    return (t - starts[k]) / (starts[k + 1] - starts[k]), peaks[k]


def breathing_phase(t_s, period_s: float, irregular: bool = False, seed: int = 0) -> torch.Tensor:
    """Fraction in [0, 1) of the current breathing cycle elapsed at each time ``t_s`` (s, any
    shape, >= 0): float64 CPU tensor of the same shape (0 = end-exhale)."""
    frac, _ = _locate(t_s, period_s, irregular, seed)
    return torch.from_numpy(frac)


def drifted(amplitude: torch.Tensor, t_s, depth_drift: float = 0.0, baseline_shift: float = 0.0,
            horizon_s: float | None = None) -> torch.Tensor:
    """``amplitude`` (any shape, in [0, 1]) at times ``t_s`` (s, same shape) with the slow
    drifts of the module over ``horizon_s`` seconds: the breath's depth falls by the
    fraction ``depth_drift`` and the end-exhale level rises to ``baseline_shift`` (both in
    [0, 1)); float64 CPU tensor of the same shape."""
    if not (0 <= depth_drift < 1 and 0 <= baseline_shift < 1):
        raise RgsInputError(f"depth drift {depth_drift!r} and baseline shift {baseline_shift!r}: "
                            "give fractions in [0, 1)")
    if depth_drift == 0 and baseline_shift == 0:
        return amplitude
    if not (horizon_s is not None and math.isfinite(horizon_s) and horizon_s > 0):
        raise RgsInputError(f"breathing drifts need a horizon (the scan's length, s > 0), got {horizon_s!r}")
    u = (torch.as_tensor(t_s, dtype=torch.float64).cpu() / horizon_s).clamp(0.0, 1.0)
    return baseline_shift * u + (1 - baseline_shift) * (1 - depth_drift * u) * amplitude


def breathing_amplitude(t_s, period_s: float, irregular: bool = False, seed: int = 0) -> torch.Tensor:
    """Breathing amplitude in [0, 1] at each time ``t_s`` (seconds >= 0, any shape): float64
    CPU tensor of the same shape; 0 = end-exhale, 1 = the deepest breath (see the module).

    Regular: ``sin^(2n)(pi t / period_s)``, periodic in ``period_s``. Irregular: the seeded
    cycles of :func:`breathing_cycles`.
    """
    frac, peak = _locate(t_s, period_s, irregular, seed)
    return torch.from_numpy(peak * np.sin(np.pi * frac) ** (2 * LUJAN_N))


def motion_amplitudes(t_s, period_s: float, irregular: bool = False, seed: int = 0,
                      **drifts) -> torch.Tensor:
    """Per-axis amplitudes for :func:`warp` at times ``t_s`` (s >= 0, any shape): float64 CPU
    tensor of shape ``t_s.shape + (3,)``, along world (x, y, z) = (0, ``a(t - AP_LAG
    period_s)``, ``a(t)``) with ``a`` :func:`breathing_amplitude` (the lagged time clamped at
    0, where the scan starts at end-exhale) and the ``drifts`` (``depth_drift``,
    ``baseline_shift``, ``horizon_s``) of :func:`drifted`."""
    t = torch.as_tensor(t_s, dtype=torch.float64).cpu()
    lagged = (t - AP_LAG * period_s).clamp_min(0.0)
    si = drifted(breathing_amplitude(t, period_s, irregular, seed), t, **drifts)
    ap = drifted(breathing_amplitude(lagged, period_s, irregular, seed), lagged, **drifts)
    return torch.stack([torch.zeros_like(si), ap, si], dim=-1)


# --------------------------------------------------------------------------------------
# Anatomy and displacement field
# --------------------------------------------------------------------------------------
class Anatomy(NamedTuple):
    """Boolean masks (nx, ny, nz) of a CT: ``body`` (everything not connected to the outside
    air in its axial slice), ``lungs`` (air enclosed by the body) and ``bone``."""

    body: torch.Tensor
    lungs: torch.Tensor
    bone: torch.Tensor


def _outside_air(air: torch.Tensor) -> torch.Tensor:
    """Air voxels 4-connected to the x/y border of their axial slice (z slices filled
    independently, so the trachea leaving the box does not connect the lungs to the outside)."""
    reach = torch.zeros_like(air)
    for edge in ((0,), (-1,), (slice(None), 0), (slice(None), -1)):
        reach[edge] = air[edge]
    while True:
        grown = reach.clone()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown &= air
        if torch.equal(grown, reach):
            return grown
        reach = grown


def anatomy_masks(volume: torch.Tensor, grid: VolumeGrid) -> Anatomy:
    """Body, lung and bone masks of an attenuation volume (1/mm, ``grid.shape``) from the HU
    thresholds :data:`AIR_HU` and :data:`BONE_HU` (``mu = 0.02/mm (1 + HU / 1000)``); on the
    volume's device."""
    check_tensor("volume", volume, grid.shape)
    air_mu, bone_mu = hu_to_mu(torch.tensor([AIR_HU, BONE_HU])).tolist()
    air = volume < air_mu
    outside = _outside_air(air)
    return Anatomy(body=~outside, lungs=air & ~outside, bone=volume > bone_mu)


def _blur(x: torch.Tensor, grid: VolumeGrid, sigma_mm: tuple[float, float, float]) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` (nx, ny, nz) with per-axis sigmas in mm (0 = none),
    kernel cut at 3 sigma, edges replicated."""
    out = x.to(torch.float32)[None, None]
    for axis, (sigma, step) in enumerate(zip(sigma_mm, grid.spacing)):
        radius = math.ceil(3 * sigma / step) if sigma > 0 else 0
        if radius == 0:
            continue
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
        kernel = torch.exp(-0.5 * (offsets * step / sigma) ** 2)
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius  # F.pad lists the last axis first
        out = F.conv3d(F.pad(out, pad, mode="replicate"), (kernel / kernel.sum()).view(shape))
    return out[0, 0]


def _soft(x: torch.Tensor) -> torch.Tensor:
    """Smoothstep of ``x`` clamped to [0, 1]: 0 -> 0, 1 -> 1 with zero slope at both ends."""
    t = x.clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _quantile(mask: torch.Tensor, grid: VolumeGrid, axis: int, q: float) -> float:
    """World coordinate (mm) along ``axis`` below which a fraction ``q`` of ``mask`` lies."""
    counts = mask.to(torch.float64).sum(dim=[a for a in range(3) if a != axis])
    cdf = counts.cumsum(0) / counts.sum()
    index = int(torch.searchsorted(cdf, torch.tensor([q], dtype=torch.float64, device=cdf.device)))
    return grid.origin[axis] + min(index, grid.shape[axis] - 1) * grid.spacing[axis]


def _axis(grid: VolumeGrid, axis: int, device: torch.device) -> torch.Tensor:
    """World coordinates (mm) of the voxel centres along ``axis``, float32."""
    return grid.origin[axis] + torch.arange(grid.shape[axis], dtype=torch.float32,
                                            device=device) * grid.spacing[axis]


def displacement_field(volume: torch.Tensor, grid: VolumeGrid, si_mm: float = 15.0,
                       ap_mm: float = 5.0) -> torch.Tensor:
    """Breathing displacement (mm) at amplitude 1 of a chest CT: (nx, ny, nz, 3) float32 on
    the volume's device, components along world (x, y, z).

    ``volume`` is attenuation in 1/mm on ``grid`` (RAS+ axes, see the module); the largest
    inferior displacement is ``si_mm`` (at the lung base / diaphragm) and the largest
    anterior one ``ap_mm`` (the anterior chest wall); x is not displaced. Raises
    :class:`RgsInputError` when the CT shows no lungs.
    """
    for name, value in (("si_mm", si_mm), ("ap_mm", ap_mm)):
        if not (math.isfinite(value) and value >= 0):
            raise RgsInputError(f"{name} = {value!r}: breathing amplitudes are mm >= 0")
    anatomy = anatomy_masks(volume, grid)
    lungs, dev = anatomy.lungs, volume.device
    if int(lungs.sum()) < 27:
        raise RgsInputError("no lungs found in the CT (air enclosed by the body, below "
                            f"{AIR_HU:g} HU): breathing motion needs a chest CT that shows the lungs")
    z_base, z_apex = (_quantile(lungs, grid, 2, q) for q in LUNG_QUANTILES)
    height = max(z_apex - z_base, grid.spacing[2])
    z, y = _axis(grid, 2, dev), _axis(grid, 1, dev)
    # SI: diaphragm and abdomen under the lungs; lung motion fades towards the apex
    profile = torch.where(z >= z_base, ((z_apex - z) / height).clamp(0.0, 1.0) ** 1.5,
                          torch.exp(-0.5 * ((z_base - z) / (0.5 * height)) ** 2))
    silhouette = lungs.any(dim=2, keepdim=True)
    footprint = _soft(2 * _blur(silhouette, grid, (FOOTPRINT_SIGMA_MM, FOOTPRINT_SIGMA_MM, 0.0)))
    envelope = _soft(2 * _blur(anatomy.body, grid, (ENVELOPE_SIGMA_MM,) * 3))
    spine = anatomy.bone & (y < _quantile(lungs, grid, 1, 0.5))[None, :, None]
    si = footprint * profile * (1 - _soft(2 * _blur(spine, grid, (BONE_SIGMA_MM,) * 3))) * envelope
    # AP: chest wall, from the lungs' posterior edge to the anterior body surface
    thorax = anatomy.body & ((z >= z_base) & (z <= z_apex))[None, None, :]
    y_post = _quantile(lungs, grid, 1, LUNG_QUANTILES[0])
    y_ant = _quantile(thorax, grid, 1, LUNG_QUANTILES[1])
    ramp = ((y - y_post) / max(y_ant - y_post, grid.spacing[1])).clamp(0.0, 1.0) ** 2
    bump = torch.exp(-0.5 * ((z - (z_base + 0.25 * height)) / (0.5 * height)) ** 2)
    ap = ramp[None, :, None] * bump * envelope
    u = torch.zeros(*grid.shape, 3, dtype=torch.float32, device=dev)
    u[..., 2] = -si_mm * si / si.max()
    u[..., 1] = ap_mm * ap / ap.max()
    return u


# --------------------------------------------------------------------------------------
# Warp
# --------------------------------------------------------------------------------------
def warp(volume: torch.Tensor, grid: VolumeGrid, displacement: torch.Tensor,
         amplitude: float | torch.Tensor) -> torch.Tensor:
    """Backward warp ``out(x) = volume(x - a u(x))`` at the voxel centres of ``grid``.

    ``volume`` (nx, ny, nz) (any units, e.g. 1/mm), ``displacement`` ``u`` (nx, ny, nz, 3) in
    mm along world (x, y, z). ``amplitude`` ``a``: a number (returns (nx, ny, nz)), a 1-D
    tensor of B numbers or a (B, 3) tensor of per-axis amplitudes (component c of ``u`` is
    scaled by ``a[b, c]``, as :func:`motion_amplitudes` gives); both return
    (B, nx, ny, nz), all warps in one ``grid_sample``. Trilinear interpolation; points
    beyond the box take the nearest border value. float32 on the volume's device.
    """
    check_tensor("volume", volume, grid.shape)
    check_tensor("displacement", displacement, (*grid.shape, 3))
    dev = volume.device
    amps = torch.as_tensor(amplitude, dtype=torch.float32, device=dev)
    if amps.dim() > 2 or (amps.dim() == 2 and amps.shape[1] != 3):
        raise RgsInputError(f"warp amplitude has shape {tuple(amps.shape)}: give a number, (B,) "
                            "numbers or (B, 3) per-axis amplitudes")
    batch = amps.reshape(-1, 1).expand(-1, 3) if amps.dim() < 2 else amps
    if not bool(torch.isfinite(batch).all()):
        raise RgsInputError("warp amplitudes must be finite numbers")
    # normalised sampling coordinates (align_corners=True: -1 and +1 are the end voxel centres)
    scale = torch.tensor([2.0 / (s * max(n - 1, 1)) for n, s in zip(grid.shape, grid.spacing)],
                         dtype=torch.float32, device=dev)
    axes = [torch.linspace(-1.0, 1.0, n, device=dev) if n > 1 else torch.zeros(1, device=dev)
            for n in grid.shape]
    base = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    shift = displacement.to(device=dev, dtype=torch.float32) * scale
    at = base[None] - batch[:, None, None, None, :] * shift[None]  # (B, nx, ny, nz, 3)
    nx, ny, nz = grid.shape
    # grid_sample reads (D, H, W) = (x, y, z) and wants its coordinates as (z, y, x)
    sample = at.flip(-1).reshape(1, len(batch) * nx, ny, nz, 3)
    out = F.grid_sample(volume.to(torch.float32)[None, None], sample, mode="bilinear",
                        padding_mode="border", align_corners=True)
    out = out.reshape(len(batch), nx, ny, nz)
    return out[0] if amps.dim() == 0 else out
