"""Tile binning of splats: which 16x16 pixel tiles each (view, Gaussian) footprint touches.

An X-ray pixel is a plain sum over Gaussians, so no depth order is needed: each footprint is
listed once per tile it overlaps, the list is grouped by tile (a stable sort of int32 tile
keys, done by torch between kernels), and each tile's pixels loop over their own range.
Global tile id = ``(view * tiles_y + ty) * tiles_x + tx``.
"""
import taichi as ti

from .launch import kernel
from .splat_projection import NUM_GRADS

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
def row_peak(c: ti.f32, ca: ti.f32, cb: ti.f32, dy: ti.f32, x_lo: ti.i32, x_hi: ti.i32) -> ti.i32:
    """The column nearest the maximum of a footprint along one detector row (offset ``dy``
    from its centre column ``c``; the conic's ``ca > 0``, ``cb``), clipped to ``x_lo..x_hi``.
    From there outwards its quadratic form ``q`` only grows: a walk can stop at the first
    pixel with ``q > cutoff^2`` and step ``exp(-q / 2)`` by multiplications (:func:`row_start`)."""
    mid = c - cb * dy / ca
    return ti.cast(ti.min(ti.max(ti.round(mid), ti.cast(x_lo, ti.f32)), ti.cast(x_hi, ti.f32)), ti.i32)


@ti.func
def row_start(c: ti.f32, ca: ti.f32, cb: ti.f32, cc: ti.f32, dy: ti.f32, start: ti.i32,
              direction: ti.i32):
    """Where a walk along a row from column ``start`` in ``direction`` (+1 / -1) begins:
    ``dx = start - c``, the quadratic form ``q`` there and ``dq``, its change at the first
    step. Each step then does ``q += dq; dq += 2 ca`` and, for ``e = exp(-q / 2)`` and
    ``s = exp(-dq / 2)``, ``e *= s; s *= exp(-ca)``: two exponentials a row instead of one
    a pixel. Walking away from the row's peak (:func:`row_peak`) ``e`` only shrinks, so
    nothing overflows and nothing underflows before ``q`` passes the cutoff."""
    dx = ti.cast(start, ti.f32) - c
    q = ca * dx * dx + 2.0 * cb * dx * dy + cc * dy * dy
    dq = ti.cast(direction, ti.f32) * (2.0 * ca * dx + 2.0 * cb * dy) + ca
    return dx, q, dq


@ti.func
def walk_row(c: ti.f32, r: ti.f32, ca: ti.f32, cb: ti.f32, cc: ti.f32, amp: ti.f32, decay: ti.f32,
             v: ti.i32, py: ti.i32, x_lo: ti.i32, x_hi: ti.i32, cutoff2: ti.f32,
             image: ti.template(), backward: ti.template()):
    """One detector row ``py`` of view ``v`` of a footprint (centre ``c, r``, conic ``ca, cb,
    cc``, amplitude ``amp``, ``decay = exp(-ca)``) between columns ``x_lo..x_hi``: from the
    row's peak outwards up to the cutoff (:func:`row_peak`, :func:`row_start`). Forward
    (``backward`` False): adds ``amp exp(-q / 2)`` into ``image`` (V, H, W) and returns zeros;
    backward: ``image`` is the upstream gradient and it returns this row's ``dL/d(c, r, conic
    a, b, c, amp)``."""
    dy = ti.cast(py, ti.f32) - r
    peak = row_peak(c, ca, cb, dy, x_lo, x_hi)
    g = ti.Vector([0.0] * NUM_GRADS)
    for side in ti.static(range(2)):  # from the peak to the right, then to its left
        direction = 1 - 2 * side
        start = peak - side
        steps = x_hi - start + 1 if side == 0 else start - x_lo + 1
        dx, q, dq = row_start(c, ca, cb, cc, dy, start, direction)
        if steps > 0 and q <= cutoff2:
            e, s = ti.exp(-0.5 * q), ti.exp(-0.5 * dq)
            px = start
            for _step in range(steps):
                if q > cutoff2:  # q grows away from the peak: the rest is outside
                    break
                if ti.static(backward):
                    gp = image[v, py, px]
                    w = -0.5 * gp * amp * e  # dL/dq
                    g += ti.Vector([-2.0 * w * (ca * dx + cb * dy), -2.0 * w * (cb * dx + cc * dy),
                                    w * dx * dx, 2.0 * w * dx * dy, w * dy * dy, gp * e])
                else:
                    image[v, py, px] = image[v, py, px] + amp * e
                q += dq
                dq += 2.0 * ca
                e *= s
                s *= decay
                dx += ti.cast(direction, ti.f32)
                px += direction
    return g


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
