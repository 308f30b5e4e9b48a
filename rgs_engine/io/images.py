"""PNG and GIF output: 8-bit images and animations (encoded by Pillow), and slice montages
of volumes.

:func:`encode_png` writes 8-bit grayscale (H, W) or RGB (H, W, 3) images with optional
``tEXt`` chunks. :func:`slices_png` lays out the central axial, coronal and sagittal slices
of several volumes on one grid, one volume per row, at their physical aspect ratio.
:func:`encode_gif` / :func:`write_gif` write looping GIF89a animations: grey frames
exactly, colour frames exactly when they hold at most 256 colours.

Display orientation assumes the NIfTI RAS+ world frame that
:func:`~rgs_engine.io.files.load_nifti` returns (+x the patient's right, +y anterior, +z
superior) and follows the radiological convention: patient right on the image left,
anterior up in axial slices, superior up in coronal and sagittal slices, anterior on the
left in sagittal slices.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin

from ..core.errors import RgsInputError
from ..core.stats import quantile
from ..core.geometry import VolumeGrid
from .files import write_bytes

PANEL = 256  # pixels along the longest physical edge of a slice panel
GAP = 4  # pixels between panels
BACKGROUND = 96  # grey level between and around panels
WINDOW_QUANTILES = (0.001, 0.999)
GIF_CUBE_LEVELS = 6  # colour frames with over 256 colours: a 6 x 6 x 6 colour cube


def encode_png(image: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """PNG bytes of a uint8 image, (H, W) grayscale or (H, W, 3) RGB; ``text`` -> tEXt chunks."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise RgsInputError(f"PNG images must be uint8 (H, W) or (H, W, 3), got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    if h < 1 or w < 1:
        raise RgsInputError(f"PNG image is empty: shape {img.shape}")
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value.encode("latin-1", "replace").decode("latin-1"))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def write_png(path: str | os.PathLike, image: np.ndarray, force: bool = False,
              text: dict[str, str] | None = None) -> Path:
    """Write a uint8 grayscale or RGB image to ``path`` atomically (no-clobber unless ``force``)."""
    return write_bytes(path, encode_png(image, text), force)


def to_uint8(image: torch.Tensor, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly onto 0..255 (clipped)."""
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return ((image.to(torch.float32) - lo) * scale).clamp(0, 255).round().to(torch.uint8).cpu().numpy()


def central_slices(volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Axial, coronal, sagittal central slices of a grid-ordered volume in display orientation
    (CPU float32)."""
    nx, ny, nz = volume.shape
    v = volume.detach().to(device="cpu", dtype=torch.float32)
    axial = v[:, :, nz // 2].flip(0, 1).T        # rows: y descending, cols: x descending
    coronal = v[:, ny // 2, :].flip(0, 1).T      # rows: z descending, cols: x descending
    sagittal = v[nx // 2, :, :].flip(0, 1).T     # rows: z descending, cols: y descending
    return axial, coronal, sagittal


def _central_slices(volume: torch.Tensor, grid: VolumeGrid) -> list[tuple[torch.Tensor, tuple[float, float]]]:
    """:func:`central_slices` with their (row, col) spacing in mm."""
    sx, sy, sz = grid.spacing
    return list(zip(central_slices(volume), ((sy, sx), (sz, sx), (sz, sy))))


def _panel(image: torch.Tensor, spacing: tuple[float, float], mm_per_pixel: float) -> torch.Tensor:
    size = [max(1, round(n * s / mm_per_pixel)) for n, s in zip(image.shape, spacing)]
    return F.interpolate(image[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def _window(panels: list[torch.Tensor]) -> tuple[float, float]:
    """The 0.1 and 99.9 percentiles of the panels' pixels (one grey window)."""
    lo, hi = quantile(torch.cat([p.reshape(-1) for p in panels]), WINDOW_QUANTILES).tolist()
    return lo, hi


def _montage(rows: list[list[np.ndarray]]) -> np.ndarray:
    """uint8 panels laid out in rows and columns, :data:`GAP` pixels apart."""
    heights = [max(p.shape[0] for p in row) for row in rows]
    columns = len(rows[0])
    widths = [max(row[c].shape[1] for row in rows) for c in range(columns)]
    canvas = np.full((sum(heights) + GAP * (len(rows) - 1), sum(widths) + GAP * (columns - 1)),
                     BACKGROUND, np.uint8)
    y = 0
    for row, h in zip(rows, heights):
        x = 0
        for c, p in enumerate(row):
            canvas[y:y + p.shape[0], x:x + p.shape[1]] = p
            x += widths[c] + GAP
        y += h + GAP
    return canvas


def _check_shapes(volumes: dict[str, torch.Tensor], shape: tuple[int, ...], what: str) -> None:
    if not volumes:
        raise RgsInputError(f"a picture needs at least one {what}")
    for name, vol in volumes.items():
        if tuple(vol.shape[-3:]) != shape[-3:] or vol.dim() != len(shape):
            raise RgsInputError(f"{what} {name!r} has shape {tuple(vol.shape)}, expected {shape}")


def slices_png(path: str | os.PathLike, volumes: dict[str, torch.Tensor], grid: VolumeGrid,
               force: bool = False) -> Path:
    """Montage of the central axial, coronal and sagittal slices of each volume, one per row.

    All ``volumes`` share ``grid`` (shape ``grid.shape``). Slices are resampled so one pixel
    is the same number of mm in both directions and in every panel (the box's longest edge
    spans :data:`PANEL` pixels). Each row has one grey window, from the 0.1 to the 99.9
    percentile of its three slices. The row names and column order are stored in the PNG's
    ``Description`` text chunk. Written atomically, no-clobber unless ``force``.
    """
    _check_shapes(volumes, grid.shape, "volume")
    mm_per_pixel = float(grid.size_mm.max()) / PANEL
    rows = []
    for vol in volumes.values():
        panels = [_panel(img, sp, mm_per_pixel) for img, sp in _central_slices(vol, grid)]
        lo, hi = _window(panels)
        rows.append([to_uint8(p, lo, hi) for p in panels])
    text = {"Description": "rows: " + ", ".join(volumes) + "; columns: axial, coronal, sagittal"}
    return write_png(path, _montage(rows), force, text)


def slices_gif(path: str | os.PathLike, series: dict[str, torch.Tensor], grid: VolumeGrid,
               fps: float = 5.0, force: bool = False) -> Path:
    """An animation over time of the central coronal and sagittal slices (the planes that
    show breathing motion), one row per series.

    Each of ``series`` is (T, nx, ny, nz) on ``grid`` (the same T); frame ``t`` shows every
    series at its index ``t``. Pixels as :func:`slices_png`; each row has one grey window
    over all its frames, so intensities compare across time. Written atomically."""
    shapes = {tuple(v.shape) for v in series.values()}
    first = next(iter(series.values()), torch.empty(0, *grid.shape))
    _check_shapes(series, (first.shape[0], *grid.shape), "series")
    if len(shapes) != 1:
        raise RgsInputError(f"series have different shapes {sorted(shapes)}: give each the same times")
    mm_per_pixel = float(grid.size_mm.max()) / PANEL
    panels = {name: [[_panel(img, sp, mm_per_pixel) for img, sp in _central_slices(vol, grid)[1:]]
                     for vol in volumes] for name, volumes in series.items()}
    windows = {name: _window([p for frame in frames for p in frame]) for name, frames in panels.items()}
    frames = [_montage([[to_uint8(p, *windows[name]) for p in panels[name][t]] for name in series])
              for t in range(first.shape[0])]
    return write_gif(path, np.stack(frames), fps, force)


# --------------------------------------------------------------------------------------
# GIF
# --------------------------------------------------------------------------------------
def _gif_palette(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices (T, H, W) uint8, palette (256, 3) uint8) of grey or RGB frames."""
    if frames.ndim == 3:
        return frames, np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    rgb = frames.astype(np.uint32)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    colours, inverse = np.unique(packed, return_inverse=True)
    if colours.size > 256:  # quantise to the colour cube
        step = 255 // (GIF_CUBE_LEVELS - 1)
        cube = (np.round(rgb / step) * step).astype(np.uint32)
        packed = (cube[..., 0] << 16) | (cube[..., 1] << 8) | cube[..., 2]
        colours, inverse = np.unique(packed, return_inverse=True)
    palette = np.zeros((256, 3), np.uint8)
    palette[:colours.size] = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], 1)
    return inverse.reshape(frames.shape[:3]).astype(np.uint8), palette


def encode_gif(frames: np.ndarray, fps: float = 10.0) -> bytes:
    """Bytes of a looping GIF89a animation of uint8 frames, (T, H, W) grey or (T, H, W, 3) RGB.

    One global 256-entry palette: grey levels map to themselves (exact); colour frames keep
    their colours when they hold at most 256, else are quantised to a 6 x 6 x 6 colour
    cube. Each frame shows for ``round(100 / fps)`` hundredths of a second (at least 2:
    viewers slow down shorter delays); the animation loops forever (NETSCAPE2.0 block).
    """
    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or not (arr.ndim == 3 or (arr.ndim == 4 and arr.shape[3] == 3)):
        raise RgsInputError(f"GIF frames must be uint8 (T, H, W) or (T, H, W, 3), got {arr.dtype} {arr.shape}")
    t, h, w = arr.shape[:3]
    if min(t, h, w) < 1 or max(h, w) > 65535:
        raise RgsInputError(f"GIF frames must be non-empty and at most 65535 pixels a side, got {arr.shape}")
    if not (np.isfinite(fps) and fps > 0):
        raise RgsInputError(f"GIF frame rate must be positive (frames per second), got {fps}")
    delay = max(2, round(100 / fps))
    indices, palette = _gif_palette(arr)
    images = []
    for frame in indices:
        image = Image.fromarray(np.ascontiguousarray(frame), "P")
        image.putpalette(palette.tobytes())
        images.append(image)
    buf = io.BytesIO()
    images[0].save(buf, "GIF", save_all=True, append_images=images[1:], duration=10 * delay, loop=0,
                   optimize=False, interlace=False)
    return buf.getvalue()


def write_gif(path: str | os.PathLike, frames: np.ndarray, fps: float = 10.0, force: bool = False) -> Path:
    """Write :func:`encode_gif` ``(frames, fps)`` to ``path`` atomically (no-clobber unless
    ``force``)."""
    return write_bytes(path, encode_gif(frames, fps), force)
