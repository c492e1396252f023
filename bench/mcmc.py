"""Benchmark of short-run MCMC learning: Langevin speed, and the two regimes' numbers.

    python -m bench.mcmc                 # speed table + results of finished runs in runs/
    python -m bench.mcmc --train         # first train the 4 configs (configs/mcmc_*.json)
    python -m bench.mcmc --speed_only
    python -m bench.mcmc --no_speed --figures   # the README figures (images/readme/mcmc_*)

Runs live in --runs_dir/mcmc-<dataset>-<regime>/ (train_mcmc.py --out_dir). With --train, a
finished run (summary.json with status "done") is kept and skipped, an interrupted one
(checkpoint.pt) is resumed, any other folder is started again (--overwrite); each run is its
own process with one torch thread. The table and the figures use finished runs only: with
none, the benchmark writes nothing (the README figures stay as they are) and exits 1.

Speed: one training iteration at L = 100, batch 100 (the paper's toy MLP), comparing the
straightforward loop (autograd of F(x).sum() with parameter gradients on, a fresh
randn_like and new tensors every step, as in the paper's train_toy.py) with
`samplers.langevin` (hand-written input gradient, in-place updates, noise drawn up front).
Median of repeats, one torch thread; wall-clock and process CPU time are both printed.

Figures (--figures): for each dataset, the final landscapes of the convergent (left) and
non-convergent (right) runs side by side, and their diagnostics stacked (convergent on top),
copied from runs/<name>/{landscape,diagnostics}.png into images/readme/mcmc_<dataset>_*.png
(--figure_dir); a dataset whose two runs are not both finished is skipped.
"""
import os
import statistics
import sys
import time

if not __package__:  # run as a file (python bench/x.py): the repository root, not bench/, first
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

import config
from bench import gather, runner
from ebm import EBM
from logger import read_metrics
from samplers import Energy, langevin

RUNS = [("gmm", "convergent"), ("gmm", "nonconvergent"),
        ("rings4", "convergent"), ("rings4", "nonconvergent")]


def naive_langevin(F, x, L, eps):
    """The straightforward loop (reference for the speed-up)."""
    x = x.clone().requires_grad_(True)
    r = torch.zeros(())
    for _ in range(L):
        g = torch.autograd.grad(F(x).sum(), [x])[0]
        x.data += -g + eps * torch.randn_like(x)
        r += g.norm(dim=1).mean()
    return x.detach(), r / L


def iteration(F, opt, x_pos, x0, L, eps, fast):
    if fast:
        x_neg, r = langevin(Energy(F, 2 / eps ** 2), x0, L, eps, return_grad_norm=True)
        r = r.mean()
    else:
        x_neg, r = naive_langevin(F, x0, L, eps)
    d = F(x_pos).mean() - F(x_neg).mean()
    opt.zero_grad()
    (d * 2 / eps ** 2).backward()
    opt.step()
    return float(d.detach()), float(r)


def time_it(fn, repeats):
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def speed(L=100, batch=100, repeats=30):
    torch.manual_seed(0)
    F = EBM(2, (32, 64, 64, 64), "leakyrelu")
    opt = torch.optim.SGD(F.energy_params(), lr=1e-4)
    x_pos, x0 = torch.randn(batch, 2), torch.rand(batch, 2) * 2 - 1
    eps = 0.125
    out = {}
    for label, fast in (("straightforward", False), ("samplers.langevin", True)):
        out[label] = time_it(lambda: iteration(F, opt, x_pos, x0, L, eps, fast), repeats)
    print(f"\nseconds per training iteration (L = {L}, batch {batch}, 1 thread, median of "
          f"{repeats}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n")
    (w0, c0), (w1, c1) = out["straightforward"], out["samplers.langevin"]
    print("\n".join(gather.table(
        ["Langevin loop", "wall s/it", "CPU s/it"],
        [[label, f"{w:.4f}", f"{c:.4f}"] for label, (w, c) in out.items()]
        + [["speed-up", f"{w0 / w1:.2f}x", f"{c0 / c1:.2f}x"]])))
    return out


def train(run_dir, cfg):
    """Train one config into run_dir (runner.run_script: a finished run is kept, an
    interrupted one resumed, anything else started afresh). Returns the exit status."""
    print(f"$ train_mcmc.py --config {cfg} --out_dir {run_dir}", flush=True)
    code = runner.run_script("train_mcmc.py", run_dir, ["--config", cfg])
    if code != 0:
        print(f"bench/mcmc.py: the run in {run_dir} failed (exit {code}); rerun to continue",
              file=sys.stderr)
    return code


def results(runs_dir, train_first):
    """The table of the finished runs (the others named with their command); returns the
    number of finished runs."""
    rows = []
    for ds, regime in RUNS:
        name = runner.run_name("mcmc", ds, regime)
        cfg = os.path.join(runner.ROOT, "configs", f"mcmc_{ds}_{regime}.json")
        run_dir = os.path.join(runs_dir, name)
        if train_first:
            train(run_dir, cfg)
        s = runner.finished(run_dir)
        if s is None:
            rows.append((name, os.path.relpath(cfg, runner.ROOT)))
            continue
        # the EBM's KL at every evaluation, to show where in its oscillation the run ended
        s["kl_ebm_trace"] = [r["kl_ebm"] for r in read_metrics(run_dir) if "kl_ebm" in r]
        rows.append((name, s))
    lines = []
    for name, s in rows:
        if isinstance(s, str):
            lines.append([name, f"not run: `python train_mcmc.py --config {s}`", *[""] * 6])
            continue
        trace = " / ".join(f"{v:.3g}" for v in s["kl_ebm_trace"])
        lines.append([name, f"{s['steps']}", f"{s.get('kl_ebm', float('nan')):.3f}",
                      f"{s.get('kl_kde', float('nan')):.3f}",
                      f"{s.get('kl_kde_floor', float('nan')):.3f}",
                      f"{s.get('sec_per_iter', float('nan')):.4f}",
                      f"{runner.cpu_seconds(s):.0f}", trace])
    print("\n" + "\n".join(gather.table(
        ["run (config)", "iterations", "KL(p_data‖p_θ) EBM", "KL(p_data‖KDE of short-run)",
         "KDE floor (true samples)", "s/it (wall)", "CPU s total", "EBM KL at each evaluation"],
        lines)))
    return sum(not isinstance(s, str) for _, s in rows)


def _join(paths, out, horizontal, max_bytes=200_000):
    """Concatenate PNGs side by side (or stacked) into `out`, palette-quantised so that the file
    stays under max_bytes (README figures)."""
    from PIL import Image

    ims = [Image.open(p).convert("RGB") for p in paths]
    if horizontal:
        size = (sum(i.width for i in ims), max(i.height for i in ims))
    else:
        size = (max(i.width for i in ims), sum(i.height for i in ims))
    canvas = Image.new("RGB", size, "white")
    pos = 0
    for im in ims:
        canvas.paste(im, (pos, 0) if horizontal else (0, pos))
        pos += im.width if horizontal else im.height
    for colors in (256, 128, 64):
        canvas.quantize(colors=colors).save(out, optimize=True)
        if os.path.getsize(out) < max_bytes:
            break
    print(f"wrote {out} ({os.path.getsize(out) // 1000} KB)")
    return out


def figures(runs_dir, out_dir):
    """README figures from the finished runs (see the module docstring); returns how many
    were written."""
    written = 0
    for ds in dict(RUNS):
        dirs = [os.path.join(runs_dir, runner.run_name("mcmc", ds, r)) for r in ("convergent", "nonconvergent")]
        unfinished = [d for d in dirs if not runner.finished(d)]
        if unfinished:
            print(f"skipping the mcmc_{ds}_* figures: {', '.join(unfinished)} not finished")
            continue
        # (figure name, file in each run, side by side?)
        for fig, src, horizontal in (("landscapes", "landscape.png", True),
                                     ("diagnostics", "diagnostics.png", False)):
            os.makedirs(out_dir, exist_ok=True)
            _join([os.path.join(d, src) for d in dirs],
                  os.path.join(out_dir, f"mcmc_{ds}_{fig}.png"), horizontal)
            written += 1
    return written


def build_parser():
    p = config.Parser(description=__doc__.splitlines()[0])
    config.add_flag(p, "--train", help="train the 4 configs first (unfinished runs only)")
    config.add_flag(p, "--speed_only", help="the speed table only")
    config.add_flag(p, "--no_speed", help="skip the speed table")
    config.add_flag(p, "--figures", help="write the README figures from the finished runs")
    p.add_argument("--repeats", type=config.positive_int, default=30,
                   help="timed iterations per Langevin loop (median)")
    p.add_argument("--runs_dir", default="runs", help="folder of the four runs")
    p.add_argument("--figure_dir", default=os.path.join("images", "readme"),
                   help="where --figures writes mcmc_<dataset>_{landscapes,diagnostics}.png")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.speed_only and args.no_speed:
        config.fail("--speed_only and --no_speed leave nothing to do; pass one")
    if (args.figures or args.train) and args.speed_only:
        config.fail("--speed_only skips the runs; drop it to --train or write --figures")
    if not args.train and not os.path.isdir(args.runs_dir):
        config.fail(f"--runs_dir {args.runs_dir} does not exist; pass the folder of the runs "
                    f"or --train them")
    torch.set_num_threads(1)
    if not args.no_speed:
        speed(repeats=args.repeats)
    if args.speed_only:
        return 0
    try:
        n_finished = results(args.runs_dir, args.train)
    except runner.Stopped:
        return runner.stopped("bench/mcmc.py")
    if n_finished == 0:
        print(f"bench/mcmc.py: no finished runs under {args.runs_dir}: nothing written; "
              f"train them with --train", file=sys.stderr)
        return 1
    if args.figures and figures(args.runs_dir, args.figure_dir) == 0:
        print(f"bench/mcmc.py: no dataset has both runs finished under {args.runs_dir}: no "
              f"figure written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(config.cli(main))
