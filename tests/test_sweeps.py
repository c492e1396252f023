"""wandb sweep files (sweeps/*.yaml) and bench/gather.py, without a wandb server.

Each sweep file is checked the way a cluster would find out too late: wandb's own sweep
engine (the open-source `sweeps` package, what the server runs) validates it against the
sweep schema and proposes configurations; every proposal becomes the exact command line a
`wandb agent` builds (`wandb.sdk.launch.sweeps.utils.create_sweep_command_args`, `${env}`
-> /usr/bin/env, `${args}` -> `--name=value`), which the program's own parser must accept.
One proposal per file then runs for real with tiny sizes, in the environment an agent sets
(WANDB_SWEEP_ID, WANDB_RUN_ID, WANDB_SWEEP_PARAM_PATH; WANDB_MODE=offline as there is no
server), with no stdin and a timeout: it must exit 0 and write the sweep's metric to its run
summary. bench/gather.py then builds the table from those run folders.
"""
import argparse
import concurrent.futures
import contextlib
import glob
import io
import json
import math
import os
import shutil
import subprocess
import sys
import uuid
import warnings
from unittest import mock

import pytest
import yaml

import config
from bench import gather

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_FILES = sorted(glob.glob(os.path.join(ROOT, "sweeps", "*.yaml")))
NAMES = [os.path.basename(p) for p in SWEEP_FILES]
COMMAND_HEAD = ["${env}", "python", "${program}"]  # then fixed arguments, then ${args}

with warnings.catch_warnings():  # sweeps 0.2 still speaks pydantic v1 config keys
    warnings.simplefilter("ignore")
    import sweeps
    from sweeps import RunState, SweepConfig, SweepRun
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args  # noqa: E402


def _parser_of(program):
    """The program's own argparse parser (its --config handling comes from config.parse)."""
    module = __import__(program[:-3])
    for name in ("get_parser", "build_parser"):
        if hasattr(module, name):
            return getattr(module, name)()
    # train.py builds its parser inside get_args: catch it on its way to config.parse
    class Caught(Exception):
        pass

    def spy(p, argv=None):
        raise Caught(p)

    with mock.patch.object(config, "parse", spy):
        try:
            module.get_args([])
        except Caught as c:
            return c.args[0]
    raise AssertionError(f"{program}: no parser found")


def parse_as_program(program, argv):
    """Parse argv exactly as the program does (train.py: get_args, which also rejects
    estimator/flow combinations); returns (namespace or None, the one-line error)."""
    module = __import__(program[:-3])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            if hasattr(module, "get_args"):
                return module.get_args(argv), ""
            return config.parse(_parser_of(program), argv), ""
    except SystemExit:
        return None, err.getvalue().strip()


def proposals(cfg, n):
    """Up to n configurations as the sweep server proposes them: the whole grid for `grid`
    (each proposal marks the previous ones finished), n draws for random/bayes."""
    sc, runs, out = SweepConfig(cfg), [], []
    while len(out) < n:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = sweeps.next_run(sc, runs)
        if r is None:
            break
        values = {k: v["value"] for k, v in r.config.items()}
        values = {k: v.item() if hasattr(v, "item") else v for k, v in values.items()}
        out.append(values)
        runs.append(SweepRun(name=f"run{len(runs)}", state=RunState.finished,
                             config={k: {"value": v} for k, v in values.items()},
                             summary_metrics={cfg["metric"]["name"]: 1.0 + len(runs)}))
    return out


def agent_command(cfg, values):
    """The command list wandb's agent runs for one proposal (wandb_agent.Agent._command_run)."""
    sweep_vars = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    sweep_vars.update(interpreter=["python"], program=[cfg["program"]], env=["/usr/bin/env"])
    out = []
    for c in map(str, cfg.get("command", ["${env}", "${interpreter}", "${program}", "${args}"])):
        out += (sweep_vars.get(c[2:-1]) or []) if c.startswith("${") and c.endswith("}") else [c]
    return out


def problems(cfg, n=200):
    """Everything wrong with a sweep config, as strings (empty list: fine)."""
    out = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            SweepConfig(cfg)
    except Exception as e:
        return [f"not a valid wandb sweep: {str(e).splitlines()[0]}"]
    program = cfg.get("program", "")
    if not os.path.isfile(os.path.join(ROOT, program)):
        return [f"program {program!r} is not a script of the repository"]
    cmd = [str(c) for c in cfg.get("command", [])]
    if cmd[:3] != COMMAND_HEAD or cmd.count("${args}") != 1:
        out.append(f"command must be {COMMAND_HEAD + ['...', '${args}']}, got {cmd}")
    if "metric" not in cfg or "name" not in cfg["metric"]:
        out.append("no metric")
    flags = {s[2:] for a in _parser_of(program)._actions for s in a.option_strings}
    for k in cfg["parameters"]:
        if k not in flags:
            out.append(f"parameter {k!r} is not a flag of {program}")
    if out:
        return out
    for values in proposals(cfg, n if cfg["method"] == "grid" else 3):
        argv = agent_command(cfg, values)[3:]
        args, err = parse_as_program(program, argv)
        if args is None:
            out.append(f"{program} rejects {' '.join(argv)}: {err}")
            break
        for k, v in values.items():  # every swept value arrives as itself
            got = getattr(args, k)
            if k != "config" and not (got == v or (isinstance(v, (int, float)) and not
                                                   isinstance(v, bool) and
                                                   math.isclose(float(got), float(v)))):
                out.append(f"{k}={v!r} arrives in {program} as {got!r}")
    return out


def load(path):
    with open(path) as fh:
        return yaml.safe_load(fh)


# ----------------------------------------------------------------------------- static checks
def test_there_are_sweep_files_for_every_study():
    programs = {load(p)["program"] for p in SWEEP_FILES}
    assert {"train.py", "train_mcmc.py", "train_vi.py"} <= programs
    methods = {load(p)["method"] for p in SWEEP_FILES}
    assert "grid" in methods and methods & {"bayes", "random"}


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if n == "grid.yaml" else p
                                  for p, n in zip(SWEEP_FILES, NAMES)], ids=NAMES)
def test_sweep_file_is_valid_and_its_program_accepts_every_proposal(path):
    assert problems(load(path)) == []


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c["parameters"].update(lr_ebn={"value": 0.1}), "'lr_ebn' is not a flag"),
    (lambda c: c["parameters"].update(threshold={"values": [0.6, 1.5]}), "rejects"),
    (lambda c: c["parameters"].update(dataset={"value": "nosuchdata"}), "rejects"),
    (lambda c: c["parameters"].update(ebm_hidden={"value": [256, 256]}), "rejects"),
    (lambda c: c["parameters"].update(maf_bn={"value": "maybe"}), "rejects"),
    (lambda c: c.update(method="grd"), "not a valid wandb sweep"),
    (lambda c: c.update(command=["${env}", "python", "${program}", "${args_no_hyphens}"]),
     "command must be"),
    (lambda c: c.update(program="nosuch.py"), "not a script"),
])
def test_bad_sweep_files_are_reported(mutate, needle):
    cfg = load(os.path.join(ROOT, "sweeps", "grid.yaml"))
    mutate(cfg)
    found = problems(cfg, n=3)
    assert any(needle in p for p in found), found


def test_agent_booleans_and_config_files_reach_the_scripts():
    """What an agent writes for a boolean (`--flag=True/False`) and `--config=FILE`."""
    cmd = agent_command({"program": "train_vi.py"}, {"frames": False, "anneal": True})
    assert cmd[3:] == ["--frames=False", "--anneal=True"]
    args, err = parse_as_program("train_vi.py", cmd[3:])
    assert err == "" and args.frames is False and args.anneal is True
    args, err = parse_as_program("train.py", ["--maf_bn=True"])
    assert err == "" and args.maf_bn is True
    args, _ = parse_as_program("train_mcmc.py", ["--config=configs/mcmc_gmm_convergent.json"])
    assert args.steps == 6000 and args.name == "mcmc-gmm-convergent"


def _source(path):
    with open(path) as fh:
        return fh.read()


# every script whose flags come from config.parser (so with --wandb)
ENTRY_SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py"))
                       if "config.parser(" in _source(p) and p != os.path.join(ROOT, "config.py"))


def test_no_script_has_a_flag_an_agent_cannot_set():
    """store_true and BooleanOptionalAction reject --flag=True, which is what an agent passes."""
    bad = [os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py"))
           if p != os.path.join(ROOT, "config.py")
           and ('action="store_true"' in _source(p) or "BooleanOptionalAction" in _source(p))]
    assert bad == [], "use config.add_flag in " + ", ".join(bad)


@pytest.mark.parametrize("program", ENTRY_SCRIPTS)
def test_wandb_flag_follows_the_environment_by_default(program):
    """A --wandb default of "online" would override the WANDB_MODE an agent (or a user)
    sets, and an online run without a server waits on it."""
    actions = {a.dest: a for a in _parser_of(program)._actions}
    assert actions["wandb"].default == "auto"
    assert not any(isinstance(a, (argparse._StoreTrueAction, argparse.BooleanOptionalAction))
                   for a in actions.values()), "use config.add_flag: agents pass --flag=True"


# ----------------------------------------------------------------------------- real runs
# tiny sizes appended to a proposal (as if the sweep file said so): seconds, not hours
TINY = {
    "train.py": {"budget": 0.3, "samples": 1000, "test_samples": 1000, "batch": 250,
                 "log_every": 2},
    "train_mcmc.py": {"steps": 4, "eval_every": 4, "log_every": 2, "n_train": 1000,
                      "n_test": 500, "n_kde": 500, "L": 3, "bank_size": 200, "batch": 50},
    "train_vi.py": {"steps": 10, "eval_every": 10, "eval_samples": 500, "final_samples": 1000,
                    "anneal_steps": 5},
}
SWEEP_ID = f"test{uuid.uuid4().hex[:6]}"


def _workdir(tmp):
    """A folder laid out like the repository (scripts and configs linked): the agent runs
    `python train.py` with relative paths from where it was started."""
    for f in glob.glob(os.path.join(ROOT, "*.py")) + [os.path.join(ROOT, "configs")]:
        os.symlink(f, os.path.join(tmp, os.path.basename(f)))
    return tmp


def _agent_run(work, cfg, values, run_id, wandb_mode):
    """Run one proposal the way `wandb agent` does; returns (proc, out_dir, values)."""
    values = {**values, **TINY[cfg["program"]]}
    from wandb.sdk.lib import config_util

    param_path = os.path.join(work, "wandb", f"sweep-{SWEEP_ID}", f"config-{run_id}.yaml")
    config_util.save_config_file_from_dict(param_path, {k: {"value": v}
                                                        for k, v in values.items()})
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE=wandb_mode, WANDB_SILENT="true", WANDB_SWEEP_ID=SWEEP_ID,
               WANDB_RUN_ID=run_id, WANDB_SWEEP_PARAM_PATH=param_path, WANDB_DIR=work,
               MPLBACKEND="Agg", TQDM_DISABLE="1")
    command = [sys.executable if c == "python" else c for c in agent_command(cfg, values)]
    proc = subprocess.run(command, cwd=work, env=env, text=True,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=180)
    return proc, os.path.join(work, "runs", f"sweep-{SWEEP_ID}", run_id), values


@pytest.fixture(scope="module")
def agent_runs(tmp_path_factory):
    """The first proposal of every sweep file, run as an agent would, two at a time on the
    two cores (SWEEP_TEST_JOBS=1: one at a time). grid.yaml's run logs to wandb offline (an
    agent's run is online; there is no server here), the others with WANDB_MODE=disabled,
    which saves about 2 CPU-seconds each."""
    work = _workdir(str(tmp_path_factory.mktemp("agent")))
    jobs = []
    for path, name in zip(SWEEP_FILES, NAMES):
        cfg = load(path)
        jobs.append((name, cfg, proposals(cfg, 1)[0], name.split(".")[0].replace("_", "")))
    workers = int(os.environ.get("SWEEP_TEST_JOBS", "2"))
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        futures = {j[3]: (j[0], ex.submit(_agent_run, work, j[1], j[2], j[3],
                                          "offline" if j[0] == "grid.yaml" else "disabled"))
                   for j in jobs}
    out = {}
    for run_id, (name, fut) in futures.items():
        out.setdefault(name, []).append(fut.result())
    return work, out


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_agent_command_runs_and_logs_the_metric(agent_runs, name):
    cfg = load(os.path.join(ROOT, "sweeps", name))
    metric = cfg["metric"]["name"]
    for proc, out_dir, values in agent_runs[1][name]:
        assert proc.returncode == 0, proc.stderr[-2000:]
        with open(os.path.join(out_dir, "summary.json")) as fh:
            summary = json.load(fh)
        assert isinstance(summary.get(metric), float) and math.isfinite(summary[metric]), \
            f"{metric} not in {sorted(summary)}"
        # the resolved configuration is logged with the run: every swept value is in it
        with open(os.path.join(out_dir, "config.json")) as fh:
            logged = json.load(fh)
        for k, v in values.items():
            if k != "config":
                assert logged[k] == v or math.isclose(float(logged[k]), float(v)), k
        assert logged["out_dir"] == os.path.join("runs", f"sweep-{SWEEP_ID}",
                                                 os.path.basename(out_dir))
        # ... and reproduces the run as a --config file (its own folders taken out)
        again = {k: v for k, v in logged.items() if k not in ("out_dir", "image_dir")}
        with open(os.path.join(out_dir, "again.json"), "w") as fh:
            json.dump(again, fh)
        args, err = parse_as_program(cfg["program"], ["--config", fh.name])
        assert err == "", err
        for k, v in again.items():
            got = getattr(args, k)
            assert k == "config" or (list(got) if isinstance(got, tuple) else got) == v, k
        # and went to wandb (offline here: an agent's run is online), under the agent's run id
        run_id = os.path.basename(out_dir)
        assert name != "grid.yaml" or glob.glob(os.path.join(out_dir, "wandb", f"offline-run-*-{run_id}")), \
            proc.stderr[-2000:]


@pytest.mark.slow
def test_gather_builds_the_table_and_skips_unfinished_and_foreign(agent_runs, capsys,
                                                                  tmp_path):
    work, _ = agent_runs
    sweep_dir = os.path.join(work, "runs", f"sweep-{SWEEP_ID}")
    os.makedirs(os.path.join(sweep_dir, "notes"))                         # foreign
    unfinished = os.path.join(sweep_dir, "unfinished")
    os.makedirs(unfinished)
    with open(os.path.join(unfinished, "config.json"), "w") as fh:
        json.dump({"estimator": "fce", "flow": "maf", "dataset": "rings", "seed": 0}, fh)
    # a second seed of grid.yaml's first cell (a copy with another seed and KL), so that
    # a (label, dataset) has two runs to average: one more real run would cost ~8 CPU-s
    first = os.path.join(sweep_dir, "grid")
    second = os.path.join(sweep_dir, "grid-seed1")
    shutil.copytree(first, second, ignore=shutil.ignore_patterns("wandb", "*.pt"))
    for f, change in (("config.json", {"seed": 1}), ("summary.json", {"kl_ebm": 0.5})):
        with open(os.path.join(second, f)) as fh:
            d = json.load(fh)
        d.update(change)
        with open(os.path.join(second, f), "w") as fh:
            json.dump(d, fh)
    stopped = os.path.join(sweep_dir, "stopped")  # train_mcmc.py writes a summary on Ctrl-C
    shutil.copytree(os.path.join(sweep_dir, "mcmcregimes"), stopped,
                    ignore=shutil.ignore_patterns("wandb", "*.pt"))
    with open(os.path.join(stopped, "summary.json"), "w") as fh:
        json.dump({"status": "interrupted", "step": 2, "kl_ebm": 9.0}, fh)
    broken = os.path.join(sweep_dir, "broken")
    os.makedirs(broken)
    for f, text in (("config.json", "{}"), ("summary.json", "{not json")):
        with open(os.path.join(broken, f), "w") as fh:
            fh.write(text)

    rows = gather.collect([sweep_dir, os.path.join(work, "nosuchdir")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("gather: skip ") for line in err), err
    assert sum("unfinished" in line for line in err) == 1
    assert sum("status interrupted" in line for line in err) == 1
    labels = {(r["label"], r["dataset"]) for r in rows}
    assert ("nce", "8gaussians") in labels  # grid.yaml's first cell, seeds 0 and 1
    assert len(rows) == len(SWEEP_FILES) + 1
    assert {r["label"] for r in rows if r["run_dir"].endswith("mcmcregimes")} \
        == {"mcmc_gmm_convergent"}

    keys = ["kl_ebm", "nll_flow"]
    agg = gather.aggregate(rows, keys)
    nce = next(a for a in agg if a["label"] == "nce")
    seeds = [r for r in rows if r["label"] == "nce"]
    assert nce["n"] == 2 and nce["seeds"] == [0, 1]
    vals = [r["kl_ebm"] for r in seeds]
    assert math.isclose(nce["kl_ebm"], sum(vals) / 2)
    assert math.isclose(nce["kl_ebm_sd"], abs(vals[0] - vals[1]) / math.sqrt(2))
    table = gather.markdown(agg, keys).splitlines()
    assert table[0] == "| estimator | dataset | seeds | kl_ebm | nll_flow |"
    assert len(table) == 2 + len(agg)
    row = next(line for line in table if line.startswith("| nce | 8gaussians | 2 |"))
    assert "±" in row
    mle = next(line for line in table if line.startswith("| mle-nsf"))
    assert "n/a" in mle  # the flow alone has no EBM

    # the CLI: the same table on stdout, a figure
    fig = os.path.join(tmp_path, "fig.png")
    code = gather.main([sweep_dir, "--keys", *keys, "--figure", fig])
    out = capsys.readouterr().out
    assert code == 0 and out.strip() == "\n".join(table) and os.path.getsize(fig) > 0
