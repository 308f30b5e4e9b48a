"""The training image loss ``L1 + w (1 - SSIM)`` of projection stacks in one pass, and its adjoint.

``a`` is the prediction, ``b`` the target, both (V, H, W); SSIM as in
:mod:`rgs_engine.core.metrics` (a separable Gaussian window of odd size ``S``, 'valid' region
of ``H' = H - S + 1`` by ``W' = W - S + 1``, data range 1), with the target's blurred mean and
second moment ``mb`` (V, 2, H', W') given (:func:`~rgs_engine.core.metrics.ssim_moments`; the
targets never change during training). The loss is the mean of ``|a - b|`` over all V H W
pixels plus ``w`` times one minus the mean of the SSIM map over all V H' W' positions (all
slices are the same size, so the mean of the per-slice means).

:func:`forward`, one call of two passes:

1. thread per (view, block of :data:`ROWS` rows, column): the block's ``|a - b|`` sum and,
   for columns inside the valid width, the horizontal blurs of ``a``, ``a^2`` and ``a b``;
2. thread per (view, block of rows, valid column): the column's horizontal blurs loaded once,
   the vertical blurs give ``mu_a``, ``E[a^2]`` and ``E[ab]``; the SSIM map's value is summed
   over the block and its partial derivatives with respect to those three moments are kept
   for the backward pass.

The caller turns the block sums into the loss by one dot product with the means' weights
(a fixed order, so the loss is the same from run to run).

:func:`backward`: the adjoint of the two blurs (the window is symmetric, so each adjoint is
the same window run the other way over the valid positions), then the chain through
``a``, ``a^2`` and ``a b`` and the L1 term's sign, scaled by the upstream gradient (a device
tensor: no host sync).

The float64 torch definition (the tests' reference) is
:func:`rgs_engine._torch_impl.image_loss.image_loss`.
"""
import taichi as ti

from .launch import kernel

ROWS = 4  # rows a thread of passes 1 and 2 walks (and sums) down its column: 262k threads at 4 x 512^2


@ti.func
def _ssim_and_partials(mu_a, ea2, eab, mu_b, eb2, c1, c2):
    """(SSIM, dSSIM / d mu_a, dSSIM / d E[a^2], dSSIM / d E[ab]) at one position from the
    moments (``mu_b``, ``E[b^2]``: the fixed target's)."""
    a1 = 2.0 * mu_a * mu_b + c1
    a2 = 2.0 * (eab - mu_a * mu_b) + c2
    b1 = mu_a * mu_a + mu_b * mu_b + c1
    b2 = (ea2 - mu_a * mu_a) + (eb2 - mu_b * mu_b) + c2
    den = b1 * b2
    s = a1 * a2 / den
    d_mu = 2.0 * mu_b * (a2 - a1) / den - s * 2.0 * mu_a * (1.0 / b1 - 1.0 / b2)
    d_ea2 = -s / b2
    d_eab = 2.0 * a1 / den
    return ti.math.vec4(s, d_mu, d_ea2, d_eab)


@kernel
def forward(a: ti.types.ndarray(ndim=3), b: ti.types.ndarray(ndim=3), mb: ti.types.ndarray(ndim=4),
            win: ti.types.ndarray(ndim=1), blurred: ti.types.ndarray(ndim=4), partials: ti.types.ndarray(ndim=4),
            sums: ti.types.ndarray(ndim=1), c1: ti.f32, c2: ti.f32, size: ti.template()):
    """``sums`` (n1 + n2 + 1,): the block sums of ``|a - b|`` ((V, ceil(H / ROWS), W) flattened,
    n1 of them), those of the SSIM map ((V, ceil(H' / ROWS), W') flattened, n2) and a 1 (for the
    caller's one dot product with the means' weights and the constant); ``partials`` (V, 3,
    H', W'): dSSIM / d(mu_a, E[a^2], E[ab]). Scratch: ``blurred`` (V, 3, H, W'). ``c1``, ``c2``:
    SSIM's stabilising constants for data range 1 (``K1^2``, ``K2^2`` of
    :mod:`rgs_engine.core.metrics`). ``size``: the window's (odd)."""
    views = a.shape[0]
    height = a.shape[1]
    width = a.shape[2]
    valid_h = height - size + 1
    valid_w = width - size + 1
    blocks = (height + ROWS - 1) // ROWS
    valid_blocks = (valid_h + ROWS - 1) // ROWS
    for v, blk, j in ti.ndrange(views, blocks, width):
        acc = 0.0
        for t in range(ROWS):
            i = blk * ROWS + t
            if i < height:
                acc += ti.abs(a[v, i, j] - b[v, i, j])
                if j < valid_w:
                    h = ti.math.vec3(0.0)
                    for k in ti.static(range(size)):
                        x = a[v, i, j + k]
                        h += win[k] * ti.math.vec3(x, x * x, x * b[v, i, j + k])
                    for c in ti.static(range(3)):
                        blurred[v, c, i, j] = h[c]
        sums[(v * blocks + blk) * width + j] = acc
    n1 = views * blocks * width
    for v, blk, j in ti.ndrange(views, valid_blocks, valid_w):
        # the column's ROWS + size - 1 horizontal blurs, each loaded once
        i0 = blk * ROWS
        col = ti.Matrix([[0.0] * 3 for _ in ti.static(range(ROWS + size - 1))])
        for r in ti.static(range(ROWS + size - 1)):
            if i0 + r < height:
                for c in ti.static(range(3)):
                    col[r, c] = blurred[v, c, i0 + r, j]
        acc = 0.0
        for t in ti.static(range(ROWS)):
            i = i0 + t
            if i < valid_h:
                m = ti.math.vec3(0.0)
                for k in ti.static(range(size)):
                    m += win[k] * ti.math.vec3(col[t + k, 0], col[t + k, 1], col[t + k, 2])
                r = _ssim_and_partials(m[0], m[1], m[2], mb[v, 0, i, j], mb[v, 1, i, j], c1, c2)
                for c in ti.static(range(3)):
                    partials[v, c, i, j] = r[c + 1]
                acc += r[0]
        sums[n1 + (v * valid_blocks + blk) * valid_w + j] = acc
    sums[sums.shape[0] - 1] = 1.0


@kernel
def backward(a: ti.types.ndarray(ndim=3), b: ti.types.ndarray(ndim=3), win: ti.types.ndarray(ndim=1),
             partials: ti.types.ndarray(ndim=4), upstream: ti.types.ndarray(ndim=1),
             spread: ti.types.ndarray(ndim=4), grad: ti.types.ndarray(ndim=3), l1_scale: ti.f32,
             ssim_scale: ti.f32, size: ti.template()):
    """``grad`` (V, H, W) = ``upstream[0]`` x d loss / d a, with ``l1_scale = 1 / (V H W)`` and
    ``ssim_scale = -w / (V H' W')`` (float scalars: the counts may pass 2^31 in int32). Scratch:
    ``spread`` (V, 3, H, W'), the moments' gradients after the vertical blur's adjoint."""
    views = a.shape[0]
    height = a.shape[1]
    width = a.shape[2]
    valid_h = height - size + 1
    valid_w = width - size + 1
    for v, i, j in ti.ndrange(views, height, valid_w):
        g = ti.math.vec3(0.0)
        for k in ti.static(range(size)):
            if 0 <= i - k < valid_h:
                g += win[k] * ti.math.vec3(partials[v, 0, i - k, j], partials[v, 1, i - k, j],
                                           partials[v, 2, i - k, j])
        for c in ti.static(range(3)):
            spread[v, c, i, j] = g[c]
    for v, i, j in ti.ndrange(views, height, width):
        g = ti.math.vec3(0.0)
        for k in ti.static(range(size)):
            if 0 <= j - k < valid_w:
                g += win[k] * ti.math.vec3(spread[v, 0, i, j - k], spread[v, 1, i, j - k], spread[v, 2, i, j - k])
        x = a[v, i, j]
        y = b[v, i, j]
        sign = 0.0
        if x > y:
            sign = 1.0
        elif x < y:
            sign = -1.0
        grad[v, i, j] = upstream[0] * (l1_scale * sign + ssim_scale * (g[0] + 2.0 * x * g[1] + y * g[2]))
