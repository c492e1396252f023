"""Annealed importance sampling (AIS; Neal 2001) for the normaliser of an unnormalised density,

    p(x) = exp(-f(x)) / Z,    Z = int exp(-f(x)) dx,

from a tractable base q0 (anything with `log_prob` and `sample_and_log_prob`: a fitted
Gaussian `Flow`, a trained flow).

Geometric path, 0 = b_0 < b_1 < ... < b_K = 1 (`schedule`):

    log pi_b(x) = (1 - b) log q0(x) - b f(x),   pi_0 = q0 (normalised), pi_1 = exp(-f).

Forward AIS: x ~ q0, then for k = 1..K

    log w += log pi_{b_k}(x) - log pi_{b_{k-1}}(x) = (b_k - b_{k-1}) (-f(x) - log q0(x)),
    x <- T_k(x)  (k < K),  T_k a Markov kernel that leaves pi_{b_k} invariant.

E[w] = Z, so Z-hat = mean(w) is unbiased and, by Jensen, E[log Z-hat] <= log Z: forward AIS
is a stochastic LOWER bound on log Z. Everything the weights touch is float64 and the mean is
a logsumexp: log Z-hat = logsumexp(log w) - log n.

Reverse AIS (RAISE, Burda et al. 2015; BDMC, Grosse et al. 2015): start from exact samples of
p and run the same loop with b from 1 down to 0. Then E[w_rev] = Z_0 / Z_1 = 1 / Z, and
log Z-hat_up = -(logsumexp(log w_rev) - log n) is a stochastic UPPER bound on log Z. With held-out
data instead of model samples the bound is a heuristic: it holds only as far as the data are
distributed like the model.

Transitions T_k: Hamiltonian Monte Carlo (Neal 2011), `n_leapfrog` leapfrog steps with identity
mass and a Metropolis test on H = -log pi_b(x) + |rho|^2 / 2; MALA is the one-leapfrog case
(the same proposal and acceptance ratio, see samplers.py). The step size eps is adapted from one
temperature to the next towards a target acceptance (0.65 HMC, 0.57 MALA; Neal 2011, Roberts
& Rosenthal 1998):  log eps <- log eps + gamma (a - a*), with a the Metropolis acceptance
probability of each chain ("chain") or its mean over a repeat's chains ("global").
`transition="independence"`: independent Metropolis-Hastings, a fresh draw of the base as the
proposal (`independence`): no gradients and no step size, the kernel of choice when the target
is a bounded tilt of the base (p = q0 exp(-g) / Z, tilt.FlowTilt), where HMC, hemmed in by the
box's walls, barely moves the chains.

    res = ais_log_Z(ebm, base, n_chains=256, n_temps=500, repeats=4)
    res.log_Z, res.log_Z_sd, res.ess, res.acceptance
    br = loglik_bracket(ebm, base, x_test)      # br.lower <= test log-likelihood <= br.upper

On the data box [-1, 1]^D of the images (where exp(-f) is always integrable; on R^D an energy
that is piecewise linear in x, as a ConvNet's, need not be) AIS runs in whitened atanh
coordinates w, y = tanh(mu + L w) with mu, L L^T the mean and covariance of atanh of points of
the box (`BoxEnergy`), by ordinary HMC from N(0, I): f_w(w) = f(y) - log|dy/dw| has the box's
Z, and the bracket is converted back to y (`box_bracket`, `box_samples`). `unbounded_ray`
finds an energy with no normaliser on R^D. A repeat whose ESS falls below ESS_FLOOR of its
chains is flagged (`AISResult.degenerate`, `Bracket.reliable`).

The command line that scores a run's EBM is ais.py (`python ais.py runs/<run>`).
"""
import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import evaluation
from flows import gaussian
from samplers import frozen

SCHEDULES = ("sigmoid", "geometric", "linear")
TARGET_ACCEPTANCE = {"hmc": 0.65, "mala": 0.57, "independence": None}  # None: no step size
ADAPT = ("global", "chain", "none")
ESS_FLOOR = 0.05  # a repeat whose ESS is below this fraction of its chains is degenerate


# ----------------------------------------------------------------------------- the path
def schedule(n_temps: int, kind: str = "sigmoid", delta: float = 4.0,
             b_min: float = 1e-4) -> Tensor:
    """Inverse temperatures b_0 = 0 < ... < b_K = 1 (K = n_temps), float64, shape (K + 1,).

    sigmoid   (s_k - s_0) / (s_K - s_0), s_k = sigmoid(delta (2k/K - 1))  (Grosse et al.
              2013; small steps at both ends)
    geometric b_k = b_min^((K - k) / (K - 1)) for k >= 1 (small steps near the base)
    linear    b_k = k / K"""
    if n_temps < 1:
        raise ValueError(f"n_temps must be >= 1, got {n_temps}")
    k = torch.arange(n_temps + 1, dtype=torch.float64)
    if kind == "sigmoid":
        s = torch.sigmoid(delta * (2 * k / n_temps - 1))
        b = (s - s[0]) / (s[-1] - s[0])
    elif kind == "geometric":
        b = torch.zeros(n_temps + 1, dtype=torch.float64)
        b[1:] = b_min ** ((n_temps - k[1:]) / max(n_temps - 1, 1))
    elif kind == "linear":
        b = k / n_temps
    else:
        raise ValueError(f"unknown schedule {kind!r}; choose one of: {', '.join(SCHEDULES)}")
    b[0], b[-1] = 0.0, 1.0
    return b


def log_pi(b: float, f: Tensor, log_q0: Tensor) -> Tensor:
    """log pi_b = (1 - b) log q0 - b f, unnormalised (float64 when f and log q0 are); at the
    ends exactly log q0 and -f, so an f = +inf where q0 has mass (an EBM on a smaller
    domain than its base) gives -inf there, not 0 * inf."""
    if b == 0:
        return log_q0
    if b == 1:
        return -f
    return (1 - b) * log_q0 - b * f


@dataclass
class _State:
    """Chains x with f(x), log q0(x) and both gradients w.r.t. x (cached between steps)."""
    x: Tensor
    f: Tensor
    log_q0: Tensor
    grad_f: Tensor
    grad_log_q0: Tensor

    def grad_U(self, b):
        """grad of U_b = -log pi_b = b f - (1 - b) log q0."""
        return b * self.grad_f - (1 - b) * self.grad_log_q0

    def U(self, b):
        return -log_pi(b, self.f.double(), self.log_q0.double())

    def where(self, keep_new, old):
        m = keep_new[:, None]
        return _State(*(torch.where(m if new.dim() == 2 else keep_new, new, o)
                        for new, o in zip(vars(self).values(), vars(old).values())))


def _evaluate(energy, base, x, grads=True):
    """f, log q0 and their gradients at x (autograd w.r.t. x only; zeros without `grads`)."""
    if not grads:
        zero = torch.zeros_like(x)
        return _State(x, energy(x).detach(), base.log_prob(x).detach(), zero, zero)
    with torch.enable_grad():
        y = x.detach().requires_grad_(True)
        f, log_q0 = energy(y), base.log_prob(y)
        (grad_f,) = torch.autograd.grad(f.sum(), y)
        (grad_log_q0,) = torch.autograd.grad(log_q0.sum(), y)
    return _State(y.detach(), f.detach(), log_q0.detach(), grad_f, grad_log_q0)


# ----------------------------------------------------------------------------- the box
BOX_EDGE = 1e-6  # points are clamped to [-1 + BOX_EDGE, 1 - BOX_EDGE] before atanh


def log_dtanh(z: Tensor) -> Tensor:
    """log(1 - tanh^2 z) = 2 (log 2 - z - softplus(-2 z)), elementwise, stable for any z."""
    return 2 * (math.log(2.0) - z - F.softplus(-2 * z))


def box_fit(x: Tensor, edge: float = BOX_EDGE) -> tuple:
    """(mu, L), float64: the mean and the Cholesky factor of the covariance of atanh(x), x
    clamped to [-1 + edge, 1 - edge] (points of the box [-1, 1]^D, e.g. dequantised images)."""
    z = torch.atanh(x.double().clamp(-1 + edge, 1 - edge))
    return z.mean(0), torch.linalg.cholesky(torch.cov(z.T))


class BoxEnergy(nn.Module):
    """exp(-f) on the box [-1, 1]^D in whitened unconstrained coordinates w:

        y = tanh(z),  z = mu + L w,
        f_w(w) = f(y) - log|dy/dw|,  log|dy/dw| = sum_i log(1 - tanh^2 z_i) + sum_i log L_ii,

    so int_R^D exp(-f_w) dw = int_box exp(-f) dy = Z: the box's normaliser comes out of
    unconstrained HMC from the base N(0, I), and log p(y) = log p_w(w) - log|dy/dw|.
    mu, L L^T: the mean and covariance of atanh of points of the box (`fit`, `box_fit`).
    Whitening makes N(0, I) a base close to the data and lets one HMC step size fit every
    coordinate (in atanh an always-dark pixel and an ink pixel differ in spread by orders of
    magnitude). mu and L are buffers: `.to(dtype)` moves them with the energy."""

    def __init__(self, energy, mu: Tensor, chol: Tensor):
        super().__init__()
        self.energy = energy
        self.register_buffer("mu", mu)
        self.register_buffer("chol", chol)

    @classmethod
    def fit(cls, energy, x_fit: Tensor, dtype=torch.float64, edge: float = BOX_EDGE):
        """The map fitted to the points x_fit (`box_fit`), its buffers in `dtype`."""
        mu, chol = box_fit(x_fit, edge)
        return cls(energy, mu.to(dtype), chol.to(dtype))

    def to_y(self, w: Tensor) -> Tensor:
        return torch.tanh(self.mu + w @ self.chol.T)

    def to_w(self, y: Tensor, edge: float = BOX_EDGE) -> Tensor:
        """The inverse map; y clamped to [-1 + edge, 1 - edge] (a dequantised pixel is -1
        exactly only with probability 2^-24)."""
        z = torch.atanh(y.clamp(-1 + edge, 1 - edge)) - self.mu
        return torch.linalg.solve_triangular(self.chol, z.T, upper=False).T

    def log_jacobian(self, w: Tensor) -> Tensor:
        """log |dy/dw| per row: sum_i log(1 - tanh^2 z_i) + sum_i log L_ii."""
        z = self.mu + w @ self.chol.T
        return log_dtanh(z).sum(-1) + torch.log(torch.diagonal(self.chol)).sum()

    def forward(self, w: Tensor) -> Tensor:
        return self.energy(self.to_y(w)) - self.log_jacobian(w)


def box_base(dim: int, dtype=torch.float64):
    """The base of AIS in the box's coordinates w: N(0, I)."""
    return gaussian(dim).to(dtype)


# ----------------------------------------------------------------------------- transitions
def metropolis(log_a: Tensor) -> Tensor:
    """Accept each proposal with probability min(1, exp(log_a))."""
    return torch.log(torch.rand_like(log_a)) < log_a


def hmc(energy, base, s: _State, b: float, eps: Tensor, n_leapfrog: int):
    """One HMC transition leaving pi_b invariant: momentum rho ~ N(0, I), `n_leapfrog` leapfrog
    steps of size eps (per chain, shape (n, 1)), Metropolis test on H = U_b(x) + |rho|^2 / 2
    (in float64). Returns the new state and the acceptance probabilities (n,)."""
    rho = torch.randn_like(s.x)
    H0 = s.U(b) + 0.5 * (rho.double() ** 2).sum(1)
    t = s
    rho = rho - 0.5 * eps * t.grad_U(b)
    for i in range(n_leapfrog):
        t = _evaluate(energy, base, t.x + eps * rho)
        rho = rho - (eps if i < n_leapfrog - 1 else 0.5 * eps) * t.grad_U(b)
    H1 = t.U(b) + 0.5 * (rho.double() ** 2).sum(1)
    log_a = torch.nan_to_num(H0 - H1, nan=-math.inf).clamp(max=0.0)
    return t.where(metropolis(log_a), s), log_a.exp()


def independence(energy, base, s: _State, b: float):
    """One independent Metropolis-Hastings transition leaving pi_b invariant, the proposal a
    fresh draw of the base, x' ~ q0 (each chain's proposal marginally q0: the draws are
    shuffled, a mixture base samples in strata), accepted with probability

        min(1, pi_b(x') q0(x) / (pi_b(x) q0(x'))) = min(1, exp(-b [h(x') - h(x)])),
        h = f + log q0,

    which for a tilt of its base (f = g - log q0, h = g) is at least exp(-2 b B) when |g| < B:
    no gradients, no step size, and the chains forget where they started. Returns the new
    state and the acceptance probabilities (n,)."""
    n = s.x.shape[0]
    order = torch.randperm(n, device=s.x.device)
    x_new, log_q0 = (v.detach()[order] for v in base.sample_and_log_prob(n))
    t = _State(x_new, energy(x_new).detach(), log_q0, s.grad_f, s.grad_log_q0)
    h_new, h_old = (u.f.double() + u.log_q0.double() for u in (t, s))
    log_a = torch.nan_to_num(-b * (h_new - h_old), nan=-math.inf).clamp(max=0.0)
    return t.where(metropolis(log_a), s), log_a.exp()


def _adapt(log_eps, a, target, adapt, repeats, gamma):
    """log eps <- log eps + gamma (a - a*), per chain or per repeat's mean acceptance."""
    if adapt == "none":
        return log_eps
    if adapt == "global":
        a = a.view(repeats, -1).mean(1, keepdim=True).expand(repeats, a.numel() // repeats)
    return log_eps + gamma * (a.reshape(-1, 1) - target)


# ----------------------------------------------------------------------------- the annealing
@contextlib.contextmanager
def _fixed_modules(*modules):
    """Evaluation mode (a BatchNormFlow must not move its statistics) and frozen parameters
    for the duration; both restored afterwards."""
    mods = [m for m in modules if isinstance(m, nn.Module)]
    modes = [m.training for m in mods]
    try:
        for m in mods:
            m.eval()
        with frozen(*mods):
            yield
    finally:
        for m, mode in zip(mods, modes):
            m.train(mode)


def anneal(energy, base, x: Tensor, betas: Tensor, transition: str = "hmc",
           n_leapfrog: int = 5, eps: float = 0.1, step_sizes: Optional[Tensor] = None,
           adapt: str = "global", repeats: int = 1, gamma: float = 0.5):
    """Run chains x along b = betas[0] -> betas[-1] (either direction), accumulating

        log w += (b_k - b_{k-1}) (-f(x) - log q0(x)),  then x <- T_k(x) for the inner b_k.

    `step_sizes` (len(betas) - 2,) fixes eps per inner temperature (no adaptation: the kernels
    are chosen in advance and AIS is exactly unbiased); otherwise eps starts at `eps` and adapts.
    Returns log w (n,) float64, acceptance per inner temperature, eps used per inner
    temperature (geometric mean over chains; NaN for independence moves, which have no step
    size) and the final chains."""
    n_leapfrog = 1 if transition == "mala" else n_leapfrog
    target = TARGET_ACCEPTANCE[transition]
    s = _evaluate(energy, base, x, grads=target is not None)
    log_w = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    log_eps = torch.full((x.shape[0], 1), math.log(eps), dtype=x.dtype, device=x.device)
    acc, used = [], []
    for k in range(1, len(betas)):
        b_prev, b = float(betas[k - 1]), float(betas[k])
        f, log_q0 = s.f.double(), s.log_q0.double()
        # a chain where pi_b has no mass (-inf - -inf) carries no weight from then on
        log_w += torch.nan_to_num(log_pi(b, f, log_q0) - log_pi(b_prev, f, log_q0),
                                  nan=-math.inf)
        if k == len(betas) - 1:
            break
        if target is None:
            s, a = independence(energy, base, s, b)
        else:
            if step_sizes is not None:
                log_eps = torch.full_like(log_eps, math.log(float(step_sizes[k - 1])))
            s, a = hmc(energy, base, s, b, log_eps.exp(), n_leapfrog)
        acc.append(float(a.mean()))
        used.append(float(log_eps.mean().exp()) if target is not None else math.nan)
        if step_sizes is None and target is not None:
            log_eps = _adapt(log_eps, a.to(x.dtype), target, adapt, repeats, gamma)
    return log_w, torch.tensor(acc, dtype=torch.float64), torch.tensor(used, dtype=torch.float64), s.x


@dataclass
class AISResult:
    """log_Z: mean over repeats of the repeat estimates log_Z_repeats (R,); log_Z_sd their sd
    (0 for one repeat); log_w (R, n) float64; ess (R,) (sum w)^2 / sum w^2 per repeat;
    acceptance: mean acceptance probability, acceptance_per_temp and eps per inner temperature;
    direction "forward" (lower bound) or "reverse" (upper bound); degenerate: some repeat's
    ESS is below ESS_FLOOR of its chains or below 2 (or not finite): the estimate is then
    set by a handful of chains and is unreliable (`warning` says so); x: the chains' final
    states (forward runs: approximate samples of p, to be weighted by w)."""
    log_Z: float
    log_Z_sd: float
    log_Z_repeats: Tensor
    log_w: Tensor
    ess: Tensor
    acceptance: float
    acceptance_per_temp: Tensor
    eps: Tensor
    direction: str
    degenerate: bool = False
    x: Optional[Tensor] = None

    def warning(self) -> str:
        """'' or the line printed beside a degenerate estimate."""
        if not self.degenerate:
            return ""
        return (f"weights degenerate: ESS {float(self.ess.min()):.1f} of "
                f"{self.log_w.shape[1]} chains; the estimate is unreliable; use more --temps")


def _result(log_w, sign, acc, eps, direction):
    """Per-repeat estimates sign * (logsumexp(log w) - log n) and their summary."""
    n = log_w.shape[1]
    est = sign * (torch.logsumexp(log_w, 1) - math.log(n))
    sd = float(est.std()) if len(est) > 1 else 0.0
    ess = torch.tensor([evaluation.effective_sample_size(lw) for lw in log_w], dtype=torch.float64)
    mean_acc = float(acc.mean()) if len(acc) else float("nan")
    degenerate = bool((~(ess >= max(ESS_FLOOR * n, 2.0))).any())  # nan counts as degenerate
    return AISResult(float(est.mean()), sd, est, log_w, ess, mean_acc, acc, eps, direction,
                     degenerate)


def ais_log_Z(energy: Callable[[Tensor], Tensor], base, n_chains: int = 256,
              n_temps: int = 500, repeats: int = 1, schedule_kind: str = "sigmoid",
              transition: str = "hmc", n_leapfrog: int = 5, eps: float = 0.1,
              adapt: str = "global", step_sizes: Optional[Tensor] = None) -> AISResult:
    """Forward AIS from q0 = `base` to exp(-energy): log Z-hat = logsumexp(log w) - log n, a
    stochastic lower bound (E[log Z-hat] <= log Z; E[Z-hat] = Z).

    `repeats` independent runs of `n_chains` chains each (run together as one batch, each with
    its own step-size adaptation) give log_Z (their mean) and log_Z_sd (their spread). Chains
    run in the dtype of the base's samples; weights are float64. For exp(-f) on the box
    [-1, 1]^D see `BoxEnergy` and `box_bracket`."""
    _check(transition, adapt)
    betas = schedule(n_temps, schedule_kind)
    with _fixed_modules(energy, base), torch.no_grad():
        x = base_draws(base, n_chains, repeats)
        log_w, acc, used, x = anneal(energy, base, x, betas, transition, n_leapfrog, eps,
                                     step_sizes, adapt, repeats)
    res = _result(log_w.view(repeats, n_chains), 1.0, acc, used, "forward")
    res.x = x
    return res


def base_draws(base, n_chains, repeats):
    """n_chains * repeats starting points x ~ q0, drawn per repeat when the base samples in
    strata (a flows.FlowMixture: each repeat is then a stratified sample of the whole mixture,
    its estimate unbiased for Z; one draw would give each repeat only some members)."""
    n = n_chains * repeats
    if hasattr(base, "members") and repeats > 1:
        return torch.cat([base.sample_and_log_prob(n_chains)[0] for _ in range(repeats)]).detach()
    return base.sample_and_log_prob(n)[0].detach()


def reverse_ais_log_Z(energy: Callable[[Tensor], Tensor], base, x_start: Tensor,
                      n_temps: int = 500, repeats: int = 1, schedule_kind: str = "sigmoid",
                      transition: str = "hmc", n_leapfrog: int = 5, eps: float = 0.1,
                      adapt: str = "global", step_sizes: Optional[Tensor] = None
                      ) -> AISResult:
    """Reverse AIS (RAISE / BDMC) from chains at `x_start` (n, D), annealed b = 1 -> 0:
    log Z-hat_up = -(logsumexp(log w_rev) - log n) with E[w_rev] = 1/Z, a stochastic UPPER bound
    on log Z when x_start are exact samples of exp(-f)/Z (with data: a heuristic upper bound).

    `step_sizes` are per inner temperature in the forward order (e.g. a forward run's `.eps`);
    they are used reversed. `x_start` rows are split into `repeats` equal groups."""
    _check(transition, adapt)
    n = x_start.shape[0] // repeats
    if n < 1:
        raise ValueError(f"{x_start.shape[0]} starting points cannot make {repeats} repeats")
    betas = schedule(n_temps, schedule_kind).flip(0)
    steps = None if step_sizes is None else step_sizes.flip(0)
    with _fixed_modules(energy, base), torch.no_grad():
        log_w, acc, used, _ = anneal(energy, base, x_start[: n * repeats].detach(), betas,
                                     transition, n_leapfrog, eps, steps, adapt, repeats)
    return _result(log_w.view(repeats, n), -1.0, acc.flip(0), used.flip(0), "reverse")


def _check(transition, adapt):
    if transition not in TARGET_ACCEPTANCE:
        raise ValueError(f"unknown transition {transition!r}; choose one of: "
                         f"{', '.join(TARGET_ACCEPTANCE)}")
    if adapt not in ADAPT:
        raise ValueError(f"unknown adapt {adapt!r}; choose one of: {', '.join(ADAPT)}")


# ----------------------------------------------------------------------------- the bracket
@dataclass
class Bracket:
    """lower <= mean log p(x_test) <= upper (stochastically), gap = upper - lower;
    log_Z_lower (forward AIS) and log_Z_upper (reverse AIS from x_test) with both runs."""
    lower: float
    upper: float
    gap: float
    log_Z_lower: float
    log_Z_upper: float
    mean_neg_f: float
    forward: AISResult
    reverse: AISResult

    @property
    def reliable(self) -> bool:
        """False when either run's weights are degenerate (AISResult.degenerate)."""
        return not (self.forward.degenerate or self.reverse.degenerate)


def loglik_bracket(energy: Callable[[Tensor], Tensor], base, x_test: Tensor,
                   n_chains: int = 256, n_temps: int = 500, repeats: int = 1,
                   **kw) -> Bracket:
    """Bracket the test log-likelihood L = mean(-f(x_test)) - log Z (Grosse et al. 2015, BDMC):

        lower = mean(-f) - log Z-hat_up    (log Z-hat_up: reverse AIS started at x_test)
        upper = mean(-f) - log Z-hat_low   (log Z-hat_low: forward AIS from q0)

    Forward AIS under-estimates log Z in expectation, so `upper` over-states L; reverse AIS
    over-estimates log Z, so `lower` under-states it. The reverse bound is exact only when its
    starting points are exact samples of the model; started at held-out data (what is done
    here) it is a heuristic upper bound on log Z, trustworthy as far as the model fits the data.
    The gap shrinks as n_temps grows. The reverse run starts at a random subset of
    n_chains * repeats rows of x_test (all rows if fewer) and reuses the forward run's step
    sizes. kw go to both runs (schedule_kind, transition, n_leapfrog, eps, adapt)."""
    fwd = ais_log_Z(energy, base, n_chains, n_temps, repeats, **kw)
    rows = torch.randperm(x_test.shape[0], device=x_test.device)[: n_chains * repeats]
    kw = {k: v for k, v in kw.items() if k not in ("step_sizes", "adapt")}
    rev = reverse_ais_log_Z(energy, base, x_test[rows], n_temps, repeats,
                            step_sizes=fwd.eps, **kw)
    with _fixed_modules(energy), torch.no_grad():
        mean_neg_f = float(torch.cat([-energy(c).double() for c in x_test.split(8192)]).mean())
    lower, upper = mean_neg_f - rev.log_Z, mean_neg_f - fwd.log_Z
    return Bracket(lower, upper, upper - lower, fwd.log_Z, rev.log_Z, mean_neg_f, fwd, rev)


def box_bracket(energy: Callable[[Tensor], Tensor], x_fit: Tensor, x_test: Tensor,
                n_chains: int = 256, n_temps: int = 500, repeats: int = 1,
                dtype=torch.float64, **kw) -> Bracket:
    """`loglik_bracket` of exp(-f) on the box [-1, 1]^D (Z = int_box exp(-f) dy), run in the
    whitened atanh coordinates w of `BoxEnergy.fit(energy, x_fit)` from the base N(0, I), with
    the reverse chains started at w(x_test). Returned in y: lower, upper and mean_neg_f are
    converted back by log p(y) = log p_w(w) - log|dy/dw| (the mean log|dy/dw| over the test
    points; mean_neg_f is then the mean of -f(y) at the test points clamped to the box's
    inside, `BOX_EDGE`), and forward.x holds the forward chains' ends in y (their weights are
    the same in either coordinates). log Z and the gap are the same in both. `energy` must take
    `dtype` (the chains' precision); kw go to `loglik_bracket`."""
    box = BoxEnergy.fit(energy, x_fit, dtype).to(x_test.device)
    w_test = box.to_w(x_test.to(dtype))
    br = loglik_bracket(box, box_base(x_test.shape[1], dtype).to(x_test.device), w_test,
                        n_chains, n_temps, repeats, **kw)
    with _fixed_modules(box), torch.no_grad():
        to_y = float(box.log_jacobian(w_test).double().mean())
        br.forward.x = box.to_y(br.forward.x)
    return Bracket(br.lower - to_y, br.upper - to_y, br.gap, br.log_Z_lower, br.log_Z_upper,
                   br.mean_neg_f - to_y, br.forward, br.reverse)


def box_samples(energy: Callable[[Tensor], Tensor], x_fit: Tensor, n: int = 100,
                n_temps: int = 100, dtype=torch.float64, **kw) -> Tensor:
    """n approximate samples of exp(-f) on the box [-1, 1]^D: forward-AIS chains in the
    coordinates w of `BoxEnergy.fit(energy, x_fit)` after n_temps annealing steps from
    N(0, I), mapped back to y = tanh(mu + L w) (unweighted: approximate unless n_temps is
    large). kw go to `anneal` (transition, n_leapfrog, eps, ...)."""
    box = BoxEnergy.fit(energy, x_fit, dtype).to(x_fit.device)
    base = box_base(x_fit.shape[1], dtype).to(x_fit.device)
    with _fixed_modules(box, base), torch.no_grad():
        w0 = base.sample_and_log_prob(n)[0]
        return box.to_y(anneal(box, base, w0, schedule(n_temps), **kw)[3])


# ----------------------------------------------------------------------------- probes
@torch.no_grad()
def unbounded_ray(energy, dim: int, n_rays: int = 256, seed: int = 0,
                  radii=(1e2, 1e3, 1e4)) -> Optional[str]:
    """Whether exp(-f) provably has no normaliser on R^D: f(t v) not increasing in t along a
    ray v (one of the +-coordinate axes or n_rays random directions), so that exp(-f) does not
    fall off there (an MLP energy is asymptotically linear along rays, f(t v) ~ a(v) t: a(v) <= 0
    on one ray holds on a cone around it, whose integral diverges). Returns a description of
    such a ray, or None when no probe finds one (which proves nothing)."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.cat([torch.eye(dim), -torch.eye(dim)])
    rays = torch.cat([axes, torch.nn.functional.normalize(torch.randn(n_rays, dim, generator=g),
                                                         dim=1)]).double()
    module = copy.deepcopy(energy).double()
    f = torch.stack([module(t * rays).double() for t in radii])  # (radii, rays)
    bad = ((f[1:] <= f[:-1]).all(0)).nonzero().flatten()
    if len(bad) == 0:
        return None
    i = int(bad[0])
    return (f"f({radii[0]:g} v) = {float(f[0, i]):.4g}, f({radii[-1]:g} v) = "
            f"{float(f[-1, i]):.4g}")
