"""config.py: a JSON config becomes argv words that argparse types and checks (explicit flags
win; bad keys and values are one line naming the key and the file, exit 2), boolean flags in
every form an agent writes, renamed flags and the sweep agent's run folder. The entry
scripts' own batteries of bad input are in test_faults.py."""
import json
import os

import pytest

import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_parser():
    """The shared flags and one flag of each kind a script declares."""
    p = config.parser("test")
    p.add_argument("--batch", type=config.positive_int, default=100)
    p.add_argument("--lr", type=config.positive_float, default=0.1)
    p.add_argument("--act", default="silu", choices=["silu", "tanh"])
    p.add_argument("--hidden", type=config.positive_int, nargs="+", default=[64, 64])
    p.add_argument("--sizes", default=(32, 64), type=lambda s: tuple(map(int, s.split(","))))
    p.add_argument("--budget", type=config.positive_float, default=None)
    config.add_flag(p, "--flag", help="a boolean")
    config.add_flag(p, "--on", default=True)
    p.add_argument("--steps", type=config.positive_int, default=10)
    config.rename(p, "--n_iter", "--steps")
    return p


def parse_with(tmp_path, cfg, argv=()):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    return config.parse(make_parser(), ["--config", str(path), *argv])


def fails(tmp_path, capsys, cfg, *needles):
    with pytest.raises(SystemExit) as e:
        parse_with(tmp_path, cfg)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert all(n in err for n in needles), err
    return err


# ----------------------------------------------------------------------------- JSON -> argv
def test_json_values_are_typed_by_the_flags(tmp_path):
    args = parse_with(tmp_path, {"batch": 7, "lr": 0.5, "act": "tanh", "hidden": [8, 16, 32],
                                 "sizes": [1, 2], "flag": True, "on": False, "budget": None})
    assert args.batch == 7 and isinstance(args.batch, int)
    assert args.lr == 0.5 and args.act == "tanh" and args.hidden == [8, 16, 32]
    assert args.sizes == (1, 2)  # a one-word flag of several values: the comma form
    assert args.flag is True and args.on is False and args.budget is None
    assert parse_with(tmp_path, {"lr": 2, "flag": "no"}).lr == 2.0  # an int is a number
    assert parse_with(tmp_path, {"flag": "no"}).flag is False


def test_config_argv_is_the_words_argparse_reads(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"batch": 7, "hidden": [8, 16], "flag": False, "budget": None,
                                "sizes": [3, 4], "config": "old.json"}))
    assert config.config_argv(str(path), make_parser()) == [
        "--batch=7", "--hidden", "8", "16", "--flag=false", "--sizes=3,4"]


def test_explicit_flags_win_over_the_config(tmp_path):
    args = parse_with(tmp_path, {"batch": 7, "hidden": [8], "flag": True},
                      ["--batch", "9", "--hidden", "1", "2", "--no-flag"])
    assert args.batch == 9 and args.hidden == [1, 2] and args.flag is False


@pytest.mark.parametrize("cfg,needles", [
    ({"batch": 0}, ["'batch'", "positive integer"]),
    ({"batch": 1.5}, ["'batch'", "positive integer"]),
    ({"batch": True}, ["'batch'", "got true"]),
    ({"lr": "fast"}, ["'lr'", "positive number"]),
    ({"act": "relu"}, ["'act'", "relu"]),
    ({"batch": None}, ["'batch'", "null"]),
    ({"batch": [1, 2]}, ["'batch'", "list"]),
    ({"hidden": 64}, ["'hidden'", "list"]),
    ({"hidden": []}, ["'hidden'", "non-empty list"]),
    ({"hidden": [8, "x"]}, ["'hidden'", "'x'"]),
    ({"flag": "maybe"}, ["'flag'", "true or false"]),
    ({"act": {"a": 1}}, ["'act'"]),
])
def test_bad_values_name_the_key_and_the_file(tmp_path, capsys, cfg, needles):
    fails(tmp_path, capsys, cfg, "c.json", *needles)


def test_unknown_keys_are_refused_with_the_valid_ones(tmp_path, capsys):
    err = fails(tmp_path, capsys, {"batch": 1, "num_steps": 3, "no-flag": 1, "help": 1},
                "unknown key(s) help, no-flag, num_steps", "c.json")
    assert "valid keys are the flag names: act, batch," in err


def test_unknown_config_key_rejected_by_a_script(tmp_path, capsys):
    import train_mcmc

    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"dataset": "gmm", "num_mcmc_steps": 100}))
    with pytest.raises(SystemExit) as e:
        config.parse(train_mcmc.build_parser(), ["--config", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "unknown key(s) num_mcmc_steps" in err and "\n" not in err


# ----------------------------------------------------------------------------- boolean flags
@pytest.mark.parametrize("argv, value", [
    ([], False), (["--flag"], True), (["--flag=True"], True), (["--flag=false"], False),
    (["--flag", "1"], True), (["--flag=0"], False), (["--no-flag"], False),
    (["--flag", "--seed=3"], True), (["--config={}"], True)])
def test_add_flag_takes_every_boolean_form(tmp_path, argv, value):
    p = config.parser("test")
    config.add_flag(p, "--flag", help="a boolean")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"flag": "true"}))
    args = config.parse(p, [a.format(path) for a in argv])
    assert args.flag is value


@pytest.mark.parametrize("argv", [["--flag=maybe"], ["--no-flag=1"], ["--flag", "x"]])
def test_add_flag_rejects_other_values_in_one_line(argv, capsys):
    p = config.parser("test")
    config.add_flag(p, "--flag")
    with pytest.raises(SystemExit) as e:
        config.parse(p, argv)
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- renamed flags
def test_a_renamed_flag_works_and_warns(tmp_path, capsys):
    assert config.parse(make_parser(), ["--n_iter", "5"]).steps == 5
    assert capsys.readouterr().err.strip() == "--n_iter is deprecated, use --steps"
    assert parse_with(tmp_path, {"n_iter": 6}).steps == 6
    assert "--n_iter is deprecated" in capsys.readouterr().err
    assert config.given_flags(["--n_iter=3", "--no-flag"]) == {"steps", "flag"}


@pytest.mark.parametrize("script, old, new, value", [
    ("train_mcmc.py", "--n_iter", "--steps", "7"),
    ("train_tilt.py", "--data", "--dataset", "mnist"),
])
def test_each_deprecated_alias_still_works_and_warns(script, old, new, value, tmp_path,
                                                     capsys):
    """One test per renamed flag of an entry script: the old name on the command line and as
    a JSON key sets the new flag, with one line on stderr."""
    module = __import__(script[:-3])
    args = config.parse(module.build_parser(), [old, value])
    assert getattr(args, new[2:]) == type(getattr(args, new[2:]))(value)
    assert capsys.readouterr().err.strip() == f"{old} is deprecated, use {new}"
    path = tmp_path / "c.json"
    path.write_text(json.dumps({old[2:]: value}))
    args = config.parse(module.build_parser(), ["--config", str(path)])
    assert str(getattr(args, new[2:])) == value
    assert f"{old} is deprecated, use {new}" in capsys.readouterr().err


def test_no_config_uses_an_old_flag_name():
    """configs/*.json and sweeps/*.yaml speak the current names."""
    old = ("n_iter", "data")
    for folder in ("configs", "sweeps"):
        for name in os.listdir(os.path.join(ROOT, folder)):
            text = open(os.path.join(ROOT, folder, name)).read()
            assert not any(f'"{o}"' in text or f"\n  {o}:" in text or f" {o}:" in text
                           for o in old), name


# (the resumed config: tests/test_scaffold.py, scaffold.parse)


# ----------------------------------------------------------------------------- sweep agents
def test_agent_out_dir_is_unique_per_run(monkeypatch):
    """Under an agent the default run folder is runs/sweep-<sweep>/<run>: several agents on
    one machine (and train_mcmc.py's fixed --config names) never share a folder."""
    import train_mcmc

    cfg = os.path.join(ROOT, "configs", "mcmc_gmm_convergent.json")
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw")
    monkeypatch.setenv("WANDB_RUN_ID", "r7")
    args = config.parse(train_mcmc.build_parser(), [f"--config={cfg}"])
    assert args.out_dir == os.path.join("runs", "sweep-sw", "r7")
    assert config.parse(make_parser(), ["--out_dir=mine"]).out_dir == "mine"
    assert config.parse(make_parser(), ["--resume=runs/x"]).out_dir is None
    monkeypatch.delenv("WANDB_RUN_ID")
    assert config.parse(make_parser(), []).out_dir is None


@pytest.mark.slow
def test_a_run_saved_with_an_old_flag_name_resumes(tmp_path, capsys):
    """train_mcmc.py's checkpoint with --n_iter in its saved config resumes as --steps; the
    old name typed on the command line works too, with its note."""
    import torch

    import train_mcmc

    out, img = tmp_path / "run", tmp_path / "img"
    argv = ["--dataset", "gmm", "--n_train", "500", "--n_test", "200", "--L", "5", "--batch",
            "32", "--bank_size", "100", "--n_kde", "100", "--wandb", "disabled",
            "--eval_every", "1000", "--out_dir", str(out), "--image_dir", str(img)]
    assert train_mcmc.main(argv + ["--steps", "3"]) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["config"]["n_iter"] = ckpt["config"].pop("steps")
    torch.save(ckpt, out / "checkpoint.pt")
    capsys.readouterr()
    assert train_mcmc.main(["--resume", str(out), "--n_iter", "4"]) == 0
    assert "--n_iter is deprecated, use --steps" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
