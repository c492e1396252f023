"""The estimator comparison: every estimator on every toy set, measured exactly, at an equal
CPU-second budget per run (numbers for README and docs/fce.md; not a test).

    python -m bench.fce --jobs 2                          # 5 estimators x 9 datasets x 3 seeds
    python -m bench.fce --datasets rings --seeds 0 --budget 30
    python -m bench.fce --only flows                      # NSF / MAF against zuko: step time, NLL

Grid: each run is the real `train.py` in its own process (one thread, wandb off) with the
estimator's flags on top of train.py's defaults, `--budget` CPU-seconds of training (each
estimator runs as many iterations as fit) and one exact evaluation at the end. Runs live in
`<root>/<label>-<dataset>-s<seed>/`; a finished run (summary.json) is kept and skipped, an
interrupted one resumes from its checkpoint (runner.run_script), so a benchmark stopped by
Ctrl-C continues where it stopped when the same command runs again.
The table (mean ± sd over seeds, via bench/gather.py) and a figure grid (rows: datasets; columns:
data and each estimator's density, the EBM's or, for mle, the flow's) are written to --out.

Flows: maximum-likelihood steps (batch 1000, Adam 1e-3, one thread) of our NSF and MAF against
zuko's with the same architecture, interleaved so machine load hits both alike, and the test
NLL each reaches after --flow_steps steps (`pip install zuko`; skipped when absent).
"""
import math
import os
import statistics
import sys
import time

if not __package__:  # run as a file (python bench/x.py): the repository root, not bench/, first
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import config
from bench import gather, runner
import datasets

ESTIMATORS = {  # label: train.py flags on top of its defaults
    "nce": ["--estimator", "nce"],
    "fce-maf": ["--estimator", "fce", "--flow", "maf"],
    # FCE-MAF under other rules of who steps (fce-maf: train.py's default rule)
    "fce-maf-every": ["--estimator", "fce", "--flow", "maf", "--rule", "every"],
    "fce-maf-t0.6": ["--estimator", "fce", "--flow", "maf", "--rule", "threshold",
                     "--threshold", "0.6", "--flow_target", "0"],
    "fce-glow": ["--estimator", "fce", "--flow", "glow"],
    "fce-nsf": ["--estimator", "fce", "--flow", "nsf"],
    "mle-maf": ["--estimator", "mle", "--flow", "maf"],
    "mle-glow": ["--estimator", "mle", "--flow", "glow"],
    "mle-nsf": ["--estimator", "mle", "--flow", "nsf"],
    "dsm": ["--estimator", "dsm"],
    "ssm": ["--estimator", "ssm"],
    "tilt": ["--estimator", "tilt"],  # an MLE flow, then an EBM tilt of it (tilt.FlowTilt)
}
DEFAULT_ESTIMATORS = ("nce", "fce-maf", "fce-glow", "fce-nsf", "mle-maf")
TOY = ("8gaussians", "spiral", "2spirals", "checkerboard", "rings", "pinwheel", "moons",
       "circles", "swissroll")
KEYS = ["kl_ebm", "nll_ebm", "c_gap", "kl_flow", "kl_flow_mc", "nll_flow", "entropy", "steps",
        "flow_steps", "flow_step_fraction", "cpu_s"]
# the equal-iteration partners: NCE run for as many iterations as each of these made in its budget
PARTNER, PARTNERED = "nce", ("fce-maf", "tilt")


# ----------------------------------------------------------------------------- the grid
def run_dir(root, label, dataset, seed):
    return os.path.join(root, runner.run_name(label, dataset, seed=seed))


def run_one(root, label, dataset, seed, budget, extra=(), steps=None):
    """One train.py run in its own process (runner.run_script: finished runs are kept, an
    interrupted one resumes); returns (run folder, exit code). Output in <run folder>.log.
    With `steps`, the run ends after that many iterations instead of the CPU budget."""
    out = run_dir(root, label, dataset, seed)
    os.makedirs(root, exist_ok=True)
    stop = ["--max_steps", str(steps)] if steps else ["--budget", str(budget)]
    argv = [*ESTIMATORS[label], "--dataset", dataset, "--seed", str(seed), *stop,
            "--epoch", "100000", "--eval_every", "100000", "--plot_every",
            "100000", "--image_dir", os.path.join(out, "images"), *extra]
    return out, runner.run_script("train.py", out, argv, log=f"{out}.log")


def iters_root(root, label="fce-maf"):
    """Where the NCE runs at `label`'s iterations live (beside --root, so that they never mix
    into the equal-CPU table): <root>-equal-iterations for FCE-MAF, -<label> added for others."""
    tail = "" if label == "fce-maf" else f"-{label}"
    return os.path.normpath(root) + "-equal-iterations" + tail


def run_grid(args):
    """Every run of the grid, --jobs at a time; returns the number that failed."""
    # seed by seed, so that an interrupted benchmark holds whole seeds
    jobs = [(lab, ds, s) for s in args.seeds for ds in args.datasets for lab in args.estimators]
    print(f"{len(jobs)} runs of {args.budget:g} CPU-s in {args.root} ({args.jobs} at a time)",
          flush=True)

    def one(job):
        t = time.time()
        lab, ds, seed = job
        if isinstance(lab, tuple):  # ("equal-iterations", partnered): after its run
            steps = (runner.finished(run_dir(args.root, lab[1], ds, seed)) or {}).get("steps")
            if steps is None:
                return 0
            out, code = run_one(iters_root(args.root, lab[1]), PARTNER, ds, seed, None,
                                args.train_args.split(), steps=steps)
        else:
            out, code = run_one(args.root, *job, args.budget, args.train_args.split())
        print(f"{'ok ' if code == 0 else f'FAILED ({code})'} {out} ({time.time() - t:.0f} s)",
              flush=True)
        return code

    failed = sum(c != 0 for c in runner.run_many(one, jobs, args.jobs))
    pairs = [(("equal-iterations", lab), ds, s) for lab in PARTNERED for s in args.seeds
             for ds in args.datasets if PARTNER in args.estimators and lab in args.estimators]
    failed += sum(c != 0 for c in runner.run_many(one, pairs, args.jobs))
    return failed


def gallery(agg, root, seed, path):
    """Rows: datasets; columns: data and each estimator's density (seed `seed`)."""
    import checkpoint
    import plots

    labels = list(dict.fromkeys(a["label"] for a in agg))
    data = list(dict.fromkeys(a["dataset"] for a in agg))
    panels = []
    for ds in data:
        panels.append((f"{ds}: data", plots.samples(datasets.sample(ds, 20000, 0))))
        for lab in labels:
            out = run_dir(root, lab, ds, seed)
            if not os.path.isfile(os.path.join(out, "summary.json")):
                panels.append((f"{lab}: missing", lambda ax: None))
                continue
            run = checkpoint.load_run(out)
            fn = (lambda v, r=run: -r.ebm(v)) if run.ebm is not None else run.flow.log_prob
            panels.append((lab, plots.density(fn, n=120)))
    return plots.save_panels(path, panels, rows=len(data), size=1.9)


def report(args):
    """Table and figures of the finished runs under --root; None (and nothing written, so
    the figures in --out are never replaced by empty ones) when there are none."""
    rows = [r for r in by_folder(gather.collect([args.root])) if r["dataset"] in args.datasets
            and r["label"] in args.estimators] if os.path.isdir(args.root) else []
    if not rows:
        print(f"bench/fce.py: no finished runs under {args.root}: nothing written", file=sys.stderr)
        return None
    agg = gather.aggregate(rows, KEYS)
    lines = [f"Equal budget: {args.budget:g} CPU-seconds of training per run; mean ± sd over "
             f"seeds {' '.join(map(str, args.seeds))}.", "", gather.markdown(agg, KEYS), "",
             *speed_lines(rows)]
    iters = equal_iterations(args, rows)
    if iters:
        lines += ["", *iters]
    print("\n".join(lines))
    nce_iters = equal_iteration_rows(args)
    summary = "\n".join([kl_pivot(agg), "", *targets(agg, nce_iters), "", *rules(agg)])
    print("\n" + summary)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "table.md"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
        with open(os.path.join(args.out, "kl.md"), "w") as fh:
            fh.write(summary + "\n")
        gather.figure(agg, "kl_ebm", os.path.join(args.out, "kl_ebm.png"))
        print(f"wrote {gallery(agg, args.root, args.seeds[0], os.path.join(args.out, 'grid.png'))}")
    return lines


def by_folder(rows):
    """The rows labelled by their run folder (`<label>-<dataset>-s<seed>`), so that runs of
    one estimator under different flags (fce-maf, fce-maf-every) stay apart."""
    for r in rows:
        name = os.path.basename(os.path.normpath(r["run_dir"]))
        tail = f"-{r['dataset']}-s{r['seed']}"
        if name.endswith(tail):
            r["label"] = name[:-len(tail)]
    return rows


def speed_lines(rows):
    """What a CPU-second bought each estimator: iterations per CPU-second over its runs
    (mean, sd, min-max): how far the budget moves on a shared machine."""
    out = []
    for lab in dict.fromkeys(r["label"] for r in rows):
        v = [r["steps"] / r["cpu_s"] for r in rows if r["label"] == lab and r.get("cpu_s")]
        if v:
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            out.append([lab, f"{statistics.mean(v):.1f} ± {sd:.1f}",
                        f"{min(v):.1f} - {max(v):.1f}", f"{len(v)}"])
    return gather.table(["estimator", "iterations per CPU-s: mean ± sd", "min - max", "runs"],
                        out)


def equal_iteration_rows(args, label="fce-maf"):
    """The finished NCE runs of `label`'s iteration counts (one per set and seed)."""
    root = iters_root(args.root, label)
    return [r for r in gather.collect([root]) if r["dataset"] in args.datasets
            and r["seed"] in args.seeds] if os.path.isdir(root) else []


def equal_iterations(args, rows):
    """NCE run for exactly as many iterations as FCE-MAF (and the tilt) made in its budget,
    beside it: the equal-iteration comparisons (lines of tables), or [] when there are none."""
    lines, keys = [], ["kl_ebm", "c_gap", "steps", "cpu_s"]
    for label in PARTNERED:
        nce = equal_iteration_rows(args, label)
        if not nce:
            continue
        name = "FCE-MAF" if label == "fce-maf" else label
        for r in nce:
            r["label"] = f"nce ({name}'s iterations)"
        mine = [r for r in rows if r["label"] == label]
        lines += [*([""] if lines else []), f"Equal iterations: NCE run for the number of "
                  f"iterations {name} made in its budget (same data, seed and defaults).", "",
                  gather.markdown(gather.aggregate(mine + nce, keys), keys)]
    return lines


def _sd(a, key):
    """The sd of `key` in an aggregate (0 for one run)."""
    v = a.get(f"{key}_sd")
    return 0.0 if v is None or math.isnan(v) else v


def targets(agg, nce_iters=()):
    """Per dataset, FCE-MAF (train.py's default rule) against its targets: its EBM against
    NCE's at equal CPU and at equal iterations (NCE run for FCE-MAF's iterations; met when
    the KL is lower or within the larger sd of the two), and its flow's test NLL against the
    same MAF trained alone by maximum likelihood at equal CPU (met within 0.1 nats); the
    last line counts the sets that meet each."""
    cell = {(a["label"], a["dataset"]): a for a in agg}
    iters = {a["dataset"]: a for a in gather.aggregate(list(nce_iters), ["kl_ebm", "steps"])}
    data = list(dict.fromkeys(a["dataset"] for a in agg))
    out, met_ebm, met_flow, n_ebm, n_flow = [], 0, 0, 0, 0
    for ds in data:
        f, n, m, ni = (*(cell.get((lab, ds)) for lab in ("fce-maf", "nce", "mle-maf")),
                       iters.get(ds))
        d_ebm = f"{f['kl_ebm'] - n['kl_ebm']:+.4f}" if f and n else "n/a"
        d_iter, ok_ebm = "n/a", ""
        if f and ni:
            diff, sd = f["kl_ebm"] - ni["kl_ebm"], max(_sd(f, "kl_ebm"), _sd(ni, "kl_ebm"))
            d_iter, ok = f"{diff:+.4f} (sd {sd:.4f})", diff <= sd
            ok_ebm, met_ebm, n_ebm = ("met" if ok else "missed"), met_ebm + ok, n_ebm + 1
        d_flow, ok_flow = "n/a", ""
        if f and m:
            diff = f["nll_flow"] - m["nll_flow"]
            d_flow, ok = f"{diff:+.3f}", diff <= 0.1
            ok_flow, met_flow, n_flow = ("met" if ok else "missed"), met_flow + ok, n_flow + 1
        out.append([ds, d_ebm, d_iter, ok_ebm, d_flow, ok_flow])
    out.append(["**sets met**", "", "", f"{met_ebm} of {n_ebm}", "", f"{met_flow} of {n_flow}"])
    return gather.table(["dataset", "EBM KL: fce-maf - nce (equal CPU)",
                         "fce-maf - nce (equal iterations)", "EBM target",
                         "flow NLL: fce-maf - mle-maf", "flow target (0.1)"], out)


def rules(agg):
    """FCE-MAF under each rule of who steps that ran (labels fce-maf*), side by side per
    set: EBM KL, the flow's test NLL above the MAF alone (equal CPU), the share of iterations
    in which the flow stepped, and iterations."""
    labels = [lab for lab in dict.fromkeys(a["label"] for a in agg) if lab.startswith("fce-maf")]
    if len(labels) < 2:
        return []
    cell = {(a["label"], a["dataset"]): a for a in agg}
    data = list(dict.fromkeys(a["dataset"] for a in agg))
    out = []
    for ds in data:
        m = cell.get(("mle-maf", ds))
        for lab in labels:
            a = cell.get((lab, ds))
            if not a:
                continue
            gap = f"{a['nll_flow'] - m['nll_flow']:+.3f}" if m else "n/a"
            frac = a["flow_step_fraction"]
            out.append([ds, lab, gather.cell(a, "kl_ebm"), gap, f"{frac:.2f}",
                        f"{a['steps']:.0f}"])
    return gather.table(["dataset", "rule", "EBM KL", "flow NLL - mle-maf",
                         "flow-step fraction", "iterations"], out)


def kl_pivot(agg):
    """One line per estimator, one column per dataset: the exact KL(p_data || model) of its
    density model (the EBM; the flow for mle), mean over seeds; the best EBM KL in bold."""
    data = list(dict.fromkeys(a["dataset"] for a in agg))
    labels = list(dict.fromkeys(a["label"] for a in agg))
    cells = {(a["label"], a["dataset"]): a.get("kl_ebm", a.get("kl_flow")) for a in agg}
    best = {ds: min((v for (lab, d), v in cells.items() if d == ds and v is not None
                     and not lab.startswith("mle")), default=None) for ds in data}
    lines = []
    for lab in labels:
        row = [f"{lab}{' (flow)' if lab.startswith('mle') else ''}"]
        for ds in data:
            v = cells.get((lab, ds))
            txt = "n/a" if v is None else f"{v:.4f}"
            row.append(f"**{txt}**" if v is not None and v == best[ds] else txt)
        lines.append(row)
    return "\n".join(gather.table(["KL(p_data \\|\\| model)", *data], lines))


# ----------------------------------------------------------------------------- flows vs zuko
def flow_pairs(names):
    """(name, ours, zuko) with the same architecture: 5 transforms, MADE(64, 64), 8 bins."""
    import zuko

    from flows import build_flow

    pairs = {"nsf": ("NSF", lambda: build_flow("nsf", n_blocks=5, hidden=(64, 64), bins=8),
                     lambda: zuko.flows.NSF(features=2, transforms=5, hidden_features=(64, 64),
                                            bins=8)),
             "maf": ("MAF", lambda: build_flow("maf", n_blocks=5, hidden=(64, 64)),
                     lambda: zuko.flows.MAF(features=2, transforms=5, hidden_features=(64, 64)))}
    return [pairs[n] for n in names]


def flows_vs_zuko(names, dataset_names, steps, seed=0, timing_steps=50, repeats=5):
    """Step time (median over interleaved blocks) and test NLL after `steps` MLE steps."""
    import torch

    try:
        pairs = flow_pairs(names)
    except ImportError:
        print("zuko not installed: `pip install zuko` to compare")
        return []
    torch.set_num_threads(1)
    lines = gather.table(["flow", "dataset", "ours: ms / step", "zuko: ms / step",
                          "ours: test NLL", "zuko: test NLL", "entropy H"], [])
    for name, make_ours, make_zuko in pairs:
        for ds in dataset_names:
            x_train = datasets.sample(ds, 100_000, seed)
            x_test = datasets.sample(ds, 20_000, seed + 1)
            torch.manual_seed(seed)
            models = {"ours": make_ours(), "zuko": make_zuko()}
            log_prob = {"ours": lambda x, m=models["ours"]: m.log_prob(x),
                        "zuko": lambda x, m=models["zuko"]: m().log_prob(x)}
            opts = {k: torch.optim.Adam(m.parameters(), 1e-3) for k, m in models.items()}
            gen = torch.Generator().manual_seed(seed)
            batches = [torch.randint(0, len(x_train), (1000,), generator=gen)
                       for _ in range(steps)]

            def step(k, i):
                loss = -log_prob[k](x_train[batches[i % steps]]).mean()
                opts[k].zero_grad()
                loss.backward()
                opts[k].step()

            done = {k: 0 for k in models}
            times = {k: [] for k in models}
            for _ in range(repeats):  # interleaved timing blocks, part of the training
                for k in models:
                    t = time.process_time()
                    for _ in range(timing_steps):
                        step(k, done[k])
                        done[k] += 1
                    times[k].append((time.process_time() - t) / timing_steps)
            for k in models:
                while done[k] < steps:
                    step(k, done[k])
                    done[k] += 1
            with torch.no_grad():
                nll = {k: float(-log_prob[k](x_test).double().mean()) for k in models}
            lines.append(gather.table_line(
                [name, ds, f"{1000 * statistics.median(times['ours']):.1f}",
                 f"{1000 * statistics.median(times['zuko']):.1f}", f"{nll['ours']:.3f}",
                 f"{nll['zuko']:.3f}", f"{datasets.entropy(ds):.3f}"]))
            print(lines[-1], flush=True)
    return lines


# ----------------------------------------------------------------------------- step cost
def step_cost(flows=("maf", "glow", "nsf"), dataset="8gaussians", blocks=7, per_block=40,
              seed=0):
    """CPU-ms of one iteration of train.py's defaults under --rule every, split, measured
    side by side in one process (one thread), interleaved so that machine load hits every
    kind alike; median over blocks. Kinds: an NCE step; an FCE iteration in which only the
    EBM steps, with the flow's samples and log q taken from the cache (`noise`: its share,
    the window's pass over the flow amortised per iteration); an FCE iteration in which the
    flow steps as well; one in which the flow steps alone (the threshold rule's flow step)."""
    import dataclasses

    import torch

    import fce
    import train

    torch.set_num_threads(1)
    args = train.get_args(["--dataset", dataset, "--rule", "every"])
    x_train = datasets.sample(dataset, 20_000, seed)
    batch_at = lambda s: x_train[(s % 78) * args.batch:(s % 78 + 1) * args.batch]  # noqa: E731
    kinds = {}
    torch.manual_seed(seed)
    nce_args = train.get_args(["--dataset", dataset, "--estimator", "nce"])
    ebm, gauss = train.make_models(nce_args, x_train, "cpu")
    opt_ebm, _ = train.make_optimizers(nce_args, ebm, gauss)
    nce_c = train.make_contrast(nce_args, gauss, x_train, "cpu")
    kinds["nce step"] = lambda s: fce.fce_step(ebm, nce_c, s, batch_at(s), batch_at, opt_ebm,
                                               None, fce.Rule())
    window = max(1, args.flow_every - 1)
    for name in flows:
        fa = train.get_args(["--dataset", dataset, "--flow", name, "--rule", "every"])
        e, f = train.make_models(fa, x_train, "cpu")
        oe, of = train.make_optimizers(fa, e, f)
        c = train.make_contrast(fa, f, x_train, "cpu")
        c.window = window
        no_flow = dataclasses.replace(train.rule(fa), flow_every=10 ** 9)
        always = dataclasses.replace(train.rule(fa), flow_every=1)
        alone = dataclasses.replace(train.rule(fa), name="threshold")

        def refresh(s, c=c):  # the window's pass, as after a flow step
            c.flow_changed()
            c.cached(s, batch_at)
        kinds[f"fce-{name}: EBM step (cached noise)"] = (
            lambda s, e=e, c=c, oe=oe, of=of, r=no_flow: fce.fce_step(e, c, s, batch_at(s),
                                                                      batch_at, oe, of, r))
        kinds[f"fce-{name}: noise pass (one per flow update)"] = refresh
        kinds[f"fce-{name}: EBM + flow step"] = (
            lambda s, e=e, c=c, oe=oe, of=of, r=always: fce.fce_step(e, c, s, batch_at(s),
                                                                     batch_at, oe, of, r))
        kinds[f"fce-{name}: flow step alone (threshold rule)"] = (
            lambda s, e=e, c=c, oe=oe, of=of, r=alone: fce.fce_step(e, c, s, batch_at(s),
                                                                    batch_at, oe, of, r, True))
    times = {k: [] for k in kinds}
    step = 0
    for _ in range(blocks):
        for k, fn in kinds.items():
            t = time.process_time()
            for i in range(per_block):
                fn(step + i)
            times[k].append(1000 * (time.process_time() - t) / per_block)
        step += per_block
    ms = {k: statistics.median(v) for k, v in times.items()}
    nce = ms["nce step"]
    lines = [f"One thread, {dataset}, batch {args.batch}, EBM {args.ebm_hidden}, noise window "
             f"{window} iterations (--flow_every {args.flow_every}); median of {blocks} "
             f"interleaved blocks of {per_block} iterations.", ""]
    rows = []
    for k, v in ms.items():
        note = (f"{v / nce:.2f}x" if "noise pass" not in k else
                f"{v / window / nce:.2f}x per iteration ({window} iterations per pass)")
        rows.append([k, f"{v:.2f}", note])
    lines += gather.table(["kind", "CPU-ms", "/ NCE step"], rows)
    print("\n".join(lines), flush=True)
    return lines


# ----------------------------------------------------------------------------- CLI
def build_parser():
    p = config.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(TOY), choices=datasets.NAMES)
    p.add_argument("--estimators", nargs="+", default=list(DEFAULT_ESTIMATORS),
                   choices=list(ESTIMATORS))
    p.add_argument("--seeds", nargs="+", type=config.seed, default=[0, 1, 2])
    p.add_argument("--budget", type=config.positive_float, default=40.0,
                   help="CPU-seconds of training per run")
    p.add_argument("--jobs", type=config.positive_int, default=1,
                   help="runs at a time (one CPU thread each)")
    p.add_argument("--root", default="runs/bench", help="folder of the runs (kept: resumable)")
    p.add_argument("--out", default=None,
                   help="write table.md, kl_ebm.png and grid.png (the density grid) here")
    p.add_argument("--train_args", default="",
                   help='more train.py flags for every run, e.g. "--lr_ebm 2e-3"')
    p.add_argument("--only", choices=["grid", "report", "flows", "cost"], default=None,
                   help="grid: run and report; report: report finished runs; flows: vs zuko; "
                        "cost: one iteration's CPU time split into EBM, flow and noise")
    p.add_argument("--flow_datasets", nargs="+", default=["8gaussians", "checkerboard", "rings"],
                   choices=datasets.NAMES)
    p.add_argument("--flow_steps", type=config.positive_int, default=5000)
    p.add_argument("--flows", nargs="+", default=["nsf"], choices=["nsf", "maf"],
                   help="flows compared with zuko's")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.only == "report" and not os.path.isdir(args.root):
        config.fail(f"--root {args.root} does not exist; pass the folder of the runs")
    failed = 0
    if args.only in (None, "grid"):
        try:
            failed = run_grid(args)
        except runner.Stopped:
            return runner.stopped("bench/fce.py")
    if args.only in (None, "grid", "report") and report(args) is None:
        failed += 1
    if args.only in (None, "cost"):
        lines = step_cost()
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "cost.md"), "w") as fh:
                fh.write("\n".join(lines) + "\n")
    if args.only in (None, "flows"):
        lines = flows_vs_zuko(args.flows, args.flow_datasets, args.flow_steps)
        if args.out and lines:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "flows_vs_zuko.md"), "w") as fh:
                fh.write("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(config.cli(main))
