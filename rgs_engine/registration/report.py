"""What a registration reports besides the pose: the target points its mTRE is measured
over (CT world mm) and the overlay picture (DRR edges on the X-rays, with the decision and
its estimated error in a caption band)."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..core.errors import RgsInputError
from ..core.stats import quantile as quantile_of
from ..io.files import load_nifti
from .register import RegistrationResult

BONE_HU = 200.0
MAX_TARGET_POINTS = 20000


def target_points(ct_path, mask_path=None, label: int | None = None, bone_hu: float = BONE_HU,
                  max_points: int = MAX_TARGET_POINTS, seed: int = 0) -> np.ndarray:
    """(N, 3) CT world mm points for mTRE: the voxel centres of ``label`` in the mask (any
    non-zero label when None), else of the CT's voxels above ``bone_hu`` HU (else above
    -500 HU when the CT has no bone). At most ``max_points``, a seeded random subset."""
    hu, grid = load_nifti(ct_path)
    if mask_path is not None:
        labels, mgrid = load_nifti(mask_path)
        ints = torch.round(labels).to(torch.int64)
        sel = ints != 0 if label is None else ints == int(label)
        grid = mgrid
        if not bool(sel.any()):
            raise RgsInputError(f"label {label} is not in {mask_path}: no target points")
    else:
        sel = hu > bone_hu
        if not bool(sel.any()):
            sel = hu > -500
        if not bool(sel.any()):
            raise RgsInputError(f"{ct_path}: no voxel above -500 HU: no target points")
    pts = grid.voxel_centres()[sel].reshape(-1, 3).numpy()
    if pts.shape[0] > max_points:
        pts = pts[np.random.default_rng(seed).choice(pts.shape[0], max_points, replace=False)]
    return pts


def _edges(drr: torch.Tensor, quantile: float = 0.9, floor: float = 0.3) -> np.ndarray:
    """Boolean edge map of an image: gradient magnitude above the ``quantile`` of its non-zero
    values and above ``floor`` x its maximum."""
    x = drr.detach().double().cpu()
    gy = torch.zeros_like(x)
    gx = torch.zeros_like(x)
    gy[1:-1] = (x[2:] - x[:-2]) / 2
    gx[:, 1:-1] = (x[:, 2:] - x[:, :-2]) / 2
    mag = (gx.square() + gy.square()).sqrt()
    top = float(mag.max())
    if top <= 0:
        return np.zeros(x.shape, bool)
    thr = max(float(quantile_of(mag[mag > 1e-6 * top], quantile)), floor * top)
    return (mag > thr).numpy()


def decision_caption(result: RegistrationResult) -> str:
    """One line for the overlay: the decision, the estimated error and its evidence (mm)."""
    ev = result.evidence
    verdict = "success" if result.success else "NOT VERIFIED, do not use"
    parts = [f"{verdict}: estimated error {result.estimated_error_mm:.2f} mm"]
    if ev:
        parts.append(f"restarts {ev['restart_spread_mm']:.2f}, views {ev['view_disagreement_mm']:.2f}, "
                     f"peak {ev['peak_offset_mm']:.2f} mm, similarity {result.similarity:.3f}")
        if ev.get("rival_basin_mm"):
            parts.append(f"a rival basin {ev['rival_basin_mm']:.1f} mm away")
        if ev["not_maximum_axes"]:
            parts.append(f"no maximum along axes {ev['not_maximum_axes']}")
    return "; ".join(parts)


def _caption_band(text: str, width: int, ok: bool) -> np.ndarray:
    """(h, width, 3) uint8 band with ``text`` in green (``ok``) or red, wrapped to the width."""
    from PIL import Image, ImageDraw

    font = ImageDraw.ImageDraw(Image.new("RGB", (1, 1))).getfont()
    per_line = max(10, width // 6)
    words, lines = text.split(" "), [""]
    for word in words:
        if len(lines[-1]) + len(word) + 1 > per_line and lines[-1]:
            lines.append("")
        lines[-1] = f"{lines[-1]} {word}".strip()
    img = Image.new("RGB", (width, 12 * len(lines) + 6), (24, 24, 24))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((4, 3 + 12 * i), line, fill=(80, 230, 80) if ok else (255, 80, 80), font=font)
    return np.asarray(img)


def overlay_image(xrays: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                  min_size: int = 256, caption: str | None = None, ok: bool = True) -> np.ndarray:
    """RGB uint8 picture, one row per view: the grey X-ray with the DRR's edges at the
    starting pose (red, left) and at the registered pose (green, right). Small images are
    enlarged by an integer factor to at least ``min_size`` pixels. ``caption`` (e.g.
    :func:`decision_caption`) is written above, green when ``ok``, else red."""
    rows = []
    gap = 4
    for k in range(xrays.shape[0]):
        img = xrays[k].detach().double().cpu()
        lo, hi = (float(v) for v in quantile_of(img, [0.01, 0.99]))
        grey = ((img - lo) / (hi - lo if hi > lo else 1.0)).clamp(0, 1).numpy()
        grey = (grey * 200).astype(np.uint8)  # leave head-room for the coloured edges
        panels = []
        for drr, colour in ((before[k], (255, 40, 40)), (after[k], (40, 255, 40))):
            rgb = np.repeat(grey[..., None], 3, axis=2)
            rgb[_edges(drr)] = colour
            panels.append(rgb)
        row = np.concatenate([panels[0], np.full((grey.shape[0], gap, 3), 96, np.uint8), panels[1]], axis=1)
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    canvas = np.concatenate(
        [np.concatenate([r, np.full((gap, width, 3), 96, np.uint8)], axis=0) for r in rows], axis=0)[:-gap]
    f = max(1, math.ceil(min_size / max(canvas.shape[0], canvas.shape[1] / 2)))
    if f > 1:
        canvas = canvas.repeat(f, axis=0).repeat(f, axis=1)
    if caption:
        canvas = np.concatenate([_caption_band(caption, canvas.shape[1], ok), canvas], axis=0)
    return canvas
