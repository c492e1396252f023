"""Variational inference with normalizing flows (Rezende & Mohamed 2015, sec. 6.1).

Fit a flow q_K to an unnormalised target p(z) ∝ exp(-U(z)) by minimising the reverse-KL bound

    F(q) = E_{z0 ~ q0}[log q0(z0) - sum_k log|det df_k/dz_{k-1}| + beta_t U(z_K)]
         = KL(q || p) - log Z        (at beta_t = 1)

with the paper's annealing beta_t = min(1, 0.01 + t / anneal_steps) (anneal_steps = 10000 in
the paper, which trains 500k iterations; 5000 here by default, for 10k-step runs). Every normalised number uses the *confined* U of targets.py (U2-U4 are improper
on the plane): KL(q || p) = E_q[log q + U] + log Z with log Z by float64 grid integration, the
effective sample size of q as an importance proposal for p, and for U1 the mass of q on
each of its two modes (z1 < 0, z1 > 0).

    python train_vi.py --target=U1 --flow=planar --K=32
    python train_vi.py --target=all --flow=planar --K=32     # U1-U4 as one batched module
    python train_vi.py --resume=runs/<run name>              # continue after Ctrl-C

Writes runs/<run name>/ (config.json, metrics.jsonl, summary.json, checkpoint.pt) and
images/<run name>/ (frames/q_<step>.png, training.gif, final.png). Several targets in one run
train side by side; planar flows then run as one batched module (flows.PlanarStack).
"""
import math
import os
import sys
import time

import torch

import config
import flows
import plots
import targets
import util
from logger import RunLogger


def build_parser():
    p = config.parser("Normalizing flows fit to energy functions by reverse KL")
    p.add_argument("--target", default="U1",
                   help="U1, U2, U3, U4, a comma list, 'all' (= U1,U2,U3,U4), or a dataset "
                        "with an exact density (8gaussians, checkerboard, ...)")
    p.add_argument("--flow", default="planar", choices=flows.VI_FLOWS)
    p.add_argument("--K", type=config.positive_int, default=32,
                   help="number of layers (planar/radial) or blocks (iaf/realnvp/nice)")
    p.add_argument("--hidden", type=config.positive_int, nargs="+", default=[64, 64],
                   help="hidden sizes of the iaf/realnvp/nice/spline networks")
    p.add_argument("--base", default="learned", choices=["learned", "fixed"],
                   help="q0: learnable diagonal Gaussian, or fixed N(0, I)")
    config.add_flag(p, "--batched", default=True,
                   help="planar flows of several targets as one batched module")
    p.add_argument("--steps", type=config.positive_int, default=10000)
    p.add_argument("--batch", type=config.positive_int, default=256)
    p.add_argument("--lr", type=config.positive_float, default=3e-3,
                   help="Adam learning rate (3e-3 meets the README's planar K=32 targets on "
                        "seeds 42, 0 and 1; 1e-3 misses U2/U3 on two of them)")
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
    return names


def beta_at(step, cfg):
    """The paper's annealing of the U term: beta_t = min(1, 0.01 + t / anneal_steps)."""
    return min(1.0, 0.01 + step / cfg["anneal_steps"]) if cfg["anneal"] else 1.0


def lr_at(step, cfg):
    if cfg["lr_schedule"] == "constant":
        return cfg["lr"]
    return cfg["lr"] * 0.5 * (1 + math.cos(math.pi * min(step, cfg["steps"]) / cfg["steps"]))


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, names, n, seed=0, chunk=50000, return_samples=False):
    """Per target: KL(q || p) (and its Monte Carlo standard error), the bound E_q[log q + U],
    the ESS of q as importance proposal (fraction of n), and for U1 the mass of q per mode.

    Uses n fresh samples from a fixed seed, inside fork_rng so training's RNG stream is
    untouched (a resumed run continues exactly). log q and U in float64 where possible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
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
        ess = util.effective_sample_size(lw) / n
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


def make_gif(frame_dir, out):
    """The core's images/create_gif.py (frames sorted by the number in their names)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "create_gif", os.path.join(os.path.dirname(os.path.abspath(__file__)), "images",
                                   "create_gif.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_gif(frame_dir, out, fps=4)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = config.parse(build_parser(), argv)
    ckpt = None
    if args.resume:  # continue a run: its own config, this command's --steps and logging flags
        args, ckpt = config.load_resume(args, argv, ("steps", "wandb", "project", "device",
                                                     "threads"))
    cfg = config.to_dict(args)
    if cfg["anneal_steps"] > cfg["steps"] and cfg["anneal"]:
        print(f"note: anneal_steps={cfg['anneal_steps']} > steps={cfg['steps']}: beta < 1 "
              f"until the end", file=sys.stderr)

    # -- setup: seed, device, targets, run directory --
    config.apply_threads(args)  # batches of 256 2D points: op-overhead bound
    util.set_seed(cfg["seed"])
    device = util.get_device(cfg["device"])
    names = parse_targets(cfg["target"])
    name = "vi-{}-K{}-{}-s{}".format(cfg["flow"], cfg["K"], "+".join(names), cfg["seed"])
    out_dir = cfg["out_dir"] or os.path.join("runs", config.run_name(name))
    cfg["out_dir"] = out_dir
    run = os.path.basename(os.path.normpath(out_dir))
    img_dir = os.path.join("images", run)
    os.makedirs(img_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")

    # -- model: one flow per target (planar: one batched module) --
    flow_spec = {"name": cfg["flow"], "dim": 2, "K": cfg["K"], "base": cfg["base"]}
    if cfg["flow"] in ("iaf", "realnvp", "nice", "spline"):
        flow_spec["hidden"] = list(cfg["hidden"])
    model = flows.build_flow("stack", flow_spec=flow_spec, n_targets=len(names),
                             batched=cfg["batched"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["flow"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        util.set_rng_state(ckpt["rng"])
        print(f"resuming {out_dir} at step {step}", file=sys.stderr)
    log = RunLogger(out_dir, cfg, mode=cfg["wandb"], project=cfg["project"], name=run,
                    resume_step=step if ckpt is not None else None)

    def checkpoint(at):
        util.save_checkpoint(ckpt_path, {
            "flow": model.state_dict(), "flow_spec": model.spec(), "config": cfg, "step": at,
            "optimizer": opt.state_dict(), "rng": util.rng_state(), "targets": names})

    def eval_and_log(at, n):
        res, x = evaluate(model, names, n, return_samples=True)
        row = {f"{t}/{k}": v for t, r in res.items() for k, v in r.items() if k != "log_Z"}
        log.log(row, at)
        if cfg["frames"]:
            frame = save_frame(os.path.join(img_dir, "frames", f"q_{at:06d}.png"), x, names,
                               at, res)
            log.log_image("q", frame, at)
        return res

    print(f"{run}: {cfg['flow']} K={cfg['K']} on {', '.join(names)}, {cfg['steps']} steps, "
          f"{sum(p.numel() for p in model.parameters())} parameters", file=sys.stderr)
    if step == 0:
        eval_and_log(0, cfg["eval_samples"])
        checkpoint(0)

    # -- training loop: reverse KL, batch of q samples, annealed U term --
    status, t0, last = 0, time.time(), time.time()
    try:
        while step < cfg["steps"]:
            beta, lr = beta_at(step, cfg), lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            x, log_q = model.sample_and_log_prob(cfg["batch"])          # (T, B, 2), (T, B)
            per_target = (log_q + beta * targets.energies(names, x)).mean(1)
            loss = per_target.sum()                                     # targets independent
            if not torch.isfinite(loss):
                bad = [n for n, v in zip(names, per_target.tolist()) if not math.isfinite(v)]
                print(f"loss is {loss.item()} at step {step} (targets {', '.join(bad)}); "
                      f"stopping. The last good checkpoint is kept in {ckpt_path}",
                      file=sys.stderr)
                log.log({"nan_at": step}, step)
                status = 1
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
                row = {f"{n}/loss": v for n, v in zip(names, per_target.tolist())}
                log.log({**row, "beta": beta, "lr": lr,
                         "ms_per_step": 1000 * (time.time() - last) / cfg["eval_every"]}, step)
                res = eval_and_log(step, cfg["eval_samples"])
                checkpoint(step)
                last = time.time()
                print(f"step {step:6d} beta {beta:.3f} " + " ".join(
                    f"{n}: KL {r['kl']:.4f} ESS {r['ess']:.3f}" for n, r in res.items()),
                    file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        checkpoint(step)
        print(f"\ninterrupted at step {step}; checkpoint saved. Continue with "
              f"`python train_vi.py --resume {out_dir}`", file=sys.stderr)
        log.finish()
        return 130

    # -- final evaluation, figures, summary --
    if status == 0:
        res = evaluate(model, names, cfg["final_samples"], seed=1)
        summary = {f"{t}/{k}": v for t, r in res.items() for k, v in r.items()}
        summary.update(step=step, seconds=time.time() - t0)
        log.summary(summary)
        panels = []
        for t, n in enumerate(names):
            panels.append((f"exp(-{n})", plots.density(lambda z: -targets.energy(n, z),
                                                       bound=targets.BOX)))
        for t, n in enumerate(names):
            panels.append((f"q_K ({cfg['flow']} K={cfg['K']}) KL {res[n]['kl']:.3f}",
                           plots.density(model.flow(t).log_prob, bound=targets.BOX,
                                         normalise=False)))
        final = plots.save_panels(os.path.join(img_dir, "final.png"), panels, rows=2)
        log.log_image("final", final, step)
        if cfg["frames"]:
            make_gif(os.path.join(img_dir, "frames"), os.path.join(img_dir, "training.gif"))
        for n, r in res.items():
            modes = (f", mass left/right {r['mass_left']:.3f}/{r['mass_right']:.3f}"
                     if "mass_left" in r else "")
            print(f"{n}: KL(q||p) {r['kl']:.4f} ± {r['kl_se']:.4f} nats, ESS {r['ess']:.3f}"
                  f"{modes}")
        print(f"figures in {img_dir}/, run in {out_dir}/")
    log.finish()
    return status


if __name__ == "__main__":
    sys.exit(main())
