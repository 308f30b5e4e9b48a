"""Taichi kernels: voxelise Gaussians onto a grid (forward) and the hand-written adjoint.

Field: ``mu(x) = sum_i rho_i G_i(x)``, ``G_i = exp(-m_i / 2)`` where ``m_i <= cutoff^2`` and
0 elsewhere, with ``m_i(x) = (x - p_i)^T Lambda_i (x - p_i)`` and the precision
``Lambda_i = R_i diag(1/s_i^2) R_i^T`` (mm, 1/mm^2). Voxel ``(i, j, k)`` of the grid sits at
``origin + (i, j, k) * spacing``.

Design (scatter over box chunks, chosen for the GPU):

* :func:`prepare` (one thread per Gaussian) computes the precision, the voxel index box of
  the cutoff ellipsoid (half-extent ``cutoff * sqrt(Sigma_aa)`` along world axis ``a``,
  clamped to the grid) and cuts the box's voxels, flattened with z fastest, into chunks of
  :data:`CHUNK`. A Gaussian whose box misses the grid gets no chunk, so a small sub-grid
  (the per-step 32^3 TV block) costs one pass over the Gaussians plus its few chunks.
* The caller turns the chunk counts into int64 inclusive ends with one ``torch.cumsum``;
  the work kernels read the total from ``ends[-1]`` on the device (no host sync) and find a
  chunk's Gaussian by binary search in ``ends``. A chunk has at most ``CHUNK`` voxels, so a
  huge Gaussian is spread over many threads and never serialises one. Threads cover
  ``min(total, CHUNKS_PER_PASS)`` chunks and step by that many, so any total is handled
  with int32 thread ids (normally in a single pass).
* :func:`splat` (forward) gives each chunk ``lanes`` consecutive threads (32 = one warp on
  CUDA, 1 on the CPU) that step through the chunk ``lanes`` voxels apart, so one warp's
  atomic adds hit consecutive voxels (z fastest) and coalesce. Atomics were chosen over a
  gather per voxel block: a gather needs a sort of (block, Gaussian) pairs with a host-known
  pair count and evaluates whole blocks per pair, while the scatter makes one atomic per
  (Gaussian, voxel inside its ellipsoid) and evaluates only the Gaussian's box.
* :func:`gather_moments` (backward, one thread per chunk, so no cross-lane reduction)
  reads the upstream gradient over the chunk and accumulates 10 moments of
  ``w = dL/dmu * G`` in registers: ``S0 = sum w``, ``S1 = sum w d``, ``S2 = sum w d d^T``
  (``d = x - p``), then adds them to the Gaussian's row with 10 atomics per chunk.
  :func:`moments_to_grads` (one thread per Gaussian) turns them into parameter gradients:
  ``g_rho = S0``, ``g_p = rho Lambda S1``, ``g_s_k = rho (R^T S2 R)_kk / s_k^3``,
  ``g_R = -rho S2 R diag(1/s^2)``, then ``g_q`` through the rotation and the quaternion
  normalisation.

Limit: the grid must have fewer than 2^31 voxels (int32 voxel indices).
"""
import taichi as ti

from .launch import kernel
from .rotation import quat_to_rotmat, quat_to_rotmat_vjp

CHUNK = 512  # box voxels per work item: 16 per lane of a forward warp
NPARAM = 10  # per-Gaussian packed floats: d0 (3), precision xx yy zz xy xz yz (6), rho
NMOMENT = 10  # backward moments: S0, S1 (3), S2 xx yy zz xy xz yz (6)
CHUNKS_PER_PASS = 1 << 24  # chunks one pass of the thread grid covers (keeps thread ids int32)
BOX_MARGIN = 1e-3  # voxels added to each side of the box against float32 rounding

vec3 = ti.math.vec3
ivec3 = ti.math.ivec3
vec4 = ti.math.vec4
mat3 = ti.math.mat3
f32_1d = ti.types.ndarray(dtype=ti.f32, ndim=1)
f32_2d = ti.types.ndarray(dtype=ti.f32, ndim=2)
f32_3d = ti.types.ndarray(dtype=ti.f32, ndim=3)
i32_1d = ti.types.ndarray(dtype=ti.i32, ndim=1)
i64_1d = ti.types.ndarray(dtype=ti.i64, ndim=1)
i32_2d = ti.types.ndarray(dtype=ti.i32, ndim=2)


@ti.func
def _row3(a: ti.template(), g: ti.i32) -> vec3:
    return vec3(a[g, 0], a[g, 1], a[g, 2])


@ti.func
def _sym(a: ti.template(), g: ti.i32, c: ti.template()) -> mat3:
    """Symmetric 3x3 matrix stored as xx yy zz xy xz yz in columns ``c .. c + 5`` of row g."""
    xx, yy, zz = a[g, c], a[g, c + 1], a[g, c + 2]
    xy, xz, yz = a[g, c + 3], a[g, c + 4], a[g, c + 5]
    return mat3([xx, xy, xz], [xy, yy, yz], [xz, yz, zz])


@ti.func
def _diag(v: vec3) -> mat3:
    return mat3([v[0], 0.0, 0.0], [0.0, v[1], 0.0], [0.0, 0.0, v[2]])


@ti.func
def _rotation_scale(scales: ti.template(), quats: ti.template(), g: ti.i32):
    q = vec4(quats[g, 0], quats[g, 1], quats[g, 2], quats[g, 3])
    return q, quat_to_rotmat(q), _row3(scales, g)


@kernel
def prepare(means: f32_2d, scales: f32_2d, quats: f32_2d, densities: f32_1d,
            origin: vec3, spacing: vec3, shape: ivec3, cutoff: ti.f32,
            params: f32_2d, ibox: i32_2d, counts: i32_1d):
    """Per Gaussian: packed ``params`` (N, NPARAM), ``ibox`` (N, 6) = first voxel index (3)
    and box size in voxels (3), ``counts`` (N,) = number of chunks of its box."""
    for g in range(means.shape[0]):
        _, r, s = _rotation_scale(scales, quats, g)
        r_inv_s = r @ _diag(1.0 / s)
        prec = r_inv_s @ r_inv_s.transpose()
        rs = r @ _diag(s)
        p = _row3(means, g)
        lo = ivec3(0)
        size = ivec3(0)
        for a in ti.static(range(3)):
            half = cutoff * ti.sqrt(rs[a, 0] ** 2 + rs[a, 1] ** 2 + rs[a, 2] ** 2)
            first = ti.math.clamp(ti.ceil((p[a] - half - origin[a]) / spacing[a] - BOX_MARGIN),
                                  0.0, ti.cast(shape[a], ti.f32))
            last = ti.math.clamp(ti.floor((p[a] + half - origin[a]) / spacing[a] + BOX_MARGIN),
                                 -1.0, ti.cast(shape[a] - 1, ti.f32))
            lo[a] = ti.cast(first, ti.i32)
            size[a] = ti.max(ti.cast(last, ti.i32) - lo[a] + 1, 0)
        d0 = origin + ti.cast(lo, ti.f32) * spacing - p
        packed = ti.Vector([d0[0], d0[1], d0[2], prec[0, 0], prec[1, 1], prec[2, 2],
                            prec[0, 1], prec[0, 2], prec[1, 2], densities[g]])
        for c in ti.static(range(NPARAM)):
            params[g, c] = packed[c]
        for a in ti.static(range(3)):
            ibox[g, a] = lo[a]
            ibox[g, 3 + a] = size[a]
        counts[g] = (size[0] * size[1] * size[2] + CHUNK - 1) // CHUNK


@ti.func
def _unflatten(v: ti.i32, size: ivec3) -> ivec3:
    """Box-local voxel index of flat index ``v`` (z fastest)."""
    return ivec3(v // (size[1] * size[2]), (v // size[2]) % size[1], v % size[2])


@ti.func
def _advance(idx: ivec3, step: ivec3, size: ivec3) -> ivec3:
    """Mixed-radix ``idx + step`` (both from :func:`_unflatten`); x may run past the box."""
    z = idx[2] + step[2]
    carry_z = ti.cast(z >= size[2], ti.i32)
    y = idx[1] + step[1] + carry_z
    carry_y = ti.cast(y >= size[1], ti.i32)
    return ivec3(idx[0] + step[0] + carry_y, y - carry_y * size[1], z - carry_z * size[2])


@ti.func
def _passes(ends: ti.template(), per_pass: ti.i32):
    """Total chunks and the chunk stride between passes, ``min(total, per_pass)``."""
    total = ends[ends.shape[0] - 1]
    return total, ti.min(total, ti.cast(per_pass, ti.i64))


@ti.func
def _cursor(ibox: ti.template(), ends: ti.template(), chunk: ti.i64, lane: ti.i32,
            lanes: ti.template()):
    """Gaussian ``g`` of work item ``chunk`` (binary search in the inclusive ``ends``), the
    flat index ``v`` of this lane's first voxel, the chunk's end ``stop``, the voxel's
    box-local index, the per-step index increment, and the box (first index, size)."""
    lo_g, hi_g = 0, ends.shape[0] - 1
    while lo_g < hi_g:
        mid = (lo_g + hi_g) // 2
        if ends[mid] > chunk:
            hi_g = mid
        else:
            lo_g = mid + 1
    g = lo_g
    first = ivec3(ibox[g, 0], ibox[g, 1], ibox[g, 2])
    size = ivec3(ibox[g, 3], ibox[g, 4], ibox[g, 5])
    chunk0 = ti.i64(0)
    if g > 0:
        chunk0 = ends[g - 1]
    start = ti.cast(chunk - chunk0, ti.i32) * CHUNK
    v = start + lane
    stop = ti.min(start + CHUNK, size[0] * size[1] * size[2])
    return g, v, stop, _unflatten(v, size), _unflatten(lanes, size), first, size


@ti.func
def _profile(d: vec3, prec: mat3, cutoff2: ti.f32) -> ti.f32:
    """Unit-peak Gaussian ``G`` at offset ``d = x - p`` (mm), 0 beyond the cutoff."""
    m = d.dot(prec @ d)
    out = 0.0
    if m <= cutoff2:
        out = ti.exp(-0.5 * m)
    return out


@kernel
def splat(params: f32_2d, ibox: i32_2d, ends: i64_1d, spacing: vec3, cutoff2: ti.f32,
          volume: f32_3d, per_pass: ti.i32, lanes: ti.template()):
    """Add every Gaussian into the zero-initialised ``volume`` (nx, ny, nz), 1/mm."""
    total, stride = _passes(ends, per_pass)
    for t in range(ti.cast(stride, ti.i32) * lanes):
        chunk = ti.cast(t // lanes, ti.i64)
        while chunk < total:
            g, v, stop, idx, step, first, size = _cursor(ibox, ends, chunk, t % lanes, lanes)
            d0, prec, rho = _row3(params, g), _sym(params, g, 3), params[g, 9]
            while v < stop:
                w = _profile(d0 + ti.cast(idx, ti.f32) * spacing, prec, cutoff2)
                if w > 0.0:
                    ti.atomic_add(volume[first + idx], rho * w)
                v += lanes
                idx = _advance(idx, step, size)
            chunk += stride


@kernel
def gather_moments(params: f32_2d, ibox: i32_2d, ends: i64_1d, spacing: vec3, cutoff2: ti.f32,
                   grad_volume: f32_3d, moments: f32_2d, per_pass: ti.i32):
    """Add each chunk's moments of ``w = grad_volume * G`` into the zero-initialised
    ``moments`` (N, NMOMENT): ``S0``, ``S1`` (mm), ``S2`` xx yy zz xy xz yz (mm^2)."""
    total, stride = _passes(ends, per_pass)
    for t in range(ti.cast(stride, ti.i32)):
        chunk = ti.cast(t, ti.i64)
        while chunk < total:
            g, v, stop, idx, step, first, size = _cursor(ibox, ends, chunk, 0, 1)
            d0, prec = _row3(params, g), _sym(params, g, 3)
            acc = ti.Vector.zero(ti.f32, NMOMENT)
            while v < stop:
                d = d0 + ti.cast(idx, ti.f32) * spacing
                w = _profile(d, prec, cutoff2)
                if w > 0.0:
                    w *= grad_volume[first + idx]
                    acc += w * ti.Vector([1.0, d[0], d[1], d[2], d[0] * d[0], d[1] * d[1],
                                          d[2] * d[2], d[0] * d[1], d[0] * d[2], d[1] * d[2]])
                v += 1
                idx = _advance(idx, step, size)
            for k in ti.static(range(NMOMENT)):
                ti.atomic_add(moments[g, k], acc[k])
            chunk += stride


@kernel
def moments_to_grads(scales: f32_2d, quats: f32_2d, densities: f32_1d, moments: f32_2d,
                     grad_means: f32_2d, grad_scales: f32_2d, grad_quats: f32_2d,
                     grad_densities: f32_1d):
    """Parameter gradients from the moments of :func:`gather_moments` (one thread each)."""
    for g in range(scales.shape[0]):
        q, r, s = _rotation_scale(scales, quats, g)
        rho = densities[g]
        inv_s2 = 1.0 / (s * s)
        s1 = ti.Vector([moments[g, 1], moments[g, 2], moments[g, 3]])
        s2 = _sym(moments, g, 4)
        rd = r @ _diag(inv_s2)
        g_p = rho * (rd @ (r.transpose() @ s1))
        t = r.transpose() @ s2 @ r
        g_q = quat_to_rotmat_vjp(q, -rho * (s2 @ rd))
        for a in ti.static(range(3)):
            grad_means[g, a] = g_p[a]
            grad_scales[g, a] = rho * t[a, a] * inv_s2[a] / s[a]
        for a in ti.static(range(4)):
            grad_quats[g, a] = g_q[a]
        grad_densities[g] = moments[g, 0]
