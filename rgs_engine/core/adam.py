"""Adam for rgs's parameter tensors, without ``torch.optim``.

``torch.optim``'s optimisers import ``torch._dynamo`` the first time a parameter group is
added and the first time they step: about 1.0 s on 2 CPU cores and 1.8 s on the H100 machine
(``validation/profile_recon.py``'s "Adam set-up" of 2026-12-05), paid once by every ``rgs``
process. :class:`Adam` is the same algorithm (Kingma & Ba, as ``torch.optim.Adam`` without
weight decay, AMSGrad or maximisation) with ``torch.optim.Adam``'s ``state_dict`` format, so
checkpoints load in either:

* on CUDA tensors, torch's fused kernel (``torch._fused_adam_``: one launch per group, the
  step counters on the device, so no host sync);
* elsewhere, torch's single-tensor arithmetic (its default for CPU tensors), operation for
  operation, with the step counters on the CPU.

``FUSED`` (module level) overrides the choice for every optimiser (tests: torch also has a
fused CPU kernel).
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

FUSED: Optional[bool] = None  # None: fused on CUDA tensors, single-tensor elsewhere


class Adam:
    """``Adam(params, lr, betas, eps)``: ``params`` an iterable of tensors or of group dicts
    (``{"params": [...], **options}``; extra keys such as ``name`` are kept). The interface
    rgs uses of ``torch.optim.Adam``: ``param_groups``, ``state`` (per parameter tensor:
    ``step`` (0-d float32), ``exp_avg``, ``exp_avg_sq``), :meth:`zero_grad`, :meth:`step`,
    :meth:`state_dict` and :meth:`load_state_dict`."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        groups = list(params)
        if not groups:
            raise ValueError("Adam got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps}
        self.param_groups: list[dict[str, Any]] = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    @staticmethod
    def _fused(p: torch.Tensor) -> bool:
        return p.is_cuda if FUSED is None else FUSED

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def _state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        st = self.state.get(p)
        if not st:
            where = p.device if self._fused(p) else torch.device("cpu")
            st = self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=where),
                                  "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                  "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        return st

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of every parameter that has a gradient."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            if self._fused(params[0]):
                steps = [s["step"] for s in states]
                torch._foreach_add_(steps, 1)
                torch._fused_adam_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                                   [s["exp_avg_sq"] for s in states], [], steps, lr=lr, beta1=beta1,
                                   beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
                continue
            for p, st in zip(params, states):
                grad = p.grad
                st["step"] += 1
                st["exp_avg"].lerp_(grad, 1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = float(st["step"])
                step_size = lr / (1 - beta1 ** step)
                denom = (st["exp_avg_sq"].sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
                p.addcdiv_(st["exp_avg"], denom, value=-step_size)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Adam``'s layout: parameters numbered in group order, ``state`` by
        number (the tensors themselves, not copies), ``param_groups`` with the numbers."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            numbers = [index.setdefault(id(p), len(index)) for p in group["params"]]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": numbers})
        state = {index[id(p)]: dict(st) for p, st in self.state.items() if id(p) in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` of this class or of ``torch.optim.Adam`` (from any
        device) for the same groups and parameter shapes: moments move to each parameter's
        device, step counters to where :meth:`step` keeps them; the groups take the saved
        ``lr``, ``betas``, ``eps`` and extra keys (torch's implementation flags are dropped)."""
        groups = saved["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the saved optimiser state has other parameter groups than this optimiser")
        torch_only = {"amsgrad", "weight_decay", "foreach", "maximize", "capturable", "differentiable",
                      "fused", "decoupled_weight_decay"}
        self.state = {}
        for group, old in zip(self.param_groups, groups):
            group.update({k: (tuple(v) if k == "betas" else v) for k, v in old.items()
                          if k != "params" and k not in torch_only})
            for p, number in zip(group["params"], old["params"]):
                st = saved["state"].get(number)
                if not st:
                    continue
                if st["exp_avg"].shape != p.shape:
                    raise ValueError(f"the saved optimiser state holds a {tuple(st['exp_avg'].shape)} "
                                     f"moment for a {tuple(p.shape)} parameter")
                where = p.device if self._fused(p) else torch.device("cpu")
                self.state[p] = {"step": torch.as_tensor(st["step"], dtype=torch.float32).to(where).reshape(()),
                                 **{k: st[k].to(p.device, p.dtype).clone() for k in ("exp_avg", "exp_avg_sq")}}
