"""EBMs built on a flow (tilt.FlowTilt), the box and mixture flows they use, the reference
rungs of the digits ladder, early stopping and the trust verdict: each
against a closed form chosen so that a wrong sign or a dropped term cannot cancel."""
import json
import math

import pytest
import torch

import checkpoint
import flows
import gridmath
import logger
import references
import tasks
import tilt
import train
from ebm import EBM
from test_flows import randomise


# ----------------------------------------------------------------------------- the box
@pytest.mark.parametrize("name", ["maf", "glow", pytest.param("nsf", marks=pytest.mark.slow),
                                  "nsf_coupling"])
def test_box_flow_is_a_density_on_the_box(name):
    """A box flow: log-det against autograd, inverse(forward) = id, samples inside its
    domain E = (-r, r)^2, r = 1 / (1 - 2a), -inf outside, and its density integrates to one
    over E on the float64 grid."""
    torch.manual_seed(0)
    kw = {"n_steps": 2} if name == "glow" else {"n_blocks": 2}
    flow = randomise(flows.build_flow(name, torch.rand(64, 2) * 2 - 1, box=True, dim=2,
                                      hidden=[16], **kw), scale=0.15).double()
    x = torch.rand(5, 2, dtype=torch.float64) * 1.9 - 0.95
    z, ld = flow(x)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], xi)
                       for xi in x])
    assert torch.allclose(ld, torch.linalg.slogdet(jac)[1], atol=1e-8)
    assert torch.allclose(flow.inverse(z)[0], x, atol=1e-8)
    with torch.no_grad():
        r = 1 / (1 - 2 * flows.BoxLogit().alpha)
        y = flow.sample(2000)
        assert y.abs().max() < r and torch.isfinite(flow.log_prob(y)).all()
        assert flow.log_prob(torch.tensor([[1.2, 0.0], [0.0, -1.12]], dtype=torch.float64)
                             ).eq(-math.inf).all()
        points, area = gridmath.grid_points(r, 400)
        mass = float(torch.exp(flow.log_prob(points)).sum() * area)
    assert mass == pytest.approx(1.0, abs=2e-3)
    assert flows.flow_from_spec(flow.spec()).spec() == flow.spec()


def test_box_logit_closed_form():
    """z = logit(a + (1 - 2a)(y + 1)/2) at y = 0 is 0 with log|dz/dy| = D log(2 (1 - 2a))."""
    t = flows.BoxLogit(0.05)
    z, ld = t(torch.zeros(1, 3, dtype=torch.float64))
    assert z.abs().max() == 0 and float(ld) == pytest.approx(3 * math.log(0.9 / 2 / 0.25))
    y, ld_inv = t.inverse(z)
    assert float(ld_inv) == pytest.approx(-float(ld)) and y.abs().max() < 1e-12


# ----------------------------------------------------------------------------- the mixture
def test_flow_mixture_log_prob_sampling_and_spec():
    """log q = logsumexp of the active members - log n; stratified samples (member k's slice
    of z); only the first n_active members count; the spec rebuilds it."""
    torch.manual_seed(0)
    members = [flows.gaussian(2, torch.tensor([m, 0.0]), torch.eye(2) * s)
               for m, s in ((-2.0, 0.5), (2.0, 1.0), (0.0, 4.0))]
    mix = flows.FlowMixture(members)
    mix.n_active.fill_(2)
    x = torch.randn(7, 2)
    want = torch.logsumexp(torch.stack([members[0].log_prob(x), members[1].log_prob(x)]), 0) \
        - math.log(2)
    assert torch.allclose(mix.log_prob(x), want)
    z = torch.randn(1000, 2)
    y = mix.sample(1000, z)
    assert torch.allclose(y[:500], members[0].sample(500, z[:500]))
    assert torch.allclose(y[500:], members[1].sample(500, z[500:]))
    rebuilt = flows.flow_from_spec(mix.spec())
    assert len(rebuilt.members) == 3


# ----------------------------------------------------------------------------- the tilt
def _linear_tilt(a, dim=2):
    """q0 = N(0, I), g(x) = a . x + 0.3, c = 1.5: p = N(-a, I), log Z = |a|^2 / 2 - 0.3."""
    g = EBM(dim, [1])
    g.net[1] = torch.nn.Identity()
    with torch.no_grad():
        g.net[0].weight.copy_(torch.tensor([a]))
        g.net[0].bias.zero_()
        g.net[2].weight.fill_(1.0)
        g.net[2].bias.fill_(0.3)
        g.c.fill_(1.5)
    return tilt.FlowTilt(flows.gaussian(dim).double(), g.double())


def test_log_Z_importance_sampling_against_the_closed_form():
    a = [0.6, -0.4]
    t = _linear_tilt(a)
    y = t.base.sample(200_000)
    log_Z, ess, se = tilt.log_Z_is(t.g, y)
    exact = 0.5 * (0.36 + 0.16) - 0.3
    assert log_Z == pytest.approx(exact, abs=4 * se + 1e-3)
    # ESS / n -> exp(-|a|^2) for a Gaussian tilted linearly
    assert ess / len(y) == pytest.approx(math.exp(-0.52), rel=0.05)
    assert se == pytest.approx(math.sqrt((len(y) / ess - 1) / len(y)))
    # the tilt's log-density is N(-a, I)'s
    x = torch.randn(5, 2, dtype=torch.float64)
    want = torch.distributions.MultivariateNormal(-torch.tensor(a, dtype=torch.float64),
                                                  torch.eye(2, dtype=torch.float64)).log_prob(x)
    assert torch.allclose(tilt.tilt_log_prob(t, x, exact), want, atol=1e-10)
    # energy f = g - log q0, logit -g - c, log_prob = log q0 - g - c
    assert torch.allclose(t(x), t.g(x) - t.base.log_prob(x))
    assert torch.allclose(t.logit(x), -t.g(x) - 1.5)
    assert torch.allclose(t.log_prob(x), t.base.log_prob(x) - t.g(x) - 1.5)


def test_tilt_losses_closed_form():
    """ML: mean g(x) + log mean exp(-g(y)); NCE: the logistic loss with logit -g - c."""
    t = _linear_tilt([0.5, 0.0])
    x = torch.tensor([[1.0, 0.0], [-1.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 0.0], [2.0, 1.0], [-2.0, 0.0]], dtype=torch.float64)
    gx, gy = 0.5 * x[:, 0] + 0.3, 0.5 * y[:, 0] + 0.3
    ml = gx.mean() + torch.logsumexp(-gy, 0) - math.log(3)
    assert float(tilt.ml_tilt_loss(t, x, y).detach()) == pytest.approx(float(ml))
    sig = torch.nn.functional.logsigmoid
    nce = -(sig(-gx - 1.5).mean() + sig(gy + 1.5).mean())
    assert float(tilt.nce_tilt_loss(t, x, y).detach()) == pytest.approx(float(nce))


def test_tilt_step_descends_and_refuses_non_finite():
    t = _linear_tilt([0.5, 0.0])
    opt = torch.optim.SGD(t.g.parameters(), lr=0.1)
    x, y = torch.randn(64, 2, dtype=torch.float64) - 1, torch.randn(64, 2, dtype=torch.float64)
    before = float(tilt.ml_tilt_loss(t, x, y).detach())
    tilt.tilt_step(t, x, y, opt, "ml")
    assert float(tilt.ml_tilt_loss(t, x, y).detach()) < before
    x[0, 0] = math.nan
    state = {k: v.clone() for k, v in t.g.state_dict().items()}
    assert math.isnan(float(tilt.tilt_step(t, x, y, opt, "ml")))
    assert all(torch.equal(state[k], v) for k, v in t.g.state_dict().items())


def _box_tilt(a):
    """The linear tilt of N(0, I) on the box [-1, 1]^D: Z = prod_i E[exp(-a_i x_i) 1(|x_i| <=
    1)] = prod_i exp(a_i^2 / 2 - 0.3 / D) (Phi(1 + a_i) - Phi(-1 + a_i)), the closed form
    beside it."""
    t = _linear_tilt(a, len(a))
    t.box = True
    a = torch.tensor(a, dtype=torch.float64)
    cell = torch.special.ndtr(1 + a) - torch.special.ndtr(-1 + a)
    return t, float((a ** 2 / 2 + torch.log(cell)).sum()) - 0.3


def test_base_on_box_is_the_base_given_the_box():
    """BaseOnBox: log Q of N(0, I) in 3-D within 0.02 of 3 log(Phi(1) - Phi(-1)); its draws lie
    inside the box with the truncated normal's variance 1 - 2 phi(1) / (Phi(1) - Phi(-1));
    log_prob is log q0 - log Q inside and -inf outside."""
    torch.manual_seed(0)
    base = flows.gaussian(3).double()
    on_box = tilt.BaseOnBox(base, n=100_000)
    cell = math.erf(1 / math.sqrt(2))
    assert on_box.log_Q == pytest.approx(3 * math.log(cell), abs=0.02)
    x, log_p = on_box.sample_and_log_prob(20_000)
    assert x.shape == (20_000, 3) and bool(tilt.in_box(x).all())
    var = 1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / cell
    assert torch.allclose(x.var(0), torch.full((3,), var, dtype=torch.float64), atol=0.01)
    assert torch.allclose(log_p, base.log_prob(x) - on_box.log_Q)
    assert on_box.log_prob(torch.tensor([[0.0, 1.5, 0.0]], dtype=torch.float64)) == -math.inf


def test_iid_draws_of_a_mixture_pick_members_at_random():
    """A FlowMixture samples in strata (member 0 fills the first half); iid_draws picks each
    draw's member at random: the first half holds about half of each member."""
    torch.manual_seed(1)
    mix = flows.FlowMixture([flows.gaussian(1, torch.tensor([m]), torch.eye(1) * 0.01)
                             for m in (-5.0, 5.0)])
    assert bool((mix.sample(1000)[:500] < 0).all())
    share = float((tilt.iid_draws(mix, 1000)[:500] < 0).double().mean())
    assert 0.4 < share < 0.6, share


def test_base_samples_stop_early_at_a_whole_chunk_of_the_same_draws():
    """base_samples with `until`: the drawing ends after the first chunk for which until(drawn,
    cpu_s) holds, and what it kept is the start of the full draw from an equally seeded
    generator (a resumed run redraws its bank by count)."""
    base = flows.gaussian(2)
    full = tilt.base_samples(base, 2500, torch.Generator().manual_seed(3), chunk=1000)
    asked = []
    part = tilt.base_samples(base, 2500, torch.Generator().manual_seed(3), chunk=1000,
                             until=lambda drawn, cpu_s: asked.append((drawn, cpu_s)) or
                             drawn >= 2000)
    assert full.shape == (2500, 2) and part.shape == (2000, 2)
    assert torch.equal(part, full[:2000])
    assert [d for d, _ in asked] == [1000, 2000] and all(c >= 0 for _, c in asked)
    never = tilt.base_samples(base, 2500, torch.Generator().manual_seed(3), chunk=1000,
                              until=lambda drawn, cpu_s: False)
    assert torch.equal(never, full)


def test_bank_is_cut_by_the_budget_left_and_redrawn_by_count_on_resume():
    """A tilt's bank: --bank draws with no budget; with none of the budget left only the first
    chunk (the drawing stops once it took half of what is left); its count goes into the
    run's state, and a Bank resumed with that state draws the same samples and the same
    validation samples."""
    args = train.get_args(["--estimator", "tilt", "--bank", "12000", "--seed", "4"])
    flow, g = flows.gaussian(2), EBM(2, [8])
    ebm = tilt.FlowTilt(flow, g)

    def bank(cpu_s_left=None, draws=0):
        state = {"bank_draws": draws}
        b = train.Bank(args, ebm, flow, state)
        b.y = None
        return b.freeze(cpu_s_left), state

    # half of what is left less the validation samples (20,000) at the bank's rate
    assert not train.bank_drawn(15_000, 10.5, 36.0) and train.bank_drawn(20_000, 14.0, 36.0)
    assert not train.bank_drawn(100_000, 70.0, 175.0) and train.bank_drawn(5000, 3.5, 0.0)
    whole, s_whole = bank()
    cut, s_cut = bank(cpu_s_left=0.0)
    assert s_whole["bank_draws"] == len(whole.y) == 12000
    assert s_cut["bank_draws"] == len(cut.y) == 5000 and torch.equal(cut.y, whole.y[:5000])
    again, s_again = bank(cpu_s_left=1e9, draws=5000)  # resumed: the count, not the budget
    assert torch.equal(again.y, cut.y) and torch.equal(again.y_val, cut.y_val)
    assert s_again["bank_draws"] == 5000 and len(cut.y_val) == tasks.VAL_IS


def test_ais_of_a_tilt_on_the_box_against_the_closed_form():
    """AIS from the base given the box (BaseOnBox) to the linear tilt on the box, by
    independence moves (annealing, as tasks.Images scores a tilt): log Z within 0.03 of the
    closed form, a bracket of the exact test log-likelihood, and forward weights far from
    degenerate."""
    import annealing

    torch.manual_seed(2)
    t, log_Z = _box_tilt([0.8, -0.5, 0.3])
    base = tilt.BaseOnBox(t.base, n=200_000)
    with torch.no_grad():  # draws of the tilt: the base's, resampled by exp(-g)
        x_test = base.sample(2000)
        x_test = x_test[tilt.snir(-t.g_box(x_test), 500)[0]]
    br = annealing.loglik_bracket(t, base, x_test, n_chains=500, n_temps=20, repeats=2,
                                  transition="independence")
    assert abs(br.log_Z_lower - log_Z) < 0.03, (br.log_Z_lower, log_Z)
    assert abs(br.log_Z_upper - log_Z) < 0.03, (br.log_Z_upper, log_Z)
    exact = float((-t(x_test)).detach().mean()) - log_Z
    assert br.lower - 0.03 <= exact <= br.upper + 0.03
    assert float(br.forward.ess.min()) > 400 and br.forward.acceptance > 0.5


# ----------------------------------------------------------------------------- trust
@pytest.mark.parametrize("upper, lower, ess, second, want", [
    (-90.0, -90.8, 10.0, None, False),   # tight bracket, ESS 10% of 200 chains is 20
    (-90.0, -90.8, 20.0, None, True),
    (-90.0, -92.0, 200.0, None, False),  # 2 nats wide
    (-90.0, -95.0, 1.0, -90.9, True),    # IS agrees with forward AIS within 1 nat
    (-90.0, -95.0, 1.0, -91.1, False),
    (-90.0, -89.5, 100.0, None, True),   # a negative gap counts by its width
    (-90.0, -80.0, 100.0, None, False),  # ... a wide one fails (the reverse end broke)
])
def test_trust(upper, lower, ess, second, want):
    got = tasks.trust(upper, lower, upper - lower, ess, 200, second)["ll_ebm_trusted"]
    assert got is want


# ----------------------------------------------------------------------------- the ladder
def test_reference_rungs_closed_forms():
    L = 5
    x = torch.tensor([[0, 4], [0, 2], [1, 4]], dtype=torch.float32) / (L - 1) * 2 - 1
    assert references.uniform(3, 17) == pytest.approx(-3 * math.log(17))
    # pixel 0: levels 0, 0, 1; pixel 1: 4, 2, 4; pseudo-count a
    a = 0.5
    lp = references.categorical_log_probs(x, L, a)
    assert float(lp[0, 0]) == pytest.approx(math.log((2 + a) / (3 + L * a)))
    assert float(lp[1, 3]) == pytest.approx(math.log(a / (3 + L * a)))
    assert torch.allclose(lp.exp().sum(1), torch.ones(2, dtype=torch.float64))
    got = references.categorical(x, x[:1], L, a)
    assert got == pytest.approx(math.log((2 + a) / (3 + L * a)) + math.log((2 + a) / (3 + L * a)))
    y = torch.randn(4000, 3, dtype=torch.float64) * torch.tensor([0.1, 0.2, 0.3]) + 0.05
    exact = float(torch.distributions.Normal(0.05, torch.tensor([0.1, 0.2, 0.3])).log_prob(
        y[:5]).sum(1).mean()) + 3 * math.log(2 / L)
    assert references.gaussian(y, y[:5], L) == pytest.approx(exact, abs=0.05)


# ----------------------------------------------------------------------------- runs
DIGITS = ["--dataset", "digits", "--batch", "128", "--ebm_hidden", "16", "--flow_hidden", "8",
          "--flow_layers", "2", "--log_every", "5", "--ais_chains", "8", "--ais_temps", "10",
          "--val_every", "5", "--bank", "2000", "--is_samples", "2000", "--wandb", "disabled"]


def _run(tmp_path, *argv, name="run"):
    out = tmp_path / name
    code = train.main([*argv, "--out_dir", str(out), "--image_dir", str(tmp_path / "img" / name)])
    return code, out


@pytest.mark.slow
def test_tilt_run_on_digits_reports_a_trusted_checked_likelihood(tmp_path):
    """The default digits estimator: base flows, then the tilt; the summary's ll_ebm is the
    importance-sampling estimate recomputed here from the saved model, the flow's own number
    on the box is there, and the base stayed frozen while g trained."""
    code, out = _run(tmp_path, *DIGITS, "--max_steps", "40", "--epoch", "100",
                     "--base_flows", "2", "--base_share", "0.5", "--patience", "2")
    assert code == 0
    s = json.load(open(out / "summary.json"))
    for key in ("ll_ebm", "ll_ebm_trusted", "ll_ebm_lower", "ll_ebm_upper", "ll_flow",
                "ll_flow_box", "tilt_gain", "is_ess", "base_steps", "best_val"):
        assert key in s, key
    assert s["ll_flow_box"] > s["ll_flow"]  # renormalised from E to [-1, 1]^64: Q(box) < 1
    assert s["ll_ebm"] - s["ll_flow_box"] - 0.2 < s["tilt_gain"] < s["ll_ebm"] - s["ll_flow"]
    assert 0 < s["base_steps"] < s["steps"] and s["bank_draws"] == 2000  # --bank, no budget
    run = checkpoint.load_run(str(out))
    assert isinstance(run.ebm, tilt.FlowTilt) and 1 <= int(run.flow.n_active) <= 2
    task = tasks.make_task(train.get_args(["--dataset", "digits"]), "cpu")
    gen = torch.Generator().manual_seed(run.config["seed"] * 7919 + 17)  # Images.tilt_scores
    y = tilt.base_samples(run.flow, 2000, gen)
    log_Z = tilt.log_Z_is(run.ebm.g_box, y)[0]
    ll = task.nats(tilt.tilt_log_prob(run.ebm, task.x_test, log_Z).mean())
    assert s["ll_ebm"] == pytest.approx(ll, abs=1e-6)
    share = float(((y >= -1) & (y <= 1)).all(1).double().mean())
    with torch.no_grad():
        base = task.nats(run.flow.log_prob(task.x_test).double().mean()) - math.log(share)
    assert s["tilt_gain"] == pytest.approx(ll - base, abs=1e-6)


@pytest.mark.slow
def test_early_stopping_restores_the_best_flow(tmp_path):
    """mle on digits with patience 1: the saved flow is the one of the best validation score,
    not the last (a live state_dict reference would restore the last)."""
    code, out = _run(tmp_path, *DIGITS, "--estimator", "mle", "--flow", "nsf_coupling",
                     "--max_steps", "60", "--epoch", "100", "--patience", "100",
                     "--lr_flow", "0.05")
    assert code == 0
    s = json.load(open(out / "summary.json"))
    vals = [r["ll_val"] for r in map(json.loads, open(out / "metrics.jsonl")) if "ll_val" in r]
    assert s["best_val"] == pytest.approx(max(vals))
    run = checkpoint.load_run(str(out))
    task = tasks.make_task(train.get_args(["--dataset", "digits"]), "cpu")
    assert task.validate(None, run.flow) == pytest.approx(max(vals), abs=1e-4)


@pytest.mark.slow
def test_tilt_in_2d_is_scored_on_the_grid(tmp_path):
    code, out = _run(tmp_path, "--estimator", "tilt", "--samples", "2000", "--batch", "200",
                     "--test_samples", "2000", "--ebm_hidden", "16", "--flow_hidden", "16",
                     "--epoch", "2", "--bank", "2000", "--wandb", "disabled")
    assert code == 0
    s = json.load(open(out / "summary.json"))
    assert math.isfinite(s["kl_ebm"]) and math.isfinite(s["kl_flow"]) and s["base_steps"] > 0


@pytest.mark.parametrize("argv, needle", [
    (["--estimator", "tilt", "--flow", "gaussian"], "needs a learned flow"),
    (["--estimator", "nce", "--ebm_on_flow"], "--ebm_on_flow"),
    (["--estimator", "tilt", "--base_schedule", "share", "--base_flows", "3"], "--base_flows 1"),
])
def test_tilt_bad_input(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, *argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


SMALL_2D = ["--samples", "2000", "--batch", "200", "--test_samples", "2000", "--ebm_hidden",
            "16", "--flow_hidden", "16", "--epoch", "1", "--wandb", "disabled"]


def test_base_run_is_the_frozen_base_and_bad_bases_are_one_line(tmp_path, capsys):
    """--base_run: a finished mle run's flow becomes the tilt's base, unchanged by the tilt's
    training, and its CPU-s count; a missing run, a run without a flow and a flow of another
    dataset are refused in one line with exit 2."""
    code, base = _run(tmp_path, *SMALL_2D, "--estimator", "mle", "--flow", "maf", name="base")
    assert code == 0
    code, out = _run(tmp_path, *SMALL_2D, "--estimator", "tilt", "--base_run", str(base),
                     "--bank", "2000", name="tilt")
    assert code == 0
    before, after = checkpoint.load_run(str(base)).flow, checkpoint.load_run(str(out)).flow
    x = torch.randn(50, 2)
    with torch.no_grad():
        assert torch.allclose(before.log_prob(x), after.log_prob(x))
    s = json.load(open(out / "summary.json"))
    assert s["base_cpu_s"] == pytest.approx(json.load(open(base / "summary.json"))["cpu_s"])
    code, sm = _run(tmp_path, *SMALL_2D, "--estimator", "dsm", name="dsm")
    capsys.readouterr()
    for argv, needle in [([str(tmp_path / "nothing")], "--base_run"),
                         ([str(sm)], "holds no flow"),
                         ([str(base), "--dataset", "digits"], "not of digits")]:
        with pytest.raises(SystemExit) as e:
            _run(tmp_path, *SMALL_2D, "--estimator", "tilt", "--base_run", *argv, name="bad")
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and needle in err and "\n" not in err, err


def test_a_tilt_on_a_base_run_starts_its_schedule_at_the_peak_rate(tmp_path):
    """With --base_run under a --budget, the base's CPU-s count in the budget, and g's
    learning-rate schedule runs over what is left: its first rows are near --lr_ebm, not at
    the point of the cosine the base's CPU-s reach (here half the budget)."""
    code, base = _run(tmp_path, *SMALL_2D, "--estimator", "mle", "--flow", "maf", name="base")
    cpu = json.load(open(base / "summary.json"))["cpu_s"]
    code, out = _run(tmp_path, *SMALL_2D, "--estimator", "tilt", "--base_run", str(base),
                     "--bank", "2000", "--budget", str(2 * cpu), "--lr_ebm", "2e-3",
                     "--log_every", "1", name="tilt")
    assert code == 0
    lrs = [r["lr_ebm"] for r in logger.read_metrics(str(out)) if "tilt_loss" in r]
    assert lrs and lrs[0] > 0.9 * 2e-3 and lrs == sorted(lrs, reverse=True), lrs


def test_select_keeps_the_best_scoring_weights_and_stops_on_patience():
    """Early stopping on scripted validation scores 1, 3, 2, 0: the weights of the second call
    are kept (a copy, not a live reference), the counter runs from there, patience 2 stops."""
    import types

    scores = iter([1.0, 3.0, 2.0, 0.0])
    task = types.SimpleNamespace(validate=lambda ebm, flow, log_Z=None: next(scores))
    flow = torch.nn.Linear(1, 1)
    loop = {**train.SELECTION, "phase": None, "step": 0}
    args = types.SimpleNamespace(patience=2, base_share=0.5, base_flows=1)
    run = types.SimpleNamespace(log=types.SimpleNamespace(log=lambda *a, **k: None))
    weights = []
    for k in range(4):
        with torch.no_grad():
            flow.weight.fill_(float(k))
        weights.append(float(k))
        train.select(args, run, loop, task, None, flow, None, 0.0)
        assert loop["stopped"] == (k == 3)
    assert loop["best_val"] == 3.0 and loop["since_best"] == 2
    train.restore_best(loop, {"flow": flow})
    assert float(flow.weight.detach()) == 1.0


def test_unbounded_ray_finds_energies_without_a_normaliser_only():
    """f = |y|_1 grows along every ray (a normaliser exists on R^D): no ray is reported;
    f = -0.5 sum(y) falls along +e_i: reported."""
    import annealing

    class F(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, y):
            return self.fn(y)

    assert annealing.unbounded_ray(F(lambda y: y.abs().sum(-1)), 8) is None
    assert annealing.unbounded_ray(F(lambda y: -0.5 * y.sum(-1)), 8) is not None


def test_a_tilt_whose_is_ess_is_below_one_percent_warns_beside_its_number():
    """The evaluation line of a tilted EBM carries a warning when its importance-sampling ESS
    is below tasks.IS_ESS_FLOOR of the samples, and none above it."""
    import tasks

    m = {"ll_flow": -95.0, "ll_ebm_is": -90.0, "ll_ebm": -90.0, "is_ess": 90.0,
         "is_ess_fraction": 0.009, "tilt_gain": 2.0, "ll_ebm_trusted": False}
    low = tasks.format_metrics(m)
    assert "WARNING: IS ESS 0.90% of the samples, below 1%" in low and "-90.00" in low
    assert "WARNING" not in tasks.format_metrics({**m, "is_ess": 110.0,
                                                  "is_ess_fraction": 0.011})


def test_the_digits_default_is_autoregressive_base_flows_and_2d_keeps_its_own():
    """`train.py --dataset digits` is the tilt the digits table measures as `tilt` (up to
    five autoregressive NSF flows in 70% of the budget, a bank of 100,000, g 512-512 bounded by
    3); a 2D tilt keeps one coupling flow, half the run, 50,000 samples and the bound 4, and
    the other image EBMs (FCE's tilt of its flow included) their 256-256 MLP and bound 4."""
    a = train.get_args(["--dataset", "digits"])
    assert (a.estimator, a.flow, a.base_flows, a.base_share, a.bank, a.base_schedule) == (
        "tilt", "nsf", 5, 0.7, 100_000, "constant")
    assert (a.ebm_hidden, a.tilt_bound) == ([512, 512], 3.0)
    b = train.get_args(["--estimator", "tilt"])
    assert (b.flow, b.base_flows, b.base_share, b.bank) == ("nsf_coupling", 1, 0.5, 50_000)
    assert (b.ebm_hidden, b.tilt_bound) == ([128, 128, 128], 4.0)
    f = train.get_args(["--dataset", "digits", "--estimator", "fce", "--ebm_on_flow"])
    assert (f.ebm_hidden, f.tilt_bound) == ([256, 256], 4.0)
    assert train.get_args(["--dataset", "digits", "--tilt_bound", "5"]).tilt_bound == 5.0
    c = train.get_args(["--dataset", "digits", "--base_flows", "5", "--bank", "3"])
    assert (c.base_flows, c.bank) == (5, 3)
    assert train.get_args(["--dataset", "digits", "--estimator", "fce"]).flow == "nsf_coupling"
