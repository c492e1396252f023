"""How every benchmark names, runs and times its training runs.

- names: `run_name(label, dataset, ..., seed=s)` is `<label>-<dataset>-...-s<seed>`, the run's
  folder under the benchmark's root;
- runs: `run_script` starts one training script of the repository in its own process (one
  thread, wandb off): a finished run (summary.json) is kept and skipped, an interrupted one
  (checkpoint.pt) resumed, anything else started afresh; `run_many` runs several at a time;
  after Ctrl-C no new run starts (`Stopped`) and the benchmark exits 130 (`stopped`);
- time: `cpu_seconds(summary)` is the CPU seconds of training a run's summary.json holds,
  under `cpu_s` (every script; `python migrate.py` renames the old keys of older runs).
Tables are written by bench/gather.py (`aggregate`, `markdown`; `table` for every other
table of a bench).
"""
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from scaffold import INTERRUPTED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


class Stopped(Exception):
    """Ctrl-C during a benchmark: its runs keep what they saved; start no new one."""


def finished(run_dir):
    """The summary of a finished run (summary.json, with status "done" where the script
    writes a status), else None."""
    path = os.path.join(run_dir, "summary.json")
    try:
        with open(path) as fh:
            summary = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("status", "done") != "done":
        return None
    return summary


def run_script(script, run_dir, argv, log=None, resumable=True):
    """One run of a training script for a benchmark, in its own process (one thread, wandb
    off): a finished run is kept; an interrupted one (a checkpoint) is resumed with its saved
    configuration when the script can resume; anything else starts afresh in run_dir
    (--overwrite) with `argv`. Output goes to the file `log` (default: this terminal).
    Returns the exit status; raises Stopped after Ctrl-C (the run exits 130, having saved)."""
    if finished(run_dir):
        return 0
    if resumable and os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        flags = ["--resume", run_dir]
    else:
        flags = [*argv, "--out_dir", run_dir, "--overwrite", "--threads", "1",
                 "--wandb", "disabled"]
    return run_process([os.path.join(ROOT, script), *flags], log)


def run_process(argv, log=None):
    """`python argv...` for a benchmark (no progress bars, no display), output appended to
    the file `log` (default: this terminal); returns the exit status, raises Stopped after
    Ctrl-C (the child exits 130, having saved, or this process is interrupted)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "MPLBACKEND": "Agg"}
    out = open(log, "a") if log else None
    try:
        code = subprocess.run([sys.executable, *argv], stdout=out,
                              stderr=subprocess.STDOUT if out else None, env=env).returncode
    except KeyboardInterrupt:
        raise Stopped() from None
    finally:
        if out:
            out.close()
    if code in (INTERRUPTED, -signal.SIGINT):
        raise Stopped()
    return code


def run_many(fn, jobs, parallel=1):
    """[fn(job) for job in jobs], `parallel` at a time; after Ctrl-C (Stopped or
    KeyboardInterrupt) no new job starts, the running ones finish saving, and Stopped is
    raised."""
    stop = threading.Event()

    def guarded(job):
        if stop.is_set():
            return None
        try:
            return fn(job)
        except Stopped:
            stop.set()
            return None

    try:
        with ThreadPoolExecutor(parallel) as pool:
            try:
                results = list(pool.map(guarded, jobs))
            except KeyboardInterrupt:
                stop.set()
                raise
    except KeyboardInterrupt:
        raise Stopped() from None
    if stop.is_set():
        raise Stopped()
    return results


def stopped(script):
    """A benchmark's message after Ctrl-C; exit status 130."""
    print(f"\n{script}: interrupted; finished runs are kept and an interrupted run resumes: "
          f"run the same command to continue", file=sys.stderr)
    return INTERRUPTED


def run_name(*parts, seed=None):
    """`<part>-<part>-...[-s<seed>]`: the folder name of one benchmark run."""
    return "-".join(map(str, parts)) + ("" if seed is None else f"-s{seed}")


def cpu_seconds(summary, default=float("nan")):
    """CPU seconds of training in a run's summary (`default` when its script writes none)."""
    return summary.get("cpu_s", default)
