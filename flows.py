"""Normalizing flows q_alpha(x) with one interface: `log_prob(x)`, `sample(n)`,
`sample_and_log_prob(n)`, `.to(device)`.

A flow is a standard normal base N(0, I) and a list of invertible transforms. Each transform
maps data towards noise:

    forward(x) -> (z, log|det dz/dx|)        inverse(z) -> (x, log|det dx/dz|)

so  log q(x) = log N(T(x); 0, I) + sum_k log|det J_k|  and sampling runs the inverses.
Samples are reparameterised: x = T^{-1}(z) with z ~ N(0, I), so gradients flow through them
(FCE's flow step needs that).

Papers:
- MADE: Germain et al. 2015. MAF: Papamakarios et al. 2017 (BatchNorm between blocks, sec. 3.4).
- Glow: Kingma & Dhariwal 2018 (ActNorm, invertible 1x1 conv in LU form, affine coupling).
- RealNVP affine coupling: Dinh et al. 2017.
- Neural spline flows (rational-quadratic splines, autoregressive and coupling): Durkan et al. 2019.

Cost of each direction (D = data dimension):
- MAF, NSF (autoregressive): density (forward) one MADE pass; sampling (inverse) D passes.
- Glow / coupling / NSF coupling: one pass either way.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from ebm import mlp

LOG_2PI = math.log(2 * math.pi)


def soft_clamp(x, bound):
    """bound * tanh(x / bound): identity near 0, never beyond +-bound (keeps exp() finite)."""
    return bound * torch.tanh(x / bound)


def std_normal_log_prob(z):
    """log N(z; 0, I) summed over the last dimension."""
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * LOG_2PI


class Flow(nn.Module):
    """Base N(0, I_D) pushed through `transforms` (listed from data side to noise side)."""

    def __init__(self, transforms, dim, spec=None):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)
        self.dim = dim
        self._spec = spec or {}
        self.register_buffer("_anchor", torch.zeros(()))  # tells device and dtype

    def forward(self, x):
        """z = T(x) and log|det dz/dx|, shape (N,)."""
        log_det = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ld = t(x)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, z):
        """x = T^{-1}(z) and log|det dx/dz|, shape (N,)."""
        log_det = z.new_zeros(z.shape[0])
        for t in reversed(self.transforms):
            z, ld = t.inverse(z)
            log_det = log_det + ld
        return z, log_det

    def log_prob(self, x):
        """log q(x) = log N(T(x)) + log|det dT/dx|."""
        z, log_det = self(x)
        return std_normal_log_prob(z) + log_det

    def sample_and_log_prob(self, n, z=None):
        """Reparameterised samples x = T^{-1}(z), z ~ N(0, I), with log q(x) from the same pass.
        `z` (n, D): base draws to push through instead of new ones."""
        if z is None:
            z = torch.randn(n, self.dim, device=self._anchor.device, dtype=self._anchor.dtype)
        x, log_det = self.inverse(z)
        return x, std_normal_log_prob(z) - log_det

    def sample(self, n):
        return self.sample_and_log_prob(n)[0]

    @torch.no_grad()
    def initialize(self, x):
        """Data-dependent initialisation (ActNorm): one density pass on a data batch."""
        self.log_prob(x)
        return self

    def spec(self):
        """Keyword arguments of `build_flow` that rebuild this flow (stored in checkpoints)."""
        return dict(self._spec)


# ----------------------------------------------------------------------------- MADE / MAF
class MaskedLinear(nn.Linear):
    """Linear layer whose weight is multiplied by a fixed 0/1 mask (MADE, eq. 10)."""

    def __init__(self, n_in, n_out, mask):
        super().__init__(n_in, n_out)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


def made_degrees(dim, hidden, reverse=False):
    """Degrees m(k) of the inputs and of each hidden layer (MADE sec. 4).

    Inputs get 1..D (or D..1 when `reverse`); hidden unit k of a layer gets
    (k mod (D - 1)) + 1, so every degree 1..D-1 is present."""
    d_in = torch.arange(1, dim + 1)
    if reverse:
        d_in = d_in.flip(0)
    degrees = [d_in]
    for h in hidden:
        degrees.append(torch.arange(h) % max(dim - 1, 1) + 1)
    return degrees


class MADE(nn.Module):
    """Masked autoencoder: outputs[..., i] depend only on inputs x_j of lower degree.

    Hidden masks connect k <- j iff m(k) >= m(j); output masks connect i <- k iff m(i) > m(k).
    Returns `n_params` tensors of shape (N, D) (e.g. shift and log-scale of an affine MAF)."""

    def __init__(self, dim, hidden=(64, 64), n_params=2, act="relu", reverse=False):
        super().__init__()
        self.dim, self.n_params = dim, n_params
        deg = made_degrees(dim, hidden, reverse)
        self.input_degrees = deg[0]
        layers = []
        for d_prev, d_next in zip(deg[:-1], deg[1:]):
            mask = (d_next[:, None] >= d_prev[None, :])
            layers += [MaskedLinear(len(d_prev), len(d_next), mask), _act(act)]
        out_deg = deg[0].repeat(n_params)
        out_mask = out_deg[:, None] > deg[-1][None, :]
        self.out = MaskedLinear(len(deg[-1]), dim * n_params, out_mask)
        nn.init.zeros_(self.out.weight)  # start as the identity transform
        nn.init.zeros_(self.out.bias)
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        h = self.out(self.body(x))
        return h.view(x.shape[0], self.n_params, self.dim).unbind(1)


def _act(name):
    from ebm import ACTIVATIONS

    return ACTIVATIONS[name]()


class MAFLayer(nn.Module):
    """Affine autoregressive transform (MAF eq. 4): z_i = (x_i - mu_i(x_<i)) exp(-alpha_i(x_<i)).

    Density direction (forward): one MADE pass. Sampling direction (inverse): D passes, since
    x_i needs x_<i first. alpha is soft-clamped to +-`bound` so exp(alpha) stays finite."""

    def __init__(self, dim, hidden=(64, 64), act="relu", reverse=False, bound=6.0):
        super().__init__()
        self.made = MADE(dim, hidden, 2, act, reverse)
        self.bound = bound

    def _mu_alpha(self, x):
        mu, alpha = self.made(x)
        return mu, soft_clamp(alpha, self.bound)

    def forward(self, x):
        mu, alpha = self._mu_alpha(x)
        return (x - mu) * torch.exp(-alpha), -alpha.sum(-1)

    def inverse(self, z):
        # pass k fixes the coordinate of degree k. The first pass sees x = 0 in every row,
        # so it runs on one row and broadcasts: D - 1 full passes instead of D.
        mu, alpha = self._mu_alpha(z.new_zeros(1, z.shape[-1]))
        x = z * torch.exp(alpha) + mu
        for _ in range(z.shape[-1] - 1):
            mu, alpha = self._mu_alpha(x)
            x = z * torch.exp(alpha) + mu
        return x, alpha.sum(-1).expand(z.shape[0])


class BatchNormFlow(nn.Module):
    """Batch normalisation as a flow (MAF sec. 3.4, RealNVP sec. 3.7):
    z = (x - m) / sqrt(v + eps) * exp(log_gamma) + beta.

    A training-mode density pass first moves the running averages (m, v) towards the batch's
    statistics, then every pass, density or sampling, in either mode, uses the running
    averages. So the transform is one fixed invertible map at any moment and log_prob agrees
    with sample_and_log_prob and with eval mode (normalising with the batch's own statistics,
    as the MAF paper does, makes the training-mode density of a point depend on the rest of
    its batch). Gradients reach log_gamma and beta, not the statistics."""

    def __init__(self, dim, momentum=0.05, eps=1e-5):
        super().__init__()
        self.log_gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x):
        if self.training and x.shape[0] > 1:
            with torch.no_grad():
                self.running_mean.lerp_(x.mean(0), self.momentum)
                self.running_var.lerp_(x.var(0, unbiased=False), self.momentum)
        m, v = self.running_mean, self.running_var
        log_scale = self.log_gamma - 0.5 * torch.log(v + self.eps)
        z = (x - m) * torch.exp(log_scale) + self.beta
        return z, log_scale.sum().expand(x.shape[0])

    def inverse(self, z):
        log_scale = self.log_gamma - 0.5 * torch.log(self.running_var + self.eps)
        x = (z - self.beta) * torch.exp(-log_scale) + self.running_mean
        return x, (-log_scale).sum().expand(z.shape[0])


# ----------------------------------------------------------------------------- Glow
class ActNorm(nn.Module):
    """z = (x - loc) * exp(-log_scale), per dimension (Glow sec. 3.1).

    Data-dependent init: the first density pass sets loc and log_scale to the batch mean and
    log std, so z starts standardised. A dimension whose batch std is below 1e-3 keeps scale 1
    (a constant batch would otherwise give log_scale = -inf)."""

    def __init__(self, dim):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _init(self, x):
        std = x.std(0) if x.shape[0] > 1 else torch.ones_like(x[0])
        std = torch.where(torch.isfinite(std) & (std > 1e-3), std, torch.ones_like(std))
        self.loc.copy_(x.mean(0))
        self.log_scale.copy_(std.log())
        self.initialized.fill_(True)

    def forward(self, x):
        if not self.initialized:
            self._init(x)
        z = (x - self.loc) * torch.exp(-self.log_scale)
        return z, (-self.log_scale.sum()).expand(x.shape[0])

    def inverse(self, z):
        x = z * torch.exp(self.log_scale) + self.loc
        return x, self.log_scale.sum().expand(z.shape[0])


class InvertibleLinearLU(nn.Module):
    """z = W x with W = P L (U + diag(sign(s) exp(log|s|))) (Glow sec. 3.2, LU form):
    log|det W| = sum log|s| costs O(D); P is a fixed permutation, L unit lower-triangular."""

    def __init__(self, dim):
        super().__init__()
        w = torch.linalg.qr(torch.randn(dim, dim))[0]
        P, L, U = torch.linalg.lu(w)
        s = torch.diagonal(U)
        self.register_buffer("P", P)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(dim, dim), -1))
        self.L = nn.Parameter(L)
        self.U = nn.Parameter(torch.triu(U, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def weight(self):
        eye = torch.eye(self.P.shape[0], dtype=self.L.dtype, device=self.L.device)
        L = self.L * self.lower_mask + eye
        U = self.U * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.P @ L @ U

    def forward(self, x):
        return x @ self.weight().T, self.log_s.sum().expand(x.shape[0])

    def inverse(self, z):
        return z @ torch.linalg.inv(self.weight()).T, (-self.log_s.sum()).expand(z.shape[0])


class AffineCoupling(nn.Module):
    """RealNVP/Glow affine coupling: x = (x_a, x_b), x_a passes unchanged and
    z_b = (x_b - t(x_a)) exp(-s(x_a)); one pass either way, log|det| = -sum s.

    s is soft-clamped to +-`bound`. `swap` conditions on the second half instead of the first.
    `affine=False` gives NICE's additive coupling (s = 0)."""

    def __init__(self, dim, hidden=(64, 64), act="silu", swap=False, bound=4.0, affine=True):
        super().__init__()
        self.d_a = dim // 2 if not swap else dim - dim // 2
        self.swap, self.bound, self.affine = swap, bound, affine
        self.net = mlp([self.d_a, *hidden, 2 * (dim - self.d_a)], act)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _split(self, x):
        if self.swap:
            x = x.flip(-1)
        return x[:, : self.d_a], x[:, self.d_a:]

    def _join(self, a, b):
        x = torch.cat([a, b], -1)
        return x.flip(-1) if self.swap else x

    def _shift_log_scale(self, a):
        t, s = self.net(a).chunk(2, -1)
        return t, (soft_clamp(s, self.bound) if self.affine else torch.zeros_like(s))

    def forward(self, x):
        a, b = self._split(x)
        t, s = self._shift_log_scale(a)
        return self._join(a, (b - t) * torch.exp(-s)), -s.sum(-1)

    def inverse(self, z):
        a, b = self._split(z)
        t, s = self._shift_log_scale(a)
        return self._join(a, b * torch.exp(s) + t), s.sum(-1)


# ----------------------------------------------------------------------------- neural splines
def _rq_knots(unnorm, bound, min_size):
    """Knot positions -B = k_0 < ... < k_K = B from unnormalised bin sizes (..., K): softmax,
    floored at `min_size` of the interval, then cumulated. Returns (knots, sizes)."""
    K = unnorm.shape[-1]
    sizes = min_size + (1 - min_size * K) * torch.softmax(unnorm, -1)
    knots = F.pad(torch.cumsum(sizes, -1), (1, 0))
    knots = 2 * bound * knots - bound
    knots = torch.cat([knots[..., :1].new_full(knots[..., :1].shape, -bound), knots[..., 1:-1],
                       knots[..., :1].new_full(knots[..., :1].shape, bound)], -1)
    return knots, knots[..., 1:] - knots[..., :-1]


RQ_MIN_BIN, RQ_MIN_DERIV = 1e-3, 1e-3
RQ_DERIV_SHIFT = math.log(math.expm1(1 - RQ_MIN_DERIV))  # softplus^{-1}(1 - min): d = 1 at 0


def rational_quadratic_spline(x, params, bound, inverse=False):
    """Monotonic rational-quadratic spline with linear (identity) tails (Durkan et al. 2019,
    "Neural Spline Flows", eq. 4-8 and appendix A), elementwise on x (..., D).

    params (..., D, 3K - 1): K unnormalised widths, K heights and K - 1 inner derivatives;
    the boundary derivatives are 1, so the map is C^1 at +-bound where it meets the identity.
    In bin k with xi = (x - x_k) / w_k, s_k = h_k / w_k:

        y = y_k + h_k (s_k xi^2 + d_k xi (1 - xi)) / (s_k + (d_{k+1} + d_k - 2 s_k) xi (1 - xi))

    Returns (y, log|dy/dx|) elementwise; with `inverse`, solves the quadratic for xi given y
    and returns (x, log|dx/dy|). All-zero params give the identity."""
    K = (params.shape[-1] + 1) // 3
    w_un, h_un, d_un = params[..., :K], params[..., K:2 * K], params[..., 2 * K:]
    xk, w = _rq_knots(w_un, bound, RQ_MIN_BIN)
    yk, h = _rq_knots(h_un, bound, RQ_MIN_BIN)
    d = RQ_MIN_DERIV + F.softplus(d_un + RQ_DERIV_SHIFT)
    d = F.pad(d, (1, 1), value=1.0)
    inside = (x > -bound) & (x < bound)
    xc = x.clamp(-bound, bound)
    knots_in = (yk if inverse else xk)[..., 1:-1].contiguous()
    k = torch.searchsorted(knots_in, xc[..., None], right=True)  # bin index 0..K-1
    pick = lambda t: t.gather(-1, k)[..., 0]  # noqa: E731
    x_k, w_k, y_k, h_k = pick(xk), pick(w), pick(yk), pick(h)
    d_k, d_k1 = pick(d), d[..., 1:].gather(-1, k)[..., 0]
    s_k = h_k / w_k
    if inverse:
        dy = xc - y_k
        a = h_k * (s_k - d_k) + dy * (d_k1 + d_k - 2 * s_k)
        b = h_k * d_k - dy * (d_k1 + d_k - 2 * s_k)
        c = -s_k * dy
        disc = (b * b - 4 * a * c).clamp_min(0)
        xi = ((2 * c) / (-b - torch.sqrt(disc))).clamp(0, 1)
        out = xi * w_k + x_k
    else:
        xi = ((xc - x_k) / w_k).clamp(0, 1)
        num = h_k * (s_k * xi * xi + d_k * xi * (1 - xi))
        out = y_k + num / (s_k + (d_k1 + d_k - 2 * s_k) * xi * (1 - xi))
    denom = s_k + (d_k1 + d_k - 2 * s_k) * xi * (1 - xi)
    log_dydx = (2 * torch.log(s_k) + torch.log(d_k1 * xi * xi + 2 * s_k * xi * (1 - xi)
                                                + d_k * (1 - xi) ** 2) - 2 * torch.log(denom))
    log_det = -log_dydx if inverse else log_dydx
    return torch.where(inside, out, x), torch.where(inside, log_det, torch.zeros_like(x))


def _check_spline(bins, bound):
    if not (isinstance(bins, int) and bins >= 1):
        raise ValueError(f"a spline needs at least 1 bin, got bins={bins!r}; pass --nsf_bins 8")
    if not (bound > 0 and math.isfinite(bound)):
        raise ValueError(f"the spline interval [-B, B] needs B > 0, got {bound!r}; "
                         f"pass --nsf_bound 5")


class SplineAutoregressive(nn.Module):
    """Autoregressive rational-quadratic spline (NSF-AR, Durkan et al. 2019 sec. 3.2): z_i is the
    spline of x_i whose 3K - 1 parameters a MADE computes from x_<i.

    Density direction (forward): one MADE pass. Sampling (inverse): D passes, as in MAF."""

    def __init__(self, dim, hidden=(64, 64), bins=8, bound=5.0, act="relu", reverse=False):
        super().__init__()
        _check_spline(bins, bound)
        self.made = MADE(dim, hidden, 3 * bins - 1, act, reverse)
        self.bound = bound

    def _params(self, x):
        return torch.stack(self.made(x), -1)  # (N, D, 3K - 1)

    def forward(self, x):
        z, ld = rational_quadratic_spline(x, self._params(x), self.bound)
        return z, ld.sum(-1)

    def inverse(self, z):
        x = torch.zeros_like(z)
        for _ in range(z.shape[-1]):  # pass k fixes the coordinate of degree k
            x, ld = rational_quadratic_spline(z, self._params(x), self.bound, inverse=True)
        return x, ld.sum(-1)


class SplineCoupling(nn.Module):
    """Rational-quadratic spline coupling (NSF-C, Durkan et al. 2019 sec. 3.1): x = (x_a, x_b),
    x_a passes unchanged and z_b is the spline of x_b with parameters from an MLP of x_a.
    One pass in either direction; `swap` conditions on the second half instead."""

    def __init__(self, dim, hidden=(64, 64), bins=8, bound=5.0, act="relu", swap=False):
        super().__init__()
        _check_spline(bins, bound)
        self.d_a = dim // 2 if not swap else dim - dim // 2
        self.swap, self.bound, self.n_p = swap, bound, 3 * bins - 1
        self.net = mlp([self.d_a, *hidden, (dim - self.d_a) * self.n_p], act)
        nn.init.zeros_(self.net[-1].weight)  # start as the identity transform
        nn.init.zeros_(self.net[-1].bias)

    def _run(self, x, inverse):
        if self.swap:
            x = x.flip(-1)
        a, b = x[:, : self.d_a], x[:, self.d_a:]
        params = self.net(a).view(x.shape[0], b.shape[1], self.n_p)
        b, ld = rational_quadratic_spline(b, params, self.bound, inverse)
        x = torch.cat([a, b], -1)
        return (x.flip(-1) if self.swap else x), ld.sum(-1)

    def forward(self, x):
        return self._run(x, False)

    def inverse(self, z):
        return self._run(z, True)


# ----------------------------------------------------------------------------- fixed noise
class AffineGaussian(nn.Module):
    """Fixed affine map x = mu + L z (L the Cholesky factor of the covariance): the transform
    that turns N(0, I) into N(mu, L L^T). No parameters: NCE's noise distribution."""

    def __init__(self, mean, cov):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("chol", torch.linalg.cholesky(cov))

    def forward(self, x):
        z = torch.linalg.solve_triangular(self.chol, (x - self.mean).T, upper=False).T
        return z, -torch.log(torch.diagonal(self.chol)).sum().expand(x.shape[0])

    def inverse(self, z):
        x = self.mean + z @ self.chol.T
        return x, torch.log(torch.diagonal(self.chol)).sum().expand(z.shape[0])


# ----------------------------------------------------------------------------- builders
def maf(dim=2, n_blocks=5, hidden=(64, 64), act="relu", batch_norm=False):
    """MAF: `n_blocks` MADE layers with the variable order reversed between blocks, optionally
    BatchNorm between them (MAF paper sec. 3.4)."""
    layers = []
    for i in range(n_blocks):
        layers.append(MAFLayer(dim, hidden, act, reverse=bool(i % 2)))
        if batch_norm and i < n_blocks - 1:
            layers.append(BatchNormFlow(dim))
    spec = {"name": "maf", "dim": dim, "n_blocks": n_blocks, "hidden": list(hidden), "act": act,
            "batch_norm": batch_norm}
    return Flow(layers, dim, spec)


def glow(dim=2, n_steps=10, hidden=(64, 64), act="silu"):
    """Glow: `n_steps` of ActNorm -> invertible linear (LU) -> affine coupling."""
    layers = []
    for i in range(n_steps):
        layers += [ActNorm(dim), InvertibleLinearLU(dim),
                   AffineCoupling(dim, hidden, act, swap=bool(i % 2))]
    spec = {"name": "glow", "dim": dim, "n_steps": n_steps, "hidden": list(hidden), "act": act}
    return Flow(layers, dim, spec)


def gaussian(dim=2, mean=None, cov=None):
    """Fixed N(mean, cov) as a Flow (defaults N(0, I)); fit it with `gaussian_fit(data)`."""
    mean = torch.zeros(dim) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
    cov = torch.eye(dim) if cov is None else torch.as_tensor(cov, dtype=torch.float32)
    return Flow([AffineGaussian(mean, cov)], dim, {"name": "gaussian", "dim": dim})


def gaussian_fit(data):
    """N(mean, cov) with the sample mean and covariance of `data` (N, D)."""
    x = data.double()
    return gaussian(x.shape[1], x.mean(0).float(), torch.cov(x.T).float())


def nsf(dim=2, n_blocks=5, hidden=(64, 64), bins=8, bound=5.0, act="relu"):
    """Autoregressive neural spline flow: `n_blocks` MADE-conditioned rational-quadratic splines
    on [-bound, bound] (identity outside), variable order reversed between blocks."""
    layers = [SplineAutoregressive(dim, hidden, bins, bound, act, reverse=bool(i % 2))
              for i in range(n_blocks)]
    spec = {"name": "nsf", "dim": dim, "n_blocks": n_blocks, "hidden": list(hidden),
            "bins": bins, "bound": bound, "act": act}
    return Flow(layers, dim, spec)


def nsf_coupling(dim=2, n_blocks=8, hidden=(64, 64), bins=8, bound=5.0, act="relu"):
    """Coupling neural spline flow: `n_blocks` rational-quadratic spline couplings, alternating
    which half is transformed."""
    layers = [SplineCoupling(dim, hidden, bins, bound, act, swap=bool(i % 2))
              for i in range(n_blocks)]
    spec = {"name": "nsf_coupling", "dim": dim, "n_blocks": n_blocks, "hidden": list(hidden),
            "bins": bins, "bound": bound, "act": act}
    return Flow(layers, dim, spec)


BUILDERS = {"maf": maf, "glow": glow, "nsf": nsf, "nsf_coupling": nsf_coupling,
            "gaussian": gaussian}


def build_flow(name, data=None, **kwargs):
    """Build flow `name` (a key of BUILDERS); with `data`, fit the Gaussian to it or
    run the data-dependent initialisation. kwargs go to the builder (see `Flow.spec()`)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown flow {name!r}; choose one of: {', '.join(BUILDERS)}")
    if name == "gaussian" and data is not None:
        return gaussian_fit(data)
    flow = BUILDERS[name](**kwargs)
    return flow.initialize(data) if data is not None else flow


def flow_from_spec(spec):
    """Rebuild an (untrained) flow from `Flow.spec()`; load the state_dict afterwards."""
    spec = dict(spec)
    return build_flow(spec.pop("name"), **spec)


# ============================================================================= VI flows
# Flows for variational inference: fit q_K to an unnormalised p(z) ∝ exp(-U(z)) by reverse KL
# (Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows", sec. 6.1; train_vi.py).
# VI needs the *sampling* direction z0 -> z_K with log q of its own samples, so each
# transform's `inverse` (noise -> data) is the paper's f_k and costs one pass. The density
# direction `forward` (data -> noise, for Flow.log_prob on given points) is:
#   Planar  f(z) = z + u_hat tanh(w.z + b): numerical inverse (1D bisection along w, exact).
#   Radial  f(z) = z + beta h(alpha, r)(z - z0): closed-form inverse (a quadratic in r).
#   IAF     x = z exp(alpha(z)) + mu(z): the core's MADE run on the noise side; sampling is
#           one pass, the density of arbitrary points D passes (MAF the other way round).
#   NICE / RealNVP: AffineCoupling (affine=False is NICE's additive coupling), one pass both.
# The base q0 is N(0, I) ("fixed") or a learnable diagonal Gaussian ("learned", the
# GaussianBase transform on the noise side; for NICE it plays the role of the final scaling).
# PlanarStack trains T targets' planar flows as one batched module (leading target dimension,
# bmm), which removes most of the per-op overhead that dominates planar flows on CPU.
LOG_E_MINUS_1 = math.log(math.e - 1)  # softplus^{-1}(1): m(w.u) = 0 when w.u = this


class GaussianBase(nn.Module):
    """Learnable diagonal Gaussian base q0 = N(mu, diag(sigma^2)) as a transform on the noise
    side: sampling x = mu + sigma z with z ~ N(0, I), log|det dx/dz| = sum log sigma."""

    def __init__(self, dim):
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(dim))
        self.log_sigma = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return (x - self.mu) * torch.exp(-self.log_sigma), (-self.log_sigma.sum()).expand(x.shape[0])

    def inverse(self, z):
        return self.mu + z * torch.exp(self.log_sigma), self.log_sigma.sum().expand(z.shape[0])


def planar_m(x):
    """m(x) = -1 + softplus(x) > -1 (R&M appendix A.1)."""
    return F.softplus(x) - 1


def planar_u_hat(u, w):
    """u_hat = u + (m(w.u) - w.u) w / |w|^2 (R&M appendix A.1; the norm is *squared*), so that
    w . u_hat = m(w.u) > -1 and f is invertible. Any leading dimensions (..., D)."""
    wu = (w * u).sum(-1, keepdim=True)
    w2 = (w * w).sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)  # only w == 0
    return u + (planar_m(wu) - wu) * w / w2


def planar_w_dot_u_hat(u, w):
    """w . u_hat computed exactly as m(w . u) >= -1 (the dot product of the computed u_hat can
    round below -1 when |w||u| is huge; the log-det uses this value instead).

    At w = 0 the layer is the translation z + u tanh(b) and w . u_hat = 0, not m(0) = -0.31
    (and for |w|^2 below the smallest normal float, where planar_u_hat divides by that float
    instead of |w|^2, it is the dot product of the u_hat actually used)."""
    wu, w2 = (w * u).sum(-1), (w * w).sum(-1)
    tiny = torch.finfo(w.dtype).tiny
    m = planar_m(wu)
    return torch.where(w2 >= tiny, m, wu + (m - wu) * (w2.clamp_max(tiny) / tiny))


def _init_planar(u, w, b, scale=1.0):
    """w ~ N(0, scale^2 I), b = 0, u = softplus^{-1}(1) w / |w|^2 + N(0, 0.01^2): then
    w.u_hat = m(w.u) ~ 0 and u_hat ~ 0, so every layer starts near the identity (plain small
    random u, w would give w.u_hat ~ m(0) = -0.31, a contraction by every layer)."""
    with torch.no_grad():
        w.normal_(0, scale)
        b.zero_()
        u.copy_(LOG_E_MINUS_1 * w / (w * w).sum(-1, keepdim=True) + 0.01 * torch.randn_like(u))


class Planar(nn.Module):
    """Planar flow (R&M eq. 10-12): x = f(z) = z + u_hat tanh(w.z + b),
    log|det df/dz| = log|1 + u_hat . psi(z)| with psi = tanh'(w.z + b) w, i.e.
    log(1 + (w.u_hat) sech^2(w.z + b)) (> 0 inside the log since w.u_hat > -1).

    `inverse` (sampling) is f, one pass. `forward` (density) inverts f numerically: along w,
    a = w.z + b solves a + (w.u_hat) tanh(a) = w.x + b, a strictly increasing 1D equation with
    |a - (w.x + b)| <= |w.u_hat|, solved by float64 bisection to machine precision, then one
    Newton step with autograd so gradients are those of the exact inverse; z = x - u_hat tanh(a).
    """

    def __init__(self, dim):
        super().__init__()
        self.u = nn.Parameter(torch.empty(dim))
        self.w = nn.Parameter(torch.empty(dim))
        self.b = nn.Parameter(torch.empty(()))
        _init_planar(self.u, self.w, self.b)

    def u_hat(self):
        return planar_u_hat(self.u, self.w)

    def inverse(self, z):
        u_hat = self.u_hat()
        t = torch.tanh(z @ self.w + self.b)
        log_det = torch.log1p(planar_w_dot_u_hat(self.u, self.w) * (1 - t * t))
        return z + t[:, None] * u_hat, log_det

    def forward(self, x, iters=80):
        u_hat = self.u_hat()
        c = planar_w_dot_u_hat(self.u, self.w)
        y = x @ self.w + self.b
        with torch.no_grad():
            y64, c64 = y.double(), c.double()
            lo, hi = y64 - c64.abs() - 1e-12, y64 + c64.abs() + 1e-12
            for _ in range(iters):
                mid = 0.5 * (lo + hi)
                below = mid + c64 * torch.tanh(mid) < y64
                lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
            a0 = (0.5 * (lo + hi)).to(x.dtype)
        t0 = torch.tanh(a0)
        a = a0 - (a0 + c * t0 - y) / (1 + c * (1 - t0 * t0))  # zero at a0; carries the gradient
        t = torch.tanh(a)
        return x - t[:, None] * u_hat, -torch.log1p(c * (1 - t * t))


class Radial(nn.Module):
    """Radial flow (R&M eq. 14): x = f(z) = z + beta h(alpha, r)(z - z0), r = |z - z0|,
    h = 1 / (alpha + r), with alpha = softplus(a) > 0 and beta = -alpha + softplus(b') >= -alpha
    (the invertibility condition) by reparametrisation. Exact log-det:
        log|det df/dz| = (D - 1) log(1 + beta h) + log(1 + beta h + beta h'(r) r)
                       = (D - 1) log(1 + beta h) + log(1 + beta alpha / (alpha + r)^2).

    Both directions are closed form: |x - z0| = r (1 + beta / (alpha + r)) is a quadratic in r,
    r = 2 r' alpha / (c + sqrt(c^2 + 4 r' alpha)) with c = alpha + beta - r' (the stable root)."""

    def __init__(self, dim):
        super().__init__()
        self.z0 = nn.Parameter(torch.randn(dim))
        self.a = nn.Parameter(torch.randn(()))
        # softplus(b_raw) = alpha + small: beta ~ 0, each layer starts near the identity
        self.b_raw = nn.Parameter(self.a.detach() + 0.01 * torch.randn(()))

    def alpha_beta(self):
        alpha = F.softplus(self.a)
        return alpha, F.softplus(self.b_raw) - alpha

    def _log_det(self, r, alpha, beta):
        bh = beta / (alpha + r)
        d = self.z0.shape[0]
        return (d - 1) * torch.log1p(bh) + torch.log1p(beta * alpha / (alpha + r) ** 2)

    def inverse(self, z):
        alpha, beta = self.alpha_beta()
        dz = z - self.z0
        r = dz.norm(dim=-1)
        return z + (beta / (alpha + r))[:, None] * dz, self._log_det(r, alpha, beta)

    def forward(self, x):
        alpha, beta = self.alpha_beta()
        dx = x - self.z0
        r_out = dx.norm(dim=-1)
        c = alpha + beta - r_out
        disc = torch.sqrt(c * c + 4 * r_out * alpha)
        r = torch.where(c > 0, 2 * r_out * alpha / (c + disc), 0.5 * (disc - c))
        z = self.z0 + dx / (1 + beta / (alpha + r))[:, None]
        return z, -self._log_det(r, alpha, beta)


class IAFLayer(MAFLayer):
    """Inverse autoregressive flow (Kingma et al. 2016), affine form: the core's MADE run on the
    noise side, x_i = z_i exp(alpha_i(z_<i)) + mu_i(z_<i), log|det dx/dz| = sum alpha.

    Sampling (`inverse`) and log q of its own samples: one MADE pass. Density of arbitrary x
    (`forward`): D passes, since z_i needs z_<i first. Same network and soft clamp as
    `MAFLayer`, with the cheap and the sequential direction swapped."""

    def inverse(self, z):
        mu, alpha = self._mu_alpha(z)
        return z * torch.exp(alpha) + mu, alpha.sum(-1)

    def forward(self, x):
        z = torch.zeros_like(x)
        for _ in range(x.shape[-1]):  # pass k fixes the coordinate of degree k
            mu, alpha = self._mu_alpha(z)
            z = (x - mu) * torch.exp(-alpha)
        return z, -alpha.sum(-1)


def _vi_flow(layers, dim, base, spec):
    """A Flow applying `layers` in sampling order z0 -> z_K after the base q0."""
    if base not in ("learned", "fixed"):
        raise ValueError(f"unknown base {base!r}; choose 'learned' or 'fixed'")
    layers = ([GaussianBase(dim)] if base == "learned" else []) + list(layers)
    return Flow(layers[::-1], dim, spec)  # Flow lists transforms from data side to noise side


def planar(dim=2, K=32, base="learned"):
    """K planar layers (R&M sec. 4.1) on a learnable (or fixed N(0, I)) Gaussian base."""
    return _vi_flow([Planar(dim) for _ in range(K)], dim, base,
                    {"name": "planar", "dim": dim, "K": K, "base": base})


def radial(dim=2, K=32, base="learned"):
    """K radial layers (R&M sec. 4.1)."""
    return _vi_flow([Radial(dim) for _ in range(K)], dim, base,
                    {"name": "radial", "dim": dim, "K": K, "base": base})


def iaf(dim=2, K=4, hidden=(64, 64), act="relu", base="learned"):
    """K affine IAF layers, variable order reversed between layers."""
    layers = [IAFLayer(dim, hidden, act, reverse=bool(k % 2)) for k in range(K)]
    return _vi_flow(layers, dim, base, {"name": "iaf", "dim": dim, "K": K,
                                        "hidden": list(hidden), "act": act, "base": base})


def realnvp(dim=2, K=8, hidden=(64, 64), act="silu", base="learned"):
    """K RealNVP affine couplings (Dinh et al. 2017), alternating halves."""
    layers = [AffineCoupling(dim, hidden, act, swap=bool(k % 2)) for k in range(K)]
    return _vi_flow(layers, dim, base, {"name": "realnvp", "dim": dim, "K": K,
                                        "hidden": list(hidden), "act": act, "base": base})


def nice(dim=2, K=8, hidden=(64, 64), act="silu", base="learned"):
    """K NICE additive couplings (Dinh et al. 2015; volume preserving, log-det 0): the learned
    diagonal base is NICE's final scaling layer, the only source of volume change."""
    layers = [AffineCoupling(dim, hidden, act, swap=bool(k % 2), affine=False) for k in range(K)]
    return _vi_flow(layers, dim, base, {"name": "nice", "dim": dim, "K": K,
                                        "hidden": list(hidden), "act": act, "base": base})


def spline(dim=2, K=4, hidden=(64, 64), act="relu", bins=8, bound=5.0, base="learned"):
    """K rational-quadratic spline couplings (NSF-C) for VI, alternating halves: one pass in
    the sampling direction and for log q of its own samples."""
    layers = [SplineCoupling(dim, hidden, bins, bound, act, swap=bool(k % 2)) for k in range(K)]
    return _vi_flow(layers, dim, base, {"name": "spline", "dim": dim, "K": K,
                                        "hidden": list(hidden), "act": act, "bins": bins,
                                        "bound": bound, "base": base})


class FlowStack(nn.Module):
    """T independent flows q_1..q_T, one per target, trained in one loop:
    `sample_and_log_prob(n)` returns x (T, n, D) and log q (T, n); `flow(t)` is q_t as a Flow.
    This generic version runs the flows one after another (the straightforward loop)."""

    def __init__(self, flows, spec):
        super().__init__()
        self.flows = nn.ModuleList(flows)
        self._spec = spec

    def __len__(self):
        return len(self.flows)

    def flow(self, t):
        return self.flows[t]

    def sample_and_log_prob(self, n):
        xs, lqs = zip(*(f.sample_and_log_prob(n) for f in self.flows))
        return torch.stack(xs), torch.stack(lqs)

    def log_prob(self, x):
        """log q_t(x) for every t: (T, N) from x (N, D)."""
        return torch.stack([f.log_prob(x) for f in self.flows])

    def spec(self):
        return dict(self._spec)


class PlanarStack(FlowStack):
    """T planar flows of K layers as one batched module: parameters u, w (T, K, D), b (T, K),
    base mu, log_sigma (T, D). u_hat for all layers is computed in one vectorised call and each
    layer is two batched matrix products, so a step costs about the op count of a single flow
    whatever T is (planar flows are op-overhead bound on CPU). Same maths as `Planar`;
    `flow(t)` returns target t's flow as a plain `Flow` of `Planar` layers."""

    def __init__(self, n_targets, dim=2, K=32, base="learned", spec=None):
        nn.Module.__init__(self)
        T = n_targets
        self.T, self.dim, self.K, self.base = T, dim, K, base
        self.u = nn.Parameter(torch.empty(T, K, dim))
        self.w = nn.Parameter(torch.empty(T, K, dim))
        self.b = nn.Parameter(torch.empty(T, K))
        _init_planar(self.u, self.w, self.b)
        self.mu = nn.Parameter(torch.zeros(T, dim), requires_grad=base == "learned")
        self.log_sigma = nn.Parameter(torch.zeros(T, dim), requires_grad=base == "learned")
        self._spec = spec or {}

    def __len__(self):
        return self.T

    def sample_and_log_prob(self, n, z=None):
        """x (T, n, D) and log q_K(x) (T, n); z (T, n, D) ~ N(0, I) unless given."""
        if z is None:
            z = torch.randn(self.T, n, self.dim, device=self.u.device, dtype=self.u.dtype)
        log_q0 = std_normal_log_prob(z) - self.log_sigma.sum(-1, keepdim=True)
        x = self.mu[:, None] + z * torch.exp(self.log_sigma)[:, None]
        u_hat = planar_u_hat(self.u, self.w)            # (T, K, D)
        c = planar_w_dot_u_hat(self.u, self.w)           # w . u_hat, (T, K)
        w_col = self.w.unsqueeze(-1)                      # (T, K, D, 1)
        u_row = u_hat.unsqueeze(2)                        # (T, K, 1, D)
        b = self.b[:, :, None, None]                      # (T, K, 1, 1)
        log_det = []
        for k in range(self.K):
            t = torch.tanh(torch.baddbmm(b[:, k], x, w_col[:, k]))     # (T, n, 1)
            x = torch.baddbmm(x, t, u_row[:, k])                        # x + t u_hat^T
            log_det.append(torch.log1p(c[:, k, None, None] * (1 - t * t)))
        if not log_det:
            return x, log_q0
        return x, log_q0 - torch.cat(log_det, -1).sum(-1)

    def flow(self, t):
        f = planar(self.dim, self.K, self.base)
        layers = list(f.transforms)[::-1]                # sampling order: base, layer 0, ...
        with torch.no_grad():
            if self.base == "learned":
                layers[0].mu.copy_(self.mu[t])
                layers[0].log_sigma.copy_(self.log_sigma[t])
                layers = layers[1:]
            for k, layer in enumerate(layers):
                layer.u.copy_(self.u[t, k])
                layer.w.copy_(self.w[t, k])
                layer.b.copy_(self.b[t, k])
        return f.to(self.u.device)

    def log_prob(self, x):
        return torch.stack([self.flow(t).log_prob(x) for t in range(self.T)])


def stack(flow_spec, n_targets, batched=True):
    """T copies of the flow described by `flow_spec` (a `Flow.spec()` dict), one per target:
    a batched PlanarStack for planar flows when `batched`, else a FlowStack loop."""
    flow_spec = dict(flow_spec)
    spec = {"name": "stack", "flow_spec": dict(flow_spec), "n_targets": n_targets,
            "batched": batched}
    name = flow_spec.pop("name")
    if name == "planar" and batched:
        return PlanarStack(n_targets, spec=spec, **flow_spec)
    return FlowStack([build_flow(name, **flow_spec) for _ in range(n_targets)], spec)


BUILDERS.update({"planar": planar, "radial": radial, "iaf": iaf, "realnvp": realnvp,
                 "nice": nice, "spline": spline, "stack": stack})
VI_FLOWS = ("planar", "radial", "iaf", "realnvp", "nice", "spline")
