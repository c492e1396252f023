"""AIS (ais.py) against normalisers known in closed form, by construction or on a grid, the
forward/reverse bracket around a known log-likelihood, and the command line's bad input.

Budgets are small (the file runs in well under a minute on one core); every case is seeded."""
import argparse
import math
import os
import subprocess
import sys
import time

import pytest
import torch

if __name__ == "__main__":  # python tests/test_ais.py prints the validation table
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ais  # noqa: E402
import checkpoint  # noqa: E402
import dequantize  # noqa: E402
import gridmath  # noqa: E402
import mcmc_images  # noqa: E402
from ebm import EBM  # noqa: E402
from flows import gaussian, gaussian_fit, maf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
@pytest.mark.parametrize("kind", ais.SCHEDULES)
def test_schedule_runs_from_0_to_1_increasing(kind):
    b = ais.schedule(50, kind)
    assert b.dtype == torch.float64 and b.shape == (51,)
    assert b[0] == 0 and b[-1] == 1 and (b.diff() > 0).all()


# ----------------------------------------------------------------------------- log Z
def case_gaussian_64d():
    """A 64-dimensional Gaussian energy from a different Gaussian base (other mean, isotropic
    variance 1.5), HMC."""
    torch.manual_seed(0)
    f, log_Z, _ = gaussian_energy(64)
    return ais.ais_log_Z(f, std_gaussian(64, 1.5), n_chains=256, n_temps=400, repeats=2), log_Z


@pytest.mark.slow
def test_gaussian_64d_log_Z():
    """|log Z-hat - log Z| < 0.1, acceptance adapted near HMC's 0.65."""
    res, log_Z = case_gaussian_64d()
    assert abs(res.log_Z - log_Z) < 0.1, (res.log_Z, log_Z, res.log_Z_repeats)
    assert abs(res.acceptance - 0.65) < 0.1
    assert res.log_w.dtype == torch.float64 and res.log_w.shape == (2, 256)
    assert (res.ess > 1).all() and (res.ess <= 256).all()


def case_flow_energy():
    """f = -log q(x) of a randomly perturbed 8-dimensional MAF is normalised: log Z = 0. The
    base is a Gaussian fitted to the flow's samples (it is not the flow)."""
    torch.manual_seed(1)
    flow = maf(8, n_blocks=2, hidden=(32, 32)).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
        base = gaussian_fit(flow.sample(2000)).double()
    return ais.ais_log_Z(lambda x: -flow.log_prob(x), base, n_chains=256, n_temps=200,
                         repeats=2), 0.0


@pytest.mark.slow
def test_flow_energy_has_log_Z_zero():
    res, log_Z = case_flow_energy()
    assert abs(res.log_Z - log_Z) < 0.1, res.log_Z_repeats


def case_mixture():
    """Two modes 17 sd apart with weights 0.3 / 0.7 from a broad Gaussian base, MALA: the
    weights, not the chains (which cannot cross), get the mode masses right."""
    torch.manual_seed(2)
    return ais.ais_log_Z(mixture_energy, std_gaussian(2, 9.0), n_chains=512, n_temps=300,
                         repeats=2, transition="mala"), MIX_C


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
    return ais.ais_log_Z(f, std_gaussian(2, 4.0), n_chains=1000, n_temps=200, repeats=4,
                         transition="mala", adapt="chain"), log_Z


def test_ebm_2d_matches_the_grid():
    res, log_Z = case_ebm_2d()
    assert abs(res.log_Z - log_Z) < 0.02, (res.log_Z, log_Z, res.log_Z_repeats)


def case_three_temperatures():
    """K = 3, 20,000 chains, a 4-dimensional Gaussian, kernels fixed in advance."""
    torch.manual_seed(7)
    f, log_Z, _ = gaussian_energy(4)
    return ais.ais_log_Z(f, std_gaussian(4, 1.5), n_chains=20_000, n_temps=3,
                         step_sizes=torch.tensor([0.8, 0.8])), log_Z


def test_unbiased_with_three_temperatures():
    """With kernels fixed in advance (step_sizes, no adaptation) E[Z-hat] = Z for any number of
    temperatures (Neal 2001): log Z-hat within 0.03 of log Z (a kernel at the wrong
    temperature is biased by much more at such a short schedule)."""
    res, log_Z = case_three_temperatures()
    assert abs(res.log_Z - log_Z) < 0.03, (res.log_Z, log_Z, float(res.ess[0]))


# ----------------------------------------------------------------------------- the bracket
def case_bracket():
    """Exact model samples as the test set of the 64-dimensional Gaussian, K = 50."""
    torch.manual_seed(4)
    f, log_Z, sample = gaussian_energy(64)
    x_test = sample(2000)
    true = float((-f(x_test)).mean()) - log_Z
    return ais.loglik_bracket(f, std_gaussian(64, 1.5), x_test, n_chains=256, n_temps=50,
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
    fwd = ais.ais_log_Z(f, base, n_chains=256, n_temps=10, repeats=2)
    rev = ais.reverse_ais_log_Z(f, base, sample(512), n_temps=10, repeats=2,
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
    return ais.BoxEnergy(lambda y: torch.zeros(y.shape[0], dtype=y.dtype), mu, chol)


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
    box = ais.BoxEnergy.fit(lambda y: y.sum(1), torch.tanh(z))
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
    br = ais.box_bracket(f, x_fit, x_test, n_chains=128, n_temps=100, repeats=2)
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
    y = ais.box_samples(f, sample(2000, g), n=4000, n_temps=100)
    assert y.shape == (4000, 8) and (y.abs() < 1).all()
    assert torch.allclose(y.mean(0), sample(200_000, g).mean(0), atol=0.03), y.mean(0)


# ----------------------------------------------------------------------------- command line
def test_cli_missing_run_is_one_line_and_exit_2(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "ais.py"), str(tmp_path / "nope")],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = p.stderr.strip()
    assert p.returncode == 2 and err and "\n" not in err and "Traceback" not in err, err
    assert "nope" in err


@pytest.mark.parametrize("script,sizes", [("train.py", ("samples", "test_samples")),
                                          ("train_mcmc.py", ("n_train", "n_test"))])
def test_cli_prints_log_Z_grid_and_bracket(tmp_path, capsys, script, sizes):
    """A 2D checkpoint of train.py or train_mcmc.py (config, EBM): the report has both AIS
    log Z, the grid log Z and the bracket (plumbing only: an untrained EBM need not be
    normalisable)."""
    torch.manual_seed(6)
    ebm = EBM(2, (16, 16))
    cfg = {"dataset": "8gaussians", "seed": 0, sizes[0]: 500, sizes[1]: 500}
    checkpoint.save_checkpoint(str(tmp_path / "checkpoint.pt"),
                         {"config": cfg, "ebm": ebm.state_dict(), "ebm_spec": ebm.spec(),
                          "script": script})
    assert ais.main([str(tmp_path), "--chains", "50", "--temps", "20", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "log Z  forward" in out and "log Z  grid" in out and "test log-likelihood in" in out


def image_run(tmp_path, scale=1.0, name="img"):
    """A train_mcmc.py-shaped digits checkpoint: a small random ConvEBM as U ("image_ebm"),
    its last layer times `scale` (small: U nearly flat on the box, an easy AIS target)."""
    torch.manual_seed(9)
    U = mcmc_images.ConvEBM("conv8", (1, 8, 8), n_f=4)
    with torch.no_grad():
        U.net[-1].weight.mul_(scale)
    cfg = {"dataset": "digits", "eps": 0.03, "seed": 0, "n_train": 1348}
    path = tmp_path / name
    path.mkdir()
    F = {k: v * (cfg["eps"] ** 2 / 2 if k.startswith("net.6") else 1)  # U = (2 / eps^2) F
         for k, v in U.state_dict().items()}
    checkpoint.save_checkpoint(str(path / "checkpoint.pt"), {
        "config": cfg, "image_ebm": U.state_dict(), "image_ebm_spec": U.spec(),
        "F": F, "script": "train_mcmc.py"})
    return str(path), U


@pytest.mark.slow
def test_run_target_of_an_image_run(tmp_path):
    """run_target of a train_mcmc.py digits run: the energy is U (not F), the held-out points
    are dequantize.test_set of the test split, the base is fitted to the 1,348 dequantised
    training images (not the test set), and the chains stay in [-1, 1]^64 (R^64 is refused:
    the energy provably has no normaliser there)."""
    path, U = image_run(tmp_path)
    t = ais.run_target(checkpoint.load_run(path), path)
    _, _, x_test, _ = mcmc_images.load_images("digits")
    assert torch.equal(t.x_test, dequantize.test_set(x_test, 17))
    assert t.x_fit.shape == (1348, 64) and (t.x_fit.abs() <= 1).all()
    with pytest.raises(ValueError):  # dequantised: off the pixel lattice
        dequantize.levels(t.x_fit, 17)
    x = torch.rand(5, 64) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(t.energy(x), U(x))
    assert t.levels == 17 and t.box == (-1.0, 1.0) and t.flow is None
    with pytest.raises(SystemExit):  # this ConvNet energy falls along a ray: no Z on R^64
        ais.run_target(checkpoint.load_run(path), path, "free")


def numbers(line):
    """The floats after '[' in a report line: [a, b] -> (a, b)."""
    a, b = line.split("[", 1)[1].split("]")[0].split(", ")
    return float(a), float(b)


@pytest.mark.slow
def test_cli_image_run_in_nats_and_bits(tmp_path, capsys):
    """A digits run: the bracket in nats per image on the dequantised [0, 17) scale is
    mean(-U(test)) - log Z + 64 log(2/17) (dequantize.to_nats, test points dequantize.test_set),
    and its bits/dim are -nats / (64 ln 2), the ends swapped."""
    run, U = image_run(tmp_path, scale=0.01)
    argv = [run, "--chains", "40", "--temps", "30", "--repeats", "2"]
    assert ais.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "density on [-1, 1]^64" in lines[0]
    log_Z_low = float(lines[1].split("(lower)")[1].split("+-")[0])
    nats = numbers(next(x for x in lines if x.startswith("test log-likelihood")))
    bits = numbers(next(x for x in lines if x.startswith("bits/dim")))
    x_test = dequantize.test_set(mcmc_images.load_images("digits")[2], 17).double()
    with torch.no_grad():
        mean_neg_U = float(-U.double()(x_test).mean())
    assert nats[1] == pytest.approx(mean_neg_U - log_Z_low + 64 * math.log(2 / 17), abs=2e-4)
    for n, b in zip(nats, reversed(bits)):
        assert b == pytest.approx(-n / (64 * math.log(2)), abs=1e-4)


def test_cli_warns_beside_degenerate_weights(tmp_path, capsys):
    """One temperature (plain importance sampling from the base in 64 dimensions) leaves a
    handful of chains carrying the weight: the report says so beside the ESS and flags the
    bracket."""
    run, _ = image_run(tmp_path, scale=0.01)
    assert ais.main([run, "--chains", "40", "--temps", "1", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "weights degenerate: ESS" in out and "of 40 chains" in out, out
    assert "use more --temps" in out and "UNRELIABLE" in out


@pytest.mark.parametrize("temps,degenerate", [(1, True), (50, False)])
def test_report_warns_only_beside_degenerate_weights(capsys, temps, degenerate):
    """The 64-d Gaussian bracket from exact samples (case_bracket): with 50 temperatures the
    ESS is near half the chains and nothing is flagged; with one, the weights are degenerate
    and the AISResult, the Bracket and the printed report all say so."""
    torch.manual_seed(4)
    f, _, sample = gaussian_energy(64)
    x_test = sample(512)
    br = ais.loglik_bracket(f, std_gaussian(64, 1.5), x_test, n_chains=128, n_temps=temps,
                            repeats=2)
    assert br.forward.degenerate == degenerate and br.reliable != degenerate
    args = argparse.Namespace(run="gauss", transition="hmc", repeats=2, chains=128, temps=temps,
                              schedule="sigmoid", base="gaussian")
    ais.report(args, br, f, ais.Target(f, x_test, x_test, None, 17, None), torch.float64)
    out = capsys.readouterr().out
    assert ("weights degenerate: ESS" in out) == degenerate, out
    assert ("UNRELIABLE" in out) == degenerate


def linear_digits_run(tmp_path, slope=-0.5):
    """A train.py-shaped digits checkpoint whose EBM is f(y) = slope * sum(y): on the box
    log Z = 64 log((e^-slope - e^slope) / -slope) (47.02 for slope -0.5), on R^64 none."""
    ebm = EBM(64, (1,), "relu")
    with torch.no_grad():
        ebm.net[0].weight.fill_(1.0)
        ebm.net[0].bias.fill_(64.0)  # sum(y) + 64 >= 0 on and near the box: relu is linear
        ebm.net[2].weight.fill_(slope)
        ebm.net[2].bias.fill_(-64.0 * slope)
    checkpoint.save_checkpoint(str(tmp_path / "checkpoint.pt"), {
        "config": {"dataset": "digits", "seed": 0}, "ebm": ebm.state_dict(),
        "ebm_spec": ebm.spec(), "script": "train.py"})
    return str(tmp_path), 64 * math.log((math.exp(-slope) - math.exp(slope)) / -slope)


@pytest.mark.slow
def test_cli_train_py_digits_run_on_the_box(tmp_path, capsys):
    """A train.py digits run is scored on the box its summary uses: f(y) = -0.5 sum(y) has
    log Z 47.02 there, and both ends of AIS find it; on R^64 it has no normaliser, and
    --domain free is refused in one line (exit 2)."""
    run, exact = linear_digits_run(tmp_path)
    assert ais.main([run, "--chains", "40", "--temps", "400", "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "density on [-1, 1]^64" in lines[0] and "learned c of the EBM" in "\n".join(lines)
    low = float(lines[1].split("(lower)")[1].split("+-")[0])
    up = float(lines[1].split("(upper)")[1].split("+-")[0])
    assert low - 0.3 < exact < up + 0.3 and up - low < 1.5  # a bracket around 47.02
    with pytest.raises(SystemExit) as e:
        ais.main([run, "--domain", "free", "--chains", "4", "--temps", "2"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "no normaliser on R^D" in err and "\n" not in err


def bad_runs(tmp_path):
    """Run folders: an image run, a checkpoint without a model, a 2D run."""
    img, _ = image_run(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    checkpoint.save_checkpoint(str(empty / "checkpoint.pt"), {
        "config": {"dataset": "digits"}, "script": "train.py"})
    flat = tmp_path / "flat"
    flat.mkdir()
    ebm = EBM(2, (8,))
    checkpoint.save_checkpoint(str(flat / "checkpoint.pt"), {
        "config": {"dataset": "8gaussians", "seed": 0, "samples": 50, "test_samples": 50},
        "ebm": ebm.state_dict(), "ebm_spec": ebm.spec(), "script": "train.py"})
    return {"img": img, "empty": str(empty), "flat": str(flat)}


@pytest.mark.parametrize("run,flags,says", [
    ("img", ["--temps", "0"], "--temps"),
    ("img", ["--eps", "0"], "--eps"),
    ("img", ["--eps", "-0.1"], "--eps"),
    ("empty", [], "has no EBM"),
    ("flat", ["--domain", "box"], "--domain box is for image runs"),
    ("img", ["--base", "flow"], "has no flow"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, run, flags, says):
    runs = bad_runs(tmp_path)
    with pytest.raises(SystemExit) as e:
        ais.main([runs[run], "--chains", "4", "--temps", "2", *flags])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err and "\n" not in err, err
    assert says in err, err


# ----------------------------------------------------------------------------- the numbers
def validation_table():
    """The cases above as a Markdown table (docs/ais.md): python tests/test_ais.py"""
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
    torch.manual_seed(11)
    flow = maf(64, n_blocks=2, hidden=(64, 64)).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
        base = gaussian_fit(flow.sample(4000)).double()
        x_test = flow.sample(512)
        true = float(flow.log_prob(x_test).mean())
    return ais.loglik_bracket(lambda x: -flow.log_prob(x), base, x_test, n_chains=128,
                              n_temps=n_temps, repeats=2), true


def case_gaussian_bracket_64d(n_temps):
    """case_bracket (64-d Gaussian, exact samples) at n_temps, 2 x 128 chains."""
    torch.manual_seed(4)
    f, log_Z, sample = gaussian_energy(64)
    x_test = sample(512)
    true = float((-f(x_test)).mean()) - log_Z
    return ais.loglik_bracket(f, std_gaussian(64, 1.5), x_test, n_chains=128,
                              n_temps=n_temps, repeats=2), true


def gap_table(temps=(10, 30, 100, 300)):
    """Bracket width against the number of temperatures in 64 dimensions, started at exact
    samples (docs/ais.md): python tests/test_ais.py --gaps"""
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
