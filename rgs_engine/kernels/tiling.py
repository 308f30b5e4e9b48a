"""Tile binning of splats: which 16x16 pixel tiles each (view, Gaussian) footprint touches.

An X-ray pixel is a plain sum over Gaussians, so no depth order is needed: each footprint is
listed once per tile it overlaps, the list is grouped by tile (a stable sort of int32 tile
keys, done by torch between kernels), and each tile's pixels loop over their own range.
Global tile id = ``(view * tiles_y + ty) * tiles_x + tx``.
"""
import taichi as ti

from .launch import kernel

TILE = 16


@ti.func
def pixel_rect(c: ti.f32, r: ti.f32, hx: ti.f32, hy: ti.f32, width: ti.i32, height: ti.i32):
    """Inclusive pixel bounds ``x0, x1, y0, y1`` of a footprint clipped to the detector.

    Empty when ``x0 > x1`` or ``y0 > y1``.
    """
    fx0 = ti.max(ti.ceil(c - hx), 0.0)
    fx1 = ti.min(ti.floor(c + hx), ti.cast(width - 1, ti.f32))
    fy0 = ti.max(ti.ceil(r - hy), 0.0)
    fy1 = ti.min(ti.floor(r + hy), ti.cast(height - 1, ti.f32))
    x0, x1, y0, y1 = 0, -1, 0, -1
    if fx0 <= fx1 and fy0 <= fy1:
        x0 = ti.cast(fx0, ti.i32)
        x1 = ti.cast(fx1, ti.i32)
        y0 = ti.cast(fy0, ti.i32)
        y1 = ti.cast(fy1, ti.i32)
    return x0, x1, y0, y1


@ti.func
def tile_count(c: ti.f32, r: ti.f32, hx: ti.f32, hy: ti.f32, amp: ti.f32,
               width: ti.i32, height: ti.i32) -> ti.i32:
    """Number of tiles a footprint overlaps (0 when culled or off the detector)."""
    x0, x1, y0, y1 = pixel_rect(c, r, hx, hy, width, height)
    n = 0
    if amp > 0 and x0 <= x1 and y0 <= y1:
        n = (x1 // TILE - x0 // TILE + 1) * (y1 // TILE - y0 // TILE + 1)
    return n


@kernel
def emit_pairs(params: ti.types.ndarray(ndim=3), counts: ti.types.ndarray(ndim=2),
               ends: ti.types.ndarray(ndim=1), keys: ti.types.ndarray(ndim=1),
               ids: ti.types.ndarray(ndim=1), width: ti.i32, height: ti.i32):
    """Write one (tile key, Gaussian id) pair per overlapped tile.

    ``ends`` is the inclusive prefix sum of ``counts`` flattened over (view, Gaussian), so the
    pairs of (v, i) occupy ``ends[v N + i] - counts[v, i] .. ends[v N + i] - 1``.
    """
    tiles_x = (width + TILE - 1) // TILE
    tiles_y = (height + TILE - 1) // TILE
    num_g = counts.shape[1]
    for v, i in ti.ndrange(counts.shape[0], num_g):
        n = counts[v, i]
        if n > 0:
            x0, x1, y0, y1 = pixel_rect(params[v, i, 0], params[v, i, 1], params[v, i, 6],
                                        params[v, i, 7], width, height)
            k = ends[v * num_g + i] - n
            for ty in range(y0 // TILE, y1 // TILE + 1):
                for tx in range(x0 // TILE, x1 // TILE + 1):
                    keys[k] = (v * tiles_y + ty) * tiles_x + tx
                    ids[k] = i
                    k += 1
