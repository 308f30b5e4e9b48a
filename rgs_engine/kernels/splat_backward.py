"""Backward X-ray splatting kernels (hand-written adjoint of :mod:`.splat_forward`).

1. :func:`pair_grads`, one thread per (tile, Gaussian) pair: loops over the pixels of the
   footprint inside its tile (each row from its peak outwards up to the cutoff, as
   :func:`.splat_forward.render_tiles`), accumulates ``dL/d(c, r, conic, amp)`` in registers and adds
   them once into the (V, N, 6) buffer. Threads of a warp share a tile (pairs are sorted by
   tile), so their upstream-gradient reads coincide; the atomics only meet where one
   footprint spans several tiles.
2. :func:`gaussian_grads`, one thread per Gaussian: loops over the views and chains the 2D
   gradients back to centre, scales, quaternion and density (no atomics): summed over the
   views for parameters the views share, written per view for per-view ones.
"""
import taichi as ti

from .launch import kernel
from .splat_projection import NUM_GRADS, load_gaussian, splat_params_vjp
from .tiling import TILE, pixel_rect, walk_row

vec3 = ti.math.vec3
vec4 = ti.math.vec4


@kernel
def pair_grads(params: ti.types.ndarray(ndim=3), keys: ti.types.ndarray(ndim=1),
               ids: ti.types.ndarray(ndim=1), grad_image: ti.types.ndarray(ndim=3),
               grad_params: ti.types.ndarray(ndim=3), cutoff2: ti.f32):
    """``grad_params`` (V, N, 6) += dL/d(c, r, conic a, b, c, amp) from ``grad_image`` (V, H, W)."""
    height = grad_image.shape[1]
    width = grad_image.shape[2]
    tiles_x = (width + TILE - 1) // TILE
    tiles_y = (height + TILE - 1) // TILE
    for k in range(keys.shape[0]):
        tile = keys[k]
        i = ids[k]
        v = tile // (tiles_x * tiles_y)
        t = tile % (tiles_x * tiles_y)
        tx0 = (t % tiles_x) * TILE
        ty0 = (t // tiles_x) * TILE
        c = params[v, i, 0]
        r = params[v, i, 1]
        ca = params[v, i, 2]
        cb = params[v, i, 3]
        cc = params[v, i, 4]
        amp = params[v, i, 5]
        decay = ti.exp(-ca)
        # the footprint's pixel box with one pixel of slack, in this tile; each row walked
        # from its peak outwards up to the cutoff, as the forward's render_tiles
        x0, x1, y0, y1 = pixel_rect(c, r, params[v, i, 6], params[v, i, 7], width, height)
        x0 = ti.max(x0 - 1, tx0)
        x1 = ti.min(x1 + 1, tx0 + TILE - 1, width - 1)
        y0 = ti.max(y0 - 1, ty0)
        y1 = ti.min(y1 + 1, ty0 + TILE - 1, height - 1)
        g = ti.Vector([0.0] * NUM_GRADS)
        for py in range(y0, y1 + 1):
            g += walk_row(c, r, ca, cb, cc, amp, decay, v, py, x0, x1, cutoff2, grad_image, True)
        for j in ti.static(range(NUM_GRADS)):
            ti.atomic_add(grad_params[v, i, j], g[j])


@ti.func
def write_geometry_grads(g_means: ti.types.ndarray(), g_scales: ti.types.ndarray(),
                         g_quats: ti.types.ndarray(), row: ti.i32, gp: vec3, gs: vec3, gq: vec4):
    """Store one row of centre, scale and quaternion gradients."""
    for j in ti.static(range(3)):
        g_means[row, j] = gp[j]
        g_scales[row, j] = gs[j]
    for j in ti.static(range(4)):
        g_quats[row, j] = gq[j]


@kernel
def gaussian_grads(means: ti.types.ndarray(ndim=2), scales: ti.types.ndarray(ndim=2),
                   quats: ti.types.ndarray(ndim=2), densities: ti.types.ndarray(ndim=1),
                   table: ti.types.ndarray(ndim=2), grad_params: ti.types.ndarray(ndim=3),
                   g_means: ti.types.ndarray(ndim=2), g_scales: ti.types.ndarray(ndim=2),
                   g_quats: ti.types.ndarray(ndim=2), g_densities: ti.types.ndarray(ndim=1),
                   cone: ti.template(), geometry_per_view: ti.template(),
                   density_per_view: ti.template()):
    """Chain ``grad_params`` (V, N, 6) to the gradients of ``means``, ``scales``, ``quats``
    ((N, k), or (V * N, k) when ``geometry_per_view``) and ``densities`` ((N,), or (V * N,)
    when ``density_per_view``); row layout as in :func:`.splat_forward.project_gaussians`."""
    n = grad_params.shape[1]
    for i in range(n):
        gp = ti.math.vec3(0.0)
        gs = ti.math.vec3(0.0)
        gq = ti.math.vec4(0.0)
        grho = 0.0
        for v in range(grad_params.shape[0]):
            row = v * n + i if ti.static(geometry_per_view) else i
            drow = v * n + i if ti.static(density_per_view) else i
            g = ti.Vector([grad_params[v, i, j] for j in ti.static(range(NUM_GRADS))])
            a, b, c, d = vec3(0.0), vec3(0.0), vec4(0.0), 0.0
            if g.norm_sqr() > 0:
                p, s, q = load_gaussian(means, scales, quats, row)
                a, b, c, d = splat_params_vjp(p, s, q, densities[drow], table, v, cone, g)
            if ti.static(geometry_per_view):
                write_geometry_grads(g_means, g_scales, g_quats, row, a, b, c)
            else:
                gp += a
                gs += b
                gq += c
            if ti.static(density_per_view):
                g_densities[drow] = d
            else:
                grho += d
        if ti.static(not geometry_per_view):
            write_geometry_grads(g_means, g_scales, g_quats, i, gp, gs, gq)
        if ti.static(not density_per_view):
            g_densities[i] = grho
