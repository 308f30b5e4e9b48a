"""PSNR / SSIM: identities, a known noise level, the SSIM formula on one window, 3D averaging."""
import math

import pytest
import torch

from rgs_engine.core import metrics
from rgs_engine.core.errors import RgsInputError


def _volume(shape=(20, 22, 24)):
    gt = torch.rand(shape, dtype=torch.float64)
    gt.view(-1)[0], gt.view(-1)[1] = 0.0, 1.0  # data range exactly 1
    return gt


def test_identical_volumes_give_inf_and_one():
    gt = _volume()
    assert metrics.psnr_3d(gt, gt) == math.inf
    assert metrics.ssim_3d(gt, gt) == pytest.approx(1.0, abs=1e-12)
    assert metrics.psnr_2d(gt, gt) == math.inf
    assert metrics.ssim_2d(gt, gt) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_known_noise_level():
    gt = _volume((64, 64, 64))
    noisy = gt + 0.01 * torch.randn_like(gt)
    # MSE = sigma^2 and range = 1 -> PSNR = 20 log10(1 / 0.01) = 40 dB
    assert metrics.psnr_3d(noisy, gt) == pytest.approx(40.0, abs=0.05)
    assert metrics.psnr_2d(noisy.float(), gt.float()) == pytest.approx(40.0, abs=0.1)
    assert metrics.psnr_3d(gt + 0.1, gt) == pytest.approx(20.0, abs=1e-6)


def test_ssim_on_one_window_matches_the_formula():
    gt = torch.rand(1, 11, 11, dtype=torch.float64)
    x = 0.5 * gt + 0.2 * torch.rand(1, 11, 11, dtype=torch.float64)
    r = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-r ** 2 / (2 * 1.5 ** 2))
    w = torch.outer(g, g) / torch.outer(g, g).sum()
    mx, my = (w * x).sum(), (w * gt).sum()
    vx, vy = (w * (x - mx) ** 2).sum(), (w * (gt - my) ** 2).sum()
    cov = (w * (x - mx) * (gt - my)).sum()
    c1, c2 = (0.01 * (gt.max() - gt.min())) ** 2, (0.03 * (gt.max() - gt.min())) ** 2
    expected = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    assert metrics.ssim_2d(x, gt) == pytest.approx(float(expected), rel=1e-10)


def test_ssim_3d_averages_slices_along_all_three_axes():
    gt = _volume((16, 16, 16))
    x = gt + 0.05 * torch.randn_like(gt)
    per_axis = [metrics.ssim_2d(x.movedim(a, 0), gt.movedim(a, 0)) for a in range(3)]
    assert metrics.ssim_3d(x, gt) == pytest.approx(sum(per_axis) / 3, rel=1e-12)


def test_ssim_decreases_with_noise():
    gt = _volume()
    values = [metrics.ssim_3d(gt + s * torch.randn_like(gt), gt) for s in (0.01, 0.05, 0.2)]
    assert 1.0 > values[0] > values[1] > values[2] > 0.0


def test_bad_input_is_rejected():
    gt = _volume()
    with pytest.raises(RgsInputError, match="shape"):
        metrics.psnr_3d(gt[:-1], gt)
    with pytest.raises(RgsInputError, match="constant"):
        metrics.ssim_3d(gt, torch.ones_like(gt))
    with pytest.raises(RgsInputError, match="3-D"):
        metrics.psnr_3d(gt[0], gt[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ssim_with_precomputed_target_moments_is_the_same(dtype):
    """The training loss passes the target's blurred moments (ssim_moments) instead of
    blurring it at every step: the same SSIM and gradient, to rounding, also across chunks."""
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(metrics._CHUNK + 3, 20, 17, generator=g, dtype=dtype)
    x = (gt + 0.1 * torch.randn(gt.shape, generator=g, dtype=dtype)).requires_grad_()
    moments = metrics.ssim_moments(gt)
    assert moments.shape == (gt.shape[0], 2, 10, 7) and not moments.requires_grad
    plain = metrics.ssim_per_slice(x, gt, 1.0).mean()
    (grad_plain,) = torch.autograd.grad(plain, x)
    cached = metrics.ssim_per_slice(x, gt, 1.0, moments).mean()
    (grad_cached,) = torch.autograd.grad(cached, x)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert abs(float(plain - cached)) < tol
    assert torch.allclose(grad_plain, grad_cached, rtol=1e-4, atol=tol)
    assert float(1 - plain) > 0.05  # not trivially one
