"""bench/gather.py without real runs: run folders written by hand (config.json, summary.json),
so each number of the table is known. Labels, rows, the skipped folders (one stderr line
each), mean and sample sd over seeds, missing keys, the markdown table every bench writes,
the CLI, and the wandb route with a stand-in API. (test_sweeps.py gathers real agent runs.)"""
import argparse
import json
import math
import os

import pytest

from bench import gather


def write_run(folder, cfg, summary=None):
    """A run folder as every entry script leaves it; no summary.json when `summary` is None
    (an unfinished run)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    if summary is not None:
        with open(os.path.join(folder, "summary.json"), "w") as fh:
            json.dump(summary, fh)
    return str(folder)


FCE = {"estimator": "fce", "flow": "maf", "dataset": "rings"}


# ----------------------------------------------------------------------------- one run
@pytest.mark.parametrize("cfg, want", [
    ({"estimator": "fce", "flow": "maf", "dataset": "rings"}, "fce-maf"),
    ({"estimator": "mle", "flow": "nsf", "dataset": "rings"}, "mle-nsf"),
    ({"estimator": "nce", "flow": "maf", "dataset": "rings"}, "nce"),
    ({"estimator": "fce", "flow": "gaussian", "dataset": "rings"}, "nce"),
    ({"estimator": "dsm", "dataset": "rings"}, "dsm"),
    ({"target": "U1", "K": 8, "flow": "planar"}, "planar-K8"),  # train_vi.py
    ({"config": "configs/mcmc_gmm_convergent.json", "name": "x"}, "mcmc_gmm_convergent"),
    ({"name": "mine"}, "mine"),
    ({"experiment": "digits"}, "digits"),
    ({}, "run"),
])
def test_label_of_each_kind_of_run(cfg, want):
    assert gather.label(cfg) == want


def test_label_by_flags_tells_search_points_apart():
    cfg = {**FCE, "lr_ebm": 0.001, "hidden": [64, 64]}
    assert gather.label(cfg, by=("lr_ebm", "hidden", "absent")) == \
        "fce-maf lr_ebm=0.001 hidden=64 64"


def test_row_keeps_numbers_only():
    """Numeric summary keys become columns; text, booleans and wandb's _keys do not; the
    non-finite floats logger.py writes as text come back as floats (an old run's clock
    names are migrate.py's job: tests/test_migrate.py)."""
    r = gather.row({**FCE, "seed": 3},
                   {"kl_ebm": 0.25, "steps": 100, "note": "ok", "done": True, "_step": 9,
                    "nll_flow": "NaN", "kl_flow": "inf", "cpu_s": 12.5, "label": 1.0},
                   "runs/a")
    assert r == {"label": "fce-maf", "dataset": "rings", "seed": 3, "run_dir": "runs/a",
                 "kl_ebm": 0.25, "steps": 100, "nll_flow": r["nll_flow"], "kl_flow": math.inf,
                 "cpu_s": 12.5}
    assert math.isnan(r["nll_flow"])
    assert gather.row({"target": "U2", "K": 4, "flow": "radial"}, {}, "d")["dataset"] == "U2"
    assert gather.row({"name": "x"}, {}, "d")["dataset"] == "-"


# ----------------------------------------------------------------------------- folders
def test_collect_finds_finished_runs_and_skips_the_rest_with_one_line_each(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root / "a", {**FCE, "seed": 0}, {"kl_ebm": 0.1})
    write_run(root / "group" / "b", {**FCE, "seed": 1}, {"kl_ebm": 0.3})  # two levels down
    write_run(root / "group" / "deep" / "c", FCE, {"kl_ebm": 9.0})  # three: not looked at
    write_run(root / "unfinished", FCE)
    write_run(root / "stopped", FCE, {"status": "interrupted", "kl_ebm": 9.0})
    write_run(root / "listed", FCE, [1, 2])  # summary not a JSON object
    os.makedirs(root / "broken")
    (root / "broken" / "config.json").write_text("{not json")
    (root / "broken" / "summary.json").write_text("{}")
    os.makedirs(root / "foreign")
    os.makedirs(root / "wandb")  # wandb's own folder: skipped without a note
    (tmp_path / "file.txt").write_text("")
    rows = gather.collect([str(root), str(tmp_path / "nowhere"), str(tmp_path / "file.txt")])
    assert sorted((r["seed"], r["kl_ebm"]) for r in rows) == [(0, 0.1), (1, 0.3)]
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("gather: skip ") for line in err) and len(err) == 7, err
    for needle in ("unfinished (no summary.json)", "status interrupted", "not a JSON object",
                   "unreadable (JSONDecodeError", "foreign: not a run folder",
                   "nowhere: no such file", "file.txt: not a folder"):
        assert sum(needle in line for line in err) == 1, (needle, err)
    assert gather.collect([str(root / "a")])[0]["run_dir"] == str(root / "a")  # a run itself


# ----------------------------------------------------------------------------- table
def rows_of(*runs):
    """Rows from (label config, seed, summary) triples."""
    return [gather.row({**cfg, "seed": seed}, summary, f"runs/{i}")
            for i, (cfg, seed, summary) in enumerate(runs)]


def test_aggregate_is_the_mean_and_sample_sd_over_seeds():
    """kl_ebm 1, 2, 3 over three seeds: mean 2, sample sd 1 (n - 1); a key only two runs
    have is averaged over those two (its _n says so); one run has sd nan; a key no run has is
    left out; groups are ordered by estimator, flow, dataset as bench/fce.py lists them."""
    nce = {"estimator": "nce", "dataset": "rings"}
    moons = {**FCE, "dataset": "moons"}
    agg = gather.aggregate(rows_of(
        (FCE, 2, {"kl_ebm": 3.0, "nll_flow": 1.0}), (FCE, 0, {"kl_ebm": 1.0}),
        (FCE, 1, {"kl_ebm": 2.0, "nll_flow": 2.0}), (moons, 0, {"kl_ebm": 0.5}),
        (nce, 0, {"kl_ebm": 4.0})), ["kl_ebm", "nll_flow", "absent"])
    assert [(a["label"], a["dataset"]) for a in agg] == [
        ("nce", "rings"), ("fce-maf", "rings"), ("fce-maf", "moons")]
    fce = agg[1]
    assert fce["n"] == 3 and fce["seeds"] == [0, 1, 2]
    assert fce["kl_ebm"] == pytest.approx(2.0) and fce["kl_ebm_sd"] == pytest.approx(1.0)
    assert fce["nll_flow"] == pytest.approx(1.5) and fce["nll_flow_n"] == 2
    assert fce["nll_flow_sd"] == pytest.approx(math.sqrt(0.5))
    assert math.isnan(agg[0]["kl_ebm_sd"]) and agg[0]["kl_ebm_n"] == 1
    assert "absent" not in fce and "nll_flow" not in agg[0]


@pytest.mark.parametrize("a, want", [
    ({"k": 2.0, "k_sd": 1.0}, "2.000 ± 1.000"),
    ({"k": 0.12345, "k_sd": 0.01}, "0.1235 ± 0.0100"),
    ({"k": 1.0, "k_sd": 0.25}, "1.000 ± 0.250"),  # the boundaries: 1, 10, 100
    ({"k": 10.0, "k_sd": 0.5}, "10.00 ± 0.50"),
    ({"k": 12.345, "k_sd": 0.5}, "12.35 ± 0.50"),
    ({"k": 1234.5, "k_sd": 10.0}, "1234 ± 10"),  # round half to even
    ({"k": 0.5, "k_sd": math.nan}, "0.5000"),  # one run: no sd
    ({"k": 100.0, "k_sd": 0.0}, "100 ± 0"),  # a count the same in every run: no decimals
    ({"k": math.inf, "k_sd": math.nan}, "inf"),
    ({}, "n/a"),
])
def test_cell_is_mean_plus_minus_sd_with_the_decimals_of_its_size(a, want):
    assert gather.cell(a, "k") == want


def test_table_is_the_one_markdown_writer():
    """Header, alignment line, rows; text cells as given, integers plain, None n/a, floats
    with cell()'s decimals, empty cells kept."""
    assert gather.table(["a", "b", "c"], [["x", 3, None], ["", 12.3456, 0.5]]) == [
        "| a | b | c |", "|---|---|---|", "| x | 3 | n/a |", "| | 12.35 | 0.5000 |"]
    assert gather.table(["a", "b"], [], align="---:")[1] == "|---:|---:|"
    assert gather.table(["a", "b"], [[1, 2]], align=["---", "---:"])[1] == "|---|---:|"


def test_markdown_table_of_an_aggregate():
    agg = gather.aggregate(rows_of((FCE, 0, {"kl_ebm": 1.0}), (FCE, 1, {"kl_ebm": 3.0}),
                                   ({"estimator": "mle", "flow": "nsf", "dataset": "rings"}, 0,
                                    {"nll_flow": 2.5})), ["kl_ebm", "nll_flow"])
    assert gather.markdown(agg, ["kl_ebm", "nll_flow"]).splitlines() == [
        "| estimator | dataset | seeds | kl_ebm | nll_flow |",
        "|---|---|---|---|---|",
        "| fce-maf | rings | 2 | 2.000 ± 1.414 | n/a |",
        "| mle-nsf | rings | 1 | n/a | 2.500 |"]


# ----------------------------------------------------------------------------- CLI
def test_cli_prints_and_writes_the_table_with_default_keys(tmp_path, capsys):
    """Default keys: those of DEFAULT_KEYS the runs have, in that order; --out holds the
    printed table, --json one row per run; globs are expanded."""
    for seed, kl in ((0, 1.0), (1, 3.0)):
        write_run(tmp_path / "runs" / f"s{seed}", {**FCE, "seed": seed},
                  {"cpu_s": 10.0, "kl_ebm": kl, "other": 5.0})
    out, rows = tmp_path / "t.md", tmp_path / "rows.json"
    code = gather.main([str(tmp_path / "runs" / "s*"), "--out", str(out), "--json", str(rows)])
    printed = capsys.readouterr().out
    assert code == 0 and printed.splitlines()[0] == \
        "| estimator | dataset | seeds | kl_ebm | cpu_s |"
    assert "| fce-maf | rings | 2 | 2.000 ± 1.414 | 10 ± 0 |" in printed
    assert out.read_text() == printed
    assert len(json.loads(rows.read_text())) == 2


def test_cli_without_finished_runs_fails_in_one_line(tmp_path, capsys):
    write_run(tmp_path / "unfinished", FCE)
    assert gather.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "bench/gather.py: error: no finished runs found"


# ----------------------------------------------------------------------------- wandb
def test_gather_from_wandb_reads_a_sweep_and_fails_in_one_line_offline(monkeypatch, capsys):
    class Run:
        def __init__(self, i, state, seed):
            self.id, self.state = f"r{i}", state
            self.summary = {"kl_ebm": 0.1 * (i + 1), "_step": 10, "_runtime": 3.0}
            self.config = {"estimator": "fce", "flow": "maf", "dataset": "rings",
                           "seed": seed, "_wandb": {}}

    class Api:
        def sweep(self, path):
            assert path == "ent/proj/abc"
            return argparse.Namespace(runs=[Run(0, "finished", 0), Run(1, "finished", 1),
                                            Run(2, "running", 2)])

    rows = gather.from_wandb("ent/proj/sweeps/abc", api=Api())
    assert [r["label"] for r in rows] == ["fce-maf", "fce-maf"]
    assert not any(k.startswith("_") for r in rows for k in r)
    assert "skip ent/proj/r2: running" in capsys.readouterr().err
    agg = gather.aggregate(rows, ["kl_ebm"])
    assert agg[0]["n"] == 2 and math.isclose(agg[0]["kl_ebm"], 0.15)

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert gather.main(["--wandb", "ent/proj/abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "WANDB_MODE=offline" in err


def test_gather_from_wandb_without_a_key_says_so_in_one_line(monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(wandb, "login", lambda **kw: False)
    with pytest.raises(RuntimeError, match="no API key configured") as e:
        gather.from_wandb("ent/proj/abc")
    assert "\n" not in str(e.value)
    with pytest.raises(RuntimeError, match="entity/project"):
        gather.from_wandb("just-a-name", api=object())
