"""The training image loss L1 + w (1 - SSIM): the kernels and the CPU path against the dense
float64 reference (values and vector-Jacobian products), its optimum, determinism, input checks."""
import pytest
import torch

from rgs_engine import RgsInputError
from rgs_engine._torch_impl.image_loss import image_loss as reference
from rgs_engine.core import losses, metrics


def pair(shape, device, seed=0, noise=0.1):
    """A target in [0, 1] and a prediction near it, float64 on ``device``."""
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(*shape, generator=g, dtype=torch.float64)
    pred = target + noise * torch.randn(shape, generator=g, dtype=torch.float64)
    return pred.to(device), target.to(device)


def value_and_grad(fn, pred, upstream=1.0):
    x = pred.detach().clone().requires_grad_()
    out = fn(x)
    (grad,) = torch.autograd.grad(out * upstream, x)
    return out.detach().double(), grad.double()


# image sides from the full 11-pixel window down to a 3-pixel one, several views, odd shapes,
# images exactly one window wide
SHAPES = [(3, 40, 37), (1, 64, 48), (2, 9, 13), (4, 5, 6), (2, 11, 11), (3, 7, 7), (2, 3, 3), (2, 33, 11)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight", [0.25, 1.0])
@pytest.mark.parametrize("path", ["fused", "dispatch"])
def test_matches_reference_value_and_vjp(device, shape, weight, path):
    pred, target = pair(shape, device)
    moments = metrics.ssim_moments(target)
    fn = (lambda x: losses.fused_image_loss(x, target, moments, weight)) if path == "fused" else (
        lambda x: losses.image_loss(x, target, moments, weight))
    value, grad = value_and_grad(fn, pred, upstream=2.5)
    ref_value, ref_grad = value_and_grad(lambda x: reference(x, target, weight), pred, upstream=2.5)
    assert abs(float(value - ref_value)) < 2e-6  # float32 kernels; a 3x3 image has one SSIM position
    assert float((grad - ref_grad).norm() / ref_grad.norm()) < 1e-5
    assert float(ref_value) > 0.05  # not trivially zero


def test_fused_and_torch_operators_agree(device):
    """The kernels and the CPU path's torch operators (which the dispatch picks by device) give
    the same float32 loss and gradient on one device."""
    pred, target = pair((4, 48, 52), device, seed=5)
    pred, target = pred.float(), target.float()
    moments = metrics.ssim_moments(target)
    fused = value_and_grad(lambda x: losses.fused_image_loss(x, target, moments, 0.25), pred)
    ops = value_and_grad(lambda x: losses.l1(x, target) + 0.25 * (
        1 - metrics.ssim_per_slice(x, target, 1.0, moments).mean()), pred)
    assert abs(float(fused[0] - ops[0])) < 1e-6
    assert float((fused[1] - ops[1]).norm() / ops[1].norm()) < 1e-5


def test_in_place_change_before_backward_is_caught(device):
    pred, target = pair((2, 20, 20), device)
    x = pred.float().requires_grad_()
    y = x * 1.0
    loss = losses.fused_image_loss(y, target.float(), metrics.ssim_moments(target.float()), 0.25)
    y.data.add_(0)  # not tracked: allowed
    y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_moments_are_computed_when_not_given(device):
    pred, target = pair((2, 30, 20), device, seed=1)
    given = losses.image_loss(pred, target, metrics.ssim_moments(target))
    assert float(losses.image_loss(pred, target)) == pytest.approx(float(given), rel=1e-6)


def test_identical_images_are_the_optimum(device):
    """SSIM is 1 and |a - b| 0 at a = b: the loss is 0 and so is its gradient (L1's sign is 0
    there, as torch's abs; SSIM is at its maximum)."""
    _, target = pair((2, 24, 19), device, seed=2)
    value, grad = value_and_grad(
        lambda x: losses.fused_image_loss(x, target, metrics.ssim_moments(target), 0.25), target)
    assert abs(float(value)) < 1e-6
    assert float(grad.abs().max()) < 1e-5


def test_ssim_weight_zero_is_l1(device):
    pred, target = pair((2, 16, 16), device, seed=3)
    value, grad = value_and_grad(lambda x: losses.image_loss(x, target, None, 0.0), pred)
    ref_value, ref_grad = value_and_grad(lambda x: reference(x, target, 0.0), pred)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-12)
    assert torch.allclose(grad, ref_grad)


def test_float32_noncontiguous_prediction_and_repeatable(device):
    """A transposed float32 view goes in (the bridge makes it contiguous); two calls give
    bitwise the same loss and gradient (fixed-order sums, no atomics)."""
    pred, target = pair((3, 33, 28), device, seed=4)
    pred_t = pred.float().transpose(1, 2).contiguous().transpose(1, 2)
    assert not pred_t.is_contiguous()
    target = target.float()
    moments = metrics.ssim_moments(target)
    first = value_and_grad(lambda x: losses.fused_image_loss(x, target, moments, 0.25), pred_t)
    second = value_and_grad(lambda x: losses.fused_image_loss(x, target, moments, 0.25), pred_t)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    ref_value, ref_grad = value_and_grad(lambda x: reference(x, target, 0.25), pred)
    assert abs(float(first[0] - ref_value)) < 1e-6
    assert float((first[1] - ref_grad).norm() / ref_grad.norm()) < 1e-5


@pytest.mark.parametrize("case,match", [
    ("shape", "same non-empty \\(V, H, W\\) stack"),
    ("moments", "target moments"),
    ("2d", "same non-empty \\(V, H, W\\) stack"),
    ("empty", "same non-empty \\(V, H, W\\) stack"),
    ("nan weight", "SSIM weight must be finite"),
    ("negative weight", "SSIM weight must be finite"),
])
def test_bad_input_is_rejected(device, case, match):
    pred, target = pair((2, 20, 20), device)
    moments = metrics.ssim_moments(target)
    if case == "shape":
        pred = pred[:, :-1]
    elif case == "moments":
        moments = moments[:, :, 1:]
    elif case == "2d":
        pred, target, moments = pred[0], target[0], moments[:1]
    elif case == "empty":
        pred, target, moments = pred[:0], target[:0], moments[:0]
    weight = {"nan weight": float("nan"), "negative weight": -0.1}.get(case, 0.25)
    with pytest.raises(RgsInputError, match=match):
        losses.fused_image_loss(pred, target, moments, weight)
