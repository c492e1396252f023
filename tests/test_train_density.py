"""train.py's score-matching estimators (2D) and the digits density task (tasks.py)."""
import json
import math

import pytest
import torch

import checkpoint
import image_data
import tasks
import train
from ebm import EBM
from logger import read_metrics

SMALL = ["--samples", "2000", "--batch", "200", "--test_samples", "2000", "--ebm_hidden", "32",
         "--log_every", "5", "--epoch", "2", "--eval_every", "1"]
DIGITS = ["--dataset", "digits", "--batch", "256", "--ebm_hidden", "32", "--flow_hidden", "16",
          "--flow_layers", "2", "--log_every", "5", "--epoch", "2", "--eval_every", "1",
          "--ais_chains", "16", "--ais_temps", "20"]


def run(tmp_path, *argv, name="run"):
    out = tmp_path / name
    code = train.main([*argv, "--out_dir", str(out), "--image_dir", str(tmp_path / "img" / name)])
    return code, out


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["dsm", "ssm"])
def test_score_matching_run_trains_the_ebm_alone_and_is_scored_exactly(tmp_path, estimator):
    code, out = run(tmp_path, *SMALL, "--estimator", estimator)
    assert code == 0
    rows = read_metrics(out)
    losses = [r["sm_loss"] for r in rows if "sm_loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    last = [r for r in rows if "kl_ebm" in r][-1]
    assert "c_gap" not in last and "nll_flow" not in last  # no learned c, no flow
    summary = json.load(open(out / "summary.json"))
    assert math.isfinite(summary["kl_ebm"])
    loaded = checkpoint.load_run(str(out))
    assert loaded.flow is None and loaded.ebm is not None
    assert float(loaded.ebm.c.detach()) == 0.0  # c is never stepped


@pytest.mark.slow
def test_score_matching_learns(tmp_path):
    """A few epochs of DSM take the EBM's KL on 8gaussians well below that of its first
    evaluation (it fails when the step is dropped or its sign flipped)."""
    code, out = run(tmp_path, "--samples", "4000", "--batch", "200", "--test_samples", "2000",
                    "--ebm_hidden", "64", "64", "--epoch", "6", "--eval_every", "1",
                    "--estimator", "dsm", "--lr_ebm", "5e-3")
    assert code == 0
    kl = [r["kl_ebm"] for r in read_metrics(out) if "kl_ebm" in r]
    assert kl[-1] < 0.8 * kl[0], kl


@pytest.mark.parametrize("argv, needle", [
    (["--estimator", "dsm", "--flow", "maf"], "trains the EBM alone"),
    (["--estimator", "dsm", "--sm_sigma", "0"], "--sm_sigma"),
    (["--dataset", "digits", "--batch", "5000"], "smaller than --batch"),
    (["--dataset", "mnist", "--mnist_images", "/nonexistent/x.gz"], "mnist"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, *argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_digits_batches_are_the_same_draw_whenever_asked():
    args = train.get_args(["--dataset", "digits", "--seed", "3"])
    task = tasks.make_task(args, "cpu")
    idx = torch.arange(10)
    a, b, c = task.batch(idx, 7), task.batch(idx, 7), task.batch(idx, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(image_data.levels(2 * ((a + 1) * 17 / 2).floor() / 16 - 1, 17),
                       image_data.levels(task.x_train[idx], 17))  # same grey level, new u


@pytest.mark.slow
@pytest.mark.parametrize("estimator", [["--estimator", "nce"], ["--estimator", "fce", "--flow", "glow"]])
def test_digits_run_scores_flow_and_ebm_in_nats_per_image(tmp_path, estimator):
    code, out = run(tmp_path, *DIGITS, *estimator)
    assert code == 0
    s = json.load(open(out / "summary.json"))
    for k in ("ll_flow", "bpd_flow", "ll_ebm_c", "ll_ebm_lower", "ll_ebm_upper", "ais_gap"):
        assert math.isfinite(s[k]), k
    assert s["bpd_flow"] == pytest.approx(-s["ll_flow"] / (64 * math.log(2)))
    assert s["ll_ebm_upper"] - s["ll_ebm_lower"] == pytest.approx(s["ais_gap"], abs=1e-6)
    assert s["bpd_ebm_upper"] == pytest.approx(-s["ll_ebm_lower"] / (64 * math.log(2)))


@pytest.mark.slow
def test_box_bracket_holds_the_exact_test_log_likelihood():
    """An EBM whose energy is a diagonal Gaussian's -log density: on the box [-1, 1]^64 its
    normaliser is exactly prod_i (Phi((1 - m_i) / s_i) - Phi((-1 - m_i) / s_i)). The AIS
    bracket on the dequantised test digits holds the exact test log-likelihood within a nat
    per image (it fails when the box's Jacobian or the whitening's log-determinant is
    dropped)."""
    args = train.get_args(["--dataset", "digits", "--ais_chains", "100", "--ais_temps", "300"])
    task = tasks.make_task(args, "cpu")
    m, s = task.x_fit.double().mean(0), task.x_fit.double().std(0) * 2
    normal = torch.distributions.Normal(m, s)

    class GaussEnergy(EBM):
        def forward(self, x):
            return -normal.log_prob(x.double()).sum(-1).to(x.dtype)

    ebm = GaussEnergy(64, [8])
    ebm.c.requires_grad_(False)
    torch.manual_seed(0)
    log_Z = float(torch.log(normal.cdf(torch.ones(64)) - normal.cdf(-torch.ones(64))).sum())
    exact = task.nats(normal.log_prob(task.x_test.double()).sum(-1).mean() - log_Z)
    b = task.bracket(ebm)
    assert b["ll_ebm_lower"] - 1.0 <= exact <= b["ll_ebm_upper"] + 1.0, (b, exact)
    assert abs(b["ais_gap"]) < 1.0
