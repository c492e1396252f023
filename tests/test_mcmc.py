"""Short-run MCMC learning (Nijkamp et al. 2020): samplers, training loop, configs."""
import json
import os

import pytest
import torch

from ebm import EBM
from samplers import Energy, langevin, mala

MU = torch.tensor([1.0, -2.0])
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]])
PREC = torch.linalg.inv(COV)


def gaussian_energy(x):
    d = x - MU
    return 0.5 * ((d @ PREC) * d).sum(1)


def test_ula_recovers_gaussian():
    torch.manual_seed(0)
    x = langevin(gaussian_energy, torch.randn(4000, 2), n_steps=600, eps=0.3)
    # ULA on a Gaussian is biased by O(eps^2) in the covariance only; at eps = 0.3 the
    # stationary covariance is within ~3% of COV
    assert torch.allclose(x.mean(0), MU, atol=0.06)
    assert torch.allclose(torch.cov(x.T), COV, atol=0.06)


def test_mala_recovers_gaussian():
    torch.manual_seed(0)
    x, acc = mala(gaussian_energy, torch.randn(4000, 2), n_steps=400, eps=0.5)
    assert acc.shape == (400,)
    assert 0.3 < acc[-100:].mean() < 1.0
    assert torch.allclose(x.mean(0), MU, atol=0.06)
    assert torch.allclose(torch.cov(x.T), COV, atol=0.06)


def test_mala_temperature_scales_covariance():
    torch.manual_seed(0)
    x, _ = mala(gaussian_energy, torch.randn(4000, 2), n_steps=400, eps=0.5, temperature=2.0)
    assert torch.allclose(torch.cov(x.T), 2 * COV, atol=0.12)


def test_mala_acceptance_falls_with_step():
    torch.manual_seed(0)
    x0 = MU + torch.randn(2000, 2) @ torch.linalg.cholesky(COV).T
    rates = [float(mala(gaussian_energy, x0, 30, eps)[1].mean()) for eps in (0.1, 0.4, 0.8, 1.6)]
    assert all(a > b for a, b in zip(rates, rates[1:])), rates
    assert rates[0] > 0.95 and rates[-1] < 0.1


def test_fast_mlp_gradient_matches_autograd():
    torch.manual_seed(0)
    for act in ("leakyrelu", "silu", "tanh", "softplus", "elu", "relu"):
        ebm = EBM(2, (16, 8), act)
        U = Energy(ebm, scale=3.0)
        assert U.layers is not None
        x = torch.randn(64, 2, requires_grad=True)
        ref = torch.autograd.grad(U(x).sum(), x)[0]
        assert torch.allclose(U.grad(x), ref, atol=1e-5), act
        assert all(p.requires_grad for p in ebm.parameters())


def test_langevin_fast_and_autograd_paths_agree_and_unfreeze():
    ebm = EBM(2, (32, 64, 64, 64), "leakyrelu")
    x0 = torch.rand(100, 2) * 8 - 4
    torch.manual_seed(1)
    a, ra = langevin(Energy(ebm, 2 / 0.1 ** 2), x0, 20, 0.1, return_grad_norm=True)
    torch.manual_seed(1)
    b, rb = langevin(lambda x: ebm(x) * (2 / 0.1 ** 2), x0, 20, 0.1, return_grad_norm=True,
                     freeze=ebm)
    assert torch.allclose(a, b, atol=1e-4) and torch.allclose(ra, rb, rtol=1e-4)
    assert ra.shape == (20,) and (ra > 0).all()
    assert all(p.requires_grad for p in ebm.parameters())
    assert not a.requires_grad and not x0.requires_grad


@pytest.mark.parametrize("name", ["gmm", "rings4"])
def test_paper_toys_densities_integrate_and_match_samples(name):
    import datasets
    from util import grid_points

    x, area = grid_points(datasets.BOUND, 720, torch.float64)
    mass = float(datasets.log_density(name, x).exp().sum() * area)
    assert abs(mass - 1) < 1e-4  # rings4 has 1.6e-5 of its mass outside [-4.5, 4.5]^2
    xs = datasets.sample(name, 50000, 0).double()
    # E_p[-log p] = H(p): the samplers and the densities describe the same distribution
    assert abs(float(-datasets.log_density(name, xs).mean()) - datasets.entropy(name)) < 0.02
