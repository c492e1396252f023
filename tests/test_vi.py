"""Flows fit to energy functions by reverse KL (targets.py, vi_flows.py,
train_vi.py, bench/vi.py). Tiny budgets: the whole file runs in well under a minute on 2 cores."""
import json
import math
import os
import signal

import pytest
import torch
from torch.autograd.functional import jacobian

import checkpoint
import targets
import train_vi
import vi_flows
from flows import std_normal_log_prob
from logger import read_metrics

VI = ["planar", "radial", "iaf", "realnvp", "nice"]


def _random_flow(name, K=3, seed=0):
    """A flow in float64 whose parameters are pushed far from their (near-identity) init."""
    torch.manual_seed(seed)
    kw = {"hidden": [16, 16]} if name in ("iaf", "realnvp", "nice") else {}
    f = vi_flows.build_flow(name, dim=2, K=K, **kw).double()
    with torch.no_grad():
        for p in f.parameters():
            p.add_(0.7 * torch.randn_like(p))
    return f


# ----------------------------------------------------------------------------- flows
@pytest.mark.parametrize("name", VI)
def test_inverse_round_trip_every_layer(name):
    """Sampling direction then density direction gives back z, and the log-dets cancel
    (planar: numerical inverse by bisection; radial: closed form; IAF: D passes)."""
    f = _random_flow(name)
    z = 1.5 * torch.randn(200, 2, dtype=torch.float64)
    for t in f.transforms:
        x, ld_fwd = t.inverse(z)
        z_back, ld_back = t(x)
        assert torch.allclose(z_back, z, atol=1e-9), type(t).__name__
        assert torch.allclose(ld_fwd, -ld_back, atol=1e-9)
    x, ld = f.inverse(z)
    assert torch.allclose(f.log_prob(x), std_normal_log_prob(z) - ld, atol=1e-9)


@pytest.mark.parametrize("name", VI)
def test_log_det_matches_autograd_jacobian(name):
    f = _random_flow(name, seed=1)
    z = torch.randn(8, 2, dtype=torch.float64)
    for t in f.transforms:
        _, ld = t.inverse(z)
        J = torch.stack([jacobian(lambda v: t.inverse(v[None])[0][0], zi) for zi in z])
        sign, logabs = torch.linalg.slogdet(J)
        assert torch.all(sign > 0)                       # orientation-preserving: invertible
        assert torch.allclose(ld, logabs, atol=1e-10), type(t).__name__


def test_planar_constraint_holds_for_any_parameters():
    """w . u_hat = m(w . u) >= -1 for random u, w over 8 orders of magnitude, including u
    anti-parallel to w (where the unconstrained w . u is far below -1)."""
    torch.manual_seed(0)
    scales = 10.0 ** torch.arange(-4, 5, dtype=torch.float64)
    u = torch.randn(9, 500, 2, dtype=torch.float64) * scales[:, None, None]
    w = torch.randn(9, 500, 2, dtype=torch.float64) * scales.flip(0)[:, None, None]
    u[:, :250] = -w[:, :250] * scales[:, None, None]     # anti-parallel
    u_hat = vi_flows.planar_u_hat(u, w)
    wu_hat = (w * u_hat).sum(-1)
    rounding = 1e-14 * (w.norm(dim=-1) * u.norm(dim=-1) + 1)  # float64 cancellation in u_hat
    assert (wu_hat >= -1 - rounding).all()
    assert ((w * u).sum(-1) < -1).any()                  # the raw parameters did violate it
    exact = vi_flows.planar_w_dot_u_hat(u, w)            # the value the log-det uses
    assert (exact >= -1).all()
    assert ((wu_hat - exact).abs() <= rounding + 1e-12).all()


def test_planar_uses_squared_norm():
    """With |w| != 1 the |w| (not |w|^2) variant of some implementations breaks w.u_hat = m."""
    u, w = torch.tensor([-10.0, 0.0]), torch.tensor([0.3, 0.1])   # w.u = -3, |w| = 0.32
    wu = float(w @ u)
    assert float(w @ vi_flows.planar_u_hat(u, w)) == pytest.approx(
        math.log1p(math.exp(wu)) - 1, abs=1e-6)
    wrong = u + (vi_flows.planar_m(torch.tensor(wu)) - wu) * w / w.norm()
    assert float(w @ wrong) < -1                         # the bug gives a non-invertible layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_planar_with_w_zero_is_a_translation(dtype):
    """w = 0: f(z) = z + u tanh(b) is a translation, log-det 0 as autograd's Jacobian says,
    and the density direction inverts it; with |w|^2 below the smallest normal float the
    log-det still matches autograd; the batched PlanarStack agrees."""
    torch.manual_seed(0)
    layer = vi_flows.Planar(2).to(dtype)
    z = torch.randn(16, 2, dtype=dtype)
    for w in (0.0, 1e-30 if dtype == torch.float32 else 1e-170):
        with torch.no_grad():
            layer.w.fill_(w)
            layer.b.fill_(0.4)
        x, ld = layer.inverse(z)
        J = torch.stack([jacobian(lambda v: layer.inverse(v[None])[0][0], zi) for zi in z])
        assert torch.allclose(ld, torch.linalg.slogdet(J)[1], atol=1e-6), w
        assert torch.allclose(ld, torch.zeros_like(ld), atol=1e-6), w
        if w == 0:
            z_back, ld_back = layer(x)
            assert torch.allclose(z_back, z, atol=1e-5)
            assert torch.allclose(ld_back, -ld, atol=1e-6)
    s = vi_flows.stack({"name": "planar", "dim": 2, "K": 2, "base": "fixed"}, 1)
    with torch.no_grad():
        s.w.zero_()
    e = torch.randn(1, 8, 2)
    _, log_q = s.sample_and_log_prob(8, e)
    assert torch.allclose(log_q[0], std_normal_log_prob(e[0]), atol=1e-6)


def test_radial_beta_at_least_minus_alpha_and_monotone():
    torch.manual_seed(0)
    layer = vi_flows.Radial(2).double()
    for a, b in [(-30.0, -30.0), (5.0, -50.0), (0.0, 30.0), (-10.0, 10.0)]:
        with torch.no_grad():
            layer.a.fill_(a)
            layer.b_raw.fill_(b)
        alpha, beta = layer.alpha_beta()
        assert alpha > 0 and beta >= -alpha
        r = torch.linspace(0, 10, 1001, dtype=torch.float64)
        r_out = r * (1 + beta / (alpha + r))             # |f(z) - z0| as a function of r
        assert (r_out.diff() >= 0).all()


def test_planar_stack_equals_per_target_flows():
    """The batched module computes exactly the per-target planar flows it represents."""
    torch.manual_seed(0)
    s = vi_flows.stack({"name": "planar", "dim": 2, "K": 6, "base": "learned"}, 3)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(0.3 * torch.randn_like(p))
    z = torch.randn(3, 64, 2)
    x, log_q = s.sample_and_log_prob(64, z)
    for t in range(3):
        xt, ld = s.flow(t).inverse(z[t])
        assert torch.allclose(xt, x[t], atol=1e-5)
        assert torch.allclose(std_normal_log_prob(z[t]) - ld, log_q[t], atol=1e-4)


def test_flows_rebuild_from_spec():
    for name in VI:
        f = _random_flow(name).float()
        g = vi_flows.flow_from_spec(f.spec())
        g.load_state_dict(f.state_dict())
        x = torch.randn(16, 2)
        assert torch.allclose(f.log_prob(x), g.log_prob(x), atol=1e-5)



@pytest.mark.slow
@pytest.mark.parametrize("flow, extra, spec, keys", [
    ("planar", [], {"name": "planar", "dim": 2, "K": 2, "base": "learned"},
     ["b", "log_sigma", "mu", "u", "w"]),
    ("realnvp", ["--hidden", "8"],
     {"name": "realnvp", "dim": 2, "K": 2, "base": "learned", "hidden": [8]},
     sorted(f"flows.{t}.{k}" for t in (0, 1) for k in
            ["_anchor", "transforms.2.log_sigma", "transforms.2.mu"] +
            [f"transforms.{i}.net.{j}.{p}" for i in (0, 1) for j in (0, 2)
             for p in ("bias", "weight")]))])
def test_train_vi_checkpoint_loads_after_the_flows_split(flow, extra, spec, keys, in_tmp):
    """A tiny train_vi.py run (batched planar, and the FlowStack loop): the checkpoint holds the
    stack spec and state_dict keys that the code before the split (commit b5ee95b) wrote, and
    checkpoint.load_run rebuilds the stack through vi_flows.flow_from_spec."""
    out = str(in_tmp / flow)
    assert train_vi.main(["--target=U1,U2", "--K=2", "--steps=4", "--eval_every=2",
                          "--batch=16", "--eval_samples=100", "--final_samples=100",
                          "--anneal_steps=2", "--no-frames", "--wandb=disabled",
                          f"--flow={flow}", *extra, f"--out_dir={out}"]) == 0
    run = checkpoint.load_run(out)
    assert run.checkpoint["flow_spec"] == {"name": "stack", "flow_spec": spec, "n_targets": 2,
                                           "batched": True}
    assert sorted(run.checkpoint["flow"]) == keys
    kind = vi_flows.PlanarStack if flow == "planar" else vi_flows.FlowStack
    assert type(run.flow) is kind and len(run.flow) == 2
    z = torch.randn(2, 8, 2)
    x, log_q = run.flow.sample_and_log_prob(8, z)
    for t in range(2):
        assert torch.allclose(run.flow.flow(t).log_prob(x[t]), log_q[t], atol=1e-4)


# ----------------------------------------------------------------------------- targets
def test_energies_against_hand_computed_values():
    # U1(0, 0) = (2/0.4)^2/2 - log(2 exp(-(2/0.6)^2/2)) = 12.5 + 50/9 - log 2
    assert float(targets.U1(torch.tensor([[0.0, 0.0]]))) == pytest.approx(
        12.5 + 50 / 9 - math.log(2), abs=1e-5)
    # U1(2, 0) = 0 - log(1 + exp(-(4/0.6)^2/2)) ~ -2.2e-10
    assert abs(float(targets.U1(torch.tensor([[2.0, 0.0]])))) < 1e-6
    # U2(1, 1) = 0 (w1(1) = sin(pi/2) = 1); U2(0, 1) = (1/0.4)^2 / 2 = 3.125
    u2 = targets.U2(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    assert torch.allclose(u2, torch.tensor([0.0, 3.125]), atol=1e-6)
    # U3(0, 0): w1 = 0, w2 = 3 exp(-(1/0.6)^2/2); U3 = -log(1 + exp(-(w2/0.35)^2/2))
    w2 = 3 * math.exp(-0.5 / 0.36)
    assert float(targets.U3(torch.tensor([[0.0, 0.0]]))) == pytest.approx(
        -math.log1p(math.exp(-0.5 * (w2 / 0.35) ** 2)), abs=1e-6)
    # U4(1, 0): w1 = 1, w3 = 3 sigma(0) = 1.5; d = -1
    assert float(targets.U4(torch.tensor([[1.0, 0.0]]))) == pytest.approx(
        -math.log(math.exp(-0.5 / 0.16) + math.exp(-0.5 * (0.5 / 0.35) ** 2)), abs=1e-6)


def test_energies_stay_finite_far_away_and_confinement():
    z = torch.tensor([[50.0, -80.0], [1e3, 1e3], [-3.0, 2.0]], dtype=torch.float64)
    for n in targets.NAMES:
        u, uc = targets.energy(n, z, confined=False), targets.energy(n, z)
        assert torch.isfinite(u).all() and torch.isfinite(uc).all()
        assert uc[2] == u[2]                                 # inside the box: unchanged
        assert (uc[:2] > u[:2] + 1e5).all()                  # outside: the wall


def test_log_Z_U1_on_grid():
    assert targets.log_Z("U1") == pytest.approx(1.8775, abs=2e-4)
    assert targets.log_Z("U1", confined=False) == pytest.approx(1.8775, abs=2e-4)
    # U2 is improper: its log Z grows with the box when not confined
    assert targets.log_Z("U2", confined=False, bound=8.0, n=800) > \
        targets.log_Z("U2", confined=False, bound=4.5, n=450) + 0.5


# ----------------------------------------------------------------------------- training
@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _argv(out, *extra):
    return ["--target=U1,U2", "--K=4", "--steps=120", "--eval_every=60", "--batch=64",
            "--eval_samples=4000", "--final_samples=4000", "--anneal_steps=60", "--lr=1e-2",
            "--wandb=disabled", f"--out_dir={out}", *extra]


def test_short_reverse_kl_run_lowers_bound_and_writes_figures(in_tmp):
    out = str(in_tmp / "runs" / "vi")
    assert train_vi.main(_argv(out)) == 0
    rows = [r for r in json.load(open(os.path.join(out, "summary.json"))).items()]
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    first = next(r for r in metrics if r["step"] == 0)
    last = [r for r in metrics if "U1/kl" in r][-1]
    for n in ("U1", "U2"):
        assert last[f"{n}/bound"] < first[f"{n}/bound"] - 1.0
    # the summary is the final evaluation (seed 1, --final_samples) of the saved flow
    final = train_vi.evaluate(checkpoint.load_run(out).flow, ["U1", "U2"], 4000, seed=1)
    assert dict(rows)["U1/mass_left"] == final["U1"]["mass_left"]
    assert dict(rows)["U1/kl"] == pytest.approx(final["U1"]["kl"], abs=1e-9)
    assert os.path.isfile(in_tmp / "images" / "vi" / "final.png")
    assert os.path.isfile(in_tmp / "images" / "vi" / "training.gif")
    run = checkpoint.load_run(out)
    assert run.step == 120
    kl = train_vi.evaluate(run.flow, ["U1", "U2"], 4000)
    # the same flow and the same evaluation samples (seed 0, 4000) as the step-120 row
    assert kl["U1"]["kl"] == pytest.approx(last["U1/kl"], abs=1e-9)


def test_nan_stops_and_keeps_last_good_checkpoint(in_tmp, monkeypatch):
    out = str(in_tmp / "runs" / "nan")
    real = targets.energies
    calls = {"n": 0}

    def poisoned(names, x, confined=True):
        calls["n"] += 1
        u = real(names, x, confined)
        return u * float("nan") if calls["n"] > 70 else u

    monkeypatch.setattr(targets, "energies", poisoned)
    assert train_vi.main(_argv(out)) == 1
    ckpt = checkpoint.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ckpt["step"] == 60
    assert all(torch.isfinite(v).all() for v in ckpt["flow"].values())


TIMING = ("ms_per_step",)


def _rows(out):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(out)]


def _weights(out):
    return checkpoint.load_checkpoint(os.path.join(out, "checkpoint.pt"))["flow"]


def test_ctrl_c_mid_step_then_resume_writes_the_same_rows(in_tmp, monkeypatch):
    """Ctrl-C inside step 55 (between the rows of steps 40 and 80): the run stops at the end
    of that step with exit 130, and --resume writes exactly the rows and weights of a run that
    was never interrupted (timing columns aside)."""
    common = ["--eval_every=40", "--no-frames"]
    straight, split = str(in_tmp / "straight"), str(in_tmp / "split")
    assert train_vi.main(_argv(straight, *common)) == 0
    real, calls = targets.energies, {"n": 0}

    def interrupt(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 55:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **kw)

    monkeypatch.setattr(train_vi.targets, "energies", interrupt)
    assert train_vi.main(_argv(split, *common)) == 130
    assert checkpoint.load_checkpoint(os.path.join(split, "checkpoint.pt"))["step"] == 55
    assert [r["step"] for r in read_metrics(split)] == [0, 40, 40]
    monkeypatch.setattr(train_vi.targets, "energies", real)
    assert train_vi.main(["--resume", split]) == 0
    assert _rows(split) == _rows(straight)
    a, b = _weights(straight), _weights(split)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_at_the_first_step_leaves_a_loadable_checkpoint(in_tmp, monkeypatch, capsys):
    out = str(in_tmp / "nan0")
    real = targets.energies
    monkeypatch.setattr(train_vi.targets, "energies",
                        lambda *a, **kw: real(*a, **kw) * float("nan"))
    assert train_vi.main(_argv(out)) == 1
    assert "checkpoint" in capsys.readouterr().err
    run = checkpoint.load_run(out)
    assert run.step == 0 and run.checkpoint["script"] == "train_vi.py"
    assert all(torch.isfinite(v).all() for v in run.checkpoint["flow"].values())
    x = torch.zeros(3, 2)
    assert torch.isfinite(run.flow.flow(0).log_prob(x)).all()


@pytest.mark.slow
def test_evaluation_does_not_change_training(in_tmp):
    """Evaluating every 40 or every 60 steps: the same training rows at the common steps and
    the same final weights (evaluation draws from its own seed and restores every stream)."""
    a, b = str(in_tmp / "e40"), str(in_tmp / "e60")
    assert train_vi.main(_argv(a, "--eval_every=40", "--no-frames")) == 0
    assert train_vi.main(_argv(b, "--eval_every=60", "--no-frames")) == 0
    loss = {out: {r["step"]: r["U1/loss"] for r in read_metrics(out) if "U1/loss" in r}
            for out in (a, b)}
    assert loss[a][120] == loss[b][120]
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_meaningless_flags_are_refused(in_tmp, capsys):
    for extra in (["--flow=planar", "--hidden", "8"], ["--no-anneal", "--anneal_steps=10"],
                  ["--target=U1,U1"]):
        with pytest.raises(SystemExit) as e:
            train_vi.main(_argv(str(in_tmp / "r"), *extra))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err, err
        assert not os.path.exists(in_tmp / "r")


@pytest.mark.parametrize("argv", [["--target=U9"], ["--K=0"], ["--flow=maf"],
                                  ["--lr=-1"]])
def test_bad_flags_exit_2(argv, in_tmp):
    with pytest.raises(SystemExit) as e:
        train_vi.main(argv + ["--wandb=disabled"])
    assert e.value.code == 2


def test_bench_split_rows_merge_per_flow():
    """bench/vi.py --split: four single-target summaries make one table row (seconds summed)."""
    from bench import vi as bench_vi

    assert bench_vi._run_name("realnvp", 8, 42, "U3") == "bench_vi-realnvp-K8-U3"
    assert bench_vi._run_name("planar", 32, 0) == "bench_vi-planar-K32-s0"
    assert bench_vi._run_name("planar", 32, 0, tag="lr3e-3") == "bench_vi-planar-K32-s0-lr3e-3"
    jobs = bench_vi._jobs([("realnvp", 8)], True, [42], 100, [])
    assert [j[2] for j in jobs] == list(targets.NAMES)
    parts = [{"flow": "realnvp", "K": 8, "status": 0, "seconds": 10.0 * (i + 1),
              f"{n}/kl": 0.01 * i, f"{n}/ess": 0.5, **({"U1/mass_left": 0.5,
                                                        "U1/mass_right": 0.5} if i == 0 else {})}
             for i, n in enumerate(targets.NAMES)]
    (row,) = bench_vi.merge(parts)
    assert row["seconds"] == 100.0
    assert [row[f"{n}/kl"] for n in targets.NAMES] == [0.0, 0.01, 0.02, 0.03]
    assert "| realnvp | 8 | 42 | 0.000 | 0.50 | 0.010 |" in bench_vi.table([row])


def test_bench_report_without_finished_runs_writes_nothing(in_tmp, capsys):
    """bench/vi.py --report_only with no finished runs (one unfinished folder): exit 1, one
    line, and the published figures and tables are untouched."""
    from bench import vi as bench_vi

    readme = in_tmp / "images" / "readme"
    os.makedirs(readme)
    (readme / "vi_figure3.png").write_bytes(b"the published figure")
    os.makedirs(in_tmp / "runs" / "bench_vi-planar-K2")           # unfinished: no summary
    capsys.readouterr()
    assert bench_vi.main(["--report_only", "--runs", "planar:2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "nothing written" in err[-1]
    assert os.listdir(readme) == ["vi_figure3.png"]
    assert (readme / "vi_figure3.png").read_bytes() == b"the published figure"
    assert not os.path.exists(in_tmp / "runs" / "bench_vi")


@pytest.mark.parametrize("argv, needle", [
    (["--runs", "planar"], "--runs"), (["--runs", "maf:2"], "unknown flow"),
    (["--runs", "planar:0"], "--runs"), (["--extra=--lr=-1"], "lr"),
    (["--extra=--seed=3"], "--seed"), (["--split"], "--no-figures"),
])
def test_bench_bad_input_is_one_line(argv, needle, in_tmp, capsys):
    from bench import vi as bench_vi

    with pytest.raises(SystemExit) as e:
        bench_vi.main(argv + ["--no-speed"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and needle in err, err
    assert os.listdir(in_tmp) == []


def test_bench_keeps_finished_runs_and_restarts_unfinished_ones(in_tmp, monkeypatch):
    """A finished run (summary.json) is not trained again; an unfinished folder is trained
    with --overwrite (never a refusal that loses the benchmark's time)."""
    import subprocess

    from bench import vi as bench_vi
    from bench import runner

    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd[2:])
        out = cmd[cmd.index("--out_dir") + 1]
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "summary.json"), "w") as fh:
            json.dump({f"{n}/kl": 0.1 for n in targets.NAMES}, fh)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    os.makedirs(bench_vi.OUT)
    done = in_tmp / "runs" / "bench_vi-planar-K2"
    os.makedirs(done)
    (done / "summary.json").write_text(json.dumps({"cpu_s": 1.0}))
    os.makedirs(in_tmp / "runs" / "bench_vi-planar-K8")           # unfinished
    r2 = bench_vi._train(("planar", 2, "all", 42, 10, [], ""))
    r8 = bench_vi._train(("planar", 8, "all", 42, 10, [], ""))
    assert r2["seconds"] == 1.0 and r8["U1/kl"] == 0.1
    assert len(calls) == 1 and "--overwrite" in calls[0] and "--K=8" in calls[0]
