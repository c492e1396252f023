"""Float64 integration of 2D densities on a regular grid (no project imports).

On the square [-b, b]^2 with n x n cell centres x_i of area dA:

    log Z = logsumexp_i(-f(x_i)) + log dA,
    KL(p || q) = sum_i p(x_i) (log p(x_i) - log q(x_i)) dA    (p the first argument).
"""
import math

import torch


def grid_points(bound, n, dtype=torch.float64, device="cpu"):
    """Centres of an n x n grid on [-bound, bound]^2, shape (n*n, 2), and the cell area."""
    h = 2 * bound / n
    t = torch.linspace(-bound + h / 2, bound - h / 2, n, dtype=dtype, device=device)
    xx, yy = torch.meshgrid(t, t, indexing="xy")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1), h * h


@torch.no_grad()
def on_grid(fn, bound, n, device="cpu", chunk=8192, dtype=torch.float32):
    """fn evaluated at the grid centres, in float64, shape (n*n,). `fn` receives points of
    `dtype` on `device` in chunks (float32 for float32 networks; float64 for analytic
    functions); the result is promoted to float64."""
    x, area = grid_points(bound, n)
    return in_chunks(lambda c: fn(c.to(device, dtype)), x, chunk), area


def in_chunks(fn, x, chunk=8192):
    """fn(x) (N,) computed `chunk` rows at a time into one float64 CPU tensor (.cpu() first:
    no float64 on MPS): the peak memory is one chunk's activations, and no chunk's result
    stays allocated between the next one's temporaries."""
    out = torch.empty(len(x), dtype=torch.float64)
    for i, c in enumerate(x.split(chunk)):
        out[i * chunk:i * chunk + len(c)] = fn(c).cpu().double()
    return out


def grid_log_Z(neg_energy_values, area):
    """log Z = log sum exp(-f) dA from -f on the grid (float64)."""
    return float(torch.logsumexp(neg_energy_values.double(), 0) + math.log(area))


def grid_kl(log_p, log_q, area):
    """KL(p || q) = sum p (log p - log q) dA on the grid; terms with p = 0 contribute 0."""
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return float((p * diff).sum() * area)
