"""The run scaffold, part by part: the folder (names, failed starts, --overwrite), signals
(Ctrl-C), the loop (iterations, epochs and their exact resume, running sums, the CPU clock,
rate, the non-finite guard), the run's ending (exit codes, summary, hints) and parse; the shared
RNG and schedule helpers every script calls. The checkpoint part is in test_checkpoint.py."""
import argparse
import copy
import math
import os
import random
import signal
import time
import types

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
    monkeypatch.setattr(scaffold, "run_name", lambda *parts: "same-name")
    a, b = args_for(), args_for()
    with scaffold.Run(a, "x.py", ("x",)) as ra, scaffold.Run(b, "x.py", ("x",)) as rb:
        ra.checkpoints.save({"step": 0})
        rb.checkpoints.save({"step": 0})
    assert a.out_dir != b.out_dir and a.image_dir != b.image_dir
    assert sorted(os.listdir(here / "runs")) == ["same-name", "same-name-2"]
    assert sorted(os.listdir(here / "images")) == ["same-name", "same-name-2"]


def test_runs_whose_folders_differ_only_in_the_parent_get_their_own_figure_folders(here):
    """--out_dir a/run and b/run (sweeps make such pairs): both start, each with its own
    default figure folder; a folder in ./runs keeps images/<name>."""
    a, b = args_for(out_dir=os.path.join("a", "run")), args_for(out_dir=os.path.join("b", "run"))
    with scaffold.Run(a, "x.py", ("x",)) as ra, scaffold.Run(b, "x.py", ("x",)) as rb:
        ra.checkpoints.save({"step": 0})
        rb.checkpoints.save({"step": 0})
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
    os.makedirs("runs")  # a runs/ folder that was there stays; the run's own folder goes
    with pytest.raises(RuntimeError):
        with scaffold.Run(args_for(), "x.py", ("x",)):
            raise RuntimeError("bad data found late")
    assert os.listdir(here) == ["runs"] and os.listdir("runs") == []


def test_a_saved_run_is_kept_when_it_fails_later(here):
    args = args_for()
    with pytest.raises(RuntimeError):
        with scaffold.Run(args, "x.py", ("x",)) as run:
            run.checkpoints.save({"step": 0})
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
        run.checkpoints.save({"step": 0})
    assert sorted(os.listdir("old")) == ["checkpoint.pt", "config.json", "metrics.jsonl"]


def test_second_ctrl_c_stops_at_once_and_keeps_the_checkpoint(here, capsys):
    args, before = args_for(), signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        with scaffold.Run(args, "x.py", ("x",)) as run:
            run.checkpoints.save({"step": 3})
            os.kill(os.getpid(), signal.SIGINT)
            assert run.signals.stop_requested  # the first one only asks to stop
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("not reached: the second Ctrl-C interrupts")
    assert e.value.code == scaffold.INTERRUPTED
    assert "--resume" in capsys.readouterr().err
    assert checkpoint.load_checkpoint(os.path.join(args.out_dir, "checkpoint.pt"))["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored


# ----------------------------------------------------------------------------- writable, parse
def test_check_writable_refuses_a_path_below_a_file(here, capsys):
    open("a-file", "w").write("x")
    with pytest.raises(SystemExit) as e:
        scaffold.check_writable(os.path.join("a-file", "run"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "is a file" in err and "\n" not in err
    scaffold.check_writable(os.path.join("new", "deeper", "run"))  # made later: fine
    assert os.listdir(here) == ["a-file"]


def test_parse_reads_the_clock_only_as_cpu_s(here, capsys):
    """--resume of a checkpoint without `cpu_s` (an older run's `cpu_sec`) is refused in one
    line that names migrate.py; one with `cpu_s` resumes with its saved config."""
    script = scaffold.Script("x.py", keys=("step", "rng"))
    os.makedirs("old")
    saved = {**vars(config.parser("x").parse_args([])), "seed": 7, "out_dir": "old"}
    base = {"config": saved, "script": "x.py", "step": 2,
            "rng": util.rng_state()}
    checkpoint.save_checkpoint(os.path.join("old", "checkpoint.pt"), {**base, "cpu_sec": 3.0})
    with pytest.raises(SystemExit) as e:
        scaffold.parse(config.parser("x"), ["--resume", "old"], script)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "migrate.py" in err and "cpu_s" in err and "\n" not in err
    checkpoint.save_checkpoint(os.path.join("old", "checkpoint.pt"), {**base, "cpu_s": 3.0})
    args, ckpt = scaffold.parse(config.parser("x"), ["--resume", "old"], script)
    assert args.seed == 7 and ckpt["cpu_s"] == 3.0


def _resume(argv, overridable=None, **changes):
    """scaffold.parse of `--resume r` and `argv`, r holding a checkpoint of test_config's
    parser with a saved config of batch 5 and `changes` (a key None: dropped)."""
    from tests.test_config import make_parser

    saved = {**vars(config.parse(make_parser(), [])), "batch": 5, "out_dir": "elsewhere",
             **changes}
    os.makedirs("r", exist_ok=True)
    checkpoint.save_checkpoint(os.path.join("r", "checkpoint.pt"), {
        "config": {k: v for k, v in saved.items() if changes.get(k, 0) is not None},
        "script": "x.py", "step": 2, "rng": util.rng_state(), "cpu_s": 1.0})
    return scaffold.parse(make_parser(), ["--resume", "r", *argv],
                          scaffold.Script("x.py", overridable=overridable))[0]


def test_resume_takes_the_saved_config_and_the_typed_flags(here):
    args = _resume(["--steps", "50"], ("steps",))
    assert args.batch == 5 and args.steps == 50 and args.resume == "r"
    assert args.out_dir == os.path.abspath("r")  # the checkpoint's folder
    assert _resume([]).steps == 10


def test_resume_refuses_a_typed_flag_it_cannot_change(here, capsys):
    with pytest.raises(SystemExit) as e:
        _resume(["--batch", "7"], ("steps",))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--batch cannot change (only --steps can)" in err


def test_resume_reads_renamed_flags_of_a_saved_config(here):
    assert _resume([], n_iter=33, steps=None).steps == 33
    assert _resume(["--n_iter", "40"], ("steps",), n_iter=33, steps=None).steps == 40


def test_resume_refuses_a_config_from_before_a_flag_and_names_migrate(here, capsys):
    with pytest.raises(SystemExit) as e:
        _resume([], overwrite=None, lr=None)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "lacks --lr, --overwrite" in err and "python migrate.py" in err


# ----------------------------------------------------------------------------- the loop
def _loop():
    return scaffold.Loop("test", scaffold.Signals())


def test_iterations_count_each_one_as_it_starts_and_stop_at_until():
    loop = _loop()
    four = lambda: loop.state["step"] >= 4  # noqa: E731
    seen = [(i, loop.state["step"]) for i in loop.iterations(10, until=four)]
    assert seen == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert list(loop.iterations(6)) == [4, 5] and loop.state["step"] == 6  # goes on from step
    loop.close()


def test_a_signal_ends_the_loop_at_the_next_boundary():
    loop = _loop()
    with pytest.raises(scaffold.Interrupted, match="at iteration 2"):
        for i in loop.iterations(5):
            loop.signals.stop_requested = i == 1 or loop.signals.stop_requested
    assert loop.state["step"] == 2  # iteration 1 finished, iteration 2 never started
    loop.close()


def _epochs(loop, stop_at=None):
    """Three epochs of 4 iterations over 10 items, batches of 2: (epoch, step, rows, the next
    iteration's rows or None past the epoch's end) per iteration."""
    seen = []
    for epoch in loop.epochs(3, 4, 10, "cpu", total=12):
        for step in epoch:
            nxt = loop.rows(step + 1, 2)
            seen.append((loop.state["epoch"], step, loop.rows(step, 2).tolist(),
                         None if nxt is None else nxt.tolist()))
            loop.signals.stop_requested = step == stop_at
    return seen


def test_epochs_permute_the_items_and_resume_exactly_after_an_interruption():
    """A loop stopped in its second epoch and resumed from what a checkpoint keeps (the loop's
    state and the RNG) goes through the same epochs, iterations and batches as one never
    stopped; each epoch is a permutation, cut into batches, none past its end."""
    torch.manual_seed(0)
    loop = _loop()
    loop.track(epochs=True)
    straight = _epochs(loop)
    assert [s for _, s, _, _ in straight] == list(range(12))
    assert [e for e, _, _, _ in straight] == [0] * 4 + [1] * 4 + [2] * 4
    epochs = [[r for _, _, b, _ in straight[4 * e:4 * e + 4] for r in b] for e in range(3)]
    assert all(len(set(rows)) == 8 and set(rows) <= set(range(10)) for rows in epochs)
    assert len({tuple(rows) for rows in epochs}) == 3  # a fresh permutation each epoch
    assert [n is None for _, _, _, n in straight] == [False, False, False, True] * 3
    torch.manual_seed(0)
    first = _loop()
    first.track(epochs=True)
    with pytest.raises(scaffold.Interrupted):
        _epochs(first, stop_at=5)
    saved = copy.deepcopy({**first.state, "cpu_s": first.cpu_s, "rng": util.rng_state()})
    assert saved["step"] == 6 and saved["epoch"] == 1 and saved["it"] == 2
    torch.rand(5)  # the interrupted process goes on drawing; the checkpoint does not
    resumed = _loop()
    resumed.track(epochs=True)
    resumed.load(saved)
    util.set_rng_state(saved["rng"])
    assert straight[:6] + _epochs(resumed) == straight
    assert resumed.state["epoch"] == 3 and resumed.state["perm"] is None


def test_running_sums_are_the_means_of_the_iterations_since_the_last_row():
    loop = _loop()
    state = loop.track(sums=("v", "k"), other=1)
    loop.add(v=1.0, k=None)  # None: a value this iteration did not have, counted as 0
    loop.add(v=torch.tensor(2.0), k=True)
    assert loop.means() == {"v": 1.5, "k": 0.5}
    assert state == {"step": 0, "other": 1, "v": 0.0, "k": 0.0, "n_rows": 0}
    loop.add(v=4.0, k=False)
    assert loop.means() == {"v": 4.0, "k": 0.0}


def test_the_cpu_clock_counts_only_inside_the_loop():
    def burn():
        return sum(i * i for i in range(300_000))

    loop = _loop()
    burn()
    assert loop.cpu_s == 0.0
    for _ in loop.iterations(2):
        burn()
    inside = loop.cpu_s
    assert inside > 0
    burn()
    assert loop.cpu_s == inside
    loop.load({"step": 2, "cpu_s": 10.0})  # a resumed run goes on from its saved clock
    assert loop.spent(10.0) and not loop.spent(10.5) and loop.spent(10.5, offset=1.0)
    assert not loop.spent(None)  # no budget
    with loop.clock():
        burn()
    assert loop.cpu_s > 10.0
    loop.close()


def test_rate_counts_the_iteration_under_way(monkeypatch):
    """Wall clock 0 s at the loop's start: called inside the second iteration at 4 s, two
    iterations are done (0.5 it/s); the next call, inside the fourth at 10 s, counts the two
    since."""
    ticks = iter([0.0, 4.0, 10.0])
    monkeypatch.setattr(scaffold, "time", types.SimpleNamespace(
        perf_counter=lambda: next(ticks), process_time=time.process_time))
    loop, rates = _loop(), []
    for i in loop.iterations(4):
        if i in (1, 3):
            rates.append(loop.rate()[0])
    assert rates == [2 / 4.0, 2 / 6.0]
    loop.close()


def test_off_a_terminal_the_bar_is_a_plain_line_every_30_s(capsys):
    """Off a terminal (stderr captured here) the bar writes whole lines, no carriage returns
    or escape codes: one as the loop starts and one as it closes, none in between (30 s)."""
    loop = _loop()
    for i in loop.iterations(50):
        loop.print(None, {"i": i})
    loop.close()
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err and err.endswith("\n")
    assert [line.split("|")[-1].split()[0] for line in err.splitlines()] == ["0/50", "50/50"]


def test_the_non_finite_guard():
    loop = _loop()
    w = torch.nn.Parameter(torch.ones(2))
    (w * torch.tensor([1.0, math.inf])).sum().backward()
    for loss, params in ((torch.tensor(math.nan), ()), (None, ()), (math.inf, ()),
                         (torch.tensor(1.0), [w])):
        with pytest.raises(scaffold.NonFinite, match="non-finite"):
            loop.check(loss, params)
    w.grad = torch.zeros(2)
    loop.check(torch.tensor(1.0, requires_grad=True) * 2, [w])  # finite: passes


def test_load_puts_tensors_on_the_states_device_and_keeps_entries_a_checkpoint_lacks():
    loop = _loop()
    loop.track(x=torch.zeros(2, dtype=torch.float64), kept="mine")
    loop.load({"x": torch.ones(2, dtype=torch.float64), "step": 5, "cpu_s": 3.0, "extra": 1})
    assert loop.state == {"step": 5, "x": loop.state["x"], "kept": "mine"}
    assert torch.equal(loop.state["x"], torch.ones(2, dtype=torch.float64))
    assert loop.cpu_s == 3.0


# ----------------------------------------------------------------------------- the ending
def test_execute_ends_each_way_with_its_exit_status(here, capsys):
    """A summary -> summary.json with cpu_s, 0; NonFinite -> 1 naming the kept checkpoint;
    Interrupted -> a checkpoint saved and the resume command, 130."""
    import json

    args = args_for()
    with scaffold.Run(args, "x.py", ("x",)) as run:
        assert run.execute(lambda: {"loss": 0.5}) == scaffold.DONE
    summary = json.load(open(os.path.join(args.out_dir, "summary.json")))
    assert summary["loss"] == 0.5 and "cpu_s" in summary

    def nan():
        raise scaffold.NonFinite("non-finite loss or gradient at iteration 3")

    args = args_for()
    with scaffold.Run(args, "x.py", ("x",)) as run:
        run.checkpoints.load_or_save_first()
        assert run.execute(nan) == scaffold.NONFINITE
    err = capsys.readouterr().err
    assert "iteration 3" in err and os.path.join(args.out_dir, "checkpoint.pt") in err
    assert not os.path.exists(os.path.join(args.out_dir, "summary.json"))

    def stopped():
        run.loop.state["step"] = 4
        raise scaffold.Interrupted("at iteration 4")

    args = args_for()
    with scaffold.Run(args, "x.py", ("x",)) as run:
        assert run.execute(stopped) == scaffold.INTERRUPTED
    assert "--resume" in capsys.readouterr().err
    assert checkpoint.load_checkpoint(os.path.join(args.out_dir, "checkpoint.pt"))["step"] == 4


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
    import train  # the gif command is train.py's own hint

    assert shlex.split(train.gif_hint("my images/run one"))[-1] == "my images/run one"


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
