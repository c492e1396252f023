"""The estimator comparison: every estimator on every toy set, measured exactly, at an equal
CPU-second budget per run (numbers for README and docs/fce.md; not a test).

    python bench.py --jobs 2                          # 5 estimators x 9 datasets x 3 seeds
    python bench.py --datasets rings --seeds 0 --budget 30
    python bench.py --only flows                      # NSF / MAF against zuko: step time, NLL

Grid: each run is the real `train.py` in its own process (one thread, wandb off) with the
estimator's flags on top of train.py's defaults, `--budget` CPU-seconds of training (each
estimator runs as many iterations as fit) and one exact evaluation at the end. Runs live in
`<root>/<label>-<dataset>-s<seed>/`; a finished run (summary.json) is kept and skipped, an
interrupted one resumes from its checkpoint (scaffold.run_script), so a benchmark stopped by
Ctrl-C continues where it stopped when the same command runs again.
The table (mean ± sd over seeds, via gather.py) and a figure grid (rows: datasets; columns:
data and each estimator's density, the EBM's or, for mle, the flow's) are written to --out.

Flows: maximum-likelihood steps (batch 1000, Adam 1e-3, one thread) of our NSF and MAF against
zuko's with the same architecture, interleaved so machine load hits both alike, and the test
NLL each reaches after --flow_steps steps (`pip install zuko`; skipped when absent).
"""
import os
import statistics
import sys
import time

import config
import datasets
import gather
import scaffold

ROOT = os.path.dirname(os.path.abspath(__file__))
ESTIMATORS = {  # label: train.py flags on top of its defaults
    "nce": ["--estimator", "nce"],
    "fce-maf": ["--estimator", "fce", "--flow", "maf"],
    "fce-glow": ["--estimator", "fce", "--flow", "glow"],
    "fce-nsf": ["--estimator", "fce", "--flow", "nsf"],
    "mle-nsf": ["--estimator", "mle", "--flow", "nsf"],
}
TOY = ("8gaussians", "spiral", "2spirals", "checkerboard", "rings", "pinwheel", "moons",
       "circles", "swissroll")
KEYS = ["kl_ebm", "nll_ebm", "kl_flow", "nll_flow", "entropy", "steps", "cpu_s"]


# ----------------------------------------------------------------------------- the grid
def run_dir(root, label, dataset, seed):
    return os.path.join(root, f"{label}-{dataset}-s{seed}")


def run_one(root, label, dataset, seed, budget, extra=()):
    """One train.py run in its own process (scaffold.run_script: finished runs are kept, an
    interrupted one resumes); returns (run folder, exit code). Output in <run folder>.log."""
    out = run_dir(root, label, dataset, seed)
    os.makedirs(root, exist_ok=True)
    argv = [*ESTIMATORS[label], "--dataset", dataset, "--seed", str(seed), "--budget",
            str(budget), "--epoch", "100000", "--eval_every", "100000", "--plot_every",
            "100000", "--image_dir", os.path.join(out, "images"), *extra]
    return out, scaffold.run_script("train.py", out, argv, log=f"{out}.log")


def run_grid(args):
    """Every run of the grid, --jobs at a time; returns the number that failed."""
    # seed by seed, so that an interrupted benchmark holds whole seeds
    jobs = [(lab, ds, s) for s in args.seeds for ds in args.datasets for lab in args.estimators]
    print(f"{len(jobs)} runs of {args.budget:g} CPU-s in {args.root} ({args.jobs} at a time)",
          flush=True)

    def one(job):
        t = time.time()
        out, code = run_one(args.root, *job, args.budget, args.train_args.split())
        print(f"{'ok ' if code == 0 else f'FAILED ({code})'} {out} ({time.time() - t:.0f} s)",
              flush=True)
        return code

    return sum(c != 0 for c in scaffold.run_many(one, jobs, args.jobs))


def gallery(agg, root, seed, path):
    """Rows: datasets; columns: data and each estimator's density (seed `seed`)."""
    import plots
    import util

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
            run = util.load_run(out)
            fn = (lambda v, r=run: -r.ebm(v)) if run.ebm is not None else run.flow.log_prob
            panels.append((lab, plots.density(fn, n=120)))
    return plots.save_panels(path, panels, rows=len(data), size=1.9)


def report(args):
    """Table and figures of the finished runs under --root; None (and nothing written, so
    the figures in --out are never replaced by empty ones) when there are none."""
    rows = [r for r in gather.collect([args.root]) if r["dataset"] in args.datasets
            and r["label"] in args.estimators] if os.path.isdir(args.root) else []
    if not rows:
        print(f"bench.py: no finished runs under {args.root}: nothing written", file=sys.stderr)
        return None
    agg = gather.aggregate(rows, KEYS)
    lines = [f"Equal budget: {args.budget:g} CPU-seconds of training per run; mean ± sd over "
             f"seeds {' '.join(map(str, args.seeds))}.", "", gather.markdown(agg, KEYS)]
    print("\n".join(lines))
    summary = kl_pivot(agg)
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


def kl_pivot(agg):
    """One line per estimator, one column per dataset: the exact KL(p_data || model) of its
    density model (the EBM; the flow for mle), mean over seeds; the best EBM KL in bold."""
    data = list(dict.fromkeys(a["dataset"] for a in agg))
    labels = list(dict.fromkeys(a["label"] for a in agg))
    cells = {(a["label"], a["dataset"]): a.get("kl_ebm", a.get("kl_flow")) for a in agg}
    best = {ds: min((v for (lab, d), v in cells.items() if d == ds and v is not None
                     and not lab.startswith("mle")), default=None) for ds in data}
    lines = ["| KL(p_data \\|\\| model) | " + " | ".join(data) + " |",
             "|---|" + "---|" * len(data)]
    for lab in labels:
        row = []
        for ds in data:
            v = cells.get((lab, ds))
            txt = "n/a" if v is None else f"{v:.4f}"
            row.append(f"**{txt}**" if v is not None and v == best[ds] else txt)
        lines.append(f"| {lab}{' (flow)' if lab.startswith('mle') else ''} | " + " | ".join(row) + " |")
    return "\n".join(lines)


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
    lines = ["| flow | dataset | ours: ms / step | zuko: ms / step | ours: test NLL | "
             "zuko: test NLL | entropy H |", "|---|---|---|---|---|---|---|"]
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
            lines.append(f"| {name} | {ds} | {1000 * statistics.median(times['ours']):.1f} | "
                         f"{1000 * statistics.median(times['zuko']):.1f} | {nll['ours']:.3f} | "
                         f"{nll['zuko']:.3f} | {datasets.entropy(ds):.3f} |")
            print(lines[-1], flush=True)
    return lines


# ----------------------------------------------------------------------------- CLI
def build_parser():
    p = config.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(TOY), choices=datasets.NAMES)
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS))
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
    p.add_argument("--only", choices=["grid", "report", "flows"], default=None,
                   help="grid: run and report; report: report finished runs; flows: vs zuko")
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
        except scaffold.Stopped:
            return scaffold.stopped("bench.py")
    if args.only in (None, "grid", "report") and report(args) is None:
        failed += 1
    if args.only in (None, "flows"):
        lines = flows_vs_zuko(args.flows, args.flow_datasets, args.flow_steps)
        if args.out and lines:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "flows_vs_zuko.md"), "w") as fh:
                fh.write("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(config.cli(main))
