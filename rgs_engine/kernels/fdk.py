"""Taichi kernel: voxel-driven weighted backprojection of filtered projections (FDK / FBP).

One thread per voxel (z fastest, so a warp's voxels project to neighbouring pixels), all
views in one loop inside the thread. Voxel centre ``x = origin + (i, j, k) * spacing`` (mm)
is mapped to continuous pixel coordinates with the view's ``projection_rows`` (columns
``[12:23]`` of :meth:`~rgs_engine.core.geometry.Geometry.kernel_table`), the filtered projection
``q`` (V, H, W) is interpolated bilinearly there (zero outside the detector) and accumulated
with the per-view ``factor``:

* cone: ``out += factor[v] * q / (Pn . (x - src))^2``; ``Pn . (x - src)`` is the voxel's
  depth along the central ray as a fraction of the source-detector distance, so with
  ``factor = w (DSO / DSD)^2`` the term is FDK's ``w (DSO / depth)^2 q``;
* parallel: ``out += factor[v] * q``.
"""
import taichi as ti

from .launch import kernel
from .projector import f32_1d, f32_2d, f32_3d, linear_taps, table_row3, vec3


@kernel
def backproject(q: f32_3d, tab: f32_2d, factor: f32_1d, out: f32_3d,
                ox: ti.f32, oy: ti.f32, oz: ti.f32, sx: ti.f32, sy: ti.f32, sz: ti.f32,
                cone: ti.template()):
    """``out[i, j, k] = sum_v factor[v] * (depth weight) * q[v](row, col)`` (out overwritten)."""
    n_views, height, width = q.shape[0], q.shape[1], q.shape[2]
    origin = vec3(ox, oy, oz)
    spacing = vec3(sx, sy, sz)
    ti.loop_config(block_dim=128)
    for i, j, k in ti.ndrange(out.shape[0], out.shape[1], out.shape[2]):
        x = origin + vec3(i, j, k) * spacing
        acc = 0.0
        for view in range(n_views):
            pc, pr = table_row3(tab, view, 12), table_row3(tab, view, 15)
            col, row, scale = 0.0, 0.0, factor[view]
            if ti.static(cone):
                t = x - table_row3(tab, view, 0)
                depth = table_row3(tab, view, 18).dot(t)
                inv = ti.select(depth > 0.0, 1.0 / depth, 0.0)
                col, row, scale = pc.dot(t) * inv, pr.dot(t) * inv, scale * inv * inv
            else:
                col, row = pc.dot(x) + tab[view, 21], pr.dot(x) + tab[view, 22]
            r0, r1, wr0, wr1 = linear_taps(row, height)
            c0, c1, wc0, wc1 = linear_taps(col, width)
            acc += scale * (wr0 * (wc0 * q[view, r0, c0] + wc1 * q[view, r0, c1])
                            + wr1 * (wc0 * q[view, r1, c0] + wc1 * q[view, r1, c1]))
        out[i, j, k] = acc
