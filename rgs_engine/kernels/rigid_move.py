"""Gaussians moved by rigid poses, and the adjoint w.r.t. the poses (registration's steps).

A pose is packed as 16 numbers: its rotation ``R`` (9, row-major), translation ``t`` (3, mm)
and the unit quaternion ``q`` (w, x, y, z) of ``R``. Gaussian ``i`` moves by pose 0 when
``i < first``, else by the last pose (one pose for all, or one for a structure's rows and
one for its context's): ``mean' = R mean + t``, ``quat' = q * quat`` (Hamilton product).

1. :func:`move`: one thread per Gaussian.
2. :func:`move_vjp`: one thread per (pose, chunk of its Gaussians) accumulates the 16 pose
   gradients in registers (float64) and adds them once (:mod:`.chunks`):
   ``dR = sum g_mean mean^T``, ``dt = sum g_mean``, ``dq = sum d(q * quat)/dq^T g_quat``.

The torch form (the tests' reference): :func:`rgs_engine.core.rigid.rigid_transform_gaussians`
and :func:`rgs_engine.core.rigid.rigid_transform_vjp`.
"""
import taichi as ti

from .launch import kernel

vec3 = ti.math.vec3
vec4 = ti.math.vec4


@ti.func
def _pose_of(poses: ti.types.ndarray(), first: ti.i32, i: ti.i32) -> ti.i32:
    k = 0
    if i >= first:
        k = poses.shape[0] - 1
    return k


@kernel
def move(means: ti.types.ndarray(ndim=2), quats: ti.types.ndarray(ndim=2), poses: ti.types.ndarray(ndim=2),
         first: ti.i32, out_means: ti.types.ndarray(ndim=2), out_quats: ti.types.ndarray(ndim=2)):
    """``out_means`` (N, 3), ``out_quats`` (N, 4): ``means`` / ``quats`` moved by ``poses`` (K, 16)."""
    for i in range(means.shape[0]):
        k = _pose_of(poses, first, i)
        for a in ti.static(range(3)):
            out_means[i, a] = (poses[k, 3 * a] * means[i, 0] + poses[k, 3 * a + 1] * means[i, 1]
                               + poses[k, 3 * a + 2] * means[i, 2] + poses[k, 9 + a])
        qw, qx, qy, qz = poses[k, 12], poses[k, 13], poses[k, 14], poses[k, 15]
        pw, px, py, pz = quats[i, 0], quats[i, 1], quats[i, 2], quats[i, 3]
        out_quats[i, 0] = qw * pw - qx * px - qy * py - qz * pz
        out_quats[i, 1] = qw * px + qx * pw + qy * pz - qz * py
        out_quats[i, 2] = qw * py - qx * pz + qy * pw + qz * px
        out_quats[i, 3] = qw * pz + qx * py - qy * px + qz * pw


@kernel
def move_vjp(means: ti.types.ndarray(ndim=2), quats: ti.types.ndarray(ndim=2), g_means: ti.types.ndarray(ndim=2),
             g_quats: ti.types.ndarray(ndim=2), first: ti.i32, grads: ti.types.ndarray(dtype=ti.f64, ndim=2),
             chunks: ti.i32, chunk_step: ti.i32, item_step: ti.i32, per_chunk: ti.i32):
    """``grads`` (K, 16) float64 += the gradients w.r.t. each packed pose, given ``g_means``
    (N, 3) / ``g_quats`` (N, 4) w.r.t. the moved Gaussians; chunks of each pose's Gaussians
    as :func:`.chunks.chunking` gives for ``max(first, N - first)`` items."""
    n = means.shape[0]
    for k, ch in ti.ndrange(grads.shape[0], chunks):
        lo = 0
        hi = n
        if grads.shape[0] > 1:
            if k == 0:
                hi = first
            else:
                lo = first
        acc = ti.Vector([0.0] * 16, dt=ti.f64)
        for t in range(per_chunk):
            i = lo + ch * chunk_step + t * item_step
            if i < hi:
                for a in ti.static(range(3)):
                    g = ti.cast(g_means[i, a], ti.f64)
                    for b in ti.static(range(3)):
                        acc[3 * a + b] += g * ti.cast(means[i, b], ti.f64)
                    acc[9 + a] += g
                gw, gx, gy, gz = (ti.cast(g_quats[i, 0], ti.f64), ti.cast(g_quats[i, 1], ti.f64),
                                  ti.cast(g_quats[i, 2], ti.f64), ti.cast(g_quats[i, 3], ti.f64))
                pw, px, py, pz = (ti.cast(quats[i, 0], ti.f64), ti.cast(quats[i, 1], ti.f64),
                                  ti.cast(quats[i, 2], ti.f64), ti.cast(quats[i, 3], ti.f64))
                acc[12] += gw * pw + gx * px + gy * py + gz * pz
                acc[13] += -gw * px + gx * pw - gy * pz + gz * py
                acc[14] += -gw * py + gx * pz + gy * pw - gz * px
                acc[15] += -gw * pz - gx * py + gy * px + gz * pw
        for j in ti.static(range(16)):
            ti.atomic_add(grads[k, j], acc[j])
