"""Projection of one 3D Gaussian onto one detector: local-affine splat and its adjoint.

For a Gaussian (centre p, scales s, rotation R, density rho) and a view, the ray-space map
``phi(x) = (c(x), r(x), l(x))`` sends a world point to its continuous detector column and row
and its distance along the ray (``l = |x - src|`` for cone beam, ``l = x . ray`` for
parallel beam). Its Jacobian at p, ``J = [grad c; grad r; unit ray direction]``, is exact:
for cone beam ``c = (Pc . t) / (Pn . t)`` with ``t = p - src`` gives
``grad c = (Pc - c Pn) / (Pn . t)`` (see ``Geometry.projection_rows``).

With ``M = R diag(s)`` (so ``Sigma = M M^T``) the ray-space covariance is
``S~ = (J M)(J M)^T``; its top-left 2x2 block ``S^`` is the detector covariance in pixel^2.
The line integral through pixel ``(r, c)`` is ``amp exp(-1/2 d^T S^-1 d)`` with ``d`` the
offset from the projected centre and the integration-bias rectified amplitude

    amp = rho sqrt(2 pi det S~ / det S^) = rho sqrt(2 pi) |det J| s0 s1 s2 / sqrt(det S^),

exact for parallel beams and the local-affine approximation for cone beams. The splat is
cut at ``d^T S^-1 d <= cutoff^2`` (3 sigma by default); its pixel bounding box has
half-widths ``cutoff sqrt(S^_00)`` and ``cutoff sqrt(S^_11)``.

Per (view, Gaussian) the forward stores 8 floats: ``c, r, conic (a, b, c), amp, hx, hy``
where the conic ``[[a, b], [b, c]] = S^-1``. ``amp = 0`` marks a culled Gaussian (behind
the source, degenerate).
"""
import taichi as ti

from .rotation import quat_to_rotmat, quat_to_rotmat_vjp

vec2 = ti.math.vec2
vec3 = ti.math.vec3
vec4 = ti.math.vec4
mat3 = ti.math.mat3

SQRT_2PI = 2.5066282746310002
NUM_PARAMS = 8  # c, r, conic a, b, c, amp, hx, hy
NUM_GRADS = 6   # dL / d(c, r, conic a, b, c, amp)
# a Gaussian closer to the source plane than this fraction of the source-detector distance
# is culled (its perspective projection is unbounded)
MIN_DEPTH = 1e-4


@ti.func
def view_row(table: ti.types.ndarray(), v: ti.i32, k: ti.i32) -> vec3:
    """Three consecutive columns ``k .. k+2`` of the per-view kernel table."""
    return vec3(table[v, k], table[v, k + 1], table[v, k + 2])


@ti.func
def load_gaussian(means: ti.types.ndarray(), scales: ti.types.ndarray(),
                  quats: ti.types.ndarray(), i: ti.i32):
    p = vec3(means[i, 0], means[i, 1], means[i, 2])
    s = vec3(scales[i, 0], scales[i, 1], scales[i, 2])
    q = vec4(quats[i, 0], quats[i, 1], quats[i, 2], quats[i, 3])
    return p, s, q


@ti.func
def ray_jacobian(p: vec3, table: ti.types.ndarray(), v: ti.i32, cone: ti.template()):
    """Projected centre (c, r), Jacobian rows j0, j1, j2, and the depth ``Pn . t`` (1 for parallel)."""
    pc = view_row(table, v, 12)
    pr = view_row(table, v, 15)
    c = 0.0
    r = 0.0
    nt = 1.0
    j0 = pc
    j1 = pr
    j2 = view_row(table, v, 0)
    if ti.static(cone):
        pn = view_row(table, v, 18)
        t = p - j2
        nt = pn.dot(t)
        c = pc.dot(t) / nt
        r = pr.dot(t) / nt
        j0 = (pc - c * pn) / nt
        j1 = (pr - r * pn) / nt
        j2 = t / t.norm()
    else:
        c = pc.dot(p) + table[v, 21]
        r = pr.dot(p) + table[v, 22]
    return c, r, j0, j1, j2, nt


@ti.func
def detector_covariance(s: vec3, q: vec4, j0: vec3, j1: vec3):
    """``R``, ``M = R diag(s)``, rows ``T_a = M^T j_a`` and ``S^ = [[s00, s01], [s01, s11]]``."""
    rot = quat_to_rotmat(q)
    m = rot @ ti.Matrix([[s[0], 0, 0], [0, s[1], 0], [0, 0, s[2]]])
    t0 = m.transpose() @ j0
    t1 = m.transpose() @ j1
    return rot, m, t0, t1, t0.dot(t0), t0.dot(t1), t1.dot(t1)


@ti.func
def is_regular(s00: ti.f32, s01: ti.f32, s11: ti.f32) -> bool:
    """Whether the detector covariance is safely invertible."""
    det2 = s00 * s11 - s01 * s01
    return det2 > 1e-12 * s00 * s11 and det2 > 0


@ti.func
def splat_params(p: vec3, s: vec3, q: vec4, rho: ti.f32, table: ti.types.ndarray(),
                 v: ti.i32, cone: ti.template(), cutoff: ti.f32):
    """The 8 per-(view, Gaussian) splat parameters (see module docstring)."""
    c, r, j0, j1, j2, nt = ray_jacobian(p, table, v, cone)
    out = ti.Vector([0.0] * NUM_PARAMS)
    if nt > MIN_DEPTH:
        rot, m, t0, t1, s00, s01, s11 = detector_covariance(s, q, j0, j1)
        if is_regular(s00, s01, s11):
            det2 = s00 * s11 - s01 * s01
            det_j = ti.abs(ti.Matrix.rows([j0, j1, j2]).determinant())
            amp = rho * SQRT_2PI * det_j * s[0] * s[1] * s[2] / ti.sqrt(det2)
            out = ti.Vector([c, r, s11 / det2, -s01 / det2, s00 / det2, amp,
                             cutoff * ti.sqrt(s00), cutoff * ti.sqrt(s11)])
    return out


@ti.func
def splat_params_vjp(p: vec3, s: vec3, q: vec4, rho: ti.f32, table: ti.types.ndarray(),
                     v: ti.i32, cone: ti.template(), g: ti.types.vector(6, ti.f32)):
    """Adjoint of :func:`splat_params` for one view.

    ``g`` holds ``dL/d(c, r, conic a, b, c, amp)``. Returns gradients w.r.t.
    ``(p, s, q, rho)``; all zero for a culled Gaussian.
    """
    g_p = vec3(0.0)
    g_s = vec3(0.0)
    g_q = vec4(0.0)
    g_rho = 0.0
    c, r, j0, j1, j2, nt = ray_jacobian(p, table, v, cone)
    if nt > MIN_DEPTH:
        rot, m, t0, t1, s00, s01, s11 = detector_covariance(s, q, j0, j1)
        if is_regular(s00, s01, s11):
            det2 = s00 * s11 - s01 * s01
            jac = ti.Matrix.rows([j0, j1, j2])
            det_j = ti.abs(jac.determinant())
            mu = SQRT_2PI * det_j * s[0] * s[1] * s[2] / ti.sqrt(det2)
            ka = s11 / det2
            kb = -s01 / det2
            kc = s00 / det2
            g_rho = g[5] * mu
            g_logmu = g[5] * rho * mu
            # conic -> detector covariance: dK = -K dS K, plus d log(mu) = -1/2 tr(K dS)
            kmat = ti.Matrix([[ka, kb], [kb, kc]])
            gk = ti.Matrix([[g[2], 0.5 * g[3]], [0.5 * g[3], g[4]]])
            gs = -(kmat @ gk @ kmat) - 0.5 * g_logmu * kmat
            g_t0 = 2.0 * (gs[0, 0] * t0 + gs[0, 1] * t1)
            g_t1 = 2.0 * (gs[0, 1] * t0 + gs[1, 1] * t1)
            # T_a = M^T j_a
            g_m = j0.outer_product(g_t0) + j1.outer_product(g_t1)
            g_j0 = m @ g_t0
            g_j1 = m @ g_t1
            g_j2 = vec3(0.0)
            g_s = g_logmu / s
            for k in ti.static(range(3)):
                g_s[k] += rot[0, k] * g_m[0, k] + rot[1, k] * g_m[1, k] + rot[2, k] * g_m[2, k]
            g_rot = g_m @ ti.Matrix([[s[0], 0, 0], [0, s[1], 0], [0, 0, s[2]]])
            g_q = quat_to_rotmat_vjp(q, g_rot)
            g_c = g[0]
            g_r = g[1]
            if ti.static(cone):
                # d log|det J| / dJ = J^-T
                jinv_t = jac.inverse().transpose()
                g_j0 += g_logmu * vec3(jinv_t[0, 0], jinv_t[0, 1], jinv_t[0, 2])
                g_j1 += g_logmu * vec3(jinv_t[1, 0], jinv_t[1, 1], jinv_t[1, 2])
                g_j2 += g_logmu * vec3(jinv_t[2, 0], jinv_t[2, 1], jinv_t[2, 2])
                pc = view_row(table, v, 12)
                pr = view_row(table, v, 15)
                pn = view_row(table, v, 18)
                t = p - view_row(table, v, 0)
                g_c -= pn.dot(g_j0) / nt
                g_r -= pn.dot(g_j1) / nt
                g_nt = -(g_j0.dot(j0) + g_j1.dot(j1)) / nt - (g_c * c + g_r * r) / nt
                tl = t.norm()
                g_p = (g_c * pc + g_r * pr) / nt + g_nt * pn + (g_j2 - g_j2.dot(j2) * j2) / tl
            else:
                g_p = g_c * j0 + g_r * j1
    return g_p, g_s, g_q, g_rho
