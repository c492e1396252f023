"""migrate.py: an old run folder, built by hand from a current one (old flag names, old clock
keys, a config from before flags that came later, the old summary keys), is refused on
--resume until migrated; migrated, it resumes exactly, gather and the benchmarks read it, and
migrating again changes nothing. A folder that is not a run is refused in one line."""
import json
import os

import pytest
import torch

import migrate
from bench import gather, runner

MCMC = ["--dataset", "gmm", "--n_train", "2000", "--n_test", "1000", "--L", "20",
        "--batch", "64", "--bank_size", "500", "--n_kde", "500", "--wandb", "disabled",
        "--log_every", "5", "--eval_every", "1000", "--lr", "2.0"]
TRAIN = ["--samples", "2000", "--batch", "200", "--test_samples", "2000", "--ebm_hidden", "32",
         "--flow_hidden", "16", "--flow_layers", "2", "--log_every", "5", "--wandb", "disabled"]


def mcmc_run(tmp_path, name, *extra):
    import train_mcmc

    out = tmp_path / name
    assert train_mcmc.main(MCMC + ["--out_dir", str(out), "--image_dir",
                                   str(tmp_path / "img" / name), *extra]) == 0
    return out


def rewrite(path, change):
    """Apply `change` to a JSON file, a JSON-lines file or a checkpoint in place."""
    if path.suffix == ".pt":
        obj = torch.load(path, weights_only=True)
        change(obj)
        torch.save(obj, path)
    elif path.suffix == ".jsonl":
        rows = [json.loads(ln) for ln in path.read_text().splitlines()]
        for r in rows:
            change(r)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        obj = json.loads(path.read_text())
        change(obj)
        path.write_text(json.dumps(obj))


def rename(d, old, new):
    if new in d:
        d[old] = d.pop(new)


def make_old(cfg):
    """A config as an older train_mcmc.py saved it: --n_iter, no --overwrite, no --image_dir."""
    rename(cfg, "n_iter", "steps")
    cfg.pop("overwrite")
    cfg.pop("image_dir")


def snapshot(out):
    return {f: (out / f).read_bytes() for f in sorted(os.listdir(out)) if os.path.isfile(out / f)}


@pytest.mark.slow
def test_an_old_mcmc_run_migrates_resumes_exactly_and_is_read(tmp_path, capsys):
    import train_mcmc
    from test_mcmc import _assert_same_weights

    straight = mcmc_run(tmp_path, "straight", "--steps", "12")
    old = mcmc_run(tmp_path, "old", "--steps", "6")
    rewrite(old / "config.json", make_old)
    rewrite(old / "checkpoint.pt", lambda c: (make_old(c["config"]), rename(c, "cpu_sec", "cpu_s"),
                                              c.pop("script")))
    rewrite(old / "summary.json", lambda s: (rename(s, "cpu_sec", "cpu_s"),
                                             rename(s, "step", "steps")))
    rewrite(old / "metrics.jsonl", lambda r: rename(r, "cpu_sec", "cpu_s"))
    assert "cpu_sec" in (old / "metrics.jsonl").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the current code refuses it, naming the fix
        train_mcmc.main(["--resume", str(old), "--steps", "12"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "python migrate.py" in err and "--image_dir" in err, err

    assert migrate.main([str(old)]) == 0
    report = capsys.readouterr().out
    for change in ("config.json: --n_iter -> --steps", "image_dir", "overwrite",
                   "summary.json: cpu_sec -> cpu_s", "summary.json: step -> steps",
                   "metrics.jsonl", "checkpoint.pt: script train_mcmc.py",
                   "checkpoint.pt: cpu_sec -> cpu_s", "checkpoint.pt: --n_iter -> --steps"):
        assert change in report, (change, report)
    cfg = json.loads((old / "config.json").read_text())
    assert cfg["steps"] == 6 and "n_iter" not in cfg and cfg["overwrite"] is False
    assert cfg["image_dir"].startswith("images")  # the scaffold's default folder
    summary = runner.finished(str(old))
    assert summary["steps"] == 6 and runner.cpu_seconds(summary) == summary["cpu_s"] > 0
    assert "cpu_sec" not in (old / "metrics.jsonl").read_text()
    row = gather.row(cfg, summary, str(old))
    assert row["cpu_s"] == summary["cpu_s"] and row["dataset"] == "gmm"

    before = snapshot(old)  # idempotent: nothing changes the second time
    assert migrate.main([str(old)]) == 0
    assert capsys.readouterr().out.strip() == f"{old}: up to date"
    assert snapshot(old) == before

    ckpt = torch.load(old / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["image_dir"] == cfg["image_dir"]
    ckpt["config"]["image_dir"] = str(tmp_path / "img" / "old")  # figures stay in tmp_path
    torch.save(ckpt, old / "checkpoint.pt")
    assert train_mcmc.main(["--resume", str(old), "--steps", "12"]) == 0
    _assert_same_weights(straight, old)  # bit-identical to the run made in one go


def test_an_old_train_run_gets_its_estimator_label_and_flow_step_fraction(tmp_path, capsys):
    import train

    out = tmp_path / "fce"
    assert train.main(TRAIN + ["--epoch", "1", "--flow", "maf", "--out_dir", str(out),
                               "--image_dir", str(tmp_path / "img")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    fraction = summary.pop("flow_step_fraction")
    (out / "summary.json").write_text(json.dumps(summary))
    rewrite(out / "config.json", lambda c: c.pop("estimator"))
    assert gather.label(json.loads((out / "config.json").read_text())) != "fce-maf"
    assert migrate.main([str(out)]) == 0
    report = capsys.readouterr().out
    assert "config.json: estimator fce (from before --estimator)" in report
    assert "summary.json: flow_step_fraction added" in report
    cfg = json.loads((out / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert gather.label(cfg) == "fce-maf" and summary["flow_step_fraction"] == fraction
    # a Gaussian noise model from before --estimator is NCE
    cfg = {**{k: v for k, v in cfg.items() if k != "estimator"}, "flow": "gaussian"}
    (out / "config.json").write_text(json.dumps(cfg))
    migrate.main([str(out)])
    assert json.loads((out / "config.json").read_text())["estimator"] == "nce"


@pytest.mark.slow
def test_a_checkpoint_of_the_old_step_rule_is_reported_and_left(tmp_path, capsys):
    import train

    out = tmp_path / "rule"
    assert train.main(TRAIN + ["--epoch", "1", "--out_dir", str(out),
                               "--image_dir", str(tmp_path / "img")]) == 0
    rewrite(out / "checkpoint.pt", lambda c: c["config"].pop("rule"))
    rewrite(out / "config.json", lambda c: c.pop("rule"))
    before = (out / "checkpoint.pt").read_bytes()
    assert migrate.main([str(out)]) == 0
    assert "old step rule (accuracy on the mixed noise), which is gone: it cannot be " \
        "resumed" in capsys.readouterr().out
    assert (out / "checkpoint.pt").read_bytes() == before
    assert "rule" not in json.loads((out / "config.json").read_text())  # no rule invented
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(out), "--epoch", "2"])
    assert e.value.code == 2


def digits_folder(tmp_path, summary):
    """A train.py digits run's config.json and summary.json (what bench.digits reads)."""
    import train

    out = tmp_path / "digits"
    out.mkdir(exist_ok=True)
    cfg = vars(train.get_args(["--dataset", "digits"]))
    (out / "config.json").write_text(json.dumps({**cfg, "ais_chains": 8}))
    (out / "summary.json").write_text(json.dumps(summary))
    return out


BRACKET = {"ll_ebm_lower": -95.0, "ll_ebm_upper": -94.5, "ais_gap": 0.5, "ais_ess": 6.0,
           "bpd_ebm_lower": 2.1, "bpd_ebm_upper": 2.2, "log_Z_ais": 1.0, "c_gap": 0.1,
           "cpu_s": 3.0, "steps": 10}


def test_an_ais_bracket_of_the_old_coordinates_is_dropped_for_rescoring(tmp_path, capsys):
    out = digits_folder(tmp_path, {**BRACKET, "ais_coordinates": 1})
    migrate.main([str(out)])
    assert "AIS bracket in the old atanh coordinates dropped" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary == {"cpu_s": 3.0, "steps": 10}  # bench.digits computes the bracket again
    out = digits_folder(tmp_path, dict(BRACKET))  # untagged: the first coordinates
    migrate.main([str(out)])
    assert "ll_ebm_lower" not in json.loads((out / "summary.json").read_text())


def test_a_current_ais_bracket_gets_its_verdict_and_loses_the_tag(tmp_path, capsys):
    import tasks

    out = digits_folder(tmp_path, {**BRACKET, "ais_coordinates": 2})
    migrate.main([str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert "ais_coordinates" not in summary and summary["ll_ebm"] == -94.5
    want = tasks.trust(-94.5, -95.0, 0.5, 6.0, 8)["ll_ebm_trusted"]
    assert summary["ll_ebm_trusted"] is want
    assert {k: summary[k] for k in BRACKET} == BRACKET


def test_a_tilt_run_gets_dataset_for_data(tmp_path, capsys):
    out = tmp_path / "tilt"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"experiment": "digits", "data": "digits",
                                                 "seed": 1, "config": None}))
    (out / "summary.json").write_text(json.dumps({"time_total_s": 12.5}))
    migrate.main([str(out)])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dataset"] == "digits" and "data" not in cfg and cfg["seed"] == 1
    assert cfg["tilt_steps"] == 500  # a flag it did not have: the parser's default
    assert runner.cpu_seconds(json.loads((out / "summary.json").read_text())) == 12.5
    assert gather.row(cfg, {}, str(out))["dataset"] == "digits"


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: p.write_text("x"), None])
def test_a_folder_that_is_not_a_run_is_refused_in_one_line(tmp_path, capsys, make):
    path = tmp_path / "nothing"
    if make:
        make(path)
    with pytest.raises(SystemExit) as e:
        migrate.main([str(path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "not a run folder" in err and len(err.splitlines()) == 1
