"""rgs_engine.core.stats.quantile: torch.quantile's values at any size."""
import pytest
import torch

from rgs_engine.core import stats


@pytest.mark.parametrize("q", [0.0, 0.37, 0.99, 1.0, [0.001, 0.5, 0.999]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_input_path_matches_torch_quantile(monkeypatch, q, dtype):
    x = torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(0), dtype=dtype)
    want = torch.quantile(x.reshape(-1), torch.as_tensor(q, dtype=dtype))
    assert torch.equal(stats.quantile(x, q), want)  # small: torch.quantile itself
    monkeypatch.setattr(stats, "TORCH_QUANTILE_LIMIT", 10)  # force the sorting path
    got = stats.quantile(x, q)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want)


def test_beyond_torch_quantile_limit():
    x = torch.arange(stats.TORCH_QUANTILE_LIMIT + 2, dtype=torch.float32)
    with pytest.raises(RuntimeError):
        torch.quantile(x, 0.5)
    assert float(stats.quantile(x, 0.5)) == pytest.approx((x.numel() - 1) / 2)
