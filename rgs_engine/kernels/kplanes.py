"""One K-planes level's features of N points at B times, and the adjoint.

A level has three spatial planes ``spatial`` (3, R, R, F), the xy, xz and yz planes (rows along
the second axis, columns along the first, as ``grid_sample`` reads them; channels last, so the
threads of a warp, one point's channels, read and add to consecutive addresses), and three time planes
already interpolated to the batch's B times: ``lines`` (3, B, R, F), plane k's row at time b
along axis k (x, y, z). For a point ``p`` (box coordinates in ``[-1, 1]``) and channel f::

    S_f(p)    = prod_s bilinear(spatial[s, :, :, f], p[a_s], p[b_s])
    T_f(p, b) = prod_k linear(lines[k, b, :, f], p[k])
    out[b, n, offset + f] = S_f(p_n) T_f(p_n, b)

with ``align_corners=True`` sampling: coordinate -1 is the first cell, 1 the last; beyond them
the border cell and no gradient (``grid_sample``'s ``padding_mode="border"``).

:func:`forward`, one thread per (point, channel): the three spatial samples once, then the
time product per view. :func:`backward`, the same threads: the upstream gradient chained into
``d spatial`` (atomics into the 4 cells of each sample: the channels of a warp write to
different planes' cells), ``d lines`` (atomics into the (B, R, F) rows: channels are the
fastest index) and each thread's share of ``d points`` (N, F, 3), which the caller sums over
the channels of all levels.
Written for GPUs (hardware float atomics); the model uses torch's operators on a CPU.
The float64 torch definition (``grid_sample`` and
:func:`rgs_engine.motion.deformation.sample_time_plane`) is
:func:`rgs_engine._torch_impl.kplanes.level_features`.
"""
import taichi as ti

from .launch import kernel

SPATIAL_AXES = ((0, 1), (0, 2), (1, 2))  # (column axis, row axis) of the xy, xz, yz planes

vec3 = ti.math.vec3


@ti.func
def _cell(coord, size):
    """Lower cell index, the upper cell's weight and d weight / d coord for a coordinate in
    [-1, 1] on ``size`` cells (0 gradient at and beyond the border)."""
    u = (coord + 1.0) * (0.5 * (size - 1))
    du = 0.5 * (size - 1)
    if u <= 0.0:
        u = 0.0
        du = 0.0
    elif u >= size - 1:
        u = ti.cast(size - 1, ti.f32)
        du = 0.0
    i = ti.max(0, ti.min(ti.cast(ti.floor(u), ti.i32), size - 2))  # NaN: a cell inside, NaN out
    return i, u - i, du


@ti.func
def _cells(p, size):
    """:func:`_cell` of a point's three coordinates ``p`` (3-vector) (every plane of a level has ``size``
    cells per axis): lower cells, weights and d weight / d coord, each a 3-vector."""
    j = ti.Vector([0, 0, 0])
    wj = vec3(0.0)
    dj = vec3(0.0)
    for k in ti.static(range(3)):
        j[k], wj[k], dj[k] = _cell(p[k], size)
    return j, wj, dj


@kernel
def forward(points: ti.types.ndarray(ndim=2), spatial: ti.types.ndarray(ndim=4),
            lines: ti.types.ndarray(ndim=4), out: ti.types.ndarray(ndim=3), offset: ti.i32):
    """``out[:, :, offset:offset + F]`` (B, N, >= offset + F) = the level's features."""
    channels = spatial.shape[3]
    size = spatial.shape[1]
    views = lines.shape[1]
    for n, f in ti.ndrange(points.shape[0], channels):
        j, wj, _ = _cells(vec3(points[n, 0], points[n, 1], points[n, 2]), size)
        s = 1.0
        for p in ti.static(range(3)):
            a, b = ti.static(SPATIAL_AXES[p])
            x0, wx, y0, wy = j[a], wj[a], j[b], wj[b]
            s *= ((1 - wy) * ((1 - wx) * spatial[p, y0, x0, f] + wx * spatial[p, y0, x0 + 1, f])
                  + wy * ((1 - wx) * spatial[p, y0 + 1, x0, f] + wx * spatial[p, y0 + 1, x0 + 1, f]))
        for v in range(views):
            t = 1.0
            for k in ti.static(range(3)):
                t *= (1 - wj[k]) * lines[k, v, j[k], f] + wj[k] * lines[k, v, j[k] + 1, f]
            out[v, n, offset + f] = s * t


@kernel
def backward(points: ti.types.ndarray(ndim=2), spatial: ti.types.ndarray(ndim=4),
             lines: ti.types.ndarray(ndim=4), grad_out: ti.types.ndarray(ndim=3), offset: ti.i32,
             grad_spatial: ti.types.ndarray(ndim=4), grad_lines: ti.types.ndarray(ndim=4),
             grad_points: ti.types.ndarray(ndim=3)):
    """From ``grad_out`` (B, N, >= offset + F): ``grad_spatial`` (3, R, R, F) and ``grad_lines``
    (3, B, R, F) += (zero them first), ``grad_points[:, offset:offset + F]`` (N, >= offset + F, 3)
    = each channel's share."""
    size = spatial.shape[1]
    views = lines.shape[1]
    for n, f in ti.ndrange(points.shape[0], spatial.shape[3]):
        j, wj, dj = _cells(vec3(points[n, 0], points[n, 1], points[n, 2]), size)
        # the spatial samples and d sample / d (column, row coordinate)
        samples = vec3(0.0)
        dcol = vec3(0.0)
        drow = vec3(0.0)
        for p in ti.static(range(3)):
            a, b = ti.static(SPATIAL_AXES[p])
            x0, wx, dux, y0, wy, duy = j[a], wj[a], dj[a], j[b], wj[b], dj[b]
            c00 = spatial[p, y0, x0, f]
            c01 = spatial[p, y0, x0 + 1, f]
            c10 = spatial[p, y0 + 1, x0, f]
            c11 = spatial[p, y0 + 1, x0 + 1, f]
            samples[p] = (1 - wy) * ((1 - wx) * c00 + wx * c01) + wy * ((1 - wx) * c10 + wx * c11)
            dcol[p] = ((1 - wy) * (c01 - c00) + wy * (c11 - c10)) * dux
            drow[p] = ((1 - wx) * (c10 - c00) + wx * (c11 - c01)) * duy
        s = samples[0] * samples[1] * samples[2]
        ds = 0.0
        dp = vec3(0.0)
        for v in range(views):
            g = grad_out[v, n, offset + f]
            lo = vec3(lines[0, v, j[0], f], lines[1, v, j[1], f], lines[2, v, j[2], f])
            hi = vec3(lines[0, v, j[0] + 1, f], lines[1, v, j[1] + 1, f], lines[2, v, j[2] + 1, f])
            t = (1 - wj) * lo + wj * hi
            ds += g * t[0] * t[1] * t[2]
            gs = g * s
            dt = vec3(gs * t[1] * t[2], gs * t[0] * t[2], gs * t[0] * t[1])
            for k in ti.static(range(3)):
                ti.atomic_add(grad_lines[k, v, j[k], f], dt[k] * (1 - wj[k]))
                ti.atomic_add(grad_lines[k, v, j[k] + 1, f], dt[k] * wj[k])
            dp += dt * (hi - lo) * dj
        dsp = vec3(ds * samples[1] * samples[2], ds * samples[0] * samples[2], ds * samples[0] * samples[1])
        for p in ti.static(range(3)):
            a, b = ti.static(SPATIAL_AXES[p])
            x0, wx, y0, wy = j[a], wj[a], j[b], wj[b]
            ti.atomic_add(grad_spatial[p, y0, x0, f], dsp[p] * (1 - wy) * (1 - wx))
            ti.atomic_add(grad_spatial[p, y0, x0 + 1, f], dsp[p] * (1 - wy) * wx)
            ti.atomic_add(grad_spatial[p, y0 + 1, x0, f], dsp[p] * wy * (1 - wx))
            ti.atomic_add(grad_spatial[p, y0 + 1, x0 + 1, f], dsp[p] * wy * wx)
            dp[a] += dsp[p] * dcol[p]
            dp[b] += dsp[p] * drow[p]
        for k in ti.static(range(3)):
            grad_points[n, offset + f, k] = dp[k]
