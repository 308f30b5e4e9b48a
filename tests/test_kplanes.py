"""K-planes feature kernels against the dense float64 reference (values and vector-Jacobian
products), and their input checks."""
import pytest
import torch

from rgs_engine import RgsInputError
from rgs_engine._torch_impl.kplanes import level_features as reference
from rgs_engine.motion.kplanes_features import features


def level(views, channels, size, g):
    spatial = 0.2 + torch.rand(3, size, size, channels, generator=g, dtype=torch.float64)
    lines = 0.5 + torch.rand(3, views, size, channels, generator=g, dtype=torch.float64)
    return spatial, lines


def points(n, g):
    """Points in the box, on its faces and beyond them (the border cell, no gradient)."""
    inside = torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1
    edges = torch.tensor([[-1.0, 1.0, 0.3], [1.25, -1.4, 0.0], [0.0, 0.999, -0.999]], dtype=torch.float64)
    return torch.cat([inside, edges])


@pytest.mark.parametrize("views,shapes", [(3, [(5, 6), (4, 12)]), (1, [(7, 2)]), (8, [(32, 16)])])
def test_matches_reference_value_and_vjp(device, views, shapes):
    g = torch.Generator().manual_seed(views)
    levels = [level(views, c, r, g) for c, r in shapes]
    p = points(300, g)
    total = sum(c for c, _ in shapes)
    upstream = torch.randn(views, p.shape[0], total, generator=g, dtype=torch.float64)
    leaves = [t.to(device).requires_grad_() for t in (p, *(t for lv in levels for t in lv))]
    out = features(leaves[0], list(zip(leaves[1::2], leaves[2::2])))
    grads = torch.autograd.grad((out * upstream.to(device)).sum(), leaves)
    ref_leaves = [t.detach().cpu().requires_grad_() for t in leaves]
    ref = torch.cat([reference(ref_leaves[0], s, ln) for s, ln in zip(ref_leaves[1::2], ref_leaves[2::2])], -1)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), ref_leaves)
    assert out.shape == (views, p.shape[0], total) and out.dtype == torch.float64
    assert float((out.cpu() - ref).abs().max() / ref.abs().max()) < 2e-6
    for got, want in zip(grads, ref_grads):
        assert float((got.cpu() - want).norm() / want.norm()) < 2e-6


def test_float32_and_no_points(device):
    g = torch.Generator().manual_seed(1)
    spatial, lines = (t.float().to(device) for t in level(2, 4, 5, g))
    p = points(10, g).float().to(device)
    out = features(p, [(spatial, lines)])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), reference(p.cpu(), spatial.cpu(), lines.cpu()), rtol=1e-5, atol=1e-6)
    empty_points = p[:0].clone().requires_grad_()
    leaves = [t.clone().requires_grad_() for t in (spatial, lines)]
    empty = features(empty_points, [tuple(leaves)])
    assert empty.shape == (2, 0, 4)
    assert all(float(g.abs().sum()) == 0 for g in torch.autograd.grad(empty.sum(), [empty_points, *leaves]))


def test_nan_point_gives_nan_features_not_a_crash(device):
    g = torch.Generator().manual_seed(4)
    spatial, lines = (t.to(device) for t in level(2, 3, 5, g))
    p = points(4, g).to(device)
    p[1, 0] = float("nan")
    out = features(p, [(spatial, lines)])
    assert bool(out[:, 1].isnan().all()) and bool(out[:, 0].isfinite().all())


@pytest.mark.parametrize("case", ["points", "square", "lines views", "lines size", "tiny", "no levels"])
def test_bad_input_is_rejected(device, case):
    g = torch.Generator().manual_seed(2)
    p = points(5, g).to(device)
    levels = [tuple(t.to(device) for t in level(2, 3, 4, g)), tuple(t.to(device) for t in level(2, 3, 6, g))]
    if case == "points":
        p = p[:, :2]
    elif case == "square":
        levels[0] = (levels[0][0][:, :, :3], levels[0][1])  # 4 x 3 cells
    elif case == "lines views":
        levels[1] = (levels[1][0], levels[1][1][:, :1])
    elif case == "lines size":
        levels[1] = (levels[1][0], levels[1][1][:, :, :5])
    elif case == "tiny":
        levels = [(levels[0][0][:, :1, :1], levels[0][1][:, :, :1])]
    else:
        levels = []
    with pytest.raises(RgsInputError, match="K-planes"):
        features(p, levels)
