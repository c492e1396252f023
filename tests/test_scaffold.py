"""The run scaffold: folders, failed starts, --overwrite, Ctrl-C; the shared RNG and schedule
helpers every script calls."""
import argparse
import math
import os
import random
import signal

import numpy as np
import pytest
import torch

import checkpoint
import config
import scaffold
import util


def args_for(**kw):
    base = dict(out_dir=None, image_dir=None, overwrite=False, wandb="disabled",
                project="p", resume=None, seed=0)
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_two_runs_in_the_same_second_get_their_own_folders(here, monkeypatch):
    monkeypatch.setattr(config, "run_name", lambda *parts: "same-name")
    a, b = args_for(), args_for()
    with scaffold.Run(a, "x.py", ("x",)) as ra, scaffold.Run(b, "x.py", ("x",)) as rb:
        ra.save({"step": 0})
        rb.save({"step": 0})
    assert a.out_dir != b.out_dir and a.image_dir != b.image_dir
    assert sorted(os.listdir(here / "runs")) == ["same-name", "same-name-2"]
    assert sorted(os.listdir(here / "images")) == ["same-name", "same-name-2"]
    # without figure folders the run folder alone is claimed, by an atomic mkdir
    c, d = args_for(), args_for()
    with scaffold.Run(c, "x.py", ("x",), figures=False), \
            scaffold.Run(d, "x.py", ("x",), figures=False):
        assert c.out_dir != d.out_dir


def test_runs_whose_folders_differ_only_in_the_parent_get_their_own_figure_folders(here):
    """--out_dir a/run and b/run (sweeps make such pairs): both start, each with its own
    default figure folder; a folder in ./runs keeps images/<name>."""
    a, b = args_for(out_dir=os.path.join("a", "run")), args_for(out_dir=os.path.join("b", "run"))
    with scaffold.Run(a, "x.py", ("x",)) as ra, scaffold.Run(b, "x.py", ("x",)) as rb:
        ra.save({"step": 0})
        rb.save({"step": 0})
    assert a.image_dir != b.image_dir
    assert a.image_dir == scaffold.default_image_dir(os.path.abspath(os.path.join("a", "run")))
    assert os.path.basename(a.image_dir).startswith("run-") and os.path.isdir(b.image_dir)
    assert scaffold.default_image_dir(os.path.join("runs", "x")) == os.path.join("images", "x")


def test_a_failed_start_leaves_no_folders(here):
    args = args_for(out_dir=os.path.join("deep", "er", "run"))
    with pytest.raises(RuntimeError):
        with scaffold.Run(args, "x.py", ("x",)):
            raise RuntimeError("bad data found late")
    assert os.listdir(here) == []
    with pytest.raises(SystemExit):  # config.fail inside the run, after the folders
        with scaffold.Run(args_for(), "x.py", ("x",)):
            config.fail("bad input found late")
    assert os.listdir(here) == []


def test_a_saved_run_is_kept_when_it_fails_later(here):
    args = args_for()
    with pytest.raises(RuntimeError):
        with scaffold.Run(args, "x.py", ("x",)) as run:
            run.save({"step": 0})
            raise RuntimeError("crash after the first checkpoint")
    ckpt = checkpoint.load_checkpoint(os.path.join(args.out_dir, "checkpoint.pt"), script="x.py")
    assert ckpt["script"] == "x.py" and ckpt["config"]["seed"] == 0 and "rng" in ckpt


def test_overwrite_empties_only_run_folders(here, capsys):
    os.makedirs("notes")
    open(os.path.join("notes", "thesis.tex"), "w").write("precious")
    with pytest.raises(SystemExit) as e:
        scaffold.Run(args_for(out_dir="notes", overwrite=True), "x.py", ("x",))
    assert e.value.code == 2 and "refusing" in capsys.readouterr().err
    assert os.listdir("notes") == ["thesis.tex"]
    os.makedirs("old")
    open(os.path.join("old", "config.json"), "w").write("{}")
    open(os.path.join("old", "stale.png"), "w").write("")
    args = args_for(out_dir="old", overwrite=True, image_dir="old_images")
    with scaffold.Run(args, "x.py", ("x",)) as run:
        run.save({"step": 0})
    assert sorted(os.listdir("old")) == ["checkpoint.pt", "config.json", "metrics.jsonl"]


def test_second_ctrl_c_stops_at_once_and_keeps_the_checkpoint(here, capsys):
    args, before = args_for(), signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        with scaffold.Run(args, "x.py", ("x",)) as run:
            run.save({"step": 3})
            os.kill(os.getpid(), signal.SIGINT)
            assert run.stop_requested  # the first one only asks to stop
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("not reached: the second Ctrl-C interrupts")
    assert e.value.code == scaffold.INTERRUPTED
    assert "--resume" in capsys.readouterr().err
    assert checkpoint.load_checkpoint(os.path.join(args.out_dir, "checkpoint.pt"))["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored


def test_fixed_rng_leaves_every_training_stream_untouched():
    util.set_seed(5)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    util.set_seed(5)
    with util.fixed_rng(123):
        torch.rand(100), np.random.rand(7), random.random()
        inside = torch.rand(2)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
    with util.fixed_rng(123):
        torch.rand(100)
        assert torch.equal(torch.rand(2), inside)  # the evaluation's own stream is fixed too


def test_lr_factor():
    assert util.lr_factor("constant", 5, 10) == 1.0
    assert util.lr_factor("cosine", 0, 10, 0.1) == pytest.approx(1.0)
    assert util.lr_factor("cosine", 5, 10, 0.1) == pytest.approx(0.55)
    assert util.lr_factor("cosine", 10, 10, 0.1) == pytest.approx(0.1)
    assert util.lr_factor("cosine", 20, 10) == pytest.approx(0.0)
    assert util.lr_factor("exponential", 3, 10, 0.2, 0.5) == pytest.approx(0.2)
    assert util.lr_factor("exponential", 2, 10, 0.2, 0.5) == pytest.approx(0.25)
    assert math.isclose(util.lr_factor("cosine", 2.5, 10), 0.5 * (1 + math.cos(math.pi / 4)))


def test_printed_hints_paste_into_a_shell(here, capsys):
    """Paths with spaces survive copy and paste of the resume and gif commands."""
    import shlex

    args = args_for(out_dir="my runs/run one", image_dir="my images/run one")
    def stopped():
        raise scaffold.Interrupted("at iteration 1")

    with scaffold.Run(args, "x.py", ("x",)) as run:
        assert run.execute(stopped) == scaffold.INTERRUPTED
    line = [ln for ln in capsys.readouterr().err.splitlines() if "--resume" in ln][0]
    assert shlex.split(line)[-1] == "my runs/run one"
    assert shlex.split(scaffold.gif_hint("my images/run one"))[-1] == "my images/run one"


def test_generated_gifs_and_runs_are_ignored_by_git():
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in ("images/some-run.gif", "images/some-run/epoch_0001.png", "runs/x/config.json"):
        res = subprocess.run(["git", "check-ignore", "-q", path], cwd=root)
        if res.returncode == 128:
            pytest.skip("not a git checkout")
        assert res.returncode == 0, f"{path} is not ignored by git"


def test_a_benchmark_stops_starting_runs_after_ctrl_c(here, monkeypatch):
    """A run that exits 130 (Ctrl-C reached it too) raises Stopped; run_many then starts no
    new job and re-raises; bench/fce.py turns that into exit status 130."""
    import subprocess

    from bench import fce as bench_fce, runner

    started = []

    def fake_run(cmd, **kw):
        started.append(cmd)
        return subprocess.CompletedProcess(cmd, 130 if len(started) == 2 else 0)

    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    with pytest.raises(runner.Stopped):
        runner.run_many(lambda d: runner.run_script("train.py", d, []),
                        ["a", "b", "c", "d"], parallel=1)
    assert len(started) == 2
    started.clear()
    code = bench_fce.main(["--only", "grid", "--datasets", "rings", "--seeds", "0",
                           "--root", str(here / "bench")])
    assert code == scaffold.INTERRUPTED and len(started) == 2


def test_ctrl_c_outside_a_run_loop_is_one_line_and_status_130(capsys):
    """config.cli wraps every entry script's main: Ctrl-C while loading, sampling or
    reporting gives one line, not a traceback."""
    def main():
        raise KeyboardInterrupt

    assert config.cli(main) == 130
    err = capsys.readouterr().err.strip()
    assert err.endswith("interrupted") and "\n" not in err
    assert config.cli(lambda: 7) == 7
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from tests.test_faults import ENTRY

    for script in ENTRY:
        assert "sys.exit(config.cli(main))" in open(os.path.join(root, script)).read(), script
