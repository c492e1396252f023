"""Variational inference with normalizing flows (Rezende & Mohamed 2015, sec. 6.1).

Fit a flow q_K to an unnormalised target p(z) ∝ exp(-U(z)) by minimising the reverse-KL bound

    F(q) = E_{z0 ~ q0}[log q0(z0) - sum_k log|det df_k/dz_{k-1}| + beta_t U(z_K)]
         = KL(q || p) - log Z        (at beta_t = 1)

with the paper's annealing beta_t = min(1, 0.01 + t / anneal_steps) (anneal_steps = 10000 in
the paper, which trains 500k iterations; 5000 here by default, for 10k-step runs). Every
normalised number uses the *confined* U of targets.py (U2-U4 are improper on the plane):
KL(q || p) = E_q[log q + U] + log Z with log Z by float64 grid integration, the effective
sample size of q as an importance proposal for p, and for U1 the mass of q on each of its two
modes (z1 < 0, z1 > 0).

    python train_vi.py --target=U1 --flow=planar --K=32
    python train_vi.py --target=all --flow=planar --K=32     # U1-U4 as one batched module
    python train_vi.py --resume=runs/<run name>              # continue after Ctrl-C

Writes runs/<run name>/ (config.json, metrics.jsonl, summary.json, checkpoint.pt) and the
figures in --image_dir, default images/<run name>/ (frames/q_<step>.png, training.gif,
final.png). Several targets in one run train side by side; planar flows then run as one
batched module (vi_flows.PlanarStack).
"""
import math
import os
import sys

import torch

import config
import evaluation
import plots
import scaffold
import targets
import util
import vi_flows

# a resumed run may change the `overridable` flags; everything else comes from the checkpoint
SCRIPT = scaffold.Script("train_vi.py", keys=("flow", "optimizer", "step", "rng"), overridable=(
    "steps", "wandb", "project", "device", "threads", "image_dir"))
HIDDEN_FLOWS = ("iaf", "realnvp", "nice", "spline")  # the flows that have --hidden networks


def build_parser():
    p = config.parser("Normalizing flows fit to energy functions by reverse KL")
    p.add_argument("--target", default="U1",
                   help="U1, U2, U3, U4, a comma list, 'all' (= U1,U2,U3,U4), or a dataset "
                        "with an exact density (8gaussians, checkerboard, ...)")
    p.add_argument("--flow", default="planar", choices=vi_flows.VI_FLOWS)
    p.add_argument("--K", type=config.positive_int, default=32,
                   help="number of layers (planar/radial) or blocks (iaf/realnvp/nice/spline)")
    p.add_argument("--hidden", type=config.positive_int, nargs="+", default=[64, 64],
                   help="hidden sizes of the iaf/realnvp/nice/spline networks")
    p.add_argument("--base", default="learned", choices=["learned", "fixed"],
                   help="q0: learnable diagonal Gaussian, or fixed N(0, I)")
    config.add_flag(p, "--batched", default=True,
                    help="planar flows of several targets as one batched module")
    p.add_argument("--steps", type=config.positive_int, default=10000)
    p.add_argument("--batch", type=config.positive_int, default=256)
    p.add_argument("--lr", type=config.positive_float, default=3e-3,
                   help="Adam learning rate (3e-3 meets the planar K=32 numbers of docs/vi.md "
                        "on seeds 42, 0 and 1; 1e-3 misses U2/U3 on two of them)")
    p.add_argument("--lr_schedule", default="cosine", choices=["cosine", "constant"],
                   help="cosine: decay lr to 0 over --steps")
    config.add_flag(p, "--anneal", default=True,
                    help="beta_t = min(1, 0.01 + t / anneal_steps) on the U term")
    p.add_argument("--anneal_steps", type=config.positive_int, default=5000,
                   help="the paper uses 10000 (of 500k iterations); with a 10k-step budget "
                        "annealing over the first half leaves the second half at beta = 1")
    p.add_argument("--eval_every", type=config.positive_int, default=1000,
                   help="steps between evaluations, frames and checkpoints")
    p.add_argument("--eval_samples", type=config.positive_int, default=20000)
    p.add_argument("--final_samples", type=config.positive_int, default=200000)
    config.add_flag(p, "--frames", default=True,
                    help="a q-density frame per evaluation and a gif at the end")
    return p


def parse_targets(spec):
    names = list(targets.NAMES) if spec == "all" else [s.strip() for s in spec.split(",")]
    for n in names:
        try:
            targets.check_name(n)
        except ValueError as e:
            config.fail(str(e))
    if len(set(names)) != len(names):
        config.fail(f"--target={spec} names a target twice; give each target once")
    return names


def check_args(args, argv):
    """Flags that would be accepted but mean nothing for this run: refused, one line."""
    given = config.given_flags(argv)
    if "hidden" in given and args.flow not in HIDDEN_FLOWS:
        config.fail(f"--hidden has no effect on --flow={args.flow} (only "
                    f"{'/'.join(HIDDEN_FLOWS)} have networks); drop it")
    if "anneal_steps" in given and not args.anneal:
        config.fail("--anneal_steps has no effect with --no-anneal; drop one of them")
    # float32 points per target: a batch keeps K + 1 layers' activations for the backward pass
    T, point = len(parse_targets(args.target)), 2 * 4
    util.check_memory({"--batch": args.batch * T * point * (args.K + 1),
                       "--eval_samples": args.eval_samples * T * 2 * point,
                       "--final_samples": min(args.final_samples, 50000) * T * 2 * point
                         + args.final_samples * T * (point + 8)})


def beta_at(step, cfg):
    """The paper's annealing of the U term: beta_t = min(1, 0.01 + t / anneal_steps); `cfg`
    is the run's configuration as a dict (keys anneal, anneal_steps)."""
    return min(1.0, 0.01 + step / cfg["anneal_steps"]) if cfg["anneal"] else 1.0


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, names, n, seed=0, chunk=50000, return_samples=False):
    """Per target: KL(q || p) (and its Monte Carlo standard error), the bound E_q[log q + U],
    the ESS of q as importance proposal (fraction of n), and for U1 the mass of q per mode.

    Uses n fresh samples from a fixed seed inside `util.fixed_rng`, which restores every
    random stream (CPU, CUDA, MPS, NumPy, Python) afterwards: evaluating never changes
    training, on any device, and a resumed run continues exactly. log q and U in float64
    where possible."""
    with util.fixed_rng(seed):
        xs, lqs = [], []
        for m in range(0, n, chunk):
            x, lq = model.sample_and_log_prob(min(chunk, n - m))
            xs.append(x)
            lqs.append(lq)
    x, log_q = torch.cat(xs, 1), torch.cat(lqs, 1).double()
    out = {}
    for t, name in enumerate(names):
        U = targets.energy(name, x[t].double())
        d = log_q[t] + U                                  # log q - log p~ per sample
        log_Z = targets.log_Z(name)
        lw = -d                                           # log importance weights p~/q
        ess = evaluation.effective_sample_size(lw) / n
        r = {"bound": float(d.mean()), "kl": float(d.mean()) + log_Z,
             "kl_se": float(d.std() / math.sqrt(n)), "ess": ess, "log_Z": log_Z}
        if name == "U1":
            r["mass_left"] = float((x[t, :, 0] < 0).double().mean())
            r["mass_right"] = 1 - r["mass_left"]
        out[name] = r
    return (out, x) if return_samples else out


def save_frame(path, x, names, step, res):
    """A gif frame: a histogram of q's evaluation samples per target (cheap; the final figure
    shows the exact density of q on the grid)."""
    panels = [(f"{n}: q samples, KL {res[n]['kl']:.3f}", plots.samples(x[t], bound=targets.BOX,
                                                                      bins=100))
              for t, n in enumerate(names)]
    return plots.save_panels(path, panels, title=f"step {step}", size=2.4)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args, ckpt = scaffold.parse(build_parser(), argv, SCRIPT)
    if ckpt is None:
        check_args(args, argv)
    else:
        if args.steps < ckpt["step"]:
            config.fail(f"--steps {args.steps} is below the checkpoint's step {ckpt['step']}; "
                        f"pass --steps {ckpt['step']} or more")
    util.apply_threads(args)  # batches of 256 2D points: op-overhead bound
    device = scaffold.device(args)
    names = parse_targets(args.target)
    if args.anneal and args.anneal_steps > args.steps:
        print(f"note: anneal_steps={args.anneal_steps} > steps={args.steps}: beta < 1 until "
              f"the end", file=sys.stderr)
    name = ("vi", args.flow, f"K{args.K}", "+".join(names), f"s{args.seed}")
    model = build_model(args, names, device)
    with scaffold.Run(args, SCRIPT, name, ckpt) as run:
        return run.execute(lambda: train(args, run, model, names))


def build_model(args, names, device):
    """One flow per target (planar: one batched module), initialised from --seed."""
    util.set_seed(args.seed)
    flow_spec = {"name": args.flow, "dim": 2, "K": args.K, "base": args.base}
    if args.flow in HIDDEN_FLOWS:
        flow_spec["hidden"] = list(args.hidden)
    return vi_flows.build_flow("stack", flow_spec=flow_spec, n_targets=len(names),
                               batched=args.batched).to(device)


def train(args, run, model, names):
    """The reverse-KL update with the annealed U term, evaluation and figures; returns the
    summary."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    checkpoints, loop = run.checkpoints, run.loop
    checkpoints.load_or_save_first(lambda: {"flow_spec": model.spec(), "targets": names},
                                   flow=model, optimizer=opt)
    print(f"{run.name}: {args.flow} K={args.K} on {', '.join(names)}, {args.steps} steps, "
          f"{sum(p.numel() for p in model.parameters())} parameters, device "
          f"{next(model.parameters()).device}; outputs in {args.out_dir}, figures in "
          f"{args.image_dir}", file=sys.stderr)
    if checkpoints.resumed is None:
        eval_and_log(args, run, model, names, 0)
    for step in loop.iterations(args.steps):
        beta = beta_at(step, vars(args))
        lr = args.lr * util.lr_factor(args.lr_schedule, step, args.steps)
        util.set_lr(opt, lr)
        x, log_q = model.sample_and_log_prob(args.batch)          # (T, B, 2), (T, B)
        per_target = (log_q + beta * targets.energies(names, x)).mean(1)
        loss = per_target.sum()                                     # targets independent
        opt.zero_grad(set_to_none=True)
        loss.backward()
        loop.check(loss, model.parameters())
        opt.step()
        step += 1  # the iterations done
        if step % args.eval_every == 0 or step == args.steps:
            row = {f"{n}/loss": v for n, v in zip(names, per_target.tolist())}
            run.log.log({**row, "beta": beta, "lr": lr, "ms_per_step": 1000 / loop.rate()[0]},
                        step)
            res = eval_and_log(args, run, model, names, step)
            checkpoints.save()
            loop.print(f"step {step:6d} beta {beta:.3f} " + " ".join(
                f"{n}: KL {r['kl']:.4f} ESS {r['ess']:.3f}" for n, r in res.items()))
    return finish(args, run, model, names)


def eval_and_log(args, run, model, names, at):
    """An evaluation on eval_samples, logged, and its gif frame."""
    res, x = evaluate(model, names, args.eval_samples, return_samples=True)
    run.log.log({f"{t}/{k}": v for t, r in res.items() for k, v in r.items() if k != "log_Z"},
                at)
    if args.frames:
        frame = save_frame(os.path.join(args.image_dir, "frames", f"q_{at:06d}.png"), x, names,
                           at, res)
        run.log.log_image("q", frame, at)
    return res


def finish(args, run, model, names):
    """The final evaluation on final_samples, figures and the printed results; returns the
    summary."""
    img_dir, step = args.image_dir, run.loop.state["step"]
    res = evaluate(model, names, args.final_samples, seed=1)
    summary = {f"{t}/{k}": v for t, r in res.items() for k, v in r.items()}
    summary["step"] = step
    panels = [(f"exp(-{n})", plots.density(lambda z, n=n: -targets.energy(n, z),
                                           bound=targets.BOX)) for n in names]
    for t, n in enumerate(names):
        panels.append((f"q_K ({args.flow} K={args.K}) KL {res[n]['kl']:.3f}",
                       plots.density(model.flow(t).log_prob, bound=targets.BOX,
                                     normalise=False)))
    final = plots.save_panels(os.path.join(img_dir, "final.png"), panels, rows=2)
    run.log.log_image("final", final, step)
    if args.frames:
        plots.make_gif(os.path.join(img_dir, "frames"), os.path.join(img_dir, "training.gif"),
                       fps=4)
    for n, r in res.items():
        modes = (f", mass left/right {r['mass_left']:.3f}/{r['mass_right']:.3f}"
                 if "mass_left" in r else "")
        print(f"{n}: KL(q||p) {r['kl']:.4f} ± {r['kl_se']:.4f} nats, ESS {r['ess']:.3f}{modes}")
    print(f"figures in {img_dir}/, run in {args.out_dir}/")
    return summary


if __name__ == "__main__":
    sys.exit(config.cli(main))
