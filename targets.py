"""Unnormalised 2D target densities p(z) = exp(-U(z)) / Z for variational inference.

U1-U4 are the energies of Rezende & Mohamed 2015, "Variational Inference with Normalizing
Flows", Table 1, with

    w1(z) = sin(2 pi z1 / 4),  w2(z) = 3 exp(-((z1 - 1) / 0.6)^2 / 2),  w3(z) = 3 sigma((z1 - 1) / 0.3)

    U1(z) = ((|z| - 2) / 0.4)^2 / 2 - log[exp(-((z1 - 2) / 0.6)^2 / 2) + exp(-((z1 + 2) / 0.6)^2 / 2)]
    U2(z) = ((z2 - w1) / 0.4)^2 / 2
    U3(z) = -log[exp(-((z2 - w1) / 0.35)^2 / 2) + exp(-((z2 - w1 + w2) / 0.35)^2 / 2)]
    U4(z) = -log[exp(-((z2 - w1) / 0.4)^2 / 2) + exp(-((z2 - w1 + w3) / 0.35)^2 / 2)]

The log-sum-exps are computed with `torch.logaddexp` (no `+1e-9` inside a log).

U2-U4 do not depend on z1 except through bounded bumps, so their integral over the plane
diverges: they are *improper*. Every normalised number (log Z, KL, ESS) here therefore uses
the *confined* versions

    U_c(z) = U(z) + WALL * sum_i relu(|z_i| - 4)^2

which equal U inside the box [-4, 4]^2 and add a steep, smooth (C^1) wall outside it
(a half-Gaussian tail of std 1/sqrt(2 WALL) = 0.05). U1 is proper; its confined version
differs only where exp(-U1) < 1e-5, and log Z(U1) = 1.8775 on the plane.

    U = energy("U3", z)            # (N,) from (N, 2), any dtype; confined by default
    U = energy("U3", z, confined=False)
    log_Z("U3")                    # float64 grid integral of exp(-U_c) (cached)

Any dataset of `datasets.py` with an exact density is also a target: energy = -log p_data
(log Z = 0 up to the grid error), e.g. `energy("8gaussians", z)`.
"""
import functools
import math

import torch
from torch.nn import functional as F

import datasets
from gridmath import grid_log_Z, on_grid

NAMES = ("U1", "U2", "U3", "U4")
BOX = 4.0            # U_c = U inside [-BOX, BOX]^2
WALL = 200.0         # wall stiffness: tail std 1 / sqrt(2 WALL) = 0.05
GRID_BOUND = 4.5     # log Z integration square [-4.5, 4.5]^2 (the wall holds q's mass inside)
GRID_N = 900         # 900^2 cells of width 0.01 (float64)


def _w1(z):
    return torch.sin(2 * math.pi * z[..., 0] / 4)


def _w2(z):
    return 3 * torch.exp(-0.5 * ((z[..., 0] - 1) / 0.6) ** 2)


def _w3(z):
    return 3 * torch.sigmoid((z[..., 0] - 1) / 0.3)


def U1(z):
    ring = 0.5 * ((z.norm(dim=-1) - 2) / 0.4) ** 2
    lobes = torch.logaddexp(-0.5 * ((z[..., 0] - 2) / 0.6) ** 2,
                            -0.5 * ((z[..., 0] + 2) / 0.6) ** 2)
    return ring - lobes


def U2(z):
    return 0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2


def U3(z):
    d = z[..., 1] - _w1(z)
    return -torch.logaddexp(-0.5 * (d / 0.35) ** 2, -0.5 * ((d + _w2(z)) / 0.35) ** 2)


def U4(z):
    d = z[..., 1] - _w1(z)
    return -torch.logaddexp(-0.5 * (d / 0.4) ** 2, -0.5 * ((d + _w3(z)) / 0.35) ** 2)


ENERGIES = {"U1": U1, "U2": U2, "U3": U3, "U4": U4}


def wall(z):
    """WALL * sum_i relu(|z_i| - BOX)^2: zero inside the box, steep and smooth outside."""
    return WALL * (F.relu(z.abs() - BOX) ** 2).sum(-1)


def check_name(name):
    if name not in ENERGIES and not datasets.has_density(name):
        valid = list(ENERGIES) + [n for n in datasets.NAMES if datasets.has_density(n)]
        raise ValueError(f"unknown target {name!r}; choose one of: {', '.join(valid)}")


def energy(name, z, confined=True):
    """U(z) of target `name` for z of shape (..., 2): U_c (confined, the default) or U."""
    check_name(name)
    if name in ENERGIES:
        u = ENERGIES[name](z)
        return u + wall(z) if confined else u
    flat = z.reshape(-1, z.shape[-1])
    return -datasets.log_density(name, flat).reshape(z.shape[:-1])


def energies(names, z, confined=True):
    """Stacked energies of several targets: z (T, N, 2) -> (T, N), target t on z[t]."""
    return torch.stack([energy(n, z[t], confined) for t, n in enumerate(names)])


@functools.lru_cache(maxsize=None)
def log_Z(name, confined=True, bound=GRID_BOUND, n=GRID_N):
    """log int exp(-U) dz by float64 midpoint integration on the square [-bound, bound]^2.

    With the defaults the grid error is below 1e-6 nats for U1-U4 (n = 900 and n = 3600 agree
    to 1e-8; the midpoint rule is very accurate on these smooth integrands). For the improper U2-U4 with confined=False the result grows with `bound`."""
    neg_u, area = on_grid(lambda z: -energy(name, z, confined), bound, n, chunk=1 << 20,
                          dtype=torch.float64)
    return grid_log_Z(neg_u, area)


def log_density(name, z, confined=True):
    """Normalised log p(z) = -U(z) - log Z (grid log Z, float64)."""
    return -energy(name, z.double(), confined) - log_Z(name, confined)
