"""Every estimator on the 8x8 digits as a 64-dimensional density, at an equal CPU budget per
run, scored in nats per image (numbers for README and docs/digits.md; not a test).

    python -m bench.digits --jobs 2                      # every estimator x seeds 0 1 2
    python -m bench.digits --estimators nce fce-glow --seeds 0 --budget 60
    python -m bench.digits --report                      # the table of the finished runs only
    python -m bench.digits --roots runs/a runs/b --out docs/digits   # LL against CPU figure

Each run is the real entry script in its own process (one thread, wandb off): train.py for
NCE, FCE, the flows alone and score matching (`--dataset digits`), train_mcmc.py for short-run
MCMC maximum likelihood (the two regimes of bench/mcmc_images.py). Each trains for `--budget` CPU-seconds.
Then `python -m bench.digits --score <run>` (its own process) writes <run>/score.json:

- the test log-likelihood of the dequantised held-out digits (image_data.py), in nats per
  image on the [0, 17) scale and bits per dimension: exact for a flow; for an EBM the bracket
  of annealed importance sampling (annealing.loglik_bracket: forward AIS from the base gives the
  upper end, reverse AIS started at the test images the lower end), with the gap, the base
  (a tilt's own base given the box, moved by independence moves; else HMC in the box's
  whitened coordinates from N(0, I)), the forward ESS and the acceptance;
- samples: 1000 of the model (a flow's own; an EBM's from forward AIS chains; short-run MCMC's
  own short-run chains from its initialisation) scored by image_metrics.SampleMetric (FD of
  classifier features to the held-out digits, and label TV) beside the FD of 1000 real training
  digits (the floor).

Resumable: a finished run (summary.json) is not trained again, an interrupted one resumes,
a scored run (score.json) is not scored again. Runs live in <root>/<label>-digits-s<seed>/.
Writes <out>/table.md (mean ± sd over seeds) and <out>/samples.png (100 samples per
estimator, of the first seed, beside 100 real held-out digits).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

if not __package__:  # run as a file (python bench/x.py): the repository root, not bench/, first
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import config
from bench import gather, runner

# the tilt's g before the default on images widened it (64-256-256-1, |g| < 4): a short run's
# g, which has about 10 CPU-s at 120 CPU-s (docs/digits.md, "The g")
G_SMALL = ["--ebm_hidden", "256", "256", "--tilt_bound", "4"]
ESTIMATORS = {  # label: (script, flags)
    "tilt": ("train.py", ["--estimator", "tilt"]),  # the default: autoregressive NSF flows
    "tilt-1flow": ("train.py", ["--estimator", "tilt", "--base_flows", "1", "--base_schedule",
                                "share", *G_SMALL]),  # one, on the schedule over its share
    "tilt-coupling": ("train.py", ["--estimator", "tilt", "--flow", "nsf_coupling",
                                   "--base_share", "0.5", "--bank", "50000", *G_SMALL]),
    "tilt-nce": ("train.py", ["--estimator", "tilt", "--tilt_loss", "nce"]),
    "nce": ("train.py", ["--estimator", "nce"]),
    "fce-maf": ("train.py", ["--estimator", "fce", "--flow", "maf"]),
    "fce-glow": ("train.py", ["--estimator", "fce", "--flow", "glow"]),
    "fce-nsf": ("train.py", ["--estimator", "fce", "--flow", "nsf_coupling"]),
    "fce-tilt": ("train.py", ["--estimator", "fce", "--flow", "nsf_coupling", "--ebm_on_flow"]),
    "mle-maf": ("train.py", ["--estimator", "mle", "--flow", "maf"]),
    "mle-glow": ("train.py", ["--estimator", "mle", "--flow", "glow"]),
    "mle-nsf": ("train.py", ["--estimator", "mle", "--flow", "nsf"]),
    "mle-nsf_coupling": ("train.py", ["--estimator", "mle", "--flow", "nsf_coupling"]),
    "dsm": ("train.py", ["--estimator", "dsm"]),
    "ssm": ("train.py", ["--estimator", "ssm"]),
    "mcmc-nonconvergent": ("train_mcmc.py", "nonconvergent"),  # AIS + samples: see load_mcmc
    "mcmc-convergent": ("train_mcmc.py", "convergent"),
}
N_SAMPLES = 1000
AIS = dict(n_chains=100, n_temps=300, repeats=2)
SAMPLE_TEMPS = 50  # annealing steps of the forward-AIS chains whose ends are an EBM's samples
KEYS = ["ll_ebm", "trusted", "ll_lower", "ll_upper", "ais_gap", "bpd_lower", "bpd_upper",
        "ll_flow", "ll_flow_box", "tilt_gain", "is_ess", "c_gap", "fd", "fd_ratio", "label_tv",
        "ais_ess", "cpu_s", "steps"]
REFERENCES = ("uniform", "categorical", "gaussian")  # references.ladder: closed forms


# ----------------------------------------------------------------------------- training
def run_dir(root, label, seed):
    return os.path.join(root, runner.run_name(label, "digits", seed=seed))


def train_argv(label, budget, seed, out, ais=AIS):
    """The entry script and its flags for one run of `label`."""
    script, flags = ESTIMATORS[label]
    if script == "train.py":
        return script, [*flags, "--dataset", "digits", "--seed", str(seed), "--budget",
                        str(budget), "--epoch", "1000000", "--eval_every", "1000000",
                        "--plot_every", "1000000", "--image_dir", os.path.join(out, "images"),
                        "--ais_chains", str(ais["n_chains"]), "--ais_temps",
                        str(ais["n_temps"])]
    from bench.mcmc_images import regime_argv  # the regimes' settings live there

    return script, [*regime_argv(flags), "--seed", str(seed), "--budget", str(budget),
                    "--image_dir", os.path.join(out, "images")]


def one_run(args, label, seed):
    """Train (unless finished) and score (unless scored) one run; returns its exit status."""
    out = run_dir(args.root, label, seed)
    os.makedirs(args.root, exist_ok=True)
    t = time.time()
    script, argv = train_argv(label, args.budget, seed, out, ais_settings(args))
    code = runner.run_script(script, out, argv, log=f"{out}.log")
    if code == 0 and not os.path.isfile(os.path.join(out, "score.json")):
        code = runner.run_process(["-m", "bench.digits", "--score", out, "--ais_chains",
                                   str(args.ais_chains), "--ais_temps", str(args.ais_temps),
                                   "--sample_temps", str(args.sample_temps)],
                                  log=f"{out}.log")
    print(f"{'ok ' if code == 0 else f'FAILED ({code})'} {out} ({time.time() - t:.0f} s)",
          flush=True)
    return code


# ----------------------------------------------------------------------------- scoring
def ais_settings(args):
    return dict(AIS, n_chains=args.ais_chains, n_temps=args.ais_temps)


def load_model(out, sample_temps=SAMPLE_TEMPS):
    """(energy or None, flow or None, samples(n) -> tensor, config) of a finished run."""
    import checkpoint
    import tasks
    import train

    run = checkpoint.load_run(out)
    cfg = run.config
    if run.checkpoint.get("script") == "train_mcmc.py":
        return load_mcmc(out, run)
    args = train.get_args(["--dataset", "digits", "--seed", str(cfg["seed"])])
    task = tasks.make_task(args, "cpu")
    if run.ebm is None:
        return None, run.flow, (lambda n: run.flow.sample(n)), task
    flow = run.flow if cfg.get("estimator") in ("fce", "tilt") else None
    return run.ebm, flow, (lambda n: task.samples(run.ebm, n, n_temps=sample_temps)), \
        task


def load_mcmc(out, run):
    """A train_mcmc.py run: its energy U = F * 2 / eps^2 (exp(-U) is the model, on the box
    like every image EBM here) and its own short-run sampler (L Langevin steps of size eps
    from its initialisation: noise, or the persistent bank)."""
    from types import SimpleNamespace

    import tasks
    import train
    import train_mcmc
    from ebm import load_image_ebm
    from image_data import load_images

    cfg = run.config
    U = load_image_ebm(run.checkpoint)
    task = tasks.make_task(train.get_args(["--dataset", "digits", "--seed", str(cfg["seed"])]),
                           "cpu")
    x_train = load_images("digits")[0]
    chains = train_mcmc.Chains(SimpleNamespace(**cfg), U, x_train, run.checkpoint.get("bank"))
    return U, None, chains.short_run, task


def score(out, ais=AIS, sample_temps=SAMPLE_TEMPS):
    """Write <out>/score.json (module docstring) and return it."""
    import torch

    import image_data
    import image_metrics

    torch.set_num_threads(1)
    torch.manual_seed(0)
    summary = runner.finished(out) or {}
    energy, flow, sample, task = load_model(out, sample_temps)
    task.ais = dict(ais)
    s = {"cpu_s": runner.cpu_seconds(summary), "steps": summary.get("steps")}
    if flow is not None and "ll_flow" in summary:
        s.update(ll_flow=summary["ll_flow"], ll_flow_box=summary["ll_flow_box"])
    if energy is None:  # exact; the flow on the box
        s["ll_lower"] = s["ll_upper"] = s["ll_ebm"] = s["ll_flow_box"]
        s["ais_gap"], s["trusted"] = 0.0, 1.0
    else:  # the AIS bracket of the run's final evaluation (train.py), else computed here
        b = summary if "ll_ebm_lower" in summary else task.evaluate(energy, None, final=True)
        s.update(ll_lower=b["ll_ebm_lower"], ll_upper=b["ll_ebm_upper"], ais_gap=b["ais_gap"],
                 ais_ess=b["ais_ess"], **{k: b[k] for k in ("c_gap", "tilt_gain", "is_ess")
                                          if k in b})
        s["ll_ebm"] = b["ll_ebm"]
        if "tilt_gain" in b and "ll_flow_box" in s:  # over the base on the box
            s["tilt_gain"] = s["ll_ebm"] - s["ll_flow_box"]
        s["trusted"] = float(b["ll_ebm_trusted"])
    s["bpd_lower"], s["bpd_upper"] = (-s[k] / (64 * math.log(2)) for k in ("ll_upper", "ll_lower"))
    x_train, y_train, x_test, y_test = image_data.load_images("digits")
    metric = image_metrics.SampleMetric(x_train, y_train, x_test, y_test, n=N_SAMPLES)
    with torch.no_grad():
        x = sample(N_SAMPLES).detach().float()
    m = metric(x)
    s.update(fd=m["fd"], label_tv=m["label_tv"], fd_floor=metric.floor["fd"],
             fd_ratio=m["fd"] / metric.floor["fd"])
    torch.save(x[:100].cpu(), os.path.join(out, "samples.pt"))
    with open(os.path.join(out, "score.json"), "w") as fh:
        json.dump(s, fh, indent=1)
    print(json.dumps(s))
    return s


# ----------------------------------------------------------------------------- report
def collect(args):
    rows = []
    for label in args.estimators:
        for seed in args.seeds:
            out = run_dir(args.root, label, seed)
            try:
                with open(os.path.join(out, "score.json")) as fh:
                    rows.append({"label": label, "dataset": "digits", "seed": seed,
                                 **json.load(fh)})
            except (OSError, ValueError):
                continue
    return rows


def report(args):
    import tasks

    rows = collect(args)
    if not rows:
        print(f"bench/digits.py: no scored runs under {args.root}: nothing written",
              file=sys.stderr)
        return None
    agg, ais = gather.aggregate(rows, KEYS), ais_settings(args)
    agg.sort(key=lambda a: list(ESTIMATORS).index(a["label"]))
    refs = [[name, "closed form", f"{value:.1f}", *["n/a"] * (len(KEYS) - 1)]
            for name, value in ladder().items()]
    lines = [f"Equal budget: {args.budget:g} CPU-seconds of training per run; mean ± sd over "
             f"seeds {' '.join(map(str, args.seeds))}. Test log-likelihood of the 449 held-out "
             f"digits, dequantised, in nats per image (bits per dimension: bpd); EBMs by AIS "
             f"({ais['repeats']} x {ais['n_chains']} chains, {ais['n_temps']} temperatures, "
             f"HMC in the box's whitened coordinates; a tilt's from its base given the box, "
             f"{min(ais['n_temps'], tasks.TILT_AIS_TEMPS)} temperatures, independence moves); "
             f"`ll_ebm` the best estimate (a tilt's importance sampling, else forward AIS), "
             f"`trusted` the share of seeds whose two estimates agree (tasks.trust).",
             "", *gather.table(["estimator", "seeds", *KEYS],
                               refs + [[a["label"], a["n"], *(gather.cell(a, k) for k in KEYS)]
                                       for a in agg])]
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "table.md"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
        print(f"wrote {figure(args, [a['label'] for a in agg])}")
    return lines


def budget_figure(args):
    """Test log-likelihood (`ll_ebm`: an EBM's best estimate, a flow's exact value on the box)
    against the training CPU-seconds of each budget's runs (--roots, one per budget), mean and
    sd over the seeds found, one line per estimator, the closed-form rungs as horizontal
    lines; written to <out>/budgets.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import plots

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label in args.estimators:
        pts = []
        for root in args.roots:
            rows = collect(argparse.Namespace(estimators=[label], seeds=args.seeds, root=root))
            if rows:
                ll = [r["ll_ebm"] for r in rows]
                pts.append((statistics.mean(r["cpu_s"] for r in rows), statistics.mean(ll),
                            statistics.stdev(ll) if len(ll) > 1 else 0.0))
        if pts:
            x, y, e = zip(*sorted(pts))
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=label)
    for name, value in ladder().items():
        if name != "uniform":
            ax.axhline(value, ls=":", color="grey", lw=1)
            ax.annotate(name, (ax.get_xlim()[0], value), fontsize=7, color="grey",
                        va="bottom")
    ax.set_xlabel("training CPU-seconds (mean over seeds)")
    ax.set_ylabel("test log-likelihood, nats per image")
    ax.legend(fontsize=7)
    return plots._save(fig, os.path.join(args.out, "budgets.png"),
                       "8x8 digits: test log-likelihood against training CPU")


def ladder():
    """The closed-form rungs (references.py) on the digits task: nats per image."""
    import references
    import tasks
    import train

    task = tasks.make_task(train.get_args(["--dataset", "digits"]), "cpu")
    return {k: v for k, v in references.ladder(task).items() if k in REFERENCES}


def figure(args, labels):
    """100 samples per estimator (first seed) beside 100 real held-out digits."""
    import torch

    import image_data
    import plots

    shape = (1, 8, 8)
    panels = [("real digits (held out)", plots.images(image_data.load_images("digits")[2][:100],
                                                     shape))]
    for label in labels:
        path = os.path.join(run_dir(args.root, label, args.seeds[0]), "samples.pt")
        if os.path.isfile(path):
            panels.append((label, plots.images(torch.load(path), shape)))
    return plots.save_panels(os.path.join(args.out, "samples.png"), panels,
                             rows=math.ceil(len(panels) / 4), size=2.6)


# ----------------------------------------------------------------------------- main
def build_parser():
    p = config.Parser(description=__doc__.split("\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--estimators", nargs="+", choices=list(ESTIMATORS), default=list(ESTIMATORS))
    p.add_argument("--seeds", type=config.seed, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=config.positive_float, default=120.0,
                   help="CPU-seconds of training per run")
    p.add_argument("--jobs", type=config.positive_int, default=1, help="runs at a time")
    p.add_argument("--root", default=os.path.join("runs", "bench_digits"))
    p.add_argument("--out", default=os.path.join("docs", "digits"),
                   help="where table.md and samples.png go ('' for nowhere)")
    p.add_argument("--ais_chains", type=config.positive_int, default=AIS["n_chains"],
                   help="AIS chains per repeat (2 repeats) of an EBM's bracket")
    p.add_argument("--ais_temps", type=config.positive_int, default=AIS["n_temps"],
                   help="AIS temperatures of an EBM's bracket")
    p.add_argument("--sample_temps", type=config.positive_int, default=SAMPLE_TEMPS,
                   help="annealing steps of an EBM's sample chains")
    p.add_argument("--report", action="store_true", help="only the table of scored runs")
    p.add_argument("--roots", nargs="+", default=None, metavar="ROOT",
                   help="only the figure of test log-likelihood against CPU over these roots "
                        "(one per budget), written to <out>/budgets.png")
    p.add_argument("--score", metavar="RUN", help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.score:
        score(args.score, ais_settings(args), args.sample_temps)
        return 0
    if args.roots:
        print(f"wrote {budget_figure(args)}")
        return 0
    failed = 0
    if not args.report:
        jobs = [(lab, s) for s in args.seeds for lab in args.estimators]
        print(f"{len(jobs)} runs of {args.budget:g} CPU-s in {args.root} ({args.jobs} at a "
              f"time)", flush=True)
        try:
            failed = sum(c != 0 for c in runner.run_many(lambda j: one_run(args, *j), jobs,
                                                         args.jobs))
        except runner.Stopped:
            return runner.stopped("bench/digits.py")
    report(args)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(config.cli(main))
