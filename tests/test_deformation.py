"""Deformation models: identity at init, gradients, FPS, skinning, masking, periodicity."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rgs_engine import RgsInputError
from rgs_engine.motion import kplanes_features
from rgs_engine.motion.deformation import (AnchorDeformation, KPlanesField, LearnedPeriod, PLANES, sample_time_plane,
                                    farthest_point_sampling, knn_skinning, periodic_consistency,
                                    phase_harmonics)
from rgs_engine.motion.surrogate import SurrogateDrive

LO, HI, WINDOW = (-48.0, -40.0, -44.0), (48.0, 40.0, 44.0), (0.0, 20.0)
N = 300


@pytest.fixture(scope="module")
def gaussians():
    gen = torch.Generator().manual_seed(1)
    means = (torch.rand(N, 3, generator=gen) - 0.5) * torch.tensor([90.0, 76.0, 84.0])
    scales = 1 + 3 * torch.rand(N, 3, generator=gen)
    quats = torch.randn(N, 4, generator=gen)
    return means, scales, quats


def make(kind, gaussians, time_input, **kw):
    common = dict(box_lo=LO, box_hi=HI, time_range=WINDOW, period_s=2.8, time_input=time_input)
    if kind == "kplanes":
        return KPlanesField(**common, resolution=6, time_resolution=10, features=8, hidden=16, **kw)
    return AnchorDeformation(gaussians[0], **common, num_anchors=24, k=4, width=16, heads=2,
                             layers=1, time_harmonics=4, **kw)


def randomise(model):
    """Non-trivial weights: random heads and time planes (the init is the identity)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "period.log_period":
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


MODELS = [(kind, mode) for kind in ("kplanes", "anchors") for mode in ("time", "phase")]


@pytest.mark.parametrize("kind,mode", MODELS)
def test_identity_at_init(gaussians, kind, mode):
    means, scales, quats = gaussians
    model = make(kind, gaussians, mode)
    out = model(means, scales, quats, torch.tensor([0.0, 3.3, 19.9]))
    assert out.means.shape == (3, N, 3) and out.scales.shape == (3, N, 3) and out.quats.shape == (3, N, 4)
    assert torch.equal(out.means, means.expand(3, N, 3))
    assert torch.equal(out.scales, scales.expand(3, N, 3))
    torch.testing.assert_close(out.quats, F.normalize(quats, dim=1).expand(3, N, 4), rtol=0, atol=1e-6)
    single = model(means, scales, quats, 5.0)
    assert single.means.shape == (N, 3)


@pytest.mark.parametrize("kind,mode", MODELS)
def test_gradients_reach_every_parameter_and_the_period(gaussians, kind, mode):
    means, scales, quats = gaussians
    model = randomise(make(kind, gaussians, mode))
    t = torch.tensor([1.0, 6.5, 12.25, 18.0])
    out = model(means, scales, quats, t)
    loss = out.means.square().mean() + out.scales.mean() + out.quats[..., 1:].square().mean()
    loss = loss + periodic_consistency(model, means, scales, quats, t)
    loss = loss + sum(model.regularisers().values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    groups = model.param_groups()
    assert groups["period"] == [model.period.log_period]
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))


def test_fps_matches_brute_force_reference():
    gen = torch.Generator().manual_seed(3)
    points = torch.randn(400, 3, generator=gen) * torch.tensor([30.0, 10.0, 20.0])
    chosen = farthest_point_sampling(points, 37, seed=5)
    p = points.double().numpy()
    ref = [int(torch.randint(400, (), generator=torch.Generator().manual_seed(5)))]
    while len(ref) < 37:
        d = [min(float(((p[i] - p[j]) ** 2).sum()) for j in ref) for i in range(len(p))]
        ref.append(int(np.argmax(d)))
    assert chosen.tolist() == ref
    assert torch.equal(chosen, farthest_point_sampling(points, 37, seed=5))
    with pytest.raises(RgsInputError, match="anchors"):
        farthest_point_sampling(points, 401)


def test_knn_skinning_weights_sum_to_one():
    gen = torch.Generator().manual_seed(4)
    points, anchors = torch.rand(500, 3, generator=gen) * 50, torch.rand(20, 3, generator=gen) * 50
    idx, w = knn_skinning(points, anchors, 5, chunk=128)
    assert idx.shape == w.shape == (500, 5)
    torch.testing.assert_close(w.sum(1), torch.ones(500))
    assert bool((w > 0).all()) and bool((w[:, :-1] >= w[:, 1:] - 1e-6).all())  # nearest weighs most
    ref = torch.cdist(points.double(), anchors.double()).argsort(1)[:, :5]
    assert torch.equal(idx, ref)


def test_masked_anchors_differ_in_training_only(gaussians):
    means, scales, quats = gaussians
    model = randomise(make("anchors", gaussians, "time", mask_ratio=0.5))
    t = torch.tensor([2.0, 9.0])
    model.masking = False
    reference = model(means, scales, quats, t).means.detach()
    model.masking = True
    first, second = (model(means, scales, quats, t).means.detach() for _ in range(2))
    assert not torch.allclose(first, reference) and not torch.allclose(first, second)
    model.eval()
    assert torch.equal(model(means, scales, quats, t).means, reference)
    # the mask generator is part of the state: a restored model draws the same masks
    model.train()
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    a = model(means, scales, quats, t).means.detach()
    model.load_state_dict(state)
    assert torch.equal(model(means, scales, quats, t).means, a)


@pytest.mark.parametrize("kind", ["kplanes", "anchors"])
def test_periodic_consistency_vanishes_for_a_periodic_model(gaussians, kind):
    means, scales, quats = gaussians
    t = torch.tensor([0.5, 4.0, 11.0, 17.5])
    periodic = randomise(make(kind, gaussians, "phase"))
    assert float(periodic_consistency(periodic, means, scales, quats, t).detach()) < 1e-6
    free = randomise(make(kind, gaussians, "time"))
    assert float(periodic_consistency(free, means, scales, quats, t).detach()) > 1e-3


def test_period_phase_and_wrapping(gaussians):
    period = LearnedPeriod(2.5)
    assert math.isclose(float(period.period_s.detach()), 2.5)
    t = torch.tensor([0.0, 1.25, 2.5, 6.0], dtype=torch.float64)
    torch.testing.assert_close(period.phase(t), torch.tensor([0.0, 0.5, 0.0, 0.4], dtype=torch.float64))
    emb = phase_harmonics(period.phase(t), 3)  # (sin, cos) of 2 pi k phase, k = 1..3
    assert emb.shape == (4, 6)
    torch.testing.assert_close(emb[1], torch.tensor([0.0, 0, 0, -1, 1, -1], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(emb[0], emb[2], rtol=0, atol=1e-12)
    # time input: a time outside the scan window is moved into it by whole periods
    model = randomise(make("kplanes", gaussians, "time"))
    means, scales, quats = gaussians
    inside = model(means, scales, quats, 1.0).means
    outside = model(means, scales, quats, 1.0 + 10 * 2.8).means
    torch.testing.assert_close(inside, outside, rtol=0, atol=1e-4)
    with pytest.raises(RgsInputError, match="period"):
        LearnedPeriod(0.0)
    with pytest.raises(RgsInputError, match="time input"):
        make("kplanes", gaussians, "clock")


def test_time_plane_sampling_equals_grid_sample():
    """K-planes' separable time-plane sampling equals ``grid_sample`` (bilinear,
    align_corners, border) of every space coordinate at every time, in float64: values and
    gradients w.r.t. the plane, the space coordinates and the times, also at and beyond the
    plane's edges."""
    g = torch.Generator().manual_seed(3)
    plane = torch.randn(1, 5, 9, 7, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.cat([torch.rand(40, generator=g, dtype=torch.float64) * 2 - 1,
                   torch.tensor([-1.0, 1.0, -1.3, 1.2, 0.0], dtype=torch.float64)]).requires_grad_()
    t = torch.tensor([-1.0, -0.37, 0.2, 0.999, 1.0, 1.4], dtype=torch.float64, requires_grad=True)
    cot = torch.randn(t.shape[0], x.shape[0], 5, generator=g, dtype=torch.float64)

    def reference():
        grid = torch.stack([x.expand(t.shape[0], -1), t[:, None].expand(-1, x.shape[0])], -1)
        return F.grid_sample(plane, grid[None], align_corners=True, padding_mode="border")[0].permute(1, 2, 0)

    grads = []
    for fn in (reference, lambda: sample_time_plane(plane, x, t)):
        out = fn()
        grads.append((out.detach(), *torch.autograd.grad((out * cot).sum(), (plane, x, t))))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["time", "phase"])
@pytest.mark.parametrize("path", ["dispatch", "kernels"])
def test_kplanes_features_equal_grid_sample(device, mode, path):
    """K-planes' features, as the model computes them on the runtime device (torch's operators
    on a CPU, the kernels on a GPU) and by the kernels (after the time planes are interpolated
    to the batch's times), equal the plain
    definition: the product of ``grid_sample`` (bilinear, align_corners, border) of all six
    planes per level, the time planes extended by their first row when periodic; values and
    gradients w.r.t. every plane, the points and the times, also at and beyond the box's edges
    (the kernels in float32 against float64)."""
    g = torch.Generator().manual_seed(3)
    model = KPlanesField([-50.0] * 3, [50.0] * 3, (0.0, 20.0), time_input=mode, resolution=6,
                         time_resolution=9, multires=(1, 2), features=5, hidden=8).double().to(device)
    with torch.no_grad():
        for plane in model.planes:
            plane.add_(0.3 * torch.randn(plane.shape, generator=g, dtype=torch.float64).to(device))
    points = torch.cat([torch.rand(40, 3, generator=g, dtype=torch.float64) * 2 - 1,
                        torch.tensor([[-1.0, 1.0, 0.0], [1.3, -1.2, 0.5]], dtype=torch.float64)]).to(device).requires_grad_()
    times = (torch.tensor([0.0, 0.37, 0.999, 0.5], dtype=torch.float64) if mode == "phase"
             else torch.tensor([-1.0, -0.2, 0.6, 1.0], dtype=torch.float64)).to(device).requires_grad_()
    cot = torch.randn(times.shape[0], points.shape[0], 10, generator=g, dtype=torch.float64).to(device)

    def reference():
        tcoord = 2 * times - 1 if mode == "phase" else times
        out = []
        for level in range(2):
            feature = 1.0
            for (a, b), plane in zip(PLANES, model.planes[6 * level:6 * level + 6]):
                if b < 3:
                    grid = points[:, [a, b]][None, None]
                    feature = feature * F.grid_sample(plane, grid, align_corners=True,
                                                      padding_mode="border")[0, :, 0].T[None]
                else:
                    grid = torch.stack([points[:, a].expand(times.shape[0], -1),
                                        tcoord[:, None].expand(-1, points.shape[0])], -1)[None]
                    feature = feature * F.grid_sample(model._time_plane(plane), grid, align_corners=True,
                                                      padding_mode="border")[0].permute(1, 2, 0)
            out.append(feature)
        return torch.cat(out, -1)

    leaves = (*model.planes, points, times)
    results = []
    def kernels():
        tcoord = 2 * times - 1 if mode == "phase" else times
        return kplanes_features.features(points, [model.level_planes(level, tcoord) for level in range(2)])

    for fn in (reference, kernels if path == "kernels" else lambda: model.features(points, times)):
        out = fn()
        results.append((out.detach(), *torch.autograd.grad((out * cot).sum(), leaves)))
    for tested, ref in zip(results[1], results[0]):
        exact = path == "dispatch" and device.type == "cpu"  # torch's operators in float64
        assert float((tested - ref).norm() / ref.norm()) < (1e-12 if exact else 2e-6)


def test_the_baseline_field_adds_the_drive_baseline_times_a_learned_displacement(gaussians):
    """A drive with a baseline gives the model a displacement field (zero at the start, in the
    'network' group) that moves every Gaussian by ``baseline_at(t)`` times its value there."""
    times = torch.linspace(0.0, 20.0, 50, dtype=torch.float64)
    drive = SurrogateDrive(times, times / 3.5, torch.full((50,), 2.0), 4.0 * times / 20.0)
    model = make("kplanes", gaussians, "surrogate", surrogate=drive)
    means, scales, quats = gaussians
    t = torch.tensor([2.0, 18.0], dtype=torch.float64)
    start = model(means, scales, quats, t)
    torch.testing.assert_close(start.means, means.expand(2, -1, -1))  # identity at init
    assert any(p is model.baseline_field for p in model.param_groups()["network"])
    with torch.no_grad():
        model.baseline_field[:, 2] = 0.1  # +0.1 box units along z everywhere
    moved = model(means, scales, quats, t).means - means
    shift = drive.baseline_at(t).float()[:, None] * 0.1 * model.half_extent[2]
    torch.testing.assert_close(moved[..., 2], shift.expand(2, N))
    torch.testing.assert_close(moved[..., :2], torch.zeros(2, N, 2))
    moved.sum().backward()
    assert model.baseline_field.grad.abs().sum() > 0
    plain = make("kplanes", gaussians, "surrogate", surrogate=SurrogateDrive(times, times / 3.5, torch.ones(50)))
    assert plain.baseline_field is None
