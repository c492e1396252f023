"""Long-run sampling from a trained EBM with ULA or MALA (Nijkamp et al. 2020, Section 4:
do long chains still look like the data?).

    python sample_mcmc.py --run runs/mcmc-gmm-convergent --sampler mala --steps 5000
    python sample_mcmc.py --run runs/mcmc-gmm-nonconvergent --sampler ula --steps 5000 --temperature 1

Targets exp(-U(x) / T), U the run's energy (util.load_run). Prints the acceptance rate per
step (MALA) and the energies of the chains as they run, and writes to images/<run name>/:
longrun_<sampler>_<steps>.png (samples, KDE, acceptance per step, mean energy) and
longrun_<sampler>_<steps>.pt (final states, energy of each chain, acceptance per step).

Image runs (train_mcmc.py --dataset digits|mnist) are sampled the same way, the images as
flattened rows, and at each step of --save_at the chains are scored with the run's dataset
metric (mcmc_images.SampleMetric: Frechet distance to held-out images, label TV) and a grid of
the first 100 is saved:

    python sample_mcmc.py --run runs/mcmc-digits-convergent --sampler ula --init data \
        --steps 10000 --save_at 0,100,1000,10000

writes to images/<run name>/longrun_<sampler>_<init>/: step_<k>.png (grids), and next to that
folder longrun_<sampler>_<init>.png (the grids side by side), _curves.png (mean energy,
acceptance), .json (metric at each saved step, energy trace, acceptance, seconds) and .pt.
"""
import json
import os
import sys
import time

import torch

import config
import datasets
import diagnostics
import mcmc_images
import plots
from samplers import ConvEnergy, Energy, langevin, mala
from util import load_run, set_seed



def advance(U, x, k, eps, args, acc_all):
    """k steps of args.sampler (MALA appends its acceptances to acc_all); returns (x, U(x))."""
    if args.sampler == "mala":
        x, acc, u = mala(U, x, k, eps, temperature=args.temperature, return_energy=True)
        acc_all.append(acc)
        return x, u
    x = langevin(U, x, k, eps, temperature=args.temperature)
    with torch.no_grad():
        return x, U(x)

def step_list(s):
    try:
        steps = sorted({int(v) for v in str(s).split(",") if v.strip()})
    except ValueError:
        steps = []
    if not steps or steps[0] < 0:
        raise config.argparse.ArgumentTypeError(
            f"expected comma-separated step counts >= 0 like 0,100,1000, got {s!r}")
    return steps


def get_parser():
    p = config.parser("Long-run ULA / MALA sampling from a trained EBM")
    p.add_argument("--run", required=True, help="run directory with checkpoint.pt")
    p.add_argument("--sampler", default="mala", choices=["ula", "mala"])
    p.add_argument("--steps", type=config.positive_int, default=2000)
    p.add_argument("--chunk", type=config.positive_int, default=100,
                   help="steps between progress lines")
    p.add_argument("--n", type=config.positive_int, default=None,
                   help="number of chains (default 5000; image runs 500)")
    p.add_argument("--eps", type=config.positive_float, default=None,
                   help="step size (default: the run's eps)")
    p.add_argument("--temperature", type=config.positive_float, default=1.0)
    p.add_argument("--init", default="uniform", choices=["uniform", "gaussian", "data", "bank"],
                   help="chain starts: U[-s, s]^2, N(0, s^2 I), data, or the run's persistent bank")
    p.add_argument("--init_scale", type=config.positive_float, default=None,
                   help="noise starts (default 2; image runs 1, i.e. U[-1, 1] pixels)")
    p.add_argument("--save_at", type=step_list, default=None,
                   help="image runs: steps at which grids and the metric are saved, e.g. "
                        "0,100,1000,10000 (default 0, 100, 1000, ... up to --steps)")
    p.add_argument("--kde_bw", type=config.positive_float, default=0.05)
    p.add_argument("--image_dir", default="images")
    return p


def main(argv=None):
    args = config.parse(get_parser(), argv)
    torch.set_num_threads(1)
    try:
        run = load_run(args.run)
    except FileNotFoundError as e:
        config.fail(str(e))
    if run.config.get("dataset") in mcmc_images.IMAGE_DATASETS:
        return sample_images(args, run)
    if run.ebm is None:
        config.fail(f"{args.run} has no EBM in its checkpoint")
    args.n = args.n or 5000
    args.init_scale = args.init_scale or 2.0
    cfg = run.config
    dataset = cfg.get("dataset")
    eps = args.eps or cfg.get("eps", 0.1)
    rng = set_seed(args.seed)
    if args.init == "bank":
        bank = run.checkpoint.get("bank")
        if bank is None:
            config.fail(f"{args.run} has no persistent bank; use --init uniform/gaussian/data")
        x = bank[torch.randint(len(bank), (args.n,))]
    elif args.init == "uniform":
        x = args.init_scale * (2 * torch.rand(args.n, 2) - 1)
    elif args.init == "gaussian":
        x = args.init_scale * torch.randn(args.n, 2)
    else:
        x = datasets.sample(dataset, args.n, rng)
    U = Energy(run.ebm)
    name = os.path.basename(os.path.normpath(args.run))
    print(f"{name}: {args.sampler} eps={eps} T={args.temperature}, {args.n} chains, "
          f"{args.steps} steps from {args.init}")

    acc_all, mean_u, done = [], [], 0
    t0 = time.perf_counter()
    while done < args.steps:
        k = min(args.chunk, args.steps - done)
        x, u = advance(U, x, k, eps, args, acc_all)
        done += k
        mean_u.append((done, float(u.mean())))
        line = f"step {done:6d}  energy mean {float(u.mean()):+.3f}  min {float(u.min()):+.3f}" \
               f"  max {float(u.max()):+.3f}"
        if args.sampler == "mala":
            line += f"  acceptance {float(acc_all[-1].mean()):.3f}"
        print(line)
    secs = time.perf_counter() - t0
    with torch.no_grad():
        energy = U(x)
    acc = torch.cat(acc_all) if acc_all else None
    kl, outside = (diagnostics.kde_kl(dataset, x, args.kde_bw, return_outside=True)
                   if dataset in datasets.NAMES else (None, None))
    print(f"{args.steps} steps in {secs:.1f} s; final energy per chain: mean "
          f"{float(energy.mean()):+.3f}, quantiles 5/50/95% "
          f"{', '.join(f'{float(q):+.3f}' for q in energy.quantile(torch.tensor([.05, .5, .95])))}"
          + (f"; mean acceptance {float(acc.mean()):.3f}" if acc is not None else "")
          + (f"; KL(p_data || KDE of chains) {kl:.3f} ({outside:.2%} of the KDE outside the "
             f"grid)" if kl is not None else ""))

    out = os.path.join(args.image_dir, name)
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"longrun_{args.sampler}_{args.steps}")
    torch.save({"x": x, "energy": energy, "acceptance": acc, "eps": eps,
                "temperature": args.temperature}, stem + ".pt")
    panels = [("chains (histogram)", plots.samples(x)),
              (f"KDE (bw {args.kde_bw})", plots.grid_image(
                  diagnostics.kde_log_density(x, args.kde_bw, n=150), datasets.BOUND, 150))]
    plots.save_panels(stem + ".png", panels, title=f"{name}: {args.sampler} x {args.steps}, "
                      f"eps {eps}, T {args.temperature}")
    curves = {"mean energy U": {"U": ([s for s, _ in mean_u], [v for _, v in mean_u])}}
    if acc is not None:
        curves["MALA acceptance rate per step"] = {"acc": (range(1, len(acc) + 1), acc.numpy())}
    plots.save_curves(stem + "_curves.png", curves, xlabel="step")
    print(f"wrote {stem}.png, {stem}_curves.png, {stem}.pt")
    return {"x": x, "energy": energy, "acceptance": acc, "kl_kde": kl, "kde_outside": outside}


def sample_images(args, run):
    """Long-run chains of an image run, scored and saved at the --save_at steps."""
    cfg, ckpt = run.config, run.checkpoint
    if "image_ebm" not in ckpt:
        config.fail(f"{args.run} has no image EBM in its checkpoint; train it with "
                    f"train_mcmc.py --dataset {cfg.get('dataset')}")
    n = args.n or 500
    scale = args.init_scale or 1.0
    save_at = args.save_at or [0] + [10 ** k for k in range(2, 9) if 10 ** k < args.steps]
    save_at = sorted({s for s in save_at if s <= args.steps} | {args.steps})
    eps = args.eps or cfg["eps"]
    try:
        x_train, y_train, x_test, y_test = mcmc_images.load_images(
            cfg["dataset"], cfg.get("mnist_images"), cfg.get("mnist_labels"))
    except mcmc_images.DataError as e:
        config.fail(str(e))
    x_train, y_train = x_train[:cfg.get("n_train", len(x_train))], \
        y_train[:cfg.get("n_train", len(x_train))]
    metric = mcmc_images.SampleMetric(x_train, y_train, x_test, y_test, n=n)
    set_seed(args.seed)
    dim = x_train.shape[1]
    if args.init == "bank":
        bank = ckpt.get("bank")
        if bank is None:
            config.fail(f"{args.run} has no persistent bank; use --init uniform/gaussian/data")
        x = bank[torch.randint(len(bank), (n,))]
    elif args.init == "uniform":
        x = scale * (2 * torch.rand(n, dim) - 1)
    elif args.init == "gaussian":
        x = scale * torch.randn(n, dim)
    else:
        x = x_train[torch.randint(len(x_train), (n,))]
    net = mcmc_images.load_image_ebm(ckpt)
    U = ConvEnergy(net)  # image_ebm is U itself (scaled by 2 / eps^2 at training time)
    name = os.path.basename(os.path.normpath(args.run))
    tag = f"longrun_{args.sampler}_{args.init}"
    out = os.path.join(args.image_dir, name, tag)
    os.makedirs(out, exist_ok=True)
    print(f"{name}: {args.sampler} eps={eps} T={args.temperature}, {n} chains, {args.steps} "
          f"steps from {args.init}; metric floor FD {metric.floor['fd']:.2f}, saving at "
          f"{', '.join(map(str, save_at))}")

    results, grids, energy_trace, acc_all = [], [], [], []
    done = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while True:
        if done in save_at:
            m = metric(x)
            with torch.no_grad():
                u = U(x)
            m.update(step=done, energy_mean=float(u.mean()), x_min=float(x.min()),
                     x_max=float(x.max()), saturated=float((x.abs() >= 1).float().mean()))
            results.append(m)
            grids.append(mcmc_images.save_grid(os.path.join(out, f"step_{done:06d}.png"),
                                               x[:100], net.shape, title=f"step {done}"))
            print(f"step {done:6d}  FD {m['fd']:8.2f}  FD pixels {m['fd_pixels']:7.3f}  label TV "
                  f"{m['label_tv']:.3f}  energy {m['energy_mean']:+.4g}  pixels "
                  f"[{m['x_min']:+.2f}, {m['x_max']:+.2f}]"
                  + (f"  non-finite {m['n_nonfinite']}" if m["n_nonfinite"] else ""))
        if done >= args.steps:
            break
        k = min(args.chunk, args.steps - done, min(s for s in save_at if s > done) - done)
        x, u = advance(U, x, k, eps, args, acc_all)
        done += k
        energy_trace.append((done, float(u.mean())))
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    acc = torch.cat(acc_all) if acc_all else None
    print(f"{args.steps} steps in {secs:.1f} s ({cpu:.1f} CPU s)"
          + (f"; mean acceptance {float(acc.mean()):.3f}" if acc is not None else ""))

    stem = os.path.join(args.image_dir, name, tag)
    record = {"run": args.run, "sampler": args.sampler, "init": args.init, "n": n, "eps": eps,
              "temperature": args.temperature, "seed": args.seed, "steps": args.steps,
              "results": results, "floor": metric.floor, "energy_trace": energy_trace,
              "acceptance_mean": None if acc is None else float(acc.mean()),
              "wall_sec": secs, "cpu_sec": cpu}
    with open(stem + ".json", "w") as fh:
        json.dump(record, fh, indent=1)
    torch.save({"x": x, "acceptance": acc, "eps": eps, "temperature": args.temperature},
               stem + ".pt")
    join_images(grids, stem + ".png")
    curves = {"mean energy U": {"U": ([s for s, _ in energy_trace],
                                      [v for _, v in energy_trace])}}
    if acc is not None:
        curves["MALA acceptance rate per step"] = {"acc": (range(1, len(acc) + 1), acc.numpy())}
    plots.save_curves(stem + "_curves.png", curves, xlabel="step")
    print(f"wrote {out}/, {stem}.png, {stem}_curves.png, {stem}.json")
    return record


def join_images(paths, out, horizontal=True, gap=6):
    """PNGs side by side (or stacked) on a white canvas."""
    from PIL import Image

    ims = [Image.open(p).convert("RGB") for p in paths]
    if horizontal:
        size = (sum(i.width for i in ims) + gap * (len(ims) - 1), max(i.height for i in ims))
    else:
        size = (max(i.width for i in ims), sum(i.height for i in ims) + gap * (len(ims) - 1))
    canvas = Image.new("RGB", size, "white")
    pos = 0
    for im in ims:
        canvas.paste(im, (pos, 0) if horizontal else (0, pos))
        pos += (im.width if horizontal else im.height) + gap
    canvas.save(out)
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
