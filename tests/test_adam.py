"""rgs's Adam against torch.optim.Adam: same updates, interchangeable state dicts, and no
torch._dynamo import (the reason it exists)."""
import subprocess
import sys

import pytest
import torch

from rgs_engine.core import adam
from rgs_engine.core.adam import Adam


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=g, dtype=torch.float64).requires_grad_(),
            torch.randn(7, generator=g, dtype=torch.float64).requires_grad_()]


def _groups(params, lrs=(0.1, 0.03)):
    return [{"params": [p], "lr": lr, "name": f"p{i}"} for i, (p, lr) in enumerate(zip(params, lrs))]


def _loss(params, k: int) -> torch.Tensor:
    return sum(((p - 0.1 * k) ** 2 * (1 + i)).sum() + p.sin().sum() for i, p in enumerate(params))


def _run(opt, params, steps: int, start: int = 0) -> None:
    for k in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        _loss(params, k).backward()
        opt.step()


@pytest.mark.parametrize("fused", [False, True])
def test_updates_match_torch_adam(monkeypatch, fused):
    """Five steps of two groups with their own rates: the same parameters and moments as
    torch.optim.Adam (single-tensor arithmetic, or torch's fused kernel, here on the CPU)."""
    monkeypatch.setattr(adam, "FUSED", fused)
    ours, theirs = _params(), _params()
    mine = Adam(_groups(ours), eps=1e-15)
    ref = torch.optim.Adam(_groups(theirs), eps=1e-15, foreach=False, fused=fused or None)
    _run(mine, ours, 5)
    _run(ref, theirs, 5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(mine.state[a][key], ref.state[b][key], rtol=1e-13, atol=1e-13)
        assert float(mine.state[a]["step"]) == 5 and mine.state[a]["step"].dtype == torch.float32
    assert [g["name"] for g in mine.param_groups] == ["p0", "p1"]


def test_state_dicts_interchange_with_torch(monkeypatch):
    """A torch.optim.Adam checkpoint (older rgs runs) resumes in Adam and the other way round,
    continuing exactly as an uninterrupted run would."""
    straight = _params()
    opt = Adam(_groups(straight))
    _run(opt, straight, 6)

    first = _params()
    ref = torch.optim.Adam(_groups(first), foreach=False)
    _run(ref, first, 3)
    resumed = [p.detach().clone().requires_grad_() for p in first]
    mine = Adam(_groups(resumed, lrs=(9.0, 9.0)))  # the saved rates win
    mine.load_state_dict(ref.state_dict())
    assert [g["lr"] for g in mine.param_groups] == [0.1, 0.03]
    _run(mine, resumed, 3, start=3)
    for a, b in zip(resumed, straight):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)

    back = [p.detach().clone().requires_grad_() for p in resumed]
    theirs = torch.optim.Adam(_groups(back), foreach=False)
    theirs.load_state_dict(mine.state_dict())
    assert float(theirs.state[back[0]]["step"]) == 6


def test_skips_parameters_without_gradients_and_checks_shapes():
    a, b = _params()
    opt = Adam([a, b], lr=0.1)
    before = b.detach().clone()
    opt.zero_grad()
    (a ** 2).sum().backward()
    opt.step()
    assert b.grad is None and torch.equal(b.detach(), before) and b not in opt.state
    other = Adam([torch.zeros(2, requires_grad=True), torch.zeros(7, requires_grad=True)])
    with pytest.raises(ValueError, match="moment"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="groups"):
        Adam(_groups([a, b])).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="empty"):
        Adam([])


def test_does_not_import_dynamo():
    """torch.optim's first parameter group and first step import torch._dynamo (about a
    second); Adam must not."""
    code = ("import sys, torch\n"
            "from rgs_engine.core.adam import Adam\n"
            "p = torch.zeros(3, requires_grad=True)\n"
            "opt = Adam([{'params': [p], 'name': 'x'}], lr=0.1)\n"
            "(p - 1).square().sum().backward(); opt.step(); opt.zero_grad(); opt.state_dict()\n"
            "assert 'torch._dynamo' not in sys.modules\n"
            "assert float(p[0]) > 0\n")
    subprocess.run([sys.executable, "-c", code], check=True)
