"""A run's record (`config.json`, `metrics.jsonl`, `summary.json`) and wandb, which never
stops a run (modes and fallbacks: docs/architecture.md, "The run scaffold")."""
import json
import math
import os
import sys


def _jsonable(v):
    v = v.item() if hasattr(v, "item") else v
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


def _logged_in(wandb):
    try:
        return bool(wandb.login(prompt=False, verify=False))
    except Exception:
        return False


def _start_wandb(mode, kwargs):
    """(wandb, its run, offline) by wandb.init in `mode` (online falls back to offline), or
    a message and (None, None, False)."""
    try:
        import wandb
    except ImportError:
        print("wandb is not installed: logging to metrics.jsonl only", file=sys.stderr)
        return None, None, False
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE", "").strip() or (
            "online" if _logged_in(wandb) else "offline")
    elif mode == "online" and not _logged_in(wandb):
        print("wandb: no API key configured (run `wandb login`); logging offline",
              file=sys.stderr)
        mode = "offline"
    for mode in {"online": ("online", "offline"), "disabled": ()}.get(mode, (mode,)):
        try:
            run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=60, silent=True),
                             **kwargs)
            return wandb, run, mode == "offline"
        except Exception as e:
            print(f"wandb {mode} failed to start ({type(e).__name__}: {e}); logging "
                  f"{'offline' if mode == 'online' else 'to metrics.jsonl only'}",
                  file=sys.stderr)
    return None, None, False


class RunLogger:
    """config.json now, a metrics.jsonl row per `log`, mirrored to wandb; a fresh run starts
    the files anew, a resumed one keeps the rows up to its `resume_step`."""

    def __init__(self, out_dir, config, mode="auto", project="ebm-flows", name=None,
                 run_id=None, resume_step=None):
        self.out_dir, self.metrics_path = out_dir, os.path.join(out_dir, "metrics.jsonl")
        with open(os.path.join(out_dir, "config.json"), "w") as fh:
            json.dump(config, fh, indent=2, sort_keys=True, default=str)
        kept, summary = [], os.path.join(out_dir, "summary.json")
        if resume_step is None and os.path.isfile(summary):
            os.remove(summary)
        elif resume_step is not None and os.path.isfile(self.metrics_path):
            with open(self.metrics_path) as fh:
                kept = [ln for ln in fh if ln.strip() and json.loads(ln)["step"] <= resume_step]
        self._fh = open(self.metrics_path, "w")
        self._fh.writelines(kept)
        self.wandb, self.run, self.offline = None, None, False
        if mode != "disabled":
            self.wandb, self.run, self.offline = _start_wandb(mode, dict(
                project=project, name=name, config=config, dir=out_dir,
                reinit="finish_previous", id=run_id, resume="allow" if run_id else None))

    @property
    def run_id(self):
        """The wandb run id (kept in checkpoints: a resumed run continues it), or None."""
        return getattr(self.run, "id", None)

    def _guard(self, fn):
        """Call fn() unless wandb is off; an exception inside wandb switches it off."""
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:
            print(f"wandb error ({e}); wandb switched off for this run, "
                  f"metrics.jsonl continues", file=sys.stderr)
            self.run = None

    def log(self, metrics, step):
        """Append {"step": step, **metrics} to metrics.jsonl and send it to wandb."""
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        self._guard(lambda: self.run.log(dict(metrics), step=int(step)))

    def log_image(self, key, path, step):
        """Log a saved figure by file path (no re-rendering)."""
        self._guard(lambda: self.run.log({key: self.wandb.Image(path)}, step=int(step)))

    def summary(self, metrics):
        """Final numbers: `summary.json` and the wandb summary."""
        with open(os.path.join(self.out_dir, "summary.json"), "w") as fh:
            json.dump({k: _jsonable(v) for k, v in metrics.items()}, fh, indent=2)
        self._guard(lambda: self.run.summary.update(dict(metrics)))

    def finish(self):
        """Close metrics.jsonl and the wandb run (again: nothing)."""
        if self._fh.closed:
            return
        self._fh.close()
        run_dir = getattr(self.run, "dir", None)
        self._guard(lambda: self.run.finish())
        self.run = None
        if self.offline and run_dir:
            print(f"wandb: logged offline; upload with `wandb sync {os.path.dirname(run_dir)}`",
                  file=sys.stderr)


def read_metrics(out_dir):
    """The rows of `metrics.jsonl` in a run directory, as dicts."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]
