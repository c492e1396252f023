"""Short-run MCMC learning (Nijkamp et al. 2020): samplers, training loop, configs."""
import json
import os
import signal

import pytest
import torch

from ebm import EBM
from samplers import Energy, langevin, mala

MU = torch.tensor([1.0, -2.0])
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]])
PREC = torch.linalg.inv(COV)


def gaussian_energy(x):
    d = x - MU
    return 0.5 * ((d @ PREC) * d).sum(1)


def ula_stationary_cov(eps):
    """ULA's own stationary covariance on the Gaussian: x' = A x + eps xi with
    A = I - (eps^2 / 2) PREC, so C = A C A^T + eps^2 I (solved exactly, float64)."""
    A = torch.eye(2, dtype=torch.float64) - 0.5 * eps ** 2 * PREC.double()
    vec = torch.linalg.solve(torch.eye(4, dtype=torch.float64) - torch.kron(A, A),
                             eps ** 2 * torch.eye(2, dtype=torch.float64).reshape(-1))
    return vec.reshape(2, 2)


def test_ula_recovers_gaussian():
    torch.manual_seed(0)
    x = langevin(gaussian_energy, torch.randn(20000, 2), n_steps=600, eps=0.3)
    # ULA on a Gaussian is biased by O(eps^2) in the covariance only: its stationary law is
    # N(MU, C) with C from ula_stationary_cov, within 6% of COV at eps = 0.3. Standard errors
    # with 20,000 chains: 0.007 on the mean, <= 0.01 on the covariance entries.
    C = ula_stationary_cov(0.3)
    assert torch.allclose(C, COV.double(), rtol=0.06)
    assert not torch.allclose(C, COV.double(), rtol=0.02)  # the bias is real
    assert torch.allclose(x.mean(0), MU, atol=0.03)
    assert torch.allclose(torch.cov(x.T.double()), C, atol=0.03)


def test_mala_recovers_gaussian():
    torch.manual_seed(0)
    x, acc = mala(gaussian_energy, torch.randn(4000, 2), n_steps=400, eps=0.5)
    assert acc.shape == (400,)
    assert 0.3 < acc[-100:].mean() < 1.0
    assert torch.allclose(x.mean(0), MU, atol=0.06)
    assert torch.allclose(torch.cov(x.T), COV, atol=0.06)


def test_mala_temperature_scales_covariance():
    torch.manual_seed(0)
    x, _ = mala(gaussian_energy, torch.randn(4000, 2), n_steps=400, eps=0.5, temperature=2.0)
    assert torch.allclose(torch.cov(x.T), 2 * COV, atol=0.12)


def test_mala_acceptance_falls_with_step():
    torch.manual_seed(0)
    x0 = MU + torch.randn(2000, 2) @ torch.linalg.cholesky(COV).T
    rates = [float(mala(gaussian_energy, x0, 30, eps)[1].mean()) for eps in (0.1, 0.4, 0.8, 1.6)]
    assert all(a > b for a, b in zip(rates, rates[1:])), rates
    assert rates[0] > 0.95 and rates[-1] < 0.1


def test_fast_mlp_gradient_matches_autograd():
    torch.manual_seed(0)
    for act in ("leakyrelu", "silu", "tanh", "softplus", "elu", "relu"):
        ebm = EBM(2, (16, 8), act)
        U = Energy(ebm, scale=3.0)
        assert U.layers is not None
        x = torch.randn(64, 2, requires_grad=True)
        ref = torch.autograd.grad(U(x).sum(), x)[0]
        assert torch.allclose(U.grad(x), ref, atol=1e-5), act
        assert all(p.requires_grad for p in ebm.parameters())


def test_langevin_fast_and_autograd_paths_agree_and_unfreeze():
    ebm = EBM(2, (32, 64, 64, 64), "leakyrelu")
    x0 = torch.rand(100, 2) * 8 - 4
    torch.manual_seed(1)
    a, ra = langevin(Energy(ebm, 2 / 0.1 ** 2), x0, 20, 0.1, return_grad_norm=True)
    torch.manual_seed(1)
    b, rb = langevin(lambda x: ebm(x) * (2 / 0.1 ** 2), x0, 20, 0.1, return_grad_norm=True,
                     freeze=ebm)
    assert torch.allclose(a, b, atol=1e-4) and torch.allclose(ra, rb, rtol=1e-4)
    assert ra.shape == (20,) and (ra > 0).all()
    assert all(p.requires_grad for p in ebm.parameters())
    assert not a.requires_grad and not x0.requires_grad


@pytest.mark.parametrize("name", ["gmm", "rings4"])
def test_paper_toys_densities_integrate_and_match_samples(name):
    import datasets
    from gridmath import grid_points

    x, area = grid_points(datasets.BOUND, 720, torch.float64)
    mass = float(datasets.log_density(name, x).exp().sum() * area)
    assert abs(mass - 1) < 1e-4  # rings4 has 1.6e-5 of its mass outside [-4.5, 4.5]^2
    xs = datasets.sample(name, 50000, 0).double()
    # E_p[-log p] = H(p): the samplers and the densities describe the same distribution
    assert abs(float(-datasets.log_density(name, xs).mean()) - datasets.entropy(name)) < 0.02


# ----------------------------------------------------------------------------- training
TINY = ["--dataset", "gmm", "--n_train", "2000", "--n_test", "1000", "--L", "20",
        "--batch", "64", "--bank_size", "500", "--n_kde", "500", "--wandb", "disabled",
        "--log_every", "10", "--eval_every", "1000", "--lr", "2.0"]


def _gap(F, x_data, x_noise):
    with torch.no_grad():
        return float(F(x_data).mean() - F(x_noise).mean())


def test_tiny_training_lowers_energy_difference_and_writes_plots(tmp_path, monkeypatch,
                                                                   capsys):
    import datasets
    import train_mcmc
    from logger import read_metrics
    from checkpoint import load_run

    out, img = str(tmp_path / "run"), tmp_path / "img"
    x_data = datasets.sample("gmm", 2000, 1)
    x_noise = torch.rand(2000, 2) * 4 - 2
    torch.manual_seed(42)
    gap0 = _gap(EBM(2, (32, 64, 64, 64), "leakyrelu"), x_data, x_noise)  # the seed-42 init
    assert train_mcmc.main(TINY + ["--steps", "60", "--out_dir", out,
                                   "--image_dir", str(img)]) == 0
    with open(os.path.join(out, "summary.json")) as fh:
        summary = json.load(fh)
    assert summary["status"] == "done" and summary["steps"] == 60
    run = load_run(out)
    F = EBM(**run.checkpoint["ebm_spec"])
    F.load_state_dict(run.checkpoint["F"])
    # learning pushed the energy of data below that of noise
    assert _gap(F, x_data, x_noise) < gap0 - 1e-3
    # load_run's ebm is U = (2 / eps^2) F
    x = torch.randn(5, 2)
    assert torch.allclose(run.ebm(x), F(x) * 2 / 0.125 ** 2, rtol=1e-4, atol=1e-4)
    rows = read_metrics(out)
    assert all(k in rows[-1] for k in ("kl_ebm", "kl_kde", "nll_ebm", "kde_outside"))
    assert 0 <= rows[-1]["kde_outside"] < 0.5  # the KDE's escaped mass is logged
    d = [r["d_t"] for r in rows if "d_t" in r]
    assert len(d) == 7 and all("r_t" in r for r in rows if "d_t" in r)
    assert len(run.checkpoint["d_hist"]) == 60
    for f in ("diagnostics.png", "landscape.png", "config.json", "checkpoint.pt"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    assert os.path.isfile(img / "landscape_000060.png")  # --image_dir is the run's own folder

    # long-run sampling from the checkpoint: MALA reports acceptance per step, energy per chain
    import sample_mcmc
    sample = ["--run", out, "--steps", "30", "--chunk", "15", "--n", "200", "--image_dir", str(img)]
    assert sample_mcmc.main(sample) == 0
    res = torch.load(img / "longrun_mala_30.pt", weights_only=True)
    assert res["acceptance"].shape == (30,) and res["energy"].shape == (200,)
    # MALA on this smooth energy at the run's eps = 0.125 accepts almost every proposal (about
    # 0.97 here) and clearly fewer at --eps 0.5 (about 0.56): the flag reaches the sampler
    assert float(res["acceptance"].mean()) > 0.8
    assert 0 <= res["kde_outside"] < 0.01  # chains of a trained gmm EBM stay on the grid
    assert os.path.isfile(img / "longrun_mala_30.png")
    # the same outputs again are refused (one line, exit 2) unless --overwrite replaces them
    with pytest.raises(SystemExit) as e:
        sample_mcmc.main(sample + ["--eps", "0.5"])
    assert e.value.code == 2
    assert sample_mcmc.main(sample + ["--eps", "0.5", "--overwrite"]) == 0
    big = torch.load(img / "longrun_mala_30.pt", weights_only=True)
    assert float(big["acceptance"].mean()) < 0.75
    # SIGTERM (or Ctrl-C) stops the chains at the next chunk: exit 130, outputs untouched
    import scaffold
    real = sample_mcmc.advance

    def advance_then_term(*a):
        out = real(*a)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(sample_mcmc, "advance", advance_then_term)
    assert sample_mcmc.main(sample + ["--overwrite"]) == scaffold.INTERRUPTED
    assert "interrupted at step 15 of 30" in capsys.readouterr().err
    assert not os.path.exists(img / "longrun_mala_30.pt")  # --overwrite removed the old ones


def _rows(x):
    return x[torch.argsort(x[:, 0])]


@pytest.mark.slow
def test_persistent_bank_updated_in_place(monkeypatch, tmp_path):
    import train_mcmc

    calls = []
    real = train_mcmc.langevin

    def spy(U, x0, *a, **kw):
        out = real(U, x0, *a, **kw)
        calls.append((x0.clone(), (out[0] if isinstance(out, tuple) else out).clone()))
        return out
    monkeypatch.setattr(train_mcmc, "langevin", spy)
    # a bank of exactly one batch: each iteration must start from what the last one wrote
    train_mcmc.main(TINY + ["--steps", "3", "--bank_size", "64", "--eval_every", "1000",
                            "--out_dir", str(tmp_path / "r"), "--image_dir", str(tmp_path / "img")])
    (s1, e1), (s2, e2), (s3, e3) = calls[:3]
    assert s1.abs().max() <= 1.0  # the bank starts U[-1, 1]^2
    assert torch.equal(_rows(s2), _rows(e1)) and torch.equal(_rows(s3), _rows(e2))
    assert not torch.equal(_rows(s2), _rows(s1))
    bank = torch.load(str(tmp_path / "r" / "checkpoint.pt"), weights_only=True)["bank"]
    assert torch.equal(_rows(bank), _rows(e3))


def _train(tmp_path, name, *extra):
    import train_mcmc

    return train_mcmc.main(TINY + ["--out_dir", str(tmp_path / name),
                                   "--image_dir", str(tmp_path / "img" / name), *extra])


TIMING = ("sec_per_iter", "cpu_s")


def _training_rows(out):
    """metrics.jsonl without its timing columns."""
    from logger import read_metrics

    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(out)]


def _assert_same_weights(a, b):
    import checkpoint

    ca, cb = (checkpoint.load_checkpoint(str(d / "checkpoint.pt")) for d in (a, b))
    assert ca["step"] == cb["step"]
    for k in ca["F"]:
        assert torch.equal(ca["F"][k], cb["F"][k]), k
    if ca["bank"] is not None:
        assert torch.equal(ca["bank"], cb["bank"])
    assert torch.equal(ca["d_hist"], cb["d_hist"]) and torch.equal(ca["r_hist"], cb["r_hist"])


def test_resume_continues_exactly(tmp_path):
    import train_mcmc

    from logger import read_metrics

    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(tmp_path, "a", "--steps", "40") == 0
    assert _train(tmp_path, "b", "--steps", "20") == 0
    with open(b / "metrics.jsonl", "a") as fh:  # logged after the checkpoint
        fh.write(json.dumps({"step": 30, "d_t": 5.0}) + "\n")
    assert train_mcmc.main(["--resume", str(b), "--steps", "40"]) == 0
    # the resumed run drops the rows after its checkpoint and writes them again
    ra, rb = ([(r["step"], r["d_t"]) for r in read_metrics(d) if "d_t" in r] for d in (a, b))
    assert ra == rb and [s for s, _ in ra] == [1, 10, 20, 30, 40]
    _assert_same_weights(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("init", ["persistent", "gaussian"])
def test_ctrl_c_mid_step_then_resume_writes_the_same_rows(tmp_path, monkeypatch, init):
    """Ctrl-C lands inside an iteration (in the Langevin chains of iteration 15): the run
    stops at the end of that iteration (exit 130), between two metrics rows and away from
    an evaluation, and --resume writes exactly the rows and weights of a run that was never
    interrupted (timing columns aside): the chains, d_t / r_t histories, optimiser and every
    random stream are in the checkpoint."""
    import signal

    import train_mcmc
    import checkpoint

    common = ["--steps", "30", "--eval_every", "10", "--log_every", "4", "--init", init,
              "--lr_decay", "0.98", "--lr_min", "0.5", "--data_epsilon", "0.01"]
    assert _train(tmp_path, "straight", *common) == 0
    real, calls = train_mcmc.langevin, {"n": 0}

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 15 + 1:  # the 15th training chain (the evaluation at 10 ran one more)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **kw)

    monkeypatch.setattr(train_mcmc, "langevin", interrupted)
    assert _train(tmp_path, "split", *common) == 130
    assert checkpoint.load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"))["step"] == 15
    monkeypatch.setattr(train_mcmc, "langevin", real)
    assert train_mcmc.main(["--resume", str(tmp_path / "split")]) == 0
    rows = _training_rows(tmp_path / "straight")
    assert [r["step"] for r in rows if "d_t" in r] == [1, 4, 8, 12, 16, 20, 24, 28]
    assert _training_rows(tmp_path / "split") == rows
    _assert_same_weights(tmp_path / "straight", tmp_path / "split")


def test_nan_at_the_first_iteration_leaves_a_loadable_checkpoint(tmp_path, monkeypatch,
                                                                   capsys):
    import train_mcmc
    import checkpoint

    def nan_chains(U, x0, *a, **kw):
        x, r = langevin(U, x0, *a, **kw)
        return torch.full_like(x, float("nan")), r

    monkeypatch.setattr(train_mcmc, "langevin", nan_chains)
    assert _train(tmp_path, "nan", "--steps", "5") == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "checkpoint" in err
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "nan" / "checkpoint.pt"), script="train_mcmc.py")
    assert ckpt["step"] == 0 and len(ckpt["d_hist"]) == 0
    assert all(torch.isfinite(v).all() for v in ckpt["F"].values())
    assert checkpoint.load_run(str(tmp_path / "nan")).ebm is not None


@pytest.mark.slow
def test_evaluation_does_not_change_the_training_random_streams(tmp_path):
    """Evaluation draws its own chains (from its own seed): runs that evaluate at different
    iterations write the same training rows and end with the same weights."""
    common = ["--steps", "12", "--log_every", "3", "--init", "uniform"]
    assert _train(tmp_path, "often", *common, "--eval_every", "2") == 0
    assert _train(tmp_path, "rarely", *common, "--eval_every", "1000") == 0

    def train_rows(d):
        return [r for r in _training_rows(d) if "d_t" in r]

    assert train_rows(tmp_path / "often") == train_rows(tmp_path / "rarely")
    _assert_same_weights(tmp_path / "often", tmp_path / "rarely")


@pytest.mark.parametrize("argv, needle", [
    (["--lr_decay", "1.5"], "(0, 1]"),
    (["--lr_decay", "0"], "(0, 1]"),
    (["--n_train", str(10 ** 12)], "memory"),
    (["--n_train", "50", "--batch", "100"], "--batch"),
    (["--lr_min", "1.0", "--lr", "0.1"], "lr_min"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys, argv, needle):
    import train_mcmc

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train_mcmc.main(argv + ["--wandb", "disabled"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err, err
    assert os.listdir(tmp_path) == []  # nothing was created


def test_resume_refuses_flags_it_cannot_change_and_finished_runs(tmp_path, capsys):
    import train_mcmc

    assert _train(tmp_path, "r", "--steps", "3") == 0
    capsys.readouterr()  # the run's own output (its progress bar is on stderr)
    for argv, needle in ((["--eps", "0.5"], "--eps"), ([], "--steps")):
        with pytest.raises(SystemExit) as e:
            train_mcmc.main(["--resume", str(tmp_path / "r"), *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and needle in err, err


# ----------------------------------------------------------------------------- configs
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.mark.parametrize("name", ["gmm_convergent", "gmm_nonconvergent", "rings4_convergent",
                                  "rings4_nonconvergent"])
def test_configs_load(name):
    import config
    import train_mcmc

    path = os.path.join(CONFIGS, f"mcmc_{name}.json")
    args = config.parse(train_mcmc.build_parser(), ["--config", path])
    with open(path) as fh:
        raw = json.load(fh)
    assert args.dataset == raw["dataset"] and args.eps == raw["eps"]
    if name.endswith("_convergent"):
        assert args.init == "persistent" and args.eps == 0.125 and args.optimizer == "sgd"
    else:
        assert args.init in ("gaussian", "uniform") and args.eps == 0.01
        assert args.optimizer == "adam" and args.lr == 1e-4 and args.L == 100


def test_bad_flag_one_line_error(capsys):
    import train_mcmc

    with pytest.raises(SystemExit) as e:
        train_mcmc.main(["--eps", "-1"])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- bench/mcmc.py
def _png(path, color):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def test_bench_without_finished_runs_writes_no_figure(tmp_path, capsys):
    """Unfinished runs (figures but no summary with status done) and an empty folder: the
    report exits 1 with one line and the README figures are left as they are."""
    from bench import mcmc as bench_mcmc

    runs, figs = tmp_path / "runs", tmp_path / "figs"
    for regime in ("convergent", "nonconvergent"):
        for f in ("landscape.png", "diagnostics.png"):
            _png(str(runs / f"mcmc-gmm-{regime}" / f), "red")
    (runs / "mcmc-gmm-convergent" / "summary.json").write_text('{"status": "interrupted"}')
    _png(str(figs / "mcmc_gmm_landscapes.png"), "blue")
    before = {p: p.read_bytes() for p in figs.iterdir()}
    for folder in (runs, tmp_path / "empty"):
        os.makedirs(folder, exist_ok=True)
        capsys.readouterr()
        assert bench_mcmc.main(["--no_speed", "--figures", "--runs_dir", str(folder),
                                "--figure_dir", str(figs)]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "no finished runs" in err, err
        assert {p: p.read_bytes() for p in figs.iterdir()} == before


def test_bench_trains_only_unfinished_runs(tmp_path, monkeypatch):
    """Finished runs are kept, an interrupted one is resumed, anything else starts again."""
    import subprocess

    from bench import mcmc as bench_mcmc
    from bench import runner

    calls = []
    monkeypatch.setattr(runner.subprocess, "run",
                        lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    done, stopped, empty = (str(tmp_path / n) for n in ("done", "stopped", "empty"))
    os.makedirs(done)
    with open(os.path.join(done, "summary.json"), "w") as fh:
        json.dump({"status": "done"}, fh)
    os.makedirs(stopped)
    open(os.path.join(stopped, "checkpoint.pt"), "wb").close()
    for d in (done, stopped, empty):
        assert bench_mcmc.train(d, "configs/mcmc_gmm_convergent.json") == 0
    assert len(calls) == 2
    assert calls[0][2:4] == ["--resume", stopped]
    assert "--overwrite" in calls[1] and calls[1][calls[1].index("--out_dir") + 1] == empty


def test_bench_figures_only_from_finished_pairs(tmp_path, capsys):
    """rings4's two runs finished, gmm's not: the rings4 figures are written, the gmm ones
    are left as they are."""
    from bench import mcmc as bench_mcmc

    runs, figs = tmp_path / "runs", tmp_path / "figs"
    for ds in ("gmm", "rings4"):
        for regime in ("convergent", "nonconvergent"):
            d = runs / f"mcmc-{ds}-{regime}"
            for f in ("landscape.png", "diagnostics.png"):
                _png(str(d / f), "red")
            if ds == "rings4":
                (d / "summary.json").write_text(json.dumps({"status": "done", "steps": 5}))
                (d / "metrics.jsonl").write_text(json.dumps({"step": 5, "kl_ebm": 0.1}) + "\n")
    _png(str(figs / "mcmc_gmm_landscapes.png"), "blue")
    old = (figs / "mcmc_gmm_landscapes.png").read_bytes()
    assert bench_mcmc.main(["--no_speed", "--figures", "--runs_dir", str(runs),
                            "--figure_dir", str(figs)]) == 0
    assert (figs / "mcmc_gmm_landscapes.png").read_bytes() == old
    assert sorted(os.listdir(figs)) == ["mcmc_gmm_landscapes.png", "mcmc_rings4_diagnostics.png",
                                        "mcmc_rings4_landscapes.png"]


@pytest.mark.parametrize("argv", [["--net", "conv8"], ["--n_eval", "100"],
                                  ["--dataset", "digits", "--hidden", "8,8"],
                                  ["--dataset", "digits", "--mnist_images", "x.gz"]])
def test_flags_of_the_other_kind_of_data_are_refused(tmp_path, monkeypatch, capsys, argv):
    import train_mcmc

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train_mcmc.main(argv + ["--wandb", "disabled"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and argv[-2] in err and "nothing" in err, err
    assert os.listdir(tmp_path) == []
