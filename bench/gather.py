"""Gather finished runs into one table: from local run folders or from a wandb sweep.

    python -m bench.gather runs/bench --keys kl_ebm nll_ebm nll_flow cpu_s
    python -m bench.gather runs/sweep-abc123 --by lr_ebm lr_flow threshold --keys kl_ebm
    python -m bench.gather --wandb entity/project/sweep_id --keys kl_ebm nll_flow --out table.md

A run folder is one with a `config.json` (the resolved flags every entry script writes); it is
finished when it also has `summary.json` (written only at the end of a run). Each finished run
becomes one row: its label (estimator and flow for train.py, e.g. `fce-maf`, `nce`, `mle-nsf`;
see `label`), dataset, seed, run_dir and every numeric key of its summary. Unfinished runs and
folders that are not runs are skipped with one line each on stderr; nothing here raises on a
bad folder. Rows of the same (label, dataset) over seeds become mean +- sd (sample standard
deviation, n - 1), the table `bench/fce.py` prints. The wandb route reads the same config and
summary from the server (`wandb.Api()`), so a grid run by agents on many machines ends in the
same table.

    rows = collect(["runs/bench-20261201"])
    agg = aggregate(rows, ["kl_ebm", "nll_flow"])
    print(markdown(agg, ["kl_ebm", "nll_flow"]))
"""
import argparse
import glob
import json
import math
import os
import statistics
import sys

if not __package__:  # run as a file (python bench/x.py): the repository root, not bench/, first
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import config  # standard library only: gathering needs no torch

# table order: estimators and flows as in bench/fce.py, datasets as in datasets.NAMES (kept here
# so that gathering needs neither torch nor the datasets module)
ESTIMATOR_ORDER = ("nce", "fce", "mle", "dsm", "ssm")
FLOW_ORDER = ("gaussian", "maf", "glow", "nsf", "nsf_coupling")
DATASET_ORDER = ("8gaussians", "spiral", "2spirals", "checkerboard", "rings", "pinwheel",
                 "moons", "circles", "swissroll", "gmm", "rings4")
DEFAULT_KEYS = ("kl_ebm", "nll_ebm", "kl_flow", "nll_flow", "cpu_s")


def note(message):
    """One line on stderr for a skipped run or folder."""
    print(f"gather: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- one run
def label(cfg, by=()):
    """The row label of a run from its resolved config.

    train.py: `nce` (EBM against a fixed Gaussian: --estimator=nce or --flow=gaussian),
    `fce-<flow>` (EBM against a learned flow), `mle-<flow>` (flow alone) (configs from before
    --estimator: `python migrate.py` labels them). train_vi.py: `<flow>-K<K>`. Other scripts: the stem of their --config file
    (e.g. `mcmc_gmm_convergent`), else their --name / --experiment, else `run`. `by` appends
    `flag=value` for the named flags, to tell a hyper-parameter search's points apart."""
    est, flow = cfg.get("estimator"), cfg.get("flow")
    if "target" in cfg and "K" in cfg:  # train_vi.py
        out = f"{flow}-K{cfg['K']}"
    elif est == "nce" or flow == "gaussian":  # a fixed Gaussian noise model is NCE
        out = "nce"
    elif est is not None:
        out = f"{est}-{flow}" if flow else str(est)
    elif cfg.get("config"):
        out = os.path.splitext(os.path.basename(str(cfg["config"])))[0]
    else:
        out = str(cfg.get("name") or cfg.get("experiment") or "run")
    for k in by:
        if k in cfg:
            v = cfg[k]
            out += f" {k}={' '.join(map(str, v)) if isinstance(v, list) else v}"
    return out


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def row(cfg, summary, run_dir, by=()):
    """One table row from a run's config and summary (numeric summary keys only)."""
    out = {"label": label(cfg, by),
           "dataset": str(cfg.get("target") or cfg.get("experiment") or cfg.get("dataset")
                          or "-"),
           "seed": cfg.get("seed"), "run_dir": run_dir}
    for k, v in summary.items():
        if k in out or k.startswith("_"):  # wandb's own _step, _runtime, _timestamp
            continue
        if is_number(v):
            out[k] = v
        elif isinstance(v, str) and v.lower() in ("nan", "inf", "-inf"):
            out[k] = float(v)  # logger.py stores non-finite floats as text
    return out


def _read_json(path):
    with open(path) as fh:
        return json.load(fh)


def _run_dirs(path, depth=0):
    """Run folders (those with config.json) at `path` or up to two levels below it."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return [path]
    if depth >= 2 or not os.path.isdir(path):
        return []
    out = []
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        note(f"skip {path}: cannot list it ({e.strerror})")
        return []
    for name in names:
        sub = os.path.join(path, name)
        if os.path.isdir(sub) and not name.startswith("."):
            found = _run_dirs(sub, depth + 1)
            if not found and depth == 0 and name != "wandb":
                note(f"skip {sub}: not a run folder (no config.json)")
            out += found
    return out


def collect(paths, by=()):
    """Rows of the finished runs found at `paths` (run folders, or folders holding them).

    Skips, with one line each on stderr: paths that do not exist, folders without
    config.json (foreign), runs without summary.json (unfinished), unreadable JSON."""
    rows = []
    for path in paths:
        if not os.path.exists(path):
            note(f"skip {path}: no such file or folder")
            continue
        if not os.path.isdir(path):
            note(f"skip {path}: not a folder")
            continue
        dirs = _run_dirs(path)
        if not dirs and not os.path.isfile(os.path.join(path, "config.json")):
            note(f"skip {path}: no run folders (with config.json) in it")
        for d in dirs:
            summary_path = os.path.join(d, "summary.json")
            if not os.path.isfile(summary_path):
                note(f"skip {d}: unfinished (no summary.json)")
                continue
            try:
                cfg, summary = _read_json(os.path.join(d, "config.json")), _read_json(summary_path)
            except (OSError, ValueError) as e:
                note(f"skip {d}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]})")
                continue
            if not isinstance(cfg, dict) or not isinstance(summary, dict):
                note(f"skip {d}: config.json or summary.json is not a JSON object")
                continue
            if summary.get("status", "done") != "done":  # train_mcmc.py: interrupted, nan
                note(f"skip {d}: not finished (status {summary['status']})")
                continue
            rows.append(row(cfg, summary, d, by))
    return rows


def from_wandb(path, by=(), api=None):
    """Rows of the finished runs of a wandb sweep (`entity/project/sweep_id`) or project
    (`entity/project`), read with `wandb.Api()`. Needs a logged-in machine that reaches the
    server; otherwise raises RuntimeError with a one-line message. Runs that are not finished
    are skipped with one line each on stderr. `api` replaces `wandb.Api()` (tests)."""
    parts = [p for p in str(path).strip("/").split("/") if p]
    if len(parts) == 4 and parts[2] == "sweeps":  # as in a sweep's URL
        del parts[2]
    if len(parts) not in (2, 3):
        raise RuntimeError(f"--wandb expects entity/project or entity/project/sweep_id, "
                           f"got {path!r}")
    if api is None:
        try:
            import wandb
        except ImportError:
            raise RuntimeError("wandb is not installed: pip install wandb") from None
        mode = os.environ.get("WANDB_MODE", "").strip().lower()
        if mode in ("offline", "disabled", "dryrun"):
            raise RuntimeError(f"WANDB_MODE={mode}: reading a sweep needs the server; unset it "
                               f"or gather the local run folders instead")
        try:
            logged_in = bool(wandb.login(prompt=False, verify=False))
        except Exception:
            logged_in = False
        if not logged_in:
            raise RuntimeError("wandb: no API key configured; run `wandb login` (or set "
                               "WANDB_API_KEY), or gather the local run folders instead")
        try:
            api = wandb.Api(timeout=30)
        except Exception as e:
            raise RuntimeError(f"wandb.Api() failed: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from None
    try:
        if len(parts) == 3:
            runs = list(api.sweep("/".join(parts)).runs)
        else:
            runs = list(api.runs("/".join(parts)))
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise RuntimeError(f"wandb: could not read {'/'.join(parts)} "
                           f"({type(e).__name__}: {msg})") from None
    rows = []
    for run in runs:
        where = f"{'/'.join(parts[:2])}/{run.id}"
        if getattr(run, "state", "finished") != "finished":
            note(f"skip {where}: {run.state}")
            continue
        summary = getattr(run.summary, "_json_dict", None) or dict(run.summary)
        cfg = {k: v for k, v in dict(run.config).items() if not k.startswith("_")}
        rows.append(row(cfg, summary, where, by))
    return rows


# ----------------------------------------------------------------------------- table
def _order(label_, dataset):
    parts = label_.split(" ")[0].split("-", 1)
    est = ESTIMATOR_ORDER.index(parts[0]) if parts[0] in ESTIMATOR_ORDER else len(ESTIMATOR_ORDER)
    flow = parts[1] if len(parts) > 1 else ""
    fl = FLOW_ORDER.index(flow) if flow in FLOW_ORDER else len(FLOW_ORDER)
    ds = DATASET_ORDER.index(dataset) if dataset in DATASET_ORDER else len(DATASET_ORDER)
    return (est, fl, label_, ds, dataset)


def aggregate(rows, keys):
    """Mean and sample sd over seeds for each (label, dataset) and key.

    Returns a list of dicts {label, dataset, n (runs), seeds, <key>: mean, <key>_sd: sd,
    <key>_n: runs that have the key}; sd is nan for a single run, a key no run has is left
    out. Ordered by estimator, flow, dataset as bench/fce.py lists them."""
    groups = {}
    for r in rows:
        groups.setdefault((r["label"], r["dataset"]), []).append(r)
    out = []
    for (lab, ds), rs in sorted(groups.items(), key=lambda kv: _order(*kv[0])):
        a = {"label": lab, "dataset": ds, "n": len(rs),
             "seeds": sorted((r.get("seed") for r in rs), key=lambda s: (s is None, str(s)))}
        for k in keys:
            vals = [float(r[k]) for r in rs if k in r and is_number(r[k])]
            if not vals:
                continue
            a[k] = statistics.fmean(vals)
            a[f"{k}_sd"] = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            a[f"{k}_n"] = len(vals)
        out.append(a)
    return out


def _decimals(v):
    v = abs(v)
    return 0 if v >= 100 else 2 if v >= 10 else 3 if v >= 1 else 4


def cell(a, k):
    """`mean ± sd` (sd left out for one run), or n/a."""
    if k not in a:
        return "n/a"
    m, sd = a[k], a[f"{k}_sd"]
    if not math.isfinite(m):
        return str(m)
    d = 0 if float(m).is_integer() and (sd == 0 or not math.isfinite(sd)) else _decimals(m)
    return f"{m:.{d}f}" if not math.isfinite(sd) else f"{m:.{d}f} ± {sd:.{d}f}"


def text(v):
    """One table cell as text: strings as they are (benches format their own numbers), None
    as n/a, integers plain, other numbers with the decimals of `cell` (4 below 1, 3 below 10,
    2 below 100, else none)."""
    if isinstance(v, str):
        return v
    if v is None:
        return "n/a"
    if isinstance(v, int) or not math.isfinite(v):
        return str(v)
    return f"{v:.{_decimals(v)}f}"


def table_line(cells):
    """One markdown table line: `| a | b |` (an empty cell stays `| |`)."""
    return "|" + "|".join(f" {t} " if t else " " for t in map(text, cells)) + "|"


def table(header, rows, align="---"):
    """The lines of a markdown table: the header, its alignment line (`align` for every
    column, or one string per column, e.g. `---:` right-aligned) and one line per row; cells
    as in `text`. The one table writer of every bench."""
    aligns = [align] * len(header) if isinstance(align, str) else list(align)
    return [table_line(header), "|" + "|".join(aligns) + "|"] + [table_line(r) for r in rows]


def markdown(agg, keys):
    """A README-style markdown table: one row per (label, dataset), mean ± sd over seeds."""
    return "\n".join(table(["estimator", "dataset", "seeds", *keys],
                           [[a["label"], a["dataset"], a["n"], *(cell(a, k) for k in keys)]
                            for a in agg]))


def figure(agg, key, path):
    """Grouped bars of `key` (mean ± sd over seeds): one group per dataset, one bar per label.
    Returns the path, or None (with a note) when no run has the key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(a["label"] for a in agg if key in a))
    data = list(dict.fromkeys(a["dataset"] for a in agg if key in a))
    if not labels:
        note(f"no figure: no run has {key!r}")
        return None
    w = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(data) + 1), 3.2))
    for i, lab in enumerate(labels):
        xs, ms, sds = [], [], []
        for j, ds in enumerate(data):
            a = next((a for a in agg if a["label"] == lab and a["dataset"] == ds and key in a),
                     None)
            if a is not None:
                xs.append(j + (i - (len(labels) - 1) / 2) * w)
                ms.append(a[key])
                sds.append(a[f"{key}_sd"] if math.isfinite(a[f"{key}_sd"]) else 0.0)
        ax.bar(xs, ms, w, yerr=sds, capsize=2, label=lab)
    means = [a[key] for a in agg if key in a and math.isfinite(a[key])]
    if means and min(means) > 0 and max(means) > 20 * min(means):
        ax.set_yscale("log")  # KLs of different datasets span decades
    ax.set_xticks(range(len(data)), data, rotation=30, ha="right")
    ax.set_ylabel(f"{key} (mean ± sd over seeds)")
    ax.legend(fontsize=7, ncols=min(len(labels), 5))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- CLI
def build_parser():
    p = config.Parser(description=__doc__.split("\n")[0],  # one-line errors, exit 2
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="\n".join(__doc__.split("\n")[1:5]))
    p.add_argument("paths", nargs="*", help="run folders or folders holding them (globs too)")
    p.add_argument("--wandb", nargs="+", default=None, metavar="ENTITY/PROJECT[/SWEEP_ID]",
                   help="read the runs of sweeps (or projects) from the wandb server")
    p.add_argument("--keys", nargs="+", default=None,
                   help=f"summary keys to tabulate (default: those of {' '.join(DEFAULT_KEYS)} "
                        f"that the runs have, else every numeric key)")
    p.add_argument("--by", nargs="+", default=(),
                   help="flags that split a label (a search's hyper-parameters)")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    p.add_argument("--figure", default=None, help="bar chart of the first key to this PNG")
    p.add_argument("--json", default=None, help="also write the rows (one per run) as JSON")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    prog = "bench/gather.py"
    if not args.paths and not args.wandb:
        p.error("give run folders or --wandb entity/project/sweep_id")
    rows = []
    if args.paths:
        paths = [m for pat in args.paths for m in (sorted(glob.glob(pat)) or [pat])]
        rows += collect(paths, args.by)
    if args.wandb:
        for path in args.wandb:
            try:
                rows += from_wandb(path, args.by)
            except RuntimeError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                return 2
    if not rows:
        print(f"{prog}: error: no finished runs found", file=sys.stderr)
        return 1
    keys = args.keys
    if not keys:
        have = {k for r in rows for k in r}
        keys = [k for k in DEFAULT_KEYS if k in have] or sorted(
            k for k in have if k not in ("seed",) and any(is_number(r.get(k)) for r in rows))
    agg = aggregate(rows, keys)
    table = markdown(agg, keys)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1, default=str)
    if args.figure and figure(agg, keys[0], args.figure):
        print(f"wrote {args.figure}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(config.cli(main))
