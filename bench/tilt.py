"""Benchmark of the tilting experiments over seeds: the results table of docs/tilt.md.

    python -m bench.tilt                    # seeds 0-7, prints the table, runs/bench_tilt/
    python -m bench.tilt --write_docs       # also replaces the table in docs/tilt.md and
                                            #   copies seed 0's figures to images/readme/
    python -m bench.tilt --report_only      # the table of the runs already finished

Per seed: `train_tilt.py --objective both --data_tilt` (digits) and
`train_tilt.py --experiment mixture`, one torch thread, wandb off. The table lists the TV
distance of the label histogram of 1,000 decoded samples to uniform(0-4) for the base VAE, the
maximum-likelihood latent tilt (SNIR and Langevin), the hackathon recipe and the data-space
tilt, and the 2D mixture's component-histogram TV to [.3, .4, .3], with stratified teaching
points (the default, exactly 30/40/30) and, for comparison, i.i.d. ones (`--mix_teaching iid`).
The time of a seed is the digits and default mixture runs' own time (cpu_s).

A run that finished (its summary.json exists) is kept and skipped; an unfinished one is
started again (train_tilt.py --overwrite), each in its own process. The table holds the
seeds whose three runs finished; docs/tilt.md and images/readme/ are written only when every seed finished, and
without any finished seed nothing is written (exit status 1).
"""
import json
import os
import shutil
import sys

if not __package__:  # run as a file (python bench/x.py): the repository root, not bench/, first
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np

import config
from bench import gather, runner

START, END = "<!-- bench_tilt:start -->", "<!-- bench_tilt:end -->"
DOCS = os.path.join("docs", "tilt.md")
# the runs of one seed: (folder name, train_tilt.py flags)
RUNS = (("digits", ["--objective", "both", "--data_tilt"]),
        ("mixture", ["--experiment", "mixture"]),
        ("mixture-iid", ["--experiment", "mixture", "--mix_teaching", "iid"]))
FIGURES = (("digits", ("label_histograms", "latent", "samples")), ("mixture", ("mixture",)))


def _summary(out, name, seed):
    return runner.finished(os.path.join(out, runner.run_name(name, seed=seed)))


def train_seed(seed, out):
    """The three runs of one seed (runner.run_script: a finished run is kept, anything else
    is started afresh; train_tilt.py has no resume). Returns False when a run did not finish
    (its log, <run folder>.log, says why); raises runner.Stopped after Ctrl-C."""
    ok = True
    for name, flags in RUNS:
        run = f"{out}/{runner.run_name(name, seed=seed)}"
        argv = ["--seed", str(seed), *flags, "--image_dir",
                f"{out}/images/{runner.run_name(name, seed=seed)}"]
        code = runner.run_script("train_tilt.py", run, argv, log=f"{run}.log",
                                   resumable=False)
        if code != 0:
            print(f"seed {seed}: train_tilt.py {' '.join(flags)} exited with status {code}; "
                  f"see {run}.log", file=sys.stderr)
            ok = False
    return ok


def collect(seed, out):
    """One table row from the seed's three summaries, or None if a run has not finished."""
    d, m, mi = (_summary(out, name, seed) for name, _ in RUNS)
    if d is None or m is None or mi is None:
        return None
    r = {**d, **m, **{f"iid_{k}": v for k, v in mi.items()}}
    r["seed"], r["wall_s"] = seed, runner.cpu_seconds(d) + runner.cpu_seconds(m)
    return r


def table(rows):
    f = lambda v: f"{v:.3f}"  # noqa: E731
    cells = [[f"{r['seed']}", f(r["tv_base"]), f"{f(r['tv_ml_snir'])} ({r['ess_ml']:.0f})",
              f(r["tv_ml_langevin"]), f(r["tv_hackathon_snir"]), f(r["tv_data_snir"]),
              f"{f(r['mix_tv'])} ({f(r['mix_tv_tilt_weights'])})",
              f"{f(r['iid_mix_tv'])} ({f(r['iid_mix_tv_tilt_weights'])}; "
              f"{f(r['iid_mix_tv_unbiased_sample'])})", f"{r['wall_s']:.0f}"] for r in rows]
    mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    worst = lambda k: max(r[k] for r in rows)  # noqa: E731
    cells.append(["mean", f(mean("tv_base")), f(mean("tv_ml_snir")), f(mean("tv_ml_langevin")),
                  f(mean("tv_hackathon_snir")), f(mean("tv_data_snir")),
                  f"{f(mean('mix_tv'))} ({f(mean('mix_tv_tilt_weights'))})",
                  f"{f(mean('iid_mix_tv'))} ({f(mean('iid_mix_tv_tilt_weights'))}; "
                  f"{f(mean('iid_mix_tv_unbiased_sample'))})", f"{mean('wall_s'):.0f}"])
    lines = gather.table(["seed", "TV base VAE", "TV ML tilt, SNIR (ESS of 20k)",
                          "TV ML tilt, Langevin", "TV hackathon, SNIR", "TV data-space tilt, SNIR",
                          "2D mixture TV, stratified 30/40/30 points (tilt's own weights)",
                          "2D mixture TV, i.i.d. points (tilt's own; points' own)", "time (s)"],
                         cells, align="---:")
    n = len(rows)
    won = lambda k: sum(r[k] < r["tv_base"] for r in rows)  # noqa: E731
    drop = lambda k: mean("tv_base") - mean(k)  # noqa: E731
    ok = lambda k: sum(r[k] <= 0.08 for r in rows)  # noqa: E731
    summary = [
        f"- ML tilt + SNIR lowers the base VAE's TV on {won('tv_ml_snir')} of {n} seeds, by "
        f"{drop('tv_ml_snir'):.3f} on average (target: at least 7 of 8, at least 0.08).",
        f"- ML tilt + Langevin: lower on {won('tv_ml_langevin')} of {n}, by "
        f"{drop('tv_ml_langevin'):.3f} on average.",
        f"- Hackathon recipe + SNIR: lower on {won('tv_hackathon_snir')} of {n}, by "
        f"{drop('tv_hackathon_snir'):.3f} on average.",
        f"- Data-space tilt + SNIR: lower on {won('tv_data_snir')} of {n}, by "
        f"{drop('tv_data_snir'):.3f} on average.",
        f"- 2D mixture, stratified teaching points (the default): TV <= 0.08 on "
        f"{ok('mix_tv')} of {n} seeds (mean {mean('mix_tv'):.3f}, worst {worst('mix_tv'):.3f}); "
        f"the tilt's own component weights (before resampling) on {ok('mix_tv_tilt_weights')} "
        f"of {n} (mean {mean('mix_tv_tilt_weights'):.3f}).",
        f"- 2D mixture, i.i.d. teaching points (`--mix_teaching iid`): TV <= 0.08 on "
        f"{ok('iid_mix_tv')} of {n} (mean {mean('iid_mix_tv'):.3f}, worst "
        f"{worst('iid_mix_tv'):.3f}); the 100 points themselves are within 0.08 on "
        f"{ok('iid_mix_tv_unbiased_sample')} of {n}.",
        f"- Time per seed (digits with all three tilts + the default mixture run; the i.i.d. "
        f"comparison run not counted): mean {mean('wall_s'):.0f} s, "
        f"max {max(r['wall_s'] for r in rows):.0f} s, one torch thread.",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(summary)


def check_docs(path=DOCS):
    """The file and its START ... END block exist (checked before any training)."""
    if not os.path.isfile(path):
        config.fail(f"--write_docs: {path} not found; run from the repository root")
    with open(path, encoding="utf-8") as fh:
        s = fh.read()
    if START not in s or END not in s or s.index(START) > s.index(END):
        config.fail(f"--write_docs: {path} has no {START} ... {END} block to replace; add "
                    f"one where the table goes")


def write_docs(text, path=DOCS):
    with open(path, encoding="utf-8") as fh:
        s = fh.read()
    a, b = s.index(START) + len(START), s.index(END)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(s[:a] + "\n" + text + "\n" + s[b:])
    os.replace(tmp, path)


def build_parser():
    p = config.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=config.seed, nargs="+", default=list(range(8)),
                   help="the seeds, one table row each")
    p.add_argument("--out", default="runs/bench_tilt", help="folder of the runs and the table")
    config.add_flag(p, "--write_docs",
                    help=f"replace the table in {DOCS} and copy seed 0's figures to "
                         f"images/readme (only when every seed finished)")
    config.add_flag(p, "--report_only", help="no training: the table of the finished runs")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        config.fail("--seeds lists a seed twice; give each seed once")
    if args.write_docs:
        check_docs()
        if 0 not in args.seeds:
            config.fail("--write_docs copies seed 0's figures: include 0 in --seeds")
    if args.out.startswith("-") or (os.path.exists(args.out) and not os.path.isdir(args.out)):
        config.fail(f"--out {args.out!r} is not a folder; choose another --out")
    if not args.report_only:
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            config.fail(f"cannot create {args.out} ({e.strerror}); choose a writable --out")
        try:
            for seed in args.seeds:
                train_seed(seed, args.out)
                print(f"seed {seed}: done", flush=True)
        except runner.Stopped:
            return runner.stopped("bench/tilt.py")
    rows = [r for r in (collect(seed, args.out) for seed in args.seeds) if r is not None]
    missing = [s for s in args.seeds if s not in {r["seed"] for r in rows}]
    if not rows:
        print(f"bench/tilt.py: no seed has finished runs under {args.out}: nothing written "
              f"({DOCS} and images/readme/ unchanged)", file=sys.stderr)
        return 1
    text = table(rows)
    print(text)
    with open(f"{args.out}/results.json", "w") as fh:
        json.dump(rows, fh, indent=1)
    with open(f"{args.out}/table.md", "w") as fh:
        fh.write(text + "\n")
    if missing:
        print(f"bench/tilt.py: seeds {missing} did not finish: left out of the table"
              + (f"; {DOCS} and images/readme/ not written" if args.write_docs else ""),
              file=sys.stderr)
        return 1
    if args.write_docs:
        figures = [(f"{args.out}/images/{run}-s0/{name}.png", f"images/readme/tilt_{name}.png")
                   for run, names in FIGURES for name in names]
        lost = [src for src, _ in figures if not os.path.isfile(src)]
        if lost:
            print(f"bench/tilt.py: {', '.join(lost)} missing: {DOCS} and images/readme/ not "
                  f"written; delete {args.out}/digits-s0 and {args.out}/mixture-s0 to run them "
                  f"again", file=sys.stderr)
            return 1
        write_docs(text)
        os.makedirs("images/readme", exist_ok=True)
        for src, dst in figures:
            shutil.copy(src, dst)
        print(f"wrote {DOCS} and images/readme/tilt_*.png")
    return 0


if __name__ == "__main__":
    sys.exit(config.cli(main))
