"""2D toy distributions, each with its exact log-density.

Where a name exists in the public FFJORD toy data (Grathwohl et al. 2019, `lib/toy_data.py`)
the definition is the same; each sampler's docstring states it. Samplers take a
`numpy.random.Generator`, so a seed fixes the data.

    x = sample("8gaussians", 1000, rng)          # (1000, 2) float32 tensor
    log_p = log_density("8gaussians", x)         # exact log p_data(x)
    H = entropy("8gaussians")                    # nats, by float64 grid integration

Exact densities: closed forms for the Gaussian mixtures, the checkerboard and the noisy circles
(`rings`, `circles`: a circle of radius r with N(0, s^2 I) noise has the density
exp(-(|x|^2 + r^2) / 2s^2) I0(r |x| / s^2) / (2 pi s^2)); float64 quadrature over the generating
parameter for the curves (`spiral`, `2spirals`, `moons`, `swissroll`: a midpoint rule whose
nodes are much closer than the noise width, where it is accurate to far below 1e-6); and the
change-of-variables formula summed over every root for `pinwheel`.

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


# ----------------------------------------------------------------------------- exact densities
def _log_noisy_circles(x, radii, s):
    """Equal mixture of circles of the given radii with N(0, s^2 I) noise (closed form with the
    modified Bessel function: log I0(z) = log i0e(z) + z, stable for large z)."""
    rho = x.norm(dim=1, keepdim=True)
    r = torch.as_tensor(radii, dtype=x.dtype, device=x.device)
    z = r * rho / (s * s)
    log_c = (-(rho ** 2 + r ** 2) / (2 * s * s) + torch.log(torch.special.i0e(z)) + z
             - math.log(2 * math.pi * s * s))
    return torch.logsumexp(log_c, 1) - math.log(len(radii))


def _normal_kernel(x, c, s):
    """N(x_n; c_m, s^2 I) for every pair, shape (N, M), via |x|^2 - 2 x.c + |c|^2 (a matmul)."""
    d2 = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]
    return torch.exp(-d2.clamp_min(0) / (2 * s * s)) / (2 * math.pi * s * s)


def _box_normal_kernel(x, c, s, a):
    """Density at x_n of c_m + u + e, u ~ U[0, a)^2, e ~ N(0, s^2 I), shape (N, M): per
    coordinate (Phi(d / s) - Phi((d - a) / s)) / a with d = x - c, each difference taken on
    the side of the box where it does not cancel."""
    out = 1.0
    for j in range(2):
        d = x[:, j, None] - c[None, :, j]
        hi, lo = d / s, (d - a) / s
        left = hi + lo < 0
        diff = torch.where(left, torch.special.ndtr(hi) - torch.special.ndtr(lo),
                           torch.special.ndtr(-lo) - torch.special.ndtr(-hi))
        out = out * diff / a
    return out


def _log_curve_mixture(x, centres, w, kernel, reach, chunk=1024, rows=128):
    """log sum_m w_m k(x, c_m): the quadrature of a noisy curve, in probability space, chunked
    over x. A chunk only sees the nodes whose second coordinate lies within `reach` of its own
    (the kernel is below e^-32 of its peak beyond), so log p = -inf only where p_data is below
    about 1e-14 of its peak density. The kernel matrix is built `rows` rows at a time (the
    same numbers, a tenth of the memory: 20,000 spiral points peaked 160 MB above torch)."""
    order = torch.argsort(x[:, 1])  # chunks of nearby rows see few nodes
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for idx in order.split(chunk):
        xc = x[idx]
        near = ((centres[:, 1] >= xc[:, 1].min() - reach)
                & (centres[:, 1] <= xc[:, 1].max() + reach))
        c, wn = centres[near], w[near]
        for part in idx.split(rows):
            out[part] = torch.log((kernel(x[part], c) @ wn).clamp_min(0))
    return out


def _nodes(lo, hi, m, x):
    """Quadrature nodes and weights on [lo, hi]: the m-point midpoint rule (spectrally accurate
    inside for these smooth integrands) plus its Euler-Maclaurin end correction
    (h^2 / 24)(g'(hi) - g'(lo)) with one-sided differences, four more nodes at the ends (the
    curves stop there, and the midpoint rule alone is only O(h^2) beyond their tips)."""
    h = (hi - lo) / m
    mid = torch.linspace(lo + h / 2, hi - h / 2, m, dtype=x.dtype, device=x.device)
    ends = torch.tensor([lo, lo + h, hi - h, hi], dtype=x.dtype, device=x.device)
    w = torch.cat([torch.full_like(mid, h), ends.new_tensor([1.0, -1.0, -1.0, 1.0]) * h / 24])
    return torch.cat([mid, ends]), w


def _log_spiral(x, m=1200):
    """Quadrature over t in [0, 3 pi] with density 2 t / (3 pi)^2 (t = 3 pi sqrt(U)) of the
    box-times-Gaussian kernel around (-t cos t, t sin t) / 3 (node spacing <= 0.025 along the
    curve, a quarter of the noise std)."""
    t, q = _nodes(0.0, 3 * math.pi, m, x)
    centres = torch.stack([-torch.cos(t) * t, torch.sin(t) * t], 1) / 3
    w = 2 * t / (3 * math.pi) ** 2 * q
    return _log_curve_mixture(x, centres, w, lambda v, c: _box_normal_kernel(v, c, 0.1, 0.5 / 3),
                              reach=0.5 / 3 + 0.8)


def _log_2spirals(x):
    """Half the points are the spiral, half its mirror image -x."""
    return torch.logaddexp(_log_spiral(x), _log_spiral(-x)) - math.log(2)


def _log_moons(x, m=320):
    """Quadrature over t in [0, pi] for each moon (node spacing 0.02 along the curve), N(0,
    0.2^2 I) noise after the scaling."""
    t, q = _nodes(0.0, math.pi, m, x)
    upper = torch.stack([torch.cos(t), torch.sin(t)], 1)
    lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], 1)
    shift = torch.tensor([-1.0, -0.2], dtype=x.dtype, device=x.device)
    centres = torch.cat([upper, lower]) * 2 + shift
    w = torch.cat([q, q]) / (2 * math.pi)
    return _log_curve_mixture(x, centres, w, lambda v, c: _normal_kernel(v, c, 0.2), reach=1.6)


def _log_swissroll(x, m=500):
    """Quadrature over t uniform on [1.5 pi, 4.5 pi] (node spacing <= 0.054 along the curve),
    N(0, 0.2^2 I) noise after the scaling."""
    t, q = _nodes(1.5 * math.pi, 4.5 * math.pi, m, x)
    centres = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 5
    w = q / (3 * math.pi)
    return _log_curve_mixture(x, centres, w, lambda v, c: _normal_kernel(v, c, 0.2), reach=1.6)


def _log_pinwheel(x, scan=128, bisections=40, chunk=2048):
    """Change of variables summed over roots. With rho = |x| / 2 and theta the angle of x, arm
    k's latent is f = rho (cos phi, sin phi), phi = theta + 2 pi k / 5 + exp(f1) / 4, so f1
    solves g(f1) = f1 - rho cos(phi(f1)) = 0 on [-rho, rho], and
    p(x) = sum_k 1/5 sum_roots N(f1; 1, 0.3^2) N(f2; 0, 0.1^2) / (4 |1 + exp(f1) f2 / 4|)
    (g' is that same factor). Roots: sign changes of g on `scan` nodes, then bisection."""
    return torch.cat([_log_pinwheel_chunk(xc, scan, bisections) for xc in x.split(chunk)])


def _log_pinwheel_chunk(x, scan, bisections):
    rho = (x.norm(dim=1) / 2).clamp_min(1e-12)
    theta = torch.atan2(x[:, 1], x[:, 0])
    k = torch.arange(5, dtype=x.dtype, device=x.device)
    base = theta[:, None] + 2 * math.pi * k / 5  # (N, 5)

    def g(f1, b, r):
        return f1 - r * torch.cos(b + 0.25 * torch.exp(f1))

    u = torch.linspace(-1, 1, scan, dtype=x.dtype, device=x.device)
    f = rho[:, None, None] * u  # (N, 1, scan)
    gv = g(f, base[..., None], rho[:, None, None])  # (N, 5, scan)
    change = (gv[..., :-1] <= 0) & (gv[..., 1:] > 0) | (gv[..., :-1] >= 0) & (gv[..., 1:] < 0)
    n, arm, j = change.nonzero(as_tuple=True)
    lo, hi = rho[n] * u[j], rho[n] * u[j + 1]
    b, r = base[n, arm], rho[n]
    g_lo = g(lo, b, r)
    for _ in range(bisections):
        mid = 0.5 * (lo + hi)
        g_mid = g(mid, b, r)
        same = (g_mid > 0) == (g_lo > 0)
        lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
        g_lo = torch.where(same, g_mid, g_lo)
    f1 = 0.5 * (lo + hi)
    f2 = r * torch.sin(b + 0.25 * torch.exp(f1))
    log_terms = (-((f1 - 1) / 0.3) ** 2 / 2 - (f2 / 0.1) ** 2 / 2 - math.log(2 * math.pi * 0.03)
                 - math.log(4) - torch.log(torch.abs(1 + 0.25 * torch.exp(f1) * f2))
                 - math.log(5))
    return _log_scatter_sum(torch.full_like(rho, -math.inf), n, log_terms)


def _log_scatter_sum(out, index, log_terms):
    """out[i] = log sum_{j: index_j = i} exp(log_terms_j) (stable), -inf where none."""
    m = torch.full_like(out, -math.inf).scatter_reduce(0, index, log_terms, "amax")
    shifted = torch.exp(log_terms - m[index])
    s = torch.zeros_like(out).index_add_(0, index, shifted)
    return torch.where(s > 0, m + torch.log(s), out)


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
LOG_DENSITIES = {
    "8gaussians": _log_8gaussians,
    "spiral": _log_spiral,
    "2spirals": _log_2spirals,
    "checkerboard": _log_checkerboard,
    "rings": lambda x: _log_noisy_circles(x, (3.0, 2.25, 1.5, 0.75), 0.08),
    "pinwheel": _log_pinwheel,
    "moons": _log_moons,
    "circles": lambda x: _log_noisy_circles(x, (3.0, 1.5), 0.24),
    "swissroll": _log_swissroll,
    "gmm": _log_gmm,
    "rings4": _log_rings4,
}
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


@functools.lru_cache(maxsize=4)
def grid_log_density(name, bound=BOUND, n=GRID):
    """log p_data at the centres of the n x n grid on [-bound, bound]^2 (float64, shape (n*n,)),
    computed once per process, or None when unknown."""
    if not has_density(name):
        return None
    from gridmath import grid_points

    points = grid_points(bound, n, torch.float64)[0]
    return torch.cat([log_density(name, c) for c in points.split(16384)])  # chunks: less memory


@functools.lru_cache(maxsize=None)
def entropy(name, n=GRID):
    """H(p_data) = -int p log p in nats by float64 integration on the BOUND grid, or None.

    The best possible test NLL: a model's NLL is H + KL(p_data || p_model) >= H. The grid's
    cell edges lie on multiples of 0.025, so on the checkerboard's edges; the densities are
    smooth on the scale of a cell elsewhere (the narrowest noise std is 0.08)."""
    lp = grid_log_density(name, BOUND, n)
    if lp is None:
        return None
    area = (2 * BOUND / n) ** 2
    p = lp.exp()
    return float(-(p * torch.where(p > 0, lp, torch.zeros_like(lp))).sum() * area)
