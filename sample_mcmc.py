"""Long-run sampling from a trained EBM with ULA or MALA (Nijkamp et al. 2020, Section 4:
do long chains still look like the data?).

    python sample_mcmc.py --run runs/mcmc-gmm-convergent --sampler mala --steps 5000
    python sample_mcmc.py --run runs/mcmc-gmm-nonconvergent --sampler ula --steps 5000 --temperature 1

Targets exp(-U(x) / T), U the run's energy (util.load_run). Prints the acceptance rate per
step (MALA) and the energies of the chains as they run, and writes to images/<run name>/:
longrun_<sampler>_<steps>.png (samples, KDE, acceptance per step, mean energy) and
longrun_<sampler>_<steps>.pt (final states, energy of each chain, acceptance per step).
"""
import os
import sys
import time

import torch

import config
import datasets
import diagnostics
import plots
from samplers import Energy, langevin, mala
from util import load_run, set_seed


def get_parser():
    p = config.parser("Long-run ULA / MALA sampling from a trained EBM")
    p.add_argument("--run", required=True, help="run directory with checkpoint.pt")
    p.add_argument("--sampler", default="mala", choices=["ula", "mala"])
    p.add_argument("--steps", type=config.positive_int, default=2000)
    p.add_argument("--chunk", type=config.positive_int, default=100,
                   help="steps between progress lines")
    p.add_argument("--n", type=config.positive_int, default=5000, help="number of chains")
    p.add_argument("--eps", type=config.positive_float, default=None,
                   help="step size (default: the run's eps)")
    p.add_argument("--temperature", type=config.positive_float, default=1.0)
    p.add_argument("--init", default="uniform", choices=["uniform", "gaussian", "data", "bank"],
                   help="chain starts: U[-s, s]^2, N(0, s^2 I), data, or the run's persistent bank")
    p.add_argument("--init_scale", type=config.positive_float, default=2.0)
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
    if run.ebm is None:
        config.fail(f"{args.run} has no EBM in its checkpoint")
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
        if args.sampler == "mala":
            x, acc, u = mala(U, x, k, eps, temperature=args.temperature, return_energy=True)
            acc_all.append(acc)
        else:
            x = langevin(U, x, k, eps, temperature=args.temperature)
            with torch.no_grad():
                u = U(x)
        done += k
        mean_u.append((done, float(u.mean())))
        line = f"step {done:6d}  energy mean {float(u.mean()):+.3f}  min {float(u.min()):+.3f}" \
               f"  max {float(u.max()):+.3f}"
        if args.sampler == "mala":
            line += f"  acceptance {float(acc.mean()):.3f}"
        print(line)
    secs = time.perf_counter() - t0
    with torch.no_grad():
        energy = U(x)
    acc = torch.cat(acc_all) if acc_all else None
    kl = diagnostics.kde_kl(dataset, x, args.kde_bw) if dataset in datasets.NAMES else None
    print(f"{args.steps} steps in {secs:.1f} s; final energy per chain: mean "
          f"{float(energy.mean()):+.3f}, quantiles 5/50/95% "
          f"{', '.join(f'{float(q):+.3f}' for q in energy.quantile(torch.tensor([.05, .5, .95])))}"
          + (f"; mean acceptance {float(acc.mean()):.3f}" if acc is not None else "")
          + (f"; KL(p_data || KDE of chains) {kl:.3f}" if kl is not None else ""))

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
    return {"x": x, "energy": energy, "acceptance": acc, "kl_kde": kl}


if __name__ == "__main__":
    sys.exit(main() and 0)
