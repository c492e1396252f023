"""Rewrite old run folders to the current format, in place; the one home of old-run shims.

    python migrate.py runs/<run> [more runs]

What changed over time, and what is rewritten (each change is reported per run):
- the saved config (config.json and the checkpoint's): renamed flags under their new names
  (`config.rename`: train_mcmc.py --n_iter -> --steps, train_tilt.py --data -> --dataset);
  train.py configs from before --estimator get the estimator they always meant (nce with a
  Gaussian flow, else fce); flags added later get the current script's defaults (train.py
  as `train.resolve_estimator` fills them; --image_dir the scaffold's default folder).
- the CPU clock `cpu_s`, once train_mcmc.py's `cpu_sec`, train_vi.py's `seconds`,
  train_tilt.py's `time_total_s`: renamed in summary.json, metrics.jsonl and the checkpoint.
- summary.json: train_mcmc.py's `step` -> `steps` (iterations run, as train.py's);
  train.py's `flow_step_fraction` (flow_steps / steps) added; on the digits, an EBM's AIS
  bracket from the old atanh coordinates (no `ais_coordinates` tag 2) is dropped, so
  `python -m bench.digits` computes it again, and the tag itself goes; `ll_ebm` and the
  verdict `ll_ebm_trusted` (tasks.trust) are added where a current bracket predates them.
- a checkpoint that does not name its script gets the script its config says.
A train.py checkpoint from before --rule (the mixed-noise step rule, gone) cannot become a
current one: it is reported and left as is (its config.json and summary are migrated).
Running it again changes nothing ("up to date"). A folder that is not a run (no config.json
and no checkpoint.pt) is refused in one line, exit status 2, before any file is written.
"""
import argparse
import importlib
import json
import os
import sys

import checkpoint
import config
import logger
import scaffold

CLOCKS = ("cpu_sec", "seconds", "time_total_s")  # old names of cpu_s
AIS_TAG = ("ais_coordinates", 2)  # the old tag of brackets in whitened atanh coordinates
BRACKET = ("ll_ebm_lower", "ll_ebm_upper", "ais_gap", "bpd_ebm_lower", "bpd_ebm_upper",
           "log_Z_ais", "log_Z_ais_reverse", "ais_ess", "ais_acceptance", "c_gap", "ll_ebm",
           "ll_ebm_trusted", "ais_coordinates")  # a digits EBM's AIS bracket (tasks.Images)
# the config keys that tell which script wrote a run whose checkpoint does not say
SIGNS = (("train_vi.py", ("target", "K")), ("train_tilt.py", ("experiment",)),
         ("train_mcmc.py", ("L", "init")), ("train.py", ("epoch",)))


def script_of(cfg, ckpt):
    """The entry script that wrote a run: its checkpoint's `script`, else told by its config."""
    if ckpt is not None and ckpt.get("script"):
        return ckpt["script"]
    return next((s for s, keys in SIGNS if all(k in cfg for k in keys)), None)


def migrate_config(cfg, script, run_dir, where):
    """Bring a saved config (a dict, changed in place) to the current flags of `script`;
    returns the changes as text, each prefixed by `where`."""
    module = importlib.import_module(script[:-3])
    now = {a.dest: a.default for a in module.build_parser()._actions  # (fills config.RENAMED)
           if a.default is not argparse.SUPPRESS}
    changes = []
    for old, new in config.RENAMED.items():
        if old in cfg and new in now and old not in now:
            cfg[new] = cfg.pop(old)
            changes.append(f"{where}: --{old} -> --{new}")
    if script == "train.py" and "estimator" not in cfg:
        cfg["estimator"] = "nce" if cfg.get("flow") == "gaussian" else "fce"
        changes.append(f"{where}: estimator {cfg['estimator']} (from before --estimator)")
    old_rule = script == "train.py" and "rule" not in cfg
    now["image_dir"] = cfg.get("image_dir") or scaffold.default_image_dir(run_dir)
    missing = [k for k in now if k not in cfg and not (old_rule and k == "rule")]
    if script == "train.py" and missing:
        now = vars(module.resolve_estimator(argparse.Namespace(**{**now, **cfg})))
    for k in missing:
        cfg[k] = now[k]
    if missing:
        changes.append(f"{where}: defaults of later flags {', '.join(sorted(missing))}")
    return changes


def migrate_clock(d, where):
    """The CPU clock under its current name `cpu_s` in a dict (changed in place)."""
    changes = []
    for old in CLOCKS:
        if old in d:
            value = d.pop(old)
            d.setdefault("cpu_s", value)
            changes.append(f"{where}: {old} -> cpu_s")
    return changes


def migrate_summary(summary, script, cfg):
    """summary.json (a dict, changed in place) in the current keys; returns the changes."""
    changes = migrate_clock(summary, "summary.json")
    if script == "train_mcmc.py" and "step" in summary and "steps" not in summary:
        summary["steps"] = summary.pop("step")
        changes.append("summary.json: step -> steps")
    if script == "train.py" and summary.get("steps") and "flow_steps" in summary \
            and "flow_step_fraction" not in summary:
        summary["flow_step_fraction"] = summary["flow_steps"] / summary["steps"]
        changes.append("summary.json: flow_step_fraction added")
    if "ll_ebm_lower" in summary and "ll_ebm_trusted" not in summary:
        if summary.get(AIS_TAG[0]) != AIS_TAG[1]:
            for k in BRACKET:
                summary.pop(k, None)
            return changes + ["summary.json: AIS bracket in the old atanh coordinates dropped "
                              "(python -m bench.digits computes it again)"]
        import tasks
        summary.setdefault("ll_ebm", summary["ll_ebm_upper"])
        summary.update(tasks.trust(summary["ll_ebm_upper"], summary["ll_ebm_lower"],
                                   summary["ais_gap"], summary["ais_ess"], cfg["ais_chains"],
                                   summary.get("ll_ebm_c")))
        changes.append("summary.json: ll_ebm, ll_ebm_trusted added")
    if summary.pop(AIS_TAG[0], None) is not None:
        changes.append(f"summary.json: {AIS_TAG[0]} tag dropped")
    return changes


def migrate_checkpoint(ckpt, script, run_dir):
    """A checkpoint (a dict, changed in place) in the current format; returns the changes."""
    changes = []
    if "script" not in ckpt:
        ckpt["script"] = script
        changes.append(f"checkpoint.pt: script {script}")
    if script == "train.py" and "rule" not in ckpt["config"]:
        return changes + ["checkpoint.pt: trained with the old step rule (accuracy on the "
                          "mixed noise), which is gone: it cannot be resumed; start a new run"]
    return (changes + migrate_clock(ckpt, "checkpoint.pt")
            + migrate_config(ckpt["config"], script, run_dir, "checkpoint.pt"))


def _read(path):
    """A JSON file's contents, or None when it does not exist."""
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def migrate(run_dir):
    """Rewrite one run folder in place; returns the list of changes (empty: up to date)."""
    paths = {f: os.path.join(run_dir, f) for f in ("config.json", "summary.json",
                                                    "metrics.jsonl", "checkpoint.pt")}
    ckpt = None
    if os.path.isfile(paths["checkpoint.pt"]):
        try:
            ckpt = checkpoint.load_checkpoint(paths["checkpoint.pt"])
        except checkpoint.CheckpointError as e:
            config.fail(f"{run_dir}: {e}; nothing changed")
    cfg = _read(paths["config.json"])
    script = script_of(cfg if cfg is not None else ckpt["config"], ckpt)
    if script is None:
        config.fail(f"{run_dir}: cannot tell which script wrote this run; nothing changed")
    changes, out = [], {}
    if cfg is not None:
        changes += migrate_config(cfg, script, run_dir, "config.json")
        out["config.json"] = lambda fh: json.dump(cfg, fh, indent=2, sort_keys=True, default=str)
    summary = _read(paths["summary.json"])
    if summary is not None:
        changes += migrate_summary(summary, script, cfg or ckpt["config"])
        out["summary.json"] = lambda fh: json.dump(summary, fh, indent=2)
    rows = logger.read_metrics(run_dir) if os.path.isfile(paths["metrics.jsonl"]) else []
    if [r for r in rows if migrate_clock(r, "metrics.jsonl")]:
        changes.append("metrics.jsonl: old clock -> cpu_s")
        out["metrics.jsonl"] = lambda fh: fh.writelines(json.dumps(r) + "\n" for r in rows)
    if ckpt is not None:
        done = migrate_checkpoint(ckpt, script, run_dir)
        changes += done
        if any("cannot be resumed" not in c for c in done):
            checkpoint.save_checkpoint(paths["checkpoint.pt"], ckpt)
    for name, write in out.items():
        if any(c.startswith(name) for c in changes):
            with open(paths[name] + ".tmp", "w") as fh:
                write(fh)
            os.replace(paths[name] + ".tmp", paths[name])
    return changes


def main(argv=None):
    p = config.Parser(description="Rewrite old run folders to the current format (in place)")
    p.add_argument("runs", nargs="+", help="run folders (runs/<run>)")
    args = p.parse_args(argv)
    for run_dir in args.runs:
        if not any(os.path.isfile(os.path.join(run_dir, f))
                   for f in ("config.json", "checkpoint.pt")):
            config.fail(f"{run_dir} is not a run folder (no config.json or checkpoint.pt); "
                        f"pass runs/<run>")
    for run_dir in args.runs:
        changes = migrate(run_dir)
        print(f"{run_dir}: " + ("; ".join(changes) if changes else "up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(config.cli(main))
