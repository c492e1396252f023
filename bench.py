"""Benchmarks of the FCE/NCE core (numbers for README; not a test).

    python bench.py                     # estimators x datasets table + MAF step vs zuko
    python bench.py --only zuko         # just the MAF maximum-likelihood step timing
    python bench.py --datasets 8gaussians --epoch 60

Table: each (estimator, dataset) runs the real `train.py` (wandb off, one thread) and reads
its own metrics back: seconds per iteration (training loop only, from the logged it/s) and
the final exact grid evaluation. Runs are single-threaded, so CPU seconds per iteration are
what the wall clock shows on an idle machine; both are printed. MAF step: maximum likelihood, batch 1000, 5 MADE layers
with two hidden layers of 64, one CPU thread, median over interleaved repeats, ours against
zuko's MAF (`pip install zuko`; skipped when absent).
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import torch

import datasets
import plots
import train
import util
from flows import build_flow
from logger import read_metrics

ESTIMATORS = {"FCE (MAF)": "maf", "FCE (Glow)": "glow", "NCE (Gaussian)": "gaussian"}


def run_one(flow, dataset, epoch, seed, root, extra=()):
    out = os.path.join(root, f"{flow}-{dataset}")
    code = train.main(["--flow", flow, "--dataset", dataset, "--epoch", str(epoch),
                       "--seed", str(seed), "--wandb", "disabled", "--out_dir", out,
                       "--image_dir", os.path.join(out, "images"), "--eval_every", str(epoch),
                       "--plot_every", str(epoch), "--threads", "1", *extra])
    rows = read_metrics(out)
    speeds = [r["it_per_s"] for r in rows if "it_per_s" in r]
    cpu = [r["cpu_s_per_it"] for r in rows if "cpu_s_per_it" in r]
    summary = json.load(open(os.path.join(out, "summary.json"))) if code == 0 else {}
    nan = float("nan")
    return {"status": "ok" if code == 0 else f"failed ({code})",
            "s_per_it": 1 / statistics.median(speeds) if speeds else nan,
            "cpu_per_it": statistics.median(cpu) if cpu else nan, **summary}


def gallery_panels(out, dataset):
    """(data, flow, EBM) panels of a finished run, for the gallery figure."""
    run = util.load_run(out)
    x = datasets.sample(dataset, 20000, 0)
    name = run.config["flow"]
    return [(f"{dataset}: data", plots.samples(x)),
            (f"{name} q", plots.density(run.flow.log_prob, normalise=False)),
            ("EBM p", plots.density(lambda v: -run.ebm(v)))]


def table(args):
    root = tempfile.mkdtemp(prefix="bench-")
    panels = []
    lines = ["| estimator | dataset | CPU s / it | wall s / it | EBM NLL | flow NLL | entropy H | "
             "KL(p_data \\|\\| p_theta) | c - log Z | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda m, k: f"{m[k]:.4f}" if k in m else "n/a"  # noqa: E731
    for est, flow in ESTIMATORS.items():
        if args.estimators and flow not in args.estimators:
            continue
        for ds in args.datasets:
            m = run_one(flow, ds, args.epoch, args.seed, root, args.train_args.split())
            lines.append(f"| {est} | {ds} | {m['cpu_per_it']:.4f} | {m['s_per_it']:.4f} | "
                         f"{fmt(m, 'nll_ebm')} | "
                         f"{fmt(m, 'nll_flow')} | {fmt(m, 'entropy')} | {fmt(m, 'kl_ebm')} | "
                         f"{fmt(m, 'c_gap')} | {m['status']} |")
            print(lines[-1], flush=True)
            if args.gallery and m["status"] == "ok":
                panels += gallery_panels(os.path.join(root, f"{flow}-{ds}"), ds)
    if args.gallery and panels:
        plots.save_panels(args.gallery, panels, rows=len(panels) // 3, size=2.2)
        print(f"wrote {args.gallery}")
    return lines


def time_steps(step, n, repeats):
    """Median seconds per call of step() over `repeats` blocks of n calls."""
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            step()
        out.append((time.perf_counter() - t) / n)
    return out


def maf_vs_zuko(steps=100, repeats=5):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = datasets.sample("8gaussians", 1000, 0)
    ours = build_flow("maf", n_blocks=5, hidden=(64, 64))
    models = {"ours (flows.maf)": (ours, lambda: ours.log_prob(x))}
    try:
        import zuko

        z = zuko.flows.MAF(features=2, transforms=5, hidden_features=(64, 64))
        models["zuko.flows.MAF"] = (z, lambda: z().log_prob(x))
    except ImportError:
        print("zuko not installed: `pip install zuko` to compare")
    opts = {k: torch.optim.Adam(m.parameters(), 1e-3) for k, (m, _) in models.items()}

    def stepper(k):
        def step():
            loss = -models[k][1]().mean()
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()
        return step

    times = {k: [] for k in models}
    for _ in range(repeats):  # interleave so that machine load hits both alike
        for k in models:
            stepper(k)()  # warm-up
            times[k] += time_steps(stepper(k), steps, 1)
    lines = ["| MAF maximum-likelihood step (batch 1000, 5 x MADE(64, 64), 1 thread) | "
             "median ms / step | min ms / step |", "|---|---|---|"]
    for k, ts in times.items():
        lines.append(f"| {k} | {1000 * statistics.median(ts):.1f} | {1000 * min(ts):.1f} |")
    for line in lines:
        print(line)
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=["8gaussians", "checkerboard", "spiral",
                                                     "rings"],
                   choices=datasets.NAMES)
    p.add_argument("--estimators", nargs="+", choices=list(ESTIMATORS.values()), default=None)
    p.add_argument("--epoch", type=int, default=60, help="epochs of 100 iterations per run")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--only", choices=["table", "zuko"], default=None)
    p.add_argument("--out", default=None, help="also write the markdown tables to this file")
    p.add_argument("--train_args", default="",
                   help='more train.py flags for every run, e.g. "--lr_ebm 1e-3"')
    p.add_argument("--gallery", default=None,
                   help="also save a figure: data, flow and EBM density of every run")
    args = p.parse_args(argv)
    lines = []
    if args.only != "table":
        lines += maf_vs_zuko() + [""]
    if args.only != "zuko":
        lines += table(args)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
