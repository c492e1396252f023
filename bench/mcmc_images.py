"""Benchmark of short-run MCMC learning on digits: both regimes, two seeds, long-run chains,
and the speed of the image Langevin loop. Prints one table.

    python -m bench.mcmc_images                    # train what is missing, sample, print the table
    python -m bench.mcmc_images --seeds 0 1 --steps 10000 --n 1000
    python -m bench.mcmc_images --regimes convergent --seeds 0 --no_speed
    python -m bench.mcmc_images --speed_only
    python -m bench.mcmc_images --figures          # also docs/figures/mcmc_digits_*.png
    python -m bench.mcmc_images --no_train --no_speed --figures   # finished runs only

Resumable: finished runs (<--runs_dir, default runs/bench_mcmc_images_v2>/mcmc-digits-<regime>-
s<seed>/summary.json with status "done") and finished long runs (images/<runs_dir name>/<run>/
longrun_ula_<init>.json with the same settings) are kept and skipped; an interrupted
training run is continued from its checkpoint, any other unfinished folder started again
(--overwrite). Each run is its own process with one torch thread (`--threads 1`); CPU seconds
are process CPU time. With --no_train nothing is trained or sampled: the table and figures
use the finished runs and long runs only, and with none of them nothing is written (the docs
figures stay as they are) and the exit status is 1.

A regime's training flags are configs/mcmc_digits_<regime>.json with the flags of REGIMES
over it (regime_argv). Per run: the sample metric of the short-run samples at the end of
training (train_mcmc.py's last evaluation, n_eval = --n chains of L steps from the run's own
initialisation), then `sample_mcmc.py --sampler ula --steps S --save_at 0,100,1000,S` with
the same --n chains: the non-convergent run from uniform noise (its own initialisation, so
step 100 is its short run again), the convergent run from training images. FD is the
Frechet distance on the features of the metric's classifier (image_metrics.SampleMetric),
judged against its floor at the same n (the mean FD of n training digits drawn with
replacement, with its sd over the draws); label TV is the total variation of the
predicted-label histogram to the test labels'.

Speed: one Langevin step (batch 100, the digit net) of the straightforward autograd loop
(parameters requiring grad, autograd.grad of F(x).sum(), randn_like and a new x every step)
and of samplers.langevin with samplers.ConvEnergy (its convolution and dense modes in
float32, and its default mode with a bfloat16 gradient), interleaved repeats in this process,
median process CPU time; "(auto)" marks the mode ConvEnergy picks by default.
"""
import json
import os
import shutil
import statistics
import sys
import time

if not __package__:  # run as a file (python bench/x.py): the repository root, not bench/, first
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

import config
from bench import gather, runner
from ebm import ConvEBM
from samplers import ConvEnergy, langevin

# regime -> (long-run start, flags over configs/mcmc_digits_<regime>.json). The convergent
# regime's flags move it towards the paper's convergent ML (Nijkamp et al. 2020, Sec. 5):
# persistent chains (the config's), smaller Langevin steps (eps 0.03 -> 0.02), more steps
# per update (L 100 -> 200), a lower final learning rate reached later (0.2 -> 0.01 instead
# of 0.02, decay x0.9991 per iteration), twice the iterations (4,000), and data noise of one
# grey level (the digits' pixels 2 v / 16 - 1 are 2/16 = 0.125 apart; the config has 0.06).
REGIMES = {
    "nonconvergent": ("uniform", {}),
    "convergent": ("data", {"eps": 0.02, "L": 200, "data_epsilon": 0.125, "lr": 0.15,
                            "lr_decay": 0.9991, "lr_min": 0.01, "steps": 4000,
                            "eval_every": 400}),
}


def regime_argv(regime):
    """train_mcmc.py's flags of a regime: its config file and the flags over it."""
    start, flags = REGIMES[regime]
    cfg = os.path.join(runner.ROOT, "configs", f"mcmc_digits_{regime}.json")
    return ["--config", cfg, *(a for k, v in flags.items() for a in (f"--{k}", str(v)))]


# ----------------------------------------------------------------------------- speed
def naive_langevin(F, x, L, eps):
    """The straightforward loop (reference for the speed-up), as in the paper's code."""
    x = x.clone().requires_grad_(True)
    for _ in range(L):
        g = torch.autograd.grad(F(x).sum(), [x])[0]
        x.data += -g + eps * torch.randn_like(x)
    return x.detach()


def speed(n_fs=(16, 32), L=50, batch=100, repeats=7, eps=0.015):
    """ms per Langevin step, median process CPU time over interleaved repeats."""
    rows = []
    for n_f in n_fs:
        torch.manual_seed(0)
        F = ConvEBM("conv8", (1, 8, 8), n_f)
        x0 = 2 * torch.rand(batch, 64) - 1
        auto = ConvEnergy(F, 2 / eps ** 2).mode
        loops = {
            "straightforward autograd": lambda: naive_langevin(F, x0, L, eps),
            "samplers.langevin + ConvEnergy(mode='conv')": lambda: langevin(
                ConvEnergy(F, 2 / eps ** 2, mode="conv"), x0, L, eps, return_grad_norm=True),
            "samplers.langevin + ConvEnergy(mode='dense')": lambda: langevin(
                ConvEnergy(F, 2 / eps ** 2, mode="dense"), x0, L, eps, return_grad_norm=True),
            f"  bfloat16 gradient, mode='{auto}' (auto)": lambda: langevin(
                ConvEnergy(F, 2 / eps ** 2, dtype=torch.bfloat16), x0, L, eps,
                return_grad_norm=True),
        }
        times = {k: [] for k in loops}
        for fn in loops.values():
            fn()  # warm-up
        for _ in range(repeats):
            for k, fn in loops.items():
                c = time.process_time()
                fn()
                times[k].append((time.process_time() - c) / L * 1e3)
        base = statistics.median(times["straightforward autograd"])
        for k, v in times.items():
            rows.append((n_f, k, statistics.median(v), base / statistics.median(v)))
    print(f"\nms per Langevin step (8x8 digits, batch {batch}, conv8 net, 1 thread, median of "
          f"{repeats} interleaved repeats of {L} steps, process CPU time; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n")
    lines = []
    for n_f, k, ms, up in rows:
        auto = " (auto)" if k.endswith(f"'{ConvEnergy(ConvEBM('conv8', (1, 8, 8), n_f)).mode}')") \
            else ""
        lines.append([f"{n_f}-{2 * n_f}-{4 * n_f}", f"{k}{auto}", f"{ms:.2f}", f"{up:.2f}x"])
    print("\n".join(gather.table(["channels", "Langevin loop", "ms / step", "speed-up"], lines)),
          flush=True)
    return rows


# ----------------------------------------------------------------------------- runs
def run_dir(runs_dir, regime, seed):
    return os.path.join(runs_dir, runner.run_name("mcmc", "digits", regime, seed=seed))


def image_dir(out):
    """A run's own figure folder: images/<runs folder>/<run> (two benchmark roots never
    share one)."""
    out = os.path.normpath(out)
    return os.path.join("images", os.path.basename(os.path.dirname(out)),
                        os.path.basename(out))


def call(args):
    """Run a script of this project in its own process (one thread); Ctrl-C raises
    runner.Stopped, a failure stops the benchmark with one line."""
    argv = [os.path.join(runner.ROOT, args[0]), *args[1:], "--threads", "1"]
    print("$ " + " ".join(argv), flush=True)
    code = runner.run_process(argv)
    if code != 0:
        raise SystemExit(f"bench/mcmc_images.py: {' '.join(argv)} failed "
                         f"(exit {code}); rerun to continue from where it stopped")


def train(regime, seed, runs_dir, n_eval):
    """Train one run (runner.run_script: finished kept, interrupted resumed, anything else
    started afresh); returns its folder. Its evaluations score n_eval chains (the long runs'
    n, so both are judged against the same floor)."""
    out = run_dir(runs_dir, regime, seed)
    argv = [*regime_argv(regime), "--seed", str(seed), "--n_eval", str(n_eval),
            "--image_dir", image_dir(out)]
    print(f"$ train_mcmc.py {' '.join(argv)} --out_dir {out}", flush=True)
    code = runner.run_script("train_mcmc.py", out, argv)
    if code != 0:
        raise SystemExit(f"bench/mcmc_images.py: the run in {out} failed (exit {code}); "
                         f"rerun to continue from where it stopped")
    return out


def long_run_record(out, init, steps, n, seed):
    """The record of a finished long run with these settings, else None."""
    path = os.path.join(image_dir(out), f"longrun_ula_{init}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        rec = json.load(fh)
    return rec if (rec["steps"], rec["n"], rec["seed"]) == (steps, n, seed) else None


def long_run(out, init, steps, n, seed):
    """ULA chains from the run's checkpoint (sample_mcmc.py), unless done with these settings;
    outputs of other settings are replaced (--overwrite)."""
    rec = long_run_record(out, init, steps, n, seed)
    if rec is not None:
        return rec
    save_at = ",".join(str(s) for s in sorted({0, 100, 1000, steps}) if s <= steps)
    call(["sample_mcmc.py", "--run", out, "--sampler", "ula", "--init", init, "--steps",
          str(steps), "--n", str(n), "--save_at", save_at, "--seed", str(seed),
          "--image_dir", image_dir(out), "--overwrite"])
    return long_run_record(out, init, steps, n, seed)


def last_eval(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in rows if "fd" in r][-1]


def judged(m, floor, sd):
    """`FD (ratio x)` of a score against the floor at its n, with a * when it lies beyond
    floor + 3 sd (worse than n real digits score in 99.7% of draws, if normal)."""
    star = "*" if m["fd"] > floor + 3 * sd else ""
    return f"{m['fd']:.1f} ({m['fd'] / floor:.2f}x){star}"


def table(results, steps):
    cols = sorted({r["step"] for res in results for r in res["long"]["results"]})
    lr0 = results[0]["long"]
    floor, sd = lr0["floor"]["fd"], lr0.get("floor_sd", {}).get("fd", float("nan"))
    print(f"\nFD = Frechet distance to 449 held-out digits on classifier features, with FD / "
          f"floor in brackets; floor = mean FD of n training digits drawn with replacement "
          f"(n = {lr0['n']}: {floor:.2f} +- {sd:.2f} sd over {lr0.get('n_floor', '?')} draws; "
          f"* = above floor + 3 sd); short-run: the run's last evaluation, "
          f"{results[0]['eval'].get('n_eval', '?')} chains; long-run: ULA, {lr0['n']} chains, "
          f"eps of the run; label TV to the test-label histogram\n")
    lines = []
    for res in results:
        ev, lr = res["eval"], res["long"]
        by_step = {r["step"]: r for r in lr["results"]}
        lsd = lr.get("floor_sd", {}).get("fd", float("nan"))
        lines.append([f"{res['regime']}", f"{res['seed']}", f"{runner.cpu_seconds(ev):.0f}",
                      judged(ev, ev["fd_floor"], ev.get("fd_floor_sd", float("nan"))),
                      f"{ev['label_tv']:.3f}", f"{lr['init']}",
                      *(judged(by_step[c], lr["floor"]["fd"], lsd) for c in cols),
                      f"{by_step[cols[-1]]['label_tv']:.3f}", f"{runner.cpu_seconds(lr):.0f}"])
    print("\n".join(gather.table(
        ["regime", "seed", "train CPU s", "short-run FD", "short-run label TV",
         "long-run from", *(f"FD @ {c}" for c in cols), f"label TV @ {cols[-1]}",
         "long-run CPU s"], lines)))


# ----------------------------------------------------------------------------- figures
def figures(results, out_dir):
    """Short-run vs long-run grids of both regimes (seed of the first row), stacked; their
    d_t / r_t figures; the gif of each run's negatives. Returns how many files were written."""
    from sample_mcmc import join_images

    seed = results[0]["seed"]
    mine = {r["regime"]: r for r in results if r["seed"] == seed}
    if set(mine) != set(REGIMES):
        print(f"figures: seed {seed} lacks a finished run of "
              f"{', '.join(sorted(set(REGIMES) - set(mine)))}", file=sys.stderr)
        return 0
    grids, diags, gifs = [], [], []
    for regime in ("nonconvergent", "convergent"):
        out = mine[regime]["out"]
        grids.append(os.path.join(image_dir(out), f"longrun_ula_{REGIMES[regime][0]}.png"))
        diags.append(os.path.join(out, "diagnostics.png"))
        gifs.append((os.path.join(image_dir(out), "negatives.gif"),
                     f"mcmc_digits_{regime}_training.gif"))
    missing = [p for p in grids + diags if not os.path.isfile(p)]
    if missing:
        print(f"figures: {missing[0]} is missing", file=sys.stderr)
        return 0
    os.makedirs(out_dir, exist_ok=True)
    written = 0
    for gif, name in gifs:
        if os.path.isfile(gif):
            shutil.copyfile(gif, os.path.join(out_dir, name))
            written += 1
    for fig, paths in (("longrun", grids), ("diagnostics", diags)):
        out = join_images(paths, os.path.join(out_dir, f"mcmc_digits_{fig}.png"),
                          horizontal=False)
        print(f"wrote {out}")
        written += 1
    return written


def build_parser():
    p = config.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=config.seed, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=config.positive_int, default=10000, help="long-run ULA steps")
    p.add_argument("--n", type=config.positive_int, default=1000,
                   help="chains scored, in the long runs and in training's evaluations "
                        "(--n_eval): the metric's floor draws as many real digits")
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES),
                   help="regimes to train and sample (--figures needs both)")
    p.add_argument("--runs_dir", default=os.path.join("runs", "bench_mcmc_images_v2"),
                   help="benchmark root (long runs in images/<its name>/<run>)")
    p.add_argument("--figure_dir", default=os.path.join("docs", "figures"),
                   help="where --figures writes mcmc_digits_*")
    config.add_flag(p, "--speed_only", help="the speed table only")
    config.add_flag(p, "--no_speed", help="skip the speed table")
    config.add_flag(p, "--no_train", help="train and sample nothing: report the finished runs")
    config.add_flag(p, "--figures", help="write docs/figures/mcmc_digits_* (--figure_dir)")
    return p


def runs(args):
    """Train (unless --no_train) and sample every regime and seed; the finished ones."""
    results = []
    for seed in args.seeds:
        for regime in args.regimes:
            init = REGIMES[regime][0]
            if args.no_train:
                out = run_dir(args.runs_dir, regime, seed)
                rec = long_run_record(out, init, args.steps, args.n, seed) \
                    if runner.finished(out) else None
                if rec is None:
                    continue
            else:
                out = train(regime, seed, args.runs_dir, args.n)
                rec = long_run(out, init, args.steps, args.n, seed)
            results.append({"regime": regime, "seed": seed, "out": out, "eval": last_eval(out),
                            "long": rec})
    return results


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.speed_only and (args.no_speed or args.no_train or args.figures):
        config.fail("--speed_only runs the speed table only; drop --no_speed/--no_train/--figures")
    if args.n < 2:
        config.fail("--n must be at least 2 (the sample metric fits a covariance)")
    torch.set_num_threads(1)
    if not args.no_speed:
        speed()
    if args.speed_only:
        return 0
    try:
        results = runs(args)
    except runner.Stopped:
        return runner.stopped("bench/mcmc_images.py")
    if not results:
        print(f"bench/mcmc_images.py: no finished runs with long runs of --steps {args.steps} "
              f"--n {args.n} under {args.runs_dir}: nothing written", file=sys.stderr)
        return 1
    table(results, args.steps)
    if args.figures and figures(results, args.figure_dir) == 0:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(config.cli(main))
