"""2D toy distributions, with exact log-densities where they have a closed form.

Where a name exists in the public FFJORD toy data (Grathwohl et al. 2019, `lib/toy_data.py`)
the definition is the same; each sampler's docstring states it. Samplers take a
`numpy.random.Generator`, so a seed fixes the data.

    x = sample("8gaussians", 1000, rng)          # (1000, 2) float32 tensor
    log_p = log_density("8gaussians", x)         # exact, or None when unknown
    H = entropy("8gaussians")                    # nats, by float64 grid integration

`BOUND` is the half-width of the square [-BOUND, BOUND]^2 on which every density here is
plotted and integrated; all toy sets keep (almost) all their mass inside it.
"""
import functools
import math

import numpy as np
import torch

BOUND = 4.5
GRID = 360  # evaluation grid: cells of width 0.025, edges on multiples of 0.5


def _8gaussians(n, rng):
    """8 centres at radius 4 (angles k*pi/4), N(0, 0.5^2 I) noise, then everything / 1.414."""
    angles = rng.integers(0, 8, n) * (math.pi / 4)
    centres = 4.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
    return (centres + 0.5 * rng.standard_normal((n, 2))) / 1.414


def _log_8gaussians(x):
    """Mixture of 8 equal N(c_k / 1.414, (0.5 / 1.414)^2 I)."""
    angles = torch.arange(8, dtype=x.dtype, device=x.device) * (math.pi / 4)
    centres = 4.0 / 1.414 * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    s = 0.5 / 1.414
    d2 = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
    log_n = -d2 / (2 * s * s) - math.log(2 * math.pi * s * s)
    return torch.logsumexp(log_n, 1) - math.log(8)


def _checkerboard(n, rng):
    """x1 ~ U[-2, 2); x2 ~ U on [0, 1) or [-2, -1), shifted up by floor(x1) mod 2; all times 2.

    Uniform on 8 squares of side 2 (area 32): log p = -log 32 inside, -inf outside.
    """
    x1 = rng.random(n) * 4 - 2
    x2 = rng.random(n) - rng.integers(0, 2, n) * 2 + np.floor(x1) % 2
    return np.stack([x1, x2], 1) * 2


def _log_checkerboard(x):
    """Inverts the sampler: u = x / 2; inside iff u1 in [-2, 2) and u2 - (floor(u1) mod 2)
    lies in [0, 1) or [-2, -1)."""
    u = x / 2
    v = u[:, 1] - torch.remainder(torch.floor(u[:, 0]), 2)
    inside = (u[:, 0] >= -2) & (u[:, 0] < 2) & (((v >= 0) & (v < 1)) | ((v >= -2) & (v < -1)))
    out = torch.full_like(x[:, 0], -math.inf)
    return torch.where(inside, out.new_tensor(-math.log(32.0)), out)


def _spiral(n, rng):
    """One arm of `2spirals`: t = sqrt(U) * 3 pi, x = (-t cos t, t sin t) / 3 + U[0, 0.5)^2 / 3
    jitter + N(0, 0.1^2 I)."""
    t = np.sqrt(rng.random((n, 1))) * 3 * math.pi
    x = np.hstack([-np.cos(t) * t, np.sin(t) * t]) + rng.random((n, 2)) * 0.5
    return x / 3 + 0.1 * rng.standard_normal((n, 2))


def _2spirals(n, rng):
    """FFJORD: the `spiral` arm and its mirror image -x, half the points each."""
    x = _spiral(n, rng)
    flip = rng.random(n) < 0.5
    x[flip] *= -1
    return x


def _rings(n, rng):
    """FFJORD: 4 circles of radius 3, 2.25, 1.5, 0.75 (a quarter of the points each, uniform
    angle), plus N(0, 0.08^2 I) noise."""
    r = 3.0 * (1.0 - 0.25 * rng.integers(0, 4, n))
    a = rng.random(n) * 2 * math.pi
    return r[:, None] * np.stack([np.cos(a), np.sin(a)], 1) + 0.08 * rng.standard_normal((n, 2))


def _pinwheel(n, rng):
    """FFJORD: 5 arms; f ~ N((1, 0), diag(0.3, 0.1)^2) rotated by 2 pi k / 5 + 0.25 exp(f1),
    times 2."""
    k = rng.integers(0, 5, n)
    f = rng.standard_normal((n, 2)) * np.array([0.3, 0.1])
    f[:, 0] += 1.0
    a = 2 * math.pi * k / 5 + 0.25 * np.exp(f[:, 0])
    c, s = np.cos(a), np.sin(a)
    return 2 * np.stack([f[:, 0] * c + f[:, 1] * s, -f[:, 0] * s + f[:, 1] * c], 1)


def _moons(n, rng):
    """FFJORD (sklearn make_moons, noise 0.1): upper moon (cos t, sin t), lower moon
    (1 - cos t, 0.5 - sin t), t ~ U[0, pi]; then x * 2 + (-1, -0.2)."""
    t = rng.random(n) * math.pi
    lower = rng.random(n) < 0.5
    x = np.stack([np.cos(t), np.sin(t)], 1)
    x[lower] = np.stack([1 - np.cos(t[lower]), 0.5 - np.sin(t[lower])], 1)
    x += 0.1 * rng.standard_normal((n, 2))
    return x * 2 + np.array([-1.0, -0.2])


def _circles(n, rng):
    """FFJORD (sklearn make_circles, factor 0.5, noise 0.08): circles of radius 1 and 0.5,
    uniform angle, half the points each, N(0, 0.08^2 I) noise; then times 3."""
    r = np.where(rng.random(n) < 0.5, 1.0, 0.5)
    a = rng.random(n) * 2 * math.pi
    x = r[:, None] * np.stack([np.cos(a), np.sin(a)], 1) + 0.08 * rng.standard_normal((n, 2))
    return x * 3


def _swissroll(n, rng):
    """FFJORD (sklearn make_swiss_roll, noise 1.0, coordinates (x, z)): t = 1.5 pi (1 + 2U),
    x = (t cos t, t sin t) + N(0, I); then / 5."""
    t = 1.5 * math.pi * (1 + 2 * rng.random(n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], 1) + rng.standard_normal((n, 2))
    return x / 5


def _gmm(n, rng):
    """Nijkamp et al. (AAAI 2020) `gmm`: 8 equal Gaussians N(c_k, 0.15^2 I), c_k on the unit
    circle at angles k pi / 4."""
    angles = rng.integers(0, 8, n) * (math.pi / 4)
    return np.stack([np.cos(angles), np.sin(angles)], 1) + 0.15 * rng.standard_normal((n, 2))


def _log_gmm(x):
    angles = torch.arange(8, dtype=x.dtype, device=x.device) * (math.pi / 4)
    centres = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    s = 0.15
    d2 = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
    return torch.logsumexp(-d2 / (2 * s * s), 1) - math.log(2 * math.pi * s * s) - math.log(8)


def _rings4(n, rng):
    """Nijkamp et al. (AAAI 2020) `rings` (named rings4 here; `rings` is FFJORD's): radius
    r ~ N(k, 0.15^2) with k uniform on {1, 2, 3, 4}, angle uniform."""
    r = rng.integers(1, 5, n) + 0.15 * rng.standard_normal(n)
    a = rng.random(n) * 2 * math.pi
    return r[:, None] * np.stack([np.cos(a), np.sin(a)], 1)


def _log_rings4(x):
    """Mixture of N(r; k, 0.15^2) / (2 pi r), k = 1..4, equal weights: the polar density
    divided by the Jacobian r. (The Gaussians' mass at r < 0 is below 1e-11: ignored.)"""
    r = x.norm(dim=1).clamp_min(1e-30)
    k = torch.arange(1, 5, dtype=x.dtype, device=x.device)
    s = 0.15
    log_n = -((r[:, None] - k) ** 2) / (2 * s * s) - 0.5 * math.log(2 * math.pi * s * s)
    return torch.logsumexp(log_n, 1) - math.log(4) - torch.log(2 * math.pi * r)


SAMPLERS = {
    "8gaussians": _8gaussians,
    "spiral": _spiral,
    "2spirals": _2spirals,
    "checkerboard": _checkerboard,
    "rings": _rings,
    "pinwheel": _pinwheel,
    "moons": _moons,
    "circles": _circles,
    "swissroll": _swissroll,
    "gmm": _gmm,
    "rings4": _rings4,
}
LOG_DENSITIES = {"8gaussians": _log_8gaussians, "checkerboard": _log_checkerboard,
                 "gmm": _log_gmm, "rings4": _log_rings4}
NAMES = tuple(SAMPLERS)


def check_name(name):
    """Raise ValueError naming the valid datasets if `name` is not one of them."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(SAMPLERS)}")


def sample(name, n, rng):
    """n samples of dataset `name` as a float32 tensor of shape (n, 2).

    rng: a numpy Generator, or an int seed."""
    check_name(name)
    if n <= 0:
        raise ValueError(f"number of samples must be positive, got {n}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    return torch.as_tensor(SAMPLERS[name](n, rng), dtype=torch.float32)


def has_density(name):
    return name in LOG_DENSITIES


def log_density(name, x):
    """Exact log p_data(x) for an (N, 2) tensor, in x's dtype, or None when not known."""
    check_name(name)
    fn = LOG_DENSITIES.get(name)
    return None if fn is None else fn(x)


@functools.lru_cache(maxsize=None)
def entropy(name, n=1440):
    """H(p_data) = -int p log p in nats by float64 integration on the BOUND grid, or None.

    The best possible test NLL: a model's NLL is H + KL(p_data || p_model) >= H.
    n = 1440 puts cell edges on multiples of 0.5 (so on the checkerboard's edges)."""
    if not has_density(name):
        return None
    from util import grid_points  # local import: util imports this module

    x, area = grid_points(BOUND, n, torch.float64)
    lp = log_density(name, x)
    p = lp.exp()
    return float(-(p * torch.where(p > 0, lp, torch.zeros_like(lp))).sum() * area)
