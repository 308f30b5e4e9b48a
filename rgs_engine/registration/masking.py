"""Which X-ray pixels show the patient: masks for collimation borders, saturation and
burned-in labels.

A radiograph carries pixels that no DRR can explain: unexposed bands behind the collimator
(a constant value), saturated regions (clipped at the detector's or the LUT's end), and
burned-in text or markers (drawn at the display's white or black). All three are flat: the
same value over a patch, or the image's extreme value. :func:`exposure_mask` drops

* plateaus: pixels whose ``(2 r + 1)^2`` neighbourhood (``r`` = ``plateau_px``) holds one value
  (within ``1e-6`` of the view's value range) -- collimation bands, unexposed areas outside a
  field of view that cuts the anatomy, large saturated areas;
* extremes: pixels at the view's maximum or minimum value when at least ``min_extreme``
  pixels share it (thin text strokes, small saturated spots; a noisy image's extreme is one
  pixel and stays);

and grows the dropped set by ``grow_px`` pixels (blurred label edges, the finite-difference
stencil). A label drawn at a mid-grey value in strokes thinner than a plateau patch is not
caught; neither is a gradual (non-constant) vignetting at the collimator's edge.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PLATEAU_PX = 2
GROW_PX = 2
MIN_EXTREME = 8
RANGE_TOL = 1e-6


def _max_filter(x: torch.Tensor, r: int) -> torch.Tensor:
    """(V, H, W) maximum over each pixel's (2r+1)^2 neighbourhood (edges: the part inside)."""
    return F.max_pool2d(x[:, None], 2 * r + 1, stride=1, padding=r)[:, 0]


def exposure_mask(images: torch.Tensor, plateau_px: int = PLATEAU_PX, grow_px: int = GROW_PX,
                  min_extreme: int = MIN_EXTREME) -> torch.Tensor:
    """(V, H, W) float weights of ``images`` (V, H, W): 1 where a pixel shows the patient, 0
    on plateaus, shared extreme values and within ``grow_px`` of them (module docstring)."""
    x = images.float()
    flat = x.reshape(x.shape[0], -1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    tol = (RANGE_TOL * (hi - lo)).clamp_min(1e-12)[:, None, None]
    spread = _max_filter(x, plateau_px) + _max_filter(-x, plateau_px)
    # a plateau pixel is one whose patch is constant; the whole patch is flat, not just its centre
    bad = _max_filter((spread <= tol).float(), plateau_px) > 0
    for edge in (lo, hi):
        at = (x - edge[:, None, None]).abs() <= tol
        many = at.reshape(x.shape[0], -1).sum(dim=1) >= min_extreme
        bad |= at & many[:, None, None]
    if grow_px > 0:
        bad = _max_filter(bad.float(), grow_px) > 0
    return (~bad).float()
