"""bench/digits.py end to end on a tiny budget: train, score, table, figure, resume."""
import json
import os

import pytest

from bench import digits

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.slow
def test_bench_scores_a_run_writes_the_table_and_keeps_finished_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root, out = tmp_path / "runs", tmp_path / "out"
    argv = ["--estimators", "dsm", "--seeds", "0", "--budget", "1", "--root", str(root),
            "--out", str(out), "--ais_chains", "8", "--ais_temps", "10", "--sample_temps", "3"]
    assert digits.main(argv) == 0
    run = root / "dsm-digits-s0"
    s = json.load(open(run / "score.json"))
    assert s["ll_lower"] <= s["ll_upper"] + abs(s["ais_gap"]) + 1e-9
    assert s["bpd_lower"] > 0 and s["fd"] > 0 and 0 <= s["label_tv"] <= 1
    assert s["fd_ratio"] == pytest.approx(s["fd"] / s["fd_floor"])
    table = open(out / "table.md").read()
    assert "| dsm | 1 |" in table
    assert os.path.isfile(out / "samples.png")
    stamp = os.path.getmtime(run / "summary.json"), os.path.getmtime(run / "score.json")
    assert digits.main(argv) == 0  # finished and scored: nothing is redone
    assert (os.path.getmtime(run / "summary.json"), os.path.getmtime(run / "score.json")) == stamp


def test_report_without_runs_writes_nothing(tmp_path):
    out = tmp_path / "out"
    assert digits.main(["--report", "--root", str(tmp_path / "none"), "--out", str(out)]) == 0
    assert not out.exists()


@pytest.mark.slow
def test_train_mcmc_budget_ends_the_run_and_evaluates_where_it_stopped(tmp_path, monkeypatch):
    """--budget (CPU-s) ends a short-run MCMC digits run before --steps and evaluates there
    (the equal-CPU rows of the digits bench need it)."""
    import train_mcmc

    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "mcmc"
    argv = ["--dataset", "digits", "--init", "uniform", "--L", "5", "--steps", "100000",
            "--eval_every", "100000", "--n_eval", "100", "--budget", "1.5", "--threads", "1",
            "--out_dir", str(out), "--image_dir", str(tmp_path / "img")]
    assert train_mcmc.main(argv) == 0
    s = json.load(open(out / "summary.json"))
    assert 0 < s["steps"] < 100000 and s["cpu_s"] >= 1.5
    assert "fd" in s  # evaluated at the step the budget ended
