"""Score matching for EBMs p_theta(x) = exp(-f_theta(x)) / Z: losses that never need Z.

The model's score is s_theta(x) = grad_x log p_theta(x) = -grad_x f_theta(x).

Denoising score matching (Vincent 2011): perturb the data, x~ = x + sigma eps, eps ~ N(0, I),
and regress the model's score at x~ onto the score of the perturbation kernel,

    L_DSM(theta) = 1/2 E || s_theta(x~) + (x~ - x) / sigma^2 ||^2,

which is minimised by the score of the data convolved with N(0, sigma^2 I): the EBM learns
p_data * N(0, sigma^2 I), a density sigma^2 wider per dimension than the data.

Sliced score matching (Song et al. 2019, eq. 7, the plain sliced form; their variance-reduced
SSM-VR replaces 1/2 (v^T s)^2 by its mean over Gaussian v, 1/2 |s|^2, which is not done here):
with random directions v ~ N(0, I),

    L_SSM(theta) = E_x E_v [ v^T grad_x (v^T s_theta(x)) + 1/2 (v^T s_theta(x))^2 ],

equal up to a constant to the Fisher divergence 1/2 E || s_theta(x) - grad log p_data(x) ||^2
(Hyvarinen 2005) when E v v^T = I. It needs one extra backward pass per projection instead of
the D passes of the exact trace of the Hessian.
"""
import math

import torch
from torch import Tensor

import util


def score(energy, x: Tensor, create_graph: bool = True) -> Tensor:
    """s(x) = -grad_x f(x), shape (N, D); with `create_graph` the result can be
    differentiated again (the losses below need it for the weights)."""
    x = x.detach().requires_grad_(True)
    f = energy(x)
    (g,) = torch.autograd.grad(f.sum(), x, create_graph=create_graph)
    return -g


def dsm_loss(energy, x: Tensor, sigma: float, generator: torch.Generator = None) -> Tensor:
    """L_DSM = 1/2 E || s(x~) + (x~ - x) / sigma^2 ||^2, x~ = x + sigma eps; scaled by
    sigma^2 so that its size does not depend on sigma (Song & Ermon 2019)."""
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    x_tilde = x + sigma * eps
    s = score(energy, x_tilde)
    return 0.5 * sigma ** 2 * ((s + eps / sigma) ** 2).sum(-1).mean()


def ssm_loss(energy, x: Tensor, n_projections: int = 1,
             generator: torch.Generator = None) -> Tensor:
    """L_SSM = E [ v^T grad_x (v^T s(x)) + 1/2 (v^T s(x))^2 ], v ~ N(0, I), averaged over
    `n_projections` directions per point."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(energy(x).sum(), x, create_graph=True)
    s = -g
    total = x.new_zeros(())
    for _ in range(n_projections):
        v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        sv = (s * v).sum(-1)
        (grad_sv,) = torch.autograd.grad(sv.sum(), x, create_graph=True)
        total = total + ((grad_sv * v).sum(-1) + 0.5 * sv ** 2).mean()
    return total / n_projections


def sm_loss(energy, x: Tensor, estimator: str, sigma: float = 0.1, n_projections: int = 1,
            generator: torch.Generator = None) -> Tensor:
    """L_DSM (estimator "dsm", noise std sigma) or L_SSM ("ssm") of the batch x."""
    if estimator == "dsm":
        return dsm_loss(energy, x, sigma, generator)
    if estimator == "ssm":
        return ssm_loss(energy, x, n_projections, generator)
    raise ValueError(f"unknown score-matching estimator {estimator!r}; choose dsm or ssm")


def held_out_loss(energy, x: Tensor, estimator: str, sigma: float = 0.1,
                  n_projections: int = 1, seed: int = 0) -> float:
    """`sm_loss` on held-out points x with draws from a generator seeded by `seed`: the same
    draws at every evaluation, so the number moves only with the model (what an evaluation
    reports for an EBM that learns no log Z)."""
    gen = torch.Generator().manual_seed(seed)
    return float(sm_loss(energy, x, estimator, sigma, n_projections, gen).detach())


def sm_step(energy, x: Tensor, opt, estimator: str, sigma: float = 0.1,
            n_projections: int = 1) -> Tensor:
    """One step of `opt` on L_DSM (estimator "dsm", noise std sigma) or L_SSM ("ssm") of the
    batch x; returns the loss (NaN, and no step, when it or a gradient is not finite)."""
    loss = sm_loss(energy, x, estimator, sigma, n_projections)
    if not torch.isfinite(loss) or not util.guarded_step(opt, loss):
        return loss.detach() * math.nan
    return loss.detach()
