"""Long-run sampling from a trained EBM with ULA or MALA (Nijkamp et al. 2020, Section 4:
do long chains still look like the data?).

    python sample_mcmc.py --run runs/mcmc-gmm-convergent --sampler mala --steps 5000
    python sample_mcmc.py --run runs/mcmc-gmm-nonconvergent --sampler ula --steps 5000 --temperature 1

Targets exp(-U(x) / T), U the run's energy (checkpoint.load_run). Prints the acceptance rate per
step (MALA) and the energies of the chains as they run, and writes to --image_dir (default
images/<run folder name>): longrun_<sampler>_<steps>.png (samples, KDE), _curves.png
(acceptance per step, mean energy) and .pt (final states, energy of each chain, acceptance
per step, the KDE's KL and escaped mass). Outputs of an earlier sampling of the same name are
refused unless --overwrite replaces them. Ctrl-C or SIGTERM stops the chains at the next
--chunk boundary (exit status 130; the final outputs are not written); bad input is a
one-line error, exit status 2 (the scaffold's conventions, without a run folder).

Image runs (train_mcmc.py --dataset digits|mnist) are sampled the same way, the images as
flattened rows, and at each step of --save_at the chains are scored with the run's dataset
metric (image_metrics.SampleMetric: Frechet distance to held-out images and its ratio to the
real-data floor at the same n, label TV) and a grid of the first 100 is saved:

    python sample_mcmc.py --run runs/mcmc-digits-convergent --sampler ula --init data \
        --steps 10000 --save_at 0,100,1000,10000

writes to <--image_dir>/longrun_<sampler>_<init>/: step_<k>.png (grids), and next to that
folder longrun_<sampler>_<init>.png (the grids side by side), _curves.png (mean energy,
acceptance), .json (metric at each saved step, the floor and its sd, energy trace, acceptance,
seconds) and .pt. --n chains (default 1,000) are scored against a floor of as many real images.
"""
import json
import os
import shutil
import sys
import time

import torch

import checkpoint
import config
import datasets
import diagnostics
import image_data
import image_metrics
import plots
import scaffold
import util
from ebm import load_image_ebm
from samplers import ConvEnergy, Energy, chain_starts, langevin, mala

SCRIPT = scaffold.Script("sample_mcmc.py", resumable=False)
# shared flags that mean nothing here: sampling writes no run and logs nothing to wandb
NOT_HERE = ("out_dir", "resume", "wandb", "project")


def step_list(s):
    try:
        steps = sorted({int(v) for v in str(s).split(",") if v.strip()})
    except ValueError:
        steps = []
    if not steps or steps[0] < 0:
        raise config.argparse.ArgumentTypeError(
            f"expected comma-separated step counts >= 0 like 0,100,1000, got {s!r}")
    return steps


def build_parser():
    p = config.parser("Long-run ULA / MALA sampling from a trained EBM")
    p.add_argument("--run", required=True, help="train_mcmc.py run folder (with checkpoint.pt)")
    p.add_argument("--sampler", default="mala", choices=["ula", "mala"])
    p.add_argument("--steps", type=config.positive_int, default=2000)
    p.add_argument("--chunk", type=config.positive_int, default=100,
                   help="steps between progress lines")
    p.add_argument("--n", type=config.positive_int, default=None,
                   help="number of chains (default 5000; image runs 1000 or all training "
                        "images if fewer, at least 2 and at most the training images: the "
                        "metric's floor draws as many real images)")
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
    p.add_argument("--kde_bw", type=config.positive_float, default=None,
                   help="2D runs: KDE bandwidth of the chains (default 0.05)")
    return p


def advance(U, x, k, eps, args, acc_all, signals, done):
    """k steps of args.sampler after `done` (MALA appends its acceptances to acc_all); returns
    (x, U(x)). Raises scaffold.Interrupted before them once Ctrl-C or SIGTERM came."""
    signals.boundary(f"at step {done} of {args.steps}")
    if args.sampler == "mala":
        x, acc, u = mala(U, x, k, eps, temperature=args.temperature, return_energy=True)
        acc_all.append(acc)
        return x, u
    x = langevin(U, x, k, eps, temperature=args.temperature)
    with torch.no_grad():
        return x, U(x)


def claim_outputs(args, files, frames=None):
    """The output folder must be writable; outputs of an earlier sampling with the same name
    (files, or a folder of frames that new frames would mix with) are refused unless
    --overwrite, which removes them first."""
    scaffold.check_writable(args.image_dir)
    old = [f for f in files if os.path.exists(f)]
    if frames and os.path.isdir(frames) and os.listdir(frames):
        old.append(frames + "/")
    if old and not args.overwrite:
        config.fail(f"{old[0]} holds an earlier sampling; pass --overwrite to replace it or "
                    f"choose another --image_dir")
    for f in old:
        shutil.rmtree(f) if os.path.isdir(f) else os.remove(f)
    try:
        os.makedirs(frames or args.image_dir, exist_ok=True)
    except OSError as e:
        config.fail(f"cannot create {frames or args.image_dir} ({e.strerror}); choose a "
                    f"writable --image_dir")


def starts(args, run, n, dim, x_data, device):
    """n chain starts of --init (x_data: the training data, for --init data; bank: the run's
    persistent chains)."""
    bank = run.checkpoint.get("bank")
    if args.init == "bank" and bank is None:
        config.fail(f"{args.run} has no persistent bank; use --init uniform/gaussian/data")
    bank = bank.to(device) if args.init == "bank" else None
    return chain_starts("persistent" if bank is not None else args.init, n, dim,
                        args.init_scale, bank, x_data, device)[0]


def main(argv=None):
    unused = [f"--{f}" for f in NOT_HERE if f in config.given_flags(argv)]
    if unused:
        config.fail(f"{', '.join(unused)} mean(s) nothing to sample_mcmc.py (it writes no run; "
                    f"its outputs go to --image_dir); drop {' '.join(unused)}")
    args, _ = scaffold.parse(build_parser(), argv, SCRIPT)
    util.apply_threads(args)
    device = scaffold.device(args)
    try:
        run = checkpoint.load_run(args.run, device=device, script="train_mcmc.py")
    except (FileNotFoundError, checkpoint.CheckpointError) as e:
        config.fail(f"--run: {e}")
    image = run.config.get("dataset") in image_data.IMAGE_DATASETS
    if image and args.kde_bw is not None:
        config.fail("--kde_bw is for 2D runs; image runs are scored by the sample metric")
    if not image and args.save_at is not None:
        config.fail("--save_at is for image runs; a 2D run saves its final chains")
    if args.save_at and args.save_at[-1] > args.steps:
        config.fail(f"--save_at {args.save_at[-1]} is beyond --steps {args.steps}; raise "
                    f"--steps or drop that step")
    args.image_dir = args.image_dir or scaffold.default_image_dir(args.run)
    with scaffold.Signals() as signals:
        try:
            (sample_images if image else sample_2d)(args, run, device, signals)
        except scaffold.Interrupted as e:
            print(f"\ninterrupted {e}: the final outputs were not written; sample again "
                  f"(with --overwrite)", file=sys.stderr)
            return scaffold.INTERRUPTED
    return scaffold.DONE


def sample_2d(args, run, device, signals):
    """Long-run chains of a 2D run: final states, energies, KDE and its KL to the data."""
    if run.ebm is None:
        config.fail(f"{args.run} has no EBM in its checkpoint")
    n, scale, bw = args.n or 5000, args.init_scale or 2.0, args.kde_bw or 0.05
    cfg = run.config
    dataset = cfg.get("dataset")
    eps = args.eps or cfg["eps"]
    name = os.path.basename(os.path.normpath(args.run))
    stem = os.path.join(args.image_dir, f"longrun_{args.sampler}_{args.steps}")
    claim_outputs(args, [stem + s for s in (".pt", ".png", "_curves.png")])
    args.init_scale = scale
    rng = util.set_seed(args.seed)
    x_data = datasets.sample(dataset, n, rng) if args.init == "data" else None
    x = starts(args, run, n, 2, x_data, device)
    U = Energy(run.ebm)
    print(f"{name}: {args.sampler} eps={eps} T={args.temperature}, {n} chains, "
          f"{args.steps} steps from {args.init}")

    acc_all, mean_u, done = [], [], 0
    t0 = time.perf_counter()
    while done < args.steps:
        k = min(args.chunk, args.steps - done)
        x, u = advance(U, x, k, eps, args, acc_all, signals, done)
        done += k
        mean_u.append((done, float(u.mean())))
        line = f"step {done:6d}  energy mean {float(u.mean()):+.3f}  min {float(u.min()):+.3f}" \
               f"  max {float(u.max()):+.3f}"
        if args.sampler == "mala":
            line += f"  acceptance {float(acc_all[-1].mean()):.3f}"
        print(line)
    secs = time.perf_counter() - t0
    with torch.no_grad():
        energy = U(x).cpu()
    x = x.cpu()
    acc = torch.cat(acc_all).cpu() if acc_all else None
    kl, outside = (diagnostics.kde_kl(dataset, x, bw, return_outside=True)
                   if dataset in datasets.NAMES else (None, None))
    print(f"{args.steps} steps in {secs:.1f} s; final energy per chain: mean "
          f"{float(energy.mean()):+.3f}, quantiles 5/50/95% "
          f"{', '.join(f'{float(q):+.3f}' for q in energy.quantile(torch.tensor([.05, .5, .95])))}"
          + (f"; mean acceptance {float(acc.mean()):.3f}" if acc is not None else "")
          + (f"; KL(p_data || KDE of chains) {kl:.3f} ({outside:.2%} of the KDE outside the "
             f"grid)" if kl is not None else ""))

    torch.save({"x": x, "energy": energy, "acceptance": acc, "eps": eps,
                "temperature": args.temperature, "kl_kde": kl, "kde_outside": outside},
               stem + ".pt")
    panels = [("chains (histogram)", plots.samples(x)),
              (f"KDE (bw {bw})", plots.grid_image(
                  diagnostics.kde_log_density(x, bw, n=150), datasets.BOUND, 150))]
    plots.save_panels(stem + ".png", panels, title=f"{name}: {args.sampler} x {args.steps}, "
                      f"eps {eps}, T {args.temperature}")
    curves = {"mean energy U": {"U": ([s for s, _ in mean_u], [v for _, v in mean_u])}}
    if acc is not None:
        curves["MALA acceptance rate per step"] = {"acc": (range(1, len(acc) + 1), acc.numpy())}
    plots.save_curves(stem + "_curves.png", curves, xlabel="step")
    print(f"wrote {stem}.png, {stem}_curves.png, {stem}.pt")


def sample_images(args, run, device, signals):
    """Long-run chains of an image run, scored and saved at the --save_at steps."""
    cfg, ckpt = run.config, run.checkpoint
    if "image_ebm" not in ckpt:
        config.fail(f"{args.run} has no image EBM in its checkpoint; train it with "
                    f"train_mcmc.py --dataset {cfg.get('dataset')}")
    scale = args.init_scale or 1.0
    save_at = args.save_at or [0] + [10 ** k for k in range(2, 9) if 10 ** k < args.steps]
    save_at = sorted(set(save_at) | {args.steps})
    eps = args.eps or cfg["eps"]
    try:
        x_train, y_train, x_test, y_test = image_data.load_images(
            cfg["dataset"], cfg["mnist_images"], cfg["mnist_labels"])
    except image_data.DataError as e:
        config.fail(str(e))
    x_train, y_train = x_train[:cfg["n_train"]], y_train[:cfg["n_train"]]
    n = args.n or min(1000, len(x_train))
    if not 2 <= n <= len(x_train):
        config.fail(f"--n {n}: the metric needs at least 2 chains and at most the "
                    f"{len(x_train)} training images (its floor scores as many real images)")
    name = os.path.basename(os.path.normpath(args.run))
    tag = f"longrun_{args.sampler}_{args.init}"
    out = os.path.join(args.image_dir, tag)
    stem = out
    claim_outputs(args, [stem + s for s in (".json", ".pt", ".png", "_curves.png")], frames=out)
    args.init_scale = scale
    metric = image_metrics.SampleMetric(x_train, y_train, x_test, y_test, n=n)
    util.set_seed(args.seed)
    x = starts(args, run, n, x_train.shape[1], x_train, device)
    net = load_image_ebm(ckpt, device=device)
    U = ConvEnergy(net)  # image_ebm is U itself (scaled by 2 / eps^2 at training time)
    print(f"{name}: {args.sampler} eps={eps} T={args.temperature}, {n} chains, {args.steps} "
          f"steps from {args.init}; metric {metric.describe()}; saving at "
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
            grids.append(image_data.save_grid(os.path.join(out, f"step_{done:06d}.png"),
                                              x[:100], net.shape, title=f"step {done}"))
            print(f"step {done:6d}  FD {m['fd']:8.2f} ({m['fd_ratio']:.2f}x floor)  FD pixels {m['fd_pixels']:7.3f}  label TV "
                  f"{m['label_tv']:.3f}  energy {m['energy_mean']:+.4g}  pixels "
                  f"[{m['x_min']:+.2f}, {m['x_max']:+.2f}]"
                  + (f"  non-finite {m['n_nonfinite']}" if m["n_nonfinite"] else ""))
        if done >= args.steps:
            break
        k = min(args.chunk, args.steps - done, min(s for s in save_at if s > done) - done)
        x, u = advance(U, x, k, eps, args, acc_all, signals, done)
        done += k
        energy_trace.append((done, float(u.mean())))
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    acc = torch.cat(acc_all).cpu() if acc_all else None
    print(f"{args.steps} steps in {secs:.1f} s ({cpu:.1f} CPU s)"
          + (f"; mean acceptance {float(acc.mean()):.3f}" if acc is not None else ""))

    record = {"run": args.run, "sampler": args.sampler, "init": args.init, "n": n, "eps": eps,
              "temperature": args.temperature, "seed": args.seed, "steps": args.steps,
              "results": results, "floor": metric.floor, "floor_sd": metric.floor_sd,
              "n_floor": metric.n_floor, "energy_trace": energy_trace,
              "acceptance_mean": None if acc is None else float(acc.mean()),
              "wall_sec": secs, "cpu_s": cpu}
    with open(stem + ".json", "w") as fh:
        json.dump(record, fh, indent=1)
    torch.save({"x": x.cpu(), "acceptance": acc, "eps": eps, "temperature": args.temperature},
               stem + ".pt")
    join_images(grids, stem + ".png")
    curves = {"mean energy U": {"U": ([s for s, _ in energy_trace],
                                      [v for _, v in energy_trace])}}
    if acc is not None:
        curves["MALA acceptance rate per step"] = {"acc": (range(1, len(acc) + 1), acc.numpy())}
    plots.save_curves(stem + "_curves.png", curves, xlabel="step")
    print(f"wrote {out}/, {stem}.png, {stem}_curves.png, {stem}.json")


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
    sys.exit(config.cli(main))
