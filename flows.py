"""Normalizing flows for density estimation, q_alpha(x) with one interface: `log_prob(x)`,
`sample(n)`, `sample_and_log_prob(n)`, `.to(device)`. The flows fit by reverse KL (planar,
radial, IAF, ...) live in vi_flows.py, the spline maths in splines.py.

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

Example:
    >>> flow = build_flow("maf", n_blocks=2, hidden=(16, 16))
    >>> x, log_q = flow.sample_and_log_prob(8)       # (8, 2), (8,)
    >>> same = flow_from_spec(flow.spec())           # rebuilt; then load_state_dict
"""
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ebm import mlp
from splines import check_spline, rational_quadratic_spline

LOG_2PI = math.log(2 * math.pi)


def soft_clamp(x: Tensor, bound: float) -> Tensor:
    """bound * tanh(x / bound): identity near 0, never beyond +-bound (keeps exp() finite)."""
    return bound * torch.tanh(x / bound)


def std_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * LOG_2PI


class Flow(nn.Module):
    """Base N(0, I_D) pushed through `transforms` (listed from data side to noise side)."""

    def __init__(self, transforms: Sequence[nn.Module], dim: int,
                 spec: Optional[Mapping[str, Any]] = None):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)
        self.dim = dim
        self._spec = spec or {}
        self.register_buffer("_anchor", torch.zeros(()))  # tells device and dtype

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Density direction: z = T(x) (N, D) and log|det dz/dx| (N,) for x (N, D)."""
        log_det = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ld = t(x)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Sampling direction: x = T^{-1}(z) (N, D) and log|det dx/dz| (N,) for z (N, D)."""
        log_det = z.new_zeros(z.shape[0])
        for t in reversed(self.transforms):
            z, ld = t.inverse(z)
            log_det = log_det + ld
        return z, log_det

    def log_prob(self, x: Tensor) -> Tensor:
        """log q(x) = log N(T(x); 0, I) + log|det dT/dx|, shape (N,) for x (N, D)."""
        z, log_det = self(x)
        return std_normal_log_prob(z) + log_det

    def sample_and_log_prob(self, n: int, z: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Reparameterised samples x (n, D) = T^{-1}(z), z ~ N(0, I), with log q(x) (n,) from
        the same pass (no inversion needed). `z` (n, D): base draws to push through instead
        of new ones."""
        if z is None:
            z = torch.randn(n, self.dim, device=self._anchor.device, dtype=self._anchor.dtype)
        x, log_det = self.inverse(z)
        return x, std_normal_log_prob(z) - log_det

    def sample(self, n: int, z: Optional[Tensor] = None) -> Tensor:
        """n reparameterised samples x (n, D) (of the base draws z if given)."""
        return self.sample_and_log_prob(n, z)[0]

    @torch.no_grad()
    def initialize(self, x: Tensor) -> "Flow":
        """Data-dependent initialisation (ActNorm): one density pass on a data batch."""
        self.log_prob(x)
        return self

    def spec(self) -> dict[str, Any]:
        """The builder's name and keyword arguments that rebuild this flow (stored in
        checkpoints; `flow_from_spec` here, `vi_flows.flow_from_spec` for VI flows)."""
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


PASSES_UP_TO = 4  # MADE.invert: whole passes up to this many inputs (faster there, 5 blocks)


class MADE(nn.Module):
    """Masked autoencoder: outputs[..., i] depend only on inputs x_j of lower degree.

    Hidden masks connect k <- j iff m(k) >= m(j); output masks connect i <- k iff m(i) > m(k).
    Returns `n_params` tensors of shape (N, D) (e.g. shift and log-scale of an affine MAF)."""

    def __init__(self, dim, hidden=(64, 64), n_params=2, act="relu", reverse=False):
        super().__init__()
        self.dim, self.n_params = dim, n_params
        deg = made_degrees(dim, hidden, reverse)
        self.input_degrees = deg[0]
        # MADE.invert: units[l][k], layer l's units of degree k (l = 0: the inputs)
        self._units = [[(d == k).nonzero()[:, 0] for k in range(dim + 1)] for d in deg]
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

    def invert(self, z, solve):
        """Invert z_i = t(x_i; theta_i(x_<i)) one coordinate at a time, in order of degree
        (MAF sec. 3.1: D passes), at the multiply-adds of one forward pass.

        A unit of degree m reads only inputs of degree <= m, so once the input of degree k is
        fixed, every unit of degree k is final: its activation is added once into the next
        layer's pre-activations, and the output of degree k + 1 reads only final units.
        `solve(z, params)` -> (x, ld), elementwise: z (N, d) and the n_params outputs (N, d) of
        the d coordinates it solves (here d = 1; D in the whole-pass path below); returns x
        (N, D) and the summed ld (N,)."""
        if self.dim <= PASSES_UP_TO:
            return self._invert_by_passes(z, solve)
        n = z.shape[0]
        if self._units[0][0].device != z.device:  # moved once, on the first pass there
            self._units = [[idx.to(z.device) for idx in layer] for layer in self._units]
        units = self._units
        lins, acts = self.body[0::2], self.body[1::2]
        weights = [lin.weight * lin.mask for lin in lins]
        pre = [lin.bias.expand(n, -1) for lin in lins]
        last = z.new_zeros(n, self.out.in_features)  # the last layer's final units, 0 elsewhere
        w_out = (self.out.weight * self.out.mask).view(self.n_params, self.dim, -1)
        b_out, cols, ld = self.out.bias.view(self.n_params, self.dim), [None] * self.dim, 0
        for i in torch.argsort(self.input_degrees).tolist():
            theta = F.linear(last, w_out[:, i], b_out[:, i])  # (N, n_params): coordinate i's
            cols[i], ld_i = solve(z[:, i:i + 1], theta[:, None, :].unbind(-1))
            ld = ld + ld_i[:, 0]
            k = int(self.input_degrees[i])
            idx, a = units[0][k], cols[i]
            for l, act in enumerate(acts):  # the units of degree k, layer by layer
                pre[l] = pre[l] + a @ weights[l][:, idx].T
                idx = units[l + 1][k]
                a = act(pre[l][:, idx])
            last = last.index_copy(1, idx, a)
        return torch.cat(cols, 1), ld

    def _invert_by_passes(self, z, solve):
        """The same in D whole passes of the network, pass k fixing the coordinate of degree
        k: in a few dimensions cheaper than the bookkeeping above."""
        params = self(z.new_zeros(1, self.dim))  # the first pass sees x = 0 in every row
        for k in range(self.dim):
            x, ld = solve(z, params)
            if k + 1 < self.dim:
                params = self(x)
        return x, ld.sum(-1)


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

    def _clamp(self, params):
        """The MADE's outputs as (mu, alpha), alpha soft-clamped."""
        mu, alpha = params
        return mu, soft_clamp(alpha, self.bound)

    def _mu_alpha(self, x):
        return self._clamp(self.made(x))

    def forward(self, x):
        mu, alpha = self._mu_alpha(x)
        return (x - mu) * torch.exp(-alpha), -alpha.sum(-1)

    def inverse(self, z):
        def solve(z_i, params):  # x_i = z_i exp(alpha_i) + mu_i
            mu, alpha = self._clamp(params)
            return z_i * torch.exp(alpha) + mu, alpha.expand_as(z_i)
        return self.made.invert(z, solve)


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
class SplineAutoregressive(nn.Module):
    """Autoregressive rational-quadratic spline (NSF-AR, Durkan et al. 2019 sec. 3.2): z_i is the
    spline of x_i whose 3K - 1 parameters a MADE computes from x_<i.

    Density direction (forward): one MADE pass. Sampling (inverse): D passes, as in MAF."""

    def __init__(self, dim, hidden=(64, 64), bins=8, bound=5.0, act="relu", reverse=False):
        super().__init__()
        check_spline(bins, bound)
        self.made = MADE(dim, hidden, 3 * bins - 1, act, reverse)
        self.bound = bound

    def _params(self, x):
        return torch.stack(self.made(x), -1)  # (N, D, 3K - 1)

    def forward(self, x):
        z, ld = rational_quadratic_spline(x, self._params(x), self.bound)
        return z, ld.sum(-1)

    def inverse(self, z):
        return self.made.invert(z, lambda z_i, params: rational_quadratic_spline(
            z_i, torch.stack(params, -1).expand(*z_i.shape, -1), self.bound, inverse=True))


class SplineCoupling(nn.Module):
    """Rational-quadratic spline coupling (NSF-C, Durkan et al. 2019 sec. 3.1): x = (x_a, x_b),
    x_a passes unchanged and z_b is the spline of x_b with parameters from an MLP of x_a.
    One pass in either direction; `swap` conditions on the second half instead."""

    def __init__(self, dim, hidden=(64, 64), bins=8, bound=5.0, act="relu", swap=False):
        super().__init__()
        check_spline(bins, bound)
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


# ----------------------------------------------------------------------------- the box
class BoxLogit(nn.Module):
    """Logit preprocessing (Dinh et al. 2017, sec. 4.1) for images on the box [-1, 1]^D:

        s = a + (1 - 2a) (y + 1) / 2,    z = log s - log(1 - s),
        log|dz/dy| = sum_i [log((1 - 2a) / 2) - log s_i - log(1 - s_i)].

    It maps the open box E = (-r, r)^D, r = 1 / (1 - 2a), one-to-one onto R^D, so a flow that
    starts with it is a normalised density on E (log q = -inf outside E) whose samples never
    leave E. `a` keeps the box's walls at finite z (|z| <= logit(1 - a) on [-1, 1]), where the
    base's Gaussian tails fit the dequantised pixels at the extreme levels; E is a little
    larger than [-1, 1]^D, so the flow on the box is this density renormalised by its share
    of samples inside [-1, 1]^D (tasks.Images.box_share), as for any flow."""

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        if not 0 < alpha < 0.5:
            raise ValueError(f"box alpha must lie in (0, 0.5), got {alpha}")
        self.alpha = alpha

    def forward(self, y):
        a = self.alpha
        s = a + (1 - 2 * a) * (y + 1) / 2
        inside = ((s > 0) & (s < 1)).all(-1)
        s = s.clamp(1e-12, 1 - 1e-7)
        z = torch.log(s) - torch.log1p(-s)
        ld = (math.log((1 - 2 * a) / 2) - torch.log(s) - torch.log1p(-s)).sum(-1)
        return z, torch.where(inside, ld, torch.full_like(ld, -math.inf))

    def inverse(self, z):
        a = self.alpha
        y = (torch.sigmoid(z) - a) / (1 - 2 * a) * 2 - 1
        ld = (F.logsigmoid(z) + F.logsigmoid(-z) - math.log((1 - 2 * a) / 2)).sum(-1)
        return y, ld


# ----------------------------------------------------------------------------- mixtures
class FlowMixture(nn.Module):
    """An equal-weight mixture of the first `n_active` of K flows (an ensemble; Lakshminarayanan
    et al. 2017 average predictive densities the same way):

        q(x) = (1 / n) sum_{k < n} q_k(x),    log q = logsumexp_k log q_k(x) - log n.

    The flows are trained one after another (train.py --base_flows); `n_active` counts the
    finished ones. Sampling is stratified: n / n_active samples of each member (in member
    order), so an average over them is an unbiased estimate of an expectation under q."""

    def __init__(self, members: Sequence[Flow]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.dim = members[0].dim
        self.register_buffer("n_active", torch.tensor(len(members)))
        self.register_buffer("_anchor", torch.zeros(()))

    def active(self):
        return list(self.members)[: max(int(self.n_active), 1)]

    def log_prob(self, x: Tensor) -> Tensor:
        flows = self.active()
        return torch.logsumexp(torch.stack([f.log_prob(x) for f in flows]), 0) \
            - math.log(len(flows))

    def forward(self, x: Tensor):
        raise TypeError("a FlowMixture has no single latent space; use log_prob / sample")

    def sample(self, n: int, z: Optional[Tensor] = None) -> Tensor:
        """Stratified samples x (n, D): member k pushes the k-th of n_active equal slices of
        the base draws z (new ones by default) through its inverse."""
        flows = self.active()
        if z is None:
            z = torch.randn(n, self.dim, device=self._anchor.device, dtype=self._anchor.dtype)
        return torch.cat([f.sample(len(c), c) for f, c in zip(flows, z.tensor_split(len(flows)))])

    def sample_and_log_prob(self, n: int, z: Optional[Tensor] = None):
        """`sample` and log q(x) (a density pass through every member)."""
        x = self.sample(n, z)
        return x, self.log_prob(x)

    def spec(self) -> dict[str, Any]:
        return {"name": "mixture", "member": self.members[0].spec(), "k": len(self.members)}


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
def maf(dim: int = 2, n_blocks: int = 5, hidden: Sequence[int] = (64, 64), act: str = "relu",
        batch_norm: bool = False) -> Flow:
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


def glow(dim: int = 2, n_steps: int = 10, hidden: Sequence[int] = (64, 64),
         act: str = "silu") -> Flow:
    """Glow: `n_steps` of ActNorm -> invertible linear (LU) -> affine coupling."""
    layers = []
    for i in range(n_steps):
        layers += [ActNorm(dim), InvertibleLinearLU(dim),
                   AffineCoupling(dim, hidden, act, swap=bool(i % 2))]
    spec = {"name": "glow", "dim": dim, "n_steps": n_steps, "hidden": list(hidden), "act": act}
    return Flow(layers, dim, spec)


def gaussian(dim: int = 2, mean: Optional[Tensor] = None, cov: Optional[Tensor] = None) -> Flow:
    """Fixed N(mean, cov) as a Flow (defaults N(0, I)); fit it with `gaussian_fit(data)`."""
    mean = torch.zeros(dim) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
    cov = torch.eye(dim) if cov is None else torch.as_tensor(cov, dtype=torch.float32)
    return Flow([AffineGaussian(mean, cov)], dim, {"name": "gaussian", "dim": dim})


def gaussian_fit(data: Tensor) -> Flow:
    """N(mean, cov) with the sample mean and covariance of `data` (N, D)."""
    x = data.double()
    return gaussian(x.shape[1], x.mean(0).float(), torch.cov(x.T).float())


def nsf(dim: int = 2, n_blocks: int = 5, hidden: Sequence[int] = (64, 64), bins: int = 8,
        bound: float = 5.0, act: str = "relu") -> Flow:
    """Autoregressive neural spline flow: `n_blocks` MADE-conditioned rational-quadratic splines
    on [-bound, bound] (identity outside), variable order reversed between blocks."""
    layers = [SplineAutoregressive(dim, hidden, bins, bound, act, reverse=bool(i % 2))
              for i in range(n_blocks)]
    spec = {"name": "nsf", "dim": dim, "n_blocks": n_blocks, "hidden": list(hidden),
            "bins": bins, "bound": bound, "act": act}
    return Flow(layers, dim, spec)


def nsf_coupling(dim: int = 2, n_blocks: int = 8, hidden: Sequence[int] = (64, 64),
                 bins: int = 8, bound: float = 5.0, act: str = "relu") -> Flow:
    """Coupling neural spline flow: `n_blocks` rational-quadratic spline couplings, alternating
    which half is transformed."""
    layers = [SplineCoupling(dim, hidden, bins, bound, act, swap=bool(i % 2))
              for i in range(n_blocks)]
    spec = {"name": "nsf_coupling", "dim": dim, "n_blocks": n_blocks, "hidden": list(hidden),
            "bins": bins, "bound": bound, "act": act}
    return Flow(layers, dim, spec)


BUILDERS = {"maf": maf, "glow": glow, "nsf": nsf, "nsf_coupling": nsf_coupling,
            "gaussian": gaussian}


def build_flow(name: str, data: Optional[Tensor] = None, box: bool = False,
               **kwargs: Any) -> Flow:
    """Build density flow `name` (a key of BUILDERS); with `data` (N, D), fit the Gaussian to
    it or run the data-dependent initialisation. kwargs go to the builder (see `Flow.spec()`).
    `box`: the flow behind `BoxLogit`, for images on [-1, 1]^D.

    Example:
        >>> flow = build_flow("glow", data, n_steps=4)   # ActNorm initialised on `data`
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown flow {name!r}; choose one of: {', '.join(BUILDERS)}")
    if box:
        if name == "gaussian":
            raise ValueError("a box flow needs a learned flow; the gaussian has no box form")
        inner = BUILDERS[name](**kwargs)
        flow = Flow([BoxLogit(), *inner.transforms], inner.dim, {**inner.spec(), "box": True})
    elif name == "gaussian" and data is not None:
        return gaussian_fit(data)
    else:
        flow = BUILDERS[name](**kwargs)
    return flow.initialize(data) if data is not None else flow


def flow_from_spec(spec: Mapping[str, Any]) -> Flow:
    """Rebuild an (untrained) density flow from `Flow.spec()`; load the state_dict afterwards.
    A run's checkpoint may name a VI flow instead: `vi_flows.flow_from_spec` rebuilds both."""
    spec = dict(spec)
    if spec["name"] == "mixture":
        return FlowMixture([flow_from_spec(spec["member"]) for _ in range(spec["k"])])
    return build_flow(spec.pop("name"), **spec)
