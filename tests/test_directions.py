"""Tests that would catch a wrong sign or a wrong direction in the maths (issue 8, sections 1
and 2): FCE's two players, the direction of every KL, the VI KL and annealing, the MCMC
diagnostics and ULA's temperature, the VAE's ELBO, and the review's defects (the guarded fast
Langevin gradient, the KDE's escaped mass and shape, the data-space tilt's sampled model, the
VI defaults). Each test states the closed form it checks; tiny budgets (about 20 s on 2 cores).
"""
import math

import pytest
import torch
from torch import nn

import checkpoint
import datasets
import diagnostics
import evaluation
import gridmath
import samplers
import targets
import tilt
import train_vi
import vae as vae_mod
import vi_flows
from ebm import EBM
from flows import build_flow
from samplers import Energy, langevin
import fce


def gauss_log_prob(x, mean, var):
    """log N(x; mean, diag(var)) for x (N, D); mean and var sequences of length D."""
    mean = torch.as_tensor(mean, dtype=x.dtype)
    var = torch.as_tensor(var, dtype=x.dtype)
    return (-0.5 * (x - mean) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).sum(-1)


def gauss_kl(m1, v1, m2, v2):
    """KL(N(m1, diag v1) || N(m2, diag v2)), closed form."""
    return sum(0.5 * (a / b + (p - q) ** 2 / b - 1 + math.log(b / a))
               for p, a, q, b in zip(m1, v1, m2, v2))


# ============================================================================= FCE
def _fce_setup():
    """A small EBM and MAF in float64 (so that a first-order change of V is resolved) and a
    fixed data batch."""
    torch.manual_seed(0)
    data = datasets.sample("8gaussians", 512, 0).double()
    ebm = EBM(2, (16,), "silu").double()
    flow = build_flow("maf", data.float(), n_blocks=2, hidden=[16]).double()
    return ebm, flow, data[:128]


def _value(ebm, flow, x, seed):
    """V and the accuracy on the batch x and the flow samples of iteration `seed` (the ones
    fce_step uses at that iteration)."""
    y, log_q_y = flow.sample_and_log_prob(len(x), z=fce.base_draws(0, seed, len(x), 0, 2)[0]
                                          .double())
    V, acc = fce.value_function(ebm.log_prob(x), flow.log_prob(x), ebm.log_prob(y), log_q_y)
    return V, float(acc)


def fce_step(ebm, flow, x, opt_ebm, opt_flow, flow_turn, step):
    """One iteration of the threshold rule at iteration `step` (noise seed 0), the flow's
    turn or the EBM's."""
    contrast = fce.Contrast(flow, len(x), seed=0, window=1)
    r = fce.fce_step(ebm, contrast, step, x, {step: x}.get, opt_ebm, opt_flow,
                     fce.Rule("threshold", flow_mle=0.0), flow_turn)
    return r.V, r.accuracy_flow, "flow" if r.flow else "ebm"


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("player", ["ebm", "flow"])
def test_fce_step_moves_V_the_right_way_and_only_its_own_player(player):
    """The EBM step ascends V (dV = +lr |dV/dtheta|^2 to first order with SGD) and leaves every
    flow parameter as it was; the flow step descends V (dV = -lr |dV/dalpha|^2) and leaves
    every EBM parameter (c included) as it was."""
    ebm, flow, x = _fce_setup()
    lr = 1e-3
    opt_ebm = torch.optim.SGD(ebm.parameters(), lr=lr)
    opt_flow = torch.optim.SGD(flow.parameters(), lr=lr)
    V0, _ = _value(ebm, flow, x, seed=1)
    mover = ebm if player == "ebm" else flow
    g = torch.autograd.grad(V0, list(mover.parameters()))
    predicted = lr * sum(float((gi * gi).sum()) for gi in g)
    ebm0, flow0 = _params(ebm), _params(flow)
    V_step, _, who = fce_step(ebm, flow, x, opt_ebm, opt_flow, player == "flow", 1)
    assert who == player
    V0 = float(V0.detach())
    assert float(V_step) == pytest.approx(V0, abs=1e-12)  # V before the step
    V1, _ = _value(ebm, flow, x, seed=1)
    change = float(V1.detach()) - V0
    sign = 1 if player == "ebm" else -1
    assert sign * change > 0
    assert sign * change == pytest.approx(predicted, rel=0.05)
    still, moved = (flow, ebm) if player == "ebm" else (ebm, flow)
    assert _same(_params(still), flow0 if player == "ebm" else ebm0)
    assert not _same(_params(moved), ebm0 if player == "ebm" else flow0)


def test_ebm_steps_exactly_when_the_last_accuracy_is_below_threshold():
    """The accuracy on the flow's own samples that an iteration measures (before its step)
    decides who steps at the next one: the EBM below the threshold, the flow at or above."""
    ebm, flow, x = _fce_setup()
    _, acc = _value(ebm, flow, x, seed=3)
    assert 0 < acc < 1
    opts = (torch.optim.SGD(ebm.parameters(), lr=1e-3), torch.optim.SGD(flow.parameters(), lr=1e-3))
    _, a, _ = fce_step(ebm, flow, x, *opts, False, 3)
    assert float(a) == acc
    rule = fce.Rule("threshold")
    assert [rule.flow_turn(4, float(a), t) for t in (acc + 1e-6, acc, acc - 1e-6)] == \
        [False, True, True]
    assert not rule.flow_turn(0, math.nan, 0.51)  # before the first accuracy: the EBM


def test_the_tracked_threshold_moves_towards_the_target_share_of_flow_steps():
    """T <- clip(T + eta (1[flow] - rho), 1/2, 1): up by eta (1 - rho) after a flow step, down
    by eta rho after an EBM step; against accuracies drawn uniformly on [0.55, 0.75] the flow
    steps at a share rho of the iterations and T settles at the (1 - rho)-quantile."""
    rule = fce.Rule("threshold", threshold=0.6, target=0.25, gain=0.01)
    assert rule.next_threshold(0.6, True) == pytest.approx(0.6 + 0.01 * 0.75)
    assert rule.next_threshold(0.6, False) == pytest.approx(0.6 - 0.01 * 0.25)
    assert rule.next_threshold(0.5, False) == 0.5 and rule.next_threshold(1.0, True) == 1.0
    assert fce.Rule("threshold", threshold=0.6).next_threshold(0.6, True) == 0.6  # fixed
    gen = torch.Generator().manual_seed(0)
    acc = (0.55 + 0.2 * torch.rand(20000, generator=gen)).tolist()
    T, flows, Ts = 0.9, [], []
    for a in acc:
        flows.append(rule.flow_turn(1, a, T))
        T = rule.next_threshold(T, flows[-1])
        Ts.append(T)
    assert sum(flows[5000:]) / 15000 == pytest.approx(0.25, abs=0.02)
    assert sum(Ts[5000:]) / 15000 == pytest.approx(0.55 + 0.2 * 0.75, abs=0.01)


# ============================================================================= KL directions
# p = N(0, 0.5^2 I), q = N(0, I): KL(p || q) = 0.636 and KL(q || p) = 1.614 nats, so a KL
# computed the wrong way round is off by a nat.
VAR_P, VAR_Q = 0.25, 1.0
KL_PQ = gauss_kl((0, 0), (VAR_P,) * 2, (0, 0), (VAR_Q,) * 2)
KL_QP = gauss_kl((0, 0), (VAR_Q,) * 2, (0, 0), (VAR_P,) * 2)


def test_grid_kl_is_kl_of_first_from_second():
    assert KL_PQ == pytest.approx(2 * (math.log(2) - 0.375), abs=1e-12)
    assert KL_QP == pytest.approx(2 * (1.5 - math.log(2)), abs=1e-12)
    x, area = gridmath.grid_points(6.0, 600)
    lp, lq = gauss_log_prob(x, (0, 0), (VAR_P,) * 2), gauss_log_prob(x, (0, 0), (VAR_Q,) * 2)
    assert gridmath.grid_kl(lp, lq, area) == pytest.approx(KL_PQ, abs=1e-6)
    assert gridmath.grid_kl(lq, lp, area) == pytest.approx(KL_QP, abs=1e-4)  # q's tails beyond 6


@pytest.fixture
def gaussian_dataset(monkeypatch):
    """A 'dataset' N(0, VAR_P I) with an exact density, for evaluate_2d and kde_kl."""
    monkeypatch.setattr(datasets, "has_density", lambda name: True)
    monkeypatch.setattr(datasets, "log_density",
                        lambda name, x: gauss_log_prob(x.double(), (0, 0), (VAR_P,) * 2))
    monkeypatch.setattr(datasets, "entropy", lambda name: math.log(2 * math.pi * math.e * VAR_P))


class _GaussEnergy(nn.Module):
    """f(x) = |x|^2 / (2 VAR_Q): the EBM of the model N(0, VAR_Q I)."""
    c = torch.tensor(0.0)

    def forward(self, x):
        return (x * x).sum(1) / (2 * VAR_Q)


class _GaussFlow:
    def log_prob(self, x):
        return gauss_log_prob(x, (0, 0), (VAR_Q,) * 2)


def test_evaluate_2d_kls_are_kl_of_data_from_model(gaussian_dataset):
    """kl_ebm and kl_flow are KL(p_data || model), and nll = H(p_data) + KL(p_data || model)."""
    x_test = 0.5 * torch.randn(100_000, 2, generator=torch.Generator().manual_seed(0))
    m = evaluation.evaluate_2d("g", x_test, _GaussEnergy(), _GaussFlow())
    assert m["kl_ebm"] == pytest.approx(KL_PQ, abs=1e-4)
    assert m["kl_flow"] == pytest.approx(KL_PQ, abs=1e-4)
    assert m["log_Z"] == pytest.approx(math.log(2 * math.pi * VAR_Q), abs=1e-4)
    h = math.log(2 * math.pi * math.e * VAR_P)
    # Monte Carlo over 100k points: standard error of the NLL about 0.003
    assert m["nll_ebm"] == pytest.approx(h + KL_PQ, abs=0.015)
    assert m["nll_flow"] == pytest.approx(h + KL_PQ, abs=0.015)


def test_kde_kl_is_kl_of_data_from_kde(gaussian_dataset):
    """The KDE (bandwidth bw) of N(0, VAR_Q) samples is about N(0, VAR_Q + bw^2)."""
    x = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(1))
    bw = 0.1
    kl = diagnostics.kde_kl("g", x, bw)
    assert kl == pytest.approx(gauss_kl((0, 0), (VAR_P,) * 2, (0, 0), (VAR_Q + bw * bw,) * 2),
                               abs=0.01)


# ============================================================================= VI
G = "G_test_signs"  # a Gaussian VI target, registered for the tests that need it
M_P, V_P = (0.3, 0.0), (0.49, 0.36)
LOG_Z_G = -1.3  # U = -log N(z; M_P, V_P) + 1.3, so log Z = -1.3 (a sign slip on log Z shows)


@pytest.fixture
def gaussian_target(monkeypatch):
    monkeypatch.setitem(targets.ENERGIES, G, lambda z: -LOG_Z_G - gauss_log_prob(
        z.reshape(-1, 2), M_P, V_P).reshape(z.shape[:-1]))
    return G


def _affine_flow():
    """A RealNVP stack (one target) whose layers are affine maps with known parameters: base
    N(mu, diag sigma^2), then one coupling with constant shift t and log-scale s on the second
    coordinate (the coupling's net has zero weights and a bias (t, s)). Returns the stack and
    q's mean and variances."""
    model = vi_flows.build_flow("stack", flow_spec={"name": "realnvp", "dim": 2, "K": 1,
                                                    "hidden": [4], "base": "learned"},
                                n_targets=1, batched=False).double()
    base, coupling = model.flow(0).transforms[1], model.flow(0).transforms[0]
    assert not coupling.swap  # transforms the second coordinate given the first
    mu, sigma, t, s = (0.2, -0.3), (0.6, 0.5), 0.4, -0.3
    with torch.no_grad():
        base.mu.copy_(torch.tensor(mu))
        base.log_sigma.copy_(torch.log(torch.tensor(sigma)))
        for p in coupling.net.parameters():
            p.zero_()
        coupling.net[-1].bias.copy_(torch.tensor([t, s]))
    scale = math.exp(coupling.bound * math.tanh(s / coupling.bound))  # soft-clamped log-scale
    return model, (mu[0], mu[1] * scale + t), (sigma[0] ** 2, (sigma[1] * scale) ** 2)


def test_vi_reported_kl_is_reverse_kl_closed_form(gaussian_target):
    model, m_q, v_q = _affine_flow()
    res = train_vi.evaluate(model, [G], 200_000)[G]
    exact = gauss_kl(m_q, v_q, M_P, V_P)
    assert abs(exact - gauss_kl(M_P, V_P, m_q, v_q)) > 0.1  # the directions differ
    assert res["log_Z"] == pytest.approx(LOG_Z_G, abs=1e-5)  # grid log Z
    assert abs(res["kl"] - exact) < 4 * res["kl_se"] + 1e-4, (res["kl"], exact, res["kl_se"])
    assert res["kl_se"] < 0.003
    assert res["bound"] == pytest.approx(res["kl"] - res["log_Z"], abs=1e-12)


def test_vi_beta_schedule_is_the_documented_one():
    cfg = {"anneal": True, "anneal_steps": 200}
    for t, beta in [(0, 0.01), (1, 0.015), (99, 0.505), (198, 1.0), (500, 1.0)]:
        assert train_vi.beta_at(t, cfg) == pytest.approx(min(1.0, 0.01 + t / 200), abs=1e-15)
        assert train_vi.beta_at(t, cfg) == pytest.approx(beta, abs=1e-12)
    assert train_vi.beta_at(0, {"anneal": False, "anneal_steps": 200}) == 1.0


def test_vi_training_uses_beta_t_at_step_t(tmp_path, monkeypatch):
    """Training step t (0-based) minimises mean(log q + beta_t U) with the documented beta_t:
    the loss logged after each step equals that mean, recomputed from the very samples, log q
    and energies of the step (recorded), and the logged beta is beta_t."""
    from logger import read_metrics

    energies, samples = [], []
    real_energies, real_slp = targets.energies, vi_flows.PlanarStack.sample_and_log_prob

    def spy_energies(names, x, confined=True):
        u = real_energies(names, x, confined)
        energies.append(u.detach().clone())
        return u

    def spy_slp(self, n, z=None):
        x, lq = real_slp(self, n, z)
        if n == 16:  # training batches (evaluation draws 100)
            samples.append(lq.detach().clone())
        return x, lq

    monkeypatch.setattr(targets, "energies", spy_energies)
    monkeypatch.setattr(vi_flows.PlanarStack, "sample_and_log_prob", spy_slp)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r"
    assert train_vi.main(["--target=U1", "--K=2", "--steps=4", "--anneal_steps=2",
                          "--eval_every=1", "--batch=16", "--eval_samples=100",
                          "--final_samples=100", "--no-frames", "--wandb=disabled",
                          f"--out_dir={out}"]) == 0
    rows = [r for r in read_metrics(str(out)) if "beta" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and len(energies) == len(samples) == 4
    for t, (row, u, lq) in enumerate(zip(rows, energies, samples)):
        beta = min(1.0, 0.01 + t / 2)
        assert row["beta"] == pytest.approx(beta, abs=1e-15)
        assert row["U1/loss"] == pytest.approx(float((lq + beta * u).mean(1)[0]), rel=1e-6)


def test_vi_defaults_are_the_settings_that_meet_the_targets():
    """README: planar K = 32 meets the U1-U4 targets at lr 3e-3 (cosine to 0, anneal over
    5,000 of 10,000 steps, batch 256); the defaults are those settings."""
    args = train_vi.build_parser().parse_args([])
    assert (args.lr, args.lr_schedule, args.steps, args.anneal_steps, args.batch, args.flow,
            args.K) == (3e-3, "cosine", 10000, 5000, 256, "planar", 32)


# ============================================================================= MCMC
def _linear_ebm(a, b):
    """F(x) = a . x + b as an EBM (one Linear layer: the fast gradient path applies)."""
    F = EBM(2, (), "leakyrelu").double()
    with torch.no_grad():
        F.net[0].weight.copy_(torch.tensor([a], dtype=torch.float64))
        F.net[0].bias.fill_(b)
    return F


@pytest.mark.parametrize("fast", [True, False])
def test_r_t_and_drift_for_a_linear_F(fast):
    """U = (2 / eps^2) F with F = a . x: every Langevin step moves x by -dF/dx = -a plus noise,
    and r_t = mean |dF/dx| = |a| exactly at every step."""
    a, eps, L = (0.3, -0.4), 0.1, 50
    F = _linear_ebm(a, 1.0)
    U = Energy(F, 2 / eps ** 2) if fast else (lambda x: F(x) * (2 / eps ** 2))
    x0 = torch.zeros(4000, 2, dtype=torch.float64)
    torch.manual_seed(0)
    x, r = langevin(U, x0, L, eps, return_grad_norm=True, freeze=F)
    assert torch.allclose(r, torch.full((L,), 0.5, dtype=torch.float64), rtol=1e-12)
    # mean displacement -L a; noise std of the mean: eps sqrt(L / 4000) = 0.011
    assert torch.allclose(x.mean(0), -L * torch.tensor(a, dtype=torch.float64), atol=0.05)


def test_r_t_is_mean_gradient_norm_along_the_chain_for_a_quadratic_F():
    """F = k |x|^2 / 2: replaying the same noise by hand, x_{t+1} = (1 - k) x_t + eps xi_t and
    r_t = k mean_i |x_{t,i}| (before step t)."""
    k, eps, L = 0.05, 0.2, 30
    U = lambda x: (2 / eps ** 2) * 0.5 * k * (x * x).sum(1)  # noqa: E731
    x0 = torch.randn(300, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(7)
    x, r = langevin(U, x0, L, eps, return_grad_norm=True)
    torch.manual_seed(7)
    noise = torch.randn(L, 300, 2, dtype=torch.float64) * eps
    y, r_ref = x0.clone(), []
    for t in range(L):
        r_ref.append(float(k * y.norm(dim=1).mean()))
        y = (1 - k) * y + noise[t]
    assert torch.allclose(r, torch.tensor(r_ref, dtype=torch.float64), rtol=1e-10)
    assert torch.allclose(x, y, atol=1e-10)


def test_train_mcmc_d_t_and_r_t_on_a_linear_F(tmp_path, monkeypatch):
    """In train_mcmc, d_t = mean F(x+) - mean F(x-) and r_t = mean |dF/dx| along the chains,
    with F(x) = a . x + b: r_1 = |a| and d_1 = a . (mean x+ - mean x-), from the very batches
    of the first iteration (x- recorded from Langevin's output, x+ as the other batch that F
    is evaluated on outside the chains)."""
    import train_mcmc

    a = (0.3, -0.4)
    seen, negatives = [], []

    class Recording(EBM):
        def forward(self, x):
            if not x.requires_grad:  # outside the chains (Langevin's inputs require grad)
                seen.append(x.detach().clone())
            return super().forward(x)

    def make(dim, hidden, act):
        F = Recording(2, (), "leakyrelu")
        with torch.no_grad():
            F.net[0].weight.copy_(torch.tensor([a]))
            F.net[0].bias.fill_(0.7)
        return F

    def spy_langevin(*args, **kw):
        out = langevin(*args, **kw)
        negatives.append((out[0] if isinstance(out, tuple) else out).clone())
        return out

    monkeypatch.setattr(train_mcmc, "EBM", make)
    monkeypatch.setattr(train_mcmc, "langevin", spy_langevin)
    out = tmp_path / "r"
    train_mcmc.main(["--dataset", "gmm", "--n_train", "500", "--n_test", "200", "--L", "5",
                     "--batch", "64", "--bank_size", "200", "--n_kde", "200", "--steps", "1",
                     "--wandb", "disabled", "--eval_every", "1000", "--out_dir", str(out),
                     "--image_dir", str(tmp_path / "img")])
    ckpt = checkpoint.load_checkpoint(str(out / "checkpoint.pt"))
    x_neg = negatives[0]
    first_two = seen[:2]
    is_neg = [torch.equal(s_, x_neg) for s_ in first_two]
    assert sorted(is_neg) == [False, True]  # the loss evaluates F on x- and on one other batch
    x_pos = first_two[is_neg.index(False)]
    assert x_pos.shape == x_neg.shape == (64, 2)
    a_t = torch.tensor(a)
    d_1 = float(a_t @ (x_pos.mean(0) - x_neg.mean(0)))
    assert abs(d_1) > 0.01  # the two orders differ
    assert float(ckpt["r_hist"][0]) == pytest.approx(0.5, rel=1e-6)
    assert float(ckpt["d_hist"][0]) == pytest.approx(d_1, abs=1e-5)


@pytest.mark.parametrize("T", [0.5, pytest.param(2.0, marks=pytest.mark.slow)])
def test_ula_at_temperature_T_samples_N_0_T(T):
    """U = |x|^2 / 2 at temperature T: p = N(0, T I). ULA's own stationary variance is
    T / (1 - eps^2 / (4 T)) (0.5% above T here); 20,000 chains x 2 coordinates give a standard
    error of 0.7% on the variance. Started from N(0, I), 600 steps leave e^-12 of the start."""
    n = 20000
    eps = math.sqrt(0.02 * T)  # the same contraction eps^2 / (2 T) = 0.01 per step for each T
    torch.manual_seed(0)
    x = langevin(lambda x: 0.5 * (x * x).sum(1), torch.randn(n, 2), 600, eps, temperature=T)
    var = float(x.double().var(0).mean())
    assert var == pytest.approx(T / (1 - eps * eps / (4 * T)), rel=0.03)
    assert var == pytest.approx(T, rel=0.04)
    assert x.mean(0).abs().max() < 4 * math.sqrt(T / n)


# ============================================================================= VAE
def _linear_gaussian_vae(posterior=True):
    """VAE with linear encoder and decoder and Gaussian likelihood: p(z) = N(0, I),
    p(x | z) = N(W z + b, s^2 I). W has orthogonal columns, so the exact posterior
    N(S W^T (x - b) / s^2, S), S = (I + W^T W / s^2)^-1, is diagonal and the encoder can
    represent it exactly (posterior=True); otherwise the encoder is off by a known amount.
    Returns the model and its (W, b, s^2)."""
    model = vae_mod.VAE(3, z_dim=2, hidden=(), likelihood="gaussian").double()
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    s2 = 0.25
    S = torch.linalg.inv(torch.eye(2, dtype=torch.float64) + W.T @ W / s2)
    A = S @ W.T / s2                                  # posterior mean = A (x - b)
    logvar = torch.log(torch.diagonal(S))
    if not posterior:
        A = A * 0.7
        logvar = logvar + torch.tensor([0.5, -0.4], dtype=torch.float64)
    with torch.no_grad():
        model.decoder[0].weight.copy_(W)
        model.decoder[0].bias.copy_(b)
        model.log_sigma.fill_(math.log(math.expm1(math.sqrt(s2) - 0.05)))  # sigma = 0.5
        enc = model.encoder[0]
        enc.weight.zero_()
        enc.weight[:2] = A
        enc.bias[:2] = -A @ b
        enc.bias[2:] = 10 * torch.atanh(logvar / 10)  # encode() soft-clamps logvar
    assert float(model.sigma().detach()) == pytest.approx(0.5, abs=1e-12)
    return model, W, b, s2


def _expected_elbo(model, x):
    """E_eps ELBO(x) exactly: the ELBO is quadratic in eps, and the 2d points +-sqrt(d) e_j
    have mean 0 and covariance I, so their average is the Gaussian expectation."""
    d = model.z_dim
    pts = math.sqrt(d) * torch.cat([torch.eye(d), -torch.eye(d)]).double()
    return torch.stack([model.elbo(x, eps=p.expand(len(x), d)) for p in pts]).mean(0)


def test_elbo_equals_log_evidence_at_the_exact_posterior():
    model, W, b, s2 = _linear_gaussian_vae(posterior=True)
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cov = W @ W.T + s2 * torch.eye(3, dtype=torch.float64)
    log_px = torch.distributions.MultivariateNormal(b, cov).log_prob(x)
    assert torch.allclose(_expected_elbo(model, x), log_px, atol=1e-10)


def test_elbo_gap_is_kl_to_the_posterior_and_kl_term_is_present():
    """With a wrong encoder, log p(x) - E ELBO = KL(q(z|x) || p(z|x)) > 0 (closed form), and
    the single-sample ELBO is log p(x | z) - KL(q || N(0, I)) with the analytic KL."""
    model, W, b, s2 = _linear_gaussian_vae(posterior=False)
    exact, _, _, _ = _linear_gaussian_vae(posterior=True)
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cov = W @ W.T + s2 * torch.eye(3, dtype=torch.float64)
    log_px = torch.distributions.MultivariateNormal(b, cov).log_prob(x)
    mu_q, lv_q = model.encode(x)
    mu_p, lv_p = exact.encode(x)
    gap = torch.tensor([gauss_kl(m1, v1, m2, v2) for m1, v1, m2, v2 in
                        zip(mu_q.tolist(), lv_q.exp().tolist(), mu_p.tolist(),
                            lv_p.exp().tolist())], dtype=torch.float64)
    assert (gap > 0.05).all()
    assert torch.allclose(log_px - _expected_elbo(model, x), gap, atol=1e-10)
    eps = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    z = mu_q + torch.exp(0.5 * lv_q) * eps
    kl_prior = torch.tensor([gauss_kl(m, v, (0, 0), (1, 1)) for m, v in
                             zip(mu_q.tolist(), lv_q.exp().tolist())], dtype=torch.float64)
    log_lik = gauss_log_prob(x - z @ W.T - b, (0, 0, 0), (s2,) * 3)
    assert torch.allclose(model.elbo(x, eps=eps), log_lik - kl_prior, atol=1e-10)


# ============================================================================= defects (section 2)
class _ShiftedEBM(EBM):
    """An EBM subclass whose forward adds |x|^2: it has a `.net` MLP, but its energy is not
    that MLP alone, so the hand-written gradient must not be used."""

    def forward(self, x):
        return super().forward(x) + (x * x).sum(-1)


class _OtherModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return -2 * self.net(x).squeeze(-1)


def _autograd_grad(f, x, scale):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad((f(x) * scale).sum(), x)[0]


@pytest.mark.parametrize("act", ["leakyrelu", "silu", "tanh", "softplus", "elu", "relu"])
def test_fast_and_autograd_gradients_agree(act):
    torch.manual_seed(0)
    f = EBM(2, (16, 8), act).double()
    U = Energy(f, scale=3.0)
    assert U.fast
    x = 3 * torch.randn(64, 2, dtype=torch.float64)
    assert torch.allclose(U.grad(x), U._autograd_grad(x), atol=1e-12, rtol=1e-10)
    assert torch.allclose(U.grad(x), _autograd_grad(f, x, 3.0), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("make", [lambda: _ShiftedEBM(2, (8,), "silu"), _OtherModule])
def test_fast_path_only_for_the_exact_architecture(make):
    torch.manual_seed(0)
    f = make()
    U = Energy(f, scale=2.0)
    assert not U.fast
    x = torch.randn(32, 2)
    assert torch.allclose(U.grad(x), _autograd_grad(f, x, 2.0), atol=1e-6)
    # a forward hook changes what f computes: no fast path either
    g = EBM(2, (8,), "silu")
    g.register_forward_hook(lambda m, i, o: 2 * o)
    assert not Energy(g).fast
    assert torch.allclose(Energy(g).grad(x), _autograd_grad(g, x, 1.0), atol=1e-6)


def test_fast_path_falls_back_when_a_private_kernel_is_missing_or_wrong(monkeypatch):
    torch.manual_seed(0)
    f = EBM(2, (8, 8), "softplus")
    x = torch.randn(32, 2)
    ref = _autograd_grad(f, x, 1.5)

    def missing(m):
        return (lambda a: torch._C._nn.no_such_kernel(a), lambda g, a, h: g)

    def wrong(m):
        return (nn.functional.softplus, lambda g, a, h: -g * torch.sigmoid(a))

    for table in (missing, wrong):
        monkeypatch.setitem(samplers._ACTIVATIONS, nn.Softplus, table)
        monkeypatch.setattr(samplers, "_KERNELS_OK", {})
        with pytest.warns(RuntimeWarning, match="using autograd"):
            U = Energy(f, scale=1.5)
            assert not U.fast
        assert torch.allclose(U.grad(x), ref, atol=1e-6)
        torch.manual_seed(1)
        a = langevin(U, x, 5, 0.1)
        torch.manual_seed(1)
        b = langevin(lambda y: f(y) * 1.5, x, 5, 0.1, freeze=f)
        assert torch.allclose(a, b, atol=1e-6)


def test_kde_reports_escaped_mass_instead_of_renormalising():
    """A quarter of the samples far outside the grid: the KDE on the grid integrates to 3/4
    and the outside mass is reported as 1/4 (it used to be renormalised to 1 silently)."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([0.5 * torch.randn(3000, 2, generator=g), torch.full((1000, 2), 50.0)])
    bound, n = 4.5, 150
    log_kde, outside = diagnostics.kde_log_density(x, 0.1, bound, n, return_outside=True)
    area = (2 * bound / n) ** 2
    assert float(log_kde.exp().sum()) * area == pytest.approx(0.75, abs=1e-9)
    assert outside == pytest.approx(0.25, abs=1e-9)
    log_all = diagnostics.kde_log_density(x[:3000], 0.1, bound, n)
    # the escaped samples cost exactly log(4/3) of density everywhere on the grid
    reached = log_kde > -600                           # cells some kernel reaches
    assert reached.float().mean() > 0.05
    assert torch.allclose((log_all - log_kde)[reached], torch.full_like(log_kde[reached],
                                                                         math.log(4 / 3)))


@pytest.mark.parametrize("bw", [0.05, 1.0, 3.0])
def test_kde_shape_and_mass_for_any_bandwidth(bw):
    """One sample at a cell centre: the grid has n*n values whatever the bandwidth (a kernel
    wider than the grid used to return a bigger array), and the mass on the grid is the
    Gaussian's mass in the square."""
    bound, n = 4.5, 45                                 # cell centres 0, +-0.2, ...
    x = torch.tensor([[0.2, 0.2]])
    log_kde, outside = diagnostics.kde_log_density(x, bw, bound, n, return_outside=True)
    assert log_kde.shape == (n * n,)
    h = 2 * bound / n
    # the discrete kernel truncated at 8 bw: exact mass of the cells inside the square
    half = math.ceil(8 * bw / h)
    t = torch.arange(-half, half + 1, dtype=torch.float64) * h
    k = torch.exp(-t * t / (2 * bw * bw))
    k = k / k.sum()
    centre = 23                                        # index of the cell centred at 0.2
    idx = torch.arange(-half, half + 1) + centre
    inside_1d = float(k[(idx >= 0) & (idx < n)].sum())
    mass = float(log_kde.exp().sum()) * h * h
    assert mass == pytest.approx(inside_1d ** 2, abs=1e-12)
    assert outside == pytest.approx(1 - inside_1d ** 2, abs=1e-12)
    # and the values sit where the kernel is: the maximum at the sample's cell
    grid, _ = gridmath.grid_points(bound, n)
    assert torch.allclose(grid[int(log_kde.argmax())], torch.tensor([0.2, 0.2],
                                                                    dtype=torch.float64))
    if bw == 3.0:  # against the continuous Gaussian's mass in the square
        cont = 0.5 * (math.erf((bound - 0.2) / (bw * math.sqrt(2)))
                      + math.erf((bound + 0.2) / (bw * math.sqrt(2))))
        assert mass == pytest.approx(cont ** 2, abs=5e-3)


def _linear_decoder_vae():
    """A Gaussian-likelihood VAE with decoder means x = 0.5 + 0.1 z (2D, far from the clamp at
    0 and 1): the law of its decoded means of prior draws is N(0.5, 0.01 I)."""
    model = vae_mod.VAE(2, z_dim=2, hidden=(), likelihood="gaussian")
    with torch.no_grad():
        model.decoder[0].weight.copy_(0.1 * torch.eye(2))
        model.decoder[0].bias.fill_(0.5)
    return model


class _QuadE(nn.Module):
    """E(x) = a |x - 0.5|^2 / (2 * 0.01): tilting N(0.5, 0.01 I) to N(0.5, 0.01 / (1 + a) I)."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))

    def forward(self, x):
        return self.a * ((x - 0.5) ** 2).sum(-1) / 0.02


@pytest.mark.parametrize("a", [0.0, pytest.param(3.0, marks=pytest.mark.slow)])
def test_ml_data_tilt_samples_the_model_it_was_trained_on(a):
    """The ml data tilt is trained with base samples vae.sample (decoded means of prior draws):
    its Langevin samples follow exp(-E(x)) times that base. With E = 0 they are the base
    itself, N(0.5, 0.01); with E = a |x - 0.5|^2 / 0.02, N(0.5, 0.01 / (1 + a)). (Langevin on
    E(x) - ELBO(x), the old sampler, targets another model.)"""
    model = _linear_decoder_vae()
    torch.manual_seed(0)
    base, _ = model.sample(20000)                        # what fit_tilt's "ml" base draws
    assert float(base.var(0).mean()) == pytest.approx(0.01, rel=0.03)
    x, desc = tilt.sample_data_tilt(_QuadE(a), model, "ml", 20000, 300, 0.2)
    assert desc == tilt.DATA_TILT_MODELS["ml"] and "decoded means" in desc
    assert torch.allclose(x.mean(0), torch.tensor([0.5, 0.5]), atol=0.003)
    # ULA bias: latent variance (1 / (1 + a)) / (1 - eps^2 (1 + a) / 4) ~ 1-4% above
    v = 0.01 / (1 + a) / (1 - 0.04 * (1 + a) / 4)
    assert float(x.var(0).mean()) == pytest.approx(v, rel=0.03)


def test_cd_data_tilt_sampler_names_its_model_and_runs_on_E_minus_ELBO():
    model = _linear_decoder_vae()
    E = _QuadE(1.0)
    x0, _ = model.sample(16)
    torch.manual_seed(3)
    x, desc = tilt.sample_data_tilt(E, model, "cd", 16, 4, 0.01, x0=x0)
    assert "ELBO" in desc
    torch.manual_seed(3)
    ref = langevin(tilt.data_U(E, model), x0, 4, 0.01, freeze=(E, model)).clamp(0, 1)
    assert torch.equal(x, ref)
    with pytest.raises(ValueError, match="ml or cd"):
        tilt.sample_data_tilt(E, model, "hackathon", 4, 1, 0.1)
