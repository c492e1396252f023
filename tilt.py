"""EBM tilts of a base generative model p_phi, and sampling from them.

A tilt re-weights a base density by an energy E (an ebm.EBM, the learned normaliser c unused):

    p_theta(x) = exp(-E(x)) p_phi(x) / Z,     Z = E_{x ~ p_phi} exp(-E(x)).

Latent tilt: the base is the VAE prior, p_theta(z) ∝ exp(-E(z)) N(z; 0, I), decoder unchanged.
Data-space tilt: the base is the VAE itself, log p_phi(x) ~ ELBO(x).

Objectives (`objective=`):
- "ml" (default): exact maximum likelihood of the tilted density on the unbiased positives,
      NLL = mean_i E(x+_i) + log Z,   log Z ~ logsumexp_j(-E(x-_j)) - log M,  x-_j ~ p_phi,
  with fresh base samples every step. Its gradient mean grad E(x+) - sum_j w_j grad E(x-_j),
  w = softmax(-E(x-)), is the exact ML gradient up to self-normalised importance sampling
  error, so the optimum is the tilted density closest in KL to the positives; the only
  estimate is log Z, which is cheap and accurate when the tilt is mild (report the ESS).
  It has no extra hyper-parameters. Why it is the default: see docs/tilt.md.
- "hackathon": mean E(x+) - mean E(x-) + 0.1 (mean E+^2 + mean E-^2) + a WGAN-GP gradient
  penalty (|grad E(x^)| - 1)^2 at random interpolates x^ of positives and negatives
  (Gulrajani et al. 2017), negatives = base samples. It is a critic loss: it separates
  positives from base samples but its optimum is not the tilted maximum-likelihood density.

Sampling: self-normalised importance resampling (SNIR) from the base with log-weights -E
(`snir`, which reports the effective sample size), or Langevin (samplers.langevin) on
E(z) + |z|^2 / 2 in latent space. The data-space tilt is sampled under the model it was trained
on (`sample_data_tilt`): "ml" trains exp(-E(x)) times the law of the VAE's decoded means, so
its Langevin chains run in latent space on E(decode(z)) + |z|^2 / 2; "cd" trains
exp(-E(x)) exp(ELBO(x)) and its chains run in data space on E(x) - ELBO(x).

The 2D example: the base is a 3-component Gaussian mixture with weights BASE_WEIGHTS, and
100 samples from the same components with weights TARGET_WEIGHTS teach the tilt (stratified by
default in train_tilt.py: exactly 30/40/30, `mixture_sample(..., stratified=True)`).
"""
import copy
import math
import time

import numpy as np
import torch

import util
from flows import std_normal_log_prob
from evaluation import effective_sample_size

OBJECTIVES = ("ml", "hackathon")


# ----------------------------------------------------------------------------- log Z and weights
def log_mean_exp(a, dim=0):
    """log (1/n) sum exp(a), computed with logsumexp."""
    return torch.logsumexp(a, dim) - math.log(a.shape[dim])


def log_Z_importance(E, x_base):
    """log Z = log E_{p_phi} exp(-E(x)) from base samples x_base (M, D), by logsumexp."""
    return log_mean_exp(-E(x_base))


def snir(log_w, n, generator=None, method="systematic"):
    """Self-normalised importance resampling: n indices into the base samples, drawn with
    probabilities w = softmax(log_w), and the ESS of the weights.

    "systematic" (default) uses one uniform u and the points (u + k) / n, k < n, against the
    cumulative weights: lower variance than "multinomial", and with equal weights and n equal
    to the number of base samples it returns every base sample exactly once, in order."""
    log_w = log_w.detach().double().flatten()
    w = torch.softmax(log_w, 0)
    if method == "systematic":
        u = (torch.rand(1, generator=generator, dtype=torch.float64) +
             torch.arange(n, dtype=torch.float64)) / n
        cdf = torch.cumsum(w, 0)
        cdf[-1] = 1.0
        idx = torch.searchsorted(cdf, u.to(cdf.device), right=True).clamp_max(len(w) - 1)
    elif method == "multinomial":
        idx = torch.multinomial(w.cpu(), n, replacement=True, generator=generator).to(w.device)
    else:
        raise ValueError(f"unknown resampling method {method!r}; use systematic or multinomial")
    return idx, effective_sample_size(log_w)


# ----------------------------------------------------------------------------- objectives
def ml_loss(E, x_pos, x_base):
    """Negative log-likelihood of the tilted density (up to the base's own log p_phi(x+),
    which does not depend on E): mean E(x+) + log Z, log Z by importance sampling from the
    base. Returns (loss, log Z estimate, E(x+))."""
    e_pos = E(x_pos)
    log_Z = log_Z_importance(E, x_base)
    return e_pos.mean() + log_Z, log_Z, e_pos


def gradient_penalty(E, x_pos, x_neg):
    """mean (|grad E(x^)| - 1)^2 at x^ = t x+ + (1 - t) x-, t ~ U(0, 1) per pair."""
    n = min(len(x_pos), len(x_neg))
    t = torch.rand(n, 1, device=x_pos.device)
    x_hat = (t * x_pos[:n] + (1 - t) * x_neg[:n]).requires_grad_(True)
    (g,) = torch.autograd.grad(E(x_hat).sum(), x_hat, create_graph=True)
    return ((g.norm(dim=1) - 1) ** 2).mean()


def hackathon_loss(E, x_pos, x_neg, reg=0.1, gp=1.0):
    """mean E+ - mean E- + reg (mean E+^2 + mean E-^2) + gp * gradient_penalty."""
    e_pos, e_neg = E(x_pos), E(x_neg)
    loss = e_pos.mean() - e_neg.mean() + reg * (e_pos.pow(2).mean() + e_neg.pow(2).mean())
    if gp > 0:
        loss = loss + gp * gradient_penalty(E, x_pos, x_neg)
    return loss, e_pos, e_neg


def finite_step(E, opt, loss, good):
    """One optimiser step of E on `loss`, guarded: on a non-finite loss E is restored to the
    `good` weights and None is returned (the caller stops); otherwise the weights before the
    step are returned as the new last-good copy (a deep copy, not a live reference)."""
    if not math.isfinite(loss.item()):
        E.load_state_dict(good)
        return None
    good = copy.deepcopy(E.state_dict())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return good


def fit_tilt(E, x_pos, sample_base, steps, objective="ml", lr=1e-3, batch=None, weight_decay=0.0,
             reg=0.1, gp=1.0, on_step=None):
    """Train the energy E of the tilt exp(-E) p_phi on the positives x_pos.

    sample_base(step) returns fresh base samples (the importance samples of log Z for "ml",
    the negatives for "hackathon"). `batch`: positives per step (None = all). A non-finite
    loss stops training, restores the last finite weights and sets hist["nan_step"].
    `on_step(step, metrics)` is called every step; when it returns True training stops after
    that step (Ctrl-C) and hist["stopped_at"] is the number of steps done. Returns the
    history dict."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    opt = torch.optim.Adam(E.parameters(), lr=lr, weight_decay=weight_decay)
    hist = {"loss": [], "log_Z": [], "nan_step": None, "stopped_at": None}
    good = copy.deepcopy(E.state_dict())
    for step in range(steps):
        xp = x_pos if batch is None or batch >= len(x_pos) else \
            x_pos[torch.randint(len(x_pos), (batch,), device=x_pos.device)]
        xb = sample_base(step)
        if objective == "ml":
            loss, log_Z, e_pos = ml_loss(E, xp, xb)
            metrics = {"loss": loss.item(), "log_Z": log_Z.item(), "E_pos": e_pos.mean().item()}
        else:
            loss, e_pos, e_neg = hackathon_loss(E, xp, xb, reg=reg, gp=gp)
            metrics = {"loss": loss.item(), "E_pos": e_pos.mean().item(),
                       "E_neg": e_neg.mean().item()}
        good = finite_step(E, opt, loss, good)
        if good is None:
            hist["nan_step"] = step
            break
        hist["loss"].append(metrics["loss"])
        hist["log_Z"].append(metrics.get("log_Z", float("nan")))
        if on_step is not None and on_step(step, metrics):
            hist["stopped_at"] = step + 1
            break
    return hist


# ----------------------------------------------------------------------------- tilts of a flow
def in_box(x):
    """Rows of x (N, D) inside the images' closed box [-1, 1]^D, shape (N,) bool."""
    return ((x >= -1) & (x <= 1)).all(-1)


def iid_draws(base, n):
    """n independent draws of a flow; of a flows.FlowMixture each from a member chosen at
    random (its own `sample` stratifies: fixed counts per member, in member order)."""
    if not hasattr(base, "members"):
        return base.sample(n)
    flows = base.active()
    counts = torch.bincount(torch.randint(len(flows), (n,)), minlength=len(flows)).tolist()
    x = torch.cat([f.sample(c) for f, c in zip(flows, counts) if c > 0])
    return x[torch.randperm(n, device=x.device)]


class BaseOnBox(torch.nn.Module):
    """A base flow q0 restricted to the box [-1, 1]^D and renormalised,

        q0_box(x) = q0(x) 1_box(x) / Q,    Q = P_q0(box),

    Q estimated once from n fresh draws of q0. The start and the proposal of AIS towards a
    tilt on the box (annealing, `transition="independence"`): every chain starts where the tilt
    has mass, and log Z = log Q + log E_{q0_box} exp(-g), the two factors estimated from
    independent draws. Samples by rejection (exact draws of q0 given the box)."""

    def __init__(self, base, n=20_000, chunk=5000):
        super().__init__()
        self.base, self.dim = base, base.dim
        with torch.no_grad():
            inside = sum(int(in_box(iid_draws(base, min(chunk, n - i))).sum())
                         for i in range(0, n, chunk))
        if inside == 0:
            raise ValueError(f"none of {n} draws of the base falls inside the box")
        self.log_Q = math.log(inside / n)

    @property
    def _anchor(self):
        return self.base._anchor

    def log_prob(self, x):
        """log q0(x) - log Q inside the box, -inf outside, shape (N,)."""
        lp = self.base.log_prob(x) - self.log_Q
        return torch.where(in_box(x), lp, torch.full_like(lp, -math.inf))

    def sample_and_log_prob(self, n):
        """n exact draws of q0 given the box (rejection) and their log q0_box."""
        kept, k = [], 0
        while k < n:
            y = iid_draws(self.base, max(2 * (n - k), 64))
            kept.append(y[in_box(y)])
            k += len(kept[-1])
        x = torch.cat(kept)[:n]
        return x, self.log_prob(x)

    def sample(self, n):
        return self.sample_and_log_prob(n)[0]


class FlowTilt(torch.nn.Module):
    """An EBM built on a flow: the exponential tilt of a base flow q0 by a learned energy g,

        p(x) = q0(x) exp(-g(x)) / Z,    Z = E_{y ~ q0} exp(-g(y)),

    i.e. the EBM with energy f(x) = g(x) - log q0(x) (`forward`). g is an ebm.EBM; its
    learned c is NCE's guess of log Z (log p - log q0 = -g - c is NCE's logit). With
    `box=True` (images) p lives on the box [-1, 1]^D, as every image EBM here: g is +inf
    outside it (`g_box`), so Z = E_q0[exp(-g) 1_box] and base samples outside carry no
    weight. With `bound` B, g is squashed to (-B, B): a correction of the base, not a new
    density (an unbounded g learns spikes where the base rarely samples, and a larger sample
    of the base then finds them: importance weights with an ESS of 1). Training touches g only: the base is frozen while g learns, so its samples can be
    drawn once into a bank. log Z comes from importance sampling from q0 (`log_Z_is`),
    cross-checked by AIS from q0 (ais.loglik_bracket with q0 as the base: the path
    q0 exp(-b g))."""

    def __init__(self, base, g, box=False, bound=None):
        super().__init__()
        self.base, self.g, self.box, self.bound = base, g, box, bound

    @property
    def c(self):
        return self.g.c

    def g_box(self, x):
        """g(x) (B tanh(g / B) with a `bound` B: the tilt reweights the base by at most
        e^(2B), so its importance weights cannot grow without bound where the base rarely
        samples), and +inf outside [-1, 1]^D when the tilt lives on the box."""
        g = self.g(x)
        if self.bound:
            g = self.bound * torch.tanh(g / self.bound)
        if not self.box:
            return g
        return torch.where(in_box(x), g, torch.full_like(g, math.inf))

    def forward(self, x):
        """The energy f(x) = g(x) - log q0(x), shape (N,)."""
        return self.g_box(x) - self.base.log_prob(x)

    def log_prob(self, x):
        """log q0(x) - g(x) - c, normalised as well as c ~ log Z; the base's density under no
        gradient, so a step on it moves g and c only (FCE with --ebm_on_flow: the flow's own
        step then sees the EBM as a fixed function, as in plain FCE)."""
        return self.base.log_prob(x).detach() - self.g_box(x) - self.g.c

    def logit(self, x):
        """log p(x) - log q0(x) under NCE's c: -g(x) - c (the classifier of x against q0)."""
        return -self.g_box(x) - self.g.c


def nce_tilt_loss(tilt, x_data, y_base):
    """NCE of p = q0 exp(-g - c) against its own base (Gutmann & Hyvarinen 2010), equal numbers
    of data and base samples: -[mean log sigma(h(x)) + mean log sigma(-h(y))], h = -g - c.
    The base's density cancels from the logit, so no flow pass is needed."""
    return -(torch.nn.functional.logsigmoid(tilt.logit(x_data)).mean()
             + torch.nn.functional.logsigmoid(-tilt.logit(y_base)).mean())


def ml_tilt_loss(tilt, x_data, y_base):
    """The tilt's exact negative log-likelihood up to -E log q0 (constant in g): mean g(x) +
    log Z, log Z by importance sampling on the base samples (`ml_loss`)."""
    return ml_loss(tilt.g_box, x_data, y_base)[0]


TILT_LOSSES = {"nce": nce_tilt_loss, "ml": ml_tilt_loss}


def tilt_step(tilt, x_data, y_base, opt, loss="ml"):
    """One step of g on a data batch against base samples (`TILT_LOSSES[loss]`); returns the
    loss before the step (NaN, and no step, when it or a gradient is not finite)."""
    value = TILT_LOSSES[loss](tilt, x_data, y_base)
    if not torch.isfinite(value) or not util.guarded_step(opt, value):
        return value.detach() * math.nan
    return value.detach()


def base_samples(base, n, generator, chunk=5000, until=None):
    """n samples of a frozen base flow, its base draws from `generator` (CPU) in chunks of
    `chunk`: the same numbers at every call with an equally seeded generator (a bank rebuilt
    on resume). `until(drawn, cpu_s)`, asked after each chunk with the count drawn and the
    process CPU-seconds taken so far, ends the drawing early when true: the samples are then
    the first whole chunks of the n."""
    sizes = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    out, start = [], time.process_time()
    with torch.no_grad():
        for k in sizes:
            z = torch.randn(k, base.dim, generator=generator).to(base._anchor)
            out.append(base.sample(k, z))
            drawn = sum(map(len, out))
            if until is not None and drawn < n and until(drawn, time.process_time() - start):
                break
    return torch.cat(out)


@torch.no_grad()
def log_Z_is(g, y_base, chunk=8192):
    """log Z = log E_q0 exp(-g) by importance sampling on base samples y_base (M, D):
    (log Z-hat, ESS, se), log Z-hat = logsumexp(-g(y)) - log M (unbiased for Z, so biased low
    in log Z, like forward AIS), ESS = (sum w)^2 / sum w^2 and the delta-method standard
    error se(log Z-hat) = sqrt((M / ESS - 1) / M)."""
    log_w = torch.cat([-g(c).double() for c in y_base.split(chunk)])
    m = len(log_w)
    ess = effective_sample_size(log_w)
    return float(log_mean_exp(log_w)), ess, math.sqrt(max(m / ess - 1.0, 0.0) / m)


@torch.no_grad()
def tilt_log_prob(tilt, x, log_Z, chunk=8192):
    """log p(x) = log q0(x) - g(x) - log Z, float64, shape (N,)."""
    return torch.cat([tilt.base.log_prob(c).double() - tilt.g_box(c).double()
                      for c in x.split(chunk)]) - log_Z


# ----------------------------------------------------------------------------- data space
def data_U(E, vae):
    """U(x) = E(x) - ELBO(x) ~ -log(exp(-E(x)) p_phi(x)), the data-space tilt's energy."""
    return lambda x: E(x) - vae.elbo(x)


def fit_data_tilt(E, x_pos, vae, steps, lr=1e-3, n_neg=128, langevin_steps=20, eps=0.02,
                  reg=0.1, on_step=None):
    """Data-space tilt p_theta(x) ∝ exp(-E(x)) p_phi(x), log p_phi(x) ~ ELBO(x).

    Contrastive-divergence estimate of the ML gradient: negatives are short Langevin chains
    on E(x) - ELBO(x) started at VAE samples (decoded means of prior draws), loss
    mean E(x+) - mean E(x-) + reg (mean E+^2 + mean E-^2); the L2 term keeps the energies
    from drifting. Stops at a non-finite loss with the last finite weights (hist["nan_step"]),
    or after a step whose `on_step` returned True (hist["stopped_at"], as in fit_tilt)."""
    from samplers import langevin

    opt = torch.optim.Adam(E.parameters(), lr=lr)
    hist = {"loss": [], "nan_step": None, "stopped_at": None}
    good = copy.deepcopy(E.state_dict())
    U = data_U(E, vae)
    for step in range(steps):
        x0, _ = vae.sample(n_neg)
        x_neg = langevin(U, x0, langevin_steps, eps, freeze=(E, vae)) if langevin_steps else x0
        e_pos, e_neg = E(x_pos), E(x_neg)
        loss = e_pos.mean() - e_neg.mean() + reg * (e_pos.pow(2).mean() + e_neg.pow(2).mean())
        good = finite_step(E, opt, loss, good)
        if good is None:
            hist["nan_step"] = step
            break
        hist["loss"].append(loss.item())
        if on_step is not None and on_step(step, {"loss": loss.item(),
                                                  "E_pos": e_pos.mean().item(),
                                                  "E_neg": e_neg.mean().item()}):
            hist["stopped_at"] = step + 1
            break
    return hist


def data_tilt_latent_U(E, vae):
    """U(z) = E(decode(z)) + |z|^2 / 2. Langevin on it in latent space gives z whose decoded
    means x = decode(z) follow exp(-E(x)) p_dec(x) / Z exactly, p_dec the law of the decoded
    means of prior draws (`vae.sample`): the model that the "ml" data tilt is trained on."""
    return lambda z: E(vae.decode(z)) + 0.5 * (z * z).sum(-1)


# which model each data-tilt objective trains, as printed and stored with the samples
DATA_TILT_MODELS = {
    "ml": "exp(-E(x)) p_dec(x), p_dec = decoded means of N(0, I) draws (the training base)",
    "cd": "exp(-E(x)) exp(ELBO(x)) (the contrastive-divergence model)",
}


def sample_data_tilt(E, vae, objective, n, steps, eps, x0=None):
    """n Langevin samples of the data-space tilt that `objective` trained, and its description
    (DATA_TILT_MODELS): training and sampling target the same model.

    "ml" (fit_tilt with base samples vae.sample): the base is the law of decoded means, so
    the chains run in latent space on `data_tilt_latent_U` from N(0, I) draws (no ELBO) and
    are decoded. "cd" (fit_data_tilt): data-space Langevin on E(x) - ELBO(x) from VAE samples
    (or x0), as its negatives are made, clamped to [0, 1] at the end."""
    from samplers import langevin

    if objective == "ml":
        device = next(vae.parameters()).device
        z = langevin(data_tilt_latent_U(E, vae), torch.randn(n, vae.z_dim, device=device),
                     steps, eps, freeze=(E, vae))
        with torch.no_grad():
            return vae.decode(z), DATA_TILT_MODELS["ml"]
    if objective == "cd":
        if x0 is None:
            x0, _ = vae.sample(n)
        x = langevin(data_U(E, vae), x0, steps, eps, freeze=(E, vae)).clamp(0, 1)
        return x, DATA_TILT_MODELS["cd"]
    raise ValueError(f"unknown data-tilt objective {objective!r}; choose ml or cd")


# ----------------------------------------------------------------------------- latent space
def latent_U(E):
    """U(z) = E(z) + |z|^2 / 2 = -log(exp(-E(z)) N(z; 0, I)) + const, for Langevin."""
    return lambda z: E(z) + 0.5 * (z * z).sum(-1)


def latent_log_density(E):
    """Unnormalised log p_theta(z) = -E(z) + log N(z; 0, I) (normalise on a grid in 2D)."""
    return lambda z: -E(z) + std_normal_log_prob(z)


# ----------------------------------------------------------------------------- the 2D example
MIXTURE_MEANS = ((-1.0, -0.33), (0.0, 0.67), (1.0, -0.33))
MIXTURE_STD = 0.3  # isotropic std of each component (the example fixes only means and weights)
BASE_WEIGHTS = (0.8, 0.1, 0.1)
TARGET_WEIGHTS = (0.3, 0.4, 0.3)
MIXTURE_BOUND = 2.5  # plotting / grid half-width


def stratified_counts(n, weights):
    """Per-component counts summing exactly to n: floor(w n), then +1 for the largest
    remainders (30/40/30 for n = 100 and weights .3/.4/.3)."""
    raw = np.asarray(weights, float) / np.sum(weights) * n
    counts = np.floor(raw + 1e-9).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts.tolist()


def mixture_sample(n, weights, generator=None, stratified=False):
    """n points of the Gaussian mixture with component `weights`, and their components.

    stratified=False: components i.i.d. from `weights` (the counts are multinomial);
    stratified=True: exactly stratified_counts(n, weights) points per component, in random
    order, so only the positions within each component are random."""
    if stratified:
        counts = stratified_counts(n, weights)
        comp = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        comp = comp[torch.randperm(n, generator=generator)]
    else:
        w = torch.tensor(weights, dtype=torch.float64)
        comp = torch.multinomial(w, n, replacement=True, generator=generator)
    means = torch.tensor(MIXTURE_MEANS, dtype=torch.float32)
    x = means[comp] + MIXTURE_STD * torch.randn(n, 2, generator=generator)
    return x, comp


def mixture_log_prob(weights):
    """log p(x) of the mixture with component `weights`, as a function of (N, 2) x."""
    def log_p(x):
        means = torch.tensor(MIXTURE_MEANS, dtype=x.dtype, device=x.device)
        lw = torch.log(torch.tensor(weights, dtype=x.dtype, device=x.device))
        d2 = ((x[:, None, :] - means[None]) ** 2).sum(-1)
        s2 = MIXTURE_STD ** 2
        return torch.logsumexp(lw - d2 / (2 * s2) - math.log(2 * math.pi * s2), 1)
    return log_p


def tv(p, q):
    """Total-variation distance 0.5 sum |p - q| of two histograms."""
    return 0.5 * float(np.abs(np.asarray(p, float) - np.asarray(q, float)).sum())
