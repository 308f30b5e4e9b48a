"""Taichi kernels: Joseph ray-driven projector of a dense volume and its exact adjoint.

Units and shapes: volume ``(nx, ny, nz)`` in 1/mm, passed flattened (z fastest); projections
``(V, H, W)`` unitless line integrals; the per-view table is
:meth:`~rgs_engine.core.geometry.Geometry.kernel_table` ``(V, 24)`` in world mm; the grid enters
as its origin (centre of voxel 0, mm) and spacing (mm).

Sampling (Joseph): work in voxel-index coordinates ``p = (x - origin) / spacing``. A ray
``p(t) = a + t b`` (cone: ``a`` the source, ``b`` = pixel - source; parallel: ``a`` the
pixel centre, ``b`` the unit direction, both scaled to index units) has a dominant axis
``A = argmax |b|`` (ties go to the lower axis). For every slice ``m = 0 .. n_A - 1`` it is
cut with the plane of voxel centres ``p_A = m`` at ``(P, Q) = (P0 + m sP, Q0 + m sQ)``
(``sP = b_P / b_A``), the volume is bilinearly interpolated there in the other two axes
(neighbours outside the grid count as zero), and the sum is weighted by the ray length per
slice, ``spacing_A |D| / |D_A| = |b * spacing| / |b_A|``. Cone rays keep only ``t > 0``.

Design, chosen for the GPU:

* one thread per ray, all views in one launch; the views are the outermost loop and each
  warp takes a 4 x 8 pixel tile, so neighbouring threads read neighbouring voxels;
* per ray, the slice range where the interpolation support ``(-1, n)`` is hit in both other
  axes (and ``t > 0``) is computed analytically, so the inner loop visits only those slices;
* the inner loop is branch-free: two :func:`linear_taps` (clamped indices, weights zeroed
  outside the grid), four loads from the flattened volume with per-ray strides, FMAs;
* the adjoint (``adjoint=True``) runs the very same loop and ``atomic_add`` s
  ``g * weight * tap`` into the four voxels, so it is the exact transpose of the forward;
  rays with a zero upstream value are skipped.

Index limits: ``nx * ny * nz`` and ``V * H * W`` below 2^31 (int32 indices).
"""
import taichi as ti

from .launch import kernel

TILE_ROWS = 4  # a warp's tile of detector pixels: TILE_ROWS x TILE_COLS = 32 rays
TILE_COLS = 8

vec3 = ti.math.vec3
f32_1d = ti.types.ndarray(dtype=ti.f32, ndim=1)
f32_2d = ti.types.ndarray(dtype=ti.f32, ndim=2)
f32_3d = ti.types.ndarray(dtype=ti.f32, ndim=3)


@ti.func
def linear_taps(u: ti.f32, n: ti.i32):
    """Linear interpolation of samples ``0 .. n - 1`` at coordinate ``u`` (zero outside).

    Returns ``(i0, i1, w0, w1)``: in-range (clamped) sample indices and their weights; a
    neighbour outside ``0 .. n - 1`` gets weight 0.
    """
    i = ti.floor(u, ti.i32)
    f = u - i
    w0 = ti.select((i >= 0) & (i < n), 1.0 - f, 0.0)
    w1 = ti.select((i >= -1) & (i < n - 1), f, 0.0)
    return ti.math.clamp(i, 0, n - 1), ti.math.clamp(i + 1, 0, n - 1), w0, w1


@ti.func
def table_row3(tab: ti.template(), view: ti.i32, col: ti.template()) -> vec3:
    return vec3(tab[view, col], tab[view, col + 1], tab[view, col + 2])


@ti.func
def _pick(x, axis: ti.i32):
    return ti.select(axis == 0, x[0], ti.select(axis == 1, x[1], x[2]))


@ti.func
def _other_axes(axis: ti.i32):
    """The two axes other than ``axis``, in increasing order."""
    return ti.select(axis == 0, 1, 0), ti.select(axis == 2, 1, 2)


@ti.func
def _clip_slices(lo: ti.f32, hi: ti.f32, start: ti.f32, step: ti.f32, n: ti.i32):
    """Narrow the slice interval ``[lo, hi]`` to where ``start + m step`` lies in (-1, n)."""
    new_lo, new_hi = lo, hi
    if step != 0.0:
        t1 = (-1.0 - start) / step
        t2 = (n - start) / step
        new_lo = ti.max(lo, ti.min(t1, t2))
        new_hi = ti.min(hi, ti.max(t1, t2))
    elif start <= -1.0 or start >= n:
        new_hi = -1.0
    return new_lo, new_hi


@ti.func
def _ray(tab: ti.template(), view: ti.i32, r: ti.i32, c: ti.i32, height: ti.i32, width: ti.i32,
         origin: vec3, spacing: vec3, n: ti.math.ivec3, cone: ti.template()):
    """Joseph parameters of the ray through pixel (r, c) of ``view``.

    Returns ``(m0, m1, p0, sp, q0, sq, axis, weight)``: slices ``m0 .. m1`` of the dominant
    ``axis`` are sampled at index coordinates ``(p0 + m sp, q0 + m sq)`` in the two other axes
    (in increasing axis order); ``weight`` is the ray length per slice (mm).
    """
    first = table_row3(tab, view, 0)
    pix = (table_row3(tab, view, 3) + (c - 0.5 * (width - 1)) * table_row3(tab, view, 6)
           + (r - 0.5 * (height - 1)) * table_row3(tab, view, 9))
    a = (pix - origin) / spacing
    b = first / spacing
    if ti.static(cone):
        a = (first - origin) / spacing
        b = (pix - first) / spacing
    mag = ti.abs(b)
    axis = 2
    if mag[0] >= mag[1] and mag[0] >= mag[2]:
        axis = 0
    elif mag[1] >= mag[2]:
        axis = 1
    p_axis, q_axis = _other_axes(axis)
    ba, aa = _pick(b, axis), _pick(a, axis)
    sp = _pick(b, p_axis) / ba
    sq = _pick(b, q_axis) / ba
    p0 = _pick(a, p_axis) - aa * sp
    q0 = _pick(a, q_axis) - aa * sq
    n_a = _pick(n, axis)
    lo, hi = _clip_slices(0.0, n_a - 1.0, p0, sp, _pick(n, p_axis))
    lo, hi = _clip_slices(lo, hi, q0, sq, _pick(n, q_axis))
    m0 = ti.cast(ti.ceil(ti.min(lo, ti.cast(n_a, ti.f32))), ti.i32)
    m1 = ti.cast(ti.floor(ti.max(hi, -1.0)), ti.i32)
    if ti.static(cone):  # t > 0: strictly beyond the source, which sits at slice aa
        src = ti.math.clamp(aa, -2.0, n_a + 1.0)
        if ba > 0.0:
            m0 = ti.max(m0, ti.cast(ti.floor(src), ti.i32) + 1)
        else:
            m1 = ti.min(m1, ti.cast(ti.ceil(src), ti.i32) - 1)
    weight = (b * spacing).norm() / ti.abs(ba)
    return m0, m1, p0, sp, q0, sq, axis, weight


@kernel
def joseph(vol: f32_1d, proj: f32_3d, tab: f32_2d, nx: ti.i32, ny: ti.i32, nz: ti.i32,
           ox: ti.f32, oy: ti.f32, oz: ti.f32, sx: ti.f32, sy: ti.f32, sz: ti.f32,
           cone: ti.template(), adjoint: ti.template()):
    """Forward: ``proj[v, r, c] = line integral`` (proj fully overwritten). Adjoint:
    ``vol += A^T proj`` (vol must start zeroed)."""
    n_views, height, width = proj.shape[0], proj.shape[1], proj.shape[2]
    n = ti.math.ivec3(nx, ny, nz)
    stride = ti.math.ivec3(ny * nz, nz, 1)
    origin = vec3(ox, oy, oz)
    spacing = vec3(sx, sy, sz)
    tiles_r = (height + TILE_ROWS - 1) // TILE_ROWS
    tiles_c = (width + TILE_COLS - 1) // TILE_COLS
    ti.loop_config(block_dim=128)
    for view, tr, tc, lane in ti.ndrange(n_views, tiles_r, tiles_c, TILE_ROWS * TILE_COLS):
        r = tr * TILE_ROWS + lane // TILE_COLS
        c = tc * TILE_COLS + lane % TILE_COLS
        if r < height and c < width:
            m0, m1, p0, sp, q0, sq, axis, weight = _ray(tab, view, r, c, height, width,
                                                        origin, spacing, n, cone)
            p_axis, q_axis = _other_axes(axis)
            n_p, n_q = _pick(n, p_axis), _pick(n, q_axis)
            st_a, st_p, st_q = _pick(stride, axis), _pick(stride, p_axis), _pick(stride, q_axis)
            g = 0.0
            if ti.static(adjoint):
                g = proj[view, r, c] * weight
                if g == 0.0:
                    m1 = m0 - 1
            acc = 0.0
            for m in range(m0, m1 + 1):
                i0, i1, wi0, wi1 = linear_taps(p0 + m * sp, n_p)
                j0, j1, wj0, wj1 = linear_taps(q0 + m * sq, n_q)
                base = m * st_a
                k00 = base + i0 * st_p + j0 * st_q
                k01 = base + i0 * st_p + j1 * st_q
                k10 = base + i1 * st_p + j0 * st_q
                k11 = base + i1 * st_p + j1 * st_q
                if ti.static(adjoint):
                    ti.atomic_add(vol[k00], g * wi0 * wj0)
                    ti.atomic_add(vol[k01], g * wi0 * wj1)
                    ti.atomic_add(vol[k10], g * wi1 * wj0)
                    ti.atomic_add(vol[k11], g * wi1 * wj1)
                else:
                    acc += (wi0 * (wj0 * vol[k00] + wj1 * vol[k01])
                            + wi1 * (wj0 * vol[k10] + wj1 * vol[k11]))
            if ti.static(not adjoint):
                proj[view, r, c] = acc * weight
