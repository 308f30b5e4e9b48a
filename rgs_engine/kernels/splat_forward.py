"""Forward X-ray splatting kernels: per-(view, Gaussian) projection, then per-pixel sums.

1. :func:`project_gaussians` (one thread per view x Gaussian) computes the 8 splat parameters
   of :mod:`.splat_projection` and how many tiles each footprint overlaps. The geometry
   (centres, scales, rotations) and the densities are each either shared by all views or
   given per view (rows ``v * N .. v * N + N - 1`` for view ``v``): a deforming or
   time-varying set of Gaussians renders all its views in one launch.
2. Binning (:mod:`.tiling`) lists the Gaussians of every tile.
3. :func:`render` (GPU: one thread per pixel, a thread block per 16x16 tile that stages its
   tile's list in shared memory, a batch at a time) sums ``amp exp(-q / 2)`` over its tile's Gaussians with
   ``q <= cutoff^2``. :func:`render_tiles` (CPU: one thread per tile) visits only the pixels
   of each footprint's ellipse inside the tile: each row from its peak outwards up to the
   cutoff, ``exp(-q / 2)`` stepped by multiplications (:func:`.tiling.walk_row`), which
   saves the CPU most of the evaluations and exponentials a GPU spends on whole tiles. Both write each pixel from one thread in list order: no
   atomics, the same deterministic sum.
"""
import taichi as ti

from .launch import kernel
from .splat_projection import NUM_PARAMS, load_gaussian, splat_params
from .tiling import TILE, pixel_rect, tile_count, walk_row

BATCH = TILE * TILE  # footprints a tile's thread block stages in shared memory at a time
SHARED = 6  # of each footprint's splat parameters: centre (2), conic (3), amplitude


@kernel
def project_gaussians(means: ti.types.ndarray(ndim=2), scales: ti.types.ndarray(ndim=2),
                      quats: ti.types.ndarray(ndim=2), densities: ti.types.ndarray(ndim=1),
                      table: ti.types.ndarray(ndim=2), params: ti.types.ndarray(ndim=3),
                      counts: ti.types.ndarray(ndim=2), cone: ti.template(), cutoff: ti.f32,
                      width: ti.i32, height: ti.i32, geometry_stride: ti.i32, density_stride: ti.i32):
    """``params`` (V, N, 8) and tile ``counts`` (V, N) for every view and Gaussian.

    Gaussian ``i`` of view ``v`` is row ``v * geometry_stride + i`` of ``means``, ``scales``
    and ``quats`` and entry ``v * density_stride + i`` of ``densities`` (stride 0: shared by
    all views, N: one set per view).
    """
    for v, i in ti.ndrange(counts.shape[0], counts.shape[1]):
        p, s, q = load_gaussian(means, scales, quats, v * geometry_stride + i)
        out = splat_params(p, s, q, densities[v * density_stride + i], table, v, cone, cutoff)
        for k in ti.static(range(NUM_PARAMS)):
            params[v, i, k] = out[k]
        counts[v, i] = tile_count(out[0], out[1], out[6], out[7], out[5], width, height)


@kernel
def render(params: ti.types.ndarray(ndim=3), ranges: ti.types.ndarray(ndim=1),
           ids: ti.types.ndarray(ndim=1), image: ti.types.ndarray(ndim=3), cutoff2: ti.f32):
    """``image`` (V, H, W): sum of the splats binned to each pixel's tile (GPU only).

    ``ranges[t] .. ranges[t + 1]`` indexes ``ids`` for global tile ``t``. A thread block is
    one tile, a thread one pixel. The block walks its tile's list in batches of
    ``TILE * TILE``: each thread loads one footprint's centre, conic and amplitude into shared
    memory, then every thread sums the whole batch from there. Each pixel adds its terms in
    list order, as :func:`render_tiles`.
    """
    height = image.shape[1]
    width = image.shape[2]
    tiles_x = (width + TILE - 1) // TILE
    tiles_y = (height + TILE - 1) // TILE
    ti.loop_config(block_dim=BATCH)
    for idx in range(image.shape[0] * tiles_y * tiles_x * BATCH):
        tile = idx // BATCH
        local = idx % BATCH
        v = tile // (tiles_x * tiles_y)
        t = tile % (tiles_x * tiles_y)
        px = (t % tiles_x) * TILE + local % TILE
        py = (t // tiles_x) * TILE + local // TILE
        fx = ti.cast(px, ti.f32)
        fy = ti.cast(py, ti.f32)
        batch = ti.simt.block.SharedArray((SHARED, BATCH), ti.f32)  # centre, conic, amplitude
        start = ranges[tile]
        count = ranges[tile + 1] - start
        acc = 0.0
        for b in range((count + BATCH - 1) // BATCH):  # the same trip count for the whole block
            first = b * BATCH
            if first + local < count:
                i = ids[start + first + local]
                for j in ti.static(range(SHARED)):
                    batch[j, local] = params[v, i, j]
            ti.simt.block.sync()
            for m in range(ti.min(BATCH, count - first)):
                dx = fx - batch[0, m]
                dy = fy - batch[1, m]
                q = batch[2, m] * dx * dx + 2.0 * batch[3, m] * dx * dy + batch[4, m] * dy * dy
                if q <= cutoff2:
                    acc += batch[5, m] * ti.exp(-0.5 * q)
            ti.simt.block.sync()  # before the next batch overwrites this one
        if px < width and py < height:
            image[v, py, px] = acc


@kernel
def render_tiles(params: ti.types.ndarray(ndim=3), ranges: ti.types.ndarray(ndim=1),
                 ids: ti.types.ndarray(ndim=1), image: ti.types.ndarray(ndim=3), cutoff2: ti.f32):
    """Same result as :func:`render` (``image`` must be zero), one thread per tile."""
    height = image.shape[1]
    width = image.shape[2]
    tiles_x = (width + TILE - 1) // TILE
    tiles_y = (height + TILE - 1) // TILE
    for tile in range(image.shape[0] * tiles_y * tiles_x):
        v = tile // (tiles_x * tiles_y)
        t = tile % (tiles_x * tiles_y)
        tx0 = (t % tiles_x) * TILE
        ty0 = (t // tiles_x) * TILE
        for k in range(ranges[tile], ranges[tile + 1]):
            i = ids[k]
            c = params[v, i, 0]
            r = params[v, i, 1]
            ca, cb, cc, amp = params[v, i, 2], params[v, i, 3], params[v, i, 4], params[v, i, 5]
            decay = ti.exp(-ca)
            x0, x1, y0, y1 = pixel_rect(c, r, params[v, i, 6], params[v, i, 7], width, height)
            x_lo = ti.max(x0 - 1, tx0)
            x_hi = ti.min(x1 + 1, tx0 + TILE - 1, width - 1)
            for py in range(ti.max(y0 - 1, ty0), ti.min(y1 + 1, ty0 + TILE - 1, height - 1) + 1):
                walk_row(c, r, ca, cb, cc, amp, decay, v, py, x_lo, x_hi, cutoff2, image, False)
