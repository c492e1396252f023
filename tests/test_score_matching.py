"""Score matching losses against closed forms on Gaussian energies f(x) = 1/2 (x-m)^T A (x-m)."""
import pytest
import torch
from torch import nn

import score_matching as sm


class GaussEnergy(nn.Module):
    """f(x) = 1/2 (x - m)^T A (x - m), A = L L^T (+ a small ridge) positive definite."""

    def __init__(self, dim=2):
        super().__init__()
        self.m = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        self.L = nn.Parameter(torch.eye(dim, dtype=torch.float64))

    @property
    def A(self):
        return self.L @ self.L.T

    def forward(self, x):
        d = x - self.m
        return 0.5 * ((d @ self.A) * d).sum(-1)


MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return MU + z @ torch.linalg.cholesky(SIGMA).T


def test_score_is_minus_the_energy_gradient():
    f = GaussEnergy()
    with torch.no_grad():
        f.L.copy_(torch.tensor([[1.2, 0.0], [0.3, 0.7]]))
        f.m.copy_(torch.tensor([0.5, 0.1]))
    x = torch.randn(5, 2, dtype=torch.float64)
    assert torch.allclose(sm.score(f, x), -(x - f.m) @ f.A, atol=1e-12)


def test_ssm_loss_matches_its_closed_form():
    """E_x E_v [v^T grad(v^T s) + 1/2 (v^T s)^2] = -tr A + 1/2 tr(A^2 Sigma)
    + 1/2 (mu - m)^T A^2 (mu - m) for x ~ N(mu, Sigma), s = -A (x - m)."""
    f = GaussEnergy()
    with torch.no_grad():
        f.L.copy_(torch.tensor([[1.3, 0.0], [-0.4, 0.9]]))
        f.m.copy_(torch.tensor([0.2, 0.3]))
    A, d = f.A.detach(), MU - f.m.detach()
    exact = -torch.trace(A) + 0.5 * torch.trace(A @ A @ SIGMA) + 0.5 * d @ A @ A @ d
    gen = torch.Generator().manual_seed(1)
    mc = sm.ssm_loss(f, data(200_000), n_projections=2, generator=gen)
    assert float(mc.detach()) == pytest.approx(float(exact), abs=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ssm", "dsm"])
def test_training_a_gaussian_energy_recovers_the_data_or_the_smoothed_data(loss):
    """SSM's minimiser is the data's own precision and mean; DSM's is the precision of the
    data convolved with N(0, sigma^2 I), (Sigma + sigma^2 I)^-1, and the same mean."""
    torch.manual_seed(0)
    f = GaussEnergy()
    opt = torch.optim.Adam(f.parameters(), lr=0.03)
    x_all, sigma = data(100_000), 0.5
    gen = torch.Generator().manual_seed(2)
    for i in range(800):
        if i == 500:  # a smaller step at the end: the stochastic loss's noise averages out
            for group in opt.param_groups:
                group["lr"] = 0.003
        x = x_all[torch.randint(0, len(x_all), (1000,), generator=gen)]
        opt.zero_grad()
        value = (sm.ssm_loss(f, x, generator=gen) if loss == "ssm"
                 else sm.dsm_loss(f, x, sigma, generator=gen))
        value.backward()
        opt.step()
    target = torch.linalg.inv(SIGMA if loss == "ssm" else SIGMA + sigma ** 2 * torch.eye(2,
                                                                                       dtype=torch.float64))
    assert torch.allclose(f.A.detach(), target, atol=0.06), (f.A, target)
    assert torch.allclose(f.m.detach(), MU, atol=0.05)
