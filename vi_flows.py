"""Normalizing flows for variational inference: fit q_K to an unnormalised p(z) ∝ exp(-U(z)) by
reverse KL (Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows", sec. 6.1;
train_vi.py, bench_vi.py). Built on flows.py: every VI flow is a `flows.Flow`.

VI needs the *sampling* direction z0 -> z_K with log q of its own samples, so each
transform's `inverse` (noise -> data) is the paper's f_k and costs one pass. The density
direction `forward` (data -> noise, for Flow.log_prob on given points) is:
  Planar  f(z) = z + u_hat tanh(w.z + b): numerical inverse (1D bisection along w, exact).
  Radial  f(z) = z + beta h(alpha, r)(z - z0): closed-form inverse (a quadratic in r).
  IAF     x = z exp(alpha(z)) + mu(z): the MAF layer's MADE run on the noise side; sampling is
          one pass, the density of arbitrary points D passes (MAF the other way round).
  NICE / RealNVP: flows.AffineCoupling (affine=False is NICE's additive coupling), one pass.
  Spline: flows.SplineCoupling (NSF-C), one pass either way.
The base q0 is N(0, I) ("fixed") or a learnable diagonal Gaussian ("learned", the
GaussianBase transform on the noise side; for NICE it plays the role of the final scaling).

Training several targets at once: `stack(flow_spec, T)` holds one flow per target behind
`sample_and_log_prob(n) -> x (T, n, D), log q (T, n)`. PlanarStack does it for planar flows as
one batched module (leading target dimension, bmm), which removes most of the per-op overhead
that dominates planar flows on CPU; FlowStack is the plain loop for the others.

Registry: VI_BUILDERS (the flows of VI_FLOWS and "stack"), separate from flows.BUILDERS.
A checkpoint's spec names either kind; `flow_from_spec` here rebuilds both.

Example:
    >>> q = build_flow("planar", dim=2, K=8)
    >>> z, log_q = q.sample_and_log_prob(256)               # reverse KL: mean(log_q + U(z))
    >>> qs = stack({"name": "planar", "dim": 2, "K": 8, "base": "learned"}, n_targets=4)
    >>> z, log_q = qs.sample_and_log_prob(256)               # (4, 256, 2), (4, 256)
"""
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import flows
from flows import AffineCoupling, Flow, MAFLayer, SplineCoupling, std_normal_log_prob

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


def planar_m(x: Tensor) -> Tensor:
    """m(x) = -1 + softplus(x) > -1 (R&M appendix A.1)."""
    return F.softplus(x) - 1


def planar_u_hat(u: Tensor, w: Tensor) -> Tensor:
    """u_hat = u + (m(w.u) - w.u) w / |w|^2 (R&M appendix A.1; the norm is *squared*), so that
    w . u_hat = m(w.u) > -1 and f is invertible. Any leading dimensions (..., D)."""
    wu = (w * u).sum(-1, keepdim=True)
    w2 = (w * w).sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)  # only w == 0
    return u + (planar_m(wu) - wu) * w / w2


def planar_w_dot_u_hat(u: Tensor, w: Tensor) -> Tensor:
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


def planar_f(z: Tensor, u_hat: Tensor, c: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """x = f(z) = z + u_hat tanh(w.z + b) and log|det df/dz| = log(1 + c sech^2(w.z + b))
    (R&M eq. 10-12) for T planar layers side by side, one per target, given
    u_hat = planar_u_hat(u, w) and c = w.u_hat = planar_w_dot_u_hat(u, w) (computed by the
    caller, PlanarStack for all its layers in one call).

    z (T, N, D), u_hat and w (T, D), c and b (T,) -> x (T, N, D), log-det (T, N): two batched
    matrix products per layer. A single `Planar` layer is the case T = 1."""
    t = torch.tanh(torch.baddbmm(b[:, None, None], z, w[:, :, None]))   # (T, N, 1)
    x = torch.baddbmm(z, t, u_hat[:, None, :])                           # z + t u_hat^T
    return x, torch.log1p(c[:, None, None] * (1 - t * t))[..., 0]


class Planar(nn.Module):
    """Planar flow (R&M eq. 10-12): x = f(z) = z + u_hat tanh(w.z + b),
    log|det df/dz| = log|1 + u_hat . psi(z)| with psi = tanh'(w.z + b) w, i.e.
    log(1 + (w.u_hat) sech^2(w.z + b)) (> 0 inside the log since w.u_hat > -1).

    `inverse` (sampling) is f, one pass. `forward` (density) inverts f numerically: along w,
    a = w.z + b solves a + (w.u_hat) tanh(a) = w.x + b, a strictly increasing 1D equation with
    |a - (w.x + b)| <= |w.u_hat|, solved by float64 bisection to machine precision, then one
    Newton step with autograd so gradients are those of the exact inverse; z = x - u_hat tanh(a).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.u = nn.Parameter(torch.empty(dim))
        self.w = nn.Parameter(torch.empty(dim))
        self.b = nn.Parameter(torch.empty(()))
        _init_planar(self.u, self.w, self.b)

    def u_hat(self) -> Tensor:
        return planar_u_hat(self.u, self.w)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x, log_det = planar_f(z[None], self.u_hat()[None], planar_w_dot_u_hat(self.u, self.w)[None],
                              self.w[None], self.b[None])
        return x[0], log_det[0]

    def forward(self, x: Tensor, iters: int = 80) -> tuple[Tensor, Tensor]:
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
        def solve(x_i, params):  # z_i = (x_i - mu_i) exp(-alpha_i)
            mu, alpha = self._clamp(params)
            return (x_i - mu) * torch.exp(-alpha), -alpha.expand_as(x_i)
        return self.made.invert(x, solve)


def _vi_flow(layers: Sequence[nn.Module], dim: int, base: str, spec: dict[str, Any]) -> Flow:
    """A Flow applying `layers` in sampling order z0 -> z_K after the base q0."""
    if base not in ("learned", "fixed"):
        raise ValueError(f"unknown base {base!r}; choose 'learned' or 'fixed'")
    layers = ([GaussianBase(dim)] if base == "learned" else []) + list(layers)
    return Flow(layers[::-1], dim, spec)  # Flow lists transforms from data side to noise side


def planar(dim: int = 2, K: int = 32, base: str = "learned") -> Flow:
    """K planar layers (R&M sec. 4.1) on a learnable (or fixed N(0, I)) Gaussian base."""
    return _vi_flow([Planar(dim) for _ in range(K)], dim, base,
                    {"name": "planar", "dim": dim, "K": K, "base": base})


def radial(dim: int = 2, K: int = 32, base: str = "learned") -> Flow:
    """K radial layers (R&M sec. 4.1)."""
    return _vi_flow([Radial(dim) for _ in range(K)], dim, base,
                    {"name": "radial", "dim": dim, "K": K, "base": base})


def iaf(dim: int = 2, K: int = 4, hidden: Sequence[int] = (64, 64), act: str = "relu",
        base: str = "learned") -> Flow:
    """K affine IAF layers, variable order reversed between layers."""
    layers = [IAFLayer(dim, hidden, act, reverse=bool(k % 2)) for k in range(K)]
    return _vi_flow(layers, dim, base, {"name": "iaf", "dim": dim, "K": K,
                                        "hidden": list(hidden), "act": act, "base": base})


def realnvp(dim: int = 2, K: int = 8, hidden: Sequence[int] = (64, 64), act: str = "silu",
            base: str = "learned") -> Flow:
    """K RealNVP affine couplings (Dinh et al. 2017), alternating halves."""
    layers = [AffineCoupling(dim, hidden, act, swap=bool(k % 2)) for k in range(K)]
    return _vi_flow(layers, dim, base, {"name": "realnvp", "dim": dim, "K": K,
                                        "hidden": list(hidden), "act": act, "base": base})


def nice(dim: int = 2, K: int = 8, hidden: Sequence[int] = (64, 64), act: str = "silu",
         base: str = "learned") -> Flow:
    """K NICE additive couplings (Dinh et al. 2015; volume preserving, log-det 0): the learned
    diagonal base is NICE's final scaling layer, the only source of volume change."""
    layers = [AffineCoupling(dim, hidden, act, swap=bool(k % 2), affine=False) for k in range(K)]
    return _vi_flow(layers, dim, base, {"name": "nice", "dim": dim, "K": K,
                                        "hidden": list(hidden), "act": act, "base": base})


def spline(dim: int = 2, K: int = 4, hidden: Sequence[int] = (64, 64), act: str = "relu",
           bins: int = 8, bound: float = 5.0, base: str = "learned") -> Flow:
    """K rational-quadratic spline couplings (NSF-C) for VI, alternating halves: one pass in
    the sampling direction and for log q of its own samples."""
    layers = [SplineCoupling(dim, hidden, bins, bound, act, swap=bool(k % 2)) for k in range(K)]
    return _vi_flow(layers, dim, base, {"name": "spline", "dim": dim, "K": K,
                                        "hidden": list(hidden), "act": act, "bins": bins,
                                        "bound": bound, "base": base})


# ----------------------------------------------------------------------------- one flow per target
class TargetStack(nn.Module):
    """T flows q_1..q_T, one per target, trained in one loop. The interface train_vi.py uses:
    `sample_and_log_prob(n)` -> x (T, n, D) and log q (T, n); `log_prob(x)` -> (T, N);
    `flow(t)` -> q_t as a `Flow`; `spec()` rebuilds the stack (`flow_from_spec`)."""

    def __init__(self, spec: Mapping[str, Any]):
        super().__init__()
        self._spec = dict(spec)

    def __len__(self) -> int:
        raise NotImplementedError

    def flow(self, t: int) -> Flow:
        raise NotImplementedError

    def sample_and_log_prob(self, n: int, z: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor:
        """log q_t(x) for every t: (T, N) from x (N, D)."""
        return torch.stack([self.flow(t).log_prob(x) for t in range(len(self))])

    def spec(self) -> dict[str, Any]:
        return dict(self._spec)


class FlowStack(TargetStack):
    """T independent `Flow`s run one after another (the straightforward loop)."""

    def __init__(self, members: Sequence[Flow], spec: Mapping[str, Any]):
        super().__init__(spec)
        self.flows = nn.ModuleList(members)

    def __len__(self) -> int:
        return len(self.flows)

    def flow(self, t: int) -> Flow:
        return self.flows[t]

    def sample_and_log_prob(self, n: int, z: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """x (T, n, D) and log q (T, n); z (T, n, D) ~ N(0, I) unless given."""
        xs, lqs = zip(*(f.sample_and_log_prob(n, None if z is None else z[t])
                        for t, f in enumerate(self.flows)))
        return torch.stack(xs), torch.stack(lqs)


class PlanarStack(TargetStack):
    """T planar flows of K layers as one batched module: parameters u, w (T, K, D), b (T, K),
    base mu, log_sigma (T, D). Each layer is `planar_f` on all T targets at once (two batched
    matrix products), so a step costs about the op count of a single flow whatever T is
    (planar flows are op-overhead bound on CPU). `flow(t)` returns target t's flow as a plain
    `Flow` of `Planar` layers with the same parameters."""

    def __init__(self, n_targets: int, dim: int = 2, K: int = 32, base: str = "learned",
                 spec: Optional[Mapping[str, Any]] = None):
        super().__init__(spec or {})
        T = n_targets
        self.T, self.dim, self.K, self.base = T, dim, K, base
        self.u = nn.Parameter(torch.empty(T, K, dim))
        self.w = nn.Parameter(torch.empty(T, K, dim))
        self.b = nn.Parameter(torch.empty(T, K))
        _init_planar(self.u, self.w, self.b)
        self.mu = nn.Parameter(torch.zeros(T, dim), requires_grad=base == "learned")
        self.log_sigma = nn.Parameter(torch.zeros(T, dim), requires_grad=base == "learned")

    def __len__(self) -> int:
        return self.T

    def sample_and_log_prob(self, n: int, z: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """x (T, n, D) and log q_K(x) (T, n); z (T, n, D) ~ N(0, I) unless given."""
        if z is None:
            z = torch.randn(self.T, n, self.dim, device=self.u.device, dtype=self.u.dtype)
        log_q0 = std_normal_log_prob(z) - self.log_sigma.sum(-1, keepdim=True)
        x = self.mu[:, None] + z * torch.exp(self.log_sigma)[:, None]   # the base, GaussianBase
        layers = zip(planar_u_hat(self.u, self.w).unbind(1),              # u_hat (T, D) per layer
                     planar_w_dot_u_hat(self.u, self.w).unbind(1),        # w . u_hat (T,)
                     self.w.unbind(1), self.b.unbind(1))
        log_det = []
        for u_hat, c, w, b in layers:
            x, ld = planar_f(x, u_hat, c, w, b)
            log_det.append(ld)
        if not log_det:
            return x, log_q0
        return x, log_q0 - torch.stack(log_det, -1).sum(-1)

    def flow(self, t: int) -> Flow:
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
        return f.to(device=self.u.device, dtype=self.u.dtype)


def stack(flow_spec: Mapping[str, Any], n_targets: int, batched: bool = True) -> TargetStack:
    """T copies of the flow described by `flow_spec` (a `Flow.spec()` dict), one per target,
    each initialised independently: a batched PlanarStack for planar flows when `batched`,
    else a FlowStack loop.

    Example:
        >>> qs = stack({"name": "realnvp", "dim": 2, "K": 4, "base": "learned"}, 2)
    """
    flow_spec = dict(flow_spec)
    spec = {"name": "stack", "flow_spec": dict(flow_spec), "n_targets": n_targets,
            "batched": batched}
    if flow_spec["name"] == "planar" and batched:
        flow_spec.pop("name")
        return PlanarStack(n_targets, spec=spec, **flow_spec)
    return FlowStack([flow_from_spec(flow_spec) for _ in range(n_targets)], spec)


# ----------------------------------------------------------------------------- registry
VI_BUILDERS = {"planar": planar, "radial": radial, "iaf": iaf, "realnvp": realnvp, "nice": nice,
               "spline": spline, "stack": stack}
VI_FLOWS = ("planar", "radial", "iaf", "realnvp", "nice", "spline")  # single flows (--flow)


def build_flow(name: str, **kwargs: Any) -> Flow | TargetStack:
    """Build VI flow `name` (a key of VI_BUILDERS) from the builder's keyword arguments.

    Example:
        >>> q = build_flow("iaf", dim=2, K=2, hidden=(16, 16), base="fixed")
    """
    if name not in VI_BUILDERS:
        raise ValueError(f"unknown VI flow {name!r}; choose one of: {', '.join(VI_BUILDERS)}")
    return VI_BUILDERS[name](**kwargs)


def flow_from_spec(spec: Mapping[str, Any]) -> Flow | TargetStack:
    """Rebuild an (untrained) flow from its `spec()`, a VI flow or stack (VI_BUILDERS) or a
    density flow (flows.BUILDERS); load the state_dict afterwards. The one route for
    checkpoints: checkpoint.load_run uses it for every run, whichever script wrote it."""
    spec = dict(spec)
    if spec["name"] in VI_BUILDERS:
        return build_flow(spec.pop("name"), **spec)
    return flows.flow_from_spec(spec)
