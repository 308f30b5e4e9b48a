"""Quaternion -> rotation matrix in Taichi, and its hand-written adjoint.

Quaternions are ``(w, x, y, z)`` of any non-zero norm; they are normalised first and the
adjoint includes the normalisation, so gradients flow to the raw 4-vector.
"""
import taichi as ti

vec3 = ti.math.vec3
vec4 = ti.math.vec4
mat3 = ti.math.mat3


@ti.func
def quat_to_rotmat(q: vec4) -> mat3:
    """Rotation matrix of ``q / |q|``."""
    n = q / q.norm()
    w, x, y, z = n[0], n[1], n[2], n[3]
    return mat3(
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    )


@ti.func
def quat_to_rotmat_vjp(q: vec4, g_r: mat3) -> vec4:
    """Gradient w.r.t. the raw quaternion ``q`` given ``g_r = dL/dR`` (3x3)."""
    qn_norm = q.norm()
    n = q / qn_norm
    w, x, y, z = n[0], n[1], n[2], n[3]
    gw = 2 * (-z * g_r[0, 1] + y * g_r[0, 2] + z * g_r[1, 0] - x * g_r[1, 2]
              - y * g_r[2, 0] + x * g_r[2, 1])
    gx = 2 * (y * g_r[0, 1] + z * g_r[0, 2] + y * g_r[1, 0] - 2 * x * g_r[1, 1]
              - w * g_r[1, 2] + z * g_r[2, 0] + w * g_r[2, 1] - 2 * x * g_r[2, 2])
    gy = 2 * (-2 * y * g_r[0, 0] + x * g_r[0, 1] + w * g_r[0, 2] + x * g_r[1, 0]
              + z * g_r[1, 2] - w * g_r[2, 0] + z * g_r[2, 1] - 2 * y * g_r[2, 2])
    gz = 2 * (-2 * z * g_r[0, 0] - w * g_r[0, 1] + x * g_r[0, 2] + w * g_r[1, 0]
              - 2 * z * g_r[1, 1] + y * g_r[1, 2] + x * g_r[2, 0] + y * g_r[2, 1])
    g_n = vec4(gw, gx, gy, gz)
    return (g_n - g_n.dot(n) * n) / qn_norm
