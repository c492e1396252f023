"""Short-run MCMC maximum-likelihood learning of an EBM on 2D toy data and on digit images.

Nijkamp, Hill, Han, Zhu, Wu, "On the Anatomy of MCMC-Based Maximum Likelihood Learning of
Energy-Based Models" (AAAI 2020). The model is p(x) ∝ exp(-U(x)), U = (2 / eps^2) F(x; theta),
F an MLP. Each iteration:
  positives  x+ ~ data (+ data_epsilon * N(0, I));
  negatives  x- = L steps of Langevin x <- x - dF/dx + eps N(0, I) from noise (uniform or
             Gaussian, times init_scale), from data, or from a persistent bank of chains;
  loss       (2 / eps^2) (mean F(x+) - mean F(x-)), SGD with lr scaled by eps^2 / 2 (so the
             step is lr * grad d_t) or Adam; lr decays exponentially to lr_min.
Diagnostics d_t = mean F(x+) - mean F(x-) and r_t = mean |dF/dx| along the chains are logged
every iteration (diagnostics.py).

Images (`--dataset digits|mnist`, image_data.py): F is a ConvNet (`--net conv8` for 8x8
digits, `vanilla` for 28px MNIST padded to 32), images travel as flattened rows in [-1, 1],
`samplers.ConvEnergy` gives the fast input gradient, and the persistent bank holds one chain
per training image (at most --bank_size). Every evaluation scores n_eval short-run samples
(Frechet distance on classifier features and pixels, its ratio to the real-data floor at the
same n, label-histogram TV; image_metrics.SampleMetric) and saves a grid of the current negatives; the grids become a gif at the end.

    python train_mcmc.py --config configs/mcmc_digits_nonconvergent.json
    python train_mcmc.py --dataset mnist --mnist_images train-images-idx3-ubyte.gz \
        --mnist_labels train-labels-idx1-ubyte.gz --init uniform --eps 0.015 --optimizer adam

    python train_mcmc.py --config configs/mcmc_gmm_convergent.json
    python train_mcmc.py --dataset rings4 --init persistent --eps 0.125 --steps 2000
    python train_mcmc.py --resume runs/<name>            # continue an interrupted run

Outputs: runs/<name>/{config.json, metrics.jsonl, summary.json, checkpoint.pt, landscape.png
or negatives.png, diagnostics.png}, figures in --image_dir (default images/<run folder name>).
The run folder is runs/<--name> (the config files name their run), or with neither --name nor
--out_dir runs/mcmc-<dataset>-<init>-eps<eps>-s<seed>-<time>.

Checkpoints: "ebm"/"ebm_spec" hold U itself (the last layer scaled by 2 / eps^2), so
`checkpoint.load_run` gives the model density exp(-ebm(x)) / Z; "F" holds the trained network.
Image runs store U under "image_ebm"/"image_ebm_spec" instead (ebm.load_image_ebm).
"""
import copy
import math
import os
import shutil
import sys

import torch

import config
import datasets
import diagnostics
import evaluation
import image_data
import image_metrics
import plots
import scaffold
import util
from ebm import ACTIVATIONS, EBM, ConvEBM, default_arch
from samplers import ConvEnergy, Energy, chain_starts, langevin

# a resumed run may change the `overridable` flags (none of them changes the training
# itself); the rest comes from the checkpoint
SCRIPT = scaffold.Script("train_mcmc.py", keys=("F", "optimizer", "step", "rng", "d_hist",
                                                "r_hist"), overridable=(
    "steps", "budget", "eval_every", "log_every", "image_dir", "wandb", "project", "device",
    "threads"))
# flags that only one kind of data uses (set for the other kind they are refused)
IMAGE_ONLY = ("net", "n_f", "mnist_images", "mnist_labels", "n_eval", "langevin_dtype")
TOY_ONLY = ("hidden", "act", "n_test", "n_kde", "kde_bw")
DECAY = config.checked(float, lambda v: 0 < v <= 1, "a decay in (0, 1] (1: no decay)")  # --lr_decay


def hidden_sizes(s):
    try:
        sizes = tuple(int(v) for v in str(s).strip("()[] ").split(",") if v.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) <= 0:
        raise config.argparse.ArgumentTypeError(
            f"expected comma-separated positive layer widths like 32,64,64,64, got {s!r}")
    return sizes


def build_parser():
    p = config.parser("Short-run MCMC maximum-likelihood learning of an EBM (Nijkamp et al. 2020)")
    p.add_argument("--name", default=None,
                   help="run name: the run folder is runs/<name> (an explicit --out_dir wins); "
                        "default mcmc-<dataset>-<init>-eps<eps>-s<seed>-<time>")
    # data
    p.add_argument("--dataset", default="gmm",
                   choices=list(datasets.NAMES) + list(image_data.IMAGE_DATASETS))
    p.add_argument("--n_train", type=config.positive_int, default=100000,
                   help="training samples (images: at most this many training images)")
    p.add_argument("--n_test", type=config.positive_int, default=10000,
                   help="held-out samples for the test NLL (2D datasets)")
    p.add_argument("--data_epsilon", type=config.nonnegative_float, default=0.0,
                   help="std of Gaussian jitter added to the positive samples")
    # model
    p.add_argument("--hidden", type=hidden_sizes, default=(32, 64, 64, 64),
                   help="hidden widths of F (paper: 2-32-64-64-64-1; 2D datasets)")
    p.add_argument("--act", default="leakyrelu", choices=list(ACTIVATIONS),
                   help="activation of F (2D datasets)")
    # images (--dataset digits / mnist)
    p.add_argument("--net", default="auto", choices=["auto", *ConvEBM.ARCHS],
                   help="image energy: conv8 (8x8 digits) or vanilla (28px MNIST); auto picks")
    p.add_argument("--n_f", type=config.positive_int, default=16,
                   help="channels of the first conv layer (then 2x, 4x, ...)")
    p.add_argument("--mnist_images", default=None, help="local MNIST images IDX file (.gz ok)")
    p.add_argument("--mnist_labels", default=None, help="local MNIST labels IDX file (.gz ok)")
    p.add_argument("--n_eval", type=config.positive_int, default=1000,
                   help="short-run samples scored by the image metric every evaluation (its "
                        "floor draws as many real images)")
    p.add_argument("--langevin_dtype", default="float32", choices=["float32", "bfloat16"],
                   help="precision of the images' Langevin gradient (the chains stay float32)")
    # Langevin
    p.add_argument("--eps", type=config.positive_float, default=0.125, help="Langevin noise std")
    p.add_argument("--L", type=config.positive_int, default=100, help="Langevin steps per iteration")
    p.add_argument("--init", default="persistent",
                   choices=["persistent", "uniform", "gaussian", "data"],
                   help="where the chains start")
    p.add_argument("--init_scale", type=config.positive_float, default=1.0,
                   help="noise init: U[-s, s]^2 or N(0, s^2 I); the bank starts U[-s, s]^2")
    p.add_argument("--bank_size", type=config.positive_int, default=10000,
                   help="persistent chains (images: at most one per training image)")
    # optimisation
    p.add_argument("--steps", type=config.positive_int, default=2000, help="iterations (updates)")
    config.rename(p, "--n_iter", "--steps")
    p.add_argument("--budget", type=config.positive_float, default=None,
                   help="CPU-seconds of training after which the run ends and is evaluated "
                        "(default: none; the learning rate still decays per iteration)")
    p.add_argument("--batch", type=config.positive_int, default=100)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--lr", type=config.positive_float, default=0.1,
                   help="SGD: multiplied by eps^2/2 (the paper's tuning); Adam: as is")
    p.add_argument("--lr_decay", type=DECAY, default=1.0,
                   help="lr at iteration t: max(lr_min, lr * lr_decay^t); in (0, 1]")
    p.add_argument("--lr_min", type=config.positive_float, default=None,
                   help="floor of the decayed lr (default: lr)")
    p.add_argument("--grad_clip", type=config.nonnegative_float, default=0.0,
                   help="clip the parameter-gradient norm (0: off)")
    # evaluation and logging
    p.add_argument("--log_every", type=config.positive_int, default=50)
    p.add_argument("--eval_every", type=config.positive_int, default=500,
                   help="grid KL of the EBM and of the short-run KDE, figures, checkpoint")
    p.add_argument("--n_kde", type=config.positive_int, default=10000,
                   help="short-run samples for the KDE (2D datasets)")
    p.add_argument("--kde_bw", type=config.positive_float, default=0.05)
    p.add_argument("--max_lag", type=config.positive_int, default=30,
                   help="largest lag of the d_t / r_t correlations in diagnostics.png")
    return p


# ----------------------------------------------------------------------------- input checks
def check_args(args, argv):
    """Bad combinations of flags: one line, exit status 2, before any work."""
    if args.resume:
        args.hidden = tuple(args.hidden)
        for action in build_parser()._actions:  # flags added since the run was saved
            if action.dest != "help" and not hasattr(args, action.dest):
                setattr(args, action.dest, action.default)
    else:
        if args.lr_min is None:
            args.lr_min = args.lr
        if args.out_dir:  # the run's name is its folder's
            args.name = os.path.basename(os.path.normpath(args.out_dir))
        elif args.name:
            args.out_dir = os.path.join("runs", args.name)
    if args.lr_min > args.lr:
        config.fail(f"--lr_min {args.lr_min} is above --lr {args.lr}; use lr_min <= lr")
    if args.init == "persistent" and args.bank_size < args.batch:
        config.fail(f"--bank_size {args.bank_size} is smaller than --batch {args.batch}")
    image = args.dataset in image_data.IMAGE_DATASETS
    if not args.resume:  # flags of the other kind of data would be ignored: refuse them
        unused = IMAGE_ONLY if not image else TOY_ONLY
        if args.dataset == "digits":
            unused = unused + ("mnist_images", "mnist_labels")
        defaults = build_parser()
        unused = [f"--{k}" for k in unused if getattr(args, k) != defaults.get_default(k)]
        if unused:
            config.fail(f"{', '.join(unused)} mean(s) nothing for --dataset {args.dataset}; "
                        f"drop {' '.join(unused)}")
    if not image and args.n_train < args.batch:
        config.fail(f"--n_train {args.n_train} is smaller than --batch {args.batch}; every "
                    f"batch would repeat training points: lower --batch")
    # the data, the chains and the Langevin noise (drawn up front, L steps at once) must fit
    f32 = 4 * math.prod(image_data.image_shape(args.dataset) if image else (2,))
    sizes = {"--batch": f32 * args.batch * (args.L + 3), "--bank_size": f32 * args.bank_size}
    if image:
        sizes["--n_eval"] = f32 * args.n_eval * (args.L + 2)
    else:  # datasets sample in float64 before the float32 copy
        sizes.update({"--n_train": 3 * f32 * args.n_train, "--n_test": 3 * f32 * args.n_test,
                      "--n_kde": f32 * args.n_kde * (args.L + 5)})
    util.check_memory(sizes)


# ----------------------------------------------------------------------------- data and model
def load_data(args, device):
    """Training and test data; 2D datasets also a sample of n_kde true points (the KDE's
    floor). Images: flattened rows in [-1, 1] with labels (bad files: one-line error)."""
    rng = util.set_seed(args.seed)
    if args.dataset in image_data.IMAGE_DATASETS:
        try:
            x_train, y_train, x_test, y_test = image_data.load_images(
                args.dataset, args.mnist_images, args.mnist_labels)
        except image_data.DataError as e:
            config.fail(str(e))
        x_train, y_train = x_train[:args.n_train], y_train[:args.n_train]
        if len(x_train) < args.batch:
            config.fail(f"{args.dataset} has {len(x_train)} training images, fewer than --batch "
                        f"{args.batch}; lower --batch")
        if args.n_eval > len(x_train):
            config.fail(f"--n_eval {args.n_eval} is more than the {len(x_train)} training "
                        f"images (the metric's floor scores as many real images); lower --n_eval")
        if args.n_eval < 2:
            config.fail("--n_eval must be at least 2 (the metric fits a covariance)")
        bank_size = min(args.bank_size, len(x_train))  # one persistent chain per image
        if args.init == "persistent" and bank_size < args.batch:
            config.fail(f"the persistent bank ({bank_size} chains, one per training image) is "
                        f"smaller than --batch {args.batch}; lower --batch")
        return dict(x_train=x_train.to(device), y_train=y_train, x_test=x_test, y_test=y_test,
                    bank_size=bank_size)
    x_train = datasets.sample(args.dataset, args.n_train, rng).to(device)
    x_test = datasets.sample(args.dataset, args.n_test, rng)
    x_floor = datasets.sample(args.dataset, args.n_kde, rng)
    return dict(x_train=x_train, x_test=x_test, x_floor=x_floor, bank_size=args.bank_size)


def build_energy(args, device):
    """The network F: an MLP for 2D data, a ConvEBM for images (a net that does not fit the
    images: one-line error)."""
    if args.dataset not in image_data.IMAGE_DATASETS:
        return EBM(2, args.hidden, args.act).to(device)
    if args.net == "auto":
        args.net = default_arch(args.dataset)
    try:
        F = ConvEBM(args.net, image_data.image_shape(args.dataset), args.n_f)
    except ValueError as e:
        config.fail(f"--net {args.net}: {e}; or leave --net auto")
    return F.to(device)


def scaled_ebm(F, scale):
    """A copy of the EBM F whose output is U = scale * F (last layer scaled): what the rest of
    the project reads as the energy, p ∝ exp(-ebm(x))."""
    U = copy.deepcopy(F)
    last = U.net[-1]
    with torch.no_grad():
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    return U.eval()


class Chains:
    """The negatives' chains: where they start (--init; the persistent bank is updated in
    place by the caller) and the short-run distribution from there."""

    def __init__(self, args, U, x_train, bank):
        self.args, self.U, self.x_train, self.bank = args, U, x_train, bank
        self.dim, self.device = x_train.shape[1], x_train.device

    def starts(self, n):
        """Chain starts and, for the persistent bank, their indices."""
        return chain_starts(self.args.init, n, self.dim, self.args.init_scale, self.bank,
                            self.x_train, self.device)

    def short_run(self, n):
        """n samples of the short-run distribution (the bank is read, not updated)."""
        return langevin(self.U, self.starts(n)[0], self.args.L, self.args.eps)


def make_optimizer(args, F):
    """SGD (lr scaled by eps^2 / 2, the paper's tuning) or Adam on F's energy parameters (the
    learned normaliser c plays no part in ML learning); returns it and its base lr."""
    lr0 = args.lr * (args.eps ** 2 / 2 if args.optimizer == "sgd" else 1.0)
    params = F.energy_params()
    return (torch.optim.SGD(params, lr=lr0) if args.optimizer == "sgd"
            else torch.optim.Adam(params, lr=lr0)), lr0


def make_scorer(args, data, image):
    """The evaluation's yardstick: the image metric (trains its classifier once) or, for 2D
    data, the KL of a KDE of n_kde true samples (the short-run KDE's floor)."""
    if not image:
        return diagnostics.kde_kl(args.dataset, data["x_floor"], args.kde_bw)
    metric = image_metrics.SampleMetric(data["x_train"].cpu(), data["y_train"], data["x_test"],
                                        data["y_test"], n=args.n_eval)
    print(f"{args.dataset}: {len(data['x_train'])} training / {len(data['x_test'])} test "
          f"images; metric classifier test accuracy {metric.test_accuracy:.3f}; "
          f"{metric.describe()}")
    return metric


def evaluate(args, run, F, scale, chains, scorer, data, x_neg, step):
    """Images: the sample metric of n_eval short-run samples and a grid of the current
    negatives (a gif frame). 2D: grid KL of the EBM and of the short-run KDE (and the KDE's
    mass outside the grid), the landscape figure. Both: the d_t / r_t figure."""
    title = f"{run.name}  iteration {step}"
    if args.dataset in image_data.IMAGE_DATASETS:
        m = scorer(chains.short_run(args.n_eval))
        m.update({f"{k}_floor": scorer.floor[k] for k in scorer.KEYS})
        m.update({f"{k}_floor_sd": scorer.floor_sd[k] for k in scorer.KEYS})
        m["x_neg_min"], m["x_neg_max"] = float(x_neg.min()), float(x_neg.max())
        fig = image_data.save_grid(os.path.join(args.image_dir, "negatives",
                                                f"step_{step:06d}.png"),
                                   x_neg[:100], F.shape, title=title)
        key, name = "negatives", "negatives.png"
    else:
        Uq = scaled_ebm(F, scale)
        m = evaluation.evaluate_2d(args.dataset, data["x_test"], ebm=Uq, device=x_neg.device)
        m.pop("c_gap", None)
        x_short = chains.short_run(args.n_kde)
        kl, outside = diagnostics.kde_kl(args.dataset, x_short, args.kde_bw, return_outside=True)
        if kl is not None:
            m.update(kl_kde=kl, kl_kde_floor=scorer, kde_outside=outside)
        fig = diagnostics.save_landscape(os.path.join(args.image_dir, f"landscape_{step:06d}.png"),
                                         args.dataset, Uq, x_short, args.kde_bw, title=title)
        key, name = "landscape", "landscape.png"
    shutil.copyfile(fig, os.path.join(args.out_dir, name))
    run.log.log_image(key, fig, step)
    if len(run.loop.state["d_hist"]) > 2:
        diag = diagnostics.save_diagnostics(os.path.join(args.out_dir, "diagnostics.png"),
                                            run.loop.state["d_hist"], run.loop.state["r_hist"],
                                            args.max_lag, title=title)
        run.log.log_image("diagnostics", diag, step)
    return m


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args, ckpt = scaffold.parse(build_parser(), argv, SCRIPT)
    check_args(args, argv)
    if ckpt is not None and ckpt["step"] >= args.steps:
        config.fail(f"{args.out_dir} already ran {ckpt['step']} iterations; pass a larger "
                    f"--steps to continue it")
    util.apply_threads(args)
    device = scaffold.device(args)
    data = load_data(args, device)
    F = build_energy(args, device)
    name = ("mcmc", args.dataset, args.init, f"eps{args.eps}", f"s{args.seed}")
    with scaffold.Run(args, SCRIPT, name, ckpt) as run:
        return run.execute(lambda: train(args, run, data, F))


def train(args, run, data, F):
    """Chains, the update and evaluation; returns the summary."""
    image = args.dataset in image_data.IMAGE_DATASETS
    x_train, eps = data["x_train"], args.eps
    scale = 2.0 / eps ** 2  # U = scale * F
    opt, lr0 = make_optimizer(args, F)
    params = F.energy_params()
    U = (ConvEnergy(F, scale, dtype=None if args.langevin_dtype == "float32" else
                    getattr(torch, args.langevin_dtype)) if image else Energy(F, scale))
    bank = None
    if args.init == "persistent":
        bank = args.init_scale * (2 * torch.rand(data["bank_size"], x_train.shape[1],
                                                 device=x_train.device) - 1)
    # the loop's position and everything accumulated (kept in checkpoints: a resumed run
    # writes the same rows and weights as an uninterrupted one); the checkpoint also holds
    # U itself ("ebm", images "image_ebm"), which checkpoint.load_run reads as the energy
    key = "image_ebm" if image else "ebm"
    checkpoints, loop = run.checkpoints, run.loop
    state = loop.track(bank=bank, d_hist=[], r_hist=[])
    checkpoints.load_or_save_first(lambda: {
        key: scaled_ebm(F, scale).state_dict(), f"{key}_spec": F.spec(), "energy_scale": scale,
        **{k: torch.tensor(state[k], dtype=torch.float64) for k in ("d_hist", "r_hist")}},
        F=F, optimizer=opt)
    d_hist, r_hist = ([float(v) for v in state[k]] for k in ("d_hist", "r_hist"))
    state.update(d_hist=d_hist, r_hist=r_hist)
    chains = Chains(args, U, x_train, state["bank"])
    scorer = make_scorer(args, data, image)
    print(f"run {run.name}: {args.dataset}, init={args.init}, eps={eps}, L={args.L}, "
          f"{args.optimizer} lr={args.lr}, {args.steps} iterations, device={x_train.device}; "
          f"outputs in {args.out_dir}, figures in {args.image_dir}")
    metrics = {}

    def evaluate_now(step, x_neg):
        with util.fixed_rng(args.seed):  # evaluating never changes training
            m = evaluate(args, run, F, scale, chains, scorer, data, x_neg, step)
        m.update(sec_per_iter=1 / loop.rate()[0], cpu_s=loop.cpu_s)
        run.log.log(m, step)
        loop.print(f"it {step:6d}  " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()
                                                 if k in EVAL_SHOWN))
        checkpoints.save()
        return m

    x_neg = None
    for step in loop.iterations(args.steps, until=lambda: loop.spent(args.budget)):
        util.set_lr(opt, lr0 * util.lr_factor("exponential", step, args.steps,
                                              args.lr_min / args.lr, args.lr_decay))
        x_pos = x_train[torch.randint(len(x_train), (args.batch,), device=x_train.device)]
        if args.data_epsilon > 0:
            x_pos = x_pos + args.data_epsilon * torch.randn_like(x_pos)
        x0, idx = chains.starts(args.batch)
        x_neg, r = langevin(U, x0, args.L, eps, return_grad_norm=True)
        d = F(x_pos).mean() - F(x_neg).mean()
        loss = scale * d
        opt.zero_grad(set_to_none=True)
        loss.backward()
        loop.check(loss, params)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        if chains.bank is not None:
            chains.bank[idx] = x_neg  # persistent chains: updated in place
        d_hist.append(float(d.detach()))
        r_hist.append(float(r.mean()))
        step += 1  # the iterations done
        if step % args.log_every == 0 or step == 1:
            row = {"d_t": d_hist[-1], "r_t": r_hist[-1], "loss": float(loss.detach()),
                   "lr": opt.param_groups[0]["lr"], "sec_per_iter": 1 / loop.rate()[0],
                   "cpu_s": loop.cpu_s}
            run.log.log(row, step)
            loop.print(f"it {step:6d}  d_t {row['d_t']:+.4e}  r_t {row['r_t']:.4f}  "
                      f"{row['sec_per_iter'] * 1e3:.1f} ms/it")
        if step % args.eval_every == 0 or step == args.steps:
            metrics = evaluate_now(step, x_neg)
    if x_neg is not None and state["step"] % args.eval_every and state["step"] < args.steps:
        metrics = evaluate_now(state["step"], x_neg)  # ended by --budget between evaluations
    if image:
        print(f"wrote {plots.make_gif(os.path.join(args.image_dir, 'negatives'), fps=4)}")
    print(f"done: {args.out_dir} (figures: {args.image_dir})")
    return {"status": "done", "steps": state["step"], **metrics}


EVAL_SHOWN = ("kl_ebm", "kl_kde", "kde_outside", "nll_ebm", "fd", "fd_ratio", "fd_pixels",
              "label_tv")


if __name__ == "__main__":
    sys.exit(config.cli(main))
