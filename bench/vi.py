"""Benchmark of the VI flows: speed of a planar training step, and the quality table
flow x K x target (KL(q || p), ESS, seconds) with the Figure-3-style figures.

    python -m bench.vi --speed_only          # ms per step: per-target loop vs batched module
    python -m bench.vi                       # + trains every run (10,000 steps each) and
                                             #   writes images/readme/vi_*.png, runs/bench_vi/
    python -m bench.vi --best --jobs 2       # the "best flow" row only: RealNVP K=8, one
                                             #   process per target (runs/bench_vi/table-best.md)

Every run trains the four confined targets U1-U4 at once with train_vi.py (planar flows as one
batched module, other flows one after another) with the same settings; `--jobs 2` trains two
runs side by side (then each run's seconds include sharing the CPU with the other).
`--split` trains each target in its own process instead (for flows other than planar, which
run the targets one after another anyway); the row's seconds are then the sum over the four.
`--seed` is passed to train_vi.py (several seeds: one row each); run directories of seeds other
than 42 end in -s<seed>, and `--tag T` (for runs with `--extra` flags) adds -T to run directories
and table files, so such runs never overwrite the default ones, e.g.

    python -m bench.vi --runs planar:32 --extra="--lr=3e-3" --tag lr3e-3 --seed 42 0 1 \
        --jobs 2 --no-speed --no-figures

A run that finished (its summary.json exists) is kept and skipped, an interrupted one resumes
from its checkpoint and anything else starts again (runner.run_script), so an interrupted
benchmark continues where it stopped. The table and figures come from finished runs only; with none, nothing is written (exit status 1)
and the published figures in images/readme/ stay as they are.
"""
import json
import os
import shlex
import sys
import time

if not __package__:  # run as a file (python bench/x.py): the repository root, not bench/, first
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

import checkpoint
import config
from bench import gather, runner
import plots
import targets
import vi_flows

NAMES = list(targets.NAMES)
OUT = os.path.join("runs", "bench_vi")
BEST_RUNS = "realnvp:8"  # the best flow of the collection: RealNVP, 8 couplings, (64, 64) MLPs


# ----------------------------------------------------------------------------- speed
def _loop_step(fs, opts, batch):
    """The straightforward way: one planar Flow (a Module per layer) per target, in turn."""
    for name, f, opt in zip(NAMES, fs, opts):
        x, log_q = f.sample_and_log_prob(batch)
        loss = (log_q + targets.energy(name, x)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _batched_step(stack, opt, batch):
    x, log_q = stack.sample_and_log_prob(batch)
    loss = (log_q + targets.energies(NAMES, x)).mean(1).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


def speed(K=32, batch=256, steps=50, repeats=5):
    """Median ms per training step for all four targets, measured interleaved (loop, batched,
    loop, ...) so that load from other processes hits both alike. One torch thread."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    fs = [vi_flows.planar(2, K) for _ in NAMES]
    opts = [torch.optim.Adam(f.parameters(), 1e-3) for f in fs]
    stack = vi_flows.stack({"name": "planar", "dim": 2, "K": K, "base": "learned"}, len(NAMES))
    opt = torch.optim.Adam(stack.parameters(), 1e-3)
    runs = {"loop": lambda: _loop_step(fs, opts, batch), "batched": lambda: _batched_step(stack, opt, batch)}
    times = {k: [] for k in runs}
    for fn in runs.values():
        for _ in range(10):
            fn()
    for _ in range(repeats):
        for k, fn in runs.items():
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            times[k].append(1000 * (time.perf_counter() - t) / steps)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"K": K, "batch": batch, "loop_ms": med["loop"], "batched_ms": med["batched"],
            "loop_ms_per_target": med["loop"] / len(NAMES),
            "batched_ms_per_target": med["batched"] / len(NAMES),
            "speedup": med["loop"] / med["batched"]}


# ----------------------------------------------------------------------------- quality
DEFAULT_SEED = 42


def _run_name(flow, K, seed=DEFAULT_SEED, target="all", tag=""):
    """bench_vi-<flow>-K<K>[-<target>][-s<seed>][-<tag>]: the run's directory under runs/ and
    images/."""
    return (f"bench_vi-{flow}-K{K}" + (f"-{target}" if target != "all" else "")
            + (f"-s{seed}" if seed != DEFAULT_SEED else "") + (f"-{tag}" if tag else ""))


def _run_dir(flow, K, seed=DEFAULT_SEED, target="all", tag=""):
    """runs/<run name> (figures of the run: images/<run name>)."""
    return os.path.join("runs", _run_name(flow, K, seed, target, tag))


def _train_argv(flow, K, target, seed, steps, extra):
    return [f"--target={target}", f"--flow={flow}", f"--K={K}", f"--steps={steps}",
            f"--seed={seed}", "--no-frames", *extra]


def _train(job):
    """One train_vi run (U1-U4, or one target with --split) in its own process
    (runner.run_script: a finished run is kept, an interrupted one resumed, anything else
    started afresh); returns its summary.json, or None when it did not finish."""
    flow, K, target, seed, steps, extra, tag = job
    out = _run_dir(flow, K, seed, target, tag)
    log = os.path.join(OUT, _run_name(flow, K, seed, target, tag)[len("bench_vi-"):] + ".log")
    if runner.finished(out):
        print(f"{out}: finished, kept", file=sys.stderr)
    code = runner.run_script("train_vi.py", out,
                               _train_argv(flow, K, target, seed, steps, extra), log=log)
    if code != 0:
        print(f"{out}: train_vi.py exited with status {code}; see {log}", file=sys.stderr)
    summary = runner.finished(out)
    return None if summary is None else {"flow": flow, "K": K, "seed": seed, "status": code,
                                         **summary, "seconds": runner.cpu_seconds(summary)}


def merge(results):
    """Per-target results of one (flow, K) -> one row; seconds are summed (CPU time of the
    single-target runs), status is the worst."""
    rows = {}
    for r in results:
        key = (r["flow"], r["K"], r.get("seed", DEFAULT_SEED))
        if key not in rows:
            rows[key] = dict(r)
        else:
            row = rows[key]
            seconds, status = row["seconds"] + r["seconds"], max(row["status"], r["status"])
            row.update(r)
            row.update(seconds=seconds, status=status)
    return list(rows.values())


def _jobs(runs, split, seeds, steps, extra, tag=""):
    targets_ = NAMES if split else ["all"]
    return [(f, K, t, s, steps, extra, tag) for s in seeds for f, K in runs for t in targets_]


def parse_runs(spec):
    """'planar:2,8,32 nice:2,8' -> [('planar', 2), ('planar', 8), ...]; a malformed spec is a
    one-line error (exit status 2)."""
    out = []
    for part in spec.split():
        name, _, ks = part.partition(":")
        if name not in vi_flows.VI_FLOWS:
            config.fail(f"unknown flow {name!r} in --runs; choose from "
                        f"{', '.join(vi_flows.VI_FLOWS)}, e.g. --runs 'planar:2,8 nice:8'")
        try:
            Ks = [config.positive_int(k) for k in ks.split(",")]
        except Exception:
            config.fail(f"--runs {part!r}: expected <flow>:<K>[,<K>...] with positive integers "
                        f"K, e.g. planar:2,8,32")
        out += [(name, K) for K in Ks]
    if not out:
        config.fail("--runs is empty; give at least one <flow>:<K>, e.g. planar:32")
    return out


def table(results):
    rows = [[f"{r['flow']}", f"{r['K']}", f"{r.get('seed', DEFAULT_SEED)}",
             *(c for n in NAMES for c in (f"{r[f'{n}/kl']:.3f}", f"{r[f'{n}/ess']:.2f}")),
             f"{r['U1/mass_left']:.3f}/{r['U1/mass_right']:.3f}", f"{r['seconds']:.0f}"]
            for r in results]
    return "\n".join(gather.table(
        ["flow", "K", "seed", *(h for n in NAMES for h in (f"{n} KL", f"{n} ESS")),
         "U1 mass left/right", "seconds (4 targets)"], rows))


def figure3(results, path, flow="planar", Ks=(2, 8, 32), n=120, tag=""):
    """Figure 3 of the paper: rows U1-U4; true density, then q_K for each K."""
    panels = []
    have = {r["K"]: r.get("seed", DEFAULT_SEED) for r in results if r["flow"] == flow}
    Ks = [k for k in Ks if k in have]
    for t, name in enumerate(NAMES):
        panels.append((f"exp(-{name})", plots.density(lambda z: -targets.energy(name, z),
                                                      bound=targets.BOX, n=n)))
        for K in Ks:
            run = checkpoint.load_run(_run_dir(flow, K, have[K], tag=tag))
            panels.append((f"{flow} K={K}", plots.density(run.flow.flow(t).log_prob,
                                                          bound=targets.BOX, n=n,
                                                          normalise=False)))
    return plots.save_panels(path, panels, rows=len(NAMES), size=1.9)


def figure3d(results, path):
    """Figure 3(d): KL(q || p) = bound + log Z against K, one line per flow, per target."""
    curves = {}
    for name in NAMES:
        lines = {}
        for flow in sorted({r["flow"] for r in results}):
            rs = sorted((r for r in results if r["flow"] == flow), key=lambda r: r["K"])
            if len(rs) > 1:
                lines[flow] = ([r["K"] for r in rs], [r[f"{name}/kl"] for r in rs])
        curves[f"{name}: KL(q||p) (nats)"] = lines
    return plots.save_curves(path, curves, xlabel="K", logy=True, size=(2.8, 2.4))


def build_parser():
    p = config.Parser(description=__doc__.split("\n")[0])
    config.add_flag(p, "--speed_only", help="only time the planar training step")
    p.add_argument("--runs", default="planar:2,8,32 nice:2,8",
                   help="<flow>:<K>[,<K>...] separated by spaces")
    p.add_argument("--steps", type=config.positive_int, default=10000,
                   help="train_vi.py --steps of every run")
    p.add_argument("--jobs", type=config.positive_int, default=1,
                   help="train_vi.py runs side by side")
    config.add_flag(p, "--report_only",
                    help="no training: table and figures from the finished runs/bench_vi-* runs")
    p.add_argument("--extra", default="",
                   help="extra train_vi.py flags for every run")
    p.add_argument("--seed", type=config.seed, nargs="+", default=[DEFAULT_SEED],
                   help="train_vi.py --seed; several seeds give one row each")
    p.add_argument("--tag", default="", help="suffix of run directories and table files")
    config.add_flag(p, "--speed", default=True,
                    help="time the planar training step first")
    config.add_flag(p, "--split",
                    help="one train_vi.py process per target (U1..U4) instead of one for all four")
    config.add_flag(p, "--figures", default=True,
                    help="write images/readme/vi_figure3.png and vi_bound_vs_K.png")
    config.add_flag(p, "--best",
                    help="the best flow of the collection only: --runs realnvp:8 --split "
                         "--no-figures, no speed test, table in runs/bench_vi/table-best.md")
    return p


def check_extra(extra):
    """--extra as train_vi.py flags, checked by train_vi.py's own parser before any work;
    flags the benchmark sets itself are refused."""
    import train_vi

    try:
        words = shlex.split(extra)
    except ValueError as e:
        config.fail(f"--extra {extra!r} cannot be split into flags ({e})")
    own = {"target", "flow", "K", "steps", "seed", "out_dir", "image_dir", "wandb", "frames",
           "overwrite", "resume"} & config.given_flags(words)
    if own:
        config.fail(f"--extra sets {', '.join('--' + f for f in sorted(own))}, which the "
                    f"benchmark sets itself; use its own flags (--runs, --steps, --seed)")
    config.parse(train_vi.build_parser(), _train_argv("planar", 2, "U1", DEFAULT_SEED, 1, words))
    return words


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.best:
        args.runs, args.split, args.figures, args.speed = BEST_RUNS, True, False, False
    runs = parse_runs(args.runs)
    if args.tag and (os.sep in args.tag or args.tag.startswith(".")):
        config.fail(f"--tag {args.tag!r} must be a plain name (it ends folder and file names)")
    if args.split and args.figures and not args.speed_only:
        config.fail("--split runs have no four-target flow for the figures; add --no-figures")
    extra = check_extra(args.extra)
    tag = "".join(f"-{t}" for t in (args.tag, "best" if args.best else "") if t)  # table file

    if args.report_only:
        return report(_finished(runs, args.split, args.seed, args.tag), args.figures, tag,
                      args.tag)
    if args.speed:
        s = speed()
        print(f"planar K={s['K']}, batch {s['batch']}, one training step for all four "
              f"targets, 1 thread: per-target loop {s['loop_ms']:.1f} ms "
              f"({s['loop_ms_per_target']:.1f} ms per target), batched module "
              f"{s['batched_ms']:.1f} ms ({s['batched_ms_per_target']:.1f} ms per target): "
              f"{s['speedup']:.1f}x faster")
        os.makedirs(OUT, exist_ok=True)
        with open(os.path.join(OUT, "speed.json"), "w") as fh:
            json.dump(s, fh, indent=2)
    if args.speed_only:
        return 0
    os.makedirs(OUT, exist_ok=True)
    jobs = _jobs(runs, args.split, args.seed, args.steps, extra, args.tag)
    try:
        done = [r for r in runner.run_many(_train, jobs, args.jobs) if r is not None]
    except runner.Stopped:
        return runner.stopped("bench/vi.py")
    results = [r for r in merge(done) if all(f"{n}/kl" in r for n in NAMES)]
    code = report(results, args.figures, tag, args.tag)
    return 1 if len(done) < len(jobs) else code


def _finished(runs, split=False, seeds=(DEFAULT_SEED,), tag=""):
    """Summaries of the runs among `runs` that finished (have a summary.json)."""
    results = []
    for seed in seeds:
        for flow, K in runs:
            for t in (NAMES if split else ["all"]):
                path = os.path.join(_run_dir(flow, K, seed, t, tag), "summary.json")
                if os.path.isfile(path):
                    with open(path) as fh:
                        results.append({"flow": flow, "K": K, "seed": seed, "status": 0,
                                        **json.load(fh)})
                else:
                    print(f"{_run_name(flow, K, seed, t, tag)}: not finished, left out",
                          file=sys.stderr)
    return [r for r in merge(results) if all(f"{n}/kl" in r for n in NAMES)]


def report(results, figures=True, tag="", run_tag=""):
    """Table (printed and runs/bench_vi/table<tag>.md) and, with `figures`, the two figures
    under images/readme/. Without finished runs nothing is written and the status is 1."""
    if not results:
        print("bench/vi.py: no finished runs to report: nothing written (images/readme/ "
              "unchanged); train them first (python -m bench.vi without --report_only)",
              file=sys.stderr)
        return 1
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"results{tag}.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    md = table(results)
    with open(os.path.join(OUT, f"table{tag}.md"), "w") as fh:
        fh.write(md + "\n")
    print(md)
    if figures:
        os.makedirs(os.path.join("images", "readme"), exist_ok=True)
        print(figure3(results, os.path.join("images", "readme", "vi_figure3.png"), tag=run_tag))
        print(figure3d(results, os.path.join("images", "readme", "vi_bound_vs_K.png")))
    return 0


if __name__ == "__main__":
    sys.exit(config.cli(main))
