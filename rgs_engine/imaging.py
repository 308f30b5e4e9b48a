"""PNG output without image libraries: an 8-bit encoder and a slice montage of volumes.

:func:`encode_png` writes 8-bit grayscale (H, W) or RGB (H, W, 3) images (zlib + struct, no
filtering). :func:`slices_png` lays out the central axial, coronal and sagittal slices of
several volumes on one grid, one volume per row, at their physical aspect ratio.

Display orientation assumes the NIfTI RAS+ world frame that
:func:`~rgs_engine.volume_io.load_nifti` returns (+x the patient's right, +y anterior, +z
superior) and follows the radiological convention: patient right on the image left,
anterior up in axial slices, superior up in coronal and sagittal slices, anterior on the
left in sagittal slices.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import RgsInputError
from .geometry import VolumeGrid
from .volume_io import write_bytes

PANEL = 256  # pixels along the longest physical edge of a slice panel
GAP = 4  # pixels between panels
BACKGROUND = 96  # grey level between and around panels
WINDOW_QUANTILES = (0.001, 0.999)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """PNG bytes of a uint8 image, (H, W) grayscale or (H, W, 3) RGB; ``text`` -> tEXt chunks."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise RgsInputError(f"PNG images must be uint8 (H, W) or (H, W, 3), got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    if h < 1 or w < 1:
        raise RgsInputError(f"PNG image is empty: shape {img.shape}")
    colour_type = 0 if img.ndim == 2 else 2
    rows = np.ascontiguousarray(img).reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1)  # filter type 0 per row
    out = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0))]
    for key, value in (text or {}).items():
        out.append(_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1", "replace")))
    out += [_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)), _chunk(b"IEND", b"")]
    return b"".join(out)


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


def slices_png(path: str | os.PathLike, volumes: dict[str, torch.Tensor], grid: VolumeGrid,
               force: bool = False) -> Path:
    """Montage of the central axial, coronal and sagittal slices of each volume, one per row.

    All ``volumes`` share ``grid`` (shape ``grid.shape``). Slices are resampled so one pixel
    is the same number of mm in both directions and in every panel (the box's longest edge
    spans :data:`PANEL` pixels). Each row has one grey window, from the 0.1 to the 99.9
    percentile of its three slices. The row names and column order are stored in the PNG's
    ``Description`` text chunk. Written atomically, no-clobber unless ``force``.
    """
    if not volumes:
        raise RgsInputError("slices_png needs at least one volume")
    for name, vol in volumes.items():
        if tuple(vol.shape) != grid.shape:
            raise RgsInputError(f"volume {name!r} has shape {tuple(vol.shape)}, grid has {grid.shape}")
    mm_per_pixel = float(grid.size_mm.max()) / PANEL
    rows = []
    for vol in volumes.values():
        panels = [_panel(img, sp, mm_per_pixel) for img, sp in _central_slices(vol, grid)]
        values = torch.cat([p.reshape(-1) for p in panels])
        if values.numel() > 2 ** 24:  # torch.quantile's input limit
            values = values[torch.randperm(values.numel())[: 2 ** 24]]
        lo, hi = torch.quantile(values, torch.tensor(WINDOW_QUANTILES)).tolist()
        rows.append([to_uint8(p, lo, hi) for p in panels])
    heights = [max(p.shape[0] for p in row) for row in rows]
    widths = [max(row[c].shape[1] for row in rows) for c in range(3)]
    canvas = np.full((sum(heights) + GAP * (len(rows) - 1), sum(widths) + GAP * 2), BACKGROUND, np.uint8)
    y = 0
    for row, h in zip(rows, heights):
        x = 0
        for c, p in enumerate(row):
            canvas[y:y + p.shape[0], x:x + p.shape[1]] = p
            x += widths[c] + GAP
        y += h + GAP
    text = {"Description": "rows: " + ", ".join(volumes) + "; columns: axial, coronal, sagittal"}
    return write_png(path, canvas, force, text)
