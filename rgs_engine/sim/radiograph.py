"""Detector-like radiographs from line-integral DRRs: what a real X-ray image adds to a DRR.

A DRR is a stack of line integrals ``p`` (V, H, W) of attenuation (1/mm) x path length (mm),
dimensionless. A processed clinical radiograph differs from it by the detector and the
display chain; :func:`detector_images` reproduces the parts that matter to registration, in
this order (:class:`DetectorSpec` holds the settings, all off by default):

1. primary intensity ``E = exp(-p)`` (relative to the open beam, 1 = no attenuation);
2. scatter: ``D = E + f / (1 - f) * G_s(E)`` with ``G_s`` a Gaussian low-pass of
   ``scatter_sigma`` pixels (default: an eighth of the detector's shorter side), so that
   scatter is the fraction ``f`` (``scatter``) of the detected signal where the primary is
   smooth;
3. blur: the detector's point spread, a Gaussian of ``blur`` pixels (sigma) applied to ``D``;
4. collimation: a border of ``collimation`` pixels on every side is unexposed (``D = 0``);
5. edge enhancement (unsharp masking, as processed radiographs are shown): ``q = -ln D``
   becomes ``q + unsharp * (q - G_u(q))`` with ``G_u`` a Gaussian low-pass of
   ``unsharp_sigma`` pixels (default: a thirty-second of the detector's shorter side): not a
   monotone function of the line integral;
6. display: the log signal ``q`` windowed to [0, 1] between its 0.5th and 99.5th
   percentiles over the exposed pixels (bone bright, as radiographs are shown), then the
   monotone contrast curve ``y = q_w ** gamma`` (``gamma`` 0.5-2: < 1 brightens, > 1 darkens
   the mid-tones). Unexposed pixels are 1 (white, no exposure, as on film and most displays);
7. label: ``label`` text burned in white (1) into the view ``label_view``, ``label_height``
   pixels tall (default: a twelfth of the detector's height), near its top-left corner
   inside the collimated border.

The result is a display image in [0, 1] (V, H, W) float32: no longer a line integral, only a
monotone, blurred, partly masked function of one. Two helpers make the inputs that have no
single right pose or only part of the anatomy:

* :func:`cut_field_of_view` — keeps a window of the detector (images and geometry), so the
  field of view can cut the structure of interest;
* :func:`moved_patient_views` — renders each view at its own pose: the second (lateral)
  view of a biplanar pair taken after the patient moved by a rigid ``move``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core import rigid, stats
from ..core.errors import RgsInputError
from ..core.geometry import Geometry, VolumeGrid
from ..io.xrays import XRaySet
from ..registration.windows import Crop
from . import scan

WINDOW_PERCENTILES = (0.5, 99.5)  # display window of the log signal over the exposed pixels
GAMMA_RANGE = (0.1, 10.0)  # accepted contrast-curve exponents (the cases: 0.5-2)


@dataclass(frozen=True)
class DetectorSpec:
    """Detector and display settings of :func:`detector_images` (module docstring).

    ``gamma``: contrast-curve exponent (1: linear window); ``scatter``: scatter fraction of
    the detected signal in [0, 0.9); ``scatter_sigma``: width (sigma, pixels) of the scatter
    low-pass, 0 = an eighth of the detector's shorter side; ``blur``: detector blur (sigma,
    pixels); ``unsharp``: edge-enhancement amount (0: none; 0.5-2 as processing does),
    ``unsharp_sigma``: its low-pass width (pixels, 0 = a thirty-second of the detector's shorter
    side); ``collimation``: unexposed border width (pixels, every side); ``label``: text
    burned into view ``label_view`` (empty: none), ``label_height`` pixels tall (0: a twelfth
    of the detector's height)."""

    gamma: float = 1.0
    scatter: float = 0.0
    scatter_sigma: float = 0.0
    blur: float = 0.0
    unsharp: float = 0.0
    unsharp_sigma: float = 0.0
    collimation: int = 0
    label: str = ""
    label_view: int = 0
    label_height: int = 0

    def __post_init__(self) -> None:
        lo, hi = GAMMA_RANGE
        checks = (
            (math.isfinite(self.gamma) and lo <= self.gamma <= hi, f"gamma={self.gamma:g}: use {lo:g}..{hi:g}"),
            (math.isfinite(self.scatter) and 0 <= self.scatter < 0.9, f"scatter={self.scatter:g}: use 0..0.9"),
            (math.isfinite(self.scatter_sigma) and self.scatter_sigma >= 0,
             f"scatter_sigma={self.scatter_sigma:g}: use a width >= 0 pixels"),
            (math.isfinite(self.blur) and self.blur >= 0, f"blur={self.blur:g}: use a sigma >= 0 pixels"),
            (math.isfinite(self.unsharp) and self.unsharp >= 0, f"unsharp={self.unsharp:g}: use an amount >= 0"),
            (math.isfinite(self.unsharp_sigma) and self.unsharp_sigma >= 0,
             f"unsharp_sigma={self.unsharp_sigma:g}: use a width >= 0 pixels"),
            (self.collimation >= 0, f"collimation={self.collimation}: use a border >= 0 pixels"),
            (self.label_view >= 0, f"label_view={self.label_view}: use a view index >= 0"),
            (self.label_height >= 0, f"label_height={self.label_height}: use a height >= 0 pixels"),
        )
        for ok, message in checks:
            if not ok:
                raise RgsInputError(f"detector {message}")

    @classmethod
    def parse(cls, text: str) -> "DetectorSpec":
        """``"gamma=0.6,scatter=0.2,blur=1.2,collimation=14,label=AP"`` -> a spec (keys are the
        field names; ``label`` takes the rest of its item, without commas)."""
        return cls(**cls.items(text))

    @classmethod
    def items(cls, text: str) -> dict:
        """The fields that :meth:`parse`'s ``text`` gives, typed (only those: overrides of
        another spec), unchecked against the fields' ranges."""
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict = {}
        for item in (s.strip() for s in text.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in kinds:
                raise RgsInputError(f"detector item {item!r}: write KEY=VALUE with KEY one of "
                                    f"{', '.join(kinds)}")
            try:
                values[key] = {"float": float, "int": int, "str": str}[kinds[key]](value.strip())
            except ValueError:
                raise RgsInputError(f"detector item {item!r}: {key} takes a {kinds[key]}") from None
        return values

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_identity(self) -> bool:
        """True when every setting is off (the images stay line integrals)."""
        return self == DetectorSpec()


def gaussian_filter(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian low-pass of ``images`` (..., H, W) with ``sigma`` pixels (same
    shape; edges replicated; sigma 0 returns the input). The kernel spans +-3 sigma, at most
    the image."""
    if sigma <= 0:
        return images
    shape = images.shape
    h, w = shape[-2:]
    x = images.reshape(-1, 1, h, w)
    for dim, n in ((-1, w), (-2, h)):
        r = max(1, min(int(math.ceil(3 * sigma)), n - 1))
        t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = (k / k.sum()).reshape(1, 1, *((1, -1) if dim == -1 else (-1, 1)))
        pad = (r, r, 0, 0) if dim == -1 else (0, 0, r, r)
        x = F.conv2d(F.pad(x, pad, mode="replicate"), k)
    return x.reshape(shape)


def text_mask(text: str, height: int) -> np.ndarray:
    """Boolean (height, width) mask of ``text`` in Pillow's built-in font, scaled to
    ``height`` pixels (width in proportion)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(canvas).text((-left, -top), text, fill=255, font=font)
    scale = height / canvas.height
    canvas = canvas.resize((max(1, round(canvas.width * scale)), height), Image.NEAREST)
    return np.asarray(canvas) > 127


def burn_label(image: torch.Tensor, text: str, height: int, corner: tuple[int, int], value: float = 1.0
               ) -> torch.Tensor:
    """A copy of ``image`` (H, W) with ``text`` ``height`` pixels tall drawn in ``value`` from
    the top-left ``corner`` (row, col); the part outside the image is dropped."""
    out = image.clone()
    mask = torch.from_numpy(text_mask(text, height))
    r, c = corner
    h = max(0, min(mask.shape[0], image.shape[0] - r))
    w = max(0, min(mask.shape[1], image.shape[1] - c))
    region = out[r:r + h, c:c + w]
    region[mask[:h, :w].to(out.device)] = value
    return out


def detector_images(line_integrals: torch.Tensor, spec: DetectorSpec) -> torch.Tensor:
    """Display images (V, H, W) float32 in [0, 1] of ``line_integrals`` (V, H, W,
    dimensionless, >= 0) through ``spec``'s detector and display chain (module docstring).
    An identity spec returns the line integrals unchanged."""
    if spec.is_identity:
        return line_integrals
    p = line_integrals.detach().to(torch.float64)
    if p.ndim != 3:
        raise RgsInputError(f"detector images need line integrals (V, H, W), got shape {tuple(p.shape)}")
    v, h, w = p.shape
    b = spec.collimation
    if 2 * b >= min(h, w) - 1:
        raise RgsInputError(f"detector collimation={b} leaves no exposed pixels of {h}x{w}: use a border "
                            f"under {(min(h, w) - 1) // 2}")
    if spec.label and spec.label_view >= v:
        raise RgsInputError(f"detector label_view={spec.label_view}: there are {v} views")
    primary = torch.exp(-p.clamp_min(0))
    if spec.scatter > 0:
        sigma = spec.scatter_sigma or min(h, w) / 8
        primary = primary + spec.scatter / (1 - spec.scatter) * gaussian_filter(primary, sigma)
    detected = gaussian_filter(primary, spec.blur)
    exposed = torch.zeros(h, w, dtype=torch.bool, device=p.device)
    exposed[b:h - b, b:w - b] = True
    q = -torch.log(detected.clamp_min(1e-30))
    if spec.unsharp > 0:
        q = q + spec.unsharp * (q - gaussian_filter(q, spec.unsharp_sigma or min(h, w) / 32))
    out = torch.ones_like(q)
    for k in range(v):
        inside = q[k][exposed]
        lo, hi = stats.quantile(inside, [pct / 100 for pct in WINDOW_PERCENTILES])
        qw = ((q[k] - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
        out[k] = torch.where(exposed, qw ** spec.gamma, out[k])
    if spec.label:
        height = spec.label_height or max(6, h // 12)
        out[spec.label_view] = burn_label(out[spec.label_view], spec.label, height, (b + h // 40, b + w // 40))
    return out.to(torch.float32)


def cut_field_of_view(xrays: XRaySet, starts: Sequence[Sequence[int]], shape: tuple[int, int]) -> XRaySet:
    """``xrays`` seen by a smaller detector: per view the window of ``shape`` (H, W) pixels
    whose top-left pixel is ``starts[k]`` (row, col); the geometry's detector centres move
    with it, so the window is calibrated (same pixels, fewer of them)."""
    starts = np.asarray(starts, dtype=int).reshape(-1, 2)
    hh, ww = xrays.geometry.det_shape
    ok = (starts.shape[0] == xrays.images.shape[0] and (starts >= 0).all()
          and (starts[:, 0] + shape[0] <= hh).all() and (starts[:, 1] + shape[1] <= ww).all())
    if not ok:
        raise RgsInputError(f"field-of-view cut {shape} at {starts.tolist()} does not fit the {hh}x{ww} "
                            f"detector of {xrays.images.shape[0]} views: give one start per view inside it")
    crop = Crop(starts, (int(shape[0]), int(shape[1])))
    return XRaySet(crop.images(xrays.images), crop.geometry(xrays.geometry), list(xrays.files),
                   xrays.ground_truth)


def moved_patient_views(volume: torch.Tensor, grid: VolumeGrid, geometry: Geometry, pose,
                        move, moved: Sequence[int] = (1,),
                        project: Callable[[torch.Tensor, VolumeGrid, Geometry], torch.Tensor] = scan.project_views
                        ) -> torch.Tensor:
    """Line integrals (V, H, W) of ``volume`` on ``grid`` (CT world, mm) seen through
    ``geometry`` (X-ray frame) with the CT at ``pose`` (4x4 CT-to-X-ray, mm), except the
    views in ``moved``, rendered with the CT at ``move @ pose`` (the patient moved by the
    rigid ``move``, X-ray frame, between the exposures). No single pose explains all views."""
    pose, move = rigid.check_rigid(pose), rigid.check_rigid(move)
    views = []
    for k in range(geometry.num_views):
        at = move @ pose if k in set(moved) else pose
        views.append(project(volume, grid, rigid.transform_geometry(geometry.subset([k]), rigid.invert(at))))
    return torch.cat(views, dim=0)
