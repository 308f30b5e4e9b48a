"""Splatting kernels against the float64 reference, closed-form physics and bad inputs."""
import math

import numpy as np
import pytest
import torch

from rgs_engine import Geometry, RgsInputError
from rgs_engine._torch_impl import splat as ref
from rgs_engine.core.splatting import splat, splat_vjp


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def tilted(geo: Geometry, seed: int = 0) -> Geometry:
    """Detector tilted by a random small rotation per view, shifted, with non-square pixels."""
    g = torch.Generator().manual_seed(seed)
    vec = geo.vectors.clone()
    for k in range(vec.shape[0]):
        axis = torch.randn(3, generator=g, dtype=torch.float64)
        axis /= axis.norm()
        ang = 0.25
        kx = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        rot = torch.eye(3, dtype=torch.float64) + math.sin(ang) * kx + (1 - math.cos(ang)) * kx @ kx
        vec[k, 6:9] = rot @ vec[k, 6:9]
        vec[k, 9:12] = rot @ vec[k, 9:12] * 1.2 + 0.1 * vec[k, 6:9]  # non-orthogonal
        vec[k, 3:6] += torch.randn(3, generator=g, dtype=torch.float64) * 4
    return Geometry(vec, geo.det_shape, geo.mode)


def random_gaussians(n, device, extent=40.0, smin=0.8, smax=4.0):
    means = (torch.rand(n, 3, dtype=torch.float64) - 0.5) * extent
    scales = torch.rand(n, 3, dtype=torch.float64) * (smax - smin) + smin
    quats = torch.randn(n, 4, dtype=torch.float64)
    dens = torch.rand(n, dtype=torch.float64) * 0.05 + 0.01
    return [t.to(device) for t in (means, scales, quats, dens)]


GEOMETRIES = {
    "cone": lambda: Geometry.circular(np.linspace(0, 2 * np.pi, 4, endpoint=False), 300, 500,
                                      (36, 44), (1.3, 1.1), det_offset=(3.0, -5.0)),
    "parallel": lambda: Geometry.circular(np.linspace(0, np.pi, 3), 300, 500, (36, 44), 1.0,
                                          mode="parallel"),
    "cone-tilted": lambda: tilted(Geometry.circular([0.3, 1.9, 4.0], 250, 450, (30, 34), 1.5)),
    "parallel-tilted": lambda: tilted(Geometry.circular([0.2, 2.0], 250, 450, (30, 34), 1.2,
                                                        mode="parallel"), seed=1),
    "poses": lambda: Geometry.from_poses(
        np.stack([np.eye(4), np.array([[0, 0, 1, -400], [0, 1, 0, 10], [-1, 0, 0, 5], [0, 0, 0, 1.0]])])
        @ np.array([[1, 0, 0, 3], [0, 1, 0, -2], [0, 0, 1, -380], [0, 0, 0, 1.0]]),
        600, (32, 40), 1.4, principal_point=(4.0, -6.0)),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_forward_and_vjp_match_reference(device, name):
    geo = GEOMETRIES[name]()
    params = random_gaussians(25, device)
    ours = [t.clone().requires_grad_() for t in params]
    theirs = [t.clone().requires_grad_() for t in params]
    out = splat(*ours, geo)
    expect = ref.splat(*theirs, geo)
    assert out.shape == (geo.num_views, *geo.det_shape)
    assert expect.abs().max() > 0.05, "test scene should be visible"
    assert rel(out, expect) < 1e-3
    up = torch.randn_like(expect)
    g_ours = torch.autograd.grad(out, ours, up)
    g_ref = torch.autograd.grad(expect, theirs, up)
    for label, a, b in zip(("means", "scales", "quats", "densities"), g_ours, g_ref):
        assert rel(a, b) < 1e-3, label


def test_splat_vjp_equals_autograd_of_splat(device):
    """splat_vjp (no autograd graph) gives splat's image and its vector-Jacobian products,
    per-view geometry included (the same kernels: equal up to the order of the backward's
    atomic sums on a GPU)."""
    geo = GEOMETRIES["cone"]()
    params = [t.float() for t in random_gaussians(25, device)]
    params[0] = params[0][None].expand(geo.num_views, -1, -1).contiguous()  # per-view means ...
    params[1] = params[1][None].expand(geo.num_views, -1, -1).contiguous()
    params[2] = params[2][None].expand(geo.num_views, -1, -1).contiguous()  # ... scales, quats
    image, vjp = splat_vjp(*params, geo)
    leaves = [t.clone().requires_grad_() for t in params]
    out = splat(*leaves, geo)
    assert torch.equal(image, out.detach())
    up = torch.randn_like(out)
    for label, a, b in zip(("means", "scales", "quats", "densities"), vjp(up), torch.autograd.grad(out, leaves, up)):
        assert a.shape == b.shape, label
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()), msg=label)


def test_float32_inputs_give_float32_and_match(device):
    geo = GEOMETRIES["cone"]()
    params = [t.float() for t in random_gaussians(10, device)]
    out = splat(*params, geo)
    assert out.dtype == torch.float32
    assert rel(out, ref.splat(*params, geo)) < 1e-3


def one_gaussian(device, scales=(3.0, 1.5, 5.0)):
    means = torch.tensor([[4.0, -3.0, 2.0]], dtype=torch.float64)
    scales = torch.tensor([scales], dtype=torch.float64)
    quats = torch.tensor([[0.9, 0.2, -0.3, 0.25]], dtype=torch.float64)
    dens = torch.tensor([0.04], dtype=torch.float64)
    return [t.to(device) for t in (means, scales, quats, dens)]


@pytest.mark.parametrize("name", ["parallel", "parallel-tilted"])
def test_parallel_matches_closed_form_line_integral(device, name):
    geo = GEOMETRIES[name]()
    g = one_gaussian(device)
    exact = ref.line_integrals_exact(*g, geo)
    # without truncation the parallel-beam splat is exact
    assert rel(splat(*g, geo, cutoff=8.0), exact) < 1e-4
    # with the default 3-sigma cut it is exact inside the footprint and zero outside
    out = splat(*g, geo)
    inside = out > 0
    assert rel(out[inside], exact[inside]) < 1e-4
    _, _, peak = ref._detector_params(*g, geo)  # (V, 1) continuous peak per view
    for k in range(geo.num_views):  # outside: below exp(-9/2) of that view's peak
        assert exact[k][~inside[k]].max() <= math.exp(-4.5) * peak[k, 0] * (1 + 1e-9)


def test_cone_matches_ray_march_within_one_percent(device):
    geo = Geometry.circular([0.4, 2.2], 300, 500, (40, 40), 1.0)
    g = one_gaussian(device)
    march = ref.line_integrals_raymarch(*g, geo, 250.0, 350.0, steps=2000)
    assert march.max() > 0.1
    assert rel(splat(*g, geo, cutoff=5.0), march) < 0.01


def test_many_views_one_launch_equals_per_view(device):
    geo = GEOMETRIES["cone"]()
    params = random_gaussians(30, device)
    together = splat(*params, geo)
    for k in range(geo.num_views):
        alone = splat(*params, geo.subset([k]))[0]
        assert torch.allclose(together[k], alone, atol=1e-6)


def per_view_gaussians(geo, n, device, geometry_per_view, density_per_view):
    """Shared Gaussians, with geometry and/or densities replaced by a different set per view."""
    params = random_gaussians(n, device)
    views = [random_gaussians(n, device) for _ in range(geo.num_views)]
    if geometry_per_view:
        params[:3] = [torch.stack([v[k] for v in views]) for k in range(3)]
    if density_per_view:
        params[3] = torch.stack([v[3] for v in views])
    return params


@pytest.mark.parametrize("name", ["cone", "parallel-tilted"])
@pytest.mark.parametrize("geometry_per_view, density_per_view", [(True, False), (False, True), (True, True)])
def test_per_view_gaussians_match_reference(device, name, geometry_per_view, density_per_view):
    geo = GEOMETRIES[name]()
    params = per_view_gaussians(geo, 20, device, geometry_per_view, density_per_view)
    ours = [t.clone().requires_grad_() for t in params]
    theirs = [t.clone().requires_grad_() for t in params]
    out = splat(*ours, geo)
    expect = ref.splat(*theirs, geo)
    assert out.shape == (geo.num_views, *geo.det_shape)
    assert expect.abs().amax((1, 2)).min() > 0.05, "every view should see its Gaussians"
    assert rel(out, expect) < 1e-3
    up = torch.randn_like(expect)
    g_ours = torch.autograd.grad(out, ours, up)
    g_ref = torch.autograd.grad(expect, theirs, up)
    for label, a, b, t in zip(("means", "scales", "quats", "densities"), g_ours, g_ref, params):
        assert a.shape == t.shape, label
        assert rel(a, b) < 1e-3, label


def test_per_view_gaussians_equal_one_call_per_view(device):
    geo = GEOMETRIES["cone"]()
    means, scales, quats, dens = per_view_gaussians(geo, 30, device, True, True)
    together = splat(means, scales, quats, dens, geo)
    for k in range(geo.num_views):
        alone = splat(means[k], scales[k], quats[k], dens[k], geo.subset([k]))[0]
        assert torch.allclose(together[k], alone, atol=1e-6)


def test_per_view_gaussians_need_one_set_per_view(device):
    geo = GEOMETRIES["cone"]()
    means, scales, quats, dens = per_view_gaussians(geo, 5, device, True, False)
    with pytest.raises(RgsInputError, match=r"means has shape \(4, 5, 3\), expected \(2, \*, 3\)"):
        splat(means, scales, quats, dens, geo.subset([0, 1]))
    with pytest.raises(RgsInputError, match="densities has shape"):
        splat(means[0], scales[0], quats[0], dens[None].expand(3, -1), geo)


def test_gaussian_behind_source_is_culled(device):
    geo = Geometry.circular([0.0], 300, 500, (16, 16), 1.0)  # source at x = +300
    g = one_gaussian(device)
    g[0] = torch.tensor([[400.0, 0.0, 0.0]], dtype=torch.float64, device=device)
    assert float(splat(*g, geo).abs().max()) == 0.0


def test_empty_and_offscreen(device):
    geo = GEOMETRIES["cone"]()
    empty = [t[:0] for t in random_gaussians(3, device)]
    assert float(splat(*empty, geo).abs().sum()) == 0.0
    g = one_gaussian(device)
    g[0] = torch.tensor([[0.0, 0.0, 900.0]], dtype=torch.float64, device=device)
    g = [t.clone().requires_grad_() for t in g]
    out = splat(*g, geo)
    out.sum().backward()
    assert float(out.abs().max()) == 0.0 and float(g[0].grad.abs().max()) == 0.0


@pytest.mark.parametrize("bad, msg", [
    (lambda p: [p[0][:, :2], *p[1:]], "means"),
    (lambda p: [p[0], p[1][:-1], *p[2:]], "scales"),
    (lambda p: [p[0], p[1], p[2][:, :3], p[3]], "quats"),
    (lambda p: [p[0], p[1], p[2], p[3][:, None]], "densities"),
    (lambda p: [torch.cat([p[0][:1] * float("nan"), p[0][1:]]), *p[1:]], "NaN"),
    (lambda p: [p[0], -p[1], *p[2:]], "positive"),
    (lambda p: [p[0], p[1], p[2] * 0, p[3]], "quaternion"),
    (lambda p: [p[0].float(), *p[1:]], "dtype"),
])
def test_bad_inputs_raise(device, bad, msg):
    geo = GEOMETRIES["cone"]()
    with pytest.raises(RgsInputError, match=msg):
        splat(*bad(random_gaussians(4, device)), geo)
    with pytest.raises(RgsInputError, match="Geometry"):
        splat(*random_gaussians(4, device), geo.vectors)


def test_unvalidated_splat_equals_the_validated_one(device):
    """``validate=False`` only skips the checks: the same image and gradients (up to the
    order of float atomics)."""
    geo = GEOMETRIES["cone"]()
    outs, base = [], random_gaussians(12, device)
    for validate in (True, False):
        params = [t.clone().requires_grad_() for t in base]
        image = splat(*params, geo, validate=validate)
        image.square().sum().backward()
        outs.append([image.detach()] + [p.grad for p in params])
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1:], outs[1][1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def _render_with_both_kernels(binning, geo, device):
    """The images of the GPU (pixel-parallel, shared memory: CUDA only) and CPU
    (tile-parallel) forward kernels for one binning (cutoff 3)."""
    from rgs_engine.kernels import splat_forward
    images = []
    for render in (splat_forward.render, splat_forward.render_tiles):
        img = torch.zeros(geo.num_views, *geo.det_shape, device=device)
        render(binning.params, binning.ranges, binning.ids, img, 9.0)
        images.append(img)
    return images


@pytest.mark.parametrize("n", [40, 900])
def test_pixel_and_tile_render_kernels_agree(device, n):
    """The GPU (pixel-parallel) and CPU (tile-parallel) forward kernels give the same sums; with
    900 Gaussians some tiles list several shared-memory batches."""
    if device.type != "cuda":
        pytest.skip("the pixel-parallel render kernel uses CUDA shared memory")
    from rgs_engine.core import splatting
    from rgs_engine.kernels.splat_forward import BATCH
    geo = GEOMETRIES["cone-tilted"]()
    params = [t.float() for t in random_gaussians(n, device, extent=40.0 if n < 100 else 15.0)]
    b = splatting._bin(*params, n, (False, False), geo.kernel_table(device), geo, 3.0)
    per_tile = b.ranges[1:] - b.ranges[:-1]
    assert n < 100 or int(per_tile.max()) > 2 * BATCH
    images = _render_with_both_kernels(b, geo, device)
    assert images[0].abs().max() > 0.05
    assert torch.allclose(images[0], images[1], rtol=1e-5, atol=1e-6)


def _extreme_gaussians(device):
    """Needles, discs, sub-pixel dots and footprints wider than a tile: the row walks of
    render_tiles / pair_grads (from each row's peak outwards, exp stepped by products) must
    neither overflow nor stop early on any of them."""
    g = torch.Generator().manual_seed(3)
    n = 30
    means = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * 30
    scales = torch.exp(torch.empty(n, 3, dtype=torch.float64).uniform_(math.log(0.05), math.log(15.0), generator=g))
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    dens = torch.rand(n, generator=g, dtype=torch.float64) * 0.05 + 0.01
    return [t.to(device) for t in (means, scales, quats, dens)]


def test_row_walks_on_extreme_shapes_match_reference(device):
    from rgs_engine.core import splatting
    geo = GEOMETRIES["poses"]()
    params = _extreme_gaussians(device)
    ours = [t.clone().requires_grad_() for t in params]
    theirs = [t.clone().requires_grad_() for t in params]
    out, expect = splat(*ours, geo), ref.splat(*theirs, geo)
    assert rel(out, expect) < 1e-3
    up = torch.randn_like(expect)
    for label, a, b in zip(("means", "scales", "quats", "densities"), torch.autograd.grad(out, ours, up),
                           torch.autograd.grad(expect, theirs, up)):
        assert torch.isfinite(a).all() and rel(a, b) < 1e-3, label
    if device.type == "cuda":  # the pixel-parallel kernel on the same shapes
        b = splatting._bin(*[t.float() for t in params], len(params[0]), (False, False), geo.kernel_table(device), geo, 3.0)
        images = _render_with_both_kernels(b, geo, device)
        assert torch.allclose(images[0], images[1], rtol=1e-5, atol=1e-6)
