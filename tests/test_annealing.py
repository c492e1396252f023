"""AIS (annealing.py) against normalisers known in closed form, by construction or on a grid,
the forward/reverse bracket around a known log-likelihood, AIS on the box (the command line:
test_ais.py).

Budgets are small (the file runs in well under a minute on one core); every case is seeded."""
import math
import os
import sys
import time

import pytest
import torch

if __name__ == "__main__":  # python tests/test_annealing.py prints the validation table
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import annealing  # noqa: E402
import gridmath  # noqa: E402
from ebm import EBM  # noqa: E402
import flows  # noqa: E402
from flows import gaussian, gaussian_fit, maf  # noqa: E402


# ----------------------------------------------------------------------------- targets
def gaussian_energy(D, seed=0):
    """f(x) = 0.5 (x - m)^T A (x - m), A with eigenvalues in [0.5, 2]:
    log Z = (D/2) log 2 pi - 0.5 log det A. Returns f, log Z, and a sampler of exp(-f)/Z."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    lam = torch.linspace(0.5, 2.0, D, dtype=torch.float64)
    A = Q @ torch.diag(lam) @ Q.T
    m = 0.5 * torch.randn(D, generator=g, dtype=torch.float64)
    log_Z = 0.5 * D * math.log(2 * math.pi) - 0.5 * float(torch.log(lam).sum())
    cov_half = Q @ torch.diag(lam.rsqrt())  # x = m + Q Lambda^{-1/2} z ~ N(m, A^{-1})

    def f(x):
        d = x - m
        return 0.5 * ((d @ A) * d).sum(1)

    return f, log_Z, lambda n: m + torch.randn(n, D, dtype=torch.float64) @ cov_half.T


MIX_MEANS = torch.tensor([[-3.0, -3.0], [3.0, 3.0]], dtype=torch.float64)
MIX_W, MIX_S, MIX_C = torch.tensor([0.3, 0.7], dtype=torch.float64), 0.5, 1.234


def mixture_energy(x):
    """f = -log(0.3 N(x; (-3, -3), 0.25 I) + 0.7 N(x; (3, 3), 0.25 I)) - 1.234: log Z = 1.234,
    two modes 17 standard deviations apart."""
    d = ((x[:, None] - MIX_MEANS) ** 2).sum(-1)
    log_mix = torch.logsumexp(torch.log(MIX_W) - d / (2 * MIX_S ** 2), 1)
    return -(log_mix - math.log(2 * math.pi * MIX_S ** 2)) - MIX_C


def mixture_samples(n):
    k = torch.multinomial(MIX_W, n, replacement=True)
    return MIX_MEANS[k] + MIX_S * torch.randn(n, 2, dtype=torch.float64)


def std_gaussian(D, var):
    return gaussian(D, torch.zeros(D), var * torch.eye(D)).double()


# ----------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("kind", annealing.SCHEDULES)
def test_schedule_runs_from_0_to_1_increasing(kind):
    b = annealing.schedule(50, kind)
    assert b.dtype == torch.float64 and b.shape == (51,)
    assert b[0] == 0 and b[-1] == 1 and (b.diff() > 0).all()


# ----------------------------------------------------------------------------- log Z
def case_gaussian_64d():
    """A 64-dimensional Gaussian energy from a different Gaussian base (other mean, isotropic
    variance 1.5), HMC."""
    torch.manual_seed(0)
    f, log_Z, _ = gaussian_energy(64)
    return annealing.ais_log_Z(f, std_gaussian(64, 1.5), n_chains=256, n_temps=400,
                               repeats=2), log_Z


@pytest.mark.slow
def test_gaussian_64d_log_Z():
    """|log Z-hat - log Z| < 0.1, acceptance adapted near HMC's 0.65."""
    res, log_Z = case_gaussian_64d()
    assert abs(res.log_Z - log_Z) < 0.1, (res.log_Z, log_Z, res.log_Z_repeats)
    assert abs(res.acceptance - 0.65) < 0.1
    assert res.log_w.dtype == torch.float64 and res.log_w.shape == (2, 256)
    assert (res.ess > 1).all() and (res.ess <= 256).all()


def perturbed_maf(dim, hidden, scale, seed):
    """A float64 MAF (2 blocks) whose weights are moved by scale * N(0, 1) from a fresh
    initialisation (torch's global RNG seeded with `seed`): a normalised density, f = -log q."""
    torch.manual_seed(seed)
    flow = maf(dim, n_blocks=2, hidden=hidden).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow


def case_flow_energy():
    """f = -log q(x) of a randomly perturbed 8-dimensional MAF is normalised: log Z = 0. The
    base is a Gaussian fitted to the flow's samples (it is not the flow)."""
    flow = perturbed_maf(8, (32, 32), 0.3, seed=1)
    with torch.no_grad():
        base = gaussian_fit(flow.sample(2000)).double()
    return annealing.ais_log_Z(lambda x: -flow.log_prob(x), base, n_chains=256, n_temps=200,
                               repeats=2), 0.0


@pytest.mark.slow
def test_flow_energy_has_log_Z_zero():
    res, log_Z = case_flow_energy()
    assert abs(res.log_Z - log_Z) < 0.1, res.log_Z_repeats


def case_mixture():
    """Two modes 17 sd apart with weights 0.3 / 0.7 from a broad Gaussian base, MALA: the
    weights, not the chains (which cannot cross), get the mode masses right."""
    torch.manual_seed(2)
    return annealing.ais_log_Z(mixture_energy, std_gaussian(2, 9.0), n_chains=512, n_temps=300,
                               repeats=2, transition="mala"), MIX_C


@pytest.mark.slow
def test_separated_mixture_log_Z():
    res, _ = case_mixture()
    assert abs(res.log_Z - MIX_C) < 0.1, res.log_Z_repeats


def case_ebm_2d():
    """A random small EBM(2, (32, 32)) (first and last layer scaled up so the density has
    structure; importance sampling from the base alone has an ESS of 8%) with a Gaussian
    confinement f + |x|^2 / 8, so exp(-f) is integrable: AIS within 0.02 nats of the float64
    grid log Z on [-12, 12]^2 (grid converged: the same to 2e-6 on [-30, 30]^2)."""
    torch.manual_seed(3)
    ebm = EBM(2, (32, 32)).double()
    with torch.no_grad():
        ebm.net[0].weight.mul_(2.0)
        ebm.net[-1].weight.mul_(5.0)

    def f(x):
        return ebm(x) + (x * x).sum(1) / 8

    neg_f, area = gridmath.on_grid(lambda x: -f(x), 12.0, 600, dtype=torch.float64)
    log_Z = gridmath.grid_log_Z(neg_f, area)
    return annealing.ais_log_Z(f, std_gaussian(2, 4.0), n_chains=1000, n_temps=200, repeats=4,
                               transition="mala", adapt="chain"), log_Z


@pytest.mark.slow
def test_ebm_2d_matches_the_grid():
    res, log_Z = case_ebm_2d()
    assert abs(res.log_Z - log_Z) < 0.02, (res.log_Z, log_Z, res.log_Z_repeats)


def case_three_temperatures():
    """K = 3, 20,000 chains, a 4-dimensional Gaussian, kernels fixed in advance."""
    torch.manual_seed(7)
    f, log_Z, _ = gaussian_energy(4)
    return annealing.ais_log_Z(f, std_gaussian(4, 1.5), n_chains=20_000, n_temps=3,
                               step_sizes=torch.tensor([0.8, 0.8])), log_Z


def test_unbiased_with_three_temperatures():
    """With kernels fixed in advance (step_sizes, no adaptation) E[Z-hat] = Z for any number of
    temperatures (Neal 2001): log Z-hat within 0.03 of log Z (a kernel at the wrong
    temperature is biased by much more at such a short schedule)."""
    res, log_Z = case_three_temperatures()
    assert abs(res.log_Z - log_Z) < 0.03, (res.log_Z, log_Z, float(res.ess[0]))


def test_independence_moves_leave_the_tempered_target_invariant():
    """For q0 = N(0, 1.5 I) and f = (x - m)^T A (x - m) / 2, pi_b = q0^(1 - b) exp(-b f) is
    N(b P^-1 A m, P^-1), P = (1 - b) / 1.5 + b A: chains started at its exact draws keep its
    mean and covariance through 10 independence moves at b = 0.6 (a kernel without the b, or
    with the ratio upside down, drifts to another law)."""
    torch.manual_seed(11)
    A = torch.tensor([[2.0, 0.6], [0.6, 0.8]], dtype=torch.float64)
    m = torch.tensor([1.5, -1.0], dtype=torch.float64)
    base, b, n = std_gaussian(2, 1.5), 0.6, 20_000
    P = (1 - b) / 1.5 * torch.eye(2, dtype=torch.float64) + b * A
    cov = torch.linalg.inv(P)
    mean = b * cov @ A @ m

    def f(x):
        d = x - m
        return 0.5 * ((d @ A) * d).sum(1)

    x = mean + torch.randn(n, 2, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    s = annealing._evaluate(f, base, x, grads=False)
    for _ in range(10):
        s, a = annealing.independence(f, base, s, b)
    assert 0.3 < float(a.mean()) < 1.0
    assert torch.allclose(s.x.mean(0), mean, atol=0.03), (s.x.mean(0), mean)
    assert torch.allclose(torch.cov(s.x.T), cov, atol=0.03), (torch.cov(s.x.T), cov)


def test_independence_moves_from_a_stratified_mixture_base():
    """A FlowMixture samples in strata (member 0 fills the first rows), so its proposals are
    shuffled across the chains. The tilt of q0 = (N(-1, 0.25) + N(1.5, 0.25)) / 2 by g = x at
    b = 0.5 is the mixture of N(mu_k - 0.125, 0.25) with weights proportional to
    exp(-mu_k / 2): chains started at its exact draws keep its mean in the first and the
    second half of the rows alike through 10 moves (unshuffled, each half would propose
    from one member only and drift)."""
    torch.manual_seed(13)
    mus, sd, b, n = torch.tensor([-1.0, 1.5], dtype=torch.float64), 0.5, 0.5, 20_000
    mix = flows.FlowMixture([gaussian(1, mu[None], torch.eye(1) * sd ** 2).double()
                             for mu in mus]).double()
    weights = torch.softmax(-b * mus, 0)
    k = torch.multinomial(weights, n, replacement=True)
    x = (mus[k] - b * sd ** 2 + sd * torch.randn(n, dtype=torch.float64))[:, None]
    f = lambda y: y[:, 0] - mix.log_prob(y)  # noqa: E731  (g = x, f = g - log q0)
    s = annealing._evaluate(f, mix, x, grads=False)
    for _ in range(10):
        s, _ = annealing.independence(f, mix, s, b)
    mean = float((weights * (mus - b * sd ** 2)).sum())
    for half in (s.x[: n // 2], s.x[n // 2:]):
        assert float(half.mean()) == pytest.approx(mean, abs=0.05)


def test_each_repeat_starts_from_the_whole_mixture():
    """A FlowMixture base samples in strata (member 0 first): drawn in one piece, the first
    repeat would hold only member 0 and the second only member 1. For the target member 0
    (log Z = 0), q0 = (N0 + N1) / 2 far apart, every draw of N0 carries w = 2 and of N1 w = 0:
    each repeat, holding half of each, estimates log Z = 0."""
    torch.manual_seed(12)
    members = [gaussian(1, torch.tensor([mu]), torch.eye(1) * 0.01).double()
               for mu in (-5.0, 5.0)]
    mix = flows.FlowMixture(members).double()
    res = annealing.ais_log_Z(lambda x: -members[0].log_prob(x), mix, n_chains=100, n_temps=3,
                              repeats=2, transition="independence")
    assert torch.allclose(res.log_Z_repeats, torch.zeros(2, dtype=torch.float64), atol=0.01)
    assert res.eps.isnan().all()  # independence moves have no step size to report


# ----------------------------------------------------------------------------- the bracket
def case_bracket():
    """Exact model samples as the test set of the 64-dimensional Gaussian, K = 50."""
    torch.manual_seed(4)
    f, log_Z, sample = gaussian_energy(64)
    x_test = sample(2000)
    true = float((-f(x_test)).mean()) - log_Z
    return annealing.loglik_bracket(f, std_gaussian(64, 1.5), x_test, n_chains=256, n_temps=50,
                                    repeats=2), true


def test_bracket_contains_the_true_log_likelihood():
    """The bracket [lower, upper] holds the true mean log p (up to MC error 0.05), and
    lower <= upper."""
    br, true = case_bracket()
    assert br.lower <= br.upper and br.gap == pytest.approx(br.upper - br.lower)
    assert br.lower - 0.05 <= true <= br.upper + 0.05, (br.lower, true, br.upper)
    assert br.log_Z_lower == br.forward.log_Z and br.log_Z_upper == br.reverse.log_Z


def case_short_schedule():
    """Forward and reverse (from exact samples) AIS with 10 temperatures, 64-d Gaussian."""
    torch.manual_seed(5)
    f, log_Z, sample = gaussian_energy(64)
    base = std_gaussian(64, 1.5)
    fwd = annealing.ais_log_Z(f, base, n_chains=256, n_temps=10, repeats=2)
    rev = annealing.reverse_ais_log_Z(f, base, sample(512), n_temps=10, repeats=2,
                                      step_sizes=fwd.eps)
    return fwd, rev, log_Z


def test_short_schedules_bound_log_Z_from_both_sides():
    """With only 10 temperatures both estimates are biased, each to its own side: forward AIS
    below log Z, reverse AIS from exact samples above it (Burda et al. 2015; Grosse et al.
    2015), by far more than their spread."""
    fwd, rev, log_Z = case_short_schedule()
    assert fwd.log_Z < log_Z - 0.5 and fwd.log_Z_repeats.max() < log_Z
    assert rev.log_Z > log_Z + 0.5 and rev.log_Z_repeats.min() > log_Z


# ----------------------------------------------------------------------------- the box
def random_box_map(D=3, seed=0):
    """A BoxEnergy (f = 0) with a random mu and a random lower-triangular L (diagonal far from
    1, so sum log L_ii matters), float64."""
    g = torch.Generator().manual_seed(seed)
    mu = 0.5 * torch.randn(D, generator=g, dtype=torch.float64)
    chol = torch.tril(0.4 * torch.randn(D, D, generator=g, dtype=torch.float64), -1)
    chol += torch.diag(torch.linspace(0.3, 2.5, D, dtype=torch.float64))
    return annealing.BoxEnergy(lambda y: torch.zeros(y.shape[0], dtype=y.dtype), mu, chol)


def test_box_log_jacobian_is_autograds_log_det():
    """log|dy/dw| of y = tanh(mu + L w) (BoxEnergy.log_jacobian) equals log|det| of autograd's
    Jacobian at points from the centre into the tails (|z| up to about 10), and to_w
    inverts to_y."""
    box = random_box_map(3)
    g = torch.Generator().manual_seed(1)
    w = torch.cat([torch.zeros(1, 3, dtype=torch.float64),
                   torch.randn(5, 3, generator=g, dtype=torch.float64),
                   1.2 * torch.randn(5, 3, generator=g, dtype=torch.float64)])
    for wi, lj in zip(w, box.log_jacobian(w)):
        J = torch.autograd.functional.jacobian(lambda v: box.to_y(v[None])[0], wi)
        assert float(lj) == pytest.approx(float(torch.linalg.slogdet(J)[1]), abs=1e-6)
    y = box.to_y(w[:6])
    assert torch.allclose(box.to_w(y), w[:6], atol=1e-8)
    assert torch.allclose(box(w), -box.log_jacobian(w))  # f_w = f(y) - log|dy/dw|, f = 0


def test_box_fit_whitens_atanh_of_the_points():
    """BoxEnergy.fit takes mu and L from atanh of the points: the points' w have mean 0 and
    identity covariance."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4000, 4, generator=g, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0, 0, 0], [0.8, 0.3, 0, 0], [0, 0, 2.0, 0], [0.1, 0, 0, 0.05]],
        dtype=torch.float64).T
    box = annealing.BoxEnergy.fit(lambda y: y.sum(1), torch.tanh(z))
    w = box.to_w(torch.tanh(z))
    assert torch.allclose(w.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(torch.cov(w.T), torch.eye(4, dtype=torch.float64), atol=1e-8)


def truncated_gaussian(D=8, s=0.7):
    """f = |y - m|^2 / (2 s^2) on [-1, 1]^D, m from -1.2 to 1.2 (at the walls and beyond): the
    box cuts off much of the Gaussian, Z = prod sqrt(2 pi) s (Phi((1 - m_i)/s) - Phi((-1 -
    m_i)/s)). Returns f, log Z, log p(y) and an exact sampler (inversion)."""
    m = torch.linspace(-1.2, 1.2, D, dtype=torch.float64)
    lo, hi = torch.special.ndtr((-1 - m) / s), torch.special.ndtr((1 - m) / s)
    log_Z = float((0.5 * math.log(2 * math.pi) + math.log(s) + torch.log(hi - lo)).sum())

    def f(y):
        return ((y - m) ** 2).sum(1) / (2 * s * s)

    def sample(n, g):
        u = torch.rand(n, D, generator=g, dtype=torch.float64)
        return (m + s * torch.special.ndtri(lo + u * (hi - lo))).clamp(-1, 1)

    return f, log_Z, (lambda y: -f(y) - log_Z), sample


def case_box():
    """box_bracket of the truncated Gaussian (8-d), the map fitted to 2,000 exact samples, the
    bracket on 1,000 others, K = 100, 2 x 128 chains."""
    torch.manual_seed(8)
    f, log_Z, log_p, sample = truncated_gaussian()
    g = torch.Generator().manual_seed(8)
    x_fit, x_test = sample(2000, g), sample(1000, g)
    br = annealing.box_bracket(f, x_fit, x_test, n_chains=128, n_temps=100, repeats=2)
    return br, log_Z, float(log_p(x_test).mean())


def test_box_log_Z_and_bracket_of_a_truncated_gaussian():
    """AIS in the box's coordinates gets log Z of the box-truncated Gaussian within 0.05 from
    both sides (the untruncated log Z is 3.96 nats higher), and box_bracket's bracket, in y,
    holds the exact mean log p(y) of the test points within 0.05, with mean -f in y."""
    br, log_Z, exact = case_box()
    assert abs(br.log_Z_lower - log_Z) < 0.05, (br.log_Z_lower, log_Z, br.forward.log_Z_repeats)
    assert abs(br.log_Z_upper - log_Z) < 0.05, (br.log_Z_upper, log_Z, br.reverse.log_Z_repeats)
    assert br.lower - 0.05 <= exact <= br.upper + 0.05, (br.lower, exact, br.upper)
    assert br.mean_neg_f - log_Z == pytest.approx(exact, abs=1e-6)
    assert br.reliable and (br.forward.x.abs() < 1).all()


@pytest.mark.slow
def test_box_samples_have_the_truncated_mean():
    """box_samples (n = 4,000, K = 100) lie inside the box, with the truncated Gaussian's
    mean within 0.03 in every coordinate."""
    torch.manual_seed(9)
    f, _, _, sample = truncated_gaussian()
    g = torch.Generator().manual_seed(9)
    y = annealing.box_samples(f, sample(2000, g), n=4000, n_temps=100)
    assert y.shape == (4000, 8) and (y.abs() < 1).all()
    assert torch.allclose(y.mean(0), sample(200_000, g).mean(0), atol=0.03), y.mean(0)


# ----------------------------------------------------------------------------- the numbers
def validation_table():
    """The cases above as a Markdown table (docs/annealing.md): python tests/test_annealing.py"""
    rows = ["| case | estimate | exact | error | sd over repeats | ESS / chains | acceptance |",
            "|---|---|---|---|---|---|---|"]
    for name, case in (("64-d Gaussian, HMC, K=400, 2x256", case_gaussian_64d),
                       ("8-d MAF energy (log Z = 0), HMC, K=200, 2x256", case_flow_energy),
                       ("2D two-mode mixture, MALA, K=300, 2x512", case_mixture),
                       ("2D EBM(2, (32, 32)) vs grid, MALA, K=200, 4x1000", case_ebm_2d),
                       ("4-d Gaussian, K=3, fixed kernels, 20000", case_three_temperatures)):
        res, exact = case()
        n = res.log_w.shape[1]
        rows.append(f"| {name} | {res.log_Z:.4f} | {exact:.4f} | {res.log_Z - exact:+.4f} | "
                    f"{res.log_Z_sd:.4f} | {float(res.ess.mean()):.0f} / {n} | "
                    f"{res.acceptance:.3f} |")
    br, true = case_bracket()
    rows.append(f"| bracket, 64-d Gaussian, exact samples, K=50, 2x256 | [{br.lower:.4f}, "
                f"{br.upper:.4f}] | {true:.4f} | gap {br.gap:.4f} | | | |")
    fwd, rev, log_Z = case_short_schedule()
    rows.append(f"| log Z, 64-d Gaussian, K=10: forward / reverse | {fwd.log_Z:.4f} / "
                f"{rev.log_Z:.4f} | {log_Z:.4f} | {fwd.log_Z - log_Z:+.4f} / "
                f"{rev.log_Z - log_Z:+.4f} | {fwd.log_Z_sd:.4f} / {rev.log_Z_sd:.4f} | | |")
    return "\n".join(rows)


def case_flow_bracket_64d(n_temps):
    """f = -log q of a perturbed 64-d MAF (log Z = 0); test set: 512 exact samples of q; base:
    a Gaussian fitted to 4,000 other samples; 2 x 128 chains."""
    flow = perturbed_maf(64, (64, 64), 0.1, seed=11)
    with torch.no_grad():
        base = gaussian_fit(flow.sample(4000)).double()
        x_test = flow.sample(512)
        true = float(flow.log_prob(x_test).mean())
    return annealing.loglik_bracket(lambda x: -flow.log_prob(x), base, x_test, n_chains=128,
                                    n_temps=n_temps, repeats=2), true


def case_gaussian_bracket_64d(n_temps):
    """case_bracket (64-d Gaussian, exact samples) at n_temps, 2 x 128 chains."""
    torch.manual_seed(4)
    f, log_Z, sample = gaussian_energy(64)
    x_test = sample(512)
    true = float((-f(x_test)).mean()) - log_Z
    return annealing.loglik_bracket(f, std_gaussian(64, 1.5), x_test, n_chains=128,
                                    n_temps=n_temps, repeats=2), true


def gap_table(temps=(10, 30, 100, 300)):
    """Bracket width against the number of temperatures in 64 dimensions, started at exact
    samples (docs/annealing.md): python tests/test_annealing.py --gaps"""
    rows = ["| target | K | bracket | true | gap | ESS fwd / chains | CPU s |",
            "|---|---|---|---|---|---|---|"]
    for name, case in (("64-d Gaussian", case_gaussian_bracket_64d),
                       ("64-d MAF energy", case_flow_bracket_64d)):
        for K in temps:
            t0 = time.process_time()
            br, true = case(K)
            rows.append(f"| {name} | {K} | [{br.lower:.3f}, {br.upper:.3f}] | {true:.3f} | "
                        f"{br.gap:.3f} | {float(br.forward.ess.mean()):.0f} / 128 | "
                        f"{time.process_time() - t0:.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(gap_table() if "--gaps" in sys.argv else validation_table())
