"""FCE/NCE/MLE estimators of train.py beyond the basic run: the noise mixture, the flow's
maximum-likelihood term, --estimator=mle, the CPU budget, curves, bad input, spline NaNs, and
the equal-budget benchmark."""
import inspect
import json
import math
import os

import pytest
import torch

from bench import fce as bench_fce
import checkpoint
import curves
import fce
import flows
import gridmath
import train
import util
from logger import read_metrics

TINY = ["--samples", "2000", "--batch", "200", "--test_samples", "2000", "--ebm_hidden", "32",
        "--flow_hidden", "16", "--flow_layers", "2", "--log_every", "5", "--wandb", "disabled"]


def run(tmp_path, *extra, name="run"):
    out = tmp_path / name
    code = train.main([*TINY, "--out_dir", str(out), "--image_dir", str(tmp_path / "img" / name),
                       *extra])
    return code, out


def models(seed=0):
    torch.manual_seed(seed)
    data = torch.randn(400, 2) * torch.tensor([1.5, 0.7])
    args = train.get_args(TINY + ["--flow", "maf"])
    ebm, flow = train.make_models(args, data, "cpu")
    return ebm, flow, data[:100], flows.build_flow("gaussian", data)


def contrast(flow, g, mix, n=100, window=1):
    return fce.Contrast(flow, n, seed=3, gauss=g, mix=mix, window=window)


def test_noise_mixture_density_is_the_mixture_and_normalised():
    ebm, flow, x, g = models()
    y, lq_x, lq_y, lqf_x, n_flow, lqf_yg = contrast(flow, g, 0.3).live(0, x)
    assert torch.allclose(lqf_yg, flow.log_prob(y[70:]), atol=1e-5)
    assert y.shape == x.shape and n_flow == 70
    for pts, lq in ((x, lq_x), (y, lq_y)):
        expect = torch.logaddexp(flow.log_prob(pts) + math.log(0.7), g.log_prob(pts) + math.log(0.3))
        assert torch.allclose(lq, expect, atol=1e-5)
    assert torch.allclose(lqf_x, flow.log_prob(x), atol=1e-6)
    mix = lambda v: torch.logaddexp(flow.log_prob(v) + math.log(0.7),  # noqa: E731
                                    g.log_prob(v) + math.log(0.3))
    with torch.no_grad():
        values, area = gridmath.on_grid(mix, 12.0, 300)
    assert math.exp(torch.logsumexp(values, 0)) * area == pytest.approx(1, abs=2e-3)
    # round(0.3 n) = 30 of the 100 noise points come from the fixed Gaussian (no gradient into
    # the flow), the first 70 are reparameterised flow samples
    params = [p for p in flow.parameters() if p.requires_grad]
    from_g = torch.autograd.grad(y[70:].sum(), params, retain_graph=True, allow_unused=True)
    assert all(gr is None or (gr == 0).all() for gr in from_g)
    from_flow = torch.autograd.grad(y[:70].sum(), params, allow_unused=True)
    assert any(gr is not None and (gr != 0).any() for gr in from_flow)


@pytest.mark.parametrize("n,n_gauss", [(7, 2), (10, 3), (3, 1)])
def test_noise_mixture_weights_are_the_realised_fractions(n, n_gauss):
    """mix 0.3 of n noise points is round(0.3 n) Gaussian draws: log q weighs q_flow and g by
    the fractions actually drawn, (n - n_g) / n and n_g / n (exact for every n)."""
    ebm, flow, x, g = models()
    noise = contrast(flow, g, 0.3, n=n).live(0, x[:n])
    assert noise.n_flow == n - n_gauss and len(noise.y) == n
    for pts, lq in ((x[:n], noise.log_q_x), (noise.y, noise.log_q_y)):
        expect = torch.logaddexp(flow.log_prob(pts) + math.log((n - n_gauss) / n),
                                 g.log_prob(pts) + math.log(n_gauss / n))
        assert torch.allclose(lq, expect, atol=1e-5)


def test_cached_noise_equals_the_live_noise_of_the_same_iteration():
    """The window computed in one pass without a graph holds, for every iteration, exactly
    the numbers a live (graph) pass of that iteration gives: the base draws depend on
    (seed, step) only."""
    ebm, flow, x, g = models()
    batches = {s: x.roll(s, 0) for s in range(10, 16)}
    c = contrast(flow, g, 0.5, window=4)
    for s in range(10, 16):
        cached = c.cached(s, batches.get)
        live = contrast(flow, g, 0.5).live(s, batches[s])
        for a, b in zip(cached[:4], live[:4]):
            assert torch.allclose(a, b.detach(), atol=1e-5)
    assert not torch.allclose(c.live(10, x).y, c.live(11, x).y)  # new draws every step


def test_flow_step_descends_V_plus_the_weighted_nll():
    """The flow's update is the gradient of V - lambda mean log q_flow(data) - eps mean
    log q_flow(Gaussian's samples): with SGD the flow parameters move by exactly -lr times
    that gradient."""
    ebm, flow, x, g = models(1)
    lam, eps, lr = 2.0, 0.5, 1e-2
    opt_e = torch.optim.SGD(ebm.parameters(), lr)
    opt_f = torch.optim.SGD(flow.parameters(), lr)
    y, lq_x, lq_y, lqf_x, _, lqf_yg = contrast(flow, g, 0.5).live(5, x)
    lp_x, lp_y = ebm.log_prob(torch.cat([x, y])).split(len(x))
    V, _ = fce.value_function(lp_x, lq_x, lp_y, lq_y)
    params = list(flow.parameters())
    grads = torch.autograd.grad(V - lam * lqf_x.mean() - eps * lqf_yg.mean(), params)
    before = [p.detach().clone() for p in params]
    rule = fce.Rule("threshold", flow_mle=lam, flow_cover=eps)
    r = fce.fce_step(ebm, contrast(flow, g, 0.5), 5, x, {5: x}.get, opt_e, opt_f, rule, True)
    assert r.flow and not r.ebm
    for p, b, gr in zip(params, before, grads):
        assert torch.allclose(p.detach(), b - lr * gr, atol=1e-6)


@pytest.mark.slow
def test_mle_run_has_no_ebm_and_lowers_the_flow_nll(tmp_path):
    code, out = run(tmp_path, "--estimator", "mle", "--flow", "nsf", "--epoch", "4",
                    "--eval_every", "1", "--lr_flow", "3e-3")
    assert code == 0
    summary = json.load(open(out / "summary.json"))
    assert "kl_ebm" not in summary and "nll_ebm" not in summary
    evals = [r["nll_flow"] for r in read_metrics(out) if "nll_flow" in r]
    assert len(evals) == 4 and evals[-1] < evals[0] - 0.1
    loaded = checkpoint.load_run(str(out))
    assert loaded.ebm is None and loaded.flow.spec()["name"] == "nsf"
    assert os.path.isfile(out / "curves.png")


@pytest.mark.slow
def test_budget_stops_training_after_that_many_cpu_seconds(tmp_path):
    code, out = run(tmp_path, "--epoch", "1000", "--budget", "1.5", "--eval_every", "1000",
                    "--plot_every", "1000")
    assert code == 0
    summary = json.load(open(out / "summary.json"))
    rows = [r for r in read_metrics(out) if "cpu_s_per_it" in r]
    per_it = max(r["cpu_s_per_it"] for r in rows)
    assert 1.5 <= summary["cpu_s"] < 1.5 + 2 * per_it
    assert summary["steps"] < 1000 * 10  # stopped long before the epochs ran out
    assert "kl_ebm" in summary  # and evaluated at the stop


@pytest.mark.slow
def test_budgeted_run_resumes_with_more_budget(tmp_path):
    code, out = run(tmp_path, "--epoch", "1000", "--budget", "0.5", "--eval_every", "1000",
                    "--plot_every", "1000", name="b")
    assert code == 0
    first = checkpoint.load_checkpoint(str(out / "checkpoint.pt"))
    assert train.main(["--resume", str(out), "--budget", "1.0"]) == 0
    second = checkpoint.load_checkpoint(str(out / "checkpoint.pt"))
    assert second["step"] > first["step"] and second["cpu_s"] >= 1.0


@pytest.mark.parametrize("args,needle", [
    (["--estimator", "gan"], "invalid choice"),
    (["--flow", "nsf9"], "invalid choice"),
    (["--estimator", "nce", "--flow", "maf"], "fixed Gaussian"),
    (["--estimator", "mle", "--flow", "gaussian"], "learned flow"),
    (["--flow", "nsf", "--nsf_bins", "0"], "positive"),
    (["--flow", "nsf", "--nsf_bound", "0"], "positive"),
    (["--flow", "nsf", "--nsf_bound", "-2"], "positive"),
    (["--budget", "-1"], "positive"),
    (["--budget", "0"], "positive"),
    (["--noise_mix", "1"], "below 1"),
    (["--noise_mix", "1.5"], "[0, 1]"),
])
def test_bad_input_exits_2_with_one_line(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(args + ["--wandb", "disabled"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_nan_in_a_spline_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                          capsys):
    real = fce.mle_step
    calls = {"n": 0}

    def poisoned(flow, x, opt):
        calls["n"] += 1
        if calls["n"] == 15:  # second epoch: a NaN reaches the spline's parameters
            with torch.no_grad():
                flow.transforms[0].made.out.bias.fill_(float("nan"))
        return real(flow, x, opt)

    monkeypatch.setattr(fce, "mle_step", poisoned)
    code, out = run(tmp_path, "--estimator", "mle", "--flow", "nsf", "--epoch", "3")
    assert code == 1 and "non-finite" in capsys.readouterr().err
    ckpt = checkpoint.load_checkpoint(str(out / "checkpoint.pt"))
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["flow"].values()
                                      if v.is_floating_point())


@pytest.mark.slow
def test_curves_command_overlays_runs_and_rejects_non_runs(tmp_path, capsys):
    code, out = run(tmp_path, "--epoch", "2", "--eval_every", "1")
    assert code == 0 and os.path.getsize(out / "curves.png") > 10_000
    code2, out2 = run(tmp_path, "--epoch", "1", "--estimator", "nce", name="nce")
    assert curves.main([str(out), str(out2), "-o", str(tmp_path / "both.png")]) == 0
    assert os.path.getsize(tmp_path / "both.png") > 10_000
    with pytest.raises(SystemExit) as e:
        curves.main([str(tmp_path / "nope")])
    assert e.value.code == 2


@pytest.mark.slow
def test_bench_grid_runs_skips_finished_runs_and_reports(tmp_path, capsys):
    root, out = tmp_path / "grid", tmp_path / "report"
    argv = ["--only", "grid", "--datasets", "8gaussians", "--estimators", "nce", "mle-nsf",
            "--seeds", "0", "--budget", "0.5", "--root", str(root), "--out", str(out),
            "--jobs", "2", "--train_args", " ".join(TINY)]
    assert bench_fce.main(argv) == 0
    table = open(out / "table.md").read()
    assert "| nce | 8gaussians | 1 |" in table and "| mle-nsf | 8gaussians | 1 |" in table
    assert os.path.isfile(out / "grid.png") and os.path.isfile(out / "kl_ebm.png")
    stamp = os.path.getmtime(root / "nce-8gaussians-s0" / "summary.json")
    assert bench_fce.main(argv) == 0  # finished runs are kept, not run again
    assert os.path.getmtime(root / "nce-8gaussians-s0" / "summary.json") == stamp


def test_nan_at_the_first_iteration_leaves_a_loadable_initial_checkpoint(tmp_path, monkeypatch):
    nan = torch.tensor(math.nan)
    monkeypatch.setattr(fce, "fce_step", lambda *a, **kw: fce.StepResult(nan, nan, nan, False,
                                                                          False))
    code, out = run(tmp_path, "--epoch", "2")
    assert code == 1
    loaded = checkpoint.load_run(str(out))
    assert loaded.step == 0 and loaded.ebm is not None and loaded.flow is not None


def test_checkpoint_rng_state_restores_numpy_and_torch():
    import numpy as np

    np.random.seed(1)
    torch.manual_seed(1)
    state = util.rng_state()
    a, b = np.random.rand(3), torch.rand(3)
    util.set_rng_state(state)
    assert np.array_equal(np.random.rand(3), a) and torch.equal(torch.rand(3), b)


def small_flow_kwargs(name, batch_norm=False):
    """Two small blocks of registered flow `name`, whatever its builder calls them."""
    params = inspect.signature(flows.BUILDERS[name]).parameters
    kw = {k: v for k, v in (("n_blocks", 2), ("n_steps", 2), ("hidden", [16]))
          if k in params}
    return {**kw, **({"batch_norm": True} if batch_norm else {})}


EVERY_FLOW = [(name, False) for name in flows.BUILDERS] + [
    (name, True) for name in flows.BUILDERS
    if "batch_norm" in inspect.signature(flows.BUILDERS[name]).parameters]
# training with the cache: the Gaussian and MAF in the fast tier, every other flow slow
EVERY_FLOW_TIERED = [pytest.param(name, bn, marks=() if (name, bn) in (("gaussian", False),
                                  ("maf", False)) else pytest.mark.slow) for name, bn in EVERY_FLOW]


@pytest.mark.parametrize("name,batch_norm", EVERY_FLOW_TIERED)
@pytest.mark.parametrize("rule", [fce.Rule("every", flow_every=3),
                                  fce.Rule("threshold", threshold=0.51),
                                  fce.Rule("threshold", threshold=0.6, target=0.5, gain=0.01)])
def test_cached_training_equals_recomputing_everything_at_every_step(rule, name, batch_norm):
    """Training with the flow's work cached between flow steps ends with exactly the weights
    (and running statistics) of training that rebuilds the noise with a graph at every
    iteration (float64), for every registered flow, BatchNorm MAF included: noise passes do
    not move the flow, its statistics move only at flow steps."""
    torch.manual_seed(0)
    data = torch.randn(512, 2, dtype=torch.float64) * torch.tensor([1.5, 0.7], dtype=torch.float64)
    g = flows.build_flow("gaussian", data).double()
    results = []
    for window in (0, 5):
        torch.manual_seed(1)
        ebm = train.EBM(2, (16, 16)).double()
        flow = flows.build_flow(name, data[:64].float(),
                                **small_flow_kwargs(name, batch_norm)).double()
        start = {k: v.clone() for k, v in flow.state_dict().items()}
        learned = [p for p in flow.parameters() if p.requires_grad]
        opt_e = torch.optim.Adam(ebm.parameters(), 5e-2)
        opt_f = torch.optim.Adam(learned, 1e-2) if learned else None
        c = fce.Contrast(flow, 64, seed=7, gauss=g, mix=0.5, window=window)
        batch_at = lambda s: data[(s % 8) * 64:(s % 8 + 1) * 64]  # noqa: E731
        whos, acc, T = [], math.nan, rule.threshold
        for step in range(60):
            r = fce.fce_step(ebm, c, step, batch_at(step), batch_at, opt_e, opt_f, rule,
                             rule.flow_turn(step, acc, T))
            acc, T = float(r.accuracy_flow), rule.next_threshold(T, r.flow)
            whos.append((r.ebm, r.flow))
        results.append(([p.detach().clone() for p in [*ebm.parameters(), *flow.parameters()]]
                        + [b.clone() for b in flow.buffers()], whos))
    (ref, who_ref), (cached, who_cached) = results
    assert who_ref == who_cached and any(e for e, _ in who_ref)
    assert any(f for _, f in who_ref) == (opt_f is not None)
    for a, b in zip(ref, cached):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)
    if batch_norm:  # the statistics did move (at the flow steps)
        assert any(not torch.equal(v, start[k]) for k, v in flow.state_dict().items()
                   if "running" in k)


@pytest.mark.parametrize("name,batch_norm", EVERY_FLOW)
def test_noise_passes_leave_the_flow_as_it_was(name, batch_norm):
    """Neither a cached nor a live noise pass changes any weight or buffer of the flow, so
    log q of the cached noise is log q under the flow after the pass."""
    torch.manual_seed(0)
    data = torch.randn(256, 2) * torch.tensor([1.5, 0.7])
    flow = flows.build_flow(name, data[:64], **small_flow_kwargs(name, batch_norm))
    g = flows.build_flow("gaussian", data)
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    c = fce.Contrast(flow, 64, seed=1, gauss=g, mix=0.5, window=3)
    batch_at = lambda s: data[(s % 4) * 64:(s % 4 + 1) * 64]  # noqa: E731
    noise = c.cached(0, batch_at)
    c.live(1, batch_at(1))
    assert all(torch.equal(v, before[k]) for k, v in flow.state_dict().items())
    assert flow.training  # its mode is restored
    with torch.no_grad(), util.mode(flow, training=False):  # a density pass that moves nothing
        assert torch.allclose(noise.log_qf_x, flow.log_prob(batch_at(0)), atol=1e-5)


@pytest.mark.slow
def test_a_flow_that_stops_stepping_far_from_the_data_is_reported(tmp_path, capsys):
    """Under the threshold rule a fixed threshold just below 1 is never reached by an
    untrained flow: the run says that the flow has stopped learning."""
    code, out = run(tmp_path, "--rule", "threshold", "--threshold", "0.999", "--flow_target", "0",
                    "--epoch", "2",
                    "--eval_every", "1")
    assert code == 0
    assert "has stopped learning" in capsys.readouterr().out
    assert json.load(open(out / "summary.json"))["flow_steps"] == 0


def test_the_flow_notes_name_holes_when_grid_and_monte_carlo_kl_disagree():
    args = train.get_args(TINY)
    loop = {"flow_steps": 5, "flow_steps_at_eval": 0, "step": 10}
    m = {"nll_flow": 3.0, "entropy": 2.8, "kl_flow": 5.0, "kl_flow_mc": 0.2,
         "kl_flow_mc_se": 0.01, "hole_mass": 1e-4}
    notes = train.flow_notes(args, m, loop)
    assert len(notes) == 1 and "holes" in notes[0]
    assert train.flow_notes(args, {**m, "kl_flow": 0.21}, loop) == []
    assert "stopped" in train.flow_notes(args, {**m, "kl_flow": 0.21},
                                         {**loop, "flow_steps_at_eval": 5})[0]


def test_a_flow_gone_non_finite_stops_fce_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                             monkeypatch, capsys):
    """A NaN reaching the flow's weights in the second epoch: the next iteration's loss is
    not finite, the run ends with status 1 and the checkpoint of epoch 1 is finite."""
    real = fce.fce_step
    calls = {"n": 0}

    def poisoned(ebm, contrast, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 15:
            with torch.no_grad():
                next(contrast.flow.parameters()).fill_(float("nan"))
        return real(ebm, contrast, *a, **kw)

    monkeypatch.setattr(fce, "fce_step", poisoned)
    code, out = run(tmp_path, "--epoch", "3")
    assert code == 1 and "non-finite" in capsys.readouterr().err
    ckpt = checkpoint.load_checkpoint(str(out / "checkpoint.pt"))
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["flow"].values() if v.is_floating_point())


def test_step_cost_times_every_kind_side_by_side():
    lines = bench_fce.step_cost(flows=("maf",), blocks=1, per_block=2)
    kinds = [ln.split(" | ")[0].lstrip("| ") for ln in lines if ln.startswith("| ")][1:]
    assert kinds == ["nce step", "fce-maf: EBM step (cached noise)",
                     "fce-maf: noise pass (one per flow update)", "fce-maf: EBM + flow step",
                     "fce-maf: flow step alone (threshold rule)"]


def bench_with_partner(tmp_path, label):
    """A tiny equal-CPU grid of NCE and `label` on 8gaussians, seed 0; returns the grid's
    folder, the report's and the iterations `label` made."""
    root, out = tmp_path / "grid", tmp_path / "report"
    argv = ["--only", "grid", "--datasets", "8gaussians", "--estimators", "nce", label,
            "--seeds", "0", "--budget", "0.5", "--root", str(root), "--out", str(out),
            "--jobs", "2", "--train_args", " ".join(TINY)]
    assert bench_fce.main(argv) == 0
    return root, out, json.load(open(root / f"{label}-8gaussians-s0" / "summary.json"))["steps"]


@pytest.mark.slow
def test_bench_equal_iteration_partner_runs_as_many_iterations_as_fce(tmp_path):
    """After the equal-CPU grid, NCE runs again for exactly the iterations FCE-MAF made, in
    a folder beside the grid's (so it never mixes into the equal-CPU table), and the report
    has the equal-iteration table."""
    root, out, fce_steps = bench_with_partner(tmp_path, "fce-maf")
    partner = tmp_path / "grid-equal-iterations" / "nce-8gaussians-s0" / "summary.json"
    assert json.load(open(partner))["steps"] == fce_steps
    table = open(out / "table.md").read()
    assert "| nce (FCE-MAF's iterations) | 8gaussians | 1 |" in table
    assert table.count("| nce | 8gaussians | 1 |") == 1


@pytest.mark.slow
def test_bench_tilt_has_its_own_equal_iteration_partner(tmp_path):
    """The tilted EBM gets an NCE partner run for its iteration count, in its own folder
    (<root>-equal-iterations-tilt), and its own equal-iteration table in the report."""
    root, out, steps = bench_with_partner(tmp_path, "tilt")
    partner = tmp_path / "grid-equal-iterations-tilt" / "nce-8gaussians-s0" / "summary.json"
    assert json.load(open(partner))["steps"] == steps
    assert not (tmp_path / "grid-equal-iterations").exists()
    assert "| nce (tilt's iterations) | 8gaussians | 1 |" in open(out / "table.md").read()


@pytest.mark.slow
def test_max_steps_ends_the_run_mid_epoch_and_evaluates(tmp_path):
    code, out = run(tmp_path, "--epoch", "5", "--max_steps", "13")
    assert code == 0
    summary = json.load(open(out / "summary.json"))
    assert summary["steps"] == 13 and "kl_ebm" in summary


def test_resume_refuses_a_checkpoint_of_the_old_mixed_noise_rule(tmp_path, capsys):
    """A checkpoint from before --rule is refused, naming the flag and migrate.py (which says
    that the old rule is gone: tests/test_migrate.py)."""
    code, out = run(tmp_path, "--epoch", "1")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    del ckpt["config"]["rule"]  # written before --rule existed
    torch.save(ckpt, out / "checkpoint.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(out), "--epoch", "2"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--rule" in err and "migrate.py" in err
    assert len(err.splitlines()) == 1


def test_bench_targets_count_the_sets_met_at_equal_iterations_and_rules_sit_side_by_side():
    """FCE-MAF's EBM meets its target on a set when its KL is below NCE's at equal iterations
    or within the larger sd; its flow when its NLL is within 0.1 nats of the MAF alone; the
    rules table puts every fce-maf* rule's EBM, flow and flow-step fraction side by side."""
    def a(label, ds, **kw):
        return {"label": label, "dataset": ds, **kw}
    agg = [a("nce", "moons", kl_ebm=0.01), a("nce", "rings", kl_ebm=0.02),
           a("fce-maf", "moons", kl_ebm=0.012, kl_ebm_sd=0.003, nll_flow=2.5,
             flow_step_fraction=0.33, flow_steps=330, steps=1000),
           a("fce-maf", "rings", kl_ebm=0.30, kl_ebm_sd=0.01, nll_flow=2.9,
             flow_step_fraction=0.35, flow_steps=350, steps=1000),
           a("fce-maf-every", "moons", kl_ebm=0.02, kl_ebm_sd=0.0, nll_flow=2.45,
             flow_step_fraction=400 / 1200, flow_steps=400, steps=1200),
           a("mle-maf", "moons", nll_flow=2.45), a("mle-maf", "rings", nll_flow=2.7)]
    nce_iters = [{"label": "nce", "dataset": "moons", "seed": s, "kl_ebm": v, "steps": 1000}
                 for s, v in ((0, 0.010), (1, 0.011))]
    nce_iters += [{"label": "nce", "dataset": "rings", "seed": 0, "kl_ebm": 0.1, "steps": 1000}]
    lines = bench_fce.targets(agg, nce_iters)
    assert lines[-1].split("|")[4].strip() == "1 of 2"  # moons met, rings missed
    assert lines[-1].split("|")[6].strip() == "1 of 2"  # moons +0.05, rings +0.2
    rules = "\n".join(bench_fce.rules(agg))
    assert "| moons | fce-maf | 0.0120 ± 0.0030 | +0.050 | 0.33 | 1000 |" in rules
    assert "| moons | fce-maf-every | 0.0200 ± 0.0000 | +0.000 | 0.33 | 1200 |" in rules
