"""De-biasing a VAE trained on class-imbalanced digits with an EBM tilt.

    python train_tilt.py                              # digits, latent ML tilt (about 30 s)
    python train_tilt.py --objective both --data_tilt # + hackathon recipe + data-space tilt
    python train_tilt.py --experiment mixture         # the 2D Gaussian-mixture example
    python train_tilt.py --dataset mnist --mnist_images train-images-idx3-ubyte \
        --mnist_labels train-labels-idx1-ubyte --latent 8

The story, top to bottom:
1. data: a biased set (digits 0-4 in proportions .12/.33/.28/.20/.07) and a small unbiased set
   (equal counts per class, disjoint from it); a classifier on all ten digits
   (image_metrics.Classifier, imbalance.label_classifier) labels generated images.
2. base model p_phi: a VAE on the biased set, early-stopped on a validation split.
3. latent tilt p_theta(z) ∝ exp(-E(z)) N(z; 0, I), trained on the encoder means of the
   unbiased images (tilt.py: "ml" = exact maximum likelihood with importance-sampled log Z,
   the default; "hackathon" = the critic-style recipe).
4. sampling: self-normalised importance resampling (SNIR) of prior draws (ESS reported) and
   Langevin on E(z) + |z|^2 / 2; decoded and labelled by the classifier.
5. optional data-space tilt exp(-E(x)) p_phi(x): "ml" with p_phi = the law of decoded means
   of prior draws (Langevin in latent space on E(decode(z)) + |z|^2 / 2), "cd" with
   log p_phi = ELBO (Langevin in data space on E(x) - ELBO(x)); the output names the model.
6. metric: TV distance between the label histogram of 1,000 decoded samples and the uniform
   distribution over 0-4 (labels 5-9 count as error); figures; checkpoint.

Outputs: runs/<run>/ (config.json, metrics.jsonl, summary.json, checkpoint.pt) and figures in
--image_dir, default images/<run>/; wandb (online when logged in, else offline). A run takes
under two minutes, so there is no --resume: Ctrl-C stops at the next training step, keeps the
weights trained so far in checkpoint.pt and exits with status 130.
"""
import os
import sys
import time

import numpy as np
import torch

import checkpoint
import config
import gridmath
import image_data
import imbalance
import plots
import scaffold
import tilt
import tilt_plots
import util
from ebm import EBM
from image_metrics import label_histogram
from samplers import langevin
from vae import VAE, fit as fit_vae


# ----------------------------------------------------------------------------- config
def build_parser():
    p = config.parser("EBM tilts of a VAE trained on class-imbalanced digits")
    p.add_argument("--experiment", default="digits", choices=["digits", "mixture"],
                   help="digits: de-bias a VAE; mixture: the 2D Gaussian-mixture example")
    # data
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist"],
                   help="digits: scikit-learn's 8x8 digits (offline); mnist: local IDX files")
    config.rename(p, "--data", "--dataset")
    p.add_argument("--mnist_images", default=None, help="MNIST images IDX file (.gz allowed)")
    p.add_argument("--mnist_labels", default=None, help="MNIST labels IDX file (.gz allowed)")
    p.add_argument("--per_class", type=config.nonnegative_int, default=0,
                   help="unbiased images per class; 0: all that the scarcest class leaves")
    p.add_argument("--val_frac", type=config.open_unit, default=0.15,
                   help="fraction of the biased set held out for VAE early stopping")
    p.add_argument("--clf_max_iter", type=config.positive_int, default=1000,
                   help="iterations of the logistic-regression classifier (lbfgs)")
    # VAE
    p.add_argument("--latent", type=config.positive_int, default=2, help="latent size")
    p.add_argument("--vae_hidden", type=config.positive_int, nargs="+", default=[128, 128])
    p.add_argument("--likelihood", default="bernoulli", choices=["bernoulli", "gaussian"])
    p.add_argument("--vae_epochs", type=config.positive_int, default=400)
    p.add_argument("--vae_batch", type=config.positive_int, default=64)
    p.add_argument("--vae_lr", type=config.positive_float, default=2e-3)
    p.add_argument("--patience", type=config.positive_int, default=30,
                   help="early stopping: epochs without a better validation ELBO")
    # latent tilt
    p.add_argument("--objective", default="ml", choices=["ml", "hackathon", "both"],
                   help="ml: maximum likelihood with importance-sampled log Z (default); "
                        "hackathon: the critic recipe; both: train and report the two")
    p.add_argument("--tilt_hidden", type=config.positive_int, nargs="+", default=[64, 64])
    p.add_argument("--tilt_steps", type=config.positive_int, default=500)
    p.add_argument("--tilt_lr", type=config.positive_float, default=1e-3)
    p.add_argument("--n_base", type=config.positive_int, default=4096,
                   help="fresh base samples per step (importance samples of log Z / negatives)")
    p.add_argument("--reg", type=config.nonnegative_float, default=0.1,
                   help="hackathon / data tilt: weight of the energy L2 term")
    p.add_argument("--gp", type=config.nonnegative_float, default=1.0,
                   help="hackathon: weight of the gradient-norm penalty at interpolates")
    # sampling and evaluation
    p.add_argument("--n_samples", type=config.positive_int, default=1000,
                   help="decoded samples labelled by the classifier")
    p.add_argument("--pool", type=config.positive_int, default=20000,
                   help="base draws that SNIR resamples from")
    p.add_argument("--langevin_steps", type=config.nonnegative_int, default=500)
    p.add_argument("--langevin_eps", type=config.positive_float, default=0.2)
    # data-space tilt
    config.add_flag(p, "--data_tilt", help="also train the data-space tilt")
    p.add_argument("--data_tilt_steps", type=config.positive_int, default=150)
    p.add_argument("--data_tilt_hidden", type=config.positive_int, nargs="+", default=[128, 128])
    p.add_argument("--data_objective", default="ml", choices=["ml", "cd"],
                   help="data tilt: ml = maximum likelihood, log Z by importance sampling over "
                        "VAE samples; cd = contrastive divergence with Langevin negatives started "
                        "at VAE samples and an energy L2 term --reg")
    p.add_argument("--data_pos", default="recon", choices=["recon", "images"],
                   help="data-tilt positives: VAE reconstructions (decoder means at the encoder "
                        "means) of the unbiased images, like the decoded VAE samples they are "
                        "compared with, or the raw images")
    p.add_argument("--data_langevin_steps", type=config.nonnegative_int, default=20,
                   help="cd data tilt: data-space Langevin steps (negatives and samples); the ml "
                        "data tilt is sampled in latent space with --langevin_steps/_eps")
    p.add_argument("--data_langevin_eps", type=config.positive_float, default=0.02)
    # 2D mixture
    p.add_argument("--n_unbiased_2d", type=config.positive_int, default=100)
    p.add_argument("--mix_teaching", default="stratified", choices=["stratified", "iid"],
                   help="how the teaching points' components are drawn from [.3, .4, .3]: "
                        "stratified = exactly 30/40/30 of 100 (largest-remainder counts), so "
                        "their composition carries no sampling noise; iid = multinomial counts")
    p.add_argument("--mix_steps", type=config.positive_int, default=600)
    p.add_argument("--mix_lr", type=config.positive_float, default=3e-3)
    return p


def check_args(args):
    """Every refusal of bad input, before any work (one line, exit status 2)."""
    if args.pool < args.n_samples:
        config.fail(f"--pool ({args.pool}) must be at least --n_samples ({args.n_samples})")
    image = 28 * 28 * 4  # float32 bytes of the largest image (MNIST); digits are 8x8
    util.check_memory({"--pool": args.pool * image, "--n_base": args.n_base * image,
                       "--n_samples": args.n_samples * image})
    if args.dataset == "mnist" and args.experiment == "digits":
        for flag in ("mnist_images", "mnist_labels"):
            path = getattr(args, flag)
            if not path or not os.path.isfile(path):
                config.fail(f"--{flag}: file {path!r} not found; pass a local MNIST IDX file "
                            f"(no download at run time) or use --dataset digits")


class StageLog:
    """wandb needs one increasing step across the stages (VAE epochs, tilt steps, ...): every
    row gets the next global step and carries the stage's own step as `<stage>/step`.
    `every(stage, n)` is a training loop's step callback: it logs every n-th step and returns
    True once Ctrl-C was pressed, which stops the loop after that step."""

    def __init__(self, run):
        self.run, self.log, self.step = run, run.log, 0
        self.stage, self.stage_step = None, 0

    def every(self, stage, n=10):
        def on_step(local_step, metrics):
            self.stage, self.stage_step = stage, local_step + 1
            if local_step % n == 0:
                self.log.log({**{f"{stage}/{k}": v for k, v in metrics.items()},
                              f"{stage}/step": local_step}, self.step)
                self.step += 1
            return self.run.signals.stop_requested
        return on_step

    def check_stop(self, stage):
        """Between stages: raise scaffold.Interrupted once Ctrl-C or SIGTERM came."""
        self.run.signals.boundary(f"after {stage}" if self.stage is None else
                                  f"in {self.stage} at step {self.stage_step}")

    def image(self, key, path):
        self.log.log_image(key, path, self.step)


# ----------------------------------------------------------------------------- digits
def load_data(args):
    if args.dataset == "digits":
        return image_data.load_digits_data()
    try:
        return image_data.load_mnist_idx(args.mnist_images, args.mnist_labels)
    except (FileNotFoundError, ValueError) as e:
        config.fail(str(e))


def prepare_digits(args):
    """The images, labels and the biased/unbiased split (bad files and impossible splits are
    one-line errors here, before the run's folders exist)."""
    rng = util.set_seed(args.seed)
    X, y = load_data(args)
    try:
        split = imbalance.biased_unbiased_split(y, rng, per_class=args.per_class or None)
    except ValueError as e:
        config.fail(str(e))
    return X, y, split, rng


def run_digits(args, device, log, state, save, data):
    """The digits story, stage by stage; returns the summary."""
    X, y, split, rng = data
    clf, clf_acc = imbalance.label_classifier(X, y, rng, args.seed, args.clf_max_iter)
    log.check_stop("the classifier")
    x_biased = torch.tensor(X[split.biased], device=device)
    x_unbiased = torch.tensor(X[split.unbiased], device=device)
    print(f"data: {args.dataset}, biased set {len(split.biased)} images {split.biased_counts}, "
          f"unbiased {len(split.unbiased)} ({split.per_class} per class); classifier test "
          f"accuracy {clf_acc:.3f}")

    def labels_of(images):
        return clf.predict(images.detach().float().cpu()).numpy()

    vae, hist = fit_base(args, device, log, state, save, x_biased, X.shape[1])
    summary = {"classifier_accuracy": clf_acc, "vae_best_val_elbo": hist["best_val"],
               "vae_epochs": len(hist["val"]), "n_biased": len(split.biased),
               "n_unbiased": len(split.unbiased)}
    out = dict(hists={"biased set": label_histogram(y[split.biased]),
                      "unbiased set": label_histogram(y[split.unbiased])},
               grids={}, latent_tilts={"base prior N(0, I)": (None, None)})
    with torch.no_grad():
        base_x, _ = vae.sample(args.n_samples)
        base_labels = labels_of(base_x)
        z_pos, _ = vae.encode(x_unbiased)  # positives: encoder means of the unbiased images
    summary["tv_base"] = imbalance.tv_to_uniform(base_labels)
    out["hists"]["base VAE"] = label_histogram(base_labels)
    out["grids"]["base VAE"] = base_x.cpu().numpy()
    print(f"base VAE samples: TV to uniform(0-4) = {summary['tv_base']:.3f}")
    for obj in ["ml", "hackathon"] if args.objective == "both" else [args.objective]:
        latent_tilt(args, obj, vae, z_pos, labels_of, device, log, state, summary, out)
    state["stage"] = "latent tilts"
    save()
    if args.data_tilt:
        x_dpos = x_unbiased
        if args.data_pos == "recon":
            with torch.no_grad():
                x_dpos = vae.decode(z_pos)
        data_tilt(args, vae, x_dpos, base_x, labels_of, device, log, state, summary, out)
        state["stage"] = "data tilt"
        save()
    digits_figures(args, log, vae, X, y, split, x_biased, x_unbiased, out)
    return summary


def fit_base(args, device, log, state, save, x_biased, dim):
    """The base model: a VAE on the biased set, early-stopped on a validation split."""
    n_val = max(1, int(args.val_frac * len(x_biased)))
    vae = VAE(dim, args.latent, args.vae_hidden, args.likelihood).to(device)
    state.update(vae=vae.state_dict(), vae_spec=vae.spec(), stage="init")
    save()  # a NaN in the first epoch still leaves a loadable run
    on_epoch = log.every("vae", 1)
    try:
        hist = fit_vae(vae, x_biased[n_val:], x_biased[:n_val], args.vae_epochs, args.vae_batch,
                       args.vae_lr, args.patience,
                       on_epoch=lambda e, tr, va: on_epoch(e, {"train_loss": tr, "val_elbo": va}))
    except FloatingPointError as e:
        raise scaffold.NonFinite(str(e))
    state.update(vae=vae.state_dict(), stage="vae")
    log.check_stop("the VAE")
    print(f"VAE: {len(hist['val'])} epochs, best validation ELBO {hist['best_val']:.2f} at epoch "
          f"{hist['best_epoch']} (weights restored)")
    save()
    return vae, hist


def fitted(h, E, key, what, log, state):
    """After a tilt stage's fit `h`: E's weights into the checkpoint's `state` (`key`, with its
    spec); a non-finite loss ends the run (exit status 1), a Ctrl-C after the stage (130)."""
    state[key], state[f"{key}_spec"] = E.state_dict(), E.spec()
    if h["nan_step"] is not None:
        raise scaffold.NonFinite(f"{what} loss is not finite at step {h['nan_step']}")
    log.check_stop(f"the {what}")
    E.eval()


def latent_tilt(args, obj, vae, z_pos, labels_of, device, log, state, summary, out):
    """One latent tilt (objective `obj`), sampled by SNIR and Langevin and labelled; adds to
    the summary and to the figures' histograms, grids and latent panels (`out`)."""
    E = EBM(args.latent, args.tilt_hidden, "silu").to(device)
    t_obj = time.perf_counter()
    th = tilt.fit_tilt(E, z_pos, lambda s: torch.randn(args.n_base, args.latent, device=device),
                       args.tilt_steps, obj, args.tilt_lr, reg=args.reg, gp=args.gp,
                       on_step=log.every(obj))
    fitted(th, E, f"ebm_{obj}", f"{obj} tilt", log, state)
    with torch.no_grad():
        pool = torch.randn(args.pool, args.latent, device=device)
        idx, ess = tilt.snir(-E(pool), args.n_samples)
        z_snir = pool[idx]
        x_snir = vae.decode(z_snir)
        log_Z = float(tilt.log_Z_importance(E, pool))
    z_lang = langevin(tilt.latent_U(E), torch.randn(args.n_samples, args.latent, device=device),
                      args.langevin_steps, args.langevin_eps, freeze=E)
    with torch.no_grad():
        x_lang = vae.decode(z_lang)
    lab_snir, lab_lang = labels_of(x_snir), labels_of(x_lang)
    summary.update({f"tv_{obj}_snir": imbalance.tv_to_uniform(lab_snir),
                    f"tv_{obj}_langevin": imbalance.tv_to_uniform(lab_lang),
                    f"ess_{obj}": ess, f"ess_frac_{obj}": ess / args.pool,
                    f"log_Z_{obj}": log_Z, f"time_{obj}_s": time.perf_counter() - t_obj})
    if args.latent == 2:  # the IS estimate of log Z against grid integration
        neg, area = gridmath.on_grid(tilt.latent_log_density(E), 6.0, 300, device)
        summary[f"log_Z_grid_{obj}"] = gridmath.grid_log_Z(neg, area)
    print(f"{obj} tilt: SNIR TV {summary[f'tv_{obj}_snir']:.3f} (ESS {ess:.0f} of "
          f"{args.pool}), Langevin TV {summary[f'tv_{obj}_langevin']:.3f}, log Z {log_Z:.3f}")
    out["hists"][f"{obj} tilt (SNIR)"] = label_histogram(lab_snir)
    out["grids"][f"{obj} tilt (SNIR)"] = x_snir.cpu().numpy()
    out["latent_tilts"][f"{obj} tilt + SNIR samples"] = (E, z_snir[:300].cpu())
    log.check_stop(f"sampling the {obj} tilt")


def data_tilt(args, vae, x_dpos, base_x, labels_of, device, log, state, summary, out):
    """The data-space tilt exp(-E(x)) p_phi(x); p_phi = decoded means ("ml") or exp(ELBO)
    ("cd"); sampled by SNIR and Langevin and labelled (adds to summary and `out`)."""
    t_dt = time.perf_counter()
    Ex = EBM(x_dpos.shape[1], args.data_tilt_hidden, "silu").to(device)
    on_step = log.every("data")
    if args.data_objective == "ml":
        dh = tilt.fit_tilt(Ex, x_dpos, lambda s: vae.sample(args.n_base // 4)[0],
                           args.data_tilt_steps, "ml", args.tilt_lr, on_step=on_step)
    else:
        dh = tilt.fit_data_tilt(
            Ex, x_dpos, vae, args.data_tilt_steps, args.tilt_lr, n_neg=128,
            langevin_steps=args.data_langevin_steps, eps=args.data_langevin_eps,
            reg=args.reg, on_step=on_step)
    fitted(dh, Ex, "ebm_data", "data-space tilt", log, state)
    with torch.no_grad():
        pool_x, _ = vae.sample(args.pool)
        idx, ess = tilt.snir(-Ex(pool_x), args.n_samples)
        x_dsnir = pool_x[idx]
    # Langevin under the model that was trained (tilt.sample_data_tilt): ml in latent space
    # with the latent Langevin settings, cd in data space from the base VAE samples
    ml = args.data_objective == "ml"
    x_dlang, model = tilt.sample_data_tilt(
        Ex, vae, args.data_objective, args.n_samples,
        args.langevin_steps if ml else args.data_langevin_steps,
        args.langevin_eps if ml else args.data_langevin_eps, x0=None if ml else base_x)
    snir_model = tilt.DATA_TILT_MODELS["ml"]  # SNIR reweights decoded means of prior draws
    lab_d, lab_dl = labels_of(x_dsnir), labels_of(x_dlang)
    summary.update({"tv_data_snir": imbalance.tv_to_uniform(lab_d),
                    "tv_data_langevin": imbalance.tv_to_uniform(lab_dl), "ess_data": ess,
                    "data_tilt_trained": model, "data_tilt_langevin_samples": model,
                    "data_tilt_snir_samples": snir_model,
                    "time_data_s": time.perf_counter() - t_dt})
    print(f"data-space tilt ({args.data_objective}), trained and Langevin-sampled model: "
          f"{model}: SNIR TV {summary['tv_data_snir']:.3f} (ESS {ess:.0f}"
          + ("" if snir_model == model else f"; SNIR samples {snir_model}")
          + f"), Langevin TV {summary['tv_data_langevin']:.3f}")
    out["hists"]["data tilt (SNIR)"] = label_histogram(lab_d)
    out["grids"]["data tilt (SNIR)"] = x_dsnir.cpu().numpy()


def digits_figures(args, log, vae, X, y, split, x_biased, x_unbiased, out):
    """Label histograms, sample grids (square images) and latent panels (2D latents)."""
    img = args.image_dir
    target = np.r_[np.full(5, 0.2), np.zeros(5)]
    f = tilt_plots.label_histograms(os.path.join(img, "label_histograms.png"), out["hists"],
                                    "labels of data and of 1,000 decoded samples "
                                    "(dashed: uniform over 0-4)", target=target)
    log.image("label_histograms", f)
    if int(np.sqrt(X.shape[1])) ** 2 == X.shape[1]:  # square images: sample grids
        f = tilt_plots.image_grids(os.path.join(img, "samples.png"), out["grids"])
        log.image("samples", f)
    if args.latent == 2:
        with torch.no_grad():
            z_all, _ = vae.encode(torch.cat([x_biased, x_unbiased]))
        lab_all = np.r_[y[split.biased], y[split.unbiased]]
        f = tilt_plots.latent_panels(os.path.join(img, "latent.png"), z_all.cpu(), lab_all,
                                     out["latent_tilts"], title="encoder means of biased + "
                                     "unbiased images by label; contours: log prior; dots: "
                                     "SNIR samples")
        log.image("latent", f)


# ----------------------------------------------------------------------------- 2D mixture
def run_mixture(args, device, log, state, save):
    """Base: mixture with weights BASE_WEIGHTS; 100 points with TARGET_WEIGHTS teach the tilt
    (stratified by default: exactly 30/40/30, see --mix_teaching); SNIR from 20,000 base draws
    (whose components are known) gives the component histogram."""
    util.set_seed(args.seed)
    x_pos, c_pos = tilt.mixture_sample(args.n_unbiased_2d, tilt.TARGET_WEIGHTS,
                                       stratified=args.mix_teaching == "stratified")
    log_base = tilt.mixture_log_prob(tilt.BASE_WEIGHTS)
    E = EBM(2, args.tilt_hidden, "silu").to(device)
    state.update(ebm=E.state_dict(), ebm_spec=E.spec(), stage="init")
    save()  # a NaN at the first step still leaves a loadable run
    objective = "hackathon" if args.objective == "hackathon" else "ml"
    th = tilt.fit_tilt(E, x_pos.to(device),
                       lambda s: tilt.mixture_sample(args.n_base, tilt.BASE_WEIGHTS)[0].to(device),
                       args.mix_steps, objective, args.mix_lr, reg=args.reg, gp=args.gp,
                       on_step=log.every("mix"))
    state["stage"] = "mixture"
    fitted(th, E, "ebm", "mixture tilt", log, state)
    save()
    with torch.no_grad():
        pool, comp = tilt.mixture_sample(args.pool, tilt.BASE_WEIGHTS)
        idx, ess = tilt.snir(-E(pool.to(device)), args.n_samples)
        hist = np.bincount(comp[idx.cpu()].numpy(), minlength=3) / args.n_samples
        # the tilt's own component weights, before resampling: the self-normalised importance
        # weights summed per component (separates the estimator from resampling noise)
        w = torch.softmax(-E(pool.to(device)).double(), 0).cpu()
        tilt_w = np.array([float(w[comp == k].sum()) for k in range(3)])
        emp = np.bincount(c_pos.numpy(), minlength=3) / len(c_pos)
        log_Z = float(tilt.log_Z_importance(E, pool.to(device)))
    tilted = lambda x: -E(x) + log_base(x)  # noqa: E731
    neg, area = gridmath.on_grid(tilted, tilt.MIXTURE_BOUND + 1.5, 300, device)
    summary = {"mix_hist": hist.tolist(), "mix_tv": tilt.tv(hist, tilt.TARGET_WEIGHTS),
               "mix_tilt_weights": tilt_w.tolist(),
               "mix_tv_tilt_weights": tilt.tv(tilt_w, tilt.TARGET_WEIGHTS),
               "mix_teaching": args.mix_teaching, "mix_unbiased_hist": emp.tolist(),
               "mix_tv_unbiased_sample": tilt.tv(emp, tilt.TARGET_WEIGHTS),
               "mix_tv_base": tilt.tv(tilt.BASE_WEIGHTS, tilt.TARGET_WEIGHTS), "mix_ess": ess,
               "mix_log_Z_is": log_Z, "mix_log_Z_grid": gridmath.grid_log_Z(neg, area)}
    print(f"2D mixture ({objective}): component histogram of {args.n_samples} resampled points "
          f"{np.round(hist, 3).tolist()}, TV to {list(tilt.TARGET_WEIGHTS)} = "
          f"{summary['mix_tv']:.3f} (base {summary['mix_tv_base']:.2f}; the tilt's own weights "
          f"{summary['mix_tv_tilt_weights']:.3f}; the {len(c_pos)} {args.mix_teaching} teaching "
          f"points {summary['mix_tv_unbiased_sample']:.3f}); ESS {ess:.0f} of {args.pool}")
    b = tilt.MIXTURE_BOUND
    xs = pool[idx.cpu()]

    f = tilt_plots.mixture_figure(
        os.path.join(args.image_dir, "mixture.png"),
        [("base p_phi", plots.density(log_base, bound=b)),
         (f"{args.n_unbiased_2d} unbiased points", plots.samples(x_pos, bound=b, bins=40)),
         ("tilted exp(-E) p_phi", plots.density(tilted, bound=b)),
         (f"SNIR: {args.n_samples} resampled", plots.samples(xs, bound=b, bins=60))],
        {"base": tilt.BASE_WEIGHTS, "resampled": hist, "target": tilt.TARGET_WEIGHTS},
        title=f"2D mixture tilt: component histogram TV {summary['mix_tv']:.3f} to target")
    log.image("mixture", f)
    return summary


# ----------------------------------------------------------------------------- reload
def load_tilt_run(run_dir, device="cpu"):
    """A finished run: `r = load_tilt_run("runs/<run>")` gives r.config, r.vae (or None) and
    r.energies {"ml" | "hackathon" | "data" | "mixture": EBM}, all in eval mode.

        z = torch.randn(20000, 2); idx, ess = tilt.snir(-r.energies["ml"](z), 1000)
        images = r.vae.decode(z[idx])"""
    from types import SimpleNamespace

    ckpt = checkpoint.load_checkpoint(os.path.join(run_dir, "checkpoint.pt"), map_location=device)

    def load(cls, key):
        module = cls(**ckpt[f"{key}_spec"]).to(device)
        module.load_state_dict(ckpt[key])
        return module.eval()

    energies = {name: load(EBM, key) for key, name in (
        ("ebm_ml", "ml"), ("ebm_hackathon", "hackathon"), ("ebm_data", "data"), ("ebm", "mixture"))
        if key in ckpt}
    return SimpleNamespace(config=ckpt["config"], vae=load(VAE, "vae") if "vae" in ckpt else None,
                           energies=energies)


# ----------------------------------------------------------------------------- main
SCRIPT = scaffold.Script("train_tilt.py", resumable=False)


def main(argv=None):
    args, _ = scaffold.parse(build_parser(), argv, SCRIPT)
    check_args(args)
    util.apply_threads(args)
    device = scaffold.device(args)
    data = prepare_digits(args) if args.experiment == "digits" else None
    with scaffold.Run(args, SCRIPT, ("tilt", args.experiment, f"s{args.seed}")) as run:
        return run.execute(lambda: train(args, run, device, data))


def train(args, run, device, data):
    """The experiment's stages (timed by the run's CPU clock); returns the summary. `state`
    collects the trained weights (checkpoint.pt, saved after each stage and on Ctrl-C)."""
    print(f"run {run.name}: experiment {args.experiment}, device {device}; outputs in "
          f"{args.out_dir}, figures in {args.image_dir}")
    checkpoints, loop = run.checkpoints, run.loop
    log, state = StageLog(run), loop.state
    checkpoints.load_or_save_first()
    with loop.clock():
        if args.experiment == "digits":
            summary = run_digits(args, device, log, state, checkpoints.save, data)
        else:
            summary = run_mixture(args, device, log, state, checkpoints.save)
    summary["cpu_s"] = loop.cpu_s
    run.log.log({k: v for k, v in summary.items() if not isinstance(v, list)}, log.step)
    print(f"done in {summary['cpu_s']:.1f} CPU s: {args.out_dir} (summary.json), "
          f"figures in {args.image_dir}")
    return summary


if __name__ == "__main__":
    sys.exit(config.cli(main))
