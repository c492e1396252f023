"""End-to-end behaviour of train.py: outputs, wandb offline log, resume, Ctrl-C, NaN, bad flags."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import checkpoint
import fce
import train
from logger import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--samples", "2000", "--batch", "200", "--test_samples", "2000", "--ebm_hidden", "32",
        "--flow_hidden", "16", "--flow_layers", "2", "--log_every", "5"]


def run_train(tmp_path, *extra, name="run"):
    out = tmp_path / name
    code = train.main([*TINY, "--out_dir", str(out), "--image_dir", str(tmp_path / "img" / name),
                       *extra])
    return code, out


def test_short_run_writes_everything(tmp_path):
    code, out = run_train(tmp_path, "--epoch", "2", "--eval_every", "1", "--wandb", "offline")
    assert code == 0
    frames = sorted(os.listdir(tmp_path / "img" / "run"))
    assert frames == ["epoch_0001.png", "epoch_0002.png"]
    assert Image.open(tmp_path / "img" / "run" / frames[0]).size == Image.open(
        tmp_path / "img" / "run" / frames[1]).size
    cfg = json.load(open(out / "config.json"))
    assert cfg["dataset"] == "8gaussians" and cfg["flow"] == "maf" and cfg["seed"] == 42
    rows = read_metrics(out)
    train_rows = [r for r in rows if "value" in r]
    eval_rows = [r for r in rows if "kl_ebm" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    assert [r["epoch"] for r in eval_rows] == [1, 2]
    for key in ("nll_ebm", "nll_flow", "kl_flow", "mse_logp", "c_gap", "entropy", "log_Z"):
        assert key in eval_rows[-1]
    # each row averages log_every = 5 iterations of batch 200: the accuracy is a multiple of
    # 1 / (2 * 200 * 5) and the EBM's share of the steps a multiple of 1/5
    for r in train_rows:
        assert abs(2000 * r["accuracy"] - round(2000 * r["accuracy"])) < 1e-3
        assert abs(5 * r["ebm_step_fraction"] - round(5 * r["ebm_step_fraction"])) < 1e-9
        assert 0 <= r["accuracy_flow"] <= 1
    # the default rule: the threshold, moved to keep the flow at --flow_target of the steps;
    # one model per iteration, the rows carry the threshold, the summary the flow's share
    assert cfg["rule"] == "threshold" and 0 < cfg["flow_target"] < 1
    assert all(r["ebm_step_fraction"] + r["flow_step_fraction"] == 1 for r in train_rows)
    assert all(0.5 <= r["threshold"] < 1 for r in train_rows)
    summary = json.load(open(out / "summary.json"))
    assert summary["flow_steps"] + summary["ebm_steps"] == summary["steps"] == 20
    assert summary["flow_step_fraction"] == summary["flow_steps"] / 20
    ckpt = checkpoint.load_checkpoint(str(out / "checkpoint.pt"))
    assert ckpt["step"] == 20 and ckpt["epoch"] == 2
    # the offline wandb log is readable without a server
    runs = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    res = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary",
                          "--json", str(out / "wandb" / runs[0])],
                         capture_output=True, text=True, timeout=120)
    summary = json.loads(res.stdout)
    assert summary["config"]["dataset"] == "8gaussians"
    assert summary["summary"]["kl_ebm"] == pytest.approx(eval_rows[-1]["kl_ebm"])
    assert summary["step"] == 20


def test_resume_continues_exactly(tmp_path):
    """1 epoch + resume to 2 epochs ends with the same weights as 2 epochs straight (constant
    learning rate: a cosine schedule depends on the total length, which --epoch changes)."""
    common = ["--wandb", "disabled", "--plot_every", "5", "--eval_every", "5",
              "--lr_schedule", "constant"]
    assert run_train(tmp_path, "--epoch", "2", *common, name="straight")[0] == 0
    assert run_train(tmp_path, "--epoch", "1", *common, name="split")[0] == 0
    assert train.main(["--resume", str(tmp_path / "split"), "--epoch", "2"]) == 0
    a = checkpoint.load_checkpoint(str(tmp_path / "straight" / "checkpoint.pt"))
    b = checkpoint.load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"))
    assert b["step"] == 20
    for k in a["ebm"]:
        assert torch.equal(a["ebm"][k], b["ebm"][k]), k
    for k in a["flow"]:
        assert torch.equal(a["flow"][k], b["flow"][k]), k
    steps = [r["step"] for r in read_metrics(tmp_path / "split") if "value" in r]
    assert steps == [5, 10, 15, 20]
    # a flag that a resume cannot change is refused, not silently ignored
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(tmp_path / "split"), "--lr_ebm", "0.1"])
    assert e.value.code == 2


def test_used_out_dir_is_refused_or_started_clean_with_overwrite(tmp_path, capsys):
    assert run_train(tmp_path, "--epoch", "2", "--wandb", "disabled")[0] == 0
    assert sorted(os.listdir(tmp_path / "img" / "run")) == ["epoch_0001.png", "epoch_0002.png"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, "--epoch", "1", "--wandb", "disabled")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--overwrite" in err and "\n" not in err
    assert run_train(tmp_path, "--epoch", "1", "--wandb", "disabled", "--overwrite")[0] == 0
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "value" in r]
    assert steps == [5, 10]
    # no stale frame of the old run is left for the gif
    assert sorted(os.listdir(tmp_path / "img" / "run")) == ["epoch_0001.png"]


TIMING = ("cpu_s", "it_per_s", "cpu_s_per_it")


def _rows(out):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(out)]


@pytest.mark.slow
def test_ctrl_c_mid_step_then_resume_writes_the_same_rows(tmp_path, monkeypatch):
    """Ctrl-C lands inside an iteration (after the optimiser step): the run stops at the end
    of that iteration, and --resume writes exactly the rows and weights of a run that was
    never interrupted (timing columns aside). The interruption falls between two rows and
    away from an epoch boundary."""
    common = ["--epoch", "2", "--wandb", "disabled", "--eval_every", "1", "--log_every", "3"]
    assert run_train(tmp_path, *common, name="straight")[0] == 0
    real, calls = fce.fce_step, {"n": 0}

    def interrupted(*a, **kw):
        out = real(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(fce, "fce_step", interrupted)
    assert run_train(tmp_path, *common, name="split")[0] == 130
    assert checkpoint.load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"))["step"] == 7
    monkeypatch.setattr(fce, "fce_step", real)
    assert train.main(["--resume", str(tmp_path / "split")]) == 0
    assert _rows(tmp_path / "split") == _rows(tmp_path / "straight")
    a = checkpoint.load_checkpoint(str(tmp_path / "straight" / "checkpoint.pt"))
    b = checkpoint.load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"))
    for k in a["ebm"]:
        assert torch.equal(a["ebm"][k], b["ebm"][k]), k


def _signal_a_running_train(tmp_path, sig, **popen):
    """Start train.py (500 epochs), send `sig` once it has written 3 metrics rows; returns its
    exit status, stderr and run folder."""
    out = tmp_path / "int"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--batch", "100",
           "--epoch", "500", "--wandb", "disabled", "--eval_every", "500", "--plot_every", "500",
           "--out_dir", str(out), "--image_dir", str(tmp_path / "img")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **popen)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    while time.time() < deadline and len(read_metrics(out)) < 3:
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err, out


def _resume_one_more_epoch(out):
    """The interrupted run's checkpoint resumes, and finishes its next epoch."""
    ckpt = checkpoint.load_checkpoint(str(out / "checkpoint.pt"))
    assert ckpt["step"] >= 15 and ckpt["step"] == ckpt["epoch"] * 20 + ckpt["it"]
    epoch = ckpt["epoch"]
    assert train.main(["--resume", str(out), "--epoch", str(epoch + 1)]) == 0
    after = checkpoint.load_checkpoint(str(out / "checkpoint.pt"))
    assert after["epoch"] == epoch + 1 and after["step"] == (epoch + 1) * 20
    assert after["cpu_s"] >= ckpt["cpu_s"] > 0


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path):
    # a shell's background jobs inherit SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the child the default disposition, as a terminal would
    code, err, out = _signal_a_running_train(
        tmp_path, signal.SIGINT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert code == 130 and "--resume" in err, err
    _resume_one_more_epoch(out)


@pytest.mark.slow
def test_sigterm_stops_at_an_iteration_boundary_and_resumes(tmp_path):
    """SIGTERM (a scheduler, a stopped sweep agent) takes the Ctrl-C path: the run stops at an
    iteration boundary, saves, prints the --resume command and exits 130; --resume then
    finishes it."""
    code, err, out = _signal_a_running_train(tmp_path, signal.SIGTERM)
    assert code == 130, err
    assert "SIGTERM" in err and "--resume" in err and "Traceback" not in err
    _resume_one_more_epoch(out)


@pytest.mark.parametrize("bad_call,epoch,step", [(1, 0, 0), (15, 1, 10)])
def test_nan_stops_cleanly_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys,
                                                          bad_call, epoch, step):
    """A NaN at the first iteration leaves the initial state; later, the last epoch's."""
    real = fce.fce_step
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == bad_call:
            return fce.StepResult(torch.tensor(float("nan")), torch.tensor(0.5),
                                  torch.tensor(0.5), False, False)
        return real(*a, **kw)

    monkeypatch.setattr(fce, "fce_step", flaky)
    code, out = run_train(tmp_path, "--epoch", "3", "--wandb", "disabled")
    assert code == 1
    assert "non-finite" in capsys.readouterr().err
    ckpt = checkpoint.load_checkpoint(str(out / "checkpoint.pt"), script="train.py")
    assert ckpt["epoch"] == epoch and ckpt["step"] == step
    assert all(torch.isfinite(v).all() for v in ckpt["ebm"].values())
    run = checkpoint.load_run(str(out))
    assert run.ebm is not None and run.step == step


@pytest.mark.parametrize("args,needle", [
    (["--dataset", "nope"], "invalid choice"),
    (["--flow", "realnvp"], "invalid choice"),
    (["--threshold", "1.5"], "(0, 1)"),
    (["--threshold", "0"], "(0, 1)"),
    (["--rule", "threshold", "--threshold", "0.5"], "(0.5, 1)"),
    (["--rule", "threshold", "--threshold", "0.3"], "(0.5, 1)"),
    (["--rule", "sometimes"], "invalid choice"),
    (["--flow_target", "1"], "(0, 1)"),
    (["--flow_target", "1.5"], "[0, 1]"),
    (["--flow_every", "0"], "positive"),
    (["--batch", "0"], "positive"),
    (["--samples", "-5"], "positive"),
    (["--samples", "100", "--batch", "200"], "smaller than --batch"),
    (["--samples", str(10 ** 13)], "memory"),
    (["--lr_min_factor", "1.5"], "[0, 1]"),
    (["--noise_mix", "1"], "below 1"),
    (["--resume", "/nonexistent/run"], "no checkpoint"),
    (["--config", "/nonexistent.json"], "not found"),
])
def test_bad_flags_exit_2_with_one_line(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_config_file_sets_flags_and_rejects_unknown_keys(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"dataset": "rings", "batch": 500, "threshold": 0.7}))
    args = train.get_args(["--config", str(good), "--batch", "250"])
    assert (args.dataset, args.batch, args.threshold) == ("rings", 250, 0.7)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dataset": "rings", "learning_rate": 1}))
    with pytest.raises(SystemExit) as e:
        train.get_args(["--config", str(bad)])
    assert e.value.code == 2 and "learning_rate" in capsys.readouterr().err
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"threshold": 3}))
    with pytest.raises(SystemExit):
        train.get_args(["--config", str(wrong)])


def test_cli_error_has_no_traceback():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "x"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "choose from" in res.stderr


def test_load_run_rebuilds_models(tmp_path):
    code, out = run_train(tmp_path, "--epoch", "1", "--wandb", "disabled", "--flow", "glow")
    run = checkpoint.load_run(str(out))
    assert run.config["flow"] == "glow" and run.step == 10
    x = torch.randn(7, 2)
    assert run.ebm(x).shape == (7,)
    s = run.flow.sample(5)
    assert s.shape == (5, 2) and torch.isfinite(run.flow.log_prob(s)).all()


def test_tilt_learning_rate_schedule_runs_within_each_stage():
    """--base_schedule share: the base flow decays over its share of the run, as a flow alone
    over its run; constant: each base flow trains at the full rate; g's schedule starts at its
    switch."""
    from argparse import Namespace
    share = Namespace(estimator="tilt", base_share=0.5, base_schedule="share")
    assert train.stage_progress(share, {"phase": "base"}, 0.25) == pytest.approx(0.5)
    assert train.stage_progress(share, {"phase": "base"}, 0.6) == 1.0
    constant = Namespace(estimator="tilt", base_share=0.5, base_schedule="constant")
    assert train.stage_progress(constant, {"phase": "base"}, 0.25) == 0.0
    assert train.stage_progress(share, {"phase": "tilt", "switch": 0.4}, 0.7) == pytest.approx(
        0.5)
    assert train.stage_progress(Namespace(estimator="mle"), {}, 0.3) == 0.3


def test_curves_are_drawn_at_the_last_evaluation_and_at_most_once_a_minute_before(
        tmp_path, monkeypatch):
    """train.draw_curves: an evaluation within CURVES_EVERY_S of the last drawing skips it,
    a later one and the final one draw."""
    drawn, now = [], [1000.0]
    monkeypatch.setattr(train.plots, "training_curves", lambda path, runs: drawn.append(path))
    monkeypatch.setattr(train, "read_metrics", lambda out: [])
    monkeypatch.setattr(train.time, "monotonic", lambda: now[0])
    args = train.get_args(["--out_dir", str(tmp_path / "r"), "--wandb", "disabled"])
    run = type("Run", (), {"name": "r"})()
    train.draw_curves(args, run, final=False)  # the first evaluation draws
    now[0] += train.CURVES_EVERY_S - 1
    train.draw_curves(args, run, final=False)
    assert len(drawn) == 1
    train.draw_curves(args, run, final=True)
    assert len(drawn) == 2
    now[0] += train.CURVES_EVERY_S
    train.draw_curves(args, run, final=False)
    assert len(drawn) == 3 and drawn[0].endswith("curves.png")
