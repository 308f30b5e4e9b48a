"""Weighted NCC of a DRR's three channels against fixed X-ray channels, and its adjoint.

The registration's similarity (:class:`rgs_engine.registration.similarity.SimilarityTarget`)
compares three channels of each image: the image, its column differences and its row
differences (zero-padded to H x W). The X-ray side is fixed for many DRRs: per view and
channel its weights ``w`` and ``bw = w^2 (b - mean_w b)``. For a DRR channel ``a`` everything
the NCC and its gradient need are four weighted sums (float64)::

    S1 = sum w a,  S2 = sum w^2 a,  S3 = sum w^2 a^2,  S4 = sum bw a

1. :func:`channel_sums`: one thread per (image, chunk of pixels) accumulates the 12 sums of
   its chunk in registers and adds them once (:mod:`.chunks`).
2. :func:`channel_stats`: one thread per image turns each channel's sums into its NCC and
   the coefficients of its gradient (mean, ``r = num norm2 / den^2``, ``coef / den``,
   ``sum(g) / W``).
3. :func:`channel_vjp`: one thread per pixel: the gradient w.r.t. the DRR pixel, the
   channels' adjoints gathered from the pixel and its left and upper neighbours.

Images are ``(N, H, W)`` with ``N = B * V``: image ``n`` is compared with the X-ray view
``n % V``. The plain torch definition (the tests' float64 reference): ``0.5 * (ncc +
gradient_ncc)`` of :mod:`rgs_engine.registration.similarity`.
"""
import taichi as ti

from .launch import kernel

EPS = 1e-8  # as rgs_engine.registration.similarity.EPS
CHANNEL_WEIGHTS = (0.5, 0.25, 0.25)  # the similarity: the image's NCC, each difference's


@ti.func
def _channel(drr: ti.types.ndarray(), n: ti.i32, i: ti.i32, j: ti.i32) -> ti.math.vec3:
    """The three channels of image ``n`` at pixel (i, j): value, column and row difference
    (0 past the last column / row)."""
    height = drr.shape[1]
    width = drr.shape[2]
    a = drr[n, i, j]
    dx = 0.0
    dy = 0.0
    if j + 1 < width:
        dx = drr[n, i, j + 1] - a
    if i + 1 < height:
        dy = drr[n, i + 1, j] - a
    return ti.math.vec3(a, dx, dy)


@kernel
def channel_sums(drr: ti.types.ndarray(ndim=3), w: ti.types.ndarray(ndim=4), bw: ti.types.ndarray(ndim=4),
                 sums: ti.types.ndarray(dtype=ti.f64, ndim=3), chunks: ti.i32, chunk_step: ti.i32,
                 item_step: ti.i32, per_chunk: ti.i32):
    """``sums`` (N, 3, 4) float64 += (S1, S2, S3, S4) of each image's channels; ``w`` / ``bw``
    (V, 3, H, W). Chunks of pixels as :func:`.chunks.chunking` gives."""
    views = w.shape[0]
    width = drr.shape[2]
    pixels = drr.shape[1] * width
    for n, ch in ti.ndrange(drr.shape[0], chunks):
        v = n % views
        acc = ti.Matrix([[0.0] * 4 for _ in range(3)], dt=ti.f64)
        for t in range(per_chunk):
            p = ch * chunk_step + t * item_step
            if p < pixels:
                i = p // width
                j = p % width
                a = _channel(drr, n, i, j)
                for c in ti.static(range(3)):
                    wc = ti.cast(w[v, c, i, j], ti.f64)
                    ac = ti.cast(a[c], ti.f64)
                    acc[c, 0] += wc * ac
                    acc[c, 1] += wc * wc * ac
                    acc[c, 2] += wc * wc * ac * ac
                    acc[c, 3] += ti.cast(bw[v, c, i, j], ti.f64) * ac
        for c, k in ti.static(ti.ndrange(3, 4)):
            ti.atomic_add(sums[n, c, k], acc[c, k])


@kernel
def channel_stats(sums: ti.types.ndarray(dtype=ti.f64, ndim=3), target: ti.types.ndarray(dtype=ti.f64, ndim=3),
                  coefs: ti.types.ndarray(dtype=ti.f64, ndim=2), sims: ti.types.ndarray(ndim=1),
                  stats: ti.types.ndarray(ndim=3)):
    """Per image ``n``: ``sims[n] = sum_c coef_c NCC_c`` (``coefs`` (V, 3) per X-ray view: usually
    :data:`CHANNEL_WEIGHTS`) and ``stats`` (N, 3, 4) = (mean, ``r``, ``coef_c / den``, ``sum(g) / W``)
    per channel, from ``sums`` and the X-ray's ``target`` (V, 3, 4) = (W = sum w (clamped to
    EPS), W2 = sum w^2, B1 = sum bw, norm2)."""
    views = target.shape[0]
    for n in range(sums.shape[0]):
        v = n % views
        total = ti.cast(0.0, ti.f64)
        for c in ti.static(range(3)):
            coef = coefs[v, c]
            s1, s2, s3, s4 = sums[n, c, 0], sums[n, c, 1], sums[n, c, 2], sums[n, c, 3]
            wsum, w2, b1, norm2 = target[v, c, 0], target[v, c, 1], target[v, c, 2], target[v, c, 3]
            mean = s1 / wsum
            num = s4 - mean * b1
            den = ti.sqrt(ti.max(s3 - 2 * mean * s2 + mean * mean * w2, 0.0) * norm2 + EPS)
            r = num * norm2 / (den * den)
            total += coef * num / den
            stats[n, c, 0] = ti.cast(mean, ti.f32)
            stats[n, c, 1] = ti.cast(r, ti.f32)
            stats[n, c, 2] = ti.cast(coef / den, ti.f32)
            stats[n, c, 3] = ti.cast((b1 - r * (s2 - mean * w2)) / wsum, ti.f32)
        sims[n] = ti.cast(total, ti.f32)


@ti.func
def _channel_grad(drr: ti.types.ndarray(), w: ti.types.ndarray(), bw: ti.types.ndarray(),
                  stats: ti.types.ndarray(), n: ti.i32, v: ti.i32, c: ti.template(), i: ti.i32, j: ti.i32) -> ti.f32:
    """d(sum_c coef_c NCC_c)/d(channel c of image n at pixel (i, j))."""
    a = _channel(drr, n, i, j)[c]
    wc = w[v, c, i, j]
    return stats[n, c, 2] * (bw[v, c, i, j] - stats[n, c, 1] * wc * wc * (a - stats[n, c, 0])
                             - wc * stats[n, c, 3])


@kernel
def channel_vjp(drr: ti.types.ndarray(ndim=3), w: ti.types.ndarray(ndim=4), bw: ti.types.ndarray(ndim=4),
                stats: ti.types.ndarray(ndim=3), grad: ti.types.ndarray(ndim=1), grad_drr: ti.types.ndarray(ndim=3)):
    """``grad_drr`` (N, H, W) = d(sum_n grad[n] sims[n])/d drr, with ``stats`` of :func:`channel_stats`."""
    views = w.shape[0]
    height = drr.shape[1]
    width = drr.shape[2]
    for n, i, j in ti.ndrange(drr.shape[0], height, width):
        v = n % views
        g = _channel_grad(drr, w, bw, stats, n, v, 0, i, j)
        if j + 1 < width:  # the column difference at (i, j) is drr[i, j + 1] - drr[i, j]
            g -= _channel_grad(drr, w, bw, stats, n, v, 1, i, j)
        if j > 0:
            g += _channel_grad(drr, w, bw, stats, n, v, 1, i, j - 1)
        if i + 1 < height:
            g -= _channel_grad(drr, w, bw, stats, n, v, 2, i, j)
        if i > 0:
            g += _channel_grad(drr, w, bw, stats, n, v, 2, i - 1, j)
        grad_drr[n, i, j] = grad[n] * g
