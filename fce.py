"""Flow contrastive estimation (Gao et al. 2020): the value function, the noise q, who steps,
and one iteration. NCE (Gutmann & Hyvarinen 2010) is the same with a fixed Gaussian q.

An EBM p_theta(x) = exp(-f_theta(x) - c) and a noise model q play (eq. 5 of the paper)

    V(alpha, theta) = E_data log p/(p+q) + E_q log q/(p+q),

the EBM ascending V, the flow q_alpha descending V + lambda (-E_data log q_flow) (lambda =
`flow_mle`; the likelihood term keeps q a density model where V's gradient saturates), plus
a small likelihood term on the fixed Gaussian's samples against holes (`Rule.flow_loss`). The
noise is q = (1 - m) q_flow + m g, a fixed Gaussian g fitted to the data keeping the plane
covered (m = `mix`; 0 is the paper's FCE).

Who steps (`Rule`):
- "every": the EBM steps at every iteration, the flow at every `flow_every`-th one as well
  (both from the same V; flow_every = 1 is both models at every iteration);
- "threshold": the paper's rule. The EBM steps while the accuracy a of the classifier
  "data iff p > q" on data against the flow's *own* samples is below the threshold T,
  otherwise the flow steps (one model per iteration). Against a perfect flow a = 1/2, so
  any T in (1/2, 1) can be reached by a flow that learns. The a of iteration t (measured
  before its step, on its batch) decides who steps at t + 1, so that an iteration computes
  its noise once: with a graph when the flow steps, from the cache when the EBM does.
  T is fixed (`target` 0) or tracks a target share rho of flow steps (stochastic
  approximation, `Rule.next_threshold`):

      T <- clip(T + eta (1[flow stepped] - rho), 1/2, 1),

  whose fixed point is the T with P(a >= T) = rho: the flow steps at the rho of the
  iterations where the EBM tells its samples from the data best. A fixed T suits one
  data set: the accuracy the flow can push down to depends on how close its family comes
  to the data (an affine MAF: about 0.6 on 8gaussians), so a T below that starves the EBM
  and one above it starves the flow once the EBM has learned.

Paying for the flow only when it changes: between flow steps the flow is fixed, so its
samples, their log q and log q of the coming data batches are computed once, without a
graph, for a window of iterations (`Contrast`). The base draws of iteration `step` come from a
generator seeded by (seed, step) on the CPU, so a cached iteration sees exactly the noise a
recomputed one would, on every device and after a resume. The noise passes run in eval mode,
so a flow with running statistics (`--maf_bn`) is not moved by them; its statistics move
once per flow step, on that step's data batch (`Contrast.flow_changed`).
"""
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

import util

RULES = ("every", "threshold")


# ----------------------------------------------------------------------------- value function
def value_function(log_p_data: Tensor, log_q_data: Tensor, log_p_noise: Tensor,
                   log_q_noise: Tensor) -> tuple[Tensor, Tensor]:
    """V = E_data log p/(p+q) + E_q log q/(p+q) and the accuracy of "data iff p > q".

    log p/(p+q) = logsigmoid(log p - log q), so V is computed in log space. V = 2 log(1/2)
    when p = q; the EBM maximises V, the flow minimises it. The accuracy is averaged over the
    two batches (each weighted 1/2 whatever its size)."""
    d_data = log_p_data - log_q_data
    d_noise = log_q_noise - log_p_noise
    V = F.logsigmoid(d_data).mean() + F.logsigmoid(d_noise).mean()
    acc = 0.5 * ((d_data > 0).float().mean() + (d_noise > 0).float().mean())
    return V, acc


# ----------------------------------------------------------------------------- the noise q
class Noise(NamedTuple):
    """One iteration's contrast: noise samples y, log q at the data x and at y (q the
    mixture), log q_flow(x), how many of the y (the first ones) are the flow's own, and
    log q_flow at the others (the fixed Gaussian's samples; empty without a mixture)."""
    y: Tensor
    log_q_x: Tensor
    log_q_y: Tensor
    log_qf_x: Tensor
    n_flow: int
    log_qf_yg: Tensor


def base_draws(seed: int, step: int, n_flow: int, n_gauss: int, dim: int):
    """N(0, I) draws of iteration `step` for the flow and the Gaussian, from a CPU generator
    seeded by (seed, step): the same numbers whoever asks, whenever, on any device."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2 ** 63))
    z = torch.randn(n_flow + n_gauss, dim, generator=gen)
    return z[:n_flow], z[n_flow:]


class Contrast:
    """q = (1 - m) q_flow + m g, with the flow's part cached between flow steps.

    Of the n noise points, n_g = round(mix n) are drawn from g and n - n_g from the flow, and
    m = n_g / n is that realised fraction: the density of a noise point drawn uniformly from
    the batch is exactly (1 - m) q_flow + m g for every n (`mix` itself only when mix n is
    whole).

    `live(step, x)` builds the noise with an autograd graph through the flow (a flow step
    needs it); `cached(step, batch_at)` returns the same numbers without a graph, computed
    for `window` iterations at once (`batch_at(s)`: the data batch of iteration s, or None
    past the end of the epoch). Both pass the flow in eval mode, which leaves running
    statistics (a BatchNorm flow's) where they are, so the flow is one fixed density between
    flow steps. `flow_changed()` must be called after every flow step: it moves such
    statistics once, on the data batch of the last `live` call, and drops the cache."""

    def __init__(self, flow, n: int, seed: int, gauss=None, mix: float = 0.0,
                 window: int = 8):
        if mix > 0 and gauss is None:
            raise ValueError("a noise mixture needs the Gaussian g")
        self.flow, self.gauss, self.seed, self.window = flow, gauss, seed, window
        self.n_gauss = int(round(mix * n)) if mix > 0 else 0
        self.n_flow = n - self.n_gauss
        self.mix = self.n_gauss / n  # the realised fraction m
        self._statistics = any(hasattr(mod, "running_mean") for mod in flow.modules())
        self._live_x: Optional[Tensor] = None
        self._cache: dict[int, Noise] = {}

    def _noise(self, steps: list[int], xs: list[Tensor]) -> list[Noise]:
        """The noise of several iterations in one batched pass of the flow (in eval mode)."""
        with util.mode(self.flow, training=False):
            return self._noise_passes(steps, xs)

    def _noise_passes(self, steps, xs):
        dev = self.flow._anchor.device
        dtype = self.flow._anchor.dtype
        draws = [base_draws(self.seed, s, self.n_flow, self.n_gauss, self.flow.dim)
                 for s in steps]
        z = torch.cat([d[0] for d in draws]).to(dev, dtype)
        y_f, log_qf_yf = self.flow.sample_and_log_prob(len(z), z=z)
        x = torch.cat(xs)
        if self.n_gauss:
            e = torch.cat([d[1] for d in draws]).to(dev, dtype)
            y_g, log_g_yg = self.gauss.sample_and_log_prob(len(e), z=e)
            log_qf_rest = self.flow.log_prob(torch.cat([x, y_g]))
            log_qf_x, log_qf_yg = log_qf_rest[:len(x)], log_qf_rest[len(x):]
            log_g_x, log_g_yf = self.gauss.log_prob(torch.cat([x, y_f])).split([len(x), len(y_f)])
            n = self.n_flow + self.n_gauss
            a = math.log(self.n_flow / n) if self.n_flow else -math.inf
            b = math.log(self.n_gauss / n)
            log_q_x = torch.logaddexp(log_qf_x + a, log_g_x + b)
            log_q_yf = torch.logaddexp(log_qf_yf + a, log_g_yf + b)
            log_q_yg = torch.logaddexp(log_qf_yg + a, log_g_yg + b)
        else:
            log_qf_x = log_q_x = self.flow.log_prob(x)
            log_q_yf = log_qf_yf
            log_qf_yg = log_qf_x[:0]
        out = []
        nx, nf, ng = len(xs[0]), self.n_flow, self.n_gauss
        for i in range(len(steps)):
            fx, ff, fg = slice(i * nx, (i + 1) * nx), slice(i * nf, (i + 1) * nf), \
                slice(i * ng, (i + 1) * ng)
            if ng:
                y = torch.cat([y_f[ff], y_g[fg]])
                log_q_y = torch.cat([log_q_yf[ff], log_q_yg[fg]])
            else:
                y, log_q_y = y_f[ff], log_q_yf[ff]
            out.append(Noise(y, log_q_x[fx], log_q_y, log_qf_x[fx], nf, log_qf_yg[fg]))
        return out

    def live(self, step: int, x: Tensor) -> Noise:
        """The noise of iteration `step` with a graph through the flow (reparameterised)."""
        self._live_x = x
        return self._noise([step], [x])[0]

    def cached(self, step: int, batch_at: Callable[[int], Optional[Tensor]]) -> Noise:
        """The noise of iteration `step` without a graph; on a miss, computes the window
        step, step + 1, ... (as far as `batch_at` has batches) in one pass. With window 0
        it is recomputed live at every call (the reference the cache is tested against)."""
        if self.window == 0:
            return self.live(step, batch_at(step))
        with torch.no_grad():
            return self._cached(step, batch_at)

    def _cached(self, step, batch_at):
        if step not in self._cache:
            steps, xs = [], []
            for s in range(step, step + self.window):
                x = batch_at(s)
                if x is None:
                    break
                steps.append(s)
                xs.append(x)
            self._cache = dict(zip(steps, self._noise(steps, xs)))
        return self._cache.pop(step)

    def flow_changed(self) -> None:
        """After a flow step: running statistics (if the flow has any) move once, by a
        training-mode density pass over the last live data batch; the cache is dropped."""
        if self._statistics and self._live_x is not None:
            with torch.no_grad(), util.mode(self.flow, training=True):
                self.flow.log_prob(self._live_x)
        self._cache = {}


# ----------------------------------------------------------------------------- who steps
@dataclass(frozen=True)
class Rule:
    """Who steps (see the module docstring): name "every" or "threshold", the flow's period
    under "every", the accuracy threshold under "threshold" (its starting value when it
    tracks a target), the target share of flow steps (0: the threshold stays fixed) and the
    gain of its update, and lambda and eps of the flow's loss."""
    name: str = "every"
    flow_every: int = 1
    threshold: float = 0.6
    flow_mle: float = 1.0
    flow_cover: float = 0.0
    target: float = 0.0
    gain: float = 2e-3

    def flow_loss(self, V: Tensor, noise: Noise) -> Tensor:
        """What the flow descends: V - lambda E_data log q_flow - eps E_g log q_flow.

        The last term (eps = flow_cover, on the fixed Gaussian's samples of the mixture)
        keeps the flow's density from collapsing to astronomically small values where the
        data has little mass but g has some (holes: an affine MAF otherwise reaches
        log q = -1e14 in the corners of the plane). With lambda = flow_mle > 0 it shifts the
        flow's likelihood target to (lambda p_data + eps g) / (lambda + eps), costing at most
        log(1 + eps / lambda) nats on the data ((p_data + eps g) / (1 + eps) and log(1 + eps)
        at the default lambda = 1); with lambda = 0 the likelihood target is g alone."""
        loss = V - self.flow_mle * noise.log_qf_x.mean()
        if self.flow_cover and len(noise.log_qf_yg):
            loss = loss - self.flow_cover * noise.log_qf_yg.mean()
        return loss

    def flow_due(self, step: int) -> bool:
        """Under "every": does the flow step (too) at iteration `step`?"""
        return self.name == "every" and step % self.flow_every == self.flow_every - 1

    def flow_turn(self, step: int, accuracy_flow: Optional[float], threshold: float) -> bool:
        """Does the flow step at iteration `step`? Under "threshold": when the accuracy on
        the flow's own samples of the previous iteration (None before the first) reached
        `threshold` (the current one, `next_threshold`)."""
        if self.name == "every":
            return self.flow_due(step)
        return accuracy_flow is not None and accuracy_flow >= threshold

    def next_threshold(self, threshold: float, flow_stepped: bool) -> float:
        """T after an iteration: unchanged when fixed, else
        clip(T + gain (1[flow stepped] - target), 1/2, 1)."""
        if self.name != "threshold" or not self.target:
            return threshold
        return min(1.0, max(0.5, threshold + self.gain * (float(flow_stepped) - self.target)))

    def check(self) -> Optional[str]:
        """None, or why this rule cannot work (one line naming the fix)."""
        if self.name not in RULES:
            return f"unknown --rule {self.name!r}; choose one of: {', '.join(RULES)}"
        if self.flow_every < 1:
            return "--flow_every must be a positive integer"
        if self.name == "threshold" and not 0.5 < self.threshold < 1:
            return (f"--threshold {self.threshold:g} cannot work with --rule threshold: the "
                    f"accuracy against the flow's own samples falls to 0.5 as the flow learns "
                    f"and never exceeds 1, so the threshold must lie in (0.5, 1); the paper "
                    f"uses 0.6")
        if self.name == "threshold" and not 0 <= self.target < 1:
            return (f"--flow_target {self.target:g} cannot be tracked: it is the share of "
                    f"iterations in which the flow steps, so it must lie in (0, 1) (or be 0, "
                    f"which keeps --threshold fixed)")
        return None


class StepResult(NamedTuple):
    """V before the step (not finite, and no step, when a loss or gradient was not finite),
    the accuracy on the whole noise and on the flow's own samples, and which models
    stepped."""
    V: Tensor
    accuracy: Tensor
    accuracy_flow: Tensor
    ebm: bool
    flow: bool


def _contrast(ebm, x: Tensor, noise: Noise, ebm_learns: bool = True):
    """V, its accuracy and the accuracy on the flow's own samples, for one noise batch.
    When the EBM does not learn from this V (a flow step of "threshold"), log p is taken
    with a graph only at the flow's own samples, the one place V depends on the flow
    through the EBM; at the data and the Gaussian's samples it is a constant."""
    n, k = x.shape[0], noise.n_flow
    if ebm_learns:
        log_p_x, log_p_y = ebm.log_prob(torch.cat([x, noise.y])).split([n, len(noise.y)])
    else:
        with torch.no_grad():
            log_p_x, log_p_yg = ebm.log_prob(torch.cat([x, noise.y[k:]])).split(
                [n, len(noise.y) - k])
        log_p_y = torch.cat([ebm.log_prob(noise.y[:k]), log_p_yg])
    V, acc = value_function(log_p_x, noise.log_q_x, log_p_y, noise.log_q_y)
    acc_flow = 0.5 * ((log_p_x > noise.log_q_x).float().mean()
                      + (noise.log_q_y[:k] > log_p_y[:k]).float().mean()) if k else acc
    return V, acc, acc_flow


def fce_step(ebm, contrast: Contrast, step: int, x: Tensor, batch_at, opt_ebm, opt_flow,
             rule: Rule, flow_turn: Optional[bool] = None) -> StepResult:
    """One FCE/NCE iteration on the data batch x (= batch_at(step)).

    `flow_turn`: does the flow step (`Rule.flow_turn`; None: `rule.flow_due(step)`, the
    schedule of "every"). Without a flow step the EBM ascends V on the cached noise (the
    cost of an NCE step). With one, the noise is built with a graph from the same base draws
    and the flow descends `Rule.flow_loss`; under "every" the EBM steps from the same V, in
    one backward pass (the likelihood terms do not depend on the EBM, so its gradient of the
    flow's loss is dV/dtheta and it ascends V by stepping on the negative); under
    "threshold" the flow alone steps. Each model's gradient is taken with respect to its own
    parameters only (`torch.autograd.grad`)."""
    flow_turn = rule.flow_due(step) if flow_turn is None else flow_turn
    if opt_flow is not None and flow_turn:
        both = rule.name == "every"
        V, acc, acc_flow = _contrast(ebm, x, noise := contrast.live(step, x), both)
        if not torch.isfinite(V) or not util.guarded_step(
                opt_flow, rule.flow_loss(V, noise), opt_ebm if both else None):
            return StepResult(V.detach() * math.nan, acc, acc_flow, False, False)
        contrast.flow_changed()
        return StepResult(V.detach(), acc, acc_flow, both, True)
    V, acc, acc_flow = _contrast(ebm, x, contrast.cached(step, batch_at))
    if not torch.isfinite(V):
        return StepResult(V.detach(), acc, acc_flow, False, False)
    ok = util.guarded_step(opt_ebm, -V)
    return StepResult(V.detach() * (1.0 if ok else math.nan), acc, acc_flow, ok, False)


def mle_step(flow, x: Tensor, opt) -> Tensor:
    """One maximum-likelihood step of the flow alone; returns -mean log q(x) (NaN, and no
    step, when it or a gradient is not finite)."""
    nll = -flow.log_prob(x).mean()
    if not torch.isfinite(nll) or not util.guarded_step(opt, nll):
        return nll.detach() * math.nan
    return nll.detach()
