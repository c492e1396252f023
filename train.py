"""Flow contrastive estimation (FCE) and noise contrastive estimation (NCE) on 2D toy data.

    python train.py                                  # FCE, MAF flow, 8gaussians
    python train.py --flow=glow --dataset=spiral     # FCE with Glow
    python train.py --flow=gaussian                  # NCE: fixed Gaussian noise, learned log Z

An EBM p_theta(x) = exp(-f_theta(x) - c) and a noise model q_alpha play the value function
(Gao et al. 2020, eq. 5; Gutmann & Hyvarinen 2010)

    V(alpha, theta) = E_data log p/(p+q) + E_q log q/(p+q).

The EBM ascends V while the classifier "data iff p > q" is less than --threshold accurate on
the current batch, otherwise the flow descends V. With --flow=gaussian q is a fixed Gaussian
fitted to the data and only the EBM (with c) learns: that is NCE. At the optimum p = q = p_data
and -V = log 4 = 1.386.

Outputs: runs/<run>/{config.json, metrics.jsonl, summary.json, checkpoint.pt}, one figure per
epoch in images/<run>/, wandb (online when logged in, else offline).
"""
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import config
import datasets
import plots
import util
from ebm import EBM
from flows import build_flow
from logger import RunLogger

# keys a resumed run may change; everything else comes from the checkpoint
RESUME_OVERRIDES = ("epoch", "eval_every", "plot_every", "log_every", "wandb", "device",
                    "project", "image_dir")


def get_args(argv=None):
    p = config.parser(__doc__.split("\n")[0])
    p.add_argument("--dataset", default="8gaussians", choices=datasets.NAMES)
    p.add_argument("--flow", default="maf", choices=["maf", "glow", "gaussian"],
                   help="noise model: maf/glow are learned (FCE), gaussian is fixed (NCE)")
    p.add_argument("--epoch", type=config.positive_int, default=100, help="number of epochs")
    p.add_argument("--samples", type=config.positive_int, default=100_000,
                   help="training set size; an epoch is samples/batch iterations")
    p.add_argument("--test_samples", type=config.positive_int, default=20_000,
                   help="held-out samples for the test NLL")
    p.add_argument("--batch", type=config.positive_int, default=1000)
    p.add_argument("--threshold", type=config.open_unit, default=0.6,
                   help="update the EBM while the accuracy is below this, else the flow")
    p.add_argument("--lr_ebm", type=config.positive_float, default=1e-3)
    p.add_argument("--lr_flow", type=config.positive_float, default=7e-4)
    p.add_argument("--b1", type=config.open_unit, default=0.9, help="Adam beta1")
    p.add_argument("--b2", type=config.open_unit, default=0.999, help="Adam beta2")
    p.add_argument("--lr_schedule", default="cosine", choices=["constant", "cosine"],
                   help="cosine: both learning rates decay to lr_min_factor * lr at the end")
    p.add_argument("--lr_min_factor", type=config.nonnegative_float, default=0.05)
    p.add_argument("--ebm_hidden", type=config.positive_int, nargs="+", default=[128, 128])
    p.add_argument("--ebm_act", default="silu", choices=["silu", "softplus", "tanh", "elu",
                                                         "leakyrelu", "relu"])
    p.add_argument("--flow_layers", type=config.positive_int, default=None,
                   help="MADE blocks (maf, default 5) or steps (glow, default 10)")
    p.add_argument("--flow_hidden", type=config.positive_int, nargs="+", default=[64, 64])
    config.add_flag(p, "--maf_bn", help="BatchNorm between MAF blocks")
    p.add_argument("--eval_every", type=config.positive_int, default=5,
                   help="epochs between exact grid evaluations (and the last epoch)")
    p.add_argument("--plot_every", type=config.positive_int, default=1,
                   help="epochs between density figures")
    p.add_argument("--log_every", type=config.positive_int, default=20,
                   help="iterations between metric rows")
    p.add_argument("--image_dir", default=None, help="default images/<run name>")
    return config.parse(p, argv)


# ----------------------------------------------------------------------------- models
def make_models(args, x_train, device):
    """EBM (c starts at the Gaussian noise's entropy, a sane log Z scale) and the noise flow."""
    ebm = EBM(2, args.ebm_hidden, args.ebm_act)
    kwargs = {}
    if args.flow != "gaussian":
        kwargs = {"hidden": args.flow_hidden}
        layers = args.flow_layers or (5 if args.flow == "maf" else 10)
        kwargs["n_blocks" if args.flow == "maf" else "n_steps"] = layers
        if args.flow == "maf":
            kwargs["batch_norm"] = args.maf_bn
    flow = build_flow(args.flow, x_train[:args.batch], **kwargs).to(device)
    return ebm.to(device), flow


def make_optimizers(args, ebm, flow):
    opt_ebm = torch.optim.Adam(ebm.parameters(), lr=args.lr_ebm, betas=(args.b1, args.b2))
    flow_params = [p for p in flow.parameters() if p.requires_grad]
    opt_flow = (torch.optim.Adam(flow_params, lr=args.lr_flow, betas=(args.b1, args.b2))
                if flow_params else None)
    return opt_ebm, opt_flow


def lr_factor(args, step, total):
    """Cosine decay from 1 to lr_min_factor over the run (or constant 1)."""
    if args.lr_schedule == "constant":
        return 1.0
    m = args.lr_min_factor
    return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


# ----------------------------------------------------------------------------- one iteration
def fce_step(ebm, flow, x, opt_ebm, opt_flow, threshold):
    """One FCE/NCE iteration on the data batch x; returns (V, accuracy, stepped model name).

    Forward passes build one graph; `torch.autograd.grad` then back-propagates only into the
    model that steps: the EBM step never differentiates the flow, and the flow step goes
    through f_theta only with respect to its input (the samples), not its weights."""
    n = x.shape[0]
    y, log_q_y = flow.sample_and_log_prob(n)
    log_q_x = flow.log_prob(x)
    log_p_x, log_p_y = ebm.log_prob(torch.cat([x, y])).split(n)
    V, acc = util.value_function(log_p_x, log_q_x, log_p_y, log_q_y)
    if not torch.isfinite(V):
        return V, acc, None
    if opt_flow is None or acc < threshold:
        opt, loss, who = opt_ebm, -V, "ebm"
    else:
        opt, loss, who = opt_flow, V, "flow"
    params = [p for g in opt.param_groups for p in g["params"]]
    grads = torch.autograd.grad(loss, params)
    if not all(torch.isfinite(g).all() for g in grads):
        return V.new_tensor(float("nan")), acc, None
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    return V.detach(), acc, who


# ----------------------------------------------------------------------------- outputs
class _Lines:
    """A stream for tqdm off a terminal: each refresh becomes one plain line (no carriage
    returns piling up in log files)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s):
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self):
        self.stream.flush()


def progress_bar(total, initial, desc):
    """tqdm on a terminal; off one (CI, nohup, redirected logs), a plain line every 30 s."""
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, dynamic_ncols=True, desc=desc[:40])
    return tqdm(total=total, initial=initial, ncols=100, mininterval=30, ascii=True,
                desc=desc[:30], file=_Lines(sys.stderr))


def save_figure(args, ebm, flow, x_show, epoch, device):
    path = os.path.join(args.image_dir, f"epoch_{epoch:04d}.png")
    was_training = flow.training
    flow.eval()
    panels = [("data", plots.samples(x_show)),
              (f"flow q ({args.flow})", plots.density(flow.log_prob, n=120, device=device,
                                                      normalise=False)),
              ("EBM p = exp(-f) / Z", plots.density(lambda x: -ebm(x), n=120, device=device))]
    flow.train(was_training)
    return plots.save_panels(path, panels, title=f"{args.dataset}, {args.flow}, epoch {epoch}")


def checkpoint_state(args, ebm, flow, opt_ebm, opt_flow, epoch, it, step, perm, wandb_id):
    return {"ebm": ebm.state_dict(), "ebm_spec": ebm.spec(), "flow": flow.state_dict(),
            "flow_spec": flow.spec(), "opt_ebm": opt_ebm.state_dict(),
            "opt_flow": opt_flow.state_dict() if opt_flow else None,
            "config": config.to_dict(args), "epoch": epoch, "it": it, "step": step,
            "perm": perm, "rng": util.rng_state(), "wandb_id": wandb_id}


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args, ckpt = get_args(argv), None
    if args.resume:
        args, ckpt = config.load_resume(args, argv, RESUME_OVERRIDES)
    config.apply_threads(args)
    try:
        device = util.get_device(args.device)
    except (ValueError, RuntimeError) as e:
        config.fail(str(e))
    name = config.run_name("nce" if args.flow == "gaussian" else "fce", args.flow,
                           args.dataset, f"s{args.seed}")
    args.out_dir = args.out_dir or os.path.join("runs", name)
    run = os.path.basename(os.path.normpath(args.out_dir))
    args.image_dir = args.image_dir or os.path.join("images", run)
    os.makedirs(args.image_dir, exist_ok=True)

    # data: a fixed training set and a held-out test set, both from the seed
    rng = util.set_seed(args.seed)
    x_train = datasets.sample(args.dataset, args.samples, rng).to(device)
    x_test = datasets.sample(args.dataset, args.test_samples, rng).to(device)

    # models and optimisers
    ebm, flow = make_models(args, x_train, device)
    opt_ebm, opt_flow = make_optimizers(args, ebm, flow)
    iters = max(args.samples // args.batch, 1)
    total = iters * args.epoch
    epoch, it, step, perm = 0, 0, 0, None
    if ckpt is not None:
        ebm.load_state_dict(ckpt["ebm"])
        flow.load_state_dict(ckpt["flow"])
        opt_ebm.load_state_dict(ckpt["opt_ebm"])
        if opt_flow is not None:
            opt_flow.load_state_dict(ckpt["opt_flow"])
        epoch, it, step, perm = ckpt["epoch"], ckpt["it"], ckpt["step"], ckpt["perm"]
        util.set_rng_state(ckpt["rng"])
        print(f"resuming {args.out_dir} at epoch {epoch}, iteration {step}")
    base_lrs = [(opt, lr) for opt, lr in ((opt_ebm, args.lr_ebm), (opt_flow, args.lr_flow))
                if opt is not None]

    log = RunLogger(args.out_dir, config.to_dict(args), args.wandb, args.project, run,
                    run_id=ckpt.get("wandb_id") if ckpt else None,
                    resume_step=step if ckpt else None)
    entropy = datasets.entropy(args.dataset)
    print(f"run {run}: {args.dataset}, flow={args.flow}, {total} iterations "
          f"({args.epoch} epochs x {iters}), device={device}; outputs in {args.out_dir}, "
          f"figures in {args.image_dir}")

    def save(ep, i, s, pm):
        util.save_checkpoint(os.path.join(args.out_dir, "checkpoint.pt"),
                             checkpoint_state(args, ebm, flow, opt_ebm, opt_flow, ep, i, s,
                                              pm, log.run_id))

    def evaluate(ep):
        flow.eval()
        m = util.evaluate_2d(args.dataset, x_test, ebm, flow, device=device)
        flow.train()
        parts = [f"epoch {ep}", f"NLL ebm {m['nll_ebm']:.4f}", f"flow {m['nll_flow']:.4f}"]
        if entropy is not None:
            parts += [f"(optimum H = {entropy:.4f})", f"KL ebm {m['kl_ebm']:.4f}",
                      f"flow {m['kl_flow']:.4f}"]
        parts.append(f"c - log Z {m['c_gap']:+.3f}")
        tqdm.write(" | ".join(parts))
        return m

    bar = progress_bar(total, step, run)
    acc_sum = v_sum = n_ebm = n_rows = 0
    t_last, cpu_last, step_last = time.perf_counter(), time.process_time(), step
    metrics = {}
    try:
        while epoch < args.epoch:
            if perm is None:
                perm = torch.randperm(args.samples, device=device)
            while it < iters:
                f = lr_factor(args, step, total)
                for opt, lr in base_lrs:
                    opt.param_groups[0]["lr"] = lr * f
                x = x_train[perm[it * args.batch:(it + 1) * args.batch]]
                V, acc, who = fce_step(ebm, flow, x, opt_ebm, opt_flow, args.threshold)
                if who is None:
                    raise FloatingPointError(
                        f"non-finite value function or gradient at iteration {step} "
                        f"(epoch {epoch}); the last good checkpoint is kept in "
                        f"{args.out_dir}. Try a lower --lr_ebm/--lr_flow or another --seed.")
                step, it = step + 1, it + 1
                v_sum += float(V)
                acc_sum += float(acc)
                n_ebm += who == "ebm"
                n_rows += 1
                bar.update(1)
                if step % args.log_every == 0:
                    now, cpu = time.perf_counter(), time.process_time()
                    row = {"value": -v_sum / n_rows, "accuracy": acc_sum / n_rows,
                           "ebm_step_fraction": n_ebm / n_rows, "epoch": epoch,
                           "lr_ebm": opt_ebm.param_groups[0]["lr"],
                           "it_per_s": (step - step_last) / (now - t_last),
                           "cpu_s_per_it": (cpu - cpu_last) / (step - step_last)}
                    if opt_flow is not None:
                        row["lr_flow"] = opt_flow.param_groups[0]["lr"]
                    log.log(row, step)
                    bar.set_postfix(value=f"{row['value']:.3f}", acc=f"{row['accuracy']:.3f}",
                                    refresh=False)
                    acc_sum = v_sum = n_ebm = n_rows = 0
                    t_last, cpu_last, step_last = now, cpu, step
            epoch, it, perm = epoch + 1, 0, None
            if epoch % args.eval_every == 0 or epoch == args.epoch:
                metrics = evaluate(epoch)
                log.log({**metrics, "epoch": epoch}, step)
            if epoch % args.plot_every == 0 or epoch == args.epoch:
                log.log_image("density", save_figure(args, ebm, flow, x_test, epoch, device), step)
            save(epoch, 0, step, None)
    except KeyboardInterrupt:
        bar.close()
        save(epoch, it, step, perm)
        print(f"\ninterrupted at iteration {step}: checkpoint saved; continue with\n"
              f"  python train.py --resume {args.out_dir}", file=sys.stderr)
        log.finish()
        return 130
    except FloatingPointError as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        log.finish()
        return 1
    bar.close()
    if metrics:
        log.summary({**metrics, "steps": step})
    log.finish()
    print(f"done: {args.out_dir} (gif: python images/create_gif.py {args.image_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
