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

Images (`--dataset digits|mnist`, mcmc_images.py): F is a ConvNet (`--net conv8` for 8x8
digits, `vanilla` for 28px MNIST padded to 32), images travel as flattened rows in [-1, 1],
`samplers.ConvEnergy` gives the fast input gradient, and the persistent bank holds one chain
per training image (at most --bank_size). Every evaluation scores n_eval short-run samples
(Frechet distance on classifier features and pixels, label-histogram TV; mcmc_images.
SampleMetric) and saves a grid of the current negatives; the grids become a gif at the end.

    python train_mcmc.py --config configs/mcmc_digits_nonconvergent.json
    python train_mcmc.py --dataset mnist --mnist_images train-images-idx3-ubyte.gz \
        --mnist_labels train-labels-idx1-ubyte.gz --init uniform --eps 0.015 --optimizer adam

    python train_mcmc.py --config configs/mcmc_gmm_convergent.json
    python train_mcmc.py --dataset rings4 --init persistent --eps 0.125 --n_iter 2000
    python train_mcmc.py --resume runs/<name>            # continue an interrupted run

Checkpoints: "ebm"/"ebm_spec" hold U itself (the last layer scaled by 2 / eps^2), so
`util.load_run` gives the model density exp(-ebm(x)) / Z; "F" holds the trained network.
Image runs store U under "image_ebm"/"image_ebm_spec" instead (mcmc_images.load_image_ebm).
"""
import copy
import os
import shutil
import sys
import time

import torch

import config
import datasets
import diagnostics
import mcmc_images
from ebm import ACTIVATIONS, EBM
from logger import RunLogger, read_metrics
from samplers import ConvEnergy, Energy, langevin
from util import (evaluate_2d, get_device, rng_state, save_checkpoint,
                  set_rng_state, set_seed)


def hidden_sizes(s):
    try:
        sizes = tuple(int(v) for v in str(s).strip("()[] ").split(",") if v.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) <= 0:
        raise config.argparse.ArgumentTypeError(
            f"expected comma-separated positive layer widths like 32,64,64,64, got {s!r}")
    return sizes


def make_gif(folder, fps=4):
    """images/create_gif.py's make_gif (images/ is not a package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "images", "create_gif.py")
    spec = importlib.util.spec_from_file_location("create_gif", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_gif(folder, fps=fps)


def get_parser():
    p = config.parser("Short-run MCMC maximum-likelihood learning of an EBM (Nijkamp et al. 2020)")
    p.add_argument("--name", default=None, help="run name (default mcmc-<dataset>-<init>-...)")
    # data
    p.add_argument("--dataset", default="gmm",
                   choices=list(datasets.NAMES) + list(mcmc_images.IMAGE_DATASETS))
    p.add_argument("--n_train", type=config.positive_int, default=100000)
    p.add_argument("--n_test", type=config.positive_int, default=10000)
    p.add_argument("--data_epsilon", type=config.nonnegative_float, default=0.0,
                   help="std of Gaussian jitter added to the positive samples")
    # model
    p.add_argument("--hidden", type=hidden_sizes, default=(32, 64, 64, 64),
                   help="hidden widths of F (paper: 2-32-64-64-64-1)")
    p.add_argument("--act", default="leakyrelu", choices=list(ACTIVATIONS))
    # images (--dataset digits / mnist)
    p.add_argument("--net", default="auto", choices=["auto", *mcmc_images.ConvEBM.ARCHS],
                   help="image energy: conv8 (8x8 digits) or vanilla (28px MNIST); auto picks")
    p.add_argument("--n_f", type=config.positive_int, default=16,
                   help="channels of the first conv layer (then 2x, 4x, ...)")
    p.add_argument("--mnist_images", default=None, help="local MNIST images IDX file (.gz ok)")
    p.add_argument("--mnist_labels", default=None, help="local MNIST labels IDX file (.gz ok)")
    p.add_argument("--n_eval", type=config.positive_int, default=500,
                   help="short-run samples scored by the image metric every evaluation")
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
    p.add_argument("--n_iter", type=config.positive_int, default=2000)
    p.add_argument("--batch", type=config.positive_int, default=100)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--lr", type=config.positive_float, default=0.1,
                   help="SGD: multiplied by eps^2/2 (the paper's tuning); Adam: as is")
    p.add_argument("--lr_decay", type=config.positive_float, default=1.0,
                   help="lr <- max(lr_min, lr * lr_decay) every iteration")
    p.add_argument("--lr_min", type=config.positive_float, default=None,
                   help="floor of the decayed lr (default: lr)")
    p.add_argument("--grad_clip", type=config.nonnegative_float, default=0.0,
                   help="clip the parameter-gradient norm (0: off)")
    # evaluation and logging
    p.add_argument("--log_every", type=config.positive_int, default=50)
    p.add_argument("--eval_every", type=config.positive_int, default=500,
                   help="grid KL of the EBM and of the short-run KDE, figures, checkpoint")
    p.add_argument("--n_kde", type=config.positive_int, default=10000,
                   help="short-run samples for the KDE")
    p.add_argument("--kde_bw", type=config.positive_float, default=0.05)
    p.add_argument("--max_lag", type=config.positive_int, default=30)
    p.add_argument("--image_dir", default="images", help="landscape frames go to <dir>/<run name>/")
    return p


def scaled_ebm(F, scale):
    """A copy of the EBM F whose output is U = scale * F (last layer scaled): what the rest of
    the project reads as the energy, p ∝ exp(-ebm(x))."""
    U = copy.deepcopy(F)
    last = U.net[-1]
    with torch.no_grad():
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    return U.eval()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_parser()
    args = config.parse(parser, argv)

    # -------------------------------------------------------------------- resume / config
    ckpt = None
    if args.resume:  # the saved configuration, with the flags typed now on top (e.g. --n_iter)
        args, ckpt = config.load_resume(args, argv)
        args.hidden = tuple(args.hidden)
    if args.lr_min is None:
        args.lr_min = args.lr
    if args.lr_min > args.lr:
        config.fail(f"--lr_min {args.lr_min} is above --lr {args.lr}; use lr_min <= lr")
    if args.init == "persistent" and args.bank_size < args.batch:
        config.fail(f"--bank_size {args.bank_size} is smaller than --batch {args.batch}")
    try:
        device = get_device(args.device)
    except ValueError as e:
        config.fail(str(e))
    name = args.name or (os.path.basename(os.path.normpath(args.out_dir)) if args.out_dir else
                         config.run_name("mcmc", args.dataset, args.init, f"eps{args.eps}",
                                         f"s{args.seed}"))
    args.name = name
    out_dir = args.out_dir or os.path.join("runs", name)
    args.out_dir = out_dir
    image_dir = os.path.join(args.image_dir, name)
    os.makedirs(image_dir, exist_ok=True)
    cfg = config.to_dict(args)
    cfg["hidden"] = list(args.hidden)

    config.apply_threads(args)

    # -------------------------------------------------------------------- data
    rng = set_seed(args.seed)
    image = args.dataset in mcmc_images.IMAGE_DATASETS
    if image:  # flattened rows in [-1, 1]; the metric's classifier sees the same training split
        try:
            x_train, y_train, x_test, y_test = mcmc_images.load_images(
                args.dataset, args.mnist_images, args.mnist_labels)
        except mcmc_images.DataError as e:
            config.fail(str(e))
        x_train, y_train = x_train[:args.n_train], y_train[:args.n_train]
    else:
        x_train = datasets.sample(args.dataset, args.n_train, rng).to(device)
        x_test = datasets.sample(args.dataset, args.n_test, rng)
        # the floor of the KDE metric: KDE of n_kde true samples, same bandwidth
        kl_kde_floor = diagnostics.kde_kl(args.dataset,
                                          datasets.sample(args.dataset, args.n_kde, rng),
                                          args.kde_bw)
    dim = x_train.shape[1]
    # images: one persistent chain per training image, at most --bank_size
    bank_size = min(args.bank_size, len(x_train)) if image else args.bank_size
    if args.init == "persistent" and bank_size < args.batch:
        config.fail(f"the persistent bank ({bank_size} chains) is smaller than --batch "
                    f"{args.batch}; lower --batch")

    # -------------------------------------------------------------------- model, optimizer
    eps = args.eps
    scale = 2.0 / eps ** 2  # U = scale * F
    if image:
        arch = mcmc_images.default_arch(args.dataset) if args.net == "auto" else args.net
        try:
            F = mcmc_images.ConvEBM(arch, mcmc_images.image_shape(args.dataset), args.n_f)
        except ValueError as e:
            config.fail(f"--net {arch}: {e}; or leave --net auto")
        F = F.to(device)
        cfg["net"] = arch
        # the sample metric's classifier sees the same training split as the EBM
        metric = mcmc_images.SampleMetric(x_train, y_train, x_test, y_test, n=args.n_eval)
        print(f"{args.dataset}: {len(x_train)} training / {len(x_test)} test images; metric "
              f"classifier test accuracy {metric.test_accuracy:.3f}, FD floor "
              f"{metric.floor['fd']:.2f} (pixels {metric.floor['fd_pixels']:.3f})")
        x_train = x_train.to(device)
    else:
        F = EBM(2, args.hidden, args.act).to(device)
    params = F.energy_params()  # the learned normaliser c plays no part in ML learning
    lr_factor = eps ** 2 / 2 if args.optimizer == "sgd" else 1.0
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=args.lr * lr_factor)
    else:
        opt = torch.optim.Adam(params, lr=args.lr)
    if image:
        U = ConvEnergy(F, scale, dtype=getattr(torch, args.langevin_dtype)
                       if args.langevin_dtype != "float32" else None)
    else:
        U = Energy(F, scale)
    bank = None
    if args.init == "persistent":
        bank = args.init_scale * (2 * torch.rand(bank_size, dim, device=device) - 1)
    step = 0
    d_hist, r_hist = [], []
    if ckpt is not None:
        F.load_state_dict(ckpt["F"])
        opt.load_state_dict(ckpt["optimizer"])
        if bank is not None:
            bank = ckpt["bank"].to(device)
        step = ckpt["step"]
        d_hist, r_hist = list(ckpt["d_hist"]), list(ckpt["r_hist"])
        set_rng_state(ckpt["rng"])
        print(f"resuming {out_dir} at iteration {step}")

    def init_states(n):
        """Chain starts and, for the persistent bank, their indices."""
        if args.init == "persistent":
            idx = torch.randperm(bank_size, device=device)[:n]
            return bank[idx], idx
        if args.init == "uniform":
            return args.init_scale * (2 * torch.rand(n, dim, device=device) - 1), None
        if args.init == "gaussian":
            return args.init_scale * torch.randn(n, dim, device=device), None
        return x_train[torch.randint(len(x_train), (n,), device=device)], None

    def short_run_samples(n):
        """n samples of the short-run distribution (the bank is read, not updated)."""
        if args.init == "persistent":
            x0 = bank[torch.randperm(bank_size, device=device)[:n]]
        else:
            x0 = init_states(n)[0]
        return langevin(U, x0, args.L, eps)

    # a fresh run starts metrics.jsonl anew; a resumed one keeps the rows up to its checkpoint
    log = RunLogger(out_dir, cfg, mode=args.wandb, project=args.project, name=name,
                    resume_step=step if ckpt is not None else None)
    cpu_before = 0.0
    if ckpt is not None:  # CPU time before the checkpoint, for checkpoints that do not store it
        cpu_before = ([r["cpu_sec"] for r in read_metrics(out_dir) if "cpu_sec" in r]
                      or [0.0])[-1]

    def save(step_):
        ebm_key = "image_ebm" if image else "ebm"  # util.load_run builds "ebm" as an MLP
        save_checkpoint(os.path.join(out_dir, "checkpoint.pt"), {
            ebm_key: scaled_ebm(F, scale).state_dict(), f"{ebm_key}_spec": F.spec(),
            "F": F.state_dict(), "energy_scale": scale, "config": cfg, "step": step_,
            "optimizer": opt.state_dict(), "bank": bank, "rng": rng_state(),
            "cpu_sec": time.process_time() - cpu0,
            "d_hist": torch.tensor(d_hist, dtype=torch.float64),
            "r_hist": torch.tensor(r_hist, dtype=torch.float64)})

    def diagnostics_figure(step_, title):
        if len(d_hist) > 2:
            diag = diagnostics.save_diagnostics(os.path.join(out_dir, "diagnostics.png"), d_hist,
                                                r_hist, args.max_lag, title=title)
            log.log_image("diagnostics", diag, step_)

    def evaluate_images(step_, x_neg):
        """Sample-quality metric of n_eval short-run samples, the grid of the current
        negatives (images/<run>/negatives/, a gif frame) and the d_t / r_t figure."""
        x_short = short_run_samples(args.n_eval)
        m = metric(x_short)
        m.update({f"{k}_floor": metric.floor[k] for k in ("fd", "fd_pixels", "label_tv")})
        m["x_neg_min"], m["x_neg_max"] = float(x_neg.min()), float(x_neg.max())
        title = f"{name}  iteration {step_}"
        grid = mcmc_images.save_grid(os.path.join(image_dir, "negatives", f"step_{step_:06d}.png"),
                                     x_neg[:100], F.shape, title=title)
        shutil.copyfile(grid, os.path.join(out_dir, "negatives.png"))
        log.log_image("negatives", grid, step_)
        diagnostics_figure(step_, title)
        return m

    def evaluate(step_, x_neg):
        """Grid KL of the EBM and of the short-run KDE, figures; returns the metrics."""
        if image:
            return evaluate_images(step_, x_neg)
        Uq = scaled_ebm(F, scale)
        m = evaluate_2d(args.dataset, x_test, ebm=Uq, device=device)
        m.pop("c_gap", None)
        x_short = short_run_samples(args.n_kde)
        kl = diagnostics.kde_kl(args.dataset, x_short, args.kde_bw)
        if kl is not None:
            m["kl_kde"] = kl
            m["kl_kde_floor"] = kl_kde_floor
        title = f"{name}  iteration {step_}"
        land = diagnostics.save_landscape(os.path.join(image_dir, f"landscape_{step_:06d}.png"),
                                          args.dataset, Uq, x_short, args.kde_bw, title=title)
        shutil.copyfile(land, os.path.join(out_dir, "landscape.png"))
        log.log_image("landscape", land, step_)
        diagnostics_figure(step_, title)
        return m

    # -------------------------------------------------------------------- training loop
    print(f"{name}: {args.dataset}, init={args.init}, eps={eps}, L={args.L}, "
          f"{args.optimizer} lr={args.lr}, {args.n_iter} iterations -> {out_dir}")
    status, metrics = "done", {}
    t_loop, n_timed = 0.0, 0
    # CPU seconds of the run (this process plus, when resumed, the ones before the checkpoint):
    # a fair measure on a shared machine
    cpu0 = time.process_time() - (float(ckpt.get("cpu_sec", cpu_before)) if ckpt else 0.0)
    try:
        while step < args.n_iter:
            t0 = time.perf_counter()
            x_pos = x_train[torch.randint(len(x_train), (args.batch,), device=device)]
            if args.data_epsilon > 0:
                x_pos = x_pos + args.data_epsilon * torch.randn_like(x_pos)
            x0, idx = init_states(args.batch)
            x_neg, r = langevin(U, x0, args.L, eps, return_grad_norm=True)
            if bank is not None:
                bank[idx] = x_neg  # persistent chains: updated in place
            d = F(x_pos).mean() - F(x_neg).mean()
            loss = scale * d
            if not torch.isfinite(loss):
                status = "nan"
                print(f"iteration {step + 1}: loss is {float(loss)}; stopping, the last good "
                      f"checkpoint is kept in {out_dir}", file=sys.stderr)
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
            for g in opt.param_groups:
                g["lr"] = max(args.lr_min * lr_factor, g["lr"] * args.lr_decay)
            step += 1
            d_hist.append(float(d.detach()))
            r_hist.append(float(r.mean()))
            t_loop += time.perf_counter() - t0
            n_timed += 1

            if step % args.log_every == 0 or step == 1:
                row = {"d_t": d_hist[-1], "r_t": r_hist[-1], "loss": float(loss.detach()),
                       "lr": opt.param_groups[0]["lr"], "sec_per_iter": t_loop / n_timed}
                log.log(row, step)
                print(f"it {step:6d}  d_t {row['d_t']:+.4e}  r_t {row['r_t']:.4f}  "
                      f"{row['sec_per_iter'] * 1e3:.1f} ms/it")
            if step % args.eval_every == 0 or step == args.n_iter:
                with torch.random.fork_rng(devices=[]):  # evaluating never changes training
                    metrics = evaluate(step, x_neg)
                metrics["sec_per_iter"] = t_loop / max(n_timed, 1)
                metrics["cpu_sec"] = time.process_time() - cpu0
                log.log(metrics, step)
                print(f"it {step:6d}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                     if k in ("kl_ebm", "kl_kde", "nll_ebm",
                                                              "fd", "fd_pixels", "label_tv")))
                save(step)
    except KeyboardInterrupt:
        status = "interrupted"
        save(step)
        print(f"\ninterrupted at iteration {step}; checkpoint saved, continue with "
              f"`python train_mcmc.py --resume {out_dir}`", file=sys.stderr)
    if image and os.path.isdir(os.path.join(image_dir, "negatives")):
        print(f"wrote {make_gif(os.path.join(image_dir, 'negatives'), fps=4)}")
    summary = {"status": status, "step": step, **metrics}
    log.summary(summary)
    log.finish()
    if status == "nan":
        sys.exit(1)
    if status == "interrupted":
        sys.exit(130)
    return summary


if __name__ == "__main__":
    main()
