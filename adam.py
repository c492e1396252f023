"""Adam (Kingma & Ba 2015) without torch.optim, for train.py: the numbers of torch.optim.Adam's
CPU path and its state_dict, so checkpoints load either way.

torch.optim's Optimizer imports torch._dynamo (and sympy with it, about 70 MB of resident
memory) when it is built and again at every step, whatever foreach, capturable or fused say;
a 2D train.py run needs none of it (docs/architecture.md has the measurement).

For each parameter theta with a gradient g, at its t-th update:

    m = beta1 m + (1 - beta1) g,    v = beta2 v + (1 - beta2) g^2,
    theta <- theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps),

computed in the order torch.optim.Adam computes it (no weight decay, amsgrad or maximize). A
parameter whose gradient is None is not moved and keeps its state.
"""
from typing import Any, Iterable

import torch
from torch import Tensor

# the hyperparameters torch.optim.Adam writes into each group of its state_dict
TORCH_GROUP = dict(weight_decay=0, amsgrad=False, maximize=False, foreach=None,
                   capturable=False, differentiable=False, fused=None,
                   decoupled_weight_decay=False)


class Adam:
    """`Adam(params, lr, betas, eps)`: one parameter group, `step()`, `zero_grad()`,
    `param_groups` (the learning rate lives in param_groups[0]["lr"]), `state_dict()` and
    `load_state_dict()` in torch.optim.Adam's format."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        self.param_groups = [dict(params=params, lr=lr, betas=tuple(betas), eps=eps,
                                  **TORCH_GROUP)]
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient, in a few `torch._foreach_*`
        calls (one C++ loop each over the parameters: on small networks the per-call overhead
        of a loop in Python is most of an optimizer step), elementwise the same arithmetic."""
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p not in self.state:
                    self.state[p] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            states = [self.state[p] for p in params]
            grads = [p.grad for p in params]
            m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1.0)
            ts = torch.stack(steps).tolist()  # each parameter's t, read in one call
            torch._foreach_lerp_(m, grads, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, [(1 - beta2 ** t) ** 0.5 for t in ts])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, [-lr / (1 - beta1 ** t) for t in ts])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """{"state": {index: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}, the
        parameters numbered in order, as torch.optim.Adam writes it."""
        index = {id(p): i for i, p in enumerate(self._params())}
        groups, start = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(start, start + n))})
            start += n
        return {"state": {index[id(p)]: dict(s) for p, s in self.state.items()},
                "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of this class or of torch.optim.Adam (same parameters, same
        order): the hyperparameters of each group and every parameter's state."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
                len(g["params"]) != len(s["params"]) for g, s in zip(self.param_groups, saved)):
            raise ValueError("loaded state dict has a different number of parameters or "
                             "parameter groups than this optimizer")
        by_index = {}
        for group, s in zip(self.param_groups, saved):
            group.update(lr=s["lr"], betas=tuple(s["betas"]), eps=s["eps"])
            by_index.update(zip(s["params"], group["params"]))
        self.state = {}
        for i, s in state_dict["state"].items():
            p = by_index[int(i)]
            self.state[p] = {k: (v.to(torch.float32).cpu() if k == "step" else
                                 v.to(p.device, p.dtype)).clone() for k, v in s.items()}
