"""Tests of the tilting experiments: VAE early stopping, log Z by importance sampling, SNIR,
the 2D mixture, tiny end-to-end runs, NaN and Ctrl-C (the split and its TV: test_imbalance.py).
Tiny budgets: the file runs in well under a minute on 2 cores."""
import json
import math
import os
import signal

import numpy as np
import pytest
import torch

import image_data
import tilt
import vae as vae_mod
from gridmath import grid_log_Z, on_grid


# ----------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def digits():
    return image_data.load_digits_data()


# ----------------------------------------------------------------------------- VAE
@pytest.mark.slow
def test_vae_loss_falls_and_early_stopping_restores_best(digits):
    torch.manual_seed(0)
    X, _ = digits
    x = torch.tensor(X)
    # 40 training images and a big decoder over-fit quickly: the validation ELBO peaks and
    # falls again, so the last epoch is not the best one.
    model = vae_mod.VAE(64, z_dim=2, hidden=(128,))
    hist = vae_mod.fit(model, x[:40], x[1000:1200], epochs=400, batch=40, lr=3e-3, patience=40)
    assert hist["train"][-1] < hist["train"][0] - 10
    assert hist["stopped_early"]
    assert hist["best_epoch"] < len(hist["val"]) - 1
    assert hist["val"][-1] < hist["best_val"]
    # the model now holds the best weights (a real copy, not the last epoch's)
    again = vae_mod.validation_elbo(model, x[1000:1200], hist["val_eps"])
    assert again == pytest.approx(hist["best_val"], abs=1e-4)
    assert again > hist["val"][-1] + 1e-3


def test_vae_gaussian_likelihood_and_shapes():
    torch.manual_seed(0)
    model = vae_mod.VAE(10, z_dim=3, hidden=(16,), likelihood="gaussian")
    x = torch.rand(5, 10)
    assert model.elbo(x).shape == (5,)
    imgs, z = model.sample(7)
    assert imgs.shape == (7, 10) and z.shape == (7, 3)
    assert 0 <= imgs.min() and imgs.max() <= 1
    with pytest.raises(ValueError):
        vae_mod.VAE(10, likelihood="poisson")


# ----------------------------------------------------------------------------- log Z and SNIR
def test_importance_log_Z_matches_grid():
    """E(z) = a |z - m|^2 / 2 tilting N(0, I): log Z = log E_N exp(-E) has a closed form and a
    grid value; the IS estimate from 200k prior samples matches both."""
    torch.manual_seed(0)
    m = torch.tensor([0.5, -0.3])
    a = 0.7

    def E(z):
        return 0.5 * a * ((z - m) ** 2).sum(-1)

    log_N = lambda z: -0.5 * (z * z).sum(-1) - math.log(2 * math.pi)  # noqa: E731
    values, area = on_grid(lambda z: -E(z) + log_N(z), 8.0, 400)
    grid = grid_log_Z(values, area)
    exact = -math.log(1 + a) - 0.5 * a / (1 + a) * float((m * m).sum())
    assert grid == pytest.approx(exact, abs=1e-6)
    est = float(tilt.log_Z_importance(E, torch.randn(200_000, 2)))
    assert est == pytest.approx(grid, abs=0.01)


def test_snir_zero_energy_returns_base_samples():
    torch.manual_seed(0)
    base = torch.randn(500, 2)
    idx, ess = tilt.snir(torch.zeros(500), 500)
    assert torch.equal(base[idx], base)
    assert ess == pytest.approx(500.0)


def test_snir_recovers_known_weights():
    """Weights 1:3 on two halves of the base: resampling returns about 25% / 75%; the ESS
    equals (sum w)^2 / sum w^2."""
    g = torch.Generator().manual_seed(0)
    log_w = torch.cat([torch.zeros(1000), torch.full((1000,), math.log(3.0))])
    # systematic resampling is exact up to one draw; multinomial has standard error 0.007
    for method, tol in (("systematic", 1 / 4000 + 1e-9), ("multinomial", 0.02)):
        idx, ess = tilt.snir(log_w, 4000, generator=g, method=method)
        assert (idx >= 1000).float().mean().item() == pytest.approx(0.75, abs=tol)
    assert ess == pytest.approx(4000.0 ** 2 / (1000 + 9000), rel=1e-6)  # float32 log 3


def test_mixture_log_prob_integrates_to_one():
    lp, area = on_grid(tilt.mixture_log_prob(tilt.BASE_WEIGHTS), 4.0, 300)
    assert math.exp(grid_log_Z(lp, area)) == pytest.approx(1.0, abs=1e-4)
    x, comp = tilt.mixture_sample(20000, tilt.TARGET_WEIGHTS, torch.Generator().manual_seed(0))
    h = np.bincount(comp.numpy(), minlength=3) / 20000
    assert tilt.tv(h, tilt.TARGET_WEIGHTS) < 0.01


def test_stratified_teaching_set_is_exactly_30_40_30():
    """--mix_teaching stratified (the default): exactly 30/40/30 of 100 points, shuffled, each
    point from its own component; i.i.d. draws have multinomial counts."""
    g = torch.Generator().manual_seed(3)
    x, comp = tilt.mixture_sample(100, tilt.TARGET_WEIGHTS, g, stratified=True)
    assert x.shape == (100, 2) and np.bincount(comp.numpy(), minlength=3).tolist() == [30, 40, 30]
    assert not torch.equal(comp, comp.sort().values)  # shuffled, not in component blocks
    means = torch.tensor(tilt.MIXTURE_MEANS)
    nearest = ((x[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == comp).float().mean() > 0.8  # std 0.3: most points nearest their mean
    assert tilt.stratified_counts(100, tilt.BASE_WEIGHTS) == [80, 10, 10]
    assert tilt.stratified_counts(7, tilt.TARGET_WEIGHTS) == [2, 3, 2]  # sums exactly to n
    # i.i.d. draws: the counts vary from draw to draw around 30/40/30
    iid = [np.bincount(tilt.mixture_sample(100, tilt.TARGET_WEIGHTS, g)[1].numpy(),
                       minlength=3).tolist() for _ in range(20)]
    assert all(sum(c) == 100 for c in iid) and len({tuple(c) for c in iid}) > 5


@pytest.mark.slow
def test_ml_tilt_recovers_component_weights():
    """ML with importance-sampled log Z on 2,000 target points (a large sample, so that the
    sampling noise of the positives is small) moves the base 0.8/0.1/0.1 to about 0.3/0.4/0.3."""
    torch.manual_seed(0)
    from ebm import EBM
    x_pos, _ = tilt.mixture_sample(2000, tilt.TARGET_WEIGHTS)
    E = EBM(2, (32, 32))
    tilt.fit_tilt(E, x_pos, lambda s: tilt.mixture_sample(2048, tilt.BASE_WEIGHTS)[0], 300,
                  "ml", lr=5e-3)
    with torch.no_grad():
        pool, comp = tilt.mixture_sample(20000, tilt.BASE_WEIGHTS)
        idx, ess = tilt.snir(-E(pool), 4000)
    h = np.bincount(comp[idx].numpy(), minlength=3) / 4000
    assert tilt.tv(h, tilt.TARGET_WEIGHTS) < 0.05
    # the exact tilt p_target / p_base as importance weights has ESS fraction
    # 1 / E_base[(p_target / p_base)^2] = 1 / int p_target^2 / p_base = 0.390 (grid)
    ratio2, area = on_grid(lambda z: 2 * tilt.mixture_log_prob(tilt.TARGET_WEIGHTS)(z)
                           - tilt.mixture_log_prob(tilt.BASE_WEIGHTS)(z), 5.0, 500,
                           dtype=torch.float64)
    ideal = math.exp(-grid_log_Z(ratio2, area))
    assert ideal == pytest.approx(0.390, abs=1e-3)
    assert ess / 20000 == pytest.approx(ideal, abs=0.04)  # learned: 0.374


# ----------------------------------------------------------------------------- end to end
TINY = ["--wandb", "disabled", "--vae_epochs", "3", "--tilt_steps", "3", "--n_base", "256",
        "--pool", "1000", "--n_samples", "200", "--langevin_steps", "3", "--vae_hidden", "32"]


def _run(tmp_path, name, extra):
    import train_tilt

    out = tmp_path / "runs" / name
    code = train_tilt.main(TINY + ["--out_dir", str(out), "--image_dir",
                                   str(tmp_path / "images" / name)] + extra)
    return code, out, tmp_path / "images" / name


@pytest.mark.slow
def test_end_to_end_digits_writes_histograms_and_metrics(tmp_path):
    code, out, img = _run(tmp_path, "d", ["--objective", "both", "--data_tilt",
                                          "--data_tilt_steps", "2", "--per_class", "10"])
    assert code == 0
    for f in ("label_histograms.png", "latent.png", "samples.png"):
        assert (img / f).stat().st_size > 1000
    from logger import read_metrics
    rows = read_metrics(str(out))
    assert any("vae/val_elbo" in r for r in rows) and any("ml/log_Z" in r for r in rows)
    steps = [r["step"] for r in rows]
    assert all(a < b for a, b in zip(steps, steps[1:]))  # wandb drops non-increasing steps
    summary = json.loads((out / "summary.json").read_text())
    # TV to uniform(0-4) of 200 labels is a multiple of 1/400 in [0, 1]; the ESS of a pool of
    # 1000 is in [1, 1000]; the data tilt (ml) names the model it trained and Langevin-sampled
    for k in ("tv_base", "tv_ml_snir", "tv_hackathon_snir", "tv_data_snir", "tv_data_langevin"):
        assert 0 <= summary[k] <= 1 and abs(400 * summary[k] - round(400 * summary[k])) < 1e-9
    assert 1 <= summary["ess_ml"] <= 1000
    assert summary["ess_frac_ml"] == pytest.approx(summary["ess_ml"] / 1000, rel=1e-12)
    assert summary["data_tilt_trained"] == summary["data_tilt_langevin_samples"] == \
        tilt.DATA_TILT_MODELS["ml"]
    assert summary["n_unbiased"] == 50
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {"vae", "ebm_ml", "ebm_hackathon", "ebm_data"} <= set(ckpt)
    import train_tilt
    run = train_tilt.load_tilt_run(str(out))
    assert set(run.energies) == {"ml", "hackathon", "data"} and run.config["seed"] == 42
    z = torch.randn(5, 2)
    with torch.no_grad():
        assert run.vae.decode(z).shape == (5, 64) and run.energies["ml"](z).shape == (5,)


@pytest.mark.slow
def test_end_to_end_mnist_idx(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 30).astype(np.uint8)
    # a small MNIST-format file: 14 x 14 images whose brightness encodes the label
    images = (rng.random((300, 14, 14)) * 60 + labels[:, None, None] * 19).astype(np.uint8)
    image_data.write_idx(tmp_path / "img.idx", images)
    image_data.write_idx(tmp_path / "lab.idx", labels)
    code, out, img = _run(tmp_path, "m", ["--dataset", "mnist", "--mnist_images",
                                          str(tmp_path / "img.idx"), "--mnist_labels",
                                          str(tmp_path / "lab.idx"), "--clf_max_iter", "50"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_biased"] == 75
    assert (img / "label_histograms.png").exists()


def test_end_to_end_mixture(tmp_path):
    code, out, img = _run(tmp_path, "x", ["--experiment", "mixture", "--mix_steps", "3"])
    assert code == 0 and (img / "mixture.png").exists()
    s = json.loads((out / "summary.json").read_text())
    assert abs(sum(s["mix_hist"]) - 1) < 1e-9
    assert s["mix_log_Z_is"] == pytest.approx(s["mix_log_Z_grid"], abs=0.05)
    # default teaching set: stratified, exactly 30/40/30 of 100 points
    assert s["mix_teaching"] == "stratified"
    assert s["mix_unbiased_hist"] == pytest.approx([0.3, 0.4, 0.3], abs=1e-12)
    assert s["mix_tv_unbiased_sample"] == pytest.approx(0.0, abs=1e-12)
    assert abs(sum(s["mix_tilt_weights"]) - 1) < 1e-9
    code, out, _ = _run(tmp_path, "xi", ["--experiment", "mixture", "--mix_steps", "3",
                                         "--mix_teaching", "iid"])
    s = json.loads((out / "summary.json").read_text())
    assert code == 0 and s["mix_teaching"] == "iid"


def test_nan_at_the_first_step_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, capsys):
    """The mixture tilt's first loss is NaN: exit 1, and checkpoint.pt holds the initial
    (finite) energy, loadable with load_tilt_run."""
    import train_tilt

    def nan_loss(E, x_pos, x_base):
        e = E(x_pos)
        return e.mean() * float("nan"), e.mean(), e
    monkeypatch.setattr(tilt, "ml_loss", nan_loss)
    code, out, _ = _run(tmp_path, "n", ["--experiment", "mixture", "--mix_steps", "5"])
    assert code == 1 and "not finite at step 0" in capsys.readouterr().err
    run = train_tilt.load_tilt_run(str(out))
    assert run.config["experiment"] == "mixture"
    assert all(torch.isfinite(p).all() for p in run.energies["mixture"].parameters())


@pytest.mark.slow
def test_nan_in_the_first_vae_epoch_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    import train_tilt

    monkeypatch.setattr(vae_mod.VAE, "elbo", lambda self, x, eps=None: x.sum(-1) * float("nan"))
    code, out, _ = _run(tmp_path, "nv", ["--per_class", "10"])
    assert code == 1
    run = train_tilt.load_tilt_run(str(out))
    assert run.vae is not None and run.energies == {}
    assert all(torch.isfinite(p).all() for p in run.vae.parameters())


def test_ctrl_c_stops_at_a_step_and_exits_130(tmp_path, monkeypatch, capsys):
    """Ctrl-C inside the mixture tilt's third step: the step finishes, training stops there
    (not after all 50 steps), the weights are saved and the exit status is 130."""
    import train_tilt

    real, calls = tilt.ml_loss, {"n": 0}

    def interrupt(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **kw)

    monkeypatch.setattr(tilt, "ml_loss", interrupt)
    code, out, _ = _run(tmp_path, "c", ["--experiment", "mixture", "--mix_steps", "50"])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted in mix at step 3" in err, err
    assert calls["n"] == 3
    assert not (out / "summary.json").exists()
    run = train_tilt.load_tilt_run(str(out))
    assert "mixture" in run.energies
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "mnist", "--mnist_images", "/nonexistent"], "not found"),
    (["--latent", "0"], "positive integer"),
    (["--per_class", "1000"], "per_class"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    import train_tilt

    with pytest.raises(SystemExit) as e:
        train_tilt.main(TINY + ["--out_dir", str(tmp_path / "r")] + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_contrastive_data_tilt_runs_and_lowers_positive_energy():
    """The CD variant: Langevin negatives on E(x) - ELBO(x) from VAE samples; after a few
    steps the positives' energy is below the negatives'."""
    torch.manual_seed(0)
    from ebm import EBM
    model = vae_mod.VAE(16, z_dim=2, hidden=(16,))
    x_pos = torch.rand(32, 16).round()
    E = EBM(16, (16,))
    hist = tilt.fit_data_tilt(E, x_pos, model, steps=30, lr=1e-2, n_neg=32, langevin_steps=3,
                              eps=0.02)
    assert hist["nan_step"] is None and len(hist["loss"]) == 30
    assert hist["loss"][-1] < hist["loss"][0]
    with torch.no_grad():
        assert E(x_pos).mean() < E(model.sample(256)[0]).mean()


# ----------------------------------------------------------------------------- bench/tilt.py
@pytest.fixture
def docs_tree(tmp_path, monkeypatch):
    """A repository-like folder: docs/tilt.md with the table block, published figures."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("docs")
    (tmp_path / "docs" / "tilt.md").write_text("# tilt\n<!-- bench_tilt:start -->\nold table\n"
                                               "<!-- bench_tilt:end -->\n")
    os.makedirs("images/readme")
    (tmp_path / "images" / "readme" / "tilt_mixture.png").write_bytes(b"published")
    return tmp_path


def _untouched(root):
    assert "old table" in (root / "docs" / "tilt.md").read_text()
    assert os.listdir(root / "images" / "readme") == ["tilt_mixture.png"]
    assert (root / "images" / "readme" / "tilt_mixture.png").read_bytes() == b"published"


def test_bench_report_without_finished_runs_writes_nothing(docs_tree, capsys):
    from bench import tilt as bench_tilt

    os.makedirs(docs_tree / "runs" / "bench_tilt" / "digits-s0")  # unfinished: no summary
    assert bench_tilt.main(["--report_only", "--write_docs"]) == 1
    err = capsys.readouterr().err.strip()
    assert "nothing written" in err and "\n" not in err
    _untouched(docs_tree)
    assert os.listdir(docs_tree / "runs" / "bench_tilt") == ["digits-s0"]


def test_bench_checks_the_docs_block_before_training(docs_tree, monkeypatch, capsys):
    from bench import tilt as bench_tilt
    from bench import runner

    monkeypatch.setattr(runner.subprocess, "run", lambda *a, **kw: pytest.fail("trained"))
    (docs_tree / "docs" / "tilt.md").write_text("# tilt, no table block\n")
    with pytest.raises(SystemExit) as e:
        bench_tilt.main(["--write_docs"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "bench_tilt:start" in err and "\n" not in err
    assert not os.path.exists(docs_tree / "runs")


def test_bench_keeps_finished_runs_and_restarts_unfinished_ones(docs_tree, monkeypatch):
    """Seed 0 finished earlier (kept, not trained again); seed 1's digits folder is unfinished
    (trained again with --overwrite); the docs block and the figures are written only when
    every seed finished."""
    import subprocess

    from bench import tilt as bench_tilt
    from bench import runner

    calls = []

    def fake_run(cmd, **kw):
        argv = cmd[2:]
        calls.append(argv)
        _fake_run(argv[argv.index("--out_dir") + 1], argv[argv.index("--image_dir") + 1])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    out = "runs/bench_tilt"
    for name, _ in bench_tilt.RUNS:
        _fake_run(f"{out}/{name}-s0", f"{out}/images/{name}-s0")
    os.makedirs(f"{out}/digits-s1")
    assert bench_tilt.main(["--seeds", "0", "1", "--write_docs"]) == 0
    assert len(calls) == 3 and all("--seed" in a and a[a.index("--seed") + 1] == "1"
                                   for a in calls)
    assert all("--overwrite" in a for a in calls)
    text = (docs_tree / "docs" / "tilt.md").read_text()
    assert "old table" not in text and "| 1 |" in text
    assert (docs_tree / "images" / "readme" / "tilt_mixture.png").read_bytes() == b"png"


def _fake_run(out, image_dir):
    """A finished train_tilt.py run: summary.json with the table's keys, and its figures."""
    keys = ["tv_base", "tv_ml_snir", "ess_ml", "tv_ml_langevin", "tv_hackathon_snir",
            "tv_data_snir", "mix_tv", "mix_tv_tilt_weights", "mix_tv_unbiased_sample",
            "cpu_s"]
    os.makedirs(out, exist_ok=True)
    os.makedirs(image_dir, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump({k: 0.1 for k in keys}, fh)
    for name in ("label_histograms", "latent", "samples", "mixture"):
        with open(os.path.join(image_dir, f"{name}.png"), "wb") as fh:
            fh.write(b"png")
