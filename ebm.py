"""Energy-based model p_theta(x) = exp(-f_theta(x)) / Z_theta.

The energy f_theta is an MLP. For noise-/flow-contrastive estimation the normaliser is a
learned scalar c ~ log Z (Gutmann & Hyvarinen 2010), so that

    log p_theta(x) = -f_theta(x) - c.

Maximum-likelihood methods (MCMC) ignore c. In 2D the exact log Z comes from grid
integration (gridmath.grid_log_Z), so the gap c - log Z can be watched during training.
"""
from typing import Any, Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS = {"silu": nn.SiLU, "softplus": nn.Softplus, "tanh": nn.Tanh, "elu": nn.ELU,
               "leakyrelu": lambda: nn.LeakyReLU(0.05), "relu": nn.ReLU}


def mlp(sizes: Sequence[int], act: str = "silu") -> nn.Sequential:
    """Linear layers of the given sizes with `act` between them (none after the last).

        mlp([2, 64, 1], "tanh")   # Linear(2, 64), Tanh, Linear(64, 1)
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; choose one of: {', '.join(ACTIVATIONS)}")
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers)


class EBM(nn.Module):
    """Energy f_theta: R^D -> R, an MLP D-h1-...-hk-1, plus the learned log-normaliser c.

    Smooth activations give smooth densities, which is what the toy figures and the
    Langevin samplers want.

        ebm = EBM(2, (128, 128), "silu")
        f = ebm(torch.randn(5, 2))          # (5,) energies
        log_p = ebm.log_prob(x)             # (5,) -f(x) - c
    """

    def __init__(self, dim: int = 2, hidden: Sequence[int] = (128, 128), act: str = "silu",
                 c_init: float = 0.0):
        super().__init__()
        self.dim, self.hidden, self.act = dim, tuple(hidden), act
        self.net = mlp([dim, *hidden, 1], act)
        self.c = nn.Parameter(torch.tensor(float(c_init)))

    def forward(self, x: Tensor) -> Tensor:
        """f_theta(x) of x (N, D), shape (N,)."""
        return self.net(x).squeeze(-1)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p_theta(x) = -f_theta(x) - c (N,), normalised only as well as c ~ log Z."""
        return -self(x) - self.c

    def energy_params(self) -> list[nn.Parameter]:
        """The parameters of f_theta, without c."""
        return list(self.net.parameters())

    def spec(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this module (stored in checkpoints)."""
        return {"dim": self.dim, "hidden": list(self.hidden), "act": self.act}
